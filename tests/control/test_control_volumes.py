"""The block-storage service in-process: keys by UUID, releases by policy, crash-safe delete.

Real SQLite, real file KEK, real policy file and log, real file volumes
(qemu-img formats them); only HTTP is left out.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from plane_helpers import entries_since, set_policy
from sqlalchemy import select, update

from trustplane.api.volume_location import FileLocation
from trustplane.api.volume_spec import BackendKind, ControlLocation, EncryptionSpec, Provider
from trustplane.api.volumes import NewVolume, NewVolumeType, OnlineExtendResult
from trustplane.control import volume_extend
from trustplane.control.identity import Principal
from trustplane.control.models import Attestation, Secret, Volume, VolumeOperation
from trustplane.control.policy import DEFAULT_POLICY
from trustplane.control.service import ControlPlane, build
from trustplane.control.settings import ServerSettings, VolumeBackendSettings
from trustplane.control.volumes import SimulatedCrash
from trustplane.errors import (
    DecryptionKeyError,
    Forbidden,
    IntegrityError,
    NotFoundError,
    UsageError,
)
from trustplane.tools import QEMU_LUKS_PBKDF_HASH, QEMU_PBKDF_CALIBRATION, Executor
from trustplane.tools.command import Arg
from trustplane.volumes.access import FileRawReader
from trustplane.volumes.attachers.userspace import KEY_OBJECT, key_object
from trustplane.volumes.encryptors import QemuLuksEncryptor
from trustplane.volumes.encryptors.base import passphrase
from trustplane.volumes.header import LUKS_MAGIC, verify
from trustplane.volumes.transport_key import NodeTransport

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
TRANSPORT = NodeTransport.ephemeral()
"""The nodes' transport key pair (never enrolled here: the policy alone decides)."""


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
    released = plane.volumes.release(COMPUTE, "data", "vm-1", TRANSPORT.public_pem)
    assert released.volume.key_id == key_id
    assert TRANSPORT.open(released) == plane.store.unseal(plane.store.find(key_id))  # type: ignore[arg-type]
    assert "key=" not in repr(released)
    shown = plane.volumes.show(ALICE, "data")
    assert shown.attachment is not None
    assert (shown.attachment.subject, shown.attachment.domain) == ("node:compute-1", "vm-1")
    # Attached: a second domain, or another node, is refused; the same attach may retry.
    with pytest.raises(UsageError, match="attached to domain vm-1 of node:compute-1"):
        plane.volumes.release(COMPUTE, "data", "vm-2", TRANSPORT.public_pem)
    with pytest.raises(UsageError, match="attached to"):
        plane.volumes.release(OTHER, "data", "vm-1", TRANSPORT.public_pem)
    again = plane.volumes.release(COMPUTE, "data", "vm-1", TRANSPORT.public_pem)
    assert TRANSPORT.open(again) == TRANSPORT.open(released)
    # Deleting an attached volume is refused; detach clears the attachment.
    with pytest.raises(UsageError, match="detach it first"):
        plane.volumes.delete(ALICE, "data")
    plane.volumes.detach(COMPUTE, "data", "vm-1")
    assert plane.volumes.show(ALICE, "data").attachment is None
    assert (
        plane.volumes.release(OTHER, "data", "vm-9", TRANSPORT.public_pem).volume.attachment
        is not None
    )
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
        plane.volumes.release(COMPUTE, "data", "vm-1", TRANSPORT.public_pem)
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
                transport_key=TRANSPORT.public_pem,
            )
        )
    released = plane.volumes.release(COMPUTE, "data", "vm-1", TRANSPORT.public_pem)
    assert len(TRANSPORT.open(released)) == 32
    with plane.db.session() as session:
        row = session.get(Attestation, COMPUTE.name)
        assert row is not None
        row.quarantine_reason = "measured something wrong"
    plane.volumes.detach(COMPUTE, "data", "vm-1")
    with pytest.raises(Forbidden, match="attestation required"):
        plane.volumes.release(COMPUTE, "data", "vm-1", TRANSPORT.public_pem)


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


