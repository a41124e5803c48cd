"""Multi-hop: a tunnel whose WireGuard datagrams travel inside another tunnel.

``open_tunnel(inner_config, via=outer)`` builds the inner tunnel as usual (its own device,
stack and timers) but gives it a :class:`ViaTransport` instead of host UDP sockets: the
inner tunnel's encrypted datagrams are sent from UDP sockets of the *outer* tunnel's stack,
so they reach the inner peer's endpoint from the outer peer's network, and the outer peer
sees only its own ciphertext. Nothing of the inner tunnel touches the host network.

MTU. Each layer wraps a packet in an IP header (20 bytes IPv4, 40 IPv6), a UDP header
(8) and WireGuard's data header and tag (16 + 16, whitepaper §5.4.6): 60 bytes per layer
over IPv4, 80 over IPv6, the family being that of the inner peer's endpoint (wg-quick
makes the same subtraction, 80, from the route's MTU). The inner MTU is the outer
tunnel's minus that, rounded down to a multiple of 16: WireGuard pads every plaintext to a
multiple of 16 capped by the *sender's* MTU (§5.4.6), so a peer with a larger MTU (1420
on a plain wireguard-go) turns our 1340-byte packets into 1344 and the outer packet no
longer fits (1420 - 80 = 1340 over IPv6 stalled every full-sized transfer; 1328 works).
A larger MTU in the inner config would be dropped whole by the outer stack (no
fragmentation inside the tunnel), so it is lowered with a warning.

Lifetimes. The inner tunnel must close before the outer one. When the outer closes first,
its UDP sockets close, and the inner tunnel ends with ``OSError(ENETDOWN)`` naming the
outer tunnel, so nothing waits forever on a dead path.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
from typing import TYPE_CHECKING

import trio

from mitm_wg.config import Endpoint, WireGuardConfig, format_endpoint
from mitm_wg.errors import TunnelCrashed
from mitm_wg.wireguard.device import Transmit

if TYPE_CHECKING:
    from mitm_wg.runtime.tunnel import Tunnel, TunnelUdpSocket

__all__ = [
    "DEFAULT_MTU",
    "ViaTransport",
    "layer_overhead",
    "mtu_via",
    "resolve_endpoints_via",
]

logger = logging.getLogger(__name__)

#: A tunnel's MTU when its config says nothing (wg-quick's default for a 1500-byte link).
DEFAULT_MTU = 1420
#: WireGuard data message: type, reserved, receiver index, counter (16) + Poly1305 tag (16).
WIREGUARD_DATA_OVERHEAD = 32
_IP_UDP_HEADERS = {4: 20 + 8, 6: 40 + 8}
#: WireGuard pads plaintext packets to a multiple of this (whitepaper §5.4.6).
PADDING_UNIT = 16
#: Datagrams taken from the outer stack per wake-up before the reader yields.
MAX_BATCH = 256
#: Receive queue of the outer UDP socket carrying an inner tunnel: a burst of the inner
#: peer's window must fit while the inner reader waits its turn (the host path gets 4 MiB
#: kernel buffers for the same reason).
QUEUE_DATAGRAMS = 4096
QUEUE_BYTES = 4 << 20


def layer_overhead(family: int) -> int:
    """Bytes one WireGuard layer adds to a packet, for outer addresses of ``family``:
    60 for IPv4, 80 for IPv6."""
    return _IP_UDP_HEADERS[family] + WIREGUARD_DATA_OVERHEAD


def _family(endpoint: Endpoint) -> int:
    return 6 if ":" in endpoint[0] else 4


def mtu_via(outer_mtu: int, endpoints: list[Endpoint], configured: int | None) -> int:
    """The inner tunnel's MTU: the outer's minus one layer for the inner endpoints' family
    (the larger overhead if its peers use both), rounded down to WireGuard's 16-byte
    padding unit (see the module doc), never above ``configured``."""
    families = {_family(e) for e in endpoints} or {4}
    limit = (outer_mtu - max(layer_overhead(f) for f in families)) & ~(PADDING_UNIT - 1)
    return limit if configured is None or configured > limit else configured


async def resolve_endpoints_via(config: WireGuardConfig, outer: Tunnel) -> dict[bytes, Endpoint]:
    """Inner peer endpoints as IP addresses: hostnames resolve through the outer tunnel (the
    inner endpoint lives in the outer peer's network), and each must be inside the outer
    tunnel's AllowedIPs (we never send the inner tunnel's datagrams anywhere else)."""
    families = {iface.version for iface in outer.config.addresses}
    endpoints: dict[bytes, Endpoint] = {}
    for pc in config.peers:
        if pc.endpoint is None:
            continue
        host, port = pc.endpoint.host, pc.endpoint.port
        where = format_endpoint(pc.endpoint)
        try:
            addresses = await outer.resolve(host)
        except OSError as e:
            raise OSError(
                errno.EHOSTUNREACH,
                f"cannot resolve the WireGuard endpoint {where} through the outer tunnel: {e}",
            ) from None
        usable = [a for a in addresses if a.version in families]
        routed = [a for a in usable if outer.route(a) is not None]
        if not routed:
            raise OSError(
                errno.ENETUNREACH,
                f"the WireGuard endpoint {where} is not reachable through the outer tunnel "
                f"(not in its AllowedIPs, or no tunnel address of that family)",
            )
        endpoints[pc.public_key] = Endpoint(str(routed[0]), port)
    return endpoints


def config_via(
    config: WireGuardConfig, outer: Tunnel, endpoints: dict[bytes, Endpoint]
) -> WireGuardConfig:
    """``config`` with the MTU the path through ``outer`` allows (warns when lowered)."""
    mtu = mtu_via(outer.stack.mtu, list(endpoints.values()), config.mtu)
    if config.mtu is not None and mtu < config.mtu:
        logger.warning(
            "%s: MTU %d does not fit inside the outer tunnel (MTU %d); using %d",
            config.path or "the inner WireGuard config",
            config.mtu,
            outer.stack.mtu,
            mtu,
        )
    return dataclasses.replace(config, mtu=mtu)


class ViaTransport:
    """The inner tunnel's datagram path: one UDP socket per family in the outer tunnel."""

    def __init__(self, outer: Tunnel, sockets: dict[int, TunnelUdpSocket]) -> None:
        self.outer = outer
        self._sockets = sockets
        self.send_errors = 0

    @classmethod
    async def open(cls, outer: Tunnel, families: set[int], port: int | None) -> ViaTransport:
        """Bind UDP sockets (``port``, or ephemeral) in ``outer`` for each address family."""
        from mitm_wg.runtime.tunnel import TunnelUdpSocket

        sockets: dict[int, TunnelUdpSocket] = {}
        try:
            for family in sorted(families):
                udp = outer.stack.udp_bind(
                    port or 0,
                    family=family,
                    queue_limit=QUEUE_DATAGRAMS,
                    queue_bytes=QUEUE_BYTES,
                )
                sockets[family] = TunnelUdpSocket(outer, udp)
        except BaseException:
            for sock in sockets.values():
                sock.close()
            raise
        await trio.lowlevel.checkpoint()
        return cls(outer, sockets)

    def __repr__(self) -> str:
        return f"<ViaTransport through {self.outer!r}>"

    def send(self, out: list[Transmit]) -> None:
        """Send the inner tunnel's datagrams (never blocks; failures drop, as UDP does)."""
        sockets = self._sockets
        if len(sockets) == 1:
            (sock,) = sockets.values()
            self._send(sock, out)
            return
        for family, sock in sockets.items():
            batch = [t for t in out if _family(t[1]) == family]
            if batch:
                self._send(sock, batch)

    def _send(self, sock: TunnelUdpSocket, batch: list[Transmit]) -> None:
        try:
            self.send_errors += sock.sendmany_nowait(batch)
        except (OSError, trio.ClosedResourceError) as e:
            # The outer tunnel is closing: the reader ends the inner tunnel.
            self.send_errors += len(batch)
            logger.debug("inner WireGuard datagrams dropped: %s", e)

    async def run(self, inner: Tunnel) -> None:
        """Feed datagrams from the outer sockets to ``inner`` until the outer tunnel closes,
        which ends it with one ``OSError(ENETDOWN)`` naming the outer tunnel. A reader that
        crashes (a bug) ends it as :class:`TunnelCrashed`, as open_tunnel's other background
        tasks do, so the crash cannot pass for the caller's own exception."""
        try:
            async with trio.open_nursery() as nursery:
                for sock in self._sockets.values():
                    nursery.start_soon(self._reader, inner, sock)
        except BaseExceptionGroup as group:
            down, rest = group.split(lambda e: isinstance(e, OSError) and e.errno == errno.ENETDOWN)
            if rest is None and down is not None:
                # Each family's reader ends the same way when the outer tunnel closes: that
                # end goes up alone (open_tunnel's strict nursery passes a lone error on).
                raise down.exceptions[0] from None
            crashed = rest.subgroup(lambda e: isinstance(e, Exception)) if rest else None
            if crashed is None:
                raise  # cancellation: the cancel scopes above take it
            cause = crashed.exceptions[0] if len(crashed.exceptions) == 1 else crashed
            raise TunnelCrashed.of("multi-hop reader", cause) from cause

    async def _reader(self, inner: Tunnel, sock: TunnelUdpSocket) -> None:
        device, stack = inner.device, inner.stack
        out, packets = inner._datagrams, inner._packets
        while True:
            try:
                data, source = await sock.recvfrom()
            except trio.ClosedResourceError:
                # When both tunnels are being closed (the usual shutdown), let the pending
                # cancellation win instead of reporting the outer tunnel's end as an error.
                await trio.lowlevel.checkpoint()
                raise OSError(
                    errno.ENETDOWN,
                    f"the outer WireGuard tunnel this one runs through closed ({self.outer!r})",
                ) from None
            except OSError as e:  # ICMP errors from the outer network: timers handle loss
                logger.debug("inner WireGuard endpoint: %s", e)
                continue
            now = trio.current_time()
            # each run from one address to the device at once, as the outer reader does
            run = [data]
            for _ in range(MAX_BATCH):
                item = sock.recvfrom_nowait()
                if item is None:
                    break
                if item[1] != source:
                    device.receive_datagrams(run, source, now, out, packets)
                    run = []
                    source = item[1]
                run.append(item[0])
            device.receive_datagrams(run, source, now, out, packets)
            if packets:
                # Authenticated whole by the inner WireGuard layer: no inner checksum.
                stack.receive_batch(packets, now, authenticated=True)
                packets.clear()
            inner._flush(now)

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
