"""`trustplane server` as a real process on loopback, for the demo and the tests.

The server prints the first admin's one-time credential once, at its first
start; this starter reads it from the server's output and hands it over.
"""

from __future__ import annotations

import os
import re
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from trustplane.client import ControlClient
from trustplane.embedded.process import ManagedProcess, free_port
from trustplane.errors import UnavailableError

_CREDENTIAL = re.compile(r"one-time credential: (\S+)")


@dataclass(frozen=True)
class RunningControlPlane:
    url: str
    ca_file: Path
    data_dir: Path
    admin_password: str = field(repr=False)
    process: ManagedProcess

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def client(self, token: str | None = None) -> ControlClient:
        return ControlClient(self.url, self.ca_file, token)

    def admin(self) -> ControlClient:
        client = self.client()
        client.login("admin", self.admin_password)
        return client

    def stop(self) -> None:
        self.process.stop()


def start_control_plane(
    work_dir: Path,
    *,
    data_dir: Path | None = None,
    port: int | None = None,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    admin_password: str | None = None,
    timeout: float = 60.0,
) -> RunningControlPlane:
    """Start a server; `admin_password` is needed when `data_dir` was started before."""
    data = data_dir or work_dir / "data"
    port = port or free_port()
    ca_file = data / "tls" / "ca.pem"
    url = f"https://127.0.0.1:{port}"

    def ready() -> bool:
        if not ca_file.exists():
            return False
        try:
            context = ssl.create_default_context(cafile=str(ca_file))
            return httpx.get(f"{url}/healthz", verify=context, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    process = ManagedProcess(
        "trustplane server",
        [
            sys.executable,
            "-m",
            "trustplane",
            "server",
            "--data-dir",
            str(data),
            "--listen",
            f"127.0.0.1:{port}",
            *args,
        ],
        work_dir,
        ready=ready,
        timeout=timeout,
        env={**os.environ, **env} if env else None,
    ).start()
    password = admin_password or _credential(process)
    return RunningControlPlane(url, ca_file, data, password, process)


def _credential(process: ManagedProcess) -> str:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if match := _CREDENTIAL.search(process.log_file.read_text(errors="replace")):
            return match.group(1)
        time.sleep(0.05)
    process.stop()
    raise UnavailableError("the control plane printed no admin credential (not a first start?)")
