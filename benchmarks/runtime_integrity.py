"""Runtime integrity: file digests of a layer, from its tar and from disk.

(a) Publication: `digest_layer_tar` over a layer tar generated on the fly
    (SIZE MiB in files of FILE KiB, never held whole), reported in MiB/s and
    as peak traced memory, beside plain `hashlib.sha256` over the same bytes
    (the bound: every byte of a layer is hashed once).
(b) Run time: `measure_tree` over the same files unpacked in a temporary
    directory (what a node re-measures each round), in MiB/s and files/s.
Reference tools, in the same run: GNU tar handing each member to sha256sum
(`tar -xf L --to-command=sha256sum`) for (a), and `find -type f -print0 |
xargs -0 sha256sum` for (b); the ratios are ours over theirs.

    python benchmarks/runtime_integrity.py [--size-mib 1024] [--file-kib 256]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

from trustplane.trust.file_digests import digest_layer_tar, measure_tree

BLOCK = os.urandom(1 << 20)


def file_data(size: int, seed: int) -> bytes:
    """`size` bytes that differ per file (so digests differ), cheap to make."""
    start = (seed * 4099) % (len(BLOCK) - size) if size < len(BLOCK) else 0
    return (BLOCK * (size // len(BLOCK) + 1))[start : start + size]


class LayerStream(io.RawIOBase):
    """A layer tar of `count` files of `size` bytes, produced as it is read."""

    def __init__(self, headers: list[bytes], size: int) -> None:
        self._parts = self._generate(headers, size)
        self._pending = memoryview(b"")

    @staticmethod
    def _generate(headers: list[bytes], size: int) -> Iterator[bytes]:
        for index, header in enumerate(headers):
            yield header
            for offset in range(0, size, len(BLOCK)):
                yield file_data(min(len(BLOCK), size - offset), index + offset)
            yield bytes(-size % tarfile.BLOCKSIZE)
        yield bytes(2 * tarfile.BLOCKSIZE)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            part = next(self._parts, None)
            if part is None:
                return 0
            self._pending = memoryview(part)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--file-kib", type=int, default=256)
    args = parser.parse_args()
    size = args.file_kib << 10
    count = (args.size_mib << 20) // size
    total_mib = count * size / (1 << 20)
    headers = []  # made before timing: the producer's cost is not ours
    for index in range(count):
        info = tarfile.TarInfo(f"data/{index // 256:03d}/file-{index:06d}")
        info.size = size
        headers.append(info.tobuf(format=tarfile.USTAR_FORMAT))

    def layer() -> io.BufferedReader:
        return io.BufferedReader(LayerStream(headers, size), 1 << 20)

    digest = hashlib.sha256()
    start = time.perf_counter()
    stream = layer()
    while chunk := stream.read(1 << 20):
        digest.update(chunk)
    bound = total_mib / (time.perf_counter() - start)

    start = time.perf_counter()
    files = digest_layer_tar(layer())
    elapsed = time.perf_counter() - start
    assert len(files) == count
    tracemalloc.start()  # a second pass: tracing slows small allocations
    digest_layer_tar(layer())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        f"tar -> file digests: {count} files, {total_mib:.0f} MiB in {elapsed:.2f} s: "
        f"{total_mib / elapsed:.0f} MiB/s (reading and sha256 alone: {bound:.0f} MiB/s), "
        f"peak traced memory {peak / (1 << 20):.1f} MiB"
    )

    work = Path(tempfile.mkdtemp(prefix="trustplane-bench-runtime-"))
    root = work / "layer"
    try:
        tar_file = work / "layer.tar"
        with tar_file.open("wb") as out:
            shutil.copyfileobj(layer(), out, 1 << 20)
        tool = _timed(["tar", "-xf", str(tar_file), "--to-command=sha256sum"], count)
        print(
            f"  reference: tar --to-command=sha256sum: {total_mib / tool:.0f} MiB/s; "
            f"trustplane / tar = {tool / elapsed:.1f}x"
        )
        root.mkdir()
        with tarfile.open(tar_file, mode="r:") as archive:
            archive.extractall(root, filter="data")
        tar_file.unlink()
        start = time.perf_counter()
        measured = measure_tree(root)
        elapsed = time.perf_counter() - start
        assert measured == files, "the unpacked layer must measure like its tar"
        tool = _timed(
            ["sh", "-c", 'find "$0" -type f -print0 | xargs -0 sha256sum', str(root)], count
        )
        print(
            f"re-measure on disk: {count} files, {total_mib:.0f} MiB in {elapsed:.2f} s: "
            f"{total_mib / elapsed:.0f} MiB/s, {count / elapsed:.0f} files/s\n"
            f"  reference: find | xargs sha256sum: {total_mib / tool:.0f} MiB/s; "
            f"trustplane / sha256sum = {tool / elapsed:.1f}x"
        )
    finally:
        shutil.rmtree(work)


def _timed(argv: list[str], files: int) -> float:
    """Seconds the reference tool takes; it must print one digest per file."""
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, check=True)
    elapsed = time.perf_counter() - start
    lines = result.stdout.count(b"\n")
    assert lines == files, f"{argv[0]} printed {lines} digests for {files} files"
    return elapsed


if __name__ == "__main__":
    main()
