"""TCP wire format (RFC 9293 §3.1) with the options a modern peer uses.

Options understood: MSS (kind 2), window scale (3, RFC 7323), SACK-permitted (4) and SACK
blocks (5, RFC 2018), timestamps (8, RFC 7323).  Unknown options are skipped.

:func:`parse_tcp` never raises on hostile input: it returns ``None`` for a malformed
segment (the caller counts it).  It does not check the checksum; the stack does that with
:func:`tcp_checksum_ok` (or :func:`mitm_wg.net.checksum.verify`) before parsing.

:func:`build_tcp` takes the source and destination addresses (raw 4 or 16 bytes) and fills
the checksum itself, because it knows the segment length the pseudo-header needs.
"""

from __future__ import annotations

import struct

from mitm_wg.net.checksum import fold, ones_sum, pseudo_header_sum

__all__ = [
    "ACK",
    "CWR",
    "ECE",
    "FIN",
    "HALF",
    "M32",
    "PSH",
    "RST",
    "SYN",
    "TCP_TUPLE_FIELDS",
    "URG",
    "TcpRun",
    "TcpSegment",
    "TcpTuple",
    "build_tcp",
    "build_tcp_parts",
    "options_length",
    "parse_tcp",
    "tcp_checksum_ok",
    "unwrap",
]

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80

PROTO_TCP = 6

#: Sequence-number arithmetic (RFC 9293 §3.4): wire values are 32 bits, compared modulo 2^32.
M32 = 0xFFFFFFFF
HALF = 0x80000000


def unwrap(base: int, wire: int) -> int:
    """The absolute sequence number nearest ``base`` whose low 32 bits are ``wire``.

    The socket keeps sequence numbers as unbounded integers (ISN/IRS plus bytes since) and
    converts at the edge with this one function, so wraparound needs no care elsewhere.
    """
    d = (wire - base) & M32
    if d >= HALF:
        d -= 0x100000000
    return base + d


_HEADER = struct.Struct("!HHIIBBHHH")
_HEADER_LEN = 20
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U32X2 = struct.Struct("!II")
# Pre-packed option encodings (the common layouts Linux also uses, 4-byte aligned).
_OPT_MSS = struct.Struct("!BBH")  # kind 2, len 4
_OPT_TS_ALIGNED = struct.Struct("!BBBBII")  # NOP NOP kind 8 len 10 TSval TSecr
_NOP_NOP_SACK = b"\x01\x01\x05"
_SACKOK_NOP_NOP = b"\x04\x02\x01\x01"  # when timestamps are absent
_SACKOK_TS = struct.Struct("!BBBBII")  # kind 4 len 2, kind 8 len 10, TSval TSecr
_NOP_WS = struct.Struct("!BBBB")  # NOP, kind 3, len 3, shift

#: The fast-path encoding of a :class:`TcpSegment` whose only option is the timestamp (an
#: established connection's data and ACKs): a plain tuple of the fields named in
#: :data:`TCP_TUPLE_FIELDS`, ``seq``/``ack`` already 32-bit. ``TcpSocket.dispatch(...,
#: tuples=True)`` emits it from the bulk-send fast path (no per-segment object), the stack's
#: ``_wrap_tcp_fast`` builds the same bytes from it as from the segment, and
#: ``TcpSegment.from_tuple`` gives that segment back.
TcpTuple = tuple[int, int, int, int, int, int, int, int, bytes | bytearray | memoryview]
#: A run of such segments in one item: the same fields, with a *list* of payloads in place of
#: the payload: consecutive segments from ``seq`` on (each the next one's start), all with the
#: first one's flags, ACK, window and timestamp. The bulk-send fast path emits its segments
#: so, and ``_wrap_tcp_fast`` sums and packs those shared fields once per run;
#: :meth:`TcpSegment.segments_of` gives the segments back.
TcpRun = tuple[int, int, int, int, int, int, int, int, list[bytes]]
TCP_TUPLE_FIELDS = (
    "src_port",
    "dst_port",
    "seq",
    "ack",
    "flags",
    "window",
    "tsval",  # timestamp[0]
    "tsecr",  # timestamp[1]
    "payload",
)

_FLAG_NAMES = ((SYN, "S"), (FIN, "F"), (RST, "R"), (PSH, "P"), (ACK, "."), (URG, "U"))


