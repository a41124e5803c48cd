"""Real-peer test harness for mitm-wg: namespaces, wireguard-go, mitmproxy's WireGuard mode.

Import it as ``harness`` from tests (pytest puts ``tests/`` on ``sys.path`` through
``tests/conftest.py``)::

    from harness import exit_peer, ImpairedRelay, Impairment, wireguard_go_interface

Fixtures (tests/conftest.py): ``exit_peer`` (module scope, with dnsmasq), ``fresh_exit_peer``
(function scope), ``mitm_peer`` (module scope), ``netns_available``. A test using any of them
is marked ``interop`` automatically. Without root/wireguard-go they skip; with ``CI=true`` a
skipped ``interop`` test is a failure. ``require_netns()`` / ``require_mitmdump()`` do the
same check by hand.

Needs (Debian): ``apt-get install -y --no-install-recommends wireguard-go wireguard-tools
dnsmasq-base iproute2 curl``, root, ``/dev/net/tun``. No kernel WireGuard, no tc.

Exit peer (:func:`exit_peer`, :class:`ExitPeer`)
    ``with exit_peer(ipv6=True, http=True, dnsmasq=False, name_prefix="mwg") as peer:``
    Two namespaces joined by a veth pair: ``peer.ns`` runs wireguard-go (UDP 51820 at
    ``peer.endpoint == ("10.77.N.2", 51820)``, also ``peer.endpoint_v6``), the Linux TCP stack,
    an HTTP/1.1 server and optionally dnsmasq; ``peer.client_ns`` (10.77.N.1) is where OUR
    code's UDP socket must live::

        sock = peer.client_ns.socket(socket.AF_INET, socket.SOCK_DGRAM)   # stdlib socket
        tsock = trio.socket.from_stdlib_socket(sock)                      # for trio code
        config = peer.client_config_text()            # wg-quick text for our side
        config = peer.client_config_text(allowed_ips="0.0.0.0/0", keepalive=25,
                                         endpoint=relay.address)

    Inside the tunnel: server ``peer.server_tunnel_v4`` 10.78.N.1 / ``server_tunnel_v6``
    fd00:78:N::1, client ``client_tunnel_v4`` 10.78.N.2 / ``client_tunnel_v6`` fd00:78:N::2.
    Keys are raw 32-byte ``bytes``: ``client_private_key`` (never in reprs),
    ``client_public_key``, ``server_public_key``; ``b64(key)`` gives config form.

    HTTP on ``peer.http_port`` (8000) at both tunnel addresses, ``peer.http_url``:
    ``GET /<file>`` serves ``peer.www_root`` (drop files in; Content-Length, keep-alive),
    ``GET /bytes/N`` streams N bytes of ``pattern(N)`` (byte i == i % 256),
    ``POST /...`` (Content-Length or chunked) answers ``{"sha256": hex, "size": n}``.

    dnsmasq (``dnsmasq=True``) on port 53 of both tunnel addresses, ``peer.dns_server``;
    ``exit.test`` resolves to the server tunnel addresses, ``dns_names={"x.test": "10.78.{N}.9"}``
    adds more; nothing else resolves (no upstream). ``peer.queries()`` lists the names asked,
    ``peer.dns_queries()`` gives ``DnsQuery(qtype, name, client)``.

    ``peer.wg_show() -> list[PeerStats]`` (public_key, endpoint, allowed_ips,
    latest_handshake unix s or 0, rx_bytes, tx_bytes, persistent_keepalive);
    ``peer.client_stats()`` is our key's entry. ``peer.stop_wireguard()`` kills wireguard-go
    (tunnel addresses vanish, servers keep running), ``peer.start_wireguard()`` brings it back
    with the same keys (the peer then has no session: the client must handshake again).

    Reference client: ``with wireguard_go_interface(peer.client_ns, peer.client_ifname,
    peer.client_config_text(), peer.workdir):`` runs a second wireguard-go configured from
    wg-quick text (keys, addresses, routes for AllowedIPs) — a known-good client to compare
    against. Commands: ``ns.exec(argv)`` (CompletedProcess, text), ``ns.popen(argv, ...)``
    (killed on teardown), ``ns.ip(*args)``.

    Settled namespaces: IPv6 duplicate address detection is off in every harness namespace
    (``accept_dad=0``, and every address the harness adds is ``nodad``), and ``exit_peer``,
    ``start_wireguard`` and ``wireguard_go_interface`` return only once ``ns.settle()`` saw
    no up link without carrier, no tentative address and every kernel link-local address in
    place (a bounded condition wait; ``ns.unsettled()`` lists what is still changing). A
    client started afterwards sees no address or link change under it (Chromium aborts page
    loads with ``net::ERR_NETWORK_CHANGED`` on one). Call ``ns.settle()`` again after adding
    links or addresses yourself.

Narrow path (:func:`narrow_link`)
    ``with narrow_link(peer, 1400) as router:`` puts a Linux router between ``client_ns`` and
    the exit whose link toward the exit carries 1400-byte packets (a PPPoE line, a mobile
    network): a too-big packet with DF gets ICMP "fragmentation needed" / ICMPv6 "packet too
    big" back. The endpoint stays; the client's address becomes 10.76.N.1 / fd00:76:N::1.

mitmproxy peer (:func:`mitmproxy_wireguard_peer`, :class:`MitmPeer`)
    ``with mitmproxy_wireguard_peer(port=0) as mp:`` runs ``mitmdump --mode
    wireguard@127.0.0.1:PORT`` with a fresh confdir (no root needed); ``mp.endpoint``,
    ``mp.client_config_text()`` (Address 10.0.0.1/32, DNS 10.0.0.53, AllowedIPs 0.0.0.0/0),
    ``mp.server_public_key``, ``mp.client_private_key``, ``mp.process``, ``mp.log_text()``.
    mitmproxy forwards tunnelled connections to their real destination from the namespace it
    runs in: pass ``ns=peer.ns, host=peer.endpoint[0], port=51821`` to keep that inside a
    test namespace (as test_harness does), or aim only at loopback services.

Impairment (:class:`ImpairedRelay`, :class:`Impairment`)
    ``with ImpairedRelay(peer.endpoint, listen=("127.0.0.1", 0), seed=1,
    impairment=Impairment(loss=0.05, duplicate=0.01, reorder=0.05, reorder_gap=2, delay=0.01),
    socket_factory=peer.client_ns.socket) as relay:`` then use ``Endpoint = relay.address``
    (127.0.0.1 inside client_ns). ``up`` = client→target and ``down`` = target→client
    impairments may differ; ``relay.set_impairment(Impairment(loss=1.0))`` blackholes while
    running; ``Impairment(max_size=N)`` drops datagrams longer than N (a path MTU black
    hole); counters ``relay.up`` / ``relay.down`` (:class:`DirectionStats`). Decisions for
    the n-th datagram of a direction depend only on the seed.

Cleanup: every context manager tears down its processes (by PID), namespaces and wireguard-go
sockets, also on errors; ``exit_peer`` first removes namespaces of crashed earlier runs with
the same prefix (recognised by an owner record in ``/var/run/mitm-wg-harness``).
``live_resources()`` lists what this process still owns (for leak assertions).
"""

