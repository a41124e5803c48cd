"""Example: rewrite requests on their way through mitm-wg.

    mitmdump -s addons/mitm_wg.py -s addons/examples/rewrite_request.py --set wg_conf=wg0.conf

* adds an ``X-Via-Mitm-Wg: 1`` request header,
* rewrites request paths starting with ``/old/`` to ``/new/``,
* adds an ``X-Mitm-Wg-Tunnel`` response header naming the tunnel the server connection used
  (``direct`` for a direct connection), from ``flow.metadata["wg"]`` which mitm-wg fills in.
"""

from __future__ import annotations

import logging

from mitmproxy import http

logger = logging.getLogger(__name__)

OLD_PREFIX = "/old/"
NEW_PREFIX = "/new/"


def request(flow: http.HTTPFlow) -> None:
    flow.request.headers["X-Via-Mitm-Wg"] = "1"
    if flow.request.path.startswith(OLD_PREFIX):
        flow.request.path = NEW_PREFIX + flow.request.path[len(OLD_PREFIX) :]


def response(flow: http.HTTPFlow) -> None:
    info = flow.metadata.get("wg")
    if info is None:
        return
    tunnel = info.get("tunnel")
    flow.response.headers["X-Mitm-Wg-Tunnel"] = tunnel if tunnel else "direct"
