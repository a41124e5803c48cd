"""The Noise_IKpsk2 handshake as WireGuard uses it (whitepaper §5.4.2–§5.4.4).

Pure functions over small state objects: the caller (a :class:`~mitm_wg.wireguard.peer.Peer`)
owns the state, the receiver indexes and the timers.  mac1/mac2 are added and checked by
:mod:`mitm_wg.wireguard.cookie`; the functions here build and consume message *bodies*
(everything before mac1).

Naming follows the whitepaper: ``ck`` is the chaining key C, ``h`` the hash H, ``e`` the
ephemeral key, ``s`` a static key, ``psk`` the preshared key Q.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mitm_wg.wireguard import crypto
from mitm_wg.wireguard.messages import (
    INITIATION_BODY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    RESPONSE_BODY,
)

# Whitepaper §5.4: the protocol name and identifier start the chain; the labels key the macs
# and cookie replies (§5.4.4, §5.4.7).
CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

INITIAL_CHAIN_KEY = crypto.hash_(CONSTRUCTION)  # C_i := HASH(Construction) (§5.4.2)
INITIAL_HASH = crypto.hash_(INITIAL_CHAIN_KEY + IDENTIFIER)  # H_i := HASH(C_i || Identifier)
ZERO_PSK = bytes(32)  # Q = 0^32 without a preshared key (§5.2)


def _keyed_by_responder(public: bytes) -> tuple[bytes, bytes, bytes]:
    """What the responder's static public key fixes, for both sides of a handshake: the
    starting hash H := HASH(H_i || S_pub) (§5.4.2), the mac1 key HASH(LABEL_MAC1 || S_pub)
    (§5.4.4) and the cookie-reply key HASH(LABEL_COOKIE || S_pub) (§5.4.7)."""
    return (
        crypto.hash_(INITIAL_HASH + public),
        crypto.hash_(LABEL_MAC1 + public),
        crypto.hash_(LABEL_COOKIE + public),
    )


@dataclass(frozen=True, slots=True)
class Identity:
    """Our static key pair and the values derived from it once."""

    private: bytes = field(repr=False)
    public: bytes
    #: Key of mac1 on messages *sent to us*: HASH(LABEL_MAC1 || our public key).
    mac1_key: bytes = field(repr=False)
    #: Key that encrypts cookie replies *we send*: HASH(LABEL_COOKIE || our public key).
    cookie_key: bytes = field(repr=False)
    #: H after mixing in our public key: the responder's starting hash.
    initial_hash: bytes = field(repr=False)

    @classmethod
    def from_private(cls, private: bytes) -> Identity:
        public = crypto.dh_public(private)
        initial_hash, mac1_key, cookie_key = _keyed_by_responder(public)
        return cls(
            private=private,
            public=public,
            mac1_key=mac1_key,
            cookie_key=cookie_key,
            initial_hash=initial_hash,
        )


@dataclass(frozen=True, slots=True)
class RemoteKeys:
    """What we know of one peer's keys, with everything that can be precomputed."""

    public: bytes
    psk: bytes = field(repr=False)
    #: DH(our static private, their static public), fixed for the peer's lifetime.
    static_static: bytes = field(repr=False)
    #: H after mixing in their public key: the initiator's starting hash.
    initial_hash: bytes = field(repr=False)
    #: Key of mac1 on messages *we send to them*.
    mac1_key: bytes = field(repr=False)
    #: Key that decrypts cookie replies *they send us*.
    cookie_key: bytes = field(repr=False)

    @classmethod
    def create(cls, identity: Identity, public: bytes, psk: bytes | None) -> RemoteKeys:
        initial_hash, mac1_key, cookie_key = _keyed_by_responder(public)
        return cls(
            public=public,
            psk=psk if psk is not None else ZERO_PSK,
            static_static=crypto.dh(identity.private, public),
            initial_hash=initial_hash,
            mac1_key=mac1_key,
            cookie_key=cookie_key,
        )


@dataclass(slots=True)
class InitiatorState:
    """An initiation we sent and whose response we await."""

    local_index: int
    ephemeral_private: bytes = field(repr=False)
    ck: bytes = field(repr=False)
    h: bytes = field(repr=False)


@dataclass(slots=True)
class ReceivedInitiation:
    """A verified initiation: who sent it and the state to answer it with."""

    remote_static: bytes
    remote_index: int
    remote_ephemeral: bytes
    timestamp: bytes  # TAI64N, compared bytewise (big-endian) for replay protection
    ck: bytes = field(repr=False)
    h: bytes = field(repr=False)


@dataclass(slots=True)
class SessionKeys:
    """Transport keys from a completed handshake."""

    send: bytes = field(repr=False)
    recv: bytes = field(repr=False)
    local_index: int
    remote_index: int
    is_initiator: bool


def _mix_hash(h: bytes, data: bytes) -> bytes:
    return crypto.hash_(h + data)


