"""An origin that answers with the address it sees the client at (stdlib only), run as a
script inside a test namespace:

    python sourceecho.py [--log FILE] [--udp ADDR PORT]

- HTTP on port 80 of every address: ``GET`` anything answers the client's address.
- ``--udp ADDR PORT``: also a UDP echo of the sender's address, replying from ADDR.
- ``--log FILE``: one JSON line per request/datagram, ``{"proto": "tcp"|"udp", "client": …}``.
Prints ``ready`` once listening. Start it with :func:`harness.source_echo`.
"""

from __future__ import annotations

import argparse
import http.server
import json
import socket
import threading

lock = threading.Lock()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--log")
    ap.add_argument("--udp", nargs=2, metavar=("ADDR", "PORT"))
    args = ap.parse_args()
    log = open(args.log, "a", buffering=1) if args.log else None

    def note(proto: str, client: str) -> None:
        if log is not None:
            with lock:
                log.write(json.dumps({"proto": proto, "client": client}) + "\n")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            note("tcp", self.client_address[0])
            body = self.client_address[0].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    if args.udp:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((args.udp[0], int(args.udp[1])))  # replies come from that address

        def echo() -> None:
            while True:
                _data, source = udp.recvfrom(2048)
                note("udp", source[0])
                udp.sendto(source[0].encode(), source)

        threading.Thread(target=echo, daemon=True).start()
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 80), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
