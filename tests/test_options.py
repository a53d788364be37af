"""Typed configs (rlcd.options): one dataclass per command is the source of its flags, defaults, help and checks."""

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

import rlcd
from rlcd import api
from rlcd.cli import STAGES, build_parser, config_class, parse
from rlcd.options import Config, flag_names

DEMO_PAIRS = Path(rlcd.__file__).parent / "data" / "demo_pairs.jsonl"


def subparser(command: str) -> argparse.ArgumentParser:
    return next(a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


@pytest.mark.parametrize("command", list(STAGES))
def test_every_command_has_one_documented_config(command):
    cls = config_class(command)
    assert issubclass(cls, Config) and cls.command == command and cls.__doc__
    assert getattr(api, api.config_name(command)) is cls  # from rlcd.api import TrainRmConfig
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{command}: --{f.name} has no help text"
    # the parser is built from the config: one action per field, same default
    actions = {}
    for a in subparser(command)._actions:  # a setting's own flag first (ppo: --reward-scaling before --no-scale-rewards)
        if a.dest not in ("help", "_parser") and (a.dest != "config" or command == "pipeline"):
            actions.setdefault(a.dest, a)
    for f in dataclasses.fields(cls):
        assert f.name in actions, f"{command}: {f.name} has no flag"
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert actions[f.name].default == default
    assert set(actions) <= {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("command", list(STAGES))
def test_help_shows_every_default(command, capsys):
    with pytest.raises(SystemExit):
        parse([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(config_class(command)):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if default not in (None, False, "", []) and flag_names(f) and f.metadata.get("action") is None:
            assert f"default: {default}" in text or "default" in f.metadata["help"], f"{command}: --{f.name}"


def test_a_config_missing_a_required_setting_is_refused_when_built():
    cfg = config_class("consolidate")
    with pytest.raises(rlcd.UserError, match="^--data is required$"):
        cfg(out_csv="x.csv", data_type="rlcd")
    assert cfg(in_dir="d", out_csv="x.csv", data_type="rlcd").changed() == {"in_dir": "d", "out_csv": "x.csv", "data_type": "rlcd"}


def test_the_command_line_builds_the_config(tmp_path):
    config = parse(["consolidate", "--in-dir", "d", "--out-csv", "t.jsonl", "--data-type", "rlaif", "--se", "7"])
    assert isinstance(config, config_class("consolidate"))
    assert (config.in_dir, config.out_csv, config.data_type, config.seed, config.json) == ("d", "t.jsonl", "rlaif", 7, False)
    file = tmp_path / "c.yaml"
    file.write_text("data: d\nout-file: t.jsonl\ndata-type: rlcd\nseed: 3\n")
    assert parse(["consolidate", "--config", str(file), "--seed", "9"]).seed == 9  # the command line beats the file


def test_a_stage_function_takes_its_config(tmp_path):
    out = api.format_prompts(api.FormatPromptsConfig(data_path=str(DEMO_PAIRS), split="all", out_file=str(tmp_path / "p.json"),
                                                      max_instances=2))
    assert out == tmp_path / "p.json" and len(json.loads(out.read_text())) == 2
    # keywords override the config's fields
    out = api.format_prompts(api.FormatPromptsConfig(data_path=str(DEMO_PAIRS), split="all", out_file=str(tmp_path / "p.json")),
                             out_file=tmp_path / "q.json", max_instances=1)
    assert len(json.loads(out.read_text())) == 1
    with pytest.raises(rlcd.UserError, match="expected a FormatPromptsConfig"):
        api.format_prompts(config_class("consolidate")(in_dir="d", out_csv="x.csv", data_type="rlcd"))


def test_a_bare_flag_that_turns_a_setting_off_reaches_the_command_line():
    assert "--no-stop-at-marker" in api.command_line("ppo", {"stop_at_marker": False})
    assert "--no-stop-at-marker" in api.command_line("ppo", {"no_stop_at_marker": True})
    assert "--no-stop-at-marker" not in api.command_line("ppo", {"stop_at_marker": True})
    assert api.command_line("ppo", {"reward_scaling": "scores"})[1:] == ["--reward-scaling", "scores"]


def test_a_config_built_in_python_is_checked_like_the_command_line():
    ppo = config_class("ppo")
    required = {"prompts": "p.json", "reward_model": "rm", "out_dir": "o"}
    with pytest.raises(rlcd.UserError, match="--reward-scaling: 'bogus' is not one of"):
        ppo(**required, reward_scaling="bogus")
    with pytest.raises(rlcd.UserError, match="--minibatch-size 600 is larger than --rollouts 512"):
        ppo(**required, minibatch_size=600)
    assert ppo(**required).changed() == required


def test_the_package_gives_the_configs_too():
    from rlcd import TrainRmConfig

    assert TrainRmConfig is config_class("train-rm") and TrainRmConfig.command == "train-rm"
    with pytest.raises(ImportError):
        from rlcd import NoSuchConfig  # noqa: F401


def test_one_version():
    import tomllib

    pyproject = tomllib.loads((Path(rlcd.__file__).parents[2] / "pyproject.toml").read_text())
    assert rlcd.__version__ == pyproject["project"]["version"]
