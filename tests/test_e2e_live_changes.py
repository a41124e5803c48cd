"""Live ``wg_conf`` changes in a real mitmdump: a script calls ``ctx.options.update`` (what
``:set`` and the options editor do) while a download runs through another tunnel.

mitmdump runs in exit A's client namespace; a second veth joins that namespace to exit B's
namespace, so both exits are reachable from the one process. The download is a small
Python client in the same namespace that reads the first MiB through the proxy, then holds
until told to go on: the connection is provably open while tunnel "b" is added, used and
removed, and must then deliver every remaining byte intact.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from e2e_helpers import curl, run_mitmdump
from runtime_helpers import pattern_sha256

from harness import ExitPeer, exit_peer

SIZE = 24 * 1024 * 1024

_CONTROL_SCRIPT = """
from mitmproxy import ctx, http

def request(flow):
    if flow.request.pretty_host == "control.test":
        ctx.options.update(wg_conf=flow.request.query.get_all("conf"))
        flow.response = http.Response.make(200, b"ok")
"""

_DOWNLOAD_CLIENT = """
import hashlib, socket, sys
port, url, size = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port))
s.settimeout(120)  # a deadlock guard
s.sendall(f"GET {url} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n".encode())
buf = b""
while b"\\r\\n\\r\\n" not in buf:
    buf += s.recv(65536)
head, _, body = buf.partition(b"\\r\\n\\r\\n")
assert b" 200 " in head.split(b"\\r\\n")[0], head
h = hashlib.sha256(body)
got = len(body)
while got < 1024 * 1024:
    chunk = s.recv(65536)
    assert chunk, got
    h.update(chunk)
    got += len(chunk)
print("started", flush=True)
sys.stdin.readline()  # hold the connection open, mid-transfer, until told to go on
while got < size:
    chunk = s.recv(1 << 18)
    assert chunk, f"connection closed after {got} bytes"
    h.update(chunk)
    got += len(chunk)
print(h.hexdigest(), got, flush=True)
"""


@pytest.fixture
def linked_exits(netns_available: None) -> Iterator[tuple[ExitPeer, ExitPeer, tuple[str, int]]]:
    """Two exits; B's wireguard-go reachable from A's client namespace at the returned
    endpoint (a veth 10.80.0.1 ↔ 10.80.0.2 between A.client_ns and B.ns)."""
    with ExitStack() as stack:
        a = stack.enter_context(exit_peer(name_prefix="mwgle"))
        b = stack.enter_context(exit_peer(name_prefix="mwgle"))
        left, right = f"mwgle{a.index}x{b.index}", f"mwgle{b.index}y{a.index}"
        a.client_ns.ip(
            "link", "add", left, "type", "veth", "peer", "name", right, "netns", b.ns.name
        )
        a.client_ns.ip("addr", "add", "10.80.0.1/30", "dev", left)
        b.ns.ip("addr", "add", "10.80.0.2/30", "dev", right)
        a.client_ns.ip("link", "set", left, "up")
        b.ns.ip("link", "set", right, "up")
        yield a, b, ("10.80.0.2", b.endpoint[1])


def test_set_wg_conf_in_mitmdump_keeps_a_running_download(
    linked_exits: tuple[ExitPeer, ExitPeer, tuple[str, int]], tmp_path: Path
) -> None:
    a, b, b_endpoint = linked_exits
    conf_a, conf_b = tmp_path / "a.conf", tmp_path / "b.conf"
    conf_a.write_text(a.client_config_text(dns=False))
    conf_b.write_text(b.client_config_text(dns=False, endpoint=b_endpoint))
    script = tmp_path / "control.py"
    script.write_text(_CONTROL_SCRIPT)
    ns = a.client_ns

    def set_confs(proxy: str, *confs: Path) -> None:
        query = "&".join(f"conf={name}={path}" for name, path in zip("ab", confs, strict=False))
        r = curl(ns, "-x", proxy, f"http://control.test/?{query}")
        assert r.status == 200 and r.body == b"ok", r

    # stream_large_bodies: mitmproxy passes the body on as it arrives (by default it would
    # read the whole response from the tunnel before the client sees a byte).
    args = ["-s", str(script), "--set", f"wg_conf=a={conf_a}", "--set", "stream_large_bodies=1k"]
    with run_mitmdump(ns, tmp_path, *args) as dump:
        dump.wait_for_log("WireGuard tunnel 'a' is up")
        client = ns.popen(
            [sys.executable, "-c", _DOWNLOAD_CLIENT, str(dump.port),
             f"http://{a.server_tunnel_v4}:{a.http_port}/bytes/{SIZE}", str(SIZE)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline().strip() == "started"

        set_confs(dump.proxy, conf_a, conf_b)  # add "b"
        dump.wait_for_log("WireGuard tunnel 'b' is up")
        r = curl(ns, "-x", dump.proxy, f"http://{b.server_tunnel_v4}:{b.http_port}/bytes/300000")
        assert r.status == 200 and len(r.body) == 300000, r
        assert r.body == bytes(i % 256 for i in range(300000))

        set_confs(dump.proxy, conf_a)  # remove "b"
        dump.wait_for_log("WireGuard tunnel 'b' removed: closing it")
        r = curl(ns, "-x", dump.proxy, f"http://{b.server_tunnel_v4}:{b.http_port}/x")
        assert r.status == 502, r  # b's addresses now fail closed (outside every AllowedIPs)

        assert client.poll() is None  # still mid-transfer
        client.stdin.write("go\n")
        client.stdin.flush()
        line = client.stdout.readline()
        assert line, "the download through tunnel 'a' broke during the changes"
        digest, got = line.split()
        assert client.wait(timeout=120) == 0
        assert int(got) == SIZE and digest == pattern_sha256(SIZE)
        text = dump.text()
        assert text.count("WireGuard tunnel 'a' is up") == 1, text
        assert "tunnel 'a' removed" not in text and "'a' reconfigured" not in text
