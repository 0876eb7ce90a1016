"""Clone, snapshot and encrypt in place, in-process: real SQLite, KMS, policy, log and
file volumes (qemu-img, qemu-io, cryptsetup luksDump on the files); only HTTP is left out.

The attacker of a clone holds the clone's key (or the parent's) and the storage of
both: each key opens its own volume only. The attacker of encrypt in place reads
the backend's directory afterwards: no plaintext left in any file, nor in an inode
someone kept a hard link to.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from plane_helpers import entries_since, set_policy
from sqlalchemy import func, select, update

from trustplane.api.volume_location import FileLocation
from trustplane.api.volume_spec import BackendKind
from trustplane.api.volumes import CloneRequest, EncryptRequest, NewVolume, NewVolumeType
from trustplane.control.identity import Principal
from trustplane.control.models import Secret, Volume, VolumeOperation
from trustplane.control.policy import DEFAULT_POLICY
from trustplane.control.service import ControlPlane, build
from trustplane.control.settings import ServerSettings, VolumeBackendSettings
from trustplane.control.volumes import SimulatedCrash
from trustplane.errors import (
    ConflictError,
    DecryptionKeyError,
    Forbidden,
    NotFoundError,
    UsageError,
)
from trustplane.tools import Executor, SecretFile
from trustplane.tools.command import Arg
from trustplane.volumes.attachers.userspace import KEY_OBJECT, key_object
from trustplane.volumes.encryptors import QemuLuksEncryptor
from trustplane.volumes.encryptors.base import passphrase
from trustplane.volumes.header import LUKS_MAGIC
from trustplane.volumes.transport_key import NodeTransport

MIB = 1 << 20
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


def _key(plane: ControlPlane, key_id: str | None) -> bytes:
    assert key_id is not None
    record = plane.store.find(key_id)
    assert record is not None
    return plane.store.unseal(record)


def _qemu_io(path: Path, key: bytes, *commands: str) -> str:
    argv: list[Arg] = ["qemu-io", "--object", key_object(passphrase(key)), "--image-opts"]
    argv.append(f"driver=luks,key-secret={KEY_OBJECT},file.driver=file,file.filename={path}")
    for command in commands:
        argv += ["-c", command]
    return EXECUTOR.run(argv).text


def _intact(raw: Path, key: bytes) -> bool:
    out = _qemu_io(raw, key, "read -P 0x5a 0 1M", "read -P 0xa5 7M 1M")
    return "Pattern verification failed" not in out and out.count("read 1048576/1048576") == 2


def _opens(raw: Path, key: bytes) -> bool:
    try:
        QemuLuksEncryptor().check_key(FileLocation(path=str(raw)), key)
    except DecryptionKeyError:
        return False
    return True


def _luks_dump(raw: Path) -> dict[str, str]:
    """`cryptsetup luksDump` of a LUKS1 file (no device-mapper needed): the master-key
    digest and salt, the UUID."""
    text = EXECUTOR.run(["cryptsetup", "luksDump", str(raw)]).text
    fields: dict[str, str] = {}
    current = ""
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z ]+):\s*(.*)$", line)
        if match:
            current = match.group(1).strip()
            fields[current] = match.group(2).strip()
        elif current in ("MK digest", "MK salt") and line.strip():
            fields[current] += " " + line.strip()
    return {k: fields[k] for k in ("MK digest", "MK salt", "UUID")}


def _same_data(first: Path, first_key: bytes, second: Path, second_key: bytes) -> bool:
    argv: list[Arg] = [
        "qemu-img", "compare", "-q",
        "--object", SecretFile(passphrase(first_key), "secret,id=k1,file={}"),
        "--object", SecretFile(passphrase(second_key), "secret,id=k2,file={}"),
        "--image-opts",
        f"driver=luks,key-secret=k1,file.driver=file,file.filename={first}",
        f"driver=luks,key-secret=k2,file.driver=file,file.filename={second}",
    ]  # fmt: skip
    result = EXECUTOR.run(argv, check=False)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


def _files_holding(root: Path, needle: bytes) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                found.append(path)
        except OSError:
            continue
    return found


def _secret_count(plane: ControlPlane) -> int:
    with plane.db.session() as session:
        return int(session.scalar(select(func.count()).select_from(Secret)) or 0)


def _operations(plane: ControlPlane) -> int:
    with plane.db.session() as session:
        return int(session.scalar(select(func.count()).select_from(VolumeOperation)) or 0)


def _names(plane: ControlPlane) -> list[str]:
    with plane.db.session() as session:
        return sorted(session.scalars(select(Volume.name)).all())


def _source(plane: ControlPlane, volumes_dir: Path, name: str = "data") -> tuple[str, bytes]:
    info = plane.volumes.create(ALICE, NewVolume(name=name, size=8 * MIB, volume_type="secure"))
    key = _key(plane, info.key_id)
    _qemu_io(volumes_dir / f"{name}.img", key, "write -P 0x5a 0 1M", "write -P 0xa5 7M 1M")
    assert info.key_id is not None
    return info.key_id, key


# -- clone --------------------------------------------------------------------------------------


def test_a_clone_has_the_data_and_a_master_key_of_its_own(
    plane: ControlPlane, volumes_dir: Path, tmp_path: Path
) -> None:
    parent_id, parent_key = _source(plane, volumes_dir)
    start, _ = plane.log.head()
    plane.volumes.copies.chunk = 3 * MIB  # windows of 3 + 3 + 2 MiB
    seen = []

    def progress(name: str) -> None:
        now = plane.volumes.copies.progress(ALICE, name)
        seen.append((now.kind, now.phase, now.progress, now.total))

    plane.volumes.copies.after_copy = progress
    clone = plane.volumes.copies.clone(ALICE, "data", CloneRequest(name="copy"))
    assert seen == [("clone", "copying", 8 * MIB, 8 * MIB)]
    with pytest.raises(NotFoundError, match="not being cloned"):
        plane.volumes.copies.progress(ALICE, "copy")
    assert clone.state == "available"
    assert clone.owner == "user:alice"
    assert clone.size == 8 * MIB
    assert clone.key_id is not None
    assert clone.key_id != parent_id
    clone_key = _key(plane, clone.key_id)
    parent_raw, clone_raw = volumes_dir / "data.img", volumes_dir / "copy.img"
    assert _intact(clone_raw, clone_key)
    # A fresh master key: luksDump's digest and salt differ (an RBD clone or a Cinder
    # clone would show the same master key under both).
    parent_dump, clone_dump = _luks_dump(parent_raw), _luks_dump(clone_raw)
    assert parent_dump["MK digest"] != clone_dump["MK digest"]
    assert parent_dump["MK salt"] != clone_dump["MK salt"]
    assert parent_dump["UUID"] != clone_dump["UUID"]
    # The holder of the clone's key (and both files) opens nothing of the parent, and
    # the other way round.
    assert not _opens(parent_raw, clone_key)
    assert not _opens(clone_raw, parent_key)
    # The whole payload is the same (qemu-img compare, each side through its own key).
    assert _same_data(parent_raw, parent_key, clone_raw, clone_key)
    _qemu_io(clone_raw, clone_key, "write -P 0x33 4M 4k")  # and the comparison can tell
    assert not _same_data(parent_raw, parent_key, clone_raw, clone_key)
    # No key of either is left in a file (the secret objects' files are gone).
    for root in (Path("/dev/shm"), tmp_path):
        for key in (parent_key, clone_key):
            assert _files_holding(root, passphrase(key)) == []
    assert plane.volumes.show(ALICE, "data").state == "available"
    assert plane.volumes.verify(ALICE, "copy").passed
    entries = entries_since(plane, start)
    assert [e["kind"] for e in entries][:2] == ["kms.order", "volume.clone"]
    logged = entries[1]
    assert (logged["source"], logged["secret"], logged["source_secret"]) == (
        "data",
        clone.key_id,
        parent_id,
    )
    assert _operations(plane) == 0
    # The parent deleted (its key shredded): the clone still reads.
    plane.volumes.delete(ALICE, "data")
    assert plane.store.rows.get(parent_id) is None
    assert not parent_raw.exists()
    assert _intact(clone_raw, clone_key)
    # A snapshot of the clone: one more independent key.
    snap = plane.volumes.copies.clone(ALICE, "copy", CloneRequest(name="snap"), snapshot=True)
    assert snap.key_id not in (clone.key_id, parent_id)
    assert _intact(volumes_dir / "snap.img", _key(plane, snap.key_id))
    assert not _opens(volumes_dir / "snap.img", clone_key)


def test_a_clone_is_refused_to_strangers_for_attached_volumes_and_taken_names(
    plane: ControlPlane, volumes_dir: Path
) -> None:
    set_policy(plane, DEFAULT_POLICY + NODE_RULE)
    _source(plane, volumes_dir)
    secrets_before = _secret_count(plane)
    with pytest.raises(NotFoundError):
        plane.volumes.copies.clone(BOB, "data", CloneRequest(name="theft"))
    with pytest.raises(Forbidden, match="only the owner"):
        plane.volumes.copies.clone(COMPUTE, "data", CloneRequest(name="theft"))
    with pytest.raises(NotFoundError):
        plane.volumes.copies.clone(ALICE, "nothing", CloneRequest(name="x"))
    plane.volumes.create(ALICE, NewVolume(name="taken", size=8 * MIB, volume_type="secure"))
    with pytest.raises(UsageError, match="exists already"):
        plane.volumes.copies.clone(ALICE, "data", CloneRequest(name="taken"))
    stray = volumes_dir / "stray.img"  # storage the service did not make: never touched
    stray.write_bytes(b"someone else's")
    with pytest.raises(UsageError, match="exists already"):
        plane.volumes.copies.clone(ALICE, "data", CloneRequest(name="stray"))
    assert stray.read_bytes() == b"someone else's"
    stray.unlink()
    plane.volumes.release(COMPUTE, "data", "vm-1", TRANSPORT.public_pem)
    with pytest.raises(UsageError, match="quiesced"):
        plane.volumes.copies.clone(ALICE, "data", CloneRequest(name="live"))
    plane.volumes.detach(COMPUTE, "data", "vm-1")
    # Nothing was left by the refusals: no record, no key, no storage, no operation.
    assert _names(plane) == ["data", "taken"]
    assert _secret_count(plane) == secrets_before + 1  # taken's own key
    assert sorted(p.name for p in volumes_dir.iterdir()) == ["data.img", "taken.img"]
    assert _operations(plane) == 0
    assert plane.volumes.show(ALICE, "data").state == "available"


ALICE_ATTACHES_PUB = """\
  - subjects: ["user:alice"]
    actions: [volume.attach]
    resources: ["volume:pub-*"]
