"""DNS queries of mitmproxy's clients, answered through the WireGuard tunnel.

In the proxy modes where mitmproxy sees its clients' own DNS queries -- ``dns``,
``wireguard``, ``local``, ``transparent`` and ``tun`` -- mitmproxy's built-in
``dns_resolver`` addon would answer them with this host's name servers (mitmproxy_rs's
resolver or ``getaddrinfo``), outside the tunnel, or forward them to wherever the client sent
them. With mitm-wg loaded, the ``dns_request`` hook here answers them instead: the query
message is forwarded as it is (every record type, class, flag and EDNS option; only the id
is replaced) to DNS servers *through the tunnel* by :meth:`mitm_wg.runtime.dns.Resolver.forward`,
and the server's reply becomes ``flow.response``.

Which servers (the "plan"):

* ``dns_name_servers`` (mitmproxy's option), when the user set it: each server through the
  tunnel whose AllowedIPs contain it (longest match, as every connection is routed). A
  server outside every tunnel's AllowedIPs is a configuration error: nothing is queried
  outside a tunnel.
* otherwise the ``DNS =`` servers of the first tunnel in ``wg_conf`` (the tunnel host names
  of upstream connections use too).

The option ``wg_dns``:

``auto`` (default)
    answer through the tunnel when the plan has servers; when it has none (no ``DNS =``,
    no ``dns_name_servers``), log a warning at start that clients' names are resolved by
    mitmproxy's own resolver on this host, outside the tunnel, and leave them to it.
``tunnel``
    require the tunnel: refuse to start (an option error naming the config file) when there
    are no servers to ask through it.
``off``
    leave DNS flows to mitmproxy (its resolver works outside the tunnel; logged).

Fail closed: when no server answers usably through the tunnel (timeouts, SERVFAIL/REFUSED
everywhere, the tunnel down), the client gets SERVFAIL, and nobody else is asked.

Which flows: queries (opcode QUERY, one question) that no earlier addon answered, in the
modes above; in ``wireguard``/``local``/``transparent``/``tun`` mode those to port 53,
whatever server the client addressed (as wg-quick's ``DNS =`` makes the whole system use the
tunnel's servers). Other modes (``regular``, ``socks5``, ``reverse:dns://...``) send DNS to
the server the client or the user chose, through the tunnel like every upstream
connection. Another opcode gets NOTIMP; a query without exactly one question FORMERR.

mitmproxy 11 calls its ``dns_resolver`` addon before script addons (12 calls it after them):
so that ours answers first on both, :meth:`TunnelDns.configure` moves mitmproxy's resolver
right behind the chain entry holding this addon (12's order). Its ``dns_request`` then sees
``flow.response`` set and does nothing.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from mitmproxy import exceptions

from mitm_wg.config import IPAddress

if TYPE_CHECKING:
    from mitm_wg.mitmproxy.addon import WireGuardAddon
    from mitm_wg.runtime.dns import Resolver

__all__ = ["WG_DNS_CHOICES", "TunnelDns"]

logger = logging.getLogger(__name__)

#: Values of the ``wg_dns`` option (see the module docstring).
WG_DNS_CHOICES: Final = ("auto", "tunnel", "off")

# RFC 1035 section 4.1.1 opcodes and rcodes
_OPCODE_QUERY: Final = 0
_RCODE_FORMERR: Final = 1
_RCODE_SERVFAIL: Final = 2
_RCODE_NOTIMP: Final = 4
_DNS_PORT: Final = 53

Plan = tuple[tuple[str, tuple[IPAddress, ...]], ...]


def _mode_kind(mode: Any) -> str | None:
    """'dns' or 'intercept' for the proxy modes whose DNS we answer, else None."""
    from mitmproxy.proxy import mode_specs

    if isinstance(mode, mode_specs.DnsMode):
        return "dns"
    intercepting = tuple(
        cls
        for cls in (
            getattr(mode_specs, name, None)
            for name in ("WireGuardMode", "LocalMode", "TransparentMode", "TunMode")
        )
        if cls is not None
    )
    if isinstance(mode, intercepting):
        return "intercept"
    return None


def _answering_modes(opts: Any) -> list[str]:
    """The configured proxy modes (``--mode``) in which mitm-wg answers clients' DNS."""
    from mitmproxy.proxy.mode_specs import ProxyMode

    found: list[str] = []
    for spec in getattr(opts, "mode", None) or ():
        try:
            mode = ProxyMode.parse(spec)
        except ValueError:
            continue
        if _mode_kind(mode) is not None and mode.type_name not in found:
            found.append(mode.type_name)
    return found


