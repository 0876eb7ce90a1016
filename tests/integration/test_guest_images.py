"""The pieces of a test guest: the cached cloud kernel, module order, initramfs, debs.

The kernel is the real Debian package, unpacked (never installed); a guest
built with `build_initramfs` boots under plain QEMU, reads a marker from a
virtio disk, prints it on the serial console and leaves with an exit code,
as the libvirt volume tests' guest does.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from missing import component_missing

from trustplane.embedded.debian_packages import cache_root
from trustplane.embedded.debug_exit import QEMU_ARGS, guest_code
from trustplane.embedded.dm_guest import program_from_package
from trustplane.embedded.guest_kernel import GuestKernel, guest_kernel, module_depends
from trustplane.embedded.initramfs import GUEST_SETUP, QEMU_EXIT, build_initramfs
from trustplane.errors import TrustplaneError, UnavailableError
from trustplane.tools import Executor


@pytest.fixture(scope="module")
def kernel() -> GuestKernel:
    try:
        return guest_kernel()
    except TrustplaneError as exc:
        component_missing("Debian cloud kernel (apt-get download)", str(exc))


def test_kernel_is_cached_outside_the_repository_and_not_installed(kernel: GuestKernel) -> None:
    assert kernel.vmlinuz.is_file()
    assert cache_root() in kernel.vmlinuz.parents
    repository = Path(__file__).resolve().parents[2]
    assert repository not in kernel.vmlinuz.parents
    installed = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", f"linux-image-{kernel.release}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "install ok installed" not in installed.stdout
    assert guest_kernel() == kernel, "a second call takes the cached kernel"


def test_module_order_follows_each_modules_depends(kernel: GuestKernel) -> None:
    order = [path.name for path in kernel.load_order(["dm_thin_pool", "virtio_pci"])]
    for dependency in ("dm-mod.ko", "dm-bufio.ko", "dm-persistent-data.ko", "libcrc32c.ko"):
        assert order.index(dependency) < order.index("dm-thin-pool.ko")
    for dependency in ("virtio_ring.ko", "virtio.ko", "virtio_pci_modern_dev.ko"):
        assert order.index(dependency) < order.index("virtio_pci.ko")
    assert len(order) == len(set(order)), "each module once"
    persistent = kernel.module_files()["dm_persistent_data"]
    assert set(module_depends(persistent)) >= {"dm_bufio", "libcrc32c"}


def test_builtin_modules_are_skipped_and_unknown_ones_refused(kernel: GuestKernel) -> None:
    assert "ext4" in kernel.builtin()
    assert kernel.load_order(["ext4"]) == []
    with pytest.raises(UnavailableError, match="has no module no_such_module"):
        kernel.load_order(["no_such_module"])


def test_a_guest_from_build_initramfs_prints_a_disk_marker_and_exits_with_a_code(
    kernel: GuestKernel, tmp_path: Path
) -> None:
    marker = b"disk-marker-" + os.urandom(6).hex().encode()
    disk = tmp_path / "disk.img"
    disk.write_bytes(marker + b"\n" + b"\0" * (1 << 20))
    init = f"""#!/bin/sh
{GUEST_SETUP}
for b in /sys/block/vd*; do
    echo "DISK $(cat "$b/serial") $(head -n 1 /dev/${{b##*/}})"
done
echo "EXTRA $(cat /etc/extra.txt)"
{QEMU_EXIT} 5
"""
    image = build_initramfs(
        tmp_path / "initramfs.cpio",
        init,
        kernel=kernel,
        modules=["virtio_pci", "virtio_blk"],
        files={"/etc/extra.txt": b"an extra file"},
    )
    console = tmp_path / "console.log"
    qemu = Executor().run(
        [
            "qemu-system-x86_64",
            *("-accel", "tcg", "-cpu", "max", "-m", "256", "-nodefaults", "-no-user-config"),
            *("-no-reboot", "-display", "none", "-kernel", str(kernel.vmlinuz)),
            *("-initrd", str(image), "-append", "console=ttyS0 panic=-1 quiet"),
            *("-serial", f"file:{console}", *QEMU_ARGS),
            *("-drive", f"if=none,id=d0,file={disk},format=raw"),
            *("-device", "virtio-blk-pci,drive=d0,serial=markerdisk"),
        ],
        timeout=300,
        check=False,
    )
    output = console.read_text(errors="replace")
    assert f"DISK markerdisk {marker.decode()}" in output
    assert "EXTRA an extra file" in output
    assert qemu.returncode == 11
    assert guest_code(qemu.returncode) == 5


def test_a_program_the_host_lacks_comes_from_its_deb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lvm2 is fetched and unpacked into the cache, never installed, and runs from there."""
    monkeypatch.setenv("TRUSTPLANE_GUEST_CACHE", str(tmp_path / "cache"))
    program, library_path = program_from_package("lvm", "lvm2")
    assert tmp_path / "cache" in program.parents
    env = {"LD_LIBRARY_PATH": os.pathsep.join(map(str, library_path))}
    executor = Executor()
    assert b"not found" not in executor.run(["ldd", str(program)], env=env).stdout
    version = executor.run([str(program), "version"], env=env).text
    assert "LVM version:" in version
    complete = next(p for p in program.parents if (p / ".complete").exists()) / ".complete"
    fetched_at = complete.stat().st_mtime_ns
    again, _ = program_from_package("lvm", "lvm2")
    assert again == program
    assert complete.stat().st_mtime_ns == fetched_at, "the second call reuses the cached tree"
