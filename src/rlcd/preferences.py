"""Preference tables: `rlcd consolidate` (simulation shards -> table) and the reader every later stage uses.

Three layouts (docs/formats.md#preference-table):
- `standard`, TRL's: `prompt` (the hh-rlhf dialogue up to its last "Assistant:"), `chosen` and `rejected`
  (each response after one joining space, so prompt + chosen is the whole dialogue);
- `conversational`, TRL's: `prompt` a list of {"role", "content"} messages, `chosen` and `rejected` a
  one-message list each;
- `rlcd`, the original RLCD release's: `instruction` (the prompt), `input` (empty), `output_1`, `output_2`,
  `preference` (1 or 2: the better output) and, for post-hoc-scored methods, `win2_prob` (the
  probability that output_2 is better).
TRL rows carry `chosen_prob` (P(chosen is better); scored methods), `index` and `method` besides; TRL
ignores columns it does not know. The file's suffix picks the format: CSV, JSONL (gzipped or not) or
Parquet. The reader takes all of these and hh-rlhf's own rows (two whole dialogues, no prompt).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import random
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rlcd.dialogue import ASSISTANT, chat_messages, dialogue_text, prompt_from_dialogue
from rlcd.files import UserError, atomic_write_bytes, is_text, iter_lines, load_shard, open_text, write_manifest
from rlcd.options import Config, option
from rlcd.seeds import DEFAULT_SEED

METHODS = ("rlcd", "rlaif", "rlcd_rescore")
COLUMNS = ["instruction", "input", "output_1", "output_2", "preference"]
SCORED_COLUMNS = COLUMNS + ["win2_prob"]
KNOWN_COLUMNS = set(SCORED_COLUMNS) | {"prompt", "chosen", "rejected", "index"}
TRL_COLUMNS = ["prompt", "chosen", "rejected"]
FORMATS = ("standard", "conversational", "rlcd")
SUFFIXES = (".csv", ".csv.gz", ".jsonl", ".jsonl.gz", ".parquet")
CSV_SUFFIXES = (".csv", ".csv.gz")


def order_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"{seed}:{index}:order")


def latest_records(records) -> dict[int, dict]:
    """One record per index: a failed record is final unless a later --retry-failed run appended an ok one."""
    by_index: dict[int, dict] = {}
    for record in records:
        if record["index"] not in by_index or record["status"] == "ok":
            by_index[record["index"]] = record
    return by_index


def load_records(path: Path, repair: bool = False) -> list[dict]:
    """The records of one simulation shard (`load_shard`), each checked for the fields later stages read."""
    records = load_shard(path, repair=repair)
    for n, record in enumerate(records, 1):
        problem = _record_problem(record)
        if problem:
            raise UserError(f"{path}: record {n}: {problem}; the shard was edited or damaged: move it away or fix the record")
    return records


def _record_problem(r) -> str | None:
    if not isinstance(r, dict):
        return "not a JSON object"
    if not isinstance(r.get("index"), int) or isinstance(r["index"], bool) or r["index"] < 0:
        return "field 'index' is not a non-negative integer"
    if r.get("method") not in METHODS:
        return f"field 'method' is not one of {list(METHODS)}"
    if r.get("status") not in ("ok", "failed"):
        return "field 'status' is not 'ok' or 'failed'"
    if not is_text(r.get("prompt")):
        return "field 'prompt' is not text"
    if r["status"] == "ok":
        slots = ("chosen", "rejected") if r["method"] == "rlcd" else ("A", "B")
        if not isinstance(r.get("outputs"), dict) or not all(is_text(r["outputs"].get(s)) for s in slots):
            return f"field 'outputs' lacks text for {' or '.join(slots)}"
        if r["method"] != "rlcd" and (not isinstance(r.get("win2_prob"), (int, float)) or isinstance(r["win2_prob"], bool)):
            return "field 'win2_prob' is not a number"
    return None


def read_shards(in_dir: Path) -> tuple[list[dict], list[dict]]:
    """All records of a simulation directory in index order, and its shard manifests."""
    if not in_dir.is_dir():
        raise UserError(f"{in_dir}: not a directory of simulation shards")
    paths = sorted(in_dir.glob("records-*.jsonl"))
    if not paths:
        raise UserError(f"{in_dir}: no records-*.jsonl shards (run rlcd simulate --out-dir {in_dir} first)")
    by_index = latest_records(r for path in paths for r in load_records(path))
    manifests = []
    for path in sorted(in_dir.glob("manifest-*.json")):
        try:
            manifests.append(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path}: corrupt manifest; re-run rlcd simulate to rewrite it") from None
    return [by_index[i] for i in sorted(by_index)], manifests


def consolidate(records: list[dict], data_type: str, seed: int) -> tuple[list[dict], Counter]:
    """Preference rows from ok records; rlcd pairs are put in a random order (p = 0.5) derived from seed and index."""
    rows, counts = [], Counter()
    for record in records:
        if record["method"] != data_type:
            raise UserError(f"record {record['index']} was simulated with --method {record['method']}, not {data_type}")
        if record["status"] != "ok":
            counts["failed"] += 1
            continue
        out = record["outputs"]
        row = {"instruction": record["prompt"], "input": "", "index": record["index"], "method": data_type}
        if data_type == "rlcd":
            if order_rng(seed, record["index"]).random() < 0.5:
                row.update(output_1=out["chosen"], output_2=out["rejected"], preference=1)
            else:
                row.update(output_1=out["rejected"], output_2=out["chosen"], preference=2)
        else:
            p = record["win2_prob"]
            row.update(output_1=out["A"], output_2=out["B"], preference=2 if p > 0.5 else 1, win2_prob=p)
        rows.append(row)
    return rows, counts


def table_suffix(path: str | Path) -> str:
    """The suffix that picks a table's format; any other name is refused before work starts."""
    name = Path(path).name.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    raise UserError(f"{path}: unknown table suffix; the suffix picks the format: {', '.join(SUFFIXES[:-1])} or {SUFFIXES[-1]}")


