"""Recipient keys: loading from every PEM form, naming by RFC 7638 thumbprint."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from trustplane.crypto.keys import (
    KEY_TYPES,
    generate_key_pair,
    key_id,
    load_recipient_key,
    load_unwrap_key,
)
from trustplane.errors import DecryptionKeyError, MalformedError, UnsupportedError

# RFC 7638, section 3.1: the example RSA key and its thumbprint.
RFC7638_N = (
    "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
    "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_F"
    "DW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4"
    "vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
)
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def _b64url_int(text: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _public_pem(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _private_pem(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
    form: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
    password: bytes | None = None,
) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, form, encryption)


def _ec_thumbprint(key: ec.EllipticCurvePublicKey, crv: str) -> str:
    """RFC 7638 computed by hand: sorted required members, no whitespace."""
    numbers = key.public_numbers()
    size = (key.curve.key_size + 7) // 8
    members = {
        "crv": crv,
        "kty": "EC",
        "x": _b64url(numbers.x.to_bytes(size, "big")),
        "y": _b64url(numbers.y.to_bytes(size, "big")),
    }
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return _b64url(hashlib.sha256(canonical).digest())


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def test_kid_is_the_rfc7638_thumbprint_of_the_rfc_example_key() -> None:
    public = rsa.RSAPublicNumbers(e=65537, n=_b64url_int(RFC7638_N)).public_key()
    recipient = load_recipient_key(_public_pem(public), "rfc.pem")
    assert recipient.kid == RFC7638_THUMBPRINT
    assert recipient.alg == "RSA-OAEP"
    assert recipient.source == "rfc.pem"
    # The RFC's own construction, step by step.
    canonical = '{"e":"AQAB","kty":"RSA","n":"' + RFC7638_N + '"}'
    assert _b64url(hashlib.sha256(canonical.encode()).digest()) == RFC7638_THUMBPRINT


@pytest.mark.parametrize(
    ("curve", "crv"),
    [(ec.SECP256R1(), "P-256"), (ec.SECP384R1(), "P-384"), (ec.SECP521R1(), "P-521")],
)
def test_ec_kid_is_thumbprint_and_alg_is_ecdh_es(curve: ec.EllipticCurve, crv: str) -> None:
    key = ec.generate_private_key(curve)
    recipient = load_recipient_key(_public_pem(key.public_key()), "k")
    assert recipient.kid == _ec_thumbprint(key.public_key(), crv)
    assert recipient.alg == "ECDH-ES+A256KW"


def _self_signed(key: ec.EllipticCurvePrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "recipient")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_every_pem_form_of_one_key_has_the_same_kid(ec_key: ec.EllipticCurvePrivateKey) -> None:
    forms = {
        "spki": _public_pem(ec_key.public_key()),
        "pkcs8": _private_pem(ec_key),
        "traditional": _private_pem(ec_key, serialization.PrivateFormat.TraditionalOpenSSL),
        "certificate": _self_signed(ec_key),
    }
    kids = {name: key_id(data, name) for name, data in forms.items()}
    assert set(kids.values()) == {_ec_thumbprint(ec_key.public_key(), "P-256")}
    assert load_unwrap_key(forms["pkcs8"], "p").kid == kids["spki"]
    assert load_unwrap_key(forms["traditional"], "t").kid == kids["spki"]


def test_rsa_pkcs1_public_key_and_private_key_agree(rsa_key: rsa.RSAPrivateKey) -> None:
    pkcs1 = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
    )
    assert pkcs1.startswith(b"-----BEGIN RSA PUBLIC KEY-----")
    kid = key_id(pkcs1, "pkcs1")
    assert kid == key_id(_public_pem(rsa_key.public_key()), "spki")
    assert kid == load_unwrap_key(_private_pem(rsa_key), "priv").kid


def test_recipient_key_from_private_pem_holds_no_private_part(
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    recipient = load_recipient_key(_private_pem(ec_key), "k")
    assert not recipient.jwk.has_private
    assert load_unwrap_key(_private_pem(ec_key), "k").jwk.has_private


@pytest.mark.parametrize(
    "make",
    [
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),
        lambda: ec.generate_private_key(ec.SECP256K1()),
        lambda: ed25519.Ed25519PrivateKey.generate(),
    ],
    ids=["rsa-1024", "secp256k1", "ed25519"],
)
def test_unsupported_keys_are_refused_both_ways(make: object) -> None:
    key = make()  # type: ignore[operator]
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(UnsupportedError, match=r"^weak\.pem: "):
        load_recipient_key(public, "weak.pem")
    with pytest.raises(UnsupportedError, match=r"^weak\.pem: "):
        load_unwrap_key(_private_pem(key), "weak.pem")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello",
        b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ],
)
def test_garbage_is_malformed(data: bytes) -> None:
    with pytest.raises(MalformedError, match=r"^bad\.pem: ") as info:
        load_recipient_key(data, "bad.pem")
    assert "\n" not in str(info.value)


def test_garbage_private_key_is_malformed() -> None:
    with pytest.raises(MalformedError, match="not a PEM private key"):
        load_unwrap_key(b"nope", "x.pem")


def test_encrypted_private_key_needs_the_right_password(
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    pem = _private_pem(ec_key, password=b"s3cret")
    with pytest.raises(DecryptionKeyError, match="give its password"):
        load_unwrap_key(pem, "enc.pem")
    with pytest.raises(DecryptionKeyError, match="wrong password"):
        load_unwrap_key(pem, "enc.pem", password=b"wrong")
    key = load_unwrap_key(pem, "enc.pem", password=b"s3cret")
    assert key.kid == key_id(_public_pem(ec_key.public_key()), "pub")
    # A recipient is a public key: an encrypted private key cannot serve.
    with pytest.raises(MalformedError, match="unencrypted"):
        load_recipient_key(pem, "enc.pem")


@pytest.mark.parametrize("key_type", [t for t in KEY_TYPES if t != "rsa"])
def test_generated_ec_pairs_are_pkcs8_and_match(key_type: str) -> None:
    private_pem, public_pem = generate_key_pair(key_type)  # type: ignore[arg-type]
    assert private_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, as skopeo needs
    assert public_pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert load_unwrap_key(private_pem, "p").kid == key_id(public_pem, "q")
    curve = serialization.load_pem_public_key(public_pem).curve  # type: ignore[union-attr]
    assert (
        curve.name
        == {"ec-p256": "secp256r1", "ec-p384": "secp384r1", "ec-p521": "secp521r1"}[key_type]
    )


def test_generated_rsa_pair_is_3072_bit_pkcs8() -> None:
    private_pem, public_pem = generate_key_pair("rsa")
    assert private_pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    public = serialization.load_pem_public_key(public_pem)
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 3072
    assert load_recipient_key(public_pem, "r").kid == load_unwrap_key(private_pem, "r").kid
    assert generate_key_pair("rsa")[0] != private_pem
