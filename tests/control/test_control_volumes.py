"""The block-storage service in-process: keys by UUID, releases by policy, crash-safe delete.

Real SQLite, real file KEK, real policy file and log, real file volumes
(qemu-img formats them); only HTTP is left out.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from plane_helpers import entries_since, set_policy
from sqlalchemy import select

from trustplane.api.volume_spec import BackendKind, ControlLocation, EncryptionSpec, Provider
from trustplane.api.volumes import NewVolume, NewVolumeType
from trustplane.control.identity import Principal
from trustplane.control.models import Attestation, Secret, Volume
from trustplane.control.policy import DEFAULT_POLICY
from trustplane.control.service import ControlPlane, build
from trustplane.control.settings import ServerSettings, VolumeBackendSettings
from trustplane.control.volumes import SimulatedCrash
from trustplane.errors import Forbidden, IntegrityError, NotFoundError, UsageError
from trustplane.volumes.access import FileRawReader
from trustplane.volumes.header import LUKS_MAGIC, verify

MIB = 1 << 20
ADMIN = Principal("user", "admin", "admin", frozenset())
ALICE = Principal("user", "alice", "user", frozenset())
BOB = Principal("user", "bob", "user", frozenset())
COMPUTE = Principal("node", "compute-1", "node", frozenset())
OTHER = Principal("node", "compute-2", "node", frozenset())
NODE_RULE = """\
  - subjects: ["node:compute-1", "node:compute-2"]
    actions: [volume.attach]
    resources: ["volume:*"]