def chat_style(manifests: list[dict]) -> bool:
    """Whether every shard was simulated with --prompt-style chat (through the model's chat template)."""
    styles = {m["config"].get("prompt_style", "raw") if isinstance(m, dict) and isinstance(m.get("config"), dict) else "raw"
              for m in manifests}
    return styles == {"chat"}


def table_records(rows: list[dict], scored: bool, layout: str) -> tuple[list[str], list[dict]]:
    """(columns, records) of consolidated rows in a layout; TRL's put the preferred output in `chosen`."""
    if layout == "rlcd":
        columns = SCORED_COLUMNS if scored else COLUMNS
        return columns, [{c: r[c] for c in columns} for r in rows]
    columns = TRL_COLUMNS + (["chosen_prob"] if scored else []) + ["index", "method"]
    records = []
    for r in rows:
        first = r["preference"] == 1
        chosen, rejected = (r["output_1"], r["output_2"]) if first else (r["output_2"], r["output_1"])
        if layout == "standard":  # TRL joins prompt + chosen as they are: the space makes them the hh-rlhf dialogue
            record = {"prompt": r["instruction"], "chosen": " " + chosen, "rejected": " " + rejected}
        else:
            record = {"prompt": chat_messages(r["instruction"], None), "chosen": [{"role": "assistant", "content": chosen}],
                      "rejected": [{"role": "assistant", "content": rejected}]}
        if scored:
            record["chosen_prob"] = 1.0 - r["win2_prob"] if first else r["win2_prob"]
        record.update(index=r.get("index"), method=r.get("method"))
        records.append(record)
    return columns, records


def write_table(rows: list[dict], path: Path, scored: bool, layout: str = "rlcd") -> None:
    """Write consolidated rows in a layout (`FORMATS`), in the format the suffix picks (`SUFFIXES`)."""
    suffix = table_suffix(path)
    if layout == "conversational" and suffix in CSV_SUFFIXES:
        raise UserError(f"{path}: the conversational layout holds message lists, which CSV cannot; write .jsonl, .jsonl.gz or .parquet")
    columns, records = table_records(rows, scored, layout)
    if suffix == ".parquet":
        data = _parquet_bytes(columns, records, layout)
    elif suffix.startswith(".jsonl"):
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    else:
        buf = io.StringIO()
        # every text cell quoted: with the minimal quoting a lone CR inside an output went out bare and split the row
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
        writer.writeheader()
        writer.writerows(records)
        data = buf.getvalue().encode("utf-8")
    if suffix.endswith(".gz"):
        data = gzip.compress(data, mtime=0)  # mtime 0: the same rows give the same bytes (pipeline keys hash inputs)
    atomic_write_bytes(path, data)


