"""The bridge: one trio run beside mitmproxy's asyncio loop, owning the tunnels.

The trio side runs either as a *guest* of the asyncio loop (``trio.lowlevel.start_guest_run``:
trio's tasks run on the loop's thread, trio's I/O waits happen in a helper thread) or in a
dedicated *thread* (``trio.run`` there). Both modes share everything else: each crossing is
one scheduled callback (``TrioToken.run_sync_soon`` into trio, ``loop.call_soon[_threadsafe]``
back), carrying whole batches (see :mod:`mitm_wg.mitmproxy.transport`).
The internal switch is the ``MITM_WG_BRIDGE`` environment variable (``guest`` or ``thread``);
the default and the measurements behind it are in docs/internals.md and
bench/bench_bridge.py.

Lifecycle of tunnels: :meth:`Bridge.set_tunnels` takes ``{name: factory}`` where a factory
returns an async context manager yielding a tunnel (``lambda: open_tunnel(config)``; tests
use stand-ins from tests/loopback_addon.py). Each tunnel runs in its own task and cancel scope inside the
trio run; replacing the set closes the tunnels that are not kept (their connections break
with ``ConnectionAbortedError``, and a log line says how many) and opens the new ones; the
tunnels named in ``keep`` go on running, their connections untouched (live ``wg_conf``
changes). A tunnel that fails to open, or dies, is
*down*: connections to it fail with an ``OSError`` that says why; nothing falls back to a
direct connection here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Collection, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import trio

from mitm_wg.config import format_endpoint
from mitm_wg.errors import NoRoute
from mitm_wg.mitmproxy.datagram import DatagramStream, run_datagram_flow
from mitm_wg.mitmproxy.transport import TunnelTransport, peer_info
from mitm_wg.runtime.clock import runtime_clock

__all__ = [
    "DEFAULT_MODE",
    "ENV_MODE",
    "Bridge",
    "BridgeMode",
    "TunnelFactory",
    "TunnelInfo",
    "TunnelLike",
]

logger = logging.getLogger(__name__)

BridgeMode = Literal["guest", "thread"]
#: Chosen from bench/bench_bridge.py (see docs/internals.md).
DEFAULT_MODE: BridgeMode = "thread"
#: Internal switch: ``MITM_WG_BRIDGE=guest|thread``.
ENV_MODE = "MITM_WG_BRIDGE"
#: How often the trio side refreshes the peer status shown by ``wg.status``.
STATUS_INTERVAL = 2.0


class TunnelLike(Protocol):
    """What the bridge needs from a tunnel (mitm_wg.runtime.Tunnel fits)."""

    async def open_tcp_stream(self, host: str, port: int) -> trio.abc.HalfCloseableStream: ...


TunnelFactory = Callable[[], AbstractAsyncContextManager[Any]]


@dataclass(frozen=True)
class TunnelInfo:
    """What the asyncio side knows about one tunnel (a snapshot)."""

    name: str
    state: Literal["starting", "up", "down", "closed"]
    error: str | None = None
    connections: int = 0
    peers: tuple[Any, ...] = ()  # PeerStatus snapshots, when the tunnel offers status()
    #: what its status says under its peers (TunnelStatus.notes: narrowed paths, datagrams
    #: the kernel dropped at its socket), a line each
    notes: tuple[str, ...] = ()


@dataclass(eq=False)
class _TunnelState:
    """Trio-side state of one tunnel."""

    name: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    ready: trio.Event = field(default_factory=trio.Event)
    state: Literal["starting", "up", "down", "closed"] = "starting"
    error: str | None = None
    tunnel: Any = None
    nursery: trio.Nursery | None = None
    connections: int = 0


#: Trio-side callbacks of :meth:`Bridge._trio_when_up`: start work in an up tunnel's
#: nursery, or report a tunnel that is missing (None) or down.
_Start = Callable[[_TunnelState, trio.Nursery], object]
_Fail = Callable[[_TunnelState | None], object]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _describe(exc.exceptions[0])
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _first_oserror(exc: BaseException) -> OSError | None:
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _first_oserror(sub)
            if found is not None:
                return found
    if isinstance(exc.__cause__, OSError):
        return exc.__cause__
    return None


def connect_error(tunnel: str, host: str, port: int, exc: BaseException) -> OSError:
    """The OSError mitmproxy reports for a failed dial through ``tunnel``."""
    where = f"{format_endpoint((host, port))} via WireGuard tunnel {tunnel!r}"
    found = _first_oserror(exc)
    if found is not None:
        reason = found.strerror or str(found) or type(found).__name__
        cls = type(found) if type(found).__module__ == "builtins" else OSError
        if isinstance(found, TimeoutError):
            cls = TimeoutError
        elif isinstance(found, NoRoute):
            cls = NoRoute  # the addon's wg_allow_direct decision reads this type
        err = cls(found.errno or errno.EIO, f"{where}: {reason}")
    elif isinstance(exc, trio.ClosedResourceError | trio.BrokenResourceError):
        err = OSError(errno.ENETDOWN, f"{where}: the tunnel is closed")
    else:
        logger.error("unexpected error connecting to %s", where, exc_info=exc)
        err = OSError(errno.EIO, f"{where}: {_describe(exc)}")
    err.__cause__ = exc
    return err


class Bridge:
    """Runs trio beside an asyncio loop; opens tunnel connections as asyncio streams.

    Use from the asyncio loop thread only: ``await start()``, ``await set_tunnels(...)``,
    ``await open_connection(...)``, ``await aclose()`` (or ``close_soon()`` from sync code).
    """

    def __init__(self, mode: BridgeMode | None = None) -> None:
        chosen = mode or os.environ.get(ENV_MODE) or DEFAULT_MODE
        if chosen not in ("guest", "thread"):
            raise ValueError(f"{ENV_MODE} must be 'guest' or 'thread', not {chosen!r}")
        self.mode: BridgeMode = chosen  # type: ignore[assignment]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop = trio.Event()
        self._started: asyncio.Future[None] | None = None
        self._done: asyncio.Future[None] | None = None
        self._thread: threading.Thread | None = None
        self._tunnels: dict[str, _TunnelState] = {}  # trio side
        self._closing = False
        self._failure: str | None = None
        self._close_task: asyncio.Task[None] | None = None
        #: Snapshots for the asyncio side, by tunnel name.
        self.tunnels: dict[str, TunnelInfo] = {}
        #: Connections opened / failed (asyncio side counters).
        self.opened = 0
        self.failed = 0

    def __repr__(self) -> str:
        return f"<Bridge mode={self.mode} tunnels={list(self.tunnels)}>"

    @property
    def running(self) -> bool:
        return self._token is not None and not self._closing and self._failure is None

    # -- crossing the line ------------------------------------------------------------------

    def _to_trio(self, fn: Callable[..., object], *args: object) -> None:
        token = self._token
        if token is None:
            raise RuntimeError("the WireGuard bridge is not running")
        token.run_sync_soon(fn, *args)

    def _to_loop(self, _fn: Callable[..., object], *_args: object) -> None:
        # Replaced in start() by loop.call_soon (guest) or call_soon_threadsafe (thread).
        raise RuntimeError("the WireGuard bridge is not running")

    def _to_loop_threadsafe(self, fn: Callable[..., object], *args: object) -> None:
        loop = self._loop
        assert loop is not None
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the trio run (returns once it is running)."""
        if self._loop is not None:
            raise RuntimeError("Bridge.start() called twice")
        loop = self._loop = asyncio.get_running_loop()
        self._started = loop.create_future()
        self._done = loop.create_future()
        if self.mode == "guest":
            self._to_loop = loop.call_soon  # type: ignore[method-assign]
            trio.lowlevel.start_guest_run(
                self._trio_main,
                run_sync_soon_threadsafe=loop.call_soon_threadsafe,
                run_sync_soon_not_threadsafe=loop.call_soon,
                done_callback=self._on_guest_done,
                host_uses_signal_set_wakeup_fd=True,
                clock=runtime_clock(),
            )
        else:
            self._to_loop = self._to_loop_threadsafe  # type: ignore[method-assign]
            self._thread = threading.Thread(
                target=self._thread_main, name="mitm-wg-trio", daemon=True
            )
            self._thread.start()
        await asyncio.shield(self._started)
        logger.debug("trio bridge running (%s mode)", self.mode)

    def _thread_main(self) -> None:
        error: BaseException | None = None
        try:
            trio.run(self._trio_main, clock=runtime_clock())
        except BaseException as exc:
            error = exc
        self._to_loop_threadsafe(self._loop_trio_done, error)

    def _on_guest_done(self, outcome: Any) -> None:
        error: BaseException | None = None
        try:
            outcome.unwrap()
        except BaseException as exc:
            error = exc
        self._loop_trio_done(error)

    def _loop_trio_done(self, error: BaseException | None) -> None:
        if error is not None:
            self._failure = _describe(error)
            logger.error("the WireGuard trio bridge stopped: %s", self._failure, exc_info=error)
        self._token = None
        for name, info in list(self.tunnels.items()):
            if info.state in ("up", "starting"):
                self.tunnels[name] = TunnelInfo(name, "closed", info.error)
        assert self._started is not None and self._done is not None
        if not self._started.done():
            self._started.set_exception(
                RuntimeError(f"the WireGuard bridge failed to start: {self._failure}")
            )
        if not self._done.done():
            self._done.set_result(None)

    async def aclose(self) -> None:
        """Close every tunnel and connection and end the trio run."""
        self._request_stop()
        if self._done is None:
            return
        cancelled: asyncio.CancelledError | None = None
        while not self._done.done():
            try:
                await asyncio.shield(self._done)
            except asyncio.CancelledError as exc:
                # Keep waiting: in guest mode trio only finishes while the loop runs it.
                cancelled = exc
        if self._thread is not None:
            self._thread.join()
        if cancelled is not None:
            raise cancelled

    def close_soon(self) -> None:
        """Start closing from synchronous code (an addon's ``done`` hook).

        Thread mode finishes here (joins the trio thread); guest mode needs the loop to keep
        running, so a task finishes the job.
        """
        self._request_stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
        elif self._done is not None and not self._done.done() and self._close_task is None:
            assert self._loop is not None
            self._close_task = self._loop.create_task(self.aclose())

    def _request_stop(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._token is not None:
            try:
                self._to_trio(self._stop.set)
            except (trio.RunFinishedError, RuntimeError):
                pass

    async def _trio_main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._to_loop(self._loop_started)
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def _loop_started(self) -> None:
        assert self._started is not None
        if not self._started.done():
            self._started.set_result(None)

    # -- tunnels -----------------------------------------------------------------------------

    async def set_tunnels(
        self,
        factories: Mapping[str, TunnelFactory],
        keep: Collection[str] = (),
        *,
        on_dispatch: Callable[[], None] | None = None,
    ) -> dict[str, str | None]:
        """Replace the running tunnels; returns ``{name: error or None}`` once all are up/down.

        A name in ``keep`` that is running already keeps its tunnel, and so its open
        connections, untouched (the caller decided its configuration did not change); every
        other running tunnel not in ``factories`` is closed, its connections aborted.
        ``on_dispatch()`` is called once the trio side has the new set queued: connections
        opened from then on see it (tunnels still starting queue them).
        """
        self._check_running()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, str | None]] = loop.create_future()
        kept = {
            name
            for name in keep
            if name in factories
            and name in self.tunnels
            and self.tunnels[name].state in ("starting", "up")
        }
        for name in factories:
            if name not in kept:
                self.tunnels[name] = TunnelInfo(name, "starting")
        for name in list(self.tunnels):
            if name not in factories:
                del self.tunnels[name]
        self._to_trio(self._trio_set_tunnels, dict(factories), kept, fut)
        if on_dispatch is not None:
            on_dispatch()
        return await fut

    def _trio_set_tunnels(
        self,
        factories: dict[str, TunnelFactory],
        keep: set[str],
        fut: asyncio.Future[dict[str, str | None]],
    ) -> None:
        assert self._nursery is not None
        # Built aside and swapped in one assignment: the loop thread reads self._tunnels
        # (_loop_publish) and must never see a half-filled dict.
        old = self._tunnels
        new: dict[str, _TunnelState] = {}
        for name, st in old.items():
            if name in keep and name in factories and st.state in ("starting", "up"):
                new[name] = st  # unchanged: same tunnel, same connections
                continue
            if st.state in ("starting", "up"):
                why = "removed" if name not in factories else "reconfigured"
                logger.info(
                    "mitm-wg: WireGuard tunnel %r %s: closing it and its %d open connection%s",
                    name,
                    why,
                    st.connections,
                    "" if st.connections == 1 else "s",
                )
            st.scope.cancel()
        started: list[str] = []
        for name in factories:
            if name not in new:
                new[name] = _TunnelState(name)
                started.append(name)
        self._tunnels = new
        for name in started:
            self._nursery.start_soon(self._trio_run_tunnel, new[name], factories[name])
        # Ordered as ``factories``; kept tunnels report their current state at once.
        self._nursery.start_soon(self._trio_report_ready, [new[name] for name in factories], fut)

    async def _trio_report_ready(
        self, states: list[_TunnelState], fut: asyncio.Future[dict[str, str | None]]
    ) -> None:
        for st in states:
            await st.ready.wait()
        result = {st.name: st.error for st in states}
        self._to_loop(lambda: fut.done() or fut.set_result(result))

    def _publish(
        self, st: _TunnelState, peers: tuple[Any, ...] = (), notes: tuple[str, ...] = ()
    ) -> None:
        info = TunnelInfo(st.name, st.state, st.error, st.connections, peers, notes)
        self._to_loop(self._loop_publish, st, info)

    def _loop_publish(self, st: _TunnelState, info: TunnelInfo) -> None:
        current = self.tunnels.get(info.name)
        # Only the current tunnel of a name speaks for it: a replaced one reports "closed"
        # after its successor started.
        if current is not None and self._tunnels.get(info.name) is st:
            self.tunnels[info.name] = info

    async def _trio_run_tunnel(self, st: _TunnelState, factory: TunnelFactory) -> None:
        with st.scope:
            try:
                async with factory() as tunnel, trio.open_nursery() as connections:
                    st.tunnel, st.nursery, st.state = tunnel, connections, "up"
                    st.ready.set()
                    self._publish(st)
                    logger.debug("WireGuard tunnel %r is up", st.name)
                    await self._trio_poll_status(st)
            except Exception as exc:
                st.error = _describe(exc)
                logger.error("WireGuard tunnel %r is down: %s", st.name, st.error)
        st.tunnel = st.nursery = None
        st.state = "down" if st.error else "closed"
        st.ready.set()
        self._publish(st)

    async def trio_tunnel(self, name: str) -> Any:
        """Trio side: tunnel ``name`` once it is up, for another tunnel that runs through it
        (multi-hop); ``OSError(ENETDOWN)`` when it is missing or down."""
        st = self._tunnels.get(name)
        if st is None:
            raise OSError(errno.ENETDOWN, f"there is no WireGuard tunnel named {name!r}")
        await st.ready.wait()
        if st.tunnel is None:
            raise OSError(
                errno.ENETDOWN, f"the WireGuard tunnel {name!r} is down: {st.error or st.state}"
            )
        return st.tunnel

    async def _trio_poll_status(self, st: _TunnelState) -> None:
        status = getattr(st.tunnel, "status", None)
        while True:
            peers: tuple[Any, ...] = ()
            notes: tuple[str, ...] = ()
            if status is not None:
                try:
                    snapshot = status()
                    peers = tuple(snapshot.peers)
                    notes = tuple(getattr(snapshot, "notes", ()))
                except Exception as exc:  # status is informative only
                    logger.debug("tunnel %r status() failed: %s", st.name, exc)
            self._publish(st, peers, notes)
            await trio.sleep(STATUS_INTERVAL)

    # -- connections -------------------------------------------------------------------------

    def _check_running(self) -> None:
        if self._failure is not None:
            raise OSError(errno.ENETDOWN, f"the WireGuard bridge stopped: {self._failure}")
        if self._token is None or self._closing:
            raise OSError(errno.ENETDOWN, "the WireGuard bridge is not running")

    async def open_connection(
        self, tunnel: str, host: str, port: int, *, limit: int = 2**16
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Like ``asyncio.open_connection``, through ``tunnel``."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport = await self.connect(tunnel, host, port, protocol)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        return reader, writer

    async def connect(
        self, tunnel: str, host: str, port: int, protocol: asyncio.BaseProtocol
    ) -> TunnelTransport:
        """Connect ``protocol`` through ``tunnel`` (``connection_made`` is called on success)."""
        self._check_running()
        loop = asyncio.get_running_loop()
        transport = TunnelTransport(
            loop,
            self._to_trio,
            self._to_loop,
            {"wg_tunnel": tunnel},
            yield_to_loop=self.mode == "thread",
        )
        try:
            self._to_trio(self._trio_spawn, transport, tunnel, host, port)
        except (trio.RunFinishedError, RuntimeError):
            raise OSError(errno.ENETDOWN, "the WireGuard bridge is not running") from None
        try:
            await transport.wait_connected()
        except OSError:
            self.failed += 1
            raise
        self.opened += 1
        transport.attach(protocol)
        return transport

    def _trio_when_up(
        self,
        name: str,
        start: _Start,
        fail: _Fail,
    ) -> None:
        """Trio side, the one way into a tunnel: ``start(st, its nursery)`` once tunnel
        ``name`` is up (waiting while it starts, then looking it up again: a live change may
        have replaced it), or ``fail(st)`` when it is missing (None) or down."""
        st = self._tunnels.get(name)
        if st is not None and st.state == "starting" and self._nursery is not None:
            self._nursery.start_soon(self._trio_wait_up, st, start, fail)
        elif st is None or st.nursery is None or st.tunnel is None:
            fail(st)
        else:
            start(st, st.nursery)

    async def _trio_wait_up(
        self,
        st: _TunnelState,
        start: _Start,
        fail: _Fail,
    ) -> None:
        await st.ready.wait()
        self._trio_when_up(st.name, start, fail)

    def _trio_spawn(self, transport: TunnelTransport, name: str, host: str, port: int) -> None:
        def start(st: _TunnelState, nursery: trio.Nursery) -> None:
            nursery.start_soon(self._trio_connection, st, transport, host, port)

        def fail(st: _TunnelState | None) -> None:
            where = format_endpoint((host, port))
            if st is None:
                why = f"{where}: no WireGuard tunnel named {name!r}"
            else:
                why = f"{where}: the WireGuard tunnel {name!r} is down: {st.error or st.state}"
            transport.trio_fail(OSError(errno.ENETDOWN, why))

        self._trio_when_up(name, start, fail)

    async def _trio_connection(
        self, st: _TunnelState, transport: TunnelTransport, host: str, port: int
    ) -> None:
        scope = trio.CancelScope()
        if not transport.trio_attach_scope(scope):
            return
        try:
            with scope:
                try:
                    stream = await st.tunnel.open_tcp_stream(host, port)
                except Exception as exc:
                    transport.trio_fail(connect_error(st.name, host, port, exc))
                    return
                peer = peer_info(getattr(stream, "peer", None))
                st.connections += 1
                try:
                    await transport.trio_run(stream, {"wg_peer": peer} if peer else None)
                finally:
                    st.connections -= 1
        except trio.Cancelled:
            # (trio_fail is ignored once the connection was reported.)
            transport.trio_fail(
                ConnectionAbortedError(
                    errno.ECONNABORTED,
                    f"{format_endpoint((host, port))}: WireGuard tunnel {st.name!r} closed "
                    "while connecting",
                )
            )
            raise
        except Exception:  # a bug: never let it take the tunnel down with it
            logger.exception(
                "connection to %s via %r crashed", format_endpoint((host, port)), st.name
            )
        if scope.cancelled_caught:
            transport.trio_fail(ConnectionAbortedError(errno.ECONNABORTED, "connect aborted"))

    async def open_datagram(
        self, tunnel: str, host: str, port: int, *, wait_session: bool = False
    ) -> DatagramStream:
        """A UDP flow to ``host``:``port`` through ``tunnel`` (mitmproxy_rs.Stream-like).

        ``wait_session``: open only once the peer has a session (HandshakeTimeout, as the
        cause of the OSError, when it stays silent; see ``run_datagram_flow``)."""
        self._check_running()
        loop = asyncio.get_running_loop()
        stream = DatagramStream(loop, self._to_trio, {"wg_tunnel": tunnel})
        fut: asyncio.Future[None] = loop.create_future()

        def loop_connected(exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(connect_error(tunnel, host, port, exc))

        def connected(exc: BaseException | None) -> None:
            self._to_loop(loop_connected, exc)

        def start(st: _TunnelState, nursery: trio.Nursery) -> None:
            nursery.start_soon(
                functools.partial(
                    run_datagram_flow,
                    st.tunnel,
                    stream,
                    host,
                    port,
                    connected,
                    self._to_loop,
                    wait_session=wait_session,
                )
            )

        def fail(st: _TunnelState | None) -> None:
            state = "missing" if st is None else (st.error or st.state)
            connected(
                OSError(
                    errno.ENETDOWN,
                    f"{format_endpoint((host, port))}: the WireGuard tunnel {tunnel!r} is not "
                    f"up ({state})",
                )
            )

        self._to_trio(self._trio_when_up, tunnel, start, fail)
        try:
            await fut
        except asyncio.CancelledError:
            stream.close()
            raise
        except OSError:
            self.failed += 1
            raise
        self.opened += 1
        return stream

    async def call_in_tunnel(self, tunnel: str, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        """``await fn(tunnel_object)`` inside the trio run, in ``tunnel``'s nursery; its result.

        Waits while the tunnel is starting; ``OSError(ENETDOWN)`` when it is missing or down
        (never anything outside the tunnel). Exceptions of ``fn`` reach the caller as they
        are; cancelling the caller cancels ``fn``, and closing the tunnel aborts it with
        ``ConnectionAbortedError``.
        """
        self._check_running()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        scope = trio.CancelScope()

        def loop_done(error: BaseException | None, result: Any) -> None:
            if fut.done():
                return
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(error)

        async def run(st: _TunnelState) -> None:
            # stays the error unless fn finishes (cancelled here, or the tunnel closed)
            error: BaseException | None = ConnectionAbortedError(
                errno.ECONNABORTED, f"WireGuard tunnel {tunnel!r} closed or the call cancelled"
            )
            result: Any = None
            try:
                with scope:
                    try:
                        result = await fn(st.tunnel)
                        error = None
                    except Exception as exc:
                        error = exc
            finally:
                self._to_loop(loop_done, error, result)

        def start(st: _TunnelState, nursery: trio.Nursery) -> None:
            nursery.start_soon(run, st)

        def fail(st: _TunnelState | None) -> None:
            state = "missing" if st is None else (st.error or st.state)
            error = OSError(errno.ENETDOWN, f"the WireGuard tunnel {tunnel!r} is not up ({state})")
            self._to_loop(loop_done, error, None)

        self._to_trio(self._trio_when_up, tunnel, start, fail)
        try:
            return await fut
        except asyncio.CancelledError:
            with contextlib.suppress(RuntimeError, trio.RunFinishedError):
                self._to_trio(scope.cancel)
            raise

    # -- misc --------------------------------------------------------------------------------

    async def tunnel_failing(self, name: str) -> str | None:
        """Why tunnel ``name``'s peer looks unreachable now (handshakes unanswered), or None
        (also for stand-in tunnels without a WireGuard device)."""
        from mitm_wg.runtime.endpoints import failing_handshake

        def check() -> str | None:
            st = self._tunnels.get(name)
            tunnel = st.tunnel if st is not None else None
            if tunnel is None or getattr(tunnel, "device", None) is None:
                return None
            return failing_handshake(tunnel)

        result: str | None = await self.run_in_trio(check)
        return result

    async def run_in_trio(self, fn: Callable[[], Any]) -> Any:
        """Run a synchronous ``fn()`` inside the trio run and return its result (tests, status)."""
        self._check_running()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def call() -> None:
            try:
                result = fn()
            except BaseException as exc:
                self._to_loop(lambda e=exc: fut.done() or fut.set_exception(e))
            else:
                self._to_loop(lambda: fut.done() or fut.set_result(result))

        self._to_trio(call)
        return await fut
