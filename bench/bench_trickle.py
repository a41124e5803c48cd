"""CPU per wake-up when data trickles in: the tunnel's cost on the paths users have (root).

On a 50-200 ms path a page's responses arrive a datagram or two at a time, so every one or
two datagrams wake the tunnel's reader, and what a wake-up costs (trio's loop, the reads,
the ACK it sends, the application's task) is most of the CPU a page costs us, not the bytes.
This measures it without mitmproxy: an in-process client (``open_tunnel``) loads a page of
``bench_page_load.py``'s objects (40 by default, ~2 MB) over 6 parallel keep-alive HTTP/1.1
connections, new ones per load, from the exit's HTTP server (nginx) through an impairing
relay with a ``bench_path.py`` scenario; every object's size is checked. Per scenario it
prints, per load: wall time, this process's CPU (user + system), the reader's wake-ups, and
CPU per wake-up. The relay, the exit and nginx run in processes of their own.

Compare two trees by running each one's copy of this script (it imports its own
``mitm_wg``), alternating.

Run:  .venv/bin/python bench/bench_trickle.py [--paths rtt100,rtt50] [--loads 5] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

NEEDS_NETNS = True

#: Parallel connections, as a browser opens per host (and bench_page_load's HTTP/1.1).
PARALLEL = 6


async def load_page(tunnel: Any, host: str, port: int, objects: list[tuple[str, int]]) -> None:
    """One page: PARALLEL new connections, each GETting its share of ``objects`` in turn
    (keep-alive), checking each body's length."""
    import trio

    async def worker(mine: list[tuple[str, int]]) -> None:
        stream = await tunnel.open_tcp_stream(host, port)
        buf = bytearray()
        try:
            for path, size in mine:
                await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
                while True:
                    end = buf.find(b"\r\n\r\n")
                    if end >= 0:
                        head = bytes(buf[:end]).lower()
                        length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
                        if len(buf) >= end + 4 + length:
                            if not head.startswith(b"http/1.1 200") or length != size:
                                raise RuntimeError(f"{path}: {head[:80]!r}, {length} bytes")
                            del buf[: end + 4 + length]
                            break
                    data = await stream.receive_some(1 << 20)
                    if not data:
                        raise RuntimeError(f"{path}: the connection closed mid-response")
                    buf += data
        finally:
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        for k in range(PARALLEL):
            nursery.start_soon(worker, objects[k::PARALLEL])


def run_scenario(peer: Any, clients: Any, server: Any, name: str, loads: int, objects: int) -> dict:
    import trio
    from bench_page_load import page_sizes
    from bench_path import SCENARIOS, _client_socket_factory

    from harness.relay import RelayProcess
    from mitm_wg import open_tunnel

    page = [(server.download_path(size), size) for size in page_sizes(objects)]
    rows: list[tuple[float, float, int]] = []
    with RelayProcess(
        peer.endpoint, impairment=SCENARIOS[name].impairment, ns=peer.client_ns
    ) as relay:
        config = clients.ours_config(relay.address)

        async def session() -> None:
            async with open_tunnel(
                config, socket_factory=_client_socket_factory(peer), handshake_timeout=25.0
            ) as tunnel:
                with trio.fail_after(120):
                    await load_page(tunnel, server.host, server.port, page)  # warm-up
                for i in range(loads):
                    reads0 = tunnel.reads
                    cpu0 = time.process_time()  # (user + system, not os.times' 10 ms ticks)
                    wall0 = time.perf_counter()
                    with trio.fail_after(120):
                        await load_page(tunnel, server.host, server.port, page)
                    wall = time.perf_counter() - wall0
                    cpu = time.process_time() - cpu0
                    reads = tunnel.reads - reads0
                    rows.append((wall, cpu, reads))
                    print(
                        f"{name} load {i + 1:2d}: {wall * 1e3:6.0f} ms, CPU {cpu * 1e3:5.0f} ms,"
                        f" {reads} wake-ups, {cpu / max(1, reads) * 1e6:4.0f} us each",
                        flush=True,
                    )

        trio.run(session)
    walls, cpus, reads = zip(*rows, strict=True)
    cpu = statistics.median(cpus)
    wakeups = statistics.median(reads)
    return {
        "path": SCENARIOS[name].label,
        "wall_ms": statistics.median(walls) * 1e3,
        "cpu_ms": cpu * 1e3,
        "wakeups": wakeups,
        "us_per_wakeup": sum(cpus) / max(1, sum(reads)) * 1e6,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paths", default="rtt50,rtt100", help="bench_path.py scenarios")
    p.add_argument("--loads", type=int, default=5, help="measured loads per path")
    p.add_argument("--objects", type=int, default=40, help="objects per page")
    p.add_argument("--smoke", action="store_true", help="rtt1, 1 load of 5 objects")
    args = p.parse_args()
    paths, loads, objects = args.paths.split(","), args.loads, args.objects
    if args.smoke:
        paths, loads, objects = ["rtt1"], 1, 5

    from bench_path import SCENARIOS, Clients, http_server

    from harness import exit_peer

    unknown = [n for n in paths if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    results = []
    with exit_peer(ipv6=False, http=True, name_prefix="mwgtr") as peer:
        assert peer.server_tunnel_v4 is not None
        with (
            http_server(peer, peer.server_tunnel_v4, False) as server,
            Clients.start(peer) as clients,
        ):
            if not server.native:
                print("(no nginx: the Python HTTP server serves the page)")
            for name in paths:
                results.append(run_scenario(peer, clients, server, name, loads, objects))
    print()
    print("| path | load ms | CPU ms per load | reader wake-ups | CPU us per wake-up |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['path']} | {r['wall_ms']:.0f} | {r['cpu_ms']:.0f} | {r['wakeups']:.0f} |"
            f" {r['us_per_wakeup']:.0f} |"
        )


if __name__ == "__main__":
    main()
