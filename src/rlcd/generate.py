"""Outputs on test prompts (docs/method.md §8): `rlcd format-prompts`, `rlcd generate`, `rlcd postprocess`.

format-prompts  hh-rlhf dialogues (or a plain prompt list) -> a prompts file, JSON list of
                {"instruction", "input", "index"}; dev = prompts 0-999 of the test file, test = 1000-1999.
generate        one sample per prompt (temperature 1, top-p 0.9, top-k off, at most 300 new tokens,
                stop at "\\n\\nHuman:") with the in-process engines or an OpenAI-compatible server
                (--backend openai); writes an outputs file.
postprocess     the evaluation cleanup of an outputs file's `output` field (`evaluation.postprocess`).

`generate` appends each finished batch to OUT_FILE.progress.jsonl (fsynced) and writes the outputs
file, in prompt order, once every prompt is done; re-running the same command continues from the
progress file, so an interrupt loses at most the batch in flight. Each prompt's sampling seed
derives from --seed and the prompt's index alone, so batch size and resume change no output.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rlcd import dialogue
from rlcd.engines import ENGINE_HELP, ENGINE_KINDS, openai_server
from rlcd.engines.openai_server import BackendOptions
from rlcd.evaluation import SPLITS, postprocess, read_outputs
from rlcd.files import UserError, append_lines, atomic_write_text, ensure_dir, load_shard, now, open_text, write_manifest
from rlcd.models import DEFAULT_MODEL
from rlcd.options import Config, option
from rlcd.seeds import DEFAULT_SEED, sample_seed
from rlcd.text import terminal_safe

TOO_LONG = "prompt + max_new_tokens longer than the model's context"
ROUND_BATCHES = 4
"""Batches handed to the engine at a time: the fast engine refills finished slots from the whole round."""


# --------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------


def read_prompts(path: str | Path) -> dialogue.Prompts:
    """Prompts of an hh-rlhf file, a plain list, a prompts file or an outputs file (`dialogue.load_prompts`).

    A JSON list whose objects all carry an integer `index` (what format-prompts and generate write)
    keeps those indices, so a test-split file keeps the hh-rlhf positions 1000-1999, and the
    sampling seeds that derive from them.
    """
    prompts = dialogue.load_prompts(path)
    declared = _declared_indices(Path(path))
    if declared is not None:
        prompts.items = [(declared[position], prompt) for position, prompt in prompts.items]
    return prompts


def _declared_indices(path: Path) -> list[int] | None:
    if not path.name.removesuffix(".gz").endswith(".json"):
        return None
    with open_text(path) as f:
        data = json.load(f)  # load_prompts has already parsed it
    if not data or not all(isinstance(x, dict) and type(x.get("index")) is int for x in data):
        return None
    indices = [x["index"] for x in data]
    if len(set(indices)) != len(indices):
        duplicate = next(i for i, n in Counter(indices).items() if n > 1)
        raise UserError(f"{path}: index {duplicate} appears more than once; every prompt needs its own index")
    return indices


def report_skips(prompts: dialogue.Prompts) -> None:
    for line in prompts.examples:
        print(terminal_safe(f"skipped {line}", one_line=True), file=sys.stderr)


def run_format_prompts(args: FormatPromptsConfig) -> None:
    prompts = dialogue.load_prompts(args.data_path)
    items = [(i, p) for i, p in prompts.items if args.split == "all" or i in SPLITS[args.split]]
    if args.max_instances:
        items = items[: args.max_instances]
    report_skips(prompts)
    if not items:
        raise UserError(f"{args.data_path}: no usable prompts in split '{args.split}' (skipped: {dict(prompts.skipped) or 'none'})")
    out = Path(args.out_file)
    data = [{"instruction": p, "input": "", "index": i} for i, p in items]
    atomic_write_text(out, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    counts = {"prompts": len(items), "first_index": items[0][0], "last_index": items[-1][0], "skipped": dict(prompts.skipped)}
    write_manifest(out.with_name(out.name + ".manifest.json"), stage="format-prompts", data_path=str(args.data_path),
                   split=args.split, max_instances=args.max_instances, counts=counts)
    print(f"{len(items)} prompts (split {args.split}, indices {items[0][0]}-{items[-1][0]}); "
          f"skipped lines: {dict(prompts.skipped) or 'none'}")
    print(out)


# --------------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------------


def sampling_params(args: GenerateConfig):
    from rlcd.engines import SamplingParams

    # top-k off: the evaluation samples with top-p only (docs/method.md §8)
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=0, top_p=args.top_p,
                          stop=(dialogue.HUMAN,), stop_at_eos=True)


def prompt_seed(seed: int, index: int) -> int:
    return sample_seed(seed, index, "generate", 0)


def make_engine(args):
    """(engine, what the manifest records of it) for these flags: the server's, or an in-process one for --model
    (a LoRA adapter directory is merged on load)."""
    if args.backend == "openai":
        return openai_server.from_arguments(args)
    from rlcd.engines import load_engine

    return load_engine(args.model, kind=args.engine, device=args.device, dtype=args.dtype, batch_size=args.batch_size)


def settings_of(args: GenerateConfig) -> dict:
    """What decides the outputs: a progress file made with other settings cannot be continued."""
    model = args.model if args.backend == "hf" else f"openai:{args.api_model}"
    return {"model": model, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "top_p": args.top_p, "top_k": 0, "stop": dialogue.HUMAN}


def load_progress(path: Path, settings: dict, prompts: dict[int, str]) -> dict[int, dict]:
    """Records already generated, by index; refuses a progress file of other settings or other prompts."""
    done: dict[int, dict] = {}
    for n, record in enumerate(load_shard(path, repair=True)):
        if "settings" in record:
            if record["settings"] != settings:
                changed = sorted(k for k in settings if record["settings"].get(k) != settings[k])
                raise UserError(f"{path}: made with other settings ({', '.join(changed)}); use the same flags to continue it, "
                                "or another --out-file")
            continue
        index = record.get("index")
        if index in prompts and record.get("instruction") != prompts[index]:
            raise UserError(f"{path}:{n + 1}: prompt {index} differs from the one in the prompts file; use another --out-file")
        done[index] = record
    return done


def generate_records(engine, items: list[tuple[int, str]], params, seed: int) -> list[dict]:
    """One output record per (index, prompt)."""
    completions = engine.generate([p for _, p in items], params, [prompt_seed(seed, i) for i, _ in items])
    return [
        {"index": i, "instruction": p, "output": postprocess(c.text), "raw_output": c.text,
         "finish_reason": c.finish_reason, "num_tokens": c.num_tokens}
        for (i, p), c in zip(items, completions)
    ]


def check_settings(args) -> None:
    """One-line errors for settings out of range, before any work (a config's own check, and `check_generate_args`')."""
    checks = [
        (args.batch_size >= 1, "--batch-size must be at least 1"),
        (1 <= args.max_new_tokens <= 100_000, "--max-new-tokens must be between 1 and 100000"),
        (0 <= args.temperature <= 100, "--temperature must be in [0, 100] (0 = greedy)"),
        (0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
        (args.max_instances is None or args.max_instances >= 1, "--max-instances must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    openai_server.check_arguments(args, uses_server=False)


def check_generate_args(args: GenerateConfig) -> None:
    """`check_settings` and, with --backend openai, the server's URL and key (from the environment)."""
    check_settings(args)  # a config has passed them already; any other object with these attributes has not
    openai_server.check_arguments(args, uses_server=args.backend == "openai")


