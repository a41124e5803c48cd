"""RFC playbooks for TcpSocket: segments in -> exact segments out, on a virtual clock."""

from __future__ import annotations

import pytest

from mitm_wg.net.tcp import TcpConfig, TcpSocket, TcpState
from mitm_wg.net.tcp_wire import ACK, FIN, PSH, RST, SYN, TcpSegment
from tcp_playbook import LPORT, RPORT, Pb, active, cfg, passive, seg

ISS = 1000
PISS = 9000
M32 = 0xFFFFFFFF


def o(flags: int, seq: int, ack: int = 0, **kw: object) -> TcpSegment:
    """A segment the socket under test sends."""
    return seg(flags, seq, ack, src=LPORT, dst=RPORT, **kw)  # type: ignore[arg-type]


def est(
    *,
    peer_ts: bool = False,
    peer_sack: bool = False,
    peer_ws: int | None = None,
    peer_mss: int = 1000,
    peer_window: int = 65535,
    isn: int = ISS,
    piss: int = PISS,
    **kw: object,
) -> Pb:
    """An active-open socket, established at t=0 (SYN-ACK arrives at once)."""
    pb = active(cfg(**kw), isn=isn)
    (syn,) = pb.out()
    ts = (100, syn.timestamp[0]) if peer_ts and syn.timestamp else None
    pb.send(
        SYN | ACK,
        piss,
        isn + 1,
        window=peer_window,
        mss=peer_mss,
        wscale=peer_ws,
        sack_permitted=peer_sack,
        timestamp=ts,
    )
    assert pb.sock.state is TcpState.ESTABLISHED
    (ack,) = pb.out()
    assert ack.flags == ACK
    return pb


# -- handshake ---------------------------------------------------------------------------


def test_active_open_exact_segments_and_option_negotiation() -> None:
    pb = active(cfg())
    assert pb.sock.state is TcpState.SYN_SENT
    assert pb.poll() == 0.0
    pb.expect(
        [
            o(
                SYN,
                ISS,
                0,
                window=65535,
                mss=1000,
                wscale=0,
                sack_permitted=True,
                timestamp=(0, 0),
            )
        ]
    )
    assert pb.poll() == pytest.approx(1.0)  # initial RTO
    pb.at(0.05).send(
        SYN | ACK,
        PISS,
        ISS + 1,
        window=30000,
        mss=1200,
        wscale=3,
        sack_permitted=True,
        timestamp=(777, 0),
    )
    assert pb.sock.state is TcpState.ESTABLISHED
    pb.expect([o(ACK, ISS + 1, PISS + 1, window=65535, timestamp=(50, 777))])
    assert pb.sock.mss == 1000 - 12  # our MSS is smaller; timestamps take 12 bytes
    assert pb.sock.peer_window == 30000  # the window in a SYN is never scaled
    pb.at(0.06).send(ACK, PISS + 1, ISS + 1, window=100, timestamp=(778, 50))
    assert pb.sock.peer_window == 800
    assert pb.poll() is None


def test_passive_open_echoes_only_offered_options() -> None:
    syn = seg(SYN, PISS, 0, window=20000, mss=1400, wscale=2, sack_permitted=True)
    pb = passive(syn, isn=5000)
    assert pb.sock.state is TcpState.SYN_RECEIVED
    pb.expect([o(SYN | ACK, 5000, PISS + 1, window=65535, mss=1000, wscale=0, sack_permitted=True)])
    pb.at(0.1).send(ACK, PISS + 1, 5001, window=5000)
    assert pb.sock.state is TcpState.ESTABLISHED
    assert pb.sock.peer_window == 20000
    assert pb.sock.srtt == pytest.approx(0.1)  # Karn: the SYN-ACK was timed
    pb.expect([])


def test_passive_open_retransmits_syn_ack_on_duplicate_syn() -> None:
    syn = seg(SYN, PISS, 0, mss=1000)
    pb = passive(syn, isn=5000)
    (synack,) = pb.out()
    pb.at(0.3).feed(syn)
    pb.expect([synack])
    assert pb.sock.stats.retransmits == 1


def test_passive_open_bad_ack_gets_rst() -> None:
    pb = passive(seg(SYN, PISS, 0), isn=5000)
    pb.out()
    pb.send(ACK, PISS + 1, 4242)
    pb.expect([o(RST, 4242, 0, window=0)])
    assert pb.sock.state is TcpState.SYN_RECEIVED


def test_syn_ack_with_bad_ack_gets_rst_in_syn_sent() -> None:
    pb = active(cfg())
    (syn,) = pb.out()
    pb.send(SYN | ACK, PISS, 77)
    pb.expect([o(RST, 77, 0, window=0), syn])  # and the SYN again (tests/test_tcp_time_wait.py)
    assert pb.sock.state is TcpState.SYN_SENT


@pytest.mark.parametrize("shift", [3, None])
def test_window_scale_negotiation(shift: int | None) -> None:
    pb = active(cfg(recv_buffer=1 << 20))
    (syn,) = pb.out()
    assert syn.wscale == 5  # (1 << 20) >> 5 fits 16 bits
    pb.send(SYN | ACK, PISS, ISS + 1, window=1000, mss=1000, wscale=shift)
    (ack,) = pb.out()
    if shift is None:  # only we offered: no scaling in either direction
        assert ack.window == 65535
        pb.send(ACK, PISS + 1, ISS + 1, window=1000)
        assert pb.sock.peer_window == 1000
    else:
        assert ack.window == (1 << 20) >> 5
        pb.send(ACK, PISS + 1, ISS + 1, window=1000)
        assert pb.sock.peer_window == 8000


def test_passive_no_wscale_when_peer_does_not_offer() -> None:
    pb = passive(seg(SYN, PISS, 0, mss=1000), cfg(recv_buffer=1 << 20), isn=5000)
    (synack,) = pb.out()
    assert synack.wscale is None and not synack.sack_permitted and synack.timestamp is None
    pb.send(ACK, PISS + 1, 5001, window=1000)
    pb.sock.send(b"x" * 5000)
    assert [len(s.payload) for s in pb.out()] == [1000]  # peer window not scaled


def test_mss_clamped_to_peer() -> None:
    pb = est(peer_mss=536)
    pb.sock.send(b"a" * 2000)
    got = pb.out()
    assert [len(s.payload) for s in got] == [536, 536, 536, 392]
    assert [s.flags for s in got] == [ACK, ACK, ACK, ACK | PSH]


def test_simultaneous_open() -> None:
    pb = active(cfg(), isn=ISS)
    pb.out()
    pb.at(0.01).send(SYN, PISS, 0, window=8000, mss=900)
    assert pb.sock.state is TcpState.SYN_RECEIVED
    pb.expect([o(SYN | ACK, ISS, PISS + 1, window=65535, mss=1000)])
    pb.at(0.02).send(SYN | ACK, PISS, ISS + 1, window=8000, mss=900)
    assert pb.sock.state is TcpState.ESTABLISHED
    pb.expect([o(ACK, ISS + 1, PISS + 1, window=65535)])
    pb.sock.send(b"z" * 2000)
    assert [len(s.payload) for s in pb.out()] == [900, 900, 200]


def test_simultaneous_open_plain_ack_completes() -> None:
    pb = active(cfg(), isn=ISS)
    pb.out()
    pb.send(SYN, PISS, 0, mss=900)
    pb.out()
    pb.send(ACK, PISS + 1, ISS + 1)
    assert pb.sock.state is TcpState.ESTABLISHED
    pb.expect([])


def test_syn_retries_give_up_with_timeout() -> None:
    pb = active(cfg(syn_retries=2, timestamps=False))
    (syn,) = pb.out()
    assert pb.poll() == pytest.approx(1.0)
    pb.at(1.0).expect([syn])
    assert pb.poll() == pytest.approx(3.0)
    pb.at(3.0).expect([syn])
    assert pb.poll() == pytest.approx(7.0)
    pb.at(7.0).expect([])
    assert pb.sock.state is TcpState.CLOSED
    assert isinstance(pb.sock.error, TimeoutError)
    assert pb.sock.is_closed and pb.poll() is None


def test_rst_in_syn_sent_refuses() -> None:
    pb = active(cfg())
    pb.out()
    pb.send(RST, 0, 0)  # no ACK: ignored
    pb.send(RST | ACK, 0, ISS + 7)  # unacceptable ACK: ignored
    assert pb.sock.state is TcpState.SYN_SENT
    pb.expect([])
    pb.send(RST | ACK, 0, ISS + 1)
    assert pb.sock.state is TcpState.CLOSED
    assert isinstance(pb.sock.error, ConnectionRefusedError)
    assert pb.sock.is_closed


def test_icmp_unreachable_is_hard_in_syn_sent_soft_later() -> None:
    pb = active(cfg())
    pb.out()
    pb.sock.on_icmp_unreachable(ConnectionRefusedError(111, "refused"), 0.1)
    assert pb.sock.state is TcpState.CLOSED
    assert isinstance(pb.sock.error, ConnectionRefusedError)

    pb = est(user_timeout=3.0)
    err = OSError(113, "No route to host")
    pb.sock.on_icmp_unreachable(err, 0.0)
    assert pb.sock.state is TcpState.ESTABLISHED
    pb.sock.send(b"x")
    pb.out()
    while pb.sock.state is not TcpState.CLOSED:
        t = pb.poll()
        assert t is not None
        pb.at(t).out()
    assert pb.sock.error is err


# -- data, ACK policy ---------------------------------------------------------------------


def test_send_unsent_counts_what_never_left() -> None:
    """``send_unsent``: queued and never sent (the runtime wakes a writer early when it
    runs low), apart from ``send_queued`` (not yet acknowledged)."""
    pb = est()
    assert pb.sock.send(b"x" * 30_000) == 30_000
    assert pb.sock.send_unsent == 30_000
    out = pb.out()
    sent = sum(len(s.payload) for s in out)
    assert 0 < sent < 30_000  # (the initial congestion window)
    assert pb.sock.send_unsent == 30_000 - sent and pb.sock.send_queued == 30_000
    pb.at(0.1).send(ACK, PISS + 1, ISS + 1 + sent)
    assert pb.sock.send_queued == 30_000 - sent
    more = sum(len(s.payload) for s in pb.out())
    assert more > 0 and pb.sock.send_unsent == 30_000 - sent - more


