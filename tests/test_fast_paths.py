"""The hot-path shortcuts behave exactly like the general code they bypass.

* ``TcpSocket.fast_input`` (header prediction) and ``TcpSocket.sack_ack_input`` (pure ACKs
  with SACK blocks) versus ``TcpSocket.process``;
* ``Stack._rx_tcp4``/``_rx_tcp6`` (taken for ``bytes`` packets) versus the general receive
  path (taken for any other buffer type); ``Stack.receive_batch`` in tests/test_tcp_gro.py;
* ``Stack._wrap_tcp_fast`` versus ``Stack._wrap_tcp``.
"""

from __future__ import annotations

import copy
import ipaddress
import random
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from mitm_wg.net.assembler import Assembler
from mitm_wg.net.bbr import Bbr
from mitm_wg.net.checksum import pseudo_header_sum, verify
from mitm_wg.net.congestion import NewReno
from mitm_wg.net.delivery import DeliveryRate, RateSample
from mitm_wg.net.hystart import HyStart
from mitm_wg.net.pacing import Pacer, ReleaseSpan
from mitm_wg.net.recovery import Rack
from mitm_wg.net.rtt import RttEstimator
from mitm_wg.net.stack import Stack
from mitm_wg.net.tcp import M32, TcpConfig, TcpSocket, TcpState, TcpStats, _RcvTuning
from mitm_wg.net.tcp_wire import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    TCP_TUPLE_FIELDS,
    URG,
    TcpSegment,
)

A = ipaddress.ip_address("10.0.0.1").packed
B = ipaddress.ip_address("10.0.0.2").packed
A6 = ipaddress.ip_address("fd00::1").packed
B6 = ipaddress.ip_address("fd00::2").packed
MSS = 1400
INF = float("inf")


def state_of(obj: Any) -> Any:
    """A comparable snapshot of a socket's whole state (recursing into helper objects).
    An Assembler's ranges, and a socket's unread in-order data, show their data joined: how
    it is split into chunks (one per segment, or one per coalesced run) is not state anyone
    can observe."""
    if isinstance(obj, Assembler):
        return {
            "ranges": [(r[0], r[1], b"".join(r[2])) for r in obj._ranges],
            "recent": list(obj._recent),
            "size": obj.size,
            "max_ranges": obj.max_ranges,
            "dup_acks": (obj._dup_acks_at, obj._dup_acks),
            "dsack": obj.dsack,
        }
    if isinstance(
        obj,
        (
            TcpStats,
            RttEstimator,
            NewReno,
            HyStart,
            _RcvTuning,
            Rack,
            Pacer,
            ReleaseSpan,
            Bbr,
            DeliveryRate,
            RateSample,
        ),
    ):
        slots = [s for cls in type(obj).__mro__ for s in getattr(cls, "__slots__", ())]
        return {s: state_of(getattr(obj, s)) for s in slots if hasattr(obj, s)}
    if isinstance(obj, TcpSocket):
        hidden = ("config", "_on_touched", "_rq", "_rq_off")
        state = {k: state_of(v) for k, v in vars(obj).items() if k not in hidden}
        state["_rq"] = b"".join(obj._rq)[obj._rq_off :]
        return state
    if isinstance(obj, list):
        return [state_of(x) for x in obj]
    if isinstance(obj, (bytearray, memoryview)):
        return bytes(obj)
    if isinstance(obj, TcpSegment):
        return obj._key()
    if isinstance(obj, BaseException):
        return (type(obj), obj.args)
    return obj


def established_pair(seed: int, unread: int = 0) -> TcpSocket:
    """A socket in ESTABLISHED with data in flight both ways and some history."""
    rng = random.Random(seed)
    cfg = TcpConfig(mss=MSS, recv_buffer=1 << 16, send_buffer=1 << 20)
    syn = TcpSegment(
        80, 1234, rng.getrandbits(32), 0, SYN, 65535, mss=MSS, wscale=7, timestamp=(1000, 0)
    )
    sock = TcpSocket.from_syn(
        cfg, B, 1234, A, 80, syn, isn=rng.getrandbits(32), now=0.0, randbytes=rng.randbytes
    )
    out: list[TcpSegment] = []
    sock.dispatch(0.0, out)
    (synack,) = out
    irs = syn.seq
    sock.process(
        TcpSegment(
            80, 1234, (irs + 1) & M32, (synack.seq + 1) & M32, ACK, 512, timestamp=(1001, 0)
        ),
        0.01,
    )
    assert sock.state is TcpState.ESTABLISHED
    sock.send(bytes(rng.randrange(0, 20000)))
    out.clear()
    sock.dispatch(0.02, out)
    if unread:
        seg = TcpSegment(
            80,
            1234,
            (irs + 1) & M32,
            sock.snd_una,
            ACK,
            512,
            timestamp=(1002, 0),
            payload=bytes(unread),
        )
        sock.process(seg, 0.03)
        out.clear()
        sock.dispatch(0.03, out)
    return sock


