"""Attach refusals, each by the attacker (or failure) it is about, leaving nothing behind.

- a wrong key: QEMU refuses the hot-plug (`Invalid password, cannot unlock
  any keyslot`); one DecryptionKeyError line, no secret, no disk;
- a volume replaced or re-formatted by someone with write access to the
  storage: refused by the header fingerprint before libvirt is touched;
- libvirt not answering at all, or stopping in the middle of an attach:
  the attach fails closed, and the secrets it defined were ephemeral.

The domains here need no operating system (SeaBIOS alone): QEMU opens a
hot-plugged disk whether or not a guest looks at it.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest
from volume_helpers import files_holding

from trustplane.api.volume_spec import BackendKind, VolumeTypeSpec
from trustplane.embedded.libvirtd import RunningLibvirtd, start_libvirtd
from trustplane.errors import DecryptionKeyError, IntegrityError, UnavailableError
from trustplane.volumes.attachers.libvirt import LibvirtAttacher
from trustplane.volumes.backends import FileBackend
from trustplane.volumes.encryptors.base import passphrase
from trustplane.volumes.volume import CreatedVolume, create_volume

MIB = 1 << 20
FILE_TYPE = VolumeTypeSpec(backend=BackendKind.FILE)


def _bios_domain(conn: Any, directory: Path) -> Any:
    name = f"volbios-{secrets.token_hex(4)}"
    xml = f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/></features>
  <devices>
    <serial type='file'><source path='{directory / f"{name}.console"}'/><target port='0'/></serial>
  </devices>
</domain>"""
    domain = conn.defineXML(xml)
    domain.create()
    return domain


def _remove(domain: Any) -> None:
    try:
        if domain.isActive():
            domain.destroy()
        domain.undefine()
    except libvirt.libvirtError:
        pass


@pytest.fixture
def bios_guest(libvirtd: RunningLibvirtd, tmp_path: Path) -> Iterator[Any]:
    conn = libvirt.open(libvirtd.uri)
    domain = _bios_domain(conn, tmp_path)
    yield domain
    _remove(domain)
    conn.close()


@pytest.fixture
def volume(tmp_path: Path) -> tuple[FileBackend, CreatedVolume, bytes]:
    backend = FileBackend(tmp_path / "volumes")
    key = secrets.token_bytes(32)
    return backend, create_volume(backend, FILE_TYPE, "refused", 8 * MIB, key), key


def _secret_uuids(libvirtd: RunningLibvirtd) -> list[str]:
    lines = libvirtd.virsh("secret-list", check=True).text.splitlines()
    return [line.split()[0] for line in lines[2:] if line.strip()]


def _block_files(domain: Any) -> list[str]:
    command = json.dumps({"execute": "query-named-block-nodes"})
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(domain, command, 0))
    return [node.get("file", "") for node in reply["return"]]


def _nothing_attached(domain: Any, path: str) -> None:
    for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
        assert path not in domain.XMLDesc(flags)
    assert not [f for f in _block_files(domain) if path in f]


def test_wrong_key_is_refused_by_qemu_and_leaves_no_secret(
    libvirtd: RunningLibvirtd, bios_guest: Any, volume: tuple[FileBackend, CreatedVolume, bytes]
) -> None:
    _, created, _ = volume
    assert created.fingerprint is not None
    wrong = secrets.token_bytes(32)
    attacher = LibvirtAttacher(libvirtd.uri)
    with pytest.raises(DecryptionKeyError) as caught:
        attacher.attach(bios_guest.name(), "refused", created.location, wrong, created.fingerprint)
    message = str(caught.value)
    assert "Invalid password, cannot unlock any keyslot" in message
    assert message.startswith(f"attach of volume refused to {bios_guest.name()} refused")
    assert "\n" not in message
    assert passphrase(wrong).decode() not in message
    assert _secret_uuids(libvirtd) == []
    _nothing_attached(bios_guest, created.location.path)  # type: ignore[union-attr]
    assert files_holding(Path("/dev/shm"), passphrase(wrong)) == []


