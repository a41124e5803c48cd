"""A path narrower than the tunnel's datagrams, against wireguard-go and the Linux stack.

Real users' paths are often narrower than the 1500 bytes a WireGuard MTU of 1420 assumes:
PPPoE lines (1492, too small for 1420 over IPv6), mobile networks, a VPN under the VPN. The
router there answers a too-big datagram with ICMP "fragmentation needed" (IPv4) or "packet
too big" (IPv6), and the kernel remembers the limit for that destination. From then on it
fragments a single datagram but refuses a UDP GSO run of too-big ones (EMSGSIZE): before the
fix every bulk upload stalled for good there, while wireguard-go + Linux TCP went on.

Each test puts a real Linux router with a 1400-byte link toward the exit under our tunnel
(:func:`harness.narrow_link`), or makes our own link that narrow, and checks, byte-exact: an upload on the first connection,
which finds the narrower path out (over IPv4 once a datagram drew the router's ICMP error:
see the test), with fragments only until it did; then, on new connections, an upload (to the exit's other
tunnel address) whose datagrams all fit — the exit reassembles no fragment — and still go
out in GSO runs, and a download whose segments fit too (our SYNs offer the smaller MSS, so
the exit's Linux sends no fragments either).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest
import trio
from e2e_helpers import pattern, run_origin
from test_runtime_interop import exit_tunnel, get_pattern

from harness import ExitPeer, ImpairedRelay, Impairment, Netns, narrow_link, origin_behind
from mitm_wg.config import format_endpoint
from mitm_wg.net.tcp import TcpConfig
from mitm_wg.runtime.tunnel import Tunnel, TunnelStream
from tests.runtime_helpers import http_get, http_post_json, http_request, pattern_sha256, snmp

MB = 1024 * 1024
PATH_MTU = 1400
#: a 1400-byte path that drops larger packets without a word, under an IPv4 or IPv6 endpoint
HOLE = {4: Impairment(max_size=PATH_MTU - 28), 6: Impairment(max_size=PATH_MTU - 48)}
#: a namespace's hosts answer no ping (IPv4 or IPv6)
NO_ECHO = {4: "net.ipv4.icmp_echo_ignore_all=1", 6: "net.ipv6.icmp.echo_ignore_all=1"}


async def post(tunnel: Any, host: str, port: int, size: int) -> None:
    stream = await tunnel.open_tcp_stream(host, port)
    result = await http_post_json(stream, "/upload", size)
    assert result == {"sha256": pattern_sha256(size), "size": size}
    await stream.aclose()


class OldKernelSocket:
    """Our UDP socket as a kernel before 5.x has it: a GSO run too big for the path raises
    EINVAL (as for no GSO at all) instead of EMSGSIZE."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def sendmsg(self, *args: Any) -> int:
        try:
            return self._sock.sendmsg(*args)
        except OSError as e:
            if e.errno == errno.EMSGSIZE:
                raise OSError(errno.EINVAL, "Invalid argument") from None
            raise


@contextlib.asynccontextmanager
async def holey_tunnel(
    peer: ExitPeer,
    family: int = 4,
    *,
    hole: bool = True,
    allowed_ips: str | None = None,
    **kw: Any,
) -> AsyncIterator[tuple[Tunnel, ImpairedRelay]]:
    """Our tunnel to ``peer`` through a path MTU black hole: a relay that drops every
    datagram longer than a 1400-byte path carries (1372 bytes of UDP payload over IPv4,
    1352 over IPv6: ``family`` of the endpoint), both ways, without an ICMP error; small
    ones pass (``HOLE``). ``hole=False``: not yet (``relay.set_impairment(HOLE[family])``
    opens it). ``allowed_ips`` for the config; ``kw`` go to ``open_tunnel``."""
    if family == 4:
        target, listen = peer.endpoint, "127.0.0.1"
    else:
        assert peer.endpoint_v6 is not None
        target, listen = peer.endpoint_v6, "::1"
    impairment = HOLE[family] if hole else Impairment()
    with ImpairedRelay(
        target, listen=(listen, 0), seed=1, impairment=impairment,
        socket_factory=peer.client_ns.socket,
    ) as relay:  # fmt: skip
        text = peer.client_config_text(endpoint=relay.address, allowed_ips=allowed_ips)
        async with exit_tunnel(peer, text, **kw) as (tunnel, _):
            yield tunnel, relay


def record_probes(tunnel: Tunnel) -> list[tuple[str, str]]:
    """The path probes ``tunnel`` starts from now on, as (why, the host pinged)."""
    asked: list[tuple[str, str]] = []
    ask = tunnel._ask

    def recording(why: Any, local: bytes, remote: bytes, *args: Any) -> None:
        asked.append((why.kind, str(ipaddress.ip_address(remote))))
        ask(why, local, remote, *args)

    tunnel._ask = recording  # type: ignore[method-assign]
    return asked


@contextlib.contextmanager
def origins_behind_exit(
    peer: ExitPeer,
    workdir: Path,
    name: str,
    hosts: list[str],
    *,
    hole_beyond: bool = True,
    toward: bool = False,
) -> Iterator[tuple[Netns, Callable[[], None]]]:
    """HTTP origins on ``hosts`` (in 10.99.0.0/24 or fd00:99::/64) behind ``peer``'s exit,
    with the raw TCP service (``e2e_helpers``) on port 7000 (their log in ``workdir /
    name``). ``hole_beyond``: the exit silently drops what they send in packets of over
    1280 bytes (an nftables rule on its forwarding path: a router beyond the exit whose
    link is that narrow, IPv6's minimum, and whose ICMP errors are lost; the origins' own
    transmissions succeed, as a real black hole lets them, so their TCP goes on sending
    and backs off, where a narrower veth would fail the send itself). The origins send
    one segment per packet, as over a real wire (a veth passes a GSO packet whole).
    ``toward``: the hole is on the way to them instead (our uploads' segments vanish):
    the exit's link to them carries 1280 bytes and its ICMP errors saying so are dropped
    (a rule on its output path). (Not a length rule on its forwarding path: a newer
    wireguard-go writes what it received as one GSO packet into its TUN, which the exit
    forwards whole, so such a rule would see one large packet where the wire carries
    small ones.) Yields the origins' namespace and a function that mends the hole."""
    with origin_behind([peer], "mwgb", hosts) as origin_ns:
        table = f"{origin_ns.name}hole"
        o_if, e_if = f"{origin_ns.name}o0", f"{origin_ns.name}e0"

        def mend() -> None:
            peer.ns.exec(["nft", "delete", "table", "inet", table])
            peer.ns.ip("link", "set", e_if, "mtu", "1500")

        if hole_beyond:
            if toward:
                peer.ns.ip("link", "set", e_if, "mtu", "1280")
                hook = "output priority 0"
                rule = (
                    "icmp type destination-unreachable icmp code frag-needed drop; "
                    "icmpv6 type packet-too-big drop"
                )
            else:
                hook, rule = "forward priority 0", f'iifname "{e_if}" meta length > 1280 drop'
                origin_ns.ip("link", "set", o_if, "gso_max_segs", "1")
            chain = f"{{ type filter hook {hook}; policy accept; {rule}; }}"
            peer.ns.exec(["nft", f"table inet {table} {{ chain drops {chain}; }}"])
        here = workdir / name
        here.mkdir()
        try:
            bracketed = [f"[{host}]" if ":" in host else host for host in hosts]
            http, raw = [f"{host}:80" for host in bracketed], [f"{host}:7000" for host in bracketed]
            with run_origin(origin_ns, here, http=http, tcp=raw):
                yield origin_ns, mend
        finally:
            if hole_beyond:
                peer.ns.exec(["nft", "delete", "table", "inet", table], check=False)