@settings(max_examples=400, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    unread=st.sampled_from([0, 0, 700, 60000]),
    seq_off=st.sampled_from([0, 0, 0, 1, -1, 5000, -(2**31)]),
    ack_sel=st.sampled_from(["una", "mid", "max", "beyond", "old"]),
    flags=st.sampled_from([ACK, ACK, ACK | PSH, ACK | FIN, ACK | SYN, ACK | RST, PSH, ACK | URG]),
    window=st.sampled_from([0, 1, 512, 65535]),
    ts_sel=st.sampled_from(["same", "newer", "older", "none"]),
    tsecr=st.sampled_from([0, 5, 2**31]),
    plen=st.sampled_from([0, 0, 1, 1388, 1400, 70000]),
    close_read=st.booleans(),
    common=st.booleans(),
)
def test_fast_input_is_process(
    seed: int,
    unread: int,
    seq_off: int,
    ack_sel: str,
    flags: int,
    window: int,
    ts_sel: str,
    tsecr: int,
    plen: int,
    close_read: bool,
    common: bool,
) -> None:
    if common:  # steer half the examples towards segments the fast path accepts
        seq_off, flags = 0, flags & PSH | ACK
        ts_sel = "same" if ts_sel in ("none", "older") else ts_sel
        ack_sel = "max" if ack_sel in ("beyond", "old") else ack_sel
    sock = established_pair(seed, unread)
    if close_read and not unread:
        sock._rd_closed = True
    una, smax = sock._snd_una, sock._snd_max
    ack = {
        "una": una,
        "mid": (una + smax) // 2,
        "max": smax,
        "beyond": smax + 1,
        "old": una - 1,
    }[ack_sel]
    seq = (sock._rcv_nxt + seq_off) & M32
    recent = sock._ts_recent
    tsval = {"same": recent, "newer": recent + 7, "older": recent - 3, "none": None}[ts_sel]
    payload = bytes(range(256)) * (plen // 256) + bytes(plen % 256)
    now = 0.5
    slow = copy.deepcopy(sock)
    before = state_of(sock)
    handled = sock.fast_input(
        seq,
        ack & M32,
        flags,
        window,
        None if tsval is None else tsval & M32,
        tsecr if tsval is not None else 0,
        memoryview(payload),
        now,
    )
    if not handled:
        assert state_of(sock) == before, "a declined fast path must not change anything"
        return
    seg = TcpSegment(
        80,
        1234,
        seq,
        ack & M32,
        flags,
        window,
        timestamp=None if tsval is None else (tsval & M32, tsecr),
        payload=payload,
    )
    slow.process(seg, now)
    assert state_of(sock) == state_of(slow)
    out_fast: list[TcpSegment] = []
    out_slow: list[TcpSegment] = []
    sock.dispatch(now, out_fast)
    slow.dispatch(now, out_slow)
    assert [s._key() for s in out_fast] == [s._key() for s in out_slow]


def test_fast_input_drops_and_counts_what_a_full_reassembly_queue_cannot_take() -> None:
    sock = established_pair(3, 0)
    asm = sock._asm
    base = sock._rcv_nxt
    for i in range(asm.max_ranges):  # 2-byte ranges with 2-byte holes between them
        assert asm.add(base + 10 + 4 * i, b"ab")
    seq = (base + 100 + 4 * asm.max_ranges) & M32  # would need one range more
    slow = copy.deepcopy(sock)
    tsval = sock._ts_recent
    payload = b"z" * 100
    assert sock.fast_input(seq, sock.snd_una, ACK, 512, tsval, 0, memoryview(payload), 0.5)
    slow.process(
        TcpSegment(80, 1234, seq, sock.snd_una, ACK, 512, timestamp=(tsval, 0), payload=payload),
        0.5,
    )
    assert state_of(sock) == state_of(slow)
    assert sock.stats.ofo_drops == sock.stats.dropped == 1
    assert len(asm) == asm.max_ranges


def test_fast_input_takes_the_common_segments() -> None:
    """In-order data and plain ACKs do take the fast path (else the tests above prove nothing)."""
    sock = established_pair(7)
    seq = sock.rcv_nxt
    tsval = sock._ts_recent + 1
    assert sock.fast_input(seq, sock.snd_una, ACK | PSH, 512, tsval, 0, b"x" * 1000, 1.0)
    assert sock.recv(5000) == b"x" * 1000
    mid = (sock._snd_una + sock._snd_max) // 2 & M32
    assert sock.fast_input((seq + 1000) & M32, mid, ACK, 512, tsval, 0, b"", 1.1)
    assert sock.snd_una == mid


# -- TcpSocket.sack_ack_input (pure ACKs with SACK blocks) versus process -------------------


def sack_sender(
    seed: int, congestion: str, rack: bool, timestamps: bool, history: int
) -> tuple[TcpSocket, random.Random]:
    """A socket in ESTABLISHED (SACK permitted) with a window of data in flight and
    ``history`` random ACKs with SACK blocks behind it, fed through the general path (a
    scoreboard, duplicate ACKs, often recovery and retransmissions)."""
    rng = random.Random(seed)
    cfg = TcpConfig(
        mss=MSS,
        recv_buffer=1 << 16,
        send_buffer=1 << 20,
        congestion=congestion,
        rack=rack,
        pacing=False,
        timestamps=timestamps,
    )
    irs = rng.getrandbits(32)
    syn = TcpSegment(
        80, 1234, irs, 0, SYN, 65535, mss=MSS, wscale=7, sack_permitted=True, timestamp=(1000, 0)
    )
    sock = TcpSocket.from_syn(
        cfg, B, 1234, A, 80, syn, isn=rng.getrandbits(32), now=0.0, randbytes=rng.randbytes
    )
    out: list[TcpSegment] = []
    sock.dispatch(0.0, out)
    rcv = (irs + 1) & M32
    sock.process(
        TcpSegment(80, 1234, rcv, sock._snd_max & M32, ACK, 2000, timestamp=(1001, 0)), 0.01
    )
    assert sock.state is TcpState.ESTABLISHED
    sock.send(bytes(300_000))
    sock._cc.cwnd = 40 * MSS
    now = 0.02
    sock.dispatch(now, out)
    tsval = 1002
    for _ in range(history):
        now += rng.choice([0.0005, 0.003, 0.03])
        tsval += rng.randrange(2)
        una, smax = sock._snd_una, sock._snd_max
        ack = una + rng.choice([0, 0, 0, MSS, (smax - una) // 4])
        start = ack + MSS * rng.randrange(1, 8)
        blocks = tuple(
            ((start + MSS * 3 * i) & M32, min(start + MSS * (3 * i + 1), smax) & M32)
            for i in range(rng.randrange(1, 4))
        )
        ts = (tsval, sock._ts_val(now) - 5) if timestamps else None
        sock.process(
            TcpSegment(80, 1234, rcv, ack & M32, ACK, 2000, timestamp=ts, sack_blocks=blocks), now
        )
        sock.dispatch(now, out)
    return sock, rng


_EDGES = ["inside", "inside", "inside", "sacked", "dsack", "beyond", "empty", "old", "wrapped"]


@settings(max_examples=500, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    congestion=st.sampled_from(["newreno", "bbr"]),
    rack=st.booleans(),
    timestamps=st.sampled_from([True, True, True, False]),
    history=st.integers(0, 8),
    edges=st.lists(st.sampled_from(_EDGES), min_size=1, max_size=4),
    ack_sel=st.sampled_from(["una", "una", "mid", "max", "beyond", "old", "too_old"]),
    ts_sel=st.sampled_from(["same", "newer", "older", "far"]),
    tsecr_sel=st.sampled_from(["echo", "echo", "zero", "future"]),
    seq_off=st.sampled_from([0, 0, 0, 0, 1, -1, 3000]),
    window=st.sampled_from([2000, 2000, 0, 1, 65535]),
    state=st.sampled_from(["established"] * 6 + ["fin_wait", "close_wait"]),
    dt=st.sampled_from([0.0, 0.001, 0.05, 3.0]),
    common=st.booleans(),
)
def test_sack_ack_input_is_process(
    seed: int,
    congestion: str,
    rack: bool,
    timestamps: bool,
    history: int,
    edges: list[str],
    ack_sel: str,
    ts_sel: str,
    tsecr_sel: str,
    seq_off: int,
    window: int,
    state: str,
    dt: float,
    common: bool,
) -> None:
    """Random pure ACKs with 1-4 SACK blocks (inside the flight, already SACKed, D-SACK
    below SND.UNA, beyond SND.MAX, empty, wrapped), old and unacceptable ACKs, PAWS
    failures, window changes, other states: sack_ack_input either declines without a
    trace or has exactly the effect of process (state, then what the socket sends)."""
    if common:  # steer half the examples towards segments the fast path accepts
        timestamps, state, seq_off = True, "established", 0
        ts_sel = "same" if ts_sel in ("older", "far") else ts_sel
        ack_sel = "una" if ack_sel in ("beyond", "too_old") else ack_sel
    sock, rng = sack_sender(seed, congestion, rack, timestamps, history)
    if state == "fin_wait":
        sock.shutdown_write(0.5)
    elif state == "close_wait":
        sock.process(
            TcpSegment(
                80,
                1234,
                sock._rcv_nxt & M32,
                sock._snd_una & M32,
                ACK | FIN,
                2000,
                timestamp=(sock._ts_recent, 0) if timestamps else None,
            ),
            0.5,
        )
        assert sock.state is TcpState.CLOSE_WAIT
    now = 0.5 + dt
    sock._ka_probes = rng.randrange(2)  # (as if a keepalive probe were unanswered)
    una, smax = sock._snd_una, sock._snd_max
    ack = {
        "una": una,
        "mid": (una + smax) // 2,
        "max": smax,
        "beyond": smax + 1,
        "old": una - rng.randrange(1, 3 * MSS),
        "too_old": una - sock._max_snd_wnd - 1,
    }[ack_sel]
    base = max(ack, una)
    blocks = []
    for kind in edges:
        if kind == "inside" and smax > base:
            s = rng.randrange(base, smax)
            e = rng.randrange(s + 1, smax + 1)
        elif kind == "sacked" and sock._sacked:
            s, e = rng.choice(sock._sacked)
        elif kind == "dsack":
            s = una - rng.randrange(1, 4 * MSS)
            e = rng.randrange(s + 1, una + 2)
        elif kind == "beyond":
            s = smax + rng.randrange(0, MSS)
            e = s + MSS
        elif kind == "empty":
            s = e = base + rng.randrange(0, 4 * MSS)
        elif kind == "wrapped":
            s = base + 2**31 + rng.randrange(1000)
            e = s + MSS
        else:  # "old" (or nothing to pick from)
            e = una - rng.randrange(0, MSS)
            s = e - MSS
        blocks.append((s & M32, e & M32))
    recent = sock._ts_recent
    tsval = {"same": recent, "newer": recent + 3, "older": recent - 1, "far": recent + 2**31}[
        ts_sel
    ] & M32
    tsecr = {"echo": sock._ts_val(now) - 7, "zero": 0, "future": sock._ts_val(now) + 99}[
        tsecr_sel
    ] & M32
    seq = (sock._rcv_nxt + seq_off) & M32
    slow = copy.deepcopy(sock)
    deferred = copy.deepcopy(sock)  # defer=True, then finish_acks
    guarded = copy.deepcopy(sock)  # defer=True, then dispatch (which finishes first)
    then_input = copy.deepcopy(sock)  # defer=True, then the ACK again through process()
    then_fast = copy.deepcopy(sock)  # defer=True, then a plain ACK through fast_input()
    before = state_of(sock)
    handled = sock.sack_ack_input(seq, ack & M32, window, tsval, tsecr, tuple(blocks), now)
    event("handled" if handled else "declined")
    args = (seq, ack & M32, window, tsval, tsecr, tuple(blocks), now, True)
    assert deferred.sack_ack_input(*args) == handled
    assert guarded.sack_ack_input(*args) == handled
    assert then_input.sack_ack_input(*args) == handled
    assert then_fast.sack_ack_input(*args) == handled
    if deferred._ack_batch is not None:
        event("deferred")
        assert deferred.poll_at() == now  # (the stack then dispatches at once)
    # one deferred ACK, finished, is exactly that ACK
    deferred.finish_acks(now)
    assert state_of(deferred) == state_of(sock)
    if not handled:
        assert state_of(sock) == before, "a declined fast path must not change anything"
        return
    segment = TcpSegment(
        80,
        1234,
        seq,
        ack & M32,
        ACK,
        window,
        timestamp=(tsval, tsecr),
        sack_blocks=tuple(blocks),
    )
    slow.process(copy.deepcopy(segment), now)
    assert state_of(sock) == state_of(slow)
    assert sock.poll_at() == slow.poll_at()
    # the same ACK once more, through process(): the deferred work goes first
    twice = copy.deepcopy(sock)
    twice.process(copy.deepcopy(segment), now)
    then_input.process(segment, now)
    assert state_of(then_input) == state_of(twice)
    plain = copy.deepcopy(sock)
    fast_args = (seq, ack & M32, ACK, window, tsval, tsecr, b"", now)
    assert then_fast.fast_input(*fast_args) == plain.fast_input(*fast_args)
    assert state_of(then_fast) == state_of(plain)
    out_fast: list[TcpSegment] = []
    out_slow: list[TcpSegment] = []
    out_guarded: list[TcpSegment] = []
    sock.dispatch(now, out_fast)
    slow.dispatch(now, out_slow)
    guarded.dispatch(now, out_guarded)
    assert [s._key() for s in out_fast] == [s._key() for s in out_slow]
    assert [s._key() for s in out_guarded] == [s._key() for s in out_slow]
    assert state_of(sock) == state_of(slow) == state_of(guarded)


def test_sack_ack_input_takes_the_common_segments() -> None:
    """Duplicate and advancing ACKs with SACK blocks, including a D-SACK, do take the fast
    path (else the test above proves little), and update the scoreboard."""
    for congestion in ("newreno", "bbr"):
        sock, _rng = sack_sender(5, congestion, True, True, 0)
        una, smax = sock._snd_una, sock._snd_max
        rcv = sock._rcv_nxt & M32
        tsval = sock._ts_recent + 1
        tsecr = sock._ts_val(0.05)
        block = ((una + 2 * MSS) & M32, (una + 4 * MSS) & M32)
        assert sock.sack_ack_input(rcv, una & M32, 2000, tsval, tsecr, (block,), 0.05)
        assert sock._sacked == [[una + 2 * MSS, una + 4 * MSS]]
        assert sock.stats.dup_acks == 1
        two = (((una + 5 * MSS) & M32, (una + 6 * MSS) & M32), block)
        assert sock.sack_ack_input(rcv, una & M32, 2000, tsval, tsecr, two, 0.05)
        assert sock._sacked_bytes == 3 * MSS
        dsack = ((una & M32, (una + MSS) & M32), block)
        assert sock.sack_ack_input(rcv, (una + MSS) & M32, 2000, tsval, tsecr, dsack, 0.06)
        assert sock._snd_una == una + MSS < smax


# -- the Stack: bytes (fast paths) versus bytearray (general path) ---------------------------


def make_stacks(
    seed: int, tcp_config: TcpConfig | None = None, v6: bool = False, defer_acks: bool = False
) -> tuple[Stack, Stack]:
    """Two stacks, 10.0.0.1 and .2 (``v6``: fd00::1 and ::2). ``defer_acks`` off by default:
    the comparisons with one by one need every ACK's effect at once."""
    ra, rb = random.Random(seed), random.Random(seed + 1)
    a, b = ("fd00::1/64", "fd00::2/64") if v6 else ("10.0.0.1/24", "10.0.0.2/24")
    stacks = (
        Stack([a], mtu=1420, randbytes=ra.randbytes, tcp_config=tcp_config),
        Stack([b], mtu=1420, randbytes=rb.randbytes, tcp_config=tcp_config),
    )
    for stack in stacks:
        stack.defer_acks = defer_acks
    return stacks


def exchange(a: Stack, b: Stack, rounds: int = 4) -> None:
    """Move packets between two stacks at time 0 (handshakes) for ``rounds`` rounds."""
    for _ in range(rounds):
        for s1, s2 in ((a, b), (b, a)):
            out: list[bytes] = []
            s1.poll(0.0, out)
            for p in out:
                s2.receive(p, 0.0)


def connected_stacks(seed: int, v6: bool = False) -> tuple[Stack, Stack, TcpSocket, TcpSocket]:
    """:func:`make_stacks` with a connection from the first to port 80 of the second,
    established at time 0: (a, b, client, server)."""
    a, b = make_stacks(seed, v6=v6)
    lst = b.tcp_listen(80)
    client = a.tcp_connect("fd00::2" if v6 else "10.0.0.2", 80, 0.0)
    exchange(a, b)
    server = lst.accept()
    assert server is not None
    return a, b, client, server


def run_transfer(
    seed: int,
    as_bytes: bool,
    calls: list[int],
    tcp_config: TcpConfig | None = None,
    batch: bool = False,
    v6: bool = False,
    defer_acks: bool = False,
) -> list[object]:
    """A lossy, reordering bidirectional transfer; returns everything observable.
    ``batch``: each step's packets for a stack go in one ``Stack.receive_batch`` call;
    ``v6``: over IPv6; ``defer_acks``: see Stack.defer_acks."""
    rng = random.Random(seed)
    a, b = make_stacks(seed, tcp_config, v6, defer_acks)
    trace: list[object] = []
    lst = b.tcp_listen(80)
    now = 0.0
    client = a.tcp_connect("fd00::2" if v6 else "10.0.0.2", 80, now)
    server = None
    to_send = {id(client): 300_000, "server": 100_000}
    got = [0, 0]
    pending: list[tuple[Stack, bytes]] = []
    for _step in range(3000):
        now += 0.002
        if server is None:
            server = lst.accept()
        for stack in (a, b):
            out: list[bytes] = []
            stack.poll(now, out)
            trace.append(out)
            for pkt in out:
                dst = b if stack is a else a
                r = rng.random()
                if r < 0.03:
                    continue  # lost
                pending.append((dst, pkt))
                if r > 0.98:
                    pending.append((dst, pkt))  # duplicated
        rng.shuffle(pending) if rng.random() < 0.1 else None
        if batch:
            for stack in (a, b):
                stack.receive_batch([pkt for dst, pkt in pending if dst is stack], now)
        else:
            for dst, pkt in pending:
                dst.receive(pkt if as_bytes else bytearray(pkt), now)
        pending.clear()
        if client.can_send and to_send[id(client)] > 0:
            to_send[id(client)] -= client.send(bytes(min(to_send[id(client)], 20000)))
        if server is not None:
            if server.can_send and to_send["server"] > 0:
                to_send["server"] -= server.send(b"s" * min(to_send["server"], 7000))
            got[0] += len(server.recv(rng.randrange(1, 50000)))
        got[1] += len(client.recv(1 << 20))
        trace.append((got[0], got[1]))
        if got == [300_000, 100_000]:
            break
    assert got == [300_000, 100_000], "transfer did not finish"
    trace.append((a.stats.as_dict(), b.stats.as_dict()))
    trace.append((state_of(client), state_of(server)))
    calls.append(0)
    return trace


def count_takes(monkeypatch: Any, name: str) -> list[int]:
    """Wrap the fast path ``TcpSocket.<name>`` (it returns whether it took the segment) so
    that the returned one-element list counts the segments it takes."""
    hits = [0]
    original = getattr(TcpSocket, name)

    def counting(self: TcpSocket, *args: Any, **kw: Any) -> bool:
        ok = original(self, *args, **kw)
        hits[0] += ok
        return ok

    monkeypatch.setattr(TcpSocket, name, counting)
    return hits


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_stack_fast_receive_path_matches_general_path(monkeypatch: Any, v6: bool) -> None:
    hits = count_takes(monkeypatch, "fast_input")
    calls: list[int] = []
    for seed in (1, 2):
        hits[0] = 0
        fast = run_transfer(seed, True, calls, v6=v6)
        assert hits[0] > 50, "the fast path was not taken"
        hits[0] = 0
        slow = run_transfer(seed, False, calls, v6=v6)
        assert hits[0] == 0
        assert len(fast) == len(slow)
        for i, (x, y) in enumerate(zip(fast, slow, strict=True)):
            assert x == y, f"seed {seed}: traces differ at entry {i}"


@pytest.mark.parametrize("congestion", ["newreno", "bbr"])
@pytest.mark.parametrize("batch", [False, True], ids=["receive", "batch"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_stack_sack_ack_path_matches_general_path(
    monkeypatch: Any, v6: bool, batch: bool, congestion: str
) -> None:
    """The lossy, reordering stack transfer gives identical packets, counters and states
    with and without TcpSocket.sack_ack_input (``batch``: with receive_batch, whose pending
    run a SACK ACK must flush first), and that path is taken."""
    tcp_config = TcpConfig(congestion=congestion)
    original = TcpSocket.sack_ack_input
    calls: list[int] = []
    taken = 0
    for seed in range(1, 15):
        monkeypatch.setattr(TcpSocket, "sack_ack_input", original)
        hits = count_takes(monkeypatch, "sack_ack_input")
        fast = run_transfer(seed, True, calls, tcp_config, batch=batch, v6=v6)
        taken += hits[0]
        monkeypatch.setattr(TcpSocket, "sack_ack_input", lambda self, *args: False)
        slow = run_transfer(seed, True, calls, tcp_config, batch=batch, v6=v6)
        assert len(fast) == len(slow)
        for i, (x, y) in enumerate(zip(fast, slow, strict=True)):
            assert x == y, f"seed {seed}: traces differ at entry {i}"
    # (a receiver with SACK sends one ACK per batch, not a copy per out-of-order segment:
    # about one or two SACK ACKs per transfer with BBR, several with NewReno)
    assert taken > 12, "the SACK ACK path was not taken"


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_deferred_sack_acks_in_batches(monkeypatch: Any, v6: bool) -> None:
    """With Stack.defer_acks, the SACK ACKs of one batch leave RACK's loss detection and the
    delivery-rate sample to the batch's end (TcpSocket.finish_acks): the lossy, reordering
    transfers still deliver every byte (run_transfer checks), batches of several ACKs do
    get deferred, the stack's next poll finishes every pending batch, and recovery works
    as well as ACK by ACK (no more RTOs, about as many retransmissions)."""
    tcp_config = TcpConfig(congestion="bbr")
    original = TcpSocket.sack_ack_input
    deferred = [0, 0]  # ACKs deferred; most in one batch
    in_batch: dict[int, int] = {}

    def counting(self: TcpSocket, *args: Any, **kw: Any) -> bool:
        ok = original(self, *args, **kw)
        if ok and self._ack_batch is not None:
            deferred[0] += 1
            in_batch[id(self)] = in_batch.get(id(self), 0) + 1
            deferred[1] = max(deferred[1], in_batch[id(self)])
        return ok

    batch_original = Stack.receive_batch
    poll_original = Stack.poll

    def counted_batch(self: Stack, *args: Any, **kw: Any) -> None:
        in_batch.clear()
        batch_original(self, *args, **kw)

    def checked_poll(self: Stack, now: float, out: list[bytes]) -> None:
        poll_original(self, now, out)
        assert all(sock._ack_batch is None for sock in self._tcp.values())

    monkeypatch.setattr(TcpSocket, "sack_ack_input", counting)
    monkeypatch.setattr(Stack, "receive_batch", counted_batch)
    monkeypatch.setattr(Stack, "poll", checked_poll)
    calls: list[int] = []
    totals = {True: [0, 0], False: [0, 0]}  # retransmits, RTOs
    for seed in range(1, 15):
        for defer in (True, False):
            trace = run_transfer(seed, True, calls, tcp_config, batch=True, v6=v6, defer_acks=defer)
            states = trace[-1]  # (state_of(client), state_of(server))
            assert isinstance(states, tuple)
            for state in states:
                totals[defer][0] += state["stats"]["retransmits"]
                totals[defer][1] += state["stats"]["rto_expired"]
    assert deferred[0] > 20 and deferred[1] >= 2, deferred
    assert totals[True][1] <= totals[False][1], totals
    assert totals[True][0] <= 1.2 * totals[False][0], totals


def _ip4_tcp(
    src: bytes, dst: bytes, header: bytes, payload: bytes, *, ttl: int = 64, frag: int = 0x4000
) -> bytes:
    import struct

    from mitm_wg.net.checksum import checksum

    total = 20 + len(header) + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, frag, ttl, 6, 0, src, dst)
    ip = ip[:10] + checksum(ip).to_bytes(2, "big") + ip[12:]
    return ip + header + payload


@settings(max_examples=150, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=80),
    tamper=st.sampled_from(
        ["none", "ipsum", "tcpsum", "short", "offset", "frag", "martian", "notours", "pad", "odd"]
    ),
    opts=st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8), b"\x02\x04\x05\x78", b"\x08"]),
    flags=st.sampled_from([ACK, SYN, RST, ACK | PSH, FIN | ACK]),
    to_socket=st.booleans(),
)
def test_hostile_ipv4_tcp_counted_alike(
    data: bytes, tamper: str, opts: bytes, flags: int, to_socket: bool
) -> None:
    import struct

    from mitm_wg.net.checksum import checksum, pseudo_header_sum

    results = []
    for as_bytes in (True, False):
        _a, b, c, srv = connected_stacks(3)
        sport = c.local_port if to_socket else 4444
        src, dst = A, B
        if tamper == "martian":
            src = bytes((224, 0, 0, 1))
        if tamper == "notours":
            dst = bytes((10, 0, 0, 9))
        o = opts + bytes((-len(opts)) % 4) if opts != b"\x08" else b"\x08\x01\x01\x01"
        hlen = 20 + len(o)
        off = hlen // 4 << 4
        if tamper == "offset":
            off = 15 << 4
        payload = data + (b"z" if tamper == "odd" and not len(data) & 1 else b"")
        hdr = struct.pack("!HHIIBBHHH", sport, 80, srv.rcv_nxt, c.rcv_nxt, off, flags, 1000, 0, 0)
        hdr += o
        seg = hdr + payload
        csum = checksum(seg, pseudo_header_sum(src, dst, 6, len(seg)))
        if tamper == "tcpsum":
            csum ^= 0x0100
        seg = seg[:16] + csum.to_bytes(2, "big") + seg[18:]
        pkt = _ip4_tcp(
            src, dst, seg[:hlen], seg[hlen:], frag=0x2000 if tamper == "frag" else 0x4000
        )
        if tamper == "ipsum":
            pkt = pkt[:8] + b"\x01" + pkt[9:]
        if tamper == "short":
            pkt = pkt[: 20 + min(len(seg), 30)]
            pkt = pkt[:2] + len(pkt).to_bytes(2, "big") + pkt[4:]
            pkt = pkt[:10] + b"\0\0" + pkt[12:]
            pkt = pkt[:10] + checksum(pkt[:20]).to_bytes(2, "big") + pkt[12:]
        if tamper == "pad":
            pkt += b"\x01\x01\x08\x0a" * 3
        assert verify(pkt[:20]) or tamper == "ipsum"
        b.receive(pkt if as_bytes else bytearray(pkt), 1.0)
        out = []
        b.poll(1.0, out)
        results.append((b.stats.as_dict(), out, state_of(srv), srv.recv(1 << 20)))
    assert results[0] == results[1]


