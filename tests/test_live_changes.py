"""Live changes of ``wg_conf``: adding or removing a tunnel leaves the others' connections alone.

The addon runs in mitmproxy's test context with real tunnels (``open_tunnel`` with each
exit's client namespace as the UDP socket's home) to two wireguard-go exits in namespaces.
A download runs on tunnel "a" while tunnel "b" is added, used, edited and removed; the
download finishes intact, and "b"'s own connection is aborted with a log line naming it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.test import taddons

from harness import ExitPeer, exit_peer, pattern
from mitm_wg.config import WireGuardConfig
from mitm_wg.mitmproxy import patch
from mitm_wg.mitmproxy.addon import WireGuardAddon
from mitm_wg.mitmproxy.bridge import ENV_MODE
from tests.runtime_helpers import real_tunnels

DOWNLOAD = 48 * 1024 * 1024


@pytest.fixture
def two_exits(netns_available: None) -> Iterator[list[ExitPeer]]:
    with ExitStack() as stack:
        yield [stack.enter_context(exit_peer(name_prefix="mwglc")) for _ in range(2)]


@pytest.fixture(autouse=True)
def _clean_patch() -> Iterator[None]:
    yield
    patch.uninstall()


async def start_download(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, size: int
) -> None:
    writer.write(f"GET /bytes/{size} HTTP/1.1\r\nHost: exit\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0], head


async def get(addon: WireGuardAddon, exit_: ExitPeer, size: int) -> bytes:
    reader, writer = await addon.open_tcp(None, exit_.server_tunnel_v4, exit_.http_port, None)
    await start_download(reader, writer, size)
    body = await reader.readexactly(size)
    writer.close()
    return body


@pytest.mark.parametrize("mode", ["guest", "thread"])
def test_adding_and_removing_tunnels_keeps_other_connections(
    two_exits: list[ExitPeer],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_MODE, mode)
    a, b = two_exits
    conf_a, conf_b = tmp_path / "a.conf", tmp_path / "b.conf"
    conf_a.write_text(a.client_config_text(dns=False))
    conf_b.write_text(b.client_config_text(dns=False))

    async def main() -> None:
        addon = WireGuardAddon(open_tunnel=real_tunnels(two_exits, handshake_timeout=10))
        with caplog.at_level(logging.INFO), taddons.context(addon) as tctx:
            tctx.configure(addon, wg_conf=[f"a={conf_a}"])
            await addon.running()
            bridge = addon.bridge
            assert bridge is not None

            # The download on "a": read continuously, but keep the last quarter until every
            # change below is done, so the connection is provably mid-transfer meanwhile.
            reader, writer = await addon.open_tcp(None, a.server_tunnel_v4, a.http_port, None)
            assert writer.get_extra_info("wg_tunnel") == "a"
            await start_download(reader, writer, DOWNLOAD)
            changes_done = asyncio.Event()
            started = asyncio.Event()
            digest = hashlib.sha256()
            received = 0
            received_at_changes: list[int] = []

            async def download() -> None:
                nonlocal received
                while received < DOWNLOAD:
                    if received >= DOWNLOAD * 3 // 4:
                        await changes_done.wait()
                    chunk = await reader.read(min(65536, DOWNLOAD - received))
                    assert chunk, f"the download on 'a' ended after {received} bytes"
                    digest.update(chunk)
                    received += len(chunk)
                    if received >= 1024 * 1024:
                        started.set()

            task = asyncio.create_task(download())
            await started.wait()

            # Add "b" (as `:set wg_conf=...` would) and use it.
            tctx.configure(addon, wg_conf=[f"a={conf_a}", f"b={conf_b}"])
            received_at_changes.append(received)
            body = await get(addon, b, 1_000_000)
            assert body == pattern(1_000_000)
            assert set(bridge.tunnels) == {"a", "b"}

            # An open connection on "b", then "b" is removed: that connection is aborted.
            b_reader, b_writer = await addon.open_tcp(None, b.server_tunnel_v4, b.http_port, None)
            await start_download(b_reader, b_writer, DOWNLOAD)
            await b_reader.readexactly(65536)
            tctx.configure(addon, wg_conf=[f"a={conf_a}"])
            received_at_changes.append(received)
            await addon.running()
            with pytest.raises(ConnectionAbortedError, match="tunnel carrying this connection"):
                while await b_reader.read(1 << 20):
                    pass
            assert set(bridge.tunnels) == {"a"}

            # Add "b" again and edit it (a keepalive): only "b" restarts.
            tctx.configure(addon, wg_conf=[f"a={conf_a}", f"b={conf_b}"])
            assert await get(addon, b, 100_000) == pattern(100_000)
            conf_b.write_text(b.client_config_text(dns=False, keepalive=25))
            tctx.configure(addon, wg_conf=[f"a={conf_a}", f"b={conf_b}"])
            received_at_changes.append(received)
            assert await get(addon, b, 100_000) == pattern(100_000)

            # Meanwhile "a" was never restarted and its download was still running.
            assert all(n < DOWNLOAD for n in received_at_changes), received_at_changes
            changes_done.set()
            await task
            assert digest.digest() == hashlib.sha256(pattern(DOWNLOAD)).digest()
            writer.close()

            messages = [r.getMessage() for r in caplog.records]
            assert any(
                "tunnel 'b' removed: closing it and its 1 open connection" in m for m in messages
            ), messages
            assert any("tunnel 'b' reconfigured: closing it" in m for m in messages), messages
            assert not any("tunnel 'a' removed" in m or "'a' reconfigured" in m for m in messages)
            # "a" came up exactly once.
            assert sum("tunnel 'a' is up" in m for m in messages) == 1, messages
            addon.done()
            assert bridge.mode == mode
            await bridge.aclose()

    asyncio.run(main())


def test_a_slow_new_tunnel_does_not_hold_up_the_others(tmp_path: Path) -> None:
    """While a newly added tunnel is still opening (its opener blocks on a gate), new
    connections through the unchanged tunnel go ahead at once (loopback stand-in tunnels)."""
    import threading

    import trio

    from mitm_wg.keys import encode_key, generate_private_key, public_key_of
    from tests.loopback_addon import open_loopback_tunnel

    paths = {}
    for name in ("one", "slow"):
        paths[name] = tmp_path / f"{name}.conf"
        paths[name].write_text(
            f"[Interface]\nPrivateKey = {encode_key(generate_private_key())}\n"
            f"Address = 10.9.0.2/32\n\n[Peer]\n"
            f"PublicKey = {encode_key(public_key_of(generate_private_key()))}\n"
            "AllowedIPs = 127.0.0.0/8\nEndpoint = 127.0.0.1:9\n"
        )
    gate = threading.Event()
    slow_config = WireGuardConfig.from_file(paths["slow"])

    @asynccontextmanager
    async def opener(config: WireGuardConfig) -> AsyncIterator[Any]:
        if config == slow_config:
            await trio.to_thread.run_sync(gate.wait)
        async with open_loopback_tunnel(config) as tunnel:
            yield tunnel

    async def main() -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(await r.read(100))
            await w.drain()
            w.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        addon = WireGuardAddon(open_tunnel=opener)
        with taddons.context(addon) as tctx:
            tctx.configure(addon, wg_conf=[f"one={paths['one']}"])
            await addon.running()
            bridge = addon.bridge
            assert bridge is not None
            tctx.configure(addon, wg_conf=[f"one={paths['one']}", f"slow={paths['slow']}"])
            try:
                # A deadlock guard only: without the fix this waits for the gate forever.
                reader, writer = await asyncio.wait_for(
                    addon.open_tcp(None, "127.0.0.1", port, None), 60
                )
                assert writer.get_extra_info("wg_tunnel") == "one"
                writer.write(b"ping")
                assert await reader.read(100) == b"ping"
                assert bridge.tunnels["slow"].state == "starting"
            finally:
                gate.set()
            await addon.running()
            assert bridge.tunnels["slow"].state == "up"
            addon.done()
            await bridge.aclose()
        server.close()

    asyncio.run(main())
