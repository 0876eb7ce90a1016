"""Start a real program in the background and know when it is ready.

Every embedded component (dockerd, docker-registry, ...) is a separate
program. `ManagedProcess` starts one in its own process group with its output
in a log file, waits until a readiness check passes and stops the whole group
again, so that a test run never leaves helpers behind and a failure to start
reaches the user as one `UnavailableError` that quotes the program's log.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from trustplane.errors import UnavailableError

# Debian installs daemons (dockerd, ...) in sbin, which a non-login PATH may lack;
# the tool runner and the embedded daemons share one answer.
from trustplane.tools.local import SBIN_DIRS, signal_group

ReadinessCheck = Callable[[], bool]
"""Returns True once the component answers; must not raise for "not yet"."""

LOG_TAIL_LINES = 20
_POLL_INTERVAL = 0.05


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that nothing listens on right now.

    The kernel picks it (bind to port 0); there is a small window before the
    caller binds it, which is acceptable on a loopback test machine.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class StopsOnExit:
    """A started component as a context manager: leaving the block stops it."""

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def require_binary(name: str, apt_package: str) -> str:
    """Return the path of program `name` or say which Debian package provides it.

    Looks on PATH, then in the sbin directories where Debian puts daemons.
    """
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN_DIRS))
    if path is None:
        raise UnavailableError(f"{name} not found; install the Debian package {apt_package}")
    return path


@dataclass(frozen=True)
class TcpReady:
    """Ready when a TCP connection to host:port succeeds."""

    port: int
    host: str = "127.0.0.1"

    def __call__(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0):
                return True
        except OSError:
            return False


@dataclass(frozen=True)
class UnixSocketReady:
    """Ready when a connection to the unix socket at `path` succeeds."""

    path: Path

    def __call__(self) -> bool:
        return unix_socket_accepts(self.path)


def unix_socket_accepts(path: Path, timeout: float = 1.0) -> bool:
    """True when something listens on the unix socket `path` (a stale file refuses)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except OSError:
            return False
        return True


def tail_lines(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 64 * 1024) -> str:
    """Last `lines` lines of a log file, read from its end so a huge log costs nothing."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


_LIVE: weakref.WeakSet[ManagedProcess] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    """Stop helpers still running when the interpreter exits (an interrupted test run)."""
    for proc in list(_LIVE):
        with contextlib.suppress(Exception):
            proc.stop()


class ManagedProcess:
    """One background program in its own process group, with a log file.

    Use as a context manager, or call `start()` and `stop()`. `stop()` sends
    SIGTERM to the whole group (the program and anything it forked), waits
    `grace` seconds, then sends SIGKILL; calling it again does nothing.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        work_dir: Path,
        *,
        ready: ReadinessCheck | None = None,
        timeout: float = 30.0,
        grace: float = 10.0,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.work_dir = work_dir
        self.log_file = work_dir / f"{name}.log"
        self.ready = ready
        self.timeout = timeout
        self.grace = grace
        self.env = dict(env) if env is not None else None
        self.cwd = cwd if cwd is not None else work_dir
        self._popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._stopped = False

    @property
    def pid(self) -> int | None:
        """Process id of the program, or None before `start()`."""
        return self._popen.pid if self._popen is not None else None

    def running(self) -> bool:
        """True while the program itself has not exited."""
        return self._popen is not None and self._popen.poll() is None

    def returncode(self) -> int | None:
        """Exit status once the program has exited, else None."""
        return self._popen.poll() if self._popen is not None else None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """Last lines of the program's output, for error messages."""
        return tail_lines(self.log_file, lines)

    def start(self) -> Self:
        """Start the program and wait until it is ready; raise UnavailableError if not."""
        if self._popen is not None:
            raise RuntimeError(f"{self.name} already started")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_file.open("wb")
        try:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
            )
        except OSError as exc:
            self._log.close()
            raise UnavailableError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from exc
        _LIVE.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            code = self.returncode()
            if code is not None:
                raise UnavailableError(self._failure(f"exited with status {code} during start-up"))
            if self.ready is None or self.ready():
                return
            if time.monotonic() >= deadline:
                raise UnavailableError(self._failure(f"not ready after {self.timeout:g} s"))
            time.sleep(_POLL_INTERVAL)

    def _failure(self, what: str) -> str:
        tail = self.log_tail()
        detail = f"; last lines of {self.log_file}:\n{tail}" if tail else f" (log {self.log_file})"
        return f"{self.name} {what}{detail}"

    def stop(self) -> None:
        """Terminate the whole process group; SIGKILL after the grace period. Idempotent."""
        if self._stopped or self._popen is None:
            self._stopped = True
            return
        self._stopped = True
        _LIVE.discard(self)
        pgid = self._popen.pid  # start_new_session: the group id is the leader's pid
        signal_group(pgid, signal.SIGTERM)
        try:
            self._popen.wait(timeout=self.grace)
        except subprocess.TimeoutExpired:
            signal_group(pgid, signal.SIGKILL)
            self._popen.wait()
        # Children that outlived the leader (still in its group) go too.
        signal_group(pgid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> Self:
        if self._popen is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid={self.pid}, log={str(self.log_file)!r})"
