"""agent.py: the agent runtime, where the tool-calling loop lives.

    IDE ⇄ gateway → [agent] → llm_proxy → LLM
                      ↑ tool results come back from the IDE through the gateway

Run:  python agent.py [--host 127.0.0.1] [--port 8001]     or  uvicorn agent:app --port 8001

Every session has an event log: the one source of both the live stream and every replay. The
gateway opens a run with `POST /v1/runs {"session_id", "run_id", "content"}` and reads the log
from the run's start as Server-Sent Events (token, tool_call, final, error); `GET
/v1/sessions/{id}/events` with `Last-Event-ID` re-attaches after a drop: the events after that
seq, the tool calls still waiting, then the live run. Tool answers arrive as `POST
/v1/runs/{run_id}/tool_results` (the first per call wins); `POST /v1/runs/{run_id}/cancel` stops
a run at once, and a run with no stream attached for RESUME_GRACE_S is cancelled too.

The loop, top down (each name is a function below):

    run_turn(agent, run)                    one user message -> exactly one final or error event
      step(agent, run, messages) -> str?    one model reply; its text when the model is done
        call_llm(agent, run, messages)      -> ModelReply: text streamed out as token events at once
        run_tools(agent, run, tool_calls)   -> tool messages: tool_call events out, answers back

A failed tool (an IDE error, bad arguments, an unknown tool, a timeout) is data: it goes back to
the model as the tool's message and the loop goes on. What ends a run is the RunEnded exception
(or cancellation), which carries why. A run's whole life (open, watch, end, clean up) is
`live()`; a stream's whole life (attach, replay, tail, detach) is `session_stream()`.

Storage: `Store` below is the interface; MemoryStore (this file) keeps everything in this
process. With REDIS_URL set, store_redis.RedisStore keeps it in Redis instead, and any number
of agent processes serve the same sessions (see README, "Running more than one").

Left out: context-window trimming, retries (llm_proxy owns them), more than one run at a time
per session (a second one gets 409).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from protocol import (
    ALLOWED_HOSTS,
    ATTACH_ID_HEADER,
    HEARTBEAT_HEADER,
    BODY_TIMEOUT_S,
    CANCEL_PATH,
    CANCELLED,
    CANCELLING,
    CHAT_COMPLETIONS_PATH,
    COMPLETED,
    DONE_DATA,
    ERR_INTERNAL,
    ERR_LLM,
    ERR_LLM_STREAM,
    ERR_LLM_UNAVAILABLE,
    ERR_MAX_STEPS,
    ERR_OUTPUT_LIMIT,
    ERR_STORE,
    ERROR,
    EVENTS_PATH,
    FINAL,
    HEARTBEAT,
    LAST_EVENT_ID,
    LAST_SEQ_HEADER,
    NOTIFICATIONS,
    OPENAI_TO_METHOD,
    RUN_ID_HEADER,
    RUNS_PATH,
    SUPERSEDED,
    TOKEN,
    TOOL_CALL,
    TOOL_INVALID,
    TOOL_RESULTS_PATH,
    TOOL_TIMEOUT,
    ClientHungUp,
    EventStreamResponse,
    Guard,
    HttpProblem,
    dumps,
    iter_sse,
    log_event,
    openai_tools,
    read_chunks,
    read_json_body,
    serve,
)

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

LLM_PROXY_URL = os.environ.get("LLM_PROXY_URL", "http://127.0.0.1:8002/v1")  # OpenAI-style base URL
LLM_MODEL = os.environ.get("LLM_MODEL", "gpt-4o-mini")  # sent as "model"; the fake accepts any
TOOL_TIMEOUT_S = float(os.environ.get("TOOL_TIMEOUT_S", "300"))  # per tool batch; people review patches
AGENT_MAX_STEPS = int(os.environ.get("AGENT_MAX_STEPS", "20"))  # model replies per user message
AGENT_HEARTBEAT_S = float(os.environ.get("AGENT_HEARTBEAT_S", "15"))  # idle time before a `:` comment
LLM_CONNECT_TIMEOUT_S = float(os.environ.get("LLM_CONNECT_TIMEOUT_S", "5"))  # reaching llm_proxy
LLM_READ_TIMEOUT_S = float(os.environ.get("LLM_READ_TIMEOUT_S", "300"))  # silence from llm_proxy
RESUME_GRACE_S = float(os.environ.get("RESUME_GRACE_S", "30"))  # a run with no stream attached this long is cancelled
SESSION_TTL_S = float(os.environ.get("SESSION_TTL_S", "3600"))  # an idle session is forgotten after this
MAX_SESSIONS = int(os.environ.get("AGENT_MAX_SESSIONS", "10000"))  # in memory; the least recently used idle one goes first
MAX_RUN_BYTES = int(os.environ.get("AGENT_MAX_RUN_BYTES", str(16 * 1024 * 1024)))  # events one run may log
MAX_BODY_BYTES = int(os.environ.get("AGENT_MAX_BODY_BYTES", str(2 * 1024 * 1024)))  # a user message or a tool result
AGENT_LEASE_S = float(os.environ.get("AGENT_LEASE_S", "10"))  # REDIS_URL: a dead owner's run is declared lost after this
REDIS_URL = os.environ.get("REDIS_URL", "")  # unset: everything in this process's memory
# With Redis a frozen replica must be noticed within the lease: beat at least 4 times per lease
HEARTBEAT_S = min(AGENT_HEARTBEAT_S, AGENT_LEASE_S / 4) if REDIS_URL else AGENT_HEARTBEAT_S
AGENT_TOKEN = os.environ.get("AGENT_TOKEN", "")  # set: every request needs Authorization: Bearer <it> (the gateway sends it)
LLM_PROXY_KEY = os.environ.get("LLM_PROXY_KEY", "")  # set: sent to llm_proxy as Authorization: Bearer <it>

SYSTEM_PROMPT = """You are a coding agent working inside the user's IDE. You cannot see their \
files until you read them: use read_file before changing anything. Prefer apply_patch with a \
small unified diff (diff --git a/PATH b/PATH, with a/ and b/ prefixes) over rewriting whole \
files; use apply_patch_review when the user should approve each hunk, and prompt_user when you \
need a decision. All paths are relative to the workspace root. When a tool returns an error, \
read it and recover. Finish with a short summary of what you changed."""

