"""Both layer-store backends under one test: the same behaviour, each where it runs.

- `qcow2` runs on this host (qemu-img, qemu-storage-daemon, FUSE, loop);
- `dm` runs its real dmsetup sequences in the device-mapper test guest
  (the session fixture `dm_guest`), its thin pool on one of the guest's
  virtio disks, and its top devices reach this host as loop devices over
  NBD (embedded/guest_export.py). The file-system work (mkfs, mount, the
  applier, runc) runs here for both, as on a production host.

`Backend` is what a test needs beyond the interface: the raw bytes at
rest as an attacker with the disk reads them (the qcow2 files; for dm the
guest's virtio disk image, read from this host), what was left behind on
both sides, and a spec that a child process turns back into the same
backend (`backend_from_spec`, for the tests that kill a process).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from store_checks import leftovers

from trustplane.embedded.dm_guest import DmGuest, GuestLink, connect_guest
from trustplane.layerstore.backend import LayerBackend
from trustplane.layerstore.devicemapper import DeviceMapperBackend
from trustplane.layerstore.qcow2 import Qcow2Backend
from trustplane.tools import Executor

KINDS = ["qcow2", "dm"]


@dataclass
class Backend:
    kind: str
    backend: LayerBackend
    store_root: Path
    """The store directory the backend's root lies in (`store_root/qcow2` or `/dm`)."""
    guest: DmGuest | None = None
    disk_image: Path | None = None
    spec: dict[str, Any] = field(default_factory=dict)

    def raw_files(self) -> list[Path]:
        """Where the layers' bytes lie at rest, as files on this host."""
        if self.kind == "dm":
            assert self.disk_image is not None
            return [self.disk_image]
        return sorted(
            path for info in self.backend.layers() for path in self.backend.raw_paths(info.layer)
        )

    def layer_names(self) -> list[str]:
        return sorted(info.layer for info in self.backend.layers())

    def leftovers(self) -> list[str]:
        """Mounts, loop devices and daemons under the store on this host; for dm also
        device-mapper devices of the store (its pool aside) and NBD servers in the guest."""
        found = leftovers(os.fspath(self.store_root) + "/")
        if self.guest is not None:
            assert isinstance(self.backend, DeviceMapperBackend)
            pool = {"pool", "data", "meta"}
            found += [
                f"dm device {name}"
                for name in self.backend.device_names()
                if name.rsplit("-", 1)[-1] not in pool
            ]
            processes = self.guest.executor.run(["ps", "-o", "args"]).text.splitlines()
            found += [f"guest process {p}" for p in processes if p.startswith("/usr/sbin/qemu-nbd")]
        return found

    def spec_json(self) -> str:
        return json.dumps(self.spec)

    def reopen(self) -> LayerBackend:
        """A new backend object over the same root (a restarted process)."""
        if self.kind == "qcow2":
            return Qcow2Backend(self.backend.root, Executor(timeout=120))
        assert self.guest is not None
        return DeviceMapperBackend(
            self.backend.root,
            Executor(timeout=120),
            dm_executor=self.guest.executor,
            devices=self.guest.block_export(),
        )


def backend_from_spec(spec_json: str) -> LayerBackend:
    """The backend a parent test described, opened in this (child) process."""
    spec = json.loads(spec_json)
    root = Path(spec["root"])
    if spec["kind"] == "qcow2":
        return Qcow2Backend(root / "qcow2")
    guest, devices = connect_guest(GuestLink.from_json(spec["guest"]))
    return DeviceMapperBackend(
        root / "dm", Executor(), pool_device=spec["pool"], dm_executor=guest, devices=devices
    )


@contextlib.contextmanager
def backend_of(kind: str, store_root: Path, request: pytest.FixtureRequest) -> Iterator[Backend]:
    """A fresh backend of `kind` for a store at `store_root`; at the end, nothing of it
    may be left (checked), and for dm its pool is taken down and its disk returned."""
    if kind == "qcow2":
        yield Backend(
            kind,
            Qcow2Backend(store_root / "qcow2", Executor(timeout=120)),
            store_root,
            spec={"kind": kind, "root": os.fspath(store_root)},
        )
        return
    guest: DmGuest = request.getfixturevalue("dm_guest")
    with guest.scratch_disk() as disk:
        backend = DeviceMapperBackend(
            store_root / "dm",
            Executor(timeout=120),
            pool_device=disk.device,
            dm_executor=guest.executor,
            devices=guest.block_export(),
        )
        under_test = Backend(
            kind,
            backend,
            store_root,
            guest,
            disk.path,
            {
                "kind": kind,
                "root": os.fspath(store_root),
                "pool": disk.device,
                "guest": guest.link.to_json(),
            },
        )
        try:
            yield under_test
        finally:
            left = under_test.leftovers()
            with contextlib.suppress(Exception):
                backend.recover()
            backend.deactivate()
            assert left == [], f"the dm backend left {left}"


def data_extents(path: Path, chunk: int = 8 << 20) -> Iterator[tuple[int, bytes]]:
    """The file's data (a sparse disk image's allocated extents), in overlapping pieces."""
    with path.open("rb") as handle:
        fd = handle.fileno()
        end = os.fstat(fd).st_size
        offset = 0
        while offset < end:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after offset
                return
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            position = start
            while position < stop:
                handle.seek(max(start, position - 4096))  # overlap: no marker is cut in two
                data = handle.read(min(chunk, stop - position) + 4096)
                yield position, data
                position += chunk
            offset = stop
