"""The Stack without the TCP state machine's help: demux, UDP, ICMP, RSTs, counters."""

from __future__ import annotations

import errno
import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ip import naive_checksum

from mitm_wg.net import icmp
from mitm_wg.net.ipv4 import IpPacket, build_ipv4, parse_ipv4, parse_quoted_ipv4
from mitm_wg.net.ipv6 import build_ipv6, parse_ipv6, parse_quoted_ipv6
from mitm_wg.net.stack import Stack
from mitm_wg.net.tcp import TcpConfig
from mitm_wg.net.tcp_wire import ACK, RST, SYN, TcpSegment, build_tcp, parse_tcp
from mitm_wg.net.udp import UdpDatagram, build_udp, parse_udp
from sim import LinkParams, exchange, make_pair

ME4 = ipaddress.ip_address("10.0.0.2").packed
PEER4 = ipaddress.ip_address("10.0.0.1").packed
ME6 = ipaddress.ip_address("fd00::2").packed
PEER6 = ipaddress.ip_address("fd00::1").packed


def det_rand(n: int) -> bytes:
    return bytes(range(n))


def mkstack(**kw: object) -> Stack:
    return Stack(["10.0.0.2/24", "fd00::2/64"], randbytes=det_rand, **kw)  # type: ignore[arg-type]


def poll(stack: Stack, now: float = 0.0) -> list[bytes]:
    out: list[bytes] = []
    stack.poll(now, out)
    return out


def ip(pkt: bytes) -> IpPacket:
    p = parse_ipv4(memoryview(pkt)) if pkt[0] >> 4 == 4 else parse_ipv6(memoryview(pkt))
    assert isinstance(p, IpPacket)
    return p


def tcp_packet(seg: TcpSegment, src: bytes = PEER4, dst: bytes = ME4) -> bytes:
    build = build_ipv4 if len(src) == 4 else build_ipv6
    return build(src, dst, 6, build_tcp(seg, src, dst))


# -- ICMP echo -------------------------------------------------------------------------


def test_ping_v4_answered() -> None:
    s = mkstack()
    req = icmp.build_icmp4(icmp.ICMP4_ECHO_REQUEST, 0, 0xBEEF0007, b"ping payload")
    s.receive(build_ipv4(PEER4, ME4, 1, req), 1.0)
    (reply,) = poll(s, 1.0)
    p = ip(reply)
    assert (p.src, p.dst, p.proto, p.hop_limit) == (ME4, PEER4, 1, 64)
    m = icmp.parse_icmp4(p.payload)
    assert isinstance(m, icmp.IcmpMessage)
    assert (m.type, m.code, m.rest, bytes(m.body)) == (0, 0, 0xBEEF0007, b"ping payload")
    assert s.stats.icmp_echo_answered == 1


def test_ping_v6_answered() -> None:
    s = mkstack()
    req = icmp.build_icmp6(PEER6, ME6, icmp.ICMP6_ECHO_REQUEST, 0, 0x00420001, b"x" * 33)
    s.receive(build_ipv6(PEER6, ME6, 58, req), 1.0)
    (reply,) = poll(s, 1.0)
    p = ip(reply)
    assert (p.src, p.dst, p.proto) == (ME6, PEER6, 58)
    m = icmp.parse_icmp6(p.payload, p.src, p.dst)
    assert isinstance(m, icmp.IcmpMessage)
    assert (m.type, m.rest, bytes(m.body)) == (icmp.ICMP6_ECHO_REPLY, 0x00420001, b"x" * 33)


def test_ping_to_other_address_not_answered() -> None:
    s = mkstack()
    other = bytes([10, 0, 0, 9])
    req = icmp.build_icmp4(icmp.ICMP4_ECHO_REQUEST, 0, 1, b"")
    s.receive(build_ipv4(PEER4, other, 1, req), 0.0)
    assert poll(s) == []
    assert s.stats.dropped_not_ours == 1


# -- drops and counters ------------------------------------------------------------------


