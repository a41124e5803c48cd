"""Reading and writing WireGuard configuration files in the wg-quick format.

The format is the one ``wg-quick`` and the VPN providers' generators produce::

    [Interface]
    PrivateKey = <base64>
    Address = 10.64.12.34/32, fc00:bbbb:bbbb:bb01::1:2233/128
    DNS = 10.64.0.1

    [Peer]
    PublicKey = <base64>
    AllowedIPs = 0.0.0.0/0, ::/0
    Endpoint = 198.51.100.7:51820

Everything that goes wrong is reported as a :class:`~mitm_wg.errors.ConfigError` whose message
names the file, the line and the problem. Messages, ``repr()`` and ``str()`` never contain the
private or preshared key (nor any value read from the file, which might be a misplaced key);
only :meth:`WireGuardConfig.to_text` writes keys out.

Keys that make ``wg-quick`` change the host (``Table``, ``FwMark``, ``SaveConfig``, ``PreUp``,
``PostUp``, ``PreDown``, ``PostDown``) are accepted and ignored with a warning; their values are
never executed.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

from mitm_wg.errors import ConfigError
from mitm_wg.keys import KEY_LEN, decode_key, encode_key, generate_private_key, public_key_of

__all__ = [
    "KEY_LEN",
    "MAX_CONFIG_BYTES",
    "Endpoint",
    "IPAddress",
    "Interface",
    "Network",
    "PeerConfig",
    "WireGuardConfig",
    "decode_key",
    "encode_key",
    "format_endpoint",
    "generate_private_key",
    "public_key_of",
]

logger = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Larger files are refused: a real configuration is a few hundred bytes per peer.
MAX_CONFIG_BYTES = 1 << 20

MTU_MIN = 576
MTU_MAX = 65535
IPV6_MIN_MTU = 1280
KEEPALIVE_MAX = 65535


# ---------------------------------------------------------------------------------------------
# Keys (defined in mitm_wg.keys, re-exported here)


def _check_key(value: object, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != KEY_LEN:
        raise ValueError(f"{what} must be {KEY_LEN} bytes")


# ---------------------------------------------------------------------------------------------
# Endpoint

_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z", re.ASCII)
_DIGITS = re.compile(r"[0-9]{1,7}\Z", re.ASCII)


def _is_hostname(name: str) -> bool:
    """True for a plausible DNS name (ASCII labels; the last label is not all digits)."""
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    for label in labels:
        if _LABEL.match(label) is None:
            return False
    return not labels[-1].isdigit()


def _parse_uint(text: str, low: int, high: int) -> int:
    """Parse a plain decimal integer in [low, high]; ValueError (value-free message) if not."""
    if _DIGITS.match(text) is None:
        raise ValueError(f"must be a whole number from {low} to {high}")
    number = int(text)
    if not low <= number <= high:
        raise ValueError(f"{number} is out of range ({low}..{high})")
    return number


def format_endpoint(endpoint: tuple[object, int] | None) -> str:
    """``host:port``, with brackets around an IPv6 host: the one way mitm-wg writes an
    endpoint or socket address (an :class:`Endpoint`, or any ``(host, port, ...)`` tuple)."""
    if endpoint is None:
        return "(no endpoint)"
    host, port = str(endpoint[0]), endpoint[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _EndpointFields(NamedTuple):
    host: str
    port: int


class Endpoint(_EndpointFields):
    """Where a peer's UDP datagrams go: an IP literal (no brackets) or a hostname, and a port.

    The one endpoint type of mitm-wg, from the config file to the WireGuard core. It is a
    ``(host, port)`` named tuple, so a resolved endpoint is the socket address itself
    (``sock.sendto(data, endpoint)``) and compares equal to the plain tuple ``recvfrom``
    returns. Construction validates; :meth:`of` wraps an address a socket returned without
    re-checking it. Hostnames are not resolved here; the runtime does that.
    """

    __slots__ = ()

    def __new__(cls, host: str, port: int) -> Endpoint:
        if not isinstance(host, str) or not host:
            raise ValueError("Endpoint.host must be a non-empty str")
        try:
            canonical = str(ipaddress.ip_address(host))
        except ValueError:
            if not _is_hostname(host):
                raise ValueError(
                    "Endpoint.host must be an IP address (without brackets) or a hostname"
                ) from None
        else:
            # "2001:DB8:0::1" and "2001:db8::1" are the same endpoint: compare equal.
            host = canonical
        if isinstance(port, bool) or not isinstance(port, int):
            raise ValueError("Endpoint.port must be an int")
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is out of range (1..65535)")
        return tuple.__new__(cls, (host, port))

    @classmethod
    def of(cls, address: tuple[str, int]) -> Endpoint:
        """An Endpoint for the ``(ip, port)`` of a received datagram (not re-validated)."""
        return tuple.__new__(cls, (address[0], address[1]))

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse ``1.2.3.4:51820``, ``[2001:db8::1]:51820`` or ``wg.example.com:51820``.

        IP literals are normalised (``[2001:DB8:0::1]`` becomes ``2001:db8::1``). Raises
        ValueError with a message that does not repeat the text.
        """
        text = text.strip()
        if not text:
            raise ValueError("empty endpoint (expected host:port)")
        if text.startswith("["):
            end = text.find("]")
            if end < 0:
                raise ValueError("missing ']' after the IPv6 address (expected [IPv6]:port)")
            host_text = text[1:end]
            rest = text[end + 1 :]
            if not rest:
                raise ValueError("endpoint has no port (expected [IPv6]:port)")
            if not rest.startswith(":"):
                raise ValueError("unexpected text after ']' (expected [IPv6]:port)")
            port_text = rest[1:]
            try:
                host = str(ipaddress.IPv6Address(host_text))
            except ValueError:
                raise ValueError("not a valid IPv6 address inside [...]") from None
        else:
            host_text, colon, port_text = text.rpartition(":")
            if not colon:
                raise ValueError("endpoint has no port (expected host:port or [IPv6]:port)")
            if ":" in host_text:
                raise ValueError("an IPv6 address must be written in brackets: [IPv6]:port")
            if not host_text:
                raise ValueError("endpoint has no host (expected host:port)")
            try:
                host = str(ipaddress.IPv4Address(host_text))
            except ValueError:
                if not _is_hostname(host_text):
                    raise ValueError("not a valid IPv4 address or hostname") from None
                host = host_text
        if not port_text:
            raise ValueError("endpoint has no port (expected host:port or [IPv6]:port)")
        try:
            port = _parse_uint(port_text, 1, 65535)
        except ValueError as exc:
            raise ValueError(f"port {exc}") from None
        return cls(host, port)

    def __str__(self) -> str:
        return format_endpoint(self)


