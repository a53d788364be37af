"""Typed command configs: each command's settings are one dataclass, the single source of its flags, defaults,
help text and checks. The command line (`rlcd CMD --help` shows every default), `--config` files and the Python
API (`rlcd.api`) are all built from it.

    @dataclass
    class ConsolidateConfig(Config):
        command: ClassVar[str] = "consolidate"
        in_dir: str | None = option(None, "directory written by rlcd simulate", flags=("--data", "--in-dir"), required=True)
        seed: int = option(DEFAULT_SEED, "seed of the pair order")

A field's flag is `--field-name` unless `flags` names others (the first is the one errors and the API use; the rest
are the original scripts' names, kept as aliases). `flags=()` makes a positional. The argparse type comes from the
annotation (int, float, str; bool is a bare flag) unless `type` gives a checking one (`positive_int`). A `required`
setting may come from the command line or a config file; a config missing one is refused when it is built, as is
any value `validate` refuses, so a config that exists is one a stage can run.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from rlcd.files import UserError

SCALARS = {"int": int, "float": float}


class BadValue(argparse.ArgumentTypeError, ValueError):
    """A flag value out of range: argparse prints its message, and --config (which catches ValueError) too."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise BadValue(f"expected a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise BadValue(f"expected 0 or a positive integer, got {text}")
    return value


def option(default: Any = None, help: str = "", *, flags: tuple[str, ...] | None = None, type=None, choices=None, group: str | None = None,
           metavar: str | None = None, required: bool = False, action=None, const=None, exclusive: str | None = None,
           extra: tuple[tuple[tuple[str, ...], dict], ...] = ()) -> Any:
    """A config field: its default and help text, and how the command line spells it. `exclusive` names a group of
    flags that may not be given together; `extra` adds more flags writing to this field (`(flags, argparse kwargs)`)."""
    metadata = {"help": help, "flags": flags, "type": type, "choices": choices, "group": group, "metavar": metavar, "required": required,
                "action": action, "const": const, "exclusive": exclusive, "extra": extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type_copy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def type_copy(value):
    return list(value) if isinstance(value, list) else dict(value)


def flag_names(f: dataclasses.Field) -> tuple[str, ...]:
    flags = f.metadata.get("flags")
    return ("--" + f.name.replace("_", "-"),) if flags is None else flags


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default


@dataclass
class Config:
    """Base of every command's config: checks the required settings and `validate` when built."""

    command: ClassVar[str] = ""

    def __post_init__(self):
        for f in fields(self):
            if f.metadata.get("required") and getattr(self, f.name) in (None, "", []):
                raise UserError(f"{(flag_names(f) or (f.metadata.get('metavar') or f.name.upper(),))[0]} is required")
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices is not None and value is not None and value not in choices:
                raise UserError(f"{(flag_names(f) or (f.name,))[0]}: {value!r} is not one of {list(choices)}")
        self.validate()

    def validate(self) -> None:
        """One-line `UserError`s for values a flag's type cannot check alone (ranges that involve two settings)."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """This config's flags on `parser`: defaults, help, aliases, choices, groups."""
        groups: dict[str, Any] = {}
        exclusive: dict[str, Any] = {}
        for f in fields(cls):
            m = f.metadata
            target = parser
            if m.get("group"):
                target = groups.setdefault(m["group"], parser.add_argument_group(m["group"]))
            if m.get("exclusive"):
                target = exclusive.setdefault(m["exclusive"], target.add_mutually_exclusive_group())
            flags = flag_names(f)
            kwargs: dict[str, Any] = {"help": m.get("help") or None}
            if flags:
                kwargs["dest"] = f.name
            if m.get("metavar"):
                kwargs["metavar"] = m["metavar"]
            elif len(flags) > 1 and flags[0].lstrip("-").replace("-", "_") != f.name:
                kwargs["metavar"] = flags[0].lstrip("-").replace("-", "_").upper()
            annotation = str(f.type).replace(" ", "")
            if m.get("action") is not None:
                kwargs["action"] = m["action"]
                if m.get("const") is not None:
                    kwargs["const"] = m["const"]
                kwargs.pop("metavar", None) if m["action"] in ("store_true", "store_false", "store_const") else None
            elif annotation == "bool" and m.get("type") is None:
                kwargs["action"] = "store_false" if default_of(f) else "store_true"
                kwargs.pop("metavar", None)
            else:
                convert = m.get("type") or SCALARS.get(annotation.split("|")[0])
                if convert is not None:
                    kwargs["type"] = convert
                if annotation.startswith("list["):
                    kwargs["nargs"] = "+"
                if m.get("choices") is not None:
                    kwargs["choices"] = list(m["choices"])
            kwargs["default"] = default_of(f)
            if not flags and default_of(f) is None:  # a positional that a config file may supply
                kwargs["nargs"] = "?"
            target.add_argument(*(flags or (f.name,)), **kwargs)
            for extra_flags, extra_kwargs in m.get("extra", ()):
                target.add_argument(*extra_flags, dest=f.name, **{"default": default_of(f), **extra_kwargs})

    @classmethod
    def from_namespace(cls, namespace: argparse.Namespace):
        """The config of a parsed command line."""
        return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if hasattr(namespace, f.name)})

    def changed(self) -> dict:
        """The settings that differ from the defaults, by field name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != default_of(f)}
