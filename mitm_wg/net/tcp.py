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
  (4 and 8 MiB).

Sequence numbers are kept internally as unbounded "absolute" integers (the ISN/IRS plus
bytes since), converted from/to the 32-bit wire values at the edge with
:func:`~mitm_wg.net.tcp_wire.unwrap`; so wraparound needs no care beyond that one function.

Where each concern lives (``TcpSocket`` is their composition; all state is created in
``TcpSocket.__init__`` below): ``tcp_state.py`` states and the transition table,
``tcp_input.py`` segment arrival (``fast_input`` next to ``process``, ACK processing),
``tcp_send.py`` the send side (``_emit`` next to ``_bulk_send``, ``dispatch``, SND.UNA
advancing, persist),
``tcp_recv.py`` the receive side (reassembly, window, delayed ACK, autotuning),
``tcp_timers.py`` RTO/RTT/keepalive/``poll_at``, ``recovery.py`` the SACK scoreboard and
RACK-TLP/PRR, ``congestion.py`` the congestion controllers. docs/internals.md has the
table.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass

from mitm_wg.net.assembler import Assembler
from mitm_wg.net.congestion import make_controller
from mitm_wg.net.delivery import DeliveryRate
from mitm_wg.net.pacing import Pacer
from mitm_wg.net.recovery import Rack, Scoreboard
from mitm_wg.net.rtt import RttEstimator
from mitm_wg.net.tcp_input import SYN_FAST_RETRIES as SYN_FAST_RETRIES  # re-exported
from mitm_wg.net.tcp_input import Input
from mitm_wg.net.tcp_recv import Receiver
from mitm_wg.net.tcp_recv import _RcvTuning as _RcvTuning  # re-exported (tests)
from mitm_wg.net.tcp_send import Sender
from mitm_wg.net.tcp_state import _ACK_STATES, _SEND_STATES, _SYN_STATES, StateMachine, TcpState
from mitm_wg.net.tcp_timers import Timers
from mitm_wg.net.tcp_wire import ACK, RST, TcpSegment
from mitm_wg.net.tcp_wire import M32 as M32  # re-exported

__all__ = ["TcpConfig", "TcpSocket", "TcpState", "TcpStats"]