def test_send_data_segments() -> None:
    pb = est()
    assert pb.sock.send(b"x" * 2500) == 2500
    assert pb.poll() == 0.0
    pb.expect(
        [
            o(ACK, ISS + 1, PISS + 1, window=65535, payload=b"x" * 1000),
            o(ACK, ISS + 1001, PISS + 1, window=65535, payload=b"x" * 1000),
            o(ACK | PSH, ISS + 2001, PISS + 1, window=65535, payload=b"x" * 500),
        ]
    )
    pb.at(0.1).send(ACK, PISS + 1, ISS + 2501)
    assert pb.sock.send_queued == 0
    # the one timer left: an answer is due (TcpConfig.rx_stall), none comes: the peer is
    # asked how far it has sent
    assert pb.poll() == pytest.approx(1.1)
    pb.at(1.1).expect([o(ACK, ISS + 2500, PISS + 1, window=65535)])
    assert pb.sock.stats.rx_stalls == 1
    # nothing comes: asked again after 2, 4, 8 and 16 s (the question or its answer may be
    # lost), not reported again; then nothing more is due
    for at in (3.1, 7.1, 15.1, 31.1):
        assert pb.poll() == pytest.approx(at)
        pb.at(at).expect([o(ACK, ISS + 2500, PISS + 1, window=65535)])
    assert pb.sock.stats.rx_stalls == 1 and pb.sock.stats.stall_probes == 5
    assert pb.poll() is None


def test_delayed_ack_timing() -> None:
    pb = est()
    pb.at(1.0).send(ACK, PISS + 1, ISS + 1, payload=b"a" * 100)
    pb.expect([])
    assert pb.poll() == pytest.approx(1.04)
    pb.at(1.03).expect([])
    pb.at(1.04).expect([o(ACK, ISS + 1, PISS + 101, window=65435)])
    assert pb.sock.recv(1000) == b"a" * 100
    pb.expect([])  # the window is still wide open: no window update


def test_short_pushed_segment_is_acked_at_once() -> None:
    # A Nagle sender (e.g. an HTTP server writing headers, then the body) waits for this
    # ACK before sending more: delaying it would stall every exchange by the ACK delay.
    pb = est()
    pb.at(1.0).send(ACK | PSH, PISS + 1, ISS + 1, payload=b"h" * 100)
    pb.expect([o(ACK, ISS + 1, PISS + 101, window=65435)])
    # A full-sized pushed segment is still ACKed by the usual rule (delay, or every second).
    pb.send(ACK | PSH, PISS + 101, ISS + 1, payload=b"f" * 1000)
    pb.expect([])


def test_ack_every_second_full_segment() -> None:
    pb = est()
    pb.at(1.0).send(ACK, PISS + 1, ISS + 1, payload=b"a" * 1000)
    pb.expect([])
    pb.send(ACK, PISS + 1001, ISS + 1, payload=b"b" * 1000)
    pb.expect([o(ACK, ISS + 1, PISS + 2001, window=63535)])
    assert pb.poll() is None


def test_delayed_ack_piggybacks_on_data() -> None:
    pb = est()
    pb.at(1.0).send(ACK, PISS + 1, ISS + 1, payload=b"q" * 10)
    pb.sock.send(b"r" * 5)
    pb.expect([o(ACK | PSH, ISS + 1, PISS + 11, window=65525, payload=b"r" * 5)])
    assert pb.poll() == pytest.approx(1.0 + pb.sock.rto)  # only the RTO remains


def test_out_of_order_sack_blocks_and_gap_fill() -> None:
    pb = est(peer_sack=True)
    pb.at(1.0).send(ACK, PISS + 1001, ISS + 1, payload=b"B" * 1000)
    pb.expect([o(ACK, ISS + 1, PISS + 1, window=65535, sack_blocks=((PISS + 1001, PISS + 2001),))])
    pb.send(ACK, PISS + 3001, ISS + 1, payload=b"D" * 1000)
    pb.expect(
        [
            o(
                ACK,
                ISS + 1,
                PISS + 1,
                window=65535,
                sack_blocks=((PISS + 3001, PISS + 4001), (PISS + 1001, PISS + 2001)),
            )
        ]
    )
    pb.send(ACK, PISS + 1, ISS + 1, payload=b"A" * 1000)  # fills the first gap: ACK at once
    pb.expect(
        [o(ACK, ISS + 1, PISS + 2001, window=63535, sack_blocks=((PISS + 3001, PISS + 4001),))]
    )
    pb.send(ACK, PISS + 2001, ISS + 1, payload=b"C" * 1000)
    pb.expect([o(ACK, ISS + 1, PISS + 4001, window=61535)])
    assert pb.sock.recv(10000) == b"A" * 1000 + b"B" * 1000 + b"C" * 1000 + b"D" * 1000
    assert pb.sock.stats.out_of_order == 2


def test_each_out_of_order_segment_gets_its_own_dup_ack() -> None:
    pb = est()
    for i in range(3):
        pb.send(ACK, PISS + 1001 + 1000 * i, ISS + 1, payload=b"x" * 1000)
    dup = o(ACK, ISS + 1, PISS + 1, window=65535)
    pb.expect([dup, dup, dup])


def test_every_sack_block_is_reported_when_a_batch_changes_more_than_fit() -> None:
    """Rule sack-flush: segments that arrive together (one batch, one dispatch) each get the
    ACK the one before them was owed, with the SACK blocks of that moment, whenever the
    next would change another block than the first; only extending the first block waits.
    One ACK at the end would hold four blocks (no timestamps) of the five, and the oldest
    range, reported in no ACK, would look lost to the sender."""
    pb = est(peer_sack=True)
    pb.at(1.0)
    for k in range(5):  # five ranges behind five holes, in one batch
        pb.send(ACK, PISS + 1001 + 2000 * k, ISS + 1, payload=b"x" * 1000)
    pb.send(ACK, PISS + 9001 + 1000, ISS + 1, payload=b"x" * 1000)  # extends the first block
    ranges = [(PISS + 1001 + 2000 * k, PISS + 2001 + 2000 * k) for k in range(5)]
    acks = [
        o(ACK, ISS + 1, PISS + 1, window=65535, sack_blocks=tuple(reversed(ranges[: k + 1]))[:4])
        for k in range(4)
    ]
    last = ((PISS + 9001, PISS + 11001), *reversed(ranges[1:4]))
    pb.expect([*acks, o(ACK, ISS + 1, PISS + 1, window=65535, sack_blocks=last)])


def test_out_of_window_and_duplicate_segments_are_acked_not_stored() -> None:
    pb = est()
    pb.at(1.0).send(ACK, PISS + 1 + 70000, ISS + 1, payload=b"x" * 100)
    pb.expect([o(ACK, ISS + 1, PISS + 1, window=65535)])
    pb.send(ACK, PISS + 1, ISS + 1, payload=b"y" * 100)
    pb.send(ACK, PISS + 1, ISS + 1, payload=b"y" * 100)  # duplicate: ACK at once
    pb.expect([o(ACK, ISS + 1, PISS + 101, window=65435)])
    pb.send(ACK, PISS + 51, ISS + 1, payload=b"y" * 50 + b"z" * 50)  # overlap: new part kept
    pb.expect([o(ACK, ISS + 1, PISS + 151, window=65385)])
    assert pb.sock.recv(1000) == b"y" * 100 + b"z" * 50
    assert pb.sock.stats.dropped == 2


def test_duplicate_data_is_reported_once_as_a_dsack_block() -> None:
    """RFC 2883 §4: a copy of data already received (below RCV.NXT, or held out of order)
    is reported in the first SACK block of the next ACK, once; a copy out of order is
    followed by the block that holds it."""
    pb = est(peer_sack=True)
    pb.at(1.0).send(ACK, PISS + 1, ISS + 1, payload=b"a" * 1000)
    pb.send(ACK, PISS + 1, ISS + 1, payload=b"a" * 1000)  # a copy: ACK at once, with D-SACK
    pb.expect([o(ACK, ISS + 1, PISS + 1001, window=64535, sack_blocks=((PISS + 1, PISS + 1001),))])
    # partly old: only the old part is reported, the new part is kept
    pb.send(ACK, PISS + 501, ISS + 1, payload=b"a" * 500 + b"b" * 500)
    pb.expect(
        [o(ACK, ISS + 1, PISS + 1501, window=64035, sack_blocks=((PISS + 501, PISS + 1001),))]
    )
    pb.send(ACK, PISS + 1501, ISS + 1, payload=b"c" * 1000)
    pb.expect([])  # a delayed ACK: nothing to report any more
    pb.at(2.0).expect([o(ACK, ISS + 1, PISS + 2501, window=63035)])
    # out of order: the copy first, then the (grown) block holding it
    pb.send(ACK, PISS + 3501, ISS + 1, payload=b"e" * 1000)
    pb.expect(
        [o(ACK, ISS + 1, PISS + 2501, window=63035, sack_blocks=((PISS + 3501, PISS + 4501),))]
    )
    pb.send(ACK, PISS + 3001, ISS + 1, payload=b"d" * 500 + b"e" * 500)
    blocks = ((PISS + 3501, PISS + 4001), (PISS + 3001, PISS + 4501))
    pb.expect([o(ACK, ISS + 1, PISS + 2501, window=63035, sack_blocks=blocks)])
    # two copies before the next ACK: one block when they adjoin, else the first one
    pb.send(ACK, PISS + 1, ISS + 1, payload=b"a" * 1000)
    pb.send(ACK, PISS + 1001, ISS + 1, payload=b"b" * 500)
    pb.send(ACK, PISS + 201, ISS + 1, payload=b"a" * 100)
    blocks = ((PISS + 1, PISS + 1501), (PISS + 3001, PISS + 4501))
    pb.expect([o(ACK, ISS + 1, PISS + 2501, window=63035, sack_blocks=blocks)])
    # a copy of held out-of-order data after them: the ACK owed for those goes first
    # (rule sack-flush), so this copy gets an ACK of its own
    pb.send(ACK, PISS + 1, ISS + 1, payload=b"a" * 1000)
    pb.send(ACK, PISS + 3001, ISS + 1, payload=b"d" * 500)
    blocks = ((PISS + 1, PISS + 1001), (PISS + 3001, PISS + 4501))
    blocks2 = ((PISS + 3001, PISS + 3501), (PISS + 3001, PISS + 4501))
    pb.expect(
        [
            o(ACK, ISS + 1, PISS + 2501, window=63035, sack_blocks=blocks),
            o(ACK, ISS + 1, PISS + 2501, window=63035, sack_blocks=blocks2),
        ]
    )
    assert pb.sock.stats.dsacks_out == 6
    pb.send(ACK, PISS + 2501, ISS + 1, payload=b"d" * 500)  # fills the gap: no copy
    pb.expect([o(ACK, ISS + 1, PISS + 4501, window=61035)])
    assert pb.sock.recv(10000) == b"a" * 1000 + b"b" * 500 + b"c" * 1000 + b"d" * 1000 + b"e" * 1000


def test_dsack_with_a_zero_window_reports_only_the_old_part() -> None:
    pb = est(peer_sack=True, recv_buffer=1000)
    pb.at(1.0).send(ACK, PISS + 1, ISS + 1, payload=b"a" * 1000)
    pb.at(1.1).expect([o(ACK, ISS + 1, PISS + 1001, window=0)])  # (delayed)
    # half old, half beyond the closed window: unacceptable, the old half is reported
    pb.send(ACK, PISS + 501, ISS + 1, payload=b"a" * 500 + b"b" * 500)
    pb.expect([o(ACK, ISS + 1, PISS + 1001, window=0, sack_blocks=((PISS + 501, PISS + 1001),))])


