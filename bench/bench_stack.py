"""Microbenchmark of the Stack: µs per full-size TCP segment received and sent.

Two stacks are wired back to back (no delay, no loss).  A bulk transfer from A to B runs;
we time separately

* receive: ``B.receive(packet)`` + ``B.recv()`` for each data packet (bytes in -> readable),
* send: ``A.send()`` + ``A.poll()`` per data packet produced (send() -> IP packet out),
* poll overhead with 100 idle connections open (the full socket scan in ``Stack.poll``).

Run: .venv/bin/python bench/bench_stack.py [megabytes]   (--smoke: 1 MiB, few polls)
"""

from __future__ import annotations

import argparse
import os
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("megabytes", type=int, nargs="?", default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite)")
    args = parser.parse_args()
    megabytes = 1 if args.smoke else args.megabytes
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


if __name__ == "__main__":
    main()
