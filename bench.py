"""bench.py: what the pipeline adds, measured against the same fake model read with no hop in between.

    pipeline:  bench (as the IDE) ⇄ gateway → agent → llm_proxy → fake_llm
    direct:    bench (as a bare OpenAI client) ───────────────────→ fake_llm

Run:  python bench.py [--quick] [--only ttft,throughput,tool,concurrency] [--levels 1,10,100]

It starts the four services as real processes on free loopback ports, the way tests/conftest.py
does (`python NAME.py --port P`, wiring in the environment, ready when /healthz answers), plays
the IDE over a real WebSocket (JSON-RPC, as PROTOCOL.md gives it) and, for the baseline, streams
from fake_llm's /v1/chat/completions with an aiohttp client sending the very body the agent
would send. Pipeline and direct samples are taken in the same run, interleaved, on the same
machine, so whatever the fake model and this client cost cancels out of "added".

What it measures, and how:

1. Time to first token. Pipeline: from sending `user_message` to the first `token`
   notification (a fresh socket per turn, so every run starts a new conversation and the
   request body stays the same size). Direct: from sending the request to the first chunk whose
   delta carries content. `[tokens:5] [delay:0]`. Added pX = pX(pipeline) - pX(direct).
   Two partial paths are timed in the same rotation, to show which hop adds what: agent +
   llm_proxy (POST /v1/runs, to the first `token` event) and llm_proxy alone.
2. One stream's throughput: `[tokens:N] [delay:0]` streamed flat out; tokens per second from
   sending to `final` (direct: to `data: [DONE]`). The received text must be exactly
   " t0 t1 ... t{N-1}": the gateway coalesces tokens into fewer notifications, so tokens are
   counted in the text, and a token lost, repeated or reordered is an error, not a figure.
3. Tool round trip: a turn whose model calls read_file once, answered at once by the bench.
   As the issue defines it: from the agent emitting `tool_call` to the agent holding the
   result, minus the IDE's own time (between receiving the tool request and sending its
   answer). The agent logs the first part for every call ("tool call 'ID' answered in X ms",
   its own monotonic clock, from queueing the event to resolving the call), the bench reads
   it from the agent's log and subtracts the second. A direct call has no relay, so this is
   all added time. Also reported, the whole tool turn: at the IDE, P = (first token of the
   model's second reply - first token of its first reply) - the IDE's own time; directly, the
   bench replays the same two model requests as a zero-cost agent would: Q = (first reply's
   [DONE] - its first content) + time to first content of the second request. P - Q adds the
   agent's second model request through llm_proxy to the round trip. Both intervals start and
   end at a first token that crossed the whole downstream path, so that path's latency cancels
   out. Added pX = pX(P) - pX(Q).
4. CPU per streamed token: the CPU time of gateway, agent and llm_proxy together (each
   process's own accounting, read through its POSIX process CPU clock: the sum the kernel keeps
   for /proc/<pid>/stat, in nanoseconds instead of 10 ms ticks), over a measurement, divided by
   the tokens the IDE received. Reported for the one-stream run and for each concurrency level.
5. Concurrency: N sessions all connected first, then all sent `[tokens:250] [delay:20]` at
   once (5 s streams at a realistic 20 ms per token, so they truly overlap). For each token
   notification after a session's first, added delay = gap since the previous one - 20 ms per
   token it carries; p50 and p99 over all sessions. Errors: sessions that did not end in
   `final` completed with the exact text. Peak RSS per process: VmHWM from /proc/<pid>/status,
   reset before each level through /proc/<pid>/clear_refs. The same N streams read directly
   give the fake model's and this client's own lag, for comparison.

Prints a table, each figure next to its target with a pass/miss mark, then one line of JSON
with every figure (the last line of stdout). A miss never fails the run: this is a benchmark,
not a timed test. The exit status is 1 only when the bench itself could not run.

Left out: a real model (its seconds would drown the pipeline's milliseconds), TLS, a network
between machines, the reference IDE's tools (the bench answers tool requests itself, at once).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from agent import LLM_MODEL, SYSTEM_PROMPT
from protocol import DONE_DATA, ERROR, FINAL, TOKEN, USER_MESSAGE, dumps, iter_sse, openai_tools, request, result

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent
PARTS = ("ttft", "throughput", "tool", "concurrency")  # what --only chooses from, in running order
SERVICES = ("fake_llm", "llm_proxy", "agent", "gateway")  # started in this order, upstream first
MEASURED = ("gateway", "agent", "llm_proxy")  # whose CPU and memory the targets are about
TOKEN_SECRET = "bench-" + os.urandom(8).hex()  # GATEWAY_TOKEN for this run
START_TIMEOUT_S = 20.0  # generous: a cold 2-core machine imports four services at once
TURN_TIMEOUT_S = 30.0  # a hang bound for one turn or one frame, never a speed assertion
LEVEL_TIMEOUT_S = 300.0  # a hang bound for one concurrency level's streams

TURNS, QUICK_TURNS = 200, 50  # measured turns for TTFT and for the tool round trip (each path)
WARMUP_TURNS = 10  # turns of each kind run first and thrown away: pools, caches, lazy imports
TTFT_PROMPT = "[tokens:5] [delay:0] bench: time to first token"
TOOL_PROMPT = '[call:{"name": "read_file", "arguments": {"path": "bench.txt"}}] [delay:0] bench: tool round trip'
TOOL_RESULT = {"path": "bench.txt", "content": "bench\n", "start_line": 1, "end_line": 1, "total_lines": 1, "truncated": False}
THROUGHPUT_TOKENS = 20_000  # one stream flat out: [tokens:N] [delay:0]
THROUGHPUT_RUNS, QUICK_THROUGHPUT_RUNS = 5, 3  # the median run is reported
LEVELS, QUICK_LEVELS = (1, 10, 100, 500, 1000), (1, 10, 100)  # concurrent sessions per level
STREAM_TOKENS, PACE_MS = 250, 20  # each concurrent session: 250 tokens, one every 20 ms (5 s)
CONNECT_AT_ONCE = 50  # WebSocket handshakes in flight at once while a level's sessions connect
FDS_PER_SESSION = 4  # open files per session: its WebSocket and direct stream here, twice over for headroom

# figure -> (comparison, bound, unit): the targets for this 2-core machine
TARGETS: dict[str, tuple[str, float, str]] = {
    "ttft_added_p50_ms": ("<=", 1.0, "ms"),
    "ttft_added_p99_ms": ("<=", 5.0, "ms"),
    "throughput_tokens_per_s": (">=", 50_000, "tokens/s"),
    "throughput_errors": ("<=", 0, ""),
    "tool_rt_added_p50_ms": ("<=", 2.0, "ms"),
}
# the same, for each concurrency level's figures "n{N}_<name>"
LEVEL_TARGETS: dict[str, tuple[str, float, str]] = {
    "gap_added_p99_ms": ("<=", 50.0, "ms"),
    "errors": ("<=", 0, ""),
    "cpu_us_per_token": ("<=", 60.0, "µs"),
}

# ---------------------------------------------------------------------------------------------
# Helpers: the stack as processes, their CPU and memory, percentiles
# ---------------------------------------------------------------------------------------------


class BenchError(Exception):
    """The bench itself could not run: a service did not start, or a turn broke off."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_since(self, offset: int) -> tuple[str, int]:
        """The log's text from byte `offset` on, and the offset of its end."""
        with self.log_path.open("rb") as f:
            f.seek(offset)
            data = f.read()
        return data.decode(errors="replace"), offset + len(data)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@dataclass
