"""``mitm-wg demo``: mitmproxy with the addon and a local WireGuard exit peer, no root needed.

Two processes:

1. the *exit peer*: ``mitmdump --mode wireguard@127.0.0.1:<free UDP port>`` with its own
   temporary confdir, every connection passed through untouched (``ignore_hosts=.*``, so
   TLS from our mitmproxy reaches the real servers and their real certificates), logging to
   a file in the demo's temporary directory;
2. the *front*: ``mitmproxy`` (``mitmdump`` without a terminal, ``mitmweb`` with ``--web``)
   on 127.0.0.1:8080 with the addon (``mitm_wg/addon.py``, what ``mitm-wg addon`` prints) and a
   wg-quick config for that exit peer.

With mitmdump and mitmweb the instructions are printed once the front has *finished* starting
(its ``mitm-wg: ready`` log line, see :mod:`mitm_wg.mitmproxy.ready`), so a request sent the
moment they appear is served; mitmproxy's console takes over the terminal, so there they come
first, before Enter starts it. The exit peer, too, counts as started only at its ready line.

Ctrl-C / SIGTERM stops both (by PID) and removes the temporary directory. The exit peer runs
on this machine, so traffic still leaves from this machine's address: the demo shows the
mechanics, a real config (VPN provider, VPS) is what moves the exit elsewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

from mitm_wg.config import encode_key, format_endpoint, generate_private_key, public_key_of

__all__ = [
    "DemoError",
    "ExitPeer",
    "add_arguments",
    "choose_tool",
    "client_config_text",
    "confdir_from_args",
    "exit_peer",
    "port_in_use",
    "run",
]

logger = logging.getLogger(__name__)

#: Tunnel name the front mitmproxy knows the exit peer by (``wg_conf=demo=PATH``).
TUNNEL_NAME = "demo"
#: mitmproxy's WireGuard mode gives its one client this address and answers DNS here.
CLIENT_ADDRESS = "10.0.0.1/32"
TUNNEL_DNS = "10.0.0.53"
#: mitmproxy's WireGuard mode routes IPv4 only (its client gets no IPv6 address).
ALLOWED_IPS = "0.0.0.0/0"

EXIT_STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

_LISTENING = re.compile(rb"WireGuard server listening at \[?([0-9a-fA-F.:]+?)\]?:(\d+)")
_READY = b"mitm-wg: ready"  # mitm_wg.mitmproxy.ready.READY_PREFIX (not imported: no mitmproxy)
#: The last line of the instructions; the front is ready when it appears.
READY_LINE = "mitm-wg demo: ready, proxy at http://127.0.0.1:{port} (Ctrl-C stops everything)"


class DemoError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``mitm-wg demo`` options (cli.py calls this on its ``demo`` subparser)."""
    parser.add_argument(
        "--port", type=int, default=8080, help="proxy port on 127.0.0.1 (default 8080)"
    )
    ui = parser.add_mutually_exclusive_group()
    ui.add_argument("--web", action="store_true", help="use mitmweb (browser UI)")
    ui.add_argument("--dump", action="store_true", help="use mitmdump even on a terminal")
    parser.add_argument(
        "mitmproxy_args",
        nargs=argparse.REMAINDER,
        metavar="-- ARGS",
        help="further arguments for mitmproxy, after --",
    )


# -- pieces ----------------------------------------------------------------------------------


def find_tool(name: str) -> str:
    """``mitmproxy``/``mitmdump``/``mitmweb`` next to this interpreter (the venv's), else PATH."""
    local = Path(sys.executable).with_name(name)
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DemoError(f"{name} not found (install mitmproxy into this environment)")
    return found


def find_addon() -> Path:
    """The addon file inside the installed package (``mitm-wg addon`` prints it)."""
    from mitm_wg.addon import PATH

    if not PATH.is_file():  # pragma: no cover - only a broken installation
        raise DemoError(f"the mitm-wg addon file {PATH} is missing; reinstall mitm-wg")
    return PATH


def _ready_script() -> Path:
    """The start-up signal alone, as a script for the exit peer (no mitm-wg addon there)."""
    return Path(__file__).resolve().parent / "mitmproxy" / "ready.py"


