"""``Stack.receive_batch`` coalesces runs of in-order TCP segments (as Linux's GRO does):
the effect on sockets, counters and what the stack sends must be exactly that of the
packets one by one through ``Stack.receive``."""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_fast_paths import (
    A6,
    B6,
    A,
    B,
    connected_stacks,
    exchange,
    make_stacks,
    run_transfer,
    state_of,
)

from mitm_wg.net.checksum import checksum, pseudo_header_sum
from mitm_wg.net.stack import Stack
from mitm_wg.net.tcp import M32, TcpConfig, TcpSocket
from mitm_wg.net.tcp_wire import ACK, FIN, PSH

_TCP = struct.Struct("!HHIIBBHHH")
_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_MUTATIONS = (
    "tos",
    "ttl",
    "flow",
    "frag",
    "proto",
    "ip_csum",
    "src",
    "dst",
    "long",
    "short",
    "trailing",
    "urg",
    "tsval",
    "tsecr",
    "window",
    "ack",
    "psh",
)


def _count_runs(monkeypatch: Any) -> list[int]:
    """Count fast_input calls that took a coalesced run, and the segments in them."""
    seen = [0, 0]
    original = TcpSocket.fast_input

    def counting(self: TcpSocket, *args: Any, **kw: Any) -> bool:
        ok = original(self, *args, **kw)
        if len(args) > 8 and args[8] is not None and ok:
            seen[0] += 1
            seen[1] += args[8][0]
        return ok

    monkeypatch.setattr(TcpSocket, "fast_input", counting)
    return seen


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_batch_transfer_matches_one_by_one(monkeypatch: Any, v6: bool) -> None:
    """A lossy, duplicating, reordering transfer both ways: one receive_batch per step gives
    the same packets, counters and socket states as the general path, packet by packet."""
    seen = _count_runs(monkeypatch)
    calls: list[int] = []
    for seed in (1, 2, 3):
        one_by_one = run_transfer(seed, False, calls, v6=v6)
        before = seen[1]
        batched = run_transfer(seed, True, calls, batch=True, v6=v6)
        assert len(batched) == len(one_by_one)
        for i, (x, y) in enumerate(zip(batched, one_by_one, strict=True)):
            assert x == y, f"seed {seed}: traces differ at entry {i}"
        assert seen[1] - before > 30, "(almost) no segments were coalesced"


