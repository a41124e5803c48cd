"""``mitm-wg demo``: the real thing as a subprocess, plus its small pure pieces.

The end-to-end tests run ``python -m mitm_wg demo --dump`` (exit peer = mitmproxy's WireGuard
mode on 127.0.0.1, front = mitmdump with the addon) and send a request through it to an
HTTP server on 127.0.0.1: our proxy → our userspace WireGuard/TCP → the exit mitmdump → the
origin. Everything stays on loopback; no root needed. HOME and TMPDIR point into tmp_path so
mitmproxy's CA and the demo's temporary files land there and can be checked.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import require_mitmdump

from mitm_wg import cli, demo
from mitm_wg.config import WireGuardConfig, generate_private_key, public_key_of

STARTUP_TIMEOUT = 60.0  # a hang guard only; a cold start on a busy machine can be slow
STOP_TIMEOUT = 30.0  # the demo itself gives each child 10 s before SIGKILL

_BANNER = re.compile(r"mitmdump --mode wireguard at UDP ([0-9.]+):(\d+),\s+pid (\d+)")


# -- pure pieces -----------------------------------------------------------------------------


def test_client_config_matches_mitmproxys_wireguard_mode() -> None:
    client, server = generate_private_key(), generate_private_key()
    text = demo.client_config_text(client, public_key_of(server), ("127.0.0.1", 51820))
    config = WireGuardConfig.parse(text)
    assert config.private_key == client
    assert [str(a) for a in config.addresses] == ["10.0.0.1/32"]
    assert [str(d) for d in config.dns_servers] == ["10.0.0.53"]
    (peer,) = config.peers
    assert peer.public_key == public_key_of(server)
    assert [str(n) for n in peer.allowed_ips] == ["0.0.0.0/0"]
    assert peer.endpoint is not None
    assert (peer.endpoint.host, peer.endpoint.port) == ("127.0.0.1", 51820)
    text6 = demo.client_config_text(client, public_key_of(server), ("::1", 51821))
    (peer6,) = WireGuardConfig.parse(text6).peers
    assert peer6.endpoint is not None and str(peer6.endpoint) == "[::1]:51821"


def test_tool_choice() -> None:
    assert demo.choose_tool(web=False, dump=False, interactive=True) == "mitmproxy"
    assert demo.choose_tool(web=False, dump=False, interactive=False) == "mitmdump"
    assert demo.choose_tool(web=False, dump=True, interactive=True) == "mitmdump"
    assert demo.choose_tool(web=True, dump=False, interactive=False) == "mitmweb"


def test_confdir_from_extra_args() -> None:
    home = Path("~/.mitmproxy").expanduser()
    assert demo.confdir_from_args([]) == home
    assert demo.confdir_from_args(["--set", "confdir=/x/y"]) == Path("/x/y")
    assert demo.confdir_from_args(["--set=confdir=/a"]) == Path("/a")
    assert demo.confdir_from_args(["-s", "confdir=b.py"]) == home  # a script, not an option


def test_arguments_after_double_dash_go_to_mitmproxy() -> None:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--dump", "--port", "9", "--", "--set", "x=1", "--port", "2"])
    assert (args.dump, args.web, args.port) == (True, False, 9)
    assert args.mitmproxy_args == ["--", "--set", "x=1", "--port", "2"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--web", "--dump"])


def test_port_in_use_is_refused_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    require_mitmdump()
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert demo.port_in_use("127.0.0.1", port)
        assert cli.main(["demo", "--dump", "--port", str(port)]) == 1
    assert f"127.0.0.1:{port} is already in use" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no temporary directory, no exit peer
    assert not demo.port_in_use("127.0.0.1", port)


# -- end to end ------------------------------------------------------------------------------


class Origin(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.seen: list[str] = []
        super().__init__(("127.0.0.1", 0), _OriginHandler)


class _OriginHandler(BaseHTTPRequestHandler):
    server: Origin

    def do_GET(self) -> None:
        self.server.seen.append(self.path)
        body = f"origin saw {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = Origin()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@dataclass
class RunningDemo:
    proc: subprocess.Popen[bytes]
    output: Path
    tmpdir: Path
    port: int
    exit_endpoint: tuple[str, int]
    exit_pid: int
    tunnel_conf: Path
    exit_log: Path

    def text(self) -> str:
        return self.output.read_text(errors="replace")


def _free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may contain spaces, so split after the last ")"
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(demo_run: RunningDemo, needle: str) -> str:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        text = demo_run.text()
        if needle in text:
            return text
        if demo_run.proc.poll() is not None:
            raise AssertionError(f"the demo exited ({demo_run.proc.returncode}):\n{text}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} did not appear:\n{text}")
        time.sleep(0.05)


@pytest.fixture
def running_demo(tmp_path: Path) -> Iterator[RunningDemo]:
    require_mitmdump()
    with start_demo(tmp_path, [sys.executable, "-m", "mitm_wg"]) as running:
        yield running


@contextlib.contextmanager
def start_demo(tmp_path: Path, mitm_wg: list[str]) -> Iterator[RunningDemo]:
    """``MITM_WG demo --dump`` (``mitm_wg`` is the command, e.g. ``[python, -m, mitm_wg]``),
    yielded the moment its banner is complete; killed by PID if still running afterwards."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), TMPDIR=str(tmpdir), NO_PROXY="", no_proxy="")
    port = _free_tcp_port()
    output = tmp_path / "demo.out"
    with output.open("wb") as out:
        proc = subprocess.Popen(
            [*mitm_wg, "demo", "--dump", "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
    try:
        partial = RunningDemo(proc, output, tmpdir, port, ("", 0), 0, Path(), Path())
        # The banner ends with this line, printed once mitmproxy has finished starting: the
        # tests send their first request the moment it appears.
        text = _wait_for(partial, demo.READY_LINE.format(port=port))
        front_ready = f"mitm-wg: ready, proxy at 127.0.0.1:{port}"  # the addon's line
        assert front_ready in text, text
        assert text.index(front_ready) < text.index(demo.READY_LINE.format(port=port)), text
        banner = _BANNER.search(text)
        conf = re.search(r"tunnel config:\s+(\S+)", text)
        log = re.search(r"exit peer's log:\s+(\S+)", text)
        assert banner and conf and log, text
        yield RunningDemo(
            proc,
            output,
            tmpdir,
            port,
            (banner.group(1), int(banner.group(2))),
            int(banner.group(3)),
            Path(conf.group(1)),
            Path(log.group(1)),
        )
    finally:
        if proc.poll() is None:  # a failed test: clean up by PID
            children = _children(proc.pid)
            proc.kill()
            proc.wait()
            for child in children:
                if _alive(child):
                    os.kill(child, signal.SIGKILL)


def _get(port: int, url: str) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{port}"})
    )
    with opener.open(url, timeout=30) as response:
        return response.status, response.read()


def _wait_gone(pids: set[int]) -> None:
    deadline = time.monotonic() + STOP_TIMEOUT
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if _alive(p)]}"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_demo_proxies_through_the_tunnel_and_stops_cleanly(
    running_demo: RunningDemo, origin: Origin, sig: int
) -> None:
    d = running_demo
    # First thing, the instant the banner is there: a request through the proxy succeeds
    # (with mitmproxy 12 one sent at "proxy listening" found no certificate store yet and
    # made mitmproxy exit).
    origin_port = origin.server_address[1]
    status, body = _get(d.port, f"http://127.0.0.1:{origin_port}/through/the/tunnel")
    assert (status, body) == (200, b"origin saw /through/the/tunnel")
    assert origin.seen == ["/through/the/tunnel"]

    children = _children(d.proc.pid)
    assert d.exit_pid in children and len(children) == 2, children  # exit peer + front
    assert d.tunnel_conf.parent.parent == d.tmpdir
    assert d.tunnel_conf.stat().st_mode & 0o777 == 0o600
    private_key = re.search(r"PrivateKey = (\S+)", d.tunnel_conf.read_text())
    assert private_key is not None

    # Our proxy says it used the tunnel, to the exit peer's endpoint ...
    exit_host, exit_port = d.exit_endpoint
    text = _wait_for(d, f"127.0.0.1:{origin_port} through tunnel 'demo' (peer ")
    assert f"…, {exit_host}:{exit_port})" in text
    # ... and the exit peer got the connection from the tunnel address and made it.
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while f"server connect 127.0.0.1:{origin_port}" not in d.exit_log.read_text():
        assert time.monotonic() < deadline, d.exit_log.read_text()
        time.sleep(0.05)
    exit_text = d.exit_log.read_text()
    assert "[10.0.0.1:" in exit_text
    assert "PrivateKey = (redacted)" in exit_text
    assert private_key.group(1) not in exit_text
    assert private_key.group(1) not in text

    d.proc.send_signal(sig)
    assert d.proc.wait(STOP_TIMEOUT) == 0, d.text()
    _wait_gone(children)
    assert list(d.tmpdir.iterdir()) == []
    text = d.text()
    assert "mitm-wg demo: stopped (status 0)" in text
    assert "Traceback" not in text


def test_demo_stops_when_the_exit_peer_dies(running_demo: RunningDemo) -> None:
    d = running_demo
    children = _children(d.proc.pid)
    assert len(children) == 2, children
    os.kill(d.exit_pid, signal.SIGKILL)
    assert d.proc.wait(STOP_TIMEOUT) == 1, d.text()
    _wait_gone(children)
    assert list(d.tmpdir.iterdir()) == []
    text = d.text()
    assert "the exit peer stopped" in text
    assert "Traceback" not in text
