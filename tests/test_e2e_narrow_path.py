"""End to end behind a PPPoE line: mitmdump + addon, the exit's endpoint over IPv6.

The classic case of a path narrower than WireGuard's datagrams: a PPPoE line carries
1492-byte packets, while a tunnel MTU of 1420 over an IPv6 endpoint makes 1500-byte ones.
Users on such lines load the addon with their provider's config as it is. Here a Linux router
(:func:`harness.narrow_link`) with a 1492-byte link sits between mitmdump's namespace and the
exit (wireguard-go + the Linux stack), and answers too-big packets with ICMPv6 "packet too
big". Through mitmdump (curl → mitmdump + addon → our WireGuard over IPv6 → the exit → the
HTTPS echo origin): an upload and a download, byte-exact, the addon logs the narrower path
once, and a later connection's datagrams fit it (the exit reassembles no fragment of them).
Before the fix the first upload stalled for good.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import require_netns
from e2e_helpers import (
    ORIGIN_NAME,
    Mitmdump,
    assert_pattern,
    curl,
    https_upload,
    pattern,
    tunnel_mitmdump,
)
from test_narrow_path import snmp

from harness import ExitPeer, narrow_link
from harness import exit_peer as _exit_peer

TUNNEL = "pppoe"
PPPOE_MTU = 1492
SIZE = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def exit_peer() -> Iterator[ExitPeer]:
    """The exit behind a PPPoE line (overrides conftest's: the link is not the default)."""
    require_netns()
    with _exit_peer(dnsmasq=True) as peer, narrow_link(peer, PPPOE_MTU):
        yield peer


@pytest.fixture(scope="module")
def proxy(exit_peer: ExitPeer, workdir: Path, origin: Any) -> Iterator[Mitmdump]:
    assert exit_peer.endpoint_v6 is not None
    with tunnel_mitmdump(
        exit_peer, workdir, origin, TUNNEL, endpoint=exit_peer.endpoint_v6
    ) as dump:
        yield dump


def test_upload_then_download_behind_a_pppoe_line(
    exit_peer: ExitPeer, proxy: Mitmdump, workdir: Path
) -> None:
    assert exit_peer.endpoint_v6 is not None
    https_upload(exit_peer, proxy, workdir, pattern(SIZE)[::-1])
    host, port = exit_peer.endpoint_v6
    # IPv6 + UDP headers and WireGuard's 32 bytes off, inner packets padded to 16
    inner = (PPPOE_MTU - 48 - 32) & ~15
    said = re.findall(
        rf"the path to WireGuard endpoint \[{re.escape(host)}\]:{port} carries at most "
        rf"{PPPOE_MTU} bytes per packet .* packets of at most {inner} bytes",
        proxy.text(),
    )
    assert len(said) == 1, proxy.text()[-3000:]

    reassembled = snmp(exit_peer.ns, "Ip6ReasmOKs"), snmp(exit_peer.client_ns, "Ip6ReasmOKs")
    https_upload(exit_peer, proxy, workdir, pattern(SIZE))
    r = curl(
        exit_peer.client_ns, "--cacert", str(proxy.ca_pem), "-x", proxy.proxy,
        f"https://{ORIGIN_NAME}/bytes/{SIZE}", max_time=120,
    )  # fmt: skip
    assert_pattern(r, SIZE)
    after = snmp(exit_peer.ns, "Ip6ReasmOKs"), snmp(exit_peer.client_ns, "Ip6ReasmOKs")
    assert after == reassembled, "datagrams of later connections must fit the path"