def _packet(
    sport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    ts: tuple[int, int] | None,
    payload: bytes,
    *,
    dport: int = 80,
    sack: tuple[tuple[int, int], ...] = (),
    v6: bool = False,
    mutate: str = "",
) -> bytes:
    """A TCP segment from A to B (``v6``: A6 to B6) in an IP packet; ``mutate`` changes one
    thing in it: ``tos`` (traffic class), ``ttl`` (hop limit), ``flow`` (IPv6 flow label),
    ``frag`` (IPv4 more-fragments), ``proto`` (UDP's number), ``ip_csum`` (a wrong IPv4 header checksum), ``src``
    (another sender), ``dst`` (an address not ours), ``long``/``short`` (IP length one
    more / fewer than the bytes there), ``trailing`` (bytes after the IP length), ``urg``
    (an urgent pointer without URG), ``tsval``/``tsecr``/``window`` (one more), ``ack``
    (one less), ``psh`` (PSH set)."""
    if mutate == "tsval" and ts is not None:
        ts = (ts[0] + 1, ts[1])
    elif mutate == "tsecr" and ts is not None:
        ts = (ts[0], ts[1] + 1)
    elif mutate == "window":
        window += 1
    elif mutate == "ack":
        ack -= 1
    elif mutate == "psh":
        flags |= PSH
    opts = b"\x01\x01\x08\x0a" + struct.pack("!II", *ts) if ts is not None else b""
    if sack:  # NOP NOP SACK, as Linux lays it out after the timestamp
        edges = [e & M32 for block in sack for e in block]
        opts += bytes((1, 1, 5, 2 + 8 * len(sack))) + struct.pack(f"!{len(edges)}I", *edges)
    hlen = 20 + len(opts)
    urg = 7 if mutate == "urg" else 0
    header = _TCP.pack(sport, dport, seq & M32, ack & M32, hlen // 4 << 4, flags, window, 0, urg)
    seg = header + opts + payload
    src, dst = (A6, B6) if v6 else (A, B)
    if mutate == "src":  # (the first byte: a run's compare must cover the whole address)
        src = bytes([src[0] ^ 0x02]) + src[1:]
    elif mutate == "dst":
        dst = dst[:-1] + b"\x09"
    length = len(seg) + {"long": 1, "short": -1}.get(mutate, 0)
    # (over the bytes the IP length covers: the general path checks it even when
    # authenticated, for a packet that is not bytes)
    csum = checksum(seg[:length], pseudo_header_sum(src, dst, 6, min(length, len(seg))))
    seg = seg[:16] + csum.to_bytes(2, "big") + seg[18:]
    if v6:
        first = 0x6000_0000 | {"tos": 0x0010_0000, "flow": 0x12345}.get(mutate, 0)
        hop = 63 if mutate == "ttl" else 64
        proto = 17 if mutate == "proto" else 6
        packet = _IP6.pack(first, length, proto, hop, src, dst) + seg
    else:
        tos = 0x10 if mutate == "tos" else 0
        frag = 0x6000 if mutate == "frag" else 0x4000
        ttl = 63 if mutate == "ttl" else 64
        proto = 17 if mutate == "proto" else 6
        ip = _IP4.pack(0x45, tos, 20 + length, 0, frag, ttl, proto, 0, src, dst)
        ip_csum = checksum(ip) ^ (0x0100 if mutate == "ip_csum" else 0)
        packet = ip[:10] + ip_csum.to_bytes(2, "big") + ip[12:] + seg
    if mutate == "trailing":
        packet += b"\xee" * 5
    return packet


_STEPS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "data",
                "data",
                "data",
                "short",
                "psh",
                "gap",
                "dup",
                "ts",
                "window",
                "ack",
                "fin",
                "other",
                "udp",
                "pure_ack",
                "ooo_fill",
                "sack_ack",
                "sack_ack",
                "mutated",
                "mutated",
            ]
        ),
        st.integers(1, 1400),
        st.sampled_from(_MUTATIONS),  # for "mutated"
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    batches=st.lists(_STEPS, min_size=1, max_size=4),
    recv_buffer_small=st.booleans(),
    v6=st.booleans(),
)
# a run of 536, 536, 1400 bytes: one by one, the second segment makes an ACK due (two
# segments of the receive MSS so far, 536); the run's last one raises that MSS to 1400
@example(
    seed=1,
    batches=[[("short", 536, ""), ("ooo_fill", 536, ""), ("data", 1, "")]],
    recv_buffer_small=False,
    v6=False,
)
def test_crafted_runs_match_one_by_one(
    seed: int, batches: list[list[tuple[str, int, str]]], recv_buffer_small: bool, v6: bool
) -> None:
    """Hand-made batches: full-sized and short segments, PSH inside a run, a gap and its
    filling, duplicates, a TSval step, window and ACK changes, a FIN, a second connection's
    segments and a UDP datagram in between, a receive window that runs out mid-run; pure
    ACKs with 1-3 SACK blocks (or a D-SACK) for the server's data in flight, which must
    not overtake a pending run; full-sized segments that differ from the run's in one
    header field (``_packet``'s ``mutate``), which must not slip into it."""
    results = []
    for batched in (True, False):
        _a, b, client, server = connected_stacks(seed, v6=v6)
        server.send(bytes(30000))
        b.poll(0.5, [])
        if recv_buffer_small:
            server._rcv_adv = server.rcv_nxt + 5000  # a run crosses the window's edge
        rng = random.Random(seed)
        seq = server.rcv_nxt
        ack = client.rcv_nxt
        ts = [1000 + rng.randrange(1000), 7]
        window = 1000
        trace: list[object] = []
        now = 1.0
        for steps in batches:
            packets: list[bytes] = []
            held: list[bytes] = []
            for kind, size, mutation in steps:
                sport = client.local_port
                flags = ACK
                full = kind in ("data", "mutated")
                payload = bytes([size & 0xFF]) * (1400 if full else size)
                mutate = mutation if kind == "mutated" else ""
                sack: tuple[tuple[int, int], ...] = ()
                if kind == "psh":
                    flags |= PSH
                elif kind == "ts":
                    ts[0] += 1
                elif kind == "window":
                    window += 1
                elif kind == "ack":
                    ack -= 1
                elif kind == "fin":
                    flags |= FIN
                elif kind == "pure_ack":
                    payload = b""
                elif kind == "sack_ack":
                    payload = b""
                    una = server._snd_una
                    size_b = 500 * (1 + (size >> 2) % 2)
                    sack = tuple(
                        (una + 500 * (1 + 3 * j), una + 500 * (1 + 3 * j) + size_b)
                        for j in range(1 + size % 3)
                    )
                    if size % 5 == 0:
                        sack = ((una - 500, una), *sack[1:])  # D-SACK
                elif kind == "other":
                    sport = 9999  # no such connection: the stack answers with a RST
                elif kind == "udp":
                    if not v6:
                        packets.append(_udp_packet(payload))
                    continue
                pkt = _packet(
                    sport,
                    seq,
                    ack,
                    flags,
                    window,
                    (ts[0], ts[1]),
                    payload,
                    sack=sack,
                    v6=v6,
                    mutate=mutate,
                )
                if kind == "gap":
                    held.append(pkt)  # sent later, after what follows it
                elif kind == "dup" and packets:
                    packets.append(packets[-1])
                    continue
                elif kind == "ooo_fill" and held:
                    packets.append(pkt)
                    packets.extend(held)
                    held.clear()
                else:
                    packets.append(pkt)
                if sport == client.local_port and not (mutate and size & 1):
                    # (an odd-sized mutated one is a stray copy: the next takes its place)
                    seq += len(payload) + (1 if flags & FIN else 0)
            packets.extend(held)
            if batched:
                b.receive_batch(packets, now, authenticated=True)
            else:
                for p in packets:
                    b.receive(bytearray(p), now, authenticated=True)
            before_poll = state_of(server)  # also what is only armed, not yet sent
            out: list[bytes] = []
            b.poll(now, out)
            trace.append((before_poll, out, b.stats.as_dict(), state_of(server)))
            trace.append(server.recv(1 << 20))
            now += 0.003
        results.append(trace)
    assert results[0] == results[1]


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("stray", [False, True], ids=["in-place", "stray-copy"])
@pytest.mark.parametrize("mutate", ["", *_MUTATIONS])
def test_a_changed_header_inside_a_run(
    monkeypatch: Any, mutate: str, stray: bool, v6: bool
) -> None:
    """Full-sized segments in order, the third with one header field changed (in place of
    the third, or as a stray copy of it before the real one): the batch has the effect of
    the packets one by one, and the unchanged segments still coalesce."""
    seen = _count_runs(monkeypatch)
    results = []
    for batched in (True, False):
        _a, b, client, server = connected_stacks(3, v6=v6)
        seq, ack = server.rcv_nxt, client.rcv_nxt
        tsval = server._ts_recent + 1
        packets = []
        for i in range(6):
            change = mutate if i == 2 else ""
            pkt = _packet(
                client.local_port,
                seq,
                ack,
                ACK,
                1000,
                (tsval, 5),
                bytes([i]) * 1300,
                v6=v6,
                mutate=change,
            )
            packets.append(pkt)
            if change and stray:
                packets.append(
                    _packet(
                        client.local_port, seq, ack, ACK, 1000, (tsval, 5), bytes([i]) * 1300, v6=v6
                    )
                )
            seq += 1300
        if batched:
            b.receive_batch(packets, 1.0, authenticated=True)
        else:
            for p in packets:
                b.receive(bytearray(p), 1.0, authenticated=True)
        out: list[bytes] = []
        b.poll(1.0, out)
        results.append((out, b.stats.as_dict(), state_of(server), server.recv(1 << 20)))
    assert results[0] == results[1]
    assert seen[1] >= 2, "the segments before the changed one were not coalesced"


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("ranges_left", [0, 1, 5], ids=lambda n: f"room-{n}")
@pytest.mark.parametrize("ack_due", [False, True], ids=["no-ack-due", "ack-due"])
def test_runs_ahead_of_a_hole(monkeypatch: Any, v6: bool, ranges_left: int, ack_due: bool) -> None:
    """After a lost segment, the segments behind it arrive in runs ahead of RCV.NXT: each
    run reaches the socket's Assembler at once, with the effect of the segments one by one
    (counters, duplicate ACKs owed, SACK blocks), also when the Assembler has no room left
    for another range (then one by one); the hole's retransmission then delivers it all."""
    seen = _count_runs(monkeypatch)
    results = []
    size = 1000
    held = 3  # ranges held already: segments 2, 4, 6 (holes at 0, 1, 3, 5)
    first = 2 * held + 3  # then a run of 6 segments, behind another hole
    for batched in (True, False):
        _a, b, client, server = connected_stacks(4, v6=v6)
        sport, seq, ack = client.local_port, server.rcv_nxt, client.rcv_nxt
        header = (ack, ACK, 1000, (server._ts_recent + 1, 5))
        segs = [
            _packet(sport, seq + i * size, *header, bytes([i]) * size, v6=v6) for i in range(20)
        ]
        server._asm.max_ranges = held + ranges_left
        pre = [segs[2 * k] for k in range(1, held + 1)]
        if ack_due:
            pre.append(segs[2 * held + 1])  # (joins the last range, but leaves an ACK due)
        batches = [pre, segs[first : first + 6], segs[:first]]
        trace = []
        for packets in batches:
            if batched:
                b.receive_batch(packets, 1.0, authenticated=True)
            else:
                for p in packets:
                    b.receive(bytearray(p), 1.0, authenticated=True)
            before_poll = state_of(server)
            out: list[bytes] = []
            b.poll(1.0, out)
            trace.append((before_poll, out, b.stats.as_dict()))
        trace.append(server.recv(1 << 20))
        results.append(trace)
    assert results[0] == results[1]
    # (with no room the run was dropped, one by one as batched: the sender resends it)
    assert len(results[0][-1]) == (first + (6 if ranges_left else 0)) * size
    if ranges_left:
        assert seen[0] >= 1, "the run ahead of the hole was not coalesced"


