"""Exit pools end to end: curl (or a UDP client) → mitmdump + addon → one of three wireguard-go
exits → an origin that logs the source address it sees.

Topology (every namespace is the test's own)::

    mitmdump ns (exit a's client ns) ── veth ── exit a ──┐
        ├── veth 10.80.1.0/30 ──────────────── exit b ──┼── origin ns: 10.99.0.1-6
        ├── veth 10.80.2.0/30 ──────────────── exit c ──┘   HTTP :80, UDP echo 10.99.0.1:5353
        └── veth 10.81.0.0/30 (direct) ─────────────────────┘

Each exit forwards from its tunnel to the origin, which answers every HTTP request and every
UDP datagram with the source address it saw: 10.78.N.2, the tunnel address of the exit the
pool chose. The direct link is the negative control of "fail closed": a connection that
went around the tunnels would reach the origin from 10.81.0.1 (checked to work without the
proxy), so an origin log without new entries proves nothing left directly.

The exits "die" by their wireguard-go being killed (by PID, ``ExitPeer.stop_wireguard``).
An exit that dies while we hold a session with it swallows what we send on that session. A
TCP connection's retransmitted SYN makes the tunnel handshake again at once, and the pool
gives the member up when that stays unanswered (some 10 s into the connection); a UDP
flow gives no such sign, so there WireGuard's own rule decides (data unanswered for
KEEPALIVE + REKEY_TIMEOUT, 15 s, starts a handshake). That takes the time it takes: the
waits below are on conditions (curl's --max-time and the UDP client's timeout are deadlock
guards only).
"""

from __future__ import annotations

import contextlib
import html
import json
import signal
import socket
import time
import zlib
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import Mitmdump, curl, run_mitmdump, wait_for

from harness import ExitPeer, Netns, cleanup_stale, exit_peer, origin_behind, source_echo

PREFIX = "mwgep"
ORIGIN_PREFIX = "mwgeo"
ORIGINS = [f"10.99.0.{i}" for i in range(1, 7)]
UDP_PORT = 5353
NAMES = ("a", "b", "c")
DIRECT_SOURCE = "10.81.0.1"
#: Deadlock guard for one request that may first meet a dead exit.
SLOW = 90.0

#: Lets curl choose a pool per request (a script setting flow.metadata["wg_tunnel"]).
_POOL_SCRIPT = """
def requestheaders(flow):
    pool = flow.request.headers.get("x-wg-pool")
    if pool:
        flow.metadata["wg_tunnel"] = pool
"""


@dataclass
class World:
    exits: list[ExitPeer]
    ns: Netns  # mitmdump and the clients
    origin_log: Path
    confs: list[str]  # wg_conf values, NAME=PATH
    workdir: Path

    def source(self, name: str) -> str:
        return self.exits[NAMES.index(name)].client_tunnel_v4

    def member_of(self, address: str) -> str:
        """The pool member whose tunnel address the origin saw (else the address itself,
        e.g. the direct link's, for the assertion message)."""
        return next((n for n in NAMES if self.source(n) == address), address)

    def origin_entries(self) -> list[dict[str, str]]:
        try:
            return [json.loads(line) for line in self.origin_log.read_text().splitlines()]
        except FileNotFoundError:
            return []


