"""A block node served by qemu-storage-daemon through FUSE, on a loop device.

This host has no device-mapper and no NBD client in its kernel, but it has
FUSE and loop devices: `qemu-storage-daemon --export type=fuse` turns any
block node QEMU can open (a qcow2 chain, a LUKS volume, an NBD export) into
one plain file, and `losetup` turns that file into a block device that
`mkfs` and `mount` take. The qcow2 backend opens its chains this way, and
the device-mapper test guest's block exports reach the host this way
(embedded/guest_export.py).

Everything one export holds lives under one directory (its lease): the
FUSE mount point `DIR/export`, the loop device backed by it, and the daemon
whose argv names it. So `clean_directory(DIR)` finds and undoes all of it
after its owner died, knowing nothing but the directory.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from trustplane.errors import ToolError
from trustplane.layerstore.filesystem import force_unmount
from trustplane.tools import Executor, ToolProcess, is_mounted, mounts
from trustplane.tools.command import Arg
from trustplane.tools.failure import FailureMap

DAEMON = "qemu-storage-daemon"
EXPORT = "export"
"""The FUSE mount point's name inside the directory."""
_READY_TIMEOUT = 60.0
_STOP_GRACE = 10.0


class FuseLoop:
    """The daemon `argv` (whose FUSE export is `directory/export`), and a loop device on it.

    `argv` must export through FUSE at `export_argument(directory, ...)`.
    """

    def __init__(
        self,
        executor: Executor,
        argv: list[Arg],
        directory: Path,
        writable: bool,
        failures: FailureMap | None = None,
    ) -> None:
        self.executor = executor
        self.export = directory / EXPORT
        self.export.touch(mode=0o600)
        self.device = ""
        self._daemon: ToolProcess | None = executor.start(
            argv,
            ready=lambda: is_mounted(executor, self.export),
            ready_timeout=_READY_TIMEOUT,
            mounts=[self.export],
            failures=failures,
            grace=_STOP_GRACE,
        )
        try:
            # No --direct-io: it would spare the double page cache (loop device and
            # FUSE file) and double a fill's speed, but through qemu-storage-daemon
            # 7.2's FUSE export it loses writes (mkfs's journal superblock, measured).
            losetup = ["losetup", "--find", "--show", *([] if writable else ["--read-only"])]
            self.device = executor.run([*losetup, os.fspath(self.export)]).text.strip()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Detach the loop device, stop the daemon (which drops its FUSE mount). Idempotent."""
        try:
            if self.device:
                self.executor.run(["losetup", "--detach", self.device])
                self.device = ""
        finally:
            if self._daemon is not None:
                daemon, self._daemon = self._daemon, None
                daemon.stop()


def export_argument(directory: Path, node: str, writable: bool) -> str:
    """The `--export` value that serves `node` at `directory/export`."""
    mountpoint = option_path(directory / EXPORT)
    return (
        f"type=fuse,id=e0,node-name={node},mountpoint={mountpoint},"
        f"writable={'on' if writable else 'off'}"
    )


def option_path(path: Path) -> str:
    """A path inside a QEMU option string (a comma is written twice)."""
    return os.fspath(path).replace(",", ",,")


# -- recovery ------------------------------------------------------------------------


def clean_directory(executor: Executor, path: Path) -> list[str]:
    """Undo what exports under `path` hold: mounts, loop devices, daemons."""
    done = []
    loops = _loop_devices_under(executor, path)
    for point in _mounts_of(executor, loops, path):
        force_unmount(executor, Path(point))
        done.append(f"unmounted {point}")
    for device in loops:
        executor.run(["losetup", "--detach", device], check=False)
        done.append(f"detached {device}")
    for pid in _daemons_under(path):
        _stop_pid(pid)
        done.append(f"stopped {DAEMON} {pid}")
    export = path / EXPORT
    if is_mounted(executor, export):
        force_unmount(executor, export)
        done.append(f"unmounted {export}")
    return done


def _loop_devices_under(executor: Executor, path: Path) -> list[str]:
    listing = executor.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"]).text
    if not listing.strip():
        return []
    try:
        devices = json.loads(listing).get("loopdevices", [])
    except ValueError as exc:
        raise ToolError(
            f"losetup --list: unreadable output ({exc})", tool="losetup", returncode=0
        ) from None
    prefix = os.fspath(path) + "/"
    return [
        str(d["name"])
        for d in devices
        if str(d.get("back-file") or "").removesuffix(" (deleted)").startswith(prefix)
    ]


def _mounts_of(executor: Executor, devices: list[str], path: Path) -> list[str]:
    """Mount points on our loop devices, or under the directory (the FUSE export aside)."""
    export = os.fspath(path / EXPORT)
    prefix = os.fspath(path) + "/"
    found = {
        point
        for source, point in mounts(executor)
        if source in devices or (point.startswith(prefix) and point != export)
    }
    # Deepest first, so that nothing is left mounted over a mount point we drop.
    return sorted(found, key=len, reverse=True)


def _daemons_under(path: Path) -> list[int]:
    """qemu-storage-daemon processes exporting into this directory (by their argv)."""
    needle = f"mountpoint={option_path(path / EXPORT)},".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ours = Path(argv[0].decode(errors="replace")).name == DAEMON
        if ours and any(needle in arg for arg in argv):
            found.append(int(entry.name))
    return found


def _stop_pid(pid: int) -> None:
    """SIGTERM (the daemon then flushes and drops its FUSE mount), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, _STOP_GRACE), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"