@dataclass
class TcpConfig:
    """Per-socket TCP parameters.  ``mss`` is normally set by the stack from the MTU."""

    mss: int = 1380
    # Buffers start at send_buffer/recv_buffer and grow with the measured delivery rate and
    # RTT up to the *_max caps (autotuning, as Linux's tcp_wmem/tcp_rmem: see
    # TcpSocket._rcv_space_adjust and send_space); a cap equal to the start fixes the size.
    # The receive cap also picks the window scale we offer in our SYN. 8 MiB: 80 MB/s at
    # 100 ms RTT, 40 at 200 ms (a stock Linux client's tcp_rmem allows 6 MiB). It was 4 MiB,
    # what the runtime's UDP socket queues, lest a CPU-bound receiver's backlog turn into
    # drops; with the window sized from the minimum RTT (no ratchet) 8 MiB dropped nothing
    # in bench_path's 50/100 ms downloads from a server with a raised tcp_wmem (1.20/1.00x
    # Linux, against 0.89/0.60 at 4 MiB); 16 MiB did, at 100 ms.
    # The send buffer is only our memory (what leaves is cwnd's business) and must hold
    # twice BBR's window of 2 BDPs plus what waits for a hole's repair: 8 MiB keeps
    # 20 MB/s at 100 ms RTT going (4 MiB held the uploads of bench_path's 50/100 ms paths
    # to 31-34 / 20-21 MB/s, 8 MiB 43 / 27-29 on the same machine).
    send_buffer: int = 1 << 20
    recv_buffer: int = 1 << 20
    send_buffer_max: int = 8 << 20
    recv_buffer_max: int = 8 << 20
    # Nagle's algorithm (RFC 1122 §4.2.3.4 SHOULD) is off by default, as TCP_NODELAY: our
    # writers are proxies that forward what they read, and waiting for an ACK before the
    # next small write adds a round trip per message.
    nagle: bool = False
    # Deviation: TIME_WAIT lasts 1 s, not 2*MSL (RFC 9293 §3.4.2 with an MSL of 2 minutes;
    # Linux 60 s). A userspace client behind one tunnel address opens many short
    # connections; 4-tuples in TIME_WAIT would pile up. The risks TIME_WAIT guards against
    # are covered otherwise: old duplicates by PAWS (RFC 7323 §5, every connection here
    # uses timestamps when the peer does) and per-address-pair TSval offsets, and the
    # stack avoids reusing a 4-tuple closed less than 120 s ago while any port is free.
    time_wait: float = 1.0
    # SYN retransmissions before the connect fails: 1+2+...+64 s = 127 s with the initial
    # RTO of 1 s (Linux's tcp_syn_retries=6); RFC 9293 §3.8.3 asks for at least 3 minutes
    # (R2 for a SYN), a deviation that fails a connect to a dead host sooner.
    syn_retries: int = 6
    # RFC 9293 §3.8.3 R2 / RFC 5482: give up when nothing is acknowledged for this long
    # (also the lifetime of an orphaned FIN-WAIT-2, as Linux's tcp_fin_timeout)
    user_timeout: float = 60.0
    keepalive: float | None = None  # idle seconds before the first keepalive probe
    keepalive_interval: float = 10.0
    keepalive_probes: int = 5
    # RFC 9293 §3.8.6.3 / RFC 5681 §4.2: under 0.5 s, and every second full segment is
    # ACKed at once anyway (TcpSocket._schedule_ack); 40 ms as Linux's minimum
    delayed_ack: float = 0.04
    # Deviation: RFC 6298 §2.4 says a minimum RTO of 1 s; 200 ms as Linux (RFC 6298 §2.4
    # allows it, "experience has shown" the 1 s bound is conservative): with timestamps
    # every ACK gives an RTT sample, so spurious timeouts stay rare.
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
    #: HyStart++ (RFC 9406, hystart.py) ends NewReno's/CUBIC's initial slow start when the
    #: RTT rises (a queue building) instead of at the first loss; BBR has its own startup
    hystart: bool = True
    #: NewReno recovery (no SACK) repairs one hole per round trip. Its partial ACKs (and
    #: their resends of the head) restart the RTO, as RFC 6582 §4's "Slow-but-Steady"
    #: variant, while this budget lasts: each spends 1, or 4 if the next hole was close by
    #: (it acknowledged less than 3 segments: losses in a burst). Then the RTO ends the
    #: recovery and goes back N in slow start. A slow-start overshoot into a queue leaves
    #: hundreds of holes, every other or third segment; one per round trip took 12-26 s for
    #: 6 MiB at 50 ms; now 1.4-1.9 s. With 1 % random loss at 50-200 ms a transfer takes
    #: as long as with every restart (within 5 %) and resends up to 3x as much (an
    #: occasional RTO); the "Impatient" variant (1 restart in all) resent up to 8x as much.
    newreno_rto_restarts: int = 8
    #: Path MTU black holes (RFC 4821 §3, as Linux's tcp_mtu_probing=1): a path narrower
    #: than our packets whose ICMP errors never arrive (a firewall eats them) loses every
    #: full-sized segment while small packets pass. After this many timeouts in a row with
    #: nothing acknowledged and a segment at the head larger than ``blackhole_mtu`` allows,
    #: segments shrink to fit ``blackhole_mtu`` bytes (IP header included): 1200 plus one
    #: WireGuard layer over IPv6 (80) fits the 1280 bytes every IPv6 path carries. 0: off.
    blackhole_rtos: int = 3
    blackhole_mtu: int = 1200
    #: called with the socket when it takes its path for a black hole (the stack's hook:
    #: the runtime confirms it and shrinks the other connections through that peer)
    on_blackhole: Callable[[TcpSocket], None] | None = None
    #: The receiving side of a black hole: the peer's full-sized segments vanish and ours
    #: are small (a download), so the rule above never fires. Data expected and none
    #: arriving in order for ``rx_stall`` seconds (at least three smoothed RTTs; once per
    #: RCV.NXT), or only segments no larger than ``blackhole_mtu`` allows ever arriving,
    #: calls ``on_rx_stall`` with the socket (the stack's hook; the runtime asks the path
    #: with pings, ``Stack.probe_path``, unless larger packets came through the tunnel
    #: since ``stall_since``). Data is expected beyond a hole in what arrived (data held
    #: out of order), and once all our data is acknowledged, a FIN too (a request: the
    #: answer is due, and a server's full-sized segments may be all it sends), until the
    #: peer's FIN. With nothing held, the stall also asks the peer how far it has sent (a
    #: keepalive's old SEQ draws an ACK with its SND.NXT); an answer beyond RCV.NXT
    #: (``data_vanished``) calls the hook once more.
    #: Nothing arriving still, the stall is reported (and the peer asked) again
    #: ``STALL_ASKS`` times, each wait twice the one before (a question, its answer or
    #: what the runtime did about it may have been lost). 0: off.
    rx_stall: float = 1.0
    on_rx_stall: Callable[[TcpSocket], None] | None = None
    challenge_ack_limit: int = 10  # challenge ACKs per second per socket (RFC 5961 §7)


