"""WireGuard keys: X25519 key generation, public-key derivation and the base64 text form.

A leaf module (imports nothing of ours): the config parser, the WireGuard core
(:mod:`mitm_wg.wireguard.crypto`), the CLI and the demo all use these, so clamping and
public-key derivation are written once. No message here contains key material.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

__all__ = ["KEY_LEN", "clamp", "decode_key", "encode_key", "generate_private_key", "public_key_of"]

#: Length of every WireGuard key (private, public, preshared) in bytes.
KEY_LEN = 32


def clamp(raw: bytes) -> bytes:
    """Clamp 32 random bytes into an X25519 private key (RFC 7748 §5 decodeScalar25519, as
    ``wg genkey`` stores it): clear the low three bits, clear bit 255, set bit 254."""
    return bytes((raw[0] & 248,)) + bytes(raw[1:31]) + bytes(((raw[31] & 127) | 64,))


def generate_private_key(randbytes: Callable[[int], bytes] = os.urandom) -> bytes:
    """Return a new X25519 private key (32 raw bytes, clamped as ``wg genkey`` does)."""
    raw = randbytes(KEY_LEN)
    if len(raw) != KEY_LEN:
        raise ValueError(f"randbytes returned {len(raw)} bytes, expected {KEY_LEN}")
    return clamp(raw)


def public_key_of(private: bytes) -> bytes:
    """Return the X25519 public key (32 raw bytes) belonging to a 32-byte private key."""
    if not isinstance(private, bytes | bytearray | memoryview) or len(private) != KEY_LEN:
        raise ValueError(f"a private key must be {KEY_LEN} bytes")
    return X25519PrivateKey.from_private_bytes(bytes(private)).public_key().public_bytes_raw()


def encode_key(raw: bytes) -> str:
    """Return the base64 text form of a 32-byte key, as ``wg`` prints it."""
    if not isinstance(raw, bytes | bytearray | memoryview) or len(raw) != KEY_LEN:
        raise ValueError(f"a key must be {KEY_LEN} bytes")
    return base64.b64encode(bytes(raw)).decode("ascii")


def decode_key(text: str) -> bytes:
    """Decode a base64 key into 32 raw bytes.

    Raises ValueError for text that is not base64 or does not encode exactly 32 bytes. The
    message never contains the text.
    """
    if not isinstance(text, str):
        raise TypeError("a key must be given as a str")
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
    if len(raw) != KEY_LEN:
        raise ValueError(
            f"wrong key length: decodes to {len(raw)} bytes, a key must be {KEY_LEN} bytes"
        )
    return raw
