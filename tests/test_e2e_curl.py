"""End to end with real processes: curl → mitmdump + addon → our WireGuard → wireguard-go → origin.

Layout (tests/harness): ``mitmdump -s addons/mitm_wg.py`` and curl run in the exit peer's
client namespace; the exit namespace runs wireguard-go, dnsmasq (``exit.test``) and our echo
origin (tests/e2e_helpers.py) on the server's *tunnel* addresses only, so a request can reach
it only through the tunnel, and the origin logs the address it saw. mitmdump also loads
addons/examples/rewrite_request.py (adds ``X-Via-Mitm-Wg: 1``, rewrites ``/old/`` → ``/new/``,
answers with ``X-Mitm-Wg-Tunnel``) and trusts the origin's test CA through
``ssl_verify_upstream_trusted_ca``; curl trusts mitmproxy's CA from the confdir.

What HTTP/2 covers: curl negotiates h2 with mitmproxy, and mitmproxy negotiates h2 with the
origin through the tunnel (the origin reports ``"proto": "h2"``): h2 on both legs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import (
    ORIGIN_NAME,
    REWRITE,
    Mitmdump,
    Origin,
    WsClient,
    assert_pattern,
    curl,
    curl_via,
    pattern,
    run_mitmdump,
    tunnel_addresses,
    write_client_config,
)

TUNNEL = "exit"


def _mitmdump_args(exit_peer: Any, workdir: Path, origin: Origin) -> list[str]:
    conf = write_client_config(exit_peer, workdir, TUNNEL)
    return [
        "-s",
        str(REWRITE),
        "--set",
        f"wg_conf={TUNNEL}={conf}",
        "--set",
        f"ssl_verify_upstream_trusted_ca={origin.ca}",
    ]


@pytest.fixture(scope="module")
def proxy(exit_peer: Any, workdir: Path, origin: Origin) -> Iterator[Mitmdump]:
    args = _mitmdump_args(exit_peer, workdir, origin)
    with run_mitmdump(exit_peer.client_ns, workdir, *args) as dump:
        dump.wait_for_log(f"WireGuard tunnel {TUNNEL!r} is up")
        yield dump


def _last_request(origin: Origin, path: str) -> dict[str, Any]:
    matching = [r for r in origin.requests() if r["path"] == path]
    assert matching, f"the origin never saw {path}: {origin.paths()}"
    return matching[-1]


def _assert_echo(
    result: Any, exit_peer: Any, *, path: str, proto: str, tls: bool, client: str | None = None
) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    assert result.status == 200, (result.status, result.body[:500])
    echo: dict[str, Any] = result.json()
    # The origin saw our tunnel address (not the veth 10.77.N.1, not loopback) ...
    if client is None:
        assert echo["client"] in tunnel_addresses(exit_peer)
    else:
        assert echo["client"] == client
    # ... the request as rewritten by the user script ...
    assert echo["path"] == path
    assert echo["headers"]["x-via-mitm-wg"] == "1"
    assert echo["proto"] == proto and echo["tls"] is tls
    # ... and mitmproxy's flow metadata named the tunnel.
    assert result.headers["x-mitm-wg-tunnel"] == TUNNEL
    return echo


def test_http_by_name_resolved_in_the_tunnel(
    exit_peer: Any, origin: Origin, proxy: Mitmdump
) -> None:
    r = curl(exit_peer.client_ns, "-x", proxy.proxy, f"http://{ORIGIN_NAME}/old/echo?q=1")
    _assert_echo(r, exit_peer, path="/new/echo?q=1", proto="http/1.1", tls=False)
    seen = _last_request(origin, "/new/echo?q=1")
    assert seen["headers"]["host"] == ORIGIN_NAME
    # dnsmasq (reachable only inside the tunnel) answered the name, asked from our address.
    queries = [q for q in exit_peer.dns_queries() if q.name == ORIGIN_NAME]
    assert queries and all(q.client.startswith(exit_peer.client_tunnel_v4) for q in queries)
    proxy.wait_for_log(f"{ORIGIN_NAME}:80 through tunnel {TUNNEL!r}")


def test_http_to_ipv4_and_ipv6_literals(exit_peer: Any, origin: Origin, proxy: Mitmdump) -> None:
    r = curl(exit_peer.client_ns, "-x", proxy.proxy, f"http://{exit_peer.server_tunnel_v4}/echo4")
    _assert_echo(r, exit_peer, path="/echo4", proto="http/1.1", tls=False)
    r = curl(exit_peer.client_ns, "-x", proxy.proxy, f"http://[{exit_peer.server_tunnel_v6}]/echo6")
    assert r.status == 200, (r.stderr, r.body[:300])
    assert r.json()["client"] == exit_peer.client_tunnel_v6
    assert r.headers["x-mitm-wg-tunnel"] == TUNNEL


def test_https_with_verified_upstream(exit_peer: Any, origin: Origin, proxy: Mitmdump) -> None:
    r = curl(
        exit_peer.client_ns,
        "--http1.1",
        "--cacert",
        str(proxy.ca_pem),
        "-x",
        proxy.proxy,
        f"https://{ORIGIN_NAME}/old/secure",
    )
    _assert_echo(r, exit_peer, path="/new/secure", proto="http/1.1", tls=True)
    assert r.http_version == "1.1"
    connects = [c for c in origin.entries("connect") if c["tls"] and c["local"].endswith(":443")]
    assert connects and connects[-1]["client"] in tunnel_addresses(exit_peer)


def test_http2_on_both_legs(exit_peer: Any, origin: Origin, proxy: Mitmdump) -> None:
    r = curl(
        exit_peer.client_ns,
        "--http2",
        "--cacert",
        str(proxy.ca_pem),
        "-x",
        proxy.proxy,
        f"https://{ORIGIN_NAME}/old/h2",
    )
    assert r.http_version == "2", r  # curl ⇄ mitmproxy
    _assert_echo(r, exit_peer, path="/new/h2", proto="h2", tls=True)  # mitmproxy ⇄ origin


SIZE_20_MB = 20 * 1024 * 1024


def test_20_mb_download_byte_exact(exit_peer: Any, origin: Origin, proxy: Mitmdump) -> None:
    """HTTPS (curl offers h2: h2 on both legs), origin → tunnel → mitmproxy → curl."""
    url = f"https://{ORIGIN_NAME}/bytes/{SIZE_20_MB}"
    r = curl_via(exit_peer.client_ns, proxy, url, max_time=90)
    assert_pattern(r, SIZE_20_MB)
    assert _last_request(origin, f"/bytes/{SIZE_20_MB}")["client"] in tunnel_addresses(exit_peer)


def test_20_mb_upload_byte_exact(
    exit_peer: Any, origin: Origin, proxy: Mitmdump, workdir: Path
) -> None:
    """Plain HTTP/1.1, curl → mitmproxy → our TCP stack's send path → the origin."""
    data = pattern(SIZE_20_MB)[::-1]
    upload = workdir / "upload.bin"
    upload.write_bytes(data)
    r = curl(
        exit_peer.client_ns,
        "-x",
        proxy.proxy,
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
        f"@{upload}",
        f"http://{ORIGIN_NAME}/echo/upload",
        max_time=90,
    )
    echo = _assert_echo(r, exit_peer, path="/echo/upload", proto="http/1.1", tls=False)
    assert echo["method"] == "POST"
    assert echo["body_size"] == SIZE_20_MB
    assert echo["body_sha256"] == hashlib.sha256(data).hexdigest()


