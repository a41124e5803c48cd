"""Tests of the wg-quick configuration loader (mitm_wg/config.py)."""

from __future__ import annotations

import base64
import ipaddress
import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mitm_wg.config import (
    MAX_CONFIG_BYTES,
    Endpoint,
    PeerConfig,
    WireGuardConfig,
    decode_key,
    encode_key,
    generate_private_key,
    public_key_of,
)
from mitm_wg.errors import ConfigError

DATA = Path(__file__).parent / "data" / "configs"

# Test keys (random, generated once for these fixtures; not used anywhere real).
MULLVAD_PRIV = "OMnpcwvsCBfLyr3yXqQmLG1/FW2N6/94nIjGfc/Hg2o="
MULLVAD_PRIV_PUB = "UJQjKktyPisy8de+jGQaPw2sZPgQEwgucZp9+7Sytiw="
MULLVAD_PEER = "xMdQlJMqxUAPhIRPJJjtl5JDAmkcYZiPDBeYWcw/Dgc="
PROTON_PRIV = "UBC9CSNRhdJnkOG0fYJWUtJEuw0GngGJ9IP1MAhbXkU="
PROTON_PRIV_PUB = "YNRrVPFIaOHhvLGFGrb2wIKS+BNq4ZzPcCG1nJ6MHwc="
PROTON_PEER = "gEKo/VyfEW2TMf5JHrrYqz03wPv2drDmVCEldgXYiio="
WGCF_PRIV = "CG7DIKicD+lrLsnoYpt0jx44tr/HWIZHzUC8/yQA72w="
WGCF_PEER = "EUdnB+mxhX/5zBrN744/15xspXnZpR0oL5nEwAXArGM="
MULTI_PRIV = "kGv6uLLGWlawf1md2NTd3/tC0IXjBMIiPuNPHqlrkmw="
MULTI_PEERS = (
    "Go19zFrmLhBJNEFtiKIyJw3GdJR2GUzVaKx4vwluWHA=",
    "qeFJdPeRMDM15ld/fgg6bMx9neGzHrTZbyb9D6qsWXg=",
    "Odo5rB62I7iAXqbNUeOmAFSNvQ01oKrQcgO8XMhJEgQ=",
)
PSK1 = "TDd69w52fRbZXYv5HotEJLqj26zBkswHLdFUGrBj2LQ="
PSK2 = "w87ScUn7rMZaIn7F/Q4k6mocmXqEFzZzqte873tU0ts="
OTHER_PUB = "Rr2jjcONsrXOEiNLC27c8oXB7eof/PJTAguUZ50/YFg="

SECRETS = (MULLVAD_PRIV, PROTON_PRIV, WGCF_PRIV, MULTI_PRIV, PSK1, PSK2)
FIXTURES = (
    "mullvad.conf",
    "proton.conf",
    "proton-ipv6.conf",
    "wgcf-profile.conf",
    "multi-peer.conf",
)


def assert_no_secret(text: str, secrets: tuple[str, ...] = SECRETS) -> None:
    """No secret key appears: not its base64, not a chunk of it, not its raw bytes' repr."""
    for secret in secrets:
        assert secret[:12] not in text
        assert secret.rstrip("=")[-12:] not in text
        raw = base64.b64decode(secret + "=" * (-len(secret) % 4))
        assert repr(raw)[2:14] not in text
        assert raw.hex()[:16] not in text


def load(name: str) -> WireGuardConfig:
    return WireGuardConfig.from_file(DATA / name)


def k(b64: str) -> bytes:
    return base64.b64decode(b64)


# ---------------------------------------------------------------------------------------------
# Realistic files


def test_mullvad() -> None:
    cfg = load("mullvad.conf")
    assert cfg.private_key == k(MULLVAD_PRIV)
    assert cfg.public_key == k(MULLVAD_PRIV_PUB)
    assert cfg.public_key_b64 == MULLVAD_PRIV_PUB
    assert cfg.addresses == (
        ipaddress.IPv4Interface("10.64.12.34/32"),
        ipaddress.IPv6Interface("fc00:bbbb:bbbb:bb01::1:2233/128"),
    )
    assert cfg.dns_servers == (ipaddress.IPv4Address("10.64.0.1"),)
    assert cfg.dns_search == ()
    assert cfg.mtu is None
    assert cfg.listen_port is None
    assert cfg.path == str(DATA / "mullvad.conf")
    (peer,) = cfg.peers
    assert peer.public_key == k(MULLVAD_PEER)
    assert peer.public_key_b64 == MULLVAD_PEER
    assert peer.preshared_key is None
    assert peer.allowed_ips == (
        ipaddress.IPv4Network("0.0.0.0/0"),
        ipaddress.IPv6Network("::/0"),
    )
    assert peer.endpoint == Endpoint("198.51.100.7", 51820)
    assert peer.persistent_keepalive is None
    assert peer.line == 7