class Stack:
    """fake_llm -> llm_proxy -> agent -> gateway, each a real process on a free port."""

    services: dict[str, Service] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self['gateway'].port}/ws"

    @property
    def completions_url(self) -> str:
        return f"{self['fake_llm'].url}/v1/chat/completions"

    def stop(self) -> None:
        for service in reversed(self.services.values()):
            service.stop()


def start_stack(log_dir: Path) -> Stack:
    """Start the four services wired to each other; return once each answers /healthz."""
    ports = {name: free_port() for name in SERVICES}
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "FAKE_LLM_TOKEN_DELAY_MS": "0",  # every prompt sets its own [delay:MS]
        "OPENAI_BASE_URL": f"http://127.0.0.1:{ports['fake_llm']}/v1",
        "OPENAI_API_KEY": "",
        "LLM_PROXY_URL": f"http://127.0.0.1:{ports['llm_proxy']}/v1",
        "AGENT_URL": f"http://127.0.0.1:{ports['agent']}",
        "GATEWAY_TOKEN": TOKEN_SECRET,
        "GATEWAY_RUNTIME_DIR": str(log_dir / "runtime"),
    }
    stack = Stack()
    for name in SERVICES:
        log_path = log_dir / f"{name}.log"
        process = subprocess.Popen(
            [sys.executable, str(ROOT / f"{name}.py"), "--port", str(ports[name])],
            cwd=ROOT, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        stack.services[name] = Service(name, ports[name], process, log_path)
    try:
        for service in stack.services.values():
            wait_healthy(service)
    except BenchError:
        stack.stop()
        raise
    return stack


def wait_healthy(service: Service) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise BenchError(f"{service.name} exited with {service.process.returncode}:\n{service.log_tail()}")
        try:
            with urllib.request.urlopen(f"{service.url}/healthz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{service.name} not healthy after {START_TIMEOUT_S:g} s:\n{service.log_tail()}")


def raise_fd_limit(sessions: int) -> None:
    """Let this process and the services it starts (they inherit the limit) hold every socket."""
    want = sessions * FDS_PER_SESSION + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))  # a raised hard limit needs root
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        print(f"bench: warning: open files limited to {hard}; {sessions} sessions want about {want}", file=sys.stderr)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used, all its threads, from the kernel's accounting.

    Its POSIX process CPU clock (clock_getcpuclockid(pid) in C: on Linux ((~pid) << 3) | 2, a
    CPUCLOCK_SCHED clock) reads the same sum as utime+stime in /proc/<pid>/stat, in nanoseconds
    instead of 10 ms ticks, which a one-stream run needs. The ticks are the fallback.
    """
    try:
        return time.clock_gettime_ns(((~pid) << 3) | 2) / 1e9
    except OSError:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def cpu_snapshot(stack: Stack) -> dict[str, float]:
    """CPU seconds so far of each service and of the bench itself."""
    snapshot = {name: cpu_seconds(service.process.pid) for name, service in stack.services.items()}
    snapshot["bench"] = time.process_time()
    return snapshot


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # "VmHWM:	   51234 kB"
            return int(line.split()[1]) / 1024
    return math.nan


def reset_peak_rss(pid: int) -> None:
    """Start VmHWM again from the current RSS (Linux 4.0+); without it the peak is since start."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile, linear between the closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def expected_text(tokens: int) -> str:
    """What fake_llm streams for [tokens:N]."""
    return "".join(f" t{i}" for i in range(tokens))


