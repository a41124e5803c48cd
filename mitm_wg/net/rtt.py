"""Retransmission timeout estimation (RFC 6298)."""

from __future__ import annotations

__all__ = ["RttEstimator"]


class RttEstimator:
    """SRTT/RTTVAR smoothing and the RTO with exponential backoff.

    ``rto`` is the current timeout including backoff: ``base_rto * 2**backoff`` clamped to
    ``max_rto``.  Feed samples with :meth:`sample` (only unambiguous ones: Karn's rule or
    timestamp echoes); call :meth:`backoff` when the retransmission timer fires.
    """

    __slots__ = ("_backoff", "base_rto", "granularity", "max_rto", "min_rto", "rttvar", "srtt")

    def __init__(
        self,
        *,
        initial_rto: float = 1.0,
        min_rto: float = 0.2,
        max_rto: float = 60.0,
        granularity: float = 0.001,
    ) -> None:
        if not 0 < min_rto <= max_rto:
            raise ValueError("need 0 < min_rto <= max_rto")
        self.min_rto = min_rto
        self.max_rto = max_rto
        self.granularity = granularity
        self.srtt: float | None = None
        self.rttvar: float = 0.0
        self.base_rto = min(max(initial_rto, min_rto), max_rto)
        self._backoff = 0

    def sample(self, rtt: float) -> None:
        """A new round-trip measurement R (seconds).  Resets the backoff (RFC 6298 §5)."""
        if rtt < 0:
            return
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        rto = self.srtt + max(self.granularity, 4 * self.rttvar)
        self.base_rto = min(max(rto, self.min_rto), self.max_rto)
        self._backoff = 0

    def backoff(self) -> None:
        """The retransmission timer expired: double the timeout (RFC 6298 §5.5)."""
        if self.rto < self.max_rto:
            self._backoff += 1

    def restart(self, rto: float) -> None:
        """No measurement yet, start over at ``rto``, without backoff (RFC 6298 §2.1)."""
        self.base_rto = min(max(rto, self.min_rto), self.max_rto)
        self._backoff = 0

    @property
    def backoffs(self) -> int:
        return self._backoff

    @property
    def rto(self) -> float:
        return min(self.base_rto * (1 << self._backoff), self.max_rto)
