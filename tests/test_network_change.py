"""A laptop that changes networks mid-transfer, against wireguard-go + Linux.

Its Wi-Fi drops in the middle of a download or an upload; for a few seconds it has no route
to the exit at all (our UDP sends fail, TCP's retransmissions and the tunnel's path pings
go nowhere), then it is on Ethernet with another address; or the Ethernet was up beside it
all along, and the kernel switches without a failed send. Nothing is told to anyone: the
exit learns our new address from our next authenticated packet (WireGuard's roaming), and
the transfer must go on, byte-exact, on the same connection — and the outage must not be
taken for an MTU black hole (``Tunnel._sent_into_hole``, the receiver's stall signs):
nothing, not even a small packet, came through during it, so the tunnel keeps its full
packet size (a wrong verdict cost ten minutes of 1200-byte packets and a warning).
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from harness import ExitPeer
from mitm_wg.config import WireGuardConfig
from mitm_wg.runtime import Tunnel, open_tunnel
from tests.runtime_helpers import (
    NamespaceSocketFactory,
    http_get,
    http_post_json,
    pattern_sha256,
)

MB = 1024 * 1024


@asynccontextmanager
async def laptop_on_wifi(
    peer: ExitPeer, *, ethernet_standby: bool = False
) -> AsyncIterator[tuple[Tunnel, Any]]:
    """Our tunnel in ``peer.client_ns`` (its veth to the exit: the Wi-Fi); yields it and an
    async ``change_network(outage)``: the Wi-Fi goes down, and ``outage`` seconds later an
    Ethernet link (a new veth pair, 10.75.N.1/30 on our side) carries the way to the exit's
    unchanged endpoint. With ``ethernet_standby`` the Ethernet link is up from the start,
    its route to the exit less preferred (metric 100) than the Wi-Fi's: when the Wi-Fi goes
    down (``change_network(None)``), the kernel sends the next datagram that way at once,
    from the new address, and no send fails. The Ethernet link is deleted at the end."""
    n = peer.index
    prefix = peer.ifname[: -len(f"{n}wg")]
    wifi, eth, eth_exit = f"{prefix}{n}v0", f"{prefix}{n}w0", f"{prefix}{n}w1"
    client = peer.client_ns
    cut = f"{prefix}{n}cut"
    changed: list[str] = []

    def ethernet_up(route: tuple[str, ...]) -> None:
        subprocess.run(
            ["ip", "link", "add", eth, "netns", client.name, "type", "veth",
             "peer", "name", eth_exit, "netns", peer.ns.name],
            check=True, capture_output=True, timeout=20,
        )  # fmt: skip
        changed.append(eth)
        client.ip("addr", "add", f"10.75.{n}.1/30", "dev", eth)
        peer.ns.ip("addr", "add", f"10.75.{n}.2/30", "dev", eth_exit)
        client.ip("link", "set", eth, "up")
        peer.ns.ip("link", "set", eth_exit, "up")
        client.ip("route", "add", route[0], "via", f"10.75.{n}.2", *route[1:])

    async def change_network(outage: float | None) -> None:
        if outage is None:
            # A clean cut: what the exit sends to our Wi-Fi address from now on vanishes
            # (an nftables rule on its output), while what was on its way arrives and is
            # acknowledged over the Wi-Fi; then the Wi-Fi goes. Nothing is left that we
            # would answer over the Ethernet.
            drop = f"ip daddr 10.77.{n}.1 udp sport {peer.endpoint[1]} drop"
            chain = f"{{ type filter hook output priority 0; policy accept; {drop}; }}"
            await trio.to_thread.run_sync(
                peer.ns.exec, ["nft", f"table inet {cut} {{ chain out {chain}; }}"]
            )
            changed.append(cut)
            await trio.sleep(0.2)
        await trio.to_thread.run_sync(client.ip, "link", "set", wifi, "down")
        if outage is None:
            await trio.to_thread.run_sync(peer.ns.exec, ["nft", "delete", "table", "inet", cut])
            changed.remove(cut)
        else:
            await trio.sleep(outage)
            await trio.to_thread.run_sync(ethernet_up, (f"{peer.endpoint[0]}/32",))

    if ethernet_standby:
        ethernet_up((f"10.77.{n}.0/30", "metric", "100"))
    config = WireGuardConfig.parse(peer.client_config_text(dns=False))
    try:
        async with open_tunnel(
            config, socket_factory=NamespaceSocketFactory(client), handshake_timeout=10.0
        ) as tunnel:
            yield tunnel, change_network
    finally:
        if eth in changed:  # (one end deleted takes the pair at once; a namespace's, later)
            client.ip("link", "del", eth)
        if cut in changed:
            peer.ns.exec(["nft", "delete", "table", "inet", cut], check=False)


@pytest.mark.parametrize("direction", ["download", "upload"])
async def test_a_network_change_mid_transfer(fresh_exit_peer: ExitPeer, direction: str) -> None:
    """The Wi-Fi drops 4.5 s mid-transfer, then Ethernet. While no route is left our
    sends fail (ENETUNREACH), and the tunnel tries the exit with a keepalive every 0.5 s;
    the first that leaves tells the exit our new address at once, and our connections
    waiting out a backed-off retransmission timer retransmit then. (A download may send
    nothing meanwhile; then the tunnel's look at the local address its datagrams to the
    exit leave from, once a second, does the same when there is one again.) Before, a
    download resumed ~30 s after the link was back: the exit's TCP retransmitted into our
    old address until WireGuard's 15 s rule (our last ACKs unanswered) made us handshake,
    and then waited out its own backoff; now the exit's next timeout after the keepalive
    gets through (its timeouts ~3.0 and 6.2 s after the outage began).
    An upload waited for our own next timeout (6.2 s); now it goes on within half a
    second of the link, before another timeout."""
    peer = fresh_exit_peer
    size = 24 * MB
    async with laptop_on_wifi(peer) as (tunnel, change_network):
        with trio.fail_after(90):
            stream = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            sock = stream._sock
            seen: dict[str, Any] = {}
            done = trio.Event()

            async def change_mid_transfer() -> None:
                stats = sock.stats

                def moved() -> int:
                    return stats.segments_in if direction == "download" else stats.segments_out

                while moved() < 3000:
                    await trio.sleep(0.002)
                await change_network(4.5)
                back, before, seen["rtos"] = trio.current_time(), moved(), stats.rto_expired
                while moved() < before + 100 and not done.is_set():
                    await trio.sleep(0.01)
                seen["resumed"] = trio.current_time() - back
                seen["rtos when resumed"] = stats.rto_expired
                seen["resumed on"] = moved() >= before + 100

            async with trio.open_nursery() as nursery:
                nursery.start_soon(change_mid_transfer)
                if direction == "download":
                    resp = await http_get(stream, f"/bytes/{size}")
                    assert (resp.status, resp.size) == (200, size)
                    assert resp.sha256 == pattern_sha256(size)
                else:
                    answer = await http_post_json(stream, "/up", size)
                    assert answer == {"sha256": pattern_sha256(size), "size": size}
                done.set()
            assert seen["resumed on"], "the transfer ended before it had to go on"
            await stream.aclose()
            if direction == "upload":  # (its retransmissions found no route)
                assert tunnel.send_errors > 0 and tunnel.paths_back == 1
            # told the exit once: the retries, or (a download that sent nothing while no
            # route was left) the look at the address its datagrams leave from
            assert tunnel.paths_back + tunnel.sources_changed == 1
            # the exit follows us to the new address (WireGuard's roaming)
            endpoint = peer.client_stats().endpoint
            assert endpoint is not None and endpoint[0] == f"10.75.{peer.index}.1"
            if direction == "download":
                # (the exit's next timeout: 2.0–2.3 s in two runs; ~30 s before, and a rekey)
                assert seen["resumed"] < 10, seen
            else:
                # our connection retransmitted as the way was back, not at a timeout
                assert seen["rtos when resumed"] == seen["rtos"], seen
            # the outage was no black hole: full-sized packets all along
            assert tunnel.narrowed() == ()
            # and a new connection works at once
            stream = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            resp = await http_get(stream, "/bytes/65536")
            assert resp.sha256 == pattern_sha256(65536)
            await stream.aclose()


async def test_a_switch_to_a_standby_network_mid_download(fresh_exit_peer: ExitPeer) -> None:
    """The laptop is on Wi-Fi and Ethernet; the Wi-Fi drops mid-download, cleanly: nothing
    the exit sent is still on its way. The kernel routes our next datagram over the
    Ethernet, from its address (no send fails), but a downloading receiver that gets
    nothing has nothing to send, and the exit sends into the old address: the download
    stood still ~27 s, until WireGuard's 15 s rule handshook and the exit's TCP's next
    timeout after that. (When data still arrives after the switch, our ACKs of it tell the
    exit at once.) Now the tunnel sees within a second that datagrams to the exit leave
    from another address, and tells the exit with a keepalive: the download goes on at the
    exit's next timeout (~1.4 s after the cut). Nothing is taken for an outage or a black
    hole."""
    peer = fresh_exit_peer
    size = 24 * MB
    async with laptop_on_wifi(peer, ethernet_standby=True) as (tunnel, change_network):
        with trio.fail_after(90):
            stream = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            stats = stream._sock.stats
            seen: dict[str, Any] = {}
            done = trio.Event()

            async def change_mid_download() -> None:
                while stats.segments_in < 3000:
                    await trio.sleep(0.002)
                await change_network(None)
                cut, before = trio.current_time(), stats.segments_in
                while stats.segments_in < before + 100 and not done.is_set():
                    await trio.sleep(0.01)
                seen["resumed"] = trio.current_time() - cut
                seen["resumed on"] = stats.segments_in >= before + 100

            async with trio.open_nursery() as nursery:
                nursery.start_soon(change_mid_download)
                resp = await http_get(stream, f"/bytes/{size}")
                done.set()
            assert seen["resumed on"], "the download ended before the cut"
            assert (resp.status, resp.size) == (200, size)
            assert resp.sha256 == pattern_sha256(size)
            await stream.aclose()
            endpoint = peer.client_stats().endpoint
            assert endpoint is not None and endpoint[0] == f"10.75.{peer.index}.1"
            assert seen["resumed"] < 10, seen  # (~27 s before)
            assert (tunnel.send_errors, tunnel.paths_back) == (0, 0)
            assert tunnel.sources_changed == 1
            assert tunnel.narrowed() == ()
