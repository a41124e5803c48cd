"""A one-shot timer with sub-millisecond precision for the trio runtime (Linux timerfd).

trio sleeps in ``epoll_wait``, whose timeout is whole milliseconds: CPython rounds every
timeout up, so a deadline 0.3 ms away wakes the runtime after ~1.1 ms (measured here). For
the TCP pacer that is credit thrown away: its token bucket holds about 1 ms of the pacing
rate (pacing.py), so above ~65 MB/s every such wake-up lapses what accrued meanwhile and the
sender goes out below its pacing rate (BBR then measures, and paces at, what got out). A
``timerfd`` fires at its deadline to within the kernel's timer slack (50 µs by default;
0.33 ms for that 0.3 ms sleep) and is a file descriptor trio waits on like a socket, so the
runtime's core-deadline task sleeps on one where the platform has it.

``os.timerfd_create``/``os.timerfd_settime`` exist from Python 3.13 on; before that the same
two libc calls go through ``ctypes``. Where neither works (not Linux), :func:`open_timerfd`
returns ``None`` and the runtime keeps trio's own deadlines.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

__all__ = ["TimerFd", "open_timerfd"]

_CLOCK_MONOTONIC = getattr(time, "CLOCK_MONOTONIC", 1)
#: The runtime's clock (clock.py): a suspend counts, so a timer due meanwhile fires on waking.
_CLOCK_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", 7)
_TFD_NONBLOCK = getattr(os, "TFD_NONBLOCK", os.O_NONBLOCK)
_TFD_CLOEXEC = getattr(os, "TFD_CLOEXEC", getattr(os, "O_CLOEXEC", 0o2000000))
#: the earliest a timer can be armed for: 0 would disarm it
_SOON = 1e-9


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


class TimerFd:
    """A non-blocking, close-on-exec one-shot timerfd on ``CLOCK_BOOTTIME`` (Linux >= 3.15;
    else ``CLOCK_MONOTONIC``). Wait for it with ``trio.lowlevel.wait_readable(timer.fileno())``,
    then :meth:`clear` it."""

    __slots__ = ("_fd", "_libc", "_spec", "_spec_ref")

    def __init__(self, *, via_ctypes: bool = False) -> None:
        """``via_ctypes``: through libc even where ``os`` has the calls (for tests)."""
        self._libc = None
        self._spec = self._spec_ref = None
        flags = _TFD_NONBLOCK | _TFD_CLOEXEC
        if not via_ctypes and hasattr(os, "timerfd_create"):  # Python 3.13+
            try:
                self._fd: int = os.timerfd_create(_CLOCK_BOOTTIME, flags=flags)
            except OSError:
                self._fd = os.timerfd_create(_CLOCK_MONOTONIC, flags=flags)
            return
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime  # AttributeError: none
        create.argtypes = (ctypes.c_int, ctypes.c_int)
        create.restype = ctypes.c_int
        settime.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
        settime.restype = ctypes.c_int
        fd = create(_CLOCK_BOOTTIME, flags)
        if fd < 0:
            fd = create(_CLOCK_MONOTONIC, flags)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self._fd = fd
        self._libc = settime
        self._spec = _Itimerspec()  # (one struct, reused by every arm)
        self._spec_ref = ctypes.addressof(self._spec)

    def fileno(self) -> int:
        return self._fd

    def arm(self, delay: float) -> None:
        """Fire once, ``delay`` seconds from now (at once when ``delay`` <= 0); replaces
        any earlier arming."""
        if delay < _SOON:
            delay = _SOON
        self._set(delay)

    def disarm(self) -> None:
        self._set(0.0)

    def _set(self, delay: float) -> None:
        settime = self._libc
        if settime is None:
            os.timerfd_settime(self._fd, initial=delay)
            return
        spec = self._spec
        assert spec is not None
        sec = int(delay)
        spec.it_value.tv_sec = sec
        spec.it_value.tv_nsec = int((delay - sec) * 1e9)
        if settime(self._fd, 0, self._spec_ref, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def clear(self) -> bool:
        """Consume an expiry: True if the timer had fired, False if it had not (a wake-up
        for a deadline that was moved since)."""
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def open_timerfd() -> TimerFd | None:
    """A :class:`TimerFd`, or ``None`` where the platform has none (the caller then uses
    trio's millisecond deadlines)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return TimerFd()
    except (OSError, AttributeError):
        return None