"""


def test_a_clone_cannot_move_a_volume_to_a_name_its_owner_may_attach(
    plane: ControlPlane, volumes_dir: Path
) -> None:
    """The attacker owns `data`, which the policy refuses her to attach, and may attach
    `pub-*`: a clone to `pub-copy` would hand her data's plaintext. Refused, nothing made."""
    set_policy(plane, DEFAULT_POLICY + ALICE_ATTACHES_PUB)
    _source(plane, volumes_dir)
    secrets_before = _secret_count(plane)
    with pytest.raises(Forbidden, match=r"volume\.attach on volume:data"):
        plane.volumes.copies.clone(ALICE, "data", CloneRequest(name="pub-copy"))
    with pytest.raises(Forbidden, match=r"volume\.attach on volume:data"):
        plane.volumes.copies.clone(ALICE, "data", CloneRequest(name="pub-snap"), snapshot=True)
    assert _names(plane) == ["data"]
    assert _secret_count(plane) == secrets_before
    assert sorted(p.name for p in volumes_dir.iterdir()) == ["data.img"]
    assert _operations(plane) == 0
    assert plane.volumes.show(ALICE, "data").state == "available"
    # Attestation required on the source but not on the new name: refused as well.
    set_policy(
        plane,
        DEFAULT_POLICY
        + ALICE_ATTACHES_PUB
        + ALICE_ATTACHES_PUB.replace("pub-*", "data").replace(
            '"volume:data"]', '"volume:data"]\n    require_attestation: true'
        ),
    )
    with pytest.raises(Forbidden, match="attested"):
        plane.volumes.copies.clone(ALICE, "data", CloneRequest(name="pub-copy"))
    assert _names(plane) == ["data"]
    # A name she may not attach either: the clone goes through (nothing widened).
    set_policy(plane, DEFAULT_POLICY + ALICE_ATTACHES_PUB)
    copy = plane.volumes.copies.clone(ALICE, "data", CloneRequest(name="copy"))
    assert copy.state == "available"


