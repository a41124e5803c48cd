"""The trio runtime: two of our tunnels over loopback UDP, and trio's stream conformance."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from mitm_wg.cli import check
from mitm_wg.config import WireGuardConfig
from mitm_wg.errors import HandshakeTimeout, NoRoute, TunnelCrashed
from mitm_wg.runtime import TunnelStream, open_tunnel
from mitm_wg.runtime import tunnel as tunnel_module
from mitm_wg.runtime.clock import BoottimeClock, runtime_clock
from mitm_wg.runtime.timerfd import TimerFd, open_timerfd
from mitm_wg.runtime.tunnel import SOL_UDP, UDP_GRO, UDP_SEGMENT
from tests.runtime_helpers import count_calls
from tests.tunnelpair import free_udp_port, loopback_factory, pair_configs, tunnel_pair


async def connected_pair(a, b, port: int = 7000, host: str = "10.33.0.2"):
    listener = await b.listen_tcp(port)
    async with trio.open_nursery() as nursery:
        accepted: list[TunnelStream] = []

        async def accept() -> None:
            accepted.append(await listener.accept())

        nursery.start_soon(accept)
        client = await a.open_tcp_stream(host, port)
    return client, accepted[0], listener


async def test_stream_round_trip_and_status() -> None:
    async with tunnel_pair() as (a, b):
        client, server, _ = await connected_pair(a, b)
        assert client.remote_address == ("10.33.0.2", 7000)
        assert server.remote_address[0] == "10.33.0.1"
        await client.send_all(b"ping")
        assert await server.receive_some() == b"ping"
        await server.send_all(b"pong")
        assert await client.receive_some() == b"pong"
        status = a.status()
        assert status.open_connections == 1
        assert status.peers[0].has_session and status.peers[0].tx_bytes > 0
        await client.aclose()
        assert await server.receive_some() == b""
        await server.aclose()


@pytest.fixture(params=["timerfd", "trio deadlines"])
def timer_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The core-deadline task on a timerfd (Linux) or on trio's own deadlines (elsewhere)."""
    if request.param == "trio deadlines":
        monkeypatch.setattr(tunnel_module, "open_timerfd", lambda: None)
    return request.param


def _assert_timer_armed_for_next_deadline(tunnel, kind: str) -> None:
    """Whatever the core needs next, the timer task wakes for it (never later)."""
    deadline = tunnel._next_deadline()
    assert deadline < float("inf")  # (WireGuard's own timers, at least)
    assert tunnel._timer_at <= deadline
    if kind == "timerfd":
        assert tunnel._timer_fd is not None and tunnel._timer_scope is None
    else:
        assert tunnel._timer_fd is None and tunnel._timer_scope is not None
        assert tunnel._timer_scope.deadline == tunnel._timer_at


async def test_bulk_both_ways_with_half_close(timer_kind: str) -> None:
    async with tunnel_pair() as (a, b):
        client, server, _ = await connected_pair(a, b)
        up = os.urandom(3 << 20)
        down = os.urandom(2 << 20)

        async def pump(stream, data: bytes, result: list) -> None:
            async with trio.open_nursery() as n:

                async def writer() -> None:
                    for i in range(0, len(data), 100_000):
                        await stream.send_all(data[i : i + 100_000])
                    await stream.send_eof()

                n.start_soon(writer)
                h = hashlib.sha256()
                while chunk := await stream.receive_some():
                    h.update(chunk)
                result.append(h.hexdigest())

        got_server: list = []
        got_client: list = []
        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                n.start_soon(pump, client, up, got_client)
                n.start_soon(pump, server, down, got_server)
        assert got_server == [hashlib.sha256(up).hexdigest()]
        assert got_client == [hashlib.sha256(down).hexdigest()]
        _assert_timer_armed_for_next_deadline(a, timer_kind)
        _assert_timer_armed_for_next_deadline(b, timer_kind)
        await client.aclose()
        await server.aclose()
        _assert_timer_armed_for_next_deadline(a, timer_kind)


