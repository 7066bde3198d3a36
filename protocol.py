"""protocol.py: every name, code and byte that crosses a wire in this project.

    IDE ⇄ gateway        JSON-RPC 2.0 over WebSocket, one JSON object per text frame
    gateway → agent      HTTP + Server-Sent Events (event: token | tool_call | final | error)
    agent → llm_proxy    OpenAI Chat Completions, streamed as `data: <json>` … `data: [DONE]`

The services import from here and spell nothing themselves: a port to another stack starts by
porting this file. It holds:

1. message names, error codes and the tool table (loaded from tools_spec.json);
2. JSON-RPC 2.0 framing: building messages and checking incoming frames at the edge;
3. the hand-rolled SSE encoder and an incremental SSE parser (WHATWG HTML, "Server-sent events",
   section 9.2.6 "Interpreting an event stream"), and read_chunks, a stream's reads under one
   idle timer;
4. EventStreamResponse, a Starlette streaming response that always closes its generator;
5. where a generated gateway token is left for ide.py;
6. who may call a service: the Guard middleware (Host, Origin, secret, body type), bounded
   request bodies (read_body), and serve(), uvicorn with a deadline for request heads.

Left out on purpose: batch JSON-RPC requests (an IDE has no use for them; a batch frame gets
-32600), SSE `retry:` (our clients do not reconnect on their own), and any schema library.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import re
import sys
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import h11
import uvicorn
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

# ---------------------------------------------------------------------------------------------
# 1. Names and codes
# ---------------------------------------------------------------------------------------------

JSONRPC_VERSION = "2.0"

# IDE -> gateway methods
USER_MESSAGE = "user_message"
CANCEL = "cancel"
RESUME = "resume"  # v2: {"session_id", "last_seq"} on a new socket takes a session back

# gateway -> IDE notifications; the same words name the agent's SSE events
TOKEN = "token"
FINAL = "final"
ERROR = "error"
TOOL_CALL = "tool_call"  # SSE only: the gateway turns it into a request named after the tool
SUPERSEDED = "superseded"  # SSE only: a newer stream took the session; the gateway closes with 4409
NOTIFICATIONS = (TOKEN, FINAL, ERROR)  # the events that carry the session's `seq`
RUN_EVENTS = (TOKEN, TOOL_CALL, FINAL, ERROR)

# gateway -> agent: paths and headers (v2)
RUNS_PATH = "/v1/runs"  # POST {"session_id", "run_id", "content"} -> the run's events
TOOL_RESULTS_PATH = "/v1/runs/{run_id}/tool_results"  # POST {"tool_call_id", "result" | "error"}
CANCEL_PATH = "/v1/runs/{run_id}/cancel"  # POST, no body
EVENTS_PATH = "/v1/sessions/{session_id}/events"  # GET with Last-Event-ID: replay, pending calls, live run
LAST_EVENT_ID = "Last-Event-ID"
RUN_ID_HEADER = "X-Run-Id"  # on an events stream: the run in progress, or empty
LAST_SEQ_HEADER = "X-Last-Seq"  # on an events stream: the newest seq the session has
HEARTBEAT_HEADER = "X-Heartbeat-S"  # on an events stream: the agent's longest silence; two missed beats = a broken stream
ATTACH_ID_HEADER = "X-Attach-Id"  # on an events stream: this stream's attach id; on a re-attach: the one it replaces
CANCELLING = "cancelling"  # the cancel endpoint's status: the final follows on the stream

# agent -> llm_proxy -> upstream: OpenAI's paths, under a base URL that ends in /v1
OPENAI_PREFIX = "/v1"  # llm_proxy and fake_llm serve under it; LLM_PROXY_URL and OPENAI_BASE_URL include it
CHAT_COMPLETIONS_PATH = "/chat/completions"
MODELS_PATH = "/models"

# final.status
COMPLETED = "completed"
CANCELLED = "cancelled"

# JSON-RPC 2.0 error codes (spec section 5.1) and this project's server errors (-32000..-32099)
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
RUN_IN_PROGRESS = -32000  # a user_message arrived while this socket's run is still going
NO_ACTIVE_RUN = -32001  # cancel named a run that is not running
UNKNOWN_SESSION = -32002  # resume: no such session, or it expired
SEQ_TOO_OLD = -32003  # resume: last_seq is older than what the session keeps; data {"oldest_seq"}

# WebSocket close codes (4000-4999 is the application range)
WS_NORMAL = 1000  # the IDE quits: its run is cancelled at once; any other ending only detaches it
WS_UNAUTHORIZED = 4401  # a missing or wrong token
WS_SUPERSEDED = 4409  # a newer socket resumed this session

# `code` of an `error` notification: a short, stable word a program can branch on.
ERR_LLM = "llm_error"  # the model's API answered with an error status
ERR_LLM_UNAVAILABLE = "llm_unavailable"  # the LLM proxy could not be reached
ERR_LLM_STREAM = "llm_stream_broken"  # the model's stream broke off or sent garbage
ERR_AGENT_UNAVAILABLE = "agent_unavailable"  # the gateway could not reach the agent
ERR_AGENT_STREAM = "agent_stream_broken"  # the agent's stream ended without final or error
ERR_MAX_STEPS = "max_steps_exceeded"  # the model kept calling tools past AGENT_MAX_STEPS
ERR_INTERNAL = "internal_error"  # a bug: the message says where to look
ERR_AGENT_LOST = "agent_lost"  # the agent process running the run died (REDIS_URL mode)
ERR_STORE = "store_unavailable"  # the agent's session store (Redis) cannot be reached
ERR_OUTPUT_LIMIT = "output_too_large"  # the run logged more than AGENT_MAX_RUN_BYTES
ERR_SESSION_BUSY = "session_busy"  # the session's previous run is still ending; send again

# `code` of a tool's error as the model reads it, when the agent (not the IDE) failed the call
TOOL_INVALID = "invalid_tool_call"  # unknown tool, arguments not a JSON object
TOOL_TIMEOUT = "tool_timeout"  # the IDE did not answer within TOOL_TIMEOUT_S

# ---------------------------------------------------------------------------------------------
# The tool table: tools_spec.json is the one source; the OpenAI name is derived from the IDE one.
# ---------------------------------------------------------------------------------------------

TOOLS_SPEC_PATH = Path(__file__).with_name("tools_spec.json")
TOOLS_SPEC: dict[str, Any] = json.loads(TOOLS_SPEC_PATH.read_text(encoding="utf-8"))
# {"error_codes": {name: int}, "tools": [{"method", "description", "parameters", "result", "errors"}]}
TOOL_ERRORS: dict[str, int] = TOOLS_SPEC["error_codes"]
TOOL_METHODS: tuple[str, ...] = tuple(tool["method"] for tool in TOOLS_SPEC["tools"])


def openai_tool_name(method: str) -> str:
    """`git.diff` -> `git_diff`: OpenAI function names must match ^[a-zA-Z0-9_-]{1,64}$."""
    return method.replace(".", "_")


OPENAI_TO_METHOD: dict[str, str] = {openai_tool_name(m): m for m in TOOL_METHODS}


def openai_tools() -> list[dict[str, Any]]:
    """The `tools` array of a Chat Completions request, built from tools_spec.json."""
    return [
        {
            "type": "function",
            "function": {
                "name": openai_tool_name(tool["method"]),
                "description": tool["description"],
                "parameters": tool["parameters"],
            },
        }
        for tool in TOOLS_SPEC["tools"]
    ]


# ---------------------------------------------------------------------------------------------
# 2. JSON-RPC 2.0
# ---------------------------------------------------------------------------------------------

JsonId = str | int | None


def dumps(obj: Any) -> str:
    """Compact JSON on one line: the form of every frame and every SSE data field here."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, legal as a JSON escape ("\ud800"): keep it escaped
        text = json.dumps(obj, separators=(",", ":"))
    return text


