"""The trio runtime: one UDP socket per address family, the clock, and both sans-IO cores.

Shape (see docs/architecture.md): a reader task per UDP socket drains every queued datagram
before yielding, feeds the WireGuard device and the stack, then flushes what they produced.
A timer task sleeps until the earliest core deadline.  Application calls on a
:class:`TunnelStream` touch the stack directly and flush at once — no per-packet task or
channel hop.  Tasks waiting on a stream park on their own lot and are woken only when the
thing they wait for (data, buffer space, connection state) has changed.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import operator
import os
import platform
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import trio

from mitm_wg.config import Endpoint, WireGuardConfig, format_endpoint
from mitm_wg.errors import HandshakeTimeout, NoRoute, TunnelCrashed
from mitm_wg.net.probe import PathProbe, Verdict
from mitm_wg.net.stack import Stack, TcpListener, UdpSocket
from mitm_wg.net.tcp import TcpConfig, TcpSocket, TcpState
from mitm_wg.runtime.dns import HostResolver, Resolver, TunnelDnsTransport, make_resolver
from mitm_wg.runtime.endpoints import (
    DEFAULT_RERESOLVE_INTERVAL,
    EndpointLookup,
    EndpointRefresher,
    host_lookup,
    resolve_endpoints,
)
from mitm_wg.runtime.readhold import HOLD_REFRESH, ReadHold
from mitm_wg.runtime.sockgroup import GroupReader, group_size, in_order, open_group, udp_socket
from mitm_wg.runtime.timerfd import TimerFd, open_timerfd
from mitm_wg.runtime.unreachable import (
    PROBE_AFTER,
    PROBE_INTERVAL,
    PROBE_WAIT,
    IcmpError,
    probe_answer,
    send_probe,
)
from mitm_wg.runtime.unreachable import describe as describe_icmp
from mitm_wg.runtime.via import ViaTransport, config_via, resolve_endpoints_via
from mitm_wg.wireguard.device import (
    FOREIGN_WINDOW,
    Device,
    HandshakeCompleted,
    HandshakeFailed,
    KeyInUseElsewhere,
    KeysZeroed,
    Transmit,
)
from mitm_wg.wireguard.messages import TRANSPORT_MIN_SIZE
from mitm_wg.wireguard.peer import Peer, PeerStatus

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SocketFactory = Callable[[int], socket.socket]

#: UDP GSO (Linux >= 4.18): setsockopt level SOL_UDP, option UDP_SEGMENT, as a cmsg.
SOL_UDP = 17
UDP_SEGMENT = 103
_GSO_SIZE = struct.Struct("=H")
#: The kernel's limits for one GSO send: 64 segments (UDP_MAX_SEGMENTS on older kernels),
#: and one IP packet's worth of payload.
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65507
#: UDP GRO (Linux >= 5.0): with this socket option (level SOL_UDP) set, the kernel hands a
#: run of equal-sized datagrams from one sender over as one buffer, the size of each in a
#: cmsg (UDP_GRO, an int). Such runs arrive from a sender using UDP GSO (wireguard-go since
#: 2023, this tunnel, over loopback or veth) and through a NIC's GRO.
UDP_GRO = 104
_GRO_SIZE = struct.Struct("=i")
_GRO_CMSG_SPACE = socket.CMSG_SPACE(_GRO_SIZE.size) if hasattr(socket, "CMSG_SPACE") else 0
#: (a plain int: ``flags & socket.MSG_TRUNC`` would go through the IntFlag enum, ~1 µs)
_MSG_TRUNC = int(getattr(socket, "MSG_TRUNC", 0x20))
#: TCP states in which the peer may still send us data.
_PEER_SENDS = frozenset({TcpState.ESTABLISHED, TcpState.FIN_WAIT_1, TcpState.FIN_WAIT_2})
#: seconds before a path found fine by a probe (or a host that answered no ping) is asked
#: again (``Tunnel._check_stalls``)
PROBE_AGAIN = 60.0
#: seconds before the path of an endpoint narrowed for a black hole is asked whether it
#: carries full-sized packets again (``Tunnel._reprobe``; Linux's tcp_probe_interval)
REPROBE_AFTER = 600.0
#: getsockopt on a connected socket: the path MTU the kernel knows (Linux <netinet/in.h>).
_IP_MTU = 14
_IPV6_MTU = 24
#: What one receive call takes: a coalesced run is at most one IP packet's worth (64 KiB).
RECEIVE_BUFFER = 65536
#: Datagrams read per wake-up before the reader yields to other tasks.
MAX_BATCH = 256
_NEVER = float("inf")
_T = TypeVar("_T")
#: Seconds past the timer task's due time after which a task takes it that the runtime was
#: not run meanwhile (the machine slept, the process was stopped) and tells the stack so
#: (``Tunnel._pause_ended``); a loaded machine delays the timer task by milliseconds.
PAUSE_AFTER = 1.0
#: What a UDP send fails with while this machine has no way to an endpoint: its network is
#: down (Wi-Fi lost, a cable pulled, between two networks), not the datagram.
_NO_ROUTE = frozenset(
    {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EADDRNOTAVAIL, errno.EHOSTDOWN}
)
#: Seconds between the keepalives that try an endpoint with no route to it
#: (``Tunnel._retry_routes``); after ``NO_ROUTE_SLOW_AFTER`` seconds, ``NO_ROUTE_SLOW``.
NO_ROUTE_RETRY = 0.5
NO_ROUTE_SLOW_AFTER = 30.0
NO_ROUTE_SLOW = 5.0
#: Seconds between looks at the local address our datagrams to each endpoint leave from,
#: while TCP connections are open (``Tunnel._check_sources``).
SOURCE_CHECK = 1.0


class _Probing(NamedTuple):
    """Why a path probe asks (``Tunnel._probing``): about ``key``, the endpoint of
    ``peer``, whose handshakes were ``handshakes`` then; ``kind``: "stall" (a receiver's
    signs, ``_check_stalls``), "other" (the same, asked of another host behind the peer:
    the stalled connection's server answered no ping; ``_ask_another``), "confirm" (the
    stalled connection's server ``host`` answered only the small ping: is the path under
    the tunnel the hole, asked of another host, or something beyond the exit?), "host" (a
    stall while the path under the tunnel carries full-sized packets: is the way beyond
    the exit to ``host`` a hole?), "up" (is a black hole gone? ``_reprobe``; with
    ``host``: the one on the way to that host). ``tcp``: the stalled connection, whose
    signs of a black hole (``_hole_signs``) are read when a verdict needs them (the
    answer to its question to the server may come after the stall). "sent": our own
    full-sized segments to ``host`` vanished (``_sent_into_hole``): does its big ping come
    back? ``sent``: that, or the "confirm" that follows it, for a hole our own segments
    found on the way to ``host``, not the server's."""

    key: tuple[str, int]
    peer: Peer
    handshakes: int
    kind: str
    host: bytes = b""
    tcp: TcpSocket | None = None
    sent: bool = False

    @property
    def current(self) -> bool:
        """The peer is still at ``key``, on the session the probe began in (a new one:
        the exit restarted meanwhile, which explains lost pings as well as a hole)."""
        return self.peer.handshakes_completed == self.handshakes and self.peer.endpoint == self.key

    @property
    def about(self) -> tuple[str, int] | bytes:
        """What the probe asks about: the host's path alone, or the endpoint's."""
        return self.host if self.host and self.kind in ("host", "up") else self.key


@dataclass(frozen=True, slots=True)
class TunnelStatus:
    """A snapshot of a tunnel; ``str()`` renders it in the manner of `wg show`."""

    peers: list[PeerStatus]
    open_connections: int
    #: Wall-clock (Unix) time the snapshot was taken: handshake ages are relative to it.
    unix_time: float = 0.0
    #: The paths it sends smaller packets on than its MTU allows, a line each
    #: (``Tunnel.narrowed``).
    narrowed: tuple[str, ...] = ()
    #: Datagrams the kernel dropped at the tunnel's UDP sockets because their receive
    #: buffer was full (Linux, from /proc/net/udp; 0 where unknown), and that buffer's size
    #: as the kernel reports it (bytes).
    socket_drops: int = 0
    receive_buffer: int = 0
    #: How many sockets receive together (a receive group, sockgroup.py; 1: none), their
    #: buffers ``receive_buffer`` together.
    receive_sockets: int = 1
    #: What ICMP errors the endpoints of unanswered handshakes came back with, a line
    #: each (``Tunnel.unreachable``).
    unreachable: tuple[str, ...] = ()

    def handshake_age(self, peer: PeerStatus) -> float | None:
        """Seconds from ``peer``'s last completed handshake to this snapshot, or None."""
        return peer.handshake_age(self.unix_time)

    @property
    def notes(self) -> tuple[str, ...]:
        """What the rendering adds under the peers, a line each: ICMP errors of unanswered
        endpoints, the narrowed paths, a receive group (the kernel's limit on one socket's
        buffer made the tunnel receive on several), and the datagrams the kernel dropped at
        the tunnel's sockets (if any)."""
        notes = [*self.unreachable, *self.narrowed]
        count = self.receive_sockets
        if count > 1:
            notes.append(
                f"receiving on {count} UDP sockets of one port, "
                f"{self.receive_buffer // count >> 10} KiB of buffer each: net.core.rmem_max "
                "allows no more for one"
            )
        if self.socket_drops:
            where = "its receive buffer" if count == 1 else "their receive buffers"
            notes.append(
                f"the kernel dropped {self.socket_drops} datagram(s) at the tunnel's UDP "
                f"socket{'s' if count > 1 else ''}, {where} ({self.receive_buffer >> 10} KiB) "
                "full: net.core.rmem_max limits it"
            )
        return tuple(notes)

    def __str__(self) -> str:
        lines = [f"{self.open_connections} open connection(s)"]
        lines += [f"  {peer.describe(self.unix_time)}" for peer in self.peers]
        lines += [f"  {line}" for line in self.notes]
        return "\n".join(lines)


class _PendingConnect:
    """A connect in SYN_SENT: its peer, when its SYN first left, the SYN timeouts seen, and
    whether its SYN timeout is a guess from the path (``Tunnel._connect``)."""

    __slots__ = ("guessed", "peer", "rto_seen", "since")

    def __init__(self, peer: Peer, since: float, guessed: bool = False) -> None:
        self.peer = peer
        self.since = since
        self.rto_seen = 0
        self.guessed = guessed


def _ip_udp_overhead(endpoint: tuple[str, int]) -> int:
    """The IP and UDP headers around a datagram to ``endpoint``."""
    return (40 if ":" in endpoint[0] else 20) + 8


def _hole_signs(tcp: TcpSocket | None) -> str:
    """What in stalled connection ``tcp`` points at a black hole for its server's
    full-sized segments ("" if nothing does): only small ones arrived (a reply's headers,
    none of the rest), or the server's ACKs say it sent data that never came though none
    arrived (the reply's first segment was full-sized)."""
    if tcp is None:
        return ""
    if tcp.small_segments_only:
        return "it sent only small segments"
    if tcp.data_vanished:
        return "it sent data that never came"
    return ""


def _question(probe: PathProbe) -> tuple[bytes, int, int, float]:
    """What ``probe`` asked, for ``Tunnel._ask_another``: the host pinged (not to be asked
    again), the two sizes, the interval of its rounds."""
    return probe.remote, probe.big, probe.small, probe.interval


def _interval(tcp: TcpSocket) -> float:
    """How far apart a path probe about ``tcp``'s path sends its rounds: two of its round
    trips, at least half a second (``PathProbe``)."""
    return max(0.5, 2.0 * (tcp.srtt or 0.0))


