"""The TCP state machine (RFC 9293 §3.3.2): the states, the state sets the other rooms
test, and the transitions that open, close and reset a connection.

:class:`StateMachine` is a mixin of :class:`~mitm_wg.net.tcp.TcpSocket` (mixins cost nothing
per packet: the methods are looked up on the socket's class as before).
"""

from __future__ import annotations

import enum
import errno
from typing import TYPE_CHECKING

from mitm_wg.net.congestion import initial_window
from mitm_wg.net.tcp_wire import HALF as _HALF
from mitm_wg.net.tcp_wire import M32

if TYPE_CHECKING:
    from mitm_wg.net.tcp_wire import TcpSegment

__all__ = ["TRANSITIONS", "IllegalTransition", "StateMachine", "TcpState"]


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


class IllegalTransition(RuntimeError):
    """A state change the transition table does not allow: a bug in the socket."""


_S = TcpState
#: Every state change a socket may make, with the event that makes it: RFC 9293 §3.3.2
#: (Figure 5, completed by the event processing of §3.10), then our deviations, each with
#: its reason. ``StateMachine._set_state`` refuses anything else; tests/test_tcp_playbook.py
#: checks that the playbooks take only these.
TRANSITIONS: dict[tuple[TcpState, TcpState], str] = {
    # -- RFC 9293 Figure 5
    (_S.CLOSED, _S.SYN_SENT): "active OPEN / snd SYN",
    (_S.SYN_SENT, _S.SYN_RECEIVED): "rcv SYN / snd SYN,ACK (simultaneous open)",
    (_S.SYN_SENT, _S.ESTABLISHED): "rcv SYN,ACK / snd ACK",
    (_S.SYN_RECEIVED, _S.ESTABLISHED): "rcv ACK of SYN",
    (_S.SYN_RECEIVED, _S.FIN_WAIT_1): "CLOSE queued in SYN-RECEIVED, then rcv ACK of SYN",
    (_S.ESTABLISHED, _S.FIN_WAIT_1): "CLOSE / snd FIN",
    (_S.ESTABLISHED, _S.CLOSE_WAIT): "rcv FIN / snd ACK",
    (_S.FIN_WAIT_1, _S.FIN_WAIT_2): "rcv ACK of FIN",
    (_S.FIN_WAIT_1, _S.CLOSING): "rcv FIN / snd ACK",
    (_S.FIN_WAIT_1, _S.TIME_WAIT): "rcv FIN and ACK of FIN (§3.10.7.4)",
    (_S.FIN_WAIT_2, _S.TIME_WAIT): "rcv FIN / snd ACK",
    (_S.CLOSE_WAIT, _S.LAST_ACK): "CLOSE / snd FIN",
    (_S.CLOSING, _S.TIME_WAIT): "rcv ACK of FIN",
    (_S.LAST_ACK, _S.CLOSED): "rcv ACK of FIN",
    (_S.TIME_WAIT, _S.CLOSED): "TIME_WAIT timeout (config.time_wait, see _enter_time_wait)",
    (_S.SYN_SENT, _S.CLOSED): "CLOSE, rcv RST (refused), SYN retries exhausted, ICMP",
    # §3.10.7.4 (RST), §3.10.4 (ABORT), §3.8.3 (user timeout): from any synchronized state
    **{
        (st, _S.CLOSED): "rcv RST, ABORT, user timeout, keepalive timeout"
        for st in (
            _S.SYN_RECEIVED,
            _S.ESTABLISHED,
            _S.FIN_WAIT_1,
            _S.FIN_WAIT_2,
            _S.CLOSE_WAIT,
            _S.CLOSING,
        )
    },
    # -- deviations
    # No socket ever is in LISTEN: a listening port is the stack's TcpListener, and a SYN
    # to it creates a socket of its own (as Linux's request socks), which starts in
    # SYN-RECEIVED; a RST there closes that socket instead of returning it to LISTEN
    # (the listener is unaffected, the same effect as RFC 9293 §3.10.7.4's "return to
    # LISTEN").
    (_S.CLOSED, _S.SYN_RECEIVED): "passive OPEN from a SYN (TcpSocket.from_syn)",
    # shutdown_write in SYN-SENT queues the FIN (RFC 9293 §3.10.4 says this only for
    # SYN-RECEIVED, and CLOSE in SYN-SENT deletes the connection; a half-close before the
    # handshake completed is what an application that writes a request and shuts down
    # at once does), so the handshake ends in FIN-WAIT-1.
    (_S.SYN_SENT, _S.FIN_WAIT_1): "rcv SYN,ACK with a half-close queued",
    # An orphaned FIN-WAIT-2 (the application closed; the peer never sends its FIN) ends
    # after config.user_timeout, as Linux's tcp_fin_timeout; RFC 9293 leaves it open.
    (_S.FIN_WAIT_2, _S.CLOSED): "orphaned FIN-WAIT-2 timeout, rcv RST, ABORT",
}
_ALLOWED: dict[TcpState, frozenset[TcpState]] = {
    st: frozenset(b for a, b in TRANSITIONS if a is st) for st in TcpState
}


