"""The addon's DNS side (mitm_wg/mitmproxy/dns.py) in mitmproxy's test context.

Tunnels are stand-ins that reach the scripted DNS servers of tests/test_dns.py, run by the
real bridge (trio in its thread); the flows are mitmproxy DNS flows as its DNS layer makes
them.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from mitmproxy import exceptions
from mitmproxy.addons.dns_resolver import DnsResolver
from mitmproxy.proxy.layers.dns import DnsRequestHook
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow, tutils
from test_dns import S1, FakeNet
from test_dns_forward import client_query, records

from mitm_wg.config import encode_key, generate_private_key, public_key_of
from mitm_wg.mitmproxy import patch
from mitm_wg.mitmproxy.addon import WireGuardAddon
from tests.loopback_addon import open_loopback_tunnel

TUNNEL = "vpn"


def write_conf(path: Path, *, dns: str | None, allowed: str = "10.64.0.0/16") -> str:
    key = encode_key(generate_private_key())
    peer = encode_key(public_key_of(generate_private_key()))
    dns_line = f"DNS = {dns}\n" if dns else ""
    path.write_text(
        f"[Interface]\nPrivateKey = {key}\nAddress = 10.64.1.2/32\n{dns_line}\n"
        f"[Peer]\nPublicKey = {peer}\nAllowedIPs = {allowed}\nEndpoint = 127.0.0.1:9\n"
    )
    return f"{TUNNEL}={path}"


class FakeTunnel:
    """Reaches FakeNet's servers the way the runtime's Tunnel reaches real ones."""

    def __init__(self, net: FakeNet | None) -> None:
        self.net = net

    async def open_udp_socket(self, family: int = 4) -> Any:
        if self.net is None:
            raise OSError(errno.ENETUNREACH, "Network is unreachable")
        return await self.net.open_udp(family)

    async def open_tcp_stream(self, host: str, port: int) -> Any:
        assert self.net is not None
        return await self.net.open_tcp(ipaddress.ip_address(host), port)

    async def wait_session(self, address: object) -> None:
        """FakeNet's servers answer at once: no WireGuard session to wait for."""

    def unanswered(self, address: object, since: float) -> None:
        pass

    def path_rtt(self, address: object) -> float | None:
        """No WireGuard handshake has measured a round trip."""
        return None


def fake_tunnel(net: FakeNet | None) -> Any:
    @asynccontextmanager
    async def factory() -> AsyncIterator[FakeTunnel]:
        yield FakeTunnel(net)

    return factory


@pytest.fixture(autouse=True)
def _unpatch() -> Iterator[None]:
    yield
    patch.uninstall()


def dns_flow(
    mode: str = "wireguard",
    address: tuple[str, int] | None = ("10.0.0.53", 53),
    rdtype: str = "TXT",
    *,
    qid: int = 0x4242,
    transport: str = "udp",
) -> Any:
    request = type(tutils.tdnsreq()).unpack(client_query("www.example", rdtype, qid=qid))
    flow = tflow.tdnsflow(req=request)
    flow.client_conn.proxy_mode = ProxyMode.parse(mode)
    flow.client_conn.transport_protocol = transport
    flow.server_conn.address = address
    return flow


def answer(flow: Any) -> dns.message.Message:
    assert flow.response is not None
    return dns.message.from_wire(flow.response.packed)


async def start(tctx: Any, addon: WireGuardAddon, net: FakeNet | None, **options: Any) -> None:
    tctx.configure(addon, **options)
    await addon.running()
    assert addon.bridge is not None
    errors = await addon.bridge.set_tunnels({TUNNEL: fake_tunnel(net)})
    assert errors == {TUNNEL: None}


async def stop(addon: WireGuardAddon) -> None:
    if addon.bridge is not None:
        await addon.bridge.aclose()
        addon.bridge = None
    addon.done()


