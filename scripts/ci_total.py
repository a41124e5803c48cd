"""Add up pytest's JUnit XML results of the CI runs (.ci/run): one line per run, then
``total: N passed, N failed, N skipped``; exit status 1 if any run failed.

Arguments: ``NAME=EXIT_STATUS=JUNIT_XML`` per run. A run that exited non-zero without a failed
test (ruff, set-up, a crash before pytest finished) counts as one failure, so the total never
reads green when a run was red.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def counts(path: Path) -> tuple[int, int, int] | None:
    """(passed, failed, skipped) from a JUnit XML file, None when there is none."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = failed = skipped = 0
    for suite in suites:
        tests += int(suite.get("tests", 0))
        failed += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
    return tests - failed - skipped, failed, skipped


def main(argv: list[str]) -> int:
    total = [0, 0, 0]
    bad = False
    for arg in argv:
        name, status, xml = arg.split("=", 2)
        found = counts(Path(xml))
        passed, failed, skipped = found or (0, 0, 0)
        note = ""
        if (status != "0" or found is None) and failed == 0:
            failed = 1
            note = f" (exit status {status}{'' if found else ', no test results'})"
        bad |= status != "0" or failed > 0
        print(f"{name}: {passed} passed, {failed} failed, {skipped} skipped{note}")
        for i, n in enumerate((passed, failed, skipped)):
            total[i] += n
    print(f"total: {total[0]} passed, {total[1]} failed, {total[2]} skipped")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
