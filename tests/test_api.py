"""The Python API: each command a function of its flags, checked as on the command line, errors raised."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import rlcd
from rlcd.api import command_line

DEMO_PAIRS = Path(rlcd.__file__).parent / "data" / "demo_pairs.jsonl"


def test_importing_the_package_loads_no_heavy_library():
    code = "import sys, rlcd; rlcd.format_prompts; print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_a_command_returns_the_path_it_wrote(tmp_path, capsys):
    out = rlcd.format_prompts(data_path=DEMO_PAIRS, split="all", out_file=tmp_path / "p.json", max_instances=3)
    assert out == tmp_path / "p.json" and [x["index"] for x in json.loads(out.read_text())] == [0, 1, 2]
    # the manifest records the command the call stands for, not the caller's script
    manifest = json.loads((tmp_path / "p.json.manifest.json").read_text())
    assert manifest["command"] == ["rlcd", "format-prompts", "--data-path", str(DEMO_PAIRS), "--split", "all",
                                   "--out-file", str(tmp_path / "p.json"), "--max-instances", "3"]
    assert capsys.readouterr().out.splitlines()[-1] == str(out)  # what it prints still reaches stdout
    # a config file works as --config does, keywords win over it
    config = tmp_path / "f.yaml"
    config.write_text(f"data-path: {DEMO_PAIRS}\nsplit: all\nmax-instances: 5\n")
    out = rlcd.format_prompts(config=config, out_file=tmp_path / "q.json", max_instances=2)
    assert len(json.loads(out.read_text())) == 2


@pytest.mark.parametrize("options, message", [
    ({"data_path": "/nope.jsonl", "out_file": "x.json"}, "/nope.jsonl: no such file"),
    ({"data_pth": "x"}, "rlcd.format_prompts: unknown option 'data_pth'"),
    ({"data_path": "x", "split": "nope", "out_file": "x.json"}, "argument --split: invalid choice: 'nope'"),
    ({"data_path": "x", "max_instances": "many", "out_file": "x.json"}, "argument --max-instances"),
])
def test_mistakes_raise_user_error_never_system_exit(options, message):
    with pytest.raises(rlcd.UserError) as e:
        rlcd.format_prompts(**options)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_keywords_become_the_command_line():
    assert command_line("simulate", {"prompts_file": "p.json", "dedupe": True, "accept_eos": False, "seed": None, "batch_size": 4}) == \
        ["simulate", "--prompts-file", "p.json", "--dedupe", "--batch-size", "4"]
    assert command_line("report", {"run_dir": "runs/x", "examples": 2}) == ["report", "--examples", "2", "runs/x"]
    from rlcd import api

    assert {"simulate", "train_rm", "ppo", "compare", "judge_agreement", "pipeline", "report"} <= set(api.FUNCTIONS)
    assert api.simulate.__name__ == "simulate" and rlcd.train_rm is api.train_rm


def test_stage_modules_keep_their_names():
    from rlcd import simulate  # the module, as every stage and test imports it

    assert hasattr(simulate, "make_engine") and callable(rlcd.api.FUNCTIONS["simulate"])
