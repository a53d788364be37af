"""DDP code paths with 2 CPU processes (gloo) under `accelerate launch`: what can be checked without GPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "reliability"))
from rel_helpers import marker_table  # noqa: E402

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlcd"]


@pytest.mark.slow
def test_train_rm_under_ddp_matches_one_process_with_the_same_effective_batch(tmp_path, tiny_model_dir):
    """2 processes x 4 pairs against 1 process x 4 pairs x 2 accumulation steps: DDP averages the two
    ranks' gradients, which is what accumulation does, so the losses agree; one model and one report."""
    table = marker_table(tmp_path / "t.jsonl", 96)
    flags = ["train-rm", "--data", str(table), "--model", tiny_model_dir, "--eval-pairs", "16", "--max-steps", "10",
             "--batch-size", "4", "--learning-rate", "1e-3", "--bf16", "false", "--seed", "0"]
    # ACCELERATE_USE_CPU: without it the Trainer sees no GPU and trains each process alone (no DDP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    two = subprocess.run([*LAUNCH, *flags, "--gradient-accumulation-steps", "1", "--out-dir", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "rlcd", *flags, "--gradient-accumulation-steps", "2", "--out-dir", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert a["train_steps"] == b["train_steps"] == 10
    assert b["train_loss"] == pytest.approx(a["train_loss"], abs=2e-3)
    assert b["heldout"]["loss"] == pytest.approx(a["heldout"]["loss"], abs=2e-3)
    assert a["heldout"]["accuracy"] >= 0.9 and b["heldout"]["accuracy"] >= 0.9
    assert two.stdout.count("trained on") == 1  # only the main process reports and writes
    assert not (tmp_path / "two" / "checkpoints").exists()


@pytest.mark.slow
def test_ppo_with_two_processes_equals_one_process(tmp_path, tiny_model_dir):
    """Each process samples, scores and runs forward passes on half of every step's rollouts and half of
    each minibatch's micro-batches; gathered rollouts and summed gradients make it the one-process run."""
    from safetensors.torch import load_file

    from rel_helpers import make_ppo_models, question_file

    policy, rm = make_ppo_models(tiny_model_dir, tmp_path)
    prompts = question_file(tmp_path / "q.json", 24)
    flags = ["ppo", "--prompts", str(prompts), "--policy", policy, "--reward-model", rm, "--steps", "3", "--rollouts", "8",
             "--minibatch-size", "4", "--micro-batch-size", "1", "--max-new-tokens", "8", "--accept-eos",
             "--learning-rate", "1e-3", "--seed", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    two = subprocess.run([*LAUNCH, *flags, "--out-dir", str(tmp_path / "two")], capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "rlcd", *flags, "--out-dir", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    logs = [[json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("one", "two")]
    assert len(logs[0]) == len(logs[1]) == 3 and two.stdout.count("step 3/3") == 1
    for a, b in zip(*logs):
        assert 0 < a["missing_marker_frac"] < 1 and b["missing_marker_frac"] == a["missing_marker_frac"]
        for key in ("score_mean", "kl", "response_length", "value_loss", "policy_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert all(torch_allclose(a[k], b[k]) for k in a)
    assert any(not (a[k] == load_file(Path(policy) / "model.safetensors")[k]).all() for k in a)  # it trained


def torch_allclose(x, y) -> bool:
    import torch

    return torch.allclose(x, y, atol=1e-5, rtol=1e-4)
