"""The one base class of every encryptor: format, open/close, header fingerprint.

An encryptor puts a LUKS header on storage a backend made (`create`, the
only path that formats), opens an encrypted volume on a host (`open`:
a plaintext block device or file; `close` undoes it), checks a key
without opening (`check_key`) and fingerprints the header
(`fingerprint`; `verify_header` refuses a volume whose header is not the
recorded one).

**Nothing ever formats a volume that exists.** os-brick formats a volume
on its first attach when `cryptsetup isLuks` fails, so a volume whose
header was wiped is silently re-formatted; trustplane formats only while
creating, and `format` refuses storage that already carries a LUKS header.

The passphrase LUKS sees is the hex of the KMS key (`passphrase` below,
OpenStack's derivation). Keys are random 256-bit values, so a slow PBKDF
buys nothing and would be paid on every open: `iter_time_ms` (QEMU) or
forced PBKDF2 iterations (cryptsetup) keep an open well under 150 ms.
"""

from __future__ import annotations

import binascii
import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

from trustplane.api.volume_location import AnyLocation
from trustplane.api.volume_spec import (
    VOLUME_KEY_BYTES,
    EncryptionSpec,
    Engine,
    check_volume_size,
)
from trustplane.api.volumes import HeaderFingerprint
from trustplane.errors import (
    IntegrityError,
    MalformedError,
    TrustplaneError,
    UnsupportedError,
    UsageError,
)
from trustplane.tools import Executor
from trustplane.volumes.access import NodeCredentials, raw_reader
from trustplane.volumes.backends.base import Backend
from trustplane.volumes.header import (
    PROBE_BYTES,
    RawReader,
    fingerprint,
    is_luks,
    verify,
)
from trustplane.volumes.opening import OpenVolume

DEFAULT_ITER_TIME_MS = 10
"""QEMU's PBKDF time per open: 10 ms (DESIGN.md: 2000 ms default → 2.2 s per open)."""
PBKDF2_ITERATIONS = 1000
"""cryptsetup's minimum: a random 256-bit key needs no stretching."""


def check_key_bytes(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) != VOLUME_KEY_BYTES:
        raise UsageError(f"a volume key is {VOLUME_KEY_BYTES} random bytes")
    return key


def passphrase(key: bytes) -> bytes:
    """The LUKS passphrase of a volume key: the lowercase hex of the raw key.

    What Cinder and os-brick use (`binascii.hexlify(key).decode('utf-8')` in
    os-brick's encryptors), so a volume and its KMS key move between an
    OpenStack cloud and trustplane both ways. It is ASCII, which QEMU needs:
    its secrets are UTF-8 text.
    """
    if not isinstance(key, bytes) or not key:
        raise UsageError("a volume key is non-empty bytes")
    return binascii.hexlify(key)


