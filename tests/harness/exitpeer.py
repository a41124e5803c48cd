"""A real WireGuard exit peer (wireguard-go + the Linux TCP/IP stack) in a network namespace.

Layout for index N (1..250)::

    client_ns  PREFIXNc                       ns (exit)  PREFIXNe
    veth PREFIXNv0 10.77.N.1/30  <------->    veth PREFIXNv1 10.77.N.2/30  (fd00:77:N::2/64)
                 fd00:77:N::1/64             wireguard-go PREFIXNwg, UDP 51820
                                              tunnel 10.78.N.1/24, fd00:78:N::1/64
                                              HTTP :8000 on the tunnel addresses
                                              dnsmasq :53 on the tunnel addresses (optional)

Our code's UDP socket lives in ``client_ns`` (``peer.client_ns.socket(...)``) and talks to
``peer.endpoint``; inside the tunnel it is 10.78.N.2 / fd00:78:N::2.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import logging
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from .netns import STATE_DIR, WG_SOCKET_DIR, Netns, cleanup_stale, list_namespaces

log = logging.getLogger(__name__)

WG_PORT = 51820
HTTP_PORT = 8000
DNS_PORT = 53
MAX_PREFIX_LEN = 9
_HTTP_SCRIPT = Path(__file__).with_name("httpserver.py")
_SOURCE_ECHO_SCRIPT = Path(__file__).with_name("sourceecho.py")
_READY_QNAME = "ready.harness.invalid"


def b64(key: bytes) -> str:
    """Base64 form of a 32-byte key, as WireGuard configs write it."""
    return base64.b64encode(key).decode()


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 ``(private, public)`` pair as raw 32-byte strings."""
    priv = X25519PrivateKey.generate()
    raw_priv = priv.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    raw_pub = priv.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return raw_priv, raw_pub


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``predicate()`` until true; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass(frozen=True, slots=True)
class PeerStats:
    """One peer line of ``wg show IF dump``."""

    public_key: bytes
    endpoint: tuple[str, int] | None
    allowed_ips: tuple[str, ...]
    latest_handshake: int  # unix seconds, 0 = never
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int | None


def parse_wg_dump(text: str) -> list[PeerStats]:
    """Parse ``wg show IF dump`` (skips the interface line, which holds the private key)."""
    peers = []
    for line in text.splitlines()[1:]:
        f = line.split("\t")
        if len(f) < 8:
            continue
        ep: tuple[str, int] | None = None
        if f[2] != "(none)":
            host, _, port = f[2].rpartition(":")
            ep = (host.strip("[]"), int(port))
        peers.append(
            PeerStats(
                public_key=base64.b64decode(f[0]),
                endpoint=ep,
                allowed_ips=tuple(a for a in f[3].split(",") if a and a != "(none)"),
                latest_handshake=int(f[4]),
                rx_bytes=int(f[5]),
                tx_bytes=int(f[6]),
                persistent_keepalive=None if f[7] == "off" else int(f[7]),
            )
        )
    return peers


@dataclass(frozen=True, slots=True)
class DnsQuery:
    qtype: str
    name: str
    client: str


def _dns_query_packet(name: str, qtype: int = 1, txid: int = 0x4D57) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", txid, 0x0100, 1, 0, 0, 0) + labels + struct.pack("!HH", qtype, 1)


