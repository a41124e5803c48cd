"""Path benchmark: our tunnel vs Linux TCP over wireguard-go through the same impairing relay.

Needs root (network namespaces) and wireguard-go; nginx (Debian ``nginx-light``) for a
native-speed HTTP server in the exit namespace, else it falls back to the harness's Python
server (fine for ``--smoke``, a cap for real numbers: the report says which one ran).

Layout (one exit peer of ``tests/harness``)::

    client_ns: curl ─ wireguard-go ─┐                       exit ns: wireguard-go ─ Linux TCP ─ nginx
                                    ├─► relay (own process) ──veth──► UDP 51820
    client_ns: this process (trio) ─┘   delay / loss / dup / reorder / bursty loss

Both clients send their WireGuard datagrams through the SAME relay (a separate process, so it
shares no GIL with our tunnel), to the same exit peer and server. Per scenario and round the
kernel path (curl over a wireguard-go interface in the client namespace) and our tunnel
(``open_tunnel`` + ``TunnelStream`` from this process) download and upload the same number
of bytes, alternating which goes first. Reported: medians over rounds and ours / Linux.

Before the scenarios (skip with ``--no-capacity``) it shows that neither the relay nor the
server is the cap: the server alone (curl inside the exit namespace), the relay alone (a UDP
blast through it, no tunnel), and the kernel path and our tunnel with and without the relay
at 0 ms. During every transfer it samples the relay's CPU use (a share near 100 % of one core
would mean the relay caps the run), and counts the datagrams the kernel dropped at full UDP
receive buffers in both namespaces (the relay's, each WireGuard end's): loss on top of the
relay's impairment, which a reader starved of CPU adds (the exit's wireguard-go during the
kernel path's uploads, typically). It also reports the machine's steal time per transfer (the
share of CPU time the hypervisor gave to other guests, from ``/proc/stat``): on a shared VM
it swings between rounds, and a round with much of it is not comparable with one without.
And the machine's idle time per transfer: near 0, every core was busy, and each path's speed
follows the CPU it costs the whole machine per byte, not only the client's.

    .venv/bin/python bench/bench_path.py                 # everything, 3 rounds (~15 min)
    .venv/bin/python bench/bench_path.py --smoke         # tiny sizes, one round, no timing
    .venv/bin/python bench/bench_path.py --scenarios rtt50,rtt100 --rounds 5 --scale 0.5
    .venv/bin/python bench/bench_path.py --ipv6          # both clients over IPv6 in the tunnel

``--ipv6``: both clients reach the server at its IPv6 tunnel address (the exit's
``fd00:78:N::1``; the kernel client is ``fd00:78:N::2``, ours ``fd00:78:N::3``), as a
dual-stack config does when the name resolves to AAAA first. The outer UDP stays IPv4.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import (
    Impairment,
    b64,
    exit_peer,
    generate_keypair,
    have_netns,
    wireguard_go_interface,
)
from harness.exitpeer import ExitPeer, wait_until
from harness.relay import RelayProcess
from mitm_wg.config import WireGuardConfig, format_endpoint
from mitm_wg.net.tcp import TcpConfig
from mitm_wg.runtime import open_tunnel
from mitm_wg.runtime import tunnel as tunnel_module

#: builds the tests/harness namespaces (tests/test_bench_smoke.py runs it where interop runs)
NEEDS_NETNS = True
MiB = 1 << 20
NGINX_PORT = 8080
#: ``--before-after``: our tunnel once more with the buffers fixed at their starting size
#: (1 MiB each way), i.e. without autotuning, as before issue 9.
FIXED_BUFFERS = TcpConfig(recv_buffer_max=1 << 20, send_buffer_max=1 << 20)
#: ``--before=``: what the "before" client of ``--before-after`` runs without: its TCP
#: config, its label, and its ``open_tunnel`` options
BEFORE: dict[str, tuple[TcpConfig | None, str, dict[str, Any]]] = {
    "autotune": (FIXED_BUFFERS, "fixed 1 MiB", {}),
    "rack": (TcpConfig(rack=False), "no RACK-TLP/PRR", {}),  # RFC 6675 DupThresh recovery
    # the congestion control before BBR and pacing: NewReno, whole windows at once
    "bbr": (TcpConfig(congestion="newreno", pacing=False), "NewReno, unpaced", {}),
    # without SACK (--server-sysctl net.ipv4.tcp_sack=0): NewReno's RTO restarted by every
    # partial ACK (TcpConfig.newreno_rto_restarts)
    "rto-every": (
        TcpConfig(newreno_rto_restarts=1 << 30),
        "RTO restarted by every partial ACK",
        {},
    ),
    # the receive buffer's cap before 5 December (4 MiB; now 8): the window a download 100 ms
    # or more away gets from a server whose send buffer is no cap
    "rcvcap": (TcpConfig(recv_buffer_max=4 << 20), "4 MiB receive cap", {}),
    # without receive coalescing (mitm_wg/runtime/readhold.py): every read waits for the socket
    "hold": (None, "no read hold", {"read_hold": False}),
    # a small buffer (--udp-buffer) received on one socket, not a group (sockgroup.py)
    "group": (None, "one UDP socket", {"grouped": False}),
    # BBR without its pacer: whole windows as the CPU produces them
    "pacing": (TcpConfig(pacing=False), "BBR unpaced", {}),
}
_before = BEFORE["autotune"]
#: ``--idle N``: idle connections our tunnel holds open during its transfers
_idle = 0


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str
    impairment: Impairment
    mib: int  # default transfer size: chosen so the kernel path runs roughly >= 5-10 s
    smoke_kib: int = 1024


def _scenarios() -> dict[str, Scenario]:
    def rtt(ms: float, **kw: Any) -> Impairment:
        return Impairment(delay=ms / 2000, **kw)  # half the RTT each way

    random_loss = {"loss": 0.02, "duplicate": 0.01, "reorder": 0.02, "reorder_gap": 3}
    out = [
        Scenario("rtt1", "1 ms RTT", rtt(1), 200),
        Scenario("rtt50", "50 ms RTT", rtt(50), 300, 512),
        Scenario("rtt100", "100 ms RTT", rtt(100), 200, 512),
        # the far end of where users' exits are (another continent)
        Scenario("rtt200", "200 ms RTT", rtt(200), 150, 512),
        Scenario(
            "random",
            "1 ms, 2% loss, 1% dup, 2% reorder",
            rtt(1, **random_loss),
            150,
        ),
        Scenario(
            "bursty",
            "1 ms, bursty loss 2% (mean burst 4)",
            Impairment.bursty(0.02, 4, delay=0.0005),
            150,
        ),
        Scenario(
            "random50",
            "50 ms, 2% loss, 1% dup, 2% reorder",
            rtt(50, **random_loss),
            40,
            256,
        ),
        Scenario(
            "bursty50",
            "50 ms, bursty loss 2% (mean burst 4)",
            Impairment.bursty(0.02, 4, delay=0.025),
            40,
            256,
        ),
        # a real path's bottleneck: 100 Mbit/s behind a drop-tail queue of one BDP (each
        # direction), 50 ms RTT: slow start overshoots into it, a loss-based sender fills it
        Scenario(
            "bneck50",
            "50 ms, 12.5 MB/s bottleneck, 1-BDP queue",
            rtt(50, rate=12.5e6, queue_bytes=625_000),
            100,
            512,
        ),
        # the same with 1 % random loss and 1 % reordering on top: a lossy Wi-Fi hop
        Scenario(
            "bnloss50",
            "50 ms, 12.5 MB/s bottleneck, 1% loss, 1% reorder",
            rtt(50, rate=12.5e6, queue_bytes=625_000, loss=0.01, reorder=0.01, reorder_gap=3),
            60,
            512,
        ),
        # a fast line (400 Mbit/s fibre) 50 ms away: arrivals paced at 50 MB/s, which a
        # small UDP socket buffer (--udp-buffer) must absorb through the tunnel's stalls
        Scenario(
            "fast50",
            "50 ms, 50 MB/s bottleneck, 1-BDP queue",
            rtt(50, rate=50e6, queue_bytes=2_500_000),
            200,
            512,
        ),
    ]
    return {s.name: s for s in out}


SCENARIOS = _scenarios()
DEFAULT_SCENARIOS = ["rtt1", "rtt50", "rtt100", "random", "bursty"]


# -- the HTTP server in the exit namespace ----------------------------------------------------


@dataclass
class Server:
    host: str
    port: int
    native: bool  # nginx (GET static sparse files, PUT via WebDAV) or the Python fallback
    www: Path | None = None

    def download_path(self, size: int) -> str:
        if not self.native:
            return f"/bytes/{size}"
        assert self.www is not None
        blob = self.www / f"blob-{size}"
        if not blob.exists():
            with open(blob, "wb") as f:
                f.truncate(size)  # sparse: reads as zeros, costs no memory
        return f"/{blob.name}"

    @property
    def upload_method(self) -> str:
        return "PUT" if self.native else "POST"

    def upload_path(self, tag: str) -> str:
        return f"/up/{tag}" if self.native else "/upload"

    def cleanup_uploads(self) -> None:
        if self.native and self.www is not None:
            for f in (self.www / "up").glob("*"):
                f.unlink(missing_ok=True)

    def url(self, path: str) -> str:
        return f"http://{format_endpoint((self.host, self.port))}{path}"


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx.err warn;
worker_rlimit_nofile {files};
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout {keepalive};
    keepalive_requests 100000;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {listen};
        root {www};
        location /up/ {{
            dav_methods PUT DELETE;
            create_full_put_path on;
            client_max_body_size 0;
            client_body_buffer_size 1m;
        }}
    }}
}}
"""


