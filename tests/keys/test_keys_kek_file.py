"""The file KEK provider: a private file, persistent versions, authenticated wraps."""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from trustplane.errors import (
    DecryptionKeyError,
    IntegrityError,
    MalformedError,
    NotFoundError,
    UsageError,
)
from trustplane.keys.kek import WrappedKey
from trustplane.keys.kek_file import FileKekProvider

KEY = bytes(range(32))


def test_created_at_first_use_private_with_one_kek(tmp_path: Path) -> None:
    path = tmp_path / "kms" / "kek.json"
    provider = FileKekProvider(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    doc = json.loads(path.read_text())
    assert len(doc["keys"]) == 1
    assert doc["current"] == doc["keys"][0]["id"] == provider.current_id()
    assert len(base64.b64decode(doc["keys"][0]["key"])) == 32
    assert provider.known_ids() == (provider.current_id(),)
    assert provider.kind == "file"
    assert [p.name for p in path.parent.iterdir()] == ["kek.json"]  # no temp files left


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o610])
def test_refuses_a_file_others_can_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "kek.json"
    FileKekProvider(path).close()
    path.chmod(mode)
    with pytest.raises(UsageError, match="group or others can access it") as info:
        FileKekProvider(path)
    assert f"{mode:04o}" in str(info.value)
    assert str(path) in str(info.value)


def test_refuses_when_the_file_is_opened_up_while_running(tmp_path: Path) -> None:
    path = tmp_path / "kek.json"
    provider = FileKekProvider(path)
    provider.rotate()  # the next re-read happens on a changed file
    path.chmod(0o644)
    os.utime(path, ns=(1, 1))  # make sure the provider notices a change
    with pytest.raises(UsageError, match="group or others"):
        provider.wrap(KEY, b"aad")


def test_wrapped_keys_survive_a_new_instance(tmp_path: Path) -> None:
    path = tmp_path / "kek.json"
    first = FileKekProvider(path)
    wrapped = first.wrap(KEY, b"secret-1")
    first.close()
    second = FileKekProvider(path)
    assert second.current_id() == wrapped.kek_id
    assert second.unwrap(wrapped, b"secret-1") == KEY


def test_rotation_keeps_old_versions_for_unwrap(tmp_path: Path) -> None:
    path = tmp_path / "kek.json"
    provider = FileKekProvider(path)
    old = provider.wrap(KEY, b"a")
    new_id = provider.rotate()
    assert new_id != old.kek_id
    assert provider.current_id() == new_id
    assert provider.known_ids() == (old.kek_id, new_id)
    new = provider.wrap(KEY, b"a")
    assert new.kek_id == new_id
    assert provider.unwrap(old, b"a") == KEY
    assert provider.unwrap(new, b"a") == KEY
    # The versions are ordered and persistent.
    assert new_id.startswith("file:0002-")
    assert old.kek_id.startswith("file:0001-")
    assert FileKekProvider(path).known_ids() == (old.kek_id, new_id)


def test_a_rotation_by_another_instance_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "kek.json"
    reader, writer = FileKekProvider(path), FileKekProvider(path)
    new_id = writer.rotate()
    wrapped = writer.wrap(KEY, b"x")
    assert reader.unwrap(wrapped, b"x") == KEY
    assert reader.current_id() == new_id
    assert reader.wrap(KEY, b"x").kek_id == new_id


def test_retire(tmp_path: Path) -> None:
    path = tmp_path / "kek.json"
    provider = FileKekProvider(path)
    old = provider.wrap(KEY, b"a")
    with pytest.raises(UsageError, match="current KEK"):
        provider.retire(old.kek_id)
    provider.rotate()
    provider.retire(old.kek_id)
    assert old.kek_id not in provider.known_ids()
    with pytest.raises(DecryptionKeyError, match="not in"):
        provider.unwrap(old, b"a")
    with pytest.raises(NotFoundError):
        provider.retire(old.kek_id)
    assert old.kek_id not in path.read_text()
    with pytest.raises(DecryptionKeyError):
        FileKekProvider(path).unwrap(old, b"a")


def test_wrong_aad_fails(tmp_path: Path) -> None:
    provider = FileKekProvider(tmp_path / "kek.json")
    wrapped = provider.wrap(KEY, b"secret-1")
    with pytest.raises(IntegrityError, match="does not authenticate"):
        provider.unwrap(wrapped, b"secret-2")
    with pytest.raises(IntegrityError):
        provider.unwrap(wrapped, b"")


