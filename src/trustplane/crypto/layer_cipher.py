"""ocicrypt's layer cipher, AES_256_CTR_HMAC_SHA256, and its option blobs.

Format (measured against skopeo 1.9.3 / ocicrypt 1.x, see DESIGN.md):

* the plaintext blob is encrypted with AES-256-CTR; the 16-byte nonce is the
  whole initial counter block, so the ciphertext has the plaintext's size;
* HMAC-SHA256 over the *ciphertext*, keyed with the same 32-byte symkey, goes
  in the public options (stored in the clear, in the manifest);
* symkey, nonce and the plaintext blob's digest are the private options,
  which travel wrapped in a JWE to each recipient.

ocicrypt checks the HMAC only after it has released the plaintext and never
checks the digest; trustplane's callers check both before releasing a byte.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from trustplane.errors import IntegrityError, MalformedError

CIPHER = "AES_256_CTR_HMAC_SHA256"
KEY_SIZE = 32
NONCE_SIZE = 16
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")


def new_symkey() -> bytes:
    return os.urandom(KEY_SIZE)


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


class Keystream:
    """AES-256-CTR in both directions (CTR encryption is its own inverse)."""

    def __init__(self, symkey: bytes, nonce: bytes) -> None:
        if len(symkey) != KEY_SIZE or len(nonce) != NONCE_SIZE:
            raise MalformedError("layer key must be 32 bytes and nonce 16 bytes")
        self._ctx: CipherContext = Cipher(algorithms.AES(symkey), modes.CTR(nonce)).encryptor()

    def update_into(self, data: memoryview, out: memoryview) -> int:
        return self._ctx.update_into(data, out)

    def update(self, data: bytes) -> bytes:
        return self._ctx.update(data)


def new_mac(symkey: bytes) -> hmac.HMAC:
    """The HMAC over the ciphertext. `hmac` (OpenSSL) releases the GIL."""
    return hmac.new(symkey, digestmod="sha256")


def check_mac(expected: bytes, mac: hmac.HMAC, what: str) -> None:
    if not hmac.compare_digest(expected, mac.digest()):
        raise IntegrityError(f"{what}: HMAC mismatch, the ciphertext or its options were altered")


@dataclass(frozen=True)
class PrivateOptions:
    """What a recipient unwraps: the key, the nonce and the plain digest."""

    symkey: bytes
    nonce: bytes
    digest: str

    def to_json(self) -> bytes:
        # Field order and encodings are ocicrypt's (Go marshals []byte as std base64).
        return json.dumps(
            {
                "symkey": _b64(self.symkey),
                "digest": self.digest,
                "cipheroptions": {"nonce": _b64(self.nonce)},
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> PrivateOptions:
        obj = _load_object(data, "private options")
        cipher_options = obj.get("cipheroptions")
        if not isinstance(cipher_options, dict):
            raise MalformedError("private options: 'cipheroptions' is missing")
        symkey = _unb64(obj.get("symkey"), "private options: symkey")
        nonce = _unb64(cipher_options.get("nonce"), "private options: nonce")
        digest = obj.get("digest")
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise MalformedError("private options: 'digest' is not a sha256/sha512 digest")
        if len(symkey) != KEY_SIZE or len(nonce) != NONCE_SIZE:
            raise MalformedError("private options: key must be 32 bytes and nonce 16 bytes")
        return cls(symkey=symkey, nonce=nonce, digest=digest)


@dataclass(frozen=True)
class PublicOptions:
    """Stored in the clear: the cipher's name and the HMAC of the ciphertext."""

    hmac: bytes
    cipher: str = CIPHER

    def to_json(self) -> bytes:
        return json.dumps(
            {"cipher": self.cipher, "hmac": _b64(self.hmac), "cipheroptions": {}},
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> PublicOptions:
        obj = _load_object(data, "public options")
        cipher = obj.get("cipher")
        if cipher != CIPHER:
            raise MalformedError(f"unsupported layer cipher {cipher!r}; only {CIPHER} exists")
        mac = _unb64(obj.get("hmac"), "public options: hmac")
        if len(mac) != 32:
            raise MalformedError("public options: hmac must be 32 bytes")
        return cls(hmac=mac, cipher=cipher)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise MalformedError(f"{what} is missing")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise MalformedError(f"{what} is not valid base64") from None


def _load_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MalformedError(f"{what} are not valid JSON") from None
    if not isinstance(obj, dict):
        raise MalformedError(f"{what} are not a JSON object")
    return obj