def test_a_dsack_block_takes_its_room_from_a_data_segment() -> None:
    pb = est(peer_sack=True)
    pb.at(1.0).send(ACK, PISS + 1, ISS + 1, payload=b"a" * 1000)
    pb.send(ACK, PISS + 1, ISS + 1, payload=b"a" * 1000)
    pb.sock.send(b"x" * 2000)
    first, second, third = pb.out()
    # 1000-byte MSS: 12 bytes of SACK option (NOP NOP, kind, length, one block)
    assert first.sack_blocks == ((PISS + 1, PISS + 1001),) and len(first.payload) == 988
    assert second.sack_blocks == () and len(second.payload) == 1000
    assert third.sack_blocks == () and len(third.payload) == 12


def test_no_dsack_without_sack() -> None:
    pb = est()
    pb.at(1.0).send(ACK, PISS + 1, ISS + 1, payload=b"a" * 1000)
    pb.send(ACK, PISS + 1, ISS + 1, payload=b"a" * 1000)
    pb.send(ACK, PISS + 2001, ISS + 1, payload=b"c" * 1000)
    pb.send(ACK, PISS + 2001, ISS + 1, payload=b"c" * 1000)
    pb.expect([o(ACK, ISS + 1, PISS + 1001, window=64535)] * 3)  # one per out-of-order copy
    assert pb.sock.stats.dsacks_out == 0


def test_segment_beyond_window_is_trimmed() -> None:
    pb = est(recv_buffer=1500)
    pb.send(ACK, PISS + 1, ISS + 1, payload=b"a" * 1000)
    pb.send(ACK, PISS + 1001, ISS + 1, payload=b"b" * 1000)  # only 500 fit
    pb.expect([o(ACK, ISS + 1, PISS + 1501, window=0)])
    assert pb.sock.recv_available == 1500


def test_window_update_when_application_reads() -> None:
    pb = est(recv_buffer=4000)
    for i in range(4):
        pb.send(ACK, PISS + 1 + 1000 * i, ISS + 1, payload=b"w" * 1000)
    got = pb.out()
    assert got[-1] == o(ACK, ISS + 1, PISS + 4001, window=0)
    assert pb.sock.recv(500) == b"w" * 500
    pb.expect([])  # 500 bytes is not worth a window update (SWS avoidance, MSS 1000)
    pb.sock.recv(600)
    assert pb.poll() == 0.0
    pb.expect([o(ACK, ISS + 1, PISS + 4001, window=1100)])
    # the right edge never moves left, even with a smaller buffer-derived window
    pb.send(ACK, PISS + 4001, ISS + 1, payload=b"v" * 1100)
    pb.expect([])
    assert pb.poll() == pytest.approx(0.04)


def test_nagle_holds_small_segments_while_data_unacked() -> None:
    pb = est(nagle=True)
    pb.sock.send(b"a" * 10)
    pb.expect([o(ACK | PSH, ISS + 1, PISS + 1, window=65535, payload=b"a" * 10)])
    pb.sock.send(b"b" * 10)
    pb.expect([])
    pb.at(0.05).send(ACK, PISS + 1, ISS + 11)
    pb.expect([o(ACK | PSH, ISS + 11, PISS + 1, window=65535, payload=b"b" * 10)])


def test_nagle_off_sends_small_segments_at_once() -> None:
    pb = est()
    pb.sock.send(b"a" * 10)
    pb.out()
    pb.sock.send(b"b" * 10)
    pb.expect([o(ACK | PSH, ISS + 11, PISS + 1, window=65535, payload=b"b" * 10)])


def test_send_buffer_is_bounded() -> None:
    pb = est(send_buffer=3000)
    assert pb.sock.send(b"x" * 5000) == 3000
    assert pb.sock.send(b"y") == 0
    assert not pb.sock.can_send
    pb.out()
    pb.send(ACK, PISS + 1, ISS + 1001)
    assert pb.sock.send_space == 1000
    assert pb.sock.send(b"y" * 5000) == 1000


# -- timestamps ---------------------------------------------------------------------------


def test_timestamps_rtt_and_paws() -> None:
    pb = est(peer_ts=True)
    pb.sock.send(b"d" * 100)
    (d,) = pb.out()
    assert d.timestamp == (0, 100)
    assert pb.sock.srtt == 0.0  # Karn sample of the handshake (its TSecr was 0)
    pb.at(0.25).send(ACK, PISS + 1, ISS + 101, timestamp=(200, 0))  # TSecr 0: no sample
    assert pb.sock.srtt == 0.0
    pb.sock.send(b"e" * 100)
    (e,) = pb.out()
    assert e.timestamp == (250, 200)
    pb.at(0.4).send(ACK, PISS + 1, ISS + 201, timestamp=(300, 250), payload=b"1" * 10)
    assert pb.sock.srtt == pytest.approx(0.15 / 8)  # RFC 6298: 7/8 * 0 + 1/8 * 0.15
    # a TSval two ticks older: PAWS drops the segment and ACKs
    pb.at(0.5).send(ACK, PISS + 11, ISS + 201, timestamp=(298, 250), payload=b"2" * 10)
    pb.expect([o(ACK, ISS + 201, PISS + 11, window=65525, timestamp=(500, 300))])
    assert pb.sock.stats.paws_rejected == 1
    assert pb.sock.recv(100) == b"1" * 10
    # one tick older (overtaken across a tick of the sender's clock): accepted, as Linux's
    # PAWS window does, and TS.Recent stays at the newer 300 (the ACK echoes it)
    pb.at(0.55).send(ACK, PISS + 11, ISS + 201, timestamp=(299, 250), payload=b"2" * 10)
    assert pb.sock.stats.paws_rejected == 1
    assert pb.sock.recv(100) == b"2" * 10
    pb.at(0.6).send(ACK, PISS + 21, ISS + 201, timestamp=(300, 250), payload=b"3" * 10)
    acks = [seg for seg in pb.out() if seg.flags & ACK]
    assert acks and acks[-1].timestamp == (600, 300) and acks[-1].ack == PISS + 31
    # RST is exempt from PAWS
    pb.send(RST, PISS + 31, 0, timestamp=(1, 0))
    assert pb.sock.state is TcpState.CLOSED


@pytest.mark.parametrize("timestamps", [True, False])
def test_a_pause_is_no_round_trip_and_due_timers_start_over(timestamps: bool) -> None:
    """TcpSocket.pause_ended: the socket was not run for a minute (a suspend, a stopped
    process) while its data was in flight; the ACK read after it waited in a buffer. It
    gives no RTT sample (its echo, or without timestamps the timed segment, is from before
    the pause), the probe timer that came due meanwhile fires a PTO later, not at once, and
    what is sent after the pause is measured again."""
    pb = est(peer_ts=timestamps, peer_sack=True)
    ts = (lambda val, ecr: {"timestamp": (val, ecr)}) if timestamps else (lambda val, ecr: {})
    pb.at(0.1).sock.send(b"d" * 100)
    assert [x.seq for x in pb.out()] == [ISS + 1]
    pb.at(0.15).send(ACK, PISS + 1, ISS + 101, **ts(150, 100))
    srtt = pb.sock.srtt
    assert srtt is not None and 0 < srtt < 0.05
    pb.at(0.2).sock.send(b"e" * 100)
    assert [x.seq for x in pb.out()] == [ISS + 101]
    due = pb.poll()
    assert due is not None and due < 1.0  # the probe timer
    assert pb.sock.pause_ended(60.2)
    later = pb.poll()
    assert later is not None and later > 60.2
    pb.at(60.2).expect([])  # no probe before what waited is read
    pb.at(60.21).send(ACK, PISS + 1, ISS + 201, **ts(60210, 200))
    assert pb.sock.srtt == srtt  # (it would be 7.5 s: 7/8 * srtt + 60.01 / 8)
    pb.at(60.3).sock.send(b"f" * 100)
    assert [x.seq for x in pb.out()] == [ISS + 201]
    pb.at(60.35).send(ACK, PISS + 1, ISS + 301, **ts(60350, 60300))
    assert pb.sock.srtt == pytest.approx(7 / 8 * srtt + 0.05 / 8)
    # a timer not yet due stays; one due at the pause's end is a probe later
    pb.at(60.4).sock.send(b"g" * 100)
    assert [x.seq for x in pb.out()] == [ISS + 301]
    due = pb.poll()
    assert due is not None and not pb.sock.pause_ended(60.4) and pb.poll() == due
    assert pb.sock.pause_ended(due)
    again = pb.poll()
    assert again is not None and again > due
    probe = o(ACK | PSH, ISS + 301, PISS + 1, payload=b"g" * 100, **ts(int(again * 1000), 60350))
    pb.at(again).expect([probe])  # (TLP: the last segment again)


@pytest.mark.parametrize("paused", [119.9, 0.0])
def test_a_pause_does_not_count_towards_the_user_timeout(paused: float) -> None:
    """Data in flight when the machine sleeps two minutes, its ACKs lost meanwhile (the
    interface was down). The timeout after the resume retransmits, the peer may well be
    alive: the user timeout (60 s) counts from the last progress without the pause
    (``paused``: the runtime's lower bound for it). Told of no pause, two minutes without
    progress fail the connection at that timeout, as before."""
    pb = est()
    pb.at(0.1).sock.send(b"d" * 100)
    assert [x.seq for x in pb.out()] == [ISS + 1]
    assert pb.sock.pause_ended(120.1, paused)  # (the RTO came due asleep: it starts over)
    rto_at = pb.poll()
    assert rto_at is not None and rto_at > 120.1
    out = pb.at(rto_at).out()
    if paused:
        assert [(x.seq, len(x.payload)) for x in out] == [(ISS + 1, 100)]
        assert pb.sock.state is TcpState.ESTABLISHED and pb.sock.stats.rto_expired == 1
    else:
        assert out == []  # (given up silently, as Linux at its user timeout)
        assert pb.sock.state is TcpState.CLOSED and isinstance(pb.sock.error, TimeoutError)


def test_ts_recent_tracks_last_ack_sent_only() -> None:
    pb = est(peer_ts=True)
    # out of order: SEG.SEQ > Last.ACK.sent, TS.Recent must not move
    pb.send(ACK, PISS + 101, ISS + 1, timestamp=(500, 0), payload=b"x" * 10)
    (ack,) = pb.out()
    assert ack.timestamp == (0, 100)
    pb.send(ACK, PISS + 1, ISS + 1, timestamp=(600, 0), payload=b"y" * 100)
    (ack,) = pb.out()
    assert ack.timestamp == (0, 600)


# -- RST / RFC 5961 -----------------------------------------------------------------------


