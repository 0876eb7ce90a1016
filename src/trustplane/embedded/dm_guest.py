"""A QEMU test guest whose kernel has device-mapper, and an executor into it.

This machine's kernel has no device-mapper, so the dm-crypt, LVM, dm-thin
and dm-snapshot code paths run their real command sequences against the
Debian cloud kernel in a QEMU guest (TCG: `/dev/kvm` cannot boot guests
here). The guest boots a busybox initramfs with the dm modules, `dmsetup`,
`cryptsetup`, LVM, `mke2fs` and `losetup`, and a command agent on a
virtio-serial port; `DmGuest.executor` runs tools in it through
`GuestRunner`, exactly as drivers run them on a production host. Raw disk
images attached as virtio-blk (found in the guest by their serial) hold LVM
volume groups and thin pools. It stays up for a whole test session and
leaves through isa-debug-exit.

For the device-mapper layer store, whose file-system work runs on this
host, the guest has a user-mode network (`restrict=on`: it reaches
nothing) with `export_slots` ports forwarded from this host's 127.0.0.1,
and `qemu-nbd`: `block_export()` brings a guest device here as a loop
device (guest_export.py). Other processes on this host (a test's child
that is killed mid-import) use the guest through `link` and
`connect_guest`, over the channel relay.

Measured facts and pitfalls: DESIGN.md, "device-mapper in a guest".
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trustplane.embedded.debian_packages import fetch_unpacked, is_installed, package_info
from trustplane.embedded.debug_exit import QEMU_ARGS, guest_code
from trustplane.embedded.guest_channel import AGENT_SCRIPT, PORT_NAME, ChannelRelay, GuestChannel
from trustplane.embedded.guest_export import GUEST_ADDRESS, ExportSlot, GuestBlockExport
from trustplane.embedded.guest_kernel import GuestKernel, guest_kernel
from trustplane.embedded.guest_runner import GuestRunner
from trustplane.embedded.initramfs import GUEST_SETUP, Initramfs
from trustplane.embedded.process import (
    ManagedProcess,
    StopsOnExit,
    free_port,
    require_binary,
    tail_lines,
)
from trustplane.errors import UnavailableError
from trustplane.tools import Executor
from trustplane.tools.local import path_with_sbin

DM_MODULES = (
    "dm_mod",
    "dm_crypt",
    "dm_thin_pool",
    "dm_snapshot",
    "dm_zero",
    "xts",
    "aesni_intel",
    "crc32c_intel",
    "af_alg",
    "algif_skcipher",
    "loop",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
)
"""What the dm paths need; dependencies (dm_bufio, dm_persistent_data,
libcrc32c, virtio, virtio_ring, ...) come from each module's depends=."""

_PROGRAMS = (
    # (program, Debian package, fetched from the mirror when the host lacks it)
    ("dmsetup", "dmsetup", True),
    ("lvm", "lvm2", True),
    ("cryptsetup", "cryptsetup-bin", False),
    ("mke2fs", "e2fsprogs", False),
    ("losetup", "mount", False),
    ("qemu-nbd", "qemu-utils", False),
)
_LVM_COMMANDS = [
    "lvchange",
    "lvcreate",
    "lvdisplay",
    "lvextend",
    "lvreduce",
    "lvremove",
    "lvrename",
    "lvresize",
    "lvs",
    "lvscan",
    "pvcreate",
    "pvdisplay",
    "pvremove",
    "pvresize",
    "pvs",
    "pvscan",
    "vgchange",
    "vgcreate",
    "vgdisplay",
    "vgextend",
    "vgreduce",
    "vgremove",
    "vgrename",
    "vgs",
    "vgscan",
]

# No udev, no lvmetad, no dmeventd in the guest: LVM must create device
# nodes itself and must not wait for udev or start monitoring daemons; no
# thin-provisioning-tools either, so LVM thin pools skip thin_check.
_LVM_CONF = b"""devices {
    obtain_device_list_from_udev = 0
    use_devicesfile = 0
}
activation {
    udev_sync = 0
    udev_rules = 0
    monitoring = 0
}
global {
    use_lvmpolld = 0
    thin_check_executable = ""
}
backup {
    backup = 0
    archive = 0
}
"""