@pytest.mark.parametrize("crash_at", ["after_target", "after_copy"])
def test_a_clone_interrupted_is_undone_at_the_next_start(
    crash_at: str, tmp_path: Path, volumes_dir: Path
) -> None:
    settings = _settings(tmp_path / "data", volumes_dir)
    first = build(settings, announce=False)
    try:
        first.volumes.create_type(ADMIN, NewVolumeType(name="secure", backend="files"))
        parent_id, parent_key = _source(first, volumes_dir)

        def crash(name: str) -> None:
            raise SimulatedCrash(name)

        setattr(first.volumes.copies, crash_at, crash)
        with pytest.raises(SimulatedCrash):
            first.volumes.copies.clone(ALICE, "data", CloneRequest(name="copy"))
        # What the crash left: the row, the new key and storage; the source locked.
        assert (volumes_dir / "copy.img").exists()
        assert first.volumes.show(ALICE, "data").state == "cloning"
        assert first.volumes.show(ALICE, "copy").state == "creating"
        with pytest.raises(UsageError, match="being cloned"):
            first.volumes.delete(ALICE, "data")
        with pytest.raises(UsageError, match="running clone"):
            first.volumes.delete(ALICE, "copy")
        copy_key_id = first.volumes.show(ALICE, "copy").key_id
        assert copy_key_id is not None
    finally:
        first.close()
    second = build(settings, announce=False)
    try:
        start, _ = second.log.head()
        second.volumes.recover()
        assert _names(second) == ["data"]
        assert not (volumes_dir / "copy.img").exists()
        assert second.store.rows.get(copy_key_id) is None
        assert _operations(second) == 0
        source = second.volumes.show(ALICE, "data")
        assert (source.state, source.key_id) == ("available", parent_id)
        assert _intact(volumes_dir / "data.img", parent_key)
        kinds = [e["kind"] for e in entries_since(second, start)]
        assert "kms.delete" in kinds
        assert "volume.destroyed" in kinds
    finally:
        second.close()


