"""Reward model: `rlcd train-rm` (Bradley-Terry on a preference table), `rlcd eval-rm` (agreement with
human labels, docs/method.md §8) and `rlcd score` (outputs file -> outputs with rewards).

The reward model is a plain `AutoModelForSequenceClassification` with one output: a linear head on the
final hidden state of the last real token (docs/method.md §5). Every reward-model call, here and in PPO,
formats its input with `format_rm_input` and scores it with `score_texts`, so training and scoring
always see the same text, the same truncation and the same token the score is read at.

Padding is on the right. Transformers' sequence-classification models read the score at the rightmost
token that is not the pad token, which with right padding is the last real token (our inputs end with
the "\\n\\nHuman:" marker, never with a pad token), and right padding keeps the real tokens at positions
0..n-1 for models with absolute position embeddings too. Over-long inputs are cut on the left, so the
end marker, where the score is read, always survives.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rlcd import artifacts, dialogue
from rlcd.engines import SCORING_TOKEN_BUDGET, no_cudnn_attention, token_budget_batches
from rlcd.files import UserError, atomic_write_text, ensure_dir, is_text, iter_lines, load_json, now, write_manifest

WARMUP_FRACTION = 0.03  # docs/method.md §5: cosine schedule, 3% warmup, weight decay 0
LOGGING_STEPS = 10
FULL_LR, LORA_LR = 1e-5, 1e-4


# --------------------------------------------------------------------------------------------------
# Formatting, loss, scoring: pure helpers shared with PPO
# --------------------------------------------------------------------------------------------------


def format_rm_input(prompt: str, response: str) -> str:
    """Reward-model input: prompt + one space + response + end marker (docs/method.md §5).

    The response is stripped on both sides, not only on the right: a response decoded on its own
    often starts with the space of its first token, and the join must stay exactly one space
    whichever generator or tokenizer produced it.
    """
    return f"{prompt.rstrip()} {response.strip()}{dialogue.END_MARKER}"


def preference_loss(rewards_chosen, rewards_rejected, chosen_prob):
    """Mean binary cross-entropy of sigmoid(r_chosen - r_rejected) against P(chosen is better).

    chosen_prob = 1 gives the hard Bradley-Terry loss -log sigmoid(r_chosen - r_rejected). Since
    BCE(x, p) = BCE(-x, 1 - p), chosen_prob = win2_prob with chosen = output_2 (or 1 - win2_prob with
    chosen = output_1) is exactly the soft loss of docs/method.md §5, BCE(r(output_2) - r(output_1), win2_prob).
    """
    import torch.nn.functional as F

    return F.binary_cross_entropy_with_logits(rewards_chosen - rewards_rejected, chosen_prob)


def encode_texts(tokenizer, texts: list[str], max_length: int | None) -> tuple[list[list[int]], set[int]]:
    """Token ids of each text (special tokens included), cut on the left to max_length; also which were cut.

    Cutting on the left keeps the response and the end marker, where the score is read; the
    tokenizer keeps its special prefix (BOS) when it truncates.
    """
    if not texts:  # e.g. no held-out pairs; fast tokenizers fail on an empty batch
        return [], set()
    if max_length is None:
        max_length = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None
    ids = tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]  # verbose: no "too long" warning; we cut below
    long = [i for i, x in enumerate(ids) if max_length is not None and len(x) > max_length]
    if long:
        tokenizer.truncation_side = "left"
        cut = tokenizer([texts[i] for i in long], add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        for i, x in zip(long, cut):
            ids[i] = x
    return ids, set(long)


def pad_right(sequences: list[list[int]], pad_token_id: int):
    """(input_ids, attention_mask) tensors, padded on the right."""
    import torch

    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        input_ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[row, : len(s)] = 1
    return input_ids, attention_mask


def score_texts(model, tokenizer, texts: list[str], batch_size: int = 24, max_length: int | None = None, progress: bool = False,
                token_budget: int = SCORING_TOKEN_BUDGET) -> list[float]:
    """Reward of each text (already formatted with `format_rm_input`), in the order given.

    Texts are scored longest first, in batches of at most batch_size rows and token_budget tokens
    (padding included; `token_budget_batches`), then put back in order. Identical texts are scored
    once, so they get identical rewards: an exact tie, whatever batch they would have fallen in.
    max_length None means the tokenizer's model_max_length, which `train-rm` saves with the model.
    """
    import torch
    from tqdm import tqdm

    unique = list(dict.fromkeys(texts))
    if not unique:
        return []
    ids, _ = encode_texts(tokenizer, unique, max_length)
    device = next(model.parameters()).device
    scores = [0.0] * len(unique)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), no_cudnn_attention():
            batches = token_budget_batches([len(x) for x in ids], batch_size, token_budget)
            for chunk in tqdm(batches, desc="scoring", unit="batch", disable=not progress):
                input_ids, attention_mask = pad_right([ids[i] for i in chunk], tokenizer.pad_token_id)
                logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
                for i, s in zip(chunk, logits[:, 0].float().tolist()):
                    scores[i] = s
    finally:
        model.train(was_training)
    by_text = dict(zip(unique, scores))
    return [by_text[t] for t in texts]


def agreement(chosen_scores: list[float], rejected_scores: list[float], seed: int = 0, resamples: int = 1000) -> dict:
    """Accuracy (r_chosen > r_rejected; a tie counts as wrong), its 95% bootstrap interval, and mean
    sigmoid(r_chosen - r_rejected) (docs/method.md §8)."""
    import numpy as np

    margin = np.asarray(chosen_scores, dtype=np.float64) - np.asarray(rejected_scores, dtype=np.float64)
    if margin.size == 0:
        raise ValueError("no pairs to evaluate")
    correct = (margin > 0).astype(np.float64)
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), size=(resamples, len(correct)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {
        "pairs": int(margin.size),
        "accuracy": float(correct.mean()),
        "accuracy_ci95": [float(lo), float(hi)],
        "mean_prob": float((1.0 / (1.0 + np.exp(-margin))).mean()),
        "ties": int((margin == 0).sum()),
    }


LENGTH_MATCH = 0.8
"""Pairs whose shorter final response has at least this share of the longer one's characters ("within 20%
of each other") form the length-matched subset: there a reward model cannot agree by length alone."""


