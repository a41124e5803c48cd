"""Multi-hop: WireGuard inside WireGuard, all in userspace, against real peers.

``open_tunnel(inner, via=outer)``: our outer tunnel reaches wireguard-go in the outer exit
namespace; the inner tunnel's datagrams travel inside it to a second wireguard-go (the
inner exit, tests/harness/multihop.py) whose endpoint only the outer exit's network can
reach. An origin behind the inner exit must see our *inner* tunnel address.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import require_netns
from e2e_helpers import curl, pattern, run_mitmdump, run_origin, write_client_config
from mitmproxy import exceptions
from mitmproxy.test import taddons

from harness import ExitPeer, diagnose_on_failure, exit_peer
from harness.multihop import InnerExitPeer, inner_exit_peer
from mitm_wg.config import WireGuardConfig, encode_key, generate_private_key, public_key_of
from mitm_wg.mitmproxy.addon import WireGuardAddon, chain_of
from mitm_wg.runtime import Tunnel, open_tunnel
from mitm_wg.runtime.via import ViaTransport, layer_overhead, mtu_via
from tests.runtime_helpers import NamespaceSocketFactory, http_get, http_post_json, pattern_sha256

MB = 1024 * 1024
PREFIX = "mwgmh"
INNER_NAME = "inner-exit.test"  # the outer exit's dnsmasq resolves it to the inner endpoint


@pytest.fixture(scope="module")
def hops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ExitPeer, InnerExitPeer, Any]]:
    """The outer exit, the inner exit behind it, and an echo origin on the inner exit.

    Tests using it are marked ``interop`` by hand (conftest marks only its own fixtures)."""
    require_netns()
    workdir = tmp_path_factory.mktemp("multihop")
    with (
        exit_peer(name_prefix=PREFIX, dnsmasq=True, dns_names={INNER_NAME: "10.76.{N}.2"}) as outer,
        inner_exit_peer(outer) as inner,
    ):
        with run_origin(inner.ns, workdir, http=[f"{inner.server_tunnel_v4}:80"]) as origin:
            yield outer, inner, origin


def outer_config(outer: ExitPeer, inner: InnerExitPeer, *, v6: bool = False) -> WireGuardConfig:
    """Our outer config: the outer tunnel's prefixes plus the link holding the inner endpoint."""
    nets = [outer.tunnel_v4_net, inner.transit_v4_net]
    if v6:
        nets += [str(outer.tunnel_v6_net), inner.transit_v6_net]
    return WireGuardConfig.parse(outer.client_config_text(allowed_ips=", ".join(nets), dns=False))


def inner_config(
    inner: InnerExitPeer, *, v6: bool = False, mtu: int | None = None
) -> WireGuardConfig:
    endpoint = inner.endpoint_v6 if v6 else inner.endpoint
    assert endpoint is not None
    text = inner.client_config_text(endpoint=endpoint, dns=False)
    if mtu is not None:
        text = text.replace("[Peer]", f"MTU = {mtu}\n\n[Peer]")
    return WireGuardConfig.parse(text, path="inner.conf")


@asynccontextmanager
async def two_hops(
    outer: ExitPeer, inner: InnerExitPeer, *, v6: bool = False, mtu: int | None = None
) -> AsyncIterator[tuple[Tunnel, Tunnel, NamespaceSocketFactory]]:
    factory = NamespaceSocketFactory(outer.client_ns)
    # Three initiations' worth of handshake wait instead of the default two: in one CI run
    # in ~6 the outer exit namespace's kernel dropped forwarded IPv6 for several seconds
    # (Ip6InNoRoutes 7 with the fd00:78 route present; the inner exit had answered our
    # first initiation, the second never reached it). diagnose_on_failure still reports it.
    with diagnose_on_failure(outer, inner):
        async with (
            open_tunnel(
                outer_config(outer, inner, v6=v6), socket_factory=factory, handshake_timeout=16
            ) as a,
            open_tunnel(inner_config(inner, v6=v6, mtu=mtu), via=a, handshake_timeout=16) as b,
        ):
            try:
                yield a, b, factory
            except BaseException as e:
                # Our side of both hops (handshake ages, sessions, counters) at the failure.
                e.add_note(f"outer tunnel: {a.status()}\ninner tunnel: {b.status()}")
                raise


@pytest.mark.interop
def test_inner_endpoint_unreachable_without_the_outer_tunnel(
    hops: tuple[ExitPeer, InnerExitPeer, Any],
) -> None:
    """The test is only meaningful if the client namespace cannot reach the inner exit."""
    outer, inner, _ = hops
    for host in (inner.endpoint[0], inner.server_tunnel_v4):
        r = outer.client_ns.exec(["ip", "route", "get", host], check=False)
        assert r.returncode != 0, r.stdout
    assert outer.ns.exec(["ip", "route", "get", inner.endpoint[0]]).returncode == 0


