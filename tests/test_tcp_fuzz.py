"""Hostile or random segments never raise out of a TcpSocket, and poll_at stays honest."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_tcp_playbook import SYNC_STATES, _to_state

from mitm_wg.net.tcp_wire import TcpSegment
from tcp_playbook import seg

STATES = [*SYNC_STATES]

segments = st.builds(
    lambda flags, dseq, dack, window, payload, ts, sack, mss, ws, sok: (
        flags,
        dseq,
        dack,
        window,
        payload,
        ts,
        sack,
        mss,
        ws,
        sok,
    ),
    flags=st.integers(0, 255),
    dseq=st.one_of(st.integers(-3000, 70000), st.integers(0, 2**32 - 1)),
    dack=st.one_of(st.integers(-3000, 3000), st.integers(0, 2**32 - 1)),
    window=st.integers(0, 65535),
    payload=st.binary(max_size=1200),
    ts=st.none() | st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    sack=st.lists(st.tuples(st.integers(-5000, 20000), st.integers(-5000, 20000)), max_size=4),
    mss=st.none() | st.integers(0, 65535),
    ws=st.none() | st.integers(0, 255),
    sok=st.booleans(),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    state=st.sampled_from(STATES),
    script=st.lists(st.tuples(segments, st.floats(0, 2.0)), min_size=1, max_size=12),
    data=st.binary(max_size=5000),
)
def test_random_segments_never_raise(
    state: str, script: list[tuple[tuple, float]], data: bytes
) -> None:
    pb, snd, rcv, _ = _to_state(state)
    sock = pb.sock
    if data and sock.can_send:
        sock.send(data)
    now = 0.0
    for (flags, dseq, dack, window, payload, ts, sack, mss, ws, sok), dt in script:
        now += dt
        s = seg(
            flags,
            rcv + dseq,
            snd + dack,
            window=window,
            payload=payload,
            timestamp=ts,
            sack_blocks=tuple(((snd + a) & 0xFFFFFFFF, (snd + b) & 0xFFFFFFFF) for a, b in sack),
            mss=mss,
            wscale=ws,
            sack_permitted=sok,
        )
        sock.process(s, now)  # straight in: any field values parse_tcp could produce
        out: list[TcpSegment] = []
        sock.dispatch(now, out)
        t = sock.poll_at()
        if t is not None and t <= now:
            out2: list[TcpSegment] = []
            sock.dispatch(now, out2)
            t2 = sock.poll_at()
            assert out2 or t2 is None or t2 > now, (state, sock)
        sock.recv(1 << 20)
    # drive the timers on: every deadline must lead to progress (no busy loop, no raise)
    for _ in range(200):
        t = sock.poll_at()
        if t is None:
            break
        now = max(now, t)
        out = []
        sock.dispatch(now, out)
        t2 = sock.poll_at()
        assert out or t2 is None or t2 > now, (state, sock)