# -- verify: prove encryption -------------------------------------------------------------

EXECUTOR = Executor()


def _key(plane: ControlPlane, key_id: str) -> bytes:
    record = plane.store.find(key_id)
    assert record is not None
    return plane.store.unseal(record)


def _qemu_io(path: Path, key: bytes, *commands: str) -> str:
    """qemu-io through QEMU's LUKS driver (the encrypted path), key from a 0600 file."""
    argv: list[Arg] = ["qemu-io", "--object", key_object(passphrase(key)), "--image-opts"]
    argv.append(f"driver=luks,key-secret={KEY_OBJECT},file.driver=file,file.filename={path}")
    for command in commands:
        argv += ["-c", command]
    return EXECUTOR.run(argv).text


def _failed(plane: ControlPlane, name: str = "data") -> list[str]:
    return [c.name for c in plane.volumes.verify(ALICE, name).checks if not c.passed]


def test_a_fresh_volume_and_one_written_through_luks_verify(
    plane: ControlPlane, volumes_dir: Path
) -> None:
    set_policy(plane, DEFAULT_POLICY + NODE_RULE)
    key_id = _create(plane)
    start, _ = plane.log.head()
    fresh = plane.volumes.verify(ALICE, "data")
    assert fresh.passed, fresh.checks
    assert [c.name for c in fresh.checks] == [
        "luks-header",
        "header-uuid",
        "header-digest",
        "cipher",
        "payload",
    ]
    assert fresh.payload.sampled == 32
    assert fresh.payload.unwritten == 32  # sparse: nothing written yet, and nothing in the clear
    # Written through the encryptor (the same byte over 8 MiB): every sample is ciphertext.
    _qemu_io(volumes_dir / "data.img", _key(plane, key_id), "write -P 0x41 0 8M")
    written = plane.volumes.verify(ADMIN, "data", samples=64)
    assert written.passed, written.checks
    assert (written.payload.sampled, written.payload.ciphertext) == (64, 64)
    assert written.payload.min_entropy is not None
    assert written.payload.min_entropy >= written.payload.threshold
    logged = [e for e in entries_since(plane, start) if e["kind"] == "volume.verify"]
    assert [(e["subject"], e["passed"], e["failed"]) for e in logged] == [
        ("user:alice", True, []),
        ("user:admin", True, []),
    ]
    # Only the owner or an admin: a node that may attach sees it but may not verify it,
    # a stranger does not see it at all.
    with pytest.raises(Forbidden, match="only the owner"):
        plane.volumes.verify(COMPUTE, "data")
    with pytest.raises(NotFoundError):
        plane.volumes.verify(BOB, "data")


def test_a_header_reformatted_behind_the_service_fails_naming_the_checks(
    plane: ControlPlane, volumes_dir: Path
) -> None:
    _create(plane)
    raw = volumes_dir / "data.img"
    # Someone with the storage re-formats it under a key of their own (same cipher).
    theirs = key_object(passphrase(secrets.token_bytes(32)))
    argv: list[Arg] = [
        "qemu-img", "create", "-q", "-f", "luks", "--object", theirs,
        "-o", f"key-secret={KEY_OBJECT},hash-alg={QEMU_LUKS_PBKDF_HASH},iter-time=10",
        str(raw), str(8 * MIB),
    ]  # fmt: skip
    EXECUTOR.run(argv, retry=QEMU_PBKDF_CALIBRATION)
    report = plane.volumes.verify(ALICE, "data")
    assert not report.passed
    assert _failed(plane) == ["header-uuid", "header-digest"]
    [uuid_check] = [c for c in report.checks if c.name == "header-uuid"]
    assert "record:" in uuid_check.detail
    # A header wiped altogether: every header check fails, said as such.
    with raw.open("r+b") as handle:
        handle.write(bytes(4096))
    assert _failed(plane) == ["luks-header", "header-uuid", "header-digest", "cipher"]


