"""benchmarks/ppo.py's --cpu-smoke --levers on a tiny random Llama (CPU, seconds): the script runs, each lever is timed
against none, the levers that only batch differently give the same losses, and --shared-value-head trains a value
model that is only a head."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "ppo.py"


def test_cpu_smoke_times_every_lever_and_the_batching_levers_keep_the_losses(monkeypatch):
    spec = importlib.util.spec_from_file_location("ppo_benchmark", BENCHMARK)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = []
    monkeypatch.setattr(bench, "measure_levers", lambda *a, real=bench.measure_levers: results.append(real(*a)) or results[-1])
    monkeypatch.setattr(sys, "argv", ["ppo.py", "--cpu-smoke", "--levers"])
    bench.main()
    [result] = results
    levers = result["levers"]
    assert set(levers) == set(bench.LEVERS) and all(len(v["train_seconds"]) == result["repeats"] for v in levers.values())
    for name in ("sort-by-length", "gradient-checkpointing", "both"):
        assert levers[name]["losses"]["policy_loss"] == pytest.approx(levers["neither"]["losses"]["policy_loss"], rel=1e-4, abs=1e-7)
    shared = levers["shared-value-head"]["losses"]
    assert shared["kl"] == levers["neither"]["losses"]["kl"]  # the same rollouts and policy; only the value model differs
    assert shared["value_loss"] != levers["neither"]["losses"]["value_loss"] or shared["grad_norm"] != levers["neither"]["losses"]["grad_norm"]