@pytest.mark.interop
@pytest.mark.parametrize("family", [4, 6])
async def test_origin_behind_the_inner_exit_sees_the_inner_address(
    hops: tuple[ExitPeer, InnerExitPeer, Any], family: int
) -> None:
    outer, inner, origin = hops
    v6 = family == 6
    async with two_hops(outer, inner, v6=v6) as (a, b, factory):
        assert b.via is a and a.via is None
        # One layer of overhead per hop: 60 bytes over IPv4, 80 over IPv6, rounded down
        # to WireGuard's 16-byte padding unit (1420 - 80 = 1340 -> 1328).
        assert b.stack.mtu == (1328 if v6 else 1360) and a.stack.mtu == 1420
        assert b.device.mtu == b.stack.mtu  # the padding cap too
        with trio.fail_after(60):
            stream = await b.open_tcp_stream(inner.server_tunnel_v4, 80)
            resp = await http_get(stream, "/echo/multihop")
            assert resp.status == 200
            seen = json.loads(resp.body)
            assert seen["client"] == inner.client_tunnel_v4
            await stream.aclose()
        # Only the outer exit's endpoint was ever contacted from the host network.
        assert factory.destinations <= {outer.endpoint}
        (peer,) = b.status().peers
        assert peer.has_session and peer.endpoint == (inner.endpoint_v6 if v6 else inner.endpoint)
        assert inner.client_stats().latest_handshake > 0
        # The inner exit saw our outer tunnel address as the endpoint (no NAT on the way).
        (sock,) = _transport(b)._sockets.values()
        assert sock.local_address[0] == (outer.client_tunnel_v6 if v6 else outer.client_tunnel_v4)
        assert inner.client_stats().endpoint == sock.local_address
    assert any(r["path"] == "/echo/multihop" for r in origin.requests())


def _transport(tunnel: Tunnel) -> ViaTransport:
    transport = tunnel._send_datagrams.__self__  # type: ignore[attr-defined]
    assert isinstance(transport, ViaTransport)
    return transport


@pytest.mark.interop
@pytest.mark.parametrize("family", [4, 6])
async def test_bulk_both_ways_with_full_sized_packets(
    hops: tuple[ExitPeer, InnerExitPeer, Any], family: int
) -> None:
    """Full-sized inner segments must fit the outer tunnel (a wrong MTU stalls the transfer:
    the outer stack drops a too-large datagram whole)."""
    outer, inner, _ = hops
    async with two_hops(outer, inner, v6=family == 6) as (a, b, _):
        with trio.fail_after(120):
            stream = await b.open_tcp_stream(inner.server_tunnel_v4, inner.http_port)
            resp = await http_get(stream, f"/bytes/{4 * MB}")
            assert resp.status == 200 and resp.sha256 == pattern_sha256(4 * MB)
            result = await http_post_json(stream, "/upload", 4 * MB)
            assert result == {"sha256": pattern_sha256(4 * MB), "size": 4 * MB}
            await stream.aclose()
        assert a.send_errors == 0
        assert _transport(b).send_errors == 0  # no inner datagram was too big for the outer


@pytest.mark.interop
async def test_too_large_configured_mtu_is_lowered(
    hops: tuple[ExitPeer, InnerExitPeer, Any], caplog: pytest.LogCaptureFixture
) -> None:
    outer, inner, _ = hops
    with caplog.at_level(logging.WARNING, logger="mitm_wg.runtime.via"):
        async with two_hops(outer, inner, mtu=1420) as (a, b, _):
            assert b.stack.mtu == a.stack.mtu - 60
            with trio.fail_after(60):
                stream = await b.open_tcp_stream(inner.server_tunnel_v4, inner.http_port)
                resp = await http_get(stream, f"/bytes/{1 * MB}")
                assert resp.sha256 == pattern_sha256(1 * MB)
                await stream.aclose()
    assert "inner.conf: MTU 1420 does not fit inside the outer tunnel" in caplog.text


