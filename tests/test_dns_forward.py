"""Resolver.forward: a client's raw DNS query through the tunnel's servers (scripted servers).

The in-memory servers and transport come from tests/test_dns.py; every test runs on trio's
MockClock with autojump, so timeouts take no real time.
"""

from __future__ import annotations

import socket

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trio
import trio.testing
from test_dns import (
    S1,
    S2,
    FakeNet,
    Reply,
    big_zone,
    drop,
    example_zone,
    rcode_reply,
    resolver,
    truncating,
    wrong_id,
    wrong_source_address,
)


def records(query: dns.message.Message, via: str) -> Reply:
    """Answers any type with one record of that type (TXT, MX, SRV, CAA...)."""
    response = dns.message.make_response(query)
    response.flags |= dns.flags.RA
    q = query.question[0]
    text = {
        dns.rdatatype.TXT: '"tunnel only"',
        dns.rdatatype.MX: "10 mail.example.",
        dns.rdatatype.SRV: "0 5 443 svc.example.",
        dns.rdatatype.CAA: '0 issue "ca.example"',
        dns.rdatatype.A: "10.64.9.9",
    }[q.rdtype]
    response.answer.append(dns.rrset.from_text(q.name, 60, "IN", q.rdtype, text))
    return response


def client_query(name: str, rdtype: str, *, qid: int = 0x1234, **kw: object) -> bytes:
    query = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    query.id = qid
    return query.to_wire()


@pytest.mark.parametrize("rdtype", ["TXT", "MX", "SRV", "CAA", "A"])
async def test_every_record_type_passes_through(
    rdtype: str, autojump_clock: trio.testing.MockClock
) -> None:
    net = FakeNet({S1: records})
    r = resolver(net, randbytes=lambda n: b"\xbe\xef")
    wire = client_query("www.example", rdtype, qid=0x1234)
    out = await r.forward(wire)
    reply = dns.message.from_wire(out)
    # the client's id comes back; the server saw a fresh one (RFC 5452 section 9.2)
    assert reply.id == 0x1234 and [s.id for s in net.sent] == [0xBEEF]
    assert reply.rcode() == dns.rcode.NOERROR
    assert [(rrset.rdtype, len(rrset)) for rrset in reply.answer] == [
        (dns.rdatatype.from_text(rdtype), 1)
    ]
    # the bytes are the server's own, only the id differs
    direct = records(dns.message.from_wire(wire), "udp")
    assert isinstance(direct, dns.message.Message)
    assert out[2:] == direct.to_wire(max_size=65535, want_shuffle=False)[2:]


async def test_query_is_sent_unchanged_except_its_id(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[bytes] = []

    def capture(query: dns.message.Message, via: str) -> Reply:
        seen.append(query.to_wire())
        return records(query, via)

    net = FakeNet({S1: capture})
    r = resolver(net, randbytes=lambda n: b"\x00\x07")
    option = dns.edns.ECSOption("192.0.2.0", 24)
    wire = client_query("www.example", "TXT", use_edns=0, payload=4096, options=[option])
    await r.forward(wire)
    sent = dns.message.from_wire(seen[0])
    original = dns.message.from_wire(wire)
    assert sent.id == 7
    assert (sent.flags, sent.question, sent.edns, sent.payload, sent.options) == (
        original.flags,
        original.question,
        original.edns,
        original.payload,
        original.options,
    )


async def test_each_forward_gets_a_fresh_id(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({S1: records})
    r = resolver(net)
    for _ in range(8):
        await r.forward(client_query("www.example", "TXT", qid=1))
    assert len({s.id for s in net.sent}) > 1
    assert len(net.sockets) == 8 and all(s.closed for s in net.sockets)


async def test_nxdomain_is_an_answer(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({S1: example_zone(), S2: records})
    r = resolver(net, servers=[S1, S2])
    reply = dns.message.from_wire(await r.forward(client_query("nope.example", "A")))
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert [s.server for s in net.sent] == [S1]  # not asked elsewhere


async def test_timeout_moves_on_to_the_next_server(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({S1: drop, S2: records})
    r = resolver(net, servers=[S1, S2], timeout=2)
    start = trio.current_time()
    reply = dns.message.from_wire(await r.forward(client_query("www.example", "MX")))
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer
    assert trio.current_time() - start == pytest.approx(2)
    # the server that answered is asked first next time
    net.sent.clear()
    await r.forward(client_query("www.example", "MX"))
    assert [s.server for s in net.sent] == [S2]


async def test_no_answer_anywhere_raises_eai_again(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({S1: drop, S2: drop})
    r = resolver(net, servers=[S1, S2], timeout=2, attempts=2)
    with pytest.raises(socket.gaierror) as info:
        await r.forward(client_query("www.example", "TXT"))
    assert info.value.errno == socket.EAI_AGAIN
    assert "10.64.0.1" in str(info.value) and "10.64.0.2" in str(info.value)
    assert "TXT" in str(info.value)
    assert len(net.sent) == 4


async def test_refused_moves_on_and_is_passed_on_when_everyone_refuses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNet({S1: rcode_reply(dns.rcode.REFUSED), S2: records})
    r = resolver(net, servers=[S1, S2])
    reply = dns.message.from_wire(await r.forward(client_query("www.example", "TXT")))
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer

    net = FakeNet({S1: rcode_reply(dns.rcode.REFUSED), S2: rcode_reply(dns.rcode.SERVFAIL)})
    r = resolver(net, servers=[S1, S2], attempts=3)
    reply = dns.message.from_wire(await r.forward(client_query("www.example", "TXT", qid=9)))
    assert reply.id == 9 and reply.rcode() == dns.rcode.SERVFAIL
    # every server answered: no second round
    assert [s.server for s in net.sent] == [S1, S2]


async def test_truncated_reply_goes_to_a_udp_client_as_it_is(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNet({S1: truncating(big_zone())})
    r = resolver(net)
    reply = dns.message.from_wire(await r.forward(client_query("big.example", "A")))
    assert reply.flags & dns.flags.TC
    assert [s.via for s in net.sent] == ["udp"]


async def test_tcp_client_gets_the_whole_answer_over_tcp(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNet({S1: truncating(big_zone())})
    r = resolver(net)
    out = await r.forward(client_query("big.example", "A", qid=77), tcp=True)
    reply = dns.message.from_wire(out)
    assert reply.id == 77 and not reply.flags & dns.flags.TC
    assert sum(len(rrset) for rrset in reply.answer) == 120
    assert [s.via for s in net.sent] == ["udp", "tcp"] and r.tcp_fallbacks == 1


async def test_forged_replies_are_ignored(autojump_clock: trio.testing.MockClock) -> None:
    def spoofed(query: dns.message.Message, via: str) -> Reply:
        good = records(query, via)
        assert isinstance(good, dns.message.Message)
        return [
            wrong_id(query),
            wrong_source_address(query),
            (good.to_wire(), ("10.64.0.1", 53)),
        ]

    net = FakeNet({S1: spoofed})
    r = resolver(net)
    reply = dns.message.from_wire(await r.forward(client_query("www.example", "TXT")))
    assert reply.answer and r.mismatched_replies == 2


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"\x12\x34",
        b"\x00" * 11,
        dns.message.make_response(dns.message.make_query("www.example", "A")).to_wire(),
    ],
)
async def test_not_a_query_is_a_value_error(
    wire: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    net = FakeNet({S1: records})
    with pytest.raises(ValueError):
        await resolver(net).forward(wire)
    assert net.sent == []
