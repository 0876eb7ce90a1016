"""How a host reaches a located volume: QEMU's block-node options and raw reads.

QEMU (qemu-io, qemu-img, qemu-storage-daemon, and the VM's QEMU through
libvirt) reaches every backend from user space: a file, an iSCSI LUN
through libiscsi, an RBD image through librbd, a logical volume as a host
device. `qemu_node` spells that as `--blockdev`/`--image-opts` options, with
the secret objects it needs (the cephx key, from a private 0600 file).

`raw_reader` reads a volume's raw (encrypted) bytes the same way, for the
LUKS header checks: the header fingerprint, and the refusal to format a
volume that already has a header. Reads go through QEMU's `raw` driver with
an `offset`/`size` window copied to a private temporary file, so a 16 MiB
LUKS2 header is hashed in chunks, never held whole.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from trustplane.api.volume_location import (
    AnyLocation,
    FileLocation,
    IscsiLocation,
    LvmLocation,
    RbdLocation,
)
from trustplane.errors import NotFoundError, UnavailableError, UsageError
from trustplane.tools import Executor, SecretFile
from trustplane.tools.command import Arg
from trustplane.volumes.header import RawReader

_CHUNK = 1 << 20
_TOOL_TIMEOUT = 120.0


@dataclass(frozen=True)
class NodeCredentials:
    """What a host needs besides a location: the cephx key of its RBD user (raw bytes).

    The volume key is not here: it comes from the KMS for one attach.
    """

    ceph_key: bytes | None = field(default=None, repr=False)

    def require_ceph_key(self, location: RbdLocation) -> bytes:
        if not self.ceph_key:
            raise UsageError(
                f"{location.describe()}: the cephx key of client.{location.user} is needed"
            )
        return self.ceph_key


@dataclass(frozen=True)
class QemuNode:
    """A protocol node as QEMU option pairs, and the `--object` secrets they name."""

    options: tuple[tuple[str, str], ...]
    objects: tuple[SecretFile, ...] = ()

    def opts(self, prefix: str = "") -> str:
        """`driver=…,k=v,…` with every key under `prefix` (e.g. `file.`)."""
        return ",".join(f"{prefix}{key}={_escape(value)}" for key, value in self.options)

    def object_args(self) -> list[Arg]:
        args: list[Arg] = []
        for secret in self.objects:
            args += ["--object", secret]
        return args


def _escape(value: str) -> str:
    """QEMU option values double their commas."""
    return value.replace(",", ",,")


def ceph_secret_object(key: bytes, object_id: str) -> SecretFile:
    """QEMU's secret object for a cephx key (QEMU hands librados the key in base64)."""
    return SecretFile(base64.b64encode(key), f"secret,id={object_id},file={{}},format=base64")


def qemu_node(
    location: AnyLocation,
    credentials: NodeCredentials | None = None,
    *,
    object_prefix: str = "cephx",
) -> QemuNode:
    """The QEMU protocol node that reaches `location` (no format driver on top)."""
    if isinstance(location, FileLocation):
        return QemuNode((("driver", "file"), ("filename", location.path)))
    if isinstance(location, LvmLocation):
        return QemuNode((("driver", "host_device"), ("filename", location.device)))
    if isinstance(location, IscsiLocation):
        return QemuNode(
            (
                ("driver", "iscsi"),
                ("transport", "tcp"),
                ("portal", str(location.portal)),
                ("target", location.iqn),
                ("lun", str(location.lun)),
            )
        )
    key = (credentials or NodeCredentials()).require_ceph_key(location)
    object_id = f"{object_prefix}0"
    options: list[tuple[str, str]] = [
        ("driver", "rbd"),
        ("pool", location.pool),
        ("image", location.image),
        ("user", location.user),
        # Everything librados needs is here: no ceph.conf, no keyring file.
        ("conf", "/dev/null"),
        ("key-secret", object_id),
    ]
    for index, monitor in enumerate(location.monitors):
        options += [
            (f"server.{index}.host", monitor.host),
            (f"server.{index}.port", str(monitor.port)),
        ]
    return QemuNode(tuple(options), (ceph_secret_object(key, object_id),))


