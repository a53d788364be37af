"""The `rlcd` command: one subcommand per stage. Each stage module provides `CONFIGS` (command -> its typed
config, rlcd.options) and `run(config)`; this file only wires them up.

`--config FILE` reads a YAML mapping whose keys are flag names (`batch-size` or
`batch_size`); its values become the parser's defaults before the command line is parsed, so
flags given on the command line (abbreviated or not) override it and it can supply required flags.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import yaml

from rlcd.files import UserError
from rlcd.text import terminal_safe
from rlcd.version import __version__

STAGES = {
    "simulate": ("rlcd.simulate", "simulate preference pairs (rlcd, rlaif, rlcd_rescore)"),
    "consolidate": ("rlcd.preferences", "turn simulation shards into a preference table"),
    "train-rm": ("rlcd.reward", "train a reward model on a preference table"),
    "eval-rm": ("rlcd.reward", "agreement of a reward model with human labels (hh-rlhf pairs)"),
    "score": ("rlcd.reward", "add reward-model scores to an outputs file"),
    "format-prompts": ("rlcd.generate", "hh-rlhf dialogues or a prompt list -> a prompts file (dev/test split)"),
    "generate": ("rlcd.generate", "one sampled output per prompt from a policy -> an outputs file"),
    "postprocess": ("rlcd.generate", "clean an outputs file (cut at the next speaker turn)"),
    "sft": ("rlcd.baselines", "context distillation: SFT on the preferred outputs of a preference table (TRL)"),
    "dpo": ("rlcd.baselines", "DPO on a preference table (TRL)"),
    "rloo": ("rlcd.baselines", "RLOO against a reward model (TRL)"),
    "ppo": ("rlcd.ppo", "align a policy with PPO against a reward model"),
    "report": ("rlcd.report", "Markdown + HTML report with plots of a run directory"),
    "compare": ("rlcd.judge", "pairwise LLM judge of two outputs files: win rate, both orders, cached"),
    "refusals": ("rlcd.refusal", "refusal rate on unsafe and over-refusal rate on safe requests of outputs on the refusal probe"),
    "judge-agreement": ("rlcd.judge", "agreement of an LLM judge with human labels (hh-rlhf pairs), cached"),
    "pipeline": ("rlcd.pipeline", "run the whole study from one config (--config run.yaml), resumable"),
    "demo": ("rlcd.pipeline", "the whole chain on the embedded default model on CPU, small; ends with the report's path"),
}


OPTIONAL = {  # module a stage may import -> how to install it
    "tensorboard": "pip install 'rlcd[tensorboard]'",
    "wandb": "pip install wandb",
    "llama_cpp": "pip install 'llama-cpp-python[server]'",
}


def missing_module_message(e: ModuleNotFoundError) -> str:
    """One line for a package that is not installed: the optional ones name their extra, the rest a re-install."""
    name = (e.name or "").split(".")[0]
    if name in OPTIONAL:
        return f"this needs the optional package '{name}': {OPTIONAL[name]}"
    return f"the package '{name}' is missing from this environment: pip install -e . (or pip install rlcd) installs what rlcd needs"


class FlagError(UserError):
    """A refused flag or value; `prog` names the (sub)command whose parser refused it."""

    def __init__(self, prog: str, message: str):
        super().__init__(f"{message} (see {prog} --help)")
        self.prog = prog


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help shows its default, unless the help already says it or there is none."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and "default" not in help_text:
            help_text += " (default: %(default)s)"
        return help_text


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A refused flag is one line (argparse would print the usage lines first and exit)."""
        raise FlagError(self.prog, message)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (the others' flags are not needed to parse it)."""
    parser = Parser(prog="rlcd", description="RLCD: preference simulation and alignment.")
    parser.add_argument("--version", action="version", version=f"rlcd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for name, (_, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if name != "pipeline":  # the pipeline's --config is its run file, a field of its config
            p.add_argument("--config", help="YAML file of flag values; command-line flags override it")
        if name == command:
            config_class(name).add_arguments(p)
        p.set_defaults(_parser=p)
    return parser


def config_class(command: str):
    """The typed config of a command (importing its stage module)."""
    return importlib.import_module(STAGES[command][0]).CONFIGS[command]


def read_config(path: str) -> dict:
    """A YAML mapping of flag names to values, or a one-line error."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            values = yaml.safe_load(f) or {}
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping of flag names to values")
    return values


def config_defaults(parser: argparse.ArgumentParser, values: dict, where: str) -> dict:
    """The file's values as parser defaults: keys checked, values converted and checked like flags.
    A required flag the file supplies is no longer required on the command line."""
    actions = {}
    for a in parser._actions:  # a setting's own flag first (`reward_scaling`: --reward-scaling, not --no-scale-rewards)
        if a.option_strings:
            actions.setdefault(a.dest, a)
    for a in parser._actions:  # a key may be any of a flag's names (`out-file` or its alias `out-csv`)
        actions.update({s.lstrip("-").replace("-", "_"): a for s in a.option_strings if s.startswith("--")})
    defaults = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in actions or name == "config":
            raise UserError(f"{where}: unknown key '{key}' (see {parser.prog} --help)")
        action = actions[name]
        dest = action.dest
        if action.nargs == 0 and name != dest:  # a bare flag by its own name (`no-stop-at-marker: true`): true gives it
            if value is not True:
                raise UserError(f"{where}: key '{key}': write true to give the flag, or leave the key out")
            defaults[dest] = action.const
            action.required = False
            continue
        convert = action.type if action.type is not None and value is not None and not isinstance(value, bool) else None
        try:
            if convert and isinstance(value, list) and action.nargs not in (None, "?"):
                value = [convert(v) for v in value]
            elif convert:
                value = convert(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise UserError(f"{where}: key '{key}': {e}") from None
        if action.choices is not None and value not in action.choices:
            raise UserError(f"{where}: key '{key}': {value!r} is not one of {list(action.choices)}")
        defaults[dest] = value
        action.required = False
    return defaults


def parse_namespace(argv: list[str]) -> argparse.Namespace:
    """Parse a command line; `--config FILE` (except the pipeline's run file) supplies defaults before parsing,
    so flags given on the command line, abbreviated or not, always win."""
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    if command in STAGES and command != "pipeline":  # the pipeline's --config is its run file, not flag values
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config")
        config = pre.parse_known_args(argv[argv.index(command) + 1:])[0].config
        if config:
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
            sub.set_defaults(**config_defaults(sub, read_config(config), config))
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the subcommand that refused them, not by `rlcd`
        args._parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def parse(argv: list[str]):
    """The typed config of a command line (its required settings and checks applied); raises `UserError`."""
    args = parse_namespace(argv)
    return config_class(args.command).from_namespace(args)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    command = next((a for a in argv if not a.startswith("-")), "rlcd")
    try:
        config = parse(argv)
    except FlagError as e:
        print(f"{e.prog}: error: {terminal_safe(str(e), one_line=True)}", file=sys.stderr)
        sys.exit(2)
    except UserError as e:
        print(f"rlcd {command}: error: {terminal_safe(str(e), one_line=True)}", file=sys.stderr)
        sys.exit(2)
    try:
        importlib.import_module(STAGES[command][0]).run(config)
    except UserError as e:
        print(f"rlcd {command}: error: {terminal_safe(str(e), one_line=True)}", file=sys.stderr)
        sys.exit(2)
    except ModuleNotFoundError as e:
        print(f"rlcd {command}: error: {missing_module_message(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"rlcd {command}: interrupted; finished work is saved, run the same command again to resume", file=sys.stderr)
        sys.exit(130)