TOOLS = openai_tools()  # the six tools as OpenAI function specs, built once from tools_spec.json
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")  # session, run and tool-call ids: safe in a log line and a Redis key
IDLE_TICK_S = min(1.0, HEARTBEAT_S)  # how often an idle stream checks on its run's owner

log = logging.getLogger("agent")

# ---------------------------------------------------------------------------------------------
# The store: what a session keeps, behind one interface with two backends
# ---------------------------------------------------------------------------------------------

Messages = list[dict[str, Any]]  # OpenAI chat messages: {"role", "content", "tool_calls"?, ...}
Pos = tuple[int, int]  # a log entry's place: (seq, n). Same order as a Redis Stream id "seq-n".
ATTACH = "attach"  # a log entry that is not an event: a stream attached here ({"attach_id"})


@dataclass(frozen=True)
class Entry:
    """One entry of a session's log. Notifications sit at (their seq, 0); a tool_call or an
    attach marker sits at (the seq before it, n > 0). `data` is compact JSON; a notification's
    data carries its "seq", so it is relayed to the IDE as `params` unchanged."""

    pos: Pos
    kind: str  # token | final | error | tool_call | attach
    data: str


@dataclass
class Lease:
    """A run's hold on its session: only the holder writes the session's log and history."""

    session_id: str
    run_id: str
    token: str  # unique per run: the fence every write checks
    seq: int  # the session's newest seq (the holder is its only writer)


@dataclass
class Attachment:
    """What a stream attaching to a session starts from, taken at one instant."""

    session_id: str
    attach_id: str
    start: Pos  # read the log after this place ...
    run_id: str | None  # ... up to our own attach marker; then, if a run is going, its live tail
    last_seq: int  # the newest seq the session has
    pending: list[str]  # tool_call data of the calls still waiting for an answer, oldest first


class StoreUnavailable(Exception):
    """The store cannot be reached: runs end with store_unavailable, retryable."""


class LeaseLost(Exception):
    """A write by a run that no longer holds its session: it must write nothing more."""


class SessionBusy(Exception):
    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.run_id = run_id


class UnknownSession(Exception):
    pass


class Superseded(Exception):
    """A newer stream holds the session: a stale socket's re-attach or message must not take it back."""


class RunIdTaken(Exception):
    """The run id names another run in progress."""


class SeqOutOfRange(Exception):
    """Last-Event-ID older than the oldest kept event (410), or newer than the newest (400)."""

    def __init__(self, too_old: bool, oldest_seq: int, last_seq: int) -> None:
        super().__init__(too_old)
        self.too_old, self.oldest_seq, self.last_seq = too_old, oldest_seq, last_seq


class Store(Protocol):
    """Sessions, their logs and history, run ownership, and each run's inbox.

    Writes by a run take its Lease and raise LeaseLost once it is no longer held (fencing).
    Every method may raise StoreUnavailable.
    """

    # the run's owner
    async def open_run(self, session_id: str, run_id: str, holder: str = "") -> Lease:
        """Create the session if new, take it for this run (SessionBusy if a run holds it;
        RunIdTaken; Superseded if `holder`, the asking socket's attach id, is no longer the
        session's newest), and trim its log to the previous run's start."""
    async def renew(self, lease: Lease) -> None: ...
    async def append(self, lease: Lease, kind: str, data: dict[str, Any]) -> int:
        """Log one event; a notification gets the next seq. A tool_call waits until answered or
        expired; a final or error ends the run and frees the session. Returns the bytes logged."""
    async def inbox(self, lease: Lease, timeout_s: float) -> list[dict[str, Any]]:
        """The run's messages, waiting up to timeout_s: {"call_id", "outcome"} or {"cancel": True}."""
    async def expire_call(self, lease: Lease, call_id: str) -> None: ...
    async def load_history(self, session_id: str) -> Messages: ...
    async def append_history(self, lease: Lease, messages: Messages) -> None: ...

    # anyone: the gateway's requests may land on any replica
    async def answer(self, run_id: str, call_id: str, outcome: dict[str, Any]) -> str:
        """Hand a tool answer to the run: "ok", or why not: "no run", "no call", "answered", "timed out"."""
    async def cancel(self, run_id: str) -> bool: ...
    async def attach(self, session_id: str, last_seq: int, attach_id: str, previous: str = "") -> Attachment:
        """Put an attach marker in the log (a newer stream supersedes older ones), make
        attach_id the session's holder, and say where to read from. UnknownSession,
        SeqOutOfRange; Superseded when `previous` (a re-attach's old id) is no longer the holder."""
    async def read(self, session_id: str, after: Pos, timeout_s: float) -> list[Entry]:
        """The entries after `after`, waiting up to timeout_s for one. UnknownSession."""
    async def keep_attached(self, session_id: str, attach_id: str) -> None: ...
    async def detach(self, session_id: str, attach_id: str) -> None: ...
    async def unattached_for(self, session_id: str) -> float:
        """Seconds since the last stream of the session went away; 0 while one is attached."""
    async def owner_alive(self, session_id: str, run_id: str) -> bool: ...
    async def declare_lost(self, session_id: str, run_id: str) -> None:
        """The run's owner is gone: end the run with agent_lost, if it still seems to run."""

    # housekeeping
    async def sweep(self) -> None: ...
    async def healthy(self) -> bool: ...
    async def close(self) -> None: ...


