"""An asyncio Transport whose other end is a trio stream (a TunnelStream, or any
``trio.abc.HalfCloseableStream``).

One :class:`TunnelTransport` is one upstream connection. It lives on both sides of the
asyncio/trio line:

* methods named ``_loop_*`` and the public ``asyncio.Transport`` methods run in the asyncio
  loop's thread;
* methods named ``_trio_*`` run inside the trio run (a guest of the same loop, or a thread).

The bridge drives a connection through a small public interface and nothing else:
:meth:`~TunnelTransport.wait_connected` and :meth:`~TunnelTransport.attach` on the asyncio
side; :meth:`~TunnelTransport.trio_attach_scope`, :meth:`~TunnelTransport.trio_fail` and
:meth:`~TunnelTransport.trio_run` on the trio side.

The two sides share a little state guarded by one ``threading.Lock`` (uncontended in guest
mode) and wake each other with *one* callback per batch, never per byte or per packet:

* asyncio → trio: ``write()`` appends to an outbox (a bytearray). Only when the trio sender
  is parked does it schedule a wake-up; while the sender is busy in ``send_all`` further
  writes just accumulate and go out as one batch.
* trio → asyncio: the receiver appends chunks to an inbox and schedules a delivery only when
  none is pending; one delivery hands every queued chunk to ``protocol.data_received``.

Backpressure is honest both ways:

* ``get_write_buffer_size()`` is the outbox plus the batch trio is still pushing into the
  stream; above the high-water mark the protocol is paused (so ``StreamWriter.drain()``
  blocks) until the trio sender has brought it below the low-water mark.
* ``pause_reading()`` stops the trio receiver from calling ``receive_some`` (with the real
  tunnel this shrinks the advertised TCP window); so does an undelivered inbox above
  :data:`INBOX_LIMIT`.

GIL hand-off (thread mode only, ``yield_to_loop=True``): two CPU-bound Python threads that
both release the GIL often (trio at every ``recvfrom``/``sendmsg``, asyncio at every
pyOpenSSL call) hand the GIL back and forth dozens of times per batch, and every hand-off is
a futex wake-up and a context switch. So after handing a bulk batch (at least
:data:`YIELD_MIN_BATCH` bytes) to asyncio, the trio thread waits, at most
:data:`YIELD_MAX_WAIT`, until the loop has run the protocol on it (a ``call_soon`` behind
the tasks ``data_received`` woke), and lets asyncio process the batch alone. Incoming
datagrams queue in the UDP socket meanwhile (4 MiB buffers). The wait is bounded, so a busy
or stopped loop only ever costs that much; nothing depends on it for correctness.

Half-close: ``write_eof()`` → ``send_eof()`` after the outbox is flushed; EOF from the
stream → ``protocol.eof_received()`` (the transport closes itself if that returns false,
as asyncio's own transports do).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from mitm_wg.config import format_endpoint

if TYPE_CHECKING:
    from mitm_wg.wireguard.peer import Peer

__all__ = [
    "DEFAULT_HIGH_WATER",
    "INBOX_LIMIT",
    "RECEIVE_SIZE",
    "TunnelTransport",
    "peer_info",
    "stream_addresses",
]

logger = logging.getLogger(__name__)

#: ``receive_some`` size on the trio side.
RECEIVE_SIZE = 256 * 1024
#: The trio receiver parks while this many bytes wait for asyncio to take them.
INBOX_LIMIT = 512 * 1024
#: Default write-buffer high-water mark (asyncio's own default is 64 KiB).
DEFAULT_HIGH_WATER = 256 * 1024
#: Thread mode: after a delivery of at least this many bytes the trio thread lets the
#: asyncio loop process it alone (see "GIL hand-off" above) ...
YIELD_MIN_BATCH = 64 * 1024
#: ... for at most this long (seconds).
YIELD_MAX_WAIT = 0.005

#: ``schedule(fn, *args)``: run ``fn(*args)`` soon on the other side of the line.
Schedule = Callable[..., object]


def _as_connection_error(exc: BaseException, where: str) -> OSError:
    """What asyncio protocols get in ``connection_lost`` for a broken tunnel stream."""
    if isinstance(exc, OSError):
        return exc
    cause = exc.__cause__
    if isinstance(cause, OSError):
        return cause
    if isinstance(exc, trio.ClosedResourceError):
        return ConnectionAbortedError(errno.ECONNABORTED, f"{where}: stream closed")
    return ConnectionResetError(errno.ECONNRESET, f"{where}: {exc}")


def stream_addresses(stream: object) -> tuple[Any, Any]:
    """(peername, sockname) of a trio stream: TunnelStream attributes or a socket's."""
    remote = getattr(stream, "remote_address", None)
    local = getattr(stream, "local_address", None)
    if remote is None or local is None:
        sock = getattr(stream, "socket", None)
        if sock is not None:
            try:
                remote = remote or sock.getpeername()
                local = local or sock.getsockname()
            except OSError:
                pass
    if isinstance(remote, tuple):
        remote = remote[:2]
    if isinstance(local, tuple):
        local = local[:2]
    return remote, local


