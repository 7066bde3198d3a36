"""Issue 11 replayed: the model as the attacker, through the real stack (fake_llm's [call:...] →
llm_proxy → agent → gateway → ide.py → disk), and each defence of ide.py's tools checked.

Every attack must execute nothing, write nothing outside the workspace or into .git, never
leave a file half-written, and never misinform the model or the user. The race is in
test_tools_security_race.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import ide
from conftest import ROOT, Stack
from ide import ToolError, Workspace
from test_ide_tools import files_under, scripted
from test_tools_e2e import calling, drive, git, outside_state, repo, workspace

RUN_TIMEOUT_S = 60  # one `python ide.py` turn, a hang bound on a loaded 2-core machine
FILE_LIMIT = 64 * 1024  # RLIMIT_FSIZE of an IDE on a "full disk": no file may grow past it


class Tty(io.StringIO):
    """A terminal for the review's colours."""

    def isatty(self) -> bool:
        return True


def ide_run(stack: Stack, root: Path, prompt: str, file_limit: int | None = None) -> tuple[subprocess.CompletedProcess[str], Any]:
    """`python ide.py --yes PROMPT`, the way the issue replayed each attack; with `file_limit`,
    on a disk that is full past that many bytes. Returns the process and the tool result the
    model read (fake_llm echoes it as `NAME returned: JSON`)."""

    def full_disk() -> None:  # Python ignores SIGXFSZ: a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    done = subprocess.run(
        [sys.executable, str(ROOT / "ide.py"), "--workspace", str(root), "--gateway", stack.ws_url, "--token", stack.token, "--yes", prompt],
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        preexec_fn=full_disk if file_limit else None,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    _, found, returned = done.stdout.partition(" returned: ")
    return done, json.loads(returned.splitlines()[0]) if found else None


def marker_files(tmp_path: Path) -> list[str]:
    """The files a planted command would leave: their existence means the command ran."""
    return sorted(p.name for p in tmp_path.glob("ran-*"))


def plant(root: Path, tmp_path: Path) -> None:
    """A repository config that runs a command from every door issue 11 found, as if an earlier
    attack had written it (or the user had downloaded a hostile checkout), and the attributes and
    hooks that call them. Each command leaves tmp_path/ran-NAME when it runs."""

    def ran(name: str) -> str:
        return f"touch {tmp_path}/ran-{name}"

    git(root, "config", "core.fsmonitor", ran("fsmonitor"))
    git(root, "config", "diff.external", ran("external") + "; false")
    git(root, "config", "diff.evil.command", ran("diff-command") + "; false")
    git(root, "config", "diff.evil.textconv", f"sh -c '{ran('textconv')}; cat \"$0\"'")
    git(root, "config", "filter.evil.clean", f"sh -c '{ran('clean')}; cat'")
    git(root, "config", "filter.evil.smudge", f"sh -c '{ran('smudge')}; cat'")
    git(root, "config", "filter.proc.process", ran("process"))
    git(root, "config", "core.hooksPath", "hooks")
    (root / "hooks").mkdir()
    for hook in ("pre-commit", "post-index-change", "post-checkout", "pre-applypatch", "post-applypatch"):
        (root / "hooks" / hook).write_text(f"#!/bin/sh\n{ran('hook-' + hook)}\n")
        (root / "hooks" / hook).chmod(0o755)
    (root / ".gitattributes").write_text("*.txt diff=evil filter=evil\n*.md filter=proc\n")


# ---------------------------------------------------------------------------------------------
# 1. .git is off limits, and git runs no command the repository names
# ---------------------------------------------------------------------------------------------

FSMONITOR_CONFIG = '[core]\n\tfsmonitor = "touch {marker}"\n'
INTO_GIT = [  # (tool, arguments): each would plant a command for git or the user's next commit
    ("write_file", {"path": ".git/config", "content": FSMONITOR_CONFIG}),
    ("write_file", {"path": "src/../.git/hooks/pre-commit", "content": "#!/bin/sh\ntouch {marker}\n"}),
    ("write_file", {"path": ".GIT/config", "content": FSMONITOR_CONFIG}),
    ("read_file", {"path": ".git/config"}),
    ("apply_patch", {"diff": "diff --git a/.git/config b/.git/config\n--- a/.git/config\n+++ b/.git/config\n@@ -1 +1,2 @@\n [core]\n+\tfsmonitor = \"touch {marker}\"\n"}),
    ("apply_patch", {"diff": "diff --git a/a.txt b/a.txt\ncopy from a.txt\ncopy to .git/hooks/pre-commit\n"}),
    ("apply_patch", {"diff": "--- a/notes.txt\n+++ b/notes.txt\n@@ -1 +1,2 @@\n hello\n+x\ndiff -r a b\n--- a/.git/info/attributes\n+++ b/.git/info/attributes\n@@ -0,0 +1 @@\n+* filter=evil\n"}),
    ("apply_patch_review", {"diff": "diff --git a/.git/hooks/pre-commit b/.git/hooks/pre-commit\nnew file mode 100755\n--- /dev/null\n+++ b/.git/hooks/pre-commit\n@@ -0,0 +1,2 @@\n+#!/bin/sh\n+touch {marker}\n"}),
    ("git_diff", {"paths": [".git"]}),
]