@pytest.mark.interop
async def test_inner_tunnel_ends_when_the_outer_closes(
    hops: tuple[ExitPeer, InnerExitPeer, Any],
) -> None:
    """Closing the outer tunnel first takes the inner one down with a clear error instead
    of leaving it waiting on a dead path."""
    outer, inner, _ = hops
    factory = NamespaceSocketFactory(outer.client_ns)
    inner_up = trio.Event()
    errors: list[BaseException] = []

    async def run_inner(a: Tunnel) -> None:
        try:
            async with open_tunnel(inner_config(inner), via=a) as b:
                with trio.fail_after(60):
                    stream = await b.open_tcp_stream(inner.server_tunnel_v4, inner.http_port)
                    assert (await http_get(stream, "/bytes/1000")).status == 200
                inner_up.set()
                await trio.sleep_forever()
        except OSError as e:
            errors.append(e)

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            async with open_tunnel(outer_config(outer, inner), socket_factory=factory) as a:
                nursery.start_soon(run_inner, a)
                await inner_up.wait()
            # the outer tunnel is closed here; the inner task must end by itself
    assert len(errors) == 1
    assert isinstance(errors[0], OSError) and errors[0].errno == errno.ENETDOWN
    assert "outer WireGuard tunnel" in str(errors[0])


@pytest.mark.interop
async def test_inner_endpoint_hostname_resolves_through_the_outer_tunnel(
    hops: tuple[ExitPeer, InnerExitPeer, Any],
) -> None:
    """An inner ``Endpoint`` given as a name is resolved by the outer tunnel's DNS (the name
    lives in the outer peer's network), never by the host."""
    outer, inner, _ = hops
    nets = f"{outer.tunnel_v4_net}, {inner.transit_v4_net}"
    outer_conf = WireGuardConfig.parse(outer.client_config_text(allowed_ips=nets))
    assert outer_conf.dns_servers
    text = inner.client_config_text(endpoint=(INNER_NAME, inner.endpoint[1]), dns=False)
    assert f"Endpoint = {INNER_NAME}:" in text
    factory = NamespaceSocketFactory(outer.client_ns)
    async with open_tunnel(outer_conf, socket_factory=factory) as a:
        # Handshake first: the resolver gives each DNS server 2 s, which a first query that
        # also waits for the WireGuard handshake can exceed on a loaded machine (a property
        # of the resolver, not of multi-hop).
        with trio.fail_after(60):
            stream = await a.open_tcp_stream(outer.server_tunnel_v4, outer.http_port)
            await stream.aclose()
        async with open_tunnel(WireGuardConfig.parse(text), via=a) as b:
            assert b.status().peers[0].endpoint == inner.endpoint
            with trio.fail_after(60):
                stream = await b.open_tcp_stream(inner.server_tunnel_v4, inner.http_port)
                assert (await http_get(stream, "/bytes/1000")).status == 200
                await stream.aclose()
    asked = [q for q in outer.dns_queries() if q.name == INNER_NAME]
    assert asked and {q.client for q in asked} == {outer.client_tunnel_v4}


@pytest.mark.interop
async def test_inner_endpoint_outside_the_outer_allowed_ips_is_refused(
    hops: tuple[ExitPeer, InnerExitPeer, Any],
) -> None:
    """Fail closed: an inner endpoint the outer tunnel does not route is an error at open,
    never a datagram sent somewhere else."""
    outer, inner, _ = hops
    factory = NamespaceSocketFactory(outer.client_ns)
    narrow = WireGuardConfig.parse(outer.client_config_text(dns=False))  # no transit net
    async with open_tunnel(narrow, socket_factory=factory) as a:
        with pytest.raises(OSError, match="not reachable through the outer tunnel") as info:
            async with open_tunnel(inner_config(inner), via=a):
                pass
        assert info.value.errno == errno.ENETUNREACH


def test_mtu_arithmetic() -> None:
    assert layer_overhead(4) == 60 and layer_overhead(6) == 80
    assert mtu_via(1420, [("10.0.0.1", 51820)], None) == 1360
    assert mtu_via(1420, [("fd00::1", 51820)], None) == 1328  # 1340, padding unit 16
    assert mtu_via(1420, [("10.0.0.1", 1), ("fd00::1", 2)], None) == 1328
    assert mtu_via(1400, [("10.0.0.1", 1)], None) == 1328  # 1340 again
    assert mtu_via(1420, [], None) == 1360
    assert mtu_via(1420, [("10.0.0.1", 1)], 1280) == 1280  # a smaller configured MTU stays
    assert mtu_via(1420, [("10.0.0.1", 1)], 1400) == 1360
    assert mtu_via(1420, [("fd00::1", 1)], 1340) == 1328  # wg-quick's 1340 would stall
    # three layers: each one pays again
    assert mtu_via(mtu_via(1420, [("10.0.0.1", 1)], None), [("fd00::1", 1)], None) == 1280


# -- the addon: wg_via ------------------------------------------------------------------------

