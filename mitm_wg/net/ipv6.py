"""IPv6 header parsing and building (RFC 8200).

Extension headers are walked: hop-by-hop options (only directly after the fixed header),
routing (accepted only with Segments Left = 0, since we are an end host and never forward),
destination options, and fragment headers.  Options inside hop-by-hop and destination
options headers are checked: an unknown option whose two high type bits say "discard" makes
the packet :attr:`ParseError.UNSUPPORTED` (we do not send the parameter-problem message).

Fragments are dropped (see :mod:`mitm_wg.net.ipv4` for why) except atomic fragments (offset
0, M clear, RFC 6946), which are processed as whole packets.  AH/ESP are not supported.
There is no header checksum in IPv6; the upper layers' pseudo-header checksums cover the
addresses.
"""

from __future__ import annotations

import struct

from mitm_wg.net.ipv4 import DEFAULT_TTL, IpPacket, ParseError

__all__ = ["build_ipv6", "ipv6_header", "parse_ipv6", "parse_quoted_ipv6"]

# version/traffic class/flow label, payload length, next header, hop limit, src, dst
_HDR = struct.Struct("!IHBB16s16s")
_VERSION_WORD = 6 << 28

NH_HOP_BY_HOP = 0
NH_ROUTING = 43
NH_FRAGMENT = 44
NH_DEST_OPTS = 60
_MAX_EXT_HEADERS = 8


def _options_ok(buf: memoryview, start: int, end: int) -> bool:
    """Check the TLV options of a hop-by-hop/destination options header (RFC 8200 §4.2)."""
    i = start
    while i < end:
        opt = buf[i]
        if opt == 0:  # Pad1
            i += 1
            continue
        if i + 2 > end:
            return False
        olen = buf[i + 1]
        if opt != 1 and opt >> 6:  # unknown, and the action is "discard"
            return False
        i += 2 + olen
    return i == end


def _walk(
    buf: memoryview, nh: int, off: int, end: int, strict: bool
) -> tuple[int, int] | ParseError:
    """Skip extension headers from ``off``; returns ``(upper_protocol, payload_offset)``."""
    for _ in range(_MAX_EXT_HEADERS):
        if nh == NH_HOP_BY_HOP or nh == NH_DEST_OPTS or nh == NH_ROUTING:
            if off + 8 > end:
                return ParseError.MALFORMED
            # Hdr Ext Len: 8-octet units beyond the first 8 (RFC 8200 §4.3, §4.4, §4.6).
            hlen = (buf[off + 1] + 1) << 3
            if off + hlen > end:
                return ParseError.MALFORMED
            if strict:
                # RFC 8200 §4.1: hop-by-hop options only right after the IPv6 header.
                if nh == NH_HOP_BY_HOP and off != 40:
                    return ParseError.MALFORMED
                if nh == NH_ROUTING:
                    # RFC 8200 §4.4: with Segments Left 0 the header is ignored; otherwise
                    # we would have to forward the packet (an end host does not).
                    if buf[off + 3]:
                        return ParseError.UNSUPPORTED
                elif not _options_ok(buf, off + 2, off + hlen):
                    return ParseError.UNSUPPORTED
            nh = buf[off]
            off += hlen
        elif nh == NH_FRAGMENT:
            # RFC 8200 §4.5: offset (13 bits) and M in the second 16-bit word; offset 0 and
            # M clear is an atomic fragment, processed whole (RFC 6946 §4).
            if off + 8 > end:
                return ParseError.MALFORMED
            offset_flags = (buf[off + 2] << 8) | buf[off + 3]
            if strict and offset_flags & 0xFFF9:  # offset or M flag: a real fragment
                return ParseError.FRAGMENT
            if not strict and offset_flags & 0xFFF8:  # quoted non-first fragment
                return ParseError.FRAGMENT
            nh = buf[off]
            off += 8
        else:
            return nh, off
    return ParseError.UNSUPPORTED


def parse_ipv6(buf: memoryview) -> IpPacket | ParseError:
    """Parse one IPv6 packet; ``buf`` may be longer than the declared payload."""
    n = len(buf)
    if n < 40:
        return ParseError.MALFORMED
    vtf, plen, nh, hlim, src, dst = _HDR.unpack_from(buf)
    if vtf >> 28 != 6:  # RFC 8200 §3
        return ParseError.MALFORMED
    end = 40 + plen  # Payload Length excludes the 40-byte header, includes extensions (§3)
    if end > n or plen == 0:  # plen 0 would be a jumbogram (RFC 2675): unsupported here
        return ParseError.MALFORMED
    if nh == 6 or nh == 17 or nh == 58:  # fast path: no extension headers
        return IpPacket(6, src, dst, nh, hlim, buf[40:end], buf[:end])
    walked = _walk(buf, nh, 40, end, True)
    if type(walked) is ParseError:
        return walked
    proto, off = walked  # type: ignore[misc]
    return IpPacket(6, src, dst, proto, hlim, buf[off:end], buf[:end])


def ipv6_header(
    src: bytes, dst: bytes, next_header: int, payload_len: int, hop_limit: int = DEFAULT_TTL
) -> bytes:
    """The 40-byte IPv6 header without extension headers."""
    if payload_len > 0xFFFF:
        raise ValueError("IPv6 payload too long")
    return _HDR.pack(_VERSION_WORD, payload_len, next_header, hop_limit, src, dst)


def build_ipv6(
    src: bytes,
    dst: bytes,
    next_header: int,
    payload: bytes | memoryview,
    hop_limit: int = DEFAULT_TTL,
) -> bytes:
    """An IPv6 packet without extension headers around ``payload``."""
    if len(payload) > 0xFFFF:
        raise ValueError("IPv6 payload too long")
    return _HDR.pack(_VERSION_WORD, len(payload), next_header, hop_limit, src, dst) + payload


def parse_quoted_ipv6(buf: memoryview) -> tuple[bytes, bytes, int, memoryview] | None:
    """The (possibly truncated) packet quoted in an ICMPv6 error: ``(src, dst, proto, rest)``
    (RFC 4443 §2.4(c): as much of the packet as fits in the minimum IPv6 MTU)."""
    if len(buf) < 40:
        return None
    vtf, _plen, nh, _hlim, src, dst = _HDR.unpack_from(buf)
    if vtf >> 28 != 6:
        return None
    walked = _walk(buf, nh, 40, len(buf), False)
    if type(walked) is ParseError:
        return None
    proto, off = walked  # type: ignore[misc]
    return src, dst, proto, buf[off:]
