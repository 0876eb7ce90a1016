"""Extend an encrypted volume offline, on every backend, with the real storage tools.

For each backend and engine: a volume of 16 MiB gets data, grows to 32 MiB
(`extend_volume`: the backend grows the raw storage to the payload offset
plus the size, the encryptor opens it with the key and reads its size), and
then the data written before reads back, the volume opens with exactly
32 MiB usable (the LUKS header accounted for), the new last MiB takes data,
a shrink is refused and a wrong key grows nothing. Files; an iSCSI LUN of
tgtd (the backing file grown, the LUN added again, refused while an
initiator is logged in); Ceph RBD with QEMU's LUKS1 and librbd's LUKS1 and
LUKS2; LVM with dm-crypt LUKS1 and LUKS2 in the device-mapper guest.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from missing import component_missing
from storage_helpers import marker_block
from volume_helpers import file_backend, iscsi_backend, rbd_backend

from trustplane.api.volume_location import AnyLocation, LvmLocation
from trustplane.api.volume_spec import (
    BackendKind,
    ControlLocation,
    EncryptionSpec,
    Provider,
    VolumeTypeSpec,
)
from trustplane.embedded.dm_guest import DmGuest
from trustplane.embedded.tgtd import RunningTgtd, start_tgtd
from trustplane.errors import DecryptionKeyError, TrustplaneError, UsageError
from trustplane.volumes.backends import Backend, LvmBackend
from trustplane.volumes.encryptors import DmCryptEncryptor, encryptor_for
from trustplane.volumes.encryptors.base import Encryptor
from trustplane.volumes.volume import CreatedVolume, create_volume, extend_volume

MIB = 1 << 20


@pytest.fixture(scope="module")
def private_tgtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTgtd]:
    try:
        daemon = start_tgtd(tmp_path_factory.mktemp("extend-tgtd"))
    except TrustplaneError as exc:
        component_missing("tgtd", str(exc))
    with daemon:
        yield daemon


@pytest.fixture
def make_backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[[BackendKind], Backend]:
    def make(kind: BackendKind) -> Backend:
        if kind is BackendKind.FILE:
            return file_backend(tmp_path / "volumes")
        if kind is BackendKind.ISCSI:
            return iscsi_backend(request.getfixturevalue("private_tgtd"), tmp_path / "luns")
        return rbd_backend(request.getfixturevalue("ceph"))

    return make


def _write(encryptor: Encryptor, location: AnyLocation, backend: Backend, key: bytes,
           offset: int, data: bytes) -> None:  # fmt: skip
    with (
        encryptor.open(location, key, backend.credentials(), loop=False) as opened,  # type: ignore[call-arg]
        Path(opened.path).open("r+b") as plain,
    ):
        plain.seek(offset)
        plain.write(data)


def _read(encryptor: Encryptor, location: AnyLocation, backend: Backend, key: bytes,
          offset: int, length: int) -> tuple[bytes, int]:  # fmt: skip
    """`length` bytes at `offset` of the plaintext, and the plaintext's size."""
    with (
        encryptor.open(location, key, backend.credentials(), writable=False, loop=False) as opened,  # type: ignore[call-arg]
        Path(opened.path).open("rb") as plain,
    ):
        plain.seek(offset)
        data = plain.read(length)
        return data, plain.seek(0, 2)


CASES = [
    pytest.param(BackendKind.FILE, Provider.LUKS, ControlLocation.FRONT_END, id="file-qemu"),
    pytest.param(BackendKind.ISCSI, Provider.LUKS, ControlLocation.FRONT_END, id="iscsi-qemu"),
    pytest.param(BackendKind.RBD, Provider.LUKS, ControlLocation.FRONT_END, id="rbd-qemu"),
    pytest.param(BackendKind.RBD, Provider.LUKS, ControlLocation.BACK_END, id="rbd-librbd-luks1"),
    pytest.param(BackendKind.RBD, Provider.LUKS2, ControlLocation.BACK_END, id="rbd-librbd-luks2"),
]


@pytest.mark.parametrize(("kind", "provider", "control"), CASES)
def test_extend_keeps_the_data_and_gives_exactly_the_size_asked(
    make_backend: Callable[[BackendKind], Backend],
    kind: BackendKind,
    provider: Provider,
    control: ControlLocation,
) -> None:
    backend = make_backend(kind)
    spec = VolumeTypeSpec(
        backend=kind, encryption=EncryptionSpec(provider=provider, control_location=control)
    )
    key = secrets.token_bytes(32)
    name = f"grow-{secrets.token_hex(3)}"
    created = create_volume(backend, spec, name, 16 * MIB, key)
    assert created.engine is not None
    assert created.fingerprint is not None
    location = created.location
    encryptor = encryptor_for(created.engine)
    header = created.fingerprint.header_bytes
    marker = marker_block(f"before-the-extend-{secrets.token_hex(6)}".encode(), 64 * 1024)
    try:
        _write(encryptor, location, backend, key, MIB, marker)
        assert encryptor.usable_size(location, key, backend.credentials()) == 16 * MIB

        # A wrong key grows nothing.
        with pytest.raises(DecryptionKeyError):
            extend_volume(backend, spec, location, 32 * MIB, secrets.token_bytes(32),
                          created.fingerprint)  # fmt: skip
        assert backend.size(location) == header + 16 * MIB

        grown = extend_volume(backend, spec, location, 32 * MIB, key, created.fingerprint)
        assert grown == 32 * MIB
        assert backend.size(location) == header + 32 * MIB
        assert encryptor.usable_size(location, key, backend.credentials()) == 32 * MIB
        data, seen = _read(encryptor, location, backend, key, MIB, len(marker))
        assert data == marker
        assert seen == 32 * MIB
        # The new end takes data and gives it back.
        tail = marker_block(f"in-the-new-mib-{secrets.token_hex(6)}".encode(), MIB)
        _write(encryptor, location, backend, key, 31 * MIB, tail)
        assert _read(encryptor, location, backend, key, 31 * MIB, MIB)[0] == tail

        with pytest.raises(UsageError, match="shrinking it is refused"):
            extend_volume(backend, spec, location, 16 * MIB, key, created.fingerprint)
        # The same size again is harmless (a retry after a crash).
        assert extend_volume(backend, spec, location, 32 * MIB, key, created.fingerprint) == (
            32 * MIB
        )
        assert _read(encryptor, location, backend, key, MIB, len(marker))[0] == marker
    finally:
        backend.delete(location)


