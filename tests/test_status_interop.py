"""Status like `wg show`, against wireguard-go + Linux: our tunnel's ``TunnelStatus`` and the
addon's ``wg.status`` (mitmdump in the client namespace) give the latest handshake as an age
that agrees with the exit's own ``wg show``, and transfer in KiB/MiB."""

from __future__ import annotations

import re
import time
from pathlib import Path

import trio
from e2e_helpers import curl, run_mitmdump, wait_for, write_client_config

from harness import ExitPeer
from mitm_wg.config import WireGuardConfig
from mitm_wg.runtime import open_tunnel
from mitm_wg.wireguard.peer import format_bytes
from tests.runtime_helpers import NamespaceSocketFactory, http_get

AGE = re.compile(r"latest handshake: (?:(\d+) min )?(\d+) s ago")
TRANSFER = re.compile(r"transfer: ([\d.]+ (?:B|KiB|MiB)) received, ([\d.]+ (?:B|KiB|MiB)) sent")


def handshake_age(text: str) -> int:
    """The age of the last handshake a status line gives, in whole seconds."""
    match = AGE.search(text)
    assert match, text
    return int(match.group(1) or 0) * 60 + int(match.group(2))


async def test_tunnel_status_shows_handshake_age_and_transfer(fresh_exit_peer: ExitPeer) -> None:
    peer = fresh_exit_peer
    config = WireGuardConfig.parse(peer.client_config_text(dns=False))
    async with open_tunnel(config, socket_factory=NamespaceSocketFactory(peer.client_ns)) as t:
        with trio.fail_after(60):
            stream = await t.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            assert (await http_get(stream, "/bytes/300000")).size == 300000
            await stream.aclose()
        await trio.sleep(1.5)  # let the age become visibly non-zero (not asserted as a time)
        status = t.status()
    (ours,) = status.peers
    text = str(status)
    exit_view = peer.client_stats()
    # the same handshake, seen from both ends (wg show rounds down to whole seconds)
    assert abs(status.unix_time - handshake_age(text) - exit_view.latest_handshake) <= 3, text
    age = status.handshake_age(ours)
    assert age is not None and age > 0
    received, sent = TRANSFER.search(text).groups()  # type: ignore[union-attr]
    assert received == format_bytes(ours.rx_bytes) and received.endswith("KiB"), text
    assert sent == format_bytes(ours.tx_bytes)
    assert "0 open connection(s)" in text


PROBE = """
from mitmproxy import ctx, http


def request(flow):
    if flow.request.path == "/__wg_status":
        text = ctx.master.commands.call("wg.status")
        flow.response = http.Response.make(200, text, {"content-type": "text/plain"})
"""


def test_addon_wg_status_shows_handshake_age_and_transfer(
    fresh_exit_peer: ExitPeer, tmp_path: Path
) -> None:
    peer = fresh_exit_peer
    probe = tmp_path / "status_probe.py"
    probe.write_text(PROBE)
    conf = write_client_config(peer, tmp_path, "exit", dns=False)
    with run_mitmdump(
        peer.client_ns, tmp_path, "-s", str(probe), "--set", f"wg_conf=exit={conf}"
    ) as d:
        d.wait_for_log("WireGuard tunnel 'exit' is up")
        proxy = ("-x", d.proxy)
        result = curl(peer.client_ns, *proxy, f"{peer.http_url}/bytes/2000000")
        assert result.status == 200 and len(result.body) == 2000000, result
        texts: list[tuple[float, str, float]] = []

        def status_has_the_transfer() -> bool:
            asked = time.time()
            r = curl(peer.client_ns, *proxy, f"{peer.http_url}/__wg_status")
            texts.append((asked, r.body.decode(), time.time()))
            return r.status == 200 and "MiB received" in texts[-1][1]

        wait_for(status_has_the_transfer, 30, "wg.status to show the transfer (2 s refresh)")
    asked, text, answered = texts[-1]
    assert "exit (" in text and ": up" in text, text
    # mitmdump aged the handshake between our request and its answer
    exit_time = peer.client_stats().latest_handshake
    age = handshake_age(text)
    assert asked - age - 3 <= exit_time <= answered - age + 3, (text, asked, answered, exit_time)
    received, sent = TRANSFER.search(text).groups()  # type: ignore[union-attr]
    assert received.endswith("MiB") and sent.endswith("KiB"), text
    assert "rx=" not in text and "tx=" not in text
