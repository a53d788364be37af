"""Texts that begin alike in one row: their common first tokens once, then each one's rest, which sees that start and
not the other rests (a 4-D attention mask; positions continue after the start in every rest).

A judge's two replies to one conversation, a preference pair's chosen and rejected sides: the conversation is most of
each text, so one packed row costs about a quarter fewer tokens than two rows. Decoder-only models in transformers take
a 4-D mask as given, so the model's own forward computes what it computes for each text alone (up to float rounding).
Used by `HFEngine.next_token_logprobs`, `reward_model.score_texts` and train-rm's batches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

MIN_SHARED_TOKENS = 16
"""Texts share a row only when they begin with at least this many equal tokens."""

MAX_SHARING = 8
"""Most texts in one row: its length (the shared start plus every rest) stays near a text's."""


@dataclass
class PackedRow:
    """Texts `texts` (indices) packed in one row: their common first tokens once, then each one's rest."""

    prefix: list[int]
    rests: list[list[int]]
    texts: list[int]

    @property
    def length(self) -> int:
        return len(self.prefix) + sum(map(len, self.rests))


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    return len(os.path.commonprefix([list(a), list(b)]))


def pack(tokens: Sequence[Sequence[int]], texts: list[int], shared: int) -> PackedRow:
    """One row of these texts, sharing their first `shared` tokens; every rest keeps at least its last token."""
    n = min([shared] + [len(tokens[i]) - 1 for i in texts])
    return PackedRow(list(tokens[texts[0]][:n]), [list(tokens[i][n:]) for i in texts], texts)


def pair_row(chosen: Sequence[int], rejected: Sequence[int]) -> PackedRow:
    """A preference pair in one row, sharing whatever start its sides have (the conversation)."""
    return pack([chosen, rejected], [0, 1], _common(chosen, rejected))


def shared_prefix_rows(tokens: Sequence[Sequence[int]]) -> list[PackedRow]:
    """Rows of texts given as token ids. In token order, a text joins the row before it when they begin with the
    same MIN_SHARED_TOKENS or more tokens, it shares everything that row's texts share, and it shares no more with
    the text after it (at most MAX_SHARING a row): a text that shares only a template's opening does not cut a
    pair of replies to one conversation down to that opening."""
    order = sorted(range(len(tokens)), key=lambda i: tokens[i])
    after = [_common(tokens[a], tokens[b]) for a, b in zip(order, order[1:])] + [0]  # shared with the next in order
    groups: list[tuple[list[int], int]] = []  # (texts, tokens they all share)
    for k, i in enumerate(order):
        if groups:
            group, shared = groups[-1]
            n = _common(tokens[group[0]], tokens[i])  # in token order: what the whole row would share
            if n >= max(shared, MIN_SHARED_TOKENS) and n >= after[k] and len(group) < MAX_SHARING:
                groups[-1] = (group + [i], n)
                continue
        groups.append(([i], 0))
    return [pack(tokens, group, shared) for group, shared in groups]


def packed_batch(rows: Sequence[PackedRow], pad_token_id: int, dtype):
    """(input_ids, position_ids, attention_mask, reads) of these rows, left padded to the longest: the mask 4-D and
    additive in `dtype` (0 where a query may look, the dtype's minimum elsewhere), reads (row, position) at each rest's
    last token, row by row and rest by rest. A query sees the shared start and its own rest, causally; a padding
    position sees only itself (no empty softmax)."""
    import torch

    width = max(row.length for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)  # -1 padding, 0 the shared start, k the k-th rest
    reads = []
    for b, row in enumerate(rows):
        at = width - row.length
        input_ids[b, at : at + len(row.prefix)] = torch.tensor(row.prefix, dtype=torch.long)
        positions[b, at : at + len(row.prefix)] = torch.arange(len(row.prefix))
        segment[b, at : at + len(row.prefix)] = 0
        at += len(row.prefix)
        for k, rest in enumerate(row.rests, 1):
            input_ids[b, at : at + len(rest)] = torch.tensor(rest, dtype=torch.long)
            positions[b, at : at + len(rest)] = torch.arange(len(row.prefix), len(row.prefix) + len(rest))
            segment[b, at : at + len(rest)] = k
            at += len(rest)
            reads.append((b, at - 1))
    cols = torch.arange(width)
    same = (segment[:, :, None] == segment[:, None, :]) | (segment[:, None, :] == 0)
    allowed = (cols[:, None] >= cols[None, :]) & same & (segment[:, :, None] >= 0)
    allowed |= torch.eye(width, dtype=torch.bool)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return input_ids, positions, mask[:, None], torch.tensor(reads, dtype=torch.long).reshape(-1, 2)