def test_query_answered_through_the_tunnel(tmp_path: Path) -> None:
    async def main() -> None:
        addon = WireGuardAddon(open_tunnel=open_loopback_tunnel)
        net = FakeNet({S1: records})
        with taddons.context(addon) as tctx:
            await start(tctx, addon, net, wg_conf=[write_conf(tmp_path / "a.conf", dns=str(S1))])
            for rdtype in ("TXT", "MX", "A"):
                flow = dns_flow(rdtype=rdtype)
                await addon.dns.dns_request(flow)
                reply = answer(flow)
                assert reply.id == 0x4242 and reply.rcode() == dns.rcode.NOERROR
                assert reply.answer[0].rdtype == dns.rdatatype.from_text(rdtype)
            assert [s.server for s in net.sent] == [S1] * 3
            assert addon.dns.stats == {"answered": 3, "servfail": 0}
            await stop(addon)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("mode", "address", "answered"),
    [
        ("dns", None, True),
        ("dns", ("127.0.0.1", 53), True),
        ("wireguard", ("10.0.0.53", 53), True),
        ("wireguard", ("8.8.8.8", 53), True),
        ("transparent", ("192.168.1.1", 53), True),
        ("local", ("192.168.1.1", 53), True),
        ("wireguard", ("224.0.0.251", 5353), False),  # mDNS: not a query to a resolver
        ("regular", ("1.1.1.1", 53), False),
        ("socks5", ("1.1.1.1", 53), False),
        ("reverse:dns://1.1.1.1", ("1.1.1.1", 53), False),
    ],
)
def test_which_flows_are_answered(
    tmp_path: Path, mode: str, address: tuple[str, int] | None, answered: bool
) -> None:
    async def main() -> None:
        addon = WireGuardAddon(open_tunnel=open_loopback_tunnel)
        net = FakeNet({S1: records})
        with taddons.context(addon) as tctx:
            await start(tctx, addon, net, wg_conf=[write_conf(tmp_path / "a.conf", dns=str(S1))])
            flow = dns_flow(mode, address)
            await addon.dns.dns_request(flow)
            assert (flow.response is not None) is answered
            assert bool(net.sent) is answered
            await stop(addon)

    asyncio.run(main())


def test_answered_or_dead_flows_are_left_alone(tmp_path: Path) -> None:
    async def main() -> None:
        addon = WireGuardAddon(open_tunnel=open_loopback_tunnel)
        net = FakeNet({S1: records})
        with taddons.context(addon) as tctx:
            await start(tctx, addon, net, wg_conf=[write_conf(tmp_path / "a.conf", dns=str(S1))])
            flow = dns_flow()
            mine = flow.request.fail(dns.rcode.NXDOMAIN)
            flow.response = mine
            await addon.dns.dns_request(flow)
            assert flow.response is mine
            flow = dns_flow()
            flow.live = False
            await addon.dns.dns_request(flow)
            assert flow.response is None
            assert net.sent == []
            await stop(addon)

    asyncio.run(main())


