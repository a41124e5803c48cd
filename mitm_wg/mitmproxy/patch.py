"""The one place mitm-wg reaches into mitmproxy: upstream connects of ConnectionHandler.

mitmproxy's ``ConnectionHandler.open_connection`` opens every upstream connection with
``asyncio.open_connection(host, port, local_addr=...)`` (TCP) and
``mitmproxy_rs.udp.open_udp_connection(host, port, local_addr=...)`` (UDP). :func:`install`
replaces the method by a copy of the *same code* whose globals see ``asyncio`` and
``mitmproxy_rs`` through thin proxies that send exactly those two calls to an
:class:`UpstreamOpener`; every other name (``asyncio.CancelledError``,
``asyncio.current_task``, ...) resolves to the genuine module. Hooks, logging, timestamps,
error reporting and the reader/writer handling stay mitmproxy's own.

Before patching, :func:`check_compatible` reads the method's bytecode and refuses (with
:class:`PatchError`) if the two calls are not there exactly once each, so a mitmproxy
release that changes this code fails loudly at load time instead of silently connecting
directly. :func:`uninstall` restores the original method.

Versions: CI runs mitmproxy 11.0.x (Python 3.11) and 12.3.x (Python 3.13)
(:data:`TESTED_MITMPROXY`). The method's :func:`fingerprint` (its signature and every name it
uses, independent of the Python version's bytecode) is the same in both
(:data:`KNOWN_FINGERPRINTS`). On an untested major version :func:`check_compatible` accepts
the same fingerprint with a warning and refuses anything else with :class:`PatchError`;
``mitm_wg/addon.py`` runs it when mitmproxy loads the addon, so the refusal comes at load,
not from the first connection.
"""

from __future__ import annotations

import asyncio
import contextvars
import dis
import errno
import functools
import hashlib
import inspect
import logging
import types
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import mitmproxy_rs
from mitmproxy.proxy import server as mitmproxy_server
from mitmproxy.version import VERSION as MITMPROXY_VERSION

from mitm_wg.errors import MitmWgError

if TYPE_CHECKING:
    from mitmproxy.connection import Server

__all__ = [
    "KNOWN_FINGERPRINTS",
    "TESTED_MITMPROXY",
    "PatchError",
    "UpstreamOpener",
    "check_compatible",
    "current_server",
    "fingerprint",
    "install",
    "is_installed",
    "uninstall",
]

logger = logging.getLogger(__name__)

#: mitmproxy major versions CI tests this patch with (11.0.x and 12.3.x; see .ci/run).
TESTED_MITMPROXY = ("11", "12")

#: :func:`fingerprint` of ``ConnectionHandler.open_connection`` in the tested releases
#: (identical from 11.0 to 12.3), with where it was seen.
KNOWN_FINGERPRINTS = {"195202dcadbd9ea9": "mitmproxy 11.0.2 and 12.3.1"}

_TCP_CALL = ("asyncio", "open_connection")
_UDP_CALL = ("mitmproxy_rs", "udp", "open_udp_connection")
_MARK = "_mitm_wg_patched"

_current_server: contextvars.ContextVar[Server | None] = contextvars.ContextVar(
    "mitm_wg_current_server", default=None
)


class PatchError(MitmWgError, RuntimeError):
    """The installed mitmproxy does not look like the code mitm-wg patches."""


