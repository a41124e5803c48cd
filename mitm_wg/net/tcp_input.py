"""Segment arrival (RFC 9293 §3.10.7): header prediction, PAWS, the acceptability test,
RST/SYN handling, the SYN_SENT and SYN_RECEIVED steps, ACK processing (``_process_ack``);
what an ACK frees is the send side's (``tcp_send.py`` ``_on_new_ack``), data goes to the
receive side (``tcp_recv.py`` ``_process_data``).

As Linux's tcp_input.c: :meth:`Input.fast_input` (header prediction) sits right before
:meth:`Input.process`, the general path whose ESTABLISHED in-order case it mirrors;
:meth:`Input.sack_ack_input` does the same for pure ACKs carrying SACK blocks.
"""

from __future__ import annotations

import errno

from mitm_wg.net.recovery import first_block_dsack
from mitm_wg.net.tcp_state import _RECV_STATES, TcpState
from mitm_wg.net.tcp_wire import ACK, FIN, M32, PSH, RST, SYN, TcpSegment
from mitm_wg.net.tcp_wire import HALF as _HALF
from mitm_wg.net.tcp_wire import unwrap as _unwrap

__all__ = ["SYN_FAST_RETRIES", "Input"]

_PAWS_IDLE = 24 * 86400.0  # RFC 7323 §5.5: TS.Recent older than 24 days is invalid
_PAWS_WINDOW = 1  # ticks a TSval may be older than TS.Recent and pass PAWS (Linux's value)
#: SYNs resent at once (not after the RTO) after resetting a stale connection of the peer's
#: (see :meth:`Input._retry_syn_now`); more than this per connection wait for the RTO.
SYN_FAST_RETRIES = 3


