"""Sequential short connections to a Linux server that closes first (issue 8 part 2).

A Linux server (wireguard-go + the kernel's TCP in the exit namespace) that closes first
keeps every 4-tuple in TIME_WAIT for 60 s. Our connections through the tunnel must get past
those TIME_WAITs without a PAWS reject (the server namespace's TcpExtPAWSTimewait stays put)
and without any connect waiting for an RTO-driven SYN retransmission (counted by our stack:
``StackStats.tcp_syn_timeouts``), even when a kernel client with the same key and tunnel
address left TIME_WAITs with its own, newer timestamps just before.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time

import trio
from closefirst_server import REQUEST, CloseFirstServer, tcp_ext_counters

from harness import ExitPeer, wait_until, wireguard_go_interface
from mitm_wg.config import WireGuardConfig
from mitm_wg.net.stack import Stack
from mitm_wg.runtime import Tunnel, open_tunnel
from mitm_wg.wireguard import crypto
from tests.runtime_helpers import NamespaceSocketFactory

PORT = 8081
M32 = 0xFFFFFFFF


async def exchange(stream: trio.abc.HalfCloseableStream) -> None:
    """One request; the server answers and closes first; then we close."""
    await stream.send_all(REQUEST)
    data = b""
    while chunk := await stream.receive_some(4096):
        data += chunk
    assert data.endswith(b"\r\n\r\nok"), data
    await stream.aclose()


async def ours(tunnel: Tunnel, peer: ExitPeer, n: int) -> None:
    for _ in range(n):
        await exchange(await tunnel.open_tcp_stream(peer.server_tunnel_v4, PORT))
    # Every socket closed and forgotten: its counters are in stack.stats now.
    with trio.fail_after(30):
        while tunnel.stack.tcp_sockets:
            await trio.sleep(0.01)


async def kernel_client(peer: ExitPeer, local_ports: range) -> None:
    """The same exchange through the reference client (wireguard-go + Linux TCP)."""
    for lport in local_ports:
        raw = peer.client_ns.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        raw.bind((peer.client_tunnel_v4, lport))
        sock = trio.socket.from_stdlib_socket(raw)
        await sock.connect((peer.server_tunnel_v4, PORT))
        await exchange(trio.SocketStream(sock))


def paws_timewait(peer: ExitPeer) -> int:
    return tcp_ext_counters(peer.ns)["PAWSTimewait"]


def our_tunnel(peer: ExitPeer) -> object:
    config = WireGuardConfig.parse(peer.client_config_text(dns=False))
    return open_tunnel(
        config, socket_factory=NamespaceSocketFactory(peer.client_ns), handshake_timeout=5.0
    )


def test_sequential_short_connections_no_paws_reject_no_stall(fresh_exit_peer: ExitPeer) -> None:
    peer = fresh_exit_peer
    with CloseFirstServer(peer.ns, peer.workdir, peer.server_tunnel_v4, [PORT]):
        before = paws_timewait(peer)

        async def main() -> Stack:
            async with our_tunnel(peer) as tunnel:  # type: ignore[attr-defined]
                stack = tunnel.stack
                await ours(tunnel, peer, 150)  # the default port range: no reuse needed
                assert stack.stats.tcp_port_reuses == 0
                # 16 ports for 150 more: 134+ SYNs land on the server's TIME_WAITs
                stack.ephemeral_ports = (50000, 50015)
                await ours(tunnel, peer, 150)
                return stack

        stack = trio.run(main)
    s = stack.stats
    assert s.tcp_port_reuses >= 134, s
    assert paws_timewait(peer) - before == 0  # monotonic timestamps: PAWS never said no
    assert s.tcp_syn_timeouts == 0, s  # no connect waited for the RTO
    assert s.tcp_syn_fast_retries == 0, s  # and none needed a reset: Linux reopened them


def _kernel_tai64n(unix_seconds: float) -> bytes:
    """The TAI64N label wireguard-go writes (2**62 + 10 + seconds)."""
    return struct.pack(">QI", (1 << 62) + 10 + math.floor(unix_seconds), 0)


def wait_for_our_handshake_to_be_newer(other_handshake: float) -> None:
    """Until crypto.tai64n writes wireguard-go's label (issue 8 part 1), our initiation
    is a replay for 10 s after another client's with the same key: wait until it is not
    (no wait at all once the labels agree)."""
    wait_until(
        lambda: crypto.tai64n(time.time()) > _kernel_tai64n(other_handshake + 1),
        15,
        "our TAI64N to pass the kernel client's",
        interval=0.1,
    )


def _server_time_waits(peer: ExitPeer, ports: range) -> int:
    """How many of the server's connections to the client ``ports`` are in TIME_WAIT."""
    out = peer.ns.exec(["ss", "-Htan", "state", "time-wait"]).stdout
    peers = {line.split()[-1].rsplit(":", 1)[-1] for line in out.splitlines() if line.strip()}
    return sum(str(port) in peers for port in ports)


