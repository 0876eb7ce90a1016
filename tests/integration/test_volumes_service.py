"""The block-storage service end to end: a real control plane, real storage, a real VM.

The server is configured with three backends (files, an iSCSI target on
tgtd, a Ceph RBD pool). For each: a user creates a volume with `trustplane
volume create` (the KMS generates its key, the record keeps its UUID); the
compute node attaches it to a running TCG guest with `trustplane volume
attach --live`, logged in with its own key; the guest reads the plaintext;
the storage holds none; detach leaves no libvirt secret and no file with the
key; delete destroys the key first (the KMS answers not found), then the
storage. And the attackers: a node the policy does not name, a node that is
not attested where the policy asks for it, a stolen user token, a volume
replaced behind the service's back, a crash between the key's destruction
and the storage's.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest
from conftest import start_control_plane_or_fail
from control_helpers import Cli, add_policy_rule, assert_fails, entries_since
from durability_helpers import write_server_config
from missing import component_missing
from volume_helpers import (
    config_entry,
    files_holding,
    iscsi_backend,
    iscsi_settings,
    raw_holds,
    rbd_backend,
    rbd_settings,
)

from trustplane.atomic import atomic_write
from trustplane.client import ControlClient
from trustplane.crypto.keys import generate_key_pair
from trustplane.embedded.ceph import RunningCeph
from trustplane.embedded.control_plane import RunningControlPlane, start_control_plane
from trustplane.embedded.guest_kernel import GuestKernel, guest_kernel
from trustplane.embedded.libvirtd import RunningLibvirtd
from trustplane.embedded.tgtd import RunningTgtd, start_tgtd
from trustplane.embedded.volume_guest import ScannerGuest, build_scanner_initrd
from trustplane.errors import (
    DecryptionKeyError,
    ExitCode,
    Forbidden,
    NotFoundError,
    TrustplaneError,
)
from trustplane.volumes.attachers.libvirt import LibvirtAttacher
from trustplane.volumes.backends import Backend, FileBackend
from trustplane.volumes.encryptors import encryptor_for
from trustplane.volumes.encryptors.base import passphrase

NODE = "compute-1"
STRANGER = "compute-2"
ATTESTED_ONLY = "compute-3"
POLICY = f"""\
  - subjects: ["node:{NODE}"]
    actions: [volume.attach]
    resources: ["volume:*"]
  - subjects: ["node:{ATTESTED_ONLY}"]
    actions: [volume.attach]
    resources: ["volume:*"]
    require_attestation: true
