"""The one-way layer-key chain is standard HKDF-SHA256 with the index bound in."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from trustplane.crypto.key_chain import chain_below, derive_lower, new_chain

INFO = b"trustplane layer-key chain v1"


def reference_hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 section 2, written out with hmac only."""
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def test_reference_hkdf_matches_rfc5869_test_case_1() -> None:
    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    okm = bytes.fromhex(
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )
    assert reference_hkdf(ikm, salt, info, 42) == okm
    derived = HKDF(algorithm=hashes.SHA256(), length=42, salt=salt, info=info).derive(ikm)
    assert derived == okm


def test_reference_hkdf_matches_rfc5869_test_case_3_without_salt() -> None:
    ikm = bytes.fromhex("0b" * 22)
    okm = bytes.fromhex(
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )
    assert reference_hkdf(ikm, b"", b"", 42) == okm
    assert HKDF(algorithm=hashes.SHA256(), length=42, salt=None, info=b"").derive(ikm) == okm


@settings(max_examples=30, deadline=None)
@given(upper=st.binary(min_size=32, max_size=32), index=st.integers(0, 2**32 - 1))
def test_derive_lower_is_hkdf_sha256_with_index_in_info(upper: bytes, index: int) -> None:
    info = INFO + index.to_bytes(4, "big")
    expected = reference_hkdf(upper, b"", info, 32)
    assert derive_lower(upper, index) == expected
    direct = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(upper)
    assert derive_lower(upper, index) == direct


def test_known_answer_for_one_link() -> None:
    # Pinned so that a change of label, salt or index encoding is noticed
    # (it would strand every image encrypted before it).
    upper = bytes(range(32))
    k0 = "1132ded64c12cf551be5598c2f207947fc117a935d3debb725b04ee0a49e13c7"
    k3 = "253c50d01d15d19f473503951a682b0ffbcf18aa25d817bc9f6f9af3ee757ce4"
    assert derive_lower(upper, 0).hex() == k0
    assert derive_lower(upper, 3).hex() == k3
    assert reference_hkdf(upper, b"", INFO + b"\0\0\0\3", 32).hex() == k3


def test_a_key_opens_its_layer_and_everything_below() -> None:
    chain = new_chain(6)
    assert len(chain) == 6
    assert all(len(key) == 32 for key in chain)
    for k in range(6):
        assert chain_below(chain[k], k) == chain[: k + 1]
    for i in range(5):
        assert derive_lower(chain[i + 1], i) == chain[i]


def test_keys_differ_per_index_and_per_chain() -> None:
    chain = new_chain(8)
    assert len(set(chain)) == 8
    key = chain[-1]
    assert len({derive_lower(key, i) for i in range(16)}) == 16
    assert new_chain(3) != new_chain(3)


def test_lower_key_does_not_give_the_upper_one() -> None:
    # Not a proof, just the shape: nothing derived downward from K[k] reaches
    # K[k + 1], and re-deriving "up" with the same function gives another key.
    chain = new_chain(4)
    below = chain_below(chain[1], 1)
    assert chain[2] not in below
    assert chain[3] not in below
    assert derive_lower(chain[1], 2) != chain[2]


def test_single_layer_chain_and_chain_below_zero() -> None:
    (only,) = new_chain(1)
    assert chain_below(only, 0) == [only]


@pytest.mark.parametrize(
    ("upper", "index", "message"),
    [(bytes(31), 0, "32 bytes"), (bytes(33), 0, "32 bytes"), (bytes(32), -1, "non-negative")],
)
def test_derive_lower_rejects_bad_input(upper: bytes, index: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        derive_lower(upper, index)


def test_empty_chain_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one layer"):
        new_chain(0)
