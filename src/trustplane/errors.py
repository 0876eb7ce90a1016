"""One exception hierarchy for every failure trustplane expects.

Each class carries the exit code the CLI returns for it, so a failure reaches
the user as one line and a stable number, never a traceback; and the HTTP
status and stable machine name (`error_type`) of the API's error body
`{"error": {"type", "message"}}`. That one table maps both ways: servers
turn an exception into status and body (`error_body`), clients turn status
and body back into the same class (`error_from_http`). Messages never
contain secret material (keys, payloads, plaintext). `from_os_error` says
which failed file operations are expected (a full disk, a missing
directory) and how they read.
"""

from __future__ import annotations

import errno
import os
from enum import IntEnum
from pathlib import Path
from typing import Any, ClassVar


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


_BY_TYPE: dict[str, type[TrustplaneError]] = {}
_BY_STATUS: dict[int, type[TrustplaneError]] = {}


def _register(kind: type[TrustplaneError]) -> None:
    """Enter a class in the table. The first class defined with a status is
    what that status means when an answer's body names no known type."""
    if kind.error_type in _BY_TYPE:
        raise TypeError(f"error type {kind.error_type} is taken by {_BY_TYPE[kind.error_type]}")
    _BY_TYPE[kind.error_type] = kind
    _BY_STATUS.setdefault(kind.http_status, kind)


class TrustplaneError(Exception):
    """Base of every expected failure; `str(err)` is the one line users see.

    A subclass that names its own `error_type` enters the table; one that
    does not travels as its nearest ancestor in the table.
    """

    exit_code: ClassVar[ExitCode] = ExitCode.INTERNAL
    http_status: ClassVar[int] = 500
    error_type: ClassVar[str] = "InternalError"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "error_type" in cls.__dict__:
            _register(cls)


class UsageError(TrustplaneError):
    """The command line or a configuration value is wrong."""

    exit_code = ExitCode.USAGE
    http_status = 400
    error_type = "UsageError"


class AlreadyExistsError(UsageError):
    """Something was to be made under a name that is taken (gRPC ALREADY_EXISTS).

    Only the snapshotter's gRPC answers tell it apart; over HTTP it is a UsageError."""


class ConflictError(UsageError):
    """A valid request that the object's present state refuses: it has children, it is
    in use or busy with another operation (gRPC FAILED_PRECONDITION).

    Only the snapshotter's gRPC answers tell it apart; over HTTP it is a UsageError."""


class NotFoundError(TrustplaneError):
    """An image, blob, tag, file or key that was named does not exist."""

    exit_code = ExitCode.NOT_FOUND
    http_status = 404
    error_type = "NotFoundError"


class AuthError(TrustplaneError):
    """A registry or service refused our credentials, or we have none."""

    exit_code = ExitCode.AUTH
    http_status = 401
    error_type = "AuthError"


class Forbidden(AuthError):
    """Authenticated, and refused by an ACL or the policy (HTTP 403)."""

    http_status = 403
    error_type = "Forbidden"


class IntegrityError(TrustplaneError):
    """Content does not match what authenticates it (digest, HMAC, signature).

    Raised before any byte of the suspect content is released.
    """

    exit_code = ExitCode.INTEGRITY
    http_status = 409
    error_type = "IntegrityError"


class DecryptionKeyError(TrustplaneError):
    """None of the given keys can unwrap the content, or a key is unusable."""

    exit_code = ExitCode.NO_KEY
    http_status = 403
    error_type = "DecryptionKeyError"


class MalformedError(TrustplaneError):
    """Input that should follow a format (manifest, JWE, reference, PEM) does not."""

    exit_code = ExitCode.MALFORMED
    http_status = 422
    error_type = "MalformedError"


class UnavailableError(TrustplaneError):
    """A component we depend on (registry, dockerd, network) cannot be reached."""

    exit_code = ExitCode.UNAVAILABLE
    http_status = 503
    error_type = "UnavailableError"


class UnreachableError(UnavailableError):
    """No answer at all from a service (connection refused, reset, timed out), as
    opposed to an answer that says it cannot serve; travels as UnavailableError."""


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
    http_status = 422
    error_type = "UnsupportedError"


class StorageError(TrustplaneError):
    """Local storage refused: disk full, quota, read-only file system, permission, I/O error."""

    exit_code = ExitCode.STORAGE
    http_status = 507
    error_type = "StorageError"


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


def error_table() -> tuple[type[TrustplaneError], ...]:
    """Every class with its own status and machine name, in definition order."""
    return tuple(_BY_TYPE.values())


def error_body(error: TrustplaneError) -> dict[str, dict[str, str]]:
    """The HTTP error body for `error` (its status is `error.http_status`)."""
    return {"error": {"type": error.error_type, "message": str(error)}}


def error_class(status: int, error_type: object = None) -> type[TrustplaneError]:
    """The class an HTTP error answer stands for.

    The body's type decides when the table knows it (403 is Forbidden or
    DecryptionKeyError, 422 MalformedError or UnsupportedError); else the
    status; an answer neither explains (a 500, a proxy's 502) means the
    service could not do its job: UnavailableError.
    """
    if isinstance(error_type, str) and error_type in _BY_TYPE:
        return _BY_TYPE[error_type]
    return _BY_STATUS.get(status, UnavailableError)


def error_from_http(status: int, body: object, source: str) -> TrustplaneError:
    """The exception for an HTTP error answer whose JSON body is `body` (None when
    it had none); its message is the server's, after `source: `."""
    detail = body.get("error") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        error_type, message = detail.get("type"), detail.get("message")
    else:
        error_type, message = None, None
    if not isinstance(message, str) or not message:
        message = f"HTTP {status}"
    return error_class(status, error_type)(f"{source}: {message}")
