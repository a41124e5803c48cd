"""Whole stacks talking TCP over the simulated, impaired link (tests/sim.py).

Every failure message starts with the seed and the link mix (``Sim.describe``), so a case
can be replayed with ``make_pair(seed=..., ab=LinkParams(...), ba=LinkParams(...))``.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mitm_wg.net import tcp as tcp_module
from mitm_wg.net.tcp import TcpConfig, TcpSocket, TcpState, TcpStats
from sim import LinkParams, Sim, Transfer, make_pair

MiB = 1 << 20

DETERMINISTIC = settings(
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: the report names seed and mix
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def payload(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def run_transfer(
    sim_seed: int,
    n_ab: int,
    n_ba: int,
    *,
    timeout: float,
    v6: bool = False,
    ab: LinkParams | None = None,
    ba: LinkParams | None = None,
    tcp_config: TcpConfig | None = None,
    **kw: object,
) -> Transfer:
    sim = make_pair(seed=sim_seed, v6=v6, ab=ab, ba=ba, tcp_config=tcp_config)
    data_ab, data_ba = payload(sim_seed, n_ab), payload(sim_seed + 1, n_ba)
    tr = Transfer(sim, data_ab, data_ba, **kw)  # type: ignore[arg-type]
    ok = tr.run(timeout)
    assert ok and tr.failure() is None, tr.report()
    assert bytes(tr.got_ab) == tr.data_ab, tr.report()
    assert bytes(tr.got_ba) == tr.data_ba, tr.report()
    return tr


def test_clean_transfer_1mib_each_way() -> None:
    tr = run_transfer(1, MiB, MiB, timeout=30.0)
    sim = tr.sim
    assert sim.now < 10.0, tr.report()  # 10 ms one-way delay, no loss: a few seconds at most
    assert sim.a.stats.dropped == sim.b.stats.dropped == 0
    # Both ends go away: the client (first to close? either way) ends CLOSED or TIME_WAIT,
    # and after TIME_WAIT every socket is reaped from both stacks.
    sim.run_for(5.0)
    assert sim.a.tcp_sockets == [] and sim.b.tcp_sockets == [], tr.report()


def test_ipv6_transfer() -> None:
    tr = run_transfer(2, 300_000, 200_000, timeout=30.0, v6=True)
    assert tr.client is not None and len(tr.client.remote_addr) == 16


link_params = st.builds(
    LinkParams,
    delay=st.sampled_from([0.0005, 0.01, 0.05, 0.1]),
    jitter=st.sampled_from([0.0, 0.005]),
    loss=st.sampled_from([0.0, 0.01, 0.03, 0.06]),
    reorder=st.sampled_from([0.0, 0.02, 0.1]),
    duplicate=st.sampled_from([0.0, 0.01, 0.05]),
    corrupt=st.sampled_from([0.0, 0.01, 0.03]),
    bandwidth=st.sampled_from([None, 1e6, 4e6]),
    queue_bytes=st.sampled_from([32 * 1024, 256 * 1024]),
)


@settings(DETERMINISTIC, max_examples=25)
@given(seed=st.integers(0, 2**32 - 1), ab=link_params, ba=link_params)
def test_property_transfer_impaired(seed: int, ab: LinkParams, ba: LinkParams) -> None:
    tr = run_transfer(seed, MiB, MiB, timeout=120.0, ab=ab, ba=ba)
    check_corruption_counted(tr)


tcp_configs = st.builds(
    TcpConfig,
    sack=st.booleans(),
    timestamps=st.booleans(),
    window_scaling=st.booleans(),
    congestion=st.sampled_from(["newreno", "cubic"]),
    nagle=st.booleans(),
)


@pytest.mark.slow
@settings(DETERMINISTIC, max_examples=100)
@given(
    seed=st.integers(0, 2**32 - 1),
    ab=link_params,
    ba=link_params,
    v6=st.booleans(),
    cfg=tcp_configs,
)
def test_property_transfer_impaired_more(
    seed: int, ab: LinkParams, ba: LinkParams, v6: bool, cfg: TcpConfig
) -> None:
    tr = run_transfer(seed, MiB, MiB, timeout=120.0, ab=ab, ba=ba, v6=v6, tcp_config=cfg)
    if not v6:
        check_corruption_counted(tr)


def check_corruption_counted(tr: Transfer) -> None:
    """Every corrupted IPv4 packet is caught by a checksum (or a length check) and counted."""
    sim = tr.sim
    sim.run_for(2.0)  # let corrupted packets still in flight arrive
    corrupted = sum(link.stats.corrupted for link in sim.links)
    dropped = sim.a.stats.dropped + sim.b.stats.dropped
    assert dropped == corrupted, tr.report()


def test_heavy_corruption_is_caught() -> None:
    mix = LinkParams(corrupt=0.2)
    tr = run_transfer(7, 200_000, 200_000, timeout=120.0, ab=mix, ba=mix)
    assert sum(link.stats.corrupted for link in tr.sim.links) > 20
    check_corruption_counted(tr)


def test_connection_refused() -> None:
    sim = make_pair(seed=3)
    sock = sim.a.tcp_connect("10.0.0.2", 81, sim.now)
    assert sim.run_until(lambda: sock.error is not None, 5.0), sim.describe()
    assert isinstance(sock.error, ConnectionRefusedError)
    assert sock.state is TcpState.CLOSED
    assert sim.b.stats.rst_sent == 1
    sim.run_for(0.1)
    assert sim.a.tcp_sockets == []


def test_connect_timeout_when_peer_silent() -> None:
    sim = make_pair(seed=4, ab=LinkParams(loss=1.0), tcp_config=TcpConfig(syn_retries=2))
    sock = sim.a.tcp_connect("10.0.0.2", 80, sim.now)
    assert sim.run_until(lambda: sock.error is not None, 60.0), sim.describe()
    assert isinstance(sock.error, TimeoutError)
    assert sim.links[0].stats.sent == 3  # SYN + 2 retries


def test_mtu_lowered_by_middle_box() -> None:
    mix = LinkParams(mtu=1000, icmp_router="192.0.2.1")
    tr = run_transfer(5, 300_000, 300_000, timeout=60.0, ab=mix, ba=mix)
    sim = tr.sim
    assert sim.a.path_mtu("10.0.0.2") == 1000
    assert sim.b.path_mtu("10.0.0.1") == 1000
    too_big = sim.links[0].stats.too_big + sim.links[1].stats.too_big
    assert 0 < too_big < 50, tr.report()  # a handful of probes, not one per segment


def test_mtu_lowered_by_middle_box_v6() -> None:
    mix = LinkParams(mtu=1300, icmp_router="fd00::ff")
    tr = run_transfer(6, 200_000, 10_000, timeout=60.0, ab=mix, v6=True)
    assert tr.sim.a.path_mtu("fd00::2") == 1300


def test_zero_window_stalled_reader_resumes() -> None:
    cfg = TcpConfig(send_buffer=64 * 1024, recv_buffer=64 * 1024)
    stall_until = 5.0
    tr = run_transfer(
        8,
        600_000,
        1000,
        timeout=60.0,
        tcp_config=cfg,
        read_gate_b=lambda now: now >= stall_until,
    )
    assert tr.sim.now > stall_until
    assert tr.client is not None
    assert tr.client.stats.zero_window_probes > 0, tr.report()


def test_100_concurrent_connections() -> None:
    sim = make_pair(seed=9, ab=LinkParams(loss=0.01), ba=LinkParams(loss=0.01))
    lst = sim.b.tcp_listen(80, backlog=128)
    n = 100
    clients = [sim.a.tcp_connect("10.0.0.2", 80, sim.now) for _ in range(n)]
    assert len({c.local_port for c in clients}) == n
    servers = []
    received: dict[int, bytearray] = {}
    echo_done: set[int] = set()

    def server_app(now: float) -> None:
        while (s := lst.accept()) is not None:
            servers.append(s)
        for s in servers:
            data = s.recv(65536)
            if data:
                received.setdefault(s.remote_port, bytearray()).extend(data)
                assert s.send(data) == len(data)
            if s.at_eof and s.remote_port not in echo_done:
                s.close(now)
                echo_done.add(s.remote_port)

    replies: dict[int, bytearray] = {c.local_port: bytearray() for c in clients}
    msgs = {c.local_port: payload(c.local_port, 20_000) for c in clients}
    sent: dict[int, int] = dict.fromkeys(msgs, 0)

    def client_app(now: float) -> None:
        for c in clients:
            p = c.local_port
            if c.state is TcpState.SYN_SENT:
                continue
            if sent[p] < len(msgs[p]):
                sent[p] += c.send(msgs[p][sent[p] :])
                if sent[p] == len(msgs[p]):
                    c.shutdown_write(now)
            chunk = c.recv(65536)
            if chunk:
                replies[p].extend(chunk)
            if c.at_eof and c.state is TcpState.CLOSE_WAIT:
                c.close(now)

    sim.apps += [server_app, client_app]

    def all_done() -> bool:
        return all(
            bytes(replies[p]) == msgs[p] and c.state in (TcpState.CLOSED, TcpState.TIME_WAIT)
            for p, c in ((c.local_port, c) for c in clients)
        )

    assert sim.run_until(all_done, 120.0), sim.describe()
    assert all(bytes(received[p]) == msgs[p] for p in msgs)
    sim.run_for(10.0)
    assert sim.a.tcp_sockets == [] and sim.b.tcp_sockets == []


# -- the simulator itself ---------------------------------------------------------------


def test_same_seed_replays_exactly() -> None:
    mix = LinkParams(loss=0.03, reorder=0.05, duplicate=0.02, corrupt=0.02, jitter=0.004)

    def once() -> tuple[object, ...]:
        tr = run_transfer(99, 200_000, 100_000, timeout=60.0, ab=mix, ba=mix)
        return (tr.sim.now, [vars(link.stats) for link in tr.sim.links])

    first = once()
    assert first == once()
    assert first[1][0]["lost"] > 0  # type: ignore[index]


def test_link_bandwidth_queue_and_delay() -> None:
    sim = make_pair(seed=1, ab=LinkParams(delay=0.02, bandwidth=100_000.0, queue_bytes=5_000))
    rx = sim.b.udp_bind(9)
    tx = sim.a.udp_bind(family=4)
    for _ in range(10):
        tx.sendto(bytes(972), ("10.0.0.2", 9), sim.now)  # 1000-byte IP packets
    assert sim.run_until(lambda: rx.pending == 6, 1.0)
    # 1 packet on the wire + 5 queued (5000 bytes); the rest tail-dropped.
    assert sim.links[0].stats.queue_drops == 4
    assert abs(sim.now - (0.02 + 6 * 1000 / 100_000)) < 1e-9
    sim.run_for(1.0)
    assert rx.pending == 6


def test_link_mtu_drop_without_router() -> None:
    sim = make_pair(seed=1, ab=LinkParams(mtu=1000))
    rx = sim.b.udp_bind(9)
    tx = sim.a.udp_bind(family=4)
    tx.sendto(bytes(1000), ("10.0.0.2", 9), sim.now)
    tx.sendto(bytes(900), ("10.0.0.2", 9), sim.now)
    sim.run_for(0.5)
    assert sim.links[0].stats.too_big == 1
    assert rx.pending == 1 and sim.a.path_mtu("10.0.0.2") == 1420  # silent black hole


@pytest.mark.parametrize("seed", [0, 1])
def test_pmtu_shrinks_mid_transfer_with_loss_and_stalling_reader(seed: int) -> None:
    sim = make_pair(
        seed=seed,
        ab=LinkParams(loss=0.05, reorder=0.05, delay=0.02),
        ba=LinkParams(loss=0.05, delay=0.02),
        tcp_config=TcpConfig(send_buffer=32768, recv_buffer=32768),
    )

    def routers(now: float) -> None:  # the path changes under the running connection
        if now > 0.1:
            sim.links[0].params.mtu = 1000 if now < 0.3 else 700
            sim.links[1].params.mtu = 1100
            sim.links[0].params.icmp_router = sim.links[1].params.icmp_router = "192.0.2.1"

    sim.apps.append(routers)
    tr = Transfer(
        sim,
        payload(seed, 600_000),
        payload(seed + 1, 400_000),
        # the server stops reading now and then (100 ms of every 300)
        read_gate_b=lambda now: int(now * 10) % 3 != 1,
    )
    assert tr.run(200.0) and tr.failure() is None, tr.report()
    assert bytes(tr.got_ab) == tr.data_ab and bytes(tr.got_ba) == tr.data_ba, tr.report()
    assert sim.a.path_mtu("10.0.0.2") == 700 and sim.b.path_mtu("10.0.0.1") == 1100


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_silent_mtu_black_hole_costs_three_timeouts_not_the_transfer(seed: int) -> None:
    """The path drops packets over 1300 bytes without an ICMP error (a narrower link whose
    errors a firewall drops): after three timeouts in a row the sender's segments fit
    ``blackhole_mtu`` and the upload ends byte-exact (without the rule it never did)."""
    sim = make_pair(seed=seed, ab=LinkParams(delay=0.02, mtu=1300), ba=LinkParams(delay=0.02))
    tr = Transfer(sim, payload(seed, 1_000_000), b"")
    assert tr.run(60.0) and tr.failure() is None, tr.report()
    assert bytes(tr.got_ab) == tr.data_ab
    assert tr.client is not None and tr.client.stats.blackhole_shrinks == 1
    assert sim.links[0].stats.too_big > 0


def _request_and_reply(sim: Sim, reply: bytes, delay: float) -> TcpSocket:
    """A client (``sim.a``) sends a 300-byte request to port 80 of ``sim.b``, whose
    server answers with ``reply`` ``delay`` seconds after the request arrived (nothing
    more; no FIN). Returns the client's socket."""
    listener = sim.b.tcp_listen(80)
    client = sim.a.tcp_connect("10.0.0.2", 80, sim.now)
    rest = bytearray(reply)
    server: list[TcpSocket] = []
    asked: list[int] = []
    request_at: list[float] = []

    def app(now: float) -> None:
        if client.state is TcpState.ESTABLISHED and not asked:
            asked.append(client.send(b"q" * 300))
        accepted = listener.accept()
        if accepted is not None:
            server.append(accepted)
        if server and server[0].recv(65536):
            request_at.append(now)
        if request_at and now >= request_at[0] + delay and rest:
            del rest[: server[0].send(rest)]

    sim.apps.append(app)
    return client


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("hole", "late"),
    [(True, False), (True, True), (False, True)],
    ids=["black-hole", "black-hole-late-reply", "slow-server"],
)
def test_a_reply_lost_whole_in_a_black_hole_shows_at_the_receiver(
    seed: int, hole: bool, late: bool
) -> None:
    """The way back drops packets over 1300 bytes without an ICMP error, and the server
    answers a small request with full-sized segments only: nothing arrives at the client,
    as from a slow server (which sends nothing). What the server's ACKs say (its
    SND.NXT, beyond what came: ``data_vanished``) tells the two apart: the ACK of the
    client's resent request, when the reply came at once (the first ACK rode on it), or,
    when the reply came after the request's own ACK, the answer to the stall's question
    (a keepalive's SEQ), and then the stall is reported again. Our own stack answers the
    question as Linux does."""
    sim = make_pair(
        seed=seed, ab=LinkParams(delay=0.02), ba=LinkParams(delay=0.02, mtu=1300 if hole else 1500)
    )
    client = _request_and_reply(sim, payload(seed, 200_000) if hole else b"", 0.3 if late else 0.0)
    assert sim.run_until(lambda: client.stats.rx_stalls > 0, 10.0)
    sim.run_for(0.1)  # (the answer to the stall's question; the server's own rule later)
    assert client.recv(65536) == b""
    assert client.data_vanished is hole
    assert client.stats.rx_stalls == 1
    assert client.stats.stall_probes == (0 if hole and not late else 1)
    assert sim.a.rx_stalls == [client] * (2 if hole and late else 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_stall_whose_answer_an_outage_took_is_asked_again(seed: int) -> None:
    """As above (a reply sent after the request's ACK, lost whole in a black hole), and
    the way back goes dark from the stall for 1.5 s: the answer to the stall's question
    is lost too, and nothing tells the client that data vanished. Nothing arriving still,
    the stall is reported again 2 s after the first report and the server asked again:
    its answer says data vanished, and the stall is reported once more (one stall
    counted). (The server's own rule, which would resend smaller after three timeouts, is
    off: a server of another make.)"""
    sim = make_pair(
        seed=seed,
        ab=LinkParams(delay=0.02),
        ba=LinkParams(delay=0.02, mtu=1300),
        tcp_config=TcpConfig(blackhole_rtos=0),
    )
    client = _request_and_reply(sim, payload(seed, 200_000), 0.3)
    back = sim.links[1]
    assert sim.run_until(lambda: client.stats.rx_stalls > 0, 10.0)
    stalled, params = sim.now, back.params
    back.params = dataclasses.replace(params, loss=1.0)
    sim.run_for(1.5)
    assert not client.data_vanished and sim.a.rx_stalls == [client]
    back.params = params
    assert sim.run_until(lambda: client.data_vanished, 5.0)
    assert sim.now - stalled == pytest.approx(2.0, abs=0.1)
    assert client.recv(65536) == b""
    assert client.stats.rx_stalls == 1 and client.stats.stall_probes == 2
    assert sim.a.rx_stalls == [client] * 3


@pytest.mark.parametrize("loss", [0.02, 0.05, 0.1])
def test_random_loss_is_no_black_hole(loss: float) -> None:
    """Random loss (up to 10 %, both ways, 50 ms) never takes the path for an MTU black
    hole: no connection shrinks its segments."""
    for seed in range(4):
        link = LinkParams(delay=0.025, loss=loss)
        sim = make_pair(seed=seed, ab=link, ba=link)
        tr = Transfer(sim, payload(seed, 1_000_000), payload(seed + 1, 300_000))
        assert tr.run(300.0) and tr.failure() is None, tr.report()
        assert tr.client is not None and tr.server is not None
        assert tr.client.stats.blackhole_shrinks == tr.server.stats.blackhole_shrinks == 0


def test_sim_receiver_holds_what_a_slow_start_overshoot_leaves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sender's slow start overflows a bottleneck's queue (10 MB/s, 50 ms, 256 KiB; NewReno
    without HyStart++): the queue drops every other segment for a while, hundreds of
    ranges ahead of the receiver's in-order point. The receiver holds them all (every
    segment it dropped is a copy of data it held, reported by D-SACK); with the old cap of
    64 ranges it dropped hundreds that had arrived, and the sender sent them again."""
    ab = LinkParams(delay=0.025, bandwidth=10e6, queue_bytes=256 * 1024)
    config = TcpConfig(congestion="newreno", hystart=False)

    def upload() -> tuple[int, TcpStats]:
        tr = run_transfer(
            1, 8 << 20, 0, timeout=120.0, ab=ab, ba=LinkParams(delay=0.025), tcp_config=config
        )
        assert tr.server is not None
        return tr.sim.links[0].stats.queue_drops, tr.server.stats

    drops, stats = upload()
    assert drops > 100
    assert stats.ofo_drops == 0 and stats.dropped == stats.dsacks_out, stats

    class Capped(tcp_module.Assembler):
        def __init__(self, max_ranges: int = 64) -> None:
            super().__init__(64)

    monkeypatch.setattr(tcp_module, "Assembler", Capped)
    _drops, capped = upload()
    assert capped.ofo_drops > 100


@pytest.mark.parametrize("congestion", ["newreno", "bbr"])
def test_sim_sender_resends_only_what_an_overshoot_dropped(
    congestion: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same overshoot from the sender's side: its SACK scoreboard must remember every
    range the receiver reports (hundreds, with every other segment lost), or it resends
    data that had arrived. With the old cap of 64 ranges it resent hundreds (D-SACKed)."""
    ab = LinkParams(delay=0.025, bandwidth=10e6, queue_bytes=256 * 1024)
    config = TcpConfig(congestion=congestion, hystart=False)

    def upload() -> tuple[int, TcpStats, TcpStats]:
        tr = run_transfer(
            1, 8 << 20, 0, timeout=120.0, ab=ab, ba=LinkParams(delay=0.025), tcp_config=config
        )
        assert tr.client is not None and tr.server is not None
        return tr.sim.links[0].stats.queue_drops, tr.client.stats, tr.server.stats

    drops, client, server = upload()
    assert drops > 100
    assert client.retransmits == drops and server.dsacks_out == client.dsacks == 0

    init = tcp_module.TcpSocket.__init__

    def capped(self: tcp_module.TcpSocket, *args: object, **kw: object) -> None:
        init(self, *args, **kw)  # type: ignore[arg-type]
        self._sacked_max = 64

    monkeypatch.setattr(tcp_module.TcpSocket, "__init__", capped)
    drops, client, _server = upload()
    assert client.retransmits - drops > 100 and client.dsacks > 100


