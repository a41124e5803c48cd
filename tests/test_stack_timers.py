"""The Stack's timers with many connections: ``poll`` and ``next_deadline`` cost the same
with one connection or a thousand idle ones (a heap of deadlines, not a walk of every
socket), they behave exactly as the walk did, and ``poll`` tells the runtime which sockets
it ran (the runtime wakes only the tasks waiting on those)."""

from __future__ import annotations

import heapq
import random
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest

from mitm_wg.net.stack import Stack
from mitm_wg.net.tcp import TcpSocket, TcpState
from sim import exchange

_NEVER = float("inf")
A_ADDR, B_ADDR = "10.0.0.1", "10.0.0.2"


class WalkingStack(Stack):
    """The stack as it was before its deadline heap: ``poll`` walks every socket for the
    due and the touched ones, ``next_deadline`` takes the minimum of all deadlines. The
    reference the heap must match packet for packet."""

    def poll(self, now: float, out: list[bytes], dispatched: list | None = None) -> None:
        if now > self._now:
            self._now = now
        start = len(out)
        if self._out:
            out.extend(self._out)
            self._out.clear()
        dirty = self._dirty
        segs = self._segs
        deadline = self._deadline
        reap: list[TcpSocket] | None = None
        for sock, t in deadline.items():
            if t > now and sock not in dirty:
                continue
            local = sock.local_addr
            sock.dispatch(now, segs, True)
            if segs:
                self._wrap_tcp_fast(local, sock.remote_addr, segs, out)
                segs.clear()
            if sock.is_closed:
                if reap is None:
                    reap = []
                reap.append(sock)
            else:
                t = sock.poll_at()
                deadline[sock] = _NEVER if t is None else t
        dirty.clear()
        self._timers.clear()  # (kept by _register; unused here)
        if reap:
            self._reap(reap, now)
        self.stats.packets_out += len(out) - start

    def next_deadline(self) -> float | None:
        if self._out or self._dirty:
            return self._now
        if not self._deadline:
            return None
        best = min(self._deadline.values())
        return None if best == _NEVER else best


def _earliest_poll_at(stack: Stack) -> float | None:
    """What next_deadline must say when nothing is pending: the earliest timer of all live
    sockets, asked of the sockets themselves."""
    times = [t for sock in stack._tcp.values() if (t := sock.poll_at()) is not None]
    return min(times) if times else None


def _converse(stack_cls: type[Stack], seed: int, check: Callable[[Stack], None] | None = None):
    """Two stacks, ``stack_cls``, over a lossy, reordering link with 20 connections at a
    time: random sends both ways, reads, half and full closes, aborts and new connections,
    time advancing to the next arrival, timer or application step. Returns every packet
    each side sent, with its time: the transcript."""
    rng = random.Random(seed)
    a = stack_cls([f"{A_ADDR}/24"], randbytes=random.Random(seed + 1).randbytes)
    b = stack_cls([f"{B_ADDR}/24"], randbytes=random.Random(seed + 2).randbytes)
    listener = b.tcp_listen(80, backlog=64)
    now = 0.0
    link: list[tuple[float, int, str, bytes]] = []  # (arrival, order, to, packet)
    transcript: list[tuple[str, float, bytes]] = []
    pairs: list[list[Any]] = []  # [client, server or None]
    count = 0
    out: list[bytes] = []
    next_app = 0.0

    def emit(name: str, stack: Stack) -> None:
        nonlocal count
        stack.poll(now, out)
        for p in out:
            transcript.append((name, now, p))
            if rng.random() < 0.02:
                continue  # lost
            delay = 0.005 + (0.01 if rng.random() < 0.03 else 0.0) + rng.random() * 0.001
            count += 1
            heapq.heappush(link, (now + delay, count, "b" if name == "a" else "a", p))
        out.clear()

    while now < 0.8:
        # the application's step: every 2 ms
        if now >= next_app:
            next_app = now + 0.002
            while len(pairs) < 20 and rng.random() < 0.5:
                pairs.append([a.tcp_connect(B_ADDR, 80, now), None])
            while (s := listener.accept()) is not None:
                for pair in pairs:
                    if pair[1] is None and pair[0].local_port == s.remote_port:
                        pair[1] = s
                        break
            for pair in list(pairs):
                client, server = pair
                r = rng.random()
                if server is None:
                    continue
                if r < 0.2 and client.state is TcpState.ESTABLISHED:
                    client.send(bytes(rng.randrange(1, 20_000)))
                elif r < 0.3 and server.state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
                    server.send(bytes(rng.randrange(1, 10_000)))
                elif r < 0.31:
                    client.shutdown_write(now)
                elif r < 0.315:
                    client.abort(now)
                elif r < 0.32:
                    server.close(now)
                if rng.random() < 0.7:
                    client.recv(1 << 20)
                if rng.random() < 0.7:
                    server.recv(1 << 20)
                if client.is_closed and server.is_closed:
                    pairs.remove(pair)
        emit("a", a)
        emit("b", b)
        if check is not None:
            check(a)
            check(b)
        # the next event: an arrival, a timer, the application
        times = [next_app]
        if link:
            times.append(link[0][0])
        for stack in (a, b):
            d = stack.next_deadline()
            if d is not None:
                times.append(d)
        now = max(now, min(times))
        while link and link[0][0] <= now:
            _, _, to, p = heapq.heappop(link)
            (a if to == "a" else b).receive(p, now)
    return transcript


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_heap_sends_exactly_what_the_walk_sent(seed: int) -> None:
    """Same seed, same packets at the same times in the same order, with the old walk of
    every socket and with the heap: it changes what a poll costs, nothing it does."""
    walked = _converse(WalkingStack, seed)
    heaped = _converse(Stack, seed)
    assert len(walked) > 3000  # (a conversation, not a handshake)
    assert heaped == walked