def _default_socket_factory(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
    return sock


class _Waitable:
    """Something tasks park on until the tunnel says its state may have changed."""

    __slots__ = ("_lot",)

    def __init__(self) -> None:
        self._lot = trio.lowlevel.ParkingLot()

    def _ready(self) -> bool:  # pragma: no cover - overridden
        return True


def _undecryptable(peer: Peer) -> str:
    """Why responses that came back did not make a session (``peer.bad_responses``)."""
    return (
        f"its responses ({peer.bad_responses} so far) do not decrypt with our keys: its"
        " PresharedKey for us differs from this [Peer]'s PresharedKey (or only one side"
        " has one)"
    )


class Tunnel:
    """A running WireGuard tunnel with a userspace TCP/IP stack (see :func:`open_tunnel`)."""

    #: The tunnel this one's WireGuard datagrams travel through (multi-hop), else None.
    via: Tunnel | None = None

    def __init__(
        self,
        config: WireGuardConfig,
        device: Device,
        stack: Stack,
        sockets: dict[int, socket.socket],
        *,
        handshake_timeout: float,
        gro_sockets: set[socket.socket] | None = None,
        read_hold: bool = True,
        groups: dict[socket.socket, list[socket.socket]] | None = None,
    ) -> None:
        """``gro_sockets``: those of ``sockets`` (now or later) that have UDP GRO.
        ``read_hold``: receive coalescing (readhold.py). ``groups``: those of ``sockets``
        (now or later) that receive with a group (sockgroup.py) -> all its sockets."""
        self.config = config
        self.device = device
        self.stack = stack
        self._sockets = sockets
        self.handshake_timeout = handshake_timeout
        families = {iface.version for iface in config.addresses}
        # Names resolve through the tunnel's DNS servers; only a config without DNS servers
        # falls back to the host's resolver (logged once).
        self._resolver: Resolver | HostResolver = make_resolver(
            TunnelDnsTransport(self), config.dns_servers, config.dns_search, families
        )
        self._datagrams: list[Transmit] = []
        self._packets: list[bytes] = []
        self._ip_out: list[bytes] = []
        # The core-deadline task (_timer) sleeps on a timerfd where there is one (precise to
        # microseconds; trio's own deadlines wake up to ~1 ms late), else in a cancel scope;
        # either is armed for _timer_at, which _flush moves earlier (_arm_timer).
        self._timer_scope: trio.CancelScope | None = None
        self._timer_fd: TimerFd | None = None
        self._timer_at = _NEVER
        # When the timer task is due to run: _timer_at, or, armed for a deadline already
        # past, the time it was armed. A task that finds the clock PAUSE_AFTER beyond it
        # knows the runtime was not run meanwhile; ``pauses`` counts those times.
        self._timer_due = _NEVER
        self.pauses = 0
        #: The pauses' lengths added up (each at least how late the timer task was): a
        #: connect's deadline moves on by the pauses during it (``_paused``).
        self.paused_total = 0.0
        # Parked tasks: a wait on a stack socket (a stream's TCP socket, a UDP socket's) is
        # checked when Stack.poll reports that socket (`dispatched`: nothing else changed
        # since the last poll), so a flush costs the same with thousands of idle
        # connections and UDP flows open as with one; other waits (handshakes, listeners:
        # a few) at every flush, and every wait after a device event (a session that came
        # up lets connects go on).
        self._parked: dict[int, _Waitable] = {}
        self._parked_sockets: dict[TcpSocket | UdpSocket, TunnelStream | TunnelUdpSocket] = {}
        self._dispatched: list[TcpSocket | UdpSocket] = []
        self._streams: set[TunnelStream] = set()
        self._connecting: dict[TcpSocket, _PendingConnect] = {}
        self._failed: dict[bytes, HandshakeFailed] = {}
        self._closed = False
        self.send_errors = 0
        self._send_error: tuple[Endpoint, OSError] | None = None  # the latest, for handshake()
        #: Endpoints our sends found no route to (``_NO_ROUTE``) -> [since, the last
        #: failure] (trio time); a keepalive tries each every ``NO_ROUTE_RETRY`` s
        #: (``_retry_routes``, due at ``_no_route_at``) until one leaves. ``paths_back``:
        #: how often one did.
        self._no_route: dict[tuple[str, int], list[float]] = {}
        self._no_route_at = _NEVER
        self.paths_back = 0
        #: The local address our datagrams to each endpoint leave from (None: no route),
        #: looked at every ``SOURCE_CHECK`` s while connections are open (due at
        #: ``_source_at``); ``sources_changed``: how often one changed.
        self._sources: dict[tuple[str, int], str | None] = {}
        self._source_at = _NEVER
        self.sources_changed = 0
        #: Datagrams a socket refused for a moment (EAGAIN: its send buffer full, behind a
        #: slower local link, say), in order, for its writer task (``_writer``); what comes
        #: for that socket meanwhile queues behind them. ``send_waits``: how often it began.
        self._backlog: dict[socket.socket, list[Transmit]] = {}
        self._writable: dict[socket.socket, trio.Event] = {}
        self.send_waits = 0
        #: UDP generic segmentation offload: on until the kernel says it cannot.
        self._gso = sys.platform == "linux"
        self.gso_sends = 0
        #: UDP GRO: receive calls that returned a coalesced run, the datagrams in those runs,
        #: and runs cut short by a too small buffer (never expected).
        self.gro_receives = 0
        self.gro_datagrams = 0
        self.gro_truncated = 0
        self._gro_sockets = gro_sockets if gro_sockets is not None else set()
        #: Receive groups (sockgroup.py): a socket of ``_sockets`` -> all of its group's;
        #: ``group_merges``: wake-ups that read one endpoint's datagrams from several of
        #: them, put back in counter order.
        self._groups = groups if groups is not None else {}
        self.group_merges = 0
        #: Receive coalescing (readhold.py): on or off; the readers' hold, from the shortest
        #: smoothed RTT of the open connections, looked up again when a reader finds
        #: ``_hold_at`` past (``_refresh_hold``). ``reads``: the readers' wake-ups (one drain
        #: each), ``read_holds`` those after a hold, not a readable socket.
        self._read_hold = read_hold
        self._hold_delay = 0.0
        self._hold_at = 0.0
        self.reads = 0
        self.read_holds = 0
        #: Endpoints whose path is narrower than the tunnel's datagrams -> the inner MTU that
        #: fits it (``_narrow``); new connections through them start there, and a datagram
        #: larger than that MTU's goes singly, in fragments, never in a GSO run.
        self.narrow_paths: dict[tuple[str, int], int] = {}
        #: TCP sockets that took their path for an MTU black hole -> (their SND.UNA then,
        #: the peer, its handshakes then): data acknowledged since, on the same session,
        #: confirms it (``_watch_blackholes``).
        self._blackhole_watch: dict[TcpSocket, tuple[int, Peer, int]] = {}
        #: Path probes under way (``_Probing``: why each asks); when the last probe of an
        #: endpoint's path, or of a host's (raw address), found it fine; when a host last
        #: answered no ping.
        self._probing: dict[PathProbe, _Probing] = {}
        self._probed: dict[tuple[str, int] | bytes, float] = {}
        self._silent: dict[tuple[str, int] | bytes, float] = {}
        #: When a datagram larger than a black hole would let through (an inner packet
        #: over ``blackhole_mtu``) last came from each endpoint (``_drain``): the path
        #: from there carried one, and a connection that waits since before then waits
        #: for a slow server, not behind a hole.
        self._large_at: dict[tuple[str, int], float] = {}
        self._large = stack.tcp_config.blackhole_mtu + TRANSPORT_MIN_SIZE
        #: Endpoints narrowed for a black hole, and hosts beyond an exit whose path alone
        #: is (raw address) -> when to ask whether it is gone (a path that changed, a
        #: wrong verdict): every ``reprobe_after`` seconds, as Linux's TCP probes the MTU
        #: up again (tcp_probe_interval); ``_reprobe_at`` the earliest.
        self._holes: dict[tuple[str, int] | bytes, float] = {}
        self._reprobe_at = _NEVER
        self._reprobe_after = REPROBE_AFTER
        #: A UDP socket like ours, to read a path's MTU (open_tunnel sets it).
        self._probe_socket: SocketFactory = udp_socket
        #: Endpoints an unanswered initiation had probed for an ICMP error (unreachable.py)
        #: -> when the probe began (trio time); the errors that came back -> (when, what).
        #: ``_nursery`` (open_tunnel sets it) runs the probes.
        self._probed: dict[tuple[str, int], float] = {}
        self.icmp_errors: dict[tuple[str, int], tuple[float, IcmpError]] = {}
        self._nursery: trio.Nursery | None = None
        self._probe_at = _NEVER  # the next probe due (``_probe_silent``)
        #: Re-resolves hostname endpoints (set by open_tunnel when there are any).
        self.endpoint_refresher: EndpointRefresher | None = None

    def __repr__(self) -> str:
        return f"<Tunnel {self.device.public_key_b64} peers={len(self.device.peers)}>"

    @property
    def reprobe_after(self) -> float:
        """Seconds between asking a path narrowed for a black hole (an endpoint's, or the
        way beyond its exit to one host) whether it carries the tunnel's full size again
        (``REPROBE_AFTER``); a new value applies to the paths already narrowed too."""
        return self._reprobe_after

    @reprobe_after.setter
    def reprobe_after(self, seconds: float) -> None:
        self._reprobe_after = seconds
        due = trio.current_time() + seconds
        for key, at in list(self._holes.items()):
            if due < at:
                self._set_hole(key, due)
        if self._reprobe_at < self._timer_at:
            self._arm_timer(self._reprobe_at)

    # -- the loop -----------------------------------------------------------------------------

    async def _background(
        self, what: str, task: Callable[..., Awaitable[None]], *args: object
    ) -> None:
        """Run a background task; it ends only by cancellation, or as :class:`TunnelCrashed`,
        so its crash can never pass for an exception of the caller's block."""
        try:
            await task(*args)
        except Exception as exc:
            raise TunnelCrashed.of(what, exc) from exc

    async def _reader(self, sock: socket.socket) -> None:
        stack, packets = self.stack, self._packets
        drain: Callable[[Any, float, bool], int] = self._drain
        gro = sock in self._gro_sockets
        wait_readable = trio.lowlevel.wait_readable
        group = self._groups.get(sock)
        poller = None
        readable: socket.socket | int = sock
        source: socket.socket | GroupReader = sock  # what drain reads
        if group is not None:
            # A receive group (sockgroup.py): wait until any of its sockets has datagrams
            # (an epoll set of them is readable then), and drain those that have.
            source = GroupReader(group)
            poller = source.poller
            readable = poller.fileno()
            drain = self._drain_group
        # Receive coalescing (readhold.py): after a wake-up, a busy stream's next read may
        # wait a moment on a timerfd of its own instead of on the socket.
        timer = open_timerfd() if self._read_hold else None
        hold = ReadHold() if timer is not None else None
        delay = 0.0
        try:
            while True:
                if delay:
                    assert timer is not None
                    timer.arm(delay)
                    await wait_readable(timer.fileno())
                    timer.clear()
                    self.read_holds += 1
                else:
                    await wait_readable(readable)  # (a schedule point either way)
                now = trio.current_time()
                if now - self._timer_due > PAUSE_AFTER:
                    self._pause_ended(now)  # (before what waited meanwhile is read)
                count = drain(source, now, gro)
                self.reads += 1
                if packets:
                    # Decrypted packets were authenticated whole by WireGuard: no inner
                    # checksum.
                    stack.receive_batch(packets, now, authenticated=True)
                    packets.clear()
                self._flush(now)
                if hold is not None and count < MAX_BATCH:
                    if now >= self._hold_at:
                        self._refresh_hold(now)
                    delay = hold.after(now, count, self._hold_delay)
                else:
                    delay = 0.0  # (none, or more is waiting: read on at once)
        finally:
            if timer is not None:
                trio.lowlevel.notify_closing(timer.fileno())
                timer.close()
            if poller is not None:
                trio.lowlevel.notify_closing(poller.fileno())
                poller.close()

    def _refresh_hold(self, now: float) -> None:
        """The readers' hold from the shortest smoothed RTT of the open connections (a hold
        delays what every connection receives: the nearest server bounds it); none while
        no connection has one (UDP flows alone, say). Looked up every ``HOLD_REFRESH`` s."""
        rtts = [rtt for stream in self._streams if (rtt := stream._sock.srtt) is not None]
        self._hold_delay = ReadHold.for_rtt(min(rtts, default=None))
        self._hold_at = now + HOLD_REFRESH

    def _drain(
        self,
        sock: socket.socket,
        now: float,
        gro: bool,
        received: Callable[[list[bytes | memoryview], Any, float], None] | None = None,
    ) -> int:
        """Hand up to :data:`MAX_BATCH` waiting datagrams to the device, each run of them
        from one address in one call (``Device.receive_datagrams``; to ``received`` if
        given). ``gro``: the socket has UDP GRO, so one ``recvmsg`` may return a run of
        datagrams (one syscall and one call for up to 64 KiB of them, as wireguard-go
        reads), split here at the size the kernel reports, the last one possibly shorter;
        else one ``recvfrom`` each. Returns how many datagrams it read."""
        if received is None:
            received = self._received
        recvfrom = sock.recvfrom
        recvmsg = sock.recvmsg if gro else None
        budget = MAX_BATCH
        run: list[bytes | memoryview] = []
        run_from = None
        ancdata: list = []
        flags = 0
        while budget > 0:
            try:
                if recvmsg is not None:
                    data, ancdata, flags, address = recvmsg(RECEIVE_BUFFER, _GRO_CMSG_SPACE)
                else:
                    data, address = recvfrom(RECEIVE_BUFFER)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                # ICMP errors surface here on some platforms; the timers handle loss.
                logger.debug("UDP receive error: %s", e)
                break
            if address != run_from:
                if run:
                    received(run, run_from, now)
                    run = []
                run_from = address
            if ancdata or flags:  # a coalesced run (or a truncated read)
                size = 0
                for level, kind, value in ancdata:
                    if level == SOL_UDP and kind == UDP_GRO and len(value) == _GRO_SIZE.size:
                        size = _GRO_SIZE.unpack(value)[0]
                if flags & _MSG_TRUNC:
                    self.gro_truncated += 1  # (never expected: the buffer holds 64 KiB)
                n = len(data)
                if 0 < size < n:
                    count = (n + size - 1) // size
                    self.gro_receives += 1
                    self.gro_datagrams += count
                    view = memoryview(data)
                    run += [view[i : i + size] for i in range(0, n, size)]
                    budget -= count
                    continue
            run.append(data)
            budget -= 1
        if run:
            received(run, run_from, now)
        return MAX_BATCH - budget

    def _drain_group(self, reader: GroupReader, now: float, gro: bool) -> int:
        """:meth:`_drain` for a receive group (sockgroup.py): those of its sockets that
        have datagrams, again until none has (``GroupReader``), then each endpoint's
        datagrams to the device in counter order, as one socket would have had them."""
        runs: dict[Any, list[list[bytes | memoryview]]] = {}

        def keep(run: list[bytes | memoryview], address: Any, now: float) -> None:
            runs.setdefault(address, []).append(run)

        count = 0
        most = MAX_BATCH * len(reader.sockets)
        while count < most:
            ready = reader.ready()
            if not ready:
                break
            for sock in ready:
                count += self._drain(sock, now, gro, keep)
        for address, of_address in runs.items():
            if len(of_address) == 1:
                self._received(of_address[0], address, now)
            else:
                self.group_merges += 1
                self._received(in_order(of_address), address, now)
        return count

    def _received(self, run: list[bytes | memoryview], address: Any, now: float) -> None:
        """Hand a run of datagrams from ``address`` to the device; note a large one."""
        key = (address[0], address[1])
        if max(map(len, run)) > self._large:
            self._large_at[key] = now
        self.device.receive_datagrams(run, key, now, self._datagrams, self._packets)

    async def _timer(self) -> None:
        timer = open_timerfd()
        self._timer_fd = timer
        try:
            while True:
                if timer is None:
                    with trio.CancelScope() as scope:
                        self._timer_scope = scope
                        self._arm_timer(self._next_deadline())
                        await trio.sleep_forever()
                    self._timer_scope = None
                else:
                    self._arm_timer(self._next_deadline())
                    await trio.lowlevel.wait_readable(timer.fileno())
                    if not timer.clear():
                        continue  # re-armed after it fired: not due yet
                now = trio.current_time()
                self.device.poll(now, self._datagrams)
                self._probe_silent(now)
                self._flush(now)  # (leaves the arming to the loop: _timer_at is past)
        finally:
            self._timer_fd = None
            if timer is not None:
                trio.lowlevel.notify_closing(timer.fileno())  # (trio forgets the fd first)
                timer.close()

    def _start_persistent_keepalives(self) -> None:
        """A keepalive now to each peer with PersistentKeepalive (it starts the handshake),
        as wireguard-go and Linux send one when the interface comes up: the session, and the
        NAT mapping the option is there to keep, exist before the first flow, and a dead
        endpoint shows at once instead of at the first request."""
        now = trio.current_time()
        for peer in self.device.peers.values():
            if peer.persistent_keepalive and peer.endpoint is not None:
                self.device.send_keepalive(peer, now, self._datagrams)
        self._flush(now)

    def _arm_timer(self, deadline: float) -> None:
        """Wake the timer task at ``deadline``: the timerfd, or the scope it sleeps in."""
        self._timer_at = deadline
        if deadline == _NEVER:
            self._timer_due = _NEVER
        else:
            now = trio.current_time()
            self._timer_due = deadline if deadline > now else now
        timer = self._timer_fd
        if timer is not None:
            if deadline == _NEVER:
                timer.disarm()
            else:
                timer.arm(deadline - now)
        elif self._timer_scope is not None:
            self._timer_scope.deadline = deadline

    def _pause_ended(self, now: float) -> None:
        """A task found the clock more than PAUSE_AFTER past when the timer task was due:
        the runtime was not run meanwhile (a suspend, a stopped process), and what arrived
        waited in the sockets' buffers. The stack must neither time a round trip across the
        pause nor fire the timers that came due before that is read, nor count the pause
        towards a connection's user timeout (``Stack.pause_ended``).
        Called by whichever task runs first: a reader before it reads, else ``_flush``."""
        late = now - self._timer_due  # (the pause began before the timer task was due)
        self._timer_due = now  # (once: the timer task arms the next deadline)
        self.pauses += 1
        self.paused_total += late
        moved = self.stack.pause_ended(now, late)
        logger.debug(
            "the tunnel was not run for %.1f s or more (a suspend, a stopped process): "
            "no round trip is timed across it; %d connections' timers "
            "start over",
            late,
            moved,
        )

    def _paused(self, now: float) -> float:
        """``paused_total`` once a pause that ended by ``now`` is noticed: a task that may
        wake first after one (on its own deadline, which passed meanwhile) asks this before
        it takes the deadline as passed."""
        if now - self._timer_due > PAUSE_AFTER:
            self._pause_ended(now)
        return self.paused_total

    def _next_deadline(self) -> float:
        d1 = self.device.next_deadline()
        d2 = self.stack.next_deadline()
        best = _NEVER
        if d1 is not None:
            best = d1
        if d2 is not None and d2 < best:
            best = d2
        if self._reprobe_at < best:
            best = self._reprobe_at
        if self._no_route_at < best:
            best = self._no_route_at
        if self._source_at < best:
            best = self._source_at
        if self._probe_at < best:
            best = self._probe_at
        return best

    def _flush(self, now: float | None = None, wake_all: bool = False) -> None:
        """Move everything the stack and the device have to send onto the wire, wake waiters:
        those whose sockets the stack reported, and every one after a device event (a
        session that came up lets connects go on) or when ``wake_all`` (closing)."""
        if now is None:
            now = trio.current_time()
        if now - self._timer_due > PAUSE_AFTER:
            self._pause_ended(now)  # (the timer task, or an application's, ran first)
        device = self.device
        self._transmit(now)
        if device.events:
            wake_all = True
            if self._handle_events(device.take_events()):
                self._transmit(now)  # what a new session let go at once
        dispatched = self._dispatched
        by_socket = self._parked_sockets
        if wake_all:
            woken = list(by_socket.values())
        elif by_socket and dispatched:
            woken = [by_socket[sock] for sock in dispatched if sock in by_socket]
        else:
            woken = ()
        dispatched.clear()
        for waiter in woken:
            if waiter._ready():
                waiter._lot.unpark_all()
        if self._parked:
            for waitable in list(self._parked.values()):
                if waitable._ready():
                    waitable._lot.unpark_all()
        deadline = self._next_deadline()
        if deadline < self._timer_at:
            self._arm_timer(deadline)

    def _transmit(self, now: float) -> None:
        device = self.device
        out = self._datagrams
        ip_out = self._ip_out
        stack = self.stack
        if stack.blackholes or self._blackhole_watch:
            self._watch_blackholes(now)  # (before the poll: what it changes goes out now)
        if now >= self._reprobe_at:
            self._reprobe(now)
        if now >= self._no_route_at:
            self._retry_routes(now)  # (before the poll: what it kicks goes out now)
        if now >= self._source_at:
            self._check_sources(now)  # (the same)
        stack.poll(now, ip_out, self._dispatched)
        if stack.rx_stalls or stack.probes_done:
            # (timers in that poll found them: the probes and ICMP errors go out now)
            self._check_stalls(now)
            stack.poll(now, ip_out, self._dispatched)
        if ip_out:
            device.send_packets(ip_out, now, out)
            ip_out.clear()
        if self._connecting:
            self._check_unanswered_syns(now, out)
        if out:
            self._send_datagrams(out)
            out.clear()

    def _check_unanswered_syns(self, now: float, out: list[Transmit]) -> None:
        """The fast-recovery rule: a new connection's SYN had to be retransmitted and nothing
        authenticated came from its peer since the first SYN left. The peer probably lost our
        session (it restarted), so handshake again now instead of after WireGuard's passive
        15 s; the device applies the rate limits (``Device.handshake_if_silent``)."""
        for sock, pending in self._connecting.items():
            timeouts = sock.stats.rto_expired
            if timeouts == pending.rto_seen or sock.state is not TcpState.SYN_SENT:
                continue
            pending.rto_seen = timeouts
            if pending.guessed and not sock.syn_retries:
                # a SYN timeout from the path's lower bound alone (nothing measured to the
                # address) says little: a far server's SYN-ACK may simply not be due yet.
                # Suspect the peer once one at the initial RTO's scale passed, as before.
                continue
            peer = pending.peer
            if self.device.handshake_if_silent(peer, pending.since, now, out):
                logger.info(
                    "no answer from WireGuard peer %s at %s since a new connection's SYN: "
                    "handshaking again now",
                    peer.public_key_b64,
                    format_endpoint(peer.endpoint),
                )

    def unanswered(self, address: str | IPAddress, since: float) -> None:
        """Something sent through the tunnel to ``address`` at ``since`` (trio time) got no
        answer in time (the DNS resolver's UDP timeout): the SYN rule's check for datagrams."""
        peer = self.device.route(ipaddress.ip_address(address).packed)
        if peer is None or self._closed:
            return
        now = trio.current_time()
        if self.device.handshake_if_silent(peer, since, now, self._datagrams):
            logger.info(
                "no answer from WireGuard peer %s at %s since a DNS query: handshaking again now",
                peer.public_key_b64,
                format_endpoint(peer.endpoint),
            )
        self._flush(now)

    def _send_datagrams(self, out: list[Transmit]) -> None:
        """Send, coalescing runs of equal-sized datagrams to one endpoint into one UDP GSO
        send (a single syscall; the kernel splits it), as wireguard-go does on Linux."""
        sockets = self._sockets
        narrow = self.narrow_paths
        backlog = self._backlog
        i, n = 0, len(out)
        while i < n:
            data, endpoint = out[i]
            sock = sockets.get(socket.AF_INET6 if ":" in endpoint[0] else socket.AF_INET)
            if sock is None:
                self.send_errors += 1
                i += 1
                continue
            if backlog and sock in backlog:  # (behind what waits for the socket, in order)
                self._queue(sock, out[i : i + 1])
                i += 1
                continue
            j = i + 1
            if self._gso and (
                not narrow or len(data) <= narrow.get(endpoint, 0xFFFF) + TRANSPORT_MIN_SIZE
            ):
                size = len(data)
                limit = min(n, i + GSO_MAX_SEGMENTS, i + GSO_MAX_BYTES // size)
                # equal sizes, same endpoint; the last segment of a run may be shorter
                while j < limit and out[j][1] == endpoint and len(out[j][0]) == size:
                    j += 1
                if j < limit and out[j][1] == endpoint and len(out[j][0]) < size:
                    j += 1
            try:
                if j - i > 1:
                    self.gso_sends += 1
                    sock.sendmsg(
                        [d for d, _ in out[i:j]],
                        [(SOL_UDP, UDP_SEGMENT, _GSO_SIZE.pack(len(data)))],
                        0,
                        endpoint,
                    )
                else:
                    sock.sendto(data, endpoint)
            except BlockingIOError:
                # The send buffer is full (net.core.wmem_max may hold it to 208 KiB): the
                # run waits for the socket instead of being lost (a GSO run is up to 64
                # datagrams); Linux's TCP would wait the same way (TCP small queues).
                self.send_waits += 1
                self._queue(sock, out[i:j])
            except OSError as e:
                if self._refused(endpoint, len(data), e, j - i > 1):
                    # One at a time: the kernel fragments a datagram the path cannot carry.
                    try:
                        for d, _ in out[i:j]:
                            sock.sendto(d, endpoint)
                    except OSError as e2:
                        self._send_failed(endpoint, e2)
                else:
                    self._send_failed(endpoint, e)
            i = j

    def _queue(self, sock: socket.socket, datagrams: list[Transmit]) -> None:
        """Keep ``datagrams`` for ``sock``'s writer; past ``BACKLOG_MAX`` they are lost as a
        failed send would lose them (a socket that stays full: TCP and the timers retry)."""
        pending = self._backlog.get(sock)
        if pending is None:
            pending = self._backlog[sock] = []
            event = self._writable.get(sock)
            if event is not None:
                event.set()
        room = BACKLOG_MAX - len(pending)
        if len(datagrams) > room:
            self._send_failed(
                datagrams[0][1], BlockingIOError(errno.EAGAIN, "UDP send backlog full")
            )
            datagrams = datagrams[: max(room, 0)]
        pending += datagrams

    async def _writer(self, sock: socket.socket) -> None:
        """Send what ``sock`` refused for a moment once it takes more (``_queue``)."""
        while True:
            event = self._writable[sock] = trio.Event()
            if sock not in self._backlog:
                await event.wait()
            await trio.lowlevel.wait_writable(sock)
            pending = self._backlog.pop(sock, None)
            if pending:
                self._send_datagrams(pending)  # (what it refuses again goes back)

    def _send_failed(self, endpoint: Endpoint, error: OSError) -> None:
        # A full socket buffer or a transient error: TCP retransmits, and the WireGuard
        # timers retry handshakes.
        self.send_errors += 1
        self._send_error = (endpoint, error)
        logger.debug("UDP send to %s failed: %s", format_endpoint(endpoint), error)
        if error.errno in _NO_ROUTE:
            key = (endpoint[0], endpoint[1])
            now = trio.current_time()
            entry = self._no_route.get(key)
            if entry is not None:
                entry[1] = now
            else:
                self._no_route[key] = [now, now]
                logger.info(
                    "no route to WireGuard endpoint %s (%s): trying it every %g s until "
                    "the network is back",
                    format_endpoint(endpoint), error.strerror, NO_ROUTE_RETRY,
                )  # fmt: skip
            if self._no_route_at == _NEVER:
                self._no_route_at = now + NO_ROUTE_RETRY
                if self._no_route_at < self._timer_at:
                    self._arm_timer(self._no_route_at)

    def _retry_routes(self, now: float) -> None:
        """Try each endpoint our sends found no route to (``_send_failed``) with a keepalive
        (a handshake initiation if the session is gone), as Linux's TCP tries a
        retransmission the route lookup refused again after half a second, unbacked-off.
        One that leaves: the network is back (Wi-Fi again, or another network: a new
        address, which the exit learns from this very keepalive, WireGuard's roaming,
        instead of from whatever we would send next — nothing, in a stalled download, until
        WireGuard's 15 s rule handshakes; the exit's TCP meanwhile retransmits into the old
        address and backs off). Connections to hosts behind it that wait out
        a backed-off retransmission timer retransmit now (``Stack.retransmit_now``): the
        retransmissions the timeouts sent never left this machine."""
        waiting = self._no_route
        for key in waiting.keys() - self._endpoint_keys():
            del waiting[key]  # (no peer there any more)
        tried = self._keepalives(waiting, now)  # (a failure: its last failure >= now)
        for key, (since, failed) in list(waiting.items()):
            if key in tried and failed < now:
                del waiting[key]
                self.paths_back += 1
                kicked = self._kick(key)  # (the keepalive went above)
                if key in self._sources:  # (_check_sources: this change is told)
                    self._sources[key] = self._source_of(key)
                logger.info(
                    "the way to WireGuard endpoint %s is back after %.1f s without a "
                    "route; %d connections retransmit now",
                    format_endpoint(key), now - since, kicked,
                )  # fmt: skip
        self._no_route_at = min(
            (
                now + (NO_ROUTE_SLOW if now - since > NO_ROUTE_SLOW_AFTER else NO_ROUTE_RETRY)
                for since, _ in waiting.values()
            ),
            default=_NEVER,
        )

    def _probe(self, endpoint: tuple[str, int], read: Callable[[socket.socket], _T]) -> _T:
        """``read`` of a UDP socket like ours connected to ``endpoint`` (a route lookup; no
        datagram leaves): what the kernel knows of the way there. OSError: no way."""
        probe = self._probe_socket(socket.AF_INET6 if ":" in endpoint[0] else socket.AF_INET)
        try:
            probe.connect(endpoint)
            return read(probe)
        finally:
            probe.close()

    def _source_of(self, key: tuple[str, int]) -> str | None:
        """The local address the kernel sends our datagrams to ``key`` from now (None: no
        route)."""
        try:
            return self._probe(key, lambda probe: str(probe.getsockname()[0]))
        except OSError:
            return None

    def _check_sources(self, now: float) -> None:
        """Look at the local address our datagrams to each peer's endpoint leave from, every
        ``SOURCE_CHECK`` s while TCP connections are open. When it changed (the Wi-Fi
        dropped and the kernel now routes over the Ethernet that was up beside it; a new
        DHCP lease), the exit goes on sending to the old one until something of ours
        arrives from the new one (WireGuard's roaming); a download that lost what was on
        its way has nothing to send, and stood still until WireGuard's 15 s rule
        handshook, the exit's TCP backing off meanwhile (~27 s in the test). So a
        keepalive tells the exit now (``_keepalives``), and connections waiting out a
        backed-off retransmission timer retransmit (``_kick``). (Not for a tunnel inside
        another, whose datagrams leave through that one.)"""
        if not self._streams or self.via is not None:
            self._source_at = _NEVER
            self._sources.clear()
            return
        self._source_at = now + SOURCE_CHECK
        known = self._sources
        keys = self._endpoint_keys()
        for key in known.keys() - keys:
            del known[key]
        for key in keys:
            source = self._source_of(key)
            if key not in known:
                known[key] = source
            elif source != known[key]:
                before, known[key] = known[key], source
                if source is not None and key not in self._no_route:  # (else: its retries)
                    self.sources_changed += 1
                    logger.info(
                        "datagrams to WireGuard endpoint %s now leave from %s (before: %s): "
                        "telling the exit",
                        format_endpoint(key), source, before or "no route",
                    )  # fmt: skip
                    self._keepalives({key}, now)
                    self._kick(key)

    def _endpoint_keys(self) -> set[tuple[str, int]]:
        return {(e[0], e[1]) for p in self.device.peers.values() if (e := p.endpoint) is not None}

    def _keepalives(self, keys: Collection[tuple[str, int]], now: float) -> set[tuple[str, int]]:
        """A keepalive (an initiation if the session is gone) to each peer whose endpoint is
        in ``keys``, sent now: the exit learns our address from it (WireGuard's roaming).
        Returns the endpoints something went to (a handshake rate-limited sends nothing)."""
        device, out = self.device, []
        for peer in device.peers.values():
            endpoint = peer.endpoint
            if endpoint is not None and (endpoint[0], endpoint[1]) in keys:
                device.send_keepalive(peer, now, out)
        if out:
            self._send_datagrams(out)
        return {(endpoint[0], endpoint[1]) for _, endpoint in out}

    def _kick(self, key: tuple[str, int]) -> int:
        """The connections to hosts behind endpoint ``key`` that wait out a backed-off
        retransmission timer retransmit now (``Stack.retransmit_now``); how many."""
        route = self.device.route

        def behind(addr: bytes) -> bool:
            peer = route(addr)
            return peer is not None and peer.endpoint is not None and peer.endpoint[:2] == key

        return self.stack.retransmit_now(behind)

    def _refused(self, endpoint: Endpoint, size: int, error: OSError, run: bool) -> bool:
        """Whether a send that raised ``error`` is worth repeating one datagram at a time.
        EMSGSIZE: the path is narrower than the datagrams (an ICMP error said so, and the
        kernel refuses a GSO run it would have to fragment), so ``_narrow`` to it. On a
        run, EINVAL (what older kernels say for that), EIO or ENOPROTOOPT otherwise mean
        no UDP GSO here (an old kernel, an odd device): it stays off."""
        if error.errno == errno.EMSGSIZE:
            self._path_narrower(endpoint, size)
            return True
        if run and error.errno in (errno.EINVAL, errno.EIO, errno.ENOPROTOOPT):
            if not self._path_narrower(endpoint, size):
                logger.debug("UDP GSO unavailable (%s); sending datagrams singly", error)
                self._gso = False
            return True
        return False

    def _path_narrower(self, endpoint: Endpoint, size: int) -> bool:
        """A GSO send of ``size``-byte datagrams to ``endpoint`` failed: whether the path
        there is narrower than they are (the kernel knows a smaller MTU for it, from an
        ICMP error or its own link, and refuses a run it would have to fragment; a single
        datagram it fragments), and if so, ``_narrow`` to it. The limit is a connected probe
        socket's IP_MTU (the kernel's per-destination value, shared by all sockets)."""
        v6 = ":" in endpoint[0]
        try:
            path_mtu = self._probe(
                endpoint,
                lambda probe: (
                    probe.getsockopt(socket.IPPROTO_IPV6, _IPV6_MTU)
                    if v6
                    else probe.getsockopt(socket.IPPROTO_IP, _IP_MTU)
                ),
            )
        except OSError as e:
            logger.debug("cannot read the path MTU to %s: %s", format_endpoint(endpoint), e)
            return False
        overhead = _ip_udp_overhead(endpoint)
        if size + overhead <= path_mtu:
            return False
        self._narrow(endpoint, path_mtu - overhead - TRANSPORT_MIN_SIZE, path_mtu=path_mtu)
        return True

    def _watch_blackholes(self, now: float) -> None:
        """A connection took its path for an MTU black hole and resent in smaller segments
        (``TcpConfig.blackhole_rtos``): once one of those is acknowledged on the same
        WireGuard session, the full-sized ones were the trouble, not a dead or restarted
        peer (``_sent_into_hole`` then finds where the hole lies). (A path that was down
        for a few seconds and comes back just then passes for one too: its connections
        then stay at the smaller size.)"""
        stack, watch = self.stack, self._blackhole_watch
        for tcp in stack.blackholes:
            peer = self.device.route(tcp.remote_addr)
            if peer is not None and peer.endpoint is not None:
                watch[tcp] = (tcp.snd_una, peer, peer.handshakes_completed)
        stack.blackholes.clear()
        for tcp, (una, peer, handshakes) in list(watch.items()):
            if tcp.is_closed or peer.handshakes_completed != handshakes:
                # A new session came first: the exit had lost ours (it restarted), which
                # explains the timeouts as well as a black hole would.
                del watch[tcp]
            elif tcp.snd_una != una and peer.endpoint is not None:
                del watch[tcp]
                self._sent_into_hole(tcp, peer, now)

    def _sent_into_hole(self, tcp: TcpSocket, peer: Peer, now: float) -> None:
        """``tcp``'s smaller segments got through where its full-sized ones vanished
        (``_watch_blackholes``): a black hole on the way to its server, under the tunnel
        or beyond the exit, or a lossy path that lost the same segment three times in a
        row (on a path losing 2 % each way, one timeout in ~600 goes on so). That server's
        connections, and those opened later, send segments that fit at once
        (``_narrow_host``; the server is told only once it is no mere loss: Linux would
        keep the smaller size for ten minutes), and the server itself is asked with pings
        of both sizes (kind "sent", ``_sent_verdict``): its big ping back, the losses were
        losses and it gets full-sized packets again; else another host tells where the
        hole lies (``_sent_unanswered``). A server that answered no ping lately is not
        asked."""
        assert peer.endpoint is not None
        key = (peer.endpoint[0], peer.endpoint[1])
        host, small = tcp.remote_addr, tcp.config.blackhole_mtu
        big = self.stack.path_mtu(host)
        if big <= small or self._asking(host) or self._asking(key):
            return  # (narrowed already, or a question under way will settle it)
        why = _Probing(key, peer, peer.handshakes_completed, "sent", host, tcp, sent=True)
        self._narrow_host(host, small, now, tell=False)  # (told once it is no mere loss)
        if self._recently(self._silent, host, now):
            self._sent_unanswered(why, big, small, now)
        else:
            self._ask(why, tcp.local_addr, host, big, small, now, _interval(tcp))

    def _sent_verdict(self, probe: PathProbe, why: _Probing, now: float) -> None:
        """The server our full-sized segments vanished on the way to (``_sent_into_hole``)
        answered pings. Its big ping back, or a new session meanwhile (the exit restarted,
        which explains the timeouts as well): no hole on the way to it, the segments were
        lost (a lossy Wi-Fi loses one three times in a row now and then), and its
        connections go back to full-sized packets. Only its small ping back, or none (it
        answers no ping): ``_sent_unanswered``."""
        host, verdict = why.host, probe.verdict
        if verdict is Verdict.FITS or not why.current:
            if verdict is Verdict.FITS:
                self._note(self._probed, host, now)
            self._widen_host(host, quiet=True)
            logger.info(
                "full-sized segments to %s were lost %d times in a row, but %s: "
                "losses, not a black hole; TCP with it keeps packets of up to %d bytes",
                ipaddress.ip_address(host),
                self.stack.tcp_config.blackhole_rtos,
                f"pings of {probe.big} bytes to it come back"
                if verdict is Verdict.FITS
                else "the exit started a new session meanwhile",
                self.stack.path_mtu(host),
            )
            return
        if verdict is Verdict.UNKNOWN:
            self._note(self._silent, host, now)
        self._sent_unanswered(why, probe.big, probe.small, now)

    def _sent_unanswered(self, why: _Probing, big: int, small: int, now: float) -> None:
        """Our full-sized segments to ``why.host`` vanished, and its own big ping did too
        (or it answers no ping): its servers are told (``_tell_host``), and another host
        behind the same peer is asked whether the path under the tunnel carries
        full-sized packets (``_ask_another``); ``_confirm`` decides: every connection
        through the endpoint shrinks (``_narrow``), or only that server's stay small
        (narrowed already). With nobody to ask, the endpoint narrows at once: a hole under
        the tunnel (the user's own line) is the likelier, and it spares every other
        connection its own timeouts."""
        assert why.tcp is not None  # (_sent_into_hole's: the connection that found it)
        self._tell_host(why.host)
        interval = _interval(why.tcp)
        if not self._ask_another(why._replace(kind="confirm"), why.host, big, small, interval, now):
            self._narrow(why.key, small, hole_at=now)

    def _check_stalls(self, now: float) -> None:
        """A connection saw signs that its peer's full-sized segments vanish on the way to
        us (``TcpConfig.rx_stall``; a download sends nothing large that could find the hole
        itself): ask the path with pings through the tunnel to that peer
        (``Stack.probe_path``: the tunnel's size and ``blackhole_mtu``, three rounds; the
        tunnel's DNS server or another host if that one answers no ping: ``_ask_another``);
        the verdicts: ``_verdict``. If a large datagram came from its endpoint since the
        connection began waiting, or its path was found fine less than ``PROBE_AGAIN``
        seconds ago, the path under the tunnel carries them: the question is then only
        whether the way beyond the exit to that host does (kind "host"; most often it does:
        a slow server). The same host is asked again only ``PROBE_AGAIN`` seconds after it
        answered, or answered no ping (then, with the path under the tunnel known sound,
        ``_silent_hole`` decides at once; not known, and the connection shows signs of a
        hole, ``_hole_signs``: another host is asked, or with none to ask ``_silent_hole``
        decides); a stalled connection whose packets are already narrowed has its server
        told again (the first ICMP error may have been lost). A stall is reported again
        when the server's answer to the connection's question shows data vanished
        (``TcpSocket.data_vanished``): the verdicts read the signs when they come."""
        stack, route = self.stack, self.device.route
        for tcp in stack.rx_stalls:
            peer = route(tcp.remote_addr)
            if peer is None or peer.endpoint is None or tcp.is_closed:
                continue
            key = (peer.endpoint[0], peer.endpoint[1])
            narrowed = self.narrow_paths.get(key)
            if narrowed is None and tcp.remote_addr in self._holes:
                narrowed = stack.path_mtu(tcp.remote_addr)
            if narrowed is not None:
                if tcp.state in _PEER_SENDS:
                    stack.tell_remote_path_mtu(tcp, narrowed)
                continue
            host = tcp.remote_addr
            big, small = stack.path_mtu(host), tcp.config.blackhole_mtu
            if (
                big <= small
                or self._asking(key)
                or self._asking(host)
                or self._recently(self._probed, host, now)
            ):
                continue
            proven = self._large_at.get(key, -1.0) > tcp.stall_since or self._recently(
                self._probed, key, now
            )
            why = _Probing(
                key, peer, peer.handshakes_completed, "host" if proven else "stall", host, tcp
            )  # fmt: skip
            if not self._recently(self._silent, host, now):
                self._ask(why, tcp.local_addr, host, big, small, now, _interval(tcp))
            elif proven:  # (it would answer no ping again)
                because = "it answered no ping lately; other servers' come through"
                self._silent_hole(why, because, now)
            elif _hole_signs(tcp) and not self._ask_another(
                why._replace(kind="other"), host, big, small, _interval(tcp), now
            ):
                self._silent_hole(why, None, now)
        stack.rx_stalls.clear()
        for probe in stack.probes_done:
            self._verdict(probe, self._probing.pop(probe), now)
        stack.probes_done.clear()

    def _verdict(self, probe: PathProbe, why: _Probing, now: float) -> None:
        """A probe decided. FITS: the path is fine (asked again ``PROBE_AGAIN`` later at
        the earliest), or, asked whether a hole is gone, wide again (``_widen``,
        ``_widen_host``). HOLE, on the same session (a new session means the exit
        restarted: no hole): the stalled connection's server has only small packets for
        now (``_narrow_host``), and another host behind the same peer is asked the same
        (``_ask_another``, ``_confirm``). If none can be asked, the endpoint narrows
        (``_narrow``) as ``_watch_blackholes`` would. UNKNOWN: the host answered no ping;
        another host is asked next, and if the path under the tunnel is (or is known to
        be) sound, or nobody else can be asked, ``_silent_hole`` decides on the host
        alone."""
        key, verdict, kind = why.key, probe.verdict, why.kind
        logger.debug(
            "path probe to %s via WireGuard endpoint %s (%d/%d bytes): %s",
            ipaddress.ip_address(probe.remote), format_endpoint(key), probe.big,
            probe.small, verdict.value if verdict else None,
        )  # fmt: skip
        if kind == "sent":
            self._sent_verdict(probe, why, now)
        elif kind == "confirm":
            self._confirm(probe, why, now)
        elif verdict is Verdict.UNKNOWN:
            self._note(self._silent, probe.remote, now)
            if kind == "stall" and not self._ask_another(
                why._replace(kind="other"), *_question(probe), now
            ):
                self._silent_hole(why, None, now)
            elif kind == "host":
                self._silent_hole(why, "other servers' full-sized packets come through", now)
            elif kind == "up" and not why.host and key in self.narrow_paths:
                self._ask_another(why, *_question(probe), now)  # (each other, until one answers)
        elif kind == "up":
            if verdict is Verdict.FITS:
                if why.host:
                    self._widen_host(why.host)
                elif key in self.narrow_paths:
                    self._widen(key)
        elif verdict is Verdict.FITS or not why.current:
            self._note(self._probed, why.about, now)
            if kind == "stall":  # (the big ping came back from that host: its way too)
                self._note(self._probed, probe.remote, now)
            elif kind == "other" and verdict is Verdict.FITS:
                server = ipaddress.ip_address(probe.remote)
                self._silent_hole(why, f"pings of {probe.big} bytes to {server} come back", now)
        elif kind == "host":
            self._narrow_host(probe.remote, probe.small, now)
            because = "the large ping to it goes unanswered; other servers' come through"
            self._beyond(key, probe.remote, because)
        elif kind == "other" or not self._ask_another(
            why._replace(kind="confirm"), *_question(probe), now
        ):
            self._narrow(key, probe.small, hole_at=now)
        else:
            self._narrow_host(probe.remote, probe.small, now)

    def _confirm(self, probe: PathProbe, why: _Probing, now: float) -> None:
        """The stalled connection's server ``why.host`` answered only the small ping (or,
        ``why.sent``, our own full-sized segments to it vanished: ``_sent_into_hole``), and
        ``probe`` asked another host (``_ask_another``) the same. A hole there too, or no
        answer: the path under the tunnel is the hole (``_narrow``). Its big ping back:
        the path to the exit carries full-sized packets, and what swallows them lies beyond
        it, on the way to that host alone (or the host drops large pings, as some
        firewalls do): only that host's connections keep small packets (``_narrow_host``,
        already done), asked again every ``reprobe_after`` seconds."""
        key, verdict = why.key, probe.verdict
        if not why.current:
            return
        if verdict is Verdict.FITS:
            server = ipaddress.ip_address(probe.remote)
            if why.sent:
                because = (
                    "smaller segments to it got through where full-sized ones did not; "
                    f"pings of {probe.big} bytes to {server} come back"
                )
            else:
                because = f"the large ping to it goes unanswered; to {server} it comes back"
            self._beyond(key, why.host, because, "to" if why.sent else "from")
        else:
            if verdict is Verdict.UNKNOWN:
                self._note(self._silent, probe.remote, now)
            self._narrow(key, probe.small, hole_at=now)

    def _silent_hole(self, why: _Probing, because: str | None, now: float) -> None:
        """The stalled connection's server answered no ping, and the path under the tunnel
        carries full-sized packets (``because``), or no other host behind the same peer
        can be asked whether it does (None: a config without DNS servers, no other
        connection open). If that connection shows signs of a black hole
        (``_hole_signs``: only small segments came, a reply's headers and nothing of the
        full-sized rest; or the server's ACKs say it sent data that never came), that
        server alone narrows (as a mere slow server, it would lose little: its connections
        send smaller segments; with nobody to ask, wherever the hole is: under the tunnel,
        the next stalled connection finds it too); otherwise nothing (a slow server)."""
        signs = _hole_signs(why.tcp)
        if not signs or not why.current:
            return
        self._narrow_host(why.host, self.stack.tcp_config.blackhole_mtu, now)
        if because is not None:
            self._beyond(why.key, why.host, f"{signs} and answers no ping; {because}")
            return
        logger.info(
            "full-sized packets from %s seem to vanish on the way (%s and answers no "
            "ping; no other host behind WireGuard endpoint %s to ask whether the path "
            "under the tunnel carries them): TCP with it now uses packets of at most "
            "%d bytes",
            ipaddress.ip_address(why.host), signs, format_endpoint(why.key),
            self.stack.path_mtu(why.host),
        )  # fmt: skip

    def _beyond(self, key: tuple[str, int], host: bytes, because: str, way: str = "from") -> None:
        logger.info(
            "full-sized packets %s %s seem to vanish beyond WireGuard endpoint %s (%s): "
            "TCP with it now uses packets of at most %d bytes",
            way, ipaddress.ip_address(host), format_endpoint(key), because,
            self.stack.path_mtu(host),
        )  # fmt: skip

    def _ask(
        self,
        why: _Probing,
        local: bytes,
        remote: bytes,
        big: int,
        small: int,
        now: float,
        interval: float,
    ) -> None:
        probe = self.stack.probe_path(local, remote, big, small, now, interval)
        self._probing[probe] = why

    def _asking(self, what: tuple[str, int] | bytes) -> bool:
        """A probe about endpoint ``what``'s path is under way, or one about (or
        confirming a hole on) host ``what``'s."""
        return any(what in (why.about, why.host) for why in self._probing.values())

    @staticmethod
    def _note(
        table: dict[tuple[str, int] | bytes, float], what: tuple[str, int] | bytes, now: float
    ) -> None:
        """Note in ``_probed`` or ``_silent`` that ``what`` was found so at ``now``."""
        if len(table) >= 1024:  # (forget old ones)
            for k in [k for k, at in table.items() if now - at >= PROBE_AGAIN]:
                del table[k]
        table[what] = now

    @staticmethod
    def _recently(
        table: dict[tuple[str, int] | bytes, float], what: tuple[str, int] | bytes, now: float
    ) -> bool:
        """``what`` is noted in ``table`` (``_note``) less than ``PROBE_AGAIN`` seconds ago."""
        return now - table.get(what, -PROBE_AGAIN) < PROBE_AGAIN

    def _ask_another(
        self, why: _Probing, skip: bytes, big: int, small: int, interval: float, now: float
    ) -> bool:
        """Ask the path under the tunnel whether it carries ``big``-byte packets and
        ``small`` ones (a path probe's question) with pings to a host other than ``skip``
        behind the same peer: the tunnel's DNS server (a VPN's resolver is usually the
        exit itself or next to it), else the server of another open connection; not one
        that answered no ping lately, nor one whose own path beyond the exit is narrowed.
        When ``skip`` answered none (many firewall ICMP), or to tell a hole under the
        tunnel from one beyond it (``_confirm``). Whether one was asked."""
        stack, route = self.stack, self.device.route
        hosts = [server.packed for server in self.config.dns_servers]
        hosts += [tcp.remote_addr for tcp in stack.tcp_sockets if tcp.state is TcpState.ESTABLISHED]
        for raw in dict.fromkeys(hosts):
            local = stack.local_address(4 if len(raw) == 4 else 6)
            if (
                raw != skip
                and local is not None
                and raw not in self._holes
                and route(raw) is why.peer
                and not self._recently(self._silent, raw, now)
            ):
                self._ask(why, local, raw, big, small, now, interval)
                return True
        return False

    def _set_hole(self, key: tuple[str, int] | bytes, at: float | None) -> None:
        """Ask at ``at`` whether the black hole of endpoint ``key``'s path (or, raw address
        bytes, of the path beyond its exit to that host) is gone (None: it is no longer
        narrowed for one); ``_reprobe_at`` follows."""
        if at is None:
            self._holes.pop(key, None)
        else:
            self._holes[key] = at
        self._reprobe_at = min(self._holes.values(), default=_NEVER)

    def _reprobe(self, now: float) -> None:
        """Ask the path of each endpoint narrowed for a black hole ``reprobe_after`` seconds
        ago whether it carries the tunnel's full size again, with pings to the server of
        one of its open connections (the tunnel's MTU, and the narrowed size that passes;
        another host if that one answers no ping): answered, it is wide again
        (``_widen``). With no connection open through it, ask again ``PROBE_AGAIN``
        seconds later. A host whose path alone was narrowed is asked itself, while a
        connection to it is open (``_widen_host`` when the big ping comes back); with
        none open it is forgotten, as Linux's learnt path MTUs expire: the next
        connection starts full-sized and finds the hole again if it is still there."""
        stack, route = self.stack, self.device.route
        for key, due in list(self._holes.items()):
            if due > now:
                continue
            self._set_hole(key, now + self.reprobe_after)
            host = key if isinstance(key, bytes) else b""
            inner = stack.path_mtu(host) if host else self.narrow_paths.get(key)
            if inner is None or self._asking(key):
                continue
            for tcp in stack.tcp_sockets:
                remote = tcp.remote_addr
                if tcp.state is not TcpState.ESTABLISHED or (
                    remote != host if host else remote in self._holes  # (its own hole beyond)
                ):
                    continue
                peer = route(remote)
                if peer is None or peer.endpoint is None or not (host or peer.endpoint == key):
                    continue
                endpoint = (peer.endpoint[0], peer.endpoint[1])
                why = _Probing(endpoint, peer, peer.handshakes_completed, "up", host)
                big, interval = stack.mtu, _interval(tcp)
                self._ask(why, tcp.local_addr, tcp.remote_addr, big, inner, now, interval)
                break
            else:
                if host:
                    self._widen_host(host)
                else:
                    self._set_hole(key, now + PROBE_AGAIN)

    def _widen(self, key: tuple[str, int]) -> None:
        """The path to endpoint ``key``, narrowed for a black hole, carries the tunnel's full
        size again: connections through it, open ones included, go back to full-sized
        segments, and those opened later offer the full MSS again."""
        inner = self.narrow_paths.pop(key)
        self._set_hole(key, None)
        logger.info(
            "full-sized packets to WireGuard endpoint %s pass again: TCP through it sends "
            "packets of up to %d bytes again",
            format_endpoint(key), self.stack.mtu,
        )  # fmt: skip
        stack, route = self.stack, self.device.route
        for tcp in stack.tcp_sockets:
            peer = route(tcp.remote_addr)
            if (
                peer is not None
                and peer.endpoint == key
                and stack.path_mtu(tcp.remote_addr) == inner
                and tcp.remote_addr not in self._holes
            ):
                stack.raise_path_mtu(tcp.remote_addr, stack.mtu)

    def _narrow_host(self, host: bytes, inner: int, now: float, tell: bool = True) -> None:
        """Packets of ``inner`` bytes reach ``host`` (raw address) and come back, full-sized
        ones not: its connections, and those opened later, send segments that fit and
        offer that MSS, and the servers of open ones are told (as ``_narrow`` does for a
        whole endpoint; unless not ``tell``: ``_tell_host`` later); asked again in
        ``reprobe_after`` seconds (``_reprobe``)."""
        self.stack.lower_path_mtu(host, inner)
        self._set_hole(host, now + self.reprobe_after)
        if tell:
            self._tell_host(host)

    def _tell_host(self, host: bytes) -> None:
        """Tell the server ``host`` of each open connection that its path to us carries
        only our narrowed size (an ICMP error through the tunnel, as a router would send).
        (Linux keeps such a path MTU for ten minutes and offers the smaller MSS in new
        connections meanwhile: no way to take it back.)"""
        stack = self.stack
        for tcp in stack.tcp_sockets:
            if tcp.remote_addr == host and tcp.state in _PEER_SENDS:
                stack.tell_remote_path_mtu(tcp, stack.path_mtu(host))

    def _widen_host(self, host: bytes, quiet: bool = False) -> None:
        """Host ``host``'s path, narrowed alone (``_narrow_host``), is no longer: its
        connections go back to the size of their endpoint's path (said unless ``quiet``:
        the caller says why)."""
        self._set_hole(host, None)
        peer = self.device.route(host)
        inner = self.stack.mtu
        if peer is not None and peer.endpoint is not None:
            inner = self.narrow_paths.get((peer.endpoint[0], peer.endpoint[1]), inner)
        if self.stack.raise_path_mtu(host, inner) and not quiet:
            logger.info(
                "full-sized packets from %s pass again: TCP with it uses packets of up to "
                "%d bytes again",
                ipaddress.ip_address(host), inner,
            )  # fmt: skip

    def _narrow(
        self,
        endpoint: Endpoint,
        inner: int,
        *,
        hole_at: float | None = None,
        path_mtu: int | None = None,
    ) -> None:
        """Inner packets of ``inner`` bytes fit the path to ``endpoint`` (rounded down to
        the multiple of 16 they are padded to before sealing): every TCP connection through
        a peer there, and those opened later, sends segments that fit
        (``Stack.lower_path_mtu``) and offers that MSS in its SYN. Nothing then waits on
        fragments, which IPv6 paths often drop, and GSO runs go out whole. ``hole_at``:
        the time a black hole was found (no ICMP error said so): its path is asked again
        later (``_reprobe``); ``path_mtu``: what the kernel said the path carries."""
        inner &= ~15
        key = (endpoint[0], endpoint[1])
        new = inner < self.narrow_paths.get(key, self.stack.mtu)
        if new:
            self.narrow_paths[key] = inner
            for probe, probing in list(self._probing.items()):
                if probing.key == key:  # (answered: its big pings would only vanish)
                    self.stack.cancel_probe(probe)
                    del self._probing[probe]
            for host in [h for h in self._holes if isinstance(h, bytes)]:
                peer = self.device.route(host)
                if peer is not None and peer.endpoint == key and self.stack.path_mtu(host) >= inner:
                    self._set_hole(host, None)  # (this narrowing covers its path)
            if hole_at is not None:
                self._set_hole(key, hole_at + self.reprobe_after)
                logger.warning(
                    "full-sized packets to WireGuard endpoint %s seem to vanish without an "
                    "ICMP error (a path MTU black hole: a narrower link, its errors dropped): TCP "
                    "through it now sends packets of at most %d bytes; MTU = %d in the "
                    "config starts there",
                    format_endpoint(endpoint), inner, inner,
                )  # fmt: skip
            else:
                logger.info(
                    "the path to WireGuard endpoint %s carries at most %d bytes per packet "
                    "(the tunnel's MTU %d needs %d): TCP through it now sends packets of at "
                    "most %d bytes",
                    format_endpoint(endpoint), path_mtu, self.stack.mtu,
                    self.stack.mtu + TRANSPORT_MIN_SIZE + _ip_udp_overhead(endpoint), inner,
                )  # fmt: skip
        inner = self.narrow_paths[key]
        stack, route = self.stack, self.device.route
        for tcp in stack.tcp_sockets:
            peer = route(tcp.remote_addr)
            if peer is not None and peer.endpoint == key:
                stack.lower_path_mtu(tcp.remote_addr, inner)  # (sent at the next flush)
                if new and tcp.state in _PEER_SENDS:
                    # and the server's segments of an open connection: it would go on
                    # sending full-sized ones (into the black hole, or in fragments)
                    stack.tell_remote_path_mtu(tcp, inner)

    def _handle_events(self, events: list) -> bool:
        """Log and act on device events; True if TCP segments are now due (poll again)."""
        kicked = 0
        for event in events:
            if isinstance(event, HandshakeCompleted):
                peer = event.peer
                self._failed.pop(peer.public_key, None)
                if event.endpoint is not None:
                    self.icmp_errors.pop((event.endpoint[0], event.endpoint[1]), None)
                # A working session: connections waiting out a backed-off retransmission
                # timer towards this peer (a pending SYN above all) retransmit now.
                kicked += self.stack.retransmit_now(
                    lambda addr, p=peer, route=self.device.route: route(addr) is p
                )
                what = "rekeyed" if peer.handshakes_completed > 1 else "handshake completed"
                logger.info(
                    "WireGuard %s with peer %s at %s",
                    what,
                    peer.public_key_b64,
                    format_endpoint(event.endpoint),
                )
            elif isinstance(event, HandshakeFailed):
                self._failed[event.peer.public_key] = event
                failed = event.peer
                if failed.bad_responses:
                    why = _undecryptable(failed)
                else:
                    icmp = self.icmp_cause(failed, event.now)
                    why = "no response" if icmp is None else f"no response, and {icmp}"
                logger.warning(
                    "WireGuard handshake with peer %s at %s failed after %d attempts: %s",
                    failed.public_key_b64,
                    format_endpoint(event.endpoint),
                    event.attempts,
                    why,
                )
            elif isinstance(event, KeysZeroed):
                logger.debug("keys of peer %s erased", event.peer.public_key_b64)
            elif isinstance(event, KeyInUseElsewhere):
                logger.warning(
                    "WireGuard peer %s at %s sends us packets of sessions this tunnel never "
                    "made (%d within %g s): another client is using this config's PrivateKey "
                    "at the same time (a second mitmproxy with this config, wg-quick up of "
                    "the same file, a phone with the same key?). The peer talks to one "
                    "client per key at a time: the two take each other's traffic, and "
                    "connections stall, until one of them stops",
                    event.peer.public_key_b64,
                    format_endpoint(event.endpoint),
                    event.packets,
                    FOREIGN_WINDOW,
                )
        return kicked > 0

    async def _park(self, waitable: _Waitable, deadline: float = _NEVER) -> None:
        parked: dict[Any, Any]
        if isinstance(waitable, (TunnelStream, TunnelUdpSocket)):
            parked, key = self._parked_sockets, waitable._sock
        else:
            parked, key = self._parked, id(waitable)
        parked[key] = waitable
        try:
            if deadline == _NEVER:
                await waitable._lot.park()  # (a scope without a deadline costs ~4 us)
            else:
                with trio.CancelScope(deadline=deadline):
                    await waitable._lot.park()
        finally:
            if not waitable._lot:
                parked.pop(key, None)

    # -- public API ---------------------------------------------------------------------------

    def route(self, address: str | IPAddress) -> Peer | None:
        """The peer whose AllowedIPs contain ``address``, or None."""
        return self.device.route(ipaddress.ip_address(address).packed)

    def path_rtt(self, address: str | IPAddress) -> float | None:
        """The round trip (seconds) the last handshake with the peer that routes
        ``address`` took: a lower bound for one to ``address``, for a timer that has no
        measurement of its own yet (the resolver's first query to a server; a connect's
        SYN, :meth:`_connect`). None before a handshake, or if no peer routes it."""
        peer = self.device.route(ipaddress.ip_address(address).packed)
        return None if peer is None else peer.handshake_rtt

    def status(self) -> TunnelStatus:
        socks: list[socket.socket] = []
        receive_buffer = 0  # (a group's: all its sockets' together)
        receive_sockets = 1
        for sock in self._sockets.values():
            group = self._groups.get(sock, [sock])
            socks += group
            try:
                size = sum(s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) for s in group)
            except OSError:
                continue
            if size > receive_buffer:
                receive_buffer, receive_sockets = size, len(group)
        now = trio.current_time()
        return TunnelStatus(
            self.device.status(now),
            len(self._streams),
            self.device.unix_time(now),
            self.narrowed(),
            socket_drops=socket_drops(socks),
            receive_buffer=receive_buffer,
            receive_sockets=receive_sockets,
            unreachable=self.unreachable(now),
        )

    def unreachable(self, now: float) -> tuple[str, ...]:
        """What the ICMP errors the probes of unanswered handshakes found say (unreachable.py),
        a line each (for status); a completed handshake, or a later probe that finds none,
        takes one back."""
        return tuple(
            f"WireGuard endpoint {format_endpoint(key)}: {describe_icmp(key, error)} "
            f"({now - at:.0f} s ago)"
            for key, (at, error) in self.icmp_errors.items()
        )

    def narrowed(self) -> tuple[str, ...]:
        """The paths this tunnel sends smaller packets on than its MTU allows, a line each
        (for status): an endpoint's (``_narrow``: the kernel or an ICMP error said so, or
        a black hole was found; ``_reprobe`` asks again), or the way to one server alone
        (``_narrow_host``: a black hole beyond the exit)."""
        lines = []
        for key, inner in self.narrow_paths.items():
            why = "a black hole" if key in self._holes else "the path's MTU"
            lines.append(
                f"path to WireGuard endpoint {format_endpoint(key)}: packets of at most "
                f"{inner} bytes ({why})"
            )
        for key in self._holes:
            if isinstance(key, bytes):
                lines.append(
                    f"path to {ipaddress.ip_address(key)}: packets of at most "
                    f"{self.stack.path_mtu(key)} bytes (a black hole on the way to it alone)"
                )
        return tuple(lines)

    async def resolve(self, name: str) -> list[IPAddress]:
        """Addresses for ``name`` (an IP literal is returned as it is)."""
        try:
            return [ipaddress.ip_address(name)]
        except ValueError:
            pass
        return await self._resolver.resolve(name)

    async def open_tcp_stream(
        self,
        host: str | IPAddress,
        port: int,
        *,
        happy_eyeballs_delay: float = 0.25,
        connect_timeout: float = 30.0,
    ) -> TunnelStream:
        """A TCP connection through the tunnel to ``host``:``port``.

        With several addresses (a name with A and AAAA records), attempts start
        ``happy_eyeballs_delay`` apart, alternating families (RFC 8305); the first to
        connect wins.
        """
        addresses = await self.resolve(str(host))
        addresses = _interleave(addresses)
        if len(addresses) == 1:
            return await self._connect(addresses[0], port, connect_timeout)
        return await _happy_eyeballs(
            [lambda a=a: self._connect(a, port, connect_timeout) for a in addresses],
            happy_eyeballs_delay,
        )

    async def _connect(self, address: IPAddress, port: int, timeout: float) -> TunnelStream:
        if self._closed:
            raise trio.ClosedResourceError("the tunnel is closed")
        peer = self.device.route(address.packed)
        if peer is None:
            raise NoRoute(
                errno.ENETUNREACH,
                f"{address} is not in any WireGuard peer's AllowedIPs "
                "(refusing to send it outside the tunnel)",
            )
        if not any(iface.version == address.version for iface in self.stack.interfaces):
            raise OSError(
                errno.EADDRNOTAVAIL,
                f"cannot reach {address}: the tunnel has no IPv{address.version} Address",
            )
        started = trio.current_time()
        self._failed.pop(peer.public_key, None)
        if self.narrow_paths and peer.endpoint is not None:
            inner = self.narrow_paths.get((peer.endpoint[0], peer.endpoint[1]))
            if inner is not None:
                self.stack.lower_path_mtu(address.packed, inner)
        # With a session that may send, the SYN leaves at once: its timeout may start from
        # the last handshake's round trip (a lower bound for this one) when nothing was
        # measured to the address yet. Without one (none yet, or expired: an idle tunnel),
        # the handshake's own time would count against it.
        path_rtt = peer.handshake_rtt if self.device.can_send(peer, started) else None
        guessed = path_rtt is not None and self.stack.known_rto(address.packed, started) is None
        sock = self.stack.tcp_connect(address, port, started, path_rtt=path_rtt)
        stream = TunnelStream(self, sock, peer)
        stream._waiting_for.add("connect")
        self._connecting[sock] = _PendingConnect(peer, started, guessed)
        self._flush(started)
        deadline = started + timeout
        handshake_deadline = started + self.handshake_timeout
        # A pause (a suspend, a stopped process) does not count against the connect: the
        # SYN or the handshake could not go again meanwhile, and its answer may be waiting
        # in a socket buffer (Linux's SYN retries do not count a suspend either).
        paused = self.paused_total
        try:
            while True:
                error = sock.error
                if error is not None:
                    if isinstance(error, ConnectionRefusedError):
                        raise ConnectionRefusedError(
                            errno.ECONNREFUSED,
                            f"connection to {format_endpoint((address, port))} refused",
                        ) from error
                    raise error
                if sock.state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
                    break
                if sock.is_closed:
                    raise ConnectionResetError(
                        errno.ECONNRESET, f"connection to {format_endpoint((address, port))} closed"
                    )
                now = trio.current_time()
                slept = self._paused(now) - paused
                if slept:
                    deadline += slept
                    handshake_deadline += slept
                    paused += slept
                failed = self._failed.get(peer.public_key)
                if failed is not None or (peer.current is None and now >= handshake_deadline):
                    raise self._handshake_timeout(peer, started)
                if now >= deadline:
                    raise TimeoutError(
                        errno.ETIMEDOUT,
                        f"TCP connection to {format_endpoint((address, port))} timed out",
                    )
                wake = deadline if peer.current is not None else min(deadline, handshake_deadline)
                await self._park(stream, wake)
        except BaseException:
            del self._connecting[sock]
            if not sock.is_closed:
                sock.abort(trio.current_time())
                self._flush()
            raise
        del self._connecting[sock]
        stream._waiting_for.clear()
        self._streams.add(stream)
        if self._source_at == _NEVER:  # (the first open connection: from now on)
            self._check_sources(trio.current_time())
            if self._source_at < self._timer_at:
                self._arm_timer(self._source_at)
        return stream

    def _probe_silent(self, now: float) -> None:
        """Probe the endpoint of each peer whose initiation has gone unanswered for
        ``PROBE_AFTER`` s while no session can carry packets, for an ICMP error
        (unreachable.py), at most once per ``PROBE_INTERVAL`` per endpoint (a rekey the
        current session covers is no question of reachability). Run by the timer task,
        which runs at each initiation's retries (rule hs-early's after three round trips
        or 1 s, REKEY_TIMEOUT's) and at ``_probe_at``, the next probe this finds due. Not
        for a tunnel inside another: its endpoint lies beyond that one's exit."""
        nursery = self._nursery
        if nursery is None or self.via is not None:
            return
        device = self.device
        due = _NEVER
        for peer in device.peers.values():
            started = peer.handshake_started
            endpoint = peer.endpoint
            if started is None or endpoint is None or device.can_send(peer, now):
                continue
            key = (endpoint[0], endpoint[1])
            at = started + PROBE_AFTER
            last = self._probed.get(key)
            if last is not None and last + PROBE_INTERVAL > at:
                at = last + PROBE_INTERVAL
            if now >= at:
                self._probed[key] = now
                # The probe's byte goes here, ahead of what the timer task's flush sends
                # next (this tick's retried initiation): the endpoint's host or a router
                # may have one ICMP error left in its ration, and only the probe reads one.
                sock = send_probe(self._probe_socket, key)
                nursery.start_soon(
                    self._background, "endpoint probe", self._probe_endpoint, key, sock
                )
            elif at < due:
                due = at
        self._probe_at = due

    async def _probe_endpoint(self, key: tuple[str, int], sock: socket.socket | None) -> None:
        """Wait for what comes back to the probe ``sock`` (sent to ``key`` by send_probe;
        None: it could not be sent)."""
        error = None if sock is None else await probe_answer(sock, PROBE_WAIT)
        if error is None:
            self.icmp_errors.pop(key, None)  # (what an older probe found no longer holds)
        else:
            self.icmp_errors[key] = (trio.current_time(), error)
            logger.info(
                "WireGuard endpoint %s: %s", format_endpoint(key), describe_icmp(key, error)
            )

    def icmp_cause(self, peer: Peer, since: float) -> str | None:
        """What an ICMP error that came back for ``peer``'s endpoint since ``since`` less
        ``PROBE_INTERVAL`` says (unreachable.py), or None."""
        endpoint = peer.endpoint
        if endpoint is None:
            return None
        key = (endpoint[0], endpoint[1])
        entry = self.icmp_errors.get(key)
        if entry is None or entry[0] < since - PROBE_INTERVAL:
            return None
        return describe_icmp(key, entry[1])

    def _handshake_timeout(self, peer: Peer, started: float) -> HandshakeTimeout:
        """The error for a wait from ``started`` (trio's clock) that no handshake ended."""
        who = f"WireGuard peer {peer.public_key_b64} at {format_endpoint(peer.endpoint)}"
        if peer.handshake_started is not None:  # (an attempt already under way at start)
            started = min(started, peer.handshake_started)
        if peer.last_bad_response >= started:
            return HandshakeTimeout(
                f"{who} answered the handshake, but {_undecryptable(peer)} "
                f"(no session within {self.handshake_timeout:g} s)",
                cause=f"it answered, but {_undecryptable(peer)}",
            )
        icmp = self.icmp_cause(peer, started)
        if icmp is not None:
            return HandshakeTimeout(
                f"{who} did not answer the handshake within {self.handshake_timeout:g} s "
                f"({peer.handshake_attempts_total} initiations sent), and {icmp}",
                cause=icmp,
            )
        path = ";"
        if self.via is not None:
            # Multi-hop: say whether the hop underneath was up, the first thing to check.
            outer = [p for p in self.via.device.peers.values() if p.current is not None]
            path = (
                f" through the outer tunnel {self.via!r}, which "
                + ("has a session" if outer else "has NO session with its peer either")
                + ";"
            )
        return HandshakeTimeout(
            f"{who} did not answer the handshake within {self.handshake_timeout:g} s "
            f"({peer.handshake_attempts_total} initiations sent{path} is the endpoint "
            "reachable, and does the peer know our public key?)"
        )

    async def handshake(self, peer: Peer) -> float:
        """Start a handshake with ``peer`` now and wait until one completes; returns the
        (trio clock) time it completed. :class:`HandshakeTimeout` when the peer stays silent
        for ``handshake_timeout``; OSError when the initiation cannot even be sent.

        WireGuard sends at most one initiation per REKEY_TIMEOUT (whitepaper §6.1): within
        that time of the last one (a session just made), this waits for the moment it may
        start (a handshake that completes meanwhile, e.g. the peer's, is the answer), and
        the peer's silence counts from the initiation."""
        completed = peer.handshakes_completed
        self._failed.pop(peer.public_key, None)
        allowed = peer.initiation_allowed_at
        if peer.handshake is None and trio.current_time() < allowed:
            waitable = _HandshakeWaitable(self, peer, completed)
            while peer.handshakes_completed == completed and trio.current_time() < allowed:
                await self._park(waitable, allowed)
            if peer.handshakes_completed != completed:
                assert peer.last_handshake is not None
                return peer.last_handshake
        started = trio.current_time()
        self._send_error = None
        self.device.connect(peer, started, self._datagrams)
        self._flush(started)
        if self._send_error is not None and self._send_error[0] == peer.endpoint:
            endpoint, error = self._send_error
            raise OSError(
                error.errno, f"cannot send to {format_endpoint(endpoint)}: {error.strerror}"
            )
        waitable = _HandshakeWaitable(self, peer, completed)
        deadline = started + self.handshake_timeout
        while peer.handshakes_completed == completed:
            if peer.public_key in self._failed or trio.current_time() >= deadline:
                raise self._handshake_timeout(peer, started)
            await self._park(waitable, deadline)
        assert peer.last_handshake is not None
        return peer.last_handshake

    async def wait_session(self, address: str | IPAddress) -> None:
        """Wait until the peer that routes ``address`` has a session a packet can leave on
        (``Device.can_send``: not expired after an idle spell, nor suspect), starting a
        handshake if none is under way (rate-limited by the device).

        A datagram's own timeout (the DNS resolver's few seconds) then counts from when it
        can leave, not from a handshake still in flight: on a busy machine, or after one lost
        initiation (the next goes REKEY_TIMEOUT later), that takes longer than the query's
        timeout and a first lookup through a fresh tunnel failed. :class:`HandshakeTimeout`
        once the current handshake attempt is ``handshake_timeout`` old, as connects get.
        """
        peer = self.device.route(ipaddress.ip_address(address).packed)
        now = trio.current_time()
        if peer is None or self._closed or self.device.can_send(peer, now):
            return
        if peer.handshake is None:
            self.device.connect(peer, now, self._datagrams)
            self._flush(now)
        started = peer.handshake_started if peer.handshake_started is not None else now
        deadline = started + self.handshake_timeout
        waitable = _HandshakeWaitable(self, peer, peer.handshakes_completed)
        while not self.device.can_send(peer, trio.current_time()):
            if peer.public_key in self._failed or trio.current_time() >= deadline:
                raise self._handshake_timeout(peer, started)
            await self._park(waitable, deadline)

    async def listen_tcp(self, port: int) -> TunnelListener:
        """Accept TCP connections on ``port`` of the tunnel's addresses (tests, exit role)."""
        return TunnelListener(self, self.stack.tcp_listen(port))

    async def open_udp_socket(self, family: int = 4) -> TunnelUdpSocket:
        """A UDP socket on an ephemeral port of the tunnel address of ``family`` (4 or 6)."""
        await trio.lowlevel.checkpoint()
        return TunnelUdpSocket(self, self.stack.udp_bind(0, family=family))


class TunnelStream(trio.abc.HalfCloseableStream, _Waitable):
    """A TCP connection through the tunnel, as a trio stream."""

    __slots__ = (
        "_closed",
        "_peer",
        "_receive_busy",
        "_send_busy",
        "_sock",
        "_tunnel",
        "_waiting_for",
        "local_address",
        "remote_address",
    )

    def __init__(self, tunnel: Tunnel, sock: TcpSocket, peer: Peer) -> None:
        _Waitable.__init__(self)
        self._tunnel = tunnel
        self._sock = sock
        self._peer = peer
        self._closed = False
        self._send_busy = False
        self._receive_busy = False
        #: What parked tasks wait for: "connect", "send" and/or "recv".
        self._waiting_for: set[str] = set()
        self.local_address = (str(ipaddress.ip_address(sock.local_addr)), sock.local_port)
        self.remote_address = (str(ipaddress.ip_address(sock.remote_addr)), sock.remote_port)

    def __repr__(self) -> str:
        return (
            f"<TunnelStream {format_endpoint(self.local_address)} -> "
            f"{format_endpoint(self.remote_address)} {self._sock.state.name}>"
        )

    @property
    def peer(self) -> Peer:
        return self._peer

    @property
    def socket(self) -> TcpSocket:
        return self._sock

    def _ready(self) -> bool:
        sock = self._sock
        if self._closed or sock.error is not None or sock.is_closed:
            return True
        # A sender and a receiver may wait at the same time: wake for either condition.
        waiting = self._waiting_for
        if "connect" in waiting and (
            sock.state is not TcpState.SYN_SENT or self._peer.current is not None
        ):
            return True
        if "recv" in waiting and (sock.recv_available > 0 or sock.at_eof):
            return True
        if "send" in waiting:
            # A writer waiting for a full send buffer wakes once a third of it is free (as
            # Linux's sk_stream_write_space), not at each ACK's few KB: one wake-up and flush
            # per ~1/3 buffer instead of per ACK batch. Or sooner, at any free space, when
            # the sender is about to run dry: after a loss most of the buffer may be data
            # sent and not yet acknowledged (SACKed beyond a hole), and less than a third
            # free then must not leave the sender idle.
            space = sock.send_space
            return space > 0 and (3 * space >= sock.send_buffer or sock.send_unsent < 2 * sock.mss)
        return False

    async def _wait_for(self, what: str) -> None:
        self._waiting_for.add(what)
        try:
            await self._tunnel._park(self)
        finally:
            self._waiting_for.discard(what)

    def _broken(self) -> trio.BrokenResourceError:
        err = self._sock.error
        return trio.BrokenResourceError(
            f"connection to {format_endpoint(self.remote_address)} broke: {err or 'closed'}"
        )

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._send_busy = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("stream is closed")
            view = memoryview(data)
            sock = self._sock
            tunnel = self._tunnel
            waited = False
            while view.nbytes:
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed while sending")
                if sock.error is not None:
                    raise self._broken() from sock.error
                try:
                    n = sock.send(view)
                except BrokenPipeError:
                    if self._closed:
                        raise trio.ClosedResourceError("stream is closed") from None
                    if sock.error is None and sock.state is not TcpState.CLOSED:
                        raise trio.ClosedResourceError("cannot send after send_eof()") from None
                    raise self._broken() from None
                except OSError as e:
                    raise self._broken() from e
                if n:
                    view = view[n:]
                    tunnel._flush()
                    continue
                waited = True
                await self._wait_for("send")
            if not waited:
                await trio.lowlevel.checkpoint()
        finally:
            self._send_busy = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._send_busy = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("stream is closed")
            if self._sock.send_space == 0 and self._sock.error is None:
                await self._wait_for("send")
            else:
                await trio.lowlevel.checkpoint()
            if self._closed:
                raise trio.ClosedResourceError("stream is closed")
        finally:
            self._send_busy = False

    async def send_eof(self) -> None:
        if self._send_busy:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self._closed:
            raise trio.ClosedResourceError("stream is closed")
        sock = self._sock
        if sock.error is None and sock.state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
            sock.shutdown_write(trio.current_time())
            self._tunnel._flush()
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = 65536
        elif operator.index(max_bytes) < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receive_busy:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receive_busy = True
        try:
            sock = self._sock
            tunnel = self._tunnel
            waited = False
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream is closed")
                data = sock.recv(max_bytes)
                if data:
                    if tunnel.stack.pending:
                        tunnel._flush()  # the read opened the window: tell the peer now
                    if not waited:
                        await trio.lowlevel.checkpoint()
                    return data
                if sock.at_eof:
                    if not waited:
                        await trio.lowlevel.checkpoint()
                    return b""
                if sock.error is not None:
                    raise self._broken() from sock.error
                if sock.is_closed:
                    raise self._broken()
                waited = True
                await self._wait_for("recv")
        finally:
            self._receive_busy = False

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            sock = self._sock
            tunnel = self._tunnel
            tunnel._streams.discard(self)
            if not sock.is_closed and sock.error is None:
                sock.close(trio.current_time())
            tunnel._flush()
            self._lot.unpark_all()
        await trio.lowlevel.checkpoint()


class TunnelListener(trio.abc.Listener[TunnelStream]):
    def __init__(self, tunnel: Tunnel, listener: TcpListener) -> None:
        self._tunnel = tunnel
        self._listener = listener
        self._waitable = _AcceptWaitable(listener)

    async def accept(self) -> TunnelStream:
        while True:
            sock = self._listener.accept()
            if sock is not None:
                peer = self._tunnel.device.route(sock.remote_addr)
                stream = TunnelStream(self._tunnel, sock, peer)  # type: ignore[arg-type]
                self._tunnel._streams.add(stream)
                self._tunnel._flush()
                await trio.lowlevel.checkpoint()
                return stream
            await self._tunnel._park(self._waitable)

    async def aclose(self) -> None:
        self._listener.close(trio.current_time())
        self._tunnel._flush()
        await trio.lowlevel.checkpoint()


class _HandshakeWaitable(_Waitable):
    __slots__ = ("_completed", "_peer", "_tunnel")

    def __init__(self, tunnel: Tunnel, peer: Peer, completed: int) -> None:
        super().__init__()
        self._tunnel = tunnel
        self._peer = peer
        self._completed = completed

    def _ready(self) -> bool:
        peer = self._peer
        return (
            peer.handshakes_completed != self._completed or peer.public_key in self._tunnel._failed
        )


class _AcceptWaitable(_Waitable):
    __slots__ = ("_listener",)

    def __init__(self, listener: TcpListener) -> None:
        super().__init__()
        self._listener = listener

    def _ready(self) -> bool:
        return self._listener.pending > 0


class TunnelUdpSocket(_Waitable):
    """A UDP socket inside the tunnel.

    When the tunnel closes, the socket acts closed (``trio.ClosedResourceError``) and a task
    waiting in :meth:`recvfrom` wakes: a tunnel running *through* this one (multi-hop,
    :mod:`mitm_wg.runtime.via`) learns of it that way.
    """

    __slots__ = ("_closed", "_sock", "_tunnel", "local_address")

    def __init__(self, tunnel: Tunnel, sock: UdpSocket) -> None:
        super().__init__()
        self._tunnel = tunnel
        self._sock = sock
        self._closed = False
        local = sock.local_addr
        if local:
            host = str(ipaddress.ip_address(local))
        else:  # bound to a family: datagrams leave from the tunnel's address of that family
            host = next(
                (str(i.ip) for i in tunnel.stack.interfaces if i.version == sock.family), ""
            )
        self.local_address = (host, sock.local_port)

    def _ready(self) -> bool:
        return (
            self._closed
            or self._tunnel._closed
            or self._sock.pending > 0
            or self._sock.error is not None
        )

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("UDP socket is closed")
        if self._tunnel._closed:
            raise trio.ClosedResourceError("the tunnel of this UDP socket is closed")

    def sendto_nowait(self, data: bytes, address: tuple[str, int]) -> None:
        """Send a datagram now (UDP never waits: a full path drops, as with a kernel socket)."""
        self._check_open()
        host, port = address
        ip = ipaddress.ip_address(host)
        if self._tunnel.device.route(ip.packed) is None:
            raise NoRoute(errno.ENETUNREACH, f"{ip} is not in any WireGuard peer's AllowedIPs")
        self._sock.sendto(data, (ip, port), trio.current_time())
        self._tunnel._flush()

    async def sendto(self, data: bytes, address: tuple[str, int]) -> None:
        self.sendto_nowait(data, address)
        await trio.lowlevel.checkpoint()

    def sendmany_nowait(self, datagrams: Iterable[tuple[bytes, tuple[str, int]]]) -> int:
        """Send several datagrams with one flush, so they leave as one batch (UDP GSO).

        A datagram that cannot be sent (outside every AllowedIPs, larger than the path MTU)
        is dropped, as a kernel socket would drop it; returns how many were dropped.
        """
        self._check_open()
        tunnel, sock = self._tunnel, self._sock
        now = trio.current_time()
        routed: dict[str, IPAddress | None] = {}  # each destination checked once per batch
        dropped = 0
        for data, (host, port) in datagrams:
            if host in routed:
                ip = routed[host]
            else:
                ip = ipaddress.ip_address(host)
                if tunnel.device.route(ip.packed) is None:
                    ip = None
                routed[host] = ip
            if ip is None:
                dropped += 1
                continue
            try:
                sock.sendto(data, (ip, port), now)
            except OSError as e:
                dropped += 1
                logger.debug("UDP send to %s dropped: %s", format_endpoint((host, port)), e)
        tunnel._flush(now)
        return dropped

    def recvfrom_nowait(self) -> tuple[bytes, tuple[str, int]] | None:
        """The next queued datagram and its source, or None when none is queued."""
        self._check_open()
        return self._sock.recvfrom()

    async def recvfrom(self) -> tuple[bytes, tuple[str, int]]:
        while True:
            self._check_open()
            item = self._sock.recvfrom()
            if item is not None:
                await trio.lowlevel.checkpoint()
                return item
            err = self._sock.take_error()
            if err is not None:
                raise err
            await self._tunnel._park(self)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()
            self._lot.unpark_all()


#: Socket buffer sizes we ask for: a burst of a fast sender's window must fit while the
#: reader is busy with the previous batch, or the kernel drops datagrams (RcvbufErrors) and
#: TCP inside the tunnel has to recover. The kernel caps them at net.core.[rw]mem_max,
#: unless the process may pass that (CAP_NET_ADMIN: root, as wireguard-go runs).
UDP_BUFFER_BYTES = 4 << 20
#: For benches and tests: act as if net.core.rmem_max and wmem_max were this many bytes
#: and the process had no CAP_NET_ADMIN (212992: a stock kernel's, what an unprivileged
#: mitmproxy gets there); None: the kernel's own limits.
BUFFER_LIMIT: int | None = None
#: Datagrams kept for a socket whose send buffer is full (``Tunnel._queue``): ~3 MB, more
#: than a window's worth of one flush.
BACKLOG_MAX = 2048
#: Linux's SO_RCVBUFFORCE / SO_SNDBUFFORCE (not in Python's socket module): the sizes set
#: past net.core.[rw]mem_max, with CAP_NET_ADMIN. The numbers of asm-generic/socket.h, which
#: the common architectures use (alpha, mips, parisc and sparc have their own: not tried).
_FORCE = (
    {socket.SO_RCVBUF: 33, socket.SO_SNDBUF: 32}
    if sys.platform == "linux"
    and platform.machine() in {"x86_64", "i686", "i386", "aarch64", "armv7l", "armv6l",
                               "riscv64", "ppc64le", "ppc64", "s390x", "loongarch64"}
    else {}
)  # fmt: skip


def socket_drops(socks: Iterable[socket.socket]) -> int:
    """Datagrams the kernel dropped at ``socks`` because their receive buffer was full: the
    ``drops`` column of /proc/net/udp and udp6 for their inodes (Linux; 0 elsewhere, for a
    socket of another network namespace, or when unreadable). Read on demand (status), so
    the receive path pays nothing for it."""
    inodes = set()
    for sock in socks:
        try:
            inodes.add(os.fstat(sock.fileno()).st_ino)
        except OSError:
            pass
    total = 0
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        if not inodes:
            break
        try:
            with open(name) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
            fields = line.split()
            if len(fields) >= 13 and fields[9].isdigit() and int(fields[9]) in inodes:
                total += int(fields[12])
    return total


#: whether this process has said that the OS gave a smaller UDP receive buffer (said once)
_small_buffer_said = False


def _setup_socket(sock: socket.socket) -> None:
    """A new socket of the tunnel's: non-blocking, its buffers as large as it may have."""
    sock.setblocking(False)
    _grow_buffers(sock)


def _grow_buffers(sock: socket.socket) -> None:
    global _small_buffer_said
    limit = BUFFER_LIMIT
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            if limit is not None:  # (the kernel doubles it, as it does the sysctl's)
                sock.setsockopt(socket.SOL_SOCKET, option, min(limit, UDP_BUFFER_BYTES))
            elif sock.getsockopt(socket.SOL_SOCKET, option) < UDP_BUFFER_BYTES:
                force = _FORCE.get(option)
                try:
                    if force is None:
                        raise PermissionError
                    sock.setsockopt(socket.SOL_SOCKET, force, UDP_BUFFER_BYTES)
                except OSError:  # (EPERM: no CAP_NET_ADMIN; then up to the sysctl's limit)
                    sock.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER_BYTES)
        except OSError as e:  # not fatal: smaller buffers only cost speed
            logger.debug("cannot enlarge UDP socket buffer: %s", e)
    try:
        # (Linux reports twice what it granted, for its bookkeeping)
        got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    except OSError:
        return
    if got < UDP_BUFFER_BYTES and not _small_buffer_said:
        # An unprivileged process gets at most net.core.rmem_max (208 KiB on a stock Linux
        # kernel, doubled): a fast download then loses datagrams in bursts while the
        # tunnel works through the previous batch (bench_path --udp-buffer 212992, Debian
        # 13, 50 ms: 2500-4200 per 300 MiB, 0.93x Linux). A receive group (sockgroup.py)
        # makes up for it where the port is ephemeral (none dropped, 1.09x); the sysctl
        # gives the full size everywhere. wireguard-go, run as root, forces its own size.
        _small_buffer_said = True
        logger.warning(
            "the OS gave the tunnel's UDP socket a %d KiB receive buffer, not the %d KiB "
            "asked for: fast downloads (tens of MB/s) may lose datagrams (without a "
            "ListenPort the tunnel receives on several sockets to make up for it). On "
            "Linux raise the limit with `sysctl -w net.core.rmem_max=%d` (macOS: "
            "kern.ipc.maxsockbuf)",
            got >> 10,
            UDP_BUFFER_BYTES >> 10,
            UDP_BUFFER_BYTES,
        )


