"""Proves the real-peer harness itself (no mitm-wg code): namespaces, wireguard-go, dnsmasq,
mitmproxy's WireGuard mode, the impairment relay, and that nothing is left behind."""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import pytest
import trio
from conftest import require_mitmdump, require_netns
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from harness import (
    ExitPeer,
    ImpairedRelay,
    Impairment,
    MitmPeer,
    Netns,
    cleanup_stale,
    exit_peer,
    list_namespaces,
    live_resources,
    mitmproxy_wireguard_peer,
    origin_behind,
    parse_wg_dump,
    parse_wg_quick,
    pattern,
    wait_until,
    wireguard_go_interface,
)
from harness.netns import STATE_DIR, WG_SOCKET_DIR


def curl(ns: Netns, *args: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return ns.exec(["curl", "-sS", "--noproxy", "*", "-m", str(timeout), *args], check=False)


@pytest.fixture
def wg_client(exit_peer: ExitPeer) -> Iterator[ExitPeer]:
    """The module's exit peer with a reference wireguard-go client up in client_ns."""
    with wireguard_go_interface(
        exit_peer.client_ns,
        exit_peer.client_ifname,
        exit_peer.client_config_text(),
        exit_peer.workdir,
    ):
        yield exit_peer


# -- pure parsing (no root needed) -------------------------------------------------------------


def test_parse_wg_dump_skips_interface_line() -> None:
    pub = base64.b64encode(bytes(range(32))).decode()
    dump = (
        "PRIVATEKEY=\tPUBKEY=\t51820\toff\n"
        f"{pub}\t(none)\t10.77.1.1:40000\t10.78.1.2/32,fd00:78:1::2/128\t1700000000\t123\t456\toff\n"
        f"{pub}\t(none)\t(none)\t(none)\t0\t0\t0\t25\n"
    )
    a, b = parse_wg_dump(dump)
    assert a.public_key == bytes(range(32))
    assert a.endpoint == ("10.77.1.1", 40000)
    assert a.allowed_ips == ("10.78.1.2/32", "fd00:78:1::2/128")
    assert (a.latest_handshake, a.rx_bytes, a.tx_bytes, a.persistent_keepalive) == (
        1700000000,
        123,
        456,
        None,
    )
    assert (b.endpoint, b.allowed_ips, b.latest_handshake, b.persistent_keepalive) == (
        None,
        (),
        0,
        25,
    )


def test_pattern_matches_definition() -> None:
    data = pattern(70_000)
    assert len(data) == 70_000
    assert data[:3] == b"\x00\x01\x02" and data[256] == 0 and data[65_537] == 65_537 % 256


# -- namespaces ----------------------------------------------------------------------------------


def test_netns_socket_lives_in_namespace(exit_peer: ExitPeer) -> None:
    n = exit_peer.index
    client_addr = f"10.77.{n}.1"
    # the veth address does not exist in the host namespace ...
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as host_sock:
        with pytest.raises(OSError) as exc:
            host_sock.bind((client_addr, 0))
        assert exc.value.errno == errno.EADDRNOTAVAIL
    # ... but it does in client_ns, and the exit namespace receives from it over the veth
    with (
        exit_peer.client_ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as a,
        exit_peer.ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as b,
    ):
        a.bind((client_addr, 0))
        b.bind((exit_peer.endpoint[0], 0))
        b.settimeout(5)
        a.sendto(b"ping", b.getsockname())
        data, src = b.recvfrom(100)
        assert data == b"ping"
        assert src == a.getsockname()
        assert a.getsockname()[0] == client_addr


async def test_netns_socket_usable_from_trio(exit_peer: ExitPeer) -> None:
    raw = exit_peer.client_ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer_sock = exit_peer.ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with trio.socket.from_stdlib_socket(raw) as a, trio.socket.from_stdlib_socket(peer_sock) as b:
        await b.bind((exit_peer.endpoint[0], 0))
        await a.sendto(b"hello", b.getsockname())
        with trio.fail_after(5):
            data, src = await b.recvfrom(100)
        assert data == b"hello"
        assert src[0] == f"10.77.{exit_peer.index}.1"


def test_netns_exec_runs_inside(exit_peer: ExitPeer) -> None:
    out = exit_peer.ns.exec(["ip", "-o", "addr", "show"]).stdout
    assert exit_peer.endpoint[0] in out and exit_peer.server_tunnel_v4 in out
    assert (
        exit_peer.endpoint[0]
        not in subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    )


# -- two real wireguard-go peers ------------------------------------------------------------------


def test_client_config_parses(exit_peer: ExitPeer) -> None:
    iface, peers = parse_wg_quick(exit_peer.client_config_text(keepalive=25))
    assert base64.b64decode(iface["privatekey"]) == exit_peer.client_private_key
    assert iface["address"] == f"{exit_peer.client_tunnel_v4}/32, {exit_peer.client_tunnel_v6}/128"
    assert iface["dns"] == exit_peer.server_tunnel_v4
    (p,) = peers
    assert base64.b64decode(p["publickey"]) == exit_peer.server_public_key
    assert p["endpoint"] == f"10.77.{exit_peer.index}.2:51820"
    assert p["allowedips"] == f"10.78.{exit_peer.index}.0/24, fd00:78:{exit_peer.index}::/64"
    assert p["persistentkeepalive"] == "25"
    # the client private key never shows up in the repr
    assert base64.b64encode(exit_peer.client_private_key).decode() not in repr(exit_peer)
    assert repr(exit_peer.client_private_key) not in repr(exit_peer)


def test_wireguard_go_pair_http(wg_client: ExitPeer) -> None:
    peer = wg_client
    before = time.time()
    r = curl(peer.client_ns, f"{peer.http_url}/")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hello from the exit peer\n"

    # a large generated body, IPv6 this time
    r = curl(
        peer.client_ns,
        f"http://[{peer.server_tunnel_v6}]:{peer.http_port}/bytes/1000000",
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "1000000"
    got = peer.client_ns.exec(
        ["sh", "-c", f"curl -sS --noproxy '*' -m 10 {peer.http_url}/bytes/1000000 | sha256sum"]
    ).stdout.split()[0]
    assert got == hashlib.sha256(pattern(1_000_000)).hexdigest()

    # a file dropped into www_root, and a POST echoing sha256 + size
    (peer.www_root / "f.bin").write_bytes(os.urandom(300_000))
    r = peer.client_ns.exec(
        ["sh", "-c", f"curl -sS --noproxy '*' -m 10 {peer.http_url}/f.bin | sha256sum"]
    )
    assert r.stdout.split()[0] == hashlib.sha256((peer.www_root / "f.bin").read_bytes()).hexdigest()
    body = peer.workdir / "post.bin"
    body.write_bytes(os.urandom(200_000))
    r = curl(peer.client_ns, "--data-binary", f"@{body}", f"{peer.http_url}/upload")
    assert json.loads(r.stdout) == {
        "sha256": hashlib.sha256(body.read_bytes()).hexdigest(),
        "size": 200_000,
    }
    r = curl(
        peer.client_ns,
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        f"@{body}",
        f"{peer.http_url}/",
    )
    assert json.loads(r.stdout)["size"] == 200_000

    st = peer.client_stats()
    assert st.latest_handshake >= int(before) - 1
    assert st.rx_bytes > 200_000 and st.tx_bytes > 2_000_000
    assert st.endpoint is not None and st.endpoint[0] == f"10.77.{peer.index}.1"
    assert st.allowed_ips == (f"{peer.client_tunnel_v4}/32", f"{peer.client_tunnel_v6}/128")


def test_dnsmasq_answers_through_tunnel(wg_client: ExitPeer) -> None:
    peer = wg_client
    assert peer.dns_server == peer.server_tunnel_v4
    with peer.client_ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ans = dns.query.udp(
            dns.message.make_query("exit.test", "A"), peer.dns_server, timeout=5, sock=sock
        )
        ans6 = dns.query.udp(
            dns.message.make_query("exit.test", "AAAA"), peer.dns_server, timeout=5, sock=sock
        )
    assert [rr.to_text() for rrset in ans.answer for rr in rrset] == [peer.server_tunnel_v4]
    assert [rr.to_text() for rrset in ans6.answer for rr in rrset] == [peer.server_tunnel_v6]
    qs = [q for q in peer.dns_queries() if q.name == "exit.test"]
    assert {(q.qtype, q.client) for q in qs} >= {
        ("A", peer.client_tunnel_v4),
        ("AAAA", peer.client_tunnel_v4),
    }
    assert "exit.test" in peer.queries()
    assert "ready.harness.invalid" not in peer.queries()


def test_stop_and_start_wireguard(fresh_exit_peer: ExitPeer) -> None:
    peer = fresh_exit_peer
    sock_path = WG_SOCKET_DIR / f"{peer.ifname}.sock"
    peer.stop_wireguard()
    assert not peer.wireguard_running and not sock_path.exists()
    with wireguard_go_interface(
        peer.client_ns, peer.client_ifname, peer.client_config_text(), peer.workdir
    ):
        assert curl(peer.client_ns, f"{peer.http_url}/", timeout=2).returncode != 0
    peer.start_wireguard()
    assert peer.wireguard_running and sock_path.exists()
    with wireguard_go_interface(
        peer.client_ns, peer.client_ifname, peer.client_config_text(), peer.workdir
    ):
        r = curl(peer.client_ns, f"{peer.http_url}/")
        assert r.returncode == 0 and r.stdout == "hello from the exit peer\n", r.stderr
    assert peer.client_stats().latest_handshake > 0


# -- impairment relay -------------------------------------------------------------------------------


def _relay_run(imp: Impairment, seed: int, count: int = 300) -> tuple[list[int], ImpairedRelay]:
    """Send ``count`` numbered datagrams through a relay over loopback; return what arrived."""
    target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target.bind(("127.0.0.1", 0))
    target.settimeout(5)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    got: list[int] = []
    relay = ImpairedRelay(target.getsockname(), seed=seed, up=imp)

    def read_forwarded() -> None:
        # forwarded counts after sendto() returned: on loopback it is then queued at the target
        while len(got) < relay.up.forwarded:
            got.append(int.from_bytes(target.recv(100), "big"))

    with relay, target, client:
        for start in range(0, count, 25):  # in batches, so no socket buffer overflows
            end = min(start + 25, count)
            for i in range(start, end):
                client.sendto(i.to_bytes(4, "big"), relay.address)
            deadline = time.monotonic() + 10
            while relay.up.received < end and time.monotonic() < deadline:
                time.sleep(0.002)
            read_forwarded()
        time.sleep(imp.reorder_timeout + 0.2)  # held datagrams are flushed by their timeout
        read_forwarded()
        target.settimeout(0.05)
        with pytest.raises(TimeoutError):  # and nothing beyond what the counters say
            target.recv(100)
    return got, relay


def test_relay_forwards_both_ways() -> None:
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.settimeout(5)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    with ImpairedRelay(echo.getsockname()) as relay, echo, client:
        for i in range(50):
            client.sendto(b"x%d" % i, relay.address)
            data, src = echo.recvfrom(100)
            assert data == b"x%d" % i
            echo.sendto(b"y" + data, src)
            reply, rsrc = client.recvfrom(100)
            assert reply == b"yx%d" % i and rsrc == relay.address
        assert [c[1] for c in relay.clients] == [client.getsockname()[1]]
        # the counter is bumped just after sendto() returns: allow the relay thread to catch up
        wait_until(lambda: relay.down.forwarded == 50, 5, "down counter")
        assert relay.up.received == relay.up.forwarded == 50
        assert relay.down.received == relay.down.forwarded == 50
        assert relay.up.dropped == relay.down.dropped == 0


def test_relay_loss_is_seeded() -> None:
    imp = Impairment(loss=0.3)
    a, ra = _relay_run(imp, seed=7)
    b, _ = _relay_run(imp, seed=7)
    c, _ = _relay_run(imp, seed=8)
    assert a == b  # same seed, same datagrams dropped
    assert a != c
    assert a == sorted(a) and len(set(a)) == len(a)
    assert ra.up.received == 300 and ra.up.dropped == 300 - len(a)
    assert 40 < ra.up.dropped < 140


def test_relay_duplicates_and_reorders() -> None:
    got, relay = _relay_run(Impairment(duplicate=0.2), seed=3)
    assert relay.up.duplicated > 20
    assert len(got) == 300 + relay.up.duplicated and set(got) == set(range(300))
    got, relay = _relay_run(Impairment(reorder=0.2, reorder_gap=2), seed=3)
    assert relay.up.reordered > 20
    assert sorted(got) == list(range(300)) and got != sorted(got)
    # a held datagram comes out exactly reorder_gap positions late (unless flushed by timeout)
    late = [i for i in range(1, len(got)) if got[i] < got[i - 1]]
    assert late


def test_relay_delay_and_blackhole() -> None:
    target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target.bind(("127.0.0.1", 0))
    target.settimeout(5)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with (
        ImpairedRelay(target.getsockname(), impairment=Impairment(delay=0.2)) as relay,
        target,
        client,
    ):
        t0 = time.monotonic()
        client.sendto(b"late", relay.address)
        assert target.recv(10) == b"late"
        assert time.monotonic() - t0 >= 0.2  # a lower bound only
        relay.set_impairment(Impairment(loss=1.0))
        for _ in range(5):
            client.sendto(b"gone", relay.address)
        wait = time.monotonic() + 5
        while relay.up.received < 6 and time.monotonic() < wait:
            time.sleep(0.01)
        assert relay.up.dropped == 5 and relay.up.delayed == 1
        target.settimeout(0.2)
        with pytest.raises(TimeoutError):
            target.recv(10)


def test_relay_between_namespaces(fresh_exit_peer: ExitPeer) -> None:
    """The reference client reaches the exit peer through a lossy, reordering relay in client_ns."""
    peer = fresh_exit_peer
    imp = Impairment(loss=0.02, duplicate=0.02, reorder=0.05, reorder_gap=2)
    with ImpairedRelay(
        peer.endpoint, seed=11, impairment=imp, socket_factory=peer.client_ns.socket
    ) as relay:
        assert relay.address[0] == "127.0.0.1"
        conf = peer.client_config_text(endpoint=relay.address)
        with wireguard_go_interface(peer.client_ns, peer.client_ifname, conf, peer.workdir):
            got = peer.client_ns.exec(
                [
                    "sh",
                    "-c",
                    f"curl -sS --noproxy '*' -m 30 {peer.http_url}/bytes/500000 | sha256sum",
                ]
            ).stdout.split()[0]
    assert got == hashlib.sha256(pattern(500_000)).hexdigest()
    assert relay.up.forwarded > 50 and relay.down.forwarded > 300
    assert relay.up.dropped + relay.down.dropped > 0
    assert relay.up.reordered + relay.down.reordered > 0
    # the exit peer saw the relay's upstream socket (client_ns veth address), not loopback
    assert peer.client_stats().endpoint[0] == f"10.77.{peer.index}.1"  # type: ignore[index]


# -- mitmproxy's WireGuard mode ---------------------------------------------------------------------


def _pub(priv: bytes) -> bytes:
    return (
        X25519PrivateKey.from_private_bytes(priv)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )


def test_mitm_peer_starts_with_real_keys(mitm_peer: MitmPeer) -> None:
    conf = json.loads((mitm_peer.confdir / "wireguard.conf").read_text())
    assert _pub(base64.b64decode(conf["server_key"])) == mitm_peer.server_public_key
    assert base64.b64decode(conf["client_key"]) == mitm_peer.client_private_key
    assert _pub(mitm_peer.client_private_key) == mitm_peer.client_public_key
    iface, (p,) = parse_wg_quick(mitm_peer.client_config_text())
    assert iface["address"] == "10.0.0.1/32" and iface["dns"] == "10.0.0.53"
    assert base64.b64decode(iface["privatekey"]) == mitm_peer.client_private_key
    assert base64.b64decode(p["publickey"]) == mitm_peer.server_public_key
    assert p["endpoint"] == f"127.0.0.1:{mitm_peer.port}" and p["allowedips"] == "0.0.0.0/0"
    assert mitm_peer.port > 0 and mitm_peer.process.poll() is None
    # the UDP port is really taken
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(OSError) as exc:
        s.bind(("127.0.0.1", mitm_peer.port))
    assert exc.value.errno == errno.EADDRINUSE
    assert base64.b64encode(mitm_peer.client_private_key).decode() not in repr(mitm_peer)


def test_mitm_peer_handshake_with_wireguard_go(fresh_exit_peer: ExitPeer) -> None:
    """wireguard-go (client_ns) → mitmproxy's WireGuard mode (in the exit ns) → HTTP server."""
    require_mitmdump()
    peer = fresh_exit_peer
    with mitmproxy_wireguard_peer(ns=peer.ns, host=peer.endpoint[0], port=51821) as mp:
        conf = mp.client_config_text(allowed_ips=peer.tunnel_v4_net)
        with wireguard_go_interface(peer.client_ns, peer.client_ifname, conf, peer.workdir):
            r = curl(peer.client_ns, f"{peer.http_url}/", timeout=15)
        assert r.returncode == 0, (r.stderr, mp.log_text()[-2000:])
        assert r.stdout == "hello from the exit peer\n"
        assert peer.client_stats().latest_handshake == 0  # traffic went through mitmproxy
        assert f"{peer.server_tunnel_v4}:{peer.http_port}" in mp.log_text()


# -- settling: nothing left changing when a namespace is handed out ---------------------------------


def test_exit_peer_namespaces_are_settled(exit_peer: ExitPeer) -> None:
    for ns in (exit_peer.ns, exit_peer.client_ns):
        assert ns.unsettled() == []
        text = ns.ip("addr", "show").stdout
        assert "tentative" not in text, text
        assert "scope link" in text  # the veth's link-local address is there already
        # DAD is off for every link the namespace gets (the kernel's link-local addresses too)
        assert ns.exec(["sysctl", "-n", "net.ipv6.conf.default.accept_dad"]).stdout.strip() == "0"


@pytest.mark.interop
def test_settle_waits_for_dad_and_carrier() -> None:
    require_netns()
    tag = f"mwgd{os.getpid() % 100000}"
    with Netns.create(f"{tag}a") as a, Netns.create(f"{tag}b") as b:
        v0, v1 = f"{tag}v0", f"{tag}v1"
        subprocess.run(
            ["ip", "link", "add", v0, "netns", a.name, "type", "veth",
             "peer", "name", v1, "netns", b.name],
            check=True,
        )  # fmt: skip
        assert a.unsettled() == [] and b.unsettled() == []  # down links: nothing pending
        # an address with DAD on, added while the link is down: tentative until DAD has run
        a.exec(["sysctl", "-q", "-w", f"net.ipv6.conf.{v0}.accept_dad=1"])
        a.ip("-6", "addr", "add", "fd00:79::1/64", "dev", v0)
        assert any("fd00:79::1/64 is tentative" in p for p in a.unsettled()), a.unsettled()
        # up, but the peer end is down: no carrier, never settles
        a.ip("link", "set", v0, "up")
        with pytest.raises(TimeoutError, match=f"{v0} is up but has no carrier yet"):
            a.settle(timeout=0.2)
        b.ip("link", "set", v1, "up")
        a.settle()
        b.settle()
        assert a.unsettled() == [] and b.unsettled() == []
        text = a.ip("addr", "show", "dev", v0).stdout
        assert "fd00:79::1/64" in text and "scope link" in text and "tentative" not in text


def test_origins_one_after_another_behind_one_exit(exit_peer: ExitPeer) -> None:
    """A test's origin behind the module's exit, then the next test's: the name is free at
    once, and so must the exit's end of the veth be (deleting a namespace destroys its
    veth pairs only when the kernel's cleanup gets to it; the second origin then failed
    with "File exists", 22 of 30 times in a shell loop of the two steps)."""
    for _ in range(10):
        with origin_behind([exit_peer], "mwgh", ["10.99.0.1"]) as origin:
            assert origin.ip("link", "show", f"{origin.name}o0").returncode == 0
        assert f"{origin.name}e0" not in exit_peer.ns.ip("-o", "link", "show").stdout


# -- cleanup ----------------------------------------------------------------------------------------


@pytest.mark.interop
def test_cleanup_stale_namespace() -> None:
    require_netns()
    name = f"mwgs{os.getpid() % 100000}x"
    subprocess.run(["ip", "netns", "add", name], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "60"])
    try:
        STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        (STATE_DIR / name).write_text("999999999 1")  # an owner that does not exist
        wait_until(lambda: sleeper.pid in Netns(name).pids(), 5, "sleep to enter the namespace")
        assert cleanup_stale("mwgs") == [name]
        assert sleeper.wait(5) is not None
        assert name not in list_namespaces()
        assert not (STATE_DIR / name).exists()
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_live_namespace_is_not_stale(exit_peer: ExitPeer) -> None:
    assert cleanup_stale("mwg") == []
    assert exit_peer.ns.name in list_namespaces()


@pytest.mark.interop
def test_teardown_leaves_nothing() -> None:
    require_netns()
    with exit_peer(dnsmasq=True, name_prefix="mwgt") as peer:
        names = [peer.ns.name, peer.client_ns.name]
        workdir = peer.workdir
        with wireguard_go_interface(
            peer.client_ns, peer.client_ifname, peer.client_config_text(), workdir
        ):
            pids = peer.ns.pids() + peer.client_ns.pids()
            socks = [WG_SOCKET_DIR / f"{i}.sock" for i in (peer.ifname, peer.client_ifname)]
            assert len(pids) >= 4 and all(
                s.exists() for s in socks
            )  # 2x wireguard-go, http, dnsmasq
    assert not set(names) & set(list_namespaces())
    assert not any(s.exists() for s in socks)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)
    assert not workdir.exists()
    live = live_resources()
    assert not set(names) & set(live["namespaces"])


