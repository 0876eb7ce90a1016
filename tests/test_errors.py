"""Which failed file operations are expected, and how they read (errors.from_os_error)."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from trustplane.errors import (
    ExitCode,
    NotFoundError,
    StorageError,
    UsageError,
    from_os_error,
    missing,
)


def _error(code: int, path: Path | None = None) -> OSError:
    return OSError(code, "ignored", str(path) if path else None)


def test_a_full_disk_and_its_kin_are_storage(tmp_path: Path) -> None:
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
        error = from_os_error(_error(code), tmp_path / "k.pem")
        assert isinstance(error, StorageError)
        assert error.exit_code == ExitCode.STORAGE == 10
        assert str(error).startswith(f"{tmp_path / 'k.pem'}: ")
    # write() knows no file name: the reason alone, still one line
    assert str(from_os_error(OSError(errno.ENOSPC, "No space left on device"))) == (
        "no space left on device"
    )


def test_what_is_missing_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    cases = {
        tmp_path / "a" / "b" / "k.pem": f"directory {tmp_path / 'a'} does not exist",
        tmp_path / "file" / "k.pem": f"{tmp_path / 'file'} is not a directory",
        tmp_path / "k.pem": f"{tmp_path / 'k.pem'} does not exist",
    }
    for path, text in cases.items():
        for code in (errno.ENOENT, errno.ENOTDIR):
            error = from_os_error(_error(code, path))
            assert isinstance(error, NotFoundError)
            assert text in str(error)
        assert text in str(missing(path))


def test_directories_and_files_in_each_others_place_are_usage(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    is_dir = from_os_error(_error(errno.EISDIR, tmp_path))
    assert isinstance(is_dir, UsageError)
    assert str(is_dir) == f"{tmp_path}: is a directory"
    not_dir = from_os_error(_error(errno.EEXIST, tmp_path / "file"))
    assert isinstance(not_dir, UsageError)
    assert str(not_dir) == f"{tmp_path / 'file'}: exists and is not a directory"


@pytest.mark.parametrize("code", [errno.ECONNREFUSED, errno.EPIPE, errno.EBADF, None])
def test_anything_else_is_not_expected(code: int | None) -> None:
    """Left to the caller (a bug, exit 1, unless the caller knows better)."""
    exc = OSError("odd") if code is None else OSError(code, "odd")
    assert from_os_error(exc) is None
