"""Path probes (mitm_wg/net/probe.py, Stack.probe_path): asking a path with pings whether
packets of the tunnel's size pass when smaller ones do. Two stacks on a virtual clock, the
remote one answering pings as any host does, joined by a link that may drop packets over a
size (a black hole), drop at random, or delay."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable

import pytest

from mitm_wg.net import icmp
from mitm_wg.net.ipv4 import build_ipv4
from mitm_wg.net.probe import PathProbe, Verdict
from mitm_wg.net.stack import Stack

A4, B4 = ipaddress.ip_address("10.0.0.1").packed, ipaddress.ip_address("10.0.0.2").packed
A6, B6 = ipaddress.ip_address("fd00::1").packed, ipaddress.ip_address("fd00::2").packed


def pair() -> tuple[Stack, Stack]:
    def rand(n: int) -> bytes:
        return bytes(n)

    a = Stack(["10.0.0.1/24", "fd00::1/64"], randbytes=rand, icmp_rate=1e9, icmp_burst=1e9)
    b = Stack(["10.0.0.2/24", "fd00::2/64"], randbytes=rand, icmp_rate=1e9, icmp_burst=1e9)
    return a, b


def run(
    a: Stack,
    b: Stack,
    passes: Callable[[bytes], bool],
    until: float = 10.0,
    delay: float = 0.02,
) -> list[tuple[float, int]]:
    """Drive both stacks until ``until`` or until ``a`` has no probe left; every packet
    takes ``delay`` seconds one way, if ``passes(packet)``. Returns the (time, size) of
    every packet ``a`` sent."""
    now = 0.0
    sent: list[tuple[float, int]] = []
    flight: list[tuple[float, Stack, bytes]] = []
    while now <= until:
        for src, dst in ((a, b), (b, a)):
            out: list[bytes] = []
            src.poll(now, out)
            for p in out:
                if src is a:
                    sent.append((now, len(p)))
                if passes(p):
                    flight.append((now + delay, dst, p))
        for item in [f for f in flight if f[0] <= now]:
            flight.remove(item)
            item[1].receive(item[2], now)
        if not a._probes and not flight:
            break
        times = [t for t in (a.next_deadline(), b.next_deadline()) if t is not None]
        times += [f[0] for f in flight]
        now = max(now, min(times)) if times else until + 1
    return sent


def test_a_black_hole_for_big_packets() -> None:
    """Big pings vanish, small ones are answered: three rounds half a second apart, the big
    one in each, the small one until answered; then the verdict HOLE."""
    a, b = pair()
    probe = a.probe_path(A4, B4, 1420, 1200, 0.0, 0.5)
    assert a.next_deadline() == 0.0
    sent = run(a, b, lambda p: len(p) <= 1300)
    assert sent == [(0.0, 1420), (0.0, 1200), (0.5, 1420), (1.0, 1420)]
    assert probe.verdict is Verdict.HOLE
    assert a.probes_done == [probe] and not a._probes
    assert a.stats.path_probes == 1 and a.stats.path_probe_replies == 1
    assert b.stats.icmp_echo_answered == 1
    assert a.next_deadline() is None


@pytest.mark.parametrize(("local", "remote"), [(A4, B4), (A6, B6)], ids=["v4", "v6"])
def test_a_path_that_carries_big_packets(local: bytes, remote: bytes) -> None:
    """Both answered in the first round: FITS at once, nothing more sent."""
    a, b = pair()
    probe = a.probe_path(local, remote, 1420, 1200, 0.0, 0.5)
    sent = run(a, b, lambda p: True)
    assert [size for _, size in sent] == [1420, 1200]
    assert probe.verdict is Verdict.FITS and a.probes_done == [probe]
    assert a.stats.path_probe_replies == 1  # (the small one's reply came after the verdict)


def test_a_host_that_answers_no_ping_leaves_the_question_open() -> None:
    a, b = pair()
    probe = a.probe_path(A4, B4, 1420, 1200, 0.0, 0.5)
    sent = run(a, b, lambda p: p[9] != 1 or p[16:20] != A4)  # (its replies are dropped)
    assert [size for _, size in sent] == [1420, 1200] * 3
    assert probe.verdict is Verdict.UNKNOWN
    assert b.stats.icmp_echo_answered == 6


def test_a_late_reply_counts_until_the_verdict() -> None:
    """A path slower than the probe's interval (a queue of 0.7 s each way): the first round's
    big reply comes back after two more rounds went out, and still counts."""
    a, b = pair()
    probe = a.probe_path(A4, B4, 1420, 1200, 0.0, 0.5)
    sent = run(a, b, lambda p: True, delay=0.7)
    assert sent == [(0.0, 1420), (0.0, 1200), (0.5, 1420), (0.5, 1200), (1.0, 1420), (1.0, 1200)]
    assert probe.verdict is Verdict.FITS


def test_random_loss_is_no_black_hole() -> None:
    """5 % loss each way, 300 probes: a big ping and its reply must both be lost three
    rounds in a row for a false HOLE (a chance of about 1 in 1000 per probe at this loss):
    none here, and at most a handful UNKNOWN (the small ones lost as often)."""
    verdicts = []
    for seed in range(300):
        rng = random.Random(seed)
        a, b = pair()
        probe = a.probe_path(A4, B4, 1420, 1200, 0.0, 0.5)
        run(a, b, lambda p, rng=rng: rng.random() >= 0.05)
        verdicts.append(probe.verdict)
    assert verdicts.count(Verdict.HOLE) == 0
    assert verdicts.count(Verdict.FITS) >= 297


def test_replies_that_are_not_ours_are_ignored() -> None:
    """An echo reply from another host, with another identifier, for a round not yet sent,
    or truncated, answers nothing."""
    a, _ = pair()
    probe = a.probe_path(A4, B4, 1420, 1200, 0.0, 0.5)
    a.poll(0.0, [])  # round 0 out: sequence numbers 0 (big) and 1 (small)
    ident = probe.ident

    def reply(src: bytes, rest: int, size: int) -> bytes:
        body = bytes(size - 28)
        return build_ipv4(src, A4, 1, icmp.build_icmp4(icmp.ICMP4_ECHO_REPLY, 0, rest, body))

    for packet in (
        reply(ipaddress.ip_address("10.0.0.3").packed, ident << 16, 1420),
        reply(B4, ((ident + 1) & 0xFFFF) << 16, 1420),
        reply(B4, (ident << 16) | 2, 1420),  # round 1: not sent yet
        reply(B4, ident << 16, 1200),  # the big one's number, the small one's size
    ):
        a.receive(packet, 0.1)
    assert probe.verdict is None and a.stats.path_probe_replies == 0
    a.receive(reply(B4, ident << 16, 1420), 0.1)
    assert probe.verdict is Verdict.FITS and a.stats.path_probe_replies == 1


def test_probe_sizes_are_checked() -> None:
    with pytest.raises(ValueError):
        PathProbe(A4, B4, 1200, 1200, 1, 0.0, 0.5)
    with pytest.raises(ValueError):
        PathProbe(A4, B6, 1420, 1200, 1, 0.0, 0.5)
    with pytest.raises(ValueError):
        PathProbe(A6, B6, 1420, 40, 1, 0.0, 0.5)


def test_probes_at_once_each_get_their_own_identifier() -> None:
    """(The stack's randomness here is all zeros: the identifiers still differ.)"""
    a, b = pair()
    first = a.probe_path(A4, B4, 1420, 1200, 0.0, 0.5)
    second = a.probe_path(A6, B6, 1420, 1200, 0.0, 0.5)
    assert first.ident != second.ident
    run(a, b, lambda p: True)
    assert first.verdict is second.verdict is Verdict.FITS
    assert a.probes_done == [first, second]


def test_a_cancelled_probe_sends_nothing_more() -> None:
    a, b = pair()
    probe = a.probe_path(A4, B4, 1420, 1200, 0.0, 0.5)
    out: list[bytes] = []
    a.poll(0.0, out)
    assert len(out) == 2
    a.cancel_probe(probe)
    assert a.next_deadline() is None
    assert run(a, b, lambda p: len(p) <= 1300) == []
    assert probe.verdict is None and a.probes_done == []


def _fragments4(packet: bytes, first: int) -> list[bytes]:
    """``packet`` (IPv4, 20-byte header) in two fragments, the first carrying ``first``
    bytes of its payload (a multiple of 8), as a host cuts it for a narrower path."""
    import struct

    from mitm_wg.net.checksum import checksum

    body = packet[20:]
    out = []
    for offset, part, more in ((0, body[:first], 0x2000), (first, body[first:], 0)):
        hdr = bytearray(packet[:20])
        struct.pack_into("!HHH", hdr, 2, 20 + len(part), 0x1234, more | (offset >> 3))
        hdr[10:12] = b"\0\0"
        struct.pack_into("!H", hdr, 10, checksum(bytes(hdr)))
        out.append(bytes(hdr) + part)
    return out


def _fragments6(packet: bytes, first: int) -> list[bytes]:
    import struct

    body = packet[40:]
    out = []
    for offset, part, more in ((0, body[:first], 1), (first, body[first:], 0)):
        hdr = bytearray(packet[:40])
        struct.pack_into("!H", hdr, 4, 8 + len(part))
        hdr[6] = 44
        frag = struct.pack("!BBHI", 58, 0, offset | more, 0x1234)
        out.append(bytes(hdr) + frag + part)
    return out


@pytest.mark.parametrize(("local", "remote"), [(A4, B4), (A6, B6)], ids=["v4", "v6"])
def test_a_reply_in_fragments_shows_the_request_got_there(local: bytes, remote: bytes) -> None:
    """The host answers the big ping in fragments (we told it of a narrower path, or it
    knows one beyond the tunnel; we reassemble nothing): the first fragment of the reply
    to a big request says the request got there whole. A later fragment, or the first one
    of another host's reply, says nothing."""
    from mitm_wg.net.ipv6 import build_ipv6

    a, _ = pair()
    probe = a.probe_path(local, remote, 1420, 1200, 0.0, 0.5)
    a.poll(0.0, [])
    rest = probe.ident << 16  # sequence number 0: round 0's big one
    if len(remote) == 4:
        message = icmp.build_icmp4(icmp.ICMP4_ECHO_REPLY, 0, rest, bytes(1420 - 28))
        head, tail = _fragments4(build_ipv4(remote, local, 1, message), 1176)
        other = _fragments4(build_ipv4(A4[:3] + b"\x09", local, 1, message), 1176)[0]
    else:
        message = icmp.build_icmp6(remote, local, icmp.ICMP6_ECHO_REPLY, 0, rest, bytes(1372))
        head, tail = _fragments6(build_ipv6(remote, local, 58, message), 1176)
        other = _fragments6(build_ipv6(A6[:15] + b"\x09", local, 58, message), 1176)[0]
    for packet in (tail, other):
        a.receive(packet, 0.1)
    assert probe.verdict is None
    a.receive(head, 0.1)
    assert probe.verdict is Verdict.FITS and a.probes_done == [probe]
    assert a.stats.dropped_fragment == 3  # (still dropped: nothing reassembled)
