"""The Python API: every `rlcd` command as a function of its typed config (rlcd.options) or of its flags.

    from rlcd.api import GenerateConfig, format_prompts, generate

    prompts = format_prompts(data_path="test.jsonl.gz", split="test", out_file="prompts.json")
    generate(GenerateConfig(model="smollm2", prompts=str(prompts), out_file="base.json", max_new_tokens=64))

Each command's config class is here by its command's name (`rlcd train-rm`: `TrainRmConfig`; see `config_class`);
its fields are the command's settings, with their defaults and help text. A function takes a config, keywords, or
both (keywords override the config's fields).

A keyword is a flag's name with underscores (`--batch-size` is `batch_size`, a positional such as
report's RUN_DIR is `run_dir`), any of its names (`prompts_file` or `data_path` for format-prompts'
`--prompts-file` / `--data-path`); True gives a bare flag and False or None leaves it out. Values are
checked exactly as on the command line, defaults are the command's, and `config="run.yaml"` reads
a config file as `--config` does. A mistake raises `UserError` (rlcd.files) with the one line the command
line would print; nothing calls `sys.exit`. Each function returns the path the command wrote (the
line it prints last), or None for a command that prints no path.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import sys
from pathlib import Path

from rlcd.files import UserError

COMMANDS = ("simulate", "consolidate", "train-rm", "eval-rm", "score", "format-prompts", "generate", "postprocess", "sft", "dpo",
            "rloo", "ppo", "report", "compare", "refusals", "judge-agreement", "pipeline", "demo")


def command_line(command: str, options: dict) -> list[str]:
    """The argv `rlcd COMMAND` would be given for these keyword options."""
    from rlcd.cli import build_parser

    sub = next(a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    names = {}  # keyword -> (action, the flag it stands for)
    for a in sub._actions:
        if a.dest in ("help", "_module", "_parser"):
            continue
        # by dest: the flag of that name, else the longest (data_path: --data-path; policy: --policy)
        names.setdefault(a.dest, (a, max(a.option_strings, key=lambda s: (s.lstrip("-").replace("-", "_") == a.dest, len(s)), default=None)))
    for a in sub._actions:  # by any other name of a flag: that flag (prompts_file: --prompts-file)
        names.update({s.lstrip("-").replace("-", "_"): (a, s) for s in a.option_strings if s.startswith("--")
                      and s.lstrip("-").replace("-", "_") not in names})
    argv, positional = [command], []
    for key, value in options.items():
        action, flag = names.get(key.replace("-", "_"), (None, None))
        if action is None or action.dest in ("help", "_module", "_parser"):
            raise UserError(f"rlcd.{command.replace('-', '_')}: unknown option '{key}' (see rlcd {command} --help)")
        if not action.option_strings:
            positional.append(str(value))
            continue
        if action.nargs == 0:  # a bare flag: by its own name, True gives it; by the setting's name, a non-default value
            if (value != action.default) if key.replace("-", "_") == action.dest else value:
                argv.append(flag)
        elif value is not None and value is not False:
            argv += [flag, *map(str, value)] if isinstance(value, (list, tuple)) else [flag, str(value)]
    return [*argv, *positional]


class _LastLine(io.TextIOBase):
    """Passes everything through to the real stdout and remembers the last line printed."""

    def __init__(self, out):
        self.out, self.last, self.pending = out, "", ""

    def write(self, text: str) -> int:
        self.out.write(text)
        lines = (self.pending + text).split("\n")
        self.pending = lines[-1]
        self.last = next((line for line in reversed(lines[:-1]) if line.strip()), self.last)
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def run_command(command: str, config=None, /, **options) -> Path | None:
    """Run `rlcd COMMAND` in this process with this config and/or these options; the path it wrote, or None."""
    from rlcd.cli import STAGES, config_class, parse

    if config is not None:
        if not isinstance(config, config_class(command)):
            raise UserError(f"rlcd.{command.replace('-', '_')}: expected a {config_class(command).__name__}, got {type(config).__name__}")
        options = {**config.changed(), **options}
    argv = command_line(command, options)
    config = parse(argv)  # checked exactly as on the command line
    tee, saved_argv = _LastLine(sys.stdout), sys.argv
    sys.argv = ["rlcd", *argv]  # manifests and model cards record the command this call stands for
    try:
        with contextlib.redirect_stdout(tee):
            importlib.import_module(STAGES[command][0]).run(config)
    finally:
        sys.argv = saved_argv
    last = (tee.pending or tee.last).strip()
    return Path(last) if last and Path(last).exists() else None


def _function(command: str):
    def run(config=None, /, **options) -> Path | None:  # positional: `config=` stays the --config file's keyword
        return run_command(command, config, **options)

    run.__name__ = run.__qualname__ = command.replace("-", "_")
    run.__doc__ = (f"`rlcd {command}` with this config (rlcd.api.{config_name(command)}) and/or these flags as keywords "
                   f"(see `rlcd {command} --help`); returns the path it wrote.")
    return run


def config_name(command: str) -> str:
    """`train-rm` -> `TrainRmConfig`: the name this module gives a command's config class."""
    return "".join(part.capitalize() for part in command.split("-")) + "Config"


FUNCTIONS = {command.replace("-", "_"): _function(command) for command in COMMANDS}
CONFIG_NAMES = {config_name(command): command for command in COMMANDS}
globals().update(FUNCTIONS)  # from rlcd.api import simulate, train_rm, ...


def __getattr__(name: str):
    """A command's config class, importing only its stage module: `from rlcd.api import TrainRmConfig`."""
    if name in CONFIG_NAMES:
        from rlcd.cli import config_class

        return config_class(CONFIG_NAMES[name])
    raise AttributeError(f"module 'rlcd.api' has no attribute '{name}'")
