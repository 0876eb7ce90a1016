"""LUKS through the kernel's dm-crypt (`cryptsetup`), on hosts with device-mapper.

The os-brick way, with the key on standard input (`--key-file -`, so
cryptsetup takes the bytes as they are) and never in argv:

    cryptsetup --batch-mode luksFormat --type luks1|luks2 --cipher aes-xts-plain64
        --key-size 512 --hash sha256 --pbkdf pbkdf2 --pbkdf-force-iterations 1000
        --offset SECTORS --key-file - DEVICE
    cryptsetup open --type luks --key-file - DEVICE NAME     →  /dev/mapper/NAME
    cryptsetup close NAME

PBKDF2 at its minimum of 1000 iterations: the passphrase is the hex of a
random 256-bit key, so stretching buys nothing, and argon2's memory cost
and calibration would be paid at every open. The payload starts at a fixed
offset (2 MiB for LUKS1, cryptsetup's usual alignment; 16 MiB for LUKS2, its
default metadata and key-slot areas), so the volume's usable size is
exactly what was asked for. LUKS2 uses 4096-byte sectors (fewer IVs and
cipher calls per byte; the layout librbd uses too). LUKS1 headers made here
open in QEMU's native driver as well (`encryptors.qemu_luks`).

Commands run through the executor: on a production host locally, in the
tests inside the device-mapper guest.
"""

from __future__ import annotations

import re
from typing import ClassVar

from trustplane.api.volume_location import AnyLocation, LvmLocation
from trustplane.api.volume_spec import EncryptionSpec, Engine, Provider
from trustplane.errors import UnavailableError, UnsupportedError, UsageError
from trustplane.tools import Executor
from trustplane.volumes.access import NodeCredentials
from trustplane.volumes.backends.base import Backend
from trustplane.volumes.encryptors.base import (
    PBKDF2_ITERATIONS,
    Encryptor,
    check_key_bytes,
    passphrase,
)
from trustplane.volumes.opening import WRONG_KEY, OpenVolume

HEADER_BYTES = {Provider.LUKS: 2 << 20, Provider.LUKS2: 16 << 20}
_MAPPING = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,100}")
_TIMEOUT = 180.0


def format_argv(spec: EncryptionSpec, device: str, header_bytes: int) -> list[str]:
    """`cryptsetup luksFormat` for `spec` onto `device` (the passphrase on stdin)."""
    argv = [
        "cryptsetup", "--batch-mode", "luksFormat",
        "--type", "luks2" if spec.provider is Provider.LUKS2 else "luks1",
        "--cipher", spec.cipher, "--key-size", str(spec.key_size), "--hash", "sha256",
        "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", str(PBKDF2_ITERATIONS),
        "--offset", str(header_bytes // 512),
    ]  # fmt: skip
    if spec.provider is Provider.LUKS2:
        argv += ["--sector-size", "4096"]
    return [*argv, "--key-file", "-", device]


def _device(location: AnyLocation) -> str:
    if isinstance(location, LvmLocation):
        return location.device
    raise UnsupportedError(
        f"{location.describe()}: dm-crypt opens block devices here (logical volumes)"
    )


class DmCryptVolume(OpenVolume):
    """An open dm-crypt mapping: `/dev/mapper/NAME`."""

    def __init__(self, executor: Executor, name: str) -> None:
        self.executor = executor
        self.name = name
        self.path = f"/dev/mapper/{name}"
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self.executor.run(["cryptsetup", "close", self.name], timeout=_TIMEOUT)
        self._closed = True


class DmCryptEncryptor(Encryptor):
    engine: ClassVar[Engine] = Engine.DM_CRYPT

    def header_bytes(self, spec: EncryptionSpec) -> int:
        return HEADER_BYTES[spec.provider]

    def _format(
        self, backend: Backend, location: AnyLocation, key: bytes, spec: EncryptionSpec
    ) -> None:
        argv = format_argv(spec, _device(location), self.header_bytes(spec))
        self.executor.run(argv, stdin=passphrase(key), timeout=_TIMEOUT)

    def open(
        self,
        location: AnyLocation,
        key: bytes,
        credentials: NodeCredentials | None = None,
        *,
        writable: bool = True,
        name: str | None = None,
    ) -> DmCryptVolume:
        """Map the volume at `/dev/mapper/NAME` (default `trustplane-<lv>`)."""
        check_key_bytes(key)
        device = _device(location)
        mapping = name or f"trustplane-{device.rsplit('/', 1)[-1]}"
        if not _MAPPING.fullmatch(mapping):
            raise UsageError(f"not a device-mapper name: {mapping!r}")
        argv = ["cryptsetup", "open", "--type", "luks", "--key-file", "-"]
        if not writable:
            argv.append("--readonly")
        self.executor.run(
            [*argv, device, mapping], stdin=passphrase(key), failures=WRONG_KEY, timeout=_TIMEOUT
        )
        return DmCryptVolume(self.executor, mapping)

    def usable_size(
        self, location: AnyLocation, key: bytes, credentials: NodeCredentials | None = None
    ) -> int:
        """Opened read-only under a name of its own, `blockdev --getsize64`, closed."""
        device = _device(location)
        name = f"trustplane-size-{device.rsplit('/', 1)[-1]}"
        with self.open(location, key, credentials, writable=False, name=name) as opened:
            out = self.executor.run(["blockdev", "--getsize64", opened.path], timeout=_TIMEOUT)
        try:
            return int(out.text.strip())
        except ValueError:
            raise UnavailableError(f"blockdev gave no size for {opened.path}") from None

    def check_key(
        self, location: AnyLocation, key: bytes, credentials: NodeCredentials | None = None
    ) -> None:
        check_key_bytes(key)
        argv = ["cryptsetup", "open", "--test-passphrase", "--key-file", "-", _device(location)]
        self.executor.run(argv, stdin=passphrase(key), failures=WRONG_KEY, timeout=_TIMEOUT)
