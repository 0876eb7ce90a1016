"""Volumes as files on the storage host (a directory the compute hosts share).

A volume is `ROOT/NAME.img`, created sparse and 0600 with O_EXCL (so two
creators never share one). QEMU's LUKS driver formats it in place
(`qemu-img create -f luks FILE` truncates the file it finds and writes the
header), after the encryptor has checked it carries no LUKS header. A try
that fails deletes the file (QEMU cleans up after itself); it is made again,
0600, before the next.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from trustplane.api.volume_location import AnyLocation, FileLocation
from trustplane.api.volume_spec import BackendKind
from trustplane.errors import UsageError, from_os_error
from trustplane.tools import Executor
from trustplane.tools.command import Arg
from trustplane.volumes.backends.base import Backend
from trustplane.volumes.backends.holders import file_holders

SUFFIX = ".img"


class FileBackend(Backend):
    kind: ClassVar[BackendKind] = BackendKind.FILE

    def __init__(self, root: Path, executor: Executor | None = None) -> None:
        super().__init__(executor)
        if "," in os.fspath(root):
            raise UsageError(f"volume directory {root}: QEMU options cannot hold ','")
        self.root = root.absolute()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, name: str) -> Path:
        return self.root / (self.check_name(name) + SUFFIX)

    def location(self, name: str) -> FileLocation:
        return FileLocation(path=os.fspath(self._path(name)))

    def exists(self, name: str) -> bool:
        return self._path(name).exists()

    def create(self, name: str, size: int) -> FileLocation:
        self.check_size(size)
        path = self._path(name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            raise UsageError(f"file volume {name} exists already") from None
        except OSError as exc:
            raise _os_error(exc, path) from None
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except BaseException as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise _os_error(exc, path) from None
            raise
        os.close(fd)
        return self.location(name)

    def delete(self, location: AnyLocation) -> None:
        Path(_file(location).path).unlink(missing_ok=True)

    def size(self, location: AnyLocation) -> int:
        return Path(_file(location).path).stat().st_size

    def grow(self, location: AnyLocation, size: int) -> None:
        """`ftruncate` to `size` (sparse: the new bytes take no space until written)."""
        self.check_size(size)
        path = Path(_file(location).path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise _os_error(exc, path) from None
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
                os.fsync(fd)
        except OSError as exc:
            raise _os_error(exc, path) from None
        finally:
            os.close(fd)

    def in_use(self, location: AnyLocation) -> str | None:
        """Processes here holding the file open or mapped, a loop device on it, or
        QEMU's image lock from any host sharing the directory (`holders`)."""
        return file_holders(Path(_file(location).path))

    def qemu_format_target(self, location: AnyLocation) -> Arg:
        return _file(location).path

    def before_format_retry(self, location: AnyLocation) -> None:
        """QEMU deletes the file when `qemu-img create -f luks` fails (its PBKDF
        calibration, say): make it again, 0600, so the retry does not create it
        with the default mode."""
        path = Path(_file(location).path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            path.chmod(0o600)
            return
        except OSError as exc:
            raise _os_error(exc, path) from None
        os.close(fd)


def _os_error(exc: OSError, path: Path) -> Exception:
    """A full disk or a missing directory as one trustplane error; anything else as it is."""
    return from_os_error(exc, path) or exc


def _file(location: AnyLocation) -> FileLocation:
    if not isinstance(location, FileLocation):
        raise UsageError(f"{location.describe()} is not a file volume")
    return location
