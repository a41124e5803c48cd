"""The send side: send buffer, choosing what to send (new data, retransmissions, sender
SWS avoidance, Nagle, limited transmit), building segments, the dispatch loop with its
bulk fast path, SND.UNA advancing (``_on_new_ack``: RTT sample, buffer, recovery exit,
cwnd, timers) and the persist timer (zero-window probes).

As Linux's tcp_output.c plus tcp_ack(): :meth:`Sender._bulk_send` (the fast path) sits
right after :meth:`Sender._emit`, whose rules it mirrors.
"""

from __future__ import annotations

import errno
import math

from mitm_wg.net.recovery import PTO_FLOOR, TIMER_PTO, TIMER_REO, WC_DEL_ACK_T
from mitm_wg.net.tcp_state import (
    _ACK_STATES,
    _RECV_STATES,
    _SEND_STATES,
    _SYN_STATES,
    _USER_SEND_STATES,
    TcpState,
)
from mitm_wg.net.tcp_wire import ACK, FIN, M32, PSH, SYN, TcpRun, TcpSegment, TcpTuple
from mitm_wg.net.tcp_wire import HALF as _HALF

__all__ = ["Sender"]

#: compact a buffer (drop its consumed head) once the head is this large and half of it
_COMPACT_AT = 1 << 16
_INF = float("inf")  # the pacer's budget when pacing is off


