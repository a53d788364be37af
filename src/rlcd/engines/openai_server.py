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
--max-retries and --timeout have the same defaults everywhere (`add_arguments`). Sampling sends no
repetition penalty (both servers' names for it are set to 1) and min_p 0, so a server's own defaults
(llama-cpp-python's 1.1, a vLLM model's generation config) do not change the samples; top-k off is
sent as no top_k, because vLLM and SGLang refuse 0 and llama-cpp-python refuses -1, so there a
server applies its own default (llama.cpp: 40; vLLM: the model's generation config, unless started
with --generation-config vllm).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Sequence, TypeVar
from urllib.parse import urlparse

from rlcd.engines import Completion, SamplingParams
from rlcd.files import UserError

T = TypeVar("T")

# the settings every server user shares (`add_arguments`)
DEFAULT_BASE_URL = "https://api.openai.com/v1"
OPENAI_HOSTS = ("api.openai.com",)  # hosts that need a real key; any other server gets a placeholder when none is set
CONCURRENCY = 16
MAX_RETRIES = 6
TIMEOUT_S = 600.0
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
RETRY_STATUS = {408, 409, 429}  # and every 5xx
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


def server_url(flag: str | None) -> str:
    """The server's URL: --base-url, else $OPENAI_BASE_URL, else OpenAI's API. "http://host:8000" and
    "http://host:8000/v1" both work (the SDK appends "/completions")."""
    url = flag or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        source = f"--base-url {flag}" if flag else f"OPENAI_BASE_URL={url}"
        raise UserError(f"{source}: expected an http(s) URL such as http://127.0.0.1:8000/v1")
    url = url.rstrip("/")
    return url + "/v1" if parsed.path in ("", "/") else url


def server_key(base_url: str) -> str:
    """$RLCD_API_KEY or $OPENAI_API_KEY; local servers ignore the key but the SDK insists on one, so they get a placeholder."""
    key = os.environ.get("RLCD_API_KEY") or os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    if urlparse(base_url).hostname in OPENAI_HOSTS:
        raise UserError(f"{base_url} needs an API key: set OPENAI_API_KEY (or --base-url / OPENAI_BASE_URL for another server)")
    return "EMPTY"


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
        self.base_url = server_url(base_url)
        self.model = model
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.skip_too_long = skip_too_long
        self._key = api_key or server_key(self.base_url)
        # the SDK's own retries are off: ours decide what is transient and how long to wait
        self._client = openai.OpenAI(base_url=self.base_url, api_key=self._key, timeout=timeout, max_retries=0)
        self._check_model()

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
        pool = ThreadPoolExecutor(self.concurrency)
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
        def call() -> T:
            endpoint = self._client.chat.completions if chat else self._client.completions
            raw = endpoint.with_raw_response.create(model=self.model, **body)
            try:
                return parse(raw.http_response.json())
            except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as e:
                raise _Unparsable(type(e).__name__) from None

        return self._retrying(what, call)

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        import openai

        for attempt in range(self.max_retries + 1):
            try:
                return call()
            except openai.APIStatusError as e:
                if e.status_code < 500 and e.status_code not in RETRY_STATUS:
                    message = self._server_message(e)
                    if self.skip_too_long and e.status_code in (400, 413, 422) and what == "completion" and (
                        _CONTEXT_REFUSAL.search(message) or e.code == "context_length_exceeded"
                    ):
                        raise _PromptTooLong(message) from None
                    hint = "; check OPENAI_API_KEY" if e.status_code in (401, 403) else ""
                    raise UserError(f"{self.base_url}: {what} refused (HTTP {e.status_code}): {message}{hint}") from None
                error = f"{type(e).__name__} (HTTP {e.status_code}): {self._server_message(e)}"
                wait = _retry_after_s(e.response)
            except openai.APIConnectionError as e:  # timeouts included
                error, wait = type(e).__name__, 0.0
            except _Unparsable as e:
                error, wait = f"unparsable response ({e})", 0.0
            if attempt < self.max_retries:
                time.sleep(max(backoff_s(attempt), wait))
        raise UserError(f"{self.base_url}: {what} failed after {self.max_retries + 1} attempts: {error}")

    def _server_message(self, e) -> str:
        """The server's own explanation, on one short line, without the key."""
        body = e.body
        if isinstance(body, dict):
            body = body.get("error", body)  # OpenAI, vLLM: {"error": {"message"}}; FastAPI: {"detail"}
            if isinstance(body, dict):
                body = body.get("message") or body.get("detail") or body
        text = " ".join(str(body if body is not None else e.response.text).split())[:300]
        return text.replace(self._key, "***") if self._key != "EMPTY" else text

    def _check_model(self) -> None:
        """Fail before any work when the server does not serve `model`: llama.cpp and
        llama-cpp-python would silently answer with whatever model they hold."""
        import openai

        def call() -> list[str] | None:
            try:
                raw = self._client.models.with_raw_response.list()
            except openai.NotFoundError:
                return None  # no model listing on this server: nothing to check against
            try:
                return [m["id"] for m in raw.http_response.json()["data"]]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise _Unparsable(type(e).__name__) from None

        served = self._retrying("model listing", call)
        if served is not None and self.model not in served:
            raise UserError(f"{self.base_url}: model {self.model!r} is not served there (it serves: {', '.join(map(repr, served))})")


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


def add_arguments(p, backend: bool = True):
    """--base-url, --concurrency, --max-retries, --timeout (and with `backend`, --backend and --api-model) in one
    group, with the same defaults on every command; returns the group."""
    g = p.add_argument_group("OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, OpenAI); "
                             "the key comes from $OPENAI_API_KEY or $RLCD_API_KEY, never a flag")
    if backend:
        g.add_argument("--backend", default="hf", choices=["hf", "openai"],
                       help="hf: the in-process model of --model; openai: the model --api-model of the server (default hf)")
        g.add_argument("--api-model", help="the model's name on the server, as its /v1/models lists it (needed with --backend openai)")
    g.add_argument("--base-url", help=f"server URL, e.g. http://127.0.0.1:8000/v1 (default: $OPENAI_BASE_URL, else {DEFAULT_BASE_URL})")
    g.add_argument("--concurrency", type=int, default=CONCURRENCY, help=f"requests in flight (default {CONCURRENCY})")
    g.add_argument("--max-retries", type=int, default=MAX_RETRIES,
                   help="retries of a request after a transient fault (429, 5xx, timeout, dropped connection, unparsable reply), "
                        f"with exponential backoff and jitter, waiting at least the server's Retry-After (default {MAX_RETRIES})")
    g.add_argument("--timeout", type=float, default=TIMEOUT_S, help=f"seconds to wait for one reply (default {TIMEOUT_S:g})")
    return g


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
