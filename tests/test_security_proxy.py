"""llm_proxy attacked as issue 10 did it: real processes, hostile bytes on raw sockets.

`python llm_proxy.py` runs as a process; its upstream is a recorder, a plain HTTP server in a
thread that answers like OpenAI and keeps every request it gets, so that each test can say
"nothing reached the upstream" (and, for the requests that should pass, exactly what did).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest

from conftest import ROOT, Service, Stack, free_port, start_stack, wait_healthy
from test_guard import RawAnswer, exchange, outward_address, parse_reply, request

UPSTREAM_KEY = "sk-upstream-only-9c2f1d"  # OPENAI_API_KEY: the proxy's alone
PROXY_KEY = "proxy-key-for-clients-4a7e"  # LLM_PROXY_KEY: what the agent or an SDK sends
MAX_BODY = 100_000  # LLM_PROXY_MAX_BODY_BYTES of the proxies here (the default is 8 MiB)
LIMITS = {"LLM_PROXY_MAX_BODY_BYTES": str(MAX_BODY), "HEADER_TIMEOUT_S": "1", "BODY_TIMEOUT_S": "1"}
COMPLETION = {
    "id": "chatcmpl-r", "object": "chat.completion", "created": 1700000000, "model": "gpt-test",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}  # fmt: skip
CHUNKS = [
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}]},
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
]

# ---------------------------------------------------------------------------------------------
# The recorder (the upstream) and the proxies in front of it
# ---------------------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class Recorder:
    """An OpenAI-like upstream that answers every path (200), so that a leak would succeed."""

    url: str = ""  # base URL, ending in /v1
    seen: list[Seen] = field(default_factory=list)


def start_recorder() -> tuple[Recorder, ThreadingHTTPServer]:
    recorder = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.answer(b"")

        def do_POST(self) -> None:
            self.answer(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

        def answer(self, body: bytes) -> None:
            recorder.seen.append(Seen(self.command, self.path, dict(self.headers)))
            if self.path == "/v1/chat/completions" and json.loads(body).get("stream"):
                events = [b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-test", **c}).encode() + b"\n\n" for c in CHUNKS]
                self.reply("text/event-stream", b"".join(events) + b"data: [DONE]\n\n")
            elif self.path == "/v1/chat/completions":
                self.reply("application/json", json.dumps(COMPLETION).encode())
            elif self.path == "/v1/models":
                self.reply("application/json", b'{"object":"list","data":[{"id":"gpt-test","object":"model","created":1,"owned_by":"x"}]}')
            else:  # /v1/models/{id}, or a path that should never arrive: "the answer came back"
                self.reply("application/json", json.dumps({"id": self.path.rsplit("/", 1)[-1], "object": "model", "created": 1, "owned_by": "x", "leaked": self.path}).encode())

        def reply(self, content_type: str, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    recorder.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    return recorder, server


@pytest.fixture(scope="module")
def upstream() -> Iterator[Recorder]:
    recorder, server = start_recorder()
    yield recorder
    server.shutdown()


@pytest.fixture
def recorder(upstream: Recorder) -> Recorder:
    """The module's recorder, emptied for this test."""
    upstream.seen.clear()
    return upstream


def proxy_stack(tmp: Path, upstream: Recorder, **env: str) -> Stack:
    return start_stack(tmp, {"OPENAI_BASE_URL": upstream.url, "OPENAI_API_KEY": UPSTREAM_KEY, **LIMITS, **env}, only=("llm_proxy",))


@pytest.fixture(scope="module")
def open_proxy(tmp_path_factory: pytest.TempPathFactory, upstream: Recorder) -> Iterator[Service]:
    """llm_proxy as `honcho start` runs it: no LLM_PROXY_KEY."""
    stack = proxy_stack(tmp_path_factory.mktemp("open"), upstream)
    yield stack["llm_proxy"]
    stack.stop()


@pytest.fixture(scope="module")
def keyed_proxy(tmp_path_factory: pytest.TempPathFactory, upstream: Recorder) -> Iterator[Service]:
    """llm_proxy with LLM_PROXY_KEY set."""
    stack = proxy_stack(tmp_path_factory.mktemp("keyed"), upstream, LLM_PROXY_KEY=PROXY_KEY)
    yield stack["llm_proxy"]
    stack.stop()


