"""The ``mitm-wg`` command line.

``mitm-wg check CONFIG [--url URL]``: handshake with every peer of a wg-quick config over a
real UDP socket, on the trio runtime the addon uses (:func:`mitm_wg.runtime.open_tunnel`),
and report; with ``--url``, also fetch a URL through the tunnel (our TCP/IP
stack, names resolved by the tunnel's DNS servers) and print status, size, time to first byte
and speed.  Exits non-zero with one line of explanation when something is wrong.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mitm_wg.config import Endpoint, WireGuardConfig, format_endpoint
from mitm_wg.errors import ConfigError
from mitm_wg.wireguard.peer import Peer

if TYPE_CHECKING:
    from mitm_wg.runtime import Tunnel

MAX_CHECK_TIMEOUT = 20.0


class CheckFailed(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


@dataclass
class PeerResult:
    peer: Peer
    endpoint: Endpoint | None
    started: float
    completed: float | None = None
    error: OSError | None = None
    #: what the tunnel learned of why the handshake failed (``HandshakeTimeout.cause``)
    cause: str | None = None


def check(
    config: WireGuardConfig,
    timeout: float,
    out=sys.stdout,
    *,
    url: str | None = None,
    insecure: bool = False,
) -> None:
    """Handshake with every peer through the trio runtime (the same tunnel the addon runs);
    print one line per peer and raise CheckFailed on any failure. With ``url``, then fetch
    it through the same tunnel (:func:`fetch_url`)."""
    import trio

    from mitm_wg.runtime.clock import runtime_clock

    trio.run(
        functools.partial(_check, config, timeout, out, url=url, insecure=insecure),
        clock=runtime_clock(),
    )


async def _check(
    config: WireGuardConfig,
    timeout: float,
    out,
    *,
    url: str | None = None,
    insecure: bool = False,
) -> None:
    import trio

    from mitm_wg.errors import HandshakeTimeout
    from mitm_wg.runtime import open_tunnel

    config.require_peers()
    for pc in config.peers:
        if pc.endpoint is None:
            raise CheckFailed(
                f"peer {pc.public_key_b64} has no Endpoint: mitm-wg must know where to send "
                "the handshake"
            )
    results: list[PeerResult] = []

    async def handshake(tunnel, result: PeerResult) -> None:
        peer = result.peer
        # With PersistentKeepalive the tunnel began this handshake as it opened: time it
        # from there, not from this call.
        began = peer.handshake_started if peer.handshake is not None else None
        result.started = trio.current_time() if began is None else began
        try:
            result.completed = await tunnel.handshake(result.peer)
        except HandshakeTimeout as e:
            result.cause = e.cause
        except OSError as e:
            result.error = e

    try:
        async with open_tunnel(config, handshake_timeout=timeout) as tunnel:
            for pc in config.peers:
                peer = tunnel.device.peers[pc.public_key]
                results.append(PeerResult(peer, peer.endpoint, trio.current_time()))
            async with trio.open_nursery() as nursery:
                for result in results:
                    nursery.start_soon(handshake, tunnel, result)
            _report(results, timeout, out)
            if url is not None:
                # Through the same tunnel and session: a second tunnel with the same key
                # would initiate again within 20 ms of this one, and the peer (wireguard-go,
                # Linux: one initiation per key per 20 ms) would drop it: 5 s to the retry.
                await fetch_url(tunnel, url, insecure=insecure, timeout=max(timeout, 10.0), out=out)
    except OSError as e:  # an endpoint that does not resolve, a ListenPort in use, ...
        raise CheckFailed(e.strerror or str(e)) from None


def _report(results: list[PeerResult], timeout: float, out) -> None:
    for result in results:
        if result.error is not None:
            raise CheckFailed(result.error.strerror or str(result.error))
    failed = []
    for result in results:
        name = result.peer.public_key_b64
        ep = format_endpoint(result.endpoint)
        if result.completed is not None:
            ms = (result.completed - result.started) * 1000
            print(f"peer {name} at {ep}: handshake completed in {ms:.1f} ms", file=out)
        else:
            failed.append(result)
    if failed:
        first = failed[0]
        more = f" ({len(failed) - 1} more peer(s) failed too)" if len(failed) > 1 else ""
        who = f"{format_endpoint(first.endpoint)} (peer {first.peer.public_key_b64})"
        if first.cause is not None:
            raise CheckFailed(f"no handshake with {who} within {timeout:g} s: {first.cause}{more}")
        raise CheckFailed(
            f"no handshake response from {who} within {timeout:g} s; likely causes: the "
            "peer's PublicKey is wrong or it does not know our key, the endpoint is "
            "unreachable, or UDP to it is blocked" + more
        )


def host_header(url: str) -> str:
    """The Host header for ``url``: its authority without userinfo, as written (RFC 9110
    §7.2), so an IPv6 literal keeps its brackets (``http://[::1]:8080/`` -> ``[::1]:8080``)."""
    from urllib.parse import urlsplit

    return urlsplit(url).netloc.rpartition("@")[2]


async def fetch_url(tunnel: Tunnel, url: str, *, insecure: bool, timeout: float, out) -> None:
    """GET ``url`` through ``tunnel`` and print status, size, time to first byte and speed."""
    import ssl
    from urllib.parse import urlsplit

    import h11
    import trio

    from mitm_wg.errors import HandshakeTimeout

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CheckFailed(f"--url must be an http:// or https:// URL, not {url!r}")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    start = trio.current_time()
    try:
        with trio.fail_after(timeout):
            stream: trio.abc.Stream = await tunnel.open_tcp_stream(host, port)
        connected = trio.current_time()
        peer = tunnel.route(stream.remote_address[0])  # type: ignore[attr-defined]
        print(
            f"connected to {format_endpoint(stream.remote_address)} through peer "  # type: ignore[attr-defined]
            f"{peer.public_key_b64 if peer else '?'} in {(connected - start) * 1000:.0f} ms",
            file=out,
        )
        if parts.scheme == "https":
            context = ssl.create_default_context()
            if insecure:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            stream = trio.SSLStream(stream, context, server_hostname=host)
            with trio.fail_after(timeout):
                await stream.do_handshake()
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET",
            target=target,
            headers=[
                ("Host", host_header(url)),
                ("User-Agent", "mitm-wg-check"),
                ("Accept", "*/*"),
                ("Connection", "close"),
            ],
        )
        sent = trio.current_time()
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        first_byte: float | None = None
        size = 0
        status = ""
        with trio.fail_after(max(timeout, 60.0)):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if first_byte is None and data:
                        first_byte = trio.current_time()
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Response):
                    status = (
                        f"HTTP/{event.http_version.decode()} {event.status_code} "
                        f"{event.reason.decode(errors='replace')}"
                    )
                    body_start = trio.current_time()
                elif isinstance(event, h11.Data):
                    size += len(event.data)
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
        done = trio.current_time()
        await stream.aclose()
    except HandshakeTimeout as e:
        raise CheckFailed(str(e)) from None
    except trio.TooSlowError:
        raise CheckFailed(f"{url}: no answer within {timeout:g} s through the tunnel") from None
    except ssl.SSLCertVerificationError as e:
        raise CheckFailed(
            f"{url}: TLS certificate verification failed ({e.verify_message}); "
            "use --insecure to skip verification"
        ) from None
    except (ssl.SSLError, trio.BrokenResourceError) as e:
        cause = e.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise CheckFailed(
                f"{url}: TLS certificate verification failed ({cause.verify_message}); "
                "use --insecure to skip verification"
            ) from None
        raise CheckFailed(f"{url}: connection failed: {cause or e}") from None
    except h11.RemoteProtocolError as e:
        raise CheckFailed(f"{url}: not a valid HTTP response: {e}") from None
    except OSError as e:
        raise CheckFailed(f"{url}: {e.strerror or e}") from None
    ttfb = ((first_byte or done) - sent) * 1000
    seconds = max(done - body_start, 1e-9)
    print(status, file=out)
    print(
        f"{size} bytes, time to first byte {ttfb:.0f} ms, {size / seconds / 1e6:.2f} MB/s",
        file=out,
    )