def run_generate(args: GenerateConfig) -> None:
    from tqdm import tqdm

    check_generate_args(args)
    prompts = read_prompts(args.prompts)
    items = prompts.items[: args.max_instances] if args.max_instances else prompts.items
    report_skips(prompts)
    if not items:
        raise UserError(f"{args.prompts}: no usable prompts (skipped: {dict(prompts.skipped) or 'none'})")
    out = Path(args.out_file)
    progress_path = out.with_name(out.name + ".progress.jsonl")
    manifest_path = out.with_name(out.name + ".manifest.json")
    ensure_dir(out.parent)
    settings = settings_of(args)
    done = load_progress(progress_path, settings, dict(items))
    if not progress_path.exists() or progress_path.stat().st_size == 0:
        append_lines(progress_path, [{"settings": settings}])
    todo = [(i, p) for i, p in items if i not in done]
    skipped = Counter(prompts.skipped)
    info: dict = {}
    started = time.time()
    tokens = 0
    base = {"stage": "generate", "prompts": str(args.prompts), "settings": settings, "started_at": now()}

    if todo:
        engine, info = make_engine(args)
        params = sampling_params(args)
        if engine.context_length:
            fits = [(i, p) for i, p in todo if engine.count_tokens(p) + args.max_new_tokens <= engine.context_length]
            skipped[TOO_LONG] += len(todo) - len(fits)
            todo = fits
        write_manifest(manifest_path, status="running", engine=info, **base)
        print(f"generate: {len(items)} prompts, {len(done)} already done, {len(todo)} to do; skipped {dict(skipped) or 'none'}",
              file=sys.stderr)
        # longest first: similar lengths share a batch, and the slowest work starts early
        queue = sorted(todo, key=lambda item: -len(item[1]))
        per_round = args.batch_size * ROUND_BATCHES
        try:
            with tqdm(total=len(queue), desc="generate", unit="prompt", file=sys.stderr) as bar:
                for start in range(0, len(queue), per_round):
                    records = generate_records(engine, queue[start : start + per_round], params, args.seed)
                    bar.update(len(records))
                    # a prompt the server refused as longer than its context: skipped and counted, as measured ones are
                    skipped[TOO_LONG] += sum(r["finish_reason"] == "too_long" for r in records)
                    records = [r for r in records if r["finish_reason"] != "too_long"]
                    append_lines(progress_path, records)
                    for r in records:
                        done[r["index"]] = r
                        tokens += r["num_tokens"]
                    bar.set_postfix(tokens_per_s=f"{tokens / max(time.time() - started, 1e-9):.0f}")
        except BaseException:
            write_manifest(manifest_path, status="interrupted", engine=info, counts={"done": len(done)}, **base)
            raise
    elif manifest_path.exists():  # nothing left to generate: keep the engine that made the outputs on record
        try:
            info = json.loads(manifest_path.read_text(encoding="utf-8")).get("engine", {})
        except json.JSONDecodeError:
            pass

    outputs = [{**{k: v for k, v in done[i].items() if k != "index"}, "index": i} for i, _ in items if i in done]
    atomic_write_text(out, json.dumps(outputs, indent=2, ensure_ascii=False) + "\n")
    counts = {
        "outputs": len(outputs),
        "generated_this_run": len(todo),
        "skipped": dict(skipped),
        "finish_reasons": dict(Counter(o["finish_reason"] for o in outputs)),
        "mean_tokens": round(sum(o["num_tokens"] for o in outputs) / len(outputs), 1) if outputs else None,
        "empty_after_postprocess": sum(not o["output"] for o in outputs),
    }
    write_manifest(manifest_path, status="complete", engine=info, finished_at=now(), counts=counts,
                   seconds=round(time.time() - started, 1), **base)
    print(f"{counts['outputs']} outputs ({len(todo)} generated now, {tokens} tokens in {time.time() - started:.0f}s); "
          f"finish reasons {counts['finish_reasons']}; mean {counts['mean_tokens']} tokens; skipped {dict(skipped) or 'none'}")
    print(out)


