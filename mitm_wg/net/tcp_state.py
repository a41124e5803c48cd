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

__all__ = ["StateMachine", "TcpState"]


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


class StateMachine:
    """Mixin of ``TcpSocket``: entering ESTABLISHED, TIME_WAIT and CLOSED."""

    # -- transitions ------------------------------------------------------------------------
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
