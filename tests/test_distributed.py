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
