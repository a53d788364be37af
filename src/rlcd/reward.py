"""Reward model: `rlcd train-rm` (Bradley-Terry on a preference table), `rlcd eval-rm` (agreement with
human labels, docs/method.md §8) and `rlcd score` (outputs file -> outputs with rewards).

How every stage formats, scores and loads a reward model is in `reward_model.py` (a plain
`AutoModelForSequenceClassification` with one output, read at the last real token, padding on the right);
the Trainer settings and flags the training commands share are in `training.py`.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rlcd import artifacts, dialogue
from rlcd.evaluation import read_hh_pairs, read_outputs, split_dialogue  # noqa: F401 - split_dialogue: rlcd.reward's name kept
from rlcd.files import UserError, atomic_write_text, ensure_dir, now, write_manifest
from rlcd.models import DEFAULT_MODEL
from rlcd.options import Config, option
from rlcd.packing import packed_batch, pair_row
from rlcd.reward_model import encode_texts, format_rm_input, load_reward_model, packed_scores, pad_right, score_head, score_texts
from rlcd.seeds import DEFAULT_SEED
from rlcd.training import (  # noqa: F401 - training_config: rlcd.reward's name kept
    TrainerOptions,
    check_out_dir,
    finish_tracking,
    non_negative_int,
    parse_bf16,
    positive_int,
    public_config,
    require_one_gpu_per_process,
    require_tracker,
    training_config,
    writing_model,
)

FULL_LR, LORA_LR = 1e-5, 1e-4


# --------------------------------------------------------------------------------------------------
# Loss and agreement: pure functions
# --------------------------------------------------------------------------------------------------


def preference_loss(rewards_chosen, rewards_rejected, chosen_prob):
    """Mean binary cross-entropy of sigmoid(r_chosen - r_rejected) against P(chosen is better).

    chosen_prob = 1 gives the hard Bradley-Terry loss -log sigmoid(r_chosen - r_rejected). Since
    BCE(x, p) = BCE(-x, 1 - p), chosen_prob = win2_prob with chosen = output_2 (or 1 - win2_prob with
    chosen = output_1) is exactly the soft loss of docs/method.md §5, BCE(r(output_2) - r(output_1), win2_prob).
    """
    import torch.nn.functional as F

    return F.binary_cross_entropy_with_logits(rewards_chosen - rewards_rejected, chosen_prob)


def agreement(chosen_scores: list[float], rejected_scores: list[float], seed: int = DEFAULT_SEED, resamples: int = 1000) -> dict:
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


def length_controls(pairs: list[tuple[str, str]], chosen_scores: list[float], rejected_scores: list[float],
                    seed: int = DEFAULT_SEED) -> dict:
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
    """Batches tokenized pairs, plus `chosen_prob`, the training target. Packed (`mask_dtype` given, for a model with
    a head at every position): each pair one row, its shared start (the conversation) once and each side's rest masked
    from the other (`packing.pair_row`), `reads` where each side's score is read, chosen then rejected, pair by pair.
    Otherwise TRL's layout: chosen rows first, then rejected rows, padded on the right."""

    pad_token_id: int
    mask_dtype: object = None

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        chosen_prob = torch.tensor([float(e["chosen_prob"]) for e in examples], dtype=torch.float32)
        if self.mask_dtype is not None:
            rows = [pair_row(e["chosen_ids"], e["rejected_ids"]) for e in examples]
            input_ids, positions, mask, reads = packed_batch(rows, self.pad_token_id, self.mask_dtype)
            return {"input_ids": input_ids, "position_ids": positions, "attention_mask": mask, "reads": reads, "chosen_prob": chosen_prob}
        input_ids, attention_mask = pad_right([e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples], self.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "chosen_prob": chosen_prob}


class LengthGroupedOrder:
    """--group-by-length: the training pairs' order for the Trainer's sampler. Sorted by the longer side, pairs are cut
    into runs of `batch` (a micro-batch), and the full runs come in an order drawn from (seed, epoch), the short
    remainder last, so every micro-batch is one run: similar lengths, less padding, batches still in a random order.
    (transformers' LengthGroupedSampler sorts within megabatches of 50 batches, which for a set this small means
    longest first, in the same order every epoch, and its switch is named differently across transformers 5.x.)"""

    def __init__(self, lengths: list[int], batch: int, seed: int):
        self.lengths, self.batch, self.seed, self.epoch = lengths, batch, seed, 0

    def set_epoch(self, epoch: int) -> None:  # called by the Trainer's data loader at each epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        import torch

        order = sorted(range(len(self.lengths)), key=lambda i: -self.lengths[i])
        full = len(order) // self.batch
        runs = [order[k * self.batch : (k + 1) * self.batch] for k in range(full)]
        shuffled = torch.randperm(full, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)).tolist()
        return iter([i for k in shuffled for i in runs[k]] + order[full * self.batch :])


