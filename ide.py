"""ide.py: the reference IDE, a terminal client that runs the agent's tools on your files.

    [IDE] ⇄ gateway → agent → llm_proxy → LLM
      ↑ read_file, write_file, git.diff, apply_patch, apply_patch_review, prompt_user
        run here, on --workspace: the model never touches the disk itself

Run:  python ide.py --workspace DIR [--gateway ws://127.0.0.1:8000/ws] [--token T] [--yes | --no] [PROMPT]

With PROMPT it plays one turn and exits: 0 when the run completes, 1 when it is cancelled or
ends with an error, 2 when the token is missing or refused, 3 when the gateway cannot be reached
or goes away, 130 on a second Ctrl-C. Without PROMPT it is a prompt loop (`> `), one conversation
on one socket: Ctrl-C during a turn cancels the run, Ctrl-D quits. The model's text goes to
stdout, everything else (prompts, hunks, one line per tool run) to stderr, so stdout can be piped.

The file reads top down: the six tools (Workspace, plain methods testable without a network),
then the client (run_turn, one user message to its final or error), then the command line.
Safety rules the tools keep: every path, including the file headers inside a diff, must resolve
(symlinks followed) inside the workspace before anything is read or written; writes are atomic;
patches apply all or nothing; git runs from an argument list, never a shell string.

Left out: an editor UI, several conversations per socket, reconnecting, binary patches, and
guarding against a file being swapped for a symlink between the path check and the write
(a time-of-check race the user would have to mount against themselves).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp

from protocol import (
    CANCEL,
    COMPLETED,
    ERROR,
    FINAL,
    INTERNAL_ERROR,
    METHOD_NOT_FOUND,
    TOKEN,
    TOOL_ERRORS,
    TOOL_METHODS,
    USER_MESSAGE,
    WS_UNAUTHORIZED,
    JsonId,
    Message,
    RpcError,
    dumps,
    error_response,
    notification,
    parse_message,
    request,
    result,
    token_file,
)

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

DEFAULT_GATEWAY = "ws://127.0.0.1:8000/ws"  # the gateway's WebSocket; --gateway overrides
# Caps count bytes as they go on the wire, JSON-escaped (a control character takes six), so a
# tool's answer always fits the gateway's 1 MiB frame limit (GATEWAY_MAX_FRAME_BYTES).
READ_CAP_BYTES = 256 * 1024  # most file content one read_file returns; more sets truncated
DIFF_CAP_BYTES = 256 * 1024  # most diff text one git.diff returns; more sets truncated
GIT_TIMEOUT_S = 30.0  # one git command; a hung git becomes a tool error, not a hung IDE
CONNECT_TIMEOUT_S = 10.0  # reaching the gateway
MAX_FRAME_BYTES = 16 * 1024 * 1024  # largest frame taken from the gateway (a big diff to apply)
NEW_FILE_MODE = 0o644  # permissions of a file write_file creates; an overwrite keeps the old ones
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")  # the only hosts the token file is sent to

# --yes / --no: how apply_patch_review and prompt_user get their answers
ASK, YES, NO = "ask", "yes", "no"

# exit statuses of the command line (2 is also argparse's own for a bad command line)
EXIT_OK = 0
EXIT_RUN_FAILED = 1  # the run was cancelled or ended with an error
EXIT_USAGE = 2  # no workspace, no token found, or a token the gateway refused (close code 4401)
EXIT_CONNECTION = 3  # the gateway could not be reached, or the socket dropped
EXIT_INTERRUPTED = 130  # a second Ctrl-C, the shell's convention for SIGINT

Ask = Callable[[str], Awaitable[str]]  # show a prompt, return the line typed; EOFError if none will come

# ---------------------------------------------------------------------------------------------
# Tool errors and argument checks
# ---------------------------------------------------------------------------------------------


class ToolError(Exception):
    """A tool failure the model reads: becomes a JSON-RPC error {code, message, data?}."""

    def __init__(self, name: str, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.name = name  # a key of tools_spec.json's error_codes, e.g. "outside_workspace"
        self.code = TOOL_ERRORS[name]
        self.message = message
        self.data = data

    def response(self, id: JsonId) -> str:
        return error_response(id, self.code, self.message, self.data)


def check_args(params: dict[str, Any], required: dict[str, type], optional: dict[str, type]) -> None:
    """Check a tool's arguments against its schema's names and types; invalid_arguments if off."""
    expected = {**required, **optional}
    unknown = sorted(set(params) - set(expected))
    if unknown:
        raise ToolError("invalid_arguments", f"unexpected argument(s) {', '.join(unknown)}; expected {', '.join(expected)}")
    for name in required:
        if name not in params:
            raise ToolError("invalid_arguments", f"missing required argument {name!r}")
    for name, kind in expected.items():
        value = params.get(name)
        # bool is an int in Python, but true is not a line number in JSON
        if name in params and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise ToolError("invalid_arguments", f"{name} must be a {kind.__name__}, got {type(value).__name__}: {value!r:.80}")


# ---------------------------------------------------------------------------------------------
# Files: atomic writes and line splitting
# ---------------------------------------------------------------------------------------------


def atomic_write(target: Path, data: bytes) -> None:
    """Write data to target all at once, or not at all.

    A temp file in the same directory (so os.replace is a rename within one filesystem) is
    written, fsynced and renamed over the target; if any step fails, the temp file is removed
    and the target is as it was.
    """
    mode = stat.S_IMODE(target.stat().st_mode) if target.is_file() else NEW_FILE_MODE
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def wire_size(text: str) -> int:
    """The bytes `text` takes inside a JSON frame, quotes not counted."""
    return len(dumps(text).encode("utf-8")) - 2


def take_lines(lines: list[str], budget: int) -> tuple[list[str], bool]:
    """The leading lines whose wire size fits `budget`, and whether any were left out.

    When even the first line is larger than the budget, its longest prefix that fits is kept.
    """
    kept: list[str] = []
    used = 0
    for line in lines:
        size = wire_size(line)
        if used + size > budget:
            return kept or [longest_prefix(line, budget)], True
        kept.append(line)
        used += size
    return kept, False


def longest_prefix(text: str, budget: int) -> str:
    """Binary search for the longest start of `text` whose wire size fits `budget`."""
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if wire_size(text[:middle]) <= budget else (low, middle - 1)
    return text[:low]


def split_lines(text: str) -> list[str]:
    """Lines with their ends kept, split on \\n only (str.splitlines also splits on \\f, \\x1c,
    U+2028 and more, which would number lines differently from editors and git)."""
    parts = text.split("\n")
    lines = [part + "\n" for part in parts[:-1]]
    return lines + [parts[-1]] if parts[-1] else lines


# ---------------------------------------------------------------------------------------------
# Unified diffs: split into files and hunks, read the paths in their headers
# ---------------------------------------------------------------------------------------------

_HUNK = re.compile(r"^@@ -(\d+)(?:,\d+)? \+\d+(?:,\d+)? @@")
_PATCH_FAILED = re.compile(r"^error: patch failed: (.+):(\d+)$", re.M)


@dataclass
class FileDiff:
    """One file's part of a unified diff, its lines kept verbatim."""

    header: list[str]  # from "diff --git" (or "---") to the first "@@": index, mode, ---/+++ lines
    hunks: list[str] = field(default_factory=list)  # each hunk's text, its "@@" line first
    paths: list[str] = field(default_factory=list)  # every path the header names, as git apply reads it
    git: bool = False  # started with "diff --git": then "---" inside a hunk is a removed line

    @property
    def path(self) -> str:
        """The path the file has after the patch; the one it had before, for a deletion."""
        named = [p for p in self.paths if p != "/dev/null"]
        if not named:
            return ""
        return named[0] if self.paths[-1] == "/dev/null" else named[-1]


