"""A second containerd, private to the caller, beside the one dockerd runs.

Its own ``--root``, ``--state`` and ``--address`` and a configuration file of
ours: the CRI plugin disabled (nothing here speaks Kubernetes), every path
under the work dir, and one ``[proxy_plugins.NAME]`` entry of type
``snapshot`` per snapshotter the caller names, pointing at a unix socket that
the caller serves (containerd dials it lazily, so the server may start later
and restart at will). `ctr` reaches it with ``--address``.

The shim's sockets live under /run/containerd/s/ named by a hash of this
daemon's address, so they never meet another containerd's.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from trustplane.embedded.process import (
    ManagedProcess,
    StopsOnExit,
    UnixSocketReady,
    require_binary,
)
from trustplane.errors import UsageError
from trustplane.tools import Executor, ToolResult
from trustplane.tools.local import path_with_sbin

START_TIMEOUT = 60.0
STOP_GRACE = 15.0
DEFAULT_NAMESPACE = "trustplane"
_MAX_SOCKET_PATH = 107
# CRI (nothing here speaks Kubernetes) and the snapshotters this host cannot
# have, which would only log errors at every start.
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
)
_PLUGIN_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")


@dataclass(frozen=True)
class RunningContainerd(StopsOnExit):
    """A started containerd: its socket, directories, proxy snapshotters and process."""

    address: Path
    root: Path
    state: Path
    config_file: Path
    proxy_snapshotters: Mapping[str, Path]
    process: ManagedProcess
    namespace: str = DEFAULT_NAMESPACE
    timings: dict[str, float] = field(default_factory=dict)

    def ctr(self, *args: str, timeout: float = 300.0, check: bool = True) -> ToolResult:
        """`ctr --address A --namespace NS ARGS` through the executor.

        With `check` a failure is one ToolError quoting ctr's last line;
        without it the caller reads `returncode`.
        """
        binary = require_binary("ctr", "containerd")
        argv = [binary, "--address", str(self.address), "--namespace", self.namespace, *args]
        return Executor().run(argv, timeout=timeout, check=check)

    def stop(self) -> None:
        """Stop the daemon (running tasks are the caller's to end first)."""
        self.process.stop()


def start_containerd(
    work_dir: Path,
    *,
    proxy_snapshotters: Mapping[str, Path] | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    timeout: float = START_TIMEOUT,
) -> RunningContainerd:
    """Start containerd with everything under `work_dir`; return once its socket answers.

    `proxy_snapshotters` maps a snapshotter name (as `ctr --snapshotter NAME`
    will use it) to the unix socket its gRPC server listens on.
    """
    binary = require_binary("containerd", "containerd")
    require_binary("ctr", "containerd")
    require_binary("runc", "runc")
    work_dir = work_dir.absolute()
    proxies = {name: Path(sock).absolute() for name, sock in (proxy_snapshotters or {}).items()}
    for name in proxies:
        if not _PLUGIN_NAME.fullmatch(name):
            raise UsageError(f"snapshotter name {name!r}: lowercase letters, digits, '-', '_'")
    root = work_dir / "root"
    state = work_dir / "state"
    address = work_dir / "containerd.sock"
    for path in (address, *proxies.values()):
        if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
            raise UsageError(f"path too long for a unix socket: {path}")
    for directory in (root, state):
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    config_file = work_dir / "config.toml"
    config_file.write_text(render_config(root, state, address, proxies))
    process = ManagedProcess(
        "containerd",
        [
            binary,
            "--config",
            str(config_file),
            "--root",
            str(root),
            "--state",
            str(state),
            "--address",
            str(address),
            "--log-level",
            "warn",
        ],
        work_dir,
        ready=UnixSocketReady(address),
        timeout=timeout,
        grace=STOP_GRACE,
        env={**os.environ, "PATH": path_with_sbin()},
    ).start()
    return RunningContainerd(
        address=address,
        root=root,
        state=state,
        config_file=config_file,
        proxy_snapshotters=proxies,
        process=process,
        namespace=namespace,
    )


def render_config(root: Path, state: Path, address: Path, proxies: Mapping[str, Path]) -> str:
    """containerd's config (version 2) as TOML; strings are written as JSON strings,
    which TOML's basic strings accept, so no TOML writer is needed for one file."""

    def s(value: object) -> str:
        return json.dumps(str(value))

    lines = [
        "version = 2",
        f"root = {s(root)}",
        f"state = {s(state)}",
        f"disabled_plugins = {json.dumps(DISABLED_PLUGINS)}",
        "",
        "[grpc]",
        f"  address = {s(address)}",
        "",
        "[ttrpc]",
        f"  address = {s(str(address) + '.ttrpc')}",
        "",
        "[debug]",
        '  address = ""',
        "",
        "[metrics]",
        '  address = ""',
        "",
        '[plugins."io.containerd.internal.v1.opt"]',
        f"  path = {s(root / 'opt')}",
        "",
        # Collect garbage after every deletion, so that a snapshot removed from
        # containerd's metadata reaches its snapshotter's Remove promptly.
        '[plugins."io.containerd.gc.v1.scheduler"]',
        "  deletion_threshold = 1",
    ]
    for name, sock in sorted(proxies.items()):
        lines += ["", f"[proxy_plugins.{s(name)}]", '  type = "snapshot"', f"  address = {s(sock)}"]
    return "\n".join(lines) + "\n"
