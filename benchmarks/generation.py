"""Benchmark: decode throughput of FastEngine against transformers' generate paths, in one run.

Model: random weights in the LLaMA-7B shape (bf16, built on the GPU, no download) or
the SmolLM2-135M shape ("default"). Prompts: random token ids, 32..160 long; 128 new
tokens sampled at temperature 1, top-k 50. Texts are space-separated token ids (no
real tokenizer is needed for random weights).

Two modes, for every method:
- forced: every row runs the full `--new-tokens` (EOS ignored); one batch of
  `batch` prompts. Throughput counts prefill; "decode tok/s" subtracts a
  prefill-only run (1 new token) and is what the roofline compares with.
- realistic: 4x `batch` prompts; a forward hook on lm_head forces EOS with
  probability 3/new_tokens at every step, so completions end at random lengths
  (geometric, mean ~new_tokens/3) and batching that keeps slots full pays off.

Methods: ours (FastEngine); plain `generate` (prompts left padded to the batch's
longest); `generate` with a static cache, which makes transformers compile its
decoding forward itself (torch.compile(mode="reduce-overhead"), its documented
static-cache path; padded to the longest possible prompt: one shape); HFEngine (our
eager loop). Every method runs in each of `--dtypes`: on the GPU bf16; on a CPU fp32,
and bf16 too where the CPU multiplies bf16 natively (AVX512-BF16 or AMX), which is
what `--dtype auto` picks for generation there. Ratios are taken against plain
`generate` at batch 16 (the original scripts') in the same dtype and in fp32.
On a GPU the run starts with a self-check: FastEngine against HFEngine on a tiny
fp32 model, which exercises the compiled, graph-captured step and the Triton kernel.
Roofline: measured HBM bandwidth (a large device-to-device copy) / bytes per decode
step (weights + live KV cache at the mean context length).

    python benchmarks/generation.py                       # GPU, 7B shape, batch 64 and 256
    python benchmarks/generation.py --cpu                 # CPU, default shape, batch 16, fp32 (and bf16)
"""

from __future__ import annotations

import time

START = time.time()  # the GPU command's limit counts imports too

import argparse
import datetime
import gc
import json
import platform
import re
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from rlcd.engines import SamplingParams
from rlcd.engines.fast import FastEngine
from rlcd.engines.hf import HFEngine
from rlcd.models import cpu_has_native_bf16

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "default": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                    tie_word_embeddings=True),
}
METHODS = ("fast", "static_compile", "generate", "hf_engine")
BOS, EOS, PAD = 1, 2, 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MIN_PROMPT, MAX_PROMPT = 32, 160