def unquote(path: str) -> str:
    """git's C-style quoting of unusual names: "a/caf\\303\\251.txt" -> a/café.txt."""
    if not (len(path) >= 2 and path.startswith('"') and path.endswith('"')):
        return path
    escapes = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11}

    def one(match: re.Match[bytes]) -> bytes:
        code = match.group(1).decode()
        return bytes([int(code, 8) if code[0].isdigit() else escapes.get(code, ord(code))])

    return re.sub(rb"\\([0-7]{1,3}|.)", one, path[1:-1].encode()).decode("utf-8", errors="replace")


def strip_prefix(path: str) -> str:
    """What `git apply` (-p1) does with a ---/+++ path: drop its first component, a/ or b/.
    An absolute path is kept whole, for the workspace check to refuse."""
    if path == "/dev/null" or path.startswith("/") or "/" not in path:
        return path
    return path.split("/", 1)[1]


def header_path(line: str, marker: str) -> str:
    """The path of a `--- X` / `+++ X` line, without the tab and timestamp GNU diff adds."""
    return unquote(line[len(marker) :].rstrip("\r\n").split("\t")[0])


def git_header_paths(line: str) -> list[str]:
    """The two paths of `diff --git a/X b/X`, prefixes stripped; [] when spaces make it
    ambiguous (the ---/+++ or rename lines that follow name the paths, and git checks they agree)."""
    rest = line[len("diff --git ") :].rstrip("\r\n")
    if rest.startswith('"') or rest.endswith('"'):
        quoted = re.findall(r'"(?:[^"\\]|\\.)*"|\S+', rest)
        return [strip_prefix(unquote(p)) for p in quoted] if len(quoted) == 2 else []
    half = (len(rest) - 1) // 2  # "a/X b/X": both halves the same length
    old, new = strip_prefix(rest[:half]), strip_prefix(rest[half + 1 :])
    return [old, new] if rest[half : half + 1] == " " and old == new else []


def parse_diff(diff: str) -> list[FileDiff]:
    """Split a unified diff into files and hunks. Lines before the first header are dropped.

    NOTE: a hunk's line counts are not trusted (git apply --recount redoes them), so a file
    starts at "diff --git", or at a "---"/"+++" pair when it is not inside a git diff's hunk.
    """
    lines = split_lines(diff)
    files: list[FileDiff] = []
    current: FileDiff | None = None
    in_hunk = False
    for i, line in enumerate(lines):
        next_line = lines[i + 1] if i + 1 < len(lines) else ""
        plain_header = line.startswith("--- ") and next_line.startswith("+++ ")
        if line.startswith("diff --git "):
            current = FileDiff([line], paths=git_header_paths(line), git=True)
            files.append(current)
            in_hunk = False
        elif plain_header and (current is None or (in_hunk and not current.git)):
            current = FileDiff([line], paths=[strip_prefix(header_path(line, "--- "))])  # plain `diff -u`
            files.append(current)
            in_hunk = False
        elif line.startswith("@@") and current is not None:
            current.hunks.append(line)
            in_hunk = True
        elif in_hunk and current is not None:
            current.hunks[-1] += line
        elif current is not None:
            current.header.append(line)
            if line.startswith(("--- ", "+++ ")):
                current.paths.append(strip_prefix(header_path(line, line[:4])))
            for marker in ("rename from ", "rename to ", "copy from ", "copy to "):
                if line.startswith(marker):  # these carry no a/ b/ prefix
                    current.paths.append(header_path(line, marker))
    return files


