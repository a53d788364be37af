"""Multi-process code paths with 2 CPU processes (gloo) under `accelerate launch` and the shipped
configs/accelerate files: what can be checked without GPUs (docs/multi-gpu.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "reliability"))
from rel_helpers import marker_table  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp.yaml"), "--num_processes", "2",
          "-m", "rlcd"]
# FSDP for real on CPU: accelerate enables it for GPUs only, fsdp_on_cpu.py lifts that gate (see its docstring)
FSDP_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp.yaml"), "--num_processes", "2",
               str(Path(__file__).resolve().parent / "fsdp_on_cpu.py")]


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
    from rel_helpers import make_ppo_models, question_file
    from safetensors.torch import load_file

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


@pytest.mark.slow
def test_train_rm_under_fsdp_checkpoints_resumes_and_saves_a_plain_model_equal_to_one_process(tmp_path, tiny_model_dir):
    """FSDP2 full sharding (configs/accelerate/fsdp.yaml): a run cut after its first checkpoint resumes from the
    sharded checkpoint; the saved model is a plain Hugging Face model equal to the one-process run's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    table = marker_table(tmp_path / "t.jsonl", 96)
    flags = ["train-rm", "--data", str(table), "--model", tiny_model_dir, "--eval-pairs", "16", "--max-steps", "10", "--save-steps", "4",
             "--batch-size", "4", "--learning-rate", "1e-3", "--bf16", "false", "--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    two, one = tmp_path / "two", tmp_path / "one"
    cut = subprocess.run([*FSDP_LAUNCH, *flags, "--gradient-accumulation-steps", "1", "--out-dir", str(two)],
                         capture_output=True, text=True, timeout=600, env={**env, "RLCD_TEST_STOP_AT_STEP": "6"})
    assert cut.returncode != 0 and (two / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists(), cut.stderr[-3000:]
    assert not (two / "metrics.json").exists()
    resumed = subprocess.run([*FSDP_LAUNCH, *flags, "--gradient-accumulation-steps", "1", "--out-dir", str(two), "--resume"],
                             capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("trained on") == 1 and not (two / "checkpoints").exists()
    assert json.loads((two / "manifest.json").read_text())["resumed_from"].endswith("checkpoint-4")
    single = subprocess.run([sys.executable, "-m", "rlcd", *flags, "--gradient-accumulation-steps", "2", "--out-dir", str(one)],
                            capture_output=True, text=True, timeout=600, env=env)
    assert single.returncode == 0, single.stderr[-3000:]

    a, b = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert a["train_steps"] == b["train_steps"] == 10
    assert b["heldout"]["loss"] == pytest.approx(a["heldout"]["loss"], abs=1e-4)
    assert b["heldout"]["accuracy"] == a["heldout"]["accuracy"] >= 0.9
    weights_one, weights_two = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert weights_one.keys() == weights_two.keys() and all(torch_allclose(weights_one[k], weights_two[k]) for k in weights_one)
    model = AutoModelForSequenceClassification.from_pretrained(two)  # stock transformers, no accelerate or FSDP
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None


@pytest.mark.slow
def test_sft_under_fsdp_equals_one_process(tmp_path, tiny_model_dir):
    """TRL's SFTTrainer under FSDP2 saves a plain causal LM with the one-process run's weights."""
    from safetensors.torch import load_file

    table = marker_table(tmp_path / "t.jsonl", 48)
    flags = ["sft", "--data", str(table), "--model", tiny_model_dir, "--max-steps", "4", "--batch-size", "2", "--max-length", "64",
             "--learning-rate", "1e-3", "--bf16", "false", "--save-steps", "0", "--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    two = subprocess.run([*FSDP_LAUNCH, *flags, "--gradient-accumulation-steps", "1", "--out-dir", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "rlcd", *flags, "--gradient-accumulation-steps", "2", "--out-dir", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.stdout.count("sft: 4 steps") == 1
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    start = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch_allclose(a[k], b[k]) for k in a)
    assert any(not torch_allclose(a[k], start[k]) for k in start)  # it trained


def test_lora_under_fsdp_is_refused_in_one_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """--lora merges the adapters on the main process alone, which a model sharded over the processes cannot do
    (it failed at the merge, after training, before this check): refused before training, for every Trainer stage."""
    from rlcd.cli import main

    table = marker_table(tmp_path / "t.jsonl", 8)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets for configs/accelerate/fsdp.yaml
    for stage, extra in (("train-rm", ["--eval-pairs", "2"]), ("sft", [])):
        with pytest.raises(SystemExit) as exit_info:
            main([stage, "--data", str(table), "--model", tiny_model_dir, "--out-dir", str(tmp_path / stage), "--lora", *extra])
        assert exit_info.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]  # after the model-loading progress bar
        assert last.startswith(f"rlcd {stage}: error: --lora under FSDP is not supported") and "ddp.yaml" in last


def torch_allclose(x, y) -> bool:
    import torch

    return torch.allclose(x, y, atol=1e-5, rtol=1e-4)
