"""Passwords, tokens and node assertions."""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwcrypto import jwk, jwt

from trustplane.control.identity import (
    Principal,
    TokenAuthority,
    check_password,
    hash_password,
    verify_node_assertion,
)
from trustplane.crypto.node_assertion import make_node_assertion
from trustplane.errors import AuthError

ALICE = Principal("user", "alice", "operator", frozenset({"kms", "log"}))


def test_password_hashes_are_salted_scrypt() -> None:
    first, second = hash_password("correct horse"), hash_password("correct horse")
    assert first != second
    assert first.startswith("scrypt$")
    assert check_password("correct horse", first)
    assert not check_password("correct horsE", first)
    assert not check_password("x", "bcrypt$whatever")
    assert not check_password("x", "garbage")


def _authority(ttl: int = 60) -> TokenAuthority:
    return TokenAuthority(jwk.JWK.generate(kty="EC", crv="P-256"), ttl, "trustplane")


def test_tokens_round_trip_and_carry_the_principal() -> None:
    authority = _authority()
    token, ttl = authority.issue(ALICE)
    assert ttl == 60
    principal = authority.verify(token)
    assert (principal.subject, principal.role, principal.scopes) == (
        "user:alice",
        "operator",
        frozenset({"kms", "log"}),
    )
    assert authority.verify(token) is principal  # cached after the first check


def test_foreign_expired_and_altered_tokens_are_refused() -> None:
    authority, other = _authority(), _authority()
    token, _ = other.issue(ALICE)
    with pytest.raises(AuthError):
        authority.verify(token)
    mine, _ = authority.issue(ALICE)
    header, claims, signature = mine.split(".")
    with pytest.raises(AuthError):
        authority.verify(f"{header}.{claims}.{signature[::-1]}")
    key = jwk.JWK.generate(kty="EC", crv="P-256")
    expired_authority = TokenAuthority(key, 30, "trustplane")
    stale = jwt.JWT(
        header={"alg": "ES256"},
        claims={
            "iss": "trustplane",
            "aud": "trustplane",
            "sub": "user:alice",
            "role": "user",
            "exp": int(time.time()) - 120,
            "iat": int(time.time()) - 200,
        },
    )
    stale.make_signed_token(key)
    with pytest.raises(AuthError):
        expired_authority.verify(stale.serialize())
    with pytest.raises(AuthError):
        authority.verify("not.a.token")


@pytest.mark.parametrize(
    "make",
    [
        lambda: ec.generate_private_key(ec.SECP256R1()),
        lambda: ec.generate_private_key(ec.SECP384R1()),
        lambda: ec.generate_private_key(ec.SECP521R1()),
        ed25519.Ed25519PrivateKey.generate,
        lambda: rsa.generate_private_key(65537, 2048),
    ],
    ids=["P-256", "P-384", "P-521", "Ed25519", "RSA"],
)
def test_node_assertions(make: object) -> None:
    """Made by crypto/node_assertion.py (every node), checked here (the control plane)."""
    assert callable(make)
    key = make()
    pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    assertion = make_node_assertion(jwk.JWK.from_pyca(key), "gw-1", "trustplane")
    assert verify_node_assertion(assertion, pem, "gw-1", ["trustplane", "https://x/v1/auth/token"])
    with pytest.raises(AuthError):
        verify_node_assertion(assertion, pem, "gw-2", "trustplane")  # issued by another node name
    with pytest.raises(AuthError):
        verify_node_assertion(assertion, pem, "gw-1", "someone-else")
    long_lived = make_node_assertion(jwk.JWK.from_pyca(key), "gw-1", "trustplane", lifetime=3600)
    with pytest.raises(AuthError, match="at most"):
        verify_node_assertion(long_lived, pem, "gw-1", "trustplane")
