"""ocicrypt's AES_256_CTR_HMAC_SHA256 layer cipher and its option blobs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from trustplane.crypto.layer_cipher import (
    CIPHER,
    KEY_SIZE,
    NONCE_SIZE,
    Keystream,
    PrivateOptions,
    PublicOptions,
    check_mac,
    new_mac,
    new_nonce,
    new_symkey,
)
from trustplane.errors import IntegrityError, MalformedError

# NIST SP 800-38A, F.5.5 CTR-AES256.Encrypt
NIST_KEY = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
NIST_COUNTER = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
NIST_PLAINTEXT = bytes.fromhex(
    "6bc1bee22e409f96e93d7e117393172a"
    "ae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52ef"
    "f69f2445df4f9b17ad2b417be66c3710"
)
NIST_CIPHERTEXT = bytes.fromhex(
    "601ec313775789a5b7a7f504bbf3d228"
    "f443e3ca4d62b59aca84e990cacaf5c5"
    "2b0930daa23de94ce87017ba2d84988d"
    "dfc9c58db67aada613c2dd08457941a6"
)


def test_keystream_matches_nist_sp800_38a_f55() -> None:
    assert Keystream(NIST_KEY, NIST_COUNTER).update(NIST_PLAINTEXT) == NIST_CIPHERTEXT
    assert Keystream(NIST_KEY, NIST_COUNTER).update(NIST_CIPHERTEXT) == NIST_PLAINTEXT


def test_keystream_update_into_matches_nist_vector_in_odd_pieces() -> None:
    stream = Keystream(NIST_KEY, NIST_COUNTER)
    out = bytearray()
    for start, end in ((0, 5), (5, 21), (21, 22), (22, 64)):
        buffer = bytearray(end - start + 64)
        n = stream.update_into(memoryview(NIST_PLAINTEXT[start:end]), memoryview(buffer))
        out += buffer[:n]
    assert bytes(out) == NIST_CIPHERTEXT


def test_nonce_is_the_whole_128_bit_big_endian_counter_block() -> None:
    # With the counter at 2^128 - 1 the next block uses counter 0: the carry
    # runs through all 16 bytes (a 64-bit counter with a fixed nonce half
    # would give a different second block).
    key = bytes(range(32))
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    expected = ecb.update(b"\xff" * 16 + b"\x00" * 16) + ecb.finalize()
    assert Keystream(key, b"\xff" * 16).update(b"\x00" * 32) == expected
    # ...and a carry from the low 64 bits reaches the high half.
    nonce = bytes(7) + b"\x01" + b"\xff" * 8
    expected = (
        Cipher(algorithms.AES(key), modes.ECB())
        .encryptor()
        .update(nonce + bytes(7) + b"\x02" + bytes(8))
    )
    assert Keystream(key, nonce).update(bytes(32)) == expected


@settings(max_examples=50, deadline=None)
@given(
    key=st.binary(min_size=32, max_size=32),
    nonce=st.binary(min_size=16, max_size=16),
    data=st.binary(max_size=300),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=5),
)
def test_ctr_is_its_own_inverse_and_size_preserving(
    key: bytes, nonce: bytes, data: bytes, cuts: list[int]
) -> None:
    encrypted = Keystream(key, nonce).update(data)
    assert len(encrypted) == len(data)
    assert Keystream(key, nonce).update(encrypted) == data
    # Chunk boundaries do not matter.
    stream = Keystream(key, nonce)
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    pieces = [stream.update(data[a:b]) for a, b in itertools.pairwise(bounds)]
    assert b"".join(pieces) == encrypted


@pytest.mark.parametrize(("key", "nonce"), [(bytes(31), bytes(16)), (bytes(32), bytes(12))])
def test_keystream_rejects_wrong_sizes(key: bytes, nonce: bytes) -> None:
    with pytest.raises(MalformedError):
        Keystream(key, nonce)


def test_fresh_keys_and_nonces_have_the_right_size_and_differ() -> None:
    assert len(new_symkey()) == KEY_SIZE == 32
    assert len(new_nonce()) == NONCE_SIZE == 16
    assert new_symkey() != new_symkey()
    assert new_nonce() != new_nonce()


# RFC 4231 test cases 1 and 2 (HMAC-SHA-256)
@pytest.mark.parametrize(
    ("key", "data", "mac"),
    [
        (
            b"\x0b" * 20,
            b"Hi There",
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
        ),
        (
            b"Jefe",
            b"what do ya want for nothing?",
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
        ),
    ],
)
def test_mac_is_hmac_sha256_rfc4231(key: bytes, data: bytes, mac: str) -> None:
    h = new_mac(key)
    h.update(data[:3])
    h.update(data[3:])
    assert h.hexdigest() == mac
    check_mac(bytes.fromhex(mac), h, "layer")


def test_check_mac_rejects_any_other_value() -> None:
    h = new_mac(bytes(32))
    h.update(b"ciphertext")
    good = h.digest()
    bad = bytes([good[0] ^ 1]) + good[1:]
    with pytest.raises(IntegrityError, match="layer 3: HMAC mismatch"):
        check_mac(bad, h, "layer 3")


def test_layer_roundtrip_as_ocicrypt_does_it() -> None:
    """Encrypt, MAC the ciphertext with the symkey, then check and decrypt."""
    symkey, nonce = new_symkey(), new_nonce()
    plain = b"layer bytes " * 1000
    cipher = Keystream(symkey, nonce).update(plain)
    mac = new_mac(symkey)
    mac.update(cipher)
    public = PublicOptions.from_json(PublicOptions(hmac=mac.digest()).to_json())
    assert public.hmac == hmac.new(symkey, cipher, hashlib.sha256).digest()
    verify = new_mac(symkey)
    verify.update(cipher)
    check_mac(public.hmac, verify, "layer")
    assert Keystream(symkey, nonce).update(cipher) == plain


# -- option blobs ----------------------------------------------------------------

SYMKEY = bytes(range(32))
NONCE = bytes(range(100, 116))
DIGEST = "sha256:" + "ab" * 32


def test_private_options_json_is_byte_exact_in_ocicrypt_field_order() -> None:
    data = PrivateOptions(symkey=SYMKEY, nonce=NONCE, digest=DIGEST).to_json()
    expected = (
        '{"symkey":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",'
        f'"digest":"{DIGEST}",'
        '"cipheroptions":{"nonce":"ZGVmZ2hpamtsbW5vcHFycw=="}}'
    ).encode()
    assert data == expected
    assert list(json.loads(data)) == ["symkey", "digest", "cipheroptions"]


def test_public_options_json_is_byte_exact_in_ocicrypt_field_order() -> None:
    mac = bytes(range(200, 232))
    data = PublicOptions(hmac=mac).to_json()
    expected = (
        '{"cipher":"AES_256_CTR_HMAC_SHA256",'
        f'"hmac":"{base64.b64encode(mac).decode()}",'
        '"cipheroptions":{}}'
    ).encode()
    assert data == expected
    assert PublicOptions.from_json(data) == PublicOptions(hmac=mac, cipher=CIPHER)


def test_private_options_roundtrip_and_reads_go_output() -> None:
    options = PrivateOptions(symkey=SYMKEY, nonce=NONCE, digest="sha512:" + "0" * 128)
    assert PrivateOptions.from_json(options.to_json()) == options
    # What Go's json.Marshal of ocicrypt's struct gives, including a foreign
    # field we do not know: read, not refused.
    go = (
        b'{"symkey":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=","digest":"'
        + DIGEST.encode()
        + b'","cipheroptions":{"nonce":"ZGVmZ2hpamtsbW5vcHFycw=="},"extra":1}'
    )
    parsed = PrivateOptions.from_json(go)
    assert (parsed.symkey, parsed.nonce, parsed.digest) == (SYMKEY, NONCE, DIGEST)


def _private(**changes: object) -> bytes:
    doc: dict[str, object] = json.loads(PrivateOptions(SYMKEY, NONCE, DIGEST).to_json())
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        _private(cipheroptions=None),
        _private(cipheroptions={}),
        _private(symkey=None),
        _private(symkey="!!notbase64!!"),
        _private(symkey=base64.b64encode(bytes(16)).decode()),
        _private(cipheroptions={"nonce": base64.b64encode(bytes(8)).decode()}),
        _private(digest="sha256:abc"),
        _private(digest="md5:" + "0" * 32),
        _private(digest="sha256:" + "AB" * 32),
        _private(digest=7),
    ],
)
def test_private_options_reject_malformed_input(data: bytes) -> None:
    with pytest.raises(MalformedError) as info:
        PrivateOptions.from_json(data)
    assert "\n" not in str(info.value)
    assert base64.b64encode(SYMKEY).decode() not in str(info.value)  # no secrets in messages


@pytest.mark.parametrize(
    "doc",
    [
        {"cipher": "AES_128_GCM", "hmac": base64.b64encode(bytes(32)).decode()},
        {"hmac": base64.b64encode(bytes(32)).decode()},
        {"cipher": CIPHER},
        {"cipher": CIPHER, "hmac": base64.b64encode(bytes(31)).decode()},
        {"cipher": CIPHER, "hmac": "***"},
        [],
    ],
)
def test_public_options_reject_malformed_input(doc: object) -> None:
    with pytest.raises(MalformedError):
        PublicOptions.from_json(json.dumps(doc).encode())
