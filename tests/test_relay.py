"""The impairment relay's additions for the path benchmark: bursty (Gilbert-Elliott) loss,
constant delay in FIFO order, and the relay as its own process (``RelayProcess``)."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

from harness import ImpairedRelay, Impairment, wait_until
from harness.relay import RelayProcess


def _blast(relay: ImpairedRelay, target: socket.socket, count: int) -> list[int]:
    """Send ``count`` numbered datagrams in small batches (so no socket buffer overflows);
    return the numbers that arrived at ``target``, in arrival order."""
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    got: list[int] = []
    target.settimeout(5)
    with client:
        for start in range(0, count, 20):
            end = min(start + 20, count)
            for i in range(start, end):
                client.sendto(i.to_bytes(4, "big"), relay.address)
            wait_until(lambda end=end: relay.up.received >= end, 10, "the relay to read")
            # ``forwarded`` is bumped after sendto() returned: those are queued at the target
            while len(got) < relay.up.forwarded:
                got.append(int.from_bytes(target.recv(100), "big"))
        target.settimeout(0.2)  # delayed datagrams still on their way
        with contextlib.suppress(TimeoutError):
            while True:
                got.append(int.from_bytes(target.recv(100), "big"))
    return got


def _target() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def _runs_of_losses(got: list[int], count: int) -> list[int]:
    present = set(got)
    runs, cur = [], 0
    for i in range(count):
        if i in present:
            if cur:
                runs.append(cur)
            cur = 0
        else:
            cur += 1
    if cur:
        runs.append(cur)
    return runs


def test_bursty_parameters() -> None:
    imp = Impairment.bursty(0.02, 4)
    assert imp.bad_exit == 0.25
    assert imp.mean_loss == pytest.approx(0.02)
    assert Impairment(loss=0.1).mean_loss == 0.1
    with pytest.raises(ValueError):
        Impairment(bad_enter=0.1, bad_exit=0.0)
    with pytest.raises(ValueError):
        Impairment.bursty(0.0, 4)


def test_bursty_loss_comes_in_bursts_and_is_seeded() -> None:
    count = 1000
    # 10 % loss in bursts of 5 on average; bursts never time out here (the test sends in
    # batches, and a burst cut at a batch boundary would depend on timing, not the seed)
    imp = Impairment.bursty(0.1, 5, bad_time=60.0)
    results = []
    for seed in (4, 4, 5):
        target = _target()
        with target, ImpairedRelay(target.getsockname(), seed=seed, up=imp) as relay:
            got = _blast(relay, target, count)
            assert relay.up.received == count
            assert relay.up.dropped == count - len(got)
        results.append(got)
    assert results[0] == results[1]  # same seed, same datagrams lost
    assert results[0] != results[2]
    got = results[0]
    assert got == sorted(got)
    runs = _runs_of_losses(got, count)
    lost = sum(runs)
    assert 30 < lost < 250  # ~100 expected
    # random 10 % loss would give a mean run of ~1.1; bursts of 5 give far longer ones
    assert lost / len(runs) > 2.5
    assert max(runs) >= 6


def test_a_burst_ends_with_its_time_even_without_traffic() -> None:
    """A chain that (practically) never leaves the bad state by itself: datagrams right
    after the first are lost, one sent after bad_time passes, the next starts a new
    burst."""
    imp = Impairment(bad_enter=1.0, bad_exit=1e-9, bad_time=1.0)
    target = _target()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with target, client, ImpairedRelay(target.getsockname(), seed=1, up=imp) as relay:
        client.sendto(b"0", relay.address)
        client.sendto(b"1", relay.address)
        wait_until(lambda: relay.up.received == 2, 10, "the relay to read")
        time.sleep(1.5)
        client.sendto(b"2", relay.address)
        wait_until(lambda: relay.up.received == 3, 10, "the relay to read")
        client.sendto(b"3", relay.address)
        wait_until(lambda: relay.up.received == 4, 10, "the relay to read")
        target.settimeout(5)
        assert target.recv(100) == b"2"
        assert relay.up.dropped == 3
    with pytest.raises(ValueError):
        Impairment(bad_time=0.0)


def test_bursty_loss_leaves_other_decisions_unchanged() -> None:
    """The chain draws from its own generator: duplicates fall on the same datagrams."""
    count = 300
    dup = {}
    for name, imp in (
        ("plain", Impairment(duplicate=0.2)),
        ("bursty", Impairment(duplicate=0.2, bad_enter=0.01, bad_exit=0.5, bad_loss=0.0)),
    ):
        target = _target()
        with target, ImpairedRelay(target.getsockname(), seed=9, up=imp) as relay:
            got = _blast(relay, target, count)
        dup[name] = sorted(i for i in set(got) if got.count(i) == 2)
    assert dup["plain"] and dup["plain"] == dup["bursty"]


def test_constant_delay_keeps_order() -> None:
    target = _target()
    imp = Impairment(delay=0.03)
    with target, ImpairedRelay(target.getsockname(), up=imp) as relay:
        got = _blast(relay, target, 200)
        assert relay.up.delayed == 200
    assert got == list(range(200))


def test_relay_process_forwards_and_reports_counters() -> None:
    echo = _target()
    echo.settimeout(5)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(5)
    imp = Impairment(delay=0.01, duplicate=1.0)
    with echo, client, RelayProcess(echo.getsockname(), up=imp) as relay:
        assert relay.address[0] == "127.0.0.1"
        t0 = time.monotonic()
        client.sendto(b"ping", relay.address)
        data, src = echo.recvfrom(100)
        assert data == b"ping" and time.monotonic() - t0 >= 0.01
        assert echo.recvfrom(100)[0] == b"ping"  # the duplicate
        echo.sendto(b"pong", src)
        assert client.recvfrom(100) == (b"pong", relay.address)
        assert relay.cpu_seconds() >= 0.0
        relay.stop()
        assert relay.process.poll() is not None
    assert relay.up.received == 1 and relay.up.forwarded == 2 and relay.up.duplicated == 1
    assert relay.down.received == relay.down.forwarded == 1
    assert relay.down.bytes_forwarded == 4


def test_relay_process_rejects_bad_impairment() -> None:
    with pytest.raises(RuntimeError, match="did not start"):
        RelayProcess(("127.0.0.1", 9), impairment=Impairment(), listen=("256.0.0.1", 0))


def test_bottleneck_spaces_datagrams_at_its_rate_in_order() -> None:
    target = _target()
    imp = Impairment(rate=100_000, queue_bytes=1 << 20)  # 1000-byte datagrams: 10 ms apart
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    arrivals: list[tuple[float, int]] = []
    with target, sender, ImpairedRelay(target.getsockname(), up=imp) as relay:
        for i in range(30):
            sender.sendto(i.to_bytes(4, "big") + bytes(996), relay.address)
        target.settimeout(5)
        while len(arrivals) < 30:
            arrivals.append((time.monotonic(), int.from_bytes(target.recv(2000)[:4], "big")))
        # (``forwarded`` is bumped after sendto() returned: the last may arrive before it)
        wait_until(lambda: relay.up.forwarded == 30, 5, "the relay's counter")
        assert relay.up.queue_drops == 0
    assert [i for _, i in arrivals] == list(range(30))
    # a lower bound only (a busy machine delays, never hurries, the relay): 29 gaps of 10 ms
    assert arrivals[-1][0] - arrivals[0][0] >= 29 * 0.010 * 0.95


def test_bottleneck_drops_what_its_queue_cannot_hold() -> None:
    target = _target()
    # 1 s per 1000-byte datagram; the queue holds 10 of them waiting behind the one on the
    # link: of a burst of 50, 11 are taken and 39 dropped (a few more taken only if the
    # relay took over a second to read the burst)
    imp = Impairment(rate=1000, queue_bytes=10_000)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with target, sender, ImpairedRelay(target.getsockname(), up=imp) as relay:
        for i in range(50):
            sender.sendto(i.to_bytes(4, "big") + bytes(996), relay.address)
        wait_until(lambda: relay.up.received == 50, 10, "the relay to read the burst")
        assert 35 <= relay.up.queue_drops <= 39, relay.up
        assert relay.up.dropped == 0  # (random loss only)
        target.settimeout(5)
        assert int.from_bytes(target.recv(2000)[:4], "big") == 0  # the first went at once


def test_bottleneck_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="rate"):
        Impairment(rate=-1)
    with pytest.raises(ValueError, match="queue_bytes"):
        Impairment(rate=1000, queue_bytes=0)
