"""Volumes as logical volumes in one volume group (hosts with device-mapper).

`lvcreate` zeroes the start of each new LV (`--zero y`) and wipes old
signatures, so a volume never inherits the LUKS header of a volume that
used the same extents before. Commands run through the executor: on a
production host locally, in the tests inside the device-mapper guest.
"""

from __future__ import annotations

from typing import ClassVar

from trustplane.api.volume_location import AnyLocation, LvmLocation, check_name
from trustplane.api.volume_spec import BackendKind
from trustplane.errors import UsageError
from trustplane.tools import Executor
from trustplane.volumes.access import DeviceRawReader
from trustplane.volumes.backends.base import Backend
from trustplane.volumes.header import RawReader


class LvmBackend(Backend):
    kind: ClassVar[BackendKind] = BackendKind.LVM

    def __init__(self, volume_group: str, executor: Executor | None = None) -> None:
        super().__init__(executor)
        try:
            self.vg = check_name(volume_group, "volume group")
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def location(self, name: str) -> LvmLocation:
        return LvmLocation(vg=self.vg, lv=self.check_name(name))

    def _names(self) -> set[str]:
        out = self.executor.run(["lvs", "--noheadings", "-o", "lv_name", self.vg], timeout=60)
        return set(out.text.split())

    def exists(self, name: str) -> bool:
        return self.check_name(name) in self._names()

    def create(self, name: str, size: int) -> LvmLocation:
        self.check_size(size)
        if self.exists(name):
            raise UsageError(f"lvm volume {name} exists already")
        self.executor.run(
            [
                "lvcreate", "--yes", "--zero", "y", "--wipesignatures", "y",
                "--name", name, "--size", f"{size}b", self.vg,
            ],
            timeout=120,
        )  # fmt: skip
        return self.location(name)

    def delete(self, location: AnyLocation) -> None:
        lv = _lv(location)
        if lv.lv in self._names():
            self.executor.run(["lvremove", "--yes", f"{lv.vg}/{lv.lv}"], timeout=120)

    def size(self, location: AnyLocation) -> int:
        lv = _lv(location)
        out = self.executor.run(
            ["lvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "lv_size",
             f"{lv.vg}/{lv.lv}"],
            timeout=60,
        )  # fmt: skip
        return int(out.text.strip())

    def grow(self, location: AnyLocation, size: int) -> None:
        """`lvextend` to at least `size` bytes: LVM rounds up to whole extents (a volume
        group with 1 MiB extents gives every MiB size exactly)."""
        self.check_size(size)
        lv = _lv(location)
        if self.size(lv) >= size:
            return
        self.executor.run(
            ["lvextend", "--yes", "--size", f"{size}b", f"{lv.vg}/{lv.lv}"], timeout=120
        )

    def reader(self, location: AnyLocation) -> RawReader:
        return DeviceRawReader(self.executor, _lv(location).device)


def _lv(location: AnyLocation) -> LvmLocation:
    if not isinstance(location, LvmLocation):
        raise UsageError(f"{location.describe()} is not a logical volume")
    return location
