"""Tasks as data: contrast descriptor pairs and judging principles, aligned index by index.

A task file is YAML:

    name: harmless
    descriptors:                   # one or more pairs
      - positive: "(harmless, helpful response)"
        negative: "(harmful, unhelpful response)"
    principles:                    # one per descriptor pair (pair i <-> principle i)
      - "Which of these responses is more harmless and more helpful?"

`--task harmless` / `--task helpful` load the shipped files; `--task path.yaml` a user's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from rlcd.files import UserError, is_text

BUILTIN = {p.stem: p for p in Path(__file__).parent.glob("*.yaml")}


@dataclass(frozen=True)
class Task:
    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    principles: tuple[str, ...]


def load_task(name_or_path: str) -> Task:
    path = BUILTIN.get(name_or_path) or Path(name_or_path)
    if not path.is_file():
        raise UserError(f"--task {name_or_path}: not a built-in task ({', '.join(sorted(BUILTIN))}) nor a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read as UTF-8 text ({e.strerror if isinstance(e, OSError) else e.reason})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = " ".join(str(getattr(e, "problem", None) or e).split())  # one line, whatever the YAML error
        raise UserError(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with keys name, descriptors, principles")
    unknown = set(data) - {"name", "descriptors", "principles"}
    if unknown:
        raise UserError(f"{path}: unknown key(s) {sorted(map(str, unknown))}; expected name, descriptors, principles")
    descriptors, principles = data.get("descriptors"), data.get("principles")
    if not isinstance(descriptors, list) or not descriptors:
        raise UserError(f"{path}: 'descriptors' must be a non-empty list of {{positive, negative}} pairs")
    positive, negative = [], []
    for i, pair in enumerate(descriptors):
        where = f"{path}: descriptors[{i}]"
        if not isinstance(pair, dict) or set(pair) != {"positive", "negative"}:
            raise UserError(f"{where}: expected exactly the keys positive and negative")
        for side in ("positive", "negative"):
            text = pair[side]
            if not is_text(text) or not (text.startswith("(") and text.endswith(")") and len(text) > 2):
                raise UserError(f"{where}.{side}: must be a parenthetical such as \"(harmless response)\", got {text!r}")
            if ":" in text or "\n" in text:
                raise UserError(f"{where}.{side}: must not contain ':' or a newline (it goes inside the 'Assistant ...:' marker)")
        if pair["positive"] == pair["negative"]:
            raise UserError(f"{where}: positive and negative are the same")
        positive.append(pair["positive"])
        negative.append(pair["negative"])
    if not isinstance(principles, list) or len(principles) != len(positive):
        raise UserError(f"{path}: 'principles' must be a list with one principle per descriptor pair ({len(positive)})")
    for i, p in enumerate(principles):
        if not is_text(p) or not p.strip():
            raise UserError(f"{path}: principles[{i}]: must be non-empty text")
    name = data.get("name", path.stem)
    if not is_text(name) or not name:
        raise UserError(f"{path}: 'name' must be text")
    return Task(name, tuple(positive), tuple(negative), tuple(p.strip() for p in principles))
