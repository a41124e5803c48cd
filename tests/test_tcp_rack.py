"""RACK-TLP (RFC 8985) and PRR (RFC 6937): playbook tests of each rule, and simulator runs
under loss, reordering and bursty loss compared with the RFC 6675 rules (``rack=False``).

Playbook connections have a 100 ms RTT (SYN-ACK after 0.1 s), MSS 1000, SACK, no
timestamps: SRTT = min_RTT = 0.1 s, so reo_wnd = min_RTT/4 = 25 ms and PTO = 2*SRTT.
"""

from __future__ import annotations

import math

import pytest
from test_sim import run_transfer

from mitm_wg.net.tcp import TcpState
from sim import LinkParams
from tcp_playbook import Pb, active, cfg

ACK = 0x10
SYN = 0x02
ISS = 1000
PISS = 5000
RTT = 0.1


def est(**kw: object) -> Pb:
    """Established at t=RTT with one RTT sample of RTT (Karn timing of the SYN)."""
    pb = active(cfg(**kw), isn=ISS)
    pb.out()
    pb.at(RTT).send(SYN | ACK, PISS, ISS + 1, mss=1000, sack_permitted=True)
    assert pb.sock.state is TcpState.ESTABLISHED
    pb.out()
    assert pb.sock.srtt == pytest.approx(RTT)
    return pb


def sack(pb: Pb, ack: int, *blocks: tuple[int, int]) -> None:
    """An ACK from the peer; ``ack`` and the blocks relative to our ISS."""
    pb.send(ACK, PISS + 1, ISS + ack, sack_blocks=tuple((ISS + a, ISS + b) for a, b in blocks))


def send_segments(pb: Pb, n: int, at: float) -> list:
    pb.sock.send(b"".join(bytes([i % 256]) * 1000 for i in range(n)))
    segs = pb.at(at).out()
    assert len(segs) == n
    return segs


# -- RACK (RFC 8985 §6) ---------------------------------------------------------------------
def test_rack_marks_lost_after_reo_wnd_when_a_later_segment_is_sacked() -> None:
    pb = est()
    segs = send_segments(pb, 4, 0.1)
    # one RTT later the 2nd segment is SACKed, the 1st is missing: not lost yet (one
    # segment SACKed < DupThresh, reordering window min_RTT/4 = 25 ms)
    pb.at(0.2)
    sack(pb, 1, (1001, 2001))
    pb.expect([])
    assert pb.poll() == pytest.approx(0.1 + RTT + RTT / 4)  # the RACK reorder timer
    pb.at(0.22).expect([])
    # at xmit_ts + RACK.rtt + reo_wnd it is lost: fast recovery, retransmitted
    pb.at(0.225)
    pb.expect([segs[0]])
    st = pb.sock.stats
    assert st.fast_retransmits == 1 and st.rto_expired == 0 and st.retransmits == 1


def test_reordering_within_reo_wnd_causes_no_retransmission() -> None:
    pb = est()
    send_segments(pb, 4, 0.1)
    pb.at(0.2)
    sack(pb, 1, (1001, 2001))
    sack(pb, 1, (1001, 3001))
    pb.expect([])
    pb.at(0.21)
    sack(pb, 3001)  # the first segment arrives late (reordered, not lost)
    pb.expect([])
    pb.at(0.3)
    sack(pb, 4001)
    pb.at(1.0).expect([])
    st = pb.sock.stats
    assert st.retransmits == st.fast_retransmits == st.rto_expired == 0
    assert pb.sock._rack is not None and pb.sock._rack.reordering_seen


def test_without_reordering_dupthresh_sacked_segments_mean_lost_at_once() -> None:
    # RFC 8985 §6.2 step 4: no reordering seen and DupThresh segments SACKed: reo_wnd = 0
    pb = est()
    segs = send_segments(pb, 5, 0.1)
    pb.at(0.2)
    sack(pb, 1, (1001, 2001))
    sack(pb, 1, (1001, 3001))
    pb.expect([])
    sack(pb, 1, (1001, 4001))
    pb.expect([segs[0]])


