"""A keypair: the transport keys of one completed handshake (whitepaper §5.4.6)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mitm_wg.wireguard.crypto import Aead
from mitm_wg.wireguard.replay import ReplayWindow

if TYPE_CHECKING:
    from mitm_wg.wireguard.handshake import SessionKeys
    from mitm_wg.wireguard.peer import Peer


class Keypair:
    """Sending and receiving state of one session.

    ``send_counter`` is the next nonce to use; ``replay`` guards the receiving direction.
    The raw keys live only inside the two :class:`Aead` objects.
    """

    __slots__ = (
        "created",
        "is_initiator",
        "local_index",
        "peer",
        "recv",
        "remote_index",
        "replay",
        "send",
        "send_counter",
    )

    def __init__(self, keys: SessionKeys, peer: Peer, now: float) -> None:
        self.send = Aead(keys.send)
        self.recv = Aead(keys.recv)
        self.send_counter = 0
        self.replay = ReplayWindow()
        self.local_index = keys.local_index
        self.remote_index = keys.remote_index
        self.is_initiator = keys.is_initiator
        self.created = now
        self.peer = peer

    def __repr__(self) -> str:
        role = "initiator" if self.is_initiator else "responder"
        return (
            f"<Keypair {role} local={self.local_index:#010x} remote={self.remote_index:#010x} "
            f"sent={self.send_counter}>"
        )
