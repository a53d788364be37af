"""Engine backed by any OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, llama-cpp-python).

One `/v1/completions` request per prompt, sent concurrently from a thread pool;
the server does its own batching. Transient failures (429, 5xx, timeouts,
dropped connections, unparsable replies) are retried with exponential backoff
and jitter (waiting at least the server's Retry-After); anything else becomes
one `UserError` line naming the server, never the key. A prompt the server
refuses as longer than its context (HTTP 400 saying so) is such an error too,
unless `skip_too_long`: then it comes back as a Completion with finish_reason
"too_long" and no text, and `rlcd simulate` skips and counts that prompt, as it
does prompts the in-process engines measure.

Stop strings: servers cut the text before the matched stop string, while
`Completion.text` keeps it, so it is appended back. vLLM (`stop_reason`) and
SGLang (`matched_stop`) say which string matched, TGI says whether one did
("stop_sequence" / "eos_token"). llama.cpp and llama-cpp-python answer
finish_reason "stop" for both a stop string and the end-of-sequence token and
nothing more, so there the rule is: with stop strings requested, "stop" counts
as a match of the first stop string (exact when only one is requested, as in
simulation); without, as EOS. An EOS on those servers therefore reads as the
end of a turn when stop strings were requested.

One server configuration: every command that can use a server (simulate, generate, compare,
judge-agreement) goes through this module, so they read the same settings the same way. The URL
is --base-url, else $OPENAI_BASE_URL, else OpenAI's API (`server_url`); the key is $RLCD_API_KEY or
$OPENAI_API_KEY, never a flag, and is needed only by OpenAI's own API (`server_key`); --concurrency,
--max-retries and --timeout have the same defaults everywhere (`ServerOptions`). Sampling sends no
repetition penalty (both servers' names for it are set to 1) and min_p 0, so a server's own defaults
(llama-cpp-python's 1.1, a vLLM model's generation config) do not change the samples; top-k off is
sent as no top_k, because vLLM and SGLang refuse 0 and llama-cpp-python refuses -1, so there a
server applies its own default (llama.cpp: 40; vLLM: the model's generation config, unless started
with --generation-config vllm).

Several servers: --base-url (or $OPENAI_BASE_URL) may name several, comma-separated or as a repeated
flag (`server_urls`), e.g. one vLLM per GPU or node. All must serve the model: each one's /v1/models is
checked at start, and one that is unreachable or serves other models stops the command in one line
naming it (a typo or a server still loading would otherwise go unnoticed, or halve the throughput).
--concurrency is per server: N servers have up to N x concurrency requests in flight, each request sent
to the server with the fewest in flight. A request's attempts follow one retry policy per server
(--max-retries after the first, backoff between attempts on the same server), and a transient fault
moves the request to another server at once: it fails only when it has failed on every server. A
server whose last --max-retries + 1 attempts (any requests') all failed is out of rotation for
OUT_OF_ROTATION_S, used meanwhile only by requests that every server in rotation has failed; an answer
puts it back. The body of a request (prompt, sampling, the prompt's own seed) does not depend on the
server it lands on, so with servers that honour `seed` the outputs do not depend on which one answered.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlparse

from rlcd.engines import Completion, SamplingParams
from rlcd.files import UserError
from rlcd.options import Config, option
from rlcd.text import terminal_safe

T = TypeVar("T")

# the settings every server user shares (`ServerOptions`)
DEFAULT_BASE_URL = "https://api.openai.com/v1"
OPENAI_HOSTS = ("api.openai.com",)  # hosts that need a real key; any other server gets a placeholder when none is set
CONCURRENCY = 16
MAX_RETRIES = 6
TIMEOUT_S = 600.0
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
RETRY_STATUS = {408, 409, 429}  # and every 5xx
OUT_OF_ROTATION_S = 60.0  # how long a failing server is passed over while other servers answer
TOP_LOGPROBS = 20  # vLLM's default --max-logprobs; OpenAI itself allows only 5


# how servers word "prompt + max_tokens do not fit the context": OpenAI and llama-cpp-python
# ("maximum context length", code context_length_exceeded), vLLM (also "max_model_len"), SGLang,
# llama.cpp ("exceeds the available context size"), TGI ("must be <= N").
_CONTEXT_REFUSAL = re.compile(r"context[ _](length|window|size)|max_model_len|maximum context|must be <= \d+", re.IGNORECASE)


class _Unparsable(Exception):
    """A 2xx reply without the fields we need: treated like a transient server fault."""


class _PromptTooLong(Exception):
    """The server refused a prompt as longer than its context (not retried)."""


def backoff_s(attempt: int) -> float:
    """Seconds to wait after failed attempt `attempt` (0-based): exponential, capped, with jitter
    so that many threads hitting the same overloaded server do not retry in lockstep."""
    delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt)
    return delay / 2 + random.uniform(0, delay / 2)


def server_urls(flag: str | None) -> list[str]:
    """The servers' URLs: --base-url, else $OPENAI_BASE_URL, else OpenAI's API; several are comma-separated.
    "http://host:8000" and "http://host:8000/v1" both work (the SDK appends "/completions")."""
    value = flag or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    urls = []
    for url in (part.strip() for part in value.split(",")):
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            source = f"--base-url {flag}" if flag else f"OPENAI_BASE_URL={value}"
            raise UserError(f"{source}: expected http(s) URLs such as http://127.0.0.1:8000/v1 (several: comma-separated), got {url!r}")
        url = url.rstrip("/")
        url = url + "/v1" if parsed.path in ("", "/") else url
        if url in urls:
            raise UserError(f"--base-url / OPENAI_BASE_URL names {url} twice")
        urls.append(url)
    return urls


def server_url(flag: str | None) -> str:
    """`server_urls` as one comma-separated string: what a manifest records, and what --base-url takes back."""
    return ",".join(server_urls(flag))


def server_key(base_url: str) -> str:
    """$RLCD_API_KEY or $OPENAI_API_KEY; local servers ignore the key but the SDK insists on one, so they get a placeholder."""
    key = os.environ.get("RLCD_API_KEY") or os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    for url in base_url.split(","):
        if urlparse(url).hostname in OPENAI_HOSTS:
            raise UserError(f"{url} needs an API key: set OPENAI_API_KEY (or --base-url / OPENAI_BASE_URL for another server)")
    return "EMPTY"


class _Server:
    """One server of --base-url: its client, the requests in flight there, and how it has fared lately."""

    def __init__(self, url: str, client):
        self.url, self.client = url, client
        self.in_flight = 0
        self.failures = 0  # attempts that failed in a row, whichever requests they were
        self.out_until = 0.0  # time.monotonic() until which it is out of rotation


class OpenAIEngine:
    name = "openai"
    context_length: int | None = None
    can_ban_tokens = False

    def __init__(
        self,
        base_url: str | None,
        model: str,
        concurrency: int = CONCURRENCY,
        max_retries: int = MAX_RETRIES,
        timeout: float = TIMEOUT_S,
        api_key: str | None = None,
        skip_too_long: bool = False,
    ):
        import openai

        if concurrency < 1:
            raise UserError(f"concurrency must be at least 1, got {concurrency}")
        self.base_url = server_url(base_url)  # comma-separated, one or several
        self.model = model
        self.concurrency = concurrency  # per server
        self.max_retries = max_retries
        self.skip_too_long = skip_too_long
        self._key = api_key or server_key(self.base_url)
        # the SDK's own retries are off: ours decide what is transient, how long to wait, and where to go next
        self._servers = [_Server(url, openai.OpenAI(base_url=url, api_key=self._key, timeout=timeout, max_retries=0))
                         for url in self.base_url.split(",")]
        self._lock = threading.Lock()
        for server in self._servers:
            self._check_model(server)

    def __repr__(self) -> str:
        return f"OpenAIEngine(base_url={self.base_url!r}, model={self.model!r})"

    def count_tokens(self, text: str) -> int | None:
        return None  # the OpenAI API has no tokenizer endpoint

    # ---- the Engine interface

    def generate(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int]) -> list[Completion]:
        body: dict = {"max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p}
        if params.stop:
            body["stop"] = list(params.stop)
        # min_p and repetition penalties are off in SamplingParams' terms; servers would otherwise apply their
        # defaults (llama.cpp's min_p 0.05, llama-cpp-python's repeat_penalty 1.1, a vLLM model's generation config)
        extra: dict = {"min_p": 0.0, "repetition_penalty": 1.0, "repeat_penalty": 1.0}
        if params.top_k > 0:
            extra["top_k"] = params.top_k  # not in the OpenAI API; vLLM, SGLang, llama.cpp read it

        def one(i: int) -> Completion:
            try:
                return self._request(
                    "completion",
                    # 31 bits: llama.cpp keeps only the low 32 bits of a seed, other servers reject
                    # what does not fit a signed 64-bit integer; simulation's seeds are 63-bit
                    dict(body, prompt=prompts[i], seed=seeds[i] % 2**31, extra_body=extra),
                    lambda data: _completion(data, params.stop),
                )
            except _PromptTooLong:
                return Completion("", "too_long", 0)  # nothing generated; simulation skips and counts the prompt

        return self._map(one, len(prompts))

    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[str]) -> tuple[list[list[float]], list]:
        """Log-probs of each candidate as the next token, read from the server's top-20 list.

        A candidate is matched exactly, else with a leading space ("A" or " A"). One missing
        from the top 20 is known only to be at most the smallest listed log-prob; it gets that
        minus log 2 as a stand-in, named "A(not in top-20)" in the returned identifiers (which
        are, per candidate, the ones most prompts used).
        """

        def parse(data: dict) -> list[tuple[float, str]]:
            if data["choices"][0].get("logprobs") is None:  # a server without logprobs says nothing: no use retrying
                raise UserError(f"{self.base_url}: the server sent no log-probs (it must support `logprobs` on /v1/completions)")
            return _candidate_logprobs(data, candidates)

        def one(i: int) -> list[tuple[float, str]]:
            body = {"prompt": prompts[i], "max_tokens": 1, "temperature": 0, "logprobs": TOP_LOGPROBS}
            return self._request("log-prob request", body, parse)

        results = self._map(one, len(prompts))
        logprobs = [[lp for lp, _ in r] for r in results]
        ids = [Counter(r[c][1] for r in results).most_common(1)[0][0] for c in range(len(candidates))] if results else list(candidates)
        return logprobs, ids

    def chat(self, texts: Sequence[str], body: dict, parse: Callable[[dict], T], done: Callable[[int, T], None]) -> None:
        """One /v1/chat/completions request per text (the user's turn) with the settings in `body`; done(i, parse(reply
        JSON of text i)) is called in the calling thread as each reply arrives, so a caller can save it at once."""

        def one(i: int) -> T:
            return self._request("chat completion", dict(body, messages=[{"role": "user", "content": texts[i]}]), parse, chat=True)

        self._map(one, len(texts), done)

    # ---- plumbing

    def _map(self, fn: Callable[[int], T], n: int, done: Callable[[int, T], None] | None = None) -> list[T]:
        """fn(0..n-1) on the thread pool, results in input order; done(i, result) as each arrives."""
        pool = ThreadPoolExecutor(self.concurrency * len(self._servers))
        try:
            futures = {pool.submit(fn, i): i for i in range(n)}
            results: list = [None] * n
            for future in as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                if done:
                    done(i, results[i])
            return results
        finally:
            # after a failure or an interrupt, requests not yet started are dropped rather than sent
            pool.shutdown(wait=True, cancel_futures=True)

    def _request(self, what: str, body: dict, parse: Callable[[dict], T], chat: bool = False) -> T:
        def call(client) -> T:
            endpoint = client.chat.completions if chat else client.completions
            raw = endpoint.with_raw_response.create(model=self.model, **body)
            try:
                return parse(raw.http_response.json())
            except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as e:
                raise _Unparsable(type(e).__name__) from None

        return self._retrying(what, call)

    def _retrying(self, what: str, call: Callable[..., T], servers: list[_Server] | None = None) -> T:
        """call(client) until a server answers: up to max_retries + 1 attempts on each server (of `servers`, default
        all), with backoff between attempts on the same one; after a transient fault the next attempt goes where it
        can start soonest (another server at once), preferring servers in rotation and then the least busy."""
        import openai

        servers = servers or self._servers
        failed = {s.url: 0 for s in servers}  # this request's failed attempts, per server
        ready = {s.url: 0.0 for s in servers}  # when backoff lets this request try that server again
        errors: dict[str, str] = {}
        while (server := self._pick(servers, failed, ready)) is not None:
            try:
                time.sleep(max(0.0, ready[server.url] - time.monotonic()))
                try:
                    result = call(server.client)
                except openai.APIStatusError as e:
                    if e.status_code < 500 and e.status_code not in RETRY_STATUS:
                        message = self._server_message(e)
                        if self.skip_too_long and e.status_code in (400, 413, 422) and what == "completion" and (
                            _CONTEXT_REFUSAL.search(message) or e.code == "context_length_exceeded"
                        ):
                            raise _PromptTooLong(message) from None
                        hint = "; check OPENAI_API_KEY" if e.status_code in (401, 403) else ""
                        raise UserError(f"{server.url}: {what} refused (HTTP {e.status_code}): {message}{hint}") from None
                    error = f"{type(e).__name__} (HTTP {e.status_code}): {self._server_message(e)}"
                    wait = _retry_after_s(e.response)
                except openai.APIConnectionError as e:  # timeouts included
                    error, wait = type(e).__name__, 0.0
                except _Unparsable as e:
                    error, wait = f"unparsable response ({e})", 0.0
                else:
                    with self._lock:
                        server.failures, server.out_until = 0, 0.0
                    return result
            finally:
                with self._lock:
                    server.in_flight -= 1
            failed[server.url] += 1
            ready[server.url] = time.monotonic() + max(backoff_s(failed[server.url] - 1), wait)
            errors[server.url] = error
            if servers is self._servers:  # a request, not the start's check of one server
                self._count_failure(server, error)
        if len(servers) == 1:
            raise UserError(f"{servers[0].url}: {what} failed after {self.max_retries + 1} attempts: {error}")
        raise UserError(f"{what} failed on all {len(servers)} servers, {self.max_retries + 1} attempts each: "
                        + "; ".join(f"{s.url}: {errors[s.url]}" for s in servers))

    def _pick(self, servers: list[_Server], failed: dict[str, int], ready: dict[str, float]) -> _Server | None:
        """The server for a request's next attempt (counted in flight from now), or None when it failed on all."""
        now = time.monotonic()
        with self._lock:
            left = [s for s in servers if failed[s.url] <= self.max_retries]
            if not left:
                return None
            server = min(left, key=lambda s: (s.out_until > now, max(ready[s.url], now), s.in_flight))
            server.in_flight += 1
            return server

    def _count_failure(self, server: _Server, error: str) -> None:
        """A failed attempt on `server`; after max_retries + 1 in a row it leaves the rotation for a while."""
        now = time.monotonic()
        with self._lock:
            server.failures += 1
            leaves = len(self._servers) > 1 and server.failures > self.max_retries and server.out_until <= now
            if leaves:
                server.out_until = now + OUT_OF_ROTATION_S
        if leaves:
            print(terminal_safe(f"{server.url}: out of rotation for {OUT_OF_ROTATION_S:g} s after {server.failures} failed attempts "
                                f"in a row ({error}); its requests go to the other servers", one_line=True), file=sys.stderr, flush=True)

    def _server_message(self, e) -> str:
        """The server's own explanation, on one short line, without the key."""
        body = e.body
        if isinstance(body, dict):
            body = body.get("error", body)  # OpenAI, vLLM: {"error": {"message"}}; FastAPI: {"detail"}
            if isinstance(body, dict):
                body = body.get("message") or body.get("detail") or body
        text = " ".join(str(body if body is not None else e.response.text).split())[:300]
        return text.replace(self._key, "***") if self._key != "EMPTY" else text

    def _check_model(self, server: _Server) -> None:
        """Fail before any work when `server` does not serve `model`: llama.cpp and llama-cpp-python would
        silently answer with whatever model they hold. With several servers, every one must serve it."""
        import openai

        def call(client) -> list[str] | None:
            try:
                raw = client.models.with_raw_response.list()
            except openai.NotFoundError:
                return None  # no model listing on this server: nothing to check against
            try:
                return [m["id"] for m in raw.http_response.json()["data"]]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise _Unparsable(type(e).__name__) from None

        several = f" (every server of --base-url must serve {self.model!r}: start it, or leave it out)" if len(self._servers) > 1 else ""
        try:
            served = self._retrying("model listing", call, [server])
        except UserError as e:
            raise UserError(f"{e}{several}") from None
        if served is not None and self.model not in served:
            raise UserError(f"{server.url}: model {self.model!r} is not served there (it serves: {', '.join(map(repr, served))}){several}")