@pytest.mark.parametrize("plaintext", ["text", "zeros"])
def test_a_payload_overwritten_in_the_clear_fails_the_sampling(
    plaintext: str, plane: ControlPlane, volumes_dir: Path
) -> None:
    key_id = _create(plane)
    raw = volumes_dir / "data.img"
    _qemu_io(raw, _key(plane, key_id), "write -P 0x41 0 8M")
    info = plane.volumes.show(ALICE, "data")
    assert info.header is not None
    # Someone with the storage writes 1 MiB around the encryption, in the payload area.
    clear = (
        b"Confidential customer list: name, address, card number\n" * 20000
        if plaintext == "text"
        else bytes(20000 * 56)
    )[:MIB]
    with raw.open("r+b") as handle:
        handle.seek(info.header.header_bytes + 2 * MIB)
        handle.write(clear)
    report = plane.volumes.verify(ALICE, "data")
    assert not report.passed
    assert _failed(plane) == ["payload"]
    # 32 samples over 8 MiB, 256 KiB apart: the clear MiB holds 4 of them.
    assert report.payload.plaintext == 4
    assert report.payload.ciphertext == 28
    assert report.payload.min_entropy is not None
    assert report.payload.min_entropy < (5.0 if plaintext == "text" else 0.1)


def test_a_volume_truncated_behind_the_service_fails_the_sampling(
    plane: ControlPlane, volumes_dir: Path
) -> None:
    _create(plane)
    raw = volumes_dir / "data.img"
    os.truncate(raw, raw.stat().st_size - 4 * MIB)
    report = plane.volumes.verify(ALICE, "data")
    assert _failed(plane) == ["payload"]
    assert report.payload.short > 0


# -- extend (offline) -----------------------------------------------------------------------


def test_extend_grows_the_usable_size_and_keeps_the_data(
    plane: ControlPlane, volumes_dir: Path
) -> None:
    set_policy(plane, DEFAULT_POLICY + NODE_RULE)
    key_id = _create(plane)
    key = _key(plane, key_id)
    raw = volumes_dir / "data.img"
    info = plane.volumes.show(ALICE, "data")
    assert info.header is not None
    _qemu_io(raw, key, "write -P 0x5a 0 1M", "write -P 0xa5 7M 1M")
    start, _ = plane.log.head()
    grown = plane.volumes.extend(ALICE, "data", 24 * MIB)
    assert (grown.size, grown.state) == (24 * MIB, "available")
    assert grown.header == info.header  # LUKS1 keeps no size: the header is untouched
    # What a guest sees through QEMU's LUKS driver: exactly the size asked for.
    encryptor = QemuLuksEncryptor()
    assert encryptor.usable_size(FileLocation(path=str(raw)), key) == 24 * MIB
    assert raw.stat().st_size == info.header.header_bytes + 24 * MIB
    # The data written before reads back; the new end is writable and readable.
    out = _qemu_io(
        raw,
        key,
        "read -P 0x5a 0 1M",
        "read -P 0xa5 7M 1M",
        "write -P 0x33 23M 1M",
        "read -P 0x33 23M 1M",
    )
    assert "Pattern verification failed" not in out
    assert plane.volumes.verify(ALICE, "data").passed
    kinds = [(e["kind"], e.get("from"), e.get("to")) for e in entries_since(plane, start)]
    assert ("volume.extend", 8 * MIB, 24 * MIB) in kinds
    # The same size again changes nothing; a smaller one is refused, and so is a stranger.
    assert plane.volumes.extend(ALICE, "data", 24 * MIB).size == 24 * MIB
    with pytest.raises(UsageError, match="shrinking it is refused"):
        plane.volumes.extend(ALICE, "data", 16 * MIB)
    with pytest.raises(UsageError, match="MiB"):
        plane.volumes.extend(ALICE, "data", 24 * MIB + 512)
    with pytest.raises(NotFoundError):
        plane.volumes.extend(BOB, "data", 32 * MIB)
    with pytest.raises(Forbidden, match="only the owner"):
        plane.volumes.extend(COMPUTE, "data", 32 * MIB)
    assert raw.stat().st_size == info.header.header_bytes + 24 * MIB


