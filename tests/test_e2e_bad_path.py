"""End to end over the path real users have: the exit 100 ms away on a lossy Wi-Fi.

The layout of tests/test_e2e_curl.py (curl → mitmdump + addon → our WireGuard → wireguard-go
→ the echo origin, Linux TCP, on the exit's tunnel addresses only), with an
:class:`~harness.relay.ImpairedRelay` between our UDP socket and the exit: 50 ms each way,
2 % loss, 1 % duplication and 2 % reordering in both directions. Everything a user does
there must work byte-exact (no speed is asserted): names resolved through the tunnel (a lost
DNS datagram is retried), HTTPS both ways and on both HTTP versions, several connections at
once, a WebSocket, and a slow client behind a streamed body (our receive window closes and
reopens while Linux's persist probes and our window updates cross the lossy path).

The tunnel's first handshake initiation is lost too (the relay drops everything until it has
dropped one, then becomes the lossy path): the first request must wait for WireGuard's retry.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import (
    ORIGIN_NAME,
    REWRITE,
    CurlResult,
    Mitmdump,
    Origin,
    WsClient,
    assert_pattern,
    curl,
    https_upload,
    pattern,
    run_mitmdump,
    tunnel_addresses,
    write_client_config,
)

from harness.relay import ImpairedRelay, Impairment

TUNNEL = "far"
#: one direction of the path: half the round trip, and a lossy Wi-Fi's misdeeds
LOSSY = Impairment(delay=0.05, loss=0.02, duplicate=0.01, reorder=0.02)
#: curl's limit for one transfer: generous, the path is slow and the machine shared
MAX_TIME = 180.0


@pytest.fixture(scope="module")
def relay(exit_peer: Any) -> Iterator[ImpairedRelay]:
    """Drops everything from us until it has dropped one datagram (our first handshake
    initiation), then is the lossy 100 ms path both ways."""
    with ImpairedRelay(
        exit_peer.endpoint,
        listen=("127.0.0.1", 0),
        seed=7,
        up=Impairment(loss=1.0),
        down=LOSSY,
        socket_factory=exit_peer.client_ns.socket,
    ) as relay:
        done = threading.Event()

        def open_after_the_first_loss() -> None:
            while not done.is_set() and relay.up.dropped < 1:
                time.sleep(0.005)
            relay.set_impairment(up=LOSSY, down=LOSSY)

        opener = threading.Thread(target=open_after_the_first_loss, daemon=True)
        opener.start()
        try:
            yield relay
        finally:
            done.set()
            opener.join(5)


@pytest.fixture(scope="module")
def proxy(
    exit_peer: Any, workdir: Path, origin: Origin, relay: ImpairedRelay
) -> Iterator[Mitmdump]:
    conf = write_client_config(exit_peer, workdir, TUNNEL, endpoint=relay.address)
    args = [
        "-s",
        str(REWRITE),
        "--set",
        f"wg_conf={TUNNEL}={conf}",
        "--set",
        f"ssl_verify_upstream_trusted_ca={origin.ca}",
        # bodies over 256 KiB stream (as users set it for big downloads): a slow client's
        # pace then reaches our receive window instead of mitmproxy's buffer
        "--set",
        "stream_large_bodies=256k",
    ]
    with run_mitmdump(exit_peer.client_ns, workdir, *args) as dump:
        dump.wait_for_log(f"WireGuard tunnel {TUNNEL!r} is up")
        yield dump


def _https(exit_peer: Any, proxy: Mitmdump, *args: str) -> CurlResult:
    return curl(
        exit_peer.client_ns, "--cacert", str(proxy.ca_pem), "-x", proxy.proxy, *args,
        max_time=MAX_TIME,
    )  # fmt: skip


def test_first_request_although_the_first_initiation_was_lost(
    exit_peer: Any, relay: ImpairedRelay, proxy: Mitmdump
) -> None:
    """The tunnel handshakes on first use: this request's initiation is lost, and it
    waits for WireGuard's retry (REKEY_TIMEOUT, 5 s) instead of failing."""
    assert relay.up.received == 0  # (nothing went out before the first request)
    r = curl(exit_peer.client_ns, "-x", proxy.proxy, f"http://{ORIGIN_NAME}/old/first")
    assert r.returncode == 0 and r.status == 200, r
    assert r.json()["client"] in tunnel_addresses(exit_peer)
    assert relay.up.dropped >= 1
    proxy.wait_for_log("WireGuard handshake completed")


