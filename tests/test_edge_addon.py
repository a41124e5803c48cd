"""The mitm-wg addon: options, routing decisions, fail-closed behaviour, metadata, status.

Runs the addon in mitmproxy's test context with the test-side loopback dialer
(tests/loopback_addon.py: no tunnel) against asyncio servers on loopback addresses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import ipaddress
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from mitmproxy import exceptions
from mitmproxy.connection import Server
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons, tflow

from mitm_wg.config import encode_key, generate_private_key, public_key_of
from mitm_wg.errors import NoRoute
from mitm_wg.mitmproxy import patch
from mitm_wg.mitmproxy.addon import WireGuardAddon
from mitm_wg.mitmproxy.bridge import ENV_MODE
from mitm_wg.mitmproxy.routing import METADATA_KEY, use_tunnel
from tests.loopback_addon import dialer_tunnel, open_loopback_tunnel


def write_conf(path: Path, allowed: str) -> str:
    key = encode_key(generate_private_key())
    peer = encode_key(public_key_of(generate_private_key()))
    path.write_text(
        f"[Interface]\nPrivateKey = {key}\nAddress = 10.9.0.2/32\n\n"
        f"[Peer]\nPublicKey = {peer}\nAllowedIPs = {allowed}\nEndpoint = 127.0.0.1:9\n"
    )
    return str(path)


@pytest.fixture
def confs(tmp_path: Path) -> dict[str, str]:
    return {
        "one": write_conf(tmp_path / "one.conf", "127.0.0.1/32"),
        "wide": write_conf(tmp_path / "wide.conf", "127.0.0.0/8"),
        "narrow": write_conf(tmp_path / "narrow.conf", "127.0.0.1/32"),
    }


@pytest.fixture(autouse=True)
def _clean_patch() -> Iterator[None]:
    yield
    patch.uninstall()


def loopback_addon() -> WireGuardAddon:
    return WireGuardAddon(open_tunnel=open_loopback_tunnel)


async def echo_server(host: str) -> tuple[asyncio.Server, int]:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    server = await asyncio.start_server(handle, host, 0)
    return server, server.sockets[0].getsockname()[1]


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"hello")
    assert await reader.readexactly(5) == b"hello"
    writer.close()


def test_without_wg_conf_nothing_changes(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        addon = WireGuardAddon()
        with caplog.at_level(logging.INFO), taddons.context(addon) as tctx:
            tctx.configure(addon, wg_conf=[])
            await addon.running()
            assert not patch.is_installed()
            assert addon.bridge is None
            assert "changes nothing" in addon.status()
            addon.done()
        assert "--set wg_conf=" in caplog.text

    asyncio.run(main())


def test_the_shipped_addon_has_no_test_dialer() -> None:
    # The loopback dialer lives in tests/ (issue 11): the shipped addon has no option for it.
    import mitm_wg.mitmproxy.addon as shipped

    async def main() -> None:
        addon = WireGuardAddon()
        with taddons.context(addon) as tctx:
            assert {"wg_conf", "wg_allow_direct"} <= set(tctx.options.keys())
            assert not any("test" in name or "dialer" in name for name in tctx.options.keys())
            addon.done()

    asyncio.run(main())
    source = Path(shipped.__file__).read_text()
    assert "loopback" not in source.lower() and "TEST" not in source
    # Nor does any other shipped module carry a stand-in tunnel (the dial-function
    # tunnel is in tests/loopback_addon.py too).
    root = Path(shipped.__file__).parent.parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "DialerTunnel" not in text and "dialer_tunnel" not in text, path


def test_routing_table_is_the_cores_longest_prefix_table(tmp_path: Path) -> None:
    # One routing table type for the core and the edge (issue 11): the addon routes tunnel
    # names with wireguard.allowed_ips.AllowedIPs.
    from mitm_wg.config import WireGuardConfig
    from mitm_wg.mitmproxy.addon import tunnel_routes
    from mitm_wg.wireguard.allowed_ips import AllowedIPs

    configs = {
        "a": WireGuardConfig.from_file(
            write_conf(tmp_path / "a.conf", "10.0.0.0/8, 2001:db8::/32")
        ),
        "b": WireGuardConfig.from_file(write_conf(tmp_path / "b.conf", "10.1.0.0/16, ::/0")),
        "c": WireGuardConfig.from_file(write_conf(tmp_path / "c.conf", "10.1.0.0/16")),
    }
    routes = tunnel_routes(configs)
    assert isinstance(routes, AllowedIPs)
    lookup = routes.lookup_ip
    assert lookup(ipaddress.ip_address("10.2.3.4")) == "a"
    assert lookup(ipaddress.ip_address("10.1.3.4")) == "b"  # same prefix in b and c: first wins
    assert lookup(ipaddress.ip_address("2001:db8::1")) == "a"  # longer than b's ::/0
    assert lookup(ipaddress.ip_address("2001:db9::1")) == "b"
    assert lookup(ipaddress.ip_address("192.0.2.1")) is None

    addon = WireGuardAddon()
    addon.configs, addon._routes = configs, routes
    assert addon.route_for_address("10.1.0.1") == "b"
    assert addon.route_for_address("fe80::1%eth0") == "b"
    assert addon.route_for_address("example.com") == "a"  # hostnames: the first tunnel


def test_bad_config_is_an_option_error(tmp_path: Path, confs: dict[str, str]) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("[Interface]\nPrivateKey = nope\n")

    async def main() -> None:
        addon = WireGuardAddon()
        with taddons.context(addon) as tctx:
            with pytest.raises(exceptions.OptionsError, match=r"bad\.conf"):
                tctx.configure(addon, wg_conf=[str(bad)])
            with pytest.raises(exceptions.OptionsError, match="two tunnels named"):
                tctx.configure(addon, wg_conf=[f"x={confs['one']}", f"x={confs['wide']}"])
            addon.done()

    asyncio.run(main())


def test_two_tunnels_with_one_identity_are_refused(tmp_path: Path) -> None:
    """The same PrivateKey with the same peer in two tunnels: one client to that peer, so the
    two would break each other's sessions and endpoint; refused, naming both tunnels and
    files and the peer, never the key. One key with two different peers is fine (a VPN
    provider's key serves all its servers)."""
    one = tmp_path / "one.conf"
    write_conf(one, "10.0.0.0/8")
    text = one.read_text()
    twin = tmp_path / "twin.conf"
    twin.write_text(text.replace("10.0.0.0/8", "10.1.0.0/16"))
    other_peer = tmp_path / "other.conf"
    peer_line = next(line for line in text.splitlines() if line.startswith("PublicKey"))
    other_key = encode_key(public_key_of(generate_private_key()))
    other_peer.write_text(text.replace(peer_line, f"PublicKey = {other_key}"))
    private_b64 = (
        next(line for line in text.splitlines() if line.startswith("PrivateKey"))
        .partition("=")[2]
        .strip()
    )

    async def main() -> None:
        addon = WireGuardAddon()
        with taddons.context(addon) as tctx:
            with pytest.raises(exceptions.OptionsError) as info:
                tctx.configure(addon, wg_conf=[f"a={one}", f"b={twin}"])
            message = str(info.value)
            assert "'a'" in message and "'b'" in message
            assert str(one) in message and str(twin) in message
            assert peer_line.partition("=")[2].strip() in message
            assert private_b64 not in message
            assert "own key" in message
            # the same file twice under two names: the same refusal
            with pytest.raises(exceptions.OptionsError, match="same PrivateKey"):
                tctx.configure(addon, wg_conf=[f"a={one}", f"c={one}"])
            # one key, two different peers: accepted
            tctx.configure(addon, wg_conf=[f"a={one}", f"d={other_peer}"])
            assert list(addon.configs) == ["a", "d"]
            addon.done()

    asyncio.run(main())


def test_routing_through_the_tunnel_and_fail_closed(
    confs: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        srv1, port1 = await echo_server("127.0.0.1")
        srv2, _port2 = await echo_server("127.0.0.2")
        addon = loopback_addon()
        with caplog.at_level(logging.INFO), taddons.context(addon) as tctx:
            tctx.configure(addon, wg_conf=[confs["wide"], confs["narrow"]])
            await addon.running()
            assert patch.is_installed()
            # Longest AllowedIPs match wins across configs; hostnames use the first tunnel.
            assert addon.route_for_address("127.0.0.1") == "narrow"
            assert addon.route_for_address("127.0.0.2") == "wide"
            assert addon.route_for_address("192.0.2.1") is None
            assert addon.route_for_address("localhost") == "wide"

            server = Server(address=("127.0.0.1", port1))
            reader, writer = await addon.open_tcp(server, "127.0.0.1", port1, None)
            assert writer.get_extra_info("wg_tunnel") == "narrow"
            await roundtrip(reader, writer)

            flow = tflow.tflow(resp=True)
            flow.server_conn = server
            addon.response(flow)
            assert flow.metadata["wg"]["tunnel"] == "narrow"
            assert flow.metadata["wg"]["remote"] == f"127.0.0.1:{port1}"

            # Outside every AllowedIPs: refused, never direct.
            with pytest.raises(OSError, match="outside the AllowedIPs") as info:
                await addon.open_tcp(Server(address=("192.0.2.1", 80)), "192.0.2.1", 80, None)
            assert info.value.errno == errno.ENETUNREACH
            assert addon.stats == {"tunnel": 1, "direct": 0, "refused": 1}
            assert "through tunnel 'narrow'" in caplog.text

            # The test dialer itself refuses non-loopback destinations.
            forced = Server(address=("192.0.2.1", 80))
            use_tunnel(forced, "wide")  # skips the AllowedIPs check
            with pytest.raises(OSError, match="refusing non-loopback"):
                await addon.open_tcp(forced, "192.0.2.1", 80, None)
            addon.done()
            assert not patch.is_installed()
        for srv in (srv1, srv2):
            srv.close()

    asyncio.run(main())


def test_allow_direct_outside_allowed_ips(confs: dict[str, str]) -> None:
    async def main() -> None:
        srv, port = await echo_server("127.0.0.2")
        addon = loopback_addon()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, wg_conf=[confs["one"]], wg_allow_direct=True)
            await addon.running()
            server = Server(address=("127.0.0.2", port))
            reader, writer = await addon.open_tcp(server, "127.0.0.2", port, None)
            assert writer.get_extra_info("wg_tunnel") is None  # a real socket
            await roundtrip(reader, writer)
            flow = tflow.tflow(resp=True)
            flow.server_conn = server
            addon.response(flow)
            assert flow.metadata["wg"] == {
                "tunnel": False,
                "reason": "outside every AllowedIPs (wg_allow_direct)",
            }
            assert addon.stats["direct"] == 1
            addon.done()
        srv.close()

    asyncio.run(main())


def test_direct_fallback_is_decided_by_the_no_route_type(confs: dict[str, str]) -> None:
    # wg_allow_direct falls back only for the NoRoute type the runtime raises, never because
    # an error's text mentions AllowedIPs (issue 11).
    failure: list[OSError] = []

    async def dial(host: str, port: int) -> trio.abc.HalfCloseableStream:
        raise failure[-1]

    async def main() -> None:
        srv, port = await echo_server("127.0.0.1")
        addon = WireGuardAddon(open_tunnel=lambda config: dialer_tunnel(dial)())
        with taddons.context(addon) as tctx:
            tctx.configure(addon, wg_conf=[confs["one"]], wg_allow_direct=True)
            await addon.running()
            failure.append(NoRoute(errno.ENETUNREACH, "127.0.0.1 is outside AllowedIPs"))
            server = Server(address=("127.0.0.1", port))
            reader, writer = await addon.open_tcp(server, "127.0.0.1", port, None)
            assert writer.get_extra_info("wg_tunnel") is None  # direct, as allowed
            await roundtrip(reader, writer)
            assert addon.stats == {"tunnel": 0, "direct": 1, "refused": 0}

            failure.append(OSError(errno.ENETUNREACH, "not in any WireGuard peer's AllowedIPs"))
            with pytest.raises(OSError, match="AllowedIPs") as info:
                await addon.open_tcp(None, "127.0.0.1", port, None)
            assert not isinstance(info.value, NoRoute)
            assert addon.stats == {"tunnel": 0, "direct": 1, "refused": 1}

            tctx.configure(addon, wg_allow_direct=False)
            failure.append(NoRoute(errno.ENETUNREACH, "127.0.0.1 is outside AllowedIPs"))
            with pytest.raises(NoRoute):
                await addon.open_tcp(None, "127.0.0.1", port, None)
            assert addon.stats == {"tunnel": 0, "direct": 1, "refused": 2}
            addon.done()
        srv.close()

    asyncio.run(main())


def test_scripts_choose_the_tunnel(confs: dict[str, str]) -> None:
    async def main() -> None:
        srv, port = await echo_server("127.0.0.1")
        addon = loopback_addon()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, wg_conf=[confs["wide"], confs["narrow"]])
            await addon.running()

            # use_tunnel() in server_connect
            server = Server(address=("127.0.0.1", port))
            use_tunnel(server, "wide")
            reader, writer = await addon.open_tcp(server, "127.0.0.1", port, None)
            assert writer.get_extra_info("wg_tunnel") == "wide"
            await roundtrip(reader, writer)

            server = Server(address=("127.0.0.1", port))
            use_tunnel(server, "nope")
            with pytest.raises(OSError, match=r"'nope'.*'wide', 'narrow'"):
                await addon.open_tcp(server, "127.0.0.1", port, None)

            server = Server(address=("127.0.0.1", port))
            use_tunnel(server, False)
            reader, writer = await addon.open_tcp(server, "127.0.0.1", port, None)
            assert writer.get_extra_info("wg_tunnel") is None
            await roundtrip(reader, writer)

            with pytest.raises(TypeError):
                use_tunnel(server, 42)  # type: ignore[arg-type]

            # flow.metadata["wg_tunnel"] of the HTTP flow that needs the connection
            flow = tflow.tflow()
            flow.request.host, flow.request.port = "127.0.0.1", port
            addon.requestheaders(flow)
            flow.metadata[METADATA_KEY] = "wide"  # set later, by another addon's request hook
            server = Server(address=("127.0.0.1", port))
            addon.server_connect(server_hooks.ServerConnectionHookData(server, flow.client_conn))
            reader, writer = await addon.open_tcp(server, "127.0.0.1", port, None)
            assert writer.get_extra_info("wg_tunnel") == "wide"
            await roundtrip(reader, writer)
            addon.done()
        srv.close()

    asyncio.run(main())