def test_proton_with_metadata_comments() -> None:
    cfg = load("proton.conf")
    assert cfg.private_key == k(PROTON_PRIV)
    assert cfg.public_key == k(PROTON_PRIV_PUB)
    assert cfg.addresses == (ipaddress.IPv4Interface("10.2.0.2/32"),)
    assert cfg.dns_servers == (ipaddress.IPv4Address("10.2.0.1"),)
    (peer,) = cfg.peers
    assert peer.public_key == k(PROTON_PEER)
    assert peer.allowed_ips == (
        ipaddress.IPv4Network("0.0.0.0/0"),
        ipaddress.IPv6Network("::/0"),
    )
    assert peer.endpoint == Endpoint("203.0.113.5", 51820)
    assert peer.persistent_keepalive == 25
    assert peer.line == 12


def test_proton_ipv6_dns_and_comments_before_interface() -> None:
    cfg = load("proton-ipv6.conf")
    assert cfg.addresses == (
        ipaddress.IPv4Interface("10.2.0.2/32"),
        ipaddress.IPv6Interface("2001:db8:b944::2:2/128"),
    )
    assert cfg.dns_servers == (
        ipaddress.IPv4Address("10.2.0.1"),
        ipaddress.IPv6Address("2001:db8:b944::2:1"),
    )
    (peer,) = cfg.peers
    assert peer.endpoint == Endpoint("2001:db8:b944::7", 51820)
    assert str(peer.endpoint) == "[2001:db8:b944::7]:51820"
    assert peer.persistent_keepalive == 25


def test_cloudflare_wgcf() -> None:
    cfg = load("wgcf-profile.conf")
    assert cfg.private_key == k(WGCF_PRIV)
    assert cfg.addresses == (
        ipaddress.IPv4Interface("172.16.0.2/32"),
        ipaddress.IPv6Interface("2001:db8:110:8a36:df92:102a:9602:fa18/128"),
    )
    assert cfg.dns_servers == tuple(
        ipaddress.ip_address(a)
        for a in ("1.1.1.1", "1.0.0.1", "2606:4700:4700::1111", "2606:4700:4700::1001")
    )
    assert cfg.mtu == 1280
    (peer,) = cfg.peers
    assert peer.public_key == k(WGCF_PEER)
    assert peer.allowed_ips == (
        ipaddress.IPv4Network("0.0.0.0/0"),
        ipaddress.IPv6Network("::/0"),
    )
    assert peer.endpoint == Endpoint("engage.cloudflareclient.com", 2408)
    assert str(peer.endpoint) == "engage.cloudflareclient.com:2408"
    assert peer.line == 7


