"""Receive groups: when the kernel grants the tunnel only a small UDP receive buffer, it
receives on several sockets bound to one port, each with a buffer of its own.

An unprivileged process gets at most ``net.core.rmem_max`` for a socket's receive buffer:
on a stock Linux kernel 208 KiB, which the kernel doubles to 416 KiB, ~110 of the
datagrams a download brings. A fast download comes in bursts of 100–120 datagrams within
a millisecond (a server's TSO bursts, paced only by the path's bottleneck), and the
buffer overflows while the tunnel works through the previous batch or waits for a CPU;
the kernel drops what does not fit, and TCP inside the tunnel has to recover.

Linux lets sockets of one user that all set ``SO_REUSEPORT`` bind the same port (a
*group*); a classic BPF program attached to the group picks the socket for each datagram
(``SO_ATTACH_REUSEPORT_CBPF``), and each socket has its own buffer, so a group of
:data:`GROUP_MAX` sockets holds that many times the burst. Ours (:func:`picked`) picks by
the WireGuard transport counter, which the sender increments per datagram: runs of
``2**RUN_SHIFT`` consecutive counters go to one socket, the next run to another, so a
burst spreads over the whole group and each socket's queue stays in counter order.
Datagrams too short to carry a counter (none are valid) go to the first socket.

The reader drains the sockets of the group that have datagrams after a wake-up, until
none has (:class:`GroupReader`), and hands the device, per endpoint, what it read in
counter order again (:func:`in_order`): TCP inside the tunnel sees the datagrams in the
order they were sent, as from one socket. (A rekey starts a session at counter 0: a
wake-up that reads datagrams of both sessions from two sockets gives the new session's
first, which only costs a moment's reordering every two minutes; handshake messages,
which carry no counter, come first.)

The port: the group binds the port a plain socket got from the kernel's ephemeral range
(free of every socket then, grouped or not) the moment that socket closes. The kernel
lets a later ``SO_REUSEPORT`` bind to port 0 by the same user land in an existing group,
so the group itself never binds port 0. A config's ListenPort is never grouped: a second
program with the same port must fail to bind it, not share its datagrams. (Another
process of the same user may still join the group by binding its port with
``SO_REUSEPORT``, but is never picked: the program returns only the group's own indexes.
Another user's cannot bind it at all.)

Sends go out of the group's first socket (the source port is the same for all).
"""

from __future__ import annotations

import ctypes
import logging
import select
import socket
import struct
import sys
from collections.abc import Callable

__all__ = [
    "GROUP_MAX",
    "RUN_SHIFT",
    "GroupReader",
    "group_size",
    "in_order",
    "open_group",
    "picked",
    "udp_socket",
    "wg_order",
]

logger = logging.getLogger(__name__)

#: The most sockets in a group (each costs a descriptor, and memory while its buffer fills).
GROUP_MAX = 8
#: log2 of the run of consecutive counters that goes to one socket.
RUN_SHIFT = 3
#: Linux's socket option (asm-generic/socket.h; not in Python's socket module).
SO_ATTACH_REUSEPORT_CBPF = 51

# classic BPF opcodes (linux/bpf_common.h, linux/filter.h)
_LD_B_ABS = 0x00 | 0x10 | 0x20  # BPF_LD | BPF_B | BPF_ABS: A = the byte at k
_LD_MEM = 0x00 | 0x60  # BPF_LD | BPF_MEM: A = M[k]
_ST = 0x02  # BPF_ST: M[k] = A
_TAX = 0x07 | 0x00  # BPF_MISC | BPF_TAX: X = A
_ALU_ADD_X = 0x04 | 0x00 | 0x08  # BPF_ALU | BPF_ADD | BPF_X: A += X
_ALU_LSH_K = 0x04 | 0x60  # A <<= k
_ALU_RSH_K = 0x04 | 0x70  # A >>= k
_ALU_MOD_K = 0x04 | 0x90  # A %= k
_RET_A = 0x06 | 0x10  # BPF_RET | BPF_A: return A
_INSN = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
_FPROG = struct.Struct("@HP")  # struct sock_fprog: len, filter pointer
#: The transport counter (little-endian, 64 bits) at offset 8 of the UDP payload (after
#: the type and the receiver index), where a reuseport program's loads start.
_COUNTER = 8
_TRANSPORT = 4
_MIX = 6  # (see picked)


def _picker(count: int) -> bytes:
    """The classic BPF program of :func:`picked` (a load past a short datagram's end ends
    it returning 0: the first socket)."""
    return b"".join(
        _INSN.pack(code, 0, 0, k)
        for code, k in (
            (_LD_B_ABS, _COUNTER),  # the counter's low 16 bits, c
            (_ST, 0),
            (_LD_B_ABS, _COUNTER + 1),
            (_ALU_LSH_K, 8),
            (_TAX, 0),
            (_LD_MEM, 0),
            (_ALU_ADD_X, 0),
            (_ST, 0),
            (_ALU_RSH_K, _MIX),  # c >> 6
            (_TAX, 0),
            (_LD_MEM, 0),
            (_ALU_RSH_K, RUN_SHIFT),  # c >> 3
            (_ALU_ADD_X, 0),
            (_ALU_MOD_K, count),
            (_RET_A, 0),
        )
    )


