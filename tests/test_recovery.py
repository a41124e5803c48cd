"""Fast recovery after the peer lost our session (it restarted): playbooks on virtual clocks.

The rule, split across the layers (see docs/internals.md, "Recovery when the peer lost
our session"):
- WireGuard core: ``Device.handshake_if_silent(peer, since, now, out)`` starts a handshake at
  once when nothing authenticated came from the peer since ``since`` (rate limits hold);
- TCP: ``TcpSocket.retransmit_now()`` / ``Stack.retransmit_now(to)`` resend a SYN or the
  oldest segment now instead of waiting out a backed-off timer;
- runtime: a new connection's SYN retransmit calls the first; a completed handshake the
  second. The runtime part is checked over loopback here and against wireguard-go in
  tests/test_recovery_interop.py.
"""

from __future__ import annotations

import ipaddress

import pytest
import trio

from mitm_wg.net.stack import Stack
from mitm_wg.net.tcp import TcpState
from mitm_wg.net.tcp_wire import ACK, SYN
from mitm_wg.runtime import open_tunnel
from mitm_wg.wireguard import messages
from mitm_wg.wireguard.device import Device, HandshakeCompleted, Transmit
from mitm_wg.wireguard.timers import KEEPALIVE_TIMEOUT, REKEY_TIMEOUT
from tcp_playbook import active, cfg
from tests.tunnelpair import free_udp_port, loopback_factory, pair_configs
from tests.wgpair import A_ADDR, B_ADDR, Pair, ipv4_udp, seeded_randbytes

# -- WireGuard core ------------------------------------------------------------------------------


def restart_b(p: Pair) -> None:
    """B restarts with the same keys (as the harness restarts wireguard-go): no sessions, no
    endpoint for A, a fresh replay timestamp."""
    b = Device(p.b.identity.private, randbytes=seeded_randbytes(99), unix_time_offset=1.7e9)
    p.b_peer = b.add_peer(
        p.a.public_key, allowed_ips=[ipaddress.ip_network("10.9.0.1/32")], endpoint=None
    )
    p.b = b


def established_then_b_restarts() -> Pair:
    p = Pair.create()
    p.handshake()
    p.send("b", ipv4_udp(B_ADDR, A_ADDR, b"answer"))
    p.deliver()
    p.advance(30.0)  # keepalives settle; both sides idle with a working session
    p.a.take_events()
    restart_b(p)
    p.log.clear()
    p.b_received.clear()
    return p


def initiations_from_a(p: Pair) -> int:
    return sum(1 for side, d in p.log if side == "a" and messages.message_type(d) == 1)


def test_silent_peer_gets_a_fresh_handshake_at_the_first_syn_retransmit() -> None:
    p = established_then_b_restarts()
    old = p.a_peer.current
    t0 = p.now
    p.send("a", ipv4_udp(A_ADDR, B_ADDR, b"SYN"))  # goes out on the old session...
    p.deliver()
    assert p.b.drops["unknown_index"] == 1  # ...which B no longer has
    assert not p.b_received
    p.advance(1.0)  # the SYN's first retransmission timeout
    out: list[Transmit] = []
    assert p.a.handshake_if_silent(p.a_peer, t0, p.now, out)
    p._collect("a", out)
    # the old session is suspect now: what is sent next waits for the new one
    retry = ipv4_udp(A_ADDR, B_ADDR, b"DNS retry")
    p.send("a", retry)
    assert [messages.message_type(d) for _, d, _ in p.wire] == [1] and p.a_peer.session_suspect
    p.deliver()
    assert retry in p.b_received and not p.a_peer.session_suspect
    assert initiations_from_a(p) == 1
    assert p.a_peer.current is not old and p.a_peer.last_handshake == t0 + 1.0
    assert p.a_peer.silence_handshakes == 1
    assert [type(e) for e in p.a.take_events()] == [HandshakeCompleted]
    # the retransmitted SYN now reaches B on the new session
    p.send("a", ipv4_udp(A_ADDR, B_ADDR, b"SYN again"))
    p.deliver()
    assert p.b_received[-1].endswith(b"SYN again")