def test_dsack_widens_reo_wnd() -> None:
    pb = est()
    segs = send_segments(pb, 8, 0.1)
    pb.at(0.2)
    for k in (2, 3, 4):
        sack(pb, 1, (1001, k * 1000 + 1))
    pb.expect([segs[0]])  # 3 SACKed, no reordering seen yet: retransmitted at once
    rack = pb.sock._rack
    assert rack is not None and rack.reo_wnd_mult == 1
    # the original was only late: cumulative ACK, then the retransmission comes back as
    # a DSACK (RFC 2883: first block below the cumulative ACK)
    pb.at(0.21)
    sack(pb, 4001)
    sack(pb, 4001, (1, 1001))
    assert pb.sock.stats.dsacks == 1
    assert rack.reo_wnd_mult == 2 and rack.reo_wnd_persist == 16
    # §6.2: only step 3 (an original delivered below RACK.fack) is reordering seen; a
    # DSACK alone also follows an RTO's go-back-N
    assert not rack.reordering_seen
    smss = pb.sock._smss
    assert rack.reo_wnd(False, 0, smss, RTT) == pytest.approx(2 * RTT / 4)
    # a second DSACK within the same round trip does not widen it again (§6.2 step 4)
    sack(pb, 4001, (1, 1001))
    assert rack.reo_wnd_mult == 2
    pb.at(0.25)
    sack(pb, 8001)  # recovery ends
    assert not pb.sock._in_fr
    # next time RACK waits min_RTT/4*2 = 50 ms for a hole below SACKed data (below
    # DupThresh SACKed segments: with three and no reordering seen it would not wait)
    new = send_segments(pb, 4, 0.3)
    pb.at(0.4)
    for k in (2, 3):
        sack(pb, 8001, (9001, 8001 + k * 1000))
    pb.expect([])
    assert pb.poll() == pytest.approx(0.3 + rack.rtt + 2 * RTT / 4)
    pb.at(pb.poll()).expect([new[0]])


def test_dsack_of_a_segment_never_retransmitted_is_a_network_copy() -> None:
    """A receiver reports every copy it gets (Linux and we do), also those the network
    made: only as many DSACKed segments as were retransmitted can widen the window."""
    pb = est()
    segs = send_segments(pb, 8, 0.1)
    rack = pb.sock._rack
    assert rack is not None
    pb.at(0.2)
    sack(pb, 2001)
    sack(pb, 2001, (1, 1001))  # a copy of the first segment: nothing was retransmitted
    assert pb.sock.stats.dsacks == 1 and pb.sock.stats.retransmits == 0
    assert rack.reo_wnd_mult == 1 and rack.dsack_round is None
    # two holes below four SACKed segments: both retransmitted at once
    sack(pb, 2001, (3001, 4001), (5001, 8001))
    pb.expect([segs[2], segs[4]])
    # the originals were only late: the first retransmission comes back as a DSACK, the
    # second of two DSACKed segments against two retransmitted
    pb.at(0.21)
    sack(pb, 8001)
    sack(pb, 8001, (2001, 3001))
    assert pb.sock.stats.dsacks == 2 and rack.reo_wnd_mult == 2


def test_retransmission_delivered_sooner_than_min_rtt_is_ambiguous_whatever_the_echo() -> None:
    """RFC 8985 §6.2 step 2: a retransmitted segment's delivery is ignored if the echo
    predates the retransmission *or* it came back sooner than min_RTT. Timestamps tick in
    milliseconds, so on a path of ~1 ms the original's ACK can echo the retransmission's
    tick; taken as the retransmission's, its RACK.rtt (here 40 ms against min_RTT 100 ms)
    marked every original sent before it and not yet SACKed lost at once (a simulated
    upload at 2 % loss, 1 ms RTT, retransmitted 1411 segments for 438 losses, 969 of
    them DSACKed)."""
    pb = active(cfg(), isn=ISS)
    pb.out()
    pb.at(RTT).send(SYN | ACK, PISS, ISS + 1, mss=1000, sack_permitted=True, timestamp=(1, 0))
    assert pb.sock.state is TcpState.ESTABLISHED and pb.sock._ts_ok
    pb.out()
    segs = send_segments(pb, 10, 0.1)  # (988 bytes each beside the timestamp option)
    end = segs[-1].seq + len(segs[-1].payload)
    pb.at(0.2)
    # three segments SACKed above the first: it is lost (the echo: our TSval at 0.1)
    pb.send(ACK, PISS + 1, ISS + 1, sack_blocks=((segs[1].seq, segs[4].seq),), timestamp=(2, 100))
    (rx,) = pb.out()
    assert rx.seq == segs[0].seq and rx.timestamp is not None and rx.timestamp[0] == 200
    # 40 ms later the original arrives after all (it was only late): the cumulative ACK
    # echoes a tick as new as the retransmission's
    pb.at(0.24)
    pb.send(ACK, PISS + 1, segs[4].seq, timestamp=(3, 200))
    # segments 5-10 (sent at 0.1) are not lost: only the rest of the data goes
    assert all(s.seq >= end for s in pb.out())
    assert pb.sock._rack is not None and pb.sock._rack.rtt == pytest.approx(RTT)
    assert pb.sock.stats.retransmits == 1


