"""The six tools end to end: a fake_llm [call:...] → llm_proxy → agent → gateway → ide.py → disk,
and the tool's result (or error) back to the model, which echoes it as `NAME returned: JSON`."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import ide
from conftest import Stack
from test_ide_tools import scripted  # one scripted ask() for both tool suites


@pytest.fixture(scope="module", params=["memory", "redis"])
def stack_mode(request: pytest.FixtureRequest) -> str:
    """Every test here runs twice: one of each service, then two gateways and two agents on Redis behind nginx."""
    return request.param

TURN_TIMEOUT_S = 30  # a hang bound for one whole turn; a healthy one takes well under a second


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def calling(name: str, **arguments: Any) -> str:
    """The fake model's marker for one tool call; json.dumps escapes a diff's newlines as \\n."""
    return "[call:" + json.dumps({"name": name, "arguments": arguments}) + "]"


async def drive(stack: Stack, root: Path, prompt: str, **workspace_kwargs: Any) -> tuple[ide.TurnResult, Any]:
    """One completed turn on a fresh socket; the JSON after "returned: " in the final (None if absent)."""
    workspace = ide.Workspace(root, **{"ui": io.StringIO(), **workspace_kwargs})
    async with aiohttp.ClientSession() as http:
        async with await ide.connect(http, stack.ws_url, stack.token) as ws:
            turn = await asyncio.wait_for(ide.play_turn(ws, prompt, workspace, out=io.StringIO(), note=io.StringIO()), TURN_TIMEOUT_S)
    assert turn.status == "completed", turn
    _, found, returned = turn.content.partition(" returned: ")
    return turn, json.loads(returned) if found else None


def git(root: Path, *args: str) -> str:
    """git with an identity given on the command line: the user's global config is left alone."""
    command = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "-c", "commit.gpgsign=false", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    return subprocess.run(command, cwd=root, env=env, check=True, capture_output=True, text=True).stdout


def workspace(tmp_path: Path, **files: str) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def repo(tmp_path: Path, **files: str) -> Path:
    """A workspace that is a git repository with `files` committed."""
    root = workspace(tmp_path, **files)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "first")
    return root


