"""Signing keys and signatures, in cosign's formats (no I/O).

* Signatures: ECDSA P-256 (ASN.1 DER over SHA-256), Ed25519 (over the
  message itself, as cosign's ED25519 verifier does), RSA PKCS#1 v1.5 with
  SHA-256.
* Public keys: PEM `PUBLIC KEY` (SubjectPublicKeyInfo), as in cosign.pub.
* Private keys: cosign's encrypted format, a PEM block of type
  `ENCRYPTED SIGSTORE PRIVATE KEY` (cosign 1.x wrote `ENCRYPTED COSIGN
  PRIVATE KEY`; both are read) whose body is the JSON of
  go-securesystemslib's `encrypted` package::

      {"kdf": {"name": "scrypt", "params": {"N": 65536, "r": 8, "p": 1},
               "salt": "<b64, 32 bytes>"},
       "cipher": {"name": "nacl/secretbox", "nonce": "<b64, 24 bytes>"},
       "ciphertext": "<b64 secretbox of the PKCS#8 DER>"}

  The secretbox key is scrypt(password, salt, N, r, p, 32 bytes). cosign
  2.5 writes N = 65536 (measured); go-securesystemslib reads whatever
  parameters the file names, and so do we, within bounds that keep a
  hostile file from asking for gigabytes of memory.

Both halves of the key format come from well-kept libraries: `cryptography`
(scrypt, keys, signatures) and `pynacl` (XSalsa20-Poly1305 secretbox, which
`cryptography` lacks).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Literal

import nacl.exceptions
import nacl.secret
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from trustplane.errors import DecryptionKeyError, IntegrityError, MalformedError, UnsupportedError

SigningKeyType = Literal["ecdsa-p256", "ed25519", "rsa"]
SIGNING_KEY_TYPES: tuple[SigningKeyType, ...] = ("ecdsa-p256", "ed25519", "rsa")
RSA_BITS = 3072
MIN_RSA_BITS = 2048

PEM_TYPE = "ENCRYPTED SIGSTORE PRIVATE KEY"
_PEM_TYPES = (PEM_TYPE, "ENCRYPTED COSIGN PRIVATE KEY")
KDF_NAME = "scrypt"
CIPHER_NAME = "nacl/secretbox"
SCRYPT_N = 65536
SCRYPT_R = 8
SCRYPT_P = 1
SALT_SIZE = 32
_MAX_SCRYPT_MEMORY = 1 << 30
"""128 * N * r * p bytes: 64 MiB for cosign's parameters; refuse above 1 GiB."""

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey


@dataclass(frozen=True)
class VerifyKey:
    """A public key that checks signatures."""

    key: PublicKey
    source: str

    def __post_init__(self) -> None:
        _supported_public(self.key, self.source)

    @property
    def key_type(self) -> SigningKeyType:
        if isinstance(self.key, ed25519.Ed25519PublicKey):
            return "ed25519"
        if isinstance(self.key, rsa.RSAPublicKey):
            return "rsa"
        return "ecdsa-p256"

    def public_pem(self) -> bytes:
        return self.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def key_id(self) -> str:
        """sha256 of the SubjectPublicKeyInfo DER: stable across PEM encodings."""
        der = self.key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return "sha256:" + hashlib.sha256(der).hexdigest()

    def verify(self, payload: bytes, signature: bytes) -> None:
        """Raise IntegrityError unless `signature` is this key's over `payload`."""
        try:
            if isinstance(self.key, ed25519.Ed25519PublicKey):
                self.key.verify(signature, payload)
            elif isinstance(self.key, rsa.RSAPublicKey):
                self.key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
            else:
                self.key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise IntegrityError(
                f"the signature does not verify with {self.source} ({self.key_type})"
            ) from None


