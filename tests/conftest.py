"""Fixtures that start the real services as processes on free loopback ports.

Each service is started the way a user starts it (`python NAME.py --port P`) with its
configuration in the environment, and is ready when `GET /healthz` answers. Nothing is mocked:
the tests talk to these processes over real sockets.

A stack is one process of each service, or scaled out (CONTRACT, "Scale-out: REDIS_URL"):

    start_stack(tmp, scale=Scale(agents=2, gateways=2, redis=True))
        redis-server ← agent, agent2 ← nginx ← gateway, gateway2 ← nginx ← stack.ws_url

Replicas are named "agent", "agent2", ... and "gateway", "gateway2", ...; every agent gets the
stack's own redis-server as REDIS_URL and a fresh REDIS_PREFIX; the gateways' AGENT_URL and
stack.ws_url are nginx's two ports (tests/nginx_server.py). Which stacks the `stack` and
`make_stack` fixtures start is the `stack_mode` fixture's: REFAGENT_TEST_MODE, "memory" (the
default: one of each, no Redis, no nginx), "redis" or "gateways" (MODES below). A module runs every test
in both modes by overriding it:

    @pytest.fixture(scope="module", params=["memory", "redis"])
    def stack_mode(request: pytest.FixtureRequest) -> str:
        return request.param

and a module whose own fixture starts its stack passes the mode on: `def stack(tmp_path_factory,
stack_mode)` ... `start_stack(path, env, scale=stack_mode)`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nginx_server import Nginx, start_nginx
from servers import RedisServer, free_port, start_redis

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 20.0  # generous: a cold 2-core CI machine imports four services at once
TOKEN = "test-token-" + os.urandom(8).hex()
SERVICES = ("fake_llm", "llm_proxy", "agent", "gateway")  # started in this order, upstream first


@dataclass(frozen=True)
class Scale:
    """How many agents and gateways a stack runs, and what stands beside them."""

    agents: int = 1
    gateways: int = 1
    redis: bool = False  # a redis-server of the stack's own, as every agent's REDIS_URL
    nginx: bool = False  # nginx in front of the agents and the gateways; always with more than one of either

    @property
    def fronted(self) -> bool:
        return self.nginx or self.agents > 1 or self.gateways > 1


# REFAGENT_TEST_MODE's values: "memory" is one of each; "redis" is scaled out as in production;
# "gateways" is two gateways behind nginx sharing one agent's memory (no Redis needed).
MODES = {"memory": Scale(), "redis": Scale(agents=2, gateways=2, redis=True), "gateways": Scale(gateways=2)}
TEST_MODE = os.environ.get("REFAGENT_TEST_MODE", "memory")  # the stacks' default


def pytest_configure(config: pytest.Config) -> None:
    if TEST_MODE not in MODES:  # said once, before any test runs
        raise pytest.UsageError(f"REFAGENT_TEST_MODE={TEST_MODE!r}: expected one of {', '.join(MODES)}")


def scale_of(mode: Scale | str) -> Scale:
    if isinstance(mode, Scale):
        return mode
    if mode not in MODES:
        raise ValueError(f"unknown stack mode {mode!r} (REFAGENT_TEST_MODE?): expected one of {', '.join(MODES)}")
    return MODES[mode]


def replica_names(kind: str, count: int) -> list[str]:
    """"agent", "agent2", "agent3", ...: the first keeps the plain name every test already uses."""
    return [kind if i == 1 else f"{kind}{i}" for i in range(1, count + 1)]


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

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start(name: str, env: dict[str, str], log_dir: Path, port: int | None = None) -> Service:
    """Start `name` ("agent", or a replica such as "agent2") as `python agent.py --port P`."""
    port = port or free_port()
    log_path = log_dir / f"{name}-{port}.log"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / f"{kind_of(name)}.py"), "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return Service(name, port, process, log_path)


def wait_healthy(service: Service, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited with {service.process.returncode}:\n{service.log()}")
        try:
            with urllib.request.urlopen(f"{service.url}/healthz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{service.name} not healthy after {timeout} s:\n{service.log()}")


@dataclass
class Stack:
    """fake_llm -> llm_proxy -> agent(s) -> gateway(s), each a real process; redis and nginx if scaled."""

    services: dict[str, Service] = field(default_factory=dict)
    token: str = TOKEN
    env: dict[str, str] = field(default_factory=dict)  # what every service was started with
    log_dir: Path = Path(".")
    ports: dict[str, int] = field(default_factory=dict)  # every service and replica, started or not
    scale: Scale = Scale()
    redis: RedisServer | None = None  # with scale.redis
    nginx: Nginx | None = None  # with scale.fronted

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    def replicas(self, kind: str) -> list[Service]:
        """The running services of one kind: replicas("agent") -> [agent, agent2, ...]."""
        return [service for name, service in self.services.items() if kind_of(name) == kind]

    @property
    def ws_url(self) -> str:
        """Where an IDE connects: nginx when it fronts the gateways, else the one gateway."""
        if self.nginx is not None:
            return self.nginx.ws_url
        return f"ws://127.0.0.1:{self['gateway'].port}/ws"

    @property
    def agent_url(self) -> str:
        """What the gateways call (their AGENT_URL): nginx when it fronts the agents, else the one agent."""
        return self.env["AGENT_URL"]

    def stop(self) -> None:
        for service in self.services.values():
            service.stop()
        if self.nginx is not None:
            self.nginx.stop()
        if self.redis is not None:
            self.redis.stop()

    def restart(self, name: str, wait: bool = True) -> Service:
        """(Re)start `name` on its port with the stack's env, stopping it first if it runs."""
        if name in self.services:
            self.services[name].stop()
        self.services[name] = start(name, self.env, self.log_dir, self.ports[name])
        if wait:
            wait_healthy(self.services[name])
        return self.services[name]