# --------------------------------------------------------------------------------------------------
# postprocess
# --------------------------------------------------------------------------------------------------


def run_postprocess(args: PostprocessConfig) -> None:
    items = read_outputs(args.in_file)
    cleaned = [{**it, "output": postprocess(it["output"])} for it in items]
    changed = sum(a["output"] != b["output"] for a, b in zip(items, cleaned))
    out = Path(args.out_file)
    atomic_write_text(out, json.dumps(cleaned, indent=2, ensure_ascii=False) + "\n")
    counts = {"outputs": len(cleaned), "changed": changed, "empty": sum(not c["output"] for c in cleaned)}
    write_manifest(out.with_name(out.name + ".manifest.json"), stage="postprocess", in_file=str(args.in_file), counts=counts)
    print(f"{counts['outputs']} outputs, {changed} changed, {counts['empty']} empty after postprocessing")
    print(out)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


@dataclass
class FormatPromptsConfig(Config):
    """`rlcd format-prompts`: hh-rlhf dialogues or a prompt list -> a prompts file of one split."""

    command: ClassVar[str] = "format-prompts"
    data_path: str | None = option(None, "hh-rlhf jsonl(.gz) (prompt = 'chosen' cut after its last 'Assistant:'), or a plain list of questions",
                                   flags=("--prompts-file", "--data-path"), metavar="PROMPTS_FILE", required=True)
    out_file: str | None = option(None, "prompts file to write: a JSON list of {instruction, input, index}", required=True)
    split: str = option("all", "dev = prompts 0-999, test = 1000-1999 of the file (docs/method.md §2)", choices=("dev", "test", "all"))
    max_instances: int | None = option(None, "keep only the first N prompts of the split")


