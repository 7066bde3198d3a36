"""gateway.py: the IDE's one door, a WebSocket speaking JSON-RPC 2.0.

    IDE ⇄ [gateway] → agent → llm_proxy → LLM

Run:  python gateway.py [--host 127.0.0.1] [--port 8000]     or  uvicorn gateway:app --port 8000

One WebSocket at `/ws` is one session (one conversation). The gateway checks the token, answers
`user_message` at once with {"session_id", "run_id"}, opens `POST /v1/runs` on the agent and
relays its SSE events: `token`, `final` and `error` become notifications (numbered by `seq`);
`tool_call` becomes a JSON-RPC request to the IDE named after the tool, whose response is posted
back to the agent. `cancel` and a closed socket both cancel the run in the agent.

Auth: `Authorization: Bearer <token>` or `?token=`. With GATEWAY_TOKEN unset a random token is
made at start and written, mode 0600, to protocol.token_file(port) for ide.py to find; its path
is logged, never the token. A bad token gets the socket closed with 4401 before any frame is read.

Left out: several sessions per socket, resuming a session after a reconnect, rate limits, TLS
(run it behind a proxy that terminates TLS if it must leave localhost).
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
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from protocol import (
    CANCEL,
    ERR_AGENT_STREAM,
    ERR_AGENT_UNAVAILABLE,
    ERROR,
    FINAL,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    NO_ACTIVE_RUN,
    RUN_IN_PROGRESS,
    TOKEN,
    TOOL_CALL,
    USER_MESSAGE,
    WS_UNAUTHORIZED,
    Message,
    RpcError,
    iter_sse,
    notification,
    notification_spliced,
    parse_message,
    read_chunks,
    request,
    result,
    token_file,
)

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

AGENT_URL = os.environ.get("AGENT_URL", "http://127.0.0.1:8001")  # the agent runtime's base URL
MAX_FRAME_BYTES = int(os.environ.get("GATEWAY_MAX_FRAME_BYTES", str(1024 * 1024)))  # larger frames get -32600
AGENT_CONNECT_TIMEOUT_S = float(os.environ.get("AGENT_CONNECT_TIMEOUT_S", "5"))  # reaching the agent
AGENT_READ_TIMEOUT_S = float(os.environ.get("AGENT_READ_TIMEOUT_S", "60"))  # agent silence; it beats every 15 s

SHORT_CALL = aiohttp.ClientTimeout(total=AGENT_READ_TIMEOUT_S, connect=AGENT_CONNECT_TIMEOUT_S)  # tool results, cancel

log = logging.getLogger("gateway")

# ---------------------------------------------------------------------------------------------
# One socket, one session
# ---------------------------------------------------------------------------------------------


@dataclass
class Session:
    """The state of one IDE connection. Only the relay task and the reader touch it."""

    ws: WebSocket
    http: aiohttp.ClientSession
    id: str = field(default_factory=lambda: "ses_" + uuid.uuid4().hex[:16])
    seq: int = 0
    run_id: str | None = None  # the run in progress, if any
    relay: asyncio.Task[None] | None = None
    running: bool = False  # from user_message until the run's final or error reached the IDE
    tool_calls: set[str] = field(default_factory=set)  # ids of tool requests the IDE still owes
    cancelled: str | None = None  # the run the IDE asked to cancel

    async def notify(self, method: str, params: dict[str, Any]) -> None:
        self.seq += 1
        await self.ws.send_text(notification(method, {**params, "seq": self.seq}))

    async def handle(self, message: Message) -> None:
        """Act on one checked frame from the IDE; raise RpcError for what deserves an answer."""
        if message.kind == "response":
            await self.tool_response(message)
        elif message.method == USER_MESSAGE:
            await self.user_message(message)
        elif message.method == CANCEL:
            await self.cancel(message)
        else:
            raise RpcError(METHOD_NOT_FOUND, f"Method not found: {message.method!r}; expected {USER_MESSAGE!r} or {CANCEL!r}", message.id)

    async def user_message(self, message: Message) -> None:
        content = message.params.get("content")
        if not isinstance(content, str) or not content.strip():
            raise RpcError(INVALID_PARAMS, 'Invalid params: user_message needs {"content": non-empty string}', message.id)
        if self.running:
            raise RpcError(RUN_IN_PROGRESS, f"Run {self.run_id} is still in progress; send cancel or wait for its final.", message.id, {"run_id": self.run_id})
        self.run_id = "run_" + uuid.uuid4().hex[:16]
        self.tool_calls.clear()
        if message.kind == "request":
            await self.ws.send_text(result(message.id, {"session_id": self.id, "run_id": self.run_id}))
        self.running = True
        self.relay = asyncio.create_task(self.relay_run(self.run_id, content))

    async def relay_run(self, run_id: str, content: str) -> None:
        """Stream one run from the agent to the IDE; always ends with one final or error."""
        try:
            if not await self.stream_from_agent(run_id, content):
                await self.fail(run_id, ERR_AGENT_STREAM, "The agent's stream ended without a final or error event.", True)
        except aiohttp.ClientConnectorError as exc:
            await self.fail(run_id, ERR_AGENT_UNAVAILABLE, f"Cannot reach the agent at {AGENT_URL}: {exc.os_error or exc}", True)
        except AgentFailed as exc:
            await self.fail(run_id, ERR_AGENT_UNAVAILABLE, str(exc), exc.retryable)
        except aiohttp.ConnectionTimeoutError:
            await self.fail(run_id, ERR_AGENT_UNAVAILABLE, f"Cannot reach the agent at {AGENT_URL} within {AGENT_CONNECT_TIMEOUT_S:g} s (AGENT_CONNECT_TIMEOUT_S).", True)
        except TimeoutError:  # before ClientError: aiohttp's own timeouts are both
            await self.fail(run_id, ERR_AGENT_STREAM, f"The agent sent nothing for {AGENT_READ_TIMEOUT_S:g} s (AGENT_READ_TIMEOUT_S).", True)
        except (aiohttp.ClientError, ValueError, KeyError) as exc:
            await self.fail(run_id, ERR_AGENT_STREAM, f"The agent's stream broke off: {exc!r}", True)
        except (WebSocketDisconnect, OSError, RuntimeError):
            pass  # the IDE is gone; close() cancels the run in the agent
        finally:
            self.running = False
            self.tool_calls.clear()

    async def stream_from_agent(self, run_id: str, content: str) -> bool:
        """Relay the agent's events until final or error; False if the stream ended before one."""
        body = {"session_id": self.id, "run_id": run_id, "content": content}
        async with asyncio.timeout(AGENT_READ_TIMEOUT_S):  # for the answer to start; then read_chunks times the body
            response = await self.http.post(f"{AGENT_URL}/v1/runs", json=body)
        async with response, contextlib.aclosing(read_chunks(response.content, AGENT_READ_TIMEOUT_S)) as reads:
            if response.status != 200:
                async with asyncio.timeout(AGENT_READ_TIMEOUT_S):  # the error body is read whole: bound it
                    text = await response.text()
                raise AgentFailed(f"The agent refused the run: HTTP {response.status} {text}", response.status >= 500)
            if self.cancelled == run_id:  # the cancel may have reached the agent before the run did
                await self.post_agent(f"/v1/runs/{run_id}/cancel", {})
            ended = False
            async for events in iter_sse(reads):
                for event in events:  # after the end, read on to EOF: a fully read response frees its connection
                    if not ended:
                        ended = await self.relay_event(event.event, event.data)
        return ended

    async def relay_event(self, event: str, data: str) -> bool:
        """Pass one agent event (its data: one JSON object) on to the IDE. True when it ends the run."""
        if event == TOKEN:  # {"run_id", "text"}: relayed as text, never decoded (see notification_spliced)
            self.seq += 1
            await self.ws.send_text(notification_spliced(TOKEN, data, self.seq))
            return False
        if event == TOOL_CALL:  # {"id", "name", "arguments"}
            call = json.loads(data)
            self.tool_calls.add(call["id"])
            await self.ws.send_text(request(call["id"], call["name"], call["arguments"]))
            return False
        if event in (FINAL, ERROR):
            self.running = False  # before the send: the IDE may answer the final with a new message at once
            await self.notify(event, json.loads(data))
            return True
        log.warning("ignoring unknown agent event %r", event)
        return False

    async def fail(self, run_id: str, code: str, message: str, retryable: bool) -> None:
        self.running = False
        log.warning("run %s: %s: %s", run_id, code, message)
        with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):  # the IDE may be gone too
            await self.notify(ERROR, {"run_id": run_id, "code": code, "message": message, "retryable": retryable})

    async def tool_response(self, message: Message) -> None:
        """The IDE answered a tool request: hand it to the agent."""
        if message.id not in self.tool_calls:
            log.warning("response to an unknown request id %r ignored", message.id)
            return
        self.tool_calls.discard(str(message.id))
        body: dict[str, Any] = {"tool_call_id": message.id}
        body.update({"error": message.error} if message.error is not None else {"result": message.result})
        await self.post_agent(f"/v1/runs/{self.run_id}/tool_results", body)

    async def cancel(self, message: Message) -> None:
        run_id = message.params.get("run_id", self.run_id)
        if not self.running or run_id != self.run_id:
            if message.kind == "request":
                raise RpcError(NO_ACTIVE_RUN, f"No run {run_id!r} is in progress on this socket.", message.id)
            return
        self.cancelled = run_id
        await self.post_agent(f"/v1/runs/{run_id}/cancel", {})
        if message.kind == "request":
            await self.ws.send_text(result(message.id, {"run_id": run_id, "status": "cancelling"}))

    async def post_agent(self, path: str, body: dict[str, Any]) -> None:
        """A short call to the agent; failures are logged, the run's stream reports the rest."""
        try:
            async with self.http.post(AGENT_URL + path, json=body, timeout=SHORT_CALL) as response:
                if response.status != 200:
                    log.warning("agent %s answered %s: %s", path, response.status, await response.text())
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("agent %s failed: %r", path, exc)

    async def close(self) -> None:
        """The socket is gone: stop the run so nothing is left waiting for this IDE."""
        if self.running:
            await self.post_agent(f"/v1/runs/{self.run_id}/cancel", {})
        if self.relay is not None and not self.relay.done():
            self.relay.cancel()  # closing the SSE stream also cancels the run in the agent
            with contextlib.suppress(asyncio.CancelledError):
                await self.relay


