"""Fixtures that start the real services as processes on free loopback ports.

Each service is started the way a user starts it (`python NAME.py --port P`) with its
configuration in the environment, and is ready when `GET /healthz` answers. Nothing is mocked:
the tests talk to these processes over real sockets.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 20.0  # generous: a cold 2-core CI machine imports four services at once
TOKEN = "test-token-" + os.urandom(8).hex()


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
    port = port or free_port()
    log_path = log_dir / f"{name}-{port}.log"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / f"{name}.py"), "--port", str(port)],
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
    """fake_llm -> llm_proxy -> agent -> gateway, each a real process."""

    services: dict[str, Service] = field(default_factory=dict)
    token: str = TOKEN
    env: dict[str, str] = field(default_factory=dict)  # what every service was started with
    log_dir: Path = Path(".")
    ports: dict[str, int] = field(default_factory=dict)  # all four, started or not

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self['gateway'].port}/ws"

    def stop(self) -> None:
        for service in self.services.values():
            service.stop()

    def restart(self, name: str, wait: bool = True) -> Service:
        """(Re)start `name` on its port with the stack's env, stopping it first if it runs."""
        if name in self.services:
            self.services[name].stop()
        self.services[name] = start(name, self.env, self.log_dir, self.ports[name])
        if wait:
            wait_healthy(self.services[name])
        return self.services[name]


def start_stack(log_dir: Path, env: dict[str, str] | None = None, only: tuple[str, ...] = ("fake_llm", "llm_proxy", "agent", "gateway")) -> Stack:
    """Start the services named in `only` (in pipeline order), wired to each other."""
    env = dict(env or {})
    ports = {name: free_port() for name in ("fake_llm", "llm_proxy", "agent", "gateway")}
    wiring = {
        "FAKE_LLM_TOKEN_DELAY_MS": "0",
        "OPENAI_BASE_URL": f"http://127.0.0.1:{ports['fake_llm']}/v1",
        "OPENAI_API_KEY": "",
        "LLM_PROXY_URL": f"http://127.0.0.1:{ports['llm_proxy']}/v1",
        "AGENT_URL": f"http://127.0.0.1:{ports['agent']}",
        "GATEWAY_TOKEN": TOKEN,
        "GATEWAY_RUNTIME_DIR": str(log_dir / "runtime"),
    }
    stack = Stack(env={**wiring, **env}, log_dir=log_dir, ports=ports)
    for name in only:
        stack.services[name] = start(name, stack.env, log_dir, ports[name])
    try:
        for service in stack.services.values():
            wait_healthy(service)
    except Exception:
        stack.stop()
        raise
    return stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole pipeline on the fake LLM, shared by the tests of one module."""
    s = start_stack(tmp_path_factory.mktemp("stack"))
    yield s
    s.stop()


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[object]:
    """A factory for a stack with its own settings, stopped when the test ends."""
    stacks: list[Stack] = []

    def make(env: dict[str, str] | None = None, only: tuple[str, ...] = ("fake_llm", "llm_proxy", "agent", "gateway")) -> Stack:
        s = start_stack(tmp_path, env, only)
        stacks.append(s)
        return s

    yield make
    for s in stacks:
        s.stop()
