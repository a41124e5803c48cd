"""HyStart++ (RFC 9406): when a loss-based controller (NewReno, CUBIC) leaves its initial
slow start.

Plain slow start doubles the window every round trip until something is lost. Where the
bottleneck's queue is shorter than the window's last doubling, that first loss is a burst
of hundreds of segments in one round trip; HyStart++ watches the round trip time instead:
once a round's smallest RTT sample has risen by a threshold over the previous round's (the
queue is building), slow start gives way to Conservative Slow Start (CSS, growth at a
quarter of the rate), which either proves the rise a false alarm (the RTT falls back below
the baseline: slow start resumes) or, after ``CSS_ROUNDS`` rounds, ends in congestion
avoidance with ssthresh = cwnd.

Sans-IO like the controllers: the socket hands :meth:`HyStart.on_ack` the bytes an ACK
newly acknowledged, that ACK's RTT sample (None without one), SND.UNA and SND.NXT (rounds
are delimited as in §4.2: a round ends when SND.UNA reaches the SND.NXT recorded at its
start). Used for the initial slow start only (§4.3's recommendation): any loss, and any
timeout, ends it for the connection (:class:`~mitm_wg.net.congestion.NewReno` drops it).

Deviation, none of substance: RTT samples come from TCP timestamps, which tick in whole
milliseconds here; MIN_RTT_THRESH (4 ms) is four ticks, so a tick's rounding never looks
like a queue.
"""

from __future__ import annotations

__all__ = [
    "CSS_GROWTH_DIVISOR",
    "CSS_ROUNDS",
    "MAX_RTT_THRESH",
    "MIN_RTT_DIVISOR",
    "MIN_RTT_THRESH",
    "NON_PACED_L",
    "N_RTT_SAMPLE",
    "HyStart",
]

# RFC 9406 §4.3's constants
MIN_RTT_THRESH = 0.004
MAX_RTT_THRESH = 0.016
MIN_RTT_DIVISOR = 8
N_RTT_SAMPLE = 8
CSS_GROWTH_DIVISOR = 4
CSS_ROUNDS = 5
#: L, the most SMSS one ACK may grow the window by, for an unpaced sender (a paced one:
#: unlimited, §4.3, as pacing spreads the window's growth anyway)
NON_PACED_L = 8

_INF = float("inf")


class HyStart:
    """RFC 9406 §4.2 for one connection's initial slow start.

    ``in_css``: in Conservative Slow Start. ``done``: CSS ran its ``CSS_ROUNDS`` rounds;
    the controller enters congestion avoidance (ssthresh = cwnd) and drops this object.
    """

    __slots__ = (
        "_css_baseline",
        "_css_rounds",
        "_current_min",
        "_last_min",
        "_limit",
        "_samples",
        "_window_end",
        "done",
    )

    def __init__(self, paced: bool) -> None:
        self._limit = 0 if paced else NON_PACED_L  # 0: unlimited
        self._last_min = _INF  # lastRoundMinRTT
        self._current_min = _INF  # currentRoundMinRTT
        self._samples = 0  # rttSampleCount
        self._window_end: int | None = None  # windowEnd: SND.NXT when this round began
        self._css_baseline = _INF  # cssBaselineMinRtt (finite exactly while in CSS)
        self._css_rounds = 0  # rounds begun in CSS
        self.done = False

    @property
    def in_css(self) -> bool:
        """In Conservative Slow Start (it has a baseline)."""
        return self._css_baseline != _INF

    def __repr__(self) -> str:
        phase = "done" if self.done else "css" if self.in_css else "slow start"
        return f"<HyStart {phase} last_min={self._last_min} current_min={self._current_min}>"

    def on_ack(self, acked: int, smss: int, rtt: float | None, una: int, nxt: int) -> int:
        """An ACK in slow start or CSS newly acknowledged ``acked`` bytes (``rtt``: its
        RTT sample, or None; ``una``/``nxt``: SND.UNA after it and SND.NXT). Returns the
        bytes cwnd grows by; check :attr:`done` after (the ACK that ends CSS's last round
        grows nothing: from the next one on, congestion avoidance grows the window)."""
        end = self._window_end
        if end is None or una >= end:
            # a round begins (§4.2): its SND.NXT marks where it ends
            if self._css_baseline != _INF and end is not None:
                self._css_rounds += 1
                if self._css_rounds >= CSS_ROUNDS:
                    self.done = True
                    return 0
            self._last_min = self._current_min
            self._current_min = _INF
            self._samples = 0
            self._window_end = nxt
        limit = self._limit
        grow = acked if not limit or acked < limit * smss else limit * smss
        if rtt is not None:
            if rtt < self._current_min:
                self._current_min = rtt
            self._samples += 1
        if self._css_baseline != _INF:  # in CSS
            grow //= CSS_GROWTH_DIVISOR
            if self._samples >= N_RTT_SAMPLE and self._current_min < self._css_baseline:
                # the rise was jitter, not a queue: back to slow start
                self._css_baseline = _INF
        elif (
            self._samples >= N_RTT_SAMPLE
            and self._current_min != _INF
            and self._last_min != _INF
            and self._current_min
            >= self._last_min
            + max(MIN_RTT_THRESH, min(self._last_min / MIN_RTT_DIVISOR, MAX_RTT_THRESH))
        ):
            # the queue is building: Conservative Slow Start from the next ACK on
            self._css_baseline = self._current_min
            self._css_rounds = 0
        return grow