def completion_body(messages: list[dict[str, Any]]) -> bytes:
    """The request the agent sends for a step (agent.call_llm), so the direct path asks the same."""
    body = {
        "model": LLM_MODEL,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT}, *messages],
        "tools": openai_tools(),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return json.dumps(body).encode()


# ---------------------------------------------------------------------------------------------
# The two clients: the IDE's WebSocket and a bare OpenAI stream
# ---------------------------------------------------------------------------------------------


async def connect(http: aiohttp.ClientSession, stack: Stack) -> aiohttp.ClientWebSocketResponse:
    headers = {"Authorization": f"Bearer {TOKEN_SECRET}"}
    return await http.ws_connect(stack.ws_url, headers=headers, max_msg_size=0)


async def receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    """The next frame, parsed; BenchError if the socket closes or stays silent."""
    msg = await ws.receive(TURN_TIMEOUT_S)
    if msg.type != aiohttp.WSMsgType.TEXT:
        raise BenchError(f"expected a text frame from the gateway, got {msg.type.name} {msg.data!r}")
    return json.loads(msg.data)


async def send_user_message(ws: aiohttp.ClientWebSocketResponse, content: str) -> float:
    """Send one user_message; return the time it left."""
    frame = request(1, USER_MESSAGE, {"content": content})
    sent = time.perf_counter()
    await ws.send_str(frame)
    return sent


def ended(frame: dict[str, Any]) -> bool:
    """True for the run's last frame; BenchError when that is an `error` notification."""
    if frame.get("method") == ERROR:
        raise BenchError(f"the run failed: {frame['params']}")
    return frame.get("method") == FINAL


@dataclass
class Streamed:
    """One streamed completion as a bare OpenAI client reads it; times in s from sending the request."""

    first_content: float = math.nan
    done: float = math.nan
    text: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # assistant message tool_calls
    reads: list[tuple[float, str]] = field(default_factory=list)  # (arrival, content) per network read


