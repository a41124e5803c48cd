"""The asyncio⇄trio bridge and its asyncio transport, in both bridge modes.

Each test is a plain function running its own asyncio loop (the way mitmproxy runs); the
bridge starts trio as a guest of that loop or in a thread. Servers live inside the trio run
(a fake tunnel whose streams are in-memory stream pairs handled by a test coroutine) or on
loopback.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from mitm_wg.mitmproxy.bridge import Bridge, TunnelFactory
from mitm_wg.mitmproxy.transport import DEFAULT_HIGH_WATER, INBOX_LIMIT, RECEIVE_SIZE
from mitm_wg.runtime.clock import BoottimeClock
from tests.loopback_addon import dialer_tunnel

MODES = ["guest", "thread"]

Handler = Callable[[trio.abc.HalfCloseableStream], Awaitable[None]]


class PairTunnel:
    """A fake tunnel: each connection is a stream pair whose far end runs ``handler``."""

    def __init__(self, nursery: trio.Nursery, handler: Handler, lockstep: bool) -> None:
        self.nursery = nursery
        self.handler = handler
        self.lockstep = lockstep
        self.dials = 0

    async def open_tcp_stream(self, host: str, port: int) -> trio.abc.HalfCloseableStream:
        self.dials += 1
        if self.lockstep:
            near, far = trio.testing.lockstep_stream_pair()
        else:
            near, far = trio.testing.memory_stream_pair()
        near.remote_address = (host, port)  # type: ignore[attr-defined]
        near.local_address = ("10.0.0.2", 40000 + self.dials)  # type: ignore[attr-defined]
        self.nursery.start_soon(self.handler, far)
        return near


def pair_tunnel(handler: Handler, *, lockstep: bool = False) -> TunnelFactory:
    @asynccontextmanager
    async def factory() -> AsyncIterator[PairTunnel]:
        async with trio.open_nursery() as nursery:
            yield PairTunnel(nursery, handler, lockstep)
            nursery.cancel_scope.cancel()

    return factory


async def echo(stream: trio.abc.HalfCloseableStream) -> None:
    async with stream:
        while data := await stream.receive_some():
            await stream.send_all(data)
        await stream.send_eof()


async def started(mode: str, tunnels: dict[str, TunnelFactory]) -> Bridge:
    bridge = Bridge(mode)  # type: ignore[arg-type]
    await bridge.start()
    errors = await bridge.set_tunnels(tunnels)
    assert errors == dict.fromkeys(tunnels)
    return bridge


async def settle(bridge: Bridge, rounds: int = 5) -> None:
    """Let both sides run: a few asyncio→trio→asyncio round trips."""
    for _ in range(rounds):
        await bridge.run_in_trio(lambda: None)
        await asyncio.sleep(0)


async def wait_until(bridge: Bridge, predicate: Callable[[], bool], what: str) -> None:
    for _ in range(2000):
        if predicate():
            return
        await settle(bridge, 1)
        await asyncio.sleep(0.001)
    raise AssertionError(f"never happened: {what}")


@pytest.mark.parametrize("mode", MODES)
def test_echo_and_addresses(mode: str) -> None:
    async def main() -> None:
        bridge = await started(mode, {"t": pair_tunnel(echo)})
        try:
            reader, writer = await bridge.open_connection("t", "192.0.2.1", 443)
            assert writer.get_extra_info("peername") == ("192.0.2.1", 443)
            assert writer.get_extra_info("sockname") == ("10.0.0.2", 40001)
            assert writer.get_extra_info("wg_tunnel") == "t"
            for i in range(50):
                msg = b"ping %d " % i * (i + 1)
                writer.write(msg)
                await writer.drain()
                assert await reader.readexactly(len(msg)) == msg
            writer.close()
            await writer.wait_closed()
            assert bridge.opened == 1
        finally:
            await bridge.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_large_transfer_both_ways_over_loopback(mode: str) -> None:
    size = 8 * 1024 * 1024
    payload = hashlib.sha256(b"seed").digest() * (size // 32)

    async def main() -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(1 << 20):
                w.write(data)
                await w.drain()
            w.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def dial(host: str, port: int) -> trio.abc.HalfCloseableStream:
            return await trio.open_tcp_stream(host, port)

        bridge = await started(mode, {"lo": dialer_tunnel(dial)})
        try:
            reader, writer = await bridge.open_connection("lo", "127.0.0.1", port)
            assert writer.get_extra_info("peername") == ("127.0.0.1", port)

            async def send() -> None:
                view = memoryview(payload)
                for i in range(0, size, 100_000):
                    writer.write(view[i : i + 100_000])
                    await writer.drain()
                writer.write_eof()

            sender = asyncio.create_task(send())
            digest = hashlib.sha256()
            got = 0
            while data := await reader.read(65535):
                digest.update(data)
                got += len(data)
            await sender
            assert got == size
            assert digest.digest() == hashlib.sha256(payload).digest()
            writer.close()
            await writer.wait_closed()
        finally:
            await bridge.aclose()
            server.close()
            await server.wait_closed()

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_slow_trio_reader_pauses_writer(mode: str) -> None:
    """A far end that does not read: the buffer grows past high water and drain() blocks."""
    release = trio.Event()
    received = bytearray()

    async def slow(stream: trio.abc.HalfCloseableStream) -> None:
        await release.wait()
        while data := await stream.receive_some():
            received.extend(data)

    async def main() -> None:
        bridge = await started(mode, {"t": pair_tunnel(slow, lockstep=True)})
        try:
            _reader, writer = await bridge.open_connection("t", "192.0.2.1", 80)
            transport = writer.transport
            total = 4 * DEFAULT_HIGH_WATER
            writer.write(b"a" * total)
            assert transport.get_write_buffer_size() == total
            drain = asyncio.create_task(writer.drain())
            await settle(bridge)
            # Nothing can move until the far end reads: the bytes stay counted, drain waits.
            assert transport.get_write_buffer_size() == total
            assert not drain.done()
            writer.write(b"b" * 1000)  # more data while paused is accepted and counted
            assert transport.get_write_buffer_size() == total + 1000
            await bridge.run_in_trio(release.set)
            await drain
            await wait_until(bridge, lambda: len(received) == total + 1000, "all bytes arrive")
            await wait_until(bridge, lambda: transport.get_write_buffer_size() == 0, "sent")
            assert bytes(received) == b"a" * total + b"b" * 1000
            writer.close()
        finally:
            await bridge.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_write_buffer_limits(mode: str) -> None:
    async def main() -> None:
        release = trio.Event()

        async def hold(stream: trio.abc.HalfCloseableStream) -> None:
            await release.wait()
            while await stream.receive_some():
                pass

        bridge = await started(mode, {"t": pair_tunnel(hold, lockstep=True)})
        try:
            _, writer = await bridge.open_connection("t", "192.0.2.1", 80)
            transport = writer.transport
            transport.set_write_buffer_limits(high=1000)
            assert transport.get_write_buffer_limits() == (250, 1000)
            with pytest.raises(ValueError):
                transport.set_write_buffer_limits(high=10, low=20)
            writer.write(b"x" * 1000)
            drain_ok = asyncio.create_task(writer.drain())
            await settle(bridge)
            assert drain_ok.done()  # exactly at high water: not paused
            writer.write(b"x")
            drain = asyncio.create_task(writer.drain())
            await settle(bridge)
            assert not drain.done()
            await bridge.run_in_trio(release.set)
            await drain
            writer.close()
        finally:
            await bridge.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_unread_data_pauses_trio_receiver(mode: str) -> None:
    """asyncio does not read: the StreamReader pauses the transport, trio stops receiving."""
    chunk = 64 * 1024
    total = 64 * chunk
    sent = [0]
    limit = 64 * 1024

    async def firehose(stream: trio.abc.HalfCloseableStream) -> None:
        block = b"f" * chunk
        while sent[0] < total:
            await stream.send_all(block)
            sent[0] += chunk
        await stream.send_eof()

    async def main() -> None:
        bridge = await started(mode, {"t": pair_tunnel(firehose, lockstep=True)})
        try:
            reader, writer = await bridge.open_connection("t", "192.0.2.1", 80, limit=limit)
            transport = writer.transport
            await wait_until(bridge, lambda: not transport.is_reading(), "reading paused")
            await settle(bridge, 20)
            before = sent[0]
            await settle(bridge, 20)
            # Paused: the far end is stuck (the lockstep pair only moves when trio receives).
            assert sent[0] == before < total
            bound = 2 * limit + INBOX_LIMIT + RECEIVE_SIZE + chunk
            assert sent[0] <= bound
            got = 0
            while data := await reader.read(65536):
                got += len(data)
            assert got == total == sent[0]
            writer.close()
        finally:
            await bridge.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_half_close_client_first(mode: str) -> None:
    async def reply_after_eof(stream: trio.abc.HalfCloseableStream) -> None:
        data = bytearray()
        while chunk := await stream.receive_some():
            data += chunk
        await stream.send_all(b"got " + bytes(data))
        await stream.aclose()

    async def main() -> None:
        bridge = await started(mode, {"t": pair_tunnel(reply_after_eof)})
        try:
            reader, writer = await bridge.open_connection("t", "192.0.2.1", 80)
            assert writer.can_write_eof()
            writer.write(b"request")
            writer.write_eof()
            with pytest.raises(RuntimeError):
                writer.write(b"more")
            assert await reader.read() == b"got request"
            assert reader.at_eof()
            writer.close()
            await writer.wait_closed()
        finally:
            await bridge.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_half_close_server_first(mode: str) -> None:
    async def eof_then_listen(stream: trio.abc.HalfCloseableStream) -> None:
        await stream.send_all(b"banner")
        await stream.send_eof()
        data = bytearray()
        while chunk := await stream.receive_some():
            data += chunk
        assert bytes(data) == b"still talking"
        await stream.aclose()

    async def main() -> None:
        bridge = await started(mode, {"t": pair_tunnel(eof_then_listen)})
        try:
            reader, writer = await bridge.open_connection("t", "192.0.2.1", 80)
            assert await reader.read() == b"banner"
            assert reader.at_eof()
            assert not writer.is_closing()  # eof_received kept the transport open
            writer.write(b"still talking")
            writer.write_eof()
            await writer.drain()
            writer.close()
            await writer.wait_closed()  # no error: the far end's assert passed
        finally:
            await bridge.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_connection_refused_is_oserror(mode: str) -> None:
    async def main() -> None:
        # A port with nobody listening on loopback.
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()

        async def dial(host: str, port: int) -> trio.abc.HalfCloseableStream:
            return await trio.open_tcp_stream(host, port)

        bridge = await started(mode, {"lo": dialer_tunnel(dial)})
        try:
            with pytest.raises(OSError) as info:
                await bridge.open_connection("lo", "127.0.0.1", port)
            assert isinstance(info.value, ConnectionRefusedError | OSError)
            assert "via WireGuard tunnel 'lo'" in str(info.value)
            assert bridge.failed == 1
        finally:
            await bridge.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_dial_errors_keep_their_type(mode: str) -> None:
    async def refuse(host: str, port: int) -> trio.abc.HalfCloseableStream:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    async def unroutable(host: str, port: int) -> trio.abc.HalfCloseableStream:
        raise OSError(errno.ENETUNREACH, f"{host} is not in any peer's AllowedIPs")

    async def weird(host: str, port: int) -> trio.abc.HalfCloseableStream:
        raise ValueError("a bug in the tunnel")

    async def main() -> None:
        bridge = await started(
            mode,
            {
                "refuse": dialer_tunnel(refuse),
                "unroutable": dialer_tunnel(unroutable),
                "weird": dialer_tunnel(weird),
            },
        )
        try:
            with pytest.raises(ConnectionRefusedError, match="refused"):
                await bridge.open_connection("refuse", "192.0.2.1", 80)
            with pytest.raises(OSError, match="AllowedIPs") as info:
                await bridge.open_connection("unroutable", "192.0.2.1", 80)
            assert info.value.errno == errno.ENETUNREACH
            with pytest.raises(OSError, match="a bug in the tunnel"):
                await bridge.open_connection("weird", "192.0.2.1", 80)
            with pytest.raises(OSError, match="no WireGuard tunnel named 'nope'"):
                await bridge.open_connection("nope", "192.0.2.1", 80)
        finally:
            await bridge.aclose()

    asyncio.run(main())


@pytest.mark.skipif(sys.platform != "linux", reason="CLOCK_BOOTTIME is Linux's")
@pytest.mark.parametrize("mode", MODES)
def test_the_trio_run_counts_suspended_time(mode: str) -> None:
    """The edge's trio run (thread or guest) is on CLOCK_BOOTTIME, which goes on while the
    machine is suspended, as the exit's clock does: after a resume the session the exit
    dropped meanwhile is expired here too (``mitm_wg.runtime.clock``)."""

    async def main() -> None:
        bridge = Bridge(mode)  # type: ignore[arg-type]
        await bridge.start()
        try:
            before = time.clock_gettime(time.CLOCK_BOOTTIME)
            clock, now = await bridge.run_in_trio(
                lambda: (trio.lowlevel.current_clock(), trio.current_time())
            )
            after = time.clock_gettime(time.CLOCK_BOOTTIME)
            assert isinstance(clock, BoottimeClock)
            assert before <= now <= after
        finally:
            await bridge.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_tunnel_down_fails_closed_with_reason(mode: str) -> None:
    @asynccontextmanager
    async def broken() -> AsyncIterator[Any]:
        raise OSError(errno.EADDRNOTAVAIL, "the WireGuard config has no Address")
        yield  # pragma: no cover

    async def main() -> None:
        bridge = Bridge(mode)  # type: ignore[arg-type]
        await bridge.start()
        try:
            errors = await bridge.set_tunnels({"bad": broken})
            assert errors["bad"] is not None and "no Address" in errors["bad"]
            await settle(bridge)
            assert bridge.tunnels["bad"].state == "down"
            with pytest.raises(OSError, match=r"tunnel 'bad' is down: .*no Address") as info:
                await bridge.open_connection("bad", "192.0.2.1", 80)
            assert info.value.errno == errno.ENETDOWN
        finally:
            await bridge.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_cancelling_a_connect_cancels_the_dial(mode: str) -> None:
    dialing = trio.Event()
    cancelled = trio.Event()

    async def hang(host: str, port: int) -> trio.abc.HalfCloseableStream:
        dialing.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    async def main() -> None:
        bridge = await started(mode, {"t": dialer_tunnel(hang)})
        try:
            task = asyncio.create_task(bridge.open_connection("t", "192.0.2.1", 80))
            await wait_until(bridge, dialing.is_set, "dial started")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_until(bridge, cancelled.is_set, "dial cancelled in trio")
        finally:
            await bridge.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_reset_from_peer_reaches_asyncio(mode: str) -> None:
    class ResettingStream(trio.abc.HalfCloseableStream):
        async def send_all(self, data: Any) -> None:
            await trio.lowlevel.checkpoint()

        async def wait_send_all_might_not_block(self) -> None:
            await trio.lowlevel.checkpoint()

        async def send_eof(self) -> None:
            await trio.lowlevel.checkpoint()

        async def receive_some(self, max_bytes: int | None = None) -> bytes:
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError("broke") from ConnectionResetError(
                errno.ECONNRESET, "reset by peer"
            )

        async def aclose(self) -> None:
            await trio.lowlevel.checkpoint()

    async def dial(host: str, port: int) -> trio.abc.HalfCloseableStream:
        return ResettingStream()

    async def main() -> None:
        bridge = await started(mode, {"t": dialer_tunnel(dial)})
        try:
            reader, writer = await bridge.open_connection("t", "192.0.2.1", 80)
            with pytest.raises(ConnectionResetError, match="reset by peer"):
                await reader.read(100)
            assert writer.is_closing()
        finally:
            await bridge.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_shutdown_breaks_open_connections_and_refuses_new_ones(mode: str) -> None:
    async def main() -> None:
        bridge = await started(mode, {"t": pair_tunnel(echo)})
        reader, writer = await bridge.open_connection("t", "192.0.2.1", 80)
        writer.write(b"hi")
        assert await reader.readexactly(2) == b"hi"
        await bridge.aclose()
        with pytest.raises(ConnectionAbortedError):
            await reader.read(10)
        assert writer.is_closing()
        with pytest.raises(OSError, match="not running"):
            await bridge.open_connection("t", "192.0.2.1", 80)
        await bridge.aclose()  # idempotent

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_replacing_tunnels_aborts_old_connections(mode: str) -> None:
    async def main() -> None:
        bridge = await started(mode, {"old": pair_tunnel(echo)})
        try:
            reader, writer = await bridge.open_connection("old", "192.0.2.1", 80)
            assert await bridge.set_tunnels({"new": pair_tunnel(echo)}) == {"new": None}
            with pytest.raises(ConnectionAbortedError, match="tunnel"):
                await reader.read(10)
            with pytest.raises(OSError, match="no WireGuard tunnel named 'old'"):
                await bridge.open_connection("old", "192.0.2.1", 80)
            reader, writer = await bridge.open_connection("new", "192.0.2.1", 80)
            writer.write(b"new")
            assert await reader.readexactly(3) == b"new"
            assert set(bridge.tunnels) == {"new"}
            writer.close()
        finally:
            await bridge.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("mode", MODES)
def test_close_flushes_then_abort_drops(mode: str) -> None:
    received: list[bytes] = []

    async def collect(stream: trio.abc.HalfCloseableStream) -> None:
        data = bytearray()
        try:
            while chunk := await stream.receive_some():
                data += chunk
        except trio.BrokenResourceError:
            pass
        received.append(bytes(data))

    async def main() -> None:
        bridge = await started(mode, {"t": pair_tunnel(collect)})
        try:
            _, writer = await bridge.open_connection("t", "192.0.2.1", 80)
            writer.write(b"x" * 100_000)
            writer.close()
            await writer.wait_closed()
            await wait_until(bridge, lambda: len(received) == 1, "far end done")
            assert received[0] == b"x" * 100_000

            _reader, writer = await bridge.open_connection("t", "192.0.2.1", 80)
            writer.transport.abort()
            await writer.wait_closed()
            await wait_until(bridge, lambda: len(received) == 2, "far end done")
            assert writer.is_closing()
        finally:
            await bridge.aclose()

    asyncio.run(main())


def test_bad_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="guest"):
        Bridge("fibers")  # type: ignore[arg-type]


def test_peer_info_is_one_dict_for_tcp_and_udp() -> None:
    # The wg_peer extra is built in one place for TCP connections and UDP flows (issue 11).
    from mitm_wg.mitmproxy import bridge, datagram
    from mitm_wg.mitmproxy.transport import peer_info
    from tests.wgpair import B_ENDPOINT, Pair

    pair = Pair.create()
    assert bridge.peer_info is datagram.peer_info is peer_info
    assert peer_info(pair.a_peer) == {
        "public_key": pair.a_peer.public_key_b64,
        "endpoint": f"{B_ENDPOINT[0]}:{B_ENDPOINT[1]}",
    }
    pair.a_peer.endpoint = None
    assert peer_info(pair.a_peer) == {"public_key": pair.a_peer.public_key_b64}
    assert peer_info(None) is None


def test_bridge_uses_only_the_transports_public_interface() -> None:
    # Bridge drives TunnelTransport through wait_connected/attach/trio_* (issue 11), never
    # through its private members.
    import ast
    import inspect

    from mitm_wg.mitmproxy import bridge

    tree = ast.parse(inspect.getsource(bridge))
    private = sorted(
        f"{node.value.id}.{node.attr} (line {node.lineno})"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "transport"
        and node.attr.startswith("_")
    )
    assert private == []
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "transport"
    }
    assert used == {"wait_connected", "attach", "trio_attach_scope", "trio_fail", "trio_run"}


class _RecordingStream(trio.abc.HalfCloseableStream):
    """Wraps a stream; at every ``receive_some`` notes (bytes returned so far, bytes the
    asyncio protocol had been given by then)."""

    def __init__(self, inner: trio.abc.HalfCloseableStream, processed: list[int]) -> None:
        self.inner = inner
        self.processed = processed
        self.returned = 0
        self.checks: list[tuple[int, int]] = []
        self.remote_address = ("192.0.2.1", 443)
        self.local_address = ("10.0.0.2", 40001)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self.checks.append((self.returned, self.processed[0]))
        data = await self.inner.receive_some(max_bytes)
        self.returned += len(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("mode", MODES)
def test_bulk_batches_are_processed_before_trio_receives_more(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thread mode: after handing asyncio a bulk batch, the trio thread waits until the
    protocol has processed it (no GIL ping-pong); guest mode never waits (it would block its
    own loop). The bound is raised so the order is certain even on a loaded machine."""
    from mitm_wg.mitmproxy import transport as transport_module

    monkeypatch.setattr(transport_module, "YIELD_MAX_WAIT", 60.0)
    block = 100 * 1024
    assert block >= transport_module.YIELD_MIN_BATCH
    blocks = 20
    processed = [0]
    streams: list[_RecordingStream] = []

    async def dial(host: str, port: int) -> trio.abc.HalfCloseableStream:
        near, far = trio.testing.memory_stream_pair()

        async def firehose() -> None:
            for i in range(blocks):
                await far.send_all(bytes([i]) * block)
            await far.send_eof()

        trio.lowlevel.spawn_system_task(firehose)
        stream = _RecordingStream(near, processed)
        streams.append(stream)
        return stream

    class Counting(asyncio.Protocol):
        def __init__(self, done: asyncio.Future[bytes]) -> None:
            self.done = done
            self.data = bytearray()

        def data_received(self, data: bytes) -> None:
            self.data += data
            processed[0] += len(data)

        def eof_received(self) -> bool:
            self.done.set_result(bytes(self.data))
            return False

    async def main() -> None:
        bridge = await started(mode, {"t": dialer_tunnel(dial)})
        try:
            done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            transport = await bridge.connect("t", "192.0.2.1", 443, Counting(done))
            assert (transport._processed is not None) is (mode == "thread")
            data = await done
            assert data == b"".join(bytes([i]) * block for i in range(blocks))
        finally:
            await bridge.aclose()

    asyncio.run(main())
    (stream,) = streams
    assert stream.returned == blocks * block
    if mode == "thread":
        # every receive after the first found the previous batches processed
        assert stream.checks and all(done == seen for done, seen in stream.checks)
