"""Encrypted volumes attached to a VM through libvirt; the guest reads the plaintext.

For each backend (file, iSCSI, RBD with QEMU's LUKS, RBD with librbd's own
encryption): the volume is created and written through the encrypted path;
the storage (raw file, the LUN's backing file, the RADOS objects) holds no
plaintext; a TCG guest under the test libvirtd reads the marker from the
disk whose serial is the volume's (hot-plugged into the running guest, or
for librbd in the persistent definition before the guest starts, which is
all libvirt 9.0 can do); detach leaves no libvirt secret, no key file and no
secret object in QEMU.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest
from missing import component_missing
from volume_helpers import (
    file_backend,
    files_holding,
    iscsi_backend,
    rados_objects,
    raw_holds,
    rbd_backend,
)

from trustplane.api.volume_location import RbdLocation
from trustplane.api.volume_spec import (
    BackendKind,
    ControlLocation,
    EncryptionSpec,
    Engine,
    Provider,
    VolumeTypeSpec,
)
from trustplane.embedded.ceph import RunningCeph
from trustplane.embedded.guest_kernel import GuestKernel, guest_kernel
from trustplane.embedded.libvirtd import RunningLibvirtd
from trustplane.embedded.tgtd import RunningTgtd, start_tgtd
from trustplane.embedded.volume_guest import ScannerGuest, build_scanner_initrd
from trustplane.errors import TrustplaneError, UnsupportedError, UsageError
from trustplane.volumes.attachers.libvirt import LibvirtAttacher
from trustplane.volumes.backends import Backend
from trustplane.volumes.encryptors import encryptor_for
from trustplane.volumes.encryptors.base import passphrase
from trustplane.volumes.header import LUKS_MAGIC
from trustplane.volumes.online import block_resize_bytes
from trustplane.volumes.volume import CreatedVolume, create_volume

MIB = 1 << 20


@pytest.fixture(scope="module")
def kernel() -> GuestKernel:
    try:
        return guest_kernel()
    except TrustplaneError as exc:
        component_missing("guest kernel (linux-image-cloud-amd64, downloaded)", str(exc))


@pytest.fixture(scope="module")
def scanner_initrd(tmp_path_factory: pytest.TempPathFactory, kernel: GuestKernel) -> Path:
    return build_scanner_initrd(tmp_path_factory.mktemp("scanner") / "initrd.img", kernel)


@pytest.fixture(scope="module")
def conn(libvirtd: RunningLibvirtd) -> Iterator[Any]:
    connection = libvirt.open(libvirtd.uri)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def running_guest(
    conn: Any, tmp_path_factory: pytest.TempPathFactory, kernel: GuestKernel, scanner_initrd: Path
) -> Iterator[ScannerGuest]:
    guest = ScannerGuest.define(conn, tmp_path_factory.mktemp("guest"), kernel, scanner_initrd)
    try:
        guest.start()
        yield guest
    finally:
        guest.remove()


@pytest.fixture(scope="module")
def private_tgtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningTgtd]:
    """A tgtd of this module's own: the backend numbers its targets itself."""
    try:
        daemon = start_tgtd(tmp_path_factory.mktemp("tgtd"))
    except TrustplaneError as exc:
        component_missing("tgtd", str(exc))
    with daemon:
        yield daemon


@pytest.fixture
def make_backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Callable[[BackendKind], Backend]:
    def make(kind: BackendKind) -> Backend:
        if kind is BackendKind.FILE:
            return file_backend(tmp_path / "volumes")
        if kind is BackendKind.ISCSI:
            return iscsi_backend(request.getfixturevalue("private_tgtd"), tmp_path / "luns")
        return rbd_backend(request.getfixturevalue("ceph"))

    return make


def _write_marker(created: CreatedVolume, backend: Backend, key: bytes, marker: bytes) -> None:
    """Write `marker` at the start of the plaintext, through the encrypted path."""
    assert created.engine is not None
    encryptor = encryptor_for(created.engine)
    with (
        encryptor.open(created.location, key, backend.credentials(), loop=False) as opened,  # type: ignore[call-arg]
        Path(opened.path).open("r+b") as plain,
    ):
        plain.write(marker.ljust(4096, b"\0"))


def _secret_list(libvirtd: RunningLibvirtd) -> list[str]:
    lines = libvirtd.virsh("secret-list", check=True).text.splitlines()
    return [line.split()[0] for line in lines[2:] if line.strip()]


def _qemu_objects(domain: Any) -> list[str]:
    command = json.dumps({"execute": "qom-list", "arguments": {"path": "/objects"}})
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(domain, command, 0))
    return [entry["name"] for entry in reply["return"]]


def _secret_objects(domain: Any) -> list[str]:
    """QEMU's secret objects for disks (libvirt names them ...-secret0); not its master key."""
    return [name for name in _qemu_objects(domain) if "secret" in name.lower()]


def _assert_nothing_holds_the_key(libvirtd: RunningLibvirtd, key: bytes) -> None:
    phrase = passphrase(key)
    assert _secret_list(libvirtd) == []
    assert files_holding(libvirtd.work_dir, phrase) == []
    assert files_holding(Path("/dev/shm"), phrase) == []
    assert files_holding(Path("/dev/shm"), key) == []


