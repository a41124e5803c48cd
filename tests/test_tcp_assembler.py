from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from mitm_wg.net.assembler import Assembler


def test_in_order_pop() -> None:
    a = Assembler()
    assert a.pop(0) is None
    a.add(0, b"abc")
    assert a.pop(0) == b"abc"
    assert not a and a.size == 0


def test_merge_adjacent_and_overlapping() -> None:
    a = Assembler()
    a.add(10, b"klm")
    a.add(20, b"uvw")
    assert a.ranges() == [(10, 13), (20, 23)]
    a.add(13, b"nop")  # adjacent to the first
    assert a.ranges() == [(10, 16), (20, 23)]
    a.add(12, b"MNOPQRSTUVWXY")  # overlaps both and bridges the gap; held bytes win
    assert a.ranges() == [(10, 25)]
    assert a.size == 15
    assert a.pop(10) == b"klmnopQRSTuvwXY"


def test_pop_from_middle_and_discard_old() -> None:
    a = Assembler()
    a.add(5, b"fghij")
    a.add(20, b"u")
    assert a.pop(3) is None  # range starts after the in-order point
    assert a.pop(7) == b"hij"
    a.add(30, b"x")
    assert a.pop(25) is None  # (20, 21) is wholly old: discarded
    assert a.ranges() == [(30, 31)]


def test_max_ranges() -> None:
    a = Assembler(max_ranges=2)
    assert a.add(10, b"a")
    assert a.add(20, b"b")
    assert not a.add(30, b"c")
    assert a.add(11, b"b")  # merging does not need a new range
    assert a.ranges() == [(10, 12), (20, 21)]


def test_sack_blocks_most_recent_first() -> None:
    a = Assembler()
    a.add(10, b"a")
    a.add(20, b"b")
    a.add(30, b"c")
    assert a.sack_blocks(3) == ((30, 31), (20, 21), (10, 11))
    a.add(21, b"x")  # touches (20, 21)
    assert a.sack_blocks(2) == ((20, 22), (30, 31))
    a.add(11, b"yyyyyyyyy")  # merges (10, 11) and (20, 22)
    assert a.sack_blocks(4) == ((10, 22), (30, 31))


@given(st.integers(0, 2**31), st.data())
def test_random_segments_reassemble(seed: int, data: st.DataObject) -> None:
    rng = random.Random(seed)
    stream = bytes(rng.randrange(256) for _ in range(300))
    a = Assembler(max_ranges=1000)
    pieces = []
    for _ in range(40):
        s = rng.randrange(0, 300)
        e = rng.randrange(s, min(300, s + 50) + 1)
        pieces.append((s, e))
    pieces.append((0, 300))
    rng.shuffle(pieces)
    nxt = 0
    out = bytearray()
    for s, e in pieces:
        if e <= nxt:
            continue
        if s <= nxt:
            out += stream[nxt:e]
            nxt = e
            while (more := a.pop(nxt)) is not None:
                out += more
                nxt += len(more)
        else:
            a.add(s, stream[s:e])
        assert a.size == sum(e - s for s, e in a.ranges())
    assert bytes(out) == stream


def test_size_is_nonzero_exactly_when_ranges_are_held() -> None:
    """TcpSocket's hot paths test ``size`` for "anything held" (see Assembler's docstring)."""
    rng = random.Random(7)
    asm = Assembler(max_ranges=8)
    at = 0
    for _ in range(2000):
        op = rng.random()
        if op < 0.6:
            asm.add(at + rng.randrange(0, 200), bytes(rng.randrange(0, 30)))
        elif op < 0.95:
            data = asm.pop(at)
            at += len(data) if data else rng.randrange(0, 40)
        else:
            asm.clear()
        assert (asm.size > 0) == (len(asm) > 0) == bool(asm)


def _model_sack_blocks(
    ranges: list[tuple[int, int]], recent: list[int], limit: int
) -> tuple[tuple[int, int], ...]:
    """RFC 2018 §4 order from a plain model: the ranges holding the most recently touched
    starts first, then the rest in sequence order."""
    out: list[tuple[int, int]] = []
    for s in recent:
        for r in ranges:
            if r[0] <= s < r[1] and r not in out and len(out) < limit:
                out.append(r)
    for r in ranges:
        if r not in out and len(out) < limit:
            out.append(r)
    return tuple(out)


@given(seed=st.integers(0, 2**32))
def test_adds_match_a_plain_model(seed: int) -> None:
    """Ranges, sizes, SACK-block order and the D-SACK block against a plain model, with most
    adds extending the last range (the shortcut in ``add``), some landing elsewhere, some
    overlapping."""
    rng = random.Random(seed)
    asm = Assembler(max_ranges=16)
    held: set[int] = set()
    recent: list[int] = []
    for _ in range(60):
        ranges = asm.ranges()
        r = rng.random()
        if ranges and r < 0.6:
            start = ranges[-1][1]  # extends the last range
        elif ranges and r < 0.75:
            start = rng.choice(ranges)[1]  # extends another one
        else:
            start = rng.randrange(0, 4000)
        length = rng.randrange(1, 300)
        asm.dsack = None  # (an ACK reported the previous one)
        new = set(range(start, start + length))
        if not asm.add(start, bytes(length)):
            assert asm.dsack is None
            continue
        # D-SACK: the first contiguous part of the new data that was held already
        dup = sorted(new & held)
        first = dup[: next((i for i in range(1, len(dup)) if dup[i] != dup[i - 1] + 1), len(dup))]
        assert asm.dsack == ((first[0], first[-1] + 1) if first else None)
        held |= new
        model: list[tuple[int, int]] = []
        for x in sorted(held):
            if model and model[-1][1] == x:
                model[-1] = (model[-1][0], x + 1)
            else:
                model.append((x, x + 1))
        touched = next(a for a, b in model if a <= start < b)
        recent = [touched, *[t for t in recent if t != touched][:7]]
        assert asm.ranges() == model
        assert asm.size == len(held)
        assert asm.sack_blocks(4) == _model_sack_blocks(model, recent, 4)
