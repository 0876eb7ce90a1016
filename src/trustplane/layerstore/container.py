"""A container from a mounted root file system: an OCI runtime bundle run by `runc run`.

The runtime config follows what `runc spec` writes and Docker's defaults
(its capability set, masked and read-only /proc paths), filled from the
image config: entrypoint and command, environment, working directory,
user. runc keeps its state in a directory of ours (`--root`), so its
containers never mix with Docker's, and a crashed run is found and deleted
by `runc delete --force` from that directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trustplane.errors import MalformedError, UsageError
from trustplane.oci.model import ImageConfig
from trustplane.tools import Executor

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Docker's default capability set (moby's oci/caps/defaults.go lists the same names).
CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
]
_MASKED = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
]
_READ_ONLY = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
]


@dataclass(frozen=True)
class RunResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


def runtime_config(
    image_config: bytes,
    rootfs: Path,
    command: Sequence[str],
    hostname: str,
    env: Sequence[str] = (),
) -> dict[str, Any]:
    """The bundle's config.json for `image_config` with `command` (default: the image's)."""
    raw = ImageConfig(image_config, "image config").doc.get("config")
    config: dict[str, Any] = raw if isinstance(raw, dict) else {}
    entrypoint = list(config.get("Entrypoint") or [])
    args = entrypoint + (list(command) if command else list(config.get("Cmd") or []))
    if not args:
        raise UsageError("the image has no command; give one after --")
    variables = [*list(config.get("Env") or []), *env]
    if not any(v.startswith("PATH=") for v in variables):
        variables.insert(0, f"PATH={DEFAULT_PATH}")
    uid, gid = _user(str(config.get("User") or ""), rootfs)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid},
            "args": args,
            "env": variables,
            "cwd": str(config.get("WorkingDir") or "/"),
            "capabilities": {kind: CAPABILITIES for kind in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": False,
        },
        "root": {"path": os.fspath(rootfs), "readonly": False},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/dev/shm",  # noqa: S108 - inside the container
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
        ],
        "linux": {
            "namespaces": [{"type": kind} for kind in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": _MASKED,
            "readonlyPaths": _READ_ONLY,
        },
    }


def run_bundle(
    executor: Executor,
    bundle: Path,
    config: dict[str, Any],
    container_id: str,
    state: Path,
    timeout: float,
) -> RunResult:
    """Write config.json into `bundle` and run it to completion; the container is deleted."""
    bundle.mkdir(parents=True, exist_ok=True, mode=0o700)
    (bundle / "config.json").write_text(json.dumps(config))
    runc = ["runc", "--root", os.fspath(state)]
    try:
        result = executor.run(
            [*runc, "run", "--bundle", os.fspath(bundle), container_id],
            timeout=timeout,
            check=False,
        )
    finally:
        delete_container(executor, state, container_id)
    return RunResult(result.returncode, result.stdout, result.stderr)


def delete_container(executor: Executor, state: Path, container_id: str) -> None:
    """Kill and delete the container if runc still knows it (after a timeout or a crash)."""
    executor.run(
        ["runc", "--root", os.fspath(state), "delete", "--force", container_id], check=False
    )


def _user(spec: str, rootfs: Path) -> tuple[int, int]:
    """The image's `User` (name or number, optionally `:group`) as numbers, from its files."""
    if not spec:
        return 0, 0
    user, _, group = spec.partition(":")
    passwd = _table(rootfs / "etc" / "passwd")
    if user.isdigit():
        uid = int(user)
        gid = next((int(row[3]) for row in passwd if row[2] == user and row[3].isdigit()), 0)
    else:
        row = next((row for row in passwd if row[0] == user), None)
        if row is None or not (row[2].isdigit() and row[3].isdigit()):
            raise UsageError(f"the image's user {user!r} is not in its /etc/passwd")
        uid, gid = int(row[2]), int(row[3])
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            found = next((r for r in _table(rootfs / "etc" / "group") if r[0] == group), None)
            if found is None or not found[2].isdigit():
                raise UsageError(f"the image's group {group!r} is not in its /etc/group")
            gid = int(found[2])
    return uid, gid


def _table(path: Path) -> list[list[str]]:
    """Rows of a colon-separated table in the image (never following a symlink out of it)."""
    if path.is_symlink():
        raise MalformedError(f"the image's {path.name} is a symbolic link")
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    return [line.split(":") for line in text.splitlines() if line.count(":") >= 3]