class TcpSegment:
    """One TCP segment, parsed or about to be built: the one segment type.

    ``seq``/``ack`` are the 32-bit wire values.  ``window`` is the raw 16-bit window field
    (unscaled).  ``payload`` may be a memoryview into the received packet.

    Built whole (``parse_tcp`` and the socket construct it in one call) and not changed
    afterwards; the fields are plain slots only because a frozen class would slow down the
    per-segment constructor.  Its fast-path encoding is :data:`TcpTuple`.
    """

    __slots__ = (
        "ack",
        "dst_port",
        "flags",
        "mss",
        "payload",
        "sack_blocks",
        "sack_permitted",
        "seq",
        "src_port",
        "timestamp",
        "window",
        "wscale",
    )

    def __init__(
        self,
        src_port: int = 0,
        dst_port: int = 0,
        seq: int = 0,
        ack: int = 0,
        flags: int = 0,
        window: int = 0,
        timestamp: tuple[int, int] | None = None,
        sack_blocks: tuple[tuple[int, int], ...] = (),
        payload: bytes | bytearray | memoryview = b"",
        *,
        mss: int | None = None,
        wscale: int | None = None,
        sack_permitted: bool = False,
    ) -> None:
        # (timestamp, sack_blocks, payload may be positional: the socket builds every
        # segment it sends with them, and matching keywords costs per call)
        self.src_port = src_port
        self.dst_port = dst_port
        self.seq = seq
        self.ack = ack
        self.flags = flags
        self.window = window
        self.mss = mss
        self.wscale = wscale
        self.sack_permitted = sack_permitted
        self.timestamp = timestamp
        self.sack_blocks = sack_blocks
        self.payload = payload

    @classmethod
    def from_tuple(cls, t: TcpTuple) -> TcpSegment:
        """The segment a :data:`TcpTuple` encodes."""
        sport, dport, seq, ack, flags, window, tsval, tsecr, payload = t
        return cls(sport, dport, seq, ack, flags, window, (tsval, tsecr), (), payload)

    @classmethod
    def segments_of(cls, item: TcpSegment | TcpTuple | TcpRun) -> list[TcpSegment]:
        """The segments one item of ``TcpSocket.dispatch(..., tuples=True)`` output stands
        for: a segment, a :data:`TcpTuple` or a :data:`TcpRun`."""
        if type(item) is not tuple:
            return [item]  # type: ignore[list-item]
        sport, dport, seq, ack, flags, window, tsval, tsecr, payload = item
        if type(payload) is not list:
            return [cls.from_tuple(item)]  # type: ignore[arg-type]
        out = []
        for p in payload:
            out.append(cls.from_tuple((sport, dport, seq, ack, flags, window, tsval, tsecr, p)))
            seq = (seq + len(p)) & 0xFFFFFFFF
        return out

    def seg_len(self) -> int:
        """Sequence space the segment occupies: payload length plus one each for SYN, FIN."""
        n = len(self.payload)
        if self.flags & SYN:
            n += 1
        if self.flags & FIN:
            n += 1
        return n

    def _key(self) -> tuple[object, ...]:
        return (
            self.src_port,
            self.dst_port,
            self.seq,
            self.ack,
            self.flags,
            self.window,
            self.mss,
            self.wscale,
            self.sack_permitted,
            self.timestamp,
            tuple(self.sack_blocks),
            bytes(self.payload),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TcpSegment):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        flags = "".join(name for bit, name in _FLAG_NAMES if self.flags & bit) or "-"
        parts = [
            f"{self.src_port}>{self.dst_port}",
            f"[{flags}]",
            f"seq={self.seq}",
            f"ack={self.ack}",
            f"win={self.window}",
        ]
        if self.mss is not None:
            parts.append(f"mss={self.mss}")
        if self.wscale is not None:
            parts.append(f"ws={self.wscale}")
        if self.sack_permitted:
            parts.append("sackOK")
        if self.timestamp is not None:
            parts.append(f"ts={self.timestamp[0]}/{self.timestamp[1]}")
        if self.sack_blocks:
            parts.append(f"sack={list(self.sack_blocks)}")
        if self.payload:
            parts.append(f"len={len(self.payload)}")
        return f"TcpSegment({' '.join(parts)})"


#: (mss, wscale, sack_permitted, timestamp, sack_blocks): the option fields of a TcpSegment
_Options = tuple[int | None, int | None, bool, tuple[int, int] | None, tuple[tuple[int, int], ...]]


def _parse_options(opts: memoryview) -> _Options | None:
    """``(mss, wscale, sack_permitted, timestamp, sack_blocks)`` from ``opts``; None when the
    options are malformed."""
    mss: int | None = None
    wscale: int | None = None
    sack_permitted = False
    timestamp: tuple[int, int] | None = None
    sack_blocks: tuple[tuple[int, int], ...] = ()
    i = 0
    n = len(opts)
    while i < n:
        kind = opts[i]
        if kind == 0:  # end of option list
            break
        if kind == 1:  # NOP
            i += 1
            continue
        if i + 1 >= n:
            return None
        length = opts[i + 1]
        if length < 2 or i + length > n:
            return None
        if kind == 8:
            if length == 10:
                timestamp = _U32X2.unpack_from(opts, i + 2)
        elif kind == 2:
            if length == 4:
                mss = _U16.unpack_from(opts, i + 2)[0]
        elif kind == 5:
            count = (length - 2) // 8
            if length == 2 + 8 * count and count:
                blocks = struct.unpack_from(f"!{2 * count}I", opts, i + 2)
                sack_blocks = tuple(zip(blocks[0::2], blocks[1::2], strict=True))
        elif kind == 3:
            if length == 3:
                wscale = opts[i + 2]
        elif kind == 4:
            if length == 2:
                sack_permitted = True
        i += length
    return mss, wscale, sack_permitted, timestamp, sack_blocks


