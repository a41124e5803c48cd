"""Per-peer state: keys, keypairs, the packet queue, timers and counters.

The timers follow the whitepaper (§6) in the shape of wireguard-go's ``timers.go``: each
deadline is a field named after what it does when it expires, armed and disarmed by the
``on_*`` methods named after the event that arms them.  A deadline of ``None`` is disarmed.
The :class:`~mitm_wg.wireguard.device.Device` calls the ``on_*`` hooks and fires expired
deadlines in ``poll``.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mitm_wg.config import Endpoint, format_endpoint
from mitm_wg.keys import encode_key
from mitm_wg.wireguard.cookie import CookieJar
from mitm_wg.wireguard.timers import (
    KEEPALIVE_TIMEOUT,
    MAX_QUEUED_PACKETS,
    REKEY_TIMEOUT,
    ZERO_KEYS_AFTER,
)

if TYPE_CHECKING:
    from mitm_wg.wireguard.handshake import InitiatorState, RemoteKeys
    from mitm_wg.wireguard.session import Keypair

__all__ = ["Network", "Peer", "PeerStatus", "format_age", "format_bytes"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def format_age(seconds: float) -> str:
    """How long ago, as `wg show` says it but shorter: "12 s ago", "3 min 5 s ago",
    "2 h 1 min ago", "3 d 4 h ago" (a clock that stepped back reads "0 s ago")."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s ago"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s} s ago"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h} h {m} min ago"
    d, h = divmod(h, 24)
    return f"{d} d {h} h ago"