def recovery_with_new_data(at: float) -> tuple[Pb, list, list]:
    """10 segments sent at 0.1 and 10 kB more queued; at 0.2 the first is lost (three
    SACKed above it: its fast retransmission starts an episode whose recovery point is
    10_001), and at ``at`` the other six are SACKed one by one, so that PRR sends new data.
    Returns the playbook, the 10 segments and the new ones."""
    pb = est()
    segs = send_segments(pb, 10, 0.1)
    pb.sock.send(bytes(10_000))  # queued: PRR sends some of it during recovery
    pb.at(0.2)
    for k in (2, 3, 4):
        sack(pb, 1, (1001, k * 1000 + 1))
    assert pb.out() == [segs[0]]
    assert pb.sock._recover == ISS + 10_001
    pb.at(at)
    new = []
    for k in range(5, 11):
        sack(pb, 1, (1001, k * 1000 + 1))
        new += pb.out()
    return pb, segs, new


def test_rack_detects_a_lost_retransmission() -> None:
    pb, segs, newer = recovery_with_new_data(0.2)
    assert newer and all(s.seq > segs[-1].seq for s in newer)  # new data, sent after rx
    # the retransmission (sent at 0.2) is lost too: segments sent after it are SACKed
    pb.at(0.3)
    sack(pb, 1, (1001, 10_001 + 1000 * len(newer)))
    got = pb.out()
    assert got[0] == segs[0]  # sent a third time, without waiting for the RTO
    assert pb.sock.stats.lost_retransmits == 1 and pb.sock.stats.rto_expired == 0


def test_every_segment_of_a_lost_retransmission_burst_is_sent_again() -> None:
    """Retransmissions sent at one clock reading are one entry in RACK's log; when that
    burst is lost again (bursty loss), the whole entry is deemed lost. Sending its first
    segment again must not forget the others: they follow at once, before new data, instead
    of an RTO (the bench_path bursty-loss upload stalled 200 ms this way several times per
    transfer)."""
    pb = est()
    segs = send_segments(pb, 10, 0.1)
    pb.sock.send(bytes(20_000))  # queued: new data goes out during recovery
    pb.at(0.2)
    sack(pb, 1, (3001, 10_001))  # the first three lost, seven delivered: lost at once
    rx = pb.out()
    assert [s.seq for s in rx[:3]] == [s.seq for s in segs[:3]]  # one burst, one clock reading
    sent = list(rx[3:])
    # The burst is lost again; everything sent after it is delivered and SACKed, ACK by ACK.
    for k in range(1, 20):
        pb.at(0.2 + k * 0.002)
        top = max([10_001] + [s.seq - ISS + len(s.payload) for s in sent if s.seq > ISS + 10_000])
        sack(pb, 1, (3001, top))
        sent += pb.out()
    again = [s.seq - ISS for s in sent if s.seq - ISS < 3001]
    assert again[:3] == [1, 1001, 2001], again  # all three, one after the other
    first_new_after = [
        s.seq - ISS for s in sent[sent.index(next(s for s in sent if s.seq - ISS == 1)) :]
    ]
    assert first_new_after[:3] == [1, 1001, 2001], first_new_after[:6]
    assert pb.sock.stats.rto_expired == 0


