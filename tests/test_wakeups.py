"""Fewer wake-ups of our trio thread on paths paced by a line: receive coalescing
(mitm_wg/runtime/readhold.py) and a writer's low-water mark (``TunnelStream._ready``). The
rules, and the runtime against a real peer (wireguard-go + Linux TCP) through an impairing
relay.

A busy stream on a long path is read in batches (a hold after a wake-up instead of a wait
for the socket); a reply after a pause is read at once; the hold never exceeds 1/64 of the
shortest connection RTT, nor exists under ~6 ms. A writer waiting for send-buffer space
wakes once a third of the buffer is free, or as soon as the sender is about to run dry."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import trio

from harness import ExitPeer
from harness.relay import Impairment
from mitm_wg.net.tcp import TcpState
from mitm_wg.runtime import TunnelStream
from mitm_wg.runtime.readhold import HOLD_GATHER, HOLD_MAX, HOLD_MIN, ReadHold
from tests.runtime_helpers import http_get, pattern_sha256
from tests.test_runtime_interop import tunnel_through_relay

MB = 1024 * 1024

# -- the rule ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rtt", "delay"),
    [
        (None, 0.0),  # no connection has an RTT yet (or UDP flows alone)
        (0.001, 0.0),  # the lab's 1 ms path: 16 µs would not pay for its own wake-up
        (0.0063, 0.0),  # just under HOLD_MIN * 64
        (0.0064, 0.0001),
        (0.010, 0.010 / 64),
        (0.032, HOLD_MAX),
        (0.050, HOLD_MAX),
        (2.0, HOLD_MAX),
    ],
)
def test_the_hold_is_a_64th_of_the_shortest_rtt_within_bounds(
    rtt: float | None, delay: float
) -> None:
    assert ReadHold.for_rtt(rtt) == pytest.approx(delay, abs=1e-12)


def test_a_first_datagram_after_a_pause_is_not_followed_by_a_hold() -> None:
    hold = ReadHold()
    assert hold.after(10.0, 1, HOLD_MAX) == 0.0  # the first wake-up ever
    assert hold.after(12.0, 50, HOLD_MAX) == 0.0  # 50 datagrams after 2 s: 0.0125 per hold
    # then the stream goes on, a datagram every 100 µs: five per hold
    assert hold.after(12.0001, 1, HOLD_MAX) == HOLD_MAX
    assert hold.after(12.0007, 6, HOLD_MAX) == HOLD_MAX


def test_a_fast_stream_is_held_a_slow_one_is_not() -> None:
    """Held when HOLD_GATHER datagrams are due within the hold at the rate since the
    previous wake-up that found any: ``count * delay >= HOLD_GATHER * gap``."""
    delay = 0.0004
    hold = ReadHold()
    hold.after(0.0, 1, delay)
    gap = delay / HOLD_GATHER  # one datagram per gap: exactly HOLD_GATHER per hold
    assert hold.after(gap, 1, delay) == delay
    assert hold.after(gap + 3 * gap, 3, delay) == delay  # (three over three gaps: the same rate)
    slower = gap * 1.01
    assert hold.after(4 * gap + slower, 1, delay) == 0.0
    # 2.5 MB/s of full-sized datagrams (one per ~550 µs) is not held
    hold = ReadHold()
    hold.after(0.0, 1, HOLD_MAX)
    assert hold.after(0.00055, 1, HOLD_MAX) == 0.0


def test_an_empty_wake_up_is_a_pause() -> None:
    """A hold that found nothing returns no hold (the reader waits for the socket), and
    the next datagram's rate is measured from the last wake-up that found one."""
    hold = ReadHold()
    hold.after(1.0, 1, HOLD_MAX)
    assert hold.after(1.0001, 1, HOLD_MAX) == HOLD_MAX
    assert hold.after(1.0006, 0, HOLD_MAX) == 0.0
    assert hold.after(1.2, 1, HOLD_MAX) == 0.0  # 200 ms after the last datagram: a new run


def test_without_a_delay_nothing_is_held() -> None:
    hold = ReadHold()
    hold.after(0.0, 1, 0.0)
    assert hold.after(0.00001, 256, 0.0) == 0.0
    assert ReadHold.for_rtt(HOLD_MIN * 64 * 0.99) == 0.0


# -- the runtime against wireguard-go + Linux through a 50 ms relay ----------------------------------

# A TCP echo: each read answered by one send of the same bytes (one segment per reply).
_ECHO = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(); print("ready", flush=True)
while True:
    c, _ = s.accept()
    while data := c.recv(4096):
        c.sendall(data)
    c.close()