def create_initiation(
    identity: Identity,
    remote: RemoteKeys,
    local_index: int,
    timestamp: bytes,
    randbytes: Callable[[int], bytes],
) -> tuple[InitiatorState, bytes]:
    """Build the body (without macs) of a handshake initiation (whitepaper §5.4.2, initiator's
    steps in order: e, es, s, ss, timestamp)."""
    e_priv, e_pub = crypto.dh_generate(randbytes)
    h = remote.initial_hash
    ck = crypto.kdf1(INITIAL_CHAIN_KEY, e_pub)
    h = _mix_hash(h, e_pub)
    ck, key = crypto.kdf2(ck, crypto.dh(e_priv, remote.public))
    enc_static = crypto.aead_seal(key, 0, identity.public, h)
    h = _mix_hash(h, enc_static)
    ck, key = crypto.kdf2(ck, remote.static_static)
    enc_timestamp = crypto.aead_seal(key, 0, timestamp, h)
    h = _mix_hash(h, enc_timestamp)
    body = INITIATION_BODY.pack(MESSAGE_INITIATION, local_index, e_pub, enc_static, enc_timestamp)
    return InitiatorState(local_index, e_priv, ck, h), body


def consume_initiation(identity: Identity, message: bytes) -> ReceivedInitiation | None:
    """Decrypt an initiation addressed to ``identity`` (mac1 already checked): the responder
    repeats the initiator's §5.4.2 steps with its own private key.

    Returns None when it does not decrypt.  The caller must still check that the sender's
    static key belongs to a known peer and that the timestamp is newer than the last one.
    """
    _, remote_index, e_pub, enc_static, enc_timestamp = INITIATION_BODY.unpack_from(message)
    h = identity.initial_hash
    ck = crypto.kdf1(INITIAL_CHAIN_KEY, e_pub)
    h = _mix_hash(h, e_pub)
    try:
        ck, key = crypto.kdf2(ck, crypto.dh(identity.private, e_pub))
    except ValueError:
        return None
    remote_static = crypto.aead_open(key, 0, enc_static, h)
    if remote_static is None:
        return None
    h = _mix_hash(h, enc_static)
    try:
        ck, key = crypto.kdf2(ck, crypto.dh(identity.private, remote_static))
    except ValueError:
        return None
    timestamp = crypto.aead_open(key, 0, enc_timestamp, h)
    if timestamp is None:
        return None
    h = _mix_hash(h, enc_timestamp)
    return ReceivedInitiation(remote_static, remote_index, e_pub, timestamp, ck, h)


def create_response(
    initiation: ReceivedInitiation,
    remote: RemoteKeys,
    local_index: int,
    randbytes: Callable[[int], bytes],
) -> tuple[SessionKeys, bytes]:
    """Answer a verified initiation: the response body (without macs, §5.4.3: e, ee, se, psk,
    empty) and the session keys (§5.4.5: the responder receives with the first KDF2 output)."""
    e_priv, e_pub = crypto.dh_generate(randbytes)
    ck = crypto.kdf1(initiation.ck, e_pub)
    h = _mix_hash(initiation.h, e_pub)
    ck = crypto.kdf1(ck, crypto.dh(e_priv, initiation.remote_ephemeral))
    ck = crypto.kdf1(ck, crypto.dh(e_priv, remote.public))
    ck, tau, key = crypto.kdf3(ck, remote.psk)
    h = _mix_hash(h, tau)
    enc_empty = crypto.aead_seal(key, 0, b"", h)
    body = RESPONSE_BODY.pack(
        MESSAGE_RESPONSE, local_index, initiation.remote_index, e_pub, enc_empty
    )
    recv, send = crypto.kdf2(ck, b"")
    return SessionKeys(send, recv, local_index, initiation.remote_index, False), body


def consume_response(
    identity: Identity, remote: RemoteKeys, state: InitiatorState, message: bytes
) -> SessionKeys | None:
    """Complete our handshake with a response (mac1 already checked; §5.4.3 from the
    initiator's side, keys per §5.4.5); None if it fails."""
    _, remote_index, _, e_pub, enc_empty = RESPONSE_BODY.unpack_from(message)
    ck = crypto.kdf1(state.ck, e_pub)
    h = _mix_hash(state.h, e_pub)
    try:
        ck = crypto.kdf1(ck, crypto.dh(state.ephemeral_private, e_pub))
        ck = crypto.kdf1(ck, crypto.dh(identity.private, e_pub))
    except ValueError:
        return None
    ck, tau, key = crypto.kdf3(ck, remote.psk)
    h = _mix_hash(h, tau)
    if crypto.aead_open(key, 0, enc_empty, h) is None:
        return None
    send, recv = crypto.kdf2(ck, b"")
    return SessionKeys(send, recv, state.local_index, remote_index, True)


__all__ = [
    "Identity",
    "InitiatorState",
    "ReceivedInitiation",
    "RemoteKeys",
    "SessionKeys",
    "consume_initiation",
    "consume_response",
    "create_initiation",
    "create_response",
]