def test_without_the_rule_only_the_passive_timer_rehandshakes_after_15_s() -> None:
    # The baseline the rule shortens: WireGuard's timer fires KEEPALIVE_TIMEOUT +
    # REKEY_TIMEOUT after the first unanswered data.
    p = established_then_b_restarts()
    t0 = p.now
    p.send("a", ipv4_udp(A_ADDR, B_ADDR, b"SYN"))
    p.deliver()
    p.advance(KEEPALIVE_TIMEOUT + REKEY_TIMEOUT - 0.01)
    assert initiations_from_a(p) == 0
    p.advance(0.02)
    assert initiations_from_a(p) == 1
    assert p.a_peer.last_handshake == pytest.approx(t0 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT)
    assert p.a_peer.silence_handshakes == 0


def test_no_handshake_when_the_peer_answered_since() -> None:
    p = Pair.create()
    p.handshake()  # at t=0
    p.advance(1.0)
    t0 = p.now
    p.send("a", ipv4_udp(A_ADDR, B_ADDR, b"SYN"))
    p.deliver()
    p.advance(0.5)
    p.send("b", ipv4_udp(B_ADDR, A_ADDR, b"anything authenticated"))
    p.deliver()
    p.advance(0.5)
    out: list[Transmit] = []
    assert not p.a.handshake_if_silent(p.a_peer, t0, p.now, out)
    assert out == [] and p.a_peer.silence_handshakes == 0
    # ...but a SYN sent after that answer, and unanswered, does count
    since = p.now
    assert p.a.handshake_if_silent(p.a_peer, since, since + REKEY_TIMEOUT, out)
    assert [messages.message_type(d) for d, _ in out] == [1]


def test_rate_limits_hold_while_the_peer_stays_away() -> None:
    p = established_then_b_restarts()
    t0 = p.now
    p.send("a", ipv4_udp(A_ADDR, B_ADDR, b"SYN"))
    p.wire.clear()  # B is still down: everything A sends is lost
    p.now += 1.0
    out: list[Transmit] = []
    assert p.a.handshake_if_silent(p.a_peer, t0, p.now, out)
    assert len(out) == 1
    out.clear()
    # an initiation is outstanding: its own retransmission timer resends it, the rule waits
    for _ in range(3):
        p.now += 1.0
        assert not p.a.handshake_if_silent(p.a_peer, t0, p.now, out)
    assert out == []
    p.advance(REKEY_TIMEOUT, drop=True)  # the timer's retransmission (REKEY_TIMEOUT + jitter)
    assert initiations_from_a(p) == 1
    assert p.a_peer.handshake_attempts_total == 3  # the first handshake, the rule, one retry
    # B is back: the next retransmission completes the handshake; the rule stayed idle
    p.advance(REKEY_TIMEOUT + 0.5)
    assert p.a_peer.silence_handshakes == 1
    assert p.a_peer.handshakes_completed == 2


def test_within_rekey_timeout_of_the_last_initiation_the_handshake_waits_for_it() -> None:
    p = Pair.create()
    p.handshake()  # initiation at t=0
    p.now = 1.0
    t0 = p.now
    p.send("a", ipv4_udp(A_ADDR, B_ADDR, b"SYN"))
    p.wire.clear()
    p.now = 2.0
    out: list[Transmit] = []
    assert not p.a.handshake_if_silent(p.a_peer, t0, p.now, out)
    assert out == [] and p.a.next_deadline() == REKEY_TIMEOUT  # armed for the first moment
    p.log.clear()
    p.advance(REKEY_TIMEOUT - p.now - 0.01)
    assert initiations_from_a(p) == 0
    p.advance(0.02)
    assert initiations_from_a(p) == 1 and p.a_peer.silence_handshakes == 1
    assert p.a_peer.handshakes_completed == 2


def test_an_armed_handshake_is_dropped_when_the_peer_speaks_first() -> None:
    p = Pair.create()
    p.handshake()
    p.now = 1.0
    t0 = p.now
    p.send("a", ipv4_udp(A_ADDR, B_ADDR, b"SYN"))
    p.wire.clear()
    out: list[Transmit] = []
    assert not p.a.handshake_if_silent(p.a_peer, t0, 2.0, out)
    p.now = 3.0
    p.send("b", ipv4_udp(B_ADDR, A_ADDR, b"SYN-ACK"))
    p.deliver()
    p.log.clear()
    p.advance(REKEY_TIMEOUT)
    assert initiations_from_a(p) == 0 and p.a_peer.silence_handshakes == 0


# -- TCP: retransmit now --------------------------------------------------------------------------