@settings(max_examples=150, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=80),
    tamper=st.sampled_from(
        [
            "none",
            "tcpsum",
            "short",
            "plen0",
            "long",
            "multicast",
            "unspecified",
            "ours",
            "notours",
            "pad",
            "odd",
        ]
    ),
    opts=st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(8), b"\x02\x04\x05\x78"]),
    flags=st.sampled_from([ACK, SYN, RST, ACK | PSH, FIN | ACK]),
    to_socket=st.booleans(),
    authenticated=st.booleans(),
)
def test_hostile_ipv6_tcp_counted_alike(
    data: bytes, tamper: str, opts: bytes, flags: int, to_socket: bool, authenticated: bool
) -> None:
    """IPv6 as the IPv4 test above: the fast path (``bytes``) and the general one count and
    answer every malformed or misaddressed packet alike (with ``authenticated``, a wrong
    TCP checksum passes on both: WireGuard's tag covered the packet)."""
    import struct

    from mitm_wg.net.checksum import checksum, pseudo_header_sum

    results = []
    for as_bytes in (True, False):
        _a, b, c, srv = connected_stacks(3, v6=True)
        sport = c.local_port if to_socket else 4444
        src, dst = A6, B6
        if tamper == "multicast":
            src = ipaddress.ip_address("ff02::1").packed
        elif tamper == "unspecified":
            src = bytes(16)
        elif tamper == "ours":
            src = B6
        elif tamper == "notours":
            dst = ipaddress.ip_address("fd00::9").packed
        o = opts + bytes((-len(opts)) % 4)
        hlen = 20 + len(o)
        payload = data + (b"z" if tamper == "odd" and not len(data) & 1 else b"")
        hdr = struct.pack(
            "!HHIIBBHHH", sport, 80, srv.rcv_nxt, c.rcv_nxt, hlen // 4 << 4, flags, 1000, 0, 0
        )
        seg = hdr + o + payload
        csum = checksum(seg, pseudo_header_sum(src, dst, 6, len(seg)))
        if tamper == "tcpsum":
            csum ^= 0x0100
        seg = seg[:16] + csum.to_bytes(2, "big") + seg[18:]
        plen = len(seg)
        if tamper == "short":
            seg = seg[: min(len(seg), 12)]
            plen = len(seg)
        elif tamper == "plen0":
            plen = 0
        elif tamper == "long":
            plen += 7
        pkt = struct.pack("!IHBB16s16s", 6 << 28, plen, 6, 64, src, dst) + seg
        if tamper == "pad":
            pkt += b"\x01\x01\x08\x0a" * 3
        b.receive(pkt if as_bytes else bytearray(pkt), 1.0, authenticated=authenticated)
        out = []
        b.poll(1.0, out)
        results.append((b.stats.as_dict(), out, state_of(srv), srv.recv(1 << 20)))
    if authenticated and tamper == "tcpsum":
        # the one documented difference: only the general path still checks the TCP sum
        assert results[0][0]["dropped_checksum"] == 0
        assert results[1][0]["dropped_checksum"] == 1
        return
    assert results[0] == results[1]


