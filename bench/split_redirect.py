"""mitmproxy addon of ``bench_mitm_https.py --split``: every upstream connection goes to the
tunnel forwarder of ``bench/split_worker.py`` on ``127.0.0.1:$SPLIT_PORT`` instead."""

from __future__ import annotations

import os

PORT = int(os.environ["SPLIT_PORT"])


def server_connect(data) -> None:  # mitmproxy's ServerConnectionHookData
    data.server.address = ("127.0.0.1", PORT)
