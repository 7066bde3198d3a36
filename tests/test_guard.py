"""protocol.py's section 6 over real sockets: the Guard, read_body, HeadTimeoutProtocol, serve().

A tiny Starlette app behind the Guard runs under real uvicorn on a free loopback port; every
request is written as literal bytes on a raw socket, hostile headers included, since an HTTP
client library would fix them up (aiohttp normalises `..`, sets its own Host, adds a type).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from protocol import ClientHungUp, Guard, HeadTimeoutProtocol, HttpProblem, is_loopback, read_json_body

ROOT = Path(__file__).resolve().parents[1]
HEAD_TIMEOUT_S = 0.3  # the test server's HEADER_TIMEOUT_S
BODY_TIMEOUT_S = 0.5  # the test app's read_body timeout
MAX_BODY = 4096  # the test app's read_body limit: room for JSON nested 2,000 deep
SECRET = "guard-secret-5b1e"


class QuickHeads(HeadTimeoutProtocol):
    head_timeout_s = HEAD_TIMEOUT_S


# ---------------------------------------------------------------------------------------------
# The app under the Guard, a server for it, and a raw HTTP client
# ---------------------------------------------------------------------------------------------


@dataclass
class Seen:
    problems: list[HttpProblem] = field(default_factory=list)  # what read_json_body raised
    requests: int = 0  # requests that reached the app


def tiny_app(seen: Seen, guard: dict[str, Any]) -> Starlette:
    async def echo(request: Request) -> Response:
        seen.requests += 1
        if request.method == "GET":
            return JSONResponse({"ok": True})
        try:
            body = await read_json_body(request, MAX_BODY, BODY_TIMEOUT_S)
        except HttpProblem as problem:
            seen.problems.append(problem)
            return problem.response()
        return JSONResponse({"got": body})

    async def slow_stream(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(4):
                yield f"chunk {i}\n".encode()
                await asyncio.sleep(HEAD_TIMEOUT_S)

        return StreamingResponse(chunks(), media_type="text/plain")

    async def ws_echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    routes = [
        Route("/healthz", echo),
        Route("/echo", echo, methods=["GET", "POST"]),
        Route("/slow", slow_stream),
        WebSocketRoute("/ws", ws_echo),
    ]
    return Starlette(routes=routes, middleware=[Middleware(Guard, **guard)])


Serve = Callable[..., Awaitable[int]]  # await serve(**guard_options, bind=..., wrap=...) -> port


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Serve tiny_app behind Guard(**options) with uvicorn and QuickHeads; the port comes back."""
    running: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def start(bind: str = "127.0.0.1", wrap: Callable[[Any], Any] | None = None, seen: Seen | None = None, **guard: Any) -> int:
        app = tiny_app(seen or Seen(), guard)
        config = uvicorn.Config(wrap(app) if wrap else app, http=QuickHeads, log_config=None, timeout_graceful_shutdown=1)
        server = uvicorn.Server(config)
        sock = socket.socket()
        sock.bind((bind, 0))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        running.append((server, task))
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        return int(sock.getsockname()[1])

    yield start
    for server, task in running:
        server.should_exit = True
        await task


@dataclass
class RawAnswer:
    status: int  # 0: the server closed without answering
    headers: dict[str, str]
    body: bytes


def parse_reply(data: bytes) -> RawAnswer:
    if not data:
        return RawAnswer(0, {}, b"")
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return RawAnswer(int(status_line.split()[1]), headers, body)


async def exchange(port: int, data: bytes, bind: str = "127.0.0.1") -> RawAnswer:
    """Send `data` on a new connection, read until the server closes it."""
    reader, writer = await asyncio.open_connection(bind, port)
    writer.write(data)
    await writer.drain()
    try:
        return parse_reply(await asyncio.wait_for(reader.read(), 5))
    finally:
        writer.close()