# ---------------------------------------------------------------------------------------------
# Peer and interface


@dataclass(frozen=True)
class PeerConfig:
    """One ``[Peer]`` section. ``line`` (of the ``[Peer]`` header) is not compared."""

    public_key: bytes
    preshared_key: bytes | None = field(repr=False)
    allowed_ips: tuple[Network, ...]
    endpoint: Endpoint | None
    persistent_keepalive: int | None
    line: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _check_key(self.public_key, "PeerConfig.public_key")
        if self.preshared_key is not None:
            _check_key(self.preshared_key, "PeerConfig.preshared_key")
        if not isinstance(self.allowed_ips, tuple):
            object.__setattr__(self, "allowed_ips", tuple(self.allowed_ips))
        ka = self.persistent_keepalive
        if ka is not None and not 1 <= ka <= KEEPALIVE_MAX:
            raise ValueError(f"persistent_keepalive must be None or 1..{KEEPALIVE_MAX}, not {ka!r}")

    @property
    def public_key_b64(self) -> str:
        """The public key in base64, as ``wg`` shows it (public keys are not secret)."""
        return encode_key(self.public_key)

    def __repr__(self) -> str:
        psk = "<set>" if self.preshared_key is not None else None
        allowed = ", ".join(str(n) for n in self.allowed_ips)
        endpoint = str(self.endpoint) if self.endpoint is not None else None
        return (
            f"PeerConfig(public_key={self.public_key_b64!r}, preshared_key={psk}, "
            f"allowed_ips=[{allowed}], endpoint={endpoint!r}, "
            f"persistent_keepalive={self.persistent_keepalive!r}, line={self.line!r})"
        )


