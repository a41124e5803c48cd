"""UDP flows through the tunnel: the object mitmproxy gets instead of a mitmproxy_rs UDP stream.

mitmproxy's ``ConnectionHandler.open_connection`` uses one object as reader and writer for
UDP (``mitmproxy_rs.Stream``): ``read()`` returns one datagram, ``write()`` sends one.
:class:`DatagramStream` offers the same interface on the asyncio side; the trio side owns a
:class:`~mitm_wg.runtime.tunnel.TunnelUdpSocket` "connected" to one remote address (replies
from other sources are dropped, as a connected kernel socket does).

Datagrams cross the asyncio/trio line in batches: writes made while the trio side has not yet
picked up the previous ones ride along with them (one wake-up, one flush of the tunnel, so
equal-sized QUIC packets can leave in one UDP GSO send), and every datagram the tunnel has
queued for the flow reaches asyncio in one callback.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import ipaddress
import logging
from collections.abc import Callable
from typing import Any

import trio

from mitm_wg.config import format_endpoint
from mitm_wg.errors import NoRoute
from mitm_wg.mitmproxy.transport import peer_info

logger = logging.getLogger(__name__)

#: Datagrams held for a reader that does not read; further ones are dropped (as UDP does).
MAX_QUEUED = 1024


class DatagramStream:
    """asyncio side of one UDP flow (the interface of ``mitmproxy_rs.Stream`` for UDP)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        to_trio: Callable[..., None],
        extra: dict[str, Any],
    ) -> None:
        self._loop = loop
        self._to_trio = to_trio
        self._extra = extra
        self._queue: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closing = False
        self._ended = False  # the trio side is gone
        self._closed = loop.create_future()
        self._socket: Any = None  # TunnelUdpSocket, trio side only
        self._trio_closed = False  # close() reached the trio side (trio side only)
        self._remote: tuple[str, int] | None = None
        #: Written datagrams the trio side has not picked up yet (appended by asyncio,
        #: drained by trio; deque append/popleft are atomic).
        self._outbox: collections.deque[bytes] = collections.deque()
        self._send_scheduled = False
        self.dropped = 0

    # -- asyncio side (mitmproxy's calls) ----------------------------------------------------

    async def read(self, n: int) -> bytes:
        while not self._queue:
            if self._closing or self._ended:
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._queue.popleft()[:n]

    def write(self, data: bytes) -> None:
        if self._closing or self._ended:
            return
        self._outbox.append(bytes(data))
        if not self._send_scheduled:
            self._send_scheduled = True
            try:
                self._to_trio(self._trio_send)
            except RuntimeError:  # the bridge is gone: UDP drops silently
                self._outbox.clear()

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def write_eof(self) -> None:
        pass  # UDP has no half-close

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._wake()
        if self._ended:
            self._finish()
        else:
            try:
                self._to_trio(self._trio_close)
            except RuntimeError:  # the bridge is gone
                self._finish()

    def is_closing(self) -> bool:
        return self._closing

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "transport_protocol":
            return "udp"
        return self._extra.get(name, default)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _loop_deliver(self, datagrams: list[bytes]) -> None:
        if self._closing:
            return
        room = MAX_QUEUED - len(self._queue)
        if len(datagrams) > room:
            self.dropped += len(datagrams) - max(room, 0)
            datagrams = datagrams[: max(room, 0)]
        if datagrams:
            self._queue.extend(datagrams)
            self._wake()

    def _loop_ended(self) -> None:
        self._ended = True
        self._wake()
        if self._closing:
            self._finish()

    def _finish(self) -> None:
        if not self._closed.done():
            self._closed.set_result(None)

    # -- trio side ---------------------------------------------------------------------------

    def _trio_send(self) -> None:
        # Reset before draining: a write that finds the flag still set is drained below.
        self._send_scheduled = False
        outbox = self._outbox
        batch = []
        while outbox:
            batch.append(outbox.popleft())
        sock, remote = self._socket, self._remote
        if sock is None or remote is None or not batch:
            return  # not open yet (mitmproxy writes only after the connect) or closed
        try:
            dropped = sock.sendmany_nowait([(data, remote) for data in batch])
        except (OSError, trio.ClosedResourceError) as e:
            logger.debug("UDP send to %s failed: %s", remote, e)
            return
        if dropped:
            logger.debug("UDP flow to %s: %d datagram(s) dropped", remote, dropped)

    def _trio_close(self) -> None:
        self._trio_closed = True
        if self._socket is not None:
            self._socket.close()


async def resolve_for_udp(tunnel: Any, host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address to send a UDP flow to: the first the tunnel's resolver returns that the
    tunnel has an address family for and a peer's AllowedIPs contain.

    A UDP flow cannot try the addresses one after the other as TCP's happy eyeballs does
    (nothing says a datagram was lost), so an address the tunnel could never send to (a
    AAAA record with only IPv4 AllowedIPs, say) must not be picked when another one works.
    """
    addresses = await tunnel.resolve(host)
    families = {iface.version for iface in tunnel.config.addresses}
    usable = [a for a in addresses if a.version in families]
    if not usable:
        raise OSError(errno.EADDRNOTAVAIL, f"{host}: no address the tunnel can reach")
    for address in usable:
        if tunnel.route(address) is not None:
            return address
    return usable[0]  # the caller reports it as outside every AllowedIPs


async def run_datagram_flow(
    tunnel: Any,
    stream: DatagramStream,
    host: str,
    port: int,
    connected: Callable[[BaseException | None], None],
    to_loop: Callable[..., None],
    *,
    wait_session: bool = False,
) -> None:
    """Trio task of one UDP flow: open the socket, report, then forward replies until closed.

    ``wait_session``: report the flow open only once the peer has a WireGuard session (a
    handshake if needed), so that a silent peer fails the open with HandshakeTimeout (exit
    pools then take another member; a datagram gives no other sign of a dead exit)."""
    try:
        address = await resolve_for_udp(tunnel, host)
        if tunnel.route(address) is None:
            raise NoRoute(errno.ENETUNREACH, f"{address} is not in any WireGuard peer's AllowedIPs")
        if wait_session and hasattr(tunnel, "wait_session"):  # (test stand-ins have none)
            await tunnel.wait_session(address)
        sock = await tunnel.open_udp_socket(address.version)
    except Exception as exc:
        connected(exc)
        return
    remote = (str(address), port)  # replies' sources come back in this same text form
    stream._socket = sock
    if stream._trio_closed:
        # mitmproxy gave up (cancelled, closed) while we resolved and opened the socket.
        sock.close()
        connected(trio.ClosedResourceError("the UDP flow was closed while opening"))
        to_loop(stream._loop_ended)
        return
    stream._remote = remote
    stream._extra.update(peername=remote, sockname=sock.local_address)
    peer = peer_info(tunnel.route(address))
    if peer is not None:
        stream._extra["wg_peer"] = peer
    connected(None)
    try:
        while True:
            try:
                data, source = await sock.recvfrom()
            except trio.ClosedResourceError:
                break
            except OSError as e:  # ICMP port unreachable and friends
                logger.debug("UDP flow to %s: %s", format_endpoint((host, port)), e)
                continue
            batch = [data] if source == remote else []
            while (item := sock.recvfrom_nowait()) is not None:
                if item[1] == remote:  # else not from the server we talk to
                    batch.append(item[0])
            if batch:
                to_loop(stream._loop_deliver, batch)
    finally:
        sock.close()
        to_loop(stream._loop_ended)
