"""Page loads through mitmdump: our tunnel (addon) vs the kernel path, side by side (root).

What a user pointing a browser at mitmproxy waits for is not bulk speed but round trips: a
page is dozens of small objects, fetched over new connections, each of which mitmproxy
opens upstream (TCP, then TLS) through the tunnel, from an exit 50-100 ms away. A round trip
our stack adds anywhere (connect, the TLS handshake's flights, a delayed ACK, slow start of
small responses, the tunnel's handshake) shows here and in no bulk benchmark.

Layout: ``bench_mitm_https.py``'s (tests/harness exit peer; nginx on the exit's tunnel
address serving HTTPS; A = ``mitmdump`` without the addon over the kernel path, a wireguard-go
client interface + Linux TCP in the client namespace; B = ``mitmdump -s addons/mitm_wg.py``),
every tunnel through one impairing relay with a ``bench_path.py`` scenario. The page: N
objects of browser-like sizes (1 KiB to 256 KiB, ~2 MB in all by default). One load is one
curl process fetching all of them in parallel through the proxy (HTTP/1.1: up to 6
connections, as a browser opens per host; ``--h2``: one connection, multiplexed), so every
load opens new connections upstream; it checks every status and size. The loads alternate
A, B, A, B, ...; the script prints each load's seconds and, per scenario, the medians, the
ratio B / A of load times (below 1: ours is faster) and the same in round trips of that path.

Run:  .venv/bin/python bench/bench_page_load.py [--paths rtt50,rtt100,random50]
      [--loads 15] [--objects 40] [--h2] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

NEEDS_NETNS = True

#: The page's object sizes, repeated to make up ``--objects``: mostly small, a few large
#: (images, scripts): ~2 MB in 40 objects, near the HTTP Archive's median page (which has
#: more requests, ~70, many of them to other hosts).
SIZES_KIB = [1, 3, 6, 10, 15, 24, 40, 64, 100, 256]
#: Parallel connections per host for HTTP/1.1, as browsers open.
PARALLEL = 6


def page_sizes(objects: int) -> list[int]:
    return [SIZES_KIB[i % len(SIZES_KIB)] << 10 for i in range(objects)]


def write_page(www: Path, sizes: list[int]) -> list[str]:
    """The page's objects as files under ``www``; their paths."""
    paths = []
    for i, size in enumerate(sizes):
        name = f"o{i:03d}"
        (www / name).write_bytes(os.urandom(size))
        os.chmod(www / name, 0o644)
        paths.append(f"/{name}")
    return paths


def load(peer: Any, proxy: Any, urls: list[str], sizes: list[int], h2: bool) -> float:
    """One page load with a new curl process through ``proxy``; seconds (wall, curl's start
    to its exit). Every object must arrive whole with status 200."""
    # HTTP/1.1: PARALLEL connections opened at once; HTTP/2: curl waits for the first
    # connection and multiplexes every request on it (no --parallel-immediate)
    parallel = (
        ["--parallel-max", "100"]
        if h2
        else ["--http1.1", "--parallel-immediate", "--parallel-max", str(PARALLEL)]
    )
    argv = [
        "curl", "-sS", "--max-time", "120", "--parallel", *parallel,
        "--cacert", str(proxy.ca_pem), "-x", f"http://127.0.0.1:{proxy.port}",
        "-w", "%{http_code} %{size_download} %{url_effective}\\n",
    ]  # fmt: skip
    for url in urls:
        argv += ["-o", "/dev/null", url]
    env = dict(os.environ, NO_PROXY="", no_proxy="")
    started = time.perf_counter()
    r = peer.client_ns.exec(argv, check=False, timeout=180, env=env)
    took = time.perf_counter() - started
    want = {url: size for url, size in zip(urls, sizes, strict=True)}
    got = {}
    for line in r.stdout.splitlines():
        code, size, url = line.split(" ", 2)
        if code != "200" or int(size) != want.get(url):
            raise RuntimeError(f"{proxy.name}: {url}: status {code}, {size} bytes")
        got[url] = int(size)
    if r.returncode or len(got) != len(urls):
        raise RuntimeError(
            f"{proxy.name}: the load failed (rc={r.returncode}, {len(got)} of {len(urls)} "
            f"objects): {r.stderr[-2000:]!r}"
        )
    return took


