"""Reference values for runtime integrity: what each file of a layer must be.

A layer is described by a map from absolute path to a reference value:

- regular file: `sha256:<hex>` of its content;
- hard link: the value of the entry it links to (on disk it *is* that file);
  a link to something the same layer does not hold is refused, as Docker's
  overlay2 driver refuses to unpack it;
- symbolic link: `symlink:<target>` (the target as written, never followed);
- whiteout (`.wh.NAME`, or a 0:0 character device as overlayfs stores one):
  `whiteout` at the path it hides;
- other device nodes and FIFOs: `char:MAJ:MIN`, `block:MAJ:MIN`, `fifo`.

Directories are not recorded (a directory holds no content of its own), nor
are opaque-directory markers (`.wh..wh..opq`, an xattr on disk) and other
`.wh..wh.` bookkeeping entries. Modes, owners and times are not measured:
the reference is content and kind. A later entry for the same path replaces
an earlier one, as unpacking does.

The same map is computed from a layer's tar stream (at publication, memory
flat in layer size: only the map grows, with the file count) and from an
unpacked layer directory on a node (at run time), so comparing the two says
which files changed, went missing or appeared.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import stat
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from trustplane.errors import MalformedError

CHUNK = 1 << 20
WHITEOUT = "whiteout"
_WH_PREFIX = ".wh."
_WH_META = ".wh..wh."
MAX_PATH = 4096
VALUE = re.compile(
    r"sha256:[0-9a-f]{64}|symlink:[^\x00]{1,4096}|whiteout|fifo|socket|(char|block):\d{1,10}:\d{1,10}",
    re.DOTALL,
)
"""Every value a reference map may hold (the control plane checks bodies with it)."""


def layer_path(name: str) -> str:
    """The absolute path a tar member unpacks to; one that escapes the root is refused.

    `/etc/x`, `etc/x` and `./etc/x` are the same file; `a/../../x` would
    land outside the root filesystem, which Docker refuses to unpack and so
    do we.
    """
    relative = name.lstrip("/")
    clean = posixpath.normpath(relative) if relative else "."
    if clean == ".." or clean.startswith("../"):
        raise MalformedError(f"layer entry {name[:200]!r} escapes the root filesystem")
    if "\x00" in clean or len(clean) >= MAX_PATH:
        raise MalformedError(f"layer entry {name[:200]!r} has an unusable name")
    return "/" if clean == "." else "/" + clean


def is_reference_path(path: str) -> bool:
    """True for a path as `layer_path` writes it (absolute, normal, not the root)."""
    return (
        0 < len(path) <= MAX_PATH
        and path.startswith("/")
        and path != "/"
        and "\x00" not in path
        and posixpath.normpath(path) == path
        and not path.startswith("//")
    )


def digest_layer_tar(stream: IO[bytes]) -> dict[str, str]:
    """The reference map of an uncompressed layer tar, read once as a stream."""
    files: dict[str, str] = {}
    try:
        # Not tarfile's stream mode ("r|"): it copies its whole read buffer on
        # every small read (each header), which made a layer of 4 KiB files
        # digest at 8 MiB/s. "r:" over a forward-only file reads headers and
        # data straight from one 1 MiB buffer, in order.
        with tarfile.open(fileobj=_ForwardOnly(stream), mode="r:") as archive:
            for member in archive:
                _add(files, archive, member)
                # tarfile keeps every TarInfo it read; only the map needs to grow.
                archive.members.clear()  # type: ignore[attr-defined]
    except tarfile.TarError as exc:
        raise MalformedError(f"not a valid layer tar archive: {exc}") from None
    return files


class _ForwardOnly(io.RawIOBase):
    """A stream that tarfile may `seek` forward in (skipping), never backward."""

    def __init__(self, inner: IO[bytes]) -> None:
        self._inner = inner
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def read(self, size: int | None = -1) -> bytes:
        data = self._inner.read(-1 if size is None else size)
        self._position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self._position + offset
        if whence not in (io.SEEK_SET, io.SEEK_CUR) or target < self._position:
            raise tarfile.ReadError("the layer stream can only be read forward")
        while self._position < target:
            if not self.read(min(CHUNK, target - self._position)):
                break  # at the end: tarfile finds the truncation itself
        return self._position


def _add(files: dict[str, str], archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
    path = layer_path(member.name)
    base = posixpath.basename(path)
    if base.startswith(_WH_META) or path.startswith("/" + _WH_META):
        return  # opaque marker and aufs bookkeeping (/.wh..wh.plnk/...): not unpacked
    if base.startswith(_WH_PREFIX):
        hidden = base[len(_WH_PREFIX) :]
        if hidden in ("", ".", ".."):
            raise MalformedError(f"whiteout {path!r} names no file")
        files[posixpath.join(posixpath.dirname(path), hidden)] = WHITEOUT
        return
    if member.isdir():
        files.pop(path, None)
        return
    if path == "/":
        raise MalformedError("layer entry for the root directory is not a directory")
    if member.isreg():
        handle = archive.extractfile(member)
        if handle is None:  # pragma: no cover - isreg() always has data
            raise MalformedError(f"layer entry {path!r} has no data")
        files[path] = _sha256(handle)
    elif member.islnk():
        target = files.get(layer_path(member.linkname))
        if target is None or target == WHITEOUT:
            raise MalformedError(
                f"hard link {path!r} names {member.linkname[:200]!r}, "
                "which this layer does not hold"
            )
        files[path] = target
    elif member.issym():
        if not member.linkname or "\x00" in member.linkname or len(member.linkname) > MAX_PATH:
            raise MalformedError(f"symbolic link {path!r} has an unusable target")
        files[path] = "symlink:" + member.linkname
    elif member.ischr() or member.isblk():
        files[path] = _device(
            "char" if member.ischr() else "block", member.devmajor, member.devminor
        )
    elif member.isfifo():
        files[path] = "fifo"
    else:
        raise MalformedError(f"layer entry {path!r} has an unsupported type {member.type!r}")


def _device(kind: str, major: int, minor: int) -> str:
    # overlayfs stores a whiteout as a 0:0 character device: the same thing.
    return WHITEOUT if kind == "char" and major == minor == 0 else f"{kind}:{major}:{minor}"


def _sha256(handle: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(CHUNK):
        digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def measure_tree(root: Path) -> dict[str, str]:
    """The reference map of an unpacked layer directory (symlinks never followed)."""
    files: dict[str, str] = {}
    for path, entry in _walk(root, "/"):
        info = entry.stat(follow_symlinks=False)
        mode = info.st_mode
        if stat.S_ISREG(mode):
            files[path] = _file_digest(entry.path)
        elif stat.S_ISLNK(mode):
            files[path] = "symlink:" + str(Path(entry.path).readlink())
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            kind = "char" if stat.S_ISCHR(mode) else "block"
            files[path] = _device(kind, os.major(info.st_rdev), os.minor(info.st_rdev))
        elif stat.S_ISFIFO(mode):
            files[path] = "fifo"
        else:
            files[path] = "socket"
    return files


def _walk(root: Path, prefix: str) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Every non-directory below `root` (depth-first, without recursion: any depth)."""
    pending: list[tuple[str, str]] = [(str(root), prefix)]
    while pending:
        directory, where = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                path = posixpath.join(where, entry.name)
                if entry.is_dir(follow_symlinks=False):
                    pending.append((entry.path, path))
                else:
                    yield path, entry


def _file_digest(path: str) -> str:
    # O_NOFOLLOW: a file swapped for a symlink between stat and open is not followed.
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(descriptor, "rb", buffering=0) as handle:
        return _sha256(handle)


@dataclass(frozen=True)
class FileDrift:
    """How a measured layer differs from its reference (sorted paths)."""

    changed: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        return not (self.changed or self.missing or self.unexpected)


def compare(reference: Mapping[str, str], measured: Mapping[str, str]) -> FileDrift:
    """Changed (value differs), missing (in the reference only), unexpected (on disk only)."""
    return FileDrift(
        changed=tuple(
            sorted(p for p, v in measured.items() if p in reference and reference[p] != v)
        ),
        missing=tuple(sorted(p for p in reference if p not in measured)),
        unexpected=tuple(sorted(p for p in measured if p not in reference)),
    )
