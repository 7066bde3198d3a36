"""ide.py: the reference IDE, a terminal client that runs the agent's tools on your files.

    [IDE] ⇄ gateway → agent → llm_proxy → LLM
      ↑ read_file, write_file, git.diff, apply_patch, apply_patch_review, prompt_user
        run here, on --workspace: the model never touches the disk itself

Run:  python ide.py --workspace DIR [--gateway ws://127.0.0.1:8000/ws] [--token T] [--yes | --no]
                     [--reconnect-for 30] [PROMPT]

With PROMPT it plays one turn and exits: 0 when the run completes, 1 when it is cancelled or
ends with an error, 2 when the token is missing or refused, 3 when the gateway cannot be reached
or a dropped connection cannot be resumed, 130 on a second Ctrl-C. Without PROMPT it is a prompt
loop (`> `), one conversation: Ctrl-C during a turn cancels the run, Ctrl-D quits (closing with
1000, which cancels a run still going). The model's text goes to stdout, everything else
(prompts, hunks, one line per tool run) to stderr, so stdout can be piped.

A dropped connection is not the end of a turn (CONTRACT v2, "Sessions and resume"): ide.py says
"connection lost, resuming…", reconnects with backoff for --reconnect-for seconds, resumes from
the last seq it saw ("resumed") and goes on: nothing shown twice, each tool-call id run at most
once, a review the user is answering carried through. A conversation the gateway has lost ends
a one-turn run with 1 (the prompt loop starts a new one); a takeover by another connection
(4409) stops it with 1, without taking the session back.

The file reads top down: the six tools (Workspace, plain methods testable without a network),
then the client (Connection, the socket kept up across drops; play_turn, one user message to its
final or error), then the command line.
Every tool call is treated as possibly hostile (a model obeys what it reads), so the tools keep
these rules (PROTOCOL.md, "Security: the tools", names the attack each one stops):
  - a path is walked one directory at a time from the workspace's own descriptor, never
    following a symlink out of it (as openat2's RESOLVE_BENEATH and Go's os.Root do), so no
    race can lead a read or write outside; `.git` is off limits to every tool, and so is any
    file git would take for a repository's own (a HEAD naming a ref, a config beside a HEAD);
  - every write, write_file's and a patch's, goes through one atomic writer, all or nothing;
  - git itself says which files a patch touches, and a reviewed patch must read to git as the
    user was shown it; the patch is applied to copies of those files in a private directory,
    outside any repository, and only the results, each path-checked, are written back;
  - git runs from an argument list, with settings that keep the repository's config from
    naming a command for it to run;
  - reads are bounded (bytes scanned, lines and bytes returned) and run off the event loop;
  - whatever came from the model or the workspace is shown with its control and invisible
    characters made visible (ESC as ^[, U+200B as <U+200B>), so it cannot drive the terminal
    or hide a line; colours are ide.py's own.

Left out: an editor UI, several conversations per socket, binary patches, and
Windows (the path walk needs POSIX's dir_fd calls; a port would open relative to a handle).
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import errno
import functools
import json
import os
import random
import re
import signal
import stat
import sys
import tempfile
import threading
import time
import unicodedata
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO
from urllib.parse import urlsplit

import aiohttp

from protocol import (
    CANCEL,
    COMPLETED,
    ERROR,
    FINAL,
    INTERNAL_ERROR,
    METHOD_NOT_FOUND,
    RESUME,
    SEQ_TOO_OLD,
    TOKEN,
    TOOL_ERRORS,
    TOOL_METHODS,
    UNKNOWN_SESSION,
    USER_MESSAGE,
    WS_NORMAL,
    WS_SUPERSEDED,
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
READ_MAX_LINES = 5000  # most lines one read_file returns; more sets truncated
READ_SCAN_BYTES = 32 * 1024 * 1024  # most bytes one read_file reads from disk; a longer file's total_lines is null
DIFF_CAP_BYTES = 256 * 1024  # most diff text one git.diff returns (git is stopped there); more sets truncated
GIT_OUTPUT_CAP_BYTES = 4 * 1024 * 1024  # most output taken from any other git command
GIT_TIMEOUT_S = 30.0  # one git command; a hung git becomes a tool error, not a hung IDE
MAX_SYMLINKS = 40  # symlinks followed in one path, as Linux allows; more is a loop
CONNECT_TIMEOUT_S = 10.0  # reaching the gateway
HEARTBEAT_S = 20.0  # ping the gateway this often; no pong within half of it is a drop (a network gone quiet)
RECONNECT_FOR_S = 30.0  # after a drop, how long to keep trying to resume (--reconnect-for; the agent's RESUME_GRACE_S default)
RECONNECT_FIRST_S = 0.1  # the first pause between tries; doubled after each, jittered
RECONNECT_MAX_S = 2.0  # the longest pause between tries
ANSWERS_KEPT = 256  # a run's tool answers kept (the newest), for a request the gateway sends again after a resume
RESUME_ID = "resume"  # the id of ide.py's resume requests; a user message's id is a number
MAX_FRAME_BYTES = 16 * 1024 * 1024  # largest frame taken from the gateway (a big diff to apply)
NEW_FILE_MODE = 0o644  # permissions of a file the tools create; an overwrite keeps the old ones
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")  # the only hosts the token file is sent to

# --yes / --no: how apply_patch_review and prompt_user get their answers
ASK, YES, NO = "ask", "yes", "no"

# exit statuses of the command line (2 is also argparse's own for a bad command line)
EXIT_OK = 0
EXIT_RUN_FAILED = 1  # the run was cancelled or ended with an error, the conversation was lost, or taken over (4409)
EXIT_USAGE = 2  # no workspace, no token found, or a token the gateway refused (close code 4401)
EXIT_CONNECTION = 3  # the gateway could not be reached, or a dropped connection could not be resumed
EXIT_INTERRUPTED = 130  # a second Ctrl-C, the shell's convention for SIGINT

Ask = Callable[[str], Awaitable[str]]  # show a prompt, return the line typed; EOFError if none will come
Opener = Callable[[], Awaitable[aiohttp.ClientWebSocketResponse]]  # opens a new socket to the gateway

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
        # JSON may carry a lone surrogate ("\ud800"): legal there, but no UTF-8 file or path can hold it
        if name in params and not all(is_unicode(text) for text in (value if isinstance(value, list) else [value])):
            raise ToolError("invalid_arguments", f"{name} is not valid Unicode: it holds a lone surrogate (an unpaired \\ud800-\\udfff escape)")


def is_unicode(value: Any) -> bool:
    """False for a string that UTF-8 cannot encode (a lone surrogate); True for anything else."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Showing what came from the model or the workspace
# ---------------------------------------------------------------------------------------------

# What a terminal would not show as itself, and so is shown in caret or <U+XXXX> notation: C0
# controls (but tab and newline), DEL, C1 controls (0x9b is an 8-bit CSI), and the characters of
# these categories: format characters (Cf: the bidi controls that reorder a line, Trojan Source,
# CVE-2021-42574; zero-width spaces and joiners, the soft hyphen, the BOM, tag characters), line
# and paragraph separators (Zl, Zp), lone surrogates (Cs: written with surrogateescape, as under a
# C locale, "\udcc2\udc9b" is the bytes C2 9B, an 8-bit CSI) and private-use characters (Co);
# and the Hangul fillers, letters that show as blanks.
_NOT_PRINTABLE_ASCII = re.compile("[^\t\n\x20-\x7e]")  # each is looked at by caret()
_NOT_PRINTABLE_ASCII_IN_A_LINE = re.compile("[^\x20-\x7e]")
HIDDEN_CATEGORIES = ("Cf", "Zl", "Zp", "Cs", "Co")
HANGUL_FILLERS = "\u115f\u1160\u3164\uffa0"
ZERO_WIDTH_JOINER = "\u200d"  # makes one emoji of several (woman, ZWJ, laptop): kept in text, shown in a line


def visible(text: str, one_line: bool = False) -> str:
    """`text` made safe for a terminal: ESC shows as ^[, CR as ^M, DEL as ^? (as `cat -v` and
    git's quoting of odd path names do), a C1, bidi or zero-width character as <U+202E>. Tabs
    and newlines stay, unless `one_line`. Whatever ide.py shows from the model or the workspace
    goes through it first, and colour is added after, so every escape sequence on screen is
    ide.py's own."""
    pattern = _NOT_PRINTABLE_ASCII_IN_A_LINE if one_line else _NOT_PRINTABLE_ASCII
    return pattern.sub(lambda match: caret(match.group(), one_line), text)


