"""HyStart++ (RFC 9406) in NewReno's and CUBIC's initial slow start: its rules one by one
(``Sender`` below plays the socket: SND.UNA, SND.NXT and one RTT sample per ACK), then the
simulator: a bulk upload into a bottleneck whose queue holds half a BDP, with and without it.
"""

from __future__ import annotations

import pytest
from test_sim import payload, run_transfer

from mitm_wg.net.bbr import Bbr
from mitm_wg.net.congestion import Cubic, NewReno, make_controller
from mitm_wg.net.hystart import (
    CSS_GROWTH_DIVISOR,
    CSS_ROUNDS,
    MAX_RTT_THRESH,
    MIN_RTT_THRESH,
    N_RTT_SAMPLE,
    NON_PACED_L,
    HyStart,
)
from mitm_wg.net.tcp import TcpConfig
from sim import LinkParams, Transfer, make_pair

SMSS = 1000
CONTROLLERS = [NewReno, Cubic]


class Sender:
    """What the socket tells the controller: every ACK newly acknowledges ``n`` bytes,
    SND.NXT runs a window ahead of SND.UNA (the sender always has data)."""

    def __init__(self, cc: NewReno) -> None:
        self.cc = cc
        self.una = 0
        self.nxt = cc.cwnd

    def ack(self, rtt: float | None, n: int = SMSS) -> int:
        """One ACK; returns the SND.NXT it was given."""
        self.una += n
        nxt = self.nxt
        self.cc.on_ack(n, 0.0, None, rtt, self.una, nxt)
        self.nxt = max(nxt, self.una + self.cc.cwnd)
        return nxt

    def round(self, rtt: float | None, samples: int | None = None) -> int:
        """One round as RFC 9406 counts them: from the ACK that reaches the SND.NXT of the
        previous round's start to the ACK before the next such one. ``samples``: only
        that many of its ACKs carry an RTT sample. Returns cwnd's growth from the round's
        first ACK."""
        taken = 0

        def sample() -> float | None:
            nonlocal taken
            taken += 1
            return rtt if samples is None or taken <= samples else None

        before = self.cc.cwnd
        end = self.ack(sample())
        growth = self.cc.cwnd - before
        while self.una + SMSS < end:
            self.ack(sample())
        return growth


def in_css(cc: NewReno) -> bool:
    assert cc.hystart is not None
    return cc.hystart.in_css


def rise_to_css(sender: Sender, base: float = 0.05) -> None:
    """Two rounds at ``base``, then a round whose RTT rose by the threshold (CSS entered at
    its N_RTT_SAMPLE-th sample)."""
    sender.round(base)
    sender.round(base)
    sender.round(base + max(MIN_RTT_THRESH, min(base / 8, MAX_RTT_THRESH)))
    assert in_css(sender.cc)


# -- growth per ACK ---------------------------------------------------------------------------
@pytest.mark.parametrize("controller", CONTROLLERS)
def test_a_stretch_ack_grows_the_window_by_rfc_9406s_limit(controller: type[NewReno]) -> None:
    # paced: unlimited (L = infinity); unpaced: L = 8; HyStart++ off: RFC 3465's L = 2
    for kw, limit in (({}, 20), ({"paced": False}, NON_PACED_L), ({"hystart": False}, 2)):
        cc = controller(SMSS, **kw)  # type: ignore[arg-type]
        before = cc.cwnd
        cc.on_ack(20 * SMSS, 0.0, None, 0.05, 20 * SMSS, cc.cwnd)
        assert cc.cwnd - before == limit * SMSS, kw


def test_make_controller_passes_the_options_on() -> None:
    cc = make_controller("cubic", SMSS, hystart=True, paced=False)
    assert isinstance(cc, Cubic) and cc.hystart is not None and cc.hystart._limit == 8
    assert make_controller("newreno", SMSS, hystart=False).hystart is None  # type: ignore[union-attr]
    sock_cc = TcpConfig()
    assert sock_cc.hystart is True  # on by default (BBR ignores it)


