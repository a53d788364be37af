"""Baselines through TRL: `rlcd sft` (context distillation, docs/method.md §7), `rlcd dpo` and `rlcd rloo`.

sft   SFT on the preferred output of every row of a preference table: the loss covers the target
      only (TRL prompt-completion dataset). docs/method.md §7: source = prompt + " ", target = response +
      "\\n\\nHuman:" + EOS. We train on exactly that text but put the space at the start of the
      completion: generation and PPO prompt with the bare prompt (ending "Assistant:"), and with
      BPE tokenizers the space belongs to the response's first token, so the prompt's tokens are
      then the same in training as at inference.
dpo   TRL's DPOTrainer on the table; chosen = the preferred output (soft-labelled tables are
      oriented by their `preference`, i.e. win2_prob > 0.5), completions formatted as for sft.
rloo  TRL's RLOOTrainer, rewarded by our reward model exactly as PPO is (docs/method.md §6): the
      completion cut at the first "\\n\\nHuman:", scored as prompt + " " + response + marker
      (`reward_model.format_rm_input` / `score_texts`); -1 when the marker never appears or nothing
      precedes it.

Each writes OUT_DIR: the final model (merged when trained with --lora) and its tokenizer, which
`rlcd generate --model OUT_DIR` and stock transformers load; README.md (the model card),
generation_config.json and a chat template in the tokenizer that renders the training layout
(`artifacts`); metrics.json (counts and TRL's training log); manifest.json.
Checkpoints for --resume live in OUT_DIR/checkpoints until training finishes.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rlcd import artifacts
from rlcd.dialogue import END_MARKER, end_of_response
from rlcd.files import UserError, atomic_write_text, now, write_manifest
from rlcd.models import DEFAULT_MODEL
from rlcd.options import option
from rlcd.reward_model import format_rm_input
from rlcd.seeds import DEFAULT_SEED
from rlcd.training import (
    TrainerOptions,
    check_out_dir,
    finish_tracking,
    parse_bf16,
    positive_int,
    public_config,
    require_one_gpu_per_process,
    require_tracker,
    training_config,
)

PENALTY = -1.0  # reward of a completion without an end marker, or with nothing before it (docs/method.md §6)
LEARNING_RATES = {"sft": (2e-5, 2e-4), "dpo": (1e-6, 1e-5), "rloo": (1e-6, 1e-5)}  # (full, --lora)


# --------------------------------------------------------------------------------------------------
# Data: pure helpers
# --------------------------------------------------------------------------------------------------


def completion_text(response: str, eos_token: str) -> str:
    """A response as a training target: the joining space, the response, the end marker, EOS."""
    return f" {response.strip()}{END_MARKER}{eos_token}"


def preferred(row: dict) -> tuple[str, str]:
    """(preferred output, other output) of a `read_table` row."""
    if row["preference"] == 2:
        return row["output_2"], row["output_1"]
    return row["output_1"], row["output_2"]


def sft_examples(rows: list[dict], eos_token: str) -> list[dict]:
    return [{"prompt": r["prompt"].rstrip(), "completion": completion_text(preferred(r)[0], eos_token)} for r in rows]


def dpo_examples(rows: list[dict], eos_token: str) -> list[dict]:
    examples = []
    for r in rows:
        chosen, rejected = preferred(r)
        examples.append({"prompt": r["prompt"].rstrip(), "chosen": completion_text(chosen, eos_token),
                         "rejected": completion_text(rejected, eos_token)})
    return examples


def marker_rewards(prompts: list[str], completions: list[str], score) -> tuple[list[float], int]:
    """Rewards of completions as PPO computes them, and how many got the penalty.

    `score(texts)` returns reward-model scores of texts formatted with `format_rm_input`.
    """
    rewards = [PENALTY] * len(completions)
    texts, scored = [], []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        cut = end_of_response(completion, ended_with_eos=False, accept_eos=False)
        if cut is not None:
            texts.append(format_rm_input(prompt, cut))
            scored.append(i)
    for i, s in zip(scored, score(texts) if texts else []):
        rewards[i] = float(s)
    return rewards, len(completions) - len(scored)


def count_too_long(tokenizer, texts: list[str], max_length: int, each: bool = False):
    """How many texts are longer than max_length tokens (with `each`, whether each one is)."""
    ids = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"] if texts else []
    flags = [len(x) > max_length for x in ids]
    return flags if each else sum(flags)


# --------------------------------------------------------------------------------------------------
# Trainers
# --------------------------------------------------------------------------------------------------


def load_policy(args: BaselineOptions, bf16: bool):
    """(model, tokenizer, resolved path) of --model, to train."""
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    from rlcd.models import load_tokenizer, resolve_model

    path = resolve_model(args.model)
    try:
        tokenizer = load_tokenizer(path)
    except OSError as e:
        raise UserError(f"--model {args.model}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    if tokenizer.eos_token is None:
        raise UserError(f"--model {args.model}: its tokenizer has no end-of-sequence token; set eos_token in tokenizer_config.json")
    set_seed(args.seed)
    # Full fine-tuning keeps float32 weights under bf16 autocast (small updates would vanish in bf16
    # weights); frozen LoRA base weights can be bf16.
    dtype = torch.bfloat16 if (args.lora and bf16) else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {args.model}: cannot load as a causal LM ({str(e).splitlines()[0]})") from None
    return model, tokenizer, path


def lora_config(args: BaselineOptions):
    if not args.lora:
        return None
    from peft import LoraConfig

    modules = args.lora_target_modules if args.lora_target_modules == "all-linear" else args.lora_target_modules.split(",")
    return LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=modules)


def build_sft(args: SftConfig, out_dir: Path, bf16: bool):
    """(trainer, tokenizer, model path, counts) for context distillation."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from rlcd.preferences import read_table

    rows, skipped = read_table(args.data)
    model, tokenizer, path = load_policy(args, bf16)
    examples = sft_examples(rows, tokenizer.eos_token)
    config = training_config(SFTConfig, args, out_dir / "checkpoints", bf16, max_length=args.max_length, completion_only_loss=True, packing=False)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(examples), processing_class=tokenizer,
                         peft_config=lora_config(args))
    counts = {"examples": len(examples), "skipped_rows": dict(skipped),
              "cut_to_max_length": count_too_long(tokenizer, [e["prompt"] + e["completion"] for e in examples], args.max_length)}
    return trainer, tokenizer, path, counts, examples[0]["prompt"]


