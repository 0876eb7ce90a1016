"""Re-encryption against a real server process: `kill -9` mid-copy, then a restart resumes it.

The server is `trustplane server` (a subprocess) with a file backend; a
256 MiB volume carries a pattern over its whole payload (written through
QEMU's LUKS driver with the key an attach released). The re-encryption is
asked over HTTP; once the server has recorded some bytes copied and flushed
(and not all), the server process alone gets SIGKILL (frozen first, and
killed only if its row still says so: kill_helpers): its
qemu-storage-daemons live on (their own sessions), as after a real crash.
The restarted server carries on by itself from the recorded progress
(logged: `volume.reencrypt` stage `resume` with it), stops the dead run's
daemons, and ends with every byte readable under the new key, none under
the old one, the old storage and the old KMS key gone.

The CLI (`trustplane volume reencrypt`) and its refusals: an attached
volume, another user's stolen token.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import start_control_plane_or_fail
from control_helpers import Cli, assert_fails, wait_for_entry
from durability_helpers import write_server_config
from kill_helpers import freeze, thaw
from volume_helpers import iscsi_settings, rbd_settings

from trustplane.api.volume_location import AnyLocation, FileLocation
from trustplane.api.volume_spec import EncryptionSpec, Engine
from trustplane.api.volumes import NewVolume, NewVolumeType
from trustplane.client import ControlClient
from trustplane.control.identity import Principal
from trustplane.control.service import ControlPlane, build
from trustplane.control.settings import ServerSettings
from trustplane.embedded.ceph import RunningCeph
from trustplane.embedded.control_plane import RunningControlPlane, start_control_plane
from trustplane.embedded.tgtd import RunningTgtd
from trustplane.errors import DecryptionKeyError, ExitCode, NotFoundError, TrustplaneError
from trustplane.tools import Executor
from trustplane.tools.command import Arg
from trustplane.volumes.attachers.userspace import KEY_OBJECT, key_object
from trustplane.volumes.backends import Backend
from trustplane.volumes.encryptors import QemuLuksEncryptor, encryptor_for
from trustplane.volumes.encryptors.base import passphrase

MIB = 1 << 20
BIG_MIB = 256
SMALL_MIB = 8
TRIES = 5
EXECUTOR = Executor()


@dataclass
class Site:
    work: Path
    plane: RunningControlPlane
    alice: Cli
    bob: Cli
    alice_password: str


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    volumes = tmp_path / "volumes"
    write_server_config(
        tmp_path / "data",
        volume_backends={"files": {"kind": "file", "directory": str(volumes)}},
    )
    plane = start_control_plane_or_fail(tmp_path, data_dir=tmp_path / "data")
    alice_password, bob_password = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
    with plane.admin() as admin:
        admin.create_volume_type("secure", "files")
        admin.create_user("alice", "user", alice_password)
        admin.create_user("bob", "user", bob_password)
    alice, bob = Cli(tmp_path / "alice.json"), Cli(tmp_path / "bob.json")
    alice.login(plane, "alice", alice_password)
    bob.login(plane, "bob", bob_password)
    current = Site(tmp_path, plane, alice, bob, alice_password)
    try:
        yield current
    finally:
        current.plane.stop()


def _pattern(mib: int) -> str:
    return f"0x{(mib * 37 + 11) % 256:02x}"


def _qemu_io(path: str, key: bytes, commands: list[str]) -> str:
    argv: list[Arg] = ["qemu-io", "--object", key_object(passphrase(key)), "--image-opts"]
    argv.append(f"driver=luks,key-secret={KEY_OBJECT},file.driver=file,file.filename={path}")
    for command in commands:
        argv += ["-c", command]
    return EXECUTOR.run(argv, timeout=600).text


def _with_key(plane: RunningControlPlane, name: str) -> tuple[str, bytes]:
    """The volume's file and key, as an attach releases them (admin), then let go."""
    with plane.admin() as admin:
        release = admin.attach_volume(name, "checker")
        admin.detach_volume(name, "checker")
    location = release.volume.location
    assert isinstance(location, FileLocation)
    return location.path, release.key_bytes()


def _write_pattern(plane: RunningControlPlane, name: str, mib: int) -> None:
    path, key = _with_key(plane, name)
    _qemu_io(path, key, [f"write -P {_pattern(i)} {i}M 1M" for i in range(mib)])


def _holds_pattern(path: str, key: bytes, mib: int) -> bool:
    out = _qemu_io(path, key, [f"read -P {_pattern(i)} {i}M 1M" for i in range(mib)])
    return "Pattern verification failed" not in out and out.count("read 1048576/") == mib


def _opens(path: str, key: bytes) -> bool:
    try:
        QemuLuksEncryptor().check_key(FileLocation(path=path), key)
    except DecryptionKeyError:
        return False
    return True