@dataclass(frozen=True)
class WireGuardConfig:
    """A whole configuration file: the ``[Interface]`` section and its peers.

    ``path`` is only used in messages and is not compared. A configuration without peers is
    valid to parse (and to write); code that needs a peer calls :meth:`require_peers`.
    """

    private_key: bytes = field(repr=False)
    addresses: tuple[Interface, ...]
    dns_servers: tuple[IPAddress, ...]
    dns_search: tuple[str, ...]
    mtu: int | None
    listen_port: int | None
    peers: tuple[PeerConfig, ...]
    path: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _check_key(self.private_key, "WireGuardConfig.private_key")
        for name in ("addresses", "dns_servers", "dns_search", "peers"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if self.mtu is not None and not MTU_MIN <= self.mtu <= MTU_MAX:
            raise ValueError(f"mtu must be None or {MTU_MIN}..{MTU_MAX}, not {self.mtu!r}")
        if self.listen_port is not None and not 0 <= self.listen_port <= 65535:
            raise ValueError(f"listen_port must be None or 0..65535, not {self.listen_port!r}")
        if len({peer.public_key for peer in self.peers}) != len(self.peers):
            raise ValueError("two peers have the same public key")

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str, path: str | None = None) -> WireGuardConfig:
        """Parse wg-quick text. ``path`` is only used in error messages.

        Zero ``[Peer]`` sections are accepted; see :meth:`require_peers`. Raises ConfigError.
        """
        return _Parser(path).parse(text)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> WireGuardConfig:
        """Read and parse a wg-quick file (UTF-8). Raises ConfigError, never OSError."""
        name = os.fspath(path)
        try:
            with open(name, "rb") as fh:
                data = fh.read(MAX_CONFIG_BYTES + 1)
        except FileNotFoundError:
            raise ConfigError("file not found", path=name) from None
        except IsADirectoryError:
            raise ConfigError("cannot read: it is a directory, not a file", path=name) from None
        except PermissionError:
            raise ConfigError("cannot read: permission denied", path=name) from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConfigError(f"cannot read: {reason}", path=name) from None
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"file is too large for a WireGuard configuration (over {MAX_CONFIG_BYTES} bytes)",
                path=name,
            )
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise ConfigError("not a text file (looks like UTF-16; save it as UTF-8)", path=name)
        if b"\x00" in data:
            raise ConfigError("not a text file (contains NUL bytes)", path=name)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError("not a text file (not valid UTF-8)", path=name) from None
        return cls.parse(text, path=name)

    # -- derived values ----------------------------------------------------------------------

    @cached_property
    def public_key(self) -> bytes:
        """The X25519 public key of ``private_key`` (32 raw bytes)."""
        return public_key_of(self.private_key)

    @property
    def public_key_b64(self) -> str:
        """The interface's public key in base64."""
        return encode_key(self.public_key)

    def require_peers(self) -> None:
        """Raise ConfigError unless the configuration has at least one ``[Peer]``."""
        if not self.peers:
            raise ConfigError(
                "no [Peer] section: at least one peer is needed to build a tunnel",
                path=self.path,
            )

    # -- output ------------------------------------------------------------------------------

    def to_text(self) -> str:
        """Return wg-quick text that parses back into an equal configuration.

        The text CONTAINS THE PRIVATE AND PRESHARED KEYS: treat it as a secret (write it to a
        file only readable by its owner, never log it).
        """
        out = ["[Interface]", f"PrivateKey = {encode_key(self.private_key)}"]
        if self.addresses:
            out.append("Address = " + ", ".join(str(a) for a in self.addresses))
        dns = [str(s) for s in self.dns_servers] + list(self.dns_search)
        if dns:
            out.append("DNS = " + ", ".join(dns))
        if self.mtu is not None:
            out.append(f"MTU = {self.mtu}")
        if self.listen_port is not None:
            out.append(f"ListenPort = {self.listen_port}")
        for peer in self.peers:
            out += ["", "[Peer]", f"PublicKey = {peer.public_key_b64}"]
            if peer.preshared_key is not None:
                out.append(f"PresharedKey = {encode_key(peer.preshared_key)}")
            if peer.allowed_ips:
                out.append("AllowedIPs = " + ", ".join(str(n) for n in peer.allowed_ips))
            if peer.endpoint is not None:
                out.append(f"Endpoint = {peer.endpoint}")
            if peer.persistent_keepalive is not None:
                out.append(f"PersistentKeepalive = {peer.persistent_keepalive}")
        out.append("")
        return "\n".join(out)

    def __repr__(self) -> str:
        addresses = ", ".join(str(a) for a in self.addresses)
        servers = ", ".join(str(s) for s in self.dns_servers)
        return (
            f"WireGuardConfig(public_key={self.public_key_b64!r}, addresses=[{addresses}], "
            f"dns_servers=[{servers}], dns_search={list(self.dns_search)!r}, mtu={self.mtu!r}, "
            f"listen_port={self.listen_port!r}, peers={list(self.peers)!r}, path={self.path!r})"
        )

    __str__ = __repr__


# ---------------------------------------------------------------------------------------------
# The parser


class _Invalid(Exception):
    """A value is wrong; the message describes the problem without repeating the value."""


_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,23}\Z", re.ASCII)


def _quoted_name(name: str) -> str:
    """Quote a key or section name for a message, unless it might be something secret."""
    if _NAME.match(name):
        return f"'{name}'"
    return "(unreadable name)"


