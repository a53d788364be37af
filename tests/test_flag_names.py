"""One name per concept across commands (docs/design.md, Command-line contract): every command takes the canonical
names, the original scripts' names stay aliases of the same flag, --help shows the canonical name first, one seed default."""

import argparse

import pytest

from rlcd.api import command_line
from rlcd.cli import STAGES, build_parser, parse_namespace
from rlcd.seeds import DEFAULT_SEED

# command -> canonical flag -> its other names (each an alias on the same dest)
NAMES = {
    "simulate": {"--prompts-file": [], "--model": ["--model-string"], "--out-dir": [], "--seed": []},
    "consolidate": {"--data": ["--in-dir"], "--out-file": ["--out-csv"], "--seed": []},
    "train-rm": {"--data": [], "--model": ["--model-string"], "--out-dir": [], "--seed": []},
    "eval-rm": {"--reward-model": ["--model-path"], "--data": ["--data-path"], "--out-file": [], "--seed": []},
    "score": {"--reward-model": [], "--data": ["--data-path", "--in-file"], "--out-file": []},
    "format-prompts": {"--prompts-file": ["--data-path"], "--out-file": []},
    "generate": {"--model": ["--model-string"], "--prompts-file": ["--prompts"], "--out-file": [], "--seed": []},
    "postprocess": {"--data": ["--in-file"], "--out-file": []},
    "sft": {"--data": [], "--model": ["--model-string"], "--out-dir": [], "--seed": []},
    "dpo": {"--data": [], "--model": ["--model-string"], "--out-dir": [], "--seed": []},
    "rloo": {"--prompts-file": ["--prompts"], "--reward-model": [], "--model": ["--model-string"], "--out-dir": [], "--seed": []},
    "compare": {"--in-file1": [], "--in-file2": [], "--out-file": [], "--seed": []},
    "judge-agreement": {"--data": ["--data-path"], "--out-file": [], "--seed": []},
    "refusals": {"--data": ["--in-file"], "--out-file": [], "--seed": []},
    "report": {"--out-dir": []},
}


def options(command: str) -> dict[str, argparse.Action]:
    sub = next(a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {s: a for a in sub._actions for s in a.option_strings}


@pytest.mark.parametrize("command", list(NAMES))
def test_canonical_names_come_first_and_old_names_are_aliases(command):
    flags = options(command)
    for canonical, aliases in NAMES[command].items():
        action = flags[canonical]
        assert action.option_strings == [canonical, *aliases]  # --help lists the canonical name first
        for name in (canonical, *aliases):
            value = "7" if canonical == "--seed" else "x"
            argv = [command, name, value] + (["RUN"] if command == "report" else [])
            assert getattr(parse_namespace(argv), action.dest) == (7 if canonical == "--seed" else "x")  # names only: no required checks


def test_every_seed_defaults_to_the_one_default():
    assert DEFAULT_SEED == 42
    for command in STAGES:
        seed = options(command).get("--seed")
        if seed is not None:
            assert seed.default == DEFAULT_SEED, command


def test_python_api_keywords_may_be_any_name_of_a_flag():
    assert command_line("eval-rm", {"reward_model": "rm", "data": "hh.jsonl"}) == ["eval-rm", "--reward-model", "rm", "--data", "hh.jsonl"]
    assert command_line("eval-rm", {"model_path": "rm", "data_path": "hh.jsonl"}) == ["eval-rm", "--model-path", "rm", "--data-path", "hh.jsonl"]
    assert command_line("generate", {"prompts_file": "p.json", "prompts": "q.json"}) == ["generate", "--prompts-file", "p.json", "--prompts", "q.json"]
    with pytest.raises(Exception, match="unknown option 'help'"):
        command_line("score", {"help": True})
