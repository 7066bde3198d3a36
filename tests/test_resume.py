"""Resume (CONTRACT v2, "Sessions and resume" and "gateway <-> agent, v2"), end to end.

    IDE (this file) ⇄ gateway 1 or gateway 2 → nginx → one agent, or two on Redis → llm_proxy → fake_llm

Each clause of the two contract sections has a test here, on real processes: a socket is
dropped without a close frame (as a dead network drops it), closed with 1000, taken over, or
its gateway is SIGKILLed, and a new socket (on the other gateway) resumes the session. What the
IDE sees is checked whole: every seq once, in order; the text unbroken; tool requests re-sent
with their original ids and answered once.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest

from conftest import Stack, start_stack
from wsclient import Frame, agent_runs, call_marker, connect, drop, is_end, is_tool_request, read_file_result, recv, resume, send, seqs, start_turn, texts, token_text, unique, user_message

GRACE_S = 2.0  # the agent's RESUME_GRACE_S here
OUTCOME_S = 10.0  # a hang bound, not a speed assertion
TOKENS = 120  # a [tokens:N] turn long enough to drop in the middle of


@pytest.fixture(scope="module", params=["gateways", "redis"])
def stack_mode(request: pytest.FixtureRequest) -> str:
    """Two gateways sharing one agent's memory; then two gateways and two agents on Redis."""
    return request.param


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, stack_mode: str) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("resume"), {"RESUME_GRACE_S": str(GRACE_S)}, scale=stack_mode)
    yield s
    s.stop()


async def read_until(ws: aiohttp.ClientWebSocketResponse, wanted: Callable[[Frame], bool], frames: list[Frame]) -> Frame:
    """Read frames (kept in `frames`) until one is `wanted`; return it. OUTCOME_S bounds each frame, not the whole wait."""
    while True:
        frame = await recv(ws, OUTCOME_S)
        frames.append(frame)
        if wanted(frame):
            return frame


async def wait_runs(http: aiohttp.ClientSession, stack: Stack, count: int, bound: float) -> float:
    """Wait until the agent runs `count` runs; return how long that took."""
    started = time.monotonic()
    while (runs := await agent_runs(http, stack)) != count:
        assert time.monotonic() - started < bound, f"agent still runs {runs} after {bound} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


# ---------------------------------------------------------------------------------------------
# A drop, then a resume on the other gateway
# ---------------------------------------------------------------------------------------------


async def test_drop_mid_stream_resumed_on_second_gateway_loses_and_repeats_nothing(stack: Stack) -> None:
    """Tokens up to a drop, then the rest after resume on gateway 2: every seq once, the text whole."""
    async with aiohttp.ClientSession() as http:
        ws = await connect(http, stack, stack["gateway"])
        started = await start_turn(ws, unique(f"[delay:10] [tokens:{TOKENS}]"))
        before: list[Frame] = []
        await read_until(ws, lambda f: len(before) >= 10, before)
        drop(ws)
        ws2 = await connect(http, stack, stack["gateway2"])
        reply = await resume(ws2, started["session_id"], seqs(before)[-1])
        assert reply["result"]["session_id"] == started["session_id"] and reply["result"]["run_id"] == started["run_id"], reply
        assert reply["result"]["last_seq"] >= seqs(before)[-1]
        after: list[Frame] = []
        end = await read_until(ws2, is_end, after)
        assert end["method"] == "final" and end["params"]["status"] == "completed", end
        everything = before + after
        assert seqs(everything) == list(range(1, len(seqs(everything)) + 1)), seqs(everything)
        assert texts(everything) == token_text(TOKENS)
        assert end["params"]["content"] == texts(everything)


async def test_drop_while_tool_pending_request_resent_with_its_id_and_answered_after_resume(stack: Stack) -> None:
    """The tool request in flight at the drop comes again, same id, after the replay; its answer finishes the turn."""
    async with aiohttp.ClientSession() as http:
        ws = await connect(http, stack, stack["gateway"])
        started = await start_turn(ws, unique(call_marker("read_file", path="notes.txt")))
        frames: list[Frame] = []
        asked = await read_until(ws, is_tool_request, frames)
        drop(ws)
        await asyncio.sleep(0.3)  # the run waits for its tool, and does not end
        assert await agent_runs(http, stack) == 1
        ws2 = await connect(http, stack, stack["gateway2"])
        reply = await resume(ws2, started["session_id"], 0)
        assert reply["result"]["run_id"] == started["run_id"], reply
        replayed: list[Frame] = []
        again = await read_until(ws2, is_tool_request, replayed)
        assert again["id"] == asked["id"] and again["params"] == asked["params"], again
        assert seqs(replayed) == seqs(frames), "the replay is every notification before the request, once"
        await send(ws2, read_file_result(again, "resumed content\n"))
        end = await read_until(ws2, is_end, replayed)
        assert end["method"] == "final" and end["params"]["status"] == "completed", end
        assert "resumed content" in end["params"]["content"]


