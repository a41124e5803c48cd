"""WireGuard message layouts (whitepaper §5.4.2–§5.4.7).

Every message starts with a little-endian u32 whose low byte is the type and whose upper
three bytes are zero.  Handshake messages have fixed sizes; transport data is a 16-byte
header followed by the AEAD ciphertext of the (padded) IP packet.
"""

from __future__ import annotations

import struct
from typing import Final

MESSAGE_INITIATION: Final = 1
MESSAGE_RESPONSE: Final = 2
MESSAGE_COOKIE_REPLY: Final = 3
MESSAGE_TRANSPORT: Final = 4

INITIATION_SIZE: Final = 148
RESPONSE_SIZE: Final = 92
COOKIE_REPLY_SIZE: Final = 64
TRANSPORT_HEADER_SIZE: Final = 16
AEAD_TAG_SIZE: Final = 16
TRANSPORT_MIN_SIZE: Final = TRANSPORT_HEADER_SIZE + AEAD_TAG_SIZE  # a keepalive

#: Offsets of mac1 within the handshake messages (mac2 follows mac1 directly).
INITIATION_MAC1_OFFSET: Final = INITIATION_SIZE - 32
RESPONSE_MAC1_OFFSET: Final = RESPONSE_SIZE - 32

# type(u32 LE) | sender(u32 LE) | ephemeral(32) | static(48) | timestamp(28) ; macs appended
INITIATION_BODY: Final = struct.Struct("<II32s48s28s")
# type | sender | receiver | ephemeral(32) | empty(16) ; macs appended
RESPONSE_BODY: Final = struct.Struct("<III32s16s")
# type | receiver | nonce(24) | encrypted cookie(32)
COOKIE_REPLY: Final = struct.Struct("<II24s32s")
# type | receiver | counter(u64 LE)
TRANSPORT_HEADER: Final = struct.Struct("<IIQ")
# The first 4 bytes of every message.
MESSAGE_TYPE: Final = struct.Struct("<I")
# type and receiver index of a transport message, read together on the hot path.
TYPE_AND_INDEX: Final = struct.Struct("<II")


def message_type(data: bytes | memoryview) -> int:
    """The message type, or 0 when the header is malformed (reserved bytes must be zero)."""
    if len(data) < 4:
        return 0
    value = MESSAGE_TYPE.unpack_from(data)[0]
    return value if value <= 4 else 0
