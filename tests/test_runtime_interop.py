"""The trio runtime against real peers: wireguard-go + Linux TCP, dnsmasq, mitmproxy's WireGuard.

Every test runs our tunnel with its UDP socket inside the exit peer's client namespace
(``exit_peer.client_ns``) and talks to real processes in the exit namespace: the harness's
HTTP server (``GET /bytes/N``, ``POST`` → sha256 JSON), dnsmasq (``exit.test``), wireguard-go
and mitmdump. Bodies are compared by sha256 against the pattern (byte i == i % 256).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from conftest import require_mitmdump

from harness import (
    ExitPeer,
    mitmproxy_wireguard_peer,
    wireguard_go_interface,
    wireguard_go_sends_gso,
)
from harness.exitpeer import b64, generate_keypair
from harness.httpserver import pattern
from harness.relay import ImpairedRelay, Impairment
from mitm_wg.config import WireGuardConfig
from mitm_wg.errors import HandshakeTimeout, NoRoute
from mitm_wg.net.tcp import TcpState
from mitm_wg.runtime import Tunnel, TunnelStream, open_tunnel
from mitm_wg.runtime.dns import Resolver
from mitm_wg.wireguard import device as device_module
from mitm_wg.wireguard.device import FOREIGN_MIN
from mitm_wg.wireguard.timers import REKEY_TIMEOUT
from tests.runtime_helpers import (
    ExtraHttpServer,
    NamespaceSocketFactory,
    SuspendableClock,
    _Reader,
    count_calls,
    http_get,
    http_post_json,
    pattern_sha256,
    snmp,
)

KB = 1024
MB = 1024 * 1024


@asynccontextmanager
async def exit_tunnel(
    peer: ExitPeer, text: str | None = None, **kw: Any
) -> AsyncIterator[tuple[Tunnel, NamespaceSocketFactory]]:
    """Our tunnel to ``peer`` (config from ``text``, default the peer's client config)."""
    config = WireGuardConfig.parse(text if text is not None else peer.client_config_text())
    factory = NamespaceSocketFactory(peer.client_ns)
    kw.setdefault("handshake_timeout", 5.0)
    async with open_tunnel(config, socket_factory=factory, **kw) as tunnel:
        yield tunnel, factory


async def get_pattern(stream: TunnelStream, size: int) -> None:
    resp = await http_get(stream, f"/bytes/{size}")
    assert resp.status == 200
    assert resp.size == size
    assert resp.sha256 == pattern_sha256(size)


# -- bulk TCP against the Linux stack -------------------------------------------------------------


async def test_get_1k_1m_50m_byte_exact(exit_peer: ExitPeer) -> None:
    async with exit_tunnel(exit_peer) as (tunnel, factory):
        with trio.fail_after(60):
            stream = await tunnel.open_tcp_stream(exit_peer.server_tunnel_v4, exit_peer.http_port)
            assert stream.remote_address == (exit_peer.server_tunnel_v4, exit_peer.http_port)
            assert stream.local_address[0] == exit_peer.client_tunnel_v4
            # keep-alive: two responses on one connection
            await get_pattern(stream, 1 * KB)
            await get_pattern(stream, 1 * MB)
            await stream.aclose()
            stream = await tunnel.open_tcp_stream(exit_peer.server_tunnel_v4, exit_peer.http_port)
            await get_pattern(stream, 50 * MB)
            await stream.aclose()
        status = tunnel.status()
        assert status.peers[0].has_session
        assert status.peers[0].rx_bytes > 50 * MB
        assert status.open_connections == 0
        # the real peer saw our handshake, and we only ever sent to its endpoint
        assert exit_peer.client_stats().latest_handshake > 0
        assert factory.destinations == {exit_peer.endpoint}
        # a wireguard-go that sends with UDP GSO hands its bulk sends to our UDP GRO reader
        # as coalesced runs (split back into datagrams: the bodies above are byte-exact)
        assert tunnel.gro_truncated == 0
        if wireguard_go_sends_gso():
            assert tunnel.gro_datagrams > tunnel.gro_receives > 0


async def test_post_20m_byte_exact(exit_peer: ExitPeer) -> None:
    async with exit_tunnel(exit_peer) as (tunnel, _):
        with trio.fail_after(60):
            stream = await tunnel.open_tcp_stream(exit_peer.server_tunnel_v4, exit_peer.http_port)
            answer = await http_post_json(stream, "/upload", 20 * MB)
            await stream.aclose()
        assert answer == {"sha256": pattern_sha256(20 * MB), "size": 20 * MB}
        assert tunnel.status().peers[0].tx_bytes > 20 * MB


async def test_post_while_reading_the_response_concurrently(exit_peer: ExitPeer) -> None:
    """One task sends the body while another already waits for the answer (full duplex)."""
    size = 4 * MB
    with trio.fail_after(60):
        async with exit_tunnel(exit_peer) as (tunnel, _):
            stream = await tunnel.open_tcp_stream(exit_peer.server_tunnel_v4, exit_peer.http_port)
            answer = await http_post_json(stream, "/duplex", size, full_duplex=True)
            await stream.aclose()
    assert answer == {"sha256": pattern_sha256(size), "size": size}


async def test_100_concurrent_streams(exit_peer: ExitPeer) -> None:
    size = 64 * KB
    expected = pattern_sha256(size)
    results: dict[int, str] = {}
    ports: set[int] = set()

    async with exit_tunnel(exit_peer) as (tunnel, _):

        async def one(i: int) -> None:
            stream = await tunnel.open_tcp_stream(exit_peer.server_tunnel_v4, exit_peer.http_port)
            ports.add(stream.local_address[1])
            resp = await http_get(stream, f"/bytes/{size}")
            assert resp.status == 200 and resp.size == size
            results[i] = resp.sha256
            await stream.aclose()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(100):
                    nursery.start_soon(one, i)
        assert tunnel.status().open_connections == 0
    assert len(results) == 100
    assert set(results.values()) == {expected}
    assert len(ports) == 100  # really 100 distinct connections


async def test_idle_connections_cost_a_download_nothing_and_all_wake(
    exit_peer: ExitPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mitmproxy keeps its upstream connections open with a task reading each. 150 idle
    keep-alive connections to the exit's server, each with a task waiting for its next
    response: a 20 MB download on another connection checks at each flush the streams the
    stack ran, not all 150 (the work per packet grew with every connection open); then a
    request on each brings 150 responses at once, and every task wakes with its whole,
    exact response."""
    n = 150
    host, port = exit_peer.server_tunnel_v4, exit_peer.http_port
    got: dict[int, tuple[int, str]] = {}

    async def next_response(i: int, stream: TunnelStream) -> None:
        reader = _Reader(stream)
        head = (await reader.read_head()).decode("latin-1")
        length = int(head.lower().split("content-length:")[1].split("\r\n")[0])
        digest, _ = await reader.read_body(length, keep=False)
        got[i] = (length, digest)

    async with exit_tunnel(exit_peer) as (tunnel, _):
        with trio.fail_after(120):
            idle = []
            for _i in range(n):
                stream = await tunnel.open_tcp_stream(host, port)
                await get_pattern(stream, 1)  # (a used keep-alive connection)
                idle.append(stream)
            async with trio.open_nursery() as nursery:
                for i, stream in enumerate(idle):
                    nursery.start_soon(next_response, i, stream)
                await trio.testing.wait_all_tasks_blocked()
                assert len(tunnel._parked_sockets) == n
                checks = count_calls(monkeypatch, TunnelStream, "_ready")
                flushes = count_calls(monkeypatch, Tunnel, "_flush")
                bulk = await tunnel.open_tcp_stream(host, port)
                await get_pattern(bulk, 20 * MB)
                await bulk.aclose()
                monkeypatch.undo()
                # (enough flushes that checking all 150 parked streams at each, 150 per
                # flush, could not pass for at most 2 per flush; a flush per read of the
                # download is gone since de0b5f6: with UDP GRO ~90 remain on Debian 13)
                assert flushes.n >= 20 and checks.n <= 2 * flushes.n, (flushes.n, checks.n)
                assert got == {}
                for i, stream in enumerate(idle):
                    await stream.send_all(
                        f"GET /bytes/{1000 + i} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                    )
            for stream in idle:
                await stream.aclose()
    assert got == {i: (1000 + i, pattern_sha256(1000 + i)) for i in range(n)}


async def test_ipv6_inside_the_tunnel(exit_peer: ExitPeer) -> None:
    assert exit_peer.server_tunnel_v6 is not None
    async with exit_tunnel(exit_peer) as (tunnel, factory):
        with trio.fail_after(60):
            stream = await tunnel.open_tcp_stream(exit_peer.server_tunnel_v6, exit_peer.http_port)
            assert stream.remote_address == (exit_peer.server_tunnel_v6, exit_peer.http_port)
            assert stream.local_address[0] == exit_peer.client_tunnel_v6
            # bulk both ways: IPv6 has its own receive and send fast paths (and GRO)
            await get_pattern(stream, 20 * MB)
            answer = await http_post_json(stream, "/v6", 20 * MB)
            assert answer == {"sha256": pattern_sha256(20 * MB), "size": 20 * MB}
            await stream.aclose()
        # IPv6 inside, IPv4 outside: the only UDP destination is the IPv4 endpoint
        assert factory.destinations == {exit_peer.endpoint}


# -- names: only the tunnel's dnsmasq ------------------------------------------------------------


@pytest.fixture
def no_host_resolver(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Make every use of the host's resolver fail loudly (and record it)."""
    calls: list[tuple[Any, ...]] = []

    def refuse(*args: Any, **kw: Any) -> Any:
        calls.append(args)
        raise AssertionError(f"the host resolver was used: getaddrinfo{args!r}")

    async def refuse_async(*args: Any, **kw: Any) -> Any:
        refuse(*args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(trio.socket, "getaddrinfo", refuse_async)
    return calls


async def test_names_resolved_by_the_exit_dnsmasq_only(
    exit_peer: ExitPeer, no_host_resolver: list[tuple[Any, ...]]
) -> None:
    assert exit_peer.dns_server is not None
    assert f"DNS = {exit_peer.dns_server}" in exit_peer.client_config_text()
    before = len(exit_peer.dns_queries())
    async with exit_tunnel(exit_peer) as (tunnel, factory):
        with trio.fail_after(30):
            addresses = await tunnel.resolve("exit.test")
            assert set(addresses) == {
                ipaddress.ip_address(exit_peer.server_tunnel_v4),
                ipaddress.ip_address(exit_peer.server_tunnel_v6),
            }
            stream = await tunnel.open_tcp_stream("exit.test", exit_peer.http_port)
            await get_pattern(stream, 256 * KB)
            await stream.aclose()
            # dnsmasq answers subdomains of exit.test too: a name no other resolver knows
            deep = await tunnel.resolve("deep.name.exit.test")
            assert set(deep) == set(addresses)
            # a name dnsmasq does not know: without an upstream it refuses (or denies) it
            with pytest.raises(socket.gaierror) as info:
                await tunnel.resolve("nowhere.invalid")
            assert info.value.errno in (socket.EAI_NONAME, socket.EAI_AGAIN)
            assert "nowhere.invalid" in str(info.value)
    new = exit_peer.dns_queries()[before:]
    asked = {(q.qtype, q.name) for q in new}
    assert {("A", "exit.test"), ("AAAA", "exit.test")} <= asked
    assert {("A", "deep.name.exit.test"), ("AAAA", "deep.name.exit.test")} <= asked
    assert ("A", "nowhere.invalid") in asked
    # the queries came through the tunnel (from our tunnel address), not from the host
    assert {q.client for q in new} <= {exit_peer.client_tunnel_v4, exit_peer.client_tunnel_v6}
    assert no_host_resolver == []
    # and no UDP datagram left for anything but the WireGuard endpoint
    assert factory.destinations == {exit_peer.endpoint}


@asynccontextmanager
async def tunnel_through_relay(
    peer: ExitPeer, impairment: Impairment, **config: Any
) -> AsyncIterator[tuple[Tunnel, ImpairedRelay]]:
    """Our tunnel to ``peer`` through an in-process relay impairing both ways, in the
    client namespace (``config``: more of ``client_config_text``'s options)."""
    with ImpairedRelay(
        peer.endpoint,
        listen=("127.0.0.1", 0),
        impairment=impairment,
        socket_factory=peer.client_ns.socket,
    ) as relay:
        text = peer.client_config_text(endpoint=relay.address, **config)
        # (20 s, as the other relay tests here: a first initiation lost or ignored is
        # retried 5 s later. Once, in a full Debian 13 run, the first got no answer within
        # the default 5 s; the cause was not found.)
        async with exit_tunnel(peer, text, handshake_timeout=20.0) as (tunnel, _):
            yield tunnel, relay


async def lose_one_going_up(
    relay: ImpairedRelay, then: Impairment, body: Callable[[], Awaitable[Any]]
) -> Any:
    """Run ``body`` while the relay loses everything going up until one datagram is gone;
    from then on the up direction has ``then`` (whose delay holds throughout)."""
    dropped = relay.up.dropped
    relay.set_impairment(up=Impairment(loss=1.0, delay=then.delay))

    async def open_the_path_after_one_loss() -> None:
        while relay.up.dropped <= dropped:
            await trio.sleep(0.002)
        relay.set_impairment(up=then)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_the_path_after_one_loss)
        result = await body()
    return result


async def session_through(relay: ImpairedRelay, tunnel: Tunnel, address: Any) -> float:
    """Start the session to the peer routing ``address`` and wait until the keepalive
    confirming it has passed the relay (up to then only the initiations, one or, a first
    lost or unanswered, more, and it go up): the path is quiet. The handshake's round
    trip, which the relay's 40 ms each way must show."""
    await tunnel.wait_session(address)
    peer = tunnel.route(address)
    assert peer is not None
    while relay.up.received < peer.handshake_attempts_total + 1:
        await trio.sleep(0.002)
    rtt = tunnel.path_rtt(address)
    assert rtt is not None and rtt >= 0.080
    return rtt


async def fetch_and_let_the_close_pass(tunnel: Tunnel, server: str, port: int) -> None:
    """A connection that fetches 1 KiB and closes; returns once its FIN and ACKs have
    passed the relay too, so that the next datagram going up is whatever the test sends."""
    stream = await tunnel.open_tcp_stream(server, port)
    await get_pattern(stream, 1 * KB)
    await stream.aclose()
    while stream._sock.state not in (TcpState.TIME_WAIT, TcpState.CLOSED):
        await trio.sleep(0.01)
    await trio.sleep(0.1)


def assert_resent_in_time(resolver: Resolver) -> None:
    """A query went again, and none waited out the resolver's timeout."""
    assert resolver.resends >= 1 and resolver.timeouts == 0, (
        resolver.resends,
        resolver.timeouts,
    )


async def test_a_lost_dns_query_goes_again_before_its_timeout(exit_peer: ExitPeer) -> None:
    """The exit's dnsmasq through a relay: a first lookup measures how long its replies
    take; then the path up loses what is sent until one datagram is gone (the next
    lookup's first query). The resolver sends that query again at its RTO, dnsmasq answers
    it, and no query waits out the resolver's 2 s timeout."""
    async with tunnel_through_relay(exit_peer, Impairment()) as (tunnel, relay):
        resolver = tunnel._resolver
        assert isinstance(resolver, Resolver)
        with trio.fail_after(30):
            first = await tunnel.resolve("exit.test")
            assert resolver.resends == resolver.timeouts == 0
            dropped = relay.up.dropped
            deep = await lose_one_going_up(
                relay, Impairment(), lambda: tunnel.resolve("deep.name.exit.test")
            )
        assert set(deep) == set(first)
        assert relay.up.dropped > dropped
        assert_resent_in_time(resolver)


async def test_a_lost_first_dns_query_goes_again_after_the_handshakes_round_trips(
    exit_peer: ExitPeer,
) -> None:
    """The exit's dnsmasq 80 ms away through a relay, nothing measured from it yet: the
    WireGuard handshake's round trip is. The first lookup's queries are lost on the way
    up; they go again three such round trips later, dnsmasq answers, and no query waits
    out the resolver's 2 s timeout (as each did before a server had answered once)."""
    assert exit_peer.dns_server is not None
    server = ipaddress.ip_address(exit_peer.dns_server)
    slow = Impairment(delay=0.040)
    async with tunnel_through_relay(exit_peer, slow) as (tunnel, relay):
        resolver = tunnel._resolver
        assert isinstance(resolver, Resolver)
        with trio.fail_after(30):
            assert await session_through(relay, tunnel, server) < 1.0
            assert resolver._rtts == {}
            dropped = relay.up.dropped
            addresses = await lose_one_going_up(relay, slow, lambda: tunnel.resolve("exit.test"))
        assert set(addresses) == {
            ipaddress.ip_address(exit_peer.server_tunnel_v4),
            ipaddress.ip_address(exit_peer.server_tunnel_v6),
        }
        assert relay.up.dropped > dropped
        assert_resent_in_time(resolver)


async def test_a_lost_first_syn_goes_again_after_the_handshakes_round_trips(
    exit_peer: ExitPeer,
) -> None:
    """Linux's server 80 ms away through a relay, no RTT measured to it yet: the
    WireGuard handshake's round trip is. The first connection's SYN is lost on the way
    up; it goes again at three such round trips (a timeout shorter than the initial
    RTO's 1 s: it does not count as one of ``syn_retries``, nor make the tunnel suspect the
    exit lost our session), Linux answers, and the download on the connection is
    byte-exact."""
    slow = Impairment(delay=0.040)
    async with tunnel_through_relay(exit_peer, slow) as (tunnel, relay):
        server = exit_peer.server_tunnel_v4
        peer = tunnel.route(server)
        assert peer is not None
        with trio.fail_after(30):
            assert await session_through(relay, tunnel, server) < 0.3
            dropped = relay.up.dropped
            stream = await lose_one_going_up(
                relay, slow, lambda: tunnel.open_tcp_stream(server, exit_peer.http_port)
            )
            sock = stream._sock
            assert relay.up.dropped == dropped + 1
            # one timeout, and an early one: before the initial RTO's 1 s
            assert (sock.stats.syn_timeouts, sock.syn_retries) == (1, 0)
            # a timeout from the path's bound alone does not make the tunnel suspect the
            # exit lost our session (no handshake again, none armed for when the rate
            # limit allows: the SYN went again at once)
            assert peer.silence_handshakes == 0 and peer.silence_handshake_at is None
            await get_pattern(stream, 256 * KB)
            await stream.aclose()


# -- Happy Eyeballs ------------------------------------------------------------------------------


async def test_happy_eyeballs_prefers_ipv6_then_falls_back_to_ipv4(exit_peer: ExitPeer) -> None:
    v4_only_port = exit_peer.http_port + 11
    with ExtraHttpServer(
        exit_peer.ns, exit_peer.workdir, v4_only_port, [exit_peer.server_tunnel_v4]
    ):
        async with exit_tunnel(exit_peer) as (tunnel, _):
            with trio.fail_after(30):
                # exit.test has A and AAAA: the IPv6 attempt starts first; with a long delay
                # it is the only attempt, and it connects
                stream = await tunnel.open_tcp_stream(
                    "exit.test", exit_peer.http_port, happy_eyeballs_delay=3600
                )
                assert stream.remote_address[0] == exit_peer.server_tunnel_v6
                await get_pattern(stream, 64 * KB)
                await stream.aclose()
                # default delay: whichever family wins, the connection works
                stream = await tunnel.open_tcp_stream("exit.test", exit_peer.http_port)
                assert stream.remote_address[0] in (
                    exit_peer.server_tunnel_v4,
                    exit_peer.server_tunnel_v6,
                )
                await get_pattern(stream, 64 * KB)
                await stream.aclose()
                # only IPv4 listens: the refused IPv6 attempt starts the IPv4 one at once
                # (not after the hour-long delay)
                stream = await tunnel.open_tcp_stream(
                    "exit.test", v4_only_port, happy_eyeballs_delay=3600
                )
                assert stream.remote_address == (exit_peer.server_tunnel_v4, v4_only_port)
                await get_pattern(stream, 64 * KB)
                await stream.aclose()
                # neither family listens: both refusals are reported
                with pytest.raises(ConnectionRefusedError) as info:
                    await tunnel.open_tcp_stream("exit.test", 9, happy_eyeballs_delay=3600)
                message = str(info.value)
                assert message.count("refused") == 3  # the summary and one per address
                assert f"{exit_peer.server_tunnel_v4}:9" in message
                assert f"[{exit_peer.server_tunnel_v6}]:9" in message  # IPv6 in brackets


# -- errors with real peers ----------------------------------------------------------------------


async def test_refused_and_outside_allowed_ips(exit_peer: ExitPeer) -> None:
    async with exit_tunnel(exit_peer) as (tunnel, factory):
        with trio.fail_after(30):
            with pytest.raises(ConnectionRefusedError):
                await tunnel.open_tcp_stream(exit_peer.server_tunnel_v4, 9)
            with pytest.raises(ConnectionRefusedError):
                await tunnel.open_tcp_stream(exit_peer.server_tunnel_v6, 9)
            for outside in ("192.0.2.1", "10.77.0.1", "2001:db8::1"):
                with pytest.raises(NoRoute) as info:
                    await tunnel.open_tcp_stream(outside, 80)
                assert info.value.errno == errno.ENETUNREACH
                assert "AllowedIPs" in str(info.value)
            # the tunnel still works after the errors
            stream = await tunnel.open_tcp_stream(exit_peer.server_tunnel_v4, exit_peer.http_port)
            await get_pattern(stream, 16 * KB)
            await stream.aclose()
        assert tunnel.status().open_connections == 0
        assert factory.destinations == {exit_peer.endpoint}


async def test_refused_after_the_first_handshake_was_lost(exit_peer: ExitPeer) -> None:
    """Our first initiation is lost (a relay drops it; wireguard-go drops one itself when
    another client with the same key handshook < 20 ms before, as ``mitm-wg check --url``'s
    handshake step did before its fetch's own tunnel). The SYNs sent meanwhile wait in the device and leave with the
    retried handshake's session; Linux answers each with a RST, and the RSTs arrive
    together: the first closes the socket, the next reaps it before any poll runs it. The
    connect must still wake and say "refused", not sleep until its timeout."""
    with ImpairedRelay(
        exit_peer.endpoint,
        listen=("127.0.0.1", 0),
        up=Impairment(loss=1.0),
        socket_factory=exit_peer.client_ns.socket,
    ) as relay:
        text = exit_peer.client_config_text(endpoint=relay.address, dns=False)
        async with exit_tunnel(exit_peer, text, handshake_timeout=20.0) as (tunnel, _):

            async def open_the_path_after_one_loss() -> None:
                while relay.up.dropped < 1:
                    await trio.sleep(0.01)
                relay.set_impairment(up=Impairment())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(open_the_path_after_one_loss)
                started = trio.current_time()
                with trio.fail_after(30), pytest.raises(ConnectionRefusedError):
                    await tunnel.open_tcp_stream(exit_peer.server_tunnel_v4, 9, connect_timeout=12)
            elapsed = trio.current_time() - started
            wg = tunnel.device.peers[next(iter(tunnel.device.peers))]
            assert relay.up.dropped == 1 and wg.handshakes_completed == 1
            assert wg.handshake_attempts_total >= 2
            # refused right after the retried handshake (~5 s), long before the timeout
            assert elapsed < 12, elapsed
            assert tunnel.status().open_connections == 0


async def test_persistent_keepalive_while_idle(exit_peer: ExitPeer) -> None:
    """PersistentKeepalive (in most configs behind NAT, so the exit can still reach us
    after a quiet minute): with nothing to send, the tunnel comes up by itself and sends
    a keepalive every interval, which the exit receives."""
    text = exit_peer.client_config_text(dns=False, keepalive=1)
    async with exit_tunnel(exit_peer, text) as (tunnel, _):
        peer = next(iter(tunnel.device.peers.values()))
        with trio.fail_after(15):
            while peer.handshakes_completed == 0:  # no traffic of ours asked for it
                await trio.sleep(0.05)
        await trio.sleep(0.5)
        before = exit_peer.client_stats().rx_bytes
        sent = peer.tx_bytes
        await trio.sleep(4.0)
        # each keepalive is an empty transport message: 32 bytes
        assert peer.tx_bytes - sent >= 3 * 32
        assert exit_peer.client_stats().rx_bytes - before >= 3 * 32
        assert tunnel.status().open_connections == 0


async def test_the_exit_rehandshakes_to_push_data_we_answer(exit_peer: ExitPeer) -> None:
    """The exit starts the handshake: its session for us is gone (here its peer entry is
    removed and re-added, as an exit's expired session after a long idle, or a server-side
    re-configuration, leave it), it still knows our endpoint, and a server behind it
    pushes data on a connection we opened before. wireguard-go initiates to us; we must
    answer as the responder (our own session still looks fine to us: we never initiate)
    and take the data on the new session."""
    server = exit_peer.ns.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.settimeout(20)  # (the threads below cannot be cancelled: they time out)
    with server:
        server.bind((exit_peer.server_tunnel_v4, 0))
        server.listen(1)
        port = server.getsockname()[1]
        text = exit_peer.client_config_text(dns=False)
        async with exit_tunnel(exit_peer, text) as (tunnel, _):
            peer = next(iter(tunnel.device.peers.values()))
            with trio.fail_after(30):
                stream = await tunnel.open_tcp_stream(exit_peer.server_tunnel_v4, port)
                conn, _addr = await trio.to_thread.run_sync(server.accept)
                conn.settimeout(20)
                with conn:
                    await stream.send_all(b"hello")
                    assert await trio.to_thread.run_sync(conn.recv, 100) == b"hello"
                    ours = exit_peer.client_stats()
                    assert ours.endpoint is not None and peer.handshakes_completed == 1
                    # the exit forgets its session, keeps our endpoint
                    key = b64(exit_peer.client_public_key)
                    ifname = exit_peer.ifname
                    exit_peer.ns.exec(["wg", "set", ifname, "peer", key, "remove"])
                    exit_peer.ns.exec(
                        ["wg", "set", ifname, "peer", key,
                         "allowed-ips", ",".join(ours.allowed_ips),
                         "endpoint", f"{ours.endpoint[0]}:{ours.endpoint[1]}"]
                    )  # fmt: skip
                    body = pattern(512 * KB)
                    await trio.to_thread.run_sync(conn.sendall, body)
                    got = b""
                    while len(got) < len(body):
                        chunk = await stream.receive_some(65536)
                        assert chunk, f"EOF after {len(got)} bytes"
                        got += chunk
                    assert got == body
                    # and our answer goes back on the new session
                    await stream.send_all(b"thanks")
                    assert await trio.to_thread.run_sync(conn.recv, 100) == b"thanks"
                await stream.aclose()
            assert peer.handshakes_completed == 2
            assert peer.handshake_attempts_total == 1  # the second was the exit's
            assert {k: v for k, v in tunnel.device.drops.items() if v} == {}


async def test_a_handshake_right_after_another_waits_for_the_rate_limit(
    exit_peer: ExitPeer,
) -> None:
    """``Tunnel.handshake`` right after a completed one: WireGuard allows one initiation per
    REKEY_TIMEOUT, so the second starts when that has passed and completes (it used to send
    nothing and time out, blaming the endpoint)."""
    async with exit_tunnel(exit_peer) as (tunnel, _):  # handshake_timeout 5 s
        peer = next(iter(tunnel.device.peers.values()))
        with trio.fail_after(30):
            await tunnel.handshake(peer)
            first_sent = peer.last_initiation_sent
            second = await tunnel.handshake(peer)
        assert peer.handshakes_completed == 2
        assert peer.handshake_attempts_total == 2
        # (initiation to initiation: the completions' gap also holds the two round trips,
        # and came out 0.8 ms short when the first took longer)
        assert peer.last_initiation_sent - first_sent >= REKEY_TIMEOUT
        assert second > peer.last_initiation_sent
        assert exit_peer.client_stats().latest_handshake > 0


async def test_a_wall_clock_stepped_forward_after_the_open_is_followed(
    exit_peer: ExitPeer,
) -> None:
    """A handshake initiation carries the wall-clock time, and wireguard-go drops one not
    newer than the last it took with our key, whoever sent it. A VM's clocks stand still
    while its host sleeps, and at the resume time sync steps its wall clock forward (here
    an hour) after our tunnel opened; meanwhile another client with the same key (the
    user's phone) handshakes at the real time. Our next handshake must be stamped by the
    wall clock as it reads then: stamped by the clock as it read at the open, it was an
    hour behind the phone's, and the exit dropped it as a replay for that hour
    (HandshakeTimeout). The status dates our handshake by the clock as it reads now."""
    skew = [-3600.0]
    async with exit_tunnel(exit_peer, wall_clock=lambda: time.time() + skew[0]) as (
        tunnel,
        _,
    ):
        skew[0] = 0.0  # time sync steps the VM's clock
        # (wireguard-go drops an initiation < 20 ms after the last it took with this key:
        # the previous test's may be that recent; the same below for the phone's)
        await trio.sleep(0.1)
        async with exit_tunnel(exit_peer) as (phone, _):
            with trio.fail_after(15):
                await phone.handshake(next(iter(phone.device.peers.values())))
        await trio.sleep(0.1)
        peer = next(iter(tunnel.device.peers.values()))
        with trio.fail_after(15):
            await tunnel.handshake(peer)
            stream = await tunnel.open_tcp_stream(exit_peer.server_tunnel_v4, exit_peer.http_port)
            async with stream:
                await get_pattern(stream, 100 * KB)
        status = tunnel.status()
        [ours] = status.peers
        assert ours.last_handshake_unix is not None
        assert abs(ours.last_handshake_unix - time.time()) < 5
        age = status.handshake_age(ours)
        assert age is not None and 0 <= age < 5


async def _rekeying_while(
    tunnel: Tunnel, peer: Any, *jobs: Callable[[], Awaitable[None]]
) -> list[int]:
    """Run ``jobs`` while our side starts a new handshake with ``peer`` as soon as the rate
    limit allows (one per REKEY_TIMEOUT, 5 s); the handshakes completed while they ran."""
    done = trio.Event()
    rekeyed: list[int] = []

    async def rekey_until_done() -> None:
        while not done.is_set():
            await tunnel.handshake(peer)  # (waits out the rate limit)
            if not done.is_set():
                rekeyed.append(peer.handshakes_completed)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rekey_until_done)
        async with trio.open_nursery() as transfers:
            for job in jobs:
                transfers.start_soon(job)
        done.set()
        nursery.cancel_scope.cancel()
    return rekeyed


async def test_rekeys_during_transfers_lose_nothing(exit_peer: ExitPeer) -> None:
    """Every two minutes a session is replaced (REKEY_AFTER_TIME), in the middle of a user's
    long download. Here our side starts a new handshake as soon as the rate limit allows
    (one per REKEY_TIMEOUT, 5 s) while downloads and uploads run over a 50 ms path of
    4 MB/s each way, so that each switch has a window of data in flight both ways:
    wireguard-go's packets under the old session arrive after ours moved on (and ours
    reach it), and the new session's first packets must confirm it. Both directions go on
    (8 MiB bodies, one after another on one connection each) until two switches happened,
    then one body more each. Nothing may be dropped for it on our side, and every body must
    arrive byte-exact.

    (Fixed sizes made it flaky: a handshake message the relay's full queue drops is resent
    REKEY_TIMEOUT later, after a 48 MB download had ended with one switch.)"""
    chunk = 8 * MB
    with ImpairedRelay(
        exit_peer.endpoint,
        listen=("127.0.0.1", 0),
        impairment=Impairment(delay=0.025, rate=4e6),
        socket_factory=exit_peer.client_ns.socket,
    ) as relay:
        text = exit_peer.client_config_text(endpoint=relay.address, dns=False)
        # (a handshake started within REKEY_TIMEOUT of the last waits for it to pass)
        async with exit_tunnel(exit_peer, text, handshake_timeout=20.0) as (tunnel, _):
            peer = next(iter(tunnel.device.peers.values()))
            host, port = exit_peer.server_tunnel_v4, exit_peer.http_port
            moved = {"down": 0, "up": 0}
            with trio.fail_after(180):
                # (the first session, and the slow start of both streams)
                getter = await tunnel.open_tcp_stream(host, port)
                poster = await tunnel.open_tcp_stream(host, port)
                first = peer.handshakes_completed

                async def until_two_switches(one: Callable[[], Awaitable[None]], key: str) -> None:
                    while peer.handshakes_completed < first + 2:
                        await one()
                        moved[key] += chunk
                    await one()  # the second switch, too, with data in flight after it
                    moved[key] += chunk

                async def get_one() -> None:
                    await get_pattern(getter, chunk)

                async def post_one() -> None:
                    answer = await http_post_json(poster, "/upload", chunk)
                    assert answer == {"sha256": pattern_sha256(chunk), "size": chunk}

                async def get() -> None:
                    await until_two_switches(get_one, "down")

                async def post() -> None:
                    await until_two_switches(post_one, "up")

                rekeyed = await _rekeying_while(tunnel, peer, get, post)
                await getter.aclose()
                await poster.aclose()
    assert len(rekeyed) >= 2, rekeyed
    assert moved["down"] >= 2 * chunk and moved["up"] >= 2 * chunk, moved
    dropped = {k: v for k, v in tunnel.device.drops.items() if v}
    assert dropped == {}, dropped
    assert relay.down.forwarded > moved["down"] // 1500


async def test_rekeys_during_a_download_through_mitmproxy_wireguard_mode(
    exit_peer: ExitPeer,
) -> None:
    """The same switches with the other WireGuard we meet as an exit: mitmproxy's WireGuard
    mode (boringtun + smoltcp), downloads through it over the 4 MB/s, 50 ms path until two
    switches happened, and one more on the newest session (its pace is mitmproxy's)."""
    require_mitmdump()
    size = 4 * MB
    with (
        mitmproxy_wireguard_peer(ns=exit_peer.ns, host=exit_peer.endpoint[0], port=51822) as mp,
        ImpairedRelay(
            mp.endpoint,
            listen=("127.0.0.1", 0),
            impairment=Impairment(delay=0.025, rate=4e6),
            socket_factory=exit_peer.client_ns.socket,
        ) as relay,
    ):
        text = mp.client_config_text(allowed_ips=exit_peer.tunnel_v4_net, endpoint=relay.address)
        async with exit_tunnel(exit_peer, text, handshake_timeout=20.0) as (tunnel, _):
            peer = next(iter(tunnel.device.peers.values()))
            with trio.fail_after(120):
                stream = await tunnel.open_tcp_stream(
                    exit_peer.server_tunnel_v4, exit_peer.http_port
                )

                first = peer.handshakes_completed
                downloads = 0

                async def get() -> None:
                    nonlocal downloads
                    while peer.handshakes_completed < first + 2:
                        await get_pattern(stream, size)
                        downloads += 1
                    await get_pattern(stream, size)
                    downloads += 1

                rekeyed = await _rekeying_while(tunnel, peer, get)
                await stream.aclose()
    assert len(rekeyed) >= 2, rekeyed
    dropped = {k: v for k, v in tunnel.device.drops.items() if v}
    assert dropped == {}, dropped
    assert relay.down.forwarded > downloads * size // 1500


async def test_stopped_wireguard_go_is_a_handshake_timeout(
    fresh_exit_peer: ExitPeer, caplog: pytest.LogCaptureFixture
) -> None:
    """The exit's WireGuard server is stopped (maintenance, a crash) while its host is up:
    the host answers our datagrams with ICMP port unreachable, which an unconnected socket
    never sees. The probe of an unanswered initiation (unreachable.py) does, and the
    HandshakeTimeout says so (before: only that the peer did not answer). Nothing but the
    endpoint is contacted; once the server is back the same tunnel connects, and a new
    timeout would not repeat an error older than the probe interval."""
    caplog.set_level(logging.INFO, logger="mitm_wg")
    peer = fresh_exit_peer
    peer.stop_wireguard()
    async with exit_tunnel(peer, handshake_timeout=2.0) as (tunnel, factory):
        started = trio.current_time()
        with trio.fail_after(20), pytest.raises(HandshakeTimeout) as info:
            await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
        assert trio.current_time() - started >= 2.0
        host, port = peer.endpoint
        message = str(info.value)
        assert f"{host}:{port}" in message
        assert "2 s" in message
        assert f"nothing receives on UDP port {port} (ICMP port unreachable)" in message
        assert "is the WireGuard server running?" in message
        assert isinstance(info.value, TimeoutError)
        assert not tunnel.status().peers[0].has_session
        assert tunnel.status().open_connections == 0
        assert factory.destinations == {peer.endpoint}
        assert set(tunnel.icmp_errors) == {peer.endpoint}
        [note] = tunnel.status().notes  # (the status command's line under the peers)
        assert note.startswith(f"WireGuard endpoint {host}:{port}: its host answered that")
        assert "(ICMP port unreachable)" in note and note.endswith(" s ago)")
        assert any("ICMP port unreachable" in r.getMessage() for r in caplog.records)

        peer.start_wireguard()
        with trio.fail_after(30):  # (the next initiation: within REKEY_TIMEOUT)
            while not tunnel.status().peers[0].has_session:
                await trio.sleep(0.05)
            assert tunnel.icmp_errors == {}  # (a session: the endpoint is reachable)
            assert tunnel.status().notes == ()
            stream = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            await get_pattern(stream, 1 * KB)
            await stream.aclose()
        assert factory.destinations == {peer.endpoint}


async def test_a_stopped_server_behind_an_ipv6_endpoint_is_named(
    fresh_exit_peer: ExitPeer,
) -> None:
    """The same over IPv6 (``Endpoint = [fd00:77:N::2]:51820``): the probe's socket asks for
    errors with IPV6_RECVERR, and the host's ICMPv6 port unreachable is named."""
    peer = fresh_exit_peer
    assert peer.endpoint_v6 is not None
    host, port = peer.endpoint_v6
    text = peer.client_config_text().replace(
        f"Endpoint = {peer.endpoint[0]}:{peer.endpoint[1]}", f"Endpoint = [{host}]:{port}"
    )
    assert f"[{host}]:{port}" in text
    peer.stop_wireguard()
    async with exit_tunnel(peer, text, handshake_timeout=2.0) as (tunnel, factory):
        with trio.fail_after(20), pytest.raises(HandshakeTimeout) as info:
            await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
        assert f"[{host}]:{port}" in str(info.value)
        assert info.value.cause is not None
        assert f"nothing receives on UDP port {port} (ICMP port unreachable)" in info.value.cause
        assert factory.destinations == {(host, port)}


async def test_a_silent_endpoint_is_not_called_unreachable(fresh_exit_peer: ExitPeer) -> None:
    """The negative of the ICMP probe: an exit that is up but does not know our key drops
    the initiations (and the probe's byte) silently; the HandshakeTimeout says the peer
    did not answer and asks about the key, and claims no ICMP error."""
    peer = fresh_exit_peer
    stranger = b64(generate_keypair()[0])
    text = "\n".join(
        f"PrivateKey = {stranger}" if line.startswith("PrivateKey") else line
        for line in peer.client_config_text().splitlines()
    )
    async with exit_tunnel(peer, text, handshake_timeout=3.0) as (tunnel, factory):
        with trio.fail_after(20), pytest.raises(HandshakeTimeout) as info:
            await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
        message = str(info.value)
        assert "did not answer the handshake" in message
        assert "does the peer know our public key?" in message
        assert "ICMP" not in message
        assert tunnel.icmp_errors == {}
        assert tunnel._probed.keys() == {peer.endpoint}  # (it was asked)
        assert factory.destinations == {peer.endpoint}


@pytest.mark.parametrize(
    ("route", "what", "why"),
    [
        pytest.param(None, "network unreachable", "a router on the way", id="no-route"),
        pytest.param("unreachable", "host unreachable", "a router on the way", id="unreachable"),
        pytest.param(
            "prohibit",
            "communication administratively prohibited",
            "a firewall on the way blocks it",
            id="firewall",
        ),
    ],
)
async def test_a_router_that_cannot_reach_the_endpoint_is_named(
    fresh_exit_peer: ExitPeer, route: str | None, what: str, why: str
) -> None:
    """An endpoint behind a router that answers for it (here the exit's namespace routes
    our client's datagrams for 10.99.N.0/24, forwarding): with no route there, with an
    ``unreachable`` route, or with a ``prohibit`` route (what a firewall that rejects
    answers, ICMP code 13). The error names the router's address (read from the socket's
    error queue) and what it answered; a firewall's rejection is called so."""
    peer = fresh_exit_peer
    n = peer.index
    far = f"10.99.{n}.7"
    router = peer.endpoint[0]
    peer.ns.exec(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    if route is not None:
        peer.ns.ip("route", "add", route, f"10.99.{n}.0/24")
    peer.client_ns.ip("route", "add", f"10.99.{n}.0/24", "via", router)
    text = peer.client_config_text().replace(
        f"Endpoint = {peer.endpoint[0]}:{peer.endpoint[1]}", f"Endpoint = {far}:51820"
    )
    assert far in text
    async with exit_tunnel(peer, text, handshake_timeout=3.0) as (tunnel, factory):
        with trio.fail_after(20), pytest.raises(HandshakeTimeout) as info:
            await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
        cause = info.value.cause
        assert cause is not None, str(info.value)
        assert cause.startswith(f"{router} answered the way to {far}:51820 with ICMP {what}")
        assert why in cause
        assert factory.destinations == {(far, 51820)}


async def test_the_probe_gets_the_one_icmp_error_a_rationing_host_sends(
    fresh_exit_peer: ExitPeer,
) -> None:
    """Hosts and routers ration their ICMP errors per destination (Linux: a burst of six,
    then one a second, ``net.ipv4.icmp_ratelimit``), and other programs' datagrams spend
    the same ration. Here the exit's WireGuard server is stopped and another program has
    just spent the host's burst on its closed port: when the first initiation's early
    retry goes, a second later, the host answers one datagram of ours with port
    unreachable and holds back the next. Only the probe's socket reads errors, so the
    probe's byte goes first, ahead of the retried initiation (it went after it, and the
    HandshakeTimeout named no cause: a CI flake of the router test above, whose router
    rations the same way)."""
    peer = fresh_exit_peer
    host, port = peer.endpoint
    peer.stop_wireguard()
    with peer.client_ns.socket() as other:  # the other program: ten datagrams, six answered
        for _ in range(10):
            other.sendto(b"x", (host, port))
    held_back = snmp(peer.ns, "Icmp:OutRateLimitHost")
    async with exit_tunnel(peer, handshake_timeout=3.0) as (tunnel, factory):
        with trio.fail_after(20), pytest.raises(HandshakeTimeout) as info:
            await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
        cause = info.value.cause
        assert cause is not None, str(info.value)
        assert f"nothing receives on UDP port {port} (ICMP port unreachable)" in cause
        assert factory.destinations == {peer.endpoint}
    # (the premise: the host did hold back some of the errors our datagrams asked for)
    assert snmp(peer.ns, "Icmp:OutRateLimitHost") > held_back


async def test_another_client_with_our_key_is_named_in_a_warning(
    fresh_exit_peer: ExitPeer, caplog: pytest.LogCaptureFixture
) -> None:
    """The user runs ``wg-quick up`` of the same config (here wireguard-go with the same
    private key in the same namespace, downloading with curl) while mitmproxy's tunnel
    downloads too. wireguard-go keeps one endpoint per key, the source of the packet it
    took last: the two clients take each other's traffic, and the one whose session is
    not the exit's current one gets packets of a session it never made, and stalls. Our
    tunnel warns, naming the endpoint and the likely cause, once (before: nothing in the
    log, only stalls). With our download alone first, nothing is warned. (Our side sees
    the other's packets only while the other client's session is the exit's current one,
    from its handshake until ours, silent, handshakes again: once in Debian 13's CI run
    the warning took longer than 30 s, with 8 packets needed within 10 s.)"""
    peer = fresh_exit_peer
    caplog.set_level(logging.WARNING, logger="mitm_wg.runtime.tunnel")
    host, port = peer.server_tunnel_v4, peer.http_port

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if "PrivateKey" in r.getMessage()]

    async with exit_tunnel(peer) as (tunnel, _):
        with trio.fail_after(30):
            stream = await tunnel.open_tcp_stream(host, port)
            async with stream:
                await get_pattern(stream, 10 * MB)
        assert warned() == [] and tunnel.status().peers[0].foreign_packets == 0

        async def our_downloads() -> None:
            while True:  # (ours stall while the other client's session is the exit's)
                with trio.move_on_after(3):
                    stream = await tunnel.open_tcp_stream(host, port)
                    async with stream:
                        await get_pattern(stream, 10 * MB)

        other = peer.client_ifname
        with wireguard_go_interface(peer.client_ns, other, peer.client_config_text(), peer.workdir):
            curl = peer.client_ns.popen(
                ["curl", "-sS", "-o", "/dev/null", "--max-time", "60", "--interface", other,
                 f"{peer.http_url}/bytes/{500 * MB}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(our_downloads)
                    # (how soon depends on which client the exit sends to: below)
                    with trio.move_on_after(60):
                        while not warned():
                            await trio.sleep(0.1)
                    [now] = tunnel.status().peers
                    assert warned(), (
                        f"no warning in 60 s: {now.foreign_packets} foreign packets, "
                        f"{now.handshakes_completed} handshakes, drops {dict(tunnel.device.drops)}"
                    )
                    await trio.sleep(2)  # (reported once)
                    nursery.cancel_scope.cancel()
            finally:
                peer.client_ns.kill(curl)
    [warning] = warned()
    endpoint = f"{peer.endpoint[0]}:{peer.endpoint[1]}"
    assert f"at {endpoint} sends us packets of sessions this tunnel never made" in warning
    assert "another client is using this config's PrivateKey" in warning
    assert b64(peer.client_private_key) not in warning
    [ours] = tunnel.status().peers
    assert ours.foreign_packets >= FOREIGN_MIN
    assert "packets of another client's sessions" in ours.describe(time.time())


_PSK, _OTHER_PSK = bytes(range(32)), bytes(range(1, 33))


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(_PSK, _PSK), (_OTHER_PSK, _PSK), (None, _PSK), (_PSK, None)],
    ids=["same", "another", "only-theirs", "only-ours"],
)
async def test_preshared_keys_with_wireguard_go(
    fresh_exit_peer: ExitPeer,
    ours: bytes | None,
    theirs: bytes | None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A VPN provider's config with a PresharedKey (Mullvad's quantum-resistant tunnels,
    many self-hosted servers): the same key on both sides makes a session and a download.
    A different key, or one on one side only, and wireguard-go still takes the initiation
    (the key enters only the response) and answers with a response that does not decrypt:
    the HandshakeTimeout says so and names the PresharedKey, where it said the peer did
    not answer and asked whether the endpoint was reachable; so does the warning when the
    device gives the handshake up (here after 4 s, not REKEY_ATTEMPT_TIME's 90)."""
    monkeypatch.setattr(device_module, "REKEY_ATTEMPT_TIME", 4.0)
    caplog.set_level(logging.WARNING, logger="mitm_wg.runtime.tunnel")
    peer = fresh_exit_peer
    if theirs is not None:
        key_file = peer.workdir / "psk"
        key_file.write_text(b64(theirs))
        key_file.chmod(0o600)
        peer.ns.exec(
            ["wg", "set", peer.ifname, "peer", b64(peer.client_public_key),
             "preshared-key", str(key_file)]
        )  # fmt: skip
        key_file.unlink()
    text = peer.client_config_text()
    if ours is not None:
        text = text.replace("[Peer]\n", f"[Peer]\nPresharedKey = {b64(ours)}\n")
    async with exit_tunnel(peer, text, handshake_timeout=2.0) as (tunnel, _):
        with trio.fail_after(20):
            if ours == theirs:
                stream = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
                async with stream:
                    await get_pattern(stream, 64 * KB)
                return
            with pytest.raises(HandshakeTimeout) as info:
                await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            while not caplog.records:  # (the retransmission at REKEY_TIMEOUT gives up)
                await trio.sleep(0.1)
    [warning] = [r.getMessage() for r in caplog.records]
    [ours_here] = tunnel.device.peers.values()
    # (the first initiation, and rule hs-early's second one a second later: both answered)
    assert ours_here.bad_responses == 2
    assert "failed after 1 attempts: its responses (2 so far) do not decrypt" in warning
    assert "PresharedKey" in warning and "no response" not in warning
    message = str(info.value)
    host, port = peer.endpoint
    assert f"{host}:{port} answered the handshake" in message
    assert "PresharedKey" in message
    assert "reachable" not in message
    assert info.value.cause is not None and "PresharedKey" in info.value.cause  # (check CLI)
    assert "ICMP" not in message
    for key in (_PSK, _OTHER_PSK, peer.client_private_key):
        assert b64(key) not in message
    [ours_at_exit] = peer.wg_show()
    assert ours_at_exit.rx_bytes > 0 and ours_at_exit.latest_handshake == 0
    log = peer.wireguard_log(lines=1000)
    assert "Received handshake initiation" in log and "Sending handshake response" in log


@pytest.fixture
def suspendable_clock() -> SuspendableClock:
    """(pytest-trio runs a test requesting a Clock fixture on that clock)"""
    return SuspendableClock()


@pytest.mark.skipif(sys.platform != "linux", reason="CLOCK_BOOTTIME is Linux's")
async def test_after_a_laptop_suspend_the_first_connection_handshakes_at_once(
    fresh_exit_peer: ExitPeer, suspendable_clock: SuspendableClock
) -> None:
    """A laptop sleeps ten minutes with mitmproxy running; the exit dropped our session
    meanwhile (REJECT_AFTER_TIME, 180 s; here it restarts, which forgets it the same way).
    On the runtime's clock, which counts the suspend as the exit's does, the first packet
    after the resume finds the session expired and starts a handshake: the new
    connection's SYN goes out once, on the new session (on CLOCK_MONOTONIC it went to the
    dead session and waited for its retransmission, a second later). A keep-alive
    connection from before the suspend goes on too."""
    peer = fresh_exit_peer
    async with exit_tunnel(peer) as (tunnel, _):
        with trio.fail_after(30):
            before = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            await get_pattern(before, 1 * KB)
            handshakes = tunnel.status().peers[0].handshakes_completed
            peer.stop_wireguard()
            peer.start_wireguard()
        suspendable_clock.suspend(600.0, tunnel)
        with trio.fail_after(30):
            stream = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            assert stream._sock.stats.rto_expired == 0, "the SYN went to the dead session"
            assert tunnel.status().peers[0].handshakes_completed == handshakes + 1
            await get_pattern(stream, 1 * MB)
            await get_pattern(before, 1 * MB)
            await stream.aclose()
            await before.aclose()


async def test_a_server_stopped_during_a_suspend_is_named_within_seconds(
    fresh_exit_peer: ExitPeer, suspendable_clock: SuspendableClock
) -> None:
    """The exit's server stopped while the laptop slept (its host runs). The handshake
    after the resume has the round trip measured by the last one: rule hs-early retries
    after 0.2 s, and WireGuard's own retry comes REKEY_TIMEOUT (5 s) after the first. The
    probe is due 1 s after the initiation all the same (``Tunnel._probe_at`` has the
    timer wake for it, though here other timers of the tunnel wake it about then too), so
    a 3 s handshake timeout already names the host's ICMP port unreachable."""
    peer = fresh_exit_peer
    async with exit_tunnel(peer, handshake_timeout=3.0) as (tunnel, _):
        with trio.fail_after(30):
            before = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            await get_pattern(before, 1 * KB)
            await before.aclose()
        [ours] = tunnel.device.peers.values()
        assert ours.handshake_rtt is not None and ours.handshake_rtt < 0.05
        peer.stop_wireguard()
        suspendable_clock.suspend(600.0, tunnel)
        with trio.fail_after(30), pytest.raises(HandshakeTimeout) as info:
            await tunnel.handshake(ours)
        assert info.value.cause is not None, str(info.value)
        assert "(ICMP port unreachable)" in info.value.cause
        assert ours.early_retries >= 1


@pytest.mark.skipif(sys.platform != "linux", reason="CLOCK_BOOTTIME is Linux's")
async def test_a_lost_initiation_after_a_pause_goes_again_after_three_round_trips(
    exit_peer: ExitPeer, suspendable_clock: SuspendableClock
) -> None:
    """wireguard-go 80 ms away through a relay. After ten minutes asleep our session has
    expired; the next connection waits for a handshake whose initiation is lost on the
    way up. Rule hs-early sends a new one three round trips of the last handshake later
    (not REKEY_TIMEOUT, 5 s, later); wireguard-go answers it, the SYN waiting for the
    session goes, and the download is byte-exact."""
    slow = Impairment(delay=0.040)
    async with tunnel_through_relay(exit_peer, slow) as (tunnel, relay):
        server = exit_peer.server_tunnel_v4
        peer = tunnel.route(server)
        assert peer is not None
        with trio.fail_after(30):
            # (the one datagram lost below must be the initiation)
            await fetch_and_let_the_close_pass(tunnel, server, exit_peer.http_port)
        rtt = peer.handshake_rtt
        assert rtt is not None and 0.080 <= rtt < 0.5
        suspendable_clock.suspend(600.0, tunnel)
        assert not tunnel.device.can_send(peer, trio.current_time())
        dropped = relay.up.dropped
        with trio.fail_after(30):
            stream = await lose_one_going_up(
                relay, slow, lambda: tunnel.open_tcp_stream(server, exit_peer.http_port)
            )
            assert relay.up.dropped == dropped + 1
            assert peer.early_retries == 1
            assert stream._sock.stats.syn_timeouts == 0  # (it waited for the session)
            await get_pattern(stream, 256 * KB)
            await stream.aclose()


@pytest.mark.skipif(sys.platform != "linux", reason="CLOCK_BOOTTIME is Linux's")
@pytest.mark.parametrize("pause", ["suspend", "stop"])
async def test_a_pause_mid_upload_is_no_round_trip(
    exit_peer: ExitPeer, suspendable_clock: SuspendableClock, pause: str
) -> None:
    """An upload to Linux 40 ms away through a relay, and the process does not run for a
    while: "suspend", it stops a moment (the exit's ACKs queue in its UDP socket) and the
    machine sleeps a minute (simulated; the session outlives it); "stop", it stops 3 s on
    the real clock (SIGSTOP, a debugger, an addon holding the GIL). After it the queued
    ACKs echo TSvals from before: taken as round trips they made SRTT 7.6 or 14 s after the
    minute (the next loss would wait an RTO of a minute; found with this test), 0.4 s or
    more after the 3 s. Or, when the timer task or the uploading task ran before the
    reader, the probe timer that came due meanwhile fired before they were read (in the
    runs on the old code one or the other happened every time). Now whichever task runs
    first finds the timer task a second or more behind and tells the stack: no sample
    spans the pause, and the timers that came due start over."""
    slow = Impairment(delay=0.020)
    async with tunnel_through_relay(exit_peer, slow) as (tunnel, _):
        server = exit_peer.server_tunnel_v4
        with trio.fail_after(120):  # (the suspend moves trio's clock a minute)
            stream = await tunnel.open_tcp_stream(server, exit_peer.http_port)
            sock = stream._sock
            seen: dict[str, Any] = {"top": 0.0}

            async def pause_mid_upload() -> None:
                while sock.stats.segments_out < 2000:
                    await trio.sleep(0.002)
                assert tunnel.pauses == 0
                stats = sock.stats
                probes = (stats.tlp_probes, stats.recovery_probes, stats.rto_expired)
                if pause == "suspend":
                    time.sleep(0.3)  # (the process stops: the exit's ACKs queue meanwhile)
                    suspendable_clock.suspend(60.0, tunnel)
                else:
                    time.sleep(3.0)
                segments_in = stats.segments_in
                while stats.segments_in == segments_in:
                    await trio.sleep(0)
                # the queued ACKs were read: nothing had gone again on a timer before
                seen["after"] = (stats.tlp_probes, stats.recovery_probes, stats.rto_expired)
                seen["probes"] = probes
                while True:
                    srtt = sock.srtt
                    assert srtt is not None
                    seen["top"] = max(seen["top"], srtt)
                    await trio.sleep(0.001)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pause_mid_upload)
                answer = await http_post_json(stream, "/up", 16 * MB)
                nursery.cancel_scope.cancel()
            assert answer == {"sha256": pattern_sha256(16 * MB), "size": 16 * MB}
            assert seen["after"] == seen["probes"]
            assert seen["top"] < 0.25, seen  # (the path's round trip: ~45 ms)
            assert tunnel.pauses == 1
            await stream.aclose()


async def test_a_pause_does_not_count_against_a_connect(exit_peer: ExitPeer) -> None:
    """A connect with a 2 s timeout to Linux 40 ms away; its SYN is out when the process
    stops 3 s on the real clock (SIGSTOP, a debugger, an addon holding the GIL), and the
    SYN-ACK is lost meanwhile (here the relay drops what comes down). The connect task
    wakes first after it, its deadline long past: it failed with ETIMEDOUT though nothing
    could be sent again meanwhile. Now its deadlines move on by the pause, and the
    connection is made: by the SYN sent again a timeout after it (Stack.pause_ended) or by
    the server's own SYN-ACK retransmission, whichever passes the relay first (Linux's SYN
    retries do not count a suspend either)."""
    slow = Impairment(delay=0.020)
    async with tunnel_through_relay(exit_peer, slow) as (tunnel, relay):
        server, port = exit_peer.server_tunnel_v4, exit_peer.http_port
        with trio.fail_after(30):
            # (the next datagram up must be the SYN)
            await fetch_and_let_the_close_pass(tunnel, server, port)
            relay.set_impairment(down=Impairment(loss=1.0, delay=slow.delay))
            up = relay.up.received

            async def stop_once_the_syn_left() -> None:
                while relay.up.received == up:
                    await trio.sleep(0.001)
                time.sleep(3.0)
                relay.set_impairment(down=slow)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_once_the_syn_left)
                stream = await tunnel.open_tcp_stream(server, port, connect_timeout=2.0)
            assert tunnel.pauses == 1 and tunnel.paused_total > 2.0
            await get_pattern(stream, 256 * KB)
            await stream.aclose()


