"""Constant-memory streaming with digests computed in parallel.

Encrypting a layer needs three SHA-256 passes (the plaintext digest to verify
the source, the HMAC over the ciphertext, the ciphertext digest for the new
descriptor) plus AES-CTR and the write. One core does SHA-256 at about the
speed of the HMAC bound, so doing them in turn would cap us at a third of it.
hashlib and file writes release the GIL, so each consumer gets its own thread
and the OS spreads them over the cores; the producer only reads and runs the
(much faster) keystream. Memory is `depth` slots of one or two chunks,
whatever the size of the layer.
"""

from __future__ import annotations

import ctypes
import io
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

CHUNK_SIZE = 1 << 20
"""1 MiB: large enough that per-chunk thread hand-off costs nothing measurable."""


class Transform(Protocol):
    """Maps a chunk to an equal-length chunk (a stream cipher's keystream).

    `out` is `TRANSFORM_SLACK` bytes longer than `data`, as `cryptography`'s
    `update_into` requires.
    """

    def update_into(self, data: memoryview, out: memoryview) -> int: ...


class Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


Consumer = Callable[[memoryview], object]
"""Receives each chunk in order: a hash's `update`, a file's `write`. The view
is only valid during the call (its buffer is reused): copy what you keep."""

TRANSFORM_SLACK = 64

INPUT = 0
"""Consumer wants the bytes as read."""
OUTPUT = 1
"""Consumer wants the bytes after the transform."""


@dataclass
class _Slot:
    own: bytearray
    output: bytearray | None
    data: memoryview = field(default_factory=lambda: memoryview(b""))
    """This chunk's input: the filled part of `own`."""
    pending: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def view(self, side: int) -> memoryview:
        if side == INPUT:
            return self.data
        assert self.output is not None
        return memoryview(self.output)[: len(self.data)]


class _Worker(threading.Thread):
    def __init__(self, pipeline: _Pipeline, side: int, consume: Consumer) -> None:
        super().__init__(daemon=True, name="trustplane-stream")
        self.pipeline = pipeline
        self.side = side
        self.consume = consume
        self.inbox: queue.SimpleQueue[_Slot | None] = queue.SimpleQueue()

    def run(self) -> None:
        while (slot := self.inbox.get()) is not None:
            try:
                if self.pipeline.error is None:
                    self.consume(slot.view(self.side))
            except BaseException as exc:  # handed to the producer, which re-raises it
                self.pipeline.fail(exc)
            self.pipeline.release(slot)


class _Pipeline:
    def __init__(self, consumers: Sequence[tuple[int, Consumer]], two_sided: bool, depth: int):
        self.error: BaseException | None = None
        self._free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        for _ in range(depth):
            output = bytearray(CHUNK_SIZE + TRANSFORM_SLACK) if two_sided else None
            self._free.put(_Slot(bytearray(CHUNK_SIZE), output))
        self._workers = [_Worker(self, side, fn) for side, fn in consumers]
        for worker in self._workers:
            worker.start()

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc

    def acquire(self) -> _Slot:
        return self._free.get()

    def give_back(self, slot: _Slot) -> None:
        slot.data = memoryview(b"")
        self._free.put(slot)

    def publish(self, slot: _Slot) -> None:
        if not self._workers:  # nobody will release it: it is free again at once
            self.give_back(slot)
            return
        slot.pending = len(self._workers)
        for worker in self._workers:
            worker.inbox.put(slot)

    def release(self, slot: _Slot) -> None:
        with slot.lock:
            slot.pending -= 1
            done = slot.pending == 0
        if done:
            self.give_back(slot)

    def close(self) -> None:
        for worker in self._workers:
            worker.inbox.put(None)
        for worker in self._workers:
            worker.join()


