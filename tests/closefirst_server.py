"""A tiny HTTP server that closes first (``Connection: close``), for TIME_WAIT tests/benchmarks.

As a script, inside a namespace (stdlib only)::

    python closefirst_server.py READY_FILE ADDR PORT [PORT ...]

answers every connection with one short response to its first request head and closes it
at once: the server's Linux TCP then holds each 4-tuple in TIME_WAIT for 60 s — the state a
client reusing tuples has to get past. One thread per port, sequential accepts (the clients
are sequential too). :class:`CloseFirstServer` runs it in a test namespace.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def _serve(listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                head += chunk
            if head:
                conn.sendall(RESPONSE)
        except OSError:
            pass
        finally:
            conn.close()  # we close first: this side enters TIME_WAIT


def main(ready: str, addr: str, *ports: str) -> None:
    listeners = []
    for port in ports:
        sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, int(port)))
        sock.listen(128)
        listeners.append(sock)
    threads = [threading.Thread(target=_serve, args=(s,), daemon=True) for s in listeners]
    for t in threads:
        t.start()
    Path(ready).write_text("ready\n")
    for t in threads:
        t.join()


class CloseFirstServer:
    """The script above inside ``ns`` (a harness ``Netns``), killed by PID on exit."""

    def __init__(self, ns: Any, workdir: Path, addr: str, ports: list[int]) -> None:
        self.ns = ns
        self.addr = addr
        self.ports = ports
        self._ready = workdir / f"closefirst-{ports[0]}.ready"
        self._log = workdir / f"closefirst-{ports[0]}.log"
        self._proc: subprocess.Popen[Any] | None = None

    def __enter__(self) -> CloseFirstServer:
        from harness import wait_until

        self._ready.unlink(missing_ok=True)
        with open(self._log, "ab") as logf:
            self._proc = self.ns.popen(
                [sys.executable, __file__, str(self._ready), self.addr, *map(str, self.ports)],
                stdout=logf,
                stderr=subprocess.STDOUT,
            )
        proc = self._proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"close-first server exited: {self._log.read_text()[-800:]}")
            return self._ready.exists()

        wait_until(ready, 15, f"the close-first server on {self.addr}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self.ns.kill(self._proc)
            self._proc = None


def tcp_ext_counters(ns: Any) -> dict[str, int]:
    """The TcpExt counters of ``ns`` (``/proc/net/netstat`` read inside it, as ``nstat``)."""
    text = ns.exec(["cat", "/proc/net/netstat"]).stdout
    lines = [line.split() for line in text.splitlines() if line.startswith("TcpExt:")]
    names, values = lines[0][1:], lines[1][1:]
    return {name: int(value) for name, value in zip(names, values, strict=True)}


if __name__ == "__main__":
    main(*sys.argv[1:])