async def call(service: Service, method: str, path: str, body: bytes = b"", host: str | None = None, **headers: str) -> RawAnswer:
    """One request as literal bytes: Host 127.0.0.1:PORT unless told; header names as Content_Type."""
    named = {"Host": host.format(port=service.port) if host is not None else f"127.0.0.1:{service.port}"}
    named.update({name.replace("_", "-"): value for name, value in headers.items()})
    return await exchange(service.port, request(method, path, named, body))


def openai_error(reply: RawAnswer) -> dict[str, object]:
    """The reply's error object, checked to be in OpenAI's shape."""
    error = json.loads(reply.body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


CHAT = json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}).encode()
JSON = {"Content_Type": "application/json"}


async def wait_for_log(service: Service, text: str, timeout: float = 5) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in service.log():
            break
        await asyncio.sleep(0.05)
    return service.log()


# ---------------------------------------------------------------------------------------------
# 1. A web page: DNS rebinding, cross-site simple requests
# ---------------------------------------------------------------------------------------------

REQUESTS = [("POST", "/v1/chat/completions", CHAT), ("GET", "/v1/models", b""), ("GET", "/v1/models/gpt-test", b""), ("GET", "/healthz", b"")]


@pytest.mark.parametrize(("method", "path", "body"), REQUESTS, ids=[f"{m} {p}" for m, p, _ in REQUESTS])
@pytest.mark.parametrize("host", ["evil.example:{port}", "evil.example", "127.0.0.1.nip.io:{port}"])
async def test_a_rebound_page_gets_403_and_nothing_goes_upstream(
    open_proxy: Service, recorder: Recorder, method: str, path: str, body: bytes, host: str
) -> None:
    """DNS rebinding: the page's own name in Host is refused, on every route, before any upstream call."""
    reply = await call(open_proxy, method, path, body, host=host, **JSON)
    assert reply.status == 403
    assert "Host" in str(openai_error(reply)["message"])
    assert recorder.seen == []


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status"),
    [
        ("POST", "/v1/chat/completions", CHAT, {"Content_Type": "text/plain", "Origin": "http://evil.example"}, 403),
        ("POST", "/v1/chat/completions", CHAT, {"Content_Type": "text/plain"}, 415),  # Origin stripped (old browser, or a tool)
        ("POST", "/v1/chat/completions", CHAT, {"Content_Type": "text/plain;charset=UTF-8"}, 415),
        ("POST", "/v1/chat/completions", b"a=1", {"Content_Type": "application/x-www-form-urlencoded"}, 415),
        ("POST", "/v1/chat/completions", CHAT, {}, 415),  # no Content-Type at all
        ("POST", "/v1/chat/completions", CHAT, {"Content_Type": "application/json", "Origin": "http://evil.example"}, 403),
        ("POST", "/v1/chat/completions", CHAT, {"Content_Type": "application/json", "Origin": "null"}, 403),
        ("GET", "/v1/models", b"", {"Origin": "http://evil.example"}, 403),
        ("GET", "/v1/models", b"", {"Origin": "http://127.0.0.1:8000"}, 403),  # the gateway's page: still not the proxy's
    ],
    ids=["text_plain_cross_site", "text_plain", "text_plain_charset", "form", "no_type", "json_cross_site", "json_origin_null", "get_cross_site", "get_from_gateway_page"],
)
async def test_a_cross_site_request_gets_403_or_415_and_nothing_goes_upstream(
    open_proxy: Service, recorder: Recorder, method: str, path: str, body: bytes, headers: dict[str, str], status: int
) -> None:
    """A page's Origin is 403; a body that is not application/json is 415; neither reaches the upstream."""
    reply = await call(open_proxy, method, path, body, **headers)
    assert reply.status == status
    openai_error(reply)
    assert recorder.seen == []


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "LOCALHOST"])
async def test_loopback_names_are_served(open_proxy: Service, recorder: Recorder, host: str) -> None:
    """The control: loopback Hosts, no Origin, a JSON body: forwarded and answered."""
    reply = await call(open_proxy, "POST", "/v1/chat/completions", CHAT, host=host, **JSON)
    assert reply.status == 200 and json.loads(reply.body)["choices"][0]["message"]["content"] == "ok"
    assert [(s.method, s.path) for s in recorder.seen] == [("POST", "/v1/chat/completions")]


