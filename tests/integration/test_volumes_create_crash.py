"""`kill -9` of a real server in the middle of a volume create; the restart settles it.

The server is `trustplane server` (a subprocess) with a file backend. A
create is asked over HTTP; as soon as the server's database shows the
record `creating` with its storage recorded (the key ordered, the file made,
qemu-img formatting it), the server process gets SIGKILL (frozen first, and
killed only if it still is so once its qemu-img has ended: kill_helpers). The
restarted server settles it at start by itself: no key of the volume in the
KMS, no file, no record, and the log says "create finished after a crash". A
file of another name that the service refused to format (it existed) survives.

The same settling in-process on an iSCSI LUN (tgtd) and an RBD image (Ceph;
QEMU makes the image while it formats it): a create stopped after its
storage was made, and after its format (SimulatedCrash, nothing undone).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import start_control_plane_or_fail
from control_helpers import wait_for_entry
from durability_helpers import write_server_config
from kill_helpers import freeze, live_children, thaw
from volume_helpers import iscsi_backend, iscsi_settings, rbd_backend, rbd_settings

from trustplane.api.volumes import NewVolume, NewVolumeType
from trustplane.client import ControlClient
from trustplane.control.identity import Principal
from trustplane.control.service import build
from trustplane.control.settings import ServerSettings, VolumeBackendSettings
from trustplane.control.volumes import SimulatedCrash
from trustplane.embedded.ceph import RunningCeph
from trustplane.embedded.control_plane import RunningControlPlane, start_control_plane
from trustplane.embedded.tgtd import RunningTgtd
from trustplane.errors import NotFoundError, TrustplaneError, UsageError

MIB = 1 << 20
ADMIN = Principal("user", "admin", "admin", frozenset())
ALICE = Principal("user", "alice", "user", frozenset())
TRIES = 20
FOREIGN = b"someone else's data".ljust(MIB, b"\0")


@dataclass
class Site:
    work: Path
    volumes: Path
    plane: RunningControlPlane
    password: str


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    volumes = tmp_path / "volumes"
    write_server_config(
        tmp_path / "data",
        volume_backends={"files": {"kind": "file", "directory": str(volumes)}},
    )
    plane = start_control_plane_or_fail(tmp_path, data_dir=tmp_path / "data")
    password = secrets.token_urlsafe(12)
    with plane.admin() as admin:
        admin.create_volume_type("secure", "files")
        admin.create_user("alice", "user", password)
    current = Site(tmp_path, volumes, plane, password)
    try:
        yield current
    finally:
        current.plane.stop()


def _row(data_dir: Path, name: str) -> tuple[str, str | None, str | None] | None:
    """(state, key_id, location) of the volume's record as the server committed it."""
    with contextlib.closing(sqlite3.connect(data_dir / "trustplane.db", timeout=30)) as db:
        row = db.execute(
            "SELECT state, key_id, location FROM volumes WHERE name = ?", (name,)
        ).fetchone()
    return None if row is None else (row[0], row[1], row[2])


def _keys(data_dir: Path, name: str) -> int:
    with contextlib.closing(sqlite3.connect(data_dir / "trustplane.db", timeout=30)) as db:
        row = db.execute("SELECT count(*) FROM secrets WHERE name = ?", (f"volume:{name}",))
        return int(row.fetchone()[0])


def _killable(site: Site, name: str) -> tuple[str, str | None, str | None] | None:
    """The record, when it is `creating` with its storage recorded and the file there."""
    row = _row(site.plane.data_dir, name)
    # The file too: a PBKDF calibration that fails under load makes QEMU delete
    # it, and the retry makes it again (backends/file.py, before_format_retry).
    made = (site.volumes / f"{name}.img").exists()
    if row is not None and row[0] == "creating" and row[2] is not None and made:
        return row
    return None


def _kill_mid_create(site: Site) -> tuple[str, str]:
    """Create volumes until one is caught `creating` with its storage made; SIGKILL
    the server right then. The name caught and its recorded key's UUID.

    Seen, the server is frozen and looked at again (it may have gone on since):
    SIGKILL only if it is still so once its `qemu-img` (if any) has ended (it runs
    in a session of its own: the kill would not stop it, and a failed try of it
    deletes the file), else it goes on."""
    plane = site.plane
    pid = plane.process.pid
    assert pid is not None
    for attempt in range(TRIES):
        name = f"v{attempt}"
        done = threading.Event()

        def create(volume: str = name, finished: threading.Event = done) -> None:
            with (
                ControlClient(plane.url, plane.ca_file) as client,
                contextlib.suppress(TrustplaneError),  # the server may be killed under it
            ):
                client.login("alice", site.password)
                client.create_volume(volume, 8 * MIB, "secure")
            finished.set()

        worker = threading.Thread(target=create, daemon=True)
        worker.start()
        while not done.is_set():
            if _killable(site, name) is not None:
                freeze(pid, plane.data_dir / "trustplane.db")
                deadline = time.monotonic() + 60
                while live_children(pid):
                    assert time.monotonic() < deadline, "the server's qemu-img never ended"
                    time.sleep(0.005)
                row = _killable(site, name)
                if row is not None:
                    os.kill(pid, signal.SIGKILL)
                    worker.join(60)
                    plane.process.stop()  # reaps it; it is dead already
                    assert plane.process.returncode() == -signal.SIGKILL
                    assert row[1] is not None
                    return name, row[1]
                thaw(pid)
            time.sleep(0.005)
        worker.join(60)
    pytest.fail(f"no create of {TRIES} was caught between its storage and its end")


