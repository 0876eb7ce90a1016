"""Open an encrypted volume in user space: qemu-storage-daemon, FUSE, loop device.

For hosts without device-mapper (and for containers, through the Docker
volume plugin): one `qemu-storage-daemon` in the foreground under the
executor opens the volume with QEMU's block layer (the protocol node that
reaches it, QEMU's LUKS driver or librbd's encryption on top) and exports
the plaintext as a file through FUSE; `losetup` turns it into a block
device and, when asked, it is mounted. The key reaches the daemon as a
secret object read from a 0600 file in a private directory, removed as soon
as the daemon is ready; it is never in argv, the environment or a file
after that. The daemon, its export and the loop device are
`trustplane.tools.fuse_export`'s; the records and closing policy are here.

Closing undoes everything in reverse order (unmount, loop device, daemon,
FUSE mount, the private directory); a daemon that died leaves no stale
FUSE mount (`ToolProcess` unmounts what it declared). DESIGN.md, "Docker
volume plugins": run the daemon in the foreground and wait for it.

A volume that must stay open while the program that opened it restarts
(the Docker volume plugin: containers keep using it) is described by a
`UserspaceRecord` (pids and paths, no secret): a later run adopts it
(`UserspaceVolume.adopt`) and checks it is still whole (`intact`), or
closes what is left of it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from trustplane.errors import TrustplaneError
from trustplane.tools import (
    AdoptedProcess,
    Executor,
    SecretFile,
    ToolProcess,
    is_mounted,
    mount_points,
    unmount,
)
from trustplane.tools.command import Arg
from trustplane.tools.fuse_export import (
    DAEMON,
    adopt_daemon,
    attach_loop,
    detach_loop,
    export_argument,
    loop_backing_file,
    start_daemon,
)
from trustplane.volumes.access import QemuNode
from trustplane.volumes.opening import WRONG_KEY, OpenVolume

__all__ = [
    "DAEMON",
    "KEY_OBJECT",
    "UserspaceRecord",
    "UserspaceVolume",
    "key_object",
    "loop_backing_file",
    "open_userspace",
    "protocol_blockdev",
]

KEY_OBJECT = "key0"


def key_object(passphrase: bytes) -> SecretFile:
    """QEMU's secret object for a volume passphrase (from a private 0600 file)."""
    return SecretFile(passphrase, f"secret,id={KEY_OBJECT},file={{}}")