# ---------------------------------------------------------------------------------------------
# 2. Only the documented routes, only model ids that are ids
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw_path", "status"),
    [
        ("/v1/models/../files/file-abc123/content", 404),
        ("/v1/models/%2e%2e/files/file-abc123/content", 404),
        ("/v1/models/..%2ffiles%2ffile-abc123%2fcontent", 404),  # %2f decodes to a slash: no route
        ("/v1/models/%2e%2e%2ffiles%2ffile-abc123%2fcontent", 404),
        ("/v1/models/%2E%2E", 400),
        ("/v1/models/..", 400),
        ("/v1/models/.", 400),
        ("/v1/models/gpt-4%2f..%2f..%2ffiles", 404),
        ("/v1/models/%2e%2e", 400),  # one segment once decoded: the raw-path check refuses it
        ("/v1/models/..%5cfiles", 400),  # a backslash, which some servers read as a slash
        ("/v1/models/gpt%00x", 400),
        ("/v1/models/gpt-4..x", 400),
        ("/v1/models/" + "a" * 129, 400),
        ("/v1/models/gpt-test/", 307),  # Starlette's redirect to the plain id; itself not forwarded
        ("/v1/files/file-abc123/content", 404),
        ("/v1/embeddings", 404),
        ("/v1/chat/completions/../../files", 404),
        ("/v1/../v1/files", 404),
    ],
)
async def test_no_path_but_the_documented_ones_reaches_the_upstream(
    open_proxy: Service, recorder: Recorder, raw_path: str, status: int
) -> None:
    """Traversal in every spelling browsers leave alone, and undocumented routes: 400 or 404, never forwarded."""
    reply = await call(open_proxy, "GET", raw_path)
    assert reply.status == status
    if status != 307:
        openai_error(reply)
    assert recorder.seen == []


@pytest.mark.parametrize("model_id", ["gpt-test", "gpt-4o-mini-2024-07-18", "ft:gpt-4o-mini:my-org::9abcDEF", "llama3.1:8b"])
async def test_a_plain_model_id_is_forwarded_as_written(open_proxy: Service, recorder: Recorder, model_id: str) -> None:
    reply = await call(open_proxy, "GET", f"/v1/models/{model_id}")
    assert reply.status == 200 and json.loads(reply.body)["id"] == model_id
    assert [(s.method, s.path) for s in recorder.seen] == [("GET", f"/v1/models/{model_id}")]


async def test_a_post_to_models_is_405_and_not_forwarded(open_proxy: Service, recorder: Recorder) -> None:
    reply = await call(open_proxy, "POST", "/v1/models", b"{}", **JSON)
    assert reply.status == 405 and "is not forwarded" in str(openai_error(reply)["message"])
    assert recorder.seen == []


# ---------------------------------------------------------------------------------------------
# 3. LLM_PROXY_KEY, and the upstream key staying home
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "status"),
    [(None, 401), ("Bearer wrong", 401), (f"Bearer {UPSTREAM_KEY}", 401), (f"Basic {PROXY_KEY}", 401), (f"Bearer {PROXY_KEY}", 200)],
)
async def test_with_llm_proxy_key_set_a_request_needs_it(
    keyed_proxy: Service, recorder: Recorder, authorization: str | None, status: int
) -> None:
    """Missing or wrong bearer: 401 with WWW-Authenticate and nothing forwarded; the right one goes through."""
    headers = {**JSON, **({} if authorization is None else {"Authorization": authorization})}
    reply = await call(keyed_proxy, "POST", "/v1/chat/completions", CHAT, **headers)
    assert reply.status == status
    if status == 401:
        assert reply.headers["www-authenticate"] == "Bearer"
        assert "LLM_PROXY_KEY" in str(openai_error(reply)["message"])
        assert recorder.seen == []
    else:
        [seen] = recorder.seen
        assert seen.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"  # the proxy's key, not the client's


