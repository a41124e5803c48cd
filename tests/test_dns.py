"""The tunnel's stub resolver against scripted in-memory DNS servers (and a real dnsmasq).

Every test runs on trio's MockClock with autojump: timeouts and TTL expiry take no real time,
and the virtual clock makes elapsed-time checks exact.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trio
import trio.testing
from conftest import in_ci
from hypothesis import given, settings
from hypothesis import strategies as st

from mitm_wg.config import IPAddress
from mitm_wg.errors import HandshakeTimeout
from mitm_wg.runtime.dns import (
    HostResolver,
    Resolver,
    TunnelDnsTransport,
    UdpEndpoint,
    make_resolver,
)

S1 = ipaddress.ip_address("10.64.0.1")
S2 = ipaddress.ip_address("10.64.0.2")
S6 = ipaddress.ip_address("fd00::53")

Reply = dns.message.Message | bytes | None | list[tuple[bytes, tuple[str, int]]]
Handler = Callable[[dns.message.Message, str], Reply]


# ---------------------------------------------------------------------------------------------
# Scripted servers


@dataclass
class Zone:
    """A tiny authoritative view: answers A/AAAA/CNAME, NXDOMAIN and NODATA with an SOA."""

    records: dict[str, list[tuple[str, int, str]]] = field(default_factory=dict)
    soa_ttl: int = 600
    soa_minimum: int = 60
    with_soa: bool = True

    def add(self, name: str, rdtype: str, value: str, ttl: int = 300) -> Zone:
        self.records.setdefault(name.lower().rstrip(".") + ".", []).append((rdtype, ttl, value))
        return self

    def __call__(self, query: dns.message.Message, via: str) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        q = query.question[0]
        name = q.name.to_text().lower()
        wanted = dns.rdatatype.to_text(q.rdtype)
        for _ in range(10):
            entries = self.records.get(name)
            if entries is None:
                response.set_rcode(dns.rcode.NXDOMAIN)
                break
            cname = [e for e in entries if e[0] == "CNAME"]
            if cname and wanted != "CNAME":
                _, ttl, target = cname[0]
                response.answer.append(dns.rrset.from_text(name, ttl, "IN", "CNAME", target))
                name = target.lower()
                continue
            matching = [e for e in entries if e[0] == wanted]
            if matching:
                ttl = min(e[1] for e in matching)
                values = [e[2] for e in matching]
                response.answer.append(dns.rrset.from_text(name, ttl, "IN", wanted, *values))
            break
        if not response.answer or response.rcode() == dns.rcode.NXDOMAIN:
            if self.with_soa and not any(r.rdtype == q.rdtype for r in response.answer):
                response.authority.append(
                    dns.rrset.from_text(
                        "example.",
                        self.soa_ttl,
                        "IN",
                        "SOA",
                        f"ns.example. host.example. 1 3600 600 86400 {self.soa_minimum}",
                    )
                )
        return response


def drop(query: dns.message.Message, via: str) -> Reply:
    return None


def rcode_reply(rcode: int) -> Handler:
    def handler(query: dns.message.Message, via: str) -> Reply:
        response = dns.message.make_response(query)
        response.set_rcode(rcode)
        return response

    return handler


@dataclass
class Sent:
    server: IPAddress
    port: int
    via: str
    qname: str
    rdtype: str
    id: int
    edns: bool


class FakeUdp:
    def __init__(self, net: FakeNet, family: int) -> None:
        self.net = net
        self.family = family
        self.send, self.inbox = trio.open_memory_channel[tuple[bytes, tuple[str, int]]](100)
        self.closed = False

    async def sendto(self, data: bytes, address: tuple[str, int]) -> None:
        assert not self.closed
        server = ipaddress.ip_address(address[0])
        assert server.version == self.family, "query sent on a socket of the wrong family"
        for datagram in self.net.deliver(server, address[1], data, "udp"):
            self.send.send_nowait(datagram)

    async def recvfrom(self) -> tuple[bytes, tuple[str, int]]:
        return await self.inbox.receive()

    def close(self) -> None:
        self.closed = True


class FakeTcp(trio.abc.Stream):
    def __init__(self, net: FakeNet, server: IPAddress, port: int) -> None:
        self.net, self.server, self.port = net, server, port
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.ready = trio.Event()
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.inbuf += data
        while len(self.inbuf) >= 2 and len(self.inbuf) >= 2 + int.from_bytes(self.inbuf[:2]):
            n = int.from_bytes(self.inbuf[:2])
            wire = bytes(self.inbuf[2 : 2 + n])
            del self.inbuf[: 2 + n]
            for data_out, _ in self.net.deliver(self.server, self.port, wire, "tcp"):
                self.outbuf += len(data_out).to_bytes(2, "big") + data_out
                self.ready.set()

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await self.ready.wait()
        n = len(self.outbuf) if max_bytes is None else min(max_bytes, 7)  # dribble: 7 at most
        out = bytes(self.outbuf[:n])
        del self.outbuf[:n]
        if not self.outbuf:
            self.ready = trio.Event()
        return out

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


class FakeNet:
    """Implements DnsTransport; servers are handlers keyed by (address, port)."""

    def __init__(self, servers: dict[IPAddress, Handler], port: int = 53) -> None:
        self.servers = servers
        self.port = port
        self.sent: list[Sent] = []
        self.sockets: list[FakeUdp] = []
        self.streams: list[FakeTcp] = []
        self.tcp_handlers: dict[IPAddress, Handler] = {}
        self.unreachable: set[IPAddress] = set()

    def deliver(
        self, server: IPAddress, port: int, wire: bytes, via: str
    ) -> list[tuple[bytes, tuple[str, int]]]:
        query = dns.message.from_wire(wire)
        q = query.question[0]
        self.sent.append(
            Sent(
                server,
                port,
                via,
                q.name.to_text(),
                dns.rdatatype.to_text(q.rdtype),
                query.id,
                query.edns >= 0,
            )
        )
        handler = self.servers.get(server) if port == self.port else None
        if via == "tcp":
            handler = self.tcp_handlers.get(server, handler)
        if handler is None:
            return []
        reply = handler(query, via)
        if reply is None:
            return []
        if isinstance(reply, list):
            return reply
        source = (str(server), port)
        if isinstance(reply, bytes):
            return [(reply, source)]
        return [(reply.to_wire(max_size=65535, want_shuffle=False), source)]

    async def open_udp(self, family: int) -> UdpEndpoint:
        sock = FakeUdp(self, family)
        self.sockets.append(sock)
        return sock

    async def open_tcp(self, server: IPAddress, port: int) -> trio.abc.Stream:
        if server in self.unreachable:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        stream = FakeTcp(self, server, port)
        self.streams.append(stream)
        return stream

    def names(self) -> list[str]:
        return [f"{s.qname} {s.rdtype}" for s in self.sent]


class UnreachableNet(FakeNet):
    async def open_udp(self, family: int) -> UdpEndpoint:
        if family == 6:
            raise OSError(errno.ENETUNREACH, "Network is unreachable")
        return await super().open_udp(family)


def example_zone() -> Zone:
    return (
        Zone()
        .add("www.example", "A", "192.0.2.1", ttl=120)
        .add("www.example", "A", "192.0.2.2", ttl=120)
        .add("www.example", "AAAA", "2001:db8::1", ttl=120)
        .add("v4only.example", "A", "192.0.2.4")
        .add("alias.example", "CNAME", "mid.example.", ttl=30)
        .add("mid.example", "CNAME", "edge.cdn.example.", ttl=600)
        .add("edge.cdn.example", "A", "198.51.100.7", ttl=300)
        .add("edge.cdn.example", "AAAA", "2001:db8::7", ttl=300)
    )


def resolver(net: FakeNet, servers: Sequence[IPAddress] = (S1,), **kw: Any) -> Resolver:
    kw.setdefault("families", {4})
    kw.setdefault("search", ())
    families = kw.pop("families")
    search = kw.pop("search")
    return Resolver(net, servers, search, families, **kw)


def ips(*texts: str) -> list[IPAddress]:
    return [ipaddress.ip_address(t) for t in texts]


# ---------------------------------------------------------------------------------------------
# Answers, families, literals


async def test_a_records_only_for_an_ipv4_tunnel(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({S1: example_zone()})
    r = resolver(net, families={4})
    assert await r.resolve("www.example") == ips("192.0.2.1", "192.0.2.2")
    assert net.names() == ["www.example. A"]
    assert [(s.server, s.port, s.via) for s in net.sent] == [(S1, 53, "udp")]
    assert len(net.sockets) == 1 and net.sockets[0].closed and net.sockets[0].family == 4


async def test_aaaa_only_for_an_ipv6_tunnel(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({S1: example_zone()})
    r = resolver(net, families={6})
    assert await r.resolve("www.example") == ips("2001:db8::1")
    assert net.names() == ["www.example. AAAA"]


async def test_both_families_ipv6_first(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({S1: example_zone()})
    r = resolver(net, families={4, 6})
    assert await r.resolve("www.example") == ips("2001:db8::1", "192.0.2.1", "192.0.2.2")
    assert sorted(net.names()) == ["www.example. A", "www.example. AAAA"]
    # a name with only an A record is fine on a dual-stack tunnel
    assert await r.resolve("v4only.example") == ips("192.0.2.4")


async def test_ip_literals_are_not_resolved(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({S1: example_zone()})
    r = resolver(net, families={4, 6})
    assert await r.resolve("192.0.2.9") == ips("192.0.2.9")
    assert await r.resolve("2001:db8::9") == ips("2001:db8::9")
    assert await r.resolve("[2001:db8::9]") == ips("2001:db8::9")
    assert net.sent == []


async def test_localhost_is_asked_of_the_tunnel(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({S1: Zone().add("localhost", "A", "10.9.9.9")})
    r = resolver(net)
    assert await r.resolve("localhost") == ips("10.9.9.9")
    assert net.names() == ["localhost. A"]


@pytest.mark.parametrize("name", ["", ".", "a..b", "bad name", "x\nexample", "a" * 64 + ".com"])
async def test_invalid_names(name: str, autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({S1: example_zone()})
    with pytest.raises(socket.gaierror) as info:
        await resolver(net).resolve(name)
    assert info.value.errno == socket.EAI_NONAME
    assert net.sent == []


async def test_ipv6_server_address(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({S6: example_zone()})
    r = resolver(net, servers=[S6], families={4, 6})
    assert await r.resolve("www.example") == ips("2001:db8::1", "192.0.2.1", "192.0.2.2")
    assert {s.server for s in net.sent} == {S6}
    assert {s.family for s in net.sockets} == {6}


async def test_cname_chain_in_one_answer(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({S1: example_zone()})
    r = resolver(net, families={4, 6})
    assert await r.resolve("alias.example") == ips("2001:db8::7", "198.51.100.7")
    assert sorted(net.names()) == ["alias.example. A", "alias.example. AAAA"]


async def test_chain_cut_short_without_soa_is_no_data_and_not_cached(
    autojump_clock: trio.testing.MockClock,
) -> None:
    zone = Zone(with_soa=False).add("cut.example", "CNAME", "elsewhere.example.")
    zone.add("elsewhere.example", "TXT", '"no addresses"')
    net = FakeNet({S1: zone})
    r = resolver(net)
    for _ in range(2):
        with pytest.raises(socket.gaierror) as info:
            await r.resolve("cut.example")
        assert info.value.errno == socket.EAI_NONAME
    assert len(net.sent) == 2


async def test_query_ids_are_random_and_each_query_has_its_own_socket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ids = iter([b"\x12\x34", b"\xab\xcd", b"\x00\x01"])
    net = FakeNet({S1: example_zone()})
    r = resolver(net, families={4, 6}, randbytes=lambda n: next(ids))
    await r.resolve("www.example")
    assert sorted(s.id for s in net.sent) == [0x1234, 0xABCD]
    assert len(net.sockets) == 2 and all(s.closed for s in net.sockets)
    assert all(s.edns for s in net.sent)


# ---------------------------------------------------------------------------------------------
# Caching


async def test_positive_cache_honours_ttl(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({S1: example_zone()})
    r = resolver(net)
    start = trio.current_time()
    assert await r.resolve("www.example") == ips("192.0.2.1", "192.0.2.2")
    await trio.sleep_until(start + 119)
    assert await r.resolve("www.example") == ips("192.0.2.1", "192.0.2.2")
    assert len(net.sent) == 1 and r.cache_hits == 1
    await trio.sleep_until(start + 121)
    await r.resolve("www.example")
    assert len(net.sent) == 2


async def test_cache_ttl_is_the_minimum_over_the_cname_chain(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNet({S1: example_zone()})
    r = resolver(net)
    start = trio.current_time()
    await r.resolve("alias.example")  # CNAME ttl 30, CNAME 600, A 300
    await trio.sleep_until(start + 29)
    await r.resolve("alias.example")
    assert len(net.sent) == 1
    await trio.sleep_until(start + 31)
    await r.resolve("alias.example")
    assert len(net.sent) == 2


async def test_ttl_is_capped(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({S1: Zone().add("long.example", "A", "192.0.2.5", ttl=7 * 86400)})
    r = resolver(net, max_ttl=100)
    start = trio.current_time()
    await r.resolve("long.example")
    await trio.sleep_until(start + 99)
    await r.resolve("long.example")
    assert len(net.sent) == 1
    await trio.sleep_until(start + 101)
    await r.resolve("long.example")
    assert len(net.sent) == 2


async def test_zero_ttl_is_not_cached(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({S1: Zone().add("zero.example", "A", "192.0.2.6", ttl=0)})
    r = resolver(net)
    assert await r.resolve("zero.example") == ips("192.0.2.6")
    assert await r.resolve("zero.example") == ips("192.0.2.6")
    assert len(net.sent) == 2


@pytest.mark.parametrize(("soa_ttl", "soa_minimum", "expected"), [(600, 60, 60), (45, 900, 45)])
async def test_negative_caching_uses_soa(
    soa_ttl: int, soa_minimum: int, expected: int, autojump_clock: trio.testing.MockClock
) -> None:
    net = FakeNet({S1: Zone(soa_ttl=soa_ttl, soa_minimum=soa_minimum)})
    r = resolver(net)
    start = trio.current_time()
    for _ in range(2):
        with pytest.raises(socket.gaierror) as info:
            await r.resolve("missing.example")
        assert info.value.errno == socket.EAI_NONAME
        assert "missing.example" in str(info.value)
    assert len(net.sent) == 1
    await trio.sleep_until(start + expected - 1)
    with pytest.raises(socket.gaierror):
        await r.resolve("missing.example")
    assert len(net.sent) == 1
    await trio.sleep_until(start + expected + 1)
    with pytest.raises(socket.gaierror):
        await r.resolve("missing.example")
    assert len(net.sent) == 2


async def test_negative_ttl_is_capped_and_needs_an_soa(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNet({S1: Zone(soa_ttl=86400, soa_minimum=86400)})
    r = resolver(net, max_negative_ttl=10)
    start = trio.current_time()
    for when in (0, 9, 11):
        await trio.sleep_until(start + when)
        with pytest.raises(socket.gaierror):
            await r.resolve("missing.example")
    assert len(net.sent) == 2
    net2 = FakeNet({S1: Zone(with_soa=False)})
    r2 = resolver(net2)
    for _ in range(2):
        with pytest.raises(socket.gaierror):
            await r2.resolve("missing.example")
    assert len(net2.sent) == 2


async def test_nodata_is_cached_per_type(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({S1: example_zone()})
    r = resolver(net, families={6})
    with pytest.raises(socket.gaierror) as info:
        await r.resolve("v4only.example")
    assert info.value.errno == socket.EAI_NONAME
    assert "IPv6" in str(info.value)
    with pytest.raises(socket.gaierror):
        await r.resolve("v4only.example")
    assert net.names() == ["v4only.example. AAAA"]


async def test_cache_size_evicts_least_recently_used(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNet({S1: example_zone()})
    r = resolver(net, cache_size=2)
    for name in ("www.example", "v4only.example", "www.example", "alias.example"):
        await r.resolve(name)
    assert len(net.sent) == 3  # www.example was refreshed in the LRU order
    await r.resolve("www.example")
    assert len(net.sent) == 3
    await r.resolve("v4only.example")  # evicted by alias.example
    assert len(net.sent) == 4
    r.clear_cache()
    await r.resolve("www.example")
    assert len(net.sent) == 5


async def test_concurrent_lookups_share_one_query(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({S1: example_zone()})
    r = resolver(net, families={4, 6})
    results: list[list[IPAddress]] = []

    async def one() -> None:
        results.append(await r.resolve("www.example"))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
    assert results == [ips("2001:db8::1", "192.0.2.1", "192.0.2.2")] * 5
    assert len(net.sent) == 2


async def test_waiters_take_over_from_a_cancelled_owner(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    def handler(query: dns.message.Message, via: str) -> Reply:
        nonlocal calls
        calls += 1
        return None if calls == 1 else example_zone()(query, via)  # the owner's query is lost

    net = FakeNet({S1: handler})
    r = resolver(net, timeout=5, attempts=1)
    result: list[IPAddress] = []

    async def waiter() -> None:
        await trio.sleep(1)  # join the owner's flight
        result.extend(await r.resolve("www.example"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        with trio.move_on_after(2):  # the owner gives up before its 5 s timeout
            await r.resolve("www.example")
    assert result == ips("192.0.2.1", "192.0.2.2")
    assert calls == 2 and r.timeouts == 0


# ---------------------------------------------------------------------------------------------
# Servers failing


async def test_timeout_rotates_to_the_next_server_and_remembers_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNet({S1: drop, S2: example_zone()})
    r = resolver(net, servers=[S1, S2], timeout=2.0)
    start = trio.current_time()
    assert await r.resolve("www.example") == ips("192.0.2.1", "192.0.2.2")
    assert trio.current_time() - start == 2.0
    assert [s.server for s in net.sent] == [S1, S2]
    assert r.timeouts == 1 and r.resends == 0  # (no time measured for S1: no resend)
    # the next query starts with the server that answered
    await r.resolve("v4only.example")
    assert [s.server for s in net.sent] == [S1, S2, S2]


def losing(handler: Handler, lost: Sequence[int]) -> Handler:
    """``handler``, except that the queries numbered in ``lost`` (1 = the first it gets)
    vanish: a lossy path, the query or its reply lost."""
    count = [0]

    def lossy(query: dns.message.Message, via: str) -> Reply:
        count[0] += 1
        return None if count[0] in lost else handler(query, via)

    return lossy


async def test_a_lost_query_to_a_server_that_answered_goes_again_at_its_rto(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The server answered once (at once: its RTO is the minimum, RESEND_MIN); the next
    query is lost: the same query (same id, same socket) goes again 0.2 s later, and its
    answer is taken, instead of waiting out the 2 s timeout."""
    net = FakeNet({S1: losing(example_zone(), lost=[2])})
    r = resolver(net, timeout=2.0)
    await r.resolve("v4only.example")
    start = trio.current_time()
    assert await r.resolve("www.example") == ips("192.0.2.1", "192.0.2.2")
    assert trio.current_time() - start == pytest.approx(0.2)
    _first, lost, again = net.sent
    assert (lost.qname, lost.id) == (again.qname, again.id) and again.server == S1
    assert len(net.sockets) == 2  # the resend used the query's own socket
    assert (r.resends, r.timeouts, r.queries_sent) == (1, 0, 3)


