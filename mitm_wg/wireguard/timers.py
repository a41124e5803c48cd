"""Protocol constants for WireGuard's timers (whitepaper §6.1) and the derived limits.

The timer *logic* lives in :mod:`mitm_wg.wireguard.peer`, where each deadline is a field
named after the event that arms it, in the manner of wireguard-go's ``timers.go``.
"""

from __future__ import annotations

from typing import Final

REKEY_AFTER_MESSAGES: Final = 1 << 60
REJECT_AFTER_MESSAGES: Final = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME: Final = 120.0
REJECT_AFTER_TIME: Final = 180.0
REKEY_ATTEMPT_TIME: Final = 90.0
REKEY_TIMEOUT: Final = 5.0
KEEPALIVE_TIMEOUT: Final = 10.0
COOKIE_REFRESH_TIME: Final = 120.0

#: An initiator that *receives* data on a keypair this old starts a new handshake (§6.2),
#: so that a fresh keypair is ready before the old one is rejected.
REKEY_ON_RECEIVE_AGE: Final = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
#: Jitter added to each handshake retransmission (§6.1: up to 333 ms).
REKEY_TIMEOUT_JITTER_MAX: Final = 0.333
#: After this long without a new handshake, every key of a peer is erased.
ZERO_KEYS_AFTER: Final = REJECT_AFTER_TIME * 3
#: Packets held per peer while a handshake is in flight; older ones are dropped first.
MAX_QUEUED_PACKETS: Final = 1024
#: A responder accepts at most one initiation from a peer per this interval (wireguard-go's
#: rate of 50 per second), so replayed-but-newer initiations cannot churn keys.
MIN_INITIATION_INTERVAL: Final = 1 / 50
#: The shortest wait before an initiation goes again early (``Peer.early_retry_at``): three
#: round trips of the last handshake, at least this (TCP's minimum RTO); never sooner than
#: a responder's MIN_INITIATION_INTERVAL.
EARLY_RETRY_MIN: Final = 0.2
#: The wait before the first handshake with a peer, with no round trip measured yet, sends
#: its initiation again early: RFC 6298's initial RTO, after which Linux sends its first SYN
#: again.
EARLY_RETRY_UNMEASURED: Final = 1.0
