"""benchmarks/multigpu.py's arguments and resume bookkeeping (fast: no command runs). The whole script ran once
end to end on CPU with --smoke --num-processes 2 (about 2.5 minutes; docs/multi-gpu.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "multigpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("multigpu_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_sizes_fill_in_what_the_command_line_leaves_out(bench):
    args = bench.parse_args(["--out", "r.json", "--smoke", "--num-processes", "2", "--rm-steps", "9", "--ppo-rollouts=16"])
    assert args.num_prompts == bench.SMOKE["num_prompts"] and args.rm_batch_size == bench.SMOKE["rm_batch_size"]
    assert args.rm_steps == 9 and args.ppo_rollouts == 16  # given flags win, in both spellings
    assert args.parts == ["simulate", "train-rm", "ppo"] and args.work_dir == "r-work"
    assert bench.parse_args(["--out", "r.json", "--num-processes", "4"]).num_prompts == 512  # no --smoke: full sizes


@pytest.mark.parametrize("argv,message", [
    (["--num-processes", "1"], "at least 2"),
    (["--num-processes", "3"], "must divide by --num-processes 3"),  # 256 rollouts over 3 processes
    (["--num-processes", "2", "--parts", "simulate,score"], "unknown ['score']"),
])
def test_bad_arguments_are_refused(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--out", "r.json", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_second_call_continues_the_same_benchmark_and_refuses_other_settings(bench, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["--out", str(out), "--num-processes", "2", "--parts", "simulate", "--stop-after", "0"]
    assert bench.main(argv) == 3  # nothing started: call again
    first = json.loads(out.read_text())
    assert first["runs"] == {} and first["results"] == {} and first["settings"]["num_processes"] == 2 and first["machine"]["cpus"]
    assert bench.main([*argv, "--stop-after", "0", "--work-dir", str(tmp_path / "w")]) == 3  # --stop-after and --work-dir may change
    assert len(json.loads(out.read_text())["commands"]) == 2
    capsys.readouterr()
    assert bench.main([*argv, "--num-prompts", "64"]) == 2  # another benchmark: refused, the file kept
    assert "recorded with other settings (num_prompts)" in capsys.readouterr().err
    assert len(json.loads(out.read_text())["commands"]) == 2
