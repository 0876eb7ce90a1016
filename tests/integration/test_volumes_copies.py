"""Clone and encrypt in place end to end: a real server (HTTP API), the CLI, file volumes
and Ceph RBD images, qemu-img / qemu-io / cryptsetup luksDump, and a `kill -9` of the
server in the middle of a copy.

Attackers: the holder of a clone's key (with the raw storage of both volumes) opens
nothing of the parent, and the parent's key nothing of the clone; after encrypt in
place, whoever reads the raw backend (the directory, every RADOS object of the pool)
finds no plaintext.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import start_control_plane_or_fail
from control_helpers import Cli, assert_fails, entries_since
from durability_helpers import write_server_config
from missing import component_missing
from volume_helpers import config_entry, iscsi_backend, iscsi_settings, rbd_backend, rbd_settings

from trustplane.api.volume_location import AnyLocation
from trustplane.api.volume_spec import BackendKind, ControlLocation, EncryptionSpec, Provider
from trustplane.api.volumes import EncryptRequest, NewVolumeType
from trustplane.client import ControlClient
from trustplane.control.identity import Principal
from trustplane.control.service import ControlPlane, build
from trustplane.control.settings import ServerSettings
from trustplane.embedded.ceph import RunningCeph
from trustplane.embedded.control_plane import RunningControlPlane, start_control_plane
from trustplane.embedded.tgtd import RunningTgtd, start_tgtd
from trustplane.errors import (
    ConflictError,
    DecryptionKeyError,
    ExitCode,
    NotFoundError,
    TrustplaneError,
)
from trustplane.tools import Executor
from trustplane.tools.command import Arg
from trustplane.volumes.access import NodeCredentials, qemu_node, raw_reader
from trustplane.volumes.attachers.userspace import KEY_OBJECT, key_object
from trustplane.volumes.backends import Backend, FileBackend, IscsiBackend, RbdBackend
from trustplane.volumes.encryptors import QemuLuksEncryptor
from trustplane.volumes.encryptors.base import passphrase

MIB = 1 << 20
EXECUTOR = Executor()


@pytest.fixture(scope="module")
def private_tgtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTgtd]:
    try:
        daemon = start_tgtd(tmp_path_factory.mktemp("copies-tgtd"))
    except TrustplaneError as exc:
        component_missing("tgtd", str(exc))
    with daemon:
        yield daemon


@dataclass(frozen=True)
class Site:
    plane: RunningControlPlane
    admin: Cli
    alice: Cli
    volumes_dir: Path
    backends: dict[str, Backend]
    ceph: RunningCeph
    work: Path
    luns_dir: Path


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory, ceph: RunningCeph, private_tgtd: RunningTgtd
) -> Iterator[Site]:
    work = tmp_path_factory.mktemp("volcopies")
    volumes_dir, luns_dir = work / "volumes", work / "luns"
    write_server_config(
        work / "data",
        volume_backends={
            "files": {"kind": "file", "directory": str(volumes_dir)},
            "san": config_entry(iscsi_settings(private_tgtd, luns_dir)),
            "ceph": config_entry(rbd_settings(ceph, work)),
        },
    )
    plane = start_control_plane_or_fail(work, data_dir=work / "data")
    try:
        password = secrets.token_urlsafe(12)
        with plane.admin() as admin:
            admin.create_user("alice", "user", password)
        admin_cli = Cli(work / "admin-session.json")
        admin_cli.login(plane, "admin", plane.admin_password)
        alice = Cli(work / "alice-session.json")
        alice.login(plane, "alice", password)
        for name, backend in (("files", "files"), ("san", "san"), ("rbd", "ceph")):
            created = admin_cli(
                "volume", "type", "create", name, "--backend", backend,
                "--provider", "luks", "--control-location", "front-end",
            )  # fmt: skip
            assert created.returncode == 0, created.stderr
        backends: dict[str, Backend] = {
            "files": FileBackend(volumes_dir),
            "san": iscsi_backend(private_tgtd, luns_dir),
            "rbd": rbd_backend(ceph),
        }
        yield Site(plane, admin_cli, alice, volumes_dir, backends, ceph, work, luns_dir)
    finally:
        plane.stop()


def _json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    value: dict[str, Any] = json.loads(result.stdout)
    return value


def _key(site: Site, name: str) -> tuple[bytes, AnyLocation]:
    """The volume's key as an operator with volume.attach gets it (released and logged)."""
    with site.plane.admin() as admin:
        release = admin.attach_volume(name, "probe")
        admin.detach_volume(name, "probe")
    assert release.volume.location is not None
    return release.key_bytes(), release.volume.location


