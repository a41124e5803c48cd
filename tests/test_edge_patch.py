"""The reversible patch of mitmproxy's ConnectionHandler.open_connection."""

from __future__ import annotations

import asyncio
from typing import Any

import mitmproxy_rs
import pytest
from mitmproxy.connection import Server
from mitmproxy.proxy import server as mitmproxy_server

from mitm_wg.mitmproxy import patch


class RecordingOpener:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, str, int, Any]] = []

    async def open_tcp(self, server: Any, host: str, port: int, local_addr: Any) -> Any:
        self.calls.append(("tcp", server, host, port, local_addr))
        return "reader", "writer"

    async def open_udp(self, server: Any, host: str, port: int, local_addr: Any) -> Any:
        self.calls.append(("udp", server, host, port, local_addr))
        return "stream"


@pytest.fixture(autouse=True)
def _restore() -> Any:
    original = mitmproxy_server.ConnectionHandler.open_connection
    yield
    patch.uninstall()
    assert mitmproxy_server.ConnectionHandler.open_connection is original


def test_installed_mitmproxy_is_compatible() -> None:
    patch.check_compatible()


async def _no_calls(self: Any, command: Any) -> None:
    await asyncio.sleep(0)


async def _two_tcp_calls(self: Any, command: Any) -> None:
    await asyncio.open_connection("a", 1)
    await asyncio.open_connection("b", 2)
    await mitmproxy_rs.udp.open_udp_connection("c", 3)


async def _extra_opener(self: Any, command: Any) -> None:
    await asyncio.open_connection("a", 1)
    await mitmproxy_rs.udp.open_udp_connection("c", 3)
    await asyncio.get_running_loop().create_connection(lambda: None, "d", 4)


def _not_a_coroutine(self: Any, command: Any) -> None:
    pass


@pytest.mark.parametrize("func", [_no_calls, _two_tcp_calls, _extra_opener, _not_a_coroutine])
def test_changed_code_is_refused(func: Any) -> None:
    with pytest.raises(patch.PatchError, match="mitm-wg"):
        patch.check_compatible(func)


def test_install_uninstall_restores_the_original() -> None:
    original = mitmproxy_server.ConnectionHandler.open_connection
    assert not patch.is_installed()
    patch.install(RecordingOpener())
    assert patch.is_installed()
    patched = mitmproxy_server.ConnectionHandler.open_connection
    assert patched is not original
    assert patched.__wrapped__ is original  # type: ignore[attr-defined]
    opener = RecordingOpener()
    patch.uninstall(opener)  # not the installed opener: nothing happens
    assert mitmproxy_server.ConnectionHandler.open_connection is patched
    patch.uninstall()
    patch.install(opener)
    patch.install(opener)  # the same opener again: nothing changes
    with pytest.raises(patch.PatchError, match="loaded twice"):
        patch.install(RecordingOpener())  # a second opener never silently takes over
    assert patch._opener is opener
    patch.uninstall(opener)
    assert mitmproxy_server.ConnectionHandler.open_connection is original
    patch.uninstall()  # no-op


async def _shaped_like_mitmproxy(self: Any, command: Any) -> Any:
    """Makes the two calls the way ConnectionHandler.open_connection does."""
    if command.connection.transport_protocol == "tcp":
        reader, writer = await asyncio.open_connection(
            *command.connection.address, local_addr=command.connection.sockname
        )
    else:
        reader = writer = await mitmproxy_rs.udp.open_udp_connection(
            *command.connection.address, local_addr=command.connection.sockname
        )
    await asyncio.sleep(0)  # everything else of asyncio is the genuine module
    self.result = (reader, writer, asyncio.current_task() is not None)


class _Command:
    def __init__(self, connection: Server) -> None:
        self.connection = connection


class _Self:
    result: Any = None


def test_patched_code_sends_both_calls_to_the_opener() -> None:
    opener = RecordingOpener()
    patch._opener = opener
    try:
        patched = patch._build(_shaped_like_mitmproxy)

        async def main() -> None:
            tcp = Server(address=("example.com", 443))
            udp = Server(address=("192.0.2.9", 53), transport_protocol="udp")
            me = _Self()
            await patched(me, _Command(tcp))
            assert me.result == ("reader", "writer", True)
            await patched(me, _Command(udp))
            assert me.result == ("stream", "stream", True)
            assert opener.calls == [
                ("tcp", tcp, "example.com", 443, None),
                ("udp", udp, "192.0.2.9", 53, None),
            ]
            assert patch.current_server() is None  # reset after the call

        asyncio.run(main())
    finally:
        patch._opener = None


def test_unloaded_opener_fails_closed() -> None:
    patched = patch._build(_shaped_like_mitmproxy)

    async def main() -> None:
        with pytest.raises(OSError, match="unloaded"):
            await patched(_Self(), _Command(Server(address=("example.com", 80))))

    asyncio.run(main())
