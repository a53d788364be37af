"""hh-rlhf dialogues: reading prompts, building contrastive and judging prompts, filtering samples.

A dialogue prefix (the "prompt") looks like
    "Human: ...\n\nAssistant: ...\n\nHuman: ...\n\nAssistant:"
and always ends with the Assistant marker that the model continues.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rlcd.files import UserError, is_text, iter_lines, load_json

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
END_MARKER = "\n\nHuman:"  # the end-of-response marker appended for reward models
BANNED = ("\\", "`")  # the original banned backslash and backtick strings
STOP = ("\nHuman",)
_TURN = re.compile(r"\n\n(Human|Assistant):")
_NEW_HUMAN_TURN = re.compile(r"(?:^|\n)Human\b")
_STRAY_ASSISTANT = re.compile(r"Assistant(?: \([^)\n]*\))?:")


def prompt_from_dialogue(dialogue: str) -> str:
    """The prefix of a full dialogue up to and including its last Assistant marker, stripped."""
    cut = dialogue.rfind("Assistant:")
    if cut < 0:
        raise ValueError("no 'Assistant:' turn")
    prompt = dialogue[: cut + len("Assistant:")].strip()
    if not prompt.startswith("Human:"):
        raise ValueError("does not start with a 'Human:' turn")
    return prompt


def wrap_question(question: str) -> str:
    """A first-turn question as a one-turn dialogue prefix."""
    return f"Human: {question.strip()}{ASSISTANT}"


def first_human_turn(prompt: str) -> str:
    body = prompt[len("Human:") :] if prompt.startswith("Human:") else prompt
    return " ".join(_TURN.split(body)[0].split())


@dataclass
class Prompts:
    """Prompts with their positions in the file (`index`), and what was skipped and why."""

    items: list[tuple[int, str]]
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # "file:line: reason" for the first few skips

    def skip(self, where: str, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {reason}")


def load_prompts(path: str | Path, dedupe: bool = False, exclude: str | Path | None = None) -> Prompts:
    """Read prompts from hh-rlhf JSONL(.gz) (`chosen` dialogues) or a plain list of first-turn questions.

    Plain lists are a JSON list of strings (.json or .json.gz) or JSONL whose lines are
    strings or objects with a `prompt`/`instruction`/`question` field. Every item keeps its
    position in the file as its index. Malformed items, duplicates (with `dedupe`) and
    prompts whose first Human turn also starts a dialogue in `exclude` are skipped and counted.
    """
    path = Path(path)
    result = Prompts([])
    excluded = {first_human_turn(p) for _, p in load_prompts(exclude).items} if exclude else set()
    seen: set[str] = set()
    for index, where, value in _raw_items(path):
        try:
            prompt = _to_prompt(value)
            if not is_text(prompt):
                raise ValueError("not valid Unicode (a lone surrogate such as \\ud800)")
        except ValueError as e:
            result.skip(where, str(e))
            continue
        if excluded and first_human_turn(prompt) in excluded:
            result.skip(where, "excluded (also in the exclude file)")
            continue
        if dedupe:
            if prompt in seen:
                result.skip(where, "duplicate")
                continue
            seen.add(prompt)
        result.items.append((index, prompt))
    return result


def _raw_items(path: Path):
    name = path.name.removesuffix(".gz")
    if name.endswith(".json"):
        data = load_json(path)
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of prompts")
        for i, value in enumerate(data):
            yield i, f"{path}: item {i}", value
        return
    for i, (lineno, line) in enumerate(iter_lines(path)):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            value = ValueError(f"not JSON ({e.msg})")
        yield i, f"{path}:{lineno}", value


def _to_prompt(value) -> str:
    if isinstance(value, Exception):
        raise value
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("empty prompt")
        return wrap_question(value)
    if not isinstance(value, dict):
        raise ValueError(f"expected an object or a string, got {type(value).__name__}")
    if "chosen" in value:
        if not isinstance(value["chosen"], str):
            raise ValueError("field 'chosen' is not text")
        return prompt_from_dialogue(value["chosen"])
    for key in ("prompt", "instruction", "question"):
        if key in value:
            text = value[key]
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"field '{key}' is not non-empty text")
            return prompt_from_dialogue(text) if text.lstrip().startswith("Human:") and "Assistant:" in text else wrap_question(text)
    raise ValueError("no 'chosen', 'prompt', 'instruction' or 'question' field")


def contrast_prompts(prompt: str, positive: str, negative: str) -> tuple[str, str]:
    """(p+, p-): the final Assistant marker carries one descriptor and every earlier marker the opposite one."""

    # the final marker is usually "\n\nAssistant:", but a few hh-rlhf dialogues have other whitespace before it
    head = prompt[: -len("Assistant:")]

    def build(last: str, earlier: str) -> str:
        return head.replace(ASSISTANT, f"\n\nAssistant {earlier}:") + f"Assistant {last}:"

    return build(positive, negative), build(negative, positive)


def parse_turns(prompt: str) -> list[tuple[str, str]]:
    """[(role, text)] of a prompt; the trailing empty Assistant turn is dropped."""
    parts = _TURN.split("\n\n" + prompt)
    turns = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]
    return turns[:-1] if turns and turns[-1] == ("Assistant", "") else turns


def chat_messages(prompt: str, descriptor: str | None) -> list[dict]:
    """The prompt as chat messages; a descriptor becomes a system message describing the next reply."""
    roles = {"Human": "user", "Assistant": "assistant"}
    messages = [{"role": roles[r], "content": t} for r, t in parse_turns(prompt)]
    if descriptor:
        style = descriptor.strip("()")
        messages.insert(0, {"role": "system", "content": f"Write the assistant's next reply. The reply is: {style}."})
    return messages


def dialogue_text(messages: list[dict]) -> str:
    """The hh-rlhf text of user and assistant messages, "Human: ...\n\nAssistant: ..." (the inverse of
    `chat_messages` without a descriptor)."""
    roles = {"user": "Human", "assistant": "Assistant"}
    return "\n\n".join(f"{roles[m['role']]}: {m['content'].strip()}" for m in messages)


def filter_completion(text: str, finish_reason: str, accept_eos: bool = False) -> tuple[str | None, str]:
    """Apply the acceptance filter to a sampled continuation; returns (response or None, reason).

    The continuation must reach the start of a new Human turn (a line starting with
    "Human"), and is cut at the last newline before it. With `accept_eos`, the model's
    end-of-sequence token also ends the turn. A stray Assistant tag keeps only what
    follows it. Empty responses, and responses holding a banned string (possible with
    engines that cannot ban tokens), are rejected.
    """
    match = _NEW_HUMAN_TURN.search(text)
    if match:
        body = text[: match.start() + (1 if text[match.start()] == "\n" else 0)]
        body = body[: body.rfind("\n")] if "\n" in body else ""
    elif finish_reason == "eos" and accept_eos:
        body = text
    else:
        return None, {"length": "no Human turn within max_new_tokens", "eos": "ended without a Human turn"}.get(finish_reason, "no Human turn")
    stray = _STRAY_ASSISTANT.search(body)
    if stray:
        body = body[stray.end() :]
    body = body.strip()
    if not body:
        return None, "empty"
    if any(b in body for b in BANNED):
        return None, "banned string"
    return body, "ok"


def judge_prompt(prompt: str, principle: str, response_a: str, response_b: str) -> str:
    """The post-hoc A/B judging prompt; its next token is the answer letter."""
    gap = "\n\n\n\n"
    return (
        "Consider this conversation between a human and an assistant:"
        + gap + prompt.strip()
        + gap + principle.strip()
        + gap + "Options:"
        + gap + "(A) " + response_a.strip()
        + gap + "(B) " + response_b.strip()
        + gap + "The answer is: ("
    )


def end_of_response(text: str, ended_with_eos: bool, accept_eos: bool) -> str | None:
    """The response cut at the end marker (marker excluded), or None when it must get the -1 penalty."""
    cut = text.find(END_MARKER)
    if cut < 0:
        if not (accept_eos and ended_with_eos):
            return None
        cut = len(text)
    return text[:cut] if text[:cut].strip() else None