def test_recover_leaves_alone_a_clone_started_since_the_server_started(
    plane: ControlPlane, volumes_dir: Path
) -> None:
    """recover() runs beside the first requests: a copy started since the start may be
    running right now and must not be undone; one from before the start is."""
    _source(plane, volumes_dir, "data")
    _source(plane, volumes_dir, "old")

    def crash(name: str) -> None:
        raise SimulatedCrash(name)

    plane.volumes.copies.after_target = crash
    for source, name in (("data", "copy"), ("old", "old-copy")):
        with pytest.raises(SimulatedCrash):
            plane.volumes.copies.clone(ALICE, source, CloneRequest(name=name))
    with plane.db.session() as session:
        old_row = session.scalar(select(Volume.id).where(Volume.name == "old-copy"))
        session.execute(
            update(VolumeOperation)
            .where(VolumeOperation.volume_id == old_row)
            .values(started=plane.volumes.creates.started - timedelta(minutes=1))
        )
    assert plane.volumes.copies.recover() == 1
    assert _names(plane) == ["copy", "data", "old"]
    assert not (volumes_dir / "old-copy.img").exists()
    assert (volumes_dir / "copy.img").exists()
    assert plane.volumes.show(ALICE, "copy").state == "creating"
    assert plane.volumes.show(ALICE, "data").state == "cloning"
    assert plane.volumes.show(ALICE, "old").state == "available"
    assert _operations(plane) == 1


# -- encrypt in place ---------------------------------------------------------------------------


def _plaintext(volumes_dir: Path, name: str, size: int = 8 * MIB) -> bytes:
    """Plaintext storage the way a legacy volume holds it: a marker at both ends."""
    marker = f"plaintext-{secrets.token_hex(8)}".encode()
    volumes_dir.mkdir(parents=True, exist_ok=True)
    path = volumes_dir / f"{name}.img"
    with path.open("wb") as handle:
        handle.truncate(size)
        handle.write(marker * 128)
        handle.seek(size - 4096)
        handle.write(marker.ljust(4096, b"."))
    return marker


def _holding(root: Path, needle: bytes) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_file() and needle in p.read_bytes())


def _reads_marker(raw: Path, key: bytes, marker: bytes) -> bool:
    first = _qemu_io(raw, key, f"read -v 0 {len(marker)}")
    return marker[:8].hex(" ") in first