class StateMachine:
    """Mixin of ``TcpSocket``: the one place ``state`` changes (:meth:`_set_state`), and
    entering ESTABLISHED, TIME_WAIT and CLOSED."""

    state: TcpState

    def _set_state(self, new: TcpState, event: str) -> None:
        """Move to ``new`` because of ``event`` (named as in :data:`TRANSITIONS`); a change
        the table does not list raises :class:`IllegalTransition`. Every state change goes
        through here (a socket starts CLOSED)."""
        old = self.state
        if new not in _ALLOWED[old]:
            raise IllegalTransition(f"TCP {old.name} -> {new.name} ({event}) is not allowed")
        self.state = new

    def _on_established(self, now: float, spurious: bool = False) -> None:
        if self._fin_queued:
            self._set_state(TcpState.FIN_WAIT_1, "handshake done, FIN queued")
        else:
            self._set_state(TcpState.ESTABLISHED, "handshake done")
        cc = self._cc
        cc.set_mss(self._smss)
        # RFC 5681 §3.1: one segment if the SYN or SYN-ACK had to be retransmitted (a
        # timeout; not when the SYN-ACK shows it was early: ``_process_syn_sent``). Without
        # timestamps nothing shows that: a timeout shorter than the initial RTO (``syn_rto``
        # from the destination's RTT, or from the path's lower bound) may have been early,
        # and only one at the initial RTO's scale counts (Linux never counts a single SYN
        # retransmission).
        if self._ts_ok:
            lost = self.stats.syn_timeouts > 0 and not spurious
        else:
            lost = self._syn_retries > 0
        cc.cwnd = self._smss if lost else initial_window(self._smss)
        rtt = self._rtt
        if rtt.srtt is None and self.stats.syn_timeouts:
            # no sample (Karn's rule): RFC 6298 §5.7's 3 s after a lost SYN, else §2.1's
            # initial RTO, not a short ``syn_rto`` backed off (a guess from the path)
            rtt.restart(3.0 if lost else self.config.initial_rto)
        self._last_progress = now
        if not self._sack_ok:
            self._rack = None  # RACK here works on the SACK scoreboard

    def _set_closed(self, error: OSError | None) -> None:
        self._rec_at = None
        if error is not None and self.error is None:
            self.error = error
        if self.state is not TcpState.CLOSED:
            self._set_state(TcpState.CLOSED, "closed")
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
        """TIME_WAIT for ``config.time_wait`` (1 s, not 2*MSL: the deviation and what covers
        for it are at TcpConfig.time_wait); a newer SYN for the 4-tuple may end it early
        (RFC 6191, :meth:`time_wait_accepts_syn`)."""
        self._set_state(TcpState.TIME_WAIT, "rcv FIN or ACK of FIN")
        self._linger_at = now + self.config.time_wait
        self._rto_at = None
        self._rec_at = None
        self._persist_at = None
        self._keepalive_at = None
        self._in_fr = False

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
