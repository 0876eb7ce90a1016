"""Storage-side steps of clone and encrypt in place: copy, rename, destroy plaintext.

- `copy_into_luks`: `qemu-img convert -n` (window by window) from a source (a LUKS1 volume
  opened with its own key, or plaintext storage read raw) into a LUKS1
  volume that was created and formatted under a *new* key. QEMU decrypts
  with the one and encrypts with the other, so the target has its own
  master key (a fresh header, new salts, new master-key digest): the
  source's key opens nothing of it, and the other way round. The keys reach
  QEMU as `--object secret,file=F` (0600, private directory, through the
  executor); the cephx key of an RBD end likewise. QEMU streams the data:
  memory stays flat whatever the size. Areas that read as zeros are
  written as encrypted zeros (a LUKS target has no zero-init), so the copy
  is the whole source, block for block.
- `rename_storage`: the swap of encrypt in place (file: a hard link then
  an unlink, never replacing a name that exists; RBD: `rbd rename`).
  iSCSI target names (IQNs) and logical volumes are not renamed here.
- `destroy_plaintext`: what is done to plaintext storage after its data
  lives on, encrypted, elsewhere. A file (or an iSCSI LUN's backing file) is
  overwritten with zeros where it holds data (`SEEK_DATA`/`SEEK_HOLE`),
  flushed, then removed. On a copy-on-write or log-structured file system
  (btrfs, ZFS, some flash translation layers) an overwrite lands elsewhere
  and the old blocks may survive: that is not protected. An RBD image is
  removed with `rbd rm`: its RADOS objects are deleted and BlueStore frees
  their extents *without* overwriting them, so the plaintext may stay on the
  OSD's devices until the space is reused (overwriting through librbd would
  not help: BlueStore writes large overwrites to new extents). An image with
  snapshots is refused before anything starts (its snapshots would keep the
  plaintext).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from trustplane.api.volume_location import AnyLocation, FileLocation, RbdLocation
from trustplane.atomic import fsync_dir
from trustplane.errors import (
    IntegrityError,
    NotFoundError,
    ToolError,
    UnsupportedError,
    UsageError,
)
from trustplane.tools import Executor, SecretFile
from trustplane.tools.command import Arg
from trustplane.volumes.access import NodeCredentials, qemu_node
from trustplane.volumes.backends import Backend, FileBackend, IscsiBackend, RbdBackend
from trustplane.volumes.encryptors.base import check_key_bytes, passphrase
from trustplane.volumes.opening import WRONG_KEY

SOURCE_KEY_OBJECT = "srckey"
TARGET_KEY_OBJECT = "dstkey"
_CHUNK = 1 << 20
COPY_CHUNK = 256 << 20
"""Bytes per `qemu-img convert` of a copy (each opens both ends once: ~0.1 s)."""
_MIN_TIMEOUT = 600.0
_FLOOR_RATE = 10 << 20
"""Bytes per second below which a copy is taken for hung (the timeout's basis)."""


def _key_object(key: bytes, object_id: str) -> SecretFile:
    return SecretFile(passphrase(check_key_bytes(key)), f"secret,id={object_id},file={{}}")


def copy_into_luks(
    executor: Executor,
    source: AnyLocation,
    source_key: bytes | None,
    target: AnyLocation,
    target_key: bytes,
    size: int,
    *,
    source_credentials: NodeCredentials | None = None,
    target_credentials: NodeCredentials | None = None,
    chunk: int = COPY_CHUNK,
    copied: Callable[[int], object] | None = None,
) -> None:
    """Copy `size` bytes of the source into the LUKS1 target (formatted under `target_key`).

    `source_key` None: the source is plaintext, read raw. The copy runs in windows
    of `chunk` bytes (one `qemu-img convert` each, `raw` offset/size windows over
    both ends); `copied(n)` is told the bytes done after each. DecryptionKeyError
    when a key does not open its end."""
    if size <= 0 or size % 512:
        raise UsageError(f"a copy is a whole number of sectors, not {size} bytes")
    if chunk <= 0 or chunk % 512:
        raise UsageError(f"a copy window is a whole number of sectors, not {chunk} bytes")
    src = qemu_node(source, source_credentials, object_prefix="srccephx")
    dst = qemu_node(target, target_credentials, object_prefix="dstcephx")
    offset = 0
    while offset < size:
        length = min(chunk, size - offset)
        objects: list[Arg] = [*src.object_args(), *dst.object_args()]
        window = f"driver=raw,offset={offset},size={length}"
        if source_key is None:
            source_opts = f"{window},{src.opts('file.')}"
        else:
            objects += ["--object", _key_object(source_key, SOURCE_KEY_OBJECT)]
            source_opts = (
                f"{window},file.driver=luks,file.key-secret={SOURCE_KEY_OBJECT},"
                f"{src.opts('file.file.')}"
            )
        objects += ["--object", _key_object(target_key, TARGET_KEY_OBJECT)]
        target_opts = (
            f"{window},file.driver=luks,file.key-secret={TARGET_KEY_OBJECT},"
            f"{dst.opts('file.file.')}"
        )
        argv: list[Arg] = [
            "qemu-img", "convert", "-q", "-n", *objects,
            "--image-opts", source_opts, "--target-image-opts", target_opts,
        ]  # fmt: skip
        executor.run(argv, failures=WRONG_KEY, timeout=max(_MIN_TIMEOUT, length / _FLOOR_RATE))
        offset += length
        if copied is not None:
            copied(offset)


def compare_with_luks(
    executor: Executor,
    plaintext: AnyLocation,
    target: AnyLocation,
    target_key: bytes,
    size: int,
    credentials: NodeCredentials | None = None,
) -> None:
    """IntegrityError unless the LUKS1 target reads exactly the plaintext's `size` bytes
    (`qemu-img compare`, both read whole, streamed): checked before a plaintext is destroyed."""
    src = qemu_node(plaintext, credentials, object_prefix="srccephx")
    dst = qemu_node(target, credentials, object_prefix="dstcephx")
    argv: list[Arg] = [
        "qemu-img", "compare", "-q", *src.object_args(), *dst.object_args(),
        "--object", _key_object(target_key, TARGET_KEY_OBJECT), "--image-opts",
        f"driver=raw,size={size},{src.opts('file.')}",
        f"driver=raw,size={size},file.driver=luks,file.key-secret={TARGET_KEY_OBJECT},"
        f"{dst.opts('file.file.')}",
    ]  # fmt: skip
    result = executor.run(argv, check=False, timeout=max(_MIN_TIMEOUT, size / _FLOOR_RATE))
    if result.returncode == 1:
        raise IntegrityError(f"{target.describe()} does not read what {plaintext.describe()} holds")
    if result.returncode != 0:
        last = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        raise ToolError(
            f"qemu-img compare: {last[0]}", tool="qemu-img", returncode=result.returncode
        )


def can_rename(backend: Backend) -> bool:
    """Whether `rename_storage` can move this backend's storage to another name."""
    return isinstance(backend, FileBackend | RbdBackend)


def rename_storage(backend: Backend, location: AnyLocation, name: str) -> AnyLocation:
    """Give the storage at `location` the name `name` (which must be free); its new location.

    A file is renamed by hard link + unlink: a crash between them leaves both names on
    one inode, and the next call finishes that rename (unlinks the old name) instead of
    refusing forever; another file under `name` is still refused and left alone."""
    target = backend.location(backend.check_name(name))
    if isinstance(backend, FileBackend) and isinstance(location, FileLocation):
        assert isinstance(target, FileLocation)
        try:
            os.link(location.path, target.path)  # never replaces a name that exists
        except FileExistsError:
            if not half_renamed(backend, location, name):
                raise UsageError(f"file volume {name} exists already") from None
        Path(location.path).unlink()
        fsync_dir(Path(target.path).parent)
        return target
    if isinstance(backend, RbdBackend) and isinstance(location, RbdLocation):
        assert isinstance(target, RbdLocation)
        backend.rbd("rename", location.spec, target.spec)
        return target
    raise UnsupportedError(f"renaming {backend.kind} storage is not done")


def half_renamed(backend: Backend, location: AnyLocation, name: str) -> bool:
    """Whether a file rename of `location` to `name` stopped between its link and its
    unlink: two different names on the same inode (RBD renames are atomic: never)."""
    if not (isinstance(backend, FileBackend) and isinstance(location, FileLocation)):
        return False
    target = backend.location(backend.check_name(name))
    assert isinstance(target, FileLocation)
    if Path(location.path) == Path(target.path):
        return False
    try:
        return Path(location.path).samefile(target.path)
    except FileNotFoundError:
        return False


def check_destroyable(backend: Backend, location: AnyLocation) -> None:
    """Refuse plaintext storage that `destroy_plaintext` could not destroy whole."""
    if isinstance(backend, RbdBackend) and isinstance(location, RbdLocation):
        snapshots = backend.rbd("snap", "ls", location.spec, "--format", "json").strip()
        if snapshots not in ("", "[]"):
            raise UsageError(
                f"{location.describe()} has snapshots, which would keep its plaintext; "
                "remove them first"
            )
        return
    if isinstance(backend, FileBackend) and isinstance(location, FileLocation):
        try:
            mode = Path(location.path).lstat().st_mode
        except FileNotFoundError:
            raise NotFoundError(f"{location.describe()} does not exist") from None
        if not stat.S_ISREG(mode):
            raise UsageError(
                f"{location.describe()} is not a regular file (a symbolic link, a device): "
                "only a file of the backend's directory is encrypted in place"
            )
        return
    if not isinstance(backend, IscsiBackend):
        raise UnsupportedError(f"encrypting {backend.kind} storage in place is not done")


def destroy_plaintext(backend: Backend, location: AnyLocation) -> None:
    """Overwrite (files, LUN backing files) and remove plaintext storage. Idempotent."""
    if isinstance(backend, FileBackend) and isinstance(location, FileLocation):
        overwrite_file(Path(location.path))
    elif isinstance(backend, IscsiBackend):
        overwrite_file(backend.backing_file(location))
    backend.delete(location)


def overwrite_file(path: Path) -> None:
    """Zeros over every data extent of the file, flushed (a missing file: nothing to do)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        zeros = bytes(_CHUNK)
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only holes from here on
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            position = start
            while position < end:
                step = min(_CHUNK, end - position)
                written = os.pwrite(fd, zeros[:step], position)
                position += written
            offset = end
        os.fsync(fd)
    finally:
        os.close(fd)
