"""Benchmark: scoring passes batched by a token budget against fixed batches, against the compute roofline.

Two passes: reward scores (`rlcd.reward.score_texts` on a one-output `LlamaForSequenceClassification`) and A/B letter
log-probs (`HFEngine.next_token_logprobs` on a `LlamaForCausalLM`; two token ids stand in for the letters). Model:
random weights in the LLaMA-7B shape (bf16, built on the GPU, no download; `--model-shape tiny` for a smoke test).
Texts: `--num-texts` random token ids of random lengths `--min-length`..`--max-length` (like reward-model inputs,
prompt + response), written as space-separated ids.

Methods, in the same run, each warmed up on a few texts first:
- ours: the library's batching, longest first, at most `--token-budget` tokens (padding included) and at most
  `--max-rows` rows a forward (each cap given; 24 is score_texts' default);
- fixed: 24 texts at a time in the given order, each batch one forward padded to its longest (what a plain loop does).

Reported: real tokens/s; padding (padded tokens / all tokens computed, counted from the forwards' inputs); and the
fraction of the compute roofline: achieved FLOP/s = 2 x non-embedding parameters x real tokens / seconds (attention's
own FLOPs not counted), over the peak bf16 matmul FLOP/s measured on the same GPU (an 8192^3 torch.matmul).

    python benchmarks/scoring.py                  # GPU, 7B shape, 1024 texts of 64..1024 tokens
    python benchmarks/scoring.py --cpu            # CPU smoke test: tiny shape, fp32, 64 texts of 16..256 tokens
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import BatchEncoding, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import BOS, EOS, PAD, SHAPES, IdTokenizer  # noqa: E402

from rlcd.engines import SCORING_TOKEN_BUDGET  # noqa: E402
from rlcd.engines.hf import HFEngine  # noqa: E402
from rlcd.reward import score_texts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {**SHAPES, "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096)}
PASSES = ("reward", "letters")
LETTERS = ["319", "350"]
FIXED_ROWS = 24


class Tokenizer(IdTokenizer):
    """IdTokenizer as score_texts and next_token_logprobs call it too: one text or a list, ids by key or attribute."""

    model_max_length = 1 << 40  # score_texts cuts nothing

    def __call__(self, texts, return_tensors=None, padding=False, add_special_tokens=True, **kwargs):
        if isinstance(texts, str):
            return BatchEncoding({"input_ids": [int(t) for t in texts.split()]})
        if return_tensors == "pt":
            return super().__call__(texts, return_tensors, padding, add_special_tokens)
        return BatchEncoding({"input_ids": [[int(t) for t in text.split()] for text in texts]})


def score(name, model, tokenizer, texts, rows, budget):
    if name == "reward":
        return score_texts(model, tokenizer, texts, rows, token_budget=budget)
    return [lp for row in HFEngine(model, tokenizer, rows, budget).next_token_logprobs(texts, LETTERS)[0] for lp in row]


def fixed(name, model, tokenizer, texts):
    """A plain loop: FIXED_ROWS texts at a time in the given order, each batch one forward padded to its longest."""
    return [s for start in range(0, len(texts), FIXED_ROWS)
            for s in score(name, model, tokenizer, texts[start : start + FIXED_ROWS], FIXED_ROWS, sys.maxsize)]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_matmul_flops(device, dtype, n) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t, reps = time.time(), 10
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.time() - t)


def build(name, config, device, dtype):
    torch.manual_seed(0)
    with torch.device(device):
        if name == "reward":
            return LlamaForSequenceClassification._from_config(config, dtype=dtype).eval()
        return LlamaForCausalLM._from_config(config, dtype=dtype).eval()


def measure(model, device, fn, texts, warmup):
    """(seconds, results, tokens computed, forwards) of fn(texts), after fn(warmup)."""
    fn(warmup)
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(kwargs["input_ids"].shape), with_kwargs=True)
    try:
        sync(device)
        t = time.time()
        out = fn(texts)
        sync(device)
        seconds = time.time() - t
    finally:
        hook.remove()
    return seconds, out, sum(rows * width for rows, width in shapes), len(shapes)


def run_pass(name, model, tokenizer, texts, args, device, peak):
    """Result rows of the fixed loop, then of ours at each row cap, checked against the fixed loop's results."""
    params = sum(x.numel() for x in model.model.parameters()) - model.model.embed_tokens.weight.numel()
    real = sum(len(t.split()) for t in texts)
    methods = [(f"fixed {FIXED_ROWS} rows", FIXED_ROWS, lambda x: fixed(name, model, tokenizer, x))]
    methods += [(f"ours (rows <= {r})", r, lambda x, r=r: score(name, model, tokenizer, x, r, args.token_budget)) for r in args.max_rows]
    reference = None
    for method, rows, fn in methods:
        seconds, out, computed, forwards = measure(model, device, fn, texts, texts[: 2 * FIXED_ROWS])
        reference = reference or out
        achieved = 2 * params * real / seconds
        yield {"pass": name, "method": method, "max_rows": rows, "forwards": forwards, "non_embedding_params": params,
               "real_tokens": real, "computed_tokens": computed, "padding": 1 - real / computed, "seconds": seconds,
               "tok_s": real / seconds, "tflop_s": achieved / 1e12, "roofline": achieved / peak,
               "max_abs_diff_vs_fixed": max(abs(a - b) for a, b in zip(out, reference))}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="smoke test: tiny shape, fp32, fewer and shorter texts")
    p.add_argument("--model-shape", choices=sorted(SHAPES), help="7b (GPU default), default (SmolLM2-135M) or tiny (CPU default)")
    p.add_argument("--num-texts", type=int, help="GPU default 1024, CPU 64")
    p.add_argument("--min-length", type=int, help="GPU default 64, CPU 16")
    p.add_argument("--max-length", type=int, help="GPU default 1024, CPU 256")
    p.add_argument("--token-budget", type=int, default=SCORING_TOKEN_BUDGET)
    p.add_argument("--max-rows", default="24,256", help="comma-separated row caps for ours")
    p.add_argument("--passes", default=",".join(PASSES), help=f"subset of {','.join(PASSES)}")
    args = p.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        p.error("no GPU: use --cpu")
    args.model_shape = args.model_shape or ("tiny" if args.cpu else "7b")
    args.num_texts = args.num_texts or (64 if args.cpu else 1024)
    args.min_length = args.min_length or (16 if args.cpu else 64)
    args.max_length = args.max_length or (256 if args.cpu else 1024)
    args.max_rows = [int(r) for r in args.max_rows.split(",")]
    passes = args.passes.split(",")
    if set(passes) - set(PASSES):
        p.error(f"--passes: choose from {','.join(PASSES)}")
    device, dtype = ("cpu", torch.float32) if args.cpu else ("cuda", torch.bfloat16)

    config = LlamaConfig(**SHAPES[args.model_shape], bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, num_labels=1)
    tokenizer = Tokenizer(config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_length, args.max_length + 1, (args.num_texts,), generator=gen).tolist()
    texts = [" ".join(map(str, torch.randint(3, config.vocab_size, (n,), generator=gen).tolist())) for n in lengths]
    real = sum(lengths)
    peak = peak_matmul_flops(device, dtype, 1024 if args.cpu else 8192)
    print(f"peak matmul: {peak / 1e12:.1f} TFLOP/s; {len(texts)} texts, {real} tokens", flush=True)

    device_name = "cpu" if args.cpu else torch.cuda.get_device_name()
    out_path = ROOT / "benchmarks" / "results" / f"scoring_{re.sub(r'[^A-Za-z0-9]+', '-', device_name).strip('-').lower()}.json"
    result = {"benchmark": "scoring", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python"] + sys.argv),
              "machine": {"device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
                          "platform": platform.platform(), "cpu_threads": torch.get_num_threads()},
              "settings": {**vars(args), "dtype": str(dtype), "fixed_rows": FIXED_ROWS},
              "peak_matmul_tflops": peak / 1e12, "real_tokens": real, "results": []}
    for name in passes:
        t = time.time()
        model = build(name, config, device, dtype)
        print(f"{name}: built the {args.model_shape} model in {time.time() - t:.1f}s", flush=True)
        for row in run_pass(name, model, tokenizer, texts, args, device, peak):
            result["results"].append(row)
            print(json.dumps(row), flush=True)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(result, indent=1) + "\n")
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    fixed_s = {r["pass"]: r["seconds"] for r in result["results"] if r["method"].startswith("fixed")}
    print(f"\n{'pass':<9}{'method':<20}{'forwards':>9}{'padding':>9}{'seconds':>9}{'real tok/s':>12}{'TFLOP/s':>9}"
          f"{'roofline':>10}{'vs fixed':>10}{'max |diff|':>12}")
    for r in result["results"]:
        print(f"{r['pass']:<9}{r['method']:<20}{r['forwards']:>9}{r['padding']:>9.1%}{r['seconds']:>9.2f}{r['tok_s']:>12.0f}"
              f"{r['tflop_s']:>9.1f}{r['roofline']:>10.1%}{fixed_s[r['pass']] / r['seconds']:>9.2f}x{r['max_abs_diff_vs_fixed']:>12.2g}")
    print(f"roofline: peak {str(dtype)[6:]} matmul {peak / 1e12:.1f} TFLOP/s measured; results: {out_path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