def pump(
    source: Readable,
    consumers: Sequence[tuple[int, Consumer]],
    *,
    transform: Transform | None = None,
    limit: int | None = None,
    progress: Callable[[int], object] | None = None,
    depth: int = 6,
) -> int:
    """Read `source` to its end (or `limit` bytes) and feed every consumer.

    Each consumer is `(INPUT, fn)` or `(OUTPUT, fn)`; OUTPUT needs a transform.
    Consumers see the chunks in order, each on its own thread. Returns the
    number of bytes read. The first exception from a consumer or the source
    is re-raised here after every thread has stopped.
    """
    if transform is None and any(side == OUTPUT for side, _ in consumers):
        raise ValueError("an OUTPUT consumer needs a transform")
    pipeline = _Pipeline(consumers, transform is not None, depth)
    total = 0
    try:
        while pipeline.error is None:
            slot = pipeline.acquire()
            want = CHUNK_SIZE if limit is None else min(CHUNK_SIZE, limit - total)
            n = _read_full(source, memoryview(slot.own)[:want]) if want else 0
            slot.data = memoryview(slot.own)[:n]
            if n == 0:
                pipeline.give_back(slot)
                break
            if transform is not None:
                assert slot.output is not None
                transform.update_into(slot.data, memoryview(slot.output)[: n + TRANSFORM_SLACK])
            pipeline.publish(slot)
            total += n
            if progress is not None:
                progress(n)
    finally:
        pipeline.close()
    if pipeline.error is not None:
        raise pipeline.error
    return total


class DurableSink:
    """A file sink that starts writing back to disk while data still arrives.

    Atomic publication ends with fsync; for a large blob that means waiting
    for the disk to absorb everything at the end. Asking the kernel to start
    write-out of each completed stretch as we go (sync_file_range, which
    Python does not wrap, hence ctypes) leaves the final fsync little to do.
    """

    STRETCH = 16 << 20

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self._written = 0
        self._flushed = 0

    def write(self, data: memoryview) -> None:
        self._handle.write(data)
        self._written += len(data)
        if self._written - self._flushed >= self.STRETCH:
            self._handle.flush()
            _start_writeback(self._handle.fileno(), self._flushed, self._written - self._flushed)
            self._flushed = self._written


def _start_writeback(fd: int, offset: int, length: int) -> None:
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, ctypes.c_longlong(offset), ctypes.c_longlong(length), 2)


def _load_sync_file_range() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None  # not Linux/glibc: fsync at commit does all the work
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return function


_SYNC_FILE_RANGE = _load_sync_file_range()
"""SYNC_FILE_RANGE_WRITE (2): start write-out of dirty pages, do not wait."""


def _read_full(source: Readable, view: memoryview) -> int:
    """Fill `view` unless the source ends first (sockets return short reads)."""
    filled = 0
    while filled < len(view):
        n = source.readinto(view[filled:])
        if not n:
            break
        filled += n
    return filled


class ReadableFile(io.RawIOBase):
    """A `Readable` as a raw file, for APIs that want `read` (tarfile, gzip)."""

    def __init__(self, inner: Readable) -> None:
        self._inner = inner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._inner.readinto(memoryview(buffer).cast("B")) or 0


class ChunkReader(io.RawIOBase):
    """A file over an iterator of byte chunks (an HTTP body, a save stream)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = memoryview(next(self._chunks))
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def read_upto(source: Readable, limit: int) -> bytes:
    """At most `limit` bytes (fewer only at the end of the stream)."""
    buffer = bytearray(limit)
    n = _read_full(source, memoryview(buffer))
    del buffer[n:]
    return bytes(buffer)


def iter_chunks(
    source: Readable, size: int, progress: Callable[[int], object] | None = None
) -> Iterator[bytes]:
    """Exactly `size` bytes of `source` in chunks; a short source is an error."""
    remaining = size
    buffer = bytearray(CHUNK_SIZE)
    while remaining > 0:
        n = _read_full(source, memoryview(buffer)[: min(CHUNK_SIZE, remaining)])
        if n == 0:
            raise EOFError(f"stream ended {remaining} bytes early")
        remaining -= n
        if progress is not None:
            progress(n)
        yield bytes(buffer[:n])


def copy_stream(source: Readable, sink: IO[bytes], consumers: Sequence[Consumer] = ()) -> int:
    """Copy `source` into `sink`, feeding `consumers` (digests) on the side."""
    return pump(source, [(INPUT, sink.write), *((INPUT, c) for c in consumers)])
