"""Scale-out faults (CONTRACT v2, "Scale-out: REDIS_URL"), end to end on real processes.

    IDE (this file) ⇄ nginx ⇄ gateway, gateway2 → nginx → agent, agent2 → llm_proxy → fake_llm
                                                              ⇅
                                                         redis-server

Every test runs on a scaled stack (conftest's "redis" mode: two agents behind nginx with no
stickiness, two gateways, one redis-server) and injects one of the issue's faults: an agent
SIGKILLed or SIGSTOPped mid-run, Redis killed and started again, Redis stalled by DEBUG SLEEP,
a gateway SIGKILLed. Each checks the contract's outcome within its bound, that the IDE saw every
seq once and in order, and that the next turn runs. The last test plays a whole session with tool
calls and a resume through nginx and checks that both agents served it.

Two stacks: `lease_stack` has AGENT_LEASE_S = 2 (an owner's death is noticed within seconds);
`stack` keeps the default 10 s lease, which a 2 s Redis stall must not outlast. One test fails on
purpose, pinning a gap (an owner frozen under the IDE's own stream): its comment says why.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio

from conftest import Service, Stack, start, start_stack, wait_healthy
from protocol import ERR_AGENT_LOST, ERR_STORE, UNKNOWN_SESSION, WS_SUPERSEDED
from store_redis import HISTORY, LOG, RedisStore
from wsclient import Frame, call_marker, connect, drop, is_end, is_tool_request, recv, resume, seqs, start_turn, texts, token_text, unique, until

# ---------------------------------------------------------------------------------------------
# Bounds and knobs. Every time is a generous hang bound for a loaded 2-core machine, except
# LOST_BOUND_S, which the contract fixes.
# ---------------------------------------------------------------------------------------------

LEASE_S = 2.0  # lease_stack's AGENT_LEASE_S
LOST_BOUND_S = LEASE_S + 5  # an owner dies -> the IDE sees agent_lost (CONTRACT, "Scale-out")
GRACE_S = 60  # RESUME_GRACE_S: longer than any test, so no run is cancelled for want of a stream
OUTCOME_S = 10.0  # a frame, an end, a health answer: a hang bound, not a speed assertion
STALL_S = 2  # DEBUG SLEEP: how long Redis stops answering

WebSocket = aiohttp.ClientWebSocketResponse


@pytest.fixture(scope="module")
def lease_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Two agents with a 2 s lease, two gateways, nginx, Redis."""
    s = start_stack(tmp_path_factory.mktemp("scale-lease"), {"AGENT_LEASE_S": str(LEASE_S), "RESUME_GRACE_S": str(GRACE_S)}, scale="redis")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Two agents with the default lease, two gateways, nginx, Redis."""
    s = start_stack(tmp_path_factory.mktemp("scale"), {"RESUME_GRACE_S": str(GRACE_S)}, scale="redis")
    yield s
    s.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def store(lease_stack: Stack) -> AsyncIterator[RedisStore]:
    """A client of lease_stack's Redis under the agents' prefix: the key layout is store_redis's own."""
    client = RedisStore(lease_stack.redis.url, prefix=lease_stack.env["REDIS_PREFIX"])
    yield client
    await client.close()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def assert_contiguous(frames: list[Frame], first: int = 1) -> None:
    """Every seq once, in order, from `first`: nothing lost, nothing doubled."""
    got = seqs(frames)
    assert got == list(range(first, first + len(got))), f"seqs not contiguous from {first}: {got}"


def answer(frame: Frame) -> Frame:
    """A test IDE's answer to a tool request: read_file gets a small file, apply_patch applies."""
    if frame["method"] == "apply_patch":
        return {"jsonrpc": "2.0", "id": frame["id"], "result": {"applied": True, "files": ["src/app.js"]}}
    assert frame["method"] == "read_file", frame
    path = frame["params"]["path"]
    content = "function main() {\n  return 1;\n}\n" if path.endswith(".js") else f"contents of {path}\n"
    return {"jsonrpc": "2.0", "id": frame["id"], "result": {"path": path, "content": content, "start_line": 1, "end_line": 3, "total_lines": 3, "truncated": False}}


