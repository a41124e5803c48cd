"""A second exit peer reachable only through the first one: the far end of a multi-hop test.

Layout for an outer exit peer of index N (see :mod:`.exitpeer`), prefix P::

    client_ns PNc ── veth ── outer exit PNe ── veth PNx0/PNx1 ── inner exit PNi
    (our UDP socket)         wireguard-go PNwg         10.76.N.1/30    10.76.N.2/30
                             10.78.N.1 (tunnel)        fd00:76:N::1    fd00:76:N::2
                             forwards 10.78.N.0/24                     wireguard-go PNiw :51820
                             <-> 10.76.N.0/30                          tunnel 10.79.N.1/24,
                                                                       fd00:79:N::1/64
                                                                       HTTP :8000, dnsmasq

The inner exit's endpoint (10.76.N.2:51820) has no route from the client namespace: only a
packet that left the outer exit's wireguard-go interface (source 10.78.N.2, our outer
tunnel address) reaches it, and its replies go back the same way (the inner namespace's
default route points at the outer exit, which forwards without NAT). Inside the inner
tunnel our address is 10.79.N.2 / fd00:79:N::2::

    with exit_peer(name_prefix="mwgmh") as outer, inner_exit_peer(outer) as inner:
        outer_conf = outer.client_config_text(allowed_ips=outer.tunnel_v4_net + ", "
                                              + inner.transit_v4_net)
        inner_conf = inner.client_config_text()        # Endpoint = 10.76.N.2:51820

Three hops: ``inner_exit_peer(inner)`` puts a third exit behind the second one (``depth``
2), reachable only from the inner exit's namespace: transit 10.76.N.4/30 (inner exit .5,
third exit .6, fd00:76:N:1::/64), tunnel 10.75.N.0/24 / fd00:75:N::/64; the inner exit
forwards between its tunnel and that link. Our middle config then needs the new transit
net in its AllowedIPs (``inner.tunnel_v4_net + ", " + third.transit_v4_net``).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from .exitpeer import WG_PORT, ExitPeer, _start_dnsmasq, _start_http, generate_keypair
from .netns import Netns, run

log = logging.getLogger(__name__)


@dataclass(eq=False)
class InnerExitPeer(ExitPeer):
    """An :class:`ExitPeer` behind another one (``client_ns`` is the outer exit namespace:
    the network its endpoint is reached from)."""

    outer: ExitPeer | None = None
    #: 1 behind an ExitPeer, 2 behind an InnerExitPeer of depth 1.
    depth: int = 1

    @property
    def tunnel_v4_net(self) -> str:
        return f"10.{_TUNNEL_OCTET[self.depth]}.{self.index}.0/24"

    @property
    def tunnel_v6_net(self) -> str | None:
        if not self.server_tunnel_v6:
            return None
        return f"fd00:{_TUNNEL_OCTET[self.depth]}:{self.index}::/64"

    @property
    def transit_v4_net(self) -> str:
        """The link between the outer and the inner exit (holds the inner endpoint)."""
        return f"10.76.{self.index}.{4 * (self.depth - 1)}/30"

    @property
    def transit_v6_net(self) -> str:
        return _transit_v6(self.index, self.depth) + "/64"


#: Second octet of the tunnel prefix per depth (10.78.N is the outer exit's tunnel).
_TUNNEL_OCTET = {1: 79, 2: 75}


def _transit_v6(index: int, depth: int) -> str:
    return f"fd00:76:{index}::" if depth == 1 else f"fd00:76:{index}:{depth - 1}::"


def _sysctl(ns: Netns, key: str, value: str) -> None:
    ns.exec(["sysctl", "-q", "-w", f"{key}={value}"])


@contextlib.contextmanager
def inner_exit_peer(
    outer: ExitPeer,
    *,
    ipv6: bool = True,
    http: bool = True,
    dnsmasq: bool = False,
    dns_names: Mapping[str, str] | None = None,
) -> Iterator[InnerExitPeer]:
    """Start an exit peer reachable only through ``outer``'s exit namespace (see module
    doc); everything is torn down on exit. Names derive from ``outer``'s (its index is
    ours, so they are free)."""
    n = outer.index
    depth = outer.depth + 1 if isinstance(outer, InnerExitPeer) else 1
    if depth not in _TUNNEL_OCTET:
        raise ValueError(f"inner exit peers go {max(_TUNNEL_OCTET)} deep at most")
    # PNwg → PNi, PNx0, ...; PNiw (an inner exit's interface) → PNii, PNix0, ...
    base = outer.ifname[: -len("wg")] if depth == 1 else outer.ifname[: -len("w")]
    ns = Netns.create(f"{base}i")
    t = _TUNNEL_OCTET[depth]
    near, far = f"10.76.{n}.{4 * (depth - 1) + 1}", f"10.76.{n}.{4 * (depth - 1) + 2}"
    near6, far6 = _transit_v6(n, depth) + "1", _transit_v6(n, depth) + "2"
    workdir = Path(tempfile.mkdtemp(prefix=f"{base}i-"))
    x0, x1 = f"{base}x0", f"{base}x1"
    try:
        srv_priv, srv_pub = generate_keypair()
        cli_priv, cli_pub = generate_keypair()
        peer = InnerExitPeer(
            ns=ns,
            client_ns=outer.ns,
            index=n,
            ifname=f"{base}iw",
            endpoint=(far, WG_PORT),
            endpoint_v6=(far6, WG_PORT) if ipv6 else None,
            server_tunnel_v4=f"10.{t}.{n}.1",
            client_tunnel_v4=f"10.{t}.{n}.2",
            server_tunnel_v6=f"fd00:{t}:{n}::1" if ipv6 else None,
            client_tunnel_v6=f"fd00:{t}:{n}::2" if ipv6 else None,
            http_port=outer.http_port,
            www_root=workdir / "www",
            workdir=workdir,
            client_private_key=cli_priv,
            client_public_key=cli_pub,
            server_public_key=srv_pub,
            _server_private_key=srv_priv,
            outer=outer,
            depth=depth,
        )
        run(
            ["ip", "link", "add", x0, "netns", outer.ns.name, "type", "veth",
             "peer", "name", x1, "netns", ns.name],
        )  # fmt: skip
        outer.ns.ip("addr", "add", f"{near}/30", "dev", x0)
        ns.ip("addr", "add", f"{far}/30", "dev", x1)
        outer.ns.ip("-6", "addr", "add", f"{near6}/64", "dev", x0, "nodad")
        ns.ip("-6", "addr", "add", f"{far6}/64", "dev", x1, "nodad")
        outer.ns.ip("link", "set", x0, "up")
        ns.ip("link", "set", x1, "up")
        # The outer exit routes between its WireGuard interface and the transit link (no
        # NAT: the inner exit sees our outer tunnel address); the inner exit answers via it.
        _sysctl(outer.ns, "net.ipv4.ip_forward", "1")
        _sysctl(outer.ns, "net.ipv6.conf.all.forwarding", "1")
        if depth == 1:
            ns.ip("route", "add", "default", "via", near)
            ns.ip("-6", "route", "add", "default", "via", near6)
        else:
            # Only back into the tunnel we come from: a default route would send what this
            # namespace cannot reach (the resolver's server, when HTTPServer looks up its
            # own name) into a path that drops it silently, and the lookup would hang.
            ns.ip("route", "add", outer.tunnel_v4_net, "via", near)
            if outer.tunnel_v6_net:
                ns.ip("-6", "route", "add", outer.tunnel_v6_net, "via", near6)
        peer.start_wireguard()  # settles ns
        outer.ns.settle()
        addrs = [peer.server_tunnel_v4] + ([peer.server_tunnel_v6] if peer.server_tunnel_v6 else [])
        if http:
            _start_http(peer, addrs)
        if dnsmasq:
            _start_dnsmasq(peer, addrs, dns_names or {})
        log.info(
            "inner exit peer %s ready behind %s: endpoint %s", ns.name, outer.ns.name, peer.endpoint
        )
        yield peer
    finally:
        # The outer end first: deleting the namespace removes the pair only when the
        # kernel's namespace cleanup runs, and a next inner exit behind the same outer would
        # find x0 still there (as exitpeer.origin_behind's veths did).
        outer.ns.ip("link", "del", x0, check=False)
        ns.close()
        shutil.rmtree(workdir, ignore_errors=True)
