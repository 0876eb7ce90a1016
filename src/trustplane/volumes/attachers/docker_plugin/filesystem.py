"""The file system of a container volume: made once at create, checked at mount.

The plugin makes the file system when it creates a volume, and only then:
a volume without one at mount is refused, never formatted (os-brick's
format-on-attach would wipe a volume whose contents it cannot recognise).
ext4 without lazy initialisation or discard (DESIGN.md, layer store: lazy
init keeps writing in the background after mkfs; discard through the loop
device and FUSE only costs time).
"""

from __future__ import annotations

from trustplane.errors import IntegrityError
from trustplane.tools import Executor

FILESYSTEM = "ext4"
_MKFS_TIMEOUT = 600.0


def make_filesystem(executor: Executor, device: str, label: str) -> None:
    """mkfs.ext4 on a freshly created volume's plaintext device."""
    executor.run(
        ["mkfs.ext4", "-q", "-F", "-L", label[:16],
         "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", device],
        timeout=_MKFS_TIMEOUT,
    )  # fmt: skip


def filesystem_type(executor: Executor, device: str) -> str | None:
    """The file system blkid finds on `device` (None: none it recognises)."""
    probe = executor.run(
        ["blkid", "-p", "-o", "value", "-s", "TYPE", device], check=False, timeout=60
    )
    return probe.text.strip() or None if probe.returncode == 0 else None


def require_filesystem(executor: Executor, device: str, what: str) -> str:
    """The volume's file system type, or IntegrityError: nothing formats it here."""
    found = filesystem_type(executor, device)
    if found is None:
        raise IntegrityError(
            f"{what} holds no file system; the plugin formats only the volumes it creates "
            "(docker volume create -d trustplane), never one at mount"
        )
    return found
