"""End-to-end test helpers: an echo origin, mitmdump in a namespace, curl, wss, Chromium.

The origin half of this file also runs as a script inside the exit namespace
(``python tests/e2e_helpers.py --log FILE --ready FILE --www DIR --http HOST:PORT ...``);
that half needs only the standard library, ``h2`` and ``wsproto`` (mitmproxy dependencies).

Origin (HTTP/1.1 on ``--http``, HTTPS with ALPN h2/http/1.1 on ``--https``):

``GET|POST /echo…``, ``/new/…``, ``/old/…``
    JSON ``{"client", "port", "method", "path", "proto", "tls", "headers", "body_size",
    "body_sha256"}``: who asked (the address the origin saw), over which protocol
    (``http/1.1`` or ``h2``), and what body arrived.
``GET /bytes/N``
    N bytes, byte i == i % 256 (as the harness's HTTP server). Over HTTP/1.1 the head goes
    out on its own, a small first segment; ``?together``: in one write with the body's start,
    so the reply's first segment is full-sized (as from nginx with sendfile).
``GET /pixel.png``
    a 16×16 PNG made on the fly.
``GET /ws`` with ``Upgrade: websocket``
    WebSocket echo (text and binary); the text message ``whoami`` answers with the client JSON.
``GET /<file>``
    static files from ``--www``.

Raw TCP on ``--tcp`` (no HTTP; the server speaks first; half-close):
``HELLO {"client", "port"}\n`` at once. A first line ``SEND N`` from the client has it send
N pattern bytes while it reads on. After the client's EOF: a ``raw`` log entry and
``GOT <bytes read> <sha256 hex>\n`` (after the N bytes), then it closes.

Every accepted connection and every request is one JSON line in ``--log`` (``event`` is
``connect``, ``request`` or ``ws``), read back with :meth:`Origin.entries`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import hashlib
import json
import logging
import mimetypes
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()
STATIC = ROOT / "tests" / "data" / "e2e"
ADDON = ROOT / "addons" / "mitm_wg.py"
REWRITE = ROOT / "addons" / "examples" / "rewrite_request.py"
VENV_BIN = Path(sys.executable).parent
MITMDUMP = VENV_BIN / "mitmdump"

ECHO_PREFIXES = ("/echo", "/new/", "/old/")
_BLOCK = bytes(range(256)) * 256  # 64 KiB, a whole number of pattern periods
_H1_HEAD_LIMIT = 64 * 1024


def pattern(n: int) -> bytes:
    """The /bytes/N body: byte i == i % 256."""
    return (_BLOCK * (n // len(_BLOCK) + 1))[:n]


def make_png(width: int = 16, height: int = 16, rgb: tuple[int, int, int] = (0, 160, 90)) -> bytes:
    """A solid-colour truecolour PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    row = b"\x00" + bytes(rgb) * width
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR (ValueError if it is not a PNG)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def png_pixels(data: bytes, max_rows: int | None = None) -> list[list[tuple[int, ...]]]:
    """Rows of pixels of an 8-bit RGB/RGBA non-interlaced PNG (the first ``max_rows``).

    Test-only decoder for Chromium's screenshots (a per-byte loop: keep ``max_rows`` small).
    """
    width, height = png_size(data)
    depth, colour, _, _, interlace = struct.unpack(">BBBBB", data[24:29])
    if depth != 8 or colour not in (2, 6) or interlace:
        raise ValueError(f"unsupported PNG (depth {depth}, colour type {colour})")
    bpp = 3 if colour == 2 else 4
    idat = bytearray()
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(bytes(idat))
    stride = width * bpp
    prev = bytearray(stride)
    rows = []
    for y in range(min(height, max_rows or height)):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + ((a + b) >> 1)) & 0xFF
            elif kind == 4:
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        rows.append([tuple(line[x : x + 3]) for x in range(0, stride, bpp)])
        prev = line
    return rows


# --------------------------------------------------------------------------------------------
# The origin server (runs in the exit namespace)
# --------------------------------------------------------------------------------------------


class _OriginLog:
    def __init__(self, path: Path) -> None:
        self._file = path.open("a", buffering=1)

    def write(self, **entry: Any) -> None:
        self._file.write(json.dumps(entry, sort_keys=True) + "\n")


