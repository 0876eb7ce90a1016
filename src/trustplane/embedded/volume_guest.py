"""A TCG guest under a libvirtd that reports every disk it sees (the demo and the tests).

It boots Debian's cloud kernel with a busybox initramfs whose /init scans
`/sys/block/vd*` five times a second and prints, for each disk it has not
seen, `DISK serial=S dev=D data=…` (the first 64 bytes, printable) on the
serial console, `SIZE serial=S sectors=N` when a disk appears or its size
changes (`/sys/block/vdX/size`, 512-byte sectors), and `GONE serial=S` when
one leaves. The guest names disks
in probe order, so tests look for the serial libvirt gave the disk, never
for a target name.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from trustplane.embedded.guest_kernel import GuestKernel
from trustplane.embedded.initramfs import GUEST_SETUP, build_initramfs
from trustplane.errors import UnavailableError

BOOT_TIMEOUT = 240.0
DISK_TIMEOUT = 120.0

SCANNER_INIT = f"""#!/bin/sh
{GUEST_SETUP}
echo GUEST-UP
seen=" "
sizes=" "
while :; do
    now=" "
    nowsizes=" "
    for b in /sys/block/vd*; do
        [ -e "$b/serial" ] || continue
        d=${{b##*/}}
        s=$(cat "$b/serial")
        [ -n "$s" ] || continue
        now="$now$s "
        z="$s:$(cat "$b/size")"
        nowsizes="$nowsizes$z "
        case "$sizes" in *" $z "*) ;; *) echo "SIZE serial=$s sectors=${{z##*:}}" ;; esac
        case "$seen" in *" $s "*) continue ;; esac
        data=$(head -c 64 "/dev/$d" | tr -d '\\000' | tr -c 'A-Za-z0-9._:-' '?')
        echo "DISK serial=$s dev=$d data=$data"
    done
    for s in $seen; do
        case "$now" in *" $s "*) ;; *) echo "GONE serial=$s" ;; esac
    done
    seen="$now"
    sizes="$nowsizes"
    sleep 0.2
done
"""


def build_scanner_initrd(out: Path, kernel: GuestKernel) -> Path:
    return build_initramfs(out, SCANNER_INIT, kernel=kernel, modules=("virtio_pci", "virtio_blk"))


def tcg_domain_xml(
    name: str, kernel: GuestKernel, initrd: Path, console: Path, devices: str = ""
) -> str:
    """A TCG domain booting `kernel` with `initrd`, its serial console written to `console`.

    256 MiB, one vCPU; any power-off, reboot or crash ends it. `devices` is
    more device XML (disks) placed before the serial port."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel.vmlinuz}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
{devices}    <serial type='file'><source path='{console}'/><target port='0'/></serial>
  </devices>
</domain>"""


@dataclass
class ScannerGuest:
    """A persistent domain running the scanner (start it, read its console)."""

    conn: Any
    name: str
    console: Path
    domain: Any

    @classmethod
    def define(cls, conn: Any, directory: Path, kernel: GuestKernel, initrd: Path) -> ScannerGuest:
        name = f"volguest-{secrets.token_hex(4)}"
        console = directory / f"{name}.console"
        xml = tcg_domain_xml(name, kernel, initrd, console)
        return cls(conn, name, console, conn.defineXML(xml))

    def start(self) -> None:
        self.domain.create()
        self.wait_for("GUEST-UP", BOOT_TIMEOUT)

    def text(self) -> str:
        """The console so far, its serial line endings (CRLF) made plain."""
        if not self.console.exists():
            return ""
        return self.console.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")

    def wait_for(self, needle: str, timeout: float = DISK_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if time.monotonic() > deadline:
                tail = " | ".join(self.text().strip().splitlines()[-5:])
                raise UnavailableError(f"guest {self.name} never printed {needle!r} ({tail})")
            time.sleep(0.2)
        return self.text()

    def disk_data(self, serial: str, timeout: float = DISK_TIMEOUT) -> str:
        """What the guest read from the start of the disk with `serial`."""
        self.wait_for(f"DISK serial={serial} ", timeout)
        found = re.search(rf"DISK serial={re.escape(serial)} dev=(\S+) data=(\S*)", self.text())
        if found is None:
            raise UnavailableError(f"guest {self.name}: no data line for disk {serial}")
        return found.group(2)

    def wait_size(self, serial: str, size: int, timeout: float = DISK_TIMEOUT) -> None:
        """Wait until the guest reports `size` bytes for the disk with `serial`."""
        self.wait_for(f"SIZE serial={serial} sectors={size // 512}\n", timeout)

    def sizes(self, serial: str) -> list[int]:
        """Every size (bytes) the guest reported for the disk with `serial`, in order."""
        found = re.findall(rf"SIZE serial={re.escape(serial)} sectors=(\d+)\n", self.text())
        return [int(sectors) * 512 for sectors in found]

    def wait_gone(self, serial: str, timeout: float = DISK_TIMEOUT) -> None:
        self.wait_for(f"GONE serial={serial}\n", timeout)

    def remove(self) -> None:
        try:
            if self.domain.isActive():
                self.domain.destroy()
            self.domain.undefine()
        except libvirt.libvirtError:
            pass