def request(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    """Literal request bytes: exactly these headers (Host too), plus Content-Length for a body."""
    lines = [f"{method} {path} HTTP/1.1", *(f"{name}: {value}" for name, value in headers.items())]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join([*lines, "Connection: close", "", ""])).encode("latin-1") + body


async def call(port: int, method: str = "GET", path: str = "/echo", host: str | None = None, body: bytes = b"", **headers: str) -> RawAnswer:
    """One request with Host 127.0.0.1:port unless told; header names given as Content_Type."""
    named = {"Host": host if host is not None else f"127.0.0.1:{port}", **{k.replace("_", "-"): v for k, v in headers.items()}}
    return await exchange(port, request(method, path, named, body))


# ---------------------------------------------------------------------------------------------
# Host, peer, Origin, secret, body type
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1:{port}", 200),
        ("localhost:{port}", 200),
        ("LocalHost:{port}", 200),  # names are case-insensitive
        ("[::1]:{port}", 200),
        ("localhost", 200),  # no port: a proxy in front, or port 80
        ("127.0.0.1:", 200),  # an empty port is legal (RFC 3986)
        ("evil.example:{port}", 403),  # DNS rebinding: the page's own name
        ("evil.example", 403),
        ("localhost.evil.example:{port}", 403),
        ("127.0.0.1.nip.io:{port}", 403),
        ("localhost:{port}@evil.example", 403),
        ("localhost:80:80", 403),
        ("::1", 403),  # IPv6 without brackets is not a Host
        ("127.0.0.2:{port}", 403),  # loopback, but not a name we serve
        ("", 403),
    ],
)
async def test_host_must_name_loopback(serve: Serve, host: str, status: int) -> None:
    """Only localhost, 127.0.0.1 and [::1], with any port, pass the Host check."""
    seen = Seen()
    port = await serve(seen=seen)
    reply = await call(port, host=host.format(port=port))
    assert reply.status == status
    assert seen.requests == (1 if status == 200 else 0)
    if status == 403:
        assert b"is not allowed" in reply.body and reply.headers["connection"] == "close"


async def test_missing_host_is_refused(serve: Serve) -> None:
    """An HTTP/1.0 request may omit Host; the Guard refuses it like a foreign one."""
    port = await serve()
    reply = await exchange(port, b"GET /echo HTTP/1.0\r\n\r\n")
    assert reply.status == 403


@pytest.mark.parametrize(("hosts", "host", "status"), [
    (frozenset({"agent.internal"}), "agent.internal:8001", 200),
    (frozenset({"Agent.Internal"}), "AGENT.internal", 200),
    (frozenset({"agent.internal"}), "other.internal:8001", 403),
    (frozenset({"*"}), "anything.example", 200),
])  # fmt: skip
async def test_allowed_hosts_adds_names(serve: Serve, hosts: frozenset[str], host: str, status: int) -> None:
    """ALLOWED_HOSTS entries (any port) pass too; `*` turns the check off."""
    port = await serve(hosts=hosts)
    assert (await call(port, host=host)).status == status


