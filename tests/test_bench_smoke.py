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
from pathlib import Path

import pytest
from conftest import require_netns

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "bench").glob("bench_*.py"))
#: Per script; the slowest (an exit restart with the kernel path's ~20 s recovery) takes ~30 s.
TIMEOUT = 300


def needs_netns(script: Path) -> bool:
    return re.search(r"^NEEDS_NETNS\s*=\s*True\b", script.read_text(), re.MULTILINE) is not None


def test_bench_scripts_exist() -> None:
    assert len(SCRIPTS) >= 5, SCRIPTS


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(s, id=s.stem, marks=[pytest.mark.interop] if needs_netns(s) else [])
        for s in SCRIPTS
    ],
)
def test_bench_script_runs_with_smoke(script: Path) -> None:
    source = script.read_text()
    assert "--smoke" in source, (
        f"{script.relative_to(REPO)} does not accept --smoke (the contract in bench/README.md)"
    )
    if needs_netns(script):
        require_netns()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        result = subprocess.run(
            [sys.executable, str(script), "--smoke"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{script.name} --smoke still running after {TIMEOUT} s: {e.stdout!r}")
    assert result.returncode == 0, (
        f"{script.name} --smoke exited {result.returncode}\n"
        f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    )
    assert result.stdout.strip(), f"{script.name} --smoke printed nothing"
