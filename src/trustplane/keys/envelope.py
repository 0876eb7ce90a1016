"""Envelope encryption of secrets: a data key per secret, wrapped by a KEK.

Each secret gets its own random 256-bit data key. The payload is AES-256-GCM
under that key with the secret's id in the associated data; the data key is
wrapped by the `KekProvider` with the id in its associated data too. So:

- a sealed secret copied to another id fails to open (both layers check it);
- rotating the KEK re-wraps 32-byte data keys (`rewrap`), leaving payload
  ciphertexts untouched: cheap, and safe to run online while readers open
  secrets under either KEK version;
- the KEK never sees a payload, and a remote KEK store costs one round trip
  per secret, not per byte.

Payload bytes never appear in exceptions or logs; errors name the secret id.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from trustplane.errors import IntegrityError, UsageError
from trustplane.keys.kek import KekProvider, WrappedKey

DATA_KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
FORMAT_VERSION = 1
MAX_SECRET_ID = 1024
PAYLOAD_AAD_DOMAIN = b"trustplane/secret/payload/v1\x00"
DATA_KEY_AAD_DOMAIN = b"trustplane/secret/data-key/v1\x00"


@dataclass(frozen=True)
class SealedSecret:
    """What the DB stores for one secret; every field is plain str/bytes.

    `ciphertext` is ``0x01 | nonce (12) | AES-256-GCM(payload) | tag (16)``;
    `wrapped_key` is the data key as the KEK provider wrapped it.
    """

    kek_id: str
    wrapped_key: bytes
    ciphertext: bytes

    @property
    def wrapped(self) -> WrappedKey:
        return WrappedKey(kek_id=self.kek_id, blob=self.wrapped_key)

    def __repr__(self) -> str:
        return (
            f"SealedSecret(kek_id={self.kek_id!r}, wrapped_key=<{len(self.wrapped_key)} bytes>, "
            f"ciphertext=<{len(self.ciphertext)} bytes>)"
        )


def seal(secret_id: str, payload: bytes, kek: KekProvider) -> SealedSecret:
    """Encrypt `payload` under a fresh data key bound to `secret_id`, wrapped by `kek`."""
    _check_id(secret_id)
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TypeError("a secret payload must be bytes")
    data_key = AESGCM.generate_key(bit_length=DATA_KEY_BYTES * 8)
    nonce = os.urandom(NONCE_BYTES)
    body = AESGCM(data_key).encrypt(nonce, bytes(payload), _payload_aad(secret_id))
    wrapped = kek.wrap(data_key, _data_key_aad(secret_id))
    return SealedSecret(
        kek_id=wrapped.kek_id,
        wrapped_key=wrapped.blob,
        ciphertext=bytes([FORMAT_VERSION]) + nonce + body,
    )


def open_sealed(secret_id: str, sealed: SealedSecret, kek: KekProvider) -> bytes:
    """Return the payload; IntegrityError if it was sealed for another id or was altered."""
    _check_id(secret_id)
    ciphertext = sealed.ciphertext
    if len(ciphertext) < 1 + NONCE_BYTES + TAG_BYTES or ciphertext[0] != FORMAT_VERSION:
        raise IntegrityError(f"sealed secret {secret_id} is malformed")
    data_key = kek.unwrap(sealed.wrapped, _data_key_aad(secret_id))
    nonce, body = ciphertext[1 : 1 + NONCE_BYTES], ciphertext[1 + NONCE_BYTES :]
    try:
        return AESGCM(data_key).decrypt(nonce, body, _payload_aad(secret_id))
    except (InvalidTag, ValueError):
        raise IntegrityError(
            f"sealed secret {secret_id} does not authenticate (altered, or sealed for another id)"
        ) from None


def rewrap(secret_id: str, sealed: SealedSecret, kek: KekProvider) -> SealedSecret:
    """Re-wrap the data key under the current KEK; the payload ciphertext stays as it is.

    A secret already under the current KEK comes back unchanged, so a
    rotation job can run over every secret repeatedly and only pays for the
    ones it has not done. The data key must unwrap (bound to `secret_id`),
    so a rotation cannot launder a secret onto another id.
    """
    _check_id(secret_id)
    if sealed.kek_id == kek.current_id():
        return sealed
    data_key = kek.unwrap(sealed.wrapped, _data_key_aad(secret_id))
    wrapped = kek.wrap(data_key, _data_key_aad(secret_id))
    return SealedSecret(
        kek_id=wrapped.kek_id, wrapped_key=wrapped.blob, ciphertext=sealed.ciphertext
    )


def _check_id(secret_id: str) -> None:
    if not isinstance(secret_id, str) or not 0 < len(secret_id) <= MAX_SECRET_ID:
        raise UsageError(f"a secret id must be a non-empty string of at most {MAX_SECRET_ID} chars")
    try:
        secret_id.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("a secret id must be valid Unicode text") from None


def _payload_aad(secret_id: str) -> bytes:
    return PAYLOAD_AAD_DOMAIN + secret_id.encode("utf-8")


def _data_key_aad(secret_id: str) -> bytes:
    return DATA_KEY_AAD_DOMAIN + secret_id.encode("utf-8")
