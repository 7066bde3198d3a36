"""A bare JSON-RPC WebSocket client for gateway tests: frames in, frames out, nothing hidden.

    a test (the IDE) ⇄ connect() → nginx or a gateway → agent → llm_proxy → fake_llm

Three parts, in this order: what a test writes for fake_llm to read (unique, call_marker,
token_text); one socket's frames (recv, send, request, start_turn, resume, until, collect_turn,
and the predicates and summaries over a list of frames); and the few calls that need conftest's
Stack (connect, agent_runs). Nothing here starts a process or keeps state between calls: a fault,
a replica or a bound of one test module stays in that module.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from conftest import Service, Stack

FRAME_TIMEOUT_S = 10.0  # a hang bound, not a speed assertion

Frame = dict[str, Any]  # one JSON-RPC frame as received
ToolHandler = Callable[[Frame], Awaitable[Frame]]  # request frame -> response frame


# ---------------------------------------------------------------------------------------------
# What fake_llm reads in a user message
# ---------------------------------------------------------------------------------------------


def unique(text: str) -> str:
    """The text with a nonce, so fake_llm's per-message attempt counts start at zero."""
    return f"{text} #{uuid.uuid4().hex[:8]}"


def call_marker(name: str, **arguments: Any) -> str:
    """fake_llm's `[call:{...}]`: one step calling tool `name` (OpenAI name); several markers, several steps."""
    return "[call:" + json.dumps({"name": name, "arguments": arguments}) + "]"


def token_text(count: int) -> str:
    """What fake_llm's `[tokens:N]` streams, whole."""
    return "".join(f" t{i}" for i in range(count))


# ---------------------------------------------------------------------------------------------
# One socket's frames
# ---------------------------------------------------------------------------------------------


def user_message(content: str, id: int = 1) -> Frame:
    """The IDE's user_message request."""
    return {"jsonrpc": "2.0", "id": id, "method": "user_message", "params": {"content": content}}


def read_file_result(frame: Frame, content: str = "hello\n") -> Frame:
    """The IDE's answer to a read_file request: a one-line file, `content`."""
    return {"jsonrpc": "2.0", "id": frame["id"], "result": {"path": frame["params"].get("path"), "content": content, "start_line": 1, "end_line": 1, "total_lines": 1, "truncated": False}}


async def recv(ws: aiohttp.ClientWebSocketResponse, timeout: float = FRAME_TIMEOUT_S) -> Frame:
    """The next frame, which must be text; TimeoutError when none comes within `timeout`."""
    msg = await asyncio.wait_for(ws.receive(), timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, f"expected a text frame, got {msg.type} {msg.data!r} {msg.extra!r}"
    return json.loads(msg.data)


async def send(ws: aiohttp.ClientWebSocketResponse, frame: Frame | str) -> None:
    """Send a frame, or a string as it is (for frames that are not JSON)."""
    await ws.send_str(frame if isinstance(frame, str) else json.dumps(frame))


async def request(ws: aiohttp.ClientWebSocketResponse, method: str, params: dict[str, Any], id: int = 1, timeout: float = FRAME_TIMEOUT_S) -> Frame:
    """Send a JSON-RPC request; return its answer, which comes before anything else."""
    await send(ws, {"jsonrpc": "2.0", "id": id, "method": method, "params": params})
    reply = await recv(ws, timeout)
    assert reply.get("id") == id and ("result" in reply or "error" in reply), f"expected the answer to request {id}, got {reply}"
    return reply


async def start_turn(ws: aiohttp.ClientWebSocketResponse, content: str, id: int = 1, timeout: float = FRAME_TIMEOUT_S) -> Frame:
    """Send a user_message; return its result {"session_id", "run_id"}."""
    reply = await request(ws, "user_message", {"content": content}, id, timeout)
    assert "result" in reply, reply
    return reply["result"]


async def resume(ws: aiohttp.ClientWebSocketResponse, session_id: str, last_seq: int, id: int = 7) -> Frame:
    """Send a resume request; return its answer (a result or an error)."""
    return await request(ws, "resume", {"session_id": session_id, "last_seq": last_seq}, id)


async def until(ws: aiohttp.ClientWebSocketResponse, wanted: Callable[[Frame], bool], frames: list[Frame], bound: float = FRAME_TIMEOUT_S) -> Frame:
    """Read frames (kept in `frames`) until one is `wanted`; return it; TimeoutError after `bound` s."""
    deadline = time.monotonic() + bound
    while True:
        try:
            frame = await recv(ws, max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            raise TimeoutError(f"not the frame wanted within {bound} s; the last ones: {frames[-3:]}") from None
        frames.append(frame)
        if wanted(frame):
            return frame


async def collect_turn(ws: aiohttp.ClientWebSocketResponse, on_tool: ToolHandler | None = None, timeout: float = FRAME_TIMEOUT_S) -> list[Frame]:
    """Every frame up to and including the run's final or error; tool requests go to on_tool."""
    frames: list[Frame] = []
    while True:
        frame = await recv(ws, timeout)
        frames.append(frame)
        if "id" in frame and "method" in frame:  # a tool request
            if on_tool is None:
                raise AssertionError(f"unexpected tool request {frame}")
            await send(ws, await on_tool(frame))
        elif frame.get("method") in ("final", "error"):
            return frames


def drop(ws: aiohttp.ClientWebSocketResponse) -> None:
    """End the socket with no close frame, as a dead network or a closed laptop lid does."""
    ws._writer.transport.abort()  # aiohttp has no public call for an abrupt end


def is_end(frame: Frame) -> bool:
    """The run's final or error notification."""
    return frame.get("method") in ("final", "error") and "id" not in frame


def is_tool_request(frame: Frame) -> bool:
    """A request from the agent to the IDE (it has a method and an id)."""
    return "method" in frame and "id" in frame


def seqs(frames: list[Frame]) -> list[int]:
    """The seq of every token, final and error notification, in the order received."""
    return [f["params"]["seq"] for f in frames if f.get("method") in ("token", "final", "error") and "id" not in f]


def texts(frames: list[Frame]) -> str:
    """The text of every token notification, joined."""
    return "".join(f["params"]["text"] for f in frames if f.get("method") == "token")


# ---------------------------------------------------------------------------------------------
# A whole stack (conftest's Stack)
# ---------------------------------------------------------------------------------------------


async def connect(http: aiohttp.ClientSession, stack: Stack, gateway: Service | None = None) -> aiohttp.ClientWebSocketResponse:
    """A socket through nginx, or to the one gateway (stack.ws_url); or straight to `gateway`."""
    url = f"ws://127.0.0.1:{gateway.port}/ws" if gateway is not None else stack.ws_url
    return await http.ws_connect(url, headers={"Authorization": f"Bearer {stack.token}"})


async def get_json(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """GET `url`, which must answer 200; its JSON body."""
    async with http.get(url) as response:
        assert response.status == 200, (url, response.status)
        return await response.json()


async def agent_runs(http: aiohttp.ClientSession, stack: Stack) -> int:
    """Runs in progress, summed over every agent replica (there are two in REFAGENT_TEST_MODE=redis)."""
    replicas = [service for name, service in stack.services.items() if name.startswith("agent")]
    return sum([(await get_json(http, f"{service.url}/healthz"))["runs"] for service in replicas])
