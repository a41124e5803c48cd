"""UDP flows through the tunnel: the bridge's datagram streams, and mitmdump's DNS reverse mode
answered by dnsmasq behind a real wireguard-go peer."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dns.message
import dns.rdatatype
import pytest

from mitm_wg.config import WireGuardConfig
from mitm_wg.mitmproxy.bridge import Bridge
from tests.test_edge_interop import tunnel_factory

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mode", ["guest", "thread"])
def test_dns_over_udp_through_the_bridge(exit_peer: Any, mode: str) -> None:
    config = WireGuardConfig.parse(exit_peer.client_config_text(dns=False))

    def make_socket(family: int) -> socket.socket:
        return exit_peer.client_ns.socket(family, socket.SOCK_DGRAM)

    async def main() -> None:
        bridge = Bridge(mode)  # type: ignore[arg-type]
        await bridge.start()
        try:
            assert await bridge.set_tunnels({"exit": tunnel_factory(config, make_socket)}) == {
                "exit": None
            }
            before = len(exit_peer.queries())
            stream = await bridge.open_datagram("exit", exit_peer.dns_server, 53)
            assert stream.get_extra_info("transport_protocol") == "udp"
            assert stream.get_extra_info("peername") == (exit_peer.dns_server, 53)
            assert stream.get_extra_info("sockname")[0] == exit_peer.client_tunnel_v4
            for name in ("exit.test", "exit.test"):  # two datagrams on one flow
                query = dns.message.make_query(name, dns.rdatatype.A)
                stream.write(query.to_wire())
                await stream.drain()
                reply = dns.message.from_wire(await asyncio.wait_for(stream.read(65535), 10))
                assert reply.id == query.id
                assert exit_peer.server_tunnel_v4 in reply.to_text()
            stream.close()
            await asyncio.wait_for(stream.wait_closed(), 5)
            assert exit_peer.queries()[before:].count("exit.test") == 2
            with pytest.raises(OSError, match="AllowedIPs"):
                await bridge.open_datagram("exit", "192.0.2.1", 53)
        finally:
            await bridge.aclose()

    asyncio.run(main())


def test_mitmdump_dns_reverse_mode_through_tunnel(exit_peer: Any, tmp_path: Path) -> None:
    conf = tmp_path / "wg0.conf"
    conf.write_text(exit_peer.client_config_text(dns=False))
    conf.chmod(0o600)
    port = exit_peer.client_ns.free_udp_port()
    log = tmp_path / "mitmdump.log"
    with log.open("wb") as out:
        proc = exit_peer.client_ns.popen(
            [
                sys.executable,
                "-c",
                "from mitmproxy.tools.main import mitmdump; mitmdump()",
                "--mode",
                f"reverse:dns://{exit_peer.dns_server}:53@127.0.0.1:{port}",
                "-s",
                str(REPO / "addons" / "mitm_wg.py"),
                "--set",
                f"wg_conf={conf}",
                "--set",
                f"confdir={tmp_path / 'confdir'}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    try:
        deadline = time.monotonic() + 30
        while "mitm-wg: ready" not in log.read_text():  # mitmproxy has finished starting
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        client = exit_peer.client_ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.settimeout(1.0)
        query = dns.message.make_query("exit.test", dns.rdatatype.A)
        reply = None
        deadline = time.monotonic() + 20
        while reply is None and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            client.sendto(query.to_wire(), ("127.0.0.1", port))
            try:
                data, _ = client.recvfrom(65535)
            except TimeoutError:
                continue
            reply = dns.message.from_wire(data)
        client.close()
        assert reply is not None, log.read_text()
        assert exit_peer.server_tunnel_v4 in reply.to_text()
        text = log.read_text()
        assert "through tunnel" in text and "DIRECT" not in text
        # The runtime's handshake log line reaches mitmproxy's log (never a key).
        assert "WireGuard handshake completed with peer" in text
        assert exit_peer.client_config_text().split("PrivateKey = ")[1].split()[0] not in text
    finally:
        exit_peer.client_ns.kill(proc)
