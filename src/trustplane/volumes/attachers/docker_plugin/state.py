"""Which volumes the plugin has open, for which containers: kept on disk.

dockerd does not repeat `Mount` for running containers when the plugin
restarts, so a restarted plugin must know what it had open: the state file
lists each open volume, the Docker mount IDs using it, its mount point and
how it was opened (`UserspaceRecord`: pids and paths, never a key). It is
written atomically (temporary file, fsync, rename) after every change, so
a `kill -9` leaves the state before or after it, never half.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trustplane.atomic import atomic_write
from trustplane.errors import MalformedError
from trustplane.volumes.attachers.userspace import UserspaceRecord

STATE_FILE = "state.json"


class OpenRecord(BaseModel):
    """One volume open on this node."""

    model_config = ConfigDict(extra="forbid")

    name: str
    mountpoint: str
    callers: list[str] = Field(default_factory=list)
    """Docker's mount IDs, one per container mount; the volume closes when none is left."""
    opened: UserspaceRecord


class PluginState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    volumes: dict[str, OpenRecord] = Field(default_factory=dict)
    known: list[str] = Field(default_factory=list)
    """Names the control plane showed this node: while it cannot be reached, Get still
    answers for them, since dockerd drops a volume whose Get fails and would then make a
    plain `local` volume of that name for the next `docker run -v NAME:...`."""


class StateFile:
    """The plugin's state in `ROOT/state.json` (0600)."""

    def __init__(self, root: Path) -> None:
        self.path = root / STATE_FILE

    def load(self) -> PluginState:
        """The last state saved; empty when there is none."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return PluginState()
        try:
            return PluginState.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "state"
            raise MalformedError(
                f"volume plugin state {self.path}: {where}: {first.get('msg')}; "
                "refusing to guess what is open"
            ) from None

    def save(self, state: PluginState) -> None:
        atomic_write(self.path, state.model_dump_json(indent=1).encode(), mode=0o600)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def state_directory(root: Path) -> Path:
    """Create the plugin's directory (0700: it lists what is open)."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    root.chmod(0o700)
    return root