def test_next_deadline_is_the_earliest_timer_of_all_sockets() -> None:
    """After every poll of a busy conversation (connections opening, sending, closing,
    timers moving earlier and later), next_deadline is exactly the earliest poll_at() of
    the live sockets, and the heap stays small."""
    checked = 0

    def check(stack: Stack) -> None:
        nonlocal checked
        if stack._dirty or stack._out:
            return
        assert stack.next_deadline() == _earliest_poll_at(stack)
        assert len(stack._timers) <= 2 * len(stack._deadline) + 64
        checked += 1

    _converse(Stack, 4, check)
    assert checked > 1000


def _idle_pairs(
    n: int, stack_cls: type[Stack] = Stack
) -> tuple[Stack, Stack, list[tuple[TcpSocket, TcpSocket]]]:
    """``n`` established connections between two ``stack_cls``, all idle: nothing to
    send, no timer."""
    a = stack_cls([f"{A_ADDR}/24"], randbytes=random.Random(1).randbytes)
    b = stack_cls([f"{B_ADDR}/24"], randbytes=random.Random(2).randbytes)
    listener = b.tcp_listen(80, backlog=n + 8)
    clients = [a.tcp_connect(B_ADDR, 80, 0.0) for _ in range(n)]
    for t in (0.001, 0.002, 0.003, 0.004):
        exchange(a, b, t)
    servers = []
    while (s := listener.accept()) is not None:
        servers.append(s)
    assert len(servers) == n and all(c.state is TcpState.ESTABLISHED for c in clients)
    out: list[bytes] = []
    a.poll(1.0, out)
    b.poll(1.0, out)
    assert out == [] and a.next_deadline() is None
    return a, b, list(zip(clients, servers, strict=True))


