"""File volumes end to end on this host: QEMU's LUKS, the header fingerprint,
the refusals, the user-space open, and the passphrase shared with os-brick.

Real tools only (qemu-img, qemu-io, qemu-storage-daemon, cryptsetup on files,
losetup); the attacker of each refusal has exactly the access named.
"""

from __future__ import annotations

import binascii
import os
import re
import secrets
import uuid
from pathlib import Path

import pytest

from trustplane.api.volume_location import FileLocation
from trustplane.api.volume_spec import BackendKind, EncryptionSpec, Provider, VolumeTypeSpec
from trustplane.errors import DecryptionKeyError, IntegrityError, MalformedError, UsageError
from trustplane.tools import Executor, mount_points
from trustplane.volumes.access import FileRawReader
from trustplane.volumes.backends import FileBackend
from trustplane.volumes.encryptors import QemuLuksEncryptor
from trustplane.volumes.encryptors.base import passphrase
from trustplane.volumes.encryptors.dm_crypt import format_argv
from trustplane.volumes.header import fingerprint, parse_header
from trustplane.volumes.volume import create_volume, delete_volume

MIB = 1 << 20
FILE_TYPE = VolumeTypeSpec(backend=BackendKind.FILE)
EXECUTOR = Executor()


def _marker() -> bytes:
    return b"trustplane-volume-marker-" + secrets.token_hex(8).encode()


def _secret_dirs() -> list[Path]:
    """Private secret directories this process still has (there should be none)."""
    return sorted(Path("/dev/shm").glob(f"trustplane-secrets-{os.getpid()}-*"))


def _loop_devices_of(path: Path) -> list[str]:
    listing = EXECUTOR.run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"])
    return [line.split()[0] for line in listing.text.splitlines() if str(path) in line]


def _holds(path: Path, needle: bytes) -> bool:
    with path.open("rb") as handle:
        carry = b""
        while chunk := handle.read(4 << 20):
            if needle in carry + chunk:
                return True
            carry = chunk[-len(needle) :]
    return False


@pytest.fixture
def backend(tmp_path: Path) -> FileBackend:
    return FileBackend(tmp_path / "volumes")


def test_create_formats_luks1_the_header_is_fingerprinted_and_the_size_is_usable(
    backend: FileBackend,
) -> None:
    key = secrets.token_bytes(32)
    created = create_volume(backend, FILE_TYPE, "vol-a", 16 * MIB, key)
    assert isinstance(created.location, FileLocation)
    path = Path(created.location.path)
    assert path.stat().st_mode & 0o777 == 0o600
    header = parse_header(FileRawReader(path))
    assert (header.version, header.cipher, header.key_bytes) == (1, "aes-xts-plain64", 64)
    assert path.stat().st_size == header.data_offset + 16 * MIB
    assert created.fingerprint is not None
    assert created.fingerprint.uuid == header.uuid
    assert created.fingerprint.header_bytes == header.data_offset
    assert fingerprint(FileRawReader(path)) == created.fingerprint  # stable
    # cryptsetup agrees on what QEMU wrote.
    dump = EXECUTOR.run(["cryptsetup", "luksDump", str(path)]).text
    assert header.uuid in dump
    assert "xts-plain64" in dump
    # SHA-512, on which qemu-img's PBKDF calibration does not fail (qemu_luks.py).
    assert re.search(r"^Hash spec:\s+sha512$", dump, re.MULTILINE)
    encryptor = QemuLuksEncryptor()
    with encryptor.open(created.location, key, loop=False) as opened:
        assert Path(opened.path).stat().st_size == 16 * MIB
    delete_volume(backend, created.location)
    assert not path.exists()
    delete_volume(backend, created.location)  # idempotent


def test_nothing_formats_a_volume_that_exists(backend: FileBackend) -> None:
    key = secrets.token_bytes(32)
    created = create_volume(backend, FILE_TYPE, "vol-b", 8 * MIB, key)
    path = Path(created.location.path)
    before = path.read_bytes()
    encryptor = QemuLuksEncryptor()
    with pytest.raises(UsageError, match="has a LUKS header already; trustplane never formats"):
        encryptor.format(backend, created.location, secrets.token_bytes(32), EncryptionSpec())
    with pytest.raises(UsageError, match="exists already"):
        create_volume(backend, FILE_TYPE, "vol-b", 8 * MIB, secrets.token_bytes(32))
    assert path.read_bytes() == before
    encryptor.check_key(created.location, key)


