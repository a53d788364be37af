"""kill -9 at random moments, then resume: the final records (or reward model) equal an uninterrupted
run with the same seeds, with nothing lost and nothing duplicated.

Kill times are drawn from a fixed seed per case (printed on failure), so a failure can be replayed.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from rel_helpers import (
    ONE_THREAD,
    assert_whole_lines,
    env,
    kill_9,
    make_ppo_models,
    marker_table,
    question_file,
    records,
    rlcd_cmd,
    run,
    scripted_cmd,
    scripted_simulate,
)

from rlcd.files import load_shard


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Poll until predicate() holds; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "timed out waiting for the process"
        time.sleep(0.01)
    return True


def running(manifest: Path):
    def check() -> bool:
        try:
            return json.loads(manifest.read_text())["status"] == "running"
        except (OSError, ValueError, KeyError):
            return False
    return check


def kill_and_resume(cmd: list[str], out: Path, kill_after: list[float], extra_env: dict) -> list[str]:
    """Start cmd, kill -9 it kill_after[i] s after it began simulating, restart, ...; then run it to the end.
    Returns what each kill hit, for the failure message. After every kill the shard is checked:
    whole lines except perhaps a torn last one, and no index twice."""
    shard, manifest = out / "records-r0-of-1.jsonl", out / "manifest-r0-of-1.json"
    log = []
    for delay in kill_after:
        manifest.unlink(missing_ok=True)
        proc = subprocess.Popen(cmd, env=env(**extra_env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if wait_for(running(manifest), proc):
            time.sleep(delay)
        alive = proc.poll() is None
        kill_9(proc)
        assert alive or proc.returncode == 0, proc.stderr.read()[-3000:]
        done = load_shard(shard)  # tolerates the torn last line a kill may leave
        dup = [i for i, c in Counter(r["index"] for r in done).items() if c > 1]
        assert not dup, f"duplicated indices {dup} after kills at {kill_after}"
        log.append(f"kill at +{delay:.2f}s: {'interrupted' if alive else 'already finished'}, {len(done)} records")
    final = run(cmd, env=env(**extra_env))
    assert final.returncode == 0, final.stderr[-3000:]
    assert_whole_lines(shard)
    return log


@pytest.mark.parametrize("seed", [1, 2])
def test_scripted_simulate_survives_random_kills(tmp_path, seed):
    """Five kill -9 at random moments of a run (scripted engine, 0.15 s per batch), each followed by a restart."""
    prompts = question_file(tmp_path / "q.json", 40)
    flags = ["--prompts-file", prompts, "--batch-size", 2, "--max-attempts", 3, "--method", "rlaif"]
    scripted_simulate(*flags, "--out-dir", tmp_path / "full")
    rng = random.Random(seed)
    kills = [rng.uniform(0.0, 0.6) for _ in range(5)]
    log = kill_and_resume(scripted_cmd(*flags, "--out-dir", tmp_path / "cut"), tmp_path / "cut", kills, {"RLCD_TEST_DELAY": 0.15})
    assert any("interrupted" in line for line in log), log
    assert records(tmp_path / "cut") == records(tmp_path / "full"), log
    manifest = json.loads((tmp_path / "cut" / "manifest-r0-of-1.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["ok"] + manifest["counts"]["failed"] == 40


@pytest.fixture(scope="module")
def eos_prone_model(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny random Llama, rewired so that every step ends the turn (EOS) with probability ~1/3:
    with --accept-eos some samples are accepted, some rejected (empty, or too long), as with a real model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream keeps the token embedding only
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 4.0  # one large direction in every embedding: after the norm, ~sqrt(hidden)
        eos, hidden = model.config.eos_token_id, model.config.hidden_size
        model.lm_head.weight[eos] = 0
        # EOS logit ln 50 against ~0.4 for the 49 others that top-k 50 (the default) keeps: P(EOS) ~ 1/3 per step
        model.lm_head.weight[eos, 0] = math.log(50) / hidden**0.5 / model.model.norm.weight[0]
    out = tmp_path_factory.mktemp("eos-prone")
    model.save_pretrained(out)
    for f in Path(tiny_model_dir).glob("*token*"):
        (out / f.name).write_bytes(f.read_bytes())
    return str(out)


def test_tiny_model_simulate_survives_random_kills(tmp_path, eos_prone_model):
    """Real engine (tiny model, CPU) in a subprocess: three kill -9 at random moments, then resume."""
    prompts = question_file(tmp_path / "q.json", 40)
    flags = ["simulate", "--prompts-file", prompts, "--model", eos_prone_model, "--accept-eos", "--max-new-tokens", 8,
             "--batch-size", 2, "--max-attempts", 3, "--seed", 7]
    full = run(rlcd_cmd(*flags, "--out-dir", tmp_path / "full"), env=env(**ONE_THREAD))
    assert full.returncode == 0, full.stderr[-3000:]
    statuses = Counter(r["status"] for r in records(tmp_path / "full"))
    assert statuses["ok"] >= 5 and statuses["failed"] >= 1, statuses  # the records are not trivial
    rng = random.Random(3)
    log = kill_and_resume(rlcd_cmd(*flags, "--out-dir", tmp_path / "cut"), tmp_path / "cut", [rng.uniform(0, 1.0) for _ in range(3)], ONE_THREAD)
    assert any("interrupted" in line for line in log), log
    assert records(tmp_path / "cut") == records(tmp_path / "full"), log


def test_train_rm_kill_9_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir):
    """kill -9 of `rlcd train-rm` at random moments after a checkpoint exists (training, saving, the final
    save and held-out scoring), twice, then --resume: the same reward model as an uninterrupted run."""
    table = marker_table(tmp_path / "t.jsonl")
    flags = ["train-rm", "--data", table, "--model", tiny_model_dir, "--eval-pairs", 8, "--max-steps", 16, "--save-steps", 2,
             "--batch-size", 4, "--gradient-accumulation-steps", 1, "--learning-rate", "1e-3", "--bf16", "false"]
    straight = run(rlcd_cmd(*flags, "--out-dir", tmp_path / "straight"), env=env(**ONE_THREAD))
    assert straight.returncode == 0, straight.stderr[-3000:]
    cut = tmp_path / "cut"
    rng, log = random.Random(5), []
    for attempt in range(2):
        cmd = rlcd_cmd(*flags, "--out-dir", cut, *(["--resume"] if attempt else []))
        proc = subprocess.Popen(cmd, env=env(**ONE_THREAD), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert wait_for(lambda: any((cut / "checkpoints").glob("checkpoint-*/trainer_state.json")), proc) or proc.returncode == 0, \
            proc.stderr.read()[-3000:]
        delay = rng.uniform(0, 0.8)
        time.sleep(delay)
        log.append(f"kill at +{delay:.2f}s after a checkpoint: {'interrupted' if proc.poll() is None else 'already finished'}")
        kill_9(proc)
    assert "interrupted" in log[0], log
    resumed = run(rlcd_cmd(*flags, "--out-dir", cut, "--resume"), env=env(**ONE_THREAD))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.strip().splitlines()[-1] == str(cut)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "straight", cut))
    assert b["train_steps"] == 16 and not (cut / "checkpoints").exists(), log
    assert b["heldout"]["loss"] == pytest.approx(a["heldout"]["loss"], rel=1e-4), log
    assert b["heldout"]["accuracy"] == a["heldout"]["accuracy"], log


def test_train_rm_resumes_past_a_checkpoint_cut_short(tmp_path, tiny_model_dir):
    """A kill while the Trainer writes a checkpoint leaves it without trainer_state.json (written last):
    --resume takes the last complete checkpoint and removes the partial one."""
    import shutil

    table = marker_table(tmp_path / "t.jsonl")
    flags = ["train-rm", "--data", table, "--model", tiny_model_dir, "--eval-pairs", 8, "--max-steps", 8, "--save-steps", 2,
             "--batch-size", 4, "--gradient-accumulation-steps", 1, "--learning-rate", "1e-3", "--bf16", "false"]
    straight = run(rlcd_cmd(*flags, "--out-dir", tmp_path / "straight"), env=env(**ONE_THREAD))
    assert straight.returncode == 0, straight.stderr[-3000:]
    cut = tmp_path / "cut"
    ckpts = cut / "checkpoints"
    proc = subprocess.Popen(rlcd_cmd(*flags, "--out-dir", cut), env=env(**ONE_THREAD), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: any(ckpts.glob("checkpoint-*/trainer_state.json")), proc)
    kill_9(proc)
    complete = sorted(int(d.parent.name.split("-")[1]) for d in ckpts.glob("checkpoint-*/trainer_state.json"))
    last = complete[-1]
    assume_partial = ckpts / f"checkpoint-{last + 2}"  # what a kill in the middle of the next save leaves
    shutil.rmtree(assume_partial, ignore_errors=True)
    assume_partial.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(ckpts / f"checkpoint-{last}" / f, assume_partial / f)
    resumed = run(rlcd_cmd(*flags, "--out-dir", cut, "--resume"), env=env(**ONE_THREAD))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoint-{last + 2}: a checkpoint the previous run did not finish writing" in resumed.stdout
    manifest = json.loads((cut / "manifest.json").read_text())
    assert manifest["resumed_from"].endswith(f"checkpoint-{last}")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "straight", cut))
    assert b["heldout"]["loss"] == pytest.approx(a["heldout"]["loss"], rel=1e-4)


@pytest.fixture(scope="module")
def ppo_models(tiny_model_dir, tmp_path_factory) -> tuple[str, str]:
    return make_ppo_models(tiny_model_dir, tmp_path_factory.mktemp("ppo-models"))


def test_ppo_kill_9_then_resume_equals_uninterrupted(tmp_path, ppo_models):
    """kill -9 of `rlcd ppo` at random moments after its first checkpoint (mid-step, mid-checkpoint, at the
    final save), twice, then --resume: the same per-step log and the same final policy as one run."""
    from safetensors.torch import load_file

    policy, rm = ppo_models
    prompts = question_file(tmp_path / "q.json", 24)
    flags = ["ppo", "--prompts", prompts, "--policy", policy, "--reward-model", rm, "--steps", 6, "--rollouts", 8,
             "--minibatch-size", 4, "--micro-batch-size", 2, "--max-new-tokens", 8, "--save-every", 1, "--accept-eos",
             "--learning-rate", "1e-3", "--seed", 5]
    full = run(rlcd_cmd(*flags, "--out-dir", tmp_path / "full"), env=env(**ONE_THREAD))
    assert full.returncode == 0, full.stderr[-3000:]
    whole = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert 0 < whole[0]["missing_marker_frac"] < 1  # rewards vary, so the policy really trains

    out = tmp_path / "cut"
    rng = random.Random(11)
    hits = []
    for _ in range(2):
        proc = subprocess.Popen(rlcd_cmd(*flags, "--out-dir", out, "--resume"), env=env(**ONE_THREAD),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        started = len(list((out / "checkpoints").glob("step-*"))) if (out / "checkpoints").exists() else 0
        if wait_for(lambda: (out / "checkpoints").exists() and len(list((out / "checkpoints").glob("step-*"))) > started, proc):
            time.sleep(rng.uniform(0, 0.8))
        alive = proc.poll() is None
        kill_9(proc)
        hits.append("interrupted" if alive else "finished")
    final = run(rlcd_cmd(*flags, "--out-dir", out, "--resume"), env=env(**ONE_THREAD))
    assert final.returncode == 0, final.stderr[-3000:]
    times = {"time_rollout", "time_score", "time_forward", "time_train", "time_step"}
    resumed = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in s.items() if k not in times} for s in resumed] == \
           [{k: v for k, v in s.items() if k not in times} for s in whole], hits
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a), hits
    assert "interrupted" in hits
