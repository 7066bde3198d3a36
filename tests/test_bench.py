"""Smoke test for bench.py: `--quick` runs end to end and reports every figure. Never its values."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

BENCH_TIMEOUT_S = 180  # a hang bound; --quick takes well under a minute on a quiet 2-core machine
QUICK_LEVELS = (1, 10, 100)  # bench.QUICK_LEVELS, spelled here so that a change shows up in review

FIGURES = [
    *(f"ttft_{path}_p{q}_ms" for path in ("pipeline", "via_agent", "via_proxy", "direct", "added") for q in (50, 99)),
    *(f"ttft_{path}_added_p{q}_ms" for path in ("via_agent", "via_proxy") for q in (50, 99)),
    "throughput_tokens_per_s",
    "throughput_direct_tokens_per_s",
    "throughput_tokens_per_notification",
    "throughput_cpu_us_per_token",
    "throughput_errors",
    *(f"tool_rt_{path}_p{q}_ms" for path in ("added", "ide") for q in (50, 99)),
    *(f"tool_turn_{path}_p{q}_ms" for path in ("pipeline", "direct", "added") for q in (50, 99)),
    *(
        f"n{n}_{name}"
        for n in QUICK_LEVELS
        for name in (
            "gap_added_p50_ms", "gap_added_p99_ms", "ttft_p99_ms", "errors",
            "cpu_us_per_token", "cpu_us_per_token_gateway", "cpu_us_per_token_agent", "cpu_us_per_token_llm_proxy",
            "cpu_us_per_token_fake_llm", "cpu_us_per_token_bench",
            "peak_rss_mb_gateway", "peak_rss_mb_agent", "peak_rss_mb_llm_proxy",
            "direct_gap_added_p50_ms", "direct_gap_added_p99_ms", "direct_errors",
        )
    ),
]  # fmt: skip


def test_quick_run_reports_every_figure_as_a_number() -> None:
    """`python bench.py --quick` exits 0 and its last line is JSON holding every figure, each a number."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench.py"), "--quick"],
        cwd=ROOT, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(figures) == sorted(FIGURES), done.stdout
    for name, value in figures.items():
        assert isinstance(value, int | float) and not isinstance(value, bool), (name, value)
        assert value == value, f"{name} is NaN"  # NaN: a figure with no samples behind it


def test_help_says_what_it_measures() -> None:
    """--help answers without starting anything and names the options a reader needs."""
    done = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    for option in ("--quick", "--only", "--levels", "--turns", "--runs"):
        assert option in done.stdout
