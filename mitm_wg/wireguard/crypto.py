"""WireGuard's cryptographic primitives (whitepaper §5.4), built on `cryptography` and hashlib.

- ``hash_``: BLAKE2s-256; ``mac``: keyed BLAKE2s with a 16-byte digest;
  ``hmac``: HMAC (RFC 2104) over BLAKE2s-256; ``kdf1``/``kdf2``/``kdf3``: the whitepaper's HKDF.
- ``dh``/``dh_generate``/``dh_public``: X25519 with raw 32-byte keys.
- ``Aead``: ChaCha20-Poly1305 with WireGuard's nonce (4 zero bytes || 64-bit LE counter);
  transport messages go through aioquic's keyed-once AEAD where it is installed and passes a
  known-answer check (:func:`fast_aead_available`), else through `cryptography`.
- ``xaead_seal``/``xaead_open``: XChaCha20-Poly1305 (cookie replies), via ``hchacha20``.
- ``tai64n``: the 12-byte timestamp carried in handshake initiations.

Nothing here logs, and no exception message contains key material.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from mitm_wg.keys import KEY_LEN, generate_private_key, public_key_of

__all__ = [
    "AEAD_TAG_LEN",
    "HASH_LEN",
    "KEY_LEN",
    "MAC_LEN",
    "TAI64N_LEN",
    "Aead",
    "aead_open",
    "aead_seal",
    "dh",
    "dh_generate",
    "dh_public",
    "hash_",
    "hchacha20",
    "hmac",
    "kdf1",
    "kdf2",
    "kdf3",
    "mac",
    "tai64n",
    "xaead_open",
    "xaead_seal",
]

HASH_LEN = 32
MAC_LEN = 16
AEAD_TAG_LEN = 16
TAI64N_LEN = 12

_BLOCK_LEN = 64  # BLAKE2s block size, used by HMAC
_blake2s = hashlib.blake2s
# HMAC pads as byte translation tables: key.translate(_IPAD) == bytes(b ^ 0x36 for b in key).
_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))
_ZERO_BLOCK = bytes(_BLOCK_LEN)

_NONCE = struct.Struct("<4xQ")  # WireGuard AEAD nonce: 32 zero bits || 64-bit little-endian counter
_TAI64N = struct.Struct(">QI")
# TAI64 label of Unix time 0: 2**62 + 10 (cr.yp.to/libtai/tai64.html counts TAI seconds from 1970
# TAI; TAI - UTC was 10 s when leap seconds began). wireguard-go (tai64n.go: base
# 0x400000000000000a), the Linux module and boringtun all add these 10 s and ignore later leap
# seconds. A peer compares initiation timestamps bytewise across every implementation that uses
# the same private key, so a different base makes ours look 10 s old: replays, silently dropped.
TAI64_UNIX_EPOCH = (1 << 62) + 10
_ZERO_KEY = bytes(KEY_LEN)

# ---------------------------------------------------------------------------------------------
# Hashes, MAC, HMAC, KDF


def hash_(data: bytes) -> bytes:
    """BLAKE2s-256 of ``data``."""
    return _blake2s(data).digest()


def mac(key: bytes, data: bytes) -> bytes:
    """Keyed BLAKE2s with a 16-byte digest (``key`` up to 32 bytes)."""
    return _blake2s(data, digest_size=MAC_LEN, key=key).digest()


def hmac(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s-256 (RFC 2104 with BLAKE2s-256 and a 64-byte block)."""
    if len(key) > _BLOCK_LEN:
        key = _blake2s(key).digest()
    key = key + _ZERO_BLOCK[len(key) :]
    inner = _blake2s(key.translate(_IPAD))
    inner.update(data)
    outer = _blake2s(key.translate(_OPAD))
    outer.update(inner.digest())
    return outer.digest()


def kdf1(key: bytes, data: bytes) -> bytes:
    """The whitepaper's KDF with one output (§5.4: HKDF, RFC 5869, over HMAC-BLAKE2s):
    HMAC(HMAC(key, data), 0x1)."""
    t0 = hmac(key, data)
    return hmac(t0, b"\x01")


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    """The whitepaper's KDF with two outputs."""
    t0 = hmac(key, data)
    t1 = hmac(t0, b"\x01")
    t2 = hmac(t0, t1 + b"\x02")
    return t1, t2


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    """The whitepaper's KDF with three outputs."""
    t0 = hmac(key, data)
    t1 = hmac(t0, b"\x01")
    t2 = hmac(t0, t1 + b"\x02")
    t3 = hmac(t0, t2 + b"\x03")
    return t1, t2, t3