@dataclass
class MemorySession:
    history: Messages = field(default_factory=list)
    log: list[Entry] = field(default_factory=list)
    seq: int = 0  # the newest notification's seq
    run_id: str | None = None  # the run in progress
    owner: str = ""  # that run's lease token
    run_start: Pos = (0, 0)  # the newest run's events come after this place; the log keeps the run before it too
    pending: dict[str, str] = field(default_factory=dict)  # call id -> its tool_call data
    closed: dict[str, str] = field(default_factory=dict)  # call id -> "answered" | "timed out"
    inbox: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    readers: set[str] = field(default_factory=set)
    holder: str = ""  # the newest attach id: the stream (and socket) the session belongs to
    unattached_since: float = field(default_factory=time.monotonic)
    active_at: float = field(default_factory=time.monotonic)
    waiter: asyncio.Future[None] | None = None  # made by a reader that waits; the next append resolves it


class MemoryStore:
    """Everything in this process: the default, with nothing to install. Gone on restart."""

    def __init__(self) -> None:
        self.sessions: OrderedDict[str, MemorySession] = OrderedDict()  # least recently opened or attached first
        self.runs: dict[str, str] = {}  # run id -> session id, while the run is in progress

    def _held(self, lease: Lease) -> MemorySession:
        session = self.sessions.get(lease.session_id)
        if session is None or session.owner != lease.token:
            raise LeaseLost(lease.run_id)
        return session

    def _add(self, session: MemorySession, kind: str, data: str, seq: int | None = None) -> None:
        if seq is not None:
            pos = (seq, 0)
        else:
            last = session.log[-1].pos if session.log else (session.seq, 0)
            pos = (session.seq, last[1] + 1 if last[0] == session.seq else 1)
        session.log.append(Entry(pos, kind, data))
        session.active_at = time.monotonic()
        if session.waiter is not None:  # nobody waiting (a busy stream): nothing to wake, nothing made
            if not session.waiter.done():
                session.waiter.set_result(None)
            session.waiter = None

    async def open_run(self, session_id: str, run_id: str, holder: str = "") -> Lease:
        if run_id in self.runs:
            raise RunIdTaken(run_id)
        session = self.sessions.get(session_id)
        if session is None:
            if len(self.sessions) >= MAX_SESSIONS:
                self.evict_one()  # at the cap only: never a scan of every session on the first token's path
            session = self.sessions[session_id] = MemorySession()
        self.sessions.move_to_end(session_id)
        if holder and session.holder and holder != session.holder:
            raise Superseded(session_id)
        if session.run_id is not None:
            raise SessionBusy(session.run_id)
        keep = bisect.bisect_right(session.log, session.run_start, key=lambda entry: entry.pos)
        del session.log[:keep]  # retention: what came after the previous run's start, and this run's
        session.run_start = session.log[-1].pos if session.log else (session.seq, 0)
        session.run_id, session.owner = run_id, secrets.token_hex(16)
        session.pending.clear()
        session.closed.clear()
        session.inbox = asyncio.Queue()
        self.runs[run_id] = session_id
        return Lease(session_id, run_id, session.owner, session.seq)

    async def renew(self, lease: Lease) -> None:
        self._held(lease)

    async def append(self, lease: Lease, kind: str, data: dict[str, Any]) -> int:
        session = self._held(lease)
        if kind in NOTIFICATIONS:
            lease.seq = session.seq = session.seq + 1
            text = dumps({**data, "seq": lease.seq})
            self._add(session, kind, text, lease.seq)
        else:
            text = dumps(data)
            self._add(session, kind, text)
        if kind == TOOL_CALL:
            session.pending[data["id"]] = text
        elif kind in (FINAL, ERROR):  # the run is over: free the session
            session.run_id, session.owner = None, ""
            session.pending.clear()
            self.runs.pop(lease.run_id, None)
        return len(text)

    async def inbox(self, lease: Lease, timeout_s: float) -> list[dict[str, Any]]:
        session = self._held(lease)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                return [await session.inbox.get()]
        return []

    async def expire_call(self, lease: Lease, call_id: str) -> None:
        session = self._held(lease)
        if session.pending.pop(call_id, None) is not None:
            session.closed[call_id] = "timed out"

    async def load_history(self, session_id: str) -> Messages:
        session = self.sessions.get(session_id)
        return list(session.history) if session else []

    async def append_history(self, lease: Lease, messages: Messages) -> None:
        self._held(lease).history.extend(messages)

    async def answer(self, run_id: str, call_id: str, outcome: dict[str, Any]) -> str:
        session = self.sessions.get(self.runs.get(run_id, ""))
        if session is None or session.run_id != run_id:
            return "no run"
        if call_id in session.closed:
            return session.closed[call_id]
        if session.pending.pop(call_id, None) is None:
            return "no call"
        session.closed[call_id] = "answered"
        session.inbox.put_nowait({"call_id": call_id, "outcome": outcome})
        return "ok"

    async def cancel(self, run_id: str) -> bool:
        session = self.sessions.get(self.runs.get(run_id, ""))
        if session is None or session.run_id != run_id:
            return False
        session.inbox.put_nowait({"cancel": True})
        return True

    async def attach(self, session_id: str, last_seq: int, attach_id: str, previous: str = "") -> Attachment:
        session = self.sessions.get(session_id)
        if session is None:
            raise UnknownSession(session_id)
        if previous and previous != session.holder:
            raise Superseded(session_id)
        first = session.log[0].pos if session.log else (session.seq + 1, 0)
        oldest_seq = first[0] if first[1] == 0 else first[0] + 1  # a (seq, n > 0) entry follows seq
        if last_seq < oldest_seq - 1 or last_seq > session.seq:
            raise SeqOutOfRange(last_seq < oldest_seq - 1, oldest_seq, session.seq)
        self._add(session, ATTACH, dumps({"attach_id": attach_id}))
        session.readers.add(attach_id)
        session.holder = attach_id
        self.sessions.move_to_end(session_id)
        pending = list(session.pending.values()) if session.run_id else []
        return Attachment(session_id, attach_id, (last_seq, 0), session.run_id, session.seq, pending)

    async def read(self, session_id: str, after: Pos, timeout_s: float) -> list[Entry]:
        session = self.sessions.get(session_id)
        if session is None:
            raise UnknownSession(session_id)
        index = bisect.bisect_right(session.log, after, key=lambda entry: entry.pos)
        if index == len(session.log) and timeout_s > 0:
            # a bare timer, not asyncio.timeout(): this wait happens once per token (BENCHMARKS.md, 2026-11-29)
            loop = asyncio.get_running_loop()
            if session.waiter is None or session.waiter.done():  # a timer may have resolved the last one
                session.waiter = loop.create_future()
            waiter = session.waiter
            timer = loop.call_later(timeout_s, lambda: waiter.done() or waiter.set_result(None))
            try:
                await asyncio.shield(waiter)  # shared by every reader of the session: one cancelled must not cancel it
            finally:
                timer.cancel()
            index = bisect.bisect_right(session.log, after, key=lambda entry: entry.pos)
        return session.log[index:]

    async def keep_attached(self, session_id: str, attach_id: str) -> None:
        pass  # a reader in this process cannot vanish without its finally (detach) running

    async def detach(self, session_id: str, attach_id: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None and attach_id in session.readers:
            session.readers.discard(attach_id)
            if not session.readers:
                session.unattached_since = time.monotonic()

    async def unattached_for(self, session_id: str) -> float:
        session = self.sessions.get(session_id)
        if session is None or session.readers:
            return 0.0
        return time.monotonic() - session.unattached_since

    async def owner_alive(self, session_id: str, run_id: str) -> bool:
        return True  # the owner is this process, alive since it is asking

    async def declare_lost(self, session_id: str, run_id: str) -> None:
        pass  # never: see owner_alive

    def evict_one(self) -> None:
        """At MAX_SESSIONS: forget the least recently used idle session (no run, no stream), or refuse."""
        for sid, session in self.sessions.items():  # oldest first
            if session.run_id is None and not session.readers:
                del self.sessions[sid]
                return
        raise StoreUnavailable(f"{MAX_SESSIONS} sessions are in use and none is idle (AGENT_MAX_SESSIONS).")

    async def sweep(self) -> None:
        """Forget sessions idle past SESSION_TTL_S (the sweeper task's call, never a request's)."""
        now = time.monotonic()
        for sid in [sid for sid, s in self.sessions.items() if s.run_id is None and not s.readers and now - s.active_at > SESSION_TTL_S]:
            del self.sessions[sid]

    async def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


STOP_LEASE = "lease lost"  # run.stopping: another owner may hold the session; write nothing more
STOP_STORE = "store unavailable"  # run.stopping: the store failed under a watcher


class RunEnded(Exception):
    """Ends a run with an `error` event; `code` is one of protocol's ERR_* words."""

    def __init__(self, code: str, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.code, self.message, self.retryable = code, message, retryable


@dataclass
class Run:
    """One run owned by this process, from open_run to its final or error."""

    lease: Lease
    content: str
    task: asyncio.Task[None] = field(init=False)  # live(): the run's whole life
    waiting: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)  # call id -> answer
    asked_at: dict[str, float] = field(default_factory=dict)  # call id -> time.monotonic() of its tool_call
    usage: dict[str, int] = field(default_factory=dict)
    logged: int = 0  # bytes this run has logged, against MAX_RUN_BYTES
    stopping: str = ""  # why the run is being stopped, once it is: a STOP_* word or the cancel's reason
    call_ids: set[str] = field(default_factory=set)  # every tool-call id this run has used

    @property
    def id(self) -> str:
        return self.lease.run_id


@dataclass
class Agent:
    """What the handlers share: one HTTP client, the store, and the runs this process owns."""

    http: aiohttp.ClientSession
    store: Store
    runs: dict[str, Run] = field(default_factory=dict)


@dataclass
class ToolCallSpec:
    id: str
    name: str  # as the model wrote it, e.g. git_diff
    arguments: str  # raw JSON text, parsed only in run_tools


@dataclass
class ModelReply:
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


async def emit(agent: Agent, run: Run, kind: str, data: dict[str, Any]) -> None:
    """Log one event of the run; every stream attached to the session reads it from there."""
    if run.stopping and kind not in (FINAL, ERROR):
        # A stop is a state, not only an exception: a library that swallowed the task's
        # cancellation (seen under redis-py) must not let the run go on.
        raise asyncio.CancelledError()
    run.logged += await agent.store.append(run.lease, kind, data)
    if run.logged > MAX_RUN_BYTES and kind not in (FINAL, ERROR):
        raise RunEnded(ERR_OUTPUT_LIMIT, f"The run produced more than {MAX_RUN_BYTES} bytes of events (AGENT_MAX_RUN_BYTES).", False)


def open_run_task(agent: Agent, lease: Lease, content: str) -> Run:
    """Start a run's life; from here on, live() alone ends it and cleans it up."""
    run = Run(lease, content)
    run.task = asyncio.create_task(live(agent, run))
    agent.runs[run.id] = run
    return run


async def live(agent: Agent, run: Run) -> None:
    """A run's whole life: its turn, and beside it the three watchers that may stop it.

    - the inbox: tool answers (resolving run.waiting) and cancels, from any replica;
    - the lease: renewed every AGENT_LEASE_S / 3; once lost, the run writes nothing more;
    - the grace: no stream attached for RESUME_GRACE_S cancels the run, as a v1 disconnect did.
    A watcher stops the run by cancelling this task; run_turn turns that into `final` cancelled.
    """
    me = asyncio.current_task()
    assert me is not None

    def stop(why: str) -> None:
        if not run.stopping:  # once: a second cancel must not interrupt the final being written
            run.stopping = why
            me.cancel()

    async def inbox() -> None:
        while True:
            for message in await agent.store.inbox(run.lease, HEARTBEAT_S):
                if message.get("cancel"):
                    stop("cancelled")
                elif (future := run.waiting.get(message["call_id"])) is not None and not future.done():
                    future.set_result(message["outcome"])

    async def lease() -> None:
        while True:
            await asyncio.sleep(AGENT_LEASE_S / 3)
            await agent.store.renew(run.lease)

    async def grace() -> None:
        while True:
            await asyncio.sleep(min(1.0, RESUME_GRACE_S / 4))
            if await agent.store.unattached_for(run.lease.session_id) >= RESUME_GRACE_S:
                stop(f"no stream attached for {RESUME_GRACE_S:g} s (RESUME_GRACE_S)")

    async def watch(watcher: Any) -> None:
        try:
            await watcher()
        except LeaseLost:
            log.warning("run %s: lost its lease; it stops and writes nothing more", run.id)
            stop(STOP_LEASE)
        except StoreUnavailable as exc:
            log.warning("run %s: store unavailable: %s", run.id, exc)
            stop(STOP_STORE)

    watchers = [asyncio.create_task(watch(w)) for w in (inbox, lease, grace)]
    try:
        await run_turn(agent, run)  # the first await is inside run_turn's try: a cancel always ends it there
    finally:
        agent.runs.pop(run.id, None)  # nothing awaited here: a cleanup that waits can hang a run's end
        for task in watchers:
            task.cancel()


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


async def run_turn(agent: Agent, run: Run) -> None:
    """Answer one user message; log exactly one final or error event, whatever happens."""
    started = time.monotonic()
    end: tuple[str, dict[str, Any]]
    try:
        messages = await agent.store.load_history(run.lease.session_id)
        user = {"role": "user", "content": run.content}
        await agent.store.append_history(run.lease, [user])  # kept even if this turn dies
        messages.append(user)
        for _ in range(AGENT_MAX_STEPS):
            text = await step(agent, run, messages)
            if text is not None:
                end = FINAL, {"run_id": run.id, "status": COMPLETED, "content": text, **usage_field(run)}
                break
        else:
            raise RunEnded(ERR_MAX_STEPS, f"Stopped after {AGENT_MAX_STEPS} model steps (AGENT_MAX_STEPS) without a final answer.", False)
    except RunEnded as exc:
        end = ERROR, {"run_id": run.id, "code": exc.code, "message": exc.message, "retryable": exc.retryable}
    except asyncio.CancelledError:
        asyncio.current_task().uncancel()  # type: ignore[union-attr]  # handled: the ending below must not be cut short
        if run.stopping == STOP_STORE:  # not a cancel: say what happened, if the store takes it
            end = ERROR, {"run_id": run.id, "code": ERR_STORE, "message": "The session store became unavailable during the run.", "retryable": True}
        elif run.stopping == STOP_LEASE:
            end = ERROR, {}  # not ours to end any more
        else:
            end = FINAL, {"run_id": run.id, "status": CANCELLED, "content": "", **usage_field(run)}
    except StoreUnavailable as exc:
        end = ERROR, {"run_id": run.id, "code": ERR_STORE, "message": f"The session store is unavailable: {exc}", "retryable": True}
    except LeaseLost:
        end = ERROR, {}  # not ours to end any more
    except Exception as exc:  # a bug: still end the run cleanly, and leave the traceback in the log
        log.exception("run %s failed", run.id)
        end = ERROR, {"run_id": run.id, "code": ERR_INTERNAL, "message": f"Agent bug: {exc!r}", "retryable": False}
    for future in run.waiting.values():
        future.cancel()
    kind, data = end
    outcome = data.get("status") or data.get("code") or "fenced"
    if data:
        try:
            await emit(agent, run, kind, data)
        except (LeaseLost, StoreUnavailable) as exc:
            outcome += f" (not logged: {type(exc).__name__})"
    log.info("run %s session %s: %s in %.0f ms%s", run.id, run.lease.session_id, outcome,
             (time.monotonic() - started) * 1000, f" ({run.stopping})" if run.stopping else "")


async def step(agent: Agent, run: Run, messages: Messages) -> str | None:
    """One model reply. Returns its text when the model is done, None when it called tools."""
    reply = await call_llm(agent, run, messages)
    if not reply.tool_calls:
        done = [reply.as_message()]
    else:  # appended together, so history never holds a tool call without its result
        results = await run_tools(agent, run, reply.tool_calls)  # first: it may give a call a new id
        done = [reply.as_message(), *results]
    await agent.store.append_history(run.lease, done)
    messages.extend(done)
    return None if reply.tool_calls else reply.text


async def call_llm(agent: Agent, run: Run, messages: Messages) -> ModelReply:
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
            response = await agent.http.post(LLM_PROXY_URL + CHAT_COMPLETIONS_PATH, json=body, headers=LLM_PROXY_HEADERS)
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
                    await emit(agent, run, TOKEN, {"run_id": run.id, "text": delta_text})
    except aiohttp.ClientConnectorError as exc:
        if text:
            raise RunEnded(ERR_LLM_STREAM, f"The LLM stream broke off: {exc}", True) from None
        raise RunEnded(ERR_LLM_UNAVAILABLE, f"Cannot reach the LLM proxy at {LLM_PROXY_URL}: {exc}", True) from None
    except aiohttp.ClientError as exc:  # a dropped connection, a body cut short (ClientPayloadError), ...
        raise RunEnded(ERR_LLM_STREAM, f"The LLM stream broke off: {exc!r}", True) from None
    except TimeoutError:
        raise RunEnded(ERR_LLM_STREAM, "The LLM proxy went silent (LLM_READ_TIMEOUT_S).", True) from None
    return ModelReply("".join(text), [calls[i] for i in sorted(calls)])


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

    One json.loads for the whole read, as an array, where a port would parse each chunk alone
    (BENCHMARKS.md has what it saves). Any doubt, and each chunk is parsed alone.
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


async def run_tools(agent: Agent, run: Run, tool_calls: list[ToolCallSpec]) -> Messages:
    """Send each call to the IDE, wait for all of them, return one tool message per call."""
    outcomes: dict[str, dict[str, Any]] = {}
    for call in tool_calls:
        if not (isinstance(call.id, str) and ID_PATTERN.fullmatch(call.id)) or call.id in run.call_ids:
            call.id = "call_" + secrets.token_hex(12)  # a number, a megabyte, a reused id: ours from here on, in the history too
        run.call_ids.add(call.id)
        method = OPENAI_TO_METHOD.get(call.name)
        try:
            arguments = json.loads(call.arguments or "{}")
        except (ValueError, RecursionError) as exc:
            arguments, problem = None, f"arguments are not valid JSON ({exc}): {call.arguments[:200]!r}"
        else:
            problem = "" if isinstance(arguments, dict) else "arguments must be a JSON object"
        if method is None:
            problem = f"there is no tool named {call.name[:100]!r}; the tools are: {', '.join(OPENAI_TO_METHOD)}"
        if problem:  # the IDE is not bothered; the model reads why and tries again
            outcomes[call.id] = {"error": {"code": TOOL_INVALID, "message": f"{call.name[:100]}: {problem}"}}
            continue
        run.waiting[call.id] = asyncio.get_running_loop().create_future()
        run.asked_at[call.id] = time.monotonic()
        await emit(agent, run, TOOL_CALL, {"id": call.id, "name": method, "arguments": arguments})

    if run.waiting:
        await asyncio.wait(run.waiting.values(), timeout=TOOL_TIMEOUT_S)
    for call_id, future in run.waiting.items():
        if future.done():
            outcomes[call_id] = future.result()
            # the whole round trip as the agent sees it: to the IDE, the IDE's own time, and back (bench.py reads it)
            waited_ms = (time.monotonic() - run.asked_at.pop(call_id)) * 1000
            log.info("run %s: tool call %r answered in %.3f ms%s", run.id, call_id, waited_ms, " (error)" if "error" in outcomes[call_id] else "")
        else:
            future.cancel()
            await agent.store.expire_call(run.lease, call_id)
            outcomes[call_id] = {"error": {"code": TOOL_TIMEOUT, "message": f"The IDE did not answer within {TOOL_TIMEOUT_S:g} s (TOOL_TIMEOUT_S)."}}
    run.waiting.clear()
    # the model reads a success as the bare result, a failure as {"error": {"code", "message", ...}}
    return [{"role": "tool", "tool_call_id": c.id, "content": dumps(outcomes[c.id].get("result", outcomes[c.id]))} for c in tool_calls]


def usage_field(run: Run) -> dict[str, Any]:
    return {"usage": dict(run.usage)} if run.usage else {}


async def upstream_message(response: aiohttp.ClientResponse) -> str:
    """The message of an OpenAI-style error body, or the start of whatever came instead."""
    raw = (await response.content.read(64 * 1024)).decode("utf-8", errors="replace")
    try:
        message = json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError, RecursionError):
        message = raw[:500] or response.reason or "no body"
    return f"LLM request failed with HTTP {response.status}: {str(message)[:2000]}"


