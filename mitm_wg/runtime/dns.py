"""Name resolution through the tunnel: a small stub resolver over a pluggable transport.

:class:`Resolver` sends queries to the DNS servers named by the configuration's ``DNS =`` line
through a :class:`DnsTransport` (in production, :class:`TunnelDnsTransport` over the tunnel's
UDP sockets and TCP streams), so that no name ever reaches the host's resolver. dnspython
builds and parses the messages; this module decides what to ask, whom, and what to believe.

Behaviour, in resolv.conf terms:

* IP literals (``"10.0.0.1"``, ``"::1"``, ``"[::1]"``) are returned as they are, unresolved.
* Names ending in a dot are absolute. Other names go through the search list with ``ndots:1``:
  a name with at least one dot is tried as it is first and then with each search domain
  appended; a single-label name is tried with each search domain first and as it is last.
* ``localhost`` is an ordinary name here: it is asked of the tunnel's servers, never answered
  locally (a loopback address would not mean anything on the far side of the tunnel).
* A records are asked when the tunnel has an IPv4 address, AAAA when it has an IPv6 address;
  both at once when it has both. IPv6 addresses come first in the result; the caller's Happy
  Eyeballs (RFC 8305) interleaves them.
* Each query goes to the servers in order, starting with the last one that answered, and moves
  on to the next on a timeout, an unreachable server, SERVFAIL, REFUSED, NOTIMP or FORMERR;
  ``attempts`` is the number of rounds over all servers. A truncated UDP answer is asked again
  over TCP from the same server.
* A UDP query to a server that has answered before goes again, on the same socket, when
  no reply came within the RTO its replies' times give (RFC 6298's estimator, at least
  ``RESEND_MIN``, at most half the timeout; doubling each time) while the timeout runs: on a
  lossy path a lost query or reply costs about one round trip to that server, not the
  whole timeout. A reply to any copy is taken. A server not measured yet (the first query
  to it) starts from the round trip of the tunnel's last handshake with the peer that
  routes it (the transport's optional ``path_rtt``), a lower bound for the server's; with
  neither, the query waits the timeout.
* Every query uses a fresh UDP socket (a fresh source port from the transport) and a random id.
  A reply is believed only if it comes from the server's address and port, carries the query's
  id and echoes its question; anything else is counted and ignored while the wait goes on.
* Answers are cached for the smallest TTL of the CNAME chain and the address RRset (at most
  ``max_ttl``). NXDOMAIN and "no addresses" are cached per RFC 2308 for min(SOA TTL, SOA
  MINIMUM), at most ``max_negative_ttl``; negative answers without an SOA are not cached.
  Concurrent lookups of the same name and type share one query.
* CNAME chains are followed within one answer (what recursive servers send); an answer whose
  chain stops at a CNAME without the target's records or an SOA is treated as having no
  addresses for that type and is not cached.

:meth:`Resolver.forward` serves clients that use *us* as their DNS server (mitmproxy's DNS
and WireGuard modes): it passes their raw query message to the same servers, under the same
rotation and reply checks, and returns the raw reply (any record type; nothing cached).

Failures raise :class:`socket.gaierror`, as :func:`socket.getaddrinfo` does: ``EAI_NONAME``
when no candidate name has an address of a usable family, ``EAI_AGAIN`` when the servers did
not answer or failed (the message names every server tried and what went wrong with it).

Without DNS servers in the configuration, :class:`HostResolver` uses the host's resolver
(``trio.socket.getaddrinfo``) and says so once in the log; :func:`make_resolver` picks.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, Final, Protocol

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import trio

from mitm_wg.config import IPAddress
from mitm_wg.net.rtt import RttEstimator

__all__ = [
    "DEFAULT_EDNS_PAYLOAD",
    "DnsTransport",
    "HostResolver",
    "Resolver",
    "TunnelDnsTransport",
    "UdpEndpoint",
    "host_resolver",
    "make_resolver",
]

logger = logging.getLogger(__name__)

#: The UDP payload size we advertise with EDNS(0): fits a 1280-byte IPv6 MTU (DNS flag day 2020).
DEFAULT_EDNS_PAYLOAD: Final = 1232

#: the shortest wait before a query goes again to a server that answered before (its
#: replies' RTO is clamped to at least this: a recursive server's cache miss takes longer
#: than a round trip, and resending then only costs a datagram)
RESEND_MIN: Final = 0.2

_HEADER_LEN: Final = 12
_FLAG_QR: Final = 0x8000
_FLAG_TC: Final = 0x0200
_MAX_NAME_LEN: Final = 253
# rcodes after which the next server is asked
_RETRY_RCODES: Final = frozenset(
    {dns.rcode.SERVFAIL, dns.rcode.REFUSED, dns.rcode.NOTIMP, dns.rcode.FORMERR}
)
_RDTYPE_OF_FAMILY: Final = {6: dns.rdatatype.AAAA, 4: dns.rdatatype.A}

# outcome kinds of one (name, type) lookup
_OK: Final = "ok"  # addresses (possibly none: NODATA)
_NXDOMAIN: Final = "nxdomain"
_SERVER_FAILURE: Final = "server-failure"  # some server answered, none usefully
_UNREACHABLE: Final = "unreachable"  # no server answered at all


class UdpEndpoint(Protocol):
    """A connectionless UDP socket (``TunnelUdpSocket`` fits)."""

    async def sendto(self, data: bytes, address: tuple[str, int]) -> None: ...

    async def recvfrom(self) -> tuple[bytes, tuple[str, int]]: ...

    def close(self) -> None: ...


class DnsTransport(Protocol):
    """How the resolver reaches its servers.

    ``open_udp(family)`` (family 4 or 6) returns a fresh UDP socket with its own (ideally
    random) source port; the resolver opens one per query and closes it afterwards.
    ``open_tcp(server, port)`` returns a connected stream; the resolver does the RFC 1035
    two-byte length framing itself and closes the stream. Either may raise :class:`OSError`
    (e.g. ``ENETUNREACH``); the resolver then moves on to the next server.
    """

    async def open_udp(self, family: int) -> UdpEndpoint: ...

    async def open_tcp(self, server: IPAddress, port: int) -> trio.abc.Stream: ...

    # Optional: ``unanswered(server, since)`` -- a UDP query sent at ``since`` (the resolver's
    # clock) got no reply in time; a tunnel uses it to re-handshake with a silent peer.
    # Optional: ``async ready(server)`` -- returns once a datagram to ``server`` can leave
    # (a tunnel: once its peer has a session); the query's timeout starts after it.
    # Optional: ``path_rtt(server)`` -- seconds, a lower bound for a round trip to ``server``
    # (a tunnel: its last handshake's with the peer routing it), or None; a first query
    # goes again after three times it instead of waiting the whole timeout.


class _TunnelLike(Protocol):
    async def open_udp_socket(self, family: int = 4) -> Any: ...

    async def open_tcp_stream(self, host: str, port: int) -> Any: ...

    def unanswered(self, address: IPAddress, since: float) -> None: ...

    async def wait_session(self, address: IPAddress) -> None: ...

    def path_rtt(self, address: IPAddress) -> float | None: ...


class TunnelDnsTransport:
    """:class:`DnsTransport` over a ``Tunnel`` (its UDP sockets and TCP streams)."""

    __slots__ = ("_tunnel",)

    def __init__(self, tunnel: _TunnelLike) -> None:
        self._tunnel = tunnel

    async def open_udp(self, family: int) -> UdpEndpoint:
        sock: UdpEndpoint = await self._tunnel.open_udp_socket(family)
        return sock

    async def open_tcp(self, server: IPAddress, port: int) -> trio.abc.Stream:
        # An IP literal: the tunnel connects without resolving (no recursion into us).
        stream: trio.abc.Stream = await self._tunnel.open_tcp_stream(str(server), port)
        return stream

    def unanswered(self, server: IPAddress, since: float) -> None:
        self._tunnel.unanswered(server, since)

    async def ready(self, server: IPAddress) -> None:
        await self._tunnel.wait_session(server)

    def path_rtt(self, server: IPAddress) -> float | None:
        return self._tunnel.path_rtt(server)


class _Outcome:
    """The result of looking up one (name, type): immutable once built, shared by waiters."""

    __slots__ = ("addresses", "detail", "kind")

    def __init__(self, kind: str, addresses: tuple[IPAddress, ...] = (), detail: str = "") -> None:
        self.kind = kind
        self.addresses = addresses
        self.detail = detail


class _Flight:
    """A lookup in progress; concurrent askers of the same (name, type) wait for it."""

    __slots__ = ("done", "outcome")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.outcome: _Outcome | None = None


class _BadReply(Exception):
    """A server's reply could not be used (internal: the next server is asked)."""


