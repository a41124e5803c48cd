"""Helpers for runtime interop tests: namespace UDP sockets, a minimal HTTP/1.1 client.

``namespace_socket_factory(ns)`` gives ``open_tunnel`` a ``socket_factory`` whose UDP sockets
live inside a test namespace and record every destination they send to (``.destinations``),
so a test can prove that nothing but the WireGuard endpoint was ever contacted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from harness import Netns, wait_until
from mitm_wg.runtime.clock import BoottimeClock

log = logging.getLogger(__name__)

_PATTERN_BLOCK = bytes(range(256)) * 256
_SEND_CHUNK = 1 << 18
_SEND_BLOCK = bytes(range(256)) * (_SEND_CHUNK // 256 + 1)
_HTTP_SCRIPT = Path(__file__).with_name("harness") / "httpserver.py"


class RecordingSocket(socket.socket):
    """A UDP socket that remembers where it sent datagrams (for "nothing else" checks)."""

    __slots__ = ("destinations",)

    def __init__(self, family: int, type: int, fileno: int) -> None:
        super().__init__(family, type, fileno=fileno)
        self.destinations: set[tuple[str, int]] = set()

    def sendto(self, data: Any, *args: Any) -> int:
        address = args[-1]
        self.destinations.add((str(address[0]), int(address[1])))
        return super().sendto(data, *args)


class SuspendableClock(BoottimeClock):
    """The runtime's clock (CLOCK_BOOTTIME) with :meth:`suspend`: it moves the clock as a
    resume after that long asleep moves CLOCK_BOOTTIME (CLOCK_MONOTONIC would not move).
    Only trio's clock moves, not the kernel's: see :meth:`suspend` for the timer."""

    def __init__(self) -> None:
        self.slept = 0.0

    def current_time(self) -> float:  # type: ignore[override]
        return time.clock_gettime(time.CLOCK_BOOTTIME) + self.slept

    def deadline_to_sleep_time(self, deadline: float) -> float:
        return deadline - self.current_time()

    def suspend(self, seconds: float, tunnel: Any = None) -> None:
        """Move the clock ``seconds`` on. With ``tunnel``, the rest of what a resume moves
        for it: its timer task's timerfd, which counts CLOCK_BOOTTIME: one armed for a
        deadline passed asleep has expired and fires now (the tunnel's own record of what
        it armed stays, as nothing ran meanwhile). Without ``tunnel`` the timerfd stays
        armed for real time, and the tunnel's timers run late until something else wakes
        it. (The wall clock, which a resume moves too, stays: its WireGuard device reads
        the real one for each initiation's timestamp, and a stamp run ahead of the real
        time would make the exit drop any later tunnel's initiations with the same key as
        replays until the real clock caught up.)"""
        self.slept += seconds
        if tunnel is not None:
            fd = tunnel._timer_fd
            assert fd is not None, "no timerfd: the timer task sleeps on trio's clock"
            if tunnel._timer_at != float("inf"):
                fd.arm(tunnel._timer_at - self.current_time())


@dataclass
class NamespaceSocketFactory:
    """``socket_factory`` for ``open_tunnel``: UDP sockets created inside ``ns``."""

    ns: Netns
    sockets: list[RecordingSocket] = field(default_factory=list)

    def __call__(self, family: int) -> socket.socket:
        sock = self.unbound(family)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        return sock

    def unbound(self, family: int) -> socket.socket:
        """An unbound socket in ``ns`` (``open_tunnel`` makes a receive group of them where
        the kernel grants a small buffer: mitm_wg/runtime/sockgroup.py)."""
        raw = self.ns.socket(family, socket.SOCK_DGRAM)
        sock = RecordingSocket(family, socket.SOCK_DGRAM, raw.detach())
        self.sockets.append(sock)
        return sock

    @property
    def destinations(self) -> set[tuple[str, int]]:
        out: set[tuple[str, int]] = set()
        for s in self.sockets:
            out |= s.destinations
        return out


def namespace_socket_factory(ns: Netns) -> NamespaceSocketFactory:
    return NamespaceSocketFactory(ns)


def snmp(ns: Netns, name: str) -> int:
    """One of the namespace's IP counters: ``Ip:ReasmOKs``, ``Icmp:OutDestUnreachs``,
    ``Icmp:OutRateLimitHost`` (Linux 6.0 on; from /proc/net/snmp) or ``Ip6ReasmOKs``,
    ``Icmp6OutPktTooBigs`` (/proc/net/snmp6)."""
    if ":" in name:
        group, column = name.split(":")
        lines = [
            line.split()
            for line in ns.exec(["cat", "/proc/net/snmp"]).stdout.splitlines()
            if line.startswith(group + ":")
        ]
        header, values = lines[0], lines[1]
        return int(values[header.index(column)])
    m = re.search(rf"^{name}\s+(\d+)$", ns.exec(["cat", "/proc/net/snmp6"]).stdout, re.M)
    assert m is not None, name
    return int(m.group(1))


class CallCount:
    """How many times a method patched by :func:`count_calls` ran."""

    n = 0


def count_calls(monkeypatch: Any, owner: type, name: str) -> CallCount:
    """Count the calls of method ``owner.name`` (e.g. ``Tunnel._flush``, a waiter's
    ``_ready``) from now until ``monkeypatch.undo()``."""
    count = CallCount()
    original = getattr(owner, name)

    def counting(self: object, *args: object, **kw: object) -> object:
        count.n += 1
        return original(self, *args, **kw)

    monkeypatch.setattr(owner, name, counting)
    return count


def pattern_sha256(n: int) -> str:
    """sha256 of the first ``n`` bytes of the harness pattern (byte i == i % 256)."""
    h = hashlib.sha256()
    full, rest = divmod(n, len(_PATTERN_BLOCK))
    for _ in range(full):
        h.update(_PATTERN_BLOCK)
    h.update(_PATTERN_BLOCK[:rest])
    return h.hexdigest()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    size: int
    sha256: str
    body: bytes  # kept only when small (<= 64 KiB)


class _Reader:
    """Buffered reads from a trio stream (head lines, then exactly N bytes)."""

    __slots__ = ("buf", "stream")

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def read_head(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[: end + 4])
                del self.buf[: end + 4]
                return head
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError(f"connection closed inside the response head: {bytes(self.buf)!r}")
            self.buf += chunk

    async def read_body(self, length: int, keep: bool) -> tuple[str, bytes]:
        h = hashlib.sha256()
        kept = bytearray()
        have = min(len(self.buf), length)
        if have:
            h.update(self.buf[:have])
            if keep:
                kept += self.buf[:have]
            del self.buf[:have]
        missing = length - have
        while missing:
            chunk = await self.stream.receive_some(min(missing, 1 << 18))
            if not chunk:
                raise EOFError(f"connection closed with {missing} body bytes missing")
            h.update(chunk)
            if keep:
                kept += chunk
            missing -= len(chunk)
        return h.hexdigest(), bytes(kept)


async def http_request(
    stream: trio.abc.Stream,
    method: str,
    path: str,
    *,
    host: str = "exit",
    body_size: int = 0,
    body_chunk: Callable[[int, int], bytes] | None = None,
    full_duplex: bool = False,
) -> Response:
    """One HTTP/1.1 request on ``stream``; the response body is hashed while it arrives.

    A request body of ``body_size`` bytes is sent in pieces from ``body_chunk(offset, n)``
    (default: the harness pattern). With ``full_duplex`` the response is read by a second
    task while the body is still being sent (as HTTP clients and proxies do); otherwise the
    whole request is sent first.
    """
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    if method == "POST":
        head += f"Content-Length: {body_size}\r\nContent-Type: application/octet-stream\r\n"
    head += "\r\n"
    reader = _Reader(stream)
    result: list[Response] = []

    async def send() -> None:
        await stream.send_all(head.encode())
        offset = 0
        while offset < body_size:
            n = min(_SEND_CHUNK, body_size - offset)
            if body_chunk is not None:
                chunk: bytes | memoryview = body_chunk(offset, n)
            else:
                start = offset % 256
                chunk = memoryview(_SEND_BLOCK)[start : start + n]
            await stream.send_all(chunk)
            offset += n

    async def receive() -> None:
        raw = await reader.read_head()
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0"))
        digest, kept = await reader.read_body(length, keep=length <= 65536)
        result.append(Response(status, headers, length, digest, kept))

    if full_duplex:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            nursery.start_soon(send)
    else:
        await send()
        await receive()
    return result[0]


async def http_get(stream: trio.abc.Stream, path: str, **kw: Any) -> Response:
    return await http_request(stream, "GET", path, **kw)


async def http_post_json(
    stream: trio.abc.Stream, path: str, size: int, *, full_duplex: bool = False
) -> dict[str, Any]:
    resp = await http_request(stream, "POST", path, body_size=size, full_duplex=full_duplex)
    assert resp.status == 200, resp
    result: dict[str, Any] = json.loads(resp.body)
    return result


class ExtraHttpServer:
    """The harness's HTTP server script on other addresses/port inside a namespace."""

    def __init__(self, ns: Netns, workdir: Path, port: int, addrs: list[str]) -> None:
        self.ns = ns
        self.port = port
        self.addrs = addrs
        tag = f"extra-{port}"
        self._ready = workdir / f"{tag}.ready"
        self._log = workdir / f"{tag}.log"
        self._root = workdir / f"{tag}-www"
        self._proc: subprocess.Popen[Any] | None = None

    def __enter__(self) -> ExtraHttpServer:
        self._root.mkdir(exist_ok=True)
        self._ready.unlink(missing_ok=True)
        with open(self._log, "ab") as logf:
            self._proc = self.ns.popen(
                [
                    sys.executable,
                    str(_HTTP_SCRIPT),
                    str(self._root),
                    str(self._ready),
                    str(self.port),
                    *self.addrs,
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
            )
        proc = self._proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"extra HTTP server exited: {self._log.read_text()[-800:]}")
            return self._ready.exists()

        wait_until(ready, 15, f"the extra HTTP server on {self.addrs} port {self.port}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self.ns.kill(self._proc)
            self._proc = None

    def log_text(self) -> str:
        return self._log.read_text(errors="replace")


def real_tunnels(exits: list[Any], *, handshake_timeout: float) -> Any:
    """An ``OpenTunnel`` for ``WireGuardAddon(open_tunnel=...)``: the real runtime, its UDP
    socket in the client namespace of the exit (an ``ExitPeer``) whose public key the
    config names."""
    from contextlib import asynccontextmanager

    from mitm_wg.runtime import open_tunnel

    by_key = {e.server_public_key: e for e in exits}

    @asynccontextmanager
    async def open_real(config: Any) -> Any:
        exit_ = by_key[config.peers[0].public_key]

        def make_socket(family: int) -> socket.socket:
            return exit_.client_ns.socket(family, socket.SOCK_DGRAM)

        async with open_tunnel(
            config, socket_factory=make_socket, handshake_timeout=handshake_timeout
        ) as t:
            yield t

    return open_real