def _parse_server(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        raise exceptions.OptionsError(
            f"dns_name_servers: {text!r} is not an IP address (mitm-wg queries name servers "
            "through the tunnel and needs their addresses)"
        ) from None


def _describe(servers: Sequence[IPAddress]) -> str:
    return ", ".join(str(s) for s in servers)


class TunnelDns:
    """The ``dns_request`` side of :class:`~mitm_wg.mitmproxy.addon.WireGuardAddon`.

    A sub-addon (``WireGuardAddon.addons``): mitmproxy calls its hooks right after the
    parent's, so ``configure`` sees the parent's parsed configs.
    """

    def __init__(self, addon: WireGuardAddon) -> None:
        self.addon = addon
        self.policy = "auto"
        #: ``((tunnel, (server, ...)), ...)`` in the order they are asked, or None when DNS
        #: flows are left to mitmproxy.
        self.plan: Plan | None = None
        #: Queries answered through a tunnel / answered SERVFAIL because it failed there.
        self.stats = {"answered": 0, "servfail": 0}
        # trio side only: one Resolver per (tunnel, servers), remembering the server that
        # answered last; rebuilt when the tunnel object changes (a restart).
        self._resolvers: dict[tuple[str, tuple[IPAddress, ...]], tuple[Any, Resolver]] = {}

    # -- options -----------------------------------------------------------------------------

    def load(self, loader: Any) -> None:
        loader.add_option(
            "wg_dns",
            str,
            "auto",
            "How mitm-wg answers clients' DNS queries (dns, wireguard, local, transparent "
            "modes): 'auto' through the tunnel to its DNS = servers (or dns_name_servers), "
            "else mitmproxy's resolver on this host; 'tunnel' the same but refuse to start "
            "without servers to ask through the tunnel; 'off' leave them to mitmproxy.",
            choices=WG_DNS_CHOICES,
        )

    def configure(self, updated: set[str]) -> None:
        from mitmproxy import ctx

        watched = {"wg_dns", "wg_conf", "dns_name_servers", "mode"}
        if not updated & watched:
            return
        opts = ctx.options
        self.policy = str(opts.wg_dns)
        modes = _answering_modes(opts)
        # only these modes bring clients' DNS queries; the log lines say so when they matter
        say = logger.info if modes else logger.debug
        in_modes = f"in the {'/'.join(modes) or 'dns/wireguard/local/transparent'} mode"
        configs = self.addon.configs
        if not configs:
            self.plan = None
            return
        if self.policy == "off":
            self.plan = None
            say(
                "mitm-wg: wg_dns=off: clients' DNS queries %s are answered by mitmproxy's own "
                "resolver, NOT through the WireGuard tunnel",
                in_modes,
            )
            return
        explicit = list(opts.dns_name_servers) if "dns_name_servers" in opts else []
        plan: list[tuple[str, list[IPAddress]]] = []
        if explicit:
            for text in explicit:
                server = _parse_server(text)
                tunnel = self.addon.route_for_address(str(server))
                if tunnel is None:
                    raise exceptions.OptionsError(
                        f"dns_name_servers: {server} is outside the AllowedIPs of every "
                        f"WireGuard config ({', '.join(configs)}); mitm-wg asks name servers "
                        "only through a tunnel (set wg_dns=off to let mitmproxy ask it "
                        "directly)"
                    )
                if plan and plan[-1][0] == tunnel:
                    plan[-1][1].append(server)
                else:
                    plan.append((tunnel, [server]))
            where = "dns_name_servers"
        else:
            first = next(iter(configs))
            config = configs[first]
            if config.dns_servers:
                plan.append((first, list(config.dns_servers)))
            where = f"DNS = in {config.path or first}"
        if not plan:
            self.plan = None
            first = next(iter(configs))
            path = configs[first].path or first
            if self.policy == "tunnel":
                raise exceptions.OptionsError(
                    f"wg_dns=tunnel: WireGuard tunnel {first!r} ({path}) has no DNS = line and "
                    "dns_name_servers is not set, so there is no name server to ask through "
                    "the tunnel. Add DNS = <server> to the config or set dns_name_servers."
                )
            clients = (
                f"clients' DNS queries {in_modes} are answered by mitmproxy's own resolver "
                "with this host's name servers, OUTSIDE the tunnel, and "
                if modes
                else ""
            )
            logger.warning(
                "mitm-wg: WireGuard tunnel %r (%s) has no DNS = servers and dns_name_servers "
                "is not set: %shost names of upstream connections are resolved by this "
                "host's resolver, outside the tunnel. Add DNS = to the config (or set "
                "wg_dns=tunnel to refuse to start without it).",
                first,
                path,
                clients,
            )
            return
        self.plan = tuple((tunnel, tuple(servers)) for tunnel, servers in plan)
        say(
            "mitm-wg: clients' DNS queries %s are resolved through the tunnel by %s (%s); "
            "SERVFAIL when they do not answer",
            in_modes,
            "; ".join(f"{_describe(s)} via tunnel {t!r}" for t, s in self.plan),
            where,
        )
        self._answer_before_mitmproxy()

    def running(self) -> None:
        if self.plan is not None:
            self._answer_before_mitmproxy()

    def _answer_before_mitmproxy(self) -> None:
        """Move mitmproxy's dns_resolver behind us in the addon chain (see module doc)."""
        from mitmproxy import ctx
        from mitmproxy.addonmanager import traverse

        try:
            manager = ctx.master.addons
        except AttributeError:  # no master (unit tests of the bare addon)
            return
        resolver = manager.get("dnsresolver")
        if resolver is None:
            return  # mitmproxy's resolver is not loaded: nothing answers before us
        chain = list(manager.chain)
        top = next((a for a in chain if any(x is self for x in traverse([a]))), None)
        if top is None or resolver not in chain:
            return
        if chain.index(resolver) > chain.index(top):
            return
        chain.remove(resolver)
        chain.insert(chain.index(top) + 1, resolver)
        # A new list: a hook being dispatched right now keeps iterating the old one.
        manager.chain = chain
        logger.debug("mitm-wg: mitmproxy's dns_resolver now runs after mitm-wg")

    # -- flows -------------------------------------------------------------------------------

    def _should_answer(self, flow: Any) -> bool:
        if self.plan is None or not flow.live or flow.response or flow.error:
            return False
        if not flow.request.query:
            return False
        kind = _mode_kind(flow.client_conn.proxy_mode)
        if kind == "dns":
            return True
        if kind == "intercept":
            address = flow.server_conn.address
            return bool(address) and address[1] == _DNS_PORT
        return False

    async def dns_request(self, flow: Any) -> None:
        if not self._should_answer(flow):
            return
        request = flow.request
        if request.op_code != _OPCODE_QUERY:
            flow.response = request.fail(_RCODE_NOTIMP)
            return
        if len(request.questions) != 1:
            flow.response = request.fail(_RCODE_FORMERR)
            return
        question = request.questions[0]
        tcp = flow.client_conn.transport_protocol == "tcp"
        try:
            data = await self._forward(request.packed, tcp)
            response = type(request).unpack(data)
            response.timestamp = time.time()  # mitmproxy 12's unpack leaves it unset
        except Exception as exc:  # fail closed, whatever went wrong
            self.stats["servfail"] += 1
            logger.warning(
                "mitm-wg: DNS %s (type %s) answered SERVFAIL: %s",
                question.name,
                question.type,
                exc,
            )
            flow.response = request.fail(_RCODE_SERVFAIL)
            return
        self.stats["answered"] += 1
        flow.response = response

    async def _forward(self, wire: bytes, tcp: bool) -> bytes:
        """The reply through the first tunnel of the plan that gives one (raises otherwise)."""
        addon = self.addon
        if addon._ready is not None:
            await addon._ready.wait()
        plan, bridge = self.plan, addon.bridge
        if plan is None or bridge is None:
            raise OSError("no WireGuard tunnel is running")
        error: Exception | None = None
        for tunnel, servers in plan:

            async def forward(
                tunnel_obj: Any, tunnel: str = tunnel, servers: Any = servers
            ) -> bytes:
                resolver = self._resolver_for(tunnel, tunnel_obj, servers)
                return await resolver.forward(wire, tcp=tcp)

            try:
                reply: bytes = await bridge.call_in_tunnel(tunnel, forward)
                return reply
            except (OSError, socket.gaierror) as exc:
                error = exc
        assert error is not None
        raise error

    def _resolver_for(
        self, tunnel: str, tunnel_obj: Any, servers: tuple[IPAddress, ...]
    ) -> Resolver:
        """(trio side) The Resolver for these servers through this tunnel object."""
        from mitm_wg.runtime.dns import Resolver, TunnelDnsTransport

        key = (tunnel, servers)
        cached = self._resolvers.get(key)
        if cached is not None and cached[0] is tunnel_obj:
            return cached[1]
        resolver = Resolver(TunnelDnsTransport(tunnel_obj), servers, (), {4, 6})
        self._resolvers[key] = (tunnel_obj, resolver)
        return resolver