def test_names_resolve_through_the_lossy_tunnel(
    exit_peer: Any, origin: Origin, proxy: Mitmdump
) -> None:
    """Ten requests by name, each on a new connection (curl exits in between): each needs
    the name (mitmproxy asks our resolver, whose queries cross the lossy path) and a
    handshake of its own over it."""
    for i in range(10):
        r = curl(exit_peer.client_ns, "-x", proxy.proxy, f"http://{ORIGIN_NAME}/old/n{i}")
        assert r.returncode == 0 and r.status == 200, r
        echo = r.json()
        assert echo["path"] == f"/new/n{i}"
        assert echo["client"] in tunnel_addresses(exit_peer)
        assert r.headers["x-mitm-wg-tunnel"] == TUNNEL
    queries = [q for q in exit_peer.dns_queries() if q.name == ORIGIN_NAME]
    assert queries and all(q.client.startswith(exit_peer.client_tunnel_v4) for q in queries)


SIZE = 6 * 1024 * 1024


def _no_black_hole(proxy: Mitmdump) -> None:
    """Losses, copies and reordering are no MTU black hole: the tunnel never took the path
    for one (TcpConfig.blackhole_rtos, rx_stall), so it never shrank to 1200 bytes."""
    assert "seem to vanish" not in proxy.text()


@pytest.mark.parametrize("version", ["--http1.1", "--http2"])
def test_https_download_byte_exact(
    exit_peer: Any, origin: Origin, proxy: Mitmdump, version: str
) -> None:
    r = _https(exit_peer, proxy, version, f"https://{ORIGIN_NAME}/bytes/{SIZE}")
    assert_pattern(r, SIZE)
    assert r.http_version == ("1.1" if version == "--http1.1" else "2")
    seen = [e for e in origin.requests() if e["path"] == f"/bytes/{SIZE}"]
    assert seen and seen[-1]["client"] in tunnel_addresses(exit_peer)
    assert seen[-1]["proto"] == ("http/1.1" if version == "--http1.1" else "h2")
    _no_black_hole(proxy)


def test_https_upload_byte_exact(exit_peer: Any, proxy: Mitmdump, workdir: Path) -> None:
    https_upload(exit_peer, proxy, workdir, pattern(SIZE)[::-1], max_time=MAX_TIME)
    _no_black_hole(proxy)


def test_parallel_connections(exit_peer: Any, origin: Origin, proxy: Mitmdump) -> None:
    """Four HTTP/1.1 downloads at once: four of our connections share the lossy path."""
    size = 2 * 1024 * 1024
    before = len(origin.entries("connect"))

    def one(i: int) -> CurlResult:
        return _https(exit_peer, proxy, "--http1.1", f"https://{ORIGIN_NAME}/bytes/{size}?p={i}")

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    for r in results:
        assert_pattern(r, size)
    connects = origin.entries("connect")[before:]
    assert len([c for c in connects if c["tls"]]) >= 4
    _no_black_hole(proxy)


def _rwnd_limited_ms(exit_peer: Any) -> int:
    """The most time any of the origin's HTTPS sockets spent limited by its peer's receive
    window (Linux's ``tcpi_rwnd_limited``, as ``ss -i`` shows it), in ms."""
    r = exit_peer.ns.exec(["ss", "-tinH", "state", "established", "( sport = :443 )"], check=False)
    return max((int(ms) for ms in re.findall(r"rwnd_limited:(\d+)ms", r.stdout)), default=0)