def test_multi_peer_case_comments_and_ignored_keys(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mitm_wg.config")
    cfg = load("multi-peer.conf")
    assert cfg.private_key == k(MULTI_PRIV)
    assert cfg.addresses == (
        ipaddress.IPv4Interface("10.10.0.2/24"),
        ipaddress.IPv6Interface("fd00:10::2/64"),
        ipaddress.IPv4Interface("192.0.2.77/32"),  # no prefix -> /32
    )
    assert cfg.dns_servers == (ipaddress.IPv4Address("10.10.0.1"),)
    assert cfg.dns_search == ("home.arpa", "corp.example.")
    assert cfg.listen_port == 51821
    assert cfg.mtu == 1420
    office, second, third = cfg.peers
    assert [p.line for p in cfg.peers] == [15, 23, 30]

    assert office.public_key == k(MULTI_PEERS[0])
    assert office.preshared_key == k(PSK1)
    assert office.allowed_ips == (
        ipaddress.IPv4Network("10.10.0.0/24"),
        ipaddress.IPv4Network("10.20.0.0/16"),  # host bits masked, as wg does
        ipaddress.IPv6Network("fd00:10::/64"),
    )
    assert office.endpoint == Endpoint("office.example.net", 51820)
    assert office.persistent_keepalive is None  # 0

    assert second.public_key == k(MULTI_PEERS[1])
    assert second.preshared_key == k(PSK2)
    assert second.endpoint == Endpoint("2001:db8::1", 443)  # normalised IPv6 literal
    assert second.persistent_keepalive is None  # off

    assert third.public_key == k(MULTI_PEERS[2])
    assert third.preshared_key is None
    assert third.allowed_ips == ()
    assert third.endpoint is None
    assert third.persistent_keepalive == 15

    messages = [r.getMessage() for r in caplog.records if r.name == "mitm_wg.config"]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    expected = {"Table": 9, "PostUp": 10, "PostDown": 11, "FwMark": 12, "SaveConfig": 13}
    assert len(messages) == len(expected)
    for key, line in expected.items():
        (msg,) = [m for m in messages if f" {key} is ignored" in m]
        assert f"multi-peer.conf, line {line}:" in msg
    joined = "\n".join(messages)
    assert "iptables" not in joined  # values of hooks are neither run nor logged
    assert "0x1234" not in joined


def test_ignored_key_warned_once_per_key(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mitm_wg.config")
    text = (
        f"[Interface]\nPrivateKey = {MULLVAD_PRIV}\n"
        "PreUp = echo one\nPostUp = echo two=2\npostup = echo three\n"
    )
    cfg = WireGuardConfig.parse(text)
    assert cfg.peers == ()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("line 3: PreUp is ignored")
    assert messages[1].startswith("line 4: PostUp is ignored")


def test_mtu_below_ipv6_minimum_warns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mitm_wg.config")
    text = f"[Interface]\nPrivateKey = {MULLVAD_PRIV}\nAddress = fd00::2/128\nMTU = 1000\n"
    assert WireGuardConfig.parse(text).mtu == 1000
    (record,) = caplog.records
    assert "line 4: MTU 1000 is below 1280" in record.getMessage()
    caplog.clear()
    text4 = f"[Interface]\nPrivateKey = {MULLVAD_PRIV}\nAddress = 10.0.0.2\nMTU = 1000\n"
    assert WireGuardConfig.parse(text4).mtu == 1000
    assert caplog.records == []


def test_crlf_bom_tabs_and_odd_line_separators() -> None:
    text = (
        "\ufeff[Interface]\r\n"
        f"\tPrivateKey\t=\t{MULLVAD_PRIV}\r\n"
        "# a comment with a form feed \x0c and a \u2028 line separator\r\n"
        "Address=10.0.0.2/32\r\n"
        "[Peer]\r\n"
        f"PublicKey={MULLVAD_PEER}\r\n"
        "Endpoint = 198.51.100.7:51820:1\r\n"
    )
    with pytest.raises(ConfigError) as info:
        WireGuardConfig.parse(text)
    # The form feed and U+2028 do not shift line numbers.
    assert info.value.line == 7
    cfg = WireGuardConfig.parse(text.replace(":51820:1", ":51820"))
    assert cfg.private_key == k(MULLVAD_PRIV)
    assert cfg.addresses == (ipaddress.IPv4Interface("10.0.0.2/32"),)
    assert cfg.peers[0].endpoint == Endpoint("198.51.100.7", 51820)


def test_zero_peers_parse_but_require_peers_fails() -> None:
    cfg = WireGuardConfig.parse(f"[Interface]\nPrivateKey = {MULLVAD_PRIV}\n", path="x.conf")
    assert cfg.peers == ()
    with pytest.raises(ConfigError, match=r"^x\.conf: no \[Peer\] section"):
        cfg.require_peers()
    load("mullvad.conf").require_peers()


# ---------------------------------------------------------------------------------------------
# Round trip and secrecy


@pytest.mark.parametrize("name", FIXTURES)
def test_round_trip(name: str) -> None:
    cfg = load(name)
    text = cfg.to_text()
    again = WireGuardConfig.parse(text)
    assert again == cfg
    assert again.to_text() == text
    # to_text is documented to carry the keys.
    assert encode_key(cfg.private_key) in text


@pytest.mark.parametrize("name", FIXTURES)
def test_repr_and_str_hide_secrets(name: str) -> None:
    cfg = load(name)
    for text in (repr(cfg), str(cfg), *(repr(p) for p in cfg.peers), *(str(p) for p in cfg.peers)):
        assert_no_secret(text)
    assert cfg.public_key_b64 in repr(cfg)
    for peer in cfg.peers:
        assert peer.public_key_b64 in repr(peer)
        assert ("preshared_key=<set>" in repr(peer)) == (peer.preshared_key is not None)


def test_path_and_line_are_not_compared() -> None:
    a = WireGuardConfig.parse(load("proton.conf").to_text(), path="a.conf")
    b = load("proton.conf")
    assert a == b
    assert hash(a) == hash(b)
    assert a.peers[0].line != b.peers[0].line


# ---------------------------------------------------------------------------------------------
# Key helpers


def test_public_key_of_rfc7748_vector() -> None:
    private = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    public = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    assert public_key_of(private) == public


def test_generate_private_key_is_clamped_and_uses_randbytes() -> None:
    key = generate_private_key(lambda n: b"\xff" * n)
    assert len(key) == 32
    assert key[0] == 0xF8
    assert key[31] == 0x7F
    assert key[1:31] == b"\xff" * 30
    assert generate_private_key(lambda n: bytes(n))[31] == 0x40
    assert len(generate_private_key()) == 32
    assert generate_private_key() != generate_private_key()
    with pytest.raises(ValueError):
        generate_private_key(lambda n: bytes(n - 1))


def test_keys_are_defined_once_for_config_and_core() -> None:
    # Clamping and public-key derivation live in mitm_wg.keys; config and the WireGuard core
    # use that one definition (issue 11).
    from mitm_wg import config, keys
    from mitm_wg.wireguard import crypto

    assert config.public_key_of is keys.public_key_of is crypto.dh_public
    assert config.generate_private_key is keys.generate_private_key
    assert crypto.KEY_LEN == config.KEY_LEN == keys.KEY_LEN == 32
    raw = bytes(range(0xE0, 0x100))
    private, public = crypto.dh_generate(lambda n: raw[:n])
    assert private == keys.clamp(raw) == generate_private_key(lambda n: raw[:n])
    assert public == public_key_of(private)
    with pytest.raises(ValueError):
        crypto.dh_generate(lambda n: bytes(n - 1))


def test_encode_decode_key() -> None:
    raw = k(MULTI_PRIV)
    assert encode_key(raw) == MULTI_PRIV
    assert decode_key(MULTI_PRIV) == raw
    assert decode_key(f"  {MULTI_PRIV}\n") == raw
    with pytest.raises(ValueError):
        encode_key(raw[:31])


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        (MULTI_PRIV[:-1], "not valid base64"),  # padding missing
        (MULTI_PRIV[:20] + " " + MULTI_PRIV[21:], "not valid base64"),
        (MULTI_PRIV[:-2] + "!=", "not valid base64"),
        (MULTI_PRIV.replace("/", "_"), "not valid base64"),  # urlsafe alphabet
        (MULTI_PRIV[:20] + "é" + MULTI_PRIV[21:], "not valid base64"),
        ("", "wrong key length"),
        (base64.b64encode(bytes(31)).decode(), "wrong key length"),
        (base64.b64encode(bytes(33)).decode(), "wrong key length"),
    ],
)
def test_decode_key_errors(text: str, phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase) as info:
        decode_key(text)
    assert_no_secret(str(info.value))
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