@dataclass
class GenerateConfig(BackendOptions):
    """`rlcd generate`: one sampled output per prompt from a policy -> an outputs file (resumable)."""

    command: ClassVar[str] = "generate"
    model: str = option(DEFAULT_MODEL, "policy: a Hugging Face directory (e.g. from rlcd sft/dpo/rloo/ppo), a LoRA adapter directory, "
                        f"a hub id, or '{DEFAULT_MODEL}' (the embedded default)", flags=("--model", "--model-string"))
    prompts: str | None = option(None, "prompts file from format-prompts, an hh-rlhf jsonl(.gz), a plain list, or an outputs file",
                                 flags=("--prompts-file", "--prompts"), metavar="PROMPTS_FILE", required=True)
    out_file: str | None = option(None, "outputs file to write (JSON list of {instruction, output, raw_output, ...})", required=True)
    max_instances: int | None = option(None, "only the first N prompts")
    batch_size: int = option(32, "prompts generated per batch")
    seed: int = option(DEFAULT_SEED, "sampling seed; each prompt's seed derives from it and the prompt's index")
    max_new_tokens: int = option(300, "most new tokens per output (docs/method.md §8)")
    temperature: float = option(1.0, "0 = greedy")
    top_p: float = option(0.9, "nucleus sampling; top-k is off")
    engine: str = option("auto", f"with --backend hf, the {ENGINE_HELP}", choices=ENGINE_KINDS)
    device: str | None = option(None, "cpu, cuda, cuda:1 ... (default: the GPU of this process if any, else cpu)")
    dtype: str = option("auto", "auto (bf16 on GPU and on CPUs with native bf16, else fp32), float32, bfloat16, float16")

    def validate(self) -> None:
        super().validate()
        check_settings(self)


@dataclass
class PostprocessConfig(Config):
    """`rlcd postprocess`: an outputs file with its `output` field cleaned (cut at the next speaker turn)."""

    command: ClassVar[str] = "postprocess"
    in_file: str | None = option(None, "outputs file: a JSON list of {instruction, output}", flags=("--data", "--in-file"), metavar="DATA",
                                 required=True)
    out_file: str | None = option(None, "where to write the outputs with 'output' postprocessed", required=True)


CONFIGS = {"format-prompts": FormatPromptsConfig, "generate": GenerateConfig, "postprocess": PostprocessConfig}
RUNNERS = {"format-prompts": run_format_prompts, "generate": run_generate, "postprocess": run_postprocess}


def run(args: FormatPromptsConfig | GenerateConfig | PostprocessConfig) -> None:
    RUNNERS[args.command](args)
