"""A linked pair of WireGuard devices on a virtual clock, for unit tests of the core."""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from mitm_wg.wireguard import crypto
from mitm_wg.wireguard.device import Device, Transmit
from mitm_wg.wireguard.peer import Peer

A_ENDPOINT = ("127.0.0.1", 40001)
B_ENDPOINT = ("127.0.0.1", 40002)
A_ADDR = "10.9.0.1"
B_ADDR = "10.9.0.2"


def seeded_randbytes(seed: int):
    rng = random.Random(seed)
    return lambda n: rng.randbytes(n)


def ipv4_udp(src: str, dst: str, payload: bytes, sport: int = 1000, dport: int = 2000) -> bytes:
    """A minimal IPv4/UDP packet (the core checks only version, length and addresses)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(udp),
        0,
        0x4000,
        64,
        17,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return header + udp


@dataclass
class Pair:
    a: Device
    b: Device
    a_peer: Peer  # A's view of B
    b_peer: Peer  # B's view of A
    now: float = 0.0
    a_received: list[bytes] = field(default_factory=list)
    b_received: list[bytes] = field(default_factory=list)
    #: Datagrams in flight: (destination "a" or "b", datagram, source endpoint)
    wire: list[tuple[str, bytes, tuple[str, int]]] = field(default_factory=list)
    #: Every datagram ever put on the wire, for assertions.
    log: list[tuple[str, bytes]] = field(default_factory=list)
    #: The endpoint each logged datagram was addressed to.
    sent_to: list[tuple[str, int]] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        seed: int = 1,
        psk_a: bytes | None = None,
        psk_b: bytes | None = None,
        keepalive: float | None = None,
        wall_clock: Callable[[], float] | None = None,
    ) -> Pair:
        """``wall_clock``: A's (its initiations' timestamps); both devices' wall clocks
        otherwise read ``1.7e9 + now``."""
        rnd = seeded_randbytes(seed)
        a_priv, a_pub = crypto.dh_generate(rnd)
        b_priv, b_pub = crypto.dh_generate(rnd)
        a = Device(a_priv, randbytes=rnd, unix_time_offset=1.7e9, wall_clock=wall_clock)
        b = Device(b_priv, randbytes=rnd, unix_time_offset=1.7e9)
        a_peer = a.add_peer(
            b_pub,
            preshared_key=psk_a,
            allowed_ips=[ipaddress.ip_network("10.9.0.2/32"), ipaddress.ip_network("10.99.0.0/16")],
            endpoint=B_ENDPOINT,
            persistent_keepalive=keepalive,
        )
        b_peer = b.add_peer(
            a_pub,
            preshared_key=psk_b,
            allowed_ips=[ipaddress.ip_network("10.9.0.1/32")],
            endpoint=A_ENDPOINT,
        )
        return cls(a, b, a_peer, b_peer)

    def _collect(self, sender: str, out: list[Transmit]) -> None:
        dest = "b" if sender == "a" else "a"
        source = A_ENDPOINT if sender == "a" else B_ENDPOINT
        for datagram, endpoint in out:
            self.sent_to.append(endpoint)
            self.wire.append((dest, datagram, source))
            self.log.append((sender, datagram))

    def send(self, side: str, packet: bytes) -> bool:
        out: list[Transmit] = []
        device = self.a if side == "a" else self.b
        ok = device.send_packet(packet, self.now, out)
        self._collect(side, out)
        return ok

    def deliver(self, drop: bool = False) -> int:
        """Deliver (or drop) everything in flight, repeatedly, until the wire is quiet."""
        count = 0
        while self.wire:
            batch, self.wire = self.wire, []
            for dest, datagram, source in batch:
                count += 1
                if drop:
                    continue
                self.inject(dest, datagram, source)
        return count

    def inject(self, dest: str, datagram: bytes, source: tuple[str, int] | None = None) -> None:
        out: list[Transmit] = []
        device = self.a if dest == "a" else self.b
        received = self.a_received if dest == "a" else self.b_received
        if source is None:
            source = B_ENDPOINT if dest == "a" else A_ENDPOINT
        device.receive_datagram(datagram, source, self.now, out, received)
        self._collect(dest, out)

    def advance(self, seconds: float, drop: bool = False, deliver: bool = True) -> None:
        """Move the clock, firing every timer on the way and delivering what they send
        (or, ``deliver=False``, leaving it on the wire)."""
        end = self.now + seconds
        while True:
            deadlines = [d for d in (self.a.next_deadline(), self.b.next_deadline()) if d]
            step = min([d for d in deadlines if d <= end], default=None)
            if step is None:
                break
            self.now = max(self.now, step)
            for side, device in (("a", self.a), ("b", self.b)):
                out: list[Transmit] = []
                device.poll(self.now, out)
                self._collect(side, out)
            if deliver:
                self.deliver(drop=drop)
        self.now = end

    def handshake(self) -> None:
        self.send("a", ipv4_udp(A_ADDR, B_ADDR, b"hello"))
        self.deliver()
