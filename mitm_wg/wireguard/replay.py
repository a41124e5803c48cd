"""Anti-replay sliding window for transport-data counters (whitepaper §5.4.6, RFC 6479 style).

A counter is acceptable if it is below ``REJECT_AFTER_MESSAGES``, not older than
``WINDOW_SIZE`` counters behind the highest one accepted so far, and not accepted before.

Representation: instead of a bitmap, a ring of ``RING_SIZE`` slots where slot ``c % RING_SIZE``
holds the last counter recorded there. ``c`` was seen iff its slot holds exactly ``c``: a later
counter sharing the slot is at least ``RING_SIZE`` ahead, which pushes ``c`` out of the window
anyway (``WINDOW_SIZE <= RING_SIZE``). So advancing the window never has to clear anything —
the per-packet cost is O(1) for any jump — and there is no bit twiddling at all.

Measured (CPython 3.11, check() + update() per in-order packet, 200k packets, best of 3,
ns/packet with small counters / counters around 2**40):

- Python-int bitmap shifted on advance ........ 725 / 785   (re-allocates an 8 kbit int)
- RFC 6479 ring of 128 64-bit words in a list .. 398 / 471
- slot ring, list of ints ...................... 186 / 221   (up to ~300 KiB of int objects)
- slot ring, array("Q") ........................ 193 / 251   (fixed 64 KiB) <- chosen

The array wins on bounded memory for a few percent of speed; both slot rings are ~2x faster
than the word ring and ~4x faster than the int bitmap.
"""

from __future__ import annotations

from array import array
from typing import Final

from mitm_wg.wireguard.timers import REJECT_AFTER_MESSAGES

__all__ = ["RING_SIZE", "ReplayWindow"]

RING_SIZE: Final = 8192
_RING_MASK: Final = RING_SIZE - 1
_EMPTY: Final = (1 << 64) - 1  # never a valid counter (it is >= REJECT_AFTER_MESSAGES)
_EMPTY_RING: Final = array("Q", [_EMPTY]) * RING_SIZE
_WINDOW: Final = RING_SIZE - 64


class ReplayWindow:
    """Sliding window of recently received transport counters for one session."""

    __slots__ = ("_last", "_slots")

    #: How many counters, counting the highest seen, are still accepted out of order.
    #: 8192 - 64, the same window as wireguard-go and RFC 6479 with 8192-bit bitmaps.
    WINDOW_SIZE: Final = _WINDOW

    def __init__(self) -> None:
        self._last = 0  # highest counter recorded (0 before any, and counter 0 is still fresh)
        self._slots = array("Q", _EMPTY_RING)

    def __repr__(self) -> str:
        return f"<ReplayWindow last={self._last}>"

    @property
    def last(self) -> int:
        """The highest counter recorded so far (0 initially)."""
        return self._last

    def check(self, counter: int) -> bool:
        """True if ``counter`` is acceptable: not seen and not too old. Records nothing.

        Call before decrypting to skip work on obvious replays; call :meth:`update` after the
        packet authenticated.
        """
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        last = self._last
        if counter > last:
            return True
        if last - counter >= _WINDOW:
            return False
        return self._slots[counter & _RING_MASK] != counter

    def update(self, counter: int) -> bool:
        """Record ``counter`` after successful decryption.

        Returns False (and records nothing) if it is a replay, too old or past the limit.
        """
        if counter >= REJECT_AFTER_MESSAGES:
            return False
        slots = self._slots
        index = counter & _RING_MASK
        if counter > self._last:
            self._last = counter
        elif self._last - counter >= _WINDOW or slots[index] == counter:
            return False
        slots[index] = counter
        return True