def response_of(rm_text: str) -> str:
    """The final response inside a reward-model input (`format_rm_input`)."""
    return rm_text.removesuffix(dialogue.END_MARKER)[rm_text.rfind("Assistant:") + len("Assistant:") :].strip()


def length_controls(pairs: list[tuple[str, str]], chosen_scores: list[float], rejected_scores: list[float], seed: int = 0) -> dict:
    """What a reward model learned beyond length: the agreement of a length-only rule (the longer final
    response wins, equal lengths count as wrong, like ties), and the model's agreement on the
    length-matched pairs alone."""
    lengths = [(len(response_of(c)), len(response_of(r))) for c, r in pairs]
    longer = [float(a > b) for a, b in lengths]
    matched = [i for i, (a, b) in enumerate(lengths) if max(a, b) and min(a, b) / max(a, b) >= LENGTH_MATCH]
    out = {"length_only": agreement(longer, [0.5] * len(longer), seed=seed)["accuracy"],
           "chosen_longer_share": sum(longer) / len(longer), "length_matched_pairs": len(matched)}
    if matched:
        sub = agreement([chosen_scores[i] for i in matched], [rejected_scores[i] for i in matched], seed=seed)
        out["length_matched"] = {k: sub[k] for k in ("accuracy", "accuracy_ci95", "mean_prob", "ties")}
        out["length_matched"]["length_only"] = sum(longer[i] for i in matched) / len(matched)
    return out


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_reward_model(path: str, device: str | None = None, dtype: str = "auto", flag: str = "--model-path"):
    """(model, tokenizer) of a reward model written by `train-rm` (or any one-output sequence classifier)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rlcd.models import default_device, load_tokenizer, resolve_dtype, resolve_model

    resolved = resolve_model(path)
    device = device or default_device()
    try:
        config = AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {path}: cannot load ({str(e).splitlines()[0]})") from None
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or getattr(config, "num_labels", None) != 1:
        # a causal LM would load with a fresh random head and give meaningless scores
        raise UserError(f"{flag} {path}: not a reward model (architectures {architectures}); train one with rlcd train-rm")
    try:
        tokenizer = load_tokenizer(resolved)
        model = AutoModelForSequenceClassification.from_pretrained(resolved, dtype=resolve_dtype(dtype, device))
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot load ({str(e).splitlines()[0]})") from None
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval(), tokenizer


# --------------------------------------------------------------------------------------------------
# train-rm
# --------------------------------------------------------------------------------------------------


def orient_pair(row: dict) -> tuple[str, str, float]:
    """(chosen text, rejected text, P(chosen is better)) of a `read_table` row.

    The pair is oriented by `preference`, so training accuracy means agreement with the table's
    label; the target is 1 for hard labels, and the probability from win2_prob for soft ones.
    """
    out1 = format_rm_input(row["prompt"], row["output_1"])
    out2 = format_rm_input(row["prompt"], row["output_2"])
    win2 = row["win2_prob"]
    if row["preference"] == 2:
        return out2, out1, 1.0 if win2 is None else win2
    return out1, out2, 1.0 if win2 is None else 1.0 - win2


def split_heldout(n: int, eval_pairs: int, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): a seeded shuffle, so resume holds out the same pairs."""
    order = list(range(n))
    random.Random(f"{seed}:heldout").shuffle(order)
    return sorted(order[eval_pairs:]), sorted(order[:eval_pairs])


def tokenize_pairs(tokenizer, pairs: list[tuple[str, str, float]], max_length: int) -> tuple[dict, int]:
    """Columns `chosen_ids`, `rejected_ids` (TRL's names for a tokenized preference dataset) and
    `chosen_prob`; also how many pairs had a side cut to max_length."""
    chosen, chosen_cut = encode_texts(tokenizer, [c for c, _, _ in pairs], max_length)
    rejected, rejected_cut = encode_texts(tokenizer, [r for _, r, _ in pairs], max_length)
    columns = {"chosen_ids": chosen, "rejected_ids": rejected, "chosen_prob": [p for _, _, p in pairs]}
    return columns, len(chosen_cut | rejected_cut)


