"""Limits: prompts longer than the model's context are skipped and counted (the policy: never truncated,
since a cut dialogue is a different prompt); absurd settings are refused up front in one line, before
anything is loaded or written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rel_helpers import assert_user_error, cli, records, scripted_simulate

from rlcd.cli import main
from rlcd.simulate import TOO_LONG


@pytest.fixture(scope="module")
def short_context_model(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny random Llama, declared with a 96-token context."""
    out = tmp_path_factory.mktemp("short-context")
    for f in Path(tiny_model_dir).iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 96}))
    return str(out)


def test_prompts_over_the_context_are_skipped_and_counted(tmp_path, short_context_model):
    questions = [f"Question {i}?" if i % 3 else f"A long question {i}: " + "blah " * 80 for i in range(9)]
    prompts = tmp_path / "q.json"
    prompts.write_text(json.dumps(questions))
    out = tmp_path / "out"
    main(["simulate", "--prompts-file", str(prompts), "--out-dir", str(out), "--model", short_context_model,
          "--max-new-tokens", "8", "--max-attempts", "1"])
    assert sorted(r["index"] for r in records(out)) == [i for i in range(9) if i % 3]
    counts = json.loads((out / "manifest-r0-of-1.json").read_text())["counts"]
    assert counts["skipped"] == {TOO_LONG: 3} and counts["ok"] + counts["failed"] + 3 == 9


SIMULATE_BAD = [
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--batch-size", "-4"], "--batch-size must be at least 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--max-attempts", "0"], "--max-attempts must be at least 1"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--max-prompts", "0"], "--max-prompts must be at least 1"),
    (["--indices-mod", "0", "--indices-remainder", "0"], "--indices-remainder must be in [0, --indices-mod)"),
    (["--indices-mod", "2", "--indices-remainder", "-1"], "--indices-remainder must be in [0, --indices-mod)"),
    (["--indices-mod", "2"], "--indices-mod and --indices-remainder go together"),
    (["--indices", "9-3"], "--indices: '9-3' is not an index"),
    (["--model", "/no/such/model-dir"], "/no/such/model-dir"),
    (["--backend", "openai"], "--backend openai needs --api-model"),
    (["--backend", "openai", "--base-url", "localhost:8000", "--api-model", "m"], "--base-url localhost:8000: expected http(s) URLs"),
    (["--backend", "openai", "--base-url", "http://127.0.0.1:1/v1", "--api-model", "m", "--concurrency", "0"], "--concurrency must be at least 1"),
    (["--backend", "openai", "--base-url", "http://127.0.0.1:1/v1", "--api-model", "m", "--timeout", "0"], "--timeout must be positive"),
    (["--backend", "openai", "--base-url", "http://127.0.0.1:1/v1", "--api-model", "m", "--max-retries", "-1"], "--max-retries must be >= 0"),
]


@pytest.mark.parametrize("flags,message", SIMULATE_BAD, ids=[" ".join(f) for f, _ in SIMULATE_BAD])
def test_absurd_simulate_settings_are_refused_up_front(tmp_path, flags, message):
    prompts = tmp_path / "q.json"
    prompts.write_text(json.dumps(["Hello?"] * 4))
    code, _, err = cli(["--prompts-file", str(prompts), "--out-dir", str(tmp_path / "out"), *flags], run=lambda a: scripted_simulate(*a))
    assert_user_error((code, err), message)
    assert not (tmp_path / "out").exists()


TRAIN_BAD = [
    (["--learning-rate", "0"], "--learning-rate must be positive"),
    (["--learning-rate=-1e-5"], "--learning-rate must be positive"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--lora-alpha", "0"], "--lora-alpha must be positive"),
    (["--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
    (["--model", "/no/such/model-dir"], "/no/such/model-dir"),
]


@pytest.mark.parametrize("flags,message", TRAIN_BAD, ids=[" ".join(f) for f, _ in TRAIN_BAD])
def test_absurd_train_rm_settings_are_refused_up_front(tmp_path, flags, message):
    table = tmp_path / "t.jsonl"
    table.write_text(json.dumps({"instruction": "p", "input": "", "output_1": "a", "output_2": "b", "preference": 1}) + "\n")
    code, _, err = cli(["train-rm", "--data", str(table), "--out-dir", str(tmp_path / "rm"), "--eval-pairs", "0", *flags])
    assert_user_error((code, err), message)
    assert not (tmp_path / "rm").exists()


@pytest.mark.parametrize("stage,key", [("train-rm", "batch-size"), ("train-rm", "max-length"), ("eval-rm", "num-pairs"),
                                       ("score", "batch-size"), ("train-rm", "bf16")])
def test_out_of_range_values_from_a_config_file_are_one_line(tmp_path, stage, key):
    config = tmp_path / "c.yaml"
    config.write_text(f"{key}: {'maybe' if key == 'bf16' else 0}\n")
    code, _, err = cli([stage, "--config", str(config)])
    assert_user_error((code, err), str(config), f"key '{key}'")


def test_out_of_range_values_on_the_command_line_end_with_one_error_line(tmp_path):
    """argparse's own refusals (cli.py) are one line too: no usage block, no traceback, exit 2."""
    code, _, err = cli(["train-rm", "--batch-size", "0"])
    assert_user_error((code, err), "--batch-size", "expected a positive integer, got 0")