# -- the Stack: IPv4 wrapping -----------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    sport=st.integers(0, 65535),
    dport=st.integers(0, 65535),
    seq=st.integers(0, M32),
    ack=st.integers(0, M32),
    flags=st.integers(0, 255),
    window=st.integers(0, 65535),
    ts=st.none() | st.tuples(st.integers(0, M32), st.integers(0, M32)),
    mss=st.none() | st.integers(0, 65535),
    sack=st.sampled_from([(), ((1, 2),), ((5, 6), (7, 8), (9, 10))]),
    payload=st.binary(max_size=1500) | st.sampled_from([b"", bytes(1368), b"\xff" * 1367]),
    kind=st.sampled_from([bytes, bytearray, memoryview]),
    v6=st.booleans(),
)
def test_wrap_tcp_fast_matches_general_wrap(
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    ts: tuple[int, int] | None,
    mss: int | None,
    sack: tuple[tuple[int, int], ...],
    payload: bytes,
    kind: type,
    v6: bool,
) -> None:
    src, dst = (A6, B6) if v6 else (A, B)
    seg = TcpSegment(
        sport,
        dport,
        seq,
        ack,
        flags,
        window,
        timestamp=ts,
        mss=mss,
        sack_blocks=sack,
        payload=kind(payload),
    )
    out: list[bytes] = []
    try:
        want = Stack._wrap_tcp(src, dst, seg)
    except ValueError:
        with pytest.raises(ValueError):
            Stack._wrap_tcp_fast(src, dst, [seg], out)
        return
    Stack._wrap_tcp_fast(src, dst, [seg, seg], out)
    assert out == [want, want]
    assert all(type(p) is bytes for p in out)