async def answered_turn(ws: WebSocket, frames: list[Frame], bound: float = OUTCOME_S) -> Frame:
    """Answer every tool request until the run's end; return the end."""
    while True:
        frame = await until(ws, lambda f: is_end(f) or is_tool_request(f), frames, bound)
        if is_end(frame):
            return frame
        await ws.send_str(json.dumps(answer(frame)))


async def health(http: aiohttp.ClientSession, service: Service) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{service.url}/healthz", timeout=aiohttp.ClientTimeout(total=OUTCOME_S)) as response:
        return response.status, await response.json()


async def health_ok(http: aiohttp.ClientSession, agent: Service) -> bool:
    return (await health(http, agent))[0] == 200


async def owner_of_the_run(http: aiohttp.ClientSession, stack: Stack) -> tuple[Service, Service]:
    """(the agent running the one run in progress, the other agent), from each one's /healthz "runs"."""
    deadline = time.monotonic() + OUTCOME_S
    while True:
        agents = stack.replicas("agent")
        runs = [(await health(http, agent))[1]["runs"] for agent in agents]
        if sorted(runs) == [0, 1]:
            owner = agents[runs.index(1)]
            return owner, next(agent for agent in agents if agent is not owner)
        assert time.monotonic() < deadline, f"expected one agent running one run, got runs={runs}"
        await asyncio.sleep(0.05)


async def wait_for(check: Callable[[], Any], what: str, bound: float = OUTCOME_S) -> None:
    """Poll `check` (sync or async) until it is true, or fail naming `what`."""
    deadline = time.monotonic() + bound
    while True:
        ok = check()
        if asyncio.iscoroutine(ok):
            ok = await ok
        if ok:
            return
        assert time.monotonic() < deadline, f"not within {bound} s: {what}"
        await asyncio.sleep(0.05)


def ran_on(agent: Service, run_id: str) -> bool:
    """True when `agent`'s log has the run's end line as completed: "run <id> session <sid>: completed in N ms"."""
    return any(line.startswith(f"run {run_id} session ") and ": completed in " in line for line in agent_lines(agent))


def agent_lines(agent: Service) -> list[str]:
    """The agent's log lines, each without its "time agent LEVEL " head."""
    return [line.split(" agent ", 1)[1].split(" ", 1)[1] for line in agent.log().splitlines() if " agent " in line]


# ---------------------------------------------------------------------------------------------
# An agent dies, or pauses past its lease
# ---------------------------------------------------------------------------------------------


async def test_owner_killed_mid_run_is_agent_lost_within_lease_plus_5s_and_next_turn_runs_elsewhere(lease_stack: Stack, store: RedisStore, http: aiohttp.ClientSession) -> None:
    """SIGKILL the owner as it waits on a tool: agent_lost within the bound; history kept; the other agent runs on."""
    stack = lease_stack
    content = unique(call_marker("read_file", path="a.txt") + " " + call_marker("read_file", path="b.txt"))
    ws = await connect(http, stack)
    started = await start_turn(ws, content)
    frames: list[Frame] = []
    first = await until(ws, is_tool_request, frames)
    await ws.send_str(json.dumps(answer(first)))  # step 1 completes: its call and result go to the history
    pending = await until(ws, is_tool_request, frames)
    assert pending["params"] == {"path": "b.txt"}, pending
    owner, survivor = await owner_of_the_run(http, stack)
    try:
        owner.process.kill()
        owner.process.wait(5)
        killed = time.monotonic()
        end = await until(ws, is_end, frames, LOST_BOUND_S + 1)
        lost_after = time.monotonic() - killed
        assert end["method"] == "error" and end["params"]["code"] == ERR_AGENT_LOST and end["params"]["retryable"] is True, end
        assert end["params"]["run_id"] == started["run_id"], end
        assert lost_after <= LOST_BOUND_S, f"agent_lost {lost_after:.2f} s after the kill; the bound is {LOST_BOUND_S} s"
        resent = [f for f in frames[frames.index(pending) + 1:] if is_tool_request(f)]
        assert all(f["id"] == pending["id"] for f in resent), "only the waiting call may come again, with its own id"
        assert_contiguous(frames)

        history = [json.loads(item) for item in await store.redis.lrange(store.keys(started["session_id"])[HISTORY], 0, -1)]
        assert [m["role"] for m in history] == ["user", "assistant", "tool"], history  # the message and the complete step
        assert history[0]["content"] == content and history[1]["tool_calls"][0]["id"] == first["id"], history

        chat = unique("[scenario:chat] are you still there?")
        after = await start_turn(ws, chat, id=2)
        assert after["session_id"] == started["session_id"]
        more: list[Frame] = []
        end = await until(ws, is_end, more)
        assert end["method"] == "final" and end["params"]["status"] == "completed", end
        assert end["params"]["content"] == f"You said: {chat}. Earlier you said: {content}.", end
        assert_contiguous(frames + more)
        await wait_for(lambda: ran_on(survivor, after["run_id"]), f"the next run {after['run_id']} completes on {survivor.name}")  # its line follows its final
    finally:
        stack.restart(owner.name)  # for the tests after this one; nginx tries it again within 2 s


