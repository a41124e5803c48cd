"""The sender's SACK scoreboard (recovery.py ``Scoreboard``) keeps a running total of the
SACKed bytes, ``_sacked_bytes``, that replaces walks of the list on every ACK: after every
step of randomized lossy, reordering exchanges it must equal a fresh walk, and the list must
keep the shape the bisecting lookups rely on (sorted, merged, within [SND.UNA, SND.MAX))."""

from __future__ import annotations

import random
from typing import Any

import pytest
from test_sim import run_transfer

from mitm_wg.net.recovery import Rack, _covered
from mitm_wg.net.tcp import TcpSocket, TcpState
from sim import LinkParams
from tcp_playbook import Pb, active, cfg

ACK = 0x10
SYN = 0x02
ISS = 1000
PISS = 5000
MSS = 1000


def check_scoreboard(sock: TcpSocket, rng: random.Random | None = None) -> None:
    """The running total and the list's shape; with ``rng``, the lookups at a few points
    against naive walks."""
    sacked = sock._sacked
    una, smax = sock._snd_una, sock._snd_max
    walk = 0
    prev = None
    for s, e in sacked:
        assert una <= s < e <= smax, (una, smax, sacked)
        assert prev is None or s > prev, f"unsorted or unmerged: {sacked}"
        prev = e
        walk += e - s
    assert sock._sacked_bytes == walk, (sock._sacked_bytes, walk, sacked)
    if rng is None or not sacked:
        return
    points = [una, smax, sock._snd_nxt]
    for _ in range(4):
        s, e = rng.choice(sacked)
        points += [s - 1, s, s + 1, e - 1, e, e + 1, rng.randrange(una, smax + 1)]
    for x in points:
        below = sum(max(0, min(e, x) - s) for s, e in sacked)
        assert sock._sacked_below(x) == below, (x, sacked)
        first = x
        for s, e in sacked:  # the original linear rule
            if s > first:
                break
            if e > first:
                first = e
        assert sock._first_unsacked(x) == first, (x, sacked)
        y = rng.choice(points)
        between = sum(max(0, min(e, y) - max(s, x)) for s, e in sacked)
        assert sock._sacked_between(x, y) == between, (x, y, sacked)
        if x < y:
            inside = any(s <= x and y <= e for s, e in sacked)
            assert _covered(sacked, x, y) == inside, (x, y, sacked)


def established(**kw: object) -> Pb:
    pb = active(cfg(congestion="newreno", **kw), isn=ISS)
    pb.out()
    pb.at(0.1).send(SYN | ACK, PISS, ISS + 1, mss=MSS, sack_permitted=True, wscale=7)
    assert pb.sock.state is TcpState.ESTABLISHED
    pb.out()
    pb.send(ACK, PISS + 1, ISS + 1)  # the window scaled by 2**7 (a SYN's never is)
    return pb


