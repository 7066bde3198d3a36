"""fake_llm.py: a scripted, deterministic coding model behind a real OpenAI-compatible HTTP API.

    IDE ⇄ gateway → agent → llm_proxy → [fake_llm]      (the default upstream of llm_proxy)

Run:  python fake_llm.py [--host 127.0.0.1] [--port 8003]     or  uvicorn fake_llm:app --port 8003

It speaks OpenAI's Chat Completions wire format exactly: `POST /v1/chat/completions` (streamed or
not) and `GET /v1/models`. A streamed reply opens with a role chunk, sends text as one chunk per
token, sends each tool call as a first fragment carrying id, type and name with empty arguments,
then the arguments cut across later chunks, closes with a `finish_reason` chunk, adds a usage
chunk with empty `choices` when `stream_options.include_usage` is set, and ends with
`data: [DONE]`.

What it answers is chosen by markers in the newest user message, so a test or a person steers it
from the IDE prompt. Without a marker it plays the demo: read the file the user named, patch it
to add logging, summarise.

    [scenario:demo]      read_file -> apply_patch (adds a log line to each function) -> summary
    [scenario:chat]      text only; names the earlier user messages (shows multi-turn memory)
    [scenario:loop]      calls read_file forever (for AGENT_MAX_STEPS)
    [scenario:parallel]  two read_file calls in one message, then a summary
    [scenario:bad_args]  a tool call whose arguments are not JSON, then text
    [scenario:unknown_tool]  a call to a tool that does not exist, then text
    [call:{"name": N, "arguments": {...}}]   call tool N (OpenAI name), then echo its result;
                         several markers make several steps, one call each
    [tokens:N]           stream N numbered tokens of text, then stop
    [delay:MS]           wait MS milliseconds before each chunk (default FAKE_LLM_TOKEN_DELAY_MS)
    [fail:STATUS xN]     answer the first N attempts of this message with HTTP STATUS
    [drop:K]             send K chunks, then cut the connection (no [DONE])
    [garbage:K]          send K chunks, then a chunk that is not JSON (braced: it passes llm_proxy's shape check)
    [stall]              send the headers, then nothing until the client goes away
    [stall:K]            send K chunks, then nothing until the client goes away

`GET /_fake/stats` reports {"requests", "completed", "aborted", "active"}: tests read it to see
that a cancelled request really reached the upstream as a disconnect.

Left out: real language understanding, embeddings, the Responses API, logprobs.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import os
import re
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from protocol import CHAT_COMPLETIONS_PATH, DONE, MODELS_PATH, OPENAI_PREFIX, EventStreamResponse, dumps, encode_data

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

TOKEN_DELAY_MS = float(os.environ.get("FAKE_LLM_TOKEN_DELAY_MS", "15"))  # pause per chunk; 0 = flat out
MODEL = os.environ.get("FAKE_LLM_MODEL", "fake-coder")  # the one model id /v1/models lists
ARG_FRAGMENT = 12  # characters of tool-call arguments per chunk, as a real model cuts them
FLAT_OUT_BATCH = 64  # with no delay, chunks per write: a model streaming flat out fills TCP segments

# ---------------------------------------------------------------------------------------------
# The script: what the model says next, given the conversation
# ---------------------------------------------------------------------------------------------


@dataclass
class ToolCall:
    name: str  # OpenAI function name, e.g. git_diff
    arguments: str  # raw JSON text, exactly as the model "wrote" it (may be invalid on purpose)
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])


@dataclass
class ScriptedReply:
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


_MARKER = re.compile(r"\[(\w+)(?::([^\]]*))?\]")
_CALL = re.compile(r"\[call:(\{.*?\})\](?=\s|$|\[)", re.S)
_PATH = re.compile(r"[\w./-]+\.[A-Za-z0-9]+")
_FUNCTION = re.compile(r"^(\s*)(?:async\s+)?function\s+(\w+)\s*\(.*\{\s*$")


def markers(text: str) -> dict[str, str]:
    return {name: value or "" for name, value in _MARKER.findall(text)}


def tokens_of(text: str) -> list[str]:
    """Cut text the way a tokenizer roughly would: each word with the space before it."""
    return re.findall(r"\s*\S+|\s+$", text)


def last_user_index(messages: list[dict[str, Any]]) -> int:
    return max(i for i, m in enumerate(messages) if m.get("role") == "user")


def tool_results_since(messages: list[dict[str, Any]], start: int) -> list[tuple[str, dict[str, Any]]]:
    """[(tool name, parsed tool message content)] for the tool messages after `start`."""
    names: dict[str, str] = {}
    results: list[tuple[str, dict[str, Any]]] = []
    for message in messages[start:]:
        for call in message.get("tool_calls") or []:
            names[call["id"]] = call["function"]["name"]
        if message.get("role") == "tool":
            try:
                content = json.loads(message.get("content") or "null")
            except ValueError:
                content = {"text": message.get("content")}
            results.append((names.get(message.get("tool_call_id", ""), "?"), content if isinstance(content, dict) else {"value": content}))
    return results


def call(name: str, **arguments: Any) -> ToolCall:
    return ToolCall(name, json.dumps(arguments))


def logging_diff(path: str, content: str) -> tuple[str, int]:
    """A `diff --git` patch adding a console.log line at the top of each function (or the file)."""
    old = content.splitlines(keepends=True)
    new: list[str] = []
    count = 0
    for line in old:
        new.append(line)
        match = _FUNCTION.match(line)
        if match:
            indent, name = match.groups()
            new.append(f"{indent}  console.log('[{name}] called');\n")
            count += 1
    if count == 0:
        new.insert(0, f"console.log('[{path}] loaded');\n")
    body = "".join(difflib.unified_diff(old, new, f"a/{path}", f"b/{path}"))
    return f"diff --git a/{path} b/{path}\n{body}", max(count, 1)


def script_demo(user: str, results: list[tuple[str, dict[str, Any]]]) -> ScriptedReply:
    paths = _PATH.findall(user)
    if not results:
        if not paths:
            return ScriptedReply("Tell me which file to work on, for example: Add logging to src/auth.js")
        return ScriptedReply(f"I'll start by reading `{paths[0]}`.", [call("read_file", path=paths[0])])
    name, result = results[-1]
    if "error" in result:
        return ScriptedReply(f"The {name} call failed: {result['error'].get('message', result['error'])}. Nothing was changed.")
    if name == "read_file":
        diff, count = logging_diff(result["path"], result["content"])
        return ScriptedReply(f"Here is a patch that adds logging to {count} place(s).", [call("apply_patch", diff=diff)])
    files = ", ".join(result.get("files", [])) or "the file"
    return ScriptedReply(f"Done: I added logging to {files}. Each function now logs when it is called.")


def script_chat(messages: list[dict[str, Any]], user: str) -> ScriptedReply:
    earlier = [m["content"] for m in messages if m.get("role") == "user" and m.get("content") != user]
    memory = f" Earlier you said: {' | '.join(earlier)}." if earlier else " This is your first message."
    return ScriptedReply(f"You said: {user}.{memory}")


def script_calls(calls: list[dict[str, Any]], results: list[tuple[str, dict[str, Any]]]) -> ScriptedReply:
    if len(results) < len(calls):
        spec = calls[len(results)]
        return ScriptedReply(f"Calling {spec['name']}.", [ToolCall(spec["name"], json.dumps(spec.get("arguments", {})))])
    name, result = results[-1]
    return ScriptedReply(f"{name} returned: {json.dumps(result, sort_keys=True)}")


def next_reply(messages: list[dict[str, Any]]) -> ScriptedReply:
    start = last_user_index(messages)
    user = str(messages[start].get("content") or "")
    marks = markers(user)
    results = tool_results_since(messages, start)
    calls = [json.loads(m) for m in _CALL.findall(user)]
    scenario = marks.get("scenario", "demo")
    if calls:
        return script_calls(calls, results)
    if "tokens" in marks:
        return ScriptedReply("".join(f" t{i}" for i in range(int(marks["tokens"]))))
    if scenario == "chat":
        return script_chat(messages, user)
    if scenario == "loop":
        return ScriptedReply("Reading again.", [call("read_file", path="README.md")])
    if scenario == "parallel":
        if results:
            return ScriptedReply(f"Read {len(results)} files: " + ", ".join(r.get("path", "?") for _, r in results) + ".")
        paths = _PATH.findall(user)[:2] or ["a.txt", "b.txt"]
        return ScriptedReply("Reading both.", [call("read_file", path=p) for p in paths])
    if scenario in ("bad_args", "unknown_tool"):
        if results:
            return ScriptedReply(f"The tool said: {results[-1][1].get('error', {}).get('message', '')}")
        if scenario == "bad_args":
            return ScriptedReply("", [ToolCall("read_file", '{"path": "src/auth.js"')])
        return ScriptedReply("", [call("delete_everything", path="/")])
    return script_demo(user, results)


# ---------------------------------------------------------------------------------------------
# OpenAI wire format
# ---------------------------------------------------------------------------------------------


def chunk(completion_id: str, created: int, delta: dict[str, Any], finish: str | None = None, usage: bool = False) -> bytes:
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": MODEL,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage:
        body["usage"] = None  # OpenAI sends "usage": null on every chunk but the last when asked
    return encode_data(dumps(body))


def reply_chunks(reply: ScriptedReply, completion_id: str, created: int, usage: bool) -> list[bytes]:
    """The whole reply as OpenAI stream chunks, in order (without usage and [DONE])."""
    out = [chunk(completion_id, created, {"role": "assistant", "content": "", "refusal": None}, usage=usage)]
    out += [chunk(completion_id, created, {"content": t}, usage=usage) for t in tokens_of(reply.text)]
    for index, tc in enumerate(reply.tool_calls):
        first = {"index": index, "id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": ""}}
        out.append(chunk(completion_id, created, {"tool_calls": [first]}, usage=usage))
        for i in range(0, len(tc.arguments), ARG_FRAGMENT):
            part = {"index": index, "function": {"arguments": tc.arguments[i : i + ARG_FRAGMENT]}}
            out.append(chunk(completion_id, created, {"tool_calls": [part]}, usage=usage))
    finish = "tool_calls" if reply.tool_calls else "stop"
    out.append(chunk(completion_id, created, {}, finish, usage=usage))
    return out


def usage_of(messages: list[dict[str, Any]], reply: ScriptedReply) -> dict[str, int]:
    prompt = sum(len(str(m.get("content") or "")) for m in messages) // 4 + len(messages)
    completion = len(tokens_of(reply.text)) + sum(len(tc.arguments) // 4 + 1 for tc in reply.tool_calls)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def openai_error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None) -> Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers={"x-request-id": "req_fake_" + uuid.uuid4().hex[:12]})


# ---------------------------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------------------------


@dataclass
class Stats:
    requests: int = 0
    completed: int = 0
    aborted: int = 0
    active: int = 0
    attempts: dict[str, int] = field(default_factory=dict)  # newest user message -> times seen


async def chat_completions(request: Request) -> Response:
    stats: Stats = request.app.state.stats
    stats.requests += 1
    try:
        body = await request.json()
        messages = body["messages"]
        last_user_index(messages)
    except (ValueError, KeyError, TypeError):
        return openai_error(400, "Expected a JSON body with a 'messages' array holding a user message.")
    user = str(messages[last_user_index(messages)].get("content") or "")
    marks = markers(user)

    if "fail" in marks:  # "[fail:503 x1]": the first N attempts of this message fail
        status, _, times = marks["fail"].partition("x")
        seen = stats.attempts.get(user, 0)
        stats.attempts[user] = seen + 1
        if seen < int(times or 1):
            code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(int(status))
            return openai_error(int(status), f"Fake upstream failure {status}", "fake_error", code)

    reply = next_reply(messages)
    completion_id = "chatcmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())
    usage = usage_of(messages, reply)
    if not body.get("stream"):
        stats.completed += 1
        return JSONResponse(completion(reply, completion_id, created, usage))

    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    delay = float(marks.get("delay", TOKEN_DELAY_MS)) / 1000
    return EventStreamResponse(stream(stats, reply, marks, completion_id, created, usage if include_usage else None, delay))


async def stream(stats: Stats, reply: ScriptedReply, marks: dict[str, str], completion_id: str, created: int, usage: dict[str, int] | None, delay: float) -> AsyncGenerator[bytes, None]:
    stats.active += 1
    finished = False
    try:
        chunks = reply_chunks(reply, completion_id, created, usage is not None)
        pending: list[bytes] = []  # with no delay, chunks leave FLAT_OUT_BATCH at a time (one write per token is the fake's own limit)
        for i, data in enumerate(chunks):
            if ("stall" in marks and i == int(marks["stall"] or 0)) or ("drop" in marks and i == int(marks["drop"])):
                if pending:
                    yield b"".join(pending)
                if "drop" in marks:
                    raise ConnectionAbortedError("fake upstream drops the connection on purpose")
                await asyncio.Event().wait()  # until the client goes away and we are cancelled
            if "garbage" in marks and i == int(marks["garbage"]):
                data = b"data: {this is not json}\n\n"
            if delay:
                await asyncio.sleep(delay)
                yield data
                continue
            pending.append(data)
            if len(pending) == FLAT_OUT_BATCH:
                yield b"".join(pending)
                pending = []
        if usage is not None:
            pending.append(encode_data(dumps({"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": MODEL, "system_fingerprint": None, "choices": [], "usage": usage})))
        yield b"".join([*pending, DONE])
        finished = True
    finally:
        stats.active -= 1
        if finished:
            stats.completed += 1
        else:
            stats.aborted += 1


def completion(reply: ScriptedReply, completion_id: str, created: int, usage: dict[str, int]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.text or None, "refusal": None}
    if reply.tool_calls:
        message["tool_calls"] = [{"id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": tc.arguments}} for tc in reply.tool_calls]
    finish = "tool_calls" if reply.tool_calls else "stop"
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": MODEL,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": usage,
    }


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "fake_llm"}]})


async def stats(request: Request) -> Response:
    s: Stats = request.app.state.stats
    return JSONResponse({"requests": s.requests, "completed": s.completed, "aborted": s.aborted, "active": s.active})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok", "service": "fake_llm", "model": MODEL})


# ---------------------------------------------------------------------------------------------
# App
# ---------------------------------------------------------------------------------------------


def create_app() -> Starlette:
    app = Starlette(
        routes=[
            Route(OPENAI_PREFIX + CHAT_COMPLETIONS_PATH, chat_completions, methods=["POST"]),
            Route(OPENAI_PREFIX + MODELS_PATH, models),
            Route("/_fake/stats", stats),
            Route("/healthz", healthz),
        ]
    )
    app.state.stats = Stats()
    return app


app = create_app()

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A scripted OpenAI-compatible model for demos and tests.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8003, help="port to listen on (default 8003)")
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