def _lines_run(fn: Callable[[], object], code_of: tuple[Any, ...]) -> int:
    """How many lines of the given functions' code ``fn()`` runs (a count, not a time)."""
    codes = {f.__code__ for f in code_of}
    lines = 0

    def local(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal lines
        if event == "line":
            lines += 1
        return local

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        return local if frame.f_code in codes else None

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return lines


def test_poll_and_next_deadline_do_not_walk_idle_connections() -> None:
    """With 500 idle connections open, one of them sending: the lines poll and
    next_deadline run are exactly those with 5 (the walk ran its loop once per socket)."""
    counted = (Stack.poll, Stack._due, Stack.next_deadline)
    runs = []
    for n in (5, 500):
        a, _b, pairs = _idle_pairs(n)
        client = pairs[0][0]
        out: list[bytes] = []

        def step(a: Stack = a, client: TcpSocket = client, out: list[bytes] = out) -> None:
            client.send(b"x" * 100)
            a.poll(2.0, out)
            a.next_deadline()  # the retransmission timer now
            a.poll(2.1, out)  # not due yet
            a.next_deadline()

        runs.append(_lines_run(step, counted))
        assert len(out) == 1  # the 100 bytes
    assert runs[0] == runs[1]


def test_the_walk_would_have_failed_that_test() -> None:
    """The same count for the old walk grows with the idle connections (so the test above
    measures what it claims)."""
    runs = []
    for n in (5, 50):
        a, _b, pairs = _idle_pairs(n, WalkingStack)
        client = pairs[0][0]
        out: list[bytes] = []

        def step(a: Stack = a, client: TcpSocket = client, out: list[bytes] = out) -> None:
            client.send(b"x" * 100)
            a.poll(2.0, out)
            a.next_deadline()

        runs.append(_lines_run(step, (WalkingStack.poll, WalkingStack.next_deadline)))
    assert runs[1] > runs[0] + 40


def test_poll_reports_the_sockets_it_ran() -> None:
    """``dispatched`` gets exactly the sockets touched by the application, by input, or
    due by a timer (and reaped ones), in creation order; nothing for a poll with no work."""
    a, b, pairs = _idle_pairs(4)
    (c0, s0), _, (c2, s2), (c3, _) = pairs
    out: list[bytes] = []
    ran: list[TcpSocket] = []
    a.poll(2.0, out, ran)
    assert ran == [] and out == []
    # the application touched two (in reverse creation order): both, in creation order
    c2.send(b"hello")
    c0.send(b"hi")
    a.poll(2.0, out, ran)
    assert ran == [c0, c2] and len(out) == 2
    ran.clear()
    # their segments are input for the server side's two
    for p in out:
        b.receive(p, 2.001)
    out.clear()
    b.poll(2.001, out, ran)
    assert ran == [s0, s2]
    ran.clear()
    for p in out:  # the ACKs (delayed: none yet, or one each)
        a.receive(p, 2.002)
    out.clear()
    # nothing touched, the timers not due: none
    a.poll(2.002, out, ran)
    b.poll(2.002, out, ran)
    # a due timer: the server's delayed ACK, or the client's retransmission
    due = b.next_deadline()
    if due is not None:
        b.poll(due, out, ran)
        assert set(ran) <= {s0, s2} and ran
    ran.clear()
    # an abort: the socket runs (its RST goes out) and is reaped, reported all the same
    c3.abort(3.0)
    a.poll(3.0, out, ran)
    assert c3 in ran and c3 not in a._tcp.values() and c3 not in a._timer_at
    assert len(a._order) == 3


def test_a_deadline_that_moved_later_fires_at_its_new_time() -> None:
    """A retransmission timer restarted later by an ACK keeps its old heap entry; a poll
    past the old time but before the new one (no next_deadline in between: a late
    wake-up) sends nothing and keeps the socket's timer; at the new time it fires."""
    a, b, [(client, _server)] = _idle_pairs(1)
    out: list[bytes] = []
    client.send(b"x" * 100)
    a.poll(2.0, out)
    assert len(out) == 1
    first = out[:]
    out.clear()
    old = client.poll_at()
    assert old is not None and old > 2.0
    client.send(b"y" * 100)  # a second segment, in flight while the first is ACKed
    a.poll(2.05, out)
    assert len(out) == 1
    out.clear()
    for p in first:
        b.receive(p, 2.06)
    b.poll(2.3, out)  # (past any delayed ACK)
    acks = out[:]
    out.clear()
    assert acks
    for p in acks:
        a.receive(p, 2.1)  # the first is ACKed: the timer restarts for the second
    a.poll(2.1, out)
    assert out == []
    new = client.poll_at()
    assert new is not None and new > old
    between = (old + new) / 2
    a.poll(between, out)
    assert out == []
    assert a.next_deadline() == new
    a.poll(new, out)
    assert len(out) == 1 and b"y" * 100 in out[0]  # the retransmission


def test_a_socket_reaped_by_a_later_segment_of_its_batch_is_reported() -> None:
    """A connect whose SYN went out twice (the first handshake lost, say) gets two RSTs in
    one batch: the first closes the socket, the second finds the corpse and reaps it at
    once (a SYN right behind must find the listener). The socket never runs in a poll, and
    its waiter must still look: the next poll reports it. (Unreported, the runtime's connect
    slept on with the socket gone: `mitm-wg check --url` to a closed port said "no answer
    within 10 s" instead of "refused".)"""
    a = Stack([f"{A_ADDR}/24"], randbytes=random.Random(1).randbytes)
    b = Stack([f"{B_ADDR}/24"], randbytes=random.Random(2).randbytes)  # no listener: RSTs
    sock = a.tcp_connect(B_ADDR, 9, 0.0)
    out: list[bytes] = []
    ran: list[TcpSocket] = []
    a.poll(0.0, out, ran)
    retry = a.next_deadline()
    assert retry is not None and ran == [sock]
    a.poll(retry, out, ran)
    assert len(out) == 2  # two SYNs
    resets: list[bytes] = []
    for syn in out:
        b.receive(syn, retry)
    b.poll(retry, resets)
    assert len(resets) == 2
    ran.clear()
    a.receive_batch(resets, retry + 0.001, authenticated=True)
    assert sock.is_closed and isinstance(sock.error, ConnectionRefusedError)
    assert sock not in a._order  # reaped by the second RST, not by a poll
    a.poll(retry + 0.001, out, ran)
    assert ran == [sock]
    # beside a socket that runs in the same poll (the sorted path): both reported
    other = a.tcp_connect(B_ADDR, 10, 2.0)
    out.clear()
    a.poll(2.0, out)
    retry = a.next_deadline()
    assert retry is not None
    a.poll(retry, out)
    resets.clear()
    for syn in out:
        b.receive(syn, retry)
    b.poll(retry, resets)
    assert len(resets) == 2
    fresh = a.tcp_connect(B_ADDR, 11, retry)  # touched: its SYN goes out in this poll
    a.receive_batch(resets, retry + 0.001, authenticated=True)
    assert other.is_closed and other not in a._order
    ran.clear()
    a.poll(retry + 0.001, out, ran)
    assert sorted(ran, key=id) == sorted([other, fresh], key=id)


def test_poll_reports_udp_sockets_that_received() -> None:
    """A UDP socket that got a datagram, or an ICMP error for one it sent, since the last
    poll is reported once (its waiter looks); one that got nothing is not."""
    a = Stack([f"{A_ADDR}/24"], randbytes=random.Random(1).randbytes)
    b = Stack([f"{B_ADDR}/24"], randbytes=random.Random(2).randbytes)
    quiet = a.udp_bind(0)
    target = a.udp_bind(0)
    sender = b.udp_bind(0)
    out: list[bytes] = []
    ran: list = []
    sender.sendto(b"hi", (A_ADDR, target.local_port))
    b.poll(0.0, out)
    a.poll(0.0, [], ran)
    assert ran == []
    for p in out:
        a.receive(p, 0.001)
    out.clear()
    a.poll(0.001, out, ran)
    assert ran == [target] and target.pending == 1 and quiet.pending == 0
    ran.clear()
    a.poll(0.002, out, ran)
    assert ran == []
    # an ICMP port unreachable for a datagram sent to a port nobody bound
    quiet.sendto(b"anyone?", (B_ADDR, 9))
    a.poll(0.003, out)
    errors: list[bytes] = []
    for p in out:
        b.receive(p, 0.004)
    b.poll(0.004, errors)
    assert len(errors) == 1
    for p in errors:
        a.receive(p, 0.005)
    a.poll(0.005, [], ran)
    assert ran == [quiet] and isinstance(quiet.error, ConnectionRefusedError)
    # a socket closed before the poll is not reported (nothing waits on it any more)
    ran.clear()
    sender.sendto(b"late", (A_ADDR, target.local_port))
    out.clear()
    b.poll(0.006, out)
    for p in out:
        a.receive(p, 0.007)
    target.close()
    a.poll(0.007, [], ran)
    assert ran == []