def test_extend_is_refused_while_attached_and_an_interrupted_one_is_put_back(
    tmp_path: Path, volumes_dir: Path
) -> None:
    settings = _settings(tmp_path / "data", volumes_dir)
    first = build(settings, announce=False)
    try:
        set_policy(first, DEFAULT_POLICY + NODE_RULE)
        first.volumes.create_type(ADMIN, NewVolumeType(name="secure", backend="files"))
        _create(first)
        raw = volumes_dir / "data.img"
        before = raw.stat().st_size
        first.volumes.release(COMPUTE, "data", "vm-1", TRANSPORT.public_pem)
        with pytest.raises(UsageError, match="detach it first"):
            first.volumes.extend(ALICE, "data", 16 * MIB)
        assert raw.stat().st_size == before
        assert first.volumes.show(ALICE, "data").size == 8 * MIB
        first.volumes.detach(COMPUTE, "data", "vm-1")
        # A crash in the middle of an extend leaves the record `extending`: no attach,
        # no delete meanwhile; the next start puts it back, the next extend finishes it.
        with first.db.session() as session:
            session.execute(update(Volume).values(state="extending"))
        with pytest.raises(UsageError, match="extending"):
            first.volumes.release(COMPUTE, "data", "vm-1", TRANSPORT.public_pem)
        with pytest.raises(UsageError, match="being extended"):
            first.volumes.delete(ALICE, "data")
    finally:
        first.close()
    second = build(settings, announce=False)
    try:
        second.volumes.recover()
        assert second.volumes.show(ALICE, "data").state == "available"
        assert second.volumes.extend(ALICE, "data", 16 * MIB).size == 16 * MIB
    finally:
        second.close()


