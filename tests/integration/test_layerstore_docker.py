"""The store's view of an image equals Docker's, for layers Docker itself made.

Docker builds an image whose layers delete files (whiteouts), delete and
recreate a directory (an opaque whiteout), make hard links, a FIFO, a
device node, a set-uid file and foreign owners; `docker export` of a
container created from it is the reference file system (Docker's own
layer applier and overlay2). The store imports the same image from
`docker-daemon:` and its full view must hold exactly the same entries with
the same type, mode, owner, size, content, link target and mtime.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import docker

from trustplane.embedded.sample_images import build_image
from trustplane.layerstore import ImportRequest, LayerStore
from trustplane.oci.reference import DaemonRef

sys.path.insert(0, str(Path(__file__).parents[1] / "layerstore"))
from layer_helpers import LocalChains
from store_checks import clean, leftovers

TAG = "trustplane/layerstore-rules:test"
DOCKERFILE = """FROM {base}
RUN mkdir -p /d/sub /d/keep && echo a > /d/a && echo b > /d/sub/b && echo k > /d/keep/k \\
 && ln /d/a /d/hard && ln -s /d/a /d/sym && mkfifo /d/fifo && mknod /d/null c 1 3 \\
 && chmod 4755 /d/a && chown 1234:5678 /d/sub/b && mkdir -p /o/x && echo o > /o/x/y
RUN rm /d/a && rm -rf /d/sub && mkdir /d/sub && echo new > /d/sub/new && chmod 0700 /d/keep \\
 && rm /bin/ls && echo changed > /etc/motd
RUN rm -rf /o && mkdir /o && echo fresh > /o/fresh && ln -s /nonexistent /o/dangling
"""
# What `docker create` adds to a container's file system, not part of the image.
_RUNTIME = (
    "dev",
    "proc",
    "sys",
    ".dockerenv",
    "etc/hostname",
    "etc/hosts",
    "etc/resolv.conf",
    "etc/mtab",
)

Entry = tuple[object, ...]


def _entry(kind: str, mode: int, uid: int, gid: int, extra: object, mtime: float | None) -> Entry:
    return (kind, stat.S_IMODE(mode), uid, gid, extra, mtime)


def _docker_tree(client: docker.DockerClient, image: str) -> dict[str, Entry]:
    container = client.containers.create(image, "true")
    try:
        tree: dict[str, Entry] = {}
        stream = _ChunkFile(container.export())
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                name = member.name.strip("/").removeprefix("./")
                if not name or name.startswith(_RUNTIME):
                    continue
                if member.isreg():
                    data = archive.extractfile(member)
                    assert data is not None
                    extra: object = hashlib.sha256(data.read()).hexdigest()
                elif member.islnk():
                    extra = "hardlink:" + member.linkname.strip("/")
                elif member.issym():
                    extra = "->" + member.linkname
                elif member.ischr() or member.isblk():
                    extra = (member.devmajor, member.devminor)
                else:
                    extra = None
                kind = "f" if member.isreg() or member.islnk() else member.type.decode()
                tree[name] = _entry(
                    kind,
                    member.mode,
                    member.uid,
                    member.gid,
                    extra,
                    float(int(member.mtime)) if kind == "f" else None,
                )
        return tree
    finally:
        container.remove(force=True)


def _our_tree(root: Path) -> dict[str, Entry]:
    tree: dict[str, Entry] = {}
    first_of_inode: dict[int, str] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        info = path.lstat()
        if stat.S_ISREG(info.st_mode):
            if info.st_nlink > 1 and info.st_ino in first_of_inode:
                extra: object = "hardlink:" + first_of_inode[info.st_ino]
            else:
                first_of_inode[info.st_ino] = name
                extra = hashlib.sha256(path.read_bytes()).hexdigest()
            kind = "f"
        elif stat.S_ISLNK(info.st_mode):
            kind, extra = tarfile.SYMTYPE.decode(), "->" + str(path.readlink())
        elif stat.S_ISDIR(info.st_mode):
            kind, extra = tarfile.DIRTYPE.decode(), None
        elif stat.S_ISCHR(info.st_mode):
            kind, extra = tarfile.CHRTYPE.decode(), (os.major(info.st_rdev), os.minor(info.st_rdev))
        elif stat.S_ISFIFO(info.st_mode):
            kind, extra = tarfile.FIFOTYPE.decode(), None
        else:
            kind, extra = "?", None
        tree[name] = _entry(
            kind,
            info.st_mode,
            info.st_uid,
            info.st_gid,
            extra,
            float(int(info.st_mtime)) if kind == "f" else None,
        )
    return tree


class _ChunkFile:
    """A file over Docker's export stream (an iterator of byte chunks)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._pending) < size:
            try:
                self._pending += next(self._chunks)
            except StopIteration:
                break
        if size < 0:
            size = len(self._pending)
        data, self._pending = self._pending[:size], self._pending[size:]
        return data


def test_the_store_applies_layers_exactly_as_docker_does(
    docker_client: docker.DockerClient, busybox_base: str, tmp_path: Path
) -> None:
    build_image(docker_client, TAG, DOCKERFILE.format(base=busybox_base), {})
    reference = _docker_tree(docker_client, TAG)
    # The build did what we think it did.
    assert "d/a" not in reference
    assert "d/hard" in reference
    assert "o/x" not in reference
    assert "o/fresh" in reference

    store = LayerStore(tmp_path / "store")
    keys = LocalChains()
    try:
        stored = store.import_image(ImportRequest(source=DaemonRef(TAG), size=1 << 30), keys)
        assert stored.repository == "docker.io/trustplane/layerstore-rules"
        assert len(stored.layers) == 4
        with store.view(stored, None, keys) as view:
            ours = _our_tree(view.root)
    finally:
        prefix = os.fspath(tmp_path) + "/"
        left = leftovers(prefix)
        clean(prefix)
    assert left == []
    assert not [name for name in ours if ".wh." in name]
    assert set(ours) == set(reference), (
        sorted(set(ours) - set(reference)),
        sorted(set(reference) - set(ours)),
    )
    different = {
        name: (ours[name], reference[name]) for name in ours if ours[name] != reference[name]
    }
    assert different == {}
