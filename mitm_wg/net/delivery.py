"""Delivery-rate estimation (draft-cheng-iccrg-delivery-rate-estimation-02), sans-IO.

The connection counts the bytes delivered (cumulatively ACKed or SACKed) and when; each
transmission records that state as it was when the data left (``P.delivered``,
``P.delivered_time``, ``P.first_sent_time``, ``P.is_app_limited``, ``P.sent_time``). When an
ACK delivers data, the most recently sent of the newly delivered transmissions gives the
rate sample: the bytes delivered since it left, over the longer of its send interval and its
ACK interval (§3.3).

Data leaves in batches (one ``dispatch`` call = one clock reading, and no ACK is processed
in between), and every segment of a batch carries identical state, so the records are kept
per batch, not per segment: ``[start, end, sent_time, delivered, delivered_time,
first_sent_time, app_limited, is_retransmission, order]``, ``order`` counting the records
in the order they were made. New data leaves in sequence order, so its records, in send
order, are in sequence order too, and the newest one overlapping a delivered range is found
by bisection (an ACK under loss SACKs data sent a flight ago: a scan from the tail would
pass every record sent since); retransmissions have a short list of their own, in send
order, scanned from its tail; ``order`` says which of the two candidates left last.
"""

from __future__ import annotations

from bisect import bisect_left
from operator import itemgetter

__all__ = ["DeliveryRate", "RateSample"]

# record fields
_S, _E, _SENT, _DEL, _DEL_T, _FIRST, _APP, _RXT, _ORD = range(9)
_start = itemgetter(_S)


class RateSample:
    """The last rate sample (draft §3.1 ``rs``); ``interval`` <= 0: no valid sample."""

    __slots__ = ("delivered", "interval", "is_app_limited", "losses", "prior_delivered", "rtt")

    def __init__(self) -> None:
        self.delivered = 0  # bytes delivered over the interval
        self.interval = 0.0  # seconds
        self.is_app_limited = False
        self.prior_delivered = 0  # C.delivered when the sampled data left
        self.rtt = -1.0  # send-to-ACK time of the sampled data (-1: a retransmission)
        self.losses = 0  # bytes deemed lost since the previous sample (Linux rs->losses)

    @property
    def rate(self) -> float:
        """Delivery rate in bytes per second (0 without a valid sample)."""
        return self.delivered / self.interval if self.interval > 0 else 0.0


