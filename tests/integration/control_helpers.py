"""Shared by the control-plane tests: the CLI as a user runs it, the log as an auditor reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from trustplane.atomic import atomic_write
from trustplane.client import ControlClient
from trustplane.embedded.control_plane import RunningControlPlane


@dataclass(frozen=True)
class Cli:
    """`python -m trustplane` with its own session file (and log state), as one user."""

    session: Path
    log_state: Path | None = None

    def __call__(
        self, *args: str, stdin: str | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "TRUSTPLANE_SESSION": str(self.session)}
        if self.log_state is not None:
            env["TRUSTPLANE_LOG_STATE"] = str(self.log_state)
        env.pop("TRUSTPLANE_DEBUG", None)
        return subprocess.run(
            [sys.executable, "-m", "trustplane", *args],
            capture_output=True,
            text=True,
            env=env,
            input=stdin,
            timeout=timeout,
        )

    def login(self, plane: RunningControlPlane, user: str, password: str) -> None:
        result = self(
            "login",
            "--server",
            plane.url,
            "--ca",
            str(plane.ca_file),
            "--user",
            user,
            "--password-stdin",
            stdin=password + "\n",
        )
        assert result.returncode == 0, result.stderr
        assert f"as user:{user}" in result.stdout


def assert_fails(result: subprocess.CompletedProcess[str], code: int, text: str) -> str:
    """Exit `code`, and exactly one line on stderr that says `text`; returns that line."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trustplane: error: "), lines[0]
    assert text in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def log_size(plane: RunningControlPlane) -> int:
    health = httpx.get(f"{plane.url}/healthz", verify=plane.ssl_context(), timeout=10).json()
    return int(health["log_size"])


def entries_since(
    client: ControlClient, start: int, end: int | None = None
) -> list[dict[str, Any]]:
    """Log entries [start, end) as parsed JSON, each with its `index` added."""
    if end is None:
        end = client.health().log_size
    found = []
    for index in range(start, end):
        entry = json.loads(client.log_entry(index))
        entry["index"] = index
        found.append(entry)
    return found


def wait_for_entry(
    client: ControlClient,
    start: int,
    wanted: Callable[[dict[str, Any]], bool],
    timeout: float = 300,
) -> list[dict[str, Any]]:
    """Log entries from `start` on, once one of them is `wanted`.

    The server appends an entry after it commits the state the entry reports
    (a volume `available`, a record gone), so a test that saw the state may
    still read the log without it: it waits for the entry itself."""
    deadline = time.monotonic() + timeout
    found: list[dict[str, Any]] = []
    while True:
        found += entries_since(client, start + len(found))
        if any(wanted(entry) for entry in found):
            return found
        assert time.monotonic() < deadline, f"no such entry in the log since {start}: {found}"
        time.sleep(0.1)


def add_policy_rule(plane: RunningControlPlane, rule: str) -> None:
    """Append a rule to the live policy, replacing the file in one rename.

    A torn write (truncate, then write) can be read half-way by the server;
    an operator's editor or `mv` replaces the file whole, and so do we.
    """
    path = plane.data_dir / "policy.yaml"
    mode = path.stat().st_mode & 0o777
    atomic_write(path, (path.read_text() + rule).encode(), mode=mode)
