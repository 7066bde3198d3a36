"""A bare JSON-RPC WebSocket client for gateway tests: frames in, frames out, nothing hidden."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

FRAME_TIMEOUT_S = 10.0  # a hang bound, not a speed assertion

ToolHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]  # request frame -> response frame


async def recv(ws: aiohttp.ClientWebSocketResponse, timeout: float = FRAME_TIMEOUT_S) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.receive(), timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, f"expected a text frame, got {msg.type} {msg.data!r} {msg.extra!r}"
    return json.loads(msg.data)


async def send(ws: aiohttp.ClientWebSocketResponse, frame: dict[str, Any] | str) -> None:
    await ws.send_str(frame if isinstance(frame, str) else json.dumps(frame))


def user_message(content: str, id: int = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id, "method": "user_message", "params": {"content": content}}


async def collect_turn(ws: aiohttp.ClientWebSocketResponse, on_tool: ToolHandler | None = None, timeout: float = FRAME_TIMEOUT_S) -> list[dict[str, Any]]:
    """Every frame up to and including the run's final or error; tool requests go to on_tool."""
    frames: list[dict[str, Any]] = []
    while True:
        frame = await recv(ws, timeout)
        frames.append(frame)
        if "id" in frame and "method" in frame:  # a tool request
            if on_tool is None:
                raise AssertionError(f"unexpected tool request {frame}")
            await send(ws, await on_tool(frame))
        elif frame.get("method") in ("final", "error"):
            return frames


def texts(frames: list[dict[str, Any]]) -> str:
    return "".join(f["params"]["text"] for f in frames if f.get("method") == "token")