def addon_path() -> str:
    """The absolute path of the addon file that ``mitmproxy -s`` loads."""
    from mitm_wg.addon import PATH

    return str(PATH)


def version_text() -> str:
    """``mitm-wg X (mitmproxy Y, Python Z)``; mitmproxy's version without importing it."""
    import platform
    from importlib import metadata

    from mitm_wg import __version__

    try:
        mitmproxy_version = metadata.version("mitmproxy")
    except metadata.PackageNotFoundError:
        mitmproxy_version = "not installed"
    return (
        f"mitm-wg {__version__} (mitmproxy {mitmproxy_version}, Python {platform.python_version()})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mitm-wg", description="mitmproxy upstream connections through WireGuard"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "addon",
        help="print the path of the addon file for mitmproxy/mitmdump/mitmweb -s",
        description='Prints the absolute path of the addon file: mitmproxy -s "$(mitm-wg addon)"',
    )
    p_check = sub.add_parser("check", help="handshake with every peer of a wg-quick config")
    p_check.add_argument("config", help="path to a wg-quick .conf file")
    p_check.add_argument(  # also after the subcommand, where users type it
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
    )
    p_check.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help=f"seconds to wait for each peer (at most {MAX_CHECK_TIMEOUT:g}; default 10)",
    )
    p_check.add_argument(
        "--url",
        help="also fetch this http:// or https:// URL through the tunnel (names resolve "
        "through the tunnel's DNS servers)",
    )
    p_check.add_argument(
        "--insecure", action="store_true", help="with an https:// --url: skip certificate checks"
    )
    p_demo = sub.add_parser(
        "demo", help="mitmproxy + the addon + a local WireGuard exit peer (no root, no VPN)"
    )
    from mitm_wg import demo

    demo.add_arguments(p_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "addon":
            print(addon_path())
            return 0
        if args.command == "demo":
            return demo.run(args)
        if args.command == "check":
            timeout = min(max(args.timeout, 0.1), MAX_CHECK_TIMEOUT)
            config = WireGuardConfig.from_file(args.config)
            check(config, timeout, url=args.url, insecure=args.insecure)
    except (ConfigError, CheckFailed, demo.DemoError) as e:
        print(f"mitm-wg: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
