"""`rlcd simulate --backend openai` against a real HTTP server process driven into faults: 429, 5xx,
timeouts, dropped connections, replies cut short, malformed JSON, prompts over the context.

Transient faults are retried with exponential backoff and jitter until the records equal a fault-free
run; a fault that persists ends the run with one error line, leaving only whole records, and the next
run resumes from them.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict

import pytest
from rel_helpers import FaultServer, assert_user_error, assert_whole_lines, question_file, records, rlcd_cmd, run

from rlcd.engines import SamplingParams
from rlcd.engines.openai_server import OpenAIEngine
from rlcd.simulate import TOO_LONG

ALL_FAULTS = ["429", "500", "502", "503", "timeout", "drop", "truncated", "malformed", "wrong_shape"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = FaultServer(tmp_path_factory.mktemp("fault-server"))
    yield s
    s.close()


def simulate(server, prompts, out, *extra):
    return run(rlcd_cmd("simulate", "--backend", "openai", "--base-url", server.url, "--api-model", "fake", "--prompts-file", prompts,
                        "--out-dir", out, "--concurrency", 4, "--batch-size", 2, "--max-attempts", 3, "--timeout", 0.5, *extra))


@pytest.fixture(scope="module")
def clean(server, tmp_path_factory):
    """(prompts file, records of a fault-free rlaif run)."""
    tmp = tmp_path_factory.mktemp("clean")
    prompts = question_file(tmp / "q.json", 16)
    server.control()
    proc = simulate(server, prompts, tmp / "out", "--method", "rlaif")
    assert proc.returncode == 0, proc.stderr
    assert not any(e["fault"] for e in server.log())
    return prompts, records(tmp / "out")


def test_random_faults_of_every_kind_are_retried_to_the_same_records(server, clean, tmp_path):
    prompts, expected = clean
    server.control(script=list(ALL_FAULTS), rate=0.2, kinds=ALL_FAULTS, seed=1, timeout_s=1.0, retry_after=0)
    proc = simulate(server, prompts, tmp_path / "out", "--method", "rlaif", "--max-retries", 8)
    assert proc.returncode == 0, proc.stderr
    injected = Counter(e["fault"] for e in server.log() if e["fault"])
    assert set(injected) == set(ALL_FAULTS), injected
    assert records(tmp_path / "out") == expected, injected


@pytest.mark.parametrize("kind,error", [("503", "InternalServerError (HTTP 503): injected 503"), ("drop", "APIConnectionError"),
                                        ("timeout", "APITimeoutError"), ("malformed", "unparsable response")])
def test_a_lasting_fault_stops_in_one_line_with_whole_records_then_resumes(server, clean, tmp_path, kind, error):
    prompts, expected = clean
    out = tmp_path / "out"
    server.control(fail_after=20, fail_kind=kind, timeout_s=1.0)
    proc = simulate(server, prompts, out, "--method", "rlaif", "--max-retries", 2)
    assert_user_error(proc, server.url, "failed after 3 attempts", error, only_line=False)
    assert_whole_lines(out / "records-r0-of-1.jsonl")
    partial = records(out)
    assert len(partial) < len(expected)
    assert all(r in expected for r in partial)  # each record written is whole and final
    assert json.loads((out / "manifest-r0-of-1.json").read_text())["status"] == "interrupted"
    server.control()
    resumed = simulate(server, prompts, out, "--method", "rlaif")
    assert resumed.returncode == 0, resumed.stderr
    assert records(out) == expected


def test_backoff_grows_and_is_jittered(server):
    """Six requests fail twice at once: their retries come back 0.25-0.5 s, then 0.5-1 s later, and not in lockstep."""
    server.control(script=["503"] * 12)
    prompts = [f"Human: {'x' * n}\n\nAssistant:" for n in range(1, 7)]  # lengths tell the requests apart
    engine = OpenAIEngine(server.url, "fake", concurrency=6, max_retries=3)
    engine.generate(prompts, SamplingParams(max_new_tokens=4, stop=("\nHuman",)), seeds=list(range(1, 7)))
    times = defaultdict(list)
    for e in server.log():
        times[e["prompt_chars"]].append(e["t"])
    assert sorted(len(t) for t in times.values()) == [3] * 6
    first = [t[1] - t[0] for t in times.values()]
    second = [t[2] - t[1] for t in times.values()]
    assert all(0.24 <= g <= 0.65 for g in first), first
    assert all(0.49 <= g <= 1.2 for g in second), second
    assert statistics.pstdev(first) > 0.01 and statistics.pstdev(second) > 0.02, (first, second)  # jitter


def test_retry_after_is_honoured(server):
    server.control(script=["429"], retry_after=1.2)
    engine = OpenAIEngine(server.url, "fake", max_retries=2)
    engine.generate(["Human: hi\n\nAssistant:"], SamplingParams(max_new_tokens=4), seeds=[1])
    t = [e["t"] for e in server.log()]
    assert len(t) == 2 and t[1] - t[0] >= 1.2


def test_prompts_over_the_server_context_are_skipped_and_counted(server, tmp_path):
    prompts = tmp_path / "q.json"
    questions = [f"Question {i}?" if i % 4 else f"A long question {i}: " + "blah " * 60 for i in range(12)]
    prompts.write_text(json.dumps(questions))
    server.control(max_prompt_chars=200)
    out = tmp_path / "out"
    proc = simulate(server, prompts, out)
    assert proc.returncode == 0, proc.stderr
    assert sorted({r["index"] for r in records(out)}) == [i for i in range(12) if i % 4]
    manifest = json.loads((out / "manifest-r0-of-1.json").read_text())
    assert manifest["counts"]["skipped"] == {TOO_LONG: 3}
    assert manifest["counts"]["ok"] + manifest["counts"]["failed"] + 3 == 12
    again = simulate(server, prompts, out)  # a resume counts them again, and writes nothing new
    assert again.returncode == 0 and json.loads((out / "manifest-r0-of-1.json").read_text())["counts"]["skipped"] == {TOO_LONG: 3}
    assert len(records(out)) == 9
