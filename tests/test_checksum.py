"""The Internet checksum helpers against RFC 1071's word-by-word definition."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from mitm_wg.net.checksum import _SPLIT_AT, checksum, ones_sum, verify


def _reference_sum(data: bytes) -> int:
    """RFC 1071 §4.1: 16-bit big-endian words (the last byte padded with zero), added with
    end-around carry."""
    if len(data) & 1:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


# lengths on both sides of the split (ones_sum converts four quarters from _SPLIT_AT on)
_LENGTHS = st.one_of(
    st.integers(0, 64),
    st.integers(_SPLIT_AT - 8, _SPLIT_AT + 8),
    st.integers(1300, 1500),
    st.integers(0, 9000),
)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), n=_LENGTHS, kind=st.sampled_from(["bytes", "bytearray", "view"]))
def test_ones_sum_is_the_word_sum(data: st.DataObject, n: int, kind: str) -> None:
    raw = data.draw(st.binary(min_size=n, max_size=n))
    buf: bytes | bytearray | memoryview = raw
    if kind == "bytearray":
        buf = bytearray(raw)
    elif kind == "view":
        buf = memoryview(b"\x55" + raw + b"\xaa")[1:-1]  # a slice: not its own buffer
    expected = _reference_sum(raw)
    assert ones_sum(buf) % 0xFFFF == expected % 0xFFFF
    value = checksum(buf)
    assert (value + expected) % 0xFFFF == 0  # the field makes the sum all ones
    # with the field appended as a word, the receiver's check passes
    padded = raw + b"\0" if n & 1 else raw
    assert verify(padded + value.to_bytes(2, "big"))


def test_all_ones_and_all_zeros_around_the_split() -> None:
    for n in (_SPLIT_AT - 2, _SPLIT_AT, _SPLIT_AT + 2, 1368, 1400):
        for fill in (0x00, 0xFF):
            raw = bytes([fill]) * n
            assert ones_sum(raw) % 0xFFFF == _reference_sum(raw) % 0xFFFF
