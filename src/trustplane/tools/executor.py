"""The one way trustplane runs an external tool.

`qemu-img`, `qemu-storage-daemon`, `qemu-io`, `cryptsetup`, `dmsetup`,
`lvm`, `virsh`, `rbd`, `tgtadm`, `losetup`, `mount`, `tpm2_*`: every call
goes through `Executor.run` (one-shot) or `Executor.start` (long-running).

- Secrets are bytes and reach the tool through stdin or an argv placeholder
  (`SecretFile`, `SecretFd`) that the runner fills with a path it chose;
  never through argv text or the environment.
- Every call has a timeout; at the timeout the whole process group dies.
- A failure is one `ToolError` (or the class the caller maps its message to)
  naming the tool and its last stderr line, with the secrets blanked out.
- A `Retry` runs a tool again on a known transient message only.
- The `Runner` underneath decides where the process runs: this host, or a
  test guest with device-mapper.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from trustplane.tools.background import ToolProcess
from trustplane.tools.command import Arg, Command
from trustplane.tools.failure import FailureMap, exit_text, failure
from trustplane.tools.local import LocalRunner
from trustplane.tools.retry import Retry
from trustplane.tools.runner import Completed, Runner

DEFAULT_TIMEOUT = 120.0


@dataclass(frozen=True)
class ToolResult:
    """A finished call: exit status and output (stdout may hold what the caller asked for)."""

    tool: str
    returncode: int
    stdout: bytes = field(repr=False)
    stderr: bytes
    tries: int = 1

    @property
    def text(self) -> str:
        """stdout as text."""
        return self.stdout.decode("utf-8", errors="replace")


class Executor:
    """Runs external tools through a `Runner` (default: this host)."""

    def __init__(self, runner: Runner | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.runner = runner if runner is not None else LocalRunner()
        self.timeout = timeout

    def run(
        self,
        argv: Sequence[Arg],
        *,
        stdin: bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
        retry: Retry | None = None,
        failures: FailureMap | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> ToolResult:
        """Run a tool to completion and return its output.

        `stdin` is written to the tool's standard input (the place for a key
        that `cryptsetup --key-file -` reads). With `check` (the default) a
        non-zero exit raises; without it the caller reads `returncode`. A
        timeout always raises `ToolTimeout`.
        """
        command = Command.of(argv, stdin=stdin, env=env, cwd=cwd)
        limit = self.timeout if timeout is None else timeout
        if limit <= 0:
            raise ValueError("timeout must be positive")
        tries = retry.tries if retry is not None else 1
        for attempt in range(1, tries + 1):
            done = self.runner.run(command, limit)
            if done.timed_out:
                raise failure(
                    command,
                    f"did not finish within {limit:g} s and was killed",
                    done.stderr,
                    returncode=None,
                    timed_out=True,
                )
            if done.returncode == 0 or not check:
                return _result(command, done, attempt)
            if retry is not None and attempt < tries and retry.matches(done.stderr):
                if retry.cleanup is not None:
                    retry.cleanup()
                continue
            what = exit_text(done.returncode)
            if attempt > 1:
                what += f" (try {attempt} of {tries})"
            raise failure(command, what, done.stderr, returncode=done.returncode, failures=failures)
        raise AssertionError("unreachable: the last try returns or raises")

    def start(
        self,
        argv: Sequence[Arg],
        *,
        ready: Callable[[], bool],
        ready_timeout: float = 30.0,
        stdin: bytes | None = None,
        mounts: Sequence[str | os.PathLike[str]] = (),
        grace: float = 10.0,
        failures: FailureMap | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> ToolProcess:
        """Start a long-running tool in the foreground and wait until `ready()` is true.

        Secret files are removed once it is ready (it has read them by then).
        `mounts` are the mount points it makes (a FUSE export): after `stop()`
        none of them is left mounted, even if the tool died without
        unmounting. If it exits or is not ready within `ready_timeout`, it is
        stopped and the error names its last output line.
        """
        command = Command.of(argv, stdin=stdin, env=env, cwd=cwd)
        started = self.runner.start(command)
        process = ToolProcess(self, command, started, mounts=mounts, grace=grace)
        process.wait_ready(ready, ready_timeout, failures)
        return process


def _result(command: Command, done: Completed, tries: int) -> ToolResult:
    assert done.returncode is not None
    return ToolResult(command.tool, done.returncode, done.stdout, done.stderr, tries)
