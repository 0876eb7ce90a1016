"""Atomic file replacement: a crash leaves the old content or the new, never half.

The one way trustplane writes a file it must not lose: a temporary file in the
same directory (so the rename stays on one filesystem), created with its final
mode before any byte is written (a key never exists, even half-written, with a
wider mode), fsynced, renamed over the target (or linked, when an existing
file must never be replaced), and the directory fsynced so the rename itself
survives a power cut. The temporary file is removed on any failure, and an
error while writing names the target file (not its temporary), so that a full
disk or a read-only directory is reported about the file the user asked for.

`atomic_write_all` writes several files as one: every temporary is complete
before the first rename (a key pair is both files or neither).

Low on purpose (only the standard library): every package may import it,
except `crypto/`, which stays free of I/O.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path

DEFAULT_MODE = 0o644


def fsync_dir(path: Path) -> None:
    """Make a rename or link inside `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: Path, data: bytes, mode: int = DEFAULT_MODE, *, replace: bool = True
) -> bool:
    """Write `data` to `path` atomically with permission bits `mode`.

    With `replace=False` an existing file is left alone (the new file is
    linked into place, which fails if the name exists): returns False then,
    True when `data` was written.
    """
    tmp = _staged(path, data, mode)
    try:
        if replace:
            tmp.replace(path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def atomic_write_all(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Write every (path, data, mode) as `atomic_write` does, all or none: each
    temporary is written and fsynced before the first one is renamed."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            staged.append((_staged(path, data, mode), path))
        for tmp, path in staged:
            tmp.replace(path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    for directory in {path.parent for _, path in staged}:
        fsync_dir(directory)


def _staged(path: Path, data: bytes, mode: int) -> Path:
    """A complete, fsynced temporary beside `path`, with `mode` from its creation."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode & 0o600)
    except OSError as exc:
        exc.filename = str(path)
        raise
    try:
        try:
            os.fchmod(fd, mode)  # exactly `mode`, whatever the umask, before any byte
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            exc.filename = str(path)
        raise
    return tmp
