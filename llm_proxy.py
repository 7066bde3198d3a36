"""llm_proxy.py: the one door to the model, an OpenAI Chat Completions pass-through.

    IDE ⇄ gateway → agent → [llm_proxy] → LLM   (OpenAI, any compatible API, or fake_llm.py)

Run:  python llm_proxy.py [--host 127.0.0.1] [--port 8002]    or  uvicorn llm_proxy:app --port 8002

The agent, or the official openai SDK unchanged, uses http://HOST:PORT/v1 as its base URL. This
process alone holds OPENAI_API_KEY: it sends it upstream as `Authorization: Bearer`, never
forwards the client's own Authorization, and never logs it. The upstream is OPENAI_BASE_URL if
set; else https://api.openai.com/v1 when OPENAI_API_KEY is set; else fake_llm.py on port 8003.

Who may call it (protocol.py's Guard): a request must name loopback in its Host (or an
ALLOWED_HOSTS name), carry no Origin (no web page may call), send its body as application/json,
and, when LLM_PROXY_KEY is set, `Authorization: Bearer <LLM_PROXY_KEY>` (the SDK's api_key);
without LLM_PROXY_KEY only loopback clients are served, and `python llm_proxy.py` will not listen
on another address. Nothing refused reaches the upstream.

1. `POST /v1/chat/completions` (streamed or not), `GET /v1/models` and `GET /v1/models/{model}`
   go upstream and come back as they came: the same status, body and x-request-id, errors
   included (401 stays 401). No other path is forwarded, and {model} must be one plain id: no
   `/`, `..` or `%` even encoded, so that no upstream path but these can be reached with the key.
2. A stream is forwarded as it arrives, `data: <one line of JSON>` per event, all that one network
   read brought in one body write, and ends with `data: [DONE]`.
3. Connection errors, 408, 409, 429 and 5xx are retried with exponential backoff and jitter, as
   OpenAI's own SDK does, but only while nothing has gone to the client.
4. Every wait is bounded: connect, first chunk, silence between chunks.
5. When the client hangs up, the upstream request is aborted at once.
6. One log line per request: id, model, status, time to first chunk, tokens, duration, retries.
   A client that hangs up before its body arrived is that one line too, never a traceback.
7. A body must arrive whole within BODY_TIMEOUT_S (408) and be at most LLM_PROXY_MAX_BODY_BYTES
   (413, refused from its Content-Length before a byte of it is read); JSON nested past the
   parser's depth is a 400. Every refusal of ours has OpenAI's error body.

Intentional choices, so that nobody "fixes" them:

1. A stream that breaks after it started (connection cut, a chunk that cannot be one JSON object,
   see 5; silence past IDLE_TIMEOUT_S; an end without [DONE]) gets exactly ONE error event,
   `data: {"error": {"message", "type", "param", "code"}}`, and then ends WITHOUT `data: [DONE]`:
   [DONE] means "complete", so even a client that ignores the error object sees a cut stream.
   The openai SDK raises APIError on it. An error event from the upstream itself is forwarded
   and ends the stream the same way.
2. Before the first byte our own failures are plain HTTP with OpenAI's error body: 502 when the
   upstream cannot be reached or cut the connection, 504 when a timeout (connect, first chunk)
   ran out. The upstream's own error statuses pass untouched; only an error body that is not
   JSON (a load balancer's HTML page) is wrapped in OpenAI's shape, with the same status.
3. A first-chunk timeout is not retried: the model is slow, and asking again would multiply the
   wait. Nor is a Retry-After longer than RETRY_AFTER_CAP_S waited for: that 429 goes back at
   once, with its Retry-After, and the client decides.
4. Upstream `event:` and `id:` fields and `:` comments are dropped (OpenAI's chat stream has none).
5. Data is passed as the bytes that came, never re-encoded, and parsed only where it matters:
   a chunk that may carry `usage` (for the log line) or an error. Every other chunk only has to
   look like one JSON object, `{` to `}`: parsing them all took a third of this process's CPU
   on a fast stream, and the client parses each chunk anyway. So `data: [1]` or a chunk cut
   short is caught here; a chunk that is broken between its braces reaches the client, whose
   own parser reports it (the agent ends the run with llm_stream_broken).
6. The log shows an upstream error's type and code, never its message: a 401's quotes the key.

Left out: other endpoints (embeddings, the Responses API, ...), per-client keys or quotas (one
shared LLM_PROXY_KEY), rewriting requests (no injected include_usage), caching, several keys
or upstreams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from protocol import (
    ALLOWED_HOSTS,
    BODY_TIMEOUT_S,
    CHAT_COMPLETIONS_PATH,
    DONE,
    DONE_DATA,
    ERR_LLM,
    ERR_LLM_STREAM,
    ERR_LLM_UNAVAILABLE,
    MODELS_PATH,
    OPENAI_PREFIX,
    EventStreamResponse,
    Guard,
    HttpProblem,
    SSEParser,
    clip,
    dumps,
    encode_data,
    parse_json,
    read_body,
    read_chunks,
    serve,
)

# ---------------------------------------------------------------------------------------------
# Config: read from the environment once, at import. Settings carries it; tests make their own.
# ---------------------------------------------------------------------------------------------

OPENAI_API_KEY = os.environ.get("OPENAI_API_KEY", "")  # sent upstream as Bearer by this process alone
LLM_PROXY_KEY = os.environ.get("LLM_PROXY_KEY", "")  # what clients send as Bearer; "" = none (loopback clients only)
OPENAI_BASE_URL = os.environ.get("OPENAI_BASE_URL", "")  # any OpenAI-compatible base URL ending in /v1
OPENAI_URL = "https://api.openai.com/v1"  # the upstream when there is a key but no OPENAI_BASE_URL
FAKE_LLM_URL = "http://127.0.0.1:8003/v1"  # the upstream when there is neither: fake_llm.py
MAX_RETRIES = int(os.environ.get("LLM_PROXY_MAX_RETRIES", "2"))  # retries after the first attempt; 0 = none
BACKOFF_BASE_S = float(os.environ.get("LLM_PROXY_BACKOFF_BASE_S", "0.5"))  # first backoff; doubles per retry
BACKOFF_CAP_S = float(os.environ.get("LLM_PROXY_BACKOFF_CAP_S", "8"))  # longest backoff, before jitter
RETRY_BUDGET_S = float(os.environ.get("LLM_PROXY_RETRY_BUDGET_S", "60"))  # no retry starts later after arrival
RETRY_AFTER_CAP_S = float(os.environ.get("LLM_PROXY_RETRY_AFTER_CAP_S", "20"))  # longest Retry-After waited for
CONNECT_TIMEOUT_S = float(os.environ.get("LLM_PROXY_CONNECT_TIMEOUT_S", "10"))  # TCP + TLS connect
# A stream must send its first bytes within FIRST_CHUNK_TIMEOUT_S, then never fall silent for IDLE_TIMEOUT_S.
# A whole (non-streamed) answer must send its headers within the first, then its body within the second.
FIRST_CHUNK_TIMEOUT_S = float(os.environ.get("LLM_PROXY_FIRST_CHUNK_TIMEOUT_S", "120"))  # seconds
IDLE_TIMEOUT_S = float(os.environ.get("LLM_PROXY_IDLE_TIMEOUT_S", "60"))  # seconds
# A request body's limit: twice the text of the largest context window on offer (1M tokens, about
# 4 MB), room for JSON escapes and tool schemas. Images belong behind URLs, not in base64 here.
MAX_BODY_BYTES = int(os.environ.get("LLM_PROXY_MAX_BODY_BYTES", str(8 * 1024 * 1024)))  # bytes
HOST, PORT = "127.0.0.1", 8002  # default bind (CONTRACT.md)


@dataclass(frozen=True)
class Settings:
    """Everything create_app() needs. from_env() is the config block above."""

    base_url: str  # the upstream, e.g. https://api.openai.com/v1 (no trailing slash)
    api_key: str = field(default="", repr=False)  # "" = no Authorization (fake_llm, local servers)
    client_key: str = field(default="", repr=False)  # LLM_PROXY_KEY; "" = clients send none
    allowed_hosts: frozenset[str] = ALLOWED_HOSTS  # Host names served besides loopback's
    max_body_bytes: int = MAX_BODY_BYTES
    body_timeout_s: float = BODY_TIMEOUT_S
    max_retries: int = MAX_RETRIES
    backoff_base_s: float = BACKOFF_BASE_S
    backoff_cap_s: float = BACKOFF_CAP_S
    retry_budget_s: float = RETRY_BUDGET_S
    retry_after_cap_s: float = RETRY_AFTER_CAP_S
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    first_chunk_timeout_s: float = FIRST_CHUNK_TIMEOUT_S
    idle_timeout_s: float = IDLE_TIMEOUT_S

    @classmethod
    def from_env(cls) -> Settings:
        """OPENAI_BASE_URL if set; else OpenAI itself when there is a key; else fake_llm.py."""
        if LLM_PROXY_KEY and LLM_PROXY_KEY == OPENAI_API_KEY:  # the agent would then hold the upstream key
            raise SystemExit("LLM_PROXY_KEY must differ from OPENAI_API_KEY: the upstream key stays in llm_proxy alone")
        base_url = OPENAI_BASE_URL or (OPENAI_URL if OPENAI_API_KEY else FAKE_LLM_URL)
        return cls(base_url=base_url.rstrip("/"), api_key=OPENAI_API_KEY, client_key=LLM_PROXY_KEY)


log = logging.getLogger("llm_proxy")

RETRY_STATUSES = frozenset({408, 409, 429})  # and every 5xx: what OpenAI's own SDK retries
PASSED_BACK = ("retry-after", "retry-after-ms", "x-should-retry")  # and x-ratelimit-*: hints for the client
OPENAI_INVALID_REQUEST = "invalid_request_error"  # OpenAI's error `type` for a request we refuse
UPSTREAM_ERROR = "upstream_error"  # our error `type` for a failure on the way to the model
# A model id as the one path segment of GET /v1/models/{model}, checked on the raw path: OpenAI's
# ids (gpt-4o-mini, ft:gpt-4o-mini:org::abc123) fit; `/`, `%` (any encoding) and `..` do not.
MODEL_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
ROUTES = "POST /v1/chat/completions, GET /v1/models and GET /v1/models/{model}"  # all that is forwarded

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# Helpers: errors, one request and its log line, the retry policy
# ---------------------------------------------------------------------------------------------


def error_body(message: str, type: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, which the SDK and the agent read."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def refusal_body(status: int, message: str) -> dict[str, Any]:
    """A request refused here (the Guard's, read_body's): OpenAI's shape; the status says which."""
    return error_body(message, OPENAI_INVALID_REQUEST, None)


