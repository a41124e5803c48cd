"""Time-based loss recovery state for :class:`~mitm_wg.net.tcp.TcpSocket` (sans-IO).

* RACK-TLP (RFC 8985): a segment is lost when a segment sent *later* has been delivered
  (cumulatively ACKed or SACKed) and more than ``RACK.rtt + reo_wnd`` has passed since it
  was sent; the reordering window adapts to DSACKs; a tail loss probe (TLP) after
  ``PTO = 2*SRTT`` makes the receiver send the SACKs that RACK needs instead of waiting
  for the RTO.
* PRR (RFC 6937): during fast recovery the sending rate follows the delivery rate so that
  cwnd reaches ssthresh smoothly at the end of recovery (``prr_delivered``/``prr_out``,
  reduction bound PRR-SSRB).

The socket keeps the SACK scoreboard (ranges, RFC 6675); this module keeps what RACK needs
on top: the send times. Data is sent in batches (one ``dispatch`` = one clock reading), so
the transmission times are kept per batch, not per segment:

* ``sent``: ``[end, time]`` of original transmissions in sequence (= time) order; an entry
  covers ``[previous end, end)``;
* ``rxt``: ``[start, end, time]`` of retransmissions in time order (RFC 8985 §5.2: the
  "time-ordered" list; a retransmission moves a range to the tail).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from operator import itemgetter
from typing import TYPE_CHECKING

from mitm_wg.net.tcp_state import _SEND_STATES
from mitm_wg.net.tcp_wire import HALF as _HALF
from mitm_wg.net.tcp_wire import M32
from mitm_wg.net.tcp_wire import unwrap as _unwrap

if TYPE_CHECKING:
    from mitm_wg.net.tcp_wire import TcpSegment

__all__ = ["PTO_FLOOR", "TIMER_PTO", "TIMER_REO", "WC_DEL_ACK_T", "Rack", "Scoreboard"]

#: RFC 8985 §7.2: worst-case delayed-ACK time added when a single segment is in flight.
WC_DEL_ACK_T = 0.2
#: Lower bound of the PTO, for the timer granularity of a shared runtime (Linux adds
#: TCP_TIMEOUT_MIN, 2 ms, for the same reason).
PTO_FLOOR = 0.01
TIMER_PTO = 1
TIMER_REO = 2


#: bisect key of a scoreboard range ``[start, end]``: its end
_END: Callable[[list[int]], int] = itemgetter(1)
#: bisect keys of a ``Rack.sent`` entry ``[end, time]``
_SENT_END: Callable[[list[float]], float] = itemgetter(0)
_SENT_TIME: Callable[[list[float]], float] = itemgetter(1)


def _sent_after(t1: float, e1: int, t2: float, e2: int) -> bool:
    """RFC 8985 §6.2 RACK_sent_after(): (t1, e1) was sent after (t2, e2)."""
    return t1 > t2 or (t1 == t2 and e1 > e2)


class Rack:
    """RACK-TLP and PRR state of one connection (see the module docstring)."""

    __slots__ = (
        "dsack_round",
        "dsack_segs",
        "edge",
        "end_seq",
        "fack",
        "min_rtt",
        "probe_t",
        "prr_delivered",
        "prr_out",
        "recover_fs",
        "reo_wnd_mult",
        "reo_wnd_persist",
        "reordering_seen",
        "rtt",
        "rxt",
        "sent",
        "timer",
        "tlp_end",
        "tlp_is_retrans",
        "xmit_ts",
    )

    def __init__(self) -> None:
        self.sent: list[list[float]] = []  # [end, time] (end is an int)
        self.rxt: list[list[float]] = []  # [start, end, time]
        # RFC 8985 §6.1 per-connection state
        self.xmit_ts: float | None = None  # RACK.xmit_ts
        self.end_seq = 0  # RACK.end_seq
        self.rtt = 0.0  # RACK.rtt
        self.min_rtt: float | None = None  # RACK.min_RTT
        self.fack = 0  # RACK.fack: highest end delivered
        self.reordering_seen = False
        self.reo_wnd_mult = 1
        self.reo_wnd_persist = 0
        self.dsack_round: int | None = None
        self.dsack_segs = 0  # segments DSACKed so far (compared with our retransmissions)
        self.edge = 0  # originals below this (unless SACKed) are lost: RACK's IsLost
        self.timer = 0  # what the socket's recovery timer is armed for (0/PTO/REO)
        self.tlp_end: int | None = None  # TLP.end_seq
        self.tlp_is_retrans = False
        #: when the last probe that resent data went (TLP's, or in this recovery
        #: episode rule rec-probe's; None: rec-probe has not probed in this episode)
        self.probe_t: float | None = None
        # RFC 6937 §3
        self.prr_delivered = 0
        self.prr_out = 0
        self.recover_fs = 0

    # -- send log -----------------------------------------------------------------------
    def on_send(self, s: int, e: int, now: float, rexmit: bool, una: int) -> None:
        """Record a transmission of ``[s, e)`` at ``now`` (RFC 8985 §5.2 Segment.xmit_ts)."""
        # rule: rack-xmit-ts
        if rexmit:
            rxt = self.rxt
            if rxt:
                last = rxt[-1]
                if last[2] == now and last[1] == s:
                    last[1] = e
                    return
                if rxt[0][1] <= una:
                    self.rxt = rxt = [r for r in rxt if r[1] > una]
            rxt.append([s, e, now])
            return
        sent = self.sent
        if sent:
            last = sent[-1]
            if last[1] >= now:
                # the same clock reading; or a clock that went back: the log's times must
                # increase (detect() bisects them), so the batch counts as sent at the later
                # time, the conservative side for loss detection
                last[0] = e
                return
        sent.append([e, now])
        if not len(sent) & 63:
            self.trim(una)  # amortized: once per 64 batches

    def trim(self, una: int) -> None:
        sent = self.sent
        i = 0
        n = len(sent)
        while i < n and sent[i][0] <= una:
            i += 1
        if i:
            del sent[:i]
        if self.rxt and self.rxt[0][1] <= una:
            self.rxt = [r for r in self.rxt if r[1] > una]

    def clear(self) -> None:
        """After an RTO: everything outstanding goes again; forget the old send times."""
        self.rxt.clear()
        self.tlp_end = None
        self.edge = 0
        self.timer = 0

    def _orig_time(self, seq: int) -> float | None:
        """Send time of the original transmission of byte ``seq``."""
        sent = self.sent
        i = bisect.bisect_right(sent, seq, key=_SENT_END)
        return sent[i][1] if i < len(sent) else None

    # -- RFC 8985 §6.2 steps 1-3: on each ACK --------------------------------------------
    def on_ack(
        self,
        una_before: int,
        ack: int,
        new_sacked: list[tuple[int, int]],
        sacked: list[list[int]],
        tsecr: int | None,
        ts_offset: int,
        now: float,
    ) -> None:
        """Update RACK.xmit_ts/end_seq/rtt/min_RTT and reordering_seen from the data this
        ACK newly delivered: ``[una_before, ack)`` and ``new_sacked``."""
        best_t: float | None = None
        best_e = 0
        fack = self.fack
        # retransmissions this ACK delivers
        rxt = self.rxt
        keep = []
        for r in rxt:
            s, e, t = int(r[0]), int(r[1]), r[2]
            if e <= ack or _covered(sacked, s, e):
                # RFC 8985 §6.2 step 2: skip an ambiguous delivery of a retransmission —
                # it came back faster than min_RTT, or the timestamp echo predates it.
                # Both: an echo in whole milliseconds passes for the original's ACK
                # on a path of ~1 ms, and one such RACK.rtt of microseconds marks all
                # that is in flight lost at once. Except for a probe (TLP's, or rule
                # rec-probe's): it went a PTO after the last delivery, the original long
                # gone; when the queue that set min_RTT has drained since (a whole
                # flight lost), it comes back sooner, and ignored, RACK would learn
                # nothing from it and the RTO would follow. Nor does the echo speak
                # against a probe this ACK SACKs (TLP's, above the hole): a receiver
                # takes TS.Recent from what arrives at its left edge (RFC 7323 §4.3), so
                # it echoes an older segment's TSval whoever sent the probe. (For every
                # SACKed retransmission, as Linux's tcp_rack_advance, which has no echo
                # test: in the simulator 25 % more retransmissions, most of them
                # D-SACKed, for 4 % less time; not taken.)
                mr = self.min_rtt
                probe = t == self.probe_t
                ok = mr is None or now - t >= mr or probe
                if ok and tsecr is not None and (e <= ack or not probe):
                    ok = (
                        tsecr - ((int(t * 1000) + ts_offset) & M32)
                    ) & M32 < _HALF  # copy of rule ts-val
                if ok and (best_t is None or _sent_after(t, e, best_t, best_e)):
                    best_t, best_e = t, e
            else:
                keep.append(r)
        if len(keep) != len(rxt):
            self.rxt = keep
        # the highest newly delivered original, unless it was retransmitted
        hi = ack if ack > una_before else 0
        for s, e in new_sacked:
            if e > hi:
                hi = e
            # step 3: an original delivered below RACK.fack arrived out of order
            if e < fack and not _overlaps(rxt, s, e):
                self.reordering_seen = True
        # the byte at the old SND.UNA was the hole (else the ACK would have been higher)
        if (
            ack > una_before
            and una_before < fack
            and not _overlaps(rxt, una_before, una_before + 1)
        ):
            self.reordering_seen = True
        if hi and not _overlaps(rxt, hi - 1, hi):
            t = self._orig_time(hi - 1)
            if t is not None and (best_t is None or _sent_after(t, hi, best_t, best_e)):
                best_t, best_e = t, hi
        if hi > fack:
            self.fack = hi
        if best_t is None:
            return
        rtt = now - best_t
        mr = self.min_rtt
        if mr is None or rtt < mr:
            self.min_rtt = rtt
        xts = self.xmit_ts
        if xts is None or _sent_after(best_t, best_e, xts, self.end_seq):
            self.rtt = rtt
            self.xmit_ts = best_t
            self.end_seq = best_e

    def on_dsack(self, snd_una: int, snd_nxt: int) -> None:
        """RFC 8985 §6.2 step 4 (RACK_update_reo_wnd): at most once per round trip, a DSACK
        widens the reordering window by min_RTT/4 and keeps it for 16 recoveries. It is not
        reordering seen (step 3 alone decides that): a DSACK also follows an RTO's
        go-back-N or a retransmission that only crossed the original, and with
        reordering_seen a loss would wait out the window in every later recovery."""
        if self.dsack_round is not None and snd_una >= self.dsack_round:
            self.dsack_round = None
        if self.dsack_round is None:
            self.dsack_round = snd_nxt
            self.reo_wnd_mult += 1
            self.reo_wnd_persist = 16

    def on_recovery_exit(self) -> None:
        """RFC 8985 §6.2 step 4: after 16 recoveries without DSACK, back to min_RTT/4."""
        if self.reo_wnd_persist > 0:
            self.reo_wnd_persist -= 1
            if self.reo_wnd_persist == 0:
                self.reo_wnd_mult = 1

    def reo_wnd(self, in_recovery: bool, sacked_bytes: int, smss: int, srtt: float) -> float:
        """RFC 8985 §6.2 step 4 RACK_update_reo_wnd() result."""
        if not self.reordering_seen and (in_recovery or sacked_bytes >= 3 * smss):
            return 0.0  # DupThresh (3) segments SACKed: behave like RFC 6675
        mr = self.min_rtt if self.min_rtt is not None else srtt
        w = self.reo_wnd_mult * mr / 4
        return w if w < srtt else srtt

    # -- RFC 8985 §6.2 step 5: detect losses ------------------------------------------------
    def detect(
        self, una: int, sacked: list[list[int]], reo_wnd: float, now: float
    ) -> tuple[int, list[tuple[int, int]], float]:
        """Returns (edge, lost retransmissions, timeout): original transmissions below
        ``edge`` are lost (unless SACKed); the listed retransmitted ranges are lost again;
        ``timeout`` > 0 is when (from now) to check again (the RACK reorder timer)."""
        xts = self.xmit_ts
        edge = una
        if xts is None:
            return edge, [], 0.0
        xend = self.end_seq
        thresh = self.rtt + reo_wnd
        timeout = 0.0
        sent = self.sent
        # The log is in sequence and time order, one entry per clock reading (the times
        # increase), so no walk is needed: the entries above SND.UNA sent by RACK.xmit_ts
        # are a slice (those up to SND.UNA wait for the amortized trim); the ones whose
        # time is up (t + thresh - now <= 0, monotone in t) are a prefix of it. The last
        # of that prefix gives the edge, the slice's last entry if its time is not up
        # the timeout (the latest such entry: RFC's max(remaining)).
        lo = bisect.bisect_right(sent, una, key=_SENT_END)
        hi = bisect.bisect_right(sent, xts, lo, key=_SENT_TIME)
        if lo < hi:
            k = bisect.bisect_right(sent, 0.0, lo, hi, key=lambda x: x[1] + thresh - now)
            if k > lo:
                end, t = sent[k - 1]
                # one batch (one clock reading) goes out in sequence order: of the batch
                # that holds RACK.end_seq, only the part below it was sent before
                edge = int(end) if t < xts or end <= xend else xend
            if k < hi:
                timeout = sent[hi - 1][1] + thresh - now
        relost: list[tuple[int, int]] = []
        if self.rxt:
            keep = []
            for r in self.rxt:
                s, e, t = int(r[0]), int(r[1]), r[2]
                if e <= una:
                    continue
                if not _sent_after(t, e, xts, xend):
                    remaining = t + thresh - now
                    if remaining <= 0:
                        if not _covered(sacked, max(s, una), e):
                            relost.append((max(s, una), e))
                        continue
                    if remaining > timeout:
                        timeout = remaining
                keep.append(r)
            self.rxt = keep
        return edge, relost, timeout

    # -- TLP (RFC 8985 §7.2) --------------------------------------------------------------
    @staticmethod
    def pto(srtt: float | None, one_segment: bool) -> float:
        """PTO = 2*SRTT, plus WCDelAckT with a single segment in flight; 1 s without SRTT."""
        # rule: pto (RFC 8985 §7.2)
        if srtt is None:
            return 1.0
        p = 2 * srtt
        if one_segment:
            p += WC_DEL_ACK_T
        return p if p > PTO_FLOOR else PTO_FLOOR

    # -- PRR (RFC 6937 §3) ---------------------------------------------------------------
    def prr_start(self, recover_fs: int) -> None:
        """Entering fast recovery: RecoverFS = snd.nxt - snd.una; counters to zero."""
        self.prr_delivered = 0
        self.prr_out = 0
        self.recover_fs = recover_fs if recover_fs > 0 else 1

    def prr_sndcnt(self, delivered: int, pipe: int, ssthresh: int, smss: int) -> int:
        """On an ACK during recovery: how many bytes may be sent now (RFC 6937 §3)."""
        self.prr_delivered += delivered
        if pipe > ssthresh:
            # proportional rate reduction
            sndcnt = math.ceil(self.prr_delivered * ssthresh / self.recover_fs) - self.prr_out
        else:
            # PRR-SSRB: slow start back up to ssthresh, at most MSS more than delivered
            limit = self.prr_delivered - self.prr_out
            if delivered > limit:
                limit = delivered
            limit += smss
            sndcnt = ssthresh - pipe
            if limit < sndcnt:
                sndcnt = limit
        return sndcnt if sndcnt > 0 else 0


def first_block_dsack(blocks: tuple[tuple[int, int], ...], base: int) -> tuple[int, int] | None:
    """RFC 2883 §4: the first SACK block (wire values) is a D-SACK when it lies below the
    cumulative ACK ``base`` or inside the second block; then it, unwrapped near ``base``,
    else None."""
    s0 = _unwrap(base, blocks[0][0])
    e0 = _unwrap(base, blocks[0][1])
    if e0 <= base:
        return s0, e0
    if len(blocks) > 1 and _unwrap(base, blocks[1][0]) <= s0 and e0 <= _unwrap(base, blocks[1][1]):
        return s0, e0
    return None


def _covered(sacked: list[list[int]], s: int, e: int) -> bool:
    """``[s, e)`` lies in one range of the (sorted) scoreboard: the first range that ends at
    or after ``e`` starts by ``s``."""
    i = bisect.bisect_left(sacked, e, key=_END)
    return i < len(sacked) and sacked[i][0] <= s


def _overlaps(rxt: list[list[float]], s: int, e: int) -> bool:
    for r in rxt:
        if r[0] < e and s < r[1]:
            return True
    return False


class Scoreboard:
    """Mixin of ``TcpSocket``: the sender's SACK scoreboard (RFC 6675: ``pipe``, NextSeg's
    IsLost, lost-retransmission detection), entering fast recovery, and the socket's side of
    RACK-TLP and PRR (the state and rules of those live in :class:`Rack` above).

    The scoreboard is ``self._sacked``: sorted, merged ``[start, end)`` ranges above
    SND.UNA that the peer SACKed, never adjacent (so both the starts and the ends are
    sorted: bisectable), all within ``[SND.UNA, SND.MAX)``; ``self._sacked_bytes`` is their
    total, kept by every writer of the list (here, and the RTO's reset in tcp_timers.py),
    so "SACKed bytes above SND.UNA" costs no walk.
    """

    def _update_scoreboard(
        self,
        blocks: tuple[tuple[int, int], ...],
        ack: int,
        news: list[tuple[int, int]] | None = None,
    ) -> bool:
        """Merge peer SACK blocks; True if they told us something new (the blocks that did
        are appended to ``news``)."""
        sacked = self._sacked
        smax = self._snd_max
        total = self._sacked_bytes
        new = False
        for ws, we in blocks:
            s = _unwrap(ack, ws)
            e = _unwrap(ack, we)
            if s < ack:
                s = ack  # D-SACK or stale: only the part above the cumulative ACK counts
            if e > smax or e <= s:
                continue
            # insert [s, e) into the sorted merged list: the first range that ends at or
            # after s (the ends are sorted too), then every range that starts by e
            n = len(sacked)
            i = bisect.bisect_left(sacked, s, key=_END) if n else 0
            j = i
            ns, ne = s, e
            merged = 0  # bytes of the ranges [i, j) that [ns, ne) replaces
            while j < n:
                r = sacked[j]
                rs = r[0]
                if rs > e:
                    break
                re = r[1]
                if rs < ns:
                    ns = rs
                if re > ne:
                    ne = re
                merged += re - rs
                j += 1
            if j - i == 1 and sacked[i][0] == ns and sacked[i][1] == ne:
                continue  # nothing new
            sacked[i:j] = [[ns, ne]]
            total += (ne - ns) - merged
            new = True
            if news is not None:
                news.append((s, e))
            if len(sacked) > self._sacked_max:
                r = sacked[0]
                total -= r[1] - r[0]
                del sacked[0]
        self._sacked_bytes = total
        return new

    def _trim_scoreboard(self, una: int) -> None:
        sacked = self._sacked
        total = self._sacked_bytes
        k = 0
        n = len(sacked)
        while k < n and sacked[k][1] <= una:
            total -= sacked[k][1] - sacked[k][0]
            k += 1
        if k:
            del sacked[:k]
        if sacked and sacked[0][0] < una:
            total -= una - sacked[0][0]
            sacked[0][0] = una
        self._sacked_bytes = total

    def _first_unsacked(self, s: int) -> int:
        # ranges are merged (never adjacent): at most one holds s, and it ends past s
        sacked = self._sacked
        if sacked:
            i = bisect.bisect_right(sacked, s, key=_END)
            if i < len(sacked) and sacked[i][0] <= s:
                return sacked[i][1]
        return s

    def _sacked_between(self, a: int, b: int) -> int:
        """SACKed bytes in ``[a, b)``: a walk from the first range that ends after ``a``."""
        sacked = self._sacked
        n = len(sacked)
        if not n or a >= b:
            return 0
        i = bisect.bisect_right(sacked, a, key=_END)
        total = 0
        while i < n:
            rs, re = sacked[i]
            if rs >= b:
                break
            if re > b:
                re = b
            total += re - (rs if rs > a else a)
            i += 1
        return total

    def _sacked_below(self, x: int) -> int:
        """SACKed bytes below ``x`` (= ``_sacked_between(SND.UNA, x)``: the scoreboard holds
        only bytes above SND.UNA), from whichever end of the scoreboard is nearer to ``x``
        (the running total minus the part at or above ``x`` when that is the top end)."""
        sacked = self._sacked
        if not sacked:
            return 0
        if x - sacked[0][0] <= sacked[-1][1] - x:
            return self._sacked_between(sacked[0][0], x)
        above = 0
        for rs, re in reversed(sacked):
            if re <= x:
                break
            above += re - (rs if rs > x else x)
        return self._sacked_bytes - above

    def _lost_edge(self) -> int:
        """Unsacked data below this sequence number is deemed lost (RFC 6675 IsLost, or
        with RACK the time-based rule of RFC 8985 §6.2, which replaces DupThresh)."""
        rack = self._rack
        if rack is not None:
            return rack.edge if rack.edge > self._snd_una else self._snd_una
        cum = 0
        count = 0
        limit = 2 * self._smss
        for rs, re in reversed(self._sacked):
            cum += re - rs
            count += 1
            if count >= 3 or cum > limit:
                return rs
        return self._snd_una

    def _pipe(self) -> int:
        """RFC 6675 SetPipe, computed over ranges instead of per segment."""
        una = self._snd_una
        # (every SACKed byte lies in [SND.UNA, SND.MAX): their sum is the running total)
        pipe = self._snd_max - una - self._sacked_bytes
        lost = self._lost_edge()
        if lost > una:
            pipe -= (lost - una) - self._sacked_below(lost)  # unSACKed and deemed lost
        rxt = self._high_rxt
        if rxt > una:
            pipe += (rxt - una) - self._sacked_below(rxt)  # unSACKed and retransmitted
        # a retransmission deemed lost again (RACK, or the lost-retransmission rule) has
        # left the network too until it is sent once more (as Linux's lost_out/retrans_out)
        for rs, re in self._relost:
            if re > una:
                lo = rs if rs > una else una
                pipe -= (re - lo) - self._sacked_between(lo, re)
        return pipe

    def _flight(self) -> int:
        una = self._snd_una
        nxt = self._snd_nxt
        if self._sacked:
            if nxt == self._snd_max:
                return nxt - una - self._sacked_bytes
            return nxt - una - self._sacked_below(nxt)  # going back after an RTO
        return nxt - una

    def _detect_lost_retransmits(self) -> None:
        """A retransmission is lost when more than DupThresh-1 segments' worth of data sent
        after it has been SACKed while it is still missing (as Linux's lost-retransmit
        detection does); it is then sent again instead of waiting for the RTO."""
        una = self._snd_una
        limit = 2 * self._smss
        keep: list[tuple[int, int, int]] = []
        for mark in self._rxt_marks:
            rs, re, sent_max = mark
            if re <= una:
                continue
            if self._sacked_bytes - self._sacked_below(sent_max) > limit:
                lo = rs if rs > una else una
                if self._sacked_between(lo, re) < re - lo:
                    self._relost.append((lo, re))
                    self.stats.lost_retransmits += 1
                continue
            keep.append(mark)
        self._rxt_marks = keep

    def _skip_in_flight(self, rack: Rack) -> None:
        """At the start of an episode: do not send again the holes at SND.UNA whose
        retransmissions are in flight. An episode ends when SND.UNA passes
        its recovery point, which may leave holes above it that it sent again; RACK's next
        verdict then starts a new one (a new congestion event, as Linux's
        tcp_enter_recovery), whose fast retransmit and NextSeg rule 1 would resend them
        from SND.UNA on. Linux skips what carries SACKED_RETRANS; here ``Rack.rxt`` holds
        the retransmissions neither delivered nor deemed lost again (those RACK's step 5
        sends once more). So HighRxt starts past the unSACKed ranges from SND.UNA that
        such retransmissions cover, and the fast retransmit is only due if none covers
        the first hole. (On Debian 13's 1 ms upload under bursty loss, 232 of 243
        D-SACKs per transfer were for segments resent this way.)"""
        rxt = rack.rxt
        first = s = self._first_unsacked(self._snd_una)
        smax = self._snd_max
        while s < smax:
            for r in rxt:
                if r[0] <= s < r[1]:
                    s = self._first_unsacked(int(r[1]))
                    break
            else:
                break
        if s > first:
            self._high_rxt = s
            self._rexmit_now = False

    def _enter_fast_recovery(self, now: float) -> None:
        cc = self._cc
        cc.on_congestion_event(now, self._snd_max - self._snd_una)
        self._in_fr = True
        self._recover = self._snd_max
        self._partial_acks = 0
        self._rexmit_now = True
        self._high_rxt = self._snd_una
        self._rxt_marks.clear()
        self._relost.clear()
        if not self._sack_ok and not cc.model_based:
            cc.cwnd = cc.ssthresh + 3 * self._smss
        rack = self._rack
        if rack is not None:
            rack.probe_t = None
            if rack.rxt:
                self._skip_in_flight(rack)
            rack.prr_start(self._snd_max - self._snd_una)  # RFC 6937 §3 RecoverFS
            if rack.timer == TIMER_PTO:
                rack.timer = 0
                self._rec_at = None
        self.stats.fast_retransmits += 1

    def _arm_pto(self, now: float, one_segment: bool) -> None:
        """RFC 8985 §7.2: (re)arm the probe timeout when no probe is outstanding, after new
        data was sent or an ACK advanced SND.UNA; never later than the RTO (then the probe
        goes instead of the first RTO retransmission, and the RTO is restarted)."""
        rack = self._rack
        assert rack is not None
        if rack.tlp_end is not None or self.state not in _SEND_STATES:
            return
        self._set_pto(rack, now, one_segment)

    def _set_pto(self, rack: Rack, now: float, one_segment: bool) -> None:
        """The recovery timer at the PTO from now (rule pto), never later than the RTO."""
        self._rec_at = self._pto_deadline(now, one_segment)
        rack.timer = TIMER_PTO

    def _pto_deadline(self, now: float, one_segment: bool) -> float:
        """``now`` plus the PTO (rule pto), or plus the RTO if that is sooner."""
        pto = Rack.pto(self._rtt.srtt, one_segment)
        rto = self._rtt.rto
        return now + (pto if pto < rto else rto)

    def _on_rec_timer(self, now: float, out: list[TcpSegment]) -> None:
        self._rec_at = None
        rack = self._rack
        if rack is None:
            return
        kind = rack.timer
        rack.timer = 0
        una = self._snd_una
        smax = self._snd_max
        if self.state not in _SEND_STATES or smax == una:
            return
        if kind == TIMER_REO:
            self._rack_detect(now)  # RFC 8985 §6.3: the reorder timer expired
            return
        if kind != TIMER_PTO:
            return
        if self._in_fr:
            # (a TLP probe still outstanding does not hold it back: in recovery TLP.end_seq
            # only keeps the episode from reducing cwnd twice, _tlp_acked)
            self._recovery_probe(una, now, out)
            return
        if rack.tlp_end is not None:
            return
        # RFC 8985 §7.3: send one new segment if the peer's window allows, else retransmit
        # the highest-sequence segment; then restart the RTO
        new = self._new_range(smax, 0)
        if new is not None:
            self._emit(new[0], new[1], False, now, out)
            rack.tlp_is_retrans = False
        else:
            s = smax - self._smss
            self._emit(s if s > una else una, smax, True, now, out)
            rack.tlp_is_retrans = True
            rack.probe_t = now  # (its delivery counts however soon: see Rack.on_ack)
        rack.tlp_end = self._snd_max  # TLP.end_seq
        self.stats.tlp_probes += 1
        self._rto_at = now + self._rtt.rto

    def _arm_recovery_probe(self, now: float) -> None:
        """Rule rec-probe, arming: in fast recovery, after an ACK that delivered data
        (SND.UNA advanced or something newly SACKed) and with no reorder timer pending, the
        probe timer restarts at the PTO (as TLP's: 2*SRTT, plus WCDelAckT with one segment
        in flight; at most the RTO). See :meth:`_recovery_probe`."""
        rack = self._rack
        assert rack is not None
        if rack.probe_t is not None:
            return  # (one probe per episode: after it, the RTO)
        self._set_pto(rack, now, self._snd_max - self._snd_una <= self._smss)

    def _recovery_probe(self, una: int, now: float, out: list[TcpSegment]) -> None:
        """Rule rec-probe: in fast recovery, a PTO passed since the last ACK that delivered
        anything. RACK deems a segment lost only once something sent after it is delivered;
        when the last segments sent are lost (a retransmission at the tail, the rest of the
        flight SACKed; or a whole flight, an exit's full socket buffer dropping it), no ACK
        comes and the RTO (200 ms at least) would follow, collapsing the window. RFC 8985's
        TLP waits out recovery (so do Linux's, in CA_Recovery); this is its rule for that
        case: one probe, the first hole at SND.UNA sent again (a hole the receiver reports
        at once: it holds data above it, so no delayed ACK). Its ACK repairs the hole, and
        RACK deems every unacknowledged segment sent before it lost (however soon it comes:
        :meth:`Rack.on_ack`). The RTO restarts (as after TLP's probe). One probe per episode:
        silence after it again is the RTO's (probing on, one segment per PTO, would crawl
        through a lost flight if RACK could not use the probe's delivery)."""
        rack = self._rack
        assert rack is not None
        rack.probe_t = now
        s, e, _ = self._rexmit_range(una)
        self._emit(s, e, True, now, out)
        self.stats.recovery_probes += 1
        self._rto_at = now + self._rtt.rto

    def _tlp_acked(self, ack: int, now: float) -> None:
        """RFC 8985 §7.4: the ACK covers the probe. A new-data probe, or a retransmitted
        one that a DSACK showed spurious (:meth:`_rack_on_ack`), ends the episode; an ACK
        beyond a retransmitted probe without that DSACK means the probe repaired a loss:
        reduce cwnd once, as fast recovery would have."""
        rack = self._rack
        assert rack is not None and rack.tlp_end is not None
        if not rack.tlp_is_retrans:
            rack.tlp_end = None
        elif ack > rack.tlp_end:
            rack.tlp_end = None
            if not self._in_fr and not self._cc.model_based:
                # (BBR does not reduce for a repaired tail loss, as in Linux, where the
                # CWR state's reduction does not apply to a cong_control module)
                cc = self._cc
                cc.on_congestion_event(now, self._snd_max - self._snd_una)
                cc.cwnd = cc.ssthresh

    def _rack_on_ack(
        self,
        blocks: tuple[tuple[int, int], ...],
        tsecr: int | None,
        una: int,
        ack: int,
        news: list[tuple[int, int]],
        now: float,
    ) -> None:
        """What RACK takes from each ACK of ``_process_ack`` (RFC 8985 §6.2 steps 1-4): its
        SACK ``blocks`` (wire values; a DSACK) and timestamp echo ``tsecr`` (None without a
        timestamp option), and the data it delivered (``[una, ack)`` and ``news``). Step 5
        and PRR follow in :meth:`_rack_after_ack`."""
        rack = self._rack
        assert rack is not None
        # RFC 2883 §4 (first_block_dsack)
        dsack = first_block_dsack(blocks, ack if ack > una else una) if blocks else None
        if dsack is not None:
            s0, e0 = dsack
            self.stats.dsacks += 1
            # A receiver also reports copies the network made (Linux's does): only as
            # many DSACKed segments as we retransmitted can show a spurious
            # retransmission; the others must not widen the reordering window (as
            # Linux's tcp_dsack_seen, which counts them the same way)
            smss = self._smss
            rack.dsack_segs += (e0 - s0 + smss - 1) // smss if e0 - s0 > smss else 1
            if rack.dsack_segs <= self.stats.retransmits:
                rack.on_dsack(self._snd_una, self._snd_max)
                if rack.tlp_end is not None and rack.tlp_is_retrans and e0 == rack.tlp_end:
                    rack.tlp_end = None  # §7.4: the probe was spurious, no loss
        if not self._ts_ok:
            tsecr = None
        rack.on_ack(una, ack, news, self._sacked, tsecr, self._ts_offset, now)

    def _rack_after_ack(self, una: int, sacked_before: int, now: float, delivered: bool) -> None:
        """RFC 8985 §6.2 step 5 (detect losses) and RFC 6937 §3 "on every ACK during
        recovery" after one ACK (or, deferred, after a batch of them: ``una`` and
        ``sacked_before`` are then the first one's); ``delivered``: SND.UNA advanced or
        something was newly SACKed (rule rec-probe's timer then restarts)."""
        rack = self._rack
        assert rack is not None
        self._rack_detect(now)
        if delivered and self._in_fr and rack.timer != TIMER_REO:
            self._arm_recovery_probe(now)  # rule rec-probe
        if self._in_fr and not self._cc.model_based:
            # RFC 6937 §3: DeliveredData = change in snd.una + change in SACKed bytes
            una_now = self._snd_una
            pipe = self._pipe()
            delivered = (una_now - una) + self._sacked_bytes
            delivered -= sacked_before
            cc = self._cc
            cc.cwnd = pipe + rack.prr_sndcnt(
                delivered if delivered > 0 else 0, pipe, cc.ssthresh, self._smss
            )

    def _rack_detect(self, now: float) -> None:
        """RFC 8985 §6.2 step 5 and §6.3: mark losses, arm the reorder timer, and enter
        fast recovery when RACK finds a loss (this replaces RFC 6675's DupThresh)."""
        rack = self._rack
        assert rack is not None
        una = self._snd_una
        smax = self._snd_max
        if smax == una:
            return
        srtt = self._rtt.srtt
        if srtt is None:
            srtt = rack.rtt
        reo = rack.reo_wnd(self._in_fr, self._sacked_bytes, self._smss, srtt)
        edge, relost, timeout = rack.detect(una, self._sacked, reo, now)
        dr = self._dr
        if dr is not None:
            # delivery.py: bytes newly deemed lost (BBR's rs.losses)
            old = rack.edge if rack.edge > una else una
            if edge > old:
                dr.lost += (edge - old) - self._sacked_between(old, edge)
            for s, e in relost:
                dr.lost += e - s
        rack.edge = edge
        if relost and self._in_fr:
            self._relost.extend(relost)
            self.stats.lost_retransmits += len(relost)
        if timeout > 0:
            self._rec_at = now + timeout
            rack.timer = TIMER_REO
        elif rack.timer == TIMER_REO:
            rack.timer = 0
            self._rec_at = None
        if (
            not self._in_fr
            and una >= self._recover
            and edge > una
            and self._first_unsacked(una) < edge
        ):
            self._enter_fast_recovery(now)