@dataclass
class _Request:
    method: str
    path: str
    headers: list[tuple[str, str]]
    client: str
    port: int
    proto: str
    tls: bool
    body_size: int = 0
    body_hash: Any = field(default_factory=hashlib.sha256)

    def header(self, name: str) -> str:
        return next((v for k, v in self.headers if k.lower() == name), "")

    def add_body(self, data: bytes) -> None:
        self.body_size += len(data)
        self.body_hash.update(data)

    def describe(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "port": self.port,
            "method": self.method,
            "path": self.path,
            "proto": self.proto,
            "tls": self.tls,
            "headers": {k.lower(): v for k, v in self.headers},
            "body_size": self.body_size,
            "body_sha256": self.body_hash.hexdigest(),
        }


class OriginHandler:
    """The origin's request handling (shared by HTTP/1.1 and h2)."""

    def __init__(self, www: Path, log: _OriginLog) -> None:
        self.www = www.resolve()
        self.log = log
        self.png = make_png()

    def respond(self, req: _Request) -> tuple[int, str, bytes]:
        """(status, content type, body) for a request."""
        self.log.write(event="request", **req.describe())
        path = req.path.split("?", 1)[0]
        if path.startswith(ECHO_PREFIXES):
            return 200, "application/json", json.dumps(req.describe()).encode()
        if path.startswith("/bytes/"):
            try:
                size = int(path[len("/bytes/") :])
            except ValueError:
                return 400, "text/plain", b"bad size\n"
            return 200, "application/octet-stream", pattern(size)
        if path == "/pixel.png":
            return 200, "image/png", self.png
        name = "index.html" if path == "/" else path.lstrip("/")
        target = (self.www / name).resolve()
        if target.parent != self.www or not target.is_file():
            return 404, "text/plain", b"not found\n"
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype.endswith("javascript"):
            ctype += "; charset=utf-8"
        return 200, ctype, target.read_bytes()

    # -- connections --------------------------------------------------------------------------

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: bool
    ) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        local = writer.get_extra_info("sockname") or ("?", 0)
        self.log.write(
            event="connect", client=peer[0], port=peer[1], local=f"{local[0]}:{local[1]}", tls=tls
        )
        try:
            alpn = None
            if tls:
                ssl_object = writer.get_extra_info("ssl_object")
                alpn = ssl_object.selected_alpn_protocol() if ssl_object else None
            if alpn == "h2":
                await self._serve_h2(reader, writer, peer)
            else:
                await self._serve_h1(reader, writer, peer, tls)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, OSError):
            pass
        except Exception:
            logger.exception("origin: connection from %s failed", peer)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def handle_raw(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The raw TCP service (module docstring): speaks first, sends what ``SEND N`` asks
        for while it reads, and answers after the client's EOF (on a half-closed connection
        the answer must still arrive), then closes."""
        peer = writer.get_extra_info("peername") or ("?", 0)
        local = writer.get_extra_info("sockname") or ("?", 0)
        where = f"{local[0]}:{local[1]}"
        self.log.write(event="connect", client=peer[0], port=peer[1], local=where, tls=False)

        async def send(count: int) -> None:
            for offset in range(0, count, len(_BLOCK)):
                writer.write(_BLOCK[: min(len(_BLOCK), count - offset)])
                await writer.drain()

        sender = None
        try:
            hello = {"client": peer[0], "port": peer[1]}
            writer.write(b"HELLO " + json.dumps(hello).encode() + b"\n")
            await writer.drain()
            first = await reader.readline()
            digest, total = hashlib.sha256(first), len(first)
            if m := re.fullmatch(rb"SEND (\d+)\n", first):
                sender = asyncio.ensure_future(send(int(m.group(1))))
            while chunk := await reader.read(1 << 16):
                digest.update(chunk)
                total += len(chunk)
            self.log.write(
                event="raw", client=peer[0], local=where, received=total, sha256=digest.hexdigest()
            )
            if sender is not None:
                await sender
            writer.write(f"GOT {total} {digest.hexdigest()}\n".encode())
            await writer.drain()
        except (ConnectionError, OSError, ValueError):  # ValueError: a first line over 64 KiB
            pass
        finally:
            if sender is not None:
                sender.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve_h1(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: tuple[Any, ...],
        tls: bool,
    ) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _version = lines[0].split(" ", 2)
            headers = [
                (k.strip(), v.strip())
                for k, _, v in (line.partition(":") for line in lines[1:] if line)
            ]
            req = _Request(method, target, headers, peer[0], peer[1], "http/1.1", tls)
            if req.header("upgrade").lower() == "websocket":
                await self._serve_ws(head, reader, writer, req)
                return
            length = req.header("content-length")
            if length:
                remaining = int(length)
                while remaining:
                    data = await reader.read(min(remaining, 1 << 20))
                    if not data:
                        return
                    req.add_body(data)
                    remaining -= len(data)
            elif req.header("transfer-encoding").lower() == "chunked":
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    req.add_body((await reader.readexactly(size + 2))[:size])
                    if size == 0:
                        break
            status, ctype, body = self.respond(req)
            close = req.header("connection").lower() == "close"
            response = (
                f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n".encode()
            )
            view, sent = memoryview(body), 0
            if target.partition("?")[2] == "together":
                sent = 256 * 1024
                response += view[:sent]
            writer.write(response)
            for start in range(sent, len(view), 256 * 1024):
                writer.write(view[start : start + 256 * 1024])
                await writer.drain()
            await writer.drain()
            if close:
                return

    async def _serve_ws(
        self,
        head: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        req: _Request,
    ) -> None:
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import (
            AcceptConnection,
            BytesMessage,
            CloseConnection,
            Message,
            Ping,
            Request,
            TextMessage,
        )

        self.log.write(event="ws", **req.describe())
        ws = WSConnection(ConnectionType.SERVER)
        ws.receive_data(head)
        parts: list[Any] = []
        while True:
            out = b""
            closed = False
            for event in ws.events():
                if isinstance(event, Request):
                    out += ws.send(AcceptConnection())
                elif isinstance(event, Message):
                    parts.append(event.data)
                    if not event.message_finished:
                        continue
                    if isinstance(event, TextMessage):
                        text = "".join(parts)
                        if text == "whoami":
                            text = json.dumps(req.describe())
                        out += ws.send(TextMessage(data=text))
                    elif isinstance(event, BytesMessage):
                        out += ws.send(BytesMessage(data=b"".join(parts)))
                    parts = []
                elif isinstance(event, Ping):
                    out += ws.send(event.response())
                elif isinstance(event, CloseConnection):
                    out += ws.send(event.response())
                    closed = True
            if out:
                writer.write(out)
                await writer.drain()
            if closed:
                return
            data = await reader.read(65536)
            if not data:
                return
            ws.receive_data(data)

    async def _serve_h2(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: tuple[Any, ...]
    ) -> None:
        import h2.config
        import h2.connection
        import h2.events

        conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        conn.initiate_connection()
        requests: dict[int, _Request] = {}
        pending: dict[int, memoryview] = {}

        def flush() -> None:
            for sid in list(pending):
                data = pending[sid]
                while data:
                    window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                    if window <= 0:
                        break
                    conn.send_data(sid, data[:window].tobytes())
                    data = data[window:]
                if data:
                    pending[sid] = data
                else:
                    conn.end_stream(sid)
                    del pending[sid]

        writer.write(conn.data_to_send())
        while True:
            data = await reader.read(65536)
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    fields = [(str(k), str(v)) for k, v in event.headers]
                    pseudo = dict(f for f in fields if f[0].startswith(":"))
                    regular = [f for f in fields if not f[0].startswith(":")]
                    if ":authority" in pseudo:
                        regular.insert(0, ("host", pseudo[":authority"]))
                    requests[event.stream_id] = _Request(
                        pseudo.get(":method", "?"),
                        pseudo.get(":path", "/"),
                        regular,
                        peer[0],
                        peer[1],
                        "h2",
                        True,
                    )
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    if event.stream_id in requests:
                        requests[event.stream_id].add_body(event.data)
                elif isinstance(event, h2.events.StreamEnded):
                    req = requests.pop(event.stream_id, None)
                    if req is None:
                        continue
                    status, ctype, body = self.respond(req)
                    conn.send_headers(
                        event.stream_id,
                        [
                            (":status", str(status)),
                            ("content-type", ctype),
                            ("content-length", str(len(body))),
                        ],
                        end_stream=not body,
                    )
                    if body:
                        pending[event.stream_id] = memoryview(body)
                elif isinstance(event, h2.events.StreamReset):
                    pending.pop(event.stream_id, None)
                    requests.pop(event.stream_id, None)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    writer.write(conn.data_to_send())
                    return
            flush()
            writer.write(conn.data_to_send())
            await writer.drain()


def _split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


async def _origin_main(args: argparse.Namespace) -> None:
    origin = OriginHandler(Path(args.www), _OriginLog(Path(args.log)))
    servers = []
    for value in args.http:
        host, port = _split_hostport(value)
        servers.append(
            await asyncio.start_server(
                lambda r, w: origin.handle(r, w, False), host, port, limit=_H1_HEAD_LIMIT
            )
        )
    for value in args.tcp:
        host, port = _split_hostport(value)
        servers.append(await asyncio.start_server(origin.handle_raw, host, port))
    if args.https:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.cert, args.key)
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        for value in args.https:
            host, port = _split_hostport(value)
            servers.append(
                await asyncio.start_server(
                    lambda r, w: origin.handle(r, w, True),
                    host,
                    port,
                    ssl=ctx,
                    limit=_H1_HEAD_LIMIT,
                )
            )
    Path(args.ready).write_text("ready\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def origin_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="mitm-wg e2e origin server")
    parser.add_argument("--log", required=True)
    parser.add_argument("--ready", required=True)
    parser.add_argument("--www", required=True)
    parser.add_argument("--http", action="append", default=[])
    parser.add_argument("--https", action="append", default=[])
    parser.add_argument("--tcp", action="append", default=[])
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="origin: %(message)s")
    asyncio.run(_origin_main(args))


# --------------------------------------------------------------------------------------------
# Test-side helpers
# --------------------------------------------------------------------------------------------


_CONN_EVENT = re.compile(r"\] (client|server) (connect|disconnect)\b")


def _wait_idle(log: Path, timeout: float = 10.0) -> None:
    """Give mitmdump up to ``timeout`` s to finish closing the connections the test used
    (as many "disconnect" as "connect" lines, per side) before it is stopped.

    A SIGINT that lands while a handler still waits for its server side to close cancels
    that task, and Python 3.11's asyncio then logs a CancelledError traceback from
    ``StreamReaderProtocol``'s callback (CPython's, fixed in 3.12): that race is not what
    the clean-shutdown check is about. Times out silently (the check still runs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts: collections.Counter[tuple[str, ...]] = collections.Counter(
            m.groups() for m in _CONN_EVENT.finditer(log.read_text(errors="replace"))
        )
        if all(
            counts[(side, "connect")] <= counts[(side, "disconnect")]
            for side in ("client", "server")
        ):
            return
        time.sleep(0.05)


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Origin:
    """A running origin server (see module doc); its log is read back as dicts."""

    def __init__(self, proc: subprocess.Popen[Any], log: Path, output: Path) -> None:
        self.proc, self.log, self.output = proc, log, output
        self.ca: Path | None = None  # the test CA of its HTTPS certificate, when it has one

    def entries(self, event: str | None = None) -> list[dict[str, Any]]:
        try:
            lines = self.log.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = [json.loads(line) for line in lines if line.strip()]
        return [e for e in out if event is None or e["event"] == event]

    def requests(self) -> list[dict[str, Any]]:
        return self.entries("request")

    def paths(self) -> list[str]:
        return [e["path"] for e in self.requests()]


@contextlib.contextmanager
def run_origin(
    ns: Any,
    workdir: Path,
    *,
    http: Sequence[str],
    https: Sequence[str] = (),
    tcp: Sequence[str] = (),
    cert: Path | None = None,
    key: Path | None = None,
    www: Path = STATIC,
    name: str = "origin",
) -> Iterator[Origin]:
    """Start the origin inside namespace ``ns`` (harness Netns); killed on exit."""
    log, ready, output = (workdir / f"{name}.{ext}" for ext in ("jsonl", "ready", "out"))
    argv = [sys.executable, str(THIS), "--log", str(log), "--ready", str(ready), "--www", str(www)]
    argv += [a for value in http for a in ("--http", value)]
    argv += [a for value in https for a in ("--https", value)]
    argv += [a for value in tcp for a in ("--tcp", value)]
    if https:
        assert cert is not None and key is not None
        argv += ["--cert", str(cert), "--key", str(key)]
    with output.open("wb") as out:
        proc = ns.popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:

        def is_ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"origin exited: {output.read_text(errors='replace')}")
            return ready.exists()

        wait_for(is_ready, 15, "the origin server")
        yield Origin(proc, log, output)
    finally:
        ns.kill(proc)


