"""agent.py: the agent runtime, where the tool-calling loop lives.

    IDE ⇄ gateway → [agent] → llm_proxy → LLM
                      ↑ tool results come back from the IDE through the gateway

Run:  python agent.py [--host 127.0.0.1] [--port 8001]     or  uvicorn agent:app --port 8001

The gateway opens a run with `POST /v1/runs {"session_id", "content", "run_id"?}` and reads the
answer as Server-Sent Events (token, tool_call, final, error). When the model calls a tool, the
agent sends a `tool_call` event and waits for `POST /v1/runs/{run_id}/tool_results`; the IDE runs
the tool on the user's machine. `POST /v1/runs/{run_id}/cancel` stops a run. The loop, top down:

    run_turn(run)                    one user message -> exactly one final or error event
      step(run, messages)            one model reply; True when the model is done
        call_llm(run, messages)      stream the reply: text goes out as token events at once
        run_tools(run, tool_calls)   tool_call events out, results (or errors) back as messages

A failed tool (an IDE error, bad arguments, an unknown tool, a timeout) is data: it goes back to
the model as the tool's message and the loop goes on. What ends a run is the RunEnded exception
(or cancellation), which carries why.

Left out: persistence (SessionStore is in memory; a Redis store would implement the same two
methods), context-window trimming, retries (llm_proxy owns them), more than one run at a time
per session (a second one gets 409).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from protocol import (
    CANCELLED,
    COMPLETED,
    DONE_DATA,
    ERR_INTERNAL,
    ERR_LLM,
    ERR_LLM_STREAM,
    ERR_LLM_UNAVAILABLE,
    ERR_MAX_STEPS,
    ERROR,
    FINAL,
    HEARTBEAT,
    OPENAI_TO_METHOD,
    TOKEN,
    TOOL_CALL,
    EventStreamResponse,
    dumps,
    iter_sse,
    json_event,
    openai_tools,
    read_chunks,
)

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

LLM_PROXY_URL = os.environ.get("LLM_PROXY_URL", "http://127.0.0.1:8002/v1")  # OpenAI-style base URL
LLM_MODEL = os.environ.get("LLM_MODEL", "gpt-4o-mini")  # sent as "model"; the fake accepts any
TOOL_TIMEOUT_S = float(os.environ.get("TOOL_TIMEOUT_S", "300"))  # per tool batch; people review patches
AGENT_MAX_STEPS = int(os.environ.get("AGENT_MAX_STEPS", "20"))  # model replies per user message
HEARTBEAT_S = float(os.environ.get("AGENT_HEARTBEAT_S", "15"))  # idle time before a `:` comment
LLM_CONNECT_TIMEOUT_S = float(os.environ.get("LLM_CONNECT_TIMEOUT_S", "5"))  # reaching llm_proxy
LLM_READ_TIMEOUT_S = float(os.environ.get("LLM_READ_TIMEOUT_S", "300"))  # silence from llm_proxy

SYSTEM_PROMPT = """You are a coding agent working inside the user's IDE. You cannot see their \
files until you read them: use read_file before changing anything. Prefer apply_patch with a \
small unified diff (diff --git a/PATH b/PATH, with a/ and b/ prefixes) over rewriting whole \
files; use apply_patch_review when the user should approve each hunk, and prompt_user when you \
need a decision. All paths are relative to the workspace root. When a tool returns an error, \
read it and recover. Finish with a short summary of what you changed."""

TOOLS = openai_tools()  # the six tools as OpenAI function specs, built once from tools_spec.json

log = logging.getLogger("agent")

# ---------------------------------------------------------------------------------------------
# Sessions: the conversation history, behind an interface a Redis store could implement
# ---------------------------------------------------------------------------------------------

Messages = list[dict[str, Any]]  # OpenAI chat messages: {"role", "content", "tool_calls"?, ...}


class SessionStore(Protocol):
    async def load(self, session_id: str) -> Messages: ...
    async def save(self, session_id: str, messages: Messages) -> None: ...


class MemoryStore:
    """History per session in a dict: gone when the process ends, which is fine for a POC."""

    def __init__(self) -> None:
        self._sessions: dict[str, Messages] = {}

    async def load(self, session_id: str) -> Messages:
        return list(self._sessions.get(session_id, []))

    async def save(self, session_id: str, messages: Messages) -> None:
        self._sessions[session_id] = list(messages)


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