def test_a_new_episode_does_not_resend_a_hole_whose_retransmission_is_in_flight() -> None:
    """An episode ends when SND.UNA passes its recovery point, which can leave a hole above
    that point it already sent again. RACK's verdict on that hole's original then starts a
    new episode at once (a new congestion event, as Linux's); its fast retransmit must not
    send the hole a third time while the retransmission is in flight (Linux skips what
    carries SACKED_RETRANS): on the lab's lossy uploads each such copy came back as a
    D-SACK, 232 of 243 per transfer. Only RACK's verdict on the retransmission itself
    (step 5) sends it again."""
    pb, _segs, new = recovery_with_new_data(0.21)  # episode 1: recovery point 10_001
    assert [s.seq - ISS for s in new] == [10_001, 11_001, 12_001, 13_001]  # PRR: new data
    # The retransmission of 1 is lost, and so is 10_001, above the recovery point: the
    # segments sent after both are SACKed. Both go again in episode 1, 1 first.
    pb.at(0.31)
    sack(pb, 1, (11_001, 14_001), (1001, 10_001))
    again = [s.seq - ISS for s in pb.out()]
    assert again[:2] == [1, 10_001], again
    st = pb.sock.stats
    assert (st.fast_retransmits, st.lost_retransmits) == (1, 1)
    rtx = st.retransmits
    # 1 arrives: SND.UNA passes the recovery point and episode 1 ends, and RACK's verdict
    # on 10_001's original starts episode 2 at once: 10_001 was sent again at 0.31 and
    # nothing sent after that is delivered yet: it is in flight, not sent a third time.
    pb.at(0.41)
    sack(pb, 10_001, (11_001, 14_001))
    assert pb.sock._in_fr and st.fast_retransmits == 2
    assert [s.seq - ISS for s in pb.out() if s.seq - ISS == 10_001] == []
    assert st.retransmits == rtx
    # That retransmission is lost too: once what was sent after it is SACKed, step 5
    # deems it lost and it goes once more, without an RTO.
    pb.at(0.42)
    sack(pb, 10_001, (11_001, 17_001))
    assert [s.seq - ISS for s in pb.out()][:1] == [10_001]
    assert st.lost_retransmits == 2 and st.rto_expired == 0


# -- TLP (RFC 8985 §7) ----------------------------------------------------------------------
def test_tlp_probe_retransmits_the_last_segment_after_pto() -> None:
    pb = est()
    segs = send_segments(pb, 3, 0.1)
    rto_at = pb.sock._rto_at
    assert rto_at is not None
    t = pb.poll()
    assert t == pytest.approx(0.1 + 2 * RTT)  # PTO = 2*SRTT, before the RTO
    assert t < rto_at
    pb.at(t - 0.001).expect([])
    pb.at(t).expect([segs[2]])
    st = pb.sock.stats
    assert st.tlp_probes == 1 and st.rto_expired == 0
    # only one probe per tail: the next timer is the (restarted) RTO
    assert pb.sock._rec_at is None and pb.poll() == pytest.approx(t + pb.sock.rto)


def test_tlp_probe_sends_new_data_when_it_can() -> None:
    pb = est()
    pb.sock.send(bytes(12_000))  # initial window 10: two segments wait for cwnd
    segs = pb.at(0.1).out()
    assert len(segs) == 10
    t = pb.poll()
    assert t == pytest.approx(0.1 + 2 * RTT)
    (probe,) = pb.at(t).out()
    assert probe.seq == ISS + 10_001 and len(probe.payload) == 1000  # new data, not a resend
    assert pb.sock.stats.tlp_probes == 1 and pb.sock.stats.retransmits == 0


def test_tlp_with_one_segment_in_flight_adds_the_delayed_ack_time() -> None:
    pb = est(min_rto=1.0)
    pb.sock.send(b"x" * 1000)
    pb.at(0.1).out()
    assert pb.poll() == pytest.approx(0.1 + 2 * RTT + 0.2)  # + WCDelAckT (§7.2)


def test_tlp_recovers_a_tail_loss_without_rto() -> None:
    pb = est()
    segs = send_segments(pb, 3, 0.1)
    # segments 2 and 3 are lost: the peer ACKs the first one only
    pb.at(0.2)
    sack(pb, 1001)
    t = pb.poll()
    assert t == pytest.approx(0.2 + 2 * RTT)
    pb.at(t).expect([segs[2]])  # the probe: the last segment again
    # the probe is SACKed: RACK now knows the 2nd segment, sent before it, is lost
    pb.at(t + RTT)
    sack(pb, 1001, (2001, 3001))
    pb.expect([segs[1]])
    pb.at(t + 2 * RTT)
    sack(pb, 3001)
    st = pb.sock.stats
    assert pb.sock.snd_una == pb.sock.snd_nxt == ISS + 3001
    assert st.rto_expired == 0 and st.tlp_probes == 1 and st.fast_retransmits == 1


