"""The edge over the real runtime: Bridge + ``open_tunnel`` + a wireguard-go exit peer.

HTTP through the tunnel as mitmproxy would do it (asyncio streams from
``Bridge.open_connection``), in both bridge modes. Uses the ``exit_peer`` fixture (network
namespaces; the test is marked interop and skipped without them unless CI=true).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
from collections.abc import Callable
from typing import Any

import pytest

from mitm_wg.config import WireGuardConfig
from mitm_wg.mitmproxy.bridge import Bridge, TunnelFactory


def tunnel_factory(config: WireGuardConfig, make_socket: Callable[[int], Any]) -> TunnelFactory:
    def factory() -> Any:
        from mitm_wg.runtime import open_tunnel

        return open_tunnel(config, socket_factory=make_socket, handshake_timeout=5.0)

    return factory


async def http_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> bytes:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: exit\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], head
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return await reader.readexactly(length)


@pytest.mark.parametrize("mode", ["guest", "thread"])
def test_http_through_the_real_tunnel(exit_peer: Any, mode: str) -> None:
    config = WireGuardConfig.parse(exit_peer.client_config_text(dns=False))

    def make_socket(family: int) -> socket.socket:
        return exit_peer.client_ns.socket(family, socket.SOCK_DGRAM)

    async def main() -> None:
        bridge = Bridge(mode)  # type: ignore[arg-type]
        await bridge.start()
        try:
            errors = await bridge.set_tunnels({"exit": tunnel_factory(config, make_socket)})
            assert errors == {"exit": None}
            host, port = exit_peer.server_tunnel_v4, exit_peer.http_port
            reader, writer = await bridge.open_connection("exit", host, port)
            assert writer.get_extra_info("peername") == (host, port)
            assert writer.get_extra_info("sockname")[0] == exit_peer.client_tunnel_v4
            peer = config.peers[0]
            assert writer.get_extra_info("wg_peer") == {
                "public_key": peer.public_key_b64,
                "endpoint": str(peer.endpoint),
            }
            size = 2 * 1024 * 1024
            body = await http_get(reader, writer, f"/bytes/{size}")
            assert len(body) == size
            expected = (bytes(range(256)) * (size // 256 + 1))[:size]
            assert hashlib.sha256(body).digest() == hashlib.sha256(expected).digest()
            writer.close()

            # Outside AllowedIPs: the runtime's routing error reaches asyncio as an OSError.
            with pytest.raises(OSError, match="AllowedIPs"):
                await bridge.open_connection("exit", "192.0.2.1", 80)
        finally:
            await bridge.aclose()

    asyncio.run(main())
