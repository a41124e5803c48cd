"""mitmproxy's own WireGuard mode (boringtun + smoltcp) as a second real peer; no root needed.

CAUTION: mitmproxy proxies every connection that arrives through the tunnel to its original
destination FROM THE HOST NAMESPACE, and answers DNS at 10.0.0.53 with the host's resolver.
Tests must only aim at loopback services (or run it inside a namespace via ``ns=``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .netns import Netns, track_process, untrack_process

log = logging.getLogger(__name__)

_LISTENING = re.compile(rb"WireGuard server listening at (\S+?):(\d+)\.?\s")


def mitmdump_path() -> str | None:
    """The mitmdump next to the running interpreter (the venv's), else one on PATH."""
    local = Path(sys.executable).with_name("mitmdump")
    if local.exists():
        return str(local)
    return shutil.which("mitmdump")


def have_mitmdump() -> tuple[bool, str]:
    path = mitmdump_path()
    return (True, path) if path else (False, "mitmdump not found (pip install mitmproxy)")


def _public_key(private_b64: str) -> bytes:
    priv = X25519PrivateKey.from_private_bytes(base64.b64decode(private_b64))
    return priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(eq=False)
class MitmPeer:
    """A running ``mitmdump --mode wireguard@HOST:PORT``."""

    host: str
    port: int
    confdir: Path
    log_path: Path
    process: subprocess.Popen[Any] = field(repr=False)
    server_public_key: bytes
    client_public_key: bytes
    client_private_key: bytes = field(repr=False)

    @property
    def endpoint(self) -> tuple[str, int]:
        return (self.host, self.port)

    # mitmproxy's fixed tunnel addressing (see mitmproxy/proxy/mode_servers.py)
    client_tunnel_v4 = "10.0.0.1"
    dns_server = "10.0.0.53"

    def client_config_text(
        self,
        allowed_ips: str = "0.0.0.0/0",
        keepalive: int | None = None,
        *,
        endpoint: tuple[str, int] | None = None,
    ) -> str:
        """wg-quick text for OUR side, as mitmproxy prints it (Address 10.0.0.1/32, DNS 10.0.0.53)."""
        host, port = endpoint or self.endpoint
        lines = [
            "[Interface]",
            f"PrivateKey = {base64.b64encode(self.client_private_key).decode()}",
            f"Address = {self.client_tunnel_v4}/32",
            f"DNS = {self.dns_server}",
            "",
            "[Peer]",
            f"PublicKey = {base64.b64encode(self.server_public_key).decode()}",
            f"AllowedIPs = {allowed_ips}",
            f"Endpoint = {host}:{port}",
        ]
        if keepalive:
            lines.append(f"PersistentKeepalive = {keepalive}")
        return "\n".join(lines) + "\n"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def mitmproxy_wireguard_peer(
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
    ns: Netns | None = None,
    startup_timeout: float = 30.0,
) -> Iterator[MitmPeer]:
    """Run mitmdump in WireGuard mode with a fresh confdir; kill it (by PID) on exit.

    ``port=0`` lets mitmproxy pick a free UDP port (read back from its log). ``ns`` runs it
    inside a namespace (then ``host`` must be an address of that namespace).
    """
    exe = mitmdump_path()
    if exe is None:
        raise RuntimeError("mitmdump not found")
    confdir = Path(tempfile.mkdtemp(prefix="mwg-mitm-"))
    os.chmod(confdir, 0o700)
    log_path = confdir / "mitmdump.log"
    argv = [
        exe, "--mode", f"wireguard@{host}:{port}", "--set", f"confdir={confdir}",
        "--set", "termlog_verbosity=info", "--set", "flow_detail=1", *extra_args,
    ]  # fmt: skip
    proc: subprocess.Popen[Any] | None = None
    try:
        with open(log_path, "wb") as logf:
            if ns is not None:
                proc = ns.popen(argv, stdout=logf, stderr=subprocess.STDOUT)
            else:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT
                )
                track_process(proc)
        deadline = time.monotonic() + startup_timeout
        while True:
            text = log_path.read_bytes()
            m = _LISTENING.search(text)
            if m:
                break
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mitmdump exited ({proc.returncode}): {text[-1000:].decode(errors='replace')}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"mitmdump did not start listening within {startup_timeout} s")
            time.sleep(0.05)
        conf = json.loads((confdir / "wireguard.conf").read_text())
        client_priv = base64.b64decode(conf["client_key"])
        peer = MitmPeer(
            host=m.group(1).decode().strip("[]"),
            port=int(m.group(2)),
            confdir=confdir,
            log_path=log_path,
            process=proc,
            server_public_key=_public_key(conf["server_key"]),
            client_public_key=_public_key(conf["client_key"]),
            client_private_key=client_priv,
        )
        log.info("mitmproxy WireGuard peer listening on %s:%d", peer.host, peer.port)
        yield peer
    finally:
        if proc is not None:
            if ns is not None:
                ns.kill(proc)
            elif proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            untrack_process(proc)
        shutil.rmtree(confdir, ignore_errors=True)