def _split_list(value: str) -> list[str]:
    if not value:
        return []
    items = [item.strip() for item in value.split(",")]
    for index, item in enumerate(items, 1):
        if not item:
            raise _Invalid(f"entry {index} of the comma-separated list is empty")
    return items


def _key_value(value: str) -> bytes:
    try:
        return decode_key(value)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _addresses(value: str) -> list[Interface]:
    result: list[Interface] = []
    for index, item in enumerate(_split_list(value), 1):
        try:
            result.append(ipaddress.ip_interface(item))
        except ValueError:
            raise _Invalid(f"entry {index} is not a valid IP address or address/prefix") from None
    return result


def _dns(value: str) -> list[IPAddress | str]:
    result: list[IPAddress | str] = []
    for index, item in enumerate(_split_list(value), 1):
        try:
            result.append(ipaddress.ip_address(item))
            continue
        except ValueError:
            pass
        if ":" in item:
            raise _Invalid(f"entry {index} is not a valid IPv6 address")
        if not _is_hostname(item):
            raise _Invalid(f"entry {index} is neither an IP address nor a search domain")
        result.append(item)
    return result


def _allowed_ips(value: str) -> list[Network]:
    result: list[Network] = []
    for index, item in enumerate(_split_list(value), 1):
        try:
            result.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise _Invalid(f"entry {index} is not a valid IP network (address/prefix)") from None
    return result


def _mtu(value: str) -> int:
    try:
        return _parse_uint(value, MTU_MIN, MTU_MAX)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _listen_port(value: str) -> int:
    try:
        return _parse_uint(value, 0, 65535)
    except ValueError as exc:
        raise _Invalid(f"port {exc}") from None


def _endpoint(value: str) -> Endpoint:
    try:
        return Endpoint.parse(value)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _keepalive(value: str) -> int | None:
    if value.lower() == "off" or value == "0":
        return None
    try:
        return _parse_uint(value, 0, KEEPALIVE_MAX) or None
    except ValueError as exc:
        raise _Invalid(f"{exc}; expected seconds (1..{KEEPALIVE_MAX}), or 0/'off'") from None


# lower-case name -> (canonical name, converter, repeatable)
_Spec = tuple[str, Callable[[str], Any], bool]
_INTERFACE_KEYS: dict[str, _Spec] = {
    "privatekey": ("PrivateKey", _key_value, False),
    "address": ("Address", _addresses, True),
    "dns": ("DNS", _dns, True),
    "mtu": ("MTU", _mtu, False),
    "listenport": ("ListenPort", _listen_port, False),
}
_PEER_KEYS: dict[str, _Spec] = {
    "publickey": ("PublicKey", _key_value, False),
    "presharedkey": ("PresharedKey", _key_value, False),
    "allowedips": ("AllowedIPs", _allowed_ips, True),
    "endpoint": ("Endpoint", _endpoint, False),
    "persistentkeepalive": ("PersistentKeepalive", _keepalive, False),
}
_IGNORED_INTERFACE_KEYS = {
    name.lower(): name
    for name in ("Table", "FwMark", "SaveConfig", "PreUp", "PostUp", "PreDown", "PostDown")
}


class _Section:
    __slots__ = ("first_line", "kind", "line", "values")

    def __init__(self, kind: str, line: int) -> None:
        self.kind = kind
        self.line = line
        # canonical key -> converted value (single) or list of values (repeatable)
        self.values: dict[str, Any] = {}
        # canonical key -> line of its first occurrence
        self.first_line: dict[str, int] = {}


