"""The block-storage service: volume types, encrypted volumes, the attach key release.

A volume type names a backend configured on the server and its encryption
spec (Cinder's fields: `api.volume_spec.EncryptionSpec`). A volume's record
keeps the UUID of its key in the KMS, never the key, and the LUKS header's
fingerprint that every attach checks. The key itself travels only in the
answer to an attach (`VolumeKeyRelease`), to a caller the policy allows
`volume.attach` on `volume:NAME`.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from trustplane.api.volume_location import Location
from trustplane.api.volume_spec import BackendKind, EncryptionSpec, Engine
from trustplane.crypto import keywrap
from trustplane.crypto.keys import UnwrapKey
from trustplane.errors import IntegrityError, UsageError

VOLUME_NAME = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"
"""A volume name: what the backends can put in paths, IQNs, LVM and RBD names."""
TYPE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
DOMAIN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$"
"""The consumer of an attach: a libvirt domain's name (or `docker:VOLUME` and the like)."""
MAX_VOLUME_SIZE = 1 << 50
"""1 PiB: more than any backend here makes, and within every database's integers."""

VolumeState = Literal[
    "creating",
    "available",
    "extending",
    "rotating",
    "reencrypting",
    "cloning",
    "deleting",
    "shredded",
]


class HeaderFingerprint(BaseModel):
    """What the volume record keeps to recognise its volume's header."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1, 2]
    uuid: str
    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    header_bytes: int = Field(gt=0)
    cipher: str
    key_size: int = Field(ge=0)
    """Master key bits."""


class NewVolumeType(BaseModel):
    name: str = Field(pattern=TYPE_NAME)
    backend: str = Field(
        pattern=TYPE_NAME, description="A backend configured on the server (volume_backends)"
    )
    encryption: EncryptionSpec | None = Field(
        None, description="Omitted: the backend's default (its faster encrypted path)"
    )


class VolumeTypeInfo(BaseModel):
    name: str
    backend: str
    backend_kind: BackendKind
    encryption: EncryptionSpec
    engine: Engine = Field(description="What decrypts volumes of this type")
    creator: str
    created: datetime


class NewVolume(BaseModel):
    name: str = Field(pattern=VOLUME_NAME)
    size: int = Field(
        ge=1 << 20, le=MAX_VOLUME_SIZE, description="Usable bytes: a whole number of MiB"
    )
    volume_type: str = Field(pattern=TYPE_NAME)


class Attachment(BaseModel):
    subject: str = Field(description="Who the key was released to (node:NAME, user:NAME)")
    domain: str
    since: datetime


class VolumeInfo(BaseModel):
    id: str
    name: str
    volume_type: str
    backend: str
    size: int
    state: VolumeState
    key_id: str | None = Field(description="The UUID of the volume's key in the KMS")
    engine: Engine | None
    location: Location | None
    header: HeaderFingerprint | None = Field(
        description="The LUKS header's UUID and digest, checked at every attach"
    )
    owner: str
    attachment: Attachment | None
    created: datetime


MAX_TRANSPORT_KEY_PEM = 16384
"""A public key PEM (RSA-4096 is under 1 KB); refuse absurd input before parsing."""


class AttachRequest(BaseModel):
    domain: str = Field(pattern=DOMAIN_NAME, description="The libvirt domain it goes into")
    transport_key: str | None = Field(
        default=None,
        max_length=MAX_TRANSPORT_KEY_PEM,
        description="Public key PEM the key is wrapped to (a JWE). Nodes must send one: "
        "the transport key their TPM certified when they enrolled one",
    )


class VolumeKeyRelease(BaseModel):
    """What an attach receives: the volume's record and its key, either wrapped to
    the transport key the request named (`jwe`; always for nodes) or raw (`key`,
    base64; only for a user who named none)."""

    volume: VolumeInfo
    key: str | None = Field(
        default=None,
        repr=False,
        description="The raw volume key (base64), only to a user that sent no transport key",
    )
    jwe: str | None = Field(
        default=None,
        repr=False,
        description="The volume key wrapped to the request's transport key (JWE JSON)",
    )
    log_index: int = Field(description="The release's entry in the transparency log")

    def key_bytes(self, transport: UnwrapKey | None = None) -> bytes:
        """The key: the raw field, or the JWE opened with the transport private key."""
        if self.jwe is not None:
            if transport is None:
                raise UsageError("the volume key is wrapped: its transport private key opens it")
            key = keywrap.unwrap(self.jwe, [transport], f"key of volume {self.volume.name}")
            if key is None:
                raise IntegrityError(
                    f"the key of volume {self.volume.name} is not wrapped to our transport key"
                )
            return key
        if self.key is None:
            raise IntegrityError(f"the release of volume {self.volume.name} holds no key")
        return base64.b64decode(self.key)


class ExtendRequest(BaseModel):
    size: int = Field(
        ge=1 << 20,
        le=MAX_VOLUME_SIZE,
        description="The new usable size in bytes (a whole number of MiB, larger than now)",
    )
    domain: str | None = Field(
        default=None,
        pattern=DOMAIN_NAME,
        description="Online: the domain the caller holds the attachment for (it then runs "
        "the block resize and reports with OnlineExtendResult); none: offline",
    )


class OnlineExtendResult(BaseModel):
    """What the host reports after the block resize of an online extend."""

    domain: str = Field(pattern=DOMAIN_NAME)
    size: int = Field(ge=1 << 20, le=MAX_VOLUME_SIZE, description="The size asked at the start")
    grown: bool = Field(description="Whether the domain's disk now has `size` usable bytes")
    reason: str | None = Field(default=None, max_length=500, description="Why not, if not")


class CloneRequest(BaseModel):
    """A clone (or snapshot) of a detached volume, under a fresh key of its own."""

    name: str = Field(pattern=VOLUME_NAME, description="The new volume's name")
    volume_type: str | None = Field(
        None, pattern=TYPE_NAME, description="Omitted: the source's type"
    )
    snapshot: bool = Field(False, description="Logged as a snapshot (it is a full clone)")


class EncryptRequest(BaseModel):
    """Plaintext storage on a backend becomes an encrypted volume (admins)."""

    name: str = Field(pattern=VOLUME_NAME, description="The encrypted volume's name")
    source: str = Field(
        pattern=VOLUME_NAME,
        description="The plaintext storage's name on the type's backend (file NAME.img in "
        "its directory, RBD image, iSCSI target suffix); the same as `name` to take its place",
    )
    volume_type: str = Field(pattern=TYPE_NAME)


CheckName = Literal["luks-header", "header-uuid", "header-digest", "cipher", "payload"]


class VerificationCheck(BaseModel):
    name: CheckName
    passed: bool
    detail: str


class PayloadSamples(BaseModel):
    """What the sampled payload sectors looked like (`volumes.verification`)."""

    sampled: int = Field(description="Samples read, spread evenly over the payload area")
    sample_bytes: int
    ciphertext: int = Field(description="Samples whose byte entropy is at least `threshold`")
    unwritten: int = Field(
        description="Samples in a hole of sparse storage (never written), or all-zero "
        "where the backend cannot tell holes from zeros"
    )
    plaintext: int = Field(description="Samples that are neither: data written in the clear")
    short: int = Field(description="Samples past the end of the storage")
    min_entropy: float | None = Field(description="Bits per byte of the lowest written sample")
    threshold: float


class VolumeVerification(BaseModel):
    """`trustplane volume verify`: the raw storage checked against the record and the type."""

    volume: str
    location: str
    passed: bool
    checks: list[VerificationCheck]
    payload: PayloadSamples
    log_index: int


class VolumeOperationInfo(BaseModel):
    """A long operation running on a volume (`reencrypt`: the data key itself rotated;
    `clone`, `encrypt`: a copy under a fresh key), as the server records it: `progress`
    is the bytes copied to the new storage, out of `total`. No secret in it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    volume: str
    kind: str
    phase: str
    key_id: str | None = Field(description="The UUID of the new key in the KMS, once ordered")
    progress: int
    total: int
    subject: str
    started: datetime
    updated: datetime