def caret(char: str, one_line: bool) -> str:
    """One character visible() looked at: as itself, or in caret or <U+XXXX> notation."""
    code = ord(char)
    if code < 0x20 or code == 0x7F:
        return f"^{chr(code ^ 0x40)}"
    hidden = unicodedata.category(char) in HIDDEN_CATEGORIES and (one_line or char != ZERO_WIDTH_JOINER)
    return f"<U+{code:04X}>" if code <= 0x9F or hidden or char in HANGUL_FILLERS else char


# ---------------------------------------------------------------------------------------------
# Files: the atomic writer's parts, bounded line scanning, wire sizes
# ---------------------------------------------------------------------------------------------

# how every directory is opened: never through a symlink (O_NOFOLLOW), and not by its full path
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Change:
    """One file for Workspace.atomic_write to write, or with data None to delete."""

    path: str  # workspace-relative, as the tool was given it
    data: bytes | None
    mode: int | None = None  # permission bits; None keeps the old file's, or NEW_FILE_MODE for a new one
    follow: bool = True  # False: a symlink at the path's end is refused, not followed (a patch's results)


@dataclass
class Staged:
    """One change, ready to be renamed into place in its directory, fds[-1] (held by the write)."""

    path: str
    name: str  # the file's name in its directory
    fds: list[int]  # the directory the walk ended in, then each directory made below it
    made: list[str] = field(default_factory=list)  # the directories made for it: made[i] is in fds[i]
    temp: str | None = None  # the temp file holding the new content; None for a deletion
    created: bool = False  # no file was there before

    def install(self) -> None:
        """Rename the temp file over the target (atomic, and never through a symlink), or delete it."""
        if self.temp is None:
            os.unlink(self.name, dir_fd=self.fds[-1])
        else:
            os.replace(self.temp, self.name, src_dir_fd=self.fds[-1], dst_dir_fd=self.fds[-1])
            self.temp = None

    def discard(self) -> None:
        """Undo the staging: remove the temp file, then the directories made for it, if still empty."""
        with contextlib.suppress(OSError):
            if self.temp is not None:
                os.unlink(self.temp, dir_fd=self.fds[-1])
        for i in reversed(range(len(self.made))):
            with contextlib.suppress(OSError):
                os.rmdir(self.made[i], dir_fd=self.fds[i])


def hold(dirs: dict[tuple[int, int], int], fd: int) -> int:
    """Keep a directory's descriptor in `dirs` (by device and inode) until the write ends: fd, or
    the one already held for that directory, fd then closed. A patch of 2,000 files in one
    directory holds one descriptor, not 2,000 (past `ulimit -n`)."""
    info = os.fstat(fd)
    key = (info.st_dev, info.st_ino)
    if key in dirs:
        os.close(fd)
    else:
        dirs[key] = fd
    return dirs[key]


def write_temp(dir_fd: int, name: str, data: bytes, mode: int) -> str:
    """A new file beside `name` holding data, fsynced, with permission bits `mode`: its name."""
    while True:
        temp = f".{os.fsdecode(os.fsencode(name)[:200])}.{os.urandom(4).hex()}.tmp"  # under NAME_MAX, 255 bytes
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)  # a full disk (ENOSPC, EFBIG) fails here, before any target is touched
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        raise
    return temp


# A HEAD that git accepts makes its directory a bare repository once objects/ and refs/ are beside
# it (any write can make them), and git obeys that repository's config: the user's shell prompt
# runs `git status` on cd, and its core.fsmonitor runs (the embedded bare repository attack that
# git's safe.bareRepository exists for). So no tool writes such a HEAD, nor a config or commondir
# (where git would look for the config) beside a HEAD a checkout already holds. objects/ and
# refs/ are not looked for: they can be made after the config.
_HEAD_CONTENT = re.compile(rb"ref:|[0-9a-fA-F]{40}")  # a symbolic ref, or an object id (40 or 64 hex digits)


def forges_repository(name: str, data: bytes, dir_fd: int | None) -> bool:
    """Whether `data` written as `name` in dir_fd (None: a directory still to be made) would be
    a file git reads as a repository's own: a HEAD, or a config or commondir beside a HEAD."""
    if name.casefold() == "head":
        return _HEAD_CONTENT.match(data) is not None
    if name.casefold() in ("config", "commondir") and dir_fd is not None:
        with contextlib.suppress(FileNotFoundError):
            os.stat("HEAD", dir_fd=dir_fd, follow_symlinks=False)
            return True
    return False


def readlink(name: str, dir_fd: int) -> str | None:
    """Where the symlink `name` in dir_fd points; None when it is not a symlink, or not there."""
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT):
            return None
        raise