@pytest.mark.parametrize(("name", "arguments"), INTO_GIT, ids=["write-config", "write-hook-dotdot", "write-config-other-case", "read-config", "patch-config", "copy-to-hook", "hidden-section", "review-new-hook", "diff-git-dir"])
async def test_git_dir_is_off_limits_to_every_tool(stack: Stack, tmp_path: Path, name: str, arguments: dict[str, Any]) -> None:
    """A path through .git is outside_workspace for every tool; .git is untouched and the git_diff after it runs nothing."""
    root = repo(tmp_path, **{"notes.txt": "hello\n", "a.txt": "a\n"})
    marker = tmp_path / "ran-planted"
    before = {p: p.read_bytes() for p in (root / ".git").rglob("*") if p.is_file()}
    arguments = json.loads(json.dumps(arguments).replace("{marker}", str(marker)))
    (root / "notes.txt").write_text("hello\nchanged\n")

    turn, got = await drive(stack, root, calling(name, **arguments) + " " + calling("git_diff"), policy=ide.YES)
    assert turn.tools == [name.replace("git_diff", "git.diff"), "git.diff"]
    assert got["diff"].startswith("diff --git a/notes.txt b/notes.txt")  # the last call's answer
    assert {p: p.read_bytes() for p in (root / ".git").rglob("*") if p.is_file() and p.name != "index"} == {p: b for p, b in before.items() if p.name != "index"}
    assert not marker.exists()
    assert (root / "notes.txt").read_text() == "hello\nchanged\n"


@pytest.mark.parametrize(("name", "arguments"), INTO_GIT, ids=["write-config", "write-hook-dotdot", "write-config-other-case", "read-config", "patch-config", "copy-to-hook", "hidden-section", "review-new-hook", "diff-git-dir"])
async def test_git_dir_refusal_reaches_the_model(stack: Stack, tmp_path: Path, name: str, arguments: dict[str, Any]) -> None:
    """The model reads outside_workspace (-32012), and nothing of .git's content."""
    root = repo(tmp_path, **{"notes.txt": "hello\n", "a.txt": "a\n"})
    _, got = await drive(stack, root, calling(name, **arguments), policy=ide.YES)
    assert got["error"]["code"] == -32012, got
    assert "[core]" not in json.dumps(got)


async def test_planted_repository_config_runs_nothing(stack: Stack, tmp_path: Path) -> None:
    """fsmonitor, external diff, textconv, clean/smudge/process filters and hooks planted in .git: git_diff, apply_patch and apply_patch_review run none of them."""
    root = repo(tmp_path, **{"notes.txt": "hello\n", "README.md": "# demo\n"})
    plant(root, tmp_path)
    (root / "notes.txt").write_text("hello\nchanged\n")
    (root / "README.md").write_text("# demo\nchanged\n")
    patch = "diff --git a/notes.txt b/notes.txt\n--- a/notes.txt\n+++ b/notes.txt\n@@ -1,2 +1,3 @@\n hello\n changed\n+patched\n"
    review = "diff --git a/README.md b/README.md\n--- a/README.md\n+++ b/README.md\n@@ -1,2 +1,3 @@\n # demo\n changed\n+reviewed\n"
    prompt = " ".join([calling("git_diff"), calling("git_diff", staged=True), calling("apply_patch", diff=patch), calling("apply_patch_review", diff=review), calling("git_diff")])

    turn, got = await drive(stack, root, prompt, policy=ide.YES)
    assert turn.tools == ["git.diff", "git.diff", "apply_patch", "apply_patch_review", "git.diff"]
    assert marker_files(tmp_path) == []
    assert "+patched" in got["diff"] and "+reviewed" in got["diff"]  # the tools still work
    assert (root / "notes.txt").read_text() == "hello\nchanged\npatched\n"


async def test_filter_named_so_that_it_cannot_be_switched_off_is_refused(tmp_path: Path) -> None:
    """A filter driver whose name holds "=" cannot be overridden with -c: git.diff refuses to run rather than run it."""
    root = repo(tmp_path, **{"notes.txt": "hello\n"})
    with (root / ".git" / "config").open("a") as config:
        config.write(f'[filter "a=b"]\n\tclean = touch {tmp_path}/ran-clean\n')
    (root / ".gitattributes").write_text("*.txt filter=a=b\n")
    (root / "notes.txt").write_text("changed\n")
    with pytest.raises(ToolError) as caught:
        await Workspace(root).call("git.diff", {})
    assert caught.value.name == "git_failed" and marker_files(tmp_path) == []


async def test_copies_that_look_like_a_repository_run_nothing(tmp_path: Path) -> None:
    """HEAD, objects/, refs/, a config naming a filter and .gitattributes copied into the scratch directory: git apply runs no filter (was: it took the copies for a repository)."""
    config = f'[core]\n\tbare = false\n\tworktree = .\n[filter "evil"]\n\tclean = touch {tmp_path}/ran-clean; cat\n\tsmudge = touch {tmp_path}/ran-smudge; cat\n'
    root = workspace(tmp_path, **{"HEAD": "ref: refs/heads/main\n", "config": config, ".gitattributes": "* filter=evil\n"})
    for name in ("objects", "refs"):
        (root / name).mkdir()
        (root / name / "x").write_text("x\n")
    touch_all = "".join(f"diff --git a/{p} b/{p}\n--- a/{p}\n+++ b/{p}\n@@ -1 +1,2 @@\n x\n+\n" for p in ("objects/x", "refs/x"))
    touch_all += "diff --git a/.gitattributes b/.gitattributes\n--- a/.gitattributes\n+++ b/.gitattributes\n@@ -1 +1,2 @@\n * filter=evil\n+\n"
    touch_all += "".join(f"diff --git a/{p} b/{p}.txt\nsimilarity index 100%\ncopy from {p}\ncopy to {p}.txt\n" for p in ("HEAD", "config"))
    try:
        value = await Workspace(root).call("apply_patch", {"diff": touch_all})
    except ToolError as exc:
        value = {"error": exc.name}
    assert marker_files(tmp_path) == []  # was: ["ran-clean"], and the patch failed
    assert value == {"applied": True, "files": ["objects/x", "refs/x", ".gitattributes", "HEAD.txt", "config.txt"]}
    assert (root / "objects" / "x").read_text() == "x\n\n" and (root / "config.txt").read_text() == config


