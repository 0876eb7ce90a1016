"""The device-mapper test guest: boot time, per-command cost, a whole dm scenario.

Boots the guest the tests use (TCG, Debian cloud kernel, busybox initramfs)
and reports, over `--rounds` runs:

- boot: from starting QEMU to the command agent's ready line;
- one command: a round trip of `true` through the executor's guest runner;
- a whole dm scenario on a scratch virtio disk, each command through the
  executor as a driver runs it: thin pool on two linear targets, a thin
  volume under dm-crypt (key on a descriptor) with ext4 written and read
  back, a thin snapshot, a `snapshot` target over a dm-crypt COW (the
  per-layer composition), then everything removed;
- a LUKS2 volume: luksFormat (pbkdf2, 1000 iterations), open, close.

The figures depend on the host's load: TCG runs the guest on one host core.

    python benchmarks/dm_guest.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from trustplane.embedded.dm_guest import DmGuest, start_dm_guest
from trustplane.tools import SecretFd

PLAIN = ["--type", "plain", "--cipher", "aes-xts-plain64", "--key-size", "512"]


def dm_scenario(guest: DmGuest) -> None:
    """Thin pool, crypt over thin, ext4, thin snapshot, snapshot over a crypt COW."""
    ex = guest.executor
    with guest.scratch_disk() as disk:
        device = disk.device
        total = int(ex.run(["blockdev", "--getsz", device]).text)
        meta, volume = 32768, 128 * 2048
        created: list[tuple[str, str]] = []

        def dm(name: str, table: str) -> None:
            ex.run(["dmsetup", "create", name, "--table", table])
            created.append(("dm", name))

        def crypt(source: str, name: str) -> None:
            key = SecretFd(os.urandom(64))
            ex.run(["cryptsetup", "open", *PLAIN, "--key-file", key, source, name])
            created.append(("crypt", name))

        try:
            dm("bmeta", f"0 {meta} linear {device} 0")
            dm("bdata", f"0 {total - meta} linear {device} {meta}")
            ex.run(["dd", "if=/dev/zero", "of=/dev/mapper/bmeta", "bs=4096", "count=1"])
            dm("bpool", f"0 {total - meta} thin-pool /dev/mapper/bmeta /dev/mapper/bdata 128 0")
            for thin_id in (0, 1):
                ex.run(["dmsetup", "message", "/dev/mapper/bpool", "0", f"create_thin {thin_id}"])
                dm(f"bthin{thin_id}", f"0 {volume} thin /dev/mapper/bpool {thin_id}")
            crypt("/dev/mapper/bthin0", "blayer0")
            ex.run(["mke2fs", "-q", "-t", "ext4", "-E", "nodiscard", "/dev/mapper/blayer0"])
            ex.run(["mkdir", "-p", "/mnt/blayer0"])
            ex.run(["mount", "/dev/mapper/blayer0", "/mnt/blayer0"])
            try:
                ex.run(["sh", "-c", "cat > /mnt/blayer0/f && sync"], stdin=os.urandom(1 << 20))
                ex.run(["cat", "/mnt/blayer0/f"])
            finally:
                ex.run(["umount", "/mnt/blayer0"])
            ex.run(["dmsetup", "suspend", "/dev/mapper/bthin0"])
            ex.run(["dmsetup", "message", "/dev/mapper/bpool", "0", "create_snap 2 0"])
            ex.run(["dmsetup", "resume", "/dev/mapper/bthin0"])
            dm("bsnap", f"0 {volume} thin /dev/mapper/bpool 2")
            crypt("/dev/mapper/bthin1", "bcow1")
            ex.run(["dd", "if=/dev/zero", "of=/dev/mapper/bcow1", "bs=4096", "count=1"])
            dm("blayer1", f"0 {volume} snapshot /dev/mapper/blayer0 /dev/mapper/bcow1 P 8")
            ex.run(["dd", "if=/dev/mapper/blayer1", "of=/dev/null", "bs=1M", "count=4"])
        finally:
            for kind, name in reversed(created):
                if kind == "crypt":
                    ex.run(["cryptsetup", "close", name])
                else:
                    ex.run(["dmsetup", "remove", name])


def luks2(guest: DmGuest) -> None:
    ex = guest.executor
    key = os.urandom(32).hex().encode()
    fast = ["--type", "luks2", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]
    with guest.scratch_disk() as disk:
        ex.run(
            [
                "cryptsetup",
                "luksFormat",
                *fast,
                "--batch-mode",
                disk.device,
                "--key-file",
                SecretFd(key),
            ]
        )
        ex.run(["cryptsetup", "open", disk.device, "bluks", "--key-file", SecretFd(key)])
        ex.run(["cryptsetup", "close", "bluks"])


def _timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    boots: list[float] = []
    commands: list[float] = []
    scenarios: list[float] = []
    formats: list[float] = []
    with tempfile.TemporaryDirectory(prefix="trustplane-bench-dm-") as scratch:
        for round_ in range(args.rounds):
            with start_dm_guest(Path(scratch) / f"guest{round_}", disks=(1 << 30,)) as guest:
                boots.append(guest.boot_seconds)
                commands += [_timed(partial(guest.executor.run, ["true"])) for _ in range(10)]
                scenarios.append(_timed(partial(dm_scenario, guest)))
                formats.append(_timed(partial(luks2, guest)))
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (2 cores shared)")
    for name, values in (
        ("boot to agent ready", boots),
        ("one command round trip", commands),
        ("whole dm scenario", scenarios),
        ("LUKS2 format + open + close", formats),
    ):
        print(
            f"{name:30s} p50 {statistics.median(values):7.3f} s"
            f"   min {min(values):7.3f} s   max {max(values):7.3f} s   n={len(values)}"
        )


if __name__ == "__main__":
    main()
