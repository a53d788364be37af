"""Shared pieces of the reliability suite: a scripted engine, subprocess runners, a fault server, checks.

(Not a conftest.py: tests/conftest.py is imported by name elsewhere, and a second conftest module
would shadow it.)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from rlcd.engines import Completion
from rlcd.files import load_shard

HERE = Path(__file__).resolve().parent
ONE_THREAD = {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1}  # tiny models: threads only contend on a busy machine


class ScriptedEngine:
    """Deterministic in (prompt, seed), like the real seeded engines: seeds divisible by 3 and prompts
    asking to FAIL never end their turn; judged by reply length. `delay` seconds per generate call."""

    name, context_length, can_ban_tokens = "scripted", None, False

    def __init__(self, delay: float = 0.0):
        self.delay, self.calls = delay, 0

    def count_tokens(self, text):
        return None

    def generate(self, prompts, params, seeds):
        self.calls += 1
        time.sleep(self.delay)
        out = []
        for prompt, seed in zip(prompts, seeds):
            if "FAIL" in prompt or seed % 3 == 0:
                out.append(Completion(" rambling on", "length", 3))
            else:
                out.append(Completion(f" reply {len(prompt) % 97}-{seed % 1000}\n\nHuman", "stop", 5))
        return out

    def next_token_logprobs(self, prompts, candidates):
        rows = []
        for p in prompts:
            a = p.split("(A) ")[1].split("\n")[0]
            b = p.split("(B) ")[1].split("\n")[0]
            rows.append([-len(a) / 10, -len(b) / 10])
        return rows, ["A", "B"]


def scripted_simulate(*args, delay: float = 0.0) -> None:
    """`rlcd simulate` in this process with the scripted engine."""
    from unittest import mock

    from rlcd import simulate
    from rlcd.cli import main

    with mock.patch.object(simulate, "make_engine", lambda a: (ScriptedEngine(delay), {"backend": "scripted"})):
        main(["simulate", *map(str, args)])


@contextlib.contextmanager
def captured():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield out, err


def cli(argv, run=None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `rlcd ...` in this process."""
    from rlcd.cli import main

    with captured() as (out, err):
        try:
            (run or main)(argv)
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def env(**extra) -> dict:
    out = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    out.pop("WORLD_SIZE", None)
    out.pop("RANK", None)
    out.update({k: str(v) for k, v in extra.items()})
    return out


def rlcd_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "rlcd", *map(str, args)]


def scripted_cmd(*args) -> list[str]:
    """`rlcd simulate ...` in a subprocess with the scripted engine (delay from $RLCD_TEST_DELAY)."""
    return [sys.executable, str(HERE / "scripted_rlcd.py"), "simulate", *map(str, args)]


def run(cmd: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", env())
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def assert_user_error(proc: subprocess.CompletedProcess | tuple[int, str], *fragments: str, only_line: bool = True) -> str:
    """Exit code 2, no traceback, and an `rlcd <command>: error: ...` line holding every fragment:
    the whole of stderr when `only_line`, else its last line (after progress lines)."""
    code, err = (proc.returncode, proc.stderr) if isinstance(proc, subprocess.CompletedProcess) else proc
    lines = err.strip().splitlines()
    assert code == 2, f"exit code {code}, stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert lines, "no error message"
    if only_line:
        assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    line = lines[-1]
    assert line.startswith("rlcd ") and ": error: " in line, line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def records(out_dir) -> list[dict]:
    found = []
    for path in sorted(Path(out_dir).glob("records-*.jsonl")):
        found += load_shard(path)
    return sorted(found, key=lambda r: (r["index"], r["status"]))


def assert_whole_lines(path: Path) -> None:
    """Every line of a JSONL file is a complete JSON object, and the file ends with a newline."""
    raw = path.read_bytes()
    assert not raw or raw.endswith(b"\n"), f"{path} ends in a torn line"
    for line in raw.splitlines():
        json.loads(line)


def kill_9(proc: subprocess.Popen) -> None:
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class FaultServer:
    """fault_server.py in a subprocess; `control(**settings)` sets its faults, `log()` reads its requests."""

    def __init__(self, tmp: Path):
        port_file = tmp / "fault-server.port"
        self.proc = subprocess.Popen([sys.executable, str(HERE / "fault_server.py"), str(port_file)])
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, "fault server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port_file.read_text()}"

    def _call(self, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def control(self, **settings) -> None:
        defaults = {"script": [], "rate": 0.0, "kinds": [], "fail_after": None, "fail_kind": "503",
                    "max_prompt_chars": None, "leak_auth": False, "timeout_s": 2.0, "seed": 0, "retry_after": None}
        self._call("/_control", {**defaults, **settings})

    def log(self) -> list[dict]:
        return self._call("/_log")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            kill_9(self.proc)


def question_file(path: Path, n: int) -> Path:
    path.write_text(json.dumps([f"Question number {i}: what is {i} plus {i * 7 % 11}?" for i in range(n)]))
    return path


def marker_table(path: Path, n: int = 48) -> Path:
    rng = random.Random(0)
    words = "apple river stone cloud music paper green quick lamp chair bread water".split()
    rows = []
    for i in range(n):
        good, bad = " ".join(rng.sample(words, 3) + ["great"]), " ".join(rng.sample(words, 4))
        first = rng.random() < 0.5
        rows.append({"instruction": f"Human: tell me about {words[i % len(words)]}\n\nAssistant:", "input": "",
                     "output_1": good if first else bad, "output_2": bad if first else good, "preference": 1 if first else 2})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_ppo_models(tiny_model_dir: str, out: Path) -> tuple[str, str]:
    """(policy, reward model) for PPO runs: the tiny Llama rewired to end a response with EOS ~30% of the
    time even without top-k (PPO samples the whole vocabulary), so with --accept-eos rewards vary; a random RM."""
    import math

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForSequenceClassification

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream keeps the token embedding only
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 4.0
        eos, hidden = model.config.eos_token_id, model.config.hidden_size
        model.lm_head.weight[eos] = 0
        model.lm_head.weight[eos, 0] = math.log(20000) / hidden**0.5 / model.model.norm.weight[0]
    policy, rm = out / "policy", out / "rm"
    model.save_pretrained(policy)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_labels = 1
    torch.manual_seed(3)
    LlamaForSequenceClassification(config).save_pretrained(rm)
    for f in Path(tiny_model_dir).glob("*token*"):
        (policy / f.name).write_bytes(f.read_bytes())
        (rm / f.name).write_bytes(f.read_bytes())
    return str(policy), str(rm)
