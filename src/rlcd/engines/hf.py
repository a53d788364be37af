"""In-process engine: a Hugging Face causal LM, with its own decoding loop.

The loop (rather than `model.generate`) gives per-row seeded sampling
(`sampling.sample`), per-row stop strings, and drops finished rows from the
batch and its KV cache, so a batch costs what its live rows cost. A row ends by
the rule of `ending.py`, which FastEngine follows too.
"""

from __future__ import annotations

import types
from collections.abc import Sequence

import torch

from rlcd.engines import SCORING_TOKEN_BUDGET, Completion, SamplingParams, no_cudnn_attention, token_budget_batches
from rlcd.engines.ending import Ending, eos_token_ids, stop_enders
from rlcd.engines.hf_internals import cache_argument
from rlcd.engines.sampling import sample
from rlcd.packing import PackedRow, packed_batch, shared_prefix_rows


class HFEngine:
    name = "hf"
    can_ban_tokens = True

    def __init__(self, model, tokenizer, batch_size: int = 32, token_budget: int = SCORING_TOKEN_BUDGET):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.token_budget = token_budget  # most tokens, padding included, in one next_token_logprobs forward
        self.device = next(model.parameters()).device
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        self._banned_cache: dict[tuple[str, ...], torch.Tensor] = {}
        self._enders_cache: dict[tuple[str, ...], set[int]] = {}
        self.cache_key = cache_argument(model)  # the KV cache's name in forward's arguments and outputs
        vocabulary_rows_first(model)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True).input_ids)

    def _encode(self, prompts: Sequence[str]):
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=True)
        mask = enc.attention_mask.to(self.device)
        return enc.input_ids.to(self.device), mask, (mask.cumsum(-1) - 1).clamp(min=0)

    def _vocab_texts(self) -> list[str]:
        if not hasattr(self, "_texts"):
            pieces = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            self._texts = [self.tokenizer.convert_tokens_to_string([t]) if t is not None else "" for t in pieces]
        return self._texts

    def banned_token_ids(self, banned: tuple[str, ...]) -> torch.Tensor:
        """Every vocabulary token whose text contains a banned string."""
        if banned not in self._banned_cache:
            ids = [i for i, t in enumerate(self._vocab_texts()) if any(b in t for b in banned)]
            self._banned_cache[banned] = torch.tensor(ids, dtype=torch.long, device=self.device)
        return self._banned_cache[banned]

    def ending(self, params: SamplingParams) -> Ending:
        """The end-of-completion rule (`ending.py`) for these settings, the same for every in-process engine."""
        eos = set(eos_token_ids(self.model, self.tokenizer)) if params.stop_at_eos else set()
        if params.stop and params.stop not in self._enders_cache:
            self._enders_cache[params.stop] = stop_enders(self._vocab_texts(), params.stop)
        return Ending(self.tokenizer, params, eos, self._enders_cache.get(params.stop, set()))

    @torch.no_grad()
    @no_cudnn_attention()
    def generate(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int]) -> list[Completion]:
        # longest first: similar lengths share a batch and padding stays small
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: list[Completion | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, c in zip(chunk, self._generate_batch([prompts[i] for i in chunk], params, [seeds[i] for i in chunk])):
                results[i] = c
        return results  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[str], params: SamplingParams, seeds: list[int]) -> list[Completion]:
        input_ids, mask, positions = self._encode(prompts)
        banned = self.banned_token_ids(params.banned) if params.banned else None
        ending = self.ending(params)
        seeds_t = torch.tensor(seeds, dtype=torch.int64, device=self.device)
        live = list(range(len(prompts)))  # original row of each row still in the batch
        tokens: list[list[int]] = [[] for _ in prompts]
        done: list[Completion | None] = [None] * len(prompts)

        # logits_to_keep=1: the vocabulary projection of every prompt position would cost more than the prompt itself
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache, next_pos = out[self.cache_key], positions[:, -1:] + 1
        for step in range(params.max_new_tokens):
            logits = out.logits[:, -1, :].float()
            if banned is not None and len(banned):
                logits[:, banned] = float("-inf")
            chosen = sample(logits, seeds_t, step, params.temperature, params.top_k, params.top_p).tolist()
            keep = []
            for row, tok in enumerate(chosen):
                i = live[row]
                done[i] = ending.add(tokens[i], tok)
                if done[i] is None:
                    keep.append(row)
            if not keep:
                break
            step_ids = torch.tensor(chosen, device=self.device)[:, None]
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=-1)
            if len(keep) < len(live):
                idx = torch.tensor(keep, device=self.device)
                cache.reorder_cache(idx)
                mask, next_pos, step_ids, seeds_t = mask[idx], next_pos[idx], step_ids[idx], seeds_t[idx]
                live = [live[r] for r in keep]
            out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=next_pos, use_cache=True, **{self.cache_key: cache})
            next_pos = next_pos + 1
        return [d if d is not None else ending.completion(t, "length") for d, t in zip(done, tokens)]  # max_new_tokens 0

    @torch.no_grad()
    @no_cudnn_attention()
    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[str]) -> tuple[list[list[float]], list[int]]:
        """Prompts that begin with the same tokens (a judge's two replies to one conversation) share one row: their
        common start once, then each one's rest, which sees that start and not the others' (`shared_prefix_rows`).
        Rows go longest first, in batches of at most batch_size rows and token_budget tokens, padding included
        (`token_budget_batches`); results come back in the order given."""
        ids = [self.candidate_token_id(prompts[0] if prompts else "(", c) for c in candidates]
        results: list[list[float]] = [[] for _ in prompts]
        if not prompts:
            return results, ids
        rows = shared_prefix_rows(self.tokenizer(list(prompts), add_special_tokens=True).input_ids)
        for chunk in token_budget_batches([row.length for row in rows], self.batch_size, self.token_budget):
            logprobs = self._packed_logits_fp32([rows[r] for r in chunk]).log_softmax(-1)[:, ids].tolist()
            reads = [i for r in chunk for i in rows[r].texts]
            for i, lp in zip(reads, logprobs):
                results[i] = lp
        return results, ids

    def _packed_logits_fp32(self, rows: list[PackedRow]) -> torch.Tensor:
        """The logits after each prompt of these packed rows (row by row, prompt by prompt), with the output projection
        in fp32 whatever the model's dtype.

        In bf16 two letters' logits are often exactly equal (a tie, read as "no preference"): bf16 keeps
        8 bits of mantissa, so logits near 20 are rounded to steps of 0.125. The decoder runs in the model's
        dtype; only the hidden states read and the output projection are lifted to fp32.
        """
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids, positions, mask, reads = packed_batch(rows, pad, next(self.model.parameters()).dtype)
        hidden = self.model.get_decoder()(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                          position_ids=positions.to(self.device)).last_hidden_state
        at = reads.to(self.device)
        head = self.model.get_output_embeddings()
        logits = hidden[at[:, 0], at[:, 1]].float() @ head.weight.float().T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias.float()
        return logits

    def candidate_token_id(self, prompt: str, candidate: str) -> int:
        """The token id the model would produce for `candidate` right after `prompt`.

        Tokenizing prompt+candidate and removing the prompt's tokens gives the id
        as it really follows the prompt (e.g. "A" after "("), which can differ from
        the id of the candidate tokenized alone (e.g. " A").
        """
        tail = prompt[-32:]
        base = self.tokenizer(tail, add_special_tokens=False).input_ids
        full = self.tokenizer(tail + candidate, add_special_tokens=False).input_ids
        if full[: len(base)] == base and len(full) == len(base) + 1:
            return full[-1]
        alone = self.tokenizer(candidate, add_special_tokens=False).input_ids
        return alone[0]