@pytest.mark.parametrize(
    ("options", "origin", "host", "status"),
    [
        ({}, None, "127.0.0.1:{port}", 200),  # not a browser
        ({}, "http://evil.example", "127.0.0.1:{port}", 403),
        ({}, "null", "127.0.0.1:{port}", 403),  # sandboxed iframes, file:// pages
        ({}, "http://127.0.0.1:{port}", "127.0.0.1:{port}", 403),  # no page at all, by default
        ({"origins": frozenset({"https://ide.example/"})}, "https://ide.example", "127.0.0.1:{port}", 200),
        ({"origins": frozenset({"https://ide.example"})}, "https://IDE.example", "127.0.0.1:{port}", 200),
        ({"origins": frozenset({"https://ide.example"})}, "http://ide.example", "127.0.0.1:{port}", 403),
        ({"same_origin": True}, "http://127.0.0.1:{port}", "127.0.0.1:{port}", 200),  # the gateway's own page
        ({"same_origin": True}, "http://localhost:{port}", "localhost:{port}", 200),
        ({"same_origin": True}, "http://localhost:{port}", "127.0.0.1:{port}", 403),  # another origin
        ({"same_origin": True}, "http://127.0.0.1:1", "127.0.0.1:{port}", 403),  # another port
        ({"same_origin": True}, "https://127.0.0.1:{port}", "127.0.0.1:{port}", 403),  # another scheme
        ({"same_origin": True}, "http://evil.example", "127.0.0.1:{port}", 403),
    ],
)
async def test_origin_when_present_must_be_allowed(
    serve: Serve, options: dict[str, Any], origin: str | None, host: str, status: int
) -> None:
    """No Origin passes; a present one must be listed, or be the server itself when same_origin."""
    port = await serve(**options)
    headers = {} if origin is None else {"Origin": origin.format(port=port)}
    assert (await call(port, host=host.format(port=port), **headers)).status == status


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("application/json", b'{"a":1}', 200),
        ("application/json; charset=utf-8", b'{"a":1}', 200),
        ("Application/JSON", b'{"a":1}', 200),
        ("text/plain", b'{"a":1}', 415),  # the cross-site "simple request"
        ("text/plain;charset=UTF-8", b'{"a":1}', 415),
        ("application/x-www-form-urlencoded", b"a=1", 415),
        ("multipart/form-data; boundary=x", b"--x--", 415),
        ("application/jsonx", b'{"a":1}', 415),
        (None, b'{"a":1}', 415),
    ],
)
async def test_a_body_must_be_declared_json(serve: Serve, content_type: str | None, body: bytes, status: int) -> None:
    """A body with any type but application/json is refused before the app reads it."""
    seen = Seen()
    port = await serve(seen=seen)
    headers = {} if content_type is None else {"Content_Type": content_type}
    reply = await call(port, "POST", body=body, **headers)
    assert reply.status == status
    assert seen.requests == (1 if status == 200 else 0)


async def test_a_chunked_body_must_be_declared_json_too(serve: Serve) -> None:
    """Transfer-Encoding: chunked, no Content-Length: still a body, still checked."""
    port = await serve()
    head = request("POST", "/echo", {"Host": f"127.0.0.1:{port}", "Transfer-Encoding": "chunked", "Content-Type": "text/plain"})
    assert (await exchange(port, head + b"2\r\n{}\r\n0\r\n\r\n")).status == 415


async def test_a_bodiless_post_passes_the_type_check(serve: Serve) -> None:
    """A POST with no body has no type to check (the app then finds no JSON: 400)."""
    port = await serve()
    reply = await call(port, "POST", Content_Length="0")
    assert reply.status == 400 and b"not valid JSON" in reply.body


@pytest.mark.parametrize(
    ("authorization", "path", "status"),
    [
        (None, "/echo", 401),
        ("Bearer wrong", "/echo", 401),
        (f"Basic {SECRET}", "/echo", 401),
        (f"Bearer {SECRET}x", "/echo", 401),
        (f"Bearer {SECRET}", "/echo", 200),
        (f"bearer {SECRET}", "/echo", 200),  # the scheme is case-insensitive (RFC 9110)
        (None, "/healthz", 200),  # open to a probe without the secret
    ],
)
async def test_the_secret_is_required_when_set(serve: Serve, authorization: str | None, path: str, status: int) -> None:
    """With a secret, every request but /healthz needs `Authorization: Bearer <secret>`."""
    port = await serve(secret=SECRET, secret_name="TEST_KEY")
    headers = {} if authorization is None else {"Authorization": authorization}
    reply = await call(port, path=path, **headers)
    assert reply.status == status
    if status == 401:
        assert reply.headers["www-authenticate"] == "Bearer"
        assert b"Bearer <TEST_KEY>" in reply.body and SECRET.encode() not in reply.body