class Input:
    """Mixin of ``TcpSocket``: everything that starts with an arriving segment."""

    def fast_input(
        self,
        wseq: int,
        wack: int,
        flags: int,
        window: int,
        tsval: int | None,
        tsecr: int,
        payload: bytes | bytearray | memoryview,
        now: float,
        run: tuple[int, int, int, int] | None = None,
        *,
        hold: bool = False,
    ) -> bool:
        """Header prediction (RFC 9293 §3.10.7.4 note, Van Jacobson): handle the common
        segment without building a :class:`TcpSegment`.

        ``run``: ``payload`` is several contiguous segments (at RCV.NXT, or all ahead
        of it behind a hole), coalesced by
        ``Stack.receive_batch`` (as Linux's GRO does for TCP) because every other header
        field of theirs is equal and only the last may carry PSH: their number, and the
        first, last and largest segment's length. The effect is exactly that of the
        segments one by one; tests/test_tcp_gro.py checks it. A run with a segment longer
        than its first is declined (the stack then feeds its segments one by one): the
        receive MSS would grow inside it, and whether an ACK is due (every second full-sized
        segment) would depend on each segment's length, not just the first and last.

        Takes the already-parsed fields of a segment without SACK blocks (``tsval`` None
        when it has no timestamp option).  Returns False, having changed nothing, unless the
        segment is an in-order ACK (with or without data) in ESTABLISHED that
        :meth:`process` would handle in its straightforward way; then it has exactly the
        effect ``process`` would have had and returns True.

        A hand-kept copy, for speed (it runs for nearly every segment): each block that
        repeats a rule of the general path says ``copy of rule <name>``, and the general
        path's block says ``rule: <name>``; change both together (grep the name).
        tests/test_fast_paths.py checks the two paths give identical state on random
        segment streams.

        ``hold`` (``Stack.receive_batch``: more segments may follow at the same instant):
        ACK coalescing. A pure ACK that would advance SND.UNA, for a socket with a
        model-based congestion controller (BBR) and the delivery-rate estimator, is held
        rather than processed, and a newer pure ACK of the same batch that supersedes it
        (same SEG.SEQ, a higher ACK within SND.MAX, a TSval no smaller, a window not
        zero) takes its place: the batch's run of cumulative ACKs acts as its newest one
        alone, a stretch ACK (what a receiver behind Linux's GRO, or with ACK compression,
        sends). Only the RTT and delivery-rate samples of the ACKs stood in for are
        missing; SND.UNA, the send window (and the largest one offered), TS.Recent and
        every counter end as one by one. An uploading socket gets ~16 of them per batch
        from Debian 13's wireguard-go (GRO on the exit: an ACK per 64 KB super-segment),
        each ~20 µs of work. Any other input, ``dispatch`` and the end of the batch (the
        stack) process the held ACK first (:meth:`finish_acks`); tests/test_fast_paths.py
        checks both.
        """
        held = self._held_ack
        if held is not None:
            if (
                hold
                and held[6] is None
                and not payload
                and flags == ACK
                and wseq == held[0]
                and 0 < (wack - held[1]) & M32 < _HALF
                and tsval is not None
                and (tsval - held[3]) & M32 < _HALF
                and window
                and (wack - self._snd_una) & M32 <= self._snd_max - self._snd_una
            ):
                held[1] = wack
                self._stand_in(held, window, tsval, tsecr)
                return True
            self.finish_acks(now)  # (the held ACK comes first)
        elif self._ack_batch is not None:
            self.finish_acks(now)  # (sack_ack_input's deferred work comes first)
        if self.state is not TcpState.ESTABLISHED or flags & ~PSH != ACK:
            return False
        if run is not None and run[3] > run[1]:
            return False  # a segment longer than the first: one by one (see above)
        rcv_nxt = self._rcv_nxt
        seq = rcv_nxt
        if wseq != rcv_nxt & M32:
            # data ahead of RCV.NXT (after a loss, every segment until the retransmission
            # arrives): the out-of-order case below; anything else takes the slow path
            off = (wseq - rcv_nxt) & M32
            if off >= _HALF or not payload:
                return False
            if run is not None and len(self._asm) >= self._asm.max_ranges:
                return False  # one by one: which of them the full Assembler drops
            seq += off
        ts_ok = self._ts_ok
        if ts_ok:
            if tsval is None or (tsval - self._ts_recent) & M32 >= _HALF:
                return False  # no timestamp, or PAWS (rule paws) may object: the slow path
        una = self._snd_una
        d = (wack - una) & M32
        if d >= _HALF:
            return False  # old ACK
        ack = una + d
        smax = self._snd_max
        if ack > smax:
            return False
        plen = len(payload)
        if seq != rcv_nxt:
            if self._rcv_adv < seq + plen or self._rd_closed or self._peer_fin_seq is not None:
                return False  # beyond the window's edge, unread data policy, pending FIN
        elif plen:
            if (
                self._rcv_adv - rcv_nxt < plen
                or self._asm.size
                or self._rd_closed
                or self._peer_fin_seq is not None
            ):
                return False  # window trimming, gap filling, pending FIN, unread data policy
        elif d == 0 and smax > una:
            return False  # a possible duplicate ACK
        if self._fin_queued or self._in_fr or (self._sacked and self._rack is not None):
            # (in recovery, or with RACK and SACKed data above SND.UNA, every ACK feeds
            # RACK/PRR: _process_ack's _rack_on_ack, which may mark losses; the slow path)
            return False
        if (
            hold
            and d
            and not plen
            and flags == ACK
            and tsval is not None
            and window
            # (only a model-based controller has the estimator; a loss-based one grows
            # cwnd per ACK, RFC 3465's limit included: not with these)
            and self._dr is not None
        ):
            # hold it for a newer one of the batch (see the docstring)
            self._held_ack = [wseq, wack, window, tsval, tsecr, window, None, 0]
            return True
        # From here on: exactly process() -> _process_ack() -> _process_data() for this case.
        self._now = now
        self.stats.segments_in += 1 if run is None else run[0]
        self._last_rx = now
        self._ka_probes = 0
        if ts_ok and seq <= self._last_ack_sent:  # copy of rule ts-recent (TSval >= it here)
            self._ts_recent = tsval
            self._ts_recent_age = now
        wnd = window << self._snd_wscale
        window_changed = False
        wl1 = self._snd_wl1  # copy of rule snd-wnd-update (_process_ack below)
        if wl1 < seq or (wl1 == seq and self._snd_wl2 <= ack):
            window_changed = wnd != self._snd_wnd
            self._snd_wnd = wnd
            # (a run's later segments pass this test too: SND.WL1 ends at the last one's seq)
            self._snd_wl1 = seq if run is None else seq + plen - run[2]
            self._snd_wl2 = ack
            if wnd > self._max_snd_wnd:
                self._max_snd_wnd = wnd
        if d:
            if self._dr is None:
                self._on_new_ack(ack, una, tsecr, now)
            else:
                # (SACKed bytes above SND.UNA were delivered before: not again)
                sacked = self._sacked_bytes
                self._on_new_ack(ack, una, tsecr, now)
                self._on_delivered(una, None, sacked, now)
            # _update_persist() only acts when all is acknowledged or a probe timer runs
            if ack == smax or self._persist_at is not None or self._persist_backoff:
                self._update_persist(now)
        elif window_changed:
            self._update_persist(now)
        if seq != rcv_nxt:  # copy of rule rcv-out-of-order (tcp_recv.py _process_data)
            # (for a run its first segment decides: the others extend the range it touched)
            self._sack_flush(seq, rcv_nxt, now)
            if run is None:
                self.stats.out_of_order += 1
                if not self._asm.add(seq, payload):
                    self.stats.dropped += 1
                    self.stats.ofo_drops += 1
                if self._ack_now:
                    self._acks_owed += 1
            else:
                # A run is contiguous: one by one, its first segment may need a new range
                # (there is room: checked above) and the others extend that one; the
                # Assembler ends up the same (its recent-range list included). Each segment
                # owes a duplicate ACK, except the first when none was due yet.
                n = run[0]
                self.stats.out_of_order += n
                self._asm.add(seq, payload)
                self._acks_owed += n if self._ack_now else n - 1
            self._ack_now = True
            return True
        if plen:  # copy of rule rcv-in-order (tcp_recv.py _process_data), no gap to fill
            self._queue_data(payload)
            rcv_nxt += plen
            first = plen if run is None else run[1]
            if first > self._rcv_mss:
                self._rcv_mss = min(first, self.config.mss)
            drs = self._drs
            if drs is not None and ts_ok and tsecr != drs.tsecr:
                self._rcv_rtt_sample(drs, tsecr, first, now)
            if run is None:
                self._unacked_bytes += plen
                self._schedule_ack(plen, flags & PSH, now)
            else:
                # The first segment alone decides whether a delayed ACK is armed; after the
                # last, the ACK is due at once iff it would have been after any of them.
                self._unacked_bytes += first
                self._schedule_ack(first, 0, now)
                if run[3] > self._rcv_mss:
                    self._rcv_mss = min(run[3], self.config.mss)
                self._unacked_bytes += plen - first
                self._schedule_ack(run[2], flags & PSH, now)
            self._rcv_nxt = rcv_nxt
        return True

    def sack_ack_input(
        self,
        wseq: int,
        wack: int,
        window: int,
        tsval: int,
        tsecr: int,
        blocks: tuple[tuple[int, int], ...],
        now: float,
        defer: bool = False,
        hold: bool = False,
    ) -> bool:
        """The pure ACK with SACK blocks (RFC 2018) that a receiver sends for every segment
        after a loss: :meth:`fast_input`'s sibling for the ACKs of a lossy upload, without a
        :class:`TcpSegment`.

        Takes the already-parsed fields of a segment whose flags are exactly ACK, with no
        payload, a timestamp option (``tsval``, ``tsecr``) and SACK ``blocks`` (wire values,
        at least one).  Returns False, having changed nothing, unless the socket is
        ESTABLISHED with timestamps, the segment is at RCV.NXT, passes PAWS, and its ACK is
        acceptable (not beyond SND.MAX, not older than the largest window); then it has
        exactly the effect :meth:`process` would have had and returns True.

        Only the steps of :meth:`process` before :meth:`_process_ack` are repeated here
        (each marked ``copy of rule <name>`` as in :meth:`fast_input`); the ACK and its SACK
        blocks go through the one :meth:`_process_ack`. tests/test_fast_paths.py checks the
        two paths give identical state on random SACK ACKs.

        ``defer`` (``Stack.receive_batch``: more ACKs may follow at the same instant):
        with RACK and a model-based congestion controller (BBR), the work that needs only
        the sum of what a batch of ACKs delivered waits for :meth:`finish_acks` — RACK's
        loss detection (step 5) and the delivery-rate sample — as if the batch were one
        stretch ACK (what a receiver behind Linux's GRO or ACK compression sends). Each
        ACK still updates the scoreboard, SND.UNA and the window, the RTT, RACK's
        xmit_ts/fack/reordering (steps 1-4) and its DSACK rule. A lossy upload's receiver
        sends an ACK per segment or two, ~10 per batch of datagrams: those two were about
        half of the time spent on each. Any other input and ``dispatch`` finish a pending
        batch first (the stack dispatches the socket right after the batch), and
        ``poll_at`` asks for that dispatch at once.

        ``hold`` (with ``defer``): ACK coalescing as in :meth:`fast_input`, for the SACK ACKs
        a receiver sends for each segment after a hole. One whose first block (the newest
        arrivals) ends above its other blocks and is no D-SACK is held; a newer one with
        the same SEG.SEQ and ACK, the same other blocks, a first block that only grew at
        its end, a TSval not older and a window not zero takes its place. Processed alone
        it changes the scoreboard, RACK's state (what extends the first block lies above
        the held one's blocks, so RACK's reordering test, RFC 8985 §6.2 step 3, gives what
        it gives one by one) and the duplicate-ACK count as the ACKs one by one; only their
        RTT samples are missing. A lossy upload to Debian 13's exit: about half of its SACK
        ACKs are stood in for.
        """
        held = self._held_ack
        if held is not None:
            hb = held[6]
            if (
                hold
                and hb is not None
                and wseq == held[0]
                and wack == held[1]
                and (tsval - held[3]) & M32 < _HALF
                and window
                and len(blocks) == len(hb)
                and blocks[0][0] == hb[0][0]
                and 0 < (blocks[0][1] - hb[0][1]) & M32 < _HALF
                and blocks[1:] == hb[1:]
            ):
                held[6] = blocks
                held[7] += 1  # (a duplicate ACK, _take_held)
                self._stand_in(held, window, tsval, tsecr)
                return True
            self._take_held(now)  # (it comes first; a deferred batch goes on)
        if self._ack_batch is not None and not defer:
            self.finish_acks(now)
        if self.state is not TcpState.ESTABLISHED or not self._ts_ok:
            return False
        if (tsval - self._ts_recent) & M32 >= _HALF:
            return False  # PAWS (rule paws) may object: the slow path
        rcv_nxt = self._rcv_nxt
        if wseq != rcv_nxt & M32:
            return False  # the acceptability test and its drops: the slow path
        una = self._snd_una
        ack = _unwrap(una, wack)
        if ack > self._snd_max or ack < una - self._max_snd_wnd:
            return False  # RFC 5961 §5.2 challenge ACK: the slow path
        if (
            hold
            and defer
            and ack >= una
            and window
            and self._rack is not None
            and self._cc.model_based
            # the first block (the newest arrivals) ends above the others: what extends it
            # is not reordering for RACK (RFC 8985 §6.2 step 3) one by one either
            and all((blocks[0][1] - b[1]) & M32 < _HALF for b in blocks[1:])
            and first_block_dsack(blocks, ack) is None  # (a D-SACK's news is its own)
        ):
            # hold it for a newer one of the batch that only extends its first block
            self._held_ack = [wseq, wack, window, tsval, tsecr, window, blocks, 0]
            return True
        # From here on: exactly process() -> _fifth_check_ack() -> _process_ack() for this
        # case (ESTABLISHED: no step after _process_ack applies to a pure ACK).
        self._now = now
        self.stats.segments_in += 1
        self._last_rx = now
        self._ka_probes = 0
        if rcv_nxt <= self._last_ack_sent:  # copy of rule ts-recent (TSval >= it here)
            self._ts_recent = tsval
            self._ts_recent_age = now
        self._process_ack(rcv_nxt, ack, 0, ACK, window, tsecr, blocks, now, defer)
        return True

    def process(self, seg: TcpSegment, now: float) -> None:
        """An arriving segment for this 4-tuple (checksum already verified).

        The steps of RFC 9293 §3.10.7 in order, one method each, except PAWS (inlined: it
        runs for every segment, see below); a step that consumes the segment ends the walk.
        :meth:`fast_input` mirrors the ESTABLISHED in-order case of this sequence for speed.
        """
        if self._ack_batch is not None or self._held_ack is not None:
            self.finish_acks(now)
        self._now = now
        stats = self.stats
        stats.segments_in += 1
        st = self.state
        if st is TcpState.CLOSED or st is TcpState.LISTEN:
            # §3.10.7.1/§3.10.7.2: the stack answers these (RST, or a new socket from_syn)
            stats.dropped += 1
            return
        self._last_rx = now
        self._ka_probes = 0
        if st is TcpState.SYN_SENT:
            self._process_syn_sent(seg, now)  # §3.10.7.3
            return
        # §3.10.7.4 "Otherwise". The flag tests stay here: most segments skip those steps.
        flags = seg.flags
        seq = _unwrap(self._rcv_nxt, seg.seq)
        plen = len(seg.payload)
        # first, check sequence number: PAWS before the window test. Inlined: as a method
        # of its own it cost ~2% more instructions per segment (bench_tcp.py, callgrind).
        ts = seg.timestamp
        # rule: paws (RFC 7323 §5.3 R1; §5.5: a TS.Recent idle for 24 days is not used).
        # As Linux (TCP_PAWS_WINDOW), a TSval one tick older than TS.Recent passes: a
        # segment overtaken on the path across a tick of the sender's clock (reordering)
        # is not an old duplicate from a wrapped sequence space.
        if (
            self._ts_ok
            and ts is not None
            and not flags & RST
            and _PAWS_WINDOW < (self._ts_recent - ts[0]) & M32 <= _HALF
            and now - self._ts_recent_age < _PAWS_IDLE
        ):
            stats.paws_rejected += 1
            self._ack_now = True
            return
        if st is TcpState.SYN_RECEIVED and self._syn_received_syn(seg, seq, now):
            return
        wnd = self._first_check_sequence(seg, seq, plen, now)
        if wnd < 0:
            return
        if flags & RST:
            self._second_check_rst(seq, now)
            return
        # third, check security: no IPsec/compartments here (RFC 9293 §3.10.7.4)
        if flags & SYN:
            self._fourth_check_syn(now)
            return
        if not plen and seq > self._rcv_nxt:
            self._peer_ahead(seq)  # rule rx-stall: the peer sent data that never came
        if self._fifth_check_ack(seg, seq, plen, now):
            return
        # sixth, check the URG bit: urgent data is not supported (RFC 9293 §3.8.5 allows
        # ignoring it; RFC 6093 advises against its use); the data is delivered inline
        # seventh, process the segment text; eighth, check the FIN bit (tcp_recv.py)
        if (plen or flags & FIN) and self.state in _RECV_STATES:
            # a segment accepted with a zero window is acceptable only for its ACK
            self._process_data(seg, seq, plen, wnd == 0, wnd, now)

    def _syn_received_syn(self, seg: TcpSegment, seq: int, now: float) -> bool:
        """SYN_RECEIVED seeing the peer's SYN (SEG.SEQ = IRS) again, before the window test
        of RFC 9293 §3.10.7.4 would call it old: a SYN-ACK acknowledging our SYN completes a
        simultaneous open (§3.5, Figure 8), an unacceptable one gets <SEQ=SEG.ACK><CTL=RST>
        (§3.10.7.3); a bare SYN means our SYN-ACK was lost, and the "ACK" that §3.10.7.4
        sends for an unacceptable segment is, in this state, the SYN-ACK again. True if the
        segment is consumed."""
        flags = seg.flags
        if not flags & SYN or seq != self._irs or flags & RST:
            return False
        if flags & ACK:
            ack = _unwrap(self._snd_una, seg.ack)
            if self._snd_una < ack <= self._snd_max:
                # simultaneous open: the peer's SYN-ACK acknowledges our SYN
                self._snd_wnd = seg.window
                self._max_snd_wnd = max(self._max_snd_wnd, seg.window)
                self._on_established(now)
                self._snd_una = ack
                if self._snd_nxt < ack:
                    self._snd_nxt = ack
                self._rto_at = None
                self._ack_now = True
                return True
            self._rst_for(seg)
            return True
        # retransmitted SYN: our SYN-ACK was lost, send it again
        self._snd_nxt = self._iss
        return True

    def _first_check_sequence(self, seg: TcpSegment, seq: int, plen: int, now: float) -> int:
        """RFC 9293 §3.10.7.4 "first, check sequence number" after PAWS: the acceptability
        test (Table 6), an unacceptable segment answered with an ACK unless it is a RST; then
        TS.Recent (RFC 7323 §4.3). Returns the receive window (>= 0) for an acceptable
        segment, -1 if the segment is consumed."""
        flags = seg.flags
        rcv_nxt = self._rcv_nxt
        wnd = self._rcv_adv - rcv_nxt
        if wnd < 0:
            wnd = 0
        seglen = plen
        if flags & SYN:
            seglen += 1
        if flags & FIN:
            seglen += 1
        if seglen == 0:
            ok = seq == rcv_nxt if wnd == 0 else rcv_nxt <= seq < rcv_nxt + wnd
        elif wnd == 0:
            ok = seq == rcv_nxt  # zero window: process the ACK, drop the data
        else:
            last = seq + seglen - 1
            ok = (rcv_nxt <= seq < rcv_nxt + wnd) or (rcv_nxt <= last < rcv_nxt + wnd)
        if not ok:
            self.stats.dropped += 1
            if not flags & RST:
                self._ack_now = True
                if plen and seq < rcv_nxt:
                    # rule: dsack (RFC 2883: a copy of data we hold, reported once by the next
                    # ACK if SACK was agreed: Sender._make_seg)
                    end = seq + plen
                    self._asm.duplicate(seq, end if end < rcv_nxt else rcv_nxt)
                if flags & FIN and self.state is TcpState.TIME_WAIT:
                    self._linger_at = now + self.config.time_wait  # §3.10.7.4 eighth
            return -1
        ts = seg.timestamp
        # rule: ts-recent (RFC 7323 §4.3: TS.Recent from a segment covering Last.ACK.sent;
        # never back to the older TSval the PAWS window lets through)
        if (
            ts is not None
            and self._ts_ok
            and seq <= self._last_ack_sent
            and (ts[0] - self._ts_recent) & M32 < _HALF
        ):
            self._ts_recent = ts[0]
            self._ts_recent_age = now
        return wnd

    def _second_check_rst(self, seq: int, now: float) -> None:
        """RFC 9293 §3.10.7.4 "second, check the RST bit" with RFC 5961 §3.2, for an
        acceptable segment with RST: exactly at RCV.NXT it resets the connection, anywhere
        else in the window it gets a challenge ACK. Consumes the segment."""
        if seq == self._rcv_nxt:
            self._on_rst()
        else:
            self._challenge_ack(now)

    def _fourth_check_syn(self, now: float) -> None:
        """RFC 9293 §3.10.7.4 "fourth, check the SYN bit" with RFC 5961 §4.2, for a segment
        with SYN in a synchronized state: a challenge ACK, whatever its sequence number.
        Consumes the segment."""
        self._challenge_ack(now)

    def _fifth_check_ack(self, seg: TcpSegment, seq: int, plen: int, now: float) -> bool:
        """RFC 9293 §3.10.7.4 "fifth, check the ACK field": no ACK, drop; SYN_RECEIVED
        becomes ESTABLISHED on an ACK of our SYN (else RST); an ACK of data never sent or
        too old gets a challenge ACK (RFC 5961 §5.2); then :meth:`_process_ack` and the
        per-state rules for an ACK of our FIN. True if the segment is consumed."""
        if not seg.flags & ACK:
            self.stats.dropped += 1
            return True
        ack = _unwrap(self._snd_una, seg.ack)
        st = self.state
        if st is TcpState.SYN_RECEIVED:
            if self._snd_una < ack <= self._snd_max:
                self._snd_wnd = seg.window << self._snd_wscale
                self._snd_wl1 = seq
                self._snd_wl2 = ack
                self._on_established(now)
                st = self.state
            else:
                self._rst_for(seg)
                self.stats.dropped += 1
                return True
        if ack > self._snd_max or ack < self._snd_una - self._max_snd_wnd:
            # RFC 5961 §5.2: acknowledges something we never sent, or far too old
            self.stats.dropped += 1
            self._challenge_ack(now)
            return True
        ts = seg.timestamp
        self._process_ack(
            seq,
            ack,
            plen,
            seg.flags,
            seg.window,
            None if ts is None else ts[1],
            seg.sack_blocks,
            now,
        )
        if self._fin_queued and self._snd_una > self._data_end():
            # our FIN is acknowledged
            if st is TcpState.FIN_WAIT_1:
                self._set_state(TcpState.FIN_WAIT_2, "rcv ACK of FIN")
                if self._rd_closed:
                    self._linger_at = now + self.config.user_timeout
            elif st is TcpState.CLOSING:
                self._enter_time_wait(now)
                return True
            elif st is TcpState.LAST_ACK:
                self._set_closed(None)
                return True
        return False

    def _process_ack(
        self,
        seq: int,
        ack: int,
        plen: int,
        flags: int,
        window: int,
        tsecr: int | None,
        blocks: tuple[tuple[int, int], ...],
        now: float,
        defer: bool = False,
    ) -> None:
        """An acceptable ACK (RFC 9293 §3.10.7.4 "check the ACK field", as Linux's tcp_ack):
        SACK blocks to the scoreboard, the send window, SND.UNA advancing (the send side's
        ``_on_new_ack``), duplicate ACKs (RFC 5681 §3.2, RFC 6675), RACK-TLP/PRR.

        Takes the segment's fields rather than a :class:`TcpSegment` so that
        :meth:`sack_ack_input` can use it too: ``seq``/``ack`` unwrapped, ``plen`` the
        payload's length, ``window`` the raw (unscaled) field, ``tsecr`` the timestamp echo
        (None without a timestamp option), ``blocks`` the SACK blocks (wire values)."""
        una = self._snd_una
        sack_new = False
        rack = self._rack
        had_sacked = bool(self._sacked)
        in_fr = self._in_fr
        news: list[tuple[int, int]] | None = None
        dr = self._dr
        # SACKed bytes above SND.UNA before this ACK: delivered earlier (delivery.py), and
        # PRR's starting point in recovery
        sacked_before = self._sacked_bytes
        if self._sack_ok and blocks:
            if rack is not None or dr is not None:
                news = []
            sack_new = self._update_scoreboard(blocks, ack if ack > una else una, news)
        wnd = window << self._snd_wscale
        window_changed = False
        # rule: snd-wnd-update (RFC 9293 §3.10.7.4: SND.WND from the newest segment by
        # SND.WL1/SND.WL2; RFC 7323 §2.3: scaled)
        if una <= ack and (self._snd_wl1 < seq or (self._snd_wl1 == seq and self._snd_wl2 <= ack)):
            window_changed = wnd != self._snd_wnd
            self._snd_wnd = wnd
            self._snd_wl1 = seq
            self._snd_wl2 = ack
            if wnd > self._max_snd_wnd:
                self._max_snd_wnd = wnd
        if ack > una:
            self._on_new_ack(ack, una, 0 if tsecr is None else tsecr, now)
        elif (
            ack == una
            and plen == 0
            and not flags & (SYN | FIN)
            and self._snd_max > una
            and (sack_new or not window_changed)
        ):
            self.stats.dup_acks += 1
            self._dupacks += 1
            if self._in_fr:
                if not self._sack_ok and not self._cc.model_based:
                    self._cc.cwnd += self._smss  # window inflation
            elif (
                rack is None
                and una >= self._recover
                and (self._dupacks >= 3 or (self._sack_ok and self._lost_edge() > una))
            ):
                self._enter_fast_recovery(now)
        batch = None
        if defer and rack is not None and self._cc.model_based:
            # (see sack_ack_input): the first ACK's SND.UNA and SACKed bytes above it, and
            # the ranges the batch newly SACKed
            batch = self._ack_batch
            if batch is None:
                batch = self._ack_batch = (una, sacked_before, [])
            if news:
                batch[2].extend(news)
        if rack is not None:
            # (a deferred ACK has SACK blocks: it always gets here, and finish_acks always
            # runs _rack_after_ack)
            if blocks or self._in_fr or had_sacked:
                self._rack_on_ack(blocks, tsecr, una, ack, news or [], now)
                if batch is None:
                    self._rack_after_ack(
                        una, sacked_before if in_fr else 0, now, ack > una or sack_new
                    )
        elif sack_new and self._rxt_marks and self._in_fr:
            self._detect_lost_retransmits()
        if batch is None and dr is not None and (ack > una or sack_new):
            self._on_delivered(una, news, sacked_before, now)
        if window_changed or ack > una:
            self._update_persist(now)

    def _stand_in(self, held: list, window: int, tsval: int, tsecr: int) -> None:
        """A newer ACK of the batch takes the held one's place (ACK coalescing, see
        :meth:`fast_input`): its window and timestamps; the one it replaces is counted."""
        if window > held[5]:
            held[5] = window
        held[2] = window
        held[3] = tsval
        held[4] = tsecr
        self.stats.segments_in += 1
        self.stats.acks_coalesced += 1

    def _take_held(self, now: float) -> None:
        """Process the ACK :meth:`fast_input` or :meth:`sack_ack_input` holds, as the
        newest of those it stood in for (see :meth:`fast_input`)."""
        held = self._held_ack
        assert held is not None
        self._held_ack = None
        wseq, wack, window, tsval, tsecr, largest, blocks, dups = held
        if blocks is None:
            ok = self.fast_input(wseq, wack, ACK, window, tsval, tsecr, b"", now)
        else:
            ok = self.sack_ack_input(wseq, wack, window, tsval, tsecr, blocks, now, True)
        if not ok:
            # (the application closed or aborted since it was held): the general path
            seg = TcpSegment(
                self.remote_port,
                self.local_port,
                wseq,
                wack,
                ACK,
                window,
                (tsval, tsecr),
                blocks or (),
            )
            self.process(seg, now)
        # the largest window any of them offered, as one by one (SWS avoidance's and the
        # ACK check's "largest window the peer has offered")
        largest <<= self._snd_wscale
        if largest > self._max_snd_wnd:
            self._max_snd_wnd = largest
        if dups:
            # each SACK ACK stood in for had this one's ACK and new SACK information: a
            # duplicate ACK as the one after it (RFC 6675), counted as one by one
            self._dupacks += dups
            self.stats.dup_acks += dups

    def finish_acks(self, now: float) -> None:
        """The pure ACK :meth:`fast_input` holds (``hold=True``), processed now; and the
        rest of the ACKs :meth:`sack_ack_input` deferred (``defer=True``), as after one ACK
        that delivered all they did: RACK's loss detection (RFC 8985 §6.2 step 5) and one
        delivery-rate sample for the congestion controller. Nothing if none are pending."""
        if self._held_ack is not None:
            self._take_held(now)
        batch = self._ack_batch
        if batch is None:
            return
        self._ack_batch = None
        if self.state is not TcpState.ESTABLISHED:
            return  # (aborted since: an ICMP error, a RST; nothing to send any more)
        una, sacked_before, news = batch
        # (SND.UNA advanced, or something newly SACKed)
        delivered = self._snd_una > una or bool(news)
        self._rack_after_ack(una, 0, now, delivered)  # (model-based: no PRR)
        if delivered:
            self._on_delivered(una, news, sacked_before, now)

    def _on_delivered(
        self,
        una: int,
        news: list[tuple[int, int]] | None,
        sacked_before: int,
        now: float,
    ) -> None:
        """An ACK delivered data (SND.UNA ``una`` -> now, new SACK blocks ``news``,
        ``sacked_before`` bytes above ``una`` SACKed before it): a delivery-rate sample
        (delivery.py) for the model-based controller (bbr.py)."""
        dr = self._dr
        assert dr is not None
        una_now = self._snd_una
        if news is None and not self._sacked and not sacked_before:
            rs = dr.on_ack_cumulative(una, una_now, now)
            delivered = una_now - una
            inflight = self._snd_nxt - una_now
        else:
            delivered = (una_now - una) - sacked_before
            delivered += self._sacked_bytes
            ranges = [(una, una_now)] if una_now > una else []
            if news:
                ranges.extend(news)
            rs = dr.on_ack(una_now, delivered, ranges, now)
            inflight = self._pipe() if self._in_fr else self._flight()
        if delivered > 0:
            self._cc.on_rate_sample(
                rs, delivered, dr.delivered, inflight, una_now < self._recover, now
            )

    def _process_syn_sent(self, seg: TcpSegment, now: float) -> None:
        flags = seg.flags
        stats = self.stats
        ack: int | None = None
        if flags & ACK:
            ack = _unwrap(self._iss, seg.ack)
            if ack <= self._iss or ack > self._snd_max:
                # RFC 9293 §3.10.7.3: an unacceptable ACK gets <SEQ=SEG.ACK><CTL=RST> (a RST
                # is just dropped), then our SYN goes again at once (§3.5, Figure 10).
                if not flags & RST:
                    self._rst_for(seg)
                    self._retry_syn_now()
                stats.dropped += 1
                return
        if flags & RST:
            if ack is not None:
                self._set_closed(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"))
            else:
                stats.dropped += 1
            return
        if not flags & SYN:
            stats.dropped += 1
            return
        self._irs = seg.seq
        self._rcv_nxt = seg.seq + 1
        self._last_ack_sent = self._rcv_nxt
        self._accept_syn_options(seg, now)
        self._rcv_adv = self._rcv_nxt + min(self._window(), 0xFFFF)
        self._snd_wnd = seg.window
        self._max_snd_wnd = seg.window
        self._snd_wl1 = self._irs
        if ack is None:
            # simultaneous open: answer with SYN-ACK (same ISS)
            self._set_state(TcpState.SYN_RECEIVED, "rcv SYN")
            self._snd_wl2 = self._iss
            self._snd_nxt = self._iss
            return
        self._snd_wl2 = ack
        ts = seg.timestamp
        spurious = False
        if self._ts_ok and ts is not None and ts[1]:
            self._ts_sample(ts[1], now)
            # Our SYN went again on a timeout, but the answer echoes the first one's TSval
            # (sent at _rtt_time): neither that SYN nor this SYN-ACK was lost, the timeout
            # was early (a destination's known RTT, ``syn_rto``, can be shorter than this
            # connect takes); RFC 5681 §3.1's window of one segment is not due (Linux
            # undoes it the same way)
            spurious = self.stats.syn_timeouts > 0 and ts[1] == self._ts_val(self._rtt_time)
        elif self._rtt_seq is not None and ack >= self._rtt_seq:
            self._rtt.sample(now - self._rtt_time)
        self._rtt_seq = None
        self._snd_una = ack
        if self._snd_nxt < ack:
            self._snd_nxt = ack
        self._rto_at = None
        self._on_established(now, spurious)
        self._ack_now = True
        if seg.payload or flags & FIN:
            self._process_data(seg, self._irs + 1, len(seg.payload), False, 0xFFFF, now)

    def _retry_syn_now(self) -> None:
        """Resend our SYN at once after resetting the peer's stale state for this 4-tuple.

        An ACK that does not acknowledge our SYN comes from a connection the peer still
        holds for this 4-tuple: a half-open one (RFC 9293 §3.5, Figure 10: A resets it, then
        "SYN-SENT --> <SEQ=400><CTL=SYN>" again) or, far more often, its TIME_WAIT, which
        answers a SYN it will not accept (PAWS, RFC 7323 §5; or an old sequence number)
        with an ACK. The RST of RFC 9293 §3.10.7.3 that :meth:`_process_syn_sent` queues
        just before ends that state (a TIME_WAIT assassination, RFC 1337, which Linux
        allows by default), so the retry finds the listener. Waiting for the RTO instead
        would stall the connect for a whole second; Linux likewise re-arms its SYN timer to
        TCP_TIMEOUT_MIN here.

        The retry is a retransmission (Karn's rule: no RTT sample without a timestamp echo)
        but not a timeout: no backoff, the initial window stays. At most
        :data:`SYN_FAST_RETRIES` per connection, so a peer answering every SYN with a bad
        ACK cannot make us loop; after that the RTO timer paces the retries as usual.
        """
        if self._syn_fast_retries >= SYN_FAST_RETRIES or self._snd_nxt == self._iss:
            return
        self._syn_fast_retries += 1
        self.stats.syn_fast_retries += 1
        self._snd_nxt = self._iss
        self._rto_at = None  # re-armed by the retry: a full RTO from now

    def _challenge_ack(self, now: float) -> None:
        """RFC 5961 §3.2/§4.2 challenge ACK, rate limited per socket (§7)."""
        if now - self._challenge_start >= 1.0:
            self._challenge_start = now
            self._challenge_count = 0
        if self._challenge_count < self.config.challenge_ack_limit:
            self._challenge_count += 1
            self._ack_now = True
            self.stats.challenge_acks += 1

    def _rst_for(self, seg: TcpSegment) -> None:
        """Queue <SEQ=SEG.ACK><CTL=RST> for an unacceptable ACK (never for a RST)."""
        if not seg.flags & RST and len(self._pending) < 8:  # bounded under a flood
            self._pending.append(TcpSegment(self.local_port, self.remote_port, seg.ack, 0, RST))
            self.stats.segments_out += 1
