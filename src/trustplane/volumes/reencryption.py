"""Re-encryption's storage side: a volume's plaintext copied into new storage under a new key.

The control plane's state machine (control/volume_reencryption.py) makes
the new storage (`create_target`: created and LUKS-formatted under the new
key by the volume's own encryptor, so the new storage is what a create
makes), then calls `copy` with the position to start from. `copy` opens
both volumes in user space, each by its own `qemu-storage-daemon` (the old
one read-only with the old key, the new one writable with the new key;
keys reach the daemons only as secret objects from 0600 files, through the
executor) exporting the plaintext through FUSE, and copies fixed-size
chunks between the two exports with two preallocated buffers (one read
while the other is written: memory stays flat whatever the size). After
each chunk the new export is flushed (`fsync`: QEMU's FUSE export flushes
its block node, so the bytes are on the new storage) and only then is
`flushed(end)` called, so the progress recorded never runs ahead of the
storage.

A process that dies mid-copy leaves its daemons running (they are in
sessions of their own): `UserspaceRecord`s (pids and paths, no secret) are
handed to the caller, which records them, and `stop_leftovers` stops the
ones a dead run left before the copy is started again (QEMU would refuse to
open the new storage for writing while a leftover daemon holds its lock).

Engines: QEMU's LUKS1 (files, iSCSI LUNs, RBD images) and librbd's LUKS
(RBD), both opened by `qemu-storage-daemon`. dm-crypt volumes would need
device-mapper on this host (`cryptsetup reencrypt`); not done.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from trustplane.api.volume_location import AnyLocation
from trustplane.api.volume_spec import EncryptionSpec, Engine
from trustplane.errors import TrustplaneError, UnavailableError, UnsupportedError
from trustplane.tools import Executor
from trustplane.tools.command import Arg
from trustplane.volumes.access import NodeCredentials, qemu_node
from trustplane.volumes.attachers.userspace import UserspaceRecord, UserspaceVolume
from trustplane.volumes.backends.base import Backend
from trustplane.volumes.encryptors import LibrbdEncryptor, QemuLuksEncryptor, encryptor_for

DEFAULT_CHUNK = 4 << 20
"""Bytes copied between two flushes (and two progress records)."""
SUPPORTED = (Engine.QEMU, Engine.LIBRBD)

Flushed = Callable[[int], None]
Opened = Callable[[Sequence[UserspaceRecord]], None]


def user_space_encryptor(engine: Engine, executor: Executor) -> QemuLuksEncryptor | LibrbdEncryptor:
    """The encryptor that opens both ends in user space; UnsupportedError for dm-crypt."""
    if engine not in SUPPORTED:
        raise UnsupportedError(
            f"re-encrypting {engine} volumes is not done: it needs device-mapper on the "
            "storage host (cryptsetup reencrypt); QEMU LUKS1 and librbd volumes only"
        )
    encryptor = encryptor_for(engine, executor)
    assert isinstance(encryptor, QemuLuksEncryptor | LibrbdEncryptor)
    return encryptor


def create_target(
    backend: Backend, engine: Engine, spec: EncryptionSpec, name: str, size: int, key: bytes
) -> AnyLocation:
    """New storage `name` of `size` usable bytes, formatted under `key` (never over storage
    that exists: the encryptor refuses it)."""
    return user_space_encryptor(engine, backend.executor).create(backend, name, size, key, spec)


def wipe_header(
    backend: Backend, engine: Engine, spec: EncryptionSpec, location: AnyLocation
) -> None:
    """Overwrite the LUKS header of storage about to be deleted (its key slots) with zeros.

    The KMS key is destroyed too; this also leaves nothing a kept copy of that
    key could unlock in blocks the storage gives back (an unlinked file's on
    the disk, a LUN's backing file, an image's objects)."""
    size = user_space_encryptor(engine, backend.executor).header_bytes(spec)
    node = qemu_node(location, backend.credentials())
    argv: list[Arg] = [
        "qemu-io", *node.object_args(), "--image-opts", node.opts(),
        "-c", f"write -P 0 0 {size}", "-c", "flush",
    ]  # fmt: skip
    backend.executor.run(argv, timeout=300)


def stop_leftovers(executor: Executor, records: Sequence[UserspaceRecord]) -> None:
    """Stop the daemons (and FUSE mounts) a dead copy left; those already gone are skipped."""
    for record in records:
        with contextlib.suppress(TrustplaneError):
            UserspaceVolume.adopt(executor, record).close(force=True)


@contextlib.contextmanager
def _opened(
    encryptor: QemuLuksEncryptor | LibrbdEncryptor,
    location: AnyLocation,
    key: bytes,
    credentials: NodeCredentials,
    *,
    writable: bool,
) -> Iterator[UserspaceVolume]:
    volume = encryptor.open(location, key, credentials, writable=writable, loop=False)
    try:
        yield volume
    finally:
        volume.close(force=True)


def copy(
    backend: Backend,
    engine: Engine,
    source: AnyLocation,
    source_key: bytes,
    target: AnyLocation,
    target_key: bytes,
    *,
    start: int,
    total: int,
    flushed: Flushed,
    opened: Opened | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> None:
    """Copy plaintext bytes [start, total) of `source` into `target`; `flushed(end)` after
    each chunk is on the target's storage. `opened` gets the daemons' records first."""
    if chunk <= 0 or chunk % 512:
        raise ValueError("the chunk is a positive multiple of 512 bytes")
    encryptor = user_space_encryptor(engine, backend.executor)
    credentials = backend.credentials()
    with (
        _opened(encryptor, source, source_key, credentials, writable=False) as old,
        _opened(encryptor, target, target_key, credentials, writable=True) as new,
    ):
        if opened is not None:
            opened([old.record(), new.record()])
        copy_exports(Path(old.export), Path(new.export), start, total, flushed, chunk)


def copy_exports(
    source: Path, target: Path, start: int, total: int, flushed: Flushed, chunk: int
) -> None:
    """The copy loop over two plaintext files, with two buffers of `chunk` bytes.

    A reader thread fills one buffer from the source while this thread writes
    and flushes the other, so the two daemons decrypt and encrypt at the same
    time (QEMU runs each one's cipher on its own thread)."""
    src = os.open(source, os.O_RDONLY)
    try:
        dst = os.open(target, os.O_WRONLY)
        try:
            for size, what in (
                (os.fstat(src).st_size, "source"),
                (os.fstat(dst).st_size, "target"),
            ):
                if size < total:
                    raise UnavailableError(f"the {what} volume holds {size} bytes, not {total}")
            _pipeline(src, dst, start, total, flushed, chunk)
        finally:
            os.close(dst)
    finally:
        os.close(src)


_Filled = tuple[int, int, bytearray] | BaseException | None


def _pipeline(src: int, dst: int, start: int, total: int, flushed: Flushed, chunk: int) -> None:
    free: queue.Queue[bytearray | None] = queue.Queue()
    filled: queue.Queue[_Filled] = queue.Queue()
    for _ in range(2):
        free.put(bytearray(chunk))

    def read() -> None:
        try:
            offset = start
            while offset < total:
                buffer = free.get()
                if buffer is None:
                    return
                n = min(chunk, total - offset)
                _read_exactly(src, memoryview(buffer)[:n], offset)
                filled.put((offset, n, buffer))
                offset += n
            filled.put(None)
        except BaseException as exc:  # handed to the writer, raised there
            filled.put(exc)

    reader = threading.Thread(target=read, name="reencrypt-read", daemon=True)
    reader.start()
    try:
        while True:
            item = filled.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            offset, n, buffer = item
            _write_all(dst, memoryview(buffer)[:n], offset)
            os.fsync(dst)
            flushed(offset + n)
            free.put(buffer)
    finally:
        free.put(None)
        free.put(None)
        reader.join()


def _read_exactly(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise UnavailableError(f"the source volume ended at byte {offset + done}")
        done += n


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