# ---------------------------------------------------------------------------------------------
# Streams: attach, replay, the tool calls still waiting, the live tail, detach
# ---------------------------------------------------------------------------------------------


async def session_stream(agent: Agent, attachment: Attachment) -> AsyncGenerator[bytes, None]:
    """A stream's whole life: one read loop over the session's log, from attachment.start.

    Before our own attach marker the log is replay: its notifications go out, its tool calls do
    not (answered ones are history; waiting ones go next). At the marker: the calls still
    waiting, with their original ids. After it: everything, live, until the run's final or
    error, or a newer stream's marker (then `superseded`, and the gateway closes its socket).
    Replay and live tail are one read, so nothing falls between them. Closing this stream is a
    detach (stream_response's on_close), never a cancel: the run goes on, and the grace watcher decides.
    """
    store, session_id = agent.store, attachment.session_id
    after, live, quiet_since, kept_at = attachment.start, False, time.monotonic(), time.monotonic()
    try:
        while True:
            entries = await store.read(session_id, after, IDLE_TICK_S if live else 0)
            out: list[bytes] = []
            for entry in entries:
                after = entry.pos
                if entry.kind in NOTIFICATIONS:
                    out.append(log_event(entry.kind, entry.data, entry.pos[0]))
                    if live and entry.kind in (FINAL, ERROR):
                        yield b"".join(out)
                        return
                elif entry.kind == TOOL_CALL and live:
                    out.append(log_event(TOOL_CALL, entry.data, None))
                elif entry.kind == ATTACH and json.loads(entry.data)["attach_id"] == attachment.attach_id:
                    if attachment.run_id is None:  # nothing in progress: the replay was all
                        yield b"".join(out)
                        return
                    out.extend(log_event(TOOL_CALL, data, None) for data in attachment.pending)
                    live = True
                elif entry.kind == ATTACH and live:
                    out.append(log_event(SUPERSEDED, dumps({"session_id": session_id}), None))
                    yield b"".join(out)
                    return
            now = time.monotonic()
            if out:
                yield b"".join(out)
                quiet_since = now
            elif live and attachment.run_id is not None:
                if now - quiet_since >= HEARTBEAT_S:
                    yield HEARTBEAT
                    quiet_since = now
                if not await store.owner_alive(session_id, attachment.run_id):
                    await store.declare_lost(session_id, attachment.run_id)  # its error is the next entry we read
            if now - kept_at >= IDLE_TICK_S:
                await store.keep_attached(session_id, attachment.attach_id)
                kept_at = now
    except (StoreUnavailable, UnknownSession) as exc:
        # End the stream without an event: the gateway re-attaches (perhaps to a replica that
        # can read the store), and only if that fails too reports an error of its own.
        log.warning("session %s: stream ended: %s", session_id, exc or type(exc).__name__)


