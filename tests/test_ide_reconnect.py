"""ide.py reconnects by itself (issue 12): a drop is followed by a resume, and the turn goes on.

    ide.py (a child process) ⇄ gateway(s), SIGKILLed and started again → agent → llm_proxy → fake_llm
    ide.py (a child process) ⇄ a scripted gateway (a small aiohttp app here), for the exact frames

Each test runs `python ide.py` as a user does, types into its stdin, reads its stdout and stderr
as they come, and drops its connection under it: by killing every gateway process and starting
them again on the same ports, or, where the moment must be exact, from a scripted gateway that
aborts the socket at a chosen frame.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import os
import re
import shlex
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from conftest import ROOT, Stack
from protocol import notification, request, result
from test_e2e import PROMPT, demo_copy, logged_version
from test_tools_e2e import TWELVE, TWO_HUNKS, calling

WAIT_S = 30.0  # a hang bound for anything awaited here, not a speed assertion
LOST, RESUMED = "connection lost, resuming", "[resumed"  # what ide.py says on stderr
NOT_TWICE = "asked again after the resume: not run twice"
Frame = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# ide.py as a child process, and gateways that go away
# ---------------------------------------------------------------------------------------------


class IdeProcess:
    """`python ide.py ARGS`: its stdout and stderr collected as they come, its stdin a pipe."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.streams = {"out": "", "err": ""}
        assert process.stdout is not None and process.stderr is not None
        self.readers = [asyncio.create_task(self.collect("out", process.stdout)), asyncio.create_task(self.collect("err", process.stderr))]

    @property
    def out(self) -> str:
        return self.streams["out"]

    @property
    def err(self) -> str:
        return self.streams["err"]

    async def collect(self, name: str, stream: asyncio.StreamReader) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # "…" may be cut between reads
        while chunk := await stream.read(4096):
            self.streams[name] += decoder.decode(chunk)

    async def wait_for(self, name: str, text: str, count: int = 1) -> None:
        """Until `text` has shown `count` times on stdout ("out") or stderr ("err")."""
        deadline = time.monotonic() + WAIT_S
        while self.streams[name].count(text) < count:
            assert self.process.returncode is None, f"ide.py exited {self.process.returncode} before {text!r}:\n{self}"
            assert time.monotonic() < deadline, f"no {text!r} on std{name} after {WAIT_S} s:\n{self}"
            await asyncio.sleep(0.02)

    def type(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")

    async def end_input(self) -> None:
        """Ctrl-D."""
        assert self.process.stdin is not None
        self.process.stdin.close()

    async def exit_status(self) -> int:
        try:
            status = await asyncio.wait_for(self.process.wait(), WAIT_S)
        except TimeoutError:
            raise AssertionError(f"ide.py still running after {WAIT_S} s:\n{self!r}") from None
        await asyncio.gather(*self.readers)
        return status

    def __repr__(self) -> str:  # what a failed assertion shows
        return f"--- stdout\n{self.out}\n--- stderr\n{self.err}"


@pytest.fixture
async def launch() -> AsyncIterator[Callable[..., Awaitable[IdeProcess]]]:
    """Start `python ide.py ARGS` (env: os.environ, or the one given); each is killed at the end."""
    started: list[IdeProcess] = []

    async def start(*args: str, env: dict[str, str] | None = None) -> IdeProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "ide.py"), *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        started.append(IdeProcess(process))
        return started[-1]

    yield start
    for ide in started:
        if ide.process.returncode is None:
            ide.process.kill()
            await ide.process.wait()
        await asyncio.gather(*ide.readers)


def ide_args(stack: Stack, workspace: Path, *more: str) -> list[str]:
    return ["--workspace", str(workspace), "--gateway", stack.ws_url, "--token", stack.token, *more]


async def kill_gateways(stack: Stack) -> None:
    """SIGKILL every gateway: its sockets end with no close frame, as in a crash."""

    def kill() -> None:
        for gateway in stack.replicas("gateway"):
            gateway.process.kill()
            gateway.process.wait(5)

    await asyncio.to_thread(kill)


async def start_gateways(stack: Stack) -> None:
    """Start every gateway again, on its own port, and wait until each answers /healthz."""

    def start() -> None:
        for gateway in stack.replicas("gateway"):
            stack.restart(gateway.name)

    await asyncio.to_thread(start)