class Sender:
    """Mixin of ``TcpSocket``: the send side."""

    def _data_end(self) -> int:
        return self._sbuf_seq + len(self._sbuf) - self._sbuf_head

    def _make_seg(
        self,
        flags: int,
        seq: int,
        payload: bytes | bytearray | memoryview,
        now: float,
        syn_options: tuple[int, int | None, bool] | None = None,
    ) -> TcpSegment:
        """A segment from our side with ACK/window/options filled in; records the ACK sent.

        ``syn_options``: ``(mss, wscale, sack_permitted)`` of a SYN or SYN-ACK. The segment is
        built whole, in one constructor call (segments are never changed afterwards).
        """
        rcv_nxt = self._rcv_nxt
        shift = self._rcv_wscale
        cfg = self.config
        # copy of rule rcv-window (tcp_recv.py _window)
        rcv_buf = self._rcv_buf
        free = rcv_buf - self._rq_len
        if free < 0:
            free = 0
        elif free > 0xFFFF << shift:
            free = 0xFFFF << shift
        if flags & SYN:
            # RFC 7323 §2.2: the window field of a SYN is never scaled
            window = free if free < 0xFFFF else 0xFFFF
            if flags & ACK:
                self._rcv_adv = rcv_nxt + window
        else:
            # Never shrink the right edge; move it only in useful steps (RFC 9293 §3.8.6.2.2).
            cur = self._rcv_adv - rcv_nxt
            if cur < 0:
                cur = 0
            threshold = rcv_buf >> 1 if rcv_buf >> 1 < cfg.mss else cfg.mss
            if free - cur >= threshold:
                window = free >> shift
            else:
                window = (cur + (1 << shift) - 1) >> shift
                if window > 0xFFFF:
                    window = 0xFFFF
            self._rcv_adv = rcv_nxt + (window << shift)
        timestamp = (
            (
                (int(now * 1000) + self._ts_offset) & M32,  # copy of rule ts-val
                self._ts_recent if flags & ACK else 0,
            )
            if self._ts_ok
            else None
        )
        sack_blocks: tuple[tuple[int, int], ...] = ()
        if flags & ACK:
            self._last_ack_sent = rcv_nxt
            self._delack_at = None
            self._ack_now = False
            self._unacked_bytes = 0
            asm = self._asm
            if (asm.size or asm.dsack) and self._sack_ok and not flags & SYN:
                limit = 3 if self._ts_ok else 4
                dsack = asm.dsack
                if dsack is None:
                    blocks = asm.sack_blocks(limit)
                else:
                    # RFC 2883 §4: the duplicate block first, once; then the SACK blocks,
                    # the one holding the duplicate (the most recently changed) first
                    asm.dsack = None
                    self.stats.dsacks_out += 1
                    blocks = (dsack, *asm.sack_blocks(limit - 1))
                sack_blocks = tuple((s & M32, e & M32) for s, e in blocks)
        self.stats.segments_out += 1
        mss, wscale, sack_permitted = syn_options or (None, None, False)
        return TcpSegment(
            self.local_port,
            self.remote_port,
            seq & M32,
            rcv_nxt & M32 if flags & ACK else 0,
            flags,
            window,
            timestamp,
            sack_blocks,
            payload,
            mss=mss,
            wscale=wscale,
            sack_permitted=sack_permitted,
        )

    def _next_tx(self) -> tuple[int, int, bool] | None:
        """The next segment to send as (start, end, is_retransmission); no side effects."""
        st = self.state
        if st in _SYN_STATES:
            if self._snd_nxt == self._iss:
                return (self._iss, self._iss + 1, self._snd_max > self._iss)
            return None
        if st not in _SEND_STATES:
            return None
        una = self._snd_una
        smax = self._snd_max
        cwnd = self._cc.cwnd
        if self._in_fr:
            if self._sack_ok:
                if self._rexmit_now:
                    s = self._first_unsacked(una)
                    if s < smax:
                        return self._rexmit_range(s)
                pipe = self._pipe()
                if cwnd - pipe < self._smss:
                    return None
                for rs, re in self._relost:  # lost retransmissions first
                    s = self._first_unsacked(rs if rs > una else una)
                    if s < re:
                        s, e, _ = self._rexmit_range(s)
                        return (s, e if e < re else re, True)
                hr = self._high_rxt
                s = self._first_unsacked(hr if hr > una else una)
                if s < smax and s < self._lost_edge():  # NextSeg rule 1
                    return self._rexmit_range(s)
                new = self._new_range(smax, pipe)  # rule 2
                if new is not None:
                    return new
                if self._sacked and s < self._sacked[-1][1] and self._rack is None:  # rule 3
                    # (not with RACK: RFC 8985 retransmits only what it deems lost; its
                    # reorder timer and the TLP keep recovery going)
                    return self._rexmit_range(s)
                return None
            if self._rexmit_now:
                e = una + self._smss
                return (una, e if e < smax else smax, True)
        if self._sacked:
            flight = self._flight()
        else:
            flight = self._snd_nxt - una
        dupacks = self._dupacks
        if flight >= cwnd:
            # Limited transmit (RFC 3042): one new segment for each of the first two dup ACKs
            if not (
                0 < dupacks < 3 and self._snd_nxt == smax and flight < cwnd + dupacks * self._smss
            ):
                return None
            new = self._new_range(smax, flight)
            if new is not None and new[1] - new[0] < self._smss and new[1] < self._data_end():
                return None
            return new
        nxt = self._snd_nxt
        if nxt < smax:  # going back after an RTO, skipping SACKed data
            s = self._first_unsacked(nxt)
            if s < smax:
                return self._rexmit_range(s)
        return self._new_range(smax, flight)

    def _new_range(self, s: int, flight: int) -> tuple[int, int, bool] | None:
        data_end = self._sbuf_seq + len(self._sbuf) - self._sbuf_head
        send_end = data_end + 1 if self._fin_queued else data_end
        if s >= send_end:
            return None
        avail = self._snd_una + self._snd_wnd - s
        if avail <= 0:
            return None
        left = send_end - s
        smss = self._smss
        n = smss if smss < avail else avail
        if left < n:
            n = left
        if n < left:
            if n < smss and flight > 0 and n < (self._max_snd_wnd >> 1):
                return None  # sender SWS avoidance: wait for a useful window
        elif self.config.nagle and n < smss and flight > 0 and s < data_end:
            return None  # Nagle: one small segment in flight at a time
        return (s, s + n, False)

    def _rexmit_range(self, s: int) -> tuple[int, int, bool]:
        e = s + self._smss
        for rs, _re in self._sacked:
            if rs > s:
                if rs < e:
                    e = rs
                break
        if e > self._snd_max:
            e = self._snd_max
        return (s, e, True)

    def _emit(self, s: int, e: int, rexmit: bool, now: float, out: list[TcpSegment]) -> None:
        stats = self.stats
        if s == self._iss and self.state in _SYN_STATES:
            cfg = self.config
            if self.state is TcpState.SYN_RECEIVED:
                # SYN-ACK: echo only what the peer offered (RFC 7323 §1.3, §2.2; RFC 2018 §2)
                flags = SYN | ACK
                wscale = self._rcv_wscale if self._ws_ok else None
                sack_permitted = self._sack_ok
            else:
                # SYN: offer everything configured (the timestamp option follows _ts_ok,
                # which is config.timestamps until a SYN from the peer arrives)
                flags = SYN
                wscale = self._rcv_wscale if cfg.window_scaling else None
                sack_permitted = cfg.sack
            seg = self._make_seg(flags, s, b"", now, (cfg.mss, wscale, sack_permitted))
            self._snd_nxt = s + 1
            if self._snd_max < s + 1:
                self._snd_max = s + 1
            if rexmit:
                stats.retransmits += 1
                self._rtt_seq = None
            else:
                self._rtt_seq = s + 1  # Karn's rule timing (unless timestamps get agreed)
                self._rtt_time = now
            if self._rto_at is None:
                self._rto_at = now + self._rtt.rto
            out.append(seg)
            return
        data_end = self._sbuf_seq + len(self._sbuf) - self._sbuf_head
        pe = e if e < data_end else data_end
        asm = self._asm
        if self._sack_ok and (asm.size or asm.dsack):
            # SACK blocks (a D-SACK block among them) take option space from the payload
            n = len(asm) + (asm.dsack is not None)
            room = self._smss - 4 - 8 * min(n, 3 if self._ts_ok else 4)
            if pe - s > room:
                pe = e = s + room
        flags = ACK
        if pe > s:
            base = self._sbuf_head - self._sbuf_seq
            payload: bytes | bytearray = self._sbuf[base + s : base + pe]
            if pe == data_end:
                flags |= PSH
        else:
            payload = b""
        if self._fin_queued and e == data_end + 1:
            flags |= FIN
        seg = self._make_seg(flags, s, payload, now)
        dr = self._dr
        if dr is not None:
            dr.on_send(s, e, now, self._snd_max - self._snd_una, rexmit)
        rack = self._rack
        if rack is not None:
            # RFC 8985 §5.2 Segment.xmit_ts: copy of rule rack-xmit-ts (recovery.py
            # Rack.on_send) for the common case, the batch grows
            if rexmit:
                rack.on_send(s, e, now, True, self._snd_una)
            else:
                sent = rack.sent
                if sent and sent[-1][1] >= now:  # (a clock gone back: as Rack.on_send)
                    sent[-1][0] = e
                else:
                    sent.append([e, now])
                    if not len(sent) & 63:
                        rack.trim(self._snd_una)  # amortized: once per 64 batches
            if self._in_fr:
                rack.prr_out += e - s  # RFC 6937 §3: prr_out += data sent
        # rule: emit-seq (SND.NXT/SND.MAX advance; RTT timing by Karn's rule without timestamps)
        if e > self._snd_nxt:
            self._snd_nxt = e
        if e > self._snd_max:
            if self._snd_max == self._snd_una:
                self._last_progress = now
            self._snd_max = e
            if not rexmit and self._rtt_seq is None and not self._ts_ok:
                self._rtt_seq = e
                self._rtt_time = now
        if rexmit:
            stats.retransmits += 1
            rs = self._rtt_seq
            if rs is not None and s < rs <= e:
                self._rtt_seq = None  # Karn: the timed segment is being retransmitted
            self._rexmit_now = False
            if e > self._high_rxt:
                self._high_rxt = e
            if self._in_fr and self._sack_ok:
                if self._relost:
                    # this segment is sent again; the rest of its range still is to be (a
                    # range is a whole burst of retransmissions RACK deemed lost at once)
                    keep = []
                    for r in self._relost:
                        if r[0] <= s < r[1]:
                            if s > r[0]:
                                keep.append((r[0], s))
                            if e < r[1]:
                                keep.append((e, r[1]))
                        else:
                            keep.append(r)
                    self._relost = keep
                self._rxt_marks.append((s, e, self._snd_max))
        if self._rto_at is None or (
            rexmit and s == self._snd_una and not self._newreno_rto_spent()
        ):
            # (re)start the timer (RFC 6298 §5.1); deviation: retransmitting the head
            # restarts it too (RFC 6298 §5.3 restarts only on a new ACK; Linux does this),
            # so a fast retransmission gets a full RTO to be acknowledged; in NewReno
            # recovery only while TcpConfig.newreno_rto_restarts lasts
            if self._rto_at is None and rack is not None and not self._in_fr:
                # one segment in flight: this one, and nothing more queued behind it
                self._arm_pto(now, e - self._snd_una <= self._smss and e >= data_end)
            self._rto_at = now + self._rtt.rto
        out.append(seg)

    def _bulk_send(
        self,
        now: float,
        out: list[TcpSegment | TcpTuple | TcpRun],
        tuples: bool,
        budget: float = _INF,
    ) -> int:
        """Bulk-send fast path of :meth:`dispatch`: the full-size segments of new data that
        the congestion and peer windows allow, with exactly the effect (segments, state,
        counters) of the ``_next_tx``/``_emit`` loop, which carries on from where this stops
        (partial segments, FIN, limited transmit, recovery, SACK options).

        Returns the number of segments emitted. Called when ``_next_tx`` offers a full
        segment of new data, in or out of loss recovery; it declines (0) unless SND.NXT ==
        SND.MAX and no SACK blocks are to be sent. Every segment after the first has the
        first one's ACK, window and timestamp fields: nothing between them changes RCV.NXT,
        the receive buffer or the clock, and the advertised-window computation of
        ``_make_seg`` gives the same field again once it has run (its result is a fixed
        point). Sending new data changes nothing ``_next_tx`` looks at before its new-data
        step (retransmissions due, RACK's lost edge, the scoreboard): once it offers new
        data it goes on doing so while the window lasts, and each segment adds its length
        to both the flight and the pipe (RFC 6675 SetPipe), so that limit is computed once.
        """
        s = self._snd_max
        if self._snd_nxt != s or ((self._asm.size or self._asm.dsack) and self._sack_ok):
            return 0
        una = self._snd_una
        smss = self._smss
        sbuf = self._sbuf
        sbuf_seq = self._sbuf_seq
        data_end = sbuf_seq + len(sbuf) - self._sbuf_head
        limit = una + self._snd_wnd
        if data_end < limit:
            limit = data_end
        cwnd = self._cc.cwnd
        if self._in_fr and self._sack_ok:
            # _next_tx in SACK recovery: a segment at e goes while cwnd - pipe >= SMSS,
            # i.e. e <= s + cwnd - pipe - SMSS (cwnd may be a float)
            cw_end = s + math.floor(cwnd - self._pipe() - smss) + 1
        elif self._sacked:
            cw_end = s + cwnd - self._flight()  # _next_tx: while flight < cwnd
        else:
            cw_end = una + cwnd  # (the same, with nothing SACKed)
        if s + budget < cw_end:
            cw_end = s + budget  # the pacer's budget (pacing.py), same overdraw rule
        if s + smss > limit or s >= cw_end:
            return 0
        # the first one the general way: it sets the ACK/window/timer/RTT state
        self._emit(s, s + smss, False, now, out)
        s += smss
        first_end = s
        if s + smss > limit or s >= cw_end:
            return 1
        first = out[-1]
        lport = self.local_port
        rport = self.remote_port
        ack = first.ack
        window = first.window
        ts = first.timestamp
        base = self._sbuf_head - sbuf_seq
        n = 1
        if tuples and ts is not None:
            tsval, tsecr = ts
            # one TcpRun (their shared fields are summed and packed once per run); bytes
            # straight from a view: one copy, and the checksum's int.from_bytes then needs
            # no second one (it copies anything but bytes)
            run_seq = s & M32
            payloads: list[bytes] = []
            view = memoryview(sbuf)
            try:
                while True:
                    e = s + smss
                    payloads.append(bytes(view[base + s : base + e]))
                    n += 1
                    s = e
                    if e + smss > limit or e >= cw_end:
                        break
            finally:
                view.release()
            # the segment that ends the data (always the last: limit <= data_end) has PSH
            last = payloads.pop() if s == data_end else None
            if payloads:
                out.append((lport, rport, run_seq, ack, ACK, window, tsval, tsecr, payloads))
            if last is not None:
                out.append(
                    (lport, rport, (s - smss) & M32, ack, ACK | PSH, window, tsval, tsecr, last)
                )
        else:
            while True:
                e = s + smss
                out.append(
                    TcpSegment(
                        lport,
                        rport,
                        s & M32,
                        ack,
                        ACK | PSH if e == data_end else ACK,
                        window,
                        ts,
                        (),
                        sbuf[base + s : base + e],
                    )
                )
                n += 1
                s = e
                if e + smss > limit or e >= cw_end:
                    break
        # copy of rule emit-seq: the first segment set _last_progress and the RTT timing
        self._snd_nxt = s
        self._snd_max = s
        rack = self._rack
        if rack is not None:
            # the first one's send-time batch grows: copy of rule rack-xmit-ts
            rack.sent[-1][0] = s
            if self._in_fr:
                rack.prr_out += s - first_end  # as _emit: RFC 6937 prr_out += data sent
        dr = self._dr
        if dr is not None:
            dr.records[-1][1] = s  # the first one's delivery-rate record grows too
        self.stats.segments_out += n - 1
        return n

    def dispatch(
        self, now: float, out: list[TcpSegment | TcpTuple | TcpRun], tuples: bool = False
    ) -> None:
        """Run expired timers and append the segments to send now to ``out``.

        ``tuples``: the caller (the stack) also accepts full-size data segments
        in their fast-path encodings, :data:`~mitm_wg.net.tcp_wire.TcpTuple` and
        :data:`~mitm_wg.net.tcp_wire.TcpRun` (segments whose only option is the timestamp;
        see :meth:`_bulk_send`).
        """
        if self._ack_batch is not None or self._held_ack is not None:
            self.finish_acks(now)
        self._now = now
        if self._pending:
            out.extend(self._pending)
            self._pending.clear()
        st = self.state
        if st is TcpState.CLOSED or st is TcpState.LISTEN:
            return
        if self._linger_at is not None and now >= self._linger_at:
            self._set_closed(None)
            return
        if self._rec_at is not None and now >= self._rec_at:
            self._on_rec_timer(now, out)  # before the RTO: a probe due with it goes instead
        if self._rto_at is not None and now >= self._rto_at:
            self._on_rto(now)
            if self.state is TcpState.CLOSED:
                return
        if self._delack_at is not None and now >= self._delack_at:
            self._delack_at = None
            self._ack_now = True
        if self._persist_at is not None and now >= self._persist_at:
            self._persist_probe(now, out)
        if self._stall_at is not None and now >= self._stall_at:
            self._stall_timer(now, out)
        if self.config.keepalive is not None:
            self._keepalive(now, out)
            if self.state is TcpState.CLOSED:
                return
        if self._acks_owed:
            # One duplicate ACK per out-of-order segment, so that the sender can count
            # them (RFC 5681 §4.2: three trigger a fast retransmit). They are all the same
            # ACK: with SACK, after the first three for one RCV.NXT (Assembler.dup_acks_due,
            # as Linux's SACK compression), only the one below, which carries every block.
            owed = min(self._acks_owed, 16)
            self._acks_owed = 0
            if self.state in _ACK_STATES:
                if self._sack_ok:
                    owed = self._asm.dup_acks_due(self._rcv_nxt, owed)
                for _ in range(owed):
                    out.append(self._make_seg(ACK, self._snd_max, b"", now))
                self._ack_now = True
        guard = 0
        budget = _INF
        pacer = self._pacer
        sending = self.state in _SEND_STATES
        if pacer is not None and sending:
            # pacing.py: the bytes the pacer lets go now
            cc = self._cc
            budget = pacer.budget(now, cc.pacing_rate(self._rtt.srtt), cc.release_time)
        sent = 0
        smss = self._smss
        idle = False  # the loop ran out of things to send (not out of pacing budget)
        while guard < 100000 and sent < budget:
            tx = self._next_tx()
            if tx is None:
                idle = True
                break
            s, e, rexmit = tx
            if not rexmit and e - s == smss:
                # a full segment of new data: the run of them goes the bulk way (in loss
                # recovery too, where all but the retransmissions are new data)
                n = self._bulk_send(now, out, tuples, budget - sent)
                if n:
                    sent += self._snd_max - s
                    guard += n
                    continue
            self._emit(s, e, rexmit, now, out)
            sent += e - s
            guard += 1
        if sent and pacer is not None:
            pacer.on_sent(sent)
        dr = self._dr
        if dr is not None and idle and sending:
            # delivery-rate draft §3.4: nothing more to send with room in the window. We
            # also count the peer's window as a limit of the application's (a receiver
            # growing its window, as Linux's does over the first RTTs, would otherwise
            # look like a full pipe to BBR's startup)
            if (
                not self._pending_send()
                or self._snd_max + self._smss > self._snd_una + self._snd_wnd
            ):
                flight = self._flight()
                if flight < self._cc.cwnd:
                    dr.on_app_limited(flight)
        if self._ack_now and self.state in _ACK_STATES:
            # SEQ=SND.MAX, not the RTO-rewound SND.NXT (RFC 9293 §3.10.7.4 would send
            # SND.NXT): a peer holding the data would discard a seemingly old ACK
            out.append(self._make_seg(ACK, self._snd_max, b"", now))
        self._update_persist(now)

    def _newreno_rto_spent(self) -> bool:
        """In NewReno recovery, the partial ACKs have spent TcpConfig.newreno_rto_restarts:
        neither they nor the resends of the head restart the RTO any more."""
        return self._in_fr and self._partial_acks > self.config.newreno_rto_restarts

    def _on_new_ack(self, ack: int, una: int, tsecr: int, now: float) -> None:
        """SND.UNA advances from ``una`` to ``ack``: RTT sample, send buffer, recovery, cwnd.

        ``tsecr`` is the segment's timestamp echo (0 when absent).
        """
        acked = ack - una
        rtt = self._rtt
        sample = None  # this ACK's RTT sample (HyStart++ sees it)
        if self._ts_ok and tsecr:
            # copy of rule ts-rtt-sample (tcp_timers.py _ts_sample) and of rule ts-val
            floor = self._ts_rto_floor
            if floor is None or (tsecr - floor) & M32 < _HALF:
                elapsed = ((int(now * 1000) + self._ts_offset) - tsecr) & M32
                if elapsed < _HALF:
                    sample = elapsed / 1000.0
                    rtt.sample(sample)
        elif self._rtt_seq is not None and ack >= self._rtt_seq:
            sample = now - self._rtt_time
            rtt.sample(sample)
            self._rtt_seq = None
        sbuf = self._sbuf
        sbuf_seq = self._sbuf_seq
        data_end = sbuf_seq + len(sbuf) - self._sbuf_head
        drop_to = ack if ack < data_end else data_end
        n = drop_to - sbuf_seq
        if n > 0:
            head = self._sbuf_head + n
            self._sbuf_seq = drop_to
            if head >= len(sbuf):
                sbuf.clear()
                head = 0
            elif head >= _COMPACT_AT and head * 2 >= len(sbuf):
                del sbuf[:head]
                head = 0
            self._sbuf_head = head
        self._snd_una = ack
        if self._snd_nxt < ack:
            self._snd_nxt = ack
        if self._high_rxt < ack:
            self._high_rxt = ack
        if self._sacked:
            self._trim_scoreboard(ack)
        self._last_progress = now
        cc = self._cc
        restart_rto = True
        if self._in_fr:
            if ack >= self._recover:
                self._in_fr = False
                self._dupacks = 0
                self._rxt_marks.clear()
                self._relost.clear()
                if self._rack is not None:
                    self._rack.on_recovery_exit()
                if cc.model_based:
                    pass  # BBR restores its own window (bbr.py)
                elif self._sack_ok:
                    cc.cwnd = cc.ssthresh
                else:
                    flight = self._snd_max - ack
                    cc.cwnd = min(cc.ssthresh, max(flight, self._smss) + self._smss)
            elif not self._sack_ok:
                # NewReno partial ACK (RFC 6582 §3.2 step 5): retransmit the next hole; the
                # RTO restarts while TcpConfig.newreno_rto_restarts lasts
                self._rexmit_now = True
                # each one spends 1 of the budget, 4 if the next hole was close by (losses
                # in a burst: going back N resends little that had arrived)
                self._partial_acks += 4 if acked < 3 * self._smss else 1
                restart_rto = not self._newreno_rto_spent()
                if not cc.model_based:
                    cwnd = cc.cwnd - acked
                    if acked >= self._smss:
                        cwnd += self._smss
                    cc.cwnd = cwnd if cwnd > self._smss else self._smss
        else:
            self._dupacks = 0
            if n > 0 and not cc.model_based:  # (BBR's cwnd follows its rate samples)
                cc.on_ack(n, now, rtt.srtt, sample, ack, self._snd_max)
        if (
            ack == self._snd_max
            and not sbuf
            and self._stall_seq != self._rcv_nxt
            and ack != self._iss + 1
            and self.state in _RECV_STATES
            and not self._rd_closed
        ):
            # rule rx-stall: all our data (a request; not our SYN alone), with nothing
            # more queued, is acknowledged: an answer is due (also after our FIN: a
            # client that half-closes once its request is out)
            self._arm_stall(now)
        rack = self._rack
        if rack is None:
            if ack == self._snd_max:
                self._rto_at = None
            elif restart_rto:
                self._rto_at = now + rtt.rto
            return
        if rack.tlp_end is not None and ack >= rack.tlp_end:
            self._tlp_acked(ack, now)
        smax = self._snd_max
        if ack == smax:
            self._rto_at = None
            self._rec_at = None
            rack.timer = 0
            if rack.sent:
                rack.sent.clear()  # nothing outstanding: no send times to keep
        else:
            rto = rtt.rto
            self._rto_at = now + rto
            if rack.timer != TIMER_REO and not self._in_fr and rack.tlp_end is None:
                # copy of rule pto (recovery.py Rack.pto, _arm_pto; RFC 8985 §7.2): PTO = 2*SRTT (+ WCDelAckT with one
                # segment in flight), at least PTO_FLOOR, at most the RTO
                srtt = rtt.srtt
                if srtt is None:
                    pto = 1.0
                else:
                    pto = 2 * srtt
                    if smax - ack <= self._smss:
                        pto += WC_DEL_ACK_T
                    if pto < PTO_FLOOR:
                        pto = PTO_FLOOR
                self._rec_at = now + (pto if pto < rto else rto)
                rack.timer = TIMER_PTO

    def _send_end(self) -> int:
        """End of what there is to send: the data, and the FIN once queued."""
        return self._data_end() + (1 if self._fin_queued else 0)

    def _pending_send(self) -> bool:
        return self._send_end() > self._snd_max

    def _update_persist(self, now: float) -> None:
        una = self._snd_una
        if (
            self._snd_max == una
            and una + self._snd_wnd <= una
            and self.state in _SEND_STATES
            and self._pending_send()
        ):
            if self._persist_at is None:
                self._persist_at = now + self._persist_interval()
        elif self._persist_at is not None or self._persist_backoff:
            self._persist_at = None
            self._persist_backoff = 0

    def _persist_interval(self) -> float:
        rtt = self._rtt
        return min(rtt.base_rto * (1 << min(self._persist_backoff, 30)), rtt.max_rto)

    def _persist_probe(self, now: float, out: list[TcpSegment]) -> None:
        """Zero-window probe: an out-of-window ACK (SEQ=SND.UNA-1) makes the peer answer.

        Deviation: RFC 9293 §3.8.6.1 probes with one byte of new data; this empty probe (as
        Linux's tcp_xmit_probe_skb) gets the same ACK with the current window and never
        puts data beyond the window on the wire. Backoff as RFC 1122 §4.2.2.17.
        """
        out.append(self._make_seg(ACK, self._snd_una - 1, b"", now))
        self.stats.zero_window_probes += 1
        self._persist_backoff += 1
        self._persist_at = now + self._persist_interval()

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Queue data; returns the number of bytes accepted (0 when the buffer is full)."""
        if self.error is not None:
            raise self.error
        if self._fin_queued or self.state not in _USER_SEND_STATES:
            raise BrokenPipeError(errno.EPIPE, "socket is not open for sending")
        space = self.send_space
        n = len(data)
        if n > space:
            n = space
            data = memoryview(data)[:n]
        if n:
            self._sbuf += data
            if self._persist_at is None and self.state in _SEND_STATES:
                self._update_persist(self._now)
        on_touched = self._on_touched  # (inlined _touched())
        if on_touched is not None:
            on_touched(self)
        return n

    def send_limit(self) -> str:
        """What holds the sender back at this moment, for diagnostics (the question Linux's
        TCP_INFO busy/rwnd-limited/sndbuf-limited times answer): ``""`` nothing (it would
        send), ``"pacer"`` a segment is due but the pacer's credit is spent, ``"cwnd"`` the
        congestion window (in SACK recovery: cwnd - pipe) is used up, ``"rwnd"`` the peer's
        window is, ``"sndbuf"`` all the data is out and the send buffer is full of it,
        ``"app"`` all the application gave is out, ``"idle"``: and acknowledged too (or the
        state sends no data). Costs one ``_next_tx`` call: not for the hot path."""
        if self.state not in _SEND_STATES:
            return "idle"
        if self._next_tx() is not None:
            pacer = self._pacer
            if pacer is not None and pacer.rate > 0.0 and pacer.tokens < 1.0:
                return "pacer"
            return ""
        smax = self._snd_max
        unsent = self._send_end() - smax
        if unsent <= 0:
            if smax == self._snd_una:
                return "idle"
            return "sndbuf" if self.send_space == 0 else "app"
        if smax + min(unsent, self._smss) > self._snd_una + self._snd_wnd:
            return "rwnd"
        if unsent < self._smss and self.config.nagle:
            return "app"  # Nagle: a small segment waits for the ACK of what is out
        return "cwnd"

    @property
    def send_space(self) -> int:
        buf = self._snd_buf
        cap = self.config.send_buffer_max
        if buf < cap:
            # Send buffer autotuning (Linux's tcp_sndbuf_expand): room for twice the data
            # the path can hold in flight — the congestion window, bounded by the largest
            # window the peer offered — so that a full window is in flight while the next
            # one is already queued (and retransmissions have their data). Only grows.
            cwnd = self._cc.cwnd
            if cwnd > self._max_snd_wnd:
                cwnd = self._max_snd_wnd
            want = 2 * cwnd
            if want > buf:
                buf = self._snd_buf = want if want < cap else cap
        n = buf - (len(self._sbuf) - self._sbuf_head)
        return n if n > 0 else 0