@pytest.mark.parametrize("same_name", [True, False])
def test_encrypt_in_place_leaves_no_plaintext_on_the_backend(
    same_name: bool, plane: ControlPlane, volumes_dir: Path, tmp_path: Path
) -> None:
    marker = _plaintext(volumes_dir, "legacy")
    # Someone kept a hard link to the plaintext's inode: it is overwritten, not only unlinked.
    kept = tmp_path / "kept-link"
    kept.hardlink_to(volumes_dir / "legacy.img")
    new = "legacy" if same_name else "secured"
    start, _ = plane.log.head()
    info = plane.volumes.copies.encrypt(
        ADMIN, EncryptRequest(name=new, source="legacy", volume_type="secure")
    )
    assert info.state == "available"
    assert info.size == 8 * MIB  # the usable size is the plaintext's: the header comes on top
    raw = volumes_dir / f"{new}.img"
    assert info.location == FileLocation(path=str(raw))
    assert raw.read_bytes()[:6] == LUKS_MAGIC
    assert sorted(p.name for p in volumes_dir.iterdir()) == [f"{new}.img"]
    assert _holding(volumes_dir, marker) == []
    assert marker not in kept.read_bytes()
    assert kept.read_bytes() == bytes(8 * MIB)
    key = _key(plane, info.key_id)
    assert _reads_marker(raw, key, marker)
    tail = _qemu_io(raw, key, f"read -v {8 * MIB - 4096} 16")
    assert marker[:8].hex(" ") in tail
    assert plane.volumes.verify(ADMIN, new).passed
    kinds = [e["kind"] for e in entries_since(plane, start)]
    assert kinds[:2] == ["kms.order", "volume.encrypt"]
    logged = entries_since(plane, start)[1]
    assert logged["swapped"] is same_name
    assert "overwritten with zeros" in logged["plaintext"]
    assert _operations(plane) == 0


@pytest.mark.parametrize("crash_at", ["after_target", "after_copy", "after_swap"])
def test_encrypt_in_place_interrupted_is_settled_at_the_next_start(
    crash_at: str, tmp_path: Path, volumes_dir: Path
) -> None:
    settings = _settings(tmp_path / "data", volumes_dir)
    marker = _plaintext(volumes_dir, "legacy")
    original = (volumes_dir / "legacy.img").read_bytes()
    first = build(settings, announce=False)
    try:
        first.volumes.create_type(ADMIN, NewVolumeType(name="secure", backend="files"))

        def crash(name: str) -> None:
            raise SimulatedCrash(name)

        setattr(first.volumes.copies, crash_at, crash)
        with pytest.raises(SimulatedCrash):
            first.volumes.copies.encrypt(
                ADMIN, EncryptRequest(name="legacy", source="legacy", volume_type="secure")
            )
        key_id = first.volumes.show(ADMIN, "legacy").key_id
        assert key_id is not None
        if crash_at == "after_swap":  # the plaintext under its doomed name, still there
            assert (volumes_dir / "legacy.img").read_bytes()[:6] == LUKS_MAGIC
            assert _holding(volumes_dir, marker) != []
        else:  # before the swap: the plaintext where it was, whole
            assert (volumes_dir / "legacy.img").read_bytes() == original
    finally:
        first.close()
    second = build(settings, announce=False)
    try:
        second.volumes.recover()
        assert _operations(second) == 0
        files = sorted(p.name for p in volumes_dir.iterdir())
        assert files == ["legacy.img"]
        raw = volumes_dir / "legacy.img"
        if crash_at == "after_target":
            # Undone: the plaintext untouched, the partial copy and its key gone.
            assert raw.read_bytes() == original
            assert _names(second) == []
            assert second.store.rows.get(key_id) is None
        else:
            # Finished: the encrypted volume in the plaintext's place, no plaintext left.
            assert _holding(volumes_dir, marker) == []
            info = second.volumes.show(ADMIN, "legacy")
            assert (info.state, info.key_id) == ("available", key_id)
            assert _reads_marker(raw, _key(second, key_id), marker)
            assert second.volumes.verify(ADMIN, "legacy").passed
    finally:
        second.close()