# -- TcpSocket._bulk_send (bulk-send fast path of dispatch) versus the general loop ----------


class _NoBulk(TcpSocket):
    """The same socket with the bulk-send fast path switched off."""

    def _bulk_send(self, now: float, out: list[Any], tuples: bool, budget: float = 0) -> int:
        return 0


def _wire(segs: list[Any]) -> list[bytes]:
    """IPv4 packets for dispatch output (TcpSegments and/or tuples)."""
    out: list[bytes] = []
    Stack._wrap_tcp_fast(B, A, segs, out)
    return out


def _segments(out: list[Any]) -> list[TcpSegment]:
    """The segments of dispatch output (TcpSegments, TcpTuples, TcpRuns), one by one."""
    return [seg for item in out for seg in TcpSegment.segments_of(item)]


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    timestamps=st.booleans(),
    sack=st.booleans(),
    tuples=st.booleans(),
    actions=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "send",
                    "send",
                    "ack",
                    "ack",
                    "ack",
                    "dupack",
                    "sackack",
                    "ooo",
                    "data",
                    "fin",
                    "wait",
                ]
            ),
            st.integers(0, 2**20),
        ),
        min_size=1,
        max_size=40,
    ),
)
def test_bulk_send_is_the_general_loop(
    seed: int,
    timestamps: bool,
    sack: bool,
    tuples: bool,
    actions: list[tuple[str, int]],
) -> None:
    """dispatch() with and without the bulk path: identical segments (and packets), states
    and counters after every step of a random life (sends, ACKs, duplicate ACKs, SACKs, data
    and gaps from the peer, FIN, timeouts), with or without timestamps and SACK."""
    rng = random.Random(seed)
    cfg = TcpConfig(
        mss=MSS, recv_buffer=1 << 16, send_buffer=1 << 20, timestamps=timestamps, sack=sack
    )
    irs = rng.getrandbits(32)
    syn = TcpSegment(
        80,
        1234,
        irs,
        0,
        SYN,
        65535,
        mss=MSS,
        wscale=7,
        sack_permitted=True,
        timestamp=(1000, 0),
    )
    sock = TcpSocket.from_syn(
        cfg, B, 1234, A, 80, syn, isn=rng.getrandbits(32), now=0.0, randbytes=rng.randbytes
    )
    slow = copy.deepcopy(sock)
    slow.__class__ = _NoBulk
    now = 0.0
    tsval = 1000
    rcv = irs + 1

    def step_dispatch() -> None:
        fast_out: list[Any] = []
        slow_out: list[Any] = []
        sock.dispatch(now, fast_out, tuples)
        slow.dispatch(now, slow_out, tuples)
        if tuples:
            assert _wire(fast_out) == _wire(slow_out)
        # a TcpTuple encodes exactly the TcpSegment the general loop builds
        assert [s._key() for s in _segments(fast_out)] == [s._key() for s in slow_out]
        assert state_of(sock) == state_of(slow)
        assert sock.poll_at() == slow.poll_at()

    def feed(seg: TcpSegment) -> None:
        sock.process(seg, now)
        slow.process(copy.copy(seg), now)
        assert state_of(sock) == state_of(slow)

    step_dispatch()  # SYN-ACK
    feed(TcpSegment(80, 1234, rcv & M32, (sock._iss + 1) & M32, ACK, 512, timestamp=(tsval, 0)))
    for action, arg in actions:
        now += 0.001 * (arg % 7)
        tsval += 1
        ts = (tsval, sock._ts_val(now) - 3) if timestamps else None
        una, smax = sock._snd_una, sock._snd_max
        window = 512 if arg % 5 else arg % 600
        if action == "send":
            if sock.state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
                data = bytes([arg & 0xFF]) * (arg % 200_000)
                assert sock.send(data) == slow.send(data)
        elif action == "ack":
            ack = una + (smax - una) * (arg % 4) // 3
            feed(TcpSegment(80, 1234, rcv & M32, ack & M32, ACK, window, timestamp=ts))
        elif action == "dupack":
            feed(TcpSegment(80, 1234, rcv & M32, una & M32, ACK, 512, timestamp=ts))
        elif action == "sackack":
            if smax - una > 2 * MSS:
                start = una + MSS * (1 + arg % 3)
                end = min(start + MSS * (1 + arg % 5), smax)
                blocks = ((start & M32, end & M32),) if start < end else ()
                feed(
                    TcpSegment(
                        80, 1234, rcv & M32, una & M32, ACK, 512, timestamp=ts, sack_blocks=blocks
                    )
                )
        elif action == "ooo":  # a gap: the receiver side gets SACK blocks to report
            feed(
                TcpSegment(
                    80,
                    1234,
                    (rcv + 1000) & M32,
                    una & M32,
                    ACK,
                    512,
                    timestamp=ts,
                    payload=bytes(300),
                )
            )
        elif action == "data":
            n = 1 + arg % 3000
            feed(
                TcpSegment(80, 1234, rcv & M32, una & M32, ACK, 512, timestamp=ts, payload=bytes(n))
            )
            if sock._rcv_nxt != rcv:
                rcv = sock._rcv_nxt
            sock.recv(arg % 5000)
            slow.recv(arg % 5000)
        elif action == "fin":
            if sock.state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
                sock.shutdown_write(now)
                slow.shutdown_write(now)
        else:  # "wait": let timers (RTO, delayed ACK) fire
            now += 0.3 * (1 + arg % 4)
        step_dispatch()


def counting_bulk_send(calls: list[int], only: TcpSocket | None = None) -> Any:
    """A stand-in for ``TcpSocket._bulk_send`` that appends what each call (of ``only``'s,
    if given) emitted to ``calls``."""
    original = TcpSocket._bulk_send

    def counting(
        self: TcpSocket, now: float, out: list[Any], tuples: bool, budget: float = INF
    ) -> int:
        n = original(self, now, out, tuples, budget)
        if only is None or self is only:
            calls.append(n)
        return n

    return counting


def test_bulk_send_is_taken() -> None:
    """A plain bulk transfer does go through the fast path (else the test above proves
    little), and in run form."""
    calls: list[int] = []
    original = TcpSocket._bulk_send
    counting = counting_bulk_send(calls)
    sock = established_pair(3)
    sock.send(bytes(300_000))
    sock._cc.cwnd = 40 * MSS
    out: list[Any] = []
    TcpSocket._bulk_send = counting  # type: ignore[method-assign]
    try:
        sock.dispatch(0.05, out, True)
    finally:
        TcpSocket._bulk_send = original  # type: ignore[method-assign]
    assert calls and calls[0] > 10
    # the first segment the general way, the others as one TcpRun
    assert len(out) == 2 and type(out[0]) is TcpSegment
    run = out[1]
    assert type(run) is tuple and type(run[8]) is list and len(run[8]) == calls[0] - 1
    assert len(_segments(out)) == calls[0]


