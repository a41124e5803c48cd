"""Receive coalescing: a busy stream's next read waits a moment, so that one wake-up of the
reader takes several datagrams (what a NIC's interrupt moderation, or Linux's
``gro_flush_timeout``, does for the kernel).

Every wake-up of the runtime's UDP reader costs CPU beyond the datagrams it handles: trio's
run loop, ``epoll``, the task switches, and caches gone cold since the last one. Measured on
the 2-core development VM, a bare trio loop waking for one datagram at a time costs 50–80
µs per wake-up, a bare ``epoll`` loop 16–30. A download arriving at 12.5 MB/s (a datagram
every ~110 µs: a 100 Mbit/s line) woke the reader for one to five datagrams each time, and
our thread spent ~70 ms of CPU per MiB, against ~12 ms in the lab's 1 ms path, where the
datagrams come in GRO runs of dozens.

The rule (:meth:`ReadHold.after`), applied after each wake-up has handled its datagrams: if
the datagrams arrive fast enough that at least :data:`HOLD_GATHER` more would come during
``delay`` (the ``count`` of this wake-up over the time since the previous one that found
any), the reader waits ``delay`` before reading again instead of waiting for the socket;
otherwise it waits for the socket as before. So the first datagram after a pause is read at
once (the previous wake-up was long ago), and a held datagram waits at most ``delay``.

``delay`` (:meth:`ReadHold.for_rtt`) is 1/64 of the shortest smoothed RTT of the tunnel's
open TCP connections (a hold delays what each of them receives, so the nearest server
bounds it; the runtime looks it up every :data:`HOLD_REFRESH` seconds), at most
:data:`HOLD_MAX`; below :data:`HOLD_MIN` (a server under ~6 ms away) it is 0 and nothing
is held: there a wait would be a noticeable share of the round trip, and a fast path fills
each wake-up by itself. Nor is anything held while no connection has an RTT (UDP flows
alone). A held datagram, and the ACK it brings about, so comes at most 1/64 of the round
trip later (0.5 ms at 32 ms or more). (Not the handshake's round trip to the peer: on the
lab's 1 ms path the first handshake took 4.6–9 ms.)

Pure logic: ``now`` and counts in, a delay out; the runtime (tunnel.py) sleeps it on a
timerfd (precise to the kernel's timer slack; trio's own deadlines wake up to ~1 ms late,
so without a timerfd nothing is held).
"""

from __future__ import annotations

__all__ = ["HOLD_GATHER", "HOLD_MAX", "HOLD_MIN", "HOLD_REFRESH", "HOLD_SHARE", "ReadHold"]

#: The longest a read is held, seconds.
HOLD_MAX = 0.0005
#: A hold shorter than this is not worth its own wake-up (a timerfd, trio's run loop).
HOLD_MIN = 0.0001
#: The share of the shortest connection RTT a read may be held.
HOLD_SHARE = 1 / 64
#: Hold only when at least this many datagrams are expected to come meanwhile.
HOLD_GATHER = 2
#: How often the runtime looks up the shortest RTT again, seconds.
HOLD_REFRESH = 0.25


class ReadHold:
    """The hold rule of one reader (module docstring); the hold itself
    (:meth:`for_rtt`) is the tunnel's, passed in."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = float("-inf")  # the previous wake-up that found datagrams

    @staticmethod
    def for_rtt(rtt: float | None) -> float:
        """The hold for a shortest connection RTT of ``rtt`` seconds (None: unknown)."""
        if rtt is None:
            return 0.0
        delay = min(HOLD_MAX, rtt * HOLD_SHARE)
        return delay if delay >= HOLD_MIN else 0.0

    def after(self, now: float, count: int, delay: float) -> float:
        """A wake-up at ``now`` handled ``count`` datagrams, the hold being ``delay`` (0:
        none): how long to wait before the next read (0: until the socket has one)."""
        if count <= 0:
            return 0.0  # (a pause: the next datagram is the first of a run again)
        last = self._last
        self._last = now
        # count / (now - last) datagrams per second, times delay, at least HOLD_GATHER
        if delay and count * delay >= HOLD_GATHER * (now - last):
            return delay
        return 0.0