def nginx_room(idle: int, keepalive: int) -> dict[str, int]:
    """nginx.conf values (``connections``, ``files``, ``keepalive``) for a server that keeps
    ``idle`` connections open beside its work: nginx closes keep-alives early when fewer
    than 1/16 of its worker_connections are free, so room for twice as many, and they stay
    open for the whole run (an hour) when there are any; else ``keepalive`` seconds."""
    connections = 64 + 2 * idle
    return {
        "connections": connections,
        "files": 2 * connections,
        "keepalive": 3600 if idle else keepalive,
    }


@contextlib.contextmanager
def http_server(peer: ExitPeer, host: str, force_python: bool) -> Iterator[Server]:
    """nginx on ``host`` (one of the exit's tunnel addresses), NGINX_PORT, in the exit
    namespace (files on tmpfs), else the harness server (listening on every tunnel address)."""
    nginx = shutil.which("nginx")
    if force_python or nginx is None:
        if nginx is None:
            print("nginx not found (apt-get install nginx-light): using the Python server")
        yield Server(host, peer.http_port, native=False)
        return
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    tmp = Path(tempfile.mkdtemp(prefix="mwg-bench-path-", dir=shm))
    try:
        www = tmp / "www"
        (www / "up").mkdir(parents=True)
        (www / "index.html").write_text("hello\n")
        conf = tmp / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                dir=tmp,
                listen=format_endpoint((host, NGINX_PORT)),
                www=www,
                **nginx_room(_idle, keepalive=10),
            )
        )
        log = open(tmp / "nginx.out", "wb")
        proc = peer.ns.popen([nginx, "-p", str(tmp), "-c", str(conf)], stdout=log, stderr=log)
        server = Server(host, NGINX_PORT, native=True, www=www)

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {(tmp / 'nginx.out').read_text()[-800:]}")
            r = peer.ns.exec(
                ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", server.url("/")],
                check=False,
            )
            return r.stdout == "200"

        try:
            wait_until(up, 15, "nginx in the exit namespace", interval=0.1)
            yield server
        finally:
            peer.ns.kill(proc)
            log.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- one transfer each way --------------------------------------------------------------------


@dataclass
class Transfer:
    mbps: float
    relay_cpu: float | None = None  # relay CPU seconds / wall seconds during the transfer
    #: datagrams the kernel dropped at a full UDP receive buffer during the transfer, in the
    #: exit's namespace and in the client's (the relay, the clients): loss on top of the
    #: relay's impairment that a reader starved of CPU adds, for either path
    udp_drops: tuple[int, int] = (0, 0)
    #: our tunnel only: CPU seconds of this process (the tunnel's whole data path) per MiB
    #: moved, a steadier measure of the per-packet work than MB/s on a shared machine
    cpu_per_mib: float | None = None
    #: the exit namespace's TCP counters during the transfer (:data:`EXIT_TCP_COUNTERS`):
    #: how the Linux server's TCP fared with this client (its retransmissions, the D-SACKs
    #: it got, the cwnd reductions it undid)
    exit_tcp: dict[str, int] = field(default_factory=dict)
    #: share of the machine's CPU time the hypervisor gave to other guests during the
    #: transfer (:func:`steal_since`): a run with much of it is not comparable with one
    #: without, whichever path it measured
    steal: float | None = None
    #: share of the machine's CPU time left idle during the transfer (:func:`idle_since`)
    idle: float | None = None
    #: our tunnel only: shares of the transfer's wall time its thread (the trio thread,
    #: which runs the whole data path) spent on a CPU and runnable but waiting for one
    #: (:func:`thread_shares`); together near 1, it was CPU-bound whatever the pacer or
    #: the windows said
    thread: tuple[float, float] | None = None
    #: our tunnel only: our socket's :data:`OUR_TCP_COUNTERS` for the transfer, and the
    #: shares of it our thread slept for each of :data:`SLEEP_REASONS` (``asleep_*``, %)
    ours_tcp: dict[str, int] = field(default_factory=dict)


