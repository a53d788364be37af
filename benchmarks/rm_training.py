"""Benchmark: reward-model training throughput, `rlcd train-rm` against plain TRL `RewardTrainer`, in one run.

Ours: the exact path of `rlcd train-rm` (its command line, run in-process through `rlcd.cli.main`, with
`--max-steps`, `--gradient-accumulation-steps 1`, `--eval-pairs 0`, `--save-steps 0`). The only thing
added is instrumentation: the trainer class `train-rm` builds is wrapped in a subclass that adds a timing
callback and counts each micro-batch's real tokens. Plain TRL: `RewardTrainer` given the model path, a
`datasets.Dataset` of `chosen` / `rejected` plain texts with the prompt included (TRL's implicit-prompt
standard format; TRL appends EOS and tokenizes), and a `RewardConfig` with only output_dir, max_steps,
per_device_train_batch_size, bf16 (on only with CUDA; TRL's own default is on everywhere), report_to
"none" and save_strategy "no" (the checkpoint TRL would write after the last step is outside the timed
window anyway; it only costs wall time and disk). Everything else is TRL's default, notably
gradient_checkpointing=True, which `train-rm` leaves off unless --gradient-checkpointing is given.

Same preference table (the first steps x batch-size usable pairs), same pairs per step, same number of
steps, same seed, one process. Timing: a TrainerCallback (on_step_begin / on_step_end, with
torch.cuda.synchronize on GPU); the figures are for the window from the start of the first step after
--warmup-steps to the end of the last step, so they include data loading and logging between steps but
not model loading, tokenization or saving. Tokens are the real (non-pad) tokens of chosen + rejected; computed tokens
are the positions the model ran that are not padding, fewer for ours where a pair's sides share their conversation in
one row (`rlcd.packing`). MFU = 6 x non-embedding parameters x computed tokens/s / peak bf16 FLOP/s (the reward model has no LM head, so the
embedding table is a lookup, not a matmul; attention-score FLOPs are not counted; recomputation under
gradient checkpointing is not counted either, as MFU is defined).

    python benchmarks/rm_training.py --synthetic 480                         # 30 steps x 16 pairs, smollm2
    python benchmarks/rm_training.py --data runs/demo/rlcd.csv --steps 30
    python benchmarks/rm_training.py --synthetic 64 --steps 6 --warmup-steps 2 --batch-size 4   # CPU smoke

Extra variants (--variants) separate the configuration differences: `ours_gc` is ours with
--gradient-checkpointing, `trl_nogc` is plain TRL with gradient_checkpointing=False.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL trainers ping the Hub on construction otherwise

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("ours", "trl", "ours_gc", "trl_nogc")
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12))  # dense bf16 FLOP/s by device name

# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

WORDS = """the a to of and in is it you that for on with as be this have are not can but your or if at
from they what will one all would there their so about which when an do more some time people like just
how make know take see could good water help other than then now only its also think after first way
well work because any these give day most us need safe dangerous advice friend house money car food
family school question answer really should health doctor police law legal kind careful person problem
understand feel try sure maybe important different best small large better always never often usually
simple plan idea information example reason steps risk situation together someone something anyone
child parent neighbor computer phone internet email account password store price job boss meeting
travel city weather morning night week year history science music book movie game sport team""".split()


def _sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n)]
    return " ".join([words[0].capitalize()] + words[1:]) + rng.choice([".", ".", ".", "?", "!"])


def _paragraph(rng: random.Random, n_words: int) -> str:
    parts, left = [], n_words
    while left > 0:
        k = min(left, rng.randint(6, 16))
        parts.append(_sentence(rng, k))
        left -= k
    return " ".join(parts)


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """n preference rows in the original release's columns: hh-rlhf style prompts of ~40 words,
    responses of 60-120 words, random hard labels."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = f"\n\nHuman: {_paragraph(rng, rng.randint(30, 50))}\n\nAssistant:"
        out1, out2 = (_paragraph(rng, rng.randint(60, 120)) for _ in range(2))
        rows.append({"instruction": prompt, "input": "", "output_1": out1, "output_2": out2, "preference": rng.choice([1, 2])})
    return rows