def build_dpo(args: DpoConfig, out_dir: Path, bf16: bool):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rlcd.preferences import read_table

    rows, skipped = read_table(args.data)
    model, tokenizer, path = load_policy(args, bf16)
    examples = dpo_examples(rows, tokenizer.eos_token)
    config = training_config(DPOConfig, args, out_dir / "checkpoints", bf16, beta=args.beta, max_length=args.max_length)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(examples), processing_class=tokenizer,
                         peft_config=lora_config(args))
    chosen_long = count_too_long(tokenizer, [e["prompt"] + e["chosen"] for e in examples], args.max_length, each=True)
    rejected_long = count_too_long(tokenizer, [e["prompt"] + e["rejected"] for e in examples], args.max_length, each=True)
    too_long = sum(a or b for a, b in zip(chosen_long, rejected_long))
    counts = {"pairs": len(examples), "soft_labelled": sum(r["win2_prob"] is not None for r in rows),
              "skipped_rows": dict(skipped), "cut_to_max_length": too_long}
    return trainer, tokenizer, path, counts, examples[0]["prompt"]


def build_rloo(args: RlooConfig, out_dir: Path, bf16: bool):
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    from rlcd.dialogue import load_prompts
    from rlcd.reward_model import load_reward_model, score_texts

    prompts = load_prompts(args.prompts)
    for line in prompts.examples:
        print(f"skipped {line}", flush=True)
    skipped = Counter(prompts.skipped)
    reward_model, reward_tokenizer = load_reward_model(args.reward_model, flag="--reward-model")
    model, tokenizer, path = load_policy(args, bf16)
    lengths = tokenizer([p for _, p in prompts.items], add_special_tokens=True, verbose=False)["input_ids"] if prompts.items else []
    kept = [p for (_, p), ids in zip(prompts.items, lengths) if len(ids) <= args.max_prompt_tokens]
    if len(kept) < len(prompts.items):
        skipped[f"longer than --max-prompt-tokens {args.max_prompt_tokens}"] += len(prompts.items) - len(kept)
    kept = kept[: args.max_prompts] if args.max_prompts else kept
    if not kept:
        raise UserError(f"{args.prompts}: no usable prompts (skipped: {dict(skipped) or 'none'})")

    def rm_score(prompts, completions, log_metric=None, **kwargs):
        rewards, penalized = marker_rewards(prompts, completions, lambda texts: score_texts(reward_model, reward_tokenizer, texts, args.rm_batch_size))
        if log_metric is not None:  # TRL averages it into its log
            log_metric("penalized_frac", penalized / max(len(completions), 1))
        return rewards

    config = training_config(
        RLOOConfig, args, out_dir / "checkpoints", bf16, beta=args.beta, num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
    )
    trainer = RLOOTrainer(model=model, reward_funcs=rm_score, args=config, train_dataset=Dataset.from_list([{"prompt": p} for p in kept]),
                          processing_class=tokenizer, peft_config=lora_config(args))
    return trainer, tokenizer, path, {"prompts": len(kept), "skipped_prompts": dict(skipped)}, kept[0]