class DeliveryRate:
    """Per-connection delivery-rate state (draft §3.1 ``C.*``) and the send records."""

    __slots__ = (
        "app_limited",
        "delivered",
        "delivered_time",
        "first_sent_time",
        "invalid_below",
        "lost",
        "order",
        "records",
        "rxt",
        "sample",
    )

    def __init__(self, now: float) -> None:
        self.delivered = 0  # C.delivered (bytes)
        self.delivered_time = now  # C.delivered_time
        self.first_sent_time = now  # C.first_sent_time
        self.app_limited = 0  # C.app_limited: 0, or the C.delivered mark where it ends
        self.lost = 0  # bytes newly deemed lost since the last sample (the socket adds)
        self.invalid_below = 0  # no rate from data below this (sent before an RTO)
        self.records: list[list] = []  # new data's, in sequence (= send) order
        self.rxt: list[list] = []  # retransmissions', in send order
        self.order = 0  # the next record's ``order``
        self.sample = RateSample()

    def on_send(self, s: int, e: int, now: float, inflight: int, rexmit: bool) -> None:
        """Draft §3.2 "upon transmitting": ``[s, e)`` leaves at ``now`` with ``inflight``
        bytes already in flight before it."""
        if inflight <= 0:
            # §3.2: nothing in flight: the send and ACK intervals start afresh
            self.first_sent_time = now
            self.delivered_time = now
        recs = self.rxt if rexmit else self.records
        order = self.order
        if recs:
            last = recs[-1]
            if last[_SENT] == now and last[_E] == s and last[_ORD] == order - 1:
                last[_E] = e  # the batch grows (same clock reading, nothing sent between)
                return
        self.order = order + 1
        recs.append(
            [s, e, now, self.delivered, self.delivered_time, self.first_sent_time,
             self.app_limited != 0, rexmit, order]
        )  # fmt: skip

    def on_app_limited(self, inflight: int) -> None:
        """Draft §3.4: the sender has nothing more to send and the window is not full: the
        samples until what is in flight now is delivered are app-limited."""
        mark = self.delivered + inflight
        self.app_limited = mark if mark > 0 else 1

    def on_ack(
        self,
        una: int,
        delivered: int,
        ranges: list[tuple[int, int]],
        now: float,
    ) -> RateSample | None:
        """An ACK newly delivered ``delivered`` bytes, in ``ranges`` (cumulative advance
        and new SACK blocks); ``una`` is SND.UNA after it. Returns the rate sample (§3.3),
        or None when there is none."""
        recs = self.records
        best = None
        if delivered > 0:
            # the newest new-data record overlapping a range: the last one starting below
            # its end, if it ends above its start (the records tile the sequence space)
            top = -1
            for s, e in ranges:
                i = bisect_left(recs, e, key=_start) - 1
                if i > top and recs[i][_E] > s:
                    top = i
            if top >= 0:
                best = recs[top]
            best = self._newest_rxt(best, ranges)
        self._trim(una)
        if delivered <= 0:
            return None
        return self._sample(best, delivered, now)

    def on_ack_cumulative(self, una_before: int, una: int, now: float) -> RateSample | None:
        """:meth:`on_ack` for the common ACK that only advances SND.UNA (no SACK blocks, no
        scoreboard): the newest delivered new-data record is the last whose start is below
        ``una``, found from the head, dropping the fully delivered ones on the way
        (amortized O(1))."""
        recs = self.records
        best = None
        i = 0
        n = len(recs)
        while i < n and recs[i][_E] <= una:
            i += 1
        if i < n and recs[i][_S] < una:
            best = recs[i]
        elif i:
            best = recs[i - 1]
        if i:
            del recs[:i]
        if self.rxt:
            best = self._newest_rxt(best, [(una_before, una)])
            self._trim(una)
        return self._sample(best, una - una_before, now)

    def _newest_rxt(self, best: list | None, ranges: list[tuple[int, int]]) -> list | None:
        """The newest retransmission record overlapping a range if it left after ``best``,
        else ``best``."""
        after = -1 if best is None else best[_ORD]
        rxt = self.rxt
        for i in range(len(rxt) - 1, -1, -1):
            r = rxt[i]
            if r[_ORD] < after:
                break
            rs_, re_ = r[_S], r[_E]
            for s, e in ranges:
                if rs_ < e and s < re_:
                    return r
        return best

    def _trim(self, una: int) -> None:
        """Drop the records wholly below ``una`` from the heads of the two lists (one
        wholly below it deeper in the retransmissions' list overlaps no later range)."""
        for recs in (self.records, self.rxt):
            if recs and recs[0][_E] <= una:
                i = 1
                n = len(recs)
                while i < n and recs[i][_E] <= una:
                    i += 1
                del recs[:i]

    def _sample(self, best: list | None, delivered: int, now: float) -> RateSample | None:
        """Draft §3.3 UpdateRateSample + GenerateRateSample for the newest delivered record."""
        self.delivered += delivered
        self.delivered_time = now
        if self.app_limited and self.delivered > self.app_limited:
            self.app_limited = 0
        if best is None:
            return None
        rs = self.sample
        rs.losses = self.lost
        self.lost = 0
        rs.prior_delivered = best[_DEL]
        rs.is_app_limited = best[_APP]
        send_elapsed = best[_SENT] - best[_FIRST]
        ack_elapsed = now - best[_DEL_T]
        self.first_sent_time = best[_SENT]
        rs.delivered = self.delivered - best[_DEL]
        # §3.3: the longer of the two intervals, so that neither ACK compression nor a
        # send burst inflates the rate
        rs.interval = send_elapsed if send_elapsed > ack_elapsed else ack_elapsed
        if best[_E] <= self.invalid_below:
            rs.interval = 0.0  # see on_retransmit_all
        rs.rtt = -1.0 if best[_RXT] else now - best[_SENT]
        return rs

    def on_retransmit_all(self, snd_max: int) -> None:
        """After an RTO everything outstanding (below ``snd_max``) will go again: the old
        records go, and the samples from that data give no rate: one cumulative ACK may
        then cover megabytes the peer had long held (the SACK scoreboard may be gone),
        which over the interval since the retransmission is no delivery rate at all."""
        self.records.clear()
        self.rxt.clear()
        self.invalid_below = snd_max