def _listen_port_error(config: WireGuardConfig, error: OSError) -> OSError:
    """The bind of the config's ListenPort failed: say which port, of which config, and
    what to do (a client needs no fixed port; the usual holder is a WireGuard interface,
    e.g. ``wg-quick up`` of this same config, or another mitmproxy with it loaded)."""
    where = f"ListenPort {config.listen_port}" + (f" of {config.path}" if config.path else "")
    if error.errno != errno.EADDRINUSE:
        return OSError(error.errno, f"cannot use {where}: {error.strerror}")
    return OSError(
        errno.EADDRINUSE,
        f"{where} is in use by another program (a WireGuard interface, e.g. `wg-quick up` "
        "of this same config, or another mitmproxy with it loaded): remove the ListenPort "
        "line (a client needs no fixed port) or stop the other one",
    )


def _enable_gro(sock: socket.socket) -> bool:
    """Ask for UDP GRO on ``sock`` (Linux); False where the kernel or platform has none."""
    if sys.platform != "linux":
        return False
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except (OSError, AttributeError) as e:  # (AttributeError: a stand-in socket)
        logger.debug("UDP GRO unavailable (%s); receiving datagrams singly", e)
        return False
    return True


def _interleave(addresses: list[IPAddress]) -> list[IPAddress]:
    """Alternate address families, keeping the first address's family first (RFC 8305 §4)."""
    if not addresses:
        return addresses
    first = addresses[0].version
    a = [x for x in addresses if x.version == first]
    b = [x for x in addresses if x.version != first]
    out: list[IPAddress] = []
    for i in range(max(len(a), len(b))):
        if i < len(a):
            out.append(a[i])
        if i < len(b):
            out.append(b[i])
    return out


