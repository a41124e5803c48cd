"""Network namespaces for the interop harness: creation, commands, sockets and cleanup.

Everything here needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN). Names are claimed atomically with
``ip netns add`` and recorded with an owner file under ``STATE_DIR`` so that a later run can
recognise (and remove) namespaces left behind by a crashed run without touching namespaces of
a concurrently running test session.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NETNS_DIR = Path("/var/run/netns")
WG_SOCKET_DIR = Path("/var/run/wireguard")
STATE_DIR = Path("/var/run/mitm-wg-harness")
CLONE_NEWNET = 0x40000000
COMMAND_TIMEOUT = 20.0
SETTLE_TIMEOUT = 20.0
# IPv6 duplicate address detection is off in our namespaces (every address we add is
# ``nodad`` too): the kernel's own link-local addresses would otherwise stay "tentative" for
# 1-2 s after a link comes up, and the moment DAD ends is an address change for which
# clients watching netlink abort pending connections (Chromium: net::ERR_NETWORK_CHANGED).
_NAMESPACE_SYSCTLS = ("net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")

_libc: ctypes.CDLL | None = None
_probe_result: tuple[bool, str] | None = None
_probe_lock = threading.Lock()

# Every namespace and process this Python process created and has not cleaned up yet; the
# harness's own tests assert that it is empty afterwards.
_live_namespaces: set[str] = set()
_live_processes: dict[int, subprocess.Popen[Any]] = {}
_registry_lock = threading.Lock()


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def have_netns() -> tuple[bool, str]:
    """Whether the interop harness can run here: ``(usable, reason)``.

    Checks for root, ``ip``, ``wireguard-go``, ``wg``, ``/dev/net/tun`` and that a namespace can
    really be created (the result of that probe is cached for the process).
    """
    global _probe_result
    if os.geteuid() != 0:
        return False, "needs root (network namespaces)"
    for tool in ("ip", "wireguard-go", "wg"):
        if shutil.which(tool) is None:
            return (
                False,
                f"{tool!r} not found on PATH (apt-get install wireguard-go wireguard-tools iproute2)",
            )
    if not os.path.exists("/dev/net/tun"):
        return False, "/dev/net/tun missing (wireguard-go needs a TUN device)"
    with _probe_lock:
        if _probe_result is None:
            name = f"mwgprobe{os.getpid()}"
            r = subprocess.run(
                ["ip", "netns", "add", name],
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT,
            )
            if r.returncode != 0:
                _probe_result = (False, f"'ip netns add' failed: {r.stderr.strip()}")
            else:
                subprocess.run(
                    ["ip", "netns", "del", name], capture_output=True, timeout=COMMAND_TIMEOUT
                )
                _probe_result = (True, "ok")
        return _probe_result


def run(argv: Sequence[str], *, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command in the host namespace (text mode, captured output, timeout)."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", COMMAND_TIMEOUT)
    r = subprocess.run(list(argv), **kw)
    if check and r.returncode != 0:
        raise subprocess.CalledProcessError(r.returncode, list(argv), r.stdout, r.stderr)
    return r


def list_namespaces() -> list[str]:
    """Names of all named network namespaces on the machine."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may contain spaces and parentheses: split after the last ')'
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_token() -> str:
    return f"{os.getpid()} {_proc_start_time(os.getpid())}"


def _owner_alive(token: str) -> bool:
    try:
        pid_s, start = token.split()
        pid = int(pid_s)
    except ValueError:
        return False
    return _proc_start_time(pid) == start