VOCAB_FIRST_ROWS = 128
"""Most positions projected vocabulary-first; more go through nn.Linear (benchmarks/vocab_projection.py: with gradients
the two ways are about even at 128 rows and nn.Linear is as fast or faster from 256 on)."""


VOCAB_BLOCK = 2048
"""Vocabulary rows projected at a time without gradients (a decode step): transposing all 49,152 rows' logits at once
took about as long as the projection on 2 cores (benchmarks/vocab_projection.py)."""


def vocabulary_rows_first(model) -> None:
    """On a CPU, compute a float32 model's output projection as (W @ h.T).T, the vocabulary as the matmul's rows,
    for up to VOCAB_FIRST_ROWS positions at a time (a decode step, a PPO micro-batch's response tokens).

    `nn.Linear` computes h @ W.T, and with 49,152 vocabulary rows and few positions the CPU kernel runs it slower
    (the default model's shape on 2 cores, benchmarks/vocab_projection.py: 61 -> 25 ms at 8 rows, 157 -> 123 ms at
    112; forward and backward 96 -> 61 and 258 -> 210 ms). The same logits up to float rounding (the runs compared
    sampled the same tokens): a speed-up only. The module keeps its weights and state dict; its forward is replaced
    on this instance when an engine is built on the model (PPO's updates then use it too)."""
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear and head.weight.device.type == "cpu" and head.weight.dtype == torch.float32:
        head.forward = types.MethodType(_rows_first_forward, head)


def _rows_first_forward(self: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    flat = hidden.reshape(-1, hidden.shape[-1])
    if len(flat) > VOCAB_FIRST_ROWS:
        return torch.nn.functional.linear(hidden, self.weight, self.bias)
    if torch.is_grad_enabled():
        logits = (self.weight @ flat.T).T.contiguous()
    else:  # a block of vocabulary rows at a time: each block's transpose is written while it is still in cache
        logits = torch.empty(len(flat), self.weight.shape[0], dtype=flat.dtype)
        for block in range(0, self.weight.shape[0], VOCAB_BLOCK):
            logits[:, block : block + VOCAB_BLOCK] = (self.weight[block : block + VOCAB_BLOCK] @ flat.T).T
    if self.bias is not None:
        logits = logits + self.bias
    return logits.reshape(*hidden.shape[:-1], -1)