class Encryptor(ABC):
    """Formats, opens and fingerprints volumes of one engine."""

    engine: ClassVar[Engine]

    def __init__(
        self, executor: Executor | None = None, *, iter_time_ms: int = DEFAULT_ITER_TIME_MS
    ) -> None:
        if iter_time_ms < 1:
            raise UsageError("the PBKDF iteration time is at least 1 ms")
        self.executor = executor or Executor()
        self.iter_time_ms = iter_time_ms

    # -- storage side ---------------------------------------------------------------

    @abstractmethod
    def header_bytes(self, spec: EncryptionSpec) -> int:
        """Raw bytes the LUKS header takes before the payload (the volume gets size + this)."""

    def create(
        self,
        backend: Backend,
        name: str,
        size: int,
        key: bytes,
        spec: EncryptionSpec,
        made: Callable[[AnyLocation], None] | None = None,
    ) -> AnyLocation:
        """New storage holding `size` usable bytes, formatted under `key`.

        Refuses a name that exists; a failure removes what it made. `made` is
        told the location as soon as the storage exists (before the format), so
        that a caller can record that this storage is its own (if `made` raises,
        the storage stays: it is the caller's, who was told where).
        """
        backend.check_name(name)
        check_volume_size(size)
        check_key_bytes(key)
        if backend.exists(name):
            raise UsageError(
                f"{backend.kind} volume {name} exists already; trustplane never formats "
                "a volume that exists"
            )
        location = backend.create(name, size + self.header_bytes(spec))
        if made is not None:
            made(location)
        try:
            self.format(backend, location, key, spec)
        except BaseException:
            with contextlib.suppress(TrustplaneError):
                backend.delete(location)
            raise
        return location

    def format(
        self, backend: Backend, location: AnyLocation, key: bytes, spec: EncryptionSpec
    ) -> None:
        """Write a LUKS header onto `location`, which must not have one."""
        check_key_bytes(key)
        self.refuse_existing_header(backend.reader(location), location)
        self._format(backend, location, key, spec)

    @staticmethod
    def refuse_existing_header(reader: RawReader, location: AnyLocation) -> None:
        if is_luks(reader.read(0, PROBE_BYTES)):
            raise UsageError(
                f"{location.describe()} has a LUKS header already; trustplane never "
                "formats a volume that exists"
            )

    @abstractmethod
    def _format(
        self, backend: Backend, location: AnyLocation, key: bytes, spec: EncryptionSpec
    ) -> None:
        """Write the header (the caller checked there is none)."""

    def fingerprint(self, reader: RawReader) -> HeaderFingerprint:
        """The header fingerprint the volume record keeps."""
        try:
            return fingerprint(reader)
        except MalformedError as exc:
            raise MalformedError(f"no fingerprint: {exc}") from None

    # -- host side ----------------------------------------------------------------

    def reader(
        self, location: AnyLocation, credentials: NodeCredentials | None = None
    ) -> RawReader:
        return raw_reader(location, self.executor, credentials)

    def verify_header(
        self,
        location: AnyLocation,
        expected: HeaderFingerprint,
        credentials: NodeCredentials | None = None,
    ) -> HeaderFingerprint:
        """Refuse (IntegrityError) a volume whose header is not the recorded one."""
        return verify(self.reader(location, credentials), expected, location.describe())

    @abstractmethod
    def open(
        self,
        location: AnyLocation,
        key: bytes,
        credentials: NodeCredentials | None = None,
        *,
        writable: bool = True,
    ) -> OpenVolume:
        """Open the volume on this host; DecryptionKeyError for a wrong key."""

    def extend(
        self,
        backend: Backend,
        location: AnyLocation,
        key: bytes,
        size: int,
        header_bytes: int,
        credentials: NodeCredentials | None = None,
    ) -> int:
        """Grow the detached volume to `size` usable bytes; the usable size read back.

        The key is checked first (a wrong key grows nothing). The backend grows
        the raw storage to the header's bytes (`header_bytes`, the payload
        offset) plus `size`; the LUKS header is not rewritten: LUKS1 records no
        payload size, and the LUKS2 headers made here have a dynamic segment
        (the payload runs to the end of the storage). Then the volume is opened
        with the key and its size read (IntegrityError unless it is at least
        `size`: more only when the backend rounds up, LVM's extents)."""
        check_key_bytes(key)
        check_volume_size(size)
        self.check_key(location, key, credentials)
        before = backend.size(location) - header_bytes
        if size < before:
            raise UsageError(
                f"{location.describe()} holds {before} usable bytes; shrinking it is refused"
            )
        backend.grow(location, header_bytes + size)
        seen = self.usable_size(location, key, credentials)
        if seen < size or seen != backend.size(location) - header_bytes:
            raise IntegrityError(
                f"{location.describe()}: {seen} usable bytes after growing it to {size} "
                f"(+{header_bytes} header bytes)"
            )
        return seen

    def usable_size(
        self, location: AnyLocation, key: bytes, credentials: NodeCredentials | None = None
    ) -> int:
        """The size the volume has opened with `key` (what a guest sees).

        Default: not done for this engine (UnsupportedError)."""
        raise UnsupportedError(f"reading the size of {self.engine} volumes is not done")

    @abstractmethod
    def check_key(
        self, location: AnyLocation, key: bytes, credentials: NodeCredentials | None = None
    ) -> None:
        """DecryptionKeyError unless `key` opens the volume (nothing stays open)."""
