"""The Stack: one host's IP layer, demultiplexing packets to TCP and UDP sockets.

Sans-IO: :meth:`Stack.receive` takes one IP packet, :meth:`Stack.poll` appends the packets to
send, :meth:`Stack.next_deadline` says when ``poll`` must run again.  Application code calls
socket methods (``TcpSocket.send``/``recv``/``close``, :class:`UdpSocket`) directly and the
runtime then calls ``poll``.

``poll`` does not ask every socket for its ``poll_at()`` (that costs ~3 µs per socket, 300 µs
per poll with 100 sockets — measured with ``bench/bench_stack.py``).  Instead the stack caches
each socket's deadline, refreshed whenever the stack dispatches the socket, and keeps a
"touched" set: ``receive`` adds the target socket, and the sockets the stack hands out are a
thin subclass of :class:`TcpSocket` whose ``send``/``recv``/``shutdown_write``/``close``/
``abort`` add themselves.  A poll then dispatches touched sockets plus those whose cached
deadline has passed (a float compare per socket).

What the stack does besides demultiplexing:

* answers only for its own addresses (others are dropped and counted);
* verifies IP/TCP/UDP/ICMP checksums, drops fragments (see :mod:`mitm_wg.net.ipv4`);
* creates sockets for SYNs on listening ports (bounded backlog), answers segments matching
  no socket with RST (RFC 9293 §3.10.7.1), never a RST for a RST;
* ISNs per RFC 6528 (4 µs clock + keyed BLAKE2s of the 4-tuple); TCP timestamp offsets per
  address pair (keyed BLAKE2s of both addresses, as Linux does), so TSvals towards a host
  grow across connections (RFC 7323 §5.4) and reusing a 4-tuple the peer still holds in
  TIME_WAIT passes PAWS (RFC 6191);
* random ephemeral ports that avoid 4-tuples in use, and 4-tuples closed less than
  :data:`RECENT_TUPLE_SECONDS` ago (the peer's TIME_WAIT, 2MSL) while the port range
  allows; once every port to a destination is taken, the tuple closed longest ago is reused
  (safe with the monotonic timestamps above; otherwise the SYN_SENT reset-and-retry of
  :mod:`mitm_wg.net.tcp` clears the peer's TIME_WAIT);
* MSS from the MTU (MTU-40 for IPv4, MTU-60 for IPv6) and path MTU discovery from ICMP
  "fragmentation needed"/"packet too big" (never below 576/1280; the quoted packet must
  belong to a live socket and, for TCP, quote a sequence number in SND.UNA..SND.NXT, RFC 5927);
* answers pings; passes ICMP unreachable errors to the matching TCP/UDP socket; sends
  rate-limited ICMP port unreachable for UDP to a closed port.

Path MTU values never grow back (no RFC 1191 aging): the tunnel's MTU is the ceiling anyway.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import hashlib
import heapq
import ipaddress
import itertools
import logging
import math
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Union

from mitm_wg.config import format_endpoint
from mitm_wg.net import icmp
from mitm_wg.net.checksum import ones_sum, pseudo_header_sum
from mitm_wg.net.ipv4 import (
    DEFAULT_TTL,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_TCP,
    PROTO_UDP,
    IpPacket,
    ParseError,
    build_ipv4,
    ipv4_header,
    parse_ipv4,
    parse_quoted_ipv4,
)
from mitm_wg.net.ipv6 import build_ipv6, ipv6_header, parse_ipv6, parse_quoted_ipv6
from mitm_wg.net.probe import PathProbe
from mitm_wg.net.tcp import TcpConfig, TcpSocket, TcpState
from mitm_wg.net.tcp_wire import (
    ACK,
    M32,
    PSH,
    RST,
    SYN,
    TcpRun,
    TcpSegment,
    TcpTuple,
    build_tcp_parts,
    parse_tcp,
)
from mitm_wg.net.tcp_wire import (
    HALF as _HALF,
)
from mitm_wg.net.udp import build_udp, parse_udp

logger = logging.getLogger(__name__)

__all__ = ["Stack", "StackStats", "TcpListener", "UdpSocket"]

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address, str]  # noqa: UP007
Interface = Union[ipaddress.IPv4Interface, ipaddress.IPv6Interface, str]  # noqa: UP007
TcpKey = tuple[bytes, int, bytes, int]  # local addr, local port, remote addr, remote port

EPHEMERAL_FIRST = 49152
EPHEMERAL_COUNT = 65536 - EPHEMERAL_FIRST
#: How long a closed connection's 4-tuple is avoided when picking an ephemeral port: the
#: peer's TIME_WAIT (2MSL, RFC 9293 §3.6.1) — Linux holds it 60 s (TCP_TIMEWAIT_LEN),
#: Windows 120 s (TcpTimedWaitDelay) — where the port range allows.
RECENT_TUPLE_SECONDS = 120.0
#: RFC 9040 §8 (temporal sharing): a connection's smoothed RTT and its variation, kept per
#: remote address when it ends, set a new connection's first SYN timeout to the RTO they
#: give (RFC 6298 §2.3; at most ``TcpConfig.initial_rto``) for this long (Linux keeps
#: such metrics an hour, TCP_METRICS_TIMEOUT, but uses them only after the handshake)
RTT_CACHE_SECONDS = 600.0
#: the addresses the RTT cache holds at most (the oldest go first)
RTT_CACHE_SIZE = 4096
#: Beyond this many remembered tuples, expired ones are swept (at most once per
#: RECENT_TUPLE_SECONDS / 4) instead of only lazily per destination.
RECENT_SWEEP_ABOVE = 1 << 16
Destination = tuple[bytes, bytes, int]  # local addr, remote addr, remote port
#: The first 8 bytes of a TCP header an ICMP error quotes: ports and sequence number.
_QUOTED_TCP = struct.Struct("!HHI")
MIN_MTU4 = 576
MIN_MTU6 = 1280
_IP4_HDR = struct.Struct("!BBHHHBBH4s4s")
_TCP_HDR = struct.Struct("!HHIIBBHHH")
_TS_VALUES = struct.Struct("!II")
_IP6_PLEN = struct.Struct("!H")
# Stack.receive_batch's run extension: an IPv4 header's words (all but the addresses) and
# the TCP sequence number after it; an IPv6 header's first word, payload length, next header
# and hop limit, and the TCP sequence number.
_IP4_RUN = struct.Struct("!HHHHHH12xI")
_IP6_RUN = struct.Struct("!IHH36xI")
_ACK_PSH = bytes((ACK | PSH,))
# IPv4 header (DF, TTL 64) + TCP header with NOP NOP TS option: 52 bytes in one pack.
_IP4_TCP_TS = struct.Struct("!BBHHHBBH4s4sHHIIBBHHHBBBBII")
# The same after an IPv6 header (no extension headers, hop limit 64): 72 bytes.
_IP6_TCP_TS = struct.Struct("!IHBB16s16sHHIIBBHHHBBBBII")
_IP6_VERSION_WORD = 6 << 28
#: NOP NOP SACK with 1-3 blocks (with the timestamp, at most 3 fit in 40 bytes of options)
_SACK_OPTION = [struct.Struct(f"!HH{2 * n}I") for n in range(4)]
_IP4_CONST_SUM = 0x4500 + 0x4000 + ((DEFAULT_TTL << 8) | PROTO_TCP)
_TS_OPT_SUM = 0x0101 + 0x080A
_NOP_NOP_TS = b"\x01\x01\x08\x0a"
#: A pure ACK's TCP header length -> (its options after the fixed header, and the bytes that
#: start its SACK option) for the layout Linux sends: NOP NOP TS, NOP NOP SACK of 1-3 blocks
#: (4 do not fit beside a timestamp). See Stack._rx_tcp_fast.
_SACK_ACK = {
    36 + 8 * n: (struct.Struct(f"!4sII4s{2 * n}I"), bytes((1, 1, 5, 2 + 8 * n))) for n in (1, 2, 3)
}
_PLATEAUS = (32000, 17914, 8166, 4352, 2002, 1492, 1006, 508, 296, 68)  # RFC 1191 §7


class StackStats:
    """Counters; every dropped packet is counted in exactly one ``dropped_*``/``no_socket``.

    ``tcp_syn_timeouts`` (SYNs resent because the RTO expired) and ``tcp_syn_fast_retries``
    (SYNs resent at once after resetting the peer's stale state, see
    ``TcpSocket._retry_syn_now``) add up the sockets' own counters when the stack forgets a
    socket; ``tcp_port_reuses`` counts connects that had to reuse a 4-tuple closed less than
    ``RECENT_TUPLE_SECONDS`` ago because every ephemeral port to that destination was taken;
    ``tcp_time_wait_reopens`` the SYNs that ended one of our TIME_WAITs (RFC 6191).
    """

    __slots__ = (
        "dropped_checksum",
        "dropped_fragment",
        "dropped_malformed",
        "dropped_martian",
        "dropped_not_ours",
        "dropped_proto",
        "dropped_unsupported",
        "icmp_echo_answered",
        "icmp_errors_ignored",
        "icmp_errors_received",
        "icmp_rate_limited",
        "icmp_sent",
        "no_socket",
        "packets_in",
        "packets_out",
        "path_probe_replies",  # echo replies that answered one
        "path_probes",  # questions to a path with pings (probe_path)
        "pmtu_told",  # ICMP errors we sent a peer about the path to us (tell_remote_path_mtu)
        "pmtu_updates",
        "rst_sent",
        "syn_backlog_full",
        "tcp_port_reuses",
        "tcp_syn_fast_retries",
        "tcp_syn_timeouts",
        "tcp_time_wait_reopens",
        "udp_queue_full",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    @property
    def dropped(self) -> int:
        """All packets dropped as bad or unwanted (excluding ``no_socket``)."""
        return (
            self.dropped_checksum
            + self.dropped_fragment
            + self.dropped_malformed
            + self.dropped_martian
            + self.dropped_not_ours
            + self.dropped_proto
            + self.dropped_unsupported
        )

    def __repr__(self) -> str:
        return f"StackStats({', '.join(f'{k}={v}' for k, v in self.as_dict().items() if v)})"


_PARSE_COUNTER = {
    ParseError.MALFORMED: "dropped_malformed",
    ParseError.CHECKSUM: "dropped_checksum",
    ParseError.FRAGMENT: "dropped_fragment",
    ParseError.UNSUPPORTED: "dropped_unsupported",
}


def _addr_str(addr: bytes) -> str:
    return str(ipaddress.ip_address(addr))


def _can_reply_to(src: bytes) -> bool:
    """False for sources no error/RST should go to (unspecified, multicast, broadcast)."""
    if len(src) == 4:
        return src[0] != 0 and src[0] < 224
    return src[0] != 0xFF and any(src)


_NEVER = float("inf")
_IP_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address)


def _run_template(first: bytes, end: int) -> tuple[int, bytes, bytes, bytes, int, int, int, int]:
    """For :meth:`Stack.receive_batch`: the header bytes a run started by ``first`` (its
    payload at ``end``) shares with the segments that may extend it: IP header length (0:
    none may), addresses and ports, TCP ack/offset/flags/window, the timestamp option, the
    IP header's other fixed words, and (IPv4) the sum of the addresses for its checksum."""
    if first[33] == ACK and end == 52 and first[0] == 0x45:
        vt, _t, _i, frag, ttlp, _c, _s = _IP4_RUN.unpack_from(first)
        addr_sum = int.from_bytes(first[12:20], "big")
        return 20, first[12:24], first[28:36], first[40:52], vt, frag, ttlp, addr_sum
    if end == 72 and first[53] == ACK and first[0] >> 4 == 6:
        vtf, _p, nh_hop, _s = _IP6_RUN.unpack_from(first)
        return 40, first[8:44], first[48:56], first[60:72], vtf, nh_hop, 0, 0
    return 0, b"", b"", b"", 0, 0, 0, 0