STATUS_SCRIPT = """
from mitmproxy import ctx


def response(flow):
    ctx.master.commands.call("wg.status")
"""


@pytest.mark.interop
def test_mitmdump_wg_via_through_two_hops(
    hops: tuple[ExitPeer, InnerExitPeer, Any], tmp_path: Path
) -> None:
    """curl → mitmdump (wg_conf outer + inner, wg_via=inner=outer) → origin behind the inner
    exit, which sees the inner tunnel address; wg.status shows the chain."""
    outer, inner, origin = hops
    nets = f"{outer.tunnel_v4_net}, {inner.transit_v4_net}"
    outer_conf = write_client_config(outer, tmp_path, "outer", allowed_ips=nets, dns=False)
    inner_conf = write_client_config(inner, tmp_path, "inner", dns=False)
    script = tmp_path / "status.py"
    script.write_text(STATUS_SCRIPT)
    with run_mitmdump(
        outer.client_ns,
        tmp_path,
        "--set",
        f"wg_conf=outer={outer_conf}",
        "--set",
        f"wg_conf=inner={inner_conf}",
        "--set",
        "wg_via=inner=outer",
        "-s",
        str(script),
    ) as dump:
        dump.wait_for_log("WireGuard tunnel 'inner' is up")
        r = curl(outer.client_ns, "-x", dump.proxy, f"http://{inner.server_tunnel_v4}/echo/via")
        assert r.status == 200, r
        assert r.json()["client"] == inner.client_tunnel_v4
        # The outer tunnel still carries its own traffic.
        r = curl(outer.client_ns, "-x", dump.proxy, f"{outer.http_url}/index.html")
        assert r.status == 200 and r.body == b"hello from the exit peer\n", r
        text = dump.wait_for_log("multi-hop: host → outer → inner")
        assert "via 'outer'" in text
        assert f"{inner.server_tunnel_v4}:80 through tunnel 'inner'" in text
    assert any(r["path"] == "/echo/via" for r in origin.requests())
    assert inner.client_stats().endpoint[0] == outer.client_tunnel_v4


def _with_mtu(path: Path, mtu: int) -> None:
    path.write_text(path.read_text().replace("[Peer]", f"MTU = {mtu}\n\n[Peer]"))


@pytest.mark.interop
def test_mitmdump_wg_via_through_three_hops(
    hops: tuple[ExitPeer, InnerExitPeer, Any], tmp_path: Path
) -> None:
    """curl → mitmdump → entry → middle → exit (``wg_via`` chain, WireGuard inside WireGuard
    inside WireGuard) → an origin behind the third exit, which only the middle exit's
    network reaches. The origin sees the innermost tunnel address; each exit sees the
    tunnel address one layer out as our endpoint; wg.status shows the chain; full-sized
    packets pass both ways (two layers of overhead: 1420 → 1360 → 1296)."""
    outer, inner, _ = hops
    with inner_exit_peer(inner) as third:
        assert third.depth == 2 and third.tunnel_v4_net != inner.tunnel_v4_net
        for ns in (outer.client_ns, outer.ns):  # only the middle exit's network reaches it
            assert ns.exec(["ip", "route", "get", third.endpoint[0]], check=False).returncode
        with run_origin(third.ns, tmp_path, http=[f"{third.server_tunnel_v4}:80"]) as origin:
            entry = write_client_config(
                outer,
                tmp_path,
                "entry",
                allowed_ips=f"{outer.tunnel_v4_net}, {inner.transit_v4_net}",
                dns=False,
            )
            middle = write_client_config(
                inner,
                tmp_path,
                "middle",
                allowed_ips=f"{inner.tunnel_v4_net}, {third.transit_v4_net}",
                dns=False,
            )
            exit_ = write_client_config(third, tmp_path, "exit", dns=False)
            # wg-quick's default MTU in both inner configs: too large inside one layer,
            # more so inside two. Each is lowered by one layer (IPv4 endpoints: 60 bytes,
            # rounded down to the 16-byte padding unit) of the tunnel it runs in.
            _with_mtu(middle, 1420)
            _with_mtu(exit_, 1420)
            script = tmp_path / "status.py"
            script.write_text(STATUS_SCRIPT)
            args = [f"wg_conf={n}={p}" for n, p in (("entry", entry), ("middle", middle))]
            args += [f"wg_conf=exit={exit_}", "wg_via=middle=entry", "wg_via=exit=middle"]
            with run_mitmdump(
                outer.client_ns,
                tmp_path,
                *[a for x in args for a in ("--set", x)],
                "-s",
                str(script),
            ) as dump:
                dump.wait_for_log("WireGuard tunnel 'exit' is up", timeout=60)
                outer.client_ns.settle()
                r = curl(
                    outer.client_ns, "-x", dump.proxy, f"http://{third.server_tunnel_v4}/echo/3"
                )
                assert r.status == 200, r
                assert r.json()["client"] == third.client_tunnel_v4
                base = f"http://{third.server_tunnel_v4}:{third.http_port}"
                r = curl(outer.client_ns, "-x", dump.proxy, f"{base}/bytes/{2 * MB}", max_time=120)
                assert r.status == 200 and r.body == pattern(2 * MB), r
                upload = tmp_path / "upload.bin"
                upload.write_bytes(pattern(2 * MB))
                r = curl(
                    outer.client_ns,
                    "-x",
                    dump.proxy,
                    "--data-binary",
                    f"@{upload}",
                    f"{base}/upload",
                    max_time=120,
                )
                assert r.status == 200, r
                assert r.json() == {"sha256": pattern_sha256(2 * MB), "size": 2 * MB}
                text = dump.wait_for_log("multi-hop: host → entry → middle → exit")
                assert "via 'middle' (multi-hop: host → entry → middle → exit)" in text
                assert "via 'entry' (multi-hop: host → entry → middle)" in text
                assert (
                    "MTU 1420 does not fit inside the outer tunnel (MTU 1420); using 1360" in text
                )
                assert (
                    "MTU 1420 does not fit inside the outer tunnel (MTU 1360); using 1296" in text
                )
                assert f"{third.server_tunnel_v4}:80 through tunnel 'exit'" in text
            assert any(e["path"] == "/echo/3" for e in origin.requests())
        # Each exit saw us come from the tunnel one layer out (no NAT anywhere).
        assert third.client_stats().endpoint[0] == inner.client_tunnel_v4
        assert inner.client_stats().endpoint[0] == outer.client_tunnel_v4


