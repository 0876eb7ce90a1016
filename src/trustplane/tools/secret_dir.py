"""A private directory for one call's secret files, removed when the call ends.

Some tools only take a key as a file name (QEMU's `--object
secret,file=`). The file is 0600 in a fresh 0700 directory, on tmpfs when
the host has one (`/dev/shm`), so the key never reaches a disk, and the
directory goes as soon as the call returns. Its name carries our pid: if
this process is killed before it can clean up, the next one to start a
call removes what a dead process left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Self

PREFIX = "trustplane-secrets-"
_swept: set[Path] = set()
_sweep_lock = threading.Lock()


def default_root() -> Path:
    """tmpfs (`/dev/shm`) when it is there and writable, else the temporary directory."""
    shm = Path("/dev/shm")  # noqa: S108 (mkdtemp makes a private 0700 directory in it)
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return Path(tempfile.gettempdir())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(root: Path) -> None:
    """Remove secret directories under `root` whose owning process is gone."""
    try:
        entries = list(root.iterdir())
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(PREFIX):
            continue
        pid_text = entry.name[len(PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(entry, ignore_errors=True)


class SecretDir:
    """A 0700 directory holding 0600 secret files; `remove()` (or leaving `with`) deletes it."""

    def __init__(self, root: Path | None = None) -> None:
        root = root if root is not None else default_root()
        with _sweep_lock:
            if root not in _swept:
                _swept.add(root)
                sweep_stale(root)
        # mkdtemp creates the directory 0700 with an unpredictable name.
        self.path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))
        self._count = 0

    def write(self, value: bytes) -> Path:
        """A new 0600 file holding `value`; never follows or reuses an existing name."""
        path = self.path / f"s{self._count}"
        self._count += 1
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(value)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        return path

    def remove(self) -> None:
        """Delete the files and the directory. Idempotent."""
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.path)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()