async def test_owner_paused_past_its_lease_is_agent_lost_and_writes_nothing_more(lease_stack: Stack, store: RedisStore, http: aiohttp.ClientSession) -> None:
    """SIGSTOP the owner: the other agent declares agent_lost in time; after SIGCONT the owner is fenced out."""
    stack = lease_stack
    ws = await connect(http, stack)
    started = await start_turn(ws, unique("[delay:50] [tokens:200]"))
    session_id, run_id = started["session_id"], started["run_id"]
    before: list[Frame] = []
    await until(ws, lambda f: len(texts(before).split()) >= 3, before)
    owner, survivor = await owner_of_the_run(http, stack)
    # The IDE's stream comes from the owner itself until it resumes through a gateway wired straight
    # to the other agent: that agent's reader is then the one that notices the lease lapse.
    beside = start("gateway3", {**stack.env, "AGENT_URL": survivor.url}, stack.log_dir)
    stopped = False
    try:
        wait_healthy(beside)
        ws2 = await connect(http, stack, beside)
        reply = await resume(ws2, session_id, seqs(before)[-1])
        assert reply["result"]["run_id"] == run_id, reply
        msg = await ws.receive(timeout=OUTCOME_S)
        while msg.type == aiohttp.WSMsgType.TEXT:  # tokens already on their way, then the takeover
            msg = await ws.receive(timeout=OUTCOME_S)
        assert ws.close_code == WS_SUPERSEDED, (msg, ws.close_code)
        after: list[Frame] = []
        await until(ws2, lambda f: f.get("method") == "token" and f["params"]["seq"] > reply["result"]["last_seq"], after)  # live
        owner.process.send_signal(signal.SIGSTOP)
        stopped, paused = True, time.monotonic()
        end = await until(ws2, is_end, after, LOST_BOUND_S + 1)
        lost_after = time.monotonic() - paused
        assert end["method"] == "error" and end["params"]["code"] == ERR_AGENT_LOST and end["params"]["retryable"] is True, end
        assert lost_after <= LOST_BOUND_S, f"agent_lost {lost_after:.2f} s after SIGSTOP; the bound is {LOST_BOUND_S} s"
        assert_contiguous(before + after)
        assert token_text(200).startswith(texts(before + after))
        lost_seq = end["params"]["seq"]
    finally:
        if stopped:
            owner.process.send_signal(signal.SIGCONT)
        beside.stop()

    # Awake again, the owner finds its lease gone: its run ends, and every write of it is refused.
    await wait_for(lambda: any(line.startswith(f"run {run_id} session ") for line in agent_lines(owner)), f"{owner.name} ends run {run_id}")
    log = [(entry_id, fields["kind"]) for entry_id, fields in await store.redis.xrange(store.keys(session_id)[LOG])]
    lost_at = log.index((f"{lost_seq}-0", "error"))
    assert {kind for _, kind in log[lost_at + 1:]} <= {"attach"}, f"written after agent_lost: {log[lost_at + 1:]}"
    end_line = next(line for line in agent_lines(owner) if line.startswith(f"run {run_id} session "))
    assert "fenced" in end_line or "not logged: LeaseLost" in end_line, f"refused by the lease, or not at all? {end_line}"

    ws3 = await connect(http, stack)
    reply = await resume(ws3, session_id, lost_seq)
    assert reply["result"] == {"session_id": session_id, "run_id": None, "last_seq": lost_seq}, reply
    await start_turn(ws3, unique("[scenario:chat] and now?"), id=2)
    frames: list[Frame] = []
    end = await until(ws3, is_end, frames)
    assert end["method"] == "final" and end["params"]["status"] == "completed", end
    assert_contiguous(frames, lost_seq + 1)  # nothing from the old owner came in between


