"""End to end in mitmweb: the web UI a user inspects flows in shows flows that went through
the tunnel, and the addon's options and command, over mitmweb's own REST API.

mitmweb serialises what mitmdump only prints: every flow's server connection (its peer and
local address as our transport reports them) and every option (ours included) go to the
browser as JSON, and a value JSON cannot carry breaks the UI for every flow. Layout as
tests/test_e2e_curl.py (wireguard-go exit, the echo origin on its tunnel addresses only,
curl in the client namespace); mitmweb runs there with the addon instead of mitmdump. With
mitmproxy 12 the API needs the password (``web_password``) as a bearer token; 11 has none.
"""

from __future__ import annotations

import importlib.util
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import (
    ORIGIN_NAME,
    VENV_BIN,
    Mitmdump,
    Origin,
    curl_via,
    run_mitmdump,
    tunnel_addresses,
    wait_for,
    write_client_config,
)

TUNNEL = "exit"
PASSWORD = "mitm-wg-test"


def _mitmweb_needs_a_password() -> bool:
    """Read from the source, not imported: importing the web app drags in its whole stack."""
    spec = importlib.util.find_spec("mitmproxy")  # (a subpackage's spec imports its parents)
    assert spec is not None and spec.origin is not None
    app = Path(spec.origin).parent / "tools" / "web" / "app.py"
    return "class AuthRequestHandler" in app.read_text()


def _free_port(ns: Any) -> int:
    sock = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
    finally:
        sock.close()


class Web:
    def __init__(self, ns: Any, port: int) -> None:
        self.ns, self.port = ns, port

    def get(self, path: str) -> Any:
        """GET ``path`` of mitmweb's API from inside the client namespace; the JSON."""
        headers = {"Authorization": f"Bearer {PASSWORD}"} if _mitmweb_needs_a_password() else {}
        sock = self.ns.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", self.port))
        try:  # HTTP/1.0 by hand over a socket made in the namespace
            head = f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            sock.sendall((head + "\r\n").encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        finally:
            sock.close()
        status_line, _, rest = data.partition(b"\r\n")
        assert b" 200 " in status_line, data[:500]
        return json.loads(rest.partition(b"\r\n\r\n")[2])


@pytest.fixture(scope="module")
def mitmweb(exit_peer: Any, workdir: Path, origin: Origin) -> Iterator[tuple[Mitmdump, Web]]:
    conf = write_client_config(exit_peer, workdir, TUNNEL)
    port = _free_port(exit_peer.client_ns)
    args = [
        "--set",
        f"wg_conf={TUNNEL}={conf}",
        "--set",
        f"ssl_verify_upstream_trusted_ca={origin.ca}",
        "--web-host",
        "127.0.0.1",
        "--web-port",
        str(port),
        "--set",
        "web_open_browser=false",
    ]
    if _mitmweb_needs_a_password():
        args += ["--set", f"web_password={PASSWORD}"]
    with run_mitmdump(
        exit_peer.client_ns, workdir, *args, name="mitmweb", mitmdump=VENV_BIN / "mitmweb"
    ) as web:
        web.wait_for_log(f"WireGuard tunnel {TUNNEL!r} is up")
        web.wait_for_log("Web server listening")
        yield web, Web(exit_peer.client_ns, port)


def test_flows_through_the_tunnel_show_in_the_web_ui(
    exit_peer: Any, mitmweb: tuple[Mitmdump, Web]
) -> None:
    proxy, web = mitmweb
    r = curl_via(exit_peer.client_ns, proxy, f"https://{ORIGIN_NAME}/echo/web-ui")
    assert r.status == 200, (r.status, r.stderr)
    assert r.json()["client"] in tunnel_addresses(exit_peer)

    def ours() -> list[dict[str, Any]]:
        return [f for f in web.get("/flows") if f["request"]["path"] == "/echo/web-ui"]

    wait_for(lambda: bool(ours()), 10, "the flow in mitmweb's /flows")
    (flow,) = ours()
    server = flow["server_conn"]
    # the addresses our transport reports: the origin and our end, inside the tunnel
    servers = {a for a in (exit_peer.server_tunnel_v4, exit_peer.server_tunnel_v6) if a}
    assert server["peername"][0] in servers and server["peername"][1] == 443, server
    assert server["sockname"][0] in tunnel_addresses(exit_peer), server
    assert server["tls_established"] is True
    assert flow["response"]["status_code"] == 200


def test_the_addons_options_show_in_the_web_ui(
    exit_peer: Any, workdir: Path, mitmweb: tuple[Mitmdump, Web]
) -> None:
    _proxy, web = mitmweb
    options = web.get("/options")
    assert options["wg_conf"]["value"] == [f"{TUNNEL}={workdir / 'exit.conf'}"], options["wg_conf"]
    assert "wg_allow_direct" in options