@pytest.mark.parametrize("congestion", ["bbr", "newreno", "cubic"])
def test_bulk_send_runs_with_sacked_data_and_in_recovery(congestion: str) -> None:
    """With SACKed data outstanding, before (RACK's reordering window) and in loss
    recovery, the new data goes out the bulk way, as far as the general loop would send it
    (flight < cwnd outside recovery, RFC 6675 pipe + SMSS <= cwnd in it), with the same
    segments, state and counters; in recovery the retransmission goes first, the general
    way."""
    rng = random.Random(5)
    cfg = TcpConfig(mss=MSS, send_buffer=1 << 21, congestion=congestion, pacing=False)
    irs = rng.getrandbits(32)
    syn = TcpSegment(
        80, 1234, irs, 0, SYN, 65535, mss=MSS, wscale=7, sack_permitted=True,
        timestamp=(1000, 0),
    )  # fmt: skip
    sock = TcpSocket.from_syn(
        cfg, B, 1234, A, 80, syn, isn=rng.getrandbits(32), now=0.0, randbytes=rng.randbytes
    )
    out: list[Any] = []
    sock.dispatch(0.0, out, True)
    rcv = (irs + 1) & M32
    sock.process(
        TcpSegment(80, 1234, rcv, (sock._iss + 1) & M32, ACK, 8000, timestamp=(1001, 0)), 0.01
    )
    sock.send(bytes(range(256)) * 6000)
    m = sock._smss  # (the MSS less the timestamp option)
    sock._cc.cwnd = 30 * m
    out.clear()
    sock.dispatch(0.02, out, True)
    una = sock._snd_una
    assert sock._snd_max - una == 30 * m
    bulk_runs: list[int] = []
    original = TcpSocket._bulk_send
    counting = counting_bulk_send(bulk_runs, only=sock)

    def step(now: float, ack: int, blocks: tuple[tuple[int, int], ...], tsval: int) -> list[Any]:
        seg = TcpSegment(
            80, 1234, rcv, ack & M32, ACK, 8000, timestamp=(tsval, sock._ts_val(now) - 5),
            sack_blocks=tuple((s & M32, e & M32) for s, e in blocks),
        )  # fmt: skip
        sock.process(seg, now)
        slow.process(copy.copy(seg), now)
        fast_out: list[Any] = []
        slow_out: list[Any] = []
        bulk_runs.clear()
        TcpSocket._bulk_send = counting  # type: ignore[method-assign]
        try:
            sock.dispatch(now, fast_out, True)
        finally:
            TcpSocket._bulk_send = original  # type: ignore[method-assign]
        slow.dispatch(now, slow_out, True)
        assert _wire(fast_out) == _wire(slow_out)
        assert state_of(sock) == state_of(slow)
        assert sock.poll_at() == slow.poll_at()
        return fast_out

    slow = copy.deepcopy(sock)
    slow.__class__ = _NoBulk
    # segment 2 missing, 3 and 4 SACKed (fewer than DupThresh): not lost yet, RACK waits
    # out its reordering window
    first = step(0.025, una + m, ((una + 2 * m, una + 4 * m),), 1002)
    assert not sock._in_fr and sock._sacked
    new = [s for s in _segments(first) if s.seq != (una + m) & M32]
    assert len(new) >= 2 and len(new) == len(_segments(first))
    assert bulk_runs and bulk_runs[0] == len(new), "the bulk path sent the whole run"
    # later SACKs: RACK deems segment 2 lost; recovery retransmits it, then new data
    smax = sock._snd_max
    second = step(0.06, una + m, ((una + 2 * m, una + 20 * m),), 1003)
    assert sock._in_fr
    assert _segments(second)[0].seq == (una + m) & M32  # the retransmission first
    assert sock.stats.retransmits == 1
    sent_new = (sock._snd_max - smax) // m
    assert sent_new >= 1
    assert sum(bulk_runs) == sent_new and len(_segments(second)) == 1 + sent_new
    third = step(0.065, una + m, ((una + 2 * m, una + 30 * m),), 1004)
    assert sock._in_fr and len(_segments(third)) >= 5
    assert bulk_runs == [len(_segments(third))]


@pytest.mark.parametrize(
    ("congestion", "pacing", "min_hits"),
    # BBR paces: after the first window, ACK-clocked releases of a few segments each
    [("newreno", False, 20), ("bbr", True, 5)],
)
def test_stack_bulk_send_matches_general_loop(
    monkeypatch: Any, congestion: str, pacing: bool, min_hits: int
) -> None:
    """The lossy, reordering stack transfer gives identical packets, counters and states
    with and without the bulk path."""
    tcp_config = TcpConfig(congestion=congestion, pacing=pacing)
    hits = [0]
    original = TcpSocket._bulk_send

    def counting(
        self: TcpSocket, now: float, out: list[Any], tuples: bool, budget: float = INF
    ) -> int:
        n = original(self, now, out, tuples, budget)
        hits[0] += n > 1
        return n

    calls: list[int] = []
    for seed in (1, 2):
        monkeypatch.setattr(TcpSocket, "_bulk_send", counting)
        hits[0] = 0
        fast = run_transfer(seed, True, calls, tcp_config)
        assert hits[0] > min_hits, "the bulk path was not taken"
        monkeypatch.setattr(TcpSocket, "_bulk_send", lambda self, now, out, tuples, budget=INF: 0)
        slow = run_transfer(seed, True, calls, tcp_config)
        assert len(fast) == len(slow)
        for i, (x, y) in enumerate(zip(fast, slow, strict=True)):
            assert x == y, f"seed {seed}: traces differ at entry {i}"


# (25600 + extra bytes: 19 and 27 full segments of MSS - 12 (the timestamp option) end the
# data with a full segment, which then carries PSH from the bulk path; 27 is all the peer's
# window holds)
@pytest.mark.parametrize(
    "extra",
    [0, 1, 19 * (MSS - 12) - 25600, 27 * (MSS - 12) - 25600, MSS - 1, 7 * MSS, 7 * MSS + 1,
     30 * MSS - 1],
)  # fmt: skip
@pytest.mark.parametrize("fin", [False, True])
@pytest.mark.parametrize("tuples", [False, True])
def test_bulk_send_data_end_and_fin(extra: int, fin: bool, tuples: bool) -> None:
    """Bulk sends that run into the end of the data (PSH), a queued FIN, and the peer's
    window, against the general loop."""
    sock = established_pair(11)
    ack = TcpSegment(80, 1234, sock.rcv_nxt, sock._snd_max & M32, ACK, 300, timestamp=(2000, 0))
    sock.process(ack, 0.04)  # everything acknowledged, peer window 300 << 7
    sock._cc.cwnd = 64 * MSS
    sock.send(bytes(range(256)) * 100 + bytes(extra))
    if fin:
        sock.shutdown_write(0.05)
    slow = copy.deepcopy(sock)
    slow.__class__ = _NoBulk
    fast_out: list[Any] = []
    slow_out: list[Any] = []
    sock.dispatch(0.05, fast_out, tuples)
    slow.dispatch(0.05, slow_out, tuples)
    assert len(_segments(fast_out)) > 10
    assert _wire(fast_out) == _wire(slow_out)
    assert state_of(sock) == state_of(slow)
    if extra in (19 * (MSS - 12) - 25600, 27 * (MSS - 12) - 25600) and not fin:
        last = _segments(fast_out)[-1]
        assert last.flags & PSH and len(last.payload) == MSS - 12  # the bulk path's PSH


def test_tcp_tuple_fields_are_the_segments() -> None:
    """One definition of the fast-path encoding: its fields are TcpSegment's, in order."""
    t = (1, 2, 3, 4, ACK | PSH, 5, 6, 7, b"data")
    seg = TcpSegment.from_tuple(t)
    as_seg = {**{f: getattr(seg, f, None) for f in TCP_TUPLE_FIELDS}, "payload": seg.payload}
    as_seg["tsval"], as_seg["tsecr"] = seg.timestamp or (None, None)
    assert tuple(as_seg[f] for f in TCP_TUPLE_FIELDS) == t


