"""End to end through a path MTU black hole: mitmdump + addon, curl, wireguard-go.

The path under the tunnel carries 1400-byte packets and a firewall drops the ICMP errors
that would say so (an impairing relay: datagrams over 1372 bytes vanish, both ways). The
tunnel's own handshake and small packets pass; every full-sized one is lost. wireguard-go +
Linux TCP stall there for good. Through mitmdump: an upload ends byte-exact (our TCP takes
the path for a black hole after three timeouts in a row), the addon logs one warning naming
the endpoint and the MTU to configure, and later connections, a download and an upload,
lose nothing more to the hole. A mitmdump that only downloads through such a path finds
it too (its receiver's signs, then pings through the tunnel). And a server behind a hole
beyond the exit that answers no ping and sends its reply in full-sized segments from the
first: only that server narrows, found by asking it how far it has sent; an upload to a
server behind a hole beyond the exit narrows that server alone too.
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import (
    ORIGIN_NAME,
    Mitmdump,
    assert_pattern,
    curl,
    https_upload,
    pattern,
    tunnel_mitmdump,
)

from harness import ExitPeer, ImpairedRelay, Impairment

TUNNEL = "holey"
SIZE = 5 * 1024 * 1024


def assert_warned_once(proxy: Mitmdump, relay: ImpairedRelay) -> None:
    """The addon's log names the hole's endpoint once, and the MTU to configure (waiting
    for it a while: a hole found by pings is confirmed with pings to a second host first,
    while the stalled transfer goes on)."""
    host, port = relay.address
    warning = f"full-sized packets to WireGuard endpoint {host}:{port} seem to vanish without"
    deadline = time.monotonic() + 30
    while warning not in proxy.text() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = proxy.text()
    assert log.count(warning) == 1 and "MTU = 1200 in the config" in log, log[-3000:]


# (relay and proxy live for their one test only: a mitmdump left running with the same
# key beside a later test's would take the exit's replies whenever it sent a packet, as
# WireGuard follows a peer to the last address it heard from)
@pytest.fixture
def relay(exit_peer: ExitPeer) -> Iterator[ImpairedRelay]:
    hole = Impairment(max_size=1400 - 28)
    with ImpairedRelay(
        exit_peer.endpoint, listen=("127.0.0.1", 0), seed=3, up=hole, down=hole,
        socket_factory=exit_peer.client_ns.socket,
    ) as relay:  # fmt: skip
        yield relay


@pytest.fixture
def proxy(
    exit_peer: ExitPeer, workdir: Path, origin: Any, relay: ImpairedRelay
) -> Iterator[Mitmdump]:
    with tunnel_mitmdump(exit_peer, workdir, origin, TUNNEL, endpoint=relay.address) as dump:
        yield dump


def test_upload_then_download_through_a_black_hole(
    exit_peer: ExitPeer, proxy: Mitmdump, relay: ImpairedRelay, workdir: Path
) -> None:
    https_upload(exit_peer, proxy, workdir, pattern(SIZE)[::-1])
    assert relay.up.dropped > 0
    assert_warned_once(proxy, relay)

    dropped = relay.up.dropped, relay.down.dropped
    r = curl(
        exit_peer.client_ns, "--cacert", str(proxy.ca_pem), "-x", proxy.proxy,
        f"https://{ORIGIN_NAME}/bytes/{SIZE}", max_time=60,
    )  # fmt: skip
    assert_pattern(r, SIZE, proxy.text()[-4000:])
    https_upload(exit_peer, proxy, workdir, pattern(SIZE))
    assert (relay.up.dropped, relay.down.dropped) == dropped


@pytest.fixture
def download_only(
    exit_peer: ExitPeer, workdir: Path, origin: Any
) -> Iterator[tuple[Mitmdump, ImpairedRelay]]:
    """A mitmdump of its own through another such hole, that nothing has used yet. The
    exit's kernel keeps what a test before told it about the path to our tunnel address
    (a route exception, ten minutes): routes of their own to those addresses start
    afresh."""
    assert exit_peer.client_tunnel_v6 is not None  # (exit.test resolves to both)
    routes = [
        (f"{exit_peer.client_tunnel_v4}/32", "dev", exit_peer.ifname),
        (f"{exit_peer.client_tunnel_v6}/128", "dev", exit_peer.ifname),
    ]
    for route in routes:
        exit_peer.ns.ip("route", "add", *route)
    hole = Impairment(max_size=1400 - 28)
    try:
        with ImpairedRelay(
            exit_peer.endpoint, listen=("127.0.0.1", 0), seed=4, up=hole, down=hole,
            socket_factory=exit_peer.client_ns.socket,
        ) as relay:  # fmt: skip
            here = workdir / "download-only"
            here.mkdir()
            with tunnel_mitmdump(exit_peer, here, origin, "holey2", endpoint=relay.address) as dump:
                yield dump, relay
    finally:
        for route in routes:
            exit_peer.ns.ip("route", "del", *route)


def test_downloads_alone_find_the_black_hole(
    exit_peer: ExitPeer, origin: Any, download_only: tuple[Mitmdump, ImpairedRelay]
) -> None:
    """Browsing: small requests, large answers. On mitmproxy 11 every segment of ours
    fits (its ClientHello is some 500 bytes): the origin's full-sized segments vanish, from
    the TLS handshake's certificate flight on, and only our receiver can see the signs; the
    tunnel asks the path with pings through the tunnel. (mitmproxy 12's ClientHello, with a
    post-quantum key share, is larger than the hole: there our sender finds it first.) The
    download ends byte-exact, the addon warns once naming the endpoint and the MTU to
    configure, and a second download loses nothing more to the hole."""
    proxy, relay = download_only
    url = f"https://{ORIGIN_NAME}/bytes/{SIZE}"
    args = ("--cacert", str(proxy.ca_pem), "-x", proxy.proxy, url)
    connected = len(origin.entries("connect"))
    r = curl(exit_peer.client_ns, *args, max_time=60)
    assert_pattern(r, SIZE, proxy.text()[-4000:])
    assert_warned_once(proxy, relay)
    if int(importlib.metadata.version("mitmproxy").split(".")[0]) < 12:
        # (up: the probes' big pings, the only full-sized packets we sent: three to the
        # stalled server, and three more to the DNS server, confirming that the hole lies
        # under the tunnel, unless the server was the DNS server, exit.test's IPv4 address)
        [server] = [e["local"].rsplit(":", 1)[0] for e in origin.entries("connect")[connected:]]
        assert relay.up.dropped == (3 if server == exit_peer.dns_server else 6), server
        assert relay.down.dropped > 0
    else:
        assert relay.up.dropped > 0

    dropped = relay.up.dropped, relay.down.dropped
    r = curl(exit_peer.client_ns, *args, max_time=60)
    assert_pattern(r, SIZE, proxy.text()[-4000:])
    assert (relay.up.dropped, relay.down.dropped) == dropped


@pytest.mark.parametrize("family", [4, 6], ids=["v4", "v6"])
def test_a_silent_server_behind_a_hole_beyond_the_exit(
    exit_peer: ExitPeer, workdir: Path, origin: Any, family: int
) -> None:
    """Browsing a server behind a black hole beyond the exit that answers no ping and
    whose reply's first segment is already full-sized (head and body in one write, as
    nginx with sendfile sends; a TLS server's certificate flight is the same): through
    mitmdump nothing of the answer arrives, as from a slow server, until the stalled
    connection asks the server how far it has sent (its ACK says: beyond what came).
    The exit (the DNS server) answers the big ping, so the hole lies beyond it: that
    server alone narrows, the download ends byte-exact, the addon says where the hole
    is, and the tunnel keeps its full size (no warning). The same with the server on
    IPv6 inside the tunnel."""
    from test_narrow_path import NO_ECHO, origins_behind_exit

    server = "10.99.0.1" if family == 4 else "fd00:99::1"
    with origins_behind_exit(exit_peer, workdir, f"e2e-beyond-{family}", [server]) as (ns, _):
        ns.exec(["sysctl", "-qw", NO_ECHO[family]])
        here = workdir / f"beyond-{family}"
        here.mkdir()
        allowed = f"{exit_peer.tunnel_v4_net}, 10.99.0.0/24"
        if family == 6:
            allowed += f", {exit_peer.tunnel_v6_net}, fd00:99::/64"
        with tunnel_mitmdump(exit_peer, here, origin, "beyond", allowed_ips=allowed) as proxy:
            host = server if family == 4 else f"[{server}]"
            url = f"http://{host}/bytes/{SIZE}?together"
            r = curl(exit_peer.client_ns, "-x", proxy.proxy, url, max_time=60)
            assert_pattern(r, SIZE, proxy.text()[-4000:])
            log = proxy.wait_for_log(f"full-sized packets from {server} seem to vanish beyond")
            assert "it sent data that never came and answers no ping" in log, log[-3000:]
            assert "seem to vanish without" not in log, log[-3000:]
            r = curl(exit_peer.client_ns, "-x", proxy.proxy, url, max_time=60)
            assert_pattern(r, SIZE, proxy.text()[-4000:])


def test_an_upload_into_a_hole_beyond_the_exit(
    exit_peer: ExitPeer, workdir: Path, origin: Any
) -> None:
    """Uploading through mitmdump to a server behind a black hole beyond the exit, on the
    way to it (our full-sized segments vanish there): the upload ends byte-exact (three
    timeouts in a row, then smaller segments); the exit, the DNS server, answers the big
    ping, so the addon says the hole lies beyond it, on the way to that server alone, and
    gives no warning to shrink the tunnel (nor after an upload to the exit's origin)."""
    from test_narrow_path import origins_behind_exit

    server = "10.99.0.1"
    with origins_behind_exit(exit_peer, workdir, "e2e-upload", [server], toward=True):
        here = workdir / "upload-beyond"
        here.mkdir()
        allowed = f"{exit_peer.tunnel_v4_net}, 10.99.0.0/24"
        with tunnel_mitmdump(exit_peer, here, origin, "upbeyond", allowed_ips=allowed) as proxy:
            data = pattern(SIZE)[::-1]
            path = here / "upload.bin"
            path.write_bytes(data)
            r = curl(
                exit_peer.client_ns, "-x", proxy.proxy, "-H",
                "Content-Type: application/octet-stream", "--data-binary", f"@{path}",
                f"http://{server}/echo/upload", max_time=60,
            )  # fmt: skip
            assert r.returncode == 0 and r.status == 200, (r, proxy.text()[-4000:])
            echo = r.json()
            assert (echo["body_size"], echo["body_sha256"]) == (SIZE, sha256(data).hexdigest())
            # (to: found by the upload's timeouts; from: by pings, when a stall of the
            # connection, an answer due while our data waited, asked first)
            beyond = f" {server} seem to vanish beyond WireGuard endpoint"
            deadline = time.monotonic() + 30
            while beyond not in proxy.text() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert beyond in proxy.text(), proxy.text()[-4000:]
            https_upload(exit_peer, proxy, here, pattern(SIZE))
            assert "seem to vanish without" not in proxy.text(), proxy.text()[-3000:]
