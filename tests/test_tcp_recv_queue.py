"""The receive queue of in-order data (``Receiver._queue_data`` / ``Receiver.recv``).

Data is queued as the chunks it came in (a run of segments as one ``bytes``), small data
coalesced into bytearray tails; a read returns exactly ``min(max_bytes, available)`` bytes,
in order, whatever the chunks. Compared here with one plain buffer.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from test_fast_paths import established_pair

from mitm_wg.net import tcp_recv

_KINDS = ("bytes", "bytearray", "memoryview")


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("queue"), st.integers(1, 70_000), st.sampled_from(_KINDS)),
            st.tuples(st.just("queue"), st.integers(1, 600), st.sampled_from(_KINDS)),
            st.tuples(st.just("recv"), st.integers(1, 300_000), st.just("")),
            st.tuples(st.just("recv"), st.integers(1, 3000), st.just("")),
        ),
        max_size=60,
    ),
)
def test_reads_return_the_queued_bytes_in_order_exactly(
    seed: int, steps: list[tuple[str, int, str]]
) -> None:
    sock = established_pair(seed)
    rng = random.Random(seed)
    reference = bytearray()
    for op, size, kind in steps:
        if op == "queue":
            data = rng.randbytes(size)
            reference += data
            if kind == "bytearray":
                sock._queue_data(bytearray(data))
            elif kind == "memoryview":
                # a view into a larger packet, as the one-by-one receive path queues
                packet = rng.randbytes(52) + data + bytes(4)
                sock._queue_data(memoryview(packet)[52 : 52 + size])
                packet = b""  # (the queue must not depend on the view's packet)
            else:
                sock._queue_data(data)
        else:
            got = sock.recv(size)
            want = bytes(reference[:size])
            del reference[:size]
            assert type(got) is bytes
            assert got == want
        assert sock.recv_available == len(reference)
        assert sock.can_recv == bool(reference)
        assert sum(map(len, sock._rq)) - sock._rq_off == len(reference)
    assert sock.recv(1 << 30) == bytes(reference)
    assert sock.recv_available == 0 and sock._rq == [] and sock._rq_off == 0
    assert sock.recv(100) == b""


def test_a_whole_chunk_is_handed_on_without_a_copy() -> None:
    """A read of exactly the first chunk (a run's joined payload) returns that object."""
    sock = established_pair(1)
    run = bytes(range(256)) * 200
    sock._queue_data(run)
    assert sock.recv(len(run)) is run


def test_returned_data_does_not_change_when_more_is_queued() -> None:
    """A read of a bytearray tail returns a copy: small data queued after it (coalesced into
    that same tail) does not show in what was returned."""
    sock = established_pair(2)
    sock._queue_data(b"abc")
    first = sock.recv(2)
    sock._queue_data(b"def")
    rest = sock.recv(100)
    sock._queue_data(b"ghi")
    assert (first, rest) == (b"ab", b"cdef")
    assert sock.recv(100) == b"ghi"


def test_many_small_segments_make_few_chunks() -> None:
    """A peer sending 1-byte segments must not make the queue hold one object per byte:
    small data is coalesced into tails of up to _TAIL_MAX bytes."""
    sock = established_pair(3)
    total = 3 * tcp_recv._TAIL_MAX + 5
    for i in range(total):
        sock._queue_data(bytes((i & 0xFF,)))
    assert len(sock._rq) == 4
    assert sock.recv_available == total
    assert sock.recv(total) == bytes(i & 0xFF for i in range(total))
    # a mix: every large chunk is followed by a new tail for the small data after it
    for _ in range(10):
        sock._queue_data(bytes(tcp_recv._SMALL_DATA))
        for _ in range(100):
            sock._queue_data(b"x" * 10)
    assert len(sock._rq) == 20
    assert sock.recv_available == 10 * (tcp_recv._SMALL_DATA + 1000)
