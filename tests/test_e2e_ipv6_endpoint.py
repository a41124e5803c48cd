"""End to end over an IPv6 WireGuard endpoint: curl → mitmdump + addon → our WireGuard over
UDP/IPv6 (``Endpoint = [fd00:77:N::2]:51820``) → wireguard-go → the origin.

Same layout as tests/test_e2e_curl.py (mitmdump and curl in the exit's client namespace; the
origin only on the exit's tunnel addresses), but the config names the exit by its IPv6
veth address, so every WireGuard datagram travels over IPv6.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from e2e_helpers import curl, exit_origin, run_mitmdump, write_client_config


def test_curl_through_an_ipv6_endpoint(exit_peer: Any, tmp_path: Path) -> None:
    assert exit_peer.endpoint_v6 is not None
    conf = write_client_config(exit_peer, tmp_path, "v6", endpoint=exit_peer.endpoint_v6)
    assert f"Endpoint = [{exit_peer.endpoint_v6[0]}]:{exit_peer.endpoint_v6[1]}" in conf.read_text()
    with (
        exit_origin(exit_peer, tmp_path) as _origin,
        run_mitmdump(exit_peer.client_ns, tmp_path, "--set", f"wg_conf=v6={conf}") as dump,
    ):
        dump.wait_for_log("WireGuard tunnel 'v6' is up")
        for host, client in (
            (exit_peer.server_tunnel_v4, exit_peer.client_tunnel_v4),
            (f"[{exit_peer.server_tunnel_v6}]", exit_peer.client_tunnel_v6),
        ):
            r = curl(exit_peer.client_ns, "-x", dump.proxy, f"http://{host}/echo-v6-endpoint")
            assert r.returncode == 0, r.stderr
            assert r.status == 200, (r.status, r.body[:300])
            assert r.json()["client"] == client
        dump.wait_for_log(f"[{exit_peer.endpoint_v6[0]}]:{exit_peer.endpoint_v6[1]}")
    stats = exit_peer.client_stats()
    assert stats.endpoint is not None
    assert stats.endpoint[0] == f"fd00:77:{exit_peer.index}::1"  # our UDP came over IPv6
