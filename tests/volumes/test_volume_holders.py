"""Who holds a file open (`FileBackend.in_use`), with real holders: a process writing
through another name (a hard link), one that mapped the file and closed its fd, a QEMU
VM, QEMU's image lock on its own, a loop device. Each is named, and once it is gone
the file is free again.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from trustplane.api.volume_location import FileLocation
from trustplane.tools import Executor
from trustplane.volumes.backends import FileBackend
from trustplane.volumes.backends.holders import _qemu_locked

MIB = 1 << 20
EXECUTOR = Executor()

_HOLD_OPEN = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.pwrite(fd, b"written while held", 0)
print("held", flush=True)
sys.stdin.read()
"""
_HOLD_MAPPED = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
mapping = mmap.mmap(fd, 4096)
for name in os.listdir("/proc/self/fd"):  # the fd and mmap's own dup of it
    if os.path.realpath(f"/proc/self/fd/{name}") == os.path.realpath(sys.argv[1]):
        os.close(int(name))  # only the mapping is left: an fd scan alone would not see it
mapping[:6] = b"mapped"
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def backend(tmp_path: Path) -> FileBackend:
    return FileBackend(tmp_path / "volumes")


@contextmanager
def _holding(argv: list[str], ready: str, command: str = "") -> Iterator[subprocess.Popen[str]]:
    """Run `argv` until the block ends; `ready` in its answer (to `command` on its stdin,
    if any) says it holds the file."""
    holder = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert holder.stdin is not None
        assert holder.stdout is not None
        if command:
            holder.stdin.write(command + "\n")
            holder.stdin.flush()
        line = holder.stdout.readline()
        assert ready in line, line + holder.stdout.read()
        yield holder
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.terminate()
        holder.wait()


def _python(script: str, path: Path) -> list[str]:
    return [sys.executable, "-c", script, str(path)]


def test_a_file_nobody_holds_is_free(backend: FileBackend) -> None:
    location = backend.create("idle", 4 * MIB)
    assert backend.in_use(location) is None
    assert backend.in_use(backend.location("missing")) is None


def test_a_process_writing_through_a_hard_link_is_named(
    backend: FileBackend, tmp_path: Path
) -> None:
    location = backend.create("legacy", 4 * MIB)
    assert isinstance(location, FileLocation)
    other_name = tmp_path / "other-name"
    other_name.hardlink_to(location.path)
    with _holding(_python(_HOLD_OPEN, other_name), "held") as holder:
        who = backend.in_use(location)
        assert re.fullmatch(rf"open by pid {holder.pid} \(python[0-9.]*\)", who or ""), who
    assert Path(location.path).read_bytes().startswith(b"written while held")
    assert backend.in_use(location) is None


def test_a_mapping_without_an_fd_is_seen(backend: FileBackend) -> None:
    location = backend.create("mapped", 4 * MIB)
    assert isinstance(location, FileLocation)
    with _holding(_python(_HOLD_MAPPED, Path(location.path)), "held") as holder:
        fds = list(Path(f"/proc/{holder.pid}/fd").iterdir())
        assert not any(fd.resolve() == Path(location.path) for fd in fds)
        assert f"pid {holder.pid} (" in (backend.in_use(location) or "")
    assert backend.in_use(location) is None


def test_a_qemu_vm_is_named_by_its_guest_name(backend: FileBackend) -> None:
    """A VM started the way libvirt starts one (`-name guest=NAME,…`); `-qmp stdio`
    greets once the command line (the disk) is opened."""
    location = backend.create("disk", 4 * MIB)
    assert isinstance(location, FileLocation)
    argv = [
        "qemu-system-x86_64", "-name", "guest=legacy-vm,debug-threads=on", "-S",
        "-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio",
        "-blockdev", f"driver=file,filename={location.path},node-name=disk0",
    ]  # fmt: skip
    with _holding(argv, "QMP") as holder:
        assert backend.in_use(location) == f"open by VM legacy-vm (qemu pid {holder.pid})"
    assert backend.in_use(location) is None


def test_qemu_image_locks_are_seen_without_proc(backend: FileBackend) -> None:
    """The lock test alone (what sees QEMU on another host sharing the directory, whose
    process no /proc here shows): QEMU's locks while it has the image open, read-only
    too; none once it is gone."""
    location = backend.create("locked", 4 * MIB)
    assert isinstance(location, FileLocation)
    path = Path(location.path)
    assert not _qemu_locked(path)
    for argv, command, ready in (
        (["qemu-io", "-f", "raw", str(path)], "write -P 0x77 0 4k", "wrote 4096/4096"),
        (["qemu-io", "-r", "-f", "raw", str(path)], "read 0 4k", "read 4096/4096"),
    ):
        with _holding(argv, ready, command) as holder:
            assert _qemu_locked(path)
            assert backend.in_use(location) == f"open by QEMU (pid {holder.pid}, qemu-io)"
        assert not _qemu_locked(path)
    assert backend.in_use(location) is None


def test_a_loop_device_on_the_file_is_named(backend: FileBackend) -> None:
    """The kernel holds a loop device's backing file with no process fd to see."""
    location = backend.create("looped", 4 * MIB)
    assert isinstance(location, FileLocation)
    device = EXECUTOR.run(["losetup", "--find", "--show", location.path]).text.strip()
    try:
        assert backend.in_use(location) == f"open by loop device {device}"
    finally:
        EXECUTOR.run(["losetup", "--detach", device])
    assert backend.in_use(location) is None