def _pick(counter: int, count: int) -> int:
    c = counter & 0xFFFF
    return ((c >> RUN_SHIFT) + (c >> _MIX)) % count


def picked(datagram: bytes | memoryview, count: int) -> int:
    """The socket (index) the group's program gives ``datagram`` in a group of ``count``:
    ``((c >> 3) + (c >> 6)) % count`` of the counter's low 16 bits ``c``. Runs of 8
    consecutive counters go to the sockets in turn; the ``c >> 6`` term turns the order by
    one every 64, so that runs of 64 (the GSO runs wireguard-go sends, which arrive as one
    datagram each to a GRO socket and are picked by their first counter) spread too."""
    if len(datagram) < _COUNTER + 2:
        return 0
    return _pick(datagram[_COUNTER] | datagram[_COUNTER + 1] << 8, count)


def group_size(granted: int, wanted: int) -> int:
    """How many sockets make up ``wanted`` bytes of receive buffer when the kernel grants
    ``granted`` per socket (both as the kernel reports them): a power of two (the picker
    spreads runs of 64 over those; over 3 it would not), at most :data:`GROUP_MAX`; 1 (no
    group) off Linux."""
    if sys.platform != "linux" or not hasattr(socket, "SO_REUSEPORT") or granted <= 0:
        return 1
    count = 1
    while count < GROUP_MAX and count * granted < wanted:
        count *= 2
    return count


def udp_socket(family: int) -> socket.socket:
    """An unbound UDP socket of ``family`` (a group's member; the runtime's path probes)."""
    return socket.socket(family, socket.SOCK_DGRAM)


def open_group(
    first: socket.socket,
    count: int,
    setup: Callable[[socket.socket], None],
    new_socket: Callable[[int], socket.socket] = udp_socket,
) -> list[socket.socket]:
    """Replace ``first`` (bound to an ephemeral port) by a group of ``count`` sockets on
    its port, made by ``new_socket(family)`` (unbound, where ``first`` was made: a network
    namespace, say) and passed through ``setup`` (non-blocking, buffers). Where the kernel
    refuses (the port taken meanwhile, no classic BPF) a debug line says why, and the
    group is one socket on a new ephemeral port: the tunnel receives as before."""
    family = first.family
    host, port = first.getsockname()[:2]
    first.close()
    group: list[socket.socket] = []
    try:
        for i in range(count):
            sock = new_socket(family)
            group.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            if i == 0:  # the program before the others join: no datagram finds it missing
                code = _picker(count)
                program = ctypes.create_string_buffer(code, len(code))
                fprog = _FPROG.pack(len(code) // _INSN.size, ctypes.addressof(program))
                sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
            setup(sock)
    except OSError as e:
        for sock in group:
            sock.close()
        logger.debug("no receive group on port %d (%s): one socket", port, e)
        sock = new_socket(family)
        try:
            sock.bind((host, 0))
            setup(sock)
        except OSError:
            sock.close()
            raise
        return [sock]
    return group


class GroupReader:
    """A group's sockets as its reader sees them: an epoll set (readable while any of them
    has datagrams) that says which have.

    The reader (``Tunnel._drain_group``) reads those that have, asks again, and so on
    until none has (or it has read as many as the sockets' batches together): when none
    has, every datagram that came before that moment has been read, so none still waiting
    is older than one read, and what it read, merged (:func:`in_order`), is in the
    sender's order. (Each pass is shorter than the one before: reading takes a few
    microseconds a datagram, a fraction of the time between two on the fastest paths.)
    Reading the sockets only once would leave datagrams that reach an already read socket
    while a later one is read, older than some read from that one: TCP inside the tunnel
    would see them out of order (in the lab, 260 reorderings per 300 MiB at 50 ms, which
    the server counted)."""

    __slots__ = ("_by_fd", "poller", "sockets")

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets
        self.poller = select.epoll()
        self._by_fd: dict[int, socket.socket] = {}
        for sock in sockets:
            self._by_fd[sock.fileno()] = sock
            self.poller.register(sock.fileno(), select.EPOLLIN)

    def ready(self) -> list[socket.socket]:
        """The sockets with datagrams waiting now."""
        by_fd = self._by_fd
        return [by_fd[fd] for fd, _ in self.poller.poll(0)]

    def close(self) -> None:
        self.poller.close()


def wg_order(datagram: bytes | memoryview) -> int:
    """The sort key that puts WireGuard transport messages in counter order (the
    counter), and the messages that carry none (handshakes, cookie replies: -1) first."""
    if datagram[0] == _TRANSPORT and len(datagram) >= 16:
        return int.from_bytes(datagram[8:16], "little")
    return -1


def in_order(runs: list[list[bytes | memoryview]]) -> list[bytes | memoryview]:
    """The datagrams of one endpoint read from several sockets of a group (each run in its
    socket's order), as one run in counter order (:func:`wg_order`; stable)."""
    merged = [datagram for run in runs for datagram in run]
    merged.sort(key=wg_order)
    return merged
