"""An experiment of ``bench_mitm_https.py --split``: our tunnel in a process of its own.

A TCP port forwarder: every connection accepted on 127.0.0.1 (an ephemeral port) is carried to
``TARGET:TARGET_PORT`` through the tunnel of ``CONFIG`` (a wg-quick file), both directions
pumped until EOF. It measures what moving the tunnel out of mitmproxy's process (so that it
no longer shares mitmproxy's GIL) would buy; mitm-wg itself runs in-process.

Run: python bench/split_worker.py CONFIG TARGET TARGET_PORT
(prints ``ready PORT`` once it listens).
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

# this checkout's mitm_wg, as the bench scripts do
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mitm_wg.config import WireGuardConfig
from mitm_wg.runtime import open_tunnel

CHUNK = 256 * 1024


async def _pump(source: trio.abc.ReceiveStream, sink: trio.abc.HalfCloseableStream) -> None:
    try:
        while data := await source.receive_some(CHUNK):
            await sink.send_all(data)
        await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def main(config_path: str, target: str, target_port: int) -> None:
    config = WireGuardConfig.parse(Path(config_path).read_text())
    async with open_tunnel(config) as tunnel:

        async def forward(local: trio.SocketStream) -> None:
            remote = await tunnel.open_tcp_stream(target, target_port)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_pump, local, remote)
                    nursery.start_soon(_pump, remote, local)
            finally:
                await remote.aclose()
                await local.aclose()

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        print(f"ready {listeners[0].socket.getsockname()[1]}", flush=True)
        await trio.serve_listeners(forward, listeners)


if __name__ == "__main__":
    path, host, port = sys.argv[1:4]
    trio.run(main, path, host, int(port))
