"""Status like `wg show`: handshake ages and transfer sizes (units; real peers in
tests/test_status_interop.py)."""

from __future__ import annotations

import dataclasses

import pytest

from mitm_wg.runtime.tunnel import TunnelStatus
from mitm_wg.wireguard.peer import PeerStatus, format_age, format_bytes
from tests.wgpair import A_ADDR, B_ADDR, Pair, ipv4_udp


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 s ago"),
        (12.9, "12 s ago"),
        (59, "59 s ago"),
        (60, "1 min 0 s ago"),
        (185, "3 min 5 s ago"),
        (3600 + 60, "1 h 1 min ago"),
        (86400 * 3 + 3600 * 4 + 5, "3 d 4 h ago"),
        (-3, "0 s ago"),  # the wall clock stepped back
    ],
)
def test_format_age(seconds: float, text: str) -> None:
    assert format_age(seconds) == text


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (5 * 1024 * 1024 + 512 * 1024, "5.50 MiB"),
        (3 << 30, "3.00 GiB"),
        (5 << 40, "5.00 TiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_device_status_has_wall_clock_handshake_and_describes_it() -> None:
    p = Pair.create()  # unix_time_offset=1.7e9
    before = p.a.status()[0]
    assert before.last_handshake_unix is None and before.handshake_age(1.7e9) is None
    assert "latest handshake: never" in before.describe(1.7e9)
    p.now = 5.0
    p.send("a", ipv4_udp(A_ADDR, B_ADDR, b"hello"))
    (dest, initiation, src) = p.wire.pop(0)
    p.now += 0.024  # the initiation takes 24 ms, the response 24 more
    p.inject(dest, initiation, src)
    (dest, response, src) = p.wire.pop(0)
    p.now += 0.024
    p.inject(dest, response, src)
    p.deliver()
    p.send("b", ipv4_udp(B_ADDR, A_ADDR, b"x" * 3000))
    p.deliver()
    status = p.a.status()[0]
    assert status.last_handshake == pytest.approx(5.048)
    assert status.last_handshake_unix == pytest.approx(1.7e9 + 5.048)
    assert status.handshake_age(1.7e9 + 17.548) == pytest.approx(12.5)
    assert status.handshake_rtt == pytest.approx(0.048)
    line = status.describe(1.7e9 + 17.548)
    assert line.startswith(f"peer {status.public_key} endpoint 127.0.0.1:40002 session=yes ")
    assert "latest handshake: 12 s ago (48 ms round trip), " in line
    assert f"transfer: {format_bytes(status.rx_bytes)} received, " in line
    assert "KiB received" in line and " B sent" in line
    assert "handshakes=1" in line
    assert p.a_peer.status().last_handshake_unix is None  # without an offset: no wall clock


def test_tunnel_status_renders_like_wg_show() -> None:
    peer = PeerStatus(
        public_key="k" * 43 + "=",
        endpoint=("2001:db8::1", 51820),
        allowed_ips=(),
        last_handshake=100.0,
        rx_bytes=3 * 1024 * 1024,
        tx_bytes=2048,
        handshake_attempts=2,
        handshakes_completed=2,
        has_session=True,
        last_handshake_unix=1_800_000_000.0,
    )
    status = TunnelStatus([peer], 3, 1_800_000_125.0)
    assert status.handshake_age(peer) == 125.0
    assert str(status) == (
        "3 open connection(s)\n"
        f"  peer {'k' * 43}= endpoint [2001:db8::1]:51820 session=yes latest handshake: "
        "2 min 5 s ago, transfer: 3.00 MiB received, 2.00 KiB sent, handshakes=2"
    )
    # the last handshake's round trip, once measured, follows its age
    timed = dataclasses.replace(peer, handshake_rtt=0.0484)
    assert str(TunnelStatus([timed], 3, 1_800_000_125.0)).endswith(
        "latest handshake: 2 min 5 s ago (48 ms round trip), transfer: 3.00 MiB received, "
        "2.00 KiB sent, handshakes=2"
    )
    narrowed = ("path to 10.99.0.1: packets of at most 1200 bytes (a black hole …)",)
    status = TunnelStatus([peer], 3, 1_800_000_125.0, narrowed)
    assert str(status).endswith("handshakes=2\n  " + narrowed[0])
    status = TunnelStatus([peer], 3, 1_800_000_125.0, socket_drops=214, receive_buffer=425984)
    assert str(status).endswith(
        "handshakes=2\n  the kernel dropped 214 datagram(s) at the tunnel's UDP socket, its "
        "receive buffer (416 KiB) full: net.core.rmem_max limits it"
    )
    # a receive group (sockgroup.py): said, and drops summed over its sockets
    status = TunnelStatus([peer], 3, 1.8e9, receive_buffer=8 * 425984, receive_sockets=8)
    assert str(status).endswith(
        "handshakes=2\n  receiving on 8 UDP sockets of one port, 416 KiB of buffer each: "
        "net.core.rmem_max allows no more for one"
    )
    status = TunnelStatus(
        [peer], 3, 1.8e9, socket_drops=5, receive_buffer=8 * 425984, receive_sockets=8
    )
    assert str(status).endswith(
        "for one\n  the kernel dropped 5 datagram(s) at the tunnel's UDP sockets, their "
        "receive buffers (3328 KiB) full: net.core.rmem_max limits it"
    )