def test_bad_packets_are_counted_never_raise() -> None:
    s = mkstack()
    good = build_ipv4(PEER4, ME4, 17, build_udp(PEER4, ME4, 1, 2, b"abc"))
    s.receive(b"", 0)
    s.receive(b"\x70" + good[1:], 0)  # version 7
    s.receive(good[:15], 0)
    assert s.stats.dropped_malformed == 3
    bad = bytearray(good)
    bad[-1] ^= 4  # UDP checksum
    s.receive(bytes(bad), 0)
    bad = bytearray(good)
    bad[8] = 3  # TTL: IPv4 header checksum
    s.receive(bytes(bad), 0)
    assert s.stats.dropped_checksum == 2
    frag = bytearray(good)
    struct.pack_into("!H", frag, 6, 0x2000)
    struct.pack_into("!H", frag, 10, 0)
    struct.pack_into("!H", frag, 10, naive_checksum(bytes(frag[:20])))
    s.receive(bytes(frag), 0)
    assert s.stats.dropped_fragment == 1
    s.receive(build_ipv4(PEER4, ME4, 99, b"whatever"), 0)
    assert s.stats.dropped_proto == 1
    (unreach,) = poll(s)  # protocol unreachable
    m = icmp.parse_icmp4(ip(unreach).payload)
    assert isinstance(m, icmp.IcmpMessage) and (m.type, m.code) == (3, 2)
    s.receive(build_ipv6(PEER6, ME6, 99, b"whatever"), 0)
    (problem,) = poll(s)
    p6 = ip(problem)
    m = icmp.parse_icmp6(p6.payload, p6.src, p6.dst)
    assert isinstance(m, icmp.IcmpMessage) and (m.type, m.code, m.rest) == (4, 1, 6)
    s.receive(build_ipv4(ME4, ME4, 17, build_udp(ME4, ME4, 1, 2, b"")), 0)  # spoofed source
    mcast = bytes([224, 0, 0, 1])
    s.receive(build_ipv4(mcast, ME4, 17, build_udp(mcast, ME4, 1, 2, b"")), 0)
    assert s.stats.dropped_martian == 2
    assert poll(s) == []


# -- TCP without a socket: RST ------------------------------------------------------------


def test_syn_to_closed_port_gets_rst_ack() -> None:
    s = mkstack()
    syn = TcpSegment(40000, 81, 1000, 0, SYN, 65535, mss=1400)
    s.receive(tcp_packet(syn), 0.0)
    (out,) = poll(s)
    p = ip(out)
    assert (p.src, p.dst) == (ME4, PEER4)
    pseudo = ME4 + PEER4 + b"\0\x06" + len(p.payload).to_bytes(2, "big")
    assert naive_checksum(pseudo + bytes(p.payload)) == 0
    seg = parse_tcp(p.payload)
    assert seg is not None
    assert (seg.src_port, seg.dst_port, seg.seq, seg.ack, seg.flags) == (
        81,
        40000,
        0,
        1001,
        RST | ACK,
    )
    assert s.stats.rst_sent == 1 and s.stats.no_socket == 1


def test_ack_to_closed_port_gets_rst_with_its_ack_as_seq() -> None:
    s = mkstack()
    seg = TcpSegment(40000, 81, 5, 0xFFFFFFF0, ACK, 100, payload=b"data")
    s.receive(tcp_packet(seg, PEER6, ME6), 0.0)
    (out,) = poll(s)
    p = ip(out)
    assert (p.version, p.dst) == (6, PEER6)
    rst = parse_tcp(p.payload)
    assert rst is not None
    assert (rst.seq, rst.flags) == (0xFFFFFFF0, RST)


def test_no_rst_for_rst_or_bad_checksum() -> None:
    s = mkstack()
    s.receive(tcp_packet(TcpSegment(40000, 81, 5, 0, RST)), 0.0)
    pkt = bytearray(tcp_packet(TcpSegment(40000, 81, 5, 0, SYN)))
    pkt[-1] ^= 0x80  # inside the TCP header: checksum mismatch
    s.receive(bytes(pkt), 0.0)
    assert poll(s) == []
    assert s.stats.rst_sent == 0
    assert s.stats.dropped_checksum == 1


# -- UDP ---------------------------------------------------------------------------------


def test_udp_round_trip_v4_and_v6() -> None:
    sim = make_pair(seed=1)
    for fam, dst in ((4, "10.0.0.2"), (6, "fd00::2")):
        server = sim.b.udp_bind(5353, family=fam)
        client = sim.a.udp_bind(family=fam)
        assert 49152 <= client.local_port <= 65535
        client.sendto(b"question", (dst, 5353), sim.now)
        assert sim.run_until(lambda s=server: s.pending > 0, 1.0)
        data, (addr, port) = server.recvfrom()  # type: ignore[misc]
        assert data == b"question"
        assert ipaddress.ip_address(addr) == ipaddress.ip_address(
            "10.0.0.1" if fam == 4 else "fd00::1"
        )
        assert port == client.local_port
        server.sendto(b"answer", (addr, port), sim.now)
        assert sim.run_until(lambda c=client: c.pending > 0, 1.0)
        assert client.recvfrom() == (b"answer", (dst, 5353))
        assert client.recvfrom() is None
        server.close()
        client.close()


