"""One log line when mitmproxy has *finished* starting: ``mitm-wg: ready, proxy at ADDR``.

mitmproxy logs "HTTP(S) proxy listening at ..." when its listening sockets are up, which is
before its ``running`` hooks run. mitmproxy 12 creates its certificate store in
``TlsConfig.running``, so a request arriving between the two fails
(``'NoneType' object has no attribute 'default_ca'``), and an error logged during start-up
makes mitmdump exit ("Error logged during startup, exiting..."). Tools that wait for the proxy
(``mitm-wg demo``, the tests) wait for this line instead.

The line is logged once mitmproxy's own start-up sequence (``Master.run``: servers, then every
addon's ``running`` hook, then the start-up error check) is over, which is when mitmproxy
removes its start-up error handler from the root logger. Where that handler or the TLS addon
does not exist the corresponding condition holds trivially. The same code is in mitmproxy 11
and 12; :func:`startup_finished` is the whole test.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mitm_wg.config import format_endpoint

__all__ = ["READY_PREFIX", "StartupSignal", "addons", "startup_finished"]

logger = logging.getLogger(__name__)

#: Start of the line logged when mitmproxy is ready (followed by the listen addresses).
READY_PREFIX = "mitm-wg: ready"
_POLL = 0.01


def startup_finished(master: Any) -> bool:
    """Whether ``master`` has finished starting (see module doc)."""
    addons = master.addons
    errorcheck = addons.get("errorcheck")
    if errorcheck is not None:
        handler = getattr(errorcheck, "logger", None)
        if handler is not None and handler in logging.getLogger().handlers:
            return False  # Master.run has not reached ErrorCheck.finish() yet
    tlsconfig = addons.get("tlsconfig")
    if tlsconfig is not None and getattr(tlsconfig, "certstore", None) is None:
        return False
    proxyserver = addons.get("proxyserver")
    if proxyserver is not None:
        if not getattr(proxyserver, "is_running", True):
            return False
        if getattr(proxyserver, "is_updating", False):
            return False
    return True


def _listen_addresses(master: Any) -> list[str]:
    proxyserver = master.addons.get("proxyserver")
    try:
        addresses = proxyserver.listen_addrs() if proxyserver is not None else []
    except Exception:  # an older/newer mitmproxy without it: the line stays useful
        addresses = []
    return [format_endpoint(a) for a in addresses]


class StartupSignal:
    """Logs ``mitm-wg: ready, proxy at ADDR[, ADDR...]`` once mitmproxy has finished starting."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    def running(self) -> None:
        from mitmproxy import ctx

        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._announce(ctx.master))

    async def _announce(self, master: Any) -> None:
        while not startup_finished(master):
            await asyncio.sleep(_POLL)
        addresses = _listen_addresses(master)
        logger.info(
            "%s, proxy at %s", READY_PREFIX, ", ".join(addresses) if addresses else "(no server)"
        )

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()


#: This file also works alone as a script (``mitmdump -s .../ready.py``): the demo's exit peer.
addons = [StartupSignal()]