def test_a_tlp_probe_answered_sooner_than_min_rtt_still_counts() -> None:
    """A whole tail lost (an exit's full socket buffer): TLP resends the last segment,
    and its SACK comes back in half of min_RTT (the queue that set min_RTT drained with
    the tail). It counts: RACK deems the three before it lost and recovery resends them,
    without the RTO. (On the lab's clean 1 ms path 4 of 40 uploads of 1 MiB once paid a TLP
    and then the RTO, ~270 ms; not traced, but this is how a probe that RACK ignores ends.)"""
    pb = est(min_rto=1.0)
    assert pb.sock._rack is not None
    pb.sock._rack.min_rtt = RTT  # (as measured by earlier SACKed deliveries)
    segs = send_segments(pb, 6, 0.1)
    pb.at(0.2)
    sack(pb, 2001)  # the first two arrive; the last four are lost
    t = pb.poll()
    assert t == pytest.approx(0.2 + 2 * RTT)
    pb.at(t).expect([segs[5]])
    pb.at(t + RTT / 2)  # sooner than min_RTT
    sack(pb, 2001, (5001, 6001))
    again = [s.seq - ISS for s in pb.out()]
    assert again and again == [2001, 3001, 4001][: len(again)], again
    st = pb.sock.stats
    assert (st.tlp_probes, st.fast_retransmits, st.rto_expired) == (1, 1, 0)


def test_a_sacked_tlp_probe_counts_whatever_its_echo() -> None:
    """With timestamps. A whole tail is lost; TLP resends its last segment, which arrives
    above the hole: the ACK that SACKs it echoes the TSval of the last segment that
    arrived in order (a receiver takes TS.Recent from its left edge only, RFC 7323 §4.3),
    older than the probe's. The echo says nothing about a SACKed retransmission: RACK
    deems the segments before the probe lost. (The lab's clean 1 ms path: an upload lost
    the last 237 kB it sent; TLP's SACK came back, RACK took the echo for the original's,
    and the RTO followed 200 ms later.)"""
    pb = active(cfg(), isn=ISS)
    pb.out()
    pb.at(RTT).send(SYN | ACK, PISS, ISS + 1, mss=1000, sack_permitted=True, timestamp=(1, 0))
    assert pb.sock._ts_ok
    pb.out()
    pb.sock.send(bytes(6 * 988))  # (988: the MSS beside the timestamp option)
    segs = pb.at(0.1).out()  # TSval 100
    assert len(segs) == 6
    pb.at(0.2)
    pb.send(ACK, PISS + 1, segs[2].seq, timestamp=(2, 100))  # two arrive, four are lost
    t = pb.poll()
    assert t is not None
    (probe,) = pb.at(t).out()
    assert probe.seq == segs[5].seq and probe.timestamp is not None
    assert probe.timestamp[0] > 100
    pb.at(t + RTT)
    end = probe.seq + len(probe.payload)
    pb.send(ACK, PISS + 1, segs[2].seq, sack_blocks=((probe.seq, end),), timestamp=(3, 100))
    again = [s.seq for s in pb.out()]
    assert again and again == [s.seq for s in segs[2:5]][: len(again)], again
    st = pb.sock.stats
    assert (st.tlp_probes, st.fast_retransmits, st.rto_expired) == (1, 1, 0)


def test_tlp_repairing_the_only_loss_reduces_cwnd_once() -> None:
    pb = est()
    segs = send_segments(pb, 4, 0.1)
    pb.at(0.2)
    sack(pb, 3001)  # the last segment is lost
    cwnd = pb.sock.cwnd
    t = pb.poll()
    assert t is not None
    pb.at(t).expect([segs[3]])
    pb.at(t + RTT)
    sack(pb, 4001)  # the probe repaired it (no DSACK follows)
    pb.sock.send(b"y" * 1000)  # new data: the ACK beyond the probe ends the episode
    pb.out()
    pb.at(t + 2 * RTT)
    sack(pb, 5001)
    assert pb.sock.cwnd < cwnd and pb.sock.stats.rto_expired == 0


def test_tlp_spurious_probe_dsack_keeps_cwnd() -> None:
    pb = est()
    send_segments(pb, 4, 0.1)
    t = pb.poll()
    assert t is not None
    pb.at(t).out()  # probe (all ACKs were just slow)
    cwnd = pb.sock.cwnd
    pb.at(t + 0.01)
    sack(pb, 4001)
    sack(pb, 4001, (3001, 4001))  # DSACK for the probe: nothing was lost
    pb.sock.send(b"y" * 1000)
    pb.out()
    pb.at(t + RTT)
    sack(pb, 5001)
    assert pb.sock.cwnd >= cwnd and pb.sock.stats.dsacks == 1
    assert pb.sock._rack is not None and pb.sock._rack.tlp_end is None


