"""The one executor for external tools (qemu-img, cryptsetup, dmsetup, ...).

Secrets reach a tool through stdin or a placeholder the runner fills in
(`SecretFile`, `SecretFd`), never argv text or the environment; every call
has a timeout; a failure is one `ToolError` naming the tool and its last
stderr line. See `executor` for the rules and `runner` for where tools run.
"""

from trustplane.tools.background import (
    AdoptedProcess,
    ToolProcess,
    is_mounted,
    mount_points,
    mounts,
    unmount,
)
from trustplane.tools.command import Command, SecretArg, SecretFd, SecretFile
from trustplane.tools.executor import Executor, ToolResult
from trustplane.tools.failure import FailureMap
from trustplane.tools.local import LocalRunner
from trustplane.tools.retry import QEMU_LUKS_PBKDF_HASH, QEMU_PBKDF_CALIBRATION, Retry
from trustplane.tools.runner import Completed, Runner, Started

__all__ = [
    "QEMU_LUKS_PBKDF_HASH",
    "QEMU_PBKDF_CALIBRATION",
    "AdoptedProcess",
    "Command",
    "Completed",
    "Executor",
    "FailureMap",
    "LocalRunner",
    "Retry",
    "Runner",
    "SecretArg",
    "SecretFd",
    "SecretFile",
    "Started",
    "ToolProcess",
    "ToolResult",
    "is_mounted",
    "mount_points",
    "mounts",
    "unmount",
]