def hunk_start(hunk: str) -> int:
    match = _HUNK.match(hunk)
    return int(match.group(1)) if match else 0


def join_diff(files: list[FileDiff]) -> str:
    return "".join("".join(file.header) + "".join(file.hunks) for file in files)


# ---------------------------------------------------------------------------------------------
# git, run from an argument list
# ---------------------------------------------------------------------------------------------

# C locale: git's messages are parsed (e.g. "error: patch failed: FILE:LINE"); no prompts for
# credentials; no lock taken just to refresh the index while the user runs git too. The shell's
# own GIT_* variables (GIT_DIR, GIT_WORK_TREE, ...) are dropped: git must find the workspace's repo.
GIT_ENV = {"LC_ALL": "C", "LANG": "C", "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0"}


async def git(root: Path, args: list[str], stdin: bytes | None = None) -> tuple[int, bytes, str]:
    """Run `git ARGS` in root; return (exit status, stdout, stderr). Never through a shell."""
    try:
        process = await asyncio.create_subprocess_exec(
            "git",
            *args,
            cwd=root,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("GIT_")}, **GIT_ENV},
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise ToolError("git_failed", "git is not installed on the IDE's machine") from None
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), GIT_TIMEOUT_S)
    except BaseException as exc:  # a timeout, or the run ended: do not leave git running
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        if isinstance(exc, TimeoutError):
            raise ToolError("git_failed", f"git {args[0]} took longer than {GIT_TIMEOUT_S:g} s") from None
        raise
    return process.returncode or 0, out, err.decode("utf-8", errors="replace")


async def git_prefix(root: Path) -> str | None:
    """Where root sits inside its repository ("" at the top, "sub/" below); None outside one."""
    status, out, _ = await git(root, ["rev-parse", "--show-prefix"])
    return out.decode("utf-8", errors="replace").strip() if status == 0 else None


# ---------------------------------------------------------------------------------------------
# The six tools
# ---------------------------------------------------------------------------------------------


async def no_terminal(prompt: str) -> str:
    """The ask() of an IDE without a terminal: every question is declined."""
    raise EOFError


