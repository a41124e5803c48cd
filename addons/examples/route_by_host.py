"""Example: choose the WireGuard tunnel (or a direct connection) per destination host.

    mitmdump -s addons/mitm_wg.py -s addons/examples/route_by_host.py \
        --set wg_conf=home=home.conf --set wg_conf=work=work.conf \
        --set wg_route=.corp.example=work --set wg_route=localhost=direct

``wg_route`` entries are ``HOST=TUNNEL``; ``TUNNEL`` is a tunnel name or ``direct``. A host
starting with a dot matches that domain and its subdomains. Hosts without a rule use
mitm-wg's default (AllowedIPs for IP addresses, else the first tunnel).

HTTP flows are routed with ``flow.metadata["wg_tunnel"]``; every other connection (raw TCP,
TLS passthrough, any proxy mode) with ``use_tunnel`` in ``server_connect``, which also covers
HTTP. Both are shown here; one of them is enough for HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mitmproxy import ctx, exceptions, http
from mitmproxy.proxy.server_hooks import ServerConnectionHookData

from mitm_wg.mitmproxy.routing import METADATA_KEY, Route, use_tunnel

logger = logging.getLogger(__name__)


class RouteByHost:
    def __init__(self) -> None:
        self.rules: list[tuple[str, Route]] = []

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option(
            "wg_route", Sequence[str], [], "HOST=TUNNEL (or HOST=direct); .domain for suffixes"
        )

    def configure(self, updated: set[str]) -> None:
        if "wg_route" not in updated:
            return
        rules: list[tuple[str, Route]] = []
        for entry in ctx.options.wg_route:
            host, sep, tunnel = entry.partition("=")
            if not sep or not host or not tunnel:
                raise exceptions.OptionsError(f"wg_route: expected HOST=TUNNEL, got {entry!r}")
            rules.append((host.lower(), False if tunnel == "direct" else tunnel))
        self.rules = rules

    def choose(self, host: str | None) -> Route | None:
        if not host:
            return None
        host = host.lower().rstrip(".")
        for pattern, route in self.rules:
            if host == pattern or (pattern.startswith(".") and ("." + host).endswith(pattern)):
                return route
        return None

    def request(self, flow: http.HTTPFlow) -> None:
        route = self.choose(flow.request.pretty_host)
        if route is not None:
            flow.metadata[METADATA_KEY] = route

    def server_connect(self, data: ServerConnectionHookData) -> None:
        address = data.server.address
        route = self.choose(address[0] if address else None)
        if route is not None:
            logger.debug("route_by_host: %s -> %s", address, route)
            use_tunnel(data.server, route)


addons = [RouteByHost()]
