"""Drive a sans-IO Device over a real UDP socket, synchronously (for interop tests)."""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time

from mitm_wg.net.checksum import checksum, pseudo_header_sum
from mitm_wg.wireguard.device import Device, HandshakeCompleted, Transmit


class Driver:
    def __init__(self, device: Device, sock: socket.socket) -> None:
        self.device = device
        self.sock = sock
        sock.setblocking(False)
        self.packets: list[bytes] = []
        self.events: list[object] = []

    def _flush(self, out: list[Transmit]) -> None:
        for data, endpoint in out:
            self.sock.sendto(data, endpoint)
        out.clear()

    def step(self, timeout: float) -> None:
        out: list[Transmit] = []
        now = time.monotonic()
        deadline = self.device.next_deadline()
        wait = timeout if deadline is None else max(0.0, min(timeout, deadline - now))
        readable, _, _ = select.select([self.sock], [], [], wait)
        now = time.monotonic()
        if readable:
            while True:
                try:
                    data, address = self.sock.recvfrom(65535)
                except BlockingIOError:
                    break
                self.device.receive_datagram(data, (address[0], address[1]), now, out, self.packets)
        self.device.poll(now, out)
        self._flush(out)
        self.events.extend(self.device.take_events())

    def send(self, packet: bytes) -> bool:
        out: list[Transmit] = []
        ok = self.device.send_packet(packet, time.monotonic(), out)
        self._flush(out)
        return ok

    def handshake(self, timeout: float = 10.0) -> None:
        peer = next(iter(self.device.peers.values()))
        out: list[Transmit] = []
        self.device.connect(peer, time.monotonic(), out)
        self._flush(out)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.step(0.1)
            if any(isinstance(e, HandshakeCompleted) for e in self.events):
                return
        raise AssertionError(f"no handshake within {timeout} s; drops={dict(self.device.drops)}")

    def receive_packet(self, timeout: float = 5.0) -> bytes:
        end = time.monotonic() + timeout
        while not self.packets and time.monotonic() < end:
            self.step(0.1)
        assert self.packets, f"no packet within {timeout} s; drops={dict(self.device.drops)}"
        return self.packets.pop(0)


def icmp_echo_v4(src: str, dst: str, ident: int, seq: int, data: bytes) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data
    icmp = icmp[:2] + checksum(icmp).to_bytes(2, "big") + icmp[4:]
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(icmp),
            0x1234,
            0x4000,
            64,
            1,
            0,
            ipaddress.IPv4Address(src).packed,
            ipaddress.IPv4Address(dst).packed,
        )
    )
    header[10:12] = checksum(header).to_bytes(2, "big")
    return bytes(header) + icmp


def icmp_echo_v6(src: str, dst: str, ident: int, seq: int, data: bytes) -> bytes:
    s = ipaddress.IPv6Address(src).packed
    d = ipaddress.IPv6Address(dst).packed
    icmp = struct.pack("!BBHHH", 128, 0, 0, ident, seq) + data
    csum = checksum(icmp, pseudo_header_sum(s, d, 58, len(icmp)))
    icmp = icmp[:2] + csum.to_bytes(2, "big") + icmp[4:]
    return struct.pack("!IHBB16s16s", 0x60000000, len(icmp), 58, 64, s, d) + icmp


def udp_v4(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    s = ipaddress.IPv4Address(src).packed
    d = ipaddress.IPv4Address(dst).packed
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    csum = checksum(udp, pseudo_header_sum(s, d, 17, len(udp)))
    udp = udp[:6] + csum.to_bytes(2, "big") + udp[8:]
    header = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0x4000, 64, 17, 0, s, d)
    )
    header[10:12] = checksum(header).to_bytes(2, "big")
    return bytes(header) + udp