def _conf(tmp_path: Path, name: str) -> str:
    key = encode_key(generate_private_key())
    peer = encode_key(public_key_of(generate_private_key()))
    path = tmp_path / f"{name}.conf"
    path.write_text(
        f"[Interface]\nPrivateKey = {key}\nAddress = 10.9.0.2/32\n\n"
        f"[Peer]\nPublicKey = {peer}\nAllowedIPs = 10.{len(name)}.0.0/16\n"
        "Endpoint = 127.0.0.1:9\n"
    )
    return f"{name}={path}"


def test_wg_via_option_is_checked(tmp_path: Path) -> None:
    confs = [_conf(tmp_path, n) for n in ("a", "bb", "ccc")]
    addon = WireGuardAddon()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, wg_conf=confs, wg_via=["ccc=bb", "bb=a"])
        assert addon.via == {"ccc": "bb", "bb": "a"}
        assert chain_of("ccc", addon.via) == ["a", "bb", "ccc"]
        text = addon.status()
        assert "via 'a' (multi-hop: host → a → bb)" in text
        assert "via 'bb' (multi-hop: host → a → bb → ccc)" in text
        for bad, message in [
            (["a=bb", "bb=a"], "go through each other: a → bb → a"),
            (["a=a"], "go through each other: a → a"),
            (["a=nope"], "'nope', which is not a wg_conf tunnel"),
            (["a"], "should be INNER=OUTER"),
            (["a=bb", "a=ccc"], "cannot go through both 'bb' and 'ccc'"),
        ]:
            with pytest.raises(exceptions.OptionsError, match=message):
                tctx.configure(addon, wg_via=bad)
        addon.done()


def test_wg_via_outer_down_names_it(tmp_path: Path) -> None:
    """The inner tunnel of a chain whose outer tunnel cannot start is down, and says why."""
    confs = [_conf(tmp_path, "a"), _conf(tmp_path, "bb")]

    async def main() -> None:
        addon = WireGuardAddon()
        with taddons.context(addon) as tctx:
            # 'a' fails to open (its config has no Address); 'bb' waits for it, then fails.
            path = tmp_path / "a.conf"
            path.write_text(path.read_text().replace("Address = 10.9.0.2/32\n", ""))
            tctx.configure(addon, wg_conf=confs, wg_via=["bb=a"])
            await addon.running()
            assert addon.bridge is not None
            info = addon.bridge.tunnels
            assert info["a"].state == "down"
            assert info["bb"].state == "down"
            assert "no Address" in (info["a"].error or "")
            assert "the WireGuard tunnel 'a' is down" in (info["bb"].error or "")
            addon.done()

    asyncio.run(main())
