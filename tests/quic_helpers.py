"""A real QUIC origin and QUIC clients for the HTTP/3 / QUIC upstream tests (aioquic).

Runs as a script inside a test namespace (aioquic is a mitmproxy dependency)::

    python tests/quic_helpers.py server --cert C --key K --log FILE --ready FILE \
        --h3 HOST:PORT --echo HOST:PORT
    python tests/quic_helpers.py h3-get --url https://HOST:PORT/path --connect HOST:PORT \
        --ca CA.pem [--server-name NAME]
    python tests/quic_helpers.py echo --connect HOST:PORT --ca CA.pem --server-name NAME \
        --message TEXT [--size N]

Server, HTTP/3 (ALPN ``h3``) on ``--h3``
    ``GET /echo…`` answers JSON ``{"client", "port", "method", "path", "proto": "h3",
    "authority", "headers"}`` (who asked: the address the QUIC connection came from);
    ``GET /bytes/N`` answers N bytes of ``pattern(N)`` (byte i == i % 256);
    ``POST`` to any path answers ``{"sha256", "size"}`` of the body.
Server, raw QUIC (ALPN ``mitm-wg-echo``) on ``--echo``
    Every bidirectional stream is echoed back; the text ``whoami`` answers the client JSON.

Every connection and request is one JSON line in ``--log`` (``event``: ``connect``,
``request``, ``echo``). The clients print one JSON line (status, headers, body as latin-1
plus its sha256 and size) and exit 0, or exit 1 with the error on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import signal
import ssl
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, QuicEvent, StreamDataReceived

ECHO_ALPN = "mitm-wg-echo"
_BLOCK = bytes(range(256)) * 256


def pattern(n: int) -> bytes:
    return (_BLOCK * (n // len(_BLOCK) + 1))[:n]


def _split(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


# -- server ------------------------------------------------------------------------------------


class _Log:
    def __init__(self, path: Path) -> None:
        self._file = path.open("a", buffering=1)

    def write(self, **entry: Any) -> None:
        self._file.write(json.dumps(entry, sort_keys=True) + "\n")


def _peer(protocol: QuicConnectionProtocol) -> tuple[str, int]:
    # aioquic keeps the validated network paths; the first is where the connection came from.
    addr = protocol._quic._network_paths[0].addr
    host = str(addr[0])
    if host.startswith("::ffff:"):
        host = host[len("::ffff:") :]
    return host, int(addr[1])


class H3Server(QuicConnectionProtocol):
    log: _Log

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._h3: H3Connection | None = None
        self._requests: dict[int, dict[str, Any]] = {}
        self._logged = False

    def quic_event_received(self, event: QuicEvent) -> None:
        if not self._logged:
            self._logged = True
            host, port = _peer(self)
            self.log.write(event="connect", client=host, port=port, alpn="h3")
        if self._h3 is None:
            self._h3 = H3Connection(self._quic)
        for h3_event in self._h3.handle_event(event):
            self._h3_event(h3_event)

    def _h3_event(self, event: H3Event) -> None:
        assert self._h3 is not None
        if isinstance(event, HeadersReceived):
            fields = {k.decode(): v.decode() for k, v in event.headers}
            host, port = _peer(self)
            self._requests[event.stream_id] = {
                "client": host,
                "port": port,
                "method": fields.get(":method", "?"),
                "path": fields.get(":path", "/"),
                "authority": fields.get(":authority", ""),
                "proto": "h3",
                "headers": {k: v for k, v in fields.items() if not k.startswith(":")},
                "body": hashlib.sha256(),
                "size": 0,
            }
            if event.stream_ended:
                self._respond(event.stream_id)
        elif isinstance(event, DataReceived):
            req = self._requests.get(event.stream_id)
            if req is not None:
                req["body"].update(event.data)
                req["size"] += len(event.data)
                if event.stream_ended:
                    self._respond(event.stream_id)

    def _respond(self, stream_id: int) -> None:
        assert self._h3 is not None
        req = self._requests.pop(stream_id)
        digest, size = req.pop("body").hexdigest(), req.pop("size")
        self.log.write(event="request", body_size=size, body_sha256=digest, **req)
        path = req["path"].split("?", 1)[0]
        status, body = 200, b""
        if req["method"] == "POST":
            body = json.dumps({"sha256": digest, "size": size}).encode()
        elif path.startswith("/echo"):
            body = json.dumps(req).encode()
        elif path.startswith("/bytes/"):
            body = pattern(int(path[len("/bytes/") :]))
        else:
            status, body = 404, b"not found\n"
        self._h3.send_headers(
            stream_id,
            [
                (b":status", str(status).encode()),
                (b"content-length", str(len(body)).encode()),
                (b"x-origin", b"quic-helpers"),
            ],
        )
        self._h3.send_data(stream_id, body, end_stream=True)
        self.transmit()


class EchoServer(QuicConnectionProtocol):
    log: _Log

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._logged = False
        self._buffers: dict[int, bytearray] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        if not self._logged:
            self._logged = True
            host, port = _peer(self)
            self.log.write(event="connect", client=host, port=port, alpn=ECHO_ALPN)
        if isinstance(event, StreamDataReceived):
            buf = self._buffers.setdefault(event.stream_id, bytearray())
            buf += event.data
            if event.end_stream:
                data = bytes(self._buffers.pop(event.stream_id))
                host, port = _peer(self)
                self.log.write(event="echo", client=host, port=port, size=len(data))
                if data == b"whoami":
                    data = json.dumps({"client": host, "port": port}).encode()
                self._quic.send_stream_data(event.stream_id, data, end_stream=True)
                self.transmit()


async def _server_main(args: argparse.Namespace) -> None:
    log = _Log(Path(args.log))
    H3Server.log = log
    EchoServer.log = log
    servers = []
    for value in args.h3:
        config = QuicConfiguration(is_client=False, alpn_protocols=H3_ALPN)
        config.load_cert_chain(args.cert, args.key)
        host, port = _split(value)
        servers.append(await serve(host, port, configuration=config, create_protocol=H3Server))
    for value in args.echo:
        config = QuicConfiguration(is_client=False, alpn_protocols=[ECHO_ALPN])
        config.load_cert_chain(args.cert, args.key)
        host, port = _split(value)
        servers.append(await serve(host, port, configuration=config, create_protocol=EchoServer))
    Path(args.ready).write_text("ready\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


# -- clients -----------------------------------------------------------------------------------


class H3Client(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self._waiters: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._responses: dict[int, dict[str, Any]] = {}

    async def request(self, method: str, url: str, body: bytes = b"") -> dict[str, Any]:
        parts = urlsplit(url)
        stream_id = self._quic.get_next_available_stream_id()
        headers = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", parts.netloc.encode()),
            (
                b":path",
                (parts.path or "/").encode()
                + (b"?" + parts.query.encode() if parts.query else b""),
            ),
            (b"user-agent", b"mitm-wg-test-h3"),
        ]
        self.h3.send_headers(stream_id, headers, end_stream=not body)
        if body:
            self.h3.send_data(stream_id, body, end_stream=True)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[stream_id] = fut
        self._responses[stream_id] = {"status": 0, "headers": {}, "body": bytearray()}
        self.transmit()
        return await fut

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated):
            for fut in self._waiters.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"QUIC connection closed: {event}"))
            return
        for h3_event in self.h3.handle_event(event):
            response = self._responses.get(getattr(h3_event, "stream_id", -1))
            if response is None:
                continue
            if isinstance(h3_event, HeadersReceived):
                for k, v in h3_event.headers:
                    if k == b":status":
                        response["status"] = int(v)
                    else:
                        response["headers"][k.decode()] = v.decode()
            elif isinstance(h3_event, DataReceived):
                response["body"] += h3_event.data
            if getattr(h3_event, "stream_ended", False):
                fut = self._waiters.pop(h3_event.stream_id)
                if not fut.done():
                    fut.set_result(self._responses.pop(h3_event.stream_id))


def _client_config(alpn: list[str], args: argparse.Namespace) -> QuicConfiguration:
    config = QuicConfiguration(is_client=True, alpn_protocols=alpn)
    config.verify_mode = ssl.CERT_REQUIRED
    config.load_verify_locations(args.ca)
    # (a handshake that never completes ends here, with an error, not in the test's
    # subprocess timeout)
    config.idle_timeout = args.timeout
    if args.server_name:
        config.server_name = args.server_name
    return config


def _result(response: dict[str, Any]) -> str:
    body = bytes(response["body"])
    return json.dumps(
        {
            "status": response["status"],
            "headers": response["headers"],
            "body": body.decode("latin-1"),
            "size": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
    )


async def _h3_get_main(args: argparse.Namespace) -> None:
    host, port = _split(args.connect)
    config = _client_config(H3_ALPN, args)
    async with connect(host, port, configuration=config, create_protocol=H3Client) as client:
        assert isinstance(client, H3Client)
        body = b""
        if args.post_size:
            body = pattern(args.post_size)
        method = "POST" if body else "GET"
        for _ in range(args.repeat):
            response = await asyncio.wait_for(client.request(method, args.url, body), args.timeout)
            print(_result(response), flush=True)


async def _echo_main(args: argparse.Namespace) -> None:
    host, port = _split(args.connect)
    config = _client_config([ECHO_ALPN], args)
    async with connect(host, port, configuration=config) as client:
        message = args.message.encode() if args.message else pattern(args.size)
        reader, writer = await client.create_stream()
        writer.write(message)
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(), args.timeout)
        alpn = client._quic.tls.alpn_negotiated
        print(
            json.dumps(
                {
                    "alpn": alpn,
                    "body": data.decode("latin-1"),
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            ),
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="mitm-wg QUIC test origin and clients")
    sub = parser.add_subparsers(dest="command", required=True)
    server = sub.add_parser("server")
    server.add_argument("--cert", required=True)
    server.add_argument("--key", required=True)
    server.add_argument("--log", required=True)
    server.add_argument("--ready", required=True)
    server.add_argument("--h3", action="append", default=[])
    server.add_argument("--echo", action="append", default=[])
    for name in ("h3-get", "echo"):
        client = sub.add_parser(name)
        client.add_argument("--connect", required=True)
        client.add_argument("--ca", required=True)
        client.add_argument("--server-name")
        client.add_argument("--timeout", type=float, default=20.0)
        if name == "h3-get":
            client.add_argument("--url", required=True)
            client.add_argument("--repeat", type=int, default=1)
            client.add_argument("--post-size", type=int, default=0)
        else:
            client.add_argument("--message", default="")
            client.add_argument("--size", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.command == "server":
            asyncio.run(_server_main(args))
        elif args.command == "h3-get":
            asyncio.run(_h3_get_main(args))
        else:
            asyncio.run(_echo_main(args))
    except (OSError, ConnectionError, TimeoutError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