def cpu_ticks() -> tuple[int, int, int] | None:
    """(steal, idle, all) CPU time of the machine so far, in clock ticks (``/proc/stat``,
    the aggregate ``cpu`` line: user, nice, system, idle, iowait, irq, softirq, steal; guest
    time is inside user; idle counts iowait too); None where there is no such file."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]
    return ticks[7], ticks[3] + ticks[4], sum(ticks)


def _ticks_share(before: tuple[int, int, int] | None, which: int) -> float | None:
    after = cpu_ticks()
    if before is None or after is None or after[2] <= before[2]:
        return None
    return (after[which] - before[which]) / (after[2] - before[2])


def steal_since(before: tuple[int, int, int] | None) -> float | None:
    """Share of the machine's CPU time since ``before`` (:func:`cpu_ticks`) that the
    hypervisor gave to other guests."""
    return _ticks_share(before, 0)


def idle_since(before: tuple[int, int, int] | None) -> float | None:
    """Share of the machine's CPU time since ``before`` (:func:`cpu_ticks`) that no process
    wanted: near 0, every core was busy and a path's speed follows the CPU it costs the
    whole machine per byte (the relay, both WireGuard ends, TCP, the server, the client)."""
    return _ticks_share(before, 1)


def thread_sched() -> tuple[int, int] | None:
    """(on a CPU, runnable but waiting for a CPU) of the calling thread so far, in ns
    (``/proc/thread-self/schedstat``); None where there is no such file."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            fields = f.read().split()
    except OSError:
        return None
    if len(fields) < 2:
        return None
    return int(fields[0]), int(fields[1])


def thread_shares(before: tuple[int, int] | None, seconds: float) -> tuple[float, float] | None:
    """Shares of ``seconds`` of wall time since ``before`` (:func:`thread_sched`) the
    calling thread spent on a CPU and waiting in a run queue for one."""
    after = thread_sched()
    if before is None or after is None or seconds <= 0:
        return None
    return (after[0] - before[0]) / 1e9 / seconds, (after[1] - before[1]) / 1e9 / seconds


#: why our trio thread slept (TcpSocket.send_limit of the transfer's socket at each of the
#: runtime's I/O waits), reported as shares of the transfer's time; "" (it would have sent:
#: waiting for something else, e.g. the application task) is reported as "other"
SLEEP_REASONS = ("pacer", "cwnd", "rwnd", "sndbuf", "app", "idle", "")


class SleepReasons(trio.abc.Instrument):
    """A trio instrument: the wall time of each I/O wait the run loop makes with a timeout
    (it sleeps: no task is runnable), by what held the socket's sender back as it went to
    sleep. Set :attr:`sock` to the socket to watch."""

    def __init__(self) -> None:
        self.sock: Any = None
        self.asleep = dict.fromkeys(SLEEP_REASONS, 0.0)
        self._why: str | None = None
        self._t0 = 0.0

    def before_io_wait(self, timeout: float) -> None:
        self._why = None
        if timeout > 0 and self.sock is not None:
            self._why = self.sock.send_limit()
            self._t0 = time.perf_counter()

    def after_io_wait(self, timeout: float) -> None:
        if self._why is not None:
            self.asleep[self._why] += time.perf_counter() - self._t0

    def shares(self, seconds: float) -> dict[str, int]:
        """Percent of ``seconds`` asleep for each reason, as ``asleep_<reason>`` counters."""
        return {
            f"asleep_{why or 'other'}": round(100 * t / seconds) if seconds > 0 else 0
            for why, t in self.asleep.items()
        }


def _counters(peer: ExitPeer, relay: RelayProcess | None) -> tuple:
    """What a transfer's report compares before and after it (:func:`_transfer`)."""
    return _udp_drops(peer), _exit_tcp(peer), cpu_ticks(), _cpu(relay), time.perf_counter()


def _transfer(
    peer: ExitPeer,
    relay: RelayProcess | None,
    before: tuple,
    mbps: float,
    cpu_per_mib: float | None = None,
    thread: tuple[float, float] | None = None,
    ours_tcp: dict[str, int] | None = None,
) -> Transfer:
    """The :class:`Transfer` of a run that started at ``before`` (:func:`_counters`)."""
    drops0, tcp0, ticks0, cpu0, t0 = before
    share = _share(relay, cpu0, t0)
    steal, idle = steal_since(ticks0), idle_since(ticks0)
    drops = _drops_since(peer, drops0)
    tcp = _exit_tcp_since(peer, tcp0)
    return Transfer(mbps, share, drops, cpu_per_mib, tcp, steal, idle, thread, ours_tcp or {})


def _curl(ns: Any, server: Server, size: int, upload: bool, body: Path | None) -> float:
    """One curl transfer in ``ns``; returns MB/s from curl's own total time."""
    timeout = 60 + size / 250_000  # generous: a stalled run fails instead of hanging
    argv = ["curl", "-sS", "--noproxy", "*", "-m", str(int(timeout)), "-o", "/dev/null"]
    argv += ["-w", "%{http_code} %{size_download} %{size_upload} %{time_total}"]
    if upload:
        assert body is not None
        argv += ["-T", str(body), "-X", server.upload_method, "-H", "Expect:"]
        argv.append(server.url(server.upload_path("kernel")))
    else:
        argv.append(server.url(server.download_path(size)))
    r = ns.exec(argv, timeout=timeout + 10)
    code, down, up, total = r.stdout.split()
    if upload:
        ok = code in ("200", "201", "204") and int(float(up)) == size
    else:
        ok = code == "200" and int(float(down)) == size
    if not ok:
        raise RuntimeError(f"curl transfer failed: {r.stdout!r} {r.stderr!r}")
    return size / float(total) / 1e6


#: our socket's counters (mitm_wg.net.tcp.TcpStats) reported per transfer: the segments it
#: took in and sent, the pure ACKs a newer one of the same batch stood in for (ACK
#: coalescing), the segments it retransmitted, the D-SACK blocks it got, and what sent them
#: again: tail loss probes, probes in recovery, timeouts, retransmissions found lost again
OUR_TCP_COUNTERS = (
    "segments_in",
    "segments_out",
    "acks_coalesced",
    "retransmits",
    "dsacks",
    "tlp_probes",
    "recovery_probes",
    "rto_expired",
    "lost_retransmits",
)
#: our tunnel's counters per transfer: its reader's wake-ups, and those after a read hold
OUR_TUNNEL_COUNTERS = ("reads", "read_holds", "group_merges")