def soft_label_reward_trainer():
    """TRL's RewardTrainer with a loss that takes soft targets (TRL's takes hard labels only).

    Built on first use: importing TRL takes seconds, which every `rlcd --help` would pay otherwise.
    """
    from trl import RewardTrainer

    class SoftLabelRewardTrainer(RewardTrainer):
        length_grouped: LengthGroupedOrder | None = None

        def _get_train_sampler(self, *args, **kwargs):
            return self.length_grouped or super()._get_train_sampler(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            if "reads" in inputs:  # packed pairs
                scores = packed_scores(model, self.accelerator.unwrap_model(model), inputs).float()
                rewards_chosen, rewards_rejected = scores[0::2], scores[1::2]
                outputs = {"rewards": scores}
            else:
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


def reward_config(args: TrainRmConfig, output_dir: Path, bf16: bool, has_eval: bool):
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


def train_reward_model(args: TrainRmConfig) -> dict:
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

    # pairs packed where the model has a head at every position: a quarter fewer tokens on the demo's pairs
    collator = PairCollator(tokenizer.pad_token_id, model.get_input_embeddings().weight.dtype if score_head(model) else None)
    trainer = soft_label_reward_trainer()(
        model=model,
        args=reward_config(args, out_dir / "checkpoints", bf16, has_eval=bool(heldout_idx)),
        data_collator=collator,
        train_dataset=Dataset.from_dict(train_cols),
        eval_dataset=Dataset.from_dict(eval_cols) if heldout_idx else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if args.group_by_length:
        sides = zip(train_cols["chosen_ids"], train_cols["rejected_ids"])
        lengths = [pair_row(c, r).length if collator.mask_dtype else max(len(c), len(r)) for c, r in sides]
        trainer.length_grouped = LengthGroupedOrder(lengths, trainer.args.per_device_train_batch_size, args.seed)
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
        scores = score_texts(final, tokenizer, [pairs[i][0] for i in heldout_idx] + [pairs[i][1] for i in heldout_idx], args.batch_size * 2)
        chosen, rejected = scores[: len(heldout_idx)], scores[len(heldout_idx) :]
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


def check_finite(trainer, args: TrainRmConfig) -> None:
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


def run_train(args: TrainRmConfig) -> None:
    if args.learning_rate is None:
        args.learning_rate = LORA_LR if args.lora else FULL_LR
    args.bf16 = parse_bf16(args.bf16)
    args.validate()  # again: fields may have been set after the config was built
    require_tracker(args.report_to)
    require_one_gpu_per_process()
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


def evaluate_reward_model(args: EvalRmConfig) -> dict:
    pairs, skipped, problems = read_hh_pairs(args.data_path, args.num_pairs)
    for line in problems[:10]:  # stderr: with --json, stdout holds only the figures
        print(f"skipped {line}", file=sys.stderr)
    if len(problems) > 10:
        print(f"... and {len(problems) - 10} more skipped lines", file=sys.stderr)
    if not pairs:
        raise UserError(f"{args.data_path}: no usable chosen/rejected pairs ({dict(skipped) or 'empty file'})")
    model, tokenizer = load_reward_model(args.model_path, dtype=args.dtype, flag="--reward-model")
    t0 = time.time()
    scores = score_texts(model, tokenizer, [c for c, _ in pairs] + [r for _, r in pairs], args.batch_size, args.max_length, progress=True)
    broken = sum(not math.isfinite(x) for x in scores)
    if broken:
        raise UserError(f"--reward-model {args.model_path}: {broken} of {len(scores)} scores are NaN or inf, so no agreement can be "
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


def run_eval(args: EvalRmConfig) -> None:
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


def run_score(args: ScoreConfig) -> None:
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


@dataclass
class TrainRmConfig(TrainerOptions):
    """`rlcd train-rm`: a reward model trained on a preference table (Bradley-Terry, soft labels where the table has them)."""

    command: ClassVar[str] = "train-rm"
    data: str | None = option(None, "preference table (CSV or JSONL) from rlcd consolidate, or the original release's", required=True)
    model: str = option(DEFAULT_MODEL, f"base model: a Hugging Face directory or hub id, or '{DEFAULT_MODEL}' (embedded SmolLM2-135M)",
                        flags=("--model", "--model-string"))
    out_dir: str | None = option(None, "directory for the reward model, metrics.json, manifest.json and checkpoints/", required=True)
    learning_rate: float | None = option(None, f"peak learning rate (cosine, 3%% warmup); default {FULL_LR:g}, or {LORA_LR:g} with --lora. "
                                         "The paper used 3e-6 for full fine-tuning of LLaMA-7B; small models such as the 135M default "
                                         "learn too slowly at that rate")
    epochs: float = option(1.0, "passes over the training pairs (paper: 1)")
    batch_size: int = option(4, "pairs per device per step", type=positive_int)
    gradient_accumulation_steps: int = option(4, "micro-batches per optimizer step; effective batch = batch size x this x GPUs "
                                              "(paper: 16 pairs)", type=positive_int)
    max_length: int = option(512, "tokens per input; longer ones lose their start", type=positive_int)
    group_by_length: bool = option(False, "micro-batches of pairs of similar length, in a random order: less padding to compute "
                                          "(the demo's pairs: 19%% fewer tokens) than random batches")
    eval_pairs: int = option(500, "pairs held out to monitor accuracy (0 for none)", type=non_negative_int)
    seed: int = option(DEFAULT_SEED, "seed for the held-out split, head initialisation and data order")

    def validate(self) -> None:
        super().validate()
        checks = [  # before any loading or writing
            (self.learning_rate is None or self.learning_rate > 0, f"--learning-rate must be positive, got {self.learning_rate}"),
            (self.epochs > 0, f"--epochs must be positive, got {self.epochs}"),
            (self.lora_alpha > 0, f"--lora-alpha must be positive, got {self.lora_alpha}"),
            (0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


@dataclass
class ScoringOptions(Config):
    """What eval-rm and score share: how the reward model reads its inputs, and how the figures are printed."""

    batch_size: int = option(24, "texts per forward pass", type=positive_int)
    max_length: int | None = option(None, "tokens per input, cut on the left (default: the value train-rm saved with the model)",
                                     type=positive_int)
    dtype: str = option("auto", "auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16")
    json: bool = option(False, "print the figures as one JSON object")


@dataclass
class EvalRmConfig(ScoringOptions):
    """`rlcd eval-rm`: the agreement of a reward model with human labels (hh-rlhf pairs), with a bootstrap interval."""

    command: ClassVar[str] = "eval-rm"
    model_path: str | None = option(None, "reward model directory written by rlcd train-rm", flags=("--reward-model", "--model-path"),
                                    metavar="REWARD_MODEL", required=True)
    data_path: str | None = option(None, "human-labelled pairs: hh-rlhf jsonl(.gz) with 'chosen' and 'rejected' dialogues, or a "
                                   "preference table", flags=("--data", "--data-path"), metavar="DATA", required=True)
    num_pairs: int = option(2000, "score the first N usable pairs (paper: 2000)", type=positive_int)
    seed: int = option(DEFAULT_SEED, "seed of the bootstrap resampling")
    out_file: str | None = option(None, "also write the figures to this JSON file")


@dataclass
class ScoreConfig(ScoringOptions):
    """`rlcd score`: an outputs file with each output's reward-model score added."""

    command: ClassVar[str] = "score"
    reward_model: str | None = option(None, "reward model directory written by rlcd train-rm", required=True)
    data_path: str | None = option(None, "outputs file: a JSON list of {instruction, output}", flags=("--data", "--data-path", "--in-file"),
                                   metavar="DATA", required=True)
    out_file: str | None = option(None, "where to write the outputs with a 'score' field added", required=True)


CONFIGS = {"train-rm": TrainRmConfig, "eval-rm": EvalRmConfig, "score": ScoreConfig}


def run(args: TrainRmConfig | EvalRmConfig | ScoreConfig) -> None:
    {"train-rm": run_train, "eval-rm": run_eval, "score": run_score}[args.command](args)
