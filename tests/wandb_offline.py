"""Reading what an offline W&B run wrote (WANDB_MODE=offline): the run's name and project, and every logged row.

A run's `run-ID.wandb` file is a LevelDB-style log of protobuf records: 32 KiB blocks of chunks, each with a
7-byte header (CRC, length, type: 1 whole, 2 first, 3 middle, 4 last), after a 7-byte file header.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024


def records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += BLOCK - pos % BLOCK
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def offline_runs(wandb_dir: Path) -> list[dict]:
    """[{name, project, history: [logged row, ...]}] of every offline run under wandb_dir."""
    runs = []
    for path in sorted(Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb")):
        run = {"history": []}
        for record in records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(name=record.run.display_name, project=record.run.project)
            elif kind == "history":
                run["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
        runs.append(run)
    return runs


def offline_env(monkeypatch, wandb_dir: Path) -> None:
    """W&B offline, writing under wandb_dir, with WANDB_PROJECT unset (training sets it; undone after the test)."""
    import pytest

    wandb = pytest.importorskip("wandb", reason="needs the wandb package (in the test extra)")
    wandb.teardown()  # an earlier test's run leaves its settings (WANDB_DIR) in this process's wandb singleton
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "unset")  # recorded first, so that the delete and whatever training sets are undone
    monkeypatch.delenv("WANDB_PROJECT")