def _to_state(name: str) -> tuple[Pb, int, int, int]:
    """A socket in ``name`` plus its (SND.NXT, RCV.NXT, advertised window).

    A FIN from the peer takes one sequence number, so the window that keeps the right edge
    in place is one smaller afterwards.
    """
    if name == "SYN_RECEIVED":
        pb = passive(seg(SYN, PISS, 0), isn=5000)
        pb.out()
        return pb, 5001, PISS + 1, 65535
    pb = est()
    if name == "ESTABLISHED":
        return pb, ISS + 1, PISS + 1, 65535
    if name in ("FIN_WAIT_1", "FIN_WAIT_2", "CLOSING", "TIME_WAIT"):
        pb.sock.shutdown_write(0.0)
        pb.expect([o(FIN | ACK, ISS + 1, PISS + 1, window=65535)])
        if name == "FIN_WAIT_1":
            return pb, ISS + 2, PISS + 1, 65535
        if name == "CLOSING":
            pb.send(FIN | ACK, PISS + 1, ISS + 1)
            pb.expect([o(ACK, ISS + 2, PISS + 2, window=65534)])
            return pb, ISS + 2, PISS + 2, 65534
        pb.send(ACK, PISS + 1, ISS + 2)
        if name == "FIN_WAIT_2":
            return pb, ISS + 2, PISS + 1, 65535
        pb.send(FIN | ACK, PISS + 1, ISS + 2)
        pb.expect([o(ACK, ISS + 2, PISS + 2, window=65534)])
        return pb, ISS + 2, PISS + 2, 65534
    pb.send(FIN | ACK, PISS + 1, ISS + 1)
    pb.expect([])  # the ACK of a FIN in ESTABLISHED waits for our FIN (delayed ACK)
    if name == "CLOSE_WAIT":
        pb.at(0.04).expect([o(ACK, ISS + 1, PISS + 2, window=65534)])
        return pb, ISS + 1, PISS + 2, 65534
    assert name == "LAST_ACK"
    pb.sock.shutdown_write(0.0)
    pb.expect([o(FIN | ACK, ISS + 1, PISS + 2, window=65534)])
    return pb, ISS + 2, PISS + 2, 65534


SYNC_STATES = [
    "SYN_RECEIVED",
    "ESTABLISHED",
    "FIN_WAIT_1",
    "FIN_WAIT_2",
    "CLOSE_WAIT",
    "CLOSING",
    "LAST_ACK",
    "TIME_WAIT",
]
RESET_ERROR = {
    "SYN_RECEIVED": ConnectionResetError,
    "ESTABLISHED": ConnectionResetError,
    "FIN_WAIT_1": ConnectionResetError,
    "FIN_WAIT_2": ConnectionResetError,
    "CLOSE_WAIT": ConnectionResetError,
    "CLOSING": None,
    "LAST_ACK": None,
    "TIME_WAIT": None,
}


@pytest.mark.parametrize("name", SYNC_STATES)
def test_states_reached(name: str) -> None:
    pb, _, _, _ = _to_state(name)
    assert pb.sock.state is TcpState[name]


@pytest.mark.parametrize("name", SYNC_STATES)
def test_rst_exact_closes(name: str) -> None:
    pb, _, rcv, _ = _to_state(name)
    pb.send(RST, rcv, 0)
    assert pb.sock.state is TcpState.CLOSED
    err = RESET_ERROR[name]
    if err is None:
        assert pb.sock.error is None
    else:
        assert isinstance(pb.sock.error, err)
    pb.expect([])
    assert pb.sock.is_closed


@pytest.mark.parametrize("name", SYNC_STATES)
def test_rst_in_window_not_exact_gets_challenge_ack(name: str) -> None:
    pb, snd, rcv, win = _to_state(name)
    pb.send(RST, rcv + 100, 0)
    assert pb.sock.state is TcpState[name]
    pb.expect([o(ACK, snd, rcv, window=win)])
    assert pb.sock.stats.challenge_acks == 1


@pytest.mark.parametrize("name", SYNC_STATES)
def test_rst_out_of_window_ignored(name: str) -> None:
    pb, _, rcv, _ = _to_state(name)
    pb.send(RST, rcv + 100000, 0)
    pb.send(RST, rcv - 1, 0)
    assert pb.sock.state is TcpState[name]
    pb.expect([])


@pytest.mark.parametrize("name", [s for s in SYNC_STATES if s != "SYN_RECEIVED"])
def test_syn_in_synchronized_state_gets_challenge_ack(name: str) -> None:
    pb, snd, rcv, win = _to_state(name)
    pb.send(SYN, rcv + 10, 0)
    assert pb.sock.state is TcpState[name]
    pb.expect([o(ACK, snd, rcv, window=win)])


def test_challenge_ack_rate_limit() -> None:
    pb = est(challenge_ack_limit=10)
    sent = 0
    for _ in range(15):
        pb.at(1.0).send(SYN, PISS + 50, 0)
        sent += len(pb.out())
    assert sent == 10
    pb.at(2.01).send(SYN, PISS + 50, 0)
    assert len(pb.out()) == 1


def test_ack_of_unsent_data_is_dropped_and_answered() -> None:
    pb = est()
    pb.send(ACK, PISS + 1, ISS + 500, payload=b"data")
    pb.expect([o(ACK, ISS + 1, PISS + 1, window=65535)])
    assert pb.sock.recv_available == 0  # the whole segment was dropped


def test_abort_sends_rst() -> None:
    pb = est()
    pb.sock.abort(0.0)
    assert pb.sock.state is TcpState.CLOSED and not pb.sock.is_closed
    pb.expect([o(RST | ACK, ISS + 1, PISS + 1, window=0)])
    assert pb.sock.is_closed and pb.sock.error is None


def test_close_with_unread_data_resets() -> None:
    pb = est()
    pb.send(ACK, PISS + 1, ISS + 1, payload=b"unread")
    pb.sock.close(0.0)
    pb.expect([o(RST | ACK, ISS + 1, PISS + 7, window=0)])
    assert pb.sock.is_closed


def test_data_after_full_close_resets() -> None:
    pb = est()
    pb.sock.close(0.0)
    pb.expect([o(FIN | ACK, ISS + 1, PISS + 1, window=65535)])
    pb.send(ACK, PISS + 1, ISS + 2, payload=b"late")
    pb.expect([o(RST | ACK, ISS + 2, PISS + 1, window=0)])
    assert pb.sock.state is TcpState.CLOSED


def test_send_after_shutdown_raises() -> None:
    pb = est()
    pb.sock.shutdown_write(0.0)
    with pytest.raises(BrokenPipeError):
        pb.sock.send(b"x")


# -- closing ------------------------------------------------------------------------------


def test_half_close_we_close_first() -> None:
    pb = est()
    pb.sock.send(b"h" * 100)
    pb.sock.shutdown_write(0.0)
    assert pb.sock.state is TcpState.FIN_WAIT_1
    pb.expect([o(ACK | PSH | FIN, ISS + 1, PISS + 1, window=65535, payload=b"h" * 100)])
    pb.at(0.1).send(ACK, PISS + 1, ISS + 102)
    assert pb.sock.state is TcpState.FIN_WAIT_2
    pb.send(ACK | PSH, PISS + 1, ISS + 102, payload=b"still talking")
    assert pb.sock.recv(100) == b"still talking"
    pb.send(FIN | ACK, PISS + 14, ISS + 102)
    assert pb.sock.state is TcpState.TIME_WAIT
    assert pb.sock.at_eof
    pb.expect([o(ACK, ISS + 102, PISS + 15, window=65521)])
    assert pb.poll() == pytest.approx(1.1)  # time_wait = 1.0
    # a retransmitted FIN in TIME_WAIT is ACKed again and restarts the timer
    pb.at(0.5).send(FIN | ACK, PISS + 14, ISS + 102)
    pb.expect([o(ACK, ISS + 102, PISS + 15, window=65521)])
    assert pb.poll() == pytest.approx(1.5)
    pb.at(1.5).expect([])
    assert pb.sock.state is TcpState.CLOSED and pb.sock.is_closed
    assert pb.sock.error is None


def test_half_close_peer_closes_first() -> None:
    pb = est()
    pb.send(ACK | FIN, PISS + 1, ISS + 1, payload=b"bye")
    assert pb.sock.state is TcpState.CLOSE_WAIT
    pb.expect([])  # a delayed ACK: our FIN (or reply) may carry it
    assert pb.poll() == pytest.approx(0.04)
    pb.at(0.04).expect([o(ACK, ISS + 1, PISS + 5, window=65531)])
    assert not pb.sock.at_eof
    assert pb.sock.recv(10) == b"bye"
    assert pb.sock.at_eof and pb.sock.can_recv
    assert pb.sock.send(b"reply") == 5
    pb.expect([o(ACK | PSH, ISS + 1, PISS + 5, window=65531, payload=b"reply")])
    pb.sock.close(0.0)
    assert pb.sock.state is TcpState.LAST_ACK
    pb.expect([o(ACK | FIN, ISS + 6, PISS + 5, window=65531)])
    pb.send(ACK, PISS + 5, ISS + 7)
    assert pb.sock.state is TcpState.CLOSED and pb.sock.is_closed and pb.sock.error is None


def test_peers_fin_is_acked_by_our_fin_when_the_application_closes_in_time() -> None:
    """A server that closes first (HTTP "Connection: close"): the ACK of its FIN rides on
    our FIN when the application closes on EOF — one segment, not two (as Linux does)."""
    pb = est()
    pb.send(ACK | PSH, PISS + 1, ISS + 1, payload=b"HTTP/1.1 200 OK\r\n\r\n")
    (ack,) = pb.out()  # a short pushed segment is ACKed at once
    assert ack.flags == ACK and ack.ack == PISS + 20
    pb.at(0.001).send(ACK | FIN, PISS + 20, ISS + 1)
    assert pb.sock.state is TcpState.CLOSE_WAIT
    pb.expect([])
    assert pb.sock.recv(100) and pb.sock.at_eof
    pb.at(0.002).sock.close(0.002)
    pb.expect([o(ACK | FIN, ISS + 1, PISS + 21, window=65515)])
    assert pb.poll() == pytest.approx(0.002 + pb.sock.rto)  # only the FIN retransmission timer
    # With delayed ACKs off, the FIN is ACKed at once as before.
    pb = est(delayed_ack=0.0)
    pb.send(ACK | FIN, PISS + 1, ISS + 1)
    pb.expect([o(ACK, ISS + 1, PISS + 2, window=65534)])


def test_reply_and_fin_in_one_batch_are_acked_by_our_fin() -> None:
    """The short pushed reply would be ACKed at once, but the FIN right behind it (before
    the stack polls) says the peer is done: our FIN carries the ACK of both."""
    pb = est()
    pb.send(ACK | PSH, PISS + 1, ISS + 1, payload=b"r" * 59)
    pb.send(ACK | FIN, PISS + 60, ISS + 1)
    pb.expect([])
    assert pb.poll() == pytest.approx(0.04)  # the delayed-ACK timer, at the latest
    pb.sock.recv(100)
    pb.sock.close(0.0)
    pb.expect([o(ACK | FIN, ISS + 1, PISS + 61, window=65475)])