@dataclass
class PairCollator:
    """Batches tokenized pairs: chosen rows first, then rejected rows (TRL's layout), padded on the
    right, plus `chosen_prob`, the training target."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        input_ids, attention_mask = pad_right([e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples], self.pad_token_id)
        chosen_prob = torch.tensor([float(e["chosen_prob"]) for e in examples], dtype=torch.float32)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "chosen_prob": chosen_prob}


def soft_label_reward_trainer():
    """TRL's RewardTrainer with a loss that takes soft targets (TRL's takes hard labels only).

    Built on first use: importing TRL takes seconds, which every `rlcd --help` would pay otherwise.
    """
    from trl import RewardTrainer

    class SoftLabelRewardTrainer(RewardTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            rewards_chosen, rewards_rejected = outputs.logits.squeeze(-1).float().chunk(2)
            # mean over the micro-batch, like TRL's own loss, so its gradient-accumulation scaling still holds
            loss = preference_loss(rewards_chosen, rewards_rejected, inputs["chosen_prob"].to(rewards_chosen.device))
            metrics = getattr(self, "_metrics", None)  # TRL averages these into its logs
            if metrics is not None:
                mode = "train" if model.training else "eval"
                with torch.no_grad():
                    accuracy = (rewards_chosen > rewards_rejected).float().mean()
                    margin = (rewards_chosen - rewards_rejected).mean()
                    metrics[mode]["accuracy"].append(self.accelerator.gather_for_metrics(accuracy).mean().item())
                    metrics[mode]["margin"].append(self.accelerator.gather_for_metrics(margin).mean().item())
            return (loss, outputs) if return_outputs else loss

        def _save_checkpoint(self, model, trial):
            with writing_model(Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"):
                super()._save_checkpoint(model, trial)

    return SoftLabelRewardTrainer


def training_config(config_cls, args: argparse.Namespace, checkpoint_dir: Path, bf16: bool, **extra):
    """The Trainer settings every training stage shares (train-rm, sft, dpo, rloo), on TRL's config class of that stage."""
    from dataclasses import fields

    import torch

    if args.lora and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":  # set by accelerate launch for an FSDP config
        raise UserError("--lora under FSDP is not supported (the adapters are merged into the model on one process, which needs "
                        "the whole model there); LoRA fits one GPU: launch with configs/accelerate/ddp.yaml")
    # transformers 5 folded warmup_ratio into warmup_steps (a fraction when < 1); 4.x still has it
    names = {f.name for f in fields(config_cls)}
    warmup = {"warmup_ratio": WARMUP_FRACTION} if "warmup_ratio" in names else {"warmup_steps": WARMUP_FRACTION}
    if args.report_to == "tensorboard":  # beside the model: the Trainer's default, checkpoints/runs, goes when training ends
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(checkpoint_dir.parent / "tensorboard")
    if args.report_to == "wandb":
        os.environ.setdefault("WANDB_PROJECT", "rlcd")  # unless the user named one
    settings = dict(
        output_dir=str(checkpoint_dir),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        **warmup,
        bf16=bf16,  # set explicitly: TRL's configs default to bf16 even where the device has none
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        logging_steps=LOGGING_STEPS,
        logging_first_step=True,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        save_total_limit=args.save_total_limit,  # a checkpoint is only for resuming; a 7B one with optimizer state is ~80 GB
        report_to=args.report_to,
        run_name=args.run_name,
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=args.seed,
        data_seed=args.seed,
        **extra,
    )
    settings.update(args.training_args or {})  # --training-args last: they override what the flags set
    try:
        return config_cls(**settings)
    except (TypeError, ValueError) as e:
        raise UserError(f"the Trainer refused these settings: {str(e).strip().splitlines()[0]}") from None


def reward_config(args: argparse.Namespace, output_dir: Path, bf16: bool, has_eval: bool):
    from trl import RewardConfig

    return training_config(
        RewardConfig, args, output_dir, bf16,
        per_device_eval_batch_size=args.batch_size,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=0.1,  # a fraction: ten looks at the held-out pairs over the run
        prediction_loss_only=True,  # held-out accuracy comes from compute_loss's metrics
        remove_unused_columns=False,  # keep chosen_prob, which TRL's column filter would drop
        max_length=None,  # we cut inputs ourselves (on the left); TRL would drop long pairs instead
    )


@contextlib.contextmanager
def writing_model(path):
    """A failure while a checkpoint or model is written is one line, not a traceback: it is nearly always
    the disk (full, quota, read-only), and safetensors and torch.save report that in their own words
    ("File too large", "basic_ios::clear: iostream error"), so the free space is added."""
    try:
        yield
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:200]
        try:
            free = f"; {shutil.disk_usage(Path(path).parent).free / 1e9:.1f} GB free there"
        except OSError:
            free = ""
        raise UserError(f"{path}: cannot write the model or checkpoint ({type(e).__name__}: {reason}{free}); "
                        "if the disk is full, make room and run again with --resume (finished checkpoints are kept)") from None