async def test_owner_frozen_under_the_ides_own_stream_is_agent_lost_within_lease_plus_5s(lease_stack: Stack, http: aiohttp.ClientSession) -> None:
    """The owner frozen while the IDE's stream comes from it (as a host that hangs or loses power: no RST)."""
    # The gateway takes two missed heartbeats (the agent beats 4 times per lease with Redis) for a
    # broken stream, and a re-attach that lands on the frozen replica is cut after as long: it
    # waited AGENT_READ_TIMEOUT_S (60 s) before.
    stack = lease_stack
    ws = await connect(http, stack)
    await start_turn(ws, unique("[delay:50] [tokens:400]"))
    frames: list[Frame] = []
    await until(ws, lambda f: len(texts(frames).split()) >= 3, frames)
    owner, _ = await owner_of_the_run(http, stack)
    owner.process.send_signal(signal.SIGSTOP)
    try:
        end = await until(ws, is_end, frames, LOST_BOUND_S)
    except (TimeoutError, AssertionError):  # no end within the bound, or the socket closed under it
        pytest.fail(f"no agent_lost within {LOST_BOUND_S} s of freezing {owner.name}: the gateway still waits on its silent stream")
    finally:
        owner.process.send_signal(signal.SIGCONT)
    assert end["method"] == "error" and end["params"]["code"] == ERR_AGENT_LOST, end


# ---------------------------------------------------------------------------------------------
# Redis slow, Redis gone
# ---------------------------------------------------------------------------------------------


async def test_redis_stalled_2s_mid_stream_loses_and_doubles_nothing(stack: Stack, http: aiohttp.ClientSession) -> None:
    """DEBUG SLEEP 2 while a turn streams: the turn completes, every seq once, the text whole."""
    count = 300
    ws = await connect(http, stack)
    await start_turn(ws, unique(f"[delay:10] [tokens:{count}]"))
    frames: list[Frame] = []
    await until(ws, lambda f: len(texts(frames).split()) >= 30, frames)
    admin = redis.asyncio.Redis.from_url(stack.redis.url, socket_timeout=OUTCOME_S)  # the test's own client: waits out the stall
    try:
        stall = asyncio.create_task(admin.execute_command("DEBUG", "SLEEP", str(STALL_S)))
        arrived = [time.monotonic()]  # then when each later frame came: the stall shows as a gap
        while not is_end(frames[-1]):
            frames.append(await recv(ws, OUTCOME_S + STALL_S))
            arrived.append(time.monotonic())
        await stall
    finally:
        await admin.aclose()
    end = frames[-1]
    assert end["method"] == "final" and end["params"]["status"] == "completed", end
    gap = max(later - earlier for earlier, later in zip(arrived, arrived[1:]))
    assert gap >= STALL_S * 0.75, f"the longest pause in the stream was {gap:.2f} s: Redis did not stall it"
    assert_contiguous(frames)
    assert texts(frames) == token_text(count) == end["params"]["content"]


