"""The scale-out harness on real processes: nginx (deploy/nginx.conf.template, run by
deploy/nginx.sh) in front of gateways and agents, as conftest's scaled stacks and
Procfile.scale run it.

Each test pins one promise of the config: a WebSocket turn goes through to each gateway; an
agent's SSE events pass one by one; requests alternate over the agents (no stickiness); a POST
that reached an agent is never replayed on another, while a refused connection is retried; each
replica gets headers its Guard accepts. Small raw-socket fakes stand in for a replica where the
test must see exactly what nginx sent. All but the last run without REDIS_URL (each agent keeps
its own memory); the last runs REFAGENT_TEST_MODE=redis's stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from conftest import Scale, Stack
from nginx_server import start_nginx
from servers import free_port
from wsclient import collect_turn, send, user_message

READ_CALL = '[call:{"name": "read_file", "arguments": {"path": "big.txt"}}]'
BIG = "x" * 300_000  # a tool result far over nginx's in-memory body buffer (16 KiB)
SLOW_TOKENS, SLOW_DELAY_MS = 12, 250  # a 3 s run: long enough to look at while it streams


def connections_to(port: int) -> int:
    """ESTABLISHED TCP connections to 127.0.0.1:port, as the kernel counts them (/proc/net/tcp)."""
    local = f"0100007F:{port:04X}"  # 127.0.0.1 in the kernel's little-endian hex
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return sum(1 for row in rows if row[1] == local and row[3] == "01")  # 01: ESTABLISHED


def agent_runs(stack: Stack) -> list[int]:
    """Each agent's own count of the runs it is executing, asked directly (not through nginx)."""
    counts = []
    for agent in stack.replicas("agent"):
        with urllib.request.urlopen(f"{agent.url}/healthz", timeout=5) as response:
            counts.append(json.load(response)["runs"])
    return counts


async def answer_read(frame: dict[str, Any]) -> dict[str, Any]:
    result = {"path": "big.txt", "content": BIG, "start_line": 1, "end_line": 1, "total_lines": 1, "truncated": False}
    return {"jsonrpc": "2.0", "id": frame["id"], "result": result}


async def next_event(response: aiohttp.ClientResponse) -> str:
    """The `event:` name of the next SSE event on an agent stream (comments skipped)."""
    name = ""
    while True:
        line = (await asyncio.wait_for(response.content.readline(), 10)).decode().rstrip("\r\n")
        if line.startswith("event:"):
            name = line.partition(":")[2].strip()
        elif line == "" and name:
            return name


async def open_run(http: aiohttp.ClientSession, stack: Stack, session_id: str, content: str) -> aiohttp.ClientResponse:
    """POST /v1/runs through stack.agent_url, as a gateway opens a run; the open SSE response."""
    response = await http.post(f"{stack.agent_url}/v1/runs", json={"session_id": session_id, "content": content})
    assert response.status == 200, await response.text()
    return response


async def test_websocket_turn_with_a_tool_call_reaches_each_of_two_gateways(make_stack) -> None:  # type: ignore[no-untyped-def]
    """Two IDE sockets through nginx land on two gateways; each runs a turn with a 300 KB tool result."""
    stack: Stack = make_stack(scale=Scale(agents=1, gateways=2))
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {stack.token}"}
        sockets = [await http.ws_connect(stack.ws_url, headers=headers) for _ in range(2)]
        assert [connections_to(gateway.port) for gateway in stack.replicas("gateway")] == [1, 1]  # least_conn
        for ws in sockets:
            await send(ws, user_message(READ_CALL))
            frames = await collect_turn(ws, answer_read)
            assert frames[-1]["method"] == "final", frames[-1]
            assert frames[-1]["params"]["status"] == "completed"
            await ws.close()