# -- rule rec-probe: a probe in fast recovery ------------------------------------------------
def test_a_lost_retransmission_at_the_tail_is_probed_not_left_to_the_rto() -> None:
    """The first of ten segments is lost, the nine above it SACKed: its fast retransmission
    is the last segment sent, and it is lost too. Nothing sent after it can be delivered,
    so RACK cannot deem it lost; TLP waits out recovery (RFC 8985 §7.2, as Linux's). A PTO
    after the ACK that delivered the SACKs, it goes again (rule rec-probe), long before the
    RTO."""
    pb = est(min_rto=1.0)
    segs = send_segments(pb, 10, 0.1)
    pb.at(0.2)
    sack(pb, 1, (1001, 10_001))  # nine SACKed: the first is lost at once
    assert pb.out() == [segs[0]]
    st = pb.sock.stats
    assert pb.sock._in_fr and st.fast_retransmits == 1
    assert pb.poll() == pytest.approx(0.2 + 2 * RTT)  # the probe's PTO, not the RTO (1.2)
    pb.at(0.2 + 2 * RTT - 0.001).expect([])
    pb.at(0.2 + 2 * RTT).expect([segs[0]])
    assert (st.recovery_probes, st.tlp_probes, st.rto_expired) == (1, 0, 0)
    # one probe per silence: the next timer is the RTO, restarted by the probe
    assert pb.poll() == pytest.approx(0.2 + 2 * RTT + pb.sock.rto)
    pb.at(0.2 + 3 * RTT)
    sack(pb, 10_001)
    assert pb.sock.snd_una == pb.sock.snd_nxt == ISS + 10_001 and not pb.sock._in_fr
    assert st.rto_expired == 0


@pytest.mark.parametrize("answered", [RTT + 0.001, RTT / 2], ids=["after-rtt", "sooner"])
def test_a_recovery_probe_after_a_lost_flight_lets_rack_resend_the_rest(
    answered: float,
) -> None:
    """In recovery, everything sent after its start is lost (an exit's socket buffer full
    for a moment: the lab's lossy upload once waited out a 200 ms RTO this way, 300 kB in
    flight): no ACK comes. The probe is the hole at SND.UNA, not new data; its ACK repairs
    that hole, and RACK deems the new data sent before it lost: sent again at once, without
    a timeout.

    Also when the probe's ACK comes back in half of min_RTT (``sooner``: the queue that
    set min_RTT drained with the lost flight; on the lab's clean 1 ms path, where the
    exit's socket buffer drops bursts, one upload in 40 lost the last 70 kB it sent, and
    the probe came back in 2.8 ms against a min_RTT of 5.2 ms). RACK's ambiguity rule
    (sooner than min_RTT: maybe the original's ACK) would ignore it and learn nothing; the
    probe went a PTO after the last delivery, so it counts. (Ignored, the probe crawled
    through the flight one segment per PTO: 88 probes, 1.4 s.)"""
    pb = est(min_rto=1.0)
    segs = send_segments(pb, 10, 0.1)
    pb.sock.send(bytes(10_000))  # queued: recovery sends new data too
    pb.at(0.2)
    sack(pb, 1, (1001, 10_001))
    sent = pb.out()
    assert sent[0] == segs[0]
    new = [s.seq - ISS for s in sent[1:]]
    assert new and all(n >= 10_001 for n in new)  # new data behind the retransmission
    # all of it is lost: nothing more arrives
    pb.at(0.2 + 2 * RTT)
    probe = pb.out()
    assert probe == [segs[0]], [s.seq - ISS for s in probe]
    st = pb.sock.stats
    assert st.recovery_probes == 1
    # the probe is delivered: the hole repaired, and the new data sent before the probe is
    # deemed lost and goes again
    pb.at(0.2 + 2 * RTT + answered)
    sack(pb, 10_001)
    again = [s.seq - ISS for s in pb.out()]
    assert again and again == new[: len(again)], (new, again)  # (as many as PRR lets go)
    # a new episode, no timeout
    assert (st.recovery_probes, st.fast_retransmits, st.rto_expired) == (1, 2, 0)


