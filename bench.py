"""bench.py: what the pipeline adds, measured against the same fake model read with no hop in between.

    pipeline:  bench (as the IDE) ⇄ gateway → agent → llm_proxy → fake_llm
                                                ⇅ redis-server (the "redis" stack)
    direct:    bench (as a bare OpenAI client) ───────────────────→ fake_llm

Run:  python bench.py [--quick] [--redis] [--scale] [--baseline DIR] [--rounds R] [--only PARTS] [--levels 1,10,100]

It starts the four services as real processes on free loopback ports, the way tests/conftest.py
does (`python NAME.py --port P`, wiring in the environment, ready when /healthz answers), plays
the IDE over a real WebSocket (JSON-RPC, as PROTOCOL.md gives it) and, for the baseline, streams
from fake_llm's /v1/chat/completions with an aiohttp client sending the very body the agent
would send. Pipeline and direct samples are taken in the same run, interleaved, on the same
machine, so whatever the fake model and this client cost cancels out of "added".

Stacks, compared side by side in one run:

- "memory" (always): this checkout, the agent's sessions in its own memory (REDIS_URL unset).
- "redis" (--redis): the same code with the agent on Redis: REDIS_URL names a redis-server
  this bench starts on a free port (tests/servers.py, no persistence). One agent and one
  gateway, as in "memory", so that the two differ by the store alone and not by a balancer.
- "scale" (--scale, with "redis" as its yardstick): two gateways and two agents, the agents on
  one redis-server, nginx in front of both (tests/nginx_server.py runs deploy/nginx.sh, as
  Procfile.scale does). The IDE connects to nginx; its CPU (master and workers) counts. The
  "agent + llm_proxy" TTFT path posts to the first agent directly.
- "baseline" (--baseline DIR): the services of another checkout (`git worktree add DIR COMMIT`),
  to compare the code before and after a change. `--baseline .` runs this checkout twice: the
  A/A spread, what two identical stacks differ by on this machine.

All stacks run at the same time, idle but the one being measured, and every part takes its
samples from each of them in turn (TTFT and tool turns one turn each, throughput one run each,
drops one each, concurrency one level each), so a slow spell of the shared machine falls on all
alike. `--rounds R` measures every part R times: each figure is then the median of the R rounds
with [min, max] beside it, and each pair (memory against baseline, redis against memory, scale
against redis) gets its ratio and difference taken round by round, then their median and range.

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
4. CPU per streamed token: the CPU time of every process that does the pipeline's work
   (gateway, agent and llm_proxy; redis-server and nginx where a stack has them), each read
   through its POSIX process CPU clock (the sum the kernel keeps for /proc/<pid>/stat, in
   nanoseconds instead of 10 ms ticks), over a measurement, divided by the tokens the IDE received.
   Reported for the one-stream run and for each concurrency level, in total and per process.
5. Resume (CONTRACT v2): a session streams `[tokens:300] [delay:5]`; once the IDE holds
   DROP_AFTER token notifications it stops reading, and DROP_STALL_S later its socket is
   aborted (the transport dropped, no close frame, as a dead network ends it; what the gateway
   sent in between is lost with it, so the log holds notifications the IDE never saw) while
   the run goes on. Timed from the abort to the first notification with seq > last_seq, the
   interval holds: a new WebSocket to the gateway (TCP connect, HTTP upgrade), `resume
   {"session_id", "last_seq"}` sent (last_seq: the newest token received), the gateway's `GET
   /v1/sessions/{id}/events` to the agent (which attaches to the session's log), the resume's
   result, and the first replayed notification.
   p50 and p99 over the drops, and two marks on the way: drop -> new socket open, drop ->
   result. A first notification that came live instead of from the log (its seq above the
   result's last_seq: the log held nothing newer when the resume attached) is counted apart
   and left out; one whose seq is not last_seq + 1 (lost or repeated) is an error. The new
   socket then closes with 1000, which cancels the run. A stack whose gateway does not know
   `resume` (code from before CONTRACT v2) is skipped.
6. Concurrency: N sessions all connected first, then all sent `[tokens:250] [delay:20]` at
   once (5 s streams at a realistic 20 ms per token, so they truly overlap; 30 tokens, 0.6 s,
   with --quick). For each token notification after a session's first, added delay = gap
   since the previous one - 20 ms per token it carries; p50 and p99 over all sessions.
   Errors: sessions that did not end in `final` completed with the exact text. Peak RSS per
   process: VmHWM from /proc/<pid>/status, reset before each level through
   /proc/<pid>/clear_refs. The same N streams read directly give the fake model's and this
   client's own lag, for comparison.

Prints, for each stack, a table with each figure next to its target and a pass/miss mark;
with more than one stack, a table of the pairs side by side; then one line of JSON with every
figure (the last line of stdout): the "memory" stack's under their own names, the others' as
"redis.NAME", "scale.NAME" and "baseline.NAME" (medians over the rounds). A miss never fails the run: this
is a benchmark, not a timed test. The exit status is 1 only when the bench itself could not run.

Left out: a real model (its seconds would drown the pipeline's milliseconds), TLS, a network
between machines, the reference IDE's tools (the bench answers tool requests itself, at once),
more than one agent or gateway (the balancer would be measured with the store). The direct
path sends this checkout's request body to every stack's fake_llm, a baseline's included.
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
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from agent import LLM_MODEL, SYSTEM_PROMPT
from protocol import DONE_DATA, ERROR, FINAL, METHOD_NOT_FOUND, RESUME, TOKEN, USER_MESSAGE, dumps, iter_sse, openai_tools, request, result

sys.path.append(str(Path(__file__).resolve().parent / "tests"))
from nginx_server import Nginx, start_nginx  # noqa: E402  (tests/nginx_server.py: deploy/nginx.sh, as Procfile.scale runs it)
from servers import RedisServer, start_redis  # noqa: E402  (tests/servers.py: the redis-server the tests start too)

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent
PARTS = ("ttft", "throughput", "tool", "resume", "concurrency")  # what --only chooses from, in running order
SERVICES = ("fake_llm", "llm_proxy", "agent", "gateway")  # started in this order, upstream first
REPLICAS = 2  # --scale: agents and gateways each, behind nginx, the agents on one redis-server
PROCESSES = ("gateway", "gateway2", "agent", "agent2", "llm_proxy", "redis", "nginx")  # whose CPU and memory count (those a stack has), in report order
PRIMARY = "memory"  # the stack whose figures keep their plain names in the JSON line
PAIRS = (("memory", "baseline"), ("redis", "memory"), ("scale", "redis"))  # (stack, reference): rows show stack / reference and stack - reference
TOKEN_SECRET = "bench-" + os.urandom(8).hex()  # GATEWAY_TOKEN for this run
START_TIMEOUT_S = 20.0  # generous: a cold 2-core machine imports four services at once
TURN_TIMEOUT_S = 30.0  # a hang bound for one turn or one frame, never a speed assertion
LEVEL_TIMEOUT_S = 300.0  # a hang bound for one concurrency level's streams

TURNS, QUICK_TURNS = 200, 50  # measured turns for TTFT and for the tool round trip (each path)
WARMUP_TURNS = 10  # turns (and drops) of each kind run first and thrown away: pools, caches, lazy imports
TTFT_PROMPT = "[tokens:5] [delay:0] bench: time to first token"
TOOL_PROMPT = '[call:{"name": "read_file", "arguments": {"path": "bench.txt"}}] [delay:0] bench: tool round trip'
TOOL_RESULT = {"path": "bench.txt", "content": "bench\n", "start_line": 1, "end_line": 1, "total_lines": 1, "truncated": False}
THROUGHPUT_TOKENS = 20_000  # one stream flat out: [tokens:N] [delay:0]
THROUGHPUT_RUNS, QUICK_THROUGHPUT_RUNS = 5, 3  # the median run is reported
RESUME_DROPS, QUICK_RESUME_DROPS = 200, 30  # drops measured per stack: 200 for a p99 with two samples above it
RESUME_PROMPT = "[tokens:300] [delay:5] bench: resume"  # a token every 5 ms: the log grows while the IDE is away
DROP_AFTER = 5  # token notifications the IDE holds when it stops reading ...
DROP_STALL_S = 0.012  # ... and this long after, its socket is dropped: the two or so tokens sent meanwhile are lost with it
LEVELS, QUICK_LEVELS = (1, 10, 100, 500, 1000), (1, 100)  # concurrent sessions per level
STREAM_TOKENS, QUICK_STREAM_TOKENS, PACE_MS = 250, 30, 20  # each concurrent session: 250 tokens (--quick 30), one every 20 ms
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
# what the "redis" stack may cost over "memory" (issue 13): figure (or "*" + its ending) ->
# ("+", at most this much more) or ("x", at most this many times as much)
REDIS_TARGETS: dict[str, tuple[str, float]] = {
    "ttft_added_p50_ms": ("+", 1.0),
    "*cpu_us_per_token": ("x", 2.0),  # every total CPU per token: one stream and each level
}

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# Helpers: the stack as processes, their CPU and memory, percentiles
# ---------------------------------------------------------------------------------------------


class BenchError(Exception):
    """The bench itself could not run: a service did not start, or a turn broke off."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kind_of(name: str) -> str:
    """The service a replica runs: "agent2" -> "agent"."""
    return name.rstrip("0123456789")


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
    """fake_llm -> llm_proxy -> agent -> gateway, each a real process on a free port; the agent's
    redis-server in the "redis" stack; in the "scale" stack two of each, nginx in front of both:

        bench ⇄ nginx ⇄ gateway, gateway2 → nginx → agent, agent2 (⇅ redis-server) → llm_proxy → fake_llm
    """

    label: str  # "memory", "redis", "scale" or "baseline"
    root: Path  # the checkout its services run from
    services: dict[str, Service] = field(default_factory=dict)  # replicas as "agent2", "gateway2"
    redis: RedisServer | None = None
    nginx: Nginx | None = None
    resumable: bool = False  # its gateway knows `resume` (CONTRACT v2); set once it runs

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    def replicas(self, kind: str) -> list[Service]:
        """The services of one kind: replicas("agent") -> [agent, agent2]."""
        return [service for name, service in self.services.items() if kind_of(name) == kind]

    @property
    def measured(self) -> tuple[str, ...]:
        """The processes that do the pipeline's work (all but fake_llm): their CPU is the "CPU per token"."""
        present = {*self.services, *(["redis"] if self.redis else []), *(["nginx"] if self.nginx else [])}
        return tuple(name for name in PROCESSES if name in present)

    def pids(self, name: str) -> list[int]:
        """A service's pid; redis-server's for "redis"; nginx's master and workers for "nginx"."""
        if name == "redis":
            assert self.redis is not None and self.redis.process is not None
            return [self.redis.process.pid]
        if name == "nginx":
            assert self.nginx is not None and self.nginx.process is not None
            master = self.nginx.process.pid
            children = Path(f"/proc/{master}/task/{master}/children").read_text().split()  # the workers
            return [master, *map(int, children)]
        return [self.services[name].process.pid]

    @property
    def ws_url(self) -> str:
        """Where the IDE connects: nginx when it fronts the gateways, else the one gateway."""
        if self.nginx is not None:
            return self.nginx.ws_url
        return f"ws://127.0.0.1:{self['gateway'].port}/ws"

    @property
    def completions_url(self) -> str:
        return f"{self['fake_llm'].url}/v1/chat/completions"

    def describe(self) -> str:
        """Which code it runs (a checkout's commit, and whether its .py files differ from it) and where the agent keeps sessions."""
        git = ["git", "-C", str(self.root)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "?"
        status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no", "--", "*.py"], capture_output=True, text=True).stdout
        changed = [line[3:] for line in status.splitlines()]  # "XY path"
        store = f"the agent on Redis ({self.redis.url})" if self.redis is not None else "the agent's store in memory"
        if self.nginx is not None:
            store = f"{REPLICAS} gateways and {REPLICAS} agents behind nginx, the agents on Redis ({self.redis.url if self.redis else '?'})"
        return f"{self.label}: {self.root} at {commit}{' with changes to ' + ', '.join(changed) if changed else ''}, {store}"

    def stop(self) -> None:
        for service in reversed(self.services.values()):
            service.stop()
        if self.nginx is not None:
            self.nginx.stop()
        if self.redis is not None:
            self.redis.stop()


def start_stack(log_dir: Path, label: str, root: Path = ROOT, redis: bool = False, replicas: int = 1) -> Stack:
    """Start the four services of `root` wired to each other (and a redis-server for the agent
    if `redis`; `replicas` agents and gateways behind nginx if more than one); return without
    waiting for them (wait_ready), so stacks start side by side.

    Not tests/conftest.py's start_stack: this one runs any checkout's services (--baseline),
    including ones from before the scaled stacks that conftest now knows.
    """
    log_dir = log_dir / label
    log_dir.mkdir()
    names = ["fake_llm", "llm_proxy", *(f"agent{i if i > 1 else ''}" for i in range(1, replicas + 1)),
             *(f"gateway{i if i > 1 else ''}" for i in range(1, replicas + 1))]  # fmt: skip
    ports = {name: free_port() for name in names}
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
        "REDIS_URL": "",  # the store in memory, whatever this shell has set
        "AGENT_TOKEN": "",  # the internal hops open on loopback: the bench calls the agent and llm_proxy directly
        "LLM_PROXY_KEY": "",
    }
    stack = Stack(label, root)
    try:
        if redis or replicas > 1:
            stack.redis = start_redis(log_dir)
            env["REDIS_URL"] = stack.redis.url
        if replicas > 1:
            stack.nginx = start_nginx(log_dir, [ports[n] for n in names if kind_of(n) == "gateway"], [ports[n] for n in names if kind_of(n) == "agent"])
            env["AGENT_URL"] = stack.nginx.agent_url
        for name in names:
            log_path = log_dir / f"{name}.log"
            process = subprocess.Popen(
                [sys.executable, str(root / f"{kind_of(name)}.py"), "--port", str(ports[name])],
                cwd=root, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
            )  # fmt: skip
            stack.services[name] = Service(name, ports[name], process, log_path)
    except (OSError, RuntimeError) as exc:
        stack.stop()
        raise BenchError(f"{label}: {exc}") from None
    return stack


