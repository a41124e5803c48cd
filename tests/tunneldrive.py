"""Our WireGuard device + our TCP/IP stack over one real UDP socket, driven synchronously.

A small stand-in for the trio runtime, for interop tests of the two cores together against
wireguard-go and the Linux TCP stack.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable

from mitm_wg.config import WireGuardConfig
from mitm_wg.net.stack import Stack
from mitm_wg.net.tcp import TcpConfig, TcpSocket
from mitm_wg.wireguard.device import Device, Transmit


class TunnelDriver:
    def __init__(
        self, config: WireGuardConfig, sock: socket.socket, tcp_config: TcpConfig | None = None
    ) -> None:
        self.device = Device.from_config(config, unix_time_offset=time.time() - time.monotonic())
        self.stack = Stack(config.addresses, mtu=config.mtu or 1420, tcp_config=tcp_config)
        self.sock = sock
        sock.setblocking(False)
        self._datagrams: list[Transmit] = []
        self._packets: list[bytes] = []
        self._ip_out: list[bytes] = []
        #: a test's stand-in for a lossy link: each IP packet our stack sends goes to it
        #: first, and is not sent if it returns True
        self.drop: Callable[[bytes], bool] | None = None

    def pump(self, timeout: float) -> None:
        """One round: wait for datagrams or a deadline, feed both cores, send their output."""
        now = time.monotonic()
        deadlines = [d for d in (self.device.next_deadline(), self.stack.next_deadline()) if d]
        wait = max(0.0, min([timeout, *(d - now for d in deadlines)]))
        readable, _, _ = select.select([self.sock], [], [], wait)
        now = time.monotonic()
        device, stack = self.device, self.stack
        out = self._datagrams
        packets = self._packets
        if readable:
            for _ in range(512):  # drain what the kernel queued before yielding
                try:
                    data, address = self.sock.recvfrom(65535)
                except BlockingIOError:
                    break
                device.receive_datagram(data, (address[0], address[1]), now, out, packets)
            for packet in packets:
                stack.receive(packet, now)
            packets.clear()
        device.poll(now, out)
        ip_out = self._ip_out
        stack.poll(now, ip_out)
        drop = self.drop
        for packet in ip_out:
            if drop is None or not drop(packet):
                device.send_packet(packet, now, out)
        ip_out.clear()
        for data, endpoint in out:
            try:
                self.sock.sendto(data, endpoint)
            except BlockingIOError:
                select.select([], [self.sock], [], 1.0)
                self.sock.sendto(data, endpoint)
        out.clear()

    def run_until(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                raise TimeoutError(f"condition not met within {timeout} s")
            self.pump(0.05)

    def connect(self, host: str, port: int, timeout: float = 15.0) -> TcpSocket:
        sock = self.stack.tcp_connect(host, port, time.monotonic())
        self.run_until(lambda: sock.can_send or sock.error is not None or sock.is_closed, timeout)
        if sock.error is not None:
            raise sock.error
        return sock

    def send_all(self, sock: TcpSocket, data: bytes | memoryview, timeout: float = 120.0) -> None:
        view = memoryview(data)
        end = time.monotonic() + timeout
        while view:
            if sock.error is not None:
                raise sock.error
            n = sock.send(view)
            view = view[n:]
            if n == 0:
                if time.monotonic() > end:
                    raise TimeoutError("send stalled")
                self.pump(0.05)
        self.pump(0)

    def recv_until_eof(self, sock: TcpSocket, timeout: float = 120.0, sink=None) -> bytes:
        chunks: list[bytes] = []
        end = time.monotonic() + timeout
        while True:
            data = sock.recv(1 << 20)
            if data:
                if sink is not None:
                    sink(data)
                else:
                    chunks.append(data)
                continue
            if sock.at_eof:
                return b"".join(chunks)
            if sock.error is not None:
                raise sock.error
            if time.monotonic() > end:
                raise TimeoutError("receive stalled")
            self.pump(0.05)