from __future__ import annotations

from .exitpeer import (
    DnsQuery,
    ExitPeer,
    PeerStats,
    b64,
    diagnose_on_failure,
    exit_peer,
    generate_keypair,
    narrow_link,
    origin_behind,
    parse_wg_dump,
    parse_wg_quick,
    source_echo,
    wait_until,
    wireguard_go_interface,
    wireguard_go_sends_gso,
)
from .httpserver import pattern
from .mitmpeer import MitmPeer, have_mitmdump, mitmproxy_wireguard_peer
from .netns import Netns, cleanup_stale, have_netns, list_namespaces, live_resources
from .relay import DirectionStats, ImpairedRelay, Impairment

__all__ = [
    "DirectionStats",
    "DnsQuery",
    "ExitPeer",
    "ImpairedRelay",
    "Impairment",
    "MitmPeer",
    "Netns",
    "PeerStats",
    "b64",
    "cleanup_stale",
    "diagnose_on_failure",
    "exit_peer",
    "generate_keypair",
    "have_mitmdump",
    "have_netns",
    "list_namespaces",
    "live_resources",
    "mitmproxy_wireguard_peer",
    "narrow_link",
    "origin_behind",
    "parse_wg_dump",
    "parse_wg_quick",
    "pattern",
    "source_echo",
    "wait_until",
    "wireguard_go_interface",
    "wireguard_go_sends_gso",
]
