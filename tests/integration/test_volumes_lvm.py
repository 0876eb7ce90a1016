"""LVM volumes with dm-crypt, run for real in the device-mapper test guest.

The same driver code as on a production host with device-mapper
(`LvmBackend`, `DmCryptEncryptor`), its commands sent through the guest's
executor: lvcreate, `cryptsetup luksFormat` with the key on stdin, open,
write, close. The host checks the guest's raw disk image: the marker is not
there. The passphrase is OpenStack's, so a volume formatted the os-brick way
opens here and ours passes cryptsetup's `--test-passphrase` there.
"""

from __future__ import annotations

import binascii
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from storage_helpers import marker_block

from trustplane.api.volume_location import LvmLocation
from trustplane.api.volume_spec import BackendKind, EncryptionSpec, Provider, VolumeTypeSpec
from trustplane.embedded.dm_guest import DmGuest, GuestDisk
from trustplane.errors import DecryptionKeyError, IntegrityError, UsageError
from trustplane.tools import Executor
from trustplane.volumes.backends import LvmBackend
from trustplane.volumes.encryptors import DmCryptEncryptor
from trustplane.volumes.header import parse_header
from trustplane.volumes.volume import create_volume

MIB = 1 << 20


@dataclass
class VolumeGroup:
    name: str
    disk: GuestDisk
    executor: Executor


@pytest.fixture
def volume_group(dm_guest: DmGuest) -> Iterator[VolumeGroup]:
    """A volume group on a scratch disk of the guest; nothing mapped is left after."""
    ex = dm_guest.executor
    name = f"tpvol{secrets.token_hex(3)}"
    with dm_guest.scratch_disk() as disk:
        ex.run(["pvcreate", "--yes", disk.device])
        try:
            ex.run(["vgcreate", name, disk.device])
            yield VolumeGroup(name, disk, ex)
            ex.run(["vgremove", "--yes", "--force", name])
        finally:
            ex.run(["pvremove", "--yes", "--force", disk.device], check=False)
    left = ex.run(["dmsetup", "ls"]).text
    assert "No devices found" in left, f"dm devices left behind: {left}"


def _on_disk(disk: GuestDisk, needle: bytes) -> bool:
    with disk.path.open("rb") as image:
        carry = b""
        while chunk := image.read(8 << 20):
            if needle in carry + chunk:
                return True
            carry = chunk[-len(needle) :]
    return False


def _write(ex: Executor, device: str, data: bytes, offset: int = 0) -> None:
    ex.run(
        ["dd", f"of={device}", "bs=4096", f"seek={offset // 4096}", "conv=fsync,notrunc"],
        stdin=data,
    )


def _read(ex: Executor, device: str, length: int, offset: int = 0) -> bytes:
    count = (length + 4095) // 4096
    out = ex.run(["dd", f"if={device}", "bs=4096", f"skip={offset // 4096}", f"count={count}"])
    return out.stdout[:length]


