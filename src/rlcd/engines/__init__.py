"""Generation and next-token scoring back ends behind one small interface.

Simulation (and later PPO rollouts and evaluation) only ever call
`generate` and `next_token_logprobs`; a faster engine drops in by implementing
the same two methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

SCORING_TOKEN_BUDGET = 16384
"""Most tokens, padding included (rows x the longest row), in one scoring forward (reward scores, A/B
letter log-probs). On a GPU it gives a 7B forward's matmuls thousands of rows, even of short texts, while
its activations stay near 1 GB (bf16, no gradients); a caller's row cap keeps CPU batches modest."""


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
    eos_token_id: int | None = None
    """With finish_reason "eos" from an in-process engine: which end-of-sequence token was sampled (a model
    may have several, e.g. Qwen's <|im_end|> and <|endoftext|>), so callers score what was sampled."""


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


def token_budget_batches(lengths: Sequence[int], max_rows: int, max_tokens: int = SCORING_TOKEN_BUDGET) -> list[list[int]]:
    """Indices of the rows of these token lengths in batches for padded forwards, longest first.

    Sorting by length puts similar lengths together, so padding stays small, and a batch too large for
    memory fails at once. A batch takes rows while rows x its longest (first) row stays within
    max_tokens and rows <= max_rows; a row longer than max_tokens still gets a batch of its own.
    """
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        last = batches[-1] if batches else None
        if last and len(last) < max_rows and (len(last) + 1) * lengths[last[0]] <= max_tokens:
            last.append(i)
        else:
            batches.append([i])
    return batches


def no_cudnn_attention():
    """Context: scaled_dot_product_attention without its cuDNN backend (PyTorch's first choice on Hopper GPUs).

    cuDNN builds a plan for every new input shape: a 7B forward of a few prompts took ~90 ms for a new
    shape on an H100 against ~30 ms for a repeated one (1–1.5 s for the first shapes), and prefills of
    refilled slots and scoring batches rarely repeat a shape (docs/results.md, generation throughput). The
    memory-efficient kernel takes the same masks without that cost. No effect on CPU. Also a decorator.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
