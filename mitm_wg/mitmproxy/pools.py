"""Exit pools: a named group of tunnels and a policy choosing one per connection.

Option ``wg_pool`` (repeatable): ``NAME=POLICY:TUNNEL,TUNNEL,...`` with POLICY one of

``round-robin``
    each new connection takes the next member;
``sticky``
    one member per destination host (a stable hash of the host over the members, so a host
    keeps its exit across connections and restarts; when that member is down the next one
    in order stands in);
``random``
    a member at random per connection.

A pool name is used wherever a tunnel name is: ``use_tunnel(server, "pool")``,
``flow.metadata["wg_tunnel"] = "pool"``. The first pool is also the default route for
hostnames, and for IP destinations whose AllowedIPs match is one of its members.

Health: a member whose tunnel is down, or whose peer did not answer the handshake for a
connection, is taken out of the pool for ``retry_after`` seconds (the reason is logged),
then tried again by the next connection that picks it. A connection whose member failed that
way is retried on the next member. A TCP connection also gives its member up while it
connects once the member's handshakes go unanswered (an exit that died while we held a
session); a UDP flow opens only once its member has a session, and skips a member whose
handshakes go unanswered (the addon's ``_connect_watching`` and ``_open_udp_pool``). When
every member is down the connection fails closed with an error listing each member's
reason; nothing goes direct.
"""

from __future__ import annotations

import errno
import logging
import random
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from mitm_wg.errors import HandshakeTimeout

__all__ = [
    "DEFAULT_RETRY_AFTER",
    "POLICIES",
    "Pool",
    "PoolError",
    "PoolHealth",
    "is_tunnel_failure",
    "parse_pool_option",
]

logger = logging.getLogger(__name__)

Policy = Literal["round-robin", "sticky", "random"]
POLICIES: tuple[Policy, ...] = ("round-robin", "sticky", "random")
#: Seconds a failed member stays out of its pools before it is tried again.
DEFAULT_RETRY_AFTER = 30.0


class PoolError(ValueError):
    """A ``wg_pool`` value is invalid (the message names the value and the problem)."""


@dataclass
class _Down:
    reason: str
    until: float


@dataclass
class PoolHealth:
    """Which tunnels are out of the pools, why and until when (shared by every pool)."""

    retry_after: float = DEFAULT_RETRY_AFTER
    clock: Callable[[], float] = time.monotonic
    down: dict[str, _Down] = field(default_factory=dict)

    def set_retry_after(self, seconds: float) -> None:
        """Change the retry delay; tunnels out now come back no later than the new delay
        after they were taken out."""
        delta = seconds - self.retry_after
        self.retry_after = seconds
        if delta < 0:
            for entry in self.down.values():
                entry.until += delta

    def mark_down(self, tunnel: str, reason: str) -> None:
        previous = self.down.get(tunnel)
        first = previous is None or previous.until == float("inf")  # new, or a failed trial
        self.down[tunnel] = _Down(reason, self.clock() + self.retry_after)
        if first:
            logger.warning(
                "mitm-wg: tunnel %r taken out of its exit pool(s) for %g s: %s",
                tunnel,
                self.retry_after,
                reason,
            )

    def mark_up(self, tunnel: str) -> None:
        if self.down.pop(tunnel, None) is not None:
            logger.info("mitm-wg: tunnel %r is back in its exit pool(s)", tunnel)

    def reason(self, tunnel: str) -> str | None:
        """Why ``tunnel`` is out now, or None when it may be used (again)."""
        entry = self.down.get(tunnel)
        if entry is None:
            return None
        if self.clock() >= entry.until:
            logger.info("mitm-wg: retrying tunnel %r in its exit pool(s)", tunnel)
            entry.until = float("inf")  # on trial: the next outcome decides
            return None
        return entry.reason if entry.until != float("inf") else None


@dataclass
class Pool:
    name: str
    policy: Policy
    members: tuple[str, ...]
    rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)
    _next: int = field(default=0, repr=False, compare=False)

    def candidates(self, host: str) -> list[str]:
        """Members in the order this policy would try them for one connection to ``host``."""
        n = len(self.members)
        if self.policy == "round-robin":
            start = self._next % n
            self._next += 1
        elif self.policy == "sticky":
            start = zlib.crc32(host.lower().encode("utf-8", "surrogatepass")) % n
        else:
            start = self.rng.randrange(n)
        return [self.members[(start + i) % n] for i in range(n)]

    def pick(
        self, host: str, unusable: Callable[[str], str | None], exclude: Iterable[str] = ()
    ) -> str:
        """The member for a connection to ``host``: the policy's choice among the members
        ``unusable`` returns no reason for (and not in ``exclude``); OSError when none is."""
        excluded = set(exclude)
        reasons: dict[str, str] = {}
        for member in self.candidates(host):
            if member in excluded:
                reasons[member] = "failed for this connection"
                continue
            why = unusable(member)
            if why is None:
                return member
            reasons[member] = why
        raise OSError(
            errno.ENETUNREACH,
            f"every tunnel of exit pool {self.name!r} is down ("
            + "; ".join(f"{m}: {reasons[m]}" for m in self.members)
            + "); not connecting directly",
        )


def parse_pool_option(
    values: Sequence[str], tunnels: Iterable[str], *, rng: random.Random | None = None
) -> dict[str, Pool]:
    """``wg_pool`` values → ``{pool name: Pool}`` in order (PoolError when invalid)."""
    names = list(tunnels)
    pools: dict[str, Pool] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        policy, sep2, members_text = rest.partition(":")
        name, policy = name.strip(), policy.strip().lower()
        if not sep or not sep2 or not name:
            raise PoolError(f"wg_pool: expected NAME=POLICY:TUNNEL,TUNNEL,..., got {value!r}")
        if policy not in POLICIES:
            raise PoolError(
                f"wg_pool {name!r}: unknown policy {policy!r} (use {', '.join(POLICIES)})"
            )
        members = tuple(m.strip() for m in members_text.split(",") if m.strip())
        if not members:
            raise PoolError(f"wg_pool {name!r}: no tunnels given")
        if len(set(members)) != len(members):
            raise PoolError(f"wg_pool {name!r}: a tunnel is listed twice")
        unknown = [m for m in members if m not in names]
        if unknown:
            raise PoolError(
                f"wg_pool {name!r}: {', '.join(map(repr, unknown))} not in wg_conf "
                f"(loaded: {', '.join(map(repr, names)) or 'none'})"
            )
        if name in names:
            raise PoolError(f"wg_pool {name!r}: a tunnel has that name already")
        if name in pools:
            raise PoolError(f"wg_pool: two pools named {name!r}")
        pools[name] = Pool(name, policy, members, rng or random.Random())  # type: ignore[arg-type]
    return pools


def is_tunnel_failure(exc: BaseException) -> str | None:
    """Why a failed connection says its *tunnel* is failing (peer silent, tunnel down), or
    None when the destination failed (refused, unreachable behind the exit, ...)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, HandshakeTimeout):
            return str(e) or "the peer did not answer the handshake"
        if isinstance(e, OSError) and e.errno == errno.ENETDOWN:
            return e.strerror or str(e)
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        if e.__cause__ is not None:
            todo.append(e.__cause__)
    return None