@pytest.mark.parametrize("provider", [Provider.LUKS, Provider.LUKS2])
def test_lvm_volume_with_dm_crypt_holds_no_plaintext(
    volume_group: VolumeGroup, provider: Provider
) -> None:
    ex = volume_group.executor
    backend = LvmBackend(volume_group.name, ex)
    volume_type = VolumeTypeSpec(
        backend=BackendKind.LVM, encryption=EncryptionSpec(provider=provider)
    )
    key = secrets.token_bytes(32)
    created = create_volume(backend, volume_type, "vol1", 16 * MIB, key)
    location = created.location
    assert isinstance(location, LvmLocation)
    assert created.fingerprint is not None
    assert created.fingerprint.version == volume_type.encryption.luks_version  # type: ignore[union-attr]
    header = parse_header(backend.reader(location))
    assert backend.size(location) >= header.data_offset + 16 * MIB
    encryptor = DmCryptEncryptor(ex)
    marker = marker_block(b"trustplane-lvm-" + secrets.token_hex(6).encode(), 64 * 1024)
    with encryptor.open(location, key) as opened:
        assert opened.path == "/dev/mapper/trustplane-vol1"
        assert int(ex.run(["blockdev", "--getsize64", opened.path]).text) >= 16 * MIB
        _write(ex, opened.path, marker, offset=MIB)
        assert _read(ex, opened.path, len(marker), offset=MIB) == marker
    assert "trustplane-vol1" not in ex.run(["dmsetup", "ls"]).text
    ex.run(["sync"])
    assert not _on_disk(volume_group.disk, marker[:64])
    # The key reached cryptsetup on stdin only: nothing of it in the guest's tmpfs.
    assert ex.run(["find", "/run/tp", "-path", "*/s/*"]).text == ""

    encryptor.check_key(location, key)
    with pytest.raises(DecryptionKeyError, match="No key available with this passphrase"):
        encryptor.check_key(location, secrets.token_bytes(32))
    with pytest.raises(DecryptionKeyError):
        encryptor.open(location, secrets.token_bytes(32))
    assert "trustplane-vol1" not in ex.run(["dmsetup", "ls"]).text
    encryptor.verify_header(location, created.fingerprint)
    with pytest.raises(UsageError, match="never formats a volume that exists"):
        encryptor.format(backend, location, key, volume_type.encryption)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="exists already"):
        create_volume(backend, volume_type, "vol1", 16 * MIB, key)

    # Re-formatted behind the service's back (same key even): refused by the fingerprint.
    ex.run(
        ["cryptsetup", "--batch-mode", "luksFormat", "--type", f"luks{header.version}",
         "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", "-",
         location.device],
        stdin=binascii.hexlify(key),
    )  # fmt: skip
    with pytest.raises(IntegrityError, match="replaced or re-formatted, refused"):
        encryptor.verify_header(location, created.fingerprint)
    backend.delete(location)
    assert not backend.exists("vol1")


def test_os_brick_formatted_volume_opens_and_ours_passes_its_test_passphrase(
    volume_group: VolumeGroup,
) -> None:
    """os-brick's LuksEncryptor: `cryptsetup --batch-mode luksFormat --type luks1
    --key-file=- DEV` and `luksOpen --key-file=- DEV NAME`, the passphrase being
    binascii.hexlify(key) on stdin."""
    ex = volume_group.executor
    backend = LvmBackend(volume_group.name, ex)
    encryptor = DmCryptEncryptor(ex)
    key = secrets.token_bytes(32)
    theirs = backend.create("openstack", 16 * MIB)
    assert isinstance(theirs, LvmLocation)
    openstack_passphrase = binascii.hexlify(key).decode("utf-8").encode()
    ex.run(
        ["cryptsetup", "--batch-mode", "luksFormat", "--type", "luks1", "--key-file=-",
         theirs.device],
        stdin=openstack_passphrase,
        timeout=300,
    )  # fmt: skip
    marker = marker_block(b"openstack-made-" + os.urandom(4).hex().encode(), 8192)
    ex.run(["cryptsetup", "luksOpen", "--key-file=-", theirs.device, "osbrick"],
           stdin=openstack_passphrase)  # fmt: skip
    try:
        _write(ex, "/dev/mapper/osbrick", marker)
    finally:
        ex.run(["cryptsetup", "luksClose", "osbrick"])
    with encryptor.open(theirs, key) as opened:
        assert _read(ex, opened.path, len(marker)) == marker

    ours = create_volume(
        backend, VolumeTypeSpec(backend=BackendKind.LVM), "ours", 16 * MIB, key
    ).location
    assert isinstance(ours, LvmLocation)
    test = ["cryptsetup", "luksOpen", "--test-passphrase", "--key-file=-", ours.device]
    ex.run(test, stdin=openstack_passphrase)
    refused = ex.run(test, stdin=binascii.hexlify(secrets.token_bytes(32)), check=False)
    assert refused.returncode == 2
    assert b"No key available with this passphrase" in refused.stderr
    for location in (theirs, ours):
        backend.delete(location)