class Mitmdump:
    """mitmdump + the addon running in a namespace."""

    def __init__(self, proc: subprocess.Popen[Any], log: Path, port: int, confdir: Path) -> None:
        self.proc, self.log, self.port, self.confdir = proc, log, port, confdir

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_pem(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> str:
        wait_for(lambda: needle in self.text(), timeout, f"{needle!r} in the mitmdump log")
        return self.text()

    def spki_hash(self) -> str:
        """base64(SHA-256(SubjectPublicKeyInfo)) of the mitmproxy CA (Chromium's SPKI list).

        mitmproxy signs every leaf with the CA's key pair, so the leaves share this SPKI.
        """
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        cert = x509.load_pem_x509_certificate(self.ca_pem.read_bytes())
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(hashlib.sha256(spki).digest()).decode()


#: What the addon logs once mitmproxy has finished starting (mitm_wg.mitmproxy.ready).
READY_PREFIX = "mitm-wg: ready"


@contextlib.contextmanager
def run_mitmdump(
    ns: Any,
    workdir: Path,
    *args: str,
    name: str = "mitmdump",
    exit_codes: tuple[int, ...] = (0,),
    mitmdump: Path = MITMDUMP,
    addon: Path = ADDON,
) -> Iterator[Mitmdump]:
    """``mitmdump -s addons/mitm_wg.py ARGS`` on 127.0.0.1 (ephemeral port) inside ``ns``.

    Yields once mitmdump has *finished* starting (the addon's ``mitm-wg: ready`` line, logged
    after mitmproxy's whole start-up, certificate store included), so the first request can
    go at once; stops it by PID (SIGINT, then the namespace's kill) afterwards.
    After a block that raised nothing it asserts a clean shutdown: an exit status in
    ``exit_codes`` and no traceback anywhere in the log. ``mitmdump``/``addon`` default to
    the test venv's mitmdump and the clone's addon shim. A ``-signal.SIGSEGV`` in
    ``exit_codes`` (mitmproxy_rs's crash while exiting in UDP-listening modes,
    mitmproxy/mitmproxy#7409) counts only after the SIGINT that stopped it: a mitmdump that
    died before that fails the test whatever its status.
    """
    confdir = workdir / f"{name}-conf"
    confdir.mkdir()
    log = workdir / f"{name}.log"
    argv = [
        str(mitmdump),
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        "0",
        "--set",
        f"confdir={confdir}",
        "-s",
        str(addon),
        *args,
    ]
    env = dict(os.environ, NO_PROXY="", no_proxy="", HOME=str(workdir))
    env.pop("MITM_WG_TEST_DIALER", None)
    with log.open("wb") as out:
        proc = ns.popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    clean_exit = False
    alive_at_stop = False
    try:
        found: list[int] = []

        def ready() -> bool:
            text = log.read_text(errors="replace")
            match = re.search(r"listening at 127\.0\.0\.1:(\d+)", text)
            if match and READY_PREFIX in text:
                found.append(int(match.group(1)))
                return True
            if proc.poll() is not None:
                raise RuntimeError(f"mitmdump exited ({proc.returncode}):\n{text}")
            return False

        wait_for(ready, 30, f"mitmdump to finish starting ({READY_PREFIX!r} in its log)")
        assert (confdir / "mitmproxy-ca-cert.pem").exists(), "ready before its CA exists"
        yield Mitmdump(proc, log, found[0], confdir)
        clean_exit = True
    finally:
        if proc.poll() is None:
            alive_at_stop = True
            if clean_exit:
                _wait_idle(log)
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        ns.kill(proc)
    if clean_exit:
        # Only when the block raised nothing (a failing test keeps its own report).
        text = log.read_text(errors="replace")
        if not alive_at_stop:
            exit_codes = tuple(c for c in exit_codes if c != -signal.SIGSEGV)
        assert proc.returncode in exit_codes, (
            f"mitmdump exited with {proc.returncode}:\n{text[-3000:]}"
        )
        assert "Traceback" not in text, text[-5000:]


@dataclass
class CurlResult:
    returncode: int
    status: int
    http_version: str
    headers: dict[str, str]
    body: bytes
    stderr: str
    elapsed: float

    def __repr__(self) -> str:
        body = self.body[:300] + (b"..." if len(self.body) > 300 else b"")
        return (
            f"CurlResult(returncode={self.returncode}, status={self.status}, "
            f"http_version={self.http_version!r}, headers={self.headers!r}, "
            f"body[{len(self.body)}]={body!r}, stderr={self.stderr!r}, "
            f"elapsed={self.elapsed:.2f})"
        )

    def json(self) -> Any:
        return json.loads(self.body)


def curl(ns: Any, *args: str, max_time: float = 30.0) -> CurlResult:
    """curl inside ``ns``: ``-sS``, response headers and body captured separately."""
    with tempfile.TemporaryDirectory(prefix="e2e-curl-") as tmp:
        head, body = Path(tmp) / "head", Path(tmp) / "body"
        argv = [
            "curl",
            "-sS",
            "--max-time",
            f"{max_time:g}",
            "-D",
            str(head),
            "-o",
            str(body),
            "-w",
            "%{http_code} %{http_version}",
            *args,
        ]
        started = time.monotonic()
        r = ns.exec(argv, check=False, timeout=max_time + 15, env=dict(os.environ, NO_PROXY=""))
        elapsed = time.monotonic() - started
        raw_head = head.read_text(errors="replace") if head.exists() else ""
        data = body.read_bytes() if body.exists() else b""
    # With a proxy the header file holds the CONNECT response first: use the last block.
    blocks = [b for b in raw_head.replace("\r\n", "\n").split("\n\n") if b.strip()]
    headers: dict[str, str] = {}
    if blocks:
        for line in blocks[-1].splitlines()[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    code, _, version = r.stdout.strip().partition(" ")
    return CurlResult(r.returncode, int(code or 0), version, headers, data, r.stderr, elapsed)


def curl_via(ns: Any, proxy: Mitmdump, url: str, *args: str, max_time: float = 30.0) -> CurlResult:
    """curl inside ``ns`` through ``proxy`` (HTTP CONNECT), trusting its CA: ``url`` with
    ``args`` before it."""
    return curl(ns, "--cacert", str(proxy.ca_pem), "-x", proxy.proxy, *args, url, max_time=max_time)


# -- WebSocket client over a CONNECT tunnel ---------------------------------------------------


class WsClient:
    """A blocking wss:// client through mitmproxy (CONNECT, TLS with mitmproxy's CA, wsproto)."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        from wsproto import ConnectionType, WSConnection

        self.sock = sock
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._events: list[Any] = []

    @classmethod
    @contextlib.contextmanager
    def connect(
        cls, ns: Any, proxy_port: int, host: str, port: int, path: str, ca: Path
    ) -> Iterator[WsClient]:
        raw = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.settimeout(20)
        try:
            raw.connect(("127.0.0.1", proxy_port))
            raw.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = raw.recv(4096)
                if not chunk:
                    raise ConnectionError(f"proxy closed during CONNECT: {head!r}")
                head += chunk
            if b" 200 " not in head.split(b"\r\n", 1)[0]:
                raise ConnectionError(f"CONNECT refused: {head!r}")
            ctx = ssl.create_default_context(cafile=str(ca))
            ctx.set_alpn_protocols(["http/1.1"])
            sock = ctx.wrap_socket(raw, server_hostname=host)
        except BaseException:
            raw.close()
            raise
        client = cls(sock)
        try:
            client._handshake(host, path)
            yield client
        finally:
            sock.close()

    def _handshake(self, host: str, path: str) -> None:
        from wsproto.events import AcceptConnection, Request

        self.sock.sendall(self.ws.send(Request(host=host, target=path)))
        event = self._next()
        if not isinstance(event, AcceptConnection):
            raise ConnectionError(f"WebSocket handshake failed: {event!r}")

    def _next(self) -> Any:
        while not self._events:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed")
            self.ws.receive_data(data)
            self._events.extend(self.ws.events())
        return self._events.pop(0)

    def send(self, message: str | bytes) -> None:
        from wsproto.events import BytesMessage, TextMessage

        event = (
            TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message)
        )
        self.sock.sendall(self.ws.send(event))

    def whoami(self) -> str:
        """The client address the origin saw on this WebSocket (its ``whoami`` answer)."""
        self.send("whoami")
        who = self.receive()
        assert isinstance(who, str), who
        client: str = json.loads(who)["client"]
        return client

    def receive(self) -> str | bytes:
        """One whole message."""
        from wsproto.events import Message

        parts: list[Any] = []
        while True:
            event = self._next()
            if not isinstance(event, Message):
                raise ConnectionError(f"unexpected WebSocket event {event!r}")
            parts.append(event.data)
            if event.message_finished:
                return "".join(parts) if isinstance(parts[0], str) else b"".join(parts)

    def close(self) -> Any:
        from wsproto.events import CloseConnection

        self.sock.sendall(self.ws.send(CloseConnection(code=1000)))
        return self._next()


# -- Chromium ---------------------------------------------------------------------------------

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--no-default-browser-check",
    "--metrics-recording-only",
    "--password-store=basic",
)


def chromium_binary() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


NETWORK_CHANGED = "net::ERR_NETWORK_CHANGED"
STDERR_TAIL_LINES = 40


@dataclass
class ChromiumAttempt:
    returncode: int | None  # None: killed after the timeout
    stdout: str
    stderr: str


@dataclass
class ChromiumRun:
    """One :func:`run_chromium` call: the last attempt's result, and what went before.

    Chromium exits 0 even when the page never loaded (an empty ``--dump-dom``), so its exit
    code says little: :meth:`explain` (the exit code and the last lines of stderr of every
    attempt) belongs in every assertion message about the run; :meth:`diagnose` adds it to
    whatever fails inside its ``with`` block.
    """

    argv: list[str]
    attempts: list[ChromiumAttempt]  # in order; the last one is the result

    @property
    def returncode(self) -> int | None:
        return self.attempts[-1].returncode

    @property
    def stdout(self) -> str:
        return self.attempts[-1].stdout

    @property
    def stderr(self) -> str:
        return self.attempts[-1].stderr

    def explain(self, lines: int = STDERR_TAIL_LINES) -> str:
        parts = []
        for n, a in enumerate(self.attempts, 1):
            status = "killed after the timeout" if a.returncode is None else f"exit {a.returncode}"
            tail = "\n".join(a.stderr.splitlines()[-lines:]) or "(empty)"
            parts.append(
                f"chromium attempt {n}/{len(self.attempts)}: {status}, {len(a.stdout)} "
                f"characters on stdout; the last {lines} lines of its stderr:\n{tail}"
            )
        return "\n".join(parts)

    @contextlib.contextmanager
    def diagnose(self) -> Iterator[None]:
        """Any exception inside gets Chromium's exit code and stderr tail as a note."""
        try:
            yield
        except Exception as e:
            e.add_note(self.explain())
            raise


def run_chromium(
    ns: Any,
    workdir: Path,
    proxy_port: int,
    spki: str,
    *args: str,
    name: str = "chromium",
    timeout: float = 60.0,
) -> ChromiumRun:
    """Headless Chromium in ``ns`` through the proxy, trusting only mitmproxy's CA key.

    The namespace is settled first (no link without carrier, no tentative IPv6 address, see
    ``Netns.settle``): Chromium watches netlink and aborts page loads with
    ``net::ERR_NETWORK_CHANGED`` when an address changes under it, then exits 0 with an
    empty DOM. Should it still report that, it runs once more (a fresh profile), with a
    warning in the log; the result carries both attempts' stderr (:meth:`ChromiumRun.explain`).
    """
    binary = chromium_binary()
    assert binary is not None
    env = dict(os.environ, HOME=str(workdir), NO_PROXY="", no_proxy="")
    attempts: list[ChromiumAttempt] = []
    for attempt in (1, 2):
        ns.settle()
        profile = workdir / (f"{name}-profile" if attempt == 1 else f"{name}-profile-{attempt}")
        profile.mkdir()
        argv = [
            binary,
            *CHROMIUM_FLAGS,
            f"--proxy-server=http://127.0.0.1:{proxy_port}",
            f"--user-data-dir={profile}",
            f"--ignore-certificate-errors-spki-list={spki}",
            *args,
        ]
        returncode: int | None
        try:
            r = ns.exec(argv, check=False, timeout=timeout, env=env, cwd=workdir)
            returncode, stdout, stderr = r.returncode, r.stdout, r.stderr
        except subprocess.TimeoutExpired as e:
            returncode = None
            stdout = _text(e.stdout)
            stderr = _text(e.stderr) + f"\n[killed: no exit within {timeout} s]"
        attempts.append(ChromiumAttempt(returncode, stdout, stderr))
        if NETWORK_CHANGED not in stderr or attempt == 2:
            break
        logger.warning(
            "chromium in %s reported %s (an address or link changed during the page load); "
            "running it once more. Its stderr:\n%s",
            getattr(ns, "name", ns),
            NETWORK_CHANGED,
            "\n".join(stderr.splitlines()[-STDERR_TAIL_LINES:]),
        )
    return ChromiumRun(argv, attempts)


def _text(data: str | bytes | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


if __name__ == "__main__":
    origin_main()


# -- the standard setup: origin on the exit peer, a config for our side -----------------------

ORIGIN_NAME = "exit.test"
#: The origin's raw TCP service (module docstring): two ports, so that one mitmproxy can
#: treat them differently (e.g. pass one through, inspect the other).
RAW_PORTS = (7000, 7001)


@contextlib.contextmanager
def exit_origin(peer: Any, workdir: Path) -> Iterator[Origin]:
    """The origin on the exit peer's tunnel addresses: HTTP :80, HTTPS :443 (test CA) and
    the raw TCP service on :7000 and :7001 (``RAW_PORTS``).

    ``origin.ca`` is the test CA (for ``ssl_verify_upstream_trusted_ca``); the leaf is valid
    for ``exit.test`` and the server's tunnel addresses.
    """
    from tlsorigin import make_ca_and_leaf

    addresses = [a for a in (peer.server_tunnel_v4, peer.server_tunnel_v6) if a]
    certdir = workdir / "origin-tls"
    certdir.mkdir()
    ca, leaf, key = make_ca_and_leaf(certdir, [ORIGIN_NAME], addresses)
    hosts = [f"[{a}]" if ":" in a else a for a in addresses]
    with run_origin(
        peer.ns,
        workdir,
        http=[f"{h}:80" for h in hosts],
        https=[f"{h}:443" for h in hosts],
        tcp=[f"{h}:{port}" for h in hosts for port in RAW_PORTS],
        cert=leaf,
        key=key,
    ) as origin:
        origin.ca = ca
        yield origin


def tunnel_addresses(peer: Any) -> set[str]:
    """Our side's tunnel addresses: a name with A and AAAA records may use either (RFC 8305)."""
    return {peer.client_tunnel_v4, peer.client_tunnel_v6}


def write_client_config(peer: Any, workdir: Path, name: str = "exit", **kw: Any) -> Path:
    """Our side's wg-quick file (``peer.client_config_text(**kw)``), mode 0600."""
    path = workdir / f"{name}.conf"
    path.touch(mode=0o600)
    path.write_text(peer.client_config_text(**kw))
    return path


@contextlib.contextmanager
def tunnel_mitmdump(
    peer: Any, workdir: Path, origin: Origin, tunnel: str, *args: str, **config_kw: Any
) -> Iterator[Mitmdump]:
    """mitmdump + the addon in ``peer.client_ns`` with one tunnel named ``tunnel`` to
    ``peer`` (``write_client_config(**config_kw)``, e.g. ``endpoint=``), trusting the
    origin's CA upstream, plus ``args``; yields once the tunnel is up."""
    conf = write_client_config(peer, workdir, tunnel, **config_kw)
    argv = [
        "--set", f"wg_conf={tunnel}={conf}",
        "--set", f"ssl_verify_upstream_trusted_ca={origin.ca}",
        *args,
    ]  # fmt: skip
    with run_mitmdump(peer.client_ns, workdir, *argv) as dump:
        dump.wait_for_log(f"WireGuard tunnel {tunnel!r} is up")
        yield dump


def https_upload(
    peer: Any, proxy: Mitmdump, workdir: Path, data: bytes, *, max_time: float = 60.0
) -> None:
    """POST ``data`` over HTTPS (HTTP/1.1) through ``proxy`` to the origin's echo; asserts
    it arrived whole, from one of our tunnel addresses."""
    path = workdir / "upload.bin"
    path.write_bytes(data)
    r = curl(
        peer.client_ns, "--cacert", str(proxy.ca_pem), "-x", proxy.proxy, "--http1.1",
        "-H", "Content-Type: application/octet-stream", "--data-binary", f"@{path}",
        f"https://{ORIGIN_NAME}/echo/upload", max_time=max_time,
    )  # fmt: skip
    assert r.returncode == 0 and r.status == 200, r
    echo = r.json()
    assert echo["method"] == "POST" and echo["client"] in tunnel_addresses(peer)
    assert echo["body_size"] == len(data)
    assert echo["body_sha256"] == hashlib.sha256(data).hexdigest()


def assert_pattern(r: CurlResult, size: int, note: str = "") -> None:
    """curl got 200 and exactly the /bytes/``size`` body (``note``: more to show on failure)."""
    assert r.returncode == 0 and r.status == 200, (r, note)
    assert len(r.body) == size
    assert hashlib.sha256(r.body).digest() == hashlib.sha256(pattern(size)).digest()
