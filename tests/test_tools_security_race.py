"""Issue 11, item 4: a directory swapped for a symlink between the path check and the write.

An outside process swaps workspace/sub with a symlink to a directory outside the workspace, in a
tight loop, atomically (renameat2 RENAME_EXCHANGE, so `sub` is always one or the other), while
the IDE's tools write and read through `sub` as fast as they can. Whatever each call answers,
nothing may land outside the workspace and nothing from outside may be read. ide.py before
the fix let 114 of 20,000 writes out; here a run is bounded by RACE_S.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from ide import ToolError, Workspace

RACE_S = 1.5  # how long each race runs (writes or reads, as many as fit)
SWAPPER_START_S = 10.0  # bound for the swapper to report it has started

# The swapper: exchange `sub` and `sub.link` (a symlink out) as fast as it can, until killed.
SWAPPER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
a, b = os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2])
print("swapping", flush=True)
while True:
    libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)
"""


def can_exchange() -> bool:
    return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "renameat2")


@pytest.fixture
def race(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(workspace, outside): workspace/sub keeps being swapped with a symlink to outside."""
    root, outside = tmp_path / "ws", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("TOP-SECRET\n")
    (root / "sub" / "secret.txt").write_text("inside\n")
    (root / "sub.link").symlink_to(outside, target_is_directory=True)
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(root / "sub"), str(root / "sub.link")], stdout=subprocess.PIPE, text=True)
    try:
        assert swapper.stdout is not None and swapper.stdout.readline() == "swapping\n"
        yield root, outside
    finally:
        swapper.kill()
        swapper.wait(SWAPPER_START_S)


@pytest.mark.skipif(not can_exchange(), reason="needs Linux's renameat2(RENAME_EXCHANGE)")
async def test_writes_never_land_outside_while_a_directory_is_swapped(race: tuple[Path, Path]) -> None:
    """write_file through `sub` while it flips between a directory and a symlink out: each write lands inside or is refused, none outside."""
    root, outside = race
    ws = Workspace(root)
    answers: Counter[str] = Counter()
    deadline = time.monotonic() + RACE_S
    while time.monotonic() < deadline:
        try:
            await ws.call("write_file", {"path": f"sub/new-{sum(answers.values())}.txt", "content": "pwned\n"})
            answers["written"] += 1
        except ToolError as exc:
            answers[exc.name] += 1
        except OSError as exc:  # a crash: the IDE would answer -32603; the race goes on
            answers[type(exc).__name__] += 1
    escaped = sorted(os.listdir(outside))
    assert escaped == ["secret.txt"], f"{len(escaped) - 1} files landed outside in {sum(answers.values())} writes: {answers}"
    assert answers["written"] > 0 and answers["outside_workspace"] > 0, answers  # the race really ran both ways


@pytest.mark.skipif(not can_exchange(), reason="needs Linux's renameat2(RENAME_EXCHANGE)")
async def test_reads_never_see_outside_while_a_directory_is_swapped(race: tuple[Path, Path]) -> None:
    """read_file of sub/secret.txt in the same race: the inside file or a refusal, never the outside one."""
    root, _ = race
    ws = Workspace(root)
    answers: Counter[str] = Counter()
    deadline = time.monotonic() + RACE_S
    while time.monotonic() < deadline:
        try:
            content = (await ws.call("read_file", {"path": "sub/secret.txt"}))["content"]
            answers[content] += 1
        except ToolError as exc:
            answers[exc.name] += 1
        except OSError as exc:
            answers[type(exc).__name__] += 1
    assert "TOP-SECRET\n" not in answers, answers
    assert answers["inside\n"] > 0 and answers["outside_workspace"] > 0, answers
