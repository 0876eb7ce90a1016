"""Busybox initramfs images for test guests.

A guest boots the Debian cloud kernel with an initramfs holding static
busybox, the kernel modules it needs (loaded in dependency order by
`/sbin/guest-setup`), host binaries with the libraries `ldd` names, and an
`/init` the caller writes. Packed with `busybox cpio -o -H newc` (Debian's
`cpio` is not installed) and left uncompressed: under TCG decompressing
costs more boot time than reading the larger file.

`build_initramfs` is the one-call form, for guests that run a script and
power off (a libvirt guest that prints markers from its disks on the
serial console); `Initramfs` is the builder underneath, which the
device-mapper test guest extends with its tools and command agent.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from trustplane.embedded.debug_exit import DEBUG_EXIT_PROGRAM
from trustplane.embedded.guest_kernel import GuestKernel
from trustplane.errors import UnavailableError
from trustplane.tools import Executor

BUSYBOX = Path("/bin/busybox")
GUEST_SETUP = "/sbin/guest-setup"
"""Run first by every `/init`: mounts /proc, /sys, /dev, /run, /tmp and loads the modules."""
QEMU_EXIT = "/sbin/qemu-exit"
"""`qemu-exit CODE` ends QEMU with status CODE*2+1 (needs `-device isa-debug-exit,iobase=0xf4`)."""
MODULE_DIR = "/lib/modules"

_SETUP_SCRIPT = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp /dev/pts
# devtmpfs has no /dev/fd; tools are handed secrets as /dev/fd/N.
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
if [ -f {module_dir}/load.order ]; then
    while read -r module; do
        insmod "{module_dir}/$module" || echo "guest-setup: insmod $module failed" >&2
    done < {module_dir}/load.order
fi
"""

# `ldd` lines: "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)",
# "/lib64/ld-linux-x86-64.so.2 (0x...)", "libfoo.so.1 => not found".
_LDD_RESOLVED = re.compile(r"=>\s+(/\S+)\s+\(0x")
_LDD_LOADER = re.compile(r"^\s*(/\S+)\s+\(0x")
_LDD_MISSING = re.compile(r"^\s*(\S+)\s+=>\s+not found")