"""


@dataclass(frozen=True)
class Site:
    plane: RunningControlPlane
    admin: Cli
    alice: Cli
    alice_password: str
    node_keys: dict[str, Path]
    volumes_dir: Path
    ceph_key_file: Path
    backends: dict[str, Backend]


@pytest.fixture(scope="module")
def private_tgtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTgtd]:
    try:
        daemon = start_tgtd(tmp_path_factory.mktemp("svc-tgtd"))
    except TrustplaneError as exc:
        component_missing("tgtd", str(exc))
    with daemon:
        yield daemon


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory, ceph: RunningCeph, private_tgtd: RunningTgtd
) -> Iterator[Site]:
    work = tmp_path_factory.mktemp("volsvc")
    volumes_dir, luns = work / "volumes", work / "luns"
    rbd = rbd_settings(ceph, work)
    assert rbd.key_file is not None
    ceph_key_file = rbd.key_file
    write_server_config(
        work / "data",
        volume_backends={
            "files": {"kind": "file", "directory": str(volumes_dir)},
            "san": config_entry(iscsi_settings(private_tgtd, luns)),
            "ceph": config_entry(rbd),
        },
    )
    plane = start_control_plane_or_fail(work, data_dir=work / "data")
    try:
        add_policy_rule(plane, POLICY)
        alice_password = secrets.token_urlsafe(12)
        node_keys = {}
        with plane.admin() as admin:
            admin.create_user("alice", "user", alice_password)
            for node in (NODE, STRANGER, ATTESTED_ONLY):
                node_keys[node] = work / f"{node}.pem"
                private, public = generate_key_pair("ec-p256")
                atomic_write(node_keys[node], private, mode=0o600)
                admin.register_node(node, "host", public.decode())
        admin_cli = Cli(work / "admin-session.json")
        admin_cli.login(plane, "admin", plane.admin_password)
        alice = Cli(work / "alice-session.json")
        alice.login(plane, "alice", alice_password)
        for name, backend in (("files", "files"), ("san", "san"), ("rbd", "ceph")):
            created = admin_cli(
                "volume", "type", "create", name, "--backend", backend,
                "--provider", "luks", "--control-location", "front-end", "--json",
            )  # fmt: skip
            assert created.returncode == 0, created.stderr
        backends: dict[str, Backend] = {
            "files": FileBackend(volumes_dir),
            "san": iscsi_backend(private_tgtd, luns),
            "rbd": rbd_backend(ceph),
        }
        yield Site(
            plane, admin_cli, alice, alice_password, node_keys, volumes_dir, ceph_key_file,
            backends,
        )  # fmt: skip
    finally:
        plane.stop()


@pytest.fixture(scope="module")
def kernel() -> GuestKernel:
    try:
        return guest_kernel()
    except TrustplaneError as exc:
        component_missing("guest kernel (linux-image-cloud-amd64, downloaded)", str(exc))


@pytest.fixture(scope="module")
def guest(
    libvirtd: RunningLibvirtd, tmp_path_factory: pytest.TempPathFactory, kernel: GuestKernel
) -> Iterator[ScannerGuest]:
    directory = tmp_path_factory.mktemp("svc-guest")
    initrd = build_scanner_initrd(directory / "initrd.img", kernel)
    conn = libvirt.open(libvirtd.uri)
    machine = ScannerGuest.define(conn, directory, kernel, initrd)
    try:
        machine.start()
        yield machine
    finally:
        machine.remove()
        conn.close()


def _node_cli(site: Site, libvirtd: RunningLibvirtd, node: str, *args: str) -> list[str]:
    return [
        *args,
        "--libvirt", libvirtd.uri,
        "--node", node, "--node-key", str(site.node_keys[node]),
        "--server", site.plane.url, "--ca", str(site.plane.ca_file),
    ]  # fmt: skip


def _secrets(libvirtd: RunningLibvirtd) -> list[str]:
    lines = libvirtd.virsh("secret-list", check=True).text.splitlines()
    return [line.split()[0] for line in lines[2:] if line.strip()]


def _create(site: Site, name: str, volume_type: str) -> dict[str, Any]:
    result = site.alice("volume", "create", name, "--size", "16M", "--type", volume_type, "--json")
    assert result.returncode == 0, result.stderr
    created: dict[str, Any] = json.loads(result.stdout)
    return created


def _write_marker(site: Site, name: str, volume_type: str, marker: bytes) -> None:
    """An operator writes through the encrypted path (user space), then lets go."""
    with site.plane.admin() as admin:
        release = admin.attach_volume(name, "writer")
        volume = release.volume
        assert volume.location is not None
        assert volume.engine is not None
        backend = site.backends[volume_type]
        with (
            encryptor_for(volume.engine).open(
                volume.location, release.key_bytes(), backend.credentials()
            ) as opened,
            Path(opened.path).open("r+b") as plain,
        ):
            plain.write(marker.ljust(4096, b"\0"))
        admin.detach_volume(name, "writer")


@pytest.mark.parametrize("volume_type", ["files", "san", "rbd"])
def test_create_attach_read_detach_delete(
    volume_type: str,
    site: Site,
    guest: ScannerGuest,
    libvirtd: RunningLibvirtd,
    request: pytest.FixtureRequest,
) -> None:
    name = f"{volume_type}-{secrets.token_hex(3)}"
    created = _create(site, name, volume_type)
    key_id = created["key_id"]
    assert created["state"] == "available"
    assert created["header"]["uuid"]
    assert created["header"]["digest"].startswith("sha256:")
    assert created["owner"] == "user:alice"
    marker = f"trustplane-svc-{secrets.token_hex(6)}".encode()
    _write_marker(site, name, volume_type, marker)
    backend = site.backends[volume_type]
    with site.plane.admin() as admin:
        volume = admin.volume(name)
        assert volume.location is not None
        ceph = request.getfixturevalue("ceph") if volume_type == "rbd" else None
        assert not raw_holds(backend, volume.location, marker, ceph)
        start = admin.health().log_size

    extra = ["--ceph-key-file", str(site.ceph_key_file)] if volume_type == "rbd" else []
    attached = site.admin(
        *_node_cli(
            site, libvirtd, NODE, "volume", "attach", name, "--domain", guest.name, "--live"
        ),
        *extra,
    )
    assert attached.returncode == 0, attached.stderr
    assert f"attached volume {name} to {guest.name}" in attached.stdout
    assert guest.disk_data(name).startswith(marker.decode())
    assert len(_secrets(libvirtd)) == (2 if volume_type == "rbd" else 1)
    shown = json.loads(site.alice("volume", "show", name, "--json").stdout)
    assert shown["attachment"]["subject"] == f"node:{NODE}"
    assert shown["attachment"]["domain"] == guest.name

    detached = site.admin(
        *_node_cli(site, libvirtd, NODE, "volume", "detach", name, "--domain", guest.name)
    )
    assert detached.returncode == 0, detached.stderr
    guest.wait_gone(name)
    assert _secrets(libvirtd) == []
    with site.plane.admin() as admin:
        assert admin.volume(name).attachment is None
        released = [e for e in entries_since(admin, start) if e["kind"] == "volume.attach"]
        assert [(e["subject"], e["decision"], e["secret"]) for e in released] == [
            (f"node:{NODE}", "allow", key_id)
        ]
        assert admin.secret(key_id).id == key_id  # admins see the key's metadata, never its bytes
    with site.plane.admin() as admin:  # the key, to look for it (an operator may have it)
        key = admin.attach_volume(name, "audit").key_bytes()
        admin.detach_volume(name, "audit")
    for root in (libvirtd.work_dir, Path("/dev/shm"), site.plane.data_dir):
        for needle in (marker, key, passphrase(key)):
            assert files_holding(root, needle) == []

    deleted = site.alice("volume", "delete", name)
    assert deleted.returncode == 0, deleted.stderr
    assert not backend.exists(name)
    with site.plane.admin() as admin, pytest.raises(NotFoundError):
        admin.secret(key_id)
    assert_fails(site.alice("volume", "show", name), ExitCode.NOT_FOUND, "does not exist")


def test_attackers_get_no_key(site: Site, guest: ScannerGuest, libvirtd: RunningLibvirtd) -> None:
    name = f"guarded-{secrets.token_hex(3)}"
    created = _create(site, name, "files")
    key_id = created["key_id"]
    with site.plane.admin() as admin:
        start = admin.health().log_size

    # A node the policy does not name: the volume does not exist, as far as it can tell.
    stranger = site.admin(
        *_node_cli(site, libvirtd, STRANGER, "volume", "attach", name, "--domain", guest.name)
    )
    assert_fails(stranger, ExitCode.NOT_FOUND, f"volume '{name}' does not exist")
    # A node named by a rule that requires attestation, which it has not passed.
    unattested = site.admin(
        *_node_cli(site, libvirtd, ATTESTED_ONLY, "volume", "attach", name, "--domain", guest.name)
    )
    assert_fails(unattested, ExitCode.AUTH, "attestation required")
    assert _secrets(libvirtd) == []

    # A stolen user token (the owner's): no key through the volumes API nor the KMS's.
    with ControlClient(site.plane.url, site.plane.ca_file) as thief:
        thief.login("alice", site.alice_password)
        with pytest.raises(Forbidden, match=r"volume\.attach"):
            thief.attach_volume(name, "thief-vm")
        with pytest.raises((Forbidden, NotFoundError)):
            thief.secret_payload(key_id)
    with site.plane.admin() as admin:
        assert admin.volume(name).attachment is None
        decisions = [
            (e["subject"], e["decision"])
            for e in entries_since(admin, start)
            if e["kind"] in ("volume.attach", "kms.release")
        ]
    assert decisions == [
        (f"node:{STRANGER}", "deny"),
        (f"node:{ATTESTED_ONLY}", "deny"),
        ("user:alice", "deny"),
        ("user:alice", "deny"),
    ]
    assert site.alice("volume", "delete", name).returncode == 0


def test_a_volume_replaced_behind_the_service_is_refused_at_attach(
    site: Site, guest: ScannerGuest, libvirtd: RunningLibvirtd
) -> None:
    name, other = f"real-{secrets.token_hex(3)}", f"fake-{secrets.token_hex(3)}"
    _create(site, name, "files")
    _create(site, other, "files")
    # Someone with write access to the storage puts another LUKS volume in its place.
    (site.volumes_dir / f"{other}.img").replace(site.volumes_dir / f"{name}.img")
    refused = site.admin(
        *_node_cli(site, libvirtd, NODE, "volume", "attach", name, "--domain", guest.name, "--live")
    )
    assert_fails(refused, ExitCode.INTEGRITY, "replaced or re-formatted")
    assert _secrets(libvirtd) == []
    for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
        assert f"<serial>{name}</serial>" not in guest.domain.XMLDesc(flags)
    # Nothing half-done: the attachment the release recorded is cleared again.
    shown = json.loads(site.alice("volume", "show", name, "--json").stdout)
    assert shown["attachment"] is None
    assert site.alice("volume", "delete", name).returncode == 0
    assert site.alice("volume", "delete", other).returncode == 0


def test_a_delete_interrupted_after_the_key_is_shredded_finishes_at_the_next_start(
    tmp_path: Path,
) -> None:
    volumes_dir = tmp_path / "volumes"
    data = tmp_path / "data"
    write_server_config(
        data, volume_backends={"files": {"kind": "file", "directory": str(volumes_dir)}}
    )
    plane = start_control_plane_or_fail(tmp_path, data_dir=data)
    password = plane.admin_password
    try:
        with plane.admin() as admin:
            admin.create_volume_type("files", "files")
            created = admin.create_volume("doomed", 8 << 20, "files")
            key_id = created.key_id
            assert key_id is not None
    finally:
        plane.stop()
    assert (volumes_dir / "doomed.img").exists()
    # The state a crash right after the shredding leaves: key gone, record
    # `shredded`, storage still there.
    with sqlite3.connect(data / "trustplane.db") as db:
        db.execute("DELETE FROM secrets WHERE id = ?", (key_id,))
        db.execute("UPDATE volumes SET state = 'shredded' WHERE name = 'doomed'")
    plane = start_control_plane(tmp_path, data_dir=data, admin_password=password)
    try:
        deadline = time.monotonic() + 60
        while (volumes_dir / "doomed.img").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not (volumes_dir / "doomed.img").exists()
        with plane.admin() as admin:
            assert admin.volumes() == []
            kinds = [e["kind"] for e in entries_since(admin, 0)]
        assert kinds[-1] == "volume.destroyed"
    finally:
        plane.stop()


def test_nothing_on_the_host_holds_a_released_key(site: Site, libvirtd: RunningLibvirtd) -> None:
    """The attach path's only copy of the key is libvirt's ephemeral secret; after the
    tests above, no file under libvirt's directories or /dev/shm holds a passphrase."""
    name = f"probe-{secrets.token_hex(3)}"
    _create(site, name, "files")
    with site.plane.admin() as admin:
        key = admin.attach_volume(name, "probe").key_bytes()
        admin.detach_volume(name, "probe")
    for root in (libvirtd.work_dir, Path("/dev/shm"), site.plane.data_dir):
        assert files_holding(root, passphrase(key)) == []
        assert files_holding(root, key) == []
    assert site.alice("volume", "delete", name).returncode == 0