def slow_git(tmp_path: Path, marker: Path) -> dict[str, str]:
    """An environment whose `git` touches `marker`, waits half a second, then runs the real git:
    an apply_patch (three git runs) is still at work a second after it began."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    git = bin_dir / "git"
    git.write_text(f"#!/bin/sh\ntouch {shlex.quote(str(marker))}\nsleep 0.5\nexec {shlex.quote(shutil.which('git') or 'git')} \"$@\"\n")
    git.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


async def appears(path: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# A gateway restarted under a running turn
# ---------------------------------------------------------------------------------------------


async def test_gateway_killed_while_the_model_streams_the_turn_finishes_patch_applied_once(stack: Stack, tmp_path: Path, launch: Any) -> None:
    """Killed while the patch is streaming in; started again: ide.py resumes, applies it once, exits 0, prints nothing twice."""
    workspace = demo_copy(tmp_path)
    original = (workspace / "src" / "auth.js").read_text()
    ide = await launch(*ide_args(stack, workspace, "--yes", PROMPT + " [delay:30]"))
    await ide.wait_for("out", "Here is a patch")  # the model is writing the diff, 12 characters a chunk
    await kill_gateways(stack)
    await ide.wait_for("err", LOST)
    await start_gateways(stack)
    assert await ide.exit_status() == 0, ide
    assert (workspace / "src" / "auth.js").read_text() == logged_version(original)
    assert ide.err.count("[tool] apply_patch src/auth.js -> ok") == 1 and RESUMED in ide.err, ide
    for sentence in ("I'll start by reading", "Here is a patch", "Done: I added logging"):
        assert ide.out.count(sentence) == 1, ide


async def test_gateway_killed_while_the_patch_is_applied_resent_request_not_applied_twice(stack: Stack, tmp_path: Path, launch: Any) -> None:
    """Killed while apply_patch runs: its answer is lost, the request comes again after the resume, and is answered from the record."""
    workspace = demo_copy(tmp_path)
    original = (workspace / "src" / "auth.js").read_text()
    marker = tmp_path / "git-started"
    ide = await launch(*ide_args(stack, workspace, "--yes", PROMPT), env=slow_git(tmp_path, marker))
    await appears(marker)  # the patch is being applied: its answer will find no gateway
    await kill_gateways(stack)
    await ide.wait_for("err", LOST)
    await ide.wait_for("err", "[tool] apply_patch src/auth.js -> ok")  # done, and its answer kept, while no gateway runs
    await start_gateways(stack)
    assert await ide.exit_status() == 0, ide
    assert (workspace / "src" / "auth.js").read_text() == logged_version(original)
    assert ide.err.count("[tool] apply_patch") == 2 and NOT_TWICE in ide.err, ide  # run once, asked twice
    assert "Done: I added logging to src/auth.js" in ide.out, ide


@pytest.mark.parametrize(
    ("call", "before", "after", "question", "outcome"),
    [
        (calling("apply_patch_review", diff=TWO_HUNKS), ["y"], ["n"], "Apply this hunk?", '"accepted": [0], "applied": true, "files": ["t.txt"], "rejected": [1]'),
        (calling("prompt_user", message="Which colour?", options=["red", "blue"]), [], ["blue"], "answer (empty to decline)", '"answer": "blue", "declined": false'),
    ],
    ids=["apply_patch_review", "prompt_user"],
)
async def test_drop_while_the_user_answers_keeps_the_answers_and_asks_once(
    stack: Stack, tmp_path: Path, launch: Any, call: str, before: list[str], after: list[str], question: str, outcome: str
) -> None:
    """The user answers part before the drop and the rest after the resume: one question each, the answer reaches the model."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "t.txt").write_text(TWELVE)
    ide = await launch(*ide_args(stack, workspace, call))
    await ide.wait_for("err", question)
    for answer in before:
        ide.type(answer)
    await ide.wait_for("err", question, count=len(before) + 1)  # the next question waits for the user
    await kill_gateways(stack)
    await ide.wait_for("err", LOST)
    await start_gateways(stack)
    await ide.wait_for("err", NOT_TWICE)  # the request came again: it is still the same question
    for answer in after:
        ide.type(answer)
    assert await ide.exit_status() == 0, ide
    assert outcome in ide.out, ide
    assert ide.err.count(question) == len(before) + len(after), ide
    if before == ["y"]:
        assert (workspace / "t.txt").read_text() == TWELVE.replace("line 2\n", "LINE 2\n")


