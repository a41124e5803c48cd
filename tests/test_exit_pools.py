"""Exit pools (``wg_pool``): policies, health, fail closed — against three wireguard-go exits.

Topology: three exit peers (tests/harness) and one *origin* namespace joined to each exit's
namespace by a veth link; each exit forwards from its tunnel to the origin, which answers
every HTTP request with the source address it sees. The addon runs in mitmproxy's test
context with real tunnels (UDP sockets in each exit's client namespace), so the origin sees
10.78.N.2, the tunnel address of the exit the pool chose.
"""

from __future__ import annotations

import asyncio
import logging
import random
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from mitmproxy import exceptions
from mitmproxy.connection import Server
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons, tflow

from harness import ExitPeer, Netns, cleanup_stale, exit_peer, origin_behind, source_echo
from mitm_wg.mitmproxy import patch
from mitm_wg.mitmproxy.addon import WireGuardAddon
from mitm_wg.mitmproxy.pools import Pool, PoolError, PoolHealth, parse_pool_option
from mitm_wg.mitmproxy.routing import METADATA_KEY, use_tunnel
from tests.runtime_helpers import real_tunnels

ORIGINS = [f"10.99.0.{i}" for i in range(1, 7)]
ORIGIN_PORT = 80
# -- unit ------------------------------------------------------------------------------------


def test_parse_pool_option() -> None:
    pools = parse_pool_option(["p=round-robin:a,b,c", "s = sticky : b , c"], ["a", "b", "c"])
    assert pools["p"].members == ("a", "b", "c") and pools["p"].policy == "round-robin"
    assert pools["s"].members == ("b", "c") and pools["s"].policy == "sticky"
    for bad, match in [
        ("p", "expected NAME=POLICY"),
        ("p=fastest:a", "unknown policy 'fastest'"),
        ("p=random:", "no tunnels"),
        ("p=random:a,a", "listed twice"),
        ("p=random:a,x", "'x' not in wg_conf"),
        ("a=random:b", "a tunnel has that name"),
    ]:
        with pytest.raises(PoolError, match=match):
            parse_pool_option([bad], ["a", "b", "c"])


def test_policies_and_health() -> None:
    now = [0.0]
    health = PoolHealth(retry_after=10, clock=lambda: now[0])
    rr = Pool("p", "round-robin", ("a", "b", "c"))
    assert [rr.pick("h", health.reason) for _ in range(4)] == ["a", "b", "c", "a"]
    health.mark_down("b", "peer silent")
    assert [rr.pick("h", health.reason) for _ in range(4)] == ["c", "c", "a", "c"]
    sticky = Pool("s", "sticky", ("a", "b", "c"))
    assert len({sticky.pick("x.example", health.reason) for _ in range(5)}) == 1
    picks = {h: sticky.pick(h, health.reason) for h in (f"h{i}.example" for i in range(30))}
    assert set(picks.values()) == {"a", "c"}  # b is out; hosts spread over the rest
    rnd = Pool("r", "random", ("a", "b", "c"), random.Random(3))
    assert set(rnd.pick("h", health.reason) for _ in range(50)) == {"a", "c"}
    health.mark_down("a", "down")
    health.mark_down("c", "down")
    with pytest.raises(OSError, match=r"every tunnel of exit pool 'p' is down \(a: down; b: peer"):
        rr.pick("h", health.reason)
    now[0] = 10.0  # retry time: on trial again
    assert rr.pick("h", health.reason) in {"a", "b", "c"}
    health.mark_up("a")
    assert "a" not in health.down


# -- end to end ------------------------------------------------------------------------------


@pytest.fixture
def pool_setup(netns_available: None) -> Iterator[tuple[list[ExitPeer], Netns]]:
    cleanup_stale("mwgpo")
    with ExitStack() as stack:
        exits = [stack.enter_context(exit_peer(name_prefix="mwgpl")) for _ in range(3)]
        origin = stack.enter_context(origin_behind(exits, "mwgpo", ORIGINS))
        source_echo(origin)
        yield exits, origin


@pytest.fixture(autouse=True)
def _clean_patch() -> Iterator[None]:
    yield
    patch.uninstall()


async def source_seen(addon: WireGuardAddon, host: str, route: str | None = None) -> str:
    """GET from the origin; returns the source address the origin saw."""
    server = Server(address=(host, ORIGIN_PORT))
    if route is not None:
        use_tunnel(server, route)
    return await source_seen_server(addon, server)