async def test_agent_events_pass_nginx_one_by_one(make_stack) -> None:  # type: ignore[no-untyped-def]
    """The first token event arrives while the run is still going, seconds before its final."""
    stack: Stack = make_stack(scale=Scale(nginx=True))  # one of each, nginx in front
    async with aiohttp.ClientSession() as http:
        response = await open_run(http, stack, "ses_infra_sse", f"[tokens:{SLOW_TOKENS}] [delay:{SLOW_DELAY_MS}]")
        assert await next_event(response) == "token"
        first = time.monotonic()
        assert agent_runs(stack) == [1]  # buffered, it would have come with the rest at the run's end
        while (event := await next_event(response)) == "token":
            pass
        assert event == "final"
        assert time.monotonic() - first >= (SLOW_TOKENS - 2) * SLOW_DELAY_MS / 1000 / 2  # a lower bound: load only adds
        response.close()


async def test_round_robin_alternates_over_two_agents(make_stack) -> None:  # type: ignore[no-untyped-def]
    """Four runs opened one after another go two to each agent; /healthz calls alternate strictly."""
    stack: Stack = make_stack(scale=Scale(agents=2))
    async with aiohttp.ClientSession() as http:
        streams = []
        for i in range(4):
            streams.append(await open_run(http, stack, f"ses_infra_rr{i}", f"[tokens:{SLOW_TOKENS}] [delay:{SLOW_DELAY_MS}]"))
            assert await next_event(streams[-1]) == "token"  # the run is on its agent now
        assert agent_runs(stack) == [2, 2]
        for _ in range(6):
            async with http.get(f"{stack.agent_url}/healthz") as response:
                assert response.status == 200
        for response in streams:
            response.close()
    assert stack.nginx is not None
    healthz = [line for line in stack.nginx.access_log().splitlines() if '"GET /healthz"' in line]
    upstreams = [line.partition("upstream=")[2].split()[0] for line in healthz]
    assert len(set(upstreams)) == 2 and all(a != b for a, b in zip(upstreams, upstreams[1:])), upstreams


@dataclass
class FakeAgent:
    """A raw TCP upstream that counts the requests it reads, then answers 200 or hangs up unanswered."""

    answers: bool
    hits: int = 0
    port: int = 0
    heads: list[dict[str, str]] = field(default_factory=list)  # each request's headers, names in lower case

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")[1:]
        head = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines if line)}
        await reader.readexactly(int(head.get("content-length", "0")))
        self.hits += 1
        self.heads.append(head)
        if self.answers:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def serving(fakes: list[FakeAgent]) -> AsyncIterator[None]:
    """The fakes listening on free ports (fake.port) while the block runs."""
    servers = [await asyncio.start_server(fake.handle, "127.0.0.1", 0) for fake in fakes]
    for fake, server in zip(fakes, servers):
        fake.port = server.sockets[0].getsockname()[1]
    try:
        yield
    finally:
        for server in servers:
            server.close()


@pytest.mark.parametrize(("method", "reached"), [("POST", 1), ("GET", 2)])
async def test_a_request_an_agent_dropped_is_retried_only_if_idempotent(tmp_path: Path, method: str, reached: int) -> None:
    """Two agents that hang up unanswered: a POST reaches one of them (502), a GET both."""
    fakes = [FakeAgent(answers=False), FakeAgent(answers=False)]
    async with serving(fakes):
        proxy = start_nginx(tmp_path, [free_port()], [fake.port for fake in fakes])
        try:
            async with aiohttp.ClientSession() as http:
                async with http.request(method, f"{proxy.agent_url}/v1/runs/run_x/cancel", json={} if method == "POST" else None) as response:
                    assert response.status == 502
        finally:
            proxy.stop()
    assert sum(fake.hits for fake in fakes) == reached


