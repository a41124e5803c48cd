"""The mitmproxy addon: every upstream connection through a WireGuard tunnel.

Options (``--set NAME=VALUE``):

``wg_conf``
    WireGuard config file(s) in wg-quick format; repeat the option for several tunnels.
    A tunnel is named after its file (``mullvad.conf`` → ``mullvad``) or ``NAME=PATH``.
    Without it the addon only logs how to use it and changes nothing.
``wg_pool`` / ``wg_pool_retry``
    Exit pools ``NAME=POLICY:TUNNEL,...`` (round-robin, sticky, random) and how long a
    failing member stays out (see :mod:`mitm_wg.mitmproxy.pools`). Command: ``wg.pools``.
``wg_reresolve``
    Seconds between re-resolutions of hostname endpoints (:mod:`mitm_wg.runtime.endpoints`).
``wg_allow_direct``
    Connect directly to IP destinations outside every config's AllowedIPs (and hostnames a
    tunnel resolves to such addresses). Off by default: those connections fail.
``wg_dns``
    ``auto`` (default), ``tunnel`` or ``off``: how clients' DNS queries are answered in the
    dns/wireguard/local/transparent modes (through the tunnel; see
    :mod:`mitm_wg.mitmproxy.dns`).
``wg_via``
    Multi-hop: ``INNER=OUTER`` (repeatable) sends tunnel INNER's WireGuard traffic through
    tunnel OUTER instead of the host network; both are ``wg_conf`` names. Chains
    (``C=B``, ``B=A``) work; a loop is an error. See :mod:`mitm_wg.runtime.via`.

A connection whose tunnel is down, starting or misconfigured fails with an error saying why;
nothing silently falls back to a direct connection. UDP upstreams (DNS, QUIC, ... flows)
go through the tunnel too, with the same routing rules. Routing per connection: see
:mod:`mitm_wg.mitmproxy.routing`. Command: ``wg.status``.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import os
import re
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mitmproxy import command, exceptions

from mitm_wg.config import WireGuardConfig, format_endpoint
from mitm_wg.errors import ConfigError, NoRoute
from mitm_wg.mitmproxy import patch
from mitm_wg.mitmproxy.bridge import Bridge
from mitm_wg.mitmproxy.dns import TunnelDns
from mitm_wg.mitmproxy.pools import (
    DEFAULT_RETRY_AFTER,
    Pool,
    PoolError,
    PoolHealth,
    is_tunnel_failure,
    parse_pool_option,
)
from mitm_wg.mitmproxy.routing import INFO_KEY, METADATA_KEY, Route, check_route, chosen_route
from mitm_wg.runtime.endpoints import DEFAULT_RERESOLVE_INTERVAL
from mitm_wg.wireguard.allowed_ips import AllowedIPs
from mitm_wg.wireguard.timers import REKEY_TIMEOUT

if TYPE_CHECKING:
    from mitmproxy.connection import Client, Server
    from mitmproxy.proxy.server_hooks import ServerConnectionHookData

__all__ = ["OpenTunnel", "WireGuardAddon", "tunnel_routes"]

logger = logging.getLogger(__name__)

#: How often a pool connection still connecting looks at its member's handshake state, and
#: from when on (s): two initiation periods (whitepaper §6.4: one every REKEY_TIMEOUT, plus
#: up to 1/3 s jitter), so at least one initiation went out during the connection's wait.
POOL_WATCH_INTERVAL = 1.0
POOL_WATCH_AFTER = 2 * REKEY_TIMEOUT
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_USAGE = (
    "mitm-wg is loaded but has no WireGuard config, so it changes nothing. Use "
    "--set wg_conf=/path/to/wg0.conf (repeat for several tunnels) to send every upstream "
    "connection through WireGuard."
)


def tunnel_routes(configs: dict[str, WireGuardConfig]) -> AllowedIPs[str]:
    """Every config's AllowedIPs in one longest-prefix table naming the tunnel (the same
    table type the WireGuard core routes peers with). A prefix in several configs belongs
    to the first of them in ``wg_conf`` order."""
    routes: AllowedIPs[str] = AllowedIPs()
    for name, config in reversed(configs.items()):
        for peer in config.peers:
            for net in peer.allowed_ips:
                routes.insert(net, name)
    return routes


def parse_conf_option(values: Sequence[str]) -> dict[str, WireGuardConfig]:
    """``wg_conf`` values → ``{tunnel name: config}`` in order (raises OptionsError)."""
    configs: dict[str, WireGuardConfig] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not _NAME.match(name):
            name, path = Path(value).stem or "wg", value
        if name in configs:
            raise exceptions.OptionsError(
                f"wg_conf: two tunnels named {name!r}; name them with NAME=PATH"
            )
        try:
            config = WireGuardConfig.from_file(os.path.expanduser(path))
            config.require_peers()
        except ConfigError as exc:
            raise exceptions.OptionsError(f"wg_conf: {exc}") from None
        configs[name] = config
    _refuse_shared_identity(configs)
    return configs


def _refuse_shared_identity(configs: dict[str, WireGuardConfig]) -> None:
    """Two tunnels with the same private key towards the same peer are one client to that
    peer, which keeps one session and one endpoint per key: each handshake of one ends the
    other's session and every packet of one moves the peer's replies to it (and an
    initiation within 20 ms of the other's is dropped). They would take turns breaking each
    other, so refuse the pair. (One key with several peers is fine: one key per device
    serves all of a VPN provider's servers.)"""
    seen: dict[tuple[bytes, bytes], str] = {}
    for name, config in configs.items():
        for peer in config.peers:
            other = seen.setdefault((config.private_key, peer.public_key), name)
            if other != name:
                raise exceptions.OptionsError(
                    f"wg_conf: tunnels {other!r} ({configs[other].path or 'no file'}) and "
                    f"{name!r} ({config.path or 'no file'}) use the same PrivateKey with peer "
                    f"{peer.public_key_b64}: that peer keeps one session and one endpoint per "
                    "key, so the two would keep breaking each other's connections; give each "
                    "tunnel its own key, or keep one of them"
                )


def _parse_pools(values: Sequence[str], configs: dict[str, WireGuardConfig]) -> dict[str, Pool]:
    try:
        return parse_pool_option(values, configs)
    except PoolError as exc:
        raise exceptions.OptionsError(str(exc)) from None


#: How the addon runs one tunnel: ``open_tunnel(config)`` returns an async context manager
#: yielding a tunnel (:func:`mitm_wg.runtime.open_tunnel`; tests pass stand-ins).
OpenTunnel = Callable[[WireGuardConfig], AbstractAsyncContextManager[Any]]


def _open_wireguard_tunnel(
    config: WireGuardConfig, reresolve_interval: float = DEFAULT_RERESOLVE_INTERVAL
) -> AbstractAsyncContextManager[Any]:
    from mitm_wg.runtime import open_tunnel

    return open_tunnel(config, reresolve_interval=reresolve_interval)


def parse_via_option(values: Sequence[str], names: Sequence[str]) -> dict[str, str]:
    """``wg_via`` values → ``{inner tunnel: outer tunnel}`` (raises OptionsError)."""
    via: dict[str, str] = {}
    for value in values:
        inner, sep, outer = (part.strip() for part in value.partition("="))
        if not sep or not inner or not outer:
            raise exceptions.OptionsError(
                f"wg_via: {value!r} should be INNER=OUTER (two wg_conf tunnel names)"
            )
        for name in (inner, outer):
            if name not in names:
                raise exceptions.OptionsError(
                    f"wg_via: {value!r} names {name!r}, which is not a wg_conf tunnel "
                    f"(loaded: {', '.join(map(repr, names)) or 'none'})"
                )
        if inner in via and via[inner] != outer:
            raise exceptions.OptionsError(
                f"wg_via: tunnel {inner!r} cannot go through both {via[inner]!r} and {outer!r}"
            )
        via[inner] = outer
    for start in via:
        seen = [start]
        name = start
        while name in via:
            name = via[name]
            if name in seen:
                loop = " → ".join([*seen[seen.index(name) :], name])
                raise exceptions.OptionsError(f"wg_via: tunnels go through each other: {loop}")
            seen.append(name)
    return via


def chain_of(name: str, via: dict[str, str]) -> list[str]:
    """The tunnels ``name``'s packets pass, from the host network outwards: ``[A, B]`` for
    ``B`` via ``A``."""
    chain = [name]
    while chain[0] in via:
        chain.insert(0, via[chain[0]])
    return chain


def _open_wireguard_tunnel_via(
    config: WireGuardConfig, outer: str, bridge: Bridge
) -> AbstractAsyncContextManager[Any]:
    """Open ``config``'s tunnel through the running tunnel named ``outer`` (multi-hop)."""

    @asynccontextmanager
    async def opened() -> AsyncIterator[Any]:
        from mitm_wg.runtime import open_tunnel

        outer_tunnel = await bridge.trio_tunnel(outer)
        async with open_tunnel(config, via=outer_tunnel) as tunnel:
            yield tunnel

    return opened()


def _format_address(address: Any) -> str:
    return format_endpoint(address) if address else "?"


def _tunnel_info(name: str, connection: Any, **extra: str) -> dict[str, Any]:
    """``flow.metadata["wg"]`` for a connection through tunnel ``name`` (``connection``: the
    StreamWriter of a TCP connection or the DatagramStream of a UDP flow)."""
    info: dict[str, Any] = {"tunnel": name, **extra}
    peer = connection.get_extra_info("wg_peer")  # built by transport.peer_info
    if peer:
        info["peer"] = peer["public_key"]
        if "endpoint" in peer:
            info["endpoint"] = peer["endpoint"]
    info["local"] = _format_address(connection.get_extra_info("sockname"))
    info["remote"] = _format_address(connection.get_extra_info("peername"))
    return info


class WireGuardAddon:
    """Sends mitmproxy's upstream connections through WireGuard tunnels (see module doc)."""

    def __init__(self, open_tunnel: OpenTunnel | None = None) -> None:
        self.configs: dict[str, WireGuardConfig] = {}
        self.via: dict[str, str] = {}
        #: The configs (and wg_via) the bridge runs now (for live changes: which to keep).
        self._applied: dict[str, WireGuardConfig] = {}
        self._applied_via: dict[str, str] = {}
        self.bridge: Bridge | None = None
        self.allow_direct = False
        self._open_tunnel = open_tunnel or _open_wireguard_tunnel
        self._routes: AllowedIPs[str] = AllowedIPs()
        self._ready: asyncio.Event | None = None
        #: Set once the bridge has been handed the current tunnel set (it queues connections
        #: for tunnels still starting): new connections wait for this, not for _ready, so a
        #: slow new tunnel never holds up connections through the others (live changes).
        self._routable = asyncio.Event()
        self._apply_lock: asyncio.Lock | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._generation = 0
        self._server_info: weakref.WeakKeyDictionary[Server, dict[str, Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._client_flows: weakref.WeakKeyDictionary[Client, list[weakref.ref[Any]]] = (
            weakref.WeakKeyDictionary()
        )
        #: Exit pools (``wg_pool``) and the health of their members (pools.py).
        self.pools: dict[str, Pool] = {}
        self.pool_health = PoolHealth()
        self.reresolve_interval = DEFAULT_RERESOLVE_INTERVAL
        #: Connections made through a tunnel / directly / refused.
        self.stats = {"tunnel": 0, "direct": 0, "refused": 0}
        #: Clients' DNS queries through the tunnel (a sub-addon: mitmproxy calls its hooks).
        self.dns = TunnelDns(self)
        self.addons = [self.dns]

    # -- options and lifecycle ---------------------------------------------------------------

    def load(self, loader: Any) -> None:
        loader.add_option(
            "wg_conf",
            Sequence[str],
            [],
            "WireGuard config file(s) (wg-quick format) for upstream connections; repeat for "
            "several tunnels. A tunnel is named after its file, or use NAME=PATH.",
        )
        loader.add_option(
            "wg_pool",
            Sequence[str],
            [],
            "Exit pool(s): NAME=POLICY:TUNNEL,TUNNEL,... with POLICY round-robin, sticky (per "
            "host) or random. Use the pool name like a tunnel name; the first pool is the "
            "default route. Repeat for several pools.",
        )
        loader.add_option(
            "wg_pool_retry",
            int,
            int(DEFAULT_RETRY_AFTER),
            "Seconds a failing tunnel stays out of its exit pools before it is tried again.",
        )
        loader.add_option(
            "wg_reresolve",
            int,
            int(DEFAULT_RERESOLVE_INTERVAL),
            "Seconds between re-resolutions of hostname endpoints (they are also re-resolved "
            "when handshakes fail). Applies to tunnels started afterwards.",
        )
        loader.add_option(
            "wg_allow_direct",
            bool,
            False,
            "Connect directly (NOT through WireGuard) to destinations outside every config's "
            "AllowedIPs. Default: such connections fail.",
        )
        loader.add_option(
            "wg_via",
            Sequence[str],
            [],
            "Multi-hop: INNER=OUTER sends WireGuard tunnel INNER through tunnel OUTER (both "
            "wg_conf names) instead of the host network; repeat for more.",
        )

    def configure(self, updated: set[str]) -> None:
        from mitmproxy import ctx

        opts = ctx.options
        if "wg_allow_direct" in updated:
            self.allow_direct = bool(opts.wg_allow_direct)
        if "wg_reresolve" in updated:
            if opts.wg_reresolve <= 0:
                raise exceptions.OptionsError("wg_reresolve must be a positive number of seconds")
            self.reresolve_interval = float(opts.wg_reresolve)
        if "wg_pool_retry" in updated:
            self.pool_health.set_retry_after(float(opts.wg_pool_retry))
        if "wg_pool" in updated and not updated & {"wg_conf", "wg_via"}:
            self.pools = _parse_pools(opts.wg_pool, self.configs)
        if not updated & {"wg_conf", "wg_via"}:
            return
        configs = parse_conf_option(opts.wg_conf)
        via = parse_via_option(opts.wg_via, list(configs))
        self.pools = _parse_pools(opts.wg_pool, configs)  # OptionsError before any change
        if configs == self.configs and via == self.via and self.configs:
            return
        if configs:
            # Install now so that no connection can slip out directly while tunnels start.
            # PatchError (before any state changes) if another instance holds the patch.
            patch.install(self)
        else:
            logger.info(_USAGE)
            patch.uninstall(self)
        self.configs, self.via = configs, via
        self._routes = tunnel_routes(configs)
        self._generation += 1
        if self._ready is not None:
            self._ready.clear()
        self._routable.clear()
        self._schedule_apply()

    def _schedule_apply(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # applied by running()
        if self._ready is None:
            self._ready = asyncio.Event()
            self._apply_lock = asyncio.Lock()
        task = loop.create_task(self._apply(self._generation))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def running(self) -> None:
        if self._ready is None:
            self._ready = asyncio.Event()
            self._apply_lock = asyncio.Lock()
            await self._apply(self._generation)
        else:
            await self._ready.wait()

    async def _apply(self, generation: int) -> None:
        assert self._apply_lock is not None and self._ready is not None
        async with self._apply_lock:
            if generation != self._generation:
                return  # a newer configuration is on its way
            try:
                await self._apply_locked()
            except Exception as exc:
                logger.error("mitm-wg: cannot start the tunnels: %s", exc, exc_info=exc)
            finally:
                if generation == self._generation:
                    self._routable.set()
                    self._ready.set()

    async def _apply_locked(self) -> None:
        configs = self.configs
        if not configs:
            self._applied = {}
            if self.bridge is not None:
                bridge, self.bridge = self.bridge, None
                await bridge.aclose()
            return
        if self.bridge is None:
            bridge = Bridge()
            await bridge.start()
            self.bridge = bridge
        # A tunnel whose config (and outer tunnel, for wg_via) is unchanged keeps running,
        # with its open connections (live changes: only added, removed or edited tunnels,
        # and tunnels inside a restarted one, restart).
        applied, applied_via, via = self._applied, self._applied_via, dict(self.via)

        def unchanged(name: str) -> bool:
            if applied.get(name) != configs[name] or applied_via.get(name) != via.get(name):
                return False
            outer = via.get(name)
            return outer is None or unchanged(outer)  # wg_via has no loops (parse_via_option)

        keep = {name for name in configs if unchanged(name)}
        opener: Callable[..., AbstractAsyncContextManager[Any]] = self._open_tunnel
        if opener is _open_wireguard_tunnel:
            opener = functools.partial(opener, reresolve_interval=self.reresolve_interval)
        generation = self._generation

        def dispatched() -> None:
            if generation == self._generation:
                self._routable.set()

        bridge = self.bridge
        factories = {
            name: (
                functools.partial(_open_wireguard_tunnel_via, c, via[name], bridge)
                if name in via
                else functools.partial(opener, c)
            )
            for name, c in configs.items()
        }
        errors = await bridge.set_tunnels(factories, keep=keep, on_dispatch=dispatched)
        self._applied, self._applied_via = dict(configs), via
        for name, error in errors.items():
            if name in keep and error is None:
                continue  # still up, untouched
            where = configs[name].path or name
            if error is None:
                logger.info("mitm-wg: WireGuard tunnel %r is up (%s)", name, where)
            else:
                logger.error("mitm-wg: WireGuard tunnel %r (%s) is DOWN: %s", name, where, error)

    def done(self) -> None:
        patch.uninstall(self)
        self._applied = {}
        for task in list(self._pending):
            task.cancel()
        if self.bridge is not None:
            bridge, self.bridge = self.bridge, None
            bridge.close_soon()

    # -- routing -----------------------------------------------------------------------------

    def route_for_address(self, host: str) -> str | None:
        """The tunnel for an IP literal (longest AllowedIPs match), else None."""
        try:
            address = ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return next(iter(self.configs), None)
        return self._routes.lookup_ip(address)

    def server_connect(self, data: ServerConnectionHookData) -> None:
        """Pick up ``flow.metadata["wg_tunnel"]`` from the HTTP flow that needs this server."""
        explicit, _ = chosen_route(data.server)
        if explicit or not self.configs:
            return
        route = self._flow_route(data.client, data.server)
        if route is not None:
            from mitm_wg.mitmproxy.routing import use_tunnel

            use_tunnel(data.server, route)

    def _flow_route(self, client: Client, server: Server) -> Route:
        refs = self._client_flows.get(client)
        if not refs:
            return None
        for ref in reversed(refs):
            flow = ref()
            if flow is None or METADATA_KEY not in flow.metadata:
                continue
            request = flow.request
            target = (request.host, request.port)
            if flow.server_conn is server or target == server.address:
                return check_route(flow.metadata[METADATA_KEY])
        return None

    def _remember_flow(self, flow: Any) -> None:
        refs = self._client_flows.setdefault(flow.client_conn, [])
        refs[:] = [r for r in refs[-31:] if r() is not None]
        refs.append(weakref.ref(flow))

    async def _pick_tunnel(self, route: Route, host: str, port: int) -> str | None:
        """The tunnel for this upstream, None for "direct (allowed)", or raise (fail closed)."""
        if self._ready is not None:
            await self._routable.wait()
        if not self.configs or self.bridge is None:
            self.stats["refused"] += 1
            raise OSError(errno.ENETDOWN, "mitm-wg: no WireGuard tunnel is running")
        if isinstance(route, str):
            if route not in self.configs:
                self.stats["refused"] += 1
                raise OSError(
                    errno.ENETUNREACH,
                    f"a script chose WireGuard tunnel {route!r} for "
                    f"{format_endpoint((host, port))}, but the "
                    f"loaded tunnels are {', '.join(map(repr, self.configs))}",
                )
            return route
        name = self.route_for_address(host)
        if name is None:
            if self.allow_direct:
                return None
            self.stats["refused"] += 1
            raise NoRoute(
                errno.ENETUNREACH,
                f"{host} is outside the AllowedIPs of every WireGuard config "
                f"({', '.join(self.configs)}); not connecting directly "
                f"(set wg_allow_direct=true to allow that)",
            )
        return name

    def _through_tunnel(
        self, server: Server | None, name: str, connection: Any, **extra: str
    ) -> dict[str, Any]:
        """Bookkeeping of every connection or UDP flow made through tunnel ``name``: its
        ``flow.metadata["wg"]`` (kept for the server until the flow hooks copy it) and the
        counter ``wg.status`` shows."""
        info = _tunnel_info(name, connection, **extra)
        if server is not None:
            self._server_info[server] = info
        self.stats["tunnel"] += 1
        return info

    async def open_tcp(
        self, server: Server | None, host: str, port: int, local_addr: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Called by the patched ConnectionHandler.open_connection for every TCP upstream."""
        _, route = chosen_route(server) if server is not None else (False, None)
        if route is False:
            return await self._direct(server, host, port, local_addr, "chosen by a script")
        pool = self._pool_for(route, host)
        if pool is not None:
            return await self._open_tcp_pool(server, pool, host, port)
        name = await self._pick_tunnel(route, host, port)
        if name is None:
            return await self._direct(
                server, host, port, local_addr, "outside every AllowedIPs (wg_allow_direct)"
            )
        bridge = self.bridge
        assert bridge is not None
        if local_addr:
            logger.debug("mitm-wg: ignoring local_addr %r inside the tunnel", local_addr)
        try:
            reader, writer = await bridge.open_connection(name, host, port)
        except OSError as exc:
            # NoRoute: the tunnel resolved the name to addresses outside its AllowedIPs.
            # Decided on the type alone; any other error fails closed.
            if isinstance(exc, NoRoute) and route is None and self.allow_direct:
                return await self._direct(
                    server, host, port, local_addr, f"outside AllowedIPs of {name!r}"
                )
            self.stats["refused"] += 1
            raise
        info = self._through_tunnel(server, name, writer)
        logger.info(
            "mitm-wg: %s through tunnel %r%s",
            format_endpoint((host, port)),
            name,
            f" (peer {info['peer'][:8]}…, {info.get('endpoint', '?')})" if "peer" in info else "",
        )
        return reader, writer

    # -- exit pools (pools.py) -----------------------------------------------------------------

    def _pool_for(self, route: Route, host: str) -> Pool | None:
        """The pool a connection goes through: named by the route, or by default the first
        pool for hostnames and for IP destinations whose AllowedIPs match is a member."""
        if not self.pools:
            return None
        if isinstance(route, str):
            return self.pools.get(route)
        if route is not None:
            return None
        first = next(iter(self.pools.values()))
        try:
            ipaddress.ip_address(host.split("%")[0])
        except ValueError:
            return first
        return first if self.route_for_address(host) in first.members else None

    def _member_unusable(self, name: str) -> str | None:
        """Why pool member ``name`` cannot take a connection now, or None."""
        bridge = self.bridge
        info = bridge.tunnels.get(name) if bridge is not None else None
        if info is None or info.state in ("down", "closed"):
            why = f"tunnel {info.state if info else 'not running'}"
            # The bridge's state is authoritative (logged when the tunnel went down).
            return f"{why}: {info.error}" if info is not None and info.error else why
        return self.pool_health.reason(name)

    async def _pick_pool_member(
        self, pool: Pool, host: str, port: int, tried: Sequence[str] = ()
    ) -> str:
        if self._ready is not None:
            await self._routable.wait()
        try:
            return pool.pick(host, self._member_unusable, tried)
        except OSError as exc:
            self.stats["refused"] += 1
            raise OSError(exc.errno, f"{format_endpoint((host, port))}: {exc.strerror}") from None

    async def _open_tcp_pool(
        self, server: Server | None, pool: Pool, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Through a member of ``pool``; a member whose tunnel fails (peer silent, tunnel
        down) leaves the pool for a while and the connection tries the next one."""
        tried: list[str] = []
        while True:
            name = await self._pick_pool_member(pool, host, port, tried)
            bridge = self.bridge
            if bridge is None:
                self.stats["refused"] += 1
                raise OSError(errno.ENETDOWN, "mitm-wg: no WireGuard tunnel is running")
            try:
                opened = await self._connect_watching(bridge, name, host, port)
            except OSError as exc:
                why = is_tunnel_failure(exc)
                if why is None and isinstance(exc, TimeoutError) and bridge.running:
                    # A timeout: the destination, or a dead exit whose old session is still
                    # held? The tunnel's handshake state tells.
                    why = await bridge.tunnel_failing(name)
                if why is None:
                    self.stats["refused"] += 1
                    raise
                opened = why
            if isinstance(opened, str):
                self.pool_health.mark_down(name, opened)
                tried.append(name)
                continue
            reader, writer = opened
            self.pool_health.mark_up(name)
            self._through_tunnel(server, name, writer, pool=pool.name)
            logger.info(
                "mitm-wg: %s through tunnel %r of exit pool %r (%s)",
                format_endpoint((host, port)),
                name,
                pool.name,
                pool.policy,
            )
            return reader, writer

    async def _connect_watching(
        self, bridge: Bridge, name: str, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | str:
        """``bridge.open_connection`` through pool member ``name``, given up early (the
        reason returned) once the member's handshakes go unanswered while it connects.

        An exit that died while we held a session swallows the SYN; the retransmitted SYN
        makes the tunnel handshake again at once (``Device.handshake_if_silent``), and an
        initiation unanswered for REKEY_TIMEOUT shows the exit is gone: the connection moves
        to the next member after some 10 s instead of its whole 30 s connect timeout.

        The handshake state is consulted only once the connection has waited
        POOL_WATCH_AFTER: a handshake that has been failing since before it began (an exit
        back after an outage, its initiations retransmitted every REKEY_TIMEOUT) gets one
        retransmission inside this connection's time to be answered first."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        connect = asyncio.ensure_future(bridge.open_connection(name, host, port))
        try:
            while True:
                done, _ = await asyncio.wait({connect}, timeout=POOL_WATCH_INTERVAL)
                if done:
                    return connect.result()
                if loop.time() - started < POOL_WATCH_AFTER:
                    continue
                try:
                    why = await bridge.tunnel_failing(name)
                except OSError:
                    why = None  # the bridge stopped: the connect fails by itself
                if why is not None and not connect.done():
                    connect.cancel()
                    await asyncio.wait({connect})
                    if connect.cancelled() or connect.exception() is not None:
                        return why
                    return connect.result()  # it connected after all
        finally:
            if not connect.done():
                connect.cancel()  # we were cancelled: the attempt goes with us

    async def _direct(
        self, server: Server | None, host: str, port: int, local_addr: Any, reason: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        logger.info(
            "mitm-wg: %s DIRECT, not through WireGuard: %s", format_endpoint((host, port)), reason
        )
        if server is not None:
            self._server_info[server] = {"tunnel": False, "reason": reason}
        self.stats["direct"] += 1
        return await asyncio.open_connection(host, port, local_addr=local_addr)

    async def open_udp(self, server: Server | None, host: str, port: int, local_addr: Any) -> Any:
        """Called for every UDP upstream (DNS, QUIC/HTTP3, raw UDP flows)."""
        import mitmproxy_rs

        _, route = chosen_route(server) if server is not None else (False, None)
        if route is False:
            logger.info("mitm-wg: UDP %s DIRECT, chosen by a script", format_endpoint((host, port)))
            self.stats["direct"] += 1
            return await mitmproxy_rs.udp.open_udp_connection(host, port, local_addr=local_addr)
        pool = self._pool_for(route, host)
        if pool is not None:
            return await self._open_udp_pool(server, pool, host, port)
        name = await self._pick_tunnel(route, host, port)
        if name is None:
            logger.info(
                "mitm-wg: UDP %s DIRECT: outside every AllowedIPs", format_endpoint((host, port))
            )
            self.stats["direct"] += 1
            return await mitmproxy_rs.udp.open_udp_connection(host, port, local_addr=local_addr)
        bridge = self.bridge
        assert bridge is not None
        try:
            stream = await bridge.open_datagram(name, host, port)
        except OSError:
            self.stats["refused"] += 1
            raise
        self._through_tunnel(server, name, stream, transport="udp")
        logger.info("mitm-wg: UDP %s through tunnel %r", format_endpoint((host, port)), name)
        return stream

    async def _open_udp_pool(self, server: Server | None, pool: Pool, host: str, port: int) -> Any:
        """A UDP flow through a member of ``pool``. Nothing tells a datagram sent to a dead
        exit from one the destination ignores, so a member is judged before the flow opens:
        one whose handshakes go unanswered (an exit that died while we held a session) or
        that does not answer the handshake the flow starts leaves the pool, and the flow
        takes the next member; when none is left it fails closed (never direct)."""
        tried: list[str] = []
        while True:
            name = await self._pick_pool_member(pool, host, port, tried)
            bridge = self.bridge
            if bridge is None or not bridge.running:
                self.stats["refused"] += 1
                raise OSError(errno.ENETDOWN, "mitm-wg: no WireGuard tunnel is running")
            why = await bridge.tunnel_failing(name)
            if why is None:
                try:
                    stream = await bridge.open_datagram(name, host, port, wait_session=True)
                except OSError as exc:
                    why = is_tunnel_failure(exc)
                    if why is None:
                        self.stats["refused"] += 1
                        raise
            if why is not None:
                self.pool_health.mark_down(name, why)
                tried.append(name)
                continue
            self.pool_health.mark_up(name)
            self._through_tunnel(server, name, stream, transport="udp", pool=pool.name)
            logger.info(
                "mitm-wg: UDP %s through tunnel %r of exit pool %r (%s)",
                format_endpoint((host, port)),
                name,
                pool.name,
                pool.policy,
            )
            return stream

    # -- flow metadata -----------------------------------------------------------------------

    def _annotate(self, flow: Any) -> None:
        info = self._server_info.get(flow.server_conn)
        if info is not None:
            flow.metadata[INFO_KEY] = info

    def requestheaders(self, flow: Any) -> None:
        if self.configs:
            self._remember_flow(flow)

    def http_connect(self, flow: Any) -> None:
        if self.configs:
            self._remember_flow(flow)

    def responseheaders(self, flow: Any) -> None:
        self._annotate(flow)

    def response(self, flow: Any) -> None:
        self._annotate(flow)

    def error(self, flow: Any) -> None:
        self._annotate(flow)

    def tcp_message(self, flow: Any) -> None:
        self._annotate(flow)

    def tcp_end(self, flow: Any) -> None:
        self._annotate(flow)

    def tcp_error(self, flow: Any) -> None:
        self._annotate(flow)

    def websocket_start(self, flow: Any) -> None:
        self._annotate(flow)

    # -- commands ----------------------------------------------------------------------------

    @command.command("wg.status")
    def status(self) -> str:
        """Tunnels, peers and connection counters of mitm-wg."""
        if not self.configs:
            return _USAGE
        lines = []
        bridge = self.bridge
        mode = bridge.mode if bridge is not None else "not started"
        lines.append(
            f"mitm-wg ({mode}): {self.stats['tunnel']} connections through tunnels, "
            f"{self.stats['direct']} direct, {self.stats['refused']} refused"
        )
        for name, config in self.configs.items():
            info = bridge.tunnels.get(name) if bridge is not None else None
            state = info.state if info is not None else "not started"
            if info is not None and info.error:
                state += f": {info.error}"
            open_count = f", {info.connections} open" if info is not None else ""
            lines.append(f"  {name} ({config.path}): {state}{open_count}")
            if name in self.via:
                chain = " → ".join(["host", *chain_of(name, self.via)])
                lines.append(f"    via {self.via[name]!r} (multi-hop: {chain})")
            now = time.time()  # handshake ages as `wg show` gives them, from wall-clock times
            for peer in info.peers if info is not None else ():
                lines.append(f"    {peer.describe(now)}")
            lines += [f"    {line}" for line in (info.notes if info is not None else ())]
        text = "\n".join(lines)
        logger.info(text)
        return text

    @command.command("wg.pools")
    def pools_status(self) -> str:
        """Exit pools (wg_pool): policy and the state of each member."""
        if not self.pools:
            return "mitm-wg: no exit pools (set wg_pool=NAME=POLICY:TUNNEL,TUNNEL,...)"
        lines = []
        for pool in self.pools.values():
            members = []
            for name in pool.members:
                why = self._member_unusable(name)
                members.append(f"{name} ({'up' if why is None else 'out: ' + why})")
            lines.append(f"pool {pool.name} ({pool.policy}): {', '.join(members)}")
        text = "\n".join(lines)
        logger.info(text)
        return text
