"""Two of our tunnels talking to each other over loopback UDP (no root needed)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mitm_wg.config import WireGuardConfig, encode_key, generate_private_key, public_key_of
from mitm_wg.runtime import Tunnel, open_tunnel


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pair_configs(port_a: int, port_b: int) -> tuple[WireGuardConfig, WireGuardConfig]:
    ka, kb = generate_private_key(), generate_private_key()
    a = f"""[Interface]
PrivateKey = {encode_key(ka)}
Address = 10.33.0.1/32, fd33::1/128
ListenPort = {port_a}

[Peer]
PublicKey = {encode_key(public_key_of(kb))}
AllowedIPs = 10.33.0.2/32, fd33::2/128
Endpoint = 127.0.0.1:{port_b}
"""
    b = f"""[Interface]
PrivateKey = {encode_key(kb)}
Address = 10.33.0.2/32, fd33::2/128
ListenPort = {port_b}

[Peer]
PublicKey = {encode_key(public_key_of(ka))}
AllowedIPs = 10.33.0.1/32, fd33::1/128
Endpoint = 127.0.0.1:{port_a}
"""
    return WireGuardConfig.parse(a), WireGuardConfig.parse(b)


def loopback_factory(port: int):
    def factory(family: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", port))
        return sock

    return factory


@asynccontextmanager
async def tunnel_pair(**kw) -> AsyncIterator[tuple[Tunnel, Tunnel]]:
    pa, pb = free_udp_port(), free_udp_port()
    ca, cb = pair_configs(pa, pb)
    async with (
        open_tunnel(ca, socket_factory=loopback_factory(pa), **kw) as a,
        open_tunnel(cb, socket_factory=loopback_factory(pb), **kw) as b,
    ):
        yield a, b