class Workspace:
    """The six tools of tools_spec.json, run on one directory.

    Each method takes the tool's arguments as the gateway sent them and returns the result
    object of its schema, or raises ToolError. `policy` is ASK, YES (accept every hunk, answer
    the first option) or NO (reject and decline everything) for the two tools that ask the user;
    `ask` is how they ask, and `ui` where hunks and questions are shown.
    """

    def __init__(self, root: Path | str, ask: Ask = no_terminal, policy: str = ASK, ui: TextIO = sys.stderr) -> None:
        self.root = Path(root).resolve()
        self.ask = ask
        self.policy = policy
        self.ui = ui
        self.colour = ui.isatty() and not os.environ.get("NO_COLOR")
        self.dialogue = asyncio.Lock()  # one question on the terminal at a time

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Run one tool request: the result object, or ToolError."""
        if method == "read_file":
            return self.read_file(params)
        if method == "write_file":
            return self.write_file(params)
        if method == "git.diff":
            return await self.git_diff(params)
        if method == "apply_patch":
            return await self.apply_patch(params)
        if method == "apply_patch_review":
            return await self.apply_patch_review(params)
        if method == "prompt_user":
            return await self.prompt_user(params)
        raise ToolError("not_implemented", f"this IDE has no tool {method!r}")

    def resolve(self, path: Any) -> Path:
        """The real location of a workspace-relative path; outside_workspace if it leaves the root.

        Path.resolve() follows every symlink that exists along the way (a link inside the
        workspace pointing out is caught) and folds `..` lexically where nothing exists yet.
        """
        if not isinstance(path, str) or not path or "\0" in path:
            raise ToolError("invalid_arguments", f"path must be a non-empty string, got {path!r}")
        if Path(path).is_absolute():
            raise ToolError("outside_workspace", f"{path!r} is absolute; paths are relative to the workspace root")
        target = (self.root / path).resolve()
        if not target.is_relative_to(self.root):
            raise ToolError("outside_workspace", f"{path!r} resolves outside the workspace; paths must stay inside it")  # where it points is not told
        return target

    # -- read_file, write_file -------------------------------------------------------------------

    def read_file(self, params: dict[str, Any]) -> dict[str, Any]:
        """{path, start_line?, end_line?} -> {path, content, start_line, end_line, total_lines, truncated}.

        Lines are 1-based and inclusive; end_line past the end is clamped. An empty file
        returns start_line 1, end_line 0. The file is read whole: total_lines needs every line.
        """
        check_args(params, {"path": str}, {"start_line": int, "end_line": int})
        path = params["path"]
        target = self.resolve(path)
        start, end = params.get("start_line", 1), params.get("end_line")
        if start < 1 or (end is not None and end < 1):
            raise ToolError("bad_range", f"lines are numbered from 1; got start_line={start}, end_line={end}")
        if end is not None and start > end:
            raise ToolError("bad_range", f"start_line {start} is after end_line {end}")
        if target.is_dir():
            raise ToolError("is_directory", f"{path!r} is a directory")
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            raise ToolError("not_found", f"{path!r} does not exist") from None
        except OSError as exc:
            raise ToolError("io_error", f"cannot read {path!r}: {exc.strerror or exc}") from None
        try:
            if b"\0" in data:
                raise ValueError
            lines = split_lines(data.decode("utf-8"))
        except ValueError:
            raise ToolError("binary_file", f"{path!r} is not a UTF-8 text file") from None
        total = len(lines)
        if total == 0:
            return {"path": path, "content": "", "start_line": 1, "end_line": 0, "total_lines": 0, "truncated": False}
        if start > total:
            raise ToolError("bad_range", f"start_line {start} is past the end of {path!r}, which has {total} lines")
        end = min(end or total, total)
        content, truncated = take_lines(lines[start - 1 : end], READ_CAP_BYTES)
        return {
            "path": path,
            "content": "".join(content),
            "start_line": start,
            "end_line": start + len(content) - 1,
            "total_lines": total,
            "truncated": truncated,
        }

    def write_file(self, params: dict[str, Any]) -> dict[str, Any]:
        """{path, content} -> {path, created, bytes_written}. Parent directories are created."""
        check_args(params, {"path": str, "content": str}, {})
        path = params["path"]
        target = self.resolve(path)
        if target.is_dir():
            raise ToolError("is_directory", f"{path!r} is a directory")
        data = params["content"].encode("utf-8")
        created = not target.exists()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, data)
        except OSError as exc:
            raise ToolError("io_error", f"cannot write {path!r}: {exc.strerror or exc}") from None
        return {"path": path, "created": created, "bytes_written": len(data)}

    # -- git.diff --------------------------------------------------------------------------------

    async def git_diff(self, params: dict[str, Any]) -> dict[str, Any]:
        """{staged?, base?, paths?} -> {diff, truncated}: `git diff [--cached] [BASE] -- [PATHS]`."""
        check_args(params, {}, {"staged": bool, "base": str, "paths": list})
        paths: list[Any] = params.get("paths", [])
        for path in paths:
            self.resolve(path)  # refuses what is not a string or leaves the workspace
        if await git_prefix(self.root) is None:
            raise ToolError("not_a_git_repository", f"the workspace {self.root} is not inside a git repository")
        # --relative: paths relative to the workspace even when it is a subdirectory of the repo;
        # --no-color / --no-ext-diff: plain diff text whatever the user's git config says
        args = ["diff", "--no-color", "--no-ext-diff", "--relative"]
        if params.get("staged"):
            args.append("--cached")
        base = params.get("base")
        if base is not None:
            if not base or base.startswith("-"):  # it would be read as an option
                raise ToolError("bad_ref", f"base {base!r} is not a ref")
            status, _, _ = await git(self.root, ["rev-parse", "--verify", "--quiet", f"{base}^{{commit}}"])
            if status != 0:
                raise ToolError("bad_ref", f"base {base!r} does not name a commit in this repository")
            args.append(base)
        status, out, err = await git(self.root, [*args, "--", *paths])
        if status != 0:
            raise ToolError("git_failed", f"git diff failed: {err.strip()}", {"stderr": err})
        kept, truncated = take_lines(split_lines(out.decode("utf-8", errors="replace")), DIFF_CAP_BYTES)
        return {"diff": "".join(kept), "truncated": truncated}

    # -- apply_patch, apply_patch_review ---------------------------------------------------------

    def check_patch(self, diff: Any) -> list[FileDiff]:
        """Parse a diff and check every path its headers name, before anything is touched."""
        if not isinstance(diff, str):
            raise ToolError("invalid_arguments", f"diff must be a string, got {type(diff).__name__}")
        files = parse_diff(diff)
        if not files:
            raise ToolError("patch_invalid", "this is not a unified diff: expected `diff --git a/PATH b/PATH`, `--- a/PATH`, `+++ b/PATH` and @@ hunks")
        for file in files:
            for path in file.paths:
                if path != "/dev/null":
                    self.resolve(path)  # an absolute header path is refused here too
        return files

    async def apply(self, diff: str, files: list[FileDiff]) -> list[str]:
        """`git apply` the checked diff, all or nothing; the paths it changed."""
        # in a subdirectory of a repository git apply takes paths from the repository's top and
        # silently skips the rest: --directory puts them back under the workspace
        prefix = await git_prefix(self.root)
        args = ["apply", "--recount", "--whitespace=nowarn"] + ([f"--directory={prefix}"] if prefix else [])
        status, _, err = await git(self.root, [*args, "--check", "-"], diff.encode("utf-8"))
        if status == 0:  # the check passed: apply for real (git apply is itself all or nothing)
            status, _, err = await git(self.root, [*args, "-"], diff.encode("utf-8"))
        if status != 0:
            raise patch_error(err, files, status, prefix or "")
        return [path for path in dict.fromkeys(file.path for file in files) if path]

    async def apply_patch(self, params: dict[str, Any]) -> dict[str, Any]:
        """{diff} -> {applied: true, files}."""
        check_args(params, {"diff": str}, {})
        files = self.check_patch(params["diff"])
        return {"applied": True, "files": await self.apply(params["diff"], files)}

    async def apply_patch_review(self, params: dict[str, Any]) -> dict[str, Any]:
        """{diff, message?} -> {accepted, rejected, applied, files}: only accepted hunks apply.

        Hunks are numbered from 0 across the whole diff. A file with no hunks (a rename, a mode
        change) is one item to accept or reject on its own.
        """
        check_args(params, {"diff": str}, {"message": str})
        files = self.check_patch(params["diff"])
        items = [(file, hunk) for file in files for hunk in (file.hunks or [""])]
        if self.policy == ASK:
            async with self.dialogue:
                decisions = await self.review(params.get("message", ""), items)
        else:
            decisions = [self.policy == YES] * len(items)
        accepted = [i for i, yes in enumerate(decisions) if yes]
        rejected = [i for i, yes in enumerate(decisions) if not yes]
        kept: list[FileDiff] = []
        for file in files:
            hunks = [hunk for i, (owner, hunk) in enumerate(items) if owner is file and decisions[i]]
            if hunks:
                kept.append(FileDiff(file.header, [h for h in hunks if h], file.paths, file.git))
        applied = await self.apply(join_diff(kept), kept) if kept else []
        return {"accepted": accepted, "rejected": rejected, "applied": bool(kept), "files": applied}

    async def review(self, message: str, items: list[tuple[FileDiff, str]]) -> list[bool]:
        """Show each hunk and ask: [y]es / [n]o / [a]ll (this and the rest) / [d]one (reject the rest)."""
        if message:
            self.ui.write(self.paint(message, "1") + "\n")
        decisions: list[bool] = []
        rest: bool | None = None  # set by [a]ll or [d]one, or by the user going away (EOF)
        for i, (file, hunk) in enumerate(items):
            if rest is None:
                self.ui.write(self.paint(f"{file.path}: hunk {i + 1} of {len(items)}", "1") + "\n")
                self.ui.write("".join(self.paint_line(line) for line in split_lines(hunk or "".join(file.header))))
                while rest is None:
                    try:
                        answer = (await self.ask("Apply this hunk? [y]es / [n]o / [a]ll / [d]one-reject-rest: ")).strip().lower()
                    except EOFError:
                        rest = False
                        break
                    if answer in ("y", "yes", "n", "no"):
                        decisions.append(answer.startswith("y"))
                        break
                    if answer in ("a", "all", "d", "done"):
                        rest = answer.startswith("a")
                    else:
                        self.ui.write("Please answer y, n, a or d.\n")
            if len(decisions) == i:  # not answered one by one: [a]ll, [d]one or EOF decides
                decisions.append(bool(rest))
        return decisions

    def paint(self, text: str, sgr: str) -> str:
        return f"\x1b[{sgr}m{text}\x1b[0m" if self.colour else text

    def paint_line(self, line: str) -> str:
        body = line.rstrip("\n")
        sgr = "36" if body.startswith("@@") else "32" if body.startswith("+") else "31" if body.startswith("-") else ""
        return (self.paint(body, sgr) if sgr else body) + "\n"

    # -- prompt_user -----------------------------------------------------------------------------

    async def prompt_user(self, params: dict[str, Any]) -> dict[str, Any]:
        """{message, options?} -> {answer, declined}. Declining is a normal result, not an error."""
        check_args(params, {"message": str}, {"options": list})
        options: list[Any] = params.get("options", [])
        if not all(isinstance(option, str) for option in options):
            raise ToolError("invalid_arguments", "options must be a list of strings")
        if self.policy != ASK:
            answer = (options[0] if options else "yes") if self.policy == YES else None
            return {"answer": answer, "declined": answer is None}
        menu = "".join(f"  {n}) {option}\n" for n, option in enumerate(options, 1))
        async with self.dialogue:
            self.ui.write(self.paint(params["message"], "1") + "\n" + menu)
            while True:
                try:
                    answer = (await self.ask("answer (empty to decline): ")).strip()
                except EOFError:
                    answer = ""
                if not answer:
                    return {"answer": None, "declined": True}
                if not options:
                    return {"answer": answer, "declined": False}
                chosen = choose(answer, options)
                if chosen is not None:
                    return {"answer": chosen, "declined": False}
                self.ui.write(f"Please answer one of: {', '.join(options)} (or its number).\n")


def choose(answer: str, options: list[str]) -> str | None:
    """The option an answer names: exactly, in another case, by its 1-based number, or by the
    start of its name when only one option starts that way (`y` for `yes`)."""
    if answer in options:
        return answer
    for option in options:
        if answer.casefold() == option.casefold():
            return option
    if answer.isdigit() and 1 <= int(answer) <= len(options):
        return options[int(answer) - 1]
    starting = [option for option in options if option.casefold().startswith(answer.casefold())]
    return starting[0] if len(starting) == 1 else None


def patch_error(stderr: str, files: list[FileDiff], status: int, prefix: str) -> ToolError:
    """Turn git apply's complaint into an error naming the file and the hunk."""
    data: dict[str, Any] = {"stderr": stderr}
    failed = _PATCH_FAILED.search(stderr)  # "error: patch failed: src/auth.js:3"
    if failed:
        path, line = failed.group(1).removeprefix(prefix), int(failed.group(2))
        data.update({"file": path, "line": line})
        hunks = [(file, hunk) for file in files for hunk in file.hunks]
        for n, (file, hunk) in enumerate(hunks):
            if file.path == path and hunk_start(hunk) == line:
                data["hunk"] = n  # counted from 0 across the diff, as apply_patch_review counts
                header = hunk.split("\n", 1)[0]
                return ToolError("patch_failed", f"{path}: hunk {n} `{header}` does not apply: the lines it expects are not at or near line {line}. Nothing was changed.", data)
        return ToolError("patch_failed", f"{path}: the hunk at line {line} does not apply. Nothing was changed.", data)
    # git exits 128 for input it cannot read as a patch, 1 for a patch that does not fit the files
    errors = [line.removeprefix("error: ") for line in stderr.splitlines() if line.startswith("error: ")]
    name = "patch_invalid" if status == 128 else "patch_failed"
    return ToolError(name, "; ".join(errors or [stderr.strip() or "git apply failed"]) + ". Nothing was changed.", data)