def test_verify_and_extend_from_the_command_line(site: Site) -> None:
    """The owner proves the volume is encrypted, grows it, and sees tampering fail."""
    name = f"life-{secrets.token_hex(3)}"
    created = _create(site, name, "files")
    verified = site.alice("volume", "verify", name, "--json")
    assert verified.returncode == 0, verified.stderr
    report = json.loads(verified.stdout)
    assert report["passed"] is True
    assert {c["name"]: c["passed"] for c in report["checks"]} == {
        "luks-header": True,
        "header-uuid": True,
        "header-digest": True,
        "cipher": True,
        "payload": True,
    }
    table = site.alice("volume", "verify", name)
    assert table.returncode == 0, table.stderr
    assert "payload" in table.stdout
    assert "FAILED" not in table.stdout

    grown = site.alice("volume", "extend", name, "--size", "32M", "--json")
    assert grown.returncode == 0, grown.stderr
    assert json.loads(grown.stdout)["size"] == 32 << 20
    raw = site.volumes_dir / f"{name}.img"
    assert raw.stat().st_size == created["header"]["header_bytes"] + (32 << 20)
    assert_fails(site.alice("volume", "extend", name, "--size", "16M"), ExitCode.USAGE, "shrinking")

    rotated = site.alice("volume", "rotate-key", name, "--json")
    assert rotated.returncode == 0, rotated.stderr
    assert json.loads(rotated.stdout)["key_id"] != created["key_id"]
    assert site.alice("volume", "verify", name).returncode == 0
    with site.plane.admin() as admin:  # the old key is destroyed in the KMS
        assert admin.volume(name).key_id == json.loads(rotated.stdout)["key_id"]
        with pytest.raises(NotFoundError):
            admin.secret(created["key_id"])

    # Someone with the storage writes text around the encryption, into the payload.
    with raw.open("r+b") as handle:
        handle.seek(created["header"]["header_bytes"])
        handle.write(b"quarterly numbers, in the clear\n" * (1 << 15))
    tampered = site.alice("volume", "verify", name, "--json")
    assert_fails(tampered, ExitCode.INTEGRITY, f"volume {name} failed verification: payload")
    assert json.loads(tampered.stdout)["passed"] is False
    assert site.alice("volume", "delete", name).returncode == 0


