"""Where a volume's bytes are: what QEMU and libvirt need to reach them.

A backend's `locate()` returns one of these; the block-storage service
stores it as JSON with the volume record (`dump_location` /
`load_location`). A location holds no secret: the cephx key of an RBD
client and the volume key travel separately (`access.NodeCredentials`, the
KMS), so a stored location leaks nothing.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from trustplane.api.volume_spec import BackendKind
from trustplane.errors import MalformedError

# Names that go into QEMU option strings, libvirt XML and tool argv: no
# commas, colons, slashes or whitespace, so no escaping rules are in play.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_IQN = re.compile(r"iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:[A-Za-z0-9.:_-]+)?")
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:]+\]")


def check_name(value: str, what: str = "name") -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(f"{what} {value!r}: letters, digits, '.', '_', '+', '-' (at most 128)")
    return value


class Endpoint(BaseModel):
    """A host and TCP port (an iSCSI portal, a Ceph monitor)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str
    port: int = Field(ge=1, le=65535)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not _HOST.fullmatch(value):
            raise ValueError(f"not a host name or address: {value!r}")
        return value

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class FileLocation(BaseModel):
    """A file on the storage host (shared with the compute host)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal[BackendKind.FILE] = BackendKind.FILE
    path: str

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/") or "\0" in value or "," in value:
            raise ValueError("a volume file is an absolute path without ',' or NUL")
        return value

    def describe(self) -> str:
        return f"file {self.path}"


class IscsiLocation(BaseModel):
    """A LUN on an iSCSI target, reached from user space (libiscsi)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal[BackendKind.ISCSI] = BackendKind.ISCSI
    portal: Endpoint
    iqn: str
    lun: int = Field(ge=1, le=16383)

    @field_validator("iqn")
    @classmethod
    def _iqn(cls, value: str) -> str:
        if not _IQN.fullmatch(value):
            raise ValueError(f"not an iSCSI qualified name: {value!r}")
        return value

    @property
    def url(self) -> str:
        """`iscsi://HOST:PORT/IQN/LUN` (qemu-img's filename syntax)."""
        return f"iscsi://{self.portal}/{self.iqn}/{self.lun}"

    def describe(self) -> str:
        return f"iSCSI LUN {self.iqn}/{self.lun} at {self.portal}"


class LvmLocation(BaseModel):
    """A logical volume (device-mapper hosts)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal[BackendKind.LVM] = BackendKind.LVM
    vg: str
    lv: str

    @field_validator("vg", "lv")
    @classmethod
    def _names(cls, value: str) -> str:
        return check_name(value, "LVM name")

    @property
    def device(self) -> str:
        return f"/dev/{self.vg}/{self.lv}"

    def describe(self) -> str:
        return f"logical volume {self.vg}/{self.lv}"


class RbdLocation(BaseModel):
    """A Ceph RBD image, with the monitors and the cephx user that reach it.

    The user's key is not here: the compute node holds it
    (`access.NodeCredentials.ceph_key`) and hands it to libvirt or QEMU.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal[BackendKind.RBD] = BackendKind.RBD
    pool: str
    image: str
    monitors: tuple[Endpoint, ...] = Field(min_length=1)
    user: str

    @field_validator("pool", "image", "user")
    @classmethod
    def _names(cls, value: str) -> str:
        return check_name(value, "RBD name")

    @property
    def spec(self) -> str:
        return f"{self.pool}/{self.image}"

    def describe(self) -> str:
        return f"RBD image {self.pool}/{self.image}"


Location = Annotated[
    FileLocation | IscsiLocation | LvmLocation | RbdLocation, Field(discriminator="backend")
]
_ADAPTER: TypeAdapter[FileLocation | IscsiLocation | LvmLocation | RbdLocation] = TypeAdapter(
    Location
)
AnyLocation = FileLocation | IscsiLocation | LvmLocation | RbdLocation


def dump_location(location: AnyLocation) -> str:
    """The location as compact JSON (what the volume record stores)."""
    return location.model_dump_json()


def load_location(text: str | bytes) -> AnyLocation:
    """A location back from its JSON; MalformedError (one line) if it is not one."""
    try:
        return _ADAPTER.validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "location"
        raise MalformedError(f"not a volume location: {where}: {first.get('msg')}") from None