def _put_our_timestamps_behind(stack: Stack, peer: ExitPeer, kernel_ms: int, now: float) -> None:
    """Re-key the stack's timestamp offsets until our TSvals to the server run 2**29..2**31
    - 2**29 ms behind the kernel client's: every SYN of ours that meets one of its TIME_WAITs
    then fails PAWS there (the case a random key hits half the time)."""
    local = socket.inet_aton(peer.client_tunnel_v4)
    remote = socket.inet_aton(peer.server_tunnel_v4)
    for _ in range(1000):
        ts = (int(now * 1000) + stack.tcp_timestamp_offset(local, remote)) & M32
        if 1 << 29 < (kernel_ms - ts) & M32 < (1 << 31) - (1 << 29):
            return
        stack._ts_key = os.urandom(16)  # test-only: a key of our choosing
    raise AssertionError("no key found")


def test_kernel_client_time_waits_just_before_do_not_stall_our_connects(
    fresh_exit_peer: ExitPeer,
) -> None:
    """wireguard-go + Linux with our key and tunnel address makes 16 connections (ports
    50000-50015) first; the server holds them in TIME_WAIT with the kernel's timestamps.
    Then ours, on the same 16 ports: each first SYN fails PAWS at a kernel TIME_WAIT, the
    server ACKs, we reset that TIME_WAIT and resend the SYN at once; the later rounds meet
    our own TIME_WAITs and pass."""
    peer = fresh_exit_peer
    ports = range(50000, 50016)
    # Linux without per-connection offsets: the kernel client's TSval is CLOCK_MONOTONIC
    # in ms, so the test knows it and can put ours behind it.
    peer.client_ns.exec(["sysctl", "-qw", "net.ipv4.tcp_timestamps=2"])
    with CloseFirstServer(peer.ns, peer.workdir, peer.server_tunnel_v4, [PORT]):
        with wireguard_go_interface(
            peer.client_ns, peer.client_ifname, peer.client_config_text(dns=False), peer.workdir
        ):
            trio.run(kernel_client, peer, ports)
            kernel_done = time.time()
            # Every one of the server's 16 connections must be in TIME_WAIT (the kernel
            # client's last ACK delivered) before its interface goes: a server left in
            # FIN_WAIT2 would answer our SYN without a PAWS check.
            wait_until(
                lambda: _server_time_waits(peer, ports) == len(ports),
                10,
                "the server to hold the kernel client's 16 connections in TIME_WAIT",
            )
        kernel_ms = (time.monotonic_ns() // 1_000_000) & M32
        before = paws_timewait(peer)
        wait_for_our_handshake_to_be_newer(kernel_done)

        async def main() -> Stack:
            async with our_tunnel(peer) as tunnel:  # type: ignore[attr-defined]
                stack = tunnel.stack
                stack.ephemeral_ports = (ports[0], ports[-1])
                _put_our_timestamps_behind(stack, peer, kernel_ms, trio.current_time())
                await ours(tunnel, peer, 48)
                return stack

        stack = trio.run(main)
        paws = paws_timewait(peer) - before
    s = stack.stats
    assert s.tcp_syn_timeouts == 0, s  # not one connect stalled for the RTO
    assert s.tcp_syn_fast_retries == 16, s  # one reset + immediate SYN per kernel TIME_WAIT
    assert paws == 16  # those were PAWS rejects; our own TIME_WAITs reopened without one