class UpstreamError(Exception):
    """The upstream could not be reached, went quiet, or broke its stream: this service's one error.

    `status` is what the client gets if nothing was sent yet: 502 (no connection, or it was cut)
    or 504 (a timeout). `retryable`: whether asking again could help.
    """

    def __init__(
        self, message: str, status: int = 502, code: str = ERR_LLM_UNAVAILABLE, retryable: bool = False
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retryable = retryable

    def body(self) -> dict[str, Any]:
        return error_body(self.message, UPSTREAM_ERROR, self.code)


class ClientGone(Exception):
    """The client hung up before its answer started."""


@dataclass
class Exchange:
    """One client request on its way upstream and back, followed to its one log line."""

    method: str
    path: str  # under the base URL, e.g. "/chat/completions"
    body: bytes | None = None  # sent upstream as the client sent it: nothing re-encoded or dropped
    stream: bool = False
    model: str = "-"
    request_id: str = field(default_factory=lambda: "proxy-" + uuid.uuid4().hex[:24])  # then the upstream's
    started: float = field(default_factory=time.monotonic)
    first_chunk_at: float | None = None  # a stream's first read, or a whole answer's arrival
    usage: dict[str, Any] | None = None  # {"prompt_tokens": int, "completion_tokens": int, ...}
    retries: int = 0

    def done(self, status: int, error: str = "") -> None:
        """Write the request's log line. status 499: the client went away (nginx's word for it)."""
        ttft = "-" if self.first_chunk_at is None else f"{self.first_chunk_at - self.started:.3f}s"
        tokens = "-"
        if isinstance(self.usage, dict):
            tokens = f"{self.usage.get('prompt_tokens', '?')}+{self.usage.get('completion_tokens', '?')}"
        log.info(
            "%s %s /v1%s model=%s status=%d ttft=%s tokens=%s duration=%.3fs retries=%d%s",
            self.request_id, self.method, self.path, self.model, status, ttft, tokens,
            time.monotonic() - self.started, self.retries, f" error={error!r}" if error else "",
        )  # fmt: skip


def should_retry(status: int, headers: Mapping[str, str]) -> bool:
    """x-should-retry decides when present; else 408, 409, 429 and 5xx are worth another try."""
    override = headers.get("x-should-retry")
    if override in ("true", "false"):
        return override == "true"
    return status in RETRY_STATUSES or status >= 500


def requested_delay(headers: Mapping[str, str]) -> float | None:
    """The wait the server asked for, in seconds: retry-after-ms, else Retry-After.

    NOTE: Retry-After's HTTP-date form is not read (OpenAI sends seconds); then the backoff rules.
    """
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            delay = float(headers.get(name, "")) * scale
        except ValueError:
            continue
        if math.isfinite(delay) and delay >= 0:
            return delay
    return None


def retry_delay(retry: int, headers: Mapping[str, str], settings: Settings) -> float | None:
    """Seconds to wait before retry number `retry` (1, 2, ...); None: the server asks too long.

    A server-requested delay is honoured as asked, up to RETRY_AFTER_CAP_S. Without one the backoff
    doubles from BACKOFF_BASE_S up to BACKOFF_CAP_S, times a random 0.5..1 (jitter: clients turned
    away together must not come back together).
    """
    asked = requested_delay(headers)
    if asked is not None:
        return asked if asked <= settings.retry_after_cap_s else None
    backoff = min(settings.backoff_cap_s, settings.backoff_base_s * 2.0 ** (retry - 1))
    return backoff * random.uniform(0.5, 1.0)


def upstream_headers(settings: Settings, stream: bool) -> dict[str, str]:
    """Built from scratch: nothing the client sent, its Authorization least of all, goes upstream."""
    headers = {"Accept": "text/event-stream" if stream else "application/json"}
    if settings.api_key:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    return headers


def passed_back(resp: aiohttp.ClientResponse, ex: Exchange) -> dict[str, str]:
    """The upstream headers the client gets too: x-request-id, retry and rate-limit hints."""
    headers = {"x-request-id": ex.request_id}
    for name, value in resp.headers.items():
        lower = name.lower()
        if lower in PASSED_BACK or lower.startswith("x-ratelimit-"):
            headers[lower] = value
    return headers


def error_kind(error: Any) -> str:
    """`type/code` of an upstream error object, for the log (its message may quote the key)."""
    if not isinstance(error, dict):
        return "malformed error object"
    return f"{error.get('type')}/{error.get('code')}"


def checked_chunk(data: str) -> dict[str, Any] | None:
    """One streamed event's data, parsed if it may carry usage or an error (else None).

    Anything that cannot be one JSON object raises UpstreamError naming what came instead.
    OpenAI writes `"usage":null` on every chunk but the last when usage was asked for; a
    server that writes it with a space gets every chunk parsed, which is only slower.
    """
    may_matter = '"error"' in data or ('"usage"' in data and '"usage":null' not in data)
    if not may_matter and data.startswith("{") and data.endswith("}"):  # the shape of an object: see choice 5
        return None
    chunk: Any = None
    with contextlib.suppress(ValueError, RecursionError):  # also parsed: what the shape test refused (' {...}')
        chunk = json.loads(data)
    if not isinstance(chunk, dict):
        message = f"the upstream sent a chunk that is not a JSON object: {data[:200]!r}"
        raise UpstreamError(message, code=ERR_LLM_STREAM)
    return chunk


# ---------------------------------------------------------------------------------------------
# The upstream: one attempt, the retry loop, the stream relay, a whole answer
# ---------------------------------------------------------------------------------------------


@dataclass
class UpstreamReply:
    """The upstream's answer to one attempt, as far as it was read before answering the client."""

    resp: aiohttp.ClientResponse  # status and headers; a stream's remaining body is read from it
    head: bytes  # a stream's first network read, or the whole body of any other answer
    streaming: bool  # True: a 200 stream, still open; False: read to the end and released


async def try_once(session: aiohttp.ClientSession, settings: Settings, ex: Exchange) -> UpstreamReply:
    """One attempt: send, then read what must be read before the client can be answered."""
    resp: aiohttp.ClientResponse | None = None
    waiting_for, limit = "first chunk", settings.first_chunk_timeout_s
    answered = False
    try:
        async with asyncio.timeout(limit):
            resp = await session.request(
                ex.method, settings.base_url + ex.path, data=ex.body,
                headers=upstream_headers(settings, ex.stream), allow_redirects=False,
            )  # fmt: skip
            if ex.stream and resp.status == 200:
                head = await resp.content.readany()
                if not head:
                    raise UpstreamError("the upstream closed the stream before its first chunk", retryable=True)
                answered = True
                return UpstreamReply(resp, head, streaming=True)
        waiting_for, limit = "rest of its answer", settings.idle_timeout_s
        async with asyncio.timeout(limit):
            head = await resp.read()
        resp.release()
        answered = True
        return UpstreamReply(resp, head, streaming=False)
    except aiohttp.ConnectionTimeoutError:
        message = f"could not connect to the upstream within {settings.connect_timeout_s:g}s"
        raise UpstreamError(message, 504, retryable=True) from None
    except aiohttp.ClientError as exc:  # refused, reset, DNS, TLS, a body cut short
        raise UpstreamError(f"upstream connection failed: {type(exc).__name__}: {exc}", retryable=True) from None
    except TimeoutError:  # one of the asyncio.timeout blocks above
        raise UpstreamError(f"the upstream sent no {waiting_for} within {limit:g}s", 504) from None
    finally:
        if resp is not None and not answered:  # failed, timed out or cancelled: abort the request
            resp.close()


async def open_upstream(session: aiohttp.ClientSession, settings: Settings, ex: Exchange) -> UpstreamReply:
    """Send the request, retrying what is worth retrying while nothing has gone to the client.

    Returns the last answer, which may be an error status for the client; raises UpstreamError
    when the last attempt got no answer at all.
    """
    while True:
        reply: UpstreamReply | None = None
        failure: UpstreamError | None = None
        try:
            reply = await try_once(session, settings, ex)
        except UpstreamError as exc:
            failure, reason = exc, exc.message
            delay = retry_delay(ex.retries + 1, {}, settings) if exc.retryable else None
        else:
            status, headers = reply.resp.status, reply.resp.headers
            ex.request_id = headers.get("x-request-id", ex.request_id)
            if status < 400:
                ex.first_chunk_at = time.monotonic()
                return reply
            reason = f"HTTP {status}"
            delay = retry_delay(ex.retries + 1, headers, settings) if should_retry(status, headers) else None

        too_late = delay is not None and time.monotonic() + delay - ex.started > settings.retry_budget_s
        if delay is None or too_late or ex.retries >= settings.max_retries:
            if failure is not None:
                raise failure
            assert reply is not None
            return reply
        ex.retries += 1
        log.warning("%s retry %d/%d in %.2fs after %s", ex.request_id, ex.retries, settings.max_retries, delay, reason)
        await asyncio.sleep(delay)


async def read_more(reads: AsyncIterator[bytes], idle_timeout_s: float) -> bytes:
    """The next network read of a started stream, or UpstreamError if it broke, ended or went quiet."""
    try:
        data = await anext(reads, b"")
    except TimeoutError:
        message = f"the upstream sent nothing for {idle_timeout_s:g}s mid-stream"
        raise UpstreamError(message, 504, ERR_LLM_STREAM) from None
    except aiohttp.ClientError as exc:
        message = f"the upstream connection broke mid-stream: {type(exc).__name__}: {exc}"
        raise UpstreamError(message, 502, ERR_LLM_STREAM) from None
    if not data:
        raise UpstreamError("the upstream ended the stream without data: [DONE]", 502, ERR_LLM_STREAM)
    return data


async def relay_stream(reply: UpstreamReply, ex: Exchange, idle_timeout_s: float) -> AsyncGenerator[bytes, None]:
    """Forward a started stream, one body write per network read; if it breaks, one error event.

    The aiohttp response is closed in `finally`: that is what aborts the upstream request when
    the client goes away (Starlette cancels us, or EventStreamResponse acloses us).
    """
    parser, data = SSEParser(), reply.head
    reads = read_chunks(reply.resp.content, idle_timeout_s)  # the upstream's network reads
    out: list[bytes] = []  # the bytes of this read for the client
    status, error = 499, "the client went away mid-stream"  # the outcome unless we get further
    try:
        yield b""  # proxy() primes the generator to here, so that aclose() always reaches `finally`
        while True:
            for event in parser.feed(data):
                if event.data == DONE_DATA:
                    status, error = 200, ""
                    yield b"".join(out) + DONE
                    return
                chunk = checked_chunk(event.data)
                out.append(encode_data(event.data))
                if chunk is None:  # a plain delta: nothing to read in it
                    continue
                if chunk.get("usage"):  # the include_usage chunk (choices: [])
                    ex.usage = chunk["usage"]
                if "error" in chunk:  # the upstream's own error event: forwarded, and the end
                    status, error = 502, f"the upstream sent an error event: {error_kind(chunk['error'])}"
                    yield b"".join(out)
                    return
            if out:
                yield b"".join(out)
                out = []
            data = await read_more(reads, idle_timeout_s)
    except UpstreamError as exc:
        status, error = exc.status, exc.message
        yield b"".join(out) + encode_data(dumps(exc.body()))
    finally:
        await reads.aclose()
        if status == 200:
            reply.resp.release()  # read to [DONE]: the connection may serve the next request
        else:
            reply.resp.close()  # anything else: abort the upstream request now
        ex.done(status, error)


def answer(reply: UpstreamReply, ex: Exchange) -> Response:
    """A whole (non-streamed) upstream answer, for the client: the same status and bytes.

    An error body not in OpenAI's shape (a load balancer's HTML page, say) is wrapped in it, so
    that every error the client sees reads the same way.
    """
    resp, body = reply.resp, reply.head
    parsed: Any = None
    with contextlib.suppress(ValueError):
        parsed = json.loads(body)
    if not isinstance(parsed, dict):
        parsed = {}
    if resp.status < 400:
        if isinstance(parsed.get("usage"), dict):
            ex.usage = parsed["usage"]
        ex.done(resp.status)
        return Response(body, resp.status, passed_back(resp, ex), media_type=resp.content_type)
    error = parsed.get("error")
    if not isinstance(error, dict):
        text = body.decode("utf-8", errors="replace")[:500]
        error = error_body(f"the upstream answered {resp.status}: {text}", UPSTREAM_ERROR, ERR_LLM)["error"]
        body = dumps({"error": error}).encode()
    ex.done(resp.status, f"upstream error {error_kind(error)}")
    return Response(body, resp.status, passed_back(resp, ex), media_type="application/json")


async def until_disconnected(request: Request) -> None:
    """Return when the client hangs up. Its body was read already, so nothing else can arrive."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Await `work`, cancelling it the moment the client hangs up (then raise ClientGone).

    Starlette notices a disconnect only while it streams a response. Before that (retries, a slow
    first token), this is what lets an agent's cancel abort the upstream request at once.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is shutting down: take the work with us
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait((task,))  # let its `finally` close the upstream connection
    raise ClientGone


# ---------------------------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------------------------


async def proxy(request: Request, ex: Exchange) -> Response:
    """Send one client request upstream and hand back the answer: streamed, whole, or an error."""
    settings: Settings = request.state.settings
    try:
        reply = await unless_disconnected(request, open_upstream(request.state.session, settings, ex))
    except UpstreamError as exc:
        ex.done(exc.status, exc.message)
        return JSONResponse(exc.body(), exc.status, headers={"x-request-id": ex.request_id})
    except ClientGone:
        ex.done(499, "the client went away before the first chunk")
        return Response(status_code=499)  # nobody reads it
    if not reply.streaming:
        return answer(reply, ex)
    relay = relay_stream(reply, ex, settings.idle_timeout_s)
    await anext(relay)  # start it: an async generator that never ran would skip its `finally`
    return EventStreamResponse(relay, headers=passed_back(reply.resp, ex))


def bad_request(ex: Exchange, message: str, param: str | None = None) -> JSONResponse:
    ex.done(400, message)
    return JSONResponse(error_body(message, OPENAI_INVALID_REQUEST, None, param), 400)


def refuse(ex: Exchange, problem: HttpProblem) -> Response:
    """A body refused before anything went upstream: its log line, and OpenAI's error body."""
    ex.done(problem.status, problem.message)
    return problem.response(refusal_body)


async def chat_completions(request: Request) -> Response:
    # {"model": str, "messages": [{"role": str, "content": ...}, ...], "stream"?: bool, ...}
    settings: Settings = request.state.settings
    ex = Exchange("POST", CHAT_COMPLETIONS_PATH)
    try:
        ex.body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
        body = parse_json(ex.body)
    except HttpProblem as problem:  # too big, too slow, not JSON, nested too deep, or the client left
        return refuse(ex, problem)
    if not isinstance(body, dict):
        return bad_request(ex, f"expected a JSON object as the request body, got {type(body).__name__}")
    model = body.get("model", "-")
    ex.model = clip(model, 60) if isinstance(model, str) else f"<{type(model).__name__}>"  # for the log line
    ex.stream = body.get("stream") is True
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        shown = "[]" if isinstance(messages, list) else type(messages).__name__  # not the value: it may be huge
        return bad_request(ex, f"'messages' must be a non-empty array, got {shown}", "messages")
    return await proxy(request, ex)


async def models(request: Request) -> Response:
    return await proxy(request, Exchange("GET", MODELS_PATH))


async def model(request: Request) -> Response:
    """GET /v1/models/{model}, for an id that is one plain path segment as the client wrote it."""
    raw_id = request.scope.get("raw_path", request.url.path.encode()).removeprefix(f"{OPENAI_PREFIX}{MODELS_PATH}/".encode())
    if MODEL_ID.fullmatch(raw_id) is None or b".." in raw_id:  # `%2e%2e` passed routing as `..`
        shown = clip(raw_id.decode("latin-1"), 60)
        message = f"not a model id: {shown!r}; expected up to 128 letters, digits, '.', '_', ':' or '-', and no '..'"
        return bad_request(Exchange("GET", f"{MODELS_PATH}/{shown}"), message, "model")
    return await proxy(request, Exchange("GET", f"{MODELS_PATH}/{raw_id.decode('ascii')}"))


async def no_route(request: Request, exc: HTTPException) -> Response:
    """404 and 405 in OpenAI's shape, naming what is forwarded: nothing else goes upstream."""
    method, path = request.method, clip(request.url.path, 60)
    log.info("%s %s status=%d error='not forwarded'", method, path, exc.status_code)
    message = f"{method} {path} is not forwarded; this proxy serves {ROUTES}"
    return JSONResponse(error_body(message, OPENAI_INVALID_REQUEST, None), exc.status_code, exc.headers)


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "upstream": request.state.settings.base_url})


