"""The routing API for mitmproxy scripts: which tunnel (if any) a server connection uses.

Two ways to choose, both read when mitmproxy opens the connection (so the order in which
addons run does not matter):

HTTP flows — set a flow metadata key in ``requestheaders``, ``request`` or ``http_connect``::

    def request(flow):
        if flow.request.pretty_host.endswith(".corp.example"):
            flow.metadata["wg_tunnel"] = "work"      # the tunnel named "work"
        elif flow.request.pretty_host == "localhost":
            flow.metadata["wg_tunnel"] = False       # connect directly (an explicit choice)

Any connection (HTTP, TLS, raw TCP; every proxy mode) — in the ``server_connect`` hook::

    from mitm_wg.mitmproxy.routing import use_tunnel

    def server_connect(data):
        if data.server.address and data.server.address[1] == 5432:
            use_tunnel(data.server, "db")

Values: a tunnel name (the config file's name without ``.conf``, or ``NAME=PATH`` given to
``wg_conf``), ``False`` for a direct connection, ``None``/absent for the default: an IP
destination goes to the tunnel whose AllowedIPs match it most specifically, a hostname to
the first tunnel in ``wg_conf`` (it is resolved through that tunnel). A name that is not
loaded makes the connection fail; it never falls back to a direct connection.
``use_tunnel`` wins over the flow metadata when both are given.

After connecting, ``flow.metadata["wg"]`` says how the flow's server connection went:
``{"tunnel": name, "peer": public key, "endpoint": ..., "local": ..., "remote": ...}`` or
``{"tunnel": False, "reason": ...}`` for a direct connection.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mitmproxy.connection import Server

__all__ = ["INFO_KEY", "METADATA_KEY", "Route", "check_route", "chosen_route", "use_tunnel"]

#: flow.metadata key a script sets to choose the tunnel of the flow's server connection.
METADATA_KEY = "wg_tunnel"
#: flow.metadata key the addon fills with how the server connection was made.
INFO_KEY = "wg"

Route = str | bool | None

#: Process-wide on purpose: a choice belongs to the Server connection it was made for
#: (scripts call use_tunnel without knowing the addon), and only one addon instance can hold
#: mitmproxy's patched open_connection at a time (patch.install refuses a second one).
_routes: weakref.WeakKeyDictionary[Server, Route] = weakref.WeakKeyDictionary()


def check_route(route: object) -> Route:
    """Validate a route value a script put somewhere (TypeError when it is not one)."""
    if route is None or route is False or isinstance(route, str):
        return route
    if route is True:
        return None  # "use the tunnel": the default choice
    raise TypeError(f"a WireGuard route is a tunnel name, False or None, not {route!r}")


def use_tunnel(server: Server, route: Route) -> None:
    """Choose the tunnel for ``server`` before mitmproxy connects it (see module doc)."""
    _routes[server] = check_route(route)


def chosen_route(server: Server) -> tuple[bool, Route]:
    """(was a choice made with use_tunnel, the choice)."""
    if server in _routes:
        return True, _routes[server]
    return False, None