def test_online_extend_is_the_attachment_holders_and_the_record_follows_its_report(
    plane: ControlPlane, volumes_dir: Path
) -> None:
    """The control plane's half of an online extend (the host's resize is tested with a
    guest in tests/integration): who may start it, what it claims, what a report does."""
    set_policy(plane, DEFAULT_POLICY + NODE_RULE)
    _create(plane)
    raw = volumes_dir / "data.img"
    before = raw.stat().st_size
    plane.volumes.release(COMPUTE, "data", "vm-1", TRANSPORT.public_pem)
    start, _ = plane.log.head()
    # Only the holder, for its domain; not the owner, not another node, not shrinking.
    for who, domain in ((OTHER, "vm-1"), (ALICE, "vm-1"), (COMPUTE, "vm-2")):
        with pytest.raises(Forbidden, match=f"not attached to domain {domain}"):
            volume_extend.start(plane.volumes, who, "data", 16 * MIB, domain)
    with pytest.raises(UsageError, match="shrinking it is refused"):
        volume_extend.start(plane.volumes, COMPUTE, "data", 4 * MIB, "vm-1")
    assert entries_since(plane, start) == []

    started = volume_extend.start(plane.volumes, COMPUTE, "data", 16 * MIB, "vm-1")
    assert (started.state, started.size) == ("extending", 8 * MIB)
    with plane.db.session() as session:
        (operation,) = session.scalars(select(VolumeOperation)).all()
        assert (operation.kind, operation.total, operation.subject) == (
            "extend-online",
            16 * MIB,
            "node:compute-1",
        )
    # A report for another size, or from someone else, is not taken.
    with pytest.raises(UsageError, match="no online extend to 25165824 bytes"):
        volume_extend.finish(
            plane.volumes, COMPUTE, "data",
            OnlineExtendResult(domain="vm-1", size=24 * MIB, grown=True),
        )  # fmt: skip
    with pytest.raises(Forbidden):
        volume_extend.finish(
            plane.volumes, OTHER, "data",
            OnlineExtendResult(domain="vm-1", size=16 * MIB, grown=True),
        )  # fmt: skip
    # A failed resize: the record keeps its size, the volume is available again.
    failed = volume_extend.finish(
        plane.volumes, COMPUTE, "data",
        OnlineExtendResult(domain="vm-1", size=16 * MIB, grown=False, reason="no such disk"),
    )  # fmt: skip
    assert (failed.state, failed.size) == ("available", 8 * MIB)
    # A crash after the start: the next start of the server puts it back, a new one works.
    volume_extend.start(plane.volumes, COMPUTE, "data", 16 * MIB, "vm-1")
    plane.volumes.recover()
    assert plane.volumes.show(ALICE, "data").state == "available"
    volume_extend.start(plane.volumes, COMPUTE, "data", 16 * MIB, "vm-1")
    # The host died before it reported: its next try takes the operation over.
    resumed = volume_extend.start(plane.volumes, COMPUTE, "data", 24 * MIB, "vm-1")
    assert (resumed.state, resumed.size) == ("extending", 8 * MIB)
    # Detached meanwhile: the report of the one that started it is still taken, no other.
    plane.volumes.detach(COMPUTE, "data", "vm-1")
    with pytest.raises(Forbidden, match="only it reports it"):
        volume_extend.finish(
            plane.volumes, OTHER, "data",
            OnlineExtendResult(domain="vm-1", size=24 * MIB, grown=True),
        )  # fmt: skip
    with pytest.raises(UsageError, match="no online extend to 16777216 bytes"):
        volume_extend.finish(
            plane.volumes, COMPUTE, "data",
            OnlineExtendResult(domain="vm-1", size=16 * MIB, grown=True),
        )  # fmt: skip
    done = volume_extend.finish(
        plane.volumes, COMPUTE, "data",
        OnlineExtendResult(domain="vm-1", size=24 * MIB, grown=True),
    )  # fmt: skip
    assert (done.state, done.size) == ("available", 24 * MIB)
    with pytest.raises(UsageError, match="no online extend"):  # reported once only
        volume_extend.finish(
            plane.volumes, COMPUTE, "data",
            OnlineExtendResult(domain="vm-1", size=24 * MIB, grown=True),
        )  # fmt: skip
    with plane.db.session() as session:
        assert session.scalars(select(VolumeOperation)).all() == []
    phases = [
        (e["subject"], e["phase"], e["to"], e.get("resumed", False))
        for e in entries_since(plane, start)
        if e["kind"] == "volume.extend"
    ]
    assert phases == [
        ("node:compute-1", "started", 16 * MIB, False),
        ("node:compute-1", "failed", 16 * MIB, False),
        ("node:compute-1", "started", 16 * MIB, False),
        ("node:compute-1", "started", 16 * MIB, False),
        ("node:compute-1", "started", 24 * MIB, True),
        ("node:compute-1", "done", 24 * MIB, False),
    ]
    assert raw.stat().st_size == before  # the control plane never touches an attached disk
    # Detached, the volume is not extended online.
    with pytest.raises(Forbidden, match="not attached"):
        volume_extend.start(plane.volumes, COMPUTE, "data", 24 * MIB, "vm-1")


def test_an_online_extend_never_reported_does_not_block_the_delete_after_a_restart(
    plane: ControlPlane, volumes_dir: Path
) -> None:
    """The server restarts while an online extend runs: the start puts the volume back
    and drops the `extend-online` row, so the late report is refused and the delete
    finishes (key, storage and record gone; a later start has nothing left to fail on)."""
    set_policy(plane, DEFAULT_POLICY + NODE_RULE)
    key_id = _create(plane)
    plane.volumes.release(COMPUTE, "data", "vm-1", TRANSPORT.public_pem)
    volume_extend.start(plane.volumes, COMPUTE, "data", 16 * MIB, "vm-1")
    plane.volumes.recover()  # what the next start of the server does
    with plane.db.session() as session:
        assert session.scalars(select(VolumeOperation)).all() == []
    assert plane.volumes.show(ALICE, "data").state == "available"
    with pytest.raises(UsageError, match="no online extend"):
        volume_extend.finish(
            plane.volumes, COMPUTE, "data",
            OnlineExtendResult(domain="vm-1", size=16 * MIB, grown=True),
        )  # fmt: skip
    plane.volumes.detach(COMPUTE, "data", "vm-1")
    plane.volumes.delete(ALICE, "data")
    with pytest.raises(NotFoundError):
        plane.volumes.show(ADMIN, "data")
    assert plane.store.rows.get(key_id) is None
    assert not (volumes_dir / "data.img").exists()
    assert plane.volumes.recover() == 0