def peer_info(peer: Peer | None) -> dict[str, str] | None:
    """The ``wg_peer`` extra of a tunnel connection (TCP or UDP): the WireGuard peer that
    carries it, as ``{"public_key": base64, "endpoint": "host:port"}`` (no endpoint key
    while the peer has none); None without a peer (a stand-in tunnel)."""
    if peer is None:
        return None
    info = {"public_key": peer.public_key_b64}
    if peer.endpoint is not None:
        info["endpoint"] = format_endpoint(peer.endpoint)
    return info


class TunnelTransport(asyncio.Transport):
    """A stream transport for asyncio protocols, backed by a trio stream (see module doc)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        to_trio: Schedule,
        to_loop: Schedule,
        extra: dict[str, Any] | None = None,
        *,
        yield_to_loop: bool = False,
    ) -> None:
        """``yield_to_loop``: the trio side runs in another thread than ``loop`` (never in
        guest mode: the wait would block the loop itself)."""
        super().__init__(dict(extra or {}))
        self._loop = loop
        self._to_trio = to_trio
        self._to_loop = to_loop
        self._protocol: asyncio.BaseProtocol | None = None
        self._lock = threading.Lock()
        # -- asyncio side only
        self._closing = False
        self._lost = False
        self._lost_exc: BaseException | None = None
        self._eof_written = False
        self._protocol_paused = False  # we called protocol.pause_writing()
        self._high = DEFAULT_HIGH_WATER
        self._low = DEFAULT_HIGH_WATER // 4
        self._connect_future: asyncio.Future[None] = loop.create_future()
        self._eof_delivered = False
        # -- shared (under _lock)
        self._outbox = bytearray()
        self._in_flight = 0
        self._send_wake: trio.Event | None = None
        self._eof_requested = False
        self._close_requested = False
        self._abort_requested = False
        self._inbox: list[bytes] = []
        self._inbox_size = 0
        self._eof_received = False
        self._delivery_scheduled = False
        self._reading_paused = True  # until a protocol is attached
        self._recv_wake: trio.Event | None = None
        # -- GIL hand-off: set by the loop once it processed a bulk delivery
        self._processed: threading.Event | None = threading.Event() if yield_to_loop else None
        self._yield_pending = False  # asyncio side: signal after this delivery
        # -- trio side only
        self._scope: trio.CancelScope | None = None
        self._connected = False
        self._receive_error: BaseException | None = None
        #: Byte counters (written by the trio side; read anywhere).
        self.bytes_sent = 0
        self.bytes_received = 0

    def __repr__(self) -> str:
        state = "closed" if self._lost else "closing" if self._closing else "open"
        return f"<TunnelTransport {self.get_extra_info('peername')} {state}>"

    # =========================================================================================
    # asyncio side: the Transport API

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Flush what is buffered, then close the stream; ``connection_lost(None)`` follows."""
        if self._closing:
            return
        self._closing = True
        with self._lock:
            self._close_requested = True
            self._reading_paused = True
            wake = self._send_wake
            self._send_wake = None
        if wake is not None:
            self._schedule_trio(wake.set)

    def abort(self) -> None:
        """Close at once, dropping buffered data."""
        self._closing = True
        with self._lock:
            self._abort_requested = True
            self._reading_paused = True
            self._outbox = bytearray()
        self._schedule_trio(self._trio_abort)

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._closing

    def pause_reading(self) -> None:
        with self._lock:
            self._reading_paused = True

    def resume_reading(self) -> None:
        if self._closing or self._protocol is None:
            return
        with self._lock:
            self._reading_paused = False
            wake = self._take_recv_wake()
            deliver = (self._inbox or self._eof_received) and not self._delivery_scheduled
            if deliver:
                self._delivery_scheduled = True
        if deliver:
            self._loop.call_soon(self._loop_deliver)
        if wake is not None:
            self._schedule_trio(wake.set)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = DEFAULT_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._loop_check_writing()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        with self._lock:
            return len(self._outbox) + self._in_flight

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__}")
        if self._eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")
        if not data:
            return
        if self._closing:
            logger.debug("write on a closing tunnel transport dropped (%d bytes)", len(data))
            return
        with self._lock:
            self._outbox += data
            pause = not self._protocol_paused and len(self._outbox) + self._in_flight > self._high
            if pause:
                # Decided under the lock, so the trio sender sees it when it next reports.
                self._protocol_paused = True
            wake = self._send_wake
            self._send_wake = None
        if wake is not None:
            self._schedule_trio(wake.set)
        if pause:
            self._call_protocol("pause_writing")

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._eof_written or self._closing:
            return
        self._eof_written = True
        with self._lock:
            self._eof_requested = True
            wake = self._send_wake
            self._send_wake = None
        if wake is not None:
            self._schedule_trio(wake.set)

    # =========================================================================================
    # asyncio side: internals

    def _schedule_trio(self, fn: Callable[..., object], *args: object) -> None:
        try:
            self._to_trio(fn, *args)
        except (trio.RunFinishedError, RuntimeError):
            # The trio run is gone (bridge shut down): nothing will ever finish this stream.
            self._loop_connection_lost(
                ConnectionAbortedError(errno.ECONNABORTED, "the WireGuard bridge is closed")
            )

    def _take_recv_wake(self) -> trio.Event | None:
        """Under the lock: the receiver's wake-up if it may run again now."""
        wake = self._recv_wake
        if wake is not None and not self._reading_paused and self._inbox_size < INBOX_LIMIT:
            self._recv_wake = None
            return wake
        return None

    def _call_protocol(self, name: str, *args: object) -> Any:
        protocol = self._protocol
        if protocol is None:
            return None
        try:
            return getattr(protocol, name)(*args)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler(
                {
                    "message": f"protocol.{name}() failed",
                    "exception": exc,
                    "transport": self,
                    "protocol": protocol,
                }
            )
            return None

    # -- the bridge's interface, asyncio side

    async def wait_connected(self) -> None:
        """Wait until the trio side has connected the stream; raises what connecting failed
        with (an OSError the bridge built). Cancelling aborts the connection attempt."""
        try:
            await self._connect_future
        except asyncio.CancelledError:
            self.abort()
            raise

    def attach(self, protocol: asyncio.BaseProtocol) -> None:
        """Once connected: attach the protocol (``connection_made``) and start reading."""
        self._protocol = protocol
        protocol.connection_made(self)
        if self._lost:  # the stream broke between connecting and now
            self._call_protocol("connection_lost", self._lost_exc)
        elif not self._closing:
            self.resume_reading()

    def _loop_connected(self) -> None:
        fut = self._connect_future
        if not fut.done():
            fut.set_result(None)

    def _loop_connect_failed(self, exc: BaseException) -> None:
        self._closing = self._lost = True
        fut = self._connect_future
        if not fut.done():
            fut.set_exception(exc)

    def _loop_check_writing(self) -> None:
        if self._lost:
            return
        with self._lock:
            size = len(self._outbox) + self._in_flight
            resume = self._protocol_paused and size <= self._low
            pause = not self._protocol_paused and size > self._high
            if resume or pause:
                self._protocol_paused = pause
        if resume:
            self._call_protocol("resume_writing")
        elif pause:
            self._call_protocol("pause_writing")

    def _loop_deliver(self) -> None:
        try:
            self._loop_deliver_inbox()
        finally:
            if self._yield_pending:
                self._yield_pending = False
                assert self._processed is not None
                # Behind the tasks data_received woke: set once they ran their step.
                self._loop.call_soon(self._processed.set)

    def _loop_deliver_inbox(self) -> None:
        with self._lock:
            self._delivery_scheduled = False
            if self._reading_paused or self._lost:
                return
            chunks = self._inbox
            self._inbox = []
            self._inbox_size = 0
        protocol = self._protocol
        assert protocol is not None
        for i, chunk in enumerate(chunks):
            self._call_protocol("data_received", chunk)
            if self._reading_paused and i + 1 < len(chunks):
                # The protocol paused us mid-batch: keep the rest for resume_reading().
                rest = chunks[i + 1 :]
                with self._lock:
                    self._inbox[:0] = rest
                    self._inbox_size += sum(len(c) for c in rest)
                break
        with self._lock:
            eof = self._eof_received and not self._inbox and not self._reading_paused
            wake = self._take_recv_wake()
        if wake is not None:
            self._schedule_trio(wake.set)
        if eof and not self._eof_delivered:
            self._eof_delivered = True
            keep_open = self._call_protocol("eof_received")
            if not keep_open:
                self.close()

    def _loop_connection_lost(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._closing = self._lost = True
        self._lost_exc = exc
        if self._protocol is not None:
            self._call_protocol("connection_lost", exc)
        fut = self._connect_future
        if not fut.done():
            fut.set_exception(
                exc or ConnectionAbortedError(errno.ECONNABORTED, "connection aborted")
            )

    # =========================================================================================
    # trio side

    def _trio_abort(self) -> None:
        with self._lock:
            self._abort_requested = True
        if self._scope is not None:
            self._scope.cancel()

    # -- the bridge's interface, trio side

    def trio_attach_scope(self, scope: trio.CancelScope) -> bool:
        """Register the connection's cancel scope; False if asyncio already gave up."""
        self._scope = scope
        with self._lock:
            if self._abort_requested:
                scope.cancel()
                return False
        return True

    def trio_fail(self, exc: BaseException) -> None:
        """Connecting failed (or was refused before it started): ``wait_connected`` raises
        ``exc``. Ignored once :meth:`trio_run` has reported the connection."""
        if not self._connected:
            self._to_loop(self._loop_connect_failed, exc)

    async def trio_run(
        self, stream: trio.abc.HalfCloseableStream, extra: dict[str, Any] | None = None
    ) -> None:
        """Report the connection (with ``extra`` for ``get_extra_info``), then pump data both
        ways until close/abort/error; always reports connection_lost."""
        if extra:
            self._extra.update(extra)
        peername, sockname = stream_addresses(stream)
        self._extra["peername"] = peername
        self._extra["sockname"] = sockname
        self._connected = True
        self._to_loop(self._loop_connected)
        error: BaseException | None = None
        clean = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._trio_receive_loop, stream, nursery.cancel_scope)
                try:
                    await self._trio_send_loop(stream)
                    clean = True
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    error = _as_connection_error(exc, "send")
                nursery.cancel_scope.cancel()
            if not clean and error is None:
                error = self._receive_error
        finally:
            with self._lock:
                aborted = self._abort_requested
            if aborted:
                error = None
            elif error is None and not clean:
                # Cancelled from outside: the tunnel (or the whole bridge) is closing.
                error = ConnectionAbortedError(
                    errno.ECONNABORTED,
                    "the WireGuard tunnel carrying this connection was closed",
                )
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            self._to_loop(self._loop_connection_lost, error)

    async def _trio_send_loop(self, stream: trio.abc.HalfCloseableStream) -> None:
        lock = self._lock
        eof_sent = False
        while True:
            wait: trio.Event | None = None
            send_eof = False
            with lock:
                data = self._outbox
                if data:
                    self._outbox = bytearray()
                    self._in_flight = len(data)
                elif self._abort_requested:
                    return
                elif self._eof_requested and not eof_sent:
                    send_eof = True
                elif self._close_requested:
                    return
                else:
                    wait = self._send_wake = trio.Event()
            if data:
                await stream.send_all(data)
                self.bytes_sent += len(data)
                with lock:
                    self._in_flight = 0
                    notify = self._protocol_paused and len(self._outbox) <= self._low
                if notify:
                    self._to_loop(self._loop_check_writing)
            elif send_eof:
                eof_sent = True
                await stream.send_eof()
            elif wait is not None:
                await wait.wait()

    async def _trio_receive_loop(
        self, stream: trio.abc.HalfCloseableStream, scope: trio.CancelScope
    ) -> None:
        lock = self._lock
        while True:
            wait: trio.Event | None = None
            with lock:
                if self._reading_paused or self._inbox_size >= INBOX_LIMIT:
                    wait = self._recv_wake = trio.Event()
            if wait is not None:
                await wait.wait()
                continue
            try:
                data = await stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._receive_error = _as_connection_error(exc, "receive")
                scope.cancel()
                return
            processed = self._processed
            with lock:
                if data:
                    self._inbox.append(data)
                    self._inbox_size += len(data)
                else:
                    self._eof_received = True
                deliver = not self._delivery_scheduled
                self._delivery_scheduled = True
                hand_off = deliver and processed is not None and len(data) >= YIELD_MIN_BATCH
                if hand_off:
                    assert processed is not None
                    processed.clear()  # before the flag the loop side reads
                    self._yield_pending = True
            if data:
                self.bytes_received += len(data)
            if deliver:
                self._to_loop(self._loop_deliver)
                if hand_off:
                    assert processed is not None
                    # Blocking on purpose (bounded): see "GIL hand-off" in the module doc.
                    processed.wait(YIELD_MAX_WAIT)
            if not data:
                return
