"""Hostname endpoints re-resolved while the tunnel runs; IPv6 endpoints end to end.

Real wireguard-go exits in namespaces (``fresh_exit_peer``: each test moves its exit). The
hostname lives in a hosts table the test controls (``open_tunnel(endpoint_lookup=...)``, the
runtime's host resolution made injectable): the host's /etc/hosts is never touched. The exit
"moves" by re-addressing its veth: a new address B is added on both sides of the link and
the old address A removed, while the same wireguard-go keeps running.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
import trio
from mitmproxy import exceptions
from mitmproxy.test import taddons
from runtime_helpers import _Reader, http_get, namespace_socket_factory, pattern_sha256

from harness import ExitPeer
from mitm_wg.config import Endpoint, WireGuardConfig
from mitm_wg.keys import encode_key, generate_private_key, public_key_of
from mitm_wg.mitmproxy import patch
from mitm_wg.mitmproxy.addon import WireGuardAddon
from mitm_wg.runtime import open_tunnel
from mitm_wg.runtime import tunnel as tunnel_module
from mitm_wg.wireguard.device import Device

NAME = "exit.wg.test"
# Deadlock guard only (the waits below are on conditions, never on time).
GUARD = 120


class Hosts:
    """A hosts file for the tunnel's endpoint lookups."""

    def __init__(self) -> None:
        self.table: dict[str, list[str]] = {}
        self.lookups: list[str] = []

    async def lookup(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.table[host])


def veth(peer: ExitPeer) -> tuple[str, str]:
    """(client side, exit side) veth names of the harness link (``{prefix}{n}v0/v1``)."""
    base = peer.ifname[: -len("wg")]
    return base + "v0", base + "v1"


def add_address_b(peer: ExitPeer) -> str:
    """A second link 10.77.N.4/30: the client gets .5, the exit .6 (returned)."""
    v0, v1 = veth(peer)
    peer.client_ns.ip("addr", "add", f"10.77.{peer.index}.5/30", "dev", v0)
    peer.ns.ip("addr", "add", f"10.77.{peer.index}.6/30", "dev", v1)
    return f"10.77.{peer.index}.6"


def remove_address_a(peer: ExitPeer) -> None:
    peer.ns.ip("addr", "del", f"{peer.endpoint[0]}/30", "dev", veth(peer)[1])


async def wait_for(predicate: Any, what: str) -> None:
    with trio.move_on_after(GUARD) as scope:
        while not predicate():
            await trio.sleep(0.05)
    assert not scope.cancelled_caught, f"gave up waiting for {what}"


async def guarded(main: Any) -> None:
    with trio.fail_after(GUARD):  # a deadlock guard, not a timing assertion
        await main()


def test_device_set_endpoint() -> None:
    device = Device(generate_private_key())
    key = public_key_of(generate_private_key())
    device.add_peer(key, endpoint=Endpoint("192.0.2.7", 51820))
    assert device.set_endpoint(key, ("198.51.100.1", 51820)) is True
    assert device.peers[key].endpoint == ("198.51.100.1", 51820)
    assert device.set_endpoint(key, ("198.51.100.1", 51820)) is False
    assert device.set_endpoint(key, ("2001:db8::1", 51820)) is True
    with pytest.raises(ValueError):
        device.set_endpoint(key, ("exit.example", 51820))  # the core never resolves names
    with pytest.raises(KeyError):
        device.set_endpoint(public_key_of(generate_private_key()), ("192.0.2.1", 1))


