"""A stack for the Docker volume plugin's tests: control plane, dockerd, plugin process.

- The control plane runs with a file backend (`files`) and a volume type
  (`secure`); the plugin's node is registered and the policy lets it
  create, delete and attach volumes.
- dockerd is a second daemon (own socket, state, network namespace) with a
  plugin directory of its own bound over /run/docker/plugins in its mount
  namespace, so the plugin is `trustplane` there and nowhere else; the
  plugin's mount root is a shared mount, so the file systems the plugin
  mounts reach the daemon.
- The plugin is `trustplane volume-plugin`, a real process, restarted and
  killed by the tests (`embedded.volume_plugin.PluginProcess`).

Here: what the tests look at on the host (mounts, loop devices, daemons,
where a key could leak).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from trustplane.embedded.dockerd import DockerDaemon

VOLUME_TYPE = "secure"
MIB = 1 << 20


def mounts_under(directory: Path, pid: int | str = "self") -> list[tuple[str, str]]:
    """(mount point, type) of every mount under `directory` in `pid`'s namespace."""
    prefix = str(directory.resolve()) + "/"
    found = []
    for line in Path(f"/proc/{pid}/mounts").read_text().splitlines():
        fields = line.split()
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        if point.startswith(prefix):
            found.append((point, fields[2]))
    return found


def loop_devices_under(directory: Path) -> list[str]:
    """Loop devices whose backing file lies under `directory`."""
    listed = subprocess.run(
        ["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if not listed.stdout.strip():
        return []
    prefix = str(directory.resolve()) + "/"
    return [
        entry["name"]
        for entry in json.loads(listed.stdout)["loopdevices"]
        if str(entry.get("back-file") or "").startswith(prefix)
    ]


def daemons_under(directory: Path) -> list[int]:
    """qemu-storage-daemon processes exporting under `directory`."""
    marker = f"mountpoint={directory.resolve()}/".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes()
            if b"qemu-storage-daemon" in cmdline and marker in cmdline:
                pids.append(int(entry.name))
    return pids


def leftovers(root: Path, daemon: DockerDaemon) -> dict[str, list[object]]:
    """Everything of an open volume still on the host (empty lists: nothing)."""
    pid = daemon.process.pid if daemon.process is not None else "self"
    assert pid is not None
    return {
        "host mounts": list(mounts_under(root)),
        "dockerd mounts": list(mounts_under(root, pid)),
        "loop devices": list(loop_devices_under(root)),
        "daemons": list(daemons_under(root)),
    }


def wait_for_nothing(
    root: Path, daemon: DockerDaemon, within: float = 30.0
) -> dict[str, list[object]]:
    """`leftovers`, polled until empty or `within` seconds have passed (the last seen)."""
    deadline = time.monotonic() + within
    while True:
        seen = leftovers(root, daemon)
        if not any(seen.values()) or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


def processes_holding(needles: list[bytes]) -> list[str]:
    """Processes whose argv or environment holds any of `needles`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        for part in ("cmdline", "environ"):
            with contextlib.suppress(OSError):
                data = (entry / part).read_bytes()
                if any(n in data for n in needles):
                    found.append(f"{entry.name}/{part}")
    return found


def files_holding(directory: Path, needles: list[bytes], skip: tuple[Path, ...] = ()) -> list[str]:
    """Regular files under `directory` (not under `skip`) that hold any of `needles`.

    Files and directories that vanish while it looks (other programs' scratch
    space) are passed over.
    """
    found: list[str] = []
    skipped = tuple(str(s.resolve()) + "/" for s in skip)
    for top, _, names in os.walk(directory):  # errors (a vanished directory) are ignored
        if (top + "/").startswith(skipped):
            continue
        for name in names:
            path = Path(top, name)
            with contextlib.suppress(OSError):
                if path.is_file() and not path.is_symlink():
                    data = path.read_bytes()
                    if any(n in data for n in needles):
                        found.append(str(path))
    return found


def file_holds(path: Path, needle: bytes, chunk: int = 4 * MIB) -> bool:
    """True when `needle` occurs in the file (read in chunks, overlapping)."""
    tail = b""
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            if needle in tail + block:
                return True
            tail = block[-len(needle) :]
    return False


@contextlib.contextmanager
def running_container(docker: object, *args: str) -> Iterator[str]:
    """`docker run -d ARGS`; removed (forced) when the block ends."""
    from gateway_helpers import DockerCli

    assert isinstance(docker, DockerCli)
    name = docker.ok("run", "-d", *args).strip()
    try:
        yield name
    finally:
        docker("rm", "-f", name)
