"""The embedded libvirtd: libvirt-python against a private daemon, TCG domains,
hot-plug, and the ephemeral private secrets that volume attach relies on."""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import libvirt_qemu
import pytest
from missing import component_missing

from trustplane.embedded.guest_kernel import guest_kernel
from trustplane.embedded.initramfs import GUEST_SETUP, build_initramfs
from trustplane.embedded.libvirtd import RunningLibvirtd, start_libvirtd
from trustplane.embedded.volume_guest import tcg_domain_xml
from trustplane.errors import TrustplaneError

BOOT_TIMEOUT = 60.0


@pytest.fixture
def conn(libvirtd: RunningLibvirtd) -> Iterator[libvirt.virConnect]:
    connection = libvirt.open(libvirtd.uri)
    yield connection
    connection.close()


def _secret_xml(secret_uuid: str, volume: str) -> str:
    return (
        f"<secret ephemeral='yes' private='yes'><uuid>{secret_uuid}</uuid>"
        f"<usage type='volume'><volume>{volume}</volume></usage></secret>"
    )


def _domain_xml(name: str, serial: Path) -> str:
    """A TCG guest with no disk and no kernel: SeaBIOS runs and says so on the serial port."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><bios useserial='yes'/></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <controller type='scsi' model='virtio-scsi'/>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
  </devices>
</domain>"""


def _wait_for(predicate: object, what: str, timeout: float = BOOT_TIMEOUT) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _is_qemu(pid: int) -> bool:
    try:
        return b"qemu" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _query_block(dom: libvirt.virDomain) -> list[dict[str, object]]:
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-block"}', 0))
    blocks: list[dict[str, object]] = reply["return"]
    return blocks


def test_libvirt_python_connects_to_the_private_daemon(
    libvirtd: RunningLibvirtd, conn: libvirt.virConnect
) -> None:
    assert conn.getLibVersion() >= 9_000_000
    assert conn.getType() == "QEMU"
    caps = conn.getCapabilities()
    assert "<arch name='x86_64'>" in caps or "arch name='x86_64'" in caps
    assert oct(libvirtd.socket.stat().st_mode & 0o777) == oct(0o700)
    # The daemon's /run/libvirt and /var/lib/libvirt are our private directories.
    assert (libvirtd.work_dir / "run" / "qemu").is_dir()
    assert (libvirtd.work_dir / "lib" / "qemu").is_dir()


def test_ephemeral_private_secret_from_bytes(
    libvirtd: RunningLibvirtd, conn: libvirt.virConnect
) -> None:
    secret_uuid = str(uuid.uuid4())
    value = secrets.token_bytes(32) + b"\x00\n\xff"  # raw bytes, not base64, not text
    secret = conn.secretDefineXML(_secret_xml(secret_uuid, "/volumes/test-secret"))
    try:
        secret.setValue(value)
        assert secret.UUIDString() == secret_uuid
        assert secret.usageType() == libvirt.VIR_SECRET_USAGE_TYPE_VOLUME
        # Private: nobody reads it back, neither through the API nor through virsh.
        with pytest.raises(libvirt.libvirtError, match="private"):
            secret.value()
        refused = libvirtd.virsh("secret-get-value", secret_uuid)
        assert refused.returncode != 0
        assert b"private" in refused.stderr
        assert value not in refused.stdout
        # Ephemeral: nothing about it is written to the daemon's config or state.
        for directory in (libvirtd.work_dir / "etc", libvirtd.work_dir / "lib"):
            for path in directory.rglob("*"):
                assert secret_uuid not in path.name
                if path.is_file():
                    assert value not in path.read_bytes()
    finally:
        secret.undefine()
    with pytest.raises(libvirt.libvirtError, match=r"(?i)secret not found|no secret"):
        conn.secretLookupByUUIDString(secret_uuid)


def test_secret_vanishes_when_libvirtd_restarts_and_stop_kills_domains(tmp_path: Path) -> None:
    """On a daemon of its own: a restart forgets ephemeral secrets, keeps running
    domains; stop() leaves no QEMU behind. Reuses the session's capability cache."""
    with start_libvirtd(tmp_path / "libvirtd") as daemon:
        conn = libvirt.open(daemon.uri)
        secret_uuid = str(uuid.uuid4())
        conn.secretDefineXML(_secret_xml(secret_uuid, "/volumes/restart")).setValue(b"k" * 32)
        dom = conn.createXML(_domain_xml("restart-probe", tmp_path / "console.log"), 0)
        qemu_pid = int((daemon.work_dir / "run" / "qemu" / "restart-probe.pid").read_text())
        conn.close()

        daemon.restart()
        conn = libvirt.open(daemon.uri)
        with pytest.raises(libvirt.libvirtError, match=r"(?i)secret not found|no secret"):
            conn.secretLookupByUUIDString(secret_uuid)
        dom = conn.lookupByName("restart-probe")
        assert dom.isActive()
        conn.close()
    assert not _is_qemu(qemu_pid), "stop() left the domain's QEMU running"


