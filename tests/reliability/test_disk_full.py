"""A full disk and unwritable output paths: one clear line, and the data already there stays intact.

A full disk is simulated with a file-size limit (RLIMIT_FSIZE, `ulimit -f`) in a subprocess: writes past
it fail with EFBIG, as they would with ENOSPC (Python ignores SIGXFSZ). Root ignores permissions, so
read-only directories are tested only for other users; an output path under a regular file fails for
everyone.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
from pathlib import Path

import pytest
from rel_helpers import (
    ONE_THREAD,
    assert_user_error,
    assert_whole_lines,
    env,
    marker_table,
    question_file,
    records,
    rlcd_cmd,
    run,
    scripted_cmd,
    scripted_simulate,
)

from rlcd.cli import main


def file_size_limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return apply


def test_simulate_on_a_full_disk_keeps_the_shard_whole_and_resumes(tmp_path):
    prompts = question_file(tmp_path / "q.json", 30)
    flags = ["--prompts-file", prompts, "--batch-size", 2, "--max-attempts", 3]
    scripted_simulate(*flags, "--out-dir", tmp_path / "full")
    out = tmp_path / "cut"
    scripted_simulate(*flags, "--out-dir", out, "--indices", "0-9")  # earlier work
    shard = out / "records-r0-of-1.jsonl"
    before = shard.read_bytes()
    # room for the manifest and a batch or two more, not for the rest
    proc = run(scripted_cmd(*flags, "--out-dir", out), preexec_fn=file_size_limit(len(before) + 2500))
    assert_user_error(proc, str(shard), "cannot write", "File too large", only_line=False)
    after = shard.read_bytes()
    assert after.startswith(before) and len(after) <= len(before) + 2500
    assert_whole_lines(shard)  # the failed append was cut back off: no torn record
    assert len(records(out)) == len({r["index"] for r in records(out)}) < 30
    assert json.loads((out / "manifest-r0-of-1.json").read_text())["status"] == "interrupted"
    resumed = run(scripted_cmd(*flags, "--out-dir", out))
    assert resumed.returncode == 0, resumed.stderr
    assert records(out) == records(tmp_path / "full")


def test_consolidate_on_a_full_disk_keeps_the_previous_table(tmp_path):
    prompts = question_file(tmp_path / "q.json", 30)
    scripted_simulate("--prompts-file", prompts, "--out-dir", tmp_path / "sim")
    table = tmp_path / "table.csv"
    table.write_text("the previous table\n")
    proc = run(rlcd_cmd("consolidate", "--in-dir", tmp_path / "sim", "--out-csv", table, "--data-type", "rlcd"),
               preexec_fn=file_size_limit(1000))
    assert_user_error(proc, str(table), "cannot write", "File too large")
    assert table.read_text() == "the previous table\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.json", "sim", "table.csv"]  # no temporary file left behind


def test_train_rm_on_a_full_disk_is_one_line_and_resumes(tmp_path, tiny_model_dir):
    """The model file of the first checkpoint fits under the limit, its optimizer state does not: a partial
    checkpoint, one error line; --resume without the limit gives the uninterrupted run's model."""
    table = marker_table(tmp_path / "t.jsonl")
    flags = ["train-rm", "--data", table, "--model", tiny_model_dir, "--eval-pairs", 8, "--max-steps", 4, "--save-steps", 2,
             "--batch-size", 4, "--gradient-accumulation-steps", 1, "--learning-rate", "1e-3", "--bf16", "false"]
    straight = run(rlcd_cmd(*flags, "--out-dir", tmp_path / "straight"), env=env(**ONE_THREAD))
    assert straight.returncode == 0, straight.stderr[-3000:]
    model_bytes = (tmp_path / "straight" / "model.safetensors").stat().st_size
    out = tmp_path / "cut"
    proc = run(rlcd_cmd(*flags, "--out-dir", out), env=env(**ONE_THREAD), preexec_fn=file_size_limit(model_bytes + 100_000))
    assert_user_error(proc, str(out / "checkpoints" / "checkpoint-2"), "cannot write the model or checkpoint", "--resume", only_line=False)
    assert (out / "checkpoints" / "checkpoint-2" / "model.safetensors").exists()
    assert not (out / "checkpoints" / "checkpoint-2" / "trainer_state.json").exists()
    resumed = run(rlcd_cmd(*flags, "--out-dir", out, "--resume"), env=env(**ONE_THREAD))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "straight", out))
    assert b["heldout"]["loss"] == pytest.approx(a["heldout"]["loss"], rel=1e-4)


def test_output_paths_under_a_regular_file_fail_up_front(tmp_path, tiny_model_dir):
    """A path whose parent is a file (a typo, or a file where a directory was expected) is refused in one
    line before any work; root is not exempt from this one."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    prompts = question_file(tmp_path / "q.json", 4)
    table = marker_table(tmp_path / "t.jsonl")
    outputs = tmp_path / "outputs.json"
    outputs.write_text(json.dumps([{"instruction": "Human: hi\n\nAssistant:", "output": "hello"}]))
    cases = [
        scripted_cmd("--prompts-file", prompts, "--out-dir", blocker / "sim"),
        rlcd_cmd("train-rm", "--data", table, "--out-dir", blocker / "rm", "--model", tiny_model_dir, "--eval-pairs", 8),
        rlcd_cmd("score", "--reward-model", tmp_path / "no-model", "--data-path", outputs, "--out-file", blocker / "scored.json"),
    ]
    for cmd in cases:
        assert_user_error(run(cmd), str(blocker), "cannot create the directory")
    assert blocker.read_text() == "x"


def read_only(directory: Path, cmd: list[str]) -> list[str]:
    """cmd, run with `directory` read-only: by permissions, or for root (whom permissions do not stop) as a
    read-only bind mount in a private mount namespace."""
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return cmd
    if subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root without permission to make a private read-only mount")
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
    return ["unshare", "--mount", "sh", "-c", script, str(directory), *cmd]


def test_read_only_output_directory_is_one_line_and_left_as_it_was(tmp_path):
    prompts = question_file(tmp_path / "q.json", 6)
    out = tmp_path / "ro"
    scripted_simulate("--prompts-file", prompts, "--out-dir", out, "--indices", "0-2")
    main(["consolidate", "--in-dir", str(out), "--out-csv", str(out / "table.csv"), "--data-type", "rlcd"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    try:
        for cmd in (scripted_cmd("--prompts-file", prompts, "--out-dir", out),
                    rlcd_cmd("consolidate", "--in-dir", out, "--out-csv", out / "table.csv", "--data-type", "rlcd")):
            line = assert_user_error(run(read_only(out, cmd)), str(out), "cannot")
            assert "Read-only file system" in line or "Permission denied" in line
    finally:
        out.chmod(0o755)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
