"""Benchmark: FastEngine's decode attention kernel against SDPA over a padded static cache, on a GPU.

One decode step's attention for one layer (bf16) of the LLaMA-7B shape (32 heads of 128),
a grouped-query shape (32 query heads over 8 key/value heads, as LLaMA-3-8B) and the
default model's (9 over 3, of 64): each row attends to its live columns [start, end) of
its slot (prompt 32..160 tokens plus `--generated` new ones) in a cache of `--length`
columns. Methods: ours (the Triton kernel in rlcd.engines.fast as the engine launches it;
with --sweep also at every launch setting given: block of columns, warps, pipeline
stages) and `scaled_dot_product_attention` over every column with a mask (what a padded
static cache computes), each timed inside a CUDA graph as the engine runs it. Limit: the
live keys and values' bytes / measured HBM bandwidth (a copy). Prints a table and writes
JSON to benchmarks/results/.

    python benchmarks/slot_attention.py
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from rlcd.engines import fast

ROOT = Path(__file__).resolve().parents[1]


def bandwidth() -> float:
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / timed(lambda: y.copy_(x), calls=2)


def timed(fn, calls: int = 20, reps: int = 10) -> float:
    """Median GPU seconds per call: `calls` calls captured in one CUDA graph (as the engine's step holds the
    kernel, so no launch overhead is counted), replayed `reps` times after a warm-up."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compiles the kernel; must precede capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


SHAPES = {"7b": (32, 32, 128), "gqa-8b": (32, 8, 128), "default": (9, 3, 64)}  # query heads, key/value heads, head dim


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="7b,gqa-8b,default", help=f"comma-separated of {','.join(SHAPES)}")
    p.add_argument("--batch-sizes", default="64,256")
    p.add_argument("--length", type=int, default=320, help="slot columns (the engine's cache for 160 + 128 tokens)")
    p.add_argument("--generated", type=int, default=64, help="tokens generated so far (128-token runs average 64)")
    p.add_argument("--sweep", action="store_true", help="also every launch setting of blocks x warps x stages")
    p.add_argument("--blocks", default="32,64,128")
    p.add_argument("--warps", default="2,4,8")
    p.add_argument("--stages", default="1,2,3")
    args = p.parse_args()
    bw = bandwidth()
    rows = []
    for shape, batch in itertools.product(args.shapes.split(","), map(int, args.batch_sizes.split(","))):
        heads, kv_heads, dim = SHAPES[shape]
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(32, 161, (batch,), generator=gen)
        start = (160 - prompt).cuda()  # left padded to 160, as the prefill writes them
        end = torch.full((batch,), 160 + args.generated).cuda()
        q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, kv_heads, args.length, dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        live_bytes = int((end - start).sum()) * kv_heads * dim * 2 * 2
        limit_s = live_bytes / bw
        scale = dim**-0.5
        cols = torch.arange(args.length, device="cuda")
        mask = ((cols >= start[:, None]) & (cols < end[:, None]))[:, None, None, :]
        sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        ref = sdpa()[:, :, 0].float()
        common = dict(shape=shape, batch=batch)
        s = timed(sdpa)
        rows.append(dict(method="sdpa_padded", **common, us=s * 1e6, limit_fraction=limit_s / s))
        s = timed(lambda: torch.ops.rlcd.slot_attention(q, k, v, start, end, scale))
        err = (torch.ops.rlcd.slot_attention(q, k, v, start, end, scale).float() - ref).abs().max().item()
        rows.append(dict(method="ours", **common, us=s * 1e6, limit_fraction=limit_s / s, max_abs_error=err))
        settings = itertools.product(*(map(int, x.split(",")) for x in (args.blocks, args.warps, args.stages)))
        for block, warps, stages in settings if args.sweep else []:
            out = torch.empty_like(q)
            s = timed(lambda: fast._slot_attention_kernel[(batch, kv_heads)](
                q, k, v, out, start, end, scale, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
                v.stride(2), HEADS=heads, GROUP=heads // kv_heads, DIM=dim, DIM_P=max(16, dim),
                ROWS=max(16, triton.next_power_of_2(heads // kv_heads)), BLOCK=block, IEEE=False, num_warps=warps,
                num_stages=stages))
            rows.append(dict(method="ours_setting", **common, block=block, warps=warps, stages=stages, us=s * 1e6,
                             limit_fraction=limit_s / s, max_abs_error=(out.float() - ref).abs().max().item()))
        print(f"{shape} ({heads}/{kv_heads} heads of {dim}), batch {batch}: live KV {live_bytes / 1e6:.0f} MB, "
              f"bandwidth limit {limit_s * 1e6:.0f} us")
        mine = [r for r in rows if r["shape"] == shape and r["batch"] == batch]
        for r in sorted(mine, key=lambda r: r["us"])[:8]:
            name = r["method"] if "block" not in r else f"block {r['block']} warps {r['warps']} stages {r['stages']}"
            ratio = mine[0]["us"] / r["us"]
            print(f"  {name:34}{r['us']:>8.0f} us{r['limit_fraction']:>7.0%} of limit{ratio:>7.2f}x sdpa")
    out = ROOT / "benchmarks" / "results" / "slot_attention.json"
    out.write_text(json.dumps({
        "benchmark": "slot_attention", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv), "machine": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "platform": platform.platform()}, "hbm_bandwidth_gb_s": bw / 1e9, "settings": vars(args), "results": rows}, indent=2) + "\n")
    print(out)


if __name__ == "__main__":
    main()
