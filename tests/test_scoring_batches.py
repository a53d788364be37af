"""Scoring batches by a token budget (`token_budget_batches`): the batches themselves, and reward scores and
next-token log-probs equal to one-row-at-a-time forwards on a tiny random Llama (CPU, seconds)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import BatchEncoding, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from rlcd.engines import token_budget_batches
from rlcd.engines.hf import HFEngine
from rlcd.reward import score_texts

PAD = 0


class IdTokenizer:
    """Texts are space-separated token ids; left padding with return_tensors="pt", as HFEngine._encode asks."""

    pad_token_id, model_max_length = PAD, 1024

    def __call__(self, texts, return_tensors=None, add_special_tokens=True, **kwargs):
        if isinstance(texts, str):
            return BatchEncoding({"input_ids": [int(t) for t in texts.split()]})
        ids = [[int(t) for t in text.split()] for text in texts]
        if return_tensors != "pt":
            return BatchEncoding({"input_ids": ids})
        width = max(map(len, ids))
        return BatchEncoding({"input_ids": [[PAD] * (width - len(x)) + x for x in ids],
                              "attention_mask": [[0] * (width - len(x)) + [1] * len(x) for x in ids]}, tensor_type="pt")


def config(**kw):
    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, pad_token_id=PAD, **kw)


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = [" ".join(str(rng.randrange(3, 512)) for _ in range(rng.randint(1, 40))) for _ in range(n)]
    # fewer tokens but more characters than the next: sorting by characters would put it first
    return texts + ["500 500 500 500", "3 3 3 3 3 3"]


def forward_shapes(model):
    """(rows, width) of every forward the model runs, as a list filled while the hook is on."""
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    return shapes, hook


def check_batches(shapes, max_rows, budget):
    assert all(rows <= max_rows and (rows * width <= budget or rows == 1) for rows, width in shapes)
    assert [w for _, w in shapes] == sorted((w for _, w in shapes), reverse=True)  # longest first, in tokens


def test_batches_respect_the_budget_and_the_row_cap():
    assert token_budget_batches([5, 30, 10, 10, 2], max_rows=2, max_tokens=40) == [[1], [2, 3], [0, 4]]
    assert token_budget_batches([100, 3, 3], max_rows=8, max_tokens=50) == [[0], [1, 2]]  # over budget: a batch of its own
    assert token_budget_batches([], max_rows=4) == []
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 60))]
        max_rows, budget = rng.randint(1, 16), rng.randint(1, 2000)
        batches = token_budget_batches(lengths, max_rows, budget)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
        assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
        for b, after in zip(batches, batches[1:] + [None]):
            longest = lengths[b[0]]
            assert len(b) <= max_rows and (len(b) * longest <= budget or len(b) == 1)
            if after:  # a batch closes only when the next row would break a limit
                assert len(b) == max_rows or (len(b) + 1) * longest > budget


def test_score_texts_equal_one_row_forwards_and_score_duplicates_once():
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config(num_labels=1)).eval()
    texts = random_texts(15, seed=1)
    texts += texts[:3]
    shapes, hook = forward_shapes(model)
    try:
        scores = score_texts(model, IdTokenizer(), texts, batch_size=4, token_budget=60)
    finally:
        hook.remove()
    check_batches(shapes, max_rows=4, budget=60)
    assert sum(rows for rows, _ in shapes) == len(set(texts)) and len(shapes) > 4
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([[int(t) for t in text.split()]])).logits[0, 0].item() for text in texts]
    assert scores == pytest.approx(alone, abs=1e-5)
    assert scores[:3] == scores[-3:]


def test_next_token_logprobs_equal_one_row_forwards():
    torch.manual_seed(0)
    model = LlamaForCausalLM(config()).eval()
    engine = HFEngine(model, IdTokenizer(), batch_size=4, token_budget=60)
    prompts = random_texts(15, seed=2)
    shapes, hook = forward_shapes(model.get_decoder())  # the decoder runs; the output projection is done in fp32 after it
    try:
        logprobs, ids = engine.next_token_logprobs(prompts, ["7", "9"])
    finally:
        hook.remove()
    assert ids == [7, 9]
    check_batches(shapes, max_rows=4, budget=60)
    assert sum(rows for rows, _ in shapes) == len(prompts) and len(shapes) > 4
    with torch.no_grad():
        for prompt, lp in zip(prompts, logprobs):
            ref = model(input_ids=torch.tensor([[int(t) for t in prompt.split()]])).logits[0, -1].log_softmax(-1)
            assert lp == pytest.approx(ref[ids].tolist(), abs=1e-4)
    assert engine.next_token_logprobs([], []) == ([], [])


def test_prompts_that_begin_alike_share_a_row_and_get_the_log_probs_of_their_own_forwards():
    """A judge's prompts come in pairs (one conversation, two replies): each pair is one row, the shared start once,
    each rest seeing it and not the other rest; the log-probs are those of one-prompt forwards."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(config()).eval()
    engine = HFEngine(model, IdTokenizer(), batch_size=4, token_budget=300)
    rng = random.Random(5)
    prompts = []
    for _ in range(6):
        start = [str(rng.randrange(3, 512)) for _ in range(rng.randint(16, 40))]
        for _ in range(2):
            prompts.append(" ".join(start + [str(rng.randrange(3, 512)) for _ in range(rng.randint(1, 12))]))
    prompts += [prompts[0], " ".join(prompts[2].split()[:16])]  # a repeat, and a prompt that is another's start
    prompts += random_texts(3, seed=6)  # nothing shared: rows of their own
    rng.shuffle(prompts)
    shapes, hook = forward_shapes(model.get_decoder())
    try:
        logprobs, ids = engine.next_token_logprobs(prompts, ["7", "9"])
    finally:
        hook.remove()
    check_batches(shapes, max_rows=4, budget=300)
    assert sum(rows for rows, _ in shapes) <= len(prompts) - 6  # each conversation's replies (or the repeat) packed
    with torch.no_grad():
        for prompt, lp in zip(prompts, logprobs):
            ref = model(input_ids=torch.tensor([[int(t) for t in prompt.split()]])).logits[0, -1].log_softmax(-1)
            assert lp == pytest.approx(ref[ids].tolist(), abs=1e-4)


def test_shared_prefix_rows_group_neighbours_with_a_long_common_start():
    from rlcd.packing import MAX_SHARING, MIN_SHARED_TOKENS, shared_prefix_rows

    start = list(range(100, 100 + MIN_SHARED_TOKENS))
    assert len(shared_prefix_rows([start[:-1] + [9], start + [1]])) == 2  # one token too few in common
    [row] = shared_prefix_rows([start + [1], start])  # the start itself: the row shares one token less, so a rest is left
    assert row.prefix == start[:-1] and row.rests == [start[-1:], start[-1:] + [1]] and row.texts == [1, 0] and row.length == 18
    [row] = shared_prefix_rows([start + [1], start + [1]])  # a repeat
    assert row.prefix == start and row.rests == [[1], [1]]
    many = shared_prefix_rows([start + [k] for k in range(MAX_SHARING + 1)])
    assert [len(r.texts) for r in many] == [MAX_SHARING, 1]
    # a prompt that shares only the opening neither joins nor takes a pair that shares more
    pair = [start + list(range(300, 320)) + [k] for k in (1, 2)]
    for alone in (start + [7], start + [400]):  # before the pair in token order, and after it
        rows = shared_prefix_rows([alone, *pair])
        assert sorted(sorted(r.texts) for r in rows) == [[0], [1, 2]]
        assert next(r for r in rows if len(r.texts) == 2).prefix == pair[0][:-1]