def _ip_literal(name: str) -> IPAddress | None:
    text = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _noname(message: str) -> socket.gaierror:
    return socket.gaierror(socket.EAI_NONAME, message)


class Resolver:
    """A caching stub resolver that asks the given servers through ``transport``.

    ``families`` holds 4 and/or 6: the address families the tunnel has addresses for; it
    decides which record types are asked. ``timeout`` is the wait for one reply from one
    server; ``attempts`` is the number of rounds over all servers. ``clock`` returns the
    current time in seconds (``trio.current_time``, which honours ``trio.testing.MockClock``).
    """

    def __init__(
        self,
        transport: DnsTransport,
        servers: Sequence[IPAddress],
        search: Sequence[str],
        families: Collection[int],
        *,
        port: int = 53,
        timeout: float = 2.0,
        attempts: int = 2,
        clock: Callable[[], float] = trio.current_time,
        cache_size: int = 1024,
        max_ttl: float = 86400.0,
        max_negative_ttl: float = 3600.0,
        edns_payload: int | None = DEFAULT_EDNS_PAYLOAD,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not servers:
            raise ValueError("Resolver needs at least one DNS server (use HostResolver)")
        fams = set(families)
        if not fams or not fams <= {4, 6}:
            raise ValueError(f"families must be a non-empty subset of {{4, 6}}, not {families!r}")
        if timeout <= 0 or attempts < 1 or cache_size < 0 or not 0 < port < 65536:
            raise ValueError("timeout must be > 0, attempts >= 1, cache_size >= 0, port 1..65535")
        self.transport = transport
        self.servers: tuple[IPAddress, ...] = tuple(ipaddress.ip_address(s) for s in servers)
        self.search: tuple[dns.name.Name, ...] = tuple(
            dns.name.from_text(d.rstrip(".") + ".") for d in search
        )
        self.families = frozenset(fams)
        # IPv6 first: the caller's Happy Eyeballs starts with the first address
        self._rdtypes = tuple(_RDTYPE_OF_FAMILY[f] for f in (6, 4) if f in fams)
        self.port = port
        self.timeout = timeout
        self.attempts = attempts
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl
        self.edns_payload = edns_payload
        self._clock = clock
        self._randbytes = randbytes
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[dns.name.Name, int], tuple[float, _Outcome]] = OrderedDict()
        self._inflight: dict[tuple[dns.name.Name, int], _Flight] = {}
        self._preferred = 0  # index of the server that answered last
        #: per server, the times its UDP replies took (Karn's rule: only queries sent once)
        self._rtts: dict[IPAddress, RttEstimator] = {}
        # counters
        self.queries_sent = 0
        self.resends = 0  # UDP queries sent again within a server's timeout
        self.tcp_fallbacks = 0
        self.timeouts = 0
        self.cache_hits = 0
        self.malformed_replies = 0
        self.mismatched_replies = 0  # wrong source, id or question: ignored
        self.server_failures = 0  # SERVFAIL/REFUSED/NOTIMP/FORMERR or an unusable answer

    def __repr__(self) -> str:
        servers = ", ".join(str(s) for s in self.servers)
        return f"Resolver(servers=[{servers}], families={sorted(self.families)})"

    # -- public ----------------------------------------------------------------------------

    async def resolve(self, name: str) -> list[IPAddress]:
        """Addresses of ``name`` (IPv6 first), or the IP literal itself.

        Raises :class:`socket.gaierror` (``EAI_NONAME``: no such name or no address of a
        usable family; ``EAI_AGAIN``: the servers did not answer or failed).
        """
        literal = _ip_literal(name)
        if literal is not None:
            return [literal]
        candidates = self._candidates(name)
        tried: list[str] = []
        failure: _Outcome | None = None
        for qname in candidates:
            outcomes = await self._lookup_all(qname)
            addresses = [a for o in outcomes for a in o.addresses]
            if addresses:
                return addresses
            tried.append(qname.to_text(omit_final_dot=True))
            for o in outcomes:
                if o.kind == _UNREACHABLE:
                    # the same servers would not answer for the next candidate either
                    raise socket.gaierror(socket.EAI_AGAIN, f"cannot resolve {name!r}: {o.detail}")
                if o.kind == _SERVER_FAILURE and failure is None:
                    failure = o
        if failure is not None:
            raise socket.gaierror(socket.EAI_AGAIN, f"cannot resolve {name!r}: {failure.detail}")
        kinds = "/".join(f"IPv{f}" for f in (6, 4) if f in self.families)
        raise _noname(
            f"{name!r} not found: no {kinds} address from the tunnel's DNS servers "
            f"(tried {', '.join(tried)})"
        )

    def clear_cache(self) -> None:
        self._cache.clear()

    async def forward(self, wire: bytes, *, tcp: bool = False) -> bytes:
        """Forward a client's DNS query message to the servers; the reply for that client.

        For clients that query us as their DNS server (mitmproxy's DNS and WireGuard modes):
        every record type, class, flag and EDNS option passes through unchanged; only the
        message id is replaced by a fresh random one on the way out and restored on the way
        back (RFC 5452 section 9.2: a forwarder's queries need unpredictable ids and ports,
        whatever its clients chose). Servers are tried in the same order as for
        :meth:`resolve`; a reply is believed under the same checks (source, id, question).
        SERVFAIL, REFUSED, NOTIMP and FORMERR move on to the next server; any other rcode
        (NOERROR, NXDOMAIN, ...) is the answer. When every server that answered gave one of
        those four, the last such reply is passed on as it is (it still came from the
        tunnel's servers).

        ``tcp`` says the client asked over TCP: a truncated UDP reply is then asked again
        over TCP from the same server. A UDP client gets the truncated reply as it is, so
        that it retries over TCP itself (RFC 1035 section 4.2.1, RFC 7766 section 5).

        Nothing is cached (the client caches). Raises :class:`ValueError` when ``wire`` is
        not a query with one question, and :class:`socket.gaierror` ``EAI_AGAIN`` naming
        every server and what went wrong when none gave a usable reply: the caller answers
        SERVFAIL, and never asks anyone else.
        """
        try:
            query = dns.message.from_wire(wire)
        except Exception as exc:  # dnspython raises many kinds on hostile input
            raise ValueError(f"malformed DNS query ({type(exc).__name__})") from None
        if query.flags & dns.flags.QR or len(query.question) != 1:
            raise ValueError("not a DNS query with exactly one question")
        client_id = wire[:2]
        body = wire[2:]
        n = len(self.servers)
        problems: dict[IPAddress, str] = {}
        refusal: bytes | None = None  # the last SERVFAIL/REFUSED/NOTIMP/FORMERR reply
        for _round in range(self.attempts):
            if refusal is not None and len(problems) == n:
                break  # every server has answered (refused): asking again changes nothing
            start = self._preferred
            for step in range(n):
                index = (start + step) % n
                server = self.servers[index]
                query.id = int.from_bytes(self._randbytes(2), "big")
                out = query.id.to_bytes(2, "big") + body
                try:
                    data, reply = await self._udp_roundtrip(server, query, out)
                    if reply is None and tcp:
                        self.tcp_fallbacks += 1
                        data, reply = await self._tcp_roundtrip(server, query, out)
                except (OSError, _BadReply) as exc:
                    problems[server] = self._failure(exc)
                    continue
                if reply is not None and reply.rcode() in _RETRY_RCODES:
                    self.server_failures += 1
                    problems[server] = dns.rcode.to_text(reply.rcode())
                    refusal = client_id + data[2:]
                    continue
                self._preferred = index
                return client_id + data[2:]
        if refusal is not None:
            return refusal
        detail = "; ".join(f"{server}: {why}" for server, why in problems.items())
        question = query.question[0]
        raise socket.gaierror(
            socket.EAI_AGAIN,
            f"{question.name} {dns.rdatatype.to_text(question.rdtype)}: no usable reply from "
            f"any DNS server ({detail})",
        )

    # -- names -----------------------------------------------------------------------------

    def _candidates(self, name: str) -> list[dns.name.Name]:
        if not name or name == "." or any(c.isspace() or not c.isprintable() for c in name):
            raise _noname(f"invalid host name {name!r}")
        absolute = name.endswith(".")
        text = name[:-1] if absolute else name
        try:
            relative = dns.name.from_text(text, origin=None)
        except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
            raise _noname(f"invalid host name {name!r}: {exc}") from None
        if absolute:
            order: list[dns.name.Name | None] = [None]
        elif text.count(".") >= 1:  # ndots:1 -- a dotted name is tried as it is first
            order = [None, *self.search]
        else:
            order = [*self.search, None]
        result: list[dns.name.Name] = []
        for suffix in order:
            try:
                candidate = relative.concatenate(dns.name.root if suffix is None else suffix)
            except dns.exception.DNSException:  # too long with this search domain
                continue
            if (
                candidate not in result
                and len(candidate.to_text(omit_final_dot=True)) <= _MAX_NAME_LEN
            ):
                result.append(candidate)
        if not result:
            raise _noname(f"host name too long: {name[:64]!r}...")
        return result

    async def _lookup_all(self, qname: dns.name.Name) -> list[_Outcome]:
        if len(self._rdtypes) == 1:
            return [await self._lookup(qname, self._rdtypes[0])]
        results: list[_Outcome | None] = [None] * len(self._rdtypes)

        async def one(i: int, rdtype: int) -> None:
            results[i] = await self._lookup(qname, rdtype)

        async with trio.open_nursery() as nursery:
            for i, rdtype in enumerate(self._rdtypes):
                nursery.start_soon(one, i, rdtype)
        return [r for r in results if r is not None]

    # -- cache -----------------------------------------------------------------------------

    def _cache_get(self, key: tuple[dns.name.Name, int]) -> _Outcome | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        if self._clock() >= entry[0]:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        self.cache_hits += 1
        return entry[1]

    def _cache_put(self, key: tuple[dns.name.Name, int], ttl: float, outcome: _Outcome) -> None:
        if ttl <= 0 or self._cache_size == 0:
            return
        self._cache[key] = (self._clock() + ttl, outcome)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def _lookup(self, qname: dns.name.Name, rdtype: int) -> _Outcome:
        key = (qname, rdtype)
        while True:
            cached = self._cache_get(key)
            if cached is not None:
                return cached
            flight = self._inflight.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.outcome is not None:
                return flight.outcome
            # the asker we waited for was cancelled: look again (perhaps asking ourselves)
        flight = _Flight()
        self._inflight[key] = flight
        try:
            outcome, ttl = await self._query(qname, rdtype)
            self._cache_put(key, ttl, outcome)
            flight.outcome = outcome
            return outcome
        finally:
            del self._inflight[key]
            flight.done.set()

    # -- queries ---------------------------------------------------------------------------

    def _make_query(self, qname: dns.name.Name, rdtype: int, edns: bool) -> dns.message.Message:
        if edns and self.edns_payload is not None:
            query = dns.message.make_query(qname, rdtype, use_edns=0, payload=self.edns_payload)
        else:
            query = dns.message.make_query(qname, rdtype, use_edns=False)
        query.flags = dns.flags.RD
        query.id = int.from_bytes(self._randbytes(2), "big")
        return query

    async def _query(self, qname: dns.name.Name, rdtype: int) -> tuple[_Outcome, float]:
        """Ask the servers in turn; returns the outcome and how long it may be cached."""
        n = len(self.servers)
        problems: dict[IPAddress, str] = {}
        answered = False
        for _round in range(self.attempts):
            start = self._preferred
            for step in range(n):
                index = (start + step) % n
                server = self.servers[index]
                try:
                    reply = await self._ask(server, qname, rdtype)
                except (OSError, _BadReply) as exc:
                    problems[server] = self._failure(exc)
                    answered = answered or isinstance(exc, _BadReply)
                    continue
                self._preferred = index
                return self._interpret(reply, qname, rdtype)
        kind = _SERVER_FAILURE if answered else _UNREACHABLE
        detail = "; ".join(f"{server}: {why}" for server, why in problems.items())
        rdname = dns.rdatatype.to_text(rdtype)
        return (
            _Outcome(kind, detail=f"{rdname} query failed at every DNS server ({detail})"),
            0.0,
        )

    def _interpret(
        self, reply: dns.message.Message, qname: dns.name.Name, rdtype: int
    ) -> tuple[_Outcome, float]:
        # _ask has checked the rcode and that the reply chains properly
        chain = reply.resolve_chaining()
        if reply.rcode() == dns.rcode.NXDOMAIN:
            outcome = _Outcome(_NXDOMAIN)
        elif chain.answer is None:
            outcome = _Outcome(_OK)
        else:
            addresses: list[IPAddress] = []
            for rdata in chain.answer:
                addr = ipaddress.ip_address(rdata.address)
                if addr not in addresses:
                    addresses.append(addr)
            outcome = _Outcome(_OK, tuple(addresses))
        if outcome.addresses:
            ttl = min(float(chain.minimum_ttl), self.max_ttl)
        elif any(r.rdtype == dns.rdatatype.SOA for r in reply.authority):
            ttl = min(float(chain.minimum_ttl), self.max_negative_ttl)
        else:
            ttl = 0.0  # RFC 2308 section 5: no SOA, no negative caching
        logger.debug(
            "%s %s -> %s %s (ttl %g)",
            qname,
            dns.rdatatype.to_text(rdtype),
            outcome.kind,
            [str(a) for a in outcome.addresses],
            ttl,
        )
        return outcome, ttl

    async def _ask(
        self, server: IPAddress, qname: dns.name.Name, rdtype: int
    ) -> dns.message.Message:
        """One exchange with one server (UDP, then TCP if truncated); checks the answer."""
        query = self._make_query(qname, rdtype, edns=True)
        reply = await self._udp_exchange(server, query)
        if (
            reply is not None
            and reply.rcode() == dns.rcode.FORMERR
            and query.edns >= 0
            and reply.edns < 0
        ):
            # a server that does not speak EDNS: ask it again the RFC 1035 way
            query = self._make_query(qname, rdtype, edns=False)
            reply = await self._udp_exchange(server, query)
        if reply is None:  # truncated
            self.tcp_fallbacks += 1
            reply = await self._tcp_exchange(server, query)
        rcode = reply.rcode()
        if rcode in _RETRY_RCODES:
            raise _BadReply(dns.rcode.to_text(rcode))
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            raise _BadReply(f"unexpected rcode {dns.rcode.to_text(rcode)}")
        try:
            reply.resolve_chaining()
        except dns.exception.DNSException as exc:
            raise _BadReply(f"unusable answer ({type(exc).__name__})") from None
        return reply

    def _check(
        self, data: bytes, query: dns.message.Message, *, question_only: bool = False
    ) -> dns.message.Message | None:
        """The parsed reply if it answers ``query``, else None (counted)."""
        if len(data) < _HEADER_LEN:
            self.malformed_replies += 1
            return None
        if int.from_bytes(data[0:2], "big") != query.id or not (
            int.from_bytes(data[2:4], "big") & _FLAG_QR
        ):
            self.mismatched_replies += 1
            return None
        try:
            reply = dns.message.from_wire(data, question_only=question_only)
        except Exception:  # dnspython raises many kinds on hostile input
            self.malformed_replies += 1
            return None
        if not query.is_response(reply) or (
            len(reply.question) != 1 and reply.rcode() not in _RETRY_RCODES
        ):
            self.mismatched_replies += 1
            return None
        return reply

    def _failure(self, exc: OSError | _BadReply) -> str:
        """Why asking one server failed (counted), for the lookup's error message."""
        if isinstance(exc, TimeoutError):  # ours, or e.g. the tunnel's HandshakeTimeout
            self.timeouts += 1
            return str(exc) or f"no reply within {self.timeout:g} s"
        if isinstance(exc, _BadReply):
            self.server_failures += 1
            return str(exc)
        return f"unreachable ({exc.strerror or exc})"

    async def _udp_exchange(
        self, server: IPAddress, query: dns.message.Message
    ) -> dns.message.Message | None:
        """The server's reply over UDP; None when it is truncated (ask over TCP)."""
        _, reply = await self._udp_roundtrip(server, query, query.to_wire())
        return reply

    async def _udp_roundtrip(
        self, server: IPAddress, query: dns.message.Message, wire: bytes
    ) -> tuple[bytes, dns.message.Message | None]:
        """Send ``wire`` (which encodes ``query``) over UDP; the reply's bytes and message.

        A truncated reply comes back as its bytes and None (only its question is checked).
        """
        # Optional ``ready(server)``: wait until a datagram to the server can leave (the
        # tunnel's session is up), so the timeout below measures the server, not a handshake.
        ready = getattr(self.transport, "ready", None)
        if ready is not None:
            await ready(server)
        sent = self._clock()
        wait = self._resend_after(server)
        try:
            with trio.fail_after(self.timeout):
                sock = await self.transport.open_udp(server.version)
                try:
                    address = (str(server), self.port)
                    copies = 0
                    while True:
                        await sock.sendto(wire, address)
                        self.queries_sent += 1
                        if copies:
                            self.resends += 1
                        copies += 1
                        with trio.move_on_after(wait):
                            got = await self._udp_receive(sock, server, query)
                            if copies == 1:
                                self._rtt_sample(server, self._clock() - sent)
                            return got
                        wait *= 2
                finally:
                    sock.close()
        except trio.TooSlowError:
            # Before the retry: a tunnel whose peer stayed silent re-handshakes now, and
            # holds the retry for the new session (see Tunnel.unanswered).
            unanswered = getattr(self.transport, "unanswered", None)
            if unanswered is not None:
                unanswered(server, sent)
            raise TimeoutError from None

    def _resend_after(self, server: IPAddress) -> float:
        """How long a UDP query to ``server`` waits before it goes again (doubling after).

        The RTO of the server's measured reply times; for a server not measured yet, the
        RTO a first sample as long as the transport's ``path_rtt(server)`` would give (RFC
        6298 §2.2: three times it), a lower bound for any reply from it — a tunnel's last
        handshake with the peer that routes the server; without one, the whole timeout.
        Both within [RESEND_MIN, timeout / 2]. A server slower than that (a recursive
        resolver's cache miss) gets the query twice; its reply is taken either way."""
        rtt = self._rtts.get(server)
        if rtt is not None:
            return rtt.rto
        path_rtt = getattr(self.transport, "path_rtt", None)
        floor = None if path_rtt is None else path_rtt(server)
        if floor is None:
            return self.timeout
        return min(max(RESEND_MIN, 3 * floor), max(RESEND_MIN, self.timeout / 2))

    def _rtt_sample(self, server: IPAddress, seconds: float) -> None:
        """A reply to a query sent once took ``seconds``: the server's RTO for resends."""
        rtt = self._rtts.get(server)
        if rtt is None:
            rtt = self._rtts[server] = RttEstimator(
                min_rto=RESEND_MIN, max_rto=max(RESEND_MIN, self.timeout / 2)
            )
        rtt.sample(seconds)

    async def _udp_receive(
        self, sock: UdpEndpoint, server: IPAddress, query: dns.message.Message
    ) -> tuple[bytes, dns.message.Message | None]:
        while True:
            data, source = await sock.recvfrom()
            if not self._from_server(source, server):
                self.mismatched_replies += 1
                continue
            if len(data) >= _HEADER_LEN and int.from_bytes(data[2:4], "big") & _FLAG_TC:
                # a truncated reply need not parse beyond its question
                if self._check(data, query, question_only=True) is not None:
                    return data, None
                continue
            reply = self._check(data, query)
            if reply is not None:
                return data, reply

    def _from_server(self, source: tuple[str, int], server: IPAddress) -> bool:
        try:
            return source[1] == self.port and ipaddress.ip_address(source[0]) == server
        except (ValueError, IndexError, TypeError):
            return False

    async def _tcp_exchange(
        self, server: IPAddress, query: dns.message.Message
    ) -> dns.message.Message:
        _, reply = await self._tcp_roundtrip(server, query, query.to_wire())
        return reply

    async def _tcp_roundtrip(
        self, server: IPAddress, query: dns.message.Message, wire: bytes
    ) -> tuple[bytes, dns.message.Message]:
        """Send ``wire`` (which encodes ``query``) over TCP; the reply's bytes and message."""
        try:
            with trio.fail_after(self.timeout):
                stream = await self.transport.open_tcp(server, self.port)
                try:
                    await stream.send_all(len(wire).to_bytes(2, "big") + wire)
                    self.queries_sent += 1
                    # one reply is all we read: the first one that is not ours is fatal
                    length = int.from_bytes(await _receive_exactly(stream, 2), "big")
                    data = await _receive_exactly(stream, length)
                finally:
                    await trio.aclose_forcefully(stream)
        except trio.TooSlowError:
            raise TimeoutError from None
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _BadReply(f"TCP connection failed ({exc})") from None
        reply = self._check(data, query)
        if reply is None:
            raise _BadReply("bad reply over TCP")
        if reply.flags & dns.flags.TC:
            raise _BadReply("truncated reply over TCP")
        return data, reply