def _operation_row(data_dir: Path) -> tuple[str, int, int, dict[str, Any]] | None:
    """The re-encryption row as the server (frozen or dead) left it in its database."""
    with contextlib.closing(sqlite3.connect(data_dir / "trustplane.db", timeout=30)) as db:
        row = db.execute("SELECT phase, progress, total, source FROM volume_operations").fetchone()
    if row is None:
        return None
    return row[0], row[1], row[2], json.loads(row[3])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass(frozen=True)
class Caught:
    """A re-encryption of `big` the server was killed in, and the volume before it."""

    old_id: str
    old_path: str
    old_key: bytes
    log_start: int
    progress: int
    daemons: list[int]


def _kill_mid_copy(site: Site) -> Caught:
    """Re-encrypt `big` until its copy is caught with some bytes recorded and not all;
    SIGKILL the server right then.

    Seen in the status a client reads, the server is frozen and its row looked at
    again (the copy went on meanwhile): SIGKILL only if it is still so, else it
    goes on, finishes, and the next try re-encrypts the volume again."""
    plane = site.plane
    pid = plane.process.pid
    assert pid is not None
    watcher = ControlClient(plane.url, plane.ca_file)
    watcher.login("alice", site.alice_password)
    for _ in range(TRIES):
        with plane.admin() as admin:
            log_start = admin.health().log_size
            old_id = admin.volume("big").key_id
        assert old_id is not None
        old_path, old_key = _with_key(plane, "big")

        def reencrypt() -> None:
            client = ControlClient(plane.url, plane.ca_file)
            client.login("alice", site.alice_password)
            with contextlib.suppress(TrustplaneError):  # the server is killed under it
                client.reencrypt_volume("big")

        worker = threading.Thread(target=reencrypt, daemon=True)
        worker.start()
        while worker.is_alive():
            try:
                op = watcher.reencryption("big")
            except NotFoundError:  # not started yet, or over
                time.sleep(0.02)
                continue
            if 0 < op.progress < op.total:
                freeze(pid, plane.data_dir / "trustplane.db")
                left = _operation_row(plane.data_dir)
                if left is not None and left[0] == "copying" and 0 < left[1] < left[2]:
                    os.kill(pid, signal.SIGKILL)
                    worker.join(60)
                    plane.process.stop()  # reaps it; it is dead already
                    assert plane.process.returncode() == -signal.SIGKILL
                    daemons = [int(d["pid"]) for d in left[3]["daemons"]]
                    return Caught(old_id, old_path, old_key, log_start, left[1], daemons)
                thaw(pid)
                break
        worker.join(600)
        assert not worker.is_alive(), "the re-encryption did not end"
    pytest.fail(f"no copy of {TRIES} was caught between its first and its last chunk")


def test_kill_9_mid_copy_then_the_restarted_server_resumes_from_the_recorded_progress(
    site: Site,
) -> None:
    plane = site.plane
    with plane.client() as alice:
        alice.login("alice", site.alice_password)
        alice.create_volume("big", BIG_MIB * MIB, "secure")
    _write_pattern(plane, "big", BIG_MIB)
    caught = _kill_mid_copy(site)
    # What the dead server left: the row in `copying` with progress > 0, its daemons.
    left = _operation_row(plane.data_dir)
    assert left is not None
    phase, progress, total, _ = left
    assert phase == "copying"
    assert 0 < progress < total == BIG_MIB * MIB
    assert progress == caught.progress
    assert len(caught.daemons) == 2
    assert any(_alive(p) for p in caught.daemons)
    # Restart: it carries on by itself from the recorded progress.
    site.plane = plane = start_control_plane(
        site.work, data_dir=plane.data_dir, admin_password=plane.admin_password
    )
    with plane.admin() as admin:
        # Waited for by its log entry, which comes after the volume is `available`.
        logged = wait_for_entry(
            admin,
            caught.log_start,
            lambda e: e["kind"] == "volume.reencrypt" and e["stage"] == "finish",
            timeout=600,
        )
        done = admin.volume("big")
        with pytest.raises(NotFoundError):
            admin.secret(caught.old_id)  # the old KMS key is destroyed
    assert done.state == "available"
    stages = [(e["stage"], e.get("progress")) for e in logged if e["kind"] == "volume.reencrypt"]
    assert stages[0] == ("start", None)
    assert ("resume", progress) in stages  # from the recorded bytes, not from 0
    assert stages[-1] == ("finish", None)
    assert done.key_id not in (None, caught.old_id)
    new_path, new_key = _with_key(plane, "big")
    assert new_path != caught.old_path
    assert not Path(caught.old_path).exists()
    assert _holds_pattern(new_path, new_key, BIG_MIB)
    assert not _opens(new_path, caught.old_key)
    assert not any(_alive(p) for p in caught.daemons)  # the dead run's daemons were stopped