class RunEnded(Exception):
    """Ends a run with an `error` event; `code` is one of protocol's ERR_* words."""

    def __init__(self, code: str, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.code, self.message, self.retryable = code, message, retryable


@dataclass
class Run:
    id: str
    session_id: str
    content: str
    events: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)  # SSE bytes; None ends
    pending: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)  # call id -> answer
    closed_calls: dict[str, str] = field(default_factory=dict)  # call id -> "answered" / "timed out"
    asked_at: dict[str, float] = field(default_factory=dict)  # call id -> time.monotonic() of its tool_call event
    seq: int = 0
    last_sent: float = field(default_factory=time.monotonic)  # when the last event was queued (heartbeats count)
    usage: dict[str, int] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    heartbeat: asyncio.TimerHandle | None = None  # Run.beat's timer
    started: bool = False

    def emit(self, event: str, data: dict[str, Any]) -> None:
        self.seq += 1
        self.events.put_nowait(json_event(event, data, self.seq))
        self.last_sent = time.monotonic()

    def beat(self) -> None:
        """Queue a `:` comment after HEARTBEAT_S of silence, and come back when the next may be due.

        One timer per run, re-armed when it fires (an asyncio.timeout per wait cost one per token)."""
        quiet = time.monotonic() - self.last_sent
        if quiet >= HEARTBEAT_S:
            self.events.put_nowait(HEARTBEAT)
            self.last_sent, quiet = time.monotonic(), 0.0
        self.heartbeat = asyncio.get_running_loop().call_later(HEARTBEAT_S - quiet, self.beat)


@dataclass
class Agent:
    """What the handlers share: one HTTP client, the session store and the runs in flight."""

    http: aiohttp.ClientSession
    store: SessionStore
    runs: dict[str, Run] = field(default_factory=dict)
    busy_sessions: set[str] = field(default_factory=set)


@dataclass
class ToolCallSpec:
    id: str
    name: str  # as the model wrote it, e.g. git_diff
    arguments: str  # raw JSON text, parsed only in run_tools


@dataclass
class Reply:
    text: str
    tool_calls: list[ToolCallSpec]

    def as_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.text or None}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        return message


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


async def run_turn(agent: Agent, run: Run) -> None:
    """Answer one user message; emit exactly one final or error event, whatever happens."""
    run.started = True
    started = time.monotonic()
    messages: Messages = []
    status = "?"
    try:
        messages = await agent.store.load(run.session_id)
        messages.append({"role": "user", "content": run.content})
        for _ in range(AGENT_MAX_STEPS):
            reply = await step(agent, run, messages)
            if reply is not None:
                status = COMPLETED
                run.emit(FINAL, {"run_id": run.id, "status": COMPLETED, "content": reply, **usage_field(run)})
                return
        raise RunEnded(ERR_MAX_STEPS, f"Stopped after {AGENT_MAX_STEPS} model steps (AGENT_MAX_STEPS) without a final answer.", False)
    except RunEnded as exc:
        status = exc.code
        run.emit(ERROR, {"run_id": run.id, "code": exc.code, "message": exc.message, "retryable": exc.retryable})
    except asyncio.CancelledError:
        status = CANCELLED
        run.emit(FINAL, {"run_id": run.id, "status": CANCELLED, "content": "", **usage_field(run)})
    except Exception as exc:  # a bug: still end the run cleanly, and leave the traceback in the log
        status = ERR_INTERNAL
        log.exception("run %s failed", run.id)
        run.emit(ERROR, {"run_id": run.id, "code": ERR_INTERNAL, "message": f"Agent bug: {exc!r}", "retryable": False})
    finally:
        for future in run.pending.values():
            future.cancel()
        if messages:  # empty only when loading failed: then there is nothing new to keep
            await agent.store.save(run.session_id, messages)
        run.events.put_nowait(None)
        log.info("run %s session %s: %s in %.0f ms", run.id, run.session_id, status, (time.monotonic() - started) * 1000)


async def step(agent: Agent, run: Run, messages: Messages) -> str | None:
    """One model reply. Returns its text when the model is done, None when it called tools."""
    reply = await call_llm(agent, run, messages)
    if not reply.tool_calls:
        messages.append(reply.as_message())
        return reply.text
    results = await run_tools(run, reply.tool_calls)
    # appended together, so history never holds a tool call without its result
    messages.extend([reply.as_message(), *results])
    return None


