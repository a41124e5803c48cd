"""A deterministic network simulator: two :class:`Stack` instances over an impaired link.

Virtual time only (an event heap); all randomness from one seeded ``random.Random``; dicts,
not sets, everywhere iteration order matters — so a seed replays exactly.

Per direction (:class:`LinkParams`): delay, jitter, loss, reordering, duplication,
corruption (one flipped bit: the Internet checksum always detects a single-bit error),
an MTU (oversized packets dropped, or answered with ICMP "fragmentation needed"/"packet
too big" from a simulated router), a bandwidth limit with a bounded FIFO queue, and
aggregation (arrivals held and released together at the next multiple of an interval, as a
Wi-Fi link's aggregated frames or a reader that wakes up once per time slice).
"""

from __future__ import annotations

import dataclasses
import heapq
import ipaddress
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from mitm_wg.net import icmp
from mitm_wg.net.ipv4 import PROTO_ICMP, PROTO_ICMPV6, build_ipv4
from mitm_wg.net.ipv6 import build_ipv6
from mitm_wg.net.stack import Stack
from mitm_wg.net.tcp import TcpSocket, TcpState

logger = logging.getLogger(__name__)

__all__ = ["Link", "LinkParams", "Sim", "SimStuck", "Transfer"]


@dataclass
class LinkParams:
    """Impairments of one direction of the link (probabilities are per packet)."""

    delay: float = 0.01
    jitter: float = 0.0  # extra uniform [0, jitter) delay, order preserved
    loss: float = 0.0
    reorder: float = 0.0  # probability a packet is held back by reorder_delay
    reorder_delay: float = 0.015
    duplicate: float = 0.0
    corrupt: float = 0.0
    mtu: int | None = None
    icmp_router: str | None = None  # if set, oversized packets get an ICMP error from here
    bandwidth: float | None = None  # bytes per second; None = infinite
    queue_bytes: int = 256 * 1024  # drop-tail queue in front of the bandwidth limit
    # Gilbert-Elliott bursty loss: this average loss rate, in bursts of ``burst_len``
    # packets on average (every packet in the bad state is lost); a burst also ends after
    # ``burst_time`` seconds, so one burst cannot swallow a sparse flow's retransmissions
    # for ever
    burst_loss: float = 0.0
    burst_len: float = 4.0
    burst_time: float = 0.005
    # arrivals held until the next multiple of this many seconds and released together
    # (ACK aggregation: Wi-Fi frame aggregation, a CPU-starved reader); 0 = none
    aggregate: float = 0.0

    def describe(self) -> str:
        defaults = LinkParams()
        diffs = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(defaults, f.name)
        ]
        return f"LinkParams({', '.join(diffs)})"


@dataclass
class LinkStats:
    sent: int = 0
    delivered: int = 0
    lost: int = 0
    corrupted: int = 0
    duplicated: int = 0
    reordered: int = 0
    too_big: int = 0
    queue_drops: int = 0


