from __future__ import annotations

import pytest

from mitm_wg.net.congestion import Cubic, NewReno, initial_window
from mitm_wg.net.rtt import RttEstimator


def test_initial_rto_and_first_sample() -> None:
    r = RttEstimator(initial_rto=1.0, min_rto=0.2, max_rto=60.0)
    assert r.rto == 1.0
    r.sample(0.5)  # RFC 6298 §2.2: SRTT = R, RTTVAR = R/2, RTO = SRTT + 4*RTTVAR
    assert r.srtt == pytest.approx(0.5)
    assert r.rttvar == pytest.approx(0.25)
    assert r.rto == pytest.approx(1.5)


def test_subsequent_samples() -> None:
    r = RttEstimator(min_rto=0.001)
    r.sample(0.1)
    r.sample(0.2)  # RTTVAR = 3/4*0.05 + 1/4*|0.1-0.2|; SRTT = 7/8*0.1 + 1/8*0.2
    assert r.rttvar == pytest.approx(0.0625)
    assert r.srtt == pytest.approx(0.1125)
    assert r.rto == pytest.approx(0.1125 + 4 * 0.0625)


def test_min_max_and_granularity() -> None:
    r = RttEstimator(min_rto=0.2, max_rto=5.0)
    r.sample(0.001)
    assert r.rto == 0.2
    r.sample(100.0)
    assert r.rto == 5.0
    g = RttEstimator(min_rto=0.0001, granularity=0.01)
    g.sample(0.05)
    g.sample(0.05)
    g.sample(0.05)
    for _ in range(100):
        g.sample(0.05)
    assert g.rto == pytest.approx(0.06)  # SRTT + max(G, 4*RTTVAR) with RTTVAR -> 0


def test_backoff_doubles_until_max_and_sample_resets() -> None:
    r = RttEstimator(initial_rto=1.0, max_rto=6.0)
    seen = []
    for _ in range(5):
        seen.append(r.rto)
        r.backoff()
    assert seen == [1.0, 2.0, 4.0, 6.0, 6.0]
    r.sample(0.3)
    assert r.backoffs == 0 and r.rto == pytest.approx(0.3 + 4 * 0.15)


def test_invalid_config() -> None:
    with pytest.raises(ValueError):
        RttEstimator(min_rto=2.0, max_rto=1.0)


def test_initial_window_rfc6928() -> None:
    assert initial_window(1460) == 14600
    assert initial_window(1000) == 10000
    assert initial_window(9000) == 18000  # max(2*MSS, 14600) bound
    assert initial_window(500) == 5000


def test_newreno_slow_start_and_avoidance() -> None:
    cc = NewReno(1000)
    assert cc.cwnd == 10000
    cc.on_ack(1000, 0.0, None)
    assert cc.cwnd == 11000
    cc.on_congestion_event(0.0, 20000)
    assert cc.ssthresh == 10000 and cc.cwnd == 10000
    for _ in range(10):  # one cwnd's worth of ACKs -> +1 MSS
        cc.on_ack(1000, 0.0, None)
    assert cc.cwnd == 11000
    cc.on_rto(0.0, 3000)
    assert cc.cwnd == 1000 and cc.ssthresh == 2000  # max(flight/2, 2*SMSS)


def test_cubic_reduces_by_beta_and_grows_back_towards_wmax() -> None:
    cc = Cubic(1000)
    cc.cwnd = 100_000
    cc.ssthresh = 50_000
    cc.on_congestion_event(0.0, 100_000)
    assert cc.cwnd == 70_000 and cc.ssthresh == 70_000
    t = 0.0
    for _ in range(2000):
        t += 0.001
        cc.on_ack(1000, t, 0.05)
    assert 70_000 < cc.cwnd
    # K = cbrt(W_max*(1-beta)/C) ~ cbrt(100*0.3/0.4) ~ 4.2 s: after 2 s still below W_max
    assert cc.cwnd < 100_000