def _slow_https_get(
    ns: Any, proxy: Mitmdump, path: str, *, rate: float, rcvbuf: int = 32 * 1024
) -> bytes:
    """GET ``https://exit.test{path}`` through mitmproxy (CONNECT, TLS with its CA), read at
    about ``rate`` bytes/s through a ``rcvbuf``-byte socket buffer: a slow client whose own
    buffers cannot hide its pace (curl's autotuned loopback buffers hold megabytes).
    Returns the body (Content-Length framing)."""
    raw = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    raw.settimeout(MAX_TIME)
    with contextlib.closing(raw):
        raw.connect(("127.0.0.1", proxy.port))
        raw.sendall(
            f"CONNECT {ORIGIN_NAME}:443 HTTP/1.1\r\nHost: {ORIGIN_NAME}:443\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = raw.recv(4096)
            assert chunk, f"proxy closed during CONNECT: {head!r}"
            head += chunk
        assert b" 200 " in head.split(b"\r\n", 1)[0], head
        ctx = ssl.create_default_context(cafile=str(proxy.ca_pem))
        ctx.set_alpn_protocols(["http/1.1"])
        with ctx.wrap_socket(raw, server_hostname=ORIGIN_NAME) as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {ORIGIN_NAME}\r\n\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = tls.recv(16384)
                assert chunk, f"closed in the response head: {data!r}"
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head
            length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)[1])
            parts = [body]
            got = len(body)
            started = time.monotonic()
            while got < length:
                chunk = tls.recv(min(16384, length - got))
                assert chunk, f"closed after {got} of {length} bytes"
                parts.append(chunk)
                got += len(chunk)
                # the reader's pace: sleep until `got` bytes are due at `rate`
                lag = started + got / rate - time.monotonic()
                if lag > 0:
                    time.sleep(lag)
            return b"".join(parts)


@contextlib.contextmanager
def _small_tcp_send_buffers(ns: Any) -> Iterator[None]:
    """Cap the TCP send buffers of ``ns`` (``tcp_wmem`` is per network namespace) at 64 KiB
    while the block runs: over loopback Linux grows a socket's send buffer to megabytes
    (64 KiB segments), which would hold a slow client's backlog in mitmproxy's kernel
    instead of letting it reach our receive window."""
    key = "net.ipv4.tcp_wmem"
    before = ns.exec(["sysctl", "-n", key]).stdout.split()
    ns.exec(["sysctl", "-qw", f"{key}=4096 16384 65536"])
    try:
        yield
    finally:
        ns.exec(["sysctl", "-qw", f"{key}={' '.join(before)}"])


def test_slow_client_behind_a_streamed_body(exit_peer: Any, proxy: Mitmdump) -> None:
    """A client reads at 768 KiB/s a body mitmproxy streams: mitmproxy stops reading from
    us, our receive window closes, and Linux's window probes and our window updates cross
    the lossy path until the last byte."""
    # more than mitmproxy and the client's socket hold plus what our receive buffer grows
    # to while mitmproxy reads at the client's pace (the buffer follows what is read per
    # RTT), so that the window must close
    size = 8 * 1024 * 1024
    seen: list[int] = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            seen.append(_rwnd_limited_ms(exit_peer))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with _small_tcp_send_buffers(exit_peer.client_ns):
            body = _slow_https_get(
                exit_peer.client_ns, proxy, f"/bytes/{size}?slow", rate=768 * 1024
            )
    finally:
        done.set()
        watcher.join(10)
    assert len(body) == size
    assert hashlib.sha256(body).digest() == hashlib.sha256(pattern(size)).digest()
    # The slow reader's pace reached the origin through our window: its sender waited on
    # our receive window for seconds (a fast reader's download: ~0).
    assert max(seen) >= 2000, seen


def test_websocket_echo(exit_peer: Any, origin: Origin, proxy: Mitmdump) -> None:
    with WsClient.connect(
        exit_peer.client_ns, proxy.port, ORIGIN_NAME, 443, "/ws", proxy.ca_pem
    ) as ws:
        assert ws.whoami() in tunnel_addresses(exit_peer)
        for i in range(20):
            blob = pattern(50_000 + i)[::-1]
            ws.send(blob)
            assert ws.receive() == blob
        ws.close()


def test_the_path_was_lossy(relay: ImpairedRelay, proxy: Mitmdump) -> None:
    """(Last: the module's transfers went through the relay and met its impairments.)"""
    for direction in (relay.up, relay.down):
        assert direction.forwarded > 5000
        assert direction.dropped > 50
        assert direction.duplicated > 20
        assert direction.reordered > 50