@settings(max_examples=200, deadline=None)
@given(
    ipv6=st.booleans(),
    seq=st.integers(0, M32),
    fields=st.tuples(
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFF),
        st.integers(0, M32),
        st.sampled_from([ACK, ACK | PSH]),
        st.integers(0, 0xFFFF),
        st.integers(0, M32),
        st.integers(0, M32),
    ),
    sizes=st.lists(st.integers(1, 1500), min_size=1, max_size=6),
)
def test_a_tcp_run_is_its_segments(
    ipv6: bool, seq: int, fields: tuple[int, ...], sizes: list[int]
) -> None:
    """A TcpRun wraps to exactly the packets of its segments one by one (through the
    general builder), across the 32-bit wrap of the sequence numbers, odd lengths included,
    IPv4 and IPv6, each with a valid TCP checksum; segments_of gives those segments."""
    sport, dport, ack, flags, window, tsval, tsecr = fields
    rng = random.Random(seq)
    payloads = [rng.randbytes(n) for n in sizes]
    run = (sport, dport, seq, ack, flags, window, tsval, tsecr, payloads)
    segs = TcpSegment.segments_of(run)  # type: ignore[arg-type]
    starts = [(seq + sum(sizes[:i])) & M32 for i in range(len(sizes))]
    assert [(x.seq, x.payload, x.flags, x.ack, x.timestamp) for x in segs] == [
        (st_, p, flags, ack, (tsval, tsecr)) for st_, p in zip(starts, payloads, strict=True)
    ]
    local, remote = (bytes(range(16)), bytes(range(16, 32))) if ipv6 else (B, A)
    fast: list[bytes] = []
    Stack._wrap_tcp_fast(local, remote, [run], fast)  # type: ignore[list-item]
    assert fast == [Stack._wrap_tcp(local, remote, x) for x in segs]
    hdr = 40 if ipv6 else 20
    for packet in fast:
        tcp = packet[hdr:]
        assert verify(tcp, pseudo_header_sum(local, remote, 6, len(tcp)))
    # and a run in the middle of other items keeps its place
    one = (sport, dport, 7, ack, ACK | PSH, window, tsval, tsecr, b"x")
    both: list[bytes] = []
    Stack._wrap_tcp_fast(local, remote, [run, one], both)  # type: ignore[list-item]
    assert both == [*fast, Stack._wrap_tcp(local, remote, TcpSegment.from_tuple(one))]


def test_every_hand_kept_copy_names_its_rule() -> None:
    """The fast paths keep some rules inlined for speed. Each copy is marked ``copy of rule
    <name>`` and the one definition ``rule: <name>`` (see TcpSocket.fast_input): every
    copy's rule is defined exactly once, and every marked definition has a copy."""
    import pathlib
    import re

    import mitm_wg.net
    import mitm_wg.wireguard

    defs: dict[str, int] = {}
    copies: set[str] = set()
    paths = [
        path
        for package in (mitm_wg.net, mitm_wg.wireguard)
        for path in pathlib.Path(package.__file__).parent.glob("*.py")
    ]
    for path in paths:
        text = path.read_text()
        for name in re.findall(r"# rule: ([a-z][a-z0-9-]*)", text):
            defs[name] = defs.get(name, 0) + 1
        copies.update(re.findall(r"copy of rule ([a-z][a-z0-9-]*)", text))
    assert copies, "no marked copies found"
    assert {n: c for n, c in defs.items() if c != 1} == {}
    assert copies - set(defs) == set()
    assert set(defs) - copies == {"paws"}  # fast_input declines instead of copying it


# ACK coalescing (TcpSocket.fast_input hold=True, Stack.receive_batch): a batch's run of
# pure cumulative ACKs acts as its newest one alone.


def _bulk_sender(seed: int) -> TcpSocket:
    """:func:`established_pair` (BBR, the default) with ~10 segments more in flight."""
    sock = established_pair(seed)
    sock.send(bytes(40000))
    out: list[Any] = []
    sock.dispatch(0.03, out)
    assert sock._snd_max - sock._snd_una >= 8 * MSS
    return sock


def _peer_ack(
    sock: TcpSocket, ack: int, tsval: int, window: int = 512, flags: int = ACK, data: bytes = b""
) -> TcpSegment:
    """A segment of the peer: SEG.SEQ = our RCV.NXT, TSecr = our TSval when we sent."""
    ts = (tsval, sock._ts_val(0.03))
    return TcpSegment(80, 1234, sock.rcv_nxt, ack & M32, flags, window, ts, (), data)


def _held_then_general(sock: TcpSocket, segs: list[TcpSegment], now: float) -> TcpSocket:
    """A copy of ``sock`` that takes ``segs`` as Stack.receive_batch does in a batch
    (fast_input with hold=True, else the general path; the held ACK at the end)."""
    held = copy.deepcopy(sock)
    for seg in segs:
        ts = seg.timestamp or (None, 0)
        if not held.fast_input(
            seg.seq, seg.ack, seg.flags, seg.window, ts[0], ts[1], seg.payload, now, hold=True
        ):
            held.process(seg, now)
    held.finish_acks(now)
    return held


def _one_by_one(sock: TcpSocket, segs: list[TcpSegment], now: float) -> TcpSocket:
    general = copy.deepcopy(sock)
    for seg in segs:
        general.process(seg, now)
    return general


@pytest.mark.parametrize(
    "second",
    ["duplicate", "older-tsval", "zero-window", "beyond-snd-max", "data", "fin", "other-seq"],
)
def test_an_ack_that_does_not_supersede_the_held_one_comes_after_it(second: str) -> None:
    """A held pure ACK is processed before anything that cannot stand in for it: the
    result is exactly that of the segments one by one (RTT samples included)."""
    sock = _bulk_sender(3)
    una = sock._snd_una
    first = _peer_ack(sock, una + MSS, 2000)
    nxt = {
        "duplicate": _peer_ack(sock, una + MSS, 2001),
        "older-tsval": _peer_ack(sock, una + 2 * MSS, 1999),
        "zero-window": _peer_ack(sock, una + 2 * MSS, 2001, window=0),
        "beyond-snd-max": _peer_ack(sock, sock._snd_max + 1, 2001),
        "data": _peer_ack(sock, una + 2 * MSS, 2001, data=b"x" * 100),
        "fin": _peer_ack(sock, una + 2 * MSS, 2001, flags=ACK | FIN),
        "other-seq": TcpSegment(
            80, 1234, (sock.rcv_nxt + 5) & M32, (una + 2 * MSS) & M32, ACK, 512, (2001, 0)
        ),
    }[second]
    segs = [first, nxt, _peer_ack(sock, una + 3 * MSS, 2002)]
    held = _held_then_general(sock, segs, 0.05)
    assert held.stats.acks_coalesced == 0
    assert held._held_ack is None
    assert state_of(held) == state_of(_one_by_one(sock, segs, 0.05))


#: what ends as one by one when pure ACKs stand in for each other
_PURE_SAME = (
    "_snd_una",
    "_snd_nxt",
    "_snd_max",
    "_snd_wnd",
    "_max_snd_wnd",
    "_snd_wl1",
    "_snd_wl2",
    "_ts_recent",
    "_ts_recent_age",
    "_sbuf",
    "_sbuf_seq",
    "_sbuf_head",
    "_dupacks",
    "_last_rx",
    "_last_progress",
    "_persist_at",
    "state",
)
#: and when SACK ACKs do
_SACK_SAME = (
    "_sacked",
    "_sacked_bytes",
    "_snd_una",
    "_snd_wnd",
    "_max_snd_wnd",
    "_snd_wl1",
    "_snd_wl2",
    "_ts_recent",
    "_dupacks",
    "_in_fr",
    "_recover",
    "_high_rxt",
    "_rto_at",
    "_rec_at",
    "_pending",
    "state",
)


def _assert_stood_in(held: TcpSocket, reference: TcpSocket, n: int, same: tuple[str, ...]) -> None:
    """``held`` took ``n`` ACKs of which all but the newest were stood in for; ``same``
    fields and every counter (but acks_coalesced) end as in ``reference``."""
    assert held.stats.acks_coalesced == n - 1
    assert held._held_ack is None
    for name in same:
        assert state_of(getattr(held, name)) == state_of(getattr(reference, name)), name
    counters = state_of(held.stats)
    counters["acks_coalesced"] = 0
    assert counters == state_of(reference.stats)