def test_udp_port_unreachable_reported_and_rate_limited() -> None:
    sim = make_pair(seed=2, icmp_rate=1.0, icmp_burst=3.0)
    client = sim.a.udp_bind(family=4)
    for _ in range(10):
        client.sendto(b"hello?", ("10.0.0.2", 9), sim.now)
    sim.run_for(0.5)
    assert sim.b.stats.no_socket == 10
    assert sim.b.stats.icmp_sent == 3
    assert sim.b.stats.icmp_rate_limited == 7
    err = client.take_error()
    assert isinstance(err, ConnectionRefusedError)
    assert client.take_error() is None


def test_udp_port_unreachable_v6() -> None:
    sim = make_pair(seed=3)
    client = sim.a.udp_bind(family=6)
    client.sendto(b"hello?", ("fd00::2", 9), sim.now)
    sim.run_for(0.5)
    assert isinstance(client.error, ConnectionRefusedError)


def test_udp_receive_queue_bounded() -> None:
    s = mkstack()
    sock = s.udp_bind(7, queue_limit=3)
    for i in range(5):
        s.receive(build_ipv4(PEER4, ME4, 17, build_udp(PEER4, ME4, 1000, 7, bytes([i]))), 0.0)
    assert sock.pending == 3
    assert sock.dropped == 2 and s.stats.udp_queue_full == 2
    assert [sock.recvfrom()[0] for _ in range(3)] == [b"\0", b"\1", b"\2"]  # type: ignore[index]


def test_udp_bind_rules() -> None:
    s = Stack(["10.0.0.2/24"], randbytes=det_rand)
    s.udp_bind(53)
    with pytest.raises(OSError) as e:
        s.udp_bind(53)
    assert e.value.errno == errno.EADDRINUSE
    with pytest.raises(OSError):
        s.udp_bind(54, family=6)  # no IPv6 address
    with pytest.raises(OSError):
        s.udp_bind(54, local="10.0.0.3")
    u = s.udp_bind(54, local="10.0.0.2")
    with pytest.raises(OSError) as e:
        u.sendto(b"x" * 2000, ("10.0.0.1", 1))
    assert e.value.errno == errno.EMSGSIZE
    with pytest.raises(OSError):
        u.sendto(b"x", ("fd00::1", 1))
    u.close()
    with pytest.raises(OSError):
        u.sendto(b"x", ("10.0.0.1", 1))
    s.udp_bind(54)  # free again


def test_udp_v6_zero_checksum_dropped() -> None:
    s = mkstack()
    sock = s.udp_bind(7, family=6)
    dgram = bytearray(build_udp(PEER6, ME6, 1, 7, b"x"))
    dgram[6:8] = b"\0\0"
    s.receive(build_ipv6(PEER6, ME6, 17, bytes(dgram)), 0.0)
    assert sock.pending == 0 and s.stats.dropped_checksum == 1


# -- ICMP errors: validation and path MTU ---------------------------------------------


def _frag_needed(quoted: bytes, mtu: int, router: bytes = bytes([192, 0, 2, 1])) -> bytes:
    msg = icmp.build_icmp4(icmp.ICMP4_DEST_UNREACH, icmp.UNREACH4_FRAG_NEEDED, mtu, quoted)
    return build_ipv4(router, ME4, 1, msg)


def test_frag_needed_validated_against_udp_socket() -> None:
    s = mkstack()
    sock = s.udp_bind(4444, family=4)
    ours = build_ipv4(ME4, PEER4, 17, build_udp(ME4, PEER4, 4444, 53, b"q" * 1300))
    # Not our socket's port: ignored.
    other = build_ipv4(ME4, PEER4, 17, build_udp(ME4, PEER4, 4445, 53, b"q" * 1300))
    s.receive(_frag_needed(other[:28], 1000), 0.0)
    assert s.path_mtu("10.0.0.1") == 1420 and s.stats.icmp_errors_ignored == 1
    # MTU not smaller than the quoted packet: bogus, ignored.
    s.receive(_frag_needed(ours[:28], 1400), 0.0)
    assert s.path_mtu("10.0.0.1") == 1420 and s.stats.icmp_errors_ignored == 2
    s.receive(_frag_needed(ours[:28], 1000), 0.0)
    assert s.path_mtu("10.0.0.1") == 1000
    s.receive(_frag_needed(ours[:28], 100), 0.0)
    assert s.path_mtu("10.0.0.1") == 576  # floor
    with pytest.raises(OSError):
        sock.sendto(b"x" * 600, ("10.0.0.1", 53))
    sock.sendto(b"x" * 500, ("10.0.0.1", 53))
    assert sock.error is None  # PMTU messages are not errors


