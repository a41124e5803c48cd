"""Side-by-side throughput: one hop vs two hops (WireGuard inside WireGuard), in one run.

Builds the harness's exit peer and a second exit reachable only through it
(tests/harness/multihop.py), then alternates, for N MiB each way:
  1. one hop: our tunnel to the outer exit, the outer exit's HTTP server;
  2. two hops: our inner tunnel through our outer tunnel, the inner exit's HTTP server
     (the same Python server program);
and prints median MB/s and the ratio. Needs root. Run:
    .venv/bin/python bench/bench_multihop.py [--mib N] [--rounds N] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import exit_peer
from harness.multihop import inner_exit_peer
from mitm_wg.config import WireGuardConfig
from mitm_wg.runtime import open_tunnel
from tests.runtime_helpers import NamespaceSocketFactory, http_get, http_post_json

NEEDS_NETNS = True


async def transfer(tunnel, host: str, port: int, size: int, upload: bool) -> float:
    stream = await tunnel.open_tcp_stream(host, port)
    start = time.perf_counter()
    if upload:
        result = await http_post_json(stream, "/upload", size)
        assert result["size"] == size
    else:
        resp = await http_get(stream, f"/bytes/{size}")
        assert resp.size == size
    elapsed = time.perf_counter() - start
    await stream.aclose()
    return size / elapsed / 1e6


async def run(outer, inner, size: int, rounds: int) -> None:
    nets = f"{outer.tunnel_v4_net}, {inner.transit_v4_net}"
    outer_config = WireGuardConfig.parse(outer.client_config_text(allowed_ips=nets, dns=False))
    inner_config = WireGuardConfig.parse(inner.client_config_text(dns=False))
    results: dict[tuple[str, str], list[float]] = {}
    factory = NamespaceSocketFactory(outer.client_ns)
    async with (
        open_tunnel(outer_config, socket_factory=factory) as a,
        open_tunnel(inner_config, via=a) as b,
    ):
        for _ in range(rounds):
            for direction in ("download", "upload"):
                up = direction == "upload"
                one = await transfer(a, outer.server_tunnel_v4, outer.http_port, size, up)
                two = await transfer(b, inner.server_tunnel_v4, inner.http_port, size, up)
                results.setdefault((direction, "one hop"), []).append(one)
                results.setdefault((direction, "two hops"), []).append(two)
        print(f"MTU: outer {a.stack.mtu}, inner {b.stack.mtu}")
    print(f"{size / (1 << 20):g} MiB, {rounds} rounds, median MB/s")
    print("| direction | one hop | two hops | ratio |")
    print("|---|---|---|---|")
    for direction in ("download", "upload"):
        one = statistics.median(results[(direction, "one hop")])
        two = statistics.median(results[(direction, "two hops")])
        print(f"| {direction} | {one:.1f} | {two:.1f} | {two / one:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=20, help="MiB each way per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="a tiny run (CI smoke test)")
    args = ap.parse_args()
    size = (1 << 18) if args.smoke else args.mib << 20
    rounds = 1 if args.smoke else args.rounds
    with exit_peer(name_prefix="mwgbmh") as outer, inner_exit_peer(outer) as inner:
        trio.run(run, outer, inner, size, rounds)


if __name__ == "__main__":
    main()