def test_an_iscsi_volume_verifies_and_rotates_its_key(site: Site) -> None:
    """On a LUN of tgtd, through libiscsi: the raw LUN proves it is encrypted, and after
    rotate-key the old key opens nothing while the new one reads the data."""
    name = f"san-life-{secrets.token_hex(3)}"
    _create(site, name, "san")
    marker = f"trustplane-rotate-{secrets.token_hex(6)}".encode()
    _write_marker(site, name, "san", marker)
    verified = site.alice("volume", "verify", name, "--json")
    assert verified.returncode == 0, verified.stderr
    report = json.loads(verified.stdout)
    assert report["passed"] is True
    assert report["payload"]["ciphertext"] >= 1  # the marker's sector, and more
    backend = site.backends["san"]
    with site.plane.admin() as admin:
        old = admin.attach_volume(name, "probe")
        admin.detach_volume(name, "probe")
    rotated = site.alice("volume", "rotate-key", name)
    assert rotated.returncode == 0, rotated.stderr
    assert "destroyed" in rotated.stdout
    assert old.volume.location is not None
    assert old.volume.engine is not None
    encryptor = encryptor_for(old.volume.engine)
    with pytest.raises(DecryptionKeyError):
        encryptor.check_key(old.volume.location, old.key_bytes(), backend.credentials())
    with site.plane.admin() as admin:
        new = admin.attach_volume(name, "probe")
        assert new.key_bytes() != old.key_bytes()
        location = new.volume.location
        assert location is not None
        with (
            encryptor.open(location, new.key_bytes(), backend.credentials()) as opened,
            Path(opened.path).open("rb") as plain,
        ):
            assert plain.read(len(marker)) == marker
        admin.detach_volume(name, "probe")
    assert site.alice("volume", "verify", name).returncode == 0
    assert site.alice("volume", "delete", name).returncode == 0


