"""Smoke test for bench.py: `--quick --redis` runs end to end and reports every figure of both stacks. Never its values."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT
from servers import REDIS_SERVER

BENCH_TIMEOUT_S = 300  # a hang bound; --quick --redis takes about 20 s on a quiet 2-core machine (once, in CI, over 180 s)
QUICK_LEVELS = (1, 100)  # bench.QUICK_LEVELS, spelled here so that a change shows up in review
PROCESSES = ("gateway", "agent", "llm_proxy")  # whose CPU and memory are the pipeline's own


def figures_of(processes: tuple[str, ...]) -> list[str]:
    """Every figure one stack reports, when `processes` do the pipeline's work."""
    return [
        *(f"ttft_{path}_p{q}_ms" for path in ("pipeline", "via_agent", "via_proxy", "direct", "added") for q in (50, 99)),
        *(f"ttft_{path}_added_p{q}_ms" for path in ("via_agent", "via_proxy") for q in (50, 99)),
        "throughput_tokens_per_s",
        "throughput_direct_tokens_per_s",
        "throughput_tokens_per_notification",
        "throughput_cpu_us_per_token",
        *(f"throughput_cpu_us_per_token_{name}" for name in processes),
        "throughput_errors",
        *(f"tool_rt_{path}_p{q}_ms" for path in ("added", "ide") for q in (50, 99)),
        *(f"tool_turn_{path}_p{q}_ms" for path in ("pipeline", "direct", "added") for q in (50, 99)),
        "resume_p50_ms", "resume_p99_ms", "resume_connect_p50_ms", "resume_result_p50_ms",
        "resume_drops", "resume_live_first", "resume_errors",
        *(
            f"n{n}_{name}"
            for n in QUICK_LEVELS
            for name in (
                "gap_added_p50_ms", "gap_added_p99_ms", "ttft_p99_ms", "errors", "cpu_us_per_token",
                *(f"cpu_us_per_token_{process}" for process in (*processes, "fake_llm", "bench")),
                *(f"peak_rss_mb_{process}" for process in processes),
                "direct_gap_added_p50_ms", "direct_gap_added_p99_ms", "direct_errors",
            )
        ),
    ]  # fmt: skip


def test_quick_run_reports_every_figure_as_a_number() -> None:
    """`python bench.py --quick --redis` exits 0; its last line is JSON holding every figure of the
    memory stack, and as "redis.NAME" every figure of the Redis stack, redis-server's CPU and memory
    among them; each a number. Without redis-server installed, `--quick` alone."""
    with_redis = bool(REDIS_SERVER)
    try:
        done = subprocess.run(
            [sys.executable, str(ROOT / "bench.py"), "--quick", *(["--redis"] if with_redis else [])],
            cwd=ROOT, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:  # say where it stood: each stage prints its name on stderr
        said = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        raise AssertionError(f"bench.py ran past {BENCH_TIMEOUT_S} s; its stderr ends:\n{said[-3000:]}") from None
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    expected = figures_of(PROCESSES)
    if with_redis:
        expected += [f"redis.{name}" for name in figures_of((*PROCESSES, "redis"))]
        assert "redis against memory" in done.stdout, done.stdout  # the side-by-side table
    assert sorted(figures) == sorted(expected), done.stdout
    for name, value in figures.items():
        assert isinstance(value, int | float) and not isinstance(value, bool), (name, value)
        assert value == value, f"{name} is NaN"  # NaN: a figure with no samples behind it


def test_help_says_what_it_measures() -> None:
    """--help answers without starting anything and names the options a reader needs."""
    done = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    for option in ("--quick", "--redis", "--scale", "--baseline", "--rounds", "--only", "--levels", "--turns", "--runs", "--drops"):
        assert option in done.stdout


def test_a_baseline_that_is_not_a_checkout_is_refused() -> None:
    """--baseline DIR without the services in it stops before anything starts, naming what is missing."""
    done = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--baseline", str(ROOT / "tests")], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "gateway.py" in done.stderr
