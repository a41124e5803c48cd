"""Tiny HTTP/1.1 test server run as a script inside the exit namespace (stdlib only).

    python httpserver.py ROOT READY_FILE PORT ADDR [ADDR ...]

- ``GET /path``: a file under ROOT (Content-Length, keep-alive, any size; SimpleHTTPRequestHandler).
- ``GET /bytes/N``: N bytes of :func:`pattern` (generated, not stored), Content-Length.
- ``POST /anything``: reads the body (Content-Length or chunked) and answers
  ``{"sha256": "...", "size": N}`` (JSON).
Writes READY_FILE once every address is bound and listening.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger(__name__)

_PATTERN_BLOCK = bytes(range(256)) * 256  # 64 KiB


def pattern(n: int, offset: int = 0) -> bytes:
    """The bytes ``/bytes/N`` serves: byte ``i`` is ``(offset + i) % 256``."""
    start = offset % 256
    reps = (start + n) // len(_PATTERN_BLOCK) + 1
    return (_PATTERN_BLOCK * reps)[start : start + n]


class Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.client_address[0]} {format % args}\n")

    def do_GET(self) -> None:
        if self.path.startswith("/bytes/"):
            try:
                n = int(self.path[len("/bytes/") :])
            except ValueError:
                self.send_error(400)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            sent = 0
            while sent < n:
                chunk = min(len(_PATTERN_BLOCK), n - sent)
                # every block starts at a multiple of 256, so the block is the right slice
                self.wfile.write(memoryview(_PATTERN_BLOCK)[:chunk])
                sent += chunk
            return
        super().do_GET()

    def do_POST(self) -> None:
        h = hashlib.sha256()
        size = 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                line = self.rfile.readline(1024)
                n = int(line.split(b";")[0].strip() or b"0", 16)
                if n == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                data = self.rfile.read(n)
                h.update(data)
                size += len(data)
                self.rfile.readline(1024)
        else:
            remaining = int(self.headers.get("Content-Length", "0"))
            while remaining > 0:
                data = self.rfile.read(min(remaining, 1 << 16))
                if not data:
                    break
                h.update(data)
                size += len(data)
                remaining -= len(data)
        body = json.dumps({"sha256": h.hexdigest(), "size": size}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def main() -> None:
    root, ready, port_s, *addrs = sys.argv[1:]
    port = int(port_s)
    handler = partial(Handler, directory=root)
    servers: list[ThreadingHTTPServer] = []
    for addr in addrs:
        cls = V6Server if ":" in addr else ThreadingHTTPServer
        cls.daemon_threads = True
        servers.append(cls((addr, port), handler))
    for srv in servers:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    Path(ready).write_text("ready")
    threading.Event().wait()


if __name__ == "__main__":
    main()