async def test_healthz_needs_no_key_but_a_loopback_host(keyed_proxy: Service) -> None:
    assert (await call(keyed_proxy, "GET", "/healthz")).status == 200
    assert (await call(keyed_proxy, "GET", "/healthz", host="evil.example")).status == 403


async def test_neither_key_is_ever_logged(keyed_proxy: Service, recorder: Recorder) -> None:
    """After accepted and refused requests alike, the log holds neither key."""
    await call(keyed_proxy, "POST", "/v1/chat/completions", CHAT, Authorization=f"Bearer {PROXY_KEY}", **JSON)
    await call(keyed_proxy, "POST", "/v1/chat/completions", CHAT, Authorization=f"Bearer {UPSTREAM_KEY}", **JSON)
    log = await wait_for_log(keyed_proxy, "expected Authorization: Bearer <LLM_PROXY_KEY>")
    assert "status=200" in log and "401" in log
    assert PROXY_KEY not in log and UPSTREAM_KEY not in log


def sdk_round_trip(base_url: str, api_key: str) -> tuple[str, str, list[str]]:
    """What the official SDK gets: a whole completion, a streamed one, the model list."""
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model="gpt-test", messages=messages)  # type: ignore[arg-type]
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(model="gpt-test", messages=messages, stream=True)  # type: ignore[arg-type]
        if chunk.choices
    )
    return whole.choices[0].message.content or "", streamed, [m.id for m in client.models.list()]


@pytest.mark.parametrize("with_key", [False, True], ids=["no_key", "LLM_PROXY_KEY"])
async def test_the_openai_sdk_works_with_and_without_llm_proxy_key(
    open_proxy: Service, keyed_proxy: Service, recorder: Recorder, with_key: bool
) -> None:
    """The SDK sends its api_key as Bearer: any value without LLM_PROXY_KEY, that key with it."""
    service, api_key = (keyed_proxy, PROXY_KEY) if with_key else (open_proxy, "sk-anything")
    result = await asyncio.to_thread(sdk_round_trip, service.url + "/v1", api_key)
    assert result == ("ok", "ok", ["gpt-test"])
    assert len(recorder.seen) == 3 and all(s.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}" for s in recorder.seen)


async def test_the_openai_sdk_with_a_wrong_key_gets_authentication_error(keyed_proxy: Service, recorder: Recorder) -> None:
    with pytest.raises(openai.AuthenticationError, match="LLM_PROXY_KEY"):
        await asyncio.to_thread(sdk_round_trip, keyed_proxy.url + "/v1", "sk-wrong")
    assert recorder.seen == []


# ---------------------------------------------------------------------------------------------
# 4. Oversized, slow and broken bodies; clients that hang up
# ---------------------------------------------------------------------------------------------


async def test_a_body_declared_over_the_limit_is_413_before_it_is_sent(open_proxy: Service, recorder: Recorder) -> None:
    """`Content-Length: 100 MB`: refused from the header alone, at once; nothing read, nothing forwarded."""
    head = request("POST", "/v1/chat/completions", {"Host": f"127.0.0.1:{open_proxy.port}", "Content-Type": "application/json", "Content-Length": "104857600"})
    started = time.monotonic()
    reply = await exchange(open_proxy.port, head)
    assert reply.status == 413 and time.monotonic() - started < 1
    assert f"104857600 bytes, over the limit of {MAX_BODY}" in str(openai_error(reply)["message"])
    assert recorder.seen == []


