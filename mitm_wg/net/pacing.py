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

A release of 1 ms of the rate costs a CPU-bound Python sender one wake-up per millisecond,
and a receiver that reads in batches (wireguard-go with UDP GRO, Linux with TSO/GRO) gets
runs of that size. Bigger releases cost less per byte on both ends, but a receiver with a
shallow socket buffer and no batching (wireguard-go before 2023: ~208 KiB, one datagram per
read) drops their tails. So the controller may grow the release span a millisecond at a
time up to :data:`RELEASE_TIME_MAX`, only while the path shows no loss from it
(:class:`ReleaseSpan`, fed per round trip by BBR): every :data:`SPAN_WINDOW_ROUNDS` rounds
the share of the data lost is compared with the share lost at the base span (a moving
average of its windows); more than twice that (and at least :data:`SPAN_LOSS_MARGIN`
more) takes a step back, and the next step up waits twice as many windows as the last
failed one did (up to :data:`SPAN_HOLD_MAX`). Random loss of the path is the same at every
span and does not hold it back, but a path that loses over :data:`SPAN_BASE_LOSS_MAX` at
the base span already (its queue or socket buffer overflows at Linux's size) never grows
it. An RTO takes it back to the base span.
"""

from __future__ import annotations

__all__ = ["BURST_MIN", "BURST_TIME", "RELEASE_TIME_MAX", "Pacer", "ReleaseSpan", "burst_bytes"]

#: Smallest burst allowance in bytes (one maximal TSO/GSO frame in Linux).
BURST_MIN = 64 * 1024
#: Burst allowance in seconds of the pacing rate (Linux: sk_pacing_shift = 10, ~1 ms).
BURST_TIME = 0.001
#: The largest release span :class:`ReleaseSpan` grows to (seconds of the rate), and its step
RELEASE_TIME_MAX = 0.003
SPAN_STEP = 0.001
#: Rounds per loss measurement of :class:`ReleaseSpan`
SPAN_WINDOW_ROUNDS = 16
#: A window at a grown span fails when its loss share exceeds the base span's by more than
#: the base share itself and by more than this
SPAN_LOSS_MARGIN = 0.01
#: No step up while the base span loses more than this share: a path that loses that much
#: at Linux's release size has a queue or socket buffer that overflows already
SPAN_BASE_LOSS_MAX = 0.05
#: Weight of a new window in the base span's moving average of loss shares
SPAN_BASE_GAIN = 0.25
#: The most windows a failed step up makes the next one wait
SPAN_HOLD_MAX = 64
_SPAN_STEPS_MAX = round((RELEASE_TIME_MAX - BURST_TIME) / SPAN_STEP)


def burst_bytes(rate: float, span: float = BURST_TIME) -> float:
    """The burst allowance at ``rate`` bytes/s: max(BURST_MIN, span * rate)."""
    b = rate * span
    return b if b > BURST_MIN else BURST_MIN


class ReleaseSpan:
    """How many seconds of the pacing rate one release may hold: :data:`BURST_TIME`, grown
    by :data:`SPAN_STEP` per window of rounds in which the path lost no more than at the
    base span, up to :data:`RELEASE_TIME_MAX` (see the module docstring). Sans-IO: fed by
    the controller at each round's end with what the round delivered and lost."""

    __slots__ = (
        "_baseline",
        "_delivered",
        "_fails",
        "_hold",
        "_lost",
        "_rounds",
        "steps",
        "time",
    )

    def __init__(self) -> None:
        self.steps = 0  # steps above the base span
        self.time = BURST_TIME
        # loss share at the base span (moving average of its windows; None: not measured)
        self._baseline: float | None = None
        self._delivered = 0
        self._lost = 0
        self._rounds = 0
        self._fails = 0  # failed steps up since the span last held its maximum
        self._hold = 0  # windows to wait before the next step up

    def on_round(self, delivered: int, lost: int) -> None:
        """A round trip ended that delivered ``delivered`` and lost ``lost`` bytes."""
        self._delivered += delivered
        self._lost += lost
        self._rounds += 1
        if self._rounds < SPAN_WINDOW_ROUNDS:
            return
        total = self._delivered + self._lost
        share = self._lost / total if total > 0 else 0.0
        self._delivered = self._lost = self._rounds = 0
        base = self._baseline
        if not self.steps:
            # the path's own loss at the base span: a moving average over its windows
            base = share if base is None else base + (share - base) * SPAN_BASE_GAIN
            self._baseline = base
        else:
            assert base is not None  # (the span grows only after a window at the base)
            if share > base + (base if base > SPAN_LOSS_MARGIN else SPAN_LOSS_MARGIN):
                self._set(self.steps - 1)  # the bigger releases lose: one step back
                self._failed()
                return
            if self.steps >= _SPAN_STEPS_MAX:
                self._fails = 0  # a clean window at the top: the next failure waits 2
        if self._hold:
            self._hold -= 1
        elif self.steps < _SPAN_STEPS_MAX and base <= SPAN_BASE_LOSS_MAX:
            self._set(self.steps + 1)

    def on_timeout(self) -> None:
        """A retransmission timeout: back to the base span, as after a failed window."""
        self._set(0)
        self._delivered = self._lost = self._rounds = 0
        self._failed()

    def _set(self, steps: int) -> None:
        self.steps = steps
        self.time = BURST_TIME + steps * SPAN_STEP

    def _failed(self) -> None:
        if self._fails < 6:
            self._fails += 1
        hold = 1 << self._fails
        self._hold = hold if hold < SPAN_HOLD_MAX else SPAN_HOLD_MAX


class Pacer:
    """Token bucket in bytes (see the module docstring). ``rate`` 0: unpaced."""

    __slots__ = ("burst", "rate", "span", "stamp", "tokens")

    def __init__(self) -> None:
        self.rate = 0.0  # bytes per second; 0 = no pacing
        self.span = BURST_TIME  # seconds of the rate per release
        self.burst = float(BURST_MIN)  # bucket depth
        self.tokens = float(BURST_MIN)  # credit in bytes (negative: a deficit)
        self.stamp = 0.0  # when ``tokens`` was last brought up to date

    def budget(self, now: float, rate: float, span: float = BURST_TIME) -> float:
        """Set the rate and the release span (seconds of the rate per release, see
        :class:`ReleaseSpan`), accrue credit up to ``now``, and return how many bytes may
        leave now (``inf`` when unpaced). The rate applies from ``now`` on (the credit
        since the last call accrues at the old one)."""
        old = self.rate
        tokens = self.tokens
        if old > 0.0:
            elapsed = now - self.stamp
            if elapsed > 0.0:
                tokens += elapsed * old
        if rate != old or span != self.span:
            self.rate = rate
            self.span = span
            self.burst = burst_bytes(rate, span)
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
        quantum of ``min_quantum`` (two segments, say) or the release span of the rate,
        whichever is larger — one wake-up per quantum, not per segment."""
        rate = self.rate
        tokens = self.tokens
        if rate <= 0.0 or tokens >= 1.0:  # (budget() hands out whole bytes)
            return self.stamp
        q = rate * self.span
        if q < min_quantum:
            q = min_quantum
        if q > self.burst:
            q = self.burst
        return self.stamp + (q - tokens) / rate
