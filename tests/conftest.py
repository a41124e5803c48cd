"""Shared pytest configuration: skip rules (strict under CI=true) and peer fixtures.

Under CI=true every skip is a failure (a test that did not run proves nothing): skips from
``pytest.skip``, from skip/skipif marks and from a whole module skipped at collection.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import ExitPeer, MitmPeer, have_mitmdump, have_netns, mitmproxy_wireguard_peer
from harness import exit_peer as _exit_peer

log = logging.getLogger(__name__)

pytest_plugins = ["pytester"]  # test_harness checks the CI skip rules with it

# Using any of these fixtures marks a test `interop`.
INTEROP_FIXTURES = frozenset({"netns_available", "exit_peer", "fresh_exit_peer", "mitm_peer"})


def in_ci() -> bool:
    """True when the environment says CI (``CI=true``/``1``/``yes``)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"CI=true but the interop environment is unusable: {reason}", pytrace=False)
    pytest.skip(reason)


def require_netns() -> None:
    """Skip (fail under CI=true) unless namespaces + wireguard-go + wg are usable."""
    ok, reason = have_netns()
    if not ok:
        _unavailable(reason)


def require_mitmdump() -> None:
    """Skip (fail under CI=true) unless mitmdump is installed."""
    ok, reason = have_mitmdump()
    if not ok:
        _unavailable(reason)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEROP_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.interop)


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


def _exit_peers(values: Any) -> Iterator[ExitPeer]:
    """The ExitPeers among fixture values, also inside lists and tuples (a pool's exits)."""
    for value in values:
        if isinstance(value, ExitPeer):
            yield value
        elif isinstance(value, list | tuple):
            yield from _exit_peers(value)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    report: pytest.TestReport = yield
    if report.failed:
        # A failure against a real exit carries the exit's account (whether wireguard-go
        # took, dropped or never saw a handshake message): in CI the run is gone after it.
        for peer in _exit_peers(getattr(item, "funcargs", {}).values()):
            report.sections.append(
                (f"wireguard-go log of exit {peer.ns.name} ({report.when})",
                 peer.wireguard_log()),
            )  # fmt: skip
    if report.skipped and in_ci() and not hasattr(report, "wasxfail"):
        kind = "interop test" if item.get_closest_marker("interop") is not None else "test"
        reason = _skip_reason(report)
        report.outcome = "failed"
        report.longrepr = f"{kind} skipped under CI=true (must run in CI): {reason}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    report: pytest.CollectReport = yield
    if report.skipped and in_ci():
        reason = _skip_reason(report)
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid} skipped under CI=true (must run in CI): {reason}"
    return report


@pytest.fixture
def netns_available() -> None:
    require_netns()


@pytest.fixture(scope="module")
def exit_peer() -> Iterator[ExitPeer]:
    """A shared exit peer (IPv4+IPv6, HTTP, dnsmasq) for the whole test module."""
    require_netns()
    with _exit_peer(dnsmasq=True) as peer:
        yield peer


@pytest.fixture(scope="module")
def workdir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of the test module's own (configs, logs, certificates)."""
    return tmp_path_factory.mktemp(request.module.__name__.removeprefix("test_"))


@pytest.fixture(scope="module")
def origin(exit_peer: ExitPeer, workdir: Path) -> Iterator[Any]:
    """The end-to-end echo origin (tests/e2e_helpers.py) on the exit's tunnel addresses."""
    from e2e_helpers import exit_origin

    with exit_origin(exit_peer, workdir) as origin:
        yield origin


@pytest.fixture
def fresh_exit_peer() -> Iterator[ExitPeer]:
    """An exit peer of its own for one test (for stats or stop/start tests)."""
    require_netns()
    with _exit_peer(dnsmasq=True) as peer:
        yield peer


@pytest.fixture(scope="module")
def mitm_peer() -> Iterator[MitmPeer]:
    """mitmdump's WireGuard mode on 127.0.0.1 (random UDP port), fresh confdir."""
    require_mitmdump()
    with mitmproxy_wireguard_peer() as peer:
        yield peer
