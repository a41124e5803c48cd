"""Known-answer and cross-check tests for mitm_wg.wireguard.crypto."""

from __future__ import annotations

import hashlib
import hmac as std_hmac

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st

from mitm_wg.config import WireGuardConfig
from mitm_wg.wireguard import crypto
from mitm_wg.wireguard.messages import TRANSPORT_HEADER

H = bytes.fromhex

# --- hashes, HMAC, KDF --------------------------------------------------------------------------


def test_hash_rfc7693_abc() -> None:
    # RFC 7693 Appendix B: BLAKE2s-256("abc")
    assert crypto.hash_(b"abc") == H(
        "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982"
    )


def test_hash_wireguard_initial_chaining_key_and_hash() -> None:
    # The constants every WireGuard implementation starts the handshake from.
    ck = crypto.hash_(b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s")
    assert ck == H("60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36")
    h = crypto.hash_(ck + b"WireGuard v1 zx2c4 Jason@zx2c4.com")
    assert h == H("2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3")


def test_mac_is_keyed_blake2s_16() -> None:
    key = bytes(range(32))
    out = crypto.mac(key, b"hello")
    assert len(out) == 16
    assert out == hashlib.blake2s(b"hello", key=key, digest_size=16).digest()
    # A 16-byte keyed digest is not a truncated 32-byte one (digest size is in the parameter block).
    assert out != hashlib.blake2s(b"hello", key=key).digest()[:16]
    assert crypto.mac(bytes(32), b"hello") != out


@pytest.mark.parametrize("key_len", [0, 1, 16, 32, 63, 64, 65, 100])
@pytest.mark.parametrize("data", [b"", b"\x01", b"x" * 200])
def test_hmac_matches_stdlib(key_len: int, data: bytes) -> None:
    key = bytes((i * 7 + 3) & 0xFF for i in range(key_len))
    expected = std_hmac.new(key, data, hashlib.blake2s).digest()
    assert crypto.hmac(key, data) == expected


@given(st.binary(max_size=130), st.binary(max_size=300))
def test_hmac_matches_stdlib_property(key: bytes, data: bytes) -> None:
    assert crypto.hmac(key, data) == std_hmac.new(key, data, hashlib.blake2s).digest()


def _ref_hmac(key: bytes, data: bytes) -> bytes:
    return std_hmac.new(key, data, hashlib.blake2s).digest()


def test_kdf_matches_whitepaper_definition() -> None:
    key = H("60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36")
    data = bytes(range(10))
    t0 = _ref_hmac(key, data)
    t1 = _ref_hmac(t0, b"\x01")
    t2 = _ref_hmac(t0, t1 + b"\x02")
    t3 = _ref_hmac(t0, t2 + b"\x03")
    assert crypto.kdf1(key, data) == t1
    assert crypto.kdf2(key, data) == (t1, t2)
    assert crypto.kdf3(key, data) == (t1, t2, t3)
    assert len({t1, t2, t3}) == 3


# --- X25519 -------------------------------------------------------------------------------------

ALICE_PRIV = H("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUB = H("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_PRIV = H("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUB = H("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = H("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_x25519_rfc7748_6_1() -> None:
    assert crypto.dh_public(ALICE_PRIV) == ALICE_PUB
    assert crypto.dh_public(BOB_PRIV) == BOB_PUB
    assert crypto.dh(ALICE_PRIV, BOB_PUB) == SHARED
    assert crypto.dh(BOB_PRIV, ALICE_PUB) == SHARED


@pytest.mark.parametrize(
    "low_order",
    [bytes(32), b"\x01" + bytes(31)],  # u = 0 and u = 1 are low-order points
)
def test_x25519_rejects_all_zero_result(low_order: bytes) -> None:
    with pytest.raises(ValueError) as exc:
        crypto.dh(ALICE_PRIV, low_order)
    assert ALICE_PRIV.hex() not in str(exc.value)


def test_x25519_rejects_wrong_length() -> None:
    with pytest.raises(ValueError):
        crypto.dh(ALICE_PRIV, BOB_PUB[:31])
    with pytest.raises(ValueError):
        crypto.dh_public(ALICE_PRIV[:31])


def test_dh_generate_deterministic_and_clamped() -> None:
    raw = bytes(range(0xE0, 0x100))  # first byte 0xE0 has low bits clear; last byte 0xFF
    priv, pub = crypto.dh_generate(lambda n: raw[:n])
    assert len(priv) == len(pub) == 32
    assert priv[0] & 7 == 0
    assert priv[31] & 0x80 == 0 and priv[31] & 0x40
    assert priv[1:31] == raw[1:31]
    assert pub == crypto.dh_public(priv)
    # X25519 clamps internally too, so the public key equals that of the raw bytes.
    assert pub == crypto.dh_public(raw)
    a_priv, a_pub = crypto.dh_generate()
    b_priv, b_pub = crypto.dh_generate()
    assert a_priv != b_priv
    assert crypto.dh(a_priv, b_pub) == crypto.dh(b_priv, a_pub)


# --- ChaCha20-Poly1305 with WireGuard's nonce ---------------------------------------------------

# RFC 8439 §A.5: its nonce 00000000 0102030405060708 already has WireGuard's layout, so it is a
# direct known-answer test with counter = 0x0807060504030201 (little-endian of 01..08).
A5_KEY = H("1c9240a5eb55d38af333888604f6b5f0473917c1402b80099dca5cbc207075c0")
A5_COUNTER = 0x0807060504030201
A5_AAD = H("f33388860000000000004e91")
A5_CT = H(
    "64a0861575861af460f062c79be643bd5e805cfd345cf389f108670ac76c8cb2"
    "4c6cfc18755d43eea09ee94e382d26b0bdb7b73c321b0100d4f03b7f355894cf"
    "332f830e710b97ce98c8a84abd0b948114ad176e008d33bd60f982b1ff37c855"
    "9797a06ef4f0ef61c186324e2b3506383606907b6a7c02b0f9f6157b53c867e4"
    "b9166c767b804d46a59b5216cde7a4e99040c5a40433225ee282a1b0a06c523e"
    "af4534d7f83fa1155b0047718cbc546a0d072b04b3564eea1b422273f548271a"
    "0bb2316053fa76991955ebd63159434ecebb4e466dae5a1073a6727627097a10"
    "49e617d91d361094fa68f0ff77987130305beaba2eda04df997b714d6c6f2c29"
    "a6ad5cb4022b02709b"
)
A5_TAG = H("eead9d67890cbb22392336fea1851f38")
A5_PT = (
    "Internet-Drafts are draft documents valid for a maximum of six months and may be "
    "updated, replaced, or obsoleted by other documents at any time. It is inappropriate to "
    "use Internet-Drafts as reference material or to cite them other than as "
    "/\u201cwork in progress./\u201d"
).encode()


def test_aead_rfc8439_a5_known_answer() -> None:
    aead = crypto.Aead(A5_KEY)
    assert aead.open(A5_COUNTER, A5_CT + A5_TAG, A5_AAD) == A5_PT
    assert aead.seal(A5_COUNTER, A5_PT, A5_AAD) == A5_CT + A5_TAG
    assert crypto.aead_seal(A5_KEY, A5_COUNTER, A5_PT, A5_AAD) == A5_CT + A5_TAG
    assert crypto.aead_open(A5_KEY, A5_COUNTER, A5_CT + A5_TAG, A5_AAD) == A5_PT


def test_aead_nonce_layout_matches_explicit_nonce() -> None:
    key = bytes(range(32))
    aead = crypto.Aead(key)
    ref = ChaCha20Poly1305(key)
    for counter in (0, 1, 255, 256, 2**32, 2**63 + 5, 2**64 - 1):
        nonce = b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")
        sealed = aead.seal(counter, b"payload", b"ad")
        assert sealed == ref.encrypt(nonce, b"payload", b"ad")
        assert aead.open(counter, sealed, b"ad") == b"payload"


BACKENDS = pytest.mark.parametrize("fast", [True, False], ids=["aioquic", "cryptography"])


@BACKENDS
def test_aead_empty_plaintext_is_keepalive_tag_only(fast: bool) -> None:
    aead = crypto.Aead(bytes(32), fast=fast)
    sealed = aead.seal(7, b"")
    assert len(sealed) == 16
    assert aead.open(7, sealed) == b""
    header = TRANSPORT_HEADER.pack(4, 1, 7)
    message = aead.seal_message(header, b"")  # a keepalive
    assert message == header + sealed
    assert aead.open_message(message) == b""


def test_aead_open_failures_return_none() -> None:
    aead = crypto.Aead(A5_KEY)
    good = A5_CT + A5_TAG
    assert aead.open(A5_COUNTER + 1, good, A5_AAD) is None  # wrong counter
    assert aead.open(A5_COUNTER, good, b"") is None  # wrong aad
    flipped = bytearray(good)
    flipped[10] ^= 1
    assert aead.open(A5_COUNTER, bytes(flipped), A5_AAD) is None
    assert aead.open(A5_COUNTER, good[:15], A5_AAD) is None  # shorter than a tag
    assert aead.open(A5_COUNTER, b"", A5_AAD) is None
    assert crypto.Aead(bytes(32)).open(A5_COUNTER, good, A5_AAD) is None  # wrong key


def test_aead_open_failures_without_aad_return_none() -> None:
    """Without AAD through seal/open (`cryptography`; the transport messages' own, through
    either backend: test_aead_open_message_refuses_what_does_not_authenticate)."""
    aead = crypto.Aead(A5_KEY)
    good = aead.seal(9, A5_PT)
    assert aead.open(9, good) == A5_PT
    assert aead.open(10, good) is None  # wrong counter
    assert aead.open(9, good, b"ad") is None  # AAD it was not sealed with
    for i in (0, len(good) // 2, len(good) - 1):  # ciphertext and tag
        flipped = bytearray(good)
        flipped[i] ^= 0x80
        assert aead.open(9, bytes(flipped)) is None
        assert aead.open(9, good) == A5_PT  # the object is sound after a failure
    assert aead.open(9, good[:15]) is None
    assert aead.open(9, b"") is None
    assert crypto.Aead(bytes(32)).open(9, good) is None  # wrong key


def test_aead_accepts_memoryview() -> None:
    aead = crypto.Aead(A5_KEY)
    packet = b"\x04\x00\x00\x00" + A5_CT + A5_TAG
    assert aead.open(A5_COUNTER, memoryview(packet)[4:], A5_AAD) == A5_PT
    sealed = b"\x04\x00\x00\x00" + aead.seal(5, A5_PT)
    assert aead.open(5, memoryview(sealed)[4:]) == A5_PT


@BACKENDS
def test_aead_caller_mistakes_raise(fast: bool) -> None:
    with pytest.raises(ValueError):
        crypto.Aead(bytes(31), fast=fast)
    aead = crypto.Aead(bytes(32), fast=fast)
    with pytest.raises(ValueError):
        aead.seal(2**64, b"x")
    with pytest.raises(ValueError):
        aead.seal(-1, b"x")
    with pytest.raises(ValueError):
        aead.open(-1, b"x" * 16)
    with pytest.raises(ValueError):
        aead.open(2**64, b"x" * 16)
    assert "00" not in repr(aead)


@BACKENDS
@given(
    index=st.integers(min_value=0, max_value=2**32 - 1),
    counter=st.integers(min_value=0, max_value=2**64 - 1),
    plaintext=st.binary(max_size=1600),
)
def test_aead_message_methods_are_header_plus_seal_and_open(
    fast: bool, index: int, counter: int, plaintext: bytes
) -> None:
    """seal_message/open_message (one call per transport message, the counter taken from
    the header's bytes) give exactly header || seal(counter, ...) and open it back, as bytes
    or as a view of a longer buffer (a GRO run), on both sides of the 1484-byte limit."""
    aead = crypto.Aead(A5_KEY, fast=fast)
    header = TRANSPORT_HEADER.pack(4, index, counter)
    message = aead.seal_message(header, plaintext)
    assert message == header + crypto.Aead(A5_KEY, fast=False).seal(counter, plaintext)
    assert aead.open_message(message) == plaintext
    run = b"x" * 7 + message + b"y" * 5
    assert aead.open_message(memoryview(run)[7 : 7 + len(message)]) == plaintext


@BACKENDS
def test_aead_open_message_refuses_what_does_not_authenticate(fast: bool) -> None:
    aead = crypto.Aead(A5_KEY, fast=fast)
    message = aead.seal_message(TRANSPORT_HEADER.pack(4, 1, 9), A5_PT)
    assert aead.open_message(message) == A5_PT
    # another counter in the header (the nonce comes from it), a flipped bit anywhere in
    # ciphertext or tag, a message cut to its header or to less than a tag
    other = TRANSPORT_HEADER.pack(4, 1, 10) + message[16:]
    assert aead.open_message(other) is None
    for i in (16, len(message) // 2, len(message) - 1):
        flipped = bytearray(message)
        flipped[i] ^= 0x80
        assert aead.open_message(bytes(flipped)) is None
        assert aead.open_message(message) == A5_PT  # the object is sound after a failure
    assert aead.open_message(message[:16]) is None
    assert aead.open_message(message[:31]) is None
    assert crypto.Aead(bytes(32), fast=fast).open_message(message) is None  # wrong key


# --- the fast backend (aioquic's AEAD) -----------------------------------------------------------


def test_fast_aead_is_used_where_mitmproxy_runs() -> None:
    """Both CI platforms install mitmproxy, which brings aioquic: there the transport path
    must be the fast one (a failed known-answer check would silently cost ~3 µs a packet)."""
    pytest.importorskip("mitmproxy")
    assert crypto.fast_aead_available()
    assert crypto.Aead(bytes(32))._fast is not None
    assert crypto.Aead(bytes(32), fast=False)._fast is None


@given(
    key=st.binary(min_size=32, max_size=32),
    counter=st.integers(min_value=0, max_value=2**64 - 1),
    plaintext=st.binary(max_size=1600),
)
def test_fast_aead_gives_the_same_bytes_as_cryptography(
    key: bytes, counter: int, plaintext: bytes
) -> None:
    """Any key, counter and size (both sides of the 1484-byte limit): the same transport
    message, and each opens the other's."""
    fast, ref = crypto.Aead(key), crypto.Aead(key, fast=False)
    header = TRANSPORT_HEADER.pack(4, 1, counter)
    sealed = ref.seal_message(header, plaintext)
    assert sealed == header + ref.seal(counter, plaintext)
    assert fast.seal_message(header, plaintext) == sealed
    assert fast.open_message(sealed) == plaintext
    assert ref.open_message(fast.seal_message(header, plaintext)) == plaintext


def test_fast_aead_never_gets_a_plaintext_past_its_buffer() -> None:
    """aioquic 1.2 lets a 1485-1500 byte plaintext run its tag past its 1500-byte buffer and
    corrupts the object. Those sizes must go through cryptography: sealing them leaves the
    fast object giving the right answers (a wrong route fails the last assertion)."""
    key = bytes(range(32))
    fast, ref = crypto.Aead(key), crypto.Aead(key, fast=False)
    assert crypto.FAST_AEAD_MAX_PLAINTEXT == 1484
    small = b"after the large ones"
    for size in range(1480, 1505):
        plaintext = bytes([size & 0xFF]) * size
        header = TRANSPORT_HEADER.pack(4, 1, size)
        assert fast.seal_message(header, plaintext) == header + ref.seal(size, plaintext)
        assert fast.open_message(header + ref.seal(size, plaintext)) == plaintext
    header = TRANSPORT_HEADER.pack(4, 1, 1)
    assert fast.seal_message(header, small) == header + ref.seal(1, small)
    assert fast.open_message(header + ref.seal(1, small)) == small


def test_a_backend_with_other_answers_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The known-answer check refuses a backend that seals differently, opens a forged
    message, or has another API; MITM_WG_AEAD=cryptography turns the fast backend off."""

    class CryptoError(Exception):
        pass

    def backend(encrypt=None, decrypt=None):
        class Fake:
            def __init__(self, name: bytes, key: bytes, iv: bytes) -> None:
                self.ref = ChaCha20Poly1305(key)

            def _nonce(self, pn: int) -> bytes:
                return bytes(4) + pn.to_bytes(8, "big")

            def encrypt(self, data: bytes, aad: bytes, pn: int) -> bytes:
                out = self.ref.encrypt(self._nonce(pn), data, None)
                return encrypt(out) if encrypt else out

            def decrypt(self, data: bytes, aad: bytes, pn: int) -> bytes:
                if decrypt:
                    return decrypt(data)
                try:
                    return self.ref.decrypt(self._nonce(pn), data, None)
                except Exception:
                    raise CryptoError from None

        return Fake

    crypto._known_answers(backend(), CryptoError)  # the honest double passes
    with pytest.raises(ValueError):
        crypto._known_answers(backend(encrypt=lambda out: out[:-1] + b"\x00"), CryptoError)
    with pytest.raises(ValueError):
        crypto._known_answers(backend(decrypt=lambda data: data[:-16]), CryptoError)  # no check
    with pytest.raises(AttributeError):
        crypto._known_answers(lambda *a: object(), CryptoError)  # another API
    monkeypatch.setenv("MITM_WG_AEAD", "cryptography")
    assert crypto._load_fast_aead()[0] is None
    monkeypatch.delenv("MITM_WG_AEAD")
    assert (crypto._load_fast_aead()[0] is not None) == crypto.fast_aead_available()


# --- HChaCha20 / XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha-03) --------------------------------


def test_hchacha20_draft_2_2_1() -> None:
    key = bytes(range(32))
    nonce = H("000000090000004a0000000031415927")
    assert crypto.hchacha20(key, nonce) == H(
        "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
    )


X_KEY = bytes(range(0x80, 0xA0))
X_NONCE = bytes(range(0x40, 0x58))
X_AAD = H("50515253c0c1c2c3c4c5c6c7")
X_PT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the "
    b"future, sunscreen would be it."
)
X_CT = H(
    "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
    "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
    "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
    "21f9664c97637da9768812f615c68b13b52e"
)
X_TAG = H("c0875924c1c7987947deafd8780acf49")


def test_xchacha20_poly1305_draft_a_3_1() -> None:
    assert crypto.xaead_seal(X_KEY, X_NONCE, X_PT, X_AAD) == X_CT + X_TAG
    assert crypto.xaead_open(X_KEY, X_NONCE, X_CT + X_TAG, X_AAD) == X_PT
    assert crypto.xaead_open(X_KEY, X_NONCE, memoryview(X_CT + X_TAG), X_AAD) == X_PT


def test_xchacha20_poly1305_failures() -> None:
    sealed = X_CT + X_TAG
    assert crypto.xaead_open(X_KEY, X_NONCE, sealed, b"") is None
    other_nonce = bytes([X_NONCE[0] ^ 1]) + X_NONCE[1:]
    assert crypto.xaead_open(X_KEY, other_nonce, sealed, X_AAD) is None
    other_tail = X_NONCE[:23] + bytes([X_NONCE[23] ^ 1])
    assert crypto.xaead_open(X_KEY, other_tail, sealed, X_AAD) is None
    assert crypto.xaead_open(X_KEY, X_NONCE, sealed[:-1] + b"\x00", X_AAD) is None
    assert crypto.xaead_open(X_KEY, X_NONCE, b"short", X_AAD) is None
    with pytest.raises(ValueError):
        crypto.xaead_seal(X_KEY, X_NONCE[:23], b"", b"")
    with pytest.raises(ValueError):
        crypto.hchacha20(X_KEY, X_NONCE[:15])


# --- TAI64N -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unix", "expected"),
    [
        # 1970-01-01 00:00:00 UTC is TAI64 label 400000000000000a: the base of wireguard-go's
        # tai64n.go (0x400000000000000a), Linux's and boringtun's.
        (0.0, "400000000000000a00000000"),
        (1.5, "400000000000000b1dcd6500"),
        # 2023-11-14 22:13:20.25 UTC: 1_700_000_000 + 10 = 0x6553f10a.
        (1_700_000_000.25, "400000006553f10a0ee6b280"),
    ],
)
def test_tai64n(unix: float, expected: str) -> None:
    assert crypto.tai64n(unix) == H(expected)


def test_tai64n_is_monotonic_bytewise() -> None:
    times = [1_700_000_000.0, 1_700_000_000.001, 1_700_000_000.5, 1_700_000_001.0, 1_800_000_000.0]
    stamps = [crypto.tai64n(t) for t in times]
    assert all(len(s) == 12 for s in stamps)
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == len(stamps)


def test_key_text_clamping_and_derivation_live_in_keys_only() -> None:
    # Issue 11: clamping, public-key derivation and the base64 form are written once, in
    # mitm_wg/keys.py; everything else (config, core, CLI, demo) calls it.
    import re
    from pathlib import Path

    import mitm_wg

    own = re.compile(r"b64encode|b64decode|& 248\b|\) \| 64\b|\.public_key\(\)\.public_bytes")
    root = Path(mitm_wg.__file__).parent
    found = [
        f"{path.relative_to(root)}:{n}"
        for path in sorted(root.rglob("*.py"))
        if path.name != "keys.py" or path.parent != root
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if own.search(line)
    ]
    assert not found, found


def test_peer_and_device_show_keys_as_keys_module_does() -> None:
    from mitm_wg.keys import encode_key
    from mitm_wg.wireguard.device import Device

    config = WireGuardConfig.parse(
        "[Interface]\nPrivateKey = "
        + encode_key(bytes(range(32)))
        + "\nAddress = 10.0.0.1/32\n[Peer]\nPublicKey = "
        + encode_key(bytes(range(1, 33)))
        + "\nAllowedIPs = 10.0.0.2/32\n"
    )
    device = Device.from_config(config)
    assert device.public_key_b64 == encode_key(device.public_key) == config.public_key_b64
    (peer,) = device.peers.values()
    assert peer.public_key_b64 == encode_key(bytes(range(1, 33)))