NBD_BASE_PORT = 10809
"""Export slot i serves NBD on this port + i in the guest (`GuestBlockExport`)."""
DEFAULT_EXPORT_SLOTS = 6

_INIT = f"""#!/bin/sh
{GUEST_SETUP}
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C DM_DISABLE_UDEV=1
mkdir -p /run/lock/lvm /run/lvm /run/cryptsetup
# The user-mode network: the guest's NBD exports reach the host through
# forwarded ports only (restrict=on: the guest itself can reach nothing).
ip link set lo up
ip link set eth0 up && ip addr add {GUEST_ADDRESS}/24 dev eth0
exec /sbin/tp-agent
"""

DEFAULT_DISKS = (1 << 30,) * 4
"""Four sparse 1 GiB disks: they cost only what is written."""
_BOOT_TIMEOUT = 180.0


@dataclass(frozen=True)
class GuestDisk:
    """A raw image on the host, attached as virtio-blk with `serial`."""

    serial: str
    path: Path
    size: int
    device: str = ""
    """The guest's name for it (`/dev/vdX`), looked up by serial after boot:
    the guest names disks in probe order, so the name is never assumed."""


def _program(name: str, package: str, fetchable: bool) -> tuple[Path, list[Path]]:
    """The host's copy of a program, or one unpacked from its .deb, and its library dirs."""
    found = shutil.which(name, path=path_with_sbin())
    if found is not None:
        return Path(found), []
    if not fetchable:
        raise UnavailableError(f"{name} not found; install the Debian package {package}")
    return program_from_package(name, package)


def program_from_package(name: str, package: str) -> tuple[Path, list[Path]]:
    """`name` unpacked from Debian package `package` (cached), and the library dirs it needs.

    The package's own libraries that the host lacks come along (lvm2 needs
    libdevmapper-event and libaio; the C library and friends are always there).
    """
    libraries = [d for d in package_info(package).depends if d.startswith("lib")]
    tree = fetch_unpacked([package, *(d for d in libraries if not is_installed(d))])
    for directory in ("usr/sbin", "sbin", "usr/bin", "bin"):
        if (tree / directory / name).exists():
            libs = [tree / "lib/x86_64-linux-gnu", tree / "usr/lib/x86_64-linux-gnu"]
            return tree / directory / name, [d for d in libs if d.is_dir()]
    raise UnavailableError(f"package {package} holds no {name}")


def build_dm_initramfs(out: Path, kernel: GuestKernel, executor: Executor | None = None) -> Path:
    """The guest's initramfs: dm modules, dm/LVM/LUKS tools, the command agent."""
    with tempfile.TemporaryDirectory(prefix="trustplane-initramfs-") as staging:
        image = Initramfs(Path(staging), executor)
        image.add_modules(kernel, DM_MODULES)
        for name, package, fetchable in _PROGRAMS:
            program, library_path = _program(name, package, fetchable)
            image.add_binary(program, f"/usr/sbin/{name}", library_path)
        for command in _LVM_COMMANDS:
            image.add_symlink(f"/usr/sbin/{command}", "lvm")
        image.add_symlink("/usr/sbin/mkfs.ext4", "mke2fs")
        image.add_symlink("/sbin/mke2fs", "/usr/sbin/mke2fs")
        image.add_file("/etc/lvm/lvm.conf", _LVM_CONF)
        if Path("/etc/mke2fs.conf").is_file():
            image.add_file("/etc/mke2fs.conf", Path("/etc/mke2fs.conf"))
        image.add_file("/sbin/tp-agent", AGENT_SCRIPT.encode(), 0o755)
        image.add_file("/init", _INIT.encode(), 0o755)
        return image.pack(out)


