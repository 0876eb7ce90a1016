"""KEKs that live in a KMIP server and never leave it.

Each KEK version is an AES-256 key created *on the server* (Create, then
Activate), usable only to Encrypt and Decrypt, marked Sensitive, with the
Object Group ``GROUP`` and the Name ``GROUP/vNNNN``. Nothing about the
versions is stored locally: at start, and whenever an unknown id turns up,
the provider Locates the active keys of its group and reads their names, so
the current version (the highest; ties, which two replicas rotating at once
can make, go to the larger id) and every older one survive restarts and are
shared by every replica.

Wrap = KMIP Encrypt with AES-256-GCM (KMIP 1.4 carries associated data and
tag): a fresh random 96-bit nonce from us, a 128-bit tag, and associated data
that binds the KEK id and the caller's aad (`kek_associated_data`). The
server does the whole AEAD operation, so the KEK is never sent to us. Blob:
``0x01 | nonce (12) | tag (16) | ciphertext``. Unwrap checks the layout and
the exact tag length before asking the server: PyKMIP accepts any tag length
down to 4 bytes on Decrypt, and a truncated tag would cut forgery
resistance from 2^-128 to 2^-32 per try.

Retire = Revoke (superseded) and Destroy on the server. Unwrapped keys are
cached in memory for `cache_ttl` seconds (see `key_cache`); wrap is never
cached, each call is one Encrypt.

Bound: random 96-bit nonces keep AES-GCM safe for 2^32 wraps per KEK
version (NIST SP 800-38D); rotate long before (one wrap per secret written).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from trustplane.errors import (
    DecryptionKeyError,
    IntegrityError,
    MalformedError,
    NotFoundError,
    UsageError,
)
from trustplane.keys.kek import KekProvider, WrappedKey, check_key_to_wrap, kek_associated_data
from trustplane.keys.key_cache import DEFAULT_MAX_ENTRIES, DEFAULT_TTL, UnwrapCache
from trustplane.keys.kmip_client import (
    DEFAULT_POOL_SIZE,
    DEFAULT_PORT,
    DEFAULT_TIMEOUT,
    KmipClient,
    KmipEndpoint,
    KmipOperationError,
)

DEFAULT_GROUP = "trustplane-kek"
DEFAULT_REFRESH_INTERVAL = 60.0
"""How stale this replica's idea of the current KEK may get after another rotates."""
ID_PREFIX = "kmip:"
NONCE_BYTES = 12
TAG_BYTES = 16
BLOB_VERSION = 1
_MISS_REFRESH_INTERVAL = 1.0
"""Unknown ids trigger a Locate at most this often, so garbage cannot flood the server."""
_INTEGRITY_REASONS = {"GENERAL_FAILURE", "CRYPTOGRAPHIC_FAILURE"}
_GROUP_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class _Versions:
    """Immutable snapshot of the group's active KEKs: swapped whole, read without a lock."""

    current: str
    order: tuple[str, ...]
    uid_of: Mapping[str, str]
    refreshed: float


