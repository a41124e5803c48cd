"""Peer endpoints given as hostnames: resolved at start, and re-resolved while running.

The endpoint lives outside the tunnel, so the host resolves it (``getaddrinfo``), never the
tunnel's DNS. As wg-quick's ``reresolve-dns`` does, a hostname endpoint is resolved again

* when a handshake with the peer keeps failing: an initiation went unanswered for
  REKEY_TIMEOUT (whitepaper §6.4), at most once per ``min_interval`` seconds per peer;
* periodically, every ``interval`` seconds (default 300), so that an exit that moved is
  followed even while nothing fails yet.

A new address is applied with :meth:`mitm_wg.wireguard.device.Device.set_endpoint` when the
name now resolves elsewhere than before, or when handshakes fail and the name resolves
elsewhere than the current endpoint (a peer that roamed to another address keeps it while it
works). A move to the other address family opens a UDP socket of that family.

The lookup is injectable (``open_tunnel(..., endpoint_lookup=...)``): ``lookup(host, port)``
returns IP address strings, preferred first; tests use it as a hosts file they control.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from mitm_wg.config import Endpoint, WireGuardConfig, format_endpoint
from mitm_wg.wireguard.timers import REKEY_TIMEOUT

if TYPE_CHECKING:
    from mitm_wg.runtime.tunnel import Tunnel

__all__ = [
    "DEFAULT_MIN_INTERVAL",
    "DEFAULT_RERESOLVE_INTERVAL",
    "EndpointLookup",
    "EndpointRefresher",
    "failing_handshake",
    "host_lookup",
    "resolve_endpoints",
]

logger = logging.getLogger(__name__)

EndpointLookup = Callable[[str, int], Awaitable[list[str]]]
#: Periodic re-resolution of hostname endpoints, seconds.
DEFAULT_RERESOLVE_INTERVAL = 300.0
#: At most one re-resolution per peer this often while its handshakes fail, seconds.
DEFAULT_MIN_INTERVAL = REKEY_TIMEOUT
#: How often the refresher looks at the peers' handshake state, seconds.
CHECK_INTERVAL = 1.0


async def host_lookup(host: str, port: int) -> list[str]:
    """The host's resolver (``getaddrinfo``), IPv4 addresses first."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0]).split("%")[0]
        if address not in addresses:
            addresses.append(address)
    return addresses


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _lookup(lookup: EndpointLookup, host: str, port: int) -> list[str]:
    try:
        addresses = [str(ipaddress.ip_address(a)) for a in await lookup(host, port)]
    except socket.gaierror as e:
        raise OSError(
            errno.EHOSTUNREACH,
            f"cannot resolve the WireGuard endpoint {format_endpoint((host, port))}: {e.strerror}",
        ) from None
    if not addresses:
        raise OSError(
            errno.EHOSTUNREACH,
            f"cannot resolve the WireGuard endpoint {format_endpoint((host, port))}: no address",
        )
    return addresses


async def resolve_endpoints(
    config: WireGuardConfig, lookup: EndpointLookup = host_lookup
) -> dict[bytes, Endpoint]:
    """Peer endpoints as IP addresses (hostnames resolved by the host: they are outside)."""
    endpoints: dict[bytes, Endpoint] = {}
    for pc in config.peers:
        if pc.endpoint is None:
            continue
        host, port = pc.endpoint.host, pc.endpoint.port
        if not _is_ip(host):
            host = (await _lookup(lookup, host, port))[0]
        endpoints[pc.public_key] = Endpoint(host, port)
    return endpoints


def failing_handshake(tunnel: Tunnel) -> str | None:
    """Why ``tunnel``'s peers look unreachable now — an initiation unanswered for
    REKEY_TIMEOUT or more (whitepaper §6.4) — or None. (Exit pools use it to tell a dead
    exit from a destination that does not answer, when a connection times out.)"""
    now = trio.current_time()
    for peer in tunnel.device.peers.values():
        started = peer.handshake_started
        if started is not None and now - started >= REKEY_TIMEOUT:
            icmp = tunnel.icmp_cause(peer, started)
            return (
                f"WireGuard peer {peer.public_key_b64} at {format_endpoint(peer.endpoint)} "
                f"has not answered the handshake for {now - started:.0f} s"
                + ("" if icmp is None else f", and {icmp}")
            )
    return None


