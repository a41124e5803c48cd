"""ICMPv4/ICMPv6 wire formats and the error rate limiter."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from test_ip import naive_checksum

from mitm_wg.net.icmp import (
    ICMP4_ECHO_REQUEST,
    ICMP6_ECHO_REQUEST,
    ICMP6_PACKET_TOO_BIG,
    IcmpMessage,
    RateLimiter,
    build_icmp4,
    build_icmp6,
    parse_icmp4,
    parse_icmp6,
)
from mitm_wg.net.ipv4 import ParseError

A6 = bytes.fromhex("fd000000000000000000000000000001")
B6 = bytes.fromhex("fd000000000000000000000000000002")


def test_icmp4_echo_known_vector() -> None:
    # echo request id=1 seq=1 payload "abcd": checksum computed by the reference loop.
    msg = build_icmp4(ICMP4_ECHO_REQUEST, 0, 0x00010001, b"abcd")
    assert msg[:2] == b"\x08\x00" and msg[4:] == b"\x00\x01\x00\x01abcd"
    assert naive_checksum(msg) == 0
    body = bytearray(msg)
    body[2:4] = b"\0\0"
    assert int.from_bytes(msg[2:4], "big") == naive_checksum(bytes(body))


def test_icmp4_parse() -> None:
    msg = build_icmp4(3, 4, 1400, b"quoted header")
    m = parse_icmp4(memoryview(msg))
    assert isinstance(m, IcmpMessage)
    assert (m.type, m.code, m.rest, bytes(m.body)) == (3, 4, 1400, b"quoted header")
    bad = bytearray(msg)
    bad[-1] ^= 0x10
    assert parse_icmp4(memoryview(bytes(bad))) is ParseError.CHECKSUM
    assert parse_icmp4(memoryview(msg[:7])) is ParseError.MALFORMED


def test_icmp6_checksum_covers_pseudo_header() -> None:
    msg = build_icmp6(A6, B6, ICMP6_PACKET_TOO_BIG, 0, 1280, b"odd-length-body")
    m = parse_icmp6(memoryview(msg), A6, B6)
    assert isinstance(m, IcmpMessage)
    assert (m.type, m.rest, bytes(m.body)) == (ICMP6_PACKET_TOO_BIG, 1280, b"odd-length-body")
    # The same bytes claimed to come from another address fail the checksum.
    other = bytes.fromhex("fd000000000000000000000000000003")
    assert parse_icmp6(memoryview(msg), other, B6) is ParseError.CHECKSUM


def test_icmp6_reference_checksum() -> None:
    msg = build_icmp6(A6, B6, ICMP6_ECHO_REQUEST, 0, 0x12340001, b"ping")
    pseudo = A6 + B6 + len(msg).to_bytes(4, "big") + b"\0\0\0\x3a"
    assert naive_checksum(pseudo + msg) == 0


def test_rate_limiter() -> None:
    rl = RateLimiter(rate=2.0, burst=3.0, now=0.0)
    assert [rl.allow(0.0) for _ in range(5)] == [True, True, True, False, False]
    assert rl.allow(0.49) is False
    assert rl.allow(0.5) is True  # one token regained after 0.5 s at 2/s
    assert rl.allow(0.5) is False
    assert [rl.allow(100.0) for _ in range(4)] == [True, True, True, False]  # capped at burst


@settings(max_examples=200, derandomize=True, database=None)
@given(st.binary(max_size=64))
def test_icmp_parsers_never_raise(data: bytes) -> None:
    parse_icmp4(memoryview(data))
    parse_icmp6(memoryview(data), A6, B6)
