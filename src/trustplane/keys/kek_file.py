"""The embedded default KEK store: every KEK version in one mode-0600 file.

The file is JSON: ``{"format": ..., "current": ID, "keys": [{"id", "key",
"created"}, ...]}`` with keys in standard base64. It is created at first use
with one random 256-bit KEK and only ever replaced whole (temporary file,
fsync, rename) under an exclusive lock on a sibling ``.lock`` file, so that
several processes sharing it (server workers, a CLI) never lose a version: a
rotation made by one process is seen by the others on their next wrap (the
file's identity is checked with one stat) or when they meet an unknown id.

This is the one place where a key is written in plaintext (DESIGN.md); the
file must be readable by its owner only, and we refuse to start otherwise.

Wrap = AES-256-GCM under the KEK, a random 96-bit nonce and associated data
that binds the KEK id and the caller's aad. Blob: ``0x01 | nonce | ct | tag``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import re
import secrets
import stat
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from trustplane.atomic import atomic_write
from trustplane.errors import (
    DecryptionKeyError,
    IntegrityError,
    MalformedError,
    NotFoundError,
    UsageError,
)
from trustplane.keys.kek import KekProvider, WrappedKey, check_key_to_wrap, kek_associated_data

FILE_FORMAT = "trustplane-kek-file/v1"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
BLOB_VERSION = 1
ID_PREFIX = "file:"
FILE_MODE = 0o600
DIR_MODE = 0o700
_ID_RE = re.compile(r"file:[0-9]{1,9}-[0-9a-f]{1,32}")
MAX_FILE_BYTES = 16 << 20
"""Even 100,000 versions fit; refuse to read anything absurd."""


@dataclass(frozen=True)
class _Keyring:
    """One immutable snapshot of the file: swapped whole, read without a lock."""

    current: str
    order: tuple[str, ...]
    ciphers: Mapping[str, AESGCM]
    identity: tuple[int, ...]
    """(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns) of the file it was read from."""


class FileKekProvider(KekProvider):
    """KEKs in a local file that only its owner can read (the embedded default)."""

    kind: ClassVar[str] = "file"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._mutex = threading.Lock()
        self._closed = False
        self._ring = self._load_or_create()

    # -- KekProvider -------------------------------------------------------

    def current_id(self) -> str:
        return self._fresh_ring().current

    def known_ids(self) -> tuple[str, ...]:
        return self._fresh_ring().order

    def wrap(self, key: bytes, aad: bytes) -> WrappedKey:
        check_key_to_wrap(key)
        ring = self._fresh_ring()
        kek_id = ring.current
        nonce = os.urandom(NONCE_BYTES)
        sealed = ring.ciphers[kek_id].encrypt(nonce, bytes(key), kek_associated_data(kek_id, aad))
        return WrappedKey(kek_id=kek_id, blob=bytes([BLOB_VERSION]) + nonce + sealed)

    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        ring = self._ring_knowing(wrapped.kek_id)
        blob = wrapped.blob
        if len(blob) < 1 + NONCE_BYTES + TAG_BYTES + 1 or blob[0] != BLOB_VERSION:
            raise IntegrityError(f"wrapped key under KEK {wrapped.kek_id} is malformed")
        nonce, sealed = blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :]
        try:
            return ring.ciphers[wrapped.kek_id].decrypt(
                nonce, sealed, kek_associated_data(wrapped.kek_id, aad)
            )
        except InvalidTag:
            raise IntegrityError(
                f"wrapped key under KEK {wrapped.kek_id} does not authenticate "
                "(tampered, or bound to other associated data)"
            ) from None

    def rotate(self) -> str:
        with self._exclusive():
            entries, _ = self._read_entries()
            new_id = _new_id(entries)
            entries.append(
                {
                    "id": new_id,
                    "key": base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii"),
                    "created": _now(),
                }
            )
            self._write_entries(entries, new_id)
        return new_id

    def retire(self, kek_id: str) -> None:
        with self._exclusive():
            entries, current = self._read_entries()
            if kek_id == current:
                raise UsageError(f"KEK {kek_id} is the current KEK; rotate before retiring it")
            kept = [e for e in entries if e["id"] != kek_id]
            if len(kept) == len(entries):
                raise NotFoundError(f"no KEK {kek_id} in {self.path}")
            self._write_entries(kept, current)

    def close(self) -> None:
        self._closed = True

    # -- reading -----------------------------------------------------------

    def _fresh_ring(self) -> _Keyring:
        """The snapshot, re-read if another process replaced the file since."""
        ring = self._ring
        if self._closed:
            raise UsageError(f"the KEK file provider for {self.path} is closed")
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise NotFoundError(
                f"KEK file {self.path} disappeared; restore it from backup"
            ) from None
        if _identity(st) != ring.identity:
            with self._mutex:
                if self._ring.identity != _identity(st):
                    self._ring = self._read_ring()
                ring = self._ring
        return ring

    def _ring_knowing(self, kek_id: str) -> _Keyring:
        ring = self._fresh_ring()
        if kek_id not in ring.ciphers:
            raise DecryptionKeyError(
                f"KEK {kek_id} is not in {self.path} (retired, or from another KEK store)"
            )
        return ring

    def _load_or_create(self) -> _Keyring:
        if not self.path.exists():
            self._create()
        return self._read_ring()

    def _read_ring(self) -> _Keyring:
        data, st = _read_private(self.path)
        entries, current = _parse(data, self.path)
        ciphers = {e["id"]: AESGCM(_decode_key(e, self.path)) for e in entries}
        return _Keyring(
            current=current,
            order=tuple(e["id"] for e in entries),
            ciphers=ciphers,
            identity=_identity(st),
        )

    def _read_entries(self) -> tuple[list[dict[str, str]], str]:
        data, _ = _read_private(self.path)
        return _parse(data, self.path)

    # -- writing -----------------------------------------------------------

    def _create(self) -> None:
        """Create the file with one KEK unless another process just did (link, not rename)."""
        parent = self.path.parent
        if not parent.exists():
            parent.mkdir(parents=True, mode=DIR_MODE)
        first = _new_id([])
        entries = [
            {
                "id": first,
                "key": base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii"),
                "created": _now(),
            }
        ]
        # Linked, not renamed, into place: never replace KEKs another process just made.
        atomic_write(self.path, _serialize(entries, first), FILE_MODE, replace=False)

    def _write_entries(self, entries: list[dict[str, str]], current: str) -> None:
        atomic_write(self.path, _serialize(entries, current), FILE_MODE)
        with self._mutex:
            self._ring = self._read_ring()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Serialize read-modify-write of the file across threads and processes."""
        if self._closed:
            raise UsageError(f"the KEK file provider for {self.path} is closed")
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock


def _read_private(path: Path) -> tuple[bytes, os.stat_result]:
    """Read the KEK file after checking, on the open descriptor, that only its owner can."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise NotFoundError(f"KEK file {path} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(
                f"KEK file {path} is a symbolic link; name the file itself (it is replaced "
                "by rename on rotation, which would turn the link into a file)"
            ) from None
        raise UsageError(f"cannot open KEK file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"KEK file {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise UsageError(
                f"KEK file {path} has mode {mode:04o}: group or others can access it; "
                f"refusing to use exposed key-encryption keys (chmod 600 {path} once you "
                "are sure nobody else read it, or rotate and re-wrap)"
            )
        if st.st_uid != os.geteuid():
            raise UsageError(
                f"KEK file {path} belongs to uid {st.st_uid}, not to us ({os.geteuid()})"
            )
        if st.st_size > MAX_FILE_BYTES:
            raise MalformedError(f"KEK file {path} is {st.st_size} bytes; not a KEK file")
        return fh.read(MAX_FILE_BYTES + 1), st


def _parse(data: bytes, path: Path) -> tuple[list[dict[str, str]], str]:
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as exc:
        raise MalformedError(f"KEK file {path} is not JSON: {exc.msg}") from None
    except UnicodeDecodeError:
        raise MalformedError(f"KEK file {path} is not UTF-8 JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FILE_FORMAT:
        raise MalformedError(f"KEK file {path} is not a {FILE_FORMAT} document")
    raw = doc.get("keys")
    current = doc.get("current")
    if not isinstance(raw, list) or not raw or not isinstance(current, str):
        raise MalformedError(f"KEK file {path} has no keys or no current key")
    entries: list[dict[str, str]] = []
    for item in raw:
        if not (
            isinstance(item, dict)
            and all(isinstance(item.get(f), str) for f in ("id", "key", "created"))
        ):
            raise MalformedError(f"KEK file {path} has an entry without id, key or created")
        entries.append({"id": item["id"], "key": item["key"], "created": item["created"]})
    ids = [e["id"] for e in entries]
    if not all(_ID_RE.fullmatch(i) for i in ids):
        raise MalformedError(f"KEK file {path} has an id not of the form file:NNNN-HEX")
    if len(set(ids)) != len(ids) or current not in ids:
        raise MalformedError(f"KEK file {path} has duplicate ids or an unknown current id")
    return entries, current


def _decode_key(entry: Mapping[str, str], path: Path) -> bytes:
    try:
        key = base64.b64decode(entry["key"], validate=True)
    except (binascii.Error, ValueError):
        raise MalformedError(f"KEK {entry['id']} in {path} is not base64") from None
    if len(key) != KEY_BYTES:
        raise MalformedError(f"KEK {entry['id']} in {path} is not a 256-bit key")
    return key


def _serialize(entries: list[dict[str, str]], current: str) -> bytes:
    doc = {"format": FILE_FORMAT, "current": current, "keys": entries}
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def _new_id(entries: list[dict[str, str]]) -> str:
    """`file:NNNN-RANDOM`: ordered by version, and unique across files (a restored or
    replaced file cannot make an old id name a different key)."""
    versions = [int(e["id"][len(ID_PREFIX) :].split("-", 1)[0]) for e in entries]
    return f"{ID_PREFIX}{max(versions, default=0) + 1:04d}-{secrets.token_hex(4)}"


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
