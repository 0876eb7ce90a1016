"""The device-mapper test guest is real: a kernel with dm, real tools, real disks.

Every command runs through the executor with the guest's runner, as a
driver would run it on a production host. Keys reach cryptsetup through
the executor's secret mechanism (a descriptor or a private file), never
argv. The host side checks the raw disk images: what was written through
dm-crypt is not there in the clear.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from trustplane.embedded.dm_guest import DmGuest, GuestDisk
from trustplane.errors import DecryptionKeyError, ToolTimeout, UnsupportedError
from trustplane.tools import Executor, SecretFd, SecretFile

LUKS2_FAST = ["--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
WRONG_KEY = {"No key available with this passphrase": DecryptionKeyError}
SECTOR = 512


def _marker(name: str) -> bytes:
    return f"trustplane-{name}-".encode() + os.urandom(6).hex().encode()


def _write(executor: Executor, device: str, data: bytes, offset: int = 0) -> None:
    """`data` onto `device` at `offset` (a multiple of 512), synced."""
    padded = data + b"\0" * (-len(data) % SECTOR)
    executor.run(
        ["dd", f"of={device}", "bs=512", f"seek={offset // SECTOR}", "conv=fsync,notrunc"],
        stdin=padded,
    )


def _read(executor: Executor, device: str, size: int, offset: int = 0) -> bytes:
    sectors = (size + SECTOR - 1) // SECTOR
    out = executor.run(
        ["dd", f"if={device}", "bs=512", f"skip={offset // SECTOR}", f"count={sectors}"]
    ).stdout
    return out[:size]


def _on_disk(path: Path, needle: bytes) -> bool:
    """True when the raw (sparse) disk image holds `needle`; reads only its data extents."""
    with path.open("rb") as image:
        fd = image.fileno()
        end = os.fstat(fd).st_size
        offset = 0
        while offset < end:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after offset
                return False
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            image.seek(start)
            carry = b""
            position = start
            while position < stop:
                chunk = image.read(min(4 << 20, stop - position))
                if needle in carry + chunk:
                    return True
                carry = chunk[-len(needle) :]
                position += len(chunk)
            offset = stop
    return False


def _sectors(executor: Executor, device: str) -> int:
    return int(executor.run(["blockdev", "--getsz", device]).text)


@pytest.fixture
def disk(dm_guest: DmGuest) -> Iterator[GuestDisk]:
    """A scratch disk; the test must leave no dm device behind (checked)."""
    with dm_guest.scratch_disk() as lent:
        yield lent
    left = dm_guest.executor.run(["dmsetup", "ls"]).text
    assert "No devices found" in left, f"dm devices left behind: {left}"


def test_the_guest_kernel_has_the_device_mapper_targets(dm_guest: DmGuest) -> None:
    ex = dm_guest.executor
    assert ex.run(["uname", "-r"]).text.strip() == dm_guest.kernel.release
    targets = {line.split()[0] for line in ex.run(["dmsetup", "targets"]).text.splitlines()}
    assert {"crypt", "thin-pool", "thin", "snapshot", "linear"} <= targets
    assert dm_guest.boot_seconds > 0


def test_luks2_format_and_open_with_the_key_as_a_secret(dm_guest: DmGuest, disk: GuestDisk) -> None:
    ex = dm_guest.executor
    key = os.urandom(32).hex().encode()  # the passphrase is the key's hex, as OpenStack does
    marker = _marker("luks2")
    ex.run(
        [
            "cryptsetup",
            "luksFormat",
            *LUKS2_FAST,
            "--batch-mode",
            disk.device,
            "--key-file",
            SecretFd(key),
        ]
    )
    assert ex.run(["cryptsetup", "isLuks", "--type", "luks2", disk.device]).returncode == 0
    ex.run(["cryptsetup", "open", disk.device, "tpluks", "--key-file", SecretFile(key)])
    try:
        _write(ex, "/dev/mapper/tpluks", marker, offset=1 << 20)
        assert _read(ex, "/dev/mapper/tpluks", len(marker), offset=1 << 20) == marker
        # Nothing of the key's files is left in the guest's tmpfs.
        leftovers = ex.run(["find", "/run/tp", "-path", "*/s/*"]).text
        assert leftovers == ""
    finally:
        ex.run(["cryptsetup", "close", "tpluks"])
    with pytest.raises(DecryptionKeyError, match=r"^cryptsetup failed.*No key available"):
        ex.run(
            ["cryptsetup", "open", disk.device, "tpluks", "--key-file", SecretFd(b"wrong" * 8)],
            failures=WRONG_KEY,
        )
    with disk.path.open("rb") as image:
        assert image.read(6) == b"LUKS\xba\xbe"
    assert not _on_disk(disk.path, marker)
    assert not _on_disk(disk.path, key)


def test_plain_dm_crypt_with_the_key_on_a_descriptor(dm_guest: DmGuest, disk: GuestDisk) -> None:
    ex = dm_guest.executor
    key = os.urandom(64)  # aes-xts-plain64 with a 512-bit key, raw bytes
    plain = ["--type", "plain", "--cipher", "aes-xts-plain64", "--key-size", "512"]
    marker = _marker("plain")

    def open_with(k: bytes) -> None:
        ex.run(["cryptsetup", "open", *plain, "--key-file", SecretFd(k), disk.device, "tpplain"])

    open_with(key)
    try:
        _write(ex, "/dev/mapper/tpplain", marker)
    finally:
        ex.run(["cryptsetup", "close", "tpplain"])
    open_with(key)
    try:
        assert _read(ex, "/dev/mapper/tpplain", len(marker)) == marker
    finally:
        ex.run(["cryptsetup", "close", "tpplain"])
    open_with(os.urandom(64))
    try:
        assert _read(ex, "/dev/mapper/tpplain", len(marker)) != marker
    finally:
        ex.run(["cryptsetup", "close", "tpplain"])
    assert not _on_disk(disk.path, marker)


def test_thin_pool_thin_volume_and_snapshot(dm_guest: DmGuest, disk: GuestDisk) -> None:
    ex = dm_guest.executor
    total = _sectors(ex, disk.device)
    meta_sectors = 32768  # 16 MiB of pool metadata at the start of the disk
    data_sectors = total - meta_sectors
    volume_sectors = 2 * 64 * 2048  # 128 MiB thin volumes
    before, after = _marker("before-snapshot"), _marker("after-snapshot")
    created: list[str] = []

    def create(name: str, table: str) -> None:
        ex.run(["dmsetup", "create", name, "--table", table])
        created.append(name)

    try:
        create("tpmeta", f"0 {meta_sectors} linear {disk.device} 0")
        create("tpdata", f"0 {data_sectors} linear {disk.device} {meta_sectors}")
        # A fresh pool needs zeroed metadata.
        ex.run(["dd", "if=/dev/zero", "of=/dev/mapper/tpmeta", "bs=4096", "count=1"])
        create(
            "tppool",
            f"0 {data_sectors} thin-pool /dev/mapper/tpmeta /dev/mapper/tpdata 128 0",
        )
        ex.run(["dmsetup", "message", "/dev/mapper/tppool", "0", "create_thin 0"])
        create("tpthin", f"0 {volume_sectors} thin /dev/mapper/tppool 0")
        _write(ex, "/dev/mapper/tpthin", before)
        # A thin snapshot of an active volume: suspend it around create_snap.
        ex.run(["dmsetup", "suspend", "/dev/mapper/tpthin"])
        ex.run(["dmsetup", "message", "/dev/mapper/tppool", "0", "create_snap 1 0"])
        ex.run(["dmsetup", "resume", "/dev/mapper/tpthin"])
        create("tpsnap", f"0 {volume_sectors} thin /dev/mapper/tppool 1")
        _write(ex, "/dev/mapper/tpthin", after)
        assert _read(ex, "/dev/mapper/tpthin", len(after)) == after
        assert _read(ex, "/dev/mapper/tpsnap", len(before)) == before
        status = ex.run(["dmsetup", "status", "tppool"]).text.split()
        assert status[2] == "thin-pool"
    finally:
        for name in reversed(created):
            ex.run(["dmsetup", "remove", name])


def test_snapshot_target_over_a_crypt_cow(dm_guest: DmGuest, disk: GuestDisk) -> None:
    """The per-layer composition (DESIGN.md): `snapshot <lower> <cow>` where the COW
    is dm-crypt under the layer's own key. The lower layer sees none of the upper
    layer's writes, and the COW's disk area holds none of it in the clear."""
    ex = dm_guest.executor
    layer_sectors = 64 * 2048  # 64 MiB
    lower_marker, upper_marker = _marker("lower"), _marker("upper")
    cow_key = os.urandom(64)
    created: list[str] = []
    try:
        ex.run(
            ["dmsetup", "create", "tplower", "--table", f"0 {layer_sectors} linear {disk.device} 0"]
        )
        created.append("tplower")
        _write(ex, "/dev/mapper/tplower", lower_marker)
        ex.run(
            [
                "dmsetup",
                "create",
                "tpcowraw",
                "--table",
                f"0 {layer_sectors} linear {disk.device} {layer_sectors}",
            ]
        )
        created.append("tpcowraw")
        plain = ["--type", "plain", "--cipher", "aes-xts-plain64", "--key-size", "512"]
        ex.run(
            [
                "cryptsetup",
                "open",
                *plain,
                "--key-file",
                SecretFd(cow_key),
                "/dev/mapper/tpcowraw",
                "tpcow",
            ]
        )
        created.append("tpcow")
        # A fresh COW must start with a zeroed chunk, read through its crypt device,
        # or the snapshot target calls it "Invalid or corrupt snapshot".
        ex.run(["dd", "if=/dev/zero", "of=/dev/mapper/tpcow", "bs=4096", "count=1", "conv=fsync"])
        ex.run(
            [
                "dmsetup",
                "create",
                "tpupper",
                "--table",
                f"0 {layer_sectors} snapshot /dev/mapper/tplower /dev/mapper/tpcow P 8",
            ]
        )
        created.append("tpupper")
        assert _read(ex, "/dev/mapper/tpupper", len(lower_marker)) == lower_marker
        _write(ex, "/dev/mapper/tpupper", upper_marker, offset=1 << 20)
        assert _read(ex, "/dev/mapper/tpupper", len(upper_marker), 1 << 20) == upper_marker
        assert _read(ex, "/dev/mapper/tplower", len(upper_marker), 1 << 20) != upper_marker
    finally:
        for name in reversed(created):
            if name == "tpcow":
                ex.run(["cryptsetup", "close", name])
            else:
                ex.run(["dmsetup", "remove", name])
    assert _on_disk(disk.path, lower_marker), "the lower layer is plain linear here: a control"
    assert not _on_disk(disk.path, upper_marker)


def test_lvm_volume_group_and_logical_volume_on_a_virtio_disk(
    dm_guest: DmGuest, disk: GuestDisk
) -> None:
    ex = dm_guest.executor
    marker = _marker("lvm")
    ex.run(["pvcreate", "--yes", disk.device])
    try:
        ex.run(["vgcreate", "tpvg", disk.device])
        with disk.path.open("rb") as image:
            assert b"LVM2 001" in image.read(4096), "the PV label is on the host's disk image"
        ex.run(["lvcreate", "--yes", "-L", "64M", "-n", "tplv", "tpvg"])
        listing = ex.run(["lvs", "--noheadings", "-o", "vg_name,lv_name,lv_size", "tpvg"]).text
        assert listing.split() == ["tpvg", "tplv", "64.00m"]
        ex.run(["mke2fs", "-q", "-t", "ext4", "-E", "nodiscard", "/dev/tpvg/tplv"])
        ex.run(["mkdir", "-p", "/mnt/tplv"])
        ex.run(["mount", "/dev/tpvg/tplv", "/mnt/tplv"])
        try:
            ex.run(["sh", "-c", "cat > /mnt/tplv/marker && sync"], stdin=marker)
            assert ex.run(["cat", "/mnt/tplv/marker"]).stdout == marker
        finally:
            ex.run(["umount", "/mnt/tplv"])
        ex.run(["lvremove", "--yes", "tpvg/tplv"])
        ex.run(["vgremove", "--yes", "tpvg"])
    finally:
        ex.run(["pvremove", "--yes", "--force", disk.device], check=False)
    assert _on_disk(disk.path, marker), "plain LVM is not encrypted: the marker is on the disk"


def test_the_guest_runner_reports_failure_and_timeout(dm_guest: DmGuest) -> None:
    ex = dm_guest.executor
    result = ex.run(["sh", "-c", "echo out; echo err >&2; exit 3"], check=False)
    assert (result.returncode, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    with pytest.raises(
        ToolTimeout, match=r"^sh did not finish within 1 s and was killed: waiting$"
    ):
        ex.run(["sh", "-c", "sleep 61 & echo waiting >&2; wait"], timeout=1)
    # The guest is still answering, and the killed group is gone.
    processes = ex.run(["ps", "-o", "args"]).text.splitlines()
    assert not [p for p in processes if p.startswith("sleep 61")]
    with pytest.raises(UnsupportedError, match="long-running ones run on the host"):
        ex.start(["sleep", "60"], ready=lambda: True)


def test_secret_never_reaches_the_guest_argv(dm_guest: DmGuest, tmp_path: Path) -> None:
    """Inside the guest too, the tool's argv holds a path, the secret is in the file."""
    ex = dm_guest.executor
    secret = _marker("secret")
    shown = ex.run(
        [
            "sh",
            "-c",
            'cat /proc/$$/cmdline | tr "\\0" " "; echo; cat "$1"; cat "$2"',
            "sh",
            SecretFile(secret),
            SecretFd(secret),
        ]
    ).stdout
    argv_line, _, contents = shown.partition(b"\n")
    assert secret not in argv_line
    assert b"/run/tp/" in argv_line
    assert b"/dev/fd/4" in argv_line
    assert contents == secret + secret
