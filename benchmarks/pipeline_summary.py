"""Summarise a pipeline run directory into one JSON (and a Markdown table) for benchmarks/results/.

Per system: mean reward-model score of its test outputs with the standard error, mean tokens and
words, empty outputs, finish reasons; per reward model: agreement with human labels; per PPO run:
the first and last logged steps; per comparison: the judge's summary.

    python benchmarks/pipeline_summary.py RUN_DIR --out benchmarks/results/pipeline_harmless.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

KEEP = ("step", "score_mean", "reward_mean", "kl", "entropy", "response_length", "missing_marker_frac", "time_step")


def summarise(run: Path) -> dict:
    systems = {}
    for path in sorted((run / "outputs").glob("*.scored.json")):
        items = json.loads(path.read_text())
        scores = [x["score"] for x in items]
        systems[path.name.removesuffix(".scored.json")] = {
            "outputs": len(items),
            "mean_score": round(statistics.mean(scores), 4),
            "score_sem": round(statistics.stdev(scores) / len(scores) ** 0.5, 4),
            "mean_tokens": round(statistics.mean(x["num_tokens"] for x in items), 1),
            "mean_words": round(statistics.mean(len(x["output"].split()) for x in items), 1),
            "empty": sum(not x["output"].strip() for x in items),
            "finish_reasons": dict(Counter(x["finish_reason"] for x in items)),
        }
    reward_models = {p.parent.name: {k: json.loads(p.read_text())[k] for k in ("pairs", "accuracy", "accuracy_ci95", "mean_prob")}
                     for p in sorted((run / "rm").glob("*/eval.json"))}
    ppo = {}
    for p in sorted((run / "policy").glob("*/log.jsonl")):
        steps = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        ppo[p.parent.name] = {"first": {k: steps[0][k] for k in KEEP}, "last": {k: steps[-1][k] for k in KEEP},
                              "mean_step_seconds_after_2": round(statistics.mean(s["time_step"] for s in steps[2:]), 2)}
    compare = {p.stem: json.loads(p.read_text())["summary"] for p in sorted((run / "compare").glob("*-vs-*.json"))
               if not p.name.endswith((".manifest.json",))}
    return {"run": str(run), "systems": systems, "reward_models": reward_models, "ppo": ppo, "compare": compare}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    result = summarise(Path(args.run_dir))
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| system | mean RM score (± s.e.) | mean tokens | mean words | empty | finish: eos / stop / length |", "|---|---|---|---|---|---|"]
    for name, s in result["systems"].items():
        f = s["finish_reasons"]
        lines.append(f"| {name} | {s['mean_score']:.3f} (± {s['score_sem']:.3f}) | {s['mean_tokens']} | {s['mean_words']} | {s['empty']} "
                     f"| {f.get('eos', 0)} / {f.get('stop', 0)} / {f.get('length', 0)} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(out)


if __name__ == "__main__":
    main()