class TcpStats:
    """Counters (plain ints) a socket keeps about itself."""

    __slots__ = (
        "acks_coalesced",  # pure ACKs a newer one of the same batch stood in for
        "blackhole_shrinks",  # timeouts that took the path for an MTU black hole
        "challenge_acks",
        "dropped",
        "dsacks",  # received (RFC 2883 D-SACK blocks in the peer's ACKs)
        "dsacks_out",  # sent: copies of data we already held, reported once each
        "dup_acks",
        "fast_retransmits",
        "lost_retransmits",
        "ofo_drops",  # out-of-order segments dropped: no room for another range (also dropped)
        "out_of_order",
        "paws_rejected",
        "recovery_probes",  # rule rec-probe: probes in fast recovery after a PTO of silence
        "retransmits",
        "rto_expired",
        "rx_stalls",  # signs of a receive-side black hole (TcpConfig.rx_stall)
        "segments_in",
        "segments_out",
        "stall_probes",  # rule rx-stall's questions to the peer: how far have you sent?
        "syn_fast_retries",
        "syn_timeouts",
        "tlp_probes",
        "zero_window_probes",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)


def _wscale_for(buffer: int) -> int:
    shift = 0
    while (buffer >> shift) > 0xFFFF and shift < 14:
        shift += 1
    return shift


