"""End to end: mitmdump + addon where the kernel grants a stock kernel's UDP buffer.

An unprivileged mitmproxy under a stock kernel gets 416 KiB receive buffers (rmem_max
212992, doubled), not the 4 MiB the tunnel asks for. The tunnel then says so once, and
receives on a group of 8 sockets of one port (mitm_wg/runtime/sockgroup.py). This machine's
limit is 4 MiB and the tests run as root, so a script loaded next to the addon sets
``tunnel.BUFFER_LIMIT``: the ask becomes what such a process gets. Everything else is as in
tests/test_e2e_curl.py: curl → mitmdump + addon → our WireGuard → wireguard-go → the origin
on the exit's tunnel addresses. The group is seen from outside, as ``ss`` lists mitmdump's
sockets.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import (
    ORIGIN_NAME,
    Mitmdump,
    Origin,
    assert_pattern,
    curl_via,
    run_mitmdump,
    tunnel_addresses,
    write_client_config,
)

TUNNEL = "exit"
STOCK = 212992
SIZE = 30 * 1024 * 1024
LIMIT_SCRIPT = f"""
from mitm_wg.runtime import tunnel

tunnel.BUFFER_LIMIT = {STOCK}  # a stock kernel's net.core.rmem_max, without CAP_NET_ADMIN
"""


@pytest.fixture(scope="module")
def proxy(exit_peer: Any, workdir: Path, origin: Origin) -> Iterator[Mitmdump]:
    conf = write_client_config(exit_peer, workdir, TUNNEL)
    script = workdir / "stock_kernel.py"
    script.write_text(LIMIT_SCRIPT)
    args = [
        "-s",
        str(script),
        "--set",
        f"wg_conf={TUNNEL}={conf}",
        "--set",
        f"ssl_verify_upstream_trusted_ca={origin.ca}",
    ]
    with run_mitmdump(exit_peer.client_ns, workdir, *args) as dump:
        dump.wait_for_log(f"WireGuard tunnel {TUNNEL!r} is up")
        yield dump


def _udp_ports(exit_peer: Any, pid: int) -> collections.Counter[int]:
    """The local ports of ``pid``'s UDP sockets (one count per socket), as ss lists them."""
    out = exit_peer.client_ns.exec(["ss", "-uanpH"], check=True).stdout
    ports: collections.Counter[int] = collections.Counter()
    for line in out.splitlines():
        if f"pid={pid}," in line:
            local = line.split()[3]
            ports[int(local.rsplit(":", 1)[1])] += 1
    return ports


def test_a_download_through_mitmdump_is_received_on_a_group(
    exit_peer: Any, origin: Origin, proxy: Mitmdump
) -> None:
    """The log says once what the kernel gave; mitmdump holds 8 UDP sockets on one port
    (the tunnel's group, none other on it); a 30 MiB HTTPS download through it arrives
    byte-exact, from the tunnel."""
    text = proxy.text()
    said = re.findall(r"gave the tunnel's UDP socket a (\d+) KiB receive buffer", text)
    assert said == [str(2 * STOCK >> 10)], said
    port, count = _udp_ports(exit_peer, proxy.proc.pid).most_common(1)[0]
    assert count == 8, (port, count)
    r = curl_via(exit_peer.client_ns, proxy, f"https://{ORIGIN_NAME}/bytes/{SIZE}", max_time=90)
    assert_pattern(r, SIZE)
    seen = [e for e in origin.requests() if e.get("path") == f"/bytes/{SIZE}"]
    assert seen and seen[-1]["client"] in tunnel_addresses(exit_peer)
    # the tunnel's sockets are still the group's (nothing fell back meanwhile)
    assert _udp_ports(exit_peer, proxy.proc.pid)[port] == 8