MIB = 1 << 20


def _usable_and_start(site: Site, name: str, volume_type: str, length: int) -> tuple[int, bytes]:
    """Through the encrypted path with the released key: the usable size and the first bytes."""
    with site.plane.admin() as admin:
        release = admin.attach_volume(name, "probe")
        volume = release.volume
        assert volume.location is not None
        assert volume.engine is not None
        backend = site.backends[volume_type]
        encryptor = encryptor_for(volume.engine)
        try:
            usable = encryptor.usable_size(volume.location, release.key_bytes(),
                                           backend.credentials())  # fmt: skip
            with (
                encryptor.open(
                    volume.location, release.key_bytes(), backend.credentials(), writable=False
                ) as opened,  # fmt: skip
                Path(opened.path).open("rb") as plain,
            ):
                start = plain.read(length)
        finally:
            admin.detach_volume(name, "probe")
    return usable, start


def _extends(admin: ControlClient, start: int, name: str) -> list[dict[str, Any]]:
    return [e for e in entries_since(admin, start) if e["kind"] == "volume.extend"
            and e["volume"] == name]  # fmt: skip


@pytest.mark.parametrize("volume_type", ["san", "rbd"])
def test_offline_extend_of_a_lun_and_an_rbd_image(site: Site, volume_type: str) -> None:
    """The owner grows a detached LUN (tgtd re-reads it) or RBD image: the data stays, the
    volume opens with exactly the size asked, a shrink is refused; logged."""
    name = f"{volume_type}-grow-{secrets.token_hex(3)}"
    _create(site, name, volume_type)
    marker = f"trustplane-grow-{secrets.token_hex(6)}".encode()
    _write_marker(site, name, volume_type, marker)
    with site.plane.admin() as admin:
        start = admin.health().log_size
    if volume_type == "san":
        # An initiator logged in to the LUN (not through an attach): tgtd cannot grow it
        # under it, so the extend fails and the record keeps its size and state.
        with site.plane.admin() as admin:
            release = admin.attach_volume(name, "holder")
            admin.detach_volume(name, "holder")
        assert release.volume.location is not None
        assert release.volume.engine is not None
        backend = site.backends[volume_type]
        with encryptor_for(release.volume.engine).open(
            release.volume.location, release.key_bytes(), backend.credentials()
        ):
            busy = site.alice("volume", "extend", name, "--size", "48M")
        assert_fails(busy, ExitCode.USAGE, "an initiator is logged in")
        shown = json.loads(site.alice("volume", "show", name, "--json").stdout)
        assert (shown["size"], shown["state"]) == (16 * MIB, "available")
        with site.plane.admin() as admin:
            start = admin.health().log_size
    grown = site.alice("volume", "extend", name, "--size", "48M", "--json")
    assert grown.returncode == 0, grown.stderr
    assert json.loads(grown.stdout)["size"] == 48 * MIB
    assert json.loads(grown.stdout)["state"] == "available"
    assert _usable_and_start(site, name, volume_type, len(marker)) == (48 * MIB, marker)
    assert_fails(site.alice("volume", "extend", name, "--size", "32M"), ExitCode.USAGE, "shrinking")
    with site.plane.admin() as admin:
        assert [(e["subject"], e["from"], e["to"]) for e in _extends(admin, start, name)] == [
            ("user:alice", 16 * MIB, 48 * MIB)
        ]
    assert site.alice("volume", "delete", name).returncode == 0