def test_a_lun_in_use_by_an_initiator_is_not_grown(
    make_backend: Callable[[BackendKind], Backend],
) -> None:
    """tgtd re-reads a backing file's size only when its LUN is added again, which would
    pull the disk from under a logged-in initiator: refused, nothing changed."""
    backend = make_backend(BackendKind.ISCSI)
    spec = VolumeTypeSpec(backend=BackendKind.ISCSI, encryption=EncryptionSpec())
    key = secrets.token_bytes(32)
    created: CreatedVolume = create_volume(backend, spec, "busy", 16 * MIB, key)
    assert created.engine is not None
    assert created.fingerprint is not None
    location = created.location
    encryptor = encryptor_for(created.engine)
    raw = backend.size(location)
    try:
        with encryptor.open(location, key, backend.credentials(), loop=False):  # type: ignore[call-arg]
            with pytest.raises(UsageError, match="an initiator is logged in"):
                extend_volume(backend, spec, location, 32 * MIB, key, created.fingerprint)
            assert backend.size(location) == raw
        assert encryptor.usable_size(location, key, backend.credentials()) == 16 * MIB
        assert extend_volume(backend, spec, location, 32 * MIB, key, created.fingerprint) == (
            32 * MIB
        )
    finally:
        backend.delete(location)


@pytest.fixture
def volume_group(dm_guest: DmGuest) -> Iterator[str]:
    """A volume group with 1 MiB extents (every MiB size exact) on a scratch disk."""
    ex = dm_guest.executor
    name = f"tpgrow{secrets.token_hex(3)}"
    with dm_guest.scratch_disk() as disk:
        ex.run(["pvcreate", "--yes", disk.device])
        try:
            ex.run(["vgcreate", "--physicalextentsize", "1m", name, disk.device])
            yield name
            ex.run(["vgremove", "--yes", "--force", name])
        finally:
            ex.run(["pvremove", "--yes", "--force", disk.device], check=False)


def _dd(ex: object, argv: list[str], stdin: bytes | None = None) -> bytes:
    out = ex.run(argv, stdin=stdin)  # type: ignore[attr-defined]
    return bytes(out.stdout)


@pytest.mark.parametrize("provider", [Provider.LUKS, Provider.LUKS2])
def test_lvm_with_dm_crypt_grows_with_lvextend(
    dm_guest: DmGuest, volume_group: str, provider: Provider
) -> None:
    ex = dm_guest.executor
    backend = LvmBackend(volume_group, ex)
    spec = VolumeTypeSpec(backend=BackendKind.LVM, encryption=EncryptionSpec(provider=provider))
    key = secrets.token_bytes(32)
    created = create_volume(backend, spec, "grow", 16 * MIB, key)
    assert isinstance(created.location, LvmLocation)
    assert created.fingerprint is not None
    location = created.location
    encryptor = DmCryptEncryptor(ex)
    marker = marker_block(f"lvm-before-{secrets.token_hex(6)}".encode(), 64 * 1024)
    with encryptor.open(location, key) as opened:
        _dd(ex, ["dd", f"of={opened.path}", "bs=4096", "seek=256", "conv=fsync,notrunc"], marker)
    assert encryptor.usable_size(location, key) == 16 * MIB

    with pytest.raises(DecryptionKeyError):
        extend_volume(backend, spec, location, 32 * MIB, secrets.token_bytes(32),
                      created.fingerprint)  # fmt: skip
    assert backend.size(location) == created.fingerprint.header_bytes + 16 * MIB
    assert extend_volume(backend, spec, location, 32 * MIB, key, created.fingerprint) == 32 * MIB
    assert backend.size(location) == created.fingerprint.header_bytes + 32 * MIB
    with encryptor.open(location, key) as opened:
        size = int(ex.run(["blockdev", "--getsize64", opened.path]).text)
        data = _dd(ex, ["dd", f"if={opened.path}", "bs=4096", "skip=256", "count=16"])
        tail = marker_block(b"lvm-new-end", 4096)
        _dd(ex, ["dd", f"of={opened.path}", "bs=4096", f"seek={32 * 256 - 1}",
                 "conv=fsync,notrunc"], tail)  # fmt: skip
        back = _dd(ex, ["dd", f"if={opened.path}", "bs=4096", f"skip={32 * 256 - 1}", "count=1"])
    assert size == 32 * MIB
    assert data == marker
    assert back == tail
    with pytest.raises(UsageError, match="shrinking it is refused"):
        extend_volume(backend, spec, location, 16 * MIB, key, created.fingerprint)
    backend.delete(location)
    assert "trustplane-" not in ex.run(["dmsetup", "ls"]).text