def scan_lines(f: BinaryIO, first: int, last: int | None) -> tuple[list[str], int | None, bool]:
    """Stream a UTF-8 text file: (lines first..last, its line count, whether the range was covered).

    At most READ_SCAN_BYTES are read; the count is None when the file goes on past them. Lines
    before `first` are skipped and lines after the range counted a MiB at a time; the range is
    read a line at a time (at most 64 KiB of one), and lines stop being kept once more than
    READ_MAX_LINES of them, or READ_CAP_BYTES characters, are (more could not be returned).
    ValueError for a NUL byte, or bytes that are not UTF-8, in what was read.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    newlines = 0  # "\n" read so far: line newlines + 1 is the one being read
    at_start = True  # the next byte starts a line
    scanned = 0

    def take(data: bytes) -> str:
        nonlocal newlines, at_start, scanned
        scanned += len(data)
        newlines += data.count(b"\n")
        at_start = data.endswith(b"\n")
        return decode_text(decoder, data)

    while newlines < first - 1 and (chunk := f.read(min(1 << 20, READ_SCAN_BYTES - scanned))):
        need = first - 1 - newlines
        if chunk.count(b"\n") >= need:  # line `first` starts in this chunk: go back to its start
            cut = len(chunk) - len(chunk.split(b"\n", need)[-1])
            f.seek(cut - len(chunk), os.SEEK_CUR)
            chunk = chunk[:cut]
        take(chunk)
    lines: list[str] = []
    kept = 0  # characters in `lines`
    covered = False
    while scanned < READ_SCAN_BYTES and len(lines) <= READ_MAX_LINES and kept <= READ_CAP_BYTES:
        starts_line = at_start
        piece = b"" if last is not None and newlines + 1 > last else f.readline(min(64 * 1024, READ_SCAN_BYTES - scanned))
        covered = not piece  # the end of the file, or of the range
        if covered:
            break
        text = take(piece)
        if starts_line:
            lines.append(text)
        else:
            lines[-1] += text
        kept += len(text)
    while chunk := f.read(min(1 << 20, READ_SCAN_BYTES - scanned)):  # the rest is only counted
        take(chunk)
    if f.read(1):  # more than READ_SCAN_BYTES: the count is unknown
        return lines, None, covered
    decode_text(decoder, b"", final=True)  # a character cut short at the end is not UTF-8
    return lines, newlines + (not at_start), covered


def decode_text(decoder: codecs.IncrementalDecoder, data: bytes, final: bool = False) -> str:
    if b"\0" in data:
        raise ValueError("a NUL byte: not a text file")
    return decoder.decode(data, final)


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
    """The diff as git is given it. A plain `diff -u` section is led by a `diff --git` line (and
    `new file mode` or `deleted file mode` for /dev/null, which git reads only so): git then ends
    each section where parse_diff does, instead of counting a `---`/`+++` pair after a hunk as a
    removed and an added line of it (--recount), lines the review would have shown as a header."""
    text: list[str] = []
    for file in files:
        if not file.git:
            text.append(f"diff --git a/{file.path} b/{file.path}\n")
            if "/dev/null" in file.paths[:2]:
                text.append("new file mode 100644\n" if file.paths[0] == "/dev/null" else "deleted file mode 100644\n")
        text += [*file.header, *file.hunks]
    return "".join(text)


def numstat(file: FileDiff) -> str:
    """What `git apply --numstat` says of a section that git reads as parse_diff does: PATH +A -D."""
    lines = [line for hunk in file.hunks for line in split_lines(hunk)[1:]]
    return f"{file.path} +{sum(line.startswith('+') for line in lines)} -{sum(line.startswith('-') for line in lines)}"


# ---------------------------------------------------------------------------------------------
# git, run from an argument list, hardened
# ---------------------------------------------------------------------------------------------

# C locale: git's messages are parsed (e.g. "error: patch failed: FILE:LINE"); no prompts for
# credentials; no lock taken just to refresh the index while the user runs git too; paths are
# file names, never pathspec magic such as :(top). The shell's own GIT_* variables (GIT_DIR,
# GIT_EXTERNAL_DIFF, ...) are dropped: git must find the workspace's repo, and nothing else.
GIT_ENV = {"LC_ALL": "C", "LANG": "C", "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0", "GIT_LITERAL_PATHSPECS": "1"}
# Settings on every command line (`-c` wins over every config file), so that a repository's own
# config, which a downloaded checkout may carry, cannot name a program for git to run. git diff
# adds --no-ext-diff (diff.external, diff.<driver>.command) and --no-textconv, and switches off
# the repository's filter drivers one by one (git_filters_off).
GIT_SAFE_CONFIG = (
    "core.fsmonitor=false",  # a hook program git would ask which files changed
    "core.hooksPath=/dev/null",  # hooks: none of these commands should run one, and none will
    "protocol.allow=never",  # no transport at all: no lazy fetch of a partial clone, no ext::, no core.sshCommand
    "safe.bareRepository=explicit",  # a bare repository (HEAD, objects/, refs/, config) is used only if named, never found
)
# A patch is applied in a private scratch directory, to copies: git there is outside any
# repository (GIT_DIR names a path that cannot exist, /dev/null being no directory, so copies
# named HEAD, objects/, refs/ and config are not a repository to git) and reads no config or
# attributes file, so no filter runs and the patch applies byte for byte.
GIT_ISOLATED_ENV = {"GIT_DIR": "/dev/null/no-repository", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_ATTR_NOSYSTEM": "1"}
APPLY_OPTIONS = ["--recount", "--whitespace=nowarn"]  # models miscount @@ lengths: git recounts them


@dataclass
class GitRun:
    """What one git command came to."""

    status: int  # its exit status; negative when it was stopped
    out: bytes  # stdout, at most the command's limit
    err: str  # stderr, at most GIT_OUTPUT_CAP_BYTES
    cut: bool  # stdout went past the limit, and git was stopped there


async def git(cwd: Path | str, args: list[str], stdin: bytes | None = None, limit: int = GIT_OUTPUT_CAP_BYTES, config: list[str] | None = None, isolated: bool = False) -> GitRun:
    """Run `git ARGS` in cwd, never through a shell, with GIT_SAFE_CONFIG and `config`; `isolated`
    for the scratch directory of a patch. Output is read as it comes, and git is stopped once
    stdout passes `limit`: a huge diff costs its first `limit` bytes, not the memory to hold it."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("GIT_")}, **GIT_ENV}
    settings = [*GIT_SAFE_CONFIG, *(config or [])]
    if isolated:
        env.update(GIT_ISOLATED_ENV)
        settings.append("core.attributesFile=/dev/null")
    try:
        process = await asyncio.create_subprocess_exec(
            "git",
            "--no-pager",
            *[word for setting in settings for word in ("-c", setting)],
            *args,
            cwd=cwd,
            env=env,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise ToolError("git_failed", "git is not installed on the IDE's machine") from None

    async def feed() -> None:
        if process.stdin is not None:
            with contextlib.suppress(ConnectionError):  # git stopped reading (it failed, or was stopped)
                process.stdin.write(stdin or b"")
                await process.stdin.drain()
                process.stdin.close()

    async def take(stream: asyncio.StreamReader, cap: int) -> tuple[bytes, bool]:
        data = bytearray()
        while chunk := await stream.read(64 * 1024):
            data += chunk
            if len(data) > cap:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()  # enough: git stops, its pipes close
                return bytes(data[:cap]), True
        return bytes(data), False

    try:
        assert process.stdout is not None and process.stderr is not None
        _, (out, cut), (err, _) = await asyncio.wait_for(
            asyncio.gather(feed(), take(process.stdout, limit), take(process.stderr, GIT_OUTPUT_CAP_BYTES)), GIT_TIMEOUT_S
        )
        status = await process.wait()
    except BaseException as exc:  # a timeout, or the run ended: do not leave git running
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        if isinstance(exc, TimeoutError):
            raise ToolError("git_failed", f"git {args[0]} took longer than {GIT_TIMEOUT_S:g} s") from None
        raise
    return GitRun(status, out, err.decode("utf-8", errors="replace"), cut)


async def git_prefix(root: Path) -> str | None:
    """Where root sits inside its repository ("" at the top, "sub/" below); None outside one."""
    run = await git(root, ["rev-parse", "--show-prefix"])
    return run.out.decode("utf-8", errors="replace").strip() if run.status == 0 else None


async def git_filters_off(root: Path) -> list[str]:
    """Settings that switch off each filter driver the repository's config defines.

    git diff runs a filter's clean (or process) command on any file whose .gitattributes names
    it, and no one setting turns every driver off: each is named. Drivers that only the user's
    system or global config defines (git-lfs, say) are the user's own, and are left alone.
    """
    run = await git(root, ["config", "-z", "--show-scope", "--get-regexp", r"^filter\."])
    if run.status not in (0, 1) or run.cut:  # 1: no such setting
        raise ToolError("git_failed", f"git config failed: {run.err.strip()}", {"stderr": run.err})
    fields = run.out.split(b"\0")  # scope, b"filter.NAME.KEY\nVALUE", scope, ..., b""
    names = set()
    for scope, entry in zip(fields[0::2], fields[1::2]):
        key = entry.split(b"\n", 1)[0].decode("utf-8", errors="surrogateescape")
        if scope not in (b"system", b"global") and key.count(".") >= 2:  # filter.NAME.KEY; filter.KEY names no driver
            names.add(key[len("filter.") : key.rindex(".")])
    for name in names:
        if "=" in name:  # git -c splits at the first "=": this one cannot be named, so refuse
            raise ToolError("git_failed", f"the repository's config defines a filter driver named {name!r}, which git diff cannot be kept from running")
    return [f"filter.{name}.{setting}" for name in sorted(names) for setting in ("clean=", "smudge=", "process=", "required=false")]


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
    `ask` is how they ask, and `ui` where hunks and questions are shown. Disk work runs in a
    thread (asyncio.to_thread): a slow disk never stops the socket being read.
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
            return await self.read_file(params)
        if method == "write_file":
            return await self.write_file(params)
        if method == "git.diff":
            return await self.git_diff(params)
        if method == "apply_patch":
            return await self.apply_patch(params)
        if method == "apply_patch_review":
            return await self.apply_patch_review(params)
        if method == "prompt_user":
            return await self.prompt_user(params)
        raise ToolError("not_implemented", f"this IDE has no tool {method!r}")

    # -- paths: every tool finds its files through walk() -------------------------------------------

    def walk(self, path: Any, follow: bool = True) -> tuple[int, list[str], str]:
        """Find a workspace path without ever leaving the workspace: (an open descriptor of the
        directory that holds it, the directories still to be made below that one, its name).

        Each directory is opened from the one before it with O_NOFOLLOW, never by its full path,
        so a directory swapped for a symlink after it was checked fails to open rather than lead
        outside (openat2's RESOLVE_BENEATH, Go's os.Root, runc's securejoin work this way). A
        symlink met on the way is read and its target walked the same way: followed while it
        stays inside, outside_workspace once it leaves; so is `..` above the root, and any name
        `.git`. A missing directory is walked by name (`new/../x` is x), so an escape through
        one is refused before anything is made. The name is "." when the path ends on a directory.
        With `follow` false, a symlink as the path's last component is not followed: it is the name.
        """
        if not isinstance(path, str) or not path or "\0" in path:
            raise ToolError("invalid_arguments", f"path must be a non-empty string, got {path!r}")
        if os.path.isabs(path):
            raise ToolError("outside_workspace", f"{path!r} is absolute; paths are relative to the workspace root")
        parts = path.split("/")
        fds = [os.open(self.root, DIR_FLAGS)]
        missing: list[str] = []
        links = 0
        try:
            while parts:
                name = parts.pop(0)
                if name in ("", "."):
                    continue
                if name == "..":
                    if missing:
                        missing.pop()
                    elif len(fds) > 1:
                        os.close(fds.pop())
                    else:  # where it points is not told
                        raise ToolError("outside_workspace", f"{path!r} resolves outside the workspace; paths must stay inside it")
                    continue
                if name.casefold() == ".git":  # casefold: macOS and Windows disks ignore case
                    raise ToolError("outside_workspace", f"{path!r} is inside .git: the repository's own files are off limits to every tool (git_diff reads the repository)")
                last = all(part in ("", ".") for part in parts)
                target = None if missing or (last and not follow) else readlink(name, fds[-1])
                if target is not None:
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
                    parts = self.link_parts(path, target, fds) + parts
                elif last:
                    break
                elif missing:
                    missing.append(name)
                else:
                    try:  # O_NOFOLLOW: a symlink swapped in since readlink() fails here (ENOTDIR)
                        fds.append(os.open(name, DIR_FLAGS, dir_fd=fds[-1]))
                    except FileNotFoundError:
                        missing.append(name)
            else:
                name = "."
            for fd in fds[:-1]:
                os.close(fd)
            return fds[-1], missing, name
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    def link_parts(self, path: str, target: str, fds: list[int]) -> list[str]:
        """The names a symlink's target adds to the walk. A relative target goes on from the
        link's directory (fds[-1]); an absolute one must name a place inside the root, and goes
        on from there (fds is cut back to the root)."""
        if not os.path.isabs(target):
            return target.split("/")
        root = str(self.root).rstrip("/") + "/"
        if not (target + "/").startswith(root):
            raise ToolError("outside_workspace", f"{path!r} resolves outside the workspace; paths must stay inside it")
        while len(fds) > 1:
            os.close(fds.pop())
        return target[len(root) :].split("/")

    def is_link(self, path: str) -> bool:
        """Whether the path's last component is a symlink (the directories before it are walked as ever)."""
        try:
            dir_fd, missing, name = self.walk(path, follow=False)
        except OSError:  # a loop, or a file where a directory should be
            return False
        try:
            return not missing and readlink(name, dir_fd) is not None
        finally:
            os.close(dir_fd)

    def check(self, path: Any) -> None:
        """Refuse a path that leaves the workspace or enters .git; it need not exist."""
        with contextlib.suppress(OSError):  # a loop, or a file where a directory should be: nothing is there
            os.close(self.walk(path)[0])

    def open_file(self, path: str) -> int:
        """A descriptor open for reading on a regular file of the workspace."""
        try:
            dir_fd, missing, name = self.walk(path)
        except OSError as exc:
            raise ToolError("io_error", f"cannot read {path!r}: {exc.strerror or exc}") from None
        try:
            if missing:
                raise FileNotFoundError
            # O_NOFOLLOW: a symlink swapped in since the walk fails (ELOOP); O_NONBLOCK: a FIFO does not hang
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            raise ToolError("not_found", f"{path!r} does not exist") from None
        except OSError as exc:
            raise ToolError("io_error", f"cannot read {path!r}: {exc.strerror or exc}") from None
        finally:
            os.close(dir_fd)
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        if kind != stat.S_IFREG:
            os.close(fd)
            if kind == stat.S_IFDIR:
                raise ToolError("is_directory", f"{path!r} is a directory")
            raise ToolError("io_error", f"cannot read {path!r}: not a regular file")
        return fd

    # -- the atomic writer: write_file and every patch write through it -----------------------------

    def atomic_write(self, changes: list[Change]) -> list[bool]:
        """Make every change or none; for each, whether it created its file.

        First every new content goes to a temp file beside its target, written and fsynced: a
        full disk or any other failure there removes the temp files (and directories made for
        them), and every file is as it was. Then each is renamed over its target (atomic, and a
        rename replaces a name, never following it), deletions last. A rename failing part-way is
        io_error naming exactly which files changed and which did not.
        """
        staged: list[Staged] = []
        dirs: dict[tuple[int, int], int] = {}  # every directory the changes are in, held open once
        try:
            for change in changes:
                staged.append(self.stage(change, dirs))
            order = [item for item in staged if item.temp is not None] + [item for item in staged if item.temp is None]
            for done, item in enumerate(order):
                try:
                    item.install()
                except OSError as exc:
                    changed, unchanged = [i.path for i in order[:done]], [i.path for i in order[done:]]
                    message = f"the change was made only in part: {', '.join(changed) or 'no file'} changed; {', '.join(unchanged)} did not ({item.path}: {exc.strerror or exc})"
                    raise ToolError("io_error", message, {"changed": changed, "unchanged": unchanged}) from None
            return [item.created for item in staged]
        except BaseException:
            for item in reversed(staged):
                item.discard()
            raise
        finally:
            for fd in dirs.values():
                os.close(fd)

    def stage(self, change: Change, dirs: dict[tuple[int, int], int]) -> Staged:
        """Walk to the change's file, make its missing directories, write its temp file."""
        item: Staged | None = None
        try:
            dir_fd, missing, name = self.walk(change.path, change.follow)
            dir_fd = hold(dirs, dir_fd)
            item = Staged(change.path, name, [dir_fd])
            if name == "." or change.path.endswith("/"):
                raise ToolError("is_directory", f"{change.path!r} is a directory")
            old = None
            with contextlib.suppress(FileNotFoundError):
                old = None if missing else os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if old is not None and stat.S_ISDIR(old.st_mode):
                raise ToolError("is_directory", f"{change.path!r} is a directory")
            if change.data is not None and forges_repository(name, change.data, None if missing else dir_fd):
                raise ToolError("outside_workspace", f"{change.path!r} would be a file git takes for a repository's own (a HEAD naming a ref or commit, or a config beside a HEAD): like .git, off limits to every tool")
            if old is not None and not stat.S_ISREG(old.st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            if change.data is None:
                if old is None:
                    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
                return item
            for directory in missing:
                parent = item.fds[-1]
                os.mkdir(directory, dir_fd=parent)
                item.made.append(directory)
                item.fds.append(hold(dirs, os.open(directory, DIR_FLAGS, dir_fd=parent)))
            item.created = old is None
            mode = change.mode if change.mode is not None else stat.S_IMODE(old.st_mode) if old is not None else NEW_FILE_MODE
            item.temp = write_temp(item.fds[-1], name, change.data, mode)
            return item
        except BaseException as exc:
            if item is not None:
                item.discard()
            if isinstance(exc, OSError):
                raise ToolError("io_error", f"cannot write {change.path!r}: {exc.strerror or exc}") from None
            raise

    # -- read_file, write_file -------------------------------------------------------------------

    async def read_file(self, params: dict[str, Any]) -> dict[str, Any]:
        """{path, start_line?, end_line?} -> {path, content, start_line, end_line, total_lines, truncated}.

        Lines are 1-based and inclusive; end_line past the end is clamped. An empty file returns
        start_line 1, end_line 0. The file is streamed, at most READ_SCAN_BYTES of it: past
        that, total_lines is null and later lines cannot be reached (file_too_large).
        """
        check_args(params, {"path": str}, {"start_line": int, "end_line": int})
        start, end = params.get("start_line", 1), params.get("end_line")
        if start < 1 or (end is not None and end < 1):
            raise ToolError("bad_range", f"lines are numbered from 1; got start_line={start}, end_line={end}")
        if end is not None and start > end:
            raise ToolError("bad_range", f"start_line {start} is after end_line {end}")
        return await asyncio.to_thread(self.read_lines, params["path"], start, end)

    def read_lines(self, path: str, start: int, end: int | None) -> dict[str, Any]:
        """read_file's disk work, in a thread."""
        with os.fdopen(self.open_file(path), "rb") as f:
            try:
                lines, total, covered = scan_lines(f, start, end)
            except ValueError:
                raise ToolError("binary_file", f"{path!r} is not a UTF-8 text file") from None
            except OSError as exc:
                raise ToolError("io_error", f"cannot read {path!r}: {exc.strerror or exc}") from None
        if total == 0:
            return {"path": path, "content": "", "start_line": 1, "end_line": 0, "total_lines": 0, "truncated": False}
        if not lines and total is None:
            raise ToolError("file_too_large", f"line {start} of {path!r} is past its first {READ_SCAN_BYTES >> 20} MiB, the most read_file reads")
        if not lines:
            raise ToolError("bad_range", f"start_line {start} is past the end of {path!r}, which has {total} lines")
        content, cut = take_lines(lines[:READ_MAX_LINES], READ_CAP_BYTES)
        return {
            "path": path,
            "content": "".join(content),
            "start_line": start,
            "end_line": start + len(content) - 1,
            "total_lines": total,
            "truncated": cut or not covered,
        }

    async def write_file(self, params: dict[str, Any]) -> dict[str, Any]:
        """{path, content} -> {path, created, bytes_written}. Parent directories are created."""
        check_args(params, {"path": str, "content": str}, {})
        data = params["content"].encode("utf-8")
        [created] = await asyncio.to_thread(self.atomic_write, [Change(params["path"], data)])
        return {"path": params["path"], "created": created, "bytes_written": len(data)}

    # -- git.diff --------------------------------------------------------------------------------

    async def git_diff(self, params: dict[str, Any]) -> dict[str, Any]:
        """{staged?, base?, paths?} -> {diff, truncated}: `git diff [--cached] [BASE] -- [PATHS]`."""
        check_args(params, {}, {"staged": bool, "base": str, "paths": list})
        paths: list[Any] = params.get("paths", [])
        for path in paths:
            self.check(path)  # refuses what is not a string, leaves the workspace or enters .git
        if await git_prefix(self.root) is None:
            raise ToolError("not_a_git_repository", f"the workspace {self.root} is not inside a git repository")
        # --relative: paths relative to the workspace even when it is a subdirectory of the repo;
        # --no-color: plain diff text whatever the user's git config says; --no-ext-diff and
        # --no-textconv: no program named by the config; --ignore-submodules=dirty: no git
        # status run inside a submodule, under the submodule's own config
        args = ["diff", "--no-color", "--no-ext-diff", "--no-textconv", "--ignore-submodules=dirty", "--submodule=short", "--relative"]
        if params.get("staged"):
            args.append("--cached")
        base = params.get("base")
        if base is not None:
            if not base or base.startswith("-"):  # it would be read as an option
                raise ToolError("bad_ref", f"base {base!r} is not a ref")
            if (await git(self.root, ["rev-parse", "--verify", "--quiet", f"{base}^{{commit}}"])).status != 0:
                raise ToolError("bad_ref", f"base {base!r} does not name a commit in this repository")
            args.append(base)
        run = await git(self.root, [*args, "--", *paths], limit=DIFF_CAP_BYTES, config=await git_filters_off(self.root))
        if run.status != 0 and not run.cut:
            raise ToolError("git_failed", f"git diff failed: {run.err.strip()}", {"stderr": run.err})
        text = run.out.decode("utf-8", errors="replace")
        if run.cut:  # git was stopped in the middle of a line
            text = text[: text.rfind("\n") + 1]
        kept, truncated = take_lines(split_lines(text), DIFF_CAP_BYTES)
        return {"diff": "".join(kept), "truncated": truncated or run.cut}

    # -- apply_patch, apply_patch_review ---------------------------------------------------------

    def check_patch(self, diff: Any) -> list[FileDiff]:
        """Split a diff into files and hunks and check every path its headers name: an early,
        clear refusal. What git will touch is checked again, from git's own reading (apply)."""
        if not isinstance(diff, str):
            raise ToolError("invalid_arguments", f"diff must be a string, got {type(diff).__name__}")
        files = parse_diff(diff)
        if not files:
            raise ToolError("patch_invalid", "this is not a unified diff: expected `diff --git a/PATH b/PATH`, `--- a/PATH`, `+++ b/PATH` and @@ hunks")
        for file in files:
            for path in file.paths:
                if path != "/dev/null":
                    self.check(path)  # an absolute header path is refused here too
            if not file.git and len(set(file.paths[:2]) - {"/dev/null"}) != 1:  # given a `diff --git` line, git would rename
                raise ToolError("patch_invalid", f"the section at {file.header[0].strip()!r} names {' and '.join(file.paths[:2])} in its --- and +++ lines; a plain diff changes one file (send a rename as `diff --git` with rename from / rename to)")
        return files

    async def patch_paths(self, files: list[FileDiff], scratch: str, reviewed: bool = False) -> list[str]:
        """Every path git will touch applying `files`, as git itself reads them, each checked.

        `git apply --numstat` names each section's new path (the old one for a deletion); read
        reversed (-R), the diff names the old path of each rename and copy. A diff can hold a
        section that no other parser sees the way git does: only git's own reading is trusted.
        `reviewed`: the user is shown `files`, so git must read them as shown, section for section:
        the same paths, each adding and deleting as many lines as its hunks show.
        """
        paths: list[str] = []
        sections: list[str] = []  # numstat() of each section, as git reads it
        for reverse in ([], ["-R"]):
            run = await git(scratch, ["apply", *APPLY_OPTIONS, "--numstat", "-z", *reverse, "-"], join_diff(files).encode("utf-8"), isolated=True)
            if run.status != 0 or run.cut:
                raise patch_error(run.err, [], run.status)
            entries = run.out.split(b"\0")[:-1]  # b"ADDED\tDELETED\tPATH" each
            for entry in reversed(entries) if reverse else entries:
                try:
                    added, deleted, path = entry.decode("utf-8").split("\t", 2)
                except (ValueError, UnicodeDecodeError):
                    raise ToolError("patch_invalid", f"git reads a path in this diff that is not UTF-8: {entry!r:.100}") from None
                if not reverse:
                    sections.append(f"{path} +{added} -{deleted}")
                if path not in paths:
                    paths.append(path)
        for path in paths:
            self.check(path)
            if any(part in ("", ".", "..") for part in path.split("/")):  # git refuses them too; copy_out must not meet them
                raise ToolError("patch_invalid", f"the diff names the path {path!r}; paths in a patch are plain, without . or ..")
            if self.is_link(path):  # git would change the link; the copy, and so the write, would be of what it points to
                raise ToolError("patch_invalid", f"{path!r} is a symlink, which a patch does not change here (change the file it points to by its own name). Nothing was changed.")
        shown = {path for file in files for path in file.paths if path != "/dev/null"}
        if reviewed and set(paths) != shown:
            raise ToolError("patch_invalid", f"git reads this diff as changing {', '.join(map(repr, paths))}, but its headers show {', '.join(map(repr, sorted(shown)))}; send each file's section with its own `diff --git` header. Nothing was changed.")
        if reviewed and sections != [numstat(file) for file in files]:
            raise ToolError("patch_invalid", f"git reads this diff as {', '.join(sections)}, but its hunks show {', '.join(numstat(file) for file in files)}; every line of a hunk starts with ' ', '+', '-' or '\\'. Nothing was changed.")
        return paths

    async def apply(self, files: list[FileDiff], reviewed: bool = False) -> list[str]:
        """Apply a diff all or nothing; the paths it changed. `reviewed`: git must read it as shown.

        git applies it to copies of the files it names, in a private directory where it sees no
        repository and no config, not even copies that look like one (so no filter or hook runs);
        the results are checked (no symlink, no new executable) and go through atomic_write.
        """
        try:
            with tempfile.TemporaryDirectory(prefix="ide-patch-") as scratch:
                paths = await self.patch_paths(files, scratch, reviewed)
                originals = await asyncio.to_thread(self.copy_out, paths, scratch)
                run = await git(scratch, ["apply", *APPLY_OPTIONS, "-"], join_diff(files).encode("utf-8"), isolated=True)
                if run.status != 0:
                    raise patch_error(run.err, files, run.status)
                changes = await asyncio.to_thread(self.results, paths, scratch, originals)
        except OSError as exc:  # the scratch directory's disk is full, say
            raise ToolError("io_error", f"cannot apply the patch: {exc.strerror or exc}. Nothing was changed.") from None
        await asyncio.to_thread(self.atomic_write, changes)
        return [change.path for change in changes]

    def copy_out(self, paths: list[str], scratch: str) -> dict[str, tuple[bytes, int]]:
        """Copy each of `paths` that exists into scratch, as a plain file with its permission
        bits: what git apply will see. Returns each copy's (content, mode). A file larger than
        READ_SCAN_BYTES is file_too_large: a patch is applied in memory."""
        originals: dict[str, tuple[bytes, int]] = {}
        for path in paths:
            try:
                fd = self.open_file(path)
            except ToolError as exc:
                if exc.name == "not_found":
                    continue
                raise ToolError("patch_failed", f"{path}: {exc.message}. Nothing was changed.") from None
            with os.fdopen(fd, "rb") as f:
                data = f.read(READ_SCAN_BYTES + 1)
                if len(data) > READ_SCAN_BYTES:
                    raise ToolError("file_too_large", f"{path} is larger than {READ_SCAN_BYTES >> 20} MiB, the most a patch is applied to. Nothing was changed.")
                originals[path] = (data, stat.S_IMODE(os.fstat(f.fileno()).st_mode))
            copy = os.path.join(scratch, path)
            os.makedirs(os.path.dirname(copy), exist_ok=True)
            with open(copy, "xb") as out:
                out.write(originals[path][0])
            os.chmod(copy, originals[path][1])
        return originals

    def results(self, paths: list[str], scratch: str, originals: dict[str, tuple[bytes, int]]) -> list[Change]:
        """What git apply made of each path in scratch, as changes for atomic_write.

        Refused: a symlink (it could point anywhere, for the user's own tools to follow) and a
        file made executable (a hook or script the user might run without reading it); an
        executable file that is patched stays executable, as write_file keeps modes.
        """
        changes: list[Change] = []
        for path in paths:
            copy = os.path.join(scratch, path)
            try:
                info = os.lstat(copy)
            except FileNotFoundError:
                if path in originals:
                    changes.append(Change(path, None, follow=False))  # deleted, or renamed away
                continue
            if not stat.S_ISREG(info.st_mode):
                made = "a symlink" if stat.S_ISLNK(info.st_mode) else "something other than a file"
                raise ToolError("patch_invalid", f"{path}: the patch makes {made}, which this IDE does not do. Nothing was changed.")
            with open(copy, "rb") as f:
                data, mode = f.read(), stat.S_IMODE(info.st_mode)
            old = originals.get(path)
            if old == (data, mode):  # the source of a copy: untouched
                continue
            if mode & 0o111 and not (old and old[1] & 0o111):
                raise ToolError("patch_invalid", f"{path}: the patch makes it executable, which this IDE does not do (ask the user to chmod it). Nothing was changed.")
            keep = old[1] if old else NEW_FILE_MODE
            changes.append(Change(path, data, keep if mode & 0o111 else keep & ~0o111, follow=False))
        return changes

    async def apply_patch(self, params: dict[str, Any]) -> dict[str, Any]:
        """{diff} -> {applied: true, files}: files are every path git changed."""
        check_args(params, {"diff": str}, {})
        return {"applied": True, "files": await self.apply(self.check_patch(params["diff"]))}

    async def apply_patch_review(self, params: dict[str, Any]) -> dict[str, Any]:
        """{diff, message?} -> {accepted, rejected, applied, files}: only accepted hunks apply.

        Hunks are numbered from 0 across the whole diff. A file with no hunks (a rename, a mode
        change) is one item to accept or reject on its own. The user sees the files as split
        here; a diff that git reads otherwise (other files, other line counts) is refused before
        asking, and what is accepted is checked so again before it is applied.
        """
        check_args(params, {"diff": str}, {"message": str})
        files = self.check_patch(params["diff"])
        with tempfile.TemporaryDirectory(prefix="ide-patch-") as scratch:
            await self.patch_paths(files, scratch, reviewed=True)
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
        applied = await self.apply(kept, reviewed=True) if kept else []
        return {"accepted": accepted, "rejected": rejected, "applied": bool(kept), "files": applied}

    async def review(self, message: str, items: list[tuple[FileDiff, str]]) -> list[bool]:
        """Show each hunk and ask: [y]es / [n]o / [a]ll (this and the rest) / [d]one (reject the rest).
        A file's header comes before its first hunk, whole (as `git add -p` shows it): a rename,
        a copy, a deletion or a mode change is part of what the user accepts."""
        if message:
            self.ui.write(self.paint(visible(message), "1") + "\n")
        decisions: list[bool] = []
        rest: bool | None = None  # set by [a]ll or [d]one, or by the user going away (EOF)
        for i, (file, hunk) in enumerate(items):
            if rest is None:
                self.ui.write(self.paint(f"{visible(file.path, one_line=True)}: hunk {i + 1} of {len(items)}", "1") + "\n")
                header = file.header if i == 0 or items[i - 1][0] is not file else []
                self.ui.write("".join(self.paint_line(line, "1") for line in header) + "".join(self.paint_line(line) for line in split_lines(hunk)))
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
        """Colour text that is already visible(): the only escape sequences ide.py writes."""
        return f"\x1b[{sgr}m{text}\x1b[0m" if self.colour else text

    def paint_line(self, line: str, sgr: str = "") -> str:
        """One line of a diff: a header's in `sgr` (bold), a hunk's @@ cyan, + green, - red."""
        body = visible(line.rstrip("\n"), one_line=True)  # a \r would hide what comes before it
        sgr = sgr or ("36" if body.startswith("@@") else "32" if body.startswith("+") else "31" if body.startswith("-") else "")
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
        menu = "".join(f"  {n}) {visible(option, one_line=True)}\n" for n, option in enumerate(options, 1))
        async with self.dialogue:
            self.ui.write(self.paint(visible(params["message"]), "1") + "\n" + menu)
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
                self.ui.write(f"Please answer one of: {visible(', '.join(options), one_line=True)} (or its number).\n")


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


def patch_error(stderr: str, files: list[FileDiff], status: int) -> ToolError:
    """Turn git apply's complaint into an error naming the file and the hunk."""
    data: dict[str, Any] = {"stderr": stderr}
    failed = _PATCH_FAILED.search(stderr)  # "error: patch failed: src/auth.js:3"
    if failed:
        path, line = failed.group(1), int(failed.group(2))
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
# The client: the connection, kept up across drops, and one turn on it
# ---------------------------------------------------------------------------------------------


class ClientExit(Exception):
    """Ends the command line: a message for the user and the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class SessionLost(ClientExit):
    """The gateway no longer has the conversation (resume answered -32002): the prompt loop
    starts a new one; a one-turn run ends with it."""


class Dropped(Exception):
    """The socket ended with nothing to say it should: a network gone, a gateway restarted. A
    reconnect and a resume carry on."""


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


async def write_frame(ws: aiohttp.ClientWebSocketResponse, frame: str) -> None:
    try:
        await ws.send_str(frame)
    except (ConnectionError, aiohttp.ClientError) as exc:
        raise Dropped(f"the connection to the gateway broke: {exc}") from None


async def read_frame(ws: aiohttp.ClientWebSocketResponse) -> str:
    """The next text frame. Dropped when the socket breaks or closes with any code but these,
    which a reconnect cannot mend (ClientExit): 4401 the token refused, 4409 the session taken
    over by another connection, 1000 closed on purpose. (Pings are answered inside
    ws.receive(), which is why something must always be reading.)"""
    msg = await ws.receive()
    if msg.type == aiohttp.WSMsgType.TEXT:
        return msg.data
    if msg.type == aiohttp.WSMsgType.BINARY:
        return msg.data.decode("utf-8", errors="replace")
    if msg.type == aiohttp.WSMsgType.ERROR:
        raise Dropped(f"the connection to the gateway broke: {ws.exception()}")
    code = ws.close_code
    reason = msg.extra if msg.type == aiohttp.WSMsgType.CLOSE and msg.extra else ""
    if code == WS_UNAUTHORIZED:
        raise ClientExit(f"the gateway refused the token: {reason} (set GATEWAY_TOKEN or pass --token)", EXIT_USAGE)
    if code == WS_SUPERSEDED:  # taking it back would close the other one in turn: stop instead
        raise ClientExit(f"another connection took this conversation over ({reason}); this one stops here", EXIT_RUN_FAILED)
    closed = f"the gateway closed the connection (code {code}{': ' + reason if reason else ''})"
    if code == WS_NORMAL:
        raise ClientExit(closed, EXIT_CONNECTION)
    raise Dropped(closed)


def describe(method: str, params: dict[str, Any], value: dict[str, Any] | None = None) -> str:
    """A few words for the tool's log line: its path, base, files or question. For an applied
    patch, the files git changed, not the ones its headers name."""
    if method in ("apply_patch", "apply_patch_review") and value and value["files"]:
        return f"{method} {file_list(value['files'])}"
    if isinstance(params.get("diff"), str):
        return f"{method} {file_list(list(dict.fromkeys(file.path for file in parse_diff(params['diff']))))}".rstrip()
    detail = " ".join(str(params.get("path") or params.get("base") or params.get("message") or params.get("paths") or "").split())
    return f"{method} {cut(detail)}".rstrip()


def file_list(files: list[str], width: int = 80) -> str:
    """`a.txt`, or `3 files: a.txt, b.txt, c.txt`; past `width` characters, `9 files: a, b, … (+7 more)`."""
    shown: list[str] = []
    for path in files:
        if shown and len(", ".join([*shown, path])) > width:
            break
        shown.append(cut(path, width))
    more = f", … (+{len(files) - len(shown)} more)" if len(shown) < len(files) else ""
    return "".join(shown) if len(files) < 2 else f"{len(files)} files: {', '.join(shown)}{more}"


def cut(text: str, width: int = 80) -> str:
    return text if len(text) <= width else text[:width] + "…"


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
        self.out.write(visible(text))  # the model's text cannot drive the terminal
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
        self.note.write(visible(line, one_line=True) + "\n")  # paths, questions and error messages come from the model
        self.note.flush()


async def answer_tool(message: Message, workspace: Workspace, screen: Screen) -> str:
    """Run one tool request: its response frame, whose id is the model's tool-call id, verbatim."""
    value = None
    try:
        value = await workspace.call(message.method, message.params)
        frame, said = result(message.id, value), outcome(message.method, value)
    except ToolError as exc:
        frame, said = exc.response(message.id), f"error: {exc.message}"
    except Exception as exc:  # a bug in a tool must not leave the agent waiting: it gets the error
        frame, said = error_response(message.id, INTERNAL_ERROR, f"the IDE failed running {message.method}: {exc!r}"), f"crashed: {exc!r}"
    screen.say(f"[tool] {describe(message.method, message.params, value)} -> {said}")
    return frame


class Connection:
    """The socket to the gateway, kept up: after a drop it reconnects, with backoff, for at most
    `reconnect_for` seconds, and resumes the session from the last seq seen. All a resume needs
    is kept here, and nowhere else:

      - session_id, and last_seq, the newest seq received: nothing at or below it is passed on again;
      - answers, the response sent to each tool-call id of the run in progress: a request the
        gateway sends again after a resume is answered from here, never run twice;
      - running, the tools still at work: a review the user is answering goes on through a drop,
        and its answer goes out on whichever socket is up when it is done.

    receive() and send() reconnect; answer() and send_now() never wait for one.
    """

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, reopen: Opener | None = None, reconnect_for: float = 0.0) -> None:
        self.ws: aiohttp.ClientWebSocketResponse | None = ws  # None once it dropped, until a resume
        self.reopen = reopen if reconnect_for > 0 else None  # opens a new socket (connect()); None: a drop is the end
        self.reconnect_for = reconnect_for
        self.screen = Screen(sys.stdout, sys.stderr)  # where "connection lost" shows; each turn sets its own
        self.session_id: str | None = None
        self.last_seq = 0
        self.answers: OrderedDict[JsonId, str] = OrderedDict()  # call id -> response frame, the newest ANSWERS_KEPT
        self.running: dict[JsonId, asyncio.Task[None]] = {}  # call id -> its tool, not done yet
        self.pending: deque[str] = deque()  # frames read while resuming, for receive() to pass on
        self.why = ""  # what ended the last socket

    async def receive(self) -> Message:
        """The next message, after a reconnect and resume if the socket dropped. The resume's
        answer is passed on too (id RESUME_ID, {"session_id", "run_id", "last_seq"}), before
        the replay, so that a turn can act on what the gateway still has."""
        while True:
            ws = await self.up()
            try:
                message = parse_message(self.pending.popleft() if self.pending else await read_frame(ws))
            except Dropped as exc:
                self.down(ws, exc)
                continue
            except RpcError as exc:  # the gateway sent something that is not JSON-RPC
                await self.send_now(exc.response())
                continue
            seq = message.params.get("seq")
            if message.kind == "notification" and isinstance(seq, int):
                if seq <= self.last_seq:
                    continue  # had before the drop: a resume replays only what came after, but never show it twice
                self.last_seq = seq
            return message

    async def send(self, frame: str) -> aiohttp.ClientWebSocketResponse:
        """Send a frame the gateway must get (a user message), after a reconnect if need be;
        the socket it went out on."""
        while True:
            ws = await self.up()
            try:
                await write_frame(ws, frame)
                return ws
            except Dropped as exc:
                self.down(ws, exc)

    async def send_now(self, frame: str) -> None:
        """Send on the socket that is up now, if one is: what a resume makes good if it is lost
        (a tool's answer is asked for again, a cancel sent again after the resume)."""
        if self.ws is not None:
            with contextlib.suppress(Dropped):
                await write_frame(self.ws, frame)

    async def answer(self, id: JsonId, run: Callable[[], Awaitable[str]]) -> bool:
        """Answer a tool request at most once per call id. A new id starts `run`, the tool, in a
        task of its own (reading goes on); its response frame is kept, then sent. An id already
        answered gets the kept frame again; one still running is left to its task. True when
        the tool was started."""
        if id in self.answers:
            await self.send_now(self.answers[id])
        elif id not in self.running:
            self.running[id] = asyncio.create_task(self.run_tool(id, run))
            return True
        return False

    async def run_tool(self, id: JsonId, run: Callable[[], Awaitable[str]]) -> None:
        try:
            frame = await run()
        finally:
            self.running.pop(id, None)
        self.answers[id] = frame  # kept before it is sent: a request re-sent from now on finds it
        while len(self.answers) > ANSWERS_KEPT:
            self.answers.popitem(last=False)
        await self.send_now(frame)

    async def end_run(self) -> None:
        """The run is over: a question still on screen has no one to answer to, and none of its
        requests can come again (a resume sends only those of the run in progress)."""
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.running.clear()
        self.answers.clear()

    def down(self, ws: aiohttp.ClientWebSocketResponse, why: Exception) -> None:
        """`ws` dropped: said once, however many times a reconnect is interrupted and begun again."""
        if self.ws is ws:
            self.ws, self.why = None, str(why)
            self.pending.clear()
            if self.reopen is not None:
                self.screen.say(f"[connection lost, resuming… ({why}; session {self.session_id}, seq {self.last_seq})]")

    async def up(self) -> aiohttp.ClientWebSocketResponse:
        """The socket; after a drop, a new one with the session resumed on it."""
        while self.ws is None:
            await self.reconnect()
        return self.ws

    async def reconnect(self) -> None:
        """Try to resume until it works, pausing RECONNECT_FIRST_S, doubled each time up to
        RECONNECT_MAX_S, jittered (many IDEs dropped by one restart do not come back in step);
        after reconnect_for seconds, give up with EXIT_CONNECTION."""
        if self.reopen is None:
            raise ClientExit(self.why, EXIT_CONNECTION)
        started, pause, why = time.monotonic(), RECONNECT_FIRST_S, self.why
        try:
            async with asyncio.timeout(self.reconnect_for):
                while True:
                    try:
                        self.ws = await self.resume()
                        break
                    except (Dropped, RpcError) as exc:
                        why = str(exc)
                    except ClientExit as exc:
                        if exc.status != EXIT_CONNECTION:  # the token refused: no use trying again
                            raise
                        why = str(exc)
                    await asyncio.sleep(pause * random.uniform(0.5, 1.0))
                    pause = min(2 * pause, RECONNECT_MAX_S)
        except TimeoutError:
            raise ClientExit(f"lost the connection to the gateway and could not resume within {self.reconnect_for:g} s (--reconnect-for): {why}", EXIT_CONNECTION) from None
        self.screen.say(f"[resumed after {time.monotonic() - started:.1f} s]")

    async def resume(self) -> aiohttp.ClientWebSocketResponse:
        """One try: a new socket, and `resume` sent and answered on it. -32003 (what came after
        last_seq is no longer kept): resume from the oldest seq kept, saying output was lost.
        -32002 (no such session): SessionLost, the new socket kept for a new conversation. No
        session yet (a drop before the first answer): nothing to resume, so the socket is
        announced as a resume of nothing, and the turn sends its message again."""
        assert self.reopen is not None
        ws = await self.reopen()
        try:
            while self.session_id is not None:
                await write_frame(ws, request(RESUME_ID, RESUME, {"session_id": self.session_id, "last_seq": self.last_seq}))
                while True:
                    text = await read_frame(ws)
                    answer = parse_message(text)
                    if answer.kind == "response" and answer.id == RESUME_ID:
                        break
                    self.pending.append(text)  # nothing comes before the answer; kept for receive() if it does
                if answer.error is None:
                    self.pending.append(text)
                    return ws
                code, data = answer.error.get("code"), answer.error.get("data")
                if code == SEQ_TOO_OLD and isinstance(data, dict) and isinstance(data.get("oldest_seq"), int):
                    self.screen.say(f"[some output was lost: the gateway keeps this conversation's output from seq {data['oldest_seq']} on]")
                    self.last_seq = data["oldest_seq"] - 1
                elif code == UNKNOWN_SESSION:
                    lost = SessionLost(f"the gateway no longer has this conversation: {answer.error.get('message')}", EXIT_RUN_FAILED)
                    self.ws, self.session_id, self.last_seq = ws, None, 0
                    raise lost
                else:
                    raise Dropped(f"the gateway could not resume the session: {answer.error.get('message')}")
            self.pending.append(result(RESUME_ID, {"session_id": None, "run_id": None, "last_seq": 0}))
            return ws
        except BaseException as exc:
            if not isinstance(exc, SessionLost):
                await ws.close()  # nothing of ours is on it yet
            raise

    async def close(self) -> None:
        """Quit: close with 1000, which cancels a run still going (the user is leaving)."""
        if self.ws is not None:
            await self.ws.close()


def cancel_frame(turn: TurnResult) -> str:
    return notification(CANCEL, {"run_id": turn.run_id} if turn.run_id else {})


async def send_cancel(conn: Connection, cancel: asyncio.Event, turn: TurnResult, screen: Screen) -> None:
    """Wait for the user's Ctrl-C, then ask the gateway to cancel the run (it ends with final)."""
    await cancel.wait()
    screen.say("[cancelling: the run ends with its final; Ctrl-C again to quit]")
    await conn.send_now(cancel_frame(turn))  # lost in a drop, it is sent again after the resume


async def play_turn(
    conn: Connection | aiohttp.ClientWebSocketResponse,
    prompt: str,
    workspace: Workspace,
    out: TextIO = sys.stdout,
    note: TextIO = sys.stderr,
    cancel: asyncio.Event | None = None,
    request_id: int = 1,
) -> TurnResult:
    """Send one user message and play its run to the end: tokens to `out` as they come, tool
    requests answered from `workspace` (each in its own task, so reading goes on), until the
    run's one `final` or `error`. Setting `cancel` sends `cancel`. On a Connection the turn goes
    on through drops; on a bare socket (as tests pass) a drop is ClientExit.
    """
    if not isinstance(conn, Connection):
        conn = Connection(conn)
    turn, screen = TurnResult(), Screen(out, note)
    conn.screen = screen
    user_message = request(request_id, USER_MESSAGE, {"content": prompt})
    sent_on = await conn.send(user_message)
    canceller = asyncio.create_task(send_cancel(conn, cancel, turn, screen)) if cancel is not None else None
    try:
        while not turn.status:
            message = await conn.receive()
            if message.kind == "request" and message.method in TOOL_METHODS:
                if await conn.answer(message.id, functools.partial(answer_tool, message, workspace, screen)):
                    turn.tools.append(message.method)
                else:
                    screen.say(f"[tool] {describe(message.method, message.params)} -> asked again after the resume: not run twice")
            elif message.kind == "request":
                expected = ", ".join(TOOL_METHODS)
                await conn.send_now(error_response(message.id, METHOD_NOT_FOUND, f"Method not found: {message.method!r}; this IDE answers {expected}"))
            elif message.kind == "response" and message.id is None and message.error is not None:
                screen.say(f"[gateway refused a frame: {message.error['message']}]")  # e.g. one too large
            elif message.kind == "response" and message.id == RESUME_ID and isinstance(message.result, dict):
                resumed = message.result  # {"session_id", "run_id", "last_seq"}: the gateway has the session back
                if resumed.get("run_id") is None and (resumed.get("last_seq") or 0) <= conn.last_seq and conn.ws is not sent_on:
                    sent_on = await conn.send(user_message)  # no run, nothing missed: the message, sent before, never became a run
                turn.run_id = turn.run_id or resumed.get("run_id")
                if cancel is not None and cancel.is_set():
                    await conn.send_now(cancel_frame(turn))
            elif message.kind == "response" and message.id == request_id:
                if message.error is not None:  # the user message was refused (e.g. a run in progress)
                    turn.status, turn.code, turn.content = ERROR, message.error["code"], message.error["message"]
                    screen.say(f"error [{turn.code}]: {turn.content}")
                elif isinstance(message.result, dict):  # {"session_id", "run_id"}
                    turn.session_id, turn.run_id = message.result.get("session_id"), message.result.get("run_id")
                    conn.session_id = turn.session_id or conn.session_id
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
        if canceller is not None:
            canceller.cancel()
            await asyncio.gather(canceller, return_exceptions=True)
        await conn.end_run()
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


async def read_prompt(conn: Connection, terminal: Terminal) -> str:
    """The next line typed at `> `, reading the socket meanwhile (a drop is resumed at once);
    EOFError on Ctrl-D."""
    line = asyncio.ensure_future(terminal.ask("> "))
    try:
        while True:
            frame = asyncio.ensure_future(conn.receive())
            await asyncio.wait({line, frame}, return_when=asyncio.FIRST_COMPLETED)
            if line.done():
                frame.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await frame
                return line.result()
            frame.result()  # ClientExit if the gateway is gone for good; a stray frame between turns is dropped
    finally:
        line.cancel()


async def prompt_loop(conn: Connection, workspace: Workspace, terminal: Terminal) -> int:
    """One conversation, each line a turn, until Ctrl-D; it carries on across reconnects. If the
    gateway has lost it, the user is told and the next line starts a new one."""
    turns = 0
    while True:
        try:
            prompt = await read_prompt(conn, terminal)
            if not prompt.strip():
                continue
            turns += 1
            cancel = asyncio.Event()
            with ctrl_c_cancels(cancel):
                await play_turn(conn, prompt, workspace, cancel=cancel, request_id=turns)
        except EOFError:
            sys.stderr.write("\n")
            return EXIT_OK
        except SessionLost as exc:
            conn.screen.say(f"[{exc}; your next message starts a new conversation]")


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
        return await http.ws_connect(gateway, headers={"Authorization": f"Bearer {token}"}, max_msg_size=MAX_FRAME_BYTES, heartbeat=HEARTBEAT_S)
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
        reopen = functools.partial(connect, http, args.gateway, token)
        conn = Connection(await reopen(), reopen, args.reconnect_for)  # the first connect is not retried: say at once
        try:
            if args.prompt:
                cancel = asyncio.Event()
                with ctrl_c_cancels(cancel):
                    turn = await play_turn(conn, " ".join(args.prompt), workspace, cancel=cancel)
                return turn.exit_code
            sys.stderr.write(f"workspace {workspace.root}; one line per turn, Ctrl-C cancels a turn, Ctrl-D quits\n")
            return await prompt_loop(conn, workspace, terminal)
        finally:
            await conn.close()


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
    parser.add_argument("--reconnect-for", type=float, default=RECONNECT_FOR_S, metavar="SECONDS", help=f"after a dropped connection, how long to keep trying to resume it (default {RECONNECT_FOR_S:g}; 0: never)")
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