# ---------------------------------------------------------------------------------------------
# The client: one turn on the gateway's WebSocket
# ---------------------------------------------------------------------------------------------


class ClientExit(Exception):
    """Ends the command line: a message for the user and the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class TurnResult:
    """What one user message came to."""

    status: str = ""  # COMPLETED or CANCELLED from `final`, ERROR from an `error` or a refused request
    content: str = ""  # final's content, or the error's message
    code: str | int | None = None  # the error's code: a word (llm_error, ...) or a JSON-RPC int
    session_id: str | None = None
    run_id: str | None = None
    tokens: list[str] = field(default_factory=list)  # the `text` of each token, in order
    tools: list[str] = field(default_factory=list)  # tool methods the gateway asked for, in order

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.status == COMPLETED else EXIT_RUN_FAILED


async def send(ws: aiohttp.ClientWebSocketResponse, frame: str) -> None:
    try:
        await ws.send_str(frame)
    except (ConnectionError, aiohttp.ClientError) as exc:
        raise ClientExit(f"lost the connection to the gateway: {exc}", EXIT_CONNECTION) from None


async def receive(ws: aiohttp.ClientWebSocketResponse) -> str:
    """The next text frame; ClientExit when the socket closes or breaks. (Pings are answered
    inside ws.receive(), which is why something must always be reading.)"""
    msg = await ws.receive()
    if msg.type == aiohttp.WSMsgType.TEXT:
        return msg.data
    if msg.type == aiohttp.WSMsgType.BINARY:
        return msg.data.decode("utf-8", errors="replace")
    if msg.type == aiohttp.WSMsgType.ERROR:
        raise ClientExit(f"the connection to the gateway broke: {ws.exception()}", EXIT_CONNECTION)
    code = ws.close_code
    reason = msg.extra if msg.type == aiohttp.WSMsgType.CLOSE and msg.extra else ""
    if code == WS_UNAUTHORIZED:
        raise ClientExit(f"the gateway refused the token: {reason} (set GATEWAY_TOKEN or pass --token)", EXIT_USAGE)
    raise ClientExit(f"the gateway closed the connection (code {code}{': ' + reason if reason else ''})", EXIT_CONNECTION)


def describe(method: str, params: dict[str, Any]) -> str:
    """A few words for the tool's log line: its path, base, files or question."""
    if isinstance(params.get("diff"), str):
        detail = " ".join(dict.fromkeys(file.path for file in parse_diff(params["diff"])))
    else:
        detail = params.get("path") or params.get("base") or params.get("message") or params.get("paths") or ""
    return f"{method} {' '.join(str(detail).split())[:80]}".rstrip()


