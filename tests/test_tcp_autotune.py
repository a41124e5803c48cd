"""Receive- and send-buffer autotuning (TcpSocket._rcv_space_adjust, send_space).

Playbook tests pin the growth rules to exact numbers; a simulator run at 100 ms RTT shows the
window growing and the transfer finishing sooner than with a fixed buffer; a tracemalloc
measurement keeps idle connections small.
"""

from __future__ import annotations

import gc
import random
import tracemalloc

from test_sim import run_transfer

from mitm_wg.net.stack import Stack
from mitm_wg.net.tcp import TcpConfig, TcpSocket, TcpState
from mitm_wg.net.tcp_wire import ACK, SYN
from sim import LinkParams, Transfer, exchange, make_pair
from tcp_playbook import Pb, active, cfg, passive, seg

MiB = 1 << 20
MSS = 1000


def drs(delta: int, space: int, mss: int, cap: int) -> int:
    """The receive buffer dynamic right-sizing asks for, computed independently."""
    rcvwin = 2 * delta + 16 * mss
    rcvwin += 2 * (rcvwin * (delta - space) // space)
    return min(rcvwin, cap)


def established_receiver(config: TcpConfig, *, wscale: int | None = 7) -> tuple[Pb, int]:
    """A passive socket in ESTABLISHED at t=1.0 with timestamps; returns it and the next
    sequence number the peer sends."""
    opts: dict[str, object] = {"mss": MSS, "sack_permitted": True, "timestamp": (500, 0)}
    if wscale is not None:
        opts["wscale"] = wscale
    pb = passive(seg(SYN, 100, **opts), config, isn=5000, now=1.0)  # type: ignore[arg-type]
    synack = pb.out()[0]
    assert synack.timestamp is not None
    pb.at(1.0).send(ACK, 101, 5001, timestamp=(501, synack.timestamp[0]))
    assert pb.sock.state is TcpState.ESTABLISHED
    return pb, 101


def deliver_round(pb: Pb, seq: int, n_segments: int, tsecr: int) -> tuple[int, int]:
    """The peer sends ``n_segments`` full segments echoing ``tsecr``; the application reads
    everything; returns (next seq, TSval of the last ACK we sent)."""
    for i in range(n_segments):
        pb.send(ACK, seq, 5001, payload=bytes(MSS), timestamp=(600 + i, tsecr))
        seq += MSS
    got = 0
    while data := pb.sock.recv(1 << 20):
        got += len(data)
    assert got == n_segments * MSS
    acks = pb.out()
    assert acks and acks[-1].timestamp is not None
    return seq, acks[-1].timestamp[0]


def test_syn_offers_the_window_scale_of_the_cap() -> None:
    """RFC 7323 §2.2: the shift is fixed in the SYN, so it must already fit the cap."""
    syn = active(cfg(recv_buffer=65535, recv_buffer_max=8 * MiB)).out()[0]
    assert syn.wscale == 8  # 0xFFFF << 8 covers 8 MiB (<< 7 falls 128 bytes short)
    assert syn.window == 65535
    syn = active(cfg(recv_buffer=65535, recv_buffer_max=6 * MiB)).out()[0]
    assert syn.wscale == 7
    # no autotuning: the starting buffer decides, as before
    assert active(cfg(recv_buffer=65535)).out()[0].wscale == 0


def test_receive_buffer_grows_per_rtt_with_what_the_application_read() -> None:
    cap = MiB
    pb, seq = established_receiver(cfg(recv_buffer=64_000, recv_buffer_max=cap))
    sock = pb.sock
    assert sock.recv_buffer == 64_000
    tsecr = 1000  # TSval of our SYN-ACK at t=1.0 (timestamp offset 0)
    space, buf = 10 * MSS, 64_000
    for k, n in enumerate((20, 40, 80, 160, 320, 400)):
        # one RTT (125 ms) after the ACK the peer echoes, its next flight arrives
        pb.at(1.125 + 0.125 * k)
        seq, tsecr = deliver_round(pb, seq, n, tsecr)
        # every sample spans exactly one RTT (the state is dropped once the cap is reached)
        assert sock._drs is None or sock._drs.rtt == 0.125
        delta = n * MSS
        if buf < cap and delta > space:
            buf = max(buf, drs(delta, space, MSS, cap))
            space = delta
        assert sock.recv_buffer == buf, k
    assert buf == cap and sock._drs is None  # reached the cap, and stops there
    # the window we advertise is the (scaled) free space of the grown buffer
    pb.at(2.0)
    for i in range(2):  # two full segments: ACKed at once
        pb.send(ACK, seq, 5001, payload=bytes(MSS), timestamp=(700 + i, tsecr))
        seq += MSS
    ack = pb.out()
    assert ack and sock._rcv_wscale == 5  # chosen in the SYN-ACK for the 1 MiB cap
    # the free space, to the scale's granularity (rounded up: the right edge never shrinks)
    assert abs((ack[-1].window << 5) - (cap - 2 * MSS)) < 32


def test_first_growth_matches_linux_rule() -> None:
    """Twice what was read, 16 segments of cushion, and twice the growth over the previous RTT
    on top (slow start doubles the sender's flight each round)."""
    pb, seq = established_receiver(cfg(recv_buffer=64_000, recv_buffer_max=8 * MiB))
    pb.at(1.125)
    deliver_round(pb, seq, 20, 1000)
    # delta 20000 > space 10000: (40000 + 16000) + 2 * 56000 * (20000 - 10000) // 10000
    assert pb.sock.recv_buffer == 168_000


def test_no_growth_for_a_slow_reader() -> None:
    """Growth follows what the application consumed, not what arrived."""
    pb, seq = established_receiver(cfg(recv_buffer=64_000, recv_buffer_max=8 * MiB))
    sock = pb.sock
    tsecr = 1000
    for k in range(6):
        pb.at(1.125 + 0.125 * k)
        for i in range(8):
            pb.send(ACK, seq, 5001, payload=bytes(MSS), timestamp=(600 + i, tsecr))
            seq += MSS
        sock.recv(5 * MSS)  # reads less per RTT than the initial space (10 segments)
        acks = pb.out()
        if acks and acks[-1].timestamp is not None:
            tsecr = acks[-1].timestamp[0]
    assert sock.recv_buffer == 64_000


def test_fixed_buffer_when_cap_equals_start() -> None:
    pb, seq = established_receiver(cfg(recv_buffer=64_000, recv_buffer_max=64_000))
    tsecr = 1000
    for k, n in enumerate((20, 40, 60)):
        pb.at(1.125 + 0.125 * k)
        seq, tsecr = deliver_round(pb, seq, n, tsecr)
    assert pb.sock.recv_buffer == 64_000
    assert pb.sock._drs is None  # no tuning state, no sampling work


def test_window_stays_within_16_bits_without_window_scaling() -> None:
    pb, seq = established_receiver(cfg(recv_buffer=64_000, recv_buffer_max=8 * MiB), wscale=None)
    tsecr = 1000
    for k, n in enumerate((20, 40, 60)):
        pb.at(1.125 + 0.125 * k)
        seq, tsecr = deliver_round(pb, seq, n, tsecr)
    assert pb.sock.recv_buffer > 64_000  # the buffer may grow...
    pb.at(2.0).send(ACK, seq, 5001, payload=bytes(MSS), timestamp=(900, tsecr))
    acks = pb.out() or []
    pb.sock.recv(1 << 20)
    acks += pb.out()
    assert acks and all(a.window <= 0xFFFF for a in acks)  # ...the window field cannot


def test_send_buffer_grows_with_the_congestion_window() -> None:
    """2 x min(cwnd, largest peer window), only growing, capped."""
    config = cfg(send_buffer=8192, send_buffer_max=40_000)
    pb = active(config, now=1.0)
    syn = pb.out()[0]
    assert syn.timestamp is not None
    pb.send(
        SYN | ACK,
        7000,
        1001,
        window=65535,
        mss=MSS,
        wscale=2,
        sack_permitted=True,
        timestamp=(50, syn.timestamp[0]),
    )
    sock = pb.sock
    assert sock.state is TcpState.ESTABLISHED
    cwnd = sock.cwnd
    assert sock.send_space == 2 * cwnd  # initial window 10 x 988 (MSS less timestamps)
    assert sock.send_buffer == 2 * cwnd
    assert sock.send(bytes(30_000)) == 2 * cwnd
    out = pb.out()
    sent = sum(len(s.payload) for s in out)
    pb.at(1.1).send(ACK, 7001, 1001 + sent, window=65535 >> 2, timestamp=(60, 1100))
    # slow start grew cwnd by what was acked; the buffer follows, up to the cap
    assert sock.cwnd > cwnd
    assert sock.send_space == min(2 * sock.cwnd, 40_000) - (2 * cwnd - sent)
    assert sock.send_buffer == min(2 * sock.cwnd, 40_000)


def test_send_buffer_bounded_by_the_peer_window() -> None:
    config = cfg(send_buffer=8192, send_buffer_max=8 * MiB)
    pb = active(config, now=1.0)
    syn = pb.out()[0]
    assert syn.timestamp is not None
    pb.send(SYN | ACK, 7000, 1001, window=3000, mss=MSS, timestamp=(50, syn.timestamp[0]))
    assert pb.sock.send_space == 8192  # 2 x 3000 < the starting size: stays
    assert pb.sock.send_buffer == 8192


# -- simulator ------------------------------------------------------------------------------


def _long_rtt_transfer(
    config: TcpConfig, bandwidth: float = 40e6, size: int = 16 * MiB
) -> tuple[float, int, int]:
    # 100 ms RTT behind a bottleneck (by default 40 MB/s: a bandwidth-delay product of 4 MB,
    # four times the fixed buffer) with a queue deep enough never to drop
    link = LinkParams(delay=0.05, bandwidth=bandwidth, queue_bytes=16 * MiB)
    sim = make_pair(seed=3, ab=link, ba=LinkParams(delay=0.05), tcp_config=config)
    data = random.Random(3).randbytes(size)
    tr = Transfer(sim, data, b"", chunk=1 << 20)
    peak = [0]

    def watch(now: float) -> None:
        if tr.server is not None:
            peak[0] = max(peak[0], tr.server.recv_buffer)

    sim.apps.append(watch)
    tr.start()
    finished = sim.run_until(lambda: len(tr.got_ab) == len(data) or tr.failure() is not None, 60)
    assert finished and tr.failure() is None, tr.report()
    assert bytes(tr.got_ab) == data
    assert tr.client is not None
    return sim.now, peak[0], tr.client.send_buffer


def test_simulated_100ms_rtt_window_grows_and_transfer_is_faster() -> None:
    """16 MiB over a 100 ms RTT, no loss (virtual time). With a fixed 1 MiB receive buffer
    the transfer is capped at 1 MiB per RTT; autotuning grows both buffers past that."""
    fixed_t, fixed_peak, fixed_sbuf = _long_rtt_transfer(
        TcpConfig(recv_buffer_max=MiB, send_buffer_max=MiB)
    )
    auto_t, auto_peak, auto_sbuf = _long_rtt_transfer(TcpConfig())
    assert fixed_peak == MiB and fixed_sbuf == MiB
    assert auto_peak > 2 * MiB, auto_peak
    assert auto_sbuf > 2 * MiB, auto_sbuf
    assert auto_t < 0.8 * fixed_t, (auto_t, fixed_t)


def test_simulated_100ms_rtt_download_outgrows_a_4_mib_receive_buffer() -> None:
    """60 MB/s at 100 ms RTT from a sender whose send buffer is no cap (a server with a
    raised tcp_wmem, as bench_path's --server-sysctl sets it): the receiver's window must
    hold 6 MB. Capped at 4 MiB it held the transfer to 4 MiB per RTT; the default cap
    (8 MiB) lets it fill the path (virtual time: the runs replay exactly)."""
    assert TcpConfig().recv_buffer_max == 8 * MiB
    unlimited_sender = 32 * MiB
    t4, peak4, _ = _long_rtt_transfer(
        TcpConfig(send_buffer_max=unlimited_sender, recv_buffer_max=4 * MiB), 60e6, 64 * MiB
    )
    t8, peak8, _ = _long_rtt_transfer(TcpConfig(send_buffer_max=unlimited_sender), 60e6, 64 * MiB)
    assert peak4 == 4 * MiB and peak8 == 8 * MiB, (peak4, peak8)
    assert t8 < 0.9 * t4, (t8, t4)


def test_simulated_100ms_rtt_upload_outgrows_a_4_mib_send_buffer() -> None:
    """60 MB/s at 100 ms RTT to a receiver with a 32 MiB window (Linux's tcp_rmem in
    bench_path): BBR keeps 2 BDPs (12 MB) in flight at most and the send buffer wants twice
    its window; capped at 4 MiB the upload could not fill the path, the default cap (8 MiB)
    goes further (virtual time: the runs replay exactly)."""

    def upload(config: TcpConfig) -> tuple[float, int]:
        link = LinkParams(delay=0.05, bandwidth=60e6, queue_bytes=16 * MiB)
        tr = run_transfer(
            3, 32 * MiB, 0, timeout=120.0, ab=link, ba=LinkParams(delay=0.05), tcp_config=config
        )
        assert tr.client is not None
        return tr.sim.now, tr.client.send_buffer

    assert TcpConfig().send_buffer_max == 8 * MiB
    t4, sbuf4 = upload(TcpConfig(recv_buffer_max=32 * MiB, send_buffer_max=4 * MiB))
    t8, sbuf8 = upload(TcpConfig(recv_buffer_max=32 * MiB))
    assert sbuf4 == 4 * MiB and sbuf8 == 8 * MiB
    assert t8 < 0.95 * t4, (t8, t4)


# -- memory ---------------------------------------------------------------------------------


def test_1000_idle_connections_stay_small() -> None:
    """Autotuning state adds no per-connection allocation: after a short exchange, 1000
    idle connections (both ends) cost <= 16 KiB per endpoint."""
    n = 1000
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        a = Stack(["10.0.0.1/24"], mtu=1420)
        b = Stack(["10.0.0.2/24"], mtu=1420)
        now = 1.0
        lst = b.tcp_listen(80, backlog=n + 8)
        clients: list[TcpSocket] = [a.tcp_connect("10.0.0.2", 80, now) for _ in range(n)]
        servers: list[TcpSocket] = []

        def pump(rounds: int) -> None:
            nonlocal now
            for _ in range(rounds):
                now += 0.05
                exchange(a, b, now)
                while (s := lst.accept()) is not None:
                    servers.append(s)

        pump(5)
        assert len(servers) == n
        for c in clients:  # a request and a response each way, read completely
            c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        pump(3)
        for s in servers:
            s.recv(1 << 16)
            s.send(bytes(2000))
        pump(3)
        for c in clients:
            assert len(c.recv(1 << 16)) == 2000
        pump(10)  # delayed ACKs out, everything idle
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    used = sum(st.size_diff for st in after.compare_to(before, "filename"))
    per_endpoint = used / (2 * n)
    print(f"{per_endpoint:.0f} bytes per idle endpoint")
    assert per_endpoint <= 16 * 1024, f"{per_endpoint:.0f} bytes per idle endpoint"
    assert all(c.state is TcpState.ESTABLISHED for c in clients)


def test_rtt_is_the_minimum_sample() -> None:
    """A backlog in our own receive path inflates later samples; the base RTT is kept."""
    pb, seq = established_receiver(cfg(recv_buffer=64_000, recv_buffer_max=8 * MiB))
    sock = pb.sock
    pb.at(1.125)
    pb.send(ACK, seq, 5001, payload=bytes(MSS), timestamp=(600, 1000))
    assert sock._drs is not None and sock._drs.rtt == 0.125
    pb.at(1.5)  # echo of an ACK sent at 1.125: 375 ms, queueing included
    pb.send(ACK, seq + MSS, 5001, payload=bytes(MSS), timestamp=(601, 1125))
    assert sock._drs.rtt == 0.125
    pb.at(1.6)  # 100 ms: smaller, taken
    pb.send(ACK, seq + 2 * MSS, 5001, payload=bytes(MSS), timestamp=(602, 1500))
    assert sock._drs.rtt == 0.1
    pb.at(1.7)  # short segments give no sample
    pb.send(ACK, seq + 3 * MSS, 5001, payload=bytes(10), timestamp=(603, 1650))
    assert sock._drs.rtt == 0.1


def test_a_burst_read_after_a_stall_counts_per_rtt() -> None:
    """The application reads four RTTs' worth at once: growth follows the rate (bytes per
    RTT), not the burst."""
    pb, seq = established_receiver(cfg(recv_buffer=64_000, recv_buffer_max=8 * MiB))
    pb.at(1.125)
    pb.send(ACK, seq, 5001, payload=bytes(MSS), timestamp=(600, 1000))  # RTT sample 125 ms
    seq += MSS
    pb.out()
    pb.at(1.5)  # 4 RTTs after the measurement began (t=1.0)
    for i in range(59):
        pb.send(ACK, seq, 5001, payload=bytes(MSS), timestamp=(601 + i, 1125))
        seq += MSS
    while pb.sock.recv(1 << 20):
        pass
    # 60000 bytes over 0.5 s = 15000 per RTT: (2 x 15000 + 16 x 1000) + 2 x 46000 x 5000 // 10000
    assert pb.sock.recv_buffer == 92_000