class UserspaceRecord(BaseModel):
    """An open user-space volume as a later run finds it again: pids and paths, no secret."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pid: int
    directory: str
    export: str
    device: str | None
    mountpoint: str | None


class UserspaceVolume(OpenVolume):
    """A volume exported as a plaintext file (`export`), on a loop device, maybe mounted."""

    def __init__(
        self,
        executor: Executor,
        daemon: ToolProcess | AdoptedProcess,
        directory: Path,
        export: Path,
        device: str | None,
        mountpoint: Path | None,
    ) -> None:
        self.executor = executor
        self.daemon = daemon
        self.directory = directory
        self.export = export
        self.device = device
        self.mountpoint = mountpoint
        self.path = device or os.fspath(export)
        self._closed = False

    def close(self, *, force: bool = False) -> None:
        """Unmount, detach, stop the daemon, remove the directory. Idempotent.

        A file system that will not unmount (busy) stops the close before
        anything under it goes: the volume stays open and whole, and the
        error says why. `force` is for a volume already broken (its daemon
        died): the file system is detached lazily and the rest torn down.
        """
        if self._closed:
            return
        if self.mountpoint is not None:
            if force:
                if is_mounted(self.executor, self.mountpoint):
                    unmount(self.executor, self.mountpoint)
            else:
                _unmount_if_mounted(self.executor, self.mountpoint)
        self._closed = True
        errors: list[TrustplaneError] = []
        steps: list[Callable[[], object]] = []
        if self.device is not None:
            device = self.device
            steps.append(lambda: self._detach_loop(device))
        steps.append(self.daemon.stop)
        for step in steps:
            try:
                step()
            except TrustplaneError as exc:
                errors.append(exc)
        shutil.rmtree(self.directory, ignore_errors=True)
        if errors:
            raise errors[0]

    def mount(self, mountpoint: Path, *, options: Sequence[str] = ()) -> None:
        """Mount the loop device's file system at `mountpoint` (close unmounts it)."""
        if self.device is None:
            raise ValueError("mounting needs the loop device")
        if self.mountpoint is not None:
            raise ValueError(f"already mounted at {self.mountpoint}")
        extra = ["-o", ",".join(options)] if options else []
        self.executor.run(["mount", *extra, self.device, os.fspath(mountpoint)], timeout=60)
        self.mountpoint = mountpoint

    def _detach_loop(self, device: str) -> None:
        """Detach the loop device, if it is still the one on our export (numbers are reused)."""
        if loop_backing_file(self.executor, device) == os.fspath(self.export):
            detach_loop(self.executor, device, timeout=60)

    def keep_past_exit(self) -> UserspaceRecord:
        """Leave the volume open when this process exits; what a later run adopts it by."""
        if isinstance(self.daemon, ToolProcess):
            self.daemon.outlive_this_process()
        return self.record()

    def record(self) -> UserspaceRecord:
        """How a later run finds this open volume (it is not kept past our exit by this)."""
        daemon = self.daemon
        pid = daemon.started.pid if isinstance(daemon, ToolProcess) else daemon.pid
        return UserspaceRecord(
            pid=pid,
            directory=os.fspath(self.directory),
            export=os.fspath(self.export),
            device=self.device,
            mountpoint=None if self.mountpoint is None else os.fspath(self.mountpoint),
        )

    @classmethod
    def adopt(cls, executor: Executor, record: UserspaceRecord) -> UserspaceVolume:
        """The volume an earlier run left open (or what is left of it: see `intact`)."""
        export = Path(record.export)
        daemon = adopt_daemon(executor, record.pid, export)
        mountpoint = None if record.mountpoint is None else Path(record.mountpoint)
        return cls(executor, daemon, Path(record.directory), export, record.device, mountpoint)

    def intact(self) -> bool:
        """True when the daemon serves the export, the loop device is on it and it is mounted."""
        if not self.daemon.running():
            return False
        mounted = mount_points(self.executor)
        if os.fspath(self.export) not in mounted:
            return False
        if self.device is not None and loop_backing_file(self.executor, self.device) != os.fspath(
            self.export
        ):
            return False
        if self.mountpoint is None:
            return True
        return os.fspath(self.mountpoint.parent.resolve() / self.mountpoint.name) in mounted


def _unmount_if_mounted(executor: Executor, point: Path) -> None:
    if is_mounted(executor, point):
        executor.run(["umount", os.fspath(point)], timeout=60)


def open_userspace(
    executor: Executor,
    nodes: Sequence[str],
    top: str,
    objects: Sequence[SecretFile],
    *,
    writable: bool = True,
    loop: bool = True,
    mountpoint: Path | None = None,
    run_dir: Path | None = None,
) -> UserspaceVolume:
    """Start the daemon with `nodes` (`--blockdev` option strings), export node `top`.

    `objects` are the secret objects the nodes name. With `loop`, the export
    is attached to a loop device; with `mountpoint` (which needs `loop`), the
    device's file system is mounted there. A wrong key is DecryptionKeyError;
    on any failure nothing is left behind.
    """
    if mountpoint is not None and not loop:
        raise ValueError("mounting needs the loop device")
    # Resolved, so the paths match what the mount table and the loop device show.
    directory = Path(tempfile.mkdtemp(prefix="trustplane-volume-", dir=run_dir)).resolve()
    export = directory / "export"
    daemon: ToolProcess | None = None
    device: str | None = None
    try:
        argv: list[Arg] = [DAEMON]
        for secret in objects:
            argv += ["--object", secret]
        for node in nodes:
            argv += ["--blockdev", node]
        argv += ["--export", export_argument(export, top, writable)]
        daemon = start_daemon(executor, argv, export, failures=WRONG_KEY)
        if loop:
            device = attach_loop(executor, export, writable=writable, timeout=60)
        if mountpoint is not None:
            assert device is not None
            options = [] if writable else ["-o", "ro"]
            executor.run(["mount", *options, device, os.fspath(mountpoint)], timeout=60)
    except BaseException:
        with contextlib.suppress(TrustplaneError):
            if device is not None:
                detach_loop(executor, device, timeout=60)
        with contextlib.suppress(TrustplaneError):
            if daemon is not None:
                daemon.stop()
            elif is_mounted(executor, export):
                unmount(executor, export)
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return UserspaceVolume(executor, daemon, directory, export, device, mountpoint)


def protocol_blockdev(node: QemuNode, name: str, *, writable: bool) -> str:
    """`--blockdev` for the protocol node, named `name`."""
    return f"{node.opts()},node-name={name},read-only={'off' if writable else 'on'}"
