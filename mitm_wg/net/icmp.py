"""ICMPv4 (RFC 792) and ICMPv6 (RFC 4443) messages: the subset an end host needs.

Parsing verifies the checksum (ICMPv6's covers a pseudo-header).  Builders fill it in.
Error messages quote as much of the offending packet as fits in the minimum MTU (576 bytes
for IPv4 per RFC 1812, 1280 for IPv6).  :class:`RateLimiter` is a token bucket used to
rate-limit the errors we generate (RFC 1812 §4.3.2.8, RFC 4443 §2.4(f)).
"""

from __future__ import annotations

import struct

from mitm_wg.net.checksum import checksum, ones_sum, pseudo_header_sum
from mitm_wg.net.ipv4 import PROTO_ICMPV6, ParseError

__all__ = [
    "IcmpMessage",
    "RateLimiter",
    "build_icmp4",
    "build_icmp6",
    "parse_icmp4",
    "parse_icmp6",
]

# ICMPv4 types and codes (RFC 792)
ICMP4_ECHO_REPLY = 0
ICMP4_DEST_UNREACH = 3
ICMP4_ECHO_REQUEST = 8
UNREACH4_PROTOCOL = 2
UNREACH4_PORT = 3
UNREACH4_FRAG_NEEDED = 4

# ICMPv6 types and codes (RFC 4443 §2.1, §3.1)
ICMP6_DEST_UNREACH = 1
ICMP6_PACKET_TOO_BIG = 2
ICMP6_PARAM_PROBLEM = 4
ICMP6_ECHO_REQUEST = 128
ICMP6_ECHO_REPLY = 129
UNREACH6_ADDRESS = 3
UNREACH6_PORT = 4

#: Bytes of the offending packet an error may quote (min MTU - IP header - ICMP header):
#: RFC 1812 §4.3.2.3 (576 for IPv4), RFC 4443 §2.4(c) (1280 for IPv6).
QUOTE4_MAX = 576 - 20 - 8
QUOTE6_MAX = 1280 - 40 - 8

_HDR = struct.Struct("!BBHI")  # type, code, checksum, rest-of-header (id/seq, MTU, unused)


class IcmpMessage:
    """A parsed ICMP message; ``rest`` is the 32-bit rest-of-header word."""

    __slots__ = ("body", "code", "rest", "type")

    def __init__(self, type_: int, code: int, rest: int, body: memoryview) -> None:
        self.type = type_
        self.code = code
        self.rest = rest
        self.body = body

    def __repr__(self) -> str:
        return f"IcmpMessage(type={self.type}, code={self.code}, len={len(self.body)})"


def parse_icmp4(buf: memoryview) -> IcmpMessage | ParseError:
    """Parse an ICMPv4 message; its checksum covers the message alone (RFC 792)."""
    if len(buf) < 8:
        return ParseError.MALFORMED
    if ones_sum(buf) % 0xFFFF:
        return ParseError.CHECKSUM
    type_, code, _csum, rest = _HDR.unpack_from(buf)
    return IcmpMessage(type_, code, rest, buf[8:])


def parse_icmp6(buf: memoryview, src: bytes, dst: bytes) -> IcmpMessage | ParseError:
    """Parse an ICMPv6 message; its checksum covers the IPv6 pseudo-header too (RFC 4443
    §2.3, RFC 8200 §8.1)."""
    n = len(buf)
    if n < 8:
        return ParseError.MALFORMED
    if (ones_sum(buf) + pseudo_header_sum(src, dst, PROTO_ICMPV6, n)) % 0xFFFF:
        return ParseError.CHECKSUM
    type_, code, _csum, rest = _HDR.unpack_from(buf)
    return IcmpMessage(type_, code, rest, buf[8:])


def build_icmp4(type_: int, code: int, rest: int, body: bytes | memoryview) -> bytes:
    """An ICMPv4 message (to be wrapped in IPv4 with protocol 1)."""
    msg = bytearray(_HDR.pack(type_, code, 0, rest))
    msg += body
    struct.pack_into("!H", msg, 2, checksum(msg))
    return bytes(msg)


def build_icmp6(
    src: bytes, dst: bytes, type_: int, code: int, rest: int, body: bytes | memoryview
) -> bytes:
    """An ICMPv6 message from ``src`` to ``dst`` (to be wrapped in IPv6, next header 58)."""
    msg = bytearray(_HDR.pack(type_, code, 0, rest))
    msg += body
    struct.pack_into(
        "!H", msg, 2, checksum(msg, pseudo_header_sum(src, dst, PROTO_ICMPV6, len(msg)))
    )
    return bytes(msg)


class RateLimiter:
    """Token bucket: ``rate`` tokens per second, at most ``burst`` banked (the limiter RFC
    4443 §2.4(f) suggests for ICMPv6 errors; RFC 1812 §4.3.2.8 for ICMPv4)."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float = 0.0) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = now

    def allow(self, now: float) -> bool:
        """Take a token if there is one (the clock may not go backwards in a useful way)."""
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