@pytest.fixture
def world(netns_available: None, tmp_path: Path) -> Iterator[World]:
    cleanup_stale(ORIGIN_PREFIX)
    with ExitStack() as stack:
        exits = [stack.enter_context(exit_peer(name_prefix=PREFIX, dnsmasq=False)) for _ in NAMES]
        ns = exits[0].client_ns
        origin = stack.enter_context(origin_behind(exits, ORIGIN_PREFIX, ORIGINS))
        # mitmdump's namespace <-> exits b and c (their endpoints), and <-> the origin
        endpoints = [exits[0].endpoint]
        for k, e in enumerate(exits[1:], 1):
            left, right = f"{PREFIX}{exits[0].index}x{k}", f"{PREFIX}{e.index}y"
            ns.ip("link", "add", left, "type", "veth", "peer", "name", right, "netns", e.ns.name)
            ns.ip("addr", "add", f"10.80.{k}.1/30", "dev", left)
            e.ns.ip("addr", "add", f"10.80.{k}.2/30", "dev", right)
            ns.ip("link", "set", left, "up")
            e.ns.ip("link", "set", right, "up")
            endpoints.append((f"10.80.{k}.2", e.endpoint[1]))
        d_ns, d_origin = f"{origin.name}d", f"{origin.name}D"
        ns.ip("link", "add", d_ns, "type", "veth", "peer", "name", d_origin, "netns", origin.name)
        ns.ip("addr", "add", f"{DIRECT_SOURCE}/30", "dev", d_ns)
        origin.ip("addr", "add", "10.81.0.2/30", "dev", d_origin)
        ns.ip("link", "set", d_ns, "up")
        origin.ip("link", "set", d_origin, "up")
        ns.ip("route", "add", "10.99.0.0/24", "via", "10.81.0.2")
        for n in (ns, origin, *(e.ns for e in exits)):
            n.settle()

        log = tmp_path / "origin.jsonl"
        source_echo(origin, log=log, udp=(ORIGINS[0], UDP_PORT))
        confs = []
        for name, e, endpoint in zip(NAMES, exits, endpoints, strict=True):
            path = tmp_path / f"{name}.conf"
            path.touch(mode=0o600)
            path.write_text(
                e.client_config_text(allowed_ips="10.99.0.0/24", dns=False, endpoint=endpoint)
            )
            confs.append(f"{name}={path}")
        w = World(exits, ns, log, confs, tmp_path)
        # Negative control: without the proxy the origin IS reachable directly from here.
        r = curl(ns, f"http://{ORIGINS[0]}/")
        assert r.status == 200 and r.body == DIRECT_SOURCE.encode(), r
        assert udp_ask(ns, ("10.99.0.1", UDP_PORT)) == DIRECT_SOURCE
        assert [e["client"] for e in w.origin_entries()] == [DIRECT_SOURCE] * 2
        yield w


def udp_ask(ns: Netns, target: tuple[str, int], timeout: float = SLOW) -> str | None:
    """One datagram from a fresh socket (a new UDP flow for mitmproxy); the reply's text, or
    None when nothing came back within ``timeout`` (a guard: the tests never time it)."""
    sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.settimeout(timeout)
        sock.sendto(b"who am i", target)
        try:
            return sock.recv(2048).decode()
        except TimeoutError:
            return None
    finally:
        sock.close()


def get(w: World, dump: Mitmdump, host: str, pool: str | None = None) -> str:
    """GET http://HOST/ through mitmdump; the source address the origin saw."""
    w.ns.settle()
    args = ["-H", f"x-wg-pool: {pool}"] if pool else []
    r = curl(w.ns, "-x", dump.proxy, *args, f"http://{host}/", max_time=SLOW)
    assert r.returncode == 0 and r.status == 200, r
    return r.body.decode()


def pool_mitmdump(w: World, *args: str, **kw: Any) -> contextlib.AbstractContextManager[Mitmdump]:
    script = w.workdir / "pool_script.py"
    script.write_text(_POOL_SCRIPT)
    confs = [a for c in w.confs for a in ("--set", f"wg_conf={c}")]
    return run_mitmdump(
        w.ns, w.workdir, *confs, "--set", "wg_pool_retry=600", "-s", str(script), *args, **kw
    )