class Link:
    """One direction: packets from ``src`` stack to ``dst`` stack."""

    def __init__(self, sim: Sim, params: LinkParams, dst: int) -> None:
        self.sim = sim
        self.params = params
        self.dst = dst
        self.stats = LinkStats()
        self._busy_until = 0.0  # serialisation of the bandwidth limit
        self._last_arrival = 0.0  # FIFO for jitter
        self._bad = False  # Gilbert-Elliott state, and when the bad state began
        self._bad_since = 0.0

    def send(self, pkt: bytes, now: float) -> None:
        p = self.params
        rng = self.sim.rng
        st = self.stats
        st.sent += 1
        if p.mtu is not None and len(pkt) > p.mtu:
            st.too_big += 1
            if p.icmp_router is not None:
                self.sim._router_error(self, pkt, now)
            return
        if p.loss and rng.random() < p.loss:
            st.lost += 1
            return
        if p.burst_loss:
            leave = 1.0 / p.burst_len
            if self._bad:
                self._bad = rng.random() >= leave and now - self._bad_since < p.burst_time
            else:
                self._bad = rng.random() < p.burst_loss * leave / (1.0 - p.burst_loss)
                self._bad_since = now
            if self._bad:
                st.lost += 1
                return
        t = now
        if p.bandwidth:
            start = max(now, self._busy_until)
            if (start - now) * p.bandwidth > p.queue_bytes:
                st.queue_drops += 1
                return
            self._busy_until = start + len(pkt) / p.bandwidth
            t = self._busy_until
        t += p.delay
        if p.jitter:
            t += rng.random() * p.jitter
        t = max(t, self._last_arrival)
        if p.aggregate:
            t = math.ceil(t / p.aggregate) * p.aggregate
        self._last_arrival = t
        copies = 2 if p.duplicate and rng.random() < p.duplicate else 1
        if copies == 2:
            st.duplicated += 1
        for _ in range(copies):
            data = pkt
            if p.corrupt and rng.random() < p.corrupt:
                bit = rng.randrange(len(pkt) * 8)
                b = bytearray(pkt)
                b[bit >> 3] ^= 1 << (bit & 7)
                data = bytes(b)
                st.corrupted += 1
            at = t
            if p.reorder and rng.random() < p.reorder:
                at += p.reorder_delay * (0.5 + rng.random())
                st.reordered += 1
            self.sim._schedule(at, self.dst, data)


class SimStuck(AssertionError):
    """The simulation cannot make progress (or spins without advancing time)."""


