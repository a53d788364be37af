"""What the training commands share (train-rm, sft, dpo, rloo; ppo the flag types and tracking): the
Trainer settings and their flags, the output directory and its checkpoints, experiment tracking, and the
types of flag values.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rlcd.files import UserError
from rlcd.options import BadValue, Config, non_negative_int, option, positive_int  # noqa: F401 - the stages import the types from here too

WARMUP_FRACTION = 0.03  # docs/method.md §5: cosine schedule, 3% warmup, weight decay 0


LOGGING_STEPS = 10


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
    # transformers 5.2x renamed gradient_checkpointing* to activation_checkpointing* (old names warn, removed in v6)
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    passed = dict(args.training_args or {})
    for old in ("gradient_checkpointing", "gradient_checkpointing_kwargs"):  # a --training-args file with the old names
        if old in passed and checkpointing != "gradient_checkpointing":
            passed[old.replace("gradient", "activation", 1)] = passed.pop(old)
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
        **{checkpointing: args.gradient_checkpointing,
           f"{checkpointing}_kwargs": {"use_reentrant": False} if args.gradient_checkpointing else None},
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
    settings.update(passed)  # --training-args last: they override what the flags set
    try:
        return config_cls(**settings)
    except (TypeError, ValueError) as e:
        raise UserError(f"the Trainer refused these settings: {str(e).strip().splitlines()[0]}") from None


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


TRACKING = "experiment tracking"


@dataclass
class TrackingOptions(Config):
    """--report-to and --run-name: every training command's (train-rm, sft, dpo, rloo, ppo) experiment tracking."""

    report_to: str = option("none", "also log training figures to TensorBoard (OUT_DIR/tensorboard) or Weights & Biases (project "
                            "$WANDB_PROJECT, else rlcd; WANDB_MODE=offline keeps the run on disk)",
                            choices=("none", "tensorboard", "wandb"), group=TRACKING)
    run_name: str | None = option(None, "name of the W&B run (default: one W&B picks)", group=TRACKING)


@dataclass
class TrainerOptions(TrackingOptions):
    """Settings every Trainer-based stage shares (train-rm, sft, dpo, rloo): LoRA, memory, precision, checkpoints."""

    lora: bool = option(False, "train LoRA adapters instead of all weights (a reward model's score head is trained whole); "
                        "the saved model is merged", group="trainer")
    lora_r: int = option(16, "LoRA rank", type=positive_int, group="trainer")
    lora_alpha: float = option(32.0, "LoRA scaling alpha", group="trainer")
    lora_dropout: float = option(0.05, "dropout on the LoRA inputs", group="trainer")
    lora_target_modules: str = option("all-linear", "comma-separated module names, or all-linear", group="trainer")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory", group="trainer")
    bf16: bool | str = option("auto", "bf16 mixed precision: auto (on when CUDA is available), true or false", type=parse_bf16, group="trainer")
    save_steps: int = option(500, "save a checkpoint (for --resume) every this many steps; checkpoints are deleted once training "
                             "finishes; 0 saves none", type=non_negative_int, group="trainer")
    save_total_limit: int = option(1, "keep only the last N checkpoints", type=positive_int, group="trainer")
    resume: bool = option(False, "continue from the last checkpoint in OUT_DIR/checkpoints", group="trainer")
    max_steps: int | None = option(None, "stop after this many optimizer steps (overrides --epochs)", type=positive_int, group="trainer")
    training_args: dict | None = option(None, "more transformers TrainingArguments, applied last (they override the flags): a mapping "
                                        "in a --config file (training-args: {adam_beta2: 0.95}) or a JSON/YAML mapping here (default: none)",
                                        type=lambda value: training_args(value), group="trainer")


def require_tracker(report_to: str) -> None:
    """Fail before any loading when --report-to names a package that is missing (the CLI says how to install it)."""
    if report_to != "none":
        importlib.import_module(report_to)  # the packages are named as the choices: tensorboard, wandb


def require_one_gpu_per_process() -> None:
    """One process that sees several GPUs would train under `nn.DataParallel`, which TRL's trainers refuse (with a
    traceback, after loading): say at once how to use them all, or one."""
    import torch

    if "WORLD_SIZE" not in os.environ and torch.cuda.device_count() > 1:
        raise UserError(f"this process sees {torch.cuda.device_count()} GPUs: train on all of them with `accelerate launch --config_file "
                        "configs/accelerate/ddp.yaml -m rlcd ...` (docs/multi-gpu.md), or on one with CUDA_VISIBLE_DEVICES=0")


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