def user_git(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """git as a user with no settings of their own runs it (what a shell prompt runs on cd)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("GIT_")}, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True)


async def test_a_planted_bare_repository_is_refused(tmp_path: Path) -> None:
    """The review's replay: sub/HEAD, sub/objects/, sub/refs/ and a sub/config with fsmonitor; HEAD is refused, so the user's `git status` in sub runs nothing (was: it ran the command)."""
    root = workspace(tmp_path)
    config = f'[core]\n\trepositoryformatversion = 0\n\tbare = false\n\tworktree = ..\n\tfsmonitor = "touch {tmp_path}/ran-fsmonitor"\n'
    ws = Workspace(root)
    with pytest.raises(ToolError) as caught:
        await ws.call("write_file", {"path": "sub/HEAD", "content": "ref: refs/heads/main\n"})
    assert caught.value.name == "outside_workspace"
    for path, content in (("sub/objects/x", ""), ("sub/refs/x", ""), ("sub/config", config)):
        await ws.call("write_file", {"path": path, "content": content})
    user_git(root / "sub", "status")
    assert marker_files(tmp_path) == [] and not (root / "sub" / "HEAD").exists()


FORGED = {  # each would be a file git reads as a repository's own; fixture/HEAD is a checkout's
    "head-ref": ("write_file", {"path": "sub/HEAD", "content": "ref: refs/heads/main\n"}),
    "head-commit-other-case": ("write_file", {"path": "Head", "content": "0123456789abcdef0123456789abcdef01234567\n"}),
    "head-by-patch": ("apply_patch", {"diff": "diff --git a/sub/HEAD b/sub/HEAD\nnew file mode 100644\n--- /dev/null\n+++ b/sub/HEAD\n@@ -0,0 +1 @@\n+ref: refs/heads/main\n"}),
    "head-by-copy": ("apply_patch", {"diff": "diff --git a/ref.txt b/sub/HEAD\nsimilarity index 100%\ncopy from ref.txt\ncopy to sub/HEAD\n"}),
    "config-beside-head": ("write_file", {"path": "fixture/config", "content": "[core]\n\tfsmonitor = touch x\n"}),
    "commondir-beside-head": ("write_file", {"path": "fixture/commondir", "content": "../evil\n"}),
}


@pytest.mark.parametrize(("name", "arguments"), FORGED.values(), ids=FORGED.keys())
async def test_files_git_reads_as_a_repository_are_refused(tmp_path: Path, name: str, arguments: dict[str, Any]) -> None:
    """A HEAD naming a ref or a commit, and a config or commondir beside a HEAD, are outside_workspace; nothing is written."""
    root = workspace(tmp_path, **{"ref.txt": "ref: refs/heads/main\n"})
    (root / "fixture").mkdir()
    (root / "fixture" / "HEAD").write_text("ref: refs/heads/main\n")
    before = files_under(root)
    with pytest.raises(ToolError) as caught:
        await Workspace(root).call(name, arguments)
    assert caught.value.name == "outside_workspace"
    assert files_under(root) == before


async def test_ordinary_files_named_head_and_config_are_written(tmp_path: Path) -> None:
    """A HEAD that is no ref, and a config with no HEAD beside it, are ordinary files."""
    root = workspace(tmp_path)
    ws = Workspace(root)
    for path, content in (("docs/HEAD", "The head of the table.\n"), ("config", "[core]\n"), ("app/config", "port = 80\n")):
        await ws.call("write_file", {"path": path, "content": content})
        assert (root / path).read_text() == content


# ---------------------------------------------------------------------------------------------
# 2. git decides which files a patch touches
# ---------------------------------------------------------------------------------------------

HIDDEN = (  # a second file section behind a `diff ` line: parse_diff sees one file, git two
    "diff --git a/notes.txt b/notes.txt\n--- a/notes.txt\n+++ b/notes.txt\n@@ -1 +1,2 @@\n hello\n+more\n"
    "diff -r a b\n--- a/{hidden}\n+++ b/{hidden}\n@@ -0,0 +1 @@\n+evil\n"
)


async def test_hidden_file_section_is_reported_to_the_model(stack: Stack, tmp_path: Path) -> None:
    """The file git creates that the diff's headers hide is listed in the result and on the user's tool line."""
    root = workspace(tmp_path, **{"notes.txt": "hello\n"})
    done, got = ide_run(stack, root, calling("apply_patch", diff=HIDDEN.format(hidden="src/hidden.js")))
    assert got == {"applied": True, "files": ["notes.txt", "src/hidden.js"]}  # was: ["notes.txt"]
    assert "[tool] apply_patch 2 files: notes.txt, src/hidden.js -> ok" in done.stderr
    assert (root / "src" / "hidden.js").read_text() == "evil\n"


@pytest.mark.parametrize("hidden", ["../outside/new.js", "linkdir/new.js", ".git/hooks/pre-commit"], ids=["dotdot", "symlinked-dir", "git-dir"])
async def test_hidden_file_section_is_path_checked(stack: Stack, tmp_path: Path, hidden: str) -> None:
    """A hidden section leaving the workspace is outside_workspace, and the visible file is not changed either."""
    (tmp_path / "outside").mkdir()
    root = repo(tmp_path, **{"notes.txt": "hello\n"})
    (root / "linkdir").symlink_to(tmp_path / "outside", target_is_directory=True)
    before = outside_state(tmp_path)
    _, got = await drive(stack, root, calling("apply_patch", diff=HIDDEN.format(hidden=hidden)))
    assert got["error"]["code"] == -32012, got
    assert outside_state(tmp_path) == before and (root / "notes.txt").read_text() == "hello\n"


async def test_review_of_a_diff_git_reads_differently_asks_nothing(stack: Stack, tmp_path: Path) -> None:
    """apply_patch_review refuses a diff whose files, as git reads them, are not the ones the user would be shown."""
    root = workspace(tmp_path, **{"notes.txt": "hello\n"})
    ask = scripted("y", "y")
    _, got = await drive(stack, root, calling("apply_patch_review", diff=HIDDEN.format(hidden="src/hidden.js")), ask=ask, policy=ide.ASK)
    assert got["error"]["code"] == -32020 and "src/hidden.js" in got["error"]["message"]
    assert ask.prompts == [] and not (root / "src").exists()  # type: ignore[attr-defined]


SQL = "BEGIN;\nCREATE TABLE users (id int);\n-- db/q.sql\nSELECT 1;\nSELECT 2;\nSELECT 3;\nSELECT 4;\nCOMMIT;\n"
UNSEEN_LINE = (  # a plain diff: parse_diff reads the ---/+++ pair after hunk 1 as a second section's header
    "--- a/q.sql\n+++ b/q.sql\n@@ -1,2 +1,2 @@\n BEGIN;\n-CREATE TABLE users (id int);\n+CREATE TABLE users (id bigint);\n"
    "--- db/q.sql\n+++ db/q.sql\tGRANT ALL ON users TO PUBLIC;\n SELECT 1;\n@@ -7,2 +7,2 @@\n-SELECT 4;\n+SELECT 4; -- tidy\n COMMIT;\n"
)


async def test_review_applies_no_line_it_did_not_show(tmp_path: Path) -> None:
    """The review's replay: git (--recount) read that ---/+++ pair as a line removed and one added in hunk 1, the user was shown two harmless hunks, and q.sql got "++ db/q.sql\tGRANT ALL ON users TO PUBLIC;"; now git reads the sections as shown, or nothing is applied."""
    root = workspace(tmp_path, **{"q.sql": SQL})
    shown = SQL.replace("(id int)", "(id bigint)").replace("SELECT 4;", "SELECT 4; -- tidy")
    try:
        await Workspace(root, ask=scripted("y", "y"), ui=io.StringIO()).call("apply_patch_review", {"diff": UNSEEN_LINE})
    except ToolError as exc:
        assert exc.name == "patch_invalid"
    assert (root / "q.sql").read_text() in (SQL, shown)


async def test_review_of_a_hunk_git_reads_otherwise_asks_nothing(tmp_path: Path) -> None:
    """A hunk line git does not read as one (here `diff x`, which ends the hunk for git) makes git's line counts differ from the hunks shown: patch_invalid before asking."""
    root = workspace(tmp_path, **{"a.txt": "one\ntwo\n"})
    ask = scripted("y")
    diff = "diff --git a/a.txt b/a.txt\n--- a/a.txt\n+++ b/a.txt\n@@ -1,2 +1,2 @@\n one\n-two\n+2\ndiff x\n+three\n"
    with pytest.raises(ToolError) as caught:
        await Workspace(root, ask=ask, ui=io.StringIO()).call("apply_patch_review", {"diff": diff})
    assert caught.value.name == "patch_invalid" and "a.txt +1 -1" in caught.value.message
    assert ask.prompts == [] and (root / "a.txt").read_text() == "one\ntwo\n"  # type: ignore[attr-defined]


RENAME_OUT = "diff --git a/notes.txt b/notes.txt\nsimilarity index 100%\nrename from notes.txt\nrename to {to}\n"
SYMLINK = "diff --git a/link b/link\nnew file mode 120000\n--- /dev/null\n+++ b/link\n@@ -0,0 +1 @@\n+{target}\n\\ No newline at end of file\n"
NEW_EXECUTABLE = "diff --git a/tools/hooks/pre-commit b/tools/hooks/pre-commit\nnew file mode 100755\n--- /dev/null\n+++ b/tools/hooks/pre-commit\n@@ -0,0 +1,2 @@\n+#!/bin/sh\n+touch {marker}\n"
MADE_EXECUTABLE = "diff --git a/notes.txt b/notes.txt\nold mode 100644\nnew mode 100755\n"


@pytest.mark.parametrize(
    ("diff", "code"),
    [
        (RENAME_OUT.format(to="../outside/notes.txt"), -32012),
        (RENAME_OUT.format(to=".git/description"), -32012),
        (SYMLINK.format(target="/etc/passwd"), -32020),
        (SYMLINK.format(target="notes.txt"), -32020),
        (NEW_EXECUTABLE, -32020),
        (MADE_EXECUTABLE, -32020),
    ],
    ids=["rename-out", "rename-into-git", "symlink-out", "symlink-in", "new-executable", "made-executable"],
)
async def test_renames_symlinks_and_executables_are_refused(stack: Stack, tmp_path: Path, diff: str, code: int) -> None:
    """Both names of a rename are checked; a patch may not create a symlink or make a file executable; nothing changes."""
    (tmp_path / "outside").mkdir()
    root = repo(tmp_path, **{"notes.txt": "hello\n"})
    before = outside_state(tmp_path)
    diff = diff.replace("{marker}", str(tmp_path / "ran-hook"))
    for tool in ("apply_patch", "apply_patch_review"):
        _, got = await drive(stack, root, calling(tool, diff=diff), policy=ide.YES)
        assert got["error"]["code"] == code, got
    assert outside_state(tmp_path) == before
    assert git(root, "status", "--porcelain") == "" and (root / "notes.txt").stat().st_mode & 0o111 == 0


THROUGH_A_LINK = {  # alias.txt -> important.txt, inside the workspace
    "delete": "diff --git a/alias.txt b/alias.txt\ndeleted file mode 100644\n--- a/alias.txt\n+++ /dev/null\n@@ -1 +0,0 @@\n-keep me\n",
    "rename": "diff --git a/alias.txt b/moved.txt\nsimilarity index 100%\nrename from alias.txt\nrename to moved.txt\n",
    "change": "diff --git a/alias.txt b/alias.txt\n--- a/alias.txt\n+++ b/alias.txt\n@@ -1 +1 @@\n-keep me\n+changed\n",
}


@pytest.mark.parametrize("diff", THROUGH_A_LINK.values(), ids=THROUGH_A_LINK.keys())
async def test_patch_through_a_symlink_is_refused(tmp_path: Path, diff: str) -> None:
    """The review's replay: deleting the symlink alias.txt deleted important.txt, which it points to, and the result said alias.txt; now any patch path ending on a symlink is patch_invalid."""
    root = workspace(tmp_path, **{"important.txt": "keep me\n"})
    (root / "alias.txt").symlink_to("important.txt")
    for tool in ("apply_patch", "apply_patch_review"):
        with pytest.raises(ToolError) as caught:
            await Workspace(root, policy=ide.YES).call(tool, {"diff": diff})
        assert caught.value.name == "patch_invalid", caught.value.message
    assert (root / "important.txt").read_text() == "keep me\n" and os.readlink(root / "alias.txt") == "important.txt"
    assert sorted(p.name for p in root.iterdir()) == ["alias.txt", "important.txt"]


async def test_rename_and_copy_inside_apply_and_list_both_names(tmp_path: Path) -> None:
    """A rename inside the workspace moves the file (both names listed); a copy leaves its source alone."""
    root = workspace(tmp_path, **{"a.txt": "one\n", "b.txt": "two\n"})
    diff = "diff --git a/a.txt b/moved/a.txt\nsimilarity index 100%\nrename from a.txt\nrename to moved/a.txt\ndiff --git a/b.txt b/c.txt\nsimilarity index 100%\ncopy from b.txt\ncopy to c.txt\n"
    value = await Workspace(root).call("apply_patch", {"diff": diff})
    assert value == {"applied": True, "files": ["moved/a.txt", "c.txt", "a.txt"]}
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == ["b.txt", "c.txt", "moved/a.txt"]


AUTH = "def login(user):\n    return check(user)\n"
HEADERS_WITH_A_HUNK = {  # (diff, the header lines the user must see before accepting its one hunk)
    "rename": ("diff --git a/src/auth.py b/docs/auth-notes.md\nsimilarity index 90%\nrename from src/auth.py\nrename to docs/auth-notes.md\n--- a/src/auth.py\n+++ b/docs/auth-notes.md\n@@ -1,2 +1,2 @@\n-def login(user):\n+Notes: def login(user):\n     return check(user)\n", ["rename from src/auth.py", "rename to docs/auth-notes.md"]),
    "two-names": ("diff --git a/src/auth.py b/docs/auth-notes.md\n--- a/src/auth.py\n+++ b/docs/auth-notes.md\n@@ -1,2 +1,2 @@\n-def login(user):\n+Notes: def login(user):\n     return check(user)\n", ["--- a/src/auth.py", "+++ b/docs/auth-notes.md"]),
    "deletion": ("diff --git a/src/auth.py b/src/auth.py\ndeleted file mode 100644\n--- a/src/auth.py\n+++ /dev/null\n@@ -1,2 +0,0 @@\n-def login(user):\n-    return check(user)\n", ["deleted file mode 100644"]),
    "mode": ("diff --git a/src/auth.py b/src/auth.py\nold mode 100755\nnew mode 100644\n--- a/src/auth.py\n+++ b/src/auth.py\n@@ -1,2 +1,2 @@\n-def login(user):\n+def login(user):  # tidy\n     return check(user)\n", ["old mode 100755", "new mode 100644"]),
}


@pytest.mark.parametrize(("diff", "header"), HEADERS_WITH_A_HUNK.values(), ids=HEADERS_WITH_A_HUNK.keys())
async def test_review_shows_a_file_header_before_its_hunks(tmp_path: Path, diff: str, header: list[str]) -> None:
    """The review's replay: a rename with a small hunk was shown as `docs/auth-notes.md: hunk 1 of 1`, and after `y` src/auth.py was gone; now the header comes first, and the tool line names both files."""
    root = workspace(tmp_path)
    (root / "src").mkdir()
    (root / "src" / "auth.py").write_text(AUTH)
    (root / "src" / "auth.py").chmod(0o755 if "old mode 100755" in diff else 0o644)
    ui = io.StringIO()
    value = await Workspace(root, ask=scripted("y"), ui=ui).call("apply_patch_review", {"diff": diff})
    shown = ui.getvalue()
    assert all(-1 < shown.find(line) < shown.index("@@ ") for line in header), shown
    assert all(path in ide.describe("apply_patch_review", {"diff": diff}, value) for path in value["files"])


# ---------------------------------------------------------------------------------------------
# 3. All or nothing, for real
# ---------------------------------------------------------------------------------------------

BIG = "".join(f"line {n:07d} of a file that outgrows the disk\n" for n in range(2_500))  # 110 kB: past FILE_LIMIT, within one argv word


async def test_patch_on_a_full_disk_changes_nothing_and_says_so(stack: Stack, tmp_path: Path) -> None:
    """The issue's replay: the disk fills while the second file is written; both files stay whole and the model is told nothing changed."""
    root = workspace(tmp_path, **{"a.txt": "one\ntwo\n", "b.txt": BIG})
    diff = (
        "diff --git a/a.txt b/a.txt\n--- a/a.txt\n+++ b/a.txt\n@@ -1,2 +1,2 @@\n one\n-two\n+TWO\n"
        "diff --git a/b.txt b/b.txt\n--- a/b.txt\n+++ b/b.txt\n@@ -1,2 +1,2 @@\n-line 0000000 of a file that outgrows the disk\n+first\n line 0000001 of a file that outgrows the disk\n"
    )
    done, got = ide_run(stack, root, calling("apply_patch", diff=diff), file_limit=FILE_LIMIT)
    assert done.returncode == 0, done.stderr
    assert (root / "a.txt").read_text() == "one\ntwo\n"
    assert (root / "b.txt").read_text() == BIG  # was: cut off at 1 MiB, mid-line
    assert got["error"]["code"] == -32016 and "Nothing was changed" in got["error"]["message"], got
    assert sorted(p.name for p in root.iterdir()) == ["a.txt", "b.txt"]  # no temp file left


async def test_write_file_on_a_full_disk_keeps_the_old_file_whole(stack: Stack, tmp_path: Path) -> None:
    """write_file is atomic: a write the disk cannot hold leaves the old content, not a cut-off file (fails with a plain open-and-write)."""
    root = workspace(tmp_path, **{"b.txt": "the old content, kept whole\n"})
    done, got = ide_run(stack, root, calling("write_file", path="b.txt", content=BIG), file_limit=FILE_LIMIT)
    assert done.returncode == 0, done.stderr
    assert got["error"]["code"] == -32016, got
    assert (root / "b.txt").read_text() == "the old content, kept whole\n"
    assert sorted(p.name for p in root.iterdir()) == ["b.txt"]


def test_atomic_write_on_a_full_disk_writes_no_file(tmp_path: Path) -> None:
    """The writer behind write_file and apply_patch: the second file does not fit, so the first is not written either."""
    root = workspace(tmp_path, **{"a.txt": "old a\n", "b.txt": "old b\n"})
    script = (
        "import resource, ide\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({FILE_LIMIT}, {FILE_LIMIT}))\n"
        f"ws = ide.Workspace({str(root)!r})\n"
        "try:\n"
        f"    ws.atomic_write([ide.Change('a.txt', b'new a'), ide.Change('new/c.txt', b'c'), ide.Change('b.txt', b'x' * {2 * FILE_LIMIT})])\n"
        "except ide.ToolError as exc:\n"
        "    print(exc.name)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.stdout == "io_error\n", done.stderr
    assert (root / "a.txt").read_text() == "old a\n" and (root / "b.txt").read_text() == "old b\n"
    assert sorted(p.name for p in root.iterdir()) == ["a.txt", "b.txt"]  # no temp file, no new/ directory


def test_a_patch_of_many_files_needs_few_descriptors(tmp_path: Path) -> None:
    """600 files in two directories under a limit of 128 open files: the writer holds one descriptor per directory, not per file (was: EMFILE, io_error)."""
    root = workspace(tmp_path)
    diff = "".join(f"diff --git a/{d}/f{n}.txt b/{d}/f{n}.txt\nnew file mode 100644\n--- /dev/null\n+++ b/{d}/f{n}.txt\n@@ -0,0 +1 @@\n+{n}\n" for d in ("a", "b") for n in range(300))
    script = (
        "import asyncio, resource, sys, ide\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))\n"
        f"value = asyncio.run(ide.Workspace({str(root)!r}).call('apply_patch', {{'diff': sys.stdin.read()}}))\n"
        "print(len(value['files']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, input=diff, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.stdout == "600\n", done.stderr[-500:]
    assert len(list((root / "b").iterdir())) == 300 and (root / "b" / "f299.txt").read_text() == "299\n"


def test_rename_failing_part_way_names_what_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the second of three renames fails, io_error says exactly which file changed and which did not."""
    root = workspace(tmp_path, **{"a.txt": "old a\n", "b.txt": "old b\n", "c.txt": "old c\n"})
    renames = []
    replace = os.replace

    def second_fails(*args: Any, **kwargs: Any) -> None:
        renames.append(args)
        if len(renames) == 2:
            raise OSError(5, "Input/output error")
        replace(*args, **kwargs)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(ToolError) as caught:
        Workspace(root).atomic_write([ide.Change("a.txt", b"new a\n"), ide.Change("b.txt", b"new b\n"), ide.Change("c.txt", b"new c\n")])
    assert caught.value.name == "io_error"
    assert caught.value.data == {"changed": ["a.txt"], "unchanged": ["b.txt", "c.txt"]}
    assert "a.txt changed" in caught.value.message
    assert [(p.name, p.read_text()) for p in sorted(root.iterdir())] == [("a.txt", "new a\n"), ("b.txt", "old b\n"), ("c.txt", "old c\n")]


# ---------------------------------------------------------------------------------------------
# 5. Bounded reads
# ---------------------------------------------------------------------------------------------


def bytes_read() -> int:
    """Bytes this process has read by system call (files and pipes alike)."""
    return int(re.search(r"rchar: (\d+)", Path("/proc/self/io").read_text()).group(1))  # type: ignore[union-attr]


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's /proc/self/io")
async def test_read_of_a_huge_file_reads_only_its_start(stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines 1-3 of a file 16 times the scan cap: the lines come back, total_lines is null, and at most the cap is read (was: the whole file)."""
    monkeypatch.setattr(ide, "READ_SCAN_BYTES", 1024 * 1024, raising=False)  # the same code, at a test's scale
    root = workspace(tmp_path)
    (root / "huge.log").write_text("".join(f"{n:07d} {'x' * 56}\n" for n in range(1, 262_145)))  # 16 MiB
    before = bytes_read()
    _, got = await drive(stack, root, calling("read_file", path="huge.log", start_line=1, end_line=3))
    assert bytes_read() - before < 3 * 1024 * 1024  # was: 16 MiB and more
    assert got == {"path": "huge.log", "content": "".join(f"{n:07d} {'x' * 56}\n" for n in (1, 2, 3)), "start_line": 1, "end_line": 3, "total_lines": None, "truncated": False}
    _, past = await drive(stack, root, calling("read_file", path="huge.log", start_line=200_000))
    assert past["error"]["code"] == -32022, past


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's /proc/self/io")
async def test_git_diff_of_a_huge_change_reads_only_the_cap(stack: Stack, tmp_path: Path) -> None:
    """git.diff stops git once DIFF_CAP_BYTES are read, instead of taking its whole output."""
    root = repo(tmp_path, **{"a.txt": "a\n"})
    (root / "big.txt").write_text("".join(f"line {n} {'y' * 90}\n" for n in range(60_000)))  # 6 MB
    git(root, "add", "big.txt")
    before = bytes_read()
    _, got = await drive(stack, root, calling("git_diff", staged=True))
    assert bytes_read() - before < 2 * 1024 * 1024  # was: all 6 MB
    assert got["truncated"] is True and got["diff"].startswith("diff --git a/big.txt b/big.txt")


async def test_read_file_runs_off_the_event_loop(tmp_path: Path) -> None:
    """A long read happens in a thread: the IDE's loop goes on ticking meanwhile (it answers the gateway's pings)."""
    root = workspace(tmp_path)
    (root / "big.txt").write_text(("z" * 99 + "\n") * 200_000)  # 20 MB, read and counted in full
    ticks: list[float] = []

    async def tick() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.001)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    began = time.monotonic()
    value = await Workspace(root).call("read_file", {"path": "big.txt", "start_line": 199_999})
    ended = time.monotonic()
    ticker.cancel()
    assert value["total_lines"] == 200_000
    assert len([t for t in ticks if began < t < ended]) >= 3  # was: none, the loop was blocked for the whole read


# ---------------------------------------------------------------------------------------------
# 6. Safe display: the model's text cannot drive the user's terminal
# ---------------------------------------------------------------------------------------------

ERASE = "\r\x1b[2K"  # back to the line's start, erase it: what follows replaces what was shown
OSC52 = "\x1b]52;c;dG91Y2ggL3RtcC9wd25lZA==\x07"  # write "touch /tmp/pwned" to the clipboard
TITLE = "\x1b]0;sudo password:\x07"  # the window title
HIDDEN_HUNK = f"+touch /tmp/pwned; # {ERASE}+# log the build start"


def only_own_escapes(shown: str) -> None:
    """Every escape sequence on screen is one of ide.py's colours, and no other control character is there."""
    assert "\x1b[1m" in shown  # colour is on: the check below is not vacuous
    plain = re.sub("\x1b\\[\\d+m", "", shown)
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]", plain), plain


async def test_review_shows_hidden_controls(stack: Stack, tmp_path: Path) -> None:
    """The issue's replay: a hunk that erases its own first half shows ^M^[[2K, so the user sees the `touch` they would accept."""
    root = workspace(tmp_path, **{"build.sh": "make\n"})
    diff = f"diff --git a/build.sh b/build.sh\n--- a/build.sh\n+++ b/build.sh\n@@ -1 +1,2 @@\n{HIDDEN_HUNK}\n make\n"
    ui, ask = Tty(), scripted("n")
    await drive(stack, root, calling("apply_patch_review", diff=diff, message=f"Add logging{OSC52}{TITLE}"), ask=ask, ui=ui, policy=ide.ASK)
    shown = ui.getvalue()
    only_own_escapes(shown)
    assert "+touch /tmp/pwned; # ^M^[[2K+# log the build start" in shown
    assert "^[]52;c;" in shown and "^[]0;sudo password:^G" in shown
    assert (root / "build.sh").read_text() == "make\n"  # rejected


async def test_prompt_and_options_show_hidden_controls(stack: Stack, tmp_path: Path) -> None:
    """prompt_user's message and options reach the terminal with ESC, BEL, CR and bidi controls made visible."""
    root = workspace(tmp_path)
    ui = Tty()
    message = f"Run the tests?{OSC52}{TITLE}"
    _, got = await drive(stack, root, calling("prompt_user", message=message, options=[f"yes{ERASE}no", "n\u202eo"]), ask=scripted("2"), ui=ui, policy=ide.ASK)
    assert got == {"answer": "n\u202eo", "declined": False}
    shown = ui.getvalue()
    only_own_escapes(shown)
    assert "1) yes^M^[[2Kno" in shown and "2) n<U+202E>o" in shown and "^[]52;c;" in shown


async def test_tokens_file_names_and_errors_show_hidden_controls(stack: Stack, tmp_path: Path) -> None:
    """`python ide.py`: streamed tokens, a tool's file name and its error message reach stdout and stderr with no raw control character."""
    root = workspace(tmp_path)
    done, _ = ide_run(stack, root, calling("read_file", path=f"missing{TITLE}.txt"))
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout + done.stderr and "\x07" not in done.stdout + done.stderr
    assert "[tool] read_file missing^[]0;sudo password:^G.txt -> error:" in done.stderr
    chat = ide_run(stack, root, f"[scenario:chat] paste {OSC52}{ERASE}done")[0]
    assert "\x1b" not in chat.stdout and "\r" not in chat.stdout
    assert "paste ^[]52;c;dG91Y2ggL3RtcC9wd25lZA==^G^M^[[2Kdone" in chat.stdout


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain\ttext\n", "plain\ttext\n"),
        ("\x1b[31mred", "^[[31mred"),
        ("\r\x1b[2K", "^M^[[2K"),
        ("\x7f\x00", "^?^@"),
        ("\x9b2J", "<U+009B>2J"),
        ("a\u202eb\u2066c", "a<U+202E>b<U+2066>c"),
        ("café ✓ 日本", "café ✓ 日本"),
        ("\udcc2\udc9b31m", "<U+DCC2><U+DC9B>31m"),
        ("rm\u200b -rf\u2060 \ufeff/\u00ad", "rm<U+200B> -rf<U+2060> <U+FEFF>/<U+00AD>"),
        ("one\u2028two\u2029", "one<U+2028>two<U+2029>"),
        ("a\u180eb\U000e0041\U000e007f", "a<U+180E>b<U+E0041><U+E007F>"),
        ("\u3164\u115f\ue000", "<U+3164><U+115F><U+E000>"),
        ("\U0001f469\u200d\U0001f4bb", "\U0001f469\u200d\U0001f4bb"),
    ],
    ids=["tab-newline-kept", "esc", "cr-erase", "del-nul", "c1-csi", "bidi", "unicode-kept", "lone-surrogates", "zero-width", "separators", "tags", "fillers-private-use", "emoji-joiner-kept"],
)
def test_visible_makes_controls_visible(text: str, shown: str) -> None:
    """visible(): C0, DEL, C1, format (Cf), separator (Zl, Zp), surrogate and private-use characters and the Hangul fillers in caret or <U+XXXX> notation; tabs, newlines, other text, and the joiner of emoji in text, kept."""
    assert ide.visible(text) == shown
    assert ide.visible("a\nb\tc\u200dd", one_line=True) == "a^Jb^Ic<U+200D>d"


