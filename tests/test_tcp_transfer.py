"""Two TcpSockets back to back over a virtual, optionally lossy link: whole transfers."""

from __future__ import annotations

import random

import pytest

from mitm_wg.net.tcp import TcpState
from mitm_wg.net.tcp_wire import TcpSegment
from tcp_playbook import Link, cfg, lossy

M32 = 0xFFFFFFFF


def transfer(link: Link, a_data: bytes, b_data: bytes, chunk: int = 1 << 20) -> None:
    """Send a_data a->b and b_data b->a, half-close both, check every byte, close cleanly."""
    link.run_until(lambda: link.a.state is TcpState.ESTABLISHED and link.b is not None)
    b = link.b
    assert b is not None
    link.run_until(lambda: b.state is not TcpState.SYN_RECEIVED)
    sent = {"a": 0, "b": 0}
    shut = {"a": False, "b": False}
    got = {"a": bytearray(), "b": bytearray()}

    def pump() -> bool:
        for name, sock, data in (("a", link.a, a_data), ("b", b, b_data)):
            if sent[name] < len(data):
                sent[name] += sock.send(data[sent[name] : sent[name] + chunk])
            if sent[name] == len(data) and not shut[name]:
                shut[name] = True
                sock.shutdown_write(link.now)
            got[name] += sock.recv(1 << 20)
        return link.a.at_eof and b.at_eof

    link.run_until(pump, limit=300.0)
    assert bytes(got["b"]) == a_data
    assert bytes(got["a"]) == b_data
    link.run_until(lambda: link.a.is_closed and b.is_closed, limit=400.0)
    assert link.a.error is None and b.error is None


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_clean_transfer_both_directions() -> None:
    link = Link()
    transfer(link, payload(300_000, 1), payload(100_000, 2))
    assert link.a.stats.retransmits == 0 and link.b.stats.retransmits == 0


@pytest.mark.parametrize("sack", [True, False])
@pytest.mark.parametrize("ts", [True, False])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lossy_transfer(sack: bool, ts: bool, seed: int) -> None:
    c = cfg(sack=sack, timestamps=ts)
    link = Link(c, c, drop=lossy(seed, 0.05))
    transfer(link, payload(150_000, seed), payload(30_000, seed + 100))
    assert link.a.stats.retransmits > 0


def test_sack_recovery_beats_rto() -> None:
    """With SACK most losses are repaired by fast recovery, not timeouts."""
    link = Link(drop=lossy(7, 0.03))
    transfer(link, payload(400_000, 7), b"")
    st = link.a.stats
    assert st.fast_retransmits > st.rto_expired


def test_cubic_transfer() -> None:
    c = cfg(congestion="cubic", recv_buffer=1 << 20)
    link = Link(c, c, drop=lossy(11, 0.02))
    transfer(link, payload(300_000, 3), b"x")


def test_window_scaled_big_buffers() -> None:
    c = cfg(recv_buffer=1 << 20, mss=1400)
    link = Link(c, c, delay=0.05)
    transfer(link, payload(2_000_000, 4), b"")
    assert link.a.peer_window > 65535


def test_wraparound_transfer() -> None:
    link = Link(isn_a=M32 - 20_000, isn_b=M32 - 3, drop=lossy(5, 0.03))
    transfer(link, payload(100_000, 5), payload(100_000, 6))


def test_reordering_link() -> None:
    """Every 7th segment is held back for 3 extra delays: reordering, not loss."""
    link = Link()
    count = [0]
    orig = link.inflight.append

    class Reorder(list):  # type: ignore[type-arg]
        def append(self, item: tuple[float, int, str, TcpSegment]) -> None:
            count[0] += 1
            if count[0] % 7 == 0:
                t, c, d, s = item
                item = (t + 3 * link.delay, c, d, s)
            super().append(item)

    link.inflight = Reorder()
    del orig
    transfer(link, payload(200_000, 8), payload(50_000, 9))


def test_slow_reader_zero_window() -> None:
    """The receiver reads nothing for a while: the sender must stall, probe, and resume."""
    c = cfg(recv_buffer=8000)
    link = Link(c, c)
    link.run_until(lambda: link.b is not None and link.b.state is TcpState.ESTABLISHED)
    b = link.b
    assert b is not None
    data = payload(50_000, 10)
    sent = link.a.send(data)
    link.run_until(lambda: b.recv_available == 8000)
    stall_until = link.now + 5.0
    link.run_until(lambda: link.now >= stall_until, limit=stall_until + 1)
    assert b.recv_available == 8000
    assert link.a.stats.zero_window_probes >= 1
    got = bytearray()

    for _ in range(100_000):  # a slow reader: 1000 bytes per event (or per idle turn)
        if sent < len(data):
            sent += link.a.send(data[sent:])
        got.extend(b.recv(1000))
        if len(got) == len(data):
            break
        link.step()
    assert bytes(got) == data