@pytest.mark.parametrize("sack", [True, False], ids=["sack", "no-sack"])
def test_duplicate_acks_for_batches_ahead_of_a_hole(sack: bool) -> None:
    """Batches of four segments behind a lost one: one duplicate ACK per segment for the
    sender to count (RFC 5681 §4.2), except that with SACK, once three went out for one
    RCV.NXT, each batch gets just one ACK carrying every SACK block (as Linux's SACK
    compression; a sender that counts duplicate ACKs despite SACK, like smoltcp, still
    gets the three that start its fast retransmit). A new RCV.NXT counts from zero."""
    a, b = make_stacks(6, TcpConfig(sack=sack))
    lst = b.tcp_listen(80)
    client = a.tcp_connect("10.0.0.2", 80, 0.0)
    exchange(a, b)
    server = lst.accept()
    assert server is not None
    assert server._sack_ok is sack
    seq, ack = server.rcv_nxt, client.rcv_nxt
    header = (ack, ACK, 1000, (server._ts_recent + 1, 5))

    def acks_for(segments: list[int]) -> list[bytes]:
        packets = [
            _packet(client.local_port, seq + i * 1000, *header, bytes(1000)) for i in segments
        ]
        b.receive_batch(packets, 1.0, authenticated=True)
        out: list[bytes] = []
        b.poll(1.0, out)
        assert all(len(p) > 52 if sack else len(p) == 52 for p in out)  # (SACK blocks)
        return out

    rcv_nxt = seq & M32
    first = acks_for([2, 3])  # holes at 0 and 1
    second = acks_for([4, 5, 6, 7])
    third = acks_for([8, 9, 10, 11])
    assert {_TCP.unpack_from(p, 20)[3] for p in first + second + third} == {rcv_nxt}
    # (with SACK: 2 ACKs, then 2 more to make four at this RCV.NXT, then one per batch)
    assert [len(first), len(second), len(third)] == ([2, 2, 1] if sack else [2, 4, 4])
    # segment 0 arrives: RCV.NXT moves to the hole at 1, where counting starts again
    filler = _packet(client.local_port, seq, *header, bytes(1000))
    b.receive_batch([filler], 1.0, authenticated=True)
    b.poll(1.0, [])
    fourth = acks_for([12, 13, 14, 15])
    assert len(fourth) == 4 and _TCP.unpack_from(fourth[-1], 20)[3] == (seq + 1000) & M32


