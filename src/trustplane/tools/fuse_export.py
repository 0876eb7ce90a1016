"""A block node exported as a file by qemu-storage-daemon through FUSE, on a loop device.

This host has no device-mapper and no NBD client in its kernel, but it has
FUSE and loop devices: `qemu-storage-daemon --export type=fuse` turns any
block node QEMU can open (a qcow2 chain, a LUKS volume, an NBD export) into
one plain file, and `losetup` turns that file into a block device that
`mkfs` and `mount` take. The user-space volume attacher
(volumes/attachers/userspace.py), the qcow2 layer store and the
device-mapper guest's block exports (layerstore/fuse_loop.py) all do it
with the pieces here; what they record and how they clean up after a crash
(leases, records) stays with them.

The daemon runs in the foreground under the executor (secrets reach it as
`SecretFile` objects, never argv text); it is ready when its FUSE mount
shows in the mount table, and a daemon that dies leaves no stale FUSE mount
(`ToolProcess` unmounts what it declared).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from trustplane.errors import ToolError
from trustplane.tools.background import AdoptedProcess, ToolProcess, is_mounted
from trustplane.tools.command import Arg
from trustplane.tools.executor import Executor
from trustplane.tools.failure import FailureMap

DAEMON = "qemu-storage-daemon"
READY_TIMEOUT = 60.0
STOP_GRACE = 10.0


def option_path(path: Path) -> str:
    """A path inside a QEMU option string (a comma is written twice)."""
    return os.fspath(path).replace(",", ",,")


def export_marker(export: Path) -> str:
    """What the daemon's command line holds for the FUSE export at `export`."""
    return f"mountpoint={option_path(export)},"


def export_argument(export: Path, node: str, writable: bool) -> str:
    """The `--export` value that serves block node `node` as the file `export`."""
    return (
        f"type=fuse,id=e0,node-name={node},{export_marker(export)}"
        f"writable={'on' if writable else 'off'}"
    )


def start_daemon(
    executor: Executor, argv: list[Arg], export: Path, *, failures: FailureMap | None = None
) -> ToolProcess:
    """Start the daemon `argv` (which exports at `export`) and wait for its FUSE mount.

    `export` is created first (0600), as the mount point FUSE needs."""
    export.touch(mode=0o600)
    return executor.start(
        argv,
        ready=lambda: is_mounted(executor, export),
        ready_timeout=READY_TIMEOUT,
        mounts=[export],
        failures=failures,
        grace=STOP_GRACE,
    )


def adopt_daemon(executor: Executor, pid: int, export: Path) -> AdoptedProcess:
    """The daemon (pid `pid`) an earlier run left serving `export`."""
    return AdoptedProcess(executor, pid, export_marker(export), mounts=[export], grace=STOP_GRACE)


def attach_loop(
    executor: Executor, export: Path, *, writable: bool, timeout: float | None = None
) -> str:
    """A loop device on the file `export` (read-only unless `writable`): its path."""
    # No --direct-io: it would spare the double page cache (loop device and
    # FUSE file) and double a fill's speed, but through qemu-storage-daemon
    # 7.2's FUSE export it loses writes (mkfs's journal superblock, measured).
    losetup = ["losetup", "--find", "--show", *([] if writable else ["--read-only"])]
    return executor.run([*losetup, os.fspath(export)], timeout=timeout).text.strip()


def detach_loop(executor: Executor, device: str, *, timeout: float | None = None) -> None:
    """Detach loop device `device`."""
    executor.run(["losetup", "--detach", device], timeout=timeout)


class FuseLoop:
    """The daemon `argv` (whose FUSE export is `export`), and a loop device on it.

    `argv` must export through FUSE at `export` (`export_argument`).
    """

    def __init__(
        self,
        executor: Executor,
        argv: list[Arg],
        export: Path,
        writable: bool,
        failures: FailureMap | None = None,
    ) -> None:
        self.executor = executor
        self.export = export
        self.device = ""
        self._daemon: ToolProcess | None = start_daemon(executor, argv, export, failures=failures)
        try:
            self.device = attach_loop(executor, export, writable=writable)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Detach the loop device, stop the daemon (which drops its FUSE mount). Idempotent."""
        try:
            if self.device:
                detach_loop(self.executor, self.device)
                self.device = ""
        finally:
            if self._daemon is not None:
                daemon, self._daemon = self._daemon, None
                daemon.stop()


# -- what is left after a crash ------------------------------------------------------


def loop_backing_file(executor: Executor, device: str) -> str | None:
    """The file behind loop device `device` (None when it is detached)."""
    name = Path(device).name
    if not name.startswith("loop") or not name[4:].isdigit():
        return None
    probe = executor.run(["cat", f"/sys/block/{name}/loop/backing_file"], check=False, timeout=30)
    if probe.returncode != 0:
        return None
    return probe.text.strip().removesuffix(" (deleted)") or None


def loop_devices_under(executor: Executor, path: Path) -> list[str]:
    """Loop devices whose backing file lies under directory `path`."""
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


def daemons_exporting(export: Path) -> list[int]:
    """qemu-storage-daemon processes (of this host) exporting at `export` (by their argv)."""
    needle = export_marker(export).encode()
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


def stop_pid(pid: int) -> None:
    """SIGTERM (the daemon then flushes and drops its FUSE mount), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, 5.0)):
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