async def _ours_one(
    tunnel: Any,
    server: Server,
    size: int,
    upload: bool,
    counters: dict[str, int] | None = None,
    sleeps: SleepReasons | None = None,
) -> float:
    """One transfer through our tunnel; returns MB/s. ``counters``: filled with the
    socket's :data:`OUR_TCP_COUNTERS` at the end; ``sleeps``: set to watch its socket."""
    start = time.perf_counter()
    stream = await tunnel.open_tcp_stream(server.host, server.port)
    if sleeps is not None:
        sleeps.sock = stream.socket
    try:
        if upload:
            head = (
                f"{server.upload_method} {server.upload_path('ours')} HTTP/1.1\r\n"
                f"Host: x\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
            )
            await stream.send_all(head.encode())
            chunk = memoryview(bytes(MiB))
            left = size
            while left:
                n = min(left, MiB)
                await stream.send_all(chunk[:n])
                left -= n
        else:
            path = server.download_path(size)
            request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            await stream.send_all(request.encode())
        head_buf = b""
        body = 0
        while data := await stream.receive_some(1 << 20):
            if body == 0 and b"\r\n\r\n" not in head_buf:
                head_buf += data
                if b"\r\n\r\n" in head_buf:
                    body = len(head_buf) - head_buf.index(b"\r\n\r\n") - 4
            else:
                body += len(data)
        elapsed = time.perf_counter() - start
    finally:
        if counters is not None:
            stats = stream.socket.stats
            counters.update({name: getattr(stats, name) for name in OUR_TCP_COUNTERS})
        await stream.aclose()
    status = head_buf.split(b" ", 2)[1] if head_buf.count(b" ") >= 2 else b"?"
    if upload:
        if status not in (b"200", b"201", b"204"):
            raise RuntimeError(f"upload answered {head_buf[:200]!r}")
    elif status != b"200" or body != size:
        raise RuntimeError(f"download got {body} of {size} bytes: {head_buf[:200]!r}")
    return size / elapsed / 1e6


async def _hold_idle(
    tunnel: Any, server: Server, n: int, nursery: trio.Nursery, closed: list[int]
) -> None:
    """``--idle``: ``n`` keep-alive connections to the server, each used once (a tiny GET)
    and then left open with a task waiting in ``receive_some``, as mitmproxy reads every
    upstream connection it keeps. A connection the server closes is counted in
    ``closed``."""
    path = server.download_path(1)
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()

    async def wait(stream: Any) -> None:
        try:
            while await stream.receive_some():
                pass
            closed.append(1)
        finally:
            await stream.aclose()

    for _ in range(n):
        stream = await tunnel.open_tcp_stream(server.host, server.port)
        await stream.send_all(request)
        got = b""
        while not (b"\r\n\r\n" in got and len(got) >= got.index(b"\r\n\r\n") + 5):
            data = await stream.receive_some()
            if not data:
                raise RuntimeError(f"idle connection closed before its response: {got!r}")
            got += data
        nursery.start_soon(wait, stream)


def _client_socket_factory(peer: ExitPeer, grouped: bool = True) -> Any:
    """Our tunnel's UDP sockets, in the client's namespace; ``grouped``: a small buffer
    (--udp-buffer) makes a receive group there, as with the default sockets."""

    def unbound(family: int) -> socket.socket:
        return peer.client_ns.socket(family, socket.SOCK_DGRAM)

    def factory(family: int) -> socket.socket:
        sock = unbound(family)
        sock.bind(("0.0.0.0", 0))
        return sock

    if grouped:
        factory.unbound = unbound  # type: ignore[attr-defined]
    return factory


@dataclass
class Clients:
    """The two clients. Ours has its own key and tunnel address (10.78.N.3, and
    fd00:78:N::3 when the exit has IPv6 in the tunnel), added to the exit as a second peer,
    so the two clients never take the exit's session and endpoint from each other between
    runs. With IPv6 both clients are dual-stack (both addresses, both tunnel prefixes), as a
    user's config is: which family a connection uses is the server address's."""

    peer: ExitPeer
    ours_private: bytes
    ours_address: str
    ours_address_v6: str | None = None

    @classmethod
    @contextlib.contextmanager
    def start(cls, peer: ExitPeer) -> Iterator[Clients]:
        private, public = generate_keypair()
        address = f"10.78.{peer.index}.3"
        allowed = f"{address}/32"
        address_v6 = None
        if peer.tunnel_v6_net is not None:
            address_v6 = f"fd00:78:{peer.index}::3"  # the kernel client is ::2
            allowed += f",{address_v6}/128"
        peer.ns.exec(["wg", "set", peer.ifname, "peer", b64(public), "allowed-ips", allowed])
        conf = peer.client_config_text(dns=False)
        with wireguard_go_interface(peer.client_ns, peer.client_ifname, conf, peer.workdir):
            yield cls(peer, private, address, address_v6)

    def ours_config(self, endpoint: tuple[str, int]) -> WireGuardConfig:
        addresses = f"{self.ours_address}/32"
        allowed = self.peer.tunnel_v4_net
        if self.ours_address_v6 is not None:
            addresses += f", {self.ours_address_v6}/128"
            allowed += f", {self.peer.tunnel_v6_net}"
        return WireGuardConfig.parse(
            "[Interface]\n"
            f"PrivateKey = {b64(self.ours_private)}\n"
            f"Address = {addresses}\n\n"
            "[Peer]\n"
            f"PublicKey = {b64(self.peer.server_public_key)}\n"
            f"AllowedIPs = {allowed}\n"
            f"Endpoint = {format_endpoint(endpoint)}\n"
        )

    def point_kernel_at(self, endpoint: tuple[str, int]) -> None:
        """Send the kernel client's datagrams to ``endpoint`` (a relay, or the exit itself)."""
        key = b64(self.peer.server_public_key)
        ep = format_endpoint(endpoint)
        self.peer.client_ns.exec(
            ["wg", "set", self.peer.client_ifname, "peer", key, "endpoint", ep]
        )