@contextlib.contextmanager
def own_link(peer: ExitPeer, mtu: int) -> Iterator[None]:
    """Our own link is the narrow one (a container's bridge, a host already in a VPN): the
    kernel knows the limit without any ICMP error."""
    n, prefix = peer.index, peer.ifname[: -len(f"{peer.index}wg")]
    peer.client_ns.ip("link", "set", f"{prefix}{n}v0", "mtu", str(mtu))
    peer.ns.ip("link", "set", f"{prefix}{n}v1", "mtu", str(mtu))
    yield


@pytest.mark.parametrize(
    ("where", "family", "old_kernel"),
    [
        ("router", 4, False),
        ("router", 6, False),
        ("router", 4, True),
        ("own link", 4, False),
        ("own link", 6, False),
    ],
    ids=["v4", "v6", "v4-einval", "own-link-v4", "own-link-v6"],
)
async def test_bulk_both_ways_through_a_narrower_path(
    fresh_exit_peer: ExitPeer, where: str, family: int, old_kernel: bool
) -> None:
    """``old_kernel``: the refused run says EINVAL, which also means "no GSO": the path's
    MTU tells the two apart, and GSO stays on."""
    peer = fresh_exit_peer
    endpoint = peer.endpoint if family == 4 else peer.endpoint_v6
    assert endpoint is not None
    reasm = "Ip:ReasmOKs" if family == 4 else "Ip6ReasmOKs"
    too_big = "Icmp:OutDestUnreachs" if family == 4 else "Icmp6OutPktTooBigs"
    # IPv4/IPv6 + UDP headers, WireGuard's 32 bytes, inner packets padded to 16
    inner = (PATH_MTU - (28 if family == 4 else 48) - 32) & ~15
    narrow = narrow_link(peer, PATH_MTU) if where == "router" else own_link(peer, PATH_MTU)
    with narrow as router:
        text = peer.client_config_text(endpoint=endpoint)
        async with exit_tunnel(peer, text) as (tunnel, _):
            if old_kernel:
                tunnel._sockets = {f: OldKernelSocket(s) for f, s in tunnel._sockets.items()}
            with trio.fail_after(60):
                if router is not None and family == 4:
                    # Linux sets DF on an IPv4 datagram only when it fits the route's MTU
                    # whole, so a GSO run leaves without DF, and this router fragments it
                    # without a word: the path is known once a single full-sized datagram
                    # drew its ICMP error. A QUIC or DNS datagram as the first, here.
                    udp = await tunnel.open_udp_socket(4)
                    await udp.sendto(bytes(1392), (peer.server_tunnel_v4, 9))
                    while snmp(router, too_big) == 0:
                        await trio.sleep(0.01)
                exit_reasm = snmp(peer.ns, reasm)
                await post(tunnel, peer.server_tunnel_v4, peer.http_port, 20 * MB)
                if router is not None:
                    assert snmp(router, too_big) > 0, "the router never said so"
                assert tunnel.narrow_paths == {endpoint: inner}
                assert tunnel.status().narrowed == (
                    f"path to WireGuard endpoint {format_endpoint(endpoint)}: packets of at "
                    f"most {inner} bytes (the path's MTU)",
                )
                # only datagrams sent between the kernel learning the limit and the next
                # refused run went out in fragments
                assert snmp(peer.ns, reasm) - exit_reasm < 100

                exit_reasm, gso_sends = snmp(peer.ns, reasm), tunnel.gso_sends
                assert peer.server_tunnel_v6 is not None
                await post(tunnel, peer.server_tunnel_v6, peer.http_port, 20 * MB)
                assert snmp(peer.ns, reasm) == exit_reasm, "new connections must fit the path"
                assert tunnel.gso_sends - gso_sends > 100

                client_reasm = snmp(peer.client_ns, reasm)
                stream = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
                resp = await http_get(stream, f"/bytes/{20 * MB}")
                assert resp.status == 200 and resp.size == 20 * MB
                assert resp.sha256 == pattern_sha256(20 * MB)
                await stream.aclose()
                assert snmp(peer.client_ns, reasm) == client_reasm, "the exit's segments fit"
            assert tunnel.send_errors == 0


async def test_the_exit_forwards_onto_a_narrower_link_and_says_so_through_the_tunnel(
    fresh_exit_peer: ExitPeer, workdir: Path
) -> None:
    """Past the exit the Internet can be narrower too (a server behind a GRE or IPsec
    link). The exit (Linux, forwarding) gets our 1420-byte inner packets for a 1280-byte
    link, and answers with ICMP "fragmentation needed" through the tunnel (our inner
    packets carry DF): our TCP shrinks to it, the upload goes on byte-exact, and the
    download too (the server's side is not narrow: it sent full-sized segments)."""
    peer = fresh_exit_peer
    with origin_behind([peer], "mwgn", ["10.99.0.1"]) as origin_ns:
        peer.ns.ip("link", "set", f"{origin_ns.name}e0", "mtu", "1280")
        with run_origin(origin_ns, workdir, http=["10.99.0.1:80"]):
            text = peer.client_config_text(allowed_ips=f"{peer.tunnel_v4_net}, 10.99.0.0/24")
            async with exit_tunnel(peer, text) as (tunnel, _):
                with trio.fail_after(60):
                    stream = await tunnel.open_tcp_stream("10.99.0.1", 80)
                    resp = await http_request(stream, "POST", "/echo/upload", body_size=20 * MB)
                    assert resp.status == 200
                    echo = json.loads(resp.body)
                    assert echo["client"] == peer.client_tunnel_v4
                    assert echo["body_size"] == 20 * MB
                    assert echo["body_sha256"] == pattern_sha256(20 * MB)
                    await stream.aclose()
                    assert tunnel.stack.path_mtu("10.99.0.1") == 1280
                    assert tunnel.stack.stats.pmtu_updates == 1
                    assert tunnel.narrow_paths == {}  # (the tunnel's own path is not narrow)

                    stream = await tunnel.open_tcp_stream("10.99.0.1", 80)
                    resp = await http_get(stream, f"/bytes/{20 * MB}")
                    assert resp.status == 200 and resp.size == 20 * MB
                    assert resp.sha256 == pattern_sha256(20 * MB)
                    await stream.aclose()


