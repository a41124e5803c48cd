"""Sans-IO WireGuard: handshake, sessions, timers, cookies and cryptokey routing."""

from mitm_wg.config import Endpoint
from mitm_wg.wireguard.device import (
    Device,
    Event,
    HandshakeCompleted,
    HandshakeFailed,
    KeyInUseElsewhere,
    KeysZeroed,
    Transmit,
)
from mitm_wg.wireguard.peer import Peer, PeerStatus

__all__ = [
    "Device",
    "Endpoint",
    "Event",
    "HandshakeCompleted",
    "HandshakeFailed",
    "KeyInUseElsewhere",
    "KeysZeroed",
    "Peer",
    "PeerStatus",
    "Transmit",
]