def test_packet_too_big_v6_floor_1280() -> None:
    s = mkstack()
    s.udp_bind(4444, family=6)
    ours = build_ipv6(ME6, PEER6, 17, build_udp(ME6, PEER6, 4444, 53, b"q" * 1350))
    msg = icmp.build_icmp6(PEER6, ME6, icmp.ICMP6_PACKET_TOO_BIG, 0, 1000, ours[:48])
    s.receive(build_ipv6(PEER6, ME6, 58, msg), 0.0)
    assert s.path_mtu("fd00::1") == 1280


def test_a_narrower_path_shrinks_live_connections_and_later_syns_offer_less() -> None:
    """``lower_path_mtu`` (the runtime's call when the path under the tunnel is narrower
    than its datagrams): a connection to that address resends what is in flight in
    segments that fit, a later SYN to it offers the MSS that fits, other addresses keep
    the tunnel's; it never raises an MTU, and stops at the protocol's minimum."""
    s = mkstack()
    sock = s.tcp_connect("10.0.0.1", 80, 0.0)
    ((_, syn),) = _out_segments(s)
    assert syn.mss == 1380
    synack = TcpSegment(80, sock.local_port, 7000, syn.seq + 1, SYN | ACK, 65535, mss=1460)
    s.receive(tcp_packet(synack), 0.0)
    sock.send(bytes(4 * 1380))
    sent = [seg for _, seg in _out_segments(s, 0.01) if seg.payload]
    assert [len(seg.payload) for seg in sent] == [1380] * 4
    assert s.lower_path_mtu(PEER4, 1328)
    resent = [seg for _, seg in _out_segments(s, 0.02) if seg.payload]
    assert resent and resent[0].seq == sent[0].seq  # in flight: again, smaller
    assert [len(seg.payload) for seg in resent] == [1288] * 4 + [4 * 1380 - 4 * 1288]
    assert s.path_mtu("10.0.0.1") == 1328
    assert not s.lower_path_mtu(PEER4, 1400) and s.path_mtu("10.0.0.1") == 1328
    s.tcp_connect("10.0.0.1", 443, 0.03)
    s.tcp_connect("10.0.0.3", 443, 0.03)
    syns = {p.dst: seg.mss for p, seg in _out_segments(s, 0.03) if seg.flags == SYN}
    assert syns == {PEER4: 1288, bytes([10, 0, 0, 3]): 1380}
    assert s.lower_path_mtu(PEER4, 100) and s.path_mtu("10.0.0.1") == 576
    assert s.lower_path_mtu(PEER6, 1000) and s.path_mtu("fd00::1") == 1280


@pytest.mark.parametrize("family", [4, 6])
def test_telling_the_peer_the_path_to_us_is_narrower(family: int) -> None:
    """``tell_remote_path_mtu``: the ICMP error a router would send the peer about a
    full-sized segment of its (at our RCV.NXT, so its TCP takes it: RFC 5927 §4.1), from
    our address, with the MTU (IPv6: not under 1280). Checked with our own parsers: valid
    checksums, and the quote names the peer's connection and a full-sized packet."""
    s = mkstack()
    peer, me = (PEER4, ME4) if family == 4 else (PEER6, ME6)
    sock = s.tcp_connect(str(ipaddress.ip_address(peer)), 443, 0.0)
    ((_, syn),) = _out_segments(s)
    synack = TcpSegment(443, sock.local_port, 7000, syn.seq + 1, SYN | ACK, 65535, mss=1460)
    s.receive(tcp_packet(synack, src=peer, dst=me), 0.0)
    poll(s)
    s.tell_remote_path_mtu(sock, 1200)
    (packet,) = poll(s, 0.1)
    p = ip(packet)
    assert (p.src, p.dst) == (me, peer) and s.stats.pmtu_told == 1
    if family == 4:
        m = icmp.parse_icmp4(p.payload)
        assert isinstance(m, icmp.IcmpMessage)
        assert (m.type, m.code, m.rest & 0xFFFF) == (3, 4, 1200)
        quoted = parse_quoted_ipv4(m.body)
    else:
        m = icmp.parse_icmp6(p.payload, p.src, p.dst)
        assert isinstance(m, icmp.IcmpMessage)
        assert (m.type, m.code, m.rest) == (2, 0, 1280)  # IPv6's minimum
        quoted = parse_quoted_ipv6(m.body)
    assert quoted is not None
    src, dst, proto, tcp = quoted
    assert (src, dst, proto) == (peer, me, 6)
    assert struct.unpack_from("!HHI", tcp) == (443, sock.local_port, 7001)  # our RCV.NXT
    assert bytes(m.body[2:4] if family == 4 else m.body[4:6]) == (
        (1420).to_bytes(2, "big") if family == 4 else (1420 - 40).to_bytes(2, "big")
    )  # the quoted packet: a full-sized one