class AgentFailed(Exception):
    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


# ---------------------------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------------------------


class RedactTokens(logging.Filter):
    """uvicorn logs each WebSocket path, query string included: hide `?token=` values."""

    PATTERN = re.compile(r"(token=)[^&\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message:
            record.msg, record.args = self.PATTERN.sub(r"\1[redacted]", message), None
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
    session = Session(ws, ws.app.state.http)
    log.info("session %s connected", session.id)
    try:
        while True:
            frame = await ws.receive()
            if frame["type"] == "websocket.disconnect":
                break
            text = frame.get("text")
            if text is None:
                text = (frame.get("bytes") or b"").decode("utf-8", errors="replace")
            try:
                if len(text.encode("utf-8")) > MAX_FRAME_BYTES:
                    raise RpcError(INVALID_REQUEST, f"Invalid Request: frame is larger than {MAX_FRAME_BYTES} bytes (GATEWAY_MAX_FRAME_BYTES)")
                await session.handle(parse_message(text))
            except RpcError as exc:
                log.info("session %s: frame refused: %d %s", session.id, exc.code, exc.message[:200])
                await ws.send_text(exc.response())
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:  # a bug: answer, keep serving
                log.error("session %s: frame failed: %r", session.id, exc)
                await ws.send_text(RpcError(INTERNAL_ERROR, f"Internal error: {exc!r}").response())
    except WebSocketDisconnect:
        pass
    finally:
        await session.close()
        log.info("session %s closed", session.id)


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
        logging.getLogger(name).addFilter(RedactTokens())
    port = int(os.environ.get("GATEWAY_PORT", "8000"))  # set by __main__ / the Procfile; names the token file
    generated = not os.environ.get("GATEWAY_TOKEN")
    app.state.token = publish_token(port) if generated else os.environ["GATEWAY_TOKEN"]
    timeout = aiohttp.ClientTimeout(total=None, connect=AGENT_CONNECT_TIMEOUT_S)  # reads: see stream_from_agent
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        app.state.http = http
        try:
            yield
        finally:
            if generated:
                token_file(port).unlink(missing_ok=True)


app = Starlette(
    routes=[WebSocketRoute("/ws", ws_endpoint), Route("/healthz", healthz)],
    lifespan=lifespan,
)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The WebSocket gateway between the IDE and the agent runtime.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    args = parser.parse_args()
    os.environ["GATEWAY_PORT"] = str(args.port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", ws_max_size=16 * MAX_FRAME_BYTES)
