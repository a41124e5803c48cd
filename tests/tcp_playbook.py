"""Helpers for TCP playbook tests: drive a TcpSocket segment by segment with a virtual clock.

``Pb`` wraps a socket: ``pb.send(flags, seq, ack, ...)`` feeds a segment from the peer,
``pb.expect([...])``/``pb.out()`` run ``dispatch`` and compare/return what the socket sends.
``Link`` joins two sockets directly (optionally lossy) for small transfer tests.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from mitm_wg.net.tcp import TcpConfig, TcpSocket
from mitm_wg.net.tcp_wire import ACK, SYN, TcpSegment, build_tcp, parse_tcp

LOCAL = b"\x0a\x00\x00\x01"
REMOTE = b"\x0a\x00\x00\x02"
LPORT = 40000
RPORT = 80


def fixed_random(n: int) -> bytes:
    return bytes(n)  # timestamp offset 0: TSval == int(now * 1000)


def cfg(**kw: object) -> TcpConfig:
    """Playbook defaults: fixed-size buffers (the caps equal the starting sizes, so no
    autotuning) unless a test asks for other caps; NewReno without pacing (the RFC 5681/
    6675/6937 window rules these tests check; BBR and pacing: tests/test_bbr_pacing.py)."""
    base: dict[str, object] = {
        "mss": 1000,
        "recv_buffer": 65535,
        "send_buffer": 1 << 20,
        "congestion": "newreno",
        "pacing": False,
    }
    base.update(kw)
    base.setdefault("recv_buffer_max", base["recv_buffer"])
    base.setdefault("send_buffer_max", base["send_buffer"])
    return TcpConfig(**base)  # type: ignore[arg-type]


def seg(
    flags: int,
    seq: int,
    ack: int = 0,
    *,
    window: int = 65535,
    payload: bytes = b"",
    src: int = RPORT,
    dst: int = LPORT,
    **opts: object,
) -> TcpSegment:
    return TcpSegment(
        src,
        dst,
        seq & 0xFFFFFFFF,
        ack & 0xFFFFFFFF,
        flags,
        window,
        payload=payload,
        **opts,  # type: ignore[arg-type]
    )


def roundtrip(s: TcpSegment) -> TcpSegment:
    """Serialise and parse again, as the network would (catches unbuildable segments)."""
    p = parse_tcp(build_tcp(s, LOCAL, REMOTE))
    assert p is not None
    p.payload = bytes(p.payload)
    return p


class Pb:
    """A socket under test plus a virtual clock."""

    def __init__(self, sock: TcpSocket, now: float = 0.0) -> None:
        self.sock = sock
        self.now = now

    def at(self, now: float) -> Pb:
        self.now = now
        return self

    def send(self, flags: int, seq: int, ack: int = 0, **kw: object) -> None:
        self.sock.process(roundtrip(seg(flags, seq, ack, **kw)), self.now)  # type: ignore[arg-type]

    def feed(self, s: TcpSegment) -> None:
        self.sock.process(roundtrip(s), self.now)

    def out(self) -> list[TcpSegment]:
        out: list[TcpSegment] = []
        self.sock.dispatch(self.now, out)
        return [roundtrip(s) for s in out]

    def expect(self, expected: list[TcpSegment]) -> list[TcpSegment]:
        got = self.out()
        assert got == expected, f"\n got: {got}\nwant: {expected}"
        return got

    def poll(self) -> float | None:
        return self.sock.poll_at()


def active(config: TcpConfig | None = None, isn: int = 1000, now: float = 0.0) -> Pb:
    sock = TcpSocket(
        config or cfg(), LOCAL, LPORT, REMOTE, RPORT, isn=isn, now=now, randbytes=fixed_random
    )
    sock.connect(now)
    return Pb(sock, now)


def passive(
    syn: TcpSegment, config: TcpConfig | None = None, isn: int = 5000, now: float = 0.0
) -> Pb:
    sock = TcpSocket.from_syn(
        config or cfg(),
        LOCAL,
        LPORT,
        REMOTE,
        RPORT,
        roundtrip(syn),
        isn=isn,
        now=now,
        randbytes=fixed_random,
    )
    return Pb(sock, now)


class Link:
    """Two sockets joined back to back with a virtual clock and optional loss/delay.

    ``drop(direction, segment) -> bool`` decides losses deterministically ("ab" or "ba").
    """

    def __init__(
        self,
        a_cfg: TcpConfig | None = None,
        b_cfg: TcpConfig | None = None,
        *,
        delay: float = 0.01,
        drop: Callable[[str, TcpSegment], bool] | None = None,
        isn_a: int = 1000,
        isn_b: int = 5000,
    ) -> None:
        self.now = 0.0
        self.delay = delay
        self.drop = drop or (lambda d, s: False)
        self.a = TcpSocket(
            a_cfg or cfg(),
            LOCAL,
            LPORT,
            REMOTE,
            RPORT,
            isn=isn_a,
            now=0.0,
            randbytes=fixed_random,
        )
        self.b: TcpSocket | None = None
        self.b_cfg = b_cfg or cfg()
        self.isn_b = isn_b
        self.inflight: list[tuple[float, int, str, TcpSegment]] = []
        self.counter = 0
        self.sent = {"ab": 0, "ba": 0}
        self.a.connect(0.0)

    def _deliver(self, direction: str, s: TcpSegment) -> None:
        s = roundtrip(s)
        if direction == "ab":
            if self.b is None:
                if s.flags & SYN and not s.flags & ACK:
                    self.b = TcpSocket.from_syn(
                        self.b_cfg,
                        REMOTE,
                        RPORT,
                        LOCAL,
                        LPORT,
                        s,
                        isn=self.isn_b,
                        now=self.now,
                        randbytes=fixed_random,
                    )
                return
            self.b.process(s, self.now)
        else:
            self.a.process(s, self.now)

    def _pump(self) -> None:
        for name, sock in (("ab", self.a), ("ba", self.b)):
            if sock is None:
                continue
            t = sock.poll_at()
            if t is not None and t <= self.now:
                out: list[TcpSegment] = []
                sock.dispatch(self.now, out)
                if not out:
                    t2 = sock.poll_at()
                    # poll_at must not ask for a dispatch that has nothing to do (busy loop)
                    assert t2 is None or t2 > self.now, f"busy loop: {sock} poll_at={t2}"
                for s in out:
                    self.sent[name] += 1
                    if not self.drop(name, s):
                        self.counter += 1
                        self.inflight.append((self.now + self.delay, self.counter, name, s))

    def step(self) -> bool:
        """Advance to the next event; False when nothing is left to do."""
        self._pump()
        times = [t for t, *_ in self.inflight]
        for sock in (self.a, self.b):
            if sock is not None:
                t = sock.poll_at()
                if t is not None:
                    times.append(max(t, self.now))
        if not times:
            return False
        nxt = min(times)
        assert nxt >= self.now
        self.now = nxt
        due = sorted(x for x in self.inflight if x[0] <= self.now)
        self.inflight = [x for x in self.inflight if x[0] > self.now]
        for _t, _c, direction, s in due:
            self._deliver(direction, s)
        return True

    def run_until(
        self, cond: Callable[[], bool], limit: float = 600.0, steps: int = 200000
    ) -> None:
        for _ in range(steps):
            if cond():
                return
            if self.now > limit or not self.step():
                break
        assert cond(), f"condition not reached at t={self.now}: a={self.a} b={self.b}"


def lossy(seed: int, rate: float) -> Callable[[str, TcpSegment], bool]:
    rng = random.Random(seed)
    return lambda d, s: rng.random() < rate
