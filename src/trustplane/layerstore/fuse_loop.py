"""Block exports of the layer store, one directory (a lease) each: FUSE, loop device, daemon.

The qcow2 backend opens its chains as a FUSE export of `qemu-storage-daemon`
on a loop device, and the device-mapper test guest's block exports reach
the host the same way (embedded/guest_export.py); the mechanism is
`trustplane.tools.fuse_export`. What is the layer store's own: everything
one export holds lives under one directory (its lease): the FUSE mount
point `DIR/export`, the loop device backed by it, and the daemon whose argv
names it. So `clean_directory(DIR)` finds and undoes all of it after its
owner died, knowing nothing but the directory.
"""

from __future__ import annotations

from pathlib import Path

from trustplane.layerstore.filesystem import force_unmount
from trustplane.tools import Executor, is_mounted, mounts
from trustplane.tools.command import Arg
from trustplane.tools.failure import FailureMap
from trustplane.tools.fuse_export import (
    DAEMON,
    daemons_exporting,
    loop_devices_under,
    option_path,
    stop_pid,
)
from trustplane.tools.fuse_export import FuseLoop as _FuseLoop
from trustplane.tools.fuse_export import export_argument as _export_argument

__all__ = ["DAEMON", "EXPORT", "FuseLoop", "clean_directory", "export_argument", "option_path"]

EXPORT = "export"
"""The FUSE mount point's name inside the directory."""


class FuseLoop(_FuseLoop):
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
        super().__init__(executor, argv, directory / EXPORT, writable, failures)


def export_argument(directory: Path, node: str, writable: bool) -> str:
    """The `--export` value that serves `node` at `directory/export`."""
    return _export_argument(directory / EXPORT, node, writable)


# -- recovery ------------------------------------------------------------------------


def clean_directory(executor: Executor, path: Path) -> list[str]:
    """Undo what exports under `path` hold: mounts, loop devices, daemons."""
    done = []
    loops = loop_devices_under(executor, path)
    for point in _mounts_of(executor, loops, path):
        force_unmount(executor, Path(point))
        done.append(f"unmounted {point}")
    for device in loops:
        executor.run(["losetup", "--detach", device], check=False)
        done.append(f"detached {device}")
    export = path / EXPORT
    for pid in daemons_exporting(export):
        stop_pid(pid)
        done.append(f"stopped {DAEMON} {pid}")
    if is_mounted(executor, export):
        force_unmount(executor, export)
        done.append(f"unmounted {export}")
    return done


def _mounts_of(executor: Executor, devices: list[str], path: Path) -> list[str]:
    """Mount points on our loop devices, or under the directory (the FUSE export aside)."""
    export = str(path / EXPORT)
    prefix = str(path) + "/"
    found = {
        point
        for source, point in mounts(executor)
        if source in devices or (point.startswith(prefix) and point != export)
    }
    # Deepest first, so that nothing is left mounted over a mount point we drop.
    return sorted(found, key=len, reverse=True)
