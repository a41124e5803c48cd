"""Why an endpoint does not answer the handshake, when the network says so: ICMP errors.

A handshake that goes unanswered looks the same from our side whatever the cause: nothing
comes back. Often the network did say why: a host whose WireGuard server is stopped, or an
``Endpoint`` with a wrong port, answers with ICMP port unreachable, and a router that has
no way to the host with host or network unreachable. Our UDP sockets never see those
errors: Linux reports ICMP errors to a UDP socket only when it is connected (and then only
those it deems hard: port unreachable, say, not a router's network or host unreachable), or
when it asked for them with ``IP_RECVERR`` (every error), and then a pending error fails
whatever send or receive comes next on the socket: every send path of ours would have to
expect that.

So when an initiation has gone unanswered for :data:`PROBE_AFTER` seconds, the runtime
asks once (:func:`icmp_error`): a UDP socket like ours, connected to the endpoint and with
``IP_RECVERR`` on, sends it one zero byte, which is no WireGuard message (shorter than any:
wireguard-go drops it without a word even in its verbose log, mitmproxy's WireGuard mode
logs "Received invalid WireGuard packet"), and waits up to :data:`PROBE_WAIT` seconds for
an error. At most one probe per endpoint every :data:`PROBE_INTERVAL` seconds. A peer's
silence says nothing either way (a firewall that drops, a host that is down, a wrong key);
only an error is reported (:func:`describe`): in the :class:`~mitm_wg.errors.HandshakeTimeout`
(its ``cause``, which the check CLI prints), the give-up warning, and the reason an exit
pool gives for taking a member out.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

import trio

from mitm_wg.config import format_endpoint

__all__ = ["PROBE_AFTER", "PROBE_INTERVAL", "PROBE_WAIT", "describe", "icmp_error"]

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
#: What a socket's error says (Linux's icmp_err_convert, RFC 1122 §4.1.3.3).
_WHAT = {
    errno.ECONNREFUSED: "port unreachable",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.EPROTO: "protocol unreachable",
}


async def icmp_error(
    make_socket: Callable[[int], socket.socket], endpoint: tuple[str, int], wait: float
) -> int | None:
    """Send ``endpoint`` one zero byte from a UDP socket of ``make_socket`` connected to it
    and wait up to ``wait`` seconds: the errno of the ICMP error that came back, or None
    (nothing came, or an answer, or the probe could not be sent: no route is the send
    path's business, which says so)."""
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
        with trio.move_on_after(wait):
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    sock.recv(1)
                except BlockingIOError:
                    continue
                except OSError as e:
                    return e.errno
                return None  # an answer, not an error
    except OSError:
        return None
    finally:
        sock.close()
    return None


def describe(endpoint: tuple[str, int], error: int) -> str:
    """A clause for the user: what the ICMP error ``error`` (an errno of
    :func:`icmp_error`) says about ``endpoint``."""
    if error == errno.ECONNREFUSED:
        return (
            f"its host answered that nothing receives on UDP port {endpoint[1]} (ICMP port "
            "unreachable): is the Endpoint's port right, and is the WireGuard server "
            "running?"
        )
    what = _WHAT.get(error) or errno.errorcode.get(error, str(error))
    return (
        f"the network answered the way to {format_endpoint(endpoint)} with ICMP {what} (a "
        "host that is down, or a router or firewall on the way that refuses it)"
    )
