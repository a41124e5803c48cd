"""mitm-wg: send every upstream connection of mitmproxy through a WireGuard tunnel.

A thin shim for clones: the addon itself is ``mitm_wg/addon.py`` inside the installed package
(``mitm-wg addon`` prints its path), which is what to load when mitm-wg is pip-installed.

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


def _import_addons() -> list[object]:
    # mitmproxy puts this file's directory first on sys.path while loading it, where
    # "mitm_wg" would find this very file instead of the mitm_wg package.
    here = os.path.dirname(os.path.abspath(__file__))
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    # This clone's package, not whichever mitm_wg is installed (an editable install of
    # another checkout would otherwise win): the shim and the code it loads stay together.
    clone = os.path.dirname(here)
    if os.path.isfile(os.path.join(clone, "mitm_wg", "__init__.py")):
        sys.path.insert(0, clone)
    try:
        loaded = sys.modules.get("mitm_wg")
        if loaded is not None and not hasattr(loaded, "__path__"):
            del sys.modules["mitm_wg"]
        from mitm_wg import addon

        return addon._load()
    finally:
        sys.path[:] = saved


addons = _import_addons()
