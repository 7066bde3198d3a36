"""The agent loop's contract seen from its two ends: the IDE's WebSocket and the model's requests.

    test ⇄ gateway → agent → llm_proxy → [scripted upstream, in this file]

The upstream is a small aiohttp app in the test's own event loop that speaks OpenAI's streaming
format byte for byte, answers each POST /v1/chat/completions with the next scripted reply, and
keeps every request body it received. The three services are real processes (conftest.py);
llm_proxy reaches the script through OPENAI_BASE_URL. Nothing here reads the services' internals:
only frames on the socket and the bodies the model was sent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from conftest import Stack
from wsclient import collect_turn, user_message

SERVICES = ("llm_proxy", "agent", "gateway")  # the pipeline minus fake_llm: the script stands in for it
MODEL = "scripted-coder"  # what the script says it is; nothing checks it
WRITE_GAP_S = 0.02  # a pause between two network writes, so the reader sees them as separate reads
TURN_TIMEOUT_S = 30.0  # a hang bound for one whole turn; a healthy one takes well under a second

Chunk = dict[str, Any]  # one chat.completion.chunk object, as OpenAI writes it
Write = list[Chunk | bytes]  # one network write: chunks (each a `data:` line) and raw bytes, in order
Script = list[Write]  # one reply: its writes, the usage chunk and [DONE] added when asked for


# ---------------------------------------------------------------------------------------------
# The scripted upstream
# ---------------------------------------------------------------------------------------------


def delta(content: Any = None, finish: str | None = None, **fields: Any) -> Chunk:
    """A chat.completion.chunk with one choice: `content` and/or `tool_calls` in its delta."""
    body: dict[str, Any] = {} if content is None else {"content": content}
    body.update(fields)
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion.chunk",
        "created": 1795538839,
        "model": MODEL,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": body, "logprobs": None, "finish_reason": finish}],
    }


def opening() -> Chunk:
    """OpenAI's first chunk of every reply: the role, empty content."""
    return delta(role="assistant", content="", refusal=None)


def usage_chunk(prompt: int, completion: int) -> Chunk:
    """The include_usage chunk: no choices, the call's token counts."""
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    return {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 1795538839, "model": MODEL,
            "system_fingerprint": None, "choices": [], "usage": usage}  # fmt: skip


def data_line(chunk: Chunk) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


@dataclass
class ScriptedCompletion:
    """One scripted completion: its writes, then (when the request asks for it) usage and [DONE]."""

    writes: Script
    usage: tuple[int, int] = (10, 1)  # (prompt_tokens, completion_tokens) for the usage chunk


def text_reply(text: str, usage: tuple[int, int] = (10, 1)) -> ScriptedCompletion:
    """A final answer in two writes: the opening and the text, then the stop."""
    return ScriptedCompletion([[opening(), delta(text)], [delta(finish="stop")]], usage)


