"""Tests for the anti-replay window (mitm_wg.wireguard.replay)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mitm_wg.wireguard.replay import RING_SIZE, ReplayWindow
from mitm_wg.wireguard.timers import REJECT_AFTER_MESSAGES

W = ReplayWindow.WINDOW_SIZE


def accept(window: ReplayWindow, counter: int) -> bool:
    """What the device does: check, (decrypt,) update. Both must agree."""
    ok = window.check(counter)
    assert window.update(counter) == ok
    return ok


def test_window_size() -> None:
    assert 2048 <= W <= RING_SIZE
    assert W == 8128  # same window as wireguard-go


def test_counter_zero_first_and_duplicate() -> None:
    w = ReplayWindow()
    assert w.check(0)
    assert w.update(0)
    assert not w.check(0)
    assert not w.update(0)


def test_in_order_and_duplicates() -> None:
    w = ReplayWindow()
    for c in range(20000):
        assert accept(w, c)
        assert not w.check(c)
    assert w.last == 19999
    for c in (19999, 19998, 19999 - W + 1):
        assert not accept(w, c)


def test_check_does_not_record() -> None:
    w = ReplayWindow()
    assert w.check(5)
    assert w.check(5)
    assert w.last == 0
    assert w.update(5)
    assert not w.check(5)


def test_window_edges() -> None:
    w = ReplayWindow()
    top = 100_000
    assert accept(w, top)
    oldest_ok = top - W + 1
    assert not w.check(top - W)  # just outside
    assert not w.update(top - W)
    assert w.check(oldest_ok)  # just inside
    assert w.update(oldest_ok)
    assert not w.check(oldest_ok)
    # Advancing by one pushes the previously oldest acceptable counter out.
    assert accept(w, top + 1)
    assert not w.check(oldest_ok + 1 - 1)
    assert w.check(oldest_ok + 1)


def test_out_of_order_within_window() -> None:
    w = ReplayWindow()
    order = [10, 3, 7, 1, 2, 0, 9, 8, 4, 6, 5]
    for c in order:
        assert accept(w, c), c
    for c in order:
        assert not accept(w, c), c
    assert w.last == 10


def test_far_jump_clears_history() -> None:
    w = ReplayWindow()
    for c in range(1, 300):
        assert accept(w, c)
    jump = 10 * RING_SIZE
    assert accept(w, jump)
    assert not accept(w, 5)  # far outside the window now
    # Counters whose ring slots still hold counters recorded before the jump are fresh.
    for c in range(jump - W + 1, jump - W + 200):
        assert (c % RING_SIZE) < 300  # really aliasing an old recorded slot
        assert accept(w, c), c
    for c in range(jump - 100, jump):
        assert accept(w, c), c
    assert not accept(w, jump)
    assert accept(w, jump + 1)


def test_huge_jump() -> None:
    w = ReplayWindow()
    assert accept(w, 3)
    assert accept(w, 2**62)
    assert not accept(w, 3)
    assert accept(w, 2**62 - 1)
    assert accept(w, 2**62 - W + 1)
    assert not accept(w, 2**62 - W)


def test_slot_aliasing_inside_window() -> None:
    # c and c + RING_SIZE share a slot; once the larger is recorded, the smaller is too old.
    w = ReplayWindow()
    assert accept(w, 7)
    assert accept(w, 7 + RING_SIZE)
    assert not accept(w, 7)
    assert not accept(w, 7 + RING_SIZE)
    # A slot holding a counter from the previous lap of the ring does not look like a replay.
    w = ReplayWindow()
    assert accept(w, 100)
    assert accept(w, 8300)
    assert w.check(100 + RING_SIZE)  # 8292: inside the window, its slot still holds 100
    assert accept(w, 100 + RING_SIZE)
    assert not accept(w, 100 + RING_SIZE)


def test_limit_counter() -> None:
    w = ReplayWindow()
    last_ok = REJECT_AFTER_MESSAGES - 1
    assert accept(w, last_ok)
    assert not accept(w, REJECT_AFTER_MESSAGES)
    assert not accept(w, REJECT_AFTER_MESSAGES + 1)
    assert not accept(w, (1 << 64) - 1)
    assert w.last == last_ok
    assert accept(w, last_ok - 1)


def test_limit_on_fresh_window() -> None:
    w = ReplayWindow()
    assert not w.check((1 << 64) - 1)  # also the ring's empty marker
    assert not w.update((1 << 64) - 1)
    assert w.last == 0


class Model:
    """Trivial reference: every accepted counter in a set, plus the maximum."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.max = 0

    def accept(self, c: int) -> bool:
        if c >= REJECT_AFTER_MESSAGES or c in self.seen:
            return False
        if c <= self.max and self.max - c >= W:
            return False
        self.seen.add(c)
        self.max = max(self.max, c)
        return True


steps = st.one_of(
    st.integers(-W - 70, W + 70),  # around the window edges, relative to the current max
    st.integers(-3, 3),  # duplicates and neighbours
    st.sampled_from([-W - 1, -W, -W + 1]),  # exactly at the window edge
    st.sampled_from([RING_SIZE, -RING_SIZE, RING_SIZE - W, 2 * RING_SIZE + 1]),  # slot aliases
    st.integers(-(2**64), 2**64),  # far jumps, including past the limit
)


@settings(max_examples=300, deadline=None)
@given(st.lists(steps, max_size=200))
def test_matches_reference_model(deltas: list[int]) -> None:
    w = ReplayWindow()
    model = Model()
    for delta in deltas:
        c = min(max(0, model.max + delta), (1 << 64) - 1)
        expected = model.accept(c)
        assert w.check(c) == expected, c
        assert w.update(c) == expected, c
        assert w.last == model.max
        # Re-check a random-ish earlier counter without recording.
        probe = max(0, c - 1)
        expected_probe = (
            probe < REJECT_AFTER_MESSAGES
            and probe not in model.seen
            and (probe > model.max or model.max - probe < W)
        )
        assert w.check(probe) == expected_probe