def test_the_cli_reencrypts_and_refuses_attached_volumes_and_stolen_tokens(site: Site) -> None:
    created = site.alice("volume", "create", "small", "--size", f"{SMALL_MIB}M", "--type",
                         "secure", "--json")  # fmt: skip
    assert created.returncode == 0, created.stderr
    old_id = json.loads(created.stdout)["key_id"]
    _write_pattern(site.plane, "small", SMALL_MIB)
    old_path, old_key = _with_key(site.plane, "small")
    # Bob, holding his own valid token, does not even see Alice's volume.
    assert_fails(site.bob("volume", "reencrypt", "small"), ExitCode.NOT_FOUND, "does not exist")
    # Attached: refused, nothing changed.
    with site.plane.admin() as admin:
        admin.attach_volume("small", "vm-1")
        assert_fails(site.alice("volume", "reencrypt", "small"), ExitCode.USAGE, "detach it first")
        admin.detach_volume("small", "vm-1")
    result = site.alice("volume", "reencrypt", "small", "--json")
    assert result.returncode == 0, result.stderr
    volume = json.loads(result.stdout)
    assert volume["state"] == "available"
    assert volume["key_id"] != old_id
    new_path, new_key = _with_key(site.plane, "small")
    assert _holds_pattern(new_path, new_key, SMALL_MIB)
    assert not _opens(new_path, old_key)
    assert not Path(old_path).exists()


# -- iSCSI and RBD: the same path, in-process, on the session's tgtd and Ceph ---------------

ADMIN = Principal("user", "admin", "admin", frozenset())
OWNER = Principal("user", "alice", "user", frozenset())
KINDS = {
    "san": None,  # QEMU LUKS1 on an iSCSI LUN
    "rbd-front": {"provider": "luks", "control_location": "front-end"},  # QEMU LUKS1 on RBD
    "rbd-librbd": {"provider": "luks2", "control_location": "back-end"},  # librbd LUKS2
}


@pytest.fixture(scope="module")
def remote_plane(
    tmp_path_factory: pytest.TempPathFactory, tgtd: RunningTgtd, ceph: RunningCeph
) -> Iterator[ControlPlane]:
    work = tmp_path_factory.mktemp("reencrypt-remote")
    backends = {"san": iscsi_settings(tgtd, work / "luns"), "ceph": rbd_settings(ceph, work)}
    plane = build(ServerSettings(data_dir=work / "data", volume_backends=backends), announce=False)
    for name, encryption in KINDS.items():
        spec = None if encryption is None else EncryptionSpec.model_validate(encryption)
        backend = "san" if name == "san" else "ceph"
        plane.volumes.create_type(ADMIN, NewVolumeType(name=name, backend=backend, encryption=spec))
    yield plane
    plane.close()


def _exported(plane: ControlPlane, name: str) -> tuple[AnyLocation, bytes, Backend, Engine]:
    info = plane.volumes.show(ADMIN, name)
    assert info.key_id is not None
    assert info.location is not None
    assert info.engine is not None
    record = plane.store.find(info.key_id)
    assert record is not None
    backend = plane.volumes.backend(info.backend)
    return info.location, plane.store.unseal(record), backend, info.engine


def _payload(mib: int) -> bytes:
    return b"".join(bytes([(i * 37 + 11) % 256]) * MIB for i in range(mib))


@pytest.mark.parametrize("kind", list(KINDS))
def test_iscsi_and_rbd_volumes_are_reencrypted_the_same_way(
    kind: str, remote_plane: ControlPlane
) -> None:
    plane = remote_plane
    name = f"{kind}-{secrets.token_hex(3)}"
    plane.volumes.create(OWNER, NewVolume(name=name, size=SMALL_MIB * MIB, volume_type=kind))
    old_location, old_key, backend, engine = _exported(plane, name)
    encryptor = encryptor_for(engine, backend.executor)
    with encryptor.open(old_location, old_key, backend.credentials(), loop=False) as opened:
        Path(opened.path).write_bytes(_payload(SMALL_MIB))
    old_id = plane.volumes.show(OWNER, name).key_id
    plane.volumes.reencryption.chunk = MIB
    done = plane.volumes.reencryption.start(OWNER, name)
    assert done.state == "available"
    assert done.key_id != old_id
    new_location, new_key, _, _ = _exported(plane, name)
    assert new_location != old_location
    assert old_id is not None
    assert plane.store.rows.get(old_id) is None
    with pytest.raises(DecryptionKeyError):
        encryptor.check_key(new_location, old_key, backend.credentials())
    with encryptor.open(
        new_location, new_key, backend.credentials(), writable=False, loop=False
    ) as opened:
        assert Path(opened.path).read_bytes()[: SMALL_MIB * MIB] == _payload(SMALL_MIB)
    assert plane.volumes.verify(OWNER, name).passed
    # The old storage (made under the volume's name) is gone from the backend.
    assert old_location == backend.location(name)
    assert not backend.exists(name)
    plane.volumes.delete(OWNER, name)