# ---------------------------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------------------------


def problem(status: int, message: str, **extra: Any) -> Response:
    log.warning("answered %d: %s", status, message[:300])  # uvicorn's access line is off (see __main__)
    return JSONResponse({"error": {"status": status, "message": message, **extra}}, status_code=status)


async def read_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object, bounded (AGENT_MAX_BODY_BYTES, BODY_TIMEOUT_S); else HttpProblem."""
    body = await read_json_body(request, MAX_BODY_BYTES, BODY_TIMEOUT_S)
    if not isinstance(body, dict):
        raise HttpProblem(400, f"expected a JSON object, got {type(body).__name__}")
    return body


def refused(request: Request, exc: HttpProblem) -> Response:
    """One log line for a body we would not read; a hang-up gets no answer worth a traceback."""
    if isinstance(exc, ClientHungUp):
        log.info("%s %s: %s", request.method, request.url.path, exc.message)
        return exc.response()
    log.warning("answered %d: %s", exc.status, exc.message[:300])
    return exc.response()


def valid_id(value: Any) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


async def start_run(request: Request) -> Response:
    # {"session_id": str, "content": str, "run_id"?: str}
    agent: Agent = request.app.state.agent
    try:
        body = await read_object(request)
    except HttpProblem as exc:
        return refused(request, exc)
    if not valid_id(body.get("session_id")) or not isinstance(body.get("content"), str):
        return problem(400, 'Expected a JSON object {"session_id": id, "content": str, "run_id"?: id}; ids are 1 to 128 of [A-Za-z0-9_-].')
    run_id = body.get("run_id") or "run_" + secrets.token_hex(8)
    if not valid_id(run_id) or run_id in agent.runs:
        return problem(409, f"run_id {str(run_id)[:130]!r} is not a free id.")
    holder = body.get("attach_id") or ""  # the asking socket's attach id, if it held the session before
    try:
        lease = await agent.store.open_run(body["session_id"], run_id, holder if isinstance(holder, str) else "")
        attachment = await agent.store.attach(lease.session_id, lease.seq, "att_" + secrets.token_hex(8))
    except SessionBusy as exc:
        return problem(409, f"Session {body['session_id']!r} already has a run in progress ({exc.run_id}); cancel it or wait for its final event.", run_id=exc.run_id)
    except RunIdTaken:
        return problem(409, f"run_id {run_id!r} is not a free id.")
    except Superseded:
        return problem(409, f"Session {body['session_id']!r} was resumed by a newer connection.", superseded=True)
    except StoreUnavailable as exc:
        return problem(503, f"The session store is unavailable: {exc}")
    open_run_task(agent, lease, body["content"])
    # Yield once: the run's model request leaves before our headers (BENCHMARKS.md, "request before headers").
    await asyncio.sleep(0)
    return stream_response(agent, attachment)


async def session_events(request: Request) -> Response:
    agent: Agent = request.app.state.agent
    session_id = request.path_params["session_id"]
    raw = request.headers.get(LAST_EVENT_ID, "0").strip()
    if not raw.isdigit() or len(raw) > 18:
        return problem(400, f"{LAST_EVENT_ID} must be a seq: a whole number, got {raw[:40]!r}.")
    previous = request.headers.get(ATTACH_ID_HEADER, "")  # a re-attach names the stream it replaces
    try:
        attachment = await agent.store.attach(session_id, int(raw), "att_" + secrets.token_hex(8), previous[:130])
    except Superseded:
        return problem(409, f"Session {session_id[:130]!r} was resumed by a newer connection.", superseded=True)
    except UnknownSession:
        return problem(404, f"No session {session_id[:130]!r}: it never existed or it expired (SESSION_TTL_S).")
    except SeqOutOfRange as exc:
        if exc.too_old:
            return problem(410, f"{LAST_EVENT_ID} {raw} is older than what the session keeps; the oldest is {exc.oldest_seq}.", oldest_seq=exc.oldest_seq)
        return problem(400, f"{LAST_EVENT_ID} {raw} is ahead of the session, whose newest seq is {exc.last_seq}.", last_seq=exc.last_seq)
    except StoreUnavailable as exc:
        return problem(503, f"The session store is unavailable: {exc}")
    return stream_response(agent, attachment)


def stream_response(agent: Agent, attachment: Attachment) -> Response:
    headers = {
        RUN_ID_HEADER: attachment.run_id or "",
        LAST_SEQ_HEADER: str(attachment.last_seq),
        ATTACH_ID_HEADER: attachment.attach_id,
        HEARTBEAT_HEADER: f"{HEARTBEAT_S:g}",
    }

    async def detach() -> None:  # however the response ends, started or not
        with contextlib.suppress(StoreUnavailable):
            await agent.store.detach(attachment.session_id, attachment.attach_id)

    return EventStreamResponse(session_stream(agent, attachment), headers=headers, on_close=detach)


async def post_tool_result(request: Request) -> Response:
    # {"tool_call_id": str, "result": any} or {"tool_call_id": str, "error": {"code", "message", "data"?}}
    agent: Agent = request.app.state.agent
    run_id = request.path_params["run_id"]
    try:
        body = await read_object(request)
    except HttpProblem as exc:
        return refused(request, exc)
    if not isinstance(body.get("tool_call_id"), str) or ("result" in body) == ("error" in body):
        return problem(400, 'Expected {"tool_call_id": str} with exactly one of "result" and "error".')
    call_id = body["tool_call_id"]
    try:
        verdict = await agent.store.answer(run_id, call_id, {"result": body["result"]} if "result" in body else {"error": body["error"]})
    except StoreUnavailable as exc:
        return problem(503, f"The session store is unavailable: {exc}")
    if verdict == "no run":
        return problem(404, f"No run {run_id[:130]!r} is in progress.")
    if verdict == "no call":
        return problem(404, f"Run {run_id!r} is not waiting for a tool call {call_id[:130]!r}.")
    if verdict != "ok":
        return problem(409, f"Tool call {call_id[:130]!r} was already {verdict}.")
    return JSONResponse({"ok": True})


async def cancel_run(request: Request) -> Response:
    agent: Agent = request.app.state.agent
    run_id = request.path_params["run_id"]
    try:
        found = await agent.store.cancel(run_id)
    except StoreUnavailable as exc:
        return problem(503, f"The session store is unavailable: {exc}")
    if not found:
        return problem(404, f"No run {run_id[:130]!r} is in progress.")
    return JSONResponse({"run_id": run_id, "status": CANCELLING})


async def healthz(request: Request) -> Response:
    agent: Agent = request.app.state.agent
    ok = await agent.store.healthy()
    body = {"status": "ok" if ok else "store_unavailable", "service": "agent", "runs": len(agent.runs), "store": "redis" if REDIS_URL else "memory"}
    return JSONResponse(body, status_code=200 if ok else 503)


# ---------------------------------------------------------------------------------------------
# App
# ---------------------------------------------------------------------------------------------

LLM_PROXY_HEADERS = {"Authorization": f"Bearer {LLM_PROXY_KEY}"} if LLM_PROXY_KEY else {}


def make_store() -> Store:
    if not REDIS_URL:
        return MemoryStore()
    from store_redis import RedisStore  # only with REDIS_URL: the default needs no redis package

    return RedisStore(REDIS_URL)


async def sweeper(store: Store) -> None:
    while True:
        await asyncio.sleep(min(60.0, SESSION_TTL_S / 4))
        with contextlib.suppress(StoreUnavailable):
            await store.sweep()


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    timeout = aiohttp.ClientTimeout(total=None, connect=LLM_CONNECT_TIMEOUT_S)  # reads: see call_llm
    # limit=0: one pooled connection per concurrent run, however many runs there are
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        store = make_store()
        app.state.agent = Agent(http=http, store=store)
        sweeping = asyncio.create_task(sweeper(store))
        try:
            yield
        finally:
            sweeping.cancel()
            runs = [run.task for run in app.state.agent.runs.values()]
            for task in runs:
                task.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
            await store.close()


app = Starlette(
    routes=[
        Route(RUNS_PATH, start_run, methods=["POST"]),
        Route(TOOL_RESULTS_PATH, post_tool_result, methods=["POST"]),
        Route(CANCEL_PATH, cancel_run, methods=["POST"]),
        Route(EVENTS_PATH, session_events, methods=["GET"]),
        Route("/healthz", healthz),
    ],
    lifespan=lifespan,
    middleware=[Middleware(Guard, hosts=ALLOWED_HOSTS, secret=AGENT_TOKEN or None, secret_name="AGENT_TOKEN")],
)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="The agent runtime: the tool-calling loop between gateway and LLM proxy.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="port to listen on (default 8001)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # "agent:app", not app: store_redis imports this module by name, so it must not also run as __main__.
    # access_log off: each run and each tool call gets its own line (BENCHMARKS.md has what a line per request cost).
    serve("agent:app", args.host, args.port, secret=AGENT_TOKEN, secret_name="AGENT_TOKEN", log_level="info", timeout_graceful_shutdown=1, access_log=False)
