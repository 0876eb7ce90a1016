"""Which backend a store uses: by the host's capability, or by configuration.

- `qcow2` works on any Linux with FUSE and loop devices;
- `dm` needs device-mapper with the crypt, thin-pool, snapshot and zero
  targets (`devicemapper.device_mapper_problem`) and a block device for
  its thin pool, which only the operator can give;
- `auto` (the default) takes `dm` when the host can run it and a pool
  device is configured, `qcow2` otherwise.

A store keeps the backend it was made with: once it holds layers, opening
it again picks that backend whatever `auto` would choose, and asking for
the other one is refused (its layers would be unreachable).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trustplane.errors import UnsupportedError, UsageError
from trustplane.layerstore.backend import LayerBackend
from trustplane.layerstore.devicemapper import DeviceMapperBackend, device_mapper_problem
from trustplane.layerstore.devices import DeviceAccess
from trustplane.layerstore.qcow2 import Qcow2Backend
from trustplane.tools import Executor

KINDS = ("auto", "qcow2", "dm")


@dataclass(frozen=True)
class BackendConfig:
    kind: str = "auto"
    pool: str | None = None
    """The dm backend's thin-pool device (needed the first time only)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UsageError(
                f"unknown layer-store backend {self.kind!r} (one of {', '.join(KINDS)})"
            )


@dataclass(frozen=True)
class Choice:
    kind: str
    why: str


def existing_backend(root: Path) -> str | None:
    """The backend whose layers the store at `root` holds, if any."""
    if (root / "dm" / "pool.json").is_file():
        return "dm"
    layers = root / "qcow2" / "layers"
    if layers.is_dir() and any(layers.iterdir()):
        return "qcow2"
    return None


def choose(config: BackendConfig, executor: Executor) -> Choice:
    """What `config` means on the host `executor` runs on (a new store)."""
    if config.kind == "qcow2":
        return Choice("qcow2", "configured")
    problem = device_mapper_problem(executor)
    if config.kind == "dm":
        if problem:
            raise UnsupportedError(f"the device-mapper backend cannot run here: {problem}")
        if not config.pool:
            raise UsageError("the device-mapper backend needs a pool device (--pool)")
        return Choice("dm", "configured")
    if problem:
        return Choice("qcow2", problem)
    if not config.pool:
        return Choice("qcow2", "device-mapper is there, but no pool device is configured")
    return Choice("dm", "device-mapper has the crypt, thin-pool, snapshot and zero targets")


def open_backend(
    root: Path,
    config: BackendConfig | None = None,
    executor: Executor | None = None,
    *,
    dm_executor: Executor | None = None,
    devices: DeviceAccess | None = None,
) -> LayerBackend:
    """The store's backend under `root` (`root/qcow2` or `root/dm`).

    `dm_executor` and `devices` are where device-mapper runs and how its
    devices reach this process: this host unless given (the tests give the
    QEMU guest's).
    """
    config = config or BackendConfig()
    executor = executor or Executor()
    found = existing_backend(root)
    if found is not None and config.kind not in ("auto", found):
        raise UsageError(
            f"{root} holds {found} layers; it cannot be opened as a {config.kind} store"
        )
    kind = found or choose(config, dm_executor or executor).kind
    if kind == "dm":
        return DeviceMapperBackend(
            root / "dm",
            executor,
            pool_device=config.pool,
            dm_executor=dm_executor,
            devices=devices,
        )
    return Qcow2Backend(root / "qcow2", executor)