async def test_a_chunked_body_over_the_limit_is_413(open_proxy: Service, recorder: Recorder) -> None:
    head = request("POST", "/v1/chat/completions", {"Host": f"127.0.0.1:{open_proxy.port}", "Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    chunk = b"%x\r\n%s\r\n" % (60_000, b" " * 60_000)
    reply = await exchange(open_proxy.port, head + chunk + chunk)
    assert reply.status == 413 and f"over the limit of {MAX_BODY} bytes" in str(openai_error(reply)["message"])
    assert recorder.seen == []


async def test_a_body_under_the_limit_is_forwarded_whole(open_proxy: Service, recorder: Recorder) -> None:
    body = json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "x" * (MAX_BODY - 100)}]}).encode()
    assert len(body) <= MAX_BODY
    assert (await call(open_proxy, "POST", "/v1/chat/completions", body, **JSON)).status == 200
    assert len(recorder.seen) == 1


async def test_a_body_nested_too_deep_is_an_openai_400(open_proxy: Service, recorder: Recorder) -> None:
    """JSON nested 40,000 deep: a 400 with OpenAI's error body, no traceback, nothing forwarded."""
    body = b'{"model": "gpt-test", "messages": ' + b"[" * 40_000 + b"]" * 40_000 + b"}"
    reply = await call(open_proxy, "POST", "/v1/chat/completions", body, **JSON)
    assert reply.status == 400
    error = openai_error(reply)
    assert error["type"] == "invalid_request_error" and "nested too deeply" in str(error["message"])
    assert recorder.seen == []
    log = await wait_for_log(open_proxy, "nested too deeply")
    assert "Traceback" not in log


async def test_a_slow_body_is_408(open_proxy: Service, recorder: Recorder) -> None:
    """A body still incomplete after BODY_TIMEOUT_S (1 s here): 408, nothing forwarded."""
    reader, writer = await asyncio.open_connection("127.0.0.1", open_proxy.port)
    head = request("POST", "/v1/chat/completions", {"Host": f"127.0.0.1:{open_proxy.port}", "Content-Type": "application/json", "Content-Length": str(len(CHAT))})
    writer.write(head + CHAT[:10])
    reply = parse_reply(await asyncio.wait_for(reader.read(), 10))
    writer.close()
    assert reply.status == 408 and "did not arrive within 1 s" in str(openai_error(reply)["message"])
    assert recorder.seen == []


async def test_a_hang_up_before_the_body_is_one_log_line(open_proxy: Service, recorder: Recorder) -> None:
    """The client leaves with its body half-sent: one line (status=499) in the log, no traceback."""
    before = open_proxy.log()
    reader, writer = await asyncio.open_connection("127.0.0.1", open_proxy.port)
    head = request("POST", "/v1/chat/completions", {"Host": f"127.0.0.1:{open_proxy.port}", "Content-Type": "application/json", "Content-Length": "1000"})
    writer.write(head + CHAT[:10])
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    log = await wait_for_log(open_proxy, "hung up before its request body arrived")
    new = log[len(before) :].splitlines()
    assert len(new) == 1 and "status=499" in new[0], new
    assert recorder.seen == []


# ---------------------------------------------------------------------------------------------
# 5. Slow clients: request heads under HEADER_TIMEOUT_S
# ---------------------------------------------------------------------------------------------


async def test_slowloris_connections_are_closed_while_a_real_request_is_served(open_proxy: Service, recorder: Recorder) -> None:
    """Thirty connections trickling a head are cut after HEADER_TIMEOUT_S (1 s); a real request meanwhile is answered."""
    head = request("GET", "/v1/models", {"Host": f"127.0.0.1:{open_proxy.port}"})

    async def trickle() -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", open_proxy.port)
        started = time.monotonic()
        for byte in head[:4]:  # a byte every 150 ms, then silence: no write races the server's close
            writer.write(bytes([byte]))
            await asyncio.sleep(0.15)
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return data, time.monotonic() - started

    slow = [asyncio.create_task(trickle()) for _ in range(30)]
    await asyncio.sleep(0.3)
    started = time.monotonic()
    assert (await call(open_proxy, "GET", "/v1/models")).status == 200
    assert time.monotonic() - started < 1
    for data, elapsed in await asyncio.gather(*slow):
        assert data.startswith(b"HTTP/1.1 408 ") and 0.9 <= elapsed < 3  # the server's clock starts first
    assert [s.path for s in recorder.seen] == ["/v1/models"]