async def test_second_answer_to_a_resent_call_is_ignored(stack: Stack) -> None:
    """The IDE answers the original and the re-sent request: the first answer wins, the turn ends once."""
    async with aiohttp.ClientSession() as http:
        ws = await connect(http, stack, stack["gateway"])
        started = await start_turn(ws, unique(call_marker("read_file", path="a.txt")))
        asked = await read_until(ws, is_tool_request, [])
        ws2 = await connect(http, stack, stack["gateway2"])  # takes the session over; ws is closed with 4409
        await resume(ws2, started["session_id"], 0)
        again = await read_until(ws2, is_tool_request, [])
        await send(ws2, read_file_result(again, "first\n"))
        await send(ws2, read_file_result(again, "second\n"))
        frames: list[Frame] = []
        end = await read_until(ws2, is_end, frames)
        assert "first" in end["params"]["content"] and "second" not in end["params"]["content"], end
        assert asked["id"] == again["id"]
        # the agent itself: a second answer to the same call id is refused with 409
        async with http.post(f"{stack['agent'].url}/v1/runs/{started['run_id']}/tool_results", json={"tool_call_id": again["id"], "result": {}}) as response:
            assert response.status == 404  # the run is over; while it ran, a second answer got 409 (test_store)


async def test_close_1000_cancels_the_run_at_once(stack: Stack) -> None:
    """The IDE quits (close code 1000): the run is cancelled without waiting for the grace."""
    async with aiohttp.ClientSession() as http:
        ws = await connect(http, stack, stack["gateway"])
        started = await start_turn(ws, unique(call_marker("read_file", path="a.txt")))
        await read_until(ws, is_tool_request, [])
        await ws.close(code=1000)
        assert await wait_runs(http, stack, 0, GRACE_S) < GRACE_S
        ws2 = await connect(http, stack, stack["gateway2"])
        reply = await resume(ws2, started["session_id"], 0)
        assert reply["result"]["run_id"] is None, reply
        frames: list[Frame] = []
        end = await read_until(ws2, is_end, frames)
        assert end["method"] == "final" and end["params"]["status"] == "cancelled", end


async def test_drop_without_resume_is_cancelled_after_grace_and_not_before(stack: Stack) -> None:
    """No resume: the run waits RESUME_GRACE_S (still running at half of it), then ends cancelled."""
    async with aiohttp.ClientSession() as http:
        ws = await connect(http, stack, stack["gateway"])
        started = await start_turn(ws, unique(call_marker("read_file", path="a.txt")))
        await read_until(ws, is_tool_request, [])
        drop(ws)
        dropped = time.monotonic()
        await asyncio.sleep(GRACE_S / 2)
        assert await agent_runs(http, stack) == 1, "cancelled before the grace ran out"
        await wait_runs(http, stack, 0, GRACE_S + 5)
        assert time.monotonic() - dropped >= GRACE_S
        ws2 = await connect(http, stack, stack["gateway2"])
        await resume(ws2, started["session_id"], 0)
        end = await read_until(ws2, is_end, [])
        assert end["params"]["status"] == "cancelled", end


async def test_takeover_closes_the_older_socket_with_4409(stack: Stack) -> None:
    """A resume of a held session: the newer socket gets it, the older is closed with 4409 and a reason."""
    async with aiohttp.ClientSession() as http:
        older = await connect(http, stack, stack["gateway"])
        started = await start_turn(older, unique(call_marker("read_file", path="a.txt")))
        await read_until(older, is_tool_request, [])
        newer = await connect(http, stack, stack["gateway2"])
        await resume(newer, started["session_id"], 0)
        msg = await older.receive(timeout=OUTCOME_S)
        assert msg.type == aiohttp.WSMsgType.CLOSE and older.close_code == 4409, (msg, older.close_code)
        assert "taken over" in msg.extra
        again = await read_until(newer, is_tool_request, [])
        await send(newer, read_file_result(again))
        end = await read_until(newer, is_end, [])
        assert end["params"]["status"] == "completed", end
        assert await wait_runs(http, stack, 0, OUTCOME_S) >= 0  # the takeover did not cancel the run: it completed


async def test_an_idle_socket_taken_over_is_closed_4409_at_its_next_message(stack: Stack) -> None:
    """A resumes nothing after its turn; C resumes the session on the other gateway. A's next
    user_message must not take it back: A is closed with 4409, and C goes on with the conversation."""
    async with aiohttp.ClientSession() as http:
        older = await connect(http, stack, stack["gateway"])
        started = await start_turn(older, "[scenario:chat] first")
        first = await read_until(older, is_end, [])
        newer = await connect(http, stack, stack["gateway2"])
        reply = await resume(newer, started["session_id"], first["params"]["seq"])
        assert reply["result"]["run_id"] is None, reply
        await send(older, user_message("[scenario:chat] from the older socket", id=2))
        msg = await older.receive(timeout=OUTCOME_S)
        while msg.type == aiohttp.WSMsgType.TEXT:  # its result comes first; then the gateway learns it was superseded
            assert "error" not in json.loads(msg.data) or json.loads(msg.data)["error"]["code"] != -32603, msg.data
            msg = await older.receive(timeout=OUTCOME_S)
        assert msg.type == aiohttp.WSMsgType.CLOSE and older.close_code == 4409, (msg, older.close_code)
        await start_turn(newer, "[scenario:chat] from the newer socket", id=3)
        end = await read_until(newer, is_end, [])
        assert end["params"]["status"] == "completed", end
        assert "from the older socket" not in end["params"]["content"], "the superseded socket's message ran"
        assert "first" in end["params"]["content"], "the conversation goes on"


