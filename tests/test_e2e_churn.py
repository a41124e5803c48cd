"""End to end: a long mitmproxy session leaves nothing behind in the tunnel.

Users keep mitmproxy running for days, and connections end every way there is: finished,
refused, abandoned mid-download or mid-upload by a client that resets, passed through and
cut, a WebSocket closed. Each one holds a TCP socket in our stack, a stream in the trio
runtime, a transport on mitmproxy's side and a connection on the server; a leak in any of
them grows for as long as the session runs, and a connection we never close holds the
server's resources too.

Layout as tests/test_e2e_curl.py (mitmdump + addon, wireguard-go, the echo origin on the
exit's tunnel addresses only), plus a probe script inside mitmdump that reports the
tunnel's internals (``/__internals``, answered by mitmproxy itself, not forwarded): the
bridge's connection count, the runtime's open streams, our TCP sockets by state, the UDP
sockets, and mitmproxy-side transports not yet closing. After a churn of every kind of
ending, all of them must come back to where they were, and Linux must hold no connection
from us but those in its own TIME_WAIT.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import (
    ORIGIN_NAME,
    RAW_PORTS,
    Mitmdump,
    Origin,
    WsClient,
    curl,
    run_mitmdump,
    tunnel_addresses,
    wait_for,
    write_client_config,
)

TUNNEL = "exit"

PROBE = """
import collections
import gc
import json

from mitmproxy import ctx, http


def request(flow):
    if flow.request.path != "/__internals":
        return
    addon = ctx.master.addons.get("wireguardaddon")
    report = {}
    for name, st in list(addon.bridge._tunnels.items()):
        tunnel = st.tunnel
        report[name] = {
            "connections": st.connections,
            "streams": len(tunnel._streams),
            "tcp": dict(collections.Counter(s.state.name for s in tunnel.stack.tcp_sockets)),
            "udp": len(tunnel.stack._udp),
        }
    report["transports"] = sum(
        1 for o in gc.get_objects()
        if type(o).__name__ == "TunnelTransport" and not o.is_closing()
    )
    flow.response = http.Response.make(
        200, json.dumps(report), {"content-type": "application/json"}
    )
"""


@pytest.fixture(scope="module")
def proxy(exit_peer: Any, workdir: Path, origin: Origin) -> Iterator[Mitmdump]:
    conf = write_client_config(exit_peer, workdir, TUNNEL)
    probe = workdir / "internals_probe.py"
    probe.write_text(PROBE)
    server = exit_peer.server_tunnel_v4.replace(".", r"\.")
    args = [
        "-s",
        str(probe),
        "--set",
        f"wg_conf={TUNNEL}={conf}",
        "--set",
        f"ssl_verify_upstream_trusted_ca={origin.ca}",
        "--set",
        "stream_large_bodies=256k",
        "--ignore-hosts",
        rf"^{server}:{RAW_PORTS[0]}$",
    ]
    with run_mitmdump(exit_peer.client_ns, workdir, *args) as dump:
        dump.wait_for_log(f"WireGuard tunnel {TUNNEL!r} is up")
        yield dump


def internals(exit_peer: Any, proxy: Mitmdump) -> dict[str, Any]:
    r = curl(exit_peer.client_ns, "-x", proxy.proxy, "http://internals.invalid/__internals")
    assert r.status == 200, (r.status, r.stderr, r.body[:300])
    report: dict[str, Any] = json.loads(r.body)
    return report


def linux_connections_from_us(exit_peer: Any) -> list[str]:
    """The exit's TCP connections with our tunnel address, but those in TIME_WAIT."""
    out = exit_peer.ns.exec(["ss", "-Htn", "state", "all"]).stdout
    ours = tunnel_addresses(exit_peer)
    return [
        line
        for line in out.splitlines()
        if any(f"{a}]:" in line or f"{a}:" in line for a in ours)
        and not line.startswith(("TIME-WAIT", "LISTEN"))
    ]


