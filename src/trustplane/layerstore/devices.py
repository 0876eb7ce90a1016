"""How the store's process reaches a block device that the device-mapper executor made.

On a host with device-mapper both are this host: the device is
`/dev/mapper/NAME` and the store makes its file system on it and mounts it
(`LocalDevices`, which hands the path back unchanged). In the tests the
device-mapper commands run in a QEMU guest, and the guest's device is
exported to this host as a loop device (embedded/guest_export.py); nothing
else in the driver differs.

Whatever an opened device holds lives under the lease directory it is given
or is written into that lease's state, so `recover(lease)` can undo it
after its owner died.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

from trustplane.layerstore.leases import Lease


class OpenedDevice(Protocol):
    path: str
    """The device as the store's process opens it (mkfs, mount)."""

    def close(self) -> None:
        """Release it; nothing may be mounted on `path` any more. Idempotent."""


class DeviceAccess(ABC):
    @abstractmethod
    def open(self, device: str, *, writable: bool, lease: Lease) -> OpenedDevice:
        """`device` (a path where the device-mapper executor runs) for this process."""

    @abstractmethod
    def recover(self, lease: Lease) -> list[str]:
        """Undo what an `open` under a dead owner's `lease` left; one line per thing."""


class _Same:
    def __init__(self, path: str) -> None:
        self.path = path

    def close(self) -> None:
        return None


class LocalDevices(DeviceAccess):
    """The device-mapper executor runs on this host: a device is used where it is."""

    def open(self, device: str, *, writable: bool, lease: Lease) -> OpenedDevice:
        return _Same(device)

    def recover(self, lease: Lease) -> list[str]:
        return []
