"""The agent and the gateway attacked as issue 10 did it: real processes, hostile bytes on real sockets.

    web page, rogue process, IDE (this file) ⇄ gateway → agent → llm_proxy → fake_llm

Every service runs as `python NAME.py` (conftest.py), one of each, in memory. Requests with
hostile headers are written as literal bytes (test_guard's helpers), since an HTTP client would
fix them up. Whatever should be refused is checked to have started
nothing: fake_llm's request count, the agent's run-end log lines ("run ... in N ms"), its
/healthz "runs", and, where a run would have made one, the session it would have created
(GET /v1/sessions/{id}/events answers 404 for a session that never existed).

Tests are numbered after the issue's items for the agent and the gateway; the proxy's are in
test_security_proxy.py. The last test reads every log this module produced for the secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl

from conftest import ROOT, SERVICES, TOKEN, Service, Stack, free_port, start_stack, wait_healthy
from protocol import CANCEL_PATH, EVENTS_PATH, LAST_EVENT_ID, RUNS_PATH, TOOL_RESULTS_PATH, UNKNOWN_SESSION, SSEParser
from test_guard import RawAnswer, parse_reply, request
from test_guard import call as call_port
from test_loop_contract import ScriptedCompletion, Upstream, delta, opening, text_reply, upstream  # noqa: F401  (upstream: a fixture)
from wsclient import collect_turn, recv, send, user_message

# ---------------------------------------------------------------------------------------------
# Settings and bounds. Times are hang bounds for a loaded 2-core machine, not speed assertions.
# ---------------------------------------------------------------------------------------------

AGENT_SECRET = "agent-token-" + os.urandom(8).hex()  # AGENT_TOKEN of the keyed stack
PROXY_SECRET = "proxy-key-" + os.urandom(8).hex()  # LLM_PROXY_KEY of the keyed stack
SECRETS = {"GATEWAY_TOKEN": TOKEN, "AGENT_TOKEN": AGENT_SECRET, "LLM_PROXY_KEY": PROXY_SECRET}
ALLOWED_ORIGIN = "https://ide.example"  # the base gateway's GATEWAY_ALLOWED_ORIGINS
MAX_BODY = 2 * 1024 * 1024  # the agent's default AGENT_MAX_BODY_BYTES
OVER_BODY = 3 * 1024 * 1024  # a body over it
QUIET_S = 0.3  # after a refusal: time for a run that wrongly started to reach the model
OUTCOME_S = 10.0  # a turn, or a fault, reaches the IDE
SETTLE_S = 20.0  # a run ends after its consumer went away or stopped reading
SESSION_TTL_S = 1  # the short-lived agent's SESSION_TTL_S (its sweeper runs every 0.25 s)
MAX_RUN_BYTES = 4000  # the short-lived agent's AGENT_MAX_RUN_BYTES
HEADER_TIMEOUT_S = 1  # the slow-client stack's HEADER_TIMEOUT_S
FLOOD_SOCKETS, FLOOD_FRAMES, FLOOD_FRAME_BYTES = 8, 10, 10 * 1024 * 1024  # item 8
RSS_GROWTH_LIMIT = 50 * 1024 * 1024  # the gateway's RSS may grow by at most this under the flood
LONG_ID_CHARS, LONG_ID_FRAMES, LOG_BYTES_PER_FRAME = 1_000_000, 20, 400  # item 9
WIRE_BYTES_PER_TOKEN = 15  # what one `[tokens:N]` token costs on the agent's SSE stream (measured: 14.98)

RUN_END = re.compile(r" agent INFO run \S+ session \S+: .* in \d+ ms")  # one line per run end (agent.run_turn)
JSON = {"Content_Type": "application/json"}

Frame = dict[str, Any]  # one JSON-RPC frame as received

# ---------------------------------------------------------------------------------------------
# Stacks: every one of this module logs under one directory, read whole by the last test
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def log_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("security")


def stack_in(log_root: Path, name: str, env: dict[str, str] | None = None, only: tuple[str, ...] | None = None) -> Stack:
    """start_stack in its own directory under log_root, one process of each, in memory."""
    directory = log_root / f"{name}-{uuid.uuid4().hex[:6]}"
    directory.mkdir()
    return start_stack(directory, env, only or SERVICES, scale="memory")


@pytest.fixture(scope="module")
def base(log_root: Path) -> Iterator[Stack]:
    """The whole pipeline on the fake model, as `honcho start` runs it, plus one allowed origin."""
    stack = stack_in(log_root, "base", {"GATEWAY_ALLOWED_ORIGINS": ALLOWED_ORIGIN})
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def keyed(log_root: Path) -> Iterator[Stack]:
    """AGENT_TOKEN on gateway and agent, LLM_PROXY_KEY on agent and llm_proxy."""
    stack = stack_in(log_root, "keyed", {"AGENT_TOKEN": AGENT_SECRET, "LLM_PROXY_KEY": PROXY_SECRET})
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def short_lived(log_root: Path) -> Iterator[Stack]:
    """An agent that forgets sessions after SESSION_TTL_S and caps a run's events at MAX_RUN_BYTES."""
    stack = stack_in(log_root, "short", {"SESSION_TTL_S": str(SESSION_TTL_S), "AGENT_MAX_RUN_BYTES": str(MAX_RUN_BYTES)})
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def two_sessions(log_root: Path) -> Iterator[Stack]:
    """An agent that holds at most two sessions (AGENT_MAX_SESSIONS=2)."""
    stack = stack_in(log_root, "two", {"AGENT_MAX_SESSIONS": "2"})
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def impatient(log_root: Path) -> Iterator[Stack]:
    """Agent and gateway that close a connection whose request head is not whole after 1 s."""
    stack = stack_in(log_root, "impatient", {"HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S)}, only=("agent", "gateway"))
    yield stack
    stack.stop()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    """What a refused request must not change."""

    model_requests: int  # fake_llm's chat completions so far
    runs_ended: int  # the agent's run-end log lines so far


async def call(service: Service, method: str, path: str, body: bytes = b"", host: str | None = None, **headers: str) -> RawAnswer:
    """One request as literal bytes: Host 127.0.0.1:PORT unless told ({port} filled in); header names as Content_Type."""
    return await call_port(service.port, method, path, host=host and host.format(port=service.port), body=body, **headers)


async def wait_for_log(service: Service, text: str, timeout: float = 5) -> str:
    """The service's log once `text` is in it (or after `timeout`)."""
    deadline = time.monotonic() + timeout
    while text not in service.log() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return service.log()


async def get_json(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url) as response:
        assert response.status == 200, (url, response.status, await response.text())
        return await response.json()


async def traffic(http: aiohttp.ClientSession, stack: Stack) -> Traffic:
    stats = await get_json(http, f"{stack['fake_llm'].url}/_fake/stats")
    return Traffic(stats["requests"], len(RUN_END.findall(stack["agent"].log())))


async def agent_runs(http: aiohttp.ClientSession, agent: Service) -> int:
    """The runs the agent is executing (/healthz)."""
    return int((await get_json(http, f"{agent.url}/healthz"))["runs"])


async def assert_nothing_ran(http: aiohttp.ClientSession, stack: Stack, before: Traffic) -> None:
    """After QUIET_S: no model request, no run ended, none running."""
    await asyncio.sleep(QUIET_S)
    assert await traffic(http, stack) == before
    assert await agent_runs(http, stack["agent"]) == 0


async def until_no_runs(http: aiohttp.ClientSession, agent: Service, bound: float = SETTLE_S) -> None:
    """Wait until the agent's /healthz says no run is going."""
    deadline = time.monotonic() + bound
    while await agent_runs(http, agent) != 0:
        assert time.monotonic() < deadline, f"the agent still runs something after {bound} s"
        await asyncio.sleep(0.05)


async def session_exists(agent: Service, session_id: str, **headers: str) -> bool:
    """Whether the agent knows the session: a run would have created it (404: never heard of it)."""
    reply = await call(agent, "GET", EVENTS_PATH.format(session_id=session_id), **{LAST_EVENT_ID.replace("-", "_"): "0"}, **headers)
    assert reply.status in (200, 404), reply
    return reply.status == 200


def fresh(prefix: str) -> str:
    """A session or run id nobody used: [A-Za-z0-9_-], as the agent wants."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def run_body(session_id: str, content: str = "[scenario:chat] hello") -> bytes:
    return json.dumps({"session_id": session_id, "content": content}).encode()


def sse_events(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of a whole SSE body."""
    return [(event.event, json.loads(event.data)) for event in SSEParser().feed(body)]


async def connect(http: aiohttp.ClientSession, stack: Stack, **headers: str) -> aiohttp.ClientWebSocketResponse:
    return await http.ws_connect(stack.ws_url, headers={"Authorization": f"Bearer {stack.token}", **headers})


async def turn(ws: aiohttp.ClientWebSocketResponse, content: str, id: int = 1) -> list[Frame]:
    """One whole turn: the result, then every frame up to its final or error (tool requests refused)."""
    await send(ws, user_message(content, id))
    return [await recv(ws, OUTCOME_S), *await collect_turn(ws, timeout=OUTCOME_S)]


def completed(frames: list[Frame]) -> Frame:
    """The turn's final, which must have completed."""
    end = frames[-1]
    assert end.get("method") == "final" and end["params"]["status"] == "completed", frames[-3:]
    return end["params"]


def call_marker(name: str, **arguments: Any) -> str:
    """fake_llm's `[call:{...}]`: call tool `name`, then echo what came back."""
    return "[call:" + json.dumps({"name": name, "arguments": arguments}) + "]"


async def open_tool_call(ws: aiohttp.ClientWebSocketResponse) -> tuple[str, str]:
    """Start a run that waits on a read_file; return (run_id, the tool call's id)."""
    await send(ws, user_message(call_marker("read_file", path="a.txt") + " " + uuid.uuid4().hex))
    run_id = (await recv(ws, OUTCOME_S))["result"]["run_id"]
    while "id" not in (frame := await recv(ws, OUTCOME_S)):  # tokens come before the tool request
        pass
    assert frame["method"] == "read_file", frame
    return run_id, frame["id"]


def file_answer(call_id: str, content: str = "hello\n") -> Frame:
    result = {"path": "a.txt", "content": content, "start_line": 1, "end_line": 1, "total_lines": 1, "truncated": False}
    return {"jsonrpc": "2.0", "id": call_id, "result": result}


def post_in_parts(port: int, head: bytes, parts: list[bytes]) -> RawAnswer:
    """Write the head, then each part (a body cut in pieces), then read the answer; blocking, for a thread.

    A server that refuses a body (413) answers and hangs up before reading all of it: the rest
    of our writes fail, and recv() still returns the answer that came before the reset, which
    asyncio's streams would drop.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=OUTCOME_S) as sock:
        with contextlib.suppress(OSError):
            for data in (head, *parts):
                sock.sendall(data)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
        return parse_reply(answer)


def chunked(data: bytes, size: int = 64 * 1024) -> list[bytes]:
    """`data` as HTTP/1.1 chunks of `size` bytes, without the last (empty) chunk."""
    return [b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size]) for i in range(0, len(data), size)]


# ---------------------------------------------------------------------------------------------
# 1. A web page against the agent: cross-site simple requests, DNS rebinding
# ---------------------------------------------------------------------------------------------

EVIL_HOST = "evil.example:{port}"
HOSTILE = [
    ("POST", RUNS_PATH, {"Content_Type": "text/plain", "Origin": "http://evil.example"}, None, 403),
    ("POST", RUNS_PATH, {"Content_Type": "text/plain"}, None, 415),  # the Origin stripped
    ("POST", RUNS_PATH, {"Content_Type": "application/x-www-form-urlencoded"}, None, 415),
    ("POST", RUNS_PATH, {**JSON, "Origin": "http://evil.example"}, None, 403),
    ("POST", RUNS_PATH, {**JSON, "Origin": "http://127.0.0.1:8000"}, None, 403),  # the gateway's page: not the agent's
    ("POST", RUNS_PATH, JSON, EVIL_HOST, 403),
    ("GET", EVENTS_PATH, {}, EVIL_HOST, 403),
    ("GET", "/healthz", {}, EVIL_HOST, 403),
    ("POST", TOOL_RESULTS_PATH, JSON, EVIL_HOST, 403),
    ("POST", CANCEL_PATH, {}, EVIL_HOST, 403),
    ("POST", RUNS_PATH, JSON, None, 200),  # the control: this very request, from a loopback client, runs
]


@pytest.mark.parametrize(
    ("method", "path", "headers", "host", "status"),
    HOSTILE,
    ids=["text_plain_cross_site", "text_plain", "form", "json_cross_site", "json_from_gateway_page",
         "rebound_runs", "rebound_events", "rebound_healthz", "rebound_tool_results", "rebound_cancel", "control"],
)  # fmt: skip
async def test_a_web_page_cannot_start_or_read_a_run(
    base: Stack, method: str, path: str, headers: dict[str, str], host: str | None, status: int
) -> None:
    """403 (Host, Origin) or 415 (body type) on every route; no session made, no run, nothing at the model."""
    agent, session_id = base["agent"], fresh("ses_page")
    body = {RUNS_PATH: run_body(session_id), TOOL_RESULTS_PATH: json.dumps({"tool_call_id": "call_x", "result": {}}).encode()}.get(path, b"")
    async with aiohttp.ClientSession() as http:
        before = await traffic(http, base)
        reply = await call(agent, method, path.format(session_id=session_id, run_id="run_x"), body, host=host, **headers)
        assert reply.status == status, reply
        if status == 200:  # the control: the run happened, and the checks below would see it
            assert sse_events(reply.body)[-1][0] == "final"
            assert await session_exists(agent, session_id)
            assert (await traffic(http, base)).model_requests == before.model_requests + 1
            return
        assert json.loads(reply.body)["error"]["status"] == status
        assert not await session_exists(agent, session_id)
        await assert_nothing_ran(http, base, before)


# ---------------------------------------------------------------------------------------------
# 2. AGENT_TOKEN on the gateway -> agent hop, LLM_PROXY_KEY on the agent -> llm_proxy hop
# ---------------------------------------------------------------------------------------------


async def test_with_both_secrets_set_a_turn_through_the_gateway_works(keyed: Stack) -> None:
    """The gateway sends AGENT_TOKEN, the agent LLM_PROXY_KEY: a chat turn completes end to end."""
    async with aiohttp.ClientSession() as http, await connect(http, keyed) as ws:
        frames = await turn(ws, "[scenario:chat] through every lock")
    assert completed(frames)["content"].startswith("You said: [scenario:chat] through every lock.")


AGENT_ROUTES = [("POST", RUNS_PATH), ("GET", EVENTS_PATH), ("POST", TOOL_RESULTS_PATH), ("POST", CANCEL_PATH)]
BAD_BEARERS = [None, "Bearer wrong", f"Bearer {AGENT_SECRET[:-1]}", f"Bearer {AGENT_SECRET}x", f"Basic {AGENT_SECRET}", f"Bearer {PROXY_SECRET}"]


@pytest.mark.parametrize("authorization", BAD_BEARERS, ids=["none", "wrong", "one_short", "one_extra", "basic", "other_secret"])
@pytest.mark.parametrize(("method", "path"), AGENT_ROUTES, ids=[f"{m} {p}" for m, p in AGENT_ROUTES])
async def test_a_direct_request_to_a_keyed_agent_without_its_token_is_401(
    keyed: Stack, method: str, path: str, authorization: str | None
) -> None:
    """Any process on the machine: 401 with WWW-Authenticate, on every route; nothing runs."""
    agent, session_id = keyed["agent"], fresh("ses_direct")
    body = {RUNS_PATH: run_body(session_id), TOOL_RESULTS_PATH: b'{"tool_call_id": "call_x", "result": {}}'}.get(path, b"")
    headers = {**(JSON if body else {}), **({} if authorization is None else {"Authorization": authorization})}
    async with aiohttp.ClientSession() as http:
        before = await traffic(http, keyed)
        reply = await call(agent, method, path.format(session_id=session_id, run_id="run_x"), body, **headers)
        assert reply.status == 401 and reply.headers["www-authenticate"] == "Bearer", reply
        assert "AGENT_TOKEN" in json.loads(reply.body)["error"]["message"]
        assert not await session_exists(agent, session_id, Authorization=f"Bearer {AGENT_SECRET}")
        await assert_nothing_ran(http, keyed, before)


async def test_healthz_of_a_keyed_agent_needs_no_token(keyed: Stack) -> None:
    reply = await call(keyed["agent"], "GET", "/healthz")
    assert reply.status == 200 and json.loads(reply.body)["service"] == "agent"


async def test_a_gateway_without_agent_token_gets_agent_unavailable_and_nothing_runs(keyed: Stack, log_root: Path) -> None:
    """A gateway that lacks AGENT_TOKEN in front of a keyed agent: an `error` naming the token; no run."""
    stray = stack_in(log_root, "tokenless-gateway", {**keyed.env, "AGENT_TOKEN": ""}, only=("gateway",))
    try:
        async with aiohttp.ClientSession() as http, await connect(http, stray) as ws:
            before = await traffic(http, keyed)
            frames = await turn(ws, "[scenario:chat] let me through")
            end = frames[-1]
            assert end["method"] == "error", frames
            assert end["params"]["code"] == "agent_unavailable" and end["params"]["retryable"] is False, end
            assert "401" in end["params"]["message"] and "AGENT_TOKEN" in end["params"]["message"], end
            await assert_nothing_ran(http, keyed, before)
    finally:
        stray.stop()


async def test_an_agent_without_llm_proxy_key_gets_llm_error_naming_it(keyed: Stack, log_root: Path) -> None:
    """An agent that lacks LLM_PROXY_KEY in front of a keyed llm_proxy: the run ends llm_error; nothing at the model."""
    stray = stack_in(log_root, "keyless-agent", {**keyed.env, "LLM_PROXY_KEY": "", "AGENT_TOKEN": ""}, only=("agent",))
    try:
        async with aiohttp.ClientSession() as http:
            before = await traffic(http, keyed)
            reply = await call(stray["agent"], "POST", RUNS_PATH, run_body(fresh("ses_keyless")), **JSON)
            assert reply.status == 200, reply
            kind, data = sse_events(reply.body)[-1]
            assert kind == "error" and data["code"] == "llm_error" and data["retryable"] is False, data
            assert "401" in data["message"] and "LLM_PROXY_KEY" in data["message"], data
            assert (await traffic(http, keyed)).model_requests == before.model_requests
    finally:
        stray.stop()


# ---------------------------------------------------------------------------------------------
# 3. Beyond loopback: the secret, or no start
# ---------------------------------------------------------------------------------------------


def run_service(name: str, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    full = {**os.environ, "PYTHONUNBUFFERED": "1", "GATEWAY_RUNTIME_DIR": str(log.parent / "runtime"), **env}
    return subprocess.Popen([sys.executable, f"{name}.py", *args], cwd=ROOT, env=full, stdout=log.open("wb"), stderr=subprocess.STDOUT)


@pytest.mark.parametrize(("name", "secret"), [("agent", "AGENT_TOKEN"), ("gateway", "GATEWAY_TOKEN")])
def test_a_non_loopback_bind_without_the_secret_refuses_to_start(log_root: Path, name: str, secret: str) -> None:
    """`--host 0.0.0.0` without AGENT_TOKEN (GATEWAY_TOKEN): exit status 2, a message naming it."""
    log = log_root / f"{name}-no-{secret.lower()}-{uuid.uuid4().hex[:6]}.log"
    process = run_service(name, ["--host", "0.0.0.0", "--port", str(free_port())], {secret: ""}, log)
    assert process.wait(30) == 2, log.read_text()
    assert "refusing to listen on 0.0.0.0:" in log.read_text() and f"without {secret}" in log.read_text()


@pytest.mark.parametrize(("name", "secret"), [("agent", "AGENT_TOKEN"), ("gateway", "GATEWAY_TOKEN")])
def test_a_non_loopback_bind_with_the_secret_starts(log_root: Path, name: str, secret: str) -> None:
    """The same command with the secret set starts and answers /healthz."""
    log, port = log_root / f"{name}-with-{secret.lower()}-{uuid.uuid4().hex[:6]}.log", free_port()
    service = Service(name, port, run_service(name, ["--host", "0.0.0.0", "--port", str(port)], {secret: SECRETS[secret]}, log), log)
    try:
        wait_healthy(service)
    finally:
        service.stop()


# ---------------------------------------------------------------------------------------------
# 4. Which pages may open the gateway's WebSocket
# ---------------------------------------------------------------------------------------------

HANDSHAKES = [
    ({"Origin": "http://evil.example"}, 403),
    ({"Origin": "null"}, 403),  # a sandboxed frame, a file:// page
    ({"Origin": "http://127.0.0.1:{port}.evil.example"}, 403),
    ({"Origin": "http://127.0.0.1:{port}"}, 101),  # the gateway's own origin
    ({"Origin": ALLOWED_ORIGIN}, 101),  # listed in GATEWAY_ALLOWED_ORIGINS
    ({}, 101),  # no Origin: ide.py, any program
    ({"Host": "evil.example:{port}"}, 403),  # DNS rebinding
    ({"Host": "evil.example:{port}", "Origin": "http://evil.example:{port}"}, 403),
]


@pytest.mark.parametrize(("headers", "status"), HANDSHAKES, ids=["foreign", "null", "lookalike", "own", "allowed", "none", "rebound", "rebound_same_origin"])
async def test_a_handshake_is_judged_by_its_origin_and_host_even_with_the_right_token(base: Stack, headers: dict[str, str], status: int) -> None:
    """A foreign Origin or Host is a plain 403 with the right token in hand; the rest run a turn."""
    port = base["gateway"].port
    named = {name: value.format(port=port) for name, value in headers.items()}
    async with aiohttp.ClientSession() as http:
        before = await traffic(http, base)
        if status == 403:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await connect(http, base, **named)
            assert refused.value.status == 403
            await assert_nothing_ran(http, base, before)
            return
        async with await connect(http, base, **named) as ws:
            completed(await turn(ws, "[scenario:chat] from a page I trust"))


# ---------------------------------------------------------------------------------------------
# 5. Tokens that are almost the token
# ---------------------------------------------------------------------------------------------

NEAR_MISSES: list[Callable[[str], str]] = [
    lambda token: token[:-1] + ("0" if token[-1] != "0" else "1"),  # the last character changed
    lambda token: token[:8],  # its first 8 characters only
    lambda token: token[:-1],  # one character short
    lambda token: token + "0",  # one character extra
]


@pytest.mark.parametrize("by", ["header", "query"])
@pytest.mark.parametrize("near_miss", NEAR_MISSES, ids=["last_changed", "first_8", "one_short", "one_extra"])
async def test_a_token_almost_right_is_closed_4401_before_the_agent(base: Stack, near_miss: Callable[[str], str], by: str) -> None:
    """Every character of the token counts: 4401, and nothing reaches the agent."""
    token = near_miss(base.token)
    assert token != base.token
    async with aiohttp.ClientSession() as http:
        before = await traffic(http, base)
        if by == "header":
            ws = await http.ws_connect(base.ws_url, headers={"Authorization": f"Bearer {token}"})
        else:
            ws = await http.ws_connect(f"{base.ws_url}?token={token}")
        await send(ws, user_message("[scenario:chat] almost"))
        msg = await ws.receive(timeout=OUTCOME_S)
        assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 4401, (msg, ws.close_code)
        await assert_nothing_ran(http, base, before)


# ---------------------------------------------------------------------------------------------
# 7. Bodies the agent will not read: too big, too deep, never sent
# ---------------------------------------------------------------------------------------------


def head(service: Service, path: str, **headers: str) -> bytes:
    """A POST head on `service`, JSON, with exactly these extra headers (names as Content_Length)."""
    named = {"Host": f"127.0.0.1:{service.port}", "Content-Type": "application/json", **{k.replace("_", "-"): v for k, v in headers.items()}}
    return request("POST", path, named)


async def test_a_run_over_the_body_limit_is_413_from_its_content_length(base: Stack) -> None:
    """A 3 MiB user message: 413 from Content-Length, before the body is read; no session, no run."""
    agent, session_id = base["agent"], fresh("ses_big")
    body = run_body(session_id, "x" * OVER_BODY)
    async with aiohttp.ClientSession() as http:
        before = await traffic(http, base)
        reply = await asyncio.to_thread(post_in_parts, agent.port, head(agent, RUNS_PATH, Content_Length=str(len(body))), [body[:65536]])
        assert reply.status == 413 and f"{len(body)} bytes, over the limit of {MAX_BODY}" in json.loads(reply.body)["error"]["message"], reply
        assert not await session_exists(agent, session_id)
        await assert_nothing_ran(http, base, before)


async def test_a_chunked_run_over_the_body_limit_is_413(base: Stack) -> None:
    """No Content-Length: refused as soon as the chunks pass the limit."""
    agent, session_id = base["agent"], fresh("ses_chunked")
    body = run_body(session_id, "x" * OVER_BODY)
    async with aiohttp.ClientSession() as http:
        before = await traffic(http, base)
        reply = await asyncio.to_thread(post_in_parts, agent.port, head(agent, RUNS_PATH, Transfer_Encoding="chunked"), chunked(body))
        assert reply.status == 413 and f"over the limit of {MAX_BODY} bytes" in json.loads(reply.body)["error"]["message"], reply
        assert not await session_exists(agent, session_id)
        await assert_nothing_ran(http, base, before)


async def test_a_tool_result_over_the_body_limit_is_413_and_the_run_goes_on(base: Stack) -> None:
    """An oversized tool result (chunked) is 413; the call stays pending and a normal answer ends the turn."""
    agent = base["agent"]
    async with aiohttp.ClientSession() as http, await connect(http, base) as ws:
        run_id, call_id = await open_tool_call(ws)
        body = json.dumps({"tool_call_id": call_id, "result": {"content": "x" * OVER_BODY}}).encode()
        path = TOOL_RESULTS_PATH.format(run_id=run_id)
        reply = await asyncio.to_thread(post_in_parts, agent.port, head(agent, path, Transfer_Encoding="chunked"), chunked(body))
        assert reply.status == 413, reply
        assert await agent_runs(http, agent) == 1  # still waiting for its answer
        await send(ws, file_answer(call_id, "answered after all\n"))
        frames = await collect_turn(ws, timeout=OUTCOME_S)
        assert "answered after all" in completed(frames)["content"]


async def test_a_body_nested_100000_deep_is_400_without_traceback(base: Stack) -> None:
    """JSON nested 100,000 deep: a 400 in the agent's error shape, no traceback, no run."""
    agent, session_id = base["agent"], fresh("ses_deep")
    body = b'{"session_id": "%s", "content": ' % session_id.encode() + b"[" * 100_000 + b"]" * 100_000 + b"}"
    async with aiohttp.ClientSession() as http:
        before = await traffic(http, base)
        reply = await call(agent, "POST", RUNS_PATH, body, **JSON)
        assert reply.status == 400, reply
        error = json.loads(reply.body)["error"]
        assert error["status"] == 400 and "nested too deeply" in error["message"], error
        assert not await session_exists(agent, session_id)
        await assert_nothing_ran(http, base, before)
    log = await wait_for_log(agent, "nested too deeply")
    assert "nested too deeply" in log and "Traceback" not in log


async def test_a_hang_up_before_the_body_is_one_log_line(base: Stack) -> None:
    """Headers say 1000 bytes, 10 come, the client leaves: one line in the agent's log, no traceback."""
    agent = base["agent"]
    before = agent.log()
    reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
    writer.write(head(agent, RUNS_PATH, Content_Length="1000") + run_body(fresh("ses_gone"))[:10])
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await wait_for_log(agent, "hung up before its request body arrived")
    await asyncio.sleep(QUIET_S)  # anything more it would write
    new = agent.log()[len(before) :].splitlines()
    assert len(new) == 1 and "hung up before its request body arrived" in new[0], new
    assert "Traceback" not in agent.log()


# ---------------------------------------------------------------------------------------------
# 8. Frames too big for the gateway: refused while they arrive, not held in memory
# ---------------------------------------------------------------------------------------------


def rss(pid: int) -> int:
    """The process's resident set size in bytes (/proc/PID/status, VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class PeakRss:
    """The highest RSS of a process, sampled every 5 ms in a thread while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, rss(pid), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def flood(http: aiohttp.ClientSession, stack: Stack, frame: str) -> list[int | None]:
    """FLOOD_FRAMES frames on one socket, a new socket whenever the gateway closes one; the close codes."""
    closes: list[int | None] = []
    ws: aiohttp.ClientWebSocketResponse | None = None
    for _ in range(FLOOD_FRAMES):
        if ws is None or ws.closed:
            ws = await connect(http, stack)
        sending = asyncio.create_task(ws.send_str(frame))  # the gateway may close before the frame is all out
        msg = await ws.receive(timeout=OUTCOME_S)
        with contextlib.suppress(ConnectionError):
            await sending
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            closes.append(ws.close_code)
            await ws.close()
        else:
            closes.append(None)  # answered: the frame was read whole
    if ws is not None:
        await ws.close()
    return closes


async def test_a_flood_of_10_mib_frames_does_not_grow_the_gateway(base: Stack) -> None:
    """8 sockets x 10 frames of 10 MiB: each cut at GATEWAY_MAX_FRAME_BYTES (1009); RSS grows < 50 MiB; it serves on."""
    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc to read the gateway's RSS from")
    gateway = base["gateway"]
    frame = json.dumps(user_message("[scenario:chat] " + "x" * FLOOD_FRAME_BYTES))
    async with aiohttp.ClientSession() as http:
        async with await connect(http, base) as ws:  # warm: a turn and one refused frame before the baseline
            completed(await turn(ws, "[scenario:chat] warm up"))
        await flood(http, base, frame[: 2 * 1024 * 1024])
        baseline = rss(gateway.process.pid)
        with PeakRss(gateway.process.pid) as peak:
            closes = await asyncio.gather(*(flood(http, base, frame) for _ in range(FLOOD_SOCKETS)))
        async with await connect(http, base) as ws:
            completed(await turn(ws, "[scenario:chat] still serving"))
    assert peak.peak - baseline < RSS_GROWTH_LIMIT, f"RSS grew from {baseline / 2**20:.1f} MiB by {(peak.peak - baseline) / 2**20:.1f} MiB"
    # 1009 when the close frame is read before the reset of the unsent rest, else 1006: cut, never answered
    assert all(code in (1009, 1006) for codes in closes for code in codes), closes


def upgrade(port: int, token: str) -> bytes:
    """A WebSocket handshake for /ws as literal bytes, with the token."""
    headers = {
        "Host": f"127.0.0.1:{port}", "Upgrade": "websocket", "Connection": "Upgrade", "Authorization": f"Bearer {token}",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13",
    }  # fmt: skip
    return "".join(f"{line}\r\n" for line in ["GET /ws HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items()), ""]).encode()


def send_fragmented(port: int, token: str, fragments: int, size: int) -> bytes:
    """A raw client: one text message in `fragments` frames of `size` bytes; the first bytes the server sends back.

    Blocking, for a thread: a socket reset while sending still lets recv() return what arrived
    before it (the close frame), which asyncio's transports drop.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=OUTCOME_S) as sock:
        sock.sendall(upgrade(port, token))
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        assert head.startswith(b"HTTP/1.1 101 "), head
        payload = b"x" * size
        with contextlib.suppress(OSError):  # the server hangs up on the rest
            for i in range(fragments):
                fin_opcode = (0x80 if i == fragments - 1 else 0) | (0x1 if i == 0 else 0x0)  # FIN; text, then continuations
                sock.sendall(bytes([fin_opcode, 0x80 | 127]) + struct.pack("!Q", size) + bytes(4) + payload)  # masked with key 0
        try:
            return sock.recv(1024)
        except OSError:
            return b""


async def test_a_message_in_small_fragments_is_cut_at_the_limit_too(base: Stack) -> None:
    """10 MiB as 40 fragments of 256 KiB, each under the limit: closed 1009 once the message passes it."""
    answer = await asyncio.to_thread(send_fragmented, base["gateway"].port, base.token, 40, 256 * 1024)
    assert answer[:1] == b"\x88" and int.from_bytes(answer[2:4], "big") == 1009, answer[:200]
    assert b"exceeds limit of 1048576 bytes" in answer


# ---------------------------------------------------------------------------------------------
# 9. What reaches the logs: long ids clipped, tokens never
# ---------------------------------------------------------------------------------------------


async def test_a_megabyte_tool_response_id_writes_a_few_hundred_bytes_of_log(base: Stack) -> None:
    """20 responses whose id is 1,000,000 characters, to a run waiting on a tool: a short line each."""
    gateway = base["gateway"]
    unknown = "response to an unknown request id"
    async with aiohttp.ClientSession() as http, await connect(http, base) as ws:
        run_id, call_id = await open_tool_call(ws)
        before = gateway.log()
        for _ in range(LONG_ID_FRAMES):
            await send(ws, file_answer("i" * LONG_ID_CHARS))
        await send(ws, {"jsonrpc": "2.0", "id": 7, "method": "cancel", "params": {"run_id": "run_other"}})
        assert (await recv(ws, OUTCOME_S))["id"] == 7  # frames are handled in order: the 20 are behind us
        after = await wait_for_log(gateway, unknown)
        growth = len(after.encode()) - len(before.encode())
        assert after.count(unknown) - before.count(unknown) == LONG_ID_FRAMES
        await send(ws, file_answer(call_id))
        completed(await collect_turn(ws, timeout=OUTCOME_S))
    assert growth <= LONG_ID_FRAMES * LOG_BYTES_PER_FRAME, f"the log grew {growth} bytes for {LONG_ID_FRAMES} frames"


@pytest.mark.parametrize("query", ["?%74oken={token}", "?tok%65n={token}", "?x=1&%74oken={token}"])
async def test_a_percent_encoded_token_name_is_accepted_and_never_logged(base: Stack, query: str) -> None:
    """`?%74oken=T` decodes to `token`: a turn runs, and T is in nothing any service logs meanwhile."""
    url = yarl.URL(base.ws_url + query.format(token=base.token), encoded=True)  # sent as written, not normalised
    assert "%" in url.raw_query_string
    before = {name: len(service.log()) for name, service in base.services.items()}
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        completed(await turn(ws, "[scenario:chat] by an odd name"))
    await asyncio.sleep(QUIET_S)  # the gateway's closing lines
    for name, service in base.services.items():
        assert base.token not in service.log()[before[name] :], f"the gateway token is in {name}'s log"


# ---------------------------------------------------------------------------------------------
# 10. Sessions the agent forgets: idle past SESSION_TTL_S, or the least recently used past the cap
# ---------------------------------------------------------------------------------------------


def resume(session_id: str, last_seq: int, id: int = 1) -> Frame:
    return {"jsonrpc": "2.0", "id": id, "method": "resume", "params": {"session_id": session_id, "last_seq": last_seq}}


async def chat_session(http: aiohttp.ClientSession, stack: Stack, content: str) -> tuple[str, int]:
    """A socket's one chat turn: (its session_id, the final's seq)."""
    async with await connect(http, stack) as ws:
        frames = await turn(ws, content)
    return frames[0]["result"]["session_id"], int(completed(frames)["seq"])


async def resumed(http: aiohttp.ClientSession, stack: Stack, session_id: str, last_seq: int) -> Frame:
    """The answer to a resume on a new socket: a result, or an error."""
    async with await connect(http, stack) as ws:
        await send(ws, resume(session_id, last_seq))
        return await recv(ws, OUTCOME_S)


async def test_a_session_idle_past_its_ttl_is_forgotten(short_lived: Stack) -> None:
    """SESSION_TTL_S=1: resumable at once; some seconds later, -32002."""
    async with aiohttp.ClientSession() as http:
        session_id, seq = await chat_session(http, short_lived, "[scenario:chat] remember me")
        assert (await resumed(http, short_lived, session_id, seq))["result"]["session_id"] == session_id
        await asyncio.sleep(SESSION_TTL_S + 1.5)  # the TTL, a sweep (every 0.25 s), and slack
        reply = await resumed(http, short_lived, session_id, seq)
        assert reply.get("error", {}).get("code") == UNKNOWN_SESSION, reply


async def test_a_third_session_evicts_the_least_recently_used_idle_one(two_sessions: Stack) -> None:
    """AGENT_MAX_SESSIONS=2: the third session runs; the oldest is gone (-32002), the second kept."""
    async with aiohttp.ClientSession() as http:
        first, first_seq = await chat_session(http, two_sessions, "[scenario:chat] one")
        second, second_seq = await chat_session(http, two_sessions, "[scenario:chat] two")
        third, _ = await chat_session(http, two_sessions, "[scenario:chat] three")  # it completes: room was made
        assert len({first, second, third}) == 3
        assert (await resumed(http, two_sessions, first, first_seq)).get("error", {}).get("code") == UNKNOWN_SESSION
        assert (await resumed(http, two_sessions, second, second_seq))["result"]["session_id"] == second


# ---------------------------------------------------------------------------------------------
# 11. A run's events are bounded, and a consumer that never reads does not hold a run
# ---------------------------------------------------------------------------------------------


async def test_a_run_over_agent_max_run_bytes_ends_output_too_large(short_lived: Stack) -> None:
    """AGENT_MAX_RUN_BYTES=4000 and 5000 tokens: an `error` output_too_large, not retryable; no run left."""
    async with aiohttp.ClientSession() as http, await connect(http, short_lived) as ws:
        frames = await turn(ws, "[tokens:5000]")
        end = frames[-1]
        assert end["method"] == "error" and end["params"]["code"] == "output_too_large", end
        assert end["params"]["retryable"] is False and "AGENT_MAX_RUN_BYTES" in end["params"]["message"]
        await until_no_runs(http, short_lived["agent"])


def send_buffer_max() -> int:
    """The most a TCP socket's send buffer autotunes to (tcp_wmem's max; loopback gets it at once)."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 * 1024 * 1024  # Linux's default


async def test_a_run_ends_while_its_consumer_never_reads(base: Stack) -> None:
    """A raw client POSTs a long run to the agent and reads nothing: the run still ends; its socket stays open.

    The run's events must outgrow what the kernel buffers for the stream (the agent's send buffer,
    up to tcp_wmem's max), so that the stream really stops; 2 MiB more covers uvicorn's buffer.
    """
    agent, session_id = base["agent"], fresh("ses_deaf")
    tokens = (send_buffer_max() + 2 * 1024 * 1024) // WIRE_BYTES_PER_TOKEN
    body = run_body(session_id, f"[tokens:{tokens}]")
    deaf = socket.socket()
    deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the agent's writes back up at once
    try:
        deaf.connect(("127.0.0.1", agent.port))
        deaf.sendall(head(agent, RUNS_PATH, Content_Length=str(len(body))) + body)
        async with aiohttp.ClientSession() as http:
            while await agent_runs(http, agent) == 0 and session_id not in agent.log():
                await asyncio.sleep(0.02)  # until the run has started (or ended: its end line names the session)
            await until_no_runs(http, agent)
        # completed, or output_too_large where tcp_wmem's max is over AGENT_MAX_RUN_BYTES: ended either way
        assert re.search(rf"run \S+ session {session_id}: (completed|output_too_large) in \d+ ms", agent.log()), "the run did not end"
        assert deaf.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""  # still open, its data unread
    finally:
        deaf.close()


# ---------------------------------------------------------------------------------------------
# 12. Slow clients: a request head must be whole within HEADER_TIMEOUT_S
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["agent", "gateway"])
async def test_trickling_heads_are_cut_while_a_real_request_is_served(impatient: Stack, name: str) -> None:
    """20 connections trickling a head are closed (408 or EOF) about 1 s after they open; /healthz answers meanwhile."""
    service = impatient[name]
    data = request("GET", "/healthz", {"Host": f"127.0.0.1:{service.port}"})

    async def trickle() -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        started = time.monotonic()
        for byte in data[:4]:  # a byte every 150 ms, then silence: no write races the server's close
            writer.write(bytes([byte]))
            await asyncio.sleep(0.15)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return answer, time.monotonic() - started

    slow = [asyncio.create_task(trickle()) for _ in range(20)]
    await asyncio.sleep(0.3)
    started = time.monotonic()
    assert (await call(service, "GET", "/healthz")).status == 200
    assert time.monotonic() - started < HEADER_TIMEOUT_S
    for answer, elapsed in await asyncio.gather(*slow):
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer
        assert 0.9 * HEADER_TIMEOUT_S <= elapsed < 3 * HEADER_TIMEOUT_S, elapsed


# ---------------------------------------------------------------------------------------------
# 13. Faults: the proxy dies mid-stream; the model writes a tool-call id that is a number
# ---------------------------------------------------------------------------------------------


async def test_llm_proxy_killed_mid_stream_is_llm_stream_broken_retryable(log_root: Path) -> None:
    """SIGKILL to llm_proxy while tokens stream: the IDE gets `error` llm_stream_broken, retryable; no run left."""
    stack = await asyncio.to_thread(stack_in, log_root, "killed-proxy")
    try:
        async with aiohttp.ClientSession() as http, await connect(http, stack) as ws:
            await send(ws, user_message("[tokens:500] [delay:20]"))
            assert "result" in await recv(ws, OUTCOME_S)
            assert (await recv(ws, OUTCOME_S))["method"] == "token"
            os.kill(stack["llm_proxy"].process.pid, signal.SIGKILL)
            while (frame := await recv(ws, OUTCOME_S))["method"] == "token":
                pass
            assert frame["method"] == "error", frame
            assert frame["params"]["code"] == "llm_stream_broken" and frame["params"]["retryable"] is True, frame
            await until_no_runs(http, stack["agent"], OUTCOME_S)
    finally:
        stack.stop()


@pytest.fixture
async def numbered_call(upstream: Upstream, log_root: Path) -> AsyncIterator[Stack]:
    """llm_proxy, agent (TOOL_TIMEOUT_S=30) and gateway on a script whose tool-call id is the number 12345."""
    call = {"index": 0, "id": 12345, "type": "function", "function": {"name": "read_file", "arguments": '{"path": "n.txt"}'}}
    upstream.replies = [ScriptedCompletion([[opening(), delta(tool_calls=[call])], [delta(finish="tool_calls")]]), text_reply("Read n.txt.")]
    env = {"OPENAI_BASE_URL": upstream.base_url, "TOOL_TIMEOUT_S": "30"}
    stack = await asyncio.to_thread(stack_in, log_root, "numbered", env, ("llm_proxy", "agent", "gateway"))
    yield stack
    stack.stop()


@dataclass
class AnsweredTurn:
    frames: list[Frame]  # the result, the tool request, the final
    call_id: Any  # the tool request's id, as the IDE got it
    asked_after: float  # seconds from the user_message to the tool request
    ended_after: float  # seconds from the user_message to the turn's end


async def answered_turn(stack: Stack) -> AnsweredTurn:
    """A turn whose one read_file is answered at once."""
    started = time.monotonic()
    asked: list[tuple[Any, float]] = []

    async def answer(frame: Frame) -> Frame:
        asked.append((frame["id"], time.monotonic() - started))
        assert frame["method"] == "read_file" and frame["params"] == {"path": "n.txt"}, frame
        return file_answer(frame["id"], "n\n")

    async with aiohttp.ClientSession() as http, await connect(http, stack) as ws:
        await send(ws, user_message("Read n.txt"))
        frames = await collect_turn(ws, answer, OUTCOME_S)
    assert len(asked) == 1, frames
    return AnsweredTurn(frames, asked[0][0], asked[0][1], time.monotonic() - started)


async def test_a_numeric_tool_call_id_does_not_stall_the_turn(numbered_call: Stack) -> None:
    """`"id": 12345` from the model: the IDE is asked at once (not after TOOL_TIMEOUT_S=30) and the turn completes."""
    turn = await answered_turn(numbered_call)
    assert completed(turn.frames)["content"] == "Read n.txt."
    assert isinstance(turn.call_id, str), turn.call_id
    assert turn.asked_after < 5 and turn.ended_after < 5, (turn.asked_after, turn.ended_after)


async def test_a_replaced_tool_call_id_is_the_same_in_the_models_history(numbered_call: Stack, upstream: Upstream) -> None:
    """The agent's own id for a numeric one must name the call in the assistant message and its tool message alike."""
    turn = await answered_turn(numbered_call)
    completed(turn.frames)
    assistant, tool = upstream.requests[1]["messages"][-2:]
    (tool_call,) = assistant["tool_calls"]
    assert isinstance(tool_call["id"], str), assistant  # OpenAI wants a string
    assert tool_call["id"] == tool["tool_call_id"] == turn.call_id, (assistant, tool)


# ---------------------------------------------------------------------------------------------
# Last: no secret in any log this module produced
# ---------------------------------------------------------------------------------------------


def test_no_log_of_any_service_holds_a_secret(log_root: Path) -> None:
    """GATEWAY_TOKEN, AGENT_TOKEN and LLM_PROXY_KEY appear in none of this module's logs, refused or accepted."""
    logs = sorted(log_root.rglob("*.log"))
    assert logs
    for path in logs:
        text = path.read_text(errors="replace")
        for name, secret in SECRETS.items():
            assert secret not in text, f"{name} is in {path.name}"