def _qemu_io(location: AnyLocation, key: bytes, credentials: NodeCredentials, *cmds: str) -> str:
    node = qemu_node(location, credentials)
    argv: list[Arg] = [
        "qemu-io", "--object", key_object(passphrase(key)), *node.object_args(),
        "--image-opts", f"driver=luks,key-secret={KEY_OBJECT},{node.opts('file.')}",
    ]  # fmt: skip
    for command in cmds:
        argv += ["-c", command]
    out = EXECUTOR.run(argv).text
    assert " failed: " not in out, out
    return out


def _has_pattern(location: AnyLocation, key: bytes, credentials: NodeCredentials) -> bool:
    out = _qemu_io(location, key, credentials, "read -P 0x5a 0 1M", "read -P 0xa5 15M 1M")
    return "Pattern verification failed" not in out and out.count("read 1048576/1048576") == 2


def _opens(location: AnyLocation, key: bytes, credentials: NodeCredentials) -> bool:
    try:
        QemuLuksEncryptor().check_key(location, key, credentials)
    except DecryptionKeyError:
        return False
    return True


def _luks_dump(site: Site, location: AnyLocation, credentials: NodeCredentials) -> dict[str, str]:
    """`cryptsetup luksDump` of the header as the backend's raw reader reads it (for RBD:
    through librbd, no device-mapper): master-key digest, salt and UUID."""
    reader = raw_reader(location, EXECUTOR, credentials)
    header = site.work / f"header-{secrets.token_hex(4)}"
    header.write_bytes(reader.read(0, 2056 * 512 * 2))  # the whole LUKS1 header area
    try:
        text = EXECUTOR.run(["cryptsetup", "luksDump", str(header)]).text
    finally:
        header.unlink()
    fields: dict[str, str] = {}
    current = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith(("\t", " ")):
            current = key.strip()
            fields[current] = value.strip()
        elif current in ("MK digest", "MK salt") and line.strip():
            fields[current] += " " + line.strip()
    return {k: fields[k] for k in ("MK digest", "MK salt", "UUID")}


