"""The threaded pump: same bytes as a plain loop, errors surface, threads end."""

from __future__ import annotations

import gzip
import hashlib
import io
import mmap
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustplane import streaming
from trustplane.crypto.layer_cipher import Keystream
from trustplane.streaming import (
    INPUT,
    OUTPUT,
    ChunkReader,
    DurableSink,
    ReadableFile,
    copy_stream,
    iter_chunks,
    pump,
    read_upto,
)

KEY = bytes(range(32))
NONCE = bytes(16)


class ShortReads:
    """A socket-like source: each readinto returns a random, often short, count."""

    def __init__(self, data: bytes, seed: int) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._rng = random.Random(seed)
        self.calls = 0

    def readinto(self, buffer: memoryview) -> int:
        self.calls += 1
        n = min(len(buffer), len(self._data) - self._pos, self._rng.randint(1, 40))
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


class Collect:
    """A consumer that copies what it is given (views are only valid during the call)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.calls = 0

    def __call__(self, view: memoryview) -> None:
        self.calls += 1
        self.data += view


def _stream_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "trustplane-stream" and t.is_alive())


@contextmanager
def chunk_size(size: int) -> Iterator[None]:
    with mock.patch.object(streaming, "CHUNK_SIZE", size):
        yield


def _expected(data: bytes, limit: int | None) -> tuple[bytes, bytes]:
    taken = data if limit is None else data[:limit]
    return taken, Keystream(KEY, NONCE).update(taken)


def _run(
    source: streaming.Readable, limit: int | None, depth: int
) -> tuple[int, Collect, Collect, Collect, list[int]]:
    plain, cipher, cipher2 = Collect(), Collect(), Collect()
    progress: list[int] = []
    total = pump(
        source,
        [(INPUT, plain), (OUTPUT, cipher), (OUTPUT, cipher2)],
        transform=Keystream(KEY, NONCE),
        limit=limit,
        progress=progress.append,
        depth=depth,
    )
    return total, plain, cipher, cipher2, progress


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=700),
    chunk=st.integers(1, 64),
    limit=st.none() | st.integers(0, 800),
    depth=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_pump_equals_sequential_computation(
    data: bytes, chunk: int, limit: int | None, depth: int, seed: int
) -> None:
    taken, encrypted = _expected(data, limit)
    with chunk_size(chunk):
        total, plain, cipher, cipher2, progress = _run(ShortReads(data, seed), limit, depth)
    assert total == len(taken)
    assert bytes(plain.data) == taken
    assert bytes(cipher.data) == encrypted
    assert bytes(cipher2.data) == encrypted
    assert sum(progress) == total
    assert all(0 < n <= chunk for n in progress)
    assert plain.calls == len(progress)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pump")


@settings(max_examples=30, deadline=None)
@given(
    size=st.integers(0, 5 * mmap.PAGESIZE + 17),
    skip_pages=st.integers(0, 2),
    skip_extra=st.sampled_from([0, 0, 5]),
    limit=st.none() | st.integers(0, 6 * mmap.PAGESIZE),
    seed=st.integers(0, 2**16),
)
def test_pump_from_a_regular_file_is_the_same(
    files: Path, size: int, skip_pages: int, skip_extra: int, limit: int | None, seed: int
) -> None:
    """A real file (as layouts give), read from where it stands: same bytes,
    and the position moves on exactly as far as the pump read."""
    data = random.Random(seed).randbytes(size)
    path = files / f"blob-{seed}-{size}"
    path.write_bytes(data)
    skip = min(size, skip_pages * mmap.PAGESIZE + skip_extra)
    taken, encrypted = _expected(data[skip:], limit)
    with path.open("rb") as handle, chunk_size(mmap.PAGESIZE):
        handle.read(skip)
        total, plain, cipher, _, progress = _run(handle, limit, 3)
        assert handle.read() == data[skip + total :]  # left where a read would have
    assert total == len(taken)
    assert bytes(plain.data) == taken
    assert bytes(cipher.data) == encrypted
    assert sum(progress) == total


def test_pump_default_chunk_size_on_a_large_file(tmp_path: Path) -> None:
    data = random.Random(7).randbytes(3 * streaming.CHUNK_SIZE + 12345)
    path = tmp_path / "big"
    path.write_bytes(data)
    sha, out = hashlib.sha256(), Collect()
    with path.open("rb") as handle:
        total = pump(handle, [(INPUT, sha.update), (OUTPUT, out)], transform=Keystream(KEY, NONCE))
    assert total == len(data)
    assert sha.hexdigest() == hashlib.sha256(data).hexdigest()
    assert bytes(out.data) == Keystream(KEY, NONCE).update(data)


def test_pump_reads_a_file_like_wrapper_for_what_it_yields_not_its_file(tmp_path: Path) -> None:
    """A GzipFile has the fileno() of the compressed file and the tell() of the
    uncompressed stream: the pump must read it, not map the file underneath."""
    data = b"decompressed content " * 5000
    path = tmp_path / "layer.gz"
    path.write_bytes(gzip.compress(data))
    out = Collect()
    with gzip.open(path, "rb") as stream:
        total = pump(stream, [(INPUT, out)])
    assert total == len(data)
    assert bytes(out.data) == data


def test_consumer_error_is_raised_after_all_threads_stop() -> None:
    before = _stream_threads()
    boom = RuntimeError("disk full")
    seen = Collect()

    def failing(view: memoryview) -> None:
        if seen.calls >= 2:
            raise boom
        seen(view)

    with chunk_size(10), pytest.raises(RuntimeError) as info:
        pump(io.BytesIO(bytes(1000)), [(INPUT, failing), (INPUT, Collect())], depth=2)
    assert info.value is boom
    assert _stream_threads() == before
    assert len(seen.data) == 20


def test_source_error_is_raised_after_all_threads_stop() -> None:
    before = _stream_threads()

    class Broken:
        def __init__(self) -> None:
            self.reads = 0

        def readinto(self, buffer: memoryview) -> int:
            self.reads += 1
            if self.reads > 3:
                raise ConnectionResetError("peer went away")
            buffer[:5] = b"abcde"
            return 5

    out = Collect()
    with chunk_size(5), pytest.raises(ConnectionResetError, match="peer went away"):
        pump(Broken(), [(INPUT, out)])
    assert _stream_threads() == before
    assert bytes(out.data) == b"abcde" * 3  # what was read before the failure was delivered


def test_progress_error_propagates() -> None:
    def progress(n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pump(io.BytesIO(b"x" * 10), [(INPUT, Collect())], progress=progress)


def test_output_consumer_needs_a_transform() -> None:
    with pytest.raises(ValueError, match="transform"):
        pump(io.BytesIO(b"x"), [(OUTPUT, Collect())])


def test_limit_zero_reads_nothing() -> None:
    source = io.BytesIO(b"abc")
    out = Collect()
    assert pump(source, [(INPUT, out)], limit=0) == 0
    assert out.calls == 0
    assert source.read() == b"abc"


def test_no_consumers_still_counts_and_ends() -> None:
    """More chunks than slots and nobody to hand them back: must not hang."""
    result: list[int] = []
    with chunk_size(4):
        worker = threading.Thread(
            target=lambda: result.append(pump(io.BytesIO(bytes(100)), [], depth=2)), daemon=True
        )
        worker.start()
        worker.join(timeout=10)
    assert result == [100]


def test_limit_plus_one_detects_a_longer_blob() -> None:
    # The way callers use it: ask for one byte more than the descriptor says.
    assert pump(io.BytesIO(b"x" * 11), [], limit=11) == 11
    assert pump(io.BytesIO(b"x" * 10), [], limit=11) == 10


# -- small helpers ------------------------------------------------------------------


def test_chunk_reader_joins_uneven_chunks() -> None:
    chunks = [b"ab", b"", b"cdefg", b"h", b"", b"ijklmnop"]
    reader = io.BufferedReader(ChunkReader(chunks), buffer_size=3)
    assert reader.read(4) == b"abcd"
    assert reader.read() == b"efghijklmnop"
    assert reader.read() == b""
    raw = ChunkReader(iter([b"xyz"]))
    buffer = bytearray(2)
    assert raw.readinto(buffer) == 2
    assert buffer == b"xy"
    assert raw.readinto(buffer) == 1
    assert raw.readinto(buffer) == 0


def test_readable_file_lets_gzip_read_a_readable() -> None:
    data = b"hello " * 1000
    source = ShortReads(gzip.compress(data), seed=1)
    with gzip.GzipFile(fileobj=io.BufferedReader(ReadableFile(source)), mode="rb") as stream:
        assert stream.read() == data


def test_read_upto() -> None:
    assert read_upto(ShortReads(b"0123456789", 3), 4) == b"0123"
    assert read_upto(ShortReads(b"0123456789", 3), 100) == b"0123456789"
    assert read_upto(io.BytesIO(b""), 5) == b""


def test_iter_chunks_gives_exactly_size_bytes() -> None:
    seen: list[int] = []
    with chunk_size(3):
        chunks = list(iter_chunks(ShortReads(b"0123456789", 5), 8, seen.append))
    assert b"".join(chunks) == b"01234567"
    assert all(len(c) <= 3 for c in chunks)
    assert sum(seen) == 8


def test_iter_chunks_refuses_a_short_stream() -> None:
    with pytest.raises(EOFError, match="3 bytes early"):
        list(iter_chunks(io.BytesIO(b"1234567"), 10))


def test_copy_stream_feeds_sink_and_digests() -> None:
    data = random.Random(3).randbytes(50_000)
    sink = io.BytesIO()
    sha, md5 = hashlib.sha256(), hashlib.md5()  # noqa: S324 - a second digest, not security
    with chunk_size(4096):
        assert copy_stream(ShortReads(data, 9), sink, [sha.update, md5.update]) == len(data)
    assert sink.getvalue() == data
    assert sha.digest() == hashlib.sha256(data).digest()
    assert md5.digest() == hashlib.md5(data).digest()  # noqa: S324


def test_durable_sink_writes_everything_and_starts_writeback(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    original: Callable[[int, int, int], None] = streaming._start_writeback

    def spy(fd: int, offset: int, length: int) -> None:
        calls.append((offset, length))
        original(fd, offset, length)

    data = random.Random(5).randbytes(10_000)
    path = tmp_path / "out"
    with (
        mock.patch.object(DurableSink, "STRETCH", 4000),
        mock.patch.object(streaming, "_start_writeback", spy),
        path.open("wb") as handle,
    ):
        sink = DurableSink(handle)
        for start in range(0, len(data), 1000):
            sink.write(memoryview(data)[start : start + 1000])
    assert path.read_bytes() == data
    assert calls == [(0, 4000), (4000, 4000)]
