"""BBR congestion control, version 1 (draft-cardwell-iccrg-bbr-congestion-control-00,
as Linux's tcp_bbr.c behaves), sans-IO.

BBR models the path instead of reacting to loss: ``btl_bw``, the windowed maximum of the
delivery-rate samples over the last 10 round trips (``delivery.py``), and ``min_rtt``, the
minimum RTT over the last 10 s. It paces at ``pacing_gain x btl_bw`` and caps the data in
flight at ``cwnd_gain x btl_bw x min_rtt`` (plus a few send quanta). States (§4.3):

* STARTUP: gains 2/ln 2 (2.89) until the bandwidth stops growing by 25 % for 3 rounds;
* DRAIN: pacing gain 1/2.89 until what is in flight fits one BDP;
* PROBE_BW: pacing gain cycles through 1.25, 0.75, 1 x 6, one phase per min_rtt, starting
  at a per-connection phase other than 0.75; cwnd gain 2;
* PROBE_RTT: when min_rtt is 10 s old, cwnd 4 segments for max(200 ms, one round), then
  back (to STARTUP if the pipe was never filled).

Random loss does not shrink the window (Linux's BBR has no ssthresh cut): during fast
recovery it keeps packet conservation for the first round (cwnd = in flight + newly
delivered), then regrows by what is delivered; after recovery the window before it comes
back (§4.2.3.4, Linux bbr_set_cwnd_to_recover_or_restore), and — unlike Linux — cwnd never
drops below what is in flight plus what the ACK delivered while recovery lasts. After an RTO
the window is one segment until the lost data is repaired, then the prior window comes
back.

ACK aggregation (Linux's bbr_update_ack_aggregation, since 5.1): when ACKs come in clumps —
a Wi-Fi link's aggregated frames, a receiver's stretch ACKs, or, here, a batch of ACKs the
runtime reads in one wake-up while the exit's and this process's threads take turns on a
busy CPU — a window of 2 BDPs empties between two clumps and the sender waits for the next
with the pacer's budget unused. So the cwnd target also holds ``extra_acked``: the largest
amount ACKed beyond what ``btl_bw`` would have delivered since the start of the current ACK
epoch (one that resets whenever the ACKs fall behind the rate), the max over the last 5 to 10
rounds, never more than cwnd nor 100 ms of ``btl_bw`` (and none before the pipe is full).

Additions to BBRv1: STARTUP also ends on heavy loss in a round (``STARTUP_LOSS_RATE``,
as BBRv2 does with a lower threshold), since v1's overshoot into a shallow queue costs a
loss episode of a whole BDP; bandwidth samples far above what the pacing rate can have
delivered are dropped (see :meth:`Bbr.on_rate_sample`).

Not implemented (Linux has it): the long-term bandwidth sampling for token-bucket policers
(lt_bw).
"""

from __future__ import annotations

from mitm_wg.net.congestion import initial_window
from mitm_wg.net.delivery import RateSample
from mitm_wg.net.pacing import ReleaseSpan, burst_bytes

__all__ = ["DRAIN", "PROBE_BW", "PROBE_RTT", "STARTUP", "Bbr"]

STARTUP = 0
DRAIN = 1
PROBE_BW = 2
PROBE_RTT = 3

#: §4.3.2.1: 2/ln(2), the smallest gain that doubles the delivery rate each round
HIGH_GAIN = 2.885
DRAIN_GAIN = 1 / HIGH_GAIN
CWND_GAIN = 2.0
#: §4.3.4.3 the PROBE_BW pacing-gain cycle
GAIN_CYCLE = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
BW_WINDOW_ROUNDS = 10  # §4.2.2.2 BtlBwFilterLen
MIN_RTT_WINDOW = 10.0  # §4.2.3.2 MinRTTFilterLen (s)
PROBE_RTT_TIME = 0.2  # §4.3.5 ProbeRTTDuration (s)
FULL_BW_THRESH = 1.25  # §4.3.2.2: growth that counts as "still growing"
FULL_BW_ROUNDS = 3
MIN_CWND_SEGS = 4  # §4.2.3.3 BBRMinPipeCwnd
PACING_MARGIN = 0.99  # Linux paces 1 % below the estimate (bbr_pacing_margin_percent)
INF_SSTHRESH = 1 << 62
_INF = float("inf")
#: STARTUP also ends when a round loses more than this share of what it delivered and
#: lost, and at least STARTUP_LOSS_MIN segments: a 2.89x overshoot into a shallow queue
#: (e.g. a userspace WireGuard peer's socket buffer) loses about half of it, random loss
#: of a few percent never triggers this.
STARTUP_LOSS_RATE = 0.15
STARTUP_LOSS_MIN = 8
#: ACK aggregation (see the module docstring; Linux's bbr_extra_acked_* parameters): the
#: gain on the estimate, rounds per slot of the two-slot max filter, the cap in seconds of
#: btl_bw, and the bytes after which an ACK epoch restarts anyway
EXTRA_ACKED_GAIN = 1.0
EXTRA_ACKED_WIN_ROUNDS = 5
EXTRA_ACKED_MAX_TIME = 0.1
ACK_EPOCH_RESET_BYTES = 1 << 30


