"""TCP sockets (RFC 9293) as a sans-IO state machine.

One :class:`TcpSocket` per connection.  The stack feeds arriving segments with
:meth:`TcpSocket.process`, collects segments to send with :meth:`TcpSocket.dispatch`, and
asks :meth:`TcpSocket.poll_at` when to call ``dispatch`` again.  The application side
(``send``/``recv``/``shutdown_write``/``close``/``abort``) never blocks and never emits
segments directly: after a user call the stack calls ``dispatch`` (``poll_at`` returns a
time <= now when there is something to send).

What is implemented:

* every RFC 9293 state incl. simultaneous open/close, half-close, a short TIME_WAIT that a
  new SYN with a newer timestamp (or higher sequence number) may end (RFC 6191);
* RFC 5961: RST must match RCV.NXT exactly (else a challenge ACK), SYN in a synchronized
  state gets a challenge ACK, the ACK acceptability window, a per-socket challenge-ACK
  rate limit;
* MSS (peer's value respected, path-MTU lowering), window scaling and timestamps with
  PAWS (RFC 7323), SACK (RFC 2018) both ways;
* RTO per RFC 6298 (timestamp RTT samples or Karn's rule), exponential backoff;
* fast retransmit/fast recovery: with SACK, RACK-TLP (RFC 8985: time-based loss detection
  with a DSACK-adapted reordering window, tail loss probes) and PRR (RFC 6937) over an RFC
  6675 scoreboard (``pipe``, NextSeg rules 1-2), see ``recovery.py``; with
  ``TcpConfig.rack=False`` RFC 6675's DupThresh rules (NextSeg 1-3) plus lost-retransmission
  detection (a retransmission still missing after later data was SACKed is sent again);
  without SACK, NewReno (RFC 6582) with partial ACKs; limited
  transmit (RFC 3042); initial window 10 segments (RFC 6928);
* congestion control: BBR (``bbr.py``, fed by delivery-rate samples from ``delivery.py``)
  by default, NewReno or CUBIC (``congestion.py``); data segments paced at the
  controller's pacing rate (``pacing.py``: ``dispatch`` spends the pacer's budget,
  ``poll_at`` returns its next release time);
  retransmitting the head restarts the RTO timer (as Linux does);
* pure ACKs carry the highest sequence number sent (not an RTO-rewound SND.NXT), so a peer
  that already holds the data never discards them as old;
* delayed ACK that still ACKs every second full-sized segment, immediate ACK for
  out-of-order data and gap fills; Nagle (off by default); receiver and sender SWS
  avoidance; zero-window probes with backoff; window updates when the application reads;
* SYN retries -> TimeoutError, user timeout, optional keepalive;
* in SYN_SENT, an ACK that does not acknowledge our SYN (the peer's TIME_WAIT or half-open
  state for this 4-tuple) gets the RST of RFC 9293 §3.10.7.3 and our SYN again at once
  (bounded), instead of a connect stalled for the RTO;
* TSval offsets given by the stack per address pair (monotonic towards a host, RFC 7323
  §5.4), so reusing a 4-tuple still in the peer's TIME_WAIT passes PAWS (RFC 6191).
* buffer autotuning: the receive buffer grows once per receiver RTT (minimum of the
  timestamp-echo samples) to twice what the application read per RTT plus slow-start
  headroom (dynamic right-sizing, as Linux's tcp_rcv_space_adjust), the send buffer to twice
  min(cwnd, peer window); both only grow, up to ``recv_buffer_max``/``send_buffer_max``
  (4 MiB).

Sequence numbers are kept internally as unbounded "absolute" integers (the ISN/IRS plus
bytes since), converted from/to the 32-bit wire values at the edge with :func:`_unwrap`;
so wraparound needs no care beyond that one function.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mitm_wg.net.assembler import Assembler
from mitm_wg.net.congestion import initial_window, make_controller
from mitm_wg.net.delivery import DeliveryRate
from mitm_wg.net.pacing import Pacer
from mitm_wg.net.recovery import PTO_FLOOR, TIMER_PTO, TIMER_REO, WC_DEL_ACK_T, Rack
from mitm_wg.net.rtt import RttEstimator
from mitm_wg.net.tcp_wire import ACK, FIN, PSH, RST, SYN, TcpSegment

logger = logging.getLogger(__name__)

__all__ = ["TcpConfig", "TcpSocket", "TcpState", "TcpStats"]


class TcpState(enum.Enum):
    # identity hash: set membership tests on the hot path skip Enum's Python-level __hash__
    __hash__ = object.__hash__

    CLOSED = "CLOSED"
    LISTEN = "LISTEN"
    SYN_SENT = "SYN_SENT"
    SYN_RECEIVED = "SYN_RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN_WAIT_1"
    FIN_WAIT_2 = "FIN_WAIT_2"
    CLOSE_WAIT = "CLOSE_WAIT"
    CLOSING = "CLOSING"
    LAST_ACK = "LAST_ACK"
    TIME_WAIT = "TIME_WAIT"


@dataclass
class TcpConfig:
    """Per-socket TCP parameters.  ``mss`` is normally set by the stack from the MTU."""

    mss: int = 1380
    # Buffers start at send_buffer/recv_buffer and grow with the measured delivery rate and
    # RTT up to the *_max caps (autotuning, as Linux's tcp_wmem/tcp_rmem: see
    # TcpSocket._rcv_space_adjust and send_space); a cap equal to the start fixes the size.
    # The receive cap also picks the window scale we offer in our SYN. 4 MiB (40 MB/s at
    # 100 ms RTT) because the runtime's UDP socket queues about that much: a window beyond
    # what the datagram path can hold turns a CPU-bound receiver's backlog into drops.
    send_buffer: int = 1 << 20
    recv_buffer: int = 1 << 20
    send_buffer_max: int = 4 << 20
    recv_buffer_max: int = 4 << 20
    nagle: bool = False
    time_wait: float = 1.0
    syn_retries: int = 6
    user_timeout: float = 60.0
    keepalive: float | None = None  # idle seconds before the first keepalive probe
    keepalive_interval: float = 10.0
    keepalive_probes: int = 5
    delayed_ack: float = 0.04
    min_rto: float = 0.2
    max_rto: float = 60.0
    initial_rto: float = 1.0
    timestamps: bool = True
    sack: bool = True
    #: RACK-TLP (RFC 8985) loss detection and PRR (RFC 6937) during recovery (needs SACK);
    #: False: RFC 6675's DupThresh rule and cwnd = ssthresh in recovery, no loss probes
    rack: bool = True
    window_scaling: bool = True
    #: "bbr" (bbr.py, with pacing), "newreno" or "cubic" (congestion.py)
    congestion: str = "bbr"
    #: pace data segments at the congestion controller's pacing rate (pacing.py)
    pacing: bool = True
    challenge_ack_limit: int = 10  # challenge ACKs per second per socket (RFC 5961 §7)


class TcpStats:
    """Counters (plain ints) a socket keeps about itself."""

    __slots__ = (
        "challenge_acks",
        "dropped",
        "dsacks",
        "dup_acks",
        "fast_retransmits",
        "lost_retransmits",
        "out_of_order",
        "paws_rejected",
        "retransmits",
        "rto_expired",
        "segments_in",
        "segments_out",
        "syn_fast_retries",
        "syn_timeouts",
        "tlp_probes",
        "zero_window_probes",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)


M32 = 0xFFFFFFFF
_HALF = 0x80000000
_PAWS_IDLE = 24 * 86400.0  # RFC 7323 §5.5: TS.Recent older than 24 days is invalid
#: SYNs resent at once (not after the RTO) after resetting a stale connection of the peer's
#: (see :meth:`TcpSocket._retry_syn_now`); more than this per connection wait for the RTO.
SYN_FAST_RETRIES = 3

_SYN_STATES = frozenset({TcpState.SYN_SENT, TcpState.SYN_RECEIVED})
#: States in which our sequence space carries data/FIN we may (re)transmit.
_SEND_STATES = frozenset(
    {
        TcpState.ESTABLISHED,
        TcpState.CLOSE_WAIT,
        TcpState.FIN_WAIT_1,
        TcpState.CLOSING,
        TcpState.LAST_ACK,
    }
)
#: States that still accept data from the peer.
_RECV_STATES = frozenset({TcpState.ESTABLISHED, TcpState.FIN_WAIT_1, TcpState.FIN_WAIT_2})
#: Synchronized states (RFC 9293 terminology) in which we may send a bare ACK.
_ACK_STATES = frozenset(
    {
        TcpState.SYN_RECEIVED,
        TcpState.ESTABLISHED,
        TcpState.FIN_WAIT_1,
        TcpState.FIN_WAIT_2,
        TcpState.CLOSE_WAIT,
        TcpState.CLOSING,
        TcpState.LAST_ACK,
        TcpState.TIME_WAIT,
    }
)
_USER_SEND_STATES = frozenset(
    {TcpState.SYN_SENT, TcpState.SYN_RECEIVED, TcpState.ESTABLISHED, TcpState.CLOSE_WAIT}
)
_COMPACT_AT = 1 << 16
_INF = float("inf")


def _unwrap(base: int, wire: int) -> int:
    """The absolute sequence number nearest ``base`` whose low 32 bits are ``wire``."""
    d = (wire - base) & M32
    if d >= _HALF:
        d -= 0x100000000
    return base + d


class _RcvTuning:
    """Receive-buffer autotuning state of one socket (see ``TcpSocket._rcv_space_adjust``)."""

    __slots__ = ("rtt", "seq", "space", "time", "tsecr")

    def __init__(self, now: float, space: int) -> None:
        self.seq = 0  # bytes the application had read when the current measurement began
        self.time = now  # ...and when it began
        self.space = space  # bytes read during the last measured RTT
        self.rtt = 0.0  # smallest receiver-side RTT sample in seconds (0: none yet)
        self.tsecr = 0  # the last timestamp echo that gave (or could give) an RTT sample


def _wscale_for(buffer: int) -> int:
    shift = 0
    while (buffer >> shift) > 0xFFFF and shift < 14:
        shift += 1
    return shift


class TcpSocket:
    """One TCP connection endpoint (see the module docstring for the calling convention).

    Public attributes: ``local_addr``/``local_port``/``remote_addr``/``remote_port`` (raw
    address bytes), ``state``, ``error`` (set when the connection failed: refused, reset,
    timed out, ICMP error), ``stats``.
    """

    def __init__(
        self,
        config: TcpConfig,
        local_addr: bytes,
        local_port: int,
        remote_addr: bytes,
        remote_port: int,
        *,
        isn: int,
        now: float,
        randbytes: Callable[[int], bytes] = os.urandom,
        ts_offset: int | None = None,
    ) -> None:
        cfg = config
        self.config = cfg
        self.local_addr = local_addr
        self.local_port = local_port
        self.remote_addr = remote_addr
        self.remote_port = remote_port
        self.state = TcpState.CLOSED
        self.error: OSError | None = None
        self.stats = TcpStats()
        self._now = now
        self._passive = False
        self._opened = False

        iss = isn & M32
        self._iss = iss
        self._snd_una = iss
        self._snd_nxt = iss  # next sequence to send (rewound by an RTO)
        self._snd_max = iss  # highest sequence sent + 1
        self._snd_wnd = 0
        self._snd_wl1 = 0
        self._snd_wl2 = 0
        self._max_snd_wnd = 0
        self._irs = 0
        self._rcv_nxt = 0
        self._rcv_adv = 0  # right edge of the window we advertised
        self._last_ack_sent = 0

        # options
        self._peer_mss = 536 if len(remote_addr) == 4 else 1220
        self._pmtu_mss: int | None = None
        self._ts_ok = cfg.timestamps
        self._sack_ok = cfg.sack
        # RFC 7323 §2.2: the scale is fixed in the SYN, so offer one that can express the
        # largest window autotuning may grow to
        self._rcv_wscale = (
            _wscale_for(max(cfg.recv_buffer, cfg.recv_buffer_max)) if cfg.window_scaling else 0
        )
        self._snd_wscale = 0
        self._ws_ok = False
        # TSval = ms clock + offset. The stack passes one offset per (local, remote) address
        # pair, as Linux does, so the TSvals towards a host keep growing across connections
        # (RFC 7323 §5.4) and a SYN reusing a 4-tuple in the peer's TIME_WAIT passes its
        # PAWS check (RFC 6191); a socket made without one draws a random offset.
        if ts_offset is None:
            ts_offset = int.from_bytes(randbytes(4), "big")
        self._ts_offset = ts_offset & M32
        self._ts_recent = 0
        self._ts_recent_age = now
        self._smss = 536
        self._update_smss()

        # buffers
        self._sbuf = bytearray()
        self._sbuf_head = 0
        self._sbuf_seq = iss + 1  # absolute sequence number of _sbuf[_sbuf_head]
        self._fin_queued = False
        self._rbuf = bytearray()
        self._rbuf_head = 0
        # buffer autotuning: the current limits, and the receive side's dynamic right-sizing
        # state while the receive buffer can still grow (None once at its cap). Few
        # attributes on purpose: past 85 the instance dict doubles (~1.7 KiB per socket).
        self._snd_buf = cfg.send_buffer
        self._rcv_buf = cfg.recv_buffer
        self._drs: _RcvTuning | None = (
            _RcvTuning(now, 10 * cfg.mss) if cfg.recv_buffer < cfg.recv_buffer_max else None
        )
        self._asm = Assembler()
        self._peer_fin_seq: int | None = None
        self._rcv_fin = False
        self._rd_closed = False

        # timers
        self._rto_at: float | None = None
        self._persist_at: float | None = None
        self._persist_backoff = 0
        self._delack_at: float | None = None
        self._linger_at: float | None = None  # TIME_WAIT / orphaned FIN_WAIT_2
        self._keepalive_at: float | None = None
        self._ka_probes = 0
        self._last_rx = now
        self._ack_now = False
        self._acks_owed = 0  # extra immediate (duplicate) ACKs, one per out-of-order segment
        self._unacked_bytes = 0
        self._rcv_mss = 536

        # RTT, congestion control, loss recovery
        self._rtt = RttEstimator(
            initial_rto=cfg.initial_rto, min_rto=cfg.min_rto, max_rto=cfg.max_rto
        )
        self._rtt_seq: int | None = None
        self._rtt_time = 0.0
        self._ts_rto_floor: int | None = None
        self._cc = make_controller(cfg.congestion, self._smss, isn)
        # pacing (pacing.py) and, for a model-based controller (BBR), delivery-rate
        # estimation (delivery.py): hooks in dispatch/_emit/_bulk_send/poll_at and on ACKs
        self._pacer: Pacer | None = Pacer() if cfg.pacing else None
        self._dr: DeliveryRate | None = DeliveryRate(now) if self._cc.model_based else None
        self._dupacks = 0
        self._in_fr = False
        self._recover = iss
        self._rexmit_now = False
        self._high_rxt = iss
        self._sacked: list[list[int]] = []  # sender scoreboard: sorted merged [start, end)
        # retransmissions during SACK recovery as (start, end, SND.MAX when sent), and the
        # ranges whose retransmission is itself deemed lost (SACKs for later data came back)
        self._rxt_marks: list[tuple[int, int, int]] = []
        self._relost: list[tuple[int, int]] = []
        # RACK-TLP/PRR state (recovery.py) and its timer: the RACK reorder timer or the
        # TLP probe timeout, whichever ``_rack.timer`` says
        self._rack: Rack | None = Rack() if cfg.rack and cfg.sack else None
        self._rec_at: float | None = None
        self._syn_retries = 0
        self._syn_fast_retries = 0
        self._last_progress = now
        self._soft_error: OSError | None = None
        self._pending: list[TcpSegment] = []  # ready-made control segments (RSTs)
        self._challenge_start = float("-inf")
        self._challenge_count = 0

    def __repr__(self) -> str:
        return (
            f"<TcpSocket {self.local_port}->{self.remote_port} {self.state.name}"
            f" una={self._snd_una & M32} nxt={self._snd_nxt & M32} rcv={self._rcv_nxt & M32}>"
        )

    # -- opening -------------------------------------------------------------------------
    def connect(self, now: float) -> None:
        """Active open: CLOSED -> SYN_SENT (the SYN goes out on the next dispatch)."""
        if self._opened:
            raise OSError(errno.EISCONN, "socket already used")
        self._opened = True
        self._now = now
        self._last_progress = now
        self.state = TcpState.SYN_SENT

    @classmethod
    def from_syn(
        cls,
        config: TcpConfig,
        local_addr: bytes,
        local_port: int,
        remote_addr: bytes,
        remote_port: int,
        syn: TcpSegment,
        *,
        isn: int,
        now: float,
        randbytes: Callable[[int], bytes] = os.urandom,
        ts_offset: int | None = None,
    ) -> TcpSocket:
        """Passive open from a SYN (no ACK/RST) the stack received on a listening port.

        The socket starts in SYN_RECEIVED; the SYN-ACK goes out on the next dispatch.
        """
        sock = cls(
            config,
            local_addr,
            local_port,
            remote_addr,
            remote_port,
            isn=isn,
            now=now,
            randbytes=randbytes,
            ts_offset=ts_offset,
        )
        sock._opened = True
        sock._passive = True
        sock.stats.segments_in += 1
        sock._irs = syn.seq
        sock._rcv_nxt = syn.seq + 1
        sock._rcv_adv = sock._rcv_nxt
        sock._last_ack_sent = sock._rcv_nxt
        sock._accept_syn_options(syn, now)
        sock._snd_wnd = syn.window
        sock._max_snd_wnd = syn.window
        sock._snd_wl1 = sock._irs
        sock._snd_wl2 = sock._iss
        sock.state = TcpState.SYN_RECEIVED
        return sock

    def _accept_syn_options(self, syn: TcpSegment, now: float) -> None:
        cfg = self.config
        if syn.mss is not None:
            self._peer_mss = max(syn.mss, 64)
        self._ws_ok = cfg.window_scaling and syn.wscale is not None
        if self._ws_ok:
            assert syn.wscale is not None
            self._snd_wscale = min(syn.wscale, 14)
        else:
            self._snd_wscale = 0
            self._rcv_wscale = 0
        self._sack_ok = cfg.sack and syn.sack_permitted
        self._ts_ok = cfg.timestamps and syn.timestamp is not None
        if self._ts_ok:
            assert syn.timestamp is not None
            self._ts_recent = syn.timestamp[0]
            self._ts_recent_age = now
        self._update_smss()

    def _update_smss(self) -> None:
        mss = min(self._peer_mss, self.config.mss)
        if self._pmtu_mss is not None:
            mss = min(mss, self._pmtu_mss)
        if self._ts_ok:
            mss -= 12
        self._smss = max(mss, 32)
        cc = getattr(self, "_cc", None)
        if cc is not None:
            cc.set_mss(self._smss)

    def _on_established(self, now: float) -> None:
        self.state = TcpState.FIN_WAIT_1 if self._fin_queued else TcpState.ESTABLISHED
        cc = self._cc
        cc.set_mss(self._smss)
        # RFC 5681 §3.1: one segment if the SYN or SYN-ACK had to be retransmitted.
        cc.cwnd = self._smss if self._syn_retries else initial_window(self._smss)
        if self._syn_retries and self._rtt.srtt is None:
            self._rtt.set_base(3.0)  # RFC 6298 §5.7
        self._last_progress = now
        if not self._sack_ok:
            self._rack = None  # RACK here works on the SACK scoreboard

    # -- small helpers ------------------------------------------------------------------
    def _ts_val(self, now: float) -> int:
        return (int(now * 1000) + self._ts_offset) & M32

    def _ts_sample(self, tsecr: int, now: float) -> None:
        """RTT sample from a timestamp echo (RFC 7323 §4).

        An echo older than our last timeout's retransmission measures an ACK loss, not the
        path (a duplicate segment makes the peer echo an old TSval), so it is ignored; this
        keeps a lossy path from inflating the RTO without bound.
        """
        floor = self._ts_rto_floor
        if floor is not None and (tsecr - floor) & M32 >= _HALF:
            return
        elapsed = (self._ts_val(now) - tsecr) & M32
        if elapsed < _HALF:
            self._rtt.sample(elapsed / 1000.0)

    def _data_end(self) -> int:
        return self._sbuf_seq + len(self._sbuf) - self._sbuf_head

    def _set_closed(self, error: OSError | None) -> None:
        self._rec_at = None
        if error is not None and self.error is None:
            self.error = error
        self.state = TcpState.CLOSED
        self._rto_at = None
        self._persist_at = None
        self._delack_at = None
        self._linger_at = None
        self._keepalive_at = None
        self._ack_now = False
        self._in_fr = False

    def _fail_timeout(self) -> None:
        err = self._soft_error or TimeoutError(errno.ETIMEDOUT, "Connection timed out")
        self._set_closed(err)

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

    def _window(self) -> int:
        """Free receive buffer space, capped to what the window field can express."""
        free = self._rcv_buf - (len(self._rbuf) - self._rbuf_head)
        if free < 0:
            return 0
        cap = 0xFFFF << self._rcv_wscale
        return free if free < cap else cap

    def _make_seg(
        self, flags: int, seq: int, payload: bytes | bytearray | memoryview, now: float
    ) -> TcpSegment:
        """A segment from our side with ACK/window/options filled in; records the ACK sent."""
        rcv_nxt = self._rcv_nxt
        seg = TcpSegment(
            self.local_port,
            self.remote_port,
            seq & M32,
            rcv_nxt & M32 if flags & ACK else 0,
            flags,
            0,
            payload=payload,
        )
        shift = self._rcv_wscale
        cfg = self.config
        # inlined _window()
        rcv_buf = self._rcv_buf
        free = rcv_buf - (len(self._rbuf) - self._rbuf_head)
        if free < 0:
            free = 0
        elif free > 0xFFFF << shift:
            free = 0xFFFF << shift
        if flags & SYN:
            win = min(free, 0xFFFF)
            seg.window = win
            if flags & ACK:
                self._rcv_adv = rcv_nxt + win
        else:
            # Never shrink the right edge; move it only in useful steps (RFC 9293 §3.8.6.2.2).
            cur = self._rcv_adv - rcv_nxt
            if cur < 0:
                cur = 0
            threshold = rcv_buf >> 1 if rcv_buf >> 1 < cfg.mss else cfg.mss
            if free - cur >= threshold:
                field = free >> shift
            else:
                field = (cur + (1 << shift) - 1) >> shift
                if field > 0xFFFF:
                    field = 0xFFFF
            seg.window = field
            self._rcv_adv = rcv_nxt + (field << shift)
        if self._ts_ok:
            seg.timestamp = (
                (int(now * 1000) + self._ts_offset) & M32,  # inlined _ts_val()
                self._ts_recent if flags & ACK else 0,
            )
        if flags & ACK:
            self._last_ack_sent = rcv_nxt
            self._delack_at = None
            self._ack_now = False
            self._unacked_bytes = 0
            asm = self._asm
            if asm._ranges and self._sack_ok and not flags & SYN:
                blocks = asm.sack_blocks(3 if self._ts_ok else 4)
                seg.sack_blocks = tuple((s & M32, e & M32) for s, e in blocks)
        self.stats.segments_out += 1
        return seg

    # -- sender scoreboard (SACK) ---------------------------------------------------------
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
        new = False
        for ws, we in blocks:
            s = _unwrap(ack, ws)
            e = _unwrap(ack, we)
            if s < ack:
                s = ack  # D-SACK or stale: only the part above the cumulative ACK counts
            if e > smax or e <= s:
                continue
            # insert [s, e) into the sorted merged list
            i = 0
            n = len(sacked)
            while i < n and sacked[i][1] < s:
                i += 1
            j = i
            ns, ne = s, e
            while j < n and sacked[j][0] <= e:
                if sacked[j][0] < ns:
                    ns = sacked[j][0]
                if sacked[j][1] > ne:
                    ne = sacked[j][1]
                j += 1
            if j - i == 1 and sacked[i][0] == ns and sacked[i][1] == ne:
                continue  # nothing new
            sacked[i:j] = [[ns, ne]]
            new = True
            if news is not None:
                news.append((s, e))
            if len(sacked) > 64:
                del sacked[0]
        return new

    def _trim_scoreboard(self, una: int) -> None:
        sacked = self._sacked
        while sacked and sacked[0][1] <= una:
            del sacked[0]
        if sacked and sacked[0][0] < una:
            sacked[0][0] = una

    def _first_unsacked(self, s: int) -> int:
        for rs, re in self._sacked:
            if rs > s:
                break
            if re > s:
                s = re
        return s

    def _sacked_between(self, a: int, b: int) -> int:
        total = 0
        for rs, re in self._sacked:
            if rs >= b:
                break
            lo = rs if rs > a else a
            hi = re if re < b else b
            if hi > lo:
                total += hi - lo
        return total

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
        smax = self._snd_max
        sacked_total = self._sacked_between(una, smax)
        lost = self._lost_edge()
        unsacked_lost = (lost - una) - self._sacked_between(una, lost) if lost > una else 0
        rxt = self._high_rxt
        unsacked_rxt = (rxt - una) - self._sacked_between(una, rxt) if rxt > una else 0
        pipe = (smax - una - sacked_total) - unsacked_lost + unsacked_rxt
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
            return nxt - una - self._sacked_between(una, nxt)
        return nxt - una

    # -- choosing what to send --------------------------------------------------------------
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

    def _emit(self, s: int, e: int, rexmit: bool, now: float, out: list[TcpSegment]) -> None:
        stats = self.stats
        if s == self._iss and self.state in _SYN_STATES:
            flags = SYN | ACK if self.state is TcpState.SYN_RECEIVED else SYN
            seg = self._make_seg(flags, s, b"", now)
            cfg = self.config
            seg.mss = cfg.mss
            if flags & ACK:  # SYN-ACK: echo only what the peer offered
                if self._ws_ok:
                    seg.wscale = self._rcv_wscale
                seg.sack_permitted = self._sack_ok
            else:
                if cfg.window_scaling:
                    seg.wscale = self._rcv_wscale
                seg.sack_permitted = cfg.sack
                if cfg.timestamps:
                    seg.timestamp = (self._ts_val(now), 0)
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
        if self._sack_ok and self._asm._ranges:
            # SACK blocks take option space from this segment's payload
            room = self._smss - 4 - 8 * min(len(self._asm), 3 if self._ts_ok else 4)
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
            # RFC 8985 §5.2 Segment.xmit_ts (inlined common case: the batch grows)
            if rexmit:
                rack.on_send(s, e, now, True, self._snd_una)
            else:
                sent = rack.sent
                if sent and sent[-1][1] == now:
                    sent[-1][0] = e
                else:
                    sent.append([e, now])
                    if not len(sent) & 63:
                        rack.trim(self._snd_una)  # amortized: once per 64 batches
            if self._in_fr:
                rack.prr_out += e - s  # RFC 6937 §3: prr_out += data sent
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
                    self._relost = [r for r in self._relost if not r[0] <= s < r[1]]
                self._rxt_marks.append((s, e, self._snd_max))
        if self._rto_at is None or (rexmit and s == self._snd_una):
            # (re)start the timer; retransmitting the head restarts it too (as Linux does),
            # so a fast retransmission gets a full RTO to be acknowledged
            if self._rto_at is None and rack is not None and not self._in_fr:
                # one segment in flight: this one, and nothing more queued behind it
                self._arm_pto(now, e - self._snd_una <= self._smss and e >= data_end)
            self._rto_at = now + self._rtt.rto
        out.append(seg)

    # -- timers ----------------------------------------------------------------------------
    def dispatch(self, now: float, out: list[TcpSegment], tuples: bool = False) -> None:
        """Run expired timers and append the segments to send now to ``out``.

        ``tuples``: the caller (the stack's IPv4 path) also accepts full-size data segments
        as plain tuples ``(src_port, dst_port, seq, ack, flags, window, tsval, tsecr,
        payload)`` for segments whose only option is the timestamp (see :meth:`_bulk_send`).
        """
        self._now = now
        if self._pending:
            self.stats.segments_out += len(self._pending)
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
        if self.config.keepalive is not None:
            self._keepalive(now, out)
            if self.state is TcpState.CLOSED:
                return
        if self._acks_owed:
            owed = min(self._acks_owed, 16)
            self._acks_owed = 0
            if self.state in _ACK_STATES:
                for _ in range(owed):
                    out.append(self._make_seg(ACK, self._snd_max, b"", now))
                self._ack_now = True
        guard = 0
        budget = _INF
        pacer = self._pacer
        sending = self.state in _SEND_STATES
        if pacer is not None and sending:
            # pacing.py: the bytes the pacer lets go now
            budget = pacer.budget(now, self._cc.pacing_rate(self._rtt.srtt))
        sent = 0
        if not self._in_fr and not self._sacked and sending:
            smax = self._snd_max
            guard = self._bulk_send(now, out, tuples, budget)
            sent = self._snd_max - smax
        idle = False  # the loop ran out of things to send (not out of pacing budget)
        while guard < 100000 and sent < budget:
            tx = self._next_tx()
            if tx is None:
                idle = True
                break
            self._emit(tx[0], tx[1], tx[2], now, out)
            sent += tx[1] - tx[0]
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
            out.append(self._make_seg(ACK, self._snd_max, b"", now))
        self._update_persist(now)

    def _bulk_send(self, now: float, out: list[Any], tuples: bool, budget: float = _INF) -> int:
        """Bulk-send fast path of :meth:`dispatch`: the full-size segments of new data that
        the congestion and peer windows allow, with exactly the effect (segments, state,
        counters) of the ``_next_tx``/``_emit`` loop, which carries on from where this stops
        (partial segments, FIN, limited transmit, recovery, SACK options).

        Returns the number of segments emitted. Only called outside loss recovery with an
        empty SACK scoreboard in a send state; it declines (0) unless SND.NXT == SND.MAX and
        no SACK blocks are to be sent. Every segment after the first has the first one's
        ACK, window and timestamp fields: nothing between them changes RCV.NXT, the receive
        buffer or the clock, and the advertised-window computation of ``_make_seg`` gives
        the same field again once it has run (its result is a fixed point).
        """
        s = self._snd_max
        if self._snd_nxt != s or (self._asm._ranges and self._sack_ok):
            return 0
        una = self._snd_una
        smss = self._smss
        sbuf = self._sbuf
        sbuf_seq = self._sbuf_seq
        data_end = sbuf_seq + len(sbuf) - self._sbuf_head
        limit = una + self._snd_wnd
        if data_end < limit:
            limit = data_end
        cw_end = una + self._cc.cwnd
        if s + budget < cw_end:
            cw_end = s + budget  # the pacer's budget (pacing.py), same overdraw rule
        if s + smss > limit or s >= cw_end:
            return 0
        # the first one the general way: it sets the ACK/window/timer/RTT state
        self._emit(s, s + smss, False, now, out)
        s += smss
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
            # bytes straight from a view: one copy, and the checksum's int.from_bytes then
            # needs no second one (it copies anything but bytes)
            view = memoryview(sbuf)
            try:
                while True:
                    e = s + smss
                    out.append(
                        (
                            lport,
                            rport,
                            s & M32,
                            ack,
                            ACK | PSH if e == data_end else ACK,
                            window,
                            tsval,
                            tsecr,
                            bytes(view[base + s : base + e]),
                        )
                    )
                    n += 1
                    s = e
                    if e + smss > limit or e >= cw_end:
                        break
            finally:
                view.release()
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
                        timestamp=ts,
                        payload=sbuf[base + s : base + e],
                    )
                )
                n += 1
                s = e
                if e + smss > limit or e >= cw_end:
                    break
        self._snd_nxt = s
        self._snd_max = s
        rack = self._rack
        if rack is not None:
            rack.sent[-1][0] = s  # the first one's send-time batch (RFC 8985 §5.2) grows
        dr = self._dr
        if dr is not None:
            dr.records[-1][1] = s  # ...and so does its delivery-rate record
        self.stats.segments_out += n - 1
        return n

    def _on_rto(self, now: float) -> None:
        self._rto_at = None
        st = self.state
        stats = self.stats
        if st in _SYN_STATES:
            if self._syn_retries >= self.config.syn_retries:
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
            self._sacked.clear()  # repeated timeouts: the peer may have reneged on SACKs
        rtt.backoff()
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

    def _pending_send(self) -> bool:
        return self._data_end() + (1 if self._fin_queued else 0) > self._snd_max

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
        """Zero-window probe: an out-of-window ACK (SEQ=SND.UNA-1) makes the peer answer."""
        out.append(self._make_seg(ACK, self._snd_una - 1, b"", now))
        self.stats.zero_window_probes += 1
        self._persist_backoff += 1
        self._persist_at = now + self._persist_interval()

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

    def poll_at(self) -> float | None:
        """When ``dispatch`` must next be called; a value <= now means immediately."""
        if self._pending:
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
        ):
            if t is not None and (best is None or t < best):
                best = t
        if best is None and self.config.keepalive is not None and st is TcpState.ESTABLISHED:
            best = self._last_rx + self.config.keepalive
        return best

    # -- input -------------------------------------------------------------------------------
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
    ) -> bool:
        """Header prediction (RFC 9293 §3.10.7.4 note, Van Jacobson): handle the common
        segment without building a :class:`TcpSegment`.

        Takes the already-parsed fields of a segment without SACK blocks (``tsval`` None
        when it has no timestamp option).  Returns False, having changed nothing, unless the
        segment is an in-order ACK (with or without data) in ESTABLISHED that
        :meth:`process` would handle in its straightforward way; then it has exactly the
        effect ``process`` would have had and returns True.
        """
        if self.state is not TcpState.ESTABLISHED or flags & ~PSH != ACK:
            return False
        rcv_nxt = self._rcv_nxt
        if wseq != rcv_nxt & M32:
            return False
        ts_ok = self._ts_ok
        if ts_ok:
            if tsval is None or (tsval - self._ts_recent) & M32 >= _HALF:
                return False  # no timestamp, or PAWS would have a say: the slow path decides
        una = self._snd_una
        d = (wack - una) & M32
        if d >= _HALF:
            return False  # old ACK
        ack = una + d
        smax = self._snd_max
        if ack > smax:
            return False
        plen = len(payload)
        if plen:
            if (
                self._rcv_adv - rcv_nxt < plen
                or self._asm._ranges
                or self._rd_closed
                or self._peer_fin_seq is not None
            ):
                return False  # window trimming, gap filling, pending FIN, unread data policy
        elif d == 0 and smax > una:
            return False  # a possible duplicate ACK
        if self._fin_queued or self._in_fr:
            return False  # (in recovery every ACK feeds RACK/PRR: the slow path)
        # From here on: exactly process() -> _process_ack() -> _process_data() for this case.
        self._now = now
        self.stats.segments_in += 1
        self._last_rx = now
        self._ka_probes = 0
        if ts_ok and rcv_nxt <= self._last_ack_sent:
            self._ts_recent = tsval
            self._ts_recent_age = now
        wnd = window << self._snd_wscale
        window_changed = False
        wl1 = self._snd_wl1
        if wl1 < rcv_nxt or (wl1 == rcv_nxt and self._snd_wl2 <= ack):
            window_changed = wnd != self._snd_wnd
            self._snd_wnd = wnd
            self._snd_wl1 = rcv_nxt
            self._snd_wl2 = ack
            if wnd > self._max_snd_wnd:
                self._max_snd_wnd = wnd
        if d:
            if self._dr is None:
                self._on_new_ack(ack, una, tsecr, now)
            else:
                # (SACKed bytes above SND.UNA were delivered before: not again)
                sacked = self._sacked_between(una, smax) if self._sacked else 0
                self._on_new_ack(ack, una, tsecr, now)
                self._on_delivered(una, ack, None, sacked, now)
            # _update_persist() only acts when all is acknowledged or a probe timer runs
            if ack == smax or self._persist_at is not None or self._persist_backoff:
                self._update_persist(now)
        elif window_changed:
            self._update_persist(now)
        if plen:
            self._rbuf += payload
            rcv_nxt += plen
            if plen > self._rcv_mss:
                self._rcv_mss = min(plen, self.config.mss)
            drs = self._drs
            if drs is not None and ts_ok and tsecr != drs.tsecr:
                self._rcv_rtt_sample(drs, tsecr, plen, now)
            self._unacked_bytes += plen
            self._schedule_ack(plen, flags & PSH, now)
            self._rcv_nxt = rcv_nxt
        return True

    def process(self, seg: TcpSegment, now: float) -> None:
        """An arriving segment for this 4-tuple (checksum already verified)."""
        self._now = now
        stats = self.stats
        stats.segments_in += 1
        st = self.state
        if st is TcpState.CLOSED or st is TcpState.LISTEN:
            stats.dropped += 1
            return
        self._last_rx = now
        self._ka_probes = 0
        if st is TcpState.SYN_SENT:
            self._process_syn_sent(seg, now)
            return
        flags = seg.flags
        rcv_nxt = self._rcv_nxt
        seq = _unwrap(rcv_nxt, seg.seq)
        plen = len(seg.payload)
        ts = seg.timestamp
        # PAWS (RFC 7323 §5)
        if (
            self._ts_ok
            and ts is not None
            and not flags & RST
            and (ts[0] - self._ts_recent) & M32 >= _HALF
            and now - self._ts_recent_age < _PAWS_IDLE
        ):
            stats.paws_rejected += 1
            self._ack_now = True
            return
        if st is TcpState.SYN_RECEIVED and flags & SYN and seq == self._irs and not flags & RST:
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
                    return
                self._rst_for(seg)
                return
            # retransmitted SYN: our SYN-ACK was lost, send it again
            self._snd_nxt = self._iss
            return
        # sequence number acceptability (RFC 9293 §3.10.7.4)
        wnd = self._rcv_adv - rcv_nxt
        if wnd < 0:
            wnd = 0
        seglen = plen
        if flags & SYN:
            seglen += 1
        if flags & FIN:
            seglen += 1
        zero_wnd_data = False
        if seglen == 0:
            ok = seq == rcv_nxt if wnd == 0 else rcv_nxt <= seq < rcv_nxt + wnd
        elif wnd == 0:
            ok = False
            if seq == rcv_nxt:
                ok = zero_wnd_data = True  # process the ACK, drop the data
        else:
            last = seq + seglen - 1
            ok = (rcv_nxt <= seq < rcv_nxt + wnd) or (rcv_nxt <= last < rcv_nxt + wnd)
        if not ok:
            stats.dropped += 1
            if not flags & RST:
                self._ack_now = True
                if st is TcpState.TIME_WAIT and flags & FIN:
                    self._linger_at = now + self.config.time_wait
            return
        if ts is not None and self._ts_ok and seq <= self._last_ack_sent:
            self._ts_recent = ts[0]
            self._ts_recent_age = now
        if flags & RST:
            if seq == rcv_nxt:
                self._on_rst()
            else:
                self._challenge_ack(now)
            return
        if flags & SYN:
            self._challenge_ack(now)
            return
        if not flags & ACK:
            stats.dropped += 1
            return
        ack = _unwrap(self._snd_una, seg.ack)
        if st is TcpState.SYN_RECEIVED:
            if self._snd_una < ack <= self._snd_max:
                self._snd_wnd = seg.window << self._snd_wscale
                self._snd_wl1 = seq
                self._snd_wl2 = ack
                self._on_established(now)
                st = self.state
            else:
                self._rst_for(seg)
                stats.dropped += 1
                return
        if ack > self._snd_max or ack < self._snd_una - self._max_snd_wnd:
            # RFC 5961 §5.2: acknowledges something we never sent, or far too old
            stats.dropped += 1
            self._challenge_ack(now)
            return
        self._process_ack(seg, seq, ack, plen, now)
        if self._fin_queued and self._snd_una > self._data_end():
            # our FIN is acknowledged
            if st is TcpState.FIN_WAIT_1:
                self.state = st = TcpState.FIN_WAIT_2
                if self._rd_closed:
                    self._linger_at = now + self.config.user_timeout
            elif st is TcpState.CLOSING:
                self._enter_time_wait(now)
                return
            elif st is TcpState.LAST_ACK:
                self._set_closed(None)
                return
        if (plen or flags & FIN) and st in _RECV_STATES:
            self._process_data(seg, seq, plen, zero_wnd_data, wnd, now)

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
            self.state = TcpState.SYN_RECEIVED
            self._snd_wl2 = self._iss
            self._snd_nxt = self._iss
            return
        self._snd_wl2 = ack
        ts = seg.timestamp
        if self._ts_ok and ts is not None and ts[1]:
            self._ts_sample(ts[1], now)
        elif self._rtt_seq is not None and ack >= self._rtt_seq:
            self._rtt.sample(now - self._rtt_time)
        self._rtt_seq = None
        self._snd_una = ack
        if self._snd_nxt < ack:
            self._snd_nxt = ack
        self._rto_at = None
        self._on_established(now)
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

    def _on_rst(self) -> None:
        st = self.state
        err: OSError | None = None
        if st is TcpState.SYN_RECEIVED:
            if self._passive:
                err = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
            else:
                err = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        elif st in (
            TcpState.ESTABLISHED,
            TcpState.FIN_WAIT_1,
            TcpState.FIN_WAIT_2,
            TcpState.CLOSE_WAIT,
        ):
            err = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        self._set_closed(err)

    def _enter_time_wait(self, now: float) -> None:
        self.state = TcpState.TIME_WAIT
        self._linger_at = now + self.config.time_wait
        self._rto_at = None
        self._rec_at = None
        self._persist_at = None
        self._keepalive_at = None
        self._in_fr = False

    def _process_ack(self, seg: TcpSegment, seq: int, ack: int, plen: int, now: float) -> None:
        una = self._snd_una
        sack_new = False
        rack = self._rack
        had_sacked = bool(self._sacked)
        news: list[tuple[int, int]] | None = None
        sacked_before = 0
        dr = self._dr
        # delivery.py: SACKed bytes above SND.UNA before this ACK (delivered earlier)
        dr_sacked = self._sacked_between(una, self._snd_max) if dr is not None and had_sacked else 0
        if self._sack_ok and seg.sack_blocks:
            if rack is not None or dr is not None:
                news = []
                if self._in_fr:
                    sacked_before = self._sacked_between(una, self._snd_max)
            sack_new = self._update_scoreboard(seg.sack_blocks, ack if ack > una else una, news)
        elif rack is not None and self._in_fr:
            sacked_before = self._sacked_between(una, self._snd_max)
        wnd = seg.window << self._snd_wscale
        window_changed = False
        if una <= ack and (self._snd_wl1 < seq or (self._snd_wl1 == seq and self._snd_wl2 <= ack)):
            window_changed = wnd != self._snd_wnd
            self._snd_wnd = wnd
            self._snd_wl1 = seq
            self._snd_wl2 = ack
            if wnd > self._max_snd_wnd:
                self._max_snd_wnd = wnd
        if ack > una:
            ts = seg.timestamp
            self._on_new_ack(ack, una, ts[1] if ts is not None else 0, now)
        elif (
            ack == una
            and plen == 0
            and not seg.flags & (SYN | FIN)
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
        if rack is not None:
            if seg.sack_blocks or self._in_fr or had_sacked:
                self._rack_on_ack(seg, una, ack, news or [], sacked_before, now)
        elif sack_new and self._rxt_marks and self._in_fr:
            self._detect_lost_retransmits()
        if dr is not None and (ack > una or sack_new):
            self._on_delivered(una, ack, news, dr_sacked, now)
        if window_changed or ack > una:
            self._update_persist(now)

    def _on_delivered(
        self,
        una: int,
        ack: int,
        news: list[tuple[int, int]] | None,
        sacked_before: int,
        now: float,
    ) -> None:
        """An ACK delivered data (SND.UNA ``una`` -> ``ack``, new SACK blocks ``news``,
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
            if self._sacked:
                delivered += self._sacked_between(una_now, self._snd_max)
            ranges = [(una, una_now)] if una_now > una else []
            if news:
                ranges.extend(news)
            rs = dr.on_ack(una_now, delivered, ranges, now)
            inflight = self._pipe() if self._in_fr else self._flight()
        if delivered > 0:
            self._cc.on_rate_sample(
                rs, delivered, dr.delivered, inflight, una_now < self._recover, now
            )

    def _on_new_ack(self, ack: int, una: int, tsecr: int, now: float) -> None:
        """SND.UNA advances from ``una`` to ``ack``: RTT sample, send buffer, recovery, cwnd.

        ``tsecr`` is the segment's timestamp echo (0 when absent).
        """
        acked = ack - una
        rtt = self._rtt
        if self._ts_ok and tsecr:
            # inlined _ts_sample()
            floor = self._ts_rto_floor
            if floor is None or (tsecr - floor) & M32 < _HALF:
                elapsed = ((int(now * 1000) + self._ts_offset) - tsecr) & M32
                if elapsed < _HALF:
                    rtt.sample(elapsed / 1000.0)
        elif self._rtt_seq is not None and ack >= self._rtt_seq:
            rtt.sample(now - self._rtt_time)
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
                # NewReno partial ACK (RFC 6582 §3.2 step 5)
                self._rexmit_now = True
                if not cc.model_based:
                    cwnd = cc.cwnd - acked
                    if acked >= self._smss:
                        cwnd += self._smss
                    cc.cwnd = cwnd if cwnd > self._smss else self._smss
        else:
            self._dupacks = 0
            if n > 0:
                cc.on_ack(n, now, rtt.srtt)
        rack = self._rack
        if rack is None:
            self._rto_at = None if ack == self._snd_max else now + rtt.rto
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
                # _arm_pto() inlined (RFC 8985 §7.2): PTO = 2*SRTT (+ WCDelAckT with one
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

    def _detect_lost_retransmits(self) -> None:
        """A retransmission is lost when more than DupThresh-1 segments' worth of data sent
        after it has been SACKed while it is still missing (as Linux's lost-retransmit
        detection does); it is then sent again instead of waiting for the RTO."""
        una = self._snd_una
        smax = self._snd_max
        limit = 2 * self._smss
        keep: list[tuple[int, int, int]] = []
        for mark in self._rxt_marks:
            rs, re, sent_max = mark
            if re <= una:
                continue
            if self._sacked_between(sent_max, smax) > limit:
                lo = rs if rs > una else una
                if self._sacked_between(lo, re) < re - lo:
                    self._relost.append((lo, re))
                    self.stats.lost_retransmits += 1
                continue
            keep.append(mark)
        self._rxt_marks = keep

    def _enter_fast_recovery(self, now: float) -> None:
        cc = self._cc
        cc.on_congestion_event(now, self._snd_max - self._snd_una)
        self._in_fr = True
        self._recover = self._snd_max
        self._rexmit_now = True
        self._high_rxt = self._snd_una
        self._rxt_marks.clear()
        self._relost.clear()
        if not self._sack_ok and not cc.model_based:
            cc.cwnd = cc.ssthresh + 3 * self._smss
        rack = self._rack
        if rack is not None:
            rack.prr_start(self._snd_max - self._snd_una)  # RFC 6937 §3 RecoverFS
            if rack.timer == TIMER_PTO:
                rack.timer = 0
                self._rec_at = None
        self.stats.fast_retransmits += 1

    # -- RACK-TLP (RFC 8985) and PRR (RFC 6937); the state and rules live in recovery.py ---
    def _arm_pto(self, now: float, one_segment: bool) -> None:
        """RFC 8985 §7.2: (re)arm the probe timeout when no probe is outstanding, after new
        data was sent or an ACK advanced SND.UNA; never later than the RTO (then the probe
        goes instead of the first RTO retransmission, and the RTO is restarted)."""
        rack = self._rack
        assert rack is not None
        if rack.tlp_end is not None or self.state not in _SEND_STATES:
            return
        pto = Rack.pto(self._rtt.srtt, one_segment)
        rto = self._rtt.rto
        self._rec_at = now + (pto if pto < rto else rto)
        rack.timer = TIMER_PTO

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
        if kind != TIMER_PTO or self._in_fr or rack.tlp_end is not None:
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
        rack.tlp_end = self._snd_max  # TLP.end_seq
        self.stats.tlp_probes += 1
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
        seg: TcpSegment,
        una: int,
        ack: int,
        news: list[tuple[int, int]],
        sacked_before: int,
        now: float,
    ) -> None:
        """Everything RACK and PRR do with an ACK of the slow path (RFC 8985 §6.2 steps
        1-5, RFC 6937 §3 "on every ACK during recovery")."""
        rack = self._rack
        assert rack is not None
        blocks = seg.sack_blocks
        if blocks:
            # RFC 2883 §4: a DSACK is a first block below the cumulative ACK or inside the
            # second block
            base = ack if ack > una else una
            s0 = _unwrap(base, blocks[0][0])
            e0 = _unwrap(base, blocks[0][1])
            dsack = e0 <= base
            if not dsack and len(blocks) > 1:
                s1 = _unwrap(base, blocks[1][0])
                dsack = s1 <= s0 and e0 <= _unwrap(base, blocks[1][1])
            if dsack:
                self.stats.dsacks += 1
                rack.on_dsack(self._snd_una, self._snd_max)
                if rack.tlp_end is not None and rack.tlp_is_retrans and e0 == rack.tlp_end:
                    rack.tlp_end = None  # §7.4: the probe was spurious, no loss
        ts = seg.timestamp
        tsecr = ts[1] if ts is not None and self._ts_ok else None
        rack.on_ack(una, ack, news, self._sacked, tsecr, self._ts_offset, now)
        self._rack_detect(now)
        if self._in_fr and not self._cc.model_based:
            # RFC 6937 §3: DeliveredData = change in snd.una + change in SACKed bytes
            una_now = self._snd_una
            pipe = self._pipe()
            delivered = (una_now - una) + self._sacked_between(una_now, self._snd_max)
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
        reo = rack.reo_wnd(self._in_fr, self._sacked_between(una, smax), self._smss, srtt)
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
            if plen:
                self._rbuf += payload
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
                        self._rbuf += more
                        rcv_nxt += len(more)
                    self._ack_now = True  # gap (partly) filled: ACK at once
                else:
                    self._schedule_ack(plen, seg.flags & PSH, now)
                self._rcv_nxt = rcv_nxt
        elif seq > rcv_nxt:
            self.stats.out_of_order += 1
            if plen and not self._asm.add(seq, payload):
                self.stats.dropped += 1
            if fin:
                self._peer_fin_seq = seq + plen
            # one duplicate ACK per out-of-order segment, so the peer can count them
            if self._ack_now:
                self._acks_owed += 1
            self._ack_now = True
            return
        if fin:
            self._peer_fin_seq = seq + plen
        if self._peer_fin_seq is not None and not self._rcv_fin and rcv_nxt == self._peer_fin_seq:
            self._rcv_fin = True
            self._rcv_nxt = rcv_nxt + 1
            st = self.state
            if st is TcpState.ESTABLISHED:
                self.state = TcpState.CLOSE_WAIT
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
                self.state = TcpState.CLOSING
            elif st is TcpState.FIN_WAIT_2:
                self._enter_time_wait(now)

    # -- user side -----------------------------------------------------------------------------
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
        return n

    def recv(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of in-order data; b"" if none (see ``at_eof``)."""
        rbuf = self._rbuf
        head = self._rbuf_head
        avail = len(rbuf) - head
        n = max_bytes if max_bytes < avail else avail
        if n <= 0:
            return b""
        if head == 0 and n == avail:
            data = bytes(rbuf)
            rbuf.clear()
        else:
            data = bytes(rbuf[head : head + n])
            head += n
            if head == len(rbuf):
                rbuf.clear()
                head = 0
            elif head >= _COMPACT_AT and head * 2 >= len(rbuf):
                del rbuf[:head]
                head = 0
            self._rbuf_head = head
        drs = self._drs
        if drs is not None:
            rtt = drs.rtt or self._rtt.srtt
            if rtt and self._now - drs.time >= rtt:
                self._rcv_space_adjust(drs)
        # window update once the window has closed noticeably (receiver SWS avoidance)
        if self.state in _RECV_STATES:
            cur = self._rcv_adv - self._rcv_nxt
            cap = self._rcv_buf
            if cur < (cap >> 1) and self._window() - cur >= min(cap >> 1, self.config.mss):
                self._ack_now = True
        return data

    # -- buffer autotuning ------------------------------------------------------------------
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
        elapsed = ((int(now * 1000) + self._ts_offset) - tsecr) & M32
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
        copied = self._rcv_nxt - self._irs - 1 - (len(self._rbuf) - self._rbuf_head)
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

    @property
    def recv_buffer(self) -> int:
        """The receive buffer's current size (autotuned; the window we offer is its free
        space)."""
        return self._rcv_buf

    @property
    def send_buffer(self) -> int:
        """The send buffer's current size (autotuned)."""
        return self._snd_buf

    @property
    def send_queued(self) -> int:
        """Bytes queued but not yet acknowledged."""
        return len(self._sbuf) - self._sbuf_head

    @property
    def recv_available(self) -> int:
        return len(self._rbuf) - self._rbuf_head

    @property
    def at_eof(self) -> bool:
        """The peer's FIN arrived and all data before it has been read."""
        return self._rcv_fin and len(self._rbuf) == self._rbuf_head

    @property
    def can_send(self) -> bool:
        return (
            self.state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT)
            and not self._fin_queued
            and self.send_space > 0
        )

    @property
    def can_recv(self) -> bool:
        return len(self._rbuf) > self._rbuf_head or self._rcv_fin

    @property
    def is_closed(self) -> bool:
        """The stack may forget this socket (CLOSED and nothing left to send)."""
        return self.state is TcpState.CLOSED and not self._pending

    @property
    def snd_una(self) -> int:
        """SND.UNA as a 32-bit wire value."""
        return self._snd_una & M32

    @property
    def snd_nxt(self) -> int:
        """The highest sequence number sent so far + 1 (32-bit), for ICMP validation."""
        return self._snd_max & M32

    @property
    def rcv_nxt(self) -> int:
        return self._rcv_nxt & M32

    @property
    def rto(self) -> float:
        return self._rtt.rto

    @property
    def srtt(self) -> float | None:
        return self._rtt.srtt

    @property
    def cwnd(self) -> int:
        return self._cc.cwnd

    @property
    def ssthresh(self) -> int:
        return self._cc.ssthresh

    @property
    def mss(self) -> int:
        """Effective send MSS (payload bytes per full-sized segment)."""
        return self._smss

    @property
    def peer_window(self) -> int:
        return self._snd_wnd

    def shutdown_write(self, now: float) -> None:
        """Half-close: a FIN follows the queued data."""
        st = self.state
        if self._fin_queued:
            return
        if st in _SYN_STATES:
            self._fin_queued = True  # FIN_WAIT_1 once established
        elif st is TcpState.ESTABLISHED:
            self._fin_queued = True
            self.state = TcpState.FIN_WAIT_1
        elif st is TcpState.CLOSE_WAIT:
            self._fin_queued = True
            self.state = TcpState.LAST_ACK

    def close(self, now: float) -> None:
        """Full close (no more reads or writes); RST if unread data is pending."""
        st = self.state
        if st is TcpState.CLOSED:
            return
        if st is TcpState.SYN_SENT:
            self._set_closed(None)
            return
        if self.recv_available and st is not TcpState.TIME_WAIT:
            self.abort(now)
            return
        self._rd_closed = True
        self.shutdown_write(now)
        if self.state is TcpState.FIN_WAIT_2 and self._linger_at is None:
            self._linger_at = now + self.config.user_timeout

    def abort(self, now: float) -> None:
        """Reset the connection (RST) and go CLOSED."""
        st = self.state
        if st in _ACK_STATES and st is not TcpState.TIME_WAIT:
            rst = TcpSegment(
                self.local_port,
                self.remote_port,
                self._snd_max & M32,
                self._rcv_nxt & M32,
                RST | ACK,
                0,
            )
            self._pending.append(rst)
        self._set_closed(None)
        self._sbuf.clear()
        self._sbuf_head = 0

    def time_wait_accepts_syn(self, syn: TcpSegment) -> bool:
        """RFC 6191 §2: may this new SYN (no ACK, no RST) for our 4-tuple end our TIME_WAIT?

        If the old connection used timestamps and the new one would (the SYN has one and we
        allow them): only when the SYN's TSval is newer than TS.Recent. Otherwise: when the
        SYN's sequence number is above anything seen on the old connection (RFC 9293
        §3.6.1, RFC 1122 §4.2.2.13), or when the old one did not use timestamps and the new
        one will. The stack then closes this socket and hands the SYN to the listener.
        """
        if self.state is not TcpState.TIME_WAIT:
            return False
        ts_new = syn.timestamp is not None and self.config.timestamps
        if self._ts_ok:
            if ts_new:
                assert syn.timestamp is not None
                return 0 < (syn.timestamp[0] - self._ts_recent) & M32 < _HALF
        elif ts_new:
            return True
        return 0 < (syn.seq - self._rcv_nxt) & M32 < _HALF

    def on_icmp_unreachable(self, error: OSError, now: float) -> None:
        """ICMP destination unreachable for this connection (hard in SYN_SENT, else soft)."""
        if self.state in _SYN_STATES:
            self._set_closed(error)
        elif self.state is not TcpState.CLOSED:
            self._soft_error = error

    def set_path_mtu_mss(self, mss: int) -> None:
        """Path MTU discovery lowered the usable MSS (segments in flight are resent smaller)."""
        if self._pmtu_mss is not None and mss >= self._pmtu_mss:
            return
        old = self._smss
        self._pmtu_mss = max(mss, 64)
        self._update_smss()
        if self._smss < old and self.state in _SEND_STATES and self._snd_max > self._snd_una:
            self._snd_nxt = self._snd_una
            self._rtt_seq = None