def _extend_online(
    site: Site, libvirtd: RunningLibvirtd, node: str, name: str, domain: str, size: str
) -> Any:
    return site.admin(
        *_node_cli(
            site,
            libvirtd,
            node,
            "volume",
            "extend",
            name,
            "--domain",
            domain,
            "--size",
            size,
            "--json",
        )
    )


@pytest.mark.parametrize("volume_type", ["files", "rbd"])
def test_online_extend_on_the_attachments_host_and_nowhere_else(
    site: Site, guest: ScannerGuest, libvirtd: RunningLibvirtd, volume_type: str
) -> None:
    """The node holding the attachment grows the disk in the running guest (virsh
    blockresize): the guest sees exactly the size asked (libvirt and QEMU's LUKS driver
    add the header themselves), the record follows, the data stays. Everyone else with
    exactly the access they have is refused, and nothing changes."""
    name = f"{volume_type}-live-{secrets.token_hex(3)}"
    _create(site, name, volume_type)
    marker = f"trustplane-live-{secrets.token_hex(6)}".encode()
    _write_marker(site, name, volume_type, marker)
    extra = ["--ceph-key-file", str(site.ceph_key_file)] if volume_type == "rbd" else []
    attached = site.admin(
        *_node_cli(site, libvirtd, NODE, "volume", "attach", name, "--domain", guest.name,
                   "--live"), *extra,
    )  # fmt: skip
    assert attached.returncode == 0, attached.stderr
    guest.wait_size(name, 16 * MIB)
    with site.plane.admin() as admin:
        start = admin.health().log_size

    # A node the policy does not name: no such volume, as far as it can tell.
    stranger = _extend_online(site, libvirtd, STRANGER, name, guest.name, "32M")
    assert_fails(stranger, ExitCode.NOT_FOUND, f"volume '{name}' does not exist")
    # A node the policy allows volume.attach (it sees the volume) but that holds no attachment.
    other = _extend_online(site, libvirtd, ATTESTED_ONLY, name, guest.name, "32M")
    assert_fails(other, ExitCode.AUTH, f"is not attached to domain {guest.name} of node:")
    # The owner: not from her login (she holds no attachment), and not offline while attached.
    owner = site.alice(
        "volume", "extend", name, "--domain", guest.name, "--size", "32M",
        "--libvirt", libvirtd.uri,
    )  # fmt: skip
    assert_fails(owner, ExitCode.AUTH, "is not attached to domain")
    offline = site.alice("volume", "extend", name, "--size", "32M")
    assert_fails(offline, ExitCode.USAGE, "extend it online on that host")
    # The holder, naming a domain that is not the attachment's.
    wrong = _extend_online(site, libvirtd, NODE, name, "another-vm", "32M")
    assert_fails(wrong, ExitCode.AUTH, "is not attached to domain another-vm")
    shown = json.loads(site.alice("volume", "show", name, "--json").stdout)
    assert (shown["size"], shown["state"]) == (16 * MIB, "available")
    assert guest.sizes(name) == [16 * MIB]
    with site.plane.admin() as admin:
        assert _extends(admin, start, name) == []

    grown = _extend_online(site, libvirtd, NODE, name, guest.name, "32M")
    assert grown.returncode == 0, grown.stderr
    assert json.loads(grown.stdout)["size"] == 32 * MIB
    guest.wait_size(name, 32 * MIB)
    assert guest.sizes(name) == [16 * MIB, 32 * MIB]
    shown = json.loads(site.alice("volume", "show", name, "--json").stdout)
    assert (shown["size"], shown["state"]) == (32 * MIB, "available")
    assert shown["attachment"]["domain"] == guest.name
    # libvirt passed the size on as it was; QEMU's LUKS driver put its header on top.
    with site.plane.admin() as admin:
        volume = admin.volume(name)
    assert volume.location is not None
    assert volume.header is not None
    raw = site.backends[volume_type].size(volume.location)
    assert raw == volume.header.header_bytes + 32 * MIB
    with site.plane.admin() as admin:
        logged = [(e["subject"], e["online"], e["domain"], e["phase"], e["from"], e["to"])
                  for e in _extends(admin, start, name)]  # fmt: skip
    assert logged == [
        (f"node:{NODE}", True, guest.name, "started", 16 * MIB, 32 * MIB),
        (f"node:{NODE}", True, guest.name, "done", 16 * MIB, 32 * MIB),
    ]
    shrink = _extend_online(site, libvirtd, NODE, name, guest.name, "16M")
    assert_fails(shrink, ExitCode.USAGE, "shrinking it is refused")

    detached = site.admin(
        *_node_cli(site, libvirtd, NODE, "volume", "detach", name, "--domain", guest.name)
    )
    assert detached.returncode == 0, detached.stderr
    guest.wait_gone(name)
    assert _usable_and_start(site, name, volume_type, len(marker)) == (32 * MIB, marker)
    assert site.alice("volume", "delete", name).returncode == 0


