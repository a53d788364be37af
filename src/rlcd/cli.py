"""The `rlcd` command: one subcommand per stage. Each stage module provides
`add_arguments(parser)` and `run(args)`; this file only wires them up.

`--config FILE` reads a YAML mapping whose keys are flag names (`batch-size` or
`batch_size`); flags given on the command line override it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import yaml

from rlcd import __version__
from rlcd.files import UserError

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


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A refused flag is one line too (argparse would print the usage lines first)."""
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (the others' flags are not needed to parse it)."""
    parser = Parser(prog="rlcd", description="RLCD: preference simulation and alignment.")
    parser.add_argument("--version", action="version", version=f"rlcd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for name, (module, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="YAML file of flag values; command-line flags override it")
        if name == command:
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module, _parser=p)
    return parser


def apply_config(args: argparse.Namespace, argv: list[str]) -> None:
    """Fill in values from --config for every flag not given on the command line."""
    if not args.config:
        return
    try:
        with open(args.config, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except OSError as e:
        raise UserError(f"{args.config}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{args.config}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(values, dict):
        raise UserError(f"{args.config}: expected a mapping of flag names to values")
    parser: argparse.ArgumentParser = args._parser
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    given = {a.dest for a in parser._actions for s in a.option_strings if any(x == s or x.startswith(s + "=") for x in argv)}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in actions or dest == "config":
            raise UserError(f"{args.config}: unknown key '{key}' for 'rlcd {args.command}' (see rlcd {args.command} --help)")
        if dest in given:
            continue
        action = actions[dest]
        if action.type is not None and value is not None and not isinstance(value, bool):
            try:
                value = action.type(value)
            except (TypeError, ValueError) as e:
                raise UserError(f"{args.config}: key '{key}': {e}") from None
        if action.choices is not None and value not in action.choices:
            raise UserError(f"{args.config}: key '{key}': {value!r} is not one of {list(action.choices)}")
        setattr(args, dest, value)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        if args.command != "pipeline":  # the pipeline's --config is its run file, not flag values
            apply_config(args, argv)
        importlib.import_module(args._module).run(args)
    except UserError as e:
        print(f"rlcd {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except ModuleNotFoundError as e:
        print(f"rlcd {args.command}: error: {missing_module_message(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"rlcd {args.command}: interrupted; finished work is saved, run the same command again to resume", file=sys.stderr)
        sys.exit(130)