# ---------------------------------------------------------------------------------------------
# X25519


def dh(private: bytes, public: bytes) -> bytes:
    """X25519(private, public) with raw 32-byte keys.

    Raises ValueError if the result is all zeros (a low-order public key) or a key is malformed.
    """
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(public)
        )
    except ValueError:
        # Never chain the original exception: keep key bytes out of any message.
        raise ValueError("X25519 failed (invalid key or low-order point)") from None
    if shared == _ZERO_KEY:  # RFC 7748 §6.1: reject the all-zero output
        raise ValueError("X25519 produced the all-zero shared secret")
    return shared


def dh_generate(randbytes: Callable[[int], bytes] = os.urandom) -> tuple[bytes, bytes]:
    """A fresh X25519 key pair ``(private, public)`` from ``randbytes``; the private key is
    clamped as ``wg genkey`` does (:func:`mitm_wg.keys.generate_private_key`)."""
    private = generate_private_key(randbytes)
    return private, public_key_of(private)


#: The X25519 public key of a raw 32-byte private key (ValueError for a malformed key).
dh_public = public_key_of


# ---------------------------------------------------------------------------------------------
# ChaCha20-Poly1305 with WireGuard's nonce


# The faster backend for transport messages. `cryptography` before 45 (the newest that
# mitmproxy 11 allows is 44) sets up a cipher context on every call: ~3 µs per message of
# any size, more than the ChaCha20-Poly1305 work of a full one, and paid for every packet
# each way. aioquic (a mitmproxy dependency) has OpenSSL's ChaCha20-Poly1305 keyed once in
# its C extension for QUIC packet protection: nonce = IV XOR the 64-bit big-endian packet
# number. With a zero IV and the counter's bytes reversed as the packet number, that is
# WireGuard's nonce (4 zero bytes || 64-bit little-endian counter). Its API is internal
# (``aioquic._crypto``), so it is used only after it gives, on this machine, exactly what
# `cryptography` gives (:func:`_known_answers`); anything else, and every message it does not
# take, goes through `cryptography`. ``MITM_WG_AEAD=cryptography`` switches it off.
#
# aioquic works in a buffer of 1500 bytes (its packet limit). It refuses a longer
# ciphertext, but aioquic 1.2 does not refuse a plaintext of 1485-1500 bytes, whose tag then
# runs past that buffer (and corrupts the object): never hand it more than this.
FAST_AEAD_MAX_PLAINTEXT = 1500 - AEAD_TAG_LEN
FAST_AEAD_MAX_CIPHERTEXT = 1500
_FAST_AEAD_NAME = b"chacha20-poly1305"
_ZERO_IV = bytes(12)
_COUNTER_LE = struct.Struct("<Q")
_PACKET_NUMBER_BE = struct.Struct(">Q")
#: A transport message's header (whitepaper §5.4.6): type and receiver index (8 bytes),
#: then the 64-bit little-endian counter, which read big-endian is aioquic's packet number.
_MESSAGE_COUNTER = 8
_MESSAGE_HEADER_LEN = 16


def _load_fast_aead() -> tuple[Callable[..., Any] | None, type[Exception]]:
    """aioquic's AEAD class and its error, or (None, an error never raised)."""
    if os.environ.get("MITM_WG_AEAD", "").strip().lower() == "cryptography":
        return None, _NeverRaised
    try:
        from aioquic._crypto import AEAD, CryptoError  # (optional: mitmproxy brings it)
    except Exception:  # not installed, or no such module in this version
        return None, _NeverRaised
    try:
        _known_answers(AEAD, CryptoError)
    except Exception:  # another API, or other answers: not used
        return None, _NeverRaised
    return AEAD, CryptoError


class _NeverRaised(Exception):
    pass


def _known_answers(make: Callable[..., Any], error: type[Exception]) -> None:
    """Raise unless ``make``'s AEAD seals and opens as `cryptography` does with WireGuard's
    nonce: counters from 0 to 2^64 - 1, plaintexts from empty to the largest it may take, a
    forged message refused (and the object sound after it)."""
    key = bytes(range(32))
    fast = make(_FAST_AEAD_NAME, key, _ZERO_IV)
    ref = ChaCha20Poly1305(key)
    plain = bytes(range(256)) * 6
    for counter in (0, 1, 0x0102030405060708, 2**64 - 1):
        for size in (0, 1, 15, 16, 64, 1420, FAST_AEAD_MAX_PLAINTEXT):
            pt = plain[:size]
            want = ref.encrypt(_NONCE.pack(counter), pt, None)
            # the packet number seal_message/open_message read: the counter's bytes in a
            # transport header (little-endian) read big-endian
            pn = _PACKET_NUMBER_BE.unpack(_COUNTER_LE.pack(counter))[0]
            if fast.encrypt(pt, b"", pn) != want or fast.decrypt(want, b"", pn) != pt:
                raise ValueError("different answers")
            forged = want[:-1] + bytes([want[-1] ^ 1])
            try:
                fast.decrypt(forged, b"", pn)
            except error:
                pass
            else:
                raise ValueError("a forged message was opened")


