"""A long-running external tool: started, ready, stopped, nothing left behind.

`qemu-storage-daemon` runs in the foreground under us and is waited for:
a `--daemonize`d one killed without waiting left stale FUSE mounts
(`Transport endpoint is not connected`, DESIGN.md "Docker volume plugins").
After `stop()` the process group is gone and every mount point the tool was
declared to make is unmounted, whether or not the tool managed it itself.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from trustplane.errors import ToolError, TrustplaneError
from trustplane.tools.command import Command
from trustplane.tools.failure import FailureMap, exit_text, failure, last_line
from trustplane.tools.runner import Started

if TYPE_CHECKING:
    from trustplane.tools.executor import Executor

_POLL_INTERVAL = 0.05
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")

_LIVE: weakref.WeakSet[ToolProcess] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    """Stop tools still running when the interpreter exits (an interrupted run)."""
    for process in list(_LIVE):
        with contextlib.suppress(Exception):
            process.stop()


def mounts(executor: Executor) -> list[tuple[str, str]]:
    """(source, mount point) of every mount where the executor's runner runs."""
    table = executor.run(["cat", "/proc/self/mounts"], timeout=30).text
    found = []
    for line in table.splitlines():
        fields = line.split()
        if len(fields) >= 2:
            found.append((_unescape(fields[0]), _unescape(fields[1])))
    return found


def mount_points(executor: Executor) -> set[str]:
    """Mount points where the executor's runner runs (this host or the guest)."""
    return {point for _, point in mounts(executor)}


def _unescape(field: str) -> str:
    """The mount table writes space, tab, newline and backslash as octal escapes."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def _canonical(path: str | os.PathLike[str]) -> str:
    """The path as the mount table spells it (absolute, symlinks resolved)."""
    return str(Path(path).resolve())


def is_mounted(executor: Executor, path: str | os.PathLike[str]) -> bool:
    """True when `path` is a mount point, even a dead FUSE one that `stat` cannot reach."""
    return _canonical(path) in mount_points(executor)


def unmount(executor: Executor, path: str | os.PathLike[str]) -> None:
    """Unmount `path`; lazily, so a dead FUSE mount (ENOTCONN) goes too."""
    target = _canonical(path)
    try:
        executor.run(["umount", "--lazy", target], timeout=30)
    except ToolError:
        # Not root: a FUSE mount is ours to drop with fusermount.
        if is_mounted(executor, target):
            executor.run(["fusermount3", "-u", "-z", target], timeout=30)


class ToolProcess:
    """A started long-running tool (from `Executor.start`); a context manager."""

    def __init__(
        self,
        executor: Executor,
        command: Command,
        started: Started,
        *,
        mounts: Sequence[str | os.PathLike[str]] = (),
        grace: float = 10.0,
    ) -> None:
        self.executor = executor
        self.command = command
        self.started = started
        self.mounts = [_canonical(m) for m in mounts]
        self.grace = grace
        self._stopped = False
        _LIVE.add(self)

    @property
    def tool(self) -> str:
        return self.command.tool

    def running(self) -> bool:
        return self.started.poll() is None

    def last_output_line(self) -> str:
        return last_line(self.started.output(), self.command.secrets())

    def wait_ready(
        self, ready: Callable[[], bool], timeout: float, failures: FailureMap | None = None
    ) -> None:
        """Poll `ready` until true; stop the tool and raise if it exits or the time runs out."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                code = self.started.poll()
                if code is not None:
                    raise failure(
                        self.command,
                        exit_text(code) + " while starting",
                        self.started.output(),
                        returncode=code,
                        failures=failures,
                    )
                if ready():
                    break
                if time.monotonic() >= deadline:
                    raise failure(
                        self.command,
                        f"was not ready within {timeout:g} s and was stopped",
                        self.started.output(),
                        returncode=None,
                        timed_out=True,
                    )
                time.sleep(_POLL_INTERVAL)
        except BaseException:
            self.stop()
            raise
        self.started.release_secrets()

    def stop(self) -> None:
        """Stop the process group, wait for it, unmount what it left. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        _LIVE.discard(self)
        errors: list[TrustplaneError] = []
        try:
            self.started.stop(self.grace)
        finally:
            self.started.release_secrets()
            if self.mounts:
                still = mount_points(self.executor)
                for point in self.mounts:
                    if point in still:
                        try:
                            unmount(self.executor, point)
                        except TrustplaneError as exc:
                            errors.append(exc)
        if errors:
            raise errors[0]

    def outlive_this_process(self) -> int:
        """Keep the tool running when this interpreter exits; its pid.

        For a tool that serves others beyond our lifetime (a volume in use by
        containers outlives a restart of the volume plugin); a later run
        takes it over with `AdoptedProcess`. `stop()` still stops it.
        """
        _LIVE.discard(self)
        return self.started.pid

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ToolProcess({self.tool!r}, running={self.running()})"


class AdoptedProcess:
    """A tool that an earlier run started and left running, known by its pid.

    It is ours only while its command line still holds `marker` (pids are
    reused); `stop()` signals it, waits for it to go (its parent is gone, so
    init reaps it) and unmounts what it was declared to make, like
    `ToolProcess.stop()`.
    """

    def __init__(
        self,
        executor: Executor,
        pid: int,
        marker: str,
        *,
        mounts: Sequence[str | os.PathLike[str]] = (),
        grace: float = 10.0,
    ) -> None:
        if pid <= 1:
            raise ValueError("not a process id to adopt")
        self.executor = executor
        self.pid = pid
        self.marker = marker
        self.mounts = [_canonical(m) for m in mounts]
        self.grace = grace
        self._stopped = False

    def running(self) -> bool:
        """True while the pid runs a command holding the marker and is not a zombie."""
        probe = self.executor.run(
            ["sh", "-c", 'cat "/proc/$1/stat" && tr "\\0" " " < "/proc/$1/cmdline"', "sh",
             str(self.pid)],
            check=False,
            timeout=30,
        )  # fmt: skip
        if probe.returncode != 0:
            return False
        stat, _, cmdline = probe.text.partition("\n")
        state = stat.rpartition(")")[2].split()[:1]
        return state != ["Z"] and self.marker in cmdline

    def stop(self) -> None:
        """Stop it (TERM, then KILL after the grace time) and unmount its mounts. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.running():
            self._signal("TERM")
            if not self._gone_within(self.grace):
                self._signal("KILL")
                self._gone_within(self.grace)
        still = mount_points(self.executor)
        for point in self.mounts:
            if point in still:
                unmount(self.executor, point)

    def _signal(self, name: str) -> None:
        self.executor.run(["kill", f"-{name}", str(self.pid)], check=False, timeout=30)

    def _gone_within(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self.running():
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_INTERVAL * 2)
        return True

    def __repr__(self) -> str:
        return f"AdoptedProcess({self.pid}, {self.marker!r})"
