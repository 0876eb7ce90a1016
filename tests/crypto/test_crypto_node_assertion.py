"""Node assertions: which keys sign them, with which algorithm, and one refusal for the rest."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from jwcrypto import jwk, jwt

from trustplane.crypto.node_assertion import (
    load_node_key,
    make_node_assertion,
    signing_alg,
)
from trustplane.errors import MalformedError, UnsupportedError


def pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


SUPPORTED = [
    ("P-256", lambda: ec.generate_private_key(ec.SECP256R1()), "ES256"),
    ("P-384", lambda: ec.generate_private_key(ec.SECP384R1()), "ES384"),
    ("P-521", lambda: ec.generate_private_key(ec.SECP521R1()), "ES512"),
    ("Ed25519", ed25519.Ed25519PrivateKey.generate, "EdDSA"),
    ("RSA", lambda: rsa.generate_private_key(65537, 2048), "RS256"),
]
UNSUPPORTED = [
    ("secp256k1", lambda: ec.generate_private_key(ec.SECP256K1()), "curve secp256k1"),
    ("P-192", lambda: ec.generate_private_key(ec.SECP192R1()), "curve secp192r1"),
    ("Ed448", ed448.Ed448PrivateKey.generate, "an Ed448 key"),
]


@pytest.mark.parametrize(("name", "make", "alg"), SUPPORTED, ids=[s[0] for s in SUPPORTED])
def test_each_supported_key_signs_with_its_own_algorithm(name: str, make: object, alg: str) -> None:
    assert callable(make)
    key = make()
    node_key = load_node_key(pem(key), f"{name} key")
    assert signing_alg(node_key) == alg
    assertion = make_node_assertion(node_key, "edge-1", "https://cp/v1/auth/token")
    public = jwk.JWK.from_pyca(key.public_key())
    parsed = jwt.JWT(jwt=assertion, key=public, algs=[alg])
    claims = json.loads(parsed.claims)
    assert json.loads(parsed.token.objects["protected"])["alg"] == alg
    assert (claims["iss"], claims["sub"], claims["aud"]) == (
        "edge-1",
        "edge-1",
        "https://cp/v1/auth/token",
    )
    assert claims["exp"] - claims["iat"] == 60


@pytest.mark.parametrize(("name", "make", "said"), UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_an_unsupported_key_is_refused_at_once_in_one_line(
    name: str, make: object, said: str
) -> None:
    assert callable(make)
    with pytest.raises(UnsupportedError) as refused:
        load_node_key(pem(make()), "--node-key edge.pem")
    message = str(refused.value)
    assert message.startswith("--node-key edge.pem: ")
    assert said in message
    assert "cannot sign node assertions; use EC P-256, P-384 or P-521, Ed25519, or RSA" in message
    assert "\n" not in message


def test_a_key_made_elsewhere_on_an_unknown_curve_is_refused_not_signed_as_es256() -> None:
    """The gateway's copy once signed such a key with ES256, which no verifier accepts."""
    other = jwk.JWK.from_pyca(ec.generate_private_key(ec.SECP256K1()))
    with pytest.raises(UnsupportedError, match="curve secp256k1 cannot sign node assertions"):
        make_node_assertion(other, "edge-1", "aud")


def test_what_is_no_private_key_is_malformed() -> None:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    for data in (
        b"not a key",
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    ):
        with pytest.raises(MalformedError, match="not a PEM private key"):
            load_node_key(data, "key.pem")
