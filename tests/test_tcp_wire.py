from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mitm_wg.net.checksum import pseudo_header_sum, verify
from mitm_wg.net.tcp_wire import (
    ACK,
    FIN,
    PSH,
    SYN,
    TcpSegment,
    build_tcp,
    options_length,
    parse_tcp,
    tcp_checksum_ok,
)

SRC4 = bytes([192, 168, 0, 1])
DST4 = bytes([10, 0, 0, 2])
SRC6 = bytes(15) + b"\x01"
DST6 = bytes(15) + b"\x02"


def test_known_bytes_syn() -> None:
    seg = TcpSegment(
        1234,
        80,
        0x01020304,
        0,
        SYN,
        65535,
        mss=1460,
        wscale=7,
        sack_permitted=True,
        timestamp=(0xAABBCCDD, 0),
    )
    raw = build_tcp(seg, SRC4, DST4)
    assert len(raw) == 40
    assert raw[:4] == struct.pack("!HH", 1234, 80)
    assert raw[12] >> 4 == 10  # data offset 40 bytes
    # MSS, SACK-permitted + timestamps, NOP + window scale: the layout Linux uses
    assert raw[20:24] == bytes([2, 4, 0x05, 0xB4])
    assert raw[24:26] == bytes([4, 2])
    assert raw[26:28] == bytes([8, 10])
    assert raw[28:32] == bytes.fromhex("aabbccdd")
    assert raw[36:40] == bytes([1, 3, 3, 7])
    assert verify(raw, pseudo_header_sum(SRC4, DST4, 6, len(raw)))
    assert tcp_checksum_ok(raw, SRC4, DST4)
    corrupt = bytearray(raw)
    corrupt[5] ^= 0x10
    assert not tcp_checksum_ok(corrupt, SRC4, DST4)


@pytest.mark.parametrize("addrs", [(SRC4, DST4), (SRC6, DST6)])
def test_roundtrip_all_options(addrs: tuple[bytes, bytes]) -> None:
    seg = TcpSegment(
        5,
        6,
        0xFFFFFFFF,
        7,
        ACK | PSH | FIN,
        1000,
        timestamp=(1, 2),
        sack_blocks=((10, 20), (30, 40), (50, 60)),
        payload=b"hello, world!",  # odd length
    )
    raw = build_tcp(seg, *addrs)
    assert len(raw) == 20 + options_length(timestamp=True, sack_blocks=3) + 13
    assert tcp_checksum_ok(raw, *addrs)
    back = parse_tcp(raw)
    assert back == seg
    assert isinstance(back.payload, memoryview)
    assert back.seg_len() == 14


def test_four_sack_blocks_without_timestamps() -> None:
    blocks = ((1, 2), (3, 4), (5, 6), (7, 8))
    seg = TcpSegment(1, 2, 3, 4, ACK, 5, sack_blocks=blocks)
    raw = build_tcp(seg, SRC4, DST4)
    assert len(raw) == 20 + 36
    assert parse_tcp(raw).sack_blocks == blocks


def test_unknown_options_and_eol_are_skipped() -> None:
    hdr = struct.pack("!HHIIBBHHH", 1, 2, 3, 4, (32 // 4) << 4, ACK, 9, 0, 0)
    opts = bytes([30, 4, 0, 0, 2, 4, 0x02, 0x00, 0, 0, 0, 0])  # unknown, MSS 512, EOL
    seg = parse_tcp(hdr + opts)
    assert seg is not None and seg.mss == 512 and seg.payload == b""


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        bytes(19),
        struct.pack("!HHIIBBHHH", 1, 2, 3, 4, 4 << 4, 0, 0, 0, 0),  # offset < 5
        struct.pack("!HHIIBBHHH", 1, 2, 3, 4, 15 << 4, 0, 0, 0, 0),  # offset beyond buffer
        struct.pack("!HHIIBBHHH", 1, 2, 3, 4, 6 << 4, 0, 0, 0, 0) + bytes([2, 9, 0, 0]),
        struct.pack("!HHIIBBHHH", 1, 2, 3, 4, 6 << 4, 0, 0, 0, 0) + bytes([1, 1, 1, 8]),
        struct.pack("!HHIIBBHHH", 1, 2, 3, 4, 6 << 4, 0, 0, 0, 0) + bytes([8, 0, 0, 0]),
    ],
)
def test_malformed_returns_none(raw: bytes) -> None:
    assert parse_tcp(raw) is None


@given(st.binary(max_size=120))
def test_parse_never_raises(raw: bytes) -> None:
    parse_tcp(raw)


@given(
    seq=st.integers(0, 2**32 - 1),
    ack=st.integers(0, 2**32 - 1),
    flags=st.integers(0, 255),
    window=st.integers(0, 65535),
    ts=st.none() | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    payload=st.binary(max_size=64),
)
def test_roundtrip_property(
    seq: int, ack: int, flags: int, window: int, ts: tuple[int, int] | None, payload: bytes
) -> None:
    seg = TcpSegment(1, 2, seq, ack, flags, window, timestamp=ts, payload=payload)
    raw = build_tcp(seg, SRC6, DST6)
    assert tcp_checksum_ok(raw, SRC6, DST6)
    assert parse_tcp(raw) == seg


def test_build_rejects_too_many_options() -> None:
    seg = TcpSegment(
        1, 2, 3, 4, SYN, 5, mss=1, wscale=1, timestamp=(1, 2), sack_blocks=((1, 2),) * 3
    )
    with pytest.raises(ValueError):
        build_tcp(seg, SRC4, DST4)
