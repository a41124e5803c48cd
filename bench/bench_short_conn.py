"""Sequential short connections: our tunnel vs wireguard-go + Linux TCP, side by side (root).

Builds the test harness's exit peer (wireguard-go + Linux TCP in a namespace) with a tiny
HTTP server that answers one request and closes first (``Connection: close``), so the server
holds every 4-tuple in TIME_WAIT for 60 s. Then N sequential connections (connect, request,
read to EOF, close) with the same trio client code
  1. through our tunnel (open_tunnel + TunnelStream), in this process;
  2. over the kernel path: a wireguard-go client interface in the client namespace and the
     Linux TCP stack (trio sockets), in a child process inside that namespace;
each against its own server port, new ones every round (so no run meets another's
TIME_WAITs: that case is tests/test_time_wait_interop.py's), and prints
connections/s, connect times (median, p99, max), connects over 0.5 s, our stack's SYN
counters, the server's PAWS rejects (TcpExtPAWSTimewait) and the ratio.

Run:  .venv/bin/python bench/bench_short_conn.py [-n 10000] [--rounds 1] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from closefirst_server import REQUEST  # noqa: E402

OURS_PORT = 8081
KERNEL_PORT = 8082
SLOW = 0.5  # the target: no connect slower than this


async def exchange(stream: trio.abc.HalfCloseableStream) -> None:
    await stream.send_all(REQUEST)
    data = b""
    while chunk := await stream.receive_some(4096):
        data += chunk
    if not data.endswith(b"\r\n\r\nok"):
        raise AssertionError(f"bad response {data!r}")
    await stream.aclose()


def summary(name: str, connects: list[float], elapsed: float, **extra: Any) -> dict[str, Any]:
    ordered = sorted(connects)
    return {
        "name": name,
        "n": len(connects),
        "rate": len(connects) / elapsed,
        "connect_median_ms": statistics.median(ordered) * 1000,
        "connect_p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
        "connect_max_ms": ordered[-1] * 1000,
        "slow_connects": sum(1 for c in connects if c > SLOW),
        **extra,
    }


# -- the kernel path: this script run again inside the client namespace ------------------------


async def kernel_client(host: str, port: int, n: int) -> dict[str, Any]:
    connects = []
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        await sock.connect((host, port))
        connects.append(time.perf_counter() - t0)
        await exchange(trio.SocketStream(sock))
    return summary("kernel", connects, time.perf_counter() - start)


def run_kernel(peer: Any, n: int, port: int = KERNEL_PORT) -> dict[str, Any]:
    from harness import wireguard_go_interface

    with wireguard_go_interface(
        peer.client_ns, peer.client_ifname, peer.client_config_text(dns=False), peer.workdir
    ):
        # the handshake and ARP-free warm-up outside the timed part
        subprocess.run(
            peer.client_ns.argv(
                [sys.executable, __file__, "--kernel-client", peer.server_tunnel_v4, "9", "1"]
            ),
            capture_output=True,
            timeout=60,
        )
        r = subprocess.run(
            peer.client_ns.argv(
                [
                    sys.executable,
                    __file__,
                    "--kernel-client",
                    peer.server_tunnel_v4,
                    str(port),
                    str(n),
                ]
            ),
            capture_output=True,
            text=True,
            timeout=max(120, n),
        )
    if r.returncode:
        raise RuntimeError(f"kernel client failed: {r.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(r.stdout)
    return result


# -- our tunnel ------------------------------------------------------------------------------------


async def ours(peer: Any, n: int, port: int = OURS_PORT) -> dict[str, Any]:
    from mitm_wg.config import WireGuardConfig
    from mitm_wg.runtime import open_tunnel

    config = WireGuardConfig.parse(peer.client_config_text(dns=False))

    def factory(family: int) -> socket.socket:
        sock = peer.client_ns.socket(family, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", 0))
        return sock

    async with open_tunnel(config, socket_factory=factory) as tunnel:
        # handshake first, so both sides are timed from an established tunnel
        await exchange(await tunnel.open_tcp_stream(peer.server_tunnel_v4, port))
        connects = []
        slow = []
        wg_peer = next(iter(tunnel.device.peers.values()))
        start = time.perf_counter()
        for i in range(n):
            handshakes = wg_peer.handshakes_completed
            t0 = time.perf_counter()
            stream = await tunnel.open_tcp_stream(peer.server_tunnel_v4, port)
            took = time.perf_counter() - t0
            connects.append(took)
            if took > 0.1:  # what a slow connect waited for: SYN retransmission? handshake?
                st = stream._sock.stats
                slow.append(
                    f"#{i} {took * 1000:.0f} ms: SYN retransmits {st.retransmits}, "
                    f"WireGuard handshakes {wg_peer.handshakes_completed - handshakes}"
                )
            await exchange(stream)
        elapsed = time.perf_counter() - start
        with trio.fail_after(30):
            while tunnel.stack.tcp_sockets:
                await trio.sleep(0.01)
        s = tunnel.stack.stats
        return summary(
            "ours",
            connects,
            elapsed,
            syn_timeouts=s.tcp_syn_timeouts,
            syn_fast_retries=s.tcp_syn_fast_retries,
            port_reuses=s.tcp_port_reuses,
            over_100ms=slow,
        )


def wait_for_newer_handshake(other: float) -> None:
    """Our initiation must carry a newer TAI64N than the kernel client's last one (no wait
    once crypto.tai64n writes wireguard-go's 2**62 + 10 label, issue 8 part 1)."""
    from mitm_wg.wireguard import crypto

    theirs = struct.pack(">QI", (1 << 62) + 10 + math.floor(other + 1), 0)
    while crypto.tai64n(time.time()) <= theirs:
        time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=10_000, help="connections per run")
    ap.add_argument("--rounds", type=int, default=1, help="alternating runs of each")
    ap.add_argument("--smoke", action="store_true", help="a tiny run (CI smoke test)")
    ap.add_argument(
        "--kernel-client", nargs=3, metavar=("HOST", "PORT", "N"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.kernel_client:
        host, port, n = args.kernel_client
        print(json.dumps(trio.run(kernel_client, host, int(port), int(n))))
        return
    n = 20 if args.smoke else args.n
    rounds = 1 if args.smoke else args.rounds

    from closefirst_server import CloseFirstServer, tcp_ext_counters

    from harness import exit_peer

    results: list[dict[str, Any]] = []
    with exit_peer(ipv6=False, http=False, name_prefix="mwgsc") as peer:
        with CloseFirstServer(
            peer.ns,
            peer.workdir,
            peer.server_tunnel_v4,
            [9, *range(OURS_PORT, OURS_PORT + 2 * rounds)],
        ):
            kernel_done = 0.0
            for i in range(rounds):
                wait_for_newer_handshake(kernel_done)
                paws = tcp_ext_counters(peer.ns)["PAWSTimewait"]
                r = trio.run(ours, peer, n, OURS_PORT + 2 * i)
                r["server_paws_rejects"] = tcp_ext_counters(peer.ns)["PAWSTimewait"] - paws
                results.append(r)
                paws = tcp_ext_counters(peer.ns)["PAWSTimewait"]
                r = run_kernel(peer, n, KERNEL_PORT + 2 * i)
                kernel_done = time.time()
                r["server_paws_rejects"] = tcp_ext_counters(peer.ns)["PAWSTimewait"] - paws
                results.append(r)
    for r in results:
        extra = ""
        if r["name"] == "ours":
            extra = (
                f"  syn timeouts {r['syn_timeouts']}, immediate SYN retries "
                f"{r['syn_fast_retries']}, port reuses {r['port_reuses']}"
            )
        print(
            f"{r['name']:6s} {r['n']} conns {r['rate']:7.1f}/s  connect median "
            f"{r['connect_median_ms']:.2f} ms p99 {r['connect_p99_ms']:.2f} ms max "
            f"{r['connect_max_ms']:.1f} ms  >{SLOW} s: {r['slow_connects']}  server PAWS "
            f"rejects {r['server_paws_rejects']}{extra}"
        )
        for line in r.get("over_100ms", []):
            print(f"         connect over 100 ms {line}")
    rate = {
        k: statistics.median(r["rate"] for r in results if r["name"] == k)
        for k in ("ours", "kernel")
    }
    print(f"rate ratio (ours / kernel, medians): {rate['ours'] / rate['kernel']:.2f}")


if __name__ == "__main__":
    main()
