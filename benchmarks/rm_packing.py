"""Benchmark: train-rm's micro-batch forward and backward with each pair packed in one row (its conversation once,
each reply masked from the other: `rlcd.packing`, a 4-D mask) against TRL's layout (chosen rows, then rejected rows,
right padded, a 2-D mask, so SDPA may pick its fused kernels), in one run, alternating.

Random weights of two shapes (SmolLM2-135M, Qwen2.5-1.5B; no download), bf16 autocast on float32 weights as train-rm's
full fine-tuning does on a GPU, lengths like hh-rlhf pairs (a conversation of 60-400 tokens, replies of 20-120), 8 and
16 pairs a micro-batch. The time is the median of the repeats after the first, the better of two alternating rounds per
layout; the speed-up is padded over packed. On a CPU (a smoke run, tests/test_rm_packing_benchmark.py) only a tiny model of the small shape's layout
runs, in float32.

    python benchmarks/rm_packing.py          # one GPU, about a minute
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForSequenceClassification, Qwen2Config, Qwen2ForSequenceClassification

from rlcd.packing import pair_row
from rlcd.reward_model import packed_inputs, packed_scores, pad_right

SHAPES = {
    "smollm2-135m": (LlamaForSequenceClassification, dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                                          num_attention_heads=9, num_key_value_heads=3), LlamaConfig),
    "qwen2.5-1.5b": (Qwen2ForSequenceClassification, dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                                          num_attention_heads=12, num_key_value_heads=2), Qwen2Config),
}


def pairs_like_hh(n: int, rng: random.Random) -> list[tuple[list[int], list[int]]]:
    pairs = []
    for _ in range(n):
        conversation = [rng.randrange(3, 1000) for _ in range(rng.randint(60, 400))]
        pairs.append(tuple(conversation + [rng.randrange(3, 1000) for _ in range(rng.randint(20, 120))] for _ in range(2)))
    return pairs


def step_ms(model, pairs, packed: bool, device: str, repeats: int) -> float:
    """Median time of one forward and backward of the preference loss, after a first untimed one."""
    times = []
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            if packed:
                scores = packed_scores(model, model, packed_inputs([pair_row(c, r) for c, r in pairs], 0, model)).float()
                chosen, rejected = scores[0::2], scores[1::2]
            else:
                ids, mask = pad_right([c for c, _ in pairs] + [r for _, r in pairs], 0)
                chosen, rejected = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits[:, 0].float().chunk(2)
        (-torch.nn.functional.logsigmoid(chosen - rejected).mean()).backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1000


def main() -> Path:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    out = {"benchmark": "rm_packing", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "machine": {"device": name, "platform": platform.platform(), "torch": torch.__version__}, "results": {}}
    for shape, (cls, sizes, config_cls) in SHAPES.items():
        if device == "cpu" and shape != "smollm2-135m":
            continue
        config = config_cls(**sizes, pad_token_id=0, max_position_embeddings=4096)
        if device == "cpu":  # a smoke run: the shape's layout, tiny sizes
            config = config_cls(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, pad_token_id=0, max_position_embeddings=4096)
        torch.manual_seed(0)
        model = cls(config).to(device)
        rng = random.Random(0)
        for batch in (8, 16):
            pairs = pairs_like_hh(batch, rng)
            times = {"padded": [], "packed": []}
            for _ in range(2):  # alternating
                for layout in times:
                    times[layout].append(step_ms(model, pairs, layout == "packed", device, 2 if device == "cpu" else 7))
            padded, packed = min(times["padded"]), min(times["packed"])
            row = {"padded_ms": round(padded, 2), "packed_ms": round(packed, 2), "speedup": round(padded / packed, 3),
                   "tokens": sum(len(c) + len(r) for c, r in pairs), "packed_tokens": sum(pair_row(c, r).length for c, r in pairs)}
            out["results"][f"{shape} batch {batch}"] = row
            print(f"{shape:14} {batch:3} pairs  padded {padded:8.1f} ms  packed {packed:8.1f} ms  {padded / packed:5.2f}x  "
                  f"tokens {row['tokens']} -> {row['packed_tokens']}", flush=True)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    machine = name.lower().replace(" ", "-")
    path = Path(os.environ.get("RLCD_BENCH_OUT", Path(__file__).resolve().parent / "results")) / f"rm_packing_{machine}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(path)
    return path


if __name__ == "__main__":
    main()
