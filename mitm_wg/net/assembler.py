"""Out-of-order receive data: sorted, merged ranges of absolute stream positions.

Positions are plain (unbounded) integers; the TCP socket maps 32-bit sequence numbers to
them, so there is no wraparound here.  Each range keeps its data as a list of chunks and
joins it once, when the range becomes contiguous with the in-order stream.
"""

from __future__ import annotations

from bisect import bisect_left

__all__ = ["Assembler"]

_DUP_ACK_THRESHOLD = 3  # duplicate ACKs that start a fast retransmit (RFC 5681 §3.2)


class Assembler:
    """Holds data that arrived ahead of the in-order point.

    ``add`` merges overlapping/adjacent ranges (bytes already held win over new copies);
    ``pop`` hands out the data that starts at or before the in-order point.

    ``size`` (bytes held) is public and non-zero exactly when a range is held: it is the
    emptiness test for per-packet paths (an attribute read, where ``bool()`` would be a
    Python-level ``__bool__`` call); ``len()`` is the number of ranges, ``sack_blocks``
    the ranges to report.

    ``dsack`` is the duplicate block to report once in the next ACK (RFC 2883), or None:
    ``add`` records the first part of new data that was already held, the socket the
    copies of data below the in-order point (:meth:`duplicate`).
    """

    __slots__ = (
        "_dup_acks",
        "_dup_acks_at",
        "_ranges",
        "_recent",
        "dsack",
        "max_ranges",
        "size",
    )

    def __init__(self, max_ranges: int = 64) -> None:
        # each entry: [start, end, chunks]
        self._ranges: list[list] = []
        self._recent: list[int] = []  # starts of ranges most recently touched, newest first
        self.max_ranges = max_ranges
        self.size = 0  # bytes held
        # duplicate ACKs sent while the in-order point was at _dup_acks_at (dup_acks_due)
        self._dup_acks = 0
        self._dup_acks_at = -1
        self.dsack: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self._ranges)

    def __bool__(self) -> bool:
        return bool(self._ranges)

    def ranges(self) -> list[tuple[int, int]]:
        return [(r[0], r[1]) for r in self._ranges]

    def add(self, start: int, data: bytes | bytearray | memoryview) -> bool:
        """Store ``data`` at ``start``; False (nothing stored) if it would exceed max_ranges."""
        end = start + len(data)
        if end <= start:
            return True
        rs = self._ranges
        if rs:
            last = rs[-1]
            if last[1] == start:
                # The common case: the next segment behind a hole extends the last range
                # (what the general merge below does for it, without the search).
                last[1] = end
                last[2].append(bytes(data))
                self.size += end - start
                recent = self._recent
                if not recent or recent[0] != last[0]:
                    self._touch(last[0])
                return True
        i = bisect_left(rs, start, key=lambda r: r[1])  # first range ending at/after start
        j = i
        while j < len(rs) and rs[j][0] <= end:
            j += 1
        if i == j:
            if len(rs) >= self.max_ranges:
                return False
            rs.insert(i, [start, end, [bytes(data)]])
            self.size += end - start
            self._touch(start)
            return True
        first = rs[i]
        merged_start = min(start, first[0])
        cur = merged_start
        chunks: list[bytes] = []
        mv = memoryview(data)
        for k in range(i, j):
            r = rs[k]
            if r[0] > cur:
                chunks.append(bytes(mv[cur - start : r[0] - start]))
                self.size += r[0] - cur
            chunks.extend(r[2])
            cur = r[1]
            # the part of the new data this range already held (empty when it only adjoins)
            ds = r[0] if r[0] > start else start
            de = r[1] if r[1] < end else end
            if ds < de:
                self.duplicate(ds, de)
        if end > cur:
            chunks.append(bytes(mv[cur - start :]))
            self.size += end - cur
            cur = end
        rs[i:j] = [[merged_start, cur, chunks]]
        self._touch(merged_start)
        return True

    def extends_newest(self, start: int) -> bool:
        """Data at ``start`` extends the most recently changed range (the first SACK block)
        at its end: that block grows (perhaps into the next range), no other block becomes
        the first."""
        rs = self._ranges
        if not rs or not self._recent:
            return False
        newest = self._recent[0]
        last = rs[-1]
        if last[0] == newest:
            return last[1] == start  # the common case: the last range
        k = bisect_left(rs, start, key=lambda r: r[1])  # the first range ending at/after start
        return k < len(rs) and rs[k][1] == start and rs[k][0] == newest

    def _touch(self, start: int) -> None:
        recent = self._recent
        if start in recent:
            recent.remove(start)
        recent.insert(0, start)
        if len(recent) > 8:
            del recent[8:]

    def duplicate(self, start: int, end: int) -> None:
        """Data ``start``..``end`` arrived again: the D-SACK block of the next ACK (RFC 2883
        §4: one contiguous duplicate block, reported once). A block already pending grows
        by one that overlaps or adjoins it; another is not reported (as Linux's
        tcp_dsack_extend: the first duplicate of a batch wins)."""
        ds = self.dsack
        if ds is None:
            self.dsack = (start, end)
        elif start <= ds[1] and ds[0] <= end:
            self.dsack = (start if start < ds[0] else ds[0], end if end > ds[1] else ds[1])

    def dup_acks_due(self, at: int, owed: int) -> int:
        """How many of ``owed`` extra duplicate ACKs to send now, the in-order point being
        ``at``, for a sender with SACK: as Linux's SACK compression (tcp_sack_compress), the
        first three per in-order point go out, for a sender that counts duplicate ACKs even
        though it negotiated SACK (smoltcp: three start its fast retransmit); after that,
        copies of the one ACK that carries every SACK block tell a sender nothing. Counts
        the ACK sent with them."""
        if at != self._dup_acks_at:
            self._dup_acks_at = at
            self._dup_acks = 0
        n = _DUP_ACK_THRESHOLD - self._dup_acks
        if n > owed:
            n = owed
        elif n < 0:
            n = 0
        self._dup_acks += n + 1
        return n

    def first_start(self) -> int | None:
        return self._ranges[0][0] if self._ranges else None

    def pop(self, at: int) -> bytes | None:
        """If the first range reaches ``at`` (starts <= at < end), remove it and return its
        data from ``at`` on.  Ranges wholly below ``at`` are discarded."""
        rs = self._ranges
        while rs and rs[0][0] <= at:
            start, end, chunks = rs.pop(0)
            self.size -= end - start
            if end > at:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                return data[at - start :] if at > start else data
        return None

    def sack_blocks(self, limit: int) -> tuple[tuple[int, int], ...]:
        """Up to ``limit`` ranges, the most recently changed first (RFC 2018 §4)."""
        rs = self._ranges
        if not rs:
            return ()
        out: list[tuple[int, int]] = []
        seen: set[int] = set()
        # A recent start may have been swallowed by a merge; map it to its containing range.
        for s in self._recent:
            if len(out) >= limit:
                break
            k = bisect_left(rs, s + 1, key=lambda r: r[1])
            if k < len(rs) and rs[k][0] <= s and k not in seen:
                seen.add(k)
                out.append((rs[k][0], rs[k][1]))
        for k, r in enumerate(rs):
            if len(out) >= limit:
                break
            if k not in seen:
                out.append((r[0], r[1]))
        return tuple(out)

    def clear(self) -> None:
        self.dsack = None
        self._ranges.clear()
        self._recent.clear()
        self.size = 0
