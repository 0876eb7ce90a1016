"""A create a crash interrupted is settled at the next start (control/volume_create_recovery.py).

In-process, real SQLite, real KMS store, real file volumes formatted by
qemu-img: the create 'dies' (SimulatedCrash, nothing undone) after each of
its steps; a second server on the same data directory then settles it at
start: no key of the volume left in the store, no storage, no record, and
the log says so. Storage of the same name that the create did not make
survives (its data intact). With replicas possible (PostgreSQL), a young
`creating` record is left alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from plane_helpers import entries_since
from sqlalchemy import select, update

from trustplane.api.volume_spec import BackendKind
from trustplane.api.volumes import NewVolume, NewVolumeType
from trustplane.control.identity import Principal
from trustplane.control.models import Secret, Volume
from trustplane.control.service import ControlPlane, build
from trustplane.control.settings import ServerSettings, VolumeBackendSettings
from trustplane.control.volume_create_recovery import MAX_CREATE_AGE, REASON
from trustplane.control.volumes import SimulatedCrash
from trustplane.errors import NotFoundError, UsageError
from trustplane.volumes.header import LUKS_MAGIC

MIB = 1 << 20
ADMIN = Principal("user", "admin", "admin", frozenset())
ALICE = Principal("user", "alice", "user", frozenset())
STEPS = ["record", "key", "key-recorded", "storage", "formatted"]
FOREIGN = b"someone else's data".ljust(MIB, b"\0")


def _settings(tmp_path: Path) -> ServerSettings:
    backend = VolumeBackendSettings(kind=BackendKind.FILE, directory=tmp_path / "volumes")
    return ServerSettings(data_dir=tmp_path / "data", volume_backends={"files": backend})


@pytest.fixture
def first(tmp_path: Path) -> Iterator[ControlPlane]:
    plane = build(_settings(tmp_path), announce=False)
    plane.volumes.create_type(ADMIN, NewVolumeType(name="secure", backend="files"))
    yield plane
    plane.close()


def _crash_create(plane: ControlPlane, at: str, name: str = "data") -> None:
    def crash(step: str, volume: str) -> None:
        if step == at:
            raise SimulatedCrash(f"{volume}: {step}")

    plane.volumes.creates.at_step = crash
    with pytest.raises(SimulatedCrash):
        plane.volumes.create(ALICE, NewVolume(name=name, size=8 * MIB, volume_type="secure"))
    plane.volumes.creates.at_step = None
    assert plane.volumes.show(ADMIN, name).state == "creating"


def _keys(plane: ControlPlane, name: str = "data") -> list[str]:
    with plane.db.session() as session:
        return list(session.scalars(select(Secret.id).where(Secret.name == f"volume:{name}")))


def _restart(first: ControlPlane, tmp_path: Path) -> ControlPlane:
    first.close()
    return build(_settings(tmp_path), announce=False)


@pytest.mark.parametrize("at", STEPS)
def test_a_create_crashed_after_each_step_is_settled_at_the_next_start(
    first: ControlPlane, tmp_path: Path, at: str
) -> None:
    raw = tmp_path / "volumes" / "data.img"
    _crash_create(first, at)
    keys = _keys(first)
    assert len(keys) == (0 if at == "record" else 1)  # "key": ordered, its UUID not recorded
    assert raw.exists() == (at in ("storage", "formatted"))
    if at == "formatted":
        assert raw.read_bytes()[:6] == LUKS_MAGIC
    second = _restart(first, tmp_path)
    try:
        start, _ = second.log.head()
        assert second.volumes.recover() == 1
        assert _keys(second) == []
        for key_id in keys:
            assert second.store.rows.get(key_id) is None
        assert not raw.exists()
        with pytest.raises(NotFoundError):
            second.volumes.show(ADMIN, "data")
        entries = entries_since(second, start)
        kinds = [e["kind"] for e in entries]
        assert kinds == ["kms.delete"] * len(keys) + ["volume.destroyed", "volume.create.failed"]
        assert entries[-1]["reason"] == REASON == "create finished after a crash"
        assert entries[-1]["storage_left"] is None
        # The name is free again: a new create of it works.
        info = second.volumes.create(
            ALICE, NewVolume(name="data", size=8 * MIB, volume_type="secure")
        )
        assert info.state == "available"
        assert second.volumes.recover() == 0  # nothing else to settle
    finally:
        second.close()


def test_storage_of_the_same_name_that_the_create_did_not_make_survives(
    first: ControlPlane, tmp_path: Path
) -> None:
    """The create checked the name was free, then crashed before making storage;
    meanwhile storage of that name appeared (made by someone else): it is not
    the record's, so the settling leaves it (and says so), and so does a delete."""
    raw = tmp_path / "volumes" / "data.img"
    _crash_create(first, "key-recorded")
    raw.write_bytes(FOREIGN)
    _crash_create(first, "key-recorded", "other")
    (tmp_path / "volumes" / "other.img").write_bytes(FOREIGN)
    # `volume delete` of such a record shreds the key and keeps the storage too.
    first.volumes.delete(ALICE, "other")
    assert (tmp_path / "volumes" / "other.img").read_bytes() == FOREIGN
    second = _restart(first, tmp_path)
    try:
        start, _ = second.log.head()
        assert second.volumes.recover() == 1
        assert raw.read_bytes() == FOREIGN
        assert _keys(second) == []
        with pytest.raises(NotFoundError):
            second.volumes.show(ADMIN, "data")
        last = entries_since(second, start)[-1]
        assert last["kind"] == "volume.create.failed"
        assert str(raw) in last["storage_left"]
    finally:
        second.close()


