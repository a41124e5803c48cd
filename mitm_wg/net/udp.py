"""UDP header parsing and building (RFC 768; IPv6 rules from RFC 8200 §8.1).

Over IPv4 a zero checksum means "none" and is accepted; over IPv6 a checksum is mandatory,
so a zero one is rejected.  We always send a checksum (a computed zero goes out as 0xFFFF).
"""

from __future__ import annotations

import struct

from mitm_wg.net.checksum import fold, ones_sum, pseudo_header_sum
from mitm_wg.net.ipv4 import PROTO_UDP, ParseError

__all__ = ["UdpDatagram", "build_udp", "parse_udp"]

_HDR = struct.Struct("!HHHH")


class UdpDatagram:
    __slots__ = ("dst_port", "payload", "src_port")

    def __init__(self, src_port: int, dst_port: int, payload: memoryview) -> None:
        self.src_port = src_port
        self.dst_port = dst_port
        self.payload = payload

    def __repr__(self) -> str:
        return f"UdpDatagram({self.src_port}->{self.dst_port}, len={len(self.payload)})"


def parse_udp(buf: memoryview, src: bytes, dst: bytes) -> UdpDatagram | ParseError:
    """Parse and checksum-verify a UDP datagram that arrived from ``src`` to ``dst``."""
    n = len(buf)
    if n < 8:
        return ParseError.MALFORMED
    sport, dport, length, csum = _HDR.unpack_from(buf)
    # RFC 768: Length counts the header and the data, so at least 8; bytes past it are not
    # part of the datagram.
    if length < 8 or length > n:
        return ParseError.MALFORMED
    if length != n:
        buf = buf[:length]
    if csum == 0:
        # RFC 768: zero means "no checksum" (IPv4); RFC 8200 §8.1: IPv6 discards it.
        if len(src) != 4:
            return ParseError.CHECKSUM
    elif (ones_sum(buf) + pseudo_header_sum(src, dst, PROTO_UDP, length)) % 0xFFFF:
        return ParseError.CHECKSUM
    return UdpDatagram(sport, dport, buf[8:])


def build_udp(
    src: bytes, dst: bytes, src_port: int, dst_port: int, payload: bytes | memoryview
) -> bytes:
    """A UDP datagram with its checksum filled in (to be wrapped in IP protocol 17)."""
    length = 8 + len(payload)
    if length > 0xFFFF:
        raise ValueError("UDP payload too long")
    csum = fold(
        ones_sum(payload)
        + src_port
        + dst_port
        + length
        + pseudo_header_sum(src, dst, PROTO_UDP, length)
    )
    return _HDR.pack(src_port, dst_port, length, csum) + payload
