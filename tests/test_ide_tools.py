"""ide.py's six tools on real directories and real git, and its client against a scripted gateway."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import ide
from protocol import TOOL_ERRORS, TOOL_METHODS, TOOLS_SPEC, notification, request, result
from ide import Ask, ClientExit, ToolError, Workspace

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

JSON_TYPES = {"string": str, "integer": int, "boolean": bool, "array": list, "object": dict, "null": type(None)}


def assert_result_shape(method: str, value: dict[str, Any]) -> None:
    """The result has exactly the properties of its tools_spec.json schema, each of its type."""
    schema = next(tool["result"] for tool in TOOLS_SPEC["tools"] if tool["method"] == method)
    assert set(value) == set(schema["properties"]), value
    for name, prop in schema["properties"].items():
        kinds = prop["type"] if isinstance(prop["type"], list) else [prop["type"]]
        assert any(isinstance(value[name], JSON_TYPES[k]) and not (k == "integer" and isinstance(value[name], bool)) for k in kinds), (name, value[name])


async def call(ws: Workspace, method: str, **params: Any) -> dict[str, Any]:
    value = await ws.call(method, params)
    assert_result_shape(method, value)
    return value


async def fails(ws: Workspace, method: str, **params: Any) -> ToolError:
    with pytest.raises(ToolError) as caught:
        await ws.call(method, params)
    assert caught.value.code == TOOL_ERRORS[caught.value.name]
    return caught.value


def scripted(*answers: str) -> Ask:
    """An ask() that gives these answers in order, then behaves like Ctrl-D; it logs the prompts."""
    queue = list(answers)

    async def ask(prompt: str) -> str:
        ask.prompts.append(prompt)  # type: ignore[attr-defined]
        if not queue:
            raise EOFError
        return queue.pop(0)

    ask.prompts = []  # type: ignore[attr-defined]
    return ask


def sh(cwd: Path, *args: str) -> str:
    return subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True).stdout


def git_init(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    sh(path, "git", "init", "-q")
    sh(path, "git", "config", "user.email", "ide@example.com")
    sh(path, "git", "config", "user.name", "IDE test")
    sh(path, "git", "config", "commit.gpgsign", "false")
    return path


def commit(path: Path, message: str = "commit") -> None:
    sh(path, "git", "add", "-A")
    sh(path, "git", "commit", "-q", "-m", message)


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


AUTH_JS = "function login(user) {\n  return check(user);\n}\n\nfunction logout() {\n  return true;\n}\n"
AUTH_PATCH = """diff --git a/src/auth.js b/src/auth.js
--- a/src/auth.js
+++ b/src/auth.js
@@ -1,3 +1,4 @@
 function login(user) {
+  console.log('[login] called');
   return check(user);
 }
@@ -5,3 +6,4 @@
 function logout() {
+  console.log('[logout] called');
   return true;
 }
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty workspace directory, with a sibling `outside` directory holding secret.txt."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("secret\n")
    (tmp_path / "ws").mkdir()
    return tmp_path / "ws"


@pytest.fixture
def repo(root: Path) -> Path:
    """The workspace as a git repository with src/auth.js committed."""
    git_init(root)
    (root / "src").mkdir()
    (root / "src" / "auth.js").write_text(AUTH_JS)
    (root / "README.md").write_text("# demo\n")
    commit(root, "first")
    return root


# ---------------------------------------------------------------------------------------------
# The tool table and the error frame
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", TOOL_METHODS)
async def test_every_spec_tool_is_implemented(root: Path, method: str) -> None:
    """Each method of tools_spec.json reaches a tool: bad arguments, not not_implemented."""
    with pytest.raises(ToolError) as caught:
        await Workspace(root).call(method, {"no_such_argument": 1})
    assert caught.value.name == "invalid_arguments"


async def test_unknown_tool_is_not_implemented(root: Path) -> None:
    """A method outside the spec gets not_implemented."""
    error = await fails(Workspace(root), "delete_everything")
    assert error.name == "not_implemented"


def test_tool_error_frame_bytes() -> None:
    """A tool error is a JSON-RPC error response carrying the model's tool-call id verbatim."""
    frame = ToolError("not_found", "'x.js' does not exist").response("call_abc")
    assert frame == '{"jsonrpc":"2.0","id":"call_abc","error":{"code":-32011,"message":"\'x.js\' does not exist"}}'
    frame = ToolError("patch_failed", "no", {"stderr": "e"}).response("call_1")
    assert frame == '{"jsonrpc":"2.0","id":"call_1","error":{"code":-32021,"message":"no","data":{"stderr":"e"}}}'


# ---------------------------------------------------------------------------------------------
# read_file
# ---------------------------------------------------------------------------------------------


async def test_read_whole_file_reports_total_lines(root: Path) -> None:
    """No range: every line, total_lines counted, not truncated."""
    (root / "a.txt").write_text("one\ntwo\nthree\n")
    value = await call(Workspace(root), "read_file", path="a.txt")
    assert value == {"path": "a.txt", "content": "one\ntwo\nthree\n", "start_line": 1, "end_line": 3, "total_lines": 3, "truncated": False}


async def test_read_range_is_one_based_and_inclusive(root: Path) -> None:
    """start_line=2, end_line=3 returns lines two and three."""
    (root / "a.txt").write_text("one\ntwo\nthree\nfour\n")
    value = await call(Workspace(root), "read_file", path="a.txt", start_line=2, end_line=3)
    assert (value["content"], value["start_line"], value["end_line"], value["total_lines"]) == ("two\nthree\n", 2, 3, 4)


async def test_read_end_past_the_end_is_clamped(root: Path) -> None:
    """end_line beyond the file stops at the last line; a last line without newline counts."""
    (root / "a.txt").write_text("one\ntwo")
    value = await call(Workspace(root), "read_file", path="a.txt", start_line=2, end_line=99)
    assert (value["content"], value["end_line"], value["total_lines"]) == ("two", 2, 2)


async def test_read_counts_only_newlines_and_keeps_crlf(root: Path) -> None:
    """CRLF ends are kept; a form feed or U+2028 does not start a new line."""
    (root / "a.txt").write_bytes("a\r\nb\x0cc\u2028d\n".encode())
    value = await call(Workspace(root), "read_file", path="a.txt")
    assert (value["content"], value["total_lines"]) == ("a\r\nb\x0cc\u2028d\n", 2)


async def test_read_empty_file(root: Path) -> None:
    """An empty file is zero lines: start_line 1, end_line 0, no error."""
    (root / "empty.txt").write_text("")
    value = await call(Workspace(root), "read_file", path="empty.txt")
    assert (value["content"], value["start_line"], value["end_line"], value["total_lines"]) == ("", 1, 0, 0)


