"""Generation and next-token scoring back ends behind one small interface.

Simulation (and later PPO rollouts and evaluation) only ever call
`generate` and `next_token_logprobs`; a faster engine drops in by implementing
the same two methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 300
    temperature: float = 1.0
    """0 means greedy decoding."""
    top_k: int = 50
    """Keep the k most likely tokens; 0 turns it off."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    """A completion ends right after the first of these strings (which stays in its text)."""
    banned: tuple[str, ...] = ()
    """No token whose text contains one of these strings is ever sampled (where the engine can ban tokens)."""
    stop_at_eos: bool = True


@dataclass(frozen=True)
class Completion:
    text: str
    """Generated text, up to and including a stop string; the end-of-sequence token is not included."""
    finish_reason: str
    """"stop" (a stop string), "eos" (the model's end-of-sequence token) or "length"."""
    num_tokens: int
    token_ids: tuple[int, ...] = ()
    """The sampled token ids (in-process engines; empty from servers). The end-of-sequence token is not included."""


class Engine(Protocol):
    name: str
    context_length: int | None
    """Most tokens (prompt + completion) the model takes; None when unknown."""
    can_ban_tokens: bool

    def count_tokens(self, text: str) -> int | None: ...

    def generate(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int]) -> list[Completion]:
        """One completion per prompt; `seeds[i]` alone decides the randomness of completion i."""
        ...

    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[str]) -> tuple[list[list[float]], list]:
        """Log-probabilities (over the whole vocabulary) that each candidate string is the next token.

        Returns the per-prompt log-probs and the token identifiers used for the candidates.
        """
        ...