@pytest.mark.parametrize("rack", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_running_total_under_random_sack_feeding(rack: bool, seed: int) -> None:
    """A peer that SACKs random pieces of what was sent (unaligned, overlapping, stale, DSACK,
    more holes than the socket's cap of 64 here, so the lowest range is forgotten), moves
    the cumulative ACK into the middle
    of SACKed ranges, and sometimes stays silent until RTOs (the second one drops the
    scoreboard)."""
    rng = random.Random(seed)
    pb = established(rack=rack)
    sock = pb.sock
    sock._sacked_max = 64  # (a small cap, within the random feeding's reach)
    sock._cc.cwnd = 400 * MSS  # many holes at once: the cap is reached
    sock.send(bytes(600 * MSS))
    now = 0.2
    pb.at(now).out()
    ack = 1  # relative to ISS, like the blocks
    seen = {"nonempty": 0, "overflow": 0, "cleared": 0, "mid_ack": 0, "longest": 0}
    for _step in range(400):
        now += rng.choice([0.001, 0.01, 0.05])
        pb.at(now)
        smax = sock._snd_max - ISS
        r = rng.random()
        if r < 0.02:
            # silence: let the timers (RACK, TLP, RTO) fire
            now += rng.choice([0.3, 1.5, 4.0])
            had = bool(sock._sacked)
            pb.at(now).out()
            if had and not sock._sacked:
                seen["cleared"] += 1
            check_scoreboard(sock, rng)
            continue
        if r < 0.2 and smax > ack:
            # the cumulative ACK moves, sometimes into a SACKed range
            if sock._sacked and rng.random() < 0.5:
                s, e = rng.choice(sock._sacked[:2])
                if e - s > 1:
                    ack = rng.randrange(s + 1, e) - ISS
                    seen["mid_ack"] += 1
            else:
                ack = min(smax, ack + rng.randrange(1, 4 * MSS))
        blocks = []
        for _ in range(rng.randrange(0, 5)):
            if smax <= ack + 1:
                break
            if rng.random() < 0.1 and ack > 1:
                s = rng.randrange(1, ack)  # a DSACK below the cumulative ACK
            else:
                s = rng.randrange(ack, smax - 1)
            e = s + rng.choice([1, 100, MSS // 2, MSS, 2 * MSS])
            blocks.append((s, min(e, smax)))
        before = len(sock._sacked)
        pb.send(
            ACK,
            PISS + 1,
            ISS + ack,
            sack_blocks=tuple((ISS + s, ISS + e) for s, e in blocks),
        )
        if before == 64 and len(sock._sacked) == 64 and blocks:
            seen["overflow"] += 1
        check_scoreboard(sock, rng)
        pb.out()
        check_scoreboard(sock, rng)
        seen["nonempty"] += bool(sock._sacked)
        seen["longest"] = max(seen["longest"], len(sock._sacked))
        if sock.state is not TcpState.ESTABLISHED or sock._snd_una - ISS >= 600 * MSS:
            break
    # the run went through the writers it is meant to exercise
    assert seen["nonempty"] > 50, seen
    assert seen["mid_ack"] > 5 and seen["cleared"] > 0, seen


def test_the_range_cap_and_the_rto_reset_keep_the_total() -> None:
    # the cap: a full send buffer with every other segment lost, 400 / 2 ranges here
    pb = established(rack=False, send_buffer=400 * MSS, send_buffer_max=400 * MSS)
    sock = pb.sock
    assert sock._sacked_max == 200
    sock._cc.cwnd = 500 * MSS
    sock.send(bytes(400 * MSS))
    pb.at(0.2).out()
    assert sock._snd_max - ISS - 1 >= 400 * MSS
    # every other segment SACKed, from the top down: 200 holes, all remembered (a queue
    # overflowing in slow start drops every other segment: forgetting those SACKs made
    # the sender retransmit what had arrived)
    for k in range(200):
        s = 1 + (399 - 2 * k) * MSS
        pb.send(ACK, PISS + 1, ISS + 1, sack_blocks=((ISS + s, ISS + s + MSS),))
        check_scoreboard(sock)
    assert len(sock._sacked) == 200 and sock._sacked_bytes == 200 * MSS
    # past the cap (tiny blocks could grow it without bound) the lowest range is forgotten
    for k in range(10):
        s = 1 + (198 - 2 * k) * MSS + 10  # inside a hole: a new range
        pb.send(ACK, PISS + 1, ISS + 1, sack_blocks=((ISS + s, ISS + s + 1),))
        check_scoreboard(sock)
    assert len(sock._sacked) == 200
    assert sock._sacked_bytes == 190 * MSS + 10
    # a cumulative ACK into the middle of the lowest remaining range
    low = sock._sacked[0][0]
    pb.send(ACK, PISS + 1, low + MSS // 2)
    check_scoreboard(sock)
    assert sock._sacked_bytes == 190 * MSS - MSS // 2 + 10
    # two RTOs: the second drops the scoreboard (RFC 6675 §5.1, reneging)
    pb.at(5.0).out()
    check_scoreboard(sock)
    pb.at(30.0).out()
    check_scoreboard(sock)
    assert sock._sacked == [] and sock._sacked_bytes == 0


@pytest.mark.parametrize("rack", [True, False])
def test_running_total_in_simulated_lossy_reordering_transfers(
    rack: bool, monkeypatch: Any
) -> None:
    """Whole stacks over the simulated link: the scoreboard is checked after every segment
    and every dispatch of every socket."""
    counts = {"checks": 0, "nonempty": 0}
    rng = random.Random(5)

    def checked(name: str) -> Any:
        original = getattr(TcpSocket, name)

        def wrapper(self: TcpSocket, *args: Any) -> Any:
            res = original(self, *args)
            counts["checks"] += 1
            if self._sacked:
                counts["nonempty"] += 1
                check_scoreboard(self, rng if counts["nonempty"] % 8 == 0 else None)
            else:
                assert self._sacked_bytes == 0
            return res

        return wrapper

    for name in ("process", "fast_input", "dispatch", "retransmit_now"):
        monkeypatch.setattr(TcpSocket, name, checked(name))
    link = LinkParams(loss=0.03, reorder=0.03, reorder_delay=0.004, duplicate=0.01)
    for seed in (1, 2):
        run_transfer(
            seed,
            400_000,
            100_000,
            timeout=300.0,
            ab=link,
            ba=link,
            tcp_config=cfg(rack=rack, mss=1400, recv_buffer=1 << 20),
        )
    assert counts["nonempty"] > 200, counts


def detect_by_walk(rack: Rack, una: int, reo_wnd: float, now: float) -> tuple[int, float]:
    """RACK's loss rule over the send log as a plain walk (the rule before the bisects)."""
    xts = rack.xmit_ts
    assert xts is not None
    edge, timeout = una, 0.0
    thresh = rack.rtt + reo_wnd
    for end, t in rack.sent:
        if end <= una:
            continue
        if t > xts:
            break
        lim = int(end) if t < xts or end <= rack.end_seq else rack.end_seq
        remaining = t + thresh - now
        if remaining <= 0:
            edge = lim
        else:
            timeout = remaining
        if lim < end:
            break
    return edge, timeout


@pytest.mark.parametrize("seed", range(20))
def test_rack_detect_bisects_the_send_log_as_the_walk_did(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        rack = Rack()
        seq, t = 1000, 1.0
        for _ in range(rng.randrange(1, 40)):
            seq += rng.randrange(1, 5) * MSS
            t += rng.choice([0.0001, 0.001, 0.003, 0.01])
            rack.sent.append([seq, t])
        una = rng.randrange(1000, seq + 1)
        entry = rng.choice(rack.sent)
        # RACK.xmit_ts: an original batch's time (end_seq inside or at its end) or between
        rack.xmit_ts = entry[1] - rng.choice([0.0, 0.0, 0.00005])
        rack.end_seq = int(entry[0]) - rng.choice([0, 0, 1, MSS])
        rack.rtt = rng.choice([0.0, 0.005, 0.02])
        reo = rng.choice([0.0, 0.001, 0.005])
        now = rng.choice([e[1] for e in rack.sent]) + rng.choice([0.0, 0.005, 0.02, 0.021])
        edge, _relost, timeout = rack.detect(una, [], reo, now)
        assert (edge, timeout) == detect_by_walk(rack, una, reo, now)