async def transfer_counting_checks(
    monkeypatch: pytest.MonkeyPatch, client: TunnelStream, server: TunnelStream, waiter: type
) -> tuple[int, int]:
    """Send 4 MiB from ``client`` to ``server`` (byte-exact) and return how many flushes ran
    meanwhile and how many readiness checks (``_ready``) of ``waiter`` objects they made."""
    checks = count_calls(monkeypatch, waiter, "_ready")
    flushes = count_calls(monkeypatch, tunnel_module.Tunnel, "_flush")
    data = os.urandom(4 << 20)
    h = hashlib.sha256()
    try:
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await client.send_all(data)
                await client.send_eof()

            nursery.start_soon(send)
            while chunk := await server.receive_some():
                h.update(chunk)
    finally:
        monkeypatch.undo()
    assert h.digest() == hashlib.sha256(data).digest()
    return flushes.n, checks.n


async def test_a_flush_checks_only_the_udp_sockets_that_received(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """200 UDP sockets, each with a task waiting in recvfrom (mitmproxy reads every upstream
    QUIC or DNS flow so): a bulk TCP transfer beside them checks none of them at its flushes
    (the scan grew the work per packet with the sockets open). A datagram wakes the task of
    its socket; then one to each wakes all 200, each with its own datagram."""
    n = 200
    async with tunnel_pair() as (a, b):
        socks = [await a.open_udp_socket() for _ in range(n)]
        sender = await b.open_udp_socket()
        client, server, _ = await connected_pair(a, b, port=7001)
        got: dict[int, tuple[bytes, tuple[str, int]]] = {}

        async def wait_udp(i: int, sock: tunnel_module.TunnelUdpSocket) -> None:
            got[i] = await sock.recvfrom()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i, sock in enumerate(socks):
                    nursery.start_soon(wait_udp, i, sock)
                await trio.testing.wait_all_tasks_blocked()
                flushes, checks = await transfer_counting_checks(
                    monkeypatch, client, server, tunnel_module.TunnelUdpSocket
                )
                # (at least 20 flushes, ~130 on an idle machine: a scan's n per flush could
                # not pass; fewer per transfer since de0b5f6, so a busy machine's bigger
                # batches must not fail the premise)
                assert flushes >= 20 and checks < n, (flushes, checks)  # the scan: n a flush
                assert got == {}
                # one datagram: its socket's task wakes, no other
                await sender.sendto(b"first", socks[7].local_address)
                while 7 not in got:
                    await trio.sleep(0.001)
                await trio.testing.wait_all_tasks_blocked()
                assert list(got) == [7] and got[7][0] == b"first"
                for i, sock in enumerate(socks):
                    if i != 7:
                        await sender.sendto(i.to_bytes(2, "big"), sock.local_address)
        assert got.keys() == set(range(n))
        assert all(got[i][0] == i.to_bytes(2, "big") for i in range(n) if i != 7)
        assert all(got[i][1] == sender.local_address for i in range(n))
        for sock in socks:
            sock.close()
        sender.close()
        await client.aclose()
        await server.aclose()


async def test_a_flush_checks_only_the_streams_whose_sockets_ran(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """200 idle connections, each with a task waiting in receive_some (as mitmproxy reads
    every upstream connection): a bulk transfer on another one checks the readiness of the
    streams whose sockets the stack ran, not of all 200 at every flush (the work per packet
    grew with the connections open). Then one byte to each idle connection wakes every
    waiting task."""
    n = 200
    async with tunnel_pair() as (a, b):
        listener = await b.listen_tcp(7000)
        idle: list[tuple[TunnelStream, TunnelStream]] = []
        with trio.fail_after(30):
            accepted: list[TunnelStream] = []

            async def accept() -> None:
                accepted.append(await listener.accept())

            for _ in range(n):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(accept)
                    client = await a.open_tcp_stream("10.33.0.2", 7000)
                idle.append((client, accepted[-1]))
        client, server, _ = await connected_pair(a, b, port=7001)
        got: dict[int, bytes] = {}

        async def wait_idle(i: int, stream: TunnelStream) -> None:
            got[i] = await stream.receive_some()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i, (c, _s) in enumerate(idle):
                    nursery.start_soon(wait_idle, i, c)
                await trio.testing.wait_all_tasks_blocked()
                assert len(a._parked_sockets) == n
                flushes, checks = await transfer_counting_checks(
                    monkeypatch, client, server, TunnelStream
                )
                assert flushes >= 20 and checks <= 2 * flushes, (flushes, checks)  # walk: 200
                assert got == {}
                for i, (_c, s) in enumerate(idle):
                    await s.send_all(bytes([i % 256]))
        assert got == {i: bytes([i % 256]) for i in range(n)}
        for c, s in idle:
            await c.aclose()
            await s.aclose()
        await client.aclose()
        await server.aclose()


def _timerfds() -> list:
    kinds = [pytest.param(True, id="ctypes")]
    if hasattr(os, "timerfd_create"):
        kinds.append(pytest.param(False, id="os"))
    return kinds


@pytest.mark.skipif(sys.platform != "linux", reason="timerfd is Linux's")
@pytest.mark.parametrize("via_ctypes", _timerfds())
async def test_timerfd_fires_once_at_its_deadline(via_ctypes: bool) -> None:
    timer = TimerFd(via_ctypes=via_ctypes)
    try:
        assert not timer.clear()  # never armed: nothing to consume
        start = time.monotonic()
        timer.arm(0.004)
        with trio.fail_after(30):
            await trio.lowlevel.wait_readable(timer.fileno())
        assert time.monotonic() - start >= 0.004 - 1e-4  # not before its deadline
        assert timer.clear()
        assert not timer.clear()  # one-shot
        timer.arm(30.0)
        timer.arm(-1.0)  # re-armed: a deadline already past fires at once
        with trio.fail_after(30):
            await trio.lowlevel.wait_readable(timer.fileno())
        assert timer.clear()
        timer.arm(0.002)
        timer.disarm()
        with trio.move_on_after(0.05) as scope:
            await trio.lowlevel.wait_readable(timer.fileno())
        assert scope.cancelled_caught and not timer.clear()
    finally:
        timer.close()
    timer.close()  # (twice is harmless)


@pytest.mark.skipif(sys.platform != "linux", reason="timerfd is Linux's")
@pytest.mark.parametrize("via_ctypes", _timerfds())
def test_timerfd_counts_suspended_time(via_ctypes: bool) -> None:
    """The timerfd is on CLOCK_BOOTTIME, the runtime's clock (``mitm_wg.runtime.clock``):
    a timer that came due while the machine was suspended fires on waking (one on
    CLOCK_MONOTONIC would wait out its whole delay again, in waking time)."""
    timer = TimerFd(via_ctypes=via_ctypes)
    try:
        fdinfo = Path(f"/proc/self/fdinfo/{timer.fileno()}").read_text()
        assert re.search(r"^clockid:\s*(\d+)$", fdinfo, re.M)[1] == str(time.CLOCK_BOOTTIME)
    finally:
        timer.close()


def test_the_runtime_clock_counts_suspended_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the edge and the CLI run trio on (tests/test_edge_transport.py checks the
    edge's run): CLOCK_BOOTTIME where there is one, trio's own clock elsewhere."""
    if sys.platform == "linux":
        clock = runtime_clock()
        assert isinstance(clock, BoottimeClock)
        before = time.clock_gettime(time.CLOCK_BOOTTIME)
        now = clock.current_time()
        assert before <= now <= time.clock_gettime(time.CLOCK_BOOTTIME)
        assert 9.0 < clock.deadline_to_sleep_time(now + 10.0) <= 10.0
    monkeypatch.setattr(sys, "platform", "darwin")
    assert runtime_clock() is None


def test_the_check_command_runs_on_the_runtime_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    monkeypatch.setattr(trio, "run", lambda fn, *, clock=None: seen.append(clock))
    check(pair_configs(free_udp_port(), free_udp_port())[0], 1.0, io.StringIO())
    assert len(seen) == 1 and type(seen[0]) is type(runtime_clock())


def test_no_timerfd_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert open_timerfd() is None


async def test_ipv6_inside_tunnel() -> None:
    async with tunnel_pair() as (a, b):
        client, server, _ = await connected_pair(a, b, 7001, "fd33::2")
        assert client.local_address[0] == "fd33::1"
        await client.send_all(b"v6")
        assert await server.receive_some() == b"v6"


async def test_happy_eyeballs_with_every_address_unrouted_is_no_route() -> None:
    from mitm_wg.runtime.tunnel import _happy_eyeballs

    async def unrouted() -> TunnelStream:
        raise NoRoute(errno.ENETUNREACH, "outside AllowedIPs")

    with pytest.raises(NoRoute):
        await _happy_eyeballs([unrouted, unrouted], 0.25)

    async def refused() -> TunnelStream:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")

    with pytest.raises(OSError) as info:
        await _happy_eyeballs([unrouted, refused], 0.25)
    assert not isinstance(info.value, NoRoute)


async def test_refused_and_unrouted_and_udp() -> None:
    async with tunnel_pair() as (a, b):
        with pytest.raises(ConnectionRefusedError):
            await a.open_tcp_stream("10.33.0.2", 9)
        with pytest.raises(NoRoute) as info:
            await a.open_tcp_stream("192.0.2.55", 80)
        assert info.value.errno == errno.ENETUNREACH and "AllowedIPs" in str(info.value)
        with pytest.raises(NoRoute):
            await (await a.open_udp_socket()).sendto(b"x", ("192.0.2.55", 53))
        sa = await a.open_udp_socket()
        sb = await b.open_udp_socket()
        await sa.sendto(b"dgram", ("10.33.0.2", sb.local_address[1]))
        data, (host, port) = await sb.recvfrom()
        assert data == b"dgram" and host == "10.33.0.1" and port == sa.local_address[1]
        sa.close()
        sb.close()


async def test_handshake_timeout_names_the_endpoint() -> None:
    pa, pb = free_udp_port(), free_udp_port()
    ca, _ = pair_configs(pa, pb)  # nobody listens on pb
    async with open_tunnel(ca, socket_factory=loopback_factory(pa), handshake_timeout=1.0) as a:
        with trio.fail_after(10), pytest.raises(HandshakeTimeout) as info:
            await a.open_tcp_stream("10.33.0.2", 80)
        assert f"127.0.0.1:{pb}" in str(info.value)


async def test_the_probe_of_a_silent_endpoint_wakes_the_tunnel_by_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The endpoint probe (unreachable.py) is due PROBE_AFTER s after the first initiation;
    the timer task runs at each initiation's retries and at ``_probe_at``. With PROBE_AFTER
    at 2 s, no retry falls due then (rule hs-early's at 1 s, REKEY_TIMEOUT's at 6 s) and no
    TCP timer runs (a UDP datagram starts the handshake): only ``_probe_at`` wakes the
    tunnel, and the port unreachable from loopback's closed port is known before the next
    retry would have run the probe (a margin of 3.5 s for a busy machine's late timers)."""
    monkeypatch.setattr(tunnel_module, "PROBE_AFTER", 2.0)
    pa, pb = free_udp_port(), free_udp_port()
    ca, _ = pair_configs(pa, pb)  # nobody listens on pb: the kernel answers port unreachable
    factory = loopback_factory(pa)
    # (the factory binds port pa, which the probe's own socket cannot share: it needs this)
    factory.unbound = lambda family: socket.socket(family, socket.SOCK_DGRAM)
    async with open_tunnel(ca, socket_factory=factory) as a:
        sock = await a.open_udp_socket()
        started = trio.current_time()
        await sock.sendto(b"x", ("10.33.0.2", 53))  # the first initiation goes now
        with trio.fail_after(5.5):  # (the next retry is at 6-6.33 s: REKEY_TIMEOUT + jitter)
            while not a.icmp_errors:
                await trio.sleep(0.05)
        elapsed = trio.current_time() - started
        assert 2.0 <= elapsed < 5.5, elapsed
        [(_, error)] = a.icmp_errors.values()
        assert "port unreachable" in tunnel_module.describe_icmp(("127.0.0.1", pb), error)
        sock.close()


class _InOrder(socket.socket):
    """A UDP socket that notes each datagram it sends in a list shared with others."""

    sent: list[tuple[int, tuple[str, int]]]

    def sendto(self, data: Any, *args: Any) -> int:
        self.sent.append((len(data), args[-1]))
        return super().sendto(data, *args)


async def test_the_probe_byte_goes_ahead_of_the_retried_initiation() -> None:
    """At the first initiation's early retry (rule hs-early, 1 s) the timer task both
    retries the initiation and probes the silent endpoint (unreachable.py), and the
    probe's byte goes first: a host or router that has one ICMP error left in its ration
    answers the first datagram of the two, and only the probe reads errors
    (test_runtime_interop.py's rationing host shows what the other order cost)."""
    pa, pb = free_udp_port(), free_udp_port()
    ca, _ = pair_configs(pa, pb)  # nobody listens on pb: the kernel answers port unreachable
    sent: list[tuple[int, tuple[str, int]]] = []

    def unbound(family: int) -> socket.socket:
        sock = _InOrder(family, socket.SOCK_DGRAM)
        sock.sent = sent
        return sock

    def factory(family: int) -> socket.socket:
        sock = unbound(family)
        sock.bind(("127.0.0.1", pa))
        return sock

    factory.unbound = unbound  # type: ignore[attr-defined]  # (the probes' sockets)
    async with open_tunnel(ca, socket_factory=factory) as a:
        sock = await a.open_udp_socket()
        await sock.sendto(b"x", ("10.33.0.2", 53))  # the first initiation goes now
        with trio.fail_after(30):
            while not a.icmp_errors:
                await trio.sleep(0.05)
        sock.close()
    initiation = 148  # (a handshake initiation's size)
    assert [n for n, address in sent if address == ("127.0.0.1", pb)][:3] == [
        initiation,
        1,  # the probe's byte, then the retried initiation
        initiation,
    ]


async def test_a_crash_in_the_reader_surfaces_as_tunnel_crashed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A bug in a background task must not look like the caller's own exception (issue 11).
    from mitm_wg.wireguard.device import Device

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("boom")

    pa, pb = free_udp_port(), free_udp_port()
    ca, _ = pair_configs(pa, pb)
    monkeypatch.setattr(Device, "receive_datagram", broken)
    with pytest.raises(TunnelCrashed, match=r"UDP reader \(IPv4\) task crashed.*boom") as info:
        async with open_tunnel(ca, socket_factory=loopback_factory(pa)):
            with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sender:
                await sender.sendto(b"anything", ("127.0.0.1", pa))
            with trio.fail_after(10):
                await trio.sleep_forever()  # cancelled by the crash
    assert isinstance(info.value.__cause__, ValueError)


def _inner_config_via(outer_peer_port: int) -> tuple[WireGuardConfig, int]:
    """A config for a tunnel through tunnel ``a`` of tunnel_pair, its peer "behind" b."""
    listen = free_udp_port()
    inner, _ = pair_configs(listen, outer_peer_port)
    text = inner.to_text().replace(f"127.0.0.1:{outer_peer_port}", f"10.33.0.2:{outer_peer_port}")
    return WireGuardConfig.parse(text), listen


async def test_a_crash_in_the_multihop_reader_surfaces_as_tunnel_crashed() -> None:
    # The inner tunnel's reader (ViaTransport) is a background task too (issue 11).
    async with tunnel_pair() as (a, b):
        config, listen = _inner_config_via(9)
        with pytest.raises(TunnelCrashed, match=r"multi-hop reader task crashed.*boom") as info:
            async with open_tunnel(config, via=a) as inner:

                def broken(*args: object, **kwargs: object) -> None:
                    raise ValueError("boom")

                inner.device.receive_datagram = broken  # type: ignore[method-assign]
                sender = await b.open_udp_socket()
                await sender.sendto(b"anything", ("10.33.0.1", listen))
                with trio.fail_after(10):
                    await trio.sleep_forever()  # cancelled by the crash
        assert isinstance(info.value.__cause__, ValueError)


async def test_the_outer_path_closing_is_not_a_crash_of_the_inner() -> None:
    async with tunnel_pair() as (a, _b):
        config, _ = _inner_config_via(9)
        with pytest.raises(OSError) as info:
            async with open_tunnel(config, via=a) as inner:
                inner._send_datagrams.__self__.close()  # type: ignore[attr-defined]
                with trio.fail_after(10):
                    await trio.sleep_forever()
    assert info.value.errno == errno.ENETDOWN and not isinstance(info.value, TunnelCrashed)
    assert "outer WireGuard tunnel" in str(info.value)


async def test_the_callers_own_exception_comes_back_as_it_was() -> None:
    pa, pb = free_udp_port(), free_udp_port()
    ca, _ = pair_configs(pa, pb)
    own = KeyError("mine")
    with pytest.raises(KeyError) as info:
        async with open_tunnel(ca, socket_factory=loopback_factory(pa)):
            raise own
    assert info.value is own
    # The caller's own group keeps its shape: only the tunnel's nursery level is opened.
    group = ExceptionGroup("caller's", [ValueError("a")])
    with pytest.raises(ExceptionGroup) as ginfo:
        async with open_tunnel(ca, socket_factory=loopback_factory(pa)):
            raise group
    assert ginfo.value.message == "caller's"  # (trio may copy the group on its way out)
    assert [type(e) for e in ginfo.value.exceptions] == [ValueError]


async def test_reset_by_peer_is_broken_resource() -> None:
    async with tunnel_pair() as (a, b):
        client, server, _ = await connected_pair(a, b, 7002)
        server.socket.abort(trio.current_time())
        b._flush()
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError) as info:
            await client.receive_some()
        assert isinstance(info.value.__cause__, ConnectionResetError)


async def test_trio_half_closeable_stream_conformance() -> None:
    async with tunnel_pair() as (a, b):
        counter = iter(range(8000, 9000))

        async def maker():
            client, server, listener = await connected_pair(a, b, next(counter))
            await listener.aclose()
            return client, server

        await trio.testing.check_half_closeable_stream(maker, None)


async def test_send_and_receive_waiting_at_the_same_time() -> None:
    """A sender blocked on a full buffer must wake while another task waits to receive."""
    async with tunnel_pair() as (a, b):
        client, server, _ = await connected_pair(a, b, 7003)
        size = 8 << 20
        received = 0

        async def drain_server() -> None:
            nonlocal received
            while chunk := await server.receive_some():
                received += len(chunk)
            await server.send_all(b"done")
            await server.aclose()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain_server)
                reply: list[bytes] = []

                async def read_reply() -> None:
                    reply.append(await client.receive_some())

                nursery.start_soon(read_reply)
                await trio.sleep(0.05)  # the reader parks first
                await client.send_all(bytes(size))
                await client.send_eof()
        assert received == size and reply == [b"done"]


async def test_bulk_sends_use_udp_gso_and_fall_back_without_it() -> None:
    async with tunnel_pair() as (a, b):
        client, server, _ = await connected_pair(a, b, 7004)
        data = os.urandom(4 << 20)

        async def send_and_check() -> None:
            async with trio.open_nursery() as nursery:

                async def reader() -> None:
                    got = bytearray()
                    while len(got) < len(data):
                        got += await server.receive_some()
                    assert bytes(got) == data

                nursery.start_soon(reader)
                await client.send_all(data)

        with trio.fail_after(60):
            await send_and_check()
        assert a.gso_sends > 0 and a._gso
        # b asked for UDP GRO: the kernel handed it a's GSO sends as coalesced runs, split
        # back into datagrams (the data arrived intact above)
        assert b.gro_receives > 0 and b.gro_datagrams > b.gro_receives
        assert b.gro_truncated == 0

        # A kernel without UDP GSO: the first coalesced send fails, and every datagram
        # still goes out singly from then on.
        sock = next(iter(a._sockets.values()))

        class NoGso:
            def __getattr__(self, name: str):
                return getattr(sock, name)

            def sendmsg(self, *args, **kwargs):
                raise OSError(errno.EIO, "no GSO")

        a._sockets = {family: NoGso() for family in a._sockets}  # type: ignore[misc]
        with trio.fail_after(60):
            await send_and_check()
        assert not a._gso


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
async def test_a_coalesced_run_is_split_at_the_size_the_kernel_reports(
    family: int, host: str
) -> None:
    """UDP GRO over loopback (the kernel's real behaviour, IPv4 and IPv6): three datagrams
    sent as one GSO send, the last one shorter, reach the device as the same three."""
    pa, pb = free_udp_port(), free_udp_port()
    ca, _ = pair_configs(pa, pb)

    def factory(_family: int) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((host, pa))
        return sock

    async with open_tunnel(ca, socket_factory=factory) as tunnel:
        seen: list[tuple[bytes, tuple[str, int]]] = []

        def record(data, source, now, out, packets) -> None:
            seen.append((bytes(data), source))

        tunnel.device.receive_datagram = record  # type: ignore[method-assign]
        datagrams = [os.urandom(300), os.urandom(300), os.urandom(77)]
        with socket.socket(family, socket.SOCK_DGRAM) as sender:
            sender.bind((host, 0))
            sender.sendmsg(
                datagrams, [(SOL_UDP, UDP_SEGMENT, (300).to_bytes(2, sys.byteorder))], 0,
                (host, pa),
            )  # fmt: skip
            with trio.fail_after(10):
                while len(seen) < 3:
                    await trio.sleep(0.01)
            source = sender.getsockname()[:2]
        assert seen == [(d, source) for d in datagrams]
        assert (tunnel.gro_receives, tunnel.gro_datagrams) == (1, 3)


async def test_without_udp_gro_datagrams_are_read_one_by_one() -> None:
    """A kernel that refuses UDP_GRO: the reader falls back to recvfrom."""

    class NoGroSocket(socket.socket):
        def setsockopt(self, level, option, value, *rest):  # type: ignore[override]
            if (level, option) == (SOL_UDP, UDP_GRO):
                raise OSError(errno.ENOPROTOOPT, "no UDP GRO")
            return super().setsockopt(level, option, value, *rest)

    def factory(port: int):
        def make(family: int) -> socket.socket:
            sock = NoGroSocket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", port))
            return sock

        return make

    pa, pb = free_udp_port(), free_udp_port()
    ca, cb = pair_configs(pa, pb)
    async with (
        open_tunnel(ca, socket_factory=factory(pa)) as a,
        open_tunnel(cb, socket_factory=factory(pb)) as b,
    ):
        client, server, _ = await connected_pair(a, b, 7005)
        data = os.urandom(2 << 20)
        got = bytearray()
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, data)
                while len(got) < len(data):
                    got += await server.receive_some()
        assert bytes(got) == data
        assert a.gso_sends > 0  # runs were sent coalesced, yet arrived one by one
        assert b.gro_receives == 0 and b.gro_datagrams == 0