def test_wrong_key_is_one_line_naming_qemus_refusal(backend: FileBackend) -> None:
    created = create_volume(backend, FILE_TYPE, "vol-c", 8 * MIB, secrets.token_bytes(32))
    encryptor = QemuLuksEncryptor()
    wrong = secrets.token_bytes(32)
    with pytest.raises(DecryptionKeyError, match="Invalid password, cannot unlock any keyslot"):
        encryptor.check_key(created.location, wrong)
    with pytest.raises(DecryptionKeyError) as caught:
        encryptor.open(created.location, wrong)
    assert "\n" not in str(caught.value)
    assert passphrase(wrong).decode() not in str(caught.value)
    assert _secret_dirs() == []
    assert _loop_devices_of(Path(created.location.path)) == []


def test_replaced_or_reformatted_header_is_refused_by_its_fingerprint(backend: FileBackend) -> None:
    """Attacker: write access to the storage, not the key. Re-formatting under a
    key of their own, swapping in another volume, or editing the header fails."""
    key = secrets.token_bytes(32)
    created = create_volume(backend, FILE_TYPE, "vol-d", 8 * MIB, key)
    assert created.fingerprint is not None
    location = created.location
    path = Path(location.path)
    encryptor = QemuLuksEncryptor()
    encryptor.verify_header(location, created.fingerprint)

    original = path.read_bytes()
    # Another volume moved into its place.
    other = create_volume(backend, FILE_TYPE, "vol-d2", 8 * MIB, key)
    path.write_bytes(Path(other.location.path).read_bytes())
    with pytest.raises(IntegrityError, match="replaced or re-formatted, refused"):
        encryptor.verify_header(location, created.fingerprint)
    # Same UUID, one key-slot salt byte changed.
    tampered = bytearray(original)
    tampered[300] ^= 0x01
    path.write_bytes(bytes(tampered))
    with pytest.raises(IntegrityError, match="differs from the recorded one"):
        encryptor.verify_header(location, created.fingerprint)
    # The header wiped.
    path.write_bytes(bytes(4096) + original[4096:])
    with pytest.raises(IntegrityError, match="no LUKS header"):
        encryptor.verify_header(location, created.fingerprint)
    path.write_bytes(original)
    assert encryptor.verify_header(location, created.fingerprint) == created.fingerprint


def test_userspace_open_reads_and_writes_plaintext_and_close_leaves_nothing(
    backend: FileBackend,
) -> None:
    key = secrets.token_bytes(32)
    created = create_volume(backend, FILE_TYPE, "vol-e", 8 * MIB, key)
    path = Path(created.location.path)
    marker = _marker()
    encryptor = QemuLuksEncryptor()
    opened = encryptor.open(created.location, key)
    try:
        assert opened.device is not None
        assert opened.device.startswith("/dev/loop")
        daemon_pid = opened.daemon.started.pid  # type: ignore[attr-defined]
        # The key is nowhere a process or a file shows it.
        phrase = passphrase(key)
        assert phrase not in Path(f"/proc/{daemon_pid}/cmdline").read_bytes()
        assert phrase not in Path(f"/proc/{daemon_pid}/environ").read_bytes()
        assert _secret_dirs() == []
        with Path(opened.device).open("r+b") as device:
            device.seek(MIB)
            device.write(marker.ljust(4096, b"\0"))
            device.flush()
            os.fsync(device.fileno())
    finally:
        opened.close()
    assert not _holds(path, marker)
    assert str(opened.export) not in mount_points(EXECUTOR)
    assert not opened.directory.exists()
    assert _loop_devices_of(path) == []
    assert not Path(f"/proc/{daemon_pid}").exists()
    with (
        encryptor.open(created.location, key, writable=False, loop=False) as again,
        Path(again.path).open("rb") as plain,
    ):
        plain.seek(MIB)
        assert plain.read(len(marker)) == marker


