"""llm_proxy.py over real sockets: uvicorn runs the proxy, small aiohttp apps play the upstream.

No mock objects: every byte crosses a loopback socket, as it does between the agent, the proxy
and OpenAI. Each test starts its own fake upstream with the handler the case needs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import uvicorn
from aiohttp import web
from openai.lib.streaming.chat import ChatCompletionStreamState
from pytest_aiohttp import AiohttpServer

from llm_proxy import FAKE_LLM_URL, OPENAI_URL, Settings, create_app
from protocol import DONE, dumps, encode_data

ROOT = Path(__file__).resolve().parents[1]  # the repository, where `python llm_proxy.py` runs
API_KEY = "sk-proxy-only-3f9a7c1e"  # what the proxy holds; must reach the upstream and nowhere else
CLIENT_AUTH = "Bearer client-secret-d41d8"  # what a client sends; must not reach the upstream
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]  # a fake upstream's answer to one request

# ---------------------------------------------------------------------------------------------
# Fake upstream and proxy on real sockets
# ---------------------------------------------------------------------------------------------


@dataclass
class Seen:
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class FakeUpstream:
    """An OpenAI-compatible server on a loopback port, and what it saw."""

    url: str = ""  # base URL, ending in /v1
    requests: list[Seen] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # a request came in
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # a handler saw its client (the proxy) hang up


Serve = Callable[[Handler], Awaitable[FakeUpstream]]  # the `upstream` fixture: await upstream(handler)
Start = Callable[..., Awaitable[str]]  # the `proxy` fixture: await proxy(upstream_url, **settings) -> base URL


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> Serve:
    """Serve `handler` at /v1/chat/completions and /v1/models on a free port."""

    async def serve(handler: Handler) -> FakeUpstream:
        fake = FakeUpstream()

        async def recording(request: web.Request) -> web.StreamResponse:
            fake.requests.append(Seen(dict(request.headers), await request.read(), time.monotonic()))
            fake.arrived.set()
            try:
                return await handler(request)
            except (asyncio.CancelledError, ConnectionError):  # aiohttp cancels a handler whose client left
                fake.gone.set()
                raise

        app = web.Application()
        app.router.add_post("/v1/chat/completions", recording)
        app.router.add_get("/v1/models", recording)
        server = await aiohttp_server(app, shutdown_timeout=1)
        fake.url = str(server.make_url("/v1"))
        return fake

    return serve


@pytest.fixture
async def proxy() -> AsyncIterator[Start]:
    """Start llm_proxy under uvicorn on a free port; `await proxy(upstream_url, **settings)` -> its base URL."""
    running: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def start(upstream_url: str, **knobs: Any) -> str:
        settings = Settings(**{"base_url": upstream_url, "api_key": API_KEY, "backoff_base_s": 0.01, **knobs})
        server = uvicorn.Server(uvicorn.Config(create_app(settings), log_config=None, timeout_graceful_shutdown=1))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        running.append((server, task))
        while not server.started:
            if task.done():
                task.result()  # raises why it stopped
            await asyncio.sleep(0.005)
        return f"http://127.0.0.1:{sock.getsockname()[1]}/v1"

    yield start
    for server, task in running:
        server.should_exit = True
        await task


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"Authorization": CLIENT_AUTH}) as session:
        yield session


def chat(stream: bool = True, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], **extra}
    if stream:
        body["stream"] = True
    return body


def closed_port() -> int:
    """A port nothing listens on (bound, then let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def forever() -> None:
    await asyncio.Event().wait()


def sse(*events: bytes, done: bool = True, delay: float = 0.0, request_id: str = "req_up_1") -> Handler:
    """A handler that streams `events` (exact bytes, one write each), then [DONE] unless told not to."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-request-id": request_id})
        await resp.prepare(request)
        for event in events:
            await resp.write(event)
            if delay:
                await asyncio.sleep(delay)
        if done:
            await resp.write(DONE)
        await resp.write_eof()
        return resp

    return handler


def answer(status: int, body: bytes, headers: dict[str, str] | None = None) -> Handler:
    """A handler that answers every request with the same status, JSON body and headers."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, content_type="application/json", headers=headers)

    return handler


def log_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "llm_proxy"]


