"""Preference tables: `rlcd consolidate` (simulation shards -> table) and the reader every later stage uses.

Table columns follow the original RLCD release, so its published simulated data
loads as is: `instruction` (the prompt), `input` (empty), `output_1`, `output_2`,
`preference` (1 or 2: the better output) and, for post-hoc-scored methods,
`win2_prob` (the probability that output_2 is better). CSV or JSONL, by extension.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import random
import sys
import zlib
from collections import Counter
from pathlib import Path

from rlcd.files import UserError, atomic_write_text, is_text, iter_lines, load_shard, open_text, write_manifest

METHODS = ("rlcd", "rlaif", "rlcd_rescore")
COLUMNS = ["instruction", "input", "output_1", "output_2", "preference"]
SCORED_COLUMNS = COLUMNS + ["win2_prob"]
KNOWN_COLUMNS = set(SCORED_COLUMNS) | {"prompt", "chosen", "rejected", "index"}


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
        row = {"instruction": record["prompt"], "input": ""}
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


def write_table(rows: list[dict], path: Path, scored: bool) -> None:
    columns = SCORED_COLUMNS if scored else COLUMNS
    if path.suffix == ".jsonl":
        text = "".join(json.dumps({c: r[c] for c in columns}, ensure_ascii=False) + "\n" for r in rows)
    else:
        buf = io.StringIO()
        # every text cell quoted: with the minimal quoting a lone CR inside an output went out bare and split the row
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n", quoting=csv.QUOTE_NONNUMERIC)
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    atomic_write_text(path, text)


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
    """Read a preference table (CSV or JSONL) into rows of prompt, output_1, output_2, preference, win2_prob.

    Missing or unknown columns, rows of the wrong shape and non-text cells are errors. Rows
    with an empty prompt or response, text that is not valid Unicode, a preference other than
    1 or 2, or a win2_prob that is not a number in [0, 1] are skipped and counted (returned as a
    Counter of reasons): every row is either returned or counted.
    """
    path = Path(path)
    rows, skipped = [], Counter()
    for where, rec in _iter_table(path):
        prompt = rec.get("instruction", rec.get("prompt"))
        if "chosen" in rec and "output_1" not in rec:
            rec = {**rec, "output_1": rec["chosen"], "output_2": rec.get("rejected"), "preference": 1}
        out1, out2 = rec.get("output_1"), rec.get("output_2")
        if not isinstance(prompt, str) or not isinstance(out1, str) or not isinstance(out2, str):
            raise UserError(f"{where}: prompt and both outputs must be text")
        preference = _preference(rec.get("preference"))
        win2 = None if rec.get("win2_prob") in (None, "") else _probability(rec["win2_prob"])
        if not all(map(is_text, (prompt, out1, out2))):
            reason = "text not valid Unicode (lone surrogate)"
        elif not prompt.strip():
            reason = "empty prompt"
        elif not out1.strip() or not out2.strip():
            reason = "empty response"
        elif preference is None:
            reason = "preference not 1 or 2"
        elif win2 is not None and math.isnan(win2):
            reason = "win2_prob not a number in [0, 1]"
        else:
            reason = None
        if reason:
            skipped[reason] += 1
            continue
        rows.append({"prompt": prompt, "output_1": out1, "output_2": out2, "preference": preference, "win2_prob": win2})
    if not rows:
        raise UserError(f"{path}: no usable rows ({dict(skipped) or 'empty table'})")
    return rows, skipped


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


def _iter_table(path: Path):
    def check_columns(columns, where):
        unknown = set(columns) - KNOWN_COLUMNS
        if unknown:
            raise UserError(f"{where}: unknown column(s) {sorted(map(str, unknown))}; expected {SCORED_COLUMNS}")
        if not ({"instruction", "prompt"} & set(columns)):
            raise UserError(f"{where}: missing column 'instruction' (or 'prompt')")
        if not ({"output_1", "output_2", "preference"} <= set(columns) or {"chosen", "rejected"} <= set(columns)):
            raise UserError(f"{where}: missing columns: need output_1, output_2, preference (or chosen, rejected)")

    if path.name.removesuffix(".gz").endswith(".jsonl"):
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--in-dir", help="directory written by rlcd simulate")
    p.add_argument("--out-csv", "--out-file", dest="out_csv", help="table to write (.csv, or .jsonl for JSON lines)")
    p.add_argument("--data-type", choices=METHODS, help="simulation method of the records")
    p.add_argument("--seed", type=int, default=42, help="seed for the random order of rlcd pairs (default 42)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def run(args: argparse.Namespace) -> None:
    for flag in ("in_dir", "out_csv", "data_type"):
        if not getattr(args, flag):
            raise UserError(f"--{flag.replace('_', '-')} is required")
    records, manifests = read_shards(Path(args.in_dir))
    rows, counts = consolidate(records, args.data_type, args.seed)
    out = Path(args.out_csv)
    write_table(rows, out, scored=args.data_type != "rlcd")
    summary = summarize(rows, counts)
    summary["skipped_prompts"] = dict(sum((Counter(m.get("counts", {}).get("skipped", {})) for m in manifests), Counter()))
    write_manifest(out.with_name(out.name + ".manifest.json"), in_dir=args.in_dir, data_type=args.data_type, seed=args.seed, counts=summary)
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['pairs']} pairs, {summary['failed']} failed prompts, skipped prompts {summary['skipped_prompts'] or 0}")
        print(f"preference=1 in {summary['preference_1_fraction']} of pairs; mean chars chosen {summary['mean_chars_chosen']}, rejected {summary['mean_chars_rejected']}")
    print(out)
