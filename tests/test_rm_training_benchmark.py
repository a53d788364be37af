"""benchmarks/rm_training.py end to end on a tiny random Llama (CPU, seconds): both trainers run the
requested steps, and the token counts are exactly the real tokens of the pairs each trainer sees."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "rm_training.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("rm_training_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_both_trainers_and_counts_real_tokens(bench, tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from transformers import AutoTokenizer

    from rlcd.reward import format_rm_input

    steps, batch = 3, 2
    out = tmp_path / "result.json"
    monkeypatch.setattr(sys, "argv", ["rm_training.py", "--synthetic", "10", "--steps", str(steps), "--warmup-steps", "0",
                                      "--batch-size", str(batch), "--model", tiny_model_dir, "--threads", "1", "--out", str(out)])
    bench.main()
    result = json.loads(out.read_text())
    ours, trl = result["results"]["ours"], result["results"]["trl"]

    # every pair is seen once (steps x batch of the 10 rows); all steps timed with --warmup-steps 0
    rows = bench.synthetic_rows(10, seed=42)[: steps * batch]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def n(text: str) -> int:
        return len(tok(text)["input_ids"])

    ours_tokens = sum(n(format_rm_input(r["instruction"], r["output_1"])) + n(format_rm_input(r["instruction"], r["output_2"])) for r in rows)
    trl_tokens = sum(n(f"{r['instruction'].rstrip()} {r[k].strip()}{tok.eos_token}") for r in rows for k in ("output_1", "output_2"))
    for r, expected in ((ours, ours_tokens), (trl, trl_tokens)):
        assert r["timed_steps"] == steps and r["pairs"] == steps * batch
        assert r["tokens"] == expected
        assert 0 < r["padding_efficiency"] <= 1 and r["tokens_per_s"] > 0
    assert ours["computed_tokens"] < ours["tokens"] and trl["computed_tokens"] == trl["tokens"]  # ours packs each pair in a row
    assert ours["settings"]["gradient_checkpointing"] is False  # train-rm's default
    assert trl["settings"]["gradient_checkpointing"] is True  # TRL's default
    assert result["machine"]["name"] == "cpu" and ours["mfu"] is None
    assert result["speedup_tokens_per_s_ours_over_trl"] == pytest.approx(ours["tokens_per_s"] / trl["tokens_per_s"])


def test_synthetic_rows_have_realistic_lengths(bench):
    rows = bench.synthetic_rows(20, seed=1)
    assert rows == bench.synthetic_rows(20, seed=1)
    for r in rows:
        assert r["instruction"].startswith("\n\nHuman: ") and r["instruction"].endswith("\n\nAssistant:")
        assert 30 <= len(r["instruction"].split()) - 2 <= 50
        assert all(60 <= len(r[k].split()) <= 120 for k in ("output_1", "output_2"))
        assert r["preference"] in (1, 2)
