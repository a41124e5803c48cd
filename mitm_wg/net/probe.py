"""Asking a path whether it carries packets of a size: ICMP echo as the probe.

RFC 4821's packetization-layer probing asks with data a connection has to send; a
download has none (its requests and ACKs are small), so when its receiver sees the signs of
a black hole (``TcpConfig.rx_stall``) the stack asks with pings instead: an echo request of
the size that seems to vanish and one of a size that should pass, to the remote host of the
stalled connection, through the tunnel. Only the answers matter, not who sent them: the
request and its reply cross the same path in opposite directions, so a path narrow either
way loses the big one. A host that answers no pings (or a path that passes nothing) leaves
the question open.

:class:`PathProbe` is the state machine of one such question: which packets are due when,
which replies count, and the verdict. The stack sends and receives for it
(``Stack.probe_path``).
"""

from __future__ import annotations

import enum

from mitm_wg.net import icmp
from mitm_wg.net.ipv4 import build_ipv4
from mitm_wg.net.ipv6 import build_ipv6

__all__ = ["PathProbe", "Verdict"]


class Verdict(enum.Enum):
    FITS = "fits"  # the big echo came back: the path carries that size
    HOLE = "hole"  # only the small one did, every round: the big ones vanish
    UNKNOWN = "unknown"  # no answer to either (the host ignores pings, or nothing passes)


class PathProbe:
    """One question to the path between us and ``remote``: do IP packets of ``big`` bytes
    pass, when packets of ``small`` bytes do?

    ``rounds`` rounds, ``interval`` seconds apart; each sends a big echo request (until
    one has been answered) and a small one (likewise). A reply to any round counts, however
    late, until the verdict: FITS as soon as a big one is answered; after the last round's
    interval, HOLE if a small one was answered and no big one, else UNKNOWN. Echo
    identifier ``ident`` (16 bits, the stack's to pick: random); the sequence number says
    round and size (``2 * round`` big, ``+ 1`` small).
    """

    __slots__ = (
        "_big_ok",
        "_end",
        "_local",
        "_next",
        "_round",
        "_small_ok",
        "big",
        "ident",
        "interval",
        "remote",
        "rounds",
        "small",
        "started",
        "verdict",
    )

    def __init__(
        self,
        local: bytes,
        remote: bytes,
        big: int,
        small: int,
        ident: int,
        now: float,
        interval: float,
        rounds: int = 3,
    ) -> None:
        if len(local) != len(remote) or not 0 <= ident < 0x10000 or rounds < 1:
            raise ValueError("bad probe")
        header = 28 if len(remote) == 4 else 48  # IP + ICMP echo headers
        if not header <= small < big:
            raise ValueError(f"probe sizes {small} and {big}: need {header} <= small < big")
        self._local = local
        self.remote = remote
        self.big = big
        self.small = small
        self.ident = ident
        self.interval = interval
        self.rounds = rounds
        self.started = now
        self._round = 0
        self._next: float | None = now  # the next round's time (None: all sent)
        self._end = now + rounds * interval  # the verdict, at the latest
        self._big_ok = False
        self._small_ok = False
        self.verdict: Verdict | None = None

    def __repr__(self) -> str:
        state = self.verdict.value if self.verdict else f"round {self._round}/{self.rounds}"
        return f"<PathProbe {self.big}/{self.small} bytes {state}>"

    @property
    def deadline(self) -> float | None:
        """When :meth:`poll` next has something to do (None: done)."""
        if self.verdict is not None:
            return None
        return self._next if self._next is not None else self._end

    def poll(self, now: float, out: list[bytes]) -> None:
        """Append the echo requests due by ``now`` to ``out``; decide once the time is up."""
        if self.verdict is not None:
            return
        if self._next is not None and now >= self._next:
            n = self._round
            if not self._big_ok:
                out.append(self._echo(2 * n, self.big))
            if not self._small_ok:
                out.append(self._echo(2 * n + 1, self.small))
            self._round = n + 1
            self._next = None if n + 1 >= self.rounds else self.started + (n + 1) * self.interval
        if now >= self._end:
            self.verdict = Verdict.HOLE if self._small_ok else Verdict.UNKNOWN

    def on_reply(self, seq: int, length: int | None) -> bool:
        """An echo reply with our identifier and sequence number ``seq``, an ICMP message
        of ``length`` bytes, came from ``remote``; True if it was one of ours. ``length``
        None: the reply's first fragment (its length unknown). The request got there
        whole, and the host answered in pieces: it was told of a narrower path to us (by
        our own ICMP error, ``Stack.tell_remote_path_mtu``, for up to ten minutes) or
        knows one beyond the tunnel; its segments then fit as well."""
        n, small = divmod(seq, 2)
        if self.verdict is not None or n >= self._round:
            return False
        ip_header = 20 if len(self.remote) == 4 else 40
        if length is not None and length + ip_header != (self.small if small else self.big):
            return False  # (not the packet we sent: truncated, or forged)
        if small:
            self._small_ok = True
        else:
            self._big_ok = True
            self.verdict = Verdict.FITS
        return True

    @staticmethod
    def reply_fragment(buf: memoryview) -> tuple[bytes, int] | None:
        """The source and the identifier/sequence word of ``buf`` if it is the first
        fragment of an ICMP or ICMPv6 echo reply (the fragment header right after the
        IPv6 header, as a host makes it), else None."""
        n = len(buf)
        if buf[0] >> 4 == 4:
            ihl = (buf[0] & 0x0F) << 2
            frag = (buf[6] << 8) | buf[7]
            if buf[9] != 1 or frag & 0x3FFF != 0x2000 or n < ihl + 8 or ihl < 20:
                return None  # (not ICMP, or not a first fragment with more to come)
            if buf[ihl] != icmp.ICMP4_ECHO_REPLY:
                return None
            return bytes(buf[12:16]), int.from_bytes(buf[ihl + 4 : ihl + 8], "big")
        if n < 56 or buf[6] != 44 or buf[40] != 58 or (buf[42] << 8 | buf[43]) & 0xFFF9 != 1:
            return None  # (no fragment header first, not ICMPv6, or not a first fragment)
        if buf[48] != icmp.ICMP6_ECHO_REPLY:
            return None
        return bytes(buf[8:24]), int.from_bytes(buf[52:56], "big")

    def _echo(self, seq: int, size: int) -> bytes:
        local, remote = self._local, self.remote
        rest = (self.ident << 16) | seq
        if len(remote) == 4:
            body = bytes(size - 28)
            return build_ipv4(
                local, remote, 1, icmp.build_icmp4(icmp.ICMP4_ECHO_REQUEST, 0, rest, body)
            )
        body = bytes(size - 48)
        message = icmp.build_icmp6(local, remote, icmp.ICMP6_ECHO_REQUEST, 0, rest, body)
        return build_ipv6(local, remote, 58, message)