async def test_a_silent_connection_is_closed(open_proxy: Service) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", open_proxy.port)
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    assert 0.9 <= time.monotonic() - started < 3
    writer.close()


# ---------------------------------------------------------------------------------------------
# 6. Binding beyond loopback: the secret or no start (protected mode)
# ---------------------------------------------------------------------------------------------


def run_proxy(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    full = {**os.environ, "OPENAI_API_KEY": UPSTREAM_KEY, "PYTHONUNBUFFERED": "1", **LIMITS, **env}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=full, stdout=log.open("wb"), stderr=subprocess.STDOUT)


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_a_non_loopback_bind_without_llm_proxy_key_refuses_to_start(tmp_path: Path, host: str) -> None:
    log = tmp_path / "proxy.log"
    process = run_proxy(["llm_proxy.py", "--host", host, "--port", str(free_port())], {"LLM_PROXY_KEY": ""}, log)
    assert process.wait(30) == 2
    assert f"refusing to listen on {host}:" in log.read_text() and "without LLM_PROXY_KEY" in log.read_text()


def test_llm_proxy_key_equal_to_the_upstream_key_refuses_to_start(tmp_path: Path) -> None:
    log = tmp_path / "proxy.log"
    process = run_proxy(["llm_proxy.py", "--port", str(free_port())], {"LLM_PROXY_KEY": UPSTREAM_KEY}, log)
    assert process.wait(30) == 1
    assert "LLM_PROXY_KEY must differ from OPENAI_API_KEY" in log.read_text()


async def test_a_non_loopback_bind_with_llm_proxy_key_serves_other_hosts_that_send_it(
    tmp_path: Path, recorder: Recorder
) -> None:
    """--host 0.0.0.0 with LLM_PROXY_KEY: a peer on another address is served with the key, 401 without."""
    address = outward_address()
    if address is None:
        pytest.skip("no non-loopback address on this machine")
    port = free_port()
    env = {"OPENAI_BASE_URL": recorder.url, "LLM_PROXY_KEY": PROXY_KEY, "ALLOWED_HOSTS": address}
    process = run_proxy(["llm_proxy.py", "--host", "0.0.0.0", "--port", str(port)], env, tmp_path / "proxy.log")
    service = Service("llm_proxy", port, process, tmp_path / "proxy.log")
    try:
        await asyncio.to_thread(wait_healthy, service)
        head = {"Host": f"{address}:{port}", "Content-Type": "application/json"}
        refused = await exchange(port, request("POST", "/v1/chat/completions", head, CHAT), bind=address)
        served = await exchange(port, request("POST", "/v1/chat/completions", {**head, "Authorization": f"Bearer {PROXY_KEY}"}, CHAT), bind=address)
    finally:
        service.stop()
    assert (refused.status, served.status) == (401, 200)
    assert len(recorder.seen) == 1


async def test_uvicorn_on_another_address_without_a_key_serves_loopback_peers_only(
    tmp_path: Path, recorder: Recorder
) -> None:
    """`uvicorn llm_proxy:app --host 0.0.0.0` skips serve()'s check; the Guard still refuses other peers."""
    address = outward_address()
    if address is None:
        pytest.skip("no non-loopback address on this machine")
    port = free_port()
    env = {"OPENAI_BASE_URL": recorder.url, "LLM_PROXY_KEY": "", "ALLOWED_HOSTS": address}
    process = run_proxy(["-m", "uvicorn", "llm_proxy:app", "--host", "0.0.0.0", "--port", str(port)], env, tmp_path / "proxy.log")
    service = Service("llm_proxy", port, process, tmp_path / "proxy.log")
    try:
        await asyncio.to_thread(wait_healthy, service)
        data = request("POST", "/v1/chat/completions", {"Host": f"{address}:{port}", "Content-Type": "application/json"}, CHAT)
        remote = await exchange(port, data, bind=address)
        local = await call(service, "POST", "/v1/chat/completions", CHAT, **JSON)
    finally:
        service.stop()
    assert remote.status == 403 and "serves loopback clients only" in str(openai_error(remote)["message"])
    assert local.status == 200 and len(recorder.seen) == 1
