"""librbd's own encryption (the back-end control location): LUKS inside the RBD image.

librbd decrypts in the client library, with OpenSSL's AES-XTS, wherever the
image is opened: QEMU's rbd driver (`encrypt.format=luks2`), libvirt's
`<encryption format='luks2' engine='librbd'>`. The header is standard LUKS
at the start of the image: librbd loads it with libcryptsetup.

`rbd encryption format IMAGE luks2 PASSFILE` writes one with cryptsetup's
default PBKDF, argon2id calibrated to ~2 s and 170 MB (measured here: 11 s
to format, 1.8 s and 4.6 s to open LUKS2 and LUKS1), paid at every open.
A random 256-bit key needs no stretching, so trustplane writes the same
layout itself: `cryptsetup luksFormat` (PBKDF2, 1000 iterations, 4096-byte
sectors for LUKS2, payload at 16 MiB; 512-byte sectors and 4 MiB for LUKS1,
librbd's own offsets) into a private local header file, then copies the
header area onto the image (`qemu-img convert -n` through librbd). librbd
opens it in ~0.1 s.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import ClassVar

from trustplane.api.volume_location import AnyLocation, RbdLocation
from trustplane.api.volume_spec import EncryptionSpec, Engine, Provider
from trustplane.errors import UnavailableError, UsageError
from trustplane.tools.command import Arg
from trustplane.volumes.access import NodeCredentials, qemu_node
from trustplane.volumes.attachers.userspace import (
    KEY_OBJECT,
    UserspaceVolume,
    key_object,
    open_userspace,
)
from trustplane.volumes.backends.base import Backend
from trustplane.volumes.encryptors.base import Encryptor, check_key_bytes, passphrase
from trustplane.volumes.encryptors.dm_crypt import format_argv
from trustplane.volumes.opening import WRONG_KEY

HEADER_BYTES = {Provider.LUKS: 4 << 20, Provider.LUKS2: 16 << 20}
"""Where `rbd encryption format` puts the payload (measured: 8192 and 32768 sectors)."""
_TIMEOUT = 180.0
_SPARE = 1 << 20
"""Room after the header in the local file: cryptsetup wants a payload to exist."""


def _image(location: AnyLocation) -> RbdLocation:
    if not isinstance(location, RbdLocation):
        raise UsageError(f"{location.describe()}: librbd encrypts RBD images only")
    return location


def encrypt_format(spec: EncryptionSpec | Provider) -> str:
    """QEMU's and libvirt's name for the LUKS version: `luks` or `luks2`."""
    provider = spec.provider if isinstance(spec, EncryptionSpec) else spec
    return "luks2" if provider is Provider.LUKS2 else "luks"


class LibrbdEncryptor(Encryptor):
    engine: ClassVar[Engine] = Engine.LIBRBD

    def header_bytes(self, spec: EncryptionSpec) -> int:
        return HEADER_BYTES[spec.provider]

    def _format(
        self, backend: Backend, location: AnyLocation, key: bytes, spec: EncryptionSpec
    ) -> None:
        image = _image(location)
        header = self.header_bytes(spec)
        node = qemu_node(image, backend.credentials())
        with tempfile.TemporaryDirectory(prefix="trustplane-luks-header-") as directory:
            local = Path(directory) / "header.img"
            with local.open("xb") as handle:
                handle.truncate(header + _SPARE)
            self.executor.run(
                format_argv(spec, os.fspath(local), header), stdin=passphrase(key),
                timeout=_TIMEOUT,
            )  # fmt: skip
            argv: list[Arg] = [
                "qemu-img", "convert", "-n", "-q", *node.object_args(),
                "--image-opts", f"driver=raw,size={header},file.driver=file,"
                f"file.filename={os.fspath(local).replace(',', ',,')}",
                "--target-image-opts", f"driver=raw,size={header},{node.opts('file.')}",
            ]  # fmt: skip
            self.executor.run(argv, timeout=_TIMEOUT)

    def blockdev(
        self,
        location: AnyLocation,
        credentials: NodeCredentials | None,
        provider: Provider,
        *,
        writable: bool,
    ) -> str:
        """The rbd node with librbd's encryption loaded: the volume's plaintext."""
        node = qemu_node(_image(location), credentials)
        return (
            f"{node.opts()},encrypt.format={encrypt_format(provider)},"
            f"encrypt.key-secret={KEY_OBJECT},node-name=volume,"
            f"read-only={'off' if writable else 'on'}"
        )

    def open(
        self,
        location: AnyLocation,
        key: bytes,
        credentials: NodeCredentials | None = None,
        *,
        writable: bool = True,
        loop: bool = True,
        mountpoint: Path | None = None,
        run_dir: Path | None = None,
        luks_version: int | None = None,
    ) -> UserspaceVolume:
        """`luks_version` (the fingerprint's) spares reading the header to learn it."""
        check_key_bytes(key)
        provider = self._provider(location, credentials, luks_version)
        node = qemu_node(_image(location), credentials)
        return open_userspace(
            self.executor,
            [self.blockdev(location, credentials, provider, writable=writable)],
            "volume",
            [key_object(passphrase(key)), *node.objects],
            writable=writable,
            loop=loop,
            mountpoint=mountpoint,
            run_dir=run_dir,
        )

    def _provider(
        self,
        location: AnyLocation,
        credentials: NodeCredentials | None,
        luks_version: int | None = None,
    ) -> Provider:
        """LUKS1 or LUKS2: as told, or from the image's header (QEMU 7.2 has no `luks-any`)."""
        if luks_version is not None:
            return Provider.LUKS2 if luks_version == 2 else Provider.LUKS
        first = self.reader(location, credentials).read(0, 8)
        return Provider.LUKS2 if first[6:8] == b"\x00\x02" else Provider.LUKS

    def usable_size(
        self,
        location: AnyLocation,
        key: bytes,
        credentials: NodeCredentials | None = None,
        *,
        luks_version: int | None = None,
    ) -> int:
        """`qemu-img info` of the rbd node with librbd's encryption loaded (Ceph 16
        gives the raw size less the payload offset)."""
        check_key_bytes(key)
        provider = self._provider(location, credentials, luks_version)
        node = qemu_node(_image(location), credentials)
        argv: list[Arg] = [
            "qemu-img", "info", "-U", "--output=json", "--object", key_object(passphrase(key)),
            *node.object_args(), "--image-opts",
            f"{node.opts()},encrypt.format={encrypt_format(provider)},"
            f"encrypt.key-secret={KEY_OBJECT}",
        ]  # fmt: skip
        out = self.executor.run(argv, failures=WRONG_KEY, timeout=_TIMEOUT).text
        try:
            return int(json.loads(out)["virtual-size"])
        except (ValueError, KeyError, TypeError):
            what = location.describe()
            raise UnavailableError(f"qemu-img info gave no size for {what}") from None

    def check_key(
        self,
        location: AnyLocation,
        key: bytes,
        credentials: NodeCredentials | None = None,
        *,
        luks_version: int | None = None,
    ) -> None:
        check_key_bytes(key)
        provider = self._provider(location, credentials, luks_version)
        node = qemu_node(_image(location), credentials)
        argv: list[Arg] = [
            "qemu-io", "-r", "-U", "--object", key_object(passphrase(key)),
            *node.object_args(), "--image-opts",
            f"{node.opts()},encrypt.format={encrypt_format(provider)},"
            f"encrypt.key-secret={KEY_OBJECT}",
            "-c", "read 0 512",
        ]  # fmt: skip
        self.executor.run(argv, failures=WRONG_KEY, timeout=_TIMEOUT)
