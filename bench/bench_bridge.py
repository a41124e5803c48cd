"""Benchmark the asyncio⇄trio bridge of the mitmproxy edge: guest mode vs a trio thread.

    .venv/bin/python bench/bench_bridge.py [--mb 200] [--rounds 1000] [--modes guest,thread,direct]
    (--smoke: 2 MiB, 20 round trips, every mode)

For each mode, an asyncio client talks through ``Bridge.open_connection`` (a loopback trio
dialer instead of a tunnel) to a server in a *separate process* (so the server does not
compete for our GIL):

* upload:   ``--mb`` MiB written with ``write()`` + ``drain()`` to a sink that discards;
* download: ``--mb`` MiB read with ``read(65536)`` (what mitmproxy does) from a source;
* latency:  ``--rounds`` request/response round trips of 100 bytes with an echo server,
  then up to 300 more while another connection downloads flat out ("under load").

``direct`` is ``asyncio.open_connection`` without the bridge, for reference.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mitm_wg.mitmproxy.bridge import Bridge
from tests.loopback_addon import dialer_tunnel

logger = logging.getLogger(__name__)

CHUNK = 65536
MSG = 100


# -- the server process -----------------------------------------------------------------------


def serve() -> None:
    """Accept connections; the first byte chooses: s(ink), o(source of N bytes), e(cho)."""
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    sys.stdout.write(f"{listener.getsockname()[1]}\n")
    sys.stdout.flush()

    def handle(conn: socket.socket) -> None:
        try:
            talk(conn)
        except OSError:
            pass  # the client hung up early (the "under load" download is cut short)

    def talk(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            kind = conn.recv(1)
            if kind == b"s":
                while conn.recv(1 << 20):
                    pass
                conn.sendall(b"k")
            elif kind == b"o":
                size = int(conn.recv(32).decode().strip())
                block = b"z" * (1 << 20)
                while size > 0:
                    conn.sendall(block[: min(size, len(block))])
                    size -= len(block)
                conn.shutdown(socket.SHUT_WR)
                conn.recv(1)
            elif kind == b"e":
                while data := conn.recv(65536):
                    conn.sendall(data)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


# -- the client -------------------------------------------------------------------------------


async def trio_dial(host: str, port: int) -> trio.abc.HalfCloseableStream:
    stream = await trio.open_tcp_stream(host, port)
    stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
    return stream


async def run_mode(mode: str, port: int, size: int, rounds: int) -> dict[str, float]:
    bridge: Bridge | None = None
    if mode != "direct":
        bridge = Bridge(mode)  # type: ignore[arg-type]
        await bridge.start()
        await bridge.set_tunnels({"bench": dialer_tunnel(trio_dial)})

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if bridge is None:
            return await asyncio.open_connection("127.0.0.1", port)
        return await bridge.open_connection("bench", "127.0.0.1", port)

    result: dict[str, float] = {}
    try:
        # upload
        reader, writer = await connect()
        writer.write(b"s")
        block = b"u" * CHUNK
        start = time.perf_counter()
        for _ in range(size // CHUNK):
            writer.write(block)
            await writer.drain()
        writer.write_eof()
        assert await reader.read(1) == b"k"
        result["upload MB/s"] = size / 1e6 / (time.perf_counter() - start)
        writer.close()
        await writer.wait_closed()

        # download
        reader, writer = await connect()
        writer.write(b"o" + str(size).encode().ljust(32))
        got = 0
        start = time.perf_counter()
        while data := await reader.read(CHUNK):
            got += len(data)
        result["download MB/s"] = got / 1e6 / (time.perf_counter() - start)
        assert got == size, (got, size)
        writer.close()
        await writer.wait_closed()

        # latency
        reader, writer = await connect()
        writer.write(b"e")
        msg = b"r" * MSG
        samples = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            writer.write(msg)
            await writer.drain()
            await reader.readexactly(MSG)
            samples.append(time.perf_counter() - t0)
        samples.sort()
        result["rtt median us"] = statistics.median(samples) * 1e6
        result["rtt p99 us"] = samples[int(len(samples) * 0.99) - 1] * 1e6

        # latency while another connection downloads as fast as it can
        bulk_reader, bulk_writer = await connect()
        bulk_writer.write(b"o" + str(size).encode().ljust(32))

        async def drain_bulk() -> None:
            while await bulk_reader.read(CHUNK):
                pass

        bulk = asyncio.create_task(drain_bulk())
        await asyncio.sleep(0.05)
        loaded = []
        for _ in range(min(rounds, 300)):
            if bulk.done():
                break
            t0 = time.perf_counter()
            writer.write(msg)
            await writer.drain()
            await reader.readexactly(MSG)
            loaded.append(time.perf_counter() - t0)
        bulk.cancel()
        bulk_writer.close()
        result["rtt under load median us"] = statistics.median(loaded) * 1e6 if loaded else 0.0
        writer.close()
        await writer.wait_closed()
    finally:
        if bridge is not None:
            await bridge.aclose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="MiB per bulk transfer")
    parser.add_argument("--rounds", type=int, default=1000, help="latency round trips")
    parser.add_argument("--modes", default="direct,guest,thread")
    parser.add_argument("--repeat", type=int, default=1, help="runs per mode (best is shown)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite)")
    args = parser.parse_args()
    if args.smoke:
        args.mb, args.rounds, args.repeat = 2, 20, 1
    if args.serve:
        serve()
        return
    server = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        size = args.mb * (1 << 20)
        for mode in args.modes.split(","):
            best: dict[str, float] = {}
            for _ in range(args.repeat):
                res = asyncio.run(run_mode(mode, port, size, args.rounds))
                for key, value in res.items():
                    better = max if "MB/s" in key else min
                    best[key] = better(best.get(key, value), value)
            text = "  ".join(f"{k} {v:8.1f}" for k, v in best.items())
            sys.stdout.write(f"{mode:7s} {text}\n")
            sys.stdout.flush()
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