def test_a_second_addon_instance_fails_loudly(confs: dict[str, str]) -> None:
    # The patch is process-wide: a second instance must not silently take the first one's
    # connections, nor detach it when it is unloaded (issue 11).
    async def main() -> None:
        srv, port = await echo_server("127.0.0.1")
        # (mitmproxy refuses two addons of one name in one master; a process can still
        # hold two instances: several masters, embedding, a subclass.)
        first, second = loopback_addon(), loopback_addon()
        with taddons.context(first) as tctx:
            tctx.configure(first, wg_conf=[confs["one"]])
            await first.running()
            with pytest.raises(patch.PatchError, match="loaded twice"):
                second.configure({"wg_conf"})
            assert not second.configs and second.bridge is None
            assert patch._opener is first
            second.done()  # never had the patch: leaves the first one's alone
            assert patch.is_installed() and patch._opener is first

            # A script's choice (routing._routes) is per connection, whoever opens it.
            server = Server(address=("127.0.0.1", port))
            use_tunnel(server, False)
            first.done()
            assert not patch.is_installed()
            second.configure({"wg_conf"})
            await second.running()
            assert patch._opener is second
            reader, writer = await second.open_tcp(server, "127.0.0.1", port, None)
            assert writer.get_extra_info("wg_tunnel") is None  # the direct choice held
            await roundtrip(reader, writer)
            second.done()
        srv.close()

    asyncio.run(main())