def choose_tool(*, web: bool, dump: bool, interactive: bool) -> str:
    """mitmweb with --web, mitmdump with --dump or without a terminal, else mitmproxy."""
    if web:
        return "mitmweb"
    if dump or not interactive:
        return "mitmdump"
    return "mitmproxy"


def client_config_text(
    client_private: bytes, server_public: bytes, endpoint: tuple[str, int]
) -> str:
    """Our side's wg-quick config for mitmproxy's WireGuard mode at ``endpoint``."""
    return (
        "# mitm-wg demo: the local exit peer (mitmdump --mode wireguard)\n"
        "[Interface]\n"
        f"PrivateKey = {encode_key(client_private)}\n"
        f"Address = {CLIENT_ADDRESS}\n"
        f"DNS = {TUNNEL_DNS}\n"
        "\n"
        "[Peer]\n"
        f"PublicKey = {encode_key(server_public)}\n"
        f"AllowedIPs = {ALLOWED_IPS}\n"
        f"Endpoint = {format_endpoint(endpoint)}\n"
    )


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def port_in_use(host: str, port: int) -> bool:
    """Whether a TCP listener could not bind ``host:port`` (as mitmproxy would try)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def confdir_from_args(args: Sequence[str]) -> Path:
    """mitmproxy's confdir (where its CA lives) as the extra arguments leave it."""
    confdir = "~/.mitmproxy"
    for i, arg in enumerate(args):
        value = None
        if arg.startswith("confdir="):
            value = arg.partition("=")[2]
        elif arg.startswith("--set=confdir="):
            value = arg.partition("=")[2].partition("=")[2]
        if value is not None and (i == 0 or args[i - 1] == "--set" or arg.startswith("--set=")):
            confdir = value
    return Path(confdir).expanduser()


def _stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> int:
    """Signal ``proc`` (by PID) and wait; SIGKILL when it does not stop in time (or we are
    interrupted while waiting)."""
    try:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        logger.warning("pid %d did not stop within %g s; killing it", proc.pid, STOP_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode


# -- the exit peer ---------------------------------------------------------------------------


_PRIVATE_KEY_LINE = re.compile(rb"^(\s*PrivateKey\s*=\s*)\S+", re.IGNORECASE)


class _ExitLog:
    """Copies the exit peer's output into ``path`` (private keys redacted: mitmproxy prints
    its client config), notes the UDP endpoint it listens on and when it has finished
    starting (``listening`` is set at its ready line, once the endpoint is known)."""

    def __init__(self, pipe: IO[bytes], path: Path) -> None:
        self.endpoint: tuple[str, int] | None = None
        self.listening = threading.Event()
        self._pipe, self._path = pipe, path
        self.copier = threading.Thread(target=self._copy, name="mitm-wg-demo-exit-log", daemon=True)
        self.copier.start()

    def _copy(self) -> None:
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "wb") as out:
            for line in self._pipe:
                line = _PRIVATE_KEY_LINE.sub(rb"\1(redacted)", line)
                if self.endpoint is None:
                    match = _LISTENING.search(line)
                    if match:
                        self.endpoint = (match.group(1).decode(), int(match.group(2)))
                if self.endpoint is not None and _READY in line:
                    self.listening.set()
                out.write(line)
                out.flush()


@dataclass(eq=False)
class ExitPeer:
    """A running ``mitmdump --mode wireguard`` and our client config for it."""

    process: subprocess.Popen[Any]
    endpoint: tuple[str, int]
    client_conf: Path
    log_path: Path


