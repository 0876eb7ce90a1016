"""Recipient key pairs for layer-key wrapping: loading, naming, generating.

ocicrypt's JWE scheme takes RSA (RSA-OAEP) and EC P-256/384/521 keys
(ECDH-ES+A256KW). A key is named by its RFC 7638 JWK thumbprint, which is
stable across PEM encodings and is what `image inspect` shows as the key id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwcrypto import jwk

from trustplane.errors import DecryptionKeyError, MalformedError, UnsupportedError

KeyType = Literal["rsa", "ec-p256", "ec-p384", "ec-p521"]
KEY_TYPES: tuple[KeyType, ...] = ("rsa", "ec-p256", "ec-p384", "ec-p521")
MIN_RSA_BITS = 2048
_CURVES: dict[str, ec.EllipticCurve] = {
    "ec-p256": ec.SECP256R1(),
    "ec-p384": ec.SECP384R1(),
    "ec-p521": ec.SECP521R1(),
}
_CURVE_NAMES = {"secp256r1", "secp384r1", "secp521r1"}

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PrivateKeyObject = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class RecipientKey:
    """A public key layer keys are wrapped to."""

    jwk: jwk.JWK
    kid: str
    source: str

    @property
    def alg(self) -> str:
        return "RSA-OAEP" if self.jwk["kty"] == "RSA" else "ECDH-ES+A256KW"


@dataclass(frozen=True)
class UnwrapKey:
    """A private key that may unwrap layer keys."""

    jwk: jwk.JWK
    kid: str
    source: str


def load_recipient_key(data: bytes, source: str) -> RecipientKey:
    """A PEM public key, X.509 certificate or private key (its public half)."""
    key = _parse_public(data, source)
    _check_supported(key, source)
    return _recipient(key, source)


def load_unwrap_key(data: bytes, source: str, password: bytes | None = None) -> UnwrapKey:
    """A PEM private key (PKCS#8 or traditional), optionally password-protected."""
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError:
        raise DecryptionKeyError(
            f"{source}: the private key is encrypted; give its password"
        ) from None
    except ValueError:
        if password is not None:
            raise DecryptionKeyError(f"{source}: wrong password or not a PEM private key") from None
        raise MalformedError(f"{source}: not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise UnsupportedError(f"{source}: only RSA and EC P-256/384/521 keys can unwrap layers")
    _check_supported(key.public_key(), source)
    private = jwk.JWK.from_pyca(key)
    return UnwrapKey(jwk=private, kid=private.thumbprint(), source=source)


def generate_key_pair(key_type: KeyType) -> tuple[bytes, bytes]:
    """A new key pair as (PKCS#8 private PEM, SubjectPublicKeyInfo PEM).

    PKCS#8 because skopeo refuses traditional EC private keys.
    """
    private: PrivateKeyObject
    if key_type == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    else:
        private = ec.generate_private_key(_CURVES[key_type])
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem


def key_id(data: bytes, source: str) -> str:
    """The thumbprint of a public or private key, as `image inspect` shows it."""
    return load_recipient_key(data, source).kid


def _parse_public(data: bytes, source: str) -> object:
    if b"-----BEGIN CERTIFICATE-----" in data:
        try:
            return x509.load_pem_x509_certificate(data).public_key()
        except ValueError:
            raise MalformedError(f"{source}: not a valid PEM certificate") from None
    if b"PRIVATE KEY-----" in data:
        try:
            return serialization.load_pem_private_key(data, password=None).public_key()
        except (TypeError, ValueError):
            raise MalformedError(f"{source}: not an unencrypted PEM private key") from None
    try:
        return serialization.load_pem_public_key(data)
    except ValueError:
        raise MalformedError(
            f"{source}: not a PEM public key, certificate or private key"
        ) from None


def _check_supported(key: object, source: str) -> None:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise UnsupportedError(
                f"{source}: RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} are needed"
            )
        return
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _CURVE_NAMES:
        return
    raise UnsupportedError(f"{source}: only RSA and EC P-256/384/521 keys can receive layer keys")


def _recipient(key: object, source: str) -> RecipientKey:
    public = jwk.JWK.from_pyca(key)
    return RecipientKey(jwk=public, kid=public.thumbprint(), source=source)
