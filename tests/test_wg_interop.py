"""The WireGuard core against real peers none of us wrote.

- wireguard-go (Debian's package) with the Linux kernel's IP stack behind it, in a network
  namespace pair built by tests/harness: handshake, ICMP echo (v4 and v6) and UDP answered by
  the kernel, counters confirmed by `wg show`; `mitm-wg check` as a subprocess.
- mitmproxy's WireGuard mode (boringtun + smoltcp): handshake and keepalives.
- State left by another implementation: a wireguard-go client with the SAME private key
  handshakes just before (or just after) us; each side's first initiation must be accepted
  (TAI64N timestamps on the same base as wireguard-go's, or the exit drops ours as replays).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness import wait_until, wireguard_go_interface
from harness.exitpeer import b64
from mitm_wg.config import WireGuardConfig, encode_key, generate_private_key
from mitm_wg.wireguard import crypto
from mitm_wg.wireguard.device import Device, HandshakeCompleted
from tests.wgdrive import Driver, icmp_echo_v4, icmp_echo_v6, udp_v4

REPO = Path(__file__).resolve().parent.parent


def make_driver(peer, config_text: str) -> Driver:
    config = WireGuardConfig.parse(config_text)
    device = Device.from_config(config, unix_time_offset=time.time() - time.monotonic())
    family = socket.AF_INET6 if ":" in peer.endpoint[0] else socket.AF_INET
    sock = peer.client_ns.socket(family, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    return Driver(device, sock)


def test_handshake_and_kernel_answers_icmp_and_udp(exit_peer) -> None:
    driver = make_driver(exit_peer, exit_peer.client_config_text())
    try:
        driver.handshake()
        # wireguard-go, as responder, records the handshake only on key confirmation: when
        # our first packet under the new keys (the keepalive sent with the handshake's end)
        # has been processed by its receive goroutines, which can lag `wg show` under load.
        wait_until(
            lambda: exit_peer.client_stats().latest_handshake > 0,
            10,
            "wireguard-go to confirm the session (latest handshake)",
        )
        # IPv4 echo answered by the exit namespace's kernel.
        payload = os.urandom(56)
        assert driver.send(
            icmp_echo_v4(exit_peer.client_tunnel_v4, exit_peer.server_tunnel_v4, 0x4D57, 1, payload)
        )
        reply = driver.receive_packet()
        assert reply[9] == 1 and reply[20] == 0  # ICMP echo reply
        assert reply[12:16] == socket.inet_aton(exit_peer.server_tunnel_v4)
        assert reply[24:28] == bytes([0x4D, 0x57, 0, 1]) and reply[28:] == payload
        # IPv6 echo.
        payload6 = os.urandom(32)
        driver.send(
            icmp_echo_v6(exit_peer.client_tunnel_v6, exit_peer.server_tunnel_v6, 7, 9, payload6)
        )
        reply6 = driver.receive_packet()
        assert reply6[6] == 58 and reply6[40] == 129 and reply6[48:] == payload6
        # UDP to a closed port: the kernel answers ICMP port unreachable through the tunnel.
        driver.send(udp_v4(exit_peer.client_tunnel_v4, exit_peer.server_tunnel_v4, 40000, 9, b"?"))
        unreachable = driver.receive_packet()
        assert unreachable[9] == 1 and unreachable[20:22] == bytes([3, 3])
        # DNS over UDP to dnsmasq behind the peer.
        query = bytes.fromhex("abcd01000001000000000000") + b"\x04exit\x04test\x00\x00\x01\x00\x01"
        driver.send(udp_v4(exit_peer.client_tunnel_v4, exit_peer.dns_server, 40001, 53, query))
        answer = driver.receive_packet()
        assert answer[9] == 17 and answer[28:30] == b"\xab\xcd"
        assert socket.inet_aton(exit_peer.server_tunnel_v4) in answer[28:]
        stats = exit_peer.client_stats()
        assert stats.rx_bytes > 0 and stats.tx_bytes > 0
        ours = driver.device.status()[0]
        assert ours.rx_bytes > 0 and ours.tx_bytes > 0
    finally:
        driver.sock.close()


def _handshake_ours_at_once(peer) -> None:
    """A new Device with the shared key handshakes, and the exit accepts its FIRST initiation."""
    driver = make_driver(peer, peer.client_config_text())
    try:
        driver.handshake(timeout=15.0)  # long enough for retries: we assert on the count
        ours = driver.device.status()[0]
        assert ours.handshake_attempts == 1, (
            f"the exit dropped {ours.handshake_attempts - 1} initiation(s) of ours "
            f"(replayed TAI64N timestamp?); drops={dict(driver.device.drops)}"
        )
        assert peer.client_stats().endpoint == (
            f"10.77.{peer.index}.1",
            driver.sock.getsockname()[1],
        )
    finally:
        driver.sock.close()


def _handshake_wireguard_go_at_once(peer) -> None:
    """A reference wireguard-go client with the shared key: its first initiation is accepted."""
    log = peer.workdir / f"wg-{peer.client_ifname}.log"
    log.unlink(missing_ok=True)
    with wireguard_go_interface(
        peer.client_ns, peer.client_ifname, peer.client_config_text(dns=False), peer.workdir,
        verbose=True,
    ):  # fmt: skip

        def answered() -> bool:
            curl = ["curl", "-sS", "--noproxy", "*", "-m", "3", f"{peer.http_url}/"]
            return peer.client_ns.exec(curl, check=False).returncode == 0

        wait_until(answered, 30, "an HTTP GET through the reference wireguard-go client")
        text = log.read_text(errors="replace")
        assert "Received handshake response" in text, text[-2000:]
        assert text.count("Sending handshake initiation") == 1, text[-2000:]


def test_same_key_wireguard_go_then_ours(fresh_exit_peer) -> None:
    # Another implementation used our private key a moment ago: the exit remembers its
    # TAI64N timestamp, and ours must be greater at once (same 2**62 + 10 base).
    _handshake_wireguard_go_at_once(fresh_exit_peer)
    _handshake_ours_at_once(fresh_exit_peer)


def test_ours_then_same_key_wireguard_go_then_ours(fresh_exit_peer) -> None:
    _handshake_ours_at_once(fresh_exit_peer)
    _handshake_wireguard_go_at_once(fresh_exit_peer)
    _handshake_ours_at_once(fresh_exit_peer)  # a restarted mitm-wg (new Device) after it


def _check_cli(ns, config_text: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    path = tmp_path / "wg0.conf"
    path.write_text(config_text)
    return ns.exec(
        [sys.executable, "-m", "mitm_wg", "check", str(path), *extra],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("keepalive", [None, 25])
def test_check_cli_succeeds_against_wireguard_go(
    exit_peer, tmp_path: Path, keepalive: int | None
) -> None:
    """(With PersistentKeepalive the tunnel's own keepalive starts the handshake as it
    opens: the check waits for that one instead of its own.)"""
    text = exit_peer.client_config_text(keepalive=keepalive)
    result = _check_cli(exit_peer.client_ns, text, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "handshake completed" in result.stdout
    assert f"{exit_peer.endpoint[0]}:{exit_peer.endpoint[1]}" in result.stdout


def test_check_cli_names_silent_endpoint_when_key_is_wrong(exit_peer, tmp_path: Path) -> None:
    # A client key the peer does not know: wireguard-go drops the initiation silently.
    text = exit_peer.client_config_text()
    stranger = encode_key(generate_private_key())
    text = "\n".join(
        f"PrivateKey = {stranger}" if line.startswith("PrivateKey") else line
        for line in text.splitlines()
    )
    started = time.monotonic()
    result = _check_cli(exit_peer.client_ns, text, tmp_path, "--timeout", "3")
    assert time.monotonic() - started < 20
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{exit_peer.endpoint[0]}:{exit_peer.endpoint[1]}" in lines[0]
    assert "PublicKey" in lines[0] and "Traceback" not in result.stderr
    assert stranger not in result.stderr
    assert "ICMP" not in lines[0]  # (it is up: silence is not called unreachable)


def test_check_cli_names_a_preshared_key_mismatch(fresh_exit_peer, tmp_path: Path) -> None:
    """The exit has a PresharedKey for us, the config none: the exit answers, the answer
    does not decrypt, and the one line says so and names the PresharedKey (before: "no
    handshake response", the key among the likely causes not even named)."""
    peer = fresh_exit_peer
    key_file = peer.workdir / "psk"
    key_file.write_text(encode_key(generate_private_key()))
    key_file.chmod(0o600)
    peer.ns.exec(
        ["wg", "set", peer.ifname, "peer", b64(peer.client_public_key),
         "preshared-key", str(key_file)]
    )  # fmt: skip
    psk = key_file.read_text()
    key_file.unlink()
    result = _check_cli(peer.client_ns, peer.client_config_text(), tmp_path, "--timeout", "3")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    host, port = peer.endpoint
    assert f"no handshake with {host}:{port}" in lines[0]
    assert "it answered, but its responses" in lines[0] and "PresharedKey" in lines[0]
    assert psk not in result.stderr and "Traceback" not in result.stderr


def test_check_cli_names_a_closed_port_at_the_endpoint(exit_peer, tmp_path: Path) -> None:
    """An Endpoint with a wrong port (the server's host is up, nothing receives there):
    the host's ICMP port unreachable is in the one line, with what to check."""
    host, port = exit_peer.endpoint
    closed = exit_peer.ns.free_udp_port(host)
    text = exit_peer.client_config_text().replace(f"{host}:{port}", f"{host}:{closed}")
    assert f"{host}:{closed}" in text
    result = _check_cli(exit_peer.client_ns, text, tmp_path, "--timeout", "3")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{host}:{closed}" in lines[0]
    assert f"nothing receives on UDP port {closed} (ICMP port unreachable)" in lines[0]
    assert "Endpoint's port" in lines[0] and "Traceback" not in result.stderr


def test_check_cli_names_a_listen_port_held_by_wg_quick_of_the_same_config(
    fresh_exit_peer, tmp_path: Path
) -> None:
    """Configs written for wg-quick often carry a ListenPort, and the user's own
    ``wg-quick up`` of that config (here a wireguard-go interface set up from the same
    text) holds the port: one line naming the port, the file and what to do."""
    peer = fresh_exit_peer
    port = peer.client_ns.free_udp_port("0.0.0.0")
    text = peer.client_config_text().replace(
        "[Interface]\n", f"[Interface]\nListenPort = {port}\n", 1
    )
    with wireguard_go_interface(peer.client_ns, peer.client_ifname, text, peer.workdir):
        result = _check_cli(peer.client_ns, text, tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"ListenPort {port} of {tmp_path / 'wg0.conf'} is in use" in lines[0]
    assert "wg-quick up" in lines[0] and "remove the ListenPort line" in lines[0]
    assert encode_key(peer.client_private_key) not in result.stderr


def test_check_cli_config_error_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.conf"
    path.write_text("[Interface]\nPrivateKey = nope\n")
    result = subprocess.run(
        [sys.executable, "-m", "mitm_wg", "check", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"mitm-wg: error: {path}, line 2:")
    assert "Traceback" not in result.stderr


def test_handshake_with_mitmproxy_wireguard_mode(mitm_peer) -> None:
    config = WireGuardConfig.parse(mitm_peer.client_config_text())
    device = Device.from_config(config, unix_time_offset=time.time() - time.monotonic())
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    driver = Driver(device, sock)
    try:
        driver.handshake()
        peer = device.status()[0]
        assert peer.has_session and peer.rx_bytes >= 92
        # A second, forced handshake (rekey) also completes with boringtun.
        p = next(iter(device.peers.values()))
        driver.events.clear()
        p.last_initiation_sent = float("-inf")
        driver.handshake()
        assert p.previous is not None and p.current is not p.previous
    finally:
        sock.close()


def test_check_cli_against_mitmproxy(mitm_peer, tmp_path: Path) -> None:
    path = tmp_path / "mitm.conf"
    path.write_text(mitm_peer.client_config_text())
    result = subprocess.run(
        [sys.executable, "-m", "mitm_wg", "check", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "handshake completed" in result.stdout


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))


def _loaded_burst(flood: socket.socket, endpoint: tuple[str, int], mac1_key: bytes) -> None:
    """200 handshake initiations with a valid mac1 (anyone who knows the exit's public key
    can make one) and garbage inside: each costs wireguard-go a Diffie-Hellman before it
    fails, and together they fill its handshake queue past the 1/8 mark where it counts
    itself under load (for at least a second after)."""
    for _ in range(200):
        body = b"\x01\x00\x00\x00" + os.urandom(112)
        flood.sendto(body + crypto.mac(mac1_key, body) + bytes(16), endpoint)


def test_handshake_through_cookie_replies_of_a_loaded_wireguard_go(fresh_exit_peer) -> None:
    """A busy (or attacked) exit answers initiations without a valid mac2 with a cookie
    reply and drops them (whitepaper §5.3, §5.4.7): our next initiation must carry mac2
    under the cookie, and the exit, still under load, must take it.

    The load is real: wireguard-go is paused (SIGSTOP, by PID) while a burst of valid-mac1
    initiations and then ours wait in its socket; resumed, it queues them all at once and
    is under load when it reaches ours. Twice: the first time it answers ours with a cookie
    reply, the second time (our retry, REKEY_TIMEOUT later) with a handshake response. The
    burst's own cookie replies to the flooding socket show the exit was under load both
    times; an attempt it was not loaded for is repeated (below)."""
    peer = fresh_exit_peer
    # one OS thread for all of wireguard-go's goroutines: the goroutine reading the socket
    # queues the whole burst before a handshake worker takes the first (with a thread each,
    # the workers kept the queue short on this machine and the exit never felt loaded)
    peer.stop_wireguard()
    peer.start_wireguard(env=["GOMAXPROCS=1"], verbose=True)
    wg = peer._wg_proc
    assert wg is not None
    driver = make_driver(peer, peer.client_config_text())
    flood = peer.client_ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flood.bind(("0.0.0.0", 0))
    flood.settimeout(0.5)
    received: list[int] = []
    receive = driver.device.receive_datagram

    def recording(data, *args, **kw):  # type: ignore[no-untyped-def]
        received.append(data[0])
        return receive(data, *args, **kw)

    driver.device.receive_datagram = recording  # type: ignore[method-assign]
    (ours,) = driver.device.peers.values()
    mac1_key = ours.cookies._mac1_key

    def cookie_replies_to_flood() -> int:
        n = 0
        with contextlib.suppress(TimeoutError):
            while True:
                data = flood.recv(2048)
                n += data[0] == 3
        return n

    def stopped() -> bool:  # every thread of it (a SIGSTOP takes effect asynchronously)
        tasks = Path(f"/proc/{wg.pid}/task")
        return all(
            (t / "stat").read_text().rsplit(")", 1)[1].split()[0] in "tT" for t in tasks.iterdir()
        )

    def paused_burst_then(send_ours: Callable[[], None]) -> None:
        os.kill(wg.pid, signal.SIGSTOP)
        try:
            wait_until(stopped, 5, "wireguard-go to stop")
            _loaded_burst(flood, peer.endpoint, mac1_key)
            send_ours()
        finally:
            os.kill(wg.pid, signal.SIGCONT)

    def completed() -> int:
        return sum(isinstance(e, HandshakeCompleted) for e in driver.events)

    def stepped(predicate: Callable[[], bool]) -> Callable[[], bool]:
        def check() -> bool:
            driver.step(0.05)
            return predicate()

        return check

    def initiation(retry: bool) -> Callable[[], None]:
        """Sends our next initiation: our own retry (REKEY_TIMEOUT after the last one, as
        the device's timer sends it) or a fresh one (connect() as soon as the rate limit
        allows)."""

        def send() -> None:
            attempts = driver.device.status()[0].handshake_attempts
            end = time.monotonic() + 15  # REKEY_TIMEOUT + jitter, with room
            while driver.device.status()[0].handshake_attempts == attempts:
                assert time.monotonic() < end, "no initiation of ours went out"
                if not retry:
                    out: list[Any] = []
                    driver.device.connect(ours, time.monotonic(), out)
                    driver._flush(out)
                driver.step(0.05)

        return send

    def attempt(retry: bool) -> tuple[int, list[int]]:
        """One initiation of ours behind a burst into the paused exit: how many cookie
        replies the burst got (0: the exit did not count itself loaded), and the message
        types we received until the exit answered ours (a cookie reply or a response)."""
        first, done = len(received), completed()
        paused_burst_then(initiation(retry))
        try:
            wait_until(
                stepped(lambda: 3 in received[first:] or completed() > done), 10, "an answer"
            )
        except TimeoutError:
            log = (peer.workdir / "wg-exit.log").read_text(errors="replace")
            raise AssertionError(
                f"no answer: we received message types {received[first:]}; the burst got"
                f" {cookie_replies_to_flood()} cookie replies; the exit logged {log[-1500:]}"
            ) from None
        return cookie_replies_to_flood(), received[first:]

    def until_loaded(retry: bool, check: Callable[[int, list[int]], None]) -> tuple[int, list[int]]:
        """:func:`attempt` until the exit counted itself loaded for one, at most three;
        ``retry``: the first is our own retry. ``check(loaded, got)`` runs on each. Returns
        how many attempts it took, and what we received in the last."""
        for n in range(1, 4):
            flood_replies, got = attempt(retry=retry and n == 1)
            check(flood_replies, got)
            if flood_replies:
                return n, got
        raise AssertionError("the exit never counted itself loaded in 3 attempts")

    # Whether the exit counts itself loaded is up to its goroutine scheduling: the burst
    # must be queued past the 1/8 mark when a handshake worker looks, and now and then, on
    # a busy machine, a worker drains the first batch of reads before the next is queued.
    # An attempt the exit was not loaded for (the burst got no cookie reply) answers ours
    # with a response whatever it carries and proves nothing: another attempt follows, a
    # fresh initiation behind another burst, up to three per step.
    try:
        # 1: our initiation, behind the burst: a cookie reply, no response
        def unloaded_answered(loaded: int, got: list[int]) -> None:
            assert loaded or 3 not in got  # not loaded: answered

        def no_cookie_reply(loaded: int, got: list[int]) -> None:
            assert 3 not in got, "a cookie reply to an initiation with mac2"

        tries, got = until_loaded(False, unloaded_answered)
        assert 2 not in got and ours.cookies._cookie is not None
        assert got.count(3) == 1

        # 2: our retry comes REKEY_TIMEOUT later behind a new burst, so it lands under load
        # again: it carries mac2 under the cookie, and the exit takes it
        retries, got = until_loaded(True, no_cookie_reply)
        assert 2 in got  # the handshake response to our initiation with mac2
        assert received.count(3) == 1  # one cookie reply to us: the later ones were taken
        assert driver.device.status()[0].handshake_attempts == tries + retries
        # the exit's own account (verbose log): a cookie reply to our address, then ours taken
        log = (peer.workdir / "wg-exit.log").read_text(errors="replace")
        port = driver.sock.getsockname()[1]
        assert (
            log.count(
                "Sending cookie response for denied handshake message for"
                f" 10.77.{peer.index}.1:{port}\n"
            )
            == 1
        )
        assert log.count("Sending handshake response") == tries - 1 + retries
        # and the session carries traffic
        payload = os.urandom(32)
        assert driver.send(
            icmp_echo_v4(peer.client_tunnel_v4, peer.server_tunnel_v4, 0x4D57, 2, payload)
        )
        reply = driver.receive_packet()
        assert reply[9] == 1 and reply[20] == 0 and reply[28:] == payload
    finally:
        if wg.poll() is None:
            os.kill(wg.pid, signal.SIGCONT)
        flood.close()
        driver.sock.close()
