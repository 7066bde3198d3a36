"""A real redis-server for the tests: started on a free loopback port, no persistence.

    server = start_redis(tmp_path)          # waits until PING answers
    server.url                              # redis://127.0.0.1:PORT/0
    server.stop()  /  server.kill()         # SIGTERM  /  SIGKILL (a crash)
    server.start()                          # again, on the same port, empty

Nothing is written to disk (`--save "" --appendonly no`), so a restarted server starts empty,
as a Redis that lost its memory would. DEBUG is allowed from loopback, for tests that stall
the server (`DEBUG SLEEP 2`). Needs `redis-server` on PATH (Debian: apt install
redis-server); a test module that needs it skips itself when it is missing.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server") or ""  # "" when not installed
START_TIMEOUT_S = 10.0  # a cold, busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pings(port: int) -> bool:
    """True when a redis-server on this port answers PING (a raw RESP exchange: no client library)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        """Start (or start again) on self.port; return once PING answers."""
        assert self.process is None or self.process.poll() is not None, "already running"
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--enable-debug-command", "local"]  # tests stall it with DEBUG SLEEP
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=self.log_path.parent, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not pings(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer PING within {START_TIMEOUT_S:g} s:\n{self.log()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM, and wait for the port to be free."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-whatever, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


def start_redis(tmp_dir: Path, port: int | None = None) -> RedisServer:
    """A running redis-server on `port` (default: a free one), logging to tmp_dir."""
    if not REDIS_SERVER:
        raise RuntimeError("redis-server is not installed (Debian: apt install redis-server)")
    port = port or free_port()
    server = RedisServer(port, Path(tmp_dir) / f"redis-{port}.log")
    server.start()
    return server