@contextlib.contextmanager
def page_setup(
    name: str, sizes: list[int]
) -> Iterator[tuple[Any, list[tuple[str, Any]], list[str]]]:
    """The exit, nginx with the page, both proxies, every tunnel through a relay with the
    ``bench_path.py`` scenario ``name``; yields (peer, [(key, proxy)], the objects' URLs)."""
    from bench_mitm_https import (
        ADDON,
        KERNEL_CLIENT_HOST,
        add_client,
        mitmdump,
        nginx_origin,
        write_conf,
    )
    from bench_path import SCENARIOS

    from harness import exit_peer, wireguard_go_interface
    from harness.relay import RelayProcess

    with (
        exit_peer(ipv6=False, http=False, name_prefix="mwgpl") as peer,
        contextlib.ExitStack() as st,
    ):
        relay = st.enter_context(
            RelayProcess(peer.endpoint, impairment=SCENARIOS[name].impairment, ns=peer.client_ns)
        )
        endpoint = relay.address
        origin_ca, _, _ = st.enter_context(nginx_origin(peer, 0))
        paths = write_page(peer.workdir / "nginx" / "www", sizes)
        urls = [f"https://{peer.server_tunnel_v4}{p}" for p in paths]
        kernel = add_client(peer, KERNEL_CLIENT_HOST, endpoint)
        st.enter_context(
            wireguard_go_interface(peer.client_ns, peer.client_ifname, kernel, peer.workdir)
        )
        conf = write_conf(peer, "ours", peer.client_config_text(dns=False, endpoint=endpoint))
        ours = ("-s", str(ADDON), "--set", f"wg_conf=exit={conf}")
        proxies = [
            ("A kernel", st.enter_context(mitmdump(peer, "kernel", origin_ca))),
            ("B ours", st.enter_context(mitmdump(peer, "ours", origin_ca, *ours))),
        ]
        yield peer, proxies, urls


def run_scenario(
    name: str, args: argparse.Namespace, sizes: list[int]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per proxy: each load's seconds, and the CPU seconds its mitmdump used for it."""
    from bench_mitm_https import process_counters

    times: dict[str, list[float]] = {"A kernel": [], "B ours": []}
    cpu: dict[str, list[float]] = {"A kernel": [], "B ours": []}
    with page_setup(name, sizes) as (peer, proxies, urls):
        # one load each first: the tunnels' handshakes, mitmproxy's certificate cache
        for _, proxy in proxies:
            load(peer, proxy, urls[:1], sizes[:1], args.h2)
        for i in range(args.loads):
            for key, proxy in proxies:
                cpu0 = process_counters(proxy.proc.pid).cpu
                took = load(peer, proxy, urls, sizes, args.h2)
                cpu[key].append(process_counters(proxy.proc.pid).cpu - cpu0)
                times[key].append(took)
                print(
                    f"{name} load {i + 1:2d} {key:8s} {took * 1000:7.0f} ms, "
                    f"mitmdump CPU {cpu[key][-1] * 1000:4.0f} ms",
                    flush=True,
                )
    return times, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--paths", default="rtt50,rtt100,random50", help="bench_path.py scenarios")
    ap.add_argument("--loads", type=int, default=15, help="loads per proxy and path")
    ap.add_argument("--objects", type=int, default=40, help="objects per page")
    ap.add_argument("--h2", action="store_true", help="HTTP/2 (one connection) instead of 1.1")
    ap.add_argument("--smoke", action="store_true", help="rtt1, 2 loads of 5 objects")
    args = ap.parse_args()
    from bench_path import SCENARIOS

    if args.smoke:
        args.paths, args.loads, args.objects = "rtt1", 2, 5
    names = args.paths.split(",")
    for name in names:
        if name not in SCENARIOS:
            ap.error(f"--paths: no scenario {name!r} (one of: {', '.join(SCENARIOS)})")
    sizes = page_sizes(args.objects)
    print(
        f"page: {len(sizes)} objects, {sum(sizes) >> 10} KiB, "
        f"{'HTTP/2 (one connection)' if args.h2 else f'HTTP/1.1 ({PARALLEL} connections)'}",
        flush=True,
    )
    summary = []
    for name in names:
        times, cpu = run_scenario(name, args, sizes)
        a, b = statistics.median(times["A kernel"]), statistics.median(times["B ours"])
        cpu_a, cpu_b = statistics.median(cpu["A kernel"]), statistics.median(cpu["B ours"])
        rtt = SCENARIOS[name].impairment.delay * 2
        in_rtts = f", {a / rtt:.1f} / {b / rtt:.1f} RTTs" if rtt >= 0.01 else ""
        summary.append(
            f"| {SCENARIOS[name].label} | {a * 1000:.0f} | {b * 1000:.0f} | {b / a:.2f}{in_rtts} "
            f"| {cpu_a * 1000:.0f} / {cpu_b * 1000:.0f} |"
        )
    print(
        "\n| path | A kernel ms | B ours ms | B / A (medians) | mitmdump CPU ms A / B |"
        "\n|---|---:|---:|---|---|"
    )
    print("\n".join(summary))


if __name__ == "__main__":
    try:
        main()
    except subprocess.TimeoutExpired as e:
        sys.exit(f"timed out: {e}")
