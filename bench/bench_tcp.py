"""Microbenchmark of the TCP hot path (sans-IO, no stack, no checksums).

Measures, per segment:
* receiver: processing an in-order full-size data segment (plus its share of the ACKs it
  triggers) and reading the data;
* sender: processing a pure ACK that acknowledges one full segment, including the dispatch
  that sends the next segment.

Run: .venv/bin/python bench/bench_tcp.py [--segments N] [--smoke]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# this checkout's mitm_wg (not one installed in the venv): an A/B runs each tree's own code
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mitm_wg.net.tcp import TcpConfig, TcpSocket, TcpState
from mitm_wg.net.tcp_wire import ACK, SYN, TcpSegment

A = b"\x0a\x00\x00\x01"
B = b"\x0a\x00\x00\x02"
MSS = 1400


def zero(n: int) -> bytes:
    return bytes(n)


def receiver_bench(n: int) -> float:
    cfg = TcpConfig(mss=MSS, recv_buffer=1 << 22)
    syn = TcpSegment(
        80, 1234, 1000, 0, SYN, 65535, mss=MSS, wscale=7, timestamp=(1, 0), sack_permitted=True
    )
    sock = TcpSocket.from_syn(cfg, A, 1234, B, 80, syn, isn=5000, now=0.0, randbytes=zero)
    out: list[TcpSegment] = []
    sock.dispatch(0.0, out)
    sock.process(TcpSegment(80, 1234, 1001, 5001, ACK, 65535, timestamp=(2, 0)), 0.0)
    assert sock.state is TcpState.ESTABLISHED
    payload = memoryview(bytes(MSS - 12))
    segs = [
        TcpSegment(
            80,
            1234,
            (1001 + i * (MSS - 12)) & 0xFFFFFFFF,
            5001,
            ACK,
            65535,
            timestamp=(3 + i, 0),
            payload=payload,
        )
        for i in range(n)
    ]
    now = 1.0
    t0 = time.perf_counter()
    for s in segs:
        sock.process(s, now)
        sock.dispatch(now, out)
        sock.recv(1 << 20)
        now += 0.0001
    dt = time.perf_counter() - t0
    assert sock.recv_available == 0 and len(out) >= n // 2
    return dt / n


def sender_bench(n: int) -> float:
    cfg = TcpConfig(mss=MSS, send_buffer=1 << 26)
    sock = TcpSocket(cfg, A, 1234, B, 80, isn=5000, now=0.0, randbytes=zero)
    sock.connect(0.0)
    out: list[TcpSegment] = []
    sock.dispatch(0.0, out)
    sock.process(
        TcpSegment(
            80,
            1234,
            1000,
            5001,
            SYN | ACK,
            65535,
            mss=MSS,
            wscale=7,
            timestamp=(1, 0),
            sack_permitted=True,
        ),
        0.0,
    )
    smss = sock.mss
    sock.send(bytes(smss * (n + 64)))
    out.clear()
    sock.dispatch(0.0, out)
    acks = [
        TcpSegment(
            80, 1234, 1001, (5001 + (i + 1) * smss) & 0xFFFFFFFF, ACK, 65535, timestamp=(2 + i, 0)
        )
        for i in range(n)
    ]
    now = 0.001
    t0 = time.perf_counter()
    for a in acks:
        sock.process(a, now)
        out.clear()
        sock.dispatch(now, out)
        now += 0.0001
    dt = time.perf_counter() - t0
    assert sock.snd_una == (5001 + n * smss) & 0xFFFFFFFF
    return dt / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=20_000)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite)")
    args = parser.parse_args()
    n = 200 if args.smoke else args.segments
    for _ in range(2):
        r = receiver_bench(n)
        s = sender_bench(n)
    print(
        f"receiver: {r * 1e6:.2f} us per in-order {MSS - 12}-byte segment (process+dispatch+recv)"
    )
    print(f"sender:   {s * 1e6:.2f} us per ACK (process + dispatch of the next segment)")


if __name__ == "__main__":
    main()
