"""Send pacing for :class:`~mitm_wg.net.tcp.TcpSocket` (sans-IO).

A sender that emits its whole congestion window at once puts a line-rate burst of up to
cwnd bytes on the path; a queue that is shallower than the burst (a bottleneck router, or
the receive buffer of a userspace WireGuard peer: wireguard-go reads with the kernel's
default ~208 KiB) drops its tail, and a loss-based controller then halves. Pacing spreads
the window over the round trip instead (Linux: ``sk_pacing_rate`` and the TCP internal
pacing of tcp_output.c; BBR, draft-cardwell-iccrg-bbr-congestion-control §4.2.1).

This pacer is a token bucket: credit accrues at ``rate`` bytes per second up to a burst
allowance, data segments may leave while the credit is positive (the last one may overdraw
it by less than a segment: the deficit carries over), and when it is exhausted the socket
asks again at :meth:`Pacer.next_time` — the deadline its ``poll_at`` hands to the runtime.

The burst allowance is what keeps pacing cheap: every release costs a timer wake-up and a
``dispatch``, so releases come in quanta of :data:`BURST_MIN` (64 KiB) or
:data:`BURST_TIME` (1 ms) of the rate, whichever is larger, like Linux's TSO autosizing
(``tcp_tso_autosize``: ~1 ms of the pacing rate per TSO frame, with two frames allowed
back to back). A CPU-bound sender at 1 ms RTT is then never held back: its rate allows far
more than it can produce, and a quantum is handed out per wake-up, not per segment.

Rates come from the congestion controller (``pacing_rate``); 0 means "unpaced" (no RTT
sample yet, as Linux before its first one).
"""

from __future__ import annotations

__all__ = ["BURST_MIN", "BURST_TIME", "Pacer", "burst_bytes"]

#: Smallest burst allowance in bytes (one maximal TSO/GSO frame in Linux).
BURST_MIN = 64 * 1024
#: Burst allowance in seconds of the pacing rate (Linux: sk_pacing_shift = 10, ~1 ms).
BURST_TIME = 0.001


def burst_bytes(rate: float) -> float:
    """The burst allowance at ``rate`` bytes/s: max(BURST_MIN, BURST_TIME * rate)."""
    b = rate * BURST_TIME
    return b if b > BURST_MIN else BURST_MIN


class Pacer:
    """Token bucket in bytes (see the module docstring). ``rate`` 0: unpaced."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self) -> None:
        self.rate = 0.0  # bytes per second; 0 = no pacing
        self.burst = float(BURST_MIN)  # bucket depth
        self.tokens = float(BURST_MIN)  # credit in bytes (negative: a deficit)
        self.stamp = 0.0  # when ``tokens`` was last brought up to date

    def budget(self, now: float, rate: float) -> float:
        """Set the rate, accrue credit up to ``now``, and return how many bytes may leave
        now (``inf`` when unpaced). The rate applies from ``now`` on (the credit since the
        last call accrues at the old one)."""
        old = self.rate
        tokens = self.tokens
        if old > 0.0:
            elapsed = now - self.stamp
            if elapsed > 0.0:
                tokens += elapsed * old
        if rate != old:
            self.rate = rate
            b = rate * BURST_TIME
            self.burst = b if b > BURST_MIN else BURST_MIN
        self.stamp = now
        burst = self.burst
        if tokens > burst:
            tokens = burst
        self.tokens = tokens
        if rate <= 0.0:
            return float("inf")
        return int(tokens)  # whole bytes: a float hair above a segment boundary is none

    def on_sent(self, nbytes: int) -> None:
        """``nbytes`` of data left (after :meth:`budget` for the same ``now``)."""
        if self.rate > 0.0:
            self.tokens -= nbytes

    def next_time(self, min_quantum: float) -> float:
        """When to release the next data: ``stamp`` (the last :meth:`budget` call's now)
        while there is credit or pacing is off; else when the credit reaches a release
        quantum of ``min_quantum`` (two segments, say) or BURST_TIME of the rate,
        whichever is larger — one wake-up per quantum, not per segment."""
        rate = self.rate
        tokens = self.tokens
        if rate <= 0.0 or tokens >= 1.0:  # (budget() hands out whole bytes)
            return self.stamp
        q = rate * BURST_TIME
        if q < min_quantum:
            q = min_quantum
        if q > self.burst:
            q = self.burst
        return self.stamp + (q - tokens) / rate