async def test_a_post_to_an_agent_that_is_down_goes_to_the_next(tmp_path: Path) -> None:
    """A refused connection sent nothing: the POST is passed to the next agent and succeeds."""
    fake = FakeAgent(answers=True)
    async with serving([fake]):
        down = free_port()  # nothing listens there
        proxy = start_nginx(tmp_path, [free_port()], [down, fake.port])
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(2):  # round robin: one of the two starts at the port that is down
                    async with http.post(f"{proxy.agent_url}/v1/runs/run_x/cancel", json={}) as response:
                        assert response.status == 200
        finally:
            proxy.stop()
        assert fake.hits == 2
        assert f"upstream=127.0.0.1:{down}, 127.0.0.1:{fake.port}" in proxy.access_log()


async def test_agents_get_a_loopback_host_and_the_gateways_own_headers(tmp_path: Path) -> None:
    """Host: localhost (the agents' Guard allows it), keep-alive, and Authorization and Last-Event-ID as sent."""
    fake = FakeAgent(answers=True)
    async with serving([fake]):
        proxy = start_nginx(tmp_path, [free_port()], [fake.port])
        try:
            async with aiohttp.ClientSession() as http:
                headers = {"Authorization": "Bearer agent-secret", "Last-Event-ID": "7", "Connection": "close"}
                async with http.get(f"{proxy.agent_url}/v1/sessions/ses_x/events", headers=headers) as response:
                    assert response.status == 200
        finally:
            proxy.stop()
    [head] = fake.heads
    assert (head["host"], head["authorization"], head["last-event-id"]) == ("localhost", "Bearer agent-secret", "7")
    assert "connection" not in head  # HTTP/1.1 without `Connection: close`: the connection is kept for the next request


async def test_gateways_get_the_ides_host_and_its_upgrade(tmp_path: Path) -> None:
    """The handshake reaches a gateway with the Host the IDE used (port and all) and the Upgrade headers."""
    fake = FakeAgent(answers=True)  # answers 200, not 101: the handshake fails once the fake has read it
    async with serving([fake]):
        proxy = start_nginx(tmp_path, [fake.port], [free_port()])
        try:
            async with aiohttp.ClientSession() as http:
                with pytest.raises(aiohttp.WSServerHandshakeError):
                    await http.ws_connect(f"{proxy.ws_url}?token=secret-in-the-query", headers={"Origin": f"http://127.0.0.1:{proxy.ws_port}"})
        finally:
            proxy.stop()
        access_log = proxy.access_log()
    [head] = fake.heads
    assert (head["host"], head["upgrade"], head["connection"]) == (f"127.0.0.1:{proxy.ws_port}", "websocket", "upgrade")
    assert head["origin"] == f"http://127.0.0.1:{proxy.ws_port}"  # what the gateway's same-origin check compares with Host
    assert '"GET /ws"' in access_log and "secret-in-the-query" not in access_log  # no token in nginx's log either


async def test_redis_mode_runs_tool_turns_on_two_gateways_and_two_agents(make_stack) -> None:  # type: ignore[no-untyped-def]
    """REFAGENT_TEST_MODE=redis's stack: tool turns on two sockets complete, their state under the stack's prefix."""
    stack: Stack = make_stack(scale="redis")
    assert [len(stack.replicas(kind)) for kind in ("agent", "gateway")] == [2, 2]
    assert stack.redis is not None and stack.env["REDIS_URL"] == stack.redis.url
    async with aiohttp.ClientSession() as http:
        sockets = [await http.ws_connect(stack.ws_url, headers={"Authorization": f"Bearer {stack.token}"}) for _ in range(2)]
        for ws in sockets:
            for _ in range(2):  # a second turn: its history lives in Redis, whichever agent runs it
                await send(ws, user_message(READ_CALL))
                frames = await collect_turn(ws, answer_read)
                assert frames[-1]["params"]["status"] == "completed", frames[-1]
            await ws.close()
    keys = redis.Redis.from_url(stack.redis.url).keys("*")
    assert keys and all(key.startswith(stack.env["REDIS_PREFIX"].encode()) for key in keys), keys
