"""HTTPS bulk download (or upload) through mitmdump: our tunnel (addon) vs the kernel path, side by side (root).

Layout (tests/harness exit peer, IPv4 only):

* exit namespace: wireguard-go + Linux, and nginx serving one file over HTTPS (TLS with the
  harness's test CA) on the exit's tunnel address, port 443: a native-speed origin;
* client namespace:
    A. ``mitmdump`` WITHOUT the addon, over the kernel path: a wireguard-go client interface
       (its own key and tunnel address, a second peer of the exit) and Linux TCP;
    B. ``mitmdump -s addons/mitm_wg.py`` (our userspace tunnel, the exit's first peer);
    D. (``--split``, an experiment) mitmdump with ``bench/split_redirect.py`` sending every
       upstream connection to ``bench/split_worker.py``: our tunnel in a process of its own,
       as a TCP forwarder on loopback (its own key and address), so it shares no GIL with
       mitmproxy; this mitmdump does not verify the origin (it connects to 127.0.0.1);
  A and B intercept TLS and verify the origin with ``ssl_verify_upstream_trusted_ca``;
* the client is the same curl in the client namespace for both (``-x`` the proxy,
  ``--cacert`` the proxy's CA, HTTP/1.1 unless ``--h2``), body to /dev/null; with
  ``--upload`` curl PUTs a file of that size instead (nginx's WebDAV module stores it on a
  tmpfs, and each round deletes it): mitmproxy takes the request body from curl (as it
  buffers bodies unless ``stream_large_bodies`` is set), then sends it upstream.

Both proxies stay up for the whole run; the rounds alternate A, B, A, B, ... and the script
prints MB/s per round, the medians and the ratio B / A. Each round also downloads the file
directly over the kernel path (no proxy, ``direct``), to show the origin and wireguard-go are
not the cap. Each proxy gets one small warm-up download first (handshake, first connection).

Also per download: the CPU time and context switches of that mitmdump process (all threads,
and the main thread's share; for A this leaves out the wireguard-go client and the kernel's
TCP work, for D the worker's CPU is printed beside it), and the machine's steal time during
it (``bench_path.steal_since``: a round with much of it is not comparable with one without)
and its idle time (``bench_path.idle_since``: near 0, both cores were busy).

Run:  .venv/bin/python bench/bench_mitm_https.py [--mb 100] [--rounds 5] [--h2] [--smoke]
      (``--smoke``: a 1 MiB file, one round, nothing asserted about speed)
Development aids:
  --variant ENV=VALUE   one more mitmdump + addon with that environment (its own exit peer),
                        e.g. PYTHONPATH=/tmp/old-tree (a checkout, e.g. a git worktree) to
                        compare code side by side: that tree's addons/mitm_wg.py is loaded
                        (under ./scripts/bench-debian13 the tree must lie inside this
                        checkout, e.g. build/old-tree: the root sees only the checkout)
  --py-spy DIR [--py-spy-gil]   py-spy profiles (collapsed stacks per thread) per download
  --logs DIR            keep the mitmdump logs
  --split               add D (above): what running the tunnel in its own process would buy
  --path SCENARIO       every tunnel (A's wireguard-go and ours) reaches the exit through one
                        impairing relay process with a ``bench_path.py`` scenario (rtt50,
                        random, bneck50, ...): the paths users have, not the lab's 1 ms
  --idle N              every proxy holds N idle keep-alive HTTPS connections to the origin
                        (a client in the client namespace opened them through it, one small
                        GET each) during all its downloads: what a browser's open
                        connections cost the edge (bridge, transports) per byte;
                        ``--idle-variants-only``: only the variants (C) hold them, so B and C
                        run the same code side by side without and with them
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

VENV_BIN = Path(sys.executable).parent
MITMDUMP = VENV_BIN / "mitmdump"
ADDON = ROOT / "addons" / "mitm_wg.py"
SPLIT_WORKER = ROOT / "bench" / "split_worker.py"
SPLIT_REDIRECT = ROOT / "bench" / "split_redirect.py"
KERNEL_CLIENT_HOST = 3  # the wireguard-go client's tunnel address: 10.78.N.3
NEEDS_NETNS = True  # (bench/README.md's contract: its smoke run is an interop test)

NGINX_CONF = """\
daemon off;
user root;  # the harness workdir is 0700
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
worker_rlimit_nofile {files};
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-body;
    proxy_temp_path {work}/nginx-proxy;
    fastcgi_temp_path {work}/nginx-fastcgi;
    uwsgi_temp_path {work}/nginx-uwsgi;
    scgi_temp_path {work}/nginx-scgi;
    sendfile on;
    keepalive_timeout {keepalive};
    keepalive_requests 100000;
    server {{
        listen {host}:443 ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {www};
        location /up/ {{
            dav_methods PUT;
            client_max_body_size 0;
            client_body_buffer_size 1m;
            client_body_temp_path {up}/body;
            root {up};
        }}
    }}
}}
"""


def wait_until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def port_from_log(proc: subprocess.Popen[Any], log: Path, pattern: str, what: str) -> int:
    """Wait (60 s at most) until ``log`` matches ``pattern``, whose group is the port the
    process listens on; a process that exits first is an error with its log's tail."""
    found: list[int] = []

    def listening() -> bool:
        text = log.read_text(errors="replace")
        m = re.search(pattern, text)
        if m:
            found.append(int(m.group(1)))
            return True
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited:\n{text[-3000:]}")
        return False

    wait_until(listening, 60, f"{what} to listen")
    return found[0]