async def test_prompt_loop_remembers_the_conversation_across_a_restart(stack: Stack, tmp_path: Path, launch: Any) -> None:
    """Two turns with the gateways killed between them, the second typed while they are down: it is remembered."""
    ide = await launch(*ide_args(stack, tmp_path))
    ide.type("[scenario:chat] my name is Ada")
    await ide.wait_for("out", "This is your first message.")
    await kill_gateways(stack)
    await ide.wait_for("err", LOST)  # seen while idle at the prompt
    ide.type("[scenario:chat] what is my name?")
    await start_gateways(stack)
    await ide.wait_for("out", "Earlier you said: [scenario:chat] my name is Ada.")
    await ide.end_input()
    assert await ide.exit_status() == 0, ide
    assert RESUMED in ide.err, ide


async def test_ctrl_c_while_the_gateway_is_down_cancels_the_run_after_the_resume(stack: Stack, tmp_path: Path, launch: Any) -> None:
    """Ctrl-C with no socket up: the cancel goes out once the session is resumed, and the run ends cancelled."""
    ide = await launch(*ide_args(stack, tmp_path, "[delay:50] [tokens:400]"))
    await ide.wait_for("out", " t3")
    await kill_gateways(stack)
    await ide.wait_for("err", LOST)
    ide.process.send_signal(signal.SIGINT)
    await ide.wait_for("err", "[cancelling")
    await start_gateways(stack)
    assert await ide.exit_status() == 1, ide
    assert "[cancelled]" in ide.err and RESUMED in ide.err and " t399" not in ide.out, ide


async def test_gateway_gone_for_good_exits_3_within_the_bound(stack: Stack, tmp_path: Path, launch: Any) -> None:
    """No gateway comes back: ide.py tries for --reconnect-for seconds, then exits 3 saying why."""
    ide = await launch(*ide_args(stack, tmp_path, "--reconnect-for", "2", "[delay:50] [tokens:400]"))
    await ide.wait_for("out", " t3")
    try:
        await kill_gateways(stack)
        dropped = time.monotonic()
        assert await ide.exit_status() == 3, ide
        assert 1.5 <= time.monotonic() - dropped < 2 + 5, "the bound is --reconnect-for"
        assert LOST in ide.err and "could not resume within 2 s (--reconnect-for)" in ide.err, ide
    finally:
        await start_gateways(stack)


async def test_session_taken_over_by_another_connection_4409_ide_stops(stack: Stack, tmp_path: Path, launch: Any) -> None:
    """Another connection resumes ide.py's session: ide.py is closed with 4409, says so, exits 1 and does not take it back."""
    ide = await launch(*ide_args(stack, tmp_path, calling("prompt_user", message="Still there?")))
    await ide.wait_for("err", "answer (empty to decline)")
    await kill_gateways(stack)  # a resume shows the session id, which the other connection needs
    await start_gateways(stack)
    await ide.wait_for("err", RESUMED)
    session_id = re.findall(r"session (ses_\w+)", ide.err)[0]
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(stack.ws_url, headers={"Authorization": f"Bearer {stack.token}"}) as other:
            await other.send_str(request(1, "resume", {"session_id": session_id, "last_seq": 0}))
            assert await ide.exit_status() == 1, ide
            assert "another connection took this conversation over" in ide.err and ide.err.count(LOST) == 1, ide
            resumed = await frame_until(other, lambda f: "result" in f)
            asked = await frame_until(other, lambda f: "id" in f and "method" in f)  # the question still waiting: the run went on
            assert resumed["result"]["session_id"] == session_id and asked["method"] == "prompt_user", (resumed, asked)
            await other.send_str(result(asked["id"], {"answer": "yes", "declined": False}))
            end = await frame_until(other, lambda f: f.get("method") == "final")
            assert end["params"]["status"] == "completed", end


async def frame_until(ws: aiohttp.ClientWebSocketResponse, wanted: Callable[[Frame], bool]) -> Frame:
    while not wanted(frame := json.loads((await ws.receive(timeout=WAIT_S)).data)):
        pass
    return frame


# ---------------------------------------------------------------------------------------------
# A scripted gateway: the exact frames around a drop
# ---------------------------------------------------------------------------------------------