_FAST_AEAD, _FAST_AEAD_ERROR = _load_fast_aead()


def fast_aead_available() -> bool:
    """Whether transport messages use aioquic's AEAD here (see above)."""
    return _FAST_AEAD is not None


class Aead:
    """ChaCha20-Poly1305 (RFC 8439) keyed once; nonce = 4 zero bytes || 64-bit little-endian
    counter (whitepaper §5.4: AEAD). Transport messages (:meth:`seal_message`,
    :meth:`open_message`) go through aioquic's AEAD where :func:`fast_aead_available` and
    the message fits (:data:`FAST_AEAD_MAX_PLAINTEXT`: every one at the usual MTUs);
    :meth:`seal`/:meth:`open` (any AAD, any size: the handshake's, and what aioquic does
    not take) through `cryptography`. The same bytes either way."""

    __slots__ = ("_cipher", "_fast")

    def __init__(self, key: bytes, fast: bool = True) -> None:
        if len(key) != KEY_LEN:
            raise ValueError("AEAD key must be 32 bytes")
        self._cipher = ChaCha20Poly1305(key)
        self._fast: Any = None
        if fast and _FAST_AEAD is not None:
            self._fast = _FAST_AEAD(_FAST_AEAD_NAME, bytes(key), _ZERO_IV)

    def __repr__(self) -> str:
        return "<Aead>"

    def seal(self, counter: int, plaintext: bytes, aad: bytes = b"") -> bytes:
        """Encrypt and authenticate; returns ciphertext || 16-byte tag."""
        try:
            nonce = _NONCE.pack(counter)
        except struct.error:
            raise ValueError("AEAD counter out of range") from None
        # None instead of b"": the same ciphertext, but `cryptography` skips its AAD pass
        # (about 1 µs less per transport message).
        return self._cipher.encrypt(nonce, plaintext, aad or None)

    def open(self, counter: int, ciphertext: bytes | memoryview, aad: bytes = b"") -> bytes | None:
        """Decrypt ciphertext || tag; None if authentication fails."""
        try:
            nonce = _NONCE.pack(counter)
        except struct.error:
            raise ValueError("AEAD counter out of range") from None
        try:
            return self._cipher.decrypt(nonce, ciphertext, aad or None)
        except InvalidTag:
            return None

    def seal_message(self, header: bytes, plaintext: bytes) -> bytes:
        """A whole transport message: ``header`` (16 bytes, the counter little-endian in its
        last 8) followed by :meth:`seal` of ``plaintext`` under that counter. One call per
        packet, and aioquic's packet number read from the header's bytes."""
        fast = self._fast
        if (
            fast is not None
            and type(plaintext) is bytes
            and len(plaintext) <= FAST_AEAD_MAX_PLAINTEXT
        ):
            pn = _PACKET_NUMBER_BE.unpack_from(header, _MESSAGE_COUNTER)[0]
            return header + fast.encrypt(plaintext, b"", pn)
        return header + self.seal(_COUNTER_LE.unpack_from(header, _MESSAGE_COUNTER)[0], plaintext)

    def open_message(self, message: bytes | memoryview) -> bytes | None:
        """:meth:`open` of a whole transport message (16-byte header, the counter
        little-endian in its last 8, then ciphertext || tag; the caller has checked it
        holds at least the header); None if it does not authenticate."""
        fast = self._fast
        if fast is not None and len(message) - _MESSAGE_HEADER_LEN <= FAST_AEAD_MAX_CIPHERTEXT:
            pn = _PACKET_NUMBER_BE.unpack_from(message, _MESSAGE_COUNTER)[0]
            body = message[_MESSAGE_HEADER_LEN:]
            try:
                # (it takes bytes only: a view of a GRO run is copied here, once)
                return fast.decrypt(body if type(body) is bytes else bytes(body), b"", pn)
            except _FAST_AEAD_ERROR:
                return None
        counter = _COUNTER_LE.unpack_from(message, _MESSAGE_COUNTER)[0]
        return self.open(counter, message[_MESSAGE_HEADER_LEN:])


