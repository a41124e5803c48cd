"""µs per full-size TCP segment through our whole data path, in memory (no sockets).

sender: TcpSocket.send → Stack.poll → Device.send_packets (pad + seal)
receiver: Device.receive_datagrams (open + replay) → Stack.receive_batch → TcpSocket.recv
plus the ACKs flowing back. Run: .venv/bin/python bench/bench_tunnel.py [MiB]
(--smoke: 1 MiB).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import time
from pathlib import Path

# this checkout's mitm_wg (not one installed in the venv): an A/B runs each tree's own code
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mitm_wg.net.stack import Stack
from mitm_wg.wireguard import crypto
from mitm_wg.wireguard.device import Device

A_EP = ("127.0.0.1", 1)
B_EP = ("127.0.0.1", 2)


def main(mib: int = 32, ipv6: bool = False) -> None:
    a_priv, a_pub = crypto.dh_generate()
    b_priv, b_pub = crypto.dh_generate()
    da, db = Device(a_priv), Device(b_priv)
    a_net, b_net = ("fd00::1/128", "fd00::2/128") if ipv6 else ("10.0.0.1/32", "10.0.0.2/32")
    da.add_peer(b_pub, allowed_ips=[ipaddress.ip_network(b_net)], endpoint=B_EP)
    db.add_peer(a_pub, allowed_ips=[ipaddress.ip_network(a_net)], endpoint=A_EP)
    sa = Stack([a_net], mtu=1420)
    sb = Stack([b_net], mtu=1420)
    listener = sb.tcp_listen(80)
    now = 0.0
    wire: list = []
    ip: list[bytes] = []
    packets: list[bytes] = []
    counts = {"a_out": 0, "b_out": 0}
    timing = {"send": 0.0, "recv": 0.0}

    def step() -> None:
        nonlocal now
        now += 0.0005
        # A side: stack → device
        t0 = time.perf_counter()
        sa.poll(now, ip)
        counts["a_out"] += len(ip)
        da.send_packets(ip, now, wire)  # as the runtime does
        ip.clear()
        a_wire = list(wire)
        wire.clear()
        t1 = time.perf_counter()
        # as the runtime does: the run from one address at once
        db.receive_datagrams([d for d, _ in a_wire], A_EP, now, wire, packets)
        # as the runtime does: one batch per wake-up, authenticated by WireGuard
        sb.receive_batch(packets, now, authenticated=True)
        packets.clear()
        t2 = time.perf_counter()
        timing["send"] += t1 - t0
        timing["recv"] += t2 - t1
        # B side (ACKs and handshake) back to A, untimed except in the total
        sb.poll(now, ip)
        counts["b_out"] += len(ip)
        db.send_packets(ip, now, wire)
        ip.clear()
        b_wire = list(wire)
        wire.clear()
        da.receive_datagrams([d for d, _ in b_wire], B_EP, now, wire, packets)
        sa.receive_batch(packets, now, authenticated=True)
        packets.clear()

    client = sa.tcp_connect(b_net.split("/")[0], 80, now)
    server = None
    while server is None:
        step()
        server = listener.accept()
    total = mib << 20
    chunk = bytes(range(256)) * 256
    sent = received = 0
    start = time.perf_counter()
    timing["send"] = timing["recv"] = 0.0
    counts["a_out"] = counts["b_out"] = 0
    while received < total:
        while sent < total:
            n = client.send(chunk)
            if n == 0:
                break
            sent += n
        step()
        while True:
            data = server.recv(1 << 20)
            if not data:
                break
            received += len(data)
    elapsed = time.perf_counter() - start
    segs = counts["a_out"]
    print(f"{mib} MiB in {elapsed:.2f} s = {mib / elapsed:.1f} MiB/s (one core, both ends)")
    print(f"segments A->B: {segs}, packets B->A (ACKs): {counts['b_out']}")
    print(f"send path (stack poll + seal): {timing['send'] / segs * 1e6:.1f} µs/segment")
    print(f"recv path (open + stack receive): {timing['recv'] / segs * 1e6:.1f} µs/segment")
    print(f"everything incl. ACK path: {elapsed / segs * 1e6:.1f} µs/segment")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mib", type=int, nargs="?", default=32)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite)")
    parser.add_argument("--ipv6", action="store_true", help="IPv6 inside the tunnel")
    args = parser.parse_args()
    main(1 if args.smoke else args.mib, args.ipv6)
