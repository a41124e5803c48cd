"""The first fetch on a lossy path: the stalls before anything has been measured.

Two situations a user meets on lossy Wi-Fi, each repeated ``--fetches`` times through one
impairing relay (``--loss`` each way, 0.5 ms of delay) in front of the exit (one exit peer
of ``tests/harness``: wireguard-go + Linux's TCP + nginx or the harness's server + dnsmasq):

* ``fresh``: a new tunnel each time; from its session up, look up ``exit.test`` (A and AAAA
  from the exit's dnsmasq), connect to its IPv4 address and GET 64 KiB. A lost first query
  or SYN has no measured time to resend by.
* ``open``: a new tunnel each time, timed from its opening: the same fetch, including the
  tunnel's first handshake, which has nothing measured to resend its initiation by (the
  first flow through mitmproxy right after it loaded the addon).
* ``pause``: one tunnel; each time 600 s pass on the runtime's clock first (a simulated
  laptop suspend: the session expires), then the same fetch, timed including the handshake
  it needs. A lost initiation or response is what can stall.

Prints, per situation, mean / p90 / p99 / max ms, fetches over 1 s, and what went again:
DNS queries resent and timed out, SYN timeouts, handshakes that needed a second initiation,
early ones (rule hs-early). ``--tree DIR`` runs the tunnel from another checkout's
``mitm_wg`` (a ``git worktree`` of an older commit) to compare codes with the same relay
seed; the kernel path is not part of this benchmark (its resolver and its WireGuard keep
their own timers: glibc's 5 s, REKEY_TIMEOUT's 5 s).

The simulated suspend moves trio's clock and fires the tunnel's timer task, as a real
resume fires the runtime's CLOCK_BOOTTIME timerfd (``SuspendableClock.suspend``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

NEEDS_NETNS = True
REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="3 fetches of each, no timing claims")
    ap.add_argument("--fetches", type=int, default=250, help="fetches per situation")
    ap.add_argument(
        "--modes", default="fresh,open,pause", help="comma-separated, from fresh, open and pause"
    )
    ap.add_argument("--loss", type=float, default=0.02, help="loss each way (0.02 = 2 %%)")
    ap.add_argument("--seed", type=int, default=1, help="the relay's seed")
    ap.add_argument("--tree", type=Path, help="run mitm_wg from this checkout instead")
    ap.add_argument("--json", type=Path, help="also write every fetch here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.fetches = 3
    args.modes = [m for m in args.modes.split(",") if m]
    if not set(args.modes) <= {"fresh", "open", "pause"}:
        ap.error(f"unknown mode in {args.modes}")
    if args.tree is not None and not (args.tree / "mitm_wg" / "__init__.py").is_file():
        ap.error(f"--tree {args.tree}: no mitm_wg package there")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # (before anything imports mitm_wg: --tree's checkout must be the one found)
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    if args.tree is not None:
        sys.path.insert(0, str(args.tree.resolve()))
    import trio
    from runtime_helpers import NamespaceSocketFactory, SuspendableClock, http_get

    import mitm_wg
    from harness import exit_peer
    from harness.relay import ImpairedRelay, Impairment

    code = Path(mitm_wg.__file__).resolve().parent.parent
    print(f"mitm_wg from {code}; {args.fetches} fetches per situation, {args.loss:.1%} loss")

    async def fetch(tunnel: Any, port: int) -> dict[str, Any]:
        resolver = tunnel._resolver
        before = (resolver.resends, resolver.timeouts)
        started = trio.current_time()
        addresses = await tunnel.resolve("exit.test")
        v4 = next(a for a in addresses if a.version == 4)
        stream = await tunnel.open_tcp_stream(str(v4), port)
        response = await http_get(stream, "/bytes/65536")
        assert response.status == 200 and response.size == 65536, response
        row = {
            "ms": (trio.current_time() - started) * 1000,
            "resends": resolver.resends - before[0],
            "dns_timeouts": resolver.timeouts - before[1],
            "syn_timeouts": stream._sock.stats.syn_timeouts,
        }
        await stream.aclose()
        return row

    async def new_tunnels(peer: Any, relay: Any, handshake_too: bool) -> list[dict[str, Any]]:
        """``fresh`` (timed from the session up) and ``open`` (``handshake_too``: from the
        tunnel's opening, its first handshake included)."""
        from mitm_wg.config import WireGuardConfig
        from mitm_wg.runtime import open_tunnel

        rows = []
        text = peer.client_config_text(endpoint=relay.address)
        for _ in range(args.fetches):
            config = WireGuardConfig.parse(text)
            factory = NamespaceSocketFactory(peer.client_ns)
            async with open_tunnel(config, socket_factory=factory, handshake_timeout=30) as tunnel:
                wg = tunnel.route(peer.server_tunnel_v4)
                with trio.fail_after(60):
                    if not handshake_too:
                        await tunnel.wait_session(peer.server_tunnel_v4)
                    initiations = wg.handshake_attempts_total
                    early = getattr(wg, "early_retries", 0)  # (0: a tree without the rule)
                    row = await fetch(tunnel, peer.http_port)
                row["initiations"] = wg.handshake_attempts_total - initiations
                row["early"] = getattr(wg, "early_retries", 0) - early
                rows.append(row)
            # (wireguard-go drops an initiation < 20 ms after the last with the same key)
            await trio.sleep(0.03)
        return rows

    async def pause(peer: Any, relay: Any, clock: Any) -> list[dict[str, Any]]:
        from mitm_wg.config import WireGuardConfig
        from mitm_wg.runtime import open_tunnel

        rows = []
        config = WireGuardConfig.parse(peer.client_config_text(endpoint=relay.address))
        factory = NamespaceSocketFactory(peer.client_ns)
        async with open_tunnel(config, socket_factory=factory, handshake_timeout=30) as tunnel:
            wg = tunnel.route(peer.server_tunnel_v4)
            with trio.fail_after(60):
                await fetch(tunnel, peer.http_port)  # (the first handshake: nothing measured)
            for _ in range(args.fetches):
                await trio.sleep(0.05)  # (the last fetch's close passes the relay)
                initiations = wg.handshake_attempts_total
                early = getattr(wg, "early_retries", 0)  # (0: a tree without the rule)
                clock.suspend(600.0, tunnel)
                with trio.fail_after(60):
                    row = await fetch(tunnel, peer.http_port)
                row["initiations"] = wg.handshake_attempts_total - initiations
                row["early"] = getattr(wg, "early_retries", 0) - early
                rows.append(row)
        return rows

    results: dict[str, list[dict[str, Any]]] = {}
    with exit_peer(dnsmasq=True) as peer:
        for mode in args.modes:
            with ImpairedRelay(
                peer.endpoint,
                listen=("127.0.0.1", 0),
                socket_factory=peer.client_ns.socket,
                seed=args.seed,
            ) as relay:
                relay.set_impairment(Impairment(loss=args.loss, delay=0.0005))
                if mode in ("fresh", "open"):
                    results[mode] = trio.run(new_tunnels, peer, relay, mode == "open")
                else:
                    clock = SuspendableClock()
                    results[mode] = trio.run(pause, peer, relay, clock, clock=clock)

    print()
    print(
        "| situation | mean ms | p90 | p99 | max | over 1 s | DNS resent / timed out "
        "| SYN timeouts | second initiations (early) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, rows in results.items():
        ms = sorted(r["ms"] for r in rows)

        def q(f: float, ms: list[float] = ms) -> float:
            return ms[int(f * (len(ms) - 1))]

        print(
            f"| {mode} | {statistics.mean(ms):.0f} | {q(0.9):.0f} | {q(0.99):.0f} | "
            f"{ms[-1]:.0f} | {sum(m > 1000 for m in ms)} | "
            f"{sum(r['resends'] > 0 for r in rows)} / {sum(r['dns_timeouts'] for r in rows)} | "
            f"{sum(r['syn_timeouts'] > 0 for r in rows)} | "
            f"{sum(r['initiations'] > 1 for r in rows)} ({sum(r['early'] for r in rows)}) |"
        )
    if args.json is not None:
        args.json.write_text(json.dumps({"code": str(code), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
