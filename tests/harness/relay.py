"""A userspace UDP relay that impairs traffic: loss (random or bursty), duplication, reordering,
delay, and a bottleneck (a rate limit behind a drop-tail queue).

::

    client ──► relay.address ──(up)──► target        target ──(down)──► client

Every client address (host, port) gets its own upstream socket, so the target sees a
NAT-like distinct source port per client address (useful for roaming tests). Decisions come
from a seeded ``random.Random`` per direction drawing the same number of values for every
datagram, so the decision sequence for the n-th datagram of a direction depends only on the
seed (not on timing). Bursty (Gilbert-Elliott) loss draws from a second seeded generator per
direction, only when it is configured, so the sequences of the other impairments stay the same.
Sockets come from ``socket_factory`` (default :func:`socket.socket`); pass
``peer.client_ns.socket`` to run the relay inside a namespace.

Two ways to run it:

- :class:`ImpairedRelay` in a thread of the calling process (tests: cheap, inspectable);
- :class:`RelayProcess`, the same relay as its own process (``python relay.py ...``), for
  benchmarks: the relay then shares no GIL with the code under test.

Speed: one thread, non-blocking sockets drained in batches after each ``epoll`` wake-up, one
clock read per batch, constant delays in a FIFO per direction (O(1); a heap only when jitter
makes release times non-monotonic), and large socket buffers (``SO_RCVBUFFORCE`` as root) so
that bursts queue in the kernel instead of being dropped while the thread is busy.
``bench/bench_path.py --only capacity`` measures what it forwards.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import heapq
import json
import logging
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

log = logging.getLogger(__name__)

SocketFactory = Callable[[int, int], socket.socket]

#: Kernel socket buffer we ask for on every relay socket (bursts must queue, not drop).
BUFFER_BYTES = 8 << 20
#: Datagrams read from one socket before the relay looks at its timers again.
BATCH = 128
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


@dataclass(frozen=True)
class Impairment:
    """What to do to one direction. Probabilities are per received datagram.

    Bursty loss is a Gilbert-Elliott chain: in the good state a datagram is lost with
    probability ``loss``; each datagram moves good→bad with probability ``bad_enter`` and
    bad→good with ``bad_exit``; in the bad state it is lost with probability ``bad_loss``.
    A bad state also ends once it is ``bad_time`` seconds old (as the simulator's bursts):
    interference lasts milliseconds, not until the next datagram, and without the bound a
    sparse flow met the same burst again — a WireGuard handshake retried 5 s later was lost
    with P(stay bad), and the bench_path smoke run's warm-up gave up after two initiations.
    :meth:`bursty` builds one from a mean loss rate and a mean burst length.
    """

    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_gap: int = 1  # a held datagram goes out after this many later ones...
    reorder_timeout: float = 0.05  # ...or after this many seconds, whichever is first
    delay: float = 0.0  # seconds added to every datagram
    jitter: float = 0.0  # plus uniform [0, jitter) seconds (jitter also reorders)
    bad_enter: float = 0.0  # Gilbert-Elliott: P(good -> bad) per datagram (0 = off)
    bad_exit: float = 1.0  # P(bad -> good) per datagram: mean burst = 1 / bad_exit datagrams
    bad_loss: float = 1.0  # loss probability in the bad state
    bad_time: float = 0.005  # a bad state ends at this age (seconds) whatever the chain says
    # a bottleneck: datagrams leave at most ``rate`` bytes/s (0: no limit), in order, behind
    # a drop-tail queue of ``queue_bytes`` (what waits for the link; more is dropped), before
    # the delay; a router's buffer in front of a slower link
    rate: float = 0.0
    queue_bytes: int = 256 * 1024
    # a path MTU black hole: datagrams (UDP payloads) longer than this vanish without a word,
    # as on a narrower link whose ICMP errors a firewall drops (0: no limit)
    max_size: int = 0

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate", "reorder", "bad_enter", "bad_exit", "bad_loss"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], not {v}")
        if self.reorder_gap < 1 or self.delay < 0 or self.jitter < 0 or self.reorder_timeout <= 0:
            raise ValueError("reorder_gap >= 1, delay >= 0, jitter >= 0, reorder_timeout > 0")
        if self.bad_time <= 0:
            raise ValueError("bad_time must be > 0")
        if self.rate < 0 or self.queue_bytes <= 0 or self.max_size < 0:
            raise ValueError("rate >= 0, queue_bytes > 0 and max_size >= 0")
        if self.bad_enter > 0 and self.bad_exit <= 0:
            raise ValueError("bad_exit must be > 0 when bad_enter > 0 (else the loss never ends)")

    @classmethod
    def bursty(cls, mean_loss: float, mean_burst: float, **kw: Any) -> Impairment:
        """Gilbert loss (every datagram lost in the bad state) averaging ``mean_loss`` in
        bursts of ``mean_burst`` datagrams on average."""
        if not 0 < mean_loss < 1 or mean_burst < 1:
            raise ValueError("0 < mean_loss < 1 and mean_burst >= 1")
        exit_p = 1.0 / mean_burst
        # stationary P(bad) = enter / (enter + exit) = mean_loss
        enter = mean_loss * exit_p / (1.0 - mean_loss)
        return cls(bad_enter=enter, bad_exit=exit_p, bad_loss=1.0, **kw)

    @property
    def mean_loss(self) -> float:
        """Long-run fraction of datagrams lost."""
        if self.bad_enter <= 0:
            return self.loss
        bad = self.bad_enter / (self.bad_enter + self.bad_exit)
        return bad * self.bad_loss + (1 - bad) * self.loss


@dataclass
class DirectionStats:
    received: int = 0
    forwarded: int = 0  # datagrams actually sent on (duplicates count twice)
    dropped: int = 0
    queue_drops: int = 0  # the bottleneck's queue was full (not counted in ``dropped``)
    duplicated: int = 0
    reordered: int = 0  # datagrams held back for reordering
    delayed: int = 0
    send_errors: int = 0
    bytes_forwarded: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class _Held:
    data: bytes
    remaining: int
    deadline: float


# heap entry (jitter): (due, counter, socket, destination, data, direction, hold); destination
# None means a connected upstream socket
_Delayed = tuple[float, int, socket.socket, tuple[str, int] | None, bytes, "_Direction", bool]
# FIFO entry (constant delay): (due, socket, destination, data, hold)
_Queued = tuple[float, socket.socket, tuple[str, int] | None, bytes, bool]


@dataclass
class _Direction:
    name: str
    impairment: Impairment
    rng: random.Random
    burst_rng: random.Random
    stats: DirectionStats = field(default_factory=DirectionStats)
    held: list[tuple[_Held, socket.socket, tuple[str, int] | None]] = field(default_factory=list)
    fifo: collections.deque[_Queued] = field(default_factory=collections.deque)
    bad: bool = False  # Gilbert-Elliott state
    bad_since: float = 0.0  # when it last entered the bad state
    undrawn: int = 0  # datagrams the fast path passed without drawing their 4 values
    busy_until: float = 0.0  # when the bottleneck has sent what it queued so far


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _grow_buffers(sock: socket.socket, size: int) -> None:
    """Ask for ``size``-byte kernel buffers (past net.core.*mem_max when root)."""
    for force, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF), (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, size)


class ImpairedRelay:
    """UDP relay between clients and ``target`` with per-direction :class:`Impairment`.

    ``impairment`` applies to both directions unless ``up`` (client→target) or ``down``
    (target→client) is given. Use as a context manager or call :meth:`start`/:meth:`stop`
    (or :meth:`run` to relay in the calling thread until :meth:`stop`).
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
        buffer_bytes: int = BUFFER_BYTES,
    ) -> None:
        base = impairment or Impairment()
        self.target = target
        self.seed = seed
        self._factory = socket_factory
        self._buffer_bytes = buffer_bytes
        self._up = _Direction(
            "up", up or base, random.Random(f"{seed}/up"), random.Random(f"{seed}/up/burst")
        )
        self._down = _Direction(
            "down", down or base, random.Random(f"{seed}/down"), random.Random(f"{seed}/down/burst")
        )
        self._lock = threading.Lock()
        self._listen = socket_factory(_family(listen[0]), socket.SOCK_DGRAM)
        _grow_buffers(self._listen, buffer_bytes)
        self._listen.bind(listen)
        self._listen.setblocking(False)
        self._upstream: dict[tuple[str, int], socket.socket] = {}
        self._client_of: dict[socket.socket, tuple[str, int]] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listen, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._delayed: list[_Delayed] = []  # heap, only for datagrams with jitter
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
        self._thread = threading.Thread(target=self.run, name="impaired-relay", daemon=True)
        self._thread.start()
        return self

    def request_stop(self) -> None:
        """Make :meth:`run` return soon (safe from a signal handler)."""
        self._stop = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def stop(self) -> None:
        """Stop the thread and close every socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.request_stop()
        if self._thread is not None:
            self._thread.join(5)
        self._sel.close()
        for s in [self._listen, self._wake_r, self._wake_w, *self._upstream.values()]:
            s.close()

    def __enter__(self) -> ImpairedRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the relay loop ---------------------------------------------------------------------
    def run(self) -> None:
        """Relay until :meth:`request_stop` (the thread's body; callable directly)."""
        try:
            select = self._sel.select
            while not self._stop:
                for key, _ in select(self._next_timeout()):
                    tag = key.data
                    if tag == "listen":
                        self._drain_listen()
                    elif tag == "wake":
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(64)
                    else:
                        self._drain_upstream(key.fileobj)  # type: ignore[arg-type]
                self._release_due(time.monotonic())
        except Exception:
            log.exception("impaired relay thread crashed")

    def _next_timeout(self) -> float:
        due = [d.fifo[0][0] for d in (self._up, self._down) if d.fifo]
        if self._delayed:
            due.append(self._delayed[0][0])
        for d in (self._up, self._down):
            if d.held:
                due += [h.deadline for h, _, _ in d.held]
        if not due:
            return 0.5
        return max(0.0, min(due) - time.monotonic())

    def _drain_listen(self) -> None:
        listen = self._listen
        d = self._up
        upstream = self._upstream
        now = time.monotonic()
        fast = self._fast_path(d)
        for _ in range(BATCH):
            try:
                data, addr = listen.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. ICMP errors surfacing on the socket
            client = (addr[0], addr[1])
            up_sock = upstream.get(client)
            if up_sock is None:
                up_sock = self._new_upstream(client)
            if fast is None:
                self._impair(d, data, up_sock, None, now)
            else:
                fast(data, up_sock, None, now)

    def _new_upstream(self, client: tuple[str, int]) -> socket.socket:
        up_sock = self._factory(_family(self.target[0]), socket.SOCK_DGRAM)
        _grow_buffers(up_sock, self._buffer_bytes)
        # connected: send() without an address, and only the target's datagrams come back
        up_sock.connect(self.target)
        up_sock.setblocking(False)
        with self._lock:
            self._upstream[client] = up_sock
        self._client_of[up_sock] = client
        self._sel.register(up_sock, selectors.EVENT_READ, "upstream")
        return up_sock

    def _drain_upstream(self, sock: socket.socket) -> None:
        client = self._client_of[sock]
        d = self._down
        listen = self._listen
        now = time.monotonic()
        fast = self._fast_path(d)
        recv = sock.recv
        for _ in range(BATCH):
            try:
                data = recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if fast is None:
                self._impair(d, data, listen, client, now)
            else:
                fast(data, listen, client, now)

    def _fast_path(self, d: _Direction) -> Callable[..., None] | None:
        """A cheaper per-datagram function when the impairment draws nothing at random (a
        constant delay or nothing at all) and no datagram is held for reordering."""
        imp = d.impairment
        if (
            imp.loss
            or imp.duplicate
            or imp.reorder
            or imp.jitter
            or imp.bad_enter
            or imp.rate
            or imp.max_size
            or d.held
            or self._delayed
        ):
            return None
        stats = d.stats
        if imp.delay > 0:
            delay = imp.delay
            append = d.fifo.append

            def delayed(
                data: bytes, sock: socket.socket, dest: tuple[str, int] | None, now: float
            ) -> None:
                stats.received += 1
                stats.delayed += 1
                d.undrawn += 1
                append((now + delay, sock, dest, data, False))

            return delayed
        if d.fifo:
            return None  # keep order behind datagrams still delayed by an earlier setting

        def direct(
            data: bytes, sock: socket.socket, dest: tuple[str, int] | None, now: float
        ) -> None:
            stats.received += 1
            d.undrawn += 1
            self._send(d, data, sock, dest)

        return direct

    def _impair(
        self,
        d: _Direction,
        data: bytes,
        sock: socket.socket,
        dest: tuple[str, int] | None,
        now: float,
    ) -> None:
        imp = d.impairment
        rng = d.rng
        if d.undrawn:
            # datagrams of the fast path drew nothing: catch up, so that the n-th datagram's
            # decisions still depend only on the seed
            for _ in range(4 * d.undrawn):
                rng.random()
            d.undrawn = 0
        r_loss, r_dup, r_reorder, r_jitter = rng.random(), rng.random(), rng.random(), rng.random()
        stats = d.stats
        stats.received += 1
        if imp.bad_enter > 0:
            # Gilbert-Elliott: move the chain, then lose with the state's probability
            burst = d.burst_rng
            if d.bad:
                # (the draw comes first: the n-th datagram's draws depend only on the seed)
                d.bad = burst.random() >= imp.bad_exit and now - d.bad_since < imp.bad_time
            else:
                d.bad = burst.random() < imp.bad_enter
                if d.bad:
                    d.bad_since = now
            lost = burst.random() < imp.bad_loss if d.bad else r_loss < imp.loss
        else:
            lost = r_loss < imp.loss
        if lost or 0 < imp.max_size < len(data):
            stats.dropped += 1
            return
        copies = 1
        if r_dup < imp.duplicate:
            stats.duplicated += 1
            copies = 2
        hold = r_reorder < imp.reorder
        delay, jitter, rate = imp.delay, imp.jitter, imp.rate
        for _ in range(copies):
            sent = now  # when it has crossed the bottleneck
            if rate > 0:
                start = d.busy_until if d.busy_until > now else now
                if (start - now) * rate > imp.queue_bytes:
                    stats.queue_drops += 1
                    continue
                sent = d.busy_until = start + len(data) / rate
            if jitter > 0:
                stats.delayed += 1
                self._counter += 1
                due = sent + delay + r_jitter * jitter
                heapq.heappush(self._delayed, (due, self._counter, sock, dest, data, d, hold))
            elif delay > 0 or rate > 0:
                # (in order: with a constant delay, release times never decrease)
                stats.delayed += 1
                d.fifo.append((sent + delay, sock, dest, data, hold))
            else:
                self._emit(d, data, sock, dest, now, hold)
            hold = False  # only the first copy may be held

    def _emit(
        self,
        d: _Direction,
        data: bytes,
        sock: socket.socket,
        dest: tuple[str, int] | None,
        now: float,
        hold: bool,
    ) -> None:
        if hold and not d.held:
            imp = d.impairment
            d.stats.reordered += 1
            d.held.append((_Held(data, imp.reorder_gap, now + imp.reorder_timeout), sock, dest))
            return
        self._send(d, data, sock, dest)
        if d.held:
            for entry in list(d.held):
                h = entry[0]
                h.remaining -= 1
                if h.remaining <= 0:
                    d.held.remove(entry)
                    self._send(d, h.data, entry[1], entry[2])

    def _release_due(self, now: float) -> None:
        for d in (self._up, self._down):
            fifo = d.fifo
            if not fifo or fifo[0][0] > now:
                continue
            popleft = fifo.popleft
            stats = d.stats
            while fifo and fifo[0][0] <= now:
                _, sock, dest, data, hold = popleft()
                if hold or d.held:
                    self._emit(d, data, sock, dest, now, hold)
                    continue
                try:  # inlined _send()
                    if dest is None:
                        sock.send(data)
                    else:
                        sock.sendto(data, dest)
                except OSError:
                    stats.send_errors += 1
                    continue
                stats.forwarded += 1
                stats.bytes_forwarded += len(data)
        delayed = self._delayed
        while delayed and delayed[0][0] <= now:
            _, _, sock, dest, data, d, hold = heapq.heappop(delayed)
            self._emit(d, data, sock, dest, now, hold)
        for d in (self._up, self._down):
            if d.held:
                for entry in list(d.held):
                    if entry[0].deadline <= now:
                        d.held.remove(entry)
                        self._send(d, entry[0].data, entry[1], entry[2])

    def _send(
        self, d: _Direction, data: bytes, sock: socket.socket, dest: tuple[str, int] | None
    ) -> None:
        """``dest`` None: ``sock`` is a connected upstream socket."""
        try:
            if dest is None:
                sock.send(data)
            else:
                sock.sendto(data, dest)
        except OSError:
            d.stats.send_errors += 1
            return
        stats = d.stats
        stats.forwarded += 1
        stats.bytes_forwarded += len(data)


# -- the relay as its own process --------------------------------------------------------------


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _impairment_arg(text: str) -> Impairment:
    return Impairment(**json.loads(text))


def main(argv: list[str] | None = None) -> None:
    """``python relay.py --target HOST:PORT [--listen HOST:PORT] [--seed N]
    [--impairment JSON] [--up JSON] [--down JSON]``: print ``LISTEN host port``, relay until
    SIGTERM/SIGINT, then print one JSON line of counters ``{"up": {...}, "down": {...}}``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", type=_endpoint, required=True)
    p.add_argument("--listen", type=_endpoint, default=("127.0.0.1", 0))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impairment", type=_impairment_arg, default=None)
    p.add_argument("--up", type=_impairment_arg, default=None)
    p.add_argument("--down", type=_impairment_arg, default=None)
    args = p.parse_args(argv)
    relay = ImpairedRelay(
        args.target,
        listen=args.listen,
        seed=args.seed,
        impairment=args.impairment,
        up=args.up,
        down=args.down,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: relay.request_stop())
    host, port = relay.address
    print(f"LISTEN {host} {port}", flush=True)
    relay.run()
    print(json.dumps({"up": relay.up.as_dict(), "down": relay.down.as_dict()}), flush=True)
    relay.stop()


class RelayProcess:
    """An :class:`ImpairedRelay` in a child process (``ns.popen`` when ``ns`` is given, so it
    runs inside that namespace). Same constructor arguments, minus ``socket_factory``.

    ``address`` is known once the constructor returns; :meth:`stop` ends it (SIGTERM) and
    fills ``up``/``down`` with its final counters; :meth:`cpu_seconds` is the CPU time it
    used so far (user + system), to show how busy it was.
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
        ns: Any = None,
        python: str = sys.executable,
    ) -> None:
        def ep(a: tuple[str, int]) -> str:
            return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"

        argv = [python, os.path.abspath(__file__), "--target", ep(target)]
        argv += ["--listen", ep(listen), "--seed", str(seed)]
        for flag, imp in (("--impairment", impairment), ("--up", up), ("--down", down)):
            if imp is not None:
                argv += [flag, json.dumps(dataclasses.asdict(imp))]
        self._ns = ns
        kw: dict[str, Any] = {"stdout": subprocess.PIPE, "text": True}
        self.process: subprocess.Popen[str] = (
            ns.popen(argv, **kw) if ns else subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kw)
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().split()
        if len(line) != 3 or line[0] != "LISTEN":
            self._kill()
            raise RuntimeError(f"relay process did not start (said {line!r})")
        self.address: tuple[str, int] = (line[1], int(line[2]))
        self.up = DirectionStats()
        self.down = DirectionStats()

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the relay process used so far."""
        try:
            stat = open(f"/proc/{self.process.pid}/stat").read()
        except OSError:
            return 0.0
        f = stat.rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """SIGTERM, then read the final counters. Idempotent."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                out, _ = self.process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self._kill()
                return
            for line in out.splitlines():
                if line.startswith("{"):
                    counters = json.loads(line)
                    self.up = DirectionStats(**counters["up"])
                    self.down = DirectionStats(**counters["down"])
        self._kill()

    def _kill(self) -> None:
        if self._ns is not None:
            self._ns.kill(self.process)
        elif self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def __enter__(self) -> RelayProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    main()
