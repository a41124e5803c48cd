"""The receive side: in-order data and reassembly (``Assembler``), the advertised window
(receiver SWS avoidance), ACK scheduling (delayed ACK), the peer's FIN, and receive buffer
autotuning (dynamic right-sizing, ``_RcvTuning``).
"""

from __future__ import annotations

from mitm_wg.net.tcp_state import _RECV_STATES, TcpState
from mitm_wg.net.tcp_wire import ACK, FIN, M32, PSH, TcpSegment
from mitm_wg.net.tcp_wire import HALF as _HALF

__all__ = ["Receiver"]

#: In-order data shorter than this joins the queue's last chunk when that is a bytearray of
#: fewer than _TAIL_MAX bytes (or starts one), so that a stream of small segments is not a
#: queue of small objects; longer data is queued as it came (a run's joined payload: no copy)
_SMALL_DATA = 4096
_TAIL_MAX = 64 * 1024


class _RcvTuning:
    """Receive-buffer autotuning state of one socket (see ``Receiver._rcv_space_adjust``)."""

    __slots__ = ("rtt", "seq", "space", "time", "tsecr")

    def __init__(self, now: float, space: int) -> None:
        self.seq = 0  # bytes the application had read when the current measurement began
        self.time = now  # ...and when it began
        self.space = space  # bytes read during the last measured RTT
        self.rtt = 0.0  # smallest receiver-side RTT sample in seconds (0: none yet)
        self.tsecr = 0  # the last timestamp echo that gave (or could give) an RTT sample