async def test_redis_killed_is_store_unavailable_and_503_then_service_returns_without_restart(stack: Stack, http: aiohttp.ClientSession) -> None:
    """SIGKILL Redis mid-run: store_unavailable and 503s; started again (empty), both agents serve, unrestarted."""
    agents = stack.replicas("agent")
    processes = [agent.process for agent in agents]
    ws = await connect(http, stack)
    started = await start_turn(ws, unique("[delay:20] [tokens:300]"))
    frames: list[Frame] = []
    await until(ws, lambda f: f.get("method") == "token", frames)
    try:
        stack.redis.kill()
        killed = time.monotonic()
        end = await until(ws, is_end, frames)
        assert end["method"] == "error" and end["params"]["code"] == ERR_STORE and end["params"]["retryable"] is True, end
        assert end["params"]["run_id"] == started["run_id"], end
        assert time.monotonic() - killed < OUTCOME_S
        for agent in agents:
            status, body = await health(http, agent)
            assert status == 503 and body["status"] == ERR_STORE, (agent.name, status, body)
    finally:
        stack.redis.start()

    run_ids = []
    for n in range(4):  # at once, with no wait for /healthz: nginx takes turns, so four runs land on both agents
        ws2 = await connect(http, stack)
        content = unique(f"[scenario:chat] back {n}")
        run_ids.append((await start_turn(ws2, content))["run_id"])
        more: list[Frame] = []
        end = await until(ws2, is_end, more)
        assert end["method"] == "final" and end["params"]["content"] == f"You said: {content}. This is your first message.", end
        assert_contiguous(more)
        await ws2.close()
    await wait_for(lambda: all(any(ran_on(agent, run_id) for run_id in run_ids) for agent in agents), "both agents completed a run after Redis came back")
    assert [agent.process for agent in stack.replicas("agent")] == processes and all(p.poll() is None for p in processes), "an agent was restarted"
    assert [(await health(http, agent))[0] for agent in agents] == [200, 200]

    ws3 = await connect(http, stack)
    reply = await resume(ws3, started["session_id"], 0)
    assert reply["error"]["code"] == UNKNOWN_SESSION, reply  # Redis lost it: no persistence here


async def test_a_turn_sent_while_redis_is_down_ends_with_store_unavailable(stack: Stack, http: aiohttp.ClientSession) -> None:
    """Redis down when the turn starts: its run ends with store_unavailable, retryable, as any other run."""
    # The agent refuses POST /v1/runs with 503: the gateway must not report that as agent_unavailable.
    ws = await connect(http, stack)
    stack.redis.kill()
    try:
        await start_turn(ws, unique("[scenario:chat] hello"))
        end = await until(ws, is_end, [])
    finally:
        stack.redis.start()
        for agent in stack.replicas("agent"):
            await wait_for(lambda agent=agent: health_ok(http, agent), f"{agent.name}'s /healthz answers 200 again")
    assert end["method"] == "error" and end["params"]["retryable"] is True, end
    assert end["params"]["code"] == ERR_STORE, end


# ---------------------------------------------------------------------------------------------
# A gateway dies
# ---------------------------------------------------------------------------------------------


async def test_gateway_killed_ide_resumes_through_nginx_and_finishes_with_tool_calls(stack: Stack, http: aiohttp.ClientSession) -> None:
    """SIGKILL the socket's gateway as a tool request waits: the IDE resumes through nginx and finishes the turn."""
    gateway = stack["gateway"]
    ws = await connect(http, stack, gateway)
    content = unique(call_marker("read_file", path="a.txt") + " " + call_marker("read_file", path="b.txt"))
    started = await start_turn(ws, content)
    before: list[Frame] = []
    asked = await until(ws, is_tool_request, before)
    try:
        gateway.process.kill()
        gateway.process.wait(5)
        msg = await ws.receive(timeout=OUTCOME_S)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR), msg
        ws2 = await connect(http, stack)
        reply = await resume(ws2, started["session_id"], seqs(before)[-1])
        assert reply["result"]["run_id"] == started["run_id"], reply
        after: list[Frame] = []
        again = await until(ws2, is_tool_request, after)
        assert (again["id"], again["params"]) == (asked["id"], {"path": "a.txt"}), again
        await ws2.send_str(json.dumps(answer(again)))
        end = await answered_turn(ws2, after)  # b.txt is asked and answered on the new gateway
        assert end["method"] == "final" and end["params"]["status"] == "completed", end
        assert [f["params"]["path"] for f in after if is_tool_request(f)] == ["a.txt", "b.txt"]
        assert "contents of b.txt" in end["params"]["content"], end
        assert_contiguous(before + after)
    finally:
        stack.restart("gateway")


