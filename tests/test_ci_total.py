"""scripts/ci_total.py: .ci/run's closing line adds up both platforms' pytest runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ci_total.py"


def _junit(path: Path, tests: int, failures: int, errors: int, skipped: int) -> str:
    path.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" '
        f'errors="{errors}" failures="{failures}" skipped="{skipped}" tests="{tests}" '
        'time="1.0"/></testsuites>'
    )
    return str(path)


def _total(*runs: str) -> tuple[int, list[str]]:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *runs], capture_output=True, text=True, timeout=30
    )
    return result.returncode, result.stdout.splitlines()


def test_both_green(tmp_path: Path) -> None:
    a = _junit(tmp_path / "a.xml", 10, 0, 0, 0)
    b = _junit(tmp_path / "b.xml", 12, 0, 0, 0)
    code, lines = _total(f"host=0={a}", f"debian13=0={b}")
    assert code == 0
    assert lines == [
        "host: 10 passed, 0 failed, 0 skipped",
        "debian13: 12 passed, 0 failed, 0 skipped",
        "total: 22 passed, 0 failed, 0 skipped",
    ]


def test_a_failure_in_the_first_run_shows_in_the_last_line(tmp_path: Path) -> None:
    a = _junit(tmp_path / "a.xml", 10, 1, 2, 1)
    b = _junit(tmp_path / "b.xml", 12, 0, 0, 0)
    code, lines = _total(f"host=1={a}", f"debian13=0={b}")
    assert code == 1
    assert lines[-1] == "total: 18 passed, 3 failed, 1 skipped"


def test_a_red_run_without_failed_tests_or_results_counts_as_a_failure(tmp_path: Path) -> None:
    a = _junit(tmp_path / "a.xml", 10, 0, 0, 0)
    code, lines = _total(f"host=1={a}", f"debian13=0={tmp_path / 'missing.xml'}")
    assert code == 1
    assert lines == [
        "host: 10 passed, 1 failed, 0 skipped (exit status 1)",
        "debian13: 0 passed, 1 failed, 0 skipped (exit status 0, no test results)",
        "total: 10 passed, 2 failed, 0 skipped",
    ]
