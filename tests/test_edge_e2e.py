"""End to end: a real ``mitmdump -s addons/mitm_wg.py`` driven by curl.

mitmdump loads the addon through tests/loopback_addon.py (the test-side loopback dialer):
connections go through the whole edge (patched open_connection → routing → bridge → trio →
transport) but end at a loopback HTTP server instead of a WireGuard peer. Everything stays
on 127.0.0.0/8. Without the dialer, mitmdump loads the shipped addons/mitm_wg.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mitm_wg.config import encode_key, generate_private_key, public_key_of

ROOT = Path(__file__).resolve().parent.parent
ADDON = ROOT / "addons" / "mitm_wg.py"
LOOPBACK_ADDON = ROOT / "tests" / "loopback_addon.py"
REWRITE = ROOT / "addons" / "examples" / "rewrite_request.py"
ROUTE = ROOT / "addons" / "examples" / "route_by_host.py"
MITMDUMP = Path(sys.executable).parent / "mitmdump"
CURL = shutil.which("curl")


@pytest.fixture(autouse=True)
def _need_curl() -> None:
    # A missing curl is a broken test environment, not a reason to skip (scripts/test installs it).
    assert CURL is not None, "curl is not installed (apt-get install curl)"


class Upstream(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        super().__init__((host, 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: Upstream

    def do_GET(self) -> None:
        self.server.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        body = f"upstream saw {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream("127.0.0.1")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def wg_conf(tmp_path: Path) -> str:
    path = tmp_path / "lo.conf"
    path.write_text(
        f"[Interface]\nPrivateKey = {encode_key(generate_private_key())}\n"
        f"Address = 10.9.0.2/32\n\n[Peer]\n"
        f"PublicKey = {encode_key(public_key_of(generate_private_key()))}\n"
        f"AllowedIPs = 127.0.0.1/32\nEndpoint = 127.0.0.1:9\n"
    )
    return str(path)


class Mitmdump:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path, port: int) -> None:
        self.proc, self.log, self.port = proc, log, port

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def mitmdump(tmp_path: Path, *args: str, test_dialer: bool = True) -> Iterator[Mitmdump]:
    log = tmp_path / f"mitmdump-{len(list(tmp_path.glob('mitmdump-*')))}.log"
    env = dict(os.environ, NO_PROXY="", no_proxy="")
    addon = LOOPBACK_ADDON if test_dialer else ADDON
    cmd = [str(MITMDUMP), "--listen-host", "127.0.0.1", "-p", "0", "-s", str(addon), *args]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        port = None
        for _ in range(600):  # up to ~30 s for a cold start on a busy machine
            # Ready once mitmproxy has finished starting (mitm_wg.mitmproxy.ready), not when it
            # first listens: mitmproxy 12 makes its certificate store only after that.
            text = log.read_text(errors="replace")
            match = re.search(r"listening at 127\.0\.0\.1:(\d+)", text)
            if match and "mitm-wg: ready" in text:
                port = int(match.group(1))
                break
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        if port is None:
            raise AssertionError(f"mitmdump did not start:\n{log.read_text(errors='replace')}")
        yield Mitmdump(proc, log, port)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def curl(*args: str) -> tuple[int, dict[str, str], str]:
    assert CURL is not None
    out = subprocess.run(
        [CURL, "-s", "-i", "--max-time", "20", *args],
        capture_output=True,
        env=dict(os.environ, NO_PROXY="", no_proxy=""),
        check=False,
    ).stdout.decode(errors="replace")
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")
    lines = head.splitlines()
    status = int(lines[0].split()[1]) if lines else 0
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def wait_for_log(dump: Mitmdump, needle: str) -> str:
    for _ in range(200):
        text = dump.text()
        if needle in text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not in the log:\n{dump.text()}")


def stop(dump: Mitmdump) -> str:
    dump.proc.send_signal(signal.SIGINT)
    assert dump.proc.wait(timeout=15) == 0
    text = dump.text()
    assert "Traceback" not in text
    return text


def test_regular_mode_goes_through_the_bridge_and_fails_closed(
    tmp_path: Path, upstream: Upstream, wg_conf: str
) -> None:
    port = upstream.server_address[1]
    with mitmdump(
        tmp_path,
        "-s",
        str(REWRITE),
        "--set",
        f"wg_conf={wg_conf}",
    ) as dump:
        status, headers, body = curl(
            "-x", f"http://127.0.0.1:{dump.port}", f"http://127.0.0.1:{port}/old/page"
        )
        assert status == 200, dump.text()
        assert headers["x-mitm-wg-tunnel"] == "lo"  # metadata the addon filled in
        assert body == "upstream saw /new/page"
        path, req_headers = upstream.seen[-1]
        assert path == "/new/page" and req_headers["x-via-mitm-wg"] == "1"
        wait_for_log(dump, f"127.0.0.1:{port} through tunnel 'lo'")

        # 127.0.0.2 is outside the config's AllowedIPs: mitmproxy reports the refusal.
        status, _, body = curl("-x", f"http://127.0.0.1:{dump.port}", f"http://127.0.0.2:{port}/")
        assert status == 502
        assert "outside the AllowedIPs" in body
        assert len(upstream.seen) == 1
        text = stop(dump)
    assert "TEST-ONLY loopback dialer" in text


def test_socks5_mode(tmp_path: Path, upstream: Upstream, wg_conf: str) -> None:
    port = upstream.server_address[1]
    with mitmdump(
        tmp_path,
        "--mode",
        "socks5",
        "-s",
        str(REWRITE),
        "--set",
        f"wg_conf={wg_conf}",
    ) as dump:
        status, headers, body = curl(
            "--socks5", f"127.0.0.1:{dump.port}", f"http://127.0.0.1:{port}/old/s"
        )
        assert status == 200, dump.text()
        assert headers["x-mitm-wg-tunnel"] == "lo"
        assert body == "upstream saw /new/s"
        stop(dump)


def test_reverse_mode_and_per_host_routing(
    tmp_path: Path, upstream: Upstream, wg_conf: str
) -> None:
    port = upstream.server_address[1]
    with mitmdump(
        tmp_path,
        "--mode",
        f"reverse:http://127.0.0.1:{port}",
        "-s",
        str(REWRITE),
        "-s",
        str(ROUTE),
        "--set",
        f"wg_conf=home={wg_conf}",
        "--set",
        "wg_route=127.0.0.1=direct",
    ) as dump:
        status, headers, body = curl(f"http://127.0.0.1:{dump.port}/old/r")
        assert status == 200, dump.text()
        # route_by_host chose a direct connection for 127.0.0.1
        assert headers["x-mitm-wg-tunnel"] == "direct"
        assert body == "upstream saw /new/r"
        wait_for_log(dump, "DIRECT, not through WireGuard: chosen by a script")
        stop(dump)


def test_without_wg_conf_the_addon_changes_nothing(tmp_path: Path, upstream: Upstream) -> None:
    port = upstream.server_address[1]
    with mitmdump(tmp_path, test_dialer=False) as dump:
        status, _, body = curl("-x", f"http://127.0.0.1:{dump.port}", f"http://127.0.0.1:{port}/x")
        assert status == 200
        assert body == "upstream saw /x"
        text = stop(dump)
    assert "--set wg_conf=" in text
    assert "through tunnel" not in text
