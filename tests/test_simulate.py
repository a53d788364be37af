"""Simulation logic: prompts, slots, retries, judging, records, resume and sharding.

Most tests drive `rlcd simulate` end to end through the CLI with a scripted engine
(deterministic in prompt and seed, like the real engine) so that every filter and
retry path is hit on purpose; the tests at the bottom use the real default model.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import EXAMPLE_PROMPTS

from rlcd import simulate
from rlcd.cli import main
from rlcd.engines import Completion
from rlcd.files import UserError, load_shard


class ScriptedEngine:
    """Accepts a sample unless its seed is divisible by 3 or the prompt asks to FAIL; judges by reply length."""

    name, context_length, can_ban_tokens = "scripted", None, False

    def __init__(self, crash_after: int | None = None):
        self.calls, self.crash_after, self.batches = 0, crash_after, []

    def count_tokens(self, text):
        return None

    def generate(self, prompts, params, seeds):
        self.calls += 1
        if self.crash_after is not None and self.calls > self.crash_after:
            raise KeyboardInterrupt
        self.batches.append(len(prompts))
        out = []
        for prompt, seed in zip(prompts, seeds):
            side = "pos" if "(good" in prompt.rsplit("Assistant", 1)[-1] else "neg" if "(bad" in prompt.rsplit("Assistant", 1)[-1] else "plain"
            if "FAIL" in prompt or seed % 3 == 0:
                out.append(Completion(" rambling on", "length", 3))
            else:
                out.append(Completion(f" {side} reply {seed % 1000}\n\nHuman", "stop", 5))
        return out

    def next_token_logprobs(self, prompts, candidates):
        rows = []
        for p in prompts:
            a = p.split("(A) ")[1].split("\n")[0]
            b = p.split("(B) ")[1].split("\n")[0]
            rows.append([-len(a) / 10, -len(b) / 10])
        return rows, ["A-id", "B-id"]


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text(
        "name: toy\ndescriptors:\n"
        "  - {positive: '(good one)', negative: '(bad one)'}\n"
        "  - {positive: '(good two)', negative: '(bad two)'}\n"
        "principles: ['Which is better?', 'Which is nicer?']\n"
    )
    return path


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.json"
    questions = [f"Question number {i}?" for i in range(12)]
    questions[5] = "Please FAIL this one"
    questions[7] = "Hi\n\nAssistant: Hello\n\nHuman: A second turn"  # plain questions may hold earlier turns
    path.write_text(json.dumps(questions))
    return path


def simulate_cli(monkeypatch, engine, *args):
    monkeypatch.setattr(simulate, "make_engine", lambda a: (engine, {"backend": "scripted"}))
    main(["simulate", *map(str, args)])


def records(out_dir):
    found = []
    for path in sorted(Path(out_dir).glob("records-*.jsonl")):
        found += load_shard(path)
    return sorted(found, key=lambda r: r["index"])


def test_rlcd_records(monkeypatch, tmp_path, task_file, prompts_file, capsys):
    out = tmp_path / "out"
    simulate_cli(monkeypatch, ScriptedEngine(), "--prompts-file", prompts_file, "--task", task_file, "--out-dir", out, "--batch-size", 4)
    recs = records(out)
    assert [r["index"] for r in recs] == list(range(12))
    for r in recs:
        if r["index"] == 5:
            assert r["status"] == "failed" and r["attempts"] == {"chosen": 5, "rejected": 5}
            assert r["rejections"]["chosen"] == ["no Human turn within max_new_tokens"] * 5
            continue
        assert r["status"] == "ok"
        d = r["descriptor_index"]
        pos, neg = ["(good one)", "(good two)"][d], ["(bad one)", "(bad two)"][d]
        assert r["actual_prompts"]["chosen"].endswith(f"Assistant {pos}:")
        assert r["actual_prompts"]["rejected"].endswith(f"Assistant {neg}:")
        assert r["outputs"]["chosen"].startswith("pos reply") and r["outputs"]["rejected"].startswith("neg reply")
        assert len(r["rejections"]["chosen"]) == r["attempts"]["chosen"] - 1
    multi = recs[7]["actual_prompts"]["chosen"]
    assert multi.count("(bad") == 1 and multi.index("(bad") < multi.index("(good")  # earlier marker gets the opposite
    assert {r["descriptor_index"] for r in recs} == {0, 1}
    manifest = json.loads((out / "manifest-r0-of-1.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["ok"] == 11 and manifest["counts"]["failed"] == 1
    drawn = sum(sum(r["attempts"].values()) for r in recs)
    assert manifest["counts"]["samples_drawn"] == drawn
    assert manifest["counts"]["acceptance_rate"] == pytest.approx(22 / drawn, abs=1e-4)
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)


def test_rlaif_and_rescore_are_judged(monkeypatch, tmp_path, task_file, prompts_file):
    for method in ("rlaif", "rlcd_rescore"):
        out = tmp_path / method
        simulate_cli(monkeypatch, ScriptedEngine(), "--prompts-file", prompts_file, "--task", task_file, "--out-dir", out, "--method", method)
        recs = [r for r in records(out) if r["status"] == "ok"]
        assert len(recs) == 11
        for r in recs:
            la, lb = r["logprob_A"], r["logprob_B"]
            assert r["win2_prob"] == pytest.approx(math.exp(lb) / (math.exp(la) + math.exp(lb)))
            assert r["letter_token_ids"] == ["A-id", "B-id"]
            assert set(r["outputs"]) == {"A", "B"}
            if method == "rlaif":
                assert r["descriptor_index"] is None and r["principle_index"] in (0, 1)
                assert r["actual_prompts"]["A"] == r["actual_prompts"]["B"] == r["prompt"]
            else:
                slot = r["positive_slot"]
                assert r["principle_index"] == r["descriptor_index"]
                assert "(good" in r["actual_prompts"][slot].rsplit("Assistant", 1)[1]
                assert r["outputs"][slot].startswith("pos reply")
        if method == "rlcd_rescore":
            assert {r["positive_slot"] for r in recs} == {"A", "B"}


def test_records_do_not_depend_on_batch_size_or_sharding(monkeypatch, tmp_path, task_file, prompts_file):
    base = ["--prompts-file", prompts_file, "--task", task_file]
    simulate_cli(monkeypatch, ScriptedEngine(), *base, "--out-dir", tmp_path / "a", "--batch-size", 1)
    simulate_cli(monkeypatch, ScriptedEngine(), *base, "--out-dir", tmp_path / "b", "--batch-size", 7)
    for r in range(3):
        simulate_cli(monkeypatch, ScriptedEngine(), *base, "--out-dir", tmp_path / "c", "--indices-mod", 3, "--indices-remainder", r)
    assert sorted(p.name for p in (tmp_path / "c").glob("records-*")) == [f"records-r{r}-of-3.jsonl" for r in range(3)]
    assert records(tmp_path / "a") == records(tmp_path / "b") == records(tmp_path / "c")


def test_interrupted_run_resumes_without_loss_or_duplicates(monkeypatch, tmp_path, task_file, prompts_file):
    base = ["--prompts-file", prompts_file, "--task", task_file, "--batch-size", 4]
    simulate_cli(monkeypatch, ScriptedEngine(), *base, "--out-dir", tmp_path / "full")
    with pytest.raises(SystemExit) as e:
        simulate_cli(monkeypatch, ScriptedEngine(crash_after=3), *base, "--out-dir", tmp_path / "cut")
    assert e.value.code == 130
    partial = records(tmp_path / "cut")
    assert 0 < len(partial) < 12
    assert json.loads((tmp_path / "cut" / "manifest-r0-of-1.json").read_text())["status"] == "interrupted"
    # a torn last line, as left by kill -9 in the middle of a write
    shard = tmp_path / "cut" / "records-r0-of-1.jsonl"
    with open(shard, "a") as f:
        f.write('{"index": 99, "method": "rl')
    engine = ScriptedEngine()
    simulate_cli(monkeypatch, engine, *base, "--out-dir", tmp_path / "cut")
    assert records(tmp_path / "cut") == records(tmp_path / "full")
    again = ScriptedEngine()
    simulate_cli(monkeypatch, again, *base, "--out-dir", tmp_path / "cut")
    assert again.calls == 0 and records(tmp_path / "cut") == records(tmp_path / "full")


def test_retry_failed_continues_attempt_numbering(monkeypatch, tmp_path, task_file, prompts_file):
    out = tmp_path / "out"
    base = ["--prompts-file", prompts_file, "--task", task_file, "--out-dir", out, "--max-attempts", 1]
    simulate_cli(monkeypatch, ScriptedEngine(), *base)
    failed = {r["index"] for r in records(out) if r["status"] == "failed"}
    assert 5 in failed and len(failed) > 1  # seeds divisible by 3 fail with one attempt
    simulate_cli(monkeypatch, ScriptedEngine(), *base, "--retry-failed")
    by_index = {}
    for r in records(out):
        by_index.setdefault(r["index"], []).append(r)
    recovered = [i for i in failed if any(r["status"] == "ok" for r in by_index[i])]
    assert recovered  # new attempts use new seeds instead of repeating the failed ones
    for i in recovered:
        ok = next(r for r in by_index[i] if r["status"] == "ok")
        assert max(ok["attempts"].values()) == 2
    table = tmp_path / "table.jsonl"
    main(["consolidate", "--in-dir", str(out), "--out-csv", str(table), "--data-type", "rlcd"])
    assert len(table.read_text().splitlines()) == sum(any(r["status"] == "ok" for r in rs) for rs in by_index.values())


def test_sharding_arithmetic(monkeypatch):
    assert simulate.parse_indices("17-19,3, 5-5") == {17, 18, 19, 3, 5}
    with pytest.raises(UserError, match="not an index"):
        simulate.parse_indices("4-2")
    assert simulate.process_slice(None, None) == (1, 0)
    assert simulate.process_slice(4, 1) == (4, 1)
    with pytest.raises(UserError):
        simulate.process_slice(4, 4)
    with pytest.raises(UserError):
        simulate.process_slice(4, None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    items = [(i, "p") for i in range(40)]
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        mod, rem = simulate.process_slice(4, 1)
        seen += [i for i, _ in simulate.select_indices(items, "0-30", mod, rem)]
    assert sorted(seen) == [i for i in range(31) if i % 4 == 1]


def test_bad_settings_are_refused(monkeypatch, tmp_path, prompts_file, capsys):
    for args, message in [
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--backend", "openai"], "--backend openai needs --api-model"),
        (["--task", str(tmp_path / "nope.yaml")], "not a built-in task"),
    ]:
        with pytest.raises(SystemExit) as e:
            simulate_cli(monkeypatch, ScriptedEngine(), "--prompts-file", prompts_file, "--out-dir", tmp_path / "o", *args)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


def test_method_mismatch_in_out_dir_is_refused(monkeypatch, tmp_path, task_file, prompts_file, capsys):
    base = ["--prompts-file", prompts_file, "--task", task_file, "--out-dir", tmp_path / "o"]
    simulate_cli(monkeypatch, ScriptedEngine(), *base, "--max-prompts", 2)
    with pytest.raises(SystemExit):
        simulate_cli(monkeypatch, ScriptedEngine(), *base, "--method", "rlaif")
    assert "holds --method rlcd records" in capsys.readouterr().err


def test_too_long_prompts_are_skipped_and_counted(monkeypatch, tmp_path, task_file, prompts_file):
    engine = ScriptedEngine()
    engine.context_length = 310
    engine.count_tokens = lambda text: len(text.split())  # the 2-turn prompt is the only long one
    out = tmp_path / "o"
    simulate_cli(monkeypatch, engine, "--prompts-file", prompts_file, "--task", task_file, "--out-dir", out, "--max-new-tokens", 300)
    assert 7 not in [r["index"] for r in records(out)]
    skipped = json.loads((out / "manifest-r0-of-1.json").read_text())["counts"]["skipped"]
    assert skipped == {"prompt + max_new_tokens longer than the model's context": 1}


# --- the real engine: a tiny random model, and the embedded default model -------------------------

def test_simulate_with_a_real_model_end_to_end(tmp_path, tiny_model_dir, task_file, prompts_file):
    out = tmp_path / "o"
    main(["simulate", "--prompts-file", str(prompts_file), "--task", str(task_file), "--out-dir", str(out),
          "--model", tiny_model_dir, "--max-new-tokens", "8", "--max-attempts", "2", "--max-prompts", "3", "--accept-eos"])
    recs = records(out)
    assert len(recs) == 3 and all(r["status"] == "failed" for r in recs)  # a random model never ends its turn
    assert all(sum(r["attempts"].values()) == 4 for r in recs)


def run_cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "rlcd", *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rlcd", "rlaif", "rlcd_rescore"])
def test_default_model_simulate_and_consolidate(tmp_path, method, default_model_path):
    out = tmp_path / method
    # chat prompts (the instruct model ends its turn with EOS): 2 of 6 accepted at 64 tokens, in ~55 s a method on 2 CPU
    # cores, where raw prompts and 128 tokens took ~160 s; raw prompts on this model: the kill-and-resume test below
    result = run_cli("simulate", "--prompts-file", EXAMPLE_PROMPTS, "--method", method, "--out-dir", out,
                     "--max-prompts", 6, "--max-new-tokens", 64, "--batch-size", 12, "--prompt-style", "chat",
                     "--max-attempts", 2)
    assert result.returncode == 0, result.stderr
    assert "acceptance rate" in result.stderr
    table = tmp_path / f"{method}.csv"
    result = run_cli("consolidate", "--in-dir", out, "--out-csv", table, "--data-type", method, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.splitlines()[0])
    assert summary["pairs"] + summary["failed"] == 6 and summary["pairs"] >= 1
    recs = records(out)
    if method != "rlcd":
        ok = [r for r in recs if r["status"] == "ok"]
        assert all(0 < r["win2_prob"] < 1 and r["logprob_A"] < 0 for r in ok)
        assert all(len(r["letter_token_ids"]) == 2 for r in ok)


@pytest.mark.slow
def test_default_model_kill_9_then_resume_equals_uninterrupted_run(tmp_path, default_model_path):
    args = ["simulate", "--prompts-file", EXAMPLE_PROMPTS, "--max-prompts", 4, "--max-new-tokens", 32,
            "--batch-size", 4, "--max-attempts", 2]
    full = run_cli(*args, "--out-dir", tmp_path / "full")
    assert full.returncode == 0, full.stderr
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "rlcd", *map(str, args), "--out-dir", str(cut)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = cut / "records-r0-of-1.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not (shard.exists() and shard.read_text().count("\n") >= 1):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(records(cut)) < 4
    resumed = run_cli(*args, "--out-dir", cut)
    assert resumed.returncode == 0, resumed.stderr
    assert records(cut) == records(tmp_path / "full")


@pytest.mark.slow
def test_accelerate_launch_splits_indices_over_processes(tmp_path, tiny_model_dir):
    """Two processes under `accelerate launch` (CPU here) write one shard each; together they hold
    exactly the records of a one-process run."""
    args = ["simulate", "--prompts-file", str(EXAMPLE_PROMPTS), "--model", tiny_model_dir, "--max-new-tokens", "6",
            "--max-attempts", "2", "--accept-eos", "--max-prompts", "20"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlcd"]
    two = subprocess.run([*launcher, *args, "--out-dir", str(tmp_path / "two")], capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "two").glob("records-*")) == ["records-r0-of-2.jsonl", "records-r1-of-2.jsonl"]
    one = run_cli(*args, "--out-dir", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    assert records(tmp_path / "two") == records(tmp_path / "one") and len(records(tmp_path / "one")) == 20


def test_chat_style_and_fast_engine_through_the_cli(tmp_path, tiny_model_dir, task_file, prompts_file):
    base = ["simulate", "--prompts-file", str(prompts_file), "--task", str(task_file), "--model", tiny_model_dir,
            "--max-new-tokens", "6", "--max-attempts", "2", "--max-prompts", "4"]
    main([*base, "--prompt-style", "chat", "--out-dir", str(tmp_path / "chat")])
    rec = records(tmp_path / "chat")[0]
    d = rec["descriptor_index"]
    chosen = rec["actual_prompts"]["chosen"]
    assert f"The reply is: good {['one', 'two'][d]}." in chosen and "<|im_start|>assistant" in chosen
    assert "Question number 0?" in chosen and "Human:" not in chosen
    # the fast engine gives the same records as the plain loop on CPU
    main([*base, "--engine", "fast", "--out-dir", str(tmp_path / "fast")])
    main([*base, "--engine", "hf", "--out-dir", str(tmp_path / "hf")])
    assert records(tmp_path / "fast") == records(tmp_path / "hf")
    assert json.loads((tmp_path / "fast" / "manifest-r0-of-1.json").read_text())["engine"]["engine"] == "fast"


def test_config_file_supplies_flags_and_command_line_wins(monkeypatch, tmp_path, task_file, prompts_file, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"prompts-file: {prompts_file}\ntask: {task_file}\nout_dir: {tmp_path / 'from-config'}\nmax-prompts: 3\n")
    simulate_cli(monkeypatch, ScriptedEngine(), "--config", config, "--max-prompts", 2)
    assert len(records(tmp_path / "from-config")) == 2
    config.write_text("prompts-file: x.json\nbatch-sise: 4\n")
    with pytest.raises(SystemExit) as e:
        simulate_cli(monkeypatch, ScriptedEngine(), "--config", config)
    assert e.value.code == 2
    assert f"{config}: unknown key 'batch-sise'" in capsys.readouterr().err
