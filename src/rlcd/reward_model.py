"""A reward model as every stage calls it: the input format, tokenizing and scoring, loading.

The reward model is a plain `AutoModelForSequenceClassification` with one output: a linear head on the
final hidden state of the last real token (docs/method.md §5). Every reward-model call (train-rm,
eval-rm, score, PPO, RLOO) formats its input with `format_rm_input` and scores it with `score_texts`, so
training and scoring always see the same text, the same truncation and the same token the score is read at.

Padding is on the right. Transformers' sequence-classification models read the score at the rightmost
token that is not the pad token, which with right padding is the last real token (our inputs end with
the "\\n\\nHuman:" marker, never with a pad token), and right padding keeps the real tokens at positions
0..n-1 for models with absolute position embeddings too. Over-long inputs are cut on the left, so the
end marker, where the score is read, always survives.
"""

from __future__ import annotations

from rlcd import dialogue
from rlcd.engines import SCORING_TOKEN_BUDGET, no_cudnn_attention, token_budget_batches
from rlcd.files import UserError


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

    Texts are scored longest first, in batches of at most batch_size rows and token_budget tokens
    (padding included; `token_budget_batches`), then put back in order. Identical texts are scored
    once, so they get identical rewards: an exact tie, whatever batch they would have fallen in.
    max_length None means the tokenizer's model_max_length, which `train-rm` saves with the model.
    """
    import torch
    from tqdm import tqdm

    unique = list(dict.fromkeys(texts))
    if not unique:
        return []
    ids, _ = encode_texts(tokenizer, unique, max_length)
    device = next(model.parameters()).device
    scores = [0.0] * len(unique)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), no_cudnn_attention():
            batches = token_budget_batches([len(x) for x in ids], batch_size, token_budget)
            for chunk in tqdm(batches, desc="scoring", unit="batch", disable=not progress):
                input_ids, attention_mask = pad_right([ids[i] for i in chunk], tokenizer.pad_token_id)
                logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
                for i, s in zip(chunk, logits[:, 0].float().tolist()):
                    scores[i] = s
    finally:
        model.train(was_training)
    by_text = dict(zip(unique, scores))
    return [by_text[t] for t in texts]


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
