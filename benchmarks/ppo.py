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

--levers: the training levers of `rlcd ppo` (--sort-by-length, --gradient-checkpointing, both, and
--shared-value-head, which changes the value model and so the losses too) against neither, on one
rollout batch sampled and scored once: per lever, the rest of a PPO step (forward phase: old/ref
log-probs and values; train phase: the updates) from the same weights, alternating the settings
--repeats times; seconds, the peak memory the step added (GPU: allocated; CPU: resident set, VmHWM)
and the step's losses, as ratios to neither. On CPU every model is float32.

    python benchmarks/ppo.py --shapes default,7b
    python benchmarks/ppo.py --levers --shapes default --rollouts 16 --micro-batch-size 4 --max-new-tokens 64
    python benchmarks/ppo.py --levers --shapes default --rollouts 8 --micro-batch-size 4 --max-new-tokens 32 (the demo's sizes)
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import json
import os
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
from rlcd.cli import parse  # noqa: E402

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
    half = torch.bfloat16 if device == "cuda" else torch.float32  # CPUs without native bf16 run it slowly
    weights = half if lora else torch.float32
    with torch.device(device):
        policy = LlamaForCausalLM._from_config(config, dtype=weights)
        reference = None if lora else LlamaForCausalLM._from_config(config, dtype=half).requires_grad_(False)
        config.num_labels = 1
        rm = LlamaForSequenceClassification._from_config(config, dtype=half).requires_grad_(False).eval()
        critic = LlamaForSequenceClassification._from_config(config, dtype=weights)
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
    args = parse(argv)
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
        "setting": name, "shape": shape, "lora": lora, "rollouts_per_step": rollouts, "generation_batch": min(gen_batch, rollouts),
        "max_new_tokens": max_new,
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
    del trainer, policy  # (models, which ppo.build_models returned, goes with this frame)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


LEVERS = {"neither": [], "sort-by-length": ["--sort-by-length"], "gradient-checkpointing": ["--gradient-checkpointing"],
          "both": ["--sort-by-length", "--gradient-checkpointing"], "shared-value-head": ["--shared-value-head"]}


def measure_levers(shape: str, lora: bool, rollouts: int, max_new: int, micro: int, repeats: int, device: str) -> dict:
    print(f"== levers, {shape}{' lora' if lora else ''} on {device}: building", flush=True)
    models = build(shape, lora, device)
    policy, value = models[0], models[2]
    shared = ppo.ValueModel(None, policy.config.hidden_size).to(device)  # --shared-value-head: only a head, on the policy
    start = [{k: v.clone() for k, v in m.state_dict().items()} for m in (policy, value, shared)]
    eos_rate = torch.zeros((), device=device)
    policy.get_output_embeddings().register_forward_hook(
        lambda module, inputs, logits: logits.index_add_(-1, torch.tensor([EOS], device=logits.device),
                                                         (1e4 * (torch.rand(*logits.shape[:-1], 1, device=logits.device) < eos_rate)).to(logits.dtype)))
    real_build = ppo.build_models
    ppo.build_models = lambda args, dev: (*models[:2], shared if args.shared_value_head else value, *models[3:])
    real_collate = ppo.collate
    gen = torch.Generator().manual_seed(1)
    prompts = []
    for i in range(rollouts):
        ids = [BOS] + torch.randint(3, SHAPES[shape]["vocab_size"], (int(torch.randint(32, 161, (1,), generator=gen)),), generator=gen).tolist()
        prompts.append((i, " ".join(map(str, ids)), ids))

    def trainer(extra: list[str]) -> ppo.PPO:
        argv = ["ppo", "--prompts", "x", "--reward-model", "x", "--out-dir", "x", "--steps", "10", "--rollouts", str(rollouts),
                "--minibatch-size", str(rollouts), "--micro-batch-size", str(micro), "--forward-batch-size", str(2 * micro),
                "--max-new-tokens", str(max_new), "--accept-eos", "--no-stop-at-marker", *(["--lora"] if lora else []), *extra]
        return ppo.PPO(parse(argv), prompts, device)

    # one rollout batch, sampled and scored once: the levers act after sampling
    eos_rate.fill_(3 / max_new)
    first = trainer([])
    t = time.time()
    fixed = first.sample([0])[0]
    first.score(fixed)
    eos_rate.fill_(0)
    print(f"  sampled and scored {rollouts} rollouts in {time.time() - t:.1f}s, mean length "
          f"{sum(len(r.response_ids) for r in fixed) / rollouts:.0f}", flush=True)
    epochs = first.args.epochs
    del first
    runs: dict[str, list[dict]] = {name: [] for name in LEVERS}
    # a first step, not counted: the process's first one was slower and took more memory (first touches of the heap)
    order = [("warm-up", "neither")] + [(name, name) for rep in range(repeats) for name in list(LEVERS)[:: 1 if rep % 2 == 0 else -1]]
    for label, name in order:  # the settings in alternating order: drift falls on every setting alike
        for m, state in zip((policy, value, shared), start):
            m.load_state_dict(state)
        ppo_trainer = trainer(LEVERS[name])
        ppo_trainer.sample = lambda steps, engine=None: [copy.deepcopy(fixed)]
        ppo_trainer.score = lambda rollouts: None
        cpu = {}  # CPU seconds of this process per phase: on a shared CPU, steadier than wall seconds
        for phase, key in (("evaluate", "cpu_forward"), ("train", "cpu_train")):
            setattr(ppo_trainer, phase, cpu_timed(getattr(ppo_trainer, phase), cpu, key))
        positions = {"forward_positions": 0, "train_positions": 0}  # token positions through the models, padding included
        ppo.collate = counting_collate(real_collate, positions)
        base = reset_peak_memory(device)
        sync(device)
        stats = ppo_trainer.run_step()
        sync(device)
        ppo.collate = real_collate
        stats.update(cpu, **positions, peak_memory_gib=round((peak_memory(device) - base) / 2**30, 3))
        if label != "warm-up":
            runs[name].append(stats)
        print(f"  {label:<24} forward {stats['time_forward']:.1f}s ({cpu['cpu_forward']:.1f} CPU s), train {stats['time_train']:.1f}s "
              f"({cpu['cpu_train']:.1f} CPU s), peak +{stats['peak_memory_gib']:.2f} GiB, policy loss {stats['policy_loss']:.6f}",
              flush=True)
        del ppo_trainer
    ppo.build_models = real_build

    def mean(name, key):
        return sum(s[key] for s in runs[name]) / len(runs[name])

    result = {"shape": shape, "lora": lora, "rollouts": rollouts, "max_new_tokens": max_new, "micro_batch_size": micro,
              "forward_batch_size": 2 * micro, "minibatch_size": rollouts, "epochs": epochs, "repeats": repeats,
              "mean_response_tokens": round(sum(len(r.response_ids) for r in fixed) / rollouts, 1),
              "mean_prompt_tokens": round(sum(len(r.prompt_ids) for r in fixed) / rollouts, 1), "levers": {}}
    for name in LEVERS:
        result["levers"][name] = {
            "flags": LEVERS[name],
            **{out: [s[key] for s in runs[name]] for out, key in MEASURES.items()},
            "losses": {k: runs[name][0][k] for k in ("policy_loss", "value_loss", "grad_norm", "kl", "entropy")},
            "ratio_to_neither": {out: round(mean(name, key) / mean("neither", key), 3) for out, key in MEASURES.items()},
        }
    print(json.dumps(result), flush=True)
    return result


MEASURES = {"forward_seconds": "time_forward", "train_seconds": "time_train", "forward_cpu_seconds": "cpu_forward",
            "train_cpu_seconds": "cpu_train", "peak_memory_gib": "peak_memory_gib", "forward_positions": "forward_positions",
            "train_positions": "train_positions"}


def counting_collate(collate, into: dict):
    def counted(rows, *args):
        batch = collate(rows, *args)
        into["train_positions" if torch.is_grad_enabled() else "forward_positions"] += batch["input_ids"].numel()
        return batch

    return counted


def cpu_timed(method, into: dict, key: str):
    def timed(*args):
        t = time.process_time()
        try:
            return method(*args)
        finally:
            into[key] = round(time.process_time() - t, 2)

    return timed


def reset_peak_memory(device: str) -> int:
    """Start a new peak; returns the memory in use now (bytes)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the resident set starts from what is live
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the resident-set peak, to the current resident set
    return proc_status("VmRSS")


def peak_memory(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else proc_status("VmHWM")


def proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def machine() -> dict:
    if torch.cuda.is_available():
        return {"device": torch.cuda.get_device_name()}
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    return {"device": "cpu", "cpu": model, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


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
    p.add_argument("--levers", action="store_true", help="measure the training levers (see the module docstring); GPU if there is one")
    p.add_argument("--rollouts", type=int, default=16, help="--levers: rollouts (and minibatch size)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="--levers: micro-batch size (forward batches twice that)")
    p.add_argument("--repeats", type=int, default=2, help="--levers: runs of each setting")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # 7b: 64 generation slots (256 slots of 320 columns would need 43 GB of KV cache beside three 7B models) and micro
    # batches of 4 (8 ran out of memory on an 80 GB H100: LoRA training activations of policy and value)
    settings = {"default": ("default-full", "default", False, 512, 32, 256), "7b": ("7b-lora", "7b", True, 256, 4, 64)}
    if args.cpu_smoke:
        SHAPES["tiny"] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              vocab_size=500, max_position_embeddings=512)
        for lora in (False, True):
            run_setting("tiny", "tiny", lora, 8, 8, 4, 2, "cpu")
        if args.levers:
            measure_levers("tiny", False, 8, 8, 2, 1, "cpu")
        return
    if args.levers:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        results = [measure_levers(s, settings[s][2], args.rollouts, args.max_new_tokens, args.micro_batch_size, args.repeats, device)
                   for s in args.shapes.split(",")]
        name = "cpu" if device == "cpu" else torch.cuda.get_device_name().lower().replace(" ", "-")
        out = Path(args.out or ROOT / "benchmarks" / "results" / f"ppo_levers_{name}.json")
        write_json(out, "ppo_levers", results)
        print(f"{'shape':<9}{'lever':<24}{'forward x':>10}{'train x':>9}{'fwd CPU x':>10}{'train CPU x':>12}{'memory x':>10}")
        for r in results:
            for lever, v in r["levers"].items():
                x = v["ratio_to_neither"]
                print(f"{r['shape']:<9}{lever:<24}{x['forward_seconds']:>10}{x['train_seconds']:>9}{x['forward_cpu_seconds']:>10}"
                      f"{x['train_cpu_seconds']:>12}{x['peak_memory_gib']:>10}")
        print(out)
        return
    results = []
    for s in args.shapes.split(","):
        name, shape, lora, rollouts, micro, gen_batch = settings[s]
        results.append(run_setting(name, shape, lora, rollouts, args.max_new_tokens, micro, args.steps, "cuda", gen_batch))
    name = torch.cuda.get_device_name().lower().replace(" ", "-")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"ppo_{name}.json")
    write_json(out, "ppo", results)
    print(f"{'setting':<14}{'step s':>8}{'rollouts/s':>12}{'rollout tok/s':>15}{'generate tok/s':>16}{'ratio':>7}")
    for r in results:
        print(f"{r['setting']:<14}{r['step_seconds']:>8}{r['rollouts_per_second']:>12}{r['rollout_tokens_per_second']:>15}"
              f"{r['plain_generate_tokens_per_second']:>16}{r['rollout_speedup_vs_generate']:>7}")
    print(out)


def write_json(out: Path, benchmark: str, results: list[dict]) -> None:
    out.write_text(json.dumps({
        "benchmark": benchmark, "date": datetime.date.today().isoformat(), "machine": machine(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "command": "python benchmarks/ppo.py " + " ".join(sys.argv[1:]), "results": results,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
