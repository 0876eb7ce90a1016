"""volumes/copier.py against the real qemu-img: the copy into a LUKS volume under a new
key, the comparison that guards the plaintext's destruction, the overwrite, the rename."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from trustplane.api.volume_location import FileLocation
from trustplane.api.volume_spec import EncryptionSpec
from trustplane.control.volume_copies import VolumeCopies
from trustplane.errors import DecryptionKeyError, IntegrityError, UsageError
from trustplane.tools import Executor
from trustplane.volumes.backends import FileBackend
from trustplane.volumes.copier import (
    compare_with_luks,
    copy_into_luks,
    overwrite_file,
    rename_storage,
)
from trustplane.volumes.encryptors import QemuLuksEncryptor
from trustplane.volumes.header import PROBE_BYTES, is_luks

MIB = 1 << 20
EXECUTOR = Executor()


def _luks(backend: FileBackend, name: str, key: bytes) -> FileLocation:
    location = QemuLuksEncryptor().create(backend, name, 4 * MIB, key, EncryptionSpec())
    assert isinstance(location, FileLocation)
    return location


def test_a_copy_reads_back_equal_and_a_changed_target_is_caught(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path / "volumes")
    plain = backend.create("plain", 4 * MIB)
    marker = secrets.token_bytes(4096)
    with Path(plain.path).open("r+b") as handle:
        handle.seek(MIB)
        handle.write(marker)
    key, other = secrets.token_bytes(32), secrets.token_bytes(32)
    target = _luks(backend, "target", key)
    copy_into_luks(EXECUTOR, plain, None, target, key, 4 * MIB)
    compare_with_luks(EXECUTOR, plain, target, key, 4 * MIB)
    assert marker not in Path(target.path).read_bytes()
    # A second hop, LUKS to LUKS under yet another key; the wrong source key is refused.
    second = _luks(backend, "second", other)
    with pytest.raises(DecryptionKeyError):
        copy_into_luks(EXECUTOR, target, other, second, other, 4 * MIB)
    copy_into_luks(EXECUTOR, target, key, second, other, 4 * MIB)
    compare_with_luks(EXECUTOR, plain, second, other, 4 * MIB)
    # The plaintext changed after the copy: the comparison says so (nothing is destroyed).
    with Path(plain.path).open("r+b") as handle:
        handle.seek(3 * MIB)
        handle.write(b"changed")
    with pytest.raises(IntegrityError, match="does not read what"):
        compare_with_luks(EXECUTOR, plain, second, other, 4 * MIB)


def test_overwrite_zeroes_data_extents_and_keeps_holes(tmp_path: Path) -> None:
    path = tmp_path / "plain.img"
    with path.open("wb") as handle:
        handle.truncate(64 * MIB)
        handle.write(b"secret" * 1000)
        handle.seek(40 * MIB)
        handle.write(b"more secret" * 1000)
    kept = tmp_path / "link"
    kept.hardlink_to(path)
    blocks_before = path.stat().st_blocks
    overwrite_file(path)
    assert kept.read_bytes() == bytes(64 * MIB)
    assert path.stat().st_blocks <= blocks_before + 8  # holes stayed holes
    overwrite_file(tmp_path / "missing.img")  # idempotent


def test_rename_never_replaces_a_name_that_exists(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path / "volumes")
    first = backend.create("first", MIB)
    backend.create("second", MIB)
    with pytest.raises(UsageError, match="exists already"):
        rename_storage(backend, first, "second")
    moved = rename_storage(backend, first, "third")
    assert moved == backend.location("third")
    assert not backend.exists("first")
    assert backend.exists("third")


def test_a_rename_a_crash_left_half_done_is_finished(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path / "volumes")
    first = backend.create("first", MIB)
    Path(first.path).write_bytes(b"payload")
    os.link(first.path, backend.location("second").path)  # linked, crash before the unlink
    moved = rename_storage(backend, first, "second")
    assert moved == backend.location("second")
    assert not backend.exists("first")
    assert Path(moved.path).read_bytes() == b"payload"
    # An unrelated file under the new name is still refused, and both are left as they were.
    third = backend.create("third", MIB)
    Path(third.path).write_bytes(b"mine")
    with pytest.raises(UsageError, match="exists already"):
        rename_storage(backend, third, "second")
    assert Path(third.path).read_bytes() == b"mine"
    assert Path(moved.path).read_bytes() == b"payload"


@pytest.mark.parametrize("stopped", ["first rename", "second rename"])
def test_an_encryption_swap_finishes_after_a_crash_inside_a_rename(
    stopped: str, tmp_path: Path
) -> None:
    backend = FileBackend(tmp_path / "volumes")
    plain = backend.create("data", MIB)
    Path(plain.path).write_bytes(b"plaintext")
    key = secrets.token_bytes(32)
    copy = _luks(backend, "data.enc-1", key)
    names = {"source_name": "data", "target_name": "data.enc-1", "doomed_name": "data.plain-1"}
    doomed = backend.location("data.plain-1")
    assert isinstance(doomed, FileLocation)
    if stopped == "first rename":
        os.link(plain.path, doomed.path)
    else:
        rename_storage(backend, plain, "data.plain-1")
        os.link(copy.path, plain.path)
    final = VolumeCopies._swap(backend, names, "data")
    assert final == backend.location("data")
    assert sorted(p.name for p in (tmp_path / "volumes").iterdir()) == [
        "data.img",
        "data.plain-1.img",
    ]
    assert Path(doomed.path).read_bytes() == b"plaintext"
    assert isinstance(final, FileLocation)
    assert is_luks(Path(final.path).read_bytes()[:PROBE_BYTES])
    assert not Path(final.path).samefile(doomed.path)
