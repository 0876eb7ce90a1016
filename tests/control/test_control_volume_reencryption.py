"""Re-encryption in-process: the data under a new master key, crash at each step, refusals.

Real SQLite, real file KEK, real policy and log, real file volumes formatted
by qemu-img and copied by qemu-storage-daemon (FUSE exports); only HTTP is
left out. The REAL `kill -9` of a server mid-copy is in
tests/integration/test_volumes_reencrypt.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from plane_helpers import entries_since, set_policy
from sqlalchemy import select

from trustplane.api.volume_location import FileLocation, LvmLocation, dump_location
from trustplane.api.volume_spec import BackendKind, EncryptionSpec, VolumeTypeSpec
from trustplane.api.volumes import NewVolume, NewVolumeType
from trustplane.control.identity import Principal
from trustplane.control.models import Secret, Volume, VolumeOperation, VolumeType
from trustplane.control.policy import DEFAULT_POLICY
from trustplane.control.service import ControlPlane, build
from trustplane.control.settings import ServerSettings, VolumeBackendSettings
from trustplane.control.volumes import SimulatedCrash
from trustplane.errors import (
    DecryptionKeyError,
    Forbidden,
    IntegrityError,
    NotFoundError,
    UnsupportedError,
    UsageError,
)
from trustplane.tools import Executor
from trustplane.tools.command import Arg
from trustplane.volumes.attachers.userspace import KEY_OBJECT, key_object
from trustplane.volumes.backends import FileBackend
from trustplane.volumes.encryptors import QemuLuksEncryptor
from trustplane.volumes.encryptors.base import passphrase
from trustplane.volumes.transport_key import NodeTransport

MIB = 1 << 20
SIZE_MIB = 8
ADMIN = Principal("user", "admin", "admin", frozenset())
ALICE = Principal("user", "alice", "user", frozenset())
BOB = Principal("user", "bob", "user", frozenset())
COMPUTE = Principal("node", "compute-1", "node", frozenset())
TRANSPORT = NodeTransport.ephemeral()
"""The node's transport key pair: a node's volume key comes wrapped to it."""
NODE_RULE = """\
  - subjects: ["node:compute-1"]
    actions: [volume.attach]
    resources: ["volume:*"]
