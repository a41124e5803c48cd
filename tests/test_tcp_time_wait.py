"""Reusing 4-tuples the peer still holds in TIME_WAIT (issue 8 part 2).

Three rules, each with its playbook (segments in -> exact segments out) and a simulator run
of many sequential short connections where the server closes first:

* TCP timestamps monotonic towards a host across connections (RFC 7323 §5.4): one offset per
  address pair, so a SYN reusing a 4-tuple in the peer's TIME_WAIT passes PAWS (RFC 6191);
* ephemeral ports avoid 4-tuples closed less than RECENT_TUPLE_SECONDS ago (the peer's 2MSL)
  while ports allow, then reuse the one closed longest ago;
* in SYN_SENT an unacceptable ACK (the peer's TIME_WAIT answering our SYN) gets
  <SEQ=SEG.ACK><CTL=RST> (RFC 9293 §3.10.7.3) and our SYN again at once, bounded.

Our own stack plays the server with a Linux-like 60 s TIME_WAIT; it implements RFC 6191 too
(a SYN with a newer timestamp ends its TIME_WAIT), as Linux's tcp_timewait_state_process does.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import random
from collections.abc import Callable

import pytest

from mitm_wg.net.stack import RECENT_TUPLE_SECONDS, Stack
from mitm_wg.net.tcp import SYN_FAST_RETRIES, TcpConfig, TcpSocket, TcpState
from mitm_wg.net.tcp_wire import ACK, RST, SYN, TcpSegment, parse_tcp
from sim import Sim
from tcp_playbook import LOCAL, LPORT, REMOTE, RPORT, Pb, active, cfg, seg

ISS = 1000
PISS = 9000
M32 = 0xFFFFFFFF


def o(flags: int, seq: int, ack: int = 0, **kw: object) -> TcpSegment:
    """A segment the socket under test sends."""
    return seg(flags, seq, ack, src=LPORT, dst=RPORT, **kw)  # type: ignore[arg-type]


def syn_opts(ts: int) -> dict[str, object]:
    return {"window": 65535, "mss": 1000, "wscale": 0, "sack_permitted": True, "timestamp": (ts, 0)}


# -- SYN_SENT: RST for an unacceptable ACK, then the SYN again at once ------------------------


def test_unacceptable_ack_in_syn_sent_gets_rst_and_the_syn_again_at_once() -> None:
    pb = active(cfg())
    pb.expect([o(SYN, ISS, **syn_opts(0))])
    # The peer's TIME_WAIT for this 4-tuple rejects our SYN (PAWS) and ACKs its old state.
    pb.at(0.05).send(ACK, 777_000, 555_000, timestamp=(4242, 17))
    assert pb.sock.state is TcpState.SYN_SENT
    # RFC 9293 §3.10.7.3: <SEQ=SEG.ACK><CTL=RST> (it ends the TIME_WAIT), then the same SYN
    pb.expect([o(RST, 555_000, 0, window=0), o(SYN, ISS, **syn_opts(50))])
    st = pb.sock.stats
    assert (st.syn_fast_retries, st.retransmits, st.syn_timeouts, st.rto_expired) == (1, 1, 0, 0)
    assert pb.poll() == pytest.approx(1.05)  # a full initial RTO from the retry, no backoff
    pb.at(0.1).send(SYN | ACK, PISS, ISS + 1, mss=1000, timestamp=(900, 50))
    assert pb.sock.state is TcpState.ESTABLISHED
    assert pb.sock.srtt == pytest.approx(0.05)  # the echo of the retry's TSval
    assert pb.sock.cwnd == 10 * pb.sock.mss  # not a timeout: the initial window stays
    pb.expect([o(ACK, ISS + 1, PISS + 1, window=65535, timestamp=(100, 900))])


def test_syn_ack_with_unacceptable_ack_also_gets_rst_and_a_new_syn() -> None:
    pb = active(cfg(timestamps=False))
    pb.out()
    pb.send(SYN | ACK, PISS, 77)
    pb.expect([o(RST, 77, 0, window=0), o(SYN, ISS, window=65535, mss=1000, wscale=0,
                                          sack_permitted=True)])  # fmt: skip
    assert pb.sock.state is TcpState.SYN_SENT


def test_immediate_syn_retries_are_bounded() -> None:
    pb = active(cfg(timestamps=False))
    (syn,) = pb.out()
    rst = o(RST, 555, 0, window=0)
    for i in range(SYN_FAST_RETRIES):
        pb.at(0.01 * (i + 1)).send(ACK, 777, 555)
        pb.expect([rst, syn])
    # A peer that answers every SYN with a bad ACK cannot make us loop: RST only now ...
    t = 0.01 * SYN_FAST_RETRIES
    pb.at(t + 0.001).send(ACK, 777, 555)
    pb.expect([rst])
    assert pb.sock.stats.syn_fast_retries == SYN_FAST_RETRIES
    # ... and the RTO paces the next SYN as usual (armed by the last immediate retry).
    assert pb.poll() == pytest.approx(t + 1.0)
    pb.at(t + 1.0).expect([syn])
    assert pb.sock.stats.syn_timeouts == 1


def test_rst_with_unacceptable_ack_is_dropped_without_a_retry() -> None:
    pb = active(cfg())
    pb.out()
    pb.send(RST | ACK, 0, ISS + 7)
    pb.expect([])
    assert pb.sock.state is TcpState.SYN_SENT and pb.sock.stats.syn_fast_retries == 0


# -- timestamps: the offset the stack gives ------------------------------------------------


def test_socket_uses_the_given_timestamp_offset() -> None:
    sock = TcpSocket(cfg(), LOCAL, LPORT, REMOTE, RPORT, isn=ISS, now=2.0, ts_offset=M32 - 999)
    sock.connect(2.0)
    (syn,) = Pb(sock, 2.0).out()
    assert syn.timestamp == ((2000 + M32 - 999) & M32, 0)  # wraps modulo 2**32


# -- RFC 6191: a SYN may end our TIME_WAIT ------------------------------------------------------


def _time_wait(ts: bool) -> Pb:
    """An active-open socket that closed first and sits in TIME_WAIT (RCV.NXT = PISS+2);
    timestamps were in use if the peer's SYN-ACK had one (``ts``)."""
    pb = active(cfg(time_wait=60.0))
    pb.out()
    pb.send(SYN | ACK, PISS, ISS + 1, mss=1000, timestamp=(500, 0) if ts else None)
    pb.out()
    pb.sock.close(0.0)
    pb.out()
    pb.send(ACK | 0x01, PISS + 1, ISS + 2, timestamp=(510, 0) if ts else None)  # FIN+ACK
    assert pb.sock.state is TcpState.TIME_WAIT
    return pb


