"""Why an endpoint does not answer the handshake, when the network says so: ICMP errors.

A handshake that goes unanswered looks the same from our side whatever the cause: nothing
comes back. Often the network did say why: a host whose WireGuard server is stopped, or an
``Endpoint`` with a wrong port, answers with ICMP port unreachable; a router that has no
way to the host with host or network unreachable; a firewall that rejects (rather than
drops) UDP with administratively prohibited. Our UDP sockets never see those
errors: Linux reports ICMP errors to a UDP socket only when it is connected (and then only
those it deems hard: port unreachable, say, not a router's network or host unreachable), or
when it asked for them with ``IP_RECVERR`` (every error), and then a pending error fails
whatever send or receive comes next on the socket: every send path of ours would have to
expect that.

So when an initiation has gone unanswered for :data:`PROBE_AFTER` seconds, the runtime
asks once: a UDP socket like ours, connected to the endpoint and with ``IP_RECVERR`` on
(whose error queue gives the ICMP type, code and sender), sends it one zero byte
(:func:`send_probe`), which is no WireGuard message (shorter than any: wireguard-go drops
it without a word even in its verbose log, mitmproxy's WireGuard mode logs "Received
invalid WireGuard packet"), ahead of the initiation retried at the same moment (hosts and
routers ration their ICMP errors), and waits up to :data:`PROBE_WAIT` seconds for an error
(:func:`probe_answer`). At most one probe per endpoint every :data:`PROBE_INTERVAL`
seconds. A peer's silence says nothing either way (a firewall that drops, a host that is
down, a wrong key); only an error is reported (:func:`describe`): in the
:class:`~mitm_wg.errors.HandshakeTimeout` (its ``cause``, which the check CLI prints), the
give-up warning, and the reason an exit pool gives for taking a member out.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass

import trio

from mitm_wg.config import format_endpoint

__all__ = [
    "PROBE_AFTER",
    "PROBE_INTERVAL",
    "PROBE_WAIT",
    "IcmpError",
    "describe",
    "probe_answer",
    "send_probe",
]

#: Seconds an initiation goes unanswered (with no session to send on) before the endpoint
#: is probed: when a first handshake's early retry goes (``EARLY_RETRY_UNMEASURED``). A
#: path that only lost an initiation costs its server one ignored byte, at most every
#: ``PROBE_INTERVAL``.
PROBE_AFTER = 1.0
#: Seconds the probe waits for an ICMP error; longer than a router's answer takes, and
#: than the ~3 s Linux spends resolving a neighbour on the local link before it reports
#: the host unreachable itself.
PROBE_WAIT = 4.0
#: Seconds between two probes of one endpoint.
PROBE_INTERVAL = 30.0

#: Socket options (Linux <linux/in.h>, <linux/in6.h>; not in Python's socket module).
_IP_RECVERR = 11
_IPV6_RECVERR = 25
#: ``MSG_ERRQUEUE`` (Linux <linux/socket.h>) and the queued error's header,
#: ``struct sock_extended_err`` (<linux/errqueue.h>): errno, origin, ICMP type and code,
#: pad, info, data; the sender's sockaddr follows it.
_MSG_ERRQUEUE = 0x2000
_EXTENDED_ERR = struct.Struct("=IBBBBII")
_ORIGIN_ICMP = 2
_ORIGIN_ICMP6 = 3
#: ICMP destination unreachable (type 3) and ICMPv6's (type 1) codes, by what they say.
_ICMP4_UNREACH = {
    0: "network unreachable",
    1: "host unreachable",
    2: "protocol unreachable",
    3: "port unreachable",
    9: "network administratively prohibited",
    10: "host administratively prohibited",
    13: "communication administratively prohibited",
}
_ICMP6_UNREACH = {
    0: "no route to destination",
    1: "communication administratively prohibited",
    3: "address unreachable",
    4: "port unreachable",
}
#: Without the error queue's detail: what a socket's errno says (Linux's icmp_err_convert).
_BY_ERRNO = {
    errno.ECONNREFUSED: "port unreachable",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
}


@dataclass(frozen=True, slots=True)
class IcmpError:
    """What came back for a probe: ``what`` the ICMP message said ("port unreachable",
    "communication administratively prohibited", ...), and ``sender``, the address of the
    host or router that sent it (None: unknown)."""

    what: str
    sender: str | None = None

    @property
    def port_unreachable(self) -> bool:
        return self.what == "port unreachable"

    @property
    def prohibited(self) -> bool:
        return "prohibited" in self.what


#: Destination unreachable, by (origin, ICMP type): what its codes say.
_UNREACH = {(_ORIGIN_ICMP, 3): _ICMP4_UNREACH, (_ORIGIN_ICMP6, 1): _ICMP6_UNREACH}
#: The sender's address in the sockaddr after the header, by family: (offset, length).
_ADDRESS_AT = {socket.AF_INET: (4, 4), socket.AF_INET6: (8, 16)}


def _sender(offender: bytes) -> str | None:
    """The address in the ``sockaddr_in`` or ``sockaddr_in6`` ``offender`` (None: neither)."""
    family = int.from_bytes(offender[:2], sys.byteorder)
    at = _ADDRESS_AT.get(family)
    if at is None or len(offender) < at[0] + at[1]:
        return None
    return socket.inet_ntop(family, offender[at[0] : at[0] + at[1]])


def _queued(sock: socket.socket, error: OSError) -> IcmpError:
    """The error at the head of ``sock``'s error queue (``IP_RECVERR``), which ``error``
    (what the socket's call raised) announced; from ``error`` alone if the queue says
    nothing."""
    try:
        _, ancdata, _, _ = sock.recvmsg(1, 512, _MSG_ERRQUEUE)
    except OSError:
        ancdata = []
    for level, kind, data in ancdata:
        if (level, kind) not in (
            (socket.IPPROTO_IP, _IP_RECVERR),
            (socket.IPPROTO_IPV6, _IPV6_RECVERR),
        ) or len(data) < _EXTENDED_ERR.size:
            continue
        _, origin, icmp_type, code, _, _, _ = _EXTENDED_ERR.unpack_from(data)
        if origin not in (_ORIGIN_ICMP, _ORIGIN_ICMP6):
            continue
        sender = _sender(data[_EXTENDED_ERR.size :])
        codes = _UNREACH.get((origin, icmp_type))
        if codes is None:
            return IcmpError(f"type {icmp_type} code {code}", sender)
        return IcmpError(codes.get(code, f"destination unreachable (code {code})"), sender)
    number = error.errno or 0
    return IcmpError(_BY_ERRNO.get(number) or errno.errorcode.get(number, str(number)))


def send_probe(
    make_socket: Callable[[int], socket.socket], endpoint: tuple[str, int]
) -> socket.socket | None:
    """The probe's first half, done at once: a UDP socket of ``make_socket`` connected to
    ``endpoint`` with ``IP_RECVERR`` on, which has sent it one zero byte; None if the probe
    could not be sent (no route is the send path's business, which says so).

    At once, so that the caller sends it ahead of whatever else it sends to the endpoint in
    the same moment (the retried initiation that comes due with it): hosts and routers
    ration their ICMP errors per destination (Linux: a burst of six, then one a second;
    a router also spends from the ration for each datagram it cannot forward, answered
    or not), and when the ration has one error left, it goes to the first datagram. The
    probe's is the one error anything of ours reads."""
    family = socket.AF_INET6 if ":" in endpoint[0] else socket.AF_INET
    try:
        sock = make_socket(family)
    except OSError:
        return None
    try:
        sock.setblocking(False)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
        sock.connect(endpoint)
        sock.sendto(b"\0", endpoint)  # (sendto: a recording socket of the tests sees it)
    except OSError:
        sock.close()
        return None
    return sock


async def probe_answer(sock: socket.socket, wait: float) -> IcmpError | None:
    """The probe's second half: wait up to ``wait`` seconds for what came back to ``sock``
    (of :func:`send_probe`), and close it: the ICMP error, or None (nothing came, or an
    answer)."""
    try:
        with trio.move_on_after(wait):
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    sock.recv(1)
                except BlockingIOError:
                    continue
                except OSError as e:
                    return _queued(sock, e)
                return None  # an answer, not an error
    except OSError:
        return None
    finally:
        sock.close()
    return None


def describe(endpoint: tuple[str, int], error: IcmpError) -> str:
    """A clause for the user: what ``error`` (of :func:`probe_answer`) says about
    ``endpoint``."""
    host = endpoint[0]
    if error.port_unreachable:
        return (
            f"its host answered that nothing receives on UDP port {endpoint[1]} (ICMP port "
            "unreachable): is the Endpoint's port right, and is the WireGuard server "
            "running?"
        )
    who = "the network" if error.sender is None else error.sender
    if error.sender == host:
        who = "its host"
    if error.prohibited:
        return (
            f"{who} answered the way to {format_endpoint(endpoint)} with ICMP {error.what}: "
            "a firewall on the way blocks it (a network that lets only the web through, "
            "say)"
        )
    return (
        f"{who} answered the way to {format_endpoint(endpoint)} with ICMP {error.what} (a "
        "host that is down, or a router on the way that has no route there)"
    )
