"""How an in-process completion ends and what it reports: the one rule of HFEngine and FastEngine.

After each sampled token, in this order:

1. an end-of-sequence token of the model (`eos_token_ids`, when `stop_at_eos`) ends the completion:
   finish_reason "eos", the text and token ids of the tokens before it, and `eos_token_id`, which EOS
   token was sampled (a model may have several); the EOS token itself is in neither;
2. otherwise the token joins the completion, and if the text now holds a stop string the completion
   ends: "stop", the text cut right after the first stop string, every token id sampled;
3. otherwise, at `max_new_tokens` tokens, it ends: "length", the whole text.

The text is `tokenizer.decode` of the token ids (special tokens kept). Decoding the text after every
token of every row costs more than a GPU decode step of a small model, so the stop strings are
looked for only after a token that can complete one (`stop_enders`).
"""

from __future__ import annotations

from rlcd.engines import Completion, SamplingParams


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every end-of-sequence id: the generation config's (one or several) and the tokenizer's."""
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def stop_enders(vocab_texts: list[str], stop: tuple[str, ...]) -> set[int]:
    """Ids of the tokens after which a stop string can newly appear in the decoded text.

    The newest token must hold a whole stop string or start with a non-empty suffix of one. A token's text
    alone can differ from its text in context, so these count too: a token whose text starts so once
    leading spaces are dropped (tokenizers that clean up " ." to "."), and a token with no text of its own
    or only part of a character (U+FFFD: a byte of a multi-byte character, complete only beside its
    neighbours). Extra tokens here cost a decode, never a different result.
    """
    suffixes = {s[k:] for s in stop for k in range(len(s))}

    def may_end(t: str) -> bool:
        return (not t or "\ufffd" in t or any(s in t for s in stop)
                or any(t.startswith(x) or t.lstrip(" ").startswith(x) for x in suffixes))

    return {i for i, t in enumerate(vocab_texts) if may_end(t)}


class Ending:
    """The rule above for one `generate` call: `add` each sampled token to its row's token list."""

    def __init__(self, tokenizer, params: SamplingParams, eos: set[int], enders: set[int]):
        self.tokenizer, self.params = tokenizer, params
        self.eos = eos if params.stop_at_eos else set()
        self.enders = enders if params.stop else set()

    def add(self, tokens: list[int], token: int) -> Completion | None:
        """Add a sampled token to a row's tokens; the row's Completion if that ends it, else None."""
        if token in self.eos:
            return self.completion(tokens, "eos", token)
        tokens.append(token)
        text = self.stopped_text(tokens) if token in self.enders else None
        if text is not None:
            return Completion(text, "stop", len(tokens), tuple(tokens))
        if len(tokens) >= self.params.max_new_tokens:
            return self.completion(tokens, "length")
        return None

    def completion(self, tokens: list[int], reason: str, eos_token_id: int | None = None) -> Completion:
        """The Completion of these tokens, decoded whole (an "eos" or "length" end, or no tokens at all)."""
        return Completion(self.tokenizer.decode(tokens), reason, len(tokens), tuple(tokens), eos_token_id)

    def stopped_text(self, tokens: list[int]) -> str | None:
        """The text cut right after the first stop string, or None when no stop string has appeared."""
        stop = self.params.stop
        if not stop:
            return None
        # only the tail can hold a new match: a stop string is at most len(s) tokens long
        tail = self.tokenizer.decode(tokens[-max(len(s) for s in stop) - 1 :])
        if not any(s in tail for s in stop):
            return None
        text = self.tokenizer.decode(tokens)
        cut = min((text.find(s) + len(s) for s in stop if s in text), default=None)
        return text[:cut] if cut is not None else None