# ---------------------------------------------------------------------------------------------
# Endpoint


@pytest.mark.parametrize(
    ("text", "host", "port", "shown"),
    [
        ("198.51.100.7:51820", "198.51.100.7", 51820, "198.51.100.7:51820"),
        ("[2001:db8::1]:51820", "2001:db8::1", 51820, "[2001:db8::1]:51820"),
        ("[2001:DB8:0:0::1]:1", "2001:db8::1", 1, "[2001:db8::1]:1"),
        ("wg.example.com:65535", "wg.example.com", 65535, "wg.example.com:65535"),
        ("  localhost:2408 ", "localhost", 2408, "localhost:2408"),
        ("a-b_c.example.:9", "a-b_c.example.", 9, "a-b_c.example.:9"),
    ],
)
def test_endpoint_parse(text: str, host: str, port: int, shown: str) -> None:
    endpoint = Endpoint.parse(text)
    assert endpoint == Endpoint(host, port)
    assert str(endpoint) == shown
    assert Endpoint.parse(str(endpoint)) == endpoint


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("198.51.100.7", "no port"),
        ("198.51.100.7:", "no port"),
        ("[2001:db8::1]", "no port"),
        ("[2001:db8::1]:", "no port"),
        ("wg.example.com", "no port"),
        ("2001:db8::1", "brackets"),
        ("2001:db8::1:51820", "brackets"),
        ("[2001:db8::1:51820", "missing ']'"),
        ("[2001:db8::1]51820", "unexpected text after ']'"),
        ("[198.51.100.7]:51820", "not a valid IPv6"),
        ("198.51.100.7:0", "out of range"),
        ("198.51.100.7:65536", "out of range"),
        ("198.51.100.7:-1", "whole number"),
        ("198.51.100.7:http", "whole number"),
        ("198.51.100.7:+80", "whole number"),
        ("198.51.100.7:٣٣", "whole number"),  # non-ASCII digits
        (":51820", "no host"),
        ("198.51.100.300:51820", "not a valid IPv4 address or hostname"),
        ("bad host:51820", "not a valid IPv4 address or hostname"),
        ("-bad.example:51820", "not a valid IPv4 address or hostname"),
        ("", "empty"),
    ],
)
def test_endpoint_parse_errors(text: str, phrase: str) -> None:
    with pytest.raises(ValueError, match=phrase):
        Endpoint.parse(text)