class TcpListener:
    """A listening TCP port; connections appear in :meth:`accept` once established."""

    def __init__(self, stack: Stack, port: int, local: bytes | None, backlog: int) -> None:
        self._stack = stack
        self.port = port
        self.local_addr = local
        self.backlog = backlog
        self._ready: collections.deque[TcpSocket] = collections.deque()
        self._half_open: dict[TcpSocket, None] = {}
        self.closed = False

    @property
    def pending(self) -> int:
        """Established connections waiting in :meth:`accept`."""
        return len(self._ready)

    @property
    def full(self) -> bool:
        return len(self._ready) + len(self._half_open) >= self.backlog

    def accept(self) -> TcpSocket | None:
        """The next established connection (it may already have data or a FIN), or None."""
        ready = self._ready
        while ready:
            sock = ready.popleft()
            if not sock.is_closed:
                return sock
        return None

    def close(self, now: float | None = None) -> None:
        """Stop listening; connections not yet accepted are reset."""
        if self.closed:
            return
        self.closed = True
        stack = self._stack
        t = stack._now if now is None else now
        for sock in [*self._ready, *self._half_open]:
            sock.abort(t)
            stack._dirty[sock] = None
            stack._half_open.pop(sock, None)
        self._ready.clear()
        self._half_open.clear()
        if stack._listeners.get(self.port) is self:
            del stack._listeners[self.port]

    def __repr__(self) -> str:
        return f"TcpListener(port={self.port}, pending={self.pending})"


class UdpSocket:
    """A bound UDP socket with a bounded receive queue (excess datagrams are dropped+counted).

    ``error`` holds the last ICMP error reported for a datagram this socket sent
    (``ConnectionRefusedError`` for port unreachable); :meth:`take_error` reads and clears it.
    """

    def __init__(
        self,
        stack: Stack,
        family: int,
        local: bytes | None,
        port: int,
        queue_limit: int,
        queue_bytes: int,
    ) -> None:
        self._stack = stack
        self.family = family
        self.local_addr = local
        self.local_port = port
        self.queue_limit = queue_limit
        self.queue_bytes = queue_bytes
        self._queue: collections.deque[tuple[bytes, tuple[str, int]]] = collections.deque()
        self._queued_bytes = 0
        self.error: OSError | None = None
        self.dropped = 0
        self.closed = False

    @property
    def pending(self) -> int:
        return len(self._queue)

    def sendto(
        self, data: bytes | memoryview, address: tuple[Address, int], now: float | None = None
    ) -> None:
        if self.closed:
            raise OSError(errno.EBADF, "UDP socket is closed")
        host, port = address
        dst = ipaddress.ip_address(host)
        if dst.version != self.family:
            raise OSError(errno.EAFNOSUPPORT, f"IPv{self.family} socket cannot send to {host}")
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port}")
        self._stack._udp_send(self, dst.packed, port, data)

    def recvfrom(self) -> tuple[bytes, tuple[str, int]] | None:
        if not self._queue:
            return None
        item = self._queue.popleft()
        self._queued_bytes -= len(item[0])
        return item

    def take_error(self) -> OSError | None:
        err, self.error = self.error, None
        return err

    def _deliver(self, data: bytes, src: bytes, sport: int) -> bool:
        if (
            len(self._queue) >= self.queue_limit
            or self._queued_bytes + len(data) > self.queue_bytes
        ):
            self.dropped += 1
            return False
        self._queue.append((data, (_addr_str(src), sport)))
        self._queued_bytes += len(data)
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._queue.clear()
            self._stack._udp_unbind(self)

    def __repr__(self) -> str:
        return f"UdpSocket(v{self.family}, port={self.local_port}, pending={self.pending})"