def test_fin_after_gap_fill_or_two_full_segments_is_acked_at_once() -> None:
    pb = est()
    pb.send(ACK | FIN, PISS + 11, ISS + 1)  # out of order: a duplicate ACK at once
    pb.expect([o(ACK, ISS + 1, PISS + 1, window=65535)])
    pb.send(ACK, PISS + 1, ISS + 1, payload=b"x" * 10)  # fills the gap up to the FIN
    assert pb.sock.state is TcpState.CLOSE_WAIT
    pb.expect([o(ACK, ISS + 1, PISS + 12, window=65524)])  # RFC 5681 §4.2: at once
    pb = est()
    pb.send(ACK, PISS + 1, ISS + 1, payload=b"a" * 1000)
    pb.send(ACK | FIN, PISS + 1001, ISS + 1, payload=b"b" * 1000)
    pb.expect([o(ACK, ISS + 1, PISS + 2002, window=63534)])  # every second full segment


def test_simultaneous_close() -> None:
    pb = est()
    pb.sock.close(0.0)
    pb.expect([o(FIN | ACK, ISS + 1, PISS + 1, window=65535)])
    pb.send(FIN | ACK, PISS + 1, ISS + 1)
    assert pb.sock.state is TcpState.CLOSING
    pb.expect([o(ACK, ISS + 2, PISS + 2, window=65534)])
    pb.at(0.2).send(ACK, PISS + 2, ISS + 2)
    assert pb.sock.state is TcpState.TIME_WAIT
    assert pb.poll() == pytest.approx(1.2)
    pb.at(1.2).expect([])
    assert pb.sock.is_closed


def test_fin_and_ack_together_go_straight_to_time_wait() -> None:
    pb = est()
    pb.sock.close(0.0)
    pb.out()
    pb.send(FIN | ACK, PISS + 1, ISS + 2)
    assert pb.sock.state is TcpState.TIME_WAIT


def test_fin_retransmitted_until_acked() -> None:
    pb = est()
    pb.sock.close(0.0)
    (fin,) = pb.out()
    t = pb.poll()
    assert t is not None
    pb.at(t).expect([fin])


def test_out_of_order_fin_waits_for_gap() -> None:
    pb = est()
    pb.send(FIN | ACK, PISS + 11, ISS + 1, payload=b"tail")
    assert pb.sock.state is TcpState.ESTABLISHED
    pb.out()
    pb.send(ACK, PISS + 1, ISS + 1, payload=b"0123456789")
    assert pb.sock.state is TcpState.CLOSE_WAIT
    pb.expect([o(ACK, ISS + 1, PISS + 16, window=65520)])
    assert pb.sock.recv(100) == b"0123456789tail"
    assert pb.sock.at_eof


def test_time_wait_expiry_configurable() -> None:
    pb, _, _, _ = _to_state("TIME_WAIT")
    assert pb.sock.config.time_wait == 1.0
    assert pb.poll() == pytest.approx(1.0)
    pb.at(0.99).out()
    assert pb.sock.state is TcpState.TIME_WAIT
    pb.at(1.0).out()
    assert pb.sock.is_closed


# -- retransmission, persist, recovery -------------------------------------------------------


def test_rto_retransmission_and_backoff() -> None:
    pb = est()
    rto = pb.sock.rto
    assert rto == pytest.approx(0.2)  # handshake sample of 0 s -> min_rto
    pb.sock.send(b"r" * 500)
    (d,) = pb.out()
    assert pb.poll() == pytest.approx(rto)
    pb.at(rto).expect([d])
    assert pb.poll() == pytest.approx(3 * rto)
    pb.at(3 * rto).expect([d])
    assert pb.poll() == pytest.approx(7 * rto)
    assert pb.sock.stats.rto_expired == 2 and pb.sock.stats.retransmits == 2
    assert pb.sock.cwnd == 1000
    pb.at(7 * rto - 0.01).send(ACK, PISS + 1, ISS + 501)
    assert pb.poll() == pytest.approx(7 * rto - 0.01 + 1.0)  # (the rx-stall timer only)
    assert pb.sock.rto == pytest.approx(0.8)  # Karn: no sample from a retransmission


def _timeouts(pb: Pb, n: int) -> list[list[int]]:
    """Let ``n`` retransmission timeouts fire with nothing acknowledged; the payload sizes
    each one resent."""
    sizes = []
    for _ in range(n):
        at = pb.poll()
        assert at is not None
        sizes.append([len(s.payload) for s in pb.at(at).out()])
    return sizes


def test_three_timeouts_in_a_row_take_the_path_for_an_mtu_black_hole() -> None:
    """Full-sized segments that time out three times in a row, nothing acknowledged: the
    path may drop packets of our size without an ICMP error (TcpConfig.blackhole_rtos).
    The third resend fits ``blackhole_mtu`` (1200 - 40 bytes of IPv4 and TCP headers), the
    hook hears of it once, and what follows keeps that size."""
    seen: list[TcpSocket] = []
    pb = est(mss=1380, peer_mss=1460, on_blackhole=seen.append)
    pb.sock.send(b"b" * 3 * 1380)
    assert [len(s.payload) for s in pb.out()] == [1380] * 3
    assert _timeouts(pb, 3) == [[1380], [1380], [1160]]
    assert seen == [pb.sock] and pb.sock.stats.blackhole_shrinks == 1
    pb.send(ACK, PISS + 1, ISS + 1 + 1160)  # the small one got through
    assert {len(s.payload) for s in pb.out()} == {1160}
    assert _timeouts(pb, 3) == [[1160], [1160], [1160]]  # (no second shrink)
    assert seen == [pb.sock]


def test_small_segments_timing_out_are_no_black_hole() -> None:
    """Nothing larger than ``blackhole_mtu`` allows in flight (a request of 500 bytes to a
    dead peer): no shrink, however many timeouts; nor with the rule off."""
    seen: list[TcpSocket] = []
    pb = est(mss=1380, peer_mss=1460, on_blackhole=seen.append)
    pb.sock.send(b"s" * 500)
    pb.out()
    assert _timeouts(pb, 5) == [[500]] * 5
    off = est(mss=1380, peer_mss=1460, on_blackhole=seen.append, blackhole_rtos=0)
    off.sock.send(b"b" * 3 * 1380)
    off.out()
    assert _timeouts(off, 5) == [[1380]] * 5
    assert seen == [] and pb.sock.stats.blackhole_shrinks == off.sock.stats.blackhole_shrinks == 0


# -- rule rx-stall: signs of a black hole on the receiving side (TcpConfig.rx_stall) -------


def _asked(seen: list[TcpSocket], **kw: object) -> Pb:
    """A connection (full size 1380, as through a WireGuard tunnel) whose request of 300
    bytes went out at 0 and was acknowledged by a pure ACK at 0.05."""
    pb = est(mss=1380, peer_mss=1460, on_rx_stall=seen.append, **kw)
    pb.sock.send(b"q" * 300)
    pb.out()
    pb.at(0.05).send(ACK, PISS + 1, ISS + 301)
    return pb


def test_an_answer_that_never_comes_is_a_stall() -> None:
    """All our data acknowledged (a request), and nothing arrives for ``rx_stall`` seconds
    (a server's full-sized answer vanishing in a black hole, or a slow server): the hook
    hears of it once, and the peer is asked how far it has sent: a segment below its
    window (a keepalive's SEQ) draws an ACK with its SND.NXT. At our RCV.NXT (here), it
    sent nothing yet. Nothing arriving still (a second request changes nothing), the
    stall is reported again 2 s later, and the peer asked again: now it sent data that
    never came, and the hook hears of it at once. Reported again after 4, 8 and 16 s
    more (what the runtime did about it may have been lost), not asked (the sign is
    there); one stall counted, then nothing more is due."""
    seen: list[TcpSocket] = []
    pb = _asked(seen)
    assert pb.poll() == pytest.approx(1.05)
    pb.at(1.05).expect([o(ACK, ISS + 300, PISS + 1, window=65535)])
    assert seen == [pb.sock] and pb.sock.stats.rx_stalls == pb.sock.stats.stall_probes == 1
    pb.at(1.1).send(ACK, PISS + 1, ISS + 301)  # (its answer: nothing sent)
    assert not pb.sock.data_vanished
    pb.sock.send(b"q" * 300)
    pb.out()
    pb.at(1.2).send(ACK, PISS + 1, ISS + 601)
    assert seen == [pb.sock]
    assert pb.poll() == pytest.approx(3.05)
    pb.at(3.05).expect([o(ACK, ISS + 600, PISS + 1, window=65535)])
    assert seen == [pb.sock] * 2
    pb.at(3.1).send(ACK, PISS + 1 + 1380, ISS + 601)  # (sent since, and lost)
    assert pb.sock.data_vanished and seen == [pb.sock] * 3
    for at in (7.05, 15.05, 31.05):
        assert pb.poll() == pytest.approx(at)
        pb.at(at).expect([])
    assert seen == [pb.sock] * 6
    assert pb.sock.stats.rx_stalls == 1 and pb.sock.stats.stall_probes == 2
    assert pb.poll() is None


def test_an_answer_that_comes_after_the_stall_ends_it() -> None:
    """The stall reported (and the peer asked), its answer then arrives, in small
    segments (as from a server told of a narrower path): that stall is over. The
    question that was due again does not go out, nor is anything reported again, though
    only small segments came."""
    seen: list[TcpSocket] = []
    pb = _asked(seen)
    pb.at(1.05).expect([o(ACK, ISS + 300, PISS + 1, window=65535)])
    assert seen == [pb.sock]
    pb.at(1.5).send(ACK, PISS + 1, ISS + 301, payload=b"a" * 500)
    assert pb.poll() == pytest.approx(1.54)  # (its delayed ACK)
    pb.at(1.54).out()
    assert pb.poll() == pytest.approx(3.05)
    pb.at(3.05).expect([])
    assert seen == [pb.sock] and pb.poll() is None
    assert pb.sock.stats.rx_stalls == pb.sock.stats.stall_probes == 1


def test_an_answer_due_after_our_half_close_is_a_stall_too() -> None:
    """A client that half-closes once its request is out (its FIN acknowledged with the
    request): the answer is just as due. A socket closed for reading expects none."""
    seen: list[TcpSocket] = []
    pb = est(mss=1380, peer_mss=1460, on_rx_stall=seen.append)
    pb.sock.send(b"q" * 300)
    pb.sock.shutdown_write(0.0)
    pb.out()
    pb.at(0.05).send(ACK, PISS + 1, ISS + 302)
    assert pb.sock.state is TcpState.FIN_WAIT_2
    pb.at(1.05).expect([o(ACK, ISS + 301, PISS + 1, window=65535)])
    assert seen == [pb.sock]

    gone = est(mss=1380, peer_mss=1460, on_rx_stall=seen.append)
    gone.sock.send(b"q" * 300)
    gone.sock.close(0.0)
    gone.out()
    gone.at(0.05).send(ACK, PISS + 1, ISS + 302)
    gone.at(1.05).expect([])
    assert seen == [pb.sock]