@dataclass(frozen=True)
class SigningKey:
    """A private key that makes cosign-compatible signatures."""

    key: PrivateKey
    source: str

    def __post_init__(self) -> None:
        _supported_private(self.key, self.source)

    @property
    def public(self) -> VerifyKey:
        return VerifyKey(self.key.public_key(), self.source)

    def sign(self, payload: bytes) -> bytes:
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            return self.key.sign(payload)
        if isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
        return self.key.sign(payload, ec.ECDSA(hashes.SHA256()))

    def pkcs8_der(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def generate_signing_key(key_type: SigningKeyType, source: str = "new key") -> SigningKey:
    key: PrivateKey
    if key_type == "ecdsa-p256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif key_type == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    elif key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    else:
        raise UnsupportedError(
            f"signing key type {key_type!r}: choose one of {', '.join(SIGNING_KEY_TYPES)}"
        )
    return SigningKey(key, source)


# -- cosign's encrypted private key ----------------------------------------------


def encrypt_private_key(
    key: SigningKey,
    password: bytes,
    *,
    n: int = SCRYPT_N,
    r: int = SCRYPT_R,
    p: int = SCRYPT_P,
) -> bytes:
    """The key as cosign writes it: `ENCRYPTED SIGSTORE PRIVATE KEY` PEM."""
    salt = os.urandom(SALT_SIZE)
    nonce = os.urandom(nacl.secret.SecretBox.NONCE_SIZE)
    box = nacl.secret.SecretBox(_derive(password, salt, n, r, p))
    ciphertext = box.encrypt(key.pkcs8_der(), nonce).ciphertext
    document = {
        "kdf": {"name": KDF_NAME, "params": {"N": n, "r": r, "p": p}, "salt": _b64(salt)},
        "cipher": {"name": CIPHER_NAME, "nonce": _b64(nonce)},
        "ciphertext": _b64(ciphertext),
    }
    body = json.dumps(document, separators=(",", ":")).encode()
    return _pem(PEM_TYPE, body)


def decrypt_private_key(data: bytes, password: bytes, source: str) -> SigningKey:
    """Open a cosign encrypted private key; a wrong password is DecryptionKeyError."""
    document = _encrypted_document(data, source)
    kdf, cipher = document["kdf"], document["cipher"]
    salt = _unb64(kdf.get("salt"), f"{source}: kdf.salt")
    nonce = _unb64(cipher.get("nonce"), f"{source}: cipher.nonce")
    ciphertext = _unb64(document.get("ciphertext"), f"{source}: ciphertext")
    params = kdf.get("params")
    if not isinstance(params, dict):
        raise MalformedError(f"{source}: kdf.params is missing")
    n, r, p = (params.get(name) for name in ("N", "r", "p"))
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (n, r, p)):
        raise MalformedError(f"{source}: kdf.params N, r, p must be positive integers")
    assert isinstance(n, int)
    assert isinstance(r, int)
    assert isinstance(p, int)
    if n & (n - 1) or n < 2 or 128 * n * r * p > _MAX_SCRYPT_MEMORY:
        raise UnsupportedError(f"{source}: scrypt parameters N={n} r={r} p={p} are out of bounds")
    if len(nonce) != nacl.secret.SecretBox.NONCE_SIZE:
        raise MalformedError(f"{source}: the secretbox nonce is not 24 bytes")
    box = nacl.secret.SecretBox(_derive(password, salt, n, r, p))
    try:
        der = box.decrypt(ciphertext, nonce)
    except nacl.exceptions.CryptoError:
        raise DecryptionKeyError(
            f"{source}: wrong password for the encrypted private key (or the file was altered)"
        ) from None
    try:
        key = serialization.load_der_private_key(der, password=None)
    except ValueError:
        raise MalformedError(f"{source}: the decrypted private key is not PKCS#8") from None
    except UnsupportedAlgorithm:
        raise UnsupportedError(f"{source}: a private key of an unsupported algorithm") from None
    return SigningKey(_supported_private(key, source), source)


def is_encrypted_private_key(data: bytes) -> bool:
    return any(f"-----BEGIN {kind}-----".encode() in data for kind in _PEM_TYPES)