# ---------------------------------------------------------------------------------------------
# App
# ---------------------------------------------------------------------------------------------


def create_app(settings: Settings) -> Starlette:
    """The proxy for `settings`. Nothing touches the network until a server starts it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        log.info("upstream %s (%s)", settings.base_url, "API key set" if settings.api_key else "no API key")
        log.info("clients: %s", "LLM_PROXY_KEY required" if settings.client_key else "loopback only, no key asked")
        # One session, one connection pool, for every request. No pool limit: a stream holds its
        # connection for as long as the model talks, and a limit would make the next agent wait.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
            yield {"session": session, "settings": settings}  # request.state.session, .settings

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route(OPENAI_PREFIX + CHAT_COMPLETIONS_PATH, chat_completions, methods=["POST"]),
        Route(OPENAI_PREFIX + MODELS_PATH, models, methods=["GET"]),
        Route(OPENAI_PREFIX + MODELS_PATH + "/{model}", model, methods=["GET"]),  # one segment: no `/`, even decoded from %2f
    ]
    guard = Middleware(
        Guard, hosts=settings.allowed_hosts, secret=settings.client_key or None, secret_name="LLM_PROXY_KEY",
        error_body=refusal_body,
    )  # fmt: skip
    handlers = {404: no_route, 405: no_route}
    return Starlette(routes=routes, middleware=[guard], exception_handlers=handlers, lifespan=lifespan)


app = create_app(Settings.from_env())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="OpenAI Chat Completions proxy: holds the API key, retries, times out, aborts on cancel.",
        epilog="Environment: OPENAI_API_KEY, OPENAI_BASE_URL (the upstream; default: OpenAI when a key is "
        f"set, else {FAKE_LLM_URL}), LLM_PROXY_KEY (required of clients when set; needed to listen on a "
        "non-loopback address), ALLOWED_HOSTS, and the LLM_PROXY_* knobs at the top of llm_proxy.py.",
    )
    parser.add_argument("--host", default=HOST, help="interface to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=PORT, help="port to listen on (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # access_log off: Exchange.done writes the one line per request, and uvicorn's would be written
    # on the way to every first token (before the response headers)
    serve(app, args.host, args.port, secret=LLM_PROXY_KEY, secret_name="LLM_PROXY_KEY", access_log=False)
