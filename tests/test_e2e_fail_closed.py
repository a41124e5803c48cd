"""End to end: with the WireGuard peer down, nothing leaves outside the tunnel.

A full-tunnel config (``AllowedIPs = 0.0.0.0/0, ::/0``) whose peer (wireguard-go) is stopped.
The target is a server the client namespace CAN reach directly: on the exit namespace's veth
address 10.77.N.2 (the test first proves that with a direct curl). Through mitmdump + the
addon (regular and socks5 mode) the same requests must fail within the handshake timeout
with an error saying why, and the server must see no connection at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import Mitmdump, Origin, curl, run_mitmdump, run_origin, write_client_config

TUNNEL = "full"
PORT = 8080
HANDSHAKE_MESSAGE = "did not answer the handshake"
#: The runtime gives up on a handshake after 10 s; curl must have its answer well before this.
DEADLINE = 15.0


@pytest.fixture
def direct_server(fresh_exit_peer: Any, tmp_path: Path) -> Iterator[Origin]:
    """A plain HTTP echo server on the exit's veth address (outside the tunnel)."""
    host = fresh_exit_peer.endpoint[0]
    with run_origin(fresh_exit_peer.ns, tmp_path, http=[f"{host}:{PORT}"], name="direct") as srv:
        yield srv


@pytest.fixture
def proxies(fresh_exit_peer: Any, tmp_path: Path) -> Iterator[tuple[Mitmdump, Mitmdump]]:
    """(regular, socks5) mitmdumps with the full-tunnel config, the peer already stopped."""
    fresh_exit_peer.stop_wireguard()
    conf = write_client_config(fresh_exit_peer, tmp_path, TUNNEL, allowed_ips="0.0.0.0/0, ::/0")
    assert "AllowedIPs = 0.0.0.0/0, ::/0" in conf.read_text()
    ns = fresh_exit_peer.client_ns
    with contextlib.ExitStack() as stack:
        regular = stack.enter_context(
            run_mitmdump(ns, tmp_path, "--set", f"wg_conf={conf}", name="regular")
        )
        socks = stack.enter_context(
            run_mitmdump(
                ns, tmp_path, "--mode", "socks5", "--set", f"wg_conf={conf}", name="socks5"
            )
        )
        yield regular, socks


def test_peer_down_fails_closed(
    fresh_exit_peer: Any, direct_server: Origin, proxies: tuple[Mitmdump, Mitmdump]
) -> None:
    regular, socks = proxies
    ns = fresh_exit_peer.client_ns
    host = fresh_exit_peer.endpoint[0]

    # The destination is reachable from this namespace without the proxy ...
    direct = curl(ns, f"http://{host}:{PORT}/echo-direct")
    assert direct.status == 200, direct
    assert direct.json()["client"] == f"10.77.{fresh_exit_peer.index}.1"
    assert len(direct_server.entries("connect")) == 1

    # ... but through mitmdump every attempt fails (all at once: each waits for the
    # handshake timeout).
    attempts = {
        "http": ("--fail-with-body", "-x", regular.proxy, f"http://{host}:{PORT}/echo-http"),
        "https": (
            "--cacert",
            str(regular.ca_pem),
            "-x",
            regular.proxy,
            f"https://{host}:{PORT}/echo-connect",
        ),
        "socks5": (
            "--socks5-hostname",
            f"127.0.0.1:{socks.port}",
            f"http://{host}:{PORT}/echo-socks",
        ),
    }
    with ThreadPoolExecutor(len(attempts)) as pool:
        futures = {name: pool.submit(curl, ns, *args) for name, args in attempts.items()}
        results = {name: future.result() for name, future in futures.items()}

    for name, result in results.items():
        assert result.returncode != 0, (name, result)
        assert result.elapsed < DEADLINE, (name, result)
    # mitmproxy's error response (and below, its log) names the cause
    assert results["http"].returncode == 22 and results["http"].status == 502
    assert HANDSHAKE_MESSAGE in results["http"].body.decode()
    # and why: the stopped server's host answered our probe with ICMP port unreachable
    assert "(ICMP port unreachable)" in results["http"].body.decode()
    assert "CONNECT tunnel failed, response 502" in results["https"].stderr
    # socks5: mitmproxy connects before answering, and answers "host unreachable" (4)
    # (curl 7.88 says "Can't complete", curl 8.14 in Debian 13 "cannot complete")
    assert "complete SOCKS5 connection" in results["socks5"].stderr
    assert results["socks5"].stderr.rstrip().endswith("(4)"), results["socks5"]
    for dump in (regular, socks):
        text = dump.wait_for_log(HANDSHAKE_MESSAGE)
        assert "through tunnel" not in text and "DIRECT" not in text

    # The directly reachable server never saw a second connection.
    assert len(direct_server.entries("connect")) == 1
    assert direct_server.paths() == ["/echo-direct"]