"""
ATTESTED_RULE = NODE_RULE + "    require_attestation: true\n"


def _settings(data: Path, volumes: Path) -> ServerSettings:
    backend = VolumeBackendSettings(kind=BackendKind.FILE, directory=volumes)
    return ServerSettings(data_dir=data, volume_backends={"files": backend})


@pytest.fixture
def volumes_dir(tmp_path: Path) -> Path:
    return tmp_path / "volumes"


@pytest.fixture
def plane(tmp_path: Path, volumes_dir: Path) -> Iterator[ControlPlane]:
    built = build(_settings(tmp_path / "data", volumes_dir), announce=False)
    built.volumes.create_type(ADMIN, NewVolumeType(name="secure", backend="files"))
    yield built
    built.close()


def _create(plane: ControlPlane, name: str = "data", who: Principal = ALICE) -> str:
    info = plane.volumes.create(who, NewVolume(name=name, size=8 * MIB, volume_type="secure"))
    assert info.key_id is not None
    return info.key_id


def test_only_admins_make_types_and_a_type_names_a_configured_backend(plane: ControlPlane) -> None:
    with pytest.raises(Forbidden, match=r"volume\.type\.create"):
        plane.volumes.create_type(ALICE, NewVolumeType(name="mine", backend="files"))
    with pytest.raises(UsageError, match=r"no volume backend .ceph. is configured.*files"):
        plane.volumes.create_type(ADMIN, NewVolumeType(name="x", backend="ceph"))
    # back-end encryption is librbd's: a file backend has none, said as one line.
    with pytest.raises(UsageError, match="back-end encryption is librbd's own"):
        plane.volumes.create_type(
            ADMIN,
            NewVolumeType(
                name="x",
                backend="files",
                encryption=EncryptionSpec(
                    provider=Provider.LUKS2, control_location=ControlLocation.BACK_END
                ),
            ),
        )
    with pytest.raises(UsageError, match="exists already"):
        plane.volumes.create_type(ADMIN, NewVolumeType(name="secure", backend="files"))
    [listed] = plane.volumes.types(ALICE)
    assert (listed.name, listed.backend_kind, listed.encryption.provider) == (
        "secure",
        BackendKind.FILE,
        Provider.LUKS,
    )


def test_create_keeps_only_the_key_uuid_and_the_header_fingerprint(
    plane: ControlPlane, volumes_dir: Path
) -> None:
    start, _ = plane.log.head()
    key_id = _create(plane)
    info = plane.volumes.show(ALICE, "data")
    assert info.state == "available"
    assert info.owner == "user:alice"
    assert info.header is not None
    assert info.header.version == 1
    raw = volumes_dir / "data.img"
    assert raw.read_bytes()[:6] == LUKS_MAGIC
    # The record holds the key's UUID and the header, never the key: the KMS holds it, sealed.
    with plane.db.session() as session:
        row = session.scalar(select(Volume).where(Volume.name == "data"))
        assert row is not None
        assert row.key_id == key_id
        assert row.header_uuid == info.header.uuid
        assert row.header_digest == info.header.digest
        secret = session.get(Secret, key_id)
        assert secret is not None
        assert secret.creator == "service:block-storage"
    key = plane.store.unseal(plane.store.find(key_id))  # type: ignore[arg-type]
    assert len(key) == 32
    assert key not in raw.read_bytes()
    assert key.hex().encode() not in raw.read_bytes()
    verify(FileRawReader(raw), info.header, "data")
    kinds = [e["kind"] for e in entries_since(plane, start)]
    assert kinds == ["kms.order", "volume.create"]
    # Nobody reads the key through the generic secrets API: not the owner, not an admin.
    for who in (ALICE, ADMIN):
        with pytest.raises((Forbidden, NotFoundError)):
            plane.secrets.payload(who, key_id)
    # A name that exists is refused, and nothing is formatted twice.
    before = raw.read_bytes()[:4096]
    with pytest.raises(UsageError, match="exists already"):
        _create(plane)
    assert raw.read_bytes()[:4096] == before


def test_storage_that_exists_is_never_formatted(plane: ControlPlane, volumes_dir: Path) -> None:
    foreign = volumes_dir / "theirs.img"
    foreign.write_bytes(b"someone else's data".ljust(MIB, b"\0"))
    with pytest.raises(UsageError, match="exists already"):
        _create(plane, "theirs")
    assert foreign.read_bytes().startswith(b"someone else's data")
    assert plane.volumes.volumes(ADMIN) == []


def test_the_key_goes_only_to_whom_the_policy_allows_and_every_answer_is_logged(
    plane: ControlPlane,
) -> None:
    set_policy(plane, DEFAULT_POLICY + NODE_RULE)
    key_id = _create(plane)
    start, _ = plane.log.head()
    # A user (the owner included: a stolen user token) gets no key.
    with pytest.raises(Forbidden, match=r"policy refuses volume\.attach"):
        plane.volumes.release(ALICE, "data", "vm-1")
    with pytest.raises(NotFoundError):
        plane.volumes.release(BOB, "data", "vm-1")
    released = plane.volumes.release(COMPUTE, "data", "vm-1")
    assert released.volume.key_id == key_id
    assert released.key_bytes() == plane.store.unseal(plane.store.find(key_id))  # type: ignore[arg-type]
    assert "key=" not in repr(released)
    shown = plane.volumes.show(ALICE, "data")
    assert shown.attachment is not None
    assert (shown.attachment.subject, shown.attachment.domain) == ("node:compute-1", "vm-1")
    # Attached: a second domain, or another node, is refused; the same attach may retry.
    with pytest.raises(UsageError, match="attached to domain vm-1 of node:compute-1"):
        plane.volumes.release(COMPUTE, "data", "vm-2")
    with pytest.raises(UsageError, match="attached to"):
        plane.volumes.release(OTHER, "data", "vm-1")
    assert plane.volumes.release(COMPUTE, "data", "vm-1").key_bytes() == released.key_bytes()
    # Deleting an attached volume is refused; detach clears the attachment.
    with pytest.raises(UsageError, match="detach it first"):
        plane.volumes.delete(ALICE, "data")
    plane.volumes.detach(COMPUTE, "data", "vm-1")
    assert plane.volumes.show(ALICE, "data").attachment is None
    assert plane.volumes.release(OTHER, "data", "vm-9").volume.attachment is not None
    decisions = [
        (e["subject"], e["decision"], e["domain"], e["secret"])
        for e in entries_since(plane, start)
        if e["kind"] == "volume.attach"
    ]
    assert decisions == [
        ("user:alice", "deny", "vm-1", key_id),
        ("user:bob", "deny", "vm-1", key_id),
        ("node:compute-1", "allow", "vm-1", key_id),
        ("node:compute-1", "deny", "vm-2", key_id),
        ("node:compute-2", "deny", "vm-1", key_id),
        ("node:compute-1", "allow", "vm-1", key_id),
        ("node:compute-2", "allow", "vm-9", key_id),
    ]


def test_a_node_that_is_not_attested_gets_nothing_when_the_policy_asks(
    plane: ControlPlane,
) -> None:
    set_policy(plane, DEFAULT_POLICY + ATTESTED_RULE)
    _create(plane)
    with pytest.raises(Forbidden, match="attestation required"):
        plane.volumes.release(COMPUTE, "data", "vm-1")
    assert plane.volumes.show(ADMIN, "data").attachment is None
    # The verifier's record of a passing, fresh attestation (what a quote leaves):
    # the same node now gets the key; a stale or quarantined one would not.
    with plane.db.session() as session:
        session.add(
            Attestation(
                node=COMPUTE.name,
                ek_public=b"ek",
                ak_public=b"ak",
                ak_name=b"name",
                bound=True,
                measurements=[],
                last_result="pass",
                last_at=datetime.now(UTC),
            )
        )
    released = plane.volumes.release(COMPUTE, "data", "vm-1")
    assert len(released.key_bytes()) == 32
    with plane.db.session() as session:
        row = session.get(Attestation, COMPUTE.name)
        assert row is not None
        row.quarantine_reason = "measured something wrong"
    plane.volumes.detach(COMPUTE, "data", "vm-1")
    with pytest.raises(Forbidden, match="attestation required"):
        plane.volumes.release(COMPUTE, "data", "vm-1")


def test_delete_shreds_the_key_before_the_storage(plane: ControlPlane, volumes_dir: Path) -> None:
    set_policy(plane, DEFAULT_POLICY + NODE_RULE)
    key_id = _create(plane)
    stolen_copy = (volumes_dir / "data.img").read_bytes()
    with pytest.raises(Forbidden, match="only the owner"):
        plane.volumes.delete(Principal("user", "op", "operator", frozenset()), "data")
    start, _ = plane.log.head()
    plane.volumes.delete(ALICE, "data")
    assert not (volumes_dir / "data.img").exists()
    assert plane.store.rows.get(key_id) is None
    with pytest.raises(NotFoundError):
        plane.secrets.metadata(ADMIN, key_id)
    with pytest.raises(NotFoundError):
        plane.volumes.show(ADMIN, "data")
    kinds = [e["kind"] for e in entries_since(plane, start)]
    assert kinds == ["volume.delete", "kms.delete", "volume.destroyed"]
    assert stolen_copy[:6] == LUKS_MAGIC  # a copy exists, and no key for it anywhere


def test_a_crash_between_shredding_and_the_storage_is_finished_at_the_next_start(
    tmp_path: Path, volumes_dir: Path
) -> None:
    settings = _settings(tmp_path / "data", volumes_dir)
    first = build(settings, announce=False)
    try:
        first.volumes.create_type(ADMIN, NewVolumeType(name="secure", backend="files"))
        key_id = _create(first)

        def crash(name: str) -> None:
            raise SimulatedCrash(name)

        first.volumes.after_shred = crash
        with pytest.raises(SimulatedCrash):
            first.volumes.delete(ALICE, "data")
        assert first.volumes.show(ADMIN, "data").state == "shredded"
        assert first.store.rows.get(key_id) is None
        assert (volumes_dir / "data.img").exists()
        # Shredded: the key is gone, so nobody gets it, whatever the policy says.
        with pytest.raises((NotFoundError, UsageError, Forbidden)):
            first.volumes.release(ADMIN, "data", "vm-1")
    finally:
        first.close()
    second = build(settings, announce=False)
    try:
        assert second.volumes.recover() == 1
        assert not (volumes_dir / "data.img").exists()
        assert second.volumes.volumes(ADMIN) == []
    finally:
        second.close()


def test_a_volume_replaced_behind_the_service_is_detected_by_its_fingerprint(
    plane: ControlPlane, volumes_dir: Path
) -> None:
    _create(plane, "a")
    _create(plane, "b")
    info = plane.volumes.show(ALICE, "a")
    assert info.header is not None
    # Someone with the storage swaps b's file in place of a's.
    (volumes_dir / "b.img").replace(volumes_dir / "a.img")
    with pytest.raises(IntegrityError, match="replaced or re-formatted"):
        verify(FileRawReader(volumes_dir / "a.img"), info.header, "volume a")