BUILDERS = {"sft": build_sft, "dpo": build_dpo, "rloo": build_rloo}


def train(args: BaselineOptions) -> dict:
    """Train, save the final model, tokenizer, metrics.json and manifest.json in --out-dir; return the metrics.

    The model card, generation config and chat template come with the tokenizer (`artifacts.save_policy_files`).
    """
    import torch

    started = now()
    out_dir = Path(args.out_dir)
    resume_from = check_out_dir(out_dir, args.resume)
    if args.resume and resume_from is None:
        print(f"no checkpoint in {out_dir / 'checkpoints'}; starting from the beginning", flush=True)
    bf16 = torch.cuda.is_available() if args.bf16 == "auto" else args.bf16
    trainer, tokenizer, model_path, counts, example = BUILDERS[args.command](args, out_dir, bf16)
    result = trainer.train(resume_from_checkpoint=resume_from)
    finish_tracking(args.report_to)

    if args.lora:
        final = trainer.model.merge_and_unload() if trainer.is_world_process_zero() else None
        if final is not None:
            final.save_pretrained(out_dir)  # merged: generate loads a plain model, no peft needed
    else:
        trainer.save_model(str(out_dir))  # every rank: FSDP / DeepSpeed gather the weights here
    if not trainer.is_world_process_zero():
        return {}
    metrics = {
        "stage": args.command,
        "train_loss": result.training_loss,
        "train_steps": result.global_step,
        "learning_rate": args.learning_rate,
        "counts": counts,
        "log": trainer.state.log_history,
    }
    last = next((e for e in reversed(trainer.state.log_history) if "loss" in e), {})
    used = "; ".join(f"{k}: {v}" for k, v in counts.items())
    data = [(args.prompts, used), (args.reward_model, "the reward model")] if args.command == "rloo" else [(args.data, used)]
    artifacts.save_policy_files(out_dir, tokenizer, artifacts.Card(
        stage=args.command, base_model=args.model, base_path=model_path, data=data, settings=public_config(args), example=example,
        metrics={"train_loss": result.training_loss, "train_steps": result.global_step,
                 **{f"last_log/{k}": v for k, v in last.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}},
        sampling={"temperature": args.temperature, "max_new_tokens": args.max_new_tokens} if args.command == "rloo" else {}))
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_manifest(out_dir / "manifest.json", stage=args.command, config=public_config(args), model=args.model, model_path=model_path,
                   seed=args.seed, started_at=started, finished_at=now(), resumed_from=resume_from,
                   counts={**counts, "train_steps": result.global_step})
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # they only serve --resume
    return metrics


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def learning_rate_option(stage: str):
    full_lr, lora_lr = LEARNING_RATES[stage]
    return option(None, f"peak learning rate (cosine, 3%% warmup); default {full_lr:g}, {lora_lr:g} with --lora")


