"""One exception hierarchy for every failure trustplane expects.

Each class carries the exit code the CLI returns for it, so a failure reaches
the user as one line and a stable number, never a traceback. Messages never
contain secret material (keys, payloads, plaintext).
"""

from __future__ import annotations

from enum import IntEnum


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