"""
EXECUTOR = Executor()


def _settings(data: Path, volumes: Path) -> ServerSettings:
    backends = {
        "files": VolumeBackendSettings(kind=BackendKind.FILE, directory=volumes),
        "lvm": VolumeBackendSettings(kind=BackendKind.LVM, volume_group="vg0"),
    }
    return ServerSettings(data_dir=data, volume_backends=backends)


@pytest.fixture
def volumes_dir(tmp_path: Path) -> Path:
    return tmp_path / "volumes"


def _start(settings: ServerSettings, first: bool) -> ControlPlane:
    plane = build(settings, announce=False)
    if first:
        set_policy(plane, DEFAULT_POLICY + NODE_RULE)
        plane.volumes.create_type(ADMIN, NewVolumeType(name="secure", backend="files"))
    plane.volumes.reencryption.chunk = MIB
    return plane


@pytest.fixture
def plane(tmp_path: Path, volumes_dir: Path) -> Iterator[ControlPlane]:
    built = _start(_settings(tmp_path / "data", volumes_dir), True)
    yield built
    built.close()


def _key(plane: ControlPlane, key_id: str) -> bytes:
    record = plane.store.find(key_id)
    assert record is not None
    return plane.store.unseal(record)


def _qemu_io(path: Path, key: bytes, *commands: str) -> str:
    argv: list[Arg] = ["qemu-io", "--object", key_object(passphrase(key)), "--image-opts"]
    argv.append(f"driver=luks,key-secret={KEY_OBJECT},file.driver=file,file.filename={path}")
    for command in commands:
        argv += ["-c", command]
    return EXECUTOR.run(argv).text


def _pattern(mib: int) -> str:
    """A different byte in each MiB, so a chunk copied to the wrong place shows."""
    return f"0x{(mib * 37 + 11) % 256:02x}"


def _write_pattern(path: Path, key: bytes) -> None:
    _qemu_io(path, key, *(f"write -P {_pattern(i)} {i}M 1M" for i in range(SIZE_MIB)))


def _holds_pattern(path: Path, key: bytes) -> bool:
    out = _qemu_io(path, key, *(f"read -P {_pattern(i)} {i}M 1M" for i in range(SIZE_MIB)))
    return "Pattern verification failed" not in out and out.count("read 1048576/") == SIZE_MIB


def _opens(path: Path, key: bytes) -> bool:
    try:
        QemuLuksEncryptor().check_key(FileLocation(path=str(path)), key)
    except DecryptionKeyError:
        return False
    return True


def _create(plane: ControlPlane, volumes_dir: Path) -> tuple[str, bytes, Path]:
    info = plane.volumes.create(
        ALICE, NewVolume(name="data", size=SIZE_MIB * MIB, volume_type="secure")
    )
    assert info.key_id is not None
    key = _key(plane, info.key_id)
    raw = volumes_dir / "data.img"
    _write_pattern(raw, key)
    return info.key_id, key, raw


def _volume_keys(plane: ControlPlane) -> set[str]:
    with plane.db.session() as session:
        return set(session.scalars(select(Secret.id).where(Secret.name == "volume:data")))


def _operation(plane: ControlPlane) -> VolumeOperation | None:
    with plane.db.session() as session:
        return session.scalar(select(VolumeOperation))


def _path(plane: ControlPlane) -> Path:
    location = plane.volumes.show(ALICE, "data").location
    assert isinstance(location, FileLocation)
    return Path(location.path)


def test_reencryption_puts_the_data_under_a_new_key_and_destroys_the_old_storage_and_key(
    plane: ControlPlane, volumes_dir: Path
) -> None:
    old_id, old_key, old_raw = _create(plane, volumes_dir)
    before = plane.volumes.show(ALICE, "data")
    assert before.header is not None
    start, _ = plane.log.head()
    after = plane.volumes.reencryption.start(ALICE, "data")
    assert after.state == "available"
    new_id = after.key_id
    assert new_id is not None
    assert new_id != old_id
    new_raw = _path(plane)
    assert new_raw != old_raw
    new_key = _key(plane, new_id)
    # Every byte is there under the new key; the old key opens nothing of it.
    assert _holds_pattern(new_raw, new_key)
    assert _opens(new_raw, new_key)
    assert not _opens(new_raw, old_key)
    # A new LUKS header (a new master key), recorded: verify and attach accept it.
    assert after.header is not None
    assert after.header.uuid != before.header.uuid
    assert plane.volumes.verify(ALICE, "data").passed
    # The old storage and the old KMS secret are gone; only the new key is left.
    assert not old_raw.exists()
    assert plane.store.rows.get(old_id) is None
    assert _volume_keys(plane) == {new_id}
    assert _operation(plane) is None
    entries = entries_since(plane, start)
    assert [(e["kind"], e.get("stage")) for e in entries] == [
        ("volume.reencrypt", "start"),
        ("kms.order", None),
        ("kms.delete", None),
        ("volume.reencrypt", "finish"),
        ("volume.verify", None),
    ]
    assert entries[2]["secret"] == old_id
    assert (entries[3]["from"], entries[3]["to"]) == (old_id, new_id)
    # It is a volume like any other: attached by the policy with the new key; a second
    # re-encryption works from there.
    released = plane.volumes.release(COMPUTE, "data", "vm-1", TRANSPORT.public_pem)
    assert TRANSPORT.open(released) == new_key
    plane.volumes.detach(COMPUTE, "data", "vm-1")
    again = plane.volumes.reencryption.start(ALICE, "data")
    assert again.key_id not in (old_id, new_id)
    assert again.key_id is not None
    assert _holds_pattern(_path(plane), _key(plane, again.key_id))
    assert not new_raw.exists()


def test_refused_while_attached_for_strangers_and_for_dm_crypt_volumes(
    plane: ControlPlane, volumes_dir: Path
) -> None:
    old_id, _, old_raw = _create(plane, volumes_dir)
    plane.volumes.release(COMPUTE, "data", "vm-1", TRANSPORT.public_pem)
    with pytest.raises(UsageError, match="detach it first"):
        plane.volumes.reencryption.start(ALICE, "data")
    plane.volumes.detach(COMPUTE, "data", "vm-1")
    # A node that may attach it may not re-encrypt it; another user does not see it.
    with pytest.raises(Forbidden, match="only the owner"):
        plane.volumes.reencryption.start(COMPUTE, "data")
    with pytest.raises(NotFoundError):
        plane.volumes.reencryption.start(BOB, "data")
    with pytest.raises(NotFoundError):
        plane.volumes.reencryption.status(BOB, "data")
    # dm-crypt (an LVM volume): needs device-mapper, refused before anything is made.
    spec = VolumeTypeSpec.model_validate({"backend": "lvm", "encryption": {}})
    with plane.db.session() as session:
        session.add(VolumeType(name="lvm", backend="lvm", spec=spec.model_dump(mode="json"),
                               creator="user:admin", created=datetime.now(UTC)))  # fmt: skip
        session.flush()
        session.add(Volume(id=str(uuid.uuid4()), name="lv1", type_name="lvm", backend="lvm",
                           size=SIZE_MIB * MIB, state="available", owner="user:alice",
                           created=datetime.now(UTC), engine="dm-crypt", key_id=old_id,
                           location=dump_location(LvmLocation(vg="vg0", lv="lv1"))))  # fmt: skip
    with pytest.raises(UnsupportedError, match="device-mapper"):
        plane.volumes.reencryption.start(ALICE, "lv1")
    # Nothing changed by any refusal.
    assert plane.volumes.show(ALICE, "data").key_id == old_id
    assert _operation(plane) is None
    assert sorted(p.name for p in volumes_dir.iterdir()) == [old_raw.name]


def test_a_failure_before_the_switch_leaves_the_volume_as_it_was(
    plane: ControlPlane, volumes_dir: Path
) -> None:
    old_id, old_key, old_raw = _create(plane, volumes_dir)
    # The storage replaced behind the service: its header is not the recorded one.
    other = volumes_dir / "other.img"
    QemuLuksEncryptor().create(
        FileBackend(volumes_dir), "other", SIZE_MIB * MIB, old_key, EncryptionSpec()
    )
    _write_pattern(other, old_key)
    other.replace(old_raw)
    start, _ = plane.log.head()
    with pytest.raises(IntegrityError):
        plane.volumes.reencryption.start(ALICE, "data")
    left = plane.volumes.show(ALICE, "data")
    assert (left.state, left.key_id) == ("available", old_id)
    assert _volume_keys(plane) == {old_id}
    assert _operation(plane) is None
    assert sorted(p.name for p in volumes_dir.iterdir()) == [old_raw.name]
    kinds = [(e["kind"], e.get("stage")) for e in entries_since(plane, start)]
    assert kinds[-2:] == [("kms.delete", None), ("volume.reencrypt", "failed")]


STEPS = ["ordered", "created", "chunk", "switched", "shredded"]


@pytest.mark.parametrize("step", STEPS)
def test_a_crash_at_each_step_is_carried_on_at_the_next_start(
    step: str, tmp_path: Path, volumes_dir: Path
) -> None:
    settings = _settings(tmp_path / "data", volumes_dir)
    first = _start(settings, True)
    chunks = 0
    try:
        old_id, old_key, old_raw = _create(first, volumes_dir)

        def crash(name: str, reached: str) -> None:
            nonlocal chunks
            chunks += reached == "chunk"
            if reached == step and (step != "chunk" or chunks == 3):
                raise SimulatedCrash(f"{name}: {reached}")

        first.volumes.reencryption.after_step = crash
        with pytest.raises(SimulatedCrash):
            first.volumes.reencryption.start(ALICE, "data")
        left = first.volumes.show(ADMIN, "data")
        assert left.state == "reencrypting"
        # Meanwhile: no attach, no delete, no passphrase rotation, no extend.
        with pytest.raises(UsageError, match="reencrypting"):
            first.volumes.release(COMPUTE, "data", "vm-1", TRANSPORT.public_pem)
        with pytest.raises(UsageError, match="re-encrypted"):
            first.volumes.delete(ALICE, "data")
        with pytest.raises(UsageError):
            first.volumes.rotate(ALICE, "data")
        op = _operation(first)
        assert op is not None
        assert op.phase == {"ordered": "creating", "created": "copying", "chunk": "copying"}.get(
            step, "destroying"
        )
        if step == "chunk":
            assert op.progress == 3 * MIB  # three chunks flushed, then the crash
        if step == "shredded":  # the old header is zeros before the old storage goes
            header = QemuLuksEncryptor().header_bytes(EncryptionSpec())
            with old_raw.open("rb") as wiped:
                assert wiped.read(header) == bytes(header)
        # Before the switch the record still names the old key and storage.
        assert (left.key_id == old_id) is (step in ("ordered", "created", "chunk"))
        new_id = op.key_id
        assert new_id is not None
        status = first.volumes.reencryption.status(ALICE, "data")
        assert (status.phase, status.progress, status.total) == (
            op.phase,
            op.progress,
            SIZE_MIB * MIB,
        )
    finally:
        first.close()
    second = _start(settings, False)
    try:
        start, _ = second.log.head()
        second.volumes.recover()
        done = second.volumes.show(ALICE, "data")
        assert (done.state, done.key_id) == ("available", new_id)
        new_key = _key(second, new_id)
        new_raw = _path(second)
        assert _holds_pattern(new_raw, new_key)
        assert not _opens(new_raw, old_key)
        assert not old_raw.exists()
        assert second.store.rows.get(old_id) is None
        assert _volume_keys(second) == {new_id}
        assert _operation(second) is None
        assert second.volumes.verify(ALICE, "data").passed
        entries = entries_since(second, start)
        resumed = entries[0]
        assert (resumed["kind"], resumed["stage"]) == ("volume.reencrypt", "resume")
        if step == "chunk":
            assert resumed["progress"] == 3 * MIB  # carried on from there, not from 0
        stages = [e["stage"] for e in entries if e["kind"] == "volume.reencrypt"]
        assert stages == ["resume", "finish"]
        # Every file in the directory is the volume's one storage.
        assert [p.name for p in volumes_dir.iterdir()] == [new_raw.name]
    finally:
        second.close()


def test_asking_again_resumes_an_interrupted_reencryption(
    plane: ControlPlane, volumes_dir: Path
) -> None:
    old_id, _old_key, old_raw = _create(plane, volumes_dir)

    refused: list[str] = []

    def crash(name: str, reached: str) -> None:
        if reached == "chunk":
            # While it runs, a second request (the owner's, even) is refused, not run twice.
            with pytest.raises(UsageError, match="being re-encrypted") as second:
                plane.volumes.reencryption.start(ALICE, "data")
            refused.append(str(second.value))
            raise SimulatedCrash(name)

    plane.volumes.reencryption.after_step = crash
    with pytest.raises(SimulatedCrash):
        plane.volumes.reencryption.start(ALICE, "data")
    assert refused == [
        f"volume data is being re-encrypted ({MIB} of {SIZE_MIB * MIB} bytes copied)"
    ]
    plane.volumes.reencryption.after_step = None
    # Another user cannot take it over; the owner's second request carries it on.
    with pytest.raises(NotFoundError):
        plane.volumes.reencryption.start(BOB, "data")
    done = plane.volumes.reencryption.start(ALICE, "data")
    assert done.state == "available"
    assert done.key_id is not None
    assert done.key_id != old_id
    assert _holds_pattern(_path(plane), _key(plane, done.key_id))
    assert not old_raw.exists()
    assert plane.store.rows.get(old_id) is None


def test_a_key_ordered_by_a_run_that_died_before_recording_it_is_destroyed(
    tmp_path: Path, volumes_dir: Path
) -> None:
    settings = _settings(tmp_path / "data", volumes_dir)
    first = _start(settings, True)
    try:
        old_id, _, old_raw = _create(first, volumes_dir)

        def crash(name: str, reached: str) -> None:
            if reached == "key made":
                raise SimulatedCrash(name)

        first.volumes.reencryption.after_step = crash
        with pytest.raises(SimulatedCrash):
            first.volumes.reencryption.start(ALICE, "data")
        op = _operation(first)
        assert op is not None
        assert (op.phase, op.key_id) == ("ordering", None)
        [orphan] = _volume_keys(first) - {old_id}
    finally:
        first.close()
    second = _start(settings, False)
    try:
        start, _ = second.log.head()
        second.volumes.recover()
        done = second.volumes.show(ALICE, "data")
        assert done.state == "available"
        assert done.key_id not in (None, old_id, orphan)
        assert _volume_keys(second) == {done.key_id}
        assert _holds_pattern(_path(second), _key(second, str(done.key_id)))
        assert not old_raw.exists()
        deleted = [e["secret"] for e in entries_since(second, start) if e["kind"] == "kms.delete"]
        assert deleted == [orphan, old_id]
    finally:
        second.close()
