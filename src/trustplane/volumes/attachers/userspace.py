"""Open an encrypted volume in user space: qemu-storage-daemon, FUSE, loop device.

For hosts without device-mapper (and for containers, through the Docker
volume plugin): one `qemu-storage-daemon` in the foreground under the
executor opens the volume with QEMU's block layer (the protocol node that
reaches it, QEMU's LUKS driver or librbd's encryption on top) and exports
the plaintext as a file through FUSE; `losetup` turns it into a block
device and, when asked, it is mounted. The key reaches the daemon as a
secret object read from a 0600 file in a private directory, removed as soon
as the daemon is ready; it is never in argv, the environment or a file
after that.

Closing undoes everything in reverse order (unmount, loop device, daemon,
FUSE mount, the private directory); a daemon that died leaves no stale
FUSE mount (`ToolProcess` unmounts what it declared). DESIGN.md, "Docker
volume plugins": run the daemon in the foreground and wait for it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from trustplane.errors import TrustplaneError
from trustplane.tools import Executor, SecretFile, ToolProcess, is_mounted, unmount
from trustplane.tools.command import Arg
from trustplane.volumes.access import QemuNode
from trustplane.volumes.opening import WRONG_KEY, OpenVolume

DAEMON = "qemu-storage-daemon"
READY_TIMEOUT = 60.0
STOP_GRACE = 10.0
KEY_OBJECT = "key0"


def key_object(passphrase: bytes) -> SecretFile:
    """QEMU's secret object for a volume passphrase (from a private 0600 file)."""
    return SecretFile(passphrase, f"secret,id={KEY_OBJECT},file={{}}")


class UserspaceVolume(OpenVolume):
    """A volume exported as a plaintext file (`export`), on a loop device, maybe mounted."""

    def __init__(
        self,
        executor: Executor,
        daemon: ToolProcess,
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

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        errors: list[TrustplaneError] = []
        steps: list[Callable[[], object]] = []
        if self.mountpoint is not None:
            point = self.mountpoint
            steps.append(lambda: _unmount_if_mounted(self.executor, point))
        if self.device is not None:
            device = self.device
            steps.append(lambda: self.executor.run(["losetup", "--detach", device], timeout=60))
        steps.append(self.daemon.stop)
        for step in steps:
            try:
                step()
            except TrustplaneError as exc:
                errors.append(exc)
        shutil.rmtree(self.directory, ignore_errors=True)
        if errors:
            raise errors[0]


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
    directory = Path(tempfile.mkdtemp(prefix="trustplane-volume-", dir=run_dir))
    export = directory / "export"
    daemon: ToolProcess | None = None
    device: str | None = None
    try:
        export.touch(mode=0o600)
        argv: list[Arg] = [DAEMON]
        for secret in objects:
            argv += ["--object", secret]
        for node in nodes:
            argv += ["--blockdev", node]
        argv += [
            "--export",
            f"type=fuse,id=e0,node-name={top},mountpoint={_opt(export)},"
            f"writable={'on' if writable else 'off'}",
        ]
        daemon = executor.start(
            argv,
            ready=lambda: is_mounted(executor, export),
            ready_timeout=READY_TIMEOUT,
            mounts=[export],
            failures=WRONG_KEY,
            grace=STOP_GRACE,
        )
        if loop:
            losetup = ["losetup", "--find", "--show", *([] if writable else ["--read-only"])]
            device = executor.run([*losetup, os.fspath(export)], timeout=60).text.strip()
        if mountpoint is not None:
            assert device is not None
            options = [] if writable else ["-o", "ro"]
            executor.run(["mount", *options, device, os.fspath(mountpoint)], timeout=60)
    except BaseException:
        with contextlib.suppress(TrustplaneError):
            if device is not None:
                executor.run(["losetup", "--detach", device], timeout=60)
        with contextlib.suppress(TrustplaneError):
            if daemon is not None:
                daemon.stop()
            elif is_mounted(executor, export):
                unmount(executor, export)
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return UserspaceVolume(executor, daemon, directory, export, device, mountpoint)


def _opt(path: Path) -> str:
    """A path inside a QEMU option string (commas are doubled)."""
    return os.fspath(path).replace(",", ",,")


def protocol_blockdev(node: QemuNode, name: str, *, writable: bool) -> str:
    """`--blockdev` for the protocol node, named `name`."""
    return f"{node.opts()},node-name={name},read-only={'off' if writable else 'on'}"