async def _happy_eyeballs(attempts: list, delay: float) -> TunnelStream:
    """Start attempts ``delay`` apart (or as soon as one fails); the first success wins."""
    winner: list[TunnelStream] = []
    errors: list[BaseException] = []

    async def attempt(i: int, start_next: trio.Event, nursery: trio.Nursery) -> None:
        try:
            stream = await attempts[i]()
        except OSError as e:
            errors.append(e)
            start_next.set()
            return
        if winner:
            await stream.aclose()
            return
        winner.append(stream)
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for i in range(len(attempts)):
            start_next = trio.Event()
            nursery.start_soon(attempt, i, start_next, nursery)
            with trio.move_on_after(delay):
                await start_next.wait()
    if winner:
        return winner[0]
    if len(errors) == 1:
        raise errors[0]
    summary = "; ".join(str(e) for e in errors)
    if errors and all(isinstance(e, NoRoute) for e in errors):
        raise NoRoute(errno.ENETUNREACH, f"no address is inside AllowedIPs: {summary}")
    if errors and all(isinstance(e, ConnectionRefusedError) for e in errors):
        raise ConnectionRefusedError(errno.ECONNREFUSED, f"every address refused: {summary}")
    raise OSError(
        errno.EHOSTUNREACH,
        f"all connection attempts failed: {summary}",
    )


