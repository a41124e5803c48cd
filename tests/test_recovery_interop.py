"""Recovery after the exit restarts, against wireguard-go + Linux in network namespaces.

The exit's wireguard-go is killed and started again with the same keys: it has no session,
and it does not know our endpoint, so it cannot initiate. Our tunnel still holds its old
session and sends into the void. WireGuard's passive timer would re-handshake 15 s after the
first unanswered packet, and TCP's SYN backoff (1, 2, 4, 8 s) would add more; our rule
re-handshakes when a new connection's SYN has to be retransmitted, and resends pending
segments as soon as the new session is up.

Assertions are on behaviour, not on wall-clock time: the handshake that restored the tunnel
was started by the SYN rule (``Peer.silence_handshakes``), and the SYN that got through was
sent because the session came up, not by TCP's retransmission timer (more retransmissions
than timeouts). Both fail without the rule or without the resend.
"""

from __future__ import annotations

import trio

from harness import ExitPeer
from mitm_wg.config import WireGuardConfig
from mitm_wg.runtime import open_tunnel
from mitm_wg.wireguard.timers import REKEY_TIMEOUT
from tests.runtime_helpers import NamespaceSocketFactory, http_get, pattern_sha256


async def test_new_connection_after_the_exit_restarts(fresh_exit_peer: ExitPeer) -> None:
    peer = fresh_exit_peer
    config = WireGuardConfig.parse(peer.client_config_text(dns=False))
    factory = NamespaceSocketFactory(peer.client_ns)
    host, port = peer.server_tunnel_v4, peer.http_port
    async with open_tunnel(config, socket_factory=factory) as tunnel:
        with trio.fail_after(60):  # hang guards only
            before = await tunnel.open_tcp_stream(host, port)
            assert (await http_get(before, "/bytes/1000")).size == 1000
        wg = before.peer
        handshakes = wg.handshakes_completed
        assert handshakes == 1 and wg.current is not None

        await trio.to_thread.run_sync(peer.stop_wireguard)
        await trio.to_thread.run_sync(peer.start_wireguard)
        assert wg.current is not None  # ours still believes in the old session

        in_flight: list[object] = []

        async def request_in_flight() -> None:
            # a request on the connection opened before the restart: it resumes or fails
            try:
                response = await http_get(before, "/bytes/2000")
            except trio.BrokenResourceError as e:
                in_flight.append(e)
            else:
                in_flight.append(response)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(request_in_flight)
                stream = await tunnel.open_tcp_stream(host, port)
                response = await http_get(stream, "/bytes/5000")
                assert response.status == 200 and response.sha256 == pattern_sha256(5000)
        sock = stream.socket
        assert wg.handshakes_completed == handshakes + 1
        assert wg.silence_handshakes == 1, "the handshake was not started by the SYN rule"
        assert sock.stats.retransmits > sock.stats.rto_expired >= 1, (
            "the SYN that connected was sent by a retransmission timer, not when the new "
            f"session came up: {sock.stats}"
        )
        # the connection in flight resumed on the new session (its data was resent then)
        (result,) = in_flight
        assert not isinstance(result, Exception), result
        assert result.size == 2000 and result.sha256 == pattern_sha256(2000)  # type: ignore[attr-defined]
        await stream.aclose()
        await before.aclose()
    assert peer.client_stats().latest_handshake > 0
    assert factory.destinations == {peer.endpoint}


async def test_name_lookup_after_the_exit_restarts(fresh_exit_peer: ExitPeer) -> None:
    """A connection by name: the DNS query through the dead session times out once, that
    timeout re-handshakes (same rule as for SYNs), and the retry waits for the new session."""
    peer = fresh_exit_peer
    config = WireGuardConfig.parse(peer.client_config_text())  # DNS = the exit's dnsmasq
    factory = NamespaceSocketFactory(peer.client_ns)
    async with open_tunnel(config, socket_factory=factory) as tunnel:
        with trio.fail_after(60):
            before = await tunnel.open_tcp_stream(peer.server_tunnel_v4, peer.http_port)
            await before.aclose()
        wg = before.peer
        await trio.to_thread.run_sync(peer.stop_wireguard)
        await trio.to_thread.run_sync(peer.start_wireguard)
        # WireGuard allows one initiation per REKEY_TIMEOUT: start when ours may send one
        # (a condition, not a timing assumption; the SYN test covers the rate-limited case)
        await trio.sleep_until(wg.last_initiation_sent + REKEY_TIMEOUT)
        resolver = tunnel._resolver
        timeouts = resolver.timeouts  # type: ignore[union-attr]
        with trio.fail_after(60):
            stream = await tunnel.open_tcp_stream("exit.test", peer.http_port)
            response = await http_get(stream, "/bytes/3000")
            assert response.sha256 == pattern_sha256(3000)
            await stream.aclose()
        assert wg.silence_handshakes == 1, "the handshake was not started by the DNS timeout"
        assert resolver.timeouts > timeouts  # type: ignore[union-attr]
        assert "exit.test" in peer.queries()
    assert factory.destinations == {peer.endpoint}