#: A client through the proxy that ends its connection abruptly (RST: SO_LINGER 0):
#: ``get URL N`` reads N body bytes of a GET, ``post URL N`` sends N of a longer body,
#: ``raw HOST PORT`` reads a passed-through raw server's greeting, each then resets.
ABORTER = r"""
import socket, struct, sys

def reset(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()

proxy = ("127.0.0.1", int(sys.argv[1]))
kind = sys.argv[2]
sock = socket.create_connection(proxy, timeout=30)
if kind == "get":
    url, want = sys.argv[3], int(sys.argv[4])
    sock.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    got = b""
    while len(got) < want:
        chunk = sock.recv(65536)
        assert chunk, got[:200]
        got += chunk
elif kind == "post":
    url, send = sys.argv[3], int(sys.argv[4])
    sock.sendall(
        f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: {10 * send}\r\n\r\n".encode()
    )
    sock.sendall(b"u" * send)
else:
    host, port = sys.argv[3], int(sys.argv[4])
    sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    got = b""
    while not got.endswith(b"\n") or b"HELLO" not in got:
        chunk = sock.recv(1)
        assert chunk, got
        got += chunk
reset(sock)
"""


def abort(exit_peer: Any, workdir: Path, proxy: Mitmdump, *args: str) -> None:
    script = workdir / "aborter.py"
    if not script.exists():
        script.write_text(ABORTER)
    r = exit_peer.client_ns.exec(
        [sys.executable, str(script), str(proxy.port), *args], check=False, timeout=60
    )
    assert r.returncode == 0, (args, r.stderr[-2000:])


def test_every_kind_of_ending_leaves_nothing_behind(
    exit_peer: Any, workdir: Path, origin: Origin, proxy: Mitmdump
) -> None:
    ns = exit_peer.client_ns
    base = f"http://{exit_peer.server_tunnel_v4}"
    # warm up (the DNS resolver's socket, the session), then the baseline
    assert curl(ns, "-x", proxy.proxy, f"http://{ORIGIN_NAME}/echo").status == 200
    wait_for(lambda: internals(exit_peer, proxy)[TUNNEL]["streams"] == 0, 20, "a quiet tunnel")
    before = internals(exit_peer, proxy)
    connects = len(origin.entries("connect"))
    made = 0  # connections that must have reached the origin (not the aborted uploads)
    # finished: by name and by address, HTTP and HTTPS (h2), each a new connection
    for i in range(20):
        r = curl(ns, "-x", proxy.proxy, f"http://{ORIGIN_NAME}/echo/{i}")
        assert r.status == 200, r.stderr
        made += 1
    for i in range(6):
        r = curl(
            ns, "--cacert", str(proxy.ca_pem), "-x", proxy.proxy, f"https://{ORIGIN_NAME}/echo/s{i}"
        )
        assert r.status == 200 and r.http_version == "2", (r.status, r.stderr)
        made += 1
    # refused by the server (a closed port): mitmproxy answers 502
    for _ in range(4):
        r = curl(ns, "-x", proxy.proxy, f"{base}:9/")
        assert r.status == 502, (r.status, r.body[:300])
    # abandoned mid-download (a streamed body) and mid-upload by a client that resets
    for _ in range(5):
        abort(exit_peer, workdir, proxy, "get", f"{base}/bytes/{40 << 20}", str(1 << 20))
        abort(exit_peer, workdir, proxy, "post", f"{base}/echo-upload", str(2 << 20))
        made += 1
    # passed through (raw TCP, server speaks first) and cut by the client
    for _ in range(4):
        abort(exit_peer, workdir, proxy, "raw", exit_peer.server_tunnel_v4, str(RAW_PORTS[0]))
        made += 1
    # WebSockets closed by the client
    for _ in range(3):
        with WsClient.connect(ns, proxy.port, ORIGIN_NAME, 443, "/ws", proxy.ca_pem) as ws:
            ws.send("hello")
            assert ws.receive() == "hello"
        made += 1
    assert len(origin.entries("connect")) - connects >= made

    def settled() -> bool:
        now = internals(exit_peer, proxy)
        tunnel = now[TUNNEL]
        return (
            tunnel["connections"] == 0
            and tunnel["streams"] == 0
            and not tunnel["tcp"]
            and tunnel["udp"] <= before[TUNNEL]["udp"]
            and now["transports"] <= before["transports"]
            and not linux_connections_from_us(exit_peer)
        )

    try:
        wait_for(settled, 30, "every connection to be gone from the tunnel and the server")
    except AssertionError:
        raise AssertionError(
            f"before {before}, after {internals(exit_peer, proxy)},"
            f" Linux still holds {linux_connections_from_us(exit_peer)}"
        ) from None