@pytest.mark.parametrize("kind", [BackendKind.FILE, BackendKind.ISCSI, BackendKind.RBD])
def test_hot_plugged_volume_is_read_in_the_guest_and_detach_leaves_no_key(
    kind: BackendKind,
    make_backend: Callable[[BackendKind], Backend],
    running_guest: ScannerGuest,
    libvirtd: RunningLibvirtd,
    request: pytest.FixtureRequest,
) -> None:
    backend = make_backend(kind)
    # Front-end (QEMU decrypts): what libvirt 9.0 can hot-plug, RBD included.
    volume_type = VolumeTypeSpec(backend=kind, encryption=EncryptionSpec())
    key = secrets.token_bytes(32)
    name = f"{kind}-{secrets.token_hex(4)}"
    created = create_volume(backend, volume_type, name, 16 * MIB, key)
    ceph = request.getfixturevalue("ceph") if kind is BackendKind.RBD else None
    try:
        assert created.fingerprint is not None
        marker = f"trustplane-{kind}-{secrets.token_hex(8)}".encode()
        _write_marker(created, backend, key, marker)
        assert not raw_holds(backend, created.location, marker, ceph)
        assert backend.reader(created.location).read(0, 6) == LUKS_MAGIC
        with pytest.raises(UsageError, match="never formats a volume that exists"):
            encryptor_for(Engine.QEMU).format(
                backend,
                created.location,
                key,
                volume_type.encryption,  # type: ignore[arg-type]
            )

        attacher = LibvirtAttacher(libvirtd.uri)
        attachment = attacher.attach(
            running_guest.name,
            name,
            created.location,
            key,
            created.fingerprint,
            credentials=backend.credentials(),
        )
        assert attachment.serial == name
        assert running_guest.disk_data(name).startswith(marker.decode())
        listed = _secret_list(libvirtd)
        assert sorted(listed) == sorted(attachment.secrets)
        assert len(listed) == (2 if kind is BackendKind.RBD else 1)
        refused = libvirtd.virsh("secret-get-value", attachment.secrets[0])
        assert refused.returncode != 0
        assert b"private" in refused.stderr
        persistent = running_guest.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        assert f"<serial>{name}</serial>" in persistent
        assert "<encryption format='luks'" in persistent
        # QEMU holds the key in a secret object while the disk is attached...
        assert _secret_objects(running_guest.domain)

        attacher.detach(running_guest.name, attachment.serial)
        running_guest.wait_gone(name)
        for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
            assert f"<serial>{name}</serial>" not in running_guest.domain.XMLDesc(flags)
        assert _secret_objects(running_guest.domain) == []
        _assert_nothing_holds_the_key(libvirtd, key)
        attacher.detach(running_guest.name, attachment.serial)  # idempotent
    finally:
        backend.delete(created.location)
    assert not backend.exists(name)


def test_librbd_encryption_attaches_at_define_time_and_hot_plug_is_refused(
    conn: Any,
    ceph: RunningCeph,
    libvirtd: RunningLibvirtd,
    running_guest: ScannerGuest,
    kernel: GuestKernel,
    scanner_initrd: Path,
    tmp_path: Path,
) -> None:
    backend = rbd_backend(ceph)
    volume_type = VolumeTypeSpec(
        backend=BackendKind.RBD,
        encryption=EncryptionSpec(
            provider=Provider.LUKS2, control_location=ControlLocation.BACK_END
        ),
    )
    key = secrets.token_bytes(32)
    name = f"librbd-{secrets.token_hex(4)}"
    created = create_volume(backend, volume_type, name, 16 * MIB, key)
    assert created.engine is Engine.LIBRBD
    assert created.fingerprint is not None
    assert created.fingerprint.version == 2
    location = created.location
    assert isinstance(location, RbdLocation)
    guest = ScannerGuest.define(conn, tmp_path, kernel, scanner_initrd)
    try:
        marker = f"trustplane-librbd-{secrets.token_hex(8)}".encode()
        _write_marker(created, backend, key, marker)
        objects = rados_objects(ceph, location.image)
        assert objects[min(objects)][:8] == LUKS_MAGIC + b"\x00\x02"
        assert not any(marker in data for data in objects.values())

        attacher = LibvirtAttacher(libvirtd.uri)
        with pytest.raises(UnsupportedError, match=r"libvirt 9\.0 cannot hot-plug .* librbd"):
            attacher.attach(
                running_guest.name, name, location, key, created.fingerprint,
                engine=Engine.LIBRBD, credentials=backend.credentials(),
            )  # fmt: skip
        assert _secret_list(libvirtd) == []

        attachment = attacher.attach(
            guest.name, name, location, key, created.fingerprint,
            engine=Engine.LIBRBD, credentials=backend.credentials(), live=False,
        )  # fmt: skip
        assert "engine='librbd'" in guest.domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        guest.start()
        assert guest.disk_data(name).startswith(marker.decode())
        # Online extend: Ceph 16 resizes the raw image to the number given, so the host
        # asks for the payload offset on top; the guest sees exactly the size asked.
        header = created.fingerprint.header_bytes
        wanted = block_resize_bytes(Engine.LIBRBD, header, 32 * MIB)
        assert wanted == header + 32 * MIB
        assert attacher.resize(guest.name, attachment.serial, wanted) == 32 * MIB
        guest.wait_size(name, 32 * MIB)
        assert guest.sizes(name) == [16 * MIB, 32 * MIB]
        assert backend.size(location) == header + 32 * MIB
        guest.domain.destroy()
        attacher.detach(guest.name, attachment.serial)
        assert f"<serial>{name}</serial>" not in guest.domain.XMLDesc(
            libvirt.VIR_DOMAIN_XML_INACTIVE
        )
        _assert_nothing_holds_the_key(libvirtd, key)
    finally:
        guest.remove()
        backend.delete(location)