def test_tampered_blob_fails_at_every_byte(tmp_path: Path) -> None:
    provider = FileKekProvider(tmp_path / "kek.json")
    wrapped = provider.wrap(KEY, b"aad")
    for i in range(len(wrapped.blob)):
        blob = bytearray(wrapped.blob)
        blob[i] ^= 0x01
        with pytest.raises(IntegrityError):
            provider.unwrap(WrappedKey(wrapped.kek_id, bytes(blob)), b"aad")
    for cut in (0, 1, 13, 28, len(wrapped.blob) - 1):
        with pytest.raises(IntegrityError):
            provider.unwrap(WrappedKey(wrapped.kek_id, wrapped.blob[:cut]), b"aad")


def test_a_blob_relabelled_to_another_version_fails(tmp_path: Path) -> None:
    provider = FileKekProvider(tmp_path / "kek.json")
    wrapped = provider.wrap(KEY, b"aad")
    other = provider.rotate()
    with pytest.raises(IntegrityError):
        provider.unwrap(WrappedKey(other, wrapped.blob), b"aad")


def test_unknown_kek_id(tmp_path: Path) -> None:
    provider = FileKekProvider(tmp_path / "kek.json")
    blob = provider.wrap(KEY, b"aad").blob
    with pytest.raises(DecryptionKeyError):
        provider.unwrap(WrappedKey("file:0009-deadbeef", blob), b"aad")
    with pytest.raises(DecryptionKeyError):
        provider.unwrap(WrappedKey("kmip:v0001:1", blob), b"aad")


def test_each_wrap_is_fresh(tmp_path: Path) -> None:
    provider = FileKekProvider(tmp_path / "kek.json")
    blobs = {provider.wrap(KEY, b"aad").blob for _ in range(50)}
    assert len(blobs) == 50
    assert all(KEY not in blob for blob in blobs)


@pytest.mark.parametrize("key", [b"", b"x" * 1025])
def test_refuses_what_is_not_key_material(tmp_path: Path, key: bytes) -> None:
    provider = FileKekProvider(tmp_path / "kek.json")
    with pytest.raises(UsageError, match="key to wrap"):
        provider.wrap(key, b"aad")


def test_malformed_files(tmp_path: Path) -> None:
    path = tmp_path / "kek.json"
    for text in ("not json", "[]", '{"format": "other"}', "{}"):
        path.write_text(text)
        path.chmod(0o600)
        with pytest.raises(MalformedError):
            FileKekProvider(path)
    FileKekProvider(path.with_name("good.json"))
    doc = json.loads(path.with_name("good.json").read_text())
    doc["keys"][0]["key"] = base64.b64encode(b"short").decode()
    path.write_text(json.dumps(doc))
    with pytest.raises(MalformedError, match="256-bit"):
        FileKekProvider(path)


def test_concurrent_first_use_agrees_on_one_kek(tmp_path: Path) -> None:
    path = tmp_path / "kek.json"
    ids: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def create() -> None:
        try:
            start.wait()
            ids.append(FileKekProvider(path).current_id())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(set(ids)) == 1
    assert len(json.loads(path.read_text())["keys"]) == 1


def test_concurrent_rotations_lose_no_version(tmp_path: Path) -> None:
    path = tmp_path / "kek.json"
    providers = [FileKekProvider(path) for _ in range(4)]
    made: list[str] = []
    lock = threading.Lock()

    def rotate(provider: FileKekProvider) -> None:
        for _ in range(5):
            kek_id = provider.rotate()
            with lock:
                made.append(kek_id)

    threads = [threading.Thread(target=rotate, args=(p,)) for p in providers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    known = FileKekProvider(path).known_ids()
    assert len(known) == 21
    assert set(made) <= set(known)


def test_closed_provider_refuses(tmp_path: Path) -> None:
    provider = FileKekProvider(tmp_path / "kek.json")
    wrapped = provider.wrap(KEY, b"a")
    with provider:
        pass
    with pytest.raises(UsageError, match="closed"):
        provider.wrap(KEY, b"a")
    with pytest.raises(UsageError, match="closed"):
        provider.unwrap(wrapped, b"a")


def test_refuses_a_symbolic_link(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    FileKekProvider(real).close()
    link = tmp_path / "kek.json"
    link.symlink_to(real)
    with pytest.raises(UsageError, match="symbolic link"):
        FileKekProvider(link)