async def test_a_black_hole_for_full_sized_packets(exit_peer: ExitPeer) -> None:
    """A narrower path whose ICMP errors a firewall drops: every datagram longer than it
    vanishes without a word (here a relay drops those over 1372 bytes of UDP payload, a
    1400-byte IPv4 path), small ones pass. wireguard-go + Linux TCP (tcp_mtu_probing=0,
    its default) stall there for good, both ways.

    A download started first stalls: the server's full-sized segments vanish. Our upload
    beside it takes the path for a black hole after three timeouts in a row
    (TcpConfig.blackhole_rtos) and ends byte-exact; its smaller segments being
    acknowledged confirms it, and the tunnel then shrinks every connection through that
    endpoint and tells the servers of open ones, as a router would, that the path to us
    is narrower (an ICMP error through the tunnel, quoting their segment at our RCV.NXT):
    the stalled download resumes and ends byte-exact. A new connection's download and
    upload (its SYN asked the server for small segments) lose nothing more to the hole.
    (The receiver's rule, which would find the hole from the stalled download alone, is
    off here: the next test has it.)"""
    peer = exit_peer
    async with holey_tunnel(peer, tcp_config=TcpConfig(rx_stall=0)) as (tunnel, relay):
        with trio.fail_after(60):
            stalled = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            got: list[Any] = []

            async def download() -> None:
                got.append(await http_get(stalled, f"/bytes/{5 * MB}"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(download)
                while relay.down.dropped == 0:  # the server's segments vanish
                    await trio.sleep(0.01)
                stream = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
                result = await http_post_json(stream, "/upload", 5 * MB)
                assert result == {"sha256": pattern_sha256(5 * MB), "size": 5 * MB}
                assert stream._sock.stats.blackhole_shrinks == 1
                await stream.aclose()
            assert got[0].status == 200 and got[0].size == 5 * MB
            assert got[0].sha256 == pattern_sha256(5 * MB)
            await stalled.aclose()
            assert relay.up.dropped > 0
            while tunnel._probing:  # (the server's own big ping vanishes too: a hole)
                await trio.sleep(0.05)
            assert tunnel.narrow_paths == {relay.address: 1200}
            assert tunnel.stack.stats.pmtu_told == 2  # (the stalled download, the upload)

            dropped = relay.up.dropped, relay.down.dropped
            stream = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            await get_pattern(stream, 5 * MB)
            await stream.aclose()
            await post(tunnel, peer.server_tunnel_v4, peer.http_port, 5 * MB)
            assert (relay.up.dropped, relay.down.dropped) == dropped


async def test_full_sized_segments_lost_three_times_in_a_row_are_no_black_hole(
    fresh_exit_peer: ExitPeer, caplog: pytest.LogCaptureFixture
) -> None:
    """A lossy path now and then loses the same full-sized segment three timeouts in a
    row (on 2 % loss each way, one timeout in ~600 goes on so; the CI's lossy end-to-end
    path met it): the upload takes its path for a black hole, resends smaller, and the
    smaller segment gets through. Here the relay drops the full-sized datagrams only
    until the upload shrinks, then carries them again. The tunnel asks the server itself
    with pings of both sizes: its big ping comes back, so the segments were lost, not
    swallowed, and its connections go back to full-sized packets at once, without a
    word of a black hole. (Before, that server narrowed as if a hole lay beyond the
    exit, and with no other host to ask, as here, the whole endpoint did, with a warning
    to set a smaller MTU in the config; and the server was told a narrower path, which
    Linux keeps for ten minutes: its next connection offered the smaller MSS. A fresh
    exit here, whose Linux was told nothing by earlier tests.)"""
    peer = fresh_exit_peer
    caplog.set_level(logging.INFO, logger="mitm_wg")
    server = peer.server_tunnel_v4
    raw = ipaddress.ip_address(server).packed
    async with holey_tunnel(peer, hole=False) as (tunnel, relay):
        asked = record_probes(tunnel)
        with trio.fail_after(60):
            stream = await tunnel.open_tcp_stream(server, peer.http_port)
            result: list[Any] = []

            async def upload() -> None:
                result.append(await http_post_json(stream, "/upload", 5 * MB))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(upload)
                while stream._sock.stats.segments_out < 50:  # (under way, full-sized)
                    await trio.sleep(0.001)
                relay.set_impairment(HOLE[4])
                while stream._sock.stats.blackhole_shrinks == 0:
                    await trio.sleep(0.001)
                relay.set_impairment(Impairment())  # (the losses end)
            assert result == [{"sha256": pattern_sha256(5 * MB), "size": 5 * MB}]
            while tunnel._probing or tunnel._blackhole_watch:
                await trio.sleep(0.05)
            await stream.aclose()
            assert asked == [("sent", server)]
            assert tunnel.narrow_paths == {}
            assert tunnel.stack.path_mtu(raw) == 1420 and raw not in tunnel._holes
            assert "seem to vanish" not in caplog.text
            assert (
                f"full-sized segments to {server} were lost 3 times in a row, but pings of "
                "1420 bytes to it come back: losses, not a black hole" in caplog.text
            )
            other = await tunnel.open_tcp_stream(server, peer.http_port)
            posted = await http_post_json(other, "/upload", 5 * MB)
            assert posted == {"sha256": pattern_sha256(5 * MB), "size": 5 * MB}
            assert other._sock.stats.blackhole_shrinks == 0
            assert other._sock._smss == 1420 - 40 - 12
            await other.aclose()


async def test_an_exit_restart_mid_upload_is_no_black_hole(fresh_exit_peer: ExitPeer) -> None:
    """The exit restarts during an upload (it lost our session): the upload's full-sized
    segments time out three times in a row and shrink, as in a black hole, but they get
    through only after a new handshake, which explains the timeouts as well. The tunnel
    does not take its path for a black hole: no narrowing, later connections at full
    size. (The handshake is asked for here; by itself WireGuard would start it 15 s after
    the exit fell silent.)"""
    peer = fresh_exit_peer
    async with exit_tunnel(peer) as (tunnel, _):
        with trio.fail_after(60):
            stream = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            tcp = stream._sock
            result: list[Any] = []

            async def upload() -> None:
                result.append(await http_post_json(stream, "/upload", 20 * MB))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(upload)
                while tcp.snd_una == tcp._iss + 1:  # (the upload is under way)
                    await trio.sleep(0.001)
                peer.stop_wireguard()
                while tcp.stats.blackhole_shrinks == 0:
                    await trio.sleep(0.01)
                peer.start_wireguard()
                await tunnel.handshake(tunnel.device.peers[peer.server_public_key])
            assert result == [{"sha256": pattern_sha256(20 * MB), "size": 20 * MB}]
            await stream.aclose()
            assert tunnel.narrow_paths == {}
            stream = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            assert stream._sock._smss > 1200
            await stream.aclose()


@pytest.mark.parametrize("family", [4, 6], ids=["v4-endpoint", "v6-endpoint"])
async def test_a_black_hole_a_download_only_tunnel_finds(
    fresh_exit_peer: ExitPeer, family: int
) -> None:
    """The same black hole, and nothing but downloads: requests and ACKs are small, so no
    segment of ours ever finds the hole and the sender's rule above never fires. The
    server's full-sized segments vanish; wireguard-go + Linux stall there for good.

    Our receiver notices the stall (the response's headers came, in a small segment, and
    nothing more for a second), and the tunnel asks the path with two pings through the
    tunnel to that server: one of the tunnel's full size, one of 1200 bytes. Only the small one comes back: the tunnel shrinks every
    connection through that endpoint and tells the server, as a router would, that the
    path to us is narrower; the download ends byte-exact, and a new connection's download
    (its SYN asks for small segments) loses nothing more to the hole. The same behind an
    IPv6 endpoint (1200 bytes plus a WireGuard layer over IPv6 fit IPv6's 1280)."""
    peer = fresh_exit_peer
    async with holey_tunnel(peer, family) as (tunnel, relay):
        with trio.fail_after(60):
            stream = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            await get_pattern(stream, 5 * MB)
            await stream.aclose()
            assert relay.down.dropped > 0
            assert relay.up.dropped == 3  # the big pings: the only full-sized packets we sent
            assert tunnel.stack.stats.path_probes == 1
            assert tunnel.narrow_paths == {relay.address: 1200}

            dropped = relay.up.dropped, relay.down.dropped
            stream = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            await get_pattern(stream, 5 * MB)
            await stream.aclose()
            assert (relay.up.dropped, relay.down.dropped) == dropped


async def test_a_black_hole_that_goes_away(
    fresh_exit_peer: ExitPeer, caplog: pytest.LogCaptureFixture
) -> None:
    """The hole found (by a download), the tunnel asks the path again every
    ``reprobe_after`` seconds (600 by default, 2 here), with pings to the server of an open
    connection: the tunnel's full size and the narrowed one. While the hole is there the
    big one vanishes and nothing changes. Then the path changes (a laptop back on its home
    line; or the verdict was wrong): the big ping comes back, the tunnel logs it, the open
    connection sends full-sized segments again, a new connection's SYN offers the full
    MSS, and its upload ends byte-exact."""
    peer = fresh_exit_peer
    caplog.set_level(logging.INFO, logger="mitm_wg")
    async with holey_tunnel(peer) as (tunnel, relay):
        tunnel.reprobe_after = 2.0
        stats = tunnel.stack.stats
        with trio.fail_after(60):
            stream = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            await get_pattern(stream, MB)
            assert tunnel.narrow_paths == {relay.address: 1200}
            assert stats.path_probes == 1 and stream._sock._smss == 1200 - 52
            while stats.path_probes == 1 or tunnel._probing:  # asked again: still a hole
                await trio.sleep(0.05)
            assert tunnel.narrow_paths == {relay.address: 1200}
            dropped = relay.up.dropped

            relay.set_impairment(Impairment())
            while tunnel.narrow_paths:
                await trio.sleep(0.05)
            assert relay.up.dropped == dropped
            assert stats.path_probes == 3 and stream._sock._smss == 1420 - 52
            host, port = relay.address
            assert f"full-sized packets to WireGuard endpoint {host}:{port} pass again" in (
                caplog.text
            )
            await get_pattern(stream, MB)  # (still open and working)
            await stream.aclose()
            stream = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            # our SYN offered the full MSS (the server, told of 1200 by our ICMP error,
            # keeps that for its ten minutes: its SYN-ACK offers 1160)
            assert stream._sock._pmtu_mss is None
            assert tunnel.stack.path_mtu(peer.server_tunnel_v4) == 1420
            result = await http_post_json(stream, "/upload", 5 * MB)
            assert result == {"sha256": pattern_sha256(5 * MB), "size": 5 * MB}
            await stream.aclose()


async def test_a_black_hole_that_opens_mid_session(fresh_exit_peer: ExitPeer) -> None:
    """The path carried full-sized packets (a download; its connection stays open), then
    it turns into a black hole (the laptop moved to a line that drops them, ICMP errors
    and all). What came before proves nothing about the path now: a new connection's
    download stalls, the tunnel asks the path, and it ends byte-exact."""
    peer = fresh_exit_peer
    async with holey_tunnel(peer, hole=False) as (tunnel, relay):
        with trio.fail_after(60):
            before = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            await get_pattern(before, MB)
            assert before._sock._rcv_mss == 1420 - 52 and relay.down.dropped == 0
            relay.set_impairment(HOLE[4])
            stream = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            await get_pattern(stream, 5 * MB)
            assert relay.down.dropped > 0
            assert tunnel.narrow_paths == {relay.address: 1200}
            assert tunnel.stack.stats.path_probes == 1
            await stream.aclose()
            await before.aclose()


async def test_a_slow_server_on_a_sound_path(fresh_exit_peer: ExitPeer) -> None:
    """A server that takes its time (here: a request whose end never comes) shows the
    same sign as a black hole: our request acknowledged, no answer for a second. Alone,
    the tunnel asks the path once: the big ping comes back (FITS), nothing narrows, and
    another slow answer within a minute is not asked about again. The path under the
    tunnel is then known to carry full-sized packets (found fine a moment ago; and a
    download beside keeps bringing them): a slow answer from another host (the exit's
    IPv6 address) asks only whether the way to that host does, with pings to it alone
    (FITS again), once a minute at most. (An exit of its own: the others here were told
    of a 1200-byte path, and keep that for ten minutes.)"""
    peer = fresh_exit_peer
    assert peer.server_tunnel_v6 is not None

    async def slow_request(tunnel: Tunnel, host: str) -> TunnelStream:
        stream = await tunnel.open_tcp_stream(host, peer.http_port)
        await stream.send_all(b"GET /bytes/1 HTTP/1.1\r\nHost: x\r\n")  # (no end of head)
        while stream._sock.stats.rx_stalls == 0:
            await trio.sleep(0.05)
        return stream

    async with exit_tunnel(peer) as (tunnel, _):
        stats = tunnel.stack.stats
        v4, v6 = peer.server_tunnel_v4, peer.server_tunnel_v6
        asked = record_probes(tunnel)
        with trio.fail_after(60):
            alone = await slow_request(tunnel, v4)
            while tunnel._probing or not asked:
                await trio.sleep(0.05)
            assert asked == [("stall", v4)]
            assert stats.path_probes == 1 and stats.path_probe_replies >= 1
            again = await slow_request(tunnel, v4)
            await trio.sleep(0.1)
            assert stats.path_probes == 1

            download = await tunnel.open_tcp_stream(v4, peer.http_port)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(get_pattern, download, 100 * MB)
                while download._sock._rcv_mss < 1368:  # (under way)
                    await trio.sleep(0.001)
                beside = await slow_request(tunnel, v6)
                while tunnel._probing or len(asked) < 2:
                    await trio.sleep(0.05)
                assert asked == [("stall", v4), ("host", v6)]
                beside_again = await slow_request(tunnel, v6)
                await trio.sleep(0.1)
                assert stats.path_probes == 2
            assert tunnel.narrow_paths == {} and tunnel._holes == {}
            assert tunnel.stack.path_mtu(v4) == tunnel.stack.path_mtu(v6) == 1420
            for stream in (download, beside, beside_again, alone, again):
                await stream.aclose()


async def test_a_server_that_answers_no_ping_behind_a_black_hole(
    fresh_exit_peer: ExitPeer, workdir: Path
) -> None:
    """Many servers answer no ping (a firewall drops ICMP echo): the stalled download's
    server leaves the question open. The tunnel then asks its DNS server (the exit here,
    as with most VPNs), behind the same peer: only the small ping comes back, and the
    download from the server behind the exit ends byte-exact. Once the path heals, the
    question whether the hole is gone, put to the one open connection's server, gets no
    answer either: the DNS server answers it, and the path is wide again."""
    peer = fresh_exit_peer
    with origin_behind([peer], "mwgq", ["10.99.0.1"]) as origin_ns:
        origin_ns.exec(["sysctl", "-qw", NO_ECHO[4]])
        here = workdir / "no-ping"  # (not the directory of the origin of a test before)
        here.mkdir()
        with run_origin(origin_ns, here, http=["10.99.0.1:80"]):
            allowed = f"{peer.tunnel_v4_net}, 10.99.0.0/24"
            async with holey_tunnel(peer, allowed_ips=allowed) as (tunnel, relay):
                assert [str(s) for s in tunnel.config.dns_servers] == [peer.dns_server]
                stats = tunnel.stack.stats
                with trio.fail_after(60):
                    stream = await tunnel.open_tcp_stream("10.99.0.1", 80)
                    await get_pattern(stream, 5 * MB)
                    await stream.aclose()
                assert stats.path_probes == 2  # the origin's (no answer), the DNS server's
                assert tunnel.narrow_paths == {relay.address: 1200}
                assert relay.down.dropped > 0

                with trio.fail_after(60):
                    stream = await tunnel.open_tcp_stream("10.99.0.1", 80)
                    relay.set_impairment(Impairment())
                    tunnel.reprobe_after = 1.0
                    while tunnel.narrow_paths:
                        await trio.sleep(0.05)
                    assert stats.path_probes == 4
                    assert snmp(origin_ns, "Icmp:OutEchoReps") == 0
                    await get_pattern(stream, MB)
                    await stream.aclose()


@pytest.mark.parametrize(
    ("beside", "dns", "family"),
    [(False, True, 4), (True, True, 4), (False, False, 4), (False, True, 6), (True, False, 6)],
    ids=["alone", "beside-a-download", "no-dns-server", "alone-v6", "beside-a-download-v6"],
)
async def test_a_black_hole_beyond_the_exit(
    fresh_exit_peer: ExitPeer,
    workdir: Path,
    caplog: pytest.LogCaptureFixture,
    beside: bool,
    dns: bool,
    family: int,
) -> None:
    """The path under the tunnel is sound, but the way from the exit to one server loses
    that server's full-sized packets without a word (here a router beyond the exit drops
    its packets of over 1280 bytes; a server whose firewall drops large pings looks the
    same to the tunnel, and is treated the same). Its download stalls; the tunnel pings
    it (only the small ping comes back), then its DNS server, the exit: the big one comes
    back. So the hole lies beyond the exit: only that server's connections shrink to
    1200-byte packets (1280 over IPv6, its minimum; the server is told, and the download
    ends byte-exact); the endpoint stays wide, and the exit's own downloads keep
    full-sized segments. With a download from the exit beside it, the path under the
    tunnel is known to carry them and the server alone is asked. A config without DNS
    servers has the server of another open connection asked (the exit's, idle here)
    instead of the DNS server. The same over IPv6, inside the tunnel, with the exit's
    IPv6 address for its own downloads (the DNS server stays IPv4: the path under the
    tunnel is the same whatever the family inside).
    Once the link is mended, the re-probe of that server (pings to it, while a
    connection to it is open) finds the full size passing, and it grows back; with none
    open, the narrowing is forgotten then, as Linux's learnt path MTUs expire."""
    peer = fresh_exit_peer
    caplog.set_level(logging.INFO, logger="mitm_wg")
    if family == 4:
        origin, exit_host, allowed = "10.99.0.1", peer.server_tunnel_v4, "10.99.0.0/24"
        ip, narrowed = 40, 1200
    else:
        assert peer.server_tunnel_v6 is not None
        origin, exit_host, allowed = "fd00:99::1", peer.server_tunnel_v6, "fd00:99::/64"
        ip, narrowed = 60, 1280
    full = 1420 - ip - 12  # (a full-sized segment's payload, with timestamps)
    name = f"beyond-{beside}-{dns}-{family}"
    with origins_behind_exit(peer, workdir, name, [origin]) as (_, mend):
        allowed = f"{peer.tunnel_v4_net}, {peer.tunnel_v6_net}, {allowed}"
        text = peer.client_config_text(allowed_ips=allowed, dns=dns)
        async with exit_tunnel(peer, text) as (tunnel, _):
            assert len(tunnel.config.dns_servers) == dns
            stack, asked = tunnel.stack, record_probes(tunnel)
            with trio.fail_after(60):
                download = await tunnel.open_tcp_stream(exit_host, peer.http_port)
                async with trio.open_nursery() as nursery:
                    if beside:
                        nursery.start_soon(endless_download, download)
                        while download._sock._rcv_mss < full:  # (under way)
                            await trio.sleep(0.001)
                    stream = await tunnel.open_tcp_stream(origin, 80)
                    await get_pattern(stream, 5 * MB)
                    nursery.cancel_scope.cancel()
                if beside:
                    assert asked == [("host", origin)]
                else:
                    asked_too = peer.server_tunnel_v4 if dns else exit_host
                    assert asked == [("stall", origin), ("confirm", asked_too)]
                    await get_pattern(download, 5 * MB)
                assert download._sock._rcv_mss == full and download._sock._smss == full
                assert tunnel.narrow_paths == {}
                assert stack.path_mtu(origin) == narrowed and stack.path_mtu(exit_host) == 1420
                assert stream._sock._smss == narrowed - ip - 12
                host, port = tunnel.config.peers[0].endpoint
                assert (
                    f"full-sized packets from {origin} seem to vanish beyond WireGuard "
                    f"endpoint {host}:{port}" in caplog.text
                )
                assert (
                    f"  path to {origin}: packets of at most {narrowed} bytes (a black hole "
                    "on the way to it alone)"
                ) in str(tunnel.status())

                mend()
                asked.clear()
                if beside:  # (no connection to it open: forgotten, not asked)
                    await stream.aclose()
                tunnel.reprobe_after = 1.0
                while stack.path_mtu(origin) < 1420:
                    await trio.sleep(0.05)
                assert asked == ([] if beside else [("up", origin)])
                assert tunnel._holes == {}
                assert f"full-sized packets from {origin} pass again" in caplog.text
                assert tunnel.status().narrowed == ()
                if beside:
                    # (our SYN offers the full MSS; the server, told of 1200 by our
                    # ICMP error, keeps that for its ten minutes)
                    stream = await tunnel.open_tcp_stream(origin, 80)
                    assert stream._sock._pmtu_mss is None
                else:
                    assert stream._sock._smss == full
                await get_pattern(stream, 5 * MB)
                await stream.aclose()
                await download.aclose()


async def test_a_black_hole_under_the_tunnel_confirmed_by_the_dns_server(
    fresh_exit_peer: ExitPeer, workdir: Path
) -> None:
    """The black hole is under the tunnel, and the stalled download comes from a server
    behind the exit that answers pings: only the small one comes back. The server's own
    connections shrink at once (the download goes on), and the tunnel's DNS server, the
    exit, asked the same, answers only the small ping too: the hole lies under the
    tunnel, and the endpoint narrows (the exit's own downloads start small, and lose
    nothing to the hole)."""
    peer = fresh_exit_peer
    origin, exit_host = "10.99.0.1", peer.server_tunnel_v4
    with origins_behind_exit(peer, workdir, "under", [origin], hole_beyond=False):
        allowed = f"{peer.tunnel_v4_net}, 10.99.0.0/24"
        async with holey_tunnel(peer, allowed_ips=allowed) as (tunnel, relay):
            asked = record_probes(tunnel)
            with trio.fail_after(60):
                stream = await tunnel.open_tcp_stream(origin, 80)
                await get_pattern(stream, 5 * MB)
                while tunnel._probing:
                    await trio.sleep(0.05)
                assert asked == [("stall", origin), ("confirm", exit_host)]
                assert tunnel.narrow_paths == {relay.address: 1200}
                assert tunnel._holes.keys() == {relay.address}
                assert tunnel.status().narrowed == (
                    f"path to WireGuard endpoint {format_endpoint(relay.address)}: packets "
                    "of at most 1200 bytes (a black hole)",
                )
                assert relay.up.dropped == 6  # (the big pings: three to each)
                dropped = relay.up.dropped, relay.down.dropped
                download = await tunnel.open_tcp_stream(exit_host, peer.http_port)
                await get_pattern(download, 5 * MB)
                assert (relay.up.dropped, relay.down.dropped) == dropped
                assert download._sock._smss == 1200 - 52
                await download.aclose()
                await stream.aclose()


async def test_a_black_hole_beyond_the_exit_after_a_slow_server(
    fresh_exit_peer: ExitPeer, workdir: Path
) -> None:
    """A slow server (a request whose end never comes) had the path under the tunnel
    asked a moment ago: fine. A download from a server behind a hole beyond the exit
    stalls within the minute after, with nothing else arriving: the path under the
    tunnel is known fine, so that server alone is asked (before, no probe at all within
    that minute: the download stalled for good), and only it narrows."""
    peer = fresh_exit_peer
    origin, exit_host = "10.99.0.1", peer.server_tunnel_v4
    with origins_behind_exit(peer, workdir, "after-slow", [origin]):
        allowed = f"{peer.tunnel_v4_net}, 10.99.0.0/24"
        text = peer.client_config_text(allowed_ips=allowed)
        async with exit_tunnel(peer, text) as (tunnel, _):
            asked = record_probes(tunnel)
            with trio.fail_after(60):
                slow = await tunnel.open_tcp_stream(exit_host, peer.http_port)
                await slow.send_all(b"GET /bytes/1 HTTP/1.1\r\nHost: x\r\n")  # (no end)
                while not asked or tunnel._probing:
                    await trio.sleep(0.05)
                assert asked == [("stall", exit_host)] and tunnel.narrow_paths == {}
                stream = await tunnel.open_tcp_stream(origin, 80)
                await get_pattern(stream, 5 * MB)
            assert asked == [("stall", exit_host), ("host", origin)]
            assert tunnel.narrow_paths == {}
            assert tunnel.stack.path_mtu(origin) == 1200
            for s in (slow, stream):
                await s.aclose()


async def test_servers_that_answer_no_ping_beyond_the_exit(
    fresh_exit_peer: ExitPeer, workdir: Path
) -> None:
    """Two servers behind a hole beyond the exit that answer no ping, as many do (the
    classic black hole: the firewall that drops ICMP echo drops the errors that would
    have told the server of the narrower link too). The first one's download stalls
    after its small reply headers: its pings go unanswered, the DNS server's big ping
    comes back, so the path under the tunnel is sound, and a connection that got only
    small segments points at a hole beyond the exit: that server narrows, and the download
    ends byte-exact. The second one is merely slow (nothing arrived yet): asked alone,
    the path under the tunnel being known fine, it answers nothing, and nothing narrows;
    a download from it a moment later stalls like the first one's: it is not asked again
    (it just answered no ping), and narrows. A third one's download stalls the same way:
    asked alone, no answer, and it narrows."""
    peer = fresh_exit_peer
    first, second, third = "10.99.0.1", "10.99.0.2", "10.99.0.3"
    exit_host = peer.server_tunnel_v4
    with origins_behind_exit(peer, workdir, "no-ping-beyond", [first, second, third]) as (
        origin_ns,
        _,
    ):
        origin_ns.exec(["sysctl", "-qw", NO_ECHO[4]])
        allowed = f"{peer.tunnel_v4_net}, 10.99.0.0/24"
        text = peer.client_config_text(allowed_ips=allowed)
        async with exit_tunnel(peer, text) as (tunnel, _):
            asked, stack = record_probes(tunnel), tunnel.stack
            with trio.fail_after(60):
                stream = await tunnel.open_tcp_stream(first, 80)
                await get_pattern(stream, 5 * MB)
                assert asked == [("stall", first), ("other", exit_host)]
                assert stack.path_mtu(first) == 1200 and tunnel.narrow_paths == {}
                slow = await tunnel.open_tcp_stream(second, 80)
                await slow.send_all(b"GET /bytes/1 HTTP/1.1\r\nHost: x\r\n")  # (no end)
                while len(asked) < 3 or tunnel._probing:
                    await trio.sleep(0.05)
                assert asked[2:] == [("host", second)]
                assert stack.path_mtu(second) == 1420 and tunnel.narrow_paths == {}
                # (another server has a kernel of its own, which our ICMP error to the
                # first did not teach: this one forgets it)
                origin_ns.exec(["ip", "route", "flush", "cache"])
                again = await tunnel.open_tcp_stream(second, 80)
                await get_pattern(again, 5 * MB)
                assert len(asked) == 3 and stack.path_mtu(second) == 1200
                origin_ns.exec(["ip", "route", "flush", "cache"])
                other = await tunnel.open_tcp_stream(third, 80)
                await get_pattern(other, 5 * MB)
            assert asked[3:] == [("host", third)]
            assert stack.path_mtu(third) == 1200 and tunnel.narrow_paths == {}
            assert snmp(origin_ns, "Icmp:OutEchoReps") == 0
            for s in (stream, slow, again, other):
                await s.aclose()


async def test_two_servers_beyond_the_exit(fresh_exit_peer: ExitPeer, workdir: Path) -> None:
    """Two servers behind the same silent hole beyond the exit, a config without DNS
    servers, and connections open to the first server and to the exit. The first
    server's stalled download is confirmed with pings to the exit (the other open
    connection's server). The second one's is too, though the first server's connection
    comes first: its path is known to lose the big ping, and asking it would pass a hole
    beyond the exit for one under the tunnel (the endpoint stays wide)."""
    peer = fresh_exit_peer
    first, second, exit_host = "10.99.0.1", "10.99.0.2", peer.server_tunnel_v4
    with origins_behind_exit(peer, workdir, "two-beyond", [first, second]) as (origin_ns, _):
        allowed = f"{peer.tunnel_v4_net}, 10.99.0.0/24"
        text = peer.client_config_text(allowed_ips=allowed, dns=False)
        async with exit_tunnel(peer, text) as (tunnel, _):
            asked = record_probes(tunnel)
            with trio.fail_after(60):
                one = await tunnel.open_tcp_stream(first, 80)
                idle = await tunnel.open_tcp_stream(exit_host, peer.http_port)
                await get_pattern(one, 2 * MB)
                # (a second server has a kernel of its own, which our ICMP error to
                # the first did not teach: this one forgets it)
                origin_ns.exec(["ip", "route", "flush", "cache"])
                two = await tunnel.open_tcp_stream(second, 80)
                await get_pattern(two, 2 * MB)
                while tunnel._probing:
                    await trio.sleep(0.05)
            assert asked == [
                ("stall", first), ("confirm", exit_host),
                ("stall", second), ("confirm", exit_host),
            ]  # fmt: skip
            assert tunnel.narrow_paths == {}
            assert tunnel.stack.path_mtu(exit_host) == 1420
            for stream in (one, idle, two):
                await stream.aclose()


@pytest.mark.parametrize(
    ("dns", "family"),
    [(True, 4), (False, 4), (True, 6), (False, 6)],
    ids=["dns-server", "nobody-to-ask", "dns-server-v6", "nobody-to-ask-v6"],
)
async def test_silent_servers_whose_reply_starts_full_sized_beyond_the_exit(
    fresh_exit_peer: ExitPeer,
    workdir: Path,
    caplog: pytest.LogCaptureFixture,
    dns: bool,
    family: int,
) -> None:
    """Servers behind a hole beyond the exit that answer no ping and send a reply's head
    and body in one write (as nginx with sendfile does): its first segment is already
    full-sized, so nothing at all arrives, as from a slow server. The stalled connection
    asks the server how far it has sent (a segment below its window draws an ACK with its
    SND.NXT): beyond what we got, so data vanished, and that server narrows; the
    download ends byte-exact. With a DNS server, the exit's big ping comes back first:
    the hole lies beyond it. A second server, merely slow at first (its SND.NXT is what
    we got: nothing narrows), then behind the same hole: it is not pinged again (it just
    answered none); its answer alone narrows it. Without a DNS server and with nobody
    else to ask (the one other connection's server has a hole of its own), the signs
    alone narrow each server. The same with servers on IPv6 inside the tunnel (they are
    told of 1280 bytes, IPv6's minimum)."""
    peer = fresh_exit_peer
    caplog.set_level(logging.INFO, logger="mitm_wg")
    if family == 4:
        first, second, narrowed = "10.99.0.1", "10.99.0.2", 1200
    else:
        first, second, narrowed = "fd00:99::1", "fd00:99::2", 1280
    exit_host = peer.server_tunnel_v4
    name = f"together-{dns}-{family}"
    with origins_behind_exit(peer, workdir, name, [first, second]) as (ns, _):
        ns.exec(["sysctl", "-qw", NO_ECHO[family]])
        allowed = f"{peer.tunnel_v4_net}, {peer.tunnel_v6_net}, 10.99.0.0/24, fd00:99::/64"
        text = peer.client_config_text(allowed_ips=allowed, dns=dns)
        async with exit_tunnel(peer, text) as (tunnel, _):
            asked, stack = record_probes(tunnel), tunnel.stack
            host, port = tunnel.config.peers[0].endpoint

            def said(server: str) -> str:
                if dns:
                    return (
                        f"full-sized packets from {server} seem to vanish beyond WireGuard "
                        f"endpoint {host}:{port} (it sent data that never came and answers "
                        "no ping"
                    )
                return (
                    f"full-sized packets from {server} seem to vanish on the way (it sent "
                    "data that never came and answers no ping; no other host behind "
                    f"WireGuard endpoint {host}:{port}"
                )

            with trio.fail_after(60):
                one = await tunnel.open_tcp_stream(first, 80)
                await get_together(one, 5 * MB)
                assert asked == (
                    [("stall", first), ("other", exit_host)] if dns else [("stall", first)]
                )
                assert stack.path_mtu(first) == narrowed and tunnel.narrow_paths == {}
                assert one._sock.stats.stall_probes == 1
                assert said(first) in caplog.text

                slow = await tunnel.open_tcp_stream(second, 80)
                await slow.send_all(b"GET /bytes/1 HTTP/1.1\r\nHost: x\r\n")  # (no end)
                while len(asked) < (3 if dns else 2) or tunnel._probing:
                    await trio.sleep(0.05)
                assert asked[-1] == ("host" if dns else "stall", second)
                assert slow._sock.stats.stall_probes == 1 and not slow._sock.data_vanished
                assert stack.path_mtu(second) == 1420
                # (a second server has a kernel of its own, which our ICMP error to the
                # first did not teach: this one forgets it)
                ns.exec(["ip", f"-{family}", "route", "flush", "cache"])
                two = await tunnel.open_tcp_stream(second, 80)
                await get_together(two, 5 * MB)
            assert len(asked) == (3 if dns else 2) and stack.path_mtu(second) == narrowed
            assert said(second) in caplog.text
            assert tunnel.narrow_paths == {} and stack.path_mtu(exit_host) == 1420
            assert snmp(ns, "Icmp:OutEchoReps" if family == 4 else "Icmp6OutEchoReplies") == 0
            for s in (one, slow, two):
                await s.aclose()


async def test_an_answer_due_after_a_half_close_beyond_the_exit(
    fresh_exit_peer: ExitPeer, workdir: Path
) -> None:
    """A client that half-closes once its request is out (a SOCKS client's raw TCP, whose
    FIN mitmproxy relays) to a server behind a hole beyond the exit: its small greeting
    arrives, its full-sized answer does not. The answer is due though our FIN is out
    (before, nothing was expected after it, and the transfer stalled for good): the
    stall is seen, the server answers only the small ping, the exit the big one, and
    that server alone narrows; the answer ends byte-exact."""
    peer = fresh_exit_peer
    origin, exit_host, size = "10.99.0.1", peer.server_tunnel_v4, 2 * MB
    with origins_behind_exit(peer, workdir, "half-closed", [origin]):
        allowed = f"{peer.tunnel_v4_net}, 10.99.0.0/24"
        async with exit_tunnel(peer, peer.client_config_text(allowed_ips=allowed)) as (
            tunnel,
            _,
        ):
            asked = record_probes(tunnel)
            with trio.fail_after(60):
                stream = await tunnel.open_tcp_stream(origin, 7000)
                request = b"SEND %d\n" % size
                got = await raw_exchange(stream, request)
            assert got[:size] == pattern(size)
            assert got[size:] == f"GOT {len(request)} {sha256(request).hexdigest()}\n".encode()
            assert asked == [("stall", origin), ("confirm", exit_host)]
            assert tunnel.stack.path_mtu(origin) == 1200 and tunnel.narrow_paths == {}
            await stream.aclose()


@pytest.mark.parametrize(
    ("under", "family"),
    [(False, 4), (True, 4), (False, 6)],
    ids=["beyond-the-exit", "under-the-tunnel", "beyond-the-exit-v6"],
)
async def test_an_upload_into_a_black_hole(
    fresh_exit_peer: ExitPeer,
    workdir: Path,
    caplog: pytest.LogCaptureFixture,
    under: bool,
    family: int,
) -> None:
    """An upload to a server behind the exit through a black hole on the way to it: our
    full-sized segments vanish, its small ACKs come back. The upload takes the path for
    a black hole after three timeouts in a row, resends smaller, and ends byte-exact;
    that server narrows at once (no use sending it more full-sized segments, wherever
    the hole is); its own big ping vanishes too (it was no mere loss), and pings to the
    tunnel's DNS server, the exit, tell where the hole is.
    Beyond the exit (on the way to that server alone): they come back full-sized, so
    only that server stays narrowed, the endpoint stays wide, and an upload to the exit
    keeps full-sized segments (before, every connection through the endpoint shrank,
    with a warning to set a smaller MTU in the config). Under the tunnel: the big ping
    vanishes too, so every connection through the endpoint shrinks, with that warning,
    and the upload to the exit loses nothing more to the hole. The same beyond the exit
    with the server and the exit on IPv6 inside the tunnel (1280 bytes: IPv6's minimum;
    the DNS server stays IPv4)."""
    peer = fresh_exit_peer
    caplog.set_level(logging.INFO, logger="mitm_wg")
    if family == 4:
        origin, exit_host, ip, narrowed = "10.99.0.1", peer.server_tunnel_v4, 40, 1200
    else:
        assert peer.server_tunnel_v6 is not None
        origin, exit_host, ip, narrowed = "fd00:99::1", peer.server_tunnel_v6, 60, 1280
    size = 5 * MB
    allowed = f"{peer.tunnel_v4_net}, {peer.tunnel_v6_net}, 10.99.0.0/24, fd00:99::/64"
    with origins_behind_exit(
        peer, workdir, f"upload-{under}-{family}", [origin], hole_beyond=not under, toward=True
    ):
        async with contextlib.AsyncExitStack() as astack:
            if under:
                tunnel, relay = await astack.enter_async_context(
                    holey_tunnel(peer, allowed_ips=allowed)
                )
                host, port = key = relay.address
            else:
                text = peer.client_config_text(allowed_ips=allowed)
                tunnel, _ = await astack.enter_async_context(exit_tunnel(peer, text))
                host, port = key = tunnel.config.peers[0].endpoint
            asked = record_probes(tunnel)
            with trio.fail_after(60):
                stream = await tunnel.open_tcp_stream(origin, 7000)
                got = await raw_exchange(stream, pattern(size))
                assert got == f"GOT {size} {sha256(pattern(size)).hexdigest()}\n".encode()
                assert stream._sock.stats.blackhole_shrinks == 1
                while tunnel._probing or tunnel._blackhole_watch:
                    await trio.sleep(0.05)
                assert asked == [("sent", origin), ("confirm", peer.dns_server)]
                assert tunnel.stack.path_mtu(origin) == narrowed
                vanish = f"full-sized packets to {origin} seem to vanish beyond WireGuard "
                warning = f"full-sized packets to WireGuard endpoint {host}:{port} seem to vanish"
                if under:
                    assert tunnel.narrow_paths == {key: 1200}
                    assert warning in caplog.text and vanish not in caplog.text
                    dropped = relay.up.dropped
                else:
                    assert tunnel.narrow_paths == {}
                    assert vanish + f"endpoint {host}:{port}" in caplog.text
                    assert warning not in caplog.text
                other = await tunnel.open_tcp_stream(exit_host, peer.http_port)
                result = await http_post_json(other, "/upload", size)
                assert result == {"sha256": pattern_sha256(size), "size": size}
                assert other._sock.stats.blackhole_shrinks == 0
                assert other._sock._smss == (1200 if under else 1420) - ip - 12
                if under:
                    assert relay.up.dropped == dropped
            for s in (stream, other):
                await s.aclose()


async def test_a_stall_during_an_outage_is_reported_again(
    fresh_exit_peer: ExitPeer, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server behind a hole beyond the exit that answers no ping, its reply full-sized
    from the first segment, and the path under the tunnel goes dark for a few seconds
    just as the download stalls (a Wi-Fi hand-over; another client with our key taking
    the exit's replies until our next handshake): the stall's question to the server,
    its answer and every ping are lost, and nothing is decided. Nothing arriving still,
    the connection reports the stall again (2 s later, then 4, ...) and asks the server
    again: once the path is back the signs are there, and with the DNS server just silent
    (during the outage) there is nobody else to ask, so that server narrows alone and is
    told; the download ends byte-exact. (Before, one report and the download stalled for
    good.)"""
    peer = fresh_exit_peer
    caplog.set_level(logging.INFO, logger="mitm_wg")
    origin, size = "10.99.0.1", 5 * MB
    with origins_behind_exit(peer, workdir, "outage", [origin]) as (ns, _):
        ns.exec(["sysctl", "-qw", NO_ECHO[4]])
        allowed = f"{peer.tunnel_v4_net}, 10.99.0.0/24"
        async with holey_tunnel(peer, hole=False, allowed_ips=allowed) as (tunnel, relay):
            asked = record_probes(tunnel)
            with trio.fail_after(60):
                stream = await tunnel.open_tcp_stream(origin, 80)
                tcp = stream._sock

                async def outage() -> None:
                    while tcp.stats.rx_stalls == 0:  # (the request out, its answer lost)
                        await trio.sleep(0.001)
                    relay.set_impairment(Impairment(loss=1.0))
                    while len(asked) < 2 or tunnel._probing:
                        await trio.sleep(0.05)
                    relay.set_impairment(Impairment())

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(outage)
                    await get_together(stream, size)
            assert asked == [("stall", origin), ("other", peer.dns_server)]
            assert relay.up.dropped > 0 and tunnel.stack.path_mtu(origin) == 1200
            assert tunnel.narrow_paths == {} and tcp.stats.rx_stalls == 1
            assert "no other host behind WireGuard endpoint" in caplog.text
            await stream.aclose()


async def raw_exchange(stream: TunnelStream, data: bytes) -> bytearray:
    """The origin's raw TCP service (``e2e_helpers``): read its greeting, send ``data``,
    half-close, and return everything it sends after the greeting, to its close."""
    got = bytearray()
    while not got.endswith(b"\n"):
        got += await stream.receive_some(65536)
    assert got.startswith(b"HELLO ")
    await stream.send_all(data)
    await stream.send_eof()
    got.clear()
    while chunk := await stream.receive_some(1 << 20):
        got += chunk
    return got


async def get_together(stream: TunnelStream, size: int) -> None:
    """``get_pattern``, from an origin that sends the head and the body's start in one
    write (``?together``)."""
    resp = await http_get(stream, f"/bytes/{size}?together")
    assert (resp.status, resp.size, resp.sha256) == (200, size, pattern_sha256(size))


async def endless_download(stream: TunnelStream) -> None:
    """Full-sized segments from the exit until cancelled."""
    while True:
        await get_pattern(stream, 20 * MB)
