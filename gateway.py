"""gateway.py: the IDE's one door, a WebSocket speaking JSON-RPC 2.0.

    IDE ⇄ [gateway] → agent → llm_proxy → LLM

Run:  python gateway.py [--host 127.0.0.1] [--port 8000]     or  uvicorn gateway:app --port 8000

A socket holds one session (one conversation) at a time. The gateway checks the token, answers
`user_message` at once with {"session_id", "run_id"}, opens `POST /v1/runs` on the agent and
relays its SSE events: `token`, `final` and `error` become notifications (their data, which
carries the session's `seq`, is relayed as `params` unchanged); `tool_call` becomes a JSON-RPC
request to the IDE named after the tool, whose response is posted back to the agent.

A session outlives its socket (CONTRACT v2). `resume {"session_id", "last_seq"}` on any socket of
any gateway re-attaches with `GET /v1/sessions/{id}/events`: the missed notifications, the tool
requests still waiting (original ids), then the live run. The gateway keeps nothing a resume on
another gateway would need: all of it is in the agent's session log. A close with code 1000
cancels the socket's run; any other ending only detaches it (the agent cancels it after
RESUME_GRACE_S if nobody resumes). A newer socket resuming the session closes this one with 4409.

Auth: `Authorization: Bearer <token>` or `?token=`. With GATEWAY_TOKEN unset a random token is
made at start and written, mode 0600, to protocol.token_file(port) for ide.py to find; its path
is logged, never the token. A bad token gets the socket closed with 4401 before any frame is read.

Left out: several sessions per socket, rate limits, TLS (run it behind a proxy that terminates
TLS if it must leave localhost).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from protocol import (
    ALLOWED_HOSTS,
    ATTACH_ID_HEADER,
    CANCEL,
    CANCEL_PATH,
    CANCELLING,
    ERR_AGENT_STREAM,
    ERR_AGENT_UNAVAILABLE,
    ERR_INTERNAL,
    ERR_SESSION_BUSY,
    ERR_STORE,
    ERROR,
    EVENTS_PATH,
    HEARTBEAT_HEADER,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    LAST_EVENT_ID,
    LAST_SEQ_HEADER,
    METHOD_NOT_FOUND,
    NO_ACTIVE_RUN,
    NOTIFICATIONS,
    RESUME,
    RUN_ID_HEADER,
    RUN_IN_PROGRESS,
    RUNS_PATH,
    SEQ_TOO_OLD,
    SUPERSEDED,
    TOKEN,
    TOOL_CALL,
    TOOL_RESULTS_PATH,
    UNKNOWN_SESSION,
    USER_MESSAGE,
    WS_NORMAL,
    WS_SUPERSEDED,
    WS_UNAUTHORIZED,
    Guard,
    Message,
    RpcError,
    SSEEvent,
    clip,
    iter_sse,
    notification,
    notification_relayed,
    parse_message,
    read_chunks,
    request,
    result,
    serve,
    token_file,
)

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

AGENT_URL = os.environ.get("AGENT_URL", "http://127.0.0.1:8001")  # the agent runtime's base URL (or a balancer)
MAX_FRAME_BYTES = int(os.environ.get("GATEWAY_MAX_FRAME_BYTES", str(1024 * 1024)))  # larger frames close the socket (1009)
AGENT_CONNECT_TIMEOUT_S = float(os.environ.get("AGENT_CONNECT_TIMEOUT_S", "5"))  # reaching the agent
AGENT_READ_TIMEOUT_S = float(os.environ.get("AGENT_READ_TIMEOUT_S", "60"))  # agent silence, at most; see Link.silence_s
REATTACH_TRIES = 2  # a broken agent stream is re-attached this many times in a row without progress before the gateway reports it
REATTACH_BACKOFF_S = 0.25  # wait before the second re-attach in a row (then twice that, ...)
SESSION_BUSY_WAIT_S = 3.0  # a user_message waits this long for the session's previous run to finish ending
AGENT_TOKEN = os.environ.get("AGENT_TOKEN", "")  # sent to the agent as Authorization: Bearer <it>, when set
# Origins a browser IDE may connect from, comma-separated (https://ide.example); the gateway's own is always allowed
GATEWAY_ALLOWED_ORIGINS = frozenset(o.strip() for o in os.environ.get("GATEWAY_ALLOWED_ORIGINS", "").split(",") if o.strip())

SHORT_CALL = aiohttp.ClientTimeout(total=AGENT_READ_TIMEOUT_S, connect=AGENT_CONNECT_TIMEOUT_S)  # tool results, cancel
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")  # the agent's id rule: a session id must match it

log = logging.getLogger("gateway")


# ---------------------------------------------------------------------------------------------
# One socket: the session it holds and the run it relays
# ---------------------------------------------------------------------------------------------


class AgentFailed(Exception):
    """The agent answered, but not with a stream: why, and whether sending again can help."""

    def __init__(self, message: str, retryable: bool, code: str = ERR_AGENT_UNAVAILABLE) -> None:
        super().__init__(message)
        self.message, self.retryable, self.code = message, retryable, code


class StreamBroke(Exception):
    """The agent's stream ended before the run's final or error: re-attach, then report."""

    def __init__(self, message: str, code: str = ERR_AGENT_STREAM) -> None:
        super().__init__(message)
        self.message, self.code = message, code


class Superseded(Exception):
    """A newer socket resumed this session."""


@dataclass
class Relay:
    """The run this socket relays, from user_message or resume until its final or error reaches the IDE."""

    run_id: str | None  # None: a resume of a session with no run in progress (replay only)
    task: asyncio.Task[None] | None = None
    tool_calls: set[str] = field(default_factory=set)  # ids of tool requests the IDE still owes
    cancel_sent: bool = False  # the IDE asked to cancel; sent again once the agent has the run


@dataclass
class Link:
    """The state of one IDE connection: which session it holds, and its relay, if a run is going."""

    ws: WebSocket
    http: aiohttp.ClientSession
    session_id: str | None = None  # set by the first user_message or a resume
    last_seq: int = 0  # the newest seq relayed to the IDE: where a re-attach starts
    attach_id: str = ""  # the agent's id for this socket's newest stream: the session is ours while it is the holder
    heartbeat_s: float | None = None  # the agent's beat, as its last stream said (X-Heartbeat-S)

    @property
    def silence_s(self) -> float:
        """How long the agent may say nothing: two missed heartbeats (a frozen replica sends no
        reset, so silence is all there is to go by), and never more than AGENT_READ_TIMEOUT_S."""
        if self.heartbeat_s is None:
            return AGENT_READ_TIMEOUT_S
        return min(AGENT_READ_TIMEOUT_S, 2 * self.heartbeat_s + 1)
    relay: Relay | None = None

    async def handle(self, message: Message) -> None:
        """Act on one checked frame from the IDE; raise RpcError for what deserves an answer."""
        if message.kind == "response":
            await self.tool_response(message)
        elif message.method == USER_MESSAGE:
            await self.user_message(message)
        elif message.method == CANCEL:
            await self.cancel(message)
        elif message.method == RESUME:
            await self.resume(message)
        else:
            raise RpcError(METHOD_NOT_FOUND, f"Method not found: {message.method[:100]!r}; expected {USER_MESSAGE!r}, {CANCEL!r} or {RESUME!r}", message.id)

    async def settle_replay(self) -> None:
        """A resume's replay still draining (no run in progress): let its notifications come first."""
        if self.relay is not None and self.relay.run_id is None and self.relay.task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.relay.task), AGENT_READ_TIMEOUT_S)

    async def user_message(self, message: Message) -> None:
        content = message.params.get("content")
        if not isinstance(content, str) or not content.strip():
            raise RpcError(INVALID_PARAMS, 'Invalid params: user_message needs {"content": non-empty string}', message.id)
        await self.settle_replay()
        if self.relay is not None:
            raise RpcError(RUN_IN_PROGRESS, f"Run {self.relay.run_id} is still in progress; send cancel or wait for its final.", message.id, {"run_id": self.relay.run_id})
        self.session_id = self.session_id or "ses_" + secrets.token_hex(16)  # 128 random bits: with the token, the key to resume
        run_id = "run_" + secrets.token_hex(8)
        if message.kind == "request":
            await self.ws.send_text(result(message.id, {"session_id": self.session_id, "run_id": run_id}))
        self.relay = Relay(run_id)
        self.relay.task = asyncio.create_task(self.run_relay(self.relay, content=content))

    async def resume(self, message: Message) -> None:
        session_id, last_seq = message.params.get("session_id"), message.params.get("last_seq")
        if not (isinstance(session_id, str) and ID_PATTERN.fullmatch(session_id)) or not isinstance(last_seq, int) or isinstance(last_seq, bool) or last_seq < 0:
            raise RpcError(INVALID_PARAMS, 'Invalid params: resume needs {"session_id": str, "last_seq": int >= 0}', message.id)
        await self.settle_replay()
        if self.relay is not None:
            raise RpcError(RUN_IN_PROGRESS, f"Run {self.relay.run_id} is still in progress on this socket.", message.id, {"run_id": self.relay.run_id})
        try:
            response = await self.open_events(session_id, last_seq)  # no `previous`: a takeover, if another socket holds it
        except AgentFailed as exc:
            raise RpcError(INTERNAL_ERROR, exc.message, message.id, {"retryable": exc.retryable}) from None
        except UnknownSessionError:
            raise RpcError(UNKNOWN_SESSION, f"Unknown or expired session {session_id!r}.", message.id) from None
        except SeqTooOldError as exc:
            raise RpcError(SEQ_TOO_OLD, f"last_seq {last_seq} is older than what session {session_id!r} keeps.", message.id, {"oldest_seq": exc.oldest_seq}) from None
        run_id = response.headers.get(RUN_ID_HEADER) or None
        self.session_id, self.last_seq = session_id, last_seq
        try:
            await self.ws.send_text(result(message.id, {"session_id": session_id, "run_id": run_id, "last_seq": int(response.headers.get(LAST_SEQ_HEADER, last_seq))}))
        except BaseException:
            response.close()  # the IDE went away meanwhile: let the stream go now, not at garbage collection
            raise
        self.relay = Relay(run_id)
        self.relay.task = asyncio.create_task(self.run_relay(self.relay, response=response))

    async def run_relay(self, relay: Relay, content: str | None = None, response: aiohttp.ClientResponse | None = None) -> None:
        """Relay one run to the IDE until its final or error; the relay's whole life.

        The stream comes from `POST /v1/runs` (content) or a resume (response). When it breaks
        before the run's end, or cannot be re-opened, re-attach from the last seq relayed (any
        agent replica may answer), up to REATTACH_TRIES times in a row without progress; only
        then does the IDE get an error of the gateway's own (no seq), and the run is cancelled,
        so that gateway and agent agree it is over.
        """
        assert self.session_id is not None
        failure: AgentFailed | None = None
        try:
            if response is None:
                response = await self.open_run(relay, content or "")
            broken = 0
            while True:
                relayed = self.last_seq
                try:
                    if response is None:
                        response = await self.open_events(self.session_id, self.last_seq, previous=self.attach_id)
                    if await self.pump(relay, response):
                        return
                    raise StreamBroke("The agent's stream ended before the run's final or error.")
                except AgentFailed as exc:  # the re-attach itself failed: one more break
                    broke = StreamBroke(exc.message, exc.code if exc.code == ERR_STORE else ERR_AGENT_STREAM)
                except StreamBroke as exc:
                    broke = exc
                response = None
                broken = 1 if self.last_seq > relayed else broken + 1  # progress since the last break resets the count
                if broken > REATTACH_TRIES or relay.run_id is None:
                    raise AgentFailed(broke.message, True, broke.code)
                log.info("session %s: %s; re-attaching from seq %d", self.session_id, broke.message, self.last_seq)
                await asyncio.sleep(REATTACH_BACKOFF_S * (broken - 1))
        except AgentFailed as exc:
            failure = exc
        except (UnknownSessionError, SeqTooOldError):
            failure = AgentFailed("The agent no longer has this session: its run cannot be followed.", True, ERR_AGENT_STREAM)
        except Superseded:
            log.info("session %s: taken over by a newer socket", self.session_id)
            self.relay, self.session_id = None, None  # no longer ours: closing must not cancel anything
            with contextlib.suppress(RuntimeError, OSError):
                await self.ws.close(WS_SUPERSEDED, "session taken over: another connection resumed it")
        except (WebSocketDisconnect, OSError, RuntimeError):
            pass  # the IDE is gone: a detach; the agent's grace rule decides
        except Exception as exc:  # a bug: say so, rather than leave the IDE waiting
            log.exception("session %s: relay failed", self.session_id)
            failure = AgentFailed(f"Gateway bug: {exc!r}"[:500], False, ERR_INTERNAL)
        finally:
            if self.relay is relay:
                self.relay = None
        if failure is not None and relay.run_id is not None:
            log.warning("session %s run %s: %s: %s", self.session_id, relay.run_id, failure.code, failure.message)
            if failure.code in (ERR_AGENT_STREAM, ERR_STORE):  # we stop following it: stop it, so both sides agree it is over
                await self.post_agent(CANCEL_PATH.format(run_id=relay.run_id), {})
            with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):  # the IDE may be gone too
                await self.ws.send_text(notification(ERROR, {"run_id": relay.run_id, "code": failure.code, "message": failure.message, "retryable": failure.retryable}))

    async def open_run(self, relay: Relay, content: str) -> aiohttp.ClientResponse:
        body = {"session_id": self.session_id, "run_id": relay.run_id, "content": content}
        if self.attach_id:  # this socket held the session: the agent refuses if another socket took it since
            body["attach_id"] = self.attach_id
        deadline = asyncio.get_running_loop().time() + SESSION_BUSY_WAIT_S
        while True:
            response = await self.agent_stream("POST", RUNS_PATH, json=body)
            if response.status != 409:
                break
            text = await bounded_text(response)
            if '"superseded":true' in text:
                raise Superseded()
            if asyncio.get_running_loop().time() > deadline:
                raise AgentFailed(f"This session's previous run is still going; cancel it or send the message again later. ({text})", True, ERR_SESSION_BUSY)
            await asyncio.sleep(0.05)  # the session's previous run is still ending (a cancel on its way through the store)
        if response.status != 200:
            text = await bounded_text(response)
            raise AgentFailed(f"The agent refused the run: HTTP {response.status} {text}", response.status >= 500, ERR_STORE if response.status == 503 else ERR_AGENT_UNAVAILABLE)
        self.attach_id = response.headers.get(ATTACH_ID_HEADER, "")
        if relay.cancel_sent and relay.run_id:  # the cancel may have reached the agent before the run did
            await self.post_agent(CANCEL_PATH.format(run_id=relay.run_id), {})
        return response

    async def open_events(self, session_id: str, last_seq: int, previous: str = "") -> aiohttp.ClientResponse:
        """Attach to a session's events; `previous` names the stream a re-attach replaces (else: a takeover)."""
        headers = {LAST_EVENT_ID: str(last_seq), **({ATTACH_ID_HEADER: previous} if previous else {})}
        response = await self.agent_stream("GET", EVENTS_PATH.format(session_id=session_id), headers=headers)
        if response.status == 200:
            self.attach_id = response.headers.get(ATTACH_ID_HEADER, "")
            return response
        body = await bounded_text(response)
        if response.status == 404:
            raise UnknownSessionError()
        if response.status == 409 and '"superseded":true' in body:
            raise Superseded()
        if response.status == 410:
            try:
                oldest = json.loads(body)["error"]["oldest_seq"]
            except (ValueError, KeyError, TypeError):
                oldest = None
            raise SeqTooOldError(oldest)
        code = ERR_STORE if response.status == 503 else ERR_AGENT_UNAVAILABLE
        raise AgentFailed(f"The agent refused to re-attach: HTTP {response.status} {body}", response.status >= 500, code)

    async def agent_stream(self, method: str, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        """Open a stream on the agent; its transport errors become AgentFailed or StreamBroke."""
        silence_s = self.silence_s
        try:
            async with asyncio.timeout(silence_s):  # for the answer to start; then read_chunks times the body
                response = await self.http.request(method, AGENT_URL + path, **kwargs)
        except aiohttp.ClientConnectorError as exc:
            raise AgentFailed(f"Cannot reach the agent at {AGENT_URL}: {exc.os_error or exc}", True) from None
        except aiohttp.ConnectionTimeoutError:
            raise AgentFailed(f"Cannot reach the agent at {AGENT_URL} within {AGENT_CONNECT_TIMEOUT_S:g} s (AGENT_CONNECT_TIMEOUT_S).", True) from None
        except TimeoutError:
            raise AgentFailed(f"The agent did not answer within {silence_s:g} s (AGENT_READ_TIMEOUT_S, or two of its heartbeats).", True) from None
        except aiohttp.ClientError as exc:
            raise AgentFailed(f"The agent's answer broke off: {exc!r}", True) from None
        with contextlib.suppress(ValueError):
            self.heartbeat_s = float(response.headers[HEARTBEAT_HEADER]) if HEARTBEAT_HEADER in response.headers else self.heartbeat_s
        return response

    async def pump(self, relay: Relay, response: aiohttp.ClientResponse) -> bool:
        """Relay one stream's events; True once the run's final or error has reached the IDE."""
        silence_s = self.silence_s
        try:
            async with response, contextlib.aclosing(read_chunks(response.content, silence_s)) as reads:
                ended = False
                async for events in iter_sse(reads):
                    for event in events:  # after the end, read on to EOF: a fully read response frees its connection
                        if not ended:
                            ended = await self.relay_event(relay, event)
                return ended or relay.run_id is None
        except TimeoutError:
            raise StreamBroke(f"The agent sent nothing for {silence_s:g} s (AGENT_READ_TIMEOUT_S, or two of its heartbeats).") from None
        except (aiohttp.ClientError, ValueError, KeyError, TypeError) as exc:
            raise StreamBroke(f"The agent's stream broke off: {exc!r}") from None

    async def relay_event(self, relay: Relay, event: SSEEvent) -> bool:
        """Pass one agent event on to the IDE. True when it ends the run."""
        if event.event in NOTIFICATIONS:  # data: {"run_id", "seq", ...}, relayed as params unchanged
            if event.id:  # per WHATWG the last id seen; an error the agent could not log has none of its own
                self.last_seq = int(event.id)
            # a replay may hold earlier runs' finals: only this run's own end ends the relay
            ended = event.event != TOKEN and relay.run_id is not None and json.loads(event.data).get("run_id") == relay.run_id
            if ended and self.relay is relay:
                self.relay = None  # before the send: the IDE may answer the final with a new message at once
            await self.ws.send_text(notification_relayed(event.event, event.data))
            return ended
        if event.event == TOOL_CALL:  # {"id", "name", "arguments"}
            call = json.loads(event.data)
            relay.tool_calls.add(call["id"])
            await self.ws.send_text(request(call["id"], call["name"], call["arguments"]))
            return False
        if event.event == SUPERSEDED:
            raise Superseded()
        log.warning("ignoring unknown agent event %s", clip(repr(event.event)))
        return False

    async def tool_response(self, message: Message) -> None:
        """The IDE answered a tool request: hand it to the agent (the first answer per id wins there)."""
        relay = self.relay
        if relay is None or relay.run_id is None or not isinstance(message.id, str) or message.id not in relay.tool_calls:
            log.warning("session %s: response to an unknown request id %s ignored", self.session_id, clip(repr(message.id)))
            return
        relay.tool_calls.discard(message.id)
        body: dict[str, Any] = {"tool_call_id": message.id}
        body.update({"error": message.error} if message.error is not None else {"result": message.result})
        await self.post_agent(TOOL_RESULTS_PATH.format(run_id=relay.run_id), body)

    async def cancel(self, message: Message) -> None:
        relay = self.relay
        run_id = message.params.get("run_id", relay.run_id if relay else None)
        if relay is None or relay.run_id is None or run_id != relay.run_id:
            if message.kind == "request":
                raise RpcError(NO_ACTIVE_RUN, f"No run {clip(repr(run_id))} is in progress on this socket.", message.id)
            return
        relay.cancel_sent = True
        await self.post_agent(CANCEL_PATH.format(run_id=run_id), {})
        if message.kind == "request":
            await self.ws.send_text(result(message.id, {"run_id": run_id, "status": CANCELLING}))

    async def post_agent(self, path: str, body: dict[str, Any]) -> None:
        """A short call to the agent; failures are logged, the run's stream reports the rest."""
        try:
            async with self.http.post(AGENT_URL + path, json=body, timeout=SHORT_CALL) as response:
                if response.status != 200:
                    log.warning("agent %s answered %s: %s", path, response.status, await bounded_text(response))
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("agent %s failed: %r", path, exc)

    async def close(self, code: int | None) -> None:
        """The socket is gone. Code 1000: the IDE quit, so its run is cancelled; otherwise a detach."""
        relay = self.relay
        if relay is None:
            return
        if code == WS_NORMAL and relay.run_id is not None:
            await self.post_agent(CANCEL_PATH.format(run_id=relay.run_id), {})
        if relay.task is not None and not relay.task.done():
            relay.task.cancel()  # closes the SSE stream: a detach in the agent
            with contextlib.suppress(asyncio.CancelledError):
                await relay.task


class UnknownSessionError(Exception):
    pass


class SeqTooOldError(Exception):
    def __init__(self, oldest_seq: int | None) -> None:
        super().__init__(oldest_seq)
        self.oldest_seq = oldest_seq


async def bounded_text(response: aiohttp.ClientResponse) -> str:
    """The start of an error body, read with a bound on time and size."""
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        async with asyncio.timeout(AGENT_READ_TIMEOUT_S):
            return (await response.content.read(2000)).decode("utf-8", errors="replace")
    return ""


# ---------------------------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------------------------


class RedactQueries(logging.Filter):
    """uvicorn logs each WebSocket path with its query string: hide every query string whole,
    so a token is hidden however its name is spelled (`?token=`, `?%74oken=`, ...)."""

    PATTERN = re.compile(r"\?[^\s\"']*")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "?" in message:
            record.msg, record.args = self.PATTERN.sub("?[query hidden]", message), None
        return True


def presented_token(ws: WebSocket) -> str:
    header = ws.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return ws.query_params.get("token", "")


async def ws_endpoint(ws: WebSocket) -> None:
    await ws.accept()
    expected: str = ws.app.state.token
    if not hmac.compare_digest(presented_token(ws).encode(), expected.encode()):
        # accepted first so that browsers, which cannot read a refused handshake, see the reason
        await ws.close(WS_UNAUTHORIZED, "unauthorized: missing or wrong token (Authorization: Bearer <token> or ?token=)")
        return
    link = Link(ws, ws.app.state.http)
    code: int | None = None
    try:
        while True:
            frame = await ws.receive()
            if frame["type"] == "websocket.disconnect":
                code = frame.get("code")
                break
            text = frame.get("text")
            if text is None:
                text = (frame.get("bytes") or b"").decode("utf-8", errors="replace")
            try:
                if len(text) > MAX_FRAME_BYTES:  # uvicorn's ws_max_size bounds the bytes; this, text frames' chars
                    raise RpcError(INVALID_REQUEST, f"Invalid Request: frame is larger than {MAX_FRAME_BYTES} bytes (GATEWAY_MAX_FRAME_BYTES)")
                await link.handle(parse_message(text))
            except RpcError as exc:
                log.info("session %s: frame refused: %d %s", link.session_id, exc.code, exc.message[:200])
                await ws.send_text(exc.response())
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:  # a bug: answer, keep serving
                log.error("session %s: frame failed: %s", link.session_id, clip(repr(exc), 300))
                await ws.send_text(RpcError(INTERNAL_ERROR, f"Internal error: {exc!r}"[:500]).response())
    except WebSocketDisconnect as exc:
        code = exc.code
    finally:
        await link.close(code)
        log.info("session %s: socket closed (%s)", link.session_id, code)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok", "service": "gateway", "agent_url": AGENT_URL})


# ---------------------------------------------------------------------------------------------
# App
# ---------------------------------------------------------------------------------------------


def publish_token(port: int) -> str:
    """Make a token and leave it where only this user can read it (Jupyter's way)."""
    token = secrets.token_urlsafe(32)
    path = token_file(port)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": f"ws://127.0.0.1:{port}/ws", "token": token, "pid": os.getpid()}, f)
    log.warning("GATEWAY_TOKEN is not set: generated a token; ide.py reads it from %s", path)
    return token


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(RedactQueries())
    port = int(os.environ.get("GATEWAY_PORT", "8000"))  # set by __main__ / the Procfile; names the token file
    generated = not os.environ.get("GATEWAY_TOKEN")
    app.state.token = publish_token(port) if generated else os.environ["GATEWAY_TOKEN"]
    timeout = aiohttp.ClientTimeout(total=None, connect=AGENT_CONNECT_TIMEOUT_S)  # reads: see agent_stream
    headers = {"Authorization": f"Bearer {AGENT_TOKEN}"} if AGENT_TOKEN else {}
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0), headers=headers) as http:
        app.state.http = http
        try:
            yield
        finally:
            if generated:
                token_file(port).unlink(missing_ok=True)


app = Starlette(
    routes=[WebSocketRoute("/ws", ws_endpoint), Route("/healthz", healthz)],
    lifespan=lifespan,
    # protected=False: the gateway checks its own token (4401); same_origin: a browser IDE served by the gateway's host
    middleware=[Middleware(Guard, hosts=ALLOWED_HOSTS, origins=GATEWAY_ALLOWED_ORIGINS, same_origin=True, protected=False)],
)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The WebSocket gateway between the IDE and the agent runtime.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    args = parser.parse_args()
    os.environ["GATEWAY_PORT"] = str(args.port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # ws_max_size: a frame over the limit is refused while it arrives (close 1009), not after it is whole
    serve(app, args.host, args.port, secret=os.environ.get("GATEWAY_TOKEN", ""), secret_name="GATEWAY_TOKEN", log_level="info", ws_max_size=MAX_FRAME_BYTES)
