"""End to end: what mitmproxy does *not* intercept still leaves through the tunnel.

Users pass pinned apps through untouched (``--ignore-hosts``) and inspect non-HTTP protocols
as raw TCP (``--tcp-hosts``). Both put mitmproxy's TCP layer, not its HTTP layer, on our
upstream connection, which then has to carry what HTTP never asks of it: a server that
speaks first (before the client has sent a byte: mitmproxy must connect and relay without
client data), bulk data both ways at once, and, in SOCKS5 mode, a client that half-closes and
still reads the answer (bulk data after the client's FIN), then the server's close. Each in
regular (HTTP CONNECT) and SOCKS5 mode; in regular mode mitmproxy itself turns a client's
half-close into a full close, so there the client reads before it closes.

Layout as tests/test_e2e_curl.py: mitmdump + addon in the client namespace, wireguard-go and
the echo origin (HTTPS :443; the raw TCP service on ``RAW_PORTS``, tests/e2e_helpers.py) on
the exit's tunnel addresses only, reachable only through the tunnel. The raw service reports
the address it saw and a digest of what it read.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import (
    ORIGIN_NAME,
    RAW_PORTS,
    Mitmdump,
    Origin,
    curl,
    pattern,
    run_mitmdump,
    tunnel_addresses,
    wait_for,
    write_client_config,
)

TUNNEL = "exit"
PASSED, INSPECTED = RAW_PORTS

#: A user script on the inspected raw TCP connection: it rewrites the server's greeting and
#: counts every message, so the test sees that mitmproxy held the stream (not a passthrough).
SCRIPT = """
import logging

def tcp_message(flow):
    message = flow.messages[-1]
    if not message.from_client and message.content.startswith(b"HELLO "):
        message.content = b"HOWDY " + message.content[6:]
    logging.info("raw-tcp-message from_client=%s size=%d", message.from_client, len(message.content))