def test_volume_formatted_the_os_brick_way_opens_here_and_ours_opens_there(
    backend: FileBackend, tmp_path: Path
) -> None:
    """os-brick: `cryptsetup --batch-mode luksFormat --type luks1 --key-file=- DEV`
    with hexlify(key) on stdin. QEMU opens that; cryptsetup opens QEMU's."""
    key = secrets.token_bytes(32)
    theirs = tmp_path / "openstack.img"
    with theirs.open("xb") as handle:
        handle.truncate(8 * MIB)
    EXECUTOR.run(
        [
            "cryptsetup",
            "--batch-mode",
            "luksFormat",
            "--type",
            "luks1",
            "--key-file=-",
            str(theirs),
        ],
        stdin=binascii_hex(key),
    )
    location = FileLocation(path=str(theirs))
    encryptor = QemuLuksEncryptor()
    encryptor.check_key(location, key)
    marker = _marker()
    with (
        encryptor.open(location, key, loop=False) as opened,
        Path(opened.path).open("r+b") as plain,
    ):
        plain.write(marker.ljust(4096, b"\0"))
    assert not _holds(theirs, marker)
    assert fingerprint(FileRawReader(theirs)).version == 1

    ours = create_volume(backend, FILE_TYPE, "vol-f", 8 * MIB, key)
    test = ["cryptsetup", "open", "--test-passphrase", "--key-file=-", ours.location.path]
    EXECUTOR.run(test, stdin=binascii_hex(key))
    refused = EXECUTOR.run(test, stdin=binascii_hex(secrets.token_bytes(32)), check=False)
    assert refused.returncode != 0
    assert b"No key available with this passphrase" in refused.stderr


def binascii_hex(key: bytes) -> bytes:
    """os-brick's own derivation, written out here rather than imported from us."""
    return binascii.hexlify(key).decode("utf-8").encode()


@pytest.mark.parametrize("provider", [Provider.LUKS, Provider.LUKS2])
def test_cryptsetup_headers_parse_and_fingerprint(tmp_path: Path, provider: Provider) -> None:
    """dm-crypt's format (as the dm-crypt encryptor writes it) read by the header parser."""
    spec = EncryptionSpec(provider=provider)
    header_bytes = {Provider.LUKS: 2 * MIB, Provider.LUKS2: 16 * MIB}[provider]
    image = tmp_path / "dm.img"
    with image.open("xb") as handle:
        handle.truncate(header_bytes + MIB)
    key = secrets.token_bytes(32)
    EXECUTOR.run(format_argv(spec, str(image), header_bytes), stdin=passphrase(key))
    header = parse_header(FileRawReader(image))
    assert header.version == spec.luks_version
    assert header.data_offset == header_bytes
    assert header.cipher == "aes-xts-plain64"
    assert header.key_bytes == 64
    assert header.sector_size == (4096 if provider is Provider.LUKS2 else 512)
    first = fingerprint(FileRawReader(image))
    EXECUTOR.run(["cryptsetup", "luksUUID", "--batch-mode", "--uuid", _uuid(), str(image)])
    assert fingerprint(FileRawReader(image)).uuid != first.uuid


def _uuid() -> str:
    return str(uuid.uuid4())


def test_a_plain_file_has_no_header_to_fingerprint(tmp_path: Path) -> None:
    plain = tmp_path / "plain.img"
    plain.write_bytes(os.urandom(8192))
    with pytest.raises(MalformedError, match="no LUKS header"):
        fingerprint(FileRawReader(plain))


def test_userspace_open_mounts_a_file_system_for_containers(
    backend: FileBackend, tmp_path: Path
) -> None:
    """What the Docker volume plugin needs: FUSE export, loop device, ext4, mount."""
    key = secrets.token_bytes(32)
    created = create_volume(backend, FILE_TYPE, "vol-fs", 32 * MIB, key)
    encryptor = QemuLuksEncryptor()
    with encryptor.open(created.location, key) as opened:
        assert opened.device is not None
        mkfs = ["mkfs.ext4", "-q", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"]
        EXECUTOR.run([*mkfs, opened.device])
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    marker = _marker()
    with encryptor.open(created.location, key, mountpoint=mountpoint):
        assert str(mountpoint) in mount_points(EXECUTOR)
        (mountpoint / "data").write_bytes(marker)
    assert str(mountpoint) not in mount_points(EXECUTOR)
    assert not (mountpoint / "data").exists()
    assert not _holds(Path(created.location.path), marker)
    with encryptor.open(created.location, key, writable=False, mountpoint=mountpoint):
        assert (mountpoint / "data").read_bytes() == marker
    assert _loop_devices_of(Path(created.location.path)) == []


def test_a_failed_in_place_format_try_leaves_the_retry_a_private_file(
    backend: FileBackend,
) -> None:
    """qemu-img deletes the file when a create fails (its PBKDF calibration); the
    retry's cleanup makes it again 0600, or QEMU would create it 0644."""
    location = backend.create("vol-retry", 4 * MIB)
    path = Path(location.path)
    path.unlink()
    backend.before_format_retry(location)
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)
    backend.before_format_retry(location)
    assert path.stat().st_mode & 0o777 == 0o600