@pytest.mark.parametrize(
    ("ts_before", "syn_ts", "syn_seq", "accepted"),
    [
        (True, 511, PISS - 50_000, True),  # newer TSval: accepted whatever the sequence number
        (True, 510, PISS + 100, False),  # same TSval (not newer): no
        (True, 400, PISS + 100, False),  # older TSval (PAWS would reject it): no
        (True, None, PISS + 100, True),  # no timestamps now: the sequence number decides
        (True, None, PISS - 5, False),
        (False, None, PISS + 100, True),  # no timestamps before: sequence number above RCV.NXT
        (False, None, PISS + 2, False),
        (False, 1, PISS - 5, True),  # timestamps now but not before: accepted
    ],
)
def test_time_wait_accepts_syn_per_rfc6191(
    ts_before: bool, syn_ts: int | None, syn_seq: int, accepted: bool
) -> None:
    pb = _time_wait(ts_before)
    syn = seg(SYN, syn_seq, timestamp=(syn_ts, 0) if syn_ts is not None else None)
    assert pb.sock.time_wait_accepts_syn(syn) is accepted


# -- the stack: offsets per address pair, ephemeral ports -------------------------------------

ME = ipaddress.ip_address("10.0.0.1").packed
SRV = "10.0.0.2"
SRV_B = ipaddress.ip_address(SRV).packed


def _syn_tsval(stack: Stack, now: float) -> tuple[int, int]:
    out: list[bytes] = []
    stack.poll(now, out)
    (pkt,) = out
    s = parse_tcp(memoryview(pkt)[20:])
    assert s is not None and s.flags == SYN and s.timestamp is not None
    return s.src_port, s.timestamp[0]


def test_timestamp_offset_is_per_address_pair_and_keyed() -> None:
    s = Stack(["10.0.0.1/24"], randbytes=random.Random(1).randbytes)
    t = Stack(["10.0.0.1/24"], randbytes=random.Random(2).randbytes)
    other = ipaddress.ip_address("10.0.0.3").packed
    assert s.tcp_timestamp_offset(ME, SRV_B) == s.tcp_timestamp_offset(ME, SRV_B)
    assert s.tcp_timestamp_offset(ME, SRV_B) != s.tcp_timestamp_offset(ME, other)
    assert s.tcp_timestamp_offset(ME, SRV_B) != t.tcp_timestamp_offset(ME, SRV_B)
    # Every connection to that host carries the same offset: TSvals only grow.
    off = s.tcp_timestamp_offset(ME, SRV_B)
    seen = []
    for i in range(5):
        now = 1.0 + i * 0.25
        sock = s.tcp_connect(SRV, 80 + i % 2, now)
        _, tsval = _syn_tsval(s, now)
        assert tsval == (int(now * 1000) + off) & M32
        seen.append(tsval)
        sock.abort(now)
    assert all(0 < (b - a) & M32 < 1 << 31 for a, b in itertools.pairwise(seen))