def test_follows_an_exit_that_moves_during_a_download(
    fresh_exit_peer: ExitPeer, caplog: pytest.LogCaptureFixture
) -> None:
    peer = fresh_exit_peer
    hosts = Hosts()
    hosts.table[NAME] = [peer.endpoint[0]]
    config = WireGuardConfig.parse(
        peer.client_config_text(dns=False, endpoint=(NAME, peer.endpoint[1]))
    )
    factory = namespace_socket_factory(peer.client_ns)
    size = 16 * 1024 * 1024

    async def main() -> None:
        async with open_tunnel(
            config,
            socket_factory=factory,
            endpoint_lookup=hosts.lookup,
            reresolve_interval=1.0,
        ) as tunnel:
            stream = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            await stream.send_all(f"GET /bytes/{size} HTTP/1.1\r\nHost: exit\r\n\r\n".encode())
            reader = _Reader(stream)
            head = await reader.read_head()
            assert b" 200 " in head.split(b"\r\n")[0]
            while len(reader.buf) < 1024 * 1024:  # mid-download; then the exit moves
                reader.buf += await stream.receive_some(65536)

            b = await trio.to_thread.run_sync(add_address_b, peer)
            await trio.to_thread.run_sync(remove_address_a, peer)
            hosts.table[NAME] = [b]  # the DNS record follows the move

            digest, _ = await reader.read_body(size, keep=False)
            assert digest == pattern_sha256(size)
            wg_peer = tunnel.device.peers[config.peers[0].public_key]
            assert wg_peer.endpoint == (b, peer.endpoint[1])
            assert (b, peer.endpoint[1]) in factory.destinations
            # Same connection, same tunnel, no restart; the exit saw us come from B's link.
            resp = await http_get(stream, "/bytes/1000")
            assert resp.sha256 == pattern_sha256(1000)
            await stream.aclose()
        stats = peer.client_stats()
        assert stats.endpoint is not None and stats.endpoint[0] == f"10.77.{peer.index}.5"

    with caplog.at_level(logging.INFO):
        trio.run(guarded, main)
    assert any(
        f"{NAME}:{peer.endpoint[1]}" in r.getMessage()
        and "periodic re-resolution" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


def test_reresolves_when_handshakes_fail(
    fresh_exit_peer: ExitPeer, caplog: pytest.LogCaptureFixture
) -> None:
    """The name first points at a dead address; no periodic re-resolution is due (an hour):
    only the failing handshake makes the runtime look the name up again."""
    peer = fresh_exit_peer
    dead = add_address_b(peer)  # .6 is the exit's new address...
    peer.ns.ip("addr", "del", f"{dead}/30", "dev", veth(peer)[1])  # ...then nobody's
    hosts = Hosts()
    hosts.table[NAME] = [dead]
    config = WireGuardConfig.parse(
        peer.client_config_text(dns=False, endpoint=(NAME, peer.endpoint[1]))
    )
    factory = namespace_socket_factory(peer.client_ns)

    async def main() -> None:
        async with open_tunnel(
            config,
            socket_factory=factory,
            endpoint_lookup=hosts.lookup,
            reresolve_interval=3600,
            handshake_timeout=60,
        ) as tunnel:
            opened = trio.current_time()
            assert hosts.lookups == [NAME]
            hosts.table[NAME] = [peer.endpoint[0]]  # the record is fixed meanwhile
            stream = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            resp = await http_get(stream, "/bytes/100000")
            assert resp.sha256 == pattern_sha256(100000)
            await stream.aclose()
            assert (dead, peer.endpoint[1]) in factory.destinations  # it did try there first
            assert tunnel.device.peers[config.peers[0].public_key].endpoint == peer.endpoint
            # Rate-limited: at most one lookup per REKEY_TIMEOUT (5 s) while failing, beyond
            # the first one at start.
            elapsed = trio.current_time() - opened
            assert 2 <= len(hosts.lookups) <= 2 + elapsed // 5, (hosts.lookups, elapsed)

    with caplog.at_level(logging.INFO):
        trio.run(guarded, main)
    assert any("handshakes with it are failing" in r.getMessage() for r in caplog.records)


def test_ipv6_literal_endpoint(fresh_exit_peer: ExitPeer) -> None:
    peer = fresh_exit_peer
    assert peer.endpoint_v6 is not None
    config = WireGuardConfig.parse(peer.client_config_text(dns=False, endpoint=peer.endpoint_v6))
    assert f"Endpoint = [{peer.endpoint_v6[0]}]:{peer.endpoint_v6[1]}" in config_text(peer)
    factory = namespace_socket_factory(peer.client_ns)

    async def main() -> None:
        async with open_tunnel(config, socket_factory=factory) as tunnel:
            assert set(tunnel._sockets) == {socket.AF_INET6}
            for host in (peer.server_tunnel_v4, peer.server_tunnel_v6):
                assert host is not None
                stream = await tunnel.open_tcp_stream(host, peer.http_port)
                resp = await http_get(stream, "/bytes/200000")
                assert resp.sha256 == pattern_sha256(200000)
                await stream.aclose()
        assert factory.destinations == {peer.endpoint_v6}

    trio.run(guarded, main)
    stats = peer.client_stats()
    assert stats.endpoint is not None and stats.endpoint[0] == f"fd00:77:{peer.index}::1"


def config_text(peer: ExitPeer) -> str:
    assert peer.endpoint_v6 is not None
    return peer.client_config_text(dns=False, endpoint=peer.endpoint_v6)


@pytest.mark.parametrize("buffer", ["lab", "stock"])
def test_follows_a_move_from_ipv4_to_ipv6(
    fresh_exit_peer: ExitPeer, monkeypatch: pytest.MonkeyPatch, buffer: str
) -> None:
    """The name moves from the exit's IPv4 address to its IPv6 one: the tunnel opens an IPv6
    socket and follows, the old address gone. With a stock kernel's buffer limit (an
    unprivileged process's 416 KiB: ``tunnel.BUFFER_LIMIT``) each family's socket is a
    receive group of 8 (mitm_wg/runtime/sockgroup.py), the IPv6 one opened by the move."""
    if buffer == "stock":
        monkeypatch.setattr(tunnel_module, "BUFFER_LIMIT", 212992)
        monkeypatch.setattr(tunnel_module, "_small_buffer_said", True)  # (said elsewhere)
    peer = fresh_exit_peer
    assert peer.endpoint_v6 is not None
    hosts = Hosts()
    hosts.table[NAME] = [peer.endpoint[0]]
    config = WireGuardConfig.parse(
        peer.client_config_text(dns=False, endpoint=(NAME, peer.endpoint[1]))
    )
    factory = namespace_socket_factory(peer.client_ns)
    key = config.peers[0].public_key

    async def main() -> None:
        async with open_tunnel(
            config, socket_factory=factory, endpoint_lookup=hosts.lookup, reresolve_interval=1.0
        ) as tunnel:
            assert set(tunnel._sockets) == {socket.AF_INET}
            stream = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            assert (await http_get(stream, "/bytes/1000")).sha256 == pattern_sha256(1000)

            hosts.table[NAME] = [peer.endpoint_v6[0]]
            await wait_for(
                lambda: tunnel.device.peers[key].endpoint == peer.endpoint_v6, "the IPv6 endpoint"
            )
            await trio.to_thread.run_sync(remove_address_a, peer)
            assert set(tunnel._sockets) == {socket.AF_INET, socket.AF_INET6}
            resp = await http_get(stream, "/bytes/300000")  # the same connection goes on
            assert resp.sha256 == pattern_sha256(300000)
            await stream.aclose()
            groups = {s.family: len(tunnel._groups.get(s, [s])) for s in tunnel._sockets.values()}
            size = 8 if buffer == "stock" else 1
            assert groups == {socket.AF_INET: size, socket.AF_INET6: size}
        assert peer.endpoint_v6 in factory.destinations

    trio.run(guarded, main)
    stats = peer.client_stats()
    assert stats.endpoint is not None and stats.endpoint[0] == f"fd00:77:{peer.index}::1"


def test_addon_option_sets_the_reresolve_interval(tmp_path: Path) -> None:
    """``wg_reresolve`` reaches the runtime's refresher (a hostname endpoint on loopback;
    nothing is sent: tunnels handshake on demand)."""
    conf = tmp_path / "h.conf"
    key = encode_key(generate_private_key())
    peer_key = encode_key(public_key_of(generate_private_key()))
    conf.write_text(
        f"[Interface]\nPrivateKey = {key}\nAddress = 10.9.0.2/32\n\n"
        f"[Peer]\nPublicKey = {peer_key}\nAllowedIPs = 10.9.0.0/24\nEndpoint = localhost:9\n"
    )

    async def main() -> None:
        addon = WireGuardAddon()
        with taddons.context(addon) as tctx:
            with pytest.raises(exceptions.OptionsError, match="wg_reresolve"):
                tctx.configure(addon, wg_reresolve=0)
            tctx.configure(addon, wg_conf=[str(conf)], wg_reresolve=60)
            await addon.running()
            bridge = addon.bridge
            assert bridge is not None and bridge.tunnels["h"].state == "up"

            def interval() -> float:
                refresher = bridge._tunnels["h"].tunnel.endpoint_refresher
                return refresher.interval

            assert await bridge.run_in_trio(interval) == 60.0
            addon.done()
            await bridge.aclose()
        patch.uninstall()

    asyncio.run(main())


def test_lookup_failures_keep_the_old_address(caplog: pytest.LogCaptureFixture) -> None:
    """No peer needed (nothing is sent): a name that stops resolving, or resolves to
    garbage, leaves the endpoint as it was and the tunnel running; a new address is taken."""
    hosts = Hosts()
    hosts.table[NAME] = ["127.0.0.1"]
    key = encode_key(generate_private_key())
    peer_key = public_key_of(generate_private_key())
    config = WireGuardConfig.parse(
        f"[Interface]\nPrivateKey = {key}\nAddress = 10.9.0.2/32\n\n"
        f"[Peer]\nPublicKey = {encode_key(peer_key)}\nAllowedIPs = 10.9.0.0/24\n"
        f"Endpoint = {NAME}:9\n"
    )

    async def main() -> None:
        async with open_tunnel(
            config, endpoint_lookup=hosts.lookup, reresolve_interval=0.5
        ) as tunnel:
            refresher = tunnel.endpoint_refresher
            assert refresher is not None
            peer = tunnel.device.peers[peer_key]
            for broken in ([], ["not-an-address"]):
                if broken:
                    hosts.table[NAME] = broken
                else:
                    del hosts.table[NAME]
                seen = refresher.lookups
                await wait_for(lambda s=seen: refresher.lookups >= s + 2, "two more lookups")
                assert peer.endpoint == ("127.0.0.1", 9)
            hosts.table[NAME] = ["127.0.0.2"]
            await wait_for(lambda: peer.endpoint == ("127.0.0.2", 9), "the new address")

    with caplog.at_level(logging.WARNING):
        trio.run(guarded, main)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("cannot resolve" in m and "keeping the old address" in m for m in warnings)
    assert any("not-an-address" in m for m in warnings), warnings