class Receiver:
    """Mixin of ``TcpSocket``: the receive side."""

    def _window(self) -> int:
        """Free receive buffer space, capped to what the window field can express."""
        # rule: rcv-window
        free = self._rcv_buf - self._rq_len
        if free < 0:
            return 0
        cap = 0xFFFF << self._rcv_wscale
        return free if free < cap else cap

    def _schedule_ack(self, plen: int, push: int, now: float) -> None:
        """When to ACK in-order data (RFC 9293 §3.8.6.3, RFC 5681 §4.2).

        Delay, but ACK at least every second full-sized segment, and at once for a pushed
        segment shorter than the MSS: its sender has nothing more in flight behind it and is
        likely waiting for this ACK (Nagle's algorithm holding back its next small write, or
        a request/response exchange). Delaying that ACK costs a whole delayed-ACK timeout per
        exchange — 40 ms per HTTP response written as headers + body by a Nagle sender. Darwin
        (delayed_ack=3) does the same.
        """
        if (
            self._unacked_bytes >= 2 * self._rcv_mss
            or (push and plen < self._rcv_mss)
            or self.config.delayed_ack <= 0
        ):
            self._ack_now = True
        elif self._delack_at is None:
            self._delack_at = now + self.config.delayed_ack

    def _process_data(
        self,
        seg: TcpSegment,
        seq: int,
        plen: int,
        zero_wnd: bool,
        wnd: int,
        now: float,
    ) -> None:
        payload = seg.payload
        fin = seg.flags & FIN
        if zero_wnd:
            self._ack_now = True
            return
        rcv_nxt = self._rcv_nxt
        if seq < rcv_nxt:
            cut = rcv_nxt - seq
            if cut > plen:
                cut = plen
            payload = payload[cut:]
            if cut:
                self._asm.duplicate(seq, seq + cut)  # copy of rule dsack (tcp_input.py)
            seq += cut
            self._ack_now = True  # duplicate data: the peer missed our ACK
        right = rcv_nxt + wnd
        if seq + len(payload) > right:
            payload = payload[: max(right - seq, 0)]
            fin = 0
            self._ack_now = True  # the window is full: tell the sender at once
        plen = len(payload)
        if plen and self._rd_closed:
            # data nobody will read (RFC 9293 §3.6 / RFC 2525): reset
            self.abort(now)
            return
        gap_filled = False
        if seq == rcv_nxt:
            if plen:  # rule: rcv-in-order
                self._queue_data(payload)
                rcv_nxt += plen
                if plen > self._rcv_mss:
                    self._rcv_mss = min(plen, self.config.mss)
                drs = self._drs
                ts = seg.timestamp
                if drs is not None and ts is not None and self._ts_ok and ts[1] != drs.tsecr:
                    self._rcv_rtt_sample(drs, ts[1], plen, now)
                self._unacked_bytes += plen
                asm = self._asm
                if asm:
                    gap_filled = True
                    while True:
                        more = asm.pop(rcv_nxt)
                        if more is None:
                            break
                        self._queue_data(more)
                        rcv_nxt += len(more)
                    self._ack_now = True  # gap (partly) filled: ACK at once
                    # The duplicate ACKs still owed for the old in-order point (segments
                    # after the gap that came in the same batch, before the one filling
                    # it) would go out as copies of this new ACK: a sender would count
                    # them as duplicates of it. The one ACK at once says it all.
                    self._acks_owed = 0
                else:
                    self._schedule_ack(plen, seg.flags & PSH, now)
                self._rcv_nxt = rcv_nxt
        elif seq > rcv_nxt:  # rule: rcv-out-of-order
            self.stats.out_of_order += 1
            self._sack_flush(seq, rcv_nxt, now)
            if plen and not self._asm.add(seq, payload):
                self.stats.dropped += 1
                self.stats.ofo_drops += 1
            if fin:
                self._peer_fin_seq = seq + plen
            # one duplicate ACK per out-of-order segment, so the peer can count them (with
            # SACK, only the first three per RCV.NXT: see Sender.dispatch)
            if self._ack_now:
                self._acks_owed += 1
            self._ack_now = True
            return
        if fin:
            self._peer_fin_seq = seq + plen
        if self._peer_fin_seq is not None and not self._rcv_fin and rcv_nxt == self._peer_fin_seq:
            self._rcv_fin = True
            self._rcv_nxt = rcv_nxt + 1
            self._stall_at = None  # rule rx-stall: nothing more is due
            st = self.state
            if st is TcpState.ESTABLISHED:
                self._set_state(TcpState.CLOSE_WAIT, "rcv FIN")
                # The peer closed first (an HTTP server after "Connection: close"): our
                # application usually closes as soon as it reads the EOF, and its FIN then
                # carries this ACK — one segment instead of two (Linux's delayed-ACK
                # "pingpong" mode does the same for the FIN). A delayed ACK (RFC 9293
                # §3.8.6.3, RFC 1122 §4.2.3.2): never later than config.delayed_ack. It also
                # covers an immediate ACK still owed for the short pushed reply just before
                # the FIN (the peer has nothing more to send, so no latency is lost), but
                # not the immediate ACKs RFC 5681 §4.2 asks for: a filled gap, or a second
                # full-sized segment.
                if (
                    self.config.delayed_ack > 0
                    and fin  # this segment's FIN, not one held back behind a gap
                    and not gap_filled
                    and self._unacked_bytes < 2 * self._rcv_mss
                ):
                    self._ack_now = False
                    if self._delack_at is None:
                        self._delack_at = now + self.config.delayed_ack
                else:
                    self._ack_now = True
                return
            self._ack_now = True
            if st is TcpState.FIN_WAIT_1:
                self._set_state(TcpState.CLOSING, "rcv FIN")
            elif st is TcpState.FIN_WAIT_2:
                self._enter_time_wait(now)

    def _sack_flush(self, seq: int, rcv_nxt: int, now: float) -> None:
        """Out-of-order data at ``seq`` is about to go to the Assembler (rule sack-flush,
        for the general path and ``fast_input``'s runs ahead of a hole). If it will change
        another SACK block than the first, the ACK owed for what arrived before goes now,
        with the blocks as they are: an ACK holds three or four blocks, and if every ACK
        were made at the end of a batch, each would report only the last ones to change; a
        range reported in no ACK (or in one lost on the way) looks lost to the sender's
        RACK, which retransmits it. As Linux, which sends its compressed SACK before a
        block would be evicted (tcp_sack_new_ofo_skb). The ACK is one of the duplicate
        ACKs that Assembler.dup_acks_due counts; it waits in ``_pending`` for dispatch.

        Rule rx-stall starts here too: the first data held beyond a hole at this RCV.NXT
        arms the stall timer (``TcpConfig.rx_stall``, ``Timers._arm_stall``)."""
        if self._stall_seq != rcv_nxt:  # rx-stall: data held beyond a hole: the hole is due
            self._arm_stall(now)
        asm = self._asm
        if self._ack_now and asm.size and self._sack_ok and not asm.extends_newest(seq):
            self._pending.append(self._make_seg(ACK, self._snd_max, b"", now))
            asm.dup_acks_due(rcv_nxt, 0)

    def _queue_data(self, data: bytes | bytearray | memoryview) -> None:
        """Queue in-order data for :meth:`recv` (rule rcv-in-order's buffer).

        Chunks are kept as they came, not copied into one growing buffer: a run of segments
        arrives as one joined ``bytes`` (``Stack._flush_run``), and a read that takes whole
        chunks hands them on without copying them again (one contiguous buffer cost a copy
        in, a copy out and the reallocations of a buffer that empties and refills with every
        read: ~8 % of a bulk download's receive thread). Small data is coalesced into a
        bytearray tail, which bounds the number of chunks by the bytes buffered."""
        n = len(data)
        q = self._rq
        if n < _SMALL_DATA:
            if q and type(tail := q[-1]) is bytearray and len(tail) < _TAIL_MAX:
                tail += data
            else:
                q.append(bytearray(data))
        else:
            q.append(data if type(data) is bytes else bytes(data))
        self._rq_len += n

    def recv(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of in-order data; b"" if none (see ``at_eof``)."""
        avail = self._rq_len
        n = max_bytes if max_bytes < avail else avail
        if n <= 0:
            return b""
        q = self._rq
        off = self._rq_off
        first = q[0]
        if not off and len(first) == n:
            del q[0]
            data = first if type(first) is bytes else bytes(first)
        else:
            parts: list[bytes | bytearray | memoryview] = []
            need = n
            taken = 0
            for chunk in q:
                size = len(chunk) - off
                if size > need:  # the last part: a piece of this chunk, which stays
                    parts.append(memoryview(chunk)[off : off + need])
                    off += need
                    break
                parts.append(chunk if not off else memoryview(chunk)[off:])
                need -= size
                off = 0
                taken += 1
                if not need:
                    break
            del q[:taken]
            self._rq_off = off
            data = b"".join(parts)
            del parts  # (views of a bytearray tail block its growth while they live)
        self._rq_len = avail - n
        drs = self._drs
        if drs is not None:
            rtt = drs.rtt or self._rtt.srtt
            if rtt and self._now - drs.time >= rtt:
                self._rcv_space_adjust(drs)
        # window update once the window has closed noticeably (receiver SWS avoidance);
        # only then has the read given dispatch something to do (a read changes nothing
        # else it looks at), so only then is the socket touched: a runtime need not run
        # the stack after every read
        if self.state in _RECV_STATES:
            cur = self._rcv_adv - self._rcv_nxt
            cap = self._rcv_buf
            if cur < (cap >> 1) and self._window() - cur >= min(cap >> 1, self.config.mss):
                self._ack_now = True
                on_touched = self._on_touched
                if on_touched is not None:
                    on_touched(self)
        return data

    def _rcv_rtt_sample(self, drs: _RcvTuning, tsecr: int, plen: int, now: float) -> None:
        """Receiver-side RTT from the timestamp echo of in-order data (as Linux's
        tcp_rcv_rtt_measure_ts): the echo is the TSval of the ACK of ours that let the peer
        send this segment, so now - TSecr spans one round trip. One sample per new echo, from
        full-sized segments only.

        Kept is the minimum, not a smoothed mean (Linux smooths): our receiver is a process
        that can fall behind, and then its own backlog (in the UDP socket, the relay, the
        path's queue) inflates every sample. A window sized from inflated RTTs lets the
        sender deepen that backlog, which inflates the next samples: the window would ratchet
        up to the cap and only add queueing. The path's bandwidth-delay product needs the
        base RTT.
        """
        drs.tsecr = tsecr
        if plen < self._rcv_mss:
            return
        elapsed = ((int(now * 1000) + self._ts_offset) - tsecr) & M32  # copy of rule ts-val
        if elapsed >= _HALF:
            return
        sample = (elapsed or 1) / 1000.0  # the timestamp clock ticks in milliseconds
        if not drs.rtt or sample < drs.rtt:
            drs.rtt = sample

    def _rcv_space_adjust(self, drs: _RcvTuning) -> None:
        """Dynamic right-sizing of the receive buffer (Fisk & Feng, "Dynamic right-sizing
        in TCP"; Linux's tcp_rcv_space_adjust), at most once per receiver RTT.

        What the application read per RTT is what the sender could send in one RTT; keep
        room for twice that (a lost segment must not stall the window) plus 16 segments,
        plus the growth a sender in slow start shows from one RTT to the next (the window we
        grant now is used an RTT later). Two departures from Linux, both because our
        application reads in bursts (it is scheduled with the packet processing): the amount
        read is normalised to one RTT (bytes read / time elapsed x RTT), and the slow-start
        term assumes at most a doubling per RTT. The buffer only grows, up to
        ``recv_buffer_max``; the window we advertise is its free space, so it follows.
        """
        # bytes read so far: everything delivered in order minus what is still buffered
        copied = self._rcv_nxt - self._irs - 1 - self._rq_len
        if self._rcv_fin:
            copied -= 1
        rtt = drs.rtt or self._rtt.srtt or 0.0
        elapsed = self._now - drs.time
        delta = copied - drs.seq
        if elapsed > rtt:
            delta = int(delta * rtt / elapsed)  # per RTT
        space = drs.space
        if delta > space:
            rcvwin = 2 * delta + 16 * self._rcv_mss
            if delta >= 2 * space:
                rcvwin *= 3  # slow start: the next RTT brings twice as much
            else:
                rcvwin += 2 * (rcvwin * (delta - space) // space)
            cap = self.config.recv_buffer_max
            if rcvwin >= cap:
                self._rcv_buf = cap
                self._drs = None  # at the cap: nothing left to tune
                return
            if rcvwin > self._rcv_buf:
                self._rcv_buf = rcvwin
            drs.space = delta
        drs.seq = copied
        drs.time = self._now
