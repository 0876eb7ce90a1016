"""Known transient failures of external tools, and when to run a tool again.

A retry is for a failure that is known to go away by itself, matched on the
tool's own message, never for failures in general: a wrong key or a full
disk must surface at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Retry:
    """Run again (up to `tries` runs in all) when stderr contains one of `messages`.

    `cleanup` runs between tries, to undo what a failed try left behind (an
    empty RBD image that `qemu-img create` made before it failed). A timeout
    is never retried.
    """

    messages: tuple[str, ...]
    tries: int = 8
    cleanup: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        if self.tries < 1:
            raise ValueError("a retry policy allows at least one run")
        if not self.messages or not all(self.messages):
            raise ValueError("a retry names the messages it retries on")

    def matches(self, stderr: bytes) -> bool:
        text = stderr.decode("utf-8", errors="replace")
        return any(message in text for message in self.messages)

    def with_cleanup(self, cleanup: Callable[[], None]) -> Retry:
        return replace(self, cleanup=cleanup)


QEMU_PBKDF_CALIBRATION = Retry(("Unable to get accurate CPU usage",), tries=8)
"""`qemu-img create -f luks` (and qcow2 with LUKS encryption) calibrates its
PBKDF on thread CPU time, which some kernels count in 4 ms ticks, starting
with 2^15 iterations: it fails when that round ends inside one tick. With a
SHA-256 header hash (SHA-NI, ~3 ms a round) that was 28 of 100 creates here,
and 8 tries once were not enough in CI; `iter-time` does not prevent it
(DESIGN.md, "QEMU LUKS"). New headers use `QEMU_LUKS_PBKDF_HASH`, on which
it did not fail once in 200; the retry stays for headers made before. A
failed try returns in ~20 ms."""

QEMU_LUKS_PBKDF_HASH = "sha512"
"""The hash of every LUKS header QEMU writes for trustplane: a 2^15-iteration
PBKDF2-SHA-512 round takes ~25 ms here (no SHA-NI for SHA-512), so qemu-img's
calibration always sees CPU time pass."""
