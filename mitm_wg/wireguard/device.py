"""The WireGuard device: a sans-IO state machine for one interface and its peers.

Inputs are datagrams from the network, IP packets from the stack and the current time;
outputs are appended to caller-owned lists: ``(datagram, endpoint)`` pairs to send over UDP
and decrypted IP packets to hand to the stack.  Nothing here reads a clock, sleeps or touches
a socket.  In the manner of boringtun's ``Tunn`` and wireguard-go's ``device``::

    out: list[tuple[bytes, Endpoint]] = []
    packets: list[bytes] = []
    device.send_packet(ip_packet, now, out)              # encrypt (or queue + handshake)
    device.send_packets(ip_packets, now, out)            # the same for many, in order
    device.receive_datagram(data, source, now, out, packets)
    device.receive_datagrams(run, source, now, out, packets)  # the same for a run
    device.poll(now, out)                                # timers
    device.next_deadline()                               # when to call poll again

Malformed or unauthenticated input is dropped and counted in ``device.drops``; it never
raises.  Events a runtime may want to log or act on collect in ``device.events``.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mitm_wg.config import Endpoint
from mitm_wg.keys import encode_key
from mitm_wg.wireguard import crypto, handshake
from mitm_wg.wireguard.allowed_ips import AllowedIPs
from mitm_wg.wireguard.cookie import CookieChecker
from mitm_wg.wireguard.messages import (
    COOKIE_REPLY_SIZE,
    INITIATION_MAC1_OFFSET,
    INITIATION_SIZE,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    RESPONSE_MAC1_OFFSET,
    RESPONSE_SIZE,
    TRANSPORT_HEADER,
    TRANSPORT_MIN_SIZE,
    TYPE_AND_INDEX,
)
from mitm_wg.wireguard.peer import Network, Peer, PeerStatus
from mitm_wg.wireguard.session import Keypair
from mitm_wg.wireguard.timers import (
    EARLY_RETRY_MIN,
    EARLY_RETRY_UNMEASURED,
    MIN_INITIATION_INTERVAL,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_ON_RECEIVE_AGE,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    ZERO_KEYS_AFTER,
)

if TYPE_CHECKING:
    from mitm_wg.config import WireGuardConfig

logger = logging.getLogger(__name__)

Transmit = tuple[bytes, Endpoint]

_PADDING = [bytes(n) for n in range(16)]
_IPV4_TOTAL_LENGTH = struct.Struct("!H")
#: Handshake messages per second above which the device asks for cookies (mac2).
UNDER_LOAD_THRESHOLD = 128
#: The device stays "under load" this long after the rate drops (wireguard-go: 1 s).
UNDER_LOAD_HOLD = 1.0


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    peer: Peer
    endpoint: Endpoint | None
    is_initiator: bool
    now: float


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """A peer did not answer initiations for REKEY_ATTEMPT_TIME; queued packets were dropped."""

    peer: Peer
    endpoint: Endpoint | None
    attempts: int
    now: float


@dataclass(frozen=True, slots=True)
class KeysZeroed:
    peer: Peer
    now: float


@dataclass(frozen=True, slots=True)
class KeyInUseElsewhere:
    """A peer we have a session with keeps sending us transport messages of sessions we
    never made (``packets`` within ``FOREIGN_WINDOW`` from its endpoint): another client
    with our private key handshook with it, and it sends that client's traffic to us
    whenever our packets reach it last (a peer keeps one endpoint per key). Reported at
    most once per ``FOREIGN_REPORT_EVERY`` per peer."""

    peer: Peer
    endpoint: Endpoint
    packets: int
    now: float


Event = HandshakeCompleted | HandshakeFailed | KeysZeroed | KeyInUseElsewhere

#: Rule key-elsewhere: transport messages with an unknown receiver index from the endpoint
#: of a peer we have a session with count once the session is this old (before that they
#: may be the peer's last packets to an earlier run of ours, in flight when we handshook) ...
FOREIGN_GRACE = 2.0
#: ... and this many within FOREIGN_WINDOW seconds report a KeyInUseElsewhere. (Few: the
#: client that handshook last gets the peer's packets for both, and the other sees them
#: only for the moments its own packets reached the peer last, until either handshakes
#: again: ours does when a connection's retransmission timer finds nothing arrived.)
FOREIGN_MIN = 4
FOREIGN_WINDOW = 30.0
#: The least time between two reports for one peer.
FOREIGN_REPORT_EVERY = 300.0


class Device:
    """One WireGuard interface: our static key, the peers and the cryptokey routing table."""

    def __init__(
        self,
        private_key: bytes,
        *,
        mtu: int = 1420,
        randbytes: Callable[[int], bytes] = os.urandom,
        unix_time_offset: float = 0.0,
        wall_clock: Callable[[], float] | None = None,
    ) -> None:
        """Initiations carry the wall-clock time (TAI64N), which a peer requires to grow
        from one initiation with our key to the next, across restarts and across clients
        that share the key. ``wall_clock`` reads it (the runtime passes ``time.time``),
        when an initiation is made: a wall clock stepped after the device was made (time
        sync correcting a VM's clock after its host slept, while the VM's other clocks
        stood still) is followed, as wireguard-go reads it for each one. Without it
        (virtual clocks in tests) the time is ``now + unix_time_offset``. Status reports
        turn handshake times into Unix time the same way."""
        self.identity = handshake.Identity.from_private(private_key)
        self.mtu = mtu
        self._randbytes = randbytes
        self._unix_time_offset = unix_time_offset
        self._wall_clock = wall_clock
        self._last_timestamp = b""
        self.cookie_checker = CookieChecker(
            self.identity.mac1_key, self.identity.cookie_key, randbytes
        )
        self.peers: dict[bytes, Peer] = {}
        self._routes: AllowedIPs[Peer] = AllowedIPs()
        self._keypairs: dict[int, Keypair] = {}
        self._handshakes: dict[int, Peer] = {}
        self.drops: Counter[str] = Counter()
        self.events: list[Event] = []
        #: None: decide from the handshake rate; True/False: force (tests, operators).
        self.force_under_load: bool | None = None
        self._handshake_window_start = float("-inf")
        self._handshake_window_count = 0
        self._under_load_until = float("-inf")

    def __repr__(self) -> str:
        return f"<Device public_key={self.public_key_b64} peers={len(self.peers)}>"

    @property
    def public_key(self) -> bytes:
        return self.identity.public

    @property
    def public_key_b64(self) -> str:
        return encode_key(self.identity.public)

    # -- configuration ------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: WireGuardConfig,
        *,
        randbytes: Callable[[int], bytes] = os.urandom,
        unix_time_offset: float = 0.0,
        wall_clock: Callable[[], float] | None = None,
        endpoints: dict[bytes, Endpoint] | None = None,
    ) -> Device:
        """A device for a wg-quick config.

        Endpoints that are IP literals are used as they are; hostnames must be resolved by
        the caller and passed in ``endpoints`` (public key → (ip, port)), since the core does
        no I/O.  A peer without a usable endpoint can still answer handshakes.
        """
        import ipaddress

        device = cls(
            config.private_key,
            mtu=config.mtu or 1420,
            randbytes=randbytes,
            unix_time_offset=unix_time_offset,
            wall_clock=wall_clock,
        )
        endpoints = endpoints or {}
        for pc in config.peers:
            endpoint: Endpoint | None = endpoints.get(pc.public_key)
            if endpoint is None and pc.endpoint is not None:
                try:
                    ipaddress.ip_address(pc.endpoint.host)
                except ValueError:
                    endpoint = None
                else:
                    endpoint = pc.endpoint
            device.add_peer(
                pc.public_key,
                preshared_key=pc.preshared_key,
                allowed_ips=pc.allowed_ips,
                endpoint=endpoint,
                persistent_keepalive=pc.persistent_keepalive,
            )
        return device

    def add_peer(
        self,
        public_key: bytes,
        *,
        preshared_key: bytes | None = None,
        allowed_ips: Iterable[Network] = (),
        endpoint: Endpoint | None = None,
        persistent_keepalive: float | None = None,
    ) -> Peer:
        if public_key in self.peers:
            raise ValueError("a peer with this public key exists already")
        if public_key == self.identity.public:
            raise ValueError("a peer cannot have the device's own public key")
        keys = handshake.RemoteKeys.create(self.identity, public_key, preshared_key)
        networks = tuple(allowed_ips)
        peer = Peer(
            keys,
            endpoint=None if endpoint is None else Endpoint(endpoint[0], endpoint[1]),
            allowed_ips=networks,
            persistent_keepalive=persistent_keepalive,
        )
        self.peers[public_key] = peer
        for network in networks:
            self._routes.insert(network, peer)
        return peer

    def remove_peer(self, public_key: bytes) -> None:
        peer = self.peers.pop(public_key)
        self._routes.remove_value(peer)
        self._zero_keys(peer)

    def set_endpoint(self, public_key: bytes, endpoint: tuple[str, int]) -> bool:
        """Point a peer at a new endpoint (an IP address: the runtime re-resolved the peer's
        hostname, as wg-quick's reresolve-dns does with ``wg set peer ... endpoint``).

        Sessions are kept: the peer accepts our packets from wherever they arrive and answers
        there (roaming, whitepaper §2.1), and authenticated packets from another source
        still move the endpoint as usual. Returns whether the endpoint changed.
        """
        import ipaddress

        peer = self.peers[public_key]
        ipaddress.ip_address(endpoint[0])  # ValueError: the core never resolves names
        new = Endpoint(endpoint[0], endpoint[1])
        if peer.endpoint == new:
            return False
        peer.endpoint = new
        return True

    def route(self, destination: bytes) -> Peer | None:
        """The peer whose AllowedIPs hold ``destination`` (4 or 16 raw bytes)."""
        return self._routes.lookup(destination)

    def unix_time(self, now: float) -> float:
        """The wall-clock time (Unix seconds) at ``now``: ``wall_clock()``, or without one
        ``now + unix_time_offset``."""
        wall = self._wall_clock
        return now + self._unix_time_offset if wall is None else wall()

    def status(self, now: float | None = None) -> list[PeerStatus]:
        """Each peer's :class:`PeerStatus`; ``now`` dates its last handshake by the wall
        clock as it reads at ``now`` (without it, as it read when the device was made)."""
        offset = self._unix_time_offset if now is None else self.unix_time(now) - now
        return [peer.status(offset) for peer in self.peers.values()]

    def take_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    # -- outbound -----------------------------------------------------------------------------

    def send_packet(self, packet: bytes, now: float, out: list[Transmit]) -> bool:
        """Encrypt an IP packet for the peer that AllowedIPs route it to.

        Without a usable session the packet is queued and a handshake starts.  Returns False
        (and counts a drop) when no peer's AllowedIPs contain the destination.
        """
        version = packet[0] >> 4 if packet else 0
        if version == 4 and len(packet) >= 20:
            peer = self._routes.lookup(packet[16:20])
        elif version == 6 and len(packet) >= 40:
            peer = self._routes.lookup(packet[24:40])
        else:
            self.drops["send_malformed"] += 1
            return False
        if peer is None:
            self.drops["send_no_route"] += 1
            return False
        keypair = self._sending_keypair(peer, now)
        if keypair is None:
            peer.enqueue(packet)
            self._initiate(peer, now, out, retry=False)
            return True
        self._send_transport(peer, keypair, (packet,), now, out)
        peer.on_data_sent(now)
        if self._rekey_due(keypair, now):
            self._initiate(peer, now, out, retry=False)
        return True

    @staticmethod
    def _rekey_due(keypair: Keypair, now: float, more: int = 0) -> bool:
        """Keep the key fresh (whitepaper §6.2): a rekey is due once the keypair has sent
        more than REKEY_AFTER_MESSAGES (counting ``more`` still to send), or, for the
        initiator, after REKEY_AFTER_TIME."""
        return keypair.send_counter + more > REKEY_AFTER_MESSAGES or (
            keypair.is_initiator and now - keypair.created >= REKEY_AFTER_TIME
        )

    def send_packets(self, packets: list[bytes], now: float, out: list[Transmit]) -> None:
        """:meth:`send_packet` for each of ``packets`` in order, with the same effect
        (datagrams, their order, counters, timers). A run of packets to one destination
        address (a bulk send) shares the route lookup and the session checks, unless the
        run could bring a rekey due (:meth:`_rekey_due`) or has no session to go on: then
        its packets go through :meth:`send_packet` one by one."""
        i = 0
        n = len(packets)
        lookup = self._routes.lookup
        while i < n:
            packet = packets[i]
            size = len(packet)
            version = packet[0] >> 4 if size else 0
            if version == 4 and size >= 20:
                lo, hi = 16, 20
            elif version == 6 and size >= 40:
                lo, hi = 24, 40
            else:
                self.send_packet(packet, now, out)  # (counts it as malformed)
                i += 1
                continue
            dst = packet[lo:hi]
            j = i + 1
            while j < n:
                p = packets[j]
                if len(p) < hi or p[0] >> 4 != version or p[lo:hi] != dst:
                    break
                j += 1
            peer = lookup(dst)
            keypair = None if peer is None else self._sending_keypair(peer, now)
            if peer is None or keypair is None or self._rekey_due(keypair, now, j - i):
                for k in range(i, j):
                    self.send_packet(packets[k], now, out)
            else:
                self._send_transport(peer, keypair, packets[i:j], now, out)
                peer.on_data_sent(now)
            i = j

    def can_send(self, peer: Peer, now: float) -> bool:
        """Whether a packet to ``peer`` would leave now on a session (not wait for a
        handshake: none yet, or the current one expired or suspect)."""
        return self._sending_keypair(peer, now) is not None

    @staticmethod
    def _sending_keypair(peer: Peer, now: float) -> Keypair | None:
        """The current keypair if it may still send (whitepaper §6.1 limits), else None."""
        keypair = peer.current
        if (
            keypair is None
            or peer.session_suspect
            or peer.endpoint is None
            or now - keypair.created >= REJECT_AFTER_TIME
            or keypair.send_counter >= REJECT_AFTER_MESSAGES
        ):
            return None
        return keypair

    def _send_transport(
        self,
        peer: Peer,
        keypair: Keypair,
        packets: Iterable[bytes],
        now: float,
        out: list[Transmit],
    ) -> None:
        """Transport messages (whitepaper §5.4.6) of ``keypair`` carrying ``packets`` in
        order (padded to 16 bytes, within the MTU), to the peer's endpoint."""
        counter = keypair.send_counter
        index = keypair.remote_index
        seal = keypair.send.seal_message
        endpoint = peer.endpoint
        mtu = self.mtu
        sent = 0
        for packet in packets:
            size = len(packet)
            if size & 15:
                padded = min((size + 15) & ~15, mtu)
                if padded > size:
                    packet = packet + _PADDING[padded - size]
            datagram = seal(TRANSPORT_HEADER.pack(MESSAGE_TRANSPORT, index, counter), packet)
            counter += 1
            sent += len(datagram)
            out.append((datagram, endpoint))  # type: ignore[arg-type]
        keypair.send_counter = counter
        peer.tx_bytes += sent
        peer.on_authenticated_packet_traversal(now)
        peer.on_authenticated_packet_sent()

    def send_keepalive(self, peer: Peer, now: float, out: list[Transmit]) -> None:
        """Send an empty transport message, or start a handshake to be able to."""
        keypair = self._sending_keypair(peer, now)
        if keypair is None:
            if not peer.queue:
                peer.enqueue(b"")
            self._initiate(peer, now, out, retry=False)
            return
        self._send_transport(peer, keypair, (b"",), now, out)

    def connect(self, peer: Peer, now: float, out: list[Transmit]) -> None:
        """Start a handshake with ``peer`` now (subject to the REKEY_TIMEOUT rate limit)."""
        self._initiate(peer, now, out, retry=False)

    def handshake_if_silent(
        self, peer: Peer, since: float, now: float, out: list[Transmit]
    ) -> bool:
        """Start a fresh handshake as soon as the rate limits allow if nothing authenticated
        arrived from ``peer`` since ``since``, the time the caller sent something that should
        have been answered and was not (the runtime's rule: a new TCP connection's SYN had
        to be retransmitted).

        WireGuard's own timer waits KEEPALIVE_TIMEOUT + REKEY_TIMEOUT (15 s) of silence
        after sent data before it re-handshakes (whitepaper §6.5). When the peer restarted
        it has no session: every packet we send on ours vanishes, and 15 s plus TCP's SYN
        backoff is how long a user waits. Rate limits hold: nothing while an initiation is
        outstanding (its retransmission timer runs), and never within REKEY_TIMEOUT of the
        last initiation; then the handshake is armed for that moment (dropped if the peer
        speaks first). Returns whether an initiation went out now.

        Once it went out, the current session is suspect: packets wait in the queue for the
        new one (a round trip if the peer is alive) instead of vanishing on the old one, so a
        retry right after a timeout (a DNS query, another SYN) gets through.
        """
        if peer.last_received >= since or peer.handshake is not None:
            return False
        allowed = peer.initiation_allowed_at
        if now < allowed:
            peer.silence_handshake_at = allowed
            peer.silent_since = since
            return False
        peer.silence_handshake_at = None
        self._initiate(peer, now, out, retry=False)
        peer.silence_handshakes += 1
        peer.session_suspect = True
        return True

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(self._randbytes(4), "little")
            if index not in self._keypairs and index not in self._handshakes:
                return index

    def _timestamp(self, now: float) -> bytes:
        stamp = crypto.tai64n(self.unix_time(now))
        # Whiten the nanoseconds (as wireguard-go does) so initiations leak less timing.
        nanos = int.from_bytes(stamp[8:], "big") & ~0xFFFFFF
        stamp = stamp[:8] + nanos.to_bytes(4, "big")
        if stamp <= self._last_timestamp:
            # Never repeat or go back: peers drop initiations that do not increase.
            value = int.from_bytes(self._last_timestamp, "big") + 1
            stamp = value.to_bytes(12, "big")
        self._last_timestamp = stamp
        return stamp

    def _initiate(
        self, peer: Peer, now: float, out: list[Transmit], *, retry: bool, early: bool = False
    ) -> None:
        if peer.zero_keys_at is not None and now >= peer.zero_keys_at:
            # The expiry came due before this call could see it (the clock jumped over a
            # suspend, or the runtime's timer has not run yet): it applies to what came
            # before, never to the handshake starting now or the packets waiting for it.
            self._zero_keys_now(peer, now, keep_queue=True)
        if not retry:
            peer.handshake_attempts = 0
        if now < peer.initiation_allowed_at and not early:
            return
        if peer.handshake_started is None:
            peer.handshake_started = now
        if peer.handshake is not None:
            self._handshakes.pop(peer.handshake.local_index, None)
        index = self._new_index()
        state, body = handshake.create_initiation(
            self.identity, peer.keys, index, self._timestamp(now), self._randbytes
        )
        peer.handshake = state
        self._handshakes[index] = peer
        message = peer.cookies.seal(body, now)
        peer.last_initiation_sent = now
        peer.handshake_attempts_total += 1
        jitter = int.from_bytes(self._randbytes(2), "little") / 65535 * REKEY_TIMEOUT_JITTER_MAX
        peer.on_handshake_initiated(now, jitter)
        if peer.endpoint is None:
            self.drops["initiation_no_endpoint"] += 1
            return
        peer.tx_bytes += len(message)
        out.append((message, peer.endpoint))
        peer.on_authenticated_packet_traversal(now)
        peer.on_authenticated_packet_sent()
        # (rule hs-early, arming: a handshake's first initiation; see _early_retry)
        rtt = peer.handshake_rtt
        peer.early_retry_at = None
        if not retry:
            if rtt is None:
                wait = EARLY_RETRY_UNMEASURED
            else:
                wait = 3 * rtt if 3 * rtt > EARLY_RETRY_MIN else EARLY_RETRY_MIN
            if wait < REKEY_TIMEOUT:
                peer.early_retry_at = now + wait

    def _flush_queue(self, peer: Peer, now: float, out: list[Transmit]) -> None:
        keypair = peer.current
        assert keypair is not None
        packets = list(peer.queue)
        peer.queue.clear()
        if packets:
            self._send_transport(peer, keypair, packets, now, out)
        if any(packets):
            peer.on_data_sent(now)

    # -- inbound ------------------------------------------------------------------------------

    def receive_datagram(
        self,
        data: bytes | memoryview,
        source: Endpoint,
        now: float,
        out: list[Transmit],
        packets: list[bytes],
    ) -> None:
        """Process one UDP datagram from ``source``."""
        size = len(data)
        if size < TRANSPORT_MIN_SIZE:
            self.drops["short"] += 1
            return
        mtype, index = TYPE_AND_INDEX.unpack_from(data)
        if mtype == MESSAGE_TRANSPORT:
            self._receive_transport(data, index, source, now, out, packets)
        elif mtype == MESSAGE_INITIATION and size == INITIATION_SIZE:
            self._receive_initiation(bytes(data), source, now, out)
        elif mtype == MESSAGE_RESPONSE and size == RESPONSE_SIZE:
            self._receive_response(bytes(data), source, now, out)
        elif mtype == MESSAGE_COOKIE_REPLY and size == COOKIE_REPLY_SIZE:
            self._receive_cookie_reply(bytes(data), index, now)
        else:
            self.drops["bad_type"] += 1

    def receive_datagrams(
        self,
        datagrams: Iterable[bytes | memoryview],
        source: Endpoint,
        now: float,
        out: list[Transmit],
        packets: list[bytes],
    ) -> None:
        """:meth:`receive_datagram` for each of ``datagrams``, in order, all from ``source``
        (a run the runtime read at once: a UDP GRO run, or one wake-up's datagrams from one
        address), with exactly the same effect.

        Transport messages of a session that is neither unconfirmed (``peer.next``) nor due
        for the rekey-on-receive rule take a short path: per message only the counter, the
        replay window, the AEAD and the inner packet's length and source; the peer's
        bookkeeping (roaming, byte count, timer hooks) is done once for the run. Those hooks
        give the same state however often they run with one ``now``, except
        ``on_data_received``, whose state after two calls no further call changes: it runs
        at most twice. Anything else goes through :meth:`receive_datagram`, after the
        bookkeeping owed so far."""
        drops = self.drops
        inner = self._inner_packet
        unpack = TRANSPORT_HEADER.unpack_from
        index = -1  # the session of the short path so far (-1: none)
        keypair: Keypair | None = None
        peer: Peer | None = None  # whose bookkeeping is owed for `authenticated` messages
        authenticated = data = rx = 0
        for datagram in datagrams:
            n = len(datagram)
            if n >= TRANSPORT_MIN_SIZE:
                mtype, idx, counter = unpack(datagram)
                if mtype == MESSAGE_TRANSPORT and idx != index:
                    keypair = self._short_path_session(idx, now)
                    if keypair is not None:
                        index = idx
                        replay = keypair.replay
                        open_ = keypair.recv.open_message
                        if keypair.peer is not peer:
                            if authenticated:
                                self._received_run(peer, source, now, rx, authenticated, data)
                                authenticated = data = rx = 0
                            peer = keypair.peer
            else:
                mtype = -1
            if mtype != MESSAGE_TRANSPORT or keypair is None:
                # the general path, after the bookkeeping owed so far (it may change any
                # session: the short path's choice is made again after it)
                if authenticated:
                    self._received_run(peer, source, now, rx, authenticated, data)
                    authenticated = data = rx = 0
                peer = keypair = None
                index = -1
                self.receive_datagram(datagram, source, now, out, packets)
                continue
            # copy of rule transport-open (as in _receive_transport)
            if counter >= REJECT_AFTER_MESSAGES or not replay.check(counter):
                drops["replay_or_expired"] += 1
                continue
            plaintext = open_(datagram)  # (a view of a GRO run stays a view up to the AEAD)
            if plaintext is None:
                drops["decrypt"] += 1
                continue
            if not replay.update(counter):
                drops["replay_or_expired"] += 1
                continue
            authenticated += 1
            rx += n
            if plaintext:
                data += 1
                inner(plaintext, peer, packets)
        if authenticated:
            self._received_run(peer, source, now, rx, authenticated, data)

    def _short_path_session(self, index: int, now: float) -> Keypair | None:
        """The session with ``index`` if :meth:`receive_datagrams`' short path may take its
        messages: it exists, is confirmed (not ``peer.next``), has not expired, and a packet
        on it would not start the rekey-on-receive handshake."""
        keypair = self._keypairs.get(index)
        if (
            keypair is None
            or keypair is keypair.peer.next
            or now - keypair.created >= REJECT_AFTER_TIME
            or self._rekey_on_receive_due(keypair.peer, now)
        ):
            return None
        return keypair

    @staticmethod
    def _rekey_on_receive_due(peer: Peer, now: float) -> bool:
        """Whether an authenticated packet from ``peer`` now starts the rekey of §6.2 (an
        initiator hearing from a session near its end)."""
        current = peer.current
        return (
            current is not None
            and current.is_initiator
            and not peer.sent_last_minute_handshake
            and now - current.created >= REKEY_ON_RECEIVE_AGE
        )

    @staticmethod
    def _received_run(
        peer: Peer | None, source: Endpoint, now: float, rx: int, authenticated: int, data: int
    ) -> None:
        """The per-peer part of :meth:`_receive_transport` for ``authenticated`` messages of
        :meth:`receive_datagrams`' short path (``data`` of them not keepalives)."""
        assert peer is not None
        Device._authenticated_from(peer, source, rx)
        peer.on_authenticated_packet_received(now)
        peer.on_authenticated_packet_traversal(now)
        if data:
            peer.on_data_received(now)
            if data > 1:
                peer.on_data_received(now)

    @staticmethod
    def _authenticated_from(peer: Peer, source: Endpoint, nbytes: int) -> None:
        """``nbytes`` of datagrams from ``source`` authenticated as ``peer``'s."""
        if source != peer.endpoint:
            # Roaming (whitepaper §2.1): the endpoint becomes the source of the latest
            # authenticated packet. Compared first so the per-packet path allocates nothing.
            peer.endpoint = Endpoint.of(source)
        peer.rx_bytes += nbytes

    def _receive_transport(
        self,
        data: bytes,
        index: int,
        source: Endpoint,
        now: float,
        out: list[Transmit],
        packets: list[bytes],
    ) -> None:
        keypair = self._keypairs.get(index)
        if keypair is None:
            self.drops["unknown_index"] += 1
            self._foreign_session(source, now)
            return
        counter = TRANSPORT_HEADER.unpack_from(data)[2]
        if (
            counter >= REJECT_AFTER_MESSAGES
            or now - keypair.created >= REJECT_AFTER_TIME
            or not keypair.replay.check(counter)
        ):
            self.drops["replay_or_expired"] += 1
            return
        # rule: transport-open (with the replay check above)
        plaintext = keypair.recv.open_message(data)
        if plaintext is None:
            self.drops["decrypt"] += 1
            return
        if not keypair.replay.update(counter):
            self.drops["replay_or_expired"] += 1
            return
        peer = keypair.peer
        self._authenticated_from(peer, source, len(data))
        if keypair is peer.next:
            # The initiator used the session we answered: it is now confirmed (§5.4.6).
            self._retire(peer.previous)
            peer.previous = peer.current
            peer.current = keypair
            peer.next = None
            peer.handshake_rtt = now - keypair.created  # (created when the response went)
            peer.on_handshake_complete(now)
            self.events.append(HandshakeCompleted(peer, source, False, now))
            if peer.queue:
                self._flush_queue(peer, now, out)
        peer.on_authenticated_packet_received(now)
        peer.on_authenticated_packet_traversal(now)
        # An initiator hearing from an old session re-handshakes before it expires (§6.2).
        if self._rekey_on_receive_due(peer, now):
            peer.sent_last_minute_handshake = True
            self._initiate(peer, now, out, retry=False)
        if not plaintext:
            return  # keepalive
        peer.on_data_received(now)
        self._inner_packet(plaintext, peer, packets)

    def _inner_packet(self, plaintext: bytes, peer: Peer, packets: list[bytes]) -> None:
        """Append the IP packet a transport message from ``peer`` carried (without the
        padding) to ``packets``, or count why it was dropped."""
        size = len(plaintext)
        version = plaintext[0] >> 4
        if version == 4 and size >= 20:
            length = _IPV4_TOTAL_LENGTH.unpack_from(plaintext, 2)[0]
            src = plaintext[12:16]
        elif version == 6 and size >= 40:
            length = _IPV4_TOTAL_LENGTH.unpack_from(plaintext, 4)[0] + 40
            src = plaintext[8:24]
        else:
            self.drops["inner_malformed"] += 1
            return
        if length > size:
            self.drops["inner_malformed"] += 1
            return
        if self._routes.lookup(src) is not peer:
            # Cryptokey routing: a peer may only send from its own AllowedIPs (§2).
            self.drops["inner_source_not_allowed"] += 1
            return
        packets.append(plaintext if length == size else plaintext[:length])

    def _under_load(self, now: float) -> bool:
        if self.force_under_load is not None:
            return self.force_under_load
        if now - self._handshake_window_start >= 1.0:
            self._handshake_window_start = now
            self._handshake_window_count = 0
        self._handshake_window_count += 1
        if self._handshake_window_count > UNDER_LOAD_THRESHOLD:
            self._under_load_until = now + UNDER_LOAD_HOLD
        return now < self._under_load_until

    def _check_macs(
        self,
        message: bytes,
        mac1_offset: int,
        sender_index: int,
        source: Endpoint,
        now: float,
        out: list[Transmit],
    ) -> bool:
        if not self.cookie_checker.mac1_valid(message, mac1_offset):
            self.drops["bad_mac1"] += 1
            return False
        if self._under_load(now) and not self.cookie_checker.mac2_valid(
            message, mac1_offset, source, now
        ):
            out.append(
                (
                    self.cookie_checker.make_reply(message, mac1_offset, sender_index, source, now),
                    source,
                )
            )
            self.drops["cookie_sent"] += 1
            return False
        return True

    def _receive_initiation(
        self, message: bytes, source: Endpoint, now: float, out: list[Transmit]
    ) -> None:
        sender_index = TYPE_AND_INDEX.unpack_from(message)[1]
        if not self._check_macs(message, INITIATION_MAC1_OFFSET, sender_index, source, now, out):
            return
        received = handshake.consume_initiation(self.identity, message)
        if received is None:
            self.drops["initiation_decrypt"] += 1
            return
        peer = self.peers.get(received.remote_static)
        if peer is None:
            self.drops["initiation_unknown_peer"] += 1
            return
        if received.timestamp <= peer.last_initiation_timestamp:
            self.drops["initiation_replay"] += 1
            return
        if now - peer.last_initiation_received < MIN_INITIATION_INTERVAL:
            self.drops["initiation_flood"] += 1
            return
        peer.last_initiation_timestamp = received.timestamp
        peer.last_initiation_received = now
        peer.endpoint = Endpoint.of(source)
        peer.on_authenticated_packet_traversal(now)
        peer.on_authenticated_packet_received(now)

        index = self._new_index()
        keys, body = handshake.create_response(received, peer.keys, index, self._randbytes)
        keypair = Keypair(keys, peer, now)
        self._keypairs[index] = keypair
        # A responder may not send on the new session until the initiator uses it.
        self._retire(peer.next)
        peer.next = keypair
        self._retire(peer.previous)
        peer.previous = None
        message_out = peer.cookies.seal(body, now)
        peer.tx_bytes += len(message_out)
        out.append((message_out, source))
        peer.on_session_derived(now)
        peer.on_authenticated_packet_traversal(now)
        peer.on_authenticated_packet_sent()

    def _foreign_session(self, source: Endpoint, now: float) -> None:
        """Rule key-elsewhere: a transport message of a session we never made (or erased)
        came from ``source``. From the endpoint of a peer whose current session is older
        than FOREIGN_GRACE it counts; FOREIGN_MIN within FOREIGN_WINDOW report
        :class:`KeyInUseElsewhere` (at most once per FOREIGN_REPORT_EVERY). (Runs only
        for such messages: a look at each peer's endpoint.)"""
        for peer in self.peers.values():
            current = peer.current
            if current is None or peer.endpoint != source:
                continue
            if now - current.created < FOREIGN_GRACE:
                return
            peer.foreign_packets += 1
            if now - peer.foreign_since > FOREIGN_WINDOW:
                peer.foreign_since, peer.foreign_recent = now, 0
            peer.foreign_recent += 1
            if (
                peer.foreign_recent >= FOREIGN_MIN
                and now - peer.foreign_reported >= FOREIGN_REPORT_EVERY
            ):
                peer.foreign_reported = now
                self.events.append(
                    KeyInUseElsewhere(peer, Endpoint.of(source), peer.foreign_recent, now)
                )
            return

    def _receive_response(
        self, message: bytes, source: Endpoint, now: float, out: list[Transmit]
    ) -> None:
        _, sender_index, receiver_index = struct.unpack_from("<III", message)
        if not self._check_macs(message, RESPONSE_MAC1_OFFSET, sender_index, source, now, out):
            return
        peer = self._handshakes.get(receiver_index)
        if peer is None or peer.handshake is None:
            self.drops["response_unknown_index"] += 1
            return
        keys = handshake.consume_response(self.identity, peer.keys, peer.handshake, message)
        if keys is None:
            self.drops["response_decrypt"] += 1
            peer.bad_responses += 1
            peer.last_bad_response = now
            return
        del self._handshakes[receiver_index]
        peer.handshake = None
        keypair = Keypair(keys, peer, now)
        self._keypairs[keys.local_index] = keypair
        if peer.next is not None:
            self._retire(peer.previous)
            peer.previous = peer.next
            peer.next = None
            self._retire(peer.current)
        else:
            self._retire(peer.previous)
            peer.previous = peer.current
        peer.current = keypair
        peer.endpoint = Endpoint.of(source)
        peer.rx_bytes += len(message)
        # (a response answers the latest initiation only: earlier ones' indices are gone)
        peer.handshake_rtt = now - peer.last_initiation_sent
        peer.on_handshake_complete(now)
        peer.on_session_derived(now)
        peer.on_authenticated_packet_received(now)
        peer.on_authenticated_packet_traversal(now)
        self.events.append(HandshakeCompleted(peer, source, True, now))
        # Confirm the session to the responder: queued data, or else a keepalive (§5.4.6).
        if not peer.queue:
            peer.queue.append(b"")
        self._flush_queue(peer, now, out)

    def _receive_cookie_reply(self, message: bytes, index: int, now: float) -> None:
        peer = self._handshakes.get(index)
        if peer is None:
            keypair = self._keypairs.get(index)
            peer = keypair.peer if keypair is not None else None
        if peer is None:
            self.drops["cookie_unknown_index"] += 1
            return
        if not peer.cookies.consume_reply(message, now):
            self.drops["cookie_decrypt"] += 1
        # The retransmission timer re-sends the initiation, now with mac2.

    # -- timers -------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest time ``poll`` has work to do, or None."""
        best: float | None = None
        for peer in self.peers.values():
            deadline = peer.next_deadline()
            if deadline is not None and (best is None or deadline < best):
                best = deadline
        return best

    def poll(self, now: float, out: list[Transmit]) -> None:
        """Fire every expired timer."""
        for peer in self.peers.values():
            if peer.zero_keys_at is not None and now >= peer.zero_keys_at:
                self._zero_keys_now(peer, now)
            if peer.retransmit_handshake_at is not None and now >= peer.retransmit_handshake_at:
                peer.retransmit_handshake_at = None
                self._retransmit_expired(peer, now, out)
            if peer.early_retry_at is not None and now >= peer.early_retry_at:
                peer.early_retry_at = None
                self._early_retry(peer, now, out)
            if peer.send_keepalive_at is not None and now >= peer.send_keepalive_at:
                peer.send_keepalive_at = None
                self.send_keepalive(peer, now, out)
                if peer.need_another_keepalive:
                    peer.need_another_keepalive = False
                    peer.send_keepalive_at = now + 10.0
            if peer.silence_handshake_at is not None and now >= peer.silence_handshake_at:
                peer.silence_handshake_at = None
                self.handshake_if_silent(peer, peer.silent_since, now, out)
            if peer.new_handshake_at is not None and now >= peer.new_handshake_at:
                # We sent data and heard nothing back for 15 s: the session may be dead.
                peer.new_handshake_at = None
                self._initiate(peer, now, out, retry=False)
            if peer.persistent_keepalive_at is not None and now >= peer.persistent_keepalive_at:
                peer.persistent_keepalive_at = None
                self.send_keepalive(peer, now, out)

    def _early_retry(self, peer: Peer, now: float, out: list[Transmit]) -> None:
        """Rule hs-early: three round trips of the last handshake (at least EARLY_RETRY_MIN;
        EARLY_RETRY_UNMEASURED, 1 s, for the first handshake with the peer, nothing measured
        yet) after a handshake's first initiation, no response yet, and no session can
        carry a packet now (none yet; the old one expired after an idle spell, or is
        suspect since the peer stopped answering): whatever goes to the peer waits for this
        handshake -- packets in the queue, or a caller that waits for the session before it
        sends (the runtime's ``wait_session``, a DNS query) -- so a new initiation goes now,
        not REKEY_TIMEOUT (5 s) after the first. On a lossy path one lost initiation or
        response would otherwise stall every new connection through the peer for 5 s (the
        first flow through a tunnel just opened as well); a handshake not needed yet (a
        rekey while the session still carries the traffic) waits as the whitepaper's timers
        say.

        Once per handshake, not an attempt (the give-up time is unchanged), and never
        sooner than a responder accepts a second initiation (wireguard-go and Linux: one per
        20 ms). A response to the first that was only slow is dropped (its index is
        retired): the second's follows within a round trip."""
        if peer.handshake is None or self.can_send(peer, now):
            return
        peer.early_retries += 1
        self._initiate(peer, now, out, retry=True, early=True)

    def _retransmit_expired(self, peer: Peer, now: float, out: list[Transmit]) -> None:
        started = peer.handshake_started if peer.handshake_started is not None else now
        if now - started >= REKEY_ATTEMPT_TIME:
            # Give up (§6.4): drop what waited for this handshake and tell the runtime.
            attempts = peer.handshake_attempts + 1
            logger.debug("handshake with %r gave up after %d attempts", peer, attempts)
            peer.send_keepalive_at = None
            peer.queue.clear()
            if peer.handshake is not None:
                self._handshakes.pop(peer.handshake.local_index, None)
                peer.handshake = None
            peer.handshake_started = None
            peer.handshake_attempts = 0
            if peer.zero_keys_at is None:
                peer.zero_keys_at = now + ZERO_KEYS_AFTER
            self.events.append(HandshakeFailed(peer, peer.endpoint, attempts, now))
            return
        peer.handshake_attempts += 1
        self._initiate(peer, now, out, retry=True)

    def _retire(self, keypair: Keypair | None) -> None:
        if keypair is not None:
            self._keypairs.pop(keypair.local_index, None)

    def _zero_keys_now(self, peer: Peer, now: float, *, keep_queue: bool = False) -> None:
        """Erase every key of ``peer`` (ZERO_KEYS_AFTER without a new session), and the
        packets waiting for a handshake unless ``keep_queue``."""
        peer.zero_keys_at = None
        self._zero_keys(peer, keep_queue=keep_queue)
        self.events.append(KeysZeroed(peer, now))

    def _zero_keys(self, peer: Peer, *, keep_queue: bool = False) -> None:
        for keypair in (peer.current, peer.previous, peer.next):
            self._retire(keypair)
        peer.current = peer.previous = peer.next = None
        if peer.handshake is not None:
            self._handshakes.pop(peer.handshake.local_index, None)
            peer.handshake = None
        if not keep_queue:
            peer.queue.clear()