"""
ECHO_PORT = 7007


async def test_a_busy_download_is_read_in_batches(exit_peer: ExitPeer) -> None:
    """A download at 12.5 MB/s (a 100 Mbit/s line) over a 50 ms path arrives a datagram
    every ~110 µs: the reader holds its reads (up to 0.5 ms: 1/64 of the RTT is more) and
    takes several datagrams per wake-up, and the body arrives byte-exact."""
    size = 8 * MB
    async with tunnel_through_relay(exit_peer, Impairment(delay=0.025, rate=12.5e6), dns=False) as (
        tunnel,
        relay,
    ):
        with trio.fail_after(60):
            stream = await tunnel.open_tcp_stream(exit_peer.server_tunnel_v4, exit_peer.http_port)
            reads0, holds0 = tunnel.reads, tunnel.read_holds
            resp = await http_get(stream, f"/bytes/{size}")
            await stream.aclose()
        reads, holds = tunnel.reads - reads0, tunnel.read_holds - holds0
        assert resp.status == 200 and resp.size == size
        assert resp.sha256 == pattern_sha256(size)
        assert tunnel._hold_delay == HOLD_MAX
    datagrams = relay.down.forwarded
    assert datagrams > size // 1500
    assert holds > 0, (reads, datagrams)
    assert reads < datagrams / 2, (reads, holds, datagrams)


async def test_replies_after_pauses_are_never_held(exit_peer: ExitPeer) -> None:
    """Interactive traffic (a request, its reply, a pause) through the same 50 ms path:
    each reply is the first datagram after a pause, read at once and never followed by a
    hold, though the hold (set by the connection's RTT) is there."""
    proc = exit_peer.ns.popen(
        [sys.executable, "-c", _ECHO, exit_peer.server_tunnel_v4, str(ECHO_PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        async with tunnel_through_relay(exit_peer, Impairment(delay=0.025), dns=False) as (
            tunnel,
            _,
        ):
            with trio.fail_after(60):
                stream = await tunnel.open_tcp_stream(exit_peer.server_tunnel_v4, ECHO_PORT)
                await _exchange(stream, b"warm-up")
                await trio.sleep(0.3)  # (the hold is looked up every 0.25 s)
                await _exchange(stream, b"and the hold is known")
                assert tunnel._hold_delay == HOLD_MAX
                holds0, reads0 = tunnel.read_holds, tunnel.reads
                for i in range(10):
                    await trio.sleep(0.1)
                    await _exchange(stream, b"request %d " % i * 8)
                await stream.aclose()
            assert tunnel.reads - reads0 >= 10
            assert tunnel.read_holds == holds0
    finally:
        exit_peer.ns.kill(proc)


async def _exchange(stream: trio.abc.Stream, message: bytes) -> None:
    await stream.send_all(message)
    got = b""
    while len(got) < len(message):
        data = await stream.receive_some()
        assert data, "the echo closed"
        got += data
    assert got == message


class _Steps(trio.abc.Instrument):
    """Counts the steps (wake-ups) of one task."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


async def test_a_writer_waiting_for_buffer_space_wakes_per_third_of_the_buffer(
    exit_peer: ExitPeer,
) -> None:
    """An upload faster than its path (one ``send_all`` of 8 MiB over a 4 MB/s, 50 ms path)
    waits for send-buffer space most of the time. It is woken once a third of the buffer is
    free, as Linux wakes a writer (sk_stream_write_space), not at every ACK batch's few KB:
    a few dozen wake-ups (the buffer is at least 1 MiB), not hundreds."""
    size = 8 * MB
    body = memoryview(bytes(range(256)) * (size // 256))
    async with tunnel_through_relay(exit_peer, Impairment(delay=0.025, rate=4e6), dns=False) as (
        tunnel,
        _,
    ):
        with trio.fail_after(60):
            stream = await tunnel.open_tcp_stream(exit_peer.server_tunnel_v4, exit_peer.http_port)
            head = (
                f"POST /upload HTTP/1.1\r\nHost: exit\r\nContent-Length: {size}\r\n"
                "Content-Type: application/octet-stream\r\n\r\n"
            )
            await stream.send_all(head.encode())
            steps = _Steps(trio.lowlevel.current_task())
            trio.lowlevel.add_instrument(steps)
            try:
                await stream.send_all(body)
            finally:
                trio.lowlevel.remove_instrument(steps)
            reply = b""
            while data := await stream.receive_some():
                reply += data
                if reply.endswith(b"}"):
                    break
            await stream.aclose()
    assert b" 200 " in reply.split(b"\r\n", 1)[0], reply[:200]
    assert f'"sha256": "{pattern_sha256(size)}"'.encode() in reply, reply[-200:]
    # (1 MiB at the start: at most one wake-up per ~341 KiB sent, and a few more; waking at
    # every ACK batch took 1150)
    assert steps.steps <= size // (341 * 1024) + 8, steps.steps


@pytest.mark.parametrize(
    ("space", "unsent", "woken"),
    [
        (0, 0, False),  # no room at all
        (100_000, 900_000, False),  # < 1/3 of 3 MB free, plenty left to send
        (999_999, 100_000, False),
        (1_000_000, 100_000, True),  # a third free
        (3_000_000, 0, True),
        # about to run dry (SACKed data beyond a hole fills the buffer): any room will do
        (10_000, 2 * 1400 - 1, True),
        (10_000, 2 * 1400, False),
    ],
)
def test_when_a_writer_waiting_for_space_wakes(space: int, unsent: int, woken: bool) -> None:
    sock = SimpleNamespace(
        local_addr=bytes([10, 0, 0, 2]),
        local_port=40000,
        remote_addr=bytes([10, 0, 0, 1]),
        remote_port=80,
        error=None,
        is_closed=False,
        state=TcpState.ESTABLISHED,
        send_space=space,
        send_buffer=3_000_000,
        send_unsent=unsent,
        mss=1400,
    )
    stream = TunnelStream(None, sock, None)  # type: ignore[arg-type]
    stream._waiting_for.add("send")
    assert stream._ready() is woken
