"""The file system on an attached chain: made once on the base layer, mounted per use.

ext4, made so that it writes nothing it need not write: a layer holds only
the blocks its own changes touch, so background initialisation (inode
tables, journal) must not run and dribble into whatever layer is on top
at the time. Where the device reads zeros until written (a fresh qcow2),
`assume_storage_prezeroed` makes mkfs skip the zeroing and mark the groups
initialised, so mkfs is instant whatever the virtual size; elsewhere the
zeroing is done at once (`lazy_itable_init=0,lazy_journal_init=0`).
Read-only mounts use `noload`: a committed layer's journal is clean, and
replaying it would be a write.
"""

from __future__ import annotations

import os
from pathlib import Path

from trustplane.tools import Executor, is_mounted, unmount

FS_TYPE = "ext4"
_MKFS_TIMEOUT = 600.0


def make_filesystem(
    executor: Executor, device: str, *, reads_zeros: bool, ephemeral: bool = False
) -> None:
    """ext4 on `device`. `ephemeral`: a container's scratch, never checked or
    replayed, so no journal, and only as many inodes as its size needs."""
    extended = (
        "nodiscard,assume_storage_prezeroed=1"
        if reads_zeros
        else "nodiscard,lazy_itable_init=0,lazy_journal_init=0"
    )
    # -m 0: no blocks reserved for root; an image's file system is not a system disk.
    argv = ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", extended]
    if ephemeral:
        argv += ["-O", "^has_journal", "-i", "65536"]
    executor.run([*argv, device], timeout=_MKFS_TIMEOUT)


def mount(
    executor: Executor, device: str, target: Path, *, writable: bool, secure: bool = False
) -> None:
    """`secure`: no set-uid programs and no device nodes through this mount (a view
    a user browses; a container's root is its own overlay mount)."""
    options = "rw" if writable else "ro,noload"
    if secure:
        options += ",nosuid,nodev"
    executor.run(["mount", "-t", FS_TYPE, "-o", options, device, os.fspath(target)])


def unmount_if_mounted(executor: Executor, target: Path) -> None:
    """Unmount a clean mount; a lazy unmount would hide a file still open in it."""
    if is_mounted(executor, target):
        executor.run(["umount", os.fspath(target)])


def force_unmount(executor: Executor, target: Path) -> None:
    """After a crash: whatever is still using it, detach it (lazily)."""
    if is_mounted(executor, target):
        unmount(executor, target)