def format_bytes(n: int) -> str:
    """A byte count as `wg show` prints transfer: B, then KiB/MiB/GiB/TiB with 2 decimals."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.2f} {unit}"
    return f"{value / 1024:.2f} TiB"


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """A snapshot for status output (no key material besides the public key)."""

    public_key: str
    endpoint: Endpoint | None
    allowed_ips: tuple[Network, ...]
    last_handshake: float | None  # `now` of the last completed handshake
    rx_bytes: int
    tx_bytes: int
    handshake_attempts: int
    handshakes_completed: int
    has_session: bool
    #: Wall-clock (Unix) time of the last completed handshake: ``last_handshake`` plus the
    #: device's ``unix_time_offset``. Compare with ``time.time()`` for its age.
    last_handshake_unix: float | None = None
    #: The round trip the last handshake took (``Peer.handshake_rtt``), seconds, or None.
    handshake_rtt: float | None = None
    #: Transport messages from its endpoint of sessions we never made, while ours was
    #: established (``Peer.foreign_packets``): another client uses our key.
    foreign_packets: int = 0

    def handshake_age(self, unix_now: float) -> float | None:
        """Seconds since the last completed handshake at wall-clock ``unix_now``, or None."""
        if self.last_handshake_unix is None:
            return None
        return max(0.0, unix_now - self.last_handshake_unix)

    def describe(self, unix_now: float) -> str:
        """One line in the manner of `wg show`'s peer section, ages at wall-clock ``unix_now``:
        ``peer KEY endpoint 198.51.100.7:51820 session=yes latest handshake: 12 s ago (48 ms
        round trip), transfer: 1.20 MiB received, 316.00 KiB sent, handshakes=3``."""
        age = self.handshake_age(unix_now)
        handshake = "never" if age is None else format_age(age)
        if age is not None and self.handshake_rtt is not None:
            handshake += f" ({self.handshake_rtt * 1000:.0f} ms round trip)"
        elsewhere = ""
        if self.foreign_packets:
            elsewhere = (
                f", {self.foreign_packets} packets of another client's sessions"
                " (this key is in use elsewhere)"
            )
        return (
            f"peer {self.public_key} endpoint {format_endpoint(self.endpoint)} "
            f"session={'yes' if self.has_session else 'no'} latest handshake: {handshake}, "
            f"transfer: {format_bytes(self.rx_bytes)} received, "
            f"{format_bytes(self.tx_bytes)} sent, handshakes={self.handshakes_completed}"
            f"{elsewhere}"
        )


class Peer:
    """One WireGuard peer of a :class:`~mitm_wg.wireguard.device.Device`."""

    __slots__ = (
        "allowed_ips",
        "bad_responses",
        "cookies",
        "current",
        "early_retries",
        "early_retry_at",
        "endpoint",
        "foreign_packets",
        "foreign_recent",
        "foreign_reported",
        "foreign_since",
        "handshake",
        "handshake_attempts",
        "handshake_attempts_total",
        "handshake_rtt",
        "handshake_started",
        "handshakes_completed",
        "keys",
        "last_bad_response",
        "last_handshake",
        "last_initiation_received",
        "last_initiation_sent",
        "last_initiation_timestamp",
        "last_received",
        "need_another_keepalive",
        "new_handshake_at",
        "next",
        "persistent_keepalive",
        "persistent_keepalive_at",
        "previous",
        "public_key",
        "queue",
        "queue_dropped",
        "retransmit_handshake_at",
        "rx_bytes",
        "send_keepalive_at",
        "sent_last_minute_handshake",
        "session_suspect",
        "silence_handshake_at",
        "silence_handshakes",
        "silent_since",
        "tx_bytes",
        "zero_keys_at",
    )

    def __init__(
        self,
        keys: RemoteKeys,
        *,
        endpoint: Endpoint | None,
        allowed_ips: tuple[Network, ...],
        persistent_keepalive: float | None,
    ) -> None:
        self.public_key = keys.public
        self.keys = keys
        self.cookies = CookieJar(keys.mac1_key, keys.cookie_key)
        self.endpoint = endpoint
        self.allowed_ips = allowed_ips
        self.persistent_keepalive = persistent_keepalive or None

        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None
        self.handshake: InitiatorState | None = None
        self.queue: deque[bytes] = deque()
        self.queue_dropped = 0

        # Responder-side replay and flood protection for initiations.
        self.last_initiation_timestamp = bytes(12)
        self.last_initiation_received = float("-inf")
        # Initiator-side rate limit and give-up bookkeeping.
        self.last_initiation_sent = float("-inf")
        self.handshake_started: float | None = None
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False

        # Deadlines (None = disarmed).
        self.retransmit_handshake_at: float | None = None
        #: Rule hs-early: one initiation sent again before REKEY_TIMEOUT, when no session
        #: can carry packets meanwhile (see Device._early_retry).
        self.early_retry_at: float | None = None
        self.send_keepalive_at: float | None = None
        self.new_handshake_at: float | None = None
        self.zero_keys_at: float | None = None
        self.persistent_keepalive_at: float | None = None
        self.need_another_keepalive = False
        # Device.handshake_if_silent, held back by the rate limit: retry then, unless
        # something authenticated arrived after silent_since.
        self.silence_handshake_at: float | None = None
        self.silent_since = float("-inf")
        #: Set when that rule started a handshake: send nothing more on the current session,
        #: queue it for the next one (cleared when a handshake completes).
        self.session_suspect = False

        # Counters.
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.last_handshake: float | None = None
        self.handshake_attempts_total = 0
        self.handshakes_completed = 0
        #: Initiations sent again early by rule hs-early.
        self.early_retries = 0
        #: The round trip of the last completed handshake: from our initiation to its
        #: response when we initiated; from our response to the initiator's first transport
        #: message when we answered (§5.4.6: it sends one at once, a keepalive if it has
        #: nothing else). The time to the peer's WireGuard and back, so a lower bound for a
        #: round trip to anything it routes; None before the first handshake.
        self.handshake_rtt: float | None = None
        #: Handshake responses to our initiations that did not decrypt, and `now` of the
        #: last: the peer took our initiation but mixed another PresharedKey (or none) into
        #: its answer; with a wrong key on either side it stays silent instead.
        self.bad_responses = 0
        self.last_bad_response = float("-inf")
        #: Rule key-elsewhere (Device._foreign_session): transport messages from the peer's
        #: endpoint of sessions we never made, counted while ours is established (another
        #: client with our key); those of the window from ``foreign_since``; when the last
        #: KeyInUseElsewhere was reported.
        self.foreign_packets = 0
        self.foreign_recent = 0
        self.foreign_since = float("-inf")
        self.foreign_reported = float("-inf")
        #: `now` of the last authenticated packet from the peer (any message type).
        self.last_received = float("-inf")
        #: Handshakes started by :meth:`Device.handshake_if_silent`.
        self.silence_handshakes = 0

    @property
    def public_key_b64(self) -> str:
        return encode_key(self.public_key)

    def __repr__(self) -> str:
        return f"<Peer {self.public_key_b64} endpoint={format_endpoint(self.endpoint)}>"

    def status(self, unix_time_offset: float | None = None) -> PeerStatus:
        """A snapshot; ``unix_time_offset`` (the device's) turns ``now`` values into Unix time."""
        last = self.last_handshake
        return PeerStatus(
            public_key=self.public_key_b64,
            endpoint=self.endpoint,
            allowed_ips=self.allowed_ips,
            last_handshake=self.last_handshake,
            rx_bytes=self.rx_bytes,
            tx_bytes=self.tx_bytes,
            handshake_attempts=self.handshake_attempts_total,
            handshakes_completed=self.handshakes_completed,
            has_session=self.current is not None,
            last_handshake_unix=(
                None if last is None or unix_time_offset is None else last + unix_time_offset
            ),
            handshake_rtt=self.handshake_rtt,
            foreign_packets=self.foreign_packets,
        )

    def enqueue(self, packet: bytes) -> None:
        """Hold a packet until a session exists; the oldest is dropped when full."""
        if len(self.queue) >= MAX_QUEUED_PACKETS:
            self.queue.popleft()
            self.queue_dropped += 1
        self.queue.append(packet)

    def next_deadline(self) -> float | None:
        deadlines = [
            d
            for d in (
                self.retransmit_handshake_at,
                self.early_retry_at,
                self.send_keepalive_at,
                self.new_handshake_at,
                self.zero_keys_at,
                self.persistent_keepalive_at,
                self.silence_handshake_at,
            )
            if d is not None
        ]
        return min(deadlines) if deadlines else None

    # -- timer hooks, named after the event (wireguard-go's timers.go) ----------------------

    def on_data_sent(self, now: float) -> None:
        # Expect to hear back within KEEPALIVE_TIMEOUT + REKEY_TIMEOUT, else re-handshake.
        if self.new_handshake_at is None:
            self.new_handshake_at = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT

    def on_data_received(self, now: float) -> None:
        # Answer with a keepalive unless we send something ourselves soon.
        if self.send_keepalive_at is None:
            self.send_keepalive_at = now + KEEPALIVE_TIMEOUT
        else:
            self.need_another_keepalive = True

    def on_authenticated_packet_sent(self) -> None:
        self.send_keepalive_at = None

    def on_authenticated_packet_received(self, now: float) -> None:
        self.new_handshake_at = None
        self.last_received = now

    def on_authenticated_packet_traversal(self, now: float) -> None:
        if self.persistent_keepalive:
            self.persistent_keepalive_at = now + self.persistent_keepalive

    @property
    def initiation_allowed_at(self) -> float:
        """The earliest time a new initiation may go out: one per REKEY_TIMEOUT (whitepaper
        §6.1)."""
        return self.last_initiation_sent + REKEY_TIMEOUT

    def on_handshake_initiated(self, now: float, jitter: float) -> None:
        self.persistent_keepalive_at = None
        self.retransmit_handshake_at = now + REKEY_TIMEOUT + jitter

    def on_handshake_complete(self, now: float) -> None:
        self.retransmit_handshake_at = None
        self.early_retry_at = None
        self.handshake_attempts = 0
        self.handshake_started = None
        self.sent_last_minute_handshake = False
        self.session_suspect = False
        self.last_handshake = now
        self.handshakes_completed += 1

    def on_session_derived(self, now: float) -> None:
        self.zero_keys_at = now + ZERO_KEYS_AFTER
