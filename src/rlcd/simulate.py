"""`rlcd simulate`: preference-pair simulation by RLCD, RLAIF or RLCD-Rescore (docs/method.md §3-4).

For every prompt index in this process's slice:
  rlcd          sample o+ from p+ and o- from p- (chosen, rejected);
  rlaif         sample two outputs from the plain prompt (A, B), then judge A vs B;
  rlcd_rescore  the rlcd pair shuffled into slots A/B, judged with the pair's own principle.
A rejected sample is redrawn (up to --max-attempts per output); an index whose output
fails every attempt is written as a final `failed` record.

Records go to records-r{remainder}-of-{mod}.jsonl in --out-dir, appended and fsynced
after every batch; a re-run skips every index already in any shard of the directory.
Every random choice derives from --seed and the prompt index alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from rlcd import dialogue
from rlcd.engines import ENGINE_HELP, ENGINE_KINDS, Engine, SamplingParams, load_engine, openai_server
from rlcd.engines.openai_server import BackendOptions
from rlcd.files import UserError, append_lines, ensure_dir, now, write_manifest
from rlcd.models import DEFAULT_MODEL, resolve_model
from rlcd.options import option
from rlcd.preferences import latest_records, load_records
from rlcd.seeds import DEFAULT_SEED, sample_seed
from rlcd.tasks import Task, load_task
from rlcd.text import terminal_safe

SLOTS = {"rlcd": ("chosen", "rejected"), "rlaif": ("A", "B"), "rlcd_rescore": ("A", "B")}
TOO_LONG = "prompt + max_new_tokens longer than the model's context"
ROUND_BATCHES = 4
"""Samples handed to the engine per round, in batches: the fast engine refills finished slots from the
round, so a round of several batches keeps its batch full; records are written after every round."""


@dataclass
class SimulationConfig:
    method: str = "rlcd"
    seed: int = DEFAULT_SEED
    max_new_tokens: int = 300
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    max_attempts: int = 5
    batch_size: int = 32
    accept_eos: bool = False
    prompt_style: str = "raw"
    retry_failed: bool = False

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
            top_p=self.top_p, stop=dialogue.STOP, banned=dialogue.BANNED,
        )


def rng(seed: int, index: int, purpose: str) -> random.Random:
    return random.Random(f"{seed}:{index}:{purpose}")


def plan_record(index: int, prompt: str, task: Task, cfg: SimulationConfig, chat_template=None) -> dict:
    """The record skeleton of one prompt: which descriptor pair, principle and slots it uses, and the prompts sent."""
    record = {"index": index, "method": cfg.method, "status": "pending", "prompt": prompt}
    if cfg.method == "rlaif":
        principle = rng(cfg.seed, index, "principle").randrange(len(task.principles))
        sent = chat_template(dialogue.chat_messages(prompt, None)) if chat_template else prompt
        record.update(descriptor_index=None, principle_index=principle, actual_prompts={"A": sent, "B": sent})
        return record
    d = rng(cfg.seed, index, "descriptor").randrange(len(task.positive))
    pos, neg = task.positive[d], task.negative[d]
    if chat_template:
        positive = chat_template(dialogue.chat_messages(prompt, pos))
        negative = chat_template(dialogue.chat_messages(prompt, neg))
    else:
        positive, negative = dialogue.contrast_prompts(prompt, pos, neg)
    record["descriptor_index"] = d
    if cfg.method == "rlcd":
        record["actual_prompts"] = {"chosen": positive, "rejected": negative}
    else:
        slot = "A" if rng(cfg.seed, index, "slots").random() < 0.5 else "B"
        other = "B" if slot == "A" else "A"
        record.update(principle_index=d, positive_slot=slot, actual_prompts={slot: positive, other: negative})
    return record


class Simulation:
    """Runs the generate -> filter -> retry -> (judge) -> write loop over one slice of prompts."""

    def __init__(self, engine: Engine, task: Task, cfg: SimulationConfig, shard: Path, chat_template=None):
        self.engine, self.task, self.cfg, self.shard = engine, task, cfg, shard
        self.chat_template = chat_template
        self.params = cfg.sampling()
        self.accept_eos = cfg.accept_eos or cfg.prompt_style == "chat"
        self.tokens = 0

    def run(self, items: list[tuple[int, str]], previous: dict[int, dict], progress=None) -> Counter:
        counts = Counter()
        cfg, slots = self.cfg, SLOTS[self.cfg.method]
        # longest prompts first: batches hold similar lengths, and the slowest work starts early
        queue = sorted(items, key=lambda item: -len(item[1]))
        waiting: dict[int, dict] = {}  # index -> record being built
        retries: list[int] = []  # indices with a rejected sample to redraw
        while queue or retries:
            # an index's pending slots always share a batch, so attempts advance in lockstep and a
            # record never depends on how batches happened to be cut
            jobs: list[tuple[int, str]] = []
            per_round = cfg.batch_size * ROUND_BATCHES
            while retries and len(jobs) < per_round:
                index = retries.pop(0)
                jobs += [(index, s) for s in slots if s not in waiting[index]["outputs"]]
            while queue and len(jobs) < per_round:
                index, prompt = queue.pop(0)
                record = plan_record(index, prompt, self.task, cfg, self.chat_template)
                before = previous.get(index, {}).get("attempts", {})
                record.update(outputs={}, attempts={s: before.get(s, 0) for s in slots}, rejections={s: [] for s in slots})
                record["_limit"] = {s: before.get(s, 0) + cfg.max_attempts for s in slots}
                waiting[index] = record
                jobs += [(index, s) for s in slots]
            completions = self.engine.generate(
                [waiting[i]["actual_prompts"][s] for i, s in jobs], self.params,
                [sample_seed(cfg.seed, i, s, waiting[i]["attempts"][s]) for i, s in jobs],
            )
            touched: list[int] = []
            for (index, slot), completion in zip(jobs, completions):
                record = waiting[index]
                self.tokens += completion.num_tokens
                if completion.finish_reason == "too_long" or record["status"] == TOO_LONG:
                    record["status"] = TOO_LONG  # the server refused a prompt of it: skipped and counted, not a record
                else:
                    record["attempts"][slot] += 1
                    response, reason = dialogue.filter_completion(completion.text, completion.finish_reason, self.accept_eos)
                    if response is not None:
                        record["outputs"][slot] = response
                    else:
                        record["rejections"][slot].append(reason)
                        if record["attempts"][slot] >= record["_limit"][slot]:
                            record["status"] = "failed"
                if index not in touched:
                    touched.append(index)
            finished = []
            for index in touched:
                record = waiting[index]
                if record["status"] == "pending" and len(record["outputs"]) == len(slots):
                    record["status"] = "ok"
                (finished if record["status"] != "pending" else retries).append(index)
            done = [waiting.pop(i) for i in finished]
            if cfg.method != "rlcd":
                self.judge([r for r in done if r["status"] == "ok"])
            for r in done:
                del r["_limit"]
                counts[r["status"]] += 1
            append_lines(self.shard, [r for r in done if r["status"] != TOO_LONG])
            if progress:
                progress(len(done), self.tokens)
        return counts

    def judge(self, records: list[dict]) -> None:
        """Post-hoc A/B judgment from the next-token log-probabilities of the letters after '('."""
        if not records:
            return
        prompts = [
            dialogue.judge_prompt(r["prompt"], self.task.principles[r["principle_index"]], r["outputs"]["A"], r["outputs"]["B"])
            for r in records
        ]
        logprobs, ids = self.engine.next_token_logprobs(prompts, ["A", "B"])
        for r, (la, lb) in zip(records, logprobs):
            r.update(logprob_A=la, logprob_B=lb, win2_prob=1.0 / (1.0 + math.exp(la - lb)), letter_token_ids=ids)


@contextlib.contextmanager
def lock_shard(shard: Path):
    """Hold an exclusive lock on the shard: two processes given the same slice would otherwise both
    append (duplicates) and repair each other's last line. The kernel drops the lock when the
    process ends, kill -9 included."""
    lock_path = shard.with_name(f".{shard.stem}.lock")
    try:
        f = open(lock_path, "a+")
    except OSError as e:
        raise UserError(f"{lock_path}: cannot create the shard's lock file ({e.strerror})") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(f"{shard}: {holder} is already writing this shard (same --out-dir and slice); "
                            "give each process its own --indices-remainder") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {os.uname().nodename}")
        f.flush()
        yield


def select_indices(items, indices: str | None, mod: int, remainder: int):
    wanted = parse_indices(indices) if indices else None
    return [(i, p) for i, p in items if (wanted is None or i in wanted) and i % mod == remainder]


def parse_indices(spec: str) -> set[int]:
    """'17-29,35-40,50' -> {17..29, 35..40, 50} (ranges inclusive, as in the original scripts)."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                start, end = (int(x) for x in part.split("-", 1))
                if end < start:
                    raise ValueError
                out.update(range(start, end + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise UserError(f"--indices: '{part}' is not an index or an inclusive range like 17-29") from None
    return out


def process_slice(mod: int | None, remainder: int | None) -> tuple[int, int]:
    """This process's slice: the user's --indices-mod/--indices-remainder, split further over
    the processes of `accelerate launch` (i % (mod*world) == remainder + mod*rank keeps i % mod == remainder)."""
    if (mod is None) != (remainder is None):
        raise UserError("--indices-mod and --indices-remainder go together")
    mod, remainder = (mod, remainder) if mod is not None else (1, 0)
    if mod < 1 or not 0 <= remainder < mod:
        raise UserError(f"--indices-remainder must be in [0, --indices-mod); got {remainder} of {mod}")
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    return mod * world, remainder + mod * rank


@dataclass
class SimulateConfig(BackendOptions):
    """`rlcd simulate`: preference pairs by RLCD, RLAIF or RLCD-Rescore, appended to record shards in --out-dir."""

    command: ClassVar[str] = "simulate"
    # data
    prompts_file: str | None = option(None, "hh-rlhf JSONL(.gz), or a JSON/JSONL list of first-turn questions", group="data", required=True)
    task: str = option("harmless", "harmless, helpful, or a task YAML file", group="data")
    method: str = option("rlcd", "simulation method", choices=tuple(SLOTS), group="data")
    out_dir: str | None = option(None, "directory for the record shards and manifests", group="data", required=True)
    dedupe: bool = option(False, "skip prompts identical to an earlier one", group="data")
    exclude_prompts: str | None = option(None, "skip prompts whose first Human turn starts a dialogue in this file (e.g. the test split)",
                                         group="data")
    max_prompts: int | None = option(None, "use only the first N prompts of the file (after skips)", group="data")
    indices: str | None = option(None, "only these prompt indices: comma-separated, inclusive ranges (17-29,35-40)", group="data")
    indices_mod: int | None = option(None, "only indices i with i %% mod == remainder", group="data")
    indices_remainder: int | None = option(None, "see --indices-mod", group="data")
    retry_failed: bool = option(False, "redo indices whose record is 'failed' (attempts continue from where they stopped)", group="data")
    # model
    model: str = option(DEFAULT_MODEL, f"HF directory or hub id; '{DEFAULT_MODEL}' = the embedded default", flags=("--model", "--model-string"),
                        group="model")
    engine: str = option("auto", f"with --backend hf, the {ENGINE_HELP}", choices=ENGINE_KINDS, group="model")
    device: str | None = option(None, "cpu, cuda, cuda:1 ... (default: the GPU of this process if any, else cpu)", group="model")
    dtype: str = option("auto", "auto (bf16 on GPU and on CPUs with native bf16, else fp32), float32, bfloat16, float16", group="model")
    # sampling
    seed: int = option(DEFAULT_SEED, "seed of every random choice; each derives from it and the prompt index alone", group="sampling")
    batch_size: int = option(32, "samples generated per batch", group="sampling")
    max_new_tokens: int = option(300, "most new tokens per sample", group="sampling")
    temperature: float = option(1.0, "sampling temperature", group="sampling")
    top_k: int = option(50, "0 turns top-k off; 50 is the original's library default", group="sampling")
    top_p: float = option(1.0, "nucleus sampling: draw from the smallest set of tokens whose probabilities add up to this", group="sampling")
    max_attempts: int = option(5, "samples drawn per output before the index fails", group="sampling")
    accept_eos: bool = option(False, "accept the model's end-of-sequence token as the end of the turn", group="sampling")
    prompt_style: str = option("raw", "raw: the paper's 'Assistant (descriptor):' prompts; chat: the tokenizer's chat template, "
                               "descriptor in a system message", choices=("raw", "chat"), group="sampling")

    def validate(self) -> None:
        super().validate()
        check_settings(self)


CONFIGS = {"simulate": SimulateConfig}


def check_settings(args) -> None:
    """One-line errors for settings out of range, before any work (a config's own check, and `validate`'s)."""
    checks = [
        (args.batch_size >= 1, "--batch-size must be at least 1"),
        (args.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
        (args.max_attempts >= 1, "--max-attempts must be at least 1"),
        (args.temperature >= 0, "--temperature must be >= 0"),
        (args.top_k >= 0, "--top-k must be >= 0"),
        (0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
        (args.max_prompts is None or args.max_prompts >= 1, "--max-prompts must be at least 1"),
        (args.backend == "hf" or args.prompt_style == "raw", "--prompt-style chat needs --backend hf (it uses the model's tokenizer)"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    openai_server.check_arguments(args, uses_server=False)


def validate(args: SimulateConfig) -> SimulationConfig:
    """The engine's SimulationConfig of these settings, after the checks that read the environment (the server's key)
    or files (the model directory)."""
    check_settings(args)  # a config has passed them already; any other object with these attributes has not
    openai_server.check_arguments(args, uses_server=args.backend == "openai")
    if args.backend == "hf" and args.model != DEFAULT_MODEL:  # the embedded default is converted (once) when the engine loads
        resolve_model(args.model)  # a missing model directory fails here, before anything is written
    return SimulationConfig(
        method=args.method, seed=args.seed, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, max_attempts=args.max_attempts, batch_size=args.batch_size,
        accept_eos=args.accept_eos, prompt_style=args.prompt_style, retry_failed=args.retry_failed,
    )


def make_engine(args) -> tuple[Engine, dict]:
    """(engine, what the manifest records of it) for these flags: the server's, or an in-process one."""
    if args.backend == "openai":
        return openai_server.from_arguments(args)
    engine, info = load_engine(args.model, kind=args.engine, device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    if hasattr(engine, "reuse_prefills"):  # the fast engine: the model never changes here, and a retry's prompt was prefilled the round before
        engine.reuse_prefills = True
    return engine, info


def shard_summary(records: list[dict], slots: tuple[str, ...]) -> dict:
    drawn = sum(r["attempts"][s] for r in records for s in slots)
    accepted = sum(s in r["outputs"] for r in records for s in slots)
    reasons = Counter(x for r in records for s in slots for x in r.get("rejections", {}).get(s, []))
    return {
        "ok": sum(r["status"] == "ok" for r in records),
        "failed": sum(r["status"] == "failed" for r in records),
        "samples_drawn": drawn,
        "samples_accepted": accepted,
        "acceptance_rate": round(accepted / drawn, 4) if drawn else None,
        "rejections": dict(reasons),
    }


def run(args: SimulateConfig) -> None:
    cfg = validate(args)
    task = load_task(args.task)
    prompts = dialogue.load_prompts(args.prompts_file, dedupe=args.dedupe, exclude=args.exclude_prompts)
    items = prompts.items[: args.max_prompts] if args.max_prompts else prompts.items
    mod, remainder = process_slice(args.indices_mod, args.indices_remainder)
    mine = select_indices(items, args.indices, mod, remainder)
    out_dir = ensure_dir(args.out_dir)
    shard = out_dir / f"records-r{remainder}-of-{mod}.jsonl"
    manifest_path = out_dir / f"manifest-r{remainder}-of-{mod}.json"
    with lock_shard(shard):
        existing = []
        for path in sorted(out_dir.glob("records-*.jsonl")):
            for record in load_records(path, repair=path == shard):
                if record.get("method") != cfg.method:
                    raise UserError(f"{path}: holds --method {record.get('method')} records; use another --out-dir for {cfg.method}")
                existing.append(record)
        previous = latest_records(existing)
        finished = {i for i, r in previous.items() if r["status"] == "ok" or not cfg.retry_failed}
        todo = [(i, p) for i, p in mine if i not in finished]
        retried = {i: previous[i] for i, _ in todo if i in previous}

        engine, engine_info = make_engine(args)
        chat_template = None
        if cfg.prompt_style == "chat":
            tokenizer = engine.tokenizer  # type: ignore[attr-defined]
            if not tokenizer.chat_template:
                raise UserError(f"--prompt-style chat: the tokenizer of {args.model} has no chat template")
            chat_template = lambda messages: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # noqa: E731

        skipped = Counter(prompts.skipped)
        if engine.context_length:
            fits = []
            for index, prompt in todo:
                longest = max(plan_record(index, prompt, task, cfg, chat_template)["actual_prompts"].values(), key=len)
                if engine.count_tokens(longest) + cfg.max_new_tokens > engine.context_length:
                    skipped[TOO_LONG] += 1
                else:
                    fits.append((index, prompt))
            todo = fits
        for line in prompts.examples:
            print(terminal_safe(f"skipped {line}", one_line=True), file=sys.stderr)

        base = {
            "stage": "simulate", "config": asdict(cfg), "task": task.name, "prompts_file": args.prompts_file,
            "slice": {"mod": mod, "remainder": remainder, "indices": args.indices}, "engine": engine_info,
            "seed": cfg.seed, "started_at": now(),
        }
        write_manifest(manifest_path, status="running", **base)
        print(f"simulate {cfg.method}: {len(mine)} prompts in this slice, {sum(i in finished for i, _ in mine)} already done, "
              f"{len(todo)} to do; skipped: {dict(skipped) or 'none'}", file=sys.stderr)

        started = time.time()
        progress = Progress(len(todo), started)
        sim = Simulation(engine, task, cfg, shard, chat_template)
        failure = None
        try:
            counts = sim.run(todo, retried, progress.update)
            if counts[TOO_LONG]:
                skipped[TOO_LONG] += counts.pop(TOO_LONG)
        except BaseException as e:
            failure = e
            raise
        finally:
            progress.close()
            summary = shard_summary(list(latest_records(load_records(shard)).values()), SLOTS[cfg.method])
            summary["skipped"] = dict(skipped)
            status = "complete" if failure is None else "interrupted"
            try:
                write_manifest(manifest_path, status=status, finished_at=now(), counts=summary, **base)
            except UserError:
                if failure is None:  # otherwise report the first error (a full disk fails both)
                    raise
        elapsed = time.time() - started
        print(f"{counts['ok']} ok, {counts['failed']} failed this run in {elapsed:.0f}s "
              f"({counts['ok'] / max(elapsed, 1e-9):.2f} pairs/s, {sim.tokens / max(elapsed, 1e-9):.0f} tokens/s); "
              f"shard acceptance rate {summary['acceptance_rate']}", file=sys.stderr)
        print(out_dir)


class Progress:
    """done/total, pairs/s, tokens/s and time left, on one updating stderr line."""

    def __init__(self, total: int, started: float):
        self.total, self.started, self.done = total, started, 0
        self.tty = sys.stderr.isatty()
        self.last = 0.0

    def update(self, n: int, tokens: int) -> None:
        self.done += n
        now_ = time.time()
        if not self.tty and now_ - self.last < 10 and self.done < self.total:
            return
        self.last = now_
        elapsed = max(now_ - self.started, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate else float("inf")
        line = (f"{self.done}/{self.total} prompts  {rate:.2f} pairs/s  {tokens / elapsed:.0f} tokens/s  "
                f"left {_duration(left)}")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty and self.done:
            print(file=sys.stderr)


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