# -- the delay-increase exit ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("base", "threshold"),
    [
        (0.010, MIN_RTT_THRESH),  # 10 ms / 8 < 4 ms: at least 4 ms
        (0.050, 0.050 / 8),  # 6.25 ms
        (0.200, MAX_RTT_THRESH),  # 25 ms: at most 16 ms
    ],
)
def test_css_begins_when_a_rounds_min_rtt_rose_by_the_threshold(
    base: float, threshold: float
) -> None:
    below = Sender(NewReno(SMSS))
    below.round(base)
    below.round(base)
    below.round(base + threshold - 0.0002)
    assert not in_css(below.cc)

    at = Sender(NewReno(SMSS))
    at.round(base)
    at.round(base)
    at.round(base + threshold)
    assert in_css(at.cc)


def test_the_rounds_minimum_counts_not_its_latest_sample() -> None:
    s = Sender(NewReno(SMSS))
    s.round(0.05)
    s.round(0.05)
    # the RTT rises to 70 ms on every ACK but one of this round: that one is its minimum
    end = s.ack(0.07)
    s.ack(0.05)
    while s.una + SMSS < end:
        s.ack(0.07)
    assert not in_css(s.cc)


def test_css_waits_for_n_rtt_samples_in_the_round() -> None:
    s = Sender(NewReno(SMSS))
    s.round(0.05)
    s.round(0.05)
    # a 30 ms rise, but only N_RTT_SAMPLE - 1 of the round's ACKs carried a sample
    s.round(0.08, samples=N_RTT_SAMPLE - 1)
    assert not in_css(s.cc)

    s = Sender(NewReno(SMSS))
    s.round(0.05)
    s.round(0.05)
    hs = s.cc.hystart
    assert hs is not None
    end = s.ack(0.08)
    for _ in range(N_RTT_SAMPLE - 2):
        s.ack(0.08)
    assert not hs.in_css  # 7 samples
    s.ack(0.08)
    assert hs.in_css  # the 8th: at once, within the round
    assert s.una + SMSS < end


def test_no_exit_without_a_previous_rounds_minimum() -> None:
    # the first round has no previous one to compare with; a round without any sample
    # leaves none to compare the next one with either
    s = Sender(NewReno(SMSS))
    s.round(0.5)
    assert not in_css(s.cc)
    s.round(None)
    s.round(0.9)
    assert not in_css(s.cc)
    s.round(0.9)
    assert not in_css(s.cc)


@pytest.mark.parametrize("controller", CONTROLLERS)
def test_css_grows_by_a_quarter(controller: type[NewReno]) -> None:
    s = Sender(controller(SMSS))
    assert s.round(0.05) == SMSS
    rise_to_css(s)
    assert s.round(0.06) == SMSS // CSS_GROWTH_DIVISOR
    assert s.cc.ssthresh == 1 << 62  # still slow start as far as the controller goes


def test_a_false_alarm_resumes_slow_start() -> None:
    s = Sender(NewReno(SMSS))
    rise_to_css(s)  # baseline: 56.25 ms
    s.round(0.056)  # the next round's minimum is below the baseline: jitter, not a queue
    assert not in_css(s.cc)
    assert s.round(0.056) == SMSS  # slow start's growth again
    # a new rise, over the last round's minimum, enters CSS again
    s.round(0.056 + 0.056 / 8)
    assert in_css(s.cc)


def test_a_false_alarm_needs_n_rtt_samples_too() -> None:
    s = Sender(NewReno(SMSS))
    rise_to_css(s)
    s.round(0.05, samples=N_RTT_SAMPLE - 1)  # below the baseline, but 7 samples only
    assert in_css(s.cc)


def test_a_round_at_the_baseline_stays_in_css() -> None:
    s = Sender(NewReno(SMSS))
    rise_to_css(s)
    s.round(0.05625)
    assert in_css(s.cc)


