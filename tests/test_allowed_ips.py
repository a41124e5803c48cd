"""Tests for the cryptokey routing table (mitm_wg.wireguard.allowed_ips)."""

from __future__ import annotations

from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mitm_wg.wireguard.allowed_ips import _CACHE_MAX, AllowedIPs


def ip4(s: str) -> bytes:
    return IPv4Address(s).packed


def ip6(s: str) -> bytes:
    return IPv6Address(s).packed


def test_empty() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    assert t.lookup(ip4("1.2.3.4")) is None
    assert t.lookup(ip6("::1")) is None
    assert t.entries() == []
    assert len(t) == 0


def test_longest_prefix_wins() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(IPv4Network("10.0.0.0/8"), "a")
    t.insert(IPv4Network("10.1.0.0/16"), "b")
    t.insert(IPv4Network("10.1.2.0/24"), "c")
    t.insert(IPv4Network("10.1.2.3/32"), "d")
    assert t.lookup(ip4("10.9.9.9")) == "a"
    assert t.lookup(ip4("10.1.9.9")) == "b"
    assert t.lookup(ip4("10.1.2.9")) == "c"
    assert t.lookup(ip4("10.1.2.3")) == "d"
    assert t.lookup(ip4("11.0.0.0")) is None
    assert t.lookup(ip4("9.255.255.255")) is None
    # Insertion order does not matter.
    u: AllowedIPs[str] = AllowedIPs()
    for net, v in reversed(t.entries()):
        u.insert(net, v)
    for a in ("10.9.9.9", "10.1.9.9", "10.1.2.9", "10.1.2.3"):
        assert u.lookup(ip4(a)) == t.lookup(ip4(a))


def test_odd_prefix_lengths() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(IPv4Network("192.168.0.0/23"), "x")
    t.insert(IPv4Network("192.168.1.128/25"), "y")
    assert t.lookup(ip4("192.168.0.1")) == "x"
    assert t.lookup(ip4("192.168.1.127")) == "x"
    assert t.lookup(ip4("192.168.1.128")) == "y"
    assert t.lookup(ip4("192.168.2.0")) is None
    t.insert(IPv6Network("2001:db8::/33"), "z")
    assert t.lookup(ip6("2001:db8:7fff::1")) == "z"
    assert t.lookup(ip6("2001:db8:8000::1")) is None


