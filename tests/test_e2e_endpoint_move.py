"""An exit named by hostname moves to a new address while mitmdump runs: curl through
mitmdump + addon keeps working, without a restart, and the log says the endpoint was
re-resolved.

The name lives in a hosts file of the client namespace only: ``ip netns exec`` (how the
harness starts mitmdump) bind-mounts ``/etc/netns/NAME/hosts`` over ``/etc/hosts`` for the
processes it starts, so mitmdump's resolver (``getaddrinfo``) reads the test's file and the
host's own /etc/hosts is never touched. The file is rewritten in place (same inode: the bind
mount keeps showing it).

The move is a real one: the exit's wireguard-go is stopped (by PID), the exit's address A
is removed and a new address B added on its link, and a new wireguard-go (same keys, no
session with us) starts there; the hosts file now says B. Nothing answers at A any more.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import curl, run_mitmdump, write_client_config

from harness import ExitPeer, b64

NAME = "exit.move.test"
NETNS_ETC = Path("/etc/netns")


@pytest.fixture
def hosts_file(fresh_exit_peer: ExitPeer) -> Iterator[Path]:
    """``/etc/netns/<client ns>/hosts``: the client namespace's /etc/hosts (removed after)."""
    directory = NETNS_ETC / fresh_exit_peer.client_ns.name
    directory.mkdir(parents=True, exist_ok=False)
    try:
        yield directory / "hosts"
    finally:
        shutil.rmtree(directory)
        with contextlib.suppress(OSError):  # only when empty (others may use it too)
            NETNS_ETC.rmdir()


def write_hosts(path: Path, address: str) -> None:
    with path.open("w") as f:  # truncates in place: the bind-mounted inode stays
        f.write(f"127.0.0.1 localhost\n{address} {NAME}\n")


def test_exit_moves_under_a_running_mitmdump(
    fresh_exit_peer: ExitPeer, hosts_file: Path, tmp_path: Path
) -> None:
    peer = fresh_exit_peer
    n = peer.index
    base = peer.ifname[: -len("wg")]
    client_if, exit_if = base + "v0", base + "v1"
    old, new = peer.endpoint[0], f"10.77.{n}.6"
    write_hosts(hosts_file, old)
    conf = write_client_config(peer, tmp_path, "mv", endpoint=(NAME, peer.endpoint[1]), dns=False)
    assert f"Endpoint = {NAME}:{peer.endpoint[1]}" in conf.read_text()
    url = f"{peer.http_url}/bytes/100000"
    peer_key = b64(peer.server_public_key)
    ns = peer.client_ns
    with run_mitmdump(
        ns, tmp_path, "--set", f"wg_conf=mv={conf}", "--set", "wg_reresolve=1"
    ) as dump:
        dump.wait_for_log("WireGuard tunnel 'mv' is up")
        ns.settle()
        r = curl(ns, "-x", dump.proxy, url)
        assert r.status == 200 and len(r.body) == 100000, r
        before = peer.client_stats().endpoint
        assert before is not None and before[0] == f"10.77.{n}.1", before

        # The exit moves: its wireguard-go goes, A goes, B comes, a new wireguard-go runs.
        peer.stop_wireguard()
        peer.ns.ip("addr", "del", f"{old}/30", "dev", exit_if)
        ns.ip("addr", "add", f"10.77.{n}.5/30", "dev", client_if)
        peer.ns.ip("addr", "add", f"{new}/30", "dev", exit_if)
        write_hosts(hosts_file, new)
        peer.start_wireguard()  # settles the exit namespace
        ns.settle()
        assert ns.exec(["getent", "hosts", NAME]).stdout.split()[0] == new

        text = dump.wait_for_log(f"now resolves to {new}:{peer.endpoint[1]}", timeout=60)
        (line,) = [x for x in text.splitlines() if f"now resolves to {new}" in x]
        assert f"WireGuard endpoint {NAME}:{peer.endpoint[1]}" in line, line
        assert f"(was {old}:{peer.endpoint[1]})" in line, line

        r = curl(ns, "-x", dump.proxy, url, max_time=60)
        assert r.status == 200 and len(r.body) == 100000, r
        assert r.body == bytes(i % 256 for i in range(100000))
        assert dump.proc.poll() is None  # the same mitmdump
        text = dump.text()
        assert text.count("WireGuard tunnel 'mv' is up") == 1, text
        # a new session with the new wireguard-go, at the new address
        assert re.search(
            rf"WireGuard (handshake completed|rekeyed) with peer {re.escape(peer_key)} at {re.escape(new)}:",
            text,
        ), text
    stats = peer.client_stats()  # the new wireguard-go: we came over B's link
    assert stats.endpoint is not None and stats.endpoint[0] == f"10.77.{n}.5"
    assert stats.latest_handshake > 0