@contextlib.contextmanager
def nginx_origin(peer: Any, size: int, idle: int = 0) -> Iterator[tuple[Path, str, Path]]:
    """nginx on the exit's tunnel address:443 serving /file (``size`` bytes) and storing PUTs
    under /up/; yields (CA, path, the directory on a tmpfs where /up/NAME lands as ./NAME).
    ``idle``: connections held open all run besides (:func:`bench_path.nginx_room`)."""
    from bench_path import nginx_room
    from tlsorigin import make_ca_and_leaf

    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    work = peer.workdir / "nginx"
    www = work / "www"
    www.mkdir(parents=True)
    block = os.urandom(1 << 20)
    with open(www / "file", "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.write(block[: size % len(block)])
    os.chmod(work, 0o755)
    os.chmod(www, 0o755)
    os.chmod(www / "file", 0o644)
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    up = Path(tempfile.mkdtemp(prefix="mwg-bench-https-", dir=shm))  # uploads: no disk
    (up / "up").mkdir()
    (up / "body").mkdir()
    ca, leaf, key = make_ca_and_leaf(work, ["origin.test"], [peer.server_tunnel_v4])
    conf = work / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            work=work,
            host=peer.server_tunnel_v4,
            cert=leaf,
            key=key,
            www=www,
            up=up,
            **nginx_room(idle, keepalive=60),
        )
    )
    log = work / "nginx.out"
    with log.open("wb") as out:
        proc = peer.ns.popen([nginx, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:

        def listening() -> bool:
            if proc.poll() is not None:
                errlog = work / "nginx-error.log"
                err = errlog.read_text(errors="replace") if errlog.exists() else ""
                raise RuntimeError(f"nginx exited: {log.read_text()}{err}")
            r = peer.ns.exec(["ss", "-Htln", "sport = :443"], check=False)
            return peer.server_tunnel_v4 in r.stdout

        wait_until(listening, 15, "nginx to listen")
        yield ca, "/file", up / "up"
    finally:
        peer.ns.kill(proc)
        shutil.rmtree(up, ignore_errors=True)


IDLE_HOLDER = r"""
import http.client, socket, ssl, sys
port, host, ca, n = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
context = ssl.create_default_context(cafile=ca)
conns = []
for _ in range(n):
    raw = socket.create_connection(("127.0.0.1", port), timeout=60)
    raw.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = raw.recv(4096)
        if not chunk:
            sys.exit(f"proxy closed the CONNECT: {head!r}")
        head += chunk
    if b" 200" not in head.split(b"\r\n")[0]:
        sys.exit(f"CONNECT refused: {head!r}")
    tls = context.wrap_socket(raw, server_hostname=host)
    tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    response = http.client.HTTPResponse(tls)
    response.begin()
    response.read()
    if response.will_close:
        sys.exit("the origin did not keep the connection alive")
    conns.append(tls)
print("ready", len(conns), flush=True)
sys.stdin.read()  # hold them until our stdin closes
closed = 0
for tls in conns:
    tls.setblocking(False)
    try:
        closed += tls.recv(1) == b""
    except ssl.SSLWantReadError:
        pass
    except OSError:
        closed += 1
print("closed", closed, flush=True)
"""


@contextlib.contextmanager
def idle_connections(peer: Any, proxy: Proxy, host: str, n: int) -> Iterator[None]:
    """``n`` keep-alive HTTPS connections to ``host``:443 through ``proxy``, held open (and
    idle after one small GET each) until the block ends; says how many were closed."""
    proc = peer.client_ns.popen(
        [sys.executable, "-c", IDLE_HOLDER, str(proxy.port), host, str(proxy.ca_pem), str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != f"ready {n}":
            raise RuntimeError(f"{proxy.name}: the idle connections failed: {line!r}")
        print(f"{proxy.name}: {n} idle connections open", flush=True)
        yield
        proc.stdin.close()
        print(f"{proxy.name}: {proc.stdout.readline().strip()} of the {n} idle", flush=True)
    finally:
        peer.client_ns.kill(proc)


class Proxy:
    def __init__(self, name: str, proc: subprocess.Popen[Any], port: int, confdir: Path) -> None:
        self.name, self.proc, self.port, self.confdir = name, proc, port, confdir

    @property
    def ca_pem(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"


@contextlib.contextmanager
def mitmdump(
    peer: Any,
    name: str,
    origin_ca: Path,
    *args: str,
    keep: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Proxy]:
    """mitmdump on 127.0.0.1 (ephemeral port) in the client namespace; stopped by PID."""
    work = peer.workdir / name
    confdir = work / "conf"
    confdir.mkdir(parents=True)
    log = work / "mitmdump.log"
    argv = [
        str(MITMDUMP), "--listen-host", "127.0.0.1", "--listen-port", "0",
        "--set", f"confdir={confdir}", "--set", f"ssl_verify_upstream_trusted_ca={origin_ca}",
        "--set", "flow_detail=0", *args,
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = peer.client_ns.popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, HOME=str(work), **(env or {})),
            cwd=work,
        )
    try:
        port = port_from_log(proc, log, r"listening at 127\.0\.0\.1:(\d+)", f"mitmdump {name}")
        wait_until(lambda: (confdir / "mitmproxy-ca-cert.pem").exists(), 20, "the mitmproxy CA")
        yield Proxy(name, proc, port, confdir)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        peer.client_ns.kill(proc)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(log, keep / f"mitmdump-{name}.log")


def variant_addon(variant: str) -> Path:
    """The addon script a ``--variant`` mitmdump loads: for ``PYTHONPATH=TREE`` where TREE
    is another checkout, TREE's own ``addons/mitm_wg.py`` (the shim puts the checkout it
    lies in first on ``sys.path``, so this checkout's shim would load this checkout's code
    whatever PYTHONPATH says); else this checkout's."""
    name, _, value = variant.partition("=")
    if name == "PYTHONPATH":
        tree = Path(value.split(os.pathsep)[0]) / "addons" / "mitm_wg.py"
        if tree.is_file():
            return tree
    return ADDON


@contextlib.contextmanager
def split_worker(peer: Any, conf: Path, target: str) -> Iterator[tuple[int, int]]:
    """``bench/split_worker.py`` in the client namespace, forwarding to ``target``:443 through
    our tunnel of ``conf``; yields (its loopback port, its pid); stopped by PID."""
    log = peer.workdir / "split-worker.log"
    with log.open("wb") as out:
        proc = peer.client_ns.popen(
            [sys.executable, str(SPLIT_WORKER), str(conf), target, "443"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield port_from_log(proc, log, r"(?m)^ready (\d+)$", "the split worker"), proc.pid
    finally:
        peer.client_ns.kill(proc)


def curl_download(peer: Any, url: str, size: int, *curl_args: str, timeout: float = 600) -> float:
    """One download with curl in the client namespace; returns MB/s (10**6 bytes/s)."""
    argv = [
        "curl", "-sS", "--max-time", str(int(timeout)), "-o", "/dev/null",
        "-w", "%{http_code} %{size_download} %{time_total}", *curl_args, url,
    ]  # fmt: skip
    env = dict(os.environ, NO_PROXY="", no_proxy="")
    r = peer.client_ns.exec(argv, check=False, timeout=timeout + 30, env=env)
    code, got, took = [*r.stdout.split(), "", "", ""][:3]
    if r.returncode or code != "200" or int(got) != size:
        raise RuntimeError(f"download failed: rc={r.returncode} {r.stdout!r} {r.stderr!r}")
    return size / float(took) / 1e6


def curl_upload(peer: Any, url: str, body: Path, *curl_args: str, timeout: float = 600) -> float:
    """One PUT of ``body`` with curl in the client namespace; returns MB/s (10**6 bytes/s)."""
    size = body.stat().st_size
    argv = [
        "curl", "-sS", "--max-time", str(int(timeout)), "-o", "/dev/null", "-T", str(body),
        "-H", "Expect:",  # no 1 s wait for a 100 Continue
        "-w", "%{http_code} %{size_upload} %{time_total}", *curl_args, url,
    ]  # fmt: skip
    env = dict(os.environ, NO_PROXY="", no_proxy="")
    r = peer.client_ns.exec(argv, check=False, timeout=timeout + 30, env=env)
    code, sent, took = [*r.stdout.split(), "", "", ""][:3]
    if r.returncode or code not in ("201", "204") or int(sent) != size:
        raise RuntimeError(f"upload failed: rc={r.returncode} {r.stdout!r} {r.stderr!r}")
    return size / float(took) / 1e6


def _stat(path: str) -> list[str]:
    """The fields of a /proc stat file after the command name: [0] is the state (field 3 of
    proc(5)), so field N is [N - 3]: minflt [7], utime [11], stime [12]."""
    return Path(path).read_text().rpartition(")")[2].split()


class Counters(NamedTuple):
    """A process's counters so far: CPU seconds (user + kernel), kernel seconds and minor
    page faults of all its threads, the same of its main (asyncio) thread alone (the rest
    is the other threads: with the addon, mitm-wg's trio thread), and context switches.
    Most of mitmdump's main-thread kernel time is zeroing fresh pages for mitmproxy's
    copies of the 100 MiB body (perf: clear_page), 0.2 to over 1 s a round on this VM: a
    round slow for that reason shows it here."""

    cpu: float
    kernel: float
    faults: int
    main_cpu: float
    main_kernel: float
    main_faults: int
    switches: int

    def since(self, before: Counters) -> Counters:
        return Counters(*(now - then for now, then in zip(self, before, strict=True)))


def process_counters(pid: int) -> Counters:
    """:class:`Counters` of process ``pid`` now (each /proc file read once)."""
    tick = os.sysconf("SC_CLK_TCK")
    whole, main = _stat(f"/proc/{pid}/stat"), _stat(f"/proc/{pid}/task/{pid}/stat")
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    switches += int(line.split()[1])
    return Counters(
        (int(whole[11]) + int(whole[12])) / tick,
        int(whole[12]) / tick,
        int(whole[7]),
        (int(main[11]) + int(main[12])) / tick,
        int(main[12]) / tick,
        int(main[7]),
        switches,
    )


@contextlib.contextmanager
def profiled(
    directory: Path | None, proxy: Proxy, round_: int, gil: bool = False
) -> Iterator[None]:
    """``py-spy record`` of the proxy process while the block runs (when ``directory``);
    ``gil``: only samples of threads holding the GIL (``py-spy --gil``)."""
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"{proxy.name}-{round_ + 1}.txt"
    spy = subprocess.Popen(
        [str(VENV_BIN / "py-spy"), "record", "--format", "raw", "--threads", "--rate", "200",
         *(["--gil"] if gil else []), "-p", str(proxy.proc.pid), "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(0.5)  # attached
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


def client_config(
    peer: Any, private_b64: str, host: int, endpoint: tuple[str, int] | None = None
) -> str:
    """wg-quick text for one more client of the exit: address 10.78.N.host; ``endpoint``
    replaces the exit's (a relay's address)."""
    from harness.exitpeer import b64

    endpoint = endpoint or peer.endpoint
    return (
        "[Interface]\n"
        f"PrivateKey = {private_b64}\n"
        f"Address = 10.78.{peer.index}.{host}/32\n\n"
        "[Peer]\n"
        f"PublicKey = {b64(peer.server_public_key)}\n"
        f"AllowedIPs = {peer.tunnel_v4_net}\n"
        f"Endpoint = {endpoint[0]}:{endpoint[1]}\n"
    )


def add_client(peer: Any, host: int, endpoint: tuple[str, int]) -> str:
    """One more client of the exit (a new key, address 10.78.N.host, its datagrams to
    ``endpoint``): the exit learns it; returns its wg-quick text."""
    from harness import generate_keypair
    from harness.exitpeer import b64

    priv, pub = generate_keypair()
    peer.ns.exec(
        ["wg", "set", peer.ifname, "peer", b64(pub), "allowed-ips",
         f"10.78.{peer.index}.{host}/32"]
    )  # fmt: skip
    return client_config(peer, b64(priv), host, endpoint)


def write_conf(peer: Any, name: str, text: str) -> Path:
    """``text`` as ``NAME.conf`` in the exit's work directory, readable by us alone."""
    conf = peer.workdir / f"{name}.conf"
    conf.touch(mode=0o600)
    conf.write_text(text)
    return conf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=int, default=100, help="file size in MiB (default 100)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    ap.add_argument("--h2", action="store_true", help="let curl offer HTTP/2 (default 1.1)")
    ap.add_argument("--smoke", action="store_true", help="1 MiB, one round (CI smoke test)")
    ap.add_argument("--no-direct", action="store_true", help="skip the direct (no proxy) reference")
    ap.add_argument(
        "--py-spy",
        metavar="DIR",
        type=Path,
        help="record py-spy profiles (collapsed stacks, per thread) of each mitmdump's downloads",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="ENV=VALUE",
        help="also run mitmdump + addon with this environment variable (side by side)",
    )
    ap.add_argument(
        "--py-spy-gil", action="store_true", help="with --py-spy: only threads holding the GIL"
    )
    ap.add_argument("--logs", metavar="DIR", type=Path, help="keep the mitmdump logs here")
    ap.add_argument(
        "--idle",
        type=int,
        default=0,
        metavar="N",
        help="every proxy holds N idle keep-alive connections to the origin during its runs",
    )
    ap.add_argument(
        "--idle-variants-only",
        action="store_true",
        help="with --idle: only the --variant proxies hold them (B and C side by side: what "
        "the idle connections cost the same code, e.g. --variant MITM_WG_UNUSED=1)",
    )
    ap.add_argument(
        "--path",
        metavar="SCENARIO",
        help="every tunnel goes through a relay with this bench_path.py scenario (e.g. rtt50)",
    )
    ap.add_argument(
        "--split",
        action="store_true",
        help="experiment: also our tunnel in a process of its own, as a loopback forwarder",
    )
    ap.add_argument(
        "--upload",
        action="store_true",
        help="PUT the file to the origin instead of downloading it (HTTPS upload)",
    )
    args = ap.parse_args()
    size = (1 if args.smoke else args.mb) << 20
    rounds = 1 if args.smoke else args.rounds

    from bench_path import SCENARIOS, cpu_ticks, idle_since, steal_since

    from harness import exit_peer, wireguard_go_interface
    from harness.relay import RelayProcess

    if args.path is not None and args.path not in SCENARIOS:
        ap.error(f"--path: no scenario {args.path!r} (one of: {', '.join(SCENARIOS)})")
    results: dict[str, list[float]] = {"A kernel": [], "B ours": []}
    for variant in args.variant:
        results[f"C {variant}"] = []
    if args.split:
        results["D split"] = []
    results["direct"] = []
    cpu: dict[str, list[float]] = {k: [] for k in results}
    switches: dict[str, list[int]] = {k: [] for k in results}
    with (
        exit_peer(ipv6=False, http=False, name_prefix="mwgmh") as peer,
        contextlib.ExitStack() as st,
    ):
        endpoint = peer.endpoint
        if args.path is not None:
            scenario = SCENARIOS[args.path]
            relay = st.enter_context(
                RelayProcess(peer.endpoint, impairment=scenario.impairment, ns=peer.client_ns)
            )
            endpoint = relay.address
            print(f"every tunnel through a relay: {scenario.label}", flush=True)

        http = [] if args.h2 else ["--http1.1"]
        origin_ca, path, uploads = st.enter_context(
            nginx_origin(peer, size, idle=args.idle * (2 + len(args.variant) + args.split))
        )
        # more peers on the exit: the wireguard-go client (.3) and variants (.4, ...), each
        # with its own key and address (add_client), so that all can stay up side by side
        st.enter_context(
            wireguard_go_interface(
                peer.client_ns,
                peer.client_ifname,
                add_client(peer, KERNEL_CLIENT_HOST, endpoint),
                peer.workdir,
            )
        )
        proxies = [
            ("A kernel", st.enter_context(mitmdump(peer, "kernel", origin_ca, keep=args.logs)))
        ]
        confs = [
            (
                "ours",
                {},
                write_conf(peer, "ours", peer.client_config_text(dns=False, endpoint=endpoint)),
                ADDON,
            )
        ]
        for k, variant in enumerate(args.variant):
            name, _, value = variant.partition("=")
            text = add_client(peer, KERNEL_CLIENT_HOST + 1 + k, endpoint)
            confs.append(
                (
                    f"variant{k}",
                    {name: value},
                    write_conf(peer, f"variant{k}", text),
                    variant_addon(variant),
                )
            )
        for (name, env, conf, addon), key in zip(confs, list(results)[1:], strict=False):
            proxy = st.enter_context(
                mitmdump(
                    peer, name, origin_ca, "-s", str(addon), "--set", f"wg_conf=exit={conf}",
                    keep=args.logs, env=env,
                )
            )  # fmt: skip
            proxies.append((key, proxy))
        workers: dict[str, int] = {}  # proxy key -> the pid whose CPU counts with it
        if args.split:
            text = add_client(peer, KERNEL_CLIENT_HOST + 1 + len(args.variant), endpoint)
            port, pid = st.enter_context(
                split_worker(peer, write_conf(peer, "split", text), peer.server_tunnel_v4)
            )
            proxy = st.enter_context(
                mitmdump(
                    peer, "split", origin_ca, "-s", str(SPLIT_REDIRECT),
                    "--set", "ssl_insecure=true", keep=args.logs, env={"SPLIT_PORT": str(port)},
                )
            )  # fmt: skip
            proxies.append(("D split", proxy))
            workers["D split"] = pid
        url = f"https://{peer.server_tunnel_v4}{path}"
        body = uploads.parent / "client-body"
        if args.upload:
            with open(body, "wb") as f:
                for _ in range(size >> 20):
                    f.write(os.urandom(1 << 20))
                f.write(os.urandom(size & ((1 << 20) - 1)))

        def transfer(name: str, *curl_args: str) -> float:
            """One download, or one upload (then the file the origin stored is checked and
            deleted), with curl through ``curl_args``; MB/s."""
            if not args.upload:
                return curl_download(peer, url, size, *http, *curl_args)
            stored = uploads / name
            mbs = curl_upload(
                peer, f"https://{peer.server_tunnel_v4}/up/{name}", body, *http, *curl_args
            )
            if stored.stat().st_size != size:
                raise RuntimeError(f"the origin stored {stored.stat().st_size} bytes, not {size}")
            stored.unlink()
            return mbs

        warm = f"https://{peer.server_tunnel_v4}/"  # nginx answers 403/404: fine, 0 bytes
        for _, proxy in proxies:
            peer.client_ns.exec(
                ["curl", "-sS", "-o", "/dev/null", "--cacert", str(proxy.ca_pem), "-x",
                 f"http://127.0.0.1:{proxy.port}", "--max-time", "60", warm],
                check=False, timeout=90, env=dict(os.environ, NO_PROXY=""),
            )  # fmt: skip
        if args.idle:
            for key, proxy in proxies:
                if args.idle_variants_only and not key.startswith("C "):
                    continue
                st.enter_context(idle_connections(peer, proxy, peer.server_tunnel_v4, args.idle))
        for i in range(rounds):
            for key, proxy in proxies:
                before = process_counters(proxy.proc.pid)
                worker0 = process_counters(workers[key]).cpu if key in workers else 0.0
                ticks0 = cpu_ticks()
                with profiled(args.py_spy, proxy, i, args.py_spy_gil):
                    mbs = transfer(
                        proxy.name, "--cacert", str(proxy.ca_pem),
                        "-x", f"http://127.0.0.1:{proxy.port}",
                    )  # fmt: skip
                d = process_counters(proxy.proc.pid).since(before)
                steal, idle = steal_since(ticks0), idle_since(ticks0)
                results[key].append(mbs)
                cpu[key].append(d.cpu)
                switches[key].append(d.switches)
                worker = ""
                if key in workers:
                    worker = f" + worker {process_counters(workers[key]).cpu - worker0:.2f} s"
                print(
                    f"round {i + 1} {key:8s} {mbs:7.1f} MB/s   mitmdump CPU {d.cpu:5.2f} s "
                    f"(main thread {d.main_cpu:.2f}: kernel {d.main_kernel:.2f}, "
                    f"{d.main_faults / 1000:.1f}k page faults; others {d.cpu - d.main_cpu:.2f}: "
                    f"kernel {d.kernel - d.main_kernel:.2f}, "
                    f"{(d.faults - d.main_faults) / 1000:.1f}k page faults){worker}, "
                    f"{d.switches} context switches"
                    + ("" if steal is None else f", steal {steal * 100:.0f} %")
                    + ("" if idle is None else f", idle {idle * 100:.0f} %"),
                    flush=True,
                )
            if not args.no_direct:
                mbs = transfer("direct", "--cacert", str(origin_ca))
                results["direct"].append(mbs)
                print(f"round {i + 1} {'direct':8s} {mbs:7.1f} MB/s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items() if v}
    what = "upload" if args.upload else "download"
    print(f"\n{size >> 20} MiB HTTPS {what} via mitmdump, {rounds} rounds, medians (MB/s):")
    for k, v in med.items():
        spread = f"{min(results[k]):.1f}–{max(results[k]):.1f}"
        extra = ""
        if cpu[k]:
            extra = (
                f"   mitmdump CPU {statistics.median(cpu[k]):.2f} s, "
                f"{statistics.median(switches[k]):.0f} context switches"
            )
        print(f"  {k:8s} {v:7.1f}   (range {spread}){extra}")
    for key in [k for k in results if k[0] in "BCD"]:
        ratios = [x / a for a, x in zip(results["A kernel"], results[key], strict=True)]
        print(
            f"ratio {key} / A kernel (medians): {med[key] / med['A kernel']:.2f}; per round: "
            + ", ".join(f"{r:.2f}" for r in ratios)
        )


if __name__ == "__main__":
    main()