def test_a_delete_is_not_stuck_by_an_orphan_operation_row(
    plane: ControlPlane, volumes_dir: Path
) -> None:
    """An operation row left for an available volume (here: an `extend-online` one
    inserted directly) goes with the volume's record instead of keeping it `shredded`."""
    key_id = _create(plane)
    volume_id = plane.volumes.show(ADMIN, "data").id
    now = datetime.now(UTC)
    with plane.db.session() as session:
        session.add(
            VolumeOperation(
                id=str(uuid.uuid4()), volume_id=volume_id, kind=volume_extend.KIND,
                phase="resizing", total=16 * MIB, subject="node:compute-1",
                started=now, updated=now,
            )
        )  # fmt: skip
    plane.volumes.delete(ALICE, "data")
    with pytest.raises(NotFoundError):
        plane.volumes.show(ADMIN, "data")
    with plane.db.session() as session:
        assert session.scalars(select(VolumeOperation)).all() == []
        assert session.get(Volume, volume_id) is None
    assert plane.store.rows.get(key_id) is None
    assert not (volumes_dir / "data.img").exists()
    assert plane.volumes.recover() == 0


# -- rotate the wrapping passphrase -------------------------------------------------------


def _opens(raw: Path, key: bytes) -> bool:
    try:
        QemuLuksEncryptor().check_key(FileLocation(path=str(raw)), key)
    except DecryptionKeyError:
        return False
    return True


def _intact(raw: Path, key: bytes) -> bool:
    out = _qemu_io(raw, key, "read -P 0x5a 0 1M", "read -P 0xa5 7M 1M")
    return "Pattern verification failed" not in out and out.count("read 1048576/1048576") == 2


def test_rotation_gives_the_volume_a_new_key_and_the_old_one_opens_nothing(
    plane: ControlPlane, volumes_dir: Path
) -> None:
    set_policy(plane, DEFAULT_POLICY + NODE_RULE)
    old_id = _create(plane)
    old_key = _key(plane, old_id)
    raw = volumes_dir / "data.img"
    _qemu_io(raw, old_key, "write -P 0x5a 0 1M", "write -P 0xa5 7M 1M")
    before = plane.volumes.show(ALICE, "data")
    assert before.header is not None
    start, _ = plane.log.head()
    rotated = plane.volumes.rotate(ALICE, "data")
    new_id = rotated.key_id
    assert new_id is not None
    assert new_id != old_id
    assert rotated.state == "available"
    assert plane.store.rows.get(old_id) is None  # the old KMS secret is destroyed
    new_key = _key(plane, new_id)
    assert not _opens(raw, old_key)
    assert _intact(raw, new_key)
    assert QemuLuksEncryptor().active_keyslots(FileLocation(path=str(raw)), new_key) == 1
    # Same volume (UUID), a new header digest, recorded: verify and attach accept it.
    assert rotated.header is not None
    assert rotated.header.uuid == before.header.uuid
    assert rotated.header.digest != before.header.digest
    assert plane.volumes.verify(ALICE, "data").passed
    verify(FileRawReader(raw), rotated.header, "data")
    entries = entries_since(plane, start)
    assert [e["kind"] for e in entries] == [
        "kms.order",
        "volume.rotate",
        "kms.delete",
        "volume.verify",
    ]
    assert (entries[1]["from"], entries[1]["to"]) == (old_id, new_id)
    assert entries[2]["secret"] == old_id
    # Attached: refused; a stranger does not see it, an attaching node may not rotate it.
    assert (
        TRANSPORT.open(plane.volumes.release(COMPUTE, "data", "vm-1", TRANSPORT.public_pem))
        == new_key
    )
    with pytest.raises(UsageError, match="detach it first"):
        plane.volumes.rotate(ALICE, "data")
    with pytest.raises(Forbidden, match="only the owner"):
        plane.volumes.rotate(COMPUTE, "data")
    with pytest.raises(NotFoundError):
        plane.volumes.rotate(BOB, "data")
    assert plane.volumes.show(ALICE, "data").key_id == new_id


