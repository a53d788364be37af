"""What the evaluation commands share (docs/method.md §8): the dev/test split of the hh-rlhf test file,
outputs files (`read_outputs`) and their cleanup (`postprocess`), human-labelled pairs (`read_hh_pairs`),
bootstrap intervals and a pairwise judge's position bias.

Used by format-prompts, generate and postprocess, eval-rm and score, compare and judge-agreement,
refusals and report.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

from rlcd import dialogue
from rlcd.files import UserError, is_text, iter_lines, load_json
from rlcd.reward_model import format_rm_input

SPLITS = {"dev": range(0, 1000), "test": range(1000, 2000)}
"""Rows of an hh-rlhf test file: dev = 0-999, test = 1000-1999 (docs/method.md §2)."""
POSITION_BIAS_LIMIT = 0.9  # a judge picking one position this often or more says nothing about the replies

_SPEAKER = r"(?:human|assistant|user)(?:\s*\([^)\n]*\))?\s*:"
_LEADING_TAG = re.compile(r"^\s*" + _SPEAKER, re.IGNORECASE)
_NEXT_TAG = re.compile(r"(?<![A-Za-z0-9_])" + _SPEAKER, re.IGNORECASE)


def postprocess(text: str) -> str:
    """An output as evaluated (docs/method.md §8): cut at the first "\\n\\nHuman:", drop a leading speaker tag
    (Human/Assistant/User, any case, with its colon), cut at the next speaker tag, strip whitespace.

    Idempotent: what it returns holds no speaker tag.
    """
    text = text.split(dialogue.HUMAN, 1)[0]
    text = _LEADING_TAG.sub("", text, count=1)
    match = _NEXT_TAG.search(text)
    if match:
        text = text[: match.start()]
    return text.strip()


def split_dialogue(text: str) -> tuple[str, str] | None:
    """(prompt as in docs/method.md §2, final response), or None if the dialogue has no usable Assistant turn."""
    try:
        prompt = dialogue.prompt_from_dialogue(text)
    except ValueError:
        return None
    return prompt, text[text.rfind("Assistant:") + len("Assistant:") :]


def read_hh_pairs(path: str | Path, num_pairs: int | None) -> tuple[list[tuple[str, str]], Counter, list[str]]:
    """The first num_pairs usable pairs as formatted (chosen, rejected) RM inputs, with the skipped
    lines counted by reason and described as `file:line: reason`.

    hh-rlhf JSONL (`chosen` and `rejected` whole dialogues, each cut at its own last "Assistant:"), or any
    preference table `preferences.read_table` reads (CSV, JSONL, Parquet; TRL's standard and
    conversational rows, the original release's), oriented by its preference. In JSONL a line that is not
    a JSON object is skipped; in a table, rows it cannot use are skipped, bad columns are an error.
    """
    from rlcd.preferences import Unusable, is_jsonl, iter_table, pair_of

    pairs, skipped, problems = [], Counter(), []

    def skip(where: str, reason: str) -> None:
        skipped[reason] += 1
        problems.append(f"{where}: {reason}")

    def jsonl_records():
        for lineno, line in iter_lines(path):
            if num_pairs is not None and len(pairs) >= num_pairs:
                return  # lines after the last pair taken are neither read nor counted
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                skip(f"{path}:{lineno}", "not JSON")
                continue
            if not isinstance(rec, dict):
                skip(f"{path}:{lineno}", "not a JSON object")
                continue
            yield f"{path}:{lineno}", rec

    for where, rec in jsonl_records() if is_jsonl(path) else iter_table(Path(path)):
        if num_pairs is not None and len(pairs) >= num_pairs:
            break
        hh_row = not ({"prompt", "instruction", "output_1"} & rec.keys()) and not any(isinstance(rec.get(f), list) for f in ("chosen", "rejected"))
        if hh_row:  # read as they always were: each dialogue cut at its own last "Assistant:"
            texts = []
            for field in ("chosen", "rejected"):
                value = rec.get(field)
                if not isinstance(value, str):
                    skip(where, f"field '{field}' missing or not text")
                    break
                if not is_text(value):
                    skip(where, f"field '{field}' is not valid Unicode")
                    break
                parts = split_dialogue(value)
                if parts is None:
                    skip(where, f"field '{field}' has no Assistant turn")
                    break
                texts.append(format_rm_input(*parts))
            else:
                pairs.append((texts[0], texts[1]))
            continue
        try:
            row = pair_of(rec)
        except Unusable as e:
            skip(where, str(e))
            continue
        chosen, rejected = (row["output_1"], row["output_2"]) if row["preference"] == 1 else (row["output_2"], row["output_1"])
        pairs.append((format_rm_input(row["prompt"], chosen), format_rm_input(row["prompt"], rejected)))
    return pairs, skipped, problems


def read_outputs(path: str | Path) -> list[dict]:
    """An outputs file: a JSON list of objects with text fields `instruction` and `output`."""
    items = load_json(path)
    if not isinstance(items, list) or not items:
        raise UserError(f"{path}: expected a non-empty JSON list of {{instruction, output}} objects")
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            raise UserError(f"{path}: item {n}: expected an object with 'instruction' and 'output'")
        for field in ("instruction", "output"):
            if not isinstance(item.get(field), str):
                raise UserError(f"{path}: item {n}: field '{field}' missing or not text")
            if not is_text(item[field]):
                raise UserError(f"{path}: item {n}: field '{field}' is not valid Unicode (a lone surrogate such as \\ud800)")
    return items


def bootstrap_ci(values: list[float], seed: int, resamples: int = 1000) -> list[float]:
    """95% percentile-bootstrap interval of the mean, resampling prompts."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    means = x[np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return [float(lo), float(hi)]


def position_bias(first_position_rate: float | None) -> str | None:
    """Why a pairwise judge is uninformative, when it picks one position at least POSITION_BIAS_LIMIT of the time."""
    if first_position_rate is None or max(first_position_rate, 1 - first_position_rate) < POSITION_BIAS_LIMIT:
        return None
    which = "first" if first_position_rate >= 0.5 else "second"
    return f"picked the {which} option {_percent(max(first_position_rate, 1 - first_position_rate))} of the time"


def _percent(x: float) -> str:
    """0.996 -> '99.6%', 1.0 -> '100%': never rounds a near-total bias up to 100%."""
    return f"{math.floor(1000 * x + 1e-9) / 10:g}%"