def test_endpoint_constructor_checks() -> None:
    with pytest.raises(ValueError):
        Endpoint("198.51.100.7", 0)
    with pytest.raises(ValueError):
        Endpoint("198.51.100.7", 65536)
    with pytest.raises(ValueError):
        Endpoint("", 1)
    with pytest.raises(ValueError):
        Endpoint("[2001:db8::1]", 1)
    with pytest.raises(ValueError):
        Endpoint("198.51.100.7", True)
    with pytest.raises(ValueError):
        Endpoint("bad host", 1)
    assert Endpoint("2001:DB8:0::1", 1).host == "2001:db8::1"
    assert Endpoint("2001:DB8:0::1", 1) == Endpoint("2001:db8::1", 1)
    assert Endpoint("WG.Example.com", 1).host == "WG.Example.com"


def test_one_endpoint_type_and_one_formatter() -> None:
    # One Endpoint type from the config file to the WireGuard core, and one formatter
    # (issue 11): the core has no tuple alias of its own.
    import mitm_wg.wireguard as wg
    from mitm_wg.config import format_endpoint
    from mitm_wg.wireguard import cookie, peer

    assert wg.Endpoint is Endpoint
    assert not hasattr(cookie, "Endpoint")  # annotations only
    assert peer.Endpoint is Endpoint and peer.format_endpoint is format_endpoint
    ep = Endpoint("2001:DB8::1", 51820)
    assert isinstance(ep, tuple) and ep == ("2001:db8::1", 51820)  # a socket address as is
    host, port = ep
    assert (host, port) == (ep.host, ep.port)
    assert Endpoint.of(("192.0.2.9", 7)) == Endpoint("192.0.2.9", 7)
    assert type(Endpoint.of(("192.0.2.9", 7))) is Endpoint
    assert str(ep) == format_endpoint(ep) == "[2001:db8::1]:51820"
    assert format_endpoint(("198.51.100.7", 1)) == "198.51.100.7:1"
    assert format_endpoint(("fe80::1", 80, 0, 2)) == "[fe80::1]:80"  # AF_INET6 sockname
    assert format_endpoint(None) == "(no endpoint)"
    with pytest.raises(AttributeError):
        ep.port = 1  # type: ignore[misc]


def test_dataclass_constructor_checks() -> None:
    key = k(MULLVAD_PEER)
    with pytest.raises(ValueError):
        PeerConfig(key[:31], None, (), None, None)
    with pytest.raises(ValueError):
        PeerConfig(key, b"short", (), None, None)
    with pytest.raises(ValueError):
        PeerConfig(key, None, (), None, 0)
    peer = PeerConfig(key, None, [ipaddress.ip_network("10.0.0.0/8")], None, None)  # type: ignore[arg-type]
    assert peer.allowed_ips == (ipaddress.ip_network("10.0.0.0/8"),)
    with pytest.raises(ValueError) as info:
        WireGuardConfig(k(MULLVAD_PRIV)[:31], (), (), (), None, None, ())
    assert_no_secret(str(info.value))
    with pytest.raises(ValueError):
        WireGuardConfig(k(MULLVAD_PRIV), (), (), (), 100, None, ())
    with pytest.raises(ValueError, match="same public key"):
        WireGuardConfig(k(MULLVAD_PRIV), (), (), (), None, None, (peer, peer))


# ---------------------------------------------------------------------------------------------
# Errors with a line

I = f"[Interface]\nPrivateKey = {MULTI_PRIV}\n"  # noqa: E741 - lines 1-2
P = f"[Peer]\nPublicKey = {MULTI_PEERS[0]}\n"  # two lines
BAD31 = base64.b64encode(k(PSK2)[:31]).decode()
KEYLIKE = MULTI_PRIV.rstrip("=")  # a private key pasted without "Name ="