async def call_llm(agent: Agent, run: Run, messages: Messages) -> Reply:
    """Stream one completion; forward text the moment it arrives; assemble tool calls."""
    body = {
        "model": LLM_MODEL,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, *messages],
        "tools": TOOLS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    text: list[str] = []
    calls: dict[int, ToolCallSpec] = {}  # by the chunk's tool_calls[].index
    try:
        async with asyncio.timeout(LLM_READ_TIMEOUT_S):  # for the answer to start; then read_chunks times the body
            response = await agent.http.post(f"{LLM_PROXY_URL}/chat/completions", json=body)
        async with response, contextlib.aclosing(read_chunks(response.content, LLM_READ_TIMEOUT_S)) as reads:
            if response.status != 200:
                async with asyncio.timeout(LLM_READ_TIMEOUT_S):  # the error body is read whole: bound it
                    message = await upstream_message(response)
                raise RunEnded(ERR_LLM, message, response.status in (408, 409, 429) or response.status >= 500)
            async for chunks in completion_chunks(reads):
                # chunks that arrived in one read leave as one token event
                delta_text = "".join(delta_of(chunk, calls, run) for chunk in chunks)
                if delta_text:
                    text.append(delta_text)
                    run.emit(TOKEN, {"run_id": run.id, "text": delta_text})
    except aiohttp.ClientConnectionError as exc:
        if not text and isinstance(exc, aiohttp.ClientConnectorError):
            raise RunEnded(ERR_LLM_UNAVAILABLE, f"Cannot reach the LLM proxy at {LLM_PROXY_URL}: {exc}", True) from None
        raise RunEnded(ERR_LLM_STREAM, f"The LLM stream broke off: {exc}", True) from None
    except TimeoutError:
        raise RunEnded(ERR_LLM_STREAM, "The LLM proxy went silent (LLM_READ_TIMEOUT_S).", True) from None
    return Reply("".join(text), [calls[i] for i in sorted(calls)])


async def completion_chunks(reads: AsyncIterator[bytes]) -> AsyncIterator[list[dict[str, Any]]]:
    """The parsed chunks of an OpenAI stream, one list per network read; checks [DONE] and errors."""
    done = False
    async for events in iter_sse(reads):
        if done:  # read on to the end of the body: only a fully read response frees its connection for reuse
            continue
        datas = []
        for event in events:
            if event.data == DONE_DATA:
                done = True
                break
            datas.append(event.data)
        chunks = parse_chunks(datas)
        for chunk in chunks:
            if "error" in chunk:  # the proxy's (or OpenAI's) mid-stream error event
                error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
                raise RunEnded(ERR_LLM_STREAM, str(error.get("message")), True)
        yield chunks
    if not done:
        raise RunEnded(ERR_LLM_STREAM, "The LLM stream ended before [DONE].", True)


def parse_chunks(datas: list[str]) -> list[dict[str, Any]]:
    """The JSON objects of one read's chunks, or RunEnded naming the first that is not one.

    One json.loads for the whole read, as an array: one C call instead of one per token (a
    fifth of this process's CPU at 1,000 streams). Any doubt, and each chunk is parsed alone.
    NOTE: chunks broken so that they mend each other (one cut mid-object, the next finishing
    it, a third holding two objects) pass as the objects they add up to; only a parse per
    chunk would tell, at the cost this saves. No server we know of writes such a stream.
    """
    try:
        chunks = json.loads("[" + ",".join(datas) + "]")
    except (ValueError, RecursionError):
        chunks = None
    if isinstance(chunks, list) and len(chunks) == len(datas) and all(isinstance(chunk, dict) for chunk in chunks):
        return chunks
    chunks = []
    for data in datas:  # the slow way, to name the culprit
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError):
            chunk = None
        if not isinstance(chunk, dict):
            raise RunEnded(ERR_LLM_STREAM, f"The LLM sent a chunk that is not a JSON object: {data[:200]!r}", True)
        chunks.append(chunk)
        if "error" in chunk:  # the stream's own error event ends it: what follows is not read
            break
    return chunks


def delta_of(chunk: dict[str, Any], calls: dict[int, ToolCallSpec], run: Run) -> str:
    """Fold one chunk into the tool calls being assembled; return its text."""
    # {"choices": [{"delta": {"content"?: str, "tool_calls"?: [{"index", "id"?, "function": {"name"?, "arguments"?}}]}}], "usage"?: {...}}
    if chunk.get("usage"):
        for key, value in chunk["usage"].items():
            if isinstance(value, int):
                run.usage[key] = run.usage.get(key, 0) + value
    text = ""
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        text += delta.get("content") or ""
        for fragment in delta.get("tool_calls") or []:
            call = calls.setdefault(fragment.get("index", 0), ToolCallSpec("", "", ""))
            function = fragment.get("function") or {}
            call.id = fragment.get("id") or call.id
            call.name += function.get("name") or ""
            call.arguments += function.get("arguments") or ""
    return text