def _parquet_bytes(columns: list[str], records: list[dict], layout: str) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = pa.string()
    messages = pa.list_(pa.struct([("role", text), ("content", text)]))
    side = messages if layout == "conversational" else text
    types = {"instruction": text, "input": text, "output_1": text, "output_2": text, "preference": pa.int64(),
             "win2_prob": pa.float64(), "prompt": side, "chosen": side, "rejected": side, "chosen_prob": pa.float64(),
             "index": pa.int64(), "method": text}
    table = pa.Table.from_pylist(records, schema=pa.schema([(c, types[c]) for c in columns]))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def summarize(rows: list[dict], counts: Counter) -> dict:
    def mean_len(key: str) -> float:
        return round(sum(len(r[key]) for r in rows) / len(rows), 1) if rows else 0.0

    for r in rows:
        r["_chosen"] = r["output_1"] if r["preference"] == 1 else r["output_2"]
        r["_rejected"] = r["output_2"] if r["preference"] == 1 else r["output_1"]
    summary = {
        "pairs": len(rows),
        "failed": counts["failed"],
        "preference_1_fraction": round(sum(r["preference"] == 1 for r in rows) / len(rows), 3) if rows else None,
        "mean_chars_chosen": mean_len("_chosen"),
        "mean_chars_rejected": mean_len("_rejected"),
    }
    for r in rows:
        del r["_chosen"], r["_rejected"]
    return summary


def read_table(path: str | Path) -> tuple[list[dict], Counter]:
    """Read a preference table into rows of prompt, output_1, output_2, preference, win2_prob.

    CSV, JSONL (.gz too) or Parquet (by suffix; other names are read as CSV), in any layout `pair_of`
    takes. Missing or unknown columns, rows of the wrong shape and cells of the wrong type are errors.
    Rows with an empty prompt or response, text that is not valid Unicode, a preference other than
    1 or 2, a probability that is not a number in [0, 1], or that have no hh-rlhf form are skipped
    and counted (returned as a Counter of reasons): every row is either returned or counted.
    """
    path = Path(path)
    rows, skipped = [], Counter()
    for where, rec in iter_table(path):
        try:
            rows.append(pair_of(rec))
        except Malformed as e:
            raise UserError(f"{where}: {e}") from None
        except Unusable as e:
            skipped[str(e)] += 1
    if not rows:
        raise UserError(f"{path}: no usable rows ({dict(skipped) or 'empty table'})")
    return rows, skipped


class Unusable(ValueError):
    """A row to skip; the message is the reason it is counted under."""


class Malformed(Unusable):
    """A cell of the wrong type: the file is not the table it claims to be."""


def pair_of(rec: dict) -> dict:
    """One table row, in any layout, as {prompt, output_1, output_2, preference, win2_prob}.

    Layouts: the original release's (`output_1`, `output_2`, `preference`, optional `win2_prob`);
    TRL's standard (`prompt`, `chosen`, `rejected` text: one leading space of each response, which joins
    it to the prompt, is dropped) and conversational (message lists, turned into hh-rlhf text; with no
    `prompt` column, whole conversations); hh-rlhf's (`chosen`, `rejected` whole dialogues, no prompt:
    split at the last "Assistant:"). `instruction` may stand for `prompt`. A TRL row's `chosen_prob`
    (P(chosen is better)) becomes a soft label: output_2 = chosen, win2_prob = chosen_prob.
    """
    prompt = rec.get("instruction", rec.get("prompt"))
    if "output_1" in rec or "chosen" not in rec:
        preference = _preference(rec.get("preference"))
        win2 = None if rec.get("win2_prob") in (None, "") else _probability(rec["win2_prob"])
        return _checked(prompt, rec.get("output_1"), rec.get("output_2"), preference, win2, "win2_prob")
    chosen, rejected = rec.get("chosen"), rec.get("rejected")
    if any(isinstance(v, list) for v in (prompt, chosen, rejected)):
        prompt, chosen, rejected = _conversation_texts(prompt, chosen, rejected)
    if prompt is None:
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise Malformed("chosen and rejected must be text")
        prompt, chosen, rejected = _split_dialogues(chosen, rejected)
    elif isinstance(chosen, str) and isinstance(rejected, str):
        chosen, rejected = chosen.removeprefix(" "), rejected.removeprefix(" ")
    prob = None if rec.get("chosen_prob") in (None, "") else _probability(rec["chosen_prob"])
    if prob is None:
        return _checked(prompt, chosen, rejected, 1, None, "chosen_prob")
    return _checked(prompt, rejected, chosen, 2, prob, "chosen_prob")