class Stack:
    """A host with the given addresses; see the module docstring."""

    def __init__(
        self,
        addresses: Sequence[Interface],
        *,
        mtu: int = 1420,
        tcp_config: TcpConfig | None = None,
        randbytes: Callable[[int], bytes] = os.urandom,
        now: float = 0.0,
        icmp_rate: float = 20.0,
        icmp_burst: float = 20.0,
    ) -> None:
        if isinstance(addresses, (str, ipaddress.IPv4Interface, ipaddress.IPv6Interface)):
            addresses = [addresses]
        ifaces = [ipaddress.ip_interface(a) for a in addresses]
        if not ifaces:
            raise ValueError("a stack needs at least one address")
        self.interfaces = ifaces
        #: TCP sockets that took their path for an MTU black hole (TcpConfig.blackhole_rtos)
        #: since the owner last emptied this list: the runtime confirms and spreads it
        self.blackholes: list[TcpSocket] = []
        #: TCP sockets that saw signs of a black hole on their receiving side
        #: (TcpConfig.rx_stall) since the owner last emptied this list: the runtime may ask
        #: the path (probe_path)
        self.rx_stalls: list[TcpSocket] = []
        #: path probes under way, by echo identifier, and those decided since the owner
        #: last emptied ``probes_done`` (their ``verdict`` set)
        self._probes: dict[int, PathProbe] = {}
        self.probes_done: list[PathProbe] = []
        self._v4 = [i.ip.packed for i in ifaces if i.version == 4]
        self._v6 = [i.ip.packed for i in ifaces if i.version == 6]
        self._local = frozenset(self._v4 + self._v6)
        if mtu < MIN_MTU4 or (self._v6 and mtu < MIN_MTU6) or mtu > 65535:
            raise ValueError(f"MTU {mtu} out of range")
        self.mtu = mtu
        base = tcp_config if tcp_config is not None else TcpConfig(mss=mtu - 40)
        if base.on_blackhole is None:
            base = dataclasses.replace(base, on_blackhole=self.blackholes.append)
        if base.on_rx_stall is None:
            base = dataclasses.replace(base, on_rx_stall=self.rx_stalls.append)
        self._cfg4 = dataclasses.replace(base, mss=mtu - 40)
        self._cfg6 = dataclasses.replace(base, mss=mtu - 60)
        self._randbytes = randbytes
        self._isn_key = randbytes(16)
        self._ts_key = randbytes(16)
        self._now = now
        self.stats = StackStats()
        self._tcp: dict[TcpKey, TcpSocket] = {}
        #: receive_batch's pending run of coalescable segments (empty between calls):
        #: socket, next wire seq, ack, window, tsval, tsecr, last flags, and the segments
        #: as (packet, wire seq, payload start, end)
        self._run: list = []
        #: receive_batch lets sockets defer part of the work of SACK ACKs to their next input
        #: or dispatch (TcpSocket.sack_ack_input) and hold a pure ACK for a newer one of the
        #: batch (ACK coalescing, TcpSocket.fast_input); False: every ACK exactly as one
        #: by one
        self.defer_acks = True
        #: the sockets that may hold a pure ACK: receive_batch's end processes them
        self._holding: dict[TcpSocket, None] = {}
        self._listeners: dict[int, TcpListener] = {}
        self._half_open: dict[TcpSocket, TcpListener] = {}
        self._dirty: dict[TcpSocket, None] = {}  # dicts, not sets: deterministic order
        # UDP sockets that got a datagram or an ICMP error since the last poll (its report)
        self._udp_ready: dict[UdpSocket, None] = {}
        self._deadline: dict[TcpSocket, float] = {}  # cached poll_at() (inf for None)
        # The finite deadlines as a heap, so that poll and next_deadline cost the same with
        # one connection or thousands open (not a walk of every socket): (time, push serial,
        # socket) entries; an entry counts only while _timer_at holds its time for its
        # socket (an older one of the same socket surfaces and is dropped), and that time
        # is at or before the socket's deadline (a deadline that moved later keeps its
        # entry until it surfaces: then it goes back in at the real time).
        self._timers: list[tuple[float, int, TcpSocket]] = []
        self._timer_at: dict[TcpSocket, float] = {}
        self._pushes = itertools.count()
        # registration serials: poll dispatches in this order (deterministic, and the
        # order of the sockets' creation, as a walk of _deadline did)
        self._order: dict[TcpSocket, int] = {}
        self._registered = itertools.count()
        # Ephemeral ports: per destination, the local ports of connections we opened that
        # closed less than RECENT_TUPLE_SECONDS ago -> when they closed, oldest first; and how
        # many connections we opened to it are alive.
        # (OrderedDicts: O(1) access to the oldest entry however many were removed before it)
        self._recent: dict[Destination, collections.OrderedDict[int, float]] = {}
        self._recent_count = 0
        self._recent_sweep_at = now
        self._active: dict[Destination, int] = {}
        self._eph_first = EPHEMERAL_FIRST
        self._eph_count = EPHEMERAL_COUNT
        self._udp: dict[tuple[bytes | int, int], UdpSocket] = {}
        self._pmtu: dict[bytes, int] = {}
        #: remote address -> (SRTT, RTTVAR, when): RTT_CACHE_SECONDS (oldest first)
        self._rtt_cache: dict[bytes, tuple[float, float, float]] = {}
        self._out: list[bytes] = []
        self._segs: list[TcpSegment | TcpTuple | TcpRun] = []
        self._icmp_limiter = icmp.RateLimiter(icmp_rate, icmp_burst, now)

    # ------------------------------------------------------------------ public API

    @property
    def tcp_config(self) -> TcpConfig:
        """The configuration IPv4 sockets are made with (IPv6 ones differ in the MSS)."""
        return self._cfg4

    @property
    def tcp_sockets(self) -> list[TcpSocket]:
        return list(self._tcp.values())

    @property
    def ephemeral_ports(self) -> tuple[int, int]:
        """The (first, last) local ports ``tcp_connect`` picks from, as Linux's
        ip_local_port_range (default 49152-65535, the IANA dynamic range)."""
        return (self._eph_first, self._eph_first + self._eph_count - 1)

    @ephemeral_ports.setter
    def ephemeral_ports(self, value: tuple[int, int]) -> None:
        first, last = value
        if not 0 < first <= last < 65536:
            raise ValueError(f"bad ephemeral port range {first}-{last}")
        self._eph_first = first
        self._eph_count = last - first + 1
        # keep the per-destination counts about the new range only
        for dest in list(self._recent):
            recent = self._recent[dest]
            for port in [p for p in recent if not first <= p <= last]:
                del recent[port]
                self._recent_count -= 1
            if not recent:
                del self._recent[dest]

    def tcp_timestamp_offset(self, local: bytes, remote: bytes) -> int:
        """The TSval offset of every connection between these two addresses (raw bytes).

        A keyed hash of the address pair, as Linux's secure_tcp_ts_off: it hides our clock
        (and uptime) from each peer, while the TSvals a peer sees from us keep growing
        across connections (RFC 7323 §5.4), so a new SYN for a 4-tuple the peer still holds
        in TIME_WAIT carries a newer timestamp and passes PAWS (RFC 6191).
        """
        h = hashlib.blake2s(local + remote, key=self._ts_key, digest_size=4)
        return int.from_bytes(h.digest(), "big")

    def path_mtu(self, remote: Address | bytes) -> int:
        raw = remote if isinstance(remote, bytes) else ipaddress.ip_address(remote).packed
        return self._pmtu.get(raw, self.mtu)

    def tell_remote_path_mtu(self, sock: TcpSocket, mtu: int) -> None:
        """Tell ``sock``'s peer, as a router on the way would, that the path to us carries
        at most ``mtu`` bytes per packet: an ICMP "fragmentation needed" (IPv4, RFC 1191)
        or "packet too big" (IPv6, RFC 8201; at least 1280) quoting a full-sized segment
        it sent us at our RCV.NXT, so its TCP accepts it (RFC 5927 §4.1: the quoted
        sequence number lies in its unacknowledged data) and resends smaller. For a path
        under a tunnel that loses such packets without a word (an MTU black hole): the
        peer's segments of a connection already open could never arrive otherwise."""
        local, remote = sock.local_addr, sock.remote_addr
        ports_seq = _QUOTED_TCP.pack(sock.remote_port, sock.local_port, sock.rcv_nxt)
        if len(remote) == 4:
            quoted = ipv4_header(remote, local, 6, self.mtu - 20) + ports_seq
            message = icmp.build_icmp4(
                icmp.ICMP4_DEST_UNREACH, icmp.UNREACH4_FRAG_NEEDED, max(mtu, MIN_MTU4), quoted
            )
            self._out.append(build_ipv4(local, remote, 1, message))
        else:
            quoted = ipv6_header(remote, local, 6, self.mtu - 40) + ports_seq
            message = icmp.build_icmp6(
                local, remote, icmp.ICMP6_PACKET_TOO_BIG, 0, max(mtu, MIN_MTU6), quoted
            )
            self._out.append(build_ipv6(local, remote, 58, message))
        self.stats.pmtu_told += 1

    def probe_path(
        self, local: bytes, remote: bytes, big: int, small: int, now: float, interval: float
    ) -> PathProbe:
        """Ask the path from our address ``local`` to host ``remote`` whether IP packets of
        ``big`` bytes pass when packets of ``small`` bytes do, with pings
        (:class:`PathProbe`: three rounds ``interval`` seconds apart). The requests go out
        from the next :meth:`poll`; the probe lands in ``probes_done`` with its verdict."""
        idents = self._probes
        ident = int.from_bytes(self._randbytes(2), "big")
        while ident in idents:
            ident = (ident + 1) & 0xFFFF
        probe = PathProbe(local, remote, big, small, ident, now, interval)
        idents[ident] = probe
        self.stats.path_probes += 1
        return probe

    def cancel_probe(self, probe: PathProbe) -> None:
        """Stop ``probe`` (the question was answered otherwise): nothing more goes out for
        it, and it never lands in ``probes_done``."""
        if self._probes.get(probe.ident) is probe:
            del self._probes[probe.ident]

    def _run_probes(self, now: float, out: list[bytes]) -> None:
        for probe in list(self._probes.values()):
            probe.poll(now, out)
            if probe.verdict is not None:
                self._probe_done(probe)

    def _probe_done(self, probe: PathProbe) -> None:
        del self._probes[probe.ident]
        self.probes_done.append(probe)

    def _probe_reply(self, src: bytes, rest: int, length: int | None) -> None:
        """An echo reply from ``src`` with identifier/sequence word ``rest``, an ICMP
        message of ``length`` bytes (None: its first fragment; ``PathProbe.on_reply``)."""
        probe = self._probes.get(rest >> 16)
        if probe is not None and probe.remote == src and probe.on_reply(rest & 0xFFFF, length):
            self.stats.path_probe_replies += 1
            if probe.verdict is not None:
                self._probe_done(probe)

    def receive(
        self, packet: bytes | bytearray | memoryview, now: float, *, authenticated: bool = False
    ) -> None:
        """Process one incoming IP packet (never raises on bad input).

        ``authenticated``: the packet arrived inside an authenticated envelope (a WireGuard
        transport message whose Poly1305 tag covered every byte), so it cannot have been
        corrupted in transit and the TCP checksum need not be verified on the fast path —
        as Linux's WireGuard marks decrypted packets CHECKSUM_UNNECESSARY. It saves a
        bignum sum over the whole segment per packet.

        Nothing keeps a reference to ``packet`` after this returns (data is copied into
        socket buffers), so the caller may reuse its receive buffer.
        """
        self._receive(packet, now, authenticated, None)

    def receive_batch(
        self, packets: list[bytes], now: float, *, authenticated: bool = False
    ) -> None:
        """:meth:`receive` for each packet in order, except that a run of contiguous data
        segments of one TCP connection (in order, or ahead of a hole after a loss: then
        into the reassembly queue at once) whose headers differ only in the sequence number
        (and PSH on the last) reaches the socket as one, as Linux's GRO does for TCP:
        one header-prediction pass for the run instead of one per segment. A bulk
        download through the tunnel arrives as such runs (one batch of datagrams per
        wake-up); the effect on the socket is exactly that of the segments one by one.
        Authenticated segments after a run's first join it after a compare of their header
        bytes with the first one's (below): ~2 instead of ~5 µs per segment.
        """
        run = self._run
        receive = self._receive
        if not authenticated:
            for packet in packets:
                receive(packet, now, False, run)
            if run:
                self._flush_run(run, now)
            if self._holding:
                self._release_held(now)
            return
        # (the first packet goes through _receive: it keeps self._now)
        # A segment whose header equals the run's first segment's in every byte but the
        # IP length/identification/checksum, the TCP sequence number, checksum and PSH, and
        # whose sequence number is the run's next, extends the run right here: it passes
        # each check of _receive/_rx_tcp4/_rx_tcp6/_rx_tcp_fast exactly as the first did
        # (same addresses, ports, so the same socket; same ACK, window, timestamps), and
        # those would append it to the run. Only its own fields are checked: the lengths,
        # the IPv4 header checksum, the sequence number. A PSH ends the run: it goes to its
        # socket at once (as the next packet would make it), and such a segment then starts
        # the next run as those checks would: if the socket is still the one for its
        # addresses and ports and the sequence number is its RCV.NXT. tests/test_tcp_gro.py
        # compares all of it with receive() one by one.
        first = None  # the first segment of the run the t_* locals describe
        t_ip = 0  # its IP header's length (0: no template, every segment via _receive)
        t_addr = t_opt = b""  # its addresses and ports, its timestamp option
        t_tcp = t_psh = b""  # its ack, offset, flags (ACK; ACK|PSH), window
        t_a = t_b = t_c = t_sum = 0  # its IP header's other fixed words; IPv4 address sum
        a0 = a1 = c0 = c1 = o0 = o1 = 0  # where those bytes are (from t_ip)
        t_sock = None  # that run's socket, its key in self._tcp
        t_key: tuple = ()
        t_fields: tuple = ()  # and the run's ack, window, tsval, tsecr
        tcp = self._tcp
        expect = -1  # the sequence number that extends (or starts) a run
        quick = 0
        for packet in packets:
            if run:
                pieces = run[7]
                if pieces[0][0] is not first:
                    first = pieces[0][0]
                    t_ip, t_addr, t_tcp, t_opt, t_a, t_b, t_c, t_sum = _run_template(
                        first, pieces[0][2]
                    )
                    t_psh = t_tcp[:5] + _ACK_PSH + t_tcp[6:]
                    a0, a1 = (12 if t_ip == 20 else 8), t_ip + 4
                    c0, c1, o0, o1 = t_ip + 8, t_ip + 16, t_ip + 20, t_ip + 32
                    t_sock = sock = run[0]
                    t_key = (sock.local_addr, sock.local_port, sock.remote_addr, sock.remote_port)
                    t_fields = tuple(run[2:6])
                    expect = run[1]  # (a run with a template has one ACK segment so far)
            elif t_ip:
                expect = t_sock.rcv_nxt if tcp.get(t_key) is t_sock else -1
            else:
                receive(packet, now, True, run)
                continue
            end = 0
            if (
                t_ip
                and packet[a0:a1] == t_addr
                and packet[o0:o1] == t_opt
                and type(packet) is bytes
                and ((tcp_bytes := packet[c0:c1]) == t_tcp or tcp_bytes == t_psh)
            ):
                if t_ip == 20:
                    vt, total, ident, frag, ttlp, csum, seq = _IP4_RUN.unpack_from(packet)
                    if (
                        seq == expect
                        and 52 < total <= len(packet)
                        and vt == t_a
                        and frag == t_b
                        and ttlp == t_c
                        and not (vt + total + ident + frag + ttlp + csum + t_sum) % 0xFFFF
                    ):
                        end = 52
                else:
                    vtf, plen, nh_hop, seq = _IP6_RUN.unpack_from(packet)
                    total = 40 + plen
                    if seq == expect and 72 < total <= len(packet) and vtf == t_a and nh_hop == t_b:
                        end = 72
            if end:
                expect = (seq + total - end) & M32
                if run:
                    run[1] = expect
                    pieces.append((packet, seq, end, total))
                else:
                    run += (t_sock, expect, *t_fields, ACK, [(packet, seq, end, total)])
                    first = packet
                quick += 1
                if tcp_bytes != t_tcp:  # PSH
                    run[6] = ACK | PSH
                    self._flush_run(run, now)
                continue
            receive(packet, now, True, run)
            if run:  # (which may have grown or ended the run: what comes next)
                expect = run[1] if run[6] == ACK else -1
        self.stats.packets_in += quick
        if run:
            self._flush_run(run, now)
        if self._holding:
            self._release_held(now)

    def _release_held(self, now: float) -> None:
        """The end of a batch: each socket processes the pure ACK it may hold (ACK
        coalescing), so that after :meth:`receive_batch` every socket is as after its
        segments one by one, apart from the RTT and rate samples of ACKs stood in for."""
        for sock in self._holding:
            sock.finish_acks(now)
        self._holding.clear()

    def _receive(
        self,
        packet: bytes | bytearray | memoryview,
        now: float,
        authenticated: bool,
        run: list | None,
    ) -> None:
        """:meth:`receive`; ``run``: :meth:`receive_batch`'s pending run, which a TCP
        segment extends, flushes or starts, and anything else flushes first."""
        if now > self._now:
            self._now = now
        stats = self.stats
        stats.packets_in += 1
        if type(packet) is bytes:
            if len(packet) >= 20 and packet[0] == 0x45 and packet[9] == 6:
                self._rx_tcp4(packet, now, authenticated, run)
                return
            if len(packet) >= 40 and packet[0] >> 4 == 6 and packet[6] == 6:
                self._rx_tcp6(packet, now, authenticated, run)
                return
        if run:
            self._flush_run(run, now)
        buf = memoryview(packet)
        if not buf:
            stats.dropped_malformed += 1
            return
        version = buf[0] >> 4
        if version == 4:
            p = parse_ipv4(buf)
        elif version == 6:
            p = parse_ipv6(buf)
        else:
            stats.dropped_malformed += 1
            return
        if type(p) is not IpPacket:
            if p is ParseError.FRAGMENT and self._probes:
                # (we reassemble none: the first one of a probe's echo reply counts)
                hit = PathProbe.reply_fragment(buf)
                if hit is not None:
                    self._probe_reply(hit[0], hit[1], None)
            self._count(p)  # type: ignore[arg-type]
            return
        if p.dst not in self._local:
            stats.dropped_not_ours += 1
            return
        if p.src in self._local or not _can_reply_to(p.src):
            stats.dropped_martian += 1  # our own, unspecified, multicast or broadcast source
            return
        proto = p.proto
        if proto == PROTO_TCP:
            self._rx_tcp(p, now)
        elif proto == PROTO_UDP:
            self._rx_udp(p, now)
        elif proto == PROTO_ICMP and p.version == 4:
            self._rx_icmp4(p, now)
        elif proto == PROTO_ICMPV6 and p.version == 6:
            self._rx_icmp6(p, now)
        else:
            stats.dropped_proto += 1
            # RFC 1122 §3.2.2.1 / RFC 4443 §3.4: tell the sender (rate-limited).
            if p.version == 4:
                self._send_icmp_error4(p, icmp.ICMP4_DEST_UNREACH, icmp.UNREACH4_PROTOCOL, now)
            elif p.raw[6] == proto:  # no extension headers: the pointer is exact
                self._send_icmp_error6(p, icmp.ICMP6_PARAM_PROBLEM, 1, now, rest=6)

    def poll(
        self,
        now: float,
        out: list[bytes],
        dispatched: list[TcpSocket | UdpSocket] | None = None,
    ) -> None:
        """Append every IP packet due by ``now`` to ``out``; reap closed sockets.

        ``dispatched``: gets every TCP socket this call ran (those the application or
        input touched since the last call, and those whose timers were due), reaped ones
        included, and every socket reaped since the last call without running (closed by
        one segment of a received batch and reaped by the next, which had to find the
        listener); and every UDP socket that got a datagram or an ICMP error since the last
        call. No other socket's state changed since the previous call: a runtime wakes only
        the tasks waiting on these."""
        if now > self._now:
            self._now = now
        if self._udp_ready:
            if dispatched is not None:
                dispatched += self._udp_ready
            self._udp_ready.clear()
        start = len(out)
        if self._out:
            out.extend(self._out)
            self._out.clear()
        dirty = self._dirty
        deadline = self._deadline
        timers = self._timers
        if timers and timers[0][0] <= now:
            self._due(now)  # (adds them to dirty)
        if self._probes:
            self._run_probes(now, out)
        if not dirty:
            if len(timers) > 2 * len(deadline) + 64:
                self._rebuild_timers()
            self.stats.packets_out += len(out) - start
            return
        order = self._order
        # in creation order; one reaped since it was touched (-1: first) has nothing to run,
        # but it is reported all the same: its waiters must look
        socks = list(dirty) if len(dirty) == 1 else sorted(dirty, key=lambda s: order.get(s, -1))
        dirty.clear()
        segs = self._segs
        timer_at = self._timer_at
        reap: list[TcpSocket] | None = None
        for sock in socks:
            if sock not in order:
                continue
            local = sock.local_addr
            sock.dispatch(now, segs, True)
            if segs:
                remote = sock.remote_addr
                self._wrap_tcp_fast(local, remote, segs, out)
                segs.clear()
            if sock.is_closed:
                if reap is None:
                    reap = []
                reap.append(sock)
                continue
            t = sock.poll_at()
            if t is None:
                deadline[sock] = _NEVER
            else:
                deadline[sock] = t
                if t < timer_at.get(sock, _NEVER):
                    timer_at[sock] = t
                    heapq.heappush(timers, (t, next(self._pushes), sock))
        if dispatched is not None:
            dispatched += socks
        if reap:
            self._reap(reap, now)
        if len(timers) > 2 * len(deadline) + 64:
            self._rebuild_timers()
        self.stats.packets_out += len(out) - start

    def _due(self, now: float) -> None:
        """Move the sockets whose deadline is ``now`` or earlier from the heap to ``_dirty``
        (in registration order with the rest at dispatch)."""
        timers = self._timers
        timer_at = self._timer_at
        deadline = self._deadline
        dirty = self._dirty
        while timers and timers[0][0] <= now:
            t, _, sock = heapq.heappop(timers)
            if timer_at.get(sock) != t:
                continue  # superseded by an earlier entry, or reaped
            del timer_at[sock]
            d = deadline[sock]
            if d <= now:
                dirty[sock] = None
            elif d != _NEVER:  # the deadline moved later: back in at its time
                timer_at[sock] = d
                heapq.heappush(timers, (d, next(self._pushes), sock))

    def _rebuild_timers(self) -> None:
        """Drop the superseded entries (they pile up while deadlines keep moving earlier):
        after any poll the heap holds at most two entries per socket, plus 64."""
        pushes = self._pushes
        self._timers = [(t, next(pushes), sock) for sock, t in self._timer_at.items()]
        heapq.heapify(self._timers)

    def retransmit_now(self, to: Callable[[bytes], bool] | None = None) -> int:
        """The path to some remotes works again (e.g. a new WireGuard session came up): every
        TCP socket waiting out a backed-off retransmission timer towards a remote address for
        which ``to(address)`` is true (all when None) retransmits at the next :meth:`poll`
        (see :meth:`TcpSocket.retransmit_now`). Returns how many sockets will."""
        kicked = 0
        for sock in self._tcp.values():
            if (to is None or to(sock.remote_addr)) and sock.retransmit_now():
                self._dirty[sock] = None
                kicked += 1
        return kicked

    def pause_ended(self, now: float, paused: float) -> int:
        """The stack was not run for at least ``paused`` seconds before ``now`` (the machine
        slept, the process was stopped), and what arrived meanwhile waited in the sockets'
        buffers: every TCP socket takes no RTT sample from what it sent before ``now``,
        starts the timers that came due meanwhile over and does not count the pause
        towards its user timeout (``TcpSocket.pause_ended``). Returns how many sockets
        started a timer over."""
        moved = 0
        for sock in self._tcp.values():
            if sock.pause_ended(now, paused):
                self._dirty[sock] = None  # (its deadline moved: dispatch puts it right)
                moved += 1
        return moved

    @property
    def pending(self) -> bool:
        """:meth:`poll` has work now: a socket was touched or a packet is queued."""
        return bool(self._out or self._dirty)

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`poll` has work (a time in the past means "now")."""
        if self._out or self._dirty:
            return self._now
        t = self._next_socket_deadline()
        if self._probes:
            for probe in self._probes.values():
                d = probe.deadline
                if d is not None and (t is None or d < t):
                    t = d
        return t

    def _next_socket_deadline(self) -> float | None:
        timers = self._timers
        timer_at = self._timer_at
        deadline = self._deadline
        while timers:
            t, _, sock = timers[0]
            if timer_at.get(sock) != t:
                heapq.heappop(timers)  # superseded, or reaped
                continue
            d = deadline[sock]
            if d == t:
                return t
            # the deadline moved later (or away) since the entry went in: put it right
            if d == _NEVER:
                heapq.heappop(timers)
                del timer_at[sock]
            else:
                timer_at[sock] = d
                heapq.heapreplace(timers, (d, next(self._pushes), sock))
        return None

    def tcp_connect(
        self,
        remote: Address,
        port: int,
        now: float,
        *,
        local: Address | None = None,
        path_rtt: float | None = None,
    ) -> TcpSocket:
        """Open a connection to ``remote``:``port`` (SYN goes out on the next :meth:`poll`).

        ``path_rtt``: a lower bound for the round trip to ``remote`` (the runtime's: its
        last WireGuard handshake with the peer that routes it). With no RTT measured to
        ``remote`` (:meth:`known_rto`), the SYN's timeout is the RTO a first sample that
        long gives (RFC 6298 §2.2: three times it), not the initial RTO's 1 s: a lost SYN
        or SYN-ACK to a new destination costs a few of the path's round trips. A farther
        destination only gets its SYN twice (a timeout that short neither counts against
        ``syn_retries`` nor, unless timestamps show a loss, shrinks the initial window)."""
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port}")
        # (an address object as it is: ip_address() would format and parse it again)
        raddr = remote if isinstance(remote, _IP_TYPES) else ipaddress.ip_address(remote)
        remote_b = raddr.packed
        local_b = self._pick_local(raddr.version, local)
        lport = self._ephemeral_port(local_b, remote_b, port, now)
        key = (local_b, lport, remote_b, port)
        cfg = self._cfg4 if raddr.version == 4 else self._cfg6
        pmtu = self._pmtu.get(remote_b)
        if pmtu is not None:  # a narrower path: offer an MSS that fits it (RFC 9293 §3.7.1)
            cfg = dataclasses.replace(
                cfg, mss=min(cfg.mss, pmtu - (40 if len(remote_b) == 4 else 60))
            )
        sock = TcpSocket(
            cfg,
            local_b,
            lport,
            remote_b,
            port,
            isn=self._isn(key, now),
            now=now,
            randbytes=self._randbytes,
            ts_offset=self.tcp_timestamp_offset(local_b, remote_b),
            on_touched=self._touched,
            syn_rto=self._syn_rto(remote_b, now, path_rtt),
        )
        dest = (local_b, remote_b, port)
        self._active[dest] = self._active.get(dest, 0) + 1
        self._adopt(key, sock)
        sock.connect(now)
        return sock

    def _syn_rto(self, remote: bytes, now: float, path_rtt: float | None) -> float | None:
        """A new connection's SYN timeout: from the RTT known to ``remote``, else from the
        path's lower bound (``tcp_connect``), else None (the initial RTO)."""
        known = self.known_rto(remote, now)
        if known is None and path_rtt is not None:
            return 3 * path_rtt  # (the socket clamps it to its RTO bounds)
        return known

    def known_rto(self, remote: bytes, now: float) -> float | None:
        """The RTO (RFC 6298 §2.3) that the RTT measured to ``remote`` gives, for a new
        connection's SYN (RFC 9040 §8): from a connection to it that ended within
        RTT_CACHE_SECONDS, else from one still open (ensemble sharing); None if none has
        measured one. A lost SYN or SYN-ACK then costs this, not the initial RTO's 1 s (a
        lossy path to a host a client talks to often: a browser's, or mitmproxy's
        connections to one API); a SYN-ACK slower than that only sends the SYN twice."""
        entry = self._rtt_cache.get(remote)
        if entry is not None and now - entry[2] > RTT_CACHE_SECONDS:
            del self._rtt_cache[remote]
            entry = None
        if entry is None:
            for sock in self._tcp.values():
                if sock.remote_addr == remote and sock.srtt is not None:
                    entry = (sock.srtt, sock._rtt.rttvar, now)
                    break
            else:
                return None
        srtt, rttvar, _ = entry
        return srtt + max(0.001, 4 * rttvar)  # (the socket clamps it to its RTO bounds)

    def _remember_rtt(self, sock: TcpSocket, now: float) -> None:
        """RFC 9040 §8.1: an ending connection's RTT for the next one to its address."""
        srtt = sock.srtt
        if srtt is None:
            return
        cache = self._rtt_cache
        remote = sock.remote_addr
        cache.pop(remote, None)  # (re-inserted last: the dict stays oldest-first)
        cache[remote] = (srtt, sock._rtt.rttvar, now)
        if len(cache) > RTT_CACHE_SIZE:
            del cache[next(iter(cache))]

    def tcp_listen(
        self, port: int, *, backlog: int = 128, local: Address | None = None
    ) -> TcpListener:
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port}")
        if port in self._listeners:
            raise OSError(errno.EADDRINUSE, f"TCP port {port} is already listening")
        local_b = None
        if local is not None:
            local_b = ipaddress.ip_address(local).packed
            if local_b not in self._local:
                raise OSError(errno.EADDRNOTAVAIL, f"{local} is not an address of this stack")
        lst = TcpListener(self, port, local_b, backlog)
        self._listeners[port] = lst
        return lst

    def udp_bind(
        self,
        port: int = 0,
        *,
        family: int | None = None,
        local: Address | None = None,
        queue_limit: int = 256,
        queue_bytes: int = 1 << 20,
    ) -> UdpSocket:
        """Bind a UDP socket to ``port`` (0: ephemeral) on one family or one local address."""
        local_b: bytes | None = None
        if local is not None:
            addr = ipaddress.ip_address(local)
            local_b = addr.packed
            if local_b not in self._local:
                raise OSError(errno.EADDRNOTAVAIL, f"{local} is not an address of this stack")
            family = addr.version
        if family is None:
            family = 4 if self._v4 else 6
        if family not in (4, 6):
            raise ValueError("family must be 4 or 6")
        if not (self._v4 if family == 4 else self._v6):
            raise OSError(errno.EADDRNOTAVAIL, f"this stack has no IPv{family} address")
        if port == 0:
            start = int.from_bytes(self._randbytes(2), "big")
            for i in range(EPHEMERAL_COUNT):
                cand = EPHEMERAL_FIRST + (start + i) % EPHEMERAL_COUNT
                if not self._udp_port_taken(family, local_b, cand):
                    port = cand
                    break
            else:
                raise OSError(errno.EADDRINUSE, "no free UDP port")
        elif not 0 < port < 65536:
            raise ValueError(f"bad port {port}")
        elif self._udp_port_taken(family, local_b, port):
            raise OSError(errno.EADDRINUSE, f"UDP port {port} is in use")
        sock = UdpSocket(self, family, local_b, port, queue_limit, queue_bytes)
        self._udp[(local_b if local_b is not None else family, port)] = sock
        return sock

    # ------------------------------------------------------------------ internals

    def _count(self, err: ParseError) -> None:
        name = _PARSE_COUNTER[err]
        setattr(self.stats, name, getattr(self.stats, name) + 1)

    def local_address(self, version: int) -> bytes | None:
        """The address our packets to an IPv``version`` host come from (None: no such)."""
        candidates = self._v4 if version == 4 else self._v6
        return candidates[0] if candidates else None

    def _pick_local(self, version: int, local: Address | None) -> bytes:
        if local is not None:
            addr = ipaddress.ip_address(local)
            if addr.packed not in self._local or addr.version != version:
                raise OSError(errno.EADDRNOTAVAIL, f"cannot use {local} as source")
            return addr.packed
        addr = self.local_address(version)
        if addr is None:
            raise OSError(errno.EADDRNOTAVAIL, f"this stack has no IPv{version} address")
        return addr

    def _isn(self, key: TcpKey, now: float) -> int:
        local, lport, remote, rport = key
        h = hashlib.blake2s(
            local + remote + lport.to_bytes(2, "big") + rport.to_bytes(2, "big"),
            key=self._isn_key,
            digest_size=4,
        )
        return (int(now * 250_000) + int.from_bytes(h.digest(), "big")) & 0xFFFFFFFF

    def _ephemeral_port(self, local: bytes, remote: bytes, rport: int, now: float) -> int:
        """A local port for a new connection to ``remote``:``rport`` from ``local``.

        Random (RFC 6056 §3.3.1's random probing, with a random odd stride through the range
        so the probes visit every port once), skipping 4-tuples in use and, while any other
        port is free, 4-tuples closed less than RECENT_TUPLE_SECONDS ago: the peer may still
        hold them in TIME_WAIT. When every port to this destination is taken, the tuple
        closed longest ago is reused: our SYN then carries a newer timestamp than anything
        that TIME_WAIT saw (per-pair offsets) and a larger ISN (RFC 6528 clock), which is
        what RFC 6191 (and RFC 9293 §3.6.1 for sequence numbers) lets a TIME_WAIT accept.
        """
        if now >= self._recent_sweep_at and self._recent_count > RECENT_SWEEP_ABOVE:
            self._sweep_recent(now)
        dest = (local, remote, rport)
        recent = self._recent.get(dest)
        if recent is not None:
            horizon = now - RECENT_TUPLE_SECONDS
            while recent:  # oldest first
                port = next(iter(recent))
                if recent[port] > horizon:
                    break
                del recent[port]
                self._recent_count -= 1
            if not recent:
                del self._recent[dest]
                recent = None
        first = self._eph_first
        count = self._eph_count
        tcp = self._tcp
        listeners = self._listeners
        taken = self._active.get(dest, 0) + (len(recent) if recent is not None else 0)
        if taken < count:
            r = int.from_bytes(self._randbytes(4), "big")
            start = r % count
            step = ((r >> 16) % count) | 1
            while math.gcd(step, count) != 1:
                step += 2
            for i in range(count):
                port = first + (start + i * step) % count
                if (
                    (local, port, remote, rport) in tcp
                    or port in listeners
                    or (recent is not None and port in recent)
                ):
                    continue
                return port
        if recent is not None:
            for port in recent:
                if (local, port, remote, rport) not in tcp and port not in listeners:
                    del recent[port]
                    self._recent_count -= 1
                    if not recent:
                        del self._recent[dest]
                    self.stats.tcp_port_reuses += 1
                    return port
        raise OSError(
            errno.EADDRNOTAVAIL,
            f"no free local port for another connection to {format_endpoint((_addr_str(remote), rport))} "
            f"(ports {first}-{first + count - 1} all in use)",
        )

    def _sweep_recent(self, now: float) -> None:
        """Forget every tuple closed longer than RECENT_TUPLE_SECONDS ago."""
        horizon = now - RECENT_TUPLE_SECONDS
        total = 0
        for dest in list(self._recent):
            recent = self._recent[dest]
            expired = [p for p, closed in recent.items() if closed <= horizon]
            for p in expired:
                del recent[p]
            if recent:
                total += len(recent)
            else:
                del self._recent[dest]
        self._recent_count = total
        self._recent_sweep_at = now + RECENT_TUPLE_SECONDS / 4

    def _register(self, key: TcpKey, sock: TcpSocket) -> None:
        self._tcp[key] = sock
        now = self._now
        self._deadline[sock] = now
        self._timer_at[sock] = now
        heapq.heappush(self._timers, (now, next(self._pushes), sock))
        self._order[sock] = next(self._registered)
        self._dirty[sock] = None

    def _reap(self, socks: Iterable[TcpSocket], now: float) -> None:
        stats = self.stats
        for sock in socks:
            local, lport, remote, rport = key = (
                sock.local_addr,
                sock.local_port,
                sock.remote_addr,
                sock.remote_port,
            )
            del self._tcp[key]
            del self._deadline[sock]
            del self._order[sock]
            self._timer_at.pop(sock, None)  # (its heap entries surface as superseded)
            sstats = sock.stats
            stats.tcp_syn_timeouts += sstats.syn_timeouts
            stats.tcp_syn_fast_retries += sstats.syn_fast_retries
            self._remember_rtt(sock, now)
            if not sock._passive:
                dest = (local, remote, rport)
                n = self._active.get(dest, 0) - 1
                if n > 0:
                    self._active[dest] = n
                else:
                    self._active.pop(dest, None)
                # remember the tuple (its closing time last, so the dict stays oldest-first)
                recent = self._recent.get(dest)
                if recent is None:
                    recent = self._recent[dest] = collections.OrderedDict()
                    self._recent_count += 1
                elif lport in recent:
                    recent.move_to_end(lport)
                else:
                    self._recent_count += 1
                recent[lport] = now
            lst = self._half_open.pop(sock, None)
            if lst is not None:
                lst._half_open.pop(sock, None)

    @staticmethod
    def _wrap_tcp(local: bytes, remote: bytes, seg: TcpSegment) -> bytes:
        """IP header + TCP header + payload, joined in a single copy."""
        header, payload = build_tcp_parts(seg, local, remote)
        n = len(header) + len(payload)
        if len(local) == 4:
            return b"".join((ipv4_header(local, remote, PROTO_TCP, n), header, payload))
        return b"".join((ipv6_header(local, remote, PROTO_TCP, n), header, payload))

    @staticmethod
    def _wrap_tcp_fast(
        local: bytes,
        remote: bytes,
        segs: list[TcpSegment | TcpTuple | TcpRun],
        out: list[bytes],
    ) -> None:
        """:meth:`_wrap_tcp` for a list of segments (same bytes), appended to ``out``.

        ``segs`` may also hold the :data:`~mitm_wg.net.tcp_wire.TcpTuple` and
        :data:`~mitm_wg.net.tcp_wire.TcpRun` encodings of ``TcpSocket.dispatch(...,
        tuples=True)`` (segments whose only option is the timestamp), built as
        ``TcpSegment.segments_of`` of them would be.

        A segment whose only option is the timestamp (every data segment and ACK once a
        connection is established) gets its IP and TCP headers from one struct pack, with
        the checksums from integer arithmetic on the fields (2**16 = 1 mod 0xFFFF, so 32-bit
        fields need not be split into words; the IPv4 and IPv6 pseudo-headers have the same
        sum) plus one sum over the payload.
        """
        ip4 = len(local) == 4
        addr_sum = int.from_bytes(local + remote, "big")
        ip_const = _IP4_CONST_SUM + addr_sum
        tcp_const = addr_sum + PROTO_TCP + _TS_OPT_SUM
        for seg in segs:
            opts = b""  # after the timestamp: SACK blocks (an ACK during a loss)
            off = 0x80  # data offset byte: a 32-byte header
            osum = 0  # the sum of opts' words
            if type(seg) is tuple:
                sport, dport, seq, ack, flags, window, tsval, tsecr, payload = seg
                # a TcpRun's payloads, or a TcpTuple's one
                payloads = payload if type(payload) is list else (payload,)
            else:
                ts = seg.timestamp
                blocks = seg.sack_blocks
                if (
                    ts is None
                    or len(blocks) > 3
                    or seg.mss is not None
                    or seg.wscale is not None
                    or seg.sack_permitted
                ):
                    header, payload = build_tcp_parts(seg, local, remote)
                    n = len(header) + len(payload)
                    ip_header = ipv4_header if ip4 else ipv6_header
                    out.append(b"".join((ip_header(local, remote, PROTO_TCP, n), header, payload)))
                    continue
                sport, dport, flags, window = seg.src_port, seg.dst_port, seg.flags, seg.window
                seq = seg.seq & 0xFFFFFFFF
                ack = seg.ack & 0xFFFFFFFF
                tsval, tsecr = ts
                payloads = (seg.payload,)
                if blocks:
                    # NOP NOP SACK (RFC 2018 §3) as build_tcp_parts lays it out
                    kind_len = 0x0500 | (2 + 8 * len(blocks))
                    edges = [e for b in blocks for e in b]
                    opts = _SACK_OPTION[len(blocks)].pack(0x0101, kind_len, *edges)
                    off = (32 + len(opts)) << 2
                    osum = 0x0101 + kind_len + sum(edges)
            hlen = 32 + len(opts)
            # what the segments of a run share (a single segment is a run of one), summed
            # once; each adds its sequence number, length and payload sum
            shared = (
                tcp_const + hlen + sport + dport + ack + (off << 8) + osum + flags + window
                + tsval + tsecr
            )  # fmt: skip
            for payload in payloads:
                plen = len(payload)
                csum = shared + plen + seq
                if plen:
                    csum += ones_sum(payload)
                csum %= 0xFFFF
                csum = (~csum) & 0xFFFF if csum else 0xFFFF
                tcp_len = hlen + plen
                if ip4:
                    total = 20 + tcp_len
                    if total > 0xFFFF:
                        raise ValueError("IPv4 payload too long")
                    ip_csum = (ip_const + total) % 0xFFFF
                    ip_csum = (~ip_csum) & 0xFFFF if ip_csum else 0xFFFF
                    # fmt: off
                    header = _IP4_TCP_TS.pack(
                        0x45, 0, total, 0, 0x4000, DEFAULT_TTL, PROTO_TCP, ip_csum, local,
                        remote, sport, dport, seq, ack, off, flags, window,
                        csum, 0, 1, 1, 8, 10, tsval, tsecr,
                    )
                    # fmt: on
                else:
                    if tcp_len > 0xFFFF:
                        raise ValueError("IPv6 payload too long")
                    # fmt: off
                    header = _IP6_TCP_TS.pack(
                        _IP6_VERSION_WORD, tcp_len, PROTO_TCP, DEFAULT_TTL, local, remote,
                        sport, dport, seq, ack, off, flags, window,
                        csum, 0, 1, 1, 8, 10, tsval, tsecr,
                    )
                    # fmt: on
                if opts:
                    out.append(b"".join((header, opts, payload)))
                else:
                    out.append(header + payload if plen else header)
                seq = (seq + plen) & 0xFFFFFFFF

    def _emit_ip(self, src: bytes, dst: bytes, proto: int, payload: bytes) -> None:
        if len(src) == 4:
            self._out.append(build_ipv4(src, dst, proto, payload))
        else:
            self._out.append(build_ipv6(src, dst, proto, payload))

    # TCP -------------------------------------------------------------------------------

    def _rx_tcp(self, p: IpPacket, now: float) -> None:
        stats = self.stats
        buf = p.payload
        n = len(buf)
        if n < 20:
            stats.dropped_malformed += 1
            return
        # bytes(): int.from_bytes is much faster on bytes than on a memoryview.
        if (ones_sum(bytes(buf)) + pseudo_header_sum(p.src, p.dst, PROTO_TCP, n)) % 0xFFFF:
            stats.dropped_checksum += 1
            return
        seg = parse_tcp(buf)
        if seg is None:
            stats.dropped_malformed += 1
            return
        self._tcp_segment(p.src, p.dst, seg, now)

    def _flush_run(self, run: list, now: float) -> None:
        """Feed the pending run of :meth:`receive_batch` to its socket and clear it. Every
        segment in it but the last has exactly ACK for flags (a PSH ends a run)."""
        sock, _next, wack, window, tsval, tsecr, flags, pieces = run
        run.clear()
        if len(pieces) > 1:
            lens = [total - end for _p, _w, end, total in pieces]
            payload = b"".join([p[end:total] for p, _w, end, total in pieces])
            size = (len(pieces), lens[0], lens[-1], max(lens))
            if sock.fast_input(pieces[0][1], wack, flags, window, tsval, tsecr, payload, now, size):
                self._processed(sock)
                return
            # Not the plain case after all (the window ran out, ...): one by one.
        last = pieces[-1]
        for piece in pieces:
            packet, wseq, end, total = piece
            if sock.fast_input(
                wseq,
                wack,
                flags if piece is last else ACK,
                window,
                tsval,
                tsecr,
                memoryview(packet)[end:total],
                now,
            ):
                self._processed(sock)
            else:
                # (every segment of a run has the 32-byte header: the timestamp alone)
                ip = end - 32
                self._rx_tcp_slow(packet, ip, total, sock.remote_addr, sock.local_addr, now)

    def _rx_tcp_slow(
        self, packet: bytes, ip: int, total: int, src: bytes, dst: bytes, now: float
    ) -> None:
        """The general path for a checked segment at ``packet[ip:total]``."""
        seg = parse_tcp(memoryview(packet)[ip:total])
        if seg is None:
            self.stats.dropped_malformed += 1
            return
        self._tcp_segment(src, dst, seg, now)

    def _rx_tcp4(
        self, packet: bytes, now: float, authenticated: bool = False, run: list | None = None
    ) -> None:
        """An IPv4 packet with a 20-byte header carrying TCP: :meth:`receive` + :meth:`_rx_tcp`
        with the same checks and counters, without building an IpPacket, and without a
        TcpSegment for the segments :meth:`TcpSocket.fast_input` and
        :meth:`TcpSocket.sack_ack_input` accept. ``run``: the pending run of
        :meth:`receive_batch`, which this segment extends, flushes or starts."""
        stats = self.stats
        n = len(packet)
        vihl, tos, total, ident, frag, ttl, proto, csum, src, dst = _IP4_HDR.unpack_from(packet)
        if total < 20 or total > n:
            stats.dropped_malformed += 1
            return
        addr_sum = int.from_bytes(packet[12:20], "big")
        if (
            ((vihl << 8) | tos) + total + ident + frag + ((ttl << 8) | proto) + csum + addr_sum
        ) % 0xFFFF:
            stats.dropped_checksum += 1
            return
        if frag & 0x3FFF:
            stats.dropped_fragment += 1
            return
        local = self._local
        if dst not in local:
            stats.dropped_not_ours += 1
            return
        if src in local or src[0] == 0 or src[0] >= 224:
            stats.dropped_martian += 1
            return
        tlen = total - 20
        if tlen < 20:
            stats.dropped_malformed += 1
            return
        # The header's words sum to 0 (mod 0xFFFF) when its checksum is right, so the sum of
        # the whole packet is the TCP segment's sum: one int.from_bytes, no slicing copy.
        if not authenticated:
            whole = packet if total == n else packet[:total]
            if total & 1:
                whole += b"\0"
            if (int.from_bytes(whole, "big") + addr_sum + PROTO_TCP + tlen) % 0xFFFF:
                stats.dropped_checksum += 1
                return
        self._rx_tcp_fast(packet, 20, total, src, dst, now, run)

    def _rx_tcp6(
        self, packet: bytes, now: float, authenticated: bool = False, run: list | None = None
    ) -> None:
        """An IPv6 packet without extension headers carrying TCP: what :meth:`receive` +
        :meth:`_rx_tcp` do, with the same checks and counters in the same order, without an
        IpPacket, as :meth:`_rx_tcp4`."""
        stats = self.stats
        plen = _IP6_PLEN.unpack_from(packet, 4)[0]
        total = 40 + plen
        if plen == 0 or total > len(packet):
            stats.dropped_malformed += 1
            return
        src = packet[8:24]
        dst = packet[24:40]
        local = self._local
        if dst not in local:
            stats.dropped_not_ours += 1
            return
        if src in local or src[0] == 0xFF or not any(src):
            stats.dropped_martian += 1
            return
        if plen < 20:
            stats.dropped_malformed += 1
            return
        if not authenticated:
            seg = packet[40:total]
            if plen & 1:
                seg += b"\0"
            if (
                int.from_bytes(seg, "big") + int.from_bytes(packet[8:40], "big") + PROTO_TCP + plen
            ) % 0xFFFF:
                stats.dropped_checksum += 1
                return
        self._rx_tcp_fast(packet, 40, total, src, dst, now, run)

    def _rx_tcp_fast(
        self,
        packet: bytes,
        ip: int,
        total: int,
        src: bytes,
        dst: bytes,
        now: float,
        run: list | None,
    ) -> None:
        """The TCP part of :meth:`_rx_tcp4` and :meth:`_rx_tcp6`: the segment at
        ``packet[ip:total]``, whose IP header and checksum were checked."""
        sport, dport, wseq, wack, off, flags, window, _c, _u = _TCP_HDR.unpack_from(packet, ip)
        hlen = (off >> 4) << 2
        if hlen == 32 and total - ip >= 32 and packet[ip + 20 : ip + 24] == _NOP_NOP_TS:
            tsval, tsecr = _TS_VALUES.unpack_from(packet, ip + 24)
        elif hlen == 20:
            tsval = None
            tsecr = 0
        else:
            # A pure ACK with a timestamp and SACK blocks (nearly every ACK of a lossy
            # upload): TcpSocket.sack_ack_input, without a TcpSegment, if the socket agrees.
            sack = _SACK_ACK.get(hlen) if flags == ACK and total - ip == hlen else None
            if sack is not None:
                sock = self._tcp.get((dst, dport, src, sport))
                if sock is not None:
                    v = sack[0].unpack_from(packet, ip + 20)
                    if v[0] == _NOP_NOP_TS and v[3] == sack[1]:
                        blocks = tuple(zip(v[4::2], v[5::2], strict=True))
                        if run:
                            self._flush_run(run, now)  # (the run's segments came first)
                        # in a batch, more ACKs may follow: the socket may defer part of
                        # the work to its next input or dispatch (TcpSocket.finish_acks;
                        # _processed marks it for the poll after the batch)
                        defer = run is not None and self.defer_acks
                        if sock.sack_ack_input(
                            wseq, wack, window, v[1], v[2], blocks, now, defer, defer
                        ):
                            if defer:  # (it may hold the ACK for a newer one)
                                self._holding[sock] = None
                            self._processed(sock)
                            return
            hlen = 0  # other options: parse them fully
        if hlen:
            sock = self._tcp.get((dst, dport, src, sport))
            if sock is not None:
                end = ip + hlen
                if run is not None:
                    if end < total and tsval is not None and flags & ~PSH == ACK:
                        if (
                            run
                            and run[0] is sock
                            and run[1] == wseq
                            and run[2] == wack
                            and run[3] == window
                            and run[4] == tsval
                            and run[5] == tsecr
                            and not run[6] & PSH
                        ):
                            run[1] = (wseq + total - end) & M32
                            run[6] = flags
                            run[7].append((packet, wseq, end, total))
                            return
                        if run:
                            self._flush_run(run, now)
                        if (wseq - sock.rcv_nxt) & M32 < _HALF:  # (in order, or ahead of it)
                            run += (
                                sock,
                                (wseq + total - end) & M32,
                                wack,
                                window,
                                tsval,
                                tsecr,
                                flags,
                                [(packet, wseq, end, total)],
                            )
                            return
                    elif run:
                        self._flush_run(run, now)
                # a pure ACK in a batch: the socket may hold it for a newer one (ACK
                # coalescing, TcpSocket.fast_input); the batch's end processes what is held
                hold = end == total and run is not None and self.defer_acks
                if sock.fast_input(
                    wseq,
                    wack,
                    flags,
                    window,
                    tsval,
                    tsecr,
                    memoryview(packet)[end:total] if end < total else b"",
                    now,
                    hold=hold,
                ):
                    if hold:
                        self._holding[sock] = None
                    self._processed(sock)
                    return
        if run:
            self._flush_run(run, now)
        self._rx_tcp_slow(packet, ip, total, src, dst, now)

    def _touched(self, sock: TcpSocket) -> None:
        """``TcpSocket``'s ``on_touched`` hook: the application called it (send, shutdown,
        close, abort, or a recv that made a window update due), so the next :meth:`poll`
        dispatches it."""
        self._dirty[sock] = None

    def _processed(self, sock: TcpSocket) -> None:
        """Bookkeeping after ``sock`` processed a segment."""
        self._dirty[sock] = None
        lst = self._half_open.get(sock)
        if lst is not None and sock.state is not TcpState.SYN_RECEIVED:
            del self._half_open[sock]
            lst._half_open.pop(sock, None)
            if not sock.is_closed and sock.state is not TcpState.CLOSED:
                lst._ready.append(sock)

    def _tcp_segment(self, src: bytes, dst: bytes, seg: TcpSegment, now: float) -> None:
        """A checksummed, parsed segment from ``src`` to our address ``dst``."""
        stats = self.stats
        key = (dst, seg.dst_port, src, seg.src_port)
        sock = self._tcp.get(key)
        flags = seg.flags
        if sock is not None:
            st = sock.state
            if st is TcpState.TIME_WAIT:
                lst = self._listeners.get(seg.dst_port)
                if (
                    lst is not None
                    and flags & (SYN | ACK | RST) == SYN
                    and (lst.local_addr is None or lst.local_addr == dst)
                    and not lst.full
                    and sock.time_wait_accepts_syn(seg)
                ):
                    # RFC 6191: a new incarnation of a connection we hold in TIME_WAIT (its
                    # SYN has a newer timestamp or a higher sequence number): end the old
                    # one and let the listener take the SYN.
                    sock.abort(now)
                    self._reap([sock], now)
                    stats.tcp_time_wait_reopens += 1
                    sock = None
            elif st is TcpState.CLOSED and sock.is_closed:
                # Closed by an earlier packet of this batch (a RST ending our TIME_WAIT, say)
                # and not reaped yet: the SYN the peer sent right behind its RST must find
                # the listener, not this corpse.
                self._reap([sock], now)
                sock = None
            if sock is not None:
                sock.process(seg, now)
                self._processed(sock)
                return
        if flags & RST:
            stats.no_socket += 1
            return
        if flags & SYN and not flags & ACK and seg.dst_port != 0 and seg.src_port != 0:
            lst = self._listeners.get(seg.dst_port)
            if lst is not None and (lst.local_addr is None or lst.local_addr == dst):
                if lst.full:
                    stats.syn_backlog_full += 1
                    return
                self._accept_syn(lst, key, seg, now)
                return
        stats.no_socket += 1
        self._send_rst(src, dst, seg)

    def _adopt(self, key: TcpKey, sock: TcpSocket) -> None:
        """Register a new socket: learned path MTU, demux entry."""
        remote = key[2]
        pmtu = self._pmtu.get(remote)
        if pmtu is not None:
            sock.set_path_mtu_mss(pmtu - (40 if len(remote) == 4 else 60))
        self._register(key, sock)

    def _accept_syn(self, lst: TcpListener, key: TcpKey, seg: TcpSegment, now: float) -> None:
        local, lport, remote, rport = key
        v4 = len(local) == 4
        sock = TcpSocket.from_syn(
            self._cfg4 if v4 else self._cfg6,
            local,
            lport,
            remote,
            rport,
            seg,
            isn=self._isn(key, now),
            now=now,
            randbytes=self._randbytes,
            ts_offset=self.tcp_timestamp_offset(local, remote),
            on_touched=self._touched,
        )
        self._adopt(key, sock)
        self._half_open[sock] = lst
        lst._half_open[sock] = None

    def _send_rst(self, src: bytes, dst: bytes, seg: TcpSegment) -> None:
        """RFC 9293 §3.10.7.1: the reset for a segment that matches no connection."""
        if seg.flags & ACK:
            rst = TcpSegment(seg.dst_port, seg.src_port, seg.ack, 0, RST)
        else:
            rst = TcpSegment(
                seg.dst_port, seg.src_port, 0, (seg.seq + seg.seg_len()) & 0xFFFFFFFF, RST | ACK
            )
        self._out.append(self._wrap_tcp(dst, src, rst))
        self.stats.rst_sent += 1

    # UDP -------------------------------------------------------------------------------

    def _udp_port_taken(self, family: int, local: bytes | None, port: int) -> bool:
        if local is not None:
            return (local, port) in self._udp or (family, port) in self._udp
        if (family, port) in self._udp:
            return True
        addrs = self._v4 if family == 4 else self._v6
        return any((a, port) in self._udp for a in addrs)

    def _udp_unbind(self, sock: UdpSocket) -> None:
        key = (sock.local_addr if sock.local_addr is not None else sock.family, sock.local_port)
        if self._udp.get(key) is sock:
            del self._udp[key]
        self._udp_ready.pop(sock, None)

    def _udp_send(self, sock: UdpSocket, dst: bytes, port: int, data: bytes | memoryview) -> None:
        src = sock.local_addr
        if src is None:
            src = self._v4[0] if sock.family == 4 else self._v6[0]
        hdr = 28 if sock.family == 4 else 48
        if len(data) + hdr > self._pmtu.get(dst, self.mtu):
            raise OSError(errno.EMSGSIZE, "datagram larger than the path MTU")
        self._emit_ip(src, dst, PROTO_UDP, build_udp(src, dst, sock.local_port, port, data))

    def _udp_lookup(self, local: bytes, port: int) -> UdpSocket | None:
        sock = self._udp.get((local, port))
        if sock is None:
            sock = self._udp.get((4 if len(local) == 4 else 6, port))
        return sock

    def _rx_udp(self, p: IpPacket, now: float) -> None:
        d = parse_udp(p.payload, p.src, p.dst)
        if type(d) is ParseError:
            self._count(d)
            return
        sock = self._udp_lookup(p.dst, d.dst_port)  # type: ignore[union-attr]
        if sock is None:
            self.stats.no_socket += 1
            if len(p.dst) == 4:
                self._send_icmp_error4(p, icmp.ICMP4_DEST_UNREACH, icmp.UNREACH4_PORT, now)
            else:
                self._send_icmp_error6(p, icmp.ICMP6_DEST_UNREACH, icmp.UNREACH6_PORT, now)
            return
        if sock._deliver(bytes(d.payload), p.src, d.src_port):  # type: ignore[union-attr]
            self._udp_ready[sock] = None
        else:
            self.stats.udp_queue_full += 1

    # ICMP ------------------------------------------------------------------------------

    def _send_icmp_error4(self, p: IpPacket, type_: int, code: int, now: float) -> None:
        if not self._icmp_limiter.allow(now):
            self.stats.icmp_rate_limited += 1
            return
        msg = icmp.build_icmp4(type_, code, 0, p.raw[: icmp.QUOTE4_MAX])
        self._emit_ip(p.dst, p.src, PROTO_ICMP, msg)
        self.stats.icmp_sent += 1

    def _send_icmp_error6(
        self, p: IpPacket, type_: int, code: int, now: float, rest: int = 0
    ) -> None:
        if not self._icmp_limiter.allow(now):
            self.stats.icmp_rate_limited += 1
            return
        msg = icmp.build_icmp6(p.dst, p.src, type_, code, rest, p.raw[: icmp.QUOTE6_MAX])
        self._emit_ip(p.dst, p.src, PROTO_ICMPV6, msg)
        self.stats.icmp_sent += 1

    def _rx_icmp4(self, p: IpPacket, now: float) -> None:
        m = icmp.parse_icmp4(p.payload)
        if type(m) is ParseError:
            self._count(m)
            return
        assert isinstance(m, icmp.IcmpMessage)
        if m.type == icmp.ICMP4_ECHO_REQUEST:
            if m.code == 0:
                reply = icmp.build_icmp4(icmp.ICMP4_ECHO_REPLY, 0, m.rest, m.body)
                self._emit_ip(p.dst, p.src, PROTO_ICMP, reply)
                self.stats.icmp_echo_answered += 1
            return
        if m.type != icmp.ICMP4_DEST_UNREACH:
            if m.type == icmp.ICMP4_ECHO_REPLY and self._probes:
                self._probe_reply(p.src, m.rest, len(p.payload))
            return  # time exceeded, ...: nothing to do
        self.stats.icmp_errors_received += 1
        quoted = parse_quoted_ipv4(m.body)
        if quoted is None:
            self.stats.icmp_errors_ignored += 1
            return
        mtu = None
        err: OSError | None = None
        if m.code == icmp.UNREACH4_FRAG_NEEDED:
            mtu = m.rest & 0xFFFF
            if mtu == 0:  # pre-RFC 1191 router: guess the next plateau below the quoted size
                total = int.from_bytes(m.body[2:4], "big")
                mtu = next((x for x in _PLATEAUS if x < total), 68)
        elif m.code in (icmp.UNREACH4_PORT, icmp.UNREACH4_PROTOCOL):
            err = ConnectionRefusedError(errno.ECONNREFUSED, "ICMP port unreachable")
        else:
            err = OSError(errno.EHOSTUNREACH, f"ICMP destination unreachable (code {m.code})")
        self._icmp_error(quoted, err, mtu, m.body, now)

    def _rx_icmp6(self, p: IpPacket, now: float) -> None:
        m = icmp.parse_icmp6(p.payload, p.src, p.dst)
        if type(m) is ParseError:
            self._count(m)
            return
        assert isinstance(m, icmp.IcmpMessage)
        if m.type == icmp.ICMP6_ECHO_REQUEST:
            if m.code == 0:
                reply = icmp.build_icmp6(p.dst, p.src, icmp.ICMP6_ECHO_REPLY, 0, m.rest, m.body)
                self._emit_ip(p.dst, p.src, PROTO_ICMPV6, reply)
                self.stats.icmp_echo_answered += 1
            return
        mtu = None
        err: OSError | None = None
        if m.type == icmp.ICMP6_PACKET_TOO_BIG:
            mtu = m.rest
        elif m.type == icmp.ICMP6_DEST_UNREACH:
            if m.code == icmp.UNREACH6_PORT:
                err = ConnectionRefusedError(errno.ECONNREFUSED, "ICMPv6 port unreachable")
            else:
                err = OSError(errno.EHOSTUNREACH, f"ICMPv6 destination unreachable ({m.code})")
        elif m.type == icmp.ICMP6_ECHO_REPLY:
            if self._probes:
                self._probe_reply(p.src, m.rest, len(p.payload))
            return
        else:
            return  # informational (NDP, MLD) or time exceeded/parameter problem
        self.stats.icmp_errors_received += 1
        quoted = parse_quoted_ipv6(m.body)
        if quoted is None:
            self.stats.icmp_errors_ignored += 1
            return
        self._icmp_error(quoted, err, mtu, m.body, now)

    def _icmp_error(
        self,
        quoted: tuple[bytes, bytes, int, memoryview],
        err: OSError | None,
        mtu: int | None,
        quoted_raw: memoryview,
        now: float,
    ) -> None:
        """Deliver a validated ICMP error about a packet we sent (RFC 5927 checks)."""
        qsrc, qdst, qproto, transport = quoted
        stats = self.stats
        if qsrc not in self._local or len(transport) < 8:
            stats.icmp_errors_ignored += 1
            return
        sport = int.from_bytes(transport[0:2], "big")
        dport = int.from_bytes(transport[2:4], "big")
        if qproto == PROTO_TCP:
            sock = self._tcp.get((qsrc, sport, qdst, dport))
            if sock is None or not self._quoted_seq_ok(sock, int.from_bytes(transport[4:8], "big")):
                stats.icmp_errors_ignored += 1
                return
            if mtu is not None:
                self._lower_pmtu(qdst, mtu, quoted_raw)
            elif err is not None:
                sock.on_icmp_unreachable(err, now)
                self._dirty[sock] = None
        elif qproto == PROTO_UDP:
            usock = self._udp_lookup(qsrc, sport)
            if usock is None:
                stats.icmp_errors_ignored += 1
                return
            if mtu is not None:
                self._lower_pmtu(qdst, mtu, quoted_raw)
            elif err is not None:
                usock.error = err
                self._udp_ready[usock] = None
        else:
            stats.icmp_errors_ignored += 1

    @staticmethod
    def _quoted_seq_ok(sock: TcpSocket, seq: int) -> bool:
        """RFC 5927 §4.1: the quoted SEQ must be in SND.UNA..SND.NXT (highest sent)."""
        una = sock.snd_una
        return ((seq - una) & 0xFFFFFFFF) <= ((sock.snd_nxt - una) & 0xFFFFFFFF)

    def _lower_pmtu(self, dst: bytes, mtu: int, quoted_raw: memoryview) -> None:
        v4 = len(dst) == 4
        # The packet that "did not fit" must actually be larger than the reported MTU.
        if v4:
            quoted_len = int.from_bytes(quoted_raw[2:4], "big")
        else:
            quoted_len = 40 + int.from_bytes(quoted_raw[4:6], "big")
        if mtu >= quoted_len:
            self.stats.icmp_errors_ignored += 1
            return
        self.lower_path_mtu(dst, mtu)

    def raise_path_mtu(self, remote: bytes, mtu: int) -> bool:
        """The path to ``remote`` carries ``mtu`` bytes per IP packet again (the tunnel's
        MTU at most): undo :meth:`lower_path_mtu` up to that, for the connections open to it
        (their segments grow from the next one) and those opened later. True if it rose."""
        current = self._pmtu.get(remote)
        if current is None or current >= mtu:
            return False
        if mtu >= self.mtu:
            del self._pmtu[remote]
        else:
            self._pmtu[remote] = mtu
        mss = None if mtu >= self.mtu else mtu - (40 if len(remote) == 4 else 60)
        logger.debug("path MTU to %s raised to %d", _addr_str(remote), min(mtu, self.mtu))
        for key, sock in self._tcp.items():
            if key[2] == remote:
                sock.raise_path_mtu_mss(mss)
                self._dirty[sock] = None
        return True

    def lower_path_mtu(self, remote: bytes, mtu: int) -> bool:
        """The path to ``remote`` (raw address bytes) carries at most ``mtu`` bytes per IP
        packet (at least the protocol's minimum: 576 for IPv4, 1280 for IPv6): its
        connections' segments shrink to fit (those in flight are resent), and a connection
        opened to it later offers the peer that MSS in its SYN. Never raises it; True if it
        lowered it. From an ICMP "fragmentation needed" / "packet too big" for an inner
        packet, or from the runtime, when the path under the tunnel is narrower."""
        v4 = len(remote) == 4
        mtu = max(MIN_MTU4 if v4 else MIN_MTU6, min(mtu, self.mtu))
        if mtu >= self._pmtu.get(remote, self.mtu):
            return False
        self._pmtu[remote] = mtu
        self.stats.pmtu_updates += 1
        mss = mtu - (40 if v4 else 60)
        logger.debug("path MTU to %s lowered to %d", _addr_str(remote), mtu)
        for key, sock in self._tcp.items():
            if key[2] == remote:
                sock.set_path_mtu_mss(mss)
                self._dirty[sock] = None
        return True
