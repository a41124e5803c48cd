"""A userspace UDP relay that impairs traffic: loss, duplication, reordering, delay.

::

    client ──► relay.address ──(up)──► target        target ──(down)──► client

Every client address (host, port) gets its own upstream socket, so the target sees a
NAT-like distinct source port per client address (useful for roaming tests). Decisions come
from a seeded ``random.Random`` per direction drawing the same number of values for every
datagram, so the decision sequence for the n-th datagram of a direction depends only on the
seed (not on timing). Sockets come from ``socket_factory`` (default :func:`socket.socket`);
pass ``peer.client_ns.socket`` to run the relay inside a namespace.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import random
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

log = logging.getLogger(__name__)

SocketFactory = Callable[[int, int], socket.socket]


@dataclass(frozen=True)
class Impairment:
    """What to do to one direction. Probabilities are per received datagram."""

    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_gap: int = 1  # a held datagram goes out after this many later ones...
    reorder_timeout: float = 0.05  # ...or after this many seconds, whichever is first
    delay: float = 0.0  # seconds added to every datagram
    jitter: float = 0.0  # plus uniform [0, jitter) seconds (jitter also reorders)

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate", "reorder"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], not {v}")
        if self.reorder_gap < 1 or self.delay < 0 or self.jitter < 0 or self.reorder_timeout <= 0:
            raise ValueError("reorder_gap >= 1, delay >= 0, jitter >= 0, reorder_timeout > 0")


@dataclass
class DirectionStats:
    received: int = 0
    forwarded: int = 0  # datagrams actually sent on (duplicates count twice)
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0  # datagrams held back for reordering
    delayed: int = 0
    send_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class _Held:
    data: bytes
    remaining: int
    deadline: float


@dataclass
class _Direction:
    name: str
    impairment: Impairment
    rng: random.Random
    stats: DirectionStats = field(default_factory=DirectionStats)
    held: list[tuple[_Held, socket.socket, tuple[str, int]]] = field(default_factory=list)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class ImpairedRelay:
    """UDP relay between clients and ``target`` with per-direction :class:`Impairment`.

    ``impairment`` applies to both directions unless ``up`` (client→target) or ``down``
    (target→client) is given. Use as a context manager or call :meth:`start`/:meth:`stop`.
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        seed: int = 0,
        impairment: Impairment | None = None,
        up: Impairment | None = None,
        down: Impairment | None = None,
        socket_factory: SocketFactory = socket.socket,
    ) -> None:
        base = impairment or Impairment()
        self.target = target
        self.seed = seed
        self._factory = socket_factory
        self._up = _Direction("up", up or base, random.Random(f"{seed}/up"))
        self._down = _Direction("down", down or base, random.Random(f"{seed}/down"))
        self._lock = threading.Lock()
        self._listen = socket_factory(_family(listen[0]), socket.SOCK_DGRAM)
        self._listen.bind(listen)
        self._listen.setblocking(False)
        self._upstream: dict[tuple[str, int], socket.socket] = {}
        self._client_of: dict[socket.socket, tuple[str, int]] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listen, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._delayed: list[
            tuple[float, int, socket.socket, tuple[str, int], bytes, _Direction, bool]
        ] = []
        self._counter = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- public ------------------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        """Where clients send to: ``(host, port)``."""
        host, port = self._listen.getsockname()[:2]
        return host, port

    @property
    def up(self) -> DirectionStats:
        """Counters of client → target."""
        return self._up.stats

    @property
    def down(self) -> DirectionStats:
        """Counters of target → client."""
        return self._down.stats

    @property
    def clients(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self._upstream)

    def set_impairment(
        self,
        impairment: Impairment | None = None,
        *,
        up: Impairment | None = None,
        down: Impairment | None = None,
    ) -> None:
        """Change impairments while running (e.g. ``Impairment(loss=1.0)`` for a blackhole)."""
        with self._lock:
            if impairment is not None:
                self._up.impairment = self._down.impairment = impairment
            if up is not None:
                self._up.impairment = up
            if down is not None:
                self._down.impairment = down

    def start(self) -> ImpairedRelay:
        if self._thread is not None or self._closed:
            raise RuntimeError("relay already started or stopped")
        self._thread = threading.Thread(target=self._run, name="impaired-relay", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and close every socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(5)
        self._sel.close()
        for s in [self._listen, self._wake_r, self._wake_w, *self._upstream.values()]:
            s.close()

    def __enter__(self) -> ImpairedRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop:
                timeout = self._next_timeout()
                for key, _ in self._sel.select(timeout):
                    if key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(64)
                    elif key.data == "listen":
                        self._drain_listen()
                    else:
                        self._drain_upstream(key.fileobj)  # type: ignore[arg-type]
                self._release_due(time.monotonic())
        except Exception:
            log.exception("impaired relay thread crashed")

    def _next_timeout(self) -> float:
        deadlines = [d[0] for d in self._delayed[:1]]
        for d in (self._up, self._down):
            deadlines += [h.deadline for h, _, _ in d.held]
        if not deadlines:
            return 0.5
        return max(0.0, min(deadlines) - time.monotonic())

    def _drain_listen(self) -> None:
        while True:
            try:
                data, addr = self._listen.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. ICMP errors surfacing on the socket
            client = (addr[0], addr[1])
            up_sock = self._upstream.get(client)
            if up_sock is None:
                up_sock = self._factory(_family(self.target[0]), socket.SOCK_DGRAM)
                up_sock.setblocking(False)
                with self._lock:
                    self._upstream[client] = up_sock
                self._client_of[up_sock] = client
                self._sel.register(up_sock, selectors.EVENT_READ, "upstream")
            self._impair(self._up, data, up_sock, self.target)

    def _drain_upstream(self, sock: socket.socket) -> None:
        client = self._client_of[sock]
        while True:
            try:
                data, _ = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self._impair(self._down, data, self._listen, client)

    def _impair(
        self, d: _Direction, data: bytes, sock: socket.socket, dest: tuple[str, int]
    ) -> None:
        with self._lock:
            imp = d.impairment
        rng = d.rng
        r_loss, r_dup, r_reorder, r_jitter = rng.random(), rng.random(), rng.random(), rng.random()
        d.stats.received += 1
        if r_loss < imp.loss:
            d.stats.dropped += 1
            return
        copies = 1
        if r_dup < imp.duplicate:
            d.stats.duplicated += 1
            copies = 2
        now = time.monotonic()
        hold = r_reorder < imp.reorder
        for _ in range(copies):
            if imp.delay > 0 or imp.jitter > 0:
                d.stats.delayed += 1
                self._counter += 1
                due = now + imp.delay + r_jitter * imp.jitter
                heapq.heappush(self._delayed, (due, self._counter, sock, dest, data, d, hold))
            else:
                self._emit(d, data, sock, dest, now, hold)
            hold = False  # only the first copy may be held

    def _emit(
        self,
        d: _Direction,
        data: bytes,
        sock: socket.socket,
        dest: tuple[str, int],
        now: float,
        hold: bool,
    ) -> None:
        imp = d.impairment
        if hold and not d.held:
            d.stats.reordered += 1
            d.held.append((_Held(data, imp.reorder_gap, now + imp.reorder_timeout), sock, dest))
            return
        self._send(d, data, sock, dest)
        for entry in list(d.held):
            h = entry[0]
            h.remaining -= 1
            if h.remaining <= 0:
                d.held.remove(entry)
                self._send(d, h.data, entry[1], entry[2])

    def _release_due(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            _, _, sock, dest, data, d, hold = heapq.heappop(self._delayed)
            self._emit(d, data, sock, dest, now, hold)
        for d in (self._up, self._down):
            for entry in list(d.held):
                if entry[0].deadline <= now:
                    d.held.remove(entry)
                    self._send(d, entry[0].data, entry[1], entry[2])

    def _send(self, d: _Direction, data: bytes, sock: socket.socket, dest: tuple[str, int]) -> None:
        try:
            sock.sendto(data, dest)
            d.stats.forwarded += 1
        except OSError:
            d.stats.send_errors += 1