class QemuRawReader:
    """Raw bytes through QEMU's `raw` driver: any protocol QEMU reaches."""

    def __init__(self, executor: Executor, node: QemuNode, what: str) -> None:
        self.executor = executor
        self.node = node
        self.what = what

    @contextlib.contextmanager
    def _window(self, offset: int, length: int) -> Iterator[Path]:
        """The bytes [offset, offset+length) copied into a private temporary file."""
        with tempfile.TemporaryDirectory(prefix="trustplane-raw-") as directory:
            target = Path(directory) / "window.raw"
            argv: list[Arg] = [
                "qemu-img", "convert", "-q", *self.node.object_args(), "--image-opts",
                f"driver=raw,offset={offset},size={length},{self.node.opts('file.')}",
                "-O", "raw", os.fspath(target),
            ]  # fmt: skip
            self.executor.run(argv, timeout=_TOOL_TIMEOUT)
            yield target

    def _aligned(self, offset: int, length: int) -> tuple[int, int, int]:
        start = offset - offset % 512
        end = offset + length
        end += -end % 512
        return start, end - start, offset - start

    def read(self, offset: int, length: int) -> bytes:
        start, size, skip = self._aligned(offset, length)
        with self._window(start, size) as path, path.open("rb") as handle:
            handle.seek(skip)
            return handle.read(length)

    def digest(self, length: int) -> str:
        start, size, _ = self._aligned(0, length)
        if size != length:
            raise UsageError("a digested header area is a whole number of sectors")
        with self._window(start, size) as path:
            return _file_digest(path, length)


class FileRawReader:
    """Raw bytes of a volume file, read directly."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self, offset: int, length: int) -> bytes:
        try:
            with self.path.open("rb") as handle:
                handle.seek(offset)
                return handle.read(length)
        except FileNotFoundError:
            raise NotFoundError(f"volume file {self.path} does not exist") from None

    def digest(self, length: int) -> str:
        try:
            return _file_digest(self.path, length)
        except FileNotFoundError:
            raise NotFoundError(f"volume file {self.path} does not exist") from None

    def unwritten(self, offset: int, length: int) -> bool:
        """True when [offset, offset+length) lies in a hole of the sparse file (never
        written). A file system without holes reports none: zeros then count as written."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise NotFoundError(f"volume file {self.path} does not exist") from None
        try:
            return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data from `offset` to the end
                return True
            raise
        finally:
            os.close(fd)


class DeviceRawReader:
    """Raw bytes of a block device where the executor runs (a host, the test guest).

    The digest is computed there (`sha256sum`), so a header never crosses
    the executor's channel whole.
    """

    def __init__(self, executor: Executor, device: str) -> None:
        self.executor = executor
        self.device = device

    def read(self, offset: int, length: int) -> bytes:
        start = offset - offset % 512
        count = (offset + length - start + 511) // 512
        argv = ["dd", f"if={self.device}", "bs=512", f"skip={start // 512}", f"count={count}"]
        data = self.executor.run(argv, timeout=_TOOL_TIMEOUT).stdout
        return data[offset - start : offset - start + length]

    def digest(self, length: int) -> str:
        if length % 512:
            raise UsageError("a digested header area is a whole number of sectors")
        script = 'dd if="$1" bs=512 count="$2" 2>/dev/null | sha256sum'
        argv = ["sh", "-c", script, "sh", self.device, str(length // 512)]
        out = self.executor.run(argv, timeout=_TOOL_TIMEOUT).text.split()
        if not out or len(out[0]) != 64:
            raise UnavailableError(f"sha256sum of {self.device} gave no digest")
        return out[0]


def _file_digest(path: Path, length: int) -> str:
    digest = hashlib.sha256()
    remaining = length
    with path.open("rb") as handle:
        while remaining > 0:
            chunk = handle.read(min(_CHUNK, remaining))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    # Past the end of a short volume: what QEMU reads there (zeros).
    while remaining > 0:
        step = min(_CHUNK, remaining)
        digest.update(bytes(step))
        remaining -= step
    return digest.hexdigest()


def raw_reader(
    location: AnyLocation,
    executor: Executor | None = None,
    credentials: NodeCredentials | None = None,
) -> RawReader:
    """The reader for `location`'s raw bytes, the way this host reaches them."""
    executor = executor or Executor()
    if isinstance(location, FileLocation):
        return FileRawReader(Path(location.path))
    if isinstance(location, LvmLocation):
        return DeviceRawReader(executor, location.device)
    return QemuRawReader(executor, qemu_node(location, credentials), location.describe())
