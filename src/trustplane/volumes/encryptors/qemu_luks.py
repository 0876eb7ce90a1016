"""LUKS1 through QEMU's native driver: `qemu-img create -f luks`, opened in user space.

QEMU 7.2 reads and writes LUKS1 only. The header is written by
`qemu-img create -f luks` straight onto the backend's storage (a file, an
iSCSI LUN through libiscsi, `rbd:pool/image` through librbd: for RBD QEMU
creates the image itself). The same volume opens in a VM through libvirt's
`<encryption format='luks'>` (QEMU decrypts), or on a host through
`qemu-storage-daemon` (`attachers.userspace`).

Create options: `cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,
hash-alg=sha512` (cryptsetup's and Cinder's default cipher spelled out, so
a changed QEMU default cannot change new volumes; the hash is not their
SHA-256, for the reason below) and a 10 ms PBKDF
(`iter-time`), paid at every open. qemu-img calibrates its PBKDF on thread
CPU time, which this kernel counts in 4 ms ticks, starting with 2^15
iterations; it fails with `Unable to get accurate CPU usage` when that first
round ends inside one tick. With SHA-256 (SHA-NI) the round takes ~3 ms and
failed 28 of 100 creates here, idle or loaded, and 8 tries were not always
enough; with SHA-512 (no SHA-NI) it takes ~25 ms and failed 0 of 200, so the
PBKDF hash is SHA-512. The retry on that message (`QEMU_PBKDF_CALIBRATION`,
an empty RBD image left by a failed try removed first) stays for volumes
made with SHA-256 before, whose key-slot changes calibrate on their header's
hash (DESIGN.md, "QEMU LUKS").

Speed: QEMU's cipher backend on Debian 12 is nettle (libnettle 3.8), whose
XTS runs one 16-byte block per call, without the pipelining or VAES that
OpenSSL's AES-XTS has; QEMU adds 512-byte sectors and a bounce buffer.
`benchmarks/volumes.py` measures the share of the AES-XTS bound it reaches.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from trustplane.api.volume_location import AnyLocation
from trustplane.api.volume_spec import EncryptionSpec, Engine, Provider, check_volume_size
from trustplane.errors import (
    TrustplaneError,
    UnavailableError,
    UsageError,
)
from trustplane.tools import QEMU_LUKS_PBKDF_HASH, QEMU_PBKDF_CALIBRATION, SecretFile
from trustplane.tools.command import Arg
from trustplane.volumes.access import NodeCredentials, qemu_node
from trustplane.volumes.attachers.userspace import (
    KEY_OBJECT,
    UserspaceVolume,
    key_object,
    open_userspace,
    protocol_blockdev,
)
from trustplane.volumes.backends.base import Backend
from trustplane.volumes.encryptors.base import Encryptor, check_key_bytes, passphrase
from trustplane.volumes.opening import WRONG_KEY

# QEMU 7.2's LUKS1 layout: 4096 header bytes, then 8 key slots of
# key_bytes * 4000 stripes, each rounded up to 4096 bytes (measured here:
# payload offset 4040 sectors for a 512-bit master key, 2056 for 256 bits).
_HEADER_BYTES = {512: 4040 * 512, 256: 2056 * 512}
_CREATE_TIMEOUT = 300.0
OTHER_KEY_OBJECT = "key1"
"""The second secret object of a key-slot change (the new key, or the one removed)."""


class QemuLuksEncryptor(Encryptor):
    engine: ClassVar[Engine] = Engine.QEMU

    def header_bytes(self, spec: EncryptionSpec) -> int:
        self._check(spec)
        return _HEADER_BYTES[spec.key_size]

    @staticmethod
    def _check(spec: EncryptionSpec) -> None:
        if spec.provider is not Provider.LUKS:
            raise UsageError("QEMU's LUKS driver (QEMU 7.2) writes and reads LUKS1 only")

    def _create_argv(self, key: bytes, spec: EncryptionSpec, target: Arg, size: int) -> list[Arg]:
        options = (
            f"key-secret={KEY_OBJECT},cipher-alg=aes-{spec.aes_bits},cipher-mode=xts,"
            f"ivgen-alg=plain64,hash-alg={QEMU_LUKS_PBKDF_HASH},iter-time={self.iter_time_ms}"
        )
        return [
            "qemu-img", "create", "-q", "-f", "luks",
            "--object", key_object(passphrase(key)),
            "-o", options, target, str(size),
        ]  # fmt: skip

    def create(
        self,
        backend: Backend,
        name: str,
        size: int,
        key: bytes,
        spec: EncryptionSpec,
        made: Callable[[AnyLocation], None] | None = None,
    ) -> AnyLocation:
        """QEMU creates RBD images itself while formatting (`made` is told once it
        is done); other storage is made first."""
        if not backend.qemu_creates_storage:
            return super().create(backend, name, size, key, spec, made)
        self._check(spec)
        backend.check_name(name)
        check_volume_size(size)
        check_key_bytes(key)
        if backend.exists(name):
            raise UsageError(
                f"{backend.kind} volume {name} exists already; trustplane never formats "
                "a volume that exists"
            )
        location = backend.location(name)
        target = backend.qemu_create_target(location)
        retry = QEMU_PBKDF_CALIBRATION.with_cleanup(lambda: backend.remove_leftover(location))
        try:
            self.executor.run(
                self._create_argv(key, spec, target, size), retry=retry, timeout=_CREATE_TIMEOUT
            )
        except BaseException:
            with contextlib.suppress(TrustplaneError):
                backend.remove_leftover(location)
            raise
        if made is not None:
            made(location)
        return location

    def _format(
        self, backend: Backend, location: AnyLocation, key: bytes, spec: EncryptionSpec
    ) -> None:
        self._check(spec)
        payload = backend.size(location) - self.header_bytes(spec)
        if payload <= 0:
            raise UsageError(f"{location.describe()} is too small for a LUKS header")
        argv = self._create_argv(key, spec, backend.qemu_format_target(location), payload)
        retry = QEMU_PBKDF_CALIBRATION.with_cleanup(lambda: backend.before_format_retry(location))
        self.executor.run(argv, retry=retry, timeout=_CREATE_TIMEOUT)

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
    ) -> UserspaceVolume:
        check_key_bytes(key)
        node = qemu_node(location, credentials)
        ro = "off" if writable else "on"
        blockdevs = [
            protocol_blockdev(node, "proto", writable=writable),
            f"driver=luks,node-name=volume,file=proto,key-secret={KEY_OBJECT},read-only={ro}",
        ]
        return open_userspace(
            self.executor,
            blockdevs,
            "volume",
            [key_object(passphrase(key)), *node.objects],
            writable=writable,
            loop=loop,
            mountpoint=mountpoint,
            run_dir=run_dir,
        )

    @staticmethod
    def _luks_opts(
        location: AnyLocation, credentials: NodeCredentials | None
    ) -> tuple[list[Arg], str]:
        """The `--object` arguments (key, cephx) and `--image-opts` of the LUKS node."""
        node = qemu_node(location, credentials)
        return node.object_args(), f"driver=luks,key-secret={KEY_OBJECT},{node.opts('file.')}"

    def _info(
        self, location: AnyLocation, key: bytes, credentials: NodeCredentials | None
    ) -> dict[str, Any]:
        """`qemu-img info` through the LUKS driver (opened with `key`)."""
        check_key_bytes(key)
        objects, opts = self._luks_opts(location, credentials)
        argv: list[Arg] = [
            "qemu-img", "info", "-U", "--output=json", "--object", key_object(passphrase(key)),
            *objects, "--image-opts", opts,
        ]  # fmt: skip
        out = self.executor.run(argv, failures=WRONG_KEY, timeout=120).text
        try:
            info = json.loads(out)
        except ValueError:
            info = None
        if not isinstance(info, dict):
            raise UnavailableError(f"qemu-img info of {location.describe()} is not JSON")
        return info

    def usable_size(
        self, location: AnyLocation, key: bytes, credentials: NodeCredentials | None = None
    ) -> int:
        """The size a guest sees, through QEMU's LUKS driver (`qemu-img info`)."""
        try:
            return int(self._info(location, key, credentials)["virtual-size"])
        except (ValueError, KeyError, TypeError):
            what = location.describe()
            raise UnavailableError(f"qemu-img info gave no size for {what}") from None

    def active_keyslots(
        self, location: AnyLocation, key: bytes, credentials: NodeCredentials | None = None
    ) -> int:
        """How many LUKS key slots are active (`key` must open one of them)."""
        info = self._info(location, key, credentials)
        try:
            slots = info["format-specific"]["data"]["slots"]
            return sum(1 for slot in slots if slot["active"])
        except (KeyError, TypeError):
            what = location.describe()
            raise UnavailableError(f"qemu-img info gave no key slots for {what}") from None

    def _amend(
        self,
        location: AnyLocation,
        opener: bytes,
        other: bytes,
        options: str,
        credentials: NodeCredentials | None,
    ) -> None:
        """`qemu-img amend` of the LUKS header, opened with `opener`; `other` is object key1."""
        check_key_bytes(opener)
        check_key_bytes(other)
        objects, opts = self._luks_opts(location, credentials)
        other_object = SecretFile(passphrase(other), f"secret,id={OTHER_KEY_OBJECT},file={{}}")
        argv: list[Arg] = [
            "qemu-img", "amend", "-q", "--object", key_object(passphrase(opener)),
            "--object", other_object, *objects, "--image-opts", opts, "-o", options,
        ]  # fmt: skip
        # A new slot calibrates the PBKDF on the header's hash (SHA-256 on older volumes).
        self.executor.run(
            argv, failures=WRONG_KEY, timeout=_CREATE_TIMEOUT, retry=QEMU_PBKDF_CALIBRATION
        )

    def add_key(
        self,
        location: AnyLocation,
        key: bytes,
        new_key: bytes,
        credentials: NodeCredentials | None = None,
    ) -> None:
        """A new key slot for `new_key` (the master key is unchanged: no data copied)."""
        options = f"state=active,new-secret={OTHER_KEY_OBJECT},iter-time={self.iter_time_ms}"
        self._amend(location, key, new_key, options, credentials)

    def remove_key(
        self,
        location: AnyLocation,
        key: bytes,
        removed: bytes,
        credentials: NodeCredentials | None = None,
    ) -> None:
        """Erase every key slot `removed` opens (QEMU overwrites the slot's key material);
        opened with `key`, which keeps its slot."""
        self._amend(
            location, key, removed, f"state=inactive,old-secret={OTHER_KEY_OBJECT}", credentials
        )

    def check_key(
        self, location: AnyLocation, key: bytes, credentials: NodeCredentials | None = None
    ) -> None:
        check_key_bytes(key)
        node = qemu_node(location, credentials)
        argv: list[Arg] = [
            "qemu-io", "-r", "-U", "--object", key_object(passphrase(key)),
            *node.object_args(), "--image-opts",
            f"driver=luks,key-secret={KEY_OBJECT},{node.opts('file.')}",
            "-c", "read 0 512",
        ]  # fmt: skip
        self.executor.run(argv, failures=WRONG_KEY, timeout=120)
