"""Atomic replacement: old or new content, exact mode from the first byte, nothing left over."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from trustplane import atomic
from trustplane.atomic import atomic_write, atomic_write_all


def test_writes_and_replaces_with_the_given_mode(tmp_path: Path) -> None:
    target = tmp_path / "file"
    assert atomic_write(target, b"one", mode=0o600)
    assert target.read_bytes() == b"one"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["file"]  # no temporary left behind


def test_mode_is_exact_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "public", b"x", mode=0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "public").stat().st_mode) == 0o644


def test_a_private_file_is_never_wider_than_its_mode_while_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The temporary file already has mode 0600 when the first byte goes in."""
    seen: list[int] = []
    real_write = os.write

    def spying_write(fd: int, data: bytes | memoryview) -> int:
        seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spying_write)
    atomic_write(tmp_path / "key", b"secret" * 1000, mode=0o600)
    assert seen
    assert set(seen) == {0o600}


def test_failure_keeps_old_content_and_removes_the_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "file"
    target.write_bytes(b"old")

    def no_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", no_fsync)
    with pytest.raises(OSError, match="Input/output"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_interrupted_write_removes_the_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(fd: int, data: bytes | memoryview) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "file", b"new")
    assert list(tmp_path.iterdir()) == []


def test_the_directory_is_fsynced_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "file"
    synced: list[tuple[Path, bool]] = []

    def recording(path: Path) -> None:
        synced.append((path, target.exists()))

    monkeypatch.setattr(atomic, "fsync_dir", recording)
    atomic_write(target, b"x")
    assert synced == [(tmp_path, True)]


def test_without_replace_an_existing_file_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "kek"
    assert atomic_write(target, b"first", mode=0o600, replace=False)
    assert not atomic_write(target, b"second", mode=0o600, replace=False)
    assert target.read_bytes() == b"first"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["kek"]


def test_several_files_are_written_all_or_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private, public = tmp_path / "k.pem", tmp_path / "k.pub"
    public.write_bytes(b"old public")
    real_fsync = os.fsync
    calls = 0

    def second_fails(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # the second file's temporary: nothing may be renamed yet
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", second_fails)
    with pytest.raises(OSError, match="No space") as info:
        atomic_write_all([(private, b"new private", 0o600), (public, b"new public", 0o644)])
    assert info.value.filename == str(public)  # the file asked for, not its temporary
    assert not private.exists()
    assert public.read_bytes() == b"old public"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.pub"]
    monkeypatch.setattr(os, "fsync", real_fsync)
    atomic_write_all([(private, b"new private", 0o600), (public, b"new public", 0o644)])
    assert (private.read_bytes(), public.read_bytes()) == (b"new private", b"new public")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644


def test_an_error_names_the_file_not_its_temporary(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-directory" / "file"
    with pytest.raises(FileNotFoundError) as info:
        atomic_write(missing, b"x")
    assert info.value.filename == str(missing)