Script = Callable[[web.WebSocketResponse, web.Request], Awaitable[None]]  # plays one socket


class ScriptedGateway:
    """Plays one script per socket, in the order ide.py opens them; a failed check is kept in
    `errors` (an exception in a handler would only reach aiohttp's log)."""

    def __init__(self, scripts: list[Script]) -> None:
        self.scripts = scripts
        self.errors: list[BaseException] = []
        self.url = ""

    async def handle(self, req: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(req)
        try:
            await self.scripts.pop(0)(ws, req)
        except BaseException as exc:
            self.errors.append(exc)
            raise
        return ws


@pytest.fixture
async def scripted(aiohttp_server: Any) -> Callable[..., Awaitable[ScriptedGateway]]:
    async def start(*scripts: Script) -> ScriptedGateway:
        gateway = ScriptedGateway(list(scripts))
        app = web.Application()
        app.router.add_get("/ws", gateway.handle)
        server = await aiohttp_server(app)
        gateway.url = f"ws://127.0.0.1:{server.port}/ws"
        return gateway

    return start


async def recv(ws: web.WebSocketResponse) -> Frame:
    return json.loads(await asyncio.wait_for(ws.receive_str(), WAIT_S))


def drop(req: web.Request) -> None:
    """End the socket with no close frame, as a dead network does."""
    assert req.transport is not None
    req.transport.abort()


async def expect_resume(ws: web.WebSocketResponse, last_seq: int, session_id: str = "ses_s") -> Frame:
    frame = await recv(ws)
    assert frame["method"] == "resume" and frame["params"] == {"session_id": session_id, "last_seq": last_seq}, frame
    return frame


async def started(ws: web.WebSocketResponse, session_id: str = "ses_s") -> None:
    """Take the user message and answer it as the gateway does."""
    frame = await recv(ws)
    assert frame["method"] == "user_message", frame
    await ws.send_str(result(frame["id"], {"session_id": session_id, "run_id": "run_1"}))


def token(seq: int, text: str) -> str:
    return notification("token", {"run_id": "run_1", "seq": seq, "text": text})


def final(seq: int, content: str) -> str:
    return notification("final", {"run_id": "run_1", "seq": seq, "status": "completed", "content": content})


COUNTER_PATCH = "diff --git a/counter.txt b/counter.txt\n--- a/counter.txt\n+++ b/counter.txt\n@@ -1 +1,2 @@\n tick\n+tick\n"


async def test_resent_tool_request_is_answered_from_the_record_and_nothing_shows_twice(scripted: Any, tmp_path: Path, launch: Any) -> None:
    """apply_patch answered, then a drop; after the resume the same request comes again: the same answer, not a second patch."""
    answers: list[str] = []

    async def first(ws: web.WebSocketResponse, req: web.Request) -> None:
        await started(ws)
        await ws.send_str(token(1, "one "))
        await ws.send_str(request("call_1", "apply_patch", {"diff": COUNTER_PATCH}))
        answers.append(await asyncio.wait_for(ws.receive_str(), WAIT_S))
        drop(req)

    async def second(ws: web.WebSocketResponse, req: web.Request) -> None:
        resume = await expect_resume(ws, last_seq=1)
        await ws.send_str(result(resume["id"], {"session_id": "ses_s", "run_id": "run_1", "last_seq": 1}))
        await ws.send_str(token(1, "one "))  # seq 1 again, which a gateway should not replay: not shown twice all the same
        await ws.send_str(request("call_1", "apply_patch", {"diff": COUNTER_PATCH}))  # the agent never got the answer
        answers.append(await asyncio.wait_for(ws.receive_str(), WAIT_S))
        await ws.send_str(token(2, "two"))
        await ws.send_str(final(3, "one two"))
        await ws.receive()

    gateway = await scripted(first, second)
    (tmp_path / "counter.txt").write_text("tick\n")
    ide = await launch("--workspace", str(tmp_path), "--gateway", gateway.url, "--token", "t", "--yes", "count")
    assert await ide.exit_status() == 0, ide
    assert not gateway.errors, gateway.errors
    assert (tmp_path / "counter.txt").read_text() == "tick\ntick\n"
    assert answers[0] == answers[1] and json.loads(answers[0])["result"] == {"applied": True, "files": ["counter.txt"]}, answers
    assert ide.out.count("one") == 1 and "two" in ide.out, ide
    assert ide.err.count("[tool] apply_patch") == 2 and NOT_TWICE in ide.err and RESUMED in ide.err, ide


async def test_last_seq_too_old_resumes_from_the_oldest_kept_and_says_output_was_lost(scripted: Any, tmp_path: Path, launch: Any) -> None:
    """-32003 with oldest_seq 5: ide.py tells the user and resumes again from seq 4 on the same socket."""

    async def first(ws: web.WebSocketResponse, req: web.Request) -> None:
        await started(ws)
        await ws.send_str(token(1, "alpha "))
        await asyncio.sleep(0.2)  # shown before the drop
        drop(req)

    async def second(ws: web.WebSocketResponse, req: web.Request) -> None:
        resume = await expect_resume(ws, last_seq=1)
        await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": resume["id"], "error": {"code": -32003, "message": "too old", "data": {"oldest_seq": 5}}}))
        resume = await expect_resume(ws, last_seq=4)
        await ws.send_str(result(resume["id"], {"session_id": "ses_s", "run_id": "run_1", "last_seq": 5}))
        await ws.send_str(token(5, "epsilon"))
        await ws.send_str(final(6, "alpha ... epsilon"))
        await ws.receive()

    gateway = await scripted(first, second)
    ide = await launch("--workspace", str(tmp_path), "--gateway", gateway.url, "--token", "t", "go")
    assert await ide.exit_status() == 0, ide
    assert not gateway.errors, gateway.errors
    assert "some output was lost" in ide.err and "alpha" in ide.out and "epsilon" in ide.out, ide


async def test_session_unknown_after_a_drop_one_turn_exits_1_prompt_loop_starts_over(scripted: Any, tmp_path: Path, launch: Any) -> None:
    """-32002: the prompt loop says the conversation was lost, and the next line starts a new one on the same socket."""

    async def first(ws: web.WebSocketResponse, req: web.Request) -> None:
        await started(ws)
        await ws.send_str(final(1, "first answer"))
        await asyncio.sleep(0.2)
        drop(req)  # while idle at the prompt

    async def second(ws: web.WebSocketResponse, req: web.Request) -> None:
        resume = await expect_resume(ws, last_seq=1)
        await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": resume["id"], "error": {"code": -32002, "message": "Unknown or expired session"}}))
        await started(ws, "ses_new")
        await ws.send_str(final(1, "a fresh start"))
        await ws.receive()

    gateway = await scripted(first, second)
    ide = await launch("--workspace", str(tmp_path), "--gateway", gateway.url, "--token", "t")
    ide.type("hello")
    await ide.wait_for("err", "your next message starts a new conversation")
    ide.type("hello again")
    await ide.wait_for("out", "a fresh start")
    await ide.end_input()
    assert await ide.exit_status() == 0, ide
    assert not gateway.errors, gateway.errors

    async def lost(ws: web.WebSocketResponse, req: web.Request) -> None:
        resume = await expect_resume(ws, last_seq=0)
        await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": resume["id"], "error": {"code": -32002, "message": "Unknown or expired session"}}))
        await ws.receive()

    async def dropped(ws: web.WebSocketResponse, req: web.Request) -> None:
        await started(ws)
        drop(req)

    gateway = await scripted(dropped, lost)
    ide = await launch("--workspace", str(tmp_path), "--gateway", gateway.url, "--token", "t", "hello")
    assert await ide.exit_status() == 1, ide
    assert "no longer has this conversation" in ide.err, ide


async def test_drop_before_the_message_was_answered_sends_it_again(scripted: Any, tmp_path: Path, launch: Any) -> None:
    """No session id yet, so nothing to resume: the new socket gets the user message again."""

    async def first(ws: web.WebSocketResponse, req: web.Request) -> None:
        await recv(ws)  # the user message, never answered
        drop(req)

    async def second(ws: web.WebSocketResponse, req: web.Request) -> None:
        await started(ws)
        await ws.send_str(final(1, "got it"))
        await ws.receive()

    gateway = await scripted(first, second)
    ide = await launch("--workspace", str(tmp_path), "--gateway", gateway.url, "--token", "t", "hello")
    assert await ide.exit_status() == 0, ide
    assert not gateway.errors, gateway.errors
    assert "got it" in ide.out, ide