@pytest.mark.parametrize("errors", ["surrogateescape", "strict"])
def test_lone_surrogates_in_the_models_text_reach_stdout_visible(errors: str) -> None:
    """The review's replay: "\udcc2\udc9b31m" streamed to a stdout that escapes surrogates (a C locale) was the bytes C2 9B, an 8-bit CSI; under strict UTF-8 it crashed the turn. Now it is <U+DCC2><U+DC9B>."""
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding="utf-8", errors=errors)
    ide.Screen(out, io.StringIO()).text("red: \udcc2\udc9b31m")
    assert raw.getvalue() == b"red: <U+DCC2><U+DC9B>31m"


# ---------------------------------------------------------------------------------------------
# 7. A lone surrogate is a bad argument, not a crash
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "arguments"), [("write_file", {"path": "a.txt", "content": "bad \ud800 text"}), ("write_file", {"path": "\udcff.txt", "content": "x"}), ("prompt_user", {"message": "?", "options": ["\ud800"]})], ids=["content", "path", "option"])
async def test_lone_surrogate_is_invalid_arguments(stack: Stack, tmp_path: Path, name: str, arguments: dict[str, Any]) -> None:
    """JSON's "\\ud800" reaches the IDE as a lone surrogate: the model reads invalid_arguments (-32602), not -32603, and nothing is written."""
    root = workspace(tmp_path)
    _, got = await drive(stack, root, calling(name, **arguments), policy=ide.YES)
    assert got["error"]["code"] == -32602, got
    assert list(root.iterdir()) == []