@dataclass
class Upstream:
    """Answers the n-th POST /v1/chat/completions with replies[n]; keeps every request body."""

    replies: list[ScriptedCompletion]
    requests: list[dict[str, Any]] = field(default_factory=list)  # the JSON bodies, in arrival order
    base_url: str = ""

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if not self.replies:  # 400, not 5xx: llm_proxy must not retry into the same gap
            message = f"scripted upstream: no reply left for call {len(self.requests)}"
            return web.json_response({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}, status=400)
        reply = self.replies.pop(0)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        writes = list(reply.writes)
        if (body.get("stream_options") or {}).get("include_usage"):
            writes.append([usage_chunk(*reply.usage)])
        writes[-1] = [*writes[-1], b"data: [DONE]\n\n"]
        for write in writes:
            await response.write(b"".join(part if isinstance(part, bytes) else data_line(part) for part in write))
            await asyncio.sleep(WRITE_GAP_S)
        await response.write_eof()
        return response


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """A scripted OpenAI on a free loopback port, in the test's loop; the test fills `replies`."""
    script = Upstream([])
    app = web.Application()
    app.router.add_post("/v1/chat/completions", script.chat_completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    script.base_url = f"http://{host}:{port}/v1"
    yield script
    await runner.cleanup()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


async def stack_on(make_stack: Callable[..., Stack], upstream: Upstream) -> Stack:
    """llm_proxy, agent and gateway, with llm_proxy's upstream set to the script.

    Started in a thread: start_stack blocks while it waits for /healthz, and the script shares
    this loop."""
    return await asyncio.to_thread(make_stack, {"OPENAI_BASE_URL": upstream.base_url}, SERVICES)


async def connect(http: aiohttp.ClientSession, stack: Stack) -> aiohttp.ClientWebSocketResponse:
    return await http.ws_connect(stack.ws_url, headers={"Authorization": f"Bearer {stack.token}"})


def read_file_result(path: str, content: str) -> dict[str, Any]:
    lines = content.count("\n")
    return {"path": path, "content": content, "start_line": 1, "end_line": lines, "total_lines": lines, "truncated": False}


def final_of(frames: list[dict[str, Any]]) -> dict[str, Any]:
    """The turn's last frame, which must be a `final` that completed."""
    last = frames[-1]
    assert last.get("method") == "final" and last["params"]["status"] == "completed", frames
    return last["params"]


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


async def test_next_turn_sends_user_tool_call_tool_result_and_answer_as_history(make_stack: Callable[..., Stack], upstream: Upstream) -> None:
    """Turn two's model request is [system, user1, assistant(tool_calls), tool, assistant, user2]."""
    arguments = '{"path": "notes.txt"}'
    upstream.replies = [
        ScriptedCompletion([
            [opening(), delta("Let me look.")],
            [delta(tool_calls=[{"index": 0, "id": "call_notes", "type": "function", "function": {"name": "read_file", "arguments": ""}}])],
            [delta(tool_calls=[{"index": 0, "function": {"arguments": arguments}}]), delta(finish="tool_calls")],
        ]),
        text_reply("The notes say hello."),
        text_reply("You asked about the notes."),
    ]
    stack = await stack_on(make_stack, upstream)
    result = read_file_result("notes.txt", "hello\n")

    async def answer(frame: dict[str, Any]) -> dict[str, Any]:
        assert (frame["method"], frame["id"], frame["params"]) == ("read_file", "call_notes", {"path": "notes.txt"})
        return {"jsonrpc": "2.0", "id": frame["id"], "result": result}

    async with aiohttp.ClientSession() as http, await connect(http, stack) as ws:
        await ws.send_json(user_message("What do my notes say?", id=1))
        first = await collect_turn(ws, answer, TURN_TIMEOUT_S)
        assert final_of(first)["content"] == "The notes say hello."
        await ws.send_json(user_message("What did I ask?", id=2))
        second = await collect_turn(ws, None, TURN_TIMEOUT_S)
        assert final_of(second)["content"] == "You asked about the notes."

    assert len(upstream.requests) == 3
    messages = upstream.requests[2]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant", "user"], messages
    system, user1, called, tool, answered, user2 = messages
    assert system["content"], system
    assert user1["content"] == "What do my notes say?"
    assert called["content"] == "Let me look."
    assert len(called["tool_calls"]) == 1, called
    (tool_call,) = called["tool_calls"]
    assert (tool_call["id"], tool_call["type"], tool_call["function"]["name"]) == ("call_notes", "function", "read_file")
    assert json.loads(tool_call["function"]["arguments"]) == {"path": "notes.txt"}
    assert tool["tool_call_id"] == "call_notes"
    assert json.loads(tool["content"]) == result
    assert answered["content"] == "The notes say hello." and not answered.get("tool_calls"), answered
    assert user2["content"] == "What did I ask?"
    # and the request in between was the same history up to the tool result
    assert upstream.requests[1]["messages"] == messages[:4]


async def test_final_usage_is_the_sum_over_the_runs_model_calls(make_stack: Callable[..., Stack], upstream: Upstream) -> None:
    """A turn of two model calls reports usage = call one's + call two's, field by field."""
    upstream.replies = [
        ScriptedCompletion([
            [opening(), delta(tool_calls=[{"index": 0, "id": "call_u", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "u.txt"}'}}])],
            [delta(finish="tool_calls")],
        ], usage=(100, 7)),
        text_reply("Done.", usage=(130, 11)),
    ]
    stack = await stack_on(make_stack, upstream)

    async def answer(frame: dict[str, Any]) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": frame["id"], "result": read_file_result("u.txt", "u\n")}

    async with aiohttp.ClientSession() as http, await connect(http, stack) as ws:
        await ws.send_json(user_message("Read u.txt"))
        frames = await collect_turn(ws, answer, TURN_TIMEOUT_S)

    final = final_of(frames)
    assert len(upstream.requests) == 2
    assert all(r.get("stream_options", {}).get("include_usage") for r in upstream.requests), upstream.requests
    assert "usage" in final, final
    usage = {key: final["usage"].get(key) for key in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert usage == {"prompt_tokens": 230, "completion_tokens": 18, "total_tokens": 248}, final


async def test_interleaved_fragments_of_two_parallel_calls_are_assembled_by_index(make_stack: Callable[..., Stack], upstream: Upstream) -> None:
    """Fragments for indexes 0, 1, 1+0, 0 (two in one chunk) still give each call its own arguments."""
    chunk_c = data_line(delta(tool_calls=[
        {"index": 1, "function": {"arguments": 'th": "b.txt"}'}},
        {"index": 0, "function": {"arguments": '{"path": '}},
    ]))  # fmt: skip
    upstream.replies = [
        ScriptedCompletion([
            # the opening, A and B in one write
            [
                opening(),
                delta(tool_calls=[{"index": 0, "id": "call_a", "type": "function", "function": {"name": "read_file", "arguments": ""}}]),
                delta(tool_calls=[{"index": 1, "id": "call_b", "type": "function", "function": {"name": "read_file", "arguments": '{"pa'}}]),
            ],
            [chunk_c[:40]],  # C cut in the middle of its JSON, across two writes
            [chunk_c[40:]],
            [delta(tool_calls=[{"index": 0, "function": {"arguments": '"a.txt"}'}}]), delta(finish="tool_calls")],
        ]),
        text_reply("Read both."),
    ]
    stack = await stack_on(make_stack, upstream)
    asked: dict[str, tuple[str, dict[str, Any]]] = {}  # call id -> (method, params)

    async def answer(frame: dict[str, Any]) -> dict[str, Any]:
        asked[frame["id"]] = (frame["method"], frame["params"])
        path = frame["params"].get("path", "?")
        return {"jsonrpc": "2.0", "id": frame["id"], "result": read_file_result(path, f"{path}\n")}

    async with aiohttp.ClientSession() as http, await connect(http, stack) as ws:
        await ws.send_json(user_message("Read a.txt and b.txt"))
        frames = await collect_turn(ws, answer, TURN_TIMEOUT_S)

    assert asked == {"call_a": ("read_file", {"path": "a.txt"}), "call_b": ("read_file", {"path": "b.txt"})}, frames
    assert final_of(frames)["content"] == "Read both."


@pytest.mark.parametrize("call_id", [12345, "call_same"], ids=["a-json-number", "reused-in-the-next-step"])
async def test_odd_tool_call_ids_never_stall_the_turn(make_stack: Callable[..., Stack], upstream: Upstream, call_id: Any) -> None:
    """A tool-call id the IDE could never answer by (a JSON number), or one the run already used in an
    earlier step, is replaced by the agent's own at once: each call is asked and answered, no TOOL_TIMEOUT_S wait."""

    def calling(path: str) -> ScriptedCompletion:
        return ScriptedCompletion([
            [opening(), delta(tool_calls=[{"index": 0, "id": call_id, "type": "function", "function": {"name": "read_file", "arguments": json.dumps({"path": path})}}])],
            [delta(finish="tool_calls")],
        ])

    upstream.replies = [calling("one.txt"), calling("two.txt"), text_reply("Both read.")]
    stack = await asyncio.to_thread(make_stack, {"OPENAI_BASE_URL": upstream.base_url, "TOOL_TIMEOUT_S": "60"}, SERVICES)
    asked: list[tuple[str, str]] = []

    async def answer(frame: dict[str, Any]) -> dict[str, Any]:
        asked.append((frame["id"], frame["params"]["path"]))
        return {"jsonrpc": "2.0", "id": frame["id"], "result": read_file_result(frame["params"]["path"], "x\n")}

    async with aiohttp.ClientSession() as http, await connect(http, stack) as ws:
        await ws.send_json(user_message("Read both"))
        frames = await collect_turn(ws, answer, TURN_TIMEOUT_S)  # a stall would take TOOL_TIMEOUT_S (60 s)

    assert final_of(frames)["content"] == "Both read."
    assert [path for _, path in asked] == ["one.txt", "two.txt"]
    assert all(isinstance(i, str) for i, _ in asked) and len({i for i, _ in asked}) == 2, asked
    history = upstream.requests[2]["messages"]  # each tool message answers its own call, by the id the history holds
    calls = [c["id"] for m in history if m["role"] == "assistant" for c in m.get("tool_calls", [])]
    assert [m["tool_call_id"] for m in history if m["role"] == "tool"] == calls and len(set(calls)) == 2, history
