"""Who holds a file open: the in-use check of file storage (`FileBackend.in_use`).

Encrypt in place destroys plaintext storage after copying it, so a writer it
does not see loses its writes without a word. Three looks, each seeing what the
others miss:

- This host's processes, fuser's logic written out: every `/proc/PID/fd/*`
  and every file mapping of `/proc/PID/maps` whose (device, inode) is the
  file's. Compared by inode, never by path: a hard link, a bind mount or
  another mount namespace (a container) reach the same inode under other
  names, and an fd keeps a file renamed or unlinked since. A mapping outlives
  the fd it was made from (mmap, then close): its inode number is read from
  `maps` and confirmed by stat of `/proc/PID/map_files/RANGE` (the device
  `maps` prints is not always `stat`'s, on overlayfs). The caller's own
  process counts like any other. A process that exits meanwhile is skipped;
  one whose fds cannot be read (a server that is not root, a process of
  another user) is skipped too: the lock test below still sees QEMU there.
- The kernel's own users, which no process holds an fd for: a loop device
  backed by the file (`/sys/block/loop*/loop/backing_file`, stat'd).
- QEMU on any host: QEMU locks the image files it opens (its image locking:
  byte-range locks on bytes 100-299 of the file, one byte per permission it
  holds or refuses to share), through NFS too, where the process runs on
  another compute host sharing the directory and no `/proc` here shows it. A
  lock test (`F_OFD_GETLK` for a write lock over those bytes) sees them and
  takes no lock itself.

Not seen: a process on another host that has the file open without taking
locks (QEMU with `locking=off`, anything else). The check is a look, not a
lock: whatever opens the file after the last look is not seen (nothing keeps
root from opening a file).
"""

from __future__ import annotations

import ctypes
import fcntl
import itertools
import os
from pathlib import Path

_PROC = Path("/proc")
_SYS_BLOCK = Path("/sys/block")
_QEMU_LOCK_START, _QEMU_LOCK_LENGTH = 100, 200
"""QEMU's image-locking bytes (RAW_LOCK_PERM_BASE 100, RAW_LOCK_SHARED_BASE 200)."""
_SHOWN = 3
"""Holders named in the answer (the rest counted)."""


class _Flock(ctypes.Structure):
    """`struct flock` (its padding as the C compiler lays it out)."""

    _fields_ = [
        ("l_type", ctypes.c_short),
        ("l_whence", ctypes.c_short),
        ("l_start", ctypes.c_int64),
        ("l_len", ctypes.c_int64),
        ("l_pid", ctypes.c_int),
    ]


def file_holders(path: Path) -> str | None:
    """Who has `path` open (processes here, loop devices, QEMU's locks), or None."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    identity = (st.st_dev, st.st_ino)
    found = [*_processes(identity, st.st_ino), *_loop_devices(identity)]
    if not found and _qemu_locked(path):
        found.append("a QEMU image lock (a VM here or on a host sharing the directory)")
    if not found:
        return None
    more = f" and {len(found) - _SHOWN} more" if len(found) > _SHOWN else ""
    return "open by " + ", ".join(found[:_SHOWN]) + more


def _processes(identity: tuple[int, int], inode: int) -> list[str]:
    found = []
    for entry in _PROC.iterdir():
        if entry.name.isdigit() and _holds(entry, identity, inode):
            found.append(_describe(entry))
    return found


def _same(link: Path, identity: tuple[int, int]) -> bool:
    try:
        st = link.stat()  # follows the magic link to the open file itself
    except OSError:  # closed or exited meanwhile, or not ours to look at
        return False
    return (st.st_dev, st.st_ino) == identity


def _holds(process: Path, identity: tuple[int, int], inode: int) -> bool:
    try:
        fds = list((process / "fd").iterdir())
    except OSError:
        fds = []
    if any(_same(fd, identity) for fd in fds):
        return True
    try:
        maps = (process / "maps").read_text()
    except OSError:
        return False
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        mapped = len(fields) >= 5 and fields[4] == str(inode)
        if mapped and _same(process / "map_files" / fields[0], identity):
            return True
    return False


def _describe(process: Path) -> str:
    """`pid N (comm)`; a QEMU process as the VM it runs (`-name guest=NAME`)."""
    try:
        comm = (process / "comm").read_text().strip()
        argv = (process / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"pid {process.name}"
    if comm.startswith("qemu"):
        for flag, value in itertools.pairwise(argv):
            if flag == b"-name":
                text = value.decode(errors="replace")
                guest = dict(p.partition("=")[::2] for p in text.split(",") if "=" in p)
                name = guest.get("guest") or text.split(",")[0]
                return f"VM {name} (qemu pid {process.name})"
        return f"QEMU (pid {process.name}, {comm})"
    return f"pid {process.name} ({comm})"


def _loop_devices(identity: tuple[int, int]) -> list[str]:
    found = []
    for backing in _SYS_BLOCK.glob("loop*/loop/backing_file"):
        try:
            name = backing.read_text().strip().removesuffix(" (deleted)")
        except OSError:
            continue
        if name and _same(Path(name), identity):
            found.append(f"loop device /dev/{backing.parent.parent.name}")
    return found


def _qemu_locked(path: Path) -> bool:
    """Whether some open file description holds a lock on QEMU's locking bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        probe = _Flock(fcntl.F_WRLCK, os.SEEK_SET, _QEMU_LOCK_START, _QEMU_LOCK_LENGTH, 0)
        answer = _Flock.from_buffer_copy(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, bytes(probe)))
    finally:
        os.close(fd)
    return bool(answer.l_type != fcntl.F_UNLCK)
