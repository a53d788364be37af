"""The paper's study at the largest scale one GPU allows (docs/study.md): judges measured against human
labels, preference simulation with real simulators, reward models and their agreement (paper Table 5).

One resumable script, run on one GPU in calls of at most ten minutes: every unit of work (a judge
measurement, a simulation, a table, a reward model, an evaluation) is skipped when its output exists,
and a simulation or reward-model training that was cut off resumes where it stopped. Every finished
unit's figures go into WORK/study.json at once; `--collect OUT` copies that file, a Markdown summary
and the preference tables (tar.gz) into OUT.

    python benchmarks/study.py --data-dir DATA --models-dir MODELS --work-dir /tmp/study \
        --phases simulate,consolidate,rm,judges [--simulators qwen-1.5b,qwen-0.5b] [--rm-backbone qwen-0.5b]
    python benchmarks/study.py --work-dir /tmp/study --collect OUT

DATA holds hh-rlhf/ and hh-rlhf-train-first-turn-prompts/ (the project's shared data); MODELS holds
the GGUF files assembled by scripts/assemble_model.py (qwen2.5-coder-{0.5b,1.5b}-instruct-q4_k_m.gguf).
Simulation runs every (task, method) of one simulator in one process on one engine, so the fast
engine compiles once per simulator rather than once per run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF = {"smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf", "qwen-0.5b": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "qwen-1.5b": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"}
PAPER = {  # Table 5, 7B simulator: accuracy % / mean probability of the human-preferred response
    ("harmless", "rlaif"): (35.6, 0.492), ("harmless", "rlcd"): (52.4, 0.516),
    ("helpful", "rlaif"): (60.6, 0.508), ("helpful", "rlcd"): (64.4, 0.601),
}


class Study:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.results_path = self.work / "study.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        self.log = self.work / "log.txt"

    # -- bookkeeping -------------------------------------------------------------------------------

    def model(self, name: str) -> str:
        path = Path(self.args.models_dir) / GGUF[name]
        return "smollm2" if name == "smollm2" and not path.exists() else str(path)  # the embedded default where installed

    def test_file(self, task: str) -> Path:
        return Path(self.args.data_dir) / "hh-rlhf" / f"{task}-base" / "test.jsonl.gz"

    def prompts_file(self, task: str) -> Path:
        return Path(self.args.data_dir) / "hh-rlhf-train-first-turn-prompts" / f"{task}-base_train_first20000_first_turn.json.gz"

    def refresh(self) -> None:
        """Other study processes may share this work directory: read what they finished."""
        if self.results_path.exists():
            self.results = json.loads(self.results_path.read_text())

    def claim(self, what: str, key: str) -> bool:
        """Whether this process may start a unit no other process has started (a marker file, created exclusively)."""
        marker = self.work / "claims" / f"{what}__{key.replace('/', '__')}"
        marker.parent.mkdir(parents=True, exist_ok=True)
        try:
            marker.open("x").close()
            return True
        except FileExistsError:
            return False

    def save(self, section: str, key: str, value) -> None:
        import fcntl

        with open(self.work / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # read-modify-write: another process may have saved meanwhile
            self.refresh()
            self._save(section, key, value)

    def _save(self, section: str, key: str, value) -> None:
        self.results.setdefault(section, {})[key] = value
        self.results["machine"] = machine()
        self.results.setdefault("commands", [])
        command = " ".join(["python"] + sys.argv)
        if command not in self.results["commands"]:
            self.results["commands"].append(command)
        self.results["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=2) + "\n")
        os.replace(tmp, self.results_path)

    def rlcd(self, *argv) -> str:
        """One `rlcd` command as its own process; its output goes to the log, its stdout is returned."""
        cmd = [sys.executable, "-m", "rlcd", *map(str, argv)]
        print("$", " ".join(cmd), flush=True)
        with open(self.log, "a") as log:
            log.write("$ " + " ".join(cmd) + "\n")
            log.flush()
            result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            log.write(result.stdout)
        if result.returncode != 0:
            print(self.log.read_text()[-3000:])
            raise SystemExit(f"failed: {' '.join(cmd)}")
        return result.stdout

    def units(self):
        """(simulator, task, method, style, prompts) of every simulation asked for."""
        a = self.args
        for simulator in a.simulators.split(","):
            for task in a.tasks.split(","):
                for method in a.methods.split(","):
                    yield simulator, task, method, a.prompt_style, a.num_prompts
            if a.style_slice:  # the other prompt style on a slice, for comparison
                other = "raw" if a.prompt_style == "chat" else "chat"
                for task in a.tasks.split(","):
                    yield simulator, task, "rlcd", other, a.style_slice

    @staticmethod
    def name(simulator, task, method, style, prompts) -> str:
        return f"{simulator}/{task}/{method}/{style}-{prompts}"

    # -- phases ------------------------------------------------------------------------------------

    def simulate(self) -> None:
        from rlcd import simulate
        from rlcd.cli import build_parser

        engines: dict[str, tuple] = {}
        real_make_engine = simulate.make_engine
        for unit in self.units():
            simulator, task, method, style, prompts = unit
            key = self.name(*unit)
            out = self.work / "sim" / key
            if key in self.results.get("simulate", {}):
                continue
            argv = ["simulate", "--prompts-file", self.prompts_file(task), "--dedupe", "--exclude-prompts", self.test_file(task),
                    "--max-prompts", prompts, "--task", task, "--method", method, "--model", self.model(simulator),
                    "--out-dir", out, "--batch-size", self.args.batch_size, "--max-new-tokens", self.args.max_new_tokens,
                    "--prompt-style", style, "--accept-eos", "--max-attempts", self.args.max_attempts, "--seed", 0,
                    "--engine", self.args.engine]
            args = build_parser("simulate").parse_args(list(map(str, argv)))
            first = simulator not in engines
            if first:  # one model and one compiled engine per simulator, shared by its runs
                engines.clear()
                started = time.time()
                engines[simulator] = (*real_make_engine(args), time.time() - started)
            engine, info, load_seconds = engines[simulator]
            simulate.make_engine = lambda _args, e=engine, i=info: (e, i)
            print(f"# simulate {key}", flush=True)
            started = time.time()
            try:
                simulate.run(args)
            finally:
                simulate.make_engine = real_make_engine
            seconds = time.time() - started
            manifest = json.loads(next(out.glob("manifest-*.json")).read_text())
            counts = manifest["counts"]
            self.save("simulate", key, {
                "counts": counts, "seconds": round(seconds, 1), "engine": info, "model_load_seconds": round(load_seconds, 1) if first else 0,
                "pairs_per_hour": round(counts["ok"] / seconds * 3600) if seconds else None,
            })

    def consolidate(self) -> None:
        self.refresh()
        for key in self.results.get("simulate", {}):
            if key in self.results.get("tables", {}):
                continue
            method = key.split("/")[2]
            table = self.work / "tables" / (key.replace("/", "__") + ".csv")
            table.parent.mkdir(parents=True, exist_ok=True)
            stdout = self.rlcd("consolidate", "--in-dir", self.work / "sim" / key, "--out-csv", table, "--data-type", method, "--json")
            self.save("tables", key, {"file": str(table.relative_to(self.work)), **json.loads(stdout.splitlines()[-2])})
        if self.args.drop_refusing_rejected:
            for key, table in list(self.results.get("tables", {}).items()):
                simulator, task, method, style = key.split("/")
                variant = f"{simulator}/{task}/{method}-nrr/{style}"
                if method == "rlcd" and variant not in self.results["tables"]:
                    self.save("tables", variant, drop_refusing_rejected(self.work, table["file"], variant))

    def rm(self) -> None:
        a = self.args
        self.refresh()
        # rlcd and rlaif of the main prompt style first: the comparison the study is about
        order = sorted(self.results.get("tables", {}).items(),
                       key=lambda kv: (kv[0].split("/")[2] not in ("rlcd", "rlaif"), f"/{a.prompt_style}-" not in kv[0]))
        for key, table in order:
            self.refresh()
            if key in self.results.get("reward_models", {}) or table.get("pairs", 0) < a.min_pairs:
                continue
            if not self.claim(f"rm-{a.rm_backbone}", key):
                continue
            task = key.split("/")[1]
            rm_dir = self.work / "rm" / a.rm_backbone / key
            started = time.time()
            if not (rm_dir / "metrics.json").exists():
                self.rlcd("train-rm", "--data", self.work / table["file"], "--model", self.model(a.rm_backbone), "--out-dir", rm_dir,
                          "--resume", "--learning-rate", a.rm_lr, "--batch-size", 16, "--gradient-accumulation-steps", 1,
                          "--eval-pairs", min(200, table["pairs"] // 10), "--save-steps", a.rm_save_steps, "--bf16", a.rm_bf16)
            train_seconds = time.time() - started
            started = time.time()
            result = json.loads(self.rlcd("eval-rm", "--model-path", rm_dir, "--data-path", self.test_file(task),
                                          "--num-pairs", 100000, "--batch-size", 64, "--json",
                                          *(["--dtype", "float32"] if a.rm_bf16 == "false" else [])).splitlines()[0])
            metrics = json.loads((rm_dir / "metrics.json").read_text())
            self.save("reward_models", key, {
                "backbone": a.rm_backbone, "learning_rate": a.rm_lr, "bf16": a.rm_bf16, "train_seconds": round(train_seconds, 1),
                "eval_seconds": round(time.time() - started, 1),
                "train": {k: metrics.get(k) for k in ("train_loss", "heldout", "pairs", "train_runtime")},
                "agreement": result, "paper_7b": PAPER.get((task, key.split("/")[2])),
            })
            # the weights are not kept: a 0.5B reward model is 2 GB and the figures are in study.json
            if not a.keep_models:
                subprocess.run(["rm", "-rf", str(rm_dir)], check=False)

    def judges(self) -> None:
        """`rlcd judge-agreement` for every judge model x mode x prompt format x split, in this process:
        each model is loaded once and lent to the judges of its runs."""
        from rlcd import judge as judging
        from rlcd.cli import parse
        from rlcd.engines.hf import HFEngine
        from rlcd.models import load_causal_lm

        a = self.args
        formats = {"harmless": "harmless", "harmless_helpful": "harmless", "helpful": "helpful"}  # prompt format -> task file
        real_make_judge = judging.make_judge
        for split in a.judge_splits.split(","):
            for name in a.judge_models.split(","):
                engine = None
                for mode in a.judge_modes.split(","):
                    for prompt_format, task in formats.items():
                        key = f"{name}/{mode}/{prompt_format}/{split}"
                        if key in self.results.get("judges", {}):
                            continue
                        out = self.work / "judges" / (key.replace("/", "__") + ".json")
                        argv = ["judge-agreement", "--data-path", self.test_file(task), "--split", split, "--judge",
                                f"hf:{self.model(name)}", "--judge-mode", mode, "--prompt-format", prompt_format,
                                "--out-file", out, "--batch-size", a.judge_batch_size, "--json",
                                *(["--num-pairs", a.judge_pairs] if a.judge_pairs else [])]
                        args = parse(list(map(str, argv)))
                        if engine is None:
                            model, tokenizer = load_causal_lm(self.model(name), None, "auto")
                            engine = HFEngine(model, tokenizer, batch_size=a.judge_batch_size)

                        def make_judge(args, engine=engine):
                            judge = real_make_judge(args)
                            judge.engine = engine  # the loaded model, rather than a second copy
                            return judge

                        judging.make_judge = make_judge
                        started = time.time()
                        try:
                            judging.run_agreement(args)
                        finally:
                            judging.make_judge = real_make_judge
                        figures = {k: v for k, v in json.loads(out.read_text()).items() if k != "pairs"}
                        self.save("judges", key, {**figures, "seconds": round(time.time() - started, 1)})
                del engine

    # -- results -----------------------------------------------------------------------------------

    def collect(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "study.json").write_text(json.dumps(self.results, indent=2) + "\n")
        (out / "study.md").write_text(summary_markdown(self.results))
        tables = self.work / "tables"
        if tables.exists():
            with tarfile.open(out / "tables.tar.gz", "w:gz") as tar:
                tar.add(tables, arcname="tables")
        print((out / "study.md").read_text())


def drop_refusing_rejected(work: Path, file: str, key: str) -> dict:
    """A copy of an rlcd table (any layout `rlcd consolidate` writes) without the pairs whose rejected output
    (the negative prompt's) is a refusal by `rlcd.refusal.is_refusal`: the negative prompt did not elicit
    the attribute it names. Written in the original release's layout."""
    from rlcd.preferences import read_table, write_table
    from rlcd.refusal import is_refusal

    rows, skipped = read_table(work / file)
    kept = [r for r in rows if not is_refusal(r["output_2"] if r["preference"] == 1 else r["output_1"])]
    out = work / "tables" / (key.replace("/", "__") + ".csv")
    write_table([{"instruction": r["prompt"], "input": "", **r} for r in kept], out, scored=False)
    return {"file": str(out.relative_to(work)), "pairs": len(kept), "dropped_refusing_rejected": len(rows) - len(kept),
            "skipped": dict(skipped), "from": file}


def summary_markdown(results: dict) -> str:
    lines = ["| simulation | pairs ok / failed | acceptance | pairs/hour | chosen longer | mean chars chosen / rejected |",
             "|---|---|---|---|---|---|"]
    for key, sim in results.get("simulate", {}).items():
        c, t = sim["counts"], results.get("tables", {}).get(key, {})
        lines.append(f"| {key} | {c['ok']} / {c['failed']} | {c['acceptance_rate']} | {sim['pairs_per_hour']} | "
                     f"{t.get('chosen_longer_share', '')} | {t.get('mean_chars_chosen', '')} / {t.get('mean_chars_rejected', '')} |")
    lines += ["", "| reward model (simulation) | backbone | agreement (95% CI) | mean P | length-only "
                  "| length-matched pairs: agreement (CI), length-only | paper 7B |",
              "|---|---|---|---|---|---|---|"]
    for key, rm in results.get("reward_models", {}).items():
        a = rm["agreement"]
        m = a.get("length_matched") or {}
        ci, mci = a["accuracy_ci95"], m.get("accuracy_ci95", [0, 0])
        lines.append(f"| {key} | {rm['backbone']} | {a['accuracy'] * 100:.1f}% ({ci[0] * 100:.1f}–{ci[1] * 100:.1f}) | {a['mean_prob']:.3f} | "
                     f"{a['length_only'] * 100:.1f}% | {a['length_matched_pairs']}: {m.get('accuracy', 0) * 100:.1f}% "
                     f"({mci[0] * 100:.1f}–{mci[1] * 100:.1f}), {m.get('length_only', 0) * 100:.1f}% | {rm['paper_7b'] or '—'} |")
    judges = results.get("judges", {})
    if judges:
        lines += ["", "| judge | mode | format | split | n | agreement (95% CI) | ties | first position | uninformative |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for key, j in judges.items():
            ci = j.get("ci95") or [0, 0]
            lines.append(f"| {key.replace('/', ' | ')} | {j.get('n')} | {j.get('agreement', 0) * 100:.1f}% ({ci[0] * 100:.1f}–{ci[1] * 100:.1f}) | "
                         f"{j.get('ties')} | {j.get('first_position_rate')} | {j.get('uninformative') or ''} |")
    return "\n".join(lines) + "\n"


def machine() -> dict:
    import torch

    return {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "torch": torch.__version__,
            "platform": platform.platform(), "cpus": os.cpu_count()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="folder with hh-rlhf/ and hh-rlhf-train-first-turn-prompts/")
    p.add_argument("--models-dir", default=".", help="folder with the assembled GGUF files")
    p.add_argument("--work-dir", required=True)
    p.add_argument("--phases", default="simulate,consolidate,rm", help="comma-separated: simulate, consolidate, rm, judges")
    p.add_argument("--simulators", default="qwen-1.5b")
    p.add_argument("--tasks", default="harmless,helpful")
    p.add_argument("--methods", default="rlcd,rlaif,rlcd_rescore")
    p.add_argument("--prompt-style", default="chat", choices=["chat", "raw"])
    p.add_argument("--style-slice", type=int, default=0, help="also simulate rlcd with the other prompt style on this many prompts")
    p.add_argument("--num-prompts", type=int, default=4400, help="prompts per simulation (after de-duplication and test exclusion)")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--engine", default="auto", choices=["auto", "fast", "hf"])
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rm-backbone", default="qwen-0.5b")
    p.add_argument("--rm-lr", type=float, default=1e-5)
    p.add_argument("--rm-save-steps", type=int, default=0, help="checkpoint every N steps for --resume (default none)")
    p.add_argument("--rm-bf16", default="false", choices=["auto", "true", "false"],
                   help="train-rm --bf16 (default false: bf16 mixed precision gave NaN weights on two tables, docs/study.md §3)")
    p.add_argument("--drop-refusing-rejected", action="store_true",
                   help="also train on each rlcd table without the pairs whose rejected output is a refusal (key method rlcd-nrr)")
    p.add_argument("--min-pairs", type=int, default=100, help="train no reward model on a table with fewer pairs")
    p.add_argument("--keep-models", action="store_true", help="keep the reward models' weights")
    p.add_argument("--judge-models", default="smollm2,qwen-0.5b,qwen-1.5b")
    p.add_argument("--judge-modes", default="pairwise,pointwise")
    p.add_argument("--judge-splits", default="dev,test", help="dev (test rows 0-999) to choose, test (1000-1999) to report")
    p.add_argument("--judge-batch-size", type=int, default=64)
    p.add_argument("--judge-pairs", type=int, help="only the first N pairs of each split (default: all 1,000)")
    p.add_argument("--collect", help="write study.json, study.md and the tables to this folder, and stop")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    study = Study(args)
    if args.collect:
        study.collect(Path(args.collect))
        return
    for phase in args.phases.split(","):
        print(f"## {phase}", flush=True)
        getattr(study, phase)()


if __name__ == "__main__":
    main()