# Literal chunks, as OpenAI writes them (include_usage puts "usage":null on every chunk).
ROLE = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"gpt-test","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
HELLO = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"gpt-test","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":"Hello \xc3\xa9t\xc3\xa9"},"logprobs":null,"finish_reason":null}],"usage":null}\n\n'
STOP = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"gpt-test","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}\n\n'
USAGE = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"gpt-test","system_fingerprint":"fp_1","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}\n\n'
COMPLETION = b'{"id":"chatcmpl-2","object":"chat.completion","created":1700000000,"model":"gpt-test","choices":[{"index":0,"message":{"role":"assistant","content":"Hi.","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
MODELS = b'{"object":"list","data":[{"id":"gpt-test","object":"model","created":1700000000,"owned_by":"system"}]}'
UNAUTHORIZED = b'{"error":{"message":"Incorrect API key provided: sk-prox****1e.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}'
RATE_LIMITED = b'{"error":{"message":"Slow down.","type":"requests","param":null,"code":"rate_limit_exceeded"}}'
SERVER_ERROR = b'{"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}'


def error_events(body: bytes) -> list[dict[str, Any]]:
    """The `error` objects of the stream's data events."""
    events = [json.loads(line[6:]) for line in body.split(b"\n\n") if line.startswith(b"data: {")]
    return [e["error"] for e in events if "error" in e]


# ---------------------------------------------------------------------------------------------
# Pass-through
# ---------------------------------------------------------------------------------------------


async def test_healthz_names_the_upstream(upstream: Serve, proxy: Start, client: aiohttp.ClientSession) -> None:
    """GET /healthz answers 200 with the upstream it forwards to."""
    fake = await upstream(sse())
    base = await proxy(fake.url)
    async with client.get(base.removesuffix("/v1") + "/healthz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok", "upstream": fake.url}


async def test_stream_passes_chunks_through_byte_exact(
    upstream: Serve, proxy: Start, client: aiohttp.ClientSession
) -> None:
    """The client receives exactly the upstream's data lines, then [DONE]."""
    fake = await upstream(sse(ROLE, HELLO, STOP, delay=0.01))
    base = await proxy(fake.url)
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["x-request-id"] == "req_up_1"
        assert await resp.read() == ROLE + HELLO + STOP + DONE


