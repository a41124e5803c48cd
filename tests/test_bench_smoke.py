"""Benchmarks that cannot rot: every ``bench/bench_*.py`` runs once with ``--smoke``.

The contract (bench/README.md): each script accepts ``--smoke`` (tiny sizes, one round, every
code path it measures) and exits 0; nothing about speed is asserted here. A script that
declares ``NEEDS_NETNS = True`` builds the tests/harness namespaces: it runs where the
interop tests run (root), is marked ``interop``, and a missing environment is a failure under
``CI=true``. Scripts are discovered, so a new benchmark is covered the day it is added.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require_netns

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "bench").glob("bench_*.py"))
#: Per script; the slowest (an exit restart with the kernel path's ~20 s recovery) takes ~30 s.
TIMEOUT = 300
#: More ``--smoke`` runs of a script, each with these flags added: code paths that a plain
#: ``--smoke`` does not take (bench_path ``--ipv6``: both clients over IPv6 in the tunnel;
#: bench_mitm_https ``--split``: the tunnel in a process of its own).
VARIANTS: dict[str, list[list[str]]] = {
    "bench_path": [["--ipv6"]],
    "bench_mitm_https": [["--split"]],  # the tunnel-in-its-own-process experiment
}


def needs_netns(script: Path) -> bool:
    return re.search(r"^NEEDS_NETNS\s*=\s*True\b", script.read_text(), re.MULTILINE) is not None


def test_bench_scripts_exist() -> None:
    assert len(SCRIPTS) >= 5, SCRIPTS


def test_variants_name_existing_scripts() -> None:
    assert set(VARIANTS) <= {s.stem for s in SCRIPTS}, VARIANTS


@pytest.mark.parametrize(
    ("script", "extra"),
    [
        pytest.param(
            s,
            extra,
            id="-".join([s.stem, *(f.lstrip("-") for f in extra)]),
            marks=[pytest.mark.interop] if needs_netns(s) else [],
        )
        for s in SCRIPTS
        for extra in [[], *VARIANTS.get(s.stem, [])]
    ],
)
def test_bench_script_runs_with_smoke(script: Path, extra: list[str]) -> None:
    source = script.read_text()
    assert "--smoke" in source, (
        f"{script.relative_to(REPO)} does not accept --smoke (the contract in bench/README.md)"
    )
    if needs_netns(script):
        require_netns()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        result = subprocess.run(
            [sys.executable, str(script), "--smoke", *extra],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{script.name} --smoke {extra} still running after {TIMEOUT} s: {e.stdout!r}")
    assert result.returncode == 0, (
        f"{script.name} --smoke {extra} exited {result.returncode}\n"
        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    )
    assert result.stdout.strip(), f"{script.name} --smoke printed nothing"


def test_bench_path_reports_the_machines_steal_and_idle_time() -> None:
    """Each transfer's steal and idle shares (bench_path ``steal``/``idle``, also on
    bench_mitm_https's round lines) come from /proc/stat's aggregate line: shares of all CPU
    time, in [0, 1]."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_path
    finally:
        sys.path.remove(str(REPO / "bench"))
    before = bench_path.cpu_ticks()
    assert before is not None, "no aggregate cpu line in /proc/stat"
    steal, idle, total = before
    assert 0 <= steal <= total and 0 < idle <= total and steal + idle <= total
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline:
        pass  # let the clock ticks move: this core was busy, so idle is below the whole
    share = bench_path.steal_since(before)
    assert share is not None and 0.0 <= share <= 1.0, share
    idle_share = bench_path.idle_since(before)
    assert idle_share is not None and 0.0 <= idle_share < 1.0, idle_share
    assert bench_path.steal_since(None) is None
    assert bench_path.idle_since(None) is None
    assert (
        bench_path.steal_since((steal, idle, total + 10**12)) is None
    )  # the counters never go back
