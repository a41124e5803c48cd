"""Side-by-side throughput: our tunnel vs wireguard-go + Linux TCP, in one run (needs root).

Builds the test harness's exit peer (wireguard-go + Linux TCP + HTTP server in a network
namespace), then downloads and uploads N MiB
  1. with a reference client: wireguard-go + the Linux TCP stack in the client namespace
     (curl), the kernel path;
  2. with our tunnel (open_tunnel + TunnelStream) from the same namespace,
alternating, and prints MB/s and the ratio. Run:  .venv/bin/python bench/bench_interop.py [MiB]
[--rounds N] (--smoke: 1 MiB, one round).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import exit_peer, wireguard_go_interface
from mitm_wg.config import WireGuardConfig
from mitm_wg.runtime import open_tunnel

#: Needs root and network namespaces (tests/harness): see bench/README.md.
NEEDS_NETNS = True


def kernel_download(peer, size: int) -> float:
    url = f"http://{peer.server_tunnel_v4}:{peer.http_port}/bytes/{size}"
    start = time.perf_counter()
    result = peer.client_ns.exec(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}", url], timeout=300
    )
    elapsed = time.perf_counter() - start
    assert int(result.stdout) == size, result.stdout
    return size / elapsed / 1e6


def kernel_upload(peer, size: int, body: Path) -> float:
    url = f"http://{peer.server_tunnel_v4}:{peer.http_port}/upload"
    start = time.perf_counter()
    result = peer.client_ns.exec(
        ["curl", "-sS", "--data-binary", f"@{body}", "-H", "Expect:", url], timeout=300
    )
    elapsed = time.perf_counter() - start
    assert json.loads(result.stdout)["size"] == size
    return size / elapsed / 1e6


async def ours(peer, size: int, upload: bool) -> float:
    config = WireGuardConfig.parse(peer.client_config_text(dns=False))

    def factory(family: int) -> socket.socket:
        sock = peer.client_ns.socket(family, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", 0))
        return sock

    async with open_tunnel(config, socket_factory=factory) as tunnel:
        # Handshake first, so both sides are timed from an established tunnel.
        warm = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
        await warm.aclose()
        stream = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
        start = time.perf_counter()
        if upload:
            head = f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
            await stream.send_all(head.encode())
            chunk = bytes(1 << 20)
            for _ in range(size >> 20):
                await stream.send_all(chunk)
        else:
            request = f"GET /bytes/{size} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            await stream.send_all(request.encode())
        received = 0
        while data := await stream.receive_some(1 << 20):
            received += len(data)
        elapsed = time.perf_counter() - start
        await stream.aclose()
    if not upload:
        assert received >= size, received
    return size / elapsed / 1e6


def main(mib: int = 50, rounds: int = 3) -> None:
    size = mib << 20
    results: dict[str, list[float]] = {
        k: [] for k in ("kernel down", "ours down", "kernel up", "ours up")
    }
    with exit_peer(ipv6=False, http=True, name_prefix="mwgb") as peer:
        body = peer.workdir / "upload.bin"
        body.write_bytes(bytes(size))
        with wireguard_go_interface(
            peer.client_ns, peer.client_ifname, peer.client_config_text(dns=False), peer.workdir
        ):
            for _ in range(rounds):
                results["kernel down"].append(kernel_download(peer, size))
                results["kernel up"].append(kernel_upload(peer, size, body))
        # The reference interface is gone; our tunnel uses the same keys now.
        for _ in range(rounds):
            results["ours down"].append(trio.run(ours, peer, size, False))
            results["ours up"].append(trio.run(ours, peer, size, True))
    med = {k: statistics.median(v) for k, v in results.items()}
    for k, v in results.items():
        print(f"{k:12s} median {med[k]:7.1f} MB/s  runs {', '.join(f'{x:.1f}' for x in v)}")
    print(f"ratio down (ours / kernel): {med['ours down'] / med['kernel down']:.2f}")
    print(f"ratio up   (ours / kernel): {med['ours up'] / med['kernel up']:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mib", type=int, nargs="?", default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite)")
    args = parser.parse_args()
    if args.smoke:
        main(1, 1)
    else:
        main(args.mib, args.rounds)
