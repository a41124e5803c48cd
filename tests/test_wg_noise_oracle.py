"""Cross-check our handshake against an independent Noise implementation.

The `noiseprotocol` package implements Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s from the Noise
specification; WireGuard is exactly that pattern with its identifier string as prologue.  We
wrap noiseprotocol's handshake payloads in WireGuard's headers and macs and make it talk to
our Device in both roles, then exchange transport data.
"""

from __future__ import annotations

import struct

import pytest
from noise.connection import Keypair, NoiseConnection

from mitm_wg.wireguard import crypto
from mitm_wg.wireguard.handshake import IDENTIFIER, LABEL_MAC1
from tests.wgpair import A_ADDR, B_ADDR, Pair, ipv4_udp

NOISE_NAME = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
SOURCE = ("127.0.0.1", 50000)


def noise(initiator: bool, private: bytes, remote_public: bytes | None, psk: bytes):
    conn = NoiseConnection.from_name(NOISE_NAME)
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    conn.set_prologue(IDENTIFIER)
    conn.set_psks(psk)
    conn.set_keypair_from_private_bytes(Keypair.STATIC, private)
    if remote_public is not None:
        conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, remote_public)
    conn.start_handshake()
    return conn


def with_macs(body: bytes, receiver_public: bytes) -> bytes:
    mac1 = crypto.mac(crypto.hash_(LABEL_MAC1 + receiver_public), body)
    return body + mac1 + bytes(16)


@pytest.mark.parametrize("psk", [bytes(32), bytes(range(32))])
def test_noise_initiator_to_our_responder(psk: bytes) -> None:
    p = Pair.create(psk_a=psk, psk_b=psk)
    a_private = crypto.dh_generate(lambda n: bytes([7]) * n)[0]
    # Replace B's view of A with the key the oracle uses.
    p.b.remove_peer(p.a.public_key)
    peer = p.b.add_peer(
        crypto.dh_public(a_private),
        preshared_key=psk,
        allowed_ips=p.b_peer.allowed_ips,
    )
    oracle = noise(True, a_private, p.b.public_key, psk)
    timestamp = crypto.tai64n(1.8e9)
    payload = bytes(oracle.write_message(timestamp))
    assert len(payload) == 32 + 48 + 28
    sender_index = 0x11223344
    initiation = with_macs(struct.pack("<II", 1, sender_index) + payload, p.b.public_key)
    out: list = []
    packets: list = []
    p.b.receive_datagram(initiation, SOURCE, 1.0, out, packets)
    assert len(out) == 1
    response, dest = out[0]
    assert dest == SOURCE
    mtype, b_index, receiver = struct.unpack_from("<III", response)
    assert (mtype, receiver) == (2, sender_index)
    # mac1 over the response is keyed with the initiator's public key.
    assert response[60:76] == crypto.mac(
        crypto.hash_(LABEL_MAC1 + crypto.dh_public(a_private)), response[:60]
    )
    assert bytes(oracle.read_message(response[12:60])) == b""
    assert oracle.handshake_finished

    # Transport: the oracle encrypts with nonce 0, as our receiver expects for counter 0.
    packet = ipv4_udp(A_ADDR, B_ADDR, b"from the oracle")
    datagram = struct.pack("<IIQ", 4, b_index, 0) + bytes(oracle.encrypt(packet))
    p.b.receive_datagram(datagram, SOURCE, 1.1, out, packets)
    assert packets == [packet]
    assert peer.current is not None

    reply = ipv4_udp(B_ADDR, A_ADDR, b"x" * 16)  # 44 bytes: padded to 48
    out.clear()
    assert p.b.send_packet(reply, 1.2, out)
    ((datagram, _),) = out
    mtype, receiver, counter = struct.unpack_from("<IIQ", datagram)
    assert (mtype, receiver, counter) == (4, sender_index, 0)
    plaintext = bytes(oracle.decrypt(datagram[16:]))
    assert plaintext == reply + bytes(4)


@pytest.mark.parametrize("psk", [bytes(32), b"\x42" * 32])
def test_our_initiator_to_noise_responder(psk: bytes) -> None:
    p = Pair.create(psk_a=psk)
    b_private = crypto.dh_generate(lambda n: bytes([9]) * n)[0]
    p.a.remove_peer(p.a_peer.public_key)
    peer = p.a.add_peer(
        crypto.dh_public(b_private),
        preshared_key=psk,
        allowed_ips=p.a_peer.allowed_ips,
        endpoint=SOURCE,
    )
    out: list = []
    packet = ipv4_udp(A_ADDR, B_ADDR, b"to the oracle")
    p.a.send_packet(packet, 5.0, out)
    ((initiation, dest),) = out
    assert dest == SOURCE and len(initiation) == 148
    assert initiation[116:132] == crypto.mac(
        crypto.hash_(LABEL_MAC1 + crypto.dh_public(b_private)), initiation[:116]
    )
    assert initiation[132:148] == bytes(16)  # no cookie: mac2 is zero
    oracle = noise(False, b_private, None, psk)
    timestamp = bytes(oracle.read_message(initiation[8:116]))
    assert len(timestamp) == 12
    seconds = int.from_bytes(timestamp[:8], "big") - ((1 << 62) + 10)
    assert abs(seconds - (1.7e9 + 5.0)) < 2  # unix_time_offset + now
    a_index = struct.unpack_from("<I", initiation, 4)[0]
    body = struct.pack("<III", 2, 0x55667788, a_index) + bytes(oracle.write_message(b""))
    out.clear()
    packets: list = []
    p.a.receive_datagram(with_macs(body, p.a.public_key), SOURCE, 5.1, out, packets)
    assert peer.current is not None
    ((datagram, _),) = out
    mtype, receiver, counter = struct.unpack_from("<IIQ", datagram)
    assert (mtype, receiver, counter) == (4, 0x55667788, 0)
    assert bytes(oracle.decrypt(datagram[16:])) == packet + bytes(-len(packet) % 16)
    back = ipv4_udp(B_ADDR, A_ADDR, b"answer")
    reply = struct.pack("<IIQ", 4, a_index, 0) + bytes(oracle.encrypt(back))
    p.a.receive_datagram(reply, SOURCE, 5.2, out, packets)
    assert packets == [back]


def test_tampered_oracle_initiation_rejected() -> None:
    p = Pair.create()
    oracle = noise(True, crypto.dh_generate()[0], p.b.public_key, bytes(32))
    payload = bytearray(oracle.write_message(crypto.tai64n(1.8e9)))
    payload[40] ^= 1  # inside the encrypted static key
    initiation = with_macs(struct.pack("<II", 1, 1) + bytes(payload), p.b.public_key)
    out: list = []
    p.b.receive_datagram(initiation, SOURCE, 1.0, out, [])
    assert out == []
    assert p.b.drops["initiation_decrypt"] == 1