def run_ours(
    clients: Clients,
    server: Server,
    endpoint: tuple[str, int],
    jobs: list[tuple[int, bool]],
    relay: RelayProcess | None,
    tcp_config: TcpConfig | None = None,
    tunnel_options: dict[str, Any] | None = None,
) -> list[Transfer]:
    """Our tunnel: one session, a warm-up connection (handshake), then each (size, upload);
    ``tunnel_options``: more ``open_tunnel`` arguments."""
    peer = clients.peer
    config = clients.ours_config(endpoint)
    tunnel_options = dict(tunnel_options or {})
    factory = _client_socket_factory(peer, grouped=tunnel_options.pop("grouped", True))

    async def session() -> list[Transfer]:
        out = []
        # The warm-up's handshake goes through the impaired relay: under 2 % loss an
        # initiation or its response is lost 4 % of the time, so it may take a few
        # attempts (one per 5 s) where a user's 10 s would give up after two
        async with open_tunnel(
            config,
            socket_factory=factory,
            tcp_config=tcp_config,
            handshake_timeout=25.0,
            **(tunnel_options or {}),
        ) as tunnel:
            with trio.fail_after(30):
                warm = await tunnel.open_tcp_stream(server.host, server.port)
                await warm.aclose()
            async with trio.open_nursery() as idle:
                closed: list[int] = []
                if _idle:
                    with trio.fail_after(60 + _idle / 10):
                        await _hold_idle(tunnel, server, _idle, idle, closed)
                out += await _ours_jobs(tunnel, jobs)
                idle.cancel_scope.cancel()
            if closed:
                print(f"  ({len(closed)} of the {_idle} idle connections were closed)")
        return out

    async def _ours_jobs(tunnel: Any, jobs: list[tuple[int, bool]]) -> list[Transfer]:
        out = []
        for size, upload in jobs:
            before = _counters(peer, relay)
            own0 = time.process_time()
            sched0, wall0 = thread_sched(), time.perf_counter()
            counters: dict[str, int] = {}
            tunnel0 = {name: getattr(tunnel, name) for name in OUR_TUNNEL_COUNTERS}
            sleeps = SleepReasons()
            trio.lowlevel.add_instrument(sleeps)
            try:
                with trio.fail_after(60 + size / 250_000):
                    mbps = await _ours_one(tunnel, server, size, upload, counters, sleeps)
            except Exception as e:  # one failed transfer must not end the whole run
                _failed("mitm-wg", upload, e)
                mbps = math.nan
            finally:
                trio.lowlevel.remove_instrument(sleeps)
            own = (time.process_time() - own0) / (size / MiB)
            counters.update({k: getattr(tunnel, k) - v for k, v in tunnel0.items()})
            wall = time.perf_counter() - wall0
            thread = thread_shares(sched0, wall)
            counters.update(sleeps.shares(wall))
            out.append(_transfer(peer, relay, before, mbps, own, thread, counters))
            server.cleanup_uploads()
        return out

    return trio.run(session)


def run_kernel(
    clients: Clients,
    server: Server,
    endpoint: tuple[str, int],
    jobs: list[tuple[int, bool]],
    relay: RelayProcess | None,
) -> list[Transfer]:
    """Linux TCP over the wireguard-go interface in the client namespace (curl)."""
    peer = clients.peer
    clients.point_kernel_at(endpoint)
    out = []
    # the tunnel is up before timing starts (a handshake if needed), as for ours
    warm = ["curl", "-sS", "--noproxy", "*", "-m", "30", "-o", "/dev/null", server.url("/")]
    peer.client_ns.exec(warm, timeout=40)
    for size, upload in jobs:
        body = _body_file(peer, server, size) if upload else None
        before = _counters(peer, relay)
        try:
            mbps = _curl(peer.client_ns, server, size, upload, body)
        except (subprocess.SubprocessError, RuntimeError, ValueError) as e:
            _failed("Linux TCP", upload, e)
            mbps = math.nan
        out.append(_transfer(peer, relay, before, mbps))
        server.cleanup_uploads()
    return out


def _failed(who: str, upload: bool, error: BaseException) -> None:
    """Report a failed transfer (it counts as NaN, left out of the medians)."""
    detail = getattr(error, "stderr", None) or error
    print(f"  ! {who} {'upload' if upload else 'download'} failed: {str(detail).strip()[:300]}")


def _body_file(peer: ExitPeer, server: Server, size: int) -> Path:
    body = peer.workdir / f"body-{size}"
    if not body.exists():
        with open(body, "wb") as f:
            f.truncate(size)  # sparse zeros
    return body


def _proc_net(ns: Any) -> dict[str, int]:
    """The namespace's network counters (``/proc/net`` belongs to the reader's namespace):
    ``Kind:Name`` from the two-line tables of ``snmp`` and ``netstat`` (``Udp:RcvbufErrors``,
    ``TcpExt:TCPDSACKRecv``), ``Name`` from ``snmp6``'s lines (``Udp6RcvbufErrors``)."""
    files = ["/proc/net/snmp", "/proc/net/netstat", "/proc/net/snmp6"]
    lines = ns.exec(["cat", *files]).stdout.splitlines()
    out: dict[str, int] = {}
    for head, values in itertools.pairwise(lines):
        kind = head.split(" ", 1)[0]
        if kind.endswith(":") and values.startswith(kind + " "):  # a table: names, values
            for name, value in zip(head.split()[1:], values.split()[1:], strict=True):
                out[kind + name] = int(value)
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and not parts[0].endswith(":"):  # snmp6: one name and value
            out[parts[0]] = int(parts[1])
    return out


def _udp_drops(peer: ExitPeer) -> tuple[int, int]:
    """UDP datagrams dropped at full receive buffers so far (RcvbufErrors, IPv4 + IPv6): in
    the exit's namespace (its wireguard-go) and in the client's (the relay, the kernel
    client's wireguard-go, our tunnel)."""
    counts = []
    for ns in (peer.ns, peer.client_ns):
        c = _proc_net(ns)
        counts.append(c.get("Udp:RcvbufErrors", 0) + c.get("Udp6RcvbufErrors", 0))
    return counts[0], counts[1]


def _drops_since(peer: ExitPeer, before: tuple[int, int]) -> tuple[int, int]:
    after = _udp_drops(peer)
    return after[0] - before[0], after[1] - before[1]


#: the exit's TCP counters a transfer reports, with short names: segments the server
#: retransmitted, D-SACK blocks it received, spurious cwnd reductions it undid (DSACK, loss
#: or timestamp based), reordering it detected from SACK
EXIT_TCP_COUNTERS = {
    "Tcp:RetransSegs": "rtx",
    "TcpExt:TCPDSACKRecv": "dsack",
    "TcpExt:TCPDSACKOfoRecv": "dsack",
    "TcpExt:TCPDSACKUndo": "undo",
    "TcpExt:TCPLossUndo": "undo",
    "TcpExt:TCPPartialUndo": "undo",
    "TcpExt:TCPFullUndo": "undo",
    "TcpExt:TCPSACKReorder": "reord",
}


#: the client namespace's TCP counters (the kernel client's TCP; our tunnel's TCP is in
#: our process, its socket counts the same as ``retransmits`` and ``dsacks``), reported for
#: the Linux client beside ours: segments it retransmitted, D-SACK blocks it received
CLIENT_TCP_COUNTERS = {
    "Tcp:RetransSegs": "client_rtx",
    "TcpExt:TCPDSACKRecv": "client_dsack",
    "TcpExt:TCPDSACKOfoRecv": "client_dsack",
}
#: the :data:`CLIENT_TCP_COUNTERS` short names and our socket's counters that match them
CLIENT_OURS = {"client_rtx": "retransmits", "client_dsack": "dsacks"}


def _exit_tcp(peer: ExitPeer) -> dict[str, int]:
    """The exit namespace's :data:`EXIT_TCP_COUNTERS` so far, summed by short name, and the
    client namespace's :data:`CLIENT_TCP_COUNTERS`."""
    out = dict.fromkeys([*EXIT_TCP_COUNTERS.values(), *CLIENT_TCP_COUNTERS.values()], 0)
    for ns, names in ((peer.ns, EXIT_TCP_COUNTERS), (peer.client_ns, CLIENT_TCP_COUNTERS)):
        c = _proc_net(ns)
        for name, short in names.items():
            out[short] += c.get(name, 0)
    return out