def outcome(method: str, value: dict[str, Any]) -> str:
    if "accepted" in value:
        done = "applied" if value["applied"] else "nothing applied"
        return f"accepted {len(value['accepted'])} of {len(value['accepted']) + len(value['rejected'])} hunks, {done}"
    if "declined" in value:
        return "declined" if value["declined"] else f"answered {value['answer']!r}"
    return "ok" + (" (truncated)" if value.get("truncated") else "")


class Screen:
    """Where a turn shows: the model's text on `out` as it streams, notes on `note`. A note
    first ends the text's line, so the two never share a line on one terminal."""

    def __init__(self, out: TextIO, note: TextIO) -> None:
        self.out = out
        self.note = note
        self.line_open = False  # text was written to `out` since its last newline

    def text(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
        if text:
            self.line_open = not text.endswith("\n")

    def end_line(self) -> None:
        if self.line_open:
            self.out.write("\n")
            self.out.flush()
            self.line_open = False

    def say(self, line: str) -> None:
        self.end_line()
        self.note.write(line + "\n")
        self.note.flush()


async def answer_tool(ws: aiohttp.ClientWebSocketResponse, message: Message, workspace: Workspace, screen: Screen) -> None:
    """Run one tool request and send its response; the id is the model's tool-call id, verbatim."""
    try:
        value = await workspace.call(message.method, message.params)
        frame, said = result(message.id, value), outcome(message.method, value)
    except ToolError as exc:
        frame, said = exc.response(message.id), f"error: {exc.message}"
    except Exception as exc:  # a bug in a tool must not leave the agent waiting: it gets the error
        frame, said = error_response(message.id, INTERNAL_ERROR, f"the IDE failed running {message.method}: {exc!r}"), f"crashed: {exc!r}"
    screen.say(f"[tool] {describe(message.method, message.params)} -> {said}")
    with contextlib.suppress(ClientExit):  # the socket is gone: run_turn's reading reports it
        await send(ws, frame)


async def send_cancel(ws: aiohttp.ClientWebSocketResponse, cancel: asyncio.Event, turn: TurnResult, screen: Screen) -> None:
    """Wait for the user's Ctrl-C, then ask the gateway to cancel the run (it ends with final)."""
    await cancel.wait()
    screen.say("[cancelling: the run ends with its final; Ctrl-C again to quit]")
    await send(ws, notification(CANCEL, {"run_id": turn.run_id} if turn.run_id else {}))


async def run_turn(
    ws: aiohttp.ClientWebSocketResponse,
    prompt: str,
    workspace: Workspace,
    out: TextIO = sys.stdout,
    note: TextIO = sys.stderr,
    cancel: asyncio.Event | None = None,
    request_id: int = 1,
) -> TurnResult:
    """Send one user message and play its run to the end: tokens to `out` as they come, tool
    requests answered from `workspace` (each in its own task, so reading goes on), until the
    run's one `final` or `error`. Setting `cancel` sends `cancel`. ClientExit if the socket goes.
    """
    turn, screen = TurnResult(), Screen(out, note)
    await send(ws, request(request_id, USER_MESSAGE, {"content": prompt}))
    tasks: set[asyncio.Task[None]] = set()
    if cancel is not None:
        tasks.add(asyncio.create_task(send_cancel(ws, cancel, turn, screen)))
    try:
        while not turn.status:
            try:
                message = parse_message(await receive(ws))
            except RpcError as exc:  # the gateway sent something that is not JSON-RPC
                await send(ws, exc.response())
                continue
            if message.kind == "request" and message.method in TOOL_METHODS:
                turn.tools.append(message.method)
                task = asyncio.create_task(answer_tool(ws, message, workspace, screen))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif message.kind == "request":
                expected = ", ".join(TOOL_METHODS)
                await send(ws, error_response(message.id, METHOD_NOT_FOUND, f"Method not found: {message.method!r}; this IDE answers {expected}"))
            elif message.kind == "response" and message.id is None and message.error is not None:
                screen.say(f"[gateway refused a frame: {message.error['message']}]")  # e.g. one too large
            elif message.kind == "response" and message.id == request_id:
                if message.error is not None:  # the user message was refused (e.g. a run in progress)
                    turn.status, turn.code, turn.content = ERROR, message.error["code"], message.error["message"]
                    screen.say(f"error [{turn.code}]: {turn.content}")
                elif isinstance(message.result, dict):  # {"session_id", "run_id"}
                    turn.session_id, turn.run_id = message.result.get("session_id"), message.result.get("run_id")
            elif message.method == TOKEN:  # {"run_id", "seq", "text"}
                turn.tokens.append(str(message.params.get("text", "")))
                screen.text(turn.tokens[-1])
            elif message.method == FINAL:  # {"run_id", "seq", "status", "content", "usage"?}
                turn.status, turn.content = str(message.params.get("status")), str(message.params.get("content") or "")
                if not turn.tokens:  # nothing was streamed: show the answer whole
                    screen.text(turn.content)
                screen.end_line()
                if turn.status != COMPLETED:
                    screen.say(f"[{turn.status}]")
            elif message.method == ERROR:  # {"run_id", "seq", "code", "message", "retryable"}
                turn.status, turn.code, turn.content = ERROR, message.params.get("code"), str(message.params.get("message"))
                screen.say(f"error [{turn.code}]: {turn.content}" + (" (retryable)" if message.params.get("retryable") else ""))
            # any other notification or response is not for us; notifications are never answered
    finally:
        for task in tasks:
            task.cancel()  # the run is over: a question still on screen has no one to answer to
        await asyncio.gather(*tasks, return_exceptions=True)
    return turn


# ---------------------------------------------------------------------------------------------
# The terminal: Ctrl-C cancels, lines are read without stopping the socket
# ---------------------------------------------------------------------------------------------


class Terminal:
    """Lines typed on stdin, awaited without blocking the event loop.

    One daemon thread reads stdin for the whole session and queues each line: the socket keeps
    being read meanwhile (the gateway's pings need answers, tool requests may arrive), a question
    abandoned by a cancelled run loses no line to a stale reader, and a user quitting at the
    prompt does not leave the process waiting for Enter.
    """

    def __init__(self, stdin: TextIO = sys.stdin, ui: TextIO = sys.stderr) -> None:
        self.stdin = stdin
        self.ui = ui
        self.lines: asyncio.Queue[str | None] | None = None  # None in the queue: end of input

    async def ask(self, prompt: str) -> str:
        if self.lines is None:
            self.lines = asyncio.Queue()
            threading.Thread(target=self.read, args=(asyncio.get_running_loop(), self.lines), daemon=True).start()
        self.ui.write(prompt)
        self.ui.flush()
        line = await self.lines.get()
        if line is None:
            self.lines.put_nowait(None)  # stay at end of input for every later question
            raise EOFError
        return line.rstrip("\r\n")

    def read(self, loop: asyncio.AbstractEventLoop, lines: asyncio.Queue[str | None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed while we were waiting for a line
            for line in iter(self.stdin.readline, ""):
                loop.call_soon_threadsafe(lines.put_nowait, line)
            loop.call_soon_threadsafe(lines.put_nowait, None)


@contextlib.contextmanager
def ctrl_c_cancels(cancel: asyncio.Event) -> Iterator[None]:
    """During a turn, the first Ctrl-C sets `cancel`; the next one raises KeyboardInterrupt."""
    loop = asyncio.get_running_loop()

    def first_ctrl_c() -> None:
        cancel.set()
        loop.remove_signal_handler(signal.SIGINT)  # back to the default: the next one quits

    try:
        loop.add_signal_handler(signal.SIGINT, first_ctrl_c)
    except (NotImplementedError, RuntimeError):  # Windows' loops have no signal handlers
        pass
    try:
        yield
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)


async def read_prompt(ws: aiohttp.ClientWebSocketResponse, terminal: Terminal) -> str:
    """The next line typed at `> `, reading the socket meanwhile; EOFError on Ctrl-D."""
    line = asyncio.ensure_future(terminal.ask("> "))
    try:
        while True:
            frame = asyncio.ensure_future(receive(ws))
            await asyncio.wait({line, frame}, return_when=asyncio.FIRST_COMPLETED)
            if line.done():
                frame.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await frame
                return line.result()
            frame.result()  # ClientExit if the gateway went away; a stray frame between turns is dropped
    finally:
        line.cancel()


async def prompt_loop(ws: aiohttp.ClientWebSocketResponse, workspace: Workspace, terminal: Terminal) -> int:
    """One conversation: each line is a turn on the same socket, until Ctrl-D."""
    turns = 0
    while True:
        try:
            prompt = await read_prompt(ws, terminal)
        except EOFError:
            sys.stderr.write("\n")
            return EXIT_OK
        if not prompt.strip():
            continue
        turns += 1
        cancel = asyncio.Event()
        with ctrl_c_cancels(cancel):
            await run_turn(ws, prompt, workspace, cancel=cancel, request_id=turns)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def find_token(gateway: str, given: str | None) -> str:
    """--token, else $GATEWAY_TOKEN, else the token file a local gateway wrote when it made one."""
    if given:
        return given
    if os.environ.get("GATEWAY_TOKEN"):
        return os.environ["GATEWAY_TOKEN"]
    url = urlsplit(gateway)
    port = url.port or (443 if url.scheme == "wss" else 80)
    path = token_file(port)
    # only to a gateway on this machine: the file's token must not go to whatever host --gateway names
    if url.hostname in LOOPBACK_HOSTS:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            token = json.loads(path.read_text(encoding="utf-8"))["token"]  # {"url", "token", "pid"}
            if isinstance(token, str) and token:
                return token
    raise ClientExit(
        f"no token for {gateway}: set GATEWAY_TOKEN (or pass --token) to the gateway's token, "
        f"or start the gateway without GATEWAY_TOKEN (python gateway.py) so that it writes one to {path}",
        EXIT_USAGE,
    )


async def connect(http: aiohttp.ClientSession, gateway: str, token: str) -> aiohttp.ClientWebSocketResponse:
    try:
        return await http.ws_connect(gateway, headers={"Authorization": f"Bearer {token}"}, max_msg_size=MAX_FRAME_BYTES)
    except aiohttp.WSServerHandshakeError as exc:
        if exc.status in (401, 403):
            raise ClientExit(f"the gateway refused the token (HTTP {exc.status})", EXIT_USAGE) from None
        raise ClientExit(f"{gateway} did not accept a WebSocket: HTTP {exc.status} {exc.message}", EXIT_CONNECTION) from None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise ClientExit(f"cannot reach the gateway at {gateway}: {exc or type(exc).__name__}. Is it running? (honcho start, or python gateway.py)", EXIT_CONNECTION) from None


async def run(args: argparse.Namespace) -> int:
    root = Path(args.workspace)
    if not root.is_dir():
        raise ClientExit(f"--workspace {args.workspace}: not a directory", EXIT_USAGE)
    token = find_token(args.gateway, args.token)
    terminal = Terminal()
    workspace = Workspace(root, ask=terminal.ask, policy=YES if args.yes else NO if args.no else ASK)
    timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with await connect(http, args.gateway, token) as ws:
            if args.prompt:
                cancel = asyncio.Event()
                with ctrl_c_cancels(cancel):
                    turn = await run_turn(ws, " ".join(args.prompt), workspace, cancel=cancel)
                return turn.exit_code
            sys.stderr.write(f"workspace {workspace.root}; one line per turn, Ctrl-C cancels a turn, Ctrl-D quits\n")
            return await prompt_loop(ws, workspace, terminal)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ide.py",
        description="The reference IDE: talk to the coding agent through the gateway; its tools run on --workspace.",
        epilog="With PROMPT: one turn, exit 0 when it completes, 1 if cancelled or failed, 2 for a token "
        "problem, 3 when the gateway is unreachable. Without: a prompt loop (Ctrl-C cancels a turn, Ctrl-D quits).",
    )
    parser.add_argument("--workspace", required=True, help="the directory the tools may read and change")
    parser.add_argument("--gateway", default=DEFAULT_GATEWAY, help=f"the gateway's WebSocket URL (default {DEFAULT_GATEWAY})")
    parser.add_argument("--token", help="the gateway's token (default: $GATEWAY_TOKEN, then the token file a local gateway writes)")
    answers = parser.add_mutually_exclusive_group()
    answers.add_argument("--yes", action="store_true", help="accept every patch hunk and answer every question with its first option, without asking")
    answers.add_argument("--no", action="store_true", help="reject every patch hunk and decline every question, without asking")
    parser.add_argument("prompt", nargs="*", metavar="PROMPT", help="the message for one turn; omit it for a prompt loop")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except ClientExit as exc:
        sys.stderr.write(f"ide.py: {exc}\n")
        return exc.status
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
