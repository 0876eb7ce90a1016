"""An overlayfs upper directory as an OCI layer changeset (a tar stream).

A container's writes land in an overlay's upper directory (snapshotter.py);
committing them makes a layer, so they are turned into the changeset the
applier (apply.py) applies onto the layers below: overlayfs marks a removed
name with a character device 0/0 (a *whiteout*) and a directory whose lower
contents are hidden with the xattr `trusted.overlay.opaque=y` (kernel
Documentation/filesystems/overlayfs.rst); the image spec marks them
`.wh.NAME` and `.wh..wh..opq`. Everything else is written as it is, with
its owner, mode, times, extended attributes (PAX `SCHILY.xattr.*`, as the
applier reads them; overlayfs's own `trusted.overlay.*` are left out) and
hard links within the upper directory.

The tar goes through a pipe, never a file: the writes are plaintext.
"""

from __future__ import annotations

import os
import stat
import tarfile
import threading
from pathlib import Path
from typing import IO

from trustplane.layerstore.apply import OPAQUE_WHITEOUT, WHITEOUT_PREFIX, ApplyStats, apply_layer

_OVERLAY_XATTRS = "trusted.overlay."
_XATTR_PREFIX = "SCHILY.xattr."


def apply_upper(upper: Path, root: Path) -> ApplyStats:
    """Apply what an overlay's upper directory changed onto the tree at `root`."""
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with os.fdopen(write_fd, "wb") as out:
                write_changeset(upper, out)
        except BaseException as exc:  # handed to the consumer's thread
            failure.append(exc)

    writer = threading.Thread(target=produce, name="overlay-changeset", daemon=True)
    writer.start()
    try:
        with os.fdopen(read_fd, "rb") as stream:
            stats = apply_layer(stream, root)
            while stream.read(1 << 16):  # the padding after the end-of-archive marker
                pass
    finally:
        writer.join()
    if failure:
        raise failure[0]
    return stats


def write_changeset(upper: Path, out: IO[bytes]) -> None:
    """The upper directory's entries, parents before children, as an OCI layer tar."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for directory, dirs, files in os.walk(upper):
            dirs.sort()
            base = Path(directory).relative_to(upper)
            for name in sorted(dirs + files):
                path = Path(directory, name)
                arcname = os.fspath(base / name)
                info = os.lstat(path)
                if stat.S_ISCHR(info.st_mode) and info.st_rdev == 0:
                    whiteout = tarfile.TarInfo(os.fspath(base / (WHITEOUT_PREFIX + name)))
                    whiteout.mtime = int(info.st_mtime)
                    tar.addfile(whiteout)
                    continue
                entry = tar.gettarinfo(os.fspath(path), arcname)
                entry.pax_headers = {**entry.pax_headers, **_xattrs(path)}
                if entry.isreg():
                    with path.open("rb") as content:
                        tar.addfile(entry, content)
                else:
                    tar.addfile(entry)
                if entry.isdir() and _opaque(path):
                    marker = tarfile.TarInfo(f"{arcname}/{OPAQUE_WHITEOUT}")
                    marker.mtime = int(info.st_mtime)
                    tar.addfile(marker)


def _xattrs(path: Path) -> dict[str, str]:
    found = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    for name in names:
        if name.startswith(_OVERLAY_XATTRS):
            continue
        raw = os.getxattr(path, name, follow_symlinks=False)
        # tarfile writes PAX values as UTF-8 with surrogateescape: raw bytes survive.
        found[_XATTR_PREFIX + name] = raw.decode("utf-8", "surrogateescape")
    return found


def _opaque(path: Path) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False
