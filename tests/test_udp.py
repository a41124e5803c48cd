"""UDP wire format: checksums over both pseudo-headers, zero-checksum rules."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from test_ip import naive_checksum

from mitm_wg.net.ipv4 import ParseError
from mitm_wg.net.udp import UdpDatagram, build_udp, parse_udp

A4 = bytes([192, 168, 0, 1])
B4 = bytes([192, 168, 0, 199])
A6 = bytes.fromhex("fd000000000000000000000000000001")
B6 = bytes.fromhex("fd000000000000000000000000000002")


def _pseudo(src: bytes, dst: bytes, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + bytes([0, 17]) + length.to_bytes(2, "big")
    return src + dst + length.to_bytes(4, "big") + b"\0\0\0\x11"


@settings(max_examples=100, derandomize=True, database=None)
@given(
    st.sampled_from([(A4, B4), (A6, B6)]),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.binary(max_size=300),
)
def test_round_trip_and_reference_checksum(
    addrs: tuple[bytes, bytes], sport: int, dport: int, payload: bytes
) -> None:
    src, dst = addrs
    dgram = build_udp(src, dst, sport, dport, payload)
    assert dgram[6:8] != b"\0\0"  # a checksum is always sent
    assert naive_checksum(_pseudo(src, dst, len(dgram)) + dgram) == 0
    d = parse_udp(memoryview(dgram), src, dst)
    assert isinstance(d, UdpDatagram)
    assert (d.src_port, d.dst_port, bytes(d.payload)) == (sport, dport, payload)


def test_checksum_exact() -> None:
    dgram = build_udp(A4, B4, 1234, 53, b"query")
    assert naive_checksum(_pseudo(A4, B4, len(dgram)) + dgram) == 0


def test_zero_checksum_rules() -> None:
    dgram = bytearray(build_udp(A4, B4, 1, 2, b"abc"))
    dgram[6:8] = b"\0\0"
    assert isinstance(parse_udp(memoryview(bytes(dgram)), A4, B4), UdpDatagram)
    dgram6 = bytearray(build_udp(A6, B6, 1, 2, b"abc"))
    dgram6[6:8] = b"\0\0"
    assert parse_udp(memoryview(bytes(dgram6)), A6, B6) is ParseError.CHECKSUM


def test_rejects() -> None:
    dgram = build_udp(A4, B4, 1, 2, b"abcdef")
    assert parse_udp(memoryview(dgram[:7]), A4, B4) is ParseError.MALFORMED
    assert parse_udp(memoryview(dgram[:10]), A4, B4) is ParseError.MALFORMED  # length > buffer
    bad = bytearray(dgram)
    struct.pack_into("!H", bad, 4, 7)
    assert parse_udp(memoryview(bytes(bad)), A4, B4) is ParseError.MALFORMED
    bad = bytearray(dgram)
    bad[-1] ^= 1
    assert parse_udp(memoryview(bytes(bad)), A4, B4) is ParseError.CHECKSUM
    assert parse_udp(memoryview(dgram), A4, bytes([192, 168, 0, 2])) is ParseError.CHECKSUM


def test_length_field_trims_trailing_bytes() -> None:
    dgram = build_udp(A4, B4, 1, 2, b"abc") + b"junk"
    d = parse_udp(memoryview(dgram), A4, B4)
    assert isinstance(d, UdpDatagram)
    assert bytes(d.payload) == b"abc"