async def test_host_is_checked_before_the_secret(serve: Serve) -> None:
    """The right secret does not make a foreign Host acceptable (nor a foreign Origin)."""
    port = await serve(secret=SECRET)
    assert (await call(port, host="evil.example", Authorization=f"Bearer {SECRET}")).status == 403
    assert (await call(port, Origin="http://evil.example", Authorization=f"Bearer {SECRET}")).status == 403


def outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if is_loopback(address) else address


@pytest.mark.parametrize(
    ("options", "authorization", "status"),
    [
        ({}, None, 403),  # no secret: loopback peers only (protected mode)
        ({"secret": SECRET}, None, 401),
        ({"secret": SECRET}, f"Bearer {SECRET}", 200),
        ({"protected": False}, None, 200),  # a service with its own credentials (the gateway)
    ],
)
async def test_a_peer_on_another_address_needs_the_secret(
    serve: Serve, options: dict[str, Any], authorization: str | None, status: int
) -> None:
    """A request from a non-loopback address is served only when a secret is set (and sent)."""
    address = outward_address()
    if address is None:
        pytest.skip("no non-loopback address on this machine")
    port = await serve(bind=address, hosts=frozenset({address}), **options)
    headers = {} if authorization is None else {"Authorization": authorization}
    data = request("GET", "/echo", {"Host": f"{address}:{port}", **headers})
    reply = await exchange(port, data, bind=address)
    assert reply.status == status
    if status == 403:
        assert b"serves loopback clients only" in reply.body


