"""Benchmark: `rlcd simulate` (rlcd method) against the original scripts' approach, in one run.

Baseline ("original approach"): plain `model.generate` on batches of 16 samples drawn
from a queue, temperature 1, top-k 50, banned strings as bad_words_ids, every batch
running until all its rows end (EOS) or max_new_tokens; rejected samples go back to
the end of the queue, up to 5 attempts per output — the loop of the original
simulate script, written here from docs/method.md §4. Ours: the `Simulation` loop with
the in-process engine (stop at the next Human turn, finished rows leave the batch).
Same model, prompts, filter and sampling settings.

On CPU it runs the default model. On a GPU, `--shape 7b` builds random weights of the
LLaMA-7B shape (bf16) with `--model`'s tokenizer: throughput does not depend on the
weights, but random text never ends a turn, so `--eos-rate` forces EOS at each step with
that probability (3/128: responses of ~43 tokens on average, capped at max-new-tokens)
and `--accept-eos` accepts them; the baseline can run on fewer prompts (it is slow).

    python benchmarks/simulate.py --prompts-file ../shared/data/hh-rlhf-train-first-turn-prompts/harmless-base_train_first20000_first_turn.json.gz \
        --num-prompts 64 --max-new-tokens 128 --accept-eos --engine hf --baseline-dtypes bfloat16,float32
    python benchmarks/simulate.py --device cuda --shape 7b --model TOKENIZER_DIR --prompts-file PROMPTS \
        --num-prompts 2048 --baseline-prompts 64 --batch-size 256 --max-new-tokens 128 --accept-eos --eos-rate 0.0234
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from rlcd import dialogue
from rlcd.engines.hf import HFEngine
from rlcd.models import load_causal_lm, load_tokenizer, resolve_dtype, resolve_model
from rlcd.simulate import SLOTS, Simulation, SimulationConfig, plan_record
from rlcd.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from generation import SHAPES  # noqa: E402


def baseline(model, tokenizer, records, cfg, batch_size=16):
    bad_words = [[i] for i in HFEngine(model, tokenizer).banned_token_ids(dialogue.BANNED).tolist()]
    queue = [(r["index"], s, 0) for r in records for s in SLOTS["rlcd"]]
    prompts = {r["index"]: r["actual_prompts"] for r in records}
    outputs, failed, tokens = {}, set(), 0
    torch.manual_seed(cfg.seed)
    start = time.time()
    while queue:
        batch, queue = queue[:batch_size], queue[batch_size:]
        batch = [job for job in batch if job[0] not in failed]
        if not batch:
            continue
        enc = tokenizer([prompts[i][s] for i, s, _ in batch], return_tensors="pt", padding=True).to(model.device)
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=50, max_new_tokens=cfg.max_new_tokens,
                             bad_words_ids=bad_words, pad_token_id=tokenizer.pad_token_id)
        for (i, s, attempts), row in zip(batch, out[:, enc.input_ids.shape[1]:]):
            ids = row.tolist()
            n = ids.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in ids else len(ids)
            tokens += n
            text = tokenizer.decode(ids[:n], skip_special_tokens=True)
            response, _ = dialogue.filter_completion(text, "eos" if n < len(ids) else "length", cfg.accept_eos)
            if response is not None:
                outputs.setdefault(i, {})[s] = response
            elif attempts + 1 >= cfg.max_attempts:
                failed.add(i)
            else:
                queue.append((i, s, attempts + 1))
    elapsed = time.time() - start
    pairs = sum(1 for i, o in outputs.items() if len(o) == 2 and i not in failed)
    return {"seconds": round(elapsed, 1), "pairs": pairs, "pairs_per_s": pairs / elapsed, "sampled_tokens": tokens, "tokens_per_s": tokens / elapsed}


def ours(model, tokenizer, items, task, cfg, engine_name):
    if engine_name == "fast":
        from rlcd.engines.fast import FastEngine

        engine = FastEngine(model, tokenizer, batch_size=cfg.batch_size)
    else:
        engine = HFEngine(model, tokenizer, batch_size=cfg.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        sim = Simulation(engine, task, cfg, Path(tmp) / "records.jsonl")
        start = time.time()
        counts = sim.run(items, {})
        elapsed = time.time() - start
    return {"seconds": round(elapsed, 1), "pairs": counts["ok"], "pairs_per_s": counts["ok"] / elapsed, "sampled_tokens": sim.tokens,
            "tokens_per_s": sim.tokens / elapsed}


def random_model(shape, model_name, device, eos_rate):
    """Random bf16 weights of a benchmark shape over the tokenizer of `model_name`; EOS forced at `eos_rate` per step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = load_tokenizer(resolve_model(model_name))
    config = LlamaConfig(**{**SHAPES[shape], "vocab_size": len(tokenizer)}, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    def force_eos(module, inputs, logits):
        hit = torch.rand(logits.shape[:-1], device=logits.device) < eos_rate
        logits[..., tokenizer.eos_token_id] += hit.to(logits.dtype) * 1e4
        return logits

    if eos_rate:
        model.lm_head.register_forward_hook(force_eos)
    return model, tokenizer


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts-file", default=str(ROOT / "src/rlcd/data/harmless_prompts.jsonl"))
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32, help="our batch size (the baseline keeps the original's 16)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--engine", default="fast", choices=["hf", "fast"], help="our engine (rlcd simulate's --engine)")
    p.add_argument("--accept-eos", action="store_true", help="an end-of-sequence token ends the turn (as for instruct models in configs/)")
    p.add_argument("--dtype", default="auto", help="ours (rlcd simulate's --dtype; auto: bf16 where the CPU computes it natively)")
    p.add_argument("--baseline-dtypes", default="same", help="comma-separated dtypes for the baseline runs, or 'same' as ours (default)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--shape", choices=["model", *SHAPES], default="model",
                   help="model: --model itself; 7b (or default): random weights of that shape with --model's tokenizer")
    p.add_argument("--eos-rate", type=float, default=0.0, help="probability per step of a forced EOS (for random weights)")
    p.add_argument("--baseline-prompts", type=int, help="prompts for the baseline runs (default: all)")
    p.add_argument("--out", help="JSON file (default benchmarks/results/simulate_<device>.json)")
    args = p.parse_args()
    args.out = args.out or str(ROOT / f"benchmarks/results/simulate_{args.device}{'' if args.shape == 'model' else '_' + args.shape}.json")

    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    if args.shape != "model":
        model, tokenizer = random_model(args.shape, args.model, args.device, args.eos_rate)
    else:
        model, tokenizer = load_causal_lm(args.model, device=args.device, dtype=args.dtype)
    args.dtype = str(model.dtype).removeprefix("torch.")
    task = load_task("harmless")
    cfg = SimulationConfig(method="rlcd", max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, accept_eos=args.accept_eos)
    items = dialogue.load_prompts(args.prompts_file).items[: args.num_prompts]
    records = [plan_record(i, prompt, task, cfg) for i, prompt in items]

    results = {"ours": ours(model, tokenizer, items, task, cfg, args.engine)}
    for dtype in [args.dtype] if args.baseline_dtypes == "same" else args.baseline_dtypes.split(","):
        model = model.to(resolve_dtype(dtype, args.device))
        results[f"baseline_generate_b16_{dtype}"] = baseline(model, tokenizer, records[: args.baseline_prompts], cfg)
    for r in results.values():
        r["pairs_per_hour"] = round(r["pairs_per_s"] * 3600)
    speedup = {name: results["ours"]["pairs_per_s"] / max(r["pairs_per_s"], 1e-12) for name, r in results.items() if name != "ours"}
    print(f"{'':34}{'pairs':>7}{'seconds':>9}{'pairs/s':>10}{'pairs/hour':>12}{'tokens/s':>10}{'ours vs':>9}")
    for name, r in results.items():
        print(f"{name:34}{r['pairs']:>7}{r['seconds']:>9}{r['pairs_per_s']:>10.3f}{r['pairs_per_hour']:>12}{r['tokens_per_s']:>10.1f}"
              + (f"{speedup[name]:>8.2f}x" if name in speedup else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "benchmark": "simulate", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv), "machine": {"platform": platform.platform(), "processor": platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"},
        "settings": {**vars(args), "method": "rlcd", "temperature": 1.0, "top_k": 50, "max_attempts": 5},
        "results": results, "ours_speedup_pairs_per_s": speedup,
    }, indent=2) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