def test_icmp_errors_for_foreign_packets_ignored() -> None:
    s = mkstack()
    s.udp_bind(4444, family=4)
    # Quoted source is not our address.
    theirs = build_ipv4(PEER4, ME4, 17, build_udp(PEER4, ME4, 4444, 53, b"q" * 1300))
    s.receive(_frag_needed(theirs[:28], 1000), 0.0)
    # Truncated quote (no ports).
    ours = build_ipv4(ME4, PEER4, 17, build_udp(ME4, PEER4, 4444, 53, b"q" * 1300))
    s.receive(_frag_needed(ours[:24], 1000), 0.0)
    assert s.stats.icmp_errors_ignored == 2
    assert s.path_mtu("10.0.0.1") == 1420


def test_router_frag_needed_in_sim_lowers_udp_path_mtu() -> None:
    sim = make_pair(seed=4, ab=LinkParams(mtu=1200, icmp_router="192.0.2.1"))
    sim.b.udp_bind(53)
    sock = sim.a.udp_bind(family=4)
    sock.sendto(b"z" * 1300, ("10.0.0.2", 53), sim.now)
    sim.run_for(0.5)
    assert sim.links[0].stats.too_big == 1
    assert sim.a.path_mtu("10.0.0.2") == 1200
    assert sim.a.stats.pmtu_updates == 1


def test_parse_udp_of_stack_output() -> None:
    s = mkstack()
    u = s.udp_bind(1234, family=6)
    u.sendto(b"out", ("fd00::1", 53))
    (pkt,) = poll(s)
    p = ip(pkt)
    d = parse_udp(p.payload, p.src, p.dst)
    assert isinstance(d, UdpDatagram)
    assert (d.src_port, d.dst_port, bytes(d.payload)) == (1234, 53, b"out")


# -- fuzz: receive never raises ----------------------------------------------------------


def _seed_packets() -> list[bytes]:
    quoted = build_ipv4(ME4, PEER4, 17, build_udp(ME4, PEER4, 7, 53, b"q" * 100))
    quoted6 = build_ipv6(ME6, PEER6, 6, build_tcp(TcpSegment(80, 4000, 1, 2, ACK), ME6, PEER6))
    return [
        build_ipv4(PEER4, ME4, 17, build_udp(PEER4, ME4, 1, 7, b"abc")),
        build_ipv6(PEER6, ME6, 17, build_udp(PEER6, ME6, 1, 7, b"abc")),
        tcp_packet(TcpSegment(4000, 80, 1, 0, SYN, 1000, mss=1000, wscale=7, sack_permitted=True)),
        tcp_packet(TcpSegment(4000, 80, 1, 0, SYN, 1000, timestamp=(1, 0)), PEER6, ME6),
        tcp_packet(TcpSegment(4000, 81, 1, 5, ACK, 1000, payload=b"data")),
        build_ipv4(PEER4, ME4, 1, icmp.build_icmp4(3, 4, 600, quoted[:28])),
        build_ipv4(PEER4, ME4, 1, icmp.build_icmp4(3, 3, 0, quoted[:60])),
        build_ipv4(PEER4, ME4, 1, icmp.build_icmp4(8, 0, 1, b"echo")),
        build_ipv6(PEER6, ME6, 58, icmp.build_icmp6(PEER6, ME6, 2, 0, 1280, quoted6)),
        build_ipv6(PEER6, ME6, 58, icmp.build_icmp6(PEER6, ME6, 1, 4, 0, quoted6)),
    ]


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(
    st.integers(0, 9),
    st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4),
    st.integers(0, 100),
)
def test_receive_never_raises_on_mutated_packets(
    which: int, edits: list[tuple[int, int]], cut: int
) -> None:
    s = mkstack()
    s.tcp_listen(80)
    s.udp_bind(7)
    pkt = bytearray(_seed_packets()[which])
    for pos, val in edits:
        pkt[pos % len(pkt)] = val
    if cut:
        del pkt[-cut:]
    s.receive(bytes(pkt), 1.0)
    out: list[bytes] = []
    s.poll(1.0, out)
    s.next_deadline()
    for p in out:
        assert p[0] >> 4 in (4, 6)


# -- TCP bookkeeping: addresses, ports, ISNs, listeners, ICMP for TCP ------------------