async def stream_direct(http: aiohttp.ClientSession, url: str, body: bytes, keep_reads: bool = False) -> Streamed:
    """POST one streamed completion and read it, parsing each chunk as the agent does.

    Read to the end of the body, past [DONE], so that aiohttp can keep the connection for the next
    request: the direct path must not pay a TCP handshake the pipeline's pooled hops do not.
    """
    out, text = Streamed(), []
    calls: dict[int, dict[str, Any]] = {}
    sent = time.perf_counter()
    async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
        if response.status != 200:
            raise BenchError(f"{url} answered HTTP {response.status}: {await response.text()}")
        async for events in iter_sse(response.content.iter_any()):
            now = time.perf_counter() - sent
            read_text = []
            for event in events:
                if event.data == DONE_DATA:
                    out.done = now
                    break
                chunk = json.loads(event.data)
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        read_text.append(delta["content"])
                    for fragment in delta.get("tool_calls") or []:
                        call = calls.setdefault(fragment["index"], {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                        call["id"] = fragment.get("id") or call["id"]
                        call["function"]["name"] += fragment.get("function", {}).get("name") or ""
                        call["function"]["arguments"] += fragment.get("function", {}).get("arguments") or ""
            if read_text:
                if math.isnan(out.first_content):
                    out.first_content = now
                text.extend(read_text)
                if keep_reads:
                    out.reads.append((now, "".join(read_text)))
    if math.isnan(out.done):
        raise BenchError(f"{url}: the stream ended before data: [DONE]")
    out.text, out.tool_calls = "".join(text), [calls[i] for i in sorted(calls)]
    return out


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


async def ttft_pipeline(http: aiohttp.ClientSession, stack: Stack) -> float:
    """Seconds from user_message to the first token notification, on a fresh session."""
    async with await connect(http, stack) as ws:
        sent = await send_user_message(ws, TTFT_PROMPT)
        first = math.nan
        while not ended(frame := await receive(ws)):
            if frame.get("method") == TOKEN and math.isnan(first):
                first = time.perf_counter() - sent
    if math.isnan(first):
        raise BenchError("a TTFT turn ended without a token")
    return first


async def ttft_agent(http: aiohttp.ClientSession, stack: Stack) -> float:
    """Seconds from POST /v1/runs to the first `token` event: the pipeline less the gateway."""
    body = {"session_id": "bench-" + os.urandom(8).hex(), "content": TTFT_PROMPT}  # a new conversation
    first = math.nan
    sent = time.perf_counter()
    async with http.post(f"{stack['agent'].url}/v1/runs", json=body) as response:
        if response.status != 200:
            raise BenchError(f"the agent answered HTTP {response.status}: {await response.text()}")
        async for events in iter_sse(response.content.iter_any()):
            if math.isnan(first) and any(event.event == TOKEN for event in events):
                first = time.perf_counter() - sent
    if math.isnan(first):
        raise BenchError("an agent run ended without a token")
    return first


async def ttft_openai(http: aiohttp.ClientSession, url: str, body: bytes) -> float:
    """Seconds to the first content delta of a completion streamed from `url` (proxy or fake)."""
    return (await stream_direct(http, url, body)).first_content


async def measure_ttft(http: aiohttp.ClientSession, stack: Stack, turns: int) -> dict[str, float]:
    """The whole pipeline and direct, plus two partial paths that show which hop adds what."""
    body = completion_body([{"role": "user", "content": TTFT_PROMPT}])
    paths = {  # name -> one measurement, in seconds
        "pipeline": lambda: ttft_pipeline(http, stack),
        "via_agent": lambda: ttft_agent(http, stack),
        "via_proxy": lambda: ttft_openai(http, f"{stack['llm_proxy'].url}/v1/chat/completions", body),
        "direct": lambda: ttft_openai(http, stack.completions_url, body),
    }
    names = list(paths)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(WARMUP_TURNS + turns):
        k = i % len(names)  # rotate the order, so that no path always follows the same one
        for name in names[k:] + names[:k]:
            seconds = await paths[name]()
            if i >= WARMUP_TURNS:
                samples[name].append(seconds * 1000)
    figures = {}
    for q in (50, 99):
        for name in names:
            figures[f"ttft_{name}_p{q}_ms"] = percentile(samples[name], q)
        figures[f"ttft_added_p{q}_ms"] = percentile(samples["pipeline"], q) - percentile(samples["direct"], q)
        for name in ("via_agent", "via_proxy"):
            figures[f"ttft_{name}_added_p{q}_ms"] = percentile(samples[name], q) - percentile(samples["direct"], q)
    return figures


async def throughput_pipeline(http: aiohttp.ClientSession, stack: Stack, tokens: int) -> tuple[float, str, int, dict[str, float]]:
    """(seconds from user_message to final, the text received, token notifications, CPU seconds used)."""
    async with await connect(http, stack) as ws:
        before = cpu_snapshot(stack)
        sent = await send_user_message(ws, f"[tokens:{tokens}] [delay:0] bench: throughput")
        texts = []
        while not ended(frame := await receive(ws)):
            if frame.get("method") == TOKEN:
                texts.append(frame["params"]["text"])
        elapsed = time.perf_counter() - sent
        after = cpu_snapshot(stack)
    return elapsed, "".join(texts), len(texts), {name: after[name] - before[name] for name in after}


async def measure_throughput(http: aiohttp.ClientSession, stack: Stack, runs: int, tokens: int = THROUGHPUT_TOKENS) -> dict[str, float]:
    """One stream flat out, `runs` times on each path; the pipeline's median run is reported."""
    expected = expected_text(tokens)
    body = completion_body([{"role": "user", "content": f"[tokens:{tokens}] [delay:0] bench: throughput"}])
    await throughput_pipeline(http, stack, 200)  # warm-up
    pipeline, direct, notifications, cpu, errors = [], [], [], [], 0
    for _ in range(runs):
        elapsed, text, count, used = await throughput_pipeline(http, stack, tokens)
        errors += text != expected
        pipeline.append(tokens / elapsed)
        notifications.append(count)
        cpu.append(sum(used[name] for name in MEASURED) / tokens * 1e6)
        reply = await stream_direct(http, stack.completions_url, body)
        errors += reply.text != expected
        direct.append(tokens / reply.done)
    middle = sorted(range(runs), key=lambda i: pipeline[i])[runs // 2]  # the median run
    return {
        "throughput_tokens_per_s": pipeline[middle],
        "throughput_direct_tokens_per_s": percentile(direct, 50),
        "throughput_tokens_per_notification": tokens / notifications[middle],
        "throughput_cpu_us_per_token": cpu[middle],
        "throughput_errors": errors,
    }


TOOL_ANSWERED = re.compile(r"tool call (\S+) answered in ([0-9.]+) ms")  # agent.post_tool_result's log line, id as repr()


async def tool_turn_pipeline(http: aiohttp.ClientSession, stack: Stack) -> tuple[float, float, str]:
    """P in seconds (first token of reply 1 to first token of reply 2, less the IDE's tool
    time), the IDE's tool time in seconds, and the tool call's id."""
    call_id = ""
    async with await connect(http, stack) as ws:
        await send_user_message(ws, TOOL_PROMPT)
        first = asked = answered = second = math.nan
        while not ended(frame := await receive(ws)):
            now = time.perf_counter()
            if frame.get("method") == TOKEN:
                if math.isnan(first):
                    first = now
                elif not math.isnan(answered) and math.isnan(second):
                    second = now
            elif "method" in frame and "id" in frame:  # the tool request: answer it at once
                asked, call_id = now, frame["id"]
                await ws.send_str(result(frame["id"], TOOL_RESULT))
                answered = time.perf_counter()
    if math.isnan(second):
        raise BenchError("a tool turn ended without the model's second reply")
    return (second - first) - (answered - asked), answered - asked, call_id


async def tool_turn_direct(http: aiohttp.ClientSession, url: str) -> float:
    """Q in seconds: the same two model requests made by a zero-cost agent, tool answered at once."""
    user = {"role": "user", "content": TOOL_PROMPT}
    reply = await stream_direct(http, url, completion_body([user]))
    assistant = {"role": "assistant", "content": reply.text or None, "tool_calls": reply.tool_calls}
    tool = {"role": "tool", "tool_call_id": reply.tool_calls[0]["id"], "content": dumps(TOOL_RESULT)}  # as agent.run_tools writes it
    second = await stream_direct(http, url, completion_body([user, assistant, tool]))
    return (reply.done - reply.first_content) + second.first_content


async def measure_tool_round_trip(http: aiohttp.ClientSession, stack: Stack, turns: int) -> dict[str, float]:
    """The round trip, and P and Q (see the module docstring), over `turns` turns each."""
    pipeline, direct, round_trip, ide = [], [], [], []
    _, log_offset = stack["agent"].log_since(0)
    for i in range(WARMUP_TURNS + turns):
        if i % 2:
            d = await tool_turn_direct(http, stack.completions_url)
            p, ide_s, call_id = await tool_turn_pipeline(http, stack)
        else:
            p, ide_s, call_id = await tool_turn_pipeline(http, stack)
            d = await tool_turn_direct(http, stack.completions_url)
        text, log_offset = stack["agent"].log_since(log_offset)  # written before the second reply began
        answered = {found: float(ms) for found, ms in TOOL_ANSWERED.findall(text)}
        call_id = repr(call_id)
        if call_id not in answered:
            raise BenchError(f"the agent's log has no 'tool call {call_id} answered' line")
        if i >= WARMUP_TURNS:
            pipeline.append(p * 1000)
            direct.append(d * 1000)
            round_trip.append(answered[call_id] - ide_s * 1000)
            ide.append(ide_s * 1000)
    figures = {}
    for q in (50, 99):
        figures[f"tool_rt_added_p{q}_ms"] = percentile(round_trip, q)
        figures[f"tool_rt_ide_p{q}_ms"] = percentile(ide, q)
        figures[f"tool_turn_pipeline_p{q}_ms"] = percentile(pipeline, q)
        figures[f"tool_turn_direct_p{q}_ms"] = percentile(direct, q)
        figures[f"tool_turn_added_p{q}_ms"] = percentile(pipeline, q) - percentile(direct, q)
    return figures


@dataclass
class SessionStream:
    """One concurrent session's token notifications: (arrival in s, text) each."""

    tokens: list[tuple[float, str]] = field(default_factory=list)
    sent: float = 0.0
    error: str = ""


async def stream_session(ws: aiohttp.ClientWebSocketResponse, prompt: str) -> SessionStream:
    """Send the prompt, keep each token's arrival; frames are parsed here, the maths comes later."""
    out = SessionStream()
    try:
        out.sent = await send_user_message(ws, prompt)
        while True:
            msg = await ws.receive(TURN_TIMEOUT_S)
            now = time.perf_counter()
            if msg.type != aiohttp.WSMsgType.TEXT:
                out.error = f"socket: {msg.type.name}"
                return out
            frame = json.loads(msg.data)
            if frame.get("method") == TOKEN:
                out.tokens.append((now, frame["params"]["text"]))
            elif frame.get("method") == FINAL:
                return out
            elif frame.get("method") == ERROR:
                out.error = f"error: {frame['params'].get('code')}"
                return out
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
        return out


async def direct_session(http: aiohttp.ClientSession, url: str, body: bytes) -> SessionStream:
    """The same stream read straight from fake_llm: each network read's text and arrival."""
    out = SessionStream(sent=time.perf_counter())
    try:
        reply = await stream_direct(http, url, body, keep_reads=True)
        out.tokens = [(out.sent + at, text) for at, text in reply.reads]
    except (aiohttp.ClientError, TimeoutError, OSError, BenchError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    return out


async def all_streams(sessions: list[Coroutine[Any, Any, SessionStream]]) -> list[SessionStream]:
    """Run the sessions together; one still going after LEVEL_TIMEOUT_S is cancelled and an error."""
    tasks = [asyncio.ensure_future(session) for session in sessions]
    _, pending = await asyncio.wait(tasks, timeout=LEVEL_TIMEOUT_S)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    late = SessionStream(error=f"not done after {LEVEL_TIMEOUT_S:g} s (LEVEL_TIMEOUT_S)")
    return [late if task in pending else task.result() for task in tasks]


def gap_figures(streams: list[SessionStream], tokens: int) -> tuple[list[float], list[float], int]:
    """(added ms per inter-arrival gap, ms to each first token, sessions in error)."""
    expected = expected_text(tokens)
    added, firsts, errors = [], [], 0
    for s in streams:
        if s.error or "".join(text for _, text in s.tokens) != expected:
            errors += 1
            continue
        firsts.append((s.tokens[0][0] - s.sent) * 1000)
        for (before, _), (at, text) in zip(s.tokens, s.tokens[1:]):
            added.append((at - before) * 1000 - PACE_MS * len(text.split()))
    return added, firsts, errors


async def measure_level(http: aiohttp.ClientSession, stack: Stack, n: int) -> dict[str, float]:
    """N sessions connected first, then all streaming at once; then the same N streams direct."""
    prompt = f"[tokens:{STREAM_TOKENS}] [delay:{PACE_MS}] bench: concurrency"
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)

    async def connect_one() -> aiohttp.ClientWebSocketResponse:
        async with gate:
            return await connect(http, stack)

    sockets = await asyncio.gather(*(connect_one() for _ in range(n)))
    try:
        for name in MEASURED:
            reset_peak_rss(stack[name].process.pid)
        before = cpu_snapshot(stack)
        streams = await all_streams([stream_session(ws, prompt) for ws in sockets])
        after = cpu_snapshot(stack)
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    rss = {name: peak_rss_mb(stack[name].process.pid) for name in MEASURED}
    added, firsts, errors = gap_figures(streams, STREAM_TOKENS)
    received = sum(len("".join(text for _, text in s.tokens).split()) for s in streams)
    used = {name: after[name] - before[name] for name in after}

    body = completion_body([{"role": "user", "content": prompt}])
    direct = await all_streams([direct_session(http, stack.completions_url, body) for _ in range(n)])
    direct_added, _, direct_errors = gap_figures(direct, STREAM_TOKENS)

    per_token = 1e6 / max(received, 1)
    return {
        f"n{n}_gap_added_p50_ms": percentile(added, 50),
        f"n{n}_gap_added_p99_ms": percentile(added, 99),
        f"n{n}_ttft_p99_ms": percentile(firsts, 99),
        f"n{n}_errors": errors,
        f"n{n}_cpu_us_per_token": sum(used[name] for name in MEASURED) * per_token,
        **{f"n{n}_cpu_us_per_token_{name}": used[name] * per_token for name in (*MEASURED, "fake_llm", "bench")},
        **{f"n{n}_peak_rss_mb_{name}": rss[name] for name in MEASURED},
        f"n{n}_direct_gap_added_p50_ms": percentile(direct_added, 50),
        f"n{n}_direct_gap_added_p99_ms": percentile(direct_added, 99),
        f"n{n}_direct_errors": direct_errors,
    }


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def verdict(value: float, target: tuple[str, float, str]) -> str:
    comparison, bound, _ = target
    ok = value <= bound if comparison == "<=" else value >= bound
    return "pass" if ok and not math.isnan(value) else "miss"


def target_text(target: tuple[str, float, str]) -> str:
    comparison, bound, unit = target
    return f"{'≤' if comparison == '<=' else '≥'} {bound:,g} {unit}".strip()


def machine() -> str:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}, {datetime.date.today()}"


def report(figures: dict[str, float], levels: Sequence[int], quick: bool) -> str:
    """The human table: each figure beside its target and a pass/miss mark."""
    lines = [f"bench.py{' --quick' if quick else ''}: {machine()}", ""]
    row = "{:<34}{:>11}{:>11}{:>11}  {:<20}{}"
    lines.append(row.format("", "pipeline", "direct", "added", "target", ""))

    def add(label: str, pipeline: str = "", direct: str = "", added: str = "", target: str = "", fmt: str = "{:,.2f}") -> None:
        """One row; the mark judges `added` when there is one, else `pipeline` (figure names)."""
        cells = [fmt.format(figures[name]) if name else "" for name in (pipeline, direct, added)]
        judged = added or pipeline
        mark = verdict(figures[judged], TARGETS[target]) if target else ""
        lines.append(row.format(label, *cells, target_text(TARGETS[target]) if target else "", mark))

    if "ttft_added_p50_ms" in figures:
        for q in (50, 99):
            add(f"time to first token p{q} (ms)", f"ttft_pipeline_p{q}_ms", f"ttft_direct_p{q}_ms", f"ttft_added_p{q}_ms", f"ttft_added_p{q}_ms")
        for name, label in (("via_agent", "agent + llm_proxy"), ("via_proxy", "llm_proxy alone")):
            add(f"  p50 through {label}", f"ttft_{name}_p50_ms", "ttft_direct_p50_ms", f"ttft_{name}_added_p50_ms")
    if "throughput_tokens_per_s" in figures:
        add("one stream (tokens/s)", "throughput_tokens_per_s", "throughput_direct_tokens_per_s", target="throughput_tokens_per_s", fmt="{:,.0f}")
        add("  tokens per notification", "throughput_tokens_per_notification", fmt="{:,.1f}")
        add("  CPU per token, 3 services (µs)", "throughput_cpu_us_per_token", fmt="{:,.1f}")
        add("  texts not exactly as sent", "throughput_errors", target="throughput_errors", fmt="{:,.0f}")
    if "tool_rt_added_p50_ms" in figures:
        add("tool round trip p50 (ms)", added="tool_rt_added_p50_ms", target="tool_rt_added_p50_ms")
        add("tool round trip p99 (ms)", added="tool_rt_added_p99_ms")
        add("  the IDE's own time, p50 (ms)", "tool_rt_ide_p50_ms")
        add("  whole tool turn p50 (ms)", "tool_turn_pipeline_p50_ms", "tool_turn_direct_p50_ms", "tool_turn_added_p50_ms")
        add("  whole tool turn p99 (ms)", "tool_turn_pipeline_p99_ms", "tool_turn_direct_p99_ms", "tool_turn_added_p99_ms")

    measured = [n for n in levels if f"n{n}_errors" in figures]
    if measured:
        lines += ["", f"concurrency: N sessions connected, then all streaming {STREAM_TOKENS} tokens at {PACE_MS} ms at once;",
                  f"gap+ = gap between token notifications - {PACE_MS} ms per token they carry; direct = the same N streams read from fake_llm;",
                  f"ttft = time to first token under load, {2 * PACE_MS} ms of it the fake's pacing (role chunk, first text)"]  # fmt: skip
        head = "{:>6}{:>10}{:>15}{:>10}{:>15}{:>10}{:>22}{:>13}"
        lines.append(head.format("N", "gap+ p50", "gap+ p99", "errors", "CPU µs/token", "ttft p99", "peak RSS MB gw/ag/px", "direct p99"))
        for n in measured:
            def judged(name: str, fmt: str) -> str:
                return f"{fmt.format(figures[f'n{n}_{name}'])} {verdict(figures[f'n{n}_{name}'], LEVEL_TARGETS[name])}"

            rss = "/".join(f"{figures[f'n{n}_peak_rss_mb_{name}']:.0f}" for name in MEASURED)
            lines.append(head.format(
                n, f"{figures[f'n{n}_gap_added_p50_ms']:.2f}", judged("gap_added_p99_ms", "{:.2f}"), judged("errors", "{:.0f}"),
                judged("cpu_us_per_token", "{:.1f}"), f"{figures[f'n{n}_ttft_p99_ms']:.0f}", rss, f"{figures[f'n{n}_direct_gap_added_p99_ms']:.2f}",
            ))  # fmt: skip
        lines.append("targets per line: " + ", ".join(f"{name} {target_text(t)}" for name, t in LEVEL_TARGETS.items()) + " (gateway + agent + llm_proxy)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

async def run(stack: Stack, parts: Sequence[str], turns: int, runs: int, levels: Sequence[int]) -> dict[str, float]:
    """Every measurement asked for, one after the other (never two loads at once), as figures."""
    figures: dict[str, float] = {}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=TURN_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        if "ttft" in parts:
            progress(f"time to first token: {turns} turns on each path")
            figures |= await measure_ttft(http, stack, turns)
        if "throughput" in parts:
            progress(f"one stream: {THROUGHPUT_TOKENS} tokens flat out, {runs} run(s) on each path")
            figures |= await measure_throughput(http, stack, runs)
        if "tool" in parts:
            progress(f"tool round trip: {turns} turns on each path")
            figures |= await measure_tool_round_trip(http, stack, turns)
        if "concurrency" in parts:
            for n in levels:
                progress(f"concurrency: {n} session(s), {STREAM_TOKENS} tokens at {PACE_MS} ms")
                figures |= await measure_level(http, stack, n)
    return figures


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the pipeline (IDE ⇄ gateway → agent → llm_proxy → fake_llm) against the same fake "
        "model read directly: time to first token, one stream's throughput, the tool round trip, CPU per token, "
        "and N concurrent sessions. Starts its own stack on free loopback ports.",
        epilog="Output: a table with each figure next to its target, then one line of JSON with every figure. "
        "To profile a service, run e.g. `--only throughput --runs 30` and attach `py-spy record --pid PID` to the "
        "pid printed on stderr.",
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TURNS} turns, {QUICK_THROUGHPUT_RUNS} throughput runs, levels {','.join(map(str, QUICK_LEVELS))}: under a minute")
    parser.add_argument("--only", default=",".join(PARTS), metavar="PARTS", help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all)")
    parser.add_argument("--levels", metavar="N,N,...", help=f"comma-separated concurrency levels (default {','.join(map(str, LEVELS))}; --quick {','.join(map(str, QUICK_LEVELS))})")
    parser.add_argument("--turns", type=int, metavar="N", help=f"measured turns for TTFT and tool round trip (default {TURNS}; --quick {QUICK_TURNS})")
    parser.add_argument("--runs", type=int, metavar="N", help=f"one-stream throughput runs, the median reported (default {THROUGHPUT_RUNS}; --quick {QUICK_THROUGHPUT_RUNS})")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; expected some of {', '.join(PARTS)}")
    try:
        args.level_list = tuple(int(n) for n in args.levels.split(",")) if args.levels else (QUICK_LEVELS if args.quick else LEVELS)
    except ValueError:
        parser.error(f"--levels: expected comma-separated integers, got {args.levels!r}")
    if min(args.level_list, default=0) < 1 or (args.turns is not None and args.turns < 1) or (args.runs is not None and args.runs < 1):
        parser.error("--levels, --turns and --runs take positive integers")
    args.turns = args.turns or (QUICK_TURNS if args.quick else TURNS)
    args.runs = args.runs or (QUICK_THROUGHPUT_RUNS if args.quick else THROUGHPUT_RUNS)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit(max(args.level_list) if "concurrency" in args.parts else 1)  # before the services start: they inherit it
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        try:
            stack = start_stack(Path(tmp))
        except BenchError as exc:
            print(f"bench: the stack did not start: {exc}", file=sys.stderr)
            return 1
        progress("stack: " + ", ".join(f"{s.name} pid {s.process.pid} port {s.port}" for s in stack.services.values()))
        try:
            figures = asyncio.run(run(stack, args.parts, args.turns, args.runs, args.level_list))
        except (BenchError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            print(f"bench: could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
            for service in stack.services.values():
                print(f"--- {service.name} log (last lines)\n{service.log_tail()}", file=sys.stderr)
            return 1
        finally:
            stack.stop()
    progress(f"done in {time.monotonic() - started:.0f} s")
    print(report(figures, args.level_list, args.quick))
    print(json.dumps({name: round(value, 3) for name, value in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
