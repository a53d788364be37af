"""Benchmark: a CPU model's vocabulary projection as nn.Linear computes it (h @ W.T) against the vocabulary first ((W @ h.T).T).

The engines compute a float32 CPU model's output projection vocabulary-first (`rlcd.engines.hf.vocabulary_rows_first`):
the same logits, and with tens of thousands of vocabulary rows and few positions a CPU runs it faster (the engines do it
up to `VOCAB_FIRST_ROWS` positions, above that it is nn.Linear; without gradients a block of vocabulary rows at a time,
so that each block's transpose is written while it is still in cache). This times nn.Linear against the engines' own
forward, on the default model's projection shape (49,152 x 576, random float32 weights, so no model download is needed) at the
row counts the demo uses (8 rows: a PPO rollout step; 128: simulation's decode batch; 112: a PPO micro-batch's response
positions), forward alone and forward plus the input gradient (PPO's updates), alternating the two ways each round.
The hardware limit printed beside each: the time to read the weights once at the machine's memory read speed or to do
the multiply-adds at its 1024² matmul speed, whichever is longer, both measured here.

    python benchmarks/vocab_projection.py            # ~1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from rlcd.engines.hf import vocabulary_rows_first

ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN = 49152, 576  # SmolLM2-135M's output projection


def seconds(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32, 112, 128, 256, 512])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vocab_projection_cpu.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    engine_head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    engine_head.weight = head.weight
    vocabulary_rows_first(SimpleNamespace(get_output_embeddings=lambda: engine_head))  # the engines' own forward, as they set it up
    ways = {"nn.Linear": lambda h: torch.nn.functional.linear(h, head.weight), "vocab_first": engine_head}
    big = torch.randn(64 * 1024 * 1024)  # 256 MB
    read_gbs = big.numel() * 4 / seconds(big.sum, 5) / 1e9
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    gflops = 2 * 1024**3 / seconds(lambda: a @ b, 20) / 1e9
    rows_out = []
    print(f"{'rows':>5} {'pass':<9} {'nn.Linear ms':>13} {'vocab_first ms':>15} {'speed-up':>9} {'limit ms':>9} {'of limit':>9}")
    for n in args.rows:
        hidden = torch.randn(n, HIDDEN, requires_grad=True)
        grad = torch.randn(n, VOCAB)
        repeat = max(2, int(2e9 / (2 * n * HIDDEN * VOCAB)))
        for kind in ("forward", "fwd+bwd"):
            times: dict[str, list[float]] = {w: [] for w in ways}
            for _ in range(args.rounds):
                for name, way in ways.items():
                    if kind == "forward":
                        with torch.no_grad():
                            times[name].append(seconds(lambda: way(hidden), repeat))
                    else:
                        times[name].append(seconds(lambda: torch.autograd.grad(way(hidden), hidden, grad), repeat))
            median = {w: statistics.median(t) for w, t in times.items()}
            flops = 2 * n * HIDDEN * VOCAB * (1 if kind == "forward" else 2)
            limit = max(VOCAB * HIDDEN * 4 / (read_gbs * 1e9), flops / (gflops * 1e9))
            speedup = median["nn.Linear"] / median["vocab_first"]
            rows_out.append({"rows": n, "pass": kind, "nn_linear_ms": median["nn.Linear"] * 1e3, "vocab_first_ms": median["vocab_first"] * 1e3,
                             "speedup": speedup, "limit_ms": limit * 1e3, "vocab_first_of_limit": limit / median["vocab_first"],
                             "runs_ms": {w: [x * 1e3 for x in t] for w, t in times.items()}})
            print(f"{n:>5} {kind:<9} {median['nn.Linear'] * 1e3:>13.1f} {median['vocab_first'] * 1e3:>15.1f} {speedup:>8.2f}x "
                  f"{limit * 1e3:>9.1f} {limit / median['vocab_first']:>8.0%}")
    result = {"benchmark": "vocab_projection", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": {
                  "platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                  "torch": torch.__version__, "threads": torch.get_num_threads(), "matmul_1024_fp32_gflops": round(gflops, 1),
                  "memory_read_gbs": round(read_gbs, 1)},
              "shape": [VOCAB, HIDDEN], "dtype": "float32", "rounds": args.rounds, "results": rows_out}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"matmul {gflops:.0f} GFLOP/s, memory read {read_gbs:.1f} GB/s\n{args.out}")


if __name__ == "__main__":
    main()