def start_stack(log_dir: Path, env: dict[str, str] | None = None, only: tuple[str, ...] = SERVICES, scale: Scale | str | None = None) -> Stack:
    """Start the services named in `only` (in pipeline order), wired to each other.

    `only` names kinds ("agent": every agent replica) or single replicas ("agent2"). `scale`: a
    Scale, a mode's name, or None for REFAGENT_TEST_MODE. `env` overrides the wiring, so
    {"REDIS_URL": ""} starts a scaled stack whose agents keep everything in memory.
    """
    scale = scale_of(TEST_MODE if scale is None else scale)
    names = ["fake_llm", "llm_proxy", *replica_names("agent", scale.agents), *replica_names("gateway", scale.gateways)]
    unknown = [name for name in only if name not in SERVICES and name not in names]
    if unknown:
        raise ValueError(f"only={only!r}: no service {unknown} in a stack of {names}")
    ports = {name: free_port() for name in names}
    stack = Stack(log_dir=log_dir, ports=ports, scale=scale)
    wiring = {
        "FAKE_LLM_TOKEN_DELAY_MS": "0",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{ports['fake_llm']}/v1",
        "OPENAI_API_KEY": "",
        "LLM_PROXY_URL": f"http://127.0.0.1:{ports['llm_proxy']}/v1",
        "AGENT_URL": f"http://127.0.0.1:{ports['agent']}",
        "GATEWAY_TOKEN": TOKEN,
        "GATEWAY_RUNTIME_DIR": str(log_dir / "runtime"),
    }
    try:
        if scale.redis:
            stack.redis = start_redis(log_dir)
            wiring["REDIS_URL"] = stack.redis.url
            wiring["REDIS_PREFIX"] = f"test-{os.urandom(6).hex()}:"  # a fresh key space per stack
        if scale.fronted:
            gateways = [ports[name] for name in names if kind_of(name) == "gateway"]
            agents = [ports[name] for name in names if kind_of(name) == "agent"]
            stack.nginx = start_nginx(log_dir, gateways, agents)
            wiring["AGENT_URL"] = stack.nginx.agent_url
        stack.env = {**wiring, **(env or {})}
        for name in names:
            if name in only or kind_of(name) in only:
                stack.services[name] = start(name, stack.env, log_dir, ports[name])
        for service in stack.services.values():
            wait_healthy(service)
    except Exception:
        stack.stop()
        raise
    return stack


@pytest.fixture(scope="module")
def stack_mode() -> Scale | str:
    """What the `stack` and `make_stack` fixtures start: REFAGENT_TEST_MODE unless a module overrides this."""
    return TEST_MODE


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, stack_mode: Scale | str) -> Iterator[Stack]:
    """The whole pipeline on the fake LLM, shared by the tests of one module."""
    s = start_stack(tmp_path_factory.mktemp("stack"), scale=stack_mode)
    yield s
    s.stop()


@pytest.fixture
def make_stack(tmp_path: Path, stack_mode: Scale | str) -> Iterator[object]:
    """A factory for a stack with its own settings, stopped when the test ends."""
    stacks: list[Stack] = []

    def make(env: dict[str, str] | None = None, only: tuple[str, ...] = SERVICES, scale: Scale | str | None = None) -> Stack:
        s = start_stack(tmp_path, env, only, stack_mode if scale is None else scale)
        stacks.append(s)
        return s

    yield make
    for s in stacks:
        s.stop()