def _out_segments(stack: Stack, now: float = 0.0) -> list[tuple[IpPacket, TcpSegment]]:
    res = []
    for pkt in poll(stack, now):
        p = ip(pkt)
        assert p.proto == 6
        seg = parse_tcp(p.payload)
        assert seg is not None
        res.append((p, seg))
    return res


def test_tcp_connect_source_address_and_family_errors() -> None:
    s = Stack(["10.0.0.2/24"], randbytes=det_rand)
    with pytest.raises(OSError) as e:
        s.tcp_connect("fd00::1", 80, 0.0)
    assert e.value.errno == errno.EADDRNOTAVAIL
    with pytest.raises(OSError):
        s.tcp_connect("10.0.0.1", 80, 0.0, local="10.0.0.3")
    with pytest.raises(ValueError):
        s.tcp_connect("10.0.0.1", 0, 0.0)
    s2 = Stack(["10.0.0.2/24", "10.0.0.5/24", "fd00::2/64"], randbytes=det_rand)
    sock = s2.tcp_connect("10.0.0.1", 80, 0.0, local="10.0.0.5")
    sock6 = s2.tcp_connect("fd00::1", 80, 0.0)
    ((p, syn), (p6, syn6)) = _out_segments(s2)
    assert p.src == bytes([10, 0, 0, 5]) and sock.local_addr == p.src
    assert p6.src == ME6 and p6.version == 6
    assert syn.flags == SYN and syn6.flags == SYN
    assert syn.mss == 1420 - 40 and syn6.mss == 1420 - 60  # MSS from the MTU
    assert syn.src_port == sock.local_port and syn6.src_port == sock6.local_port


def test_ephemeral_ports_unique_and_recent_tuples_avoided() -> None:
    s = mkstack()  # det_rand: every pick starts probing at the same port
    socks = [s.tcp_connect("10.0.0.1", 80, 0.0) for _ in range(50)]
    ports = [x.local_port for x in socks]
    assert len(set(ports)) == 50 and all(49152 <= p <= 65535 for p in ports)
    first = socks[0].local_port
    socks[0].abort(0.0)
    poll(s, 0.0)
    assert socks[0] not in s.tcp_sockets
    again = s.tcp_connect("10.0.0.1", 80, 1.0)
    assert again.local_port != first  # the 4-tuple was used recently
    later = s.tcp_connect("10.0.0.1", 80, 121.0)
    assert later.local_port == first  # ... but not forever
    other = s.tcp_connect("10.0.0.1", 443, 1.0)
    assert other.local_port == first  # a different 4-tuple may reuse the port


def test_isn_rfc6528_clock_plus_keyed_hash() -> None:
    s = Stack(["10.0.0.2/24"], randbytes=det_rand)
    t = Stack(["10.0.0.2/24"], randbytes=lambda n: b"\xaa" * n)
    key = (ME4, 50000, PEER4, 80)
    key2 = (ME4, 50001, PEER4, 80)
    assert s._isn(key, 0.0) != s._isn(key2, 0.0)  # per-tuple
    assert s._isn(key, 0.0) != t._isn(key, 0.0)  # per-secret
    assert (s._isn(key, 2.0) - s._isn(key, 0.0)) % 2**32 == 500_000  # 4 µs ticks
    sock = s.tcp_connect("10.0.0.1", 80, 3.0)
    ((_, syn),) = _out_segments(s, 3.0)
    k = (ME4, sock.local_port, PEER4, 80)
    assert syn.seq == s._isn(k, 3.0)


def _syn_from(port: int, seq: int = 1000) -> bytes:
    return tcp_packet(TcpSegment(port, 80, seq, 0, SYN, 65535, mss=1380))


def test_listener_backlog_and_accept() -> None:
    s = mkstack()
    lst = s.tcp_listen(80, backlog=2)
    with pytest.raises(OSError):
        s.tcp_listen(80)
    for port in (40001, 40002, 40003):
        s.receive(_syn_from(port), 0.0)
    outs = _out_segments(s)
    assert [seg.flags for _, seg in outs] == [SYN | ACK, SYN | ACK]
    assert s.stats.syn_backlog_full == 1
    assert lst.accept() is None and lst.pending == 0  # not established yet
    # Complete the first handshake.
    synack = outs[0][1]
    s.receive(tcp_packet(TcpSegment(40001, 80, 1001, synack.seq + 1, ACK, 65535)), 0.1)
    assert lst.pending == 1
    conn = lst.accept()
    assert conn is not None and conn.remote_port == 40001 and lst.accept() is None
    # A duplicate SYN for an existing half-open connection goes to that socket, not a new one.
    s.receive(_syn_from(40002), 0.2)
    assert len(s.tcp_sockets) == 2
    lst.close(0.3)
    outs = _out_segments(s, 0.3)
    assert [(seg.dst_port, seg.flags & RST) for _, seg in outs] == [(40002, RST)]
    s.receive(_syn_from(40004), 0.4)  # port closed now: RST
    ((_, rst),) = _out_segments(s, 0.4)
    assert rst.flags == RST | ACK and rst.ack == 1001


