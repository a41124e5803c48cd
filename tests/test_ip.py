"""IPv4/IPv6 wire formats: parse/build round trips, known vectors, hostile input."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from mitm_wg.net.ipv4 import (
    IpPacket,
    ParseError,
    build_ipv4,
    parse_ipv4,
    parse_quoted_ipv4,
)
from mitm_wg.net.ipv6 import build_ipv6, parse_ipv6, parse_quoted_ipv6

A4 = bytes([10, 0, 0, 1])
B4 = bytes([10, 0, 0, 2])
A6 = bytes.fromhex("fd000000000000000000000000000001")
B6 = bytes.fromhex("fd000000000000000000000000000002")


def naive_checksum(data: bytes) -> int:
    """Reference RFC 1071 checksum with an explicit word loop (test only)."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def test_ipv4_known_header_checksum() -> None:
    # A well-known example header: checksum field 0xb861.
    hdr = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    pkt = build_ipv4(hdr[12:16], hdr[16:20], 17, b"\0" * (0x73 - 20))
    assert pkt[:20] == bytes.fromhex("4500007300004000401" + "1b861c0a80001c0a800c7")


def test_ipv4_round_trip() -> None:
    pkt = build_ipv4(A4, B4, 6, b"hello world", ttl=17)
    assert naive_checksum(pkt[:20]) == 0
    assert pkt[6] & 0x40  # DF
    p = parse_ipv4(memoryview(pkt))
    assert isinstance(p, IpPacket)
    assert (p.version, p.src, p.dst, p.proto, p.hop_limit) == (4, A4, B4, 6, 17)
    assert bytes(p.payload) == b"hello world"
    assert bytes(p.raw) == pkt


def test_ipv4_trailing_link_padding_is_trimmed() -> None:
    pkt = build_ipv4(A4, B4, 17, b"abc") + b"\0\0\0\0"
    p = parse_ipv4(memoryview(pkt))
    assert isinstance(p, IpPacket)
    assert bytes(p.payload) == b"abc"


def test_ipv4_options_are_skipped() -> None:
    payload = b"payload!"
    hdr = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x46, 0, 24 + len(payload), 1, 0x4000, 64, 6, 0, A4, B4)
    )
    hdr += b"\x01\x01\x01\x00"  # NOP NOP NOP EOL
    struct.pack_into("!H", hdr, 10, naive_checksum(bytes(hdr)))
    p = parse_ipv4(memoryview(bytes(hdr) + payload))
    assert isinstance(p, IpPacket)
    assert bytes(p.payload) == payload


def test_ipv4_rejects() -> None:
    good = build_ipv4(A4, B4, 6, b"x" * 30)
    assert parse_ipv4(memoryview(good[:19])) is ParseError.MALFORMED
    assert parse_ipv4(memoryview(good[:40])) is ParseError.MALFORMED  # truncated vs total
    bad = bytearray(good)
    bad[0] = 0x65  # version 6
    assert parse_ipv4(memoryview(bytes(bad))) is ParseError.MALFORMED
    bad = bytearray(good)
    bad[0] = 0x44  # IHL 16 bytes
    assert parse_ipv4(memoryview(bytes(bad))) is ParseError.MALFORMED
    bad = bytearray(good)
    bad[8] ^= 1  # TTL changed: header checksum fails
    assert parse_ipv4(memoryview(bytes(bad))) is ParseError.CHECKSUM


def _with_frag(pkt: bytes, frag: int) -> bytes:
    b = bytearray(pkt)
    struct.pack_into("!H", b, 6, frag)
    struct.pack_into("!H", b, 10, 0)
    struct.pack_into("!H", b, 10, naive_checksum(bytes(b[:20])))
    return bytes(b)


def test_ipv4_fragments_dropped() -> None:
    good = build_ipv4(A4, B4, 6, b"x" * 30)
    assert parse_ipv4(memoryview(_with_frag(good, 0x2000))) is ParseError.FRAGMENT  # MF
    assert parse_ipv4(memoryview(_with_frag(good, 0x0010))) is ParseError.FRAGMENT  # offset
    assert isinstance(parse_ipv4(memoryview(_with_frag(good, 0))), IpPacket)  # DF clear ok


def test_ipv4_quoted_truncated() -> None:
    pkt = build_ipv4(A4, B4, 6, b"y" * 100)
    q = parse_quoted_ipv4(memoryview(pkt[:28]))
    assert q is not None
    assert q[:3] == (A4, B4, 6)
    assert bytes(q[3]) == b"y" * 8
    assert parse_quoted_ipv4(memoryview(pkt[:19])) is None


def test_ipv6_round_trip() -> None:
    pkt = build_ipv6(A6, B6, 17, b"data", hop_limit=9)
    assert len(pkt) == 44 and pkt[0] >> 4 == 6
    p = parse_ipv6(memoryview(pkt))
    assert isinstance(p, IpPacket)
    assert (p.version, p.src, p.dst, p.proto, p.hop_limit) == (6, A6, B6, 17, 9)
    assert bytes(p.payload) == b"data"