def test_tunnel_failure_is_servfail(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        addon = WireGuardAddon(open_tunnel=open_loopback_tunnel)
        with caplog.at_level(logging.WARNING), taddons.context(addon) as tctx:
            await start(tctx, addon, None, wg_conf=[write_conf(tmp_path / "a.conf", dns=str(S1))])
            flow = dns_flow(qid=7)
            await addon.dns.dns_request(flow)
            reply = answer(flow)
            assert reply.id == 7 and reply.rcode() == dns.rcode.SERVFAIL
            assert addon.dns.stats["servfail"] == 1
            await stop(addon)
        assert "answered SERVFAIL" in caplog.text and "unreachable" in caplog.text

    asyncio.run(main())


def test_other_opcodes_get_notimp(tmp_path: Path) -> None:
    async def main() -> None:
        addon = WireGuardAddon(open_tunnel=open_loopback_tunnel)
        net = FakeNet({S1: records})
        with taddons.context(addon) as tctx:
            await start(tctx, addon, net, wg_conf=[write_conf(tmp_path / "a.conf", dns=str(S1))])
            flow = dns_flow()
            flow.request.op_code = 2  # STATUS
            await addon.dns.dns_request(flow)
            assert answer(flow).rcode() == dns.rcode.NOTIMP
            assert net.sent == []
            await stop(addon)

    asyncio.run(main())


def test_without_dns_servers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    conf = write_conf(tmp_path / "nodns.conf", dns=None)
    addon = WireGuardAddon(open_tunnel=open_loopback_tunnel)
    with caplog.at_level(logging.INFO), taddons.context(addon) as tctx:
        # regular mode: only upstream host names are concerned
        tctx.configure(addon, wg_conf=[conf])
        assert addon.dns.plan is None
        assert "has no DNS = servers" in caplog.text and "nodns.conf" in caplog.text
        assert "host names of upstream connections are resolved by this host" in caplog.text
        assert "clients' DNS" not in caplog.text
        caplog.clear()
        tctx.configure(addon, mode=["regular", "wireguard"])
        assert "clients' DNS queries in the wireguard mode are answered by mitmproxy's" in (
            caplog.text
        )
        assert "OUTSIDE the tunnel" in caplog.text
        with pytest.raises(exceptions.OptionsError, match=r"wg_dns=tunnel.*nodns\.conf.*no DNS ="):
            tctx.configure(addon, wg_dns="tunnel")
        tctx.configure(addon, wg_dns="off")
        assert addon.dns.plan is None and "wg_dns=off: clients' DNS queries in the" in caplog.text
    addon.done()


def test_the_start_line_names_servers_tunnel_and_modes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    conf = write_conf(tmp_path / "a.conf", dns="10.64.0.1, 10.64.0.2")
    addon = WireGuardAddon(open_tunnel=open_loopback_tunnel)
    with caplog.at_level(logging.INFO), taddons.context(addon) as tctx:
        tctx.configure(addon, wg_conf=[conf])
        assert "clients' DNS" not in caplog.text  # regular mode: debug only
        tctx.configure(addon, mode=["wireguard", "dns@5353"])
        assert (
            "clients' DNS queries in the wireguard/dns mode are resolved through the tunnel by "
            "10.64.0.1, 10.64.0.2 via tunnel 'vpn' (DNS = in " in caplog.text
        )
    addon.done()


def test_dns_name_servers_are_asked_through_the_tunnel(tmp_path: Path) -> None:
    conf = write_conf(tmp_path / "a.conf", dns="10.64.0.1")
    addon = WireGuardAddon(open_tunnel=open_loopback_tunnel)
    with taddons.context(DnsResolver(), addon) as tctx:
        tctx.configure(addon, wg_conf=[conf])
        assert addon.dns.plan == ((TUNNEL, (ipaddress.ip_address("10.64.0.1"),)),)
        tctx.options.update(dns_name_servers=["10.64.5.5", "10.64.5.6"])
        tctx.master.addons.invoke_addon_sync(addon, _configure({"dns_name_servers"}))
        servers = tuple(ipaddress.ip_address(s) for s in ("10.64.5.5", "10.64.5.6"))
        assert addon.dns.plan == ((TUNNEL, servers),)
        with pytest.raises(
            exceptions.OptionsError, match=r"192\.168\.1\.1 is outside the AllowedIPs"
        ):
            tctx.options.update(dns_name_servers=["192.168.1.1"])
            tctx.master.addons.invoke_addon_sync(addon, _configure({"dns_name_servers"}))
    addon.done()


def _configure(updated: set[str]) -> Any:
    from mitmproxy import hooks

    return hooks.ConfigureHook(updated)


def test_mitmproxy_resolver_runs_after_us(tmp_path: Path) -> None:
    """mitmproxy 11 puts dns_resolver before scripts; we must answer first on 11 and 12."""

    async def main() -> None:
        resolver = DnsResolver()
        addon = WireGuardAddon(open_tunnel=open_loopback_tunnel)
        net = FakeNet({S1: records})
        with taddons.context(resolver, addon) as tctx:
            manager = tctx.master.addons
            assert manager.chain.index(resolver) < manager.chain.index(addon)
            await start(tctx, addon, net, wg_conf=[write_conf(tmp_path / "a.conf", dns=str(S1))])
            assert manager.chain.index(resolver) == manager.chain.index(addon) + 1
            # the whole hook chain: our answer stands, mitmproxy's resolver does nothing
            flow = dns_flow("dns", None, "TXT")
            await manager.handle_lifecycle(DnsRequestHook(flow))
            reply = answer(flow)
            assert reply.rcode() == dns.rcode.NOERROR and reply.answer
            assert [s.server for s in net.sent] == [S1]
            assert flow.server_conn.address is None
            await stop(addon)

    asyncio.run(main())