@dataclass(eq=False)
class _Watched:
    public_key: bytes
    host: str
    port: int
    resolved: str | None  # what the name resolved to last time
    last_lookup: float


class EndpointRefresher:
    """Re-resolves the hostname endpoints of one tunnel (see module doc); run :meth:`run`
    as a task of the tunnel. ``add_socket(family)`` opens a UDP socket of another family."""

    def __init__(
        self,
        tunnel: Tunnel,
        *,
        lookup: EndpointLookup = host_lookup,
        interval: float = DEFAULT_RERESOLVE_INTERVAL,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        add_socket: Callable[[int], None] | None = None,
    ) -> None:
        if interval <= 0 or min_interval < 0:
            raise ValueError("re-resolution intervals must be positive")
        self.tunnel = tunnel
        self.lookup = lookup
        self.interval = interval
        self.min_interval = min_interval
        self.add_socket = add_socket
        now = trio.current_time()
        self.watched: list[_Watched] = []
        for pc in tunnel.config.peers:
            if pc.endpoint is None or _is_ip(pc.endpoint.host):
                continue
            peer = tunnel.device.peers.get(pc.public_key)
            current = peer.endpoint.host if peer is not None and peer.endpoint else None
            self.watched.append(
                _Watched(pc.public_key, pc.endpoint.host, pc.endpoint.port, current, now)
            )
        #: Lookups made (for status and tests).
        self.lookups = 0

    def __bool__(self) -> bool:
        return bool(self.watched)

    def _failing(self, public_key: bytes, now: float) -> bool:
        peer = self.tunnel.device.peers.get(public_key)
        # An initiation in flight for REKEY_TIMEOUT went unanswered (it is being retried).
        return (
            peer is not None
            and peer.handshake_started is not None
            and now - peer.handshake_started >= REKEY_TIMEOUT
        )

    async def run(self) -> None:
        while True:
            await trio.sleep(CHECK_INTERVAL)
            now = trio.current_time()
            for w in self.watched:
                failing = self._failing(w.public_key, now)
                if failing and now - w.last_lookup >= self.min_interval:
                    await self.refresh(w, "handshakes with it are failing")
                elif now - w.last_lookup >= self.interval:
                    await self.refresh(w, "periodic re-resolution")

    async def refresh(self, w: _Watched, why: str) -> None:
        """Resolve ``w``'s hostname now and follow a move."""
        w.last_lookup = trio.current_time()
        self.lookups += 1
        name = format_endpoint((w.host, w.port))
        try:
            addresses = await _lookup(self.lookup, w.host, w.port)
        except (OSError, ValueError) as e:
            logger.warning("WireGuard endpoint %s (%s): %s; keeping the old address", name, why, e)
            return
        peer = self.tunnel.device.peers.get(w.public_key)
        if peer is None:
            return
        current = peer.endpoint.host if peer.endpoint is not None else None
        failing = self._failing(w.public_key, trio.current_time())
        if addresses[0] != w.resolved or w.resolved not in addresses:
            chosen = current if current in addresses else addresses[0]
        elif failing and current in addresses and len(addresses) > 1:
            chosen = addresses[(addresses.index(current) + 1) % len(addresses)]  # try the next
        elif failing and current not in addresses:
            chosen = addresses[0]  # roamed away and no longer answering: back to the name
        else:
            logger.debug("WireGuard endpoint %s still resolves to %s", name, addresses)
            return
        w.resolved = addresses[0]
        if chosen == current:
            return
        family = socket.AF_INET6 if ":" in chosen else socket.AF_INET
        if family not in self.tunnel._sockets:
            if self.add_socket is None:
                logger.warning(
                    "WireGuard endpoint %s moved to %s, but the tunnel has no IPv%d socket",
                    name,
                    chosen,
                    6 if family == socket.AF_INET6 else 4,
                )
                return
            try:
                self.add_socket(family)
            except OSError as e:
                logger.warning(
                    "WireGuard endpoint %s moved to %s, but no socket of that family: %s",
                    name,
                    chosen,
                    e,
                )
                return
        previous = peer.endpoint
        self.tunnel.device.set_endpoint(w.public_key, (chosen, w.port))
        logger.info(
            "WireGuard endpoint %s of peer %s now resolves to %s (%s): following it (was %s)",
            name,
            peer.public_key_b64,
            format_endpoint((chosen, w.port)),
            why,
            format_endpoint(previous) if previous else "none",
        )