def request(id: JsonId, method: str, params: dict[str, Any]) -> str:
    return dumps({"jsonrpc": JSONRPC_VERSION, "id": id, "method": method, "params": params})


def notification(method: str, params: dict[str, Any]) -> str:
    return dumps({"jsonrpc": JSONRPC_VERSION, "method": method, "params": params})


def notification_relayed(method: str, params_json: str) -> str:
    """notification(method, json.loads(params_json)) without the decode and re-encode.

    The gateway relays the agent's event data as `params` unchanged (CONTRACT v2), so the data,
    already one compact JSON object, is placed whole. A port may write notification() instead.
    """
    return f'{{"jsonrpc":"{JSONRPC_VERSION}","method":"{method}","params":{params_json}}}'


def result(id: JsonId, value: Any) -> str:
    return dumps({"jsonrpc": JSONRPC_VERSION, "id": id, "result": value})


def error_object(code: int, message: str, data: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return err


def error_response(id: JsonId, code: int, message: str, data: Any = None) -> str:
    return dumps({"jsonrpc": JSONRPC_VERSION, "id": id, "error": error_object(code, message, data)})


class RpcError(Exception):
    """A frame we must answer with a JSON-RPC error; `id` is the request's, when we could read it."""

    def __init__(self, code: int, message: str, id: JsonId = None, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id
        self.data = data

    def response(self) -> str:
        return error_response(self.id, self.code, self.message, self.data)


@dataclass
class Message:
    """One checked incoming frame. kind is "request", "notification" or "response"."""

    kind: str
    id: JsonId = None
    method: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    result: Any = None
    error: dict[str, Any] | None = None  # {"code": int, "message": str, "data"?: any}


def parse_message(text: str | bytes) -> Message:
    """Check one frame against JSON-RPC 2.0; raise RpcError naming what was expected.

    Also accepts the design document's literal frame {"type": "user_message", "content": str}
    as a notification `user_message` (no id, so no result is sent back).
    """
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RpcError(PARSE_ERROR, f"Parse error: frame is not valid JSON ({exc})") from None
    except RecursionError:
        raise RpcError(PARSE_ERROR, "Parse error: frame is nested too deeply") from None
    if not isinstance(obj, dict):
        raise RpcError(INVALID_REQUEST, f"Invalid Request: expected a JSON object, got {type(obj).__name__}")
    if "jsonrpc" not in obj and obj.get("type") == USER_MESSAGE:  # the seed's frame
        return Message("notification", method=USER_MESSAGE, params={"content": obj.get("content")})

    id_ = obj.get("id")
    if not (id_ is None or isinstance(id_, str | int)) or isinstance(id_, bool):
        raise RpcError(INVALID_REQUEST, "Invalid Request: id must be a string, a number or null")
    if obj.get("jsonrpc") != JSONRPC_VERSION:
        raise RpcError(INVALID_REQUEST, f'Invalid Request: expected "jsonrpc": "2.0", got {obj.get("jsonrpc")!r}', id_)

    if "method" in obj:
        method = obj["method"]
        if not isinstance(method, str) or not method:
            raise RpcError(INVALID_REQUEST, "Invalid Request: method must be a non-empty string", id_)
        params = obj.get("params", {})
        if not isinstance(params, dict):
            raise RpcError(INVALID_PARAMS, "Invalid params: expected a JSON object (by-name params)", id_)
        return Message("request" if "id" in obj else "notification", id=id_, method=method, params=params)

    if "result" in obj and "error" not in obj:
        return Message("response", id=id_, result=obj["result"])
    if "error" in obj and "result" not in obj:
        err = obj["error"]
        code = err.get("code") if isinstance(err, dict) else None
        if not (isinstance(code, int) and not isinstance(code, bool) and isinstance(err.get("message"), str)):
            raise RpcError(INVALID_REQUEST, 'Invalid Request: error must be {"code": int, "message": str}', id_)
        return Message("response", id=id_, error=err)
    raise RpcError(INVALID_REQUEST, "Invalid Request: expected a method, or exactly one of result and error", id_)


# ---------------------------------------------------------------------------------------------
# 3. Server-Sent Events
# ---------------------------------------------------------------------------------------------

# Fields are always written in this order: event, id, data. Data is one line of JSON in this
# project, but the encoder still splits on line ends so that any text round-trips (up to the
# kind of line end: CR and CRLF come back as LF, since SSE cannot carry them).
HEARTBEAT = b": keep-alive\n\n"
DONE_DATA = "[DONE]"  # OpenAI's end-of-stream sentinel
DONE = b"data: [DONE]\n\n"
_TEXT_LINE_END = re.compile(r"\r\n|\r|\n")


def encode_event(data: str, event: str | None = None, id: str | int | None = None) -> bytes:
    """One SSE event as bytes on the wire: `event: E\\nid: N\\ndata: D\\n\\n`."""
    head = ""
    if event is not None:
        head += f"event: {event}\n"
    if id is not None:
        head += f"id: {id}\n"
    body = "".join(f"data: {line}\n" for line in _TEXT_LINE_END.split(data))
    return (head + body + "\n").encode("utf-8")


def json_event(event: str, obj: Any, id: int) -> bytes:
    """encode_event(dumps(obj), event, id), faster: compact JSON is one line, so nothing to split."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    try:
        return f"event: {event}\nid: {id}\ndata: {text}\n\n".encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: keep it escaped, as dumps() does
        return encode_event(dumps(obj), event, id)


def log_event(event: str, data: str, seq: int | None) -> bytes:
    """One event of a session's log on the wire: `id:` only on the events that carry a seq.

    `data` is already one line of compact JSON (the log keeps it encoded); a tool_call has no
    `id:`, so per WHATWG the stream's last event ID stays the seq before it.
    """
    if seq is None:
        return f"event: {event}\ndata: {data}\n\n".encode("utf-8")
    return f"event: {event}\nid: {seq}\ndata: {data}\n\n".encode("utf-8")


def encode_data(data: str) -> bytes:
    """A bare `data:` event, the only kind OpenAI's chat stream uses. `data` is one line (JSON)."""
    return b"data: " + data.encode("utf-8") + b"\n\n"


@dataclass
class SSEEvent:
    event: str = "message"
    data: str = ""
    id: str | None = None


_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


class SSEParser:
    """Incremental parser: feed() the bytes of each network read, get back the complete events.

    Implements https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
    one branch per field. `retry` is parsed and ignored (see the module docstring).
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._first = True  # the BOM may only appear at the very start of the stream
        self._after_cr = False  # a CR ended the last read: an LF opening the next one belongs to it
        self._event = ""
        self._data: list[str] = []
        self._last_id: str | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not chunk:  # an empty read must not forget that the last one ended in CR
            return []
        if not (self._first or self._after_cr or self._data or self._event) and b"\r" not in chunk:
            return self._feed_blocks(chunk)
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._after_cr = chunk.endswith(b"\r")
        buffer = self._buffer + chunk
        if self._first:
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):  # wait: may be a split BOM
                self._buffer = buffer
                return []
            self._first = False
            if buffer.startswith(_BOM):  # NOTE: per spec, one leading BOM is dropped
                buffer = buffer[len(_BOM) :]
        *lines, self._buffer = _LINE_END.split(buffer)
        events: list[SSEEvent] = []
        for raw in lines:
            event = self._line(raw.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        return events

    def _feed_blocks(self, chunk: bytes) -> list[SSEEvent]:
        """feed() for the common read: LF line ends only, and no event half-parsed.

        Same events as the line-by-line path, at a fraction of its cost on a fast stream: one
        split per read and one decode per event. An event that is a single `data: ` line (every
        OpenAI chunk, every event of ours) is taken whole; any other goes through _line. After
        the last blank line, complete lines go through _line at once (so that an event spread
        over many reads is never split again) and only a partial line waits in the buffer.
        """
        *blocks, rest = (self._buffer + chunk).split(b"\n\n")
        *lines, self._buffer = rest.split(b"\n")  # a half-parsed event sends the next read down the line path
        events: list[SSEEvent] = []
        for block in blocks:
            if block.startswith(b"data: ") and b"\n" not in block:
                events.append(SSEEvent(data=block[6:].decode("utf-8", errors="replace"), id=self._last_id))
                continue
            for raw in (*block.split(b"\n"), b""):  # the b"": the blank line that ended the block
                event = self._line(raw.decode("utf-8", errors="replace"))
                if event is not None:
                    events.append(event)
        for raw in lines:
            event = self._line(raw.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if not line:  # a blank line dispatches the event
            return self._dispatch()
        if line.startswith(":"):  # a comment (our heartbeat)
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):  # NOTE: per spec, only one leading space is stripped
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:  # NOTE: per spec, an id holding NULL is ignored
                self._last_id = value
        # "retry" and unknown field names are ignored, per spec
        return None

    def _dispatch(self) -> SSEEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:  # NOTE: per spec, an event with no data field is dropped
            return None
        return SSEEvent(event=event or "message", data="\n".join(data), id=self._last_id)


async def iter_sse(chunks: AsyncIterable[bytes]) -> AsyncIterator[list[SSEEvent]]:
    """Yield the events completed by each network read, as one list per read.

    A list, not one event at a time, so that a reader can coalesce what arrived together.
    """
    parser = SSEParser()
    async for chunk in chunks:
        events = parser.feed(chunk)
        if events:
            yield events


class StreamContent(Protocol):
    """What read_chunks needs of a response body: aiohttp's StreamReader (`response.content`)."""

    total_bytes: int  # bytes received so far

    async def readany(self) -> bytes: ...
    def set_exception(self, exc: BaseException) -> None: ...


async def read_chunks(content: StreamContent, idle_timeout_s: float) -> AsyncGenerator[bytes, None]:
    """The body's network reads until it ends; TimeoutError when one read waits idle_timeout_s.

    What aiohttp's `sock_read` timeout does, for a fraction of its cost on a busy stream: that
    one re-arms a timer on every network read (16 to 23% of the gateway's and the agent's CPU
    at 1,000 streams). Here one timer per stream wakes once per idle_timeout_s, and fails the
    read only if it has been waiting all that time with nothing arriving (bytes that came in
    the same loop turn as the timer count: a busy loop must not fail a stream that talks); the
    caller's own time between reads does not count. Close the generator when done with it
    early (contextlib.aclosing), or its timer lives on until the garbage collector finalizes it.
    """
    loop = asyncio.get_running_loop()
    waiting_since: float | None = None  # set while a read is waiting for the network
    received = 0  # content.total_bytes when that read started

    def check() -> None:
        nonlocal timer
        now = loop.time()
        if waiting_since is None or content.total_bytes != received:  # not reading, or bytes on their way to the read
            timer = loop.call_at(now + idle_timeout_s, check)
        elif now - waiting_since < idle_timeout_s:
            timer = loop.call_at(waiting_since + idle_timeout_s, check)
        else:
            content.set_exception(TimeoutError(f"no data for {idle_timeout_s:g} s"))  # the waiting read raises it

    timer = loop.call_at(loop.time() + idle_timeout_s, check)
    try:
        while True:
            waiting_since, received = loop.time(), content.total_bytes
            data = await content.readany()
            waiting_since = None
            if not data:
                return
            yield data
    finally:
        timer.cancel()


# ---------------------------------------------------------------------------------------------
# 4. EventStreamResponse
# ---------------------------------------------------------------------------------------------

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventStreamResponse(StreamingResponse):
    """text/event-stream that closes its generator however the response ends.

    Starlette cancels the sending task when the client disconnects; if that happens while the
    generator is parked at a `yield`, the generator is left suspended and its `finally` (which
    closes an upstream connection, or cancels a run) would wait for the garbage collector. The
    explicit aclose() here runs it at once.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncGenerator[bytes, None], headers: dict[str, str] | None = None,
                 on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(content, headers={**SSE_HEADERS, **(headers or {})})
        self._generator = content
        self._on_close = on_close  # runs even if the generator never started (a client gone before the first byte)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._generator.aclose()
            if self._on_close is not None:
                await self._on_close()


# ---------------------------------------------------------------------------------------------
# 5. Where a generated gateway token is left for ide.py (the way Jupyter leaves its URL)
# ---------------------------------------------------------------------------------------------


def runtime_dir() -> Path:
    """$GATEWAY_RUNTIME_DIR, else $XDG_RUNTIME_DIR/refagent, else ~/.cache/refagent."""
    if os.environ.get("GATEWAY_RUNTIME_DIR"):
        return Path(os.environ["GATEWAY_RUNTIME_DIR"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "refagent"
    return Path.home() / ".cache" / "refagent"


def token_file(port: int) -> Path:
    """The file (mode 0600) holding {"url", "token", "pid"} of the gateway listening on `port`."""
    return runtime_dir() / f"gateway-{port}.json"


# ---------------------------------------------------------------------------------------------
# 6. Who may call a service: the Guard, bounded request bodies, serve()
# ---------------------------------------------------------------------------------------------
#
# Every service listens on loopback, yet two kinds of caller reach it there besides its own
# clients. A web page the user opens can send "simple" cross-site requests (a text/plain POST
# needs no CORS preflight) and, with DNS rebinding (evil.example re-resolved to 127.0.0.1), read
# the answers. Any process on the machine can connect, and so can any host once a service is
# bound to another address. What stops each, in the order the Guard checks:
#
#   Host       must name loopback (or an ALLOWED_HOSTS entry): a rebound page sends its own name.
#   client     with no secret set, only a loopback peer is served (Redis's protected mode).
#   Origin     absent (not a browser) or allowed: browsers send it on every cross-site request.
#   secret     `Authorization: Bearer <secret>` when the service has one.
#   body type  a body must be application/json: a form or a text/plain POST cannot be.
#
# Sizes and times are bounded too: read_body() for a body, serve() for the request head.

# Settings every service reads (README's configuration table): spelled here, once.
# ALLOWED_HOSTS: extra Host names (no port), comma-separated, e.g. "agent.internal,10.0.0.5"; "*": any
ALLOWED_HOSTS = frozenset(h.strip().lower() for h in os.environ.get("ALLOWED_HOSTS", "").split(",") if h.strip())
HEADER_TIMEOUT_S = float(os.environ.get("HEADER_TIMEOUT_S", "10"))  # a request head must arrive within this
BODY_TIMEOUT_S = float(os.environ.get("BODY_TIMEOUT_S", "30"))  # a request body must arrive within this
MAX_CONNECTIONS = int(os.environ.get("MAX_CONNECTIONS", "0"))  # open connections before 503s; 0 = no cap

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})  # Host names always allowed, any port
OPEN_PATHS = frozenset({"/healthz"})  # served without the secret (still Host-, client- and Origin-checked)
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[^:\[\]@/\s]+)(?::\d*)?")  # RFC 9110 Host: name or [IPv6], then :port
log_guard = logging.getLogger("guard")

# The body of an error answer, in the service's own shape: (status, message) -> JSON object.
ErrorBody = Callable[[int, str], dict[str, Any]]


def status_error_body(status: int, message: str) -> dict[str, Any]:
    """{"error": {"status", "message"}}: the agent's shape, and the Guard's default."""
    return {"error": {"status": status, "message": message}}


def clip(text: str, limit: int = 100) -> str:
    """`text` cut to `limit` characters, for a log line or a message: headers can be 16 KiB long."""
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8, ::1 (and ::ffff:127.x): addresses only this machine reaches."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:  # another name: it may resolve anywhere
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1, an IPv4 peer on a dual-stack socket
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


class HttpProblem(Exception):
    """A request this service refuses: the status, and a message saying what was expected and what came."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    def response(self, error_body: ErrorBody = status_error_body) -> JSONResponse:
        """The answer. `Connection: close`: a body left unread is then not read to its end."""
        return JSONResponse(error_body(self.status, self.message), self.status, {**self.headers, "Connection": "close"})


class ClientHungUp(HttpProblem):
    """The client hung up before its body arrived: nobody reads the answer; the service logs one line."""

    def __init__(self) -> None:
        super().__init__(499, "the client hung up before its request body arrived")  # 499: nginx's word for it


class Guard:
    """ASGI middleware: refuses, before the app sees it, any request or WebSocket handshake that
    a web page or another host could have sent (the checks above). The app runs only for the rest.

    hosts         extra Host names (ALLOWED_HOSTS), on top of LOOPBACK_HOSTS.
    origins       Origin values allowed, e.g. {"https://ide.example"}; empty: no web page at all.
    same_origin   also allow an Origin that is this very server as the Host names it (the gateway).
    secret        the Bearer token every request needs, except on OPEN_PATHS; None: none needed,
                  and then only loopback peers are served unless `protected` is False.
    secret_name   the setting that holds it, for messages (LLM_PROXY_KEY, AGENT_TOKEN).
    protected     False for a service that checks its own credentials (the gateway's token).
    error_body    the service's error shape (OpenAI's for llm_proxy).

    A refused handshake is answered 403 (401 for the secret) as plain HTTP: with the ASGI
    WebSocket denial-response extension when the server has it (uvicorn does), else by closing
    before accept, which the server turns into a 403.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        hosts: frozenset[str] = frozenset(),
        origins: frozenset[str] = frozenset(),
        same_origin: bool = False,
        secret: str | None = None,
        secret_name: str = "the service's secret",
        protected: bool = True,
        error_body: ErrorBody = status_error_body,
    ) -> None:
        self.app = app
        self.hosts = LOOPBACK_HOSTS | {h.lower() for h in hosts}
        self.origins = {o.strip().lower().rstrip("/") for o in origins}
        self.same_origin = same_origin
        self.secret = secret.encode("utf-8") if secret else None
        self.secret_name = secret_name
        self.protected = protected
        self.error_body = error_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        try:
            self.check(scope)
        except HttpProblem as problem:
            client = scope.get("client") or ("-", 0)
            method = scope.get("method", "WEBSOCKET")
            log_guard.warning("refused %s %s from %s: %d %s", method, clip(scope["path"]), client[0], problem.status, problem.message)
            if scope["type"] == "http" or "websocket.http.response" in scope.get("extensions", {}):
                await problem.response(self.error_body)(scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": 1008})  # before accept: the server answers 403
            return
        await self.app(scope, receive, send)

    def check(self, scope: Scope) -> None:
        """Raise HttpProblem for the first check the request fails; return if it passes them all."""
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        match = _HOST.fullmatch(host.lower())
        if match is None or not (match.group(1) in self.hosts or "*" in self.hosts):
            raise HttpProblem(403, f"Host {clip(host)!r} is not allowed: expected localhost, 127.0.0.1 or [::1] (any port), or a name in ALLOWED_HOSTS")
        peer = (scope.get("client") or ("",))[0]
        if self.secret is None and self.protected and scope.get("client") and not is_loopback(peer):
            raise HttpProblem(403, f"{self.secret_name} is not set, so this service serves loopback clients only, not {peer}")
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin.lower(), host.lower(), scope.get("scheme", "http")):
            raise HttpProblem(403, f"Origin {clip(origin)!r} may not call this service")
        if self.secret is not None and scope["path"] not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"), self.secret):
                raise HttpProblem(401, f"expected Authorization: Bearer <{self.secret_name}>", {"WWW-Authenticate": "Bearer"})
        if scope["type"] == "http" and (headers.get("content-length", "0") != "0" or "transfer-encoding" in headers):
            media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
            if media_type != "application/json":
                raise HttpProblem(415, f"expected a body of Content-Type: application/json, got {clip(headers.get('content-type', 'none'))!r}")

    def origin_allowed(self, origin: str, host: str, scheme: str) -> bool:
        """In `origins`, or (same_origin) this server itself: scheme://Host as the request names it."""
        own = ("https" if scheme in ("https", "wss") else "http") + "://" + host
        return origin in self.origins or (self.same_origin and origin == own)


async def read_body(request: Request, max_bytes: int, timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    """The request body, at most `max_bytes`, all of it within `timeout_s`; else HttpProblem.

    413 at once when Content-Length says too much (nothing is read), or as soon as a body without
    one (chunked) passes the limit; 408 when it is too slow; ClientHungUp when the client leaves.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise HttpProblem(413, f"the request body is {declared} bytes, over the limit of {max_bytes}")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise HttpProblem(413, f"the request body is over the limit of {max_bytes} bytes")
    except TimeoutError:
        raise HttpProblem(408, f"the request body did not arrive within {timeout_s:g} s") from None
    except ClientDisconnect:
        raise ClientHungUp() from None
    return bytes(body)


def parse_json(body: bytes) -> Any:
    """The body as JSON, or HttpProblem 400 saying why not (nested too deep included: no traceback)."""
    try:
        return json.loads(body)
    except ValueError as exc:  # UnicodeDecodeError included
        raise HttpProblem(400, f"the request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise HttpProblem(400, "the request body is JSON nested too deeply") from None


async def read_json_body(request: Request, max_bytes: int, timeout_s: float = BODY_TIMEOUT_S) -> Any:
    """parse_json(read_body(...)): the body as JSON, bounded in size and time."""
    return parse_json(await read_body(request, max_bytes, timeout_s))


REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"  # a head cut short


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus the one timeout it lacks: HEADER_TIMEOUT_S for a request head.

    uvicorn closes a keep-alive connection left idle after a response, but holds a new connection,
    or one that trickles its head a byte at a time, for as long as the client likes: 200 of them
    use up a low file-descriptor limit (slowloris). Here a connection is closed (with a 408 if
    part of a head came) when no complete head has arrived head_timeout_s after it opened or after
    the previous response. The timer stops once a head is complete, so a slow body (read_body's
    own limit), a long SSE stream or a WebSocket the head upgraded is never cut by it.
    """

    head_timeout_s: float = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.head_timer: asyncio.TimerHandle | None = self.loop.call_later(self.head_timeout_s, self.head_overdue)

    def handle_events(self) -> None:
        super().handle_events()
        waiting_for_head = self.conn.their_state is h11.IDLE
        if not waiting_for_head and self.head_timer is not None:  # a head arrived (or the connection ended)
            self.head_timer.cancel()
            self.head_timer = None
        elif waiting_for_head and self.head_timer is None:  # a response ended: the next head's turn
            self.head_timer = self.loop.call_later(self.head_timeout_s, self.head_overdue)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        super().connection_lost(exc)

    def head_overdue(self) -> None:
        self.head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # part of a head came: say why before closing
            self.transport.write(REQUEST_TIMEOUT)
        self.logger.info("%s - closed: no complete request head within %g s", self.client and self.client[0], self.head_timeout_s)
        self.transport.close()


def serve(app: ASGIApp | str, host: str, port: int, *, secret: str, secret_name: str, **uvicorn_options: Any) -> None:
    """uvicorn.run() as every service runs: request heads under HEADER_TIMEOUT_S, connections
    capped at MAX_CONNECTIONS, and no start on a non-loopback address without the service's
    secret (exit status 2), as Redis's protected mode refuses. Other uvicorn options pass through.
    """
    if not secret and not is_loopback(host):
        print(
            f"refusing to listen on {host}:{port} without {secret_name}: any host that reaches this address "
            f"could use the service. Set {secret_name} (its clients send it as Authorization: Bearer), "
            "or listen on 127.0.0.1.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    uvicorn.run(app, host=host, port=port, http=HeadTimeoutProtocol, limit_concurrency=MAX_CONNECTIONS or None, **uvicorn_options)