def _retry_after_s(response) -> float:
    """The server's Retry-After (seconds form), capped at BACKOFF_CAP_S; 0 when absent or unreadable."""
    try:
        return min(BACKOFF_CAP_S, max(0.0, float(response.headers.get("retry-after", 0))))
    except (TypeError, ValueError):
        return 0.0  # the HTTP-date form: the exponential backoff stands


def _completion(data: dict, stop: tuple[str, ...]) -> Completion:
    choice = data["choices"][0]
    text, reason = choice["text"], choice["finish_reason"]
    num_tokens = int((data.get("usage") or {}).get("completion_tokens") or 0)
    if reason == "length":
        return Completion(text, "length", num_tokens)
    if reason not in ("stop", "stop_sequence", "eos_token"):
        raise _Unparsable(f"finish_reason {reason!r}")
    matched = _matched_stop(choice, reason, stop)
    if matched is None:
        return Completion(text, "eos", num_tokens)
    return Completion(text + matched, "stop", num_tokens)


def _matched_stop(choice: dict, reason: str, stop: tuple[str, ...]) -> str | None:
    """The stop string the server matched (and cut off), or None for an end-of-sequence token."""
    for key in ("stop_reason", "matched_stop"):  # vLLM, SGLang: the string, a stop token id, or null
        if key in choice:
            return choice[key] if isinstance(choice[key], str) else None
    if not stop or reason == "eos_token":
        return None
    return stop[0]  # TGI's "stop_sequence", or llama.cpp's ambiguous "stop" (see the module notes)


