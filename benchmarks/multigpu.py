"""Benchmark: the multi-process stages, one process against N on one machine, in one resumable run.

(a) `rlcd simulate` with 1 process and under `accelerate launch --num_processes N` on the same prompts:
    pairs/hour (over the whole command, and over the generation window the shard manifests record),
    and whether the N shards hold exactly the 1-process records (they should in float32; in bf16 the
    kernels round differently by batch, so there it is a statement about distributions).
(b) `rlcd train-rm` with 1 process x N accumulation steps against N DDP processes x 1 (the same pairs
    per optimizer step): pairs/s in total and per process (the Trainer's train_samples_per_second;
    the window excludes loading and the held-out scoring), and both loss curves.
(c) `rlcd ppo` with 1 process and N processes, rewarded by the 1-process reward model of (b):
    rollouts/s (rollouts per step / step time; the first step, which compiles on a GPU, reported
    apart), and the largest difference between the two runs' logged statistics (N processes compute
    the one-process run).

Every figure in the output comes from a command this script ran; nothing is filled in. Each command's
stdout and stderr go to WORK_DIR/logs. N-process runs use configs/accelerate/ddp.yaml. Resumable: the
JSON is rewritten after every finished run, and a re-run with the same --out skips the runs recorded
there (a run cut in the middle is started again from scratch, so its timing is a clean one); with
--stop-after S no new run starts after S seconds, and the exit code is 3 until everything is done —
call it again (e.g. under a 10-minute limit per command). Settings must match the recorded ones.

    python benchmarks/multigpu.py --num-processes 8 --out benchmarks/results/multigpu_8x.json \\
        --prompts-file ../shared/data/hh-rlhf/harmless-base/train.jsonl.gz --stop-after 480
    python benchmarks/multigpu.py --smoke --num-processes 2 --out /tmp/multigpu_smoke.json   # CPU, tiny model

--smoke: a 2-layer random Llama with the default model's tokenizer (built in WORK_DIR), a few prompts,
steps and tokens: it checks that every part runs end to end, its timings mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DDP_CONFIG = ROOT / "configs" / "accelerate" / "ddp.yaml"
EXAMPLE_PROMPTS = ROOT / "src" / "rlcd" / "data" / "harmless_prompts.jsonl"
PARTS = ("simulate", "train-rm", "ppo")
SMOKE = {"num_prompts": 8, "sim_max_new_tokens": 8, "sim_batch_size": 8, "rm_pairs": 96, "rm_steps": 6, "rm_batch_size": 4,
         "rm_eval_pairs": 16, "rm_max_length": 128, "ppo_steps": 2, "ppo_rollouts": 8, "ppo_minibatch_size": 4,
         "ppo_micro_batch_size": 2, "ppo_max_new_tokens": 8}
NOT_SETTINGS = ("out", "work_dir", "stop_after", "timeout")  # may change between calls of one benchmark


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file of results (rewritten after every run; read back to resume)")
    p.add_argument("--work-dir", help="run directories and logs (default: OUT without .json, plus -work)")
    p.add_argument("--num-processes", type=int, default=None, help="N: processes of the multi-process runs (default: the GPUs here, else 2)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)} (ppo needs train-rm's reward model)")
    p.add_argument("--smoke", action="store_true", help="tiny random model and sizes: checks the script runs end to end (CPU)")
    p.add_argument("--model", default="smollm2", help="simulator, reward-model backbone and PPO policy (default smollm2)")
    p.add_argument("--prompts-file", default=str(EXAMPLE_PROMPTS), help="prompts for simulate and ppo (default: the packaged 128 examples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-after", type=float, default=None, help="start no new run after this many seconds; exit code 3 if unfinished")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one command may run (default 3600)")
    g = p.add_argument_group("simulate")
    g.add_argument("--num-prompts", type=int, default=512)
    g.add_argument("--sim-max-new-tokens", type=int, default=128)
    g.add_argument("--sim-batch-size", type=int, default=64)
    g.add_argument("--sim-dtype", default="float32", help="float32 (default) makes records independent of sharding; bfloat16 does not")
    g = p.add_argument_group("train-rm")
    g.add_argument("--rm-data", help="preference table (default: synthetic pairs, the longer response preferred)")
    g.add_argument("--rm-pairs", type=int, default=4096, help="synthetic pairs (default 4096)")
    g.add_argument("--rm-steps", type=int, default=60)
    g.add_argument("--rm-batch-size", type=int, default=8, help="pairs per process per micro-batch (default 8)")
    g.add_argument("--rm-eval-pairs", type=int, default=200)
    g.add_argument("--rm-max-length", type=int, default=512)
    g.add_argument("--rm-bf16", default="auto", choices=["auto", "true", "false"], help="train-rm --bf16 (default auto)")
    g = p.add_argument_group("ppo")
    g.add_argument("--ppo-steps", type=int, default=4)
    g.add_argument("--ppo-rollouts", type=int, default=256)
    g.add_argument("--ppo-minibatch-size", type=int, default=128)
    g.add_argument("--ppo-micro-batch-size", type=int, default=16)
    g.add_argument("--ppo-max-new-tokens", type=int, default=128)
    args = p.parse_args(argv)
    if args.smoke:  # the smoke sizes replace the defaults, not values given on the command line
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for key, value in SMOKE.items():
            if key not in given:
                setattr(args, key, value)
    parts = [x for x in args.parts.split(",") if x]
    unknown = [x for x in parts if x not in PARTS]
    if unknown or not parts:
        p.error(f"--parts: unknown {unknown}; choose from {','.join(PARTS)}")
    args.parts = [x for x in PARTS if x in parts]
    if args.num_processes is None:
        args.num_processes = gpu_count() or 2
    if args.num_processes < 2:
        p.error("--num-processes must be at least 2 (the comparison is 1 process against N)")
    if args.ppo_rollouts % args.num_processes or args.ppo_minibatch_size % args.num_processes:
        p.error(f"--ppo-rollouts and --ppo-minibatch-size must divide by --num-processes {args.num_processes}")
    args.work_dir = args.work_dir or str(Path(args.out).with_suffix("")) + "-work"
    return args


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def machine() -> dict:
    import torch
    import transformers

    gpus = [torch.cuda.get_device_name(i) for i in range(gpu_count())]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "gpus": gpus, "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__, "git_commit": commit or None}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def tiny_model(work: Path) -> str:
    """A 2-layer random Llama with the default model's tokenizer (as tests/conftest.py builds it)."""
    out = work / "tiny-llama"
    if (out / "config.json").exists():
        return str(out)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlcd.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("smollm2"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def synthetic_table(path: Path, n: int, seed: int) -> str:
    """benchmarks/rm_training.py's synthetic rows, labelled so there is something to learn: the longer response wins."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from rm_training import synthetic_rows

    if not path.exists():
        rows = synthetic_rows(n, seed)
        for r in rows:
            r["preference"] = 1 if len(r["output_1"]) >= len(r["output_2"]) else 2
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --------------------------------------------------------------------------------------------------
# Running commands
# --------------------------------------------------------------------------------------------------


def command(processes: int, rlcd_args: list[str]) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "rlcd", *rlcd_args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CONFIG), "--num_processes", str(processes),
            "-m", "rlcd", *rlcd_args]


def run(name: str, cmd: list[str], out_dir: Path, work: Path, env: dict, timeout: float) -> dict:
    """Run one command from a clean out_dir; (wall seconds, exit code, command, log paths)."""
    shutil.rmtree(out_dir, ignore_errors=True)  # a run cut earlier starts again: its timing must be a clean one
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stem = name.replace("/", "-")
    print(f"[{now()}] {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    started_at, started = now(), time.perf_counter()
    with open(logs / f"{stem}.out", "w") as out, open(logs / f"{stem}.err", "w") as err:
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=err, env=env, cwd=ROOT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - started
    record = {"command": " ".join(cmd), "started_at": started_at, "wall_s": round(wall, 2), "returncode": rc,
              "stdout": str(logs / f"{stem}.out"), "stderr": str(logs / f"{stem}.err")}
    if rc != 0:
        record["stderr_tail"] = (logs / f"{stem}.err").read_text(errors="replace")[-2000:]
    print(f"[{now()}] {name}: exit {rc} after {wall:.1f} s", file=sys.stderr, flush=True)
    return record


# --------------------------------------------------------------------------------------------------
# What each run measured
# --------------------------------------------------------------------------------------------------


def simulate_records(out_dir: Path) -> list[dict]:
    from rlcd.files import load_shard

    return sorted((r for p in sorted(out_dir.glob("records-*.jsonl")) for r in load_shard(p)), key=lambda r: r["index"])


def simulate_figures(out_dir: Path, wall: float) -> dict:
    records = simulate_records(out_dir)
    manifests = [json.loads(p.read_text()) for p in sorted(out_dir.glob("manifest-*.json"))]
    ok = sum(r["status"] == "ok" for r in records)
    stamp = datetime.datetime.fromisoformat
    window = (max(stamp(m["finished_at"]) for m in manifests) - min(stamp(m["started_at"]) for m in manifests)).total_seconds()
    return {"records": len(records), "ok_pairs": ok, "shards": len(manifests), "generation_window_s": window,
            "pairs_per_hour_wall": round(ok / wall * 3600, 1), "records_per_hour_wall": round(len(records) / wall * 3600, 1),
            # manifest times have 1 s resolution: no rate from a window under 10 s
            "pairs_per_hour_generation": round(ok / window * 3600, 1) if window >= 10 else None}


def train_rm_figures(out_dir: Path, processes: int) -> dict:
    metrics = json.loads((out_dir / "metrics.json").read_text())
    log = metrics["log"]
    summary = next(e for e in reversed(log) if "train_samples_per_second" in e)
    heldout = metrics["heldout"] or {}
    return {"train_steps": metrics["train_steps"], "train_loss": metrics["train_loss"], "train_runtime_s": summary["train_runtime"],
            "pairs_per_s": summary["train_samples_per_second"], "pairs_per_s_per_process": summary["train_samples_per_second"] / processes,
            "loss_curve": [[e["step"], e["loss"]] for e in log if "loss" in e],
            "heldout_accuracy": heldout.get("accuracy"), "heldout_loss": heldout.get("loss")}


PPO_STATS = ("score_mean", "kl", "response_length", "missing_marker_frac", "policy_loss", "value_loss", "grad_norm")


def ppo_figures(out_dir: Path, rollouts: int) -> dict:
    log = [json.loads(x) for x in (out_dir / "log.jsonl").read_text().splitlines() if x.strip()]
    later = log[1:] or log
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"steps": len(log), "first_step_s": log[0]["time_step"], "step_s_after_first": mean([e["time_step"] for e in later]),
            "rollouts_per_s_after_first": rollouts / mean([e["time_step"] for e in later]),
            "rollout_sampling_s_after_first": mean([e["time_rollout"] for e in later]),
            "log": [{k: e.get(k) for k in ("step", "time_step", "time_rollout", "time_score", "time_forward", "time_train", *PPO_STATS)}
                    for e in log]}


def compare(part: str, one: dict, many: dict, dirs: tuple[Path, Path]) -> dict:
    """The N-process run against the 1-process run."""
    if part == "simulate":
        a, b = simulate_records(dirs[0]), simulate_records(dirs[1])
        differing = sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
        return {"records_equal": a == b, "records_differing": differing,
                "speedup_wall": round(many["pairs_per_hour_wall"] / one["pairs_per_hour_wall"], 3) if one["pairs_per_hour_wall"] else None,
                "speedup_wall_records": round(many["records_per_hour_wall"] / one["records_per_hour_wall"], 3)}  # failed prompts included
    if part == "train-rm":
        curve = dict(one["loss_curve"])
        diffs = [abs(curve[step] - loss) for step, loss in many["loss_curve"] if step in curve]
        return {"speedup_total": round(many["pairs_per_s"] / one["pairs_per_s"], 3),
                "per_process_efficiency": round(many["pairs_per_s_per_process"] / one["pairs_per_s"], 3),
                "loss_curve_max_abs_diff": max(diffs) if diffs else None,
                "heldout_loss_diff": None if one["heldout_loss"] is None else abs(many["heldout_loss"] - one["heldout_loss"])}
    diffs = {}
    for key in PPO_STATS:
        pairs = [(x.get(key), y.get(key)) for x, y in zip(one["log"], many["log"])]
        diffs[key] = max((abs(x - y) for x, y in pairs if x is not None and y is not None), default=None)
    return {"speedup_rollouts_per_s": round(many["rollouts_per_s_after_first"] / one["rollouts_per_s_after_first"], 3),
            "max_abs_diff_per_stat": diffs}


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    out, work = Path(args.out), Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}
    this_command = " ".join(["python", "benchmarks/multigpu.py", *(argv if argv is not None else sys.argv[1:])]) + f"  # {now()}"
    if out.exists():
        result = json.loads(out.read_text())
        if result.get("settings") != settings:
            changed = sorted(k for k in settings.keys() | result.get("settings", {}).keys() if settings.get(k) != result.get("settings", {}).get(k))
            print(f"{out}: recorded with other settings ({', '.join(changed)}); use another --out", file=sys.stderr)
            return 2
        result["commands"].append(this_command)
    else:
        result = {"benchmark": "multigpu", "date": now(), "commands": [this_command],
                  "machine": machine(), "settings": settings, "runs": {}, "results": {}}
    env = {**os.environ}
    if not gpu_count():
        env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")  # without it each CPU process would train alone (no DDP)
    if args.smoke:
        env["HF_HUB_OFFLINE"] = "1"
    result["env"] = {k: env[k] for k in ("ACCELERATE_USE_CPU", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in env}
    model = tiny_model(work) if args.smoke else args.model
    n, started = args.num_processes, time.time()

    def save():
        result["updated"] = now()
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out)

    def flags(part: str) -> list[list[str]]:
        """The rlcd arguments of the 1-process run and of the N-process run."""
        if part == "simulate":
            common = ["simulate", "--prompts-file", args.prompts_file, "--max-prompts", str(args.num_prompts), "--model", model,
                      "--dtype", args.sim_dtype, "--max-new-tokens", str(args.sim_max_new_tokens), "--batch-size", str(args.sim_batch_size),
                      "--accept-eos", "--seed", str(args.seed)]
            return [common, common]
        if part == "train-rm":
            data = args.rm_data or synthetic_table(work / "synthetic-pairs.jsonl", args.rm_pairs, args.seed)
            extra = json.dumps({"eval_strategy": "no", "logging_steps": max(1, args.rm_steps // 20)})  # held-out pairs scored once, after timing
            common = ["train-rm", "--data", data, "--model", model, "--max-steps", str(args.rm_steps), "--batch-size", str(args.rm_batch_size),
                      "--eval-pairs", str(args.rm_eval_pairs), "--max-length", str(args.rm_max_length), "--save-steps", "0",
                      "--seed", str(args.seed), "--bf16", args.rm_bf16, "--training-args", extra]
            return [[*common, "--gradient-accumulation-steps", str(n)], [*common, "--gradient-accumulation-steps", "1"]]
        common = ["ppo", "--prompts", args.prompts_file, "--policy", model, "--reward-model", str(work / "train-rm-1"),
                  "--steps", str(args.ppo_steps), "--rollouts", str(args.ppo_rollouts), "--minibatch-size", str(args.ppo_minibatch_size),
                  "--micro-batch-size", str(args.ppo_micro_batch_size), "--max-new-tokens", str(args.ppo_max_new_tokens),
                  "--accept-eos", "--seed", str(args.seed)]
        return [common, common]

    unfinished = False
    for part in args.parts:
        if part == "ppo" and not (work / "train-rm-1" / "metrics.json").exists():
            result["runs"]["ppo/skipped"] = {"reason": "no reward model: run the train-rm part first"}
            unfinished = True
            continue
        result["runs"].pop(f"{part}/skipped", None)
        dirs = (work / f"{part}-1", work / f"{part}-{n}")
        for processes, rlcd_args, out_dir in zip((1, n), flags(part), dirs):
            name = f"{part}/{processes}"
            if result["runs"].get(name, {}).get("returncode") == 0:
                continue
            if args.stop_after is not None and time.time() - started >= args.stop_after:
                unfinished = True
                break
            # the 1-process baseline runs on one GPU (one process seeing several would be refused by the trainer stages)
            one_gpu = {"CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]} if processes == 1 and gpu_count() else {}
            record = run(name, command(processes, [*rlcd_args, "--out-dir", str(out_dir)]), out_dir, work, {**env, **one_gpu}, args.timeout)
            if record["returncode"] == 0:
                record["figures"] = (simulate_figures(out_dir, record["wall_s"]) if part == "simulate"
                                     else train_rm_figures(out_dir, processes) if part == "train-rm"
                                     else ppo_figures(out_dir, args.ppo_rollouts))
            result["runs"][name] = record
            save()
        one, many = result["runs"].get(f"{part}/1", {}), result["runs"].get(f"{part}/{n}", {})
        if one.get("returncode") == 0 and many.get("returncode") == 0:
            result["results"][part] = compare(part, one["figures"], many["figures"], dirs)
            save()
        else:
            unfinished = True
    save()
    failed = [k for k, r in result["runs"].items() if r.get("returncode") not in (0, None)]
    print(json.dumps(result["results"], indent=2))
    print(out)
    return 1 if failed else 3 if unfinished else 0


if __name__ == "__main__":
    sys.exit(main())