def test_a_request_that_goes_on_is_no_stall() -> None:
    """All our data acknowledged for a moment (an upload whose writer paused), then more
    of it sent: the request goes on, no answer is due yet. When the stall's wait runs out
    with our data in flight, nothing held beyond a hole and no sign the peer sent any,
    nothing is reported and the peer is not asked (in the lab, a loaded machine's upload
    was probed as a receive stall this way, its pings asked of the server before the
    upload's own black hole question). Once all of it is acknowledged, the answer is due
    from then on."""
    seen: list[TcpSocket] = []
    pb = _asked(seen)
    pb.sock.send(b"r" * 1380)  # (the writer goes on)
    pb.at(0.5).out()
    pb.at(0.55).send(ACK, PISS + 1, ISS + 301)  # (a duplicate: the new data not yet)
    while (at := pb.poll()) is not None and at < 1.06:
        sent = pb.at(at).out()
        assert all(seg.payload for seg in sent), sent  # (resends of the data, no question)
    assert seen == [] and pb.sock.stats.rx_stalls == pb.sock.stats.stall_probes == 0
    pb.at(1.3).send(ACK, PISS + 1, ISS + 1681)  # (all of it acknowledged: now it is due)
    assert pb.poll() == pytest.approx(2.3)
    pb.at(2.3).expect([o(ACK, ISS + 1680, PISS + 1, window=65535)])
    assert seen == [pb.sock] and pb.sock.stats.rx_stalls == 1


def test_an_answer_sent_and_never_come_is_told_again() -> None:
    """The peer's answer to the stall's question carries a SEG.SEQ beyond RCV.NXT: it
    sent data that never came (the first segment of its reply was full-sized, and a
    black hole took it): ``data_vanished``, and the hook hears of the stall once more
    (still one stall counted); later signs add nothing. Once all of it arrives (in small
    segments, as from a server told of a narrower path), the sign is gone."""
    seen: list[TcpSocket] = []
    pb = _asked(seen)
    pb.at(1.05).out()
    assert seen == [pb.sock] and not pb.sock.data_vanished
    pb.at(1.1).send(ACK, PISS + 1 + 2760, ISS + 301)
    assert pb.sock.data_vanished and seen == [pb.sock, pb.sock]
    pb.at(1.2).send(ACK, PISS + 1 + 4140, ISS + 301)
    assert pb.sock.data_vanished and seen == [pb.sock, pb.sock]
    assert pb.sock.stats.rx_stalls == pb.sock.stats.stall_probes == 1
    for i in range(4):
        pb.at(1.3).send(ACK, PISS + 1 + i * 1160, ISS + 301, payload=b"a" * 1160)
        assert pb.sock.data_vanished is (i < 3)
    pb.out()


def test_an_answer_seen_sent_before_the_stall_is_not_asked_again() -> None:
    """Our request unacknowledged (its ACK rode the lost first segment of the reply):
    our timeout resends it, and the peer's duplicate ACK carries its SND.NXT, beyond
    RCV.NXT. The stall then reports data vanished at once, without asking the peer."""
    seen: list[TcpSocket] = []
    pb = est(mss=1380, peer_mss=1460, on_rx_stall=seen.append)
    pb.sock.send(b"q" * 300)
    pb.out()
    rto = pb.poll()
    assert rto is not None
    pb.at(rto).expect([o(ACK | PSH, ISS + 1, PISS + 1, window=65535, payload=b"q" * 300)])
    pb.at(rto + 0.05).send(ACK, PISS + 1 + 1380, ISS + 301)
    assert pb.sock.data_vanished and seen == []
    pb.at(rto + 1.05).expect([])
    assert seen == [pb.sock] and pb.sock.stats.stall_probes == 0


def test_what_vanished_is_no_sign_after_full_sized_or_held_data() -> None:
    """A SEG.SEQ beyond RCV.NXT is no sign of a black hole when a full-sized segment came
    before (the path carries them: mere loss), nor while data is held beyond the hole."""
    seen: list[TcpSocket] = []
    large = _asked(seen)
    large.at(0.1).send(ACK, PISS + 1, ISS + 301, payload=b"a" * 1380)
    large.at(0.2).send(ACK, PISS + 1 + 2760, ISS + 301)
    assert not large.sock.data_vanished
    held = _asked(seen)
    held.at(0.1).send(ACK, PISS + 1 + 1380, ISS + 301, payload=b"b" * 500)
    held.at(0.2).send(ACK, PISS + 1 + 2760, ISS + 301)
    assert not held.sock.data_vanished


def test_a_full_sized_answer_in_time_is_no_stall() -> None:
    seen: list[TcpSocket] = []
    pb = _asked(seen)
    pb.at(0.5).send(ACK, PISS + 1, ISS + 301, payload=b"a" * 1380)
    pb.at(0.54).expect([o(ACK, ISS + 301, PISS + 1381, window=65535 - 1380)])  # (delayed)
    assert pb.poll() == pytest.approx(1.05)  # (the timer was armed; it finds the data)
    pb.at(1.05).expect([])
    assert seen == [] and pb.sock.stats.rx_stalls == 0


def test_only_small_segments_answering_is_a_stall_unless_the_path_is_that_narrow() -> None:
    """The answer's first segment is small (a server writing its headers on their own) and
    no larger one follows: a stall as well, though data arrived, because nothing larger
    than ``blackhole_mtu`` allows (1200 - 40) ever did. Not when the path is known to be
    that narrow (the segments are as large as they can be), nor when a larger one came."""
    seen: list[TcpSocket] = []
    pb = _asked(seen)
    pb.at(0.1).send(ACK | PSH, PISS + 1, ISS + 301, payload=b"h" * 200)
    pb.at(1.05).out()
    assert seen == [pb.sock]

    narrow = _asked(seen)
    narrow.sock.set_path_mtu_mss(1160)
    narrow.at(0.1).send(ACK | PSH, PISS + 1, ISS + 301, payload=b"h" * 1160)
    narrow.at(1.05).out()
    large = _asked(seen)
    large.at(0.1).send(ACK | PSH, PISS + 1, ISS + 301, payload=b"h" * 1161)
    large.at(1.05).out()
    assert seen == [pb.sock]


def test_a_hole_that_does_not_fill_is_a_stall() -> None:
    """Data held beyond a hole at RCV.NXT for ``rx_stall`` seconds, more of it arriving
    meanwhile (it does not move the timer): a stall, once. A hole filled in time is none."""
    seen: list[TcpSocket] = []
    pb = est(mss=1380, peer_mss=1460, on_rx_stall=seen.append)
    pb.at(0.1).send(ACK, PISS + 1 + 1380, ISS + 1, payload=b"b" * 1380)
    pb.at(0.6).send(ACK, PISS + 1 + 2760, ISS + 1, payload=b"c" * 500)
    pb.out()
    assert pb.poll() == pytest.approx(1.1)
    pb.at(1.1).out()
    assert seen == [pb.sock] and pb.sock.stats.rx_stalls == 1

    filled = est(mss=1380, peer_mss=1460, on_rx_stall=seen.append)
    filled.at(0.1).send(ACK, PISS + 1 + 1380, ISS + 1, payload=b"b" * 1380)
    filled.at(0.3).send(ACK, PISS + 1, ISS + 1, payload=b"a" * 1380)
    filled.out()
    filled.at(1.1).out()
    assert seen == [pb.sock] and filled.sock.stats.rx_stalls == 0


def test_the_stall_wait_is_three_round_trips_on_a_long_path_and_the_rule_can_be_off() -> None:
    seen: list[TcpSocket] = []
    pb = active(cfg(mss=1380, on_rx_stall=seen.append))
    pb.out()
    pb.at(0.5).send(SYN | ACK, PISS, ISS + 1, mss=1460)  # an RTT of 0.5 s
    pb.out()
    pb.sock.send(b"q" * 300)
    pb.out()
    pb.at(1.0).send(ACK, PISS + 1, ISS + 301)
    assert pb.sock.srtt == pytest.approx(0.5)
    assert pb.poll() == pytest.approx(1.0 + 3 * 0.5)
    off = _asked(seen, rx_stall=0)
    assert off.poll() is None
    # data still queued (the peer's window is closed): no request complete, no answer due
    shut = est(mss=1380, peer_mss=1460, on_rx_stall=seen.append, peer_window=100)
    shut.sock.send(b"q" * 300)
    shut.out()
    shut.at(0.05).send(ACK, PISS + 1, ISS + 101, window=0)
    assert shut.poll() == pytest.approx(0.05 + shut.sock.rto)  # (the persist timer only)
    shut.at(2.0).out()
    assert seen == []


def test_rto_go_back_n_after_timeout() -> None:
    pb = est()
    pb.sock.send(b"g" * 3000)
    first = pb.out()
    assert len(first) == 3
    pb.at(0.2).expect([first[0]])  # cwnd = 1 segment after the timeout
    # a pure ACK sent now must carry the highest sequence sent, not the rewound SND.NXT:
    # the peer may hold everything, and an "old" SEQ would make it ignore our ACK field
    pb.at(0.21).send(ACK, PISS + 1, ISS + 1, payload=b"k" * 10)
    pb.at(0.25).expect([o(ACK, ISS + 3001, PISS + 11, window=65525)])
    pb.at(0.25).send(ACK, PISS + 11, ISS + 1001)
    assert [(s.seq, len(s.payload)) for s in pb.out()] == [(ISS + 1001, 1000), (ISS + 2001, 1000)]


def test_zero_window_probes_with_backoff() -> None:
    pb = est(peer_window=100)
    pb.sock.send(b"p" * 150)
    pb.expect([o(ACK, ISS + 1, PISS + 1, window=65535, payload=b"p" * 100)])
    pb.at(0.1).send(ACK, PISS + 1, ISS + 101, window=0)
    pb.expect([])
    rto = pb.sock.rto
    probe = o(ACK, ISS + 100, PISS + 1, window=65535)
    t = 0.1 + rto
    assert pb.poll() == pytest.approx(t)
    pb.at(t).expect([probe])
    assert pb.poll() == pytest.approx(t + 2 * rto)
    t += 2 * rto
    pb.at(t).expect([probe])
    assert pb.poll() == pytest.approx(t + 4 * rto)
    assert pb.sock.stats.zero_window_probes == 2
    assert pb.sock.state is TcpState.ESTABLISHED
    pb.at(t + 0.1).send(ACK, PISS + 1, ISS + 101, window=1000)  # answer: window open
    pb.expect([o(ACK | PSH, ISS + 101, PISS + 1, window=65535, payload=b"p" * 50)])
    assert pb.poll() == pytest.approx(t + 0.1 + pb.sock.rto)  # RTO only, no persist


def test_three_dup_acks_fast_retransmit_newreno() -> None:
    pb = est()  # peer without SACK
    pb.sock.send(b"".join(bytes([i]) * 1000 for i in range(20)))
    segs = pb.out()
    assert len(segs) == 10  # initial window: 10 segments
    dup = dict(window=65535)
    # limited transmit (RFC 3042): one new segment for each of the first two dup ACKs
    pb.at(0.1).send(ACK, PISS + 1, ISS + 1, **dup)
    assert [s.seq for s in pb.out()] == [ISS + 10001]
    pb.send(ACK, PISS + 1, ISS + 1, **dup)
    assert [s.seq for s in pb.out()] == [ISS + 11001]
    pb.send(ACK, PISS + 1, ISS + 1, **dup)
    pb.expect([segs[0]])
    assert pb.sock.stats.fast_retransmits == 1
    # ssthresh = FlightSize/2, cwnd = ssthresh + 3 SMSS (RFC 5681 §3.2)
    assert pb.sock.ssthresh == 6000 and pb.sock.cwnd == 9000
    for _ in range(3):
        pb.send(ACK, PISS + 1, ISS + 1, **dup)
    pb.expect([])  # cwnd inflated to 12000 == flight
    pb.send(ACK, PISS + 1, ISS + 1, **dup)
    (new,) = pb.out()  # inflated window lets one new segment out
    assert new.seq == ISS + 12001
    # partial ACK: the next hole is retransmitted at once (RFC 6582)
    pb.send(ACK, PISS + 1, ISS + 3001, **dup)
    got = pb.out()
    assert got[0] == segs[3]
    # cwnd 13000 deflated by the 2000 bytes acked, plus one MSS back: 12000 > flight 11000
    assert [s.seq for s in got[1:]] == [ISS + 13001]
    # full ACK ends recovery with cwnd <= ssthresh
    pb.send(ACK, PISS + 1, ISS + 14001, **dup)
    assert pb.sock.cwnd <= 6000
    assert not pb.sock._in_fr


def _newreno_in_recovery() -> Pb:
    """30 segments of 1000 bytes outstanding to a peer without SACK (cwnd opened to 30 for
    it), three duplicate ACKs at t=0.1: NewReno recovery has begun (the first resent)."""
    pb = est()  # peer without SACK
    pb.sock._cc.cwnd = 30 * 1000
    pb.sock.send(b"".join(bytes([i]) * 1000 for i in range(30)))
    assert len(pb.out()) == 30
    pb.at(0.1)
    for _ in range(3):
        pb.send(ACK, PISS + 1, ISS + 1, window=65535)
    assert any(s.seq == ISS + 1 for s in pb.out())  # fast retransmit
    assert pb.sock._in_fr
    return pb


def _partial_acks(pb: Pb, step: int, count: int) -> list[bool]:
    """``count`` partial ACKs 50 ms apart, each ``step`` bytes further; whether each
    restarted the RTO (the resend of the new head included)."""
    restarted = []
    t, una = 0.1, 1
    deadline = pb.poll()
    for _ in range(count):
        t += 0.05
        una += step
        pb.at(t).send(ACK, PISS + 1, ISS + una, window=65535)
        resend = pb.out()[0]
        assert resend.seq == ISS + una and len(resend.payload) == 1000  # the next hole at once
        now_deadline = pb.poll()
        restarted.append(now_deadline == pytest.approx(t + pb.sock.rto))
        if not restarted[-1]:
            assert now_deadline == pytest.approx(deadline)  # left as it was
        deadline = now_deadline
    return restarted


def test_newreno_holes_close_together_stop_restarting_the_rto() -> None:
    """RFC 6582 §3.2 step 5 and §4: in NewReno recovery (no SACK) each partial ACK resends
    the next hole and restarts the RTO while ``TcpConfig.newreno_rto_restarts`` (8) lasts;
    one whose next hole is close by (it acknowledged less than 3 segments: a slow-start
    overshoot into a queue, every other segment lost) spends 4 of it, so after two the RTO
    ends the recovery and goes back N in slow start instead of one hole per round trip
    (found against a server with SACK off: 6 MiB behind an overflowing bottleneck queue
    took 26 s where SACK takes 1 s)."""
    assert TcpConfig().newreno_rto_restarts == 8
    k = 2
    pb = _newreno_in_recovery()
    assert _partial_acks(pb, 200, k + 3) == [True] * k + [False] * 3
    assert pb.sock._in_fr and pb.sock.stats.rto_expired == 0
    rto_at = pb.poll()
    assert rto_at is not None
    pb.at(rto_at)
    (rto,) = pb.out()  # the RTO: back to SND.UNA, one segment (slow start)
    assert rto.seq == ISS + 1 + 200 * (k + 3) and len(rto.payload) == 1000
    assert pb.sock.stats.rto_expired == 1 and not pb.sock._in_fr


def test_newreno_holes_far_apart_restart_the_rto_longer() -> None:
    """The same with holes 3 segments apart (random loss): 8 partial ACKs restart the RTO
    ("Slow-but-Steady" for the few holes random loss leaves; going back N would resend
    what had arrived), the 9th does not (hundreds of holes, far apart, still end in the
    RTO rather than hundreds of round trips)."""
    pb = _newreno_in_recovery()
    assert _partial_acks(pb, 3000, 9) == [True] * 8 + [False]
    assert pb.sock._in_fr


def test_sack_recovery_retransmits_only_holes() -> None:
    # RFC 6675's DupThresh rules (RACK off; its rules are tested in test_tcp_rack.py)
    pb = est(peer_sack=True, rack=False)
    pb.sock.send(b"".join(bytes([i]) * 1000 for i in range(10)))
    segs = pb.out()
    assert len(segs) == 10

    def dupack(*blocks: tuple[int, int]) -> None:
        pb.send(ACK, PISS + 1, ISS + 1, sack_blocks=tuple((ISS + a, ISS + b) for a, b in blocks))

    pb.at(0.1)
    dupack((1001, 2001))
    dupack((1001, 3001))
    pb.expect([])
    dupack((4001, 5001), (1001, 3001))  # third dup ACK: recovery, first hole resent
    pb.expect([segs[0]])
    dupack((4001, 7001), (1001, 3001))  # now 3001..4001 counts as lost too
    pb.expect([segs[3]])
    dupack((4001, 10001), (1001, 3001))
    pb.expect([])  # nothing else is missing, no new data
    assert pb.sock.stats.retransmits == 2
    pb.send(ACK, PISS + 1, ISS + 10001)
    assert not pb.sock._in_fr and pb.sock.cwnd == pb.sock.ssthresh == 5000


def test_rto_skips_sacked_data() -> None:
    # RACK off: with it (and SRTT 0 here) the first SACK already marks 1..1001 lost
    pb = est(peer_sack=True, rack=False)
    pb.sock.send(b"s" * 3000)
    segs = pb.out()
    pb.at(0.05).send(ACK, PISS + 1, ISS + 1, sack_blocks=((ISS + 1001, ISS + 2001),))
    pb.expect([])
    t = pb.poll()
    assert t is not None
    pb.at(t).expect([segs[0]])
    pb.at(t + 0.01).send(ACK, PISS + 1, ISS + 1001, sack_blocks=((ISS + 1001, ISS + 2001),))
    assert pb.out() == [segs[2]]  # 1001..2001 was SACKed: not resent


def test_user_timeout() -> None:
    pb = est(user_timeout=5.0)
    pb.sock.send(b"u")
    pb.out()
    times = []
    while pb.sock.state is TcpState.ESTABLISHED:
        t = pb.poll()
        assert t is not None
        times.append(t)
        pb.at(t).out()
    assert isinstance(pb.sock.error, TimeoutError)
    assert times[-1] >= 5.0 and all(t < 5.0 for t in times[:-1])
    assert pb.sock.is_closed


def test_keepalive_probes_then_timeout() -> None:
    pb = est(keepalive=10.0, keepalive_interval=1.0, keepalive_probes=2)
    assert pb.poll() == pytest.approx(10.0)
    probe = o(ACK, ISS, PISS + 1, window=65535)
    pb.at(10.0).expect([probe])
    pb.at(10.5).send(ACK, PISS + 1, ISS + 1)  # answered: idle timer restarts
    pb.at(10.5).expect([])
    assert pb.poll() == pytest.approx(20.5)
    pb.at(20.5).expect([probe])
    pb.at(21.5).expect([probe])
    pb.at(22.5).expect([])
    assert isinstance(pb.sock.error, TimeoutError)


def test_path_mtu_lowered_resends_smaller() -> None:
    pb = est()
    pb.sock.send(b"m" * 2000)
    assert [len(s.payload) for s in pb.out()] == [1000, 1000]
    pb.sock.set_path_mtu_mss(600)
    assert pb.sock.mss == 600
    assert [len(s.payload) for s in pb.out()] == [600, 600, 600, 200]


# -- sequence wraparound -------------------------------------------------------------------


def test_sequence_wraparound_both_directions() -> None:
    isn = M32 - 1500
    piss = M32 - 700
    pb = est(isn=isn, piss=piss, peer_sack=True)
    pb.sock.send(b"w" * 3000)
    segs = pb.out()
    assert [s.seq for s in segs] == [(isn + 1) & M32, (isn + 1001) & M32, (isn + 2001) & M32]
    assert segs[2].seq == 500
    # peer data wraps too; deliver out of order across the wrap
    pb.send(ACK, piss + 1001, isn + 1, payload=b"B" * 1000)
    (ack,) = pb.out()
    assert ack.ack == (piss + 1) & M32
    assert ack.sack_blocks == (((piss + 1001) & M32, (piss + 2001) & M32),)
    pb.send(ACK, piss + 1, isn + 3001, payload=b"A" * 1000)
    (ack,) = pb.out()
    assert ack.ack == (piss + 2001) & M32 == 1300
    assert pb.sock.recv(5000) == b"A" * 1000 + b"B" * 1000
    assert pb.sock.send_queued == 0
    pb.sock.close(0.0)
    (fin,) = pb.out()
    assert fin.flags & FIN and fin.seq == (isn + 3001) & M32
    pb.send(FIN | ACK, piss + 2001, isn + 3002)
    assert pb.sock.state is TcpState.TIME_WAIT


def test_lost_retransmission_detected_by_later_sacks() -> None:
    pb = est(peer_sack=True)
    pb.sock.send(b"".join(bytes([i]) * 1000 for i in range(30)))
    segs = pb.out()
    assert len(segs) == 10

    def dupack(a: int, b: int) -> None:
        pb.send(ACK, PISS + 1, ISS + 1, sack_blocks=((ISS + a, ISS + b),))

    pb.at(0.1)
    dupack(1001, 2001)
    dupack(1001, 3001)
    dupack(1001, 4001)
    pb.expect([segs[0]])  # fast retransmit of the hole
    dupack(1001, 10001)  # pipe drops: new data goes out behind the retransmission
    assert [s.seq for s in pb.out()] == [ISS + 10001, ISS + 11001, ISS + 12001, ISS + 13001]
    # data sent after the retransmission is SACKed while the hole is still missing:
    # the retransmission was lost too; resend it now rather than after an RTO
    dupack(1001, 14001)
    got = pb.out()
    assert got[0] == segs[0]
    assert all(s.seq >= ISS + 14001 for s in got[1:])
    assert pb.sock.stats.lost_retransmits == 1
    assert pb.sock.stats.rto_expired == 0


def test_fast_retransmit_restarts_rto() -> None:
    pb = est(peer_sack=True)
    pb.sock.send(b"x" * 5000)
    segs = pb.out()
    rto = pb.sock.rto
    # (the RTO timer itself: with RACK-TLP, poll() first names the earlier probe timeout)
    assert pb.sock._rto_at == pytest.approx(rto)
    t = rto * 0.9
    for b in (2001, 3001, 4001):
        pb.at(t).send(ACK, PISS + 1, ISS + 1, sack_blocks=((ISS + 1001, ISS + b),))
    pb.expect([segs[0]])
    assert pb.sock._rto_at == pytest.approx(t + rto)  # a full RTO for the retransmission


def test_shutdown_in_syn_sent_sends_fin_after_handshake() -> None:
    pb = active(cfg(timestamps=False))
    pb.out()
    assert pb.sock.send(b"early") == 5
    pb.sock.shutdown_write(0.0)
    assert pb.sock.state is TcpState.SYN_SENT
    pb.send(SYN | ACK, PISS, ISS + 1, mss=1000)
    assert pb.sock.state is TcpState.FIN_WAIT_1
    pb.expect([o(ACK | PSH | FIN, ISS + 1, PISS + 1, window=65535, payload=b"early")])


def test_close_in_syn_sent_just_closes() -> None:
    pb = active(cfg())
    pb.out()
    pb.sock.close(0.0)
    assert pb.sock.is_closed
    pb.expect([])


# -- the transition table -----------------------------------------------------------------


def test_state_changes_only_in_set_state() -> None:
    """``state`` is assigned in exactly two places: the initial CLOSED in ``__init__`` and
    ``StateMachine._set_state``, which checks the transition table."""
    import ast
    import pathlib

    import mitm_wg.net

    where = []
    for path in sorted(pathlib.Path(mitm_wg.net.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for node in ast.walk(fn):
                targets = node.targets if isinstance(node, ast.Assign) else []
                for t in targets:
                    if isinstance(t, ast.Attribute) and t.attr == "state":
                        where.append((path.name, fn.name))
    assert sorted(where) == [("tcp.py", "__init__"), ("tcp_state.py", "_set_state")]


def test_every_transition_taken_is_in_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the state playbooks, recording each state change: all are in TRANSITIONS, and
    together they take every transition the table lists except the ones only a timeout or
    an error path takes in scenarios not replayed here."""
    from mitm_wg.net.tcp_state import TRANSITIONS, StateMachine

    taken: set[tuple[TcpState, TcpState]] = set()
    real = StateMachine._set_state

    def record(self: StateMachine, new: TcpState, event: str) -> None:
        taken.add((self.state, new))
        real(self, new, event)

    monkeypatch.setattr(StateMachine, "_set_state", record)
    for name in SYNC_STATES:
        pb, _, _, _ = _to_state(name)
        pb.sock.abort(0.0)  # -> CLOSED from every synchronized state
    test_simultaneous_open()
    test_simultaneous_close()
    test_fin_and_ack_together_go_straight_to_time_wait()
    test_time_wait_expiry_configurable()
    test_half_close_we_close_first()
    test_half_close_peer_closes_first()
    test_shutdown_in_syn_sent_sends_fin_after_handshake()
    test_close_in_syn_sent_just_closes()
    test_rst_in_syn_sent_refuses()
    assert taken <= set(TRANSITIONS), taken - set(TRANSITIONS)
    not_taken = set(TRANSITIONS) - taken
    S = TcpState
    # SYN-RECEIVED -> FIN-WAIT-1 (close before the handshake completed, passive side) and
    # FIN-WAIT-1 -> TIME-WAIT (our code passes through FIN-WAIT-2 on the same segment)
    assert not_taken <= {(S.SYN_RECEIVED, S.FIN_WAIT_1), (S.FIN_WAIT_1, S.TIME_WAIT)}, not_taken


def test_illegal_transition_raises() -> None:
    from mitm_wg.net.tcp_state import IllegalTransition

    pb = est()
    with pytest.raises(IllegalTransition, match="ESTABLISHED -> SYN_SENT"):
        pb.sock._set_state(TcpState.SYN_SENT, "test")
    assert pb.sock.state is TcpState.ESTABLISHED
    with pytest.raises(IllegalTransition):
        pb.sock._set_state(TcpState.TIME_WAIT, "test")  # needs a FIN first
    pb.sock.abort(0.0)
    with pytest.raises(IllegalTransition):
        pb.sock._set_state(TcpState.ESTABLISHED, "test")


def test_on_touched_hook_after_application_calls() -> None:
    """The owner (the stack) learns of every application call that may leave something to
    send through the constructor's ``on_touched`` hook."""
    from mitm_wg.net.tcp import TcpSocket

    calls: list[TcpSocket] = []
    sock = TcpSocket(
        cfg(), b"\x0a\0\0\1", LPORT, b"\x0a\0\0\2", RPORT, isn=ISS, now=0.0, on_touched=calls.append
    )
    sock.connect(0.0)
    assert calls == []
    assert sock.send(b"x") == 1
    assert calls == [sock]
    assert sock.recv(10) == b""  # nothing read: the window did not open
    assert calls == [sock]
    sock.shutdown_write(0.0)
    sock.close(0.0)
    sock.abort(0.0)
    assert len(calls) == 4


def test_the_reassembly_queue_holds_a_window_with_every_other_segment_lost() -> None:
    """A queue that overflows in the sender's slow start drops every other segment: the
    receiver must hold all the rest (as Linux, whose out-of-order queue is bounded by
    memory only), not drop them once it holds 64 ranges, which made the sender retransmit
    hundreds of segments that had arrived."""
    pb = est(peer_sack=True, recv_buffer=1 << 20, peer_ws=7)
    sock = pb.sock
    assert sock._asm.max_ranges == (1 << 20) // 2000  # a window of 1000-byte segments / 2
    n = 400  # 400 of 800 segments lost, every other one: 400 ranges
    for i in range(n):
        pb.send(ACK, PISS + 1001 + 2000 * i, ISS + 1, payload=bytes([i % 251]) * 1000)
    acks = pb.out()
    assert acks[-1].sack_blocks[0] == (PISS + 1001 + 2000 * (n - 1), PISS + 2001 + 2000 * (n - 1))
    assert len(sock._asm) == n and sock.stats.ofo_drops == sock.stats.dropped == 0
    for i in range(n):  # the retransmissions fill the holes
        pb.send(ACK, PISS + 1 + 2000 * i, ISS + 1, payload=b"-" * 1000)
    pb.out()
    got = sock.recv(1 << 21)
    assert got == b"".join(b"-" * 1000 + bytes([i % 251]) * 1000 for i in range(n))


def test_the_reassembly_queue_is_bounded() -> None:
    """Tiny segments cannot grow the queue without bound: at most a window of full-sized
    segments with every other one lost (at least 64); what does not fit is dropped and
    counted (ofo_drops), and ACKed: the sender retransmits it."""
    pb = est(peer_sack=True, recv_buffer=65535)
    sock = pb.sock
    assert sock._asm.max_ranges == 64
    for i in range(70):
        pb.send(ACK, PISS + 1001 + 2 * i, ISS + 1, payload=b"x")
    assert len(sock._asm) == 64
    assert sock.stats.ofo_drops == sock.stats.dropped == 6
    assert len(pb.out()) == 70


def test_a_gap_filled_in_the_same_batch_is_acked_once() -> None:
    """Segments after a gap and the one filling it, all before one dispatch (one batch of
    datagrams: reordering within it): one ACK, for the new in-order point. The duplicate
    ACKs owed for the old point went out as copies of that new ACK, and a sender counts
    copies as duplicate ACKs of data just acknowledged."""
    pb = est(peer_sack=True)
    sock = pb.sock
    for k in (1, 2, 3):
        sock.process(seg(ACK, PISS + 1 + 1000 * k, ISS + 1, payload=b"x" * 1000), pb.now)
    sock.process(seg(ACK, PISS + 1, ISS + 1, payload=b"y" * 1000), pb.now)
    pb.expect([o(ACK, ISS + 1, PISS + 4001, window=61535)])
    assert sock.recv(5000) == b"y" * 1000 + b"x" * 3000


def test_a_gap_filled_later_gets_its_duplicate_acks_first() -> None:
    """The same segments one dispatch each: a duplicate ACK with the SACK block for each
    segment after the gap, then the ACK for the filled gap."""
    pb = est(peer_sack=True)
    for k in (1, 2, 3):
        pb.send(ACK, PISS + 1 + 1000 * k, ISS + 1, payload=b"x" * 1000)
        pb.expect(
            [
                o(
                    ACK,
                    ISS + 1,
                    PISS + 1,
                    window=65535,
                    sack_blocks=((PISS + 1001, PISS + 1001 + 1000 * k),),
                )
            ]
        )
    pb.send(ACK, PISS + 1, ISS + 1, payload=b"y" * 1000)
    pb.expect([o(ACK, ISS + 1, PISS + 4001, window=61535)])


def test_a_batch_that_fills_one_gap_of_two_acks_the_rest_with_its_sack_block() -> None:
    """Two gaps, the first filled in the batch: the early ACK of rule sack-flush (made when
    the second block began, so that the first block was reported) stays, as one by one;
    no duplicate ACK is left owed; the ACK for the new in-order point carries the block
    still beyond it."""
    pb = est(peer_sack=True)
    sock = pb.sock
    for start in (1001, 3001):  # two gaps: [1, 1001) and [2001, 3001)
        sock.process(seg(ACK, PISS + start, ISS + 1, payload=b"x" * 1000), pb.now)
    sock.process(seg(ACK, PISS + 1, ISS + 1, payload=b"y" * 1000), pb.now)  # fills the first
    pb.expect(
        [
            o(ACK, ISS + 1, PISS + 1, window=65535, sack_blocks=((PISS + 1001, PISS + 2001),)),
            o(ACK, ISS + 1, PISS + 2001, window=63535, sack_blocks=((PISS + 3001, PISS + 4001),)),
        ]
    )