class Initramfs:
    """Files staged in a directory, then packed into a newc cpio archive."""

    def __init__(self, staging: Path, executor: Executor | None = None) -> None:
        self.root = staging
        self.executor = executor or Executor()
        self.root.mkdir(parents=True, exist_ok=True)
        for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev"):
            (self.root / directory).mkdir(parents=True, exist_ok=True)
        for directory in ("run", "tmp"):
            (self.root / directory).mkdir(parents=True, exist_ok=True)
        self.add_file(GUEST_SETUP, _SETUP_SCRIPT.format(module_dir=MODULE_DIR).encode(), 0o755)
        self.add_file(QEMU_EXIT, DEBUG_EXIT_PROGRAM, 0o755)
        self._modules: list[str] = []

    def _dest(self, dest: str) -> Path:
        if not dest.startswith("/") or ".." in Path(dest).parts:
            raise ValueError(f"initramfs paths are absolute and stay inside: {dest!r}")
        return self.root / dest.lstrip("/")

    def add_file(self, dest: str, content: bytes | Path, mode: int = 0o644) -> None:
        """Put `content` (bytes, or a host file to copy) at `dest` inside the image."""
        path = self._dest(dest)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            path.unlink()
        if isinstance(content, Path):
            shutil.copyfile(content, path)
        else:
            path.write_bytes(content)
        path.chmod(mode)

    def add_symlink(self, dest: str, target: str) -> None:
        """A symbolic link at `dest` pointing to `target` (as the guest resolves it)."""
        path = self._dest(dest)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to(target)

    def add_binary(
        self, source: Path, dest: str | None = None, library_path: Sequence[Path] = ()
    ) -> None:
        """Copy a dynamically linked program and every library `ldd` says it needs.

        `library_path` adds directories to search (for programs unpacked
        from a .deb whose libraries the host lacks).
        """
        self.add_file(dest or str(source), source, 0o755)
        env = {"LD_LIBRARY_PATH": os.pathsep.join(map(str, library_path))} if library_path else {}
        listing = self.executor.run(["ldd", str(source)], env=env, check=False, timeout=60)
        if listing.returncode != 0 and b"not a dynamic executable" in listing.stdout:
            return
        for line in listing.text.splitlines():
            missing = _LDD_MISSING.match(line)
            if missing:
                raise UnavailableError(f"{source.name} needs {missing.group(1)}, which is missing")
            found = _LDD_RESOLVED.search(line) or _LDD_LOADER.match(line)
            if found:
                library = Path(found.group(1))
                if not self._dest(str(library)).exists():
                    self.add_file(str(library), library.resolve(), 0o755)

    def add_modules(self, kernel: GuestKernel, names: Sequence[str]) -> None:
        """Copy `names` and their dependencies; `guest-setup` loads them in order."""
        for path in kernel.load_order(names):
            if path.name not in self._modules:
                self.add_file(f"{MODULE_DIR}/{path.name}", path)
                self._modules.append(path.name)
        self.add_file(f"{MODULE_DIR}/load.order", "".join(f"{m}\n" for m in self._modules).encode())

    def _add_busybox(self) -> None:
        """Busybox and a link for each applet, except where a real program was added."""
        self.add_file("/bin/busybox", BUSYBOX, 0o755)
        provided = {
            entry.name
            for directory in ("bin", "sbin", "usr/bin", "usr/sbin")
            for entry in (self.root / directory).iterdir()
            if entry.name != "busybox"
        }
        applets = self.executor.run([str(BUSYBOX), "--list-full"], timeout=30).text.split()
        for applet in applets:
            link = self._dest("/" + applet)
            # A real program (mke2fs, losetup) wins over busybox's smaller applet
            # of the same name, wherever on PATH either would be.
            if applet == "bin/busybox" or link.name in provided:
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")

    def pack(self, out: Path) -> Path:
        """Write the archive to `out` (newc, uncompressed, every file owned by root)."""
        if not (self.root / "init").exists():
            raise ValueError("an initramfs needs /init")
        if not BUSYBOX.exists():
            raise UnavailableError(
                f"{BUSYBOX} not found; install the Debian package busybox-static"
            )
        self._add_busybox()
        names = sorted(
            str(path.relative_to(self.root)) for path in self.root.rglob("*") if path != self.root
        )
        listing = "".join(f"{name}\n" for name in names).encode()
        out.parent.mkdir(parents=True, exist_ok=True)
        self.executor.run(
            [str(BUSYBOX), "cpio", "-o", "-H", "newc", "-R", "0:0", "-F", str(out)],
            stdin=listing,
            cwd=self.root,
            timeout=120,
        )
        return out


def build_initramfs(
    out: Path,
    init: str,
    *,
    kernel: GuestKernel | None = None,
    modules: Sequence[str] = (),
    files: Mapping[str, bytes | Path] | None = None,
    binaries: Sequence[Path] = (),
    executor: Executor | None = None,
) -> Path:
    """Pack a busybox initramfs whose `/init` is the shell script `init`.

    `init` should run `/sbin/guest-setup` first (mounts, modules) and end
    with `poweroff -f` (or `/sbin/qemu-exit CODE` under plain QEMU with
    isa-debug-exit). `modules` (with `kernel`) are loaded at setup; `files`
    maps paths inside the image to contents; `binaries` are host programs
    copied with their libraries.
    """
    if modules and kernel is None:
        raise ValueError("modules need the kernel they belong to")
    with tempfile.TemporaryDirectory(prefix="trustplane-initramfs-") as staging:
        image = Initramfs(Path(staging), executor)
        if kernel is not None:
            image.add_modules(kernel, modules)
        for program in binaries:
            image.add_binary(program)
        for dest, content in (files or {}).items():
            image.add_file(dest, content, 0o755 if dest.startswith(("/bin/", "/sbin/")) else 0o644)
        image.add_file("/init", init.encode(), 0o755)
        return image.pack(out)
