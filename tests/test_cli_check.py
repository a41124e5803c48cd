"""`mitm-wg check` on the trio runtime: handshakes with our own tunnel over loopback UDP."""

from __future__ import annotations

import io
import re

import pytest
import trio

from mitm_wg import cli
from mitm_wg.runtime import open_tunnel
from tests.tunnelpair import free_udp_port, loopback_factory, pair_configs


async def test_check_reports_each_peer_handshake() -> None:
    pa, pb = free_udp_port(), free_udp_port()
    ca, cb = pair_configs(pa, pb)
    out = io.StringIO()
    async with open_tunnel(cb, socket_factory=loopback_factory(pb)):
        with trio.fail_after(30):
            await cli._check(ca, 10.0, out)
    line = out.getvalue().strip()
    peer = ca.peers[0].public_key_b64
    assert re.fullmatch(
        rf"peer {re.escape(peer)} at 127\.0\.0\.1:{pb}: handshake completed in \d+\.\d ms", line
    ), line


async def test_check_names_a_silent_endpoint() -> None:
    pa, pb = free_udp_port(), free_udp_port()
    ca, _ = pair_configs(pa, pb)  # nobody listens on pb
    out = io.StringIO()
    with trio.fail_after(30), pytest.raises(cli.CheckFailed) as info:
        await cli._check(ca, 0.5, out)
    message = str(info.value)
    assert message.startswith(f"no handshake response from 127.0.0.1:{pb} (peer ")
    assert "within 0.5 s" in message and "PublicKey" in message
    assert out.getvalue() == ""


async def test_check_refuses_a_peer_without_endpoint() -> None:
    pa, pb = free_udp_port(), free_udp_port()
    _, cb = pair_configs(pa, pb)
    text = "\n".join(line for line in cb.to_text().splitlines() if not line.startswith("Endpoint"))
    config = cb.parse(text)
    with pytest.raises(cli.CheckFailed, match="has no Endpoint"):
        await cli._check(config, 1.0, io.StringIO())


def test_check_is_driven_by_the_runtime_not_a_select_loop() -> None:
    # One runtime (issue 11): the CLI has no select() loop or endpoint resolution of its own.
    import inspect

    source = inspect.getsource(cli)
    assert "select" not in source and "getaddrinfo" not in source
    assert "receive_datagram" not in source


def test_host_header_keeps_ipv6_brackets() -> None:
    assert cli.host_header("http://[2001:db8::1]/x") == "[2001:db8::1]"
    assert cli.host_header("https://[2001:db8::1]:8443/") == "[2001:db8::1]:8443"
    assert cli.host_header("http://user:pw@example.com:8080/") == "example.com:8080"
    assert cli.host_header("http://example.com/") == "example.com"
