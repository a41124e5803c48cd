"""TEST ONLY: the mitm-wg addon with a stand-in tunnel that dials loopback addresses.

Instead of a WireGuard tunnel, each "tunnel" connects with the host's TCP stack and refuses
every non-loopback destination, so tests exercise the whole edge (patched open_connection
→ routing → bridge → trio → transport) against servers on 127.0.0.0/8. Shipped code knows
nothing of it: the addon takes the stand-in through its ``open_tunnel`` parameter.

In-process: ``WireGuardAddon(open_tunnel=open_loopback_tunnel)``. As a mitmproxy script
(``mitmdump -s tests/loopback_addon.py --set wg_conf=...``) it loads that addon.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from mitm_wg.config import WireGuardConfig
from mitm_wg.mitmproxy.addon import WireGuardAddon
from mitm_wg.mitmproxy.bridge import TunnelFactory
from mitm_wg.mitmproxy.ready import StartupSignal

logger = logging.getLogger(__name__)

Dial = Callable[[str, int], Awaitable[trio.abc.HalfCloseableStream]]


class DialerTunnel:
    """A stand-in tunnel that connects with a plain dial function (tests, benchmarks)."""

    def __init__(self, dial: Dial) -> None:
        self._dial = dial

    async def open_tcp_stream(self, host: str, port: int) -> trio.abc.HalfCloseableStream:
        return await self._dial(host, port)


def dialer_tunnel(dial: Dial) -> TunnelFactory:
    """A tunnel factory for :meth:`Bridge.set_tunnels` around a dial function."""

    @asynccontextmanager
    async def factory() -> AsyncIterator[DialerTunnel]:
        yield DialerTunnel(dial)

    return factory


class LoopbackTunnel(DialerTunnel):
    """A 'tunnel' that dials loopback addresses with the host stack."""

    def __init__(self, config: WireGuardConfig) -> None:
        super().__init__(self._dial)
        self.config = config

    async def _dial(self, host: str, port: int) -> trio.abc.HalfCloseableStream:
        infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
        addresses = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
        if not addresses or not all(a.is_loopback for a in addresses):
            raise OSError(
                errno.ENETUNREACH,
                f"test loopback dialer: refusing non-loopback destination {host}",
            )
        return await trio.open_tcp_stream(host, port)


@asynccontextmanager
async def open_loopback_tunnel(config: WireGuardConfig) -> AsyncIterator[LoopbackTunnel]:
    logger.warning("mitm-wg: TEST-ONLY loopback dialer instead of a WireGuard tunnel")
    yield LoopbackTunnel(config)


# StartupSignal as in mitm_wg/addon.py: tests wait for its 'mitm-wg: ready' line
addons = [WireGuardAddon(open_tunnel=open_loopback_tunnel), StartupSignal()]