class _Parser:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self.warned: set[str] = set()

    def error(self, message: str, line: int | None = None) -> ConfigError:
        return ConfigError(message, path=self.path, line=line)

    def parse(self, text: str) -> WireGuardConfig:
        if not isinstance(text, str):
            raise TypeError("WireGuardConfig.parse() takes a str; use from_file() for files")
        if "\x00" in text:
            raise self.error("not a text file (contains NUL bytes)")
        if text.startswith("\ufeff"):
            text = text[1:]
        interface: _Section | None = None
        peers: list[_Section] = []
        section: _Section | None = None
        saw_content = False
        # split("\n") rather than splitlines(): form feeds and other separators must not shift
        # the line numbers that editors show.
        for lineno, raw in enumerate(text.split("\n"), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            saw_content = True
            if line.startswith("["):
                if not line.endswith("]"):
                    raise self.error("malformed section header (missing ']')", lineno)
                name = line[1:-1].strip()
                kind = name.lower()
                if kind == "interface":
                    if interface is not None:
                        raise self.error(
                            f"second [Interface] section (the first is at line {interface.line});"
                            " a file has exactly one",
                            lineno,
                        )
                    interface = section = _Section("Interface", lineno)
                elif kind == "peer":
                    section = _Section("Peer", lineno)
                    peers.append(section)
                else:
                    raise self.error(
                        f"unknown section {_quoted_name(name)} (expected [Interface] or [Peer])",
                        lineno,
                    )
                continue
            key, equals, value = line.partition("=")
            key = key.strip()
            if not equals:
                raise self.error(
                    "expected 'Key = Value' or a [Section] header (there is no '=' on this line)",
                    lineno,
                )
            if not key:
                raise self.error("missing key name before '='", lineno)
            if len(key.split()) > 1:
                raise self.error(
                    "expected 'Key = Value' (is the '=' after the key name missing?)", lineno
                )
            if section is None:
                raise self.error(
                    f"key {_quoted_name(key)} is outside any section"
                    " (it must follow [Interface] or [Peer])",
                    lineno,
                )
            self.set_value(section, key, value.strip(), lineno)

        if not saw_content:
            raise self.error("file is empty (no [Interface] section, no settings)")
        if interface is None:
            raise self.error("no [Interface] section")
        return self.build(interface, peers)

    def set_value(self, section: _Section, key: str, value: str, lineno: int) -> None:
        lowered = key.lower()
        table = _INTERFACE_KEYS if section.kind == "Interface" else _PEER_KEYS
        spec = table.get(lowered)
        if spec is None:
            if section.kind == "Interface" and lowered in _IGNORED_INTERFACE_KEYS:
                canonical = _IGNORED_INTERFACE_KEYS[lowered]
                if canonical not in self.warned:
                    self.warned.add(canonical)
                    where = f"{self.path}, line {lineno}" if self.path else f"line {lineno}"
                    logger.warning(
                        "%s: %s is ignored: mitm-wg runs in user space and does not run"
                        " commands or change the host's routing",
                        where,
                        canonical,
                    )
                return
            raise self.error(f"unknown key {_quoted_name(key)} in [{section.kind}]", lineno)
        canonical, convert, repeatable = spec
        if not repeatable and canonical in section.first_line:
            raise self.error(
                f"{canonical} given twice in one [{section.kind}] section"
                f" (first at line {section.first_line[canonical]})",
                lineno,
            )
        if not value and not repeatable:
            raise self.error(f"{canonical} has no value", lineno)
        try:
            converted = convert(value)
        except _Invalid as exc:
            raise self.error(f"{canonical}: {exc}", lineno) from None
        section.first_line.setdefault(canonical, lineno)
        if repeatable:
            section.values.setdefault(canonical, []).extend(converted)
        else:
            section.values[canonical] = converted

    def build(self, interface: _Section, sections: list[_Section]) -> WireGuardConfig:
        values = interface.values
        if "PrivateKey" not in values:
            raise self.error("[Interface] has no PrivateKey", interface.line)
        peers: list[PeerConfig] = []
        seen: dict[bytes, int] = {}
        for section in sections:
            pv = section.values
            public_key = pv.get("PublicKey")
            if public_key is None:
                raise self.error("[Peer] has no PublicKey", section.line)
            if public_key in seen:
                raise self.error(
                    f"duplicate peer: same PublicKey as the [Peer] at line {seen[public_key]}",
                    section.first_line["PublicKey"],
                )
            seen[public_key] = section.line
            peers.append(
                PeerConfig(
                    public_key=public_key,
                    preshared_key=pv.get("PresharedKey"),
                    allowed_ips=tuple(pv.get("AllowedIPs", ())),
                    endpoint=pv.get("Endpoint"),
                    persistent_keepalive=pv.get("PersistentKeepalive"),
                    line=section.line,
                )
            )
        dns = values.get("DNS", ())
        addresses = tuple(values.get("Address", ()))
        mtu = values.get("MTU")
        if mtu is not None and mtu < IPV6_MIN_MTU and any(a.version == 6 for a in addresses):
            where = f"{self.path}, line" if self.path else "line"
            logger.warning(
                "%s %d: MTU %d is below %d, the minimum for IPv6",
                where,
                interface.first_line["MTU"],
                mtu,
                IPV6_MIN_MTU,
            )
        return WireGuardConfig(
            private_key=values["PrivateKey"],
            addresses=addresses,
            dns_servers=tuple(d for d in dns if not isinstance(d, str)),
            dns_search=tuple(d for d in dns if isinstance(d, str)),
            mtu=mtu,
            listen_port=values.get("ListenPort"),
            peers=tuple(peers),
            path=self.path,
        )