@pytest.mark.parametrize("controller", CONTROLLERS)
def test_css_rounds_end_in_congestion_avoidance(controller: type[NewReno]) -> None:
    s = Sender(controller(SMSS))
    rise_to_css(s)
    hs = s.cc.hystart
    assert isinstance(hs, HyStart)
    # the round CSS began in is its first: it and CSS_ROUNDS - 1 more are complete at the
    # first ACK of the round after them
    for _ in range(CSS_ROUNDS - 1):
        s.round(0.06)
        assert s.cc.hystart is hs and hs.in_css
    cwnd = s.cc.cwnd
    s.ack(0.06)
    assert s.cc.hystart is None and hs.done
    assert s.cc.cwnd == s.cc.ssthresh == cwnd  # (the boundary's ACK grows nothing)
    # congestion avoidance: about one SMSS per window's worth of ACKs from now on
    for _ in range(cwnd // SMSS + 1):
        s.ack(0.06)
    assert cwnd < s.cc.cwnd <= cwnd + 2 * SMSS


@pytest.mark.parametrize("controller", CONTROLLERS)
@pytest.mark.parametrize("event", ["loss", "rto"])
def test_a_loss_ends_hystart_for_the_connection(controller: type[NewReno], event: str) -> None:
    s = Sender(controller(SMSS))
    rise_to_css(s)
    if event == "loss":
        s.cc.on_congestion_event(0.0, s.nxt - s.una)
    else:
        s.cc.on_rto(0.0, s.nxt - s.una)
    assert s.cc.hystart is None
    if event == "rto":
        # the slow start after the timeout is RFC 5681's, with RFC 3465's L = 2
        before = s.cc.cwnd
        s.cc.on_ack(10 * SMSS, 0.0, None, 0.05, s.una + 10 * SMSS, s.nxt)
        assert s.cc.cwnd - before == 2 * SMSS < s.cc.ssthresh


def test_the_socket_leaves_bbrs_window_to_its_rate_samples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """BBR has no on_ack (its cwnd follows on_rate_sample): the socket never calls one for
    it, through slow start, loss recovery and timeouts."""
    assert not hasattr(Bbr, "on_ack")

    def called(*args: object) -> None:
        raise AssertionError("on_ack called for BBR")

    monkeypatch.setattr(Bbr, "on_ack", called, raising=False)
    lossy = LinkParams(delay=0.01, loss=0.03, reorder=0.02, reorder_delay=0.004)
    tr = run_transfer(3, 1 << 20, 0, timeout=120.0, ab=lossy, ba=lossy, tcp_config=TcpConfig())
    assert tr.client is not None and tr.client.stats.retransmits > 0


# -- the simulator: slow start into a bottleneck ----------------------------------------------
# 50 ms RTT, a 10 MB/s bottleneck (BDP 500 kB) whose drop-tail queue holds 1 MiB: plain slow
# start doubles past BDP + queue within one round and loses hundreds of segments in it;
# HyStart++ sees the queue in the next round's RTT first.
BOTTLENECK = (
    LinkParams(delay=0.025, bandwidth=10e6, queue_bytes=1 << 20),
    LinkParams(delay=0.025),
)


def upload(congestion: str, hystart: bool, pacing: bool) -> tuple[int, float, HyStart | None]:
    """8 MiB through BOTTLENECK: the bottleneck's drops, the virtual time it took, and the
    initial slow start's HyStart++ (as the transfer left it)."""
    ab, ba = BOTTLENECK
    sim = make_pair(
        seed=1,
        ab=ab,
        ba=ba,
        tcp_config=TcpConfig(congestion=congestion, hystart=hystart, pacing=pacing),
    )
    tr = Transfer(sim, payload(1, 8 << 20), b"")
    tr.start()
    client = tr.client
    assert client is not None and isinstance(client._cc, NewReno)
    hs = client._cc.hystart
    assert sim.run_until(lambda: tr.done() or tr.failure() is not None, 120.0), tr.report()
    assert tr.failure() is None, tr.report()
    assert bytes(tr.got_ab) == tr.data_ab
    return sim.links[0].stats.queue_drops, sim.now, hs


@pytest.mark.parametrize("congestion", ["newreno", "cubic"])
@pytest.mark.parametrize("pacing", [True, False])
def test_sim_hystart_leaves_slow_start_before_the_overshoot(congestion: str, pacing: bool) -> None:
    drops_off, time_off, none = upload(congestion, False, pacing)
    drops_on, time_on, hs = upload(congestion, True, pacing)
    assert none is None and hs is not None
    # the delay signal came before any loss: CSS was entered (and maybe completed)
    assert hs.in_css or hs.done
    assert drops_on * 2 < drops_off, (drops_on, drops_off)
    # and no slower (simulated seconds, not wall-clock time: every run replays exactly;
    # with SACK recovery that resends only what was lost, hundreds of drops cost ~no time)
    assert time_on <= time_off + 0.005, (time_on, time_off)
