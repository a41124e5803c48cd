"""Exceptions shared by every layer of mitm-wg (a leaf module: imports nothing of ours)."""

from __future__ import annotations


class MitmWgError(Exception):
    """Base class of every error mitm-wg raises on purpose."""


class ConfigError(MitmWgError, ValueError):
    """A WireGuard configuration is invalid.

    The message names the file (when there is one), the line and the problem,
    and never contains key material.
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        self.path = path
        self.line = line
        self.problem = message
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class HandshakeTimeout(MitmWgError, TimeoutError):
    """A WireGuard peer did not answer handshake initiations in time.

    ``cause``: what the tunnel learned of why, when it learned something (an ICMP error for
    the endpoint, responses that do not decrypt), else None; the message includes it.
    """

    def __init__(self, *args: object, cause: str | None = None) -> None:
        super().__init__(*args)
        self.cause = cause


class NoRoute(MitmWgError, OSError):
    """A destination is outside every WireGuard peer's AllowedIPs, so nothing was sent.

    Raised as ``NoRoute(errno.ENETUNREACH, message)`` by the runtime (and by the addon for a
    destination outside every loaded config). It is the only signal the addon reads to
    decide that a direct connection is allowed (``wg_allow_direct``): other errors, whatever
    their text, fail closed.
    """


class TunnelCrashed(MitmWgError, RuntimeError):
    """A background task of a running tunnel (a UDP reader, the timer, endpoint
    re-resolution, a multi-hop reader) crashed: a bug in mitm-wg, never the caller's own
    exception. The tunnel is gone; ``__cause__`` is the
    original exception."""

    @classmethod
    def of(cls, what: str, exc: BaseException) -> TunnelCrashed:
        """The error for background task ``what`` ended by ``exc`` (set as ``__cause__``
        by the caller's ``raise ... from exc``)."""
        return cls(
            f"the WireGuard tunnel's {what} task crashed ({type(exc).__name__}: {exc}); "
            "the tunnel is closed"
        )
