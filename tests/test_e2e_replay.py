"""End to end: mitmproxy's client replay goes through the tunnel, or nowhere.

Replaying a captured request (``mitmdump -nC flows``, the console's and mitmweb's "replay")
is how a user re-sends what they captured, edited or not. mitmproxy's replay opens its
server connections with its own handler (``ReplayHandler``), not the proxy server's: the
replayed request must still leave through the WireGuard exit, and with the exit down it
must fail, never go out directly.

The origin listens on the exit namespace's veth address, which the client namespace also
reaches directly: the address it sees a request come from tells the two ways apart (the
tunnel: our tunnel address; directly: the client namespace's veth address). The config
routes everything into the tunnel (``AllowedIPs = 0.0.0.0/0, ::/0``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import (
    ADDON,
    MITMDUMP,
    Origin,
    curl,
    run_mitmdump,
    run_origin,
    write_client_config,
)

PORT = 8080
TUNNEL = "full"


@pytest.fixture
def direct_origin(fresh_exit_peer: Any, tmp_path: Path) -> Any:
    host = fresh_exit_peer.endpoint[0]
    with run_origin(fresh_exit_peer.ns, tmp_path, http=[f"{host}:{PORT}"], name="origin") as srv:
        yield srv


def _replay(peer: Any, workdir: Path, flows: Path, conf: Path, name: str) -> tuple[int, str]:
    """``mitmdump -n -C FLOWS`` with the addon (no proxy server: it replays, then exits)."""
    confdir = workdir / f"{name}-conf"
    confdir.mkdir()
    argv = [
        str(MITMDUMP), "-n", "-C", str(flows),
        "--set", f"confdir={confdir}", "-s", str(ADDON), "--set", f"wg_conf={TUNNEL}={conf}",
    ]  # fmt: skip
    env = dict(os.environ, NO_PROXY="", no_proxy="", HOME=str(workdir))
    env.pop("MITM_WG_TEST_DIALER", None)
    proc = peer.client_ns.popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=workdir, text=True
    )
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        peer.client_ns.kill(proc)
    return proc.returncode, out


def _clients(origin: Origin) -> list[tuple[str, str]]:
    return [(e["path"], e["client"]) for e in origin.requests()]


def test_a_replayed_request_leaves_through_the_exit_or_not_at_all(
    fresh_exit_peer: Any, direct_origin: Origin, tmp_path: Path
) -> None:
    peer = fresh_exit_peer
    host = peer.endpoint[0]
    tunnel_address, direct_address = peer.client_tunnel_v4, f"10.77.{peer.index}.1"
    conf = write_client_config(peer, tmp_path, TUNNEL, allowed_ips="0.0.0.0/0, ::/0")
    flows = tmp_path / "flows.mitm"

    # Capture a request through the proxy (it goes through the tunnel) ...
    with run_mitmdump(
        peer.client_ns, tmp_path, "--set", f"wg_conf={TUNNEL}={conf}", "-w", str(flows)
    ) as dump:
        got = curl(peer.client_ns, "-x", dump.proxy, f"http://{host}:{PORT}/echo-captured")
        assert got.status == 200, got
    assert _clients(direct_origin) == [("/echo-captured", tunnel_address)]
    assert flows.stat().st_size > 0

    # ... replay it: through the tunnel again.
    code, out = _replay(peer, tmp_path, flows, conf, "replay")
    assert code == 0, out
    assert "Traceback" not in out, out
    assert _clients(direct_origin) == [("/echo-captured", tunnel_address)] * 2, out

    # The exit is down: the replay fails, saying why, and nothing reaches the origin
    # (which the client namespace could reach directly).
    peer.stop_wireguard()
    code, out = _replay(peer, tmp_path, flows, conf, "replay-down")
    assert "did not answer the handshake" in out, out
    assert f"{host}:{peer.endpoint[1]}" in out, out
    assert _clients(direct_origin) == [("/echo-captured", tunnel_address)] * 2, out
    assert all(e["client"] != direct_address for e in direct_origin.entries("connect"))