def parse_tcp(buf: bytes | bytearray | memoryview) -> TcpSegment | None:
    """Parse a TCP segment (header, options, payload); ``None`` if it is malformed.

    The payload is a memoryview slice of ``buf`` (no copy).  The checksum is not checked.
    """
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if len(mv) < _HEADER_LEN:
        return None
    src, dst, seq, ack, off, flags, window, _csum, _urg = _HEADER.unpack_from(mv)
    hlen = (off >> 4) * 4
    if hlen < _HEADER_LEN or hlen > len(mv):
        return None
    if hlen == _HEADER_LEN:
        return TcpSegment(src, dst, seq, ack, flags, window, payload=mv[hlen:])
    opts = _parse_options(mv[_HEADER_LEN:hlen])
    if opts is None:
        return None
    mss, wscale, sack_permitted, timestamp, sack_blocks = opts
    return TcpSegment(
        src,
        dst,
        seq,
        ack,
        flags,
        window,
        mss=mss,
        wscale=wscale,
        sack_permitted=sack_permitted,
        timestamp=timestamp,
        sack_blocks=sack_blocks,
        payload=mv[hlen:],
    )


def _build_options(seg: TcpSegment) -> bytes:
    parts: list[bytes] = []
    if seg.mss is not None:
        parts.append(_OPT_MSS.pack(2, 4, seg.mss))
    ts = seg.timestamp
    if seg.sack_permitted:
        if ts is not None:
            parts.append(_SACKOK_TS.pack(4, 2, 8, 10, ts[0], ts[1]))
            ts = None
        else:
            parts.append(_SACKOK_NOP_NOP)
    if ts is not None:
        parts.append(_OPT_TS_ALIGNED.pack(1, 1, 8, 10, ts[0], ts[1]))
    if seg.wscale is not None:
        parts.append(_NOP_WS.pack(1, 3, 3, seg.wscale))
    if seg.sack_blocks:
        blocks = seg.sack_blocks
        parts.append(_NOP_NOP_SACK + bytes((2 + 8 * len(blocks),)))
        parts.append(struct.pack(f"!{2 * len(blocks)}I", *(e for b in blocks for e in b)))
    return b"".join(parts)


def options_length(
    *,
    mss: bool = False,
    wscale: bool = False,
    sack_permitted: bool = False,
    timestamp: bool = False,
    sack_blocks: int = 0,
) -> int:
    """Bytes of options :func:`build_tcp` emits for the given option set (multiple of 4)."""
    n = 4 if mss else 0
    if sack_permitted or timestamp:
        n += 12 if timestamp else 4
    if wscale:
        n += 4
    if sack_blocks:
        n += 4 + 8 * sack_blocks
    return n


def build_tcp_parts(
    seg: TcpSegment, src: bytes, dst: bytes
) -> tuple[bytes, bytes | bytearray | memoryview]:
    """The header (with options and a correct checksum) and the payload, unjoined.

    Lets the stack join IP header, TCP header and payload in a single copy.
    """
    opts = (
        _build_options(seg)
        if (
            seg.mss is not None
            or seg.timestamp is not None
            or seg.sack_permitted
            or seg.wscale is not None
            or seg.sack_blocks
        )
        else b""
    )
    if len(opts) > 40:
        raise ValueError(f"TCP options too long ({len(opts)} bytes > 40)")
    hlen = _HEADER_LEN + len(opts)
    payload = seg.payload
    total = hlen + len(payload)
    header = _HEADER.pack(
        seg.src_port,
        seg.dst_port,
        seg.seq & 0xFFFFFFFF,
        seg.ack & 0xFFFFFFFF,
        (hlen // 4) << 4,
        seg.flags,
        seg.window,
        0,
        0,
    )
    if opts:
        header += opts
    total_sum = ones_sum(header) + pseudo_header_sum(src, dst, PROTO_TCP, total)
    if payload:
        total_sum += ones_sum(payload)
    csum = fold(total_sum)
    # fold() never yields 0; for TCP 0xFFFF and 0 are equivalent, receivers accept both.
    header = header[:16] + _U16.pack(csum) + header[18:]
    return header, payload


def build_tcp(seg: TcpSegment, src: bytes, dst: bytes) -> bytes:
    """Serialise ``seg`` (header + options + payload) with the checksum filled in.

    ``src``/``dst`` are the raw IP addresses (4 or 16 bytes) for the pseudo-header.
    """
    header, payload = build_tcp_parts(seg, src, dst)
    if payload:
        return header + payload
    return header


def tcp_checksum_ok(buf: bytes | bytearray | memoryview, src: bytes, dst: bytes) -> bool:
    """True when the checksum of the TCP segment ``buf`` (checksum field included) is right."""
    return (ones_sum(buf) + pseudo_header_sum(src, dst, PROTO_TCP, len(buf))) % 0xFFFF == 0