def test_pool_through_mitmdump_and_curl(world: World) -> None:
    w = world
    args = ["--set", "wg_pool=p=round-robin:a,b,c", "--set", "wg_pool=s=sticky:a,b,c"]
    with pool_mitmdump(w, *args) as dump:
        for name in NAMES:
            dump.wait_for_log(f"WireGuard tunnel {name!r} is up")

        # Round-robin (the first pool is the default route): each new connection takes the
        # next exit.
        seen = [w.member_of(get(w, dump, ORIGINS[0])) for _ in range(6)]
        assert seen == ["a", "b", "c", "a", "b", "c"], seen

        # Sticky per host (chosen by a script from a request header): a host keeps its exit,
        # and the hosts spread over the exits.
        sticky = {h: w.member_of(get(w, dump, h, "s")) for h in ORIGINS}
        for host in ORIGINS:
            assert w.member_of(get(w, dump, host, "s")) == sticky[host], host
        assert sticky == {h: NAMES[zlib.crc32(h.encode()) % 3] for h in ORIGINS}
        assert len(set(sticky.values())) >= 2, sticky
        assert f"through tunnel {sticky[ORIGINS[0]]!r} of exit pool 's' (sticky)" in dump.text()

        # Exit c dies. The connection that picks it fails over; c leaves the pool, with the
        # reason logged, and the others carry on.
        w.exits[2].stop_wireguard()
        seen = [w.member_of(get(w, dump, ORIGINS[0])) for _ in range(4)]
        assert set(seen) == {"a", "b"}, seen
        text = dump.wait_for_log("tunnel 'c' taken out of its exit pool(s) for 600 s")
        (line,) = [x for x in text.splitlines() if "tunnel 'c' taken out" in x]
        assert "has not answered the handshake" in line, line
        # (and why: its host answered the probe of the unanswered initiations)
        assert "(ICMP port unreachable)" in line, line
        # A host sticky to c goes to the next member in order now.
        for host in [h for h in ORIGINS if sticky[h] == "c"][:1]:
            assert w.member_of(get(w, dump, host, "s")) == "a", host

        # Every exit dies: connections fail closed; nothing reaches the origin, not even
        # over the direct link it could take.
        w.exits[0].stop_wireguard()
        w.exits[1].stop_wireguard()
        before = len(w.origin_entries())
        for _ in range(2):  # the second finds every member out at once
            w.ns.settle()
            r = curl(w.ns, "-x", dump.proxy, f"http://{ORIGINS[0]}/", max_time=2 * SLOW + 30)
            assert r.status == 502, r
            assert "every tunnel of exit pool 'p' is down" in html.unescape(r.body.decode()), r
        assert len(w.origin_entries()) == before, w.origin_entries()[before:]
        text = dump.text()
        for name in ("a", "b"):
            assert f"tunnel {name!r} taken out of its exit pool(s)" in text
        assert "DIRECT" not in text


def test_udp_flows_fail_over_within_a_pool(world: World) -> None:
    """UDP flows (mitmproxy's ``reverse:udp://`` mode: one flow per client socket) through a
    round-robin pool: a member that does not answer the handshake is left out, and each new
    flow goes to a live member; when every exit is dead the flows fail closed."""
    w = world
    w.exits[2].stop_wireguard()  # c is dead from the start: no session with it ever
    port = w.ns.free_udp_port()
    with pool_mitmdump(
        w,
        "--mode",
        f"reverse:udp://{ORIGINS[0]}:{UDP_PORT}@{port}",
        "--set",
        "wg_pool=p=round-robin:a,b,c",
        # UDP listener: mitmproxy_rs may segfault while exiting after our SIGINT
        # (mitmproxy/mitmproxy#7409); an earlier death still fails (run_mitmdump).
        exit_codes=(0, -signal.SIGSEGV),
    ) as dump:
        for name in NAMES:
            dump.wait_for_log(f"WireGuard tunnel {name!r} is up")
        target = ("127.0.0.1", port)
        seen = []
        for _ in range(6):
            w.ns.settle()
            reply = udp_ask(w.ns, target)
            assert reply is not None, dump.text()[-3000:]
            seen.append(w.member_of(reply))
        # a, b, then c's turn: its handshake goes unanswered, the flow takes a; c is out
        # and the flows go on over a and b.
        assert seen[:3] == ["a", "b", "a"] and set(seen) == {"a", "b"}, seen
        text = dump.text()
        (line,) = [x for x in text.splitlines() if "tunnel 'c' taken out" in x]
        assert "did not answer the handshake" in line, line
        assert "UDP 10.99.0.1:5353 through tunnel 'a' of exit pool 'p'" in text
        udp_sources = {e["client"] for e in w.origin_entries() if e["proto"] == "udp"}
        assert udp_sources == {DIRECT_SOURCE, w.source("a"), w.source("b")}

        # a and b die while we hold sessions with them. The datagrams of the next flows are
        # lost (nothing tells UDP otherwise) until the unanswered re-handshakes show the
        # exits are at fault; from then on new flows fail closed.
        w.exits[0].stop_wireguard()
        w.exits[1].stop_wireguard()
        before = len(w.origin_entries())
        guard = time.monotonic() + 4 * SLOW

        def both_out() -> bool:
            text = dump.text()
            return all(f"tunnel {n!r} taken out" in text for n in ("a", "b"))

        while not both_out():
            assert time.monotonic() < guard, dump.text()[-3000:]
            assert udp_ask(w.ns, target, timeout=1.0) is None
        assert udp_ask(w.ns, target, timeout=5.0) is None
        wait_for(
            lambda: "every tunnel of exit pool 'p' is down" in dump.text(),
            30,
            "a flow refused because every member is out",
        )
        assert len(w.origin_entries()) == before, w.origin_entries()[before:]
        assert "DIRECT" not in dump.text()