def _checked(prompt, out1, out2, preference, prob, prob_name: str) -> dict:
    if not isinstance(prompt, str) or not isinstance(out1, str) or not isinstance(out2, str):
        raise Malformed("prompt and both outputs must be text")
    if not all(map(is_text, (prompt, out1, out2))):
        raise Unusable("text not valid Unicode (lone surrogate)")
    if not prompt.strip():
        raise Unusable("empty prompt")
    if not out1.strip() or not out2.strip():
        raise Unusable("empty response")
    if preference is None:
        raise Unusable("preference not 1 or 2")
    if prob is not None and math.isnan(prob):
        raise Unusable(f"{prob_name} not a number in [0, 1]")
    return {"prompt": prompt, "output_1": out1, "output_2": out2, "preference": preference, "win2_prob": prob}


def _split_dialogues(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen reply, rejected reply) of two whole dialogues that differ only in the last reply."""
    try:
        prompts = [prompt_from_dialogue(text) for text in (chosen, rejected)]
    except ValueError as e:
        raise Unusable(f"dialogue: {e}") from None
    prompt = min(prompts, key=len)  # a reply that itself holds "Assistant:" moves its own dialogue's cut too far
    texts = [text.lstrip() for text in (chosen, rejected)]
    if not all(text.startswith(prompt) for text in texts):
        raise Unusable("chosen and rejected differ before the last reply")
    return prompt, texts[0][len(prompt):].removeprefix(" "), texts[1][len(prompt):].removeprefix(" ")


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def _conversation_texts(prompt, chosen, rejected) -> tuple[str | None, str, str]:
    """TRL's conversational row as hh-rlhf text: (prompt, chosen, rejected), or (None, whole dialogue,
    whole dialogue) when there is no prompt (TRL's implicit prompt)."""
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not (_is_messages(value) or (name == "prompt" and value is None)):
            raise Malformed(f"field '{name}' is not a list of {{role, content}} messages")
    roles = {m["role"] for value in (prompt or [], chosen, rejected) for m in value} - {"user", "assistant"}
    if roles:
        raise Unusable(f"message role '{min(roles)}' (hh-rlhf dialogues have only user and assistant turns)")
    if prompt is None:
        if not chosen or not rejected or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise Unusable("conversation does not end with an assistant message")
        return None, dialogue_text(chosen), dialogue_text(rejected)
    if not prompt or prompt[-1]["role"] != "user":
        raise Unusable("prompt does not end with a user message")
    if len(chosen) != 1 or len(rejected) != 1 or chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
        raise Unusable("chosen and rejected are not one assistant message each")
    return dialogue_text(prompt) + ASSISTANT, chosen[0]["content"], rejected[0]["content"]


def _preference(value) -> int | None:
    """1 or 2 from 1, 2, 1.0, "2", "2.0"; None for anything else (1.5, true, "x", "inf")."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number in (1.0, 2.0) else None


def _probability(value) -> float:
    """A probability in [0, 1], or NaN when the value is not one."""
    if isinstance(value, bool):
        return math.nan
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if 0.0 <= number <= 1.0 else math.nan


def is_jsonl(path: str | Path) -> bool:
    return Path(path).name.lower().removesuffix(".gz").endswith(".jsonl")


def iter_table(path: Path):
    """(where, record) for every row of a CSV, JSONL or Parquet table, its columns checked (`check_columns`)."""
    if is_jsonl(path):
        for lineno, line in iter_lines(path):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object")
            check_columns(rec.keys(), f"{path}:{lineno}")
            yield f"{path}:{lineno}", rec
        return
    if path.name.lower().endswith(".parquet"):
        yield from _iter_parquet(path)
        return
    if path.name.lower().endswith(".parquet.gz"):
        raise UserError(f"{path}: a gzipped Parquet file; Parquet compresses its own columns, so gunzip it")
    csv.field_size_limit(sys.maxsize)
    with open_text(path, newline="") as f:  # newline="": a line break inside a quoted cell stays as written
        reader = csv.DictReader(f)
        try:
            check_columns(reader.fieldnames or [], f"{path}:1")
            for rec in reader:
                where = f"{path}:{reader.line_num}"
                if None in rec:  # DictReader's marks of a row longer or shorter than the header
                    raise UserError(f"{where}: more cells than the header's {len(reader.fieldnames)} columns")
                if None in rec.values():
                    raise UserError(f"{where}: fewer cells than the header's {len(reader.fieldnames)} columns")
                yield where, rec
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path}: unreadable ({e})") from None


def _iter_parquet(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    open_text(path).close()  # the same one-line errors for a missing file or a directory
    try:
        table = pq.ParquetFile(path)
        check_columns(table.schema_arrow.names, str(path))
        n = 0
        for batch in table.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                n += 1
                yield f"{path}: row {n}", rec
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None


def check_columns(columns, where: str) -> None:
    """A table's columns: the original release's (unknown ones refused, a misspelt column would be lost) or
    TRL's and hh-rlhf's `chosen` and `rejected` (other columns ignored, as TRL ignores them)."""
    columns = set(map(str, columns))
    if {"output_1", "output_2", "preference"} <= columns:
        unknown = columns - KNOWN_COLUMNS
        if unknown:
            raise UserError(f"{where}: unknown column(s) {sorted(unknown)}; expected {SCORED_COLUMNS}")
        if not ({"instruction", "prompt"} & columns):
            raise UserError(f"{where}: missing column 'instruction' (or 'prompt')")
    elif not {"chosen", "rejected"} <= columns:
        raise UserError(f"{where}: missing columns: need output_1, output_2, preference (or chosen, rejected)")


@dataclass
class ConsolidateConfig(Config):
    """`rlcd consolidate`: a simulation's record shards -> one preference table."""

    command: ClassVar[str] = "consolidate"
    in_dir: str | None = option(None, "directory written by rlcd simulate", flags=("--data", "--in-dir"), required=True)
    out_csv: str | None = option(None, "table to write; its suffix picks the format: .csv, .csv.gz, .jsonl, .jsonl.gz or .parquet",
                                 flags=("--out-file", "--out-csv"), metavar="FILE", required=True)
    format: str | None = option(None, "standard: TRL's prompt/chosen/rejected text; conversational: TRL's message lists; rlcd: the "
                                "original release's columns (default: conversational for --prompt-style chat simulations, except in CSV; "
                                "else standard)", choices=FORMATS)
    data_type: str | None = option(None, "simulation method of the records", choices=METHODS, required=True)
    seed: int = option(DEFAULT_SEED, "seed for the random order of rlcd pairs in --format rlcd tables")
    json: bool = option(False, "print the summary as one JSON object")


CONFIGS = {"consolidate": ConsolidateConfig}


def run(args: ConsolidateConfig) -> None:
    out = Path(args.out_csv)
    suffix = table_suffix(out)  # before any work: a name the writer cannot honour is refused at once
    if args.format == "conversational" and suffix in CSV_SUFFIXES:
        raise UserError(f"{out}: --format conversational holds message lists, which CSV cannot; write .jsonl, .jsonl.gz or .parquet")
    records, manifests = read_shards(Path(args.in_dir))
    # chat-style data is TRL's conversational data (TRL applies the chat template it was made with); CSV cells hold
    # text, not message lists, so there it goes in the standard layout
    layout = args.format or ("conversational" if chat_style(manifests) and suffix not in CSV_SUFFIXES else "standard")
    if not args.format and chat_style(manifests) and layout == "standard":
        print("chat-style records written in the standard layout, as CSV cells hold no message lists "
              "(name the table .jsonl or .parquet for the conversational one)", file=sys.stderr)
    rows, counts = consolidate(records, args.data_type, args.seed)
    write_table(rows, out, scored=args.data_type != "rlcd", layout=layout)
    summary = summarize(rows, counts)
    summary["skipped_prompts"] = dict(sum((Counter(m.get("counts", {}).get("skipped", {})) for m in manifests), Counter()))
    write_manifest(out.with_name(out.name + ".manifest.json"), in_dir=args.in_dir, data_type=args.data_type, format=layout,
                   seed=args.seed, counts=summary)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['pairs']} pairs ({layout} layout), {summary['failed']} failed prompts, skipped prompts {summary['skipped_prompts'] or 0}")
        print(f"preference=1 in {summary['preference_1_fraction']} of pairs; "
              f"mean chars chosen {summary['mean_chars_chosen']}, rejected {summary['mean_chars_rejected']}")
    print(out)