def test_one_recovery_probe_per_episode() -> None:
    """The first segment and the last five of ten are lost, and the first one's fast
    retransmission too. The probe repairs the first hole; its ACK lets RACK deem the last
    five lost (sent before the probe) in the same episode, and they go again. When those
    are lost as well, the silence after is the RTO's: one probe per episode (probing on
    would crawl, a segment per PTO, where RACK could not use a probe's delivery)."""
    pb = est(min_rto=1.0)
    segs = send_segments(pb, 10, 0.1)
    pb.at(0.2)
    sack(pb, 1, (1001, 5001))  # the first lost (three SACKed above it); 6-10 not yet
    assert pb.out() == [segs[0]]
    assert pb.sock._recover == ISS + 10_001
    pb.at(0.2 + 2 * RTT).expect([segs[0]])  # the probe
    pb.at(0.2 + 3 * RTT + 0.001)
    sack(pb, 5001)  # the probe arrived: the hole is repaired, 6-10 are still missing
    again = [s.seq - ISS for s in pb.out()]
    assert again and again == [5001, 6001, 7001, 8001, 9001][: len(again)], again
    assert pb.sock._in_fr  # (the same episode: SND.UNA is below its recovery point)
    # all of them are lost: no ACK comes, and no second probe goes
    t = pb.poll()
    assert t is not None and t > 0.2 + 3 * RTT + 2 * RTT + 0.01  # not a PTO: the RTO
    assert pb.at(t - 0.001).out() == []
    assert pb.at(t).out()[0].seq == ISS + 5001
    st = pb.sock.stats
    assert (st.recovery_probes, st.rto_expired) == (1, 1)


def test_a_recovery_the_tlp_started_is_probed_too() -> None:
    """The tail of four segments goes unanswered: TLP resends the last one; its SACK shows
    the first three lost (recovery resends them), and those are lost again. The TLP's
    probe is still outstanding (TLP.end_seq: no ACK has passed it), which must not keep
    rule rec-probe from sending the first of them again a PTO later."""
    pb = est(min_rto=1.0)
    segs = send_segments(pb, 4, 0.1)
    t = pb.poll()
    assert t == pytest.approx(0.1 + 2 * RTT)
    pb.at(t).expect([segs[3]])  # the TLP probe
    pb.at(t + RTT)
    sack(pb, 1, (3001, 4001))  # the probe is SACKed: 1-3 are lost
    again = [s.seq - ISS for s in pb.out()]
    assert again and again == [1, 1001, 2001][: len(again)]  # (as many as PRR lets go)
    assert pb.sock._in_fr and pb.sock._rack is not None and pb.sock._rack.tlp_end is not None
    assert pb.poll() == pytest.approx(t + RTT + 2 * RTT)
    pb.at(t + 3 * RTT).expect([segs[0]])
    st = pb.sock.stats
    assert (st.tlp_probes, st.recovery_probes, st.rto_expired) == (1, 1, 0)


def test_no_recovery_probe_while_acks_keep_delivering() -> None:
    """Each ACK that delivers data moves the probe later: recovery going on at the pace
    of its ACKs sends no probe."""
    pb = est(min_rto=1.0)
    send_segments(pb, 10, 0.1)
    pb.at(0.2)
    sack(pb, 1, (1001, 3001), (4001, 5001))  # 1 and 3 missing, 2 and 4 delivered
    pb.out()
    for k in range(6, 11):
        t = 0.2 + (k - 5) * 0.15  # ACKs 150 ms apart: each within the 200 ms PTO
        pb.at(t)
        sack(pb, 1, (1001, 3001), (4001, k * 1000 + 1))
        pb.out()
        assert pb.poll() == pytest.approx(t + 2 * RTT)
    assert pb.sock.stats.recovery_probes == 0