class TcpSocket(StateMachine, Input, Sender, Receiver, Timers, Scoreboard):
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
        on_touched: Callable[[TcpSocket], None] | None = None,
        syn_rto: float | None = None,
    ) -> None:
        cfg = config
        # All state of the connection, grouped by the room (file) that owns it; each group's
        # comment names that file (docs/internals.md). Few attributes on purpose: 96 today,
        # in an instance dict of 3.3 KiB that stays that size up to 170 attributes; the
        # 171st doubles it (+3.2 KiB per socket; Python 3.11 and 3.13).

        # identity, the application's side, opening and errors (tcp.py)
        #: called with the socket after each application call that leaves something to
        #: send (send, a recv after which a window update is due, shutdown_write, close,
        #: abort): the stack marks the socket for its next poll
        self._on_touched = on_touched
        self.config = cfg
        self.local_addr = local_addr
        self.local_port = local_port
        self.remote_addr = remote_addr
        self.remote_port = remote_port
        self.error: OSError | None = None
        self._soft_error: OSError | None = None
        self.stats = TcpStats()
        self._now = now
        self._passive = False
        self._opened = False

        # state machine (tcp_state.py)
        self.state = TcpState.CLOSED  # every later change goes through _set_state

        # send sequence space and window, RFC 9293 §3.3.1 (tcp_send.py; window from input)
        iss = isn & M32
        self._iss = iss
        self._snd_una = iss
        self._snd_nxt = iss  # next sequence to send (rewound by an RTO)
        self._snd_max = iss  # highest sequence sent + 1
        self._snd_wnd = 0
        self._snd_wl1 = 0
        self._snd_wl2 = 0
        self._max_snd_wnd = 0

        # receive sequence space, RFC 9293 §3.3.1 (tcp_recv.py)
        self._irs = 0
        self._rcv_nxt = 0
        self._rcv_adv = 0  # right edge of the window we advertised
        self._last_ack_sent = 0

        # options negotiated in the SYNs, and the MSS they give (tcp.py)
        # RFC 9293 §3.7.1: without the option, 536 (IPv4) / 1220 (IPv6: RFC 8200 §8.3)
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
        self._smss = 536
        self._update_smss()

        # TSval clock (tcp_timers.py)
        # TSval = ms clock + offset. The stack passes one offset per (local, remote) address
        # pair, as Linux does, so the TSvals towards a host keep growing across connections
        # (RFC 7323 §5.4) and a SYN reusing a 4-tuple in the peer's TIME_WAIT passes its
        # PAWS check (RFC 6191); a socket made without one draws a random offset.
        if ts_offset is None:
            ts_offset = int.from_bytes(randbytes(4), "big")
        self._ts_offset = ts_offset & M32

        # segment arrival: TS.Recent for PAWS, RFC 5961 challenge ACKs, SYN retries after
        # resetting a stale peer, queued RSTs (sent by dispatch) (tcp_input.py)
        self._ts_recent = 0
        self._ts_recent_age = now
        self._challenge_start = float("-inf")
        self._challenge_count = 0
        self._syn_fast_retries = 0
        # ready-made segments for the next dispatch: RSTs, and ACKs built while input was
        # processed (tcp_recv.py rule sack-flush); counted in segments_out when made
        self._pending: list[TcpSegment] = []

        # send buffer and its autotuned limit (tcp_send.py)
        self._sbuf = bytearray()
        self._sbuf_head = 0
        self._sbuf_seq = iss + 1  # absolute sequence number of _sbuf[_sbuf_head]
        self._fin_queued = False
        self._snd_buf = cfg.send_buffer

        # receive buffer, reassembly, autotuning, the peer's FIN, delayed ACK (tcp_recv.py)
        # in-order data not yet read: a queue of chunks (Receiver._queue_data), the offset
        # of the first unread byte in the first, and how many bytes are unread
        self._rq: list[bytes | bytearray] = []
        self._rq_off = 0
        self._rq_len = 0
        # the current limit, and dynamic right-sizing state while the buffer can still grow
        # (None once at its cap)
        self._rcv_buf = cfg.recv_buffer
        self._drs: _RcvTuning | None = (
            _RcvTuning(now, 10 * cfg.mss) if cfg.recv_buffer < cfg.recv_buffer_max else None
        )
        # out-of-order ranges: as many as a full window of segments with every other one
        # lost makes (a queue that overflows in a sender's slow start drops every other
        # segment), at least 64; Linux bounds its out-of-order queue by memory only
        self._asm = Assembler(max(64, max(cfg.recv_buffer, cfg.recv_buffer_max) // (2 * cfg.mss)))
        self._peer_fin_seq: int | None = None
        self._rcv_fin = False
        self._rd_closed = False
        self._ack_now = False
        # ACKs sack_ack_input deferred (finish_acks): (SND.UNA, SACKed bytes, new ranges)
        self._ack_batch: tuple[int, int, list[tuple[int, int]]] | None = None
        # the newest of a batch's ACKs fast_input or sack_ack_input holds (finish_acks):
        # [SEG.SEQ, SEG.ACK, SEG.WND, TSval, TSecr] as on the wire, the largest SEG.WND of
        # those it stands in for, its SACK blocks (None: a pure ACK), and how many SACK ACKs
        # it stands in for
        self._held_ack: list[int] | None = None
        self._acks_owed = 0  # extra immediate (duplicate) ACKs, one per out-of-order segment
        # (with SACK, only the first three per RCV.NXT go out: Sender.dispatch)
        self._unacked_bytes = 0
        self._rcv_mss = 536

        # timers, RTT, SYN retries, user timeout, keepalive (tcp_timers.py; poll_at reads all
        # deadlines, each armed by its own room: persist tcp_send.py, delayed ACK
        # tcp_recv.py, linger tcp_state.py)
        self._rto_at: float | None = None
        self._persist_at: float | None = None
        self._persist_backoff = 0
        self._delack_at: float | None = None
        self._linger_at: float | None = None  # TIME_WAIT / orphaned FIN_WAIT_2
        self._keepalive_at: float | None = None
        self._ka_probes = 0
        self._last_rx = now
        # ``syn_rto``: the first SYN's timeout from the RTT known to the remote address
        # (Stack.known_rto, RFC 9040 §8), never longer than the initial RTO
        self._rtt = RttEstimator(
            initial_rto=cfg.initial_rto if syn_rto is None else min(syn_rto, cfg.initial_rto),
            min_rto=cfg.min_rto,
            max_rto=cfg.max_rto,
        )
        self._rtt_seq: int | None = None
        self._rtt_time = 0.0
        # TSvals older than this measure no round trip: the last timeout's retransmission
        # (tcp_timers.py _ts_sample) or the end of a pause (pause_ended)
        self._ts_rto_floor: int | None = None
        # rule rx-stall (tcp_timers.py): the RCV.NXT where data is expected, and when its
        # absence counts as a stall
        self._stall_seq = -1
        self._stall_at: float | None = None
        self._stall_since = 0.0
        self._stall_told = -1  # the RCV.NXT of the last stall reported
        self._stall_asks = 0  # times it was reported again since (``Timers._stall_timer``)
        # the highest SEG.SEQ beyond RCV.NXT of a segment without data (``_peer_ahead``)
        self._seq_ahead = 0
        self._syn_retries = 0
        self._last_progress = now

        # congestion control (congestion.py); pacing (pacing.py) and, for a model-based
        # controller (BBR), delivery-rate estimation (delivery.py): hooks in
        # dispatch/_emit/_bulk_send/poll_at and on ACKs
        self._cc = make_controller(
            cfg.congestion, self._smss, isn, hystart=cfg.hystart, paced=cfg.pacing
        )
        self._pacer: Pacer | None = Pacer() if cfg.pacing else None
        self._dr: DeliveryRate | None = DeliveryRate(now) if self._cc.model_based else None

        # fast recovery, SACK scoreboard, RACK-TLP/PRR (recovery.py)
        self._dupacks = 0
        #: what this NewReno recovery's partial ACKs spent of
        #: ``config.newreno_rto_restarts`` (past it none restarts the RTO)
        self._partial_acks = 0
        self._in_fr = False
        self._recover = iss
        self._rexmit_now = False
        self._high_rxt = iss
        self._sacked: list[list[int]] = []  # sender scoreboard: sorted merged [start, end)
        self._sacked_bytes = 0  # their total (kept by each writer: recovery.py Scoreboard)
        # at most as many ranges as a full send buffer with every other segment lost (a
        # queue overflowing in slow start drops that way), at least 64; past it the lowest
        # is forgotten (its data is then retransmitted): a bound against tiny SACK blocks
        self._sacked_max = max(64, max(cfg.send_buffer, cfg.send_buffer_max) // (2 * cfg.mss))
        # retransmissions during SACK recovery as (start, end, SND.MAX when sent), and the
        # ranges whose retransmission is itself deemed lost (SACKs for later data came back)
        self._rxt_marks: list[tuple[int, int, int]] = []
        self._relost: list[tuple[int, int]] = []
        # RACK-TLP/PRR state and its timer: the RACK reorder timer or the TLP probe
        # timeout, whichever ``_rack.timer`` says
        self._rack: Rack | None = Rack() if cfg.rack and cfg.sack else None
        self._rec_at: float | None = None

    def __repr__(self) -> str:
        return (
            f"<TcpSocket {self.local_port}->{self.remote_port} {self.state.name}"
            f" una={self._snd_una & M32} nxt={self._snd_nxt & M32} rcv={self._rcv_nxt & M32}>"
        )

    def connect(self, now: float) -> None:
        """Active open: CLOSED -> SYN_SENT (the SYN goes out on the next dispatch)."""
        if self._opened:
            raise OSError(errno.EISCONN, "socket already used")
        self._opened = True
        self._now = now
        self._last_progress = now
        self._set_state(TcpState.SYN_SENT, "active OPEN")

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
        on_touched: Callable[[TcpSocket], None] | None = None,
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
            on_touched=on_touched,
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
        sock._set_state(TcpState.SYN_RECEIVED, "passive OPEN")
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
    def send_unsent(self) -> int:
        """Bytes queued and never sent yet (what the sender has left before it waits for
        the application)."""
        n = self._data_end() - self._snd_max
        return n if n > 0 else 0

    @property
    def recv_available(self) -> int:
        return self._rq_len

    @property
    def at_eof(self) -> bool:
        """The peer's FIN arrived and all data before it has been read."""
        return self._rcv_fin and not self._rq_len

    @property
    def can_send(self) -> bool:
        return (
            self.state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT)
            and not self._fin_queued
            and self.send_space > 0
        )

    @property
    def can_recv(self) -> bool:
        return self._rq_len > 0 or self._rcv_fin

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
    def syn_retries(self) -> int:
        """SYN timeouts so far at the initial RTO's scale (the ones ``syn_retries`` counts;
        ``stats.syn_timeouts`` counts the early ones of a short ``syn_rto`` too)."""
        return self._syn_retries

    @property
    def _blackhole_mss(self) -> int:
        """The largest segment (payload) that fits ``blackhole_mtu`` on this connection."""
        return self.config.blackhole_mtu - (40 if len(self.remote_addr) == 4 else 60)

    @property
    def small_segments_only(self) -> bool:
        """Data arrived, but no segment larger than ``blackhole_mtu`` allows: rule rx-stall's
        sign of a black hole (a server's reply headers got through, the rest may not)."""
        return (self._rcv_nxt - self._irs - 1) & M32 != 0 and self._rcv_mss <= self._blackhole_mss

    @property
    def data_vanished(self) -> bool:
        """The peer sent data that never came, and none of it arrived out of order, nor
        ever a segment larger than ``blackhole_mtu`` allows: rule rx-stall's sign of a
        black hole when the first segment of a reply is already full-sized (an ACK from
        the peer, such as the answer to the rule's probe, carried a SEG.SEQ, its SND.NXT,
        beyond RCV.NXT)."""
        return (
            self._seq_ahead > self._rcv_nxt
            and not self._asm
            and self._rcv_mss <= self._blackhole_mss
        )

    @property
    def stall_since(self) -> float:
        """Since when data has been due (rule rx-stall; valid once it reported a stall)."""
        return self._stall_since

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
            pass
        elif st in _SYN_STATES:
            self._fin_queued = True  # FIN_WAIT_1 once established (see TRANSITIONS)
        elif st is TcpState.ESTABLISHED:
            self._fin_queued = True
            self._set_state(TcpState.FIN_WAIT_1, "CLOSE")
        elif st is TcpState.CLOSE_WAIT:
            self._fin_queued = True
            self._set_state(TcpState.LAST_ACK, "CLOSE")
        self._touched()

    def close(self, now: float) -> None:
        """Full close (no more reads or writes); RST if unread data is pending."""
        st = self.state
        if st is TcpState.CLOSED:
            pass
        elif st is TcpState.SYN_SENT:
            self._set_closed(None)
        elif self.recv_available and st is not TcpState.TIME_WAIT:
            self.abort(now)
        else:
            self._rd_closed = True
            self.shutdown_write(now)
            if self.state is TcpState.FIN_WAIT_2 and self._linger_at is None:
                self._linger_at = now + self.config.user_timeout
        self._touched()

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
            self.stats.segments_out += 1
        self._set_closed(None)
        self._sbuf.clear()
        self._sbuf_head = 0
        self._touched()

    def _touched(self) -> None:
        """An application call may have left something to send: tell the owner."""
        on_touched = self._on_touched
        if on_touched is not None:
            on_touched(self)

    def on_icmp_unreachable(self, error: OSError, now: float) -> None:
        """ICMP destination unreachable for this connection (hard in SYN_SENT, else soft)."""
        if self.state in _SYN_STATES:
            self._set_closed(error)
        elif self.state is not TcpState.CLOSED:
            self._soft_error = error

    def raise_path_mtu_mss(self, mss: int | None) -> None:
        """The path carries segments of ``mss`` bytes again (None: as many as the MSSs
        allow): undo ``set_path_mtu_mss`` down to that (RFC 4821's raising of the MTU)."""
        if mss is not None and mss >= self.config.mss:
            mss = None
        if self._pmtu_mss is not None and (mss is None or mss > self._pmtu_mss):
            self._pmtu_mss = mss
            self._update_smss()

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
