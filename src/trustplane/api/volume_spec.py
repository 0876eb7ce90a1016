"""A volume type's storage and encryption spec, shaped like Cinder's.

The block-storage service keeps these with each volume type (as JSON) and
the drivers read them, so both sides agree on what a type means:

- `EncryptionSpec`: provider (`luks` = LUKS1, which QEMU's native driver
  opens; `luks2` where the path supports it), cipher, the size of the LUKS
  volume (master) key, and the control location (`front-end`: the host or
  QEMU decrypts; `back-end`: the storage client decrypts, librbd's own
  encryption).
- `VolumeTypeSpec`: the backend kind and the encryption (None: plain).
- `engine_for`: which code decrypts a volume of that type (QEMU's LUKS
  driver, dm-crypt, librbd), refused with one clear line for combinations
  no path on this stack can open.

The key the KMS generates for a volume is a random 256-bit value
(`VOLUME_KEY_BYTES`); LUKS sees its hex as the passphrase (OpenStack's
derivation, `volumes.encryptors.base.passphrase()`), so volumes and keys
move between an OpenStack cloud and trustplane both ways. `key_size` is the size of the master key
LUKS generates inside the header (cryptsetup's `--key-size`): 512 bits is
AES-256 in XTS mode.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, model_validator

from trustplane.errors import TrustplaneError, UnsupportedError, UsageError

VOLUME_KEY_BYTES = 32
"""The KMS key of a volume: 256 random bits. A slow PBKDF over it buys nothing."""

CIPHER = "aes-xts-plain64"
MIB = 1 << 20


class Provider(StrEnum):
    """LUKS version (Cinder's `provider`): `luks` is LUKS1."""

    LUKS = "luks"
    LUKS2 = "luks2"


class ControlLocation(StrEnum):
    """Who decrypts (Cinder's `control_location`)."""

    FRONT_END = "front-end"
    BACK_END = "back-end"


class BackendKind(StrEnum):
    """Where a volume's bytes live: mapped (file, iscsi, lvm) or distributed (rbd)."""

    FILE = "file"
    ISCSI = "iscsi"
    LVM = "lvm"
    RBD = "rbd"


class Engine(StrEnum):
    """The code that formats and decrypts a volume."""

    QEMU = "qemu"
    """QEMU's native LUKS driver (LUKS1 only in QEMU 7.2), reached in user space."""
    DM_CRYPT = "dm-crypt"
    """The kernel's dm-crypt through cryptsetup (LUKS1 or LUKS2): hosts with device-mapper."""
    LIBRBD = "librbd"
    """librbd's own encryption (`rbd encryption format`), the back-end control location."""


class EncryptionSpec(BaseModel):
    """A volume type's encryption, as Cinder's encryption type spells it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    provider: Provider = Provider.LUKS
    cipher: Literal["aes-xts-plain64"] = "aes-xts-plain64"
    key_size: Literal[256, 512] = 512
    """Bits of the LUKS master key: XTS splits it in two, so 512 is AES-256-XTS."""
    control_location: ControlLocation = ControlLocation.FRONT_END

    @property
    def luks_version(self) -> int:
        return 2 if self.provider is Provider.LUKS2 else 1

    @property
    def aes_bits(self) -> int:
        """The AES key length XTS uses (half the master key)."""
        return self.key_size // 2


class VolumeTypeSpec(BaseModel):
    """What a volume type fixes: its backend and its encryption (None: plain).

    Left out, the encryption is the backend's default (`default_encryption`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: BackendKind
    encryption: EncryptionSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_encryption(cls, data: Any) -> Any:
        if isinstance(data, dict) and "encryption" not in data and "backend" in data:
            try:
                backend = BackendKind(data["backend"])
            except ValueError:
                return data  # the field's own validation says what is wrong
            return {**data, "encryption": default_encryption(backend)}
        return data

    @model_validator(mode="after")
    def _has_an_engine(self) -> Self:
        if self.encryption is not None:
            try:
                engine_for(self.backend, self.encryption)
            except TrustplaneError as exc:
                raise ValueError(str(exc)) from None
        return self

    @property
    def engine(self) -> Engine | None:
        """The engine that opens volumes of this type; None for a plain type."""
        if self.encryption is None:
            return None
        return engine_for(self.backend, self.encryption)


def default_encryption(backend: BackendKind) -> EncryptionSpec:
    """The encryption a volume type gets when it names none: the faster path measured.

    RBD: librbd's own LUKS2 (back-end; OpenSSL's AES-XTS in the client
    library, 4096-byte sectors): 0.75-0.8x plain in benchmarks/volumes.py,
    where QEMU's LUKS1 on the same images reaches 0.46-0.55x. Its cost:
    libvirt 9.0 cannot hot-plug it, so such a volume joins a VM at start (a
    type with the front-end spec keeps live attach). Elsewhere QEMU's LUKS1
    (file, iSCSI) or dm-crypt LUKS1 (LVM, which QEMU can open too).
    """
    if backend is BackendKind.RBD:
        return EncryptionSpec(provider=Provider.LUKS2, control_location=ControlLocation.BACK_END)
    return EncryptionSpec()


def engine_for(backend: BackendKind, spec: EncryptionSpec) -> Engine:
    """The engine for `spec` on `backend`, or one line saying why there is none.

    - back-end: librbd's encryption, so RBD only;
    - LVM lives on device-mapper hosts: dm-crypt (LUKS1 or LUKS2);
    - file, iSCSI and RBD front-end: QEMU's LUKS driver, which in QEMU 7.2
      reads LUKS1 only (an RBD volume wanting LUKS2 takes the back-end).
    """
    if spec.control_location is ControlLocation.BACK_END:
        if backend is not BackendKind.RBD:
            raise UsageError(
                f"back-end encryption is librbd's own; a {backend} volume is encrypted front-end"
            )
        return Engine.LIBRBD
    if backend is BackendKind.LVM:
        return Engine.DM_CRYPT
    if spec.provider is Provider.LUKS2:
        hint = "; for rbd, choose control location back-end" if backend is BackendKind.RBD else ""
        raise UnsupportedError(
            f"a front-end {backend} volume is opened by QEMU's LUKS driver, which reads "
            f"LUKS1 only (QEMU 7.2: 'LUKS version 2 is not supported'); use provider luks{hint}"
        )
    return Engine.QEMU


def parse_size(text: str | int) -> int:
    """`10G`, `512M`, `1073741824` → bytes: a positive whole number of MiB."""
    if isinstance(text, int):
        value = text
    else:
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
        raw = text.strip().upper().removesuffix("IB").removesuffix("B")
        factor = units.get(raw[-1:], 1)
        number = raw[:-1] if raw[-1:] in units else raw
        if not number.isdigit():
            raise UsageError(f"not a size: {text!r} (examples: 512M, 10G)")
        value = int(number) * factor
    return check_volume_size(value)


def check_volume_size(size: int) -> int:
    """A volume's usable size: a positive whole number of MiB."""
    if size <= 0 or size % MIB:
        raise UsageError(f"a volume size is a positive whole number of MiB, not {size}")
    return size