async def _receive_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    parts: list[bytes] = []
    missing = n
    while missing:
        chunk = await stream.receive_some(missing)
        if not chunk:
            raise _BadReply("TCP connection closed mid-reply")
        parts.append(chunk)
        missing -= len(chunk)
    return b"".join(parts)


# -------------------------------------------------------------------------------------------
# The host's resolver, for configurations without DNS servers

GetAddrInfo = Callable[..., Awaitable[list[tuple[Any, ...]]]]


class HostResolver:
    """Resolves through the host's resolver (``trio.socket.getaddrinfo``).

    Used only when the configuration names no DNS servers; the first lookup logs a warning
    that names now leave through the host, not the tunnel. Keeps addresses of ``families``
    only, IPv6 first.
    """

    def __init__(
        self, families: Collection[int], *, getaddrinfo: GetAddrInfo | None = None
    ) -> None:
        fams = set(families)
        if not fams or not fams <= {4, 6}:
            raise ValueError(f"families must be a non-empty subset of {{4, 6}}, not {families!r}")
        self.families = frozenset(fams)
        self._getaddrinfo = getaddrinfo
        self._warned = False

    def __repr__(self) -> str:
        return f"HostResolver(families={sorted(self.families)})"

    async def resolve(self, name: str) -> list[IPAddress]:
        literal = _ip_literal(name)
        if literal is not None:
            return [literal]
        if not self._warned:
            self._warned = True
            logger.warning(
                "the WireGuard configuration has no DNS servers: host names are resolved by "
                "this host's resolver, outside the tunnel"
            )
        if self.families == {4}:
            family = socket.AF_INET
        elif self.families == {6}:
            family = socket.AF_INET6
        else:
            family = socket.AF_UNSPEC
        getaddrinfo = self._getaddrinfo or trio.socket.getaddrinfo
        infos = await getaddrinfo(name, None, family=family, type=socket.SOCK_STREAM)
        v6: list[IPAddress] = []
        v4: list[IPAddress] = []
        for info in infos:
            try:
                addr = ipaddress.ip_address(info[4][0])
            except (ValueError, IndexError, TypeError):
                continue
            if addr.version not in self.families:
                continue
            bucket = v6 if addr.version == 6 else v4
            if addr not in bucket:
                bucket.append(addr)
        result = v6 + v4
        if not result:
            raise _noname(f"{name!r} has no usable address (host resolver)")
        return result


def host_resolver(families: Collection[int]) -> HostResolver:
    """The fallback resolver for a configuration without ``DNS =`` servers."""
    return HostResolver(families)


def make_resolver(
    transport: DnsTransport,
    servers: Sequence[IPAddress],
    search: Sequence[str],
    families: Collection[int],
    **options: Any,
) -> Resolver | HostResolver:
    """:class:`Resolver` through ``transport`` when there are servers, else the host's."""
    if servers:
        return Resolver(transport, servers, search, families, **options)
    if search:
        logger.info("DNS search domains without DNS servers are ignored: %s", ", ".join(search))
    return host_resolver(families)