class KmipKekProvider(KekProvider):
    """KEK versions as non-extractable AES keys in a KMIP server, used through Encrypt/Decrypt."""

    kind: ClassVar[str] = "kmip"

    def __init__(
        self,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        ca_file: Path,
        cert_file: Path,
        key_file: Path,
        server_name: str | None = None,
        group: str = DEFAULT_GROUP,
        pool_size: int = DEFAULT_POOL_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
        cache_ttl: float = DEFAULT_TTL,
        cache_size: int = DEFAULT_MAX_ENTRIES,
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
    ) -> None:
        if not _GROUP_RE.fullmatch(group):
            raise UsageError(f"KMIP KEK group {group!r}: use 1-64 letters, digits, '.', '_', '-'")
        self.group = group
        self.refresh_interval = refresh_interval
        self._name_re = re.compile(re.escape(group) + r"/v([0-9]{1,9})")
        endpoint = KmipEndpoint(
            host=host,
            port=port,
            ca_file=Path(ca_file),
            cert_file=Path(cert_file),
            key_file=Path(key_file),
            server_name=server_name,
        )
        self._client = KmipClient(endpoint, pool_size=pool_size, timeout=timeout)
        self._cache = UnwrapCache(ttl=cache_ttl, max_entries=cache_size)
        self._refresh_lock = threading.Lock()
        self._change_lock = threading.Lock()
        self._last_miss_refresh = 0.0
        try:
            self._versions = self._read_versions(create_if_empty=True)
        except BaseException:
            self._client.close()
            raise

    @property
    def endpoint(self) -> KmipEndpoint:
        return self._client.endpoint

    # -- KekProvider -------------------------------------------------------

    def current_id(self) -> str:
        return self._current_versions().current

    def known_ids(self) -> tuple[str, ...]:
        return self._refresh(wait=True).order

    def wrap(self, key: bytes, aad: bytes) -> WrappedKey:
        check_key_to_wrap(key)
        versions = self._current_versions()
        kek_id = versions.current
        uid = versions.uid_of[kek_id]
        nonce = os.urandom(NONCE_BYTES)
        try:
            ciphertext, tag = self._client.encrypt_gcm(
                uid, bytes(key), nonce, kek_associated_data(kek_id, aad)
            )
        except NotFoundError:
            self._refresh(wait=False)
            raise NotFoundError(
                f"KEK {kek_id} vanished from KMIP server {self.endpoint}; retry to use the newest"
            ) from None
        return WrappedKey(kek_id=kek_id, blob=bytes([BLOB_VERSION]) + nonce + tag + ciphertext)

    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        kek_id, blob = wrapped.kek_id, wrapped.blob
        uid = self._uid_for(kek_id)
        if len(blob) < 1 + NONCE_BYTES + TAG_BYTES + 1 or blob[0] != BLOB_VERSION:
            raise IntegrityError(f"wrapped key under KEK {kek_id} is malformed")
        cached = self._cache.get(kek_id, blob, aad)
        if cached is not None:
            return cached
        nonce = blob[1 : 1 + NONCE_BYTES]
        tag = blob[1 + NONCE_BYTES : 1 + NONCE_BYTES + TAG_BYTES]
        ciphertext = blob[1 + NONCE_BYTES + TAG_BYTES :]
        try:
            key = self._client.decrypt_gcm(
                uid, ciphertext, nonce, kek_associated_data(kek_id, aad), tag
            )
        except KmipOperationError as exc:
            if exc.reason not in _INTEGRITY_REASONS:
                raise
            raise IntegrityError(
                f"wrapped key under KEK {kek_id} does not authenticate (tampered, or bound to "
                f"other associated data); KMIP server {self.endpoint} said {exc.reason.lower()}"
            ) from None
        except NotFoundError:
            self._cache.forget_kek(kek_id)
            self._refresh(wait=False)
            raise DecryptionKeyError(
                f"KEK {kek_id} no longer exists on KMIP server {self.endpoint}"
            ) from None
        self._cache.put(kek_id, blob, aad, key)
        return key

    def rotate(self) -> str:
        with self._change_lock:
            versions = self._refresh(wait=True)
            newest = max((self._version_of(k) for k in versions.order), default=0)
            version = newest + 1
            uid = self._client.create_aes_key(f"{self.group}/v{version:04d}", self.group)
            self._refresh(wait=True)
            return _kek_id(version, uid)

    def retire(self, kek_id: str) -> None:
        with self._change_lock:
            versions = self._refresh(wait=True)
            if kek_id == versions.current:
                raise UsageError(f"KEK {kek_id} is the current KEK; rotate before retiring it")
            uid = versions.uid_of.get(kek_id)
            if uid is None:
                raise NotFoundError(f"no active KEK {kek_id} on KMIP server {self.endpoint}")
            self._cache.forget_kek(kek_id)
            self._client.revoke_and_destroy(uid)
            self._refresh(wait=True)
            self._cache.forget_kek(kek_id)

    def close(self) -> None:
        self._client.close()
        self._cache.clear()

    # -- versions ----------------------------------------------------------

    def _current_versions(self) -> _Versions:
        versions = self._versions
        if time.monotonic() - versions.refreshed > self.refresh_interval:
            versions = self._refresh(wait=False)
        return versions

    def _uid_for(self, kek_id: str) -> str:
        uid = self._versions.uid_of.get(kek_id)
        if uid is None and kek_id.startswith(ID_PREFIX):
            now = time.monotonic()
            if now - self._last_miss_refresh >= _MISS_REFRESH_INTERVAL:
                self._last_miss_refresh = now
                uid = self._refresh(wait=True).uid_of.get(kek_id)
        if uid is None:
            raise DecryptionKeyError(
                f"KEK {kek_id} is not an active KEK of group {self.group} on KMIP server "
                f"{self.endpoint} (retired, or from another KEK store)"
            )
        return uid

    def _refresh(self, *, wait: bool) -> _Versions:
        """Re-read the group from the server; without `wait`, skip if another thread is at it."""
        if not self._refresh_lock.acquire(blocking=wait):
            return self._versions
        try:
            self._versions = self._read_versions(create_if_empty=False)
            return self._versions
        finally:
            self._refresh_lock.release()

    def _read_versions(self, *, create_if_empty: bool) -> _Versions:
        uids = self._client.locate_active(self.group)
        found: list[tuple[int, str]] = []
        for uid, names in self._client.names(uids).items():
            for name in names:
                match = self._name_re.fullmatch(name)
                if match:
                    found.append((int(match.group(1)), uid))
                    break
        if not found:
            if not create_if_empty:
                raise MalformedError(
                    f"KMIP server {self.endpoint} has no active KEK in group {self.group} "
                    "(were they all revoked outside trustplane?)"
                )
            uid = self._client.create_aes_key(f"{self.group}/v0001", self.group)
            found = [(1, uid)]
        # Versions first, then ids, ordered alike on every replica.
        found.sort(key=lambda item: (item[0], len(item[1]), item[1]))
        order = tuple(_kek_id(version, uid) for version, uid in found)
        uid_of = {kek_id: uid for kek_id, (_, uid) in zip(order, found, strict=True)}
        return _Versions(current=order[-1], order=order, uid_of=uid_of, refreshed=time.monotonic())

    @staticmethod
    def _version_of(kek_id: str) -> int:
        return int(kek_id[len(ID_PREFIX) + 1 :].split(":", 1)[0])


def _kek_id(version: int, uid: str) -> str:
    """`kmip:vNNNN:UID`: the version orders KEKs for people, the server's id finds the key."""
    return f"{ID_PREFIX}v{version:04d}:{uid}"