LINE_ERRORS: list[tuple[str, str, int, str]] = [
    # (id, text, line, phrase)
    ("bad-base64", "[Interface]\nPrivateKey = ~~~~notbase64~~~~\n", 2, "PrivateKey: not valid base64"),
    ("key-length", f"[Interface]\n\nPrivateKey = {BAD31}\n", 3, "PrivateKey: wrong key length"),
    ("pub-length", I + f"[Peer]\nPublicKey = {BAD31}\n", 4, "PublicKey: wrong key length"),
    ("psk-base64", I + P + f"PresharedKey = {PSK1[1:]}\n", 5, "PresharedKey: not valid base64"),
    ("address", I + "Address = 10.0.0.300/32\n", 3, "Address: entry 1 is not a valid IP address"),
    ("prefix", I + "Address = 10.0.0.2/32, 10.0.0.1/33\n", 3, "Address: entry 2 is not a valid"),
    ("v6-address", I + "Address = fd00::1::2/128\n", 3, "Address: entry 1 is not a valid"),
    ("cidr", I + P + "AllowedIPs = 0.0.0.0/0, 10.0.0/8x\n", 5, "AllowedIPs: entry 2 is not a valid IP network"),
    ("cidr-v6", I + P + "AllowedIPs = ::/129\n", 5, "AllowedIPs: entry 1 is not a valid IP network"),
    ("empty-entry", I + P + "AllowedIPs = 0.0.0.0/0,,::/0\n", 5, "AllowedIPs: entry 2 of the comma-separated list is empty"),
    ("dns-v6", I + "DNS = 10.0.0.1, 2001:db8::zz\n", 3, "DNS: entry 2 is not a valid IPv6 address"),
    ("dns-v4", I + "DNS = 10.0.0.300\n", 3, "DNS: entry 1 is neither an IP address nor a search domain"),
    ("dns-name", I + "DNS = bad domain!\n", 3, "DNS: entry 1 is neither an IP address nor a search domain"),
    ("no-port", I + P + "Endpoint = 198.51.100.7\n", 5, "Endpoint: endpoint has no port"),
    ("no-port-v6", I + P + "Endpoint = [2001:db8::1]\n", 5, "Endpoint: endpoint has no port"),
    ("port-high", I + P + "Endpoint = 198.51.100.7:65536\n", 5, "Endpoint: port 65536 is out of range"),
    ("port-zero", I + P + "Endpoint = wg.example.com:0\n", 5, "Endpoint: port 0 is out of range"),
    ("port-text", I + P + "Endpoint = wg.example.com:wg\n", 5, "Endpoint: port must be a whole number"),
    ("unbracketed", I + P + "Endpoint = 2001:db8::1:51820\n", 5, "Endpoint: an IPv6 address must be written in brackets"),
    ("keepalive-high", I + P + "PersistentKeepalive = 65536\n", 5, "PersistentKeepalive: 65536 is out of range"),
    ("keepalive-neg", I + P + "PersistentKeepalive = -1\n", 5, "PersistentKeepalive: must be a whole number"),
    ("keepalive-word", I + P + "PersistentKeepalive = on\n", 5, "PersistentKeepalive: must be a whole number"),
    ("mtu-low", I + "MTU = 575\n", 3, "MTU: 575 is out of range (576..65535)"),
    ("mtu-high", I + "MTU = 65536\n", 3, "MTU: 65536 is out of range"),
    ("mtu-float", I + "MTU = 1420.5\n", 3, "MTU: must be a whole number"),
    ("mtu-empty", I + "MTU =\n", 3, "MTU has no value"),
    ("listenport", I + "ListenPort = 65536\n", 3, "ListenPort: port 65536 is out of range (0..65535)"),
    ("unknown-key", I + "Foo = bar\n", 3, "unknown key 'Foo' in [Interface]"),
    ("hook-in-peer", I + P + "PostUp = echo hi\n", 5, "unknown key 'PostUp' in [Peer]"),
    ("iface-key-in-peer", I + P + "Address = 10.0.0.2\n", 5, "unknown key 'Address' in [Peer]"),
    ("unknown-section", I + "[Peers]\n", 3, "unknown section 'Peers'"),
    ("outside", f"PrivateKey = {MULTI_PRIV}\n[Interface]\n", 1, "key 'PrivateKey' is outside any section"),
    ("no-equals", I + "Address 10.0.0.2/32\n", 3, "there is no '=' on this line"),
    ("no-equals-key", f"[Interface]\nPrivateKey {MULTI_PRIV}\n", 2, "is the '=' after the key name missing?"),
    ("no-name", I + "= 10.0.0.1\n", 3, "missing key name"),
    ("bad-header", "[Interface\n", 1, "malformed section header"),
    ("no-private", "# hello\n\n[Interface]\nAddress = 10.0.0.2/32\n", 3, "[Interface] has no PrivateKey"),
    ("no-public", I + P + f"[Peer]\nPresharedKey = {PSK1}\nEndpoint = 198.51.100.7:1\n", 5, "[Peer] has no PublicKey"),
    ("second-interface", I + P + "\n[Interface]\n", 6, "second [Interface] section (the first is at line 1)"),
    ("dup-peer", I + P + f"[Peer]\n# again\nPUBLICKEY = {MULTI_PEERS[0]}\n", 7, "duplicate peer: same PublicKey as the [Peer] at line 3"),
    ("twice-private", I + f"privatekey = {MULTI_PRIV}\n", 3, "PrivateKey given twice in one [Interface] section (first at line 2)"),
    ("twice-listenport", I + "ListenPort = 1\nListenPort = 2\n", 4, "ListenPort given twice in one [Interface] section (first at line 3)"),
    ("twice-mtu", I + "MTU = 1280\n\nMTU = 1280\n", 5, "MTU given twice"),
    ("twice-public", I + P + f"PublicKey = {MULTI_PEERS[1]}\n", 5, "PublicKey given twice"),
    ("twice-psk", I + P + f"PresharedKey = {PSK1}\nPresharedKey = {PSK2}\n", 6, "PresharedKey given twice"),
    ("twice-endpoint", I + P + "Endpoint = a.example:1\nEndpoint = b.example:2\n", 6, "Endpoint given twice"),
    ("twice-keepalive", I + P + "PersistentKeepalive = 25\npersistentKEEPALIVE = 0\n", 6, "PersistentKeepalive given twice"),
    # Misplaced keys: the key text must not come back in the message.
    ("bare-key", I + f"{KEYLIKE}=\n", 3, "unknown key (unreadable name) in [Interface]"),
    ("key-as-section", I + f"[{MULTI_PRIV}]\n", 3, "unknown section (unreadable name)"),
    ("key-outside", f"{PSK1}\n[Interface]\n", 1, "key (unreadable name) is outside any section"),
    ("key-as-address", I + f"Address = {PSK1}\n", 3, "Address: entry 1 is not a valid IP address"),
    ("key-as-dns", I + f"DNS = {PSK2}\n", 3, "DNS: entry 1 is neither"),
    ("key-as-endpoint", I + P + f"Endpoint = {PSK1}\n", 5, "Endpoint: endpoint has no port"),
    ("key-as-allowed", I + P + f"AllowedIPs = {PSK2}\n", 5, "AllowedIPs: entry 1 is not a valid"),
    ("key-as-mtu", I + f"MTU = {PSK1}\n", 3, "MTU: must be a whole number"),
    ("key-as-keepalive", I + P + f"PersistentKeepalive = {PSK2}\n", 5, "PersistentKeepalive: must be"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "line", "phrase"),
    [pytest.param(t, n, p, id=i) for i, t, n, p in LINE_ERRORS],
)
def test_line_errors(tmp_path: Path, text: str, line: int, phrase: str) -> None:
    path = tmp_path / "wg0.conf"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        WireGuardConfig.from_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}, line {line}: ")
    assert phrase in message
    assert info.value.line == line
    assert info.value.path == str(path)
    assert info.value.__cause__ is None
    assert_no_secret(message, (*SECRETS, *MULTI_PEERS, BAD31, KEYLIKE))

    # The same through parse() without a path.
    with pytest.raises(ConfigError) as info2:
        WireGuardConfig.parse(text)
    assert str(info2.value) == f"line {line}: {info2.value.problem}"
    assert info2.value.problem == info.value.problem