@pytest.mark.parametrize("volume_type", ["files", "rbd"])
def test_clone_from_the_command_line_gets_a_master_key_of_its_own(
    volume_type: str, site: Site
) -> None:
    parent, child = f"parent-{secrets.token_hex(3)}", f"child-{secrets.token_hex(3)}"
    created = _json(
        site.alice("volume", "create", parent, "--size", "16M", "--type", volume_type, "--json")
    )
    credentials = site.backends[volume_type].credentials()
    parent_key, parent_location = _key(site, parent)
    _qemu_io(parent_location, parent_key, credentials, "write -P 0x5a 0 1M", "write -P 0xa5 15M 1M")

    clone = _json(site.alice("volume", "clone", parent, child, "--json"))
    assert clone["state"] == "available"
    assert clone["key_id"] != created["key_id"]
    child_key, child_location = _key(site, child)
    assert _has_pattern(child_location, child_key, credentials)
    parent_dump = _luks_dump(site, parent_location, credentials)
    child_dump = _luks_dump(site, child_location, credentials)
    assert parent_dump["MK digest"] != child_dump["MK digest"]
    assert parent_dump["MK salt"] != child_dump["MK salt"]
    assert parent_dump["UUID"] != child_dump["UUID"]
    assert not _opens(parent_location, child_key, credentials)  # the clone's key holder
    assert not _opens(child_location, parent_key, credentials)

    if volume_type == "files":  # onto another backend: a file volume's clone on RBD
        elsewhere = f"moved-{secrets.token_hex(3)}"
        moved = _json(site.alice("volume", "clone", parent, elsewhere, "--type", "rbd", "--json"))
        assert moved["location"]["backend"] == "rbd"
        moved_key, moved_location = _key(site, elsewhere)
        assert _has_pattern(moved_location, moved_key, site.backends["rbd"].credentials())
        assert site.alice("volume", "delete", elsewhere).returncode == 0

    snap = f"snap-{secrets.token_hex(3)}"
    shot = site.alice("volume", "snapshot", child, snap)
    assert shot.returncode == 0, shot.stderr
    assert f"snapshot {snap} of {child}" in shot.stdout

    # The parent deleted (its key destroyed first): the clone still reads.
    assert site.alice("volume", "delete", parent).returncode == 0
    assert not site.backends[volume_type].exists(parent)
    assert _has_pattern(child_location, child_key, credentials)
    with site.plane.admin() as admin:
        kinds = [e["kind"] for e in _entries(admin)]
    assert "volume.clone" in kinds
    for name in (child, snap):
        assert site.alice("volume", "delete", name).returncode == 0


def _entries(admin: ControlClient) -> list[dict[str, Any]]:
    return entries_since(admin, max(0, admin.health().log_size - 40))


def test_clone_refusals_from_the_command_line(site: Site) -> None:
    name = f"guarded-{secrets.token_hex(3)}"
    _json(site.alice("volume", "create", name, "--size", "8M", "--type", "files", "--json"))
    assert_fails(
        site.alice("volume", "clone", "missing", "x"), ExitCode.NOT_FOUND, "does not exist"
    )
    assert_fails(site.alice("volume", "clone", name, name), ExitCode.USAGE, "exists already")
    with site.plane.admin() as admin:
        admin.attach_volume(name, "vm-1")
    assert_fails(site.alice("volume", "clone", name, "live"), ExitCode.USAGE, "detach it first")
    with site.plane.admin() as admin:
        admin.detach_volume(name, "vm-1")
        assert [v.name for v in admin.volumes() if v.name in ("x", "live")] == []
        with pytest.raises(NotFoundError, match="not being cloned"):
            admin.volume_copy(name)
    assert not (site.volumes_dir / "live.img").exists()
    assert site.alice("volume", "delete", name).returncode == 0


def _plaintext_marker() -> bytes:
    return f"plaintext-{secrets.token_hex(8)}".encode()


def _write_plaintext(path: Path, marker: bytes, size: int) -> None:
    with path.open("wb") as handle:
        handle.truncate(size)
        handle.write(marker * 64)
        handle.seek(size - 4096)
        handle.write(marker.ljust(4096, b"."))


def _assert_plaintext_kept(filename: str, marker: bytes) -> None:
    """The plaintext (as QEMU opens it) still holds the writer's write and its end marker."""
    kept = EXECUTOR.run(
        ["qemu-io", "-r", "-f", "raw", filename,
         "-c", f"read -P 0x77 {WRITTEN} 4k", "-c", f"read -v {16 * MIB - 4096} 16"]
    ).text  # fmt: skip
    assert "Pattern verification failed" not in kept
    assert marker[:8].hex(" ") in kept


