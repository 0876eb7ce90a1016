"""Backends on the session's real components, and what an attacker with the
storage (not the key) can read: the raw file, the LUN's backing file, the
RADOS objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trustplane.api.volume_location import AnyLocation, Endpoint, RbdLocation
from trustplane.api.volume_spec import BackendKind
from trustplane.control.settings import VolumeBackendSettings
from trustplane.embedded.ceph import RunningCeph
from trustplane.embedded.tgtd import RunningTgtd
from trustplane.volumes.backends import Backend, FileBackend, IscsiBackend, RbdBackend


def file_backend(directory: Path) -> FileBackend:
    return FileBackend(directory)


def iscsi_backend(tgtd: RunningTgtd, directory: Path) -> IscsiBackend:
    return IscsiBackend(
        directory, Endpoint(host="127.0.0.1", port=tgtd.port), control_port=tgtd.control_port
    )


def rbd_backend(ceph: RunningCeph) -> RbdBackend:
    client = ceph.client
    monitor = Endpoint(host=client.mon_host, port=client.mon_port)
    return RbdBackend(ceph.pool, client.user, [monitor], client.key_bytes)


def iscsi_settings(tgtd: RunningTgtd, directory: Path) -> VolumeBackendSettings:
    """The service's iSCSI backend on the session's tgtd, backing files in `directory`."""
    return VolumeBackendSettings(
        kind=BackendKind.ISCSI,
        directory=directory,
        portal=f"127.0.0.1:{tgtd.port}",
        control_port=tgtd.control_port,
    )


def rbd_settings(ceph: RunningCeph, work: Path) -> VolumeBackendSettings:
    """The service's RBD backend on the session's Ceph; the client's cephx key goes to
    WORK/ceph.key (0600), where an operator would put it."""
    key_file = work / "ceph.key"
    key_file.touch(mode=0o600)
    key_file.write_text(ceph.client.key + "\n")
    client = ceph.client
    return VolumeBackendSettings(
        kind=BackendKind.RBD,
        pool=ceph.pool,
        user=client.user,
        monitors=[f"{client.mon_host}:{client.mon_port}"],
        key_file=key_file,
    )


def config_entry(settings: VolumeBackendSettings) -> dict[str, Any]:
    """`settings` as a backend entry of server.yaml."""
    return settings.model_dump(mode="json", exclude_none=True)


def rados_objects(ceph: RunningCeph, image: str) -> dict[str, bytes]:
    """Every RADOS object of an image's data, fetched with `rados get` as the client."""
    return ceph.image_objects(image)


def raw_holds(
    backend: Backend, location: AnyLocation, needle: bytes, ceph: RunningCeph | None = None
) -> bool:
    """True when the storage itself (what the storage's admin reads) holds `needle`."""
    if isinstance(backend, FileBackend):
        return needle in Path(location.path).read_bytes()  # type: ignore[union-attr]
    if isinstance(backend, IscsiBackend):
        return needle in backend.backing_file(location).read_bytes()
    assert ceph is not None
    assert isinstance(location, RbdLocation)
    return any(needle in data for data in rados_objects(ceph, location.image).values())


def files_holding(root: Path, needle: bytes) -> list[Path]:
    """Regular files under `root` that contain `needle` (unreadable ones skipped)."""
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                found.append(path)
        except OSError:
            continue
    return found