@pytest.mark.parametrize("crash_at", ["after_new_slot", "after_switch"])
def test_a_rotation_interrupted_is_settled_at_the_next_start(
    crash_at: str, tmp_path: Path, volumes_dir: Path
) -> None:
    settings = _settings(tmp_path / "data", volumes_dir)
    raw = volumes_dir / "data.img"
    first = build(settings, announce=False)
    try:
        set_policy(first, DEFAULT_POLICY + NODE_RULE)
        first.volumes.create_type(ADMIN, NewVolumeType(name="secure", backend="files"))
        old_id = _create(first)
        old_key = _key(first, old_id)
        _qemu_io(raw, old_key, "write -P 0x5a 0 1M", "write -P 0xa5 7M 1M")

        def crash(name: str) -> None:
            raise SimulatedCrash(name)

        setattr(first.volumes, crash_at, crash)
        with pytest.raises(SimulatedCrash):
            first.volumes.rotate(ALICE, "data")
        left = first.volumes.show(ADMIN, "data")
        assert left.state == "rotating"
        # The record switches only after the new slot works.
        assert (left.key_id == old_id) is (crash_at == "after_new_slot")
        [new_id] = [i for i in (_other_secret_ids(first) | {left.key_id}) if i != old_id]
        new_key = _key(first, new_id)
        # In between, both keys open it (the record's among them); nothing is attached.
        assert _opens(raw, old_key)
        assert _opens(raw, new_key)
        with pytest.raises(UsageError, match="rotating"):
            first.volumes.release(COMPUTE, "data", "vm-1", TRANSPORT.public_pem)
        with pytest.raises(UsageError, match="next start"):
            first.volumes.rotate(ALICE, "data")
        assert _opens(raw, old_key)
        assert _opens(raw, new_key)
    finally:
        first.close()
    second = build(settings, announce=False)
    try:
        second.volumes.recover()
        settled = second.volumes.show(ADMIN, "data")
        assert settled.state == "available"
        kept, dropped = (old_id, new_id) if crash_at == "after_new_slot" else (new_id, old_id)
        kept_key, dropped_key = (old_key, new_key) if kept == old_id else (new_key, old_key)
        assert settled.key_id == kept
        assert second.store.rows.get(dropped) is None
        assert not _opens(raw, dropped_key)
        assert _intact(raw, kept_key)
        assert second.volumes.verify(ALICE, "data").passed
        # And the next rotation works from there.
        again = second.volumes.rotate(ALICE, "data")
        assert again.key_id not in (old_id, new_id)
        assert not _opens(raw, kept_key)
    finally:
        second.close()


def test_deleting_a_volume_left_mid_rotation_destroys_every_key_of_it(
    plane: ControlPlane, volumes_dir: Path
) -> None:
    old_id = _create(plane)

    def crash(name: str) -> None:
        raise SimulatedCrash(name)

    plane.volumes.after_new_slot = crash
    with pytest.raises(SimulatedCrash):
        plane.volumes.rotate(ALICE, "data")
    [new_id] = _other_secret_ids(plane)
    plane.volumes.delete(ALICE, "data")
    assert plane.store.rows.get(old_id) is None
    assert plane.store.rows.get(new_id) is None
    assert not (volumes_dir / "data.img").exists()


def _other_secret_ids(plane: ControlPlane) -> set[str]:
    """The block storage's keys for volume `data` that its record does not name."""
    with plane.db.session() as session:
        row = session.scalar(select(Volume).where(Volume.name == "data"))
        assert row is not None
        ids = session.scalars(select(Secret.id).where(Secret.name == "volume:data")).all()
        return {i for i in ids if i != row.key_id}
