"""Durable file handling shared by every stage: user errors, JSONL shards, atomic writes, manifests."""

from __future__ import annotations

import datetime
import gzip
import json
import os
import re
import sys
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rlcd.version import __version__


class UserError(Exception):
    """A mistake the user can fix; the CLI prints it as one line, without a traceback."""


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def is_text(value) -> bool:
    """A str that can be written back as UTF-8: JSON escapes such as "\\ud800" decode to lone
    surrogates, which every later write (and every tokenizer) would fail on."""
    return isinstance(value, str) and not _LONE_SURROGATE.search(value)


def open_text(path: str | Path, newline: str | None = None):
    """Open a text file for reading, transparently gunzipping `.gz` files (newline="" for CSV).

    "utf-8-sig": a byte-order mark, which Windows editors and Excel put at the start of UTF-8 files,
    is dropped instead of becoming part of the first line (where it made JSON unparseable)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a file")
    try:
        if path.suffix == ".gz":
            return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace", newline=newline)
        return open(path, encoding="utf-8-sig", errors="replace", newline=newline)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without its newline) for every non-blank line."""
    with open_text(path) as f:
        try:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield lineno, line.rstrip("\n")
        except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt gzip
            raise UserError(f"{path}: unreadable ({e})") from None


def load_json(path: str | Path):
    """The JSON document in a file (.gz too); one-line errors for bad JSON and bad gzip."""
    with open_text(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path}: unreadable ({e})") from None


def _encode(path, text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate that a reader let through
        raise UserError(f"{path}: cannot write text that is not valid Unicode ({e.reason} at character {e.start})") from None


def ensure_dir(path: str | Path) -> Path:
    """Create a directory (and its parents) before long work that writes into it, or fail in one line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot create the directory ({e.strerror or e})") from None
    return path


def _write_error(path, e: OSError) -> UserError:
    return UserError(f"{path}: cannot write ({e.strerror or e}); earlier data there is kept")


def append_lines(path: Path, records: list[dict]) -> None:
    """Append records as JSON lines, then fsync; all of them or none.

    A write that fails (disk full, file-size limit) is cut back off, so the file
    holds only whole batches. A crash (kill -9) can still leave one torn last
    line, which `load_shard` drops on the next start. One writer per file.
    """
    if not records:
        return
    data = _encode(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as e:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise _write_error(path, e) from None
    finally:
        os.close(fd)


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
        try:
            os.truncate(path, end)
        except OSError as e:
            raise _write_error(path, e) from None
    records = []
    for lineno, line in enumerate(raw[:end].split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
            raise UserError(f"{path}:{lineno}: corrupt record ({reason}); move the file away or fix the line") from None
    return records


def _read_umask() -> int:
    # the only way to read the umask is to set it; done once, at import, before any thread could create a file
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _read_umask()
FILE_MODE = 0o666 & ~UMASK
"""The mode of the files rlcd writes: what open() would give (0644 under umask 022), not mkstemp's 0600."""


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that readers see either the old or the new content, never a part."""
    atomic_write_bytes(path, _encode(path, text))


def share_files(directory: Path) -> None:
    """Give the files directly in `directory` the user's umask permissions: libraries write some with mkstemp's 0600
    (safetensors' weights), which a model directory meant to be shared or served should not keep."""
    for path in Path(directory).iterdir():
        if path.is_file() and not path.is_symlink():
            os.chmod(path, FILE_MODE)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """`atomic_write_text` for bytes (gzip, Parquet); the file gets the user's umask permissions."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
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