async def test_resends_double_within_the_timeout_then_the_next_server(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A server that answered once goes silent: its query goes again at 0.2, 0.6 and 1.4 s
    (the wait doubling), the 2 s timeout still ends the wait for it, and the next server
    is asked. Nothing learnt from the resent query (Karn's rule: which copy was answered
    is unknown), and the first query to a server (S2) is sent once."""
    net = FakeNet({S1: losing(example_zone(), lost=range(2, 100)), S2: example_zone()})
    r = resolver(net, servers=[S1, S2], timeout=2.0)
    await r.resolve("v4only.example")
    srtt = r._rtts[S1].srtt
    start = trio.current_time()
    assert await r.resolve("www.example") == ips("192.0.2.1", "192.0.2.2")
    assert trio.current_time() - start == pytest.approx(2.0)
    assert [s.server for s in net.sent] == [S1, S1, S1, S1, S1, S2]
    assert (r.resends, r.timeouts) == (3, 1)
    assert r._rtts[S1].srtt == srtt


class PathNet(FakeNet):
    """A transport that knows a lower bound for the round trip to its servers (a tunnel's
    handshake with its peer), and whose servers answer ``reply_delay`` after a query."""

    def __init__(
        self, servers: dict[IPAddress, Handler], path: float | None, reply_delay: float = 0.0
    ) -> None:
        super().__init__(servers)
        self.path = path
        self.reply_delay = reply_delay
        self.path_asked: list[IPAddress] = []

    def path_rtt(self, server: IPAddress) -> float | None:
        self.path_asked.append(server)
        return self.path

    async def open_udp(self, family: int) -> UdpEndpoint:
        sock = DelayedUdp(self, family)
        self.sockets.append(sock)
        return sock


class DelayedUdp(FakeUdp):
    """Replies arrive ``net.reply_delay`` after the query they answer went (a reply not
    yet due stays queued when a receive is cancelled, as a socket's would)."""

    net: PathNet

    def __init__(self, net: FakeNet, family: int) -> None:
        super().__init__(net, family)
        self.pending: list[tuple[float, tuple[bytes, tuple[str, int]]]] = []
        self.arrived = trio.Event()

    async def sendto(self, data: bytes, address: tuple[str, int]) -> None:
        assert not self.closed
        due = trio.current_time() + self.net.reply_delay
        server = ipaddress.ip_address(address[0])
        for datagram in self.net.deliver(server, address[1], data, "udp"):
            self.pending.append((due, datagram))
            self.arrived.set()

    async def recvfrom(self) -> tuple[bytes, tuple[str, int]]:
        while not self.pending:
            self.arrived = trio.Event()
            await self.arrived.wait()
        await trio.sleep_until(self.pending[0][0])
        return self.pending.pop(0)[1]


@pytest.mark.parametrize(
    ("path", "resent_at"),
    [(0.030, 0.2), (0.150, 0.45), (0.9, 1.0)],
    ids=["floor", "three-round-trips", "half-the-timeout"],
)
async def test_a_lost_first_query_goes_again_after_three_path_round_trips(
    path: float, resent_at: float, autojump_clock: trio.testing.MockClock
) -> None:
    """Nothing measured from S1 yet, but the transport knows the round trip to the peer
    that routes it (the tunnel's handshake): the lost first query goes again after three
    of it (RFC 6298's first RTO for that sample), at least RESEND_MIN, at most half the
    timeout -- not after the whole timeout."""
    net = PathNet({S1: losing(example_zone(), lost=[1])}, path)
    r = resolver(net, timeout=2.0)
    start = trio.current_time()
    assert await r.resolve("www.example") == ips("192.0.2.1", "192.0.2.2")
    assert trio.current_time() - start == pytest.approx(resent_at)
    lost, again = net.sent
    assert (lost.qname, lost.id, again.server) == (again.qname, again.id, S1)
    assert len(net.sockets) == 1 and net.path_asked == [S1]
    assert (r.resends, r.timeouts) == (1, 0)
    assert S1 not in r._rtts  # (Karn: which copy was answered is unknown)


async def test_without_a_path_round_trip_a_first_query_waits_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = PathNet({S1: losing(example_zone(), lost=[1]), S2: example_zone()}, None)
    r = resolver(net, servers=[S1, S2], timeout=2.0)
    start = trio.current_time()
    assert await r.resolve("www.example") == ips("192.0.2.1", "192.0.2.2")
    assert trio.current_time() - start == pytest.approx(2.0)
    assert [s.server for s in net.sent] == [S1, S2]
    assert (r.resends, r.timeouts) == (0, 1)


async def test_a_server_slower_than_the_path_gets_a_first_query_twice_then_is_measured(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A recursive server's cache miss takes longer than three path round trips: the
    query goes twice and the first copy's answer is taken when it comes (no wait beyond
    it). Nothing is measured from that (Karn); a later reply within the wait is, and from
    then on the server's own RTO counts, not the path's."""
    net = PathNet({S1: example_zone()}, 0.050, reply_delay=0.5)
    r = resolver(net, timeout=2.0)
    start = trio.current_time()
    assert await r.resolve("www.example") == ips("192.0.2.1", "192.0.2.2")
    assert trio.current_time() - start == pytest.approx(0.5)
    assert len(net.sent) == 2 and r.resends == 1 and S1 not in r._rtts
    net.reply_delay = 0.1
    start = trio.current_time()
    await r.resolve("v4only.example")
    assert trio.current_time() - start == pytest.approx(0.1)
    assert len(net.sent) == 3 and r._rtts[S1].srtt == pytest.approx(0.1)
    # measured: a slow reply now waits the server's RTO (0.3 s), not the path's 0.2 s
    net.reply_delay = 0.25
    await r.resolve("alias.example")
    assert len(net.sent) == 4 and r.resends == 1 and net.path_asked == [S1, S1]


async def test_all_servers_time_out(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({S1: drop, S2: drop})
    r = resolver(net, servers=[S1, S2], timeout=1.5, attempts=2, search=["corp.example"])
    start = trio.current_time()
    with pytest.raises(socket.gaierror) as info:
        await r.resolve("www.example")
    assert info.value.errno == socket.EAI_AGAIN
    assert "10.64.0.1" in str(info.value) and "10.64.0.2" in str(info.value)
    assert "www.example" in str(info.value)
    # two rounds over both servers, then no further search candidates (same dead servers)
    assert [s.server for s in net.sent] == [S1, S2, S1, S2]
    assert trio.current_time() - start == 4 * 1.5
    assert r.timeouts == 4
    assert all(s.closed for s in net.sockets)


@pytest.mark.parametrize("rcode", [dns.rcode.SERVFAIL, dns.rcode.REFUSED, dns.rcode.NOTIMP])
async def test_server_failure_rotates_without_waiting(
    rcode: int, autojump_clock: trio.testing.MockClock
) -> None:
    net = FakeNet({S1: rcode_reply(rcode), S2: example_zone()})
    r = resolver(net, servers=[S1, S2])
    start = trio.current_time()
    assert await r.resolve("www.example") == ips("192.0.2.1", "192.0.2.2")
    assert trio.current_time() == start
    assert [s.server for s in net.sent] == [S1, S2]
    assert r.timeouts == 0 and r.server_failures == 1


async def test_servfail_everywhere_is_a_temporary_error_and_not_cached(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNet({S1: rcode_reply(dns.rcode.SERVFAIL), S2: rcode_reply(dns.rcode.REFUSED)})
    r = resolver(net, servers=[S1, S2], attempts=1)
    for n in (2, 4):
        with pytest.raises(socket.gaierror) as info:
            await r.resolve("www.example")
        assert info.value.errno == socket.EAI_AGAIN
        assert "SERVFAIL" in str(info.value) and "REFUSED" in str(info.value)
        assert len(net.sent) == n


async def test_servfail_for_one_candidate_moves_on_to_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    zone = example_zone().add("db.corp.example", "A", "10.1.1.1")

    def handler(query: dns.message.Message, via: str) -> Reply:
        if query.question[0].name == dns.name.from_text("db.broken.example."):
            return rcode_reply(dns.rcode.SERVFAIL)(query, via)
        return zone(query, via)

    net = FakeNet({S1: handler})
    r = resolver(net, search=["broken.example", "corp.example"], attempts=1)
    assert await r.resolve("db") == ips("10.1.1.1")
    assert net.names() == ["db.broken.example. A", "db.corp.example. A"]

    # nothing found after a SERVFAIL: a temporary error, not "no such name"
    def all_fail_but_last(query: dns.message.Message, via: str) -> Reply:
        if query.question[0].name != dns.name.from_text("x."):
            return rcode_reply(dns.rcode.SERVFAIL)(query, via)
        return zone(query, via)

    net2 = FakeNet({S1: all_fail_but_last})
    r2 = resolver(net2, search=["broken.example"], attempts=1)
    with pytest.raises(socket.gaierror) as info:
        await r2.resolve("x")
    assert info.value.errno == socket.EAI_AGAIN
    assert net2.names() == ["x.broken.example. A", "x. A"]


async def test_unreachable_server_family_is_skipped_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = UnreachableNet({S6: example_zone(), S1: example_zone()})
    r = resolver(net, servers=[S6, S1])
    start = trio.current_time()
    assert await r.resolve("www.example") == ips("192.0.2.1", "192.0.2.2")
    assert trio.current_time() == start
    net2 = UnreachableNet({S6: example_zone()})
    with pytest.raises(socket.gaierror) as info:
        await resolver(net2, servers=[S6]).resolve("www.example")
    assert info.value.errno == socket.EAI_AGAIN
    assert "fd00::53" in str(info.value) and "unreachable" in str(info.value)


async def test_formerr_to_edns_retries_without_edns(autojump_clock: trio.testing.MockClock) -> None:
    zone = example_zone()

    def old_server(query: dns.message.Message, via: str) -> Reply:
        if query.edns >= 0:
            response = dns.message.make_response(query)
            response.use_edns(False)
            response.set_rcode(dns.rcode.FORMERR)
            return response
        return zone(query, via)

    net = FakeNet({S1: old_server})
    r = resolver(net)
    assert await r.resolve("www.example") == ips("192.0.2.1", "192.0.2.2")
    assert [s.edns for s in net.sent] == [True, False]


# ---------------------------------------------------------------------------------------------
# Truncation and TCP


def big_zone() -> Zone:
    zone = Zone()
    for i in range(120):
        zone.add("big.example", "A", f"10.20.{i // 250}.{i % 250 + 1}")
    return zone


def truncating(zone: Zone) -> Handler:
    def handler(query: dns.message.Message, via: str) -> Reply:
        response = zone(query, via)
        if via == "udp":
            response = dns.message.make_response(query)
            response.flags |= dns.flags.TC
        return response

    return handler


async def test_truncated_answer_is_asked_again_over_tcp(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNet({S1: truncating(big_zone())})
    r = resolver(net)
    result = await r.resolve("big.example")
    assert len(result) == 120 and result[0] == ipaddress.ip_address("10.20.0.1")
    assert [s.via for s in net.sent] == ["udp", "tcp"]
    assert r.tcp_fallbacks == 1
    assert len(net.streams) == 1 and net.streams[0].closed


async def test_tcp_failure_moves_on_to_the_next_server(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNet({S1: truncating(big_zone()), S2: truncating(big_zone())})
    net.unreachable.add(S1)
    r = resolver(net, servers=[S1, S2])
    assert len(await r.resolve("big.example")) == 120
    assert [(s.server, s.via) for s in net.sent] == [(S1, "udp"), (S2, "udp"), (S2, "tcp")]


async def test_tcp_server_that_never_answers_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNet({S1: truncating(big_zone())})
    net.tcp_handlers[S1] = drop
    r = resolver(net, attempts=1, timeout=3)
    start = trio.current_time()
    with pytest.raises(socket.gaierror) as info:
        await r.resolve("big.example")
    assert info.value.errno == socket.EAI_AGAIN
    assert trio.current_time() - start == 3
    assert net.streams[0].closed


async def test_wrong_reply_over_tcp_is_a_server_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def wrong_id(query: dns.message.Message, via: str) -> Reply:
        response = big_zone()(query, via)
        response.id ^= 1
        return response

    net = FakeNet({S1: truncating(big_zone()), S2: big_zone()})
    net.tcp_handlers[S1] = wrong_id
    r = resolver(net, servers=[S1, S2])
    assert len(await r.resolve("big.example")) == 120
    assert r.server_failures == 1 and r.mismatched_replies == 1


# ---------------------------------------------------------------------------------------------
# Replies that must be ignored


Forger = Callable[[dns.message.Message], tuple[bytes, tuple[str, int]]]


def spoofing(zone: Zone, *bad: Forger) -> Handler:
    def handler(query: dns.message.Message, via: str) -> Reply:
        good = zone(query, via).to_wire(want_shuffle=False)
        return [*(b(query) for b in bad), (good, ("10.64.0.1", 53))]

    return handler


def _nxdomain(query: dns.message.Message) -> dns.message.Message:
    response = dns.message.make_response(query)
    response.set_rcode(dns.rcode.NXDOMAIN)
    return response


def wrong_id(query: dns.message.Message) -> tuple[bytes, tuple[str, int]]:
    response = _nxdomain(query)
    response.id = (query.id + 1) % 65536
    return response.to_wire(), ("10.64.0.1", 53)


def wrong_question(query: dns.message.Message) -> tuple[bytes, tuple[str, int]]:
    other = dns.message.make_query("evil.example.", "A")
    other.id = query.id
    response = _nxdomain(other)
    return response.to_wire(), ("10.64.0.1", 53)


def wrong_source_port(query: dns.message.Message) -> tuple[bytes, tuple[str, int]]:
    return _nxdomain(query).to_wire(), ("10.64.0.1", 5353)


def wrong_source_address(query: dns.message.Message) -> tuple[bytes, tuple[str, int]]:
    return _nxdomain(query).to_wire(), ("10.64.0.99", 53)


def not_a_response(query: dns.message.Message) -> tuple[bytes, tuple[str, int]]:
    return query.to_wire(), ("10.64.0.1", 53)


def garbage(query: dns.message.Message) -> tuple[bytes, tuple[str, int]]:
    return query.id.to_bytes(2, "big") + b"\x81\x80\x00\x01\xff", ("10.64.0.1", 53)


def short(query: dns.message.Message) -> tuple[bytes, tuple[str, int]]:
    return b"\x00\x01", ("10.64.0.1", 53)


async def test_forged_replies_are_ignored(autojump_clock: trio.testing.MockClock) -> None:
    bad = (wrong_id, wrong_question, wrong_source_port, wrong_source_address, not_a_response)
    net = FakeNet({S1: spoofing(example_zone(), *bad, garbage, short)})
    r = resolver(net)
    assert await r.resolve("www.example") == ips("192.0.2.1", "192.0.2.2")
    assert r.mismatched_replies == len(bad)
    assert r.malformed_replies == 2


async def test_only_forged_replies_mean_a_timeout(autojump_clock: trio.testing.MockClock) -> None:
    def only_bad(query: dns.message.Message, via: str) -> Reply:
        return [wrong_id(query), wrong_question(query), wrong_source_address(query)]

    net = FakeNet({S1: only_bad})
    r = resolver(net, attempts=1, timeout=2)
    with pytest.raises(socket.gaierror) as info:
        await r.resolve("www.example")
    assert info.value.errno == socket.EAI_AGAIN
    assert r.timeouts == 1 and r.mismatched_replies == 3


async def test_forged_truncation_is_ignored(autojump_clock: trio.testing.MockClock) -> None:
    def forged_tc(query: dns.message.Message) -> tuple[bytes, tuple[str, int]]:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.TC
        response.id ^= 0x5555
        return response.to_wire(), ("10.64.0.1", 53)

    net = FakeNet({S1: spoofing(example_zone(), forged_tc)})
    r = resolver(net)
    await r.resolve("www.example")
    assert r.tcp_fallbacks == 0 and [s.via for s in net.sent] == ["udp"]


def test_hostile_replies_never_escape() -> None:
    """Random bytes and mangled answers never raise anything but gaierror."""

    @settings(max_examples=150, derandomize=True, database=None, deadline=None)
    @given(st.lists(st.binary(max_size=80), max_size=4), st.integers(0, 400), st.binary(max_size=8))
    def check(junk: list[bytes], cut: int, flip: bytes) -> None:
        def handler(query: dns.message.Message, via: str) -> Reply:
            good = bytearray(example_zone()(query, via).to_wire())
            for i, b in enumerate(flip):  # corrupt a few bytes after the header and question
                if 12 + 20 + i * 7 < len(good):
                    good[12 + 20 + i * 7] ^= b
            head = query.id.to_bytes(2, "big")
            datagrams = [(head + j, ("10.64.0.1", 53)) for j in junk]
            return [*datagrams, (bytes(good[: max(cut, 12)]), ("10.64.0.1", 53))]

        async def main() -> None:
            r = resolver(FakeNet({S1: handler}), families={4, 6}, attempts=1)
            try:
                result = await r.resolve("alias.example")
            except socket.gaierror:
                return
            assert all(isinstance(a, ipaddress.IPv4Address | ipaddress.IPv6Address) for a in result)

        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

    check()


# ---------------------------------------------------------------------------------------------
# Search domains


async def test_single_label_uses_search_domains_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    zone = example_zone().add("db.lab.example", "A", "10.2.2.2")
    net = FakeNet({S1: zone})
    r = resolver(net, search=["corp.example", "lab.example."])
    assert await r.resolve("db") == ips("10.2.2.2")
    assert net.names() == ["db.corp.example. A", "db.lab.example. A"]


async def test_dotted_name_is_tried_as_is_first(autojump_clock: trio.testing.MockClock) -> None:
    zone = example_zone().add("www.example.corp.example", "A", "10.3.3.3")
    net = FakeNet({S1: zone})
    r = resolver(net, search=["corp.example"])
    assert await r.resolve("www.example") == ips("192.0.2.1", "192.0.2.2")
    assert net.names() == ["www.example. A"]


async def test_dotted_name_falls_back_to_search_domains(
    autojump_clock: trio.testing.MockClock,
) -> None:
    zone = example_zone().add("srv.dc1.corp.example", "A", "10.4.4.4")
    net = FakeNet({S1: zone})
    r = resolver(net, search=["corp.example"])
    assert await r.resolve("srv.dc1") == ips("10.4.4.4")
    assert net.names() == ["srv.dc1. A", "srv.dc1.corp.example. A"]


async def test_absolute_name_skips_the_search_list(autojump_clock: trio.testing.MockClock) -> None:
    zone = example_zone().add("db.corp.example", "A", "10.1.1.1")
    net = FakeNet({S1: zone})
    r = resolver(net, search=["corp.example"])
    with pytest.raises(socket.gaierror) as info:
        await r.resolve("db.")
    assert info.value.errno == socket.EAI_NONAME
    assert net.names() == ["db. A"]


async def test_not_found_anywhere_names_every_candidate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNet({S1: example_zone()})
    r = resolver(net, search=["a.example", "b.example"], families={4, 6})
    with pytest.raises(socket.gaierror) as info:
        await r.resolve("nope")
    assert info.value.errno == socket.EAI_NONAME
    message = str(info.value)
    assert "nope.a.example" in message and "nope.b.example" in message and "IPv6/IPv4" in message
    assert [n for n in net.names() if n.endswith(" A")] == [
        "nope.a.example. A",
        "nope.b.example. A",
        "nope. A",
    ]


async def test_search_domain_too_long_for_a_name_is_skipped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    long_domain = ".".join(["d" * 60] * 3) + ".example"
    zone = example_zone().add("host", "A", "10.5.5.5")
    net = FakeNet({S1: zone})
    r = resolver(net, search=[long_domain])
    name = "h" * 60 + "." + "h" * 10
    with pytest.raises(socket.gaierror) as info:
        await r.resolve(name)
    assert info.value.errno == socket.EAI_NONAME
    assert net.names() == [f"{name}. A"]
    assert await r.resolve("host") == ips("10.5.5.5")


# ---------------------------------------------------------------------------------------------
# The tunnel adapter, the host's resolver and the choice between them


class RecordingTunnel:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    async def open_udp_socket(self, family: int = 4) -> Any:
        self.calls.append(("udp", family))
        return "udp-socket"

    async def open_tcp_stream(self, host: str, port: int) -> Any:
        self.calls.append(("tcp", (host, port)))
        return "tcp-stream"


async def test_tunnel_transport_uses_the_tunnel_with_ip_literals() -> None:
    tunnel = RecordingTunnel()
    transport = TunnelDnsTransport(tunnel)
    assert await transport.open_udp(6) == "udp-socket"
    assert await transport.open_tcp(S6, 53) == "tcp-stream"
    assert tunnel.calls == [("udp", 6), ("tcp", ("fd00::53", 53))]


class FakeGetaddrinfo:
    def __init__(self, results: list[tuple[Any, ...]]) -> None:
        self.results = results
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: object, family: int = 0, type: int = 0) -> Any:
        self.calls.append((host, family))
        return self.results


HOST_RESULTS: list[tuple[Any, ...]] = [
    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 0)),
    (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", 0, 0, 0)),
    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 0)),
    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.2", 0)),
]


async def test_host_resolver_filters_orders_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gai = FakeGetaddrinfo(HOST_RESULTS)
    r = HostResolver({4, 6}, getaddrinfo=gai)
    with caplog.at_level(logging.WARNING, logger="mitm_wg.runtime.dns"):
        assert await r.resolve("www.example") == ips("2001:db8::1", "192.0.2.1", "192.0.2.2")
        assert await r.resolve("www.example") == ips("2001:db8::1", "192.0.2.1", "192.0.2.2")
    assert gai.calls == [("www.example", socket.AF_UNSPEC)] * 2
    warnings = [rec for rec in caplog.records if "host's resolver" in rec.getMessage()]
    assert len(warnings) == 1

    gai4 = FakeGetaddrinfo(HOST_RESULTS)
    assert await HostResolver({4}, getaddrinfo=gai4).resolve("x") == ips("192.0.2.1", "192.0.2.2")
    assert gai4.calls == [("x", socket.AF_INET)]
    gai6 = FakeGetaddrinfo(HOST_RESULTS[:1])
    with pytest.raises(socket.gaierror) as info:
        await HostResolver({6}, getaddrinfo=gai6).resolve("x")
    assert info.value.errno == socket.EAI_NONAME
    assert gai6.calls == [("x", socket.AF_INET6)]


async def test_host_resolver_returns_literals_without_asking() -> None:
    gai = FakeGetaddrinfo(HOST_RESULTS)
    assert await HostResolver({4}, getaddrinfo=gai).resolve("10.0.0.1") == ips("10.0.0.1")
    assert gai.calls == []


def test_make_resolver_chooses_by_servers() -> None:
    net = FakeNet({})
    chosen = make_resolver(net, [S1], ["corp.example"], {4, 6}, timeout=1.0)
    assert isinstance(chosen, Resolver) and chosen.timeout == 1.0
    assert isinstance(make_resolver(net, [], ["corp.example"], {4}), HostResolver)


def test_constructor_rejects_caller_mistakes() -> None:
    net = FakeNet({})
    with pytest.raises(ValueError):
        Resolver(net, [], [], {4})
    with pytest.raises(ValueError):
        Resolver(net, [S1], [], set())
    with pytest.raises(ValueError):
        Resolver(net, [S1], [], {5})
    with pytest.raises(ValueError):
        Resolver(net, [S1], [], {4}, attempts=0)
    with pytest.raises(ValueError):
        HostResolver({4, 7})


# ---------------------------------------------------------------------------------------------
# A real dnsmasq on 127.0.0.1 (no root needed)


class LoopbackUdp:
    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock

    async def sendto(self, data: bytes, address: tuple[str, int]) -> None:
        await self.sock.sendto(data, address)

    async def recvfrom(self) -> tuple[bytes, tuple[str, int]]:
        data, address = await self.sock.recvfrom(65535)
        return data, (address[0], address[1])

    def close(self) -> None:
        self.sock.close()


class LoopbackTransport:
    """Plain host sockets to a server on loopback (what the tunnel does, minus the tunnel)."""

    def __init__(self) -> None:
        self.udp_sockets = 0
        self.tcp_streams = 0

    async def open_udp(self, family: int) -> UdpEndpoint:
        assert family == 4
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.bind(("127.0.0.1", 0))
        self.udp_sockets += 1
        return LoopbackUdp(sock)

    async def open_tcp(self, server: IPAddress, port: int) -> trio.abc.Stream:
        self.tcp_streams += 1
        return await trio.open_tcp_stream(str(server), port)


def _free_port() -> int:
    for _ in range(50):
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
        ):
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            try:
                tcp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port on 127.0.0.1")


def _probe(port: int) -> bool:
    query = dns.message.make_query("exit.test.", "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        try:
            sock.sendto(query.to_wire(), ("127.0.0.1", port))
            data = sock.recv(4096)
        except OSError:
            return False
    return data[:2] == query.to_wire()[:2]


@pytest.fixture(scope="module")
def dnsmasq() -> Iterator[int]:
    """dnsmasq on 127.0.0.1:<free port>; yields the port. Killed by PID at the end."""
    if shutil.which("dnsmasq") is None:
        if in_ci():
            pytest.fail("CI=true but dnsmasq is not installed", pytrace=False)
        pytest.skip("dnsmasq not installed")
    workdir = Path(tempfile.mkdtemp(prefix="mwg-dns-"))
    workdir.chmod(0o755)  # dnsmasq may drop privileges before reading the hosts file
    hosts = workdir / "big.hosts"
    hosts.write_text("".join(f"10.30.{i // 200}.{i % 200 + 1} big.test\n" for i in range(100)))
    hosts.chmod(0o644)
    port = _free_port()
    argv = [
        "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        "--pid-file=", f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces",
        "--cache-size=0", "--local=/test/", f"--addn-hosts={hosts}",
        "--address=/exit.test/10.1.2.3", "--address=/exit.test/fd00::1:2:3",
        "--host-record=target.test,10.1.2.4", "--cname=alias.test,target.test",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not _probe(port):
            if proc.poll() is not None:
                stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                pytest.fail(f"dnsmasq exited during startup: {stderr}")
            if time.monotonic() > deadline:
                pytest.fail("dnsmasq did not answer within 10 s")
            time.sleep(0.05)
        yield port
    finally:
        os.kill(proc.pid, 15)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, 9)
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
        shutil.rmtree(workdir, ignore_errors=True)


LOOPBACK = ipaddress.ip_address("127.0.0.1")


async def test_dnsmasq_answers_both_families(dnsmasq: int) -> None:
    transport = LoopbackTransport()
    r = Resolver(transport, [LOOPBACK], [], {4, 6}, port=dnsmasq)
    assert await r.resolve("exit.test") == ips("fd00::1:2:3", "10.1.2.3")
    assert transport.udp_sockets == 2 and transport.tcp_streams == 0


async def test_dnsmasq_cname_search_and_nxdomain(dnsmasq: int) -> None:
    r = Resolver(LoopbackTransport(), [LOOPBACK], ["test"], {4}, port=dnsmasq)
    assert await r.resolve("alias.test") == ips("10.1.2.4")
    assert await r.resolve("exit") == ips("10.1.2.3")  # via the search domain
    with pytest.raises(socket.gaierror) as info:
        await r.resolve("missing.test")
    assert info.value.errno == socket.EAI_NONAME
    assert r.mismatched_replies == 0 and r.malformed_replies == 0


async def test_dnsmasq_truncates_and_tcp_fallback_gets_everything(dnsmasq: int) -> None:
    transport = LoopbackTransport()
    r = Resolver(transport, [LOOPBACK], [], {4}, port=dnsmasq)
    result = await r.resolve("big.test")
    assert sorted(result) == sorted(ips(*(f"10.30.{i // 200}.{i % 200 + 1}" for i in range(100))))
    assert r.tcp_fallbacks == 1 and transport.tcp_streams == 1


# ---------------------------------------------------------------------------------------------
# A transport that is not ready yet (a tunnel whose handshake is still under way)


class SlowStartNet(FakeNet):
    """``ready`` takes ``delay`` seconds (a handshake in flight), then the query can leave."""

    def __init__(self, servers: dict[IPAddress, Handler], delay: float) -> None:
        super().__init__(servers)
        self.delay = delay
        self.ready_calls: list[IPAddress] = []

    async def ready(self, server: IPAddress) -> None:
        self.ready_calls.append(server)
        await trio.sleep(self.delay)


async def test_the_query_timeout_starts_once_the_transport_is_ready(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A first lookup through a fresh tunnel whose handshake takes longer than the query's
    timeout (busy machine, a lost initiation) succeeds with one query, instead of timing out
    on a datagram that could not even leave yet."""
    net = SlowStartNet({S1: example_zone()}, delay=7.0)
    r = resolver(net, timeout=2.0)
    started = trio.current_time()
    assert await r.resolve("www.example") == ips("192.0.2.1", "192.0.2.2")
    assert trio.current_time() - started >= 7.0
    assert len(net.sent) == 1 and r.timeouts == 0
    assert net.ready_calls == [S1]


async def test_a_transport_that_never_gets_ready_is_a_timeout_naming_why(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class DeadPeer(FakeNet):
        async def ready(self, server: IPAddress) -> None:
            await trio.sleep(10)
            raise HandshakeTimeout("WireGuard peer X at 198.51.100.1:51820 did not answer")

    net = DeadPeer({S1: example_zone()})
    r = resolver(net, timeout=2.0, attempts=1)
    with pytest.raises(OSError, match=r"198\.51\.100\.1:51820 did not answer"):
        await r.resolve("www.example")
    assert net.sent == []