def _udp_packet(payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 5353, 53, 8 + len(payload), 0) + payload
    ip = _IP4.pack(0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0, A, B)
    ip = ip[:10] + checksum(ip).to_bytes(2, "big") + ip[12:]
    return ip + udp


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_runs_are_coalesced_and_split_where_they_must(monkeypatch: Any, v6: bool) -> None:
    """Ten full-sized segments in order are one run; a PSH ends a run; a TSval change or
    another connection's segment starts a new one. Only a segment whose header differs
    from the run's first one's takes the per-packet path."""
    seen = _count_runs(monkeypatch)
    _a, b, client, server = connected_stacks(7, v6=v6)
    general: list[int] = []  # the segments that took the per-packet path (their number)
    original = Stack._receive

    def counting(self: Stack, packet: Any, *args: Any) -> None:
        general.append((_TCP.unpack_from(packet, 40 if v6 else 20)[2] - seq0) // 1400)
        original(self, packet, *args)

    monkeypatch.setattr(Stack, "_receive", counting)
    seq0 = seq = server.rcv_nxt
    ack = client.rcv_nxt
    sport = client.local_port
    pkts = []
    for i in range(10):
        flags = ACK | PSH if i == 5 else ACK
        ts = (2000 if i < 8 else 2001, 5)
        pkts.append(_packet(sport, seq, ack, flags, 1000, ts, bytes(1400), v6=v6))
        seq += 1400
    b.receive_batch(pkts, 1.0, authenticated=True)
    # runs: 0-5 (PSH ends it), 6-7, then 8-9 after the TSval step
    assert seen == [3, 10]
    # Only the first segment and the one with the new TSval took the per-packet path: the
    # others matched the run's first header (6 starts the run after the PSH from it).
    assert general == [0, 8]
    assert len(server.recv(1 << 20)) == 14000
    assert b.stats.packets_in >= 10


def test_sack_ack_of_another_connection_waits_for_the_run(monkeypatch: Any) -> None:
    """A pure ACK with SACK blocks (TcpSocket.sack_ack_input) for one connection right after
    a run of another's: the run reaches its socket first, as packet by packet, and the
    outcome is the same."""
    results = []
    seen: list[int] = []
    original = TcpSocket.sack_ack_input

    def recording(self: TcpSocket, *args: Any) -> bool:
        seen.append(srv1.rcv_nxt)  # what the run's socket has received by then
        return original(self, *args)

    monkeypatch.setattr(TcpSocket, "sack_ack_input", recording)
    for batched in (True, False):
        a, b = make_stacks(5)
        lst = b.tcp_listen(80)
        c1 = a.tcp_connect("10.0.0.2", 80, 0.0)
        c2 = a.tcp_connect("10.0.0.2", 80, 0.0)
        exchange(a, b)
        srv1, srv2 = lst.accept(), lst.accept()
        assert srv1 is not None and srv2 is not None
        if srv1.remote_port != c1.local_port:
            srv1, srv2 = srv2, srv1
        srv2.send(bytes(200_000))
        b.poll(0.5, [])
        una = srv2.snd_una
        tsval = max(srv1._ts_recent, srv2._ts_recent) + 1
        packets = [
            _packet(
                c1.local_port,
                srv1.rcv_nxt + 1400 * i,
                srv1.snd_una,
                ACK,
                1000,
                (tsval, 5),
                bytes(1400),
            )
            for i in range(2)
        ]
        sack = ((una + 2000, una + 4000),)
        packets.append(
            _packet(c2.local_port, srv2.rcv_nxt, una + 1000, ACK, 1000, (tsval, 5), b"", sack=sack)
        )
        if batched:
            b.receive_batch(packets, 1.0, authenticated=True)
            assert seen == [(srv1.rcv_nxt) & M32], "the SACK ACK overtook the run"
        else:
            for p in packets:
                b.receive(bytearray(p), 1.0, authenticated=True)
        out = []
        b.poll(1.0, out)
        assert len({p[22:24] for p in out}) == 2, "both connections send"
        results.append((out, b.stats.as_dict(), state_of(srv1), state_of(srv2)))
    assert results[0] == results[1]
