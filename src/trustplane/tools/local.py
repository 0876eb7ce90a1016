"""Run tools on this host.

Each call gets its own process group (so a timeout kills whatever the tool
forked), `LC_ALL=C` (so the messages the executor matches are the English
ones) and a PATH that includes the sbin directories where Debian puts
`cryptsetup`, `losetup` and friends. `SecretFile` values go to a 0600 file
in a `SecretDir`; `SecretFd` values to an anonymous memory file (memfd)
inherited as `/dev/fd/N`, which the tool may open, stat and re-read like a
file, and which never has a name on any filesystem.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import IO

from trustplane.errors import ToolError
from trustplane.tools.command import Command, SecretArg, SecretFile
from trustplane.tools.runner import Completed, Runner, Started
from trustplane.tools.secret_dir import SecretDir

SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_OUTPUT_TAIL = 64 * 1024
_REAP_TIMEOUT = 5.0


def path_with_sbin(path: str | None = None) -> str:
    """PATH extended with the sbin directories (a non-login PATH may lack them)."""
    parts = (path if path is not None else os.environ.get("PATH", "")).split(os.pathsep)
    parts = [p for p in parts if p]
    return os.pathsep.join(parts + [d for d in SBIN_DIRS if d not in parts])


def tool_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with a stable locale and sbin on PATH, plus `extra`."""
    env = dict(os.environ)
    env["PATH"] = path_with_sbin(env.get("PATH"))
    env["LC_ALL"] = "C"
    env.pop("LANGUAGE", None)
    env.update(extra or {})
    return env


def _memfd(value: bytes) -> int:
    fd = os.memfd_create("trustplane-secret", os.MFD_CLOEXEC)
    try:
        view = memoryview(value)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class _Placed:
    """One command's secrets placed on this host: files in a SecretDir, memfds."""

    def __init__(self, command: Command, secret_root: Path | None) -> None:
        self._stack = ExitStack()
        self.fds: list[int] = []
        self._dir: SecretDir | None = None
        self._root = secret_root
        try:
            self.argv = command.render(self._place)
        except BaseException:
            self.close_fds()
            self.remove_files()
            raise

    def _place(self, index: int, arg: SecretArg) -> str:
        if isinstance(arg, SecretFile):
            if self._dir is None:
                self._dir = SecretDir(self._root)
            return os.fspath(self._dir.write(arg.value))
        fd = _memfd(arg.value)
        self.fds.append(fd)
        return f"/dev/fd/{fd}"

    def close_fds(self) -> None:
        """The parent's copies; the child keeps its own."""
        while self.fds:
            os.close(self.fds.pop())

    def remove_files(self) -> None:
        if self._dir is not None:
            self._dir.remove()


class LocalRunner(Runner):
    """Runs tools on this host. `secret_root`: where private directories go (default tmpfs)."""

    name = "local"

    def __init__(self, secret_root: Path | None = None) -> None:
        self.secret_root = secret_root

    def _popen(
        self, command: Command, placed: _Placed, stdout: int | IO[bytes], stderr: int | IO[bytes]
    ) -> subprocess.Popen[bytes]:
        try:
            return subprocess.Popen(
                placed.argv,
                stdin=subprocess.PIPE if command.stdin is not None else subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                pass_fds=placed.fds,
                env=tool_environment(dict(command.env)),
                cwd=command.cwd,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise ToolError(
                f"{command.tool} not found (looked on PATH and in {', '.join(SBIN_DIRS)})",
                tool=command.tool,
                returncode=None,
            ) from exc
        except OSError as exc:
            raise ToolError(
                f"cannot start {command.tool}: {exc.strerror}", tool=command.tool, returncode=None
            ) from exc

    def run(self, command: Command, timeout: float) -> Completed:
        placed = _Placed(command, self.secret_root)
        try:
            try:
                proc = self._popen(command, placed, subprocess.PIPE, subprocess.PIPE)
            finally:
                placed.close_fds()
            timed_out = False
            try:
                out, err = proc.communicate(command.stdin, timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                signal_group(proc.pid, signal.SIGKILL)
                try:
                    out, err = proc.communicate(timeout=_REAP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    # Something left the group and holds our pipes: give up on its output.
                    proc.kill()
                    proc.wait()
                    out, err = b"", b""
            finally:
                # A one-shot tool leaves nothing running behind it.
                signal_group(proc.pid, signal.SIGKILL)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        finally:
            placed.remove_files()
        return Completed(
            None if timed_out else proc.returncode, out or b"", err or b"", timed_out=timed_out
        )

    def start(self, command: Command) -> Started:
        placed = _Placed(command, self.secret_root)
        # Unnamed, so nothing to clean up; the handle owns it and closes it.
        log = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            try:
                proc = self._popen(command, placed, log, log)
            finally:
                placed.close_fds()
            if proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.write(command.stdin or b"")
                proc.stdin.close()
        except BaseException:
            placed.remove_files()
            log.close()
            raise
        return _LocalStarted(proc, placed, log)


class _LocalStarted(Started):
    def __init__(self, proc: subprocess.Popen[bytes], placed: _Placed, log: IO[bytes]) -> None:
        self.proc = proc
        self._placed = placed
        self._log = log
        self._final: bytes | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self, grace: float) -> int | None:
        if self.proc.poll() is None:
            signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        signal_group(self.proc.pid, signal.SIGKILL)
        self.release_secrets()
        if self._final is None:
            self._final = self.output()
            self._log.close()
        return self.proc.returncode

    def output(self) -> bytes:
        if self._final is not None:
            return self._final
        try:
            size = os.fstat(self._log.fileno()).st_size
            return os.pread(self._log.fileno(), _OUTPUT_TAIL, max(0, size - _OUTPUT_TAIL))
        except (OSError, ValueError):
            return b""

    def release_secrets(self) -> None:
        self._placed.remove_files()