def _icmp_about(quoted_pkt: bytes, type_: int, code: int, rest: int = 0) -> bytes:
    body = quoted_pkt[:68]
    if len(quoted_pkt[0:1]) and quoted_pkt[0] >> 4 == 6:
        msg = icmp.build_icmp6(PEER6, ME6, type_, code, rest, body)
        return build_ipv6(PEER6, ME6, 58, msg)
    return build_ipv4(PEER4, ME4, 1, icmp.build_icmp4(type_, code, rest, body))


def test_icmp_port_unreachable_for_tcp_checks_quoted_seq() -> None:
    s = mkstack()
    sock = s.tcp_connect("10.0.0.1", 80, 0.0)
    (pkt,) = poll(s)
    bad = bytearray(pkt)
    seq = int.from_bytes(bad[24:28], "big")
    bad[24:28] = ((seq + 100_000) % 2**32).to_bytes(4, "big")  # outside SND.UNA..SND.NXT
    s.receive(_icmp_about(bytes(bad), 3, 3), 0.1)
    assert sock.error is None and s.stats.icmp_errors_ignored == 1
    s.receive(_icmp_about(pkt, 3, 3), 0.1)
    assert isinstance(sock.error, ConnectionRefusedError)


def test_icmp_host_unreachable_v6_in_syn_sent() -> None:
    s = mkstack()
    sock = s.tcp_connect("fd00::1", 80, 0.0)
    (pkt,) = poll(s)
    s.receive(_icmp_about(pkt, icmp.ICMP6_DEST_UNREACH, icmp.UNREACH6_ADDRESS), 0.1)
    assert isinstance(sock.error, OSError) and sock.error.errno == errno.EHOSTUNREACH


def test_frag_needed_for_tcp_lowers_mss_of_sockets_to_that_host() -> None:
    s = mkstack()
    peer3 = bytes([10, 0, 0, 3])
    socks = [
        s.tcp_connect("10.0.0.1", 80, 0.0),
        s.tcp_connect("10.0.0.1", 81, 0.0),
        s.tcp_connect("10.0.0.3", 80, 0.0),
    ]
    syns = poll(s)
    for pkt in syns:  # answer every SYN: the connections become established
        p = ip(pkt)
        syn = parse_tcp(p.payload)
        assert syn is not None
        synack = TcpSegment(syn.dst_port, syn.src_port, 7, syn.seq + 1, SYN | ACK, 65535, mss=1380)
        s.receive(tcp_packet(synack, p.dst, p.src), 0.05)
    poll(s, 0.05)
    before = [x.mss for x in socks]
    assert min(before) > 1000
    # The quoted segment must carry a sequence number in SND.UNA..SND.NXT (RFC 5927).
    quoted = TcpSegment(socks[0].local_port, 80, socks[0].snd_una, 8, ACK, payload=bytes(1300))
    big = tcp_packet(quoted, ME4, PEER4)
    s.receive(_icmp_about(big, 3, 4, 1000), 0.1)
    assert s.path_mtu("10.0.0.1") == 1000 and s.path_mtu(peer3) == 1420
    after = [x.mss for x in socks]
    assert after[0] <= 960 and after[1] <= 960
    assert after[2] == before[2]
    d = s.tcp_connect("10.0.0.1", 82, 0.2)
    (syn_pkt,) = poll(s, 0.2)
    syn = parse_tcp(ip(syn_pkt).payload)
    assert syn is not None
    synack = TcpSegment(syn.dst_port, syn.src_port, 7, syn.seq + 1, SYN | ACK, 65535, mss=1380)
    s.receive(tcp_packet(synack), 0.25)
    assert d.mss <= 960  # new connections start from the learned path MTU


def test_udp_through_ipv6_extension_headers() -> None:
    s = mkstack()
    sock = s.udp_bind(7, family=6)
    dgram = build_udp(PEER6, ME6, 1000, 7, b"behind options")
    dest_opts = bytes([17, 0, 1, 4, 0, 0, 0, 0])  # next header UDP, PadN
    body = dest_opts + dgram
    pkt = struct.pack("!IHBB16s16s", 6 << 28, len(body), 60, 64, PEER6, ME6) + body
    s.receive(pkt, 0.0)
    assert sock.recvfrom() == (b"behind options", ("fd00::1", 1000))