def _top_logprobs(data: dict) -> dict[str, float]:
    """token text -> log-prob for the first generated position."""
    logprobs = data["choices"][0]["logprobs"]
    if "top_logprobs" in logprobs:  # OpenAI legacy format: vLLM, llama-cpp-python
        return {t: float(lp) for t, lp in logprobs["top_logprobs"][0].items()}
    top: dict[str, float] = {}  # llama.cpp's server: {"content": [{"top_logprobs": [{"token", "logprob"}]}]}
    for entry in logprobs["content"][0]["top_logprobs"]:
        top[entry["token"]] = max(float(entry["logprob"]), top.get(entry["token"], -math.inf))
    return top


def _candidate_logprobs(data: dict, candidates: Sequence[str]) -> list[tuple[float, str]]:
    top = _top_logprobs(data)
    if not top:
        raise KeyError("top_logprobs")
    out = []
    for c in candidates:
        token = next((t for t in (c, " " + c) if t in top), None)
        if token is not None:
            out.append((top[token], token))
        else:
            out.append((min(top.values()) - math.log(2), f"{c}(not in top-{TOP_LOGPROBS})"))
    return out


# ---- the flags of every command that can use a server


class _BaseURLs(argparse.Action):
    """--base-url A --base-url B means --base-url A,B; the first one on the command line replaces a --config value."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, "_base_url_given", False)
        setattr(namespace, self.dest, f"{getattr(namespace, self.dest)},{values}" if given else values)
        namespace._base_url_given = True


SERVER = ("OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, OpenAI); the key comes from $OPENAI_API_KEY or "
          "$RLCD_API_KEY, never a flag")


@dataclass
class ServerOptions(Config):
    """--base-url, --concurrency, --max-retries, --timeout: the same settings, with the same defaults, on every command
    that can use a server."""

    base_url: str | None = option(None, "server URL, e.g. http://127.0.0.1:8000/v1; several servers of the same model (one vLLM per GPU "
                                  "or node) comma-separated or as a repeated flag: requests go to the least busy, and one that fails is "
                                  f"retried on another (default: $OPENAI_BASE_URL, else {DEFAULT_BASE_URL})", action=_BaseURLs, group=SERVER)
    concurrency: int = option(CONCURRENCY, "requests in flight per server of --base-url", group=SERVER)
    max_retries: int = option(MAX_RETRIES, "retries of a request on each server after a transient fault (429, 5xx, timeout, dropped "
                              "connection, unparsable reply), with exponential backoff and jitter, waiting at least the server's "
                              "Retry-After; with several servers a fault first moves the request to another", group=SERVER)
    timeout: float = option(TIMEOUT_S, "seconds to wait for one reply", group=SERVER)


@dataclass
class BackendOptions(ServerOptions):
    """ServerOptions plus --backend and --api-model: for commands that run a model in process or on a server."""

    backend: str = option("hf", "hf: the in-process model of --model; openai: the model --api-model of the server",
                          choices=("hf", "openai"), group=SERVER)
    api_model: str | None = option(None, "the model's name on the server, as its /v1/models lists it (needed with --backend openai)",
                                   group=SERVER)


def check_arguments(args, uses_server: bool) -> None:
    """One-line errors for the server flags, before any work; with `uses_server` also the URL and key."""
    checks = [
        (args.concurrency >= 1, "--concurrency must be at least 1"),
        (args.timeout > 0, "--timeout must be positive"),
        (args.max_retries >= 0, "--max-retries must be >= 0"),
        (getattr(args, "backend", None) != "openai" or args.api_model, "--backend openai needs --api-model (the model's name on the server)"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if uses_server:
        server_key(server_url(args.base_url))


def from_arguments(args) -> tuple[OpenAIEngine, dict]:
    """The engine of --backend openai, and what a manifest records of it (never the key). A prompt the server
    refuses as too long comes back as finish_reason "too_long", for the caller to skip and count."""
    engine = OpenAIEngine(args.base_url, args.api_model, concurrency=args.concurrency, max_retries=args.max_retries,
                          timeout=args.timeout, skip_too_long=True)
    return engine, {"backend": "openai", "base_url": engine.base_url, "api_model": engine.model}
