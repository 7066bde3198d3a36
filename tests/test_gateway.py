"""The gateway's WebSocket door: auth, JSON-RPC errors, turns and multi-turn, on the real stack."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from conftest import Stack
from wsclient import collect_turn, recv, send, texts, user_message


async def connect(session: aiohttp.ClientSession, stack: Stack, token: str | None = None, header: bool = True) -> aiohttp.ClientWebSocketResponse:
    token = stack.token if token is None else token
    if header:
        return await session.ws_connect(stack.ws_url, headers={"Authorization": f"Bearer {token}"})
    return await session.ws_connect(f"{stack.ws_url}?token={token}")


QUIET_S = 0.3  # after a refusal: time for a run that slipped through to reach the model and end
RUN_END = re.compile(r" agent INFO run \S+ session \S+: .* in \d+ ms")  # the agent's one line per run end


async def model_requests(session: aiohttp.ClientSession, stack: Stack) -> int:
    """Chat completions fake_llm has answered so far."""
    async with session.get(f"{stack['fake_llm'].url}/_fake/stats") as response:
        return int((await response.json())["requests"])


def runs_ended(stack: Stack) -> int:
    """Run-end lines in every agent replica's log."""
    return sum(len(RUN_END.findall(agent.log())) for agent in stack.replicas("agent"))


@pytest.mark.parametrize("token", ["", "wrong-token"], ids=["missing", "wrong"])
async def test_bad_token_is_closed_4401_before_reaching_agent(stack: Stack, token: str) -> None:
    """A missing or wrong token: close code 4401 with a reason; no run starts, the model is never called."""
    async with aiohttp.ClientSession() as session:
        before = (await model_requests(session, stack), runs_ended(stack))
        ws = await session.ws_connect(stack.ws_url, headers={"Authorization": f"Bearer {token}"} if token else {})
        await send(ws, user_message("[scenario:chat] hello"))
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4401
        assert "token" in msg.extra
        await asyncio.sleep(QUIET_S)
        assert (await model_requests(session, stack), runs_ended(stack)) == before


async def test_query_token_is_accepted_and_never_logged(stack: Stack) -> None:
    """`?token=` works for browsers, and the token does not show up in the gateway's log."""
    async with aiohttp.ClientSession() as session:
        ws = await connect(session, stack, header=False)
        await send(ws, user_message("[scenario:chat] via query"))
        frames = await collect_turn(ws)
        assert frames[-1]["method"] == "final"
    assert stack.token not in stack["gateway"].log()


async def test_non_json_frame_gets_parse_error_and_socket_stays_open(stack: Stack) -> None:
    """-32700 for garbage, then a normal turn on the same socket."""
    async with aiohttp.ClientSession() as session:
        ws = await connect(session, stack)
        await send(ws, "{not json")
        reply = await recv(ws)
        assert reply["error"]["code"] == -32700 and reply["id"] is None
        await send(ws, user_message("[scenario:chat] still here"))
        assert (await collect_turn(ws))[-1]["params"]["status"] == "completed"


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("[1, 2]", -32600),
        ('{"jsonrpc": "1.0", "id": 7, "method": "user_message"}', -32600),
        ('{"jsonrpc": "2.0", "id": 7, "method": "make_coffee", "params": {}}', -32601),
        ('{"jsonrpc": "2.0", "id": 7, "method": "user_message", "params": {}}', -32602),
        ('{"jsonrpc": "2.0", "id": 7, "method": "user_message", "params": {"content": 5}}', -32602),
        ('{"jsonrpc": "2.0", "id": 7, "method": "user_message", "params": ["hi"]}', -32602),
    ],
    ids=["batch", "wrong-version", "unknown-method", "missing-content", "content-not-string", "positional-params"],
)
async def test_malformed_frames_get_their_jsonrpc_error(stack: Stack, frame: str, code: int) -> None:
    """Each wrong shape gets the JSON-RPC error it deserves; the socket stays open."""
    async with aiohttp.ClientSession() as session:
        ws = await connect(session, stack)
        await send(ws, frame)
        reply = await recv(ws)
        assert reply["error"]["code"] == code, reply
        await send(ws, {"jsonrpc": "2.0", "id": 99, "method": "cancel", "params": {}})
        assert (await recv(ws))["id"] == 99  # still answering


async def test_chat_turn_streams_tokens_then_final_with_seq(stack: Stack) -> None:
    """Result first, tokens in order, one final; seq goes up by one per notification.

    The fake paces its tokens 5 ms apart: tokens that arrive together are coalesced.
    """
    async with aiohttp.ClientSession() as session:
        ws = await connect(session, stack)
        await send(ws, user_message("[scenario:chat] [delay:5] hello there"))
        first = await recv(ws)
        assert first["id"] == 1 and set(first["result"]) == {"session_id", "run_id"}
        frames = await collect_turn(ws)
    notes = [f for f in frames if "method" in f]
    assert [f["method"] for f in notes].count("final") == 1
    assert len([f for f in notes if f["method"] == "token"]) > 3
    assert [f["params"]["seq"] for f in notes] == list(range(1, len(notes) + 1))
    assert all(f["params"]["run_id"] == first["result"]["run_id"] for f in notes)
    assert texts(frames) == frames[-1]["params"]["content"]
    assert texts(frames).startswith("You said: [scenario:chat] [delay:5] hello there.")


async def test_second_message_on_socket_continues_the_conversation(stack: Stack) -> None:
    """Multi-turn: the model's second reply names the first message."""
    async with aiohttp.ClientSession() as session:
        ws = await connect(session, stack)
        await send(ws, user_message("[scenario:chat] my name is Ada", id=1))
        await recv(ws)
        await collect_turn(ws)
        await send(ws, user_message("[scenario:chat] what was my name?", id=2))
        await recv(ws)
        frames = await collect_turn(ws)
    assert "Earlier you said: [scenario:chat] my name is Ada" in frames[-1]["params"]["content"]


async def test_seed_literal_frame_runs_a_turn_without_result(stack: Stack) -> None:
    """The design document's {"type": "user_message"} frame starts a turn; no result comes back."""
    async with aiohttp.ClientSession() as session:
        ws = await connect(session, stack)
        await send(ws, {"type": "user_message", "content": "[scenario:chat] seed frame"})
        frames = await collect_turn(ws)
    assert "result" not in frames[0]
    assert frames[-1]["method"] == "final" and frames[-1]["params"]["status"] == "completed"


async def test_healthz_on_every_service(stack: Stack) -> None:
    """GET /healthz answers 200 with a small JSON body on all four processes."""
    async with aiohttp.ClientSession() as session:
        for service in stack.services.values():
            async with session.get(f"{service.url}/healthz") as response:
                assert response.status == 200
                assert (await response.json())["status"] == "ok"