def test_user_calls_wake_the_stack() -> None:
    """poll() caches deadlines; application calls on a socket must still be noticed."""
    sim = make_pair(seed=5)
    lst = sim.b.tcp_listen(80)
    client = sim.a.tcp_connect("10.0.0.2", 80, sim.now)
    assert sim.run_until(lambda: lst.pending > 0, 2.0)
    server = lst.accept()
    assert server is not None
    sim.run_for(1.0)  # quiet: no timers due soon
    for stack in sim.stacks:
        d = stack.next_deadline()
        assert d is None or d > sim.now + 0.5
    assert client.send(b"hello") == 5
    assert sim.a.next_deadline() == sim.now
    out = poll(sim.a, sim.now)
    segs = [parse_tcp(ip(p).payload) for p in out]
    assert [bytes(s.payload) for s in segs if s is not None] == [b"hello"]
    for p in out:
        sim.b.receive(p, sim.now)
    assert server.recv(100) == b"hello"
    server.close(sim.now)
    assert sim.b.next_deadline() == sim.now
    flags = [seg.flags for p in poll(sim.b, sim.now) if (seg := parse_tcp(ip(p).payload))]
    assert any(f & 0x01 for f in flags)  # the FIN went out


def test_authenticated_packets_skip_the_tcp_checksum_only_when_asked() -> None:
    """A packet that WireGuard authenticated cannot be corrupted in transit: the runtime
    says so and the fast path skips the TCP checksum; everyone else still gets it checked."""
    from mitm_wg.net.checksum import checksum as _checksum
    from mitm_wg.net.stack import Stack as _Stack
    from mitm_wg.net.tcp_wire import SYN as _SYN
    from mitm_wg.net.tcp_wire import TcpSegment as _Seg
    from mitm_wg.net.tcp_wire import build_tcp as _build

    def bad_syn(port: int) -> bytes:
        src, dst = bytes([10, 0, 0, 2]), bytes([10, 0, 0, 1])
        tcp = bytearray(_build(_Seg(40000 + port, port, 1000, 0, _SYN, 65535, mss=1400), src, dst))
        tcp[16] ^= 0xFF  # break the TCP checksum
        header = bytearray(
            bytes([0x45, 0])
            + (20 + len(tcp)).to_bytes(2, "big")
            + bytes(4)
            + bytes([64, 6, 0, 0])
            + src
            + dst
        )
        header[10:12] = _checksum(header).to_bytes(2, "big")
        return bytes(header + tcp)

    stack = _Stack(["10.0.0.1/32"])
    listener = stack.tcp_listen(80)
    stack.receive(bad_syn(80), 0.0)
    assert stack.stats.dropped_checksum == 1
    out: list[bytes] = []
    stack.poll(0.0, out)
    assert out == []  # no SYN-ACK for a corrupted SYN
    stack.receive(bad_syn(80), 0.0, authenticated=True)
    stack.poll(0.0, out)
    assert stack.stats.dropped_checksum == 1
    assert len(out) == 1 and out[0][33] & 0x12 == 0x12  # SYN-ACK
    assert listener.pending == 0  # half-open until the handshake completes


def test_a_read_touches_the_socket_only_when_a_window_update_is_due() -> None:
    """A runtime runs the stack after an application's read only when ``pending`` says a
    read left something to send: the window update once the window has closed noticeably
    and a read opened it by at least a segment (receiver SWS avoidance). A read that owes
    the peer nothing leaves the stack with no work."""
    cfg = TcpConfig(recv_buffer=16 << 10, recv_buffer_max=16 << 10)
    sim = make_pair(tcp_config=cfg)
    a, b = sim.a, sim.b
    listener = b.tcp_listen(80)
    client = a.tcp_connect("10.0.0.2", 80, 0.0)
    for _ in range(3):
        exchange(a, b, 0.0)
    server = listener.accept()
    assert server is not None and client.can_send
    server.send(bytes(16 << 10))  # the client's whole window
    for _ in range(3):
        exchange(b, a, 0.01)
    assert client.recv_available == 16 << 10 and not a.pending
    assert len(client.recv(1000)) == 1000  # opens it less than a segment
    assert not a.pending and poll(a, 0.02) == []
    assert len(client.recv(1000)) == 1000  # 2000 bytes: a window update is due
    assert a.pending
    [update] = _out_segments(a, 0.02)
    assert update[1].flags == ACK and not update[1].payload
    assert update[1].window << client._rcv_wscale >= 2000
