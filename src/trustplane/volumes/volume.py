"""The calls the block-storage service makes: create, extend, re-key and delete a volume.

The service orders a key from the KMS, calls `create_volume` with it and
stores what comes back (`CreatedVolume`: location, engine, header
fingerprint, all JSON) with the key's UUID, never the key. Everything
about tools, formats and backends stays in this package.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict

from trustplane.api.volume_location import AnyLocation, Location
from trustplane.api.volume_spec import Engine, VolumeTypeSpec, check_volume_size
from trustplane.api.volumes import HeaderFingerprint
from trustplane.errors import TrustplaneError, UnsupportedError, UsageError
from trustplane.volumes.backends.base import Backend
from trustplane.volumes.encryptors import QemuLuksEncryptor, encryptor_for


class CreatedVolume(BaseModel):
    """What the volume record keeps about a new volume (no secret in it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    location: Location
    size: int
    """Usable bytes (the LUKS header comes on top)."""
    engine: Engine | None
    fingerprint: HeaderFingerprint | None


def create_volume(
    backend: Backend,
    volume_type: VolumeTypeSpec,
    name: str,
    size: int,
    key: bytes | None,
    made: Callable[[AnyLocation], None] | None = None,
) -> CreatedVolume:
    """Create volume `name` of `size` usable bytes on `backend`, encrypted under `key`.

    A plain type takes no key. A failure leaves no storage behind; a name
    that exists is refused (nothing is ever formatted twice). `made` is told the
    location once the storage exists (before its format; see `Encryptor.create`).
    """
    if volume_type.backend is not backend.kind:
        raise UsageError(f"the volume type is for {volume_type.backend}, not {backend.kind}")
    engine = volume_type.engine
    if engine is None or volume_type.encryption is None:
        if key is not None:
            raise UsageError("a plain volume type takes no key")
        backend.check_name(name)
        location = backend.create(name, check_volume_size(size))
        if made is not None:
            made(location)
        return CreatedVolume(location=location, size=size, engine=None, fingerprint=None)
    if key is None:
        raise UsageError("an encrypted volume type needs a key from the KMS")
    encryptor = encryptor_for(engine, backend.executor)
    location = encryptor.create(backend, name, size, key, volume_type.encryption, made)
    try:
        fingerprint = encryptor.fingerprint(backend.reader(location))
    except BaseException:
        with contextlib.suppress(TrustplaneError):
            backend.delete(location)
        raise
    return CreatedVolume(location=location, size=size, engine=engine, fingerprint=fingerprint)


def extend_volume(
    backend: Backend,
    volume_type: VolumeTypeSpec,
    location: Location,
    size: int,
    key: bytes,
    expected: HeaderFingerprint,
) -> int:
    """Grow a detached encrypted volume to `size` usable bytes under its own `key`;
    the usable size it has then (`size`, or more where the backend rounds up).

    The header is checked against the record first (a replaced volume is not
    grown) and again after (growing never rewrites it). The raw storage grows
    to the recorded payload offset plus `size` (`Backend.grow`: a file, a LUN
    re-added to tgtd, `lvextend`, `rbd resize`)."""
    engine = volume_type.engine
    if engine is None or volume_type.encryption is None:
        raise UnsupportedError("extending a plain volume is not done")
    encryptor = encryptor_for(engine, backend.executor)
    credentials = backend.credentials()
    encryptor.verify_header(location, expected, credentials)
    seen = encryptor.extend(
        backend, location, key, check_volume_size(size), expected.header_bytes, credentials
    )
    encryptor.verify_header(location, expected, credentials)
    return seen


def key_slots(backend: Backend, volume_type: VolumeTypeSpec) -> QemuLuksEncryptor:
    """The encryptor that changes key slots of this type's volumes (QEMU's LUKS1 only).

    `qemu-img amend` rewrites LUKS1 key slots; a LUKS2 header (dm-crypt's,
    librbd's) would need `cryptsetup luksAddKey/luksKillSlot` on a host with
    device-mapper or `rbd encryption`: not done."""
    if volume_type.engine is not Engine.QEMU:
        raise UnsupportedError(
            f"rotating the passphrase of {volume_type.engine} volumes is not done "
            "(QEMU's LUKS1 volumes only)"
        )
    encryptor = encryptor_for(Engine.QEMU, backend.executor)
    assert isinstance(encryptor, QemuLuksEncryptor)
    return encryptor


def delete_volume(backend: Backend, location: Location) -> None:
    """Destroy the volume's storage (idempotent). The service destroys the key first."""
    backend.delete(location)
