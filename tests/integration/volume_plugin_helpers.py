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
where a key could leak), and the stack itself (`plugin_stack`), whose
control plane can be stopped and started again (`plane_down`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gateway_helpers import DockerCli

from trustplane.embedded.control_plane import RunningControlPlane, start_control_plane
from trustplane.embedded.dockerd import DockerDaemon, ensure_dockerd, make_shared, unmake_shared
from trustplane.embedded.sample_images import import_busybox_base
from trustplane.embedded.volume_plugin import (
    FILE_BACKEND,
    PluginProcess,
    register_volume_node,
    replace_policy,
    volume_backends_env,
    volume_node_rules,
)

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
    assert isinstance(docker, DockerCli)
    name = docker.ok("run", "-d", *args).strip()
    try:
        yield name
    finally:
        docker("rm", "-f", name)


# -- the stack ------------------------------------------------------------------------

TAG = "trustplane/busybox:volumes"
NOTHING: dict[str, list[object]] = {
    "host mounts": [], "dockerd mounts": [], "loop devices": [], "daemons": [],
}  # fmt: skip


@dataclass
class Stack:
    top: Path
    plane: RunningControlPlane
    base_policy: str
    node: str
    volumes: Path
    root: Path
    daemon: DockerDaemon
    docker: DockerCli
    plugin: PluginProcess

    def left(self) -> dict[str, list[object]]:
        return leftovers(self.root, self.daemon)

    def nothing_left(self) -> dict[str, list[object]]:
        """What is left once the kernel has let go (a loop device whose file system a
        dead container still held detaches when that mount goes): NOTHING, or what stays."""
        return wait_for_nothing(self.root, self.daemon)

    def allow_all(self) -> None:
        replace_policy(self.plane, self.base_policy + volume_node_rules(self.node))

    def stop_plane(self) -> None:
        """The control plane goes away (its port refuses connections)."""
        self.plane.stop()

    def start_plane(self) -> None:
        """The same control plane again: same data, port and admin."""
        old = self.plane
        self.plane = start_control_plane(
            self.top / "cp", port=int(old.url.rsplit(":", 1)[1]),
            env=volume_backends_env(self.volumes), admin_password=old.admin_password,
        )  # fmt: skip

    @contextlib.contextmanager
    def plane_down(self) -> Iterator[None]:
        """The control plane is unreachable inside the block, back after it."""
        self.stop_plane()
        try:
            yield
        finally:
            self.start_plane()

    def restart_plugin(self, *args: str) -> None:
        """`trustplane volume-plugin` again, with these extra options."""
        self.plugin.stop()
        self.plugin.args = args
        self.plugin.start()


@contextlib.contextmanager
def plugin_stack(
    before_dockerd: Callable[[Path, RunningControlPlane, Path], tuple[list[str], str]]
    | None = None,
) -> Iterator[Stack]:
    """Control plane (file backend, volume type `secure`), the plugin, dockerd, busybox.

    `before_dockerd(top, plane, plugin_dir)`, called once the plugin runs,
    returns more dockerd options (an authorization plugin it started there)
    and the token the stack's own docker client and CLI send.
    """
    # Short: dockerd's containerd socket paths under the state dir stay below 108 bytes.
    top = Path(tempfile.mkdtemp(prefix="tpv-", dir="/tmp"))
    volumes, root, plugins = top / "volumes", top / "root", top / "plugins"
    plane = start_control_plane(top / "cp", env=volume_backends_env(volumes))
    daemon: DockerDaemon | None = None
    plugin: PluginProcess | None = None
    stack: Stack | None = None
    make_shared(root)
    try:
        node = "docker-host-1"
        with plane.admin() as admin:
            key = register_volume_node(admin, top, node)
            admin.create_volume_type(VOLUME_TYPE, FILE_BACKEND)
        base_policy = (plane.data_dir / "policy.yaml").read_text()
        replace_policy(plane, base_policy + volume_node_rules(node))
        plugin = PluginProcess(plane, node, key, plugins / "trustplane.sock", root, top / "work")
        plugins.mkdir(mode=0o700)
        plugin.start()  # before dockerd: it asks the plugin for its volumes at start
        extra, token = before_dockerd(top, plane, plugins) if before_dockerd else ([], None)
        daemon = ensure_dockerd(
            top / "work", socket=top / "d.sock", state_dir=top / "state",
            private_network=True, plugin_dir=plugins, extra_args=extra,
        )  # fmt: skip
        assert daemon.started_by_us
        client = daemon.client()
        if token is not None:
            client.api.headers["X-Trustplane-Token"] = token
        try:
            import_busybox_base(client, TAG)
        finally:
            client.close()
        docker = DockerCli.make(daemon.base_url, top / "cli", token)
        stack = Stack(top, plane, base_policy, node, volumes, root, daemon, docker, plugin)
        yield stack
    finally:
        if daemon is not None:
            daemon.stop()
        if plugin is not None:
            plugin.stop()
        unmake_shared(root)
        (plane if stack is None else stack.plane).stop()
        subprocess.run(["umount", "-R", str(top / "state" / "data")], capture_output=True,
                       check=False)  # fmt: skip
        shutil.rmtree(top, ignore_errors=True)


def create_volume(stack: Stack, name: str, size: str = "64M") -> None:
    stack.docker.ok(
        "volume", "create", "-d", "trustplane",
        "--opt", f"type={VOLUME_TYPE}", "--opt", f"size={size}", name,
    )  # fmt: skip


def run_on(stack: Stack, volume: str, script: str) -> str:
    """`docker run --rm -v VOLUME:/data busybox sh -c SCRIPT`; its output."""
    return stack.docker.ok(
        "run", "--rm", "--network", "none", "-v", f"{volume}:/data", TAG, "sh", "-c", script
    )