async def test_include_usage_chunk_passes_through(
    upstream: Serve, proxy: Start, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """The usage chunk with empty choices reaches the client, and its tokens reach the log line."""
    caplog.set_level(logging.INFO, logger="llm_proxy")
    fake = await upstream(sse(ROLE, HELLO, STOP, USAGE))
    base = await proxy(fake.url)
    async with client.post(base + "/chat/completions", json=chat(stream_options={"include_usage": True})) as resp:
        assert await resp.read() == ROLE + HELLO + STOP + USAGE + DONE
    line = next(line for line in log_lines(caplog) if "/v1/chat/completions" in line)
    assert line.startswith("req_up_1 POST /v1/chat/completions model=gpt-test status=200 ttft=")
    assert "tokens=5+7" in line and "retries=0" in line and "duration=" in line


@pytest.mark.parametrize(
    ("upstream_bytes", "client_bytes"),
    [
        (b'data:{"a":1}\n\n', b'data: {"a":1}\n\n'),  # no space after the colon
        (b'data: {"a":1}\r\n\r\n', b'data: {"a":1}\n\n'),  # CRLF line ends
        (b': keep-alive\n\ndata: {"a":1}\n\n', b'data: {"a":1}\n\n'),  # a comment is dropped
        (b'event: chunk\nid: 7\ndata: {"a":1}\n\n', b'data: {"a":1}\n\n'),  # event and id are dropped
        (b'data: {"a":1}\n\ndata: {"b":2}\n\n', b'data: {"a":1}\n\ndata: {"b":2}\n\n'),  # two in one read
    ],
)
async def test_stream_framing_is_normalised_to_openai_form(
    upstream: Serve, proxy: Start, client: aiohttp.ClientSession, upstream_bytes: bytes, client_bytes: bytes
) -> None:
    """Whatever SSE framing the upstream uses, the client gets `data: <json>\\n\\n`."""
    fake = await upstream(sse(upstream_bytes))
    base = await proxy(fake.url)
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        assert await resp.read() == client_bytes + DONE


async def test_twenty_thousand_chunks_pass_in_order(
    upstream: Serve, proxy: Start, client: aiohttp.ClientSession
) -> None:
    """A long fast stream arrives whole and in order (one body write per network read keeps it quick)."""
    events = [encode_data(dumps({"choices": [{"index": 0, "delta": {"content": f" t{i}"}}]})) for i in range(20_000)]
    fake = await upstream(sse(b"".join(events[:10_000]), *events[10_000:]))
    base = await proxy(fake.url)
    started = time.monotonic()
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        assert await resp.read() == b"".join(events) + DONE
    assert time.monotonic() - started < 10


async def test_non_streaming_completion_passes_through(
    upstream: Serve, proxy: Start, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A whole completion comes back with the same status, bytes and x-request-id."""
    caplog.set_level(logging.INFO, logger="llm_proxy")
    fake = await upstream(answer(200, COMPLETION, {"x-request-id": "req_whole"}))
    base = await proxy(fake.url)
    async with client.post(base + "/chat/completions", json=chat(stream=False)) as resp:
        assert resp.status == 200
        assert resp.headers["x-request-id"] == "req_whole"
        assert resp.content_type == "application/json"
        assert await resp.read() == COMPLETION
    assert json.loads(fake.requests[0].body) == chat(stream=False)
    assert any("req_whole" in line and "tokens=3+2" in line for line in log_lines(caplog))


async def test_models_list_passes_through(upstream: Serve, proxy: Start, client: aiohttp.ClientSession) -> None:
    """GET /v1/models comes back byte for byte."""
    fake = await upstream(answer(200, MODELS))
    base = await proxy(fake.url)
    async with client.get(base + "/models") as resp:
        assert resp.status == 200
        assert await resp.read() == MODELS


async def test_401_comes_back_with_body_and_request_id(
    upstream: Serve, proxy: Start, client: aiohttp.ClientSession
) -> None:
    """An upstream 401 stays 401, with its error body and x-request-id, and is not retried."""
    fake = await upstream(answer(401, UNAUTHORIZED, {"x-request-id": "req_401"}))
    base = await proxy(fake.url)
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        assert resp.status == 401
        assert resp.headers["x-request-id"] == "req_401"
        assert await resp.read() == UNAUTHORIZED
    assert len(fake.requests) == 1


async def test_non_json_upstream_error_is_wrapped_in_openai_shape(
    upstream: Serve, proxy: Start, client: aiohttp.ClientSession
) -> None:
    """An HTML error page keeps its status but reaches the client as OpenAI's error JSON."""

    async def html(request: web.Request) -> web.Response:
        return web.Response(status=403, text="<html>Forbidden</html>", content_type="text/html")

    fake = await upstream(html)
    base = await proxy(fake.url)
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        assert resp.status == 403
        error = (await resp.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "<html>Forbidden</html>" in error["message"]


# ---------------------------------------------------------------------------------------------
# Retries
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_headers", "wait_s"), [({"retry-after": "0.25"}, 0.25), ({"retry-after-ms": "250"}, 0.25)]
)
async def test_429_then_200_succeeds_after_retry_after(
    upstream: Serve,
    proxy: Start,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    retry_headers: dict[str, str],
    wait_s: float,
) -> None:
    """A 429 is retried after the Retry-After it carries, and the stream then succeeds."""
    caplog.set_level(logging.INFO, logger="llm_proxy")
    stream = sse(ROLE, STOP)

    async def handler(request: web.Request) -> web.StreamResponse:
        if len(fake.requests) == 1:
            return web.Response(status=429, body=RATE_LIMITED, headers=retry_headers)
        return await stream(request)

    fake = await upstream(handler)
    base = await proxy(fake.url)
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        assert resp.status == 200
        assert await resp.read() == ROLE + STOP + DONE
    assert len(fake.requests) == 2
    assert wait_s <= fake.requests[1].at - fake.requests[0].at < wait_s + 1
    retry_line = next(line for line in log_lines(caplog) if " retry " in line)
    assert "retry 1/2 in 0.25s after HTTP 429" in retry_line
    assert any("status=200" in line and "retries=1" in line for line in log_lines(caplog))


@pytest.mark.parametrize(
    ("status", "headers", "attempts"),
    [
        (500, {}, 3),  # 5xx: two retries, then the last answer
        (503, {"x-should-retry": "false"}, 1),  # the server says no
        (400, {"x-should-retry": "true"}, 3),  # the server says yes, even to a 400
        (400, {}, 1),  # a bad request stays bad
        (429, {"retry-after": "3600"}, 1),  # longer than RETRY_AFTER_CAP_S: back to the client at once
    ],
)
async def test_retry_policy_table(
    upstream: Serve, proxy: Start, client: aiohttp.ClientSession, status: int, headers: dict[str, str], attempts: int
) -> None:
    """Which upstream answers are retried, and that the last one reaches the client as it came."""
    fake = await upstream(answer(status, SERVER_ERROR, headers))
    base = await proxy(fake.url)
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        assert resp.status == status
        assert await resp.read() == SERVER_ERROR
        for name, value in headers.items():
            assert resp.headers[name] == value
    assert len(fake.requests) == attempts


async def test_500_three_times_gives_final_500_after_two_retries(
    upstream: Serve, proxy: Start, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Three 500s: two retries are logged, and the third 500 reaches the client."""
    caplog.set_level(logging.INFO, logger="llm_proxy")
    fake = await upstream(answer(500, SERVER_ERROR, {"x-request-id": "req_500"}))
    base = await proxy(fake.url)
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        assert resp.status == 500
        assert await resp.read() == SERVER_ERROR
    assert len(fake.requests) == 3
    lines = log_lines(caplog)
    assert [line.split(" in ")[0] for line in lines if " retry " in line] == ["req_500 retry 1/2", "req_500 retry 2/2"]
    assert any("status=500" in line and "retries=2" in line for line in lines)


async def test_retry_budget_stops_retries(upstream: Serve, proxy: Start, client: aiohttp.ClientSession) -> None:
    """No retry starts if its wait would end past the total retry budget."""
    fake = await upstream(answer(503, SERVER_ERROR, {"retry-after": "0.5"}))
    base = await proxy(fake.url, retry_budget_s=0.3)
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        assert resp.status == 503
    assert len(fake.requests) == 1


async def test_unreachable_upstream_gives_502_after_retries(
    proxy: Start, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Connection refused three times: a 502 with OpenAI's error body."""
    caplog.set_level(logging.INFO, logger="llm_proxy")
    base = await proxy(f"http://127.0.0.1:{closed_port()}/v1")
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        assert resp.status == 502
        assert resp.headers["x-request-id"].startswith("proxy-")
        error = (await resp.json())["error"]
    assert error["code"] == "llm_unavailable" and "connection failed" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert sum(" retry " in line for line in log_lines(caplog)) == 2


async def test_no_retry_once_bytes_were_sent(upstream: Serve, proxy: Start, client: aiohttp.ClientSession) -> None:
    """A stream cut mid-way gives one error event and no [DONE]; the upstream got one request."""

    async def drop(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(ROLE + HELLO)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()  # cut the connection mid-body
        return resp

    fake = await upstream(drop)
    base = await proxy(fake.url)
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        assert resp.status == 200
        body = await resp.read()
    assert body.startswith(ROLE + HELLO)
    assert DONE not in body
    [error] = error_events(body)
    assert error["code"] == "llm_stream_broken" and "mid-stream" in error["message"]
    assert "ClientPayloadError" in error["message"]  # what aiohttp raises for a body cut short
    assert body.endswith(b"}}\n\n") and body.count(b"data: ") == 3
    assert len(fake.requests) == 1


# ---------------------------------------------------------------------------------------------
# Broken streams and timeouts
# ---------------------------------------------------------------------------------------------


async def test_malformed_chunk_gives_error_event(upstream: Serve, proxy: Start, client: aiohttp.ClientSession) -> None:
    """A chunk that is not JSON ends the stream with one error event after the good chunks."""
    fake = await upstream(sse(ROLE + b"data: {not json\n\n" + HELLO))
    base = await proxy(fake.url)
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        body = await resp.read()
    assert body.startswith(ROLE) and HELLO not in body and DONE not in body
    [error] = error_events(body)
    assert error["code"] == "llm_stream_broken" and "{not json" in error["message"]


@pytest.mark.parametrize(
    "bad", [b"data: [1]\n\n", b'data: "text"\n\n', b"data: 42\n\n", b'data: {"cut":\n\n', b"data: \n\n"]
)
async def test_chunk_that_cannot_be_an_object_gives_error_event(
    upstream: Serve, proxy: Start, client: aiohttp.ClientSession, bad: bytes
) -> None:
    """Plain chunks are not parsed (choice 5), yet anything not shaped like one object is caught."""
    fake = await upstream(sse(ROLE, bad, HELLO))
    base = await proxy(fake.url)
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        body = await resp.read()
    assert body.startswith(ROLE) and HELLO not in body and DONE not in body
    [error] = error_events(body)
    assert error["code"] == "llm_stream_broken" and "not a JSON object" in error["message"]


@pytest.mark.parametrize("chunk", [b'data:  {"choices":[]}\n\n', b'data: {"choices":[]} \n\n', b'data: {"choices":[]}\t\n\n'])
async def test_chunk_with_space_around_its_object_passes(upstream: Serve, proxy: Start, client: aiohttp.ClientSession, chunk: bytes) -> None:
    """Valid JSON with a space or tab around it fails the cheap shape test, then passes the parse."""
    fake = await upstream(sse(ROLE, chunk, HELLO))
    base = await proxy(fake.url)
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        assert await resp.read() == ROLE + chunk + HELLO + DONE  # the data value keeps its space


async def test_chunk_nested_too_deep_is_an_error_event(upstream: Serve, proxy: Start, client: aiohttp.ClientSession) -> None:
    """JSON nested past the parser's limit is a broken chunk, not a crash."""
    deep = b'data: {"error":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n\n"
    fake = await upstream(sse(ROLE, deep, HELLO))
    base = await proxy(fake.url)
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        body = await resp.read()
    [error] = error_events(body)
    assert error["code"] == "llm_stream_broken" and "not a JSON object" in error["message"]


async def test_error_key_in_a_broken_chunk_is_caught(upstream: Serve, proxy: Start, client: aiohttp.ClientSession) -> None:
    """A chunk that may be an error event is parsed: broken between its braces, it is garbage."""
    fake = await upstream(sse(ROLE, b'data: {"error": oops}\n\n', HELLO))
    base = await proxy(fake.url)
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        body = await resp.read()
    [error] = error_events(body)
    assert error["code"] == "llm_stream_broken" and "oops" in error["message"]


async def test_usage_written_with_spaces_reaches_the_log(
    upstream: Serve, proxy: Start, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that writes `"usage": {...}` with spaces (not OpenAI's compact form) still gets its tokens logged."""
    caplog.set_level(logging.INFO, logger="llm_proxy")
    spaced = b'data: {"id": "x", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}\n\n'
    fake = await upstream(sse(ROLE, HELLO, spaced))
    base = await proxy(fake.url)
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        assert await resp.read() == ROLE + HELLO + spaced + DONE
    assert any("tokens=9+4" in line for line in log_lines(caplog))


async def test_stream_ending_without_done_gives_error_event(
    upstream: Serve, proxy: Start, client: aiohttp.ClientSession
) -> None:
    """A stream that ends cleanly but without [DONE] is reported, not passed off as complete."""
    fake = await upstream(sse(ROLE, HELLO, done=False))
    base = await proxy(fake.url)
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        body = await resp.read()
    assert body.startswith(ROLE + HELLO) and DONE not in body
    [error] = error_events(body)
    assert "without data: [DONE]" in error["message"]


async def test_upstream_error_event_is_forwarded_and_ends_the_stream(
    upstream: Serve, proxy: Start, client: aiohttp.ClientSession
) -> None:
    """An error event from the upstream itself is the one error event; nothing follows it."""
    upstream_error = b'data: {"error":{"message":"overloaded","type":"server_error","param":null,"code":null}}\n\n'
    fake = await upstream(sse(ROLE, upstream_error, HELLO))
    base = await proxy(fake.url)
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        assert await resp.read() == ROLE + upstream_error


@pytest.mark.parametrize("headers_sent", [True, False])
async def test_first_chunk_timeout_gives_504(
    upstream: Serve, proxy: Start, client: aiohttp.ClientSession, headers_sent: bool
) -> None:
    """No first chunk in time: a 504 with OpenAI's error body, no retry, upstream aborted."""

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        if headers_sent:
            await resp.prepare(request)
        await forever()
        return resp

    fake = await upstream(stall)
    base = await proxy(fake.url, first_chunk_timeout_s=0.3)
    started = time.monotonic()
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        assert resp.status == 504
        error = (await resp.json())["error"]
    assert 0.3 <= time.monotonic() - started < 2
    assert error["message"] == "the upstream sent no first chunk within 0.3s"
    assert len(fake.requests) == 1
    await asyncio.wait_for(fake.gone.wait(), 2)


async def test_idle_timeout_mid_stream_gives_error_event(
    upstream: Serve, proxy: Start, client: aiohttp.ClientSession
) -> None:
    """Silence mid-stream past the idle timeout: the chunks so far, then one error event."""

    async def stall_after_one(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(ROLE)
        await forever()
        return resp

    fake = await upstream(stall_after_one)
    base = await proxy(fake.url, idle_timeout_s=0.3)
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        body = await resp.read()
    assert body.startswith(ROLE) and DONE not in body
    [error] = error_events(body)
    assert error["message"] == "the upstream sent nothing for 0.3s mid-stream"
    await asyncio.wait_for(fake.gone.wait(), 2)


# ---------------------------------------------------------------------------------------------
# Cancellation: the upstream must see the client leave
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers_sent", [True, False])
async def test_client_disconnect_while_waiting_for_first_token_aborts_upstream(
    upstream: Serve, proxy: Start, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture, headers_sent: bool
) -> None:
    """The client gives up before the first token: the upstream sees its connection close."""
    caplog.set_level(logging.INFO, logger="llm_proxy")

    async def stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        if headers_sent:
            await resp.prepare(request)
        await forever()
        return resp

    fake = await upstream(stall)
    base = await proxy(fake.url)
    call = asyncio.create_task(client.post(base + "/chat/completions", json=chat()))
    await asyncio.wait_for(fake.arrived.wait(), 2)
    call.cancel()  # aiohttp closes the connection to the proxy
    await asyncio.wait_for(fake.gone.wait(), 2)
    for _ in range(100):  # the log line is written right after the abort
        if any("status=499" in line for line in log_lines(caplog)):
            break
        await asyncio.sleep(0.01)
    assert any("status=499" in line and "before the first chunk" in line for line in log_lines(caplog))


async def test_client_disconnect_mid_stream_aborts_upstream(
    upstream: Serve, proxy: Start, client: aiohttp.ClientSession
) -> None:
    """The client leaves after the first chunk: the upstream sees its connection close."""

    async def one_then_stall(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(ROLE)
        await forever()
        return resp

    fake = await upstream(one_then_stall)
    base = await proxy(fake.url)
    resp = await client.post(base + "/chat/completions", json=chat())
    assert await resp.content.readuntil(b"\n\n") == ROLE
    resp.close()  # drop the connection, as a cancelled agent does
    await asyncio.wait_for(fake.gone.wait(), 2)


# ---------------------------------------------------------------------------------------------
# The API key and bad input
# ---------------------------------------------------------------------------------------------


async def test_api_key_goes_upstream_as_bearer_and_never_into_logs(
    upstream: Serve, proxy: Start, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """The proxy's key is the upstream's Bearer; the client's Authorization stays behind; no log shows the key."""
    caplog.set_level(logging.DEBUG)
    ok = await upstream(sse(ROLE, STOP))
    base = await proxy(ok.url)
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        assert await resp.read() == ROLE + STOP + DONE
    [seen] = ok.requests
    assert seen.headers["Authorization"] == f"Bearer {API_KEY}"
    assert all("client-secret" not in value for value in seen.headers.values())

    refused = await upstream(answer(401, UNAUTHORIZED))
    base = await proxy(refused.url)
    async with client.post(base + "/chat/completions", json=chat()) as resp:
        assert resp.status == 401
        assert API_KEY not in await resp.text() and API_KEY not in str(resp.headers)
    assert any(ok.url in line for line in log_lines(caplog))  # "upstream <url> (OPENAI_API_KEY set)"
    assert API_KEY not in caplog.text and "sk-prox" not in caplog.text  # not even the 401's masked quote


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"model": "gpt-test"}', "'messages' must be a non-empty array"),
        (b'{"model": "gpt-test", "messages": []}', "'messages' must be a non-empty array, got []"),
        (b'{"model": "gpt-test", "messages": "hi"}', "'messages' must be a non-empty array, got str"),
        (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"model": "\xff"}', "not valid JSON"),
    ],
)
async def test_bad_request_gives_400_and_the_proxy_keeps_serving(
    upstream: Serve, proxy: Start, client: aiohttp.ClientSession, body: bytes, says: str
) -> None:
    """A body that is not a chat request gets OpenAI's 400 error; the next request still works."""
    fake = await upstream(answer(200, COMPLETION))
    base = await proxy(fake.url)
    async with client.post(base + "/chat/completions", data=body, headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert says in error["message"] and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert fake.requests == []
    async with client.post(base + "/chat/completions", json=chat(stream=False)) as resp:
        assert resp.status == 200


# ---------------------------------------------------------------------------------------------
# The official openai SDK, unchanged
# ---------------------------------------------------------------------------------------------


def chunk_bytes(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    chunk = {
        "id": "chatcmpl-tools", "object": "chat.completion.chunk", "created": 1700000000, "model": "gpt-test",
        "system_fingerprint": "fp_1", "choices": [choice], "usage": None,
    }  # fmt: skip
    return encode_data(dumps(chunk))


def tool_call_stream(calls: list[tuple[str, str, str]]) -> list[bytes]:
    """OpenAI's exact shape: id, type and name only in a call's first fragment, arguments cut after."""
    events = [chunk_bytes({"role": "assistant", "content": None, "refusal": None})]
    for index, (call_id, name, arguments) in enumerate(calls):
        first = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        events.append(chunk_bytes({"tool_calls": [first]}))
        for start in range(0, len(arguments), 7):
            piece = {"index": index, "function": {"arguments": arguments[start : start + 7]}}
            events.append(chunk_bytes({"tool_calls": [piece]}))
    events.append(chunk_bytes({}, "tool_calls"))
    usage = {"prompt_tokens": 40, "completion_tokens": 20, "total_tokens": 60}
    events.append(encode_data(dumps({**json.loads(chunk_bytes({})[6:]), "choices": [], "usage": usage})))
    return events


async def sdk_stream(base_url: str) -> dict[str, Any]:
    """What the openai SDK assembles from a streamed completion at `base_url`."""
    sdk = openai.AsyncOpenAI(base_url=base_url, api_key="client-secret-d41d8", max_retries=0)
    try:
        stream = await sdk.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "read a.py"}], stream=True,
            stream_options={"include_usage": True},
            tools=[{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}],
        )  # fmt: skip
        state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
        async for chunk in stream:
            state.handle_chunk(chunk)
        return state.get_final_completion().model_dump()
    finally:
        await sdk.close()


@pytest.mark.parametrize(
    "calls",
    [
        [("call_a1", "read_file", '{"path": "src/app.py", "start_line": 1}')],
        [("call_a1", "read_file", '{"path": "a.py"}'), ("call_b2", "git_diff", '{"staged": true, "paths": ["a.py"]}')],
    ],
    ids=["one_call", "two_parallel_calls"],
)
async def test_openai_sdk_streams_tool_calls_as_from_the_upstream_itself(
    upstream: Serve, proxy: Start, calls: list[tuple[str, str, str]]
) -> None:
    """The SDK pointed at the proxy assembles the same completion as pointed at the upstream."""
    fake = await upstream(sse(*tool_call_stream(calls)))
    base = await proxy(fake.url)
    direct = await sdk_stream(fake.url)
    proxied = await sdk_stream(base)
    assert proxied == direct
    [choice] = proxied["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    tool_calls = choice["message"]["tool_calls"]
    assembled = [(c["id"], c["type"], c["function"]["name"], c["function"]["arguments"]) for c in tool_calls]
    assert assembled == [(call_id, "function", name, arguments) for call_id, name, arguments in calls]
    assert proxied["usage"]["total_tokens"] == 60
    assert all(seen.headers["Authorization"] == f"Bearer {API_KEY}" for seen in fake.requests[1:])


async def test_openai_sdk_reads_a_broken_stream_as_an_error(upstream: Serve, proxy: Start) -> None:
    """The proxy's mid-stream error event makes the SDK raise, not return a short answer."""
    fake = await upstream(sse(ROLE, HELLO, done=False))
    base = await proxy(fake.url)
    with pytest.raises(openai.APIError, match="without data: \\[DONE\\]"):
        await sdk_stream(base)


# ---------------------------------------------------------------------------------------------
# Configuration and the command line
# ---------------------------------------------------------------------------------------------


async def run_python(code_or_args: list[str], env: dict[str, str]) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable, *code_or_args, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    return out.decode()


@pytest.mark.parametrize(
    ("env", "base_url"),
    [
        ({}, FAKE_LLM_URL),
        ({"OPENAI_API_KEY": "sk-x"}, OPENAI_URL),
        ({"OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": "http://llm.local:9000/v1/"}, "http://llm.local:9000/v1"),
        ({"OPENAI_BASE_URL": "http://llm.local:9000/v1"}, "http://llm.local:9000/v1"),
    ],
)
async def test_upstream_choice_follows_the_environment(env: dict[str, str], base_url: str) -> None:
    """OPENAI_BASE_URL if set; else OpenAI when OPENAI_API_KEY is set; else fake_llm."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    out = await run_python(["-c", "import llm_proxy; print(llm_proxy.Settings.from_env().base_url)"], {**clean, **env})
    assert out.strip() == base_url


async def test_help_names_the_options_and_the_environment() -> None:
    """`python llm_proxy.py --help` documents --host, --port and the environment."""
    out = await run_python(["llm_proxy.py", "--help"], dict(os.environ))
    assert "--host" in out and "--port" in out and "OPENAI_API_KEY" in out and "8002" in out