async def run_tools(run: Run, tool_calls: list[ToolCallSpec]) -> Messages:
    """Send each call to the IDE, wait for all of them, return one tool message per call."""
    outcomes: dict[str, dict[str, Any]] = {}
    for call in tool_calls:
        method = OPENAI_TO_METHOD.get(call.name)
        try:
            arguments = json.loads(call.arguments or "{}")
        except ValueError as exc:
            arguments, problem = None, f"arguments are not valid JSON ({exc}): {call.arguments[:200]!r}"
        else:
            problem = "" if isinstance(arguments, dict) else "arguments must be a JSON object"
        if method is None:
            problem = f"there is no tool named {call.name!r}; the tools are: {', '.join(OPENAI_TO_METHOD)}"
        if problem:  # the IDE is not bothered; the model reads why and tries again
            outcomes[call.id] = {"error": {"code": "invalid_tool_call", "message": f"{call.name}: {problem}"}}
            continue
        run.pending[call.id] = asyncio.get_running_loop().create_future()
        run.emit(TOOL_CALL, {"id": call.id, "name": method, "arguments": arguments})
        run.asked_at[call.id] = time.monotonic()

    waiting = {call_id: future for call_id, future in run.pending.items()}
    if waiting:
        await asyncio.wait(waiting.values(), timeout=TOOL_TIMEOUT_S)
    for call_id, future in waiting.items():
        del run.pending[call_id]
        if future.done():
            outcomes[call_id] = future.result()
            run.closed_calls[call_id] = "answered"
        else:
            future.cancel()
            run.closed_calls[call_id] = "timed out"
            outcomes[call_id] = {"error": {"code": "tool_timeout", "message": f"The IDE did not answer within {TOOL_TIMEOUT_S:g} s (TOOL_TIMEOUT_S)."}}
    # the model reads a success as the bare result, a failure as {"error": {"code", "message", ...}}
    return [{"role": "tool", "tool_call_id": c.id, "content": dumps(outcomes[c.id].get("result", outcomes[c.id]))} for c in tool_calls]


def usage_field(run: Run) -> dict[str, Any]:
    return {"usage": dict(run.usage)} if run.usage else {}


async def upstream_message(response: aiohttp.ClientResponse) -> str:
    """The message of an OpenAI-style error body, or the start of whatever came instead."""
    raw = await response.text(errors="replace")
    try:
        message = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = raw[:500] or response.reason or "no body"
    return f"LLM request failed with HTTP {response.status}: {message}"


# ---------------------------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------------------------


def problem(status: int, message: str) -> Response:
    log.warning("answered %d: %s", status, message)  # uvicorn's access line is off (see __main__)
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status)