def _is_gone(pid: int) -> bool:
    """The process no longer runs (absent, or a zombie waiting for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _kill_pid(pid: int, timeout: float = 3.0) -> None:
    """SIGTERM, wait (for our children) or poll, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    proc = _live_processes.get(pid)
    if proc is not None:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        return
    # not our child (e.g. a grandchild or a leftover of a crashed run): poll /proc
    for _ in range(int(timeout / 0.05)):
        if _is_gone(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def namespace_pids(name: str) -> list[int]:
    r = run(["ip", "netns", "pids", name], check=False)
    return [int(x) for x in r.stdout.split() if x.isdigit()] if r.returncode == 0 else []


def cleanup_stale(prefix: str) -> list[str]:
    """Remove namespaces named ``prefix...`` whose owning harness process is gone.

    Kills the processes inside them (they were started by that crashed run) and removes
    their wireguard-go control sockets. Returns the names removed.
    """
    removed = []
    for name in list_namespaces():
        if not name.startswith(prefix):
            continue
        owner_file = STATE_DIR / name
        try:
            token = owner_file.read_text()
        except OSError:
            continue  # not created by this harness (no owner record): leave it alone
        if _owner_alive(token):
            continue
        log.warning("removing stale namespace %s left by a previous run", name)
        for pid in namespace_pids(name):
            _kill_pid(pid)
        run(["ip", "netns", "del", name], check=False)
        owner_file.unlink(missing_ok=True)
        removed.append(name)
    # owner files without a namespace (crash between add and record)
    if STATE_DIR.exists():
        existing = set(list_namespaces())
        for f in STATE_DIR.iterdir():
            if f.name.startswith(prefix) and f.name not in existing:
                with contextlib.suppress(OSError):
                    if not _owner_alive(f.read_text()):
                        f.unlink()
    return removed


class Netns:
    """A named network namespace owned by this process.

    Create with :meth:`create` (or ``Netns.claim``); always :meth:`close` it (it is also a
    context manager). ``close`` kills every process started with :meth:`popen` and any other
    process still inside the namespace, then deletes it.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._procs: list[subprocess.Popen[Any]] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    @classmethod
    def create(cls, name: str) -> Netns:
        """Create namespace ``name`` (raises FileExistsError if it exists), bring ``lo`` up."""
        ns = cls.claim(name)
        if ns is None:
            raise FileExistsError(f"network namespace {name!r} already exists")
        return ns

    @classmethod
    def claim(cls, name: str) -> Netns | None:
        """Atomically create namespace ``name``; None if the name is taken."""
        r = run(["ip", "netns", "add", name], check=False)
        if r.returncode != 0:
            if (NETNS_DIR / name).exists():
                return None
            raise RuntimeError(f"ip netns add {name} failed: {r.stderr.strip()}")
        STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        (STATE_DIR / name).write_text(_owner_token())
        with _registry_lock:
            _live_namespaces.add(name)
        ns = cls(name)
        try:
            # before any link exists, so every link created in (or moved into) the namespace
            # inherits it from ``default``
            ns.exec(["sysctl", "-q", "-w", *_NAMESPACE_SYSCTLS])
            ns.ip("link", "set", "lo", "up")
        except BaseException:
            ns.close()
            raise
        return ns

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands -------------------------------------------------------------------------
    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def exec(
        self, argv: Sequence[str], *, check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace and wait (text mode, output captured)."""
        return run(self.argv(argv), check=check, **kw)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip -n NAME args...``."""
        return run(["ip", "-n", self.name, *args], check=check)

    # -- settling ---------------------------------------------------------------------------
    def unsettled(self) -> list[str]:
        """What is still changing in the namespace's links and addresses (empty: settled).

        Unsettled are: a link that is up but has no carrier yet (``LOWER_UP``: the kernel
        reports carrier changes asynchronously, through its link-watch work); an IPv6 address
        still ``tentative`` (duplicate address detection running; ``dadfailed`` raises); an up
        link with carrier that should get a kernel-made IPv6 link-local address (address
        generation mode other than ``none``) but has none yet. Each of these ends in a netlink
        address/link event that programs watching the network treat as "the network changed".
        """
        links = json.loads(self.ip("-j", "-d", "link", "show").stdout or "[]")
        addrs = json.loads(self.ip("-j", "addr", "show").stdout or "[]")
        problems = []
        by_name = {a.get("ifname"): a.get("addr_info", []) for a in addrs}
        for link in links:
            name = link.get("ifname", "?")
            flags = link.get("flags", [])
            infos = by_name.get(name, [])
            for info in infos:
                address = f"{name} {info.get('local')}/{info.get('prefixlen')}"
                if info.get("dadfailed"):
                    raise RuntimeError(f"{self.name}: {address} failed duplicate address detection")
                if info.get("tentative"):
                    problems.append(f"{address} is tentative (IPv6 duplicate address detection)")
            if "UP" not in flags or "LOOPBACK" in flags:
                continue
            if "LOWER_UP" not in flags:
                problems.append(f"{name} is up but has no carrier yet")
            elif link.get("inet6_addr_gen_mode", "none") != "none" and not any(
                i.get("family") == "inet6" and i.get("scope") == "link" for i in infos
            ):
                problems.append(f"{name} has no IPv6 link-local address yet")
        return problems

    def settle(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait until :meth:`unsettled` is empty (TimeoutError naming what is not, after
        ``timeout`` s).

        Call it after creating links/addresses and before starting a client that must not
        see the network change under it (Chromium aborts page loads with
        ``net::ERR_NETWORK_CHANGED`` on any address change). Cheap once settled: two ``ip``
        queries.
        """
        deadline = time.monotonic() + timeout
        problems = self.unsettled()
        waited = bool(problems)
        while problems:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"namespace {self.name} did not settle within {timeout} s: "
                    + "; ".join(problems)
                )
            time.sleep(0.02)
            problems = self.unsettled()
        if waited:
            log.debug("namespace %s settled", self.name)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a long-running command inside the namespace; killed (by PID) on close.

        ``ip netns exec`` execs the command, so ``proc.pid`` is the command's own PID.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(argv), **kw)
        self._procs.append(proc)
        with _registry_lock:
            _live_processes[proc.pid] = proc
        return proc

    def kill(self, proc: subprocess.Popen[Any], timeout: float = 3.0) -> None:
        """Terminate one process started with :meth:`popen` (SIGTERM, then SIGKILL)."""
        if proc.poll() is None:
            _kill_pid(proc.pid, timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
        if proc in self._procs:
            self._procs.remove(proc)
        with _registry_lock:
            _live_processes.pop(proc.pid, None)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    def pids(self) -> list[int]:
        """PIDs of all processes inside the namespace."""
        return namespace_pids(self.name)

    # -- sockets ----------------------------------------------------------------------------
    def socket(
        self, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM, proto: int = 0
    ) -> socket.socket:
        """Create a socket INSIDE this namespace.

        A short-lived thread enters the namespace with ``setns(2)`` (the network namespace is
        per thread), creates the socket and ends. The socket stays bound to this namespace for
        its lifetime and can be used from any thread (or wrapped with
        ``trio.socket.from_stdlib_socket``) in this process.
        """
        result: list[socket.socket] = []
        error: list[BaseException] = []

        def enter_and_create() -> None:
            try:
                fd = os.open(NETNS_DIR / self.name, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _get_libc().setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns({self.name}): {os.strerror(err)}")
                finally:
                    os.close(fd)
                result.append(socket.socket(family, type, proto))
            except BaseException as e:
                error.append(e)

        t = threading.Thread(target=enter_and_create, name=f"setns-{self.name}", daemon=True)
        t.start()
        t.join()
        if error:
            raise error[0]
        return result[0]

    def free_udp_port(self, address: str = "127.0.0.1") -> int:
        """A UDP port free on ``address`` inside this namespace right now (bound, then
        released: for a server the test starts next)."""
        sock = self.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((address, 0))
            return int(sock.getsockname()[1])
        finally:
            sock.close()

    # -- teardown ---------------------------------------------------------------------------
    def close(self) -> None:
        """Kill our processes and everything else inside, delete the namespace. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for proc in list(self._procs):
            self.kill(proc)
        for pid in self.pids():
            _kill_pid(pid)
        run(["ip", "netns", "del", self.name], check=False)
        (STATE_DIR / self.name).unlink(missing_ok=True)
        with _registry_lock:
            _live_namespaces.discard(self.name)


def track_process(proc: subprocess.Popen[Any]) -> None:
    """Record a process started outside :meth:`Netns.popen` for :func:`live_resources`."""
    with _registry_lock:
        _live_processes[proc.pid] = proc


def untrack_process(proc: subprocess.Popen[Any]) -> None:
    with _registry_lock:
        _live_processes.pop(proc.pid, None)


def live_resources() -> dict[str, list[str]]:
    """What this process created and has not cleaned up (for leak assertions)."""
    with _registry_lock:
        procs = [f"{pid}: {p.args!r}" for pid, p in _live_processes.items() if p.poll() is None]
        return {"namespaces": sorted(_live_namespaces), "processes": procs}


@contextlib.contextmanager
def netns(name: str) -> Iterator[Netns]:
    """Context manager form of :meth:`Netns.create`."""
    ns = Netns.create(name)
    try:
        yield ns
    finally:
        ns.close()
