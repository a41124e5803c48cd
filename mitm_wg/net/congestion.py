"""Congestion controllers: NewReno (RFC 5681/6582 window rules) and CUBIC (RFC 9438),
both leaving their initial slow start by HyStart++ (RFC 9406, ``hystart.py``); BBR lives
in ``bbr.py``.

The controllers only own ``cwnd``/``ssthresh`` growth and reduction; the socket decides
when a congestion event happens (fast retransmit, RTO) and runs loss recovery itself.
All sizes are bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mitm_wg.net.hystart import HyStart
from mitm_wg.net.pacing import BURST_TIME

if TYPE_CHECKING:
    from mitm_wg.net.bbr import Bbr

__all__ = ["Cubic", "NewReno", "initial_window", "make_controller"]


def initial_window(smss: int) -> int:
    """RFC 6928: min(10*MSS, max(2*MSS, 14600))."""
    return min(10 * smss, max(2 * smss, 14600))


class NewReno:
    """Slow start and congestion avoidance with appropriate byte counting (RFC 3465).

    The initial slow start runs HyStart++ (``hystart``, the default: RFC 9406's growth
    limit L per ACK, unlimited when ``paced``, else 8 SMSS, and its delay-based exit);
    without it, and in every slow start after a loss or timeout, RFC 3465's L = 2."""

    __slots__ = ("_acc", "cwnd", "hystart", "smss", "ssthresh")

    name = "newreno"
    #: False: a loss-based controller; the socket applies PRR and cwnd = ssthresh around
    #: recovery. True (BBR): the controller sets cwnd itself from rate samples.
    model_based = False
    #: the pacer's release span in seconds of the rate (pacing.py; BBR grows its own)
    release_time = BURST_TIME

    def __init__(self, smss: int, *, hystart: bool = True, paced: bool = True) -> None:
        self.smss = smss
        self.cwnd = initial_window(smss)
        self.ssthresh = 1 << 62
        self._acc = 0
        #: the initial slow start's HyStart++ (None: off, or that slow start is over)
        self.hystart: HyStart | None = HyStart(paced) if hystart else None

    def set_mss(self, smss: int) -> None:
        if smss != self.smss:
            segs = max(1, self.cwnd // self.smss)
            self.smss = smss
            self.cwnd = segs * smss

    def pacing_rate(self, srtt: float | None) -> float:
        """Pacing rate in bytes/s (0: unpaced, before the first RTT sample), as Linux's
        tcp_update_pacing_rate: cwnd/SRTT x 2 in slow start (cwnd < ssthresh/2), x 1.2
        after (sysctl tcp_pacing_ss_ratio/tcp_pacing_ca_ratio)."""
        if srtt is None or srtt <= 0.0:
            return 0.0
        cwnd = self.cwnd
        return (2.0 if cwnd < self.ssthresh >> 1 else 1.2) * cwnd / srtt

    def on_ack(
        self,
        acked: int,
        now: float,
        srtt: float | None,
        rtt: float | None = None,
        una: int = 0,
        nxt: int = 0,
    ) -> None:
        """New data was cumulatively acknowledged outside loss recovery: ``acked`` bytes,
        with the ACK's RTT sample ``rtt`` (None without one); ``una``/``nxt``: SND.UNA
        after it and SND.NXT (HyStart++'s rounds)."""
        if self.cwnd >= self.ssthresh:
            self._avoid(acked, now, srtt)
            return
        hystart = self.hystart
        if hystart is None:
            self.cwnd += min(acked, 2 * self.smss)
            return
        self.cwnd += hystart.on_ack(acked, self.smss, rtt, una, nxt)
        if hystart.done:  # CSS is over: congestion avoidance (RFC 9406 §4.2)
            self.ssthresh = self.cwnd
            self.hystart = None

    def _avoid(self, acked: int, now: float, srtt: float | None) -> None:
        """Congestion avoidance (RFC 5681 §3.1 with byte counting): one SMSS per cwnd of
        acknowledged bytes."""
        self._acc += acked
        if self._acc >= self.cwnd:
            self._acc -= self.cwnd
            self.cwnd += self.smss

    def _loss_ssthresh(self, flight: int) -> int:
        """ssthresh after a loss or timeout: max(FlightSize/2, 2*SMSS) (RFC 5681 (4))."""
        return max(flight // 2, 2 * self.smss)

    def on_congestion_event(self, now: float, flight: int) -> None:
        """Fast retransmit: ssthresh as :meth:`_loss_ssthresh`; cwnd = ssthresh."""
        self.ssthresh = self._loss_ssthresh(flight)
        self.cwnd = self.ssthresh
        self._acc = 0
        self.hystart = None  # a loss ends the initial slow start (RFC 9406 §4.2)

    def on_rto(self, now: float, flight: int) -> None:
        """Retransmission timeout: ssthresh as above, cwnd = loss window (1 SMSS)."""
        self.ssthresh = self._loss_ssthresh(flight)
        self.cwnd = self.smss
        self._acc = 0
        self.hystart = None


class Cubic(NewReno):
    """CUBIC window growth (RFC 9438) with the Reno-friendly region; slow start as NewReno."""

    __slots__ = ("_cwnd_epoch", "_epoch", "_k", "_w_est", "_w_last_max", "_w_max")

    name = "cubic"
    C = 0.4
    BETA = 0.7

    def __init__(self, smss: int, *, hystart: bool = True, paced: bool = True) -> None:
        super().__init__(smss, hystart=hystart, paced=paced)
        self._epoch: float | None = None
        self._k = 0.0
        self._w_max = 0.0  # segments
        self._w_last_max = 0.0
        self._w_est = 0.0
        self._cwnd_epoch = 0.0

    def _avoid(self, acked: int, now: float, srtt: float | None) -> None:
        """CUBIC's window growth (RFC 9438 §4) in place of NewReno's."""
        smss = self.smss
        cwnd_seg = self.cwnd / smss
        if self._epoch is None:
            self._epoch = now
            if cwnd_seg < self._w_max:
                self._k = ((self._w_max - cwnd_seg) / self.C) ** (1 / 3)
            else:
                self._k = 0.0
                self._w_max = cwnd_seg
            self._w_est = cwnd_seg
            self._cwnd_epoch = cwnd_seg
        t = now - self._epoch + (srtt or 0.0)
        target = self._w_max + self.C * (t - self._k) ** 3
        target = min(max(target, cwnd_seg), 1.5 * cwnd_seg)
        alpha = 3 * (1 - self.BETA) / (1 + self.BETA)
        self._w_est += alpha * (acked / smss) / cwnd_seg
        if self._w_est > target:
            target = self._w_est
        # grow by (target - cwnd)/cwnd segments per acknowledged segment
        inc = (target - cwnd_seg) / cwnd_seg * (acked / smss)
        self._acc += int(inc * smss)
        if self._acc >= 1:
            self.cwnd += self._acc
            self._acc = 0

    def _reduce(self) -> None:
        cwnd_seg = self.cwnd / self.smss
        if cwnd_seg < self._w_last_max:  # fast convergence
            self._w_last_max = cwnd_seg
            self._w_max = cwnd_seg * (1 + self.BETA) / 2
        else:
            self._w_last_max = cwnd_seg
            self._w_max = cwnd_seg
        self._epoch = None

    def _loss_ssthresh(self, flight: int) -> int:
        """beta x cwnd (RFC 9438 §4.6), after the W_max bookkeeping of the reduction."""
        self._reduce()
        return max(int(self.cwnd * self.BETA), 2 * self.smss)


def make_controller(
    name: str, smss: int, seed: int = 0, *, hystart: bool = True, paced: bool = True
) -> NewReno | Bbr:
    """The controller ``name`` ("newreno", "cubic" or "bbr"); ``seed`` (e.g. the ISN)
    picks BBR's starting phase of the gain cycle; ``hystart``/``paced``: NewReno's and
    CUBIC's initial slow start (BBR has its own startup)."""
    if name == "newreno":
        return NewReno(smss, hystart=hystart, paced=paced)
    if name == "cubic":
        return Cubic(smss, hystart=hystart, paced=paced)
    if name == "bbr":
        from mitm_wg.net.bbr import Bbr

        return Bbr(smss, seed)
    raise ValueError(f"unknown congestion controller {name!r} (newreno, cubic or bbr)")
