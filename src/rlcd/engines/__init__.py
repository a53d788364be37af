"""Generation and next-token scoring back ends behind one small interface.

Simulation, PPO rollouts and evaluation only ever call `generate` and
`next_token_logprobs`; a faster engine drops in by implementing the same two
methods. `make_engine` and `load_engine` build every in-process engine, and
`engine_kind` is the one place that decides what `--engine auto` means.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

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


# --------------------------------------------------------------------------------------------------
# The in-process engines: which one, built from a model or from a model's name
# --------------------------------------------------------------------------------------------------

ENGINE_KINDS = ("auto", "fast", "hf")
ENGINE_HELP = ("in-process engine: fast (continuous batching, CUDA graphs on GPU) or hf (plain decode loop); "
               "auto = fast on GPU, hf on CPU")


def engine_kind(kind: str, device) -> str:
    """The engine `kind` stands for on `device`: auto is the fast engine on a CUDA device and the plain one
    elsewhere (on a CPU the fast engine has no CUDA graph to replay, and the plain loop is as fast)."""
    if kind not in ENGINE_KINDS:
        raise ValueError(f"engine kind {kind!r}: expected one of {ENGINE_KINDS}")
    if kind != "auto":
        return kind
    return "fast" if str(device).startswith("cuda") else "hf"


def make_engine(model, tokenizer, *, kind: str = "auto", batch_size: int = 32) -> Engine:
    """The in-process engine of `kind` (auto, fast, hf) over a loaded causal LM and its tokenizer (left padding)."""
    if engine_kind(kind, next(model.parameters()).device) == "fast":
        from rlcd.engines.fast import FastEngine

        return FastEngine(model, tokenizer, batch_size=batch_size)
    from rlcd.engines.hf import HFEngine

    return HFEngine(model, tokenizer, batch_size=batch_size)


def load_engine(model: str, *, kind: str = "auto", device: str | None = None, dtype: str = "auto",
                batch_size: int = 32) -> tuple[Engine, dict]:
    """Load a model by name (`models.py`: a Hugging Face directory, a hub id, a .gguf file, the embedded default,
    or a LoRA adapter directory, merged on load) and build its engine; also what a manifest records of it."""
    from rlcd.models import is_adapter_dir, load_adapter_lm, load_causal_lm, resolve_model

    if is_adapter_dir(model):
        lm, tokenizer = load_adapter_lm(model, device, dtype)
        source = {"adapter_base": lm.config.name_or_path}
    else:
        lm, tokenizer = load_causal_lm(model, device, dtype)
        source = {"path": resolve_model(model)}
    engine = make_engine(lm, tokenizer, kind=kind, batch_size=batch_size)
    return engine, {"backend": "hf", "engine": engine.name, "model": model, **source, "device": str(lm.device), "dtype": str(lm.dtype)}
