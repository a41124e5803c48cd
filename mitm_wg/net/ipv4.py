"""IPv4 header parsing and building (RFC 791), plus the parse result shared with IPv6.

Fragments are dropped, not reassembled: every packet this stack sends has DF set and our TCP
advertises an MSS that fits the tunnel MTU (and lowers it on ICMP "fragmentation needed"), so
a well-behaved peer never fragments towards us.  A fragment (MF set or a non-zero offset) is
reported as :attr:`ParseError.FRAGMENT` for the caller to count.

Parsing never raises on hostile input: it returns a :class:`ParseError` value instead.
"""

from __future__ import annotations

import enum
import struct

from mitm_wg.net.checksum import fold, ones_sum

__all__ = [
    "DEFAULT_TTL",
    "PROTO_ICMP",
    "PROTO_ICMPV6",
    "PROTO_TCP",
    "PROTO_UDP",
    "IpPacket",
    "ParseError",
    "build_ipv4",
    "ipv4_header",
    "parse_ipv4",
    "parse_quoted_ipv4",
]

PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
#: RFC 1122 §3.2.1.7: a fixed default TTL; 64, the value Assigned Numbers (RFC 1700) gives.
DEFAULT_TTL = 64

# version/IHL, TOS, total length, identification, flags/fragment offset, TTL, protocol,
# header checksum, source, destination.
_HDR = struct.Struct("!BBHHHBBH4s4s")
_FLAG_DF = 0x4000
_FRAG_MASK = 0x3FFF  # MF flag plus the 13-bit fragment offset
_HDR_CONST_SUM = 0x4500 + _FLAG_DF  # version/IHL/TOS word plus the flags word (DF, offset 0)


class ParseError(enum.Enum):
    """Why an IP packet (or a payload inside one) was not accepted."""

    MALFORMED = "malformed"
    CHECKSUM = "checksum"
    FRAGMENT = "fragment"
    UNSUPPORTED = "unsupported"


class IpPacket:
    """A parsed IPv4 or IPv6 packet.

    ``src``/``dst`` are the raw 4- or 16-byte addresses, ``proto`` the upper-layer protocol
    (after IPv6 extension headers), ``payload`` a memoryview of the upper-layer bytes
    (trimmed to the length the header declares) and ``raw`` the whole packet (for quoting in
    ICMP errors).
    """

    __slots__ = ("dst", "hop_limit", "payload", "proto", "raw", "src", "version")

    def __init__(
        self,
        version: int,
        src: bytes,
        dst: bytes,
        proto: int,
        hop_limit: int,
        payload: memoryview,
        raw: memoryview,
    ) -> None:
        self.version = version
        self.src = src
        self.dst = dst
        self.proto = proto
        self.hop_limit = hop_limit
        self.payload = payload
        self.raw = raw

    def __repr__(self) -> str:
        return (
            f"IpPacket(v{self.version}, {self.src.hex()}->{self.dst.hex()}, "
            f"proto={self.proto}, len={len(self.payload)})"
        )


def parse_ipv4(buf: memoryview) -> IpPacket | ParseError:
    """Parse one IPv4 packet; ``buf`` may be longer than the total length (link padding)."""
    n = len(buf)
    if n < 20:
        return ParseError.MALFORMED
    vihl, tos, total, ident, frag, ttl, proto, csum, src, dst = _HDR.unpack_from(buf)
    if vihl >> 4 != 4:
        return ParseError.MALFORMED
    # RFC 791 §3.1: IHL counts 32-bit words, at least 5; Total Length includes the header.
    ihl = (vihl & 0x0F) << 2
    if ihl < 20 or total < ihl or total > n:
        return ParseError.MALFORMED
    # RFC 791 §3.1 header checksum (the header's 16-bit words, RFC 1071), from the unpacked
    # words (cheaper than re-reading the memoryview).
    hsum = ((vihl << 8) | tos) + total + ident + frag + ((ttl << 8) | proto) + csum
    hsum += int.from_bytes(src + dst, "big")
    if ihl > 20:
        hsum += ones_sum(bytes(buf[20:ihl]))
    if hsum % 0xFFFF:
        return ParseError.CHECKSUM
    if frag & _FRAG_MASK:  # MF or an offset (RFC 791 §3.2): dropped, see the module doc
        return ParseError.FRAGMENT
    return IpPacket(4, src, dst, proto, ttl, buf[ihl:total], buf[:total])


def ipv4_header(
    src: bytes, dst: bytes, proto: int, payload_len: int, ttl: int = DEFAULT_TTL
) -> bytes:
    """The 20-byte IPv4 header (no options, DF set, identification 0 per RFC 6864)."""
    total = 20 + payload_len
    if total > 0xFFFF:
        raise ValueError("IPv4 payload too long")
    csum = fold(_HDR_CONST_SUM + total + ((ttl << 8) | proto) + int.from_bytes(src + dst, "big"))
    return _HDR.pack(0x45, 0, total, 0, _FLAG_DF, ttl, proto, csum, src, dst)


def build_ipv4(
    src: bytes, dst: bytes, proto: int, payload: bytes | memoryview, ttl: int = DEFAULT_TTL
) -> bytes:
    """An IPv4 packet (see :func:`ipv4_header`) around ``payload``."""
    return ipv4_header(src, dst, proto, len(payload), ttl) + payload


def parse_quoted_ipv4(buf: memoryview) -> tuple[bytes, bytes, int, memoryview] | None:
    """The header quoted in an ICMP error: ``(src, dst, proto, transport_bytes)``.

    RFC 792 quotes the internet header and at least 64 bits of the data (RFC 1812
    §4.3.2.3: as much as fits in 576 bytes), so the quote is usually truncated, so the total length is not checked against the buffer;
    the header itself must be complete.  No checksum check (routers may have changed TTL).
    """
    if len(buf) < 20:
        return None
    vihl, _tos, _total, _ident, frag, _ttl, proto, _csum, src, dst = _HDR.unpack_from(buf)
    ihl = (vihl & 0x0F) << 2
    if vihl >> 4 != 4 or ihl < 20 or len(buf) < ihl:
        return None
    if frag & 0x1FFF:  # a non-first fragment carries no transport header
        return None
    return src, dst, proto, buf[ihl:]
