"""End to end: mitmproxy reloads the addon's script while it runs.

mitmproxy watches every ``-s`` script and reloads it when the file changes: a ``git pull``
in the clone the addon is loaded from, or an editor saving it, does that to a running
mitmproxy. The old instance must let go (its tunnels, its trio thread, the patch on
mitmproxy's upstream connects) and the new one take over; requests after the reload go
through the tunnel again, and nothing leaks outside it in between: a client keeps asking a
server the client namespace can also reach directly (on the exit's veth address, routed
through the tunnel by the config) while the script reloads, and that server must see only
our tunnel address, never the namespace's own.

The script mitmdump loads is a copy of ``addons/mitm_wg.py`` in the test's directory (a
change to the clone's own file would reload the addon in every mitmdump of a concurrent
run); outside a clone, the shim imports the installed package, as for a pip user.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

from e2e_helpers import (
    ADDON,
    ORIGIN_NAME,
    Origin,
    curl,
    run_mitmdump,
    run_origin,
    tunnel_addresses,
    wait_for,
    write_client_config,
)

TUNNEL = "exit"

PROBE = """
import json
import threading

from mitmproxy import http


def request(flow):
    if flow.request.path == "/__threads":
        names = [t.name for t in threading.enumerate()]
        flow.response = http.Response.make(200, json.dumps(names))
"""


def test_the_addon_script_reloaded_under_a_running_mitmdump(
    exit_peer: Any, workdir: Path, origin: Origin
) -> None:
    ns = exit_peer.client_ns
    veth = exit_peer.endpoint[0]  # reachable directly from the client namespace too
    nets = f"{exit_peer.tunnel_v4_net}, {exit_peer.tunnel_v6_net}, {veth}/32"
    conf = write_client_config(exit_peer, workdir, TUNNEL, allowed_ips=nets)
    shim = workdir / "addon" / "mitm_wg.py"
    shim.parent.mkdir()
    shutil.copy(ADDON, shim)
    probe = workdir / "threads_probe.py"
    probe.write_text(PROBE)
    up = f"WireGuard tunnel {TUNNEL!r} is up"
    with (
        run_origin(exit_peer.ns, workdir, http=[f"{veth}:8080"], name="decoy") as decoy,
        run_mitmdump(
            ns, workdir, "-s", str(probe), "--set", f"wg_conf={TUNNEL}={conf}", addon=shim
        ) as dump,
    ):
        dump.wait_for_log(up)

        def through_the_tunnel(path: str) -> None:
            r = curl(ns, "-x", dump.proxy, f"http://{ORIGIN_NAME}{path}")
            assert r.status == 200, (r.status, r.stderr, dump.text()[-3000:])
            assert r.json()["client"] in tunnel_addresses(exit_peer)

        def trio_threads() -> int:
            r = curl(ns, "-x", dump.proxy, "http://probe.invalid/__threads")
            return sum(1 for name in json.loads(r.body) if name == "mitm-wg-trio")

        through_the_tunnel("/echo/before")
        assert trio_threads() == 1
        stop = threading.Event()
        answers: list[int] = []

        def keep_asking() -> None:
            while not stop.is_set():
                r = curl(ns, "-x", dump.proxy, f"http://{veth}:8080/echo/during", max_time=15)
                answers.append(r.status)

        asker = threading.Thread(target=keep_asking)
        asker.start()
        try:
            wait_for(lambda: len(answers) >= 3, 20, "requests before the reload")
            # the file changes under the running mitmdump: mitmproxy reloads the script
            shim.write_text(shim.read_text() + "\n# edited while mitmdump runs\n")
            wait_for(lambda: dump.text().count(up) >= 2, 20, "the reloaded addon's tunnel")
            asked = len(answers)
            wait_for(lambda: len(answers) >= asked + 3, 20, "requests after the reload")
        finally:
            stop.set()
            asker.join(30)
        through_the_tunnel("/echo/after")
        wait_for(lambda: trio_threads() == 1, 10, "the old instance's trio thread to end")
    seen = {e["client"] for e in decoy.entries("connect")}
    assert seen and seen <= tunnel_addresses(exit_peer), (seen, answers)
    assert answers.count(200) >= 6, answers
    text = dump.text()
    assert "Reloading script" in text or "Loading script" in text, text[-3000:]
    assert "loaded twice" not in text, text[-3000:]