def test_replaced_header_is_refused_before_libvirt_is_touched(
    libvirtd: RunningLibvirtd, bios_guest: Any, volume: tuple[FileBackend, CreatedVolume, bytes]
) -> None:
    """Attacker: write access to the storage, and a key of their own (or even ours):
    they re-format the volume. The record's fingerprint refuses it."""
    backend, created, key = volume
    assert created.fingerprint is not None
    path = Path(created.location.path)  # type: ignore[union-attr]
    impostor = create_volume(backend, FILE_TYPE, "impostor", 8 * MIB, key)
    path.write_bytes(Path(impostor.location.path).read_bytes())  # type: ignore[union-attr]
    calls: list[str] = []

    def connect(uri: str) -> Any:
        calls.append(uri)
        return libvirt.open(uri)

    attacher = LibvirtAttacher(libvirtd.uri, connect=connect)
    with pytest.raises(IntegrityError, match="replaced or re-formatted, refused"):
        attacher.attach(bios_guest.name(), "refused", created.location, key, created.fingerprint)
    assert calls == []
    assert _secret_uuids(libvirtd) == []
    _nothing_attached(bios_guest, str(path))


def test_libvirt_not_answering_fails_closed(
    volume: tuple[FileBackend, CreatedVolume, bytes], tmp_path: Path
) -> None:
    _, created, key = volume
    assert created.fingerprint is not None
    attacher = LibvirtAttacher(f"qemu:///system?socket={tmp_path}/no-such.sock")
    with pytest.raises(UnavailableError, match="libvirt does not answer") as caught:
        attacher.attach("any", "refused", created.location, key, created.fingerprint)
    assert "\n" not in str(caught.value)
    assert files_holding(Path("/dev/shm"), passphrase(key)) == []


class _StopsAfterTheSecret:
    """A real connection whose daemon is stopped once the secret holds the key:
    the moment in an attach where a half-done state would be worst."""

    def __init__(self, conn: Any, daemon: RunningLibvirtd) -> None:
        self._conn = conn
        self._daemon = daemon

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def secretDefineXML(self, xml: str, flags: int = 0) -> Any:
        secret = self._conn.secretDefineXML(xml, flags)
        daemon = self._daemon

        class _Secret:
            def __getattr__(self, name: str) -> Any:
                return getattr(secret, name)

            def setValue(self, value: bytes, flags: int = 0) -> int:
                done = int(secret.setValue(value, flags))
                daemon.process.stop()  # libvirtd only: its QEMUs keep running
                return done

        return _Secret()


def test_libvirtd_stopped_during_attach_fails_closed_and_leaves_nothing(
    volume: tuple[FileBackend, CreatedVolume, bytes], tmp_path: Path
) -> None:
    _, created, key = volume
    assert created.fingerprint is not None
    with start_libvirtd(tmp_path / "libvirtd") as daemon:
        conn = libvirt.open(daemon.uri)
        domain = _bios_domain(conn, tmp_path)
        name = domain.name()
        conn.close()
        attacher = LibvirtAttacher(
            daemon.uri, connect=lambda uri: _StopsAfterTheSecret(libvirt.open(uri), daemon)
        )
        with pytest.raises(UnavailableError, match="libvirt stopped answering") as caught:
            attacher.attach(name, "refused", created.location, key, created.fingerprint)
        assert "\n" not in str(caught.value)
        assert not daemon.process.running()

        daemon.restart()
        assert _secret_uuids(daemon) == []
        conn = libvirt.open(daemon.uri)
        try:
            domain = conn.lookupByName(name)
            assert domain.isActive(), "the domain's QEMU outlived its libvirtd"
            _nothing_attached(domain, created.location.path)  # type: ignore[union-attr]
            _remove(domain)
        finally:
            conn.close()
        assert files_holding(daemon.work_dir, passphrase(key)) == []
    assert files_holding(Path("/dev/shm"), passphrase(key)) == []
