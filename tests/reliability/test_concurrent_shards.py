"""Several simulation processes on one output directory at once: shards of different slices side by
side, and two processes given the same slice by mistake (the second is refused in one line)."""

from __future__ import annotations

import subprocess
from collections import Counter

from rel_helpers import assert_user_error, env, kill_9, question_file, records, rlcd_cmd, run, scripted_cmd, scripted_simulate
from test_kill_resume import running, wait_for

from rlcd.files import load_shard

FLAGS = ["--batch-size", 2, "--max-attempts", 3, "--method", "rlcd_rescore"]


def start(cmd, **extra_env) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env(**extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_shards_written_at_once_equal_a_one_process_run(tmp_path):
    prompts = question_file(tmp_path / "q.json", 30)
    scripted_simulate("--prompts-file", prompts, *FLAGS, "--out-dir", tmp_path / "one")
    out = tmp_path / "three"
    procs = [start(scripted_cmd("--prompts-file", prompts, *FLAGS, "--out-dir", out, "--indices-mod", 3, "--indices-remainder", r),
                   RLCD_TEST_DELAY=0.2) for r in range(3)]
    all_running = [running(out / f"manifest-r{r}-of-3.json") for r in range(3)]
    assert wait_for(lambda: all(check() for check in all_running), procs[0]), "the three processes never ran at the same time"
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    for r in range(3):
        assert {rec["index"] % 3 for rec in load_shard(out / f"records-r{r}-of-3.jsonl")} == {r}
    assert records(out) == records(tmp_path / "one")
    table = tmp_path / "t.jsonl"
    assert run(rlcd_cmd("consolidate", "--in-dir", out, "--out-csv", table, "--data-type", "rlcd_rescore")).returncode == 0
    assert len(table.read_text().splitlines()) == sum(r["status"] == "ok" for r in records(out))


def test_a_second_process_on_the_same_slice_is_refused(tmp_path):
    prompts = question_file(tmp_path / "q.json", 30)
    scripted_simulate("--prompts-file", prompts, *FLAGS, "--out-dir", tmp_path / "one")
    out = tmp_path / "out"
    cmd = scripted_cmd("--prompts-file", prompts, *FLAGS, "--out-dir", out)
    first = start(cmd, RLCD_TEST_DELAY=0.4)
    assert wait_for(running(out / "manifest-r0-of-1.json"), first)
    second = run(cmd)
    assert_user_error(second, str(out / "records-r0-of-1.jsonl"), f"process {first.pid}", "already writing this shard")
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert records(out) == records(tmp_path / "one")
    assert not [i for i, n in Counter(r["index"] for r in records(out)).items() if n > 1]


def test_the_lock_dies_with_its_process(tmp_path):
    """kill -9 leaves the lock file behind, but not the lock: the next run goes ahead and finishes the work."""
    prompts = question_file(tmp_path / "q.json", 30)
    scripted_simulate("--prompts-file", prompts, *FLAGS, "--out-dir", tmp_path / "one")
    out = tmp_path / "out"
    cmd = scripted_cmd("--prompts-file", prompts, *FLAGS, "--out-dir", out)
    first = start(cmd, RLCD_TEST_DELAY=0.1)
    assert wait_for(running(out / "manifest-r0-of-1.json"), first)
    kill_9(first)
    assert (out / ".records-r0-of-1.lock").exists()
    again = run(cmd)
    assert again.returncode == 0, again.stderr
    assert records(out) == records(tmp_path / "one")