def _exit_tcp_since(peer: ExitPeer, before: dict[str, int]) -> dict[str, int]:
    after = _exit_tcp(peer)
    return {k: after[k] - before[k] for k in after}


def _cpu(relay: RelayProcess | None) -> float:
    return relay.cpu_seconds() if relay is not None else 0.0


def _share(relay: RelayProcess | None, cpu0: float, t0: float) -> float | None:
    if relay is None:
        return None
    return (relay.cpu_seconds() - cpu0) / max(time.perf_counter() - t0, 1e-9)


# -- capacity checks ----------------------------------------------------------------------------

_SINK = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
s.settimeout(2.0)
n = 0; first = last = 0.0; nbytes = 0
while True:
    try:
        d = s.recv(65535)
    except TimeoutError:
        if n:
            break
        continue
    last = time.monotonic()
    if not n:
        first = last
    n += 1; nbytes += len(d)
print(n, nbytes, last - first, flush=True)
"""


def relay_blast(count: int, delay: float) -> dict[str, float]:
    """Blast ``count`` 1452-byte datagrams (a full WireGuard data packet) through a relay
    process on loopback as fast as one Python sender can; the sink (another process) reports
    what came out and over what time. The sender, relay and sink share the machine's cores,
    so this is a lower bound of the relay's capacity."""
    sink = subprocess.Popen(
        [sys.executable, "-c", _SINK], stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL
    )
    try:
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        with RelayProcess(("127.0.0.1", port), impairment=Impairment(delay=delay)) as relay:
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
            payload = bytes(1452)
            dest = relay.address
            cpu0, t0 = relay.cpu_seconds(), time.perf_counter()
            for i in range(count):
                try:
                    tx.sendto(payload, dest)
                except OSError:
                    pass
                if i % 64 == 63:
                    time.sleep(0)  # let the relay run between small bursts
            send_time = time.perf_counter() - t0
            out, _ = sink.communicate(timeout=60)
            cpu = relay.cpu_seconds() - cpu0
            tx.close()
        n, nbytes, span = out.split()
        return {
            "sent": count,
            "forwarded": int(n),
            "sender_mbps": count * 1452 / send_time / 1e6,
            "mbps": int(nbytes) / max(float(span), 1e-9) / 1e6,
            "kpps": int(n) / max(float(span), 1e-9) / 1e3,
            "relay_cpu_s": cpu,
            "relay_us_per_datagram": cpu / max(int(n), 1) * 1e6,
        }
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()


def server_alone(peer: ExitPeer, server: Server, size: int) -> dict[str, float]:
    """The HTTP server's own speed: curl inside the exit namespace (no tunnel, no relay)."""
    down = _curl(peer.ns, server, size, False, None)
    body = _body_file(peer, server, size)
    up = _curl(peer.ns, server, size, True, body)
    server.cleanup_uploads()
    return {"down": down, "up": up}


# -- the report ---------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    direction: str
    size: int
    kernel: list[Transfer] = field(default_factory=list)
    ours: list[Transfer] = field(default_factory=list)
    fixed: list[Transfer] = field(default_factory=list)  # ours without buffer autotuning

    def med(self, which: str) -> float:
        """Median of the runs that completed (failed ones are NaN)."""
        runs = [t.mbps for t in getattr(self, which) if not math.isnan(t.mbps)]
        return statistics.median(runs) if runs else math.nan

    def own_cpu(self, which: str = "ours") -> float:
        """Median CPU seconds per MiB of our tunnel's completed runs (``which``: "ours", or
        "fixed" for ``--before-after``'s client)."""
        ts = getattr(self, which)
        runs = [t.cpu_per_mib for t in ts if t.cpu_per_mib and not math.isnan(t.mbps)]
        return statistics.median(runs) if runs else math.nan

    def relay_cpu(self) -> float:
        every = self.kernel + self.ours + self.fixed
        shares = [t.relay_cpu for t in every if t.relay_cpu is not None]
        return max(shares) if shares else math.nan