def test_a_failed_online_extend_leaves_the_record_as_it_was(
    site: Site, guest: ScannerGuest, libvirtd: RunningLibvirtd
) -> None:
    """The disk is gone from the domain behind the control plane's back: the resize fails,
    the host reports it, the record keeps its size and state (logged as failed). An
    attached LUN is not grown online at all (tgtd cannot while the VM is logged in)."""
    name = f"gone-{secrets.token_hex(3)}"
    _create(site, name, "files")
    attached = site.admin(
        *_node_cli(site, libvirtd, NODE, "volume", "attach", name, "--domain", guest.name,
                   "--live")
    )  # fmt: skip
    assert attached.returncode == 0, attached.stderr
    guest.wait_size(name, 16 * MIB)
    LibvirtAttacher(libvirtd.uri).detach(guest.name, name)
    guest.wait_gone(name)
    with site.plane.admin() as admin:
        start = admin.health().log_size
    failed = _extend_online(site, libvirtd, NODE, name, guest.name, "32M")
    assert_fails(failed, ExitCode.NOT_FOUND, "has no disk with serial")
    shown = json.loads(site.alice("volume", "show", name, "--json").stdout)
    assert (shown["size"], shown["state"]) == (16 * MIB, "available")
    assert (volume_raw := site.volumes_dir / f"{name}.img").stat().st_size == (
        shown["header"]["header_bytes"] + 16 * MIB
    ), volume_raw
    with site.plane.admin() as admin:
        phases = [(e["phase"], e.get("reason", "")) for e in _extends(admin, start, name)]
    assert [p for p, _ in phases] == ["started", "failed"]
    assert "has no disk with serial" in phases[1][1]
    detached = site.admin(
        *_node_cli(site, libvirtd, NODE, "volume", "detach", name, "--domain", guest.name)
    )
    assert detached.returncode == 0, detached.stderr
    assert site.alice("volume", "delete", name).returncode == 0

    lun = f"san-live-{secrets.token_hex(3)}"
    _create(site, lun, "san")
    attached = site.admin(
        *_node_cli(site, libvirtd, NODE, "volume", "attach", lun, "--domain", guest.name,
                   "--live")
    )  # fmt: skip
    assert attached.returncode == 0, attached.stderr
    guest.wait_size(lun, 16 * MIB)
    refused = _extend_online(site, libvirtd, NODE, lun, guest.name, "32M")
    assert_fails(refused, ExitCode.UNSUPPORTED, "detach it and extend it offline")
    shown = json.loads(site.alice("volume", "show", lun, "--json").stdout)
    assert (shown["size"], shown["state"]) == (16 * MIB, "available")
    detached = site.admin(
        *_node_cli(site, libvirtd, NODE, "volume", "detach", lun, "--domain", guest.name)
    )
    assert detached.returncode == 0, detached.stderr
    guest.wait_gone(lun)
    assert site.alice("volume", "delete", lun).returncode == 0
