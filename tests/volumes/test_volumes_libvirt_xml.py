"""The disk XML the libvirt attacher writes, and what it refuses before touching libvirt."""

from __future__ import annotations

import secrets
import uuid
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from trustplane.api.volume_location import (
    Endpoint,
    FileLocation,
    IscsiLocation,
    LvmLocation,
    RbdLocation,
)
from trustplane.api.volume_spec import Engine
from trustplane.api.volumes import HeaderFingerprint
from trustplane.errors import UnsupportedError, UsageError
from trustplane.volumes.attachers.libvirt import LibvirtAttacher, disk_xml, serial_for

MON = Endpoint(host="127.0.0.1", port=6789)
RBD = RbdLocation(pool="volumes", image="v1", monitors=(MON,), user="trustplane")
FINGERPRINT = HeaderFingerprint(
    version=2, uuid=str(uuid.uuid4()), digest="sha256:" + "0" * 64, header_bytes=16 << 20,
    cipher="aes-xts-plain64", key_size=512,
)  # fmt: skip


def _parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)  # noqa: S314 (our own output)


@pytest.mark.parametrize(
    ("location", "disk_type"),
    [
        (FileLocation(path="/srv/v1.img"), "file"),
        (LvmLocation(vg="vg0", lv="v1"), "block"),
        (IscsiLocation(portal=MON, iqn="iqn.2024-01.dev.x:v1", lun=1), "network"),
    ],
)
def test_qemu_luks_disk_names_its_secret_inside_source(location: Any, disk_type: str) -> None:
    secret = str(uuid.uuid4())
    disk = _parse(disk_xml(location, "vdb", "v1", engine=Engine.QEMU, luks_version=1,
                           volume_secret=secret))  # fmt: skip
    assert disk.get("type") == disk_type
    encryption = disk.find("./source/encryption")
    assert encryption is not None
    assert encryption.get("format") == "luks"
    assert encryption.get("engine") is None
    passphrase_secret = encryption.find("secret")
    assert passphrase_secret is not None
    assert passphrase_secret.attrib == {"type": "passphrase", "uuid": secret}
    assert disk.find("encryption") is None, "not beside <source>: inside it"
    assert disk.findtext("serial") == "v1"
    target = disk.find("target")
    assert target is not None
    assert target.attrib == {"dev": "vdb", "bus": "virtio"}


def test_rbd_disk_has_ceph_auth_and_librbd_engine() -> None:
    volume_secret, ceph_secret = str(uuid.uuid4()), str(uuid.uuid4())
    disk = _parse(disk_xml(RBD, "vdc", "v1", engine=Engine.LIBRBD, luks_version=2,
                           volume_secret=volume_secret, ceph_secret=ceph_secret))  # fmt: skip
    source = disk.find("source")
    assert source is not None
    assert (source.get("protocol"), source.get("name")) == ("rbd", "volumes/v1")
    host = source.find("host")
    assert host is not None
    assert host.attrib == {"name": "127.0.0.1", "port": "6789"}
    auth = source.find("auth")
    assert auth is not None
    assert auth.get("username") == "trustplane"
    assert auth.find("secret").attrib == {"type": "ceph", "uuid": ceph_secret}  # type: ignore[union-attr]
    encryption = source.find("encryption")
    assert encryption is not None
    assert encryption.attrib == {"format": "luks2", "engine": "librbd"}
    with pytest.raises(UsageError, match="ceph secret"):
        disk_xml(RBD, "vdc", "v1", engine=Engine.QEMU, luks_version=1, volume_secret="x")
    with pytest.raises(UnsupportedError, match="LUKS1 only"):
        disk_xml(FileLocation(path="/v.img"), "vdb", "v", engine=Engine.QEMU, luks_version=2,
                 volume_secret="x")  # fmt: skip


def test_serial_fits_virtio_blk() -> None:
    assert serial_for("a" * 40) == "a" * 20
    assert serial_for("vol-1") == "vol-1"


def test_refusals_that_never_reach_libvirt() -> None:
    calls: list[str] = []

    def connect(uri: str) -> Any:
        calls.append(uri)
        raise AssertionError("libvirt must not be reached")

    attacher = LibvirtAttacher("qemu:///system", connect=connect)
    key = secrets.token_bytes(32)
    with pytest.raises(UnsupportedError, match=r"libvirt 9\.0 cannot hot-plug"):
        attacher.attach("vm", "v1", RBD, key, FINGERPRINT, engine=Engine.LIBRBD)
    with pytest.raises(UnsupportedError, match="LUKS2 dm-crypt volume is opened by the host"):
        attacher.attach("vm", "v1", LvmLocation(vg="vg", lv="v1"), key, FINGERPRINT,
                        engine=Engine.DM_CRYPT)  # fmt: skip
    with pytest.raises(UsageError, match="cephx key"):
        attacher.attach("vm", "v1", RBD, key, FINGERPRINT, live=False)
    with pytest.raises(UsageError, match="nothing to do"):
        attacher.attach("vm", "v1", RBD, key, FINGERPRINT, live=False, persistent=False)
    with pytest.raises(UsageError, match="32 random bytes"):
        attacher.attach("vm", "v1", RBD, b"short", FINGERPRINT)
    assert calls == []