def load_rows(args) -> tuple[list[dict], str]:
    """(rows in read_table's form, description of the source)."""
    from rlcd.preferences import read_table

    if args.synthetic:
        with tempfile.TemporaryDirectory() as tmp:  # through read_table, like a real table
            path = Path(tmp) / "synthetic.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(args.synthetic, args.seed)))
            rows, _ = read_table(path)
        return rows, f"synthetic ({args.synthetic} pairs, seed {args.seed})"
    rows, skipped = read_table(args.data)
    return rows, f"{args.data} ({len(rows)} usable rows, skipped {dict(skipped) or 0})"


def write_table(rows: list[dict], path: Path) -> Path:
    """The rows back as a JSONL table in the original release's columns (what `train-rm --data` reads)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            rec = {"instruction": r["prompt"], "input": "", "output_1": r["output_1"], "output_2": r["output_2"], "preference": r["preference"]}
            if r["win2_prob"] is not None:
                rec["win2_prob"] = r["win2_prob"]
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


def trl_dataset(rows: list[dict]):
    """TRL's standard implicit-prompt preference format: chosen / rejected plain texts with the prompt included."""
    from datasets import Dataset

    chosen, rejected = [], []
    for r in rows:
        better, worse = (r["output_1"], r["output_2"]) if r["preference"] == 1 else (r["output_2"], r["output_1"])
        chosen.append(f"{r['prompt'].rstrip()} {better.strip()}")
        rejected.append(f"{r['prompt'].rstrip()} {worse.strip()}")
    return Dataset.from_dict({"chosen": chosen, "rejected": rejected})


# --------------------------------------------------------------------------------------------------
# Instrumentation
# --------------------------------------------------------------------------------------------------


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Probe:
    """Step times, real/padded tokens per step, peak memory, and the settings the trainer actually ran with."""

    def __init__(self):
        from transformers import TrainerCallback

        self.begin, self.end, self.tokens, self.computed, self.padded, self.pairs = {}, {}, {}, {}, {}, {}
        self.peak_bytes = self.allocated_at_begin = None
        self.loadavg_begin = self.loadavg_end = None
        self.settings, self.params = {}, {}
        self.train_begin = self.train_rows = None
        self.command = ""
        probe = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kw):
                import torch

                _sync()
                probe.train_begin = time.perf_counter()
                probe.loadavg_begin = os.getloadavg()[0]
                if torch.cuda.is_available():
                    probe.allocated_at_begin = torch.cuda.memory_allocated()  # the model (and anything a previous run leaked)
                    torch.cuda.reset_peak_memory_stats()
                probe.describe(args, model)

            def on_step_begin(self, args, state, control, **kw):
                _sync()
                probe.begin[state.global_step + 1] = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                _sync()
                probe.end[state.global_step] = time.perf_counter()

            def on_train_end(self, args, state, control, **kw):
                import torch

                probe.loadavg_end = os.getloadavg()[0]
                if torch.cuda.is_available():
                    probe.peak_bytes = torch.cuda.max_memory_allocated()

        self.callback = Callback()

    def record_batch(self, step: int, inputs: dict) -> None:
        # kept as tensors (no host sync inside the step); read after training
        if "reads" in inputs:  # train-rm's packed pairs (rlcd.packing): a row per pair, left padded
            positions, reads = inputs["position_ids"], inputs["reads"]
            tokens = (positions[reads[:, 0], reads[:, 1]] + 1).sum()  # each side's length: its last position + 1
            # padding holds position 0, and so does a row's first real token (a side is never one token long)
            computed = (positions.shape[1] - ((positions > 0).int().argmax(-1) - 1)).sum()
            pairs = positions.shape[0]
        else:  # chosen rows, then rejected rows
            mask = inputs["attention_mask"]
            tokens = computed = mask.sum()
            positions, pairs = mask, mask.shape[0] // 2
        self.tokens[step] = self.tokens.get(step, 0) + tokens
        self.computed[step] = self.computed.get(step, 0) + computed
        self.padded[step] = self.padded.get(step, 0) + positions.numel()
        self.pairs[step] = self.pairs.get(step, 0) + pairs

    def describe(self, args, model) -> None:
        emb = model.get_input_embeddings() if model is not None else None
        total = sum(p.numel() for p in model.parameters())
        self.params = {
            "total": total,
            "embedding": emb.weight.numel() if emb is not None else 0,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        }
        self.params["non_embedding"] = total - self.params["embedding"]
        names = ["per_device_train_batch_size", "gradient_accumulation_steps", "bf16", "fp16", "gradient_checkpointing",
                 "gradient_checkpointing_kwargs", "max_length", "pad_to_multiple_of", "group_by_length", "optim",
                 "torch_compile", "dataloader_num_workers", "dataloader_pin_memory", "logging_steps", "disable_dropout",
                 "learning_rate", "lr_scheduler_type", "max_grad_norm", "tf32", "remove_unused_columns", "save_strategy"]
        self.settings = {n: _plain(getattr(args, n)) for n in names if hasattr(args, n)}
        self.settings["attn_implementation"] = getattr(getattr(model, "config", None), "_attn_implementation", None)

    def instrument(self, trainer_cls):
        """A subclass of trainer_cls that adds the callback and counts each micro-batch's tokens."""
        probe = self

        class Instrumented(trainer_cls):
            def __init__(self, *a, **kw):
                kw["callbacks"] = list(kw.get("callbacks") or []) + [probe.callback]
                super().__init__(*a, **kw)
                probe.train_rows = len(self.train_dataset)

            def training_step(self, model, inputs, *a, **kw):
                probe.record_batch(self.state.global_step + 1, inputs)
                return super().training_step(model, inputs, *a, **kw)

        Instrumented.__name__ = Instrumented.__qualname__ = f"Instrumented{trainer_cls.__name__}"
        return Instrumented