def test_kill_9_mid_create_then_the_restart_settles_it(site: Site) -> None:
    (site.volumes / "theirs.img").parent.mkdir(parents=True, exist_ok=True)
    (site.volumes / "theirs.img").write_bytes(FOREIGN)
    with site.plane.client() as alice:
        alice.login("alice", site.password)
        with pytest.raises(UsageError, match="exists already"):
            alice.create_volume("theirs", 8 * MIB, "secure")
        start = alice.health().log_size
    name, key_id = _kill_mid_create(site)
    data_dir = site.plane.data_dir
    # What the dead server left: the record `creating`, its key, its file.
    left = _row(data_dir, name)
    assert left is not None
    assert left[0] == "creating"
    assert _keys(data_dir, name) == 1
    raw = site.volumes / f"{name}.img"
    assert raw.exists()
    site.plane = plane = start_control_plane(
        site.work, data_dir=data_dir, admin_password=site.plane.admin_password
    )
    # Settled at start by itself (a task beside the first requests): no request asks.
    # Waited for by its log entry, which comes after the record is gone.
    with plane.admin() as admin:
        logged = wait_for_entry(
            admin, start, lambda e: e["kind"] == "volume.create.failed" and e.get("volume") == name
        )
        with pytest.raises(NotFoundError):
            admin.volume(name)
        with pytest.raises(NotFoundError):
            admin.secret(key_id)
    assert _row(data_dir, name) is None
    assert _keys(data_dir, name) == 0
    assert not raw.exists()
    assert (site.volumes / "theirs.img").read_bytes() == FOREIGN
    entries = [e for e in logged if e.get("volume") == name]
    settled = [e for e in entries if e["kind"] == "volume.create.failed"]
    assert len(settled) == 1
    assert settled[0]["reason"] == "create finished after a crash"
    assert settled[0]["storage_left"] is None
    assert [e["kind"] for e in entries if e["kind"] == "volume.destroyed"] == ["volume.destroyed"]
    assert "volume.create" not in [e["kind"] for e in entries]
    # The name is free again.
    with plane.client() as alice:
        alice.login("alice", site.password)
        assert alice.create_volume(name, 8 * MIB, "secure").state == "available"


def _backend_settings(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> tuple[VolumeBackendSettings, Callable[[str], bool]]:
    """The server's settings for an iSCSI or RBD backend, and whether storage `name` exists."""
    if kind == "iscsi":
        tgtd: RunningTgtd = request.getfixturevalue("tgtd")
        luns = tmp_path / "luns"
        return iscsi_settings(tgtd, luns), iscsi_backend(tgtd, luns).exists
    ceph: RunningCeph = request.getfixturevalue("ceph")
    settings = rbd_settings(ceph, tmp_path)
    return settings, rbd_backend(ceph).exists


@pytest.mark.parametrize("at", ["storage", "formatted"])
@pytest.mark.parametrize("kind", ["iscsi", "rbd"])
def test_a_create_stopped_on_a_lun_or_an_rbd_image_is_settled_at_the_next_start(
    tmp_path: Path, request: pytest.FixtureRequest, kind: str, at: str
) -> None:
    backend, exists = _backend_settings(kind, tmp_path, request)
    settings = ServerSettings(data_dir=tmp_path / "data", volume_backends={"b": backend})
    name = f"cc-{at}-{secrets.token_hex(3)}"
    first = build(settings, announce=False)
    try:
        first.volumes.create_type(ADMIN, NewVolumeType(name="t", backend="b"))

        def crash(step: str, volume: str) -> None:
            if step == at:
                raise SimulatedCrash(volume)

        first.volumes.creates.at_step = crash
        with pytest.raises(SimulatedCrash):
            first.volumes.create(ALICE, NewVolume(name=name, size=8 * MIB, volume_type="t"))
        assert first.volumes.show(ADMIN, name).state == "creating"
        key_id = first.volumes.show(ADMIN, name).key_id
        assert key_id is not None
    finally:
        first.close()
    assert exists(name)
    second = build(settings, announce=False)
    try:
        assert second.volumes.recover() == 1
        assert not exists(name)
        assert second.store.rows.get(key_id) is None
        with pytest.raises(NotFoundError):
            second.volumes.show(ADMIN, name)
    finally:
        second.close()