def wait_ready(stack: Stack) -> None:
    """Return once every service of the stack answers /healthz; BenchError if one does not."""
    for service in stack.services.values():
        deadline = time.monotonic() + START_TIMEOUT_S
        while not healthy(service):
            if service.process.poll() is not None:
                raise BenchError(f"{stack.label}: {service.name} exited with {service.process.returncode}:\n{service.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{stack.label}: {service.name} not healthy after {START_TIMEOUT_S:g} s:\n{service.log_tail()}")
            time.sleep(0.05)


def healthy(service: Service) -> bool:
    try:
        with urllib.request.urlopen(f"{service.url}/healthz", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


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
    """CPU seconds so far of each process of the stack (nginx's master and workers together) and of the bench itself."""
    snapshot = {name: sum(cpu_seconds(pid) for pid in stack.pids(name)) for name in (*stack.measured, "fake_llm")}
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


def rotated(items: Sequence[T], k: int) -> list[T]:
    """`items` starting from the k-th: the order in which stacks and paths take turns."""
    k %= max(len(items), 1)
    return [*items[k:], *items[:k]]


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


async def measure_ttft(http: aiohttp.ClientSession, stacks: Sequence[Stack], turns: int) -> dict[str, dict[str, float]]:
    """The whole pipeline and direct, plus two partial paths that show which hop adds what, on each stack."""
    body = completion_body([{"role": "user", "content": TTFT_PROMPT}])
    names = ("pipeline", "via_agent", "via_proxy", "direct")

    def path(stack: Stack, name: str) -> Callable[[], Coroutine[Any, Any, float]]:
        """One measurement on one path, in seconds."""
        if name == "pipeline":
            return lambda: ttft_pipeline(http, stack)
        if name == "via_agent":
            return lambda: ttft_agent(http, stack)
        url = f"{stack['llm_proxy'].url}/v1/chat/completions" if name == "via_proxy" else stack.completions_url
        return lambda: ttft_openai(http, url, body)

    paths = [(stack.label, name, path(stack, name)) for stack in stacks for name in names]
    samples: dict[tuple[str, str], list[float]] = {(label, name): [] for label, name, _ in paths}
    for i in range(WARMUP_TURNS + turns):
        for label, name, measure in rotated(paths, i):  # rotate the order, so that no path always follows the same one
            seconds = await measure()
            if i >= WARMUP_TURNS:
                samples[label, name].append(seconds * 1000)
    out: dict[str, dict[str, float]] = {}
    for stack in stacks:
        mine = {name: samples[stack.label, name] for name in names}
        figures = out[stack.label] = {}
        for q in (50, 99):
            for name in names:
                figures[f"ttft_{name}_p{q}_ms"] = percentile(mine[name], q)
            figures[f"ttft_added_p{q}_ms"] = percentile(mine["pipeline"], q) - percentile(mine["direct"], q)
            for name in ("via_agent", "via_proxy"):
                figures[f"ttft_{name}_added_p{q}_ms"] = percentile(mine[name], q) - percentile(mine["direct"], q)
    return out


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


async def measure_throughput(http: aiohttp.ClientSession, stacks: Sequence[Stack], runs: int, tokens: int = THROUGHPUT_TOKENS) -> dict[str, dict[str, float]]:
    """One stream flat out, `runs` times on each path of each stack; each pipeline's median run is reported."""
    expected = expected_text(tokens)
    body = completion_body([{"role": "user", "content": f"[tokens:{tokens}] [delay:0] bench: throughput"}])
    for stack in stacks:
        await throughput_pipeline(http, stack, 200)  # warm-up
    pipeline: dict[str, list[float]] = {stack.label: [] for stack in stacks}
    direct: dict[str, list[float]] = {stack.label: [] for stack in stacks}
    notifications: dict[str, list[int]] = {stack.label: [] for stack in stacks}
    cpu: dict[str, list[dict[str, float]]] = {stack.label: [] for stack in stacks}  # µs per token, per process
    errors = dict.fromkeys(pipeline, 0)
    for i in range(runs):
        for stack in rotated(stacks, i):
            elapsed, text, count, used = await throughput_pipeline(http, stack, tokens)
            errors[stack.label] += text != expected
            pipeline[stack.label].append(tokens / elapsed)
            notifications[stack.label].append(count)
            cpu[stack.label].append({name: used[name] / tokens * 1e6 for name in stack.measured})
            reply = await stream_direct(http, stack.completions_url, body)
            errors[stack.label] += reply.text != expected
            direct[stack.label].append(tokens / reply.done)
    out: dict[str, dict[str, float]] = {}
    for stack in stacks:
        label = stack.label
        middle = sorted(range(runs), key=lambda i: pipeline[label][i])[runs // 2]  # the median run
        out[label] = {
            "throughput_tokens_per_s": pipeline[label][middle],
            "throughput_direct_tokens_per_s": percentile(direct[label], 50),
            "throughput_tokens_per_notification": tokens / notifications[label][middle],
            "throughput_cpu_us_per_token": sum(cpu[label][middle].values()),
            **{f"throughput_cpu_us_per_token_{name}": us for name, us in cpu[label][middle].items()},
            "throughput_errors": errors[label],
        }
    return out


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


async def measure_tool_round_trip(http: aiohttp.ClientSession, stacks: Sequence[Stack], turns: int) -> dict[str, dict[str, float]]:
    """The round trip, and P and Q (see the module docstring), over `turns` turns each, on each stack."""
    pipeline: dict[str, list[float]] = {stack.label: [] for stack in stacks}
    direct: dict[str, list[float]] = {stack.label: [] for stack in stacks}
    round_trip: dict[str, list[float]] = {stack.label: [] for stack in stacks}
    ide: dict[str, list[float]] = {stack.label: [] for stack in stacks}
    log_offset = {service.log_path: service.log_since(0)[1] for stack in stacks for service in stack.replicas("agent")}
    for i in range(WARMUP_TURNS + turns):
        for stack in rotated(stacks, i):
            if i % 2:
                d = await tool_turn_direct(http, stack.completions_url)
                p, ide_s, call_id = await tool_turn_pipeline(http, stack)
            else:
                p, ide_s, call_id = await tool_turn_pipeline(http, stack)
                d = await tool_turn_direct(http, stack.completions_url)
            answered = {}
            for service in stack.replicas("agent"):  # the call was the run's; the run is on one of them
                text, log_offset[service.log_path] = service.log_since(log_offset[service.log_path])  # written before the second reply began
                answered |= {found: float(ms) for found, ms in TOOL_ANSWERED.findall(text)}
            call_id = repr(call_id)
            if call_id not in answered:
                raise BenchError(f"{stack.label}: the agent's log has no 'tool call {call_id} answered' line")
            if i >= WARMUP_TURNS:
                pipeline[stack.label].append(p * 1000)
                direct[stack.label].append(d * 1000)
                round_trip[stack.label].append(answered[call_id] - ide_s * 1000)
                ide[stack.label].append(ide_s * 1000)
    out: dict[str, dict[str, float]] = {}
    for label in pipeline:
        figures = out[label] = {}
        for q in (50, 99):
            figures[f"tool_rt_added_p{q}_ms"] = percentile(round_trip[label], q)
            figures[f"tool_rt_ide_p{q}_ms"] = percentile(ide[label], q)
            figures[f"tool_turn_pipeline_p{q}_ms"] = percentile(pipeline[label], q)
            figures[f"tool_turn_direct_p{q}_ms"] = percentile(direct[label], q)
            figures[f"tool_turn_added_p{q}_ms"] = percentile(pipeline[label], q) - percentile(direct[label], q)
    return out


def abort(ws: aiohttp.ClientWebSocketResponse) -> None:
    """End the socket with no close frame, as a dead network or a closed laptop lid does."""
    ws._writer.transport.abort()  # aiohttp has no public call for an abrupt end


async def answers_resume(http: aiohttp.ClientSession, stack: Stack) -> bool:
    """True when the gateway knows `resume` (CONTRACT v2): a made-up session is unknown (-32002), not the method (-32601)."""
    async with await connect(http, stack) as ws:
        await ws.send_str(request(1, RESUME, {"session_id": "ses_bench_probe_" + os.urandom(8).hex(), "last_seq": 0}))
        frame = await receive(ws)
    return frame.get("error", {}).get("code") != METHOD_NOT_FOUND


@dataclass
class Drop:
    """One drop and resume: when each step was done, in seconds from the drop."""

    connected: float  # the new socket is open: TCP connect and the HTTP upgrade
    answered: float  # resume's result has arrived: the gateway is attached to the session's log on the agent
    first: float  # the first notification with seq > last_seq has arrived
    replayed: bool  # that notification came from the log (seq <= the result's last_seq), not live
    in_order: bool  # its seq is last_seq + 1: nothing lost, nothing repeated


async def drop_and_resume(http: aiohttp.ClientSession, stack: Stack) -> Drop:
    """Stream a turn, drop the socket mid-stream, resume on a new one; time the way back."""
    session_id, last_seq, held = "", 0, 0
    ws = await connect(http, stack)
    try:
        await send_user_message(ws, RESUME_PROMPT)
        while held < DROP_AFTER:
            frame = await receive(ws)
            if frame.get("id") == 1 and "result" in frame:
                session_id = frame["result"]["session_id"]
            elif frame.get("method") == TOKEN:
                last_seq, held = frame["params"]["seq"], held + 1
            elif ended(frame):
                raise BenchError(f"a resume turn ended after {held} token(s), before its drop at {DROP_AFTER}")
        await asyncio.sleep(DROP_STALL_S)  # a dying network: frames sent now reach nobody, the log holds them
        dropped = time.perf_counter()
        abort(ws)
    finally:
        await ws.close()  # after the abort: only frees the client's side
    async with await connect(http, stack) as ws:  # leaving it closes with 1000, which cancels the run
        connected = time.perf_counter() - dropped
        await ws.send_str(request(2, RESUME, {"session_id": session_id, "last_seq": last_seq}))
        reply = await receive(ws)
        if reply.get("id") != 2 or "result" not in reply:
            raise BenchError(f"{stack.label}: resume answered {reply}")
        answered = time.perf_counter() - dropped
        frame = await receive(ws)
        while frame.get("method") not in (TOKEN, FINAL):
            ended(frame)  # an error notification: BenchError
            frame = await receive(ws)
        first = time.perf_counter() - dropped
    seq = frame["params"]["seq"]
    return Drop(connected, answered, first, seq <= reply["result"]["last_seq"], seq == last_seq + 1)


async def measure_resume(http: aiohttp.ClientSession, stacks: Sequence[Stack], drops: int) -> dict[str, dict[str, float]]:
    """`drops` drops and resumes on each stack that knows `resume`, taking turns."""
    resumable = [stack for stack in stacks if stack.resumable]
    samples: dict[str, list[Drop]] = {stack.label: [] for stack in resumable}
    for i in range(WARMUP_TURNS + drops):
        for stack in rotated(resumable, i):
            drop = await drop_and_resume(http, stack)
            if i >= WARMUP_TURNS:
                samples[stack.label].append(drop)
    out: dict[str, dict[str, float]] = {}
    for label, mine in samples.items():
        replayed = [d for d in mine if d.replayed and d.in_order]
        out[label] = {
            "resume_p50_ms": percentile([d.first * 1000 for d in replayed], 50),
            "resume_p99_ms": percentile([d.first * 1000 for d in replayed], 99),
            "resume_connect_p50_ms": percentile([d.connected * 1000 for d in replayed], 50),
            "resume_result_p50_ms": percentile([d.answered * 1000 for d in replayed], 50),
            "resume_drops": len(replayed),
            "resume_live_first": sum(not d.replayed for d in mine),
            "resume_errors": sum(not d.in_order for d in mine),
        }
    return out


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


async def measure_level(http: aiohttp.ClientSession, stack: Stack, n: int, tokens: int) -> dict[str, float]:
    """N sessions connected first, then all streaming at once; then the same N streams direct."""
    prompt = f"[tokens:{tokens}] [delay:{PACE_MS}] bench: concurrency"
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)

    async def connect_one() -> aiohttp.ClientWebSocketResponse:
        async with gate:
            return await connect(http, stack)

    sockets = await asyncio.gather(*(connect_one() for _ in range(n)))
    try:
        for name in stack.measured:
            for pid in stack.pids(name):
                reset_peak_rss(pid)
        before = cpu_snapshot(stack)
        streams = await all_streams([stream_session(ws, prompt) for ws in sockets])
        after = cpu_snapshot(stack)
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    rss = {name: max(peak_rss_mb(pid) for pid in stack.pids(name)) for name in stack.measured}  # nginx: its largest process
    added, firsts, errors = gap_figures(streams, tokens)
    received = sum(len("".join(text for _, text in s.tokens).split()) for s in streams)
    used = {name: after[name] - before[name] for name in after}

    body = completion_body([{"role": "user", "content": prompt}])
    direct = await all_streams([direct_session(http, stack.completions_url, body) for _ in range(n)])
    direct_added, _, direct_errors = gap_figures(direct, tokens)

    per_token = 1e6 / max(received, 1)
    return {
        f"n{n}_gap_added_p50_ms": percentile(added, 50),
        f"n{n}_gap_added_p99_ms": percentile(added, 99),
        f"n{n}_ttft_p99_ms": percentile(firsts, 99),
        f"n{n}_errors": errors,
        f"n{n}_cpu_us_per_token": sum(used[name] for name in stack.measured) * per_token,
        **{f"n{n}_cpu_us_per_token_{name}": used[name] * per_token for name in (*stack.measured, "fake_llm", "bench")},
        **{f"n{n}_peak_rss_mb_{name}": rss[name] for name in stack.measured},
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


def load_average() -> str:
    """The kernel's 1, 5 and 15 minute load averages: how busy the machine was besides this bench."""
    return " / ".join(f"{load:.2f}" for load in os.getloadavg())


def num(value: float) -> str:
    """A figure with as many digits as its size deserves; NaN (no such figure) as a dash."""
    if math.isnan(value):
        return "—"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def spread(values: Sequence[float], show: Callable[[float], str] = num) -> str:
    """The median of the rounds' values, and [min, max] when there is more than one."""
    known = [v for v in values if not math.isnan(v)]
    if not known:
        return "—"
    if len(known) == 1:
        return show(known[0])
    return f"{show(statistics.median(known))} [{show(min(known))}, {show(max(known))}]"


def medians(rounds: Sequence[dict[str, dict[str, float]]], label: str) -> dict[str, float]:
    """One stack's figures, each the median of its rounds."""
    names = dict.fromkeys(name for figures in rounds for name in figures.get(label, {}))
    return {name: statistics.median([figures[label][name] for figures in rounds if name in figures[label]]) for name in names}


def report(figures: dict[str, float], levels: Sequence[int], stack: Stack, stream_tokens: int) -> str:
    """One stack's table: each figure beside its target and a pass/miss mark."""
    lines = [stack.describe(), ""]
    row = "{:<40}{:>11}{:>11}{:>11}  {:<20}{}"
    lines.append(row.format("", "pipeline", "direct", "added", "target", ""))

    def add(label: str, pipeline: str = "", direct: str = "", added: str = "", target: str = "", fmt: str = "{:,.2f}") -> None:
        """One row; the mark judges `added` when there is one, else `pipeline` (figure names)."""
        cells = [fmt.format(figures[name]) if name else "" for name in (pipeline, direct, added)]
        judged = added or pipeline
        mark = verdict(figures[judged], TARGETS[target]) if target else ""
        lines.append(row.format(label, *cells, target_text(TARGETS[target]) if target else "", mark))

    processes = " + ".join(stack.measured)
    if "ttft_added_p50_ms" in figures:
        for q in (50, 99):
            add(f"time to first token p{q} (ms)", f"ttft_pipeline_p{q}_ms", f"ttft_direct_p{q}_ms", f"ttft_added_p{q}_ms", f"ttft_added_p{q}_ms")
        for name, label in (("via_agent", "agent + llm_proxy"), ("via_proxy", "llm_proxy alone")):
            add(f"  p50 through {label}", f"ttft_{name}_p50_ms", "ttft_direct_p50_ms", f"ttft_{name}_added_p50_ms")
    if "throughput_tokens_per_s" in figures:
        add("one stream (tokens/s)", "throughput_tokens_per_s", "throughput_direct_tokens_per_s", target="throughput_tokens_per_s", fmt="{:,.0f}")
        add("  tokens per notification", "throughput_tokens_per_notification", fmt="{:,.1f}")
        add(f"  CPU per token, {len(stack.measured)} processes (µs)", "throughput_cpu_us_per_token", fmt="{:,.1f}")
        lines.append(f"    {processes}: " + " + ".join(f"{figures[f'throughput_cpu_us_per_token_{name}']:.1f}" for name in stack.measured))
        add("  texts not exactly as sent", "throughput_errors", target="throughput_errors", fmt="{:,.0f}")
    if "tool_rt_added_p50_ms" in figures:
        add("tool round trip p50 (ms)", added="tool_rt_added_p50_ms", target="tool_rt_added_p50_ms")
        add("tool round trip p99 (ms)", added="tool_rt_added_p99_ms")
        add("  the IDE's own time, p50 (ms)", "tool_rt_ide_p50_ms")
        add("  whole tool turn p50 (ms)", "tool_turn_pipeline_p50_ms", "tool_turn_direct_p50_ms", "tool_turn_added_p50_ms")
        add("  whole tool turn p99 (ms)", "tool_turn_pipeline_p99_ms", "tool_turn_direct_p99_ms", "tool_turn_added_p99_ms")
    if "resume_p50_ms" in figures:
        add("resume: drop to first replayed, p50 (ms)", "resume_p50_ms")
        add("resume: drop to first replayed, p99 (ms)", "resume_p99_ms")
        add("  drop to new socket open, p50 (ms)", "resume_connect_p50_ms")
        add("  drop to resume's result, p50 (ms)", "resume_result_p50_ms")
        add("  drops timed", "resume_drops", fmt="{:,.0f}")
        add("  first came live, not timed", "resume_live_first", fmt="{:,.0f}")
        add("  seq not last_seq + 1 (lost, repeated)", "resume_errors", fmt="{:,.0f}")
    elif not stack.resumable:
        lines.append("resume: not measured: this gateway does not know `resume`")

    measured = [n for n in levels if f"n{n}_errors" in figures]
    if measured:
        short = "/".join({"gateway": "gw", "gateway2": "gw2", "agent": "ag", "agent2": "ag2", "llm_proxy": "px", "redis": "rd", "nginx": "ngx"}[name] for name in stack.measured)
        lines += ["", f"concurrency: N sessions connected, then all streaming {stream_tokens} tokens at {PACE_MS} ms at once;",
                  f"gap+ = gap between token notifications - {PACE_MS} ms per token they carry; direct = the same N streams read from fake_llm;",
                  f"ttft = time to first token under load, {2 * PACE_MS} ms of it the fake's pacing (role chunk, first text)"]  # fmt: skip
        head = "{:>6}{:>10}{:>15}{:>10}{:>15}{:>10}{:>%d}{:>13}" % max(25, len(short) + 14)
        lines.append(head.format("N", "gap+ p50", "gap+ p99", "errors", "CPU µs/token", "ttft p99", f"peak RSS MB {short}", "direct p99"))
        for n in measured:
            def judged(name: str, fmt: str) -> str:
                return f"{fmt.format(figures[f'n{n}_{name}'])} {verdict(figures[f'n{n}_{name}'], LEVEL_TARGETS[name])}"

            rss = "/".join(f"{figures[f'n{n}_peak_rss_mb_{name}']:.0f}" for name in stack.measured)
            lines.append(head.format(
                n, f"{figures[f'n{n}_gap_added_p50_ms']:.2f}", judged("gap_added_p99_ms", "{:.2f}"), judged("errors", "{:.0f}"),
                judged("cpu_us_per_token", "{:.1f}"), f"{figures[f'n{n}_ttft_p99_ms']:.0f}", rss, f"{figures[f'n{n}_direct_gap_added_p99_ms']:.2f}",
            ))  # fmt: skip
            lines.append(f"{'':>6}  CPU µs/token, {processes}: " + " + ".join(f"{figures[f'n{n}_cpu_us_per_token_{name}']:.1f}" for name in stack.measured))
        lines.append("targets per line: " + ", ".join(f"{name} {target_text(t)}" for name, t in LEVEL_TARGETS.items()) + f" ({processes})")
    return "\n".join(lines)


def compared_rows(levels: Sequence[int]) -> list[tuple[str, str]]:
    """(figure, label) of the rows a comparison shows; a row neither stack has is left out."""
    processes = PROCESSES
    rows = [
        ("ttft_added_p50_ms", "time to first token added, p50 (ms)"),
        ("ttft_added_p99_ms", "time to first token added, p99 (ms)"),
        ("ttft_via_agent_added_p50_ms", "  agent + llm_proxy, p50 (ms)"),
        ("ttft_via_proxy_added_p50_ms", "  llm_proxy alone, p50 (ms)"),
        ("ttft_direct_p50_ms", "  direct, p50 (ms): the machine's speed"),
        ("throughput_tokens_per_s", "one stream (tokens/s)"),
        ("throughput_direct_tokens_per_s", "  direct (tokens/s)"),
        ("throughput_cpu_us_per_token", "  CPU per token (µs)"),
        *((f"throughput_cpu_us_per_token_{name}", f"    {name}") for name in processes),
        ("tool_rt_added_p50_ms", "tool round trip added, p50 (ms)"),
        ("tool_turn_added_p50_ms", "  whole tool turn added, p50 (ms)"),
        ("resume_p50_ms", "resume, drop to first replayed, p50 (ms)"),
        ("resume_p99_ms", "resume, drop to first replayed, p99 (ms)"),
        ("resume_result_p50_ms", "  drop to resume's result, p50 (ms)"),
    ]
    for n in levels:
        rows += [
            (f"n{n}_cpu_us_per_token", f"N = {n}: CPU per token (µs)"),
            *((f"n{n}_cpu_us_per_token_{name}", f"    {name}") for name in processes),
            (f"n{n}_gap_added_p99_ms", "  gap+ p99 (ms)"),
            (f"n{n}_errors", "  errors"),
        ]
    return rows


def pair_target(name: str) -> tuple[str, float] | None:
    """The bound REDIS_TARGETS puts on the "redis" stack's figure `name` against "memory"'s, if any."""
    for key, target in REDIS_TARGETS.items():
        if name == key or (key.startswith("*") and name.endswith(key[1:])):
            return target
    return None


def comparison(rounds: Sequence[dict[str, dict[str, float]]], label: str, reference: str, levels: Sequence[int]) -> str:
    """Two stacks side by side: each figure's median [min, max] over the rounds, and their ratio
    and difference taken round by round (so that a slow round weighs on both sides of it)."""
    lines = [f"{label} against {reference}: median [min, max] over {len(rounds)} round(s); {label} / {reference} and "
             f"{label} - {reference} taken round by round"]  # fmt: skip
    row = "{:<42}{:>27}{:>27}{:>22}{:>27}  {}"
    lines.append(row.format("", reference, label, f"{label} / {reference}", f"{label} - {reference}", "target"))
    nan = math.nan
    for name, title in compared_rows(levels):
        ref = [figures[reference].get(name, nan) for figures in rounds]
        mine = [figures[label].get(name, nan) for figures in rounds]
        if all(math.isnan(v) for v in (*ref, *mine)):
            continue
        ratio = [b / a if a else nan for a, b in zip(ref, mine)]
        diff = [b - a for a, b in zip(ref, mine)]
        target, mark = (label, reference) == ("redis", "memory") and pair_target(name), ""
        if target:
            kind, bound = target
            judged = [v for v in (diff if kind == "+" else ratio) if not math.isnan(v)]
            ok = bool(judged) and statistics.median(judged) <= bound
            mark = f"{f'≤ +{bound:g} ms' if kind == '+' else f'≤ {bound:g}×'} {'pass' if ok else 'miss'}"
        show = (lambda v: f"{v:,.0f}") if name.endswith("errors") else num  # a count
        lines.append(row.format(title, spread(ref, show), spread(mine, show), spread(ratio, lambda v: f"{v:.2f}×"),
                                spread(diff, lambda v: ("+" if v >= 0 else "−") + show(abs(v))), mark))  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

async def run(stacks: Sequence[Stack], args: argparse.Namespace) -> list[dict[str, dict[str, float]]]:
    """Every measurement asked for, one after the other (never two loads at once); per round, each stack's figures."""
    rounds: list[dict[str, dict[str, float]]] = []
    timeout = aiohttp.ClientTimeout(total=None, sock_read=TURN_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as http:
        for stack in stacks:
            stack.resumable = await answers_resume(http, stack)
        for r in range(args.rounds):
            if args.rounds > 1:
                progress(f"round {r + 1} of {args.rounds} (load average {load_average()})")
            figures: dict[str, dict[str, float]] = {stack.label: {} for stack in stacks}
            order = rotated(stacks, r)  # each round, another stack goes first

            def merge(part: dict[str, dict[str, float]]) -> None:
                for label, values in part.items():
                    figures[label] |= values

            if "ttft" in args.parts:
                progress(f"time to first token: {args.turns} turns on each path of each stack")
                merge(await measure_ttft(http, order, args.turns))
            if "throughput" in args.parts:
                progress(f"one stream: {THROUGHPUT_TOKENS} tokens flat out, {args.runs} run(s) on each path of each stack")
                merge(await measure_throughput(http, order, args.runs))
            if "tool" in args.parts:
                progress(f"tool round trip: {args.turns} turns on each path of each stack")
                merge(await measure_tool_round_trip(http, order, args.turns))
            if "resume" in args.parts:
                progress(f"resume: {args.drops} drops on each stack whose gateway knows resume ({', '.join(s.label for s in order if s.resumable) or 'none'})")
                merge(await measure_resume(http, order, args.drops))
            if "concurrency" in args.parts:
                for n in args.level_list:
                    for stack in order:
                        progress(f"concurrency: {stack.label}, {n} session(s), {args.stream_tokens} tokens at {PACE_MS} ms")
                        figures[stack.label] |= await measure_level(http, stack, n, args.stream_tokens)
            rounds.append(figures)
    return rounds


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the pipeline (IDE ⇄ gateway → agent → llm_proxy → fake_llm) against the same fake "
        "model read directly: time to first token, one stream's throughput, the tool round trip, CPU per token, "
        "the way back after a dropped socket (resume), and N concurrent sessions. Starts its own stacks on free "
        "loopback ports: this checkout in memory, and beside it, side by side in the same run, the same on Redis "
        "(--redis) and another checkout (--baseline).",
        epilog="Output: a table per stack with each figure next to its target, a table per pair of stacks, then one "
        "line of JSON with every figure. To profile a service, run e.g. `--only throughput --runs 30` and attach "
        "`py-spy record --pid PID` to the pid printed on stderr.",
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TURNS} turns, {QUICK_THROUGHPUT_RUNS} throughput runs, {QUICK_RESUME_DROPS} drops, levels {','.join(map(str, QUICK_LEVELS))} of {QUICK_STREAM_TOKENS} tokens: well under a minute")
    parser.add_argument("--redis", action="store_true", help="also a stack with the agent on Redis (a redis-server of its own on a free port; needs redis-server on PATH)")
    parser.add_argument("--scale", action="store_true", help=f"also a stack of {REPLICAS} gateways and {REPLICAS} agents on Redis behind nginx (needs redis-server and nginx); implies --redis, its yardstick")
    parser.add_argument("--baseline", type=Path, metavar="DIR", help="also a stack run from another checkout, e.g. `git worktree add /tmp/old COMMIT`; `.` for an A/A run")
    parser.add_argument("--rounds", type=int, default=1, metavar="R", help="measure every part R times, each stack in turn; figures are medians with [min, max] (default 1)")
    parser.add_argument("--only", default=",".join(PARTS), metavar="PARTS", help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all)")
    parser.add_argument("--levels", metavar="N,N,...", help=f"comma-separated concurrency levels (default {','.join(map(str, LEVELS))}; --quick {','.join(map(str, QUICK_LEVELS))})")
    parser.add_argument("--turns", type=int, metavar="N", help=f"measured turns for TTFT and tool round trip (default {TURNS}; --quick {QUICK_TURNS})")
    parser.add_argument("--runs", type=int, metavar="N", help=f"one-stream throughput runs, the median reported (default {THROUGHPUT_RUNS}; --quick {QUICK_THROUGHPUT_RUNS})")
    parser.add_argument("--drops", type=int, metavar="N", help=f"measured drops for resume (default {RESUME_DROPS}; --quick {QUICK_RESUME_DROPS})")
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"--only: unknown part(s) {', '.join(sorted(unknown))}; expected some of {', '.join(PARTS)}")
    try:
        args.level_list = tuple(int(n) for n in args.levels.split(",")) if args.levels else (QUICK_LEVELS if args.quick else LEVELS)
    except ValueError:
        parser.error(f"--levels: expected comma-separated integers, got {args.levels!r}")
    counts = (args.turns, args.runs, args.drops, args.rounds)
    if min(args.level_list, default=0) < 1 or any(n is not None and n < 1 for n in counts):
        parser.error("--levels, --turns, --runs, --drops and --rounds take positive integers")
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        missing = [f"{name}.py" for name in SERVICES if not (args.baseline / f"{name}.py").is_file()]
        if missing:
            parser.error(f"--baseline {args.baseline}: no {', '.join(missing)} there; expected a checkout of this repository")
    args.redis = args.redis or args.scale  # the scaled stack is read against one of each on Redis
    args.turns = args.turns or (QUICK_TURNS if args.quick else TURNS)
    args.runs = args.runs or (QUICK_THROUGHPUT_RUNS if args.quick else THROUGHPUT_RUNS)
    args.drops = args.drops or (QUICK_RESUME_DROPS if args.quick else RESUME_DROPS)
    args.stream_tokens = QUICK_STREAM_TOKENS if args.quick else STREAM_TOKENS
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wanted = [  # (label, checkout, agent on Redis, replicas)
        *([("baseline", args.baseline, False, 1)] if args.baseline else []),
        (PRIMARY, ROOT, False, 1),
        *([("redis", ROOT, True, 1)] if args.redis else []),
        *([("scale", ROOT, True, REPLICAS)] if args.scale else []),
    ]
    raise_fd_limit(max(args.level_list) if "concurrency" in args.parts else 1)  # before the services start: they inherit it
    started, load_at_start = time.monotonic(), load_average()
    stacks: list[Stack] = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        try:
            try:
                for label, root, redis, replicas in wanted:
                    stacks.append(start_stack(Path(tmp), label, root, redis, replicas))
                for stack in stacks:
                    wait_ready(stack)
            except BenchError as exc:
                print(f"bench: the stack did not start: {exc}", file=sys.stderr)
                return 1
            for stack in stacks:
                progress(f"{stack.label} stack: " + ", ".join(f"{s.name} pid {s.process.pid} port {s.port}" for s in stack.services.values())
                         + (f", redis-server pid {stack.pids('redis')[0]} port {stack.redis.port}" if stack.redis else "")
                         + (f", nginx pids {stack.pids('nginx')} ws {stack.nginx.ws_url}" if stack.nginx else ""))  # fmt: skip
            try:
                rounds = asyncio.run(run(stacks, args))
            except (BenchError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                print(f"bench: could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
                for stack in stacks:
                    for service in stack.services.values():
                        print(f"--- {stack.label} {service.name} log (last lines)\n{service.log_tail()}", file=sys.stderr)
                return 1
        finally:
            for stack in stacks:
                stack.stop()
    progress(f"done in {time.monotonic() - started:.0f} s")
    print(f"bench.py {' '.join(sys.argv[1:] if argv is None else argv)}: {machine()}; load average {load_at_start} at the start, {load_average()} at the end")
    figures = {stack.label: medians(rounds, stack.label) for stack in stacks}
    for stack in stacks:
        print()
        print(report(figures[stack.label], args.level_list, stack, args.stream_tokens))
    for label, reference in PAIRS:
        if label in figures and reference in figures:
            print()
            print(comparison(rounds, label, reference, args.level_list))
    flat = {(name if stack.label == PRIMARY else f"{stack.label}.{name}"): round(value, 3) for stack in stacks for name, value in figures[stack.label].items()}
    print(json.dumps(flat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