def outside_state(tmp_path: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under tmp_path but outside the workspace: its bytes and mtime (links not followed)."""
    state: dict[str, tuple[bytes, int]] = {}
    for folder, dirs, names in os.walk(tmp_path):
        dirs[:] = [d for d in dirs if Path(folder, d) != tmp_path / "ws"]
        for name in names:
            path = Path(folder, name)
            state[str(path.relative_to(tmp_path))] = (path.read_bytes(), path.stat().st_mtime_ns)
    return state


TWELVE = "".join(f"line {n}\n" for n in range(1, 13))
TWO_HUNKS = """diff --git a/t.txt b/t.txt
--- a/t.txt
+++ b/t.txt
@@ -1,5 +1,5 @@
 line 1
-line 2
+LINE 2
 line 3
 line 4
 line 5
@@ -8,5 +8,5 @@
 line 8
 line 9
 line 10
-line 11
+LINE 11
 line 12
"""


# ---------------------------------------------------------------------------------------------
# read_file, write_file
# ---------------------------------------------------------------------------------------------


async def test_read_file_line_range_reaches_model(stack: Stack, tmp_path: Path) -> None:
    """read_file lines 2..3 of 5: the model gets those lines and the file's total line count."""
    root = workspace(tmp_path, **{"notes.txt": "one\ntwo\nthree\nfour\nfive\n"})
    turn, got = await drive(stack, root, calling("read_file", path="notes.txt", start_line=2, end_line=3))
    assert turn.tools == ["read_file"]
    assert turn.content.startswith("read_file returned: ")
    assert got == {"path": "notes.txt", "content": "two\nthree\n", "start_line": 2, "end_line": 3, "total_lines": 5, "truncated": False}


async def test_read_file_not_found_is_data_for_model(stack: Stack, tmp_path: Path) -> None:
    """A missing file reaches the model as {"error": {"code": -32011, ...}} and the run completes."""
    root = workspace(tmp_path)
    turn, got = await drive(stack, root, calling("read_file", path="missing.txt"))
    assert turn.status == "completed"
    assert got["error"]["code"] == -32011
    assert "missing.txt" in got["error"]["message"]


async def test_write_file_creates_nested_then_overwrites(stack: Stack, tmp_path: Path) -> None:
    """write_file makes parent directories (created: true), then overwrites (created: false)."""
    root = workspace(tmp_path)
    _, first = await drive(stack, root, calling("write_file", path="src/deep/new.txt", content="héllo\n"))
    assert first == {"path": "src/deep/new.txt", "created": True, "bytes_written": 7}
    assert (root / "src" / "deep" / "new.txt").read_text() == "héllo\n"

    _, second = await drive(stack, root, calling("write_file", path="src/deep/new.txt", content="bye\n"))
    assert second == {"path": "src/deep/new.txt", "created": False, "bytes_written": 4}
    assert (root / "src" / "deep" / "new.txt").read_text() == "bye\n"


async def test_write_then_read_in_two_steps(stack: Stack, tmp_path: Path) -> None:
    """Two [call:] markers are two model steps: the read sees what the write put on disk."""
    root = workspace(tmp_path)
    prompt = calling("write_file", path="a.txt", content="fresh\n") + " " + calling("read_file", path="a.txt")
    turn, got = await drive(stack, root, prompt)
    assert turn.tools == ["write_file", "read_file"]
    assert got["content"] == "fresh\n" and got["total_lines"] == 1


async def test_parallel_step_answers_both_reads(stack: Stack, tmp_path: Path) -> None:
    """One model message with two read_file calls: both are answered and the final names both."""
    root = workspace(tmp_path, **{"a.txt": "alpha\n", "b.txt": "beta\n"})
    turn, _ = await drive(stack, root, "[scenario:parallel] compare a.txt and b.txt")
    assert turn.tools == ["read_file", "read_file"]
    assert turn.content == "Read 2 files: a.txt, b.txt."


async def test_read_file_of_control_characters_reaches_model(make_stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A 200 kB file of \\x01 (1.2 MB once JSON-escaped) reaches the model cut to the cap, not lost at the frame limit."""
    stack: Stack = make_stack({"TOOL_TIMEOUT_S": "3"})  # the lost answer shows as a timeout in 3 s, not 300
    root = workspace(tmp_path, **{"ctrl.txt": "\x01" * 200_000 + "\n"})
    turn, got = await drive(stack, root, calling("read_file", path="ctrl.txt"))
    assert turn.tools == ["read_file"]
    assert "error" not in got, got["error"]  # was: {"code": "tool_timeout", ...}
    assert got["truncated"] is True
    assert 0 < len(got["content"]) < 200_000 and set(got["content"]) == {"\x01"}


# ---------------------------------------------------------------------------------------------
# git.diff
# ---------------------------------------------------------------------------------------------


async def test_git_diff_unstaged_reaches_model(stack: Stack, tmp_path: Path) -> None:
    """git_diff with no arguments: the working tree's unstaged change, not the staged one."""
    root = repo(tmp_path, **{"a.txt": "one\n", "b.txt": "bee\n"})
    (root / "a.txt").write_text("one\ntwo\n")
    (root / "b.txt").write_text("staged\n")
    git(root, "add", "b.txt")
    turn, got = await drive(stack, root, calling("git_diff"))
    assert turn.tools == ["git.diff"]
    assert turn.content.startswith("git_diff returned: ")
    assert got["truncated"] is False
    assert "diff --git a/a.txt b/a.txt" in got["diff"] and "+two\n" in got["diff"]
    assert "b.txt" not in got["diff"]


async def test_git_diff_option_like_base_is_bad_ref_and_runs_nothing(stack: Stack, tmp_path: Path) -> None:
    """A base starting with "-" is bad_ref: git never reads it as --output, so no file is written."""
    root = repo(tmp_path, **{"a.txt": "one\n"})
    (root / "a.txt").write_text("changed\n")
    written = tmp_path / "pwned.diff"
    _, got = await drive(stack, root, calling("git_diff", base=f"--output={written}"))
    assert got["error"]["code"] == -32018
    assert not written.exists()


# ---------------------------------------------------------------------------------------------
# apply_patch, apply_patch_review
# ---------------------------------------------------------------------------------------------


async def test_apply_patch_changes_file(stack: Stack, tmp_path: Path) -> None:
    """A valid diff is applied on disk and the model gets {applied: true, files}."""
    root = workspace(tmp_path, **{"a.txt": "one\ntwo\nthree\n"})
    diff = "diff --git a/a.txt b/a.txt\n--- a/a.txt\n+++ b/a.txt\n@@ -1,3 +1,3 @@\n one\n-two\n+TWO\n three\n"
    turn, got = await drive(stack, root, calling("apply_patch", diff=diff))
    assert turn.tools == ["apply_patch"]
    assert got == {"applied": True, "files": ["a.txt"]}
    assert (root / "a.txt").read_text() == "one\nTWO\nthree\n"


async def test_apply_patch_second_file_fails_changes_neither(stack: Stack, tmp_path: Path) -> None:
    """The second file's hunk does not fit: both files stay as they were, patch_failed names b.txt."""
    root = workspace(tmp_path, **{"a.txt": "one\ntwo\nthree\n", "b.txt": "alpha\nbeta\ngamma\n"})
    diff = (
        "diff --git a/a.txt b/a.txt\n--- a/a.txt\n+++ b/a.txt\n@@ -1,3 +1,3 @@\n one\n-two\n+TWO\n three\n"
        "diff --git a/b.txt b/b.txt\n--- a/b.txt\n+++ b/b.txt\n@@ -1,3 +1,3 @@\n alpha\n-not here\n+BETA\n gamma\n"
    )
    _, got = await drive(stack, root, calling("apply_patch", diff=diff))
    assert got["error"]["code"] == -32021
    assert "b.txt" in got["error"]["message"]
    assert got["error"]["data"]["file"] == "b.txt"
    assert (root / "a.txt").read_text() == "one\ntwo\nthree\n"
    assert (root / "b.txt").read_text() == "alpha\nbeta\ngamma\n"


async def test_apply_patch_review_yes_applies_all(stack: Stack, tmp_path: Path) -> None:
    """Policy YES: every hunk accepted and applied."""
    root = workspace(tmp_path, **{"t.txt": TWELVE})
    _, got = await drive(stack, root, calling("apply_patch_review", diff=TWO_HUNKS, message="Two fixes"), policy=ide.YES)
    assert got == {"accepted": [0, 1], "rejected": [], "applied": True, "files": ["t.txt"]}
    assert (root / "t.txt").read_text() == TWELVE.replace("line 2\n", "LINE 2\n").replace("line 11\n", "LINE 11\n")


async def test_apply_patch_review_no_applies_nothing(stack: Stack, tmp_path: Path) -> None:
    """Policy NO: every hunk rejected, nothing applied, the file unchanged."""
    root = workspace(tmp_path, **{"t.txt": TWELVE})
    _, got = await drive(stack, root, calling("apply_patch_review", diff=TWO_HUNKS), policy=ide.NO)
    assert got == {"accepted": [], "rejected": [0, 1], "applied": False, "files": []}
    assert (root / "t.txt").read_text() == TWELVE


async def test_apply_patch_review_accept_first_reject_second(stack: Stack, tmp_path: Path) -> None:
    """The user accepts hunk 0 and rejects hunk 1: only the first change is on disk."""
    root = workspace(tmp_path, **{"t.txt": TWELVE})
    ask = scripted("y", "n")
    _, got = await drive(stack, root, calling("apply_patch_review", diff=TWO_HUNKS), ask=ask, policy=ide.ASK)
    assert got == {"accepted": [0], "rejected": [1], "applied": True, "files": ["t.txt"]}
    assert (root / "t.txt").read_text() == TWELVE.replace("line 2\n", "LINE 2\n")
    assert len(ask.prompts) == 2  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# prompt_user
# ---------------------------------------------------------------------------------------------


async def test_prompt_user_option_answered(stack: Stack, tmp_path: Path) -> None:
    """The user picks option 2 by number: the model gets that option's text."""
    root = workspace(tmp_path)
    ask = scripted("2")
    turn, got = await drive(stack, root, calling("prompt_user", message="Deploy where?", options=["prod", "staging"]), ask=ask, policy=ide.ASK)
    assert turn.tools == ["prompt_user"]
    assert got == {"answer": "staging", "declined": False}
    assert len(ask.prompts) == 1  # type: ignore[attr-defined]


async def test_prompt_user_declined_is_a_result_not_an_error(stack: Stack, tmp_path: Path) -> None:
    """Policy NO declines: {"answer": null, "declined": true} reaches the model as a normal result."""
    root = workspace(tmp_path)
    _, got = await drive(stack, root, calling("prompt_user", message="Go on?", options=["yes", "no"]), policy=ide.NO)
    assert got == {"answer": None, "declined": True}


# ---------------------------------------------------------------------------------------------
# Path safety through the pipeline
# ---------------------------------------------------------------------------------------------

SECRET = "TOP-SECRET-4711\n"  # a content no path or message could contain by chance
ESCAPES = [  # (model tool name, arguments); {outside} is the absolute path of the outside dir
    ("read_file", {"path": "../outside/secret.txt"}),
    ("read_file", {"path": "{outside}/secret.txt"}),
    ("read_file", {"path": "link.txt"}),
    ("write_file", {"path": "link.txt", "content": "pwned\n"}),
    ("write_file", {"path": "../outside/new.txt", "content": "pwned\n"}),
    ("write_file", {"path": "{outside}/new.txt", "content": "pwned\n"}),
    ("write_file", {"path": "linkdir/new.txt", "content": "pwned\n"}),
    ("apply_patch", {"diff": "diff --git a/link.txt b/link.txt\n--- a/link.txt\n+++ b/link.txt\n@@ -1 +1 @@\n-TOP-SECRET-4711\n+pwned\n"}),
    ("apply_patch", {"diff": "--- a/../outside/secret.txt\n+++ b/../outside/secret.txt\n@@ -1 +1 @@\n-TOP-SECRET-4711\n+pwned\n"}),
    ("git_diff", {"paths": ["../outside"]}),
]


@pytest.mark.parametrize(
    ("name", "arguments"),
    ESCAPES,
    ids=["read-dotdot", "read-absolute", "read-symlink", "write-symlink", "write-dotdot", "write-absolute", "write-symlinked-dir", "patch-symlink", "patch-dotdot", "diff-dotdot"],
)
async def test_escape_is_outside_workspace_and_touches_nothing(stack: Stack, tmp_path: Path, name: str, arguments: dict[str, Any]) -> None:
    """A path leaving the workspace (.., absolute, symlink) reaches the model as outside_workspace; nothing outside is read or changed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    root = repo(tmp_path, **{"inside.txt": "inside\n"}) if name == "git_diff" else workspace(tmp_path)
    (root / "link.txt").symlink_to(outside / "secret.txt")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    before = outside_state(tmp_path)
    arguments = json.loads(json.dumps(arguments).replace("{outside}", str(outside)))

    turn, got = await drive(stack, root, calling(name, **arguments))
    assert turn.status == "completed"
    assert got["error"]["code"] == -32012, got
    assert "TOP-SECRET" not in json.dumps(got)  # the file's content never reached the model
    assert outside_state(tmp_path) == before
