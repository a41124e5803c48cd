"""`mitm-wg check CONFIG --url URL` against wireguard-go + Linux + real HTTP(S) servers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.tlsorigin import SERVER_SCRIPT, make_ca_and_leaf

REPO = Path(__file__).resolve().parent.parent


def run_check(peer, tmp_path: Path, *args: str, env: dict | None = None, config: str | None = None):
    path = tmp_path / "wg0.conf"
    path.write_text(config or peer.client_config_text())
    return peer.client_ns.exec(
        [sys.executable, "-m", "mitm_wg", "check", str(path), *args],
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        timeout=120,
        check=False,
    )


def test_check_url_http_by_ip(exit_peer, tmp_path: Path) -> None:
    url = f"http://{exit_peer.server_tunnel_v4}:{exit_peer.http_port}/bytes/2000000"
    result = run_check(exit_peer, tmp_path, "--url", url)
    assert result.returncode == 0, result.stderr
    assert "HTTP/1.1 200" in result.stdout or "HTTP/1.0 200" in result.stdout
    assert "2000000 bytes" in result.stdout
    assert "time to first byte" in result.stdout and "MB/s" in result.stdout


def test_check_url_fetches_through_the_checked_session(exit_peer, tmp_path: Path) -> None:
    """One tunnel, one handshake: the fetch uses the session the check made. A second
    tunnel with the same key right after sent its initiation within wireguard-go's 20 ms
    initiation rate limit and lost it 1 run in 7 (5 s to the retry)."""
    url = f"http://{exit_peer.server_tunnel_v4}:{exit_peer.http_port}/bytes/1000"
    result = run_check(exit_peer, tmp_path, "-v", "--url", url)
    assert result.returncode == 0, result.stderr
    assert "1000 bytes" in result.stdout
    log = result.stderr
    assert log.count("WireGuard handshake completed with peer") == 1, log
    assert "handshaking again" not in log and "rekeyed" not in log


def test_check_url_name_resolved_by_tunnel_dns(exit_peer, tmp_path: Path) -> None:
    before = len(exit_peer.queries())
    result = run_check(
        exit_peer, tmp_path, "--url", f"http://exit.test:{exit_peer.http_port}/bytes/1000"
    )
    assert result.returncode == 0, result.stderr
    assert "1000 bytes" in result.stdout
    assert "exit.test" in exit_peer.queries()[before:]


def test_check_url_https_verification(exit_peer, tmp_path: Path) -> None:
    ca, leaf, key = make_ca_and_leaf(tmp_path, ["exit.test"], [exit_peer.server_tunnel_v4])
    script = tmp_path / "tls_server.py"
    script.write_text(SERVER_SCRIPT)
    server = exit_peer.ns.popen(
        [sys.executable, str(script), str(leaf), str(key), exit_peer.server_tunnel_v4, "8443"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        url = "https://exit.test:8443/"
        trusted = run_check(exit_peer, tmp_path, "--url", url, env={"SSL_CERT_FILE": str(ca)})
        assert trusted.returncode == 0, trusted.stderr
        assert "HTTP/1.1 200" in trusted.stdout and "2700 bytes" in trusted.stdout
        untrusted = run_check(exit_peer, tmp_path, "--url", url)
        assert untrusted.returncode == 1
        assert "certificate verification failed" in untrusted.stderr
        assert len(untrusted.stderr.strip().splitlines()) == 1
        insecure = run_check(exit_peer, tmp_path, "--url", url, "--insecure")
        assert insecure.returncode == 0, insecure.stderr
    finally:
        exit_peer.ns.kill(server)


def test_check_url_refused_is_one_line(exit_peer, tmp_path: Path) -> None:
    result = run_check(exit_peer, tmp_path, "--url", f"http://{exit_peer.server_tunnel_v4}:9/")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "refused" in result.stderr.lower()