@dataclass(frozen=True)
class GuestLink:
    """How another process on this host reaches a running guest (JSON-friendly)."""

    relay: Path
    slots: tuple[ExportSlot, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "relay": os.fspath(self.relay),
            "slots": [[slot.host_port, slot.guest_port] for slot in self.slots],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GuestLink:
        return cls(Path(data["relay"]), tuple(ExportSlot(int(h), int(g)) for h, g in data["slots"]))


def connect_guest(link: GuestLink, *, timeout: float = 120) -> tuple[Executor, GuestBlockExport]:
    """An executor into the guest (through its relay) and its block export, for this process."""
    executor = Executor(GuestRunner(GuestChannel.connect(link.relay)), timeout=timeout)
    return executor, GuestBlockExport(executor, link.slots)


class DmGuest(StopsOnExit):
    """A running guest: `executor` runs tools in it, `disks` are attached."""

    def __init__(
        self,
        process: ManagedProcess,
        channel: GuestChannel,
        disks: Sequence[GuestDisk],
        console_log: Path,
        kernel: GuestKernel,
        boot_seconds: float,
        socket_dir: Path,
        export_slots: Sequence[ExportSlot] = (),
    ) -> None:
        self.process = process
        self.channel = channel
        self.disks = list(disks)
        self.console_log = console_log
        self.kernel = kernel
        self.boot_seconds = boot_seconds
        """From starting QEMU to the agent's ready line."""
        self.executor = Executor(GuestRunner(channel), timeout=120)
        self._socket_dir = socket_dir
        self._exit_code: int | None = None
        self._stopped = False
        self._free: list[GuestDisk] = []
        self.export_slots = list(export_slots)
        """Forwarded ports for NBD exports of guest block devices (`block_export`)."""
        self.relay = ChannelRelay(channel, socket_dir / "relay.sock")
        """Other processes on this host reach the guest through it (`GuestLink`)."""

    @property
    def link(self) -> GuestLink:
        """What another process on this host needs to use this guest (`connect_guest`)."""
        return GuestLink(self.relay.path, tuple(self.export_slots))

    def block_export(self, host: Executor | None = None) -> GuestBlockExport:
        """The guest's block devices as loop devices on this host (for the dm layer store)."""
        return GuestBlockExport(self.executor, self.export_slots, host)

    def _find_disks(self) -> None:
        self.disks = _find_devices(self.executor, self.disks)
        self._free = list(self.disks)

    @contextlib.contextmanager
    def scratch_disk(self) -> Iterator[GuestDisk]:
        """A disk nobody else uses until the block ends; its first 8 MiB are zeroed after.

        The caller removes what it mapped on it (dm devices, volume groups)
        before leaving the block.
        """
        if not self._free:
            raise UnavailableError(f"all {len(self.disks)} disks of the test guest are in use")
        disk = self._free.pop(0)
        try:
            yield disk
        finally:
            self.executor.run(
                ["dd", "if=/dev/zero", f"of={disk.device}", "bs=1M", "count=8", "conv=fsync"],
                timeout=60,
            )
            self._free.append(disk)

    def console_tail(self, lines: int = 30) -> str:
        return tail_lines(self.console_log, lines)

    @property
    def exit_code(self) -> int | None:
        """The code the guest left QEMU with (after `stop()`), None if it did not."""
        return self._exit_code

    def stop(self) -> None:
        """Ask the guest to exit through isa-debug-exit; kill QEMU if it does not. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(OSError):
            self.channel.exit(0)
        deadline = time.monotonic() + 15
        while self.process.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        status = self.process.returncode()
        self._exit_code = guest_code(status) if status is not None else None
        self.process.stop()
        self.relay.close()
        self.channel.close()
        shutil.rmtree(self._socket_dir, ignore_errors=True)


def _find_devices(executor: Executor, disks: Sequence[GuestDisk]) -> list[GuestDisk]:
    script = 'for b in /sys/block/vd*; do echo "$(cat "$b/serial") /dev/${b##*/}"; done'
    names = dict(
        line.split() for line in executor.run(["sh", "-c", script], timeout=30).text.splitlines()
    )
    missing = [d.serial for d in disks if d.serial not in names]
    if missing:
        raise UnavailableError(f"the test guest does not see disks {missing}")
    return [replace(d, device=names[d.serial]) for d in disks]


def start_dm_guest(
    work_dir: Path,
    *,
    disks: Sequence[int] = DEFAULT_DISKS,
    memory_mb: int = 512,
    boot_timeout: float = _BOOT_TIMEOUT,
    export_slots: int = DEFAULT_EXPORT_SLOTS,
) -> DmGuest:
    """Boot a guest with `disks` (sizes in bytes, sparse raw files in `work_dir`).

    `export_slots` guest ports are forwarded from free ports on the host's
    127.0.0.1: that many block devices can be exported at once.
    """
    qemu = require_binary("qemu-system-x86_64", "qemu-system-x86")
    work_dir.mkdir(parents=True, exist_ok=True)
    kernel = guest_kernel()
    initramfs = build_dm_initramfs(work_dir / "initramfs.cpio", kernel)
    attached = []
    for index, size in enumerate(disks):
        path = work_dir / f"disk{index}.img"
        with path.open("wb") as handle:
            handle.truncate(size)
        attached.append(GuestDisk(f"tpdisk{index}", path, size))
    console_log = work_dir / "console.log"
    # A unix socket path must stay under 108 bytes; pytest's tmp paths can be long.
    socket_dir = Path(tempfile.mkdtemp(prefix="tp-guest-"))
    channel_path = socket_dir / "channel.sock"
    argv = [
        qemu,
        *("-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", str(memory_mb)),
        *("-nodefaults", "-no-user-config", "-no-reboot", "-display", "none"),
        *("-kernel", str(kernel.vmlinuz), "-initrd", str(initramfs)),
        *("-append", "console=ttyS0 panic=-1 quiet"),
        *("-serial", f"file:{console_log}"),
        *QEMU_ARGS,
        *("-device", "virtio-serial-pci"),
        *("-chardev", f"socket,id=tpchannel,path={channel_path}"),
        *("-device", f"virtserialport,chardev=tpchannel,name={PORT_NAME}"),
    ]
    slots = [ExportSlot(free_port(), NBD_BASE_PORT + index) for index in range(export_slots)]
    forwards = "".join(
        f",hostfwd=tcp:127.0.0.1:{slot.host_port}-{GUEST_ADDRESS}:{slot.guest_port}"
        for slot in slots
    )
    argv += [
        *("-netdev", f"user,id=net0,restrict=on{forwards}"),
        *("-device", "virtio-net-pci,netdev=net0"),
    ]
    for index, disk in enumerate(attached):
        argv += [
            *("-drive", f"if=none,id=drive{index},file={disk.path},format=raw,cache=unsafe"),
            *("-device", f"virtio-blk-pci,drive=drive{index},serial={disk.serial}"),
        ]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(os.fspath(channel_path))
        listener.listen(1)
        started = time.monotonic()
        process = ManagedProcess("dm-guest", argv, work_dir, grace=5).start()
        try:
            channel = GuestChannel.accept(listener, started + boot_timeout, process.running)
        except BaseException as exc:
            process.stop()
            shutil.rmtree(socket_dir, ignore_errors=True)
            if isinstance(exc, UnavailableError):
                console = tail_lines(console_log, 15)
                raise UnavailableError(
                    f"device-mapper test guest did not boot: {exc}; console:\n{console}"
                    f"\nQEMU: {process.log_tail(5)}"
                ) from exc
            raise
    finally:
        listener.close()
    boot_seconds = time.monotonic() - started
    guest = DmGuest(
        process, channel, attached, console_log, kernel, boot_seconds, socket_dir, slots
    )
    try:
        guest._find_disks()
    except BaseException:
        guest.stop()
        raise
    return guest