def test_encrypt_in_place_refuses_bad_input_and_leaves_nothing(
    plane: ControlPlane, volumes_dir: Path
) -> None:
    marker = _plaintext(volumes_dir, "legacy")
    _plaintext(volumes_dir, "odd", size=8 * MIB + 512)
    plane.volumes.create(ADMIN, NewVolume(name="taken", size=8 * MIB, volume_type="secure"))
    before = sorted(p.name for p in volumes_dir.iterdir())
    contents = {name: (volumes_dir / name).read_bytes() for name in before}
    secrets_before = _secret_count(plane)

    def refused(who: Principal, name: str, source: str) -> None:
        plane.volumes.copies.encrypt(
            who, EncryptRequest(name=name, source=source, volume_type="secure")
        )

    with pytest.raises(NotFoundError, match="does not exist"):
        refused(ADMIN, "new", "missing")
    with pytest.raises(UsageError, match="exists already"):
        refused(ADMIN, "taken", "legacy")
    with pytest.raises(Forbidden, match="only an admin"):
        refused(ALICE, "mine", "legacy")
    with pytest.raises(UsageError, match="is volume taken already"):
        refused(ADMIN, "again", "taken")
    with pytest.raises(UsageError, match="whole number of MiB"):
        refused(ADMIN, "odd", "odd")
    # A link in the directory to a file elsewhere is not the backend's storage.
    elsewhere = volumes_dir.parent / "elsewhere.raw"
    elsewhere.write_bytes(bytes(8 * MIB))
    (volumes_dir / "linked.img").symlink_to(elsewhere)
    with pytest.raises(UsageError, match="not a regular file"):
        refused(ADMIN, "linked", "linked")
    assert elsewhere.read_bytes() == bytes(8 * MIB)
    (volumes_dir / "linked.img").unlink()
    assert sorted(p.name for p in volumes_dir.iterdir()) == before
    assert {name: (volumes_dir / name).read_bytes() for name in before} == contents
    assert _holding(volumes_dir, marker) == ["legacy.img"]
    assert _names(plane) == ["taken"]
    assert _secret_count(plane) == secrets_before
    assert _operations(plane) == 0


# -- encrypt in place: a source in use ------------------------------------------------------

WRITTEN = 4 * MIB
"""Where the writer of the in-use tests writes (between the markers at both ends)."""


_PYTHON_WRITER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
os.pwrite(fd, bytes([0x77]) * 4096, int(sys.argv[2]))
os.fsync(fd)
print("wrote 4096/4096", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def _writer(path: Path, kind: str = "qemu-io") -> Iterator[int]:
    """A process with the plaintext open read-write (`qemu-io`, as a VM's QEMU holds a
    disk; or a plain `python` process, which takes no lock), which has written 4 KiB of
    0x77 at WRITTEN: a write encrypt must not lose. Yields its pid; it exits when the
    block ends."""
    argv = (
        ["qemu-io", "-f", "raw", str(path)]
        if kind == "qemu-io"
        else [sys.executable, "-c", _PYTHON_WRITER, str(path), str(WRITTEN)]
    )
    holder = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        if kind == "qemu-io":
            holder.stdin.write(f"write -P 0x77 {WRITTEN} 4k\n")
            holder.stdin.flush()
        answer = holder.stdout.readline()
        assert "wrote 4096/4096" in answer, answer
        yield holder.pid
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=120)
        except subprocess.TimeoutExpired:  # a failed test: QEMU retrying storage now gone
            holder.kill()
            holder.wait()


def _kept(path: Path, marker: bytes) -> bool:
    """The plaintext is there, with its markers and the writer's write."""
    data = path.read_bytes()
    return data[WRITTEN : WRITTEN + 4096] == b"\x77" * 4096 and data.count(marker) >= 128