# -- mitmproxy's WireGuard mode as the exit ------------------------------------------------------


async def test_through_mitmproxy_wireguard_mode(exit_peer: ExitPeer) -> None:
    """our tunnel → mitmdump (boringtun + smoltcp, in the exit ns) → the HTTP server."""
    require_mitmdump()
    size = 5 * MB
    before = exit_peer.client_stats()
    with mitmproxy_wireguard_peer(ns=exit_peer.ns, host=exit_peer.endpoint[0], port=51821) as mp:
        text = mp.client_config_text(allowed_ips=exit_peer.tunnel_v4_net)
        async with exit_tunnel(exit_peer, text) as (tunnel, factory):
            with trio.fail_after(60):
                stream = await tunnel.open_tcp_stream(
                    exit_peer.server_tunnel_v4, exit_peer.http_port
                )
                assert stream.local_address[0] == mp.client_tunnel_v4
                await get_pattern(stream, size)
                await stream.aclose()
            assert tunnel.status().peers[0].has_session
            assert factory.destinations == {mp.endpoint}
        log_text = mp.log_text()
    assert f"/bytes/{size}" in log_text, log_text[-2000:]
    # nothing of ours reached wireguard-go: the traffic went through mitmproxy
    assert exit_peer.client_stats().rx_bytes == before.rx_bytes