# ---------------------------------------------------------------------------------------------
# A whole session through nginx
# ---------------------------------------------------------------------------------------------


async def test_whole_session_with_tool_calls_and_resumes_through_nginx_uses_both_agents(stack: Stack, http: aiohttp.ClientSession) -> None:
    """Five turns with tool calls and two drops, all through nginx: every seq once; both agents served."""
    frames: list[Frame] = []  # every frame of the session, over its three sockets
    said: list[str] = []
    logged = len(stack.nginx.access_log())

    async def turn(ws: WebSocket, content: str, id: int) -> tuple[Frame, Frame]:
        """(user_message's result, the run's end), every tool request answered."""
        said.append(content)
        started = await start_turn(ws, content, id)
        end = await answered_turn(ws, frames)
        assert end["method"] == "final" and end["params"]["status"] == "completed", end
        return started, end

    ws = await connect(http, stack)
    started, end = await turn(ws, unique("[scenario:demo] Add logging to src/app.js"), 1)
    session_id = started["session_id"]
    assert [f["method"] for f in frames if is_tool_request(f)] == ["read_file", "apply_patch"]
    assert "console.log('[main] called');" in next(f for f in frames if f.get("method") == "apply_patch")["params"]["diff"]
    assert end["params"]["content"].startswith("Done: I added logging to src/app.js."), end
    _, end = await turn(ws, unique("[scenario:parallel] compare a.txt with b.txt"), 2)
    assert end["params"]["content"] == "Read 2 files: a.txt, b.txt.", end

    # A stream dropped mid-turn, resumed through nginx.
    said.append(content := unique("[delay:10] [tokens:150]"))
    run_id = (await start_turn(ws, content, 3))["run_id"]
    await until(ws, lambda f: f.get("method") == "token" and f["params"]["text"] == " t19", frames)
    drop(ws)
    ws = await connect(http, stack)
    reply = await resume(ws, session_id, seqs(frames)[-1])
    assert reply["result"]["run_id"] == run_id, reply
    end = await until(ws, is_end, frames)
    assert end["method"] == "final" and end["params"]["content"] == token_text(150), end

    # A tool call dropped while it waits, resumed through nginx: the request comes again, with its id.
    said.append(content := unique(call_marker("read_file", path="c.txt") + " " + call_marker("read_file", path="d.txt")))
    await start_turn(ws, content, 4)
    first = await until(ws, is_tool_request, frames)
    await ws.send_str(json.dumps(answer(first)))
    asked = await until(ws, is_tool_request, frames)
    drop(ws)
    ws = await connect(http, stack)
    await resume(ws, session_id, seqs(frames)[-1])
    again = await until(ws, is_tool_request, frames)
    assert again["id"] == asked["id"], again
    frames.remove(again)  # the IDE's own bookkeeping: one request per call id
    await ws.send_str(json.dumps(answer(again)))
    end = await until(ws, is_end, frames)
    assert end["method"] == "final" and "contents of d.txt" in end["params"]["content"], end

    chat = unique("[scenario:chat] what did I ask?")
    _, end = await turn(ws, chat, 5)
    assert end["params"]["content"] == f"You said: {chat}. Earlier you said: {' | '.join(said[:-1])}.", end
    assert_contiguous(frames)
    assert len([f for f in frames if is_tool_request(f)]) == 2 + 2 + 2  # demo, parallel, the two calls

    agent_ports = {f"upstream=127.0.0.1:{agent.port}" for agent in stack.replicas("agent")}
    await wait_for(lambda: all(port in stack.nginx.access_log()[logged:] for port in agent_ports), "both agents in nginx's access log")
