"""A Docker host with trustplane's volume plugin, on loopback: for tests and benchmarks.

- `volume_backends_env`: the control plane's settings for one file backend
  (`trustplane server` reads them from the environment).
- `register_volume_node` and `volume_node_rules`: a node registered with its
  key, and the policy rules that let it create, delete and attach volumes
  (`require_attestation` when asked); `replace_policy` writes the server's
  policy file, which it reloads.
- `PluginProcess`: `trustplane volume-plugin` as a real process, started,
  stopped (SIGTERM: volumes stay open) and killed (`kill -9`).

dockerd itself comes from `embedded.dockerd.ensure_dockerd(plugin_dir=…)`:
a daemon of its own whose /run/docker/plugins is the plugin's directory.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwk

from trustplane.atomic import atomic_write
from trustplane.client import ControlClient
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.process import ManagedProcess, unix_socket_accepts

FILE_BACKEND = "files"
START_TIMEOUT = 120.0
_STARTS = itertools.count(1)


def volume_backends_env(directory: Path, name: str = FILE_BACKEND) -> dict[str, str]:
    """The control plane's settings (environment): one file backend in `directory`."""
    config = {name: {"kind": "file", "directory": str(directory)}}
    return {"TRUSTPLANE_VOLUME_BACKENDS": json.dumps(config)}


def register_volume_node(admin: ControlClient, directory: Path, name: str) -> Path:
    """Register host node `name` with a new key; the key file (0600)."""
    signing = ec.generate_private_key(ec.SECP256R1())
    key = directory / f"{name}.key"
    pem = jwk.JWK.from_pyca(signing).export_to_pem(private_key=True, password=None)
    atomic_write(key, pem, mode=0o600)
    admin.register_node(name, "host", jwk.JWK.from_pyca(signing).export_to_pem().decode())
    return key


def volume_node_rules(node: str, denied: tuple[str, ...] = (), *, attested: bool = False) -> str:
    """Policy rules: `node` creates, deletes and attaches volumes, except the `denied`
    name patterns; with `attested`, keys go to it only while its attestation is fresh."""
    text = f"""\
  - subjects: ["node:{node}"]
    actions: [volume.create, volume.delete, volume.attach]
    resources: ["volume:*"]
"""
    if attested:
        text += "    require_attestation: true\n"
    for pattern in denied:
        text += f"""\
  - effect: deny
    subjects: ["node:{node}"]
    actions: [volume.attach]
    resources: ["volume:{pattern}"]
"""
    return text


def replace_policy(plane: RunningControlPlane, text: str) -> None:
    """Replace the server's policy file in one rename (it reloads it when it changes)."""
    path = plane.data_dir / "policy.yaml"
    before = path.stat().st_mtime_ns if path.exists() else None
    atomic_write(path, text.encode(), mode=0o600)
    while path.stat().st_mtime_ns == before:  # a coarse clock: make the change visible
        time.sleep(0.01)
        os.utime(path)


@dataclass
class PluginProcess:
    """`trustplane volume-plugin` for `node`: started, stopped, killed."""

    plane: RunningControlPlane
    node: str
    node_key: Path
    socket: Path
    root: Path
    work: Path
    process: ManagedProcess | None = None
    logs: list[Path] = field(default_factory=list)
    args: tuple[str, ...] = ()
    """More options for `trustplane volume-plugin` (`--key-lease 60`), from the next start."""

    def start(self) -> ManagedProcess:
        """Start it; returns once its socket accepts (it recovered what was left first)."""
        if self.process is not None and self.process.running():
            raise RuntimeError("the volume plugin runs already")
        process = ManagedProcess(
            f"volume-plugin-{next(_STARTS)}",
            [
                sys.executable, "-m", "trustplane", "volume-plugin",
                "--server", self.plane.url, "--ca", str(self.plane.ca_file),
                "--node", self.node, "--node-key", str(self.node_key),
                "--plugin-socket", str(self.socket), "--plugin-root", str(self.root),
                *self.args,
            ],
            self.work,
            ready=lambda: unix_socket_accepts(self.socket),
            timeout=START_TIMEOUT,
            grace=30,
        )  # fmt: skip
        self.process = process
        self.logs.append(process.log_file)
        return process.start()

    def stop(self) -> None:
        """SIGTERM and wait: the plugin's own stop (open volumes stay open)."""
        if self.process is not None:
            self.process.stop()

    def kill9(self) -> None:
        """SIGKILL to the plugin alone (the daemons it started are not in its group)."""
        if self.process is None or self.process.pid is None:
            raise RuntimeError("the volume plugin was not started")
        os.kill(self.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while self.process.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.process.stop()  # reaps it

    def log_text(self) -> str:
        """Everything every start of it wrote."""
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())