def _connect_close(s: Stack, now: float, port: int = 80) -> int:
    sock = s.tcp_connect(SRV, port, now)
    lport = sock.local_port
    sock.abort(now)
    s.poll(now, [])
    assert sock not in s.tcp_sockets
    return lport


def test_closed_tuples_avoided_for_the_peers_2msl_while_ports_allow() -> None:
    s = Stack(["10.0.0.1/24"], randbytes=random.Random(3).randbytes)
    s.ephemeral_ports = (50000, 50003)
    assert RECENT_TUPLE_SECONDS >= 60.0  # Linux's TIME_WAIT (TCP_TIMEWAIT_LEN)
    used = [_connect_close(s, 1.0 + i) for i in range(4)]
    assert sorted(used) == [50000, 50001, 50002, 50003]  # never a recent tuple while free
    assert s.stats.tcp_port_reuses == 0
    # Every port to SRV:80 is recent now: the one closed longest ago is reused ...
    assert _connect_close(s, 10.0) == used[0]
    assert _connect_close(s, 11.0) == used[1]
    assert s.stats.tcp_port_reuses == 2
    # ... a different destination port is a different 4-tuple: no reuse needed
    assert _connect_close(s, 12.0, port=443) in used
    assert s.stats.tcp_port_reuses == 2
    # After RECENT_TUPLE_SECONDS a tuple is free again (used[2] closed at t=3).
    assert _connect_close(s, 3.0 + RECENT_TUPLE_SECONDS + 0.1) == used[2]
    assert s.stats.tcp_port_reuses == 2


def test_no_port_left_when_all_are_in_use() -> None:
    s = Stack(["10.0.0.1/24"], randbytes=random.Random(4).randbytes)
    s.ephemeral_ports = (50000, 50001)
    a = s.tcp_connect(SRV, 80, 0.0)
    b = s.tcp_connect(SRV, 80, 0.0)
    assert {a.local_port, b.local_port} == {50000, 50001}
    with pytest.raises(OSError) as e:
        s.tcp_connect(SRV, 80, 0.0)
    assert e.value.errno == errno.EADDRNOTAVAIL and "10.0.0.2:80" in str(e.value)
    s.tcp_connect(SRV, 81, 0.0)  # another 4-tuple
    a.abort(0.0)
    s.poll(0.0, [])
    assert s.tcp_connect(SRV, 80, 1.0).local_port == a.local_port  # recent, but the only one


def test_full_range_scan_finds_the_last_free_port() -> None:
    s = Stack(["10.0.0.1/24"], randbytes=random.Random(5).randbytes)
    s.ephemeral_ports = (40000, 40999)
    held = [s.tcp_connect(SRV, 80, 0.0) for _ in range(999)]
    ports = {x.local_port for x in held}
    assert len(ports) == 999
    (last,) = set(range(40000, 41000)) - ports
    assert s.tcp_connect(SRV, 80, 0.0).local_port == last


def test_ephemeral_range_validated() -> None:
    s = Stack(["10.0.0.1/24"])
    for bad in ((0, 10), (10, 9), (1000, 65536)):
        with pytest.raises(ValueError):
            s.ephemeral_ports = bad
    s.ephemeral_ports = (1024, 1024)
    assert s.ephemeral_ports == (1024, 1024)


# -- the simulator: many sequential short connections, the server closes first ---------------


def _stacks(
    client_seed: int, server_cfg: TcpConfig | None = None, ports: tuple[int, int] = (50000, 50007)
) -> tuple[Stack, Stack]:
    a = Stack(["10.0.0.1/24"], randbytes=random.Random(client_seed).randbytes)
    a.ephemeral_ports = ports
    b = Stack(
        ["10.0.0.2/24"],
        randbytes=random.Random(99).randbytes,
        tcp_config=server_cfg or TcpConfig(time_wait=60.0),  # Linux's TIME_WAIT length
    )
    return a, b


