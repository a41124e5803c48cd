"""The trio runtime's clock: time that goes on while the machine is suspended.

A laptop suspends with mitmproxy running; the exit does not. CLOCK_MONOTONIC (trio's own
clock, Python's ``time.monotonic``) stops during a suspend, so after an hour asleep the
runtime would think its WireGuard session a few seconds old, while the exit dropped it long
ago (REJECT_AFTER_TIME, 180 s): every packet then went to a session nobody had any more
until a TCP retransmission started a handshake, a second or more later. Linux's
CLOCK_BOOTTIME counts the suspended time too (it is what the kernel's WireGuard keys its
timers on): with it the first packet after a resume finds the session expired and
handshakes at once, and every timer that came due meanwhile (a persistent keepalive, a TCP
retransmission) fires on waking.

:func:`runtime_clock` is what the edge and the CLI pass to ``trio.run``; the runtime
itself reads ``trio.current_time()``, so it runs on whatever clock its caller's trio run
has (tests use trio's MockClock). The timerfd (``timerfd.py``) counts on the same clock.
"""

from __future__ import annotations

import functools
import sys
import time

import trio

__all__ = ["BoottimeClock", "runtime_clock"]

#: Linux's CLOCK_BOOTTIME (``time.CLOCK_BOOTTIME`` from Python 3.7 on Linux).
CLOCK_BOOTTIME: int | None = getattr(time, "CLOCK_BOOTTIME", None)


#: Seconds since boot, suspended time included (``time.monotonic`` where there is none:
#: :func:`runtime_clock` then gives no BoottimeClock).
_boottime = (
    functools.partial(time.clock_gettime, CLOCK_BOOTTIME)
    if CLOCK_BOOTTIME is not None
    else time.monotonic
)


class BoottimeClock(trio.abc.Clock):
    """A trio clock on CLOCK_BOOTTIME: seconds since boot, suspended time included."""

    __slots__ = ()

    def start_clock(self) -> None:
        pass

    # (``clock.current_time()`` calls clock_gettime directly: no method call in between)
    current_time = staticmethod(_boottime)

    def deadline_to_sleep_time(self, deadline: float) -> float:
        return deadline - _boottime()

    def __repr__(self) -> str:
        return "<BoottimeClock>"


def runtime_clock() -> trio.abc.Clock | None:
    """A :class:`BoottimeClock` where the platform has CLOCK_BOOTTIME (Linux), else None
    (``trio.run``'s own clock)."""
    if CLOCK_BOOTTIME is None or not sys.platform.startswith("linux"):
        return None
    try:
        time.clock_gettime(CLOCK_BOOTTIME)
    except OSError:
        return None
    return BoottimeClock()
