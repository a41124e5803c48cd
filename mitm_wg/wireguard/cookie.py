"""mac1/mac2 and cookie replies: WireGuard's DoS mitigation (whitepaper §5.3, §5.4.7).

- :class:`CookieJar` is the sending side for one peer: it appends mac1 (and mac2 while it
  holds a cookie younger than COOKIE_REFRESH_TIME) and consumes that peer's cookie replies.
- :class:`CookieChecker` is the receiving side for the device: it checks mac1 on every
  handshake message, mac2 when under load, and builds cookie replies.
"""

from __future__ import annotations

import hmac as _hmac
import ipaddress
from collections.abc import Callable
from typing import TYPE_CHECKING

from mitm_wg.wireguard import crypto
from mitm_wg.wireguard.messages import COOKIE_REPLY, MESSAGE_COOKIE_REPLY
from mitm_wg.wireguard.timers import COOKIE_REFRESH_TIME

if TYPE_CHECKING:
    from mitm_wg.config import Endpoint

_ZERO_MAC = bytes(16)


def endpoint_bytes(endpoint: Endpoint) -> bytes:
    """The source address a cookie is bound to: IP bytes followed by the port."""
    host, port = endpoint
    return ipaddress.ip_address(host).packed + port.to_bytes(2, "big")


class CookieJar:
    """Per-peer state for the macs on handshake messages we send to that peer."""

    __slots__ = ("_cookie", "_cookie_time", "_last_mac1", "_mac1_key", "_reply_key")

    def __init__(self, mac1_key: bytes, reply_key: bytes) -> None:
        self._mac1_key = mac1_key
        self._reply_key = reply_key
        self._cookie: bytes | None = None
        self._cookie_time = 0.0
        self._last_mac1: bytes | None = None

    def __repr__(self) -> str:
        return f"<CookieJar has_cookie={self._cookie is not None}>"

    def seal(self, body: bytes, now: float) -> bytes:
        """``body`` followed by mac1 and mac2 (§5.4.4: mac2 is zeros unless we hold a cookie
        younger than COOKIE_REFRESH_TIME)."""
        mac1 = crypto.mac(self._mac1_key, body)
        self._last_mac1 = mac1
        signed = body + mac1
        if self._cookie is not None and now - self._cookie_time < COOKIE_REFRESH_TIME:
            return signed + crypto.mac(self._cookie, signed)
        return signed + _ZERO_MAC

    def consume_reply(self, message: bytes, now: float) -> bool:
        """Take the cookie from a cookie reply (§5.4.7: XAEAD under HASH(LABEL_COOKIE || their
        public key), the mac1 we sent as additional data); False if it does not decrypt."""
        if self._last_mac1 is None:
            return False
        _, _, nonce, encrypted = COOKIE_REPLY.unpack_from(message)
        cookie = crypto.xaead_open(self._reply_key, nonce, encrypted, self._last_mac1)
        if cookie is None:
            return False
        self._cookie = cookie
        self._cookie_time = now
        # A cookie answers exactly one message: a second reply for the same mac1 is stale.
        self._last_mac1 = None
        return True


class CookieChecker:
    """Device-wide checks of incoming handshake messages' macs, and cookie replies."""

    __slots__ = ("_cookie_key", "_mac1_key", "_randbytes", "_secret", "_secret_time")

    def __init__(
        self, mac1_key: bytes, cookie_key: bytes, randbytes: Callable[[int], bytes]
    ) -> None:
        self._mac1_key = mac1_key
        self._cookie_key = cookie_key
        self._randbytes = randbytes
        self._secret = b""
        self._secret_time = float("-inf")

    def __repr__(self) -> str:
        return "<CookieChecker>"

    def mac1_valid(self, message: bytes, mac1_offset: int) -> bool:
        """mac1 = MAC(HASH(LABEL_MAC1 || our public key), message up to mac1) (§5.4.4)."""
        expected = crypto.mac(self._mac1_key, message[:mac1_offset])
        return _hmac.compare_digest(expected, message[mac1_offset : mac1_offset + 16])

    def _cookie_for(self, source: Endpoint, now: float) -> bytes:
        # §5.4.7: cookie = MAC(R_m, source IP || port), the secret R_m renewed every
        # COOKIE_REFRESH_TIME (2 minutes).
        if now - self._secret_time >= COOKIE_REFRESH_TIME:
            self._secret = self._randbytes(32)
            self._secret_time = now
        return crypto.mac(self._secret, endpoint_bytes(source))

    def mac2_valid(self, message: bytes, mac1_offset: int, source: Endpoint, now: float) -> bool:
        """True if mac2 proves the sender holds a current cookie for ``source`` (§5.3: checked
        only under load; mac2 = MAC(cookie, message up to mac2), §5.4.4)."""
        mac2_offset = mac1_offset + 16
        mac2 = message[mac2_offset : mac2_offset + 16]
        if mac2 == _ZERO_MAC or now - self._secret_time >= COOKIE_REFRESH_TIME:
            return False
        expected = crypto.mac(self._cookie_for(source, now), message[:mac2_offset])
        return _hmac.compare_digest(expected, mac2)

    def make_reply(
        self, message: bytes, mac1_offset: int, sender_index: int, source: Endpoint, now: float
    ) -> bytes:
        """A cookie reply to ``message`` (whose mac1 was valid) from ``source`` (§5.4.7: a
        random 24-byte nonce, the sender's mac1 as additional data)."""
        cookie = self._cookie_for(source, now)
        nonce = self._randbytes(24)
        mac1 = message[mac1_offset : mac1_offset + 16]
        encrypted = crypto.xaead_seal(self._cookie_key, nonce, cookie, mac1)
        return COOKIE_REPLY.pack(MESSAGE_COOKIE_REPLY, sender_index, nonce, encrypted)
