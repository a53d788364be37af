"""The Python API: every `rlcd` command as a function of its flags.

    from rlcd.api import format_prompts, generate

    prompts = format_prompts(data_path="test.jsonl.gz", split="test", out_file="prompts.json")
    generate(model="smollm2", prompts=prompts, out_file="base.json", max_new_tokens=64)

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
        names[a.dest] = (a, max(a.option_strings, key=lambda s: (s.lstrip("-").replace("-", "_") == a.dest, len(s)), default=None))
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
        if action.nargs == 0:  # a bare flag
            if value:
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


def run_command(command: str, **options) -> Path | None:
    """Run `rlcd COMMAND` in this process with these options; the path it wrote, or None."""
    from rlcd.cli import parse

    argv = command_line(command, options)
    args = parse(argv)
    tee, saved_argv = _LastLine(sys.stdout), sys.argv
    sys.argv = ["rlcd", *argv]  # manifests and model cards record the command this call stands for
    try:
        with contextlib.redirect_stdout(tee):
            importlib.import_module(args._module).run(args)
    finally:
        sys.argv = saved_argv
    last = (tee.pending or tee.last).strip()
    return Path(last) if last and Path(last).exists() else None


def _function(command: str):
    def run(**options) -> Path | None:
        return run_command(command, **options)

    run.__name__ = run.__qualname__ = command.replace("-", "_")
    run.__doc__ = f"`rlcd {command}` with these flags as keywords (see `rlcd {command} --help`); returns the path it wrote."
    return run


FUNCTIONS = {command.replace("-", "_"): _function(command) for command in COMMANDS}
globals().update(FUNCTIONS)  # from rlcd.api import simulate, train_rm, ...
