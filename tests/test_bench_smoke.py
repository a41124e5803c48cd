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
from typing import Any

import pytest
from conftest import require_netns

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((REPO / "bench").glob("bench_*.py"))
#: Per script; the slowest (an exit restart with the kernel path's ~20 s recovery) takes ~30 s.
TIMEOUT = 300
#: More ``--smoke`` runs of a script, each with these flags added: code paths that a plain
#: ``--smoke`` does not take (bench_path ``--ipv6``: both clients over IPv6 in the tunnel;
#: ``--udp-buffer``: a stock kernel's buffer, ours on a receive group and, as the third
#: client, on one socket; bench_mitm_https ``--split``: the tunnel in a process of its own;
#: ``--path``: every tunnel through an impairing relay; ``--upload``: PUTs instead of GETs;
#: bench_page_load ``--h2``: every request multiplexed on one connection).
VARIANTS: dict[str, list[list[str]]] = {
    "bench_path": [
        ["--ipv6"],
        ["--udp-buffer", "212992", "--before-after", "--before", "group"],
    ],
    "bench_mitm_https": [["--split"], ["--path", "rtt50"], ["--upload", "--split"]],
    "bench_page_load": [["--h2"]],
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
    if script.stem == "bench_path":
        # our socket's counters per row (OUR_TCP_COUNTERS) and our tunnel's reader's
        # (OUR_TUNNEL_COUNTERS): it took segments in and sent some in every one, and the
        # reader woke
        ours = re.findall(
            r"^- .*: segments_in (\d+), segments_out (\d+), acks_coalesced \d+, retransmits \d+,"
            r" dsacks \d+, tlp_probes \d+, recovery_probes \d+, rto_expired \d+, lost_retransmits \d+, reads (\d+),"
            r" read_holds \d+, group_merges \d+$",
            result.stdout,
            re.M,
        )
        assert ours and all(int(n) > 0 for row in ours for n in row), result.stdout[-3000:]
        # and what our thread slept on (SleepReasons): every reason, shares of 0-100 %
        reasons = "".join(rf"{why or 'other'} ([\d.]+), " for why in _bench_path().SLEEP_REASONS)
        asleep = re.findall(rf"^- .*: {reasons[:-2]}$", result.stdout, re.M)
        assert len(asleep) >= len(ours), result.stdout[-3000:]
        # and both senders' retransmissions and D-SACKs side by side (CLIENT_TCP_COUNTERS)
        senders = re.findall(
            r"^- .*: rtx (\d+|-) / (\d+), dsack (\d+|-) / (\d+)$", result.stdout, re.M
        )
        assert len(senders) >= len(ours), result.stdout[-3000:]
        assert all(0 <= float(v) <= 100 for row in asleep for v in row), asleep


def _bench_path() -> Any:
    """bench/bench_path.py as a module (bench/ is not a package)."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_path
    finally:
        sys.path.remove(str(REPO / "bench"))
    return bench_path


def test_bench_path_reports_the_machines_steal_and_idle_time() -> None:
    """Each transfer's steal and idle shares (bench_path ``steal``/``idle``, also on
    bench_mitm_https's round lines) come from /proc/stat's aggregate line: shares of all CPU
    time, in [0, 1]."""
    bench_path = _bench_path()
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


def test_bench_path_reports_what_our_thread_did_with_the_transfers_time() -> None:
    """bench_path's ``thread`` of our transfers: the trio thread's time on a CPU and in a
    run queue waiting for one (/proc/thread-self/schedstat), as shares of the wall time.
    A thread spinning for a while is on a CPU or waiting for one nearly all of it; one
    sleeping is on neither."""
    bench_path = _bench_path()
    before = bench_path.thread_sched()
    assert before is not None, "no /proc/thread-self/schedstat"
    start, cpu0 = time.perf_counter(), time.thread_time()
    while time.perf_counter() - start < 0.2:
        pass
    wall = time.perf_counter() - start
    ran = (time.thread_time() - cpu0) / wall  # the same clock as schedstat's first field
    shares = bench_path.thread_shares(before, wall)
    assert shares is not None
    on_cpu, waiting = shares
    assert 0.0 <= on_cpu <= 1.05 and 0.0 <= waiting <= 1.05, shares
    assert abs(on_cpu - ran) < 0.05, (shares, ran)
    assert on_cpu + waiting > 0.9, shares  # busy: running, or runnable on a full machine
    before = bench_path.thread_sched()
    start = time.perf_counter()
    time.sleep(0.2)
    on_cpu, waiting = bench_path.thread_shares(before, time.perf_counter() - start) or (1, 1)
    assert on_cpu < 0.5 and waiting < 0.5, (on_cpu, waiting)
    # sharing one CPU with a busy process: it waits for that CPU much of the time
    cpu = min(os.sched_getaffinity(0))
    saved = os.sched_getaffinity(0)
    spin = (
        f"import os, time\nos.sched_setaffinity(0, {{{cpu}}})\n"
        "t = time.time()\nwhile time.time() - t < 1.5: pass"
    )
    other = subprocess.Popen([sys.executable, "-c", spin])
    try:
        os.sched_setaffinity(0, {cpu})
        time.sleep(0.3)  # (the other one is spinning on that CPU by now)
        before = bench_path.thread_sched()
        start = time.perf_counter()
        while time.perf_counter() - start < 0.3:
            pass
        on_cpu, waiting = bench_path.thread_shares(before, time.perf_counter() - start) or (0, 0)
    finally:
        os.sched_setaffinity(0, saved)
        other.kill()
        other.wait()
    assert waiting > 0.15 and on_cpu + waiting > 0.9, (on_cpu, waiting)
    assert bench_path.thread_shares(None, 1.0) is None
    assert bench_path.thread_shares(before, 0.0) is None
