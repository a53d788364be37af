"""Durable file handling shared by every stage: user errors, JSONL shards, atomic writes, manifests."""

from __future__ import annotations

import datetime
import gzip
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from rlcd import __version__


class UserError(Exception):
    """A mistake the user can fix; the CLI prints it as one line, without a traceback."""


def open_text(path: str | Path):
    """Open a text file for reading, transparently gunzipping `.gz` files."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a file")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without its newline) for every non-blank line."""
    with open_text(path) as f:
        try:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield lineno, line.rstrip("\n")
        except (OSError, EOFError) as e:  # truncated or corrupt gzip
            raise UserError(f"{path}: unreadable ({e})") from None


def append_lines(path: Path, records: list[dict]) -> None:
    """Append records as JSON lines in one write, then flush and fsync.

    One write per batch keeps a crash from leaving more than one torn line, and
    `load_shard` drops that line on the next start.
    """
    if not records:
        return
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def load_shard(path: Path, repair: bool = False) -> list[dict]:
    """Read a JSONL shard written by `append_lines`.

    A torn last line (the process was killed mid-write) is ignored, and with
    `repair=True` cut off so that later appends start on a clean line. A corrupt
    line anywhere else is a user error: the file was edited or damaged.
    """
    if not path.exists():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if repair and end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(end)
    records = []
    for lineno, line in enumerate(raw[:end].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: corrupt record ({e.msg}); move the file away or fix the line") from None
    return records


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that readers see either the old or the new content, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(path: str | Path, **fields: Any) -> None:
    """Record how an artifact was made: command line, package version, time, and the given fields."""
    manifest = {
        "command": sys.argv,
        "rlcd_version": __version__,
        "written_at": now(),
        **fields,
    }
    atomic_write_text(path, json.dumps(manifest, indent=2, ensure_ascii=False, default=str) + "\n")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
