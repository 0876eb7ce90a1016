"""One exception hierarchy for every failure trustplane expects.

Each class carries the exit code the CLI returns for it, so a failure reaches
the user as one line and a stable number, never a traceback. Messages never
contain secret material (keys, payloads, plaintext). `from_os_error` says which
failed file operations are expected (a full disk, a missing directory) and how
they read.
"""

from __future__ import annotations

import errno
import os
from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """Documented CLI exit codes (README, "Exit codes")."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    NOT_FOUND = 3
    AUTH = 4
    INTEGRITY = 5
    NO_KEY = 6
    MALFORMED = 7
    UNAVAILABLE = 8
    UNSUPPORTED = 9
    STORAGE = 10
    INTERRUPTED = 130
    """Ctrl-C (SIGINT): what was under way was undone (128 + SIGINT, as shells report it)."""


class TrustplaneError(Exception):
    """Base of every expected failure; `str(err)` is the one line users see."""

    exit_code: ExitCode = ExitCode.INTERNAL


class UsageError(TrustplaneError):
    """The command line or a configuration value is wrong."""

    exit_code = ExitCode.USAGE


class NotFoundError(TrustplaneError):
    """An image, blob, tag, file or key that was named does not exist."""

    exit_code = ExitCode.NOT_FOUND


class AuthError(TrustplaneError):
    """A registry or service refused our credentials, or we have none."""

    exit_code = ExitCode.AUTH


class Forbidden(AuthError):
    """Authenticated, and refused by an ACL or the policy (HTTP 403)."""


class IntegrityError(TrustplaneError):
    """Content does not match what authenticates it (digest, HMAC, signature).

    Raised before any byte of the suspect content is released.
    """

    exit_code = ExitCode.INTEGRITY


class DecryptionKeyError(TrustplaneError):
    """None of the given keys can unwrap the content, or a key is unusable."""

    exit_code = ExitCode.NO_KEY


class MalformedError(TrustplaneError):
    """Input that should follow a format (manifest, JWE, reference, PEM) does not."""

    exit_code = ExitCode.MALFORMED


class UnavailableError(TrustplaneError):
    """A component we depend on (registry, dockerd, network) cannot be reached."""

    exit_code = ExitCode.UNAVAILABLE


class ToolError(UnavailableError):
    """An external tool (qemu-img, cryptsetup, dmsetup, ...) failed.

    The message names the tool and quotes its last stderr line (with any
    secret it was given blanked out); never its argv or input.
    """

    def __init__(self, message: str, *, tool: str, returncode: int | None) -> None:
        super().__init__(message)
        self.tool = tool
        self.returncode = returncode


class ToolTimeout(ToolError):
    """An external tool ran past its timeout; its whole process group was killed."""


class UnsupportedError(TrustplaneError):
    """A valid request that trustplane (or the destination) cannot honour."""

    exit_code = ExitCode.UNSUPPORTED


class StorageError(TrustplaneError):
    """Local storage refused: disk full, quota, read-only file system, permission, I/O error."""

    exit_code = ExitCode.STORAGE


_STORAGE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EACCES, errno.EPERM}
)


def from_os_error(
    exc: OSError, path: str | os.PathLike[str] | None = None
) -> TrustplaneError | None:
    """The expected failure behind a failed file operation, or None (then it is a bug).

    `path` names the file or directory the user gave (default: the one in the
    error). The message is one line: that path and what is wrong with it.
    """
    given = path if path is not None else exc.filename
    where = Path(os.fsdecode(given)) if isinstance(given, str | bytes | os.PathLike) else None
    reason = (exc.strerror or os.strerror(exc.errno)).lower() if exc.errno else str(exc)
    prefix = f"{where}: " if where is not None else ""
    if exc.errno in _STORAGE_ERRNOS:
        return StorageError(f"{prefix}{reason}")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return missing(where) if where is not None else NotFoundError(reason)
    if exc.errno == errno.EISDIR:
        return UsageError(f"{prefix}is a directory")
    if exc.errno == errno.EEXIST and where is not None and not where.is_dir():
        return UsageError(f"{prefix}exists and is not a directory")
    if exc.errno == errno.EEXIST:
        return UsageError(f"{prefix}exists already")
    if exc.errno == errno.ENAMETOOLONG:
        return UsageError(f"{prefix}file name too long")
    return None


def missing(path: Path) -> NotFoundError:
    """`path` is not there: says which part is missing, or is a file where a
    directory should be."""
    for parent in reversed(path.parents):
        if not parent.exists():
            return NotFoundError(f"{path}: directory {parent} does not exist")
        if not parent.is_dir():
            return NotFoundError(f"{path}: {parent} is not a directory")
    return NotFoundError(f"{path} does not exist")