@asynccontextmanager
async def open_tunnel(
    config: WireGuardConfig,
    *,
    socket_factory: SocketFactory | None = None,
    randbytes: Callable[[int], bytes] = os.urandom,
    tcp_config: TcpConfig | None = None,
    handshake_timeout: float = 10.0,
    via: Tunnel | None = None,
    endpoint_lookup: EndpointLookup | None = None,
    reresolve_interval: float = DEFAULT_RERESOLVE_INTERVAL,
    read_hold: bool = True,
    wall_clock: Callable[[], float] = time.time,
) -> AsyncIterator[Tunnel]:
    """Run a tunnel for ``config`` until the block exits (or is cancelled).

    Handshakes happen on demand, when the first packet for a peer is sent.
    ``socket_factory(family)`` creates the UDP socket(s) (default: bound to an ephemeral
    port on all addresses, or the config's ListenPort). Hostname endpoints are resolved by
    ``endpoint_lookup`` (default: the host's resolver), again every ``reresolve_interval``
    seconds and when handshakes fail (:mod:`mitm_wg.runtime.endpoints`).

    Where the kernel grants a socket on an ephemeral port only a small receive buffer, the
    tunnel receives on a group of sockets of that port (:mod:`mitm_wg.runtime.sockgroup`):
    with the default sockets, or when ``socket_factory`` has an attribute
    ``unbound(family)`` that makes an unbound socket where the factory's are. The runtime's
    probes (the route and path MTU to an endpoint, the ICMP error a silent one may have
    drawn: :mod:`mitm_wg.runtime.unreachable`) make short-lived sockets of their own with
    ``unbound``, or without it with ``socket_factory``: a factory that binds a fixed port
    should have ``unbound``, or the probes find nothing.

    ``via``: another running tunnel to carry this one's WireGuard datagrams (multi-hop,
    :mod:`mitm_wg.runtime.via`): the peers' endpoints are reached, and hostnames resolved
    (once, never by the host), through it, and the MTU shrinks by one layer. Close this
    tunnel before ``via``.

    ``read_hold``: receive coalescing, a busy stream's reads held for up to 1/64 of the
    shortest smoothed RTT of its connections (:mod:`mitm_wg.runtime.readhold`); off for
    comparisons.

    ``wall_clock``: Unix time, read for each handshake initiation's timestamp (a test
    steps it).
    """
    config.require_peers()
    lookup = endpoint_lookup or host_lookup
    if via is None:
        endpoints = await resolve_endpoints(config, lookup)
    else:
        if socket_factory is not None:
            raise ValueError("open_tunnel: give either socket_factory or via, not both")
        endpoints = await resolve_endpoints_via(config, via)
        config = config_via(config, via, endpoints)
    now = trio.current_time()
    device = Device.from_config(
        config,
        randbytes=randbytes,
        unix_time_offset=wall_clock() - now,
        wall_clock=wall_clock,
        endpoints=endpoints,
    )
    if not config.addresses:
        raise OSError(errno.EADDRNOTAVAIL, "the WireGuard config has no Address")
    stack = Stack(
        config.addresses,
        mtu=config.mtu or 1420,
        tcp_config=tcp_config,
        randbytes=randbytes,
        now=now,
    )
    families = {
        socket.AF_INET6 if ":" in host else socket.AF_INET for host, _ in endpoints.values()
    }
    if not families:
        families = {socket.AF_INET}
    sockets: dict[int, socket.socket] = {}
    gro: set[socket.socket] = set()  # the sockets the kernel agreed to give UDP GRO
    groups: dict[socket.socket, list[socket.socket]] = {}  # receive groups (sockgroup.py)
    group_factory = getattr(socket_factory, "unbound", None)
    transport: ViaTransport | None = None

    def make_socket(family: int) -> socket.socket:
        if socket_factory is not None:
            sock = socket_factory(family)
        elif config.listen_port:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", config.listen_port))
            except OSError as e:
                sock.close()
                raise _listen_port_error(config, e) from e
        else:
            sock = _default_socket_factory(family)
        _setup_socket(sock)
        # An ephemeral port, and the kernel's buffer small (an unprivileged process under a
        # stock kernel's rmem_max): receive on a group of sockets (sockgroup.py), each with
        # a buffer of its own. (Never a ListenPort: another program must not share it.)
        unbound = udp_socket if socket_factory is None else group_factory
        if unbound is not None and not config.listen_port:
            granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            count = group_size(granted, 2 * UDP_BUFFER_BYTES)
            if count > 1:
                group = open_group(sock, count, _setup_socket, unbound)
                sock = group[0]
                if len(group) > 1:
                    groups[sock] = group
        # before the first datagram: one that arrives earlier is split up by the kernel.
        # (Read with recvmsg if any member has it: that reads a member without GRO right.)
        if any([_enable_gro(member) for member in groups.get(sock, [sock])]):
            gro.add(sock)
        sockets[family] = sock
        return sock

    try:
        if via is not None:
            transport = await ViaTransport.open(
                via, {6 if f == socket.AF_INET6 else 4 for f in families}, config.listen_port
            )
        for family in families if transport is None else ():
            make_socket(family)
        tunnel = Tunnel(
            config,
            device,
            stack,
            sockets,
            handshake_timeout=handshake_timeout,
            gro_sockets=gro,
            read_hold=read_hold,
            groups=groups,
        )
        if socket_factory is not None:  # (its sockets may live elsewhere: a namespace)
            # (a factory's own sockets may be bound to a fixed port, which a second one
            # cannot share: then only ``unbound`` makes the probes' sockets)
            tunnel._probe_socket = group_factory or socket_factory
        if transport is not None:
            tunnel.via = via
            # The inner tunnel's datagrams go into the outer tunnel instead of host sockets.
            tunnel._send_datagrams = transport.send  # type: ignore[method-assign]
        unwrapped: BaseException | None = None
        try:
            async with trio.open_nursery(strict_exception_groups=True) as nursery:

                def serve(family: int, sock: socket.socket) -> None:
                    # a socket's reader and writer tasks
                    version = 6 if family == socket.AF_INET6 else 4
                    for role, task in (("reader", tunnel._reader), ("writer", tunnel._writer)):
                        what = f"UDP {role} (IPv{version})"
                        nursery.start_soon(tunnel._background, what, task, sock)

                for family, sock in sockets.items():
                    serve(family, sock)
                if transport is not None:
                    # not _background: the outer tunnel closing ends this one with the
                    # OSError(ENETDOWN) that names it, not as a crash
                    nursery.start_soon(transport.run, tunnel)
                nursery.start_soon(tunnel._background, "timer", tunnel._timer)
                tunnel._nursery = nursery

                def add_socket(family: int) -> None:
                    # An endpoint moved to another address family (endpoints.py).
                    serve(family, make_socket(family))

                refresher = EndpointRefresher(
                    tunnel, lookup=lookup, interval=reresolve_interval, add_socket=add_socket
                )
                # Not for a tunnel via another: its names resolve through that tunnel, never
                # by the host (endpoints.py's lookups are the host's).
                if refresher and transport is None:
                    tunnel.endpoint_refresher = refresher
                    nursery.start_soon(tunnel._background, "endpoint re-resolution", refresher.run)
                tunnel._start_persistent_keepalives()
                try:
                    yield tunnel
                finally:
                    tunnel._closed = True
                    for stream in list(tunnel._streams):
                        if not stream._sock.is_closed:
                            stream._sock.abort(trio.current_time())
                    tunnel._flush(wake_all=True)
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The nursery always groups (strict). A crash of ours is TunnelCrashed (see
            # _background) and wins; otherwise the group's one exception came from the
            # caller's block and goes back as it was, as a context manager should. Only
            # this nursery's own level is opened: the caller's own groups stay intact.
            crashed = [e for e in group.exceptions if isinstance(e, TunnelCrashed)]
            if crashed:
                unwrapped = crashed[0]
            elif len(group.exceptions) == 1:
                unwrapped = group.exceptions[0]
            else:
                raise
        if unwrapped is not None:
            # Raised outside the except block, so its own __context__ is kept as it was.
            raise unwrapped
    finally:
        for sock in sockets.values():
            for member in groups.get(sock, [sock]):
                member.close()
        if transport is not None:
            transport.close()
