"""Exit restart: time from the exit being back to the first successful new connection (root).

Builds the test harness's exit peer (wireguard-go + Linux TCP + HTTP server in a network
namespace). Each round:
  1. the client has a working session, then stays idle for ``--idle`` seconds (default 6:
     longer than REKEY_TIMEOUT, so WireGuard's rate limit on initiations is not what is
     measured; ``--idle 0`` shows that bound);
  2. the exit's wireguard-go is killed and started again with the same keys: it has no
     session and does not know the client's endpoint (only the client can repair this);
  3. at once, one new connection + ``GET /bytes/1000``; the time from the exit's interface
     being up again to the complete response is measured.
First with a reference client (wireguard-go + the Linux TCP stack, curl, one attempt), then
with our tunnel (open_tcp_stream, one attempt), same key, same exit. Run:
    .venv/bin/python bench/bench_exit_restart.py [--rounds 3] [--idle 6]   (--smoke: 1 round)
"""

from __future__ import annotations

import argparse
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

SIZE = 1000


def restart_exit(peer) -> float:
    """Restart the exit's wireguard-go; the monotonic time at which it is back."""
    peer.stop_wireguard()
    peer.start_wireguard()
    return time.monotonic()


def kernel_rounds(peer, rounds: int, idle: float) -> list[float]:
    url = f"http://{peer.server_tunnel_v4}:{peer.http_port}/bytes/{SIZE}"
    curl = ["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w", "%{size_download}"]
    times = []
    with wireguard_go_interface(
        peer.client_ns, peer.client_ifname, peer.client_config_text(dns=False), peer.workdir
    ):
        for _ in range(rounds):
            assert peer.client_ns.exec([*curl, "-m", "30", url]).stdout == str(SIZE)
            time.sleep(idle)
            back = restart_exit(peer)
            result = peer.client_ns.exec([*curl, "-m", "120", url], timeout=150)
            times.append(time.monotonic() - back)
            assert result.stdout == str(SIZE), result
    return times


async def get(tunnel, peer) -> None:
    stream = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
    request = f"GET /bytes/{SIZE} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    await stream.send_all(request.encode())
    received = b""
    while data := await stream.receive_some():
        received += data
    await stream.aclose()
    assert received.startswith(b"HTTP/1.1 200") and received.endswith(bytes(range(232))), received


async def our_rounds(peer, rounds: int, idle: float) -> tuple[list[float], int]:
    config = WireGuardConfig.parse(peer.client_config_text(dns=False))

    def factory(family: int) -> socket.socket:
        sock = peer.client_ns.socket(family, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", 0))
        return sock

    times = []
    async with open_tunnel(config, socket_factory=factory, handshake_timeout=120) as tunnel:
        for _ in range(rounds):
            with trio.fail_after(60):
                await get(tunnel, peer)
            await trio.sleep(idle)
            back = await trio.to_thread.run_sync(restart_exit, peer)
            with trio.fail_after(120):
                await get(tunnel, peer)
            times.append(time.monotonic() - back)
        rule = next(iter(tunnel.device.peers.values())).silence_handshakes
    return times, rule


def main(rounds: int, idle: float) -> None:
    with exit_peer(ipv6=False, http=True, name_prefix="mwgr") as peer:
        kernel = kernel_rounds(peer, rounds, idle)
        ours, rule = trio.run(our_rounds, peer, rounds, idle)
    for name, values in (("wireguard-go + Linux", kernel), ("mitm-wg", ours)):
        runs = ", ".join(f"{v:.2f}" for v in values)
        print(f"{name:21s} median {statistics.median(values):6.2f} s  runs {runs}")
    print(f"handshakes started by the SYN rule: {rule} of {rounds} restarts")
    print(f"ratio (kernel path / ours): {statistics.median(kernel) / statistics.median(ours):.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=float, default=6.0, help="idle seconds before a restart")
    parser.add_argument("--smoke", action="store_true", help="one round (the test suite)")
    args = parser.parse_args()
    if args.smoke:
        main(1, 0.0)
    else:
        main(args.rounds, args.idle)