async def read_json(request: Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        return None
    return body if isinstance(body, dict) else None


async def start_run(request: Request) -> Response:
    # {"session_id": str, "content": str, "run_id"?: str}
    agent: Agent = request.app.state.agent
    body = await read_json(request)
    if body is None or not isinstance(body.get("session_id"), str) or not isinstance(body.get("content"), str):
        return problem(400, 'Expected a JSON object {"session_id": str, "content": str, "run_id"?: str}.')
    run_id = body.get("run_id") or "run_" + uuid.uuid4().hex[:16]
    if not isinstance(run_id, str) or run_id in agent.runs:
        return problem(409, f"run_id {run_id!r} is already in use.")
    if body["session_id"] in agent.busy_sessions:
        return problem(409, f"Session {body['session_id']!r} already has a run in progress; cancel it or wait for its final event.")

    run = Run(run_id, body["session_id"], body["content"])
    agent.runs[run.id] = run
    agent.busy_sessions.add(run.session_id)
    run.task = asyncio.create_task(run_turn(agent, run))
    run.task.add_done_callback(lambda task: end_unstarted(run, task))
    # Yield once: the run's model request leaves before our headers (and the gateway waking for
    # them), which were in its way. Measured side by side: the first token 0.16 to 0.31 ms sooner.
    await asyncio.sleep(0)
    return EventStreamResponse(event_stream(agent, run), headers={"X-Run-Id": run.id})


def end_unstarted(run: Run, task: asyncio.Task[None]) -> None:
    """A task cancelled before its first step never ran run_turn: end its stream here."""
    if task.cancelled() and not run.started:
        run.emit(FINAL, {"run_id": run.id, "status": CANCELLED, "content": ""})
        run.events.put_nowait(None)


async def event_stream(agent: Agent, run: Run) -> AsyncGenerator[bytes, None]:
    """The run's events as SSE bytes (Run.beat adds a `:` when idle); what is queued leaves in one write."""
    run.beat()
    try:
        while True:
            first = await run.events.get()
            batch, ended = [first], first is None
            while not ended and not run.events.empty():
                item = run.events.get_nowait()
                batch.append(item)
                ended = item is None
            yield b"".join(b for b in batch if b is not None)
            if ended:
                return
    finally:
        # reached when the run ended, and also when the gateway went away mid-run: no orphans
        assert run.heartbeat is not None and run.task is not None
        run.heartbeat.cancel()
        if not run.task.done():
            run.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run.task
        agent.runs.pop(run.id, None)
        agent.busy_sessions.discard(run.session_id)


async def post_tool_result(request: Request) -> Response:
    # {"tool_call_id": str, "result": any} or {"tool_call_id": str, "error": {"code", "message", "data"?}}
    agent: Agent = request.app.state.agent
    run = agent.runs.get(request.path_params["run_id"])
    if run is None:
        return problem(404, f"No run {request.path_params['run_id']!r} is in progress.")
    body = await read_json(request)
    if body is None or not isinstance(body.get("tool_call_id"), str) or ("result" in body) == ("error" in body):
        return problem(400, 'Expected {"tool_call_id": str} with exactly one of "result" and "error".')
    call_id = body["tool_call_id"]
    if call_id in run.closed_calls:
        return problem(409, f"Tool call {call_id!r} was already {run.closed_calls[call_id]}.")
    future = run.pending.get(call_id)
    if future is None:
        return problem(404, f"Run {run.id!r} is not waiting for a tool call {call_id!r}.")
    if future.done():  # the run ended (cancelled, say) while this answer was on its way
        return problem(409, f"Run {run.id!r} stopped waiting for tool call {call_id!r}: it has ended.")
    future.set_result({"result": body["result"]} if "result" in body else {"error": body["error"]})
    run.closed_calls[call_id] = "answered"
    # the whole round trip as the agent sees it: to the IDE, the IDE's own time, and back (bench.py reads it)
    waited_ms = (time.monotonic() - run.asked_at.pop(call_id)) * 1000
    log.info("run %s: tool call %r answered in %.3f ms%s", run.id, call_id, waited_ms, "" if "result" in body else " (error)")
    return JSONResponse({"ok": True})


async def cancel_run(request: Request) -> Response:
    agent: Agent = request.app.state.agent
    run = agent.runs.get(request.path_params["run_id"])
    if run is None or run.task is None:
        return problem(404, f"No run {request.path_params['run_id']!r} is in progress.")
    run.task.cancel()
    return JSONResponse({"run_id": run.id, "status": "cancelling"})


async def healthz(request: Request) -> Response:
    agent: Agent = request.app.state.agent
    return JSONResponse({"status": "ok", "service": "agent", "runs": len(agent.runs)})


# ---------------------------------------------------------------------------------------------
# App
# ---------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    timeout = aiohttp.ClientTimeout(total=None, connect=LLM_CONNECT_TIMEOUT_S)  # reads: see call_llm
    # limit=0: one pooled connection per concurrent run, however many runs there are
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        app.state.agent = Agent(http=http, store=MemoryStore())
        yield
        for run in list(app.state.agent.runs.values()):
            if run.task is not None:
                run.task.cancel()


app = Starlette(
    routes=[
        Route("/v1/runs", start_run, methods=["POST"]),
        Route("/v1/runs/{run_id}/tool_results", post_tool_result, methods=["POST"]),
        Route("/v1/runs/{run_id}/cancel", cancel_run, methods=["POST"]),
        Route("/healthz", healthz),
    ],
    lifespan=lifespan,
)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The agent runtime: the tool-calling loop between gateway and LLM proxy.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="port to listen on (default 8001)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # access_log off: each run and each tool call gets its own line, and one per request was 3 to 4% of a turn's CPU
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=1, access_log=False)
