"""The key-encryption-key (KEK) interface every KMS backend implements.

A KEK never encrypts secrets itself: it wraps the per-secret data keys (see
`envelope`), so that rotating it means re-wrapping 32-byte keys, not
re-encrypting payloads. A provider keeps every KEK version it still knows so
that keys wrapped before a rotation keep opening until the operator retires
the old version.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType
from typing import ClassVar, Self

from trustplane.errors import UsageError

MAX_WRAPPED_KEY = 1024
"""Wrap is for key material (data keys are 32 bytes), never for payloads."""

KEK_AAD_DOMAIN = b"trustplane/kek/v1\x00"
"""Prefix of the associated data of every wrap, so a wrapped key cannot be
passed off as any other AES-GCM ciphertext made under the same KEK."""


@dataclass(frozen=True)
class WrappedKey:
    """A key wrapped under one KEK version: what the DB stores next to a secret."""

    kek_id: str
    blob: bytes

    def __repr__(self) -> str:
        return f"WrappedKey(kek_id={self.kek_id!r}, blob=<{len(self.blob)} bytes>)"


class KekProvider(ABC):
    """Wraps and unwraps data keys under key-encryption keys it holds or reaches.

    Implementations are thread-safe: the control plane calls one instance from
    many request threads. `wrap` always uses the current KEK; `unwrap` accepts
    any version that has not been retired. Failures are TrustplaneErrors:
    IntegrityError when the blob or the associated data do not authenticate,
    DecryptionKeyError when the KEK named by a wrapped key is not (or no
    longer) known, UnavailableError/AuthError when a remote KEK store cannot be
    used.
    """

    kind: ClassVar[str]

    @abstractmethod
    def current_id(self) -> str:
        """Id of the KEK that `wrap` uses now."""

    @abstractmethod
    def known_ids(self) -> tuple[str, ...]:
        """Ids of every KEK version `unwrap` accepts, oldest first, the current one last."""

    @abstractmethod
    def wrap(self, key: bytes, aad: bytes) -> WrappedKey:
        """Wrap `key` under the current KEK, bound to the associated data `aad`."""

    @abstractmethod
    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        """Return the key in `wrapped`; IntegrityError unless it was wrapped with this `aad`."""

    @abstractmethod
    def rotate(self) -> str:
        """Make a new current KEK (old ones stay for unwrap); returns its id."""

    @abstractmethod
    def retire(self, kek_id: str) -> None:
        """Forget an old KEK once nothing uses it; the current KEK cannot be retired."""

    @abstractmethod
    def close(self) -> None:
        """Release connections and cached key material. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def check_key_to_wrap(key: bytes) -> None:
    """Refuse what is not key material: empty, or larger than any key we make."""
    if not isinstance(key, bytes | bytearray):
        raise TypeError("a key to wrap must be bytes")
    if not 0 < len(key) <= MAX_WRAPPED_KEY:
        raise UsageError(f"a key to wrap must be 1..{MAX_WRAPPED_KEY} bytes, not {len(key)}")


def kek_associated_data(kek_id: str, aad: bytes) -> bytes:
    """The AES-GCM associated data of a wrap: domain, KEK id, caller's aad.

    The KEK id cannot contain NUL, so the encoding is unambiguous; binding it
    means a blob presented under another version's id fails to authenticate
    even on a backend whose versions share key material.
    """
    return KEK_AAD_DOMAIN + kek_id.encode("utf-8") + b"\x00" + bytes(aad)