async def test_unknown_session_is_32002_and_the_socket_still_serves(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await connect(http, stack, stack["gateway"])
        reply = await resume(ws, "ses_" + secrets.token_hex(16), 0)
        assert reply["error"]["code"] == -32002, reply
        await start_turn(ws, "[scenario:chat] still here")
        end = await read_until(ws, is_end, [])
        assert end["params"]["status"] == "completed"


async def test_last_seq_older_than_kept_is_32003_with_oldest_seq(stack: Stack) -> None:
    """Three turns: the session keeps the last two runs' notifications, so seq 0 is too old."""
    async with aiohttp.ClientSession() as http:
        ws = await connect(http, stack, stack["gateway"])
        frames: list[Frame] = []
        session_id = ""
        for n in range(3):
            session_id = (await start_turn(ws, f"[scenario:chat] turn {n}", id=n + 1))["session_id"]
            await read_until(ws, is_end, frames)
        first_of_run_2 = seqs(frames)[2]  # each chat turn is one token and one final
        ws2 = await connect(http, stack, stack["gateway2"])
        reply = await resume(ws2, session_id, 0)
        assert reply["error"]["code"] == -32003 and reply["error"]["data"] == {"oldest_seq": first_of_run_2}, reply
        reply = await resume(ws2, session_id, first_of_run_2 - 1, id=8)
        assert reply["result"]["run_id"] is None and reply["result"]["last_seq"] == seqs(frames)[-1], reply
        replay: list[Frame] = []
        for _ in range(4):
            replay.append(await recv(ws2, OUTCOME_S))
        assert seqs(replay) == seqs(frames)[2:], "exactly the kept notifications, in order"
        await start_turn(ws2, "[scenario:chat] and on", id=9)
        end = await read_until(ws2, is_end, [])
        assert end["params"]["seq"] == seqs(frames)[-1] + 2, "seq belongs to the session: it carries on across sockets"


async def test_agent_events_endpoint_ids_are_the_session_seq(stack: Stack) -> None:
    """GET /v1/sessions/{id}/events: `id:` is the seq on notifications, absent on tool_call; 404, 410, 400."""
    async with aiohttp.ClientSession() as http:
        ws = await connect(http, stack, stack["gateway"])
        started = await start_turn(ws, unique(call_marker("read_file", path="a.txt")))
        asked = await read_until(ws, is_tool_request, [])
        url = f"{stack['agent'].url}/v1/sessions/{started['session_id']}/events"
        async with http.get(url, headers={"Last-Event-ID": "0"}) as response:
            assert response.status == 200 and response.headers["X-Run-Id"] == started["run_id"]
            head = await asyncio.wait_for(response.content.read(200), OUTCOME_S)
            assert head.startswith(b"event: token\nid: 1\ndata: {"), head
        async with http.get(f"{stack['agent'].url}/v1/sessions/ses_nope/events") as response:
            assert response.status == 404
        async with http.get(url, headers={"Last-Event-ID": "x1"}) as response:
            assert response.status == 400
        async with http.get(url, headers={"Last-Event-ID": "999"}) as response:
            assert response.status == 400
        await send(ws, read_file_result(asked))  # the events stream above took the session: ws was closed with 4409
        await wait_runs(http, stack, 0, OUTCOME_S)


async def test_gateway_sigkilled_mid_run_session_resumed_on_another(make_stack: Any) -> None:
    """Gateway 1 dies (SIGKILL) with a tool request in flight; the IDE resumes on gateway 2 and finishes."""
    stack: Stack = make_stack({"RESUME_GRACE_S": "30"})
    async with aiohttp.ClientSession() as http:
        ws = await connect(http, stack, stack["gateway"])
        started = await start_turn(ws, unique(call_marker("read_file", path="a.txt")))
        frames: list[Frame] = []
        asked = await read_until(ws, is_tool_request, frames)
        stack["gateway"].process.kill()
        stack["gateway"].process.wait(5)
        ws2 = await connect(http, stack, stack["gateway2"])
        reply = await resume(ws2, started["session_id"], seqs(frames)[-1] if seqs(frames) else 0)
        assert reply["result"]["run_id"] == started["run_id"], reply
        again = await read_until(ws2, is_tool_request, [])
        assert again["id"] == asked["id"]
        await send(ws2, read_file_result(again))
        end = await read_until(ws2, is_end, [])
        assert end["method"] == "final" and end["params"]["status"] == "completed", end