@contextlib.contextmanager
def exit_peer(workdir: Path, host: str = "127.0.0.1") -> Iterator[ExitPeer]:
    """Start the exit peer with fresh keys in ``workdir``; stop it (by PID) on exit."""
    confdir = workdir / "exit"
    confdir.mkdir(mode=0o700)
    server_private, client_private = generate_private_key(), generate_private_key()
    _write_private(
        confdir / "wireguard.conf",
        json.dumps(
            {"server_key": encode_key(server_private), "client_key": encode_key(client_private)}
        ),
    )
    log_path = workdir / "exit.log"
    argv = [
        find_tool("mitmdump"),
        "--mode", f"wireguard@{host}:0",
        "--set", f"confdir={confdir}",
        "--set", "ignore_hosts=.*",  # pass TLS (and everything else) through untouched
        "--set", "termlog_verbosity=info",  # the "listening at" line tells us the port
        "--set", "flow_detail=0",
        "-s", str(_ready_script()),  # "mitm-wg: ready" once it has finished starting
    ]  # fmt: skip
    # A session of its own: Ctrl-C on the terminal reaches the front, not the exit peer; we
    # stop the exit peer ourselves once the front has gone.
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert proc.stdout is not None
    log = _ExitLog(proc.stdout, log_path)
    try:
        deadline = time.monotonic() + EXIT_STARTUP_TIMEOUT
        while not log.listening.wait(0.05):
            if proc.poll() is not None and not log.copier.is_alive():
                tail = log_path.read_text(errors="replace")[-1500:].strip()
                raise DemoError(f"the exit peer (mitmdump) exited ({proc.returncode}): {tail}")
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the exit peer (mitmdump) did not start within {EXIT_STARTUP_TIMEOUT:g} s"
                )
        assert log.endpoint is not None
        endpoint = log.endpoint
        client_conf = workdir / f"{TUNNEL_NAME}.conf"
        _write_private(
            client_conf, client_config_text(client_private, public_key_of(server_private), endpoint)
        )
        logger.info("exit peer pid %d listening at %s", proc.pid, format_endpoint(endpoint))
        yield ExitPeer(proc, endpoint, client_conf, log_path)
    finally:
        _stop_process(proc)
        log.copier.join(STOP_TIMEOUT)  # EOF follows the exit
        proc.stdout.close()


# -- the front -------------------------------------------------------------------------------


def front_argv(
    tool_path: str, addon: Path, conf: Path, port: int, extra: Sequence[str]
) -> list[str]:
    return [
        tool_path,
        "-s", str(addon),
        "--set", f"wg_conf={TUNNEL_NAME}={conf}",
        "--listen-host", "127.0.0.1",
        "--listen-port", str(port),
        *extra,
    ]  # fmt: skip


def instructions(tool: str, port: int, peer: ExitPeer, cacert: Path) -> str:
    """What the demo prints before it starts the front."""
    proxy = f"http://127.0.0.1:{port}"
    udp = format_endpoint(peer.endpoint)
    line = f'"mitm-wg: HOST:PORT through tunnel {TUNNEL_NAME!r} (peer …, {udp})"'
    if tool == "mitmproxy":
        checks = (
            "  - type  :wg.status  (Enter) in mitmproxy: tunnel state, handshakes, bytes\n"
            f"  - press E for the event log: one {line}\n    per upstream connection"
        )
    else:
        where = "mitmweb's Event Log" if tool == "mitmweb" else "the log below"
        checks = f"  - {where} shows one {line}\n    per upstream connection"
    return f"""\
mitm-wg demo: {tool} on {proxy} with the mitm-wg addon; its upstream connections go
through WireGuard to a local exit peer (mitmdump --mode wireguard at UDP {udp},
pid {peer.process.pid}, passing everything through untouched).
  tunnel config:    {peer.client_conf}
  exit peer's log:  {peer.log_path}

Point a client at it:
  curl -x {proxy} http://example.com/
  curl -x {proxy} --cacert {cacert} https://example.com/
  browser: HTTP proxy 127.0.0.1 port {port}, then open http://mitm.it to install
  mitmproxy's CA (it is created on the first start)

See that flows went through the tunnel:
{checks}
  - the exit peer's log: each connection arrives from 10.0.0.1 (the tunnel address)
  - flow.metadata["wg"] names the tunnel, peer and endpoint of each flow's connection; add
    -- -s addons/examples/rewrite_request.py to see it as an X-Mitm-Wg-Tunnel response
    header (curl -i)

The exit peer runs on this machine, so traffic still leaves from this machine's address.
With a real WireGuard config:  mitmproxy -s "$(mitm-wg addon)" --set wg_conf=wg0.conf
Ctrl-C stops everything.
"""


