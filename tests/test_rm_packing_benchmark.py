"""benchmarks/rm_packing.py's CPU smoke run: both layouts timed, each pair's tokens counted once where packed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "rm_packing.py"


def test_rm_packing_benchmark_times_both_layouts(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("rm_packing_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("RLCD_BENCH_OUT", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["rm_packing.py"])
    result = json.loads(module.main().read_text())
    assert result["machine"]["device"] == "cpu" and set(result["results"]) == {"smollm2-135m batch 8", "smollm2-135m batch 16"}
    for row in result["results"].values():
        assert row["padded_ms"] > 0 and row["packed_ms"] > 0 and row["speedup"] == round(row["padded_ms"] / row["packed_ms"], 3)
        assert row["packed_tokens"] < row["tokens"]  # the conversation once per pair
