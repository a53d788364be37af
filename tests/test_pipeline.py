"""rlcd pipeline: the plan, skipping finished stages, re-running what changed, resuming after an interrupt."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import yaml

from rlcd import pipeline
from rlcd.cli import main
from rlcd.files import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_launch(monkeypatch):
    """Stages 'run' by writing their output; returns the list of stage names launched."""
    launched: list[str] = []

    def launch(self, stage):
        launched.append(stage.name)
        stage.output.parent.mkdir(parents=True, exist_ok=True)
        if not stage.output.exists():
            stage.output.write_text("{}")
        return 0.0

    monkeypatch.setattr(pipeline.Runner, "launch", launch)
    return launched


def demo() -> dict:
    return pipeline.demo_config()


def test_demo_plan_runs_every_stage_in_order(tmp_path):
    names = [s.name for s in pipeline.plan(demo(), tmp_path)]
    assert names == ["simulate/rlcd", "consolidate/rlcd", "train-rm/rlcd", "eval-rm/rlcd", "ppo/rlcd-ppo", "format-prompts",
                     "generate/base", "score/base", "generate/rlcd-ppo", "score/rlcd-ppo", "judge-agreement",
                     "compare/base-vs-rlcd-ppo", "report"]
    stages = {s.name: s for s in pipeline.plan(demo(), tmp_path)}
    ppo = stages["ppo/rlcd-ppo"]
    assert ppo.argv[:2] == ["ppo", "--prompts"] and "--resume" in ppo.argv and ppo.argv[ppo.argv.index("--steps") + 1] == "5"
    assert "--compare-reference" in ppo.argv  # the demo's PPO curve of the gain over the starting policy
    assert str(tmp_path / "rm" / "rlcd") in ppo.argv
    # the judge is measured on the labelled pairs first, and compare is given that measurement
    measured = stages["judge-agreement"]
    assert measured.argv[measured.argv.index("--judge") + 1] == "hf:smollm2" and measured.argv[measured.argv.index("--num-pairs") + 1] == "80"
    compare = stages["compare/base-vs-rlcd-ppo"]
    assert "judge-agreement" in compare.deps and compare.argv[compare.argv.index("--judge-agreement") + 1] == str(measured.output)


def test_judge_agreement_measures_the_judge_compare_uses(tmp_path):
    server = {"judge": "openai:m", "base-url": "http://127.0.0.1:9", "concurrency": 3, "max-retries": 1, "timeout": 7}
    cfg = {**demo(), "compare": {**demo()["compare"], **server}}
    stages = {s.name: s for s in pipeline.plan(cfg, tmp_path)}
    measured, compare = stages["judge-agreement"].argv, stages["compare/base-vs-rlcd-ppo"].argv
    for flag, value in server.items():
        assert measured[measured.index(f"--{flag}") + 1] == compare[compare.index(f"--{flag}") + 1] == str(value)


def test_refusal_probe_stages_for_every_system(tmp_path):
    cfg = {**demo(), "refusals": {"max-new-tokens": 7}}
    stages = {s.name: s for s in pipeline.plan(cfg, tmp_path)}
    probe = stages["format-prompts/probe"]
    assert probe.argv[probe.argv.index("--data-path") + 1].endswith("refusal_probe.jsonl")
    for name in ("base", "rlcd-ppo"):
        generate, refusals = stages[f"generate-probe/{name}"], stages[f"refusals/{name}"]
        # the generate section's settings, except its instance cap (the probe is used whole), then the section's own
        assert "--max-instances" not in generate.argv and generate.argv[-2:] == ["--max-new-tokens", "7"]
        assert refusals.deps == [f"generate-probe/{name}"] and str(generate.output) in refusals.argv
    assert "ppo/rlcd-ppo" in stages["generate-probe/rlcd-ppo"].deps
    pipeline.validate(list(stages.values()), cfg, "cfg")


def test_second_run_skips_everything_and_a_changed_setting_reruns_only_downstream(tmp_path, fake_launch):
    cfg = demo()
    pipeline.run_pipeline(cfg, "cfg", str(tmp_path))
    assert len(fake_launch) == 13
    fake_launch.clear()
    pipeline.run_pipeline(cfg, "cfg", str(tmp_path))
    assert fake_launch == []
    state = json.loads((tmp_path / "pipeline.json").read_text())
    assert {s["status"] for s in state["stages"]} == {"skipped"}
    changed = copy.deepcopy(cfg)
    changed["train-rm"]["epochs"] = 3
    pipeline.run_pipeline(changed, "cfg", str(tmp_path))
    assert fake_launch == ["train-rm/rlcd", "eval-rm/rlcd", "ppo/rlcd-ppo", "score/base", "generate/rlcd-ppo",
                           "score/rlcd-ppo", "compare/base-vs-rlcd-ppo", "report"]


def test_an_input_file_that_changes_reruns_its_readers(tmp_path, fake_launch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(Path(demo()["prompts-file"]).read_text())
    cfg = {**demo(), "prompts-file": str(prompts)}
    pipeline.run_pipeline(cfg, "cfg", str(tmp_path / "run"))
    fake_launch.clear()
    prompts.write_text(prompts.read_text() + '{"prompt": "Human: one more?\\n\\nAssistant:"}\n')
    pipeline.run_pipeline(cfg, "cfg", str(tmp_path / "run"))
    assert fake_launch[0] == "simulate/rlcd" and "format-prompts" not in fake_launch


def test_interrupted_stage_runs_again_and_finished_ones_do_not(tmp_path, fake_launch, monkeypatch):
    real = pipeline.Runner.launch

    def interrupt_ppo(self, stage):
        if stage.name == "ppo/rlcd-ppo":
            raise KeyboardInterrupt
        return real(self, stage)

    monkeypatch.setattr(pipeline.Runner, "launch", interrupt_ppo)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(demo(), "cfg", str(tmp_path))
    assert fake_launch == ["simulate/rlcd", "consolidate/rlcd", "train-rm/rlcd", "eval-rm/rlcd"]
    fake_launch.clear()
    monkeypatch.setattr(pipeline.Runner, "launch", real)
    pipeline.run_pipeline(demo(), "cfg", str(tmp_path))
    assert fake_launch[0] == "ppo/rlcd-ppo" and len(fake_launch) == 9


def test_failed_stage_is_one_line_naming_its_log(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(demo()))
    monkeypatch.setattr(pipeline.Runner, "launch", _fail_on("train-rm/rlcd"))
    with pytest.raises(SystemExit) as e:
        main(["pipeline", "--config", str(cfg), "--run-dir", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train-rm/rlcd failed" in err[0] and "logs" in err[0]


@pytest.mark.parametrize("fork", [True, False], ids=["forked", "fresh-interpreter"])
def test_a_stage_runs_in_a_process_of_its_own_with_its_output_in_its_log(tmp_path, monkeypatch, capsys, fork):
    monkeypatch.setattr(pipeline, "fork_stages", lambda: True)
    runner, pairs = pipeline.Runner(tmp_path, [], may_fork=fork), str(Path(demo()["test-file"]))
    out = tmp_path / "prompts.json"
    runner.launch(pipeline.Stage("format-prompts", ["format-prompts", "--data-path", pairs, "--split", "all", "--out-file",
                                                    str(out)], out))
    assert runner.fork is fork and json.loads(out.read_text())
    manifest = json.loads((tmp_path / "prompts.json.manifest.json").read_text())
    assert manifest["command"][0].endswith("__main__.py") and manifest["command"][1:3] == ["format-prompts", "--data-path"]
    log = (tmp_path / "logs" / "format-prompts.log").read_text()
    assert str(out) in log and ("(forked)" in log) is fork
    assert f"  {out}" in capsys.readouterr().out  # the stage's lines, indented, on the console too
    with pytest.raises(UserError, match=r"stage bad failed \(exit 2\): rlcd format-prompts: error: .*nowhere.jsonl.*full log"):
        runner.launch(pipeline.Stage("bad", ["format-prompts", "--data-path", str(tmp_path / "nowhere.jsonl"), "--out-file",
                                             str(tmp_path / "x.json")], tmp_path / "x.json"))
    if fork:  # an unexpected exception: the traceback in the log, exit 1, and this process goes on
        def crash(args):
            raise RuntimeError("boom")

        monkeypatch.setattr("rlcd.generate.run", crash)
        with pytest.raises(UserError, match=r"exit 1\): RuntimeError: boom"):
            runner.launch(pipeline.Stage("crash", ["format-prompts", "--data-path", pairs, "--out-file", str(out)], out))
        assert "Traceback" in (tmp_path / "logs" / "crash.log").read_text()


def test_stages_are_forked_only_when_torch_was_not_imported_before_the_pipeline(tmp_path, monkeypatch):
    import sys

    import torch  # noqa: F401 - as in a process that may have run torch operations (a notebook, say)

    seen = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda cfg, where, run_dir, may_fork: seen.append(may_fork) or tmp_path)
    pipeline.run(pipeline.DemoConfig(run_dir=str(tmp_path)))
    monkeypatch.delitem(sys.modules, "torch")  # as `rlcd demo` starts: nothing has imported torch
    pipeline.run(pipeline.DemoConfig(run_dir=str(tmp_path)))
    assert seen == [False, True]


def _fail_on(name):
    def launch(self, stage):
        if stage.name == name:
            log = self.run / "logs" / "x.log"
            raise UserError(f"stage {stage.name} failed (exit 2): bad --learning-rate — full log: {log}; fix and run again")
        stage.output.parent.mkdir(parents=True, exist_ok=True)
        stage.output.write_text("{}")
        return 0.0

    return launch


@pytest.mark.parametrize("change, needle", [
    ({"colour": "blue"}, "unknown key 'colour'"),
    ({"prompts-file": "/nonexistent.jsonl"}, "no such file"),
    ({"systems": {"x": {"stage": "magic"}}}, "systems.x.stage"),
    ({"systems": {"x": {"stage": "ppo", "reward-model": "rlaif"}}}, "not a simulated method"),
    ({"train-rm": {"epochs": [1, 2]}}, "expected a single value"),
    # every stage's flags are parsed before the first stage runs: a late stage's typo fails at once
    ({"generate": {"max-new-tokns": 5}}, "generate: unrecognized arguments: --max-new-tokns 5"),
    ({"train-rm": {"learning-rate": -1}}, "train-rm: --learning-rate must be positive"),  # a value check, before any stage runs
    ({"systems": {"base": {}, "rlcd-ppo": {"stage": "ppo", "stepz": 2}}}, "systems.rlcd-ppo: unrecognized arguments: --stepz 2"),
    ({"compare": {"judge": "hf:smollm2", "against": "base", "judge-mode": "both"}}, "compare: argument --judge-mode"),
])
def test_config_mistakes_are_one_line(tmp_path, capsys, change, needle):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({**demo(), **change}))
    with pytest.raises(SystemExit) as e:
        main(["pipeline", "--config", str(cfg), "--run-dir", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_shipped_configs_plan_cleanly(tmp_path, monkeypatch):
    for name in ("harmless", "helpful", "demo", "study-qwen-harmless", "study-qwen-helpful"):
        cfg = pipeline.load_config(str(ROOT / "configs" / f"{name}.yaml"))
        for key in ("prompts-file", "test-file"):
            cfg[key] = demo()[key]  # the shipped paths point at the user's hh-rlhf copy
        cfg.get("simulate", {}).pop("exclude-prompts", None)
        pipeline.check_config(cfg, name)
        stages = pipeline.plan(cfg, tmp_path)
        pipeline.validate(stages, cfg, name)
        stages = [s.name for s in stages]
        assert stages[-1] == "report" and any(s.startswith("compare/") for s in stages)


def test_shipped_demo_config_is_the_demo(tmp_path):
    shipped = pipeline.load_config(str(ROOT / "configs" / "demo.yaml"))
    embedded = demo()
    for key in ("prompts-file", "test-file"):
        assert Path(shipped.pop(key)).name == Path(embedded.pop(key)).name
    shipped.pop("run-dir", None)
    assert shipped == embedded


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RLCD_DEMO_VERIFIED") == "1",
                    reason="CI has just run the demo from the README's first block in a fresh clone (.ci/run)")
def test_demo_runs_end_to_end_on_the_default_model(tmp_path, capsys, default_model_path):
    main(["demo", "--run-dir", str(tmp_path / "demo")])
    out = capsys.readouterr().out.strip().splitlines()
    report = Path(out[-1])
    assert report == tmp_path / "demo" / "report" / "report.html" and report.exists()
    html = report.read_text()
    assert "rlcd-ppo" in html and "base" in html
    state = json.loads((tmp_path / "demo" / "pipeline.json").read_text())
    assert all(s["status"] == "done" for s in state["stages"])


def test_a_missing_package_is_one_line_naming_what_to_install(monkeypatch, capsys):
    from rlcd import cli

    def run(args):
        raise ModuleNotFoundError("No module named 'tensorboard'", name="tensorboard")

    monkeypatch.setattr("rlcd.report.run", run)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", "somewhere"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "tensorboard" in err and "pip install 'rlcd[tensorboard]'" in err
    assert "No module named" not in cli.missing_module_message(ModuleNotFoundError(name="datasets.arrow"))
    assert "'datasets'" in cli.missing_module_message(ModuleNotFoundError(name="datasets.arrow"))