#: A rate sample over at most this many segments is never an artefact of forgotten SACKs
#: or resent data (those cover a window's worth): the 2.5 x btl_bw cap spares it.
FEW_SEGMENTS = 4


class Bbr:
    """BBR behind the controller interface of ``congestion.py`` (``cwnd``, ``ssthresh``,
    ``set_mss``, ``on_congestion_event``, ``on_rto``; not ``on_ack``, which the socket
    calls for loss-based controllers only) plus what a model-based controller needs from
    the socket: :meth:`on_rate_sample` on every ACK that delivers data and
    :meth:`pacing_rate`. ``model_based`` tells the socket to leave cwnd to it
    during and after recovery (no PRR, no cwnd = ssthresh)."""

    __slots__ = (
        "_ack_epoch_acked",
        "_ack_epoch_stamp",
        "_bw_rounds",
        "_cycle_idx",
        "_cycle_stamp",
        "_extra_acked",
        "_extra_acked_idx",
        "_extra_acked_rounds",
        "_full_bw",
        "_full_bw_cnt",
        "_full_bw_reached",
        "_next_round_delivered",
        "_pacing_rate",
        "_packet_conservation",
        "_prev_recovering",
        "_prior_cwnd",
        "_probe_rtt_done",
        "_probe_rtt_round_done",
        "_recovery_pending",
        "_round_delivered",
        "_round_lost",
        "_round_start",
        "_span",
        "btl_bw",
        "cwnd",
        "cwnd_gain",
        "min_rtt",
        "min_rtt_stamp",
        "mode",
        "pacing_gain",
        "round_count",
        "smss",
        "ssthresh",
    )

    name = "bbr"
    model_based = True

    def __init__(self, smss: int, seed: int = 0) -> None:
        self.smss = smss
        self.cwnd = initial_window(smss)
        self.ssthresh = INF_SSTHRESH  # BBR has none; kept for the interface and stats
        self.mode = STARTUP
        self.pacing_gain = HIGH_GAIN
        self.cwnd_gain = HIGH_GAIN
        self.btl_bw = 0.0  # bytes/s, max of _bw_rounds
        self._bw_rounds: list[list[float]] = []  # [round, max bw in that round]
        self.min_rtt = _INF
        self.min_rtt_stamp = 0.0
        self.round_count = 0
        self._next_round_delivered = 0
        self._round_start = False
        self._round_delivered = 0  # C.delivered when the round began
        self._round_lost = 0  # bytes deemed lost during the round
        self._full_bw = 0.0
        self._full_bw_cnt = 0
        self._full_bw_reached = False
        # a per-connection start phase of the gain cycle, never the 0.75 one (§4.3.4.4),
        # derived from the caller's seed (sans-IO: no global randomness)
        idx = seed % (len(GAIN_CYCLE) - 1)
        self._cycle_idx = idx + 1 if idx >= 1 else idx
        self._cycle_stamp = 0.0
        self._pacing_rate = 0.0
        self._prior_cwnd = 0
        self._packet_conservation = False
        self._prev_recovering = False
        self._recovery_pending = False
        self._probe_rtt_done: float | None = None
        self._probe_rtt_round_done = False
        # ACK aggregation: the current epoch (start, bytes ACKed since) and the max filter
        self._ack_epoch_stamp = 0.0
        self._ack_epoch_acked = 0
        self._extra_acked = [0, 0]
        self._extra_acked_idx = 0
        self._extra_acked_rounds = 0
        # the pacer's release span (pacing.py), grown while the path shows no loss from it
        self._span = ReleaseSpan()

    # -- the controller interface -----------------------------------------------------------
    def set_mss(self, smss: int) -> None:
        if smss != self.smss:
            segs = max(1, self.cwnd // self.smss)
            self.smss = smss
            self.cwnd = segs * smss

    def _save_cwnd(self) -> None:
        """§4.2.3.4 / bbr_save_cwnd: remember the window to restore after recovery."""
        if not self._prev_recovering and self.mode != PROBE_RTT:
            self._prior_cwnd = self.cwnd
        elif self.cwnd > self._prior_cwnd:
            self._prior_cwnd = self.cwnd

    def on_congestion_event(self, now: float, flight: int) -> None:
        """Fast recovery begins: no reduction; packet conservation for the first round
        starts with the next ACK (:meth:`on_rate_sample`)."""
        self._save_cwnd()
        self._recovery_pending = True

    def on_rto(self, now: float, flight: int) -> None:
        """Retransmission timeout: one segment until the loss is repaired (Linux's
        tcp_enter_loss); the round ends here and the full-bandwidth count restarts."""
        self._save_cwnd()
        self._prev_recovering = True
        self._packet_conservation = False
        self._recovery_pending = False
        self.cwnd = self.smss
        self._full_bw = 0.0
        self._round_start = True
        self._span.on_timeout()

    @property
    def release_time(self) -> float:
        """The pacer's release span in seconds of the rate (pacing.py ``ReleaseSpan``)."""
        return self._span.time

    # -- the model ---------------------------------------------------------------------------
    def bdp(self, gain: float) -> int:
        """gain x btl_bw x min_rtt in bytes (the initial window before any estimate)."""
        if self.min_rtt == _INF or self.btl_bw <= 0:
            return initial_window(self.smss)
        return int(gain * self.btl_bw * self.min_rtt)

    def pacing_rate(self, srtt: float | None) -> float:
        """Bytes per second (§4.2.1); before the first bandwidth sample: the initial
        window per smoothed RTT at the startup gain (Linux bbr_init_pacing_rate_from_rtt)."""
        rate = self._pacing_rate
        if rate <= 0.0:
            if srtt is None or srtt <= 0:
                return 0.0
            return HIGH_GAIN * self.cwnd / srtt
        return rate

    def _set_pacing_rate(self, gain: float) -> None:
        rate = gain * self.btl_bw * PACING_MARGIN
        if rate > 0 and (self._full_bw_reached or rate > self._pacing_rate):
            self._pacing_rate = rate

    def on_rate_sample(
        self,
        rs: RateSample | None,
        delivered: int,
        total_delivered: int,
        inflight: int,
        recovering: bool,
        now: float,
    ) -> None:
        """Everything BBR does on an ACK that newly delivered ``delivered`` bytes
        (bbr_main): update the model, the state machine, the pacing rate and cwnd.
        ``total_delivered`` is C.delivered after the ACK, ``inflight`` the bytes in flight
        after it, ``recovering``: the socket is repairing a loss (fast recovery or after an
        RTO)."""
        # -- §4.2.2 BBRUpdateBtlBw: round counting and the max filter
        self._round_start = False
        if rs is not None and rs.prior_delivered >= self._next_round_delivered:
            if self.mode == PROBE_BW:
                self._span.on_round(total_delivered - self._round_delivered, self._round_lost)
            self._next_round_delivered = total_delivered
            self.round_count += 1
            self._round_start = True
            self._packet_conservation = False
            self._round_delivered = total_delivered
            self._round_lost = 0
        if rs is not None and rs.losses:
            self._round_lost += rs.losses
            if (
                self.mode == STARTUP
                and self._round_lost >= STARTUP_LOSS_MIN * self.smss
                and self._round_lost
                > STARTUP_LOSS_RATE * (total_delivered - self._round_delivered + self._round_lost)
            ):
                # not in BBRv1: the pipe is full when a startup round loses this much
                # (BBRv2's loss-based exit, with a threshold far above random loss)
                self._full_bw_reached = True
        if rs is not None and rs.interval > 0:
            # delivery-rate draft §3.3: an interval shorter than the minimum RTT (of this
            # sample included) is not a valid sample (ACK compression)
            floor = self.min_rtt
            if 0 <= rs.rtt < floor:
                floor = rs.rtt
            if rs.interval >= floor or floor == _INF:
                bw = rs.delivered / rs.interval
                # Not in Linux: once the pipe is full, data leaves paced at most at 1.25 x
                # btl_bw, so no path delivers it faster; a sample above twice that is an
                # artefact — a cumulative ACK over data whose SACKs the bounded
                # scoreboard forgot, or that an RTO resent — and one such sample would
                # rule the max filter for 10 rounds. (Not in STARTUP: its first samples
                # can be tiny, app-limited ones.)
                # The artefact is a sample over much data. An estimate whose BDP is below
                # a few segments takes a sample of at most that many at any rate: it can
                # get no larger ones (the window is at its floor), and every real one is
                # above its cap (seen after a path MTU drop whose losses ended the startup
                # at a few KB/s: the estimate stayed there). A healthy estimate keeps the
                # cap for them too: a burst of ACKs after a recovery makes such samples.
                cap = 2.5 * self.btl_bw if self._full_bw_reached else _INF
                few = FEW_SEGMENTS * self.smss
                if (not rs.is_app_limited or bw >= self.btl_bw) and (
                    bw <= cap or (rs.delivered <= few and self.btl_bw * self.min_rtt < few)
                ):
                    self._bw_update(bw)
        if delivered > 0 and rs is not None:
            self._update_ack_aggregation(delivered, now)
        # -- §4.3.4.3 gain cycling
        if self.mode == PROBE_BW:
            self._advance_cycle(inflight, now, rs)
        # -- §4.3.2.2 full pipe; DRAIN
        if self._round_start and not self._full_bw_reached and rs is not None:
            if not rs.is_app_limited:
                bw = self.btl_bw
                if bw >= self._full_bw * FULL_BW_THRESH:
                    self._full_bw = bw
                    self._full_bw_cnt = 0
                else:
                    self._full_bw_cnt += 1
                    if self._full_bw_cnt >= FULL_BW_ROUNDS:
                        self._full_bw_reached = True
        if self.mode == STARTUP and self._full_bw_reached:
            self.mode = DRAIN
            self.pacing_gain = DRAIN_GAIN
            self.cwnd_gain = HIGH_GAIN
        if self.mode == DRAIN and inflight <= self.bdp(1.0):
            self._enter_probe_bw(now)
        # -- §4.3.5 min_rtt and PROBE_RTT
        rtt = rs.rtt if rs is not None else -1.0
        expired = self.min_rtt != _INF and now - self.min_rtt_stamp > MIN_RTT_WINDOW
        if rtt >= 0 and (rtt < self.min_rtt or expired):
            self.min_rtt = rtt if rtt > 0 else 1e-6
            self.min_rtt_stamp = now
        if expired and self.mode != PROBE_RTT:
            self.mode = PROBE_RTT
            self.pacing_gain = 1.0
            self.cwnd_gain = 1.0
            self._save_cwnd()
            self._probe_rtt_done = None
        if self.mode == PROBE_RTT:
            self._probe_rtt(inflight, total_delivered, now)
        # -- §4.2.1 pacing rate, §4.2.3 cwnd
        self._set_pacing_rate(self.pacing_gain)
        self._set_cwnd(
            delivered, total_delivered, inflight, recovering, rs.losses if rs is not None else 0
        )

    def _update_ack_aggregation(self, acked: int, now: float) -> None:
        """Linux's bbr_update_ack_aggregation: how much more this ACK (or batch of them)
        brings the ACK epoch than ``btl_bw`` would have delivered since it began; the max
        over two slots of EXTRA_ACKED_WIN_ROUNDS rounds each."""
        if self._round_start:
            self._extra_acked_rounds += 1
            if self._extra_acked_rounds >= EXTRA_ACKED_WIN_ROUNDS:
                self._extra_acked_rounds = 0
                self._extra_acked_idx ^= 1
                self._extra_acked[self._extra_acked_idx] = 0
        expected = self.btl_bw * (now - self._ack_epoch_stamp)
        epoch_acked = self._ack_epoch_acked
        if epoch_acked <= expected or epoch_acked + acked >= ACK_EPOCH_RESET_BYTES:
            # the ACKs fell behind the rate (or the epoch is very old): a new epoch
            epoch_acked = 0
            self._ack_epoch_stamp = now
            expected = 0.0
        epoch_acked += acked
        self._ack_epoch_acked = epoch_acked
        extra = epoch_acked - int(expected)
        if extra > self.cwnd:
            extra = self.cwnd
        if extra > self._extra_acked[self._extra_acked_idx]:
            self._extra_acked[self._extra_acked_idx] = extra

    def aggregation_allowance(self) -> int:
        """Bytes the cwnd target holds beyond the BDP for ACKs that come in clumps (none
        before the pipe is full; at most EXTRA_ACKED_MAX_TIME of btl_bw)."""
        if not self._full_bw_reached:
            return 0
        ea = self._extra_acked
        extra = EXTRA_ACKED_GAIN * (ea[0] if ea[0] > ea[1] else ea[1])
        cap = self.btl_bw * EXTRA_ACKED_MAX_TIME
        return int(extra if extra < cap else cap)

    def _bw_update(self, bw: float) -> None:
        """Windowed max over the last BW_WINDOW_ROUNDS rounds: one entry per round."""
        rounds = self._bw_rounds
        rc = self.round_count
        if rounds and rounds[-1][0] == rc:
            if bw > rounds[-1][1]:
                rounds[-1][1] = bw
        else:
            rounds.append([rc, bw])
        while rounds[0][0] <= rc - BW_WINDOW_ROUNDS:
            del rounds[0]
        best = 0.0
        for r in rounds:
            if r[1] > best:
                best = r[1]
        self.btl_bw = best

    def _enter_probe_bw(self, now: float) -> None:
        self.mode = PROBE_BW
        self.cwnd_gain = CWND_GAIN
        self._cycle_stamp = now
        self.pacing_gain = GAIN_CYCLE[self._cycle_idx]

    def _advance_cycle(self, inflight: int, now: float, rs: RateSample | None) -> None:
        """§4.3.4.3 BBRIsNextCyclePhase: a phase lasts min_rtt; the 1.25 phase also until
        in flight reaches 1.25 BDP (or a loss), the 0.75 phase ends early once in flight
        is down to one BDP."""
        full_length = now - self._cycle_stamp > self.min_rtt
        gain = self.pacing_gain
        if gain > 1.0:
            nxt = full_length and inflight >= self.bdp(gain)
        elif gain < 1.0:
            nxt = full_length or inflight <= self.bdp(1.0)
        else:
            nxt = full_length
        if nxt:
            self._cycle_idx = (self._cycle_idx + 1) % len(GAIN_CYCLE)
            self._cycle_stamp = now
            self.pacing_gain = GAIN_CYCLE[self._cycle_idx]

    def _probe_rtt(self, inflight: int, total_delivered: int, now: float) -> None:
        """§4.3.5: hold cwnd at MIN_CWND_SEGS for PROBE_RTT_TIME and one round."""
        if self._probe_rtt_done is None:
            if inflight <= MIN_CWND_SEGS * self.smss:
                self._probe_rtt_done = now + PROBE_RTT_TIME
                self._probe_rtt_round_done = False
                self._next_round_delivered = total_delivered
            return
        if self._round_start:
            self._probe_rtt_round_done = True
        if self._probe_rtt_round_done and now >= self._probe_rtt_done:
            self.min_rtt_stamp = now
            if self._prior_cwnd > self.cwnd:
                self.cwnd = self._prior_cwnd
            if self._full_bw_reached:
                self._enter_probe_bw(now)
            else:
                self.mode = STARTUP
                self.pacing_gain = HIGH_GAIN
                self.cwnd_gain = HIGH_GAIN

    def _set_cwnd(
        self, delivered: int, total_delivered: int, inflight: int, recovering: bool, losses: int
    ) -> None:
        """§4.2.3 (bbr_set_cwnd): towards cwnd_gain x BDP + quanta, by what was delivered;
        packet conservation in the first round of recovery; the prior window back after."""
        smss = self.smss
        cwnd = self.cwnd
        if delivered > 0:
            if losses > 0:
                cwnd -= losses  # §4.2.3.4: what was lost has left the network
            if recovering and self._recovery_pending:
                # §4.2.3.4: entering fast recovery: packet conservation for one round
                self._recovery_pending = False
                self._packet_conservation = True
                self._next_round_delivered = total_delivered  # the round starts now
                cwnd = inflight + delivered
            elif not recovering and self._prev_recovering:
                if self._prior_cwnd > cwnd:
                    cwnd = self._prior_cwnd
                self._packet_conservation = False
            self._prev_recovering = recovering
            if self._packet_conservation or (recovering and inflight + delivered > cwnd):
                # Linux conserves packets in the first round of recovery only, and after
                # that lets the lost bytes shrink cwnd below what is in flight; with heavy
                # loss (a userspace peer's socket buffer overflowing) that left us with
                # cwnd < pipe, nothing to send and no ACK to come: an RTO. Sending what
                # was delivered for the whole recovery (at the pacing rate) avoids that.
                if inflight + delivered > cwnd:
                    cwnd = inflight + delivered
            else:
                # send quanta: what the pacer may release back to back, twice over (Linux
                # adds 3 TSO frames); a little more in the probing phase
                target = self.bdp(self.cwnd_gain) + 2 * int(
                    burst_bytes(self._pacing_rate, self.release_time)
                )
                target += self.aggregation_allowance()
                if self.mode == PROBE_BW and self._cycle_idx == 0:
                    target += 2 * smss
                if self._full_bw_reached:
                    cwnd += delivered
                    if cwnd > target:
                        cwnd = target
                elif cwnd < target or total_delivered < initial_window(smss):
                    cwnd += delivered
        floor = MIN_CWND_SEGS * smss
        if cwnd < floor:
            cwnd = floor
        if self.mode == PROBE_RTT and cwnd > floor:
            cwnd = floor
        self.cwnd = cwnd
