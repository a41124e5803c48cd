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
    A,
    B,
    connected_stacks,
    exchange,
    make_stacks,
    run_transfer,
    state_of,
)

from mitm_wg.net.checksum import checksum, pseudo_header_sum
from mitm_wg.net.tcp import M32, TcpSocket
from mitm_wg.net.tcp_wire import ACK, FIN, PSH

_TCP = struct.Struct("!HHIIBBHHH")
_IP4 = struct.Struct("!BBHHHBBH4s4s")


def _count_runs(monkeypatch: Any) -> list[int]:
    """Count fast_input calls that took a coalesced run, and the segments in them."""
    seen = [0, 0]
    original = TcpSocket.fast_input

    def counting(self: TcpSocket, *args: Any) -> bool:
        ok = original(self, *args)
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
) -> bytes:
    opts = b"\x01\x01\x08\x0a" + struct.pack("!II", *ts) if ts is not None else b""
    if sack:  # NOP NOP SACK, as Linux lays it out after the timestamp
        edges = [e & M32 for block in sack for e in block]
        opts += bytes((1, 1, 5, 2 + 8 * len(sack))) + struct.pack(f"!{len(edges)}I", *edges)
    hlen = 20 + len(opts)
    header = _TCP.pack(sport, dport, seq & M32, ack & M32, hlen // 4 << 4, flags, window, 0, 0)
    seg = header + opts + payload
    csum = checksum(seg, pseudo_header_sum(A, B, 6, len(seg)))
    seg = seg[:16] + csum.to_bytes(2, "big") + seg[18:]
    ip = _IP4.pack(0x45, 0, 20 + len(seg), 0, 0x4000, 64, 6, 0, A, B)
    ip = ip[:10] + checksum(ip).to_bytes(2, "big") + ip[12:]
    return ip + seg


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
            ]
        ),
        st.integers(1, 1400),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    batches=st.lists(_STEPS, min_size=1, max_size=4),
    recv_buffer_small=st.booleans(),
)
# a run of 536, 536, 1400 bytes: one by one, the second segment makes an ACK due (two
# segments of the receive MSS so far, 536); the run's last one raises that MSS to 1400
@example(
    seed=1, batches=[[("short", 536), ("ooo_fill", 536), ("data", 1)]], recv_buffer_small=False
)
def test_crafted_runs_match_one_by_one(
    seed: int, batches: list[list[tuple[str, int]]], recv_buffer_small: bool
) -> None:
    """Hand-made batches: full-sized and short segments, PSH inside a run, a gap and its
    filling, duplicates, a TSval step, window and ACK changes, a FIN, a second connection's
    segments and a UDP datagram in between, a receive window that runs out mid-run; pure
    ACKs with 1-3 SACK blocks (or a D-SACK) for the server's data in flight, which must
    not overtake a pending run."""
    results = []
    for batched in (True, False):
        _a, b, client, server = connected_stacks(seed)
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
            for kind, size in steps:
                sport = client.local_port
                flags = ACK
                payload = bytes([size & 0xFF]) * (1400 if kind == "data" else size)
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
                    packets.append(_udp_packet(payload))
                    continue
                pkt = _packet(sport, seq, ack, flags, window, (ts[0], ts[1]), payload, sack=sack)
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
                if sport == client.local_port:
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


def _udp_packet(payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", 5353, 53, 8 + len(payload), 0) + payload
    ip = _IP4.pack(0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0, A, B)
    ip = ip[:10] + checksum(ip).to_bytes(2, "big") + ip[12:]
    return ip + udp


def test_runs_are_coalesced_and_split_where_they_must(monkeypatch: Any) -> None:
    """Ten full-sized segments in order are one run; a PSH ends a run; a TSval change or
    another connection's segment starts a new one."""
    seen = _count_runs(monkeypatch)
    _a, b, client, server = connected_stacks(7)
    seq, ack = server.rcv_nxt, client.rcv_nxt
    sport = client.local_port
    pkts = []
    for i in range(10):
        flags = ACK | PSH if i == 5 else ACK
        ts = (2000 if i < 8 else 2001, 5)
        pkts.append(_packet(sport, seq, ack, flags, 1000, ts, bytes(1400)))
        seq += 1400
    b.receive_batch(pkts, 1.0, authenticated=True)
    # runs: 0-5 (PSH ends it), 6-7, then 8-9 after the TSval step
    assert seen == [3, 10]
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