def _plain(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


# --------------------------------------------------------------------------------------------------
# The two trainers
# --------------------------------------------------------------------------------------------------


def run_ours(args, table: Path, work: Path, gradient_checkpointing: bool) -> Probe:
    from rlcd import reward
    from rlcd.cli import main as rlcd_main

    probe = Probe()
    out_dir = work / ("ours_gc" if gradient_checkpointing else "ours")
    argv = ["train-rm", "--data", str(table), "--model", args.model, "--out-dir", str(out_dir),
            "--batch-size", str(args.batch_size), "--gradient-accumulation-steps", "1", "--max-length", str(args.max_length),
            "--eval-pairs", "0", "--max-steps", str(args.steps), "--save-steps", "0", "--seed", str(args.seed)]
    if gradient_checkpointing:
        argv.append("--gradient-checkpointing")
    probe.command = "rlcd " + " ".join(argv)
    original = reward.soft_label_reward_trainer
    reward.soft_label_reward_trainer = lambda: probe.instrument(original())
    try:
        rlcd_main(argv)
    finally:
        reward.soft_label_reward_trainer = original
    return probe


def run_trl(args, rows: list[dict], model_path: str, work: Path, gradient_checkpointing: bool | None) -> Probe:
    import torch
    from trl import RewardConfig, RewardTrainer

    probe = Probe()
    name = "trl" if gradient_checkpointing is None else "trl_nogc"
    config = dict(output_dir=str(work / name), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                  bf16=torch.cuda.is_available(), report_to="none", save_strategy="no")
    if gradient_checkpointing is not None:
        config["gradient_checkpointing"] = gradient_checkpointing
    shown = ", ".join(f"{k}={v!r}" for k, v in config.items())
    probe.command = f"RewardTrainer(model={model_path!r}, args=RewardConfig({shown}), train_dataset=<chosen/rejected texts>)"
    trainer = probe.instrument(RewardTrainer)(model=model_path, args=RewardConfig(**config), train_dataset=trl_dataset(rows))
    trainer.train()
    del trainer
    return probe


def summarize(probe: Probe, args, peak_flops: float | None) -> dict:
    steps = sorted(probe.end)
    if len(steps) != args.steps:
        raise SystemExit(f"expected {args.steps} steps, the trainer ran {len(steps)}")
    timed = [s for s in steps if s > args.warmup_steps]
    def total(counts: dict) -> int:
        return sum(int(counts[s].item() if hasattr(counts[s], "item") else counts[s]) for s in timed)

    seconds = probe.end[timed[-1]] - probe.begin[timed[0]]
    real, computed, padded, pairs = total(probe.tokens), total(probe.computed), total(probe.padded), total(probe.pairs)
    tokens_per_s = real / seconds
    step_times = [probe.end[s] - probe.begin[s] for s in timed]
    out = {
        "command": probe.command,
        "timed_steps": len(timed),
        "seconds": round(seconds, 4),
        "pairs": pairs,
        "pairs_per_s": pairs / seconds,
        "tokens": real,
        "tokens_per_s": tokens_per_s,
        "computed_tokens": computed,  # fewer than `tokens` where a pair's two sides share their conversation in one row
        "padded_tokens": padded,
        "padding_efficiency": computed / padded,
        "median_step_s": statistics.median(step_times),
        "in_step_fraction": sum(step_times) / seconds,  # the rest: data loading and logging between steps
        "mean_tokens_per_pair": real / pairs,
        "warmup_steps_s": [round(probe.end[s] - probe.begin[s], 4) for s in steps if s <= args.warmup_steps],
        "train_rows_after_preprocessing": probe.train_rows,
        "params": probe.params,
        "mfu": (6 * probe.params["non_embedding"] * computed / seconds / peak_flops) if peak_flops else None,
        "peak_memory_gib": probe.peak_bytes / 2**30 if probe.peak_bytes is not None else None,
        "allocated_at_train_begin_gib": probe.allocated_at_begin / 2**30 if probe.allocated_at_begin is not None else None,
        "loadavg_1min": [probe.loadavg_begin, probe.loadavg_end],  # CPU load of the machine (other processes included)
        "settings": probe.settings,
    }
    return out


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def peak_bf16_flops(explicit: float | None) -> tuple[float | None, str]:
    import torch

    if explicit:
        return explicit, "--peak-flops"
    if not torch.cuda.is_available():
        return None, "cpu: no MFU (give --peak-flops to compute one)"
    name = torch.cuda.get_device_name(0)
    for key, flops in PEAK_BF16:
        if key in name:
            return flops, f"{name}: dense bf16 {flops / 1e12:.0f} TFLOP/s"
    return None, f"{name}: unknown peak; give --peak-flops"


def machine_name() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(0).lower()).strip("_")