# ---------------------------------------------------------------------------------------------
# Errors about the whole file


@pytest.mark.parametrize(
    ("data", "phrase"),
    [
        (b"", "file is empty"),
        (b"\n  \n\t\n", "file is empty"),
        (b"# only a comment\n# and another = 1\n", "file is empty"),
        (f"[Peer]\nPublicKey = {MULTI_PEERS[0]}\n".encode(), "no [Interface] section"),
        (f"[Interface]\x00\nPrivateKey = {MULTI_PRIV}\n".encode(), "not a text file"),
        (b"\x7fELF\x02\x01\x01\x00\x00\x00\x00", "not a text file"),
        (b"[Interface]\nAddress = 10.0.0.2 \xff\xfe\n", "not a text file (not valid UTF-8)"),
        (f"[Interface]\nPrivateKey = {MULTI_PRIV}\n".encode("utf-16"), "UTF-16"),
    ],
)
def test_file_errors(tmp_path: Path, data: bytes, phrase: str) -> None:
    path = tmp_path / "bad.conf"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        WireGuardConfig.from_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert phrase in message
    assert info.value.line is None
    assert_no_secret(message, (*SECRETS, *MULTI_PEERS))


def test_nul_in_text_given_to_parse() -> None:
    with pytest.raises(ConfigError, match=r"^p\.conf: not a text file"):
        WireGuardConfig.parse(f"[Interface]\nPrivateKey = {MULTI_PRIV}\x00\n", path="p.conf")


