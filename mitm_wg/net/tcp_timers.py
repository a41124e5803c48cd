"""Timers and RTT: the TSval clock and timestamp RTT samples (RFC 7323 §4), the
retransmission timeout (RFC 6298; the estimator is ``rtt.py``), SYN retries, MTU black
holes (the sender's rule, and rule rx-stall's timer for the receiver's signs), the user
timeout, keepalive, and ``poll_at`` (the earliest of every timer the socket runs).
"""

from __future__ import annotations

from mitm_wg.net.tcp_state import _ACK_STATES, _RECV_STATES, _SEND_STATES, _SYN_STATES, TcpState
from mitm_wg.net.tcp_wire import ACK, M32, TcpSegment
from mitm_wg.net.tcp_wire import HALF as _HALF

#: rule rx-stall: how many times a stall is reported (and the peer asked) again while
#: nothing arrives (``Timers._stall_timer``; waits of 2, 4, 8 and 16 times the first:
#: some 30 s in all)
STALL_ASKS = 4

__all__ = ["Timers"]


class Timers:
    """Mixin of ``TcpSocket``: timers, RTO and RTT samples."""

    def _ts_val(self, now: float) -> int:
        """Our TSval: a millisecond clock plus the per-address-pair offset (RFC 7323 §5.4)."""
        # rule: ts-val
        return (int(now * 1000) + self._ts_offset) & M32

    def _ts_sample(self, tsecr: int, now: float) -> None:
        """RTT sample from a timestamp echo (RFC 7323 §4).

        An echo older than our last timeout's retransmission measures an ACK loss, not the
        path (a duplicate segment makes the peer echo an old TSval), so it is ignored; this
        keeps a lossy path from inflating the RTO without bound.
        """
        # rule: ts-rtt-sample
        floor = self._ts_rto_floor
        if floor is not None and (tsecr - floor) & M32 >= _HALF:
            return
        elapsed = (self._ts_val(now) - tsecr) & M32
        if elapsed < _HALF:
            self._rtt.sample(elapsed / 1000.0)

    def poll_at(self) -> float | None:
        """When ``dispatch`` must next be called; a value <= now means immediately."""
        if self._pending or self._ack_batch is not None or self._held_ack is not None:
            return self._now
        st = self.state
        if st is TcpState.CLOSED:
            return None
        if (self._ack_now or self._acks_owed) and st in _ACK_STATES:
            return self._now
        best: float | None = None
        if self._next_tx() is not None:
            pacer = self._pacer
            if pacer is None or st not in _SEND_STATES:
                return self._now
            best = pacer.next_time(2 * self._smss)  # pacing.py: not before this
            if best <= self._now:
                return self._now
        for t in (
            self._rto_at,
            self._rec_at,
            self._delack_at,
            self._persist_at,
            self._linger_at,
            self._keepalive_at,
            self._stall_at,
        ):
            if t is not None and (best is None or t < best):
                best = t
        if best is None and self.config.keepalive is not None and st is TcpState.ESTABLISHED:
            best = self._last_rx + self.config.keepalive
        return best

    def _on_rto(self, now: float) -> None:
        self._rto_at = None
        st = self.state
        stats = self.stats
        if st in _SYN_STATES:
            cfg = self.config
            if self._rtt.rto >= cfg.initial_rto:
                # (a timeout shorter than the initial RTO, from the destination's known
                # RTT (Stack.tcp_connect, ``syn_rto``), does not count: the connect gives
                # up no sooner than with the initial RTO's schedule)
                if self._syn_retries >= cfg.syn_retries:
                    self._fail_timeout()
                    return
                self._syn_retries += 1
            stats.rto_expired += 1
            stats.syn_timeouts += 1
            self._rtt.backoff()
            self._snd_nxt = self._iss
            return
        una = self._snd_una
        if self._snd_max == una:
            return
        if now - self._last_progress >= self.config.user_timeout:
            self._fail_timeout()
            return
        stats.rto_expired += 1
        rtt = self._rtt
        if rtt.backoffs == 0:
            self._cc.on_rto(now, self._snd_max - una)
        else:
            self._cc.cwnd = self._smss
            # RFC 2018 §8 / RFC 6675 §5.1: after a timeout SACK information may be stale
            # (the receiver may renege); kept after the first timeout (the RTO then skips
            # SACKed data, as Linux), dropped on repeated ones
            self._sacked.clear()
            self._sacked_bytes = 0
        rtt.backoff()
        if rtt.backoffs == self.config.blackhole_rtos:
            self._blackhole_suspected()
        if self._dr is not None:
            self._dr.on_retransmit_all(self._snd_max)
        self._ts_rto_floor = self._ts_val(now)
        self._rxt_marks.clear()
        self._relost.clear()
        if self._rack is not None:
            self._rack.clear()
            self._rec_at = None
        self._in_fr = False
        self._dupacks = 0
        self._rexmit_now = False
        self._recover = self._snd_max
        self._snd_nxt = una
        self._high_rxt = una
        self._rtt_seq = None

    def _blackhole_suspected(self) -> None:
        """``blackhole_rtos`` timeouts in a row and nothing acknowledged: if a segment
        larger than ``blackhole_mtu`` allows is at the head, the path may be a black hole
        for packets of our size (RFC 4821 §3; Linux's tcp_mtu_probing=1 does the same after
        tcp_retries1 = 3 timeouts): resend in segments that fit it. A dead peer takes no
        harm (nothing gets through either way); a path merely losing our segments three
        times in a row pays the smaller segments for this connection."""
        cfg = self.config
        if self.state not in _SEND_STATES:
            return
        target = self._blackhole_mss
        if min(self._snd_max - self._snd_una, self._smss) <= target - (12 if self._ts_ok else 0):
            return  # nothing larger in flight: small packets are lost too
        self.stats.blackhole_shrinks += 1
        self.set_path_mtu_mss(target)
        if cfg.on_blackhole is not None:
            cfg.on_blackhole(self)  # type: ignore[arg-type]

    def _stall_timer(self, now: float, out: list[TcpSegment]) -> None:
        """The timer of rule rx-stall (armed by ``_sack_flush`` and ``_on_new_ack``): no
        data arrived in order since it was armed, or only small segments ever did (none
        larger than ``blackhole_mtu`` allows: a server's reply headers got through, the
        rest may not) though the path we know of carries larger ones. A stall reported,
        and nothing arriving still, it is reported again ``STALL_ASKS`` times, each wait
        twice the one before, the peer asked again each time: a question, its answer, the
        runtime's pings or the error telling the server of a narrower path may all have
        been lost (a moment's outage, or another client with our key taking the exit's
        replies until the next handshake), and the stall would stay undecided for good."""
        self._stall_at = None
        if self.state not in _RECV_STATES or self._rd_closed:
            return
        if self._stall_told != self._rcv_nxt:  # (else: reported, nothing since: again)
            if self._stall_asks:
                return  # (asking again, and data came since: that stall is over)
            if self._rcv_nxt != self._stall_seq:
                small = self._blackhole_mss
                pmtu_mss = self._pmtu_mss
                if self._rcv_mss > small or (pmtu_mss is not None and pmtu_mss <= small):
                    return
            elif (
                (self._snd_una != self._snd_max or self._pending_send())
                and not self._asm
                and self._seq_ahead <= self._rcv_nxt
            ):
                # Armed when all our data was acknowledged (a request: its answer due), but
                # more has been sent or queued since, nothing is held beyond a hole, and
                # the peer showed no data sent: the request goes on (an upload whose
                # writer paused a moment), no answer is due yet. A black hole in its way
                # is the send side's to find (``_blackhole_suspected``). Armed again once all
                # of it is acknowledged.
                self._stall_seq = -1
                return
            self._stall_told = self._rcv_nxt
            self.stats.rx_stalls += 1
        if not self._asm and not self.data_vanished:
            # rule rx-stall: ask the peer how far it has sent. A segment below its window
            # (a keepalive's SEQ) draws an ACK carrying its SND.NXT: beyond our RCV.NXT,
            # it sent data that never came (``_peer_ahead``); at it, it sent nothing yet
            # (a slow server). The only sign a server that answers no ping gives when
            # the first segment of its reply is already full-sized.
            self.stats.stall_probes += 1
            out.append(self._make_seg(ACK, self._snd_una - 1, b"", now))
        if self._stall_asks < STALL_ASKS:
            self._stall_asks += 1
            self._stall_at = now + self._stall_wait() * (1 << self._stall_asks)
        hook = self.config.on_rx_stall
        if hook is not None:
            hook(self)  # type: ignore[arg-type]

    def _peer_ahead(self, seq: int) -> None:
        """Rule rx-stall: a segment without data from the peer carried SEG.SEQ ``seq``
        (unwrapped) beyond RCV.NXT: the peer sent data up to there that never came. If the
        stall at this RCV.NXT was already reported and this is the first such sign, it is
        reported again (the runtime now knows more: ``data_vanished``)."""
        first = self._seq_ahead <= self._rcv_nxt
        if seq > self._seq_ahead:
            self._seq_ahead = seq
        hook = self.config.on_rx_stall
        if first and hook is not None and self._stall_told == self._rcv_nxt and self.data_vanished:
            hook(self)  # type: ignore[arg-type]

    def _arm_stall(self, now: float) -> None:
        """Rule rx-stall: from now on data is expected at RCV.NXT (once per RCV.NXT): if none
        arrives for ``TcpConfig.rx_stall`` seconds, at least three smoothed RTTs,
        ``_stall_timer`` reports a stall."""
        self._stall_seq = self._rcv_nxt
        self._stall_since = now
        self._stall_asks = 0
        if self.config.rx_stall:
            self._stall_at = now + self._stall_wait()

    def _stall_wait(self) -> float:
        """Rule rx-stall's wait for data: ``TcpConfig.rx_stall`` seconds, at least three
        smoothed RTTs."""
        wait = self.config.rx_stall
        srtt3 = 3.0 * (self._rtt.srtt or 0.0)
        return wait if wait > srtt3 else srtt3

    def pause_ended(self, now: float, paused: float = 0.0) -> bool:
        """The socket was not run for at least ``paused`` seconds before ``now`` (the machine
        slept, the process was stopped): an ACK read now may have waited through the pause
        in a buffer. So no RTT sample comes from what was sent before ``now`` (an echo of an
        older TSval is ignored, as after a timeout; without timestamps the timing in
        progress is dropped): one would count the pause as a round trip, and the RTO and
        PTO grow by an eighth of it. The timers that came due meanwhile and would act on
        the silence start over from ``now`` (the RTO's one an RTO, the recovery timer's a
        PTO, never more than the RTO, rule rx-stall's its wait) instead of firing before
        what waited is read. And the pause does not count towards the user timeout: a
        connection whose last ACKs were lost while the machine slept a few minutes is
        retransmitted to, not given up at the first RTO. (Linux's TCP clock does not count
        a suspend, and its stack runs while a process is stopped: none of this happens to
        it.) Returns True when a timer started over."""
        self._ts_rto_floor = self._ts_val(now)
        self._rtt_seq = None
        progress = self._last_progress + paused
        self._last_progress = progress if progress < now else now
        moved = False
        if self._rto_at is not None and self._rto_at <= now:
            self._rto_at = now + self._rtt.rto
            moved = True
        if self._rec_at is not None and self._rec_at <= now:
            # (its kind stays: a reorder timer, a probe's)
            self._rec_at = self._pto_deadline(now, self._snd_max - self._snd_una <= self._smss)
            moved = True
        if self._stall_at is not None and self._stall_at <= now:
            self._stall_at = now + self._stall_wait() * (1 << self._stall_asks)
            moved = True
        return moved

    def retransmit_now(self) -> bool:
        """The path works again (a lower layer says so): stop waiting out the backed-off timer.

        After an RTO fired (SYN_SENT: the SYN went unanswered; later: data or FIN did), send
        the SYN or the oldest unacknowledged segment again on the next ``dispatch`` instead of
        when the exponentially backed-off timer expires, as proposed for TCP's response to a
        lower layer's connectivity-restored indication (draft-schuetz-tcpm-tcp-rlci §4).
        Nothing else changes: no backoff, no retry counted, the running timer stays. Returns
        False (and does nothing) when no timeout is being waited out.
        """
        if self._rtt.backoffs == 0 or self._in_fr or self._snd_max == self._snd_una:
            return False
        st = self.state
        if st is TcpState.SYN_SENT:
            self._snd_nxt = self._iss
        elif st in _SEND_STATES:
            self._snd_nxt = self._snd_una
        else:
            return False
        return True

    def _keepalive(self, now: float, out: list[TcpSegment]) -> None:
        cfg = self.config
        assert cfg.keepalive is not None
        if (
            self.state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT)
            and self._snd_max == self._snd_una
            and not self._pending_send()
        ):
            due = self._last_rx + cfg.keepalive + self._ka_probes * cfg.keepalive_interval
            if now >= due:
                if self._ka_probes >= cfg.keepalive_probes:
                    self._fail_timeout()
                    return
                out.append(self._make_seg(ACK, self._snd_una - 1, b"", now))
                self._ka_probes += 1
                due += cfg.keepalive_interval
            self._keepalive_at = due
        else:
            self._keepalive_at = None