def test_a_batch_of_cumulative_acks_acts_as_its_newest_alone() -> None:
    """Pure ACKs that each advance SND.UNA, with TSvals that do not go back: only the
    newest is processed (a stretch ACK). SND.UNA, the send buffer, the window and the
    largest one offered, TS.Recent, the timers' arming and every counter end as one by one;
    only the RTT and delivery-rate samples of the ACKs stood in for are missing."""
    sock = _bulk_sender(5)
    una = sock._snd_una
    # windows that shrink and grow again (a receiver whose application reads in bursts)
    windows = [512, 400, 900, 300, 500, 450]
    segs = [
        _peer_ack(sock, una + (i + 1) * MSS, 2000 + i // 2, window=w) for i, w in enumerate(windows)
    ]
    held = _held_then_general(sock, segs, 0.05)
    general = _one_by_one(sock, segs, 0.05)
    _assert_stood_in(held, general, len(segs), _PURE_SAME)
    assert held._max_snd_wnd == 900 << held._snd_wscale
    # one RTT sample instead of six; the controller got one delivery-rate sample, of all
    assert held._rtt.srtt is not None and held._dr.delivered == general._dr.delivered


def _upload(seed: int, tcp_config: TcpConfig, defer: bool, v6: bool = False) -> TcpSocket:
    """600 kB from a (BBR unless ``tcp_config`` says otherwise) to b through 2 % loss, 1 %
    duplicates and some reordering, in steps of 2 ms. b takes a's packets one by one and
    polls after each, so it ACKs as a Linux receiver does (every second segment, every
    out-of-order one), and all of b's packets of a step reach a in one receive_batch: the
    batches of pure ACKs an uploading socket gets. Returns a's socket."""
    rng = random.Random(seed)
    a, b = make_stacks(seed, tcp_config, v6, defer)
    lst = b.tcp_listen(80)
    now = 0.0
    client = a.tcp_connect("fd00::2" if v6 else "10.0.0.2", 80, now)
    server = None
    left, got = 600_000, 0
    for _step in range(5000):
        now += 0.002
        if server is None:
            server = lst.accept()
        out: list[bytes] = []
        a.poll(now, out)
        sent = [p for p in out if rng.random() >= 0.02]
        sent += [p for p in out if rng.random() < 0.01]
        if rng.random() < 0.2:
            rng.shuffle(sent)
        acks: list[bytes] = []
        for packet in sent:
            b.receive(packet, now)
            b.poll(now, acks)
        a.receive_batch(acks, now, authenticated=bool(seed & 1))  # (both ways through)
        assert all(sock._held_ack is None for sock in a._tcp.values())
        assert not a._holding
        if left and client.can_send:
            left -= client.send(bytes(min(left, 50_000)))
        if server is not None:
            got += len(server.recv(1 << 20))
        if got == 600_000:
            return client
    raise AssertionError(f"upload did not finish: {got} of 600000 bytes")


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_coalesced_acks_in_lossy_uploads(v6: bool) -> None:
    """With Stack.defer_acks (the default), BBR uploads through loss, duplicates and
    reordering deliver every byte, runs of pure and SACK ACKs coalesce, no socket holds an
    ACK after a batch (_upload checks), and recovery works as well as with every ACK one
    by one (no more RTOs, about as many retransmissions)."""
    coalesced = 0
    totals = {True: [0, 0], False: [0, 0]}  # retransmits, RTOs
    for seed in range(1, 17):
        for defer in (True, False):
            stats = _upload(seed, TcpConfig(congestion="bbr"), defer, v6).stats
            totals[defer][0] += stats.retransmits
            totals[defer][1] += stats.rto_expired
            if defer:
                coalesced += stats.acks_coalesced
            else:
                assert stats.acks_coalesced == 0
    assert coalesced > 2000, coalesced  # (~60 % of the ACKs: 3258 of 5339)
    assert totals[True][1] <= totals[False][1], totals
    assert totals[True][0] <= 1.2 * totals[False][0], totals  # (136 vs 135)


def test_a_loss_based_controller_gets_every_ack() -> None:
    """NewReno and CUBIC grow cwnd per ACK (RFC 3465's limit per ACK): no holding."""
    for congestion in ("newreno", "cubic"):
        assert _upload(2, TcpConfig(congestion=congestion), True).stats.acks_coalesced == 0


def _sack_ack(
    sock: TcpSocket, ack: int, blocks: list[tuple[int, int]], tsval: int, window: int = 2000
) -> TcpSegment:
    """A pure ACK of the peer with SACK ``blocks`` (absolute) and a timestamp."""
    wire = tuple((s & M32, e & M32) for s, e in blocks)
    ts = (tsval, sock._ts_val(0.02))
    return TcpSegment(80, 1234, sock.rcv_nxt, ack & M32, ACK, window, ts, wire)


def _sack_batch(sock: TcpSocket, segs: list[TcpSegment], now: float, hold: bool) -> TcpSocket:
    """A copy of ``sock`` that takes ``segs`` as Stack.receive_batch does (sack_ack_input
    with defer, and ``hold``; else the general path), then its next dispatch's
    finish_acks."""
    copy_ = copy.deepcopy(sock)
    for seg in segs:
        ts = seg.timestamp
        assert ts is not None
        if not copy_.sack_ack_input(
            seg.seq, seg.ack, seg.window, ts[0], ts[1], seg.sack_blocks, now, True, hold
        ):
            copy_.process(seg, now)
    copy_.finish_acks(now)
    return copy_


def _sack_scene() -> tuple[TcpSocket, int, int]:
    """A BBR + RACK sender with a hole at SND.UNA: (socket, SND.UNA, a later edge)."""
    sock, _rng = sack_sender(4, "bbr", True, True, 0)
    una = sock._snd_una
    assert sock._snd_max - una > 30 * MSS
    return sock, una, una + 10 * MSS


@pytest.mark.parametrize(
    "second",
    [
        "ack-advances",
        "other-tail",
        "first-starts-elsewhere",
        "first-shrinks",
        "nothing-new",
        "older-tsval",
        "zero-window",
        "fewer-blocks",
    ],
)
def test_a_sack_ack_that_does_not_supersede_the_held_one_comes_after_it(second: str) -> None:
    """A held SACK ACK is processed before one that cannot stand in for it: exactly as
    the batch without holding (the SACK deferral alone), RTT samples included."""
    sock, una, e = _sack_scene()
    tail = (e - 4 * MSS, e - 3 * MSS)
    first = _sack_ack(sock, una, [(e, e + 2 * MSS), tail], 2000)
    nxt = {
        "ack-advances": _sack_ack(sock, una + MSS, [(e, e + 3 * MSS), tail], 2001),
        "other-tail": _sack_ack(sock, una, [(e, e + 3 * MSS), (e - 7 * MSS, e - 6 * MSS)], 2001),
        "first-starts-elsewhere": _sack_ack(sock, una, [(e + MSS, e + 3 * MSS), tail], 2001),
        "first-shrinks": _sack_ack(sock, una, [(e, e + MSS), tail], 2001),
        "nothing-new": _sack_ack(sock, una, [(e, e + 2 * MSS), tail], 2001),
        "older-tsval": _sack_ack(sock, una, [(e, e + 3 * MSS), tail], 1999),
        "zero-window": _sack_ack(sock, una, [(e, e + 3 * MSS), tail], 2001, window=0),
        "fewer-blocks": _sack_ack(sock, una, [(e, e + 3 * MSS)], 2001),
    }[second]
    segs = [first, nxt, _sack_ack(sock, una, [(e + 20 * MSS, e + 21 * MSS)], 2002)]
    held = _sack_batch(sock, segs, 0.05, True)
    assert held.stats.acks_coalesced == 0
    assert held._held_ack is None
    assert state_of(held) == state_of(_sack_batch(sock, segs, 0.05, False))


def test_a_dsack_or_a_first_block_below_another_is_never_held() -> None:
    """A SACK ACK whose first block reports a duplicate (below the ACK, or within another
    block: RFC 2883) is processed at once: a newer ACK cannot carry its news. So is one
    whose first block ends below another block (what extends it is reordering for RACK,
    which it would not see in one ACK with the rest), and an old one (below SND.UNA)."""
    sock, una, e = _sack_scene()
    for ack, blocks in (
        (una, [(una - MSS, una)]),
        (una, [(una - MSS, una), (e, e + MSS)]),
        (una, [(e + MSS, e + 2 * MSS), (e, e + 2 * MSS)]),
        (una, [(e, e + MSS), (e - MSS, e + 2 * MSS)]),
        (una, [(e, e + MSS), (e + 8 * MSS, e + 9 * MSS)]),
        (una - MSS, [(e, e + MSS)]),  # an old ACK: not a duplicate, nor what stands in
    ):
        held = copy.deepcopy(sock)
        seg = _sack_ack(held, ack, blocks, 2000)
        assert seg.timestamp is not None
        held.sack_ack_input(
            seg.seq, seg.ack, seg.window, *seg.timestamp, seg.sack_blocks, 0.05, True, True
        )
        assert held._held_ack is None


def test_sack_acks_that_only_extend_the_first_block_act_as_the_newest() -> None:
    """SACK ACKs of a batch with the same ACK and tail blocks whose first block only grows
    (a receiver reporting each segment after a hole): only the newest is processed. The
    scoreboard, SND.UNA, the window and the largest one offered, TS.Recent, RACK's state,
    the duplicate-ACK count and every counter end as the batch without holding; only the
    RTT samples of the ACKs stood in for are missing."""
    sock, una, e = _sack_scene()
    tail = (e - 4 * MSS, e - 3 * MSS)  # an older hole's block, below the newest arrivals
    segs = [
        _sack_ack(sock, una, [(e, e + (i + 1) * MSS), tail], 2000 + i, window=w)
        for i, w in enumerate([2000, 1500, 2600, 2000, 1800])
    ]
    held = _sack_batch(sock, segs, 0.05, True)
    plain = _sack_batch(sock, segs, 0.05, False)
    _assert_stood_in(held, plain, len(segs), _SACK_SAME)
    assert held._max_snd_wnd == 2600 << held._snd_wscale
    assert state_of(held._rack) == state_of(plain._rack)
    assert held._dr.delivered == plain._dr.delivered
    out_held: list[Any] = []
    out_plain: list[Any] = []
    held.dispatch(0.05, out_held)
    plain.dispatch(0.05, out_plain)
    assert _wire(out_held) == _wire(out_plain)  # the same retransmissions and new data