class Sim:
    """Two stacks (index 0 = ``a``, 1 = ``b``) joined by two :class:`Link` directions."""

    def __init__(
        self,
        a: Stack,
        b: Stack,
        *,
        seed: int = 0,
        ab: LinkParams | None = None,
        ba: LinkParams | None = None,
        now: float = 0.0,
    ) -> None:
        self.stacks = (a, b)
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = now
        self.links = (Link(self, ab or LinkParams(), 1), Link(self, ba or LinkParams(), 0))
        self._events: list[tuple[float, int, int, bytes]] = []
        self._seq = 0
        self.apps: list[Callable[[float], None]] = []
        self.taps: list[Callable[[int, bytes], bytes | None]] = []  # (from_index, pkt)
        self.received: tuple[list[bytes], list[bytes]] = ([], [])  # optional capture
        self.capture = False
        self._out: list[bytes] = []
        # Packets are handed to the stacks as a memoryview of one reused buffer that is
        # scribbled over afterwards, as a runtime reusing its receive buffer would: a stack
        # that keeps a reference instead of a copy corrupts data and fails the tests.
        self._rxbuf = bytearray(65536)
        self._junk = b"\xa5" * 65536

    @property
    def a(self) -> Stack:
        return self.stacks[0]

    @property
    def b(self) -> Stack:
        return self.stacks[1]

    def describe(self) -> str:
        return (
            f"seed={self.seed} t={self.now:.6f} a->b {self.links[0].params.describe()} "
            f"b->a {self.links[1].params.describe()}"
        )

    # -- plumbing ----------------------------------------------------------------

    def _schedule(self, at: float, dst: int, pkt: bytes) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at, self._seq, dst, pkt))

    def inject(self, dst: int, pkt: bytes, at: float | None = None) -> None:
        """Deliver a hand-made packet to stack ``dst`` (0 or 1) at ``at`` (default: now)."""
        self._schedule(self.now if at is None else at, dst, pkt)

    def _router_error(self, link: Link, pkt: bytes, now: float) -> None:
        """A middle box on ``link`` could not forward ``pkt``: ICMP back to its sender."""
        router = ipaddress.ip_address(link.params.icmp_router or "")
        mtu = link.params.mtu or 0
        sender = 1 - link.dst
        if pkt[0] >> 4 == 4:
            msg = icmp.build_icmp4(
                icmp.ICMP4_DEST_UNREACH, icmp.UNREACH4_FRAG_NEEDED, mtu, pkt[: icmp.QUOTE4_MAX]
            )
            err = build_ipv4(router.packed, pkt[12:16], PROTO_ICMP, msg)
        else:
            src = pkt[8:24]
            msg = icmp.build_icmp6(
                router.packed, src, icmp.ICMP6_PACKET_TOO_BIG, 0, mtu, pkt[: icmp.QUOTE6_MAX]
            )
            err = build_ipv6(router.packed, src, PROTO_ICMPV6, msg)
        self._schedule(now + link.params.delay / 2, sender, err)

    def flush(self) -> None:
        """Run the apps, then poll both stacks and put their output on the links."""
        for app in self.apps:
            app(self.now)
        out = self._out
        for i, stack in enumerate(self.stacks):
            stack.poll(self.now, out)
            if out:
                link = self.links[i]
                for pkt in out:
                    for tap in self.taps:
                        pkt = tap(i, pkt)  # type: ignore[assignment]
                        if pkt is None:
                            break
                    else:
                        link.send(pkt, self.now)
                out.clear()

    def next_time(self) -> float | None:
        times = [self._events[0][0]] if self._events else []
        for stack in self.stacks:
            t = stack.next_deadline()
            if t is not None:
                times.append(t)
        return min(times) if times else None

    def _deliver_due(self) -> None:
        ev = self._events
        while ev and ev[0][0] <= self.now:
            _, _, dst, pkt = heapq.heappop(ev)
            self.links[1 - dst].stats.delivered += 1
            if self.capture:
                self.received[dst].append(pkt)
            n = len(pkt)
            buf = self._rxbuf
            buf[:n] = pkt
            self.stacks[dst].receive(memoryview(buf)[:n], self.now)
            buf[:n] = self._junk[:n]
        # Poll once per batch of simultaneous arrivals, as the runtime does.
        self.flush()

    def run_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Advance virtual time until ``predicate()`` holds (True) or ``timeout`` passes."""
        end = self.now + timeout
        spins = 0
        self.flush()
        while True:
            if predicate():
                return True
            t = self.next_time()
            if t is None or t > end:
                # (nothing scheduled: time still passes for the apps, e.g. a stalled reader
                # whose gate opens later)
                self.now = end
                self.flush()
                return predicate()
            if t <= self.now:
                spins += 1
                if spins > 10_000:
                    raise SimStuck(f"time does not advance: {self.describe()}")
            else:
                spins = 0
                self.now = t
            self._deliver_due()

    def run_for(self, duration: float) -> None:
        self.run_until(lambda: False, duration)


@dataclass
class Transfer:
    """Bulk transfer between a connecting socket on ``a`` and an accepted socket on ``b``.

    Each side writes its data, half-closes, reads until EOF, then closes.  ``read_gate(now)``
    (optional, per side) lets a test stall a reader.
    """

    sim: Sim
    data_ab: bytes
    data_ba: bytes
    port: int = 80
    remote: str | None = None
    read_gate_a: Callable[[float], bool] | None = None
    read_gate_b: Callable[[float], bool] | None = None
    chunk: int = 65536
    client: TcpSocket | None = None
    server: TcpSocket | None = None
    got_ab: bytearray = field(default_factory=bytearray)
    got_ba: bytearray = field(default_factory=bytearray)
    _sent: list[int] = field(default_factory=lambda: [0, 0])
    _shut: list[bool] = field(default_factory=lambda: [False, False])
    _closed: list[bool] = field(default_factory=lambda: [False, False])

    def start(self) -> None:
        sim = self.sim
        self._listener = sim.b.tcp_listen(self.port)
        remote = self.remote or str(sim.b.interfaces[0].ip)
        self.client = sim.a.tcp_connect(remote, self.port, sim.now)
        sim.apps.append(self._app)

    def _side(self, i: int, sock: TcpSocket, now: float) -> None:
        data = self.data_ab if i == 0 else self.data_ba
        got = self.got_ba if i == 0 else self.got_ab
        gate = self.read_gate_a if i == 0 else self.read_gate_b
        if self._closed[i]:
            return
        if sock.error is not None:
            return
        while self._sent[i] < len(data):
            n = sock.send(memoryview(data)[self._sent[i] : self._sent[i] + self.chunk])
            if n == 0:
                break
            self._sent[i] += n
        if self._sent[i] == len(data) and not self._shut[i]:
            sock.shutdown_write(now)
            self._shut[i] = True
        if gate is None or gate(now):
            while True:
                chunk = sock.recv(self.chunk)
                if not chunk:
                    break
                got += chunk
        if self._shut[i] and sock.at_eof:
            sock.close(now)
            self._closed[i] = True

    def _app(self, now: float) -> None:
        if self.server is None:
            self.server = self._listener.accept()
        if self.client is not None and self.client.state is not TcpState.SYN_SENT:
            self._side(0, self.client, now)
        if self.server is not None:
            self._side(1, self.server, now)

    def done(self) -> bool:
        if not (self._closed[0] and self._closed[1]):
            return False
        for sock in (self.client, self.server):
            assert sock is not None
            if sock.state not in (TcpState.CLOSED, TcpState.TIME_WAIT):
                return False
        return True

    def failure(self) -> str | None:
        for name, sock in (("client", self.client), ("server", self.server)):
            if sock is not None and sock.error is not None:
                return f"{name} error {sock.error!r}"
        return None

    def run(self, timeout: float) -> bool:
        self.start()
        return self.sim.run_until(lambda: self.done() or self.failure() is not None, timeout)

    def report(self) -> str:
        def st(sock: TcpSocket | None) -> str:
            if sock is None:
                return "None"
            return f"{sock.state.name} err={sock.error!r}"

        return (
            f"{self.sim.describe()}\n client={st(self.client)} server={st(self.server)}"
            f" got_ab={len(self.got_ab)}/{len(self.data_ab)} got_ba={len(self.got_ba)}"
            f"/{len(self.data_ba)} sent={self._sent} closed={self._closed}\n"
            f" links={[link.stats for link in self.sim.links]}\n"
            f" a={self.sim.a.stats!r}\n b={self.sim.b.stats!r}"
        )


def make_pair(
    *,
    seed: int = 0,
    v6: bool = False,
    mtu: int = 1420,
    ab: LinkParams | None = None,
    ba: LinkParams | None = None,
    **stack_kw: object,
) -> Sim:
    """Two stacks (10.0.0.1 / 10.0.0.2, or fd00::1 / fd00::2) with seeded randomness."""
    rng = random.Random(seed ^ 0x5EED)
    if v6:
        addrs = (["fd00::1/64", "10.0.0.1/24"], ["fd00::2/64", "10.0.0.2/24"])
    else:
        addrs = (["10.0.0.1/24", "fd00::1/64"], ["10.0.0.2/24", "fd00::2/64"])
    a = Stack(addrs[0], mtu=mtu, randbytes=rng.randbytes, **stack_kw)  # type: ignore[arg-type]
    b = Stack(addrs[1], mtu=mtu, randbytes=rng.randbytes, **stack_kw)  # type: ignore[arg-type]
    return Sim(a, b, seed=seed, ab=ab, ba=ba)


def exchange(a: Stack, b: Stack, now: float) -> None:
    """One round between two stacks wired back to back without delay or loss: what ``a``
    has to send goes to ``b``, then what ``b`` has to send (answers included) to ``a``."""
    out: list[bytes] = []
    for src, dst in ((a, b), (b, a)):
        src.poll(now, out)
        for p in out:
            dst.receive(p, now)
        out.clear()