@dataclass
class BaselineOptions(TrainerOptions):
    """What sft, dpo and rloo share: the policy to start from, the output directory, the seed, and the value checks."""

    model: str = option(DEFAULT_MODEL, f"policy to start from: a Hugging Face directory or hub id, or '{DEFAULT_MODEL}' (embedded "
                        "SmolLM2-135M)", flags=("--model", "--model-string"))
    out_dir: str | None = option(None, "directory for the final model, metrics.json, manifest.json and checkpoints/", required=True)
    seed: int = option(DEFAULT_SEED, "seed for initialisation, data order and sampling")

    def validate(self) -> None:
        super().validate()
        lr = self.learning_rate  # None: the stage's default, filled in by `run`
        checks = [
            (lr is None or 0 < lr < 1, f"--learning-rate {lr:g}: expected a value in (0, 1), e.g. 1e-5" if lr is not None else ""),
            (self.epochs > 0, "--epochs must be positive"),
            (getattr(self, "max_length", 16) >= 16, "--max-length must be at least 16 tokens"),
            (0 <= self.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
        ]
        if hasattr(self, "beta"):  # dpo, rloo
            checks.append((0 <= self.beta <= 100, f"--beta {self.beta:g}: expected a value in [0, 100]"))
        for ok, message in checks:
            if not ok:
                raise UserError(message)


@dataclass
class TableOptions(BaselineOptions):
    """What sft and dpo share: the preference table, and the length of a training sequence."""

    data: str | None = option(None, "preference table (CSV or JSONL) from rlcd consolidate, or the original release's", required=True)
    max_length: int = option(512, "tokens per training sequence, prompt included; longer ones lose their end", type=positive_int)


@dataclass
class SftConfig(TableOptions):
    """`rlcd sft`: context distillation, SFT on the preferred output of every row of a preference table (TRL)."""

    command: ClassVar[str] = "sft"
    learning_rate: float | None = learning_rate_option("sft")
    epochs: float = option(3.0, "passes over the table (paper: 3)")
    batch_size: int = option(8, "examples per device per step", type=positive_int)
    gradient_accumulation_steps: int = option(16, "micro-batches per optimizer step; effective batch = batch size x this x GPUs "
                                              "(paper: 128; default 8 x 16)", type=positive_int)


@dataclass
class DpoConfig(TableOptions):
    """`rlcd dpo`: DPO on a preference table (TRL), the preferred output of each row as chosen."""

    command: ClassVar[str] = "dpo"
    learning_rate: float | None = learning_rate_option("dpo")
    epochs: float = option(1.0, "passes over the table")
    batch_size: int = option(8, "pairs per device per step", type=positive_int)
    gradient_accumulation_steps: int = option(8, "micro-batches per optimizer step; effective batch = batch size x this x GPUs "
                                              "(default 64 pairs)", type=positive_int)
    beta: float = option(0.1, "DPO beta: strength of the pull towards the starting model")


@dataclass
class RlooConfig(BaselineOptions):
    """`rlcd rloo`: RLOO against a reward model (TRL), rewarded exactly as PPO is."""

    command: ClassVar[str] = "rloo"
    prompts: str | None = option(None, "hh-rlhf jsonl(.gz) or a plain list of questions (the train split)", flags=("--prompts-file", "--prompts"),
                                 metavar="PROMPTS_FILE", required=True)
    reward_model: str | None = option(None, "reward model directory written by rlcd train-rm", required=True)
    learning_rate: float | None = learning_rate_option("rloo")
    epochs: float = option(1.0, "passes over the prompts (--max-steps usually ends sooner)")
    batch_size: int = option(8, "completions per device per micro-batch", type=positive_int)
    gradient_accumulation_steps: int = option(8, "micro-batches per optimizer step (8 gives 64 completions: 16 prompts x 4 on one GPU)",
                                              type=positive_int)
    num_generations: int = option(4, "completions per prompt, the leave-one-out group", type=positive_int)
    beta: float = option(0.05, "KL coefficient to the starting model (TRL's default 0.05)")
    max_new_tokens: int = option(300, "most tokens per completion (as PPO)", type=positive_int)
    temperature: float = option(1.0, "sampling temperature (no top-k/top-p, as PPO)")
    max_prompt_tokens: int = option(192, "skip longer prompts (as PPO)", type=positive_int)
    max_prompts: int | None = option(None, "use only the first N usable prompts", type=positive_int)
    rm_batch_size: int = option(32, "texts per reward-model forward pass", type=positive_int)

    def validate(self) -> None:
        super().validate()
        micro = self.batch_size * self.gradient_accumulation_steps
        checks = [
            (self.num_generations >= 2, "--num-generations must be at least 2 (RLOO's baseline is the other completions of the prompt)"),
            (micro % self.num_generations == 0,
             f"--batch-size x --gradient-accumulation-steps ({micro}) must be a multiple of --num-generations ({self.num_generations})"),
            (0 < self.temperature <= 10, "--temperature must be in (0, 10]"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


CONFIGS = {"sft": SftConfig, "dpo": DpoConfig, "rloo": RlooConfig}


def run(args: SftConfig | DpoConfig | RlooConfig) -> None:
    if args.learning_rate is None:
        args.learning_rate = LEARNING_RATES[args.command][1 if args.lora else 0]
    args.bf16 = parse_bf16(args.bf16)
    args.validate()  # again: fields may have been set after the config was built
    require_tracker(args.report_to)
    require_one_gpu_per_process()
    out_dir = Path(args.out_dir)
    if args.resume and (out_dir / "metrics.json").exists():
        print(f"{out_dir}: already trained (metrics.json exists); nothing to do")
        print(out_dir)
        return
    metrics = train(args)
    if not metrics:  # not the main process
        return
    print(f"{args.command}: {metrics['train_steps']} steps, train loss {metrics['train_loss']:.4f}; {json.dumps(metrics['counts'])}")
    print(out_dir)