def short_connection(sim: Sim, listener: object, port: int = 80) -> TcpSocket:
    """Request, response, the server closes first, then the client; returns the client."""
    c = sim.a.tcp_connect(SRV, port, sim.now)
    c.send(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    srv: list[TcpSocket] = []

    def request_arrived() -> bool:
        if not srv:
            s = listener.accept()  # type: ignore[attr-defined]
            if s is not None:
                srv.append(s)
        return bool(srv) and srv[0].recv_available > 0

    assert sim.run_until(request_arrived, 30.0), (c, sim.describe())
    server = srv[0]
    server.recv(1000)
    server.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    server.close(sim.now)  # the server closes first: its side goes to TIME_WAIT
    assert sim.run_until(lambda: c.state is TcpState.CLOSE_WAIT, 30.0), (c, sim.describe())
    assert c.recv(1000).endswith(b"ok") and c.at_eof
    c.close(sim.now)
    assert sim.run_until(lambda: c.is_closed and server.state is TcpState.TIME_WAIT, 30.0)
    sim.flush()  # reap
    assert c not in sim.a.tcp_sockets
    return c


def _run(sim: Sim, n: int, gap: float = 0.01) -> list[TcpSocket]:
    listener = sim.b._listeners.get(80) or sim.b.tcp_listen(80, backlog=64)
    done = []
    for _ in range(n):
        done.append(short_connection(sim, listener))
        sim.run_for(gap)
    return done


def test_sequential_short_connections_reuse_time_wait_tuples_without_a_stall() -> None:
    a, b = _stacks(client_seed=7)
    sim = Sim(a, b, seed=7)
    _run(sim, 40)  # 8 ports, 40 connections: 32 SYNs land on the server's TIME_WAITs
    assert a.stats.tcp_port_reuses == 32
    # Our timestamps to the server only grow, so every one of those SYNs ended the TIME_WAIT
    # it met (RFC 6191), with no PAWS reject, no ACK to reset, no SYN timeout.
    assert b.stats.tcp_time_wait_reopens == 32
    assert a.stats.tcp_syn_fast_retries == 0
    assert a.stats.tcp_syn_timeouts == 0
    assert b.stats.rst_sent == 0 and a.stats.rst_sent == 0


def test_random_offsets_per_connection_would_fail_paws_and_the_reset_retry_saves_the_connect(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The old behaviour (a random TSval offset per connection) as a control: about half of
    the reused tuples' SYNs are older than the TIME_WAIT's TS.Recent, the server ACKs, and
    only the RST + immediate SYN keeps those connects from waiting for the RTO."""
    a, b = _stacks(client_seed=8)
    rng = random.Random(8)
    monkeypatch.setattr(a, "tcp_timestamp_offset", lambda local, remote: rng.getrandbits(32))
    sim = Sim(a, b, seed=8)
    _run(sim, 40)
    assert a.stats.tcp_port_reuses == 32
    rejected = a.stats.tcp_syn_fast_retries
    assert 5 <= rejected <= 27, rejected  # PAWS at the server's TIME_WAIT, each reset ...
    assert b.stats.tcp_time_wait_reopens == 32 - rejected  # ... and the rest reopened it
    assert a.stats.tcp_syn_timeouts == 0


def _behind(client: Callable[[int], Stack], other: Stack) -> Stack:
    """A client stack whose timestamps to SRV run between 2**29 and 2**31 - 2**29 ms behind
    ``other``'s, so every SYN of it meets a TIME_WAIT of ``other``'s with an older TSval."""
    ref = other.tcp_timestamp_offset(ME, SRV_B)
    for seed in range(1000):
        s = client(seed)
        lag = (ref - s.tcp_timestamp_offset(ME, SRV_B)) & M32
        if 1 << 29 < lag < (1 << 31) - (1 << 29):
            return s
    raise AssertionError("no seed found")


def test_another_clients_time_waits_with_newer_timestamps_do_not_stall_connects() -> None:
    """A different client with the same address (the kernel client of the interop test, a
    previous run of ours) left the server's TIME_WAITs with TSvals ahead of ours: every SYN of
    ours fails PAWS there, the server ACKs, we reset its TIME_WAIT and resend the SYN at once."""
    first, b = _stacks(client_seed=1000)
    sim = Sim(first, b, seed=9)
    _run(sim, 8)  # every port of the range now in the server's TIME_WAIT, first's TSvals

    def make(seed: int) -> Stack:
        s = Stack(["10.0.0.1/24"], randbytes=random.Random(seed).randbytes)
        s.ephemeral_ports = (50000, 50007)
        return s

    ours = _behind(make, first)
    sim.stacks = (ours, b)
    _run(sim, 8)
    assert ours.stats.tcp_syn_fast_retries == 8  # one per TIME_WAIT met
    assert ours.stats.tcp_syn_timeouts == 0  # no connect waited for the RTO
    assert b.stats.tcp_time_wait_reopens == 0  # PAWS said no every time
    # The next round meets our own TIME_WAITs: monotonic timestamps, no reset needed.
    _run(sim, 8)
    assert ours.stats.tcp_syn_fast_retries == 8
    assert b.stats.tcp_time_wait_reopens == 8
