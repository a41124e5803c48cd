"""The mitm-wg addon for mitmproxy, mitmdump and mitmweb: load this file with ``-s``.

    mitmproxy -s "$(mitm-wg addon)" --set wg_conf=wg0.conf

(``mitm-wg addon`` prints this file's absolute path.) Options (``wg_conf``, ``wg_pool``,
``wg_via``, ``wg_dns``, ``wg_allow_direct``, ...) and commands (``wg.status``, ``wg.pools``):
see :mod:`mitm_wg.mitmproxy.addon`. Once
mitmproxy has finished starting, the log shows ``mitm-wg: ready, proxy at ADDR``
(:mod:`mitm_wg.mitmproxy.ready`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: This file: what ``-s`` takes (``mitm-wg addon`` prints it).
PATH = Path(__file__).resolve()


def _load() -> list[object]:
    # mitmproxy puts a script's directory first on sys.path while loading it. Here that is the
    # mitm_wg package directory, whose modules (config, errors, the mitmproxy subpackage, ...)
    # must not shadow top-level modules of the same names: import without it.
    here = str(PATH.parent)
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    try:
        from mitm_wg.mitmproxy import patch
        from mitm_wg.mitmproxy.addon import WireGuardAddon
        from mitm_wg.mitmproxy.ready import StartupSignal

        # Refuse an untested mitmproxy whose patched code changed now, at load (mitmproxy
        # reports the error and exits during start-up), not at the first connection.
        patch.check_compatible()
        return [WireGuardAddon(), StartupSignal()]
    finally:
        sys.path[:] = saved


def __getattr__(name: str) -> object:
    # ``addons`` is made on first access: importing mitm_wg.addon (for PATH) must not need
    # mitmproxy or create addon instances.
    if name == "addons":
        value = _load()
        globals()["addons"] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