def _plaintext_storage(site: Site, backend: Backend, source: str, marker: bytes) -> str:
    """Plaintext storage named `source` on `backend` (a file, an RBD image or a LUN), 16 MiB
    with `marker` at both ends; returns the filename QEMU opens it by."""
    if isinstance(backend, IscsiBackend):
        lun = backend.create(source, 16 * MIB)
        _write_plaintext(backend.backing_file(lun), marker, 16 * MIB)
        return backend.location(source).url
    if backend.kind is BackendKind.RBD:
        plain = site.work / f"{source}.raw"
        _write_plaintext(plain, marker, 16 * MIB)
        site.ceph.run_as_client(
            "rbd", "import", "--no-progress", str(plain), f"{site.ceph.pool}/{source}"
        )
        plain.unlink()
        return site.ceph.qemu_rbd_uri(source)
    path = site.volumes_dir / f"{source}.img"
    _write_plaintext(path, marker, 16 * MIB)
    return str(path)


def _pool_holds(ceph: RunningCeph, needle: bytes) -> list[str]:
    """Every RADOS object of the pool (what the storage's admin reads), searched."""
    holding = []
    scratch = ceph.work_dir / "tmp"
    scratch.mkdir(exist_ok=True)
    for name in ceph.run_as_client("rados", "-p", ceph.pool, "ls").split():
        target = scratch / "object"
        ceph.run_as_client("rados", "-p", ceph.pool, "get", name, str(target))
        if needle in target.read_bytes():
            holding.append(name)
        target.unlink()
    return holding


@pytest.mark.parametrize("volume_type", ["files", "rbd"])
def test_encrypt_in_place_from_the_command_line(volume_type: str, site: Site) -> None:
    name = f"legacy-{secrets.token_hex(3)}"
    marker = _plaintext_marker()
    backend = site.backends[volume_type]
    plain = site.work / f"{name}.raw"
    _write_plaintext(plain, marker, 16 * MIB)
    if volume_type == "files":
        plain.replace(site.volumes_dir / f"{name}.img")
    else:
        site.ceph.run_as_client(
            "rbd", "import", "--no-progress", str(plain), f"{site.ceph.pool}/{name}"
        )
        plain.unlink()
        assert _pool_holds(site.ceph, marker) != []

    # A user may not adopt storage; an admin may (the plaintext keeps its name).
    assert_fails(
        site.alice("volume", "encrypt", name, "--source", name, "--type", volume_type),
        ExitCode.AUTH,
        "only an admin",
    )
    info = _json(
        site.admin("volume", "encrypt", name, "--source", name, "--type", volume_type, "--json")
    )
    assert (info["state"], info["size"]) == ("available", 16 * MIB)
    credentials = backend.credentials()
    key, location = _key(site, name)
    out = _qemu_io(location, key, credentials, f"read -v 0 {len(marker)}")
    assert marker[:8].hex(" ") in out
    verified = site.admin("volume", "verify", name, "--json")
    assert _json(verified)["passed"] is True
    if volume_type == "files":
        assert [p.name for p in site.volumes_dir.iterdir() if marker in p.read_bytes()] == []
    else:
        assert _pool_holds(site.ceph, marker) == []
        assert [i for i in backend.rbd("ls", site.ceph.pool).split() if i.startswith(name)] == [
            name
        ]
    # Bad input: no source, a name that is taken; nothing left behind.
    assert_fails(
        site.admin("volume", "encrypt", "fresh", "--source", "nowhere", "--type", volume_type),
        ExitCode.NOT_FOUND,
        "does not exist",
    )
    assert_fails(
        site.admin("volume", "encrypt", name, "--source", name, "--type", volume_type),
        ExitCode.USAGE,
        "already",
    )
    assert not backend.exists("fresh")
    with site.plane.admin() as admin:
        assert "fresh" not in [v.name for v in admin.volumes()]
    assert site.admin("volume", "delete", name).returncode == 0


