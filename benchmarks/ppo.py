"""Benchmark: PPO step time and rollouts/s of `rlcd ppo`, and rollout throughput against plain `generate`.

Models have random weights in a real shape (timing does not depend on weights), built on the
GPU: "default" = the SmolLM2-135M shape with full fine-tuning (fp32 master weights, bf16
autocast), "7b" = the LLaMA-7B shape in bf16 with LoRA (r 16) on policy and value. Policy,
reward model and value backbone each have the shape. Prompts are random token ids (32..160);
a forward hook on the policy's output layer forces EOS with probability 3/max_new_tokens per
step while sampling rollouts, so responses end at random lengths (mean ~1/3 of the limit)
and, with --accept-eos semantics, get scored by the reward model (random weights never
write the end marker).

Per setting: a few PPO steps through `rlcd.ppo.PPO` (the first one includes compilation),
then the same rollout batch through plain `model.generate` (sampling, same prompts, same batch
size, same EOS hook) for the rollout-throughput ratio.

    python benchmarks/ppo.py --shapes default,7b
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import BatchEncoding, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import BOS, EOS, PAD, SHAPES, IdTokenizer  # noqa: E402

from rlcd import ppo  # noqa: E402
from rlcd.cli import build_parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Tokenizer(IdTokenizer):
    """IdTokenizer that also reads the reward-model input (words that are not ids become token 3)."""

    model_max_length = 4096
    truncation_side = "left"

    def __call__(self, texts, return_tensors=None, padding=False, add_special_tokens=True, **kwargs):
        if isinstance(texts, str):
            return BatchEncoding({"input_ids": [int(t) if t.isdigit() else 3 for t in texts.split()]})
        if return_tensors == "pt":
            return super().__call__(texts, return_tensors, padding, add_special_tokens)
        return BatchEncoding({"input_ids": [[int(t) if t.isdigit() else 3 for t in text.split()] for text in texts]})


def build(shape: str, lora: bool, device: str):
    config = LlamaConfig(**SHAPES[shape], bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    weights = torch.bfloat16 if lora else torch.float32
    with torch.device(device):
        policy = LlamaForCausalLM._from_config(config, dtype=weights)
        reference = None if lora else LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).requires_grad_(False)
        config.num_labels = 1
        rm = LlamaForSequenceClassification._from_config(config, dtype=torch.bfloat16).requires_grad_(False).eval()
        critic = LlamaForSequenceClassification._from_config(config, dtype=torch.bfloat16 if lora else torch.float32)
    backbone = critic.base_model
    if lora:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
        backbone = get_peft_model(backbone, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    value = ppo.ValueModel(backbone, config.hidden_size).to(device)
    tok = Tokenizer(config.vocab_size)
    return policy.eval(), reference, value.eval(), rm, tok, tok


def run_setting(name: str, shape: str, lora: bool, rollouts: int, max_new: int, micro: int, steps: int, device: str,
                gen_batch: int = 256) -> dict:
    print(f"== {name}: building", flush=True)
    models = build(shape, lora, device)
    policy = models[0]
    eos_rate = torch.zeros((), device=device)

    def force_eos(module, inputs, logits):
        hit = torch.rand(logits.shape[:-1], device=logits.device) < eos_rate
        logits[..., EOS] += hit.to(logits.dtype) * 1e4
        return logits

    policy.get_output_embeddings().register_forward_hook(force_eos)
    real_build = ppo.build_models
    ppo.build_models = lambda args, dev: models
    argv = ["ppo", "--prompts", "x", "--reward-model", "x", "--out-dir", "x", "--steps", str(steps), "--rollouts", str(rollouts),
            "--minibatch-size", str(min(256, rollouts)), "--micro-batch-size", str(micro), "--forward-batch-size", str(2 * micro),
            "--generation-batch-size", str(min(gen_batch, rollouts)), "--max-new-tokens", str(max_new), "--accept-eos",
            "--no-stop-at-marker", *(["--lora"] if lora else [])]
    args = build_parser("ppo").parse_args(argv)
    gen = torch.Generator().manual_seed(1)
    vocab = SHAPES[shape]["vocab_size"]
    prompts = []
    for i in range(4 * rollouts):
        ids = [BOS] + torch.randint(3, vocab, (int(torch.randint(32, 161, (1,), generator=gen)),), generator=gen).tolist()
        prompts.append((i, " ".join(map(str, ids)), ids))
    trainer = ppo.PPO(args, prompts, device)
    ppo.build_models = real_build
    real_generate = trainer.engine.generate

    def generate(*a, **k):
        eos_rate.fill_(3 / max_new)
        try:
            return real_generate(*a, **k)
        finally:
            eos_rate.fill_(0)

    trainer.engine.generate = generate
    log = []
    for _ in range(steps):
        sync(device)
        t = time.time()
        stats = trainer.run_step()
        sync(device)
        stats["wall"] = time.time() - t
        stats["tokens"] = stats["response_length"] * rollouts
        log.append(stats)
        print(f"  step {stats['step']}: {stats['wall']:.1f}s (rollout {stats['time_rollout']:.1f}, score {stats['time_score']:.1f}, "
              f"forward {stats['time_forward']:.1f}, train {stats['time_train']:.1f}), mean length {stats['response_length']:.0f}", flush=True)
    warm = log[1:] or log
    ours = {k: sum(s[k] for s in warm) / len(warm) for k in ("wall", "time_rollout", "time_score", "time_forward", "time_train", "tokens")}

    # plain generate on the same rollout batch: sampling, same batch size and EOS hook
    batch = min(gen_batch, rollouts)
    chosen = trainer.step_prompts(len(log))
    eos_rate.fill_(3 / max_new)
    generated, t0 = 0, time.time()
    with torch.no_grad():
        for start in range(0, rollouts, batch):
            rows = [ids for _, _, ids in chosen[start : start + batch]]
            width = max(map(len, rows))
            input_ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
            out = policy.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=max_new,
                                  pad_token_id=PAD, eos_token_id=EOS)
            new = out[:, width:]
            ended = (new == EOS).int().cumsum(1)
            generated += int(((ended == 0) | ((ended == 1) & (new == EOS))).sum())
    sync(device)
    plain_seconds = time.time() - t0
    eos_rate.fill_(0)
    result = {
        "setting": name, "shape": shape, "lora": lora, "rollouts_per_step": rollouts, "generation_batch": min(gen_batch, rollouts), "max_new_tokens": max_new,
        "micro_batch_size": micro, "steps": steps,
        "first_step_seconds": round(log[0]["wall"], 2),
        "step_seconds": round(ours["wall"], 2),
        "rollouts_per_second": round(rollouts / ours["wall"], 1),
        "phase_seconds": {k: round(ours[k], 2) for k in ("time_rollout", "time_score", "time_forward", "time_train")},
        "rollout_tokens_per_second": round(ours["tokens"] / ours["time_rollout"], 1),
        "plain_generate_tokens_per_second": round(generated / plain_seconds, 1),
        "rollout_speedup_vs_generate": round((ours["tokens"] / ours["time_rollout"]) / (generated / plain_seconds), 2),
        "engine": type(trainer.engine).__name__,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None,
    }
    print(json.dumps(result), flush=True)
    del trainer, models, policy
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="default,7b")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", default=None)
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny shape on CPU: checks the script, measures nothing")
    args = p.parse_args()
    # 7b: 64 generation slots (256 slots of 320 columns would need 43 GB of KV cache beside three 7B models) and micro
    # batches of 4 (8 ran out of memory on an 80 GB H100: LoRA training activations of policy and value)
    settings = {"default": ("default-full", "default", False, 512, 32, 256), "7b": ("7b-lora", "7b", True, 256, 4, 64)}
    if args.cpu_smoke:
        SHAPES["tiny"] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              vocab_size=500, max_position_embeddings=512)
        for lora in (False, True):
            run_setting("tiny", "tiny", lora, 8, 8, 4, 2, "cpu")
        return
    results = []
    for s in args.shapes.split(","):
        name, shape, lora, rollouts, micro, gen_batch = settings[s]
        results.append(run_setting(name, shape, lora, rollouts, args.max_new_tokens, micro, args.steps, "cuda", gen_batch))
    name = torch.cuda.get_device_name().lower().replace(" ", "-")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"ppo_{name}.json")
    out.write_text(json.dumps({
        "benchmark": "ppo", "date": datetime.date.today().isoformat(), "machine": torch.cuda.get_device_name(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "command": "python benchmarks/ppo.py " + " ".join(sys.argv[1:]), "results": results,
    }, indent=2) + "\n")
    print(f"{'setting':<14}{'step s':>8}{'rollouts/s':>12}{'rollout tok/s':>15}{'generate tok/s':>16}{'ratio':>7}")
    for r in results:
        print(f"{r['setting']:<14}{r['step_seconds']:>8}{r['rollouts_per_second']:>12}{r['rollout_tokens_per_second']:>15}"
              f"{r['plain_generate_tokens_per_second']:>16}{r['rollout_speedup_vs_generate']:>7}")
    print(out)


if __name__ == "__main__":
    main()
