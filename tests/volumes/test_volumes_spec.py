"""Volume type specs, engines, the OpenStack passphrase and stored locations."""

from __future__ import annotations

import binascii
import os

import pytest
from pydantic import ValidationError

from trustplane.api.volume_location import (
    Endpoint,
    FileLocation,
    IscsiLocation,
    LvmLocation,
    RbdLocation,
    dump_location,
    load_location,
)
from trustplane.api.volume_spec import (
    BackendKind,
    ControlLocation,
    EncryptionSpec,
    Engine,
    Provider,
    VolumeTypeSpec,
    engine_for,
    parse_size,
)
from trustplane.errors import MalformedError, UnsupportedError, UsageError
from trustplane.volumes.encryptors.base import passphrase

FRONT_LUKS = EncryptionSpec()
FRONT_LUKS2 = EncryptionSpec(provider=Provider.LUKS2)
BACK_LUKS2 = EncryptionSpec(provider=Provider.LUKS2, control_location=ControlLocation.BACK_END)


@pytest.mark.parametrize(
    ("backend", "spec", "engine"),
    [
        (BackendKind.FILE, FRONT_LUKS, Engine.QEMU),
        (BackendKind.ISCSI, FRONT_LUKS, Engine.QEMU),
        (BackendKind.RBD, FRONT_LUKS, Engine.QEMU),
        (BackendKind.RBD, BACK_LUKS2, Engine.LIBRBD),
        (BackendKind.LVM, FRONT_LUKS, Engine.DM_CRYPT),
        (BackendKind.LVM, FRONT_LUKS2, Engine.DM_CRYPT),
    ],
)
def test_each_backend_gets_the_engine_that_opens_it(
    backend: BackendKind, spec: EncryptionSpec, engine: Engine
) -> None:
    assert engine_for(backend, spec) is engine
    assert VolumeTypeSpec(backend=backend, encryption=spec).engine is engine


def test_combinations_nothing_opens_are_refused_in_one_line() -> None:
    with pytest.raises(UnsupportedError, match=r"reads LUKS1 only.*control location back-end"):
        engine_for(BackendKind.RBD, FRONT_LUKS2)
    with pytest.raises(UnsupportedError, match="reads LUKS1 only"):
        engine_for(BackendKind.ISCSI, FRONT_LUKS2)
    with pytest.raises(UsageError, match="back-end encryption is librbd's own"):
        engine_for(BackendKind.FILE, BACK_LUKS2)
    with pytest.raises(ValidationError, match="reads LUKS1 only"):
        VolumeTypeSpec(backend=BackendKind.FILE, encryption=FRONT_LUKS2)


def test_spec_defaults_are_cinders_luks_with_aes_256_xts() -> None:
    spec = EncryptionSpec()
    assert (spec.provider, spec.cipher, spec.key_size) == ("luks", "aes-xts-plain64", 512)
    assert spec.control_location == "front-end"
    assert spec.aes_bits == 256
    assert VolumeTypeSpec(backend=BackendKind.FILE, encryption=None).engine is None
    with pytest.raises(ValidationError):
        EncryptionSpec(cipher="aes-cbc-essiv:sha256")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        EncryptionSpec(key_size=128)  # type: ignore[arg-type]
    again = VolumeTypeSpec.model_validate_json(
        VolumeTypeSpec(backend=BackendKind.RBD).model_dump_json()
    )
    assert again == VolumeTypeSpec(backend=BackendKind.RBD)


def test_passphrase_is_openstacks_hex_of_the_raw_key() -> None:
    for key in (os.urandom(32), b"\x00\x01" + os.urandom(30), bytes(32)):
        phrase = passphrase(key)
        # os-brick's encryptors: binascii.hexlify(key).decode('utf-8')
        assert phrase == binascii.hexlify(key).decode("utf-8").encode()
        assert len(phrase) == 64
        phrase.decode("ascii")  # QEMU reads secrets as UTF-8 text
    # Not the "mangled" form of os-brick bug 1633518, which dropped leading zeros.
    key = b"\x00\x0f" + bytes(30)
    mangled = "".join(hex(x).replace("0x", "") for x in key).encode()
    assert passphrase(key) != mangled
    with pytest.raises(UsageError):
        passphrase(b"")


def test_sizes_are_whole_mib() -> None:
    assert parse_size("10G") == 10 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("64MiB") == 64 << 20
    assert parse_size(1 << 20) == 1 << 20
    for bad in ("0", "1K", "ten", "-5G", "1.5G"):
        with pytest.raises(UsageError):
            parse_size(bad)


def test_locations_round_trip_as_json_and_hold_no_secret() -> None:
    mon = Endpoint(host="127.0.0.1", port=6789)
    locations = [
        FileLocation(path="/srv/volumes/v1.img"),
        IscsiLocation(
            portal=Endpoint(host="10.0.0.5", port=3260), iqn="iqn.2024-01.dev.x:v1", lun=1
        ),
        LvmLocation(vg="vg0", lv="v1"),
        RbdLocation(pool="volumes", image="v1", monitors=(mon,), user="cinder"),
    ]
    for location in locations:
        text = dump_location(location)
        assert load_location(text) == location
        assert "key" not in text
    iscsi = locations[1]
    assert isinstance(iscsi, IscsiLocation)
    assert iscsi.url == "iscsi://10.0.0.5:3260/iqn.2024-01.dev.x:v1/1"


@pytest.mark.parametrize(
    "text",
    [
        '{"backend":"file","path":"relative.img"}',
        '{"backend":"file","path":"/a,b.img"}',
        '{"backend":"lvm","vg":"vg0","lv":"a/../b"}',
        '{"backend":"rbd","pool":"p","image":"i","monitors":[],"user":"u"}',
        '{"backend":"iscsi","portal":{"host":"h","port":3260},"iqn":"not-an-iqn","lun":1}',
        '{"backend":"nfs","path":"/x"}',
        "not json",
    ],
)
def test_a_malformed_location_is_one_line(text: str) -> None:
    with pytest.raises(MalformedError, match=r"^not a volume location: ") as caught:
        load_location(text)
    assert "\n" not in str(caught.value)