# -- PRR (RFC 6937) -------------------------------------------------------------------------
def test_prr_paces_recovery_sending_to_ssthresh() -> None:
    pb = est()
    # grow cwnd to 20 segments, then have 20 in flight and more data queued
    send_segments(pb, 10, 0.1)
    pb.at(0.2)
    for k in range(1, 11):
        sack(pb, 1000 * k + 1)
    pb.sock.send(bytes(40_000))
    segs = pb.out()
    assert len(segs) == 20 and pb.sock.cwnd == 20_000
    rack = pb.sock._rack
    assert rack is not None
    # the first of them is lost; the others are SACKed one ACK each
    pb.at(0.3)
    sent: list[int] = []
    pre = 0
    for k in range(1, 20):
        sack(pb, 10_001, (11_001, 11_001 + 1000 * k))
        got = pb.out()
        if k < 3:
            # SACKed data leaves the flight (and limited transmit): new data only
            assert all(s.seq > segs[-1].seq for s in got)
            pre += len(got)
            continue
        if k == 3:  # DupThresh SACKed: recovery; the fast retransmission goes at once
            assert got[0] == segs[0]
            ssthresh = pb.sock.ssthresh
            recover_fs = rack.recover_fs
            assert recover_fs == 20_000 + 1000 * pre
            assert ssthresh == recover_fs // 2  # FlightSize/2
            delivered0 = 3000 - 1000 * 3  # PRR counts from this ACK on
            got = got[1:]
        sent.append(sum(len(s.payload) for s in got))
        assert len(got) <= 1  # never a burst
        # RFC 6937 §3: sending follows delivery, prr_out <= ceil(delivered*ssthresh/RecoverFS)
        delivered = 1000 * (k - 2) + delivered0
        assert sum(sent) <= math.ceil(delivered * ssthresh / recover_fs)
    # about half a segment per delivered segment while pipe > ssthresh: data flowed during
    # recovery (RFC 6675 with cwnd = ssthresh sends nothing until pipe < ssthresh)
    assert sum(sent) >= 7000
    assert rack.prr_out == sum(sent) + 1000
    # the cumulative ACK ends recovery at cwnd = ssthresh
    sack(pb, 10_001 + recover_fs + sum(sent))
    assert not pb.sock._in_fr and pb.sock.cwnd == pb.sock.ssthresh == ssthresh


def test_prr_slow_starts_back_to_ssthresh_when_pipe_falls_below() -> None:
    pb = est()
    send_segments(pb, 10, 0.1)
    pb.at(0.2)
    for k in range(1, 11):
        sack(pb, 1000 * k + 1)
    pb.sock.send(bytes(40_000))
    segs = pb.out()
    assert len(segs) == 20
    # heavy loss: only segments 12..20 arrive, so pipe drops below ssthresh (10 segments)
    pb.at(0.3)
    sack(pb, 10_001, (21_001, 22_001))
    sack(pb, 10_001, (21_001, 23_001))
    sack(pb, 10_001, (21_001, 24_001))
    out = pb.out()
    assert out[0] == segs[0]
    ss = pb.sock.ssthresh
    for k in range(5, 10):
        sack(pb, 10_001, (21_001, 20_001 + 1000 * k))
        pb.out()
        # PRR-SSRB: pipe + sndcnt never exceeds ssthresh
        assert pb.sock._pipe() <= ss


# -- simulator runs: RACK-TLP/PRR vs the RFC 6675 rules --------------------------------------
SCENARIOS = {
    "random": dict(loss=0.02, duplicate=0.01, reorder=0.02, reorder_delay=0.003),
    "bursty": dict(burst_loss=0.02, burst_len=4.0),
}


def totals(rack: bool, kw: dict[str, float], seeds: range) -> dict[str, int]:
    tot = {"rto_expired": 0, "retransmits": 0, "tlp_probes": 0, "dsacks": 0}
    for seed in seeds:
        tr = run_transfer(
            seed,
            512 * 1024,
            64 * 1024,
            timeout=600.0,
            ab=LinkParams(**kw),  # type: ignore[arg-type]
            ba=LinkParams(**kw),  # type: ignore[arg-type]
            tcp_config=cfg(rack=rack, mss=1400, recv_buffer=1 << 20),
        )  # byte-exact delivery is asserted in run_transfer
        for sock in (tr.client, tr.server):
            assert sock is not None
            for name in tot:
                tot[name] += getattr(sock.stats, name)
    return tot


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_sim_rack_needs_fewer_rtos_than_rfc6675(scenario: str) -> None:
    kw = SCENARIOS[scenario]
    seeds = range(1, 9)
    old = totals(False, kw, seeds)
    new = totals(True, kw, seeds)
    assert old["tlp_probes"] == 0
    assert new["tlp_probes"] > 0, (old, new)
    assert new["rto_expired"] < old["rto_expired"], (old, new)


def test_sim_reordering_fewer_spurious_retransmissions() -> None:
    # no loss at all: every retransmission is spurious
    kw = {"reorder": 0.05, "reorder_delay": 0.004}
    seeds = range(1, 7)
    old = totals(False, kw, seeds)
    new = totals(True, kw, seeds)
    assert new["retransmits"] < old["retransmits"], (old, new)
    assert new["dsacks"] > 0
