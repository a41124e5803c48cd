"""mitm-wg: mitmproxy upstream connections through a userspace WireGuard tunnel.

The public API; everything not listed in ``__all__`` may change.
"""

from mitm_wg.config import Endpoint, PeerConfig, WireGuardConfig
from mitm_wg.errors import ConfigError, HandshakeTimeout, MitmWgError

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Endpoint",
    "HandshakeTimeout",
    "MitmWgError",
    "PeerConfig",
    "WireGuardConfig",
    "__version__",
]
