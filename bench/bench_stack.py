"""Microbenchmark of the Stack: µs per full-size TCP segment received and sent.

Two stacks are wired back to back (no delay, no loss).  A bulk transfer from A to B runs;
we time separately

* receive: ``B.receive(packet)`` + ``B.recv()`` for each data packet (bytes in -> readable),
* send: ``A.send()`` + ``A.poll()`` per data packet produced (send() -> IP packet out),
* poll overhead with 100 idle connections open (the full socket scan in ``Stack.poll``).

Run: .venv/bin/python bench/bench_stack.py [megabytes]   (--smoke: 1 MiB, few polls)

``--loss PCT [--reorder PCT]`` instead runs the transfer over a lossy link (10 ms one way,
a 40 MB/s bottleneck; a seeded, deterministic PCT% of the data packets dropped and PCT%
held back 2 ms) and prints µs per data segment for the whole exchange plus the sender's
recovery counters: the loss-recovery paths (SACK scoreboard, RACK, PRR) under load.
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import sys
import time
from pathlib import Path

# this checkout's mitm_wg (not one installed in the venv): an A/B runs each tree's own code
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mitm_wg.net.stack import Stack


def connect_pair(a: Stack, b: Stack, port: int, now: float, n: int = 1) -> list[tuple]:
    lst = b.tcp_listen(port, backlog=n + 8)
    clients = [a.tcp_connect("10.0.0.2", port, now) for _ in range(n)]
    servers = []
    out: list[bytes] = []
    for _ in range(10):
        a.poll(now, out)
        for p in out:
            b.receive(p, now)
        out.clear()
        b.poll(now, out)
        for p in out:
            a.receive(p, now)
        out.clear()
        while (s := lst.accept()) is not None:
            servers.append(s)
    assert len(servers) == n, "handshake did not complete"
    return list(zip(clients, servers, strict=True))


STEP = 0.0005  # seconds of virtual time per round of the lossy link
DELAY_STEPS = 20  # one-way delay: 10 ms
REORDER_STEPS = 4  # a reordered packet arrives 2 ms late
RATE_PER_STEP = 20_000  # bottleneck: 20 kB per 0.5 ms = 40 MB/s


def lossy_transfer(megabytes: int, loss: float, reorder: float, seed: int = 1) -> dict[str, int]:
    """A -> B bulk transfer over a delayed link with a bottleneck that drops (``loss``) and
    delays (``reorder``) a deterministic fraction of the data packets (ACKs are not
    touched); returns the sender's stats. Everything runs on a virtual clock."""
    rng = random.Random(seed)
    a = Stack(["10.0.0.1/24"], mtu=1420, randbytes=random.Random(seed + 1).randbytes)
    b = Stack(["10.0.0.2/24"], mtu=1420, randbytes=random.Random(seed + 2).randbytes)
    now = 1.0
    ((client, server),) = connect_pair(a, b, 80, now)
    total = megabytes << 20
    block = bytes(256 * 1024)
    sent = received = 0
    step = 0
    # (due step, order, packet): to B through the bottleneck, and the ACKs back to A
    to_b: list[tuple[int, int, bytes]] = []
    to_a: list[tuple[int, int, bytes]] = []
    order = 0
    free_at = 0  # the bottleneck is busy until this many bytes' time (RATE_PER_STEP a step)
    out: list[bytes] = []
    while received < total:
        step += 1
        now += STEP
        if step > 2_000_000:
            raise RuntimeError("lossy transfer did not finish")
        if sent < total:
            sent += client.send(block)
        a.poll(now, out)
        for pkt in out:
            order += 1
            if len(pkt) > 1000:
                r = rng.random()
                if r < loss:
                    continue
                # the bottleneck serializes: a packet leaves it when the bytes before it did
                free_at = max(free_at, step * RATE_PER_STEP) + len(pkt)
                due = free_at // RATE_PER_STEP + DELAY_STEPS
                if r > 1.0 - reorder:
                    due += REORDER_STEPS
            else:
                due = step + DELAY_STEPS
            heapq.heappush(to_b, (due, order, pkt))
        out.clear()
        while to_b and to_b[0][0] <= step:
            b.receive(heapq.heappop(to_b)[2], now)
        received += len(server.recv(1 << 22))
        b.poll(now, out)
        for pkt in out:
            order += 1
            heapq.heappush(to_a, (step + DELAY_STEPS, order, pkt))
        out.clear()
        while to_a and to_a[0][0] <= step:
            a.receive(heapq.heappop(to_a)[2], now)
    st = client.stats
    res = {name: getattr(st, name) for name in st.__slots__}
    res["steps"] = step
    return res


