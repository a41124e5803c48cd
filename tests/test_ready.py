"""``mitm-wg: ready``: logged once mitmproxy has finished starting (mitm_wg/mitmproxy/ready.py).

The real test: mitmdump with the addon, and an HTTPS request through it (which needs
mitmproxy's certificate store, the piece mitmproxy 12 makes last) sent the instant the ready
line appears, then a plain HTTP one. CI runs it on mitmproxy 11 and 12.
"""

from __future__ import annotations

import logging
import os
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import require_mitmdump
from tlsorigin import make_ca_and_leaf

from mitm_wg.mitmproxy.ready import READY_PREFIX, startup_finished

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "addons" / "mitm_wg.py"
MITMDUMP = Path(sys.executable).parent / "mitmdump"


# -- the condition ---------------------------------------------------------------------------


class _Addons(dict[str, Any]):
    def get(self, name: str, default: Any = None) -> Any:  # as mitmproxy's AddonManager.get
        return super().get(name, default)


def _master(**addons: Any) -> Any:
    return SimpleNamespace(addons=_Addons(addons))


def test_not_finished_while_mitmproxys_startup_error_check_is_installed() -> None:
    handler = logging.NullHandler()
    errorcheck = SimpleNamespace(logger=handler)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        assert not startup_finished(_master(errorcheck=errorcheck))
    finally:
        root.removeHandler(handler)
    assert startup_finished(_master(errorcheck=errorcheck))


def test_not_finished_without_a_certificate_store_or_while_servers_start() -> None:
    assert not startup_finished(_master(tlsconfig=SimpleNamespace(certstore=None)))
    assert startup_finished(_master(tlsconfig=SimpleNamespace(certstore=object())))
    assert not startup_finished(_master(proxyserver=SimpleNamespace(is_running=False)))
    busy = SimpleNamespace(is_running=True, is_updating=True)
    assert not startup_finished(_master(proxyserver=busy))
    assert startup_finished(_master(proxyserver=SimpleNamespace(is_running=True)))


# -- mitmdump for real -----------------------------------------------------------------------


class _Origin(ThreadingHTTPServer):
    daemon_threads = True


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"origin saw {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def origins(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    """(http port, https port, the https origin's CA) on 127.0.0.1."""
    ca, leaf, key = make_ca_and_leaf(tmp_path, ["localhost"], ["127.0.0.1"])
    plain = _Origin(("127.0.0.1", 0), _Handler)
    secure = _Origin(("127.0.0.1", 0), _Handler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(leaf, key)
    secure.socket = ctx.wrap_socket(secure.socket, server_side=True)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (plain, secure)]
    for thread in threads:
        thread.start()
    yield plain.server_address[1], secure.server_address[1], ca
    for server in (plain, secure):
        server.shutdown()
        server.server_close()


def test_requests_sent_the_instant_ready_is_logged_succeed(
    tmp_path: Path, origins: tuple[int, int, Path]
) -> None:
    require_mitmdump()
    http_port, https_port, origin_ca = origins
    confdir = tmp_path / "conf"
    argv = [
        str(MITMDUMP),
        "--listen-host", "127.0.0.1",
        "--listen-port", "0",
        "--set", f"confdir={confdir}",
        "--set", f"ssl_verify_upstream_trusted_ca={origin_ca}",
        "-s", str(ADDON),
    ]  # fmt: skip
    env = dict(os.environ, NO_PROXY="", no_proxy="", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=tmp_path,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        # Block on mitmdump's own output (no polling delay): act on the very line.
        for line in proc.stdout:
            lines.append(line)
            if READY_PREFIX in line:
                break
        else:
            raise AssertionError(f"mitmdump exited ({proc.wait()}):\n{''.join(lines)}")
        proxy = line.rsplit("proxy at ", 1)[1].strip()
        https = urllib.request.build_opener(
            urllib.request.ProxyHandler({"https": f"http://{proxy}"}),
            urllib.request.HTTPSHandler(
                context=ssl.create_default_context(cafile=confdir / "mitmproxy-ca-cert.pem")
            ),
        )
        with https.open(f"https://localhost:{https_port}/first", timeout=30) as response:
            assert (response.status, response.read()) == (200, b"origin saw /first")
        plain = urllib.request.build_opener(
            urllib.request.ProxyHandler({"http": f"http://{proxy}"})
        )
        with plain.open(f"http://127.0.0.1:{http_port}/second", timeout=30) as response:
            assert (response.status, response.read()) == (200, b"origin saw /second")
        assert proc.poll() is None, "mitmdump exited after the requests"
    finally:
        if proc.poll() is None:
            proc.terminate()
        rest, _ = proc.communicate(timeout=30)
    text = "".join(lines) + rest
    assert "Error logged during startup" not in text, text
    assert "Traceback" not in text, text
    # the ready line names the address mitmproxy listens on
    assert f"HTTP(S) proxy listening at {proxy}" in text, text