def test_v4_v6_separation() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(IPv4Network("0.0.0.0/0"), "v4")
    assert t.lookup(ip6("::")) is None
    assert t.lookup(ip6("::ffff:1.2.3.4")) is None
    t.insert(IPv6Network("::/0"), "v6")
    assert t.lookup(ip4("0.0.0.0")) == "v4"
    assert t.lookup(ip4("255.255.255.255")) == "v4"
    assert t.lookup(ip6("::")) == "v6"
    assert t.lookup(ip6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")) == "v6"
    # ::/96 must not be confused with the IPv4 table even though the ints coincide.
    t2: AllowedIPs[str] = AllowedIPs()
    t2.insert(IPv4Network("1.2.3.4/32"), "v4")
    assert t2.lookup((0x01020304).to_bytes(16, "big")) is None


def test_default_routes_and_more_specific() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(IPv4Network("0.0.0.0/0"), "default")
    t.insert(IPv6Network("::/0"), "default6")
    t.insert(IPv4Network("10.0.0.0/8"), "lan")
    t.insert(IPv6Network("fd00::/8"), "ula")
    assert t.lookup(ip4("8.8.8.8")) == "default"
    assert t.lookup(ip4("10.0.0.1")) == "lan"
    assert t.lookup(ip6("2001:4860::8888")) == "default6"
    assert t.lookup(ip6("fd12::1")) == "ula"


def test_replace_same_prefix() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(IPv4Network("10.0.0.0/24"), "old")
    t.insert(IPv4Network("10.0.0.0/24"), "new")
    assert t.lookup(ip4("10.0.0.5")) == "new"
    assert t.entries() == [(IPv4Network("10.0.0.0/24"), "new")]
    t.remove_value("old")
    assert t.lookup(ip4("10.0.0.5")) == "new"


def test_non_strict_network_is_masked() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(IPv4Network("10.0.0.77/24", strict=False), "a")
    assert t.lookup(ip4("10.0.0.1")) == "a"
    assert t.entries() == [(IPv4Network("10.0.0.0/24"), "a")]


def test_remove_value() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(IPv4Network("10.0.0.0/8"), "a")
    t.insert(IPv4Network("10.1.0.0/16"), "b")
    t.insert(IPv6Network("fd00::/64"), "b")
    t.insert(IPv4Network("192.168.0.0/16"), "b")
    t.remove_value("b")
    assert t.lookup(ip4("10.1.0.1")) == "a"
    assert t.lookup(ip4("192.168.1.1")) is None
    assert t.lookup(ip6("fd00::1")) is None
    assert t.entries() == [(IPv4Network("10.0.0.0/8"), "a")]
    t.remove_value("a")
    assert t.entries() == []
    assert t.lookup(ip4("10.1.0.1")) is None
    t.remove_value("missing")  # no error


def test_remove_value_uses_identity_for_plain_objects() -> None:
    class Peer:
        pass

    p1, p2 = Peer(), Peer()
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert(IPv4Network("10.0.0.0/24"), p1)
    t.insert(IPv4Network("10.0.1.0/24"), p2)
    t.remove_value(p1)
    assert t.lookup(ip4("10.0.0.1")) is None
    assert t.lookup(ip4("10.0.1.1")) is p2


def test_remove_exact_prefix() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(IPv4Network("10.0.0.0/8"), "a")
    t.insert(IPv4Network("10.1.0.0/16"), "b")
    assert t.remove(IPv4Network("10.1.0.0/16")) == "b"
    assert t.remove(IPv4Network("10.1.0.0/16")) is None
    assert t.remove(IPv4Network("10.2.0.0/16")) is None
    assert t.lookup(ip4("10.1.0.1")) == "a"


def test_bytes_memoryview_and_ipaddress_forms() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(ip_network("10.0.0.0/24"), "a")
    t.insert(ip_network("2001:db8::/32"), "b")
    assert t.lookup_ip(ip_address("10.0.0.9")) == "a"
    assert t.lookup_ip(ip_address("2001:db8::1")) == "b"
    assert t.lookup_ip(ip_address("10.0.1.9")) is None
    # Destination address straight out of an IPv4 header (offset 16..20) as a memoryview.
    header = bytes(16) + ip4("10.0.0.9")
    assert t.lookup(memoryview(header)[16:20]) == "a"
    assert t.lookup(bytearray(ip6("2001:db8:1::"))) == "b"


@pytest.mark.parametrize("bad", [b"", b"\x0a", b"\x0a\x00\x00", b"\x0a\x00\x00\x01\x00", bytes(15)])
def test_hostile_lengths_do_not_raise(bad: bytes) -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(IPv4Network("0.0.0.0/0"), "v4")
    t.insert(IPv6Network("::/0"), "v6")
    assert t.lookup(bad) is None


def test_caller_mistakes_raise() -> None:
    t: AllowedIPs[str | None] = AllowedIPs()
    with pytest.raises(ValueError):
        t.insert(IPv4Network("10.0.0.0/8"), None)
    with pytest.raises(TypeError):
        t.insert("10.0.0.0/8", "a")  # type: ignore[arg-type]


def test_entries_order() -> None:
    t: AllowedIPs[int] = AllowedIPs()
    nets = ["10.0.0.0/8", "10.0.0.0/16", "1.0.0.0/8", "::/0", "fd00::/8", "0.0.0.0/0"]
    for i, n in enumerate(nets):
        t.insert(ip_network(n), i)
    assert t.entries() == [
        (ip_network("10.0.0.0/16"), 1),
        (ip_network("1.0.0.0/8"), 2),
        (ip_network("10.0.0.0/8"), 0),
        (ip_network("0.0.0.0/0"), 5),
        (ip_network("fd00::/8"), 4),
        (ip_network("::/0"), 3),
    ]
    assert len(t) == 6


# --- property test against a brute-force reference -----------------------------------------------

v4_nets = st.builds(
    lambda a, p: IPv4Network((a, p), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
v6_nets = st.builds(
    lambda a, p: IPv6Network((a, p), strict=False),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.one_of(v4_nets, v6_nets), st.integers(0, 5)), max_size=20),
    st.lists(st.integers(0, 5), max_size=3),
    st.data(),
)
def test_matches_brute_force(
    inserts: list[tuple[IPv4Network | IPv6Network, int]], removed: list[int], data: st.DataObject
) -> None:
    t: AllowedIPs[int] = AllowedIPs()
    ref: dict[IPv4Network | IPv6Network, int] = {}
    for net, v in inserts:
        t.insert(net, v)
        ref[net] = v
    for v in removed:
        t.remove_value(v)
        ref = {n: x for n, x in ref.items() if x != v}
    assert sorted(t.entries(), key=str) == sorted(ref.items(), key=str)
    # Probe addresses inside each inserted network (first, last) plus random ones.
    probes: list[IPv4Address | IPv6Address] = []
    for net, _ in inserts:
        probes += [net.network_address, net.broadcast_address]
    probes += [IPv4Address(data.draw(st.integers(0, 2**32 - 1))) for _ in range(3)]
    probes += [IPv6Address(data.draw(st.integers(0, 2**128 - 1))) for _ in range(3)]
    for addr in probes:
        matches = [
            (n.prefixlen, v) for n, v in ref.items() if n.version == addr.version and addr in n
        ]
        expected = max(matches)[1] if matches else None
        if matches:
            best = max(p for p, _ in matches)
            assert len([v for p, v in matches if p == best]) == 1
        assert t.lookup_ip(addr) == expected
        assert t.lookup(addr.packed) == expected


# --- the lookup cache ------------------------------------------------------------------------------


def test_cache_invalidated_by_every_change() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    a = ip4("10.1.2.3")
    assert t.lookup(a) is None  # a cached miss
    t.insert(IPv4Network("10.0.0.0/8"), "a")
    assert t.lookup(a) == "a"
    t.insert(IPv4Network("10.1.0.0/16"), "b")
    assert t.lookup(a) == "b"
    t.insert(IPv4Network("10.1.0.0/16"), "c")  # replace
    assert t.lookup(a) == "c"
    t.remove_value("c")
    assert t.lookup(a) == "a"
    assert t.remove(IPv4Network("10.0.0.0/8")) == "a"
    assert t.lookup(a) is None
    t.insert(IPv4Network("10.0.0.0/8"), "a")
    assert t.lookup(a) == "a"
    t.clear()
    assert t.lookup(a) is None
    assert t.entries() == []


def test_cache_key_forms_agree() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(IPv4Network("10.0.0.0/8"), "a")
    packet = bytearray(ip4("10.0.0.1") + ip4("11.0.0.1"))
    for _ in range(2):  # second round hits the cache where the form is hashable
        assert t.lookup(bytes(packet[:4])) == "a"
        assert t.lookup(memoryview(bytes(packet))[:4]) == "a"
        assert t.lookup(memoryview(packet)[:4]) == "a"  # writable: not hashable, not cached
        assert t.lookup(packet[4:8]) is None
        assert t.lookup(memoryview(bytes(packet))[4:8]) is None
    # The cache holds copies, not views that would pin packet buffers.
    assert all(type(k) is bytes for k in t._cache)


def test_cache_is_bounded() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(IPv4Network("10.0.0.0/8"), "a")
    for i in range(_CACHE_MAX * 2 + 10):
        addr = (0x0A000000 + i).to_bytes(4, "big")
        assert t.lookup(addr) == "a"
        assert t.lookup((0x0B000000 + i).to_bytes(4, "big")) is None
        assert len(t._cache) <= _CACHE_MAX


def test_cache_ignores_bad_lengths() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(IPv4Network("0.0.0.0/0"), "a")
    assert t.lookup(bytes(1500)) is None
    assert t.lookup(b"\x01\x02\x03") is None
    assert len(t._cache) == 0