def test_udp_fails_closed(confs: dict[str, str]) -> None:
    async def main() -> None:
        addon = loopback_addon()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, wg_conf=[confs["one"]])
            await addon.running()
            # Outside every AllowedIPs: refused, never sent directly.
            outside = Server(address=("192.0.2.1", 53), transport_protocol="udp")
            with pytest.raises(OSError, match="outside the AllowedIPs") as info:
                await addon.open_udp(outside, "192.0.2.1", 53, None)
            assert info.value.errno == errno.ENETUNREACH
            # Inside, but the (test) tunnel cannot carry UDP: an error, not a direct flow.
            inside = Server(address=("127.0.0.1", 53), transport_protocol="udp")
            with pytest.raises(OSError):
                await addon.open_udp(inside, "127.0.0.1", 53, None)
            assert addon.stats["direct"] == 0
            addon.done()

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["guest", "thread"])
def test_changing_wg_conf_reconnects(
    confs: dict[str, str], mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_MODE, mode)

    async def main() -> None:
        srv, port = await echo_server("127.0.0.1")
        addon = loopback_addon()
        with taddons.context(addon) as tctx:
            tctx.configure(addon, wg_conf=[confs["one"]])
            await addon.running()
            bridge = addon.bridge
            assert bridge is not None
            reader, writer = await addon.open_tcp(None, "127.0.0.1", port, None)
            assert writer.get_extra_info("wg_tunnel") == "one"

            tctx.configure(addon, wg_conf=[f"renamed={confs['one']}"])
            # New connections wait for the new tunnel set, then use it.
            reader2, writer2 = await addon.open_tcp(None, "127.0.0.1", port, None)
            assert writer2.get_extra_info("wg_tunnel") == "renamed"
            await roundtrip(reader2, writer2)
            assert addon.bridge is bridge  # same trio run, new tunnels
            assert set(bridge.tunnels) == {"renamed"}
            with pytest.raises(ConnectionAbortedError):
                await reader.read(10)

            text = addon.status()
            assert "renamed" in text and "up" in text
            assert f"({mode})" in text
            # what a tunnel's status last said under its peers (TunnelStatus.notes: the
            # paths it narrowed, the kernel's drops at its socket): why one server is slower
            line = "path to 10.99.0.1: packets of at most 1200 bytes (a black hole …)"
            info = bridge.tunnels["renamed"]
            assert info.notes == () and line not in text
            bridge.tunnels["renamed"] = dataclasses.replace(info, notes=(line,))
            assert addon.status().endswith(f"\n    {line}")
            addon.done()  # synchronous, as mitmproxy calls it on script unload
            assert not patch.is_installed()
            await bridge.aclose()  # finishes what done() started
            assert not bridge.running
        srv.close()

    asyncio.run(main())
