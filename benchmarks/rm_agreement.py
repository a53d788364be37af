"""Experiment: agreement with human labels of reward models trained on RLCD vs RLAIF pairs (paper Table 5).

End to end, resumable (every stage skips what it already wrote), one process per stage
through the `rlcd` CLI:

  prompts   first-turn hh-rlhf train prompts, de-duplicated, minus those whose first turn
            starts a test dialogue
  simulate  rlcd and rlaif pairs per task (harmless, helpful) with the simulator model
  consolidate, train-rm (same model as backbone), eval-rm on every pair of the task's test file

Writes a JSON with every figure and a Markdown table beside it. Run on a GPU:

    python benchmarks/rm_agreement.py --data-dir DATA --work-dir /tmp/rm-exp \
        --num-prompts 2600 --max-new-tokens 128 --accept-eos
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER = {  # Table 5, 7B simulator: accuracy % / mean probability of the human-preferred response
    ("harmless", "rlaif"): (35.6, 0.492), ("harmless", "rlcd"): (52.4, 0.516),
    ("helpful", "rlaif"): (60.6, 0.508), ("helpful", "rlcd"): (64.4, 0.601),
}


def rlcd(*args, log: Path) -> None:
    cmd = [sys.executable, "-m", "rlcd", *map(str, args)]
    print("$", " ".join(cmd), flush=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        print(log.read_text()[-3000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")


def length_baseline(test_file: Path) -> float:
    """Share of test pairs where the human-preferred final response is the longer one (a length-only 'reward model')."""
    from rlcd.reward import read_hh_pairs

    pairs, _, _ = read_hh_pairs(test_file, None)
    return sum(len(c) > len(r) for c, r in pairs) / len(pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="folder with hh-rlhf/ and hh-rlhf-train-first-turn-prompts/ (the shared data)")
    p.add_argument("--work-dir", required=True)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tasks", default="harmless,helpful")
    p.add_argument("--methods", default="rlcd,rlaif")
    p.add_argument("--num-prompts", type=int, default=2600)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--accept-eos", action="store_true")
    p.add_argument("--rm-args", default="--learning-rate 1e-5 --batch-size 16 --gradient-accumulation-steps 1 --eval-pairs 200",
                   help="extra flags for rlcd train-rm")
    p.add_argument("--num-test-pairs", type=int, default=100000, help="score the first N test pairs (default: all)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/rm_agreement.json"))
    args = p.parse_args()

    data, work = Path(args.data_dir), Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    results = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    results.setdefault("runs", {})
    for task in args.tasks.split(","):
        prompts = data / "hh-rlhf-train-first-turn-prompts" / f"{task}-base_train_first20000_first_turn.json.gz"
        test = data / "hh-rlhf" / f"{task}-base" / "test.jsonl.gz"
        results.setdefault("length_baseline", {})[task] = round(length_baseline(test), 4)
        for method in args.methods.split(","):
            key = f"{task}/{method}"
            run_dir = work / task / method
            timings = results["runs"].get(key, {}).get("seconds", {})
            stages = [
                ("simulate", lambda: rlcd("simulate", "--prompts-file", prompts, "--dedupe", "--exclude-prompts", test,
                                          "--max-prompts", args.num_prompts, "--task", task, "--method", method,
                                          "--model", args.model, "--out-dir", run_dir / "sim", "--batch-size", args.batch_size,
                                          "--max-new-tokens", args.max_new_tokens, *(["--accept-eos"] if args.accept_eos else []), log=log)),
                ("consolidate", lambda: rlcd("consolidate", "--in-dir", run_dir / "sim", "--out-csv", run_dir / "table.csv",
                                             "--data-type", method, log=log)),
                ("train-rm", lambda: (run_dir / "rm" / "metrics.json").exists() or rlcd(
                    "train-rm", "--data", run_dir / "table.csv", "--model", args.model, "--out-dir", run_dir / "rm",
                    "--resume", *args.rm_args.split(), log=log)),
                ("eval-rm", lambda: (run_dir / "eval.json").exists() or rlcd(
                    "eval-rm", "--model-path", run_dir / "rm", "--data-path", test, "--num-pairs", args.num_test_pairs,
                    "--batch-size", 64, "--out-file", run_dir / "eval.json", log=log)),
            ]
            for name, stage in stages:
                start = time.time()
                stage()
                timings[name] = round(timings.get(name, 0) + time.time() - start, 1)
            sim_counts = json.loads((run_dir / "sim" / "manifest-r0-of-1.json").read_text())["counts"]
            table = json.loads((run_dir / "table.csv.manifest.json").read_text())["counts"]
            evaluation = json.loads((run_dir / "eval.json").read_text())
            metrics = json.loads((run_dir / "rm" / "metrics.json").read_text())
            results["runs"][key] = {
                "simulation": sim_counts, "table": table, "seconds": timings,
                "rm_train": {k: metrics.get(k) for k in ("train_loss", "heldout", "pairs")},
                "agreement": evaluation, "paper_7b": PAPER.get((task, method)),
            }
            save(results, args)
    save(results, args)


def save(results: dict, args) -> None:
    import torch

    results["machine"] = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                          "torch": torch.__version__, "platform": platform.platform()}
    results["command"] = " ".join(["python"] + sys.argv)
    results["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| task | method | pairs | acceptance | mean chars chosen / rejected | RM train loss | agreement (95% CI) | mean P(human-preferred) | paper 7B |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, r in results["runs"].items():
        a, t = r["agreement"], r["table"]
        ci = a.get("accuracy_ci95") or [None, None]
        paper = r["paper_7b"]
        lines.append(f"| {key.replace('/', ' | ')} | {t['pairs']} | {r['simulation']['acceptance_rate']} | "
                     f"{t['mean_chars_chosen']} / {t['mean_chars_rejected']} | {r['rm_train'].get('train_loss')} | "
                     f"{a['accuracy'] * 100:.1f}% ({ci[0] * 100:.1f}–{ci[1] * 100:.1f}) | {a['mean_prob']:.3f} | "
                     f"{f'{paper[0]}% / {paper[1]}' if paper else '—'} |")
    lines.append("")
    lines.append("Length-only baseline (the longer response wins): " + ", ".join(
        f"{t} {v * 100:.1f}%" for t, v in results.get("length_baseline", {}).items()))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
