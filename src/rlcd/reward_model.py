"""A reward model as every stage calls it: the input format, tokenizing and scoring, loading.

The reward model is a plain `AutoModelForSequenceClassification` with one output: a linear head on the
final hidden state of the last real token (docs/method.md §5). Every reward-model call (train-rm,
eval-rm, score, PPO, RLOO) formats its input with `format_rm_input` and scores it with `score_texts`, so
training and scoring always see the same text, the same truncation and the same token the score is read at.

Scores are read where the model's head meets each text's last token (the "\n\nHuman:" marker). Texts that begin
alike, a pair's two replies to one conversation, share a row (`packing`): the conversation once, each reply masked from
the other, positions continuing after the conversation in both, so each is scored as if alone, with about a fifth
fewer tokens. That needs the head's output at every position, which decoder-only classifiers have (`score_head`); others
score each text in its own row, padded on the right (transformers reads their score at the rightmost token that is not
padding). Over-long inputs are cut on the left, so the end marker, where the score is read, always survives.
"""

from __future__ import annotations

from rlcd import dialogue
from rlcd.engines import SCORING_TOKEN_BUDGET, no_cudnn_attention, token_budget_batches
from rlcd.files import UserError
from rlcd.packing import PackedRow, packed_batch, shared_prefix_rows


def format_rm_input(prompt: str, response: str) -> str:
    """Reward-model input: prompt + one space + response + end marker (docs/method.md §5).

    The response is stripped on both sides, not only on the right: a response decoded on its own
    often starts with the space of its first token, and the join must stay exactly one space
    whichever generator or tokenizer produced it.
    """
    return f"{prompt.rstrip()} {response.strip()}{dialogue.END_MARKER}"


def encode_texts(tokenizer, texts: list[str], max_length: int | None) -> tuple[list[list[int]], set[int]]:
    """Token ids of each text (special tokens included), cut on the left to max_length; also which were cut.

    Cutting on the left keeps the response and the end marker, where the score is read; the
    tokenizer keeps its special prefix (BOS) when it truncates.
    """
    if not texts:  # e.g. no held-out pairs; fast tokenizers fail on an empty batch
        return [], set()
    if max_length is None:
        max_length = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None
    ids = tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]  # verbose: no "too long" warning; we cut below
    long = [i for i, x in enumerate(ids) if max_length is not None and len(x) > max_length]
    if long:
        tokenizer.truncation_side = "left"
        cut = tokenizer([texts[i] for i in long], add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        for i, x in zip(long, cut):
            ids[i] = x
    return ids, set(long)


def pad_right(sequences: list[list[int]], pad_token_id: int):
    """(input_ids, attention_mask) tensors, padded on the right."""
    import torch

    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        input_ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[row, : len(s)] = 1
    return input_ids, attention_mask


def score_texts(model, tokenizer, texts: list[str], batch_size: int = 24, max_length: int | None = None, progress: bool = False,
                token_budget: int = SCORING_TOKEN_BUDGET) -> list[float]:
    """Reward of each text (already formatted with `format_rm_input`), in the order given.

    Texts that begin alike (a pair's two replies to one conversation) share a row (`packing.shared_prefix_rows`)
    where the model has a head at every position (`score_head`); rows go longest first, in batches of at most
    batch_size rows and token_budget tokens (padding included; `token_budget_batches`), then scores are put back
    in order. Identical texts are scored once, so they get identical rewards: an exact tie, whatever row they
    would have fallen in. max_length None means the tokenizer's model_max_length, which `train-rm` saves with the model.
    """
    import torch
    from tqdm import tqdm

    unique = list(dict.fromkeys(texts))
    if not unique:
        return []
    ids, _ = encode_texts(tokenizer, unique, max_length)
    device = next(model.parameters()).device
    packs = score_head(model) is not None
    rows = shared_prefix_rows(ids) if packs else [PackedRow([], [x], [i]) for i, x in enumerate(ids)]
    scores = [0.0] * len(unique)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), no_cudnn_attention():
            batches = token_budget_batches([row.length for row in rows], batch_size, token_budget)
            for chunk in tqdm(batches, desc="scoring", unit="batch", disable=not progress):
                batch = [rows[r] for r in chunk]
                if packs:
                    got = packed_scores(model, model, packed_inputs(batch, tokenizer.pad_token_id, model))
                else:
                    input_ids, attention_mask = pad_right([row.rests[0] for row in batch], tokenizer.pad_token_id)
                    got = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits[:, 0]
                for i, s in zip([i for row in batch for i in row.texts], got.float().tolist()):
                    scores[i] = s
    finally:
        model.train(was_training)
    by_text = dict(zip(unique, scores))
    return [by_text[t] for t in texts]


def score_head(model):
    """The linear head a decoder-only sequence classifier applies at every position before reading the last one
    (transformers names it `score` in every such model; a PeftModel passes the lookup through), or None: an encoder
    classifier reads one position, so its texts cannot share a row."""
    head = getattr(model, "score", None)
    return head if callable(head) else None


def packed_inputs(rows: list[PackedRow], pad_token_id: int, model) -> dict:
    """`packed_scores`'s inputs for these rows (`packing.packed_batch`), the mask in the model's dtype."""
    input_ids, positions, mask, reads = packed_batch(rows, pad_token_id, model.get_input_embeddings().weight.dtype)
    return {"input_ids": input_ids, "position_ids": positions, "attention_mask": mask, "reads": reads}


def packed_scores(model, inner, inputs: dict):
    """The score at each rest's last token of packed rows (row by row, rest by rest), as a 1-D tensor.

    `model` is called as it is (a DDP or FSDP wrapper stays in charge of its forward and backward); `inner` is the
    model it wraps, whose `score_head` output at every position is read through a forward hook."""
    device = next(inner.parameters()).device
    seen = []
    hook = score_head(inner).register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        model(**{k: inputs[k].to(device) for k in ("input_ids", "position_ids", "attention_mask")}, use_cache=False)
    finally:
        hook.remove()
    reads = inputs["reads"].to(device)
    return seen[-1][reads[:, 0], reads[:, 1], 0]


def load_reward_model(path: str, device: str | None = None, dtype: str = "auto", flag: str = "--reward-model"):
    """(model, tokenizer) of a reward model written by `train-rm` (or any one-output sequence classifier)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rlcd.models import default_device, load_tokenizer, resolve_dtype, resolve_model

    resolved = resolve_model(path)
    device = device or default_device()
    try:
        config = AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {path}: cannot load ({str(e).splitlines()[0]})") from None
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or getattr(config, "num_labels", None) != 1:
        # a causal LM would load with a fresh random head and give meaningless scores
        raise UserError(f"{flag} {path}: not a reward model (architectures {architectures}); train one with rlcd train-rm")
    try:
        tokenizer = load_tokenizer(resolved)
        model = AutoModelForSequenceClassification.from_pretrained(resolved, dtype=resolve_dtype(dtype, device))
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot load ({str(e).splitlines()[0]})") from None
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer
