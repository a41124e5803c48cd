"""A new connection's SYN timeout from the RTT measured to its destination (RFC 9040 §8:
``Stack.known_rto`` gives ``TcpSocket``'s ``syn_rto``), or else from the path's lower
bound (``tcp_connect(path_rtt=...)``, the runtime's last WireGuard handshake): playbook
tests of the socket's rules, then the stack in the simulator (the cache, ensemble
sharing, the path's bound, a lost SYN).

Without either a lost SYN or SYN-ACK costs the initial RTO, 1 s (RFC 6298 §2.1, as
Linux); on a lossy path (2 % each way) about one connection in 25 pays it.
"""

from __future__ import annotations

import pytest

from mitm_wg.net import stack as stack_mod
from mitm_wg.net.congestion import initial_window
from mitm_wg.net.tcp import TcpConfig, TcpSocket, TcpState
from mitm_wg.net.tcp_wire import SYN
from sim import LinkParams, make_pair
from tcp_playbook import LOCAL, LPORT, REMOTE, RPORT, Pb, cfg, fixed_random

ACK = 0x10
ISS = 1000
PISS = 5000


def active(config: TcpConfig, syn_rto: float | None) -> Pb:
    sock = TcpSocket(
        config,
        LOCAL,
        LPORT,
        REMOTE,
        RPORT,
        isn=ISS,
        now=0.0,
        randbytes=fixed_random,
        syn_rto=syn_rto,
    )
    sock.connect(0.0)
    return Pb(sock, 0.0)


# -- the socket ---------------------------------------------------------------------------
def test_a_known_rtt_shortens_the_syn_timeouts_but_not_the_give_up() -> None:
    """The SYN goes again 0.25 s after it was sent, not 1 s; the timeouts shorter than the
    initial RTO do not count against ``syn_retries``: the connect gives up no sooner than
    without the known RTT (7 s with two retries: 1 + 2 + 4)."""
    pb = active(cfg(syn_retries=2, timestamps=False), 0.25)
    (syn,) = pb.out()
    for t, nxt in ((0.25, 0.75), (0.75, 1.75), (1.75, 3.75), (3.75, 7.75)):
        assert pb.poll() == pytest.approx(t)
        pb.at(t - 0.001).expect([])
        pb.at(t).expect([syn])
        assert pb.poll() == pytest.approx(nxt)
    pb.at(7.75).expect([])
    assert pb.sock.state is TcpState.CLOSED and isinstance(pb.sock.error, TimeoutError)
    assert pb.sock.stats.syn_timeouts == 4


@pytest.mark.parametrize(("syn_rto", "first"), [(5.0, 1.0), (0.01, 0.2)])
def test_syn_rto_stays_within_the_rto_bounds(syn_rto: float, first: float) -> None:
    """Never longer than the initial RTO (1 s), never shorter than the minimum (0.2 s)."""
    pb = active(cfg(), syn_rto)
    pb.out()
    assert pb.poll() == pytest.approx(first)


@pytest.mark.parametrize("echo_first", [True, False])
def test_a_spurious_syn_timeout_keeps_the_initial_window(echo_first: bool) -> None:
    """The SYN went again on its (short) timeout. A SYN-ACK that echoes the first SYN's
    TSval answers that one: nothing was lost, the timeout was early, the initial window
    stays. One that echoes the second's may follow a lost SYN or SYN-ACK: one segment
    (RFC 5681 §3.1)."""
    pb = active(cfg(), 0.25)
    (syn,) = pb.at(1.0).out()  # (at 0 its TSval would be 0, which no echo can show)
    pb.at(1.25)
    (again,) = pb.out()
    assert syn.timestamp is not None and again.timestamp is not None
    assert again.timestamp[0] != syn.timestamp[0]
    echo = syn.timestamp[0] if echo_first else again.timestamp[0]
    pb.at(1.3).send(SYN | ACK, PISS, ISS + 1, mss=1000, timestamp=(777, echo))
    sock = pb.sock
    assert sock.state is TcpState.ESTABLISHED and sock.stats.syn_timeouts == 1
    smss = sock.mss  # (1000 less the timestamp option)
    assert sock.cwnd == (initial_window(smss) if echo_first else smss)
    assert initial_window(smss) > 9 * smss


@pytest.mark.parametrize(
    ("syn_rto", "lost", "rto_after"),
    [(0.25, False, 1.0), (None, True, 3.0)],
    ids=["early", "at-the-initial-rto"],
)
def test_without_timestamps_only_a_syn_timeout_at_the_initial_rto_shrinks_the_window(
    syn_rto: float | None, lost: bool, rto_after: float
) -> None:
    """No echo can show whether a timeout shorter than the initial RTO was early (a far
    destination behind a near exit): it does not shrink the window, and with no RTT
    sample (Karn's rule) the RTO starts over at the initial 1 s, not at the short SYN
    timeout backed off (0.5 s, shorter than this handshake took). A timeout at the
    initial RTO's scale counts: one segment (RFC 5681 §3.1) and an RTO of 3 s until a
    sample (RFC 6298 §5.7) -- 3 s, not 3 s doubled by the SYN's backoff."""
    pb = active(cfg(timestamps=False), syn_rto)
    (syn,) = pb.out()
    timeout_at = 1.0 if syn_rto is None else syn_rto
    assert pb.poll() == pytest.approx(timeout_at)
    pb.at(timeout_at)
    (again,) = pb.out()
    assert again.seq == syn.seq
    pb.at(timeout_at + 0.45).send(SYN | ACK, PISS, ISS + 1, mss=1000)
    sock = pb.sock
    assert sock.state is TcpState.ESTABLISHED and sock.stats.syn_timeouts == 1
    assert sock.srtt is None and sock.rto == pytest.approx(rto_after)
    assert sock.cwnd == (sock.mss if lost else initial_window(sock.mss))
    assert initial_window(sock.mss) > 9 * sock.mss


# -- the stack ----------------------------------------------------------------------------
def _connect(sim, timeout: float = 10.0) -> TcpSocket:  # type: ignore[no-untyped-def]
    sock = sim.a.tcp_connect("10.0.0.2", 80, sim.now)
    assert sim.run_until(lambda: sock.state is TcpState.ESTABLISHED, timeout)
    return sock


def drop_the_first_syn(sim) -> list[float]:  # type: ignore[no-untyped-def]
    """Lose the first SYN A sends; the times every SYN from A was sent, in a list."""
    syns: list[float] = []

    def tap(i: int, pkt: bytes) -> bytes | None:
        ihl = (pkt[0] & 15) * 4
        if i == 0 and pkt[9] == 6 and pkt[ihl + 13] & SYN:
            syns.append(sim.now)
            if len(syns) == 1:
                return None
        return pkt

    sim.taps.append(tap)
    return syns


def test_the_stack_gives_a_new_connection_the_rtt_of_the_last_one() -> None:
    """Temporal sharing: a connection that ended leaves its RTT for the next one to the
    same address (the SYN timeout it gives, clamped to 0.2 s here: 20 ms of RTT); another
    address, or an entry older than RTT_CACHE_SECONDS, gets the initial RTO."""
    link = LinkParams(delay=0.01)
    sim = make_pair(seed=1, ab=link, ba=link)
    listener = sim.b.tcp_listen(80)
    first = sim.a.tcp_connect("10.0.0.2", 80, sim.now)
    assert first.rto == pytest.approx(1.0)
    accepted: list[TcpSocket] = []

    def accept() -> bool:
        sock = listener.accept()
        if sock is not None:
            accepted.append(sock)
        return bool(accepted)

    assert sim.run_until(accept, 5.0) and first.state is TcpState.ESTABLISHED
    (server,) = accepted
    first.close(sim.now)
    server.close(sim.now)
    assert sim.run_until(lambda: first not in sim.a.tcp_sockets, 10.0)  # reaped
    known = sim.a.tcp_connect("10.0.0.2", 80, sim.now)
    assert known.rto == pytest.approx(0.2)
    assert sim.a.tcp_connect("10.0.0.3", 80, sim.now).rto == pytest.approx(1.0)
    later = sim.now + stack_mod.RTT_CACHE_SECONDS + 1
    assert sim.a.tcp_connect("10.0.0.2", 80, later).rto == pytest.approx(1.0)


def test_a_connection_still_open_lends_its_rtt() -> None:
    """Ensemble sharing: no connection to the address has ended yet, one is open with an
    RTT measured (its handshake's: RTTVAR half of it): a second one opened beside it (a
    browser's parallel connections) starts from that RTT. On a 200 ms path the RTO it
    gives, SRTT + 4*RTTVAR, is 0.6 s."""
    link = LinkParams(delay=0.1)
    sim = make_pair(seed=2, ab=link, ba=link)
    sim.b.tcp_listen(80)
    first = _connect(sim)
    srtt = first.srtt
    assert srtt is not None and srtt == pytest.approx(0.2, abs=0.005)
    second = sim.a.tcp_connect("10.0.0.2", 80, sim.now)
    assert second.rto == pytest.approx(srtt + 4 * first._rtt.rttvar)
    assert second.rto == pytest.approx(0.6, abs=0.02)


def test_a_lost_syn_to_a_known_address_goes_again_at_its_rto() -> None:
    """The second connection's first SYN is lost: it goes again at the RTO the first
    connection's RTT gives (0.2 s), and the connection opens with one SYN timeout."""
    link = LinkParams(delay=0.01)
    sim = make_pair(seed=3, ab=link, ba=link)
    sim.b.tcp_listen(80)
    first = _connect(sim)
    syns = drop_the_first_syn(sim)
    second = sim.a.tcp_connect("10.0.0.2", 80, sim.now)
    start = sim.now
    assert sim.run_until(lambda: second.state is TcpState.ESTABLISHED, 5.0)
    assert second.stats.syn_timeouts == 1 and len(syns) == 2
    assert syns[1] - start == pytest.approx(0.2)  # virtual time: the timer, not the machine
    assert second.cwnd == second.mss  # a SYN was lost: RFC 5681 §3.1
    assert first.state is TcpState.ESTABLISHED


def test_the_paths_round_trip_sets_a_new_destinations_syn_timeout() -> None:
    """``path_rtt`` (a lower bound: the WireGuard handshake's round trip): an address
    with nothing measured gets three times it, within the RTO's bounds; one with an RTT
    measured keeps that."""
    link = LinkParams(delay=0.01)
    sim = make_pair(seed=4, ab=link, ba=link)
    sim.b.tcp_listen(80)
    assert sim.a.tcp_connect("10.0.0.3", 80, sim.now, path_rtt=0.15).rto == pytest.approx(0.45)
    assert sim.a.tcp_connect("10.0.0.3", 80, sim.now, path_rtt=0.01).rto == pytest.approx(0.2)
    assert sim.a.tcp_connect("10.0.0.3", 80, sim.now, path_rtt=0.5).rto == pytest.approx(1.0)
    assert sim.a.tcp_connect("10.0.0.3", 80, sim.now, path_rtt=None).rto == pytest.approx(1.0)
    first = _connect(sim)  # (20 ms measured to 10.0.0.2)
    assert first.srtt == pytest.approx(0.02, abs=0.002)
    known = sim.a.tcp_connect("10.0.0.2", 80, sim.now, path_rtt=0.15)
    assert known.rto == pytest.approx(max(0.2, first.srtt + 4 * first._rtt.rttvar))
    assert known.rto < 0.45  # (not the path's)


def test_a_lost_syn_to_a_new_address_goes_again_at_three_path_round_trips() -> None:
    """Nothing measured to the server; the path's bound is 40 ms (its 20 ms round trip,
    doubled: the bound need not be tight). The first SYN is lost: the second goes 0.2 s
    later -- the minimum RTO, above three times 40 ms -- not 1 s; the connection opens
    with the initial window after it (timestamps show the loss, which RFC 5681 §3.1
    answers with one segment)."""
    link = LinkParams(delay=0.01)
    sim = make_pair(seed=5, ab=link, ba=link)
    sim.b.tcp_listen(80)
    syns = drop_the_first_syn(sim)
    sock = sim.a.tcp_connect("10.0.0.2", 80, sim.now, path_rtt=0.04)
    start = sim.now
    assert sim.run_until(lambda: sock.state is TcpState.ESTABLISHED, 5.0)
    assert len(syns) == 2 and syns[1] - start == pytest.approx(0.2)
    assert sock.stats.syn_timeouts == 1 and sock._syn_retries == 0
    assert sock.cwnd == sock.mss  # (the echo shows the first SYN was lost)
    assert sock.srtt == pytest.approx(0.02, abs=0.002)