@pytest.mark.parametrize("congestion", ["bbr", "cubic"])
def test_sim_without_sack_an_overshoot_costs_an_rto_not_a_round_trip_per_hole(
    congestion: str,
) -> None:
    """A peer without SACK: recovery is NewReno's (RFC 6582), one hole per round trip. A
    slow-start overshoot into a bottleneck's queue (12.5 MB/s, 50 ms, 610 KiB) leaves
    hundreds of holes; with the RTO restarted by every partial ACK (and every resend of
    the head) 6 MiB took 26 s of simulated time (BBR; CUBIC 12 s: fewer holes), one round
    trip per hole. Restarted by the first few partial ACKs (TcpConfig.newreno_rto_restarts) only, the RTO
    ends it and goes back N in slow start (with SACK: 1 s)."""
    ab = LinkParams(delay=0.025, bandwidth=12.5e6, queue_bytes=625_000)
    config = TcpConfig(congestion=congestion, sack=False)
    tr = run_transfer(
        1, 6 << 20, 0, timeout=120.0, ab=ab, ba=LinkParams(delay=0.025), tcp_config=config
    )
    assert tr.client is not None
    stats = tr.client.stats
    assert tr.sim.links[0].stats.queue_drops > 100  # hundreds of holes
    assert stats.fast_retransmits >= 1 and stats.rto_expired >= 1, stats
    assert tr.sim.now < 4.0, tr.report()