def run_lossy(megabytes: int, loss_pct: float, reorder_pct: float) -> None:
    t0 = time.process_time()
    res = lossy_transfer(megabytes, loss_pct / 100, reorder_pct / 100)
    dt = time.process_time() - t0
    print(
        f"lossy transfer of {megabytes} MiB ({loss_pct}% loss, {reorder_pct}% reorder):"
        f" {dt / (res['segments_out'] or 1) * 1e6:.2f} us per segment sent (both sides, CPU)"
    )
    keys = ("segments_out", "retransmits", "fast_retransmits", "rto_expired", "tlp_probes")
    print("sender: " + ", ".join(f"{k}={res[k]}" for k in (*keys, "dsacks", "steps")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("megabytes", type=int, nargs="?", default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite)")
    parser.add_argument("--loss", type=float, default=None, help="lossy link: %% data dropped")
    parser.add_argument("--reorder", type=float, default=0.0, help="lossy link: %% held back")
    args = parser.parse_args()
    megabytes = 1 if args.smoke else args.megabytes
    if args.loss is not None:
        run_lossy(megabytes, args.loss, args.reorder)
        return
    a = Stack(["10.0.0.1/24"], mtu=1420)
    b = Stack(["10.0.0.2/24"], mtu=1420)
    now = 1.0
    ((client, server),) = connect_pair(a, b, 80, now)
    total = megabytes << 20
    block = os.urandom(256 * 1024)
    sent = received = 0
    t_send = t_recv = 0.0
    n_data_out = n_data_in = 0
    perf = time.perf_counter
    out: list[bytes] = []
    back: list[bytes] = []
    while received < total:
        now += 0.0005
        t0 = perf()
        if sent < total:
            sent += client.send(block)
        a.poll(now, out)
        t_send += perf() - t0
        for pkt in out:
            big = len(pkt) > 1000
            t0 = perf()
            b.receive(pkt, now)
            # read every packet's data: the transfer's last segment is short (it used to be
            # left unread, and a size whose tail was under 1000 bytes never finished)
            received += len(server.recv(1 << 20))
            if big:
                t_recv += perf() - t0
                n_data_in += 1
        n_data_out += sum(1 for p in out if len(p) > 1000)
        out.clear()
        b.poll(now, back)
        for pkt in back:
            a.receive(pkt, now)
        back.clear()
    seg = n_data_in or 1
    print(f"transferred {total >> 20} MiB in {n_data_in} data segments")
    print(f"receive: {t_recv / seg * 1e6:8.2f} us per full-size segment (receive + recv)")
    print(
        f"send:    {t_send / max(n_data_out, 1) * 1e6:8.2f} us per full-size segment (send + poll)"
    )
    print(f"         ({total / (t_send + t_recv) / 1e6:.1f} MB/s for both sides' data path)")

    # Poll overhead with many idle connections.
    a2 = Stack(["10.0.0.1/24"], mtu=1420)
    b2 = Stack(["10.0.0.2/24"], mtu=1420)
    connect_pair(a2, b2, 80, now, n=100)
    for _ in range(100):  # settle delayed ACKs etc.
        now += 0.05
        a2.poll(now, out)
        b2.poll(now, out)
        out.clear()
    reps = 20 if args.smoke else 2000
    t0 = perf()
    for _ in range(reps):
        a2.poll(now, out)
    dt = (perf() - t0) / reps
    t0 = perf()
    for _ in range(reps):
        a2.next_deadline()
    dn = (perf() - t0) / reps
    print(f"poll with 100 idle sockets: {dt * 1e6:8.2f} us; next_deadline: {dn * 1e6:8.2f} us")
    if args.smoke:
        run_lossy(1, 2.0, 2.0)  # (the --loss path too)


if __name__ == "__main__":
    main()