def test_with_replicas_possible_only_an_old_creating_record_is_settled(
    first: ControlPlane, tmp_path: Path
) -> None:
    """PostgreSQL: another replica may be running a young create; it is left
    (its key and storage too) until it is older than any create can run."""
    _crash_create(first, "formatted")
    raw = tmp_path / "volumes" / "data.img"
    second = _restart(first, tmp_path)
    try:
        second.volumes.creates.single_server = False  # as on PostgreSQL
        assert second.volumes.recover() == 0
        assert second.volumes.show(ADMIN, "data").state == "creating"
        assert raw.exists()
        assert len(_keys(second)) == 1
        old = datetime.now(UTC) - MAX_CREATE_AGE - timedelta(minutes=1)
        with second.db.session() as session:
            session.execute(update(Volume).where(Volume.name == "data").values(created=old))
        assert second.volumes.recover() == 1
        assert not raw.exists()
        assert _keys(second) == []
    finally:
        second.close()


def test_a_create_made_since_this_server_started_is_its_own_and_left(
    first: ControlPlane, tmp_path: Path
) -> None:
    """`recover` runs beside the first requests: a `creating` record this process
    made is a create it runs (here: one stopped by the test), never settled."""
    _crash_create(first, "formatted")
    assert first.volumes.recover() == 0
    assert first.volumes.show(ADMIN, "data").state == "creating"
    assert (tmp_path / "volumes" / "data.img").exists()
    assert len(_keys(first)) == 1


def test_a_record_deleted_while_its_storage_is_made_leaves_no_storage(
    first: ControlPlane, tmp_path: Path
) -> None:
    """`volume delete` of the `creating` record right before the storage is made: the
    create cannot record the storage it then makes, so it removes it and fails at once
    (a crash right after the storage was made would leave it to nobody otherwise)."""

    def delete_record(step: str, volume: str) -> None:
        if step == "key-recorded":
            first.volumes.delete(ALICE, volume)
        if step == "storage":
            raise SimulatedCrash(f"{volume}: {step}")

    first.volumes.creates.at_step = delete_record
    with pytest.raises(UsageError, match="volume data was deleted while it was being created"):
        first.volumes.create(ALICE, NewVolume(name="data", size=8 * MIB, volume_type="secure"))
    first.volumes.creates.at_step = None
    assert not (tmp_path / "volumes" / "data.img").exists()
    assert list((tmp_path / "volumes").iterdir()) == []
    assert _keys(first) == []
    with pytest.raises(NotFoundError):
        first.volumes.show(ADMIN, "data")
