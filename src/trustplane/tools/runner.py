"""Where a tool runs: the interface the executor drives.

The executor decides *what* runs (argv, timeout, retries, errors); a runner
decides *how* it reaches a process: where secret files live, how a
descriptor is inherited, how the process group is killed at the timeout.
`LocalRunner` runs on this host; the test guest's runner
(`trustplane.embedded.guest_runner`) runs the same commands inside a QEMU
guest whose kernel has device-mapper, so a driver's code is the same in
production and in the tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from trustplane.errors import UnsupportedError
from trustplane.tools.command import Command


@dataclass(frozen=True)
class Completed:
    """What a finished (or killed) one-shot call left behind."""

    returncode: int | None
    """Exit status; negative for a signal; None when killed at the timeout."""
    stdout: bytes = field(repr=False)
    stderr: bytes
    timed_out: bool = False


class Started(ABC):
    """A long-running tool a runner started in its own process group."""

    @property
    def pid(self) -> int:
        """Its process id where it runs (for a later run to adopt it)."""
        raise UnsupportedError(f"{type(self).__name__} cannot hand a tool over to a later run")

    @abstractmethod
    def poll(self) -> int | None:
        """Exit status once the tool has exited, else None."""

    @abstractmethod
    def stop(self, grace: float) -> int | None:
        """SIGTERM to the group, SIGKILL after `grace` s; wait for it. Idempotent."""

    @abstractmethod
    def output(self) -> bytes:
        """The tool's output so far (stdout and stderr, interleaved), last 64 KiB."""

    @abstractmethod
    def release_secrets(self) -> None:
        """Remove the secret files (the tool has read them once it is ready). Idempotent."""


class Runner(ABC):
    """Runs commands somewhere, with their secrets placed safely."""

    name: str = "runner"

    @abstractmethod
    def run(self, command: Command, timeout: float) -> Completed:
        """Run to completion; at `timeout` kill the whole process group."""

    @abstractmethod
    def start(self, command: Command) -> Started:
        """Start a long-running tool; its secret files stay until `release_secrets()`."""