def test_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "missing.conf"
    with pytest.raises(ConfigError) as info:
        WireGuardConfig.from_file(str(path))
    assert str(info.value) == f"{path}: file not found"
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="directory") as info:
        WireGuardConfig.from_file(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: ")


@pytest.mark.parametrize(
    ("error", "phrase"),
    [
        (PermissionError(13, "Permission denied"), "cannot read: permission denied"),
        (OSError(5, "Input/output error"), "cannot read: Input/output error"),
    ],
)
def test_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError, phrase: str
) -> None:
    # Simulated: the tests may run as root, who can read a chmod 0 file.
    def fake_open(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr("mitm_wg.config.open", fake_open, raising=False)
    path = tmp_path / "secret.conf"
    with pytest.raises(ConfigError) as info:
        WireGuardConfig.from_file(path)
    assert str(info.value) == f"{path}: {phrase}"
    assert info.value.__suppress_context__


def test_too_large(tmp_path: Path) -> None:
    path = tmp_path / "huge.conf"
    path.write_bytes(b"[Interface]\n" + b"#" * MAX_CONFIG_BYTES)
    with pytest.raises(ConfigError, match="too large"):
        WireGuardConfig.from_file(path)


# ---------------------------------------------------------------------------------------------
# Properties

keys = st.binary(min_size=32, max_size=32)
ports = st.integers(1, 65535)
labels = st.from_regex(r"[a-z](?:[a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)


@st.composite
def interfaces(draw: st.DrawFn) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    address = draw(st.ip_addresses())
    prefix = draw(st.integers(0, address.max_prefixlen))
    return ipaddress.ip_interface((address, prefix))


@st.composite
def networks(draw: st.DrawFn) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    address = draw(st.ip_addresses())
    prefix = draw(st.integers(0, address.max_prefixlen))
    return ipaddress.ip_network((address, prefix), strict=False)


endpoints = st.builds(
    Endpoint,
    st.one_of(st.ip_addresses().map(str), domains),
    ports,
)


@st.composite
def peers(draw: st.DrawFn, public_key: bytes, preshared_key: bytes) -> PeerConfig:
    return PeerConfig(
        public_key=public_key,
        preshared_key=draw(st.sampled_from([None, preshared_key])),
        allowed_ips=tuple(draw(st.lists(networks(), max_size=4))),
        endpoint=draw(st.none() | endpoints),
        persistent_keepalive=draw(st.none() | st.integers(1, 65535)),
    )


@st.composite
def configs(draw: st.DrawFn) -> WireGuardConfig:
    # All keys distinct, so that "the private key is not in repr()" cannot be confused by a
    # public key that happens to be equal.
    pool = draw(st.lists(keys, min_size=9, max_size=9, unique=True))
    count = draw(st.integers(0, 4))
    return WireGuardConfig(
        private_key=pool[0],
        addresses=tuple(draw(st.lists(interfaces(), max_size=4))),
        dns_servers=tuple(draw(st.lists(st.ip_addresses(), max_size=3))),
        dns_search=tuple(draw(st.lists(domains, max_size=3))),
        mtu=draw(st.none() | st.integers(576, 65535)),
        listen_port=draw(st.none() | st.integers(0, 65535)),
        peers=tuple(draw(peers(pool[1 + i], pool[5 + i])) for i in range(count)),
    )


@settings(max_examples=100, deadline=None)
@given(configs())
def test_generated_configs_round_trip(cfg: WireGuardConfig) -> None:
    text = cfg.to_text()
    parsed = WireGuardConfig.parse(text)
    assert parsed == cfg
    assert parsed.to_text() == text
    secret = encode_key(cfg.private_key)
    assert secret not in repr(parsed)
    for peer in parsed.peers:
        if peer.preshared_key is not None:
            assert encode_key(peer.preshared_key) not in repr(parsed)


_FIXTURE_LINES = sorted(
    {line for name in FIXTURES for line in (DATA / name).read_text().splitlines()}
)
_FRAGMENTS = [
    "[Interface]",
    "[Peer]",
    "[",
    "]",
    "=",
    "#",
    ",",
    ":",
    "Endpoint = [",
    "AllowedIPs = ",
    "Address = ::/",
    "PersistentKeepalive = ",
    "MTU = 99999999999999999999999999999",
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.sampled_from(_FIXTURE_LINES),
            st.sampled_from(_FRAGMENTS),
            st.text(max_size=20),
        ),
        max_size=25,
    )
)
def test_garbage_only_raises_config_error(lines: list[str]) -> None:
    text = "\n".join(lines)
    try:
        cfg = WireGuardConfig.parse(text, path="fuzz.conf")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.conf")
        assert_no_secret(str(exc))
    else:
        assert WireGuardConfig.parse(cfg.to_text()) == cfg


def test_endpoints_are_formatted_only_by_format_endpoint() -> None:
    # Issue 11: "host:port" (with brackets for IPv6) is written in one place. A hand-made
    # f"{host}:{port}", f"[{host}]:{port}" or "%s:%s" elsewhere in mitm_wg/ gets IPv6 wrong.
    import re
    from pathlib import Path

    import mitm_wg

    hand_made = re.compile(r"\{[^{}]*(host|addr|address)[^{}]*\}\]?:\{|%s:%[sd]")
    root = Path(mitm_wg.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel == "config.py":
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if hand_made.search(line):
                found.append(f"{rel}:{lineno}: {line.strip()}")
    assert not found, "\n".join(found)
