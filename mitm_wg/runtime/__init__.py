"""The trio runtime: sockets, timers and trio streams over the sans-IO cores."""

from mitm_wg.runtime.tunnel import (
    Tunnel,
    TunnelListener,
    TunnelStatus,
    TunnelStream,
    TunnelUdpSocket,
    open_tunnel,
)

__all__ = [
    "Tunnel",
    "TunnelListener",
    "TunnelStatus",
    "TunnelStream",
    "TunnelUdpSocket",
    "open_tunnel",
]
