"""nginx in front of the gateways and agents, for scaled-out tests: deploy/nginx.sh in a tmp dir.

    proxy = start_nginx(tmp_path, gateway_ports=[p1, p2], agent_ports=[p3, p4])  # waits until it listens
    proxy.ws_url                # ws://127.0.0.1:PORT/ws: the IDE's door, balanced over the gateways
    proxy.agent_url             # http://127.0.0.1:PORT: the gateways' AGENT_URL, balanced over the agents
    proxy.access_log()          # a line per request, naming the replica that answered (upstream=...)
    proxy.stop()  /  proxy.start()

It runs the very script Procfile.scale runs (deploy/nginx.sh, which renders
deploy/nginx.conf.template), so the tests exercise the configuration a user gets. Everything it
writes stays under tmp_dir/nginx-PORT. Needs nginx (Debian: apt install nginx-light).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from servers import free_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy" / "nginx.sh"
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin") or ""  # "" when not installed
START_TIMEOUT_S = 10.0  # a cold, busy 2-core machine


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Nginx:
    ws_port: int
    agent_port: int
    gateway_ports: list[int]
    agent_ports: list[int]
    prefix: Path  # conf/, logs/, tmp/ live here
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/ws"

    @property
    def agent_url(self) -> str:
        return f"http://127.0.0.1:{self.agent_port}"

    @property
    def log_path(self) -> Path:
        return self.prefix / "nginx.log"  # stderr: the error log, and the script's own complaints

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def access_log(self) -> str:
        path = self.prefix / "logs" / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        """Start (or start again) on the same ports; return once both ports accept connections."""
        assert self.process is None or self.process.poll() is not None, "already running"
        command = ["sh", str(SCRIPT), str(self.prefix), str(self.ws_port), str(self.agent_port),
                   ",".join(map(str, self.gateway_ports)), ",".join(map(str, self.agent_ports))]
        self.prefix.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # Its own process group: should the master ever need SIGKILL, its workers go with it.
            self.process = subprocess.Popen(command, env={**os.environ, "NGINX_BIN": NGINX}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (listening(self.ws_port) and listening(self.agent_port)):
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nginx did not listen on {self.ws_port} and {self.agent_port} within {START_TIMEOUT_S:g} s:\n{self.log()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM (nginx's fast shutdown: open sockets close at once), then SIGKILL to the group."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


def start_nginx(tmp_dir: Path, gateway_ports: list[int], agent_ports: list[int]) -> Nginx:
    """A running nginx on two free ports: WebSockets to `gateway_ports`, HTTP to `agent_ports`."""
    if not NGINX:
        raise RuntimeError("nginx is not installed (Debian: apt install nginx-light; `make test` does it)")
    ws_port, agent_port = free_port(), free_port()
    proxy = Nginx(ws_port, agent_port, list(gateway_ports), list(agent_ports), Path(tmp_dir) / f"nginx-{ws_port}")
    proxy.start()
    return proxy
