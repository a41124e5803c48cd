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

__all__ = ["PTO_FLOOR", "TIMER_PTO", "TIMER_REO", "WC_DEL_ACK_T", "Rack"]

M32 = 0xFFFFFFFF
_HALF = 0x80000000
#: RFC 8985 §7.2: worst-case delayed-ACK time added when a single segment is in flight.
WC_DEL_ACK_T = 0.2
#: Lower bound of the PTO, for the timer granularity of a shared runtime (Linux adds
#: TCP_TIMEOUT_MIN, 2 ms, for the same reason).
PTO_FLOOR = 0.01
TIMER_PTO = 1
TIMER_REO = 2


def _sent_after(t1: float, e1: int, t2: float, e2: int) -> bool:
    """RFC 8985 §6.2 RACK_sent_after(): (t1, e1) was sent after (t2, e2)."""
    return t1 > t2 or (t1 == t2 and e1 > e2)


class Rack:
    """RACK-TLP and PRR state of one connection (see the module docstring)."""

    __slots__ = (
        "dsack_round",
        "edge",
        "end_seq",
        "fack",
        "min_rtt",
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
        self.edge = 0  # originals below this (unless SACKed) are lost: RACK's IsLost
        self.timer = 0  # what the socket's recovery timer is armed for (0/PTO/REO)
        self.tlp_end: int | None = None  # TLP.end_seq
        self.tlp_is_retrans = False
        # RFC 6937 §3
        self.prr_delivered = 0
        self.prr_out = 0
        self.recover_fs = 0

    # -- send log -----------------------------------------------------------------------
    def on_send(self, s: int, e: int, now: float, rexmit: bool, una: int) -> None:
        """Record a transmission of ``[s, e)`` at ``now`` (RFC 8985 §5.2 Segment.xmit_ts)."""
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
            if last[1] == now:
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
        i = bisect.bisect_right(sent, seq, key=lambda x: x[0])
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
                # the timestamp echo predates it, or it came back faster than min_RTT
                if tsecr is not None:
                    ok = (tsecr - ((int(t * 1000) + ts_offset) & M32)) & M32 < _HALF
                else:
                    mr = self.min_rtt
                    ok = mr is None or now - t >= mr
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
        widens the reordering window by min_RTT/4 and keeps it for 16 recoveries. A DSACK
        also counts as reordering seen (as Linux does), or the window would stay 0."""
        self.reordering_seen = True
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
        for end, t in self.sent:
            if end <= una:
                continue
            if t > xts:
                break
            # one batch (one clock reading) goes out in sequence order: of the batch that
            # holds RACK.end_seq, only the part below it was sent before
            lim = int(end) if t < xts or end <= xend else xend
            remaining = t + thresh - now
            if remaining <= 0:
                edge = lim
            else:
                timeout = remaining  # the latest such entry: RFC's max(remaining)
            if lim < end:
                break
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


def _covered(sacked: list[list[int]], s: int, e: int) -> bool:
    for rs, re in sacked:
        if rs > s:
            return False
        if re >= e:
            return True
    return False


def _overlaps(rxt: list[list[float]], s: int, e: int) -> bool:
    for r in rxt:
        if r[0] < e and s < r[1]:
            return True
    return False