async def test_read_truncates_at_the_cap_on_a_line_boundary(root: Path) -> None:
    """Past READ_CAP_BYTES: whole lines only, end_line says where to continue, truncated set."""
    line = "x" * 99 + "\n"
    count = ide.READ_CAP_BYTES // 100 + 50
    (root / "big.txt").write_text(line * count)
    value = await call(Workspace(root), "read_file", path="big.txt")
    assert value["truncated"] is True and value["total_lines"] == count
    assert value["end_line"] == ide.READ_CAP_BYTES // 101  # each line is 101 bytes on the wire: "\n" escapes to two
    assert value["content"] == line * value["end_line"]
    rest = await call(Workspace(root), "read_file", path="big.txt", start_line=value["end_line"] + 1)
    assert rest["truncated"] is False and rest["end_line"] == count


async def test_read_one_line_longer_than_the_cap_returns_its_start(root: Path) -> None:
    """A single huge line is cut at the cap, on a character boundary."""
    (root / "long.txt").write_text("é" * ide.READ_CAP_BYTES + "\nnext\n")
    value = await call(Workspace(root), "read_file", path="long.txt")
    assert value["truncated"] is True and (value["start_line"], value["end_line"]) == (1, 1)
    assert value["content"] == "é" * (ide.READ_CAP_BYTES // 2)


@pytest.mark.parametrize(
    ("setup", "params", "error"),
    [
        (None, {"path": "missing.txt"}, "not_found"),
        ("dir", {"path": "sub"}, "is_directory"),
        ("dir", {"path": "."}, "is_directory"),
        ("nul", {"path": "bin.dat"}, "binary_file"),
        ("latin1", {"path": "bin.dat"}, "binary_file"),
        ("text", {"path": "a.txt", "start_line": 3, "end_line": 2}, "bad_range"),
        ("text", {"path": "a.txt", "start_line": 4}, "bad_range"),
        ("text", {"path": "a.txt", "start_line": 0}, "bad_range"),
        ("text", {}, "invalid_arguments"),
        ("text", {"path": 7}, "invalid_arguments"),
        ("text", {"path": ""}, "invalid_arguments"),
        ("text", {"path": "a.txt", "start_line": "2"}, "invalid_arguments"),
        ("text", {"path": "a.txt", "start_line": True}, "invalid_arguments"),
        ("text", {"path": "a.txt", "lines": 2}, "invalid_arguments"),
    ],
    ids=["not-found", "directory", "root", "nul-byte", "not-utf8", "start-after-end", "start-past-end", "start-zero", "no-path", "path-not-string", "empty-path", "line-as-string", "line-as-bool", "unknown-argument"],
)
async def test_read_errors(root: Path, setup: str | None, params: dict[str, Any], error: str) -> None:
    """Each way a read can fail gets its own error code."""
    (root / "sub").mkdir()
    (root / "a.txt").write_text("1\n2\n3\n")
    (root / "bin.dat").write_bytes(b"PNG\0\x01" if setup == "nul" else "café".encode("latin-1"))
    assert (await fails(Workspace(root), "read_file", **params)).name == error


# ---------------------------------------------------------------------------------------------
# write_file
# ---------------------------------------------------------------------------------------------


async def test_write_creates_parent_directories(root: Path) -> None:
    """A new file in new directories: created true, bytes counted in UTF-8."""
    value = await call(Workspace(root), "write_file", path="src/new/util.js", content="const é = 1;\n")
    assert value == {"path": "src/new/util.js", "created": True, "bytes_written": 14}
    assert (root / "src" / "new" / "util.js").read_text() == "const é = 1;\n"


async def test_write_overwrites_and_reports_created_false(root: Path) -> None:
    """Overwriting an existing file replaces its content whole."""
    (root / "a.txt").write_text("old content that is longer\n")
    value = await call(Workspace(root), "write_file", path="a.txt", content="new\n")
    assert (value["created"], value["bytes_written"]) == (False, 4)
    assert (root / "a.txt").read_text() == "new\n"


async def test_write_leaves_no_temp_file(root: Path) -> None:
    """The temp file of the atomic write is renamed away, never left beside the target."""
    await call(Workspace(root), "write_file", path="a.txt", content="x")
    await call(Workspace(root), "write_file", path="a.txt", content="y")
    assert files_under(root) == {"a.txt"}


async def test_write_keeps_the_mode_of_an_overwritten_file(root: Path) -> None:
    """Rewriting an executable script keeps it executable."""
    script = root / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    await call(Workspace(root), "write_file", path="run.sh", content="#!/bin/sh\necho hi\n")
    assert script.stat().st_mode & 0o777 == 0o755


async def test_write_to_a_directory_is_is_directory(root: Path) -> None:
    """A directory at the path is refused and left as it was."""
    (root / "sub").mkdir()
    (root / "sub" / "keep.txt").write_text("keep")
    assert (await fails(Workspace(root), "write_file", path="sub", content="x")).name == "is_directory"
    assert files_under(root) == {"sub", "sub/keep.txt"}


async def test_write_of_a_name_of_254_bytes(root: Path) -> None:
    """A name near NAME_MAX in bytes, not characters, gets a temp file that fits (was: ENAMETOOLONG, io_error)."""
    name = "é" * 127  # 254 bytes in UTF-8
    assert (await call(Workspace(root), "write_file", path=name, content="x"))["created"] is True
    assert [p.name for p in root.iterdir()] == [name]


async def test_write_to_a_path_ending_in_a_slash_is_is_directory(root: Path) -> None:
    """`sub/` names a directory: is_directory, and no file `sub` is made (was: a file named sub)."""
    assert (await fails(Workspace(root), "write_file", path="sub/", content="x")).name == "is_directory"
    assert list(root.iterdir()) == []


async def test_write_below_a_file_is_io_error(root: Path) -> None:
    """A path whose parent is a file cannot be written: io_error, the file untouched."""
    (root / "a.txt").write_text("keep")
    assert (await fails(Workspace(root), "write_file", path="a.txt/b.txt", content="x")).name == "io_error"
    assert (root / "a.txt").read_text() == "keep"


def test_atomic_write_to_a_directory_changes_nothing(root: Path) -> None:
    """A directory among the targets: is_directory, the other file not written, no temp file left."""
    (root / "target").mkdir()
    (root / "target" / "inside.txt").write_text("intact")
    with pytest.raises(ToolError) as caught:
        Workspace(root).atomic_write([ide.Change("first.txt", b"new"), ide.Change("target", b"new")])
    assert caught.value.name == "is_directory"
    assert files_under(root) == {"target", "target/inside.txt"}
    assert (root / "target" / "inside.txt").read_text() == "intact"


@pytest.mark.parametrize("params", [{"path": "a.txt"}, {"content": "x"}, {"path": "a.txt", "content": 5}, {"path": "a.txt", "content": "x", "mode": "w"}])
async def test_write_invalid_arguments(root: Path, params: dict[str, Any]) -> None:
    """Missing, mistyped or unknown arguments: invalid_arguments, nothing written."""
    assert (await fails(Workspace(root), "write_file", **params)).name == "invalid_arguments"
    assert files_under(root) == set()


# ---------------------------------------------------------------------------------------------
# Escapes from the workspace
# ---------------------------------------------------------------------------------------------

ESCAPES: dict[str, Callable[[Path], str]] = {
    "dotdot": lambda root: "../outside/secret.txt",
    "dotdot-after-subdir": lambda root: "sub/../../outside/secret.txt",
    "dotdot-through-new-dirs": lambda root: "new/deeper/../../../outside/secret.txt",
    "absolute-outside": lambda root: str(root.parent / "outside" / "secret.txt"),
    "absolute-inside": lambda root: str(root / "a.txt"),
    "symlink-file": lambda root: "link.txt",
    "symlink-dir": lambda root: "linkdir/secret.txt",
}


def make_links(root: Path) -> None:
    (root / "sub").mkdir()
    (root / "a.txt").write_text("inside\n")
    (root / "link.txt").symlink_to(root.parent / "outside" / "secret.txt")
    (root / "linkdir").symlink_to(root.parent / "outside")


@pytest.mark.parametrize("route", ESCAPES)
async def test_read_escapes_are_refused(root: Path, route: str) -> None:
    """`..`, absolute paths and symlinks out of the workspace: outside_workspace, nothing read."""
    make_links(root)
    error = await fails(Workspace(root), "read_file", path=ESCAPES[route](root))
    assert error.name == "outside_workspace"
    assert "secret" not in json.dumps(error.data)


@pytest.mark.parametrize("route", ESCAPES)
async def test_write_escapes_are_refused_and_nothing_is_created_outside(root: Path, route: str) -> None:
    """The same routes for write_file: refused before any byte or directory is written."""
    make_links(root)
    before = files_under(root.parent)
    error = await fails(Workspace(root), "write_file", path=ESCAPES[route](root), content="pwned\n")
    assert error.name == "outside_workspace"
    assert files_under(root.parent) == before
    assert (root.parent / "outside" / "secret.txt").read_text() == "secret\n"


async def test_write_through_dangling_symlink_to_outside_is_refused(root: Path) -> None:
    """A link to a file that does not exist yet outside the workspace cannot create it."""
    (root / "future.txt").symlink_to(root.parent / "outside" / "created.txt")
    assert (await fails(Workspace(root), "write_file", path="future.txt", content="x")).name == "outside_workspace"
    assert not (root.parent / "outside" / "created.txt").exists()


async def test_dotdot_that_stays_inside_is_allowed(root: Path) -> None:
    """`sub/../a.txt` is a.txt: inside, so it is read."""
    make_links(root)
    assert (await call(Workspace(root), "read_file", path="sub/../a.txt"))["content"] == "inside\n"


async def test_symlink_that_stays_inside_is_followed(root: Path) -> None:
    """A link to a file inside the workspace is read and written through; the link survives."""
    (root / "real.txt").write_text("real\n")
    (root / "alias.txt").symlink_to(root / "real.txt")
    ws = Workspace(root)
    assert (await call(ws, "read_file", path="alias.txt"))["content"] == "real\n"
    await call(ws, "write_file", path="alias.txt", content="changed\n")
    assert (root / "alias.txt").is_symlink() and (root / "real.txt").read_text() == "changed\n"


# ---------------------------------------------------------------------------------------------
# git.diff
# ---------------------------------------------------------------------------------------------


async def test_git_diff_unstaged(repo: Path) -> None:
    """Default: the working tree against the index."""
    (repo / "README.md").write_text("# demo\nmore\n")
    value = await call(Workspace(repo), "git.diff")
    assert "diff --git a/README.md b/README.md" in value["diff"] and "+more" in value["diff"]
    assert value["truncated"] is False


async def test_git_diff_no_changes_is_empty(repo: Path) -> None:
    """A clean tree: an empty diff, not an error."""
    assert await call(Workspace(repo), "git.diff") == {"diff": "", "truncated": False}


async def test_git_diff_staged(repo: Path) -> None:
    """staged=true: the index against HEAD; unstaged changes are left out."""
    (repo / "README.md").write_text("# demo\nstaged\n")
    sh(repo, "git", "add", "README.md")
    (repo / "src" / "auth.js").write_text("// unstaged\n" + AUTH_JS)
    ws = Workspace(repo)
    staged = (await call(ws, "git.diff", staged=True))["diff"]
    assert "+staged" in staged and "unstaged" not in staged
    assert "+staged" not in (await call(ws, "git.diff"))["diff"]


async def test_git_diff_against_base(repo: Path) -> None:
    """base=HEAD~1 shows what the last commit changed."""
    (repo / "README.md").write_text("# demo\nsecond\n")
    commit(repo, "second")
    value = await call(Workspace(repo), "git.diff", base="HEAD~1")
    assert "+second" in value["diff"]


async def test_git_diff_limited_to_paths(repo: Path) -> None:
    """paths limits the diff to those files."""
    (repo / "README.md").write_text("# changed\n")
    (repo / "src" / "auth.js").write_text("// changed\n")
    diff = (await call(Workspace(repo), "git.diff", paths=["src"]))["diff"]
    assert "src/auth.js" in diff and "README.md" not in diff


@pytest.mark.parametrize("base", ["--output=/tmp/pwned", "-p", "", "no-such-branch", "HEAD~99"])
async def test_git_diff_bad_base_is_bad_ref(repo: Path, base: str) -> None:
    """A base that looks like an option, or names no commit, is bad_ref; git never sees it as one."""
    assert (await fails(Workspace(repo), "git.diff", base=base)).name == "bad_ref"
    assert not Path("/tmp/pwned").exists()


@pytest.mark.parametrize("paths", [["../outside"], ["/etc/passwd"], ["src", "../../x"]])
async def test_git_diff_paths_outside_are_refused(repo: Path, paths: list[str]) -> None:
    """Every path is checked like a file path."""
    assert (await fails(Workspace(repo), "git.diff", paths=paths)).name == "outside_workspace"


async def test_git_diff_path_that_looks_like_an_option_is_a_path(repo: Path) -> None:
    """Paths go after `--`, so `--stat` is a (missing) file name, not an option."""
    assert await call(Workspace(repo), "git.diff", paths=["--stat"]) == {"diff": "", "truncated": False}


async def test_git_diff_outside_a_repository(root: Path) -> None:
    """A plain directory: not_a_git_repository."""
    assert (await fails(Workspace(root), "git.diff")).name == "not_a_git_repository"


@pytest.mark.parametrize("params", [{"staged": "yes"}, {"paths": "src"}, {"paths": [1]}, {"base": 3}])
async def test_git_diff_invalid_arguments(repo: Path, params: dict[str, Any]) -> None:
    """Mistyped arguments are invalid_arguments."""
    assert (await fails(Workspace(repo), "git.diff", **params)).name == "invalid_arguments"


async def test_git_diff_truncates_at_the_cap(repo: Path) -> None:
    """A diff over DIFF_CAP_BYTES is cut at a line end and flagged."""
    (repo / "big.txt").write_text("".join(f"line {i} {'x' * 80}\n" for i in range(5000)))
    sh(repo, "git", "add", "big.txt")
    value = await call(Workspace(repo), "git.diff", staged=True)
    assert value["truncated"] is True
    assert len(value["diff"].encode()) <= ide.DIFF_CAP_BYTES and value["diff"].endswith("\n")


async def test_git_diff_in_a_subdirectory_of_the_repo_is_relative(repo: Path) -> None:
    """A workspace below the repository's top sees paths relative to itself, and only its own."""
    (repo / "README.md").write_text("# changed\n")
    (repo / "src" / "auth.js").write_text("// changed\n")
    diff = (await call(Workspace(repo / "src"), "git.diff"))["diff"]
    assert "diff --git a/auth.js b/auth.js" in diff and "README" not in diff


# ---------------------------------------------------------------------------------------------
# apply_patch
# ---------------------------------------------------------------------------------------------


async def test_apply_patch_changes_the_file(repo: Path) -> None:
    """A clean diff applies; files lists what changed."""
    value = await call(Workspace(repo), "apply_patch", diff=AUTH_PATCH)
    assert value == {"applied": True, "files": ["src/auth.js"]}
    assert "console.log('[logout] called');" in (repo / "src" / "auth.js").read_text()


async def test_apply_patch_outside_a_git_repository(root: Path) -> None:
    """git apply works as a better `patch` in a plain directory."""
    (root / "src").mkdir()
    (root / "src" / "auth.js").write_text(AUTH_JS)
    assert (await call(Workspace(root), "apply_patch", diff=AUTH_PATCH))["applied"] is True
    assert (root / "src" / "auth.js").read_text().count("console.log") == 2


async def test_apply_patch_with_wrong_hunk_counts_still_applies(repo: Path) -> None:
    """Models miscount @@ lengths; --recount fixes them."""
    diff = AUTH_PATCH.replace("@@ -1,3 +1,4 @@", "@@ -1,7 +1,2 @@").replace("@@ -5,3 +6,4 @@", "@@ -5 +6,9 @@")
    await call(Workspace(repo), "apply_patch", diff=diff)
    assert (repo / "src" / "auth.js").read_text().count("console.log") == 2


async def test_apply_patch_creates_a_new_file(root: Path) -> None:
    """--- /dev/null creates the file; files names the new path."""
    diff = "diff --git a/docs/new.md b/docs/new.md\nnew file mode 100644\n--- /dev/null\n+++ b/docs/new.md\n@@ -0,0 +1,2 @@\n+# New\n+text\n"
    assert (await call(Workspace(root), "apply_patch", diff=diff))["files"] == ["docs/new.md"]
    assert (root / "docs" / "new.md").read_text() == "# New\ntext\n"


async def test_apply_patch_plain_unified_diff(root: Path) -> None:
    """A `diff -u` style patch without `diff --git` lines is accepted too."""
    (root / "a.txt").write_text("one\ntwo\n")
    diff = "--- a/a.txt\t2024-01-01 00:00:00\n+++ b/a.txt\t2024-01-02 00:00:00\n@@ -1,2 +1,2 @@\n one\n-two\n+TWO\n"
    assert (await call(Workspace(root), "apply_patch", diff=diff))["files"] == ["a.txt"]
    assert (root / "a.txt").read_text() == "one\nTWO\n"


async def test_apply_patch_plain_diff_of_several_files(root: Path) -> None:
    """A `diff -ru` patch (no `diff --git` lines): a change with timestamps, a file created and one deleted through /dev/null, all applied."""
    (root / "a.txt").write_text("one\ntwo\n")
    (root / "old.txt").write_text("bye\n")
    diff = (
        "diff -ru a/a.txt b/a.txt\n--- a/a.txt\t2024-01-01 00:00:00\n+++ b/a.txt\t2024-01-02 00:00:00\n@@ -1,2 +1,2 @@\n one\n-two\n+TWO\n"
        "diff -ru a/new.txt b/new.txt\n--- /dev/null\n+++ b/new.txt\n@@ -0,0 +1 @@\n+hi\n"
        "--- a/old.txt\n+++ /dev/null\n@@ -1 +0,0 @@\n-bye\n"
    )
    assert (await call(Workspace(root), "apply_patch", diff=diff))["files"] == ["a.txt", "new.txt", "old.txt"]  # was: patch_failed
    assert sorted(p.name for p in root.iterdir()) == ["a.txt", "new.txt"]
    assert (root / "a.txt").read_text() == "one\nTWO\n" and (root / "new.txt").read_text() == "hi\n"


async def test_apply_patch_is_all_or_nothing(repo: Path) -> None:
    """Two files, the second's hunk does not fit: the first file is left unchanged too."""
    (repo / "b.txt").write_text("x\ny\n")
    commit(repo)
    diff = AUTH_PATCH + "diff --git a/b.txt b/b.txt\n--- a/b.txt\n+++ b/b.txt\n@@ -1,2 +1,2 @@\n x\n-not there\n+Y\n"
    error = await fails(Workspace(repo), "apply_patch", diff=diff)
    assert error.name == "patch_failed"
    assert (repo / "src" / "auth.js").read_text() == AUTH_JS
    assert (repo / "b.txt").read_text() == "x\ny\n"
    assert sh(repo, "git", "status", "--porcelain") == ""


async def test_apply_patch_error_names_file_and_hunk(repo: Path) -> None:
    """The failing hunk is named by file, index and @@ line; git's stderr is in data."""
    diff = AUTH_PATCH.replace(" function logout() {\n", " function signout() {\n")
    error = await fails(Workspace(repo), "apply_patch", diff=diff)
    assert error.name == "patch_failed"
    assert "src/auth.js" in error.message and "hunk 1" in error.message and "@@ -5,3 +6,4 @@" in error.message
    assert error.data["file"] == "src/auth.js" and error.data["hunk"] == 1 and error.data["line"] == 5
    assert "patch failed: src/auth.js:5" in error.data["stderr"]
    assert (repo / "src" / "auth.js").read_text() == AUTH_JS


async def test_apply_patch_to_a_missing_file_fails(root: Path) -> None:
    """A patch for a file that is not there: patch_failed naming it."""
    error = await fails(Workspace(root), "apply_patch", diff=AUTH_PATCH)
    assert error.name == "patch_failed" and "src/auth.js" in error.message


@pytest.mark.parametrize(
    "diff",
    ["just some text\n", "", "@@ -1 +1 @@\n-a\n+b\n", "diff --git a/x b/x\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n*a\n", "--- a/x\n+++ b/y\n@@ -1 +1 @@\n-a\n+b\n"],
    ids=["prose", "empty", "hunk-without-header", "corrupt-hunk", "plain-two-names"],
)
async def test_apply_patch_not_a_diff_is_patch_invalid(root: Path, diff: str) -> None:
    """Text that is no diff, a hunk with no file header, a hunk git cannot read, or a plain section naming two files: patch_invalid."""
    (root / "x").write_text("a\n")
    assert (await fails(Workspace(root), "apply_patch", diff=diff)).name == "patch_invalid"


OUTSIDE_PATCHES = {
    "dotdot": "diff --git a/../outside/secret.txt b/../outside/secret.txt\n--- a/../outside/secret.txt\n+++ b/../outside/secret.txt\n@@ -1 +1 @@\n-secret\n+pwned\n",
    "plain-dotdot": "--- a/../outside/secret.txt\n+++ b/../outside/secret.txt\n@@ -1 +1 @@\n-secret\n+pwned\n",
    "absolute": "--- /OUT/secret.txt\n+++ /OUT/secret.txt\n@@ -1 +1 @@\n-secret\n+pwned\n",
    "new-file-outside": "diff --git a/../outside/new.txt b/../outside/new.txt\nnew file mode 100644\n--- /dev/null\n+++ b/../outside/new.txt\n@@ -0,0 +1 @@\n+pwned\n",
    "symlink": "diff --git a/link.txt b/link.txt\n--- a/link.txt\n+++ b/link.txt\n@@ -1 +1 @@\n-secret\n+pwned\n",
    "rename-out": "diff --git a/a.txt b/a.txt\nsimilarity index 100%\nrename from a.txt\nrename to ../outside/a.txt\n",
    "second-file": AUTH_PATCH + "diff --git a/../outside/secret.txt b/../outside/secret.txt\n--- a/../outside/secret.txt\n+++ b/../outside/secret.txt\n@@ -1 +1 @@\n-secret\n+pwned\n",
}


@pytest.mark.parametrize("route", OUTSIDE_PATCHES)
async def test_apply_patch_header_outside_is_refused_and_nothing_touched(root: Path, route: str) -> None:
    """Any header path leaving the workspace refuses the whole patch before git runs."""
    (root / "src").mkdir()
    (root / "src" / "auth.js").write_text(AUTH_JS)
    (root / "a.txt").write_text("a\n")
    (root / "link.txt").symlink_to(root.parent / "outside" / "secret.txt")
    before = files_under(root.parent)
    diff = OUTSIDE_PATCHES[route].replace("/OUT/", str(root.parent / "outside") + "/")
    for method in ("apply_patch", "apply_patch_review"):
        assert (await fails(Workspace(root, policy=ide.YES), method, diff=diff)).name == "outside_workspace"
    assert files_under(root.parent) == before
    assert (root.parent / "outside" / "secret.txt").read_text() == "secret\n"
    assert (root / "src" / "auth.js").read_text() == AUTH_JS


async def test_apply_patch_to_a_file_past_the_read_cap_is_file_too_large(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A patch names a file larger than READ_SCAN_BYTES: file_too_large, and the file is not read whole (was: read into memory whatever its size)."""
    monkeypatch.setattr(ide, "READ_SCAN_BYTES", 1024)  # the same code, at a test's scale
    (root / "big.txt").write_text("line\n" * 1000)
    diff = "diff --git a/big.txt b/big.txt\n--- a/big.txt\n+++ b/big.txt\n@@ -1,2 +1,2 @@\n-line\n+first\n line\n"
    assert (await fails(Workspace(root), "apply_patch", diff=diff)).name == "file_too_large"
    assert (root / "big.txt").read_text() == "line\n" * 1000


async def test_apply_patch_in_a_subdirectory_of_the_repo(repo: Path) -> None:
    """A workspace below the repository's top: its own relative paths apply (not silently skipped)."""
    diff = AUTH_PATCH.replace("src/auth.js", "auth.js")
    assert (await call(Workspace(repo / "src"), "apply_patch", diff=diff))["files"] == ["auth.js"]
    assert (repo / "src" / "auth.js").read_text().count("console.log") == 2


async def test_apply_patch_round_trips_git_diff(repo: Path) -> None:
    """What git.diff returns, apply_patch applies back (the model's usual loop)."""
    (repo / "src" / "auth.js").write_text(AUTH_JS.replace("true", "false"))
    ws = Workspace(repo)
    diff = (await call(ws, "git.diff"))["diff"]
    sh(repo, "git", "checkout", "--", ".")
    await call(ws, "apply_patch", diff=diff)
    assert "return false;" in (repo / "src" / "auth.js").read_text()


# ---------------------------------------------------------------------------------------------
# apply_patch_review
# ---------------------------------------------------------------------------------------------

TWO_FILE_PATCH = AUTH_PATCH + "diff --git a/README.md b/README.md\n--- a/README.md\n+++ b/README.md\n@@ -1 +1,2 @@\n # demo\n+Now with logging.\n"


async def test_review_applies_only_accepted_hunks(repo: Path) -> None:
    """Answers y, n, y: hunks 0 and 2 are applied, hunk 1 is not."""
    ui = io.StringIO()
    ws = Workspace(repo, ask=scripted("y", "n", "yes"), ui=ui)
    value = await call(ws, "apply_patch_review", diff=TWO_FILE_PATCH, message="Add logging")
    assert value == {"accepted": [0, 2], "rejected": [1], "applied": True, "files": ["src/auth.js", "README.md"]}
    auth = (repo / "src" / "auth.js").read_text()
    assert "[login] called" in auth and "[logout] called" not in auth
    assert (repo / "README.md").read_text() == "# demo\nNow with logging.\n"
    shown = ui.getvalue()
    assert shown.index("Add logging") < shown.index("@@ -1,3 +1,4 @@") < shown.index("@@ -5,3 +6,4 @@")


async def test_review_all_accepts_the_rest(repo: Path) -> None:
    """n, then a: the first hunk rejected, the others accepted without further questions."""
    ask = scripted("n", "a")
    value = await call(Workspace(repo, ask=ask, ui=io.StringIO()), "apply_patch_review", diff=TWO_FILE_PATCH)
    assert (value["accepted"], value["rejected"]) == ([1, 2], [0])
    assert len(ask.prompts) == 2  # type: ignore[attr-defined]


async def test_review_done_rejects_the_rest(repo: Path) -> None:
    """y, then d: only the first hunk applies."""
    value = await call(Workspace(repo, ask=scripted("y", "d"), ui=io.StringIO()), "apply_patch_review", diff=TWO_FILE_PATCH)
    assert (value["accepted"], value["rejected"], value["files"]) == ([0], [1, 2], ["src/auth.js"])
    assert (repo / "README.md").read_text() == "# demo\n"


async def test_review_reasks_after_an_unknown_answer(repo: Path) -> None:
    """`maybe` is not an answer: the same hunk is asked again."""
    ask = scripted("maybe", "y", "n", "n")
    value = await call(Workspace(repo, ask=ask, ui=io.StringIO()), "apply_patch_review", diff=TWO_FILE_PATCH)
    assert value["accepted"] == [0] and len(ask.prompts) == 4  # type: ignore[attr-defined]


async def test_review_end_of_input_rejects_the_rest(repo: Path) -> None:
    """The user going away (EOF) rejects what was not answered; nothing accepted, nothing applied."""
    value = await call(Workspace(repo, ask=scripted(), ui=io.StringIO()), "apply_patch_review", diff=TWO_FILE_PATCH)
    assert value == {"accepted": [], "rejected": [0, 1, 2], "applied": False, "files": []}
    assert sh(repo, "git", "status", "--porcelain") == ""


async def test_review_yes_accepts_everything_without_asking(repo: Path) -> None:
    """--yes: every hunk accepted and applied, ask() never called."""
    ask = scripted()
    value = await call(Workspace(repo, ask=ask, policy=ide.YES), "apply_patch_review", diff=TWO_FILE_PATCH)
    assert value == {"accepted": [0, 1, 2], "rejected": [], "applied": True, "files": ["src/auth.js", "README.md"]}
    assert ask.prompts == []  # type: ignore[attr-defined]


async def test_review_no_rejects_everything_and_touches_nothing(repo: Path) -> None:
    """--no: applied false, every file unchanged, ask() never called."""
    ask = scripted()
    value = await call(Workspace(repo, ask=ask, policy=ide.NO), "apply_patch_review", diff=TWO_FILE_PATCH)
    assert value == {"accepted": [], "rejected": [0, 1, 2], "applied": False, "files": []}
    assert sh(repo, "git", "status", "--porcelain") == "" and ask.prompts == []  # type: ignore[attr-defined]


async def test_review_accepted_hunk_that_fails_changes_nothing(repo: Path) -> None:
    """Accepted hunks still apply all or nothing: one misfit, no file changed, patch_failed."""
    diff = TWO_FILE_PATCH.replace(" # demo\n", " # other\n")
    error = await fails(Workspace(repo, policy=ide.YES), "apply_patch_review", diff=diff)
    assert error.name == "patch_failed" and "README.md" in error.message
    assert sh(repo, "git", "status", "--porcelain") == ""


async def test_review_hunks_are_coloured_on_a_terminal(repo: Path) -> None:
    """On a tty: @@ cyan, + green, - red."""

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    ui = Tty()
    diff = "diff --git a/README.md b/README.md\n--- a/README.md\n+++ b/README.md\n@@ -1 +1 @@\n-# demo\n+# Demo\n"
    await call(Workspace(repo, ask=scripted("n"), ui=ui), "apply_patch_review", diff=diff)
    assert "\x1b[36m@@ -1 +1 @@\x1b[0m" in ui.getvalue()
    assert "\x1b[31m-# demo\x1b[0m" in ui.getvalue() and "\x1b[32m+# Demo\x1b[0m" in ui.getvalue()


# ---------------------------------------------------------------------------------------------
# prompt_user
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answers", "expected"),
    [(["no"], "no"), (["YES"], "yes"), (["2"], "no"), (["y"], "yes"), (["maybe", "9", "yes"], "yes")],
    ids=["exact", "other-case", "by-number", "unique-prefix", "reasked-until-valid"],
)
async def test_prompt_user_with_options(root: Path, answers: list[str], expected: str) -> None:
    """With options the answer is one of them, named or numbered; anything else is asked again."""
    ui = io.StringIO()
    value = await call(Workspace(root, ask=scripted(*answers), ui=ui), "prompt_user", message="Proceed?", options=["yes", "no"])
    assert value == {"answer": expected, "declined": False}
    assert "Proceed?" in ui.getvalue() and "2) no" in ui.getvalue()


async def test_prompt_user_free_text(root: Path) -> None:
    """Without options any non-empty line is the answer."""
    value = await call(Workspace(root, ask=scripted("  use tabs "), ui=io.StringIO()), "prompt_user", message="Style?")
    assert value == {"answer": "use tabs", "declined": False}


@pytest.mark.parametrize("answers", [[""], []], ids=["empty-answer", "end-of-input"])
async def test_prompt_user_decline_is_a_result(root: Path, answers: list[str]) -> None:
    """An empty answer or Ctrl-D declines: answer null, declined true, not an error."""
    value = await call(Workspace(root, ask=scripted(*answers), ui=io.StringIO()), "prompt_user", message="Proceed?", options=["yes", "no"])
    assert value == {"answer": None, "declined": True}


@pytest.mark.parametrize(
    ("policy", "options", "expected"),
    [(ide.YES, ["deploy", "wait"], {"answer": "deploy", "declined": False}), (ide.YES, None, {"answer": "yes", "declined": False}), (ide.NO, ["deploy", "wait"], {"answer": None, "declined": True})],
    ids=["yes-first-option", "yes-no-options", "no-declines"],
)
async def test_prompt_user_yes_and_no_never_ask(root: Path, policy: str, options: list[str] | None, expected: dict[str, Any]) -> None:
    """--yes answers the first option (or "yes"); --no declines; the terminal is not used."""
    ask = scripted()
    params: dict[str, Any] = {"message": "Deploy?"} | ({"options": options} if options else {})
    assert await call(Workspace(root, ask=ask, policy=policy), "prompt_user", **params) == expected
    assert ask.prompts == []  # type: ignore[attr-defined]


async def test_prompt_user_without_a_terminal_declines(root: Path) -> None:
    """The default ask() (no terminal) declines every question."""
    assert await call(Workspace(root), "prompt_user", message="Proceed?") == {"answer": None, "declined": True}


@pytest.mark.parametrize("params", [{}, {"message": 1}, {"message": "?", "options": "yes"}, {"message": "?", "options": [1, 2]}])
async def test_prompt_user_invalid_arguments(root: Path, params: dict[str, Any]) -> None:
    """A missing message or options that are not strings: invalid_arguments."""
    assert (await fails(Workspace(root), "prompt_user", **params)).name == "invalid_arguments"


# ---------------------------------------------------------------------------------------------
# Diff parsing
# ---------------------------------------------------------------------------------------------


def test_parse_diff_splits_files_and_hunks() -> None:
    """Two files, three hunks; a removed line that looks like `--- ` stays in its hunk."""
    diff = TWO_FILE_PATCH.replace(" function logout() {\n", "--- not a header\n+++ still not\n function logout() {\n")
    files = ide.parse_diff(diff)
    assert [f.path for f in files] == ["src/auth.js", "README.md"]
    assert [len(f.hunks) for f in files] == [2, 1]
    assert "--- not a header\n" in files[0].hunks[1]
    assert ide.join_diff(files) == diff


def test_parse_diff_reads_quoted_and_renamed_paths() -> None:
    """git's C-quoted names are unquoted; rename lines name the new path."""
    quoted = 'diff --git "a/caf\\303\\251.txt" "b/caf\\303\\251.txt"\n--- "a/caf\\303\\251.txt"\n+++ "b/caf\\303\\251.txt"\n@@ -1 +1 @@\n-a\n+b\n'
    assert ide.parse_diff(quoted)[0].paths == ["café.txt"] * 4
    rename = "diff --git a/old.txt b/new.txt\nsimilarity index 100%\nrename from old.txt\nrename to new.txt\n"
    assert ide.parse_diff(rename)[0].path == "new.txt"


@pytest.mark.parametrize(
    ("files", "shown"),
    [
        (["src/auth.js"], "apply_patch src/auth.js"),
        (["a.txt", "b.txt"], "apply_patch 2 files: a.txt, b.txt"),
        ([f"src/module_{n:02d}.py" for n in range(12)], "apply_patch 12 files: src/module_00.py, src/module_01.py, src/module_02.py, src/module_03.py, … (+8 more)"),
    ],
    ids=["one", "two", "cut"],
)
def test_tool_line_counts_the_files_it_cannot_show(files: list[str], shown: str) -> None:
    """The [tool] line names a patch's files; past 80 characters it says how many more there are (was: cut at 80 with no mark)."""
    assert ide.describe("apply_patch", {"diff": ""}, {"applied": True, "files": files}) == shown


# ---------------------------------------------------------------------------------------------
# The client against a scripted gateway (a small local aiohttp app, as the real one would talk)
# ---------------------------------------------------------------------------------------------

Script = Callable[[web.WebSocketResponse, list[dict[str, Any]]], Any]


@pytest.fixture
async def fake_gateway(aiohttp_server: Any) -> AsyncIterator[Callable[[Script], Any]]:
    """Start a one-socket fake gateway running `script(ws, received)`; yields a connect function."""
    sessions: list[aiohttp.ClientSession] = []

    async def start(script: Script) -> tuple[aiohttp.ClientWebSocketResponse, list[dict[str, Any]]]:
        received: list[dict[str, Any]] = []

        async def handler(req: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse()
            await ws.prepare(req)
            assert req.headers.get("Authorization") == "Bearer t0ken"
            await script(ws, received)
            return ws

        app = web.Application()
        app.router.add_get("/ws", handler)
        server = await aiohttp_server(app)
        session = aiohttp.ClientSession()
        sessions.append(session)
        ws = await ide.connect(session, f"ws://127.0.0.1:{server.port}/ws", "t0ken")
        return ws, received

    yield start
    for session in sessions:
        await session.close()


async def read(ws: web.WebSocketResponse, received: list[dict[str, Any]]) -> dict[str, Any]:
    frame = json.loads(await asyncio.wait_for(ws.receive_str(), 5))
    received.append(frame)
    return frame


async def test_turn_streams_tokens_answers_tools_and_completes(fake_gateway: Any, repo: Path) -> None:
    """user_message -> result, tokens, a tool request answered with the same id, final completed."""

    async def script(ws: web.WebSocketResponse, received: list[dict[str, Any]]) -> None:
        first = await read(ws, received)
        await ws.send_str(result(first["id"], {"session_id": "ses_1", "run_id": "run_1"}))
        await ws.send_str(notification("token", {"run_id": "run_1", "seq": 1, "text": "Reading"}))
        await ws.send_str(request("call_A", "read_file", {"path": "README.md"}))
        await read(ws, received)
        await ws.send_str(request("call_B", "read_file", {"path": "../outside/secret.txt"}))
        await read(ws, received)
        await ws.send_str(notification("token", {"run_id": "run_1", "seq": 2, "text": " done."}))
        await ws.send_str(notification("final", {"run_id": "run_1", "seq": 3, "status": "completed", "content": "Reading done."}))
        await ws.receive()

    ws, received = await fake_gateway(script)
    out, note = io.StringIO(), io.StringIO()
    turn = await ide.play_turn(ws, "Add logging", Workspace(repo), out=out, note=note)
    assert (turn.status, turn.exit_code, turn.run_id, turn.session_id) == ("completed", 0, "run_1", "ses_1")
    assert turn.tokens == ["Reading", " done."] and turn.tools == ["read_file", "read_file"]
    assert out.getvalue() == "Reading\n done.\n"  # a tool note ends the line of text before it
    assert received[0] == {"jsonrpc": "2.0", "id": 1, "method": "user_message", "params": {"content": "Add logging"}}
    assert received[1]["id"] == "call_A" and received[1]["result"]["content"] == "# demo\n"
    assert received[2]["id"] == "call_B" and received[2]["error"]["code"] == TOOL_ERRORS["outside_workspace"]
    assert "[tool] read_file README.md -> ok" in note.getvalue()
    assert "[tool] read_file ../outside/secret.txt -> error:" in note.getvalue()


async def test_unknown_request_gets_method_not_found(fake_gateway: Any, root: Path) -> None:
    """A request for a method the IDE does not have is answered -32601; the turn goes on."""

    async def script(ws: web.WebSocketResponse, received: list[dict[str, Any]]) -> None:
        first = await read(ws, received)
        await ws.send_str(result(first["id"], {"session_id": "s", "run_id": "r"}))
        await ws.send_str(request(42, "make_coffee", {}))
        await read(ws, received)
        await ws.send_str(notification("final", {"run_id": "r", "seq": 1, "status": "completed", "content": "ok"}))
        await ws.receive()

    ws, received = await fake_gateway(script)
    turn = await ide.play_turn(ws, "hi", Workspace(root), out=io.StringIO(), note=io.StringIO())
    assert received[1]["id"] == 42 and received[1]["error"]["code"] == -32601
    assert turn.status == "completed" and turn.tools == []


async def test_error_notification_ends_the_turn_non_zero(fake_gateway: Any, root: Path) -> None:
    """An `error` notification: status error, its code and message kept and shown on stderr."""

    async def script(ws: web.WebSocketResponse, received: list[dict[str, Any]]) -> None:
        first = await read(ws, received)
        await ws.send_str(result(first["id"], {"session_id": "s", "run_id": "r"}))
        await ws.send_str(notification("error", {"run_id": "r", "seq": 1, "code": "llm_unavailable", "message": "proxy down", "retryable": True}))
        await ws.receive()

    ws, _ = await fake_gateway(script)
    note = io.StringIO()
    turn = await ide.play_turn(ws, "hi", Workspace(root), out=io.StringIO(), note=note)
    assert (turn.status, turn.code, turn.content, turn.exit_code) == ("error", "llm_unavailable", "proxy down", 1)
    assert "error [llm_unavailable]: proxy down" in note.getvalue()


async def test_cancel_event_sends_cancel_with_the_run_id(fake_gateway: Any, root: Path) -> None:
    """Setting `cancel` sends the cancel notification; the run's final cancelled exits non-zero."""

    async def script(ws: web.WebSocketResponse, received: list[dict[str, Any]]) -> None:
        first = await read(ws, received)
        await ws.send_str(result(first["id"], {"session_id": "s", "run_id": "run_9"}))
        await ws.send_str(notification("token", {"run_id": "run_9", "seq": 1, "text": "working"}))
        await read(ws, received)  # the cancel
        await ws.send_str(notification("final", {"run_id": "run_9", "seq": 2, "status": "cancelled", "content": "working"}))
        await ws.receive()

    ws, received = await fake_gateway(script)
    cancel = asyncio.Event()
    out = io.StringIO()

    async def press_ctrl_c() -> None:
        while "working" not in out.getvalue():
            await asyncio.sleep(0.01)
        cancel.set()

    presser = asyncio.create_task(press_ctrl_c())
    turn = await ide.play_turn(ws, "hi", Workspace(root), out=out, note=io.StringIO(), cancel=cancel)
    await presser
    assert received[1] == {"jsonrpc": "2.0", "method": "cancel", "params": {"run_id": "run_9"}}
    assert (turn.status, turn.exit_code) == ("cancelled", 1)


async def test_close_4401_is_a_token_error(fake_gateway: Any, root: Path) -> None:
    """The gateway closing with 4401: ClientExit with the reason and the usage exit status."""

    async def script(ws: web.WebSocketResponse, received: list[dict[str, Any]]) -> None:
        await ws.close(code=4401, message=b"unauthorized: wrong token")

    ws, _ = await fake_gateway(script)
    with pytest.raises(ClientExit) as caught:
        await ide.play_turn(ws, "hi", Workspace(root), out=io.StringIO(), note=io.StringIO())
    assert caught.value.status == ide.EXIT_USAGE and "wrong token" in str(caught.value)


async def test_dropped_connection_is_a_connection_error(fake_gateway: Any, root: Path) -> None:
    """The socket closing mid-turn: ClientExit with the connection exit status."""

    async def script(ws: web.WebSocketResponse, received: list[dict[str, Any]]) -> None:
        first = await read(ws, received)
        await ws.send_str(result(first["id"], {"session_id": "s", "run_id": "r"}))
        await ws.close(code=1011, message=b"boom")

    ws, _ = await fake_gateway(script)
    with pytest.raises(ClientExit) as caught:
        await ide.play_turn(ws, "hi", Workspace(root), out=io.StringIO(), note=io.StringIO())
    assert caught.value.status == ide.EXIT_CONNECTION and "1011" in str(caught.value)


async def test_unreachable_gateway_is_a_connection_error() -> None:
    """Nothing listening: ClientExit telling the user to start the gateway."""
    async with aiohttp.ClientSession() as session:
        with pytest.raises(ClientExit) as caught:
            await ide.connect(session, "ws://127.0.0.1:9/ws", "t")
    assert caught.value.status == ide.EXIT_CONNECTION and "gateway" in str(caught.value)


# ---------------------------------------------------------------------------------------------
# Finding the token
# ---------------------------------------------------------------------------------------------


def test_token_flag_then_env_then_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--token wins, then GATEWAY_TOKEN, then the file the gateway wrote for that port."""
    monkeypatch.setenv("GATEWAY_RUNTIME_DIR", str(tmp_path))
    (tmp_path / "gateway-8123.json").write_text(json.dumps({"url": "ws://127.0.0.1:8123/ws", "token": "from-file", "pid": 1}))
    monkeypatch.setenv("GATEWAY_TOKEN", "from-env")
    assert ide.find_token("ws://127.0.0.1:8123/ws", "from-flag") == "from-flag"
    assert ide.find_token("ws://127.0.0.1:8123/ws", None) == "from-env"
    monkeypatch.delenv("GATEWAY_TOKEN")
    assert ide.find_token("ws://127.0.0.1:8123/ws", None) == "from-file"


def test_token_file_is_not_sent_to_another_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local token file is only used for a loopback gateway; otherwise a clear ClientExit."""
    monkeypatch.setenv("GATEWAY_RUNTIME_DIR", str(tmp_path))
    monkeypatch.delenv("GATEWAY_TOKEN", raising=False)
    (tmp_path / "gateway-8123.json").write_text(json.dumps({"url": "ws://127.0.0.1:8123/ws", "token": "local", "pid": 1}))
    with pytest.raises(ClientExit) as caught:
        ide.find_token("ws://example.com:8123/ws", None)
    assert caught.value.status == ide.EXIT_USAGE and "GATEWAY_TOKEN" in str(caught.value)


def test_no_token_anywhere_exits_with_advice(tmp_path: Path) -> None:
    """`python ide.py PROMPT` with no token: non-zero, naming GATEWAY_TOKEN and the gateway."""
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_TOKEN"} | {"GATEWAY_RUNTIME_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(Path(ide.__file__)), "--workspace", str(tmp_path), "hi"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == ide.EXIT_USAGE
    assert "GATEWAY_TOKEN" in done.stderr and "gateway" in done.stderr


def test_help_describes_the_command_line() -> None:
    """--help exits 0 and names every option."""
    done = subprocess.run([sys.executable, str(Path(ide.__file__)), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    for option in ("--workspace", "--gateway", "--token", "--yes", "--no", "PROMPT"):
        assert option in done.stdout