def test_tcg_domain_runs_and_takes_a_hot_plugged_disk(
    libvirtd: RunningLibvirtd, conn: libvirt.virConnect, tmp_path: Path
) -> None:
    name = f"probe-{secrets.token_hex(4)}"
    serial = tmp_path / "console.log"
    dom = conn.defineXML(_domain_xml(name, serial))
    try:
        dom.create()
        assert dom.isActive()
        # SeaBIOS runs and, finding no disk, says so on the serial console.
        _wait_for(
            lambda: serial.exists() and b"No bootable device" in serial.read_bytes(),
            "SeaBIOS on the serial console",
        )
        assert b"SeaBIOS" in serial.read_bytes()
        # QEMU runs on every CPU, not on the one libvirtd is pinned to.
        pid = int((libvirtd.work_dir / "run" / "qemu" / f"{name}.pid").read_text())
        assert os.sched_getaffinity(pid) == os.sched_getaffinity(0)

        disk = tmp_path / "hotplug.raw"
        disk.write_bytes(b"\0" * (1024 * 1024))
        disk_xml = (
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
            f"<source file='{disk}'/><target dev='sdb' bus='scsi'/></disk>"
        )
        dom.attachDeviceFlags(disk_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        assert f"<source file='{disk}'" in dom.XMLDesc()
        files = [b.get("inserted", {}).get("file") for b in _query_block(dom)]  # type: ignore[union-attr]
        assert str(disk) in files
        # A SCSI disk leaves at once (no guest OS has to acknowledge the unplug).
        dom.detachDeviceFlags(disk_xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        _wait_for(lambda: str(disk) not in dom.XMLDesc(), "the detached disk to leave")
        files = [b.get("inserted", {}).get("file") for b in _query_block(dom)]  # type: ignore[union-attr]
        assert str(disk) not in files
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()


_READER_INIT = f"""#!/bin/sh
{GUEST_SETUP}
echo GUEST-UP
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
echo "DISK:$(head -c 64 /dev/vda | tr -d '\\000')"
echo GUEST-DONE
poweroff -f
"""


def test_a_cloud_kernel_boots_under_libvirtd_and_reads_its_disk(
    conn: libvirt.virConnect, tmp_path: Path
) -> None:
    """Debian's cloud kernel and a busybox initramfs (helper modules from
    trustplane.embedded) boot in a TCG domain and print a marker from a virtio disk."""
    try:
        kernel = guest_kernel()
    except TrustplaneError as exc:
        component_missing("guest kernel (linux-image-cloud-amd64, downloaded)", str(exc))
    initrd = build_initramfs(
        tmp_path / "initrd.img", _READER_INIT, kernel=kernel, modules=("virtio_pci", "virtio_blk")
    )
    marker = f"libvirt-disk-marker-{secrets.token_hex(8)}"
    disk = tmp_path / "disk.raw"
    disk.write_bytes(marker.encode().ljust(1024 * 1024, b"\0"))
    serial = tmp_path / "console.log"
    name = f"kernel-{secrets.token_hex(4)}"
    disk_xml = f"""    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
"""
    xml = tcg_domain_xml(name, kernel, initrd, serial, disk_xml)
    dom = conn.createXML(xml, 0)
    try:
        _wait_for(
            lambda: serial.exists() and b"GUEST-DONE" in serial.read_bytes(),
            "the guest to read its disk",
            timeout=180,
        )
        console = serial.read_bytes().decode("utf-8", errors="replace")
        assert f"DISK:{marker}" in console, console[-2000:]
        # poweroff -f ends the domain (on_poweroff = destroy).
        _wait_for(lambda: not _is_active(conn, name), "the guest to power off", timeout=60)
    finally:
        if _is_active(conn, name):
            dom.destroy()


def _is_active(conn: libvirt.virConnect, name: str) -> bool:
    try:
        return bool(conn.lookupByName(name).isActive())
    except libvirt.libvirtError:
        return False  # a transient domain is gone once it stops