DIFFERENCES = [
    "gradient checkpointing: TRL's RewardConfig defaults to gradient_checkpointing=True (one extra forward per step, "
    "~1/3 more compute, far less activation memory); train-rm defaults to off (--gradient-checkpointing turns it on). "
    "Variants ours_gc / trl_nogc measure each side with the other setting.",
    "precision: both keep float32 master weights and use bf16 autocast on GPU (train-rm loads float32 for full "
    "fine-tuning; TRL loads float32 when given a path); on CPU both run float32 (TRL's own bf16 default is True "
    "everywhere; the benchmark sets it to False on CPU).",
    "padding and batching: both pad on the right to the longest sequence of the micro-batch (chosen and rejected "
    "rows in one forward), no length-grouped batching, no pad_to_multiple_of on GPU; same seeded random order.",
    "input text: ours = prompt + ' ' + response + '\\n\\nHuman:' (marker), cut on the LEFT to --max-length; "
    "TRL = prompt + ' ' + response + EOS, pairs longer than max_length (default 1024) DROPPED. Token counts "
    "differ by a few tokens per sequence; throughput is per real token.",
    "loss/metrics: ours computes BCE with soft targets and logs accuracy and margin (2 host syncs per step); TRL "
    "computes -logsigmoid and logs num_tokens, min/mean/max reward, accuracy, margin (about 6 host syncs per step).",
    "data collation: ours PairCollator builds the padded tensors row by row in Python; TRL's DataCollatorForPreference "
    "uses torch pad. Both tokenize everything before training (not timed).",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="preference table (CSV or JSONL, as rlcd consolidate writes)")
    src.add_argument("--synthetic", type=int, metavar="N", help="generate N synthetic pairs (prompts ~40 words, responses 60-120 words)")
    p.add_argument("--model", default="smollm2", help="base model (rlcd.models.resolve_model); default smollm2")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per trainer (default 30)")
    p.add_argument("--warmup-steps", type=int, default=5, help="first steps left out of the figures (default 5)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per step, for both (default 16)")
    p.add_argument("--max-length", type=int, default=512, help="train-rm --max-length (default 512); TRL keeps its default")
    p.add_argument("--variants", default="ours,trl", help=f"comma-separated, run in this order, from {','.join(VARIANTS)} (default ours,trl)")
    p.add_argument("--peak-flops", type=float, default=None, help="peak bf16 FLOP/s for MFU (default: by GPU name; H100/H200 989e12)")
    p.add_argument("--seed", type=int, default=42, help="seed of the synthetic data and of both trainers (default 42)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON output file, or a folder for rm_training_<machine>.json in it (default benchmarks/results/)")
    args = p.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        p.error(f"--variants: choose from {', '.join(VARIANTS)}")
    if not 0 <= args.warmup_steps < args.steps:
        p.error("--warmup-steps must be at least 0 and less than --steps")

    import torch
    import transformers
    import trl

    from rlcd.models import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    peak_flops, peak_source = peak_bf16_flops(args.peak_flops)
    machine = machine_name()
    rows, source = load_rows(args)
    rows = rows[: args.steps * args.batch_size]  # one pass, each pair once (fewer rows: the trainers loop over them)
    model_path = resolve_model(args.model)  # converts the embedded default once, before any timing

    results = {}
    with tempfile.TemporaryDirectory(prefix="rm_training_") as tmp:
        work = Path(tmp)
        table = write_table(rows, work / "table.jsonl")
        for variant in variants:
            print(f"=== {variant}", flush=True)
            t0 = time.perf_counter()
            if variant.startswith("ours"):
                probe = run_ours(args, table, work, gradient_checkpointing=variant == "ours_gc")
            else:
                probe = run_trl(args, rows, model_path, work, gradient_checkpointing=False if variant == "trl_nogc" else None)
            results[variant] = summarize(probe, args, peak_flops)
            results[variant]["setup_s"] = round(probe.train_begin - t0, 2)  # load + tokenize, not in the figures
            results[variant]["total_s"] = round(time.perf_counter() - t0, 2)
            del probe
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    header = f"{'':10} {'pairs/s':>9} {'tokens/s':>10} {'MFU':>7} {'peak GiB':>9} {'step s':>8} {'pad eff':>8} {'grad ckpt':>9}"
    lines = [header]
    for name, r in results.items():
        mfu = f"{100 * r['mfu']:.2f}%" if r["mfu"] is not None else "-"
        mem = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "-"
        lines.append(f"{name:10} {r['pairs_per_s']:9.2f} {r['tokens_per_s']:10.0f} {mfu:>7} {mem:>9} {r['median_step_s']:8.3f} "
                     f"{r['padding_efficiency']:8.3f} {str(r['settings'].get('gradient_checkpointing')):>9}")
    speedup = None
    if "ours" in results and "trl" in results:
        speedup = results["ours"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
        lines.append(f"ours / plain TRL tokens/s: {speedup:.2f}x")
    table_text = "\n".join(lines)

    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results"
    if out.is_dir() or not out.suffix:  # a folder: the file is named after the machine
        out = out / f"rm_training_{machine}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "rm_training",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv),
        "machine": {
            "name": machine,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "python": platform.python_version(),
        },
        "settings": {**vars(args), "model_path": model_path, "data_source": source, "pairs_in_table": len(rows),
                     "peak_flops": peak_flops, "peak_flops_source": peak_source,
                     "mfu_formula": "6 * non-embedding params * tokens/s / peak_flops"},
        "results": results,
        "speedup_tokens_per_s_ours_over_trl": speedup,
        "differences": DIFFERENCES,
        "table": table_text,
    }, indent=2) + "\n")
    print(table_text)
    print(out)


if __name__ == "__main__":
    main()