async def test_a_refusal_is_one_short_log_line(serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    """A 10,000-character Host is refused with one log line that quotes only its start."""
    caplog.set_level(logging.INFO)
    port = await serve()
    assert (await call(port, host="e" * 10_000)).status == 403
    [line] = [r.getMessage() for r in caplog.records if r.name == "guard"]
    assert line.startswith("refused GET /echo from 127.0.0.1: 403 Host 'eeee") and len(line) < 400


async def test_the_error_body_is_the_services_own(serve: Serve) -> None:
    """The Guard answers in the shape the service passes (OpenAI's, for llm_proxy)."""
    port = await serve(error_body=lambda status, message: {"error": {"message": message, "type": "x", "param": None, "code": None}})
    reply = await call(port, host="evil.example")
    assert reply.body.startswith(b'{"error":{"message":"Host ') and reply.body.endswith(b'"type":"x","param":null,"code":null}}')


# ---------------------------------------------------------------------------------------------
# WebSocket handshakes
# ---------------------------------------------------------------------------------------------


def handshake(port: int, host: str | None = None, origin: str | None = None) -> bytes:
    headers = {
        "Host": host or f"127.0.0.1:{port}", "Upgrade": "websocket", "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13",
    }  # fmt: skip
    if origin is not None:
        headers["Origin"] = origin
    lines = [f"GET /ws HTTP/1.1", *(f"{name}: {value}" for name, value in headers.items()), "", ""]
    return "\r\n".join(lines).encode()


async def handshake_status(port: int, data: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        status_line = await asyncio.wait_for(reader.readline(), 5)
        return int(status_line.split()[1])
    finally:
        writer.close()


def without_denial_extension(app: Any) -> Any:
    """The app as a server without the WebSocket denial-response extension would run it."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        await app({**scope, "extensions": {}} if scope["type"] == "websocket" else scope, receive, send)

    return wrapped


@pytest.mark.parametrize("wrap", [None, without_denial_extension], ids=["denial_response", "close_before_accept"])
@pytest.mark.parametrize(
    ("host", "origin", "status"),
    [
        (None, None, 101),  # ide.py, any non-browser client
        (None, "http://127.0.0.1:{port}", 101),  # the gateway's own page
        (None, "http://evil.example", 403),
        (None, "null", 403),
        ("evil.example:{port}", None, 403),
        ("evil.example:{port}", "http://evil.example:{port}", 403),  # DNS rebinding
    ],
)
async def test_a_handshake_from_a_foreign_page_is_refused(
    serve: Serve, wrap: Any, host: str | None, origin: str | None, status: int
) -> None:
    """A WebSocket from a foreign Origin or Host gets a plain 403, with or without the extension."""
    port = await serve(wrap=wrap, same_origin=True)
    data = handshake(port, host and host.format(port=port), origin and origin.format(port=port))
    assert await handshake_status(port, data) == status


# ---------------------------------------------------------------------------------------------
# read_body: size, time, bad JSON, a client that leaves
# ---------------------------------------------------------------------------------------------

JSON = {"Content_Type": "application/json"}


async def test_declared_oversize_body_is_refused_before_it_is_sent(serve: Serve) -> None:
    """Content-Length over the limit: 413 at once, though not one body byte was sent."""
    seen = Seen()
    port = await serve(seen=seen)
    head = request("POST", "/echo", {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", "Content-Length": "104857600"})
    started = time.monotonic()
    reply = await exchange(port, head)
    assert reply.status == 413 and time.monotonic() - started < 1
    assert b"104857600 bytes, over the limit of 4096" in reply.body
    assert [p.status for p in seen.problems] == [413]


async def test_chunked_oversize_body_is_refused_once_past_the_limit(serve: Serve) -> None:
    """No Content-Length: the body is counted as it comes, and refused past the limit."""
    port = await serve()
    head = request("POST", "/echo", {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    chunk = b"%x\r\n%s\r\n" % (3000, b" " * 3000)
    reply = await exchange(port, head + chunk + chunk)
    assert reply.status == 413 and b"over the limit of 4096 bytes" in reply.body


async def test_a_body_at_the_limit_passes(serve: Serve) -> None:
    port = await serve()
    body = b'"' + b"a" * (MAX_BODY - 2) + b'"'
    reply = await call(port, "POST", body=body, **JSON)
    assert reply.status == 200


async def test_a_slow_body_gets_408(serve: Serve) -> None:
    """A body still incomplete after the body timeout: 408, whatever the pace."""
    port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = request("POST", "/echo", {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", "Content-Length": "10"})
    writer.write(head + b"[1,")
    started = time.monotonic()
    reply = parse_reply(await asyncio.wait_for(reader.read(), 5))
    writer.close()
    assert reply.status == 408 and b"did not arrive within 0.5 s" in reply.body
    assert BODY_TIMEOUT_S <= time.monotonic() - started < BODY_TIMEOUT_S + 1


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"not json", b"not valid JSON"),
        (b'{"a": "\xff"}', b"not valid JSON"),
        (b"[" * 2000 + b"]" * 2000, b"nested too deeply"),
    ],
)
async def test_bad_json_is_a_400(serve: Serve, caplog: pytest.LogCaptureFixture, body: bytes, says: bytes) -> None:
    """Invalid JSON and JSON nested past the parser's depth are both a 400, never a traceback."""
    port = await serve()
    reply = await call(port, "POST", body=body, **JSON)
    assert reply.status == 400 and says in reply.body
    assert "Traceback" not in caplog.text and "Exception in ASGI application" not in caplog.text


async def test_a_client_that_hangs_up_mid_body_is_one_exception(serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    """A client gone before its body arrived raises ClientHungUp, and uvicorn logs no traceback."""
    caplog.set_level(logging.DEBUG)
    seen = Seen()
    port = await serve(seen=seen)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request("POST", "/echo", {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", "Content-Length": "100"}) + b"[1,")
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    for _ in range(100):
        if seen.problems:
            break
        await asyncio.sleep(0.01)
    [problem] = seen.problems
    assert isinstance(problem, ClientHungUp) and problem.status == 499
    assert "Traceback" not in caplog.text and "Exception in ASGI application" not in caplog.text


# ---------------------------------------------------------------------------------------------
# HeadTimeoutProtocol: request heads under a deadline, nothing after them
# ---------------------------------------------------------------------------------------------


async def test_a_silent_connection_is_closed_after_the_head_timeout(serve: Serve) -> None:
    """A connection that sends nothing is closed, without an answer, once the head timeout passes."""
    port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert HEAD_TIMEOUT_S - 0.05 <= time.monotonic() - started < HEAD_TIMEOUT_S + 1
    writer.close()


async def test_trickled_heads_get_408_while_a_normal_request_is_served(serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    """Twenty slowloris connections are cut at the head timeout; a real request meanwhile is answered."""
    caplog.set_level(logging.INFO)
    port = await serve()
    head = request("GET", "/echo", {"Host": f"127.0.0.1:{port}"})

    async def trickle() -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        for byte in head[:4]:  # a byte every 50 ms, then silence: no write races the server's close
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return data, time.monotonic() - started

    slow = [asyncio.create_task(trickle()) for _ in range(20)]
    await asyncio.sleep(0.1)
    assert (await call(port)).status == 200
    for data, elapsed in await asyncio.gather(*slow):
        assert data.startswith(b"HTTP/1.1 408 ") and HEAD_TIMEOUT_S - 0.05 <= elapsed < HEAD_TIMEOUT_S + 1  # the server's clock may start first
    assert sum("no complete request head within 0.3 s" in r.getMessage() for r in caplog.records) == 20


async def test_the_next_head_on_a_kept_alive_connection_has_the_same_deadline(serve: Serve) -> None:
    """After a response, the next head must also arrive within the timeout."""
    port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /echo HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    first = await asyncio.wait_for(reader.readuntil(b'{"ok":true}'), 5)
    assert first.startswith(b"HTTP/1.1 200 ")
    writer.write(b"GET /ec")
    started = time.monotonic()
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < HEAD_TIMEOUT_S + 1
    writer.close()


async def test_a_stream_longer_than_the_head_timeout_is_not_cut(serve: Serve) -> None:
    """A response that takes four head timeouts arrives whole: the timer stopped at the head."""
    port = await serve()
    reply = await call(port, path="/slow")
    assert reply.status == 200 and b"chunk 3\n" in reply.body


async def test_a_body_slower_than_the_head_timeout_is_not_cut_by_it(serve: Serve) -> None:
    """Once the head is in, only read_body's own (longer) timeout applies to the body."""
    port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request("POST", "/echo", {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", "Content-Length": "5"}))
    for byte in b"[1,2]":
        await asyncio.sleep(HEAD_TIMEOUT_S / 4)  # 0.375 s in all: past the head timeout, within the body's
        writer.write(bytes([byte]))
    reply = parse_reply(await asyncio.wait_for(reader.read(), 5))
    writer.close()
    assert reply.status == 200 and reply.body == b'{"got":[1,2]}'


async def test_a_websocket_outlives_the_head_timeout(serve: Serve) -> None:
    """A WebSocket upgraded from the head stays open past the head timeout."""
    from websockets.asyncio.client import connect

    port = await serve()
    async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
        await asyncio.sleep(HEAD_TIMEOUT_S * 3)
        await ws.send("still here")
        assert await ws.recv() == "still here"


# ---------------------------------------------------------------------------------------------
# serve() and is_loopback
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True), ("127.1.2.3", True), ("localhost", True), ("::1", True), ("[::1]", True),
        ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("::", False), ("192.0.2.7", False),
        ("example.com", False), ("", False),
    ],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "my-host.example"])
def test_serve_refuses_a_non_loopback_address_without_the_secret(host: str) -> None:
    """serve() exits with status 2 and says which setting is missing, before binding anything."""
    code = f"import protocol; protocol.serve(None, {host!r}, 1, secret='', secret_name='TEST_KEY')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30, env=dict(os.environ))
    assert done.returncode == 2
    assert f"refusing to listen on {host}:1 without TEST_KEY" in done.stderr