def test_kill_9_of_the_server_mid_copy_leaves_the_plaintext_and_undoes_the_copy(
    tmp_path: Path,
) -> None:
    """A real crash: the server is SIGKILLed while qemu-img copies a 1 GiB plaintext
    file into its encrypted volume; at the next start the partial copy and its key go,
    the plaintext is as it was."""
    volumes_dir, data = tmp_path / "volumes", tmp_path / "data"
    volumes_dir.mkdir()
    write_server_config(
        data, volume_backends={"files": {"kind": "file", "directory": str(volumes_dir)}}
    )
    marker = _plaintext_marker()
    source = volumes_dir / "big.img"
    _write_plaintext(source, marker, 1024 * MIB)
    original = _digest(source)
    plane = start_control_plane_or_fail(tmp_path, data_dir=data)
    password = plane.admin_password
    copier_pid = None
    try:
        with plane.admin() as admin:
            admin.create_volume_type("files", "files")
            server_pid = plane.process.pid
            assert server_pid is not None
        env = {**os.environ, "TRUSTPLANE_SESSION": str(tmp_path / "session.json")}
        cli = Cli(tmp_path / "session.json")
        cli.login(plane, "admin", password)
        request = subprocess.Popen(
            [sys.executable, "-m", "trustplane", "volume", "encrypt", "big",
             "--source", "big", "--type", "files"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            copier_pid = _wait_for_child(server_pid, "convert", request)
            os.killpg(server_pid, signal.SIGKILL)  # start_new_session: group id = leader's pid
            os.kill(copier_pid, signal.SIGKILL)  # the copier we started, in its own group
            request.wait(timeout=60)
        finally:
            if request.poll() is None:
                request.kill()
                request.wait()
        assert plane.process.returncode() == -signal.SIGKILL
        partial = [p.name for p in volumes_dir.iterdir() if p.name != "big.img"]
        assert len(partial) == 1
        assert partial[0].startswith("big.enc-")
        with sqlite3.connect(data / "trustplane.db") as db:
            [(key_id, phase)] = db.execute("SELECT key_id, phase FROM volume_operations").fetchall()
        assert phase == "copying"
    finally:
        plane.stop()
    plane = start_control_plane(tmp_path, data_dir=data, admin_password=password)
    try:
        deadline = time.monotonic() + 120
        while len(list(volumes_dir.iterdir())) > 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [p.name for p in volumes_dir.iterdir()] == ["big.img"]
        assert _digest(source) == original
        with plane.admin() as admin:
            assert admin.volumes() == []
            kinds = [e["kind"] for e in _entries(admin)]
            assert "volume.encrypt.failed" in kinds
            with pytest.raises(NotFoundError):
                admin.secret(key_id)
    finally:
        plane.stop()


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def _wait_for_child(parent: int, word: str, request: subprocess.Popen[bytes]) -> int:
    """The pid of the server's `qemu-img …` child whose argv holds `word` (polled)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert request.poll() is None, request.communicate()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                argv = (entry / "cmdline").read_text(errors="replace").split("\0")
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            tool = Path(argv[0]).name if argv else ""
            if ppid == parent and tool == "qemu-img" and argv[1:2] == [word]:
                return int(entry.name)
        time.sleep(0.01)
    raise AssertionError("no copy started")


def test_encrypt_a_plaintext_iscsi_lun_under_another_name(site: Site) -> None:
    """A LUN cannot be renamed (its IQN is its name): the encrypted volume gets another
    name, and the plaintext LUN is overwritten, then its target and backing file removed."""
    source, name = f"lun-{secrets.token_hex(3)}", f"sealed-{secrets.token_hex(3)}"
    backend = site.backends["san"]
    assert isinstance(backend, IscsiBackend)
    location = backend.create(source, 16 * MIB)
    marker = _plaintext_marker()
    _write_plaintext(backend.backing_file(location), marker, 16 * MIB)
    kept = site.work / f"{source}.kept"
    kept.hardlink_to(backend.backing_file(location))
    assert_fails(
        site.admin("volume", "encrypt", source, "--source", source, "--type", "san"),
        ExitCode.UNSUPPORTED,
        "give the encrypted volume another name",
    )
    info = _json(
        site.admin("volume", "encrypt", name, "--source", source, "--type", "san", "--json")
    )
    assert info["size"] == 16 * MIB
    assert not backend.exists(source)
    assert [p.name for p in site.luns_dir.iterdir() if marker in p.read_bytes()] == []
    assert marker not in kept.read_bytes()
    kept.unlink()
    key, encrypted = _key(site, name)
    out = _qemu_io(encrypted, key, backend.credentials(), f"read -v {16 * MIB - 4096} 16")
    assert marker[:8].hex(" ") in out
    assert site.admin("volume", "delete", name).returncode == 0


WRITTEN = 4 * MIB
"""Where the holder of the in-use test writes (between the plaintext's markers)."""


@contextlib.contextmanager
def _qemu_writer(filename: str) -> Iterator[None]:
    """`qemu-io` with the plaintext open read-write, as a VM's QEMU holds its disk (a file
    open, an RBD watch, an iSCSI login), having written 4 KiB of 0x77 at WRITTEN."""
    holder = subprocess.Popen(
        ["qemu-io", "-f", "raw", filename],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert holder.stdin is not None
    assert holder.stdout is not None
    try:
        holder.stdin.write(f"write -P 0x77 {WRITTEN} 4k\n")
        holder.stdin.flush()
        answer = holder.stdout.readline()
        assert "wrote 4096/4096" in answer, answer + holder.stdout.read()
        yield
    finally:
        holder.stdin.close()  # qemu-io quits: closes the image, logs out
        try:
            holder.wait(timeout=120)
        except subprocess.TimeoutExpired:  # a failed test: QEMU retrying storage now gone
            holder.kill()
            holder.wait()


def _storage(site: Site, volume_type: str, prefixes: tuple[str, ...]) -> list[str]:
    """The backend's storage names that start with one of `prefixes` (a copy's included)."""
    if volume_type == "files":
        names = [p.name.removesuffix(".img") for p in site.volumes_dir.iterdir()]
    elif volume_type == "rbd":
        rbd = site.backends["rbd"]
        assert isinstance(rbd, RbdBackend)
        names = rbd.rbd("ls", site.ceph.pool).split()
    else:
        names = [p.name.removesuffix(".lun") for p in site.luns_dir.iterdir()]
    return sorted(n for n in names if n.startswith(prefixes))


@pytest.mark.parametrize(
    ("volume_type", "who"),
    [
        ("files", r"open by QEMU \(pid \d+, qemu-io\)"),
        ("rbd", r"watched by client\.\d+ at \S+"),
        ("san", r"initiator iqn\.\S+ at \S+ logged in to iqn\.\S+"),
    ],
)
def test_encrypt_in_place_refuses_a_plaintext_a_vm_writes(
    volume_type: str, who: str, site: Site
) -> None:
    """Attacker/accident: a QEMU writes to the plaintext (a file, an RBD image, a LUN); its
    writes during the copy would go with the plaintext. Refused with who it is, nothing
    made, the plaintext with its write; once QEMU is gone encrypt goes through and the
    encrypted volume holds that write."""
    source = f"busy-{secrets.token_hex(3)}"
    name = f"sealed-{secrets.token_hex(3)}" if volume_type == "san" else source
    marker = _plaintext_marker()
    backend = site.backends[volume_type]
    filename = _plaintext_storage(site, backend, source, marker)
    encrypt = ("volume", "encrypt", name, "--source", source, "--type", volume_type)
    with site.plane.admin() as admin:
        start = admin.health().log_size
    with _qemu_writer(filename):
        refused = site.admin(*encrypt)
    assert_fails(refused, ExitCode.USAGE, "is in use: ")
    assert re.search(who, refused.stderr), refused.stderr
    assert _storage(site, volume_type, (source, name)) == [source]
    _assert_plaintext_kept(filename, marker)
    with site.plane.admin() as admin:
        assert name not in [v.name for v in admin.volumes()]
        kinds = [e["kind"] for e in entries_since(admin, start)]
        assert [k for k in kinds if k.startswith(("kms.", "volume."))] == []
    info = _json(site.admin(*encrypt, "--json"))
    assert info["state"] == "available"
    key, location = _key(site, name)
    out = _qemu_io(location, key, backend.credentials(), f"read -P 0x77 {WRITTEN} 4k")
    assert "Pattern verification failed" not in out
    assert not backend.exists(source) or name == source
    assert site.admin("volume", "delete", name).returncode == 0


# -- in-process, with the copy's hooks: a writer that comes during the copy ------------------

ADMIN = Principal("user", "admin", "admin", frozenset())


@pytest.fixture(scope="module")
def hooked_plane(
    tmp_path_factory: pytest.TempPathFactory, ceph: RunningCeph, private_tgtd: RunningTgtd
) -> Iterator[ControlPlane]:
    """The service in this process (so a test can hook the copy) on the same tgtd and Ceph."""
    work = tmp_path_factory.mktemp("copies-hooked")
    backends = {
        "san": iscsi_settings(private_tgtd, work / "luns"),
        "ceph": rbd_settings(ceph, work),
    }
    plane = build(ServerSettings(data_dir=work / "data", volume_backends=backends), announce=False)
    front_end = EncryptionSpec(provider=Provider.LUKS, control_location=ControlLocation.FRONT_END)
    plane.volumes.create_type(ADMIN, NewVolumeType(name="san", backend="san"))
    plane.volumes.create_type(
        ADMIN, NewVolumeType(name="rbd", backend="ceph", encryption=front_end)
    )
    yield plane
    plane.close()


@pytest.mark.parametrize("volume_type", ["rbd", "san"])
def test_a_vm_that_starts_writing_during_the_copy_aborts_it(
    volume_type: str, hooked_plane: ControlPlane, site: Site
) -> None:
    """A QEMU opens the plaintext RBD image (or logs in to the LUN) once the encrypted copy
    is made, after the first look, and writes while it is copied: the look before the
    swap sees it; the copy and its key go, the plaintext stays, with the write."""
    plane = hooked_plane
    source = f"late-{secrets.token_hex(3)}"
    name = f"sealed-{secrets.token_hex(3)}" if volume_type == "san" else source
    backend = plane.volumes.backend("san" if volume_type == "san" else "ceph")
    marker = _plaintext_marker()
    filename = _plaintext_storage(site, backend, source, marker)
    start, _ = plane.log.head()
    with contextlib.ExitStack() as stack:
        plane.volumes.copies.after_target = lambda _: stack.enter_context(_qemu_writer(filename))
        try:
            with pytest.raises(
                ConflictError, match=r"in use during the copy \(the copy is undone\)"
            ):
                plane.volumes.copies.encrypt(
                    ADMIN, EncryptRequest(name=name, source=source, volume_type=volume_type)
                )
        finally:
            plane.volumes.copies.after_target = None
    assert backend.exists(source)
    found = [n for n in _names_on(backend) if n.startswith((source, name))]
    assert found == [source]
    _assert_plaintext_kept(filename, marker)
    assert name not in [v.name for v in plane.volumes.volumes(ADMIN)]
    size, _ = plane.log.head()
    kinds = [json.loads(plane.log.entry(i))["kind"] for i in range(start, size)]
    assert "volume.encrypt.failed" in kinds
    assert "volume.encrypt" not in kinds
    backend.delete(backend.location(source))


def _names_on(backend: Backend) -> list[str]:
    if isinstance(backend, RbdBackend):
        return backend.rbd("ls", backend.pool).split()
    assert isinstance(backend, IscsiBackend)
    return [p.name.removesuffix(".lun") for p in backend.store.iterdir()]
