"""A small OpenAI-compatible completions server that can be driven into faults, run as a subprocess.

    python fault_server.py PORT_FILE

It writes its port to PORT_FILE, then serves:
  GET  /v1/models      the one model "fake"
  POST /v1/completions a reply that depends only on (prompt, seed), like a real seeded server:
                       seeds divisible by 3 give a turn that never ends (finish "length"), others
                       " reply <n>" ended by the stop string; logprob requests get top log-probs of
                       " A" and " B" from the lengths of the two options (shorter wins)
  POST /_control       replace the fault settings (JSON, keys below); answers the current log
  GET  /_log           every completion request so far: {"t", "fault", "auth", "prompt_chars"}

Fault settings: "script" (a list of faults for the next requests, in order), "rate" and "kinds"
(after the script, each request gets a fault with probability rate, drawn from kinds by a seeded
generator), "fail_after" (every request after this many is a fault of kind "fail_kind"),
"max_prompt_chars" (longer prompts are refused with llama-cpp-python's HTTP 400 context message),
"leak_auth" (error bodies repeat the request's Authorization header, like a careless proxy),
"timeout_s" (how long a "timeout" fault stalls before answering).
Fault kinds: 429, 500, 502, 503 (HTTP errors), timeout, drop (connection closed without a reply),
truncated (a reply cut short of its Content-Length), malformed (200 with HTML), wrong_shape (200
JSON without choices), auth (401).
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE = {"script": [], "rate": 0.0, "kinds": [], "fail_after": None, "fail_kind": "503", "max_prompt_chars": None,
         "leak_auth": False, "timeout_s": 2.0, "seed": 0, "retry_after": None}
LOG: list[dict] = []
LOCK = threading.Lock()
RNG = random.Random(0)


def completion_text(prompt: str, seed: int) -> tuple[str, str]:
    if seed % 3 == 0 or "FAIL" in prompt:
        return " rambling on and on", "length"
    return f" reply {zlib.crc32(prompt.encode()) % 1000}-{seed % 997}\n", "stop"


def letter_logprobs(prompt: str) -> dict:
    a = prompt.split("(A) ", 1)[1].split("\n", 1)[0]
    b = prompt.split("(B) ", 1)[1].split("\n", 1)[0]
    return {" A": -len(a) / 10, " B": -len(b) / 10, " C": -9.0}


def pick_fault(n: int) -> str | None:
    if STATE["script"]:
        return STATE["script"].pop(0)
    if STATE["fail_after"] is not None and n >= STATE["fail_after"]:
        return STATE["fail_kind"]
    if STATE["rate"] and RNG.random() < STATE["rate"]:
        return RNG.choice(STATE["kinds"])
    return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.endswith("/models"):
            self.send_json(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
        elif self.path == "/_log":
            with LOCK:
                self.send_json(200, LOG)
        else:
            self.send_json(404, {"error": {"message": "not found"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/_control":
            global RNG
            with LOCK:
                STATE.update(body)
                RNG = random.Random(STATE["seed"])
                LOG.clear()
            self.send_json(200, {"ok": True})
            return
        auth = self.headers.get("Authorization", "")
        prompt = body.get("prompt", "")
        with LOCK:
            fault = pick_fault(len(LOG))
            if fault is None and STATE["max_prompt_chars"] and len(prompt) > STATE["max_prompt_chars"]:
                fault = "context"
            LOG.append({"t": time.monotonic(), "fault": fault, "auth": auth, "prompt_chars": len(prompt)})
        leak = f" (request had Authorization: {auth})" if STATE["leak_auth"] else ""
        if fault in ("429", "500", "502", "503"):
            headers = {"Retry-After": str(STATE["retry_after"])} if fault == "429" and STATE["retry_after"] is not None else {}
            self.send_json(int(fault), {"error": {"message": f"injected {fault}{leak}"}}, headers)
        elif fault == "auth":
            self.send_json(401, {"error": {"message": f"invalid key{leak}"}})
        elif fault == "context":
            message = (f"This model's maximum context length is 64 tokens. However, you requested {len(prompt)} tokens. "
                       f"Please reduce the length of the messages or completion.{leak}")
            self.send_json(400, {"error": {"message": message, "type": "invalid_request_error", "code": "context_length_exceeded"}})
        elif fault == "timeout":
            time.sleep(STATE["timeout_s"])
            self.reply(body)
        elif fault == "drop":
            self.close_connection = True
            self.connection.close()
        elif fault == "truncated":
            data = json.dumps(self.ok_body(body)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.close()
        elif fault == "malformed":
            self.send_raw(200, f"<html>upstream hiccup{leak}</html>".encode(), "text/html")
        elif fault == "wrong_shape":
            self.send_json(200, {"object": "text_completion", "choices": [], "note": f"empty{leak}"})
        else:
            self.reply(body)

    def ok_body(self, body: dict) -> dict:
        prompt = body["prompt"]
        if body.get("logprobs"):
            top = letter_logprobs(prompt)
            choice = {"text": " A", "index": 0, "finish_reason": "length",
                      "logprobs": {"tokens": [" A"], "token_logprobs": [top[" A"]], "top_logprobs": [top]}}
            return {"object": "text_completion", "choices": [choice], "usage": {"completion_tokens": 1}}
        text, reason = completion_text(prompt, int(body.get("seed", 0)))
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": reason,
                  "stop_reason": "\nHuman" if reason == "stop" else None}
        return {"object": "text_completion", "choices": [choice], "usage": {"completion_tokens": len(text.split())}}

    def reply(self, body: dict) -> None:
        try:
            self.send_json(200, self.ok_body(body))
        except BrokenPipeError:  # the client gave up (timeout)
            pass

    def send_json(self, status: int, obj, headers: dict | None = None) -> None:
        self.send_raw(status, json.dumps(obj).encode(), "application/json", headers)

    def send_raw(self, status: int, data: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    server.serve_forever(poll_interval=0.05)


if __name__ == "__main__":
    main()