"""


def _args(exit_peer: Any, workdir: Path) -> list[str]:
    conf = write_client_config(exit_peer, workdir, TUNNEL)
    script = workdir / "raw_tcp_script.py"
    script.write_text(SCRIPT)
    server = re.escape(exit_peer.server_tunnel_v4)
    return [
        "-s",
        str(script),
        "--set",
        f"wg_conf={TUNNEL}={conf}",
        "--ignore-hosts",
        rf"^{re.escape(ORIGIN_NAME)}:443$",
        "--ignore-hosts",
        rf"^{server}:{PASSED}$",
        "--tcp-hosts",
        rf"^{server}:{INSPECTED}$",
    ]


@pytest.fixture(scope="module", params=["regular", "socks5"])
def proxy(request: pytest.FixtureRequest, exit_peer: Any, workdir: Path) -> Iterator[Mitmdump]:
    """mitmdump + addon in regular (HTTP CONNECT) or SOCKS5 mode, same options."""
    mode = request.param
    here = workdir / mode
    here.mkdir()
    with run_mitmdump(
        exit_peer.client_ns, here, "--mode", mode, *_args(exit_peer, here), name=mode
    ) as dump:
        dump.wait_for_log(f"WireGuard tunnel {TUNNEL!r} is up")
        dump.mode = mode  # type: ignore[attr-defined]
        yield dump


def _via(proxy: Mitmdump) -> list[str]:
    if proxy.mode == "socks5":  # type: ignore[attr-defined]
        return ["--socks5-hostname", f"127.0.0.1:{proxy.port}"]
    return ["-x", proxy.proxy]


def test_tls_passthrough_by_name(exit_peer: Any, origin: Origin, proxy: Mitmdump) -> None:
    """An ignored host keeps the origin's own certificate end to end (curl trusts only the
    origin's CA, not mitmproxy's: an intercepted connection fails), the name is resolved in
    the tunnel, and the origin sees our tunnel address."""
    r = curl(
        exit_peer.client_ns,
        "--cacert",
        str(origin.ca),
        *_via(proxy),
        f"https://{ORIGIN_NAME}/echo-passthrough",
    )
    assert r.returncode == 0, r.stderr
    assert r.status == 200, (r.status, r.body[:300])
    echo = r.json()
    assert echo["client"] in tunnel_addresses(exit_peer)
    assert echo["path"] == "/echo-passthrough" and echo["tls"] is True
    assert r.http_version == "2"  # curl and the origin negotiated h2 between themselves


def _open(ns: Any, proxy: Mitmdump, host: str, port: int) -> socket.socket:
    """A connection to host:port through the proxy: HTTP CONNECT or SOCKS5 (RFC 1928)."""
    sock = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(30)
    try:
        sock.connect(("127.0.0.1", proxy.port))
        if proxy.mode == "socks5":  # type: ignore[attr-defined]
            sock.sendall(b"\x05\x01\x00")
            assert _read_exactly(sock, 2) == b"\x05\x00"
            request = b"\x05\x01\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big")
            sock.sendall(request)
            reply = _read_exactly(sock, 10)
            assert reply[:2] == b"\x05\x00", reply
            return sock
        sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += _read_exactly(sock, 1)  # nothing after the response is consumed
        assert b" 200 " in head.split(b"\r\n", 1)[0], head
        return sock
    except BaseException:
        sock.close()
        raise


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes: {data[-80:]!r}")
        data += chunk
    return data


def _read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        line += _read_exactly(sock, 1)
    return line


def _read_to_eof(sock: socket.socket) -> bytes:
    parts = []
    while chunk := sock.recv(1 << 16):
        parts.append(chunk)
    return b"".join(parts)


def _raw_exchange(
    exit_peer: Any, origin: Origin, proxy: Mitmdump, port: int, *, upload: int, download: int
) -> tuple[bytes, dict[str, Any]]:
    """The server speaks first; we ask for ``download`` bytes and send ``upload`` bytes at
    once, then finish our side. With SOCKS5 we half-close and read on: the download, the
    server's digest of what it read, and its close. mitmproxy's HTTP CONNECT tunnel turns a
    client's half-close into a full close (mitmproxy's own behaviour, without the addon
    too), so there we read the download first, then close. Either way the server must have
    read every byte. Returns the greeting's first word and its JSON."""
    sock = _open(exit_peer.client_ns, proxy, exit_peer.server_tunnel_v4, port)
    body = f"SEND {download}\n".encode() + pattern(upload)
    digest = hashlib.sha256(body).hexdigest()
    with sock:
        # nothing sent yet: the greeting must come (mitmproxy connected and relays)
        word, _, rest = _read_line(sock).partition(b" ")
        greeting = json.loads(rest)
        sock.sendall(body)
        if proxy.mode == "socks5":  # type: ignore[attr-defined]
            sock.shutdown(socket.SHUT_WR)  # our FIN; everything after it comes to us still
            data = _read_to_eof(sock)
            assert len(data) >= download and data[:download] == pattern(download)
            assert data[download:] == f"GOT {len(body)} {digest}\n".encode()
        else:
            assert _read_exactly(sock, download) == pattern(download)
    local = f"{exit_peer.server_tunnel_v4}:{port}"

    def seen() -> list[dict[str, Any]]:
        return [
            e
            for e in origin.entries("raw")
            if e["local"] == local and e["client"] == greeting["client"] and e["sha256"] == digest
        ]

    wait_for(lambda: bool(seen()), 10, f"the origin to read all {len(body)} bytes")
    assert seen()[0]["received"] == len(body)
    return word, greeting


def test_raw_tcp_passthrough_server_first(exit_peer: Any, origin: Origin, proxy: Mitmdump) -> None:
    word, greeting = _raw_exchange(
        exit_peer, origin, proxy, PASSED, upload=3 << 20, download=4 << 20
    )
    assert word == b"HELLO"  # passed through untouched: the script never saw it
    assert greeting["client"] in tunnel_addresses(exit_peer)


def test_raw_tcp_inspected_and_rewritten_by_a_script(
    exit_peer: Any, origin: Origin, proxy: Mitmdump
) -> None:
    word, greeting = _raw_exchange(
        exit_peer, origin, proxy, INSPECTED, upload=1 << 20, download=2 << 20
    )
    assert word == b"HOWDY"  # mitmproxy's TCP layer held the stream; the script rewrote it
    assert greeting["client"] in tunnel_addresses(exit_peer)
    text = proxy.text()
    assert "raw-tcp-message from_client=False" in text
    assert "raw-tcp-message from_client=True" in text