class _FrontOutput:
    """Copies the front's output (mitmdump/mitmweb) to ``out`` line by line and calls
    ``on_ready`` once, right after copying its ``mitm-wg: ready`` line."""

    def __init__(self, pipe: IO[bytes], out: IO[str], on_ready: Any) -> None:
        self._pipe, self._out, self._on_ready = pipe, out, on_ready
        self.copier = threading.Thread(target=self._copy, name="mitm-wg-demo-front", daemon=True)
        self.copier.start()

    def _copy(self) -> None:
        ready = False
        for line in self._pipe:
            self._out.write(line.decode(errors="replace"))
            self._out.flush()
            if not ready and _READY in line:
                ready = True
                self._on_ready()


def _run_front(
    argv: list[str],
    exit_process: subprocess.Popen[Any],
    console: bool,
    out: IO[str] | None = None,
    on_ready: Any = None,
) -> int:
    """Run the front in our process group until it exits; SIGINT/SIGTERM to us stop it, and
    so does the exit peer dying. Returns the front's exit status. Unless ``console``, its
    output goes through us to ``out`` and ``on_ready()`` runs when it is ready."""
    if console:
        proc = subprocess.Popen(argv)
        copy = None
    else:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        assert proc.stdout is not None
        copy = _FrontOutput(proc.stdout, out or sys.stdout, on_ready or (lambda: None))
    stopping: list[int] = []
    exit_died = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGINT and console:
            return  # the terminal delivered Ctrl-C to mitmproxy too; it asks whether to quit
        stopping.append(signum)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop_by: float | None = None
        while proc.poll() is None:
            if stopping and stop_by is None:
                stop_by = time.monotonic() + STOP_TIMEOUT
            if stop_by is not None and time.monotonic() > stop_by:
                logger.warning("%s did not stop within %g s; killing it", argv[0], STOP_TIMEOUT)
                proc.kill()
                stop_by = float("inf")
            if not stopping and exit_process.poll() is not None:
                logger.error(
                    "the exit peer stopped (status %s); stopping %s",
                    exit_process.returncode,
                    argv[0],
                )
                exit_died = True
                forward(signal.SIGTERM, None)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.25)
    finally:
        _stop_process(proc)  # returns at once when it has exited; never leaves it behind
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if copy is not None:
            copy.copier.join(STOP_TIMEOUT)  # EOF follows the exit
            assert proc.stdout is not None
            proc.stdout.close()
    code = proc.returncode
    if exit_died:
        return 1
    # Stopped by our own SIGTERM: that is the normal way out of the demo.
    return 0 if stopping and code in (0, -signal.SIGTERM) else code


def run(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    """``mitm-wg demo``: returns the exit status (raises DemoError for user-facing failures)."""
    out = out or sys.stdout
    extra = list(args.mitmproxy_args or ())
    if extra and extra[0] == "--":
        extra = extra[1:]
    if not 1 <= args.port <= 65535:
        raise DemoError(f"--port must be 1..65535, not {args.port}")
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    tool = choose_tool(web=args.web, dump=args.dump, interactive=interactive)
    tool_path = find_tool(tool)
    addon = find_addon()
    if port_in_use("127.0.0.1", args.port):
        raise DemoError(f"127.0.0.1:{args.port} is already in use; choose another with --port")
    # SIGTERM outside _run_front: leave through the finally blocks (stop, clean up).
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="mitm-wg-demo-"))
    try:
        with exit_peer(workdir) as peer:
            cacert = confdir_from_args(extra) / "mitmproxy-ca-cert.pem"
            text = instructions(tool, args.port, peer, cacert)
            argv = front_argv(tool_path, addon, peer.client_conf, args.port, extra)
            if tool == "mitmproxy":
                # The console takes over the screen: give the text a chance to be read first.
                print(text, file=out, flush=True)
                input("Press Enter to start mitmproxy (Ctrl-C to quit) ")
                code = _run_front(argv, peer.process, console=True)
            else:

                def ready() -> None:
                    print(f"\n{text}{READY_LINE.format(port=args.port)}", file=out, flush=True)

                code = _run_front(argv, peer.process, console=False, out=out, on_ready=ready)
    except (KeyboardInterrupt, EOFError):
        code = 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)
    print(f"mitm-wg demo: stopped (status {code})", file=out, flush=True)
    return code


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt
