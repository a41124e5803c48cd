"""mitm-wg: mitmproxy upstream connections through a userspace WireGuard tunnel.

The public API; everything not listed in ``__all__`` may change. The trio runtime
(``open_tunnel``, ``Tunnel``, ``TunnelStream``, ``TunnelUdpSocket``) is imported on first
use, so the sans-IO cores and the config loader never pull in trio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mitm_wg.config import Endpoint, PeerConfig, WireGuardConfig
from mitm_wg.errors import ConfigError, HandshakeTimeout, MitmWgError

if TYPE_CHECKING:
    from mitm_wg.runtime import Tunnel, TunnelStream, TunnelUdpSocket, open_tunnel

__version__ = "0.1.0"

_RUNTIME = ("Tunnel", "TunnelStream", "TunnelUdpSocket", "open_tunnel")

__all__ = [
    "ConfigError",
    "Endpoint",
    "HandshakeTimeout",
    "MitmWgError",
    "PeerConfig",
    "Tunnel",
    "TunnelStream",
    "TunnelUdpSocket",
    "WireGuardConfig",
    "__version__",
    "open_tunnel",
]


def __getattr__(name: str) -> Any:
    if name in _RUNTIME:
        from mitm_wg import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'mitm_wg' has no attribute {name!r}")