@dataclass(eq=False)
class ExitPeer:
    """A running exit peer. Create with :func:`exit_peer`; see module docstring for layout."""

    ns: Netns
    client_ns: Netns
    index: int
    ifname: str
    endpoint: tuple[str, int]
    endpoint_v6: tuple[str, int] | None
    server_tunnel_v4: str
    client_tunnel_v4: str
    server_tunnel_v6: str | None
    client_tunnel_v6: str | None
    http_port: int
    www_root: Path
    workdir: Path
    client_private_key: bytes = field(repr=False)
    client_public_key: bytes
    server_public_key: bytes
    dns_server: str | None = None
    _server_private_key: bytes = field(default=b"", repr=False)
    _wg_proc: subprocess.Popen[Any] | None = field(default=None, repr=False)
    _dns_log: Path | None = field(default=None, repr=False)

    # -- config for our side -----------------------------------------------------------------
    @property
    def client_ifname(self) -> str:
        """A free interface name for a reference wireguard-go client in ``client_ns``."""
        return self.ifname[: -len("wg")] + "cw"

    @property
    def tunnel_v4_net(self) -> str:
        return f"10.78.{self.index}.0/24"

    @property
    def tunnel_v6_net(self) -> str | None:
        return f"fd00:78:{self.index}::/64" if self.server_tunnel_v6 else None

    @property
    def http_url(self) -> str:
        """``http://10.78.N.1:8000``"""
        return f"http://{self.server_tunnel_v4}:{self.http_port}"

    def client_config_text(
        self,
        allowed_ips: str | None = None,
        keepalive: int | None = None,
        *,
        endpoint: tuple[str, int] | None = None,
        dns: bool = True,
    ) -> str:
        """wg-quick text for OUR side (the client).

        ``allowed_ips`` defaults to the tunnel prefixes (``10.78.N.0/24, fd00:78:N::/64``);
        ``endpoint`` overrides :attr:`endpoint` (e.g. an :class:`ImpairedRelay`'s address);
        ``DNS`` is included when the peer runs dnsmasq and ``dns`` is true.
        """
        if allowed_ips is None:
            allowed_ips = ", ".join(n for n in (self.tunnel_v4_net, self.tunnel_v6_net) if n)
        addrs = [f"{self.client_tunnel_v4}/32"]
        if self.client_tunnel_v6:
            addrs.append(f"{self.client_tunnel_v6}/128")
        host, port = endpoint or self.endpoint
        ep = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [
            "[Interface]",
            f"PrivateKey = {b64(self.client_private_key)}",
            f"Address = {', '.join(addrs)}",
        ]
        if dns and self.dns_server:
            lines.append(f"DNS = {self.dns_server}")
        lines += [
            "",
            "[Peer]",
            f"PublicKey = {b64(self.server_public_key)}",
            f"AllowedIPs = {allowed_ips}",
            f"Endpoint = {ep}",
        ]
        if keepalive:
            lines.append(f"PersistentKeepalive = {keepalive}")
        return "\n".join(lines) + "\n"

    # -- state of the real peer ---------------------------------------------------------------
    def wg_show(self) -> list[PeerStats]:
        """Peers of the exit's wireguard-go interface (``wg show IF dump``)."""
        r = self.ns.exec(["wg", "show", self.ifname, "dump"])
        return parse_wg_dump(r.stdout)

    def client_stats(self) -> PeerStats:
        """The :class:`PeerStats` of our (client) key."""
        for p in self.wg_show():
            if p.public_key == self.client_public_key:
                return p
        raise LookupError("client peer missing from wg show")

    def wireguard_log(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the exit's wireguard-go log (``wg-exit.log``)."""
        try:
            text = (self.workdir / "wg-exit.log").read_text(errors="replace")
        except FileNotFoundError:
            return "(no wireguard-go log)"
        return "\n".join(text.splitlines()[-lines:])

    def diagnostics(self) -> str:
        """The exit's view of the network, for a failing test's report: its wireguard-go
        peers (public keys, endpoints, handshake ages, transfer), addresses, neighbours,
        routes and the kernel's non-zero UDP/IPv6 counters, in both namespaces, and the end
        of its wireguard-go log."""
        parts = []
        for ns in (self.ns, self.client_ns):
            for argv in (
                ["wg", "show", self.ifname] if ns is self.ns else None,
                ["ip", "-br", "addr"],
                ["ip", "neigh"],
                ["ip", "-6", "route"],
                ["nstat", "-as", "Udp*", "Ip6InNoRoutes", "Ip6OutNoRoutes", "Icmp6*Neigh*"],
            ):
                if argv is None:
                    continue
                r = ns.exec(argv, check=False)
                parts.append(f"--- {ns.name}: {' '.join(argv)}\n{r.stdout}{r.stderr}".rstrip())
        parts.append(f"--- {self.ns.name}: wireguard-go log (last lines)\n{self.wireguard_log()}")
        return "\n".join(parts)

    @property
    def wireguard_running(self) -> bool:
        return self._wg_proc is not None and self._wg_proc.poll() is None

    def stop_wireguard(self) -> None:
        """Kill the exit's wireguard-go (its interface and tunnel addresses disappear)."""
        if self._wg_proc is not None:
            self.ns.kill(self._wg_proc)
            self._wg_proc = None
        sock = WG_SOCKET_DIR / f"{self.ifname}.sock"
        wait_until(lambda: not sock.exists(), 5, f"{sock} to disappear")

    def start_wireguard(self, *, env: Sequence[str] = (), verbose: bool = True) -> None:
        """(Re)start wireguard-go with the same keys, port and addresses (``env``: extra
        ``NAME=VALUE`` for its environment, e.g. ``GOMAXPROCS=1``). ``verbose``: its log
        (:meth:`wireguard_log`) has a line per handshake message and keepalive, and says why
        it dropped one (a replay, a flood), for a failing test's report; per data packet it
        logs nothing."""
        if self.wireguard_running:
            return
        self._wg_proc = start_wireguard_go(
            self.ns, self.ifname, self.workdir / "wg-exit.log", env=env, verbose=verbose
        )
        key_file = self.workdir / "exit.key"
        key_file.write_text(b64(self._server_private_key))
        key_file.chmod(0o600)
        allowed = [f"{self.client_tunnel_v4}/32"]
        if self.client_tunnel_v6:
            allowed.append(f"{self.client_tunnel_v6}/128")
        self.ns.exec(
            [
                "wg", "set", self.ifname, "listen-port", str(WG_PORT),
                "private-key", str(key_file),
                "peer", b64(self.client_public_key), "allowed-ips", ",".join(allowed),
            ]
        )  # fmt: skip
        key_file.unlink()
        self.ns.ip("addr", "add", f"{self.server_tunnel_v4}/24", "dev", self.ifname)
        if self.server_tunnel_v6:
            self.ns.ip(
                "-6", "addr", "add", f"{self.server_tunnel_v6}/64", "dev", self.ifname, "nodad"
            )
        self.ns.ip("link", "set", self.ifname, "up")
        self.ns.settle()

    # -- dnsmasq ----------------------------------------------------------------------------------
    def dns_queries(self) -> list[DnsQuery]:
        """Queries dnsmasq logged (excluding the harness's readiness probe)."""
        if self._dns_log is None:
            raise RuntimeError("exit peer runs without dnsmasq (use exit_peer(dnsmasq=True))")
        try:
            text = self._dns_log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for m in re.finditer(r"query\[(\w+)\] (\S+) from (\S+)", text):
            if m.group(2) != _READY_QNAME:
                out.append(DnsQuery(m.group(1), m.group(2), m.group(3)))
        return out

    def queries(self) -> list[str]:
        """Names dnsmasq was asked for, in order (proves where names were resolved)."""
        return [q.name for q in self.dns_queries()]


#: The first wireguard-go release that sends with UDP GSO on Linux (conn: StdNetBind batching).
WIREGUARD_GO_GSO_RELEASE = 20230223


@functools.cache
def wireguard_go_sends_gso() -> bool:
    """Whether the installed wireguard-go sends runs of datagrams with UDP GSO (a release of
    2023-02-23 or later, e.g. Debian 13's; Debian 12's 0.0.20220316 is older)."""
    out = subprocess.run(
        ["wireguard-go", "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    m = re.search(r"v0\.0\.(\d{8})", out)
    if m is None:
        raise RuntimeError(f"cannot read the wireguard-go version from {out!r}")
    return int(m.group(1)) >= WIREGUARD_GO_GSO_RELEASE


def start_wireguard_go(
    ns: Netns,
    ifname: str,
    log_path: Path,
    *,
    verbose: bool = False,
    env: Sequence[str] = (),
) -> subprocess.Popen[Any]:
    """Run ``wireguard-go IFNAME`` in the foreground inside ``ns``; wait for its socket.

    ``verbose`` sets ``LOG_LEVEL=verbose``: the log at ``log_path`` then has a line per
    handshake message ("Sending handshake initiation", "Received handshake response", ...).
    """
    sock = WG_SOCKET_DIR / f"{ifname}.sock"
    if sock.exists():
        raise FileExistsError(f"{sock} exists: interface name {ifname!r} is in use")
    argv = ["env", "WG_PROCESS_FOREGROUND=1", *(["LOG_LEVEL=verbose"] if verbose else []), *env]
    with open(log_path, "ab") as logf:
        proc = ns.popen(
            [*argv, "wireguard-go", ifname],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"wireguard-go {ifname} exited: {log_path.read_text()[-500:]}")
        return sock.exists()

    try:
        wait_until(ready, 10, f"wireguard-go {ifname}")
    except BaseException:
        ns.kill(proc)
        raise
    return proc


def parse_wg_quick(text: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Minimal wg-quick parser for the harness: ``(interface, [peer, ...])`` with raw values."""
    iface: dict[str, str] = {}
    peers: list[dict[str, str]] = []
    cur: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.lower() == "[interface]":
            cur = iface
        elif line.lower() == "[peer]":
            cur = {}
            peers.append(cur)
        elif cur is not None and "=" in line:
            k, v = line.split("=", 1)
            cur[k.strip().lower()] = v.strip()
    return iface, peers


@contextlib.contextmanager
def wireguard_go_interface(
    ns: Netns, ifname: str, config_text: str, workdir: Path, *, verbose: bool = False
) -> Iterator[subprocess.Popen[Any]]:
    """A reference wireguard-go interface in ``ns`` configured from wg-quick text.

    Sets keys/peers with ``wg set``, adds the Address(es), brings the link up and routes every
    peer's AllowedIPs into it. DNS/MTU/Table/hooks are ignored. Killed on exit. Its log is
    ``workdir / f"wg-{ifname}.log"`` (one line per handshake message with ``verbose``).
    """
    iface, peers = parse_wg_quick(config_text)
    proc = start_wireguard_go(ns, ifname, workdir / f"wg-{ifname}.log", verbose=verbose)
    try:
        key_file = workdir / f"{ifname}.key"
        key_file.write_text(iface["privatekey"])
        key_file.chmod(0o600)
        argv = ["wg", "set", ifname, "private-key", str(key_file)]
        if "listenport" in iface:
            argv += ["listen-port", iface["listenport"]]
        for p in peers:
            argv += ["peer", p["publickey"]]
            if "allowedips" in p:
                argv += ["allowed-ips", p["allowedips"].replace(" ", "")]
            if "endpoint" in p:
                argv += ["endpoint", p["endpoint"]]
            if "persistentkeepalive" in p:
                argv += ["persistent-keepalive", p["persistentkeepalive"]]
        try:
            ns.exec(argv)
        finally:
            key_file.unlink()
        for addr in iface.get("address", "").split(","):
            addr = addr.strip()
            if addr:
                extra = ["nodad"] if ":" in addr else []
                ns.ip("addr", "add", addr, "dev", ifname, *extra)
        ns.ip("link", "set", ifname, "up")
        for p in peers:
            for net in p.get("allowedips", "").split(","):
                net = net.strip()
                if net:
                    ns.ip("-6" if ":" in net else "-4", "route", "replace", net, "dev", ifname)
        ns.settle()
        yield proc
    finally:
        ns.kill(proc)
        sock = WG_SOCKET_DIR / f"{ifname}.sock"
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not sock.exists(), 5, f"{sock} to disappear")


_alloc_lock = threading.Lock()


@contextlib.contextmanager
def _allocation_lock() -> Iterator[None]:
    STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    with _alloc_lock, open(STATE_DIR / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _claim_index(prefix: str) -> tuple[int, Netns, Netns]:
    """Pick N whose namespaces, interfaces and wireguard sockets are all free; create the ns."""
    with _allocation_lock():
        existing = set(list_namespaces())
        host_links = {p.name for p in Path("/sys/class/net").iterdir()}
        for n in range(1, 251):
            base = f"{prefix}{n}"
            names = [base + s for s in ("e", "c")]
            ifnames = [base + s for s in ("wg", "cw", "v0", "v1")]
            if any(x in existing for x in names) or any(x in host_links for x in ifnames):
                continue
            if any((WG_SOCKET_DIR / f"{x}.sock").exists() for x in ifnames):
                continue
            ns = Netns.claim(names[0])
            if ns is None:
                continue
            client_ns = Netns.claim(names[1])
            if client_ns is None:
                ns.close()
                continue
            return n, ns, client_ns
    raise RuntimeError(f"no free exit-peer index for prefix {prefix!r}")


@contextlib.contextmanager
def exit_peer(
    *,
    ipv6: bool = True,
    http: bool = True,
    dnsmasq: bool = False,
    name_prefix: str = "mwg",
    dns_names: Mapping[str, str] | None = None,
) -> Iterator[ExitPeer]:
    """Start an exit peer; tear everything down on exit (also on errors).

    ``dns_names`` adds dnsmasq answers (``{"name.test": "10.78.N.1"}``, ``{N}`` is replaced by
    the index); ``exit.test`` always resolves to the server's tunnel addresses.
    Namespaces left by a crashed earlier run with the same prefix are removed first.
    """
    if not re.fullmatch(r"[a-z][a-z0-9]*", name_prefix) or len(name_prefix) > MAX_PREFIX_LEN:
        raise ValueError(f"name_prefix must be [a-z][a-z0-9]{{0,{MAX_PREFIX_LEN - 1}}}")
    cleanup_stale(name_prefix)
    n, ns, client_ns = _claim_index(name_prefix)
    workdir = Path(tempfile.mkdtemp(prefix=f"{name_prefix}{n}-"))
    try:
        srv_priv, srv_pub = generate_keypair()
        cli_priv, cli_pub = generate_keypair()
        peer = ExitPeer(
            ns=ns,
            client_ns=client_ns,
            index=n,
            ifname=f"{name_prefix}{n}wg",
            endpoint=(f"10.77.{n}.2", WG_PORT),
            endpoint_v6=(f"fd00:77:{n}::2", WG_PORT) if ipv6 else None,
            server_tunnel_v4=f"10.78.{n}.1",
            client_tunnel_v4=f"10.78.{n}.2",
            server_tunnel_v6=f"fd00:78:{n}::1" if ipv6 else None,
            client_tunnel_v6=f"fd00:78:{n}::2" if ipv6 else None,
            http_port=HTTP_PORT,
            www_root=workdir / "www",
            workdir=workdir,
            client_private_key=cli_priv,
            client_public_key=cli_pub,
            server_public_key=srv_pub,
            _server_private_key=srv_priv,
        )
        v0, v1 = f"{name_prefix}{n}v0", f"{name_prefix}{n}v1"
        subprocess.run(
            ["ip", "link", "add", v0, "netns", client_ns.name, "type", "veth",
             "peer", "name", v1, "netns", ns.name],
            check=True, capture_output=True, timeout=20,
        )  # fmt: skip
        client_ns.ip("addr", "add", f"10.77.{n}.1/30", "dev", v0)
        ns.ip("addr", "add", f"10.77.{n}.2/30", "dev", v1)
        if ipv6:
            client_ns.ip("-6", "addr", "add", f"fd00:77:{n}::1/64", "dev", v0, "nodad")
            ns.ip("-6", "addr", "add", f"fd00:77:{n}::2/64", "dev", v1, "nodad")
        client_ns.ip("link", "set", v0, "up")
        ns.ip("link", "set", v1, "up")
        peer.start_wireguard()  # settles ns
        # links and addresses stop changing before any server or client starts in them
        client_ns.settle()
        addrs = [peer.server_tunnel_v4] + ([peer.server_tunnel_v6] if peer.server_tunnel_v6 else [])
        if http:
            _start_http(peer, addrs)
        if dnsmasq:
            _start_dnsmasq(peer, addrs, dns_names or {})
        log.info("exit peer %s ready: endpoint %s", ns.name, peer.endpoint)
        yield peer
    finally:
        client_ns.close()
        ns.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _start_http(peer: ExitPeer, addrs: list[str]) -> None:
    peer.www_root.mkdir()
    (peer.www_root / "index.html").write_text("hello from the exit peer\n")
    ready = peer.workdir / "http.ready"
    with open(peer.workdir / "http.log", "ab") as logf:
        proc = peer.ns.popen(
            [
                sys.executable,
                str(_HTTP_SCRIPT),
                str(peer.www_root),
                str(ready),
                str(peer.http_port),
                *addrs,
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )

    def is_ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(
                f"HTTP server exited: {(peer.workdir / 'http.log').read_text()[-800:]}"
            )
        return ready.exists()

    wait_until(is_ready, 15, "the exit peer's HTTP server")


def _start_dnsmasq(peer: ExitPeer, addrs: list[str], names: Mapping[str, str]) -> None:
    if shutil.which("dnsmasq") is None:
        raise RuntimeError("dnsmasq not found (apt-get install dnsmasq-base)")
    peer._dns_log = peer.workdir / "dnsmasq.log"
    peer.dns_server = peer.server_tunnel_v4
    argv = [
        "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        "--bind-dynamic", "--cache-size=0", "--log-queries", f"--log-facility={peer._dns_log}",
        f"--port={DNS_PORT}",
    ]  # fmt: skip
    argv += [f"--listen-address={a}" for a in addrs]
    for a in addrs:
        argv.append(f"--address=/exit.test/{a}")
    argv.append(f"--address=/{_READY_QNAME}/{peer.server_tunnel_v4}")
    for name, addr in names.items():
        argv.append(f"--address=/{name}/{addr.replace('{N}', str(peer.index))}")
    proc = peer.ns.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # readiness: a real query from inside the exit namespace
    sock = peer.ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.settimeout(0.2)
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError("dnsmasq exited during startup")
            try:
                sock.sendto(_dns_query_packet(_READY_QNAME), (peer.server_tunnel_v4, DNS_PORT))
                if sock.recv(512)[:2] == b"\x4d\x57":
                    return
            except OSError:
                time.sleep(0.05)
            if time.monotonic() > deadline:
                raise TimeoutError("dnsmasq did not answer")
    finally:
        sock.close()


@contextlib.contextmanager
def diagnose_on_failure(*peers: ExitPeer) -> Iterator[None]:
    """On an exception inside the block, attach each peer's :meth:`ExitPeer.diagnostics`
    as a note, so an intermittent failure in CI carries the peers' state at that moment."""
    try:
        yield
    except BaseException as e:
        if isinstance(e, Exception | BaseExceptionGroup) and not isinstance(e, KeyboardInterrupt):
            for peer in peers:
                try:
                    e.add_note(f"=== exit peer {peer.ns.name} ===\n{peer.diagnostics()}")
                except Exception as diag_error:  # never hide the real failure
                    e.add_note(f"(diagnostics of {peer.ns.name} failed: {diag_error!r})")
        raise


@contextlib.contextmanager
def origin_behind(exits: list[ExitPeer], prefix: str, addresses: list[str]) -> Iterator[Netns]:
    """An origin namespace (``prefix`` + a free number) reachable from each exit's tunnel:
    ``addresses`` (in 10.99.0.0/24 or fd00:99::/64) on its loopback, a veth 10.79.k.1/30
    <-> 10.79.k.2/30 (and, with IPv6 addresses, fd00:79:k::1/64 <-> ::2) to exit k, which
    forwards between its tunnel and that link. A server there sees, as the source of each
    request, the tunnel address of the exit it came through."""
    v6 = any(":" in addr for addr in addresses)
    origin = None
    for i in range(100):
        origin = Netns.claim(f"{prefix}{i}")
        if origin is not None:
            break
    assert origin is not None, f"no free {prefix}N namespace name"
    try:
        for addr in addresses:
            origin.ip("addr", "add", f"{addr}/{128 if ':' in addr else 32}", "dev", "lo")
        for k, e in enumerate(exits):
            o_if, e_if = f"{origin.name}o{k}", f"{origin.name}e{k}"
            origin.ip("link", "add", o_if, "type", "veth", "peer", "name", e_if, "netns", e.ns.name)
            origin.ip("addr", "add", f"10.79.{k}.1/30", "dev", o_if)
            e.ns.ip("addr", "add", f"10.79.{k}.2/30", "dev", e_if)
            if v6:
                assert e.tunnel_v6_net is not None, "an IPv6 origin needs an IPv6 tunnel"
                origin.ip("-6", "addr", "add", f"fd00:79:{k}::1/64", "dev", o_if, "nodad")
                e.ns.ip("-6", "addr", "add", f"fd00:79:{k}::2/64", "dev", e_if, "nodad")
            origin.ip("link", "set", o_if, "up")
            e.ns.ip("link", "set", e_if, "up")
            origin.ip("route", "add", e.tunnel_v4_net, "via", f"10.79.{k}.2")
            e.ns.ip("route", "add", "10.99.0.0/24", "via", f"10.79.{k}.1")
            e.ns.exec(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            if v6:
                origin.ip("-6", "route", "add", e.tunnel_v6_net, "via", f"fd00:79:{k}::2")
                e.ns.ip("-6", "route", "add", "fd00:99::/64", "via", f"fd00:79:{k}::1")
                e.ns.exec(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
        yield origin
    finally:
        # Each exit's end of its veth goes first: deleting the origin's namespace destroys
        # the pair only when the kernel's namespace cleanup runs, later, and a next origin
        # claiming the same name (the next test's) found the old end still in the exit's
        # namespace ("File exists"; 22 of 30 times in a loop of the two steps here).
        for k, e in enumerate(exits):
            e.ns.ip("link", "del", f"{origin.name}e{k}", check=False)
        origin.close()


def source_echo(
    ns: Netns, *, log: Path | None = None, udp: tuple[str, int] | None = None
) -> subprocess.Popen[str]:
    """Start ``sourceecho.py`` in ``ns`` (an HTTP origin on port 80 answering with the
    client's address; optionally a UDP echo from ``udp`` and a JSON log of what it saw) and
    wait until it listens. Killed with the namespace."""
    argv = [sys.executable, str(_SOURCE_ECHO_SCRIPT)]
    if log is not None:
        argv += ["--log", str(log)]
    if udp is not None:
        argv += ["--udp", udp[0], str(udp[1])]
    proc = ns.popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@contextlib.contextmanager
def narrow_link(peer: ExitPeer, mtu: int) -> Iterator[Netns]:
    """Put a Linux router between ``peer.client_ns`` and the exit whose link toward the exit
    carries at most ``mtu`` bytes per IP packet: a PPPoE line, a mobile network, a VPN under
    the VPN. The client's side keeps 1500, as a laptop on Wi-Fi behind a PPPoE router does:
    the router answers a too-big packet with ICMP "fragmentation needed" / ICMPv6 "packet too
    big" (and fragments IPv4 packets without DF); the exit's own link has the small MTU too.

    The direct veth is replaced by client ``v0`` 10.76.N.1/30 (fd00:76:N::1/64) <-> router
    ``r0`` 10.76.N.2 <-> router ``r1`` 10.77.N.1 <-> exit ``v1`` 10.77.N.2 (the endpoint is
    unchanged; the client's own address changes). Yields the router namespace (closed on
    exit; the peer cannot go back to the direct link)."""
    n, prefix = peer.index, peer.ifname[: -len(f"{peer.index}wg")]
    router = Netns.create(f"{prefix}{n}r")
    try:
        v0, v1, r0, r1 = (f"{prefix}{n}{s}" for s in ("v0", "v1", "r0", "r1"))
        peer.client_ns.ip("link", "del", v0)  # (takes v1 with it)
        for a, ns_a, b, ns_b in ((v0, peer.client_ns, r0, router), (r1, router, v1, peer.ns)):
            subprocess.run(
                ["ip", "link", "add", a, "netns", ns_a.name, "type", "veth",
                 "peer", "name", b, "netns", ns_b.name],
                check=True, capture_output=True, timeout=20,
            )  # fmt: skip
        links = [
            (peer.client_ns, v0, f"10.76.{n}.1/30", f"fd00:76:{n}::1/64", 1500),
            (router, r0, f"10.76.{n}.2/30", f"fd00:76:{n}::2/64", 1500),
            (router, r1, f"10.77.{n}.1/30", f"fd00:77:{n}::1/64", mtu),
            (peer.ns, v1, f"10.77.{n}.2/30", f"fd00:77:{n}::2/64", mtu),
        ]
        for ns, ifname, v4, v6, link_mtu in links:
            ns.ip("link", "set", ifname, "mtu", str(link_mtu))
            ns.ip("addr", "add", v4, "dev", ifname)
            ns.ip("-6", "addr", "add", v6, "dev", ifname, "nodad")
            ns.ip("link", "set", ifname, "up")
        router.exec(["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
        peer.client_ns.ip("route", "add", f"10.77.{n}.0/30", "via", f"10.76.{n}.2")
        peer.client_ns.ip("-6", "route", "add", f"fd00:77:{n}::/64", "via", f"fd00:76:{n}::2")
        peer.ns.ip("route", "add", f"10.76.{n}.0/30", "via", f"10.77.{n}.1")
        peer.ns.ip("-6", "route", "add", f"fd00:76:{n}::/64", "via", f"fd00:77:{n}::1")
        for ns in (peer.client_ns, router, peer.ns):
            ns.settle()
        yield router
    finally:
        router.close()