def test_three_exit_pool(
    pool_setup: tuple[list[ExitPeer], Netns], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exits, _ = pool_setup
    names = ["a", "b", "c"]
    confs = []
    for name, e in zip(names, exits, strict=True):
        path = tmp_path / f"{name}.conf"
        path.write_text(e.client_config_text(allowed_ips="10.99.0.0/24", dns=False))
        confs.append(f"{name}={path}")
    source = {name: e.client_tunnel_v4 for name, e in zip(names, exits, strict=True)}
    member_of = {v: k for k, v in source.items()}

    async def main() -> None:
        addon = WireGuardAddon(open_tunnel=real_tunnels(exits, handshake_timeout=3))
        with caplog.at_level(logging.INFO), taddons.context(addon) as tctx:
            with pytest.raises(exceptions.OptionsError, match="'x' not in wg_conf"):
                tctx.configure(addon, wg_conf=confs, wg_pool=["p=round-robin:a,x"])

            # Every member down (exits silent): fail closed, never direct.
            for e in exits:
                e.stop_wireguard()
            tctx.configure(addon, wg_conf=confs, wg_pool=["p=round-robin:a,b,c"], wg_pool_retry=600)
            await addon.running()
            for _ in range(2):  # the second fails at once: every member is out
                with pytest.raises(OSError, match="every tunnel of exit pool 'p' is down"):
                    await source_seen(addon, ORIGINS[0])
            assert addon.stats["direct"] == 0 and addon.stats["tunnel"] == 0
            text = addon.pools_status()
            assert text.startswith("pool p (round-robin): a (out: ") and "c (out: " in text
            messages = [r.getMessage() for r in caplog.records]
            for name in names:
                assert any(
                    f"tunnel {name!r} taken out of its exit pool(s)" in m
                    and "did not answer the handshake" in m
                    for m in messages
                ), messages

            # a and b come back (retried after wg_pool_retry); c stays silent.
            exits[0].start_wireguard()
            exits[1].start_wireguard()
            tctx.configure(addon, wg_pool_retry=1)
            await asyncio.sleep(1.1)  # at least the retry delay (a lower bound, not a timing)
            seen = [await source_seen(addon, ORIGINS[0]) for _ in range(6)]
            assert set(seen) == {source["a"], source["b"]}, seen

            # c comes back too: round-robin spreads evenly over the three.
            exits[2].start_wireguard()
            await asyncio.sleep(1.1)
            # (c's handshake has been retried every REKEY_TIMEOUT since the start, and its
            # trial below waits 3 s: only once the next retry has reached the restarted exit
            # is its answer sure to come within them, whatever the retries' phase)
            for _ in range(100):
                if exits[2].client_stats().latest_handshake:
                    break
                await asyncio.sleep(0.1)
            await source_seen(addon, ORIGINS[0], "c")  # c's trial, chosen by name
            seen = [await source_seen(addon, ORIGINS[0]) for _ in range(6)]
            assert Counter(seen) == {source[n]: 2 for n in names}, seen
            assert all(seen[i] != seen[i + 1] for i in range(5)), seen
            assert any(
                "tunnel 'c' is back in its exit pool(s)" in r.getMessage() for r in caplog.records
            )

            assert addon.pools_status() == "pool p (round-robin): a (up), b (up), c (up)"

            # sticky per host (by name from a script), random (by flow.metadata).
            tctx.configure(
                addon,
                wg_pool=["p=round-robin:a,b,c", "s=sticky:a,b,c", "r=random:a,b,c"],
            )
            expected = {h: source[names[zlib.crc32(h.encode()) % 3]] for h in ORIGINS}
            assert len(set(expected.values())) >= 2  # these hosts do spread
            for host in ORIGINS:
                for _ in range(2):
                    assert await source_seen(addon, host, "s") == expected[host], host

            addon.pools["r"].rng = random.Random(5)
            mirror = random.Random(5)
            seen = []
            for _ in range(9):
                flow = tflow.tflow()
                flow.request.host, flow.request.port = ORIGINS[0], ORIGIN_PORT
                addon.requestheaders(flow)
                flow.metadata[METADATA_KEY] = "r"
                server = Server(address=(ORIGINS[0], ORIGIN_PORT))
                addon.server_connect(
                    server_hooks.ServerConnectionHookData(server, flow.client_conn)
                )
                seen.append(await source_seen_server(addon, server))
            assert [member_of[s] for s in seen] == [names[mirror.randrange(3)] for _ in range(9)]
            assert len(set(seen)) == 3

            # c's exit dies while our side still holds its session: a connection that picks
            # c times out, the tunnel's unanswered handshake shows it is the exit (not the
            # destination), c leaves the pool and the connection goes through another.
            exits[2].stop_wireguard()
            seen = [await source_seen(addon, ORIGINS[0]) for _ in range(3)]
            assert set(seen) <= {source["a"], source["b"]}, seen
            assert "c (out: WireGuard peer" in addon.pools_status()
            assert any(
                "tunnel 'c' taken out" in r.getMessage() and "has not answered" in r.getMessage()
                for r in caplog.records
            )
            addon.done()
            if addon.bridge is not None:
                await addon.bridge.aclose()

    asyncio.run(main())


async def source_seen_server(addon: WireGuardAddon, server: Server) -> str:
    host, port = server.address  # type: ignore[misc]
    reader, writer = await addon.open_tcp(server, host, port, None)
    writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0], data
    return body.decode()