@pytest.mark.interop
def test_teardown_on_error() -> None:
    require_netns()
    with pytest.raises(RuntimeError, match="boom"), exit_peer(name_prefix="mwgt") as peer:
        names = [peer.ns.name, peer.client_ns.name]
        pids = peer.ns.pids()
        raise RuntimeError("boom")
    assert not set(names) & set(list_namespaces())
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)


@pytest.mark.interop
def test_mitm_peer_teardown() -> None:
    require_mitmdump()
    with mitmproxy_wireguard_peer() as mp:
        proc, confdir = mp.process, mp.confdir
    assert proc.poll() is not None and not confdir.exists()


# -- CI skip rules ----------------------------------------------------------------------------------

_CI_TESTS = """
import pytest
from conftest import require_netns

@pytest.mark.interop
def test_interop_skips():
    pytest.skip("no namespaces here")

def test_plain_skips():
    pytest.skip("unrelated")

def test_fixture_marks_interop(netns_available):
    pass

@pytest.mark.interop
@pytest.mark.xfail(reason="known")
def test_interop_xfail():
    assert False
"""


_CI_MODULE_SKIP = """
import pytest

pytest.skip("whole module", allow_module_level=True)

def test_never_collected():
    pass
"""


@pytest.mark.parametrize("ci", ["true", ""])
def test_ci_turns_every_skip_into_a_failure(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str
) -> None:
    import conftest

    import harness.netns

    pytester.makeconftest((Path(conftest.__file__)).read_text())
    pytester.makeini("[pytest]\nmarkers =\n    interop: x\n    slow: y\n")
    pytester.makepyfile(test_ci=_CI_TESTS, test_ci_module=_CI_MODULE_SKIP)
    monkeypatch.setenv("CI", ci)
    # pretend the machine cannot run namespaces
    monkeypatch.setattr(harness.netns.os, "geteuid", lambda: 1000)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "test_ci.py")
    module = pytester.runpytest_inprocess("-p", "no:cacheprovider", "test_ci_module.py")
    if ci:
        result.assert_outcomes(failed=2, errors=1, skipped=0, xfailed=1)
        result.stdout.fnmatch_lines(["*interop test skipped under CI=true*no namespaces here*"])
        result.stdout.fnmatch_lines(["*test skipped under CI=true*unrelated*"])
        # a module skipped at collection is a collection error
        module.assert_outcomes(errors=1)
        module.stdout.fnmatch_lines(["*test_ci_module.py skipped under CI=true*whole module*"])
        result.stdout.fnmatch_lines(
            ["*CI=true but the interop environment is unusable: needs root*"]
        )
    else:
        result.assert_outcomes(skipped=3, xfailed=1)
        module.assert_outcomes(skipped=1)


def test_configs_parse_with_mitm_wg_config(exit_peer: ExitPeer, mitm_peer: MitmPeer) -> None:
    from mitm_wg.config import WireGuardConfig

    for text in (
        exit_peer.client_config_text(),
        exit_peer.client_config_text("0.0.0.0/0, ::/0", 25, endpoint=("127.0.0.1", 4000)),
        exit_peer.client_config_text(endpoint=exit_peer.endpoint_v6),
    ):
        conf = WireGuardConfig.parse(text)
        assert conf.private_key == exit_peer.client_private_key
        assert conf.peers[0].public_key == exit_peer.server_public_key
    conf = WireGuardConfig.parse(mitm_peer.client_config_text())
    assert conf.private_key == mitm_peer.client_private_key
    assert conf.peers[0].public_key == mitm_peer.server_public_key