def check_out_dir(out_dir: Path, resume: bool) -> str | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to overwrite an earlier run.

    The Trainer writes a checkpoint in place, trainer_state.json last, so a process killed while
    saving leaves a partial checkpoint: the last one with a readable trainer_state.json is the
    one to resume from, and partial ones are removed (the Trainer would save into them again).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out-dir {out_dir}: is a file, expected a directory")
    found = [d for d in (out_dir / "checkpoints").glob("checkpoint-*") if d.is_dir() and d.name.split("-")[1].isdigit()]
    found.sort(key=lambda d: int(d.name.split("-")[1]))
    complete = [d for d in found if _readable_json(d / "trainer_state.json")]
    if not resume and (found or (out_dir / "config.json").exists()):
        raise UserError(f"--out-dir {out_dir}: holds an earlier run; pass --resume to continue it, or choose a new --out-dir")
    for d in found:
        if d not in complete:
            print(f"removing {d}: a checkpoint the previous run did not finish writing", flush=True)
            shutil.rmtree(d, ignore_errors=True)  # every rank runs this
    return str(complete[-1]) if complete else None


def _readable_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def train_reward_model(args: argparse.Namespace) -> dict:
    """Train, save the model and its metrics in args.out_dir, and return the metrics."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, set_seed

    from rlcd.models import load_tokenizer, resolve_model
    from rlcd.preferences import read_table

    started = now()
    out_dir = Path(args.out_dir)
    resume_from = check_out_dir(out_dir, args.resume)
    if args.resume and resume_from is None:
        print(f"no checkpoint in {out_dir / 'checkpoints'}; starting from the beginning", flush=True)

    rows, skipped = read_table(args.data)
    if args.eval_pairs >= len(rows):
        raise UserError(f"{args.data}: {len(rows)} usable pairs, and --eval-pairs {args.eval_pairs} would leave none for training; lower --eval-pairs")
    train_idx, heldout_idx = split_heldout(len(rows), args.eval_pairs, args.seed)
    pairs = [orient_pair(r) for r in rows]

    model_path = resolve_model(args.model)
    try:
        tokenizer = load_tokenizer(model_path)
    except OSError as e:
        raise UserError(f"--model {args.model}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        raise UserError(f"--model {args.model}: its tokenizer has neither a pad nor an end-of-sequence token; set pad_token in tokenizer_config.json")
    tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
    tokenizer.model_max_length = args.max_length  # saved with the model, so scoring cuts inputs the same way
    ensure_dir(out_dir)  # before the long work: a path under a file fails now, not at the first checkpoint

    train_cols, truncated = tokenize_pairs(tokenizer, [pairs[i] for i in train_idx], args.max_length)
    eval_cols, eval_truncated = tokenize_pairs(tokenizer, [pairs[i] for i in heldout_idx], args.max_length)

    bf16 = torch.cuda.is_available() if args.bf16 == "auto" else args.bf16
    set_seed(args.seed)  # the new score head is drawn at load time
    # Full fine-tuning keeps float32 weights under bf16 autocast: a 3e-6 update is below bf16's
    # resolution for most weights and would be lost. Frozen LoRA base weights can be bf16.
    load_dtype = torch.bfloat16 if (args.lora and bf16) else torch.float32
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=load_dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {args.model}: cannot load as a sequence classifier ({str(e).splitlines()[0]})") from None
    model.config.pad_token_id = tokenizer.pad_token_id

    peft_config = None
    if args.lora:
        from peft import LoraConfig

        # SEQ_CLS makes the new score head fully trainable (modules_to_save) next to the adapters
        peft_config = LoraConfig(
            task_type="SEQ_CLS", r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            target_modules=args.lora_target_modules if args.lora_target_modules == "all-linear" else args.lora_target_modules.split(","),
        )

    trainer = soft_label_reward_trainer()(
        model=model,
        args=reward_config(args, out_dir / "checkpoints", bf16, has_eval=bool(heldout_idx)),
        data_collator=PairCollator(tokenizer.pad_token_id),
        train_dataset=Dataset.from_dict(train_cols),
        eval_dataset=Dataset.from_dict(eval_cols) if heldout_idx else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        for callback in trainer.callback_handler.callbacks:  # after a failure, the error stays the last line printed
            for bar in (getattr(callback, "training_bar", None), getattr(callback, "prediction_bar", None)):
                if bar is not None:
                    bar.close()
    finish_tracking(args.report_to)
    check_finite(trainer, args)
    with writing_model(out_dir):
        if args.lora:
            final = trainer.model.merge_and_unload() if trainer.is_world_process_zero() else None
            if final is not None:
                final.save_pretrained(out_dir)  # merged: scoring loads a plain model, no peft needed
        else:
            trainer.save_model(str(out_dir))  # every rank: FSDP / DeepSpeed gather the weights here
            final = trainer.model
        if not trainer.is_world_process_zero():
            return {}
        tokenizer.chat_template = artifacts.chat_template(tokenizer, reward_model=True)  # renders format_rm_input's layout
        tokenizer.save_pretrained(out_dir)

    if trainer.is_fsdp_enabled and not args.lora:  # trainer.model is sharded over ranks that have returned: score the saved model
        final = AutoModelForSequenceClassification.from_pretrained(out_dir).to(trainer.args.device)
    heldout = None
    if heldout_idx:
        chosen = score_texts(final, tokenizer, [pairs[i][0] for i in heldout_idx], args.batch_size * 2)
        rejected = score_texts(final, tokenizer, [pairs[i][1] for i in heldout_idx], args.batch_size * 2)
        target = torch.tensor([pairs[i][2] for i in heldout_idx])
        heldout = agreement(chosen, rejected, seed=args.seed)
        heldout["loss"] = float(preference_loss(torch.tensor(chosen), torch.tensor(rejected), target))

    metrics = {
        "train_loss": result.training_loss,
        "train_steps": result.global_step,
        "learning_rate": args.learning_rate,
        "pairs": {
            "usable": len(rows),
            "train": len(train_idx),
            "heldout": len(heldout_idx),
            "soft_labelled": sum(r["win2_prob"] is not None for r in rows),
            "truncated_to_max_length": truncated + eval_truncated,
        },
        "skipped": dict(skipped),
        "heldout": heldout,
        "log": trainer.state.log_history,
    }
    write_manifest(
        out_dir / "manifest.json",
        stage="train-rm",
        config=public_config(args),
        model=args.model,
        model_path=model_path,
        seed=args.seed,
        started_at=started,
        finished_at=now(),
        resumed_from=resume_from,
        counts={"pairs": metrics["pairs"], "skipped": metrics["skipped"], "train_steps": result.global_step},
    )
    h = heldout or {}
    artifacts.write_model_card(out_dir, tokenizer, artifacts.Card(
        stage="train-rm", base_model=args.model, base_path=model_path, settings=public_config(args), example=pairs[train_idx[0]][0],
        data=[(str(args.data), f"{len(rows)} usable pairs: {len(train_idx)} trained on, {len(heldout_idx)} held out; "
                               f"{metrics['pairs']['soft_labelled']} soft-labelled; skipped rows: {dict(skipped) or 0}")],
        metrics={"train_loss": result.training_loss, "train_steps": result.global_step, "heldout_pairs": h.get("pairs"),
                 "heldout_accuracy": h.get("accuracy"), "heldout_accuracy_ci95": h.get("accuracy_ci95"),
                 "heldout_mean_prob": h.get("mean_prob"), "heldout_loss": h.get("loss")}))
    # metrics.json last: it marks the run finished (--resume then has nothing to do)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    # checkpoints only serve --resume, and hold the optimizer state (twice the model's size again)
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return metrics


def check_finite(trainer, args: argparse.Namespace) -> None:
    """Refuse to save a model whose weights became NaN or inf (a diverged run would score every text NaN, and its
    agreement would read 0.0 as if it were a figure). Seen: Qwen2.5-Coder-0.5B under bf16 autocast on an H200, the
    gradient norm NaN at 0.8 of the epoch; the same run in fp32 trained (docs/study.md)."""
    import torch

    if all(torch.isfinite(p).all() for p in trainer.model.parameters()):
        return
    steps = [e.get("step") for e in trainer.state.log_history if isinstance(e.get("grad_norm"), float) and not math.isfinite(e["grad_norm"])]
    when = f"; the gradient norm was first non-finite in the log at step {steps[0]}" if steps else ""
    raise UserError(f"--out-dir {args.out_dir}: training diverged, the weights became NaN or inf{when}; nothing was saved. "
                    "Train again with --bf16 false or a lower --learning-rate")


def run_train(args: argparse.Namespace) -> None:
    if args.learning_rate is None:
        args.learning_rate = LORA_LR if args.lora else FULL_LR
    args.bf16 = parse_bf16(args.bf16)
    require_tracker(args.report_to)
    checks = [  # before any loading or writing
        (args.learning_rate > 0, f"--learning-rate must be positive, got {args.learning_rate}"),
        (args.epochs > 0, f"--epochs must be positive, got {args.epochs}"),
        (args.lora_alpha > 0, f"--lora-alpha must be positive, got {args.lora_alpha}"),
        (0 <= args.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {args.lora_dropout}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    out_dir = Path(args.out_dir)
    if args.resume and (out_dir / "metrics.json").exists():
        print(f"{out_dir}: already trained (metrics.json exists); nothing to do")
        print(out_dir)
        return
    metrics = train_reward_model(args)
    if not metrics:  # not the main process
        return
    p = metrics["pairs"]
    print(f"trained on {p['train']} pairs ({p['soft_labelled']} of {p['usable']} usable with soft labels), "
          f"{metrics['train_steps']} steps, train loss {metrics['train_loss']:.4f}; "
          f"skipped rows {metrics['skipped'] or 0}; {p['truncated_to_max_length']} pairs cut to {args.max_length} tokens")
    if metrics["heldout"]:
        h = metrics["heldout"]
        print(f"held-out accuracy {h['accuracy']:.3f} (95% CI {h['accuracy_ci95'][0]:.3f}-{h['accuracy_ci95'][1]:.3f}) "
              f"on {h['pairs']} pairs, mean P(chosen) {h['mean_prob']:.3f}, loss {h['loss']:.4f}")
    print(out_dir)


# --------------------------------------------------------------------------------------------------
# eval-rm
# --------------------------------------------------------------------------------------------------


def split_dialogue(text: str) -> tuple[str, str] | None:
    """(prompt as in docs/method.md §2, final response), or None if the dialogue has no usable Assistant turn."""
    try:
        prompt = dialogue.prompt_from_dialogue(text)
    except ValueError:
        return None
    return prompt, text[text.rfind("Assistant:") + len("Assistant:") :]


def read_hh_pairs(path: str | Path, num_pairs: int | None) -> tuple[list[tuple[str, str]], Counter, list[str]]:
    """The first num_pairs usable pairs as formatted (chosen, rejected) RM inputs, with the skipped
    lines counted by reason and described as `file:line: reason`.

    hh-rlhf JSONL (`chosen` and `rejected` whole dialogues, each cut at its own last "Assistant:"), or any
    preference table `preferences.read_table` reads (CSV, JSONL, Parquet; TRL's standard and
    conversational rows, the original release's), oriented by its preference. In JSONL a line that is not
    a JSON object is skipped; in a table, rows it cannot use are skipped, bad columns are an error.
    """
    from rlcd.preferences import Unusable, is_jsonl, iter_table, pair_of

    pairs, skipped, problems = [], Counter(), []

    def skip(where: str, reason: str) -> None:
        skipped[reason] += 1
        problems.append(f"{where}: {reason}")

    def jsonl_records():
        for lineno, line in iter_lines(path):
            if num_pairs is not None and len(pairs) >= num_pairs:
                return  # lines after the last pair taken are neither read nor counted
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                skip(f"{path}:{lineno}", "not JSON")
                continue
            if not isinstance(rec, dict):
                skip(f"{path}:{lineno}", "not a JSON object")
                continue
            yield f"{path}:{lineno}", rec

    for where, rec in jsonl_records() if is_jsonl(path) else iter_table(Path(path)):
        if num_pairs is not None and len(pairs) >= num_pairs:
            break
        hh_row = not ({"prompt", "instruction", "output_1"} & rec.keys()) and not any(isinstance(rec.get(f), list) for f in ("chosen", "rejected"))
        if hh_row:  # read as they always were: each dialogue cut at its own last "Assistant:"
            texts = []
            for field in ("chosen", "rejected"):
                value = rec.get(field)
                if not isinstance(value, str):
                    skip(where, f"field '{field}' missing or not text")
                    break
                if not is_text(value):
                    skip(where, f"field '{field}' is not valid Unicode")
                    break
                parts = split_dialogue(value)
                if parts is None:
                    skip(where, f"field '{field}' has no Assistant turn")
                    break
                texts.append(format_rm_input(*parts))
            else:
                pairs.append((texts[0], texts[1]))
            continue
        try:
            row = pair_of(rec)
        except Unusable as e:
            skip(where, str(e))
            continue
        chosen, rejected = (row["output_1"], row["output_2"]) if row["preference"] == 1 else (row["output_2"], row["output_1"])
        pairs.append((format_rm_input(row["prompt"], chosen), format_rm_input(row["prompt"], rejected)))
    return pairs, skipped, problems


def evaluate_reward_model(args: argparse.Namespace) -> dict:
    pairs, skipped, problems = read_hh_pairs(args.data_path, args.num_pairs)
    for line in problems[:10]:  # stderr: with --json, stdout holds only the figures
        print(f"skipped {line}", file=sys.stderr)
    if len(problems) > 10:
        print(f"... and {len(problems) - 10} more skipped lines", file=sys.stderr)
    if not pairs:
        raise UserError(f"{args.data_path}: no usable chosen/rejected pairs ({dict(skipped) or 'empty file'})")
    model, tokenizer = load_reward_model(args.model_path, dtype=args.dtype)
    t0 = time.time()
    scores = score_texts(model, tokenizer, [c for c, _ in pairs] + [r for _, r in pairs], args.batch_size, args.max_length, progress=True)
    broken = sum(not math.isfinite(x) for x in scores)
    if broken:
        raise UserError(f"--model-path {args.model_path}: {broken} of {len(scores)} scores are NaN or inf, so no agreement can be "
                        "measured (were its weights saved from a diverged run?)")
    chosen, rejected = scores[: len(pairs)], scores[len(pairs) :]
    result = agreement(chosen, rejected, seed=args.seed)
    return {
        "model_path": args.model_path,
        "data_path": str(args.data_path),
        **result,
        **length_controls(pairs, chosen, rejected, seed=args.seed),
        "skipped": dict(skipped),
        "seconds": round(time.time() - t0, 1),
    }


def run_eval(args: argparse.Namespace) -> None:
    if args.out_file:
        ensure_dir(Path(args.out_file).parent)
    result = evaluate_reward_model(args)
    if args.out_file:
        out = Path(args.out_file)
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        write_manifest(out.with_name(out.name + ".manifest.json"), stage="eval-rm", config=public_config(args), seed=args.seed,
                       counts={"pairs": result["pairs"], "skipped": result["skipped"]})
    if args.json:
        print(json.dumps(result))
    else:
        lo, hi = result["accuracy_ci95"]
        matched = result.get("length_matched")
        print(f"{result['pairs']} pairs: accuracy {result['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}, ties {result['ties']} counted wrong), "
              f"mean P(chosen) {result['mean_prob']:.3f}; length-only rule {result['length_only']:.3f}; "
              + (f"{result['length_matched_pairs']} length-matched pairs: accuracy {matched['accuracy']:.3f} "
                 f"(95% CI {matched['accuracy_ci95'][0]:.3f}-{matched['accuracy_ci95'][1]:.3f}, length-only {matched['length_only']:.3f}); "
                 if matched else "no length-matched pairs; ")
              + f"skipped lines {result['skipped'] or 0}")
    if args.out_file:
        print(args.out_file)


# --------------------------------------------------------------------------------------------------
# score
# --------------------------------------------------------------------------------------------------


def read_outputs(path: str | Path) -> list[dict]:
    """An outputs file: a JSON list of objects with text fields `instruction` and `output`."""
    items = load_json(path)
    if not isinstance(items, list) or not items:
        raise UserError(f"{path}: expected a non-empty JSON list of {{instruction, output}} objects")
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            raise UserError(f"{path}: item {n}: expected an object with 'instruction' and 'output'")
        for field in ("instruction", "output"):
            if not isinstance(item.get(field), str):
                raise UserError(f"{path}: item {n}: field '{field}' missing or not text")
            if not is_text(item[field]):
                raise UserError(f"{path}: item {n}: field '{field}' is not valid Unicode (a lone surrogate such as \\ud800)")
    return items


def run_score(args: argparse.Namespace) -> None:
    items = read_outputs(args.data_path)
    ensure_dir(Path(args.out_file).parent)
    model, tokenizer = load_reward_model(args.reward_model, dtype=args.dtype, flag="--reward-model")
    texts = [format_rm_input(it["instruction"], it["output"]) for it in items]
    scores = score_texts(model, tokenizer, texts, args.batch_size, args.max_length, progress=True)
    scored = [{**it, "score": s} for it, s in zip(items, scores)]
    out = Path(args.out_file)
    atomic_write_text(out, json.dumps(scored, indent=2, ensure_ascii=False) + "\n")
    summary = {"outputs": len(scored), "mean_score": sum(scores) / len(scores)}
    write_manifest(out.with_name(out.name + ".manifest.json"), stage="score", config=public_config(args), counts=summary)
    print(json.dumps(summary) if args.json else f"scored {summary['outputs']} outputs, mean reward {summary['mean_score']}")
    print(out)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


class BadValue(argparse.ArgumentTypeError, ValueError):
    """A flag value out of range: argparse prints its message, and --config (which catches ValueError) too."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise BadValue(f"expected a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise BadValue(f"expected 0 or a positive integer, got {text}")
    return value


def parse_bf16(value) -> bool | str:
    if isinstance(value, bool) or value == "auto":
        return value
    text = str(value).lower()
    if text in ("true", "on", "yes", "1"):
        return True
    if text in ("false", "off", "no", "0"):
        return False
    raise BadValue(f"expected auto, true or false, got {value}")


def public_config(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of whichever stage this parser is for: `rlcd train-rm`, `rlcd eval-rm` or `rlcd score`."""
    stage = p.prog.rsplit(" ", 1)[-1]  # cli.py names each subparser "rlcd <stage>"
    {"train-rm": _train_arguments, "eval-rm": _eval_arguments, "score": _score_arguments}[stage](p)


def _train_arguments(p: argparse.ArgumentParser) -> None:
    from rlcd.models import DEFAULT_MODEL

    p.add_argument("--data", help="preference table (CSV or JSONL) from rlcd consolidate, or the original release's")
    p.add_argument("--model", "--model-string", default=DEFAULT_MODEL,
                   help=f"base model: a Hugging Face directory or hub id, or '{DEFAULT_MODEL}' (embedded SmolLM2-135M); default {DEFAULT_MODEL}")
    p.add_argument("--out-dir", help="directory for the reward model, metrics.json, manifest.json and checkpoints/")
    p.add_argument("--learning-rate", type=float, default=None,
                   help=f"peak learning rate (cosine, 3%% warmup); default {FULL_LR:g}, or {LORA_LR:g} with --lora. The paper used 3e-6 "
                        "for full fine-tuning of LLaMA-7B; small models such as the 135M default learn too slowly at that rate")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training pairs (paper: 1)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="pairs per device per step (default 4)")
    p.add_argument("--gradient-accumulation-steps", type=positive_int, default=4,
                   help="micro-batches per optimizer step; effective batch = batch size x this x GPUs (paper: 16 pairs)")
    p.add_argument("--max-length", type=positive_int, default=512, help="tokens per input; longer ones lose their start (default 512)")
    p.add_argument("--eval-pairs", type=non_negative_int, default=500, help="pairs held out to monitor accuracy (default 500; 0 for none)")
    trainer_arguments(p, lora_help="train LoRA adapters plus the score head instead of all weights; saved merged")
    p.add_argument("--seed", type=int, default=42, help="seed for the held-out split, head initialisation and data order (default 42)")


def trainer_arguments(p: argparse.ArgumentParser, lora_help: str) -> None:
    """Flags every Trainer-based stage shares (train-rm, sft, dpo, rloo): LoRA, memory, precision, checkpoints."""
    p.add_argument("--lora", action="store_true", help=lora_help)
    p.add_argument("--lora-r", type=positive_int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA scaling alpha (default 32)")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA inputs (default 0.05)")
    p.add_argument("--lora-target-modules", default="all-linear", help="comma-separated module names, or all-linear (default)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass to save memory")
    p.add_argument("--bf16", type=parse_bf16, default="auto", help="bf16 mixed precision: auto (on when CUDA is available), true or false")
    p.add_argument("--save-steps", type=non_negative_int, default=500,
                   help="save a checkpoint (for --resume) every this many steps; checkpoints are deleted once training "
                        "finishes; 0 saves none (default 500)")
    p.add_argument("--save-total-limit", type=positive_int, default=1, help="keep only the last N checkpoints (default 1)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT_DIR/checkpoints")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps (overrides --epochs)")
    tracking_arguments(p)
    p.add_argument("--training-args", type=training_args, default=None,
                   help="more transformers TrainingArguments, applied last (they override the flags): a mapping in a --config "
                        "file (training-args: {adam_beta2: 0.95}) or a JSON/YAML mapping here (default: none)")


def tracking_arguments(p: argparse.ArgumentParser) -> None:
    """--report-to and --run-name: every training command's (train-rm, sft, dpo, rloo, ppo) experiment tracking."""
    p.add_argument("--report-to", choices=["none", "tensorboard", "wandb"], default="none",
                   help="also log training figures to TensorBoard (OUT_DIR/tensorboard) or Weights & Biases (project "
                        "$WANDB_PROJECT, default rlcd; WANDB_MODE=offline keeps the run on disk) (default: none)")
    p.add_argument("--run-name", default=None, help="name of the W&B run (default: one W&B picks)")


def require_tracker(report_to: str) -> None:
    """Fail before any loading when --report-to names a package that is missing (the CLI says how to install it)."""
    if report_to != "none":
        importlib.import_module(report_to)  # the packages are named as the choices: tensorboard, wandb


def finish_tracking(report_to: str) -> None:
    """End the W&B run the Trainer started: it would end only when the process exits."""
    if report_to == "wandb":
        import wandb

        wandb.finish()


def training_args(value) -> dict:
    """--training-args: TrainingArguments as a mapping (from a --config file) or as text on the command line, a JSON
    object or a YAML mapping (the Python API passes a dict as its repr, which YAML reads too)."""
    from dataclasses import fields

    import yaml
    from transformers import TrainingArguments

    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise BadValue(f"expected a mapping such as '{{adam_beta2: 0.95}}' or '{{\"adam_beta2\": 0.95}}' ({getattr(e, 'problem', e)})") from None
    if not isinstance(value, dict):
        raise BadValue(f"expected a mapping of TrainingArguments names to values, got {type(value).__name__}")
    types = {f.name: str(f.type) for f in fields(TrainingArguments)}
    for key, v in value.items():
        if key not in types:
            raise BadValue(f"unknown TrainingArguments key '{key}'")
        if key == "output_dir":
            raise BadValue("'output_dir' is rlcd's to set: checkpoints go to OUT_DIR/checkpoints")
        if isinstance(v, str) and "float" in types[key]:  # YAML reads 1e-6 (no dot) as text
            with contextlib.suppress(ValueError):
                value[key] = float(v)
    return value


def _scoring_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=positive_int, default=24, help="texts per forward pass (default 24)")
    p.add_argument("--max-length", type=positive_int, default=None, help="tokens per input, cut on the left (default: the value train-rm saved with the model)")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", help="reward model directory written by rlcd train-rm")
    p.add_argument("--data-path", help="hh-rlhf jsonl or jsonl.gz with 'chosen' and 'rejected' dialogues")
    p.add_argument("--num-pairs", type=positive_int, default=2000, help="score the first N usable pairs (paper: 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")
    p.add_argument("--out-file", help="also write the figures to this JSON file")
    _scoring_arguments(p)


def _score_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reward-model", help="reward model directory written by rlcd train-rm")
    p.add_argument("--data-path", "--in-file", dest="data_path", help="outputs file: a JSON list of {instruction, output}")
    p.add_argument("--out-file", help="where to write the outputs with a 'score' field added")
    _scoring_arguments(p)


REQUIRED = {"train-rm": ("data", "out_dir"), "eval-rm": ("model_path", "data_path"), "score": ("reward_model", "data_path", "out_file")}


def run(args: argparse.Namespace) -> None:
    # checked here, not by argparse, so that --config can supply them
    for flag in REQUIRED[args.command]:
        if not getattr(args, flag):
            raise UserError(f"--{flag.replace('_', '-')} is required")
    {"train-rm": run_train, "eval-rm": run_eval, "score": run_score}[args.command](args)
