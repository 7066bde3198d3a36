"""The walking skeleton end to end: ide.py ⇄ gateway → agent → llm_proxy → fake_llm, real sockets."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

import ide
from conftest import ROOT, Stack


@pytest.fixture(scope="module", params=["memory", "redis"])
def stack_mode(request: pytest.FixtureRequest) -> str:
    """Every test here runs twice: one of each service, then two gateways and two agents on Redis behind nginx."""
    return request.param


DEMO = ROOT / "examples" / "demo"
PROMPT = "Add logging to src/auth.js"
CLI_TIMEOUT_S = 60  # a hang bound for one whole CLI turn on a slow machine


def demo_copy(tmp_path: Path) -> Path:
    workspace = tmp_path / "demo"
    shutil.copytree(DEMO, workspace)
    return workspace


def logged_version(original: str) -> str:
    """What the demo patch must make of auth.js: a console.log line opening each function."""
    out = []
    for line in original.splitlines(keepends=True):
        out.append(line)
        if line.startswith("function "):
            name = line.split()[1].split("(")[0]
            out.append(f"  console.log('[{name}] called');\n")
    return "".join(out)


async def test_demo_turn_reads_then_patches_and_remembers(stack: Stack, tmp_path: Path) -> None:
    """Tokens stream, read_file then apply_patch run on disk, final completes, turn two sees turn one."""
    workspace = demo_copy(tmp_path)
    original = (workspace / "src" / "auth.js").read_text()
    out, note = io.StringIO(), io.StringIO()
    async with aiohttp.ClientSession() as http:
        ws = await ide.connect(http, stack.ws_url, stack.token)
        # [delay:2] paces the fake model, so tokens arrive one by one instead of coalesced
        turn = await ide.play_turn(ws, PROMPT + " [delay:2]", ide.Workspace(workspace), out=out, note=note)
        assert turn.status == "completed", (turn, note.getvalue())
        assert len(turn.tokens) >= 5
        assert turn.tools == ["read_file", "apply_patch"]
        assert (workspace / "src" / "auth.js").read_text() == logged_version(original)
        assert turn.content.startswith("Done: I added logging to src/auth.js")
        assert out.getvalue().startswith("I'll start by reading `src/auth.js`.\nHere is a patch")

        second = await ide.play_turn(ws, "[scenario:chat] and what did I ask first?", ide.Workspace(workspace), out=io.StringIO(), note=io.StringIO(), request_id=2)
        assert second.status == "completed"
        assert f"Earlier you said: {PROMPT} [delay:2]" in second.content
        assert second.session_id == turn.session_id and second.run_id != turn.run_id


def test_cli_demo_with_generated_token(make_stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """No GATEWAY_TOKEN anywhere: the gateway makes one, ide.py finds it, the demo exits 0.

    One gateway, always: a generated token is per process, so replicas must share a GATEWAY_TOKEN."""
    stack: Stack = make_stack({"GATEWAY_TOKEN": ""}, scale="memory")
    workspace = demo_copy(tmp_path)
    original = (workspace / "src" / "auth.js").read_text()
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_TOKEN"}
    env["GATEWAY_RUNTIME_DIR"] = str(tmp_path / "runtime")
    token_file = tmp_path / "runtime" / f"gateway-{stack['gateway'].port}.json"
    assert token_file.stat().st_mode & 0o777 == 0o600
    done = subprocess.run(
        [sys.executable, str(ROOT / "ide.py"), "--workspace", str(workspace), "--gateway", stack.ws_url, PROMPT],
        env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    assert "I'll start by reading `src/auth.js`." in done.stdout
    assert "Done: I added logging to src/auth.js" in done.stdout
    assert "[tool] read_file src/auth.js -> ok" in done.stderr
    assert (workspace / "src" / "auth.js").read_text() == logged_version(original)
    for service in stack.services.values():
        assert token_file.read_text() not in service.log()


def test_cli_error_exits_nonzero_with_message(make_stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An upstream 401 reaches the user as `error [llm_error]` and a non-zero exit."""
    stack: Stack = make_stack()
    done = subprocess.run(
        [sys.executable, str(ROOT / "ide.py"), "--workspace", str(tmp_path), "--gateway", stack.ws_url, "--token", stack.token, "hi [fail:401x5]"],
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )
    assert done.returncode == 1
    assert "error [llm_error]" in done.stderr and "401" in done.stderr


def test_cli_wrong_token_exits_2(stack: Stack, tmp_path: Path) -> None:
    """A refused token is a usage error with the gateway's reason."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "ide.py"), "--workspace", str(tmp_path), "--gateway", stack.ws_url, "--token", "nope", "hi"],
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
    )
    assert done.returncode == 2
    assert "token" in done.stderr
