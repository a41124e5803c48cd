"""mitm-wg's sans-IO TCP/IP stack: IPv4/IPv6, ICMP, UDP and TCP sockets over raw IP packets.

Entry point: :class:`Stack` (one host's IP layer).  Wire formats live in :mod:`.ipv4`,
:mod:`.ipv6`, :mod:`.icmp`, :mod:`.udp` and :mod:`.tcp_wire`; the TCP state machine in
:mod:`.tcp`.
"""

from __future__ import annotations

from mitm_wg.net.stack import Stack, StackStats, TcpListener, UdpSocket
from mitm_wg.net.tcp import TcpConfig, TcpSocket, TcpState

__all__ = [
    "Stack",
    "StackStats",
    "TcpConfig",
    "TcpListener",
    "TcpSocket",
    "TcpState",
    "UdpSocket",
]