def test_tcp_resends_a_backed_off_syn_now_without_counting_a_retry() -> None:
    pb = active(cfg(timestamps=False, sack=False, window_scaling=False), isn=1000)
    (syn,) = pb.out()
    assert syn.flags == SYN
    assert not pb.sock.retransmit_now()  # no timeout fired yet: nothing to cut short
    assert pb.out() == []
    pb.at(1.0).expect([syn])  # first RTO
    assert pb.sock.stats.rto_expired == 1
    assert pb.poll() == pytest.approx(3.0)  # backed off to 2 s
    pb.at(1.5)
    assert pb.sock.retransmit_now()
    pb.expect([syn])
    assert pb.sock.stats.rto_expired == 1 and pb.sock.stats.retransmits == 2
    assert pb.poll() == pytest.approx(3.0)  # the running timer stays
    pb.send(SYN | ACK, 9000, 1001)
    assert pb.sock.state is TcpState.ESTABLISHED


def test_tcp_resends_the_oldest_segment_in_backoff_now() -> None:
    pb = active(cfg(timestamps=False, sack=False, window_scaling=False), isn=1000)
    pb.out()
    pb.send(SYN | ACK, 9000, 1001, mss=1000)
    pb.out()
    pb.sock.send(b"x" * 2500)
    first = pb.out()
    assert len(first) == 3
    assert not pb.sock.retransmit_now()  # in flight, no timeout yet
    rto = pb.sock.rto
    pb.at(rto).expect([first[0]])  # the timeout: head again, cwnd 1 segment
    pb.at(rto + 0.1)
    assert pb.sock.retransmit_now()
    again = pb.out()
    assert [(s.seq, len(s.payload)) for s in again] == [(1001, 1000)]
    assert pb.sock.stats.rto_expired == 1
    pb.send(ACK, 9001, 3501)  # everything arrived after all
    assert not pb.sock.retransmit_now()


def test_stack_retransmit_now_only_towards_the_given_remotes() -> None:
    stack = Stack(["10.0.0.1/32"], now=0.0)
    s1 = stack.tcp_connect(ipaddress.ip_address("10.0.0.2"), 80, 0.0)
    s2 = stack.tcp_connect(ipaddress.ip_address("10.0.0.3"), 80, 0.0)
    out: list[bytes] = []
    stack.poll(0.0, out)
    assert len(out) == 2
    out.clear()
    stack.poll(1.0, out)  # both SYNs time out once
    assert len(out) == 2 and s1.stats.rto_expired == s2.stats.rto_expired == 1
    out.clear()
    assert stack.retransmit_now(lambda addr: addr == s1.remote_addr) == 1
    assert stack.next_deadline() == 1.0  # due now
    stack.poll(1.2, out)
    assert len(out) == 1 and out[0][16:20] == s1.remote_addr
    assert s1.stats.retransmits == 2 and s2.stats.retransmits == 1


# -- the runtime glue over loopback ---------------------------------------------------------------


async def test_runtime_rehandshakes_on_an_unanswered_syn_and_resends_it_at_once() -> None:
    """B restarts (same keys, same port) while A keeps its session: A's next connection
    works after one SYN timeout, through a handshake the SYN rule started."""
    pa, pb = free_udp_port(), free_udp_port()
    ca, cb = pair_configs(pa, pb)
    async with open_tunnel(ca, socket_factory=loopback_factory(pa)) as a:
        async with open_tunnel(cb, socket_factory=loopback_factory(pb)) as b:
            # B initiates this first session, so no initiation of A's rate-limits the rule
            listener = await a.listen_tcp(7000)
            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(listener.accept)
                    stream = await b.open_tcp_stream("10.33.0.1", 7000)
            await stream.aclose()
        peer = next(iter(a.device.peers.values()))
        handshakes = peer.handshakes_completed
        # B is back, with no session for A (and not knowing A's endpoint)
        async with open_tunnel(cb, socket_factory=loopback_factory(pb)) as b:
            listener = await b.listen_tcp(7000)
            accepted: list = []

            async def accept() -> None:
                accepted.append(await listener.accept())

            with trio.fail_after(60):  # a hang guard, not a timing assertion
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(accept)
                    stream = await a.open_tcp_stream("10.33.0.2", 7000)
                await stream.send_all(b"ping")
                assert await accepted[0].receive_some() == b"ping"
            sock = stream.socket
            # the handshake came from the SYN rule, not WireGuard's passive 15 s timer
            assert peer.silence_handshakes == 1
            assert peer.handshakes_completed == handshakes + 1
            # the SYN that got through was sent when the session came up, not by a timer
            assert sock.stats.retransmits > sock.stats.rto_expired >= 1
            await stream.aclose()
            await accepted[0].aclose()
