"""What a test left on this machine under a path: mounts, loop devices, daemons.

Used by tests/layerstore (conftest.py) and by the integration tests of the
layer store, which import it by path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path


def _mounts_under(prefix: str) -> list[str]:
    points = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if point.startswith(prefix):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def _loops_under(prefix: str) -> list[str]:
    out = subprocess.run(
        ["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    devices = json.loads(out).get("loopdevices", []) if out.strip() else []
    return [d["name"] for d in devices if str(d.get("back-file") or "").startswith(prefix)]


def _daemons_under(prefix: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"qemu-storage-daemon") and prefix.encode() in b" ".join(argv):
            found.append(int(entry.name))
    return found


def leftovers(prefix: str) -> list[str]:
    return (
        [f"mount {p}" for p in _mounts_under(prefix)]
        + [f"loop {d}" for d in _loops_under(prefix)]
        + [f"daemon {p}" for p in _daemons_under(prefix)]
    )


def clean(prefix: str) -> None:
    for point in _mounts_under(prefix):
        subprocess.run(["umount", "--lazy", point], check=False)
    for device in _loops_under(prefix):
        subprocess.run(["losetup", "--detach", device], check=False)
    for pid in _daemons_under(prefix):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    for point in _mounts_under(prefix):
        subprocess.run(["umount", "--lazy", point], check=False)