def aead_seal(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    """One-shot ``Aead(key).seal(counter, plaintext, aad)`` (the handshake's: always with AAD,
    so never the fast backend, which is not set up)."""
    return Aead(key, fast=False).seal(counter, plaintext, aad)


def aead_open(key: bytes, counter: int, ciphertext: bytes | memoryview, aad: bytes) -> bytes | None:
    """One-shot ``Aead(key).open(counter, ciphertext, aad)`` (see :func:`aead_seal`)."""
    return Aead(key, fast=False).open(counter, ciphertext, aad)


# ---------------------------------------------------------------------------------------------
# HChaCha20 and XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha-03)

_WORDS8 = struct.Struct("<8I")
_WORDS4 = struct.Struct("<4I")
_CHACHA_CONSTANTS = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)  # "expand 32-byte k"
_M32 = 0xFFFFFFFF


def _quarter_round(s: list[int], a: int, b: int, c: int, d: int) -> None:
    s[a] = (s[a] + s[b]) & _M32
    x = s[d] ^ s[a]
    s[d] = ((x << 16) | (x >> 16)) & _M32
    s[c] = (s[c] + s[d]) & _M32
    x = s[b] ^ s[c]
    s[b] = ((x << 12) | (x >> 20)) & _M32
    s[a] = (s[a] + s[b]) & _M32
    x = s[d] ^ s[a]
    s[d] = ((x << 8) | (x >> 24)) & _M32
    s[c] = (s[c] + s[d]) & _M32
    x = s[b] ^ s[c]
    s[b] = ((x << 7) | (x >> 25)) & _M32


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha §2.2): a 32-byte subkey from a 32-byte key and a
    16-byte nonce.

    The ChaCha20 state (constants, key, nonce) goes through the 20 rounds without the final
    addition; the output is state words 0..3 and 12..15, little-endian. Pure Python: it runs
    once per cookie reply, so clarity beats speed here.
    """
    if len(key) != KEY_LEN:
        raise ValueError("HChaCha20 key must be 32 bytes")
    if len(nonce16) != 16:
        raise ValueError("HChaCha20 nonce must be 16 bytes")
    s = [*_CHACHA_CONSTANTS, *_WORDS8.unpack(key), *_WORDS4.unpack(nonce16)]
    for _ in range(10):  # 10 double rounds = 20 rounds
        # column round
        _quarter_round(s, 0, 4, 8, 12)
        _quarter_round(s, 1, 5, 9, 13)
        _quarter_round(s, 2, 6, 10, 14)
        _quarter_round(s, 3, 7, 11, 15)
        # diagonal round
        _quarter_round(s, 0, 5, 10, 15)
        _quarter_round(s, 1, 6, 11, 12)
        _quarter_round(s, 2, 7, 8, 13)
        _quarter_round(s, 3, 4, 9, 14)
    return _WORDS8.pack(s[0], s[1], s[2], s[3], s[12], s[13], s[14], s[15])


def _xchacha(key: bytes, nonce24: bytes) -> tuple[ChaCha20Poly1305, bytes]:
    if len(nonce24) != 24:
        raise ValueError("XChaCha20-Poly1305 nonce must be 24 bytes")
    subkey = hchacha20(key, bytes(nonce24[:16]))
    return ChaCha20Poly1305(subkey), b"\x00\x00\x00\x00" + bytes(nonce24[16:24])


def xaead_seal(key: bytes, nonce24: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """XChaCha20-Poly1305 encryption; returns ciphertext || 16-byte tag."""
    cipher, nonce = _xchacha(key, nonce24)
    return cipher.encrypt(nonce, plaintext, aad)


def xaead_open(
    key: bytes, nonce24: bytes, ciphertext: bytes | memoryview, aad: bytes
) -> bytes | None:
    """XChaCha20-Poly1305 decryption; None if authentication fails."""
    cipher, nonce = _xchacha(key, nonce24)
    try:
        return cipher.decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        return None


# ---------------------------------------------------------------------------------------------
# TAI64N


def tai64n(unix_seconds: float) -> bytes:
    """12-byte TAI64N (the initiation's timestamp, whitepaper §5.4.2): (2**62 + 10 +
    seconds) as big-endian u64 || nanoseconds as big-endian u32.

    Exactly what wireguard-go, Linux and boringtun write: the seconds are Unix seconds plus the
    fixed 10 s TAI offset of the epoch (no later leap seconds).
    """
    secs = math.floor(unix_seconds)
    nanos = int((unix_seconds - secs) * 1_000_000_000)
    if nanos > 999_999_999:  # float rounding guard
        nanos = 999_999_999
    return _TAI64N.pack(TAI64_UNIX_EPOCH + secs, nanos)