def _fmt_size(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // 1024} KiB"


def _fmt_runs(ts: list[Transfer]) -> str:
    return ", ".join(f"{t.mbps:.1f}" for t in ts)


def _fmt_share(ts: list[Transfer], which: str) -> str:
    shares = (getattr(t, which) for t in ts)
    return ", ".join("-" if v is None else f"{v * 100:.0f}" for v in shares)


def _fmt_thread(ts: list[Transfer]) -> str:
    cells = (t.thread for t in ts)
    return ", ".join("-" if c is None else f"{c[0] * 100:.0f}+{c[1] * 100:.0f}" for c in cells)


def _fmt_drops(ts: list[Transfer]) -> str:
    return ", ".join(f"{t.udp_drops[0]}+{t.udp_drops[1]}" for t in ts)


def print_table(rows: list[Row], title: str) -> None:
    fixed = any(r.fixed for r in rows)
    print(f"\n### {title}\n")
    head = "| path | dir | size | Linux TCP MB/s | mitm-wg MB/s | ratio |"
    line = "|---|---|---:|---:|---:|---:|"
    if fixed:
        head += f" {_before[1]} MB/s | ratio |"
        line += "---:|---:|"
    # per-client columns: one cell each, "Linux / ours" (" / fixed" with --before-after)
    per_client: list[tuple[str, Callable[[list[Transfer]], str]]] = [
        ("UDP buffer drops exit+client,", _fmt_drops),
        ("runs", _fmt_runs),
        ("steal %", lambda ts: _fmt_share(ts, "steal")),
        ("idle %", lambda ts: _fmt_share(ts, "idle")),
    ]
    tail = " / fixed" if fixed else ""
    columns = "".join(f" {name} Linux / ours{tail} |" for name, _ in per_client)
    print(
        f"{head} relay CPU | our CPU ms/MiB (ours{tail}) | our thread on a CPU + waiting for"
        f" one % |{columns}"
    )
    print(line + "---:|---:|---|" + "---|" * len(per_client))
    for r in rows:
        k, o = r.med("kernel"), r.med("ours")
        cpu = r.relay_cpu()
        cpu_s = "-" if math.isnan(cpu) else f"{cpu * 100:.0f}%"
        size = _fmt_size(r.size)
        cells = f"| {r.label} | {r.direction} | {size} | {k:.1f} | {o:.1f} | {o / k:.2f} |"
        clients = [r.kernel, r.ours]
        if fixed:
            f = r.med("fixed")
            cells += f" {f:.1f} | {f / k:.2f} |"
            clients.append(r.fixed)
        owns = [r.own_cpu(which) * 1000 for which in (("ours", "fixed") if fixed else ("ours",))]
        own_s = " / ".join("-" if math.isnan(own) else f"{own:.1f}" for own in owns)
        rest = "".join(f" {' / '.join(fmt(ts) for ts in clients)} |" for _, fmt in per_client)
        print(f"{cells} {cpu_s} | {own_s} | {_fmt_thread(r.ours)} |{rest}")
    print("\nThe exit's TCP per transfer (medians), Linux client / ours:", end="")
    for r in rows:
        cells = []
        for short in dict.fromkeys(EXIT_TCP_COUNTERS.values()):
            k = _median_counter(r.kernel, short)
            o = _median_counter(r.ours, short)
            cells.append(f"{short} {k} / {o}")
        print(f"\n- {r.label} {r.direction}: " + ", ".join(cells), end="")
    print("\nThe client's TCP per transfer (medians), Linux client / ours:", end="")
    for r in rows:
        cells = []
        for short, ours_name in CLIENT_OURS.items():
            k = _median_counter(r.kernel, short)
            o = _median_of([t.ours_tcp[ours_name] for t in r.ours if ours_name in t.ours_tcp])
            cells.append(f"{short.removeprefix('client_')} {k} / {o}")
        print(f"\n- {r.label} {r.direction}: " + ", ".join(cells), end="")
    ours_sections = (
        (
            "Our socket, and our tunnel's reader, per transfer (medians):",
            {name: name for name in OUR_TCP_COUNTERS + OUR_TUNNEL_COUNTERS},
        ),
        (
            "Our thread asleep, by what held our sender (medians, % of the transfer):",
            {f"asleep_{why or 'other'}": why or "other" for why in SLEEP_REASONS},
        ),
    )
    for title, labels in ours_sections:  # our socket's counters (Transfer.ours_tcp)
        print(f"\n{title}", end="")
        for r in rows:
            cells = [
                f"{label} {_median_of([t.ours_tcp[key] for t in r.ours if key in t.ours_tcp])}"
                for key, label in labels.items()
            ]
            print(f"\n- {r.label} {r.direction}: " + ", ".join(cells), end="")
    print()
    sys.stdout.flush()


def _median_counter(ts: list[Transfer], short: str) -> str:
    return _median_of([t.exit_tcp[short] for t in ts if t.exit_tcp])


def _median_of(values: list[int]) -> str:
    return f"{statistics.median(values):g}" if values else "-"


def _jobs(size: int, directions: list[str]) -> list[tuple[int, bool]]:
    return [(size, d == "up") for d in directions]


def measure(
    clients: Clients,
    server: Server,
    label: str,
    endpoint_of: Any,
    size: int,
    directions: list[str],
    rounds: int,
    relay: RelayProcess | None,
    before_after: bool = False,
) -> list[Row]:
    rows = [Row(label, d, size) for d in directions]
    jobs = _jobs(size, directions)
    variants = ["kernel", "ours", "fixed"] if before_after else ["kernel", "ours"]
    for rnd in range(rounds):
        k = rnd % len(variants)
        for which in variants[k:] + variants[:k]:  # rotate who goes first
            if which == "kernel":
                results = run_kernel(clients, server, endpoint_of(), jobs, relay)
            else:
                cfg, _, options = _before if which == "fixed" else (None, "", {})
                results = run_ours(clients, server, endpoint_of(), jobs, relay, cfg, options)
            for row, t in zip(rows, results, strict=True):
                getattr(row, which).append(t)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Our tunnel vs Linux TCP over wireguard-go through one impairing relay."
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one round, no timing claims")
    p.add_argument("--rounds", type=int, default=3, help="rounds per scenario (median)")
    p.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma-separated, from {', '.join(SCENARIOS)}",
    )
    p.add_argument("--directions", default="down,up", help="down, up or both")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every transfer size")
    p.add_argument("--seed", type=int, default=1, help="relay seed (same for both paths)")
    p.add_argument("--no-capacity", action="store_true", help="skip the capacity checks")
    p.add_argument("--only-capacity", action="store_true", help="run only the capacity checks")
    p.add_argument("--python-server", action="store_true", help="don't use nginx")
    p.add_argument(
        "--ipv6",
        action="store_true",
        help="both clients talk to the server over IPv6 inside the tunnel (outer UDP stays IPv4)",
    )
    p.add_argument(
        "--before-after",
        action="store_true",
        help="also run our tunnel with fixed 1 MiB buffers (no autotuning) side by side",
    )
    p.add_argument(
        "--before",
        choices=sorted(BEFORE),
        default="autotune",
        help="what --before-after's third client goes without: buffer autotuning (fixed"
        " 1 MiB buffers), rack (RFC 6675 recovery instead of RACK-TLP and PRR), bbr"
        " (NewReno without pacing instead of BBR with pacing), rto-every"
        " (without SACK: NewReno's RTO restarted by every partial ACK), hold"
        " (without receive coalescing: every read waits for the socket), or rcvcap"
        " (the receive buffer capped at 4 MiB, as before 5 December), or group (with"
        " --udp-buffer: one UDP socket, not a receive group)",
    )
    p.add_argument(
        "--idle",
        type=int,
        default=0,
        metavar="N",
        help="our tunnel holds N idle keep-alive connections to the server open during its"
        " transfers, each with a task reading it (as mitmproxy does); the kernel client none",
    )
    p.add_argument(
        "--server-sysctl",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a sysctl in the exit's namespace (the server's TCP), e.g."
        " net.ipv4.tcp_timestamps=0 for a server without timestamps (Windows' default);"
        " both clients face the same server; repeatable",
    )
    p.add_argument(
        "--udp-buffer",
        type=int,
        metavar="BYTES",
        help="our tunnel gets the UDP socket buffers an unprivileged process gets where"
        " net.core.rmem_max and wmem_max are BYTES (e.g. 212992: a stock kernel's; the"
        " kernel doubles the ask) instead of asking for"
        f" {tunnel_module.UDP_BUFFER_BYTES}; wireguard-go, run as root, still forces its"
        " own, and the kernel client is unchanged",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.udp_buffer is not None:
        tunnel_module.BUFFER_LIMIT = args.udp_buffer
    for item in args.server_sysctl:
        if "=" not in item or not item.startswith("net."):
            p.error(f"--server-sysctl takes net.KEY=VALUE, not {item!r}")
    global _before, _idle
    _before = BEFORE[args.before]
    _idle = args.idle

    ok, why = have_netns()
    if not ok:
        print(f"bench_path needs network namespaces and wireguard-go: {why}", file=sys.stderr)
        return 2
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    directions = [d.strip() for d in args.directions.split(",") if d.strip()]
    if not directions or any(d not in ("down", "up") for d in directions):
        p.error("--directions takes down, up or down,up")
    rounds = 1 if args.smoke else args.rounds

    def size_of(mib: float, smoke_kib: int) -> int:
        if args.smoke:
            return smoke_kib * 1024
        return max(1, int(mib * args.scale)) * MiB

    family = "IPv6" if args.ipv6 else "IPv4"
    report: dict[str, Any] = {"family": family.lower(), "capacity": {}, "scenarios": []}
    with exit_peer(ipv6=args.ipv6, http=True, name_prefix="mwgpath") as peer:
        cc = peer.client_ns.exec(["sysctl", "-n", "net.ipv4.tcp_congestion_control"]).stdout
        rmem = peer.client_ns.exec(["sysctl", "-n", "net.ipv4.tcp_rmem"]).stdout.split()
        print(f"Linux TCP in the namespaces: {cc.strip()}, tcp_rmem max {int(rmem[2]) >> 20} MiB")
        if args.udp_buffer is not None:
            print(f"our tunnel's UDP socket buffers: as under [rw]mem_max={args.udp_buffer}")
        for item in args.server_sysctl:
            peer.ns.exec(["sysctl", "-q", "-w", item])
            print(f"the server's namespace: {item}")
        host = peer.server_tunnel_v6 if args.ipv6 else peer.server_tunnel_v4
        assert host is not None
        with (
            http_server(peer, host, args.python_server) as server,
            Clients.start(peer) as clients,
        ):
            print(f"HTTP server: {'nginx' if server.native else 'Python http.server (a cap!)'}")
            print(
                f"Inside the tunnel: {family} (both clients to {server.url('/')}),"
                f" outer UDP IPv4 (exit {format_endpoint(peer.endpoint)})"
            )
            if not args.no_capacity:
                report["capacity"] = capacity(clients, server, args, size_of, directions, rounds)
            if args.only_capacity:
                names = []
            for name in names:
                sc = SCENARIOS[name]
                size = size_of(sc.mib, sc.smoke_kib)
                with RelayProcess(
                    peer.endpoint, impairment=sc.impairment, seed=args.seed, ns=peer.client_ns
                ) as relay:
                    rows = measure(
                        clients,
                        server,
                        sc.label,
                        lambda relay=relay: relay.address,
                        size,
                        directions,
                        rounds,
                        relay,
                        args.before_after,
                    )
                relay_counts = {"up": relay.up.as_dict(), "down": relay.down.as_dict()}
                print_table(rows, f"{sc.label} (relay {json.dumps(relay_counts)})")
                report["scenarios"].append(_row_json(name, rows, relay_counts))
    summary(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


def capacity(
    clients: Clients, server: Server, args: Any, size_of: Any, directions: list[str], rounds: int
) -> dict[str, Any]:
    peer = clients.peer
    out: dict[str, Any] = {}
    size = size_of(200, 1024)
    out["server"] = server_alone(peer, server, size)
    print(
        f"server alone (curl in the exit namespace, {_fmt_size(size)}): download {out['server']['down']:.0f} MB/s, "
        f"upload {out['server']['up']:.0f} MB/s"
    )
    count = 20_000 if args.smoke else 200_000
    for delay in (0.0, 0.025):
        b = relay_blast(count, delay)
        out[f"relay_blast_delay_{int(delay * 1000)}ms"] = b
        us = b["relay_us_per_datagram"]
        # the relay's CPU time comes in clock ticks (10 ms): a short blast may read 0
        per_core = f"{1452 / us:.0f} MB/s" if us > 0 else "too fast to measure in this short run"
        print(
            f"relay alone, {delay * 1000:.0f} ms delay: forwarded {b['forwarded']}/{b['sent']} "
            f"datagrams at {b['kpps']:.0f} kpps = {b['mbps']:.0f} MB/s (sender offered "
            f"{b['sender_mbps']:.0f} MB/s), relay CPU {us:.1f} µs/datagram"
            f" = {per_core} of full datagrams per core-second"
        )
    # the same 0 ms path with and without the relay, for both clients
    rows: list[Row] = []
    with RelayProcess(peer.endpoint, ns=peer.client_ns) as relay:
        rows += measure(
            clients,
            server,
            "0 ms, via relay",
            lambda: relay.address,
            size,
            directions,
            rounds,
            relay,
        )
    rows += measure(
        clients, server, "0 ms, direct", lambda: peer.endpoint, size, directions, rounds, None
    )
    print_table(rows, "relay vs no relay at 0 ms")
    out["direct_vs_relay"] = _row_json("capacity", rows, {})
    return out


def _by_client(r: Row, field_name: str) -> dict[str, list[Any]]:
    """One :class:`Transfer` field of each client's runs, for the JSON report."""
    return {c: [getattr(t, field_name) for t in getattr(r, c)] for c in ("kernel", "ours", "fixed")}


def _row_json(name: str, rows: list[Row], relay: dict[str, Any]) -> dict[str, Any]:
    return {
        "scenario": name,
        "relay": relay,
        "rows": [
            {
                "label": r.label,
                "direction": r.direction,
                "size": r.size,
                "kernel": [t.mbps for t in r.kernel],
                "ours": [t.mbps for t in r.ours],
                "fixed": [t.mbps for t in r.fixed],
                "relay_cpu": [t.relay_cpu for t in r.kernel + r.ours + r.fixed],
                "ours_cpu_s_per_mib": [t.cpu_per_mib for t in r.ours],
                "ours_thread_on_cpu_waiting": [t.thread for t in r.ours],
                "ours_tcp": [t.ours_tcp for t in r.ours],
                "steal": _by_client(r, "steal"),
                "idle": _by_client(r, "idle"),
                "exit_tcp": _by_client(r, "exit_tcp"),
                "udp_drops_exit_client": _by_client(r, "udp_drops"),
                "kernel_median": r.med("kernel"),
                "ours_median": r.med("ours"),
                "fixed_median": r.med("fixed"),
                "ratio": r.med("ours") / r.med("kernel"),
                "ratio_fixed": r.med("fixed") / r.med("kernel"),
            }
            for r in rows
        ],
    }


def summary(report: dict[str, Any]) -> None:
    rows = [row for sc in report["scenarios"] for row in sc["rows"]]
    if not rows:
        return
    fixed = any(r["fixed"] for r in rows)
    print("\n### Summary (medians; ratio = mitm-wg / Linux TCP)\n")
    extra = f" {_before[1]} (before) MB/s | ratio |" if fixed else ""
    print(f"| path | dir | Linux TCP MB/s | mitm-wg MB/s | ratio |{extra}")
    print("|---|---|---:|---:|---:|" + ("---:|---:|" if fixed else ""))
    for r in rows:
        cells = (
            f"| {r['label']} | {r['direction']} | {r['kernel_median']:.1f} | "
            f"{r['ours_median']:.1f} | {r['ratio']:.2f} |"
        )
        if fixed:
            cells += f" {r['fixed_median']:.1f} | {r['ratio_fixed']:.2f} |"
        print(cells)


if __name__ == "__main__":
    # started in the background by a non-interactive shell, SIGINT is ignored: take it back,
    # so that `kill -INT` stops a run with its clean-up (namespaces, processes) done
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
