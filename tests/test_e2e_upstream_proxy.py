"""End to end in mitmproxy's upstream mode, the upstream proxy reachable only in the tunnel.

A self-hosted exit often runs a proxy (Squid, tinyproxy) on its WireGuard address, and users
chain mitmproxy to it: ``--mode upstream:http://10.78.N.1:3128``. mitmproxy then opens every
server connection to that proxy, never to the origin: the addon must carry those through
the tunnel (the proxy's address is inside AllowedIPs and nowhere else). Here the upstream
proxy is a second mitmdump (no addon) in the exit's namespace listening on the exit's
tunnel address only, passing TLS through; behind it the echo origin. curl → mitmdump +
addon (upstream mode) → our WireGuard → wireguard-go → the proxy → the origin: plain HTTP
(a GET in absolute form) and HTTPS (a CONNECT tunnel to the proxy, mitmproxy intercepting
TLS on our side), byte-exact, and the proxy saw every connection from our tunnel address.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import (
    MITMDUMP,
    Mitmdump,
    assert_pattern,
    curl,
    run_mitmdump,
    wait_for,
    write_client_config,
)

from harness import ExitPeer

PROXY_PORT = 3128
SIZE = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def upstream_proxy(exit_peer: ExitPeer, workdir: Path) -> Iterator[Path]:
    """A plain mitmdump on the exit's tunnel address (reachable only through the tunnel),
    passing TLS through; yields its log."""
    confdir = workdir / "upstream-conf"
    confdir.mkdir()
    log = workdir / "upstream.log"
    with log.open("wb") as out:
        proc = exit_peer.ns.popen(
            [
                str(MITMDUMP), "--listen-host", exit_peer.server_tunnel_v4,
                "--listen-port", str(PROXY_PORT), "--set", f"confdir={confdir}",
                "--ignore-hosts", ".*",
            ],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(
            lambda: "proxy listening at" in log.read_text(errors="replace"),
            30,
            "the upstream proxy to listen",
        )
        yield log
    finally:
        exit_peer.ns.kill(proc)


@pytest.fixture(scope="module")
def proxy(
    exit_peer: ExitPeer, workdir: Path, origin: Any, upstream_proxy: Path
) -> Iterator[Mitmdump]:
    conf = write_client_config(exit_peer, workdir, "exit")
    args = [
        "--mode", f"upstream:http://{exit_peer.server_tunnel_v4}:{PROXY_PORT}",
        "--set", f"wg_conf=exit={conf}",
        "--set", f"ssl_verify_upstream_trusted_ca={origin.ca}",
    ]  # fmt: skip
    with run_mitmdump(exit_peer.client_ns, workdir, *args) as dump:
        yield dump


def _seen_by_the_proxy(log: Path) -> set[str]:
    return set(re.findall(r"\[([\d.]+):\d+\] client connect", log.read_text(errors="replace")))


def test_http_and_https_through_an_upstream_proxy_inside_the_tunnel(
    exit_peer: ExitPeer, proxy: Mitmdump, upstream_proxy: Path
) -> None:
    # (the proxy resolves names in the exit's namespace, which has no resolver: addresses)
    host = exit_peer.server_tunnel_v4
    r = curl(exit_peer.client_ns, "-x", proxy.proxy, f"http://{host}/bytes/{SIZE}", max_time=60)
    assert_pattern(r, SIZE)
    r = curl(
        exit_peer.client_ns, "--cacert", str(proxy.ca_pem), "-x", proxy.proxy,
        f"https://{host}/bytes/{SIZE}", max_time=60,
    )  # fmt: skip
    assert_pattern(r, SIZE)
    log = proxy.text()
    # mitmproxy connected to the proxy only, always through the tunnel
    assert set(re.findall(r"server connect (\S+)", log)) == {f"{host}:{PROXY_PORT}"}
    through = re.findall(rf"mitm-wg: {re.escape(host)}:{PROXY_PORT} through tunnel 'exit'", log)
    assert len(through) == len(re.findall(r"server connect ", log)) >= 2
    assert _seen_by_the_proxy(upstream_proxy) == {exit_peer.client_tunnel_v4}