def test_websocket_echo(exit_peer: Any, origin: Origin, proxy: Mitmdump) -> None:
    with WsClient.connect(
        exit_peer.client_ns, proxy.port, ORIGIN_NAME, 443, "/ws", proxy.ca_pem
    ) as ws:
        assert ws.whoami() in tunnel_addresses(exit_peer)
        ws.send("hello through WireGuard")
        assert ws.receive() == "hello through WireGuard"
        blob = pattern(200_000)[::-1]
        ws.send(blob)
        assert ws.receive() == blob
        ws.close()
    upgrades = origin.entries("ws")
    assert upgrades and upgrades[-1]["client"] in tunnel_addresses(exit_peer)
    assert upgrades[-1]["headers"]["x-via-mitm-wg"] == "1"  # the script saw the handshake


def test_socks5_hostname(exit_peer: Any, origin: Origin, workdir: Path) -> None:
    socks_dir = workdir / "socks5"
    socks_dir.mkdir()
    args = _mitmdump_args(exit_peer, socks_dir, origin)
    asked_before = sum(1 for q in exit_peer.dns_queries() if q.name == ORIGIN_NAME)
    with run_mitmdump(exit_peer.client_ns, socks_dir, "--mode", "socks5", *args) as dump:
        socks = f"127.0.0.1:{dump.port}"
        r = curl(exit_peer.client_ns, "--socks5-hostname", socks, f"http://{ORIGIN_NAME}/old/s")
        _assert_echo(r, exit_peer, path="/new/s", proto="http/1.1", tls=False)
        r = curl(
            exit_peer.client_ns,
            "--cacert",
            str(dump.ca_pem),
            "--socks5-hostname",
            socks,
            f"https://{ORIGIN_NAME}/old/s2",
        )
        _assert_echo(r, exit_peer, path="/new/s2", proto="h2", tls=True)
    # the name went to mitmproxy unresolved and was resolved through the tunnel's DNS
    asked = [q for q in exit_peer.dns_queries() if q.name == ORIGIN_NAME]
    assert len(asked) > asked_before
    assert all(q.client.startswith(exit_peer.client_tunnel_v4) for q in asked)


def test_upstream_certificate_is_verified(exit_peer: Any, origin: Origin, workdir: Path) -> None:
    """Without the test CA in ssl_verify_upstream_trusted_ca mitmproxy refuses the origin."""
    plain_dir = workdir / "untrusting"
    plain_dir.mkdir()
    conf = write_client_config(exit_peer, plain_dir, TUNNEL)
    requests_before = len(origin.requests())
    with run_mitmdump(exit_peer.client_ns, plain_dir, "--set", f"wg_conf={TUNNEL}={conf}") as dump:
        r = curl(
            exit_peer.client_ns,
            "--cacert",
            str(dump.ca_pem),
            "-x",
            dump.proxy,
            f"https://{ORIGIN_NAME}/echo-untrusted",
        )
        assert r.status == 502, (r.status, r.body[:300])
        assert b"certificate verify failed" in r.body.lower(), r.body[:500]
    # the TLS handshake went through the tunnel, but no request followed
    assert len(origin.requests()) == requests_before
