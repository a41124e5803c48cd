"""mitm-wg: send every upstream connection of mitmproxy through a WireGuard tunnel.

    mitmproxy -s addons/mitm_wg.py --set wg_conf=wg0.conf
    mitmdump  -s addons/mitm_wg.py --set wg_conf=home=home.conf --set wg_conf=work=work.conf
    mitmweb   -s addons/mitm_wg.py --set wg_conf=wg0.conf --mode socks5

Options: wg_conf, wg_allow_direct (see ``mitm_wg.mitmproxy.addon``). Command: ``wg.status``.
Choosing a tunnel per connection from your own scripts: see ``mitm_wg.mitmproxy.routing``
and addons/examples/route_by_host.py.
"""

from __future__ import annotations

import os
import sys


def _import_addon() -> type:
    # mitmproxy puts this file's directory first on sys.path while loading it, where
    # "mitm_wg" would find this very file instead of the mitm_wg package.
    here = os.path.dirname(os.path.abspath(__file__))
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    try:
        loaded = sys.modules.get("mitm_wg")
        if loaded is not None and not hasattr(loaded, "__path__"):
            del sys.modules["mitm_wg"]
        from mitm_wg.mitmproxy.addon import WireGuardAddon

        return WireGuardAddon
    finally:
        sys.path[:] = saved


addons = [_import_addon()()]