class UpstreamOpener(Protocol):
    """Receives mitmproxy's upstream connects while the patch is installed."""

    async def open_tcp(
        self, server: Server | None, host: str, port: int, local_addr: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...

    async def open_udp(self, server: Server | None, host: str, port: int, local_addr: Any) -> Any:
        """Open a UDP flow (a ``mitmproxy_rs.Stream``-like object): through the tunnel, or
        refuse; never sends UDP directly unless the routing rules allow it."""
        ...


def current_server() -> Server | None:
    """The server connection mitmproxy is opening in this task (inside the patched call)."""
    return _current_server.get()


_opener: UpstreamOpener | None = None
_original: Callable[..., Awaitable[None]] | None = None


def _no_opener() -> OSError:
    return OSError(
        errno.ENETDOWN,
        "mitm-wg was unloaded while this connection was being opened; refusing to connect",
    )


async def _open_connection(
    host: str, port: int, *, local_addr: Any = None, **kwargs: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    opener = _opener
    if opener is None:
        raise _no_opener()
    if kwargs:
        raise TypeError(f"unexpected arguments from mitmproxy: {sorted(kwargs)}")
    return await opener.open_tcp(_current_server.get(), host, port, local_addr)


async def _open_udp_connection(host: str, port: int, *, local_addr: Any = None) -> Any:
    opener = _opener
    if opener is None:
        raise _no_opener()
    return await opener.open_udp(_current_server.get(), host, port, local_addr)


class _ModuleProxy(types.ModuleType):
    """Looks like ``module`` except for the attributes given as overrides."""

    def __init__(self, module: types.ModuleType, **overrides: Any) -> None:
        super().__init__(module.__name__, module.__doc__)
        self.__dict__.update(overrides)
        self._mitm_wg_module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._mitm_wg_module, name)


def _attribute_chains(code: types.CodeType) -> list[tuple[str, ...]]:
    """Every ``global.attr.attr`` chain loaded by ``code`` (nested code objects included)."""
    chains: list[tuple[str, ...]] = []
    current: list[str] | None = None
    for ins in dis.get_instructions(code):
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            if current:
                chains.append(tuple(current))
            current = [str(ins.argval)]
        elif ins.opname in ("LOAD_ATTR", "LOAD_METHOD") and current is not None:
            current.append(str(ins.argval))
        elif ins.opname in ("CACHE", "EXTENDED_ARG", "PRECALL", "NOP"):
            continue
        else:
            if current:
                chains.append(tuple(current))
            current = None
    if current:
        chains.append(tuple(current))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            chains += _attribute_chains(const)
    return chains


_OTHER_CONNECTS = frozenset(
    {
        "create_connection",
        "open_unix_connection",
        "sock_connect",
        "connect",
        "create_datagram_endpoint",
        "open_tcp_connection",
    }
)


def _attribute_names(code: types.CodeType) -> set[str]:
    names = {
        str(ins.argval)
        for ins in dis.get_instructions(code)
        if ins.opname in ("LOAD_ATTR", "LOAD_METHOD")
    }
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _attribute_names(const)
    return names


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def fingerprint(func: Callable[..., Any]) -> str:
    """16 hex digits naming ``func``'s code: its parameters and the sorted set of global and
    attribute names it (and its nested code) uses. Independent of line numbers and of the
    bytecode a Python version compiles (3.12 inlines comprehensions: the union of names of
    nested code objects stays the same); any change to what the code calls changes it."""
    code = func.__code__
    try:
        parameters = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        parameters = list(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount])
    text = ",".join(parameters) + "|" + ",".join(sorted(_names(code)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _major(version: str) -> str:
    return version.split(".")[0]


def check_compatible(func: Callable[..., Any] | None = None) -> None:
    """Raise :class:`PatchError` unless ``ConnectionHandler.open_connection`` (or ``func``)
    makes exactly one ``asyncio.open_connection`` and one
    ``mitmproxy_rs.udp.open_udp_connection`` call, nothing else touches those names, and,
    on a mitmproxy major version CI does not test, the code is the tested code."""
    if func is None:
        func = _original or mitmproxy_server.ConnectionHandler.open_connection
    where = f"mitmproxy {MITMPROXY_VERSION}: ConnectionHandler.open_connection"
    code = getattr(func, "__code__", None)
    if code is None or not (code.co_flags & 0x80):  # CO_COROUTINE
        raise PatchError(
            f"{where} is no longer a plain coroutine function; mitm-wg needs an update"
        )
    chains = _attribute_chains(code)
    tcp = [c for c in chains if c[: len(_TCP_CALL)] == _TCP_CALL]
    udp = [c for c in chains if c[: len(_UDP_CALL)] == _UDP_CALL]
    if len(tcp) != 1 or len(udp) != 1:
        raise PatchError(
            f"{where} no longer opens upstream connections the way mitm-wg expects "
            f"(found {len(tcp)} asyncio.open_connection and {len(udp)} "
            f"mitmproxy_rs.udp.open_udp_connection calls, expected one each); "
            f"refusing to run rather than risk connecting outside the tunnel"
        )
    if "asyncio" not in func.__globals__ or "mitmproxy_rs" not in func.__globals__:
        raise PatchError(f"{where}: the module no longer imports asyncio and mitmproxy_rs")
    other_openers = sorted(_attribute_names(code) & _OTHER_CONNECTS)
    if other_openers:
        raise PatchError(
            f"{where} now also connects with {', '.join(other_openers)}, which mitm-wg does "
            f"not route; refusing to run rather than risk connecting outside the tunnel"
        )
    tested = " and ".join(f"{major}.x" for major in TESTED_MITMPROXY)
    known = fingerprint(func) in KNOWN_FINGERPRINTS
    if _major(MITMPROXY_VERSION) in TESTED_MITMPROXY:
        if not known:
            logger.warning(
                "mitm-wg: %s differs from the code mitm-wg was tested with, but still opens "
                "connections the way it expects; continuing",
                where,
            )
        return
    if not known:
        raise PatchError(
            f"mitm-wg supports mitmproxy {tested}; this is mitmproxy {MITMPROXY_VERSION}, and "
            f"the code mitm-wg patches (ConnectionHandler.open_connection) differs from the "
            f"tested code. Refusing to load rather than risk connections outside the tunnel: "
            f"install a supported mitmproxy (pip install 'mitmproxy>=11,<13') or a mitm-wg "
            f"release that supports {MITMPROXY_VERSION}"
        )
    logger.warning(
        "mitm-wg was tested with mitmproxy %s, this is %s; the code it patches is unchanged, "
        "continuing",
        tested,
        MITMPROXY_VERSION,
    )


def _build(original: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    namespace = dict(original.__globals__)
    namespace["asyncio"] = _ModuleProxy(asyncio, open_connection=_open_connection)
    namespace["mitmproxy_rs"] = _ModuleProxy(
        mitmproxy_rs,
        udp=_ModuleProxy(mitmproxy_rs.udp, open_udp_connection=_open_udp_connection),
    )
    body = types.FunctionType(
        original.__code__,
        namespace,
        original.__name__,
        original.__defaults__,
        original.__closure__,
    )
    body.__kwdefaults__ = original.__kwdefaults__
    body.__qualname__ = original.__qualname__

    @functools.wraps(original)
    async def open_connection(self: Any, command: Any) -> None:
        token = _current_server.set(command.connection)
        try:
            await body(self, command)
        finally:
            _current_server.reset(token)

    setattr(open_connection, _MARK, True)
    return open_connection


def install(opener: UpstreamOpener) -> None:
    """Route mitmproxy's upstream connects to ``opener`` (again for the same opener: no-op).

    The patch is process-wide, so there is one opener: installing a second one while the
    first is installed raises :class:`PatchError` instead of silently taking its traffic.
    """
    global _opener, _original
    if _opener is not None and _opener is not opener:
        raise PatchError(
            "mitm-wg is loaded twice (a second addon instance while the first still routes "
            "mitmproxy's upstream connections); load addons/mitm_wg.py once"
        )
    handler = mitmproxy_server.ConnectionHandler
    current = handler.open_connection
    if getattr(current, _MARK, False):
        _opener = opener
        return
    check_compatible(current)
    _original = current
    _opener = opener
    handler.open_connection = _build(current)  # type: ignore[method-assign]
    logger.debug("mitmproxy's ConnectionHandler.open_connection now connects via mitm-wg")


def uninstall(opener: UpstreamOpener | None = None) -> None:
    """Restore mitmproxy's own ``open_connection`` (no-op when not installed).

    With ``opener``, only if that opener is the installed one: an instance that never got
    the patch cannot take it away from the one that has it.
    """
    global _opener, _original
    if opener is not None and opener is not _opener:
        return
    _opener = None
    handler = mitmproxy_server.ConnectionHandler
    if _original is None:
        return
    if getattr(handler.open_connection, _MARK, False):
        handler.open_connection = _original  # type: ignore[method-assign]
    else:
        logger.warning(
            "ConnectionHandler.open_connection was replaced by someone else after mitm-wg; "
            "leaving it alone (mitm-wg's opener is detached and refuses connections)"
        )
    _original = None


def is_installed() -> bool:
    return getattr(mitmproxy_server.ConnectionHandler.open_connection, _MARK, False) is True