def _ext(nh: int, body: bytes) -> bytes:
    """An extension header (hop-by-hop/dest/routing style) with next header ``nh``."""
    raw = bytes([nh, 0]) + body
    assert len(raw) % 8 == 0
    return bytes([nh, len(raw) // 8 - 1]) + body


def _v6_with(first_nh: int, ext: bytes, payload: bytes) -> bytes:
    body = ext + payload
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), first_nh, 64, A6, B6) + body


def test_ipv6_extension_headers_walked() -> None:
    hbh = _ext(60, b"\x01\x04\0\0\0\0")  # PadN, next: destination options
    dst = _ext(43, b"\x00" + b"\x01\x03\0\0\0")  # Pad1 + PadN, next: routing
    rt = _ext(44, b"\x00\x00" + b"\0" * 4)  # routing type 0, segments left 0, next: fragment
    frag = bytes([6, 0, 0, 0]) + b"\0\0\0\x01"  # atomic fragment, next: TCP
    pkt = _v6_with(0, hbh + dst + rt + frag, b"tcp-bytes")
    p = parse_ipv6(memoryview(pkt))
    assert isinstance(p, IpPacket), p
    assert p.proto == 6
    assert bytes(p.payload) == b"tcp-bytes"


def test_ipv6_rejects() -> None:
    good = build_ipv6(A6, B6, 6, b"z" * 20)
    assert parse_ipv6(memoryview(good[:39])) is ParseError.MALFORMED
    assert parse_ipv6(memoryview(good[:50])) is ParseError.MALFORMED
    bad = bytearray(good)
    bad[0] = 0x45
    assert parse_ipv6(memoryview(bytes(bad))) is ParseError.MALFORMED
    # A real fragment (offset 8) and a first fragment with M set.
    for off_flags in (b"\x00\x08", b"\x00\x01"):
        frag = bytes([6, 0]) + off_flags + b"\0\0\0\x07"
        assert parse_ipv6(memoryview(_v6_with(44, frag, b"x" * 8))) is ParseError.FRAGMENT
    # Routing header with segments left: we would have to forward.
    rt = _ext(6, b"\x00\x02" + b"\0" * 4)
    assert parse_ipv6(memoryview(_v6_with(43, rt, b"x" * 8))) is ParseError.UNSUPPORTED
    # Unknown destination option whose action bits say "discard".
    dst = _ext(6, b"\x42\x04\0\0\0\0")
    assert parse_ipv6(memoryview(_v6_with(60, dst, b"x" * 8))) is ParseError.UNSUPPORTED
    # Unknown option with "skip" action is fine.
    dst = _ext(6, b"\x02\x04\0\0\0\0")
    assert isinstance(parse_ipv6(memoryview(_v6_with(60, dst, b"x" * 8))), IpPacket)
    # Hop-by-hop not first.
    hbh = _ext(6, b"\x01\x04\0\0\0\0")
    dst = _ext(0, b"\x01\x04\0\0\0\0")
    assert parse_ipv6(memoryview(_v6_with(60, dst + hbh, b"x" * 8))) is ParseError.MALFORMED
    # Extension header running past the payload.
    assert parse_ipv6(memoryview(_v6_with(60, b"\x06\x05\0\0\0\0\0\0", b""))) in (
        ParseError.MALFORMED,
    )


def test_ipv6_quoted() -> None:
    frag = bytes([17, 0, 0, 0]) + b"\0\0\0\x01"  # first fragment (M set): still quotable
    pkt = _v6_with(44, frag, b"u" * 100)
    q = parse_quoted_ipv6(memoryview(pkt[:60]))
    assert q is not None
    assert q[:3] == (A6, B6, 17)
    assert bytes(q[3]) == b"u" * 12


@settings(max_examples=300, derandomize=True, database=None)
@given(st.binary(max_size=120))
def test_parsers_never_raise(data: bytes) -> None:
    for blob in (data, b"\x45" + data, b"\x60" + data):
        parse_ipv4(memoryview(blob))
        parse_ipv6(memoryview(blob))
        parse_quoted_ipv4(memoryview(blob))
        parse_quoted_ipv6(memoryview(blob))


@settings(max_examples=100, derandomize=True, database=None)
@given(st.binary(max_size=200), st.integers(0, 255), st.integers(1, 255))
def test_ipv4_round_trip_property(payload: bytes, proto: int, ttl: int) -> None:
    pkt = build_ipv4(A4, B4, proto, payload, ttl)
    assert naive_checksum(pkt[:20]) == 0
    p = parse_ipv4(memoryview(pkt))
    assert isinstance(p, IpPacket)
    assert (p.proto, p.hop_limit, bytes(p.payload)) == (proto, ttl, payload)