def test_encrypt_in_place_refuses_a_plaintext_someone_writes_and_leaves_nothing(
    plane: ControlPlane, volumes_dir: Path
) -> None:
    """Attacker/accident: a writer holds the plaintext open; its writes during the copy
    would be lost with the plaintext. Refused before anything is made; once it is gone
    the same request goes through and the encrypted volume has its write."""
    marker = _plaintext(volumes_dir, "legacy")
    source = volumes_dir / "legacy.img"
    secrets_before = _secret_count(plane)
    start, _ = plane.log.head()
    request = EncryptRequest(name="legacy", source="legacy", volume_type="secure")
    with _writer(source) as pid:
        with pytest.raises(ConflictError) as refused:
            plane.volumes.copies.encrypt(ADMIN, request)
        assert str(refused.value) == (
            f"file {source} is in use: open by QEMU (pid {pid}, qemu-io); stop it and "
            "encrypt again (the plaintext is left as it is)"
        )
    assert sorted(p.name for p in volumes_dir.iterdir()) == ["legacy.img"]
    assert _kept(source, marker)
    assert _names(plane) == []
    assert _secret_count(plane) == secrets_before
    assert _operations(plane) == 0
    assert entries_since(plane, start) == []
    info = plane.volumes.copies.encrypt(ADMIN, request)
    assert info.state == "available"
    key = _key(plane, info.key_id)
    assert "Pattern verification failed" not in _qemu_io(source, key, f"read -P 0x77 {WRITTEN} 4k")
    assert _holding(volumes_dir, marker) == []


@pytest.mark.parametrize("kind", ["python", "qemu-io"])
def test_a_writer_that_comes_during_the_copy_aborts_it_and_the_copy_is_undone(
    kind: str, plane: ControlPlane, volumes_dir: Path
) -> None:
    """The writer opens the plaintext once the encrypted copy is made (after the first
    look) and writes while it is copied. A process that takes no lock: the look before
    the swap sees it. A QEMU: its image lock fails the copy itself, and the refusal says
    who. Either way the copy and its key go, the plaintext stays with the write."""
    marker = _plaintext(volumes_dir, "legacy")
    source = volumes_dir / "legacy.img"
    secrets_before = _secret_count(plane)
    start, _ = plane.log.head()
    with contextlib.ExitStack() as stack:
        pids: list[int] = []
        plane.volumes.copies.after_target = lambda _: pids.append(
            stack.enter_context(_writer(source, kind))
        )
        with pytest.raises(ConflictError) as refused:
            plane.volumes.copies.encrypt(
                ADMIN, EncryptRequest(name="legacy", source="legacy", volume_type="secure")
            )
        assert len(pids) == 1
        assert "in use during the copy (the copy is undone): open by " in str(refused.value)
        assert f"pid {pids[0]}" in str(refused.value)
    assert sorted(p.name for p in volumes_dir.iterdir()) == ["legacy.img"]
    assert _kept(source, marker)
    assert _names(plane) == []
    assert _secret_count(plane) == secrets_before
    assert _operations(plane) == 0
    kinds = [e["kind"] for e in entries_since(plane, start)]
    assert "volume.encrypt.failed" in kinds
    assert "volume.encrypt" not in kinds


def test_a_writer_that_comes_while_the_server_is_down_undoes_the_encryption(
    tmp_path: Path, volumes_dir: Path
) -> None:
    """A crash after the copy and its last look (`swapping`), then a writer opens the
    plaintext before the next start: the start undoes the encryption instead of
    finishing it (the swap had not begun), so the writer's data stays."""
    settings = _settings(tmp_path / "data", volumes_dir)
    marker = _plaintext(volumes_dir, "legacy")
    source = volumes_dir / "legacy.img"
    first = build(settings, announce=False)
    try:
        first.volumes.create_type(ADMIN, NewVolumeType(name="secure", backend="files"))

        def crash(name: str) -> None:
            raise SimulatedCrash(name)

        first.volumes.copies.after_copy = crash
        with pytest.raises(SimulatedCrash):
            first.volumes.copies.encrypt(
                ADMIN, EncryptRequest(name="legacy", source="legacy", volume_type="secure")
            )
        key_id = first.volumes.show(ADMIN, "legacy").key_id
        assert key_id is not None
    finally:
        first.close()
    with _writer(source, "python"):
        second = build(settings, announce=False)
        try:
            start, _ = second.log.head()
            assert second.volumes.copies.recover() == 1
            assert _operations(second) == 0
            assert sorted(p.name for p in volumes_dir.iterdir()) == ["legacy.img"]
            assert _names(second) == []
            assert second.store.rows.get(key_id) is None
            failed = [e for e in entries_since(second, start) if e["kind"].endswith(".failed")]
            assert [e["kind"] for e in failed] == ["volume.encrypt.failed"]
            assert "source in use: open by pid" in failed[0]["reason"]
        finally:
            second.close()
    assert _kept(source, marker)