class IdTokenizer:
    """Texts are space-separated token ids; just enough of a tokenizer for the engines."""

    padding_side = "left"
    bos_token_id, eos_token_id, pad_token_id = BOS, EOS, PAD

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __len__(self):
        return self.vocab

    def __call__(self, texts, return_tensors=None, padding=False, add_special_tokens=True):
        ids = [[int(t) for t in text.split()] for text in texts]
        if return_tensors != "pt":
            return SimpleNamespace(input_ids=ids)
        width = max(map(len, ids))
        return SimpleNamespace(input_ids=torch.tensor([[PAD] * (width - len(x)) + x for x in ids]),
                               attention_mask=torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids]))

    def decode(self, ids):
        return " ".join(map(str, ids))


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = "cpu" if args.cpu else "cuda"
        self.results: list[dict] = []
        config = LlamaConfig(**SHAPES[args.model_shape], bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
        torch.manual_seed(0)
        t = time.time()
        with torch.device(self.device):
            self.model = LlamaForCausalLM._from_config(config, dtype=DTYPES[args.dtypes[0]]).eval()
        self.dtype = args.dtypes[0]
        print(f"built the {args.model_shape} model on {self.device} in {time.time() - t:.1f}s", flush=True)
        self.tokenizer = IdTokenizer(config.vocab_size)
        # realistic mode: the hook forces EOS with this per-step probability (0 in forced mode)
        self.eos_rate = torch.zeros((), device=self.device)
        self.model.lm_head.register_forward_hook(self._force_eos)
        gen = torch.Generator().manual_seed(1)
        n = 4 * max(args.batch_sizes + [16])
        lengths = torch.randint(MIN_PROMPT, MAX_PROMPT + 1, (n,), generator=gen).tolist()
        self.prompts = [torch.randint(3, config.vocab_size, (k,), generator=gen).tolist() for k in lengths]
        self.out = ROOT / "benchmarks" / "results" / f"generation_{self._machine_name()}.json"
        self.runs, self.kept = self._previous_runs()

    def _force_eos(self, module, inputs, logits):
        hit = torch.rand(logits.shape[:-1], device=logits.device) < self.eos_rate
        logits[..., EOS] += hit.to(logits.dtype) * 1e4
        return logits

    def _machine_name(self) -> str:
        name = "cpu" if self.args.cpu else torch.cuda.get_device_name()
        return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()

    # --- bookkeeping -------------------------------------------------------

    def _setup(self) -> dict:
        return {"machine": {"device": "cpu" if self.args.cpu else torch.cuda.get_device_name(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "cpu_threads": torch.get_num_threads()},
                "model_shape": self.args.model_shape, "new_tokens": self.args.new_tokens, "dtypes": self.args.dtypes,
                "prompt_lengths": [MIN_PROMPT, MAX_PROMPT], "sampling": "temperature 1, top-k 50"}

    def _previous_runs(self):
        """Results of earlier runs of the same setup on this machine: a run of other methods adds to them."""
        try:
            old = json.loads(self.out.read_text())
        except (OSError, ValueError):
            return [], []
        if any(old.get(k) != v for k, v in self._setup().items()):
            return [], []
        measured = {*self.args.methods, "roofline", "self_check"}
        kept = [r for r in old["results"] if r["method"] not in measured or r.get("dtype") not in self.args.dtypes]
        used = sorted({r["run"] for r in kept})  # runs whose results were all measured again are dropped
        return [old["runs"][i] for i in used], [{**r, "run": used.index(r["run"])} for r in kept]

    def have_time(self, need_s: float) -> bool:
        return self.args.deadline is None or time.time() - START + need_s < self.args.deadline

    def record(self, **row):
        row = {"dtype": self.dtype, **{k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}}
        row["run"] = len(self.runs)
        self.results.append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def skip(self, method, batch):
        print(f"skipped {method} at batch {batch}: not enough time left before --deadline", flush=True)
        self.record(method=method, batch=batch, mode="skipped")

    def save(self):
        run = {"command": " ".join(["python"] + sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "python": platform.python_version()}
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps({**self._setup(), "runs": self.runs + [run], "results": self.kept + self.results},
                                       indent=1) + "\n")

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn):
        self.sync()
        t = time.time()
        out = fn()
        self.sync()
        return time.time() - t, out

    def cleanup(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    def reset_compiled(self):
        torch._dynamo.reset()  # drops compiled code and whatever its guards still hold
        self.cleanup()

    # --- roofline ------------------------------------------------------------

    def roofline(self):
        if self.args.cpu:
            return None
        x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
        y = torch.empty_like(x)
        y.copy_(x)
        seconds, _ = self.timed(lambda: [y.copy_(x) for _ in range(10)])  # noqa: F821 (x and y are deleted below, after the call)
        bandwidth = 2 * x.numel() * 10 / seconds  # each copy reads and writes every byte
        del x, y
        self.cleanup()
        config = self.model.config
        head_dim = config.hidden_size // config.num_attention_heads
        kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        info = {"hbm_bandwidth_gb_s": bandwidth / 1e9, "weight_bytes": weights, "kv_bytes_per_token": kv_per_token,
                "mean_context": {}, "tok_s": {}}
        for b in sorted({16, *self.args.batch_sizes}):
            # the forced run's rows: their prompts plus, on average over the decode steps, half the new tokens
            context = sum(len(p) for p in self.prompts[:b]) / b + (self.args.new_tokens + 1) / 2
            info["mean_context"][b] = context
            info["tok_s"][b] = b * bandwidth / (weights + b * context * kv_per_token)
        return info

    # --- methods -------------------------------------------------------------

    def texts(self, n):
        return [self.tokenizer.decode(p) for p in self.prompts[:n]]

    def run_engine(self, name, engine, batch):
        new = self.args.new_tokens
        forced = SamplingParams(max_new_tokens=new, temperature=1.0, top_k=50, stop_at_eos=False)
        self.eos_rate.fill_(0)
        if "forced" in self.args.modes:
            texts = self.texts(batch)
            # ours on a GPU compiles and captures its step on first use (the slot cache's length must not change
            # afterwards); otherwise a few tokens warm up
            warm = forced if isinstance(engine, FastEngine) and engine.on_cuda else replace(forced, max_new_tokens=4)
            warmup, _ = self.timed(lambda: engine.generate(texts, warm, seeds=list(range(batch))))
            prefill, _ = self.timed(lambda: engine.generate(texts, SamplingParams(max_new_tokens=1, stop_at_eos=False), seeds=list(range(batch))))
            seconds, outs = self.timed(lambda: engine.generate(texts, forced, seeds=list(range(batch))))
            assert all(o.num_tokens == new for o in outs)
            self.record_forced(name, batch, seconds, prefill, warmup)
        if "realistic" in self.args.modes and self.have_time(60):
            texts = self.texts(4 * batch)
            self.eos_rate.fill_(3 / new)
            params = SamplingParams(max_new_tokens=new, temperature=1.0, top_k=50)
            seconds, outs = self.timed(lambda: engine.generate(texts, params, seeds=list(range(len(texts)))))
            self.eos_rate.fill_(0)
            self.record(method=name, mode="realistic", batch=batch, prompts=len(texts), tokens=sum(o.num_tokens for o in outs),
                        seconds=seconds, tok_s=sum(o.num_tokens for o in outs) / seconds)

    def run_generate(self, name, batch):
        new = self.args.new_tokens

        def generate(prompts, max_new, eos):
            # the static cache needs one shape: its batches are padded to the longest possible prompt
            width = MAX_PROMPT if name == "static_compile" else max(map(len, prompts))
            ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts], device=self.device)
            mask = (torch.arange(width, device=self.device) >= torch.tensor([width - len(p) for p in prompts], device=self.device)[:, None]).long()
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=50,
                                      max_new_tokens=max_new, eos_token_id=eos, pad_token_id=PAD)
            return out[:, width:]

        self.eos_rate.fill_(0)
        if "forced" in self.args.modes:
            prompts = self.prompts[:batch]
            # prefill first: a static cache of another length would be rebuilt (and its graphs re-recorded) in the timed
            # run; twice, as the first call of a shape pays one-time costs (cuDNN attention plans)
            generate(prompts, 1, None)
            prefill, _ = self.timed(lambda: generate(prompts, 1, None))
            # compiled: the warm-up must compile and record the decode graphs; eager: a short run warms up
            warmup, _ = self.timed(lambda: generate(prompts, new if name == "static_compile" else 4, None))
            seconds, out = self.timed(lambda: generate(prompts, new, None))
            assert out.shape[1] == new
            self.record_forced(name, batch, seconds, prefill, warmup)
        if "realistic" in self.args.modes and self.have_time(90):
            self.eos_rate.fill_(3 / new)
            tokens, seconds = 0, 0.0
            for start in range(0, 4 * batch, batch):
                t, out = self.timed(lambda: generate(self.prompts[start : start + batch], new, EOS))
                seconds += t
                # generated tokens before each row's EOS (as the engines count them)
                ended = (out == EOS).int()
                tokens += int(torch.where(ended.any(1), ended.argmax(1), torch.full_like(ended[:, 0], out.shape[1])).sum())
            self.eos_rate.fill_(0)
            self.record(method=name, mode="realistic", batch=batch, prompts=4 * batch, tokens=tokens, seconds=seconds,
                        tok_s=tokens / seconds)

    def record_forced(self, name, batch, seconds, prefill, warmup):
        new = self.args.new_tokens
        decode_s = seconds - prefill  # the prefill-only run also sampled the first token
        row = dict(method=name, mode="forced", batch=batch, tokens=batch * new, seconds=seconds, tok_s=batch * new / seconds,
                   decode_tok_s=batch * (new - 1) / decode_s if decode_s > 0 else None, prefill_s=prefill, warmup_s=warmup)
        if self.roof and row["decode_tok_s"]:
            row["roofline_fraction"] = row["decode_tok_s"] / self.roof["tok_s"][batch]
        self.record(**row)

    def self_check(self):
        """FastEngine against HFEngine on a tiny fp32 model (greedy and sampled, rows ending early, slots refilled).

        On the GPU this exercises the compiled step, the CUDA graph and the Triton attention kernel, which the CPU
        tests cannot; the two engines' attention kernels differ, so an odd near-tie may still flip a token.
        """
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
        with torch.device(self.device):
            model = LlamaForCausalLM._from_config(config, dtype=torch.float32).eval()

        def push_eos(module, inputs, logits):  # rows end when their own top token id is a multiple of 7
            logits[..., EOS] += torch.where(logits.argmax(-1) % 7 == 0, 1e4, 0.0)
            return logits

        model.lm_head.register_forward_hook(push_eos)
        gen = torch.Generator().manual_seed(0)
        texts = [" ".join(map(str, torch.randint(3, 512, (n,), generator=gen).tolist())) for n in (3, 40, 17, 5, 29, 9, 33, 12, 21)]
        tokenizer, seeds, row = IdTokenizer(512), list(range(len(texts))), {}
        ours, theirs = FastEngine(model, tokenizer, batch_size=4), HFEngine(model, tokenizer, batch_size=16)
        for name, params in (("greedy", SamplingParams(max_new_tokens=24, temperature=0)),
                             ("sampled", SamplingParams(max_new_tokens=24, temperature=1.0, top_k=20))):
            same = [a == b for a, b in zip(ours.generate(texts, params, seeds), theirs.generate(texts, params, seeds))]
            row[f"{name}_identical"] = f"{sum(same)}/{len(same)}"
        del ours, theirs, model
        self.reset_compiled()
        self.record(method="self_check", mode="check", batch=4, **row)

    def run(self):
        if not self.args.cpu:
            self.self_check()
        for dtype in self.args.dtypes:
            self.dtype = dtype
            self.model.to(DTYPES[dtype])
            self.run_methods()

    def run_methods(self):
        self.roof = self.roofline()
        if self.roof:
            for b, tok_s in self.roof["tok_s"].items():
                self.record(method="roofline", batch=b, mode="roofline", hbm_bandwidth_gb_s=self.roof["hbm_bandwidth_gb_s"],
                            weight_bytes=self.roof["weight_bytes"], kv_bytes_per_token=self.roof["kv_bytes_per_token"],
                            mean_context=self.roof["mean_context"][b], tok_s=tok_s)
        compile_s = 0 if self.args.cpu else 90  # what we budget for one torch.compile of the 7B model
        methods = self.args.methods
        # ours and the compiled baseline first, batch by batch: the comparisons that matter most if time runs out
        for b in self.args.batch_sizes:
            if "fast" in methods:
                if self.have_time(compile_s + 30):
                    engine = FastEngine(self.model, self.tokenizer, batch_size=b)
                    self.run_engine("fast", engine, b)
                    engine._slots = engine._graph = None  # free the slot cache now, whatever still refers to the engine
                    del engine
                    self.reset_compiled()
                else:
                    self.skip("fast", b)
            if "static_compile" in methods:
                if self.have_time(2 * compile_s + 30):  # prefill and decode both compile
                    # transformers' own recipe: with a static cache, generate compiles the decoding forward itself
                    # (torch.compile(mode="reduce-overhead"), i.e. CUDA graphs); prefill stays eager
                    self.model.generation_config.cache_implementation = "static"
                    self.run_generate("static_compile", b)
                    self.model.__dict__.pop("_compiled_call", None)
                    self.model.generation_config.cache_implementation = None
                    self.reset_compiled()
                else:
                    self.skip("static_compile", b)
        batches = self.args.batch_sizes
        for b in sorted({16, *batches}) if "generate" in methods else []:  # 16: the original scripts' batch
            if not self.have_time(40):
                self.skip("generate", b)
                continue
            self.run_generate("generate", b)
            self.cleanup()
        for b in batches if "hf_engine" in methods else []:
            if not self.have_time(40):
                self.skip("hf_engine", b)
                continue
            self.run_engine("hf_engine", HFEngine(self.model, self.tokenizer, batch_size=b), b)
            self.cleanup()

    def table(self):
        rows = [r for r in self.kept + self.results if r["method"] in METHODS and r["mode"] != "skipped"]
        compiled = {(r["mode"], r["batch"], r.get("dtype")): r["tok_s"] for r in rows if r["method"] == "static_compile"}
        original = {(r["mode"], r.get("dtype")): r["tok_s"] for r in rows if r["method"] == "generate" and r["batch"] == 16}

        def ratio(value, base):
            return f"{value / base:>10.2f}x" if base else f"{'-':>11}"

        print(f"\n{'method':<16}{'dtype':<10}{'mode':<11}{'batch':>6}{'tokens':>8}{'seconds':>9}{'tok/s':>9}{'decode tok/s':>14}"
              f"{'prefill s':>11}{'warm-up s':>11}{'roofline':>10}{'vs static':>11}{'vs gen@16':>11}{'vs fp32 gen@16':>16}")
        for r in rows:
            dtype = r.get("dtype")
            cells = [f"{r['method']:<16}{dtype or '?':<10}{r['mode']:<11}{r['batch']:>6}{r['tokens']:>8}{r['seconds']:>9.2f}{r['tok_s']:>9.0f}"]
            decode = f"{r['decode_tok_s']:>14.0f}" if r.get("decode_tok_s") else f"{'-':>14}"
            cells.append(f"{decode}{r['prefill_s']:>11.2f}{r['warmup_s']:>11.1f}" if "prefill_s" in r else " " * 36)
            cells.append(f"{r['roofline_fraction']:>10.0%}" if "roofline_fraction" in r else " " * 10)
            cells.append(ratio(r["tok_s"], compiled.get((r["mode"], r["batch"], dtype))))
            cells.append(ratio(r["tok_s"], original.get((r["mode"], dtype))))
            cells.append(" " * 5 + ratio(r["tok_s"], original.get((r["mode"], "float32"))))
            print("".join(cells))
        if self.roof:
            print(f"roofline ({self.roof['hbm_bandwidth_gb_s']:.0f} GB/s measured): "
                  + ", ".join(f"batch {b} {v:.0f} tok/s (mean context {self.roof['mean_context'][b]:.0f})"
                              for b, v in self.roof["tok_s"].items()))
        for r in self.results:
            if r["method"] == "self_check":
                print(f"self-check, FastEngine vs HFEngine (tiny fp32 model): greedy {r['greedy_identical']}, "
                      f"sampled {r['sampled_identical']} completions identical")
        skipped = [f"{r['method']}@{r['batch']}" for r in self.results if r["mode"] == "skipped"]
        print(f"results: {self.out.relative_to(ROOT)}; total {time.time() - START:.0f}s"
              + (f"; skipped for time: {', '.join(skipped)}" if skipped else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="CPU comparison: default shape, batch 16, ours vs plain generate and HFEngine")
    parser.add_argument("--model-shape", choices=sorted(SHAPES), help="7b (GPU default) or default (SmolLM2-135M shape)")
    parser.add_argument("--batch-sizes", help="comma-separated (GPU default 64,256; CPU 16); plain generate also runs at 16")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)} (default: all that run on the device)")
    parser.add_argument("--modes", default="forced,realistic", help="subset of forced,realistic")
    parser.add_argument("--skip-baselines", action="store_true", help="only ours (same as --methods fast)")
    parser.add_argument("--dtypes", help="comma-separated float32,bfloat16 (GPU default bfloat16; CPU float32, plus bfloat16 if native)")
    parser.add_argument("--deadline", type=float, help="seconds: start no configuration that might end later (GPU default 480)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no GPU: use --cpu")
    args.model_shape = args.model_shape or ("default" if args.cpu else "7b")
    args.batch_sizes = [int(b) for b in (args.batch_sizes or ("16" if args.cpu else "64,256")).split(",")]
    args.methods = ["fast"] if args.skip_baselines else (args.methods or ("fast,generate,hf_engine" if args.cpu else ",".join(METHODS))).split(",")
    if set(args.methods) - set(METHODS) or (args.cpu and "static_compile" in args.methods):
        parser.error(f"--methods: choose from {','.join(METHODS)} (static_compile needs a GPU)")
    args.modes = args.modes.split(",")
    default_dtypes = ("float32,bfloat16" if cpu_has_native_bf16() else "float32") if args.cpu else "bfloat16"
    args.dtypes = (args.dtypes or default_dtypes).split(",")
    if set(args.dtypes) - set(DTYPES):
        parser.error(f"--dtypes: choose from {','.join(DTYPES)}")
    if args.deadline is None and not args.cpu:
        args.deadline = 480.0
    bench = Bench(args)
    try:
        bench.run()
    finally:
        bench.table()


if __name__ == "__main__":
    main()