def load_signing_key(data: bytes, source: str, password: bytes | None) -> SigningKey:
    """A cosign encrypted key (needs `password`), or a plain PEM private key."""
    if is_encrypted_private_key(data):
        if password is None:
            raise DecryptionKeyError(f"{source}: the private key is encrypted; give its password")
        return decrypt_private_key(data, password, source)
    try:
        key = serialization.load_pem_private_key(data, password=password or None)
    except TypeError:
        raise DecryptionKeyError(
            f"{source}: the private key is encrypted; give its password"
        ) from None
    except ValueError:
        raise MalformedError(
            f"{source}: not a cosign encrypted key nor a PEM private key"
        ) from None
    except UnsupportedAlgorithm:
        raise UnsupportedError(f"{source}: a private key of an unsupported algorithm") from None
    return SigningKey(_supported_private(key, source), source)


def load_verify_key(data: bytes, source: str) -> VerifyKey:
    """A PEM `PUBLIC KEY` (SubjectPublicKeyInfo), as cosign.pub holds."""
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise MalformedError(f"{source}: not a PEM public key") from None
    except UnsupportedAlgorithm:
        raise UnsupportedError(f"{source}: a public key of an unsupported algorithm") from None
    return VerifyKey(_supported_public(key, source), source)


# -- helpers ---------------------------------------------------------------------


def _derive(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=nacl.secret.SecretBox.KEY_SIZE, n=n, r=r, p=p).derive(password)


def _supported_private(key: object, source: str) -> PrivateKey:
    if isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        _supported_public(key.public_key(), source)
        return key
    raise UnsupportedError(f"{source}: only ECDSA P-256, Ed25519 and RSA keys sign images")


def _supported_public(key: object, source: str) -> PublicKey:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name != "secp256r1":
            raise UnsupportedError(f"{source}: ECDSA keys must be on P-256, not {key.curve.name}")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise UnsupportedError(
                f"{source}: RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} are needed"
            )
        return key
    raise UnsupportedError(f"{source}: only ECDSA P-256, Ed25519 and RSA keys sign images")


def _encrypted_document(data: bytes, source: str) -> dict[str, Any]:
    body = None
    for kind in _PEM_TYPES:
        body = _pem_body(data, kind)
        if body is not None:
            break
    if body is None:
        raise MalformedError(f"{source}: not a PEM block of type {PEM_TYPE}")
    try:
        document = json.loads(body)
    except ValueError:
        raise MalformedError(f"{source}: the encrypted key's body is not JSON") from None
    if not isinstance(document, dict):
        raise MalformedError(f"{source}: the encrypted key's body is not a JSON object")
    kdf, cipher = document.get("kdf"), document.get("cipher")
    if not isinstance(kdf, dict) or not isinstance(cipher, dict):
        raise MalformedError(f"{source}: the encrypted key has no kdf or cipher")
    if kdf.get("name") != KDF_NAME:
        raise UnsupportedError(f"{source}: key derivation {kdf.get('name')!r} (only scrypt)")
    if cipher.get("name") != CIPHER_NAME:
        raise UnsupportedError(f"{source}: cipher {cipher.get('name')!r} (only nacl/secretbox)")
    return document


def _pem(kind: str, body: bytes) -> bytes:
    text = base64.b64encode(body).decode()
    lines = [text[i : i + 64] for i in range(0, len(text), 64)]
    return (f"-----BEGIN {kind}-----\n" + "\n".join(lines) + f"\n-----END {kind}-----\n").encode()


def _pem_body(data: bytes, kind: str) -> bytes | None:
    begin, end = f"-----BEGIN {kind}-----".encode(), f"-----END {kind}-----".encode()
    start = data.find(begin)
    if start < 0:
        return None
    stop = data.find(end, start)
    if stop < 0:
        return None
    inner = data[start + len(begin) : stop]
    try:
        return base64.b64decode(b"".join(inner.split()), validate=True)
    except (binascii.Error, ValueError):
        return None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise MalformedError(f"{what} is missing")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedError(f"{what} is not base64") from None
