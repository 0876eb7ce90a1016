"""Applying an OCI layer changeset (a tar stream) to the file system of the layers below.

The rules are the image spec's (layer.md, "Applying Changesets",
"Whiteouts"):

- an entry over an existing directory, itself a directory, replaces only the
  directory's attributes; in every other case the existing path is removed
  and recreated from the entry;
- `.wh.NAME` removes NAME *of the lower layers*; a file this layer itself
  adds is not hidden by a whiteout in the same layer;
- `.wh..wh..opq` hides every lower-layer child of its directory, wherever it
  appears in the tar (children this layer adds stay);
- whiteout files themselves never appear;
- attributes: owner (uid/gid), mode with setuid/setgid/sticky, mtime,
  extended attributes (PAX `SCHILY.xattr.*`), symlinks, hard links, device
  nodes and FIFOs.

Paths are resolved inside `root` the way the container will see them: a
directory component that is a symlink (an absolute `/var/run -> /run` in a
lower layer) is followed *within* root, never to the host, and `..` stops at
root. Nothing is ever created through a final-component symlink (O_NOFOLLOW,
`follow_symlinks=False`).

Written here rather than taken from a library: Python's `tarfile` extracts
archives, not changesets (no whiteouts, and its safety filters refuse the
absolute symlinks and device nodes images legitimately hold), and no
maintained Python package applies OCI layers.

Memory: the tar is read as a stream; what is kept per layer is the set of
paths it adds (for the whiteout rule) and its directories' times (set last,
since adding children changes them), not file data.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from trustplane.errors import MalformedError, UnsupportedError
from trustplane.streaming import DurableSink

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
_MAX_SYMLINK_HOPS = 40
_COPY_CHUNK = 1 << 20
_XATTR_PREFIX = "SCHILY.xattr."
_IMPLICIT_DIR_MODE = 0o755


@dataclass
class ApplyStats:
    entries: int = 0
    files: int = 0
    bytes: int = 0
    removed: int = 0
    """Paths of lower layers removed by whiteouts (or replaced)."""


@dataclass
class _State:
    root: Path
    added: set[str] = field(default_factory=set)
    dir_times: list[tuple[Path, int]] = field(default_factory=list)
    stats: ApplyStats = field(default_factory=ApplyStats)


def apply_layer(stream: IO[bytes], root: Path) -> ApplyStats:
    """Apply the uncompressed layer tar read from `stream` to the tree at `root`.

    Stops at the tar's end-of-archive marker; the caller reads any padding
    after it (it belongs to the digest). A malformed archive or an entry that
    would leave `root` raises MalformedError.
    """
    state = _State(root)
    try:
        with tarfile.open(fileobj=stream, mode="r|", errorlevel=2) as archive:
            for member in archive:
                _apply(archive, member, state)
    except tarfile.TarError as exc:
        raise MalformedError(f"layer tar: {exc}") from None
    for path, mtime in state.dir_times:
        with contextlib.suppress(FileNotFoundError):  # replaced later in the same layer
            os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
    return state.stats


def _apply(archive: tarfile.TarFile, member: tarfile.TarInfo, state: _State) -> None:
    state.stats.entries += 1
    parts = _clean(member.name)
    if not parts:
        if member.isdir():  # "./": the root's own attributes
            _attributes(state.root, member, state)
        return
    name = parts[-1]
    if name.startswith(WHITEOUT_PREFIX):
        _whiteout(parts, member.name, state)
        return
    parent, rel_parent = _resolve_dir(state.root, parts[:-1], member.name)
    target = parent / name
    key = _key(rel_parent, name)
    existing = _lstat(target)
    if member.isdir():
        if existing is None or not stat.S_ISDIR(existing.st_mode):
            if existing is not None:
                state.stats.removed += _remove(target)
            target.mkdir(0o700)
    else:
        if existing is not None:
            state.stats.removed += _remove(target)
        _create(archive, member, target, state)
    state.added.add(key)
    if not member.islnk():  # a hard link shares its target's inode and attributes
        _attributes(target, member, state)


def _whiteout(parts: list[str], name: str, state: _State) -> None:
    """Hide a lower layer's path (or every lower child: the opaque marker).

    A whiteout in a directory that does not exist hides nothing, and creates
    nothing either.
    """
    try:
        parent, rel_parent = _resolve_dir(state.root, parts[:-1], name, create=False)
    except MalformedError:
        return
    if parts[-1] == OPAQUE_WHITEOUT:
        state.stats.removed += _opaque(parent, rel_parent, state.added)
        return
    hidden = parts[-1][len(WHITEOUT_PREFIX) :]
    if hidden and _key(rel_parent, hidden) not in state.added:
        state.stats.removed += _remove(parent / hidden)


def _create(archive: tarfile.TarFile, member: tarfile.TarInfo, target: Path, state: _State) -> None:
    if member.isreg():
        source = archive.extractfile(member)
        if source is None:
            raise MalformedError(f"layer tar: {member.name}: no data")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as sink:
            # Write-back starts as data comes (not all at the unmount), so the
            # encryption below overlaps the decompression and the tar.
            durable = DurableSink(sink)
            while chunk := source.read(_COPY_CHUNK):
                durable.write(memoryview(chunk))
        state.stats.files += 1
        state.stats.bytes += member.size
    elif member.issym():
        target.symlink_to(member.linkname)
    elif member.islnk():
        link_parts = _clean(member.linkname)
        if not link_parts:
            raise MalformedError(f"layer tar: {member.name}: hard link to the root")
        directory, _ = _resolve_dir(state.root, link_parts[:-1], member.linkname, create=False)
        source_path = directory / link_parts[-1]
        found = _lstat(source_path)
        if found is None or stat.S_ISDIR(found.st_mode):
            raise MalformedError(
                f"layer tar: {member.name}: hard link to {member.linkname}, "
                "which is not a file in this or a lower layer"
            )
        os.link(source_path, target, follow_symlinks=False)
    elif member.ischr() or member.isblk():
        kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
        os.mknod(target, kind | 0o600, os.makedev(member.devmajor, member.devminor))
    elif member.isfifo():
        os.mkfifo(target, 0o600)
    else:
        raise UnsupportedError(f"layer tar: {member.name}: unsupported entry type {member.type!r}")


def _attributes(target: Path, member: tarfile.TarInfo, state: _State) -> None:
    os.chown(target, member.uid, member.gid, follow_symlinks=False)
    for key, value in member.pax_headers.items():
        if key.startswith(_XATTR_PREFIX):
            _set_xattr(target, key[len(_XATTR_PREFIX) :], value, member.name)
    mtime = int(member.mtime * 1_000_000_000)
    if member.issym():
        os.utime(target, ns=(mtime, mtime), follow_symlinks=False)
        return
    # After chown, which clears setuid/setgid.
    target.chmod(member.mode & 0o7777)
    if member.isdir():
        state.dir_times.append((target, mtime))
    else:
        os.utime(target, ns=(mtime, mtime), follow_symlinks=False)


def _set_xattr(target: Path, name: str, value: str, member: str) -> None:
    # tarfile decodes PAX values as UTF-8 with surrogateescape: this gives the raw bytes back.
    raw = value.encode("utf-8", "surrogateescape")
    try:
        os.setxattr(target, name, raw, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP) and name.startswith("security."):
            return  # a security module this host does not run (SELinux labels), as Docker does
        raise MalformedError(
            f"layer tar: {member}: cannot set xattr {name}: {exc.strerror}"
        ) from None


def _clean(name: str) -> list[str]:
    """The entry's path as components, `.` dropped, `..` applied; refuses to leave the root."""
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise MalformedError(f"layer tar: {name!r} leads out of the root")
            parts.pop()
            continue
        parts.append(part)
    return parts


def _resolve_dir(
    root: Path, parts: list[str], name: str, *, create: bool = True
) -> tuple[Path, list[str]]:
    """The directory `parts` names inside root, with symlinks followed within root.

    Missing directories are created (0755, root's) as the spec's tools do.
    Returns the host path (free of symlinks) and its components under root.
    """
    resolved: list[str] = []
    pending = list(parts)
    hops = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        host = root.joinpath(*resolved, part)
        found = _lstat(host)
        if found is None:
            if not create:
                raise MalformedError(f"layer tar: {name}: {'/'.join([*resolved, part])} is missing")
            host.mkdir(_IMPLICIT_DIR_MODE)
            host.chmod(_IMPLICIT_DIR_MODE)  # whatever the umask
            resolved.append(part)
        elif stat.S_ISLNK(found.st_mode):
            hops += 1
            if hops > _MAX_SYMLINK_HOPS:
                raise MalformedError(f"layer tar: {name}: too many levels of symbolic links")
            target = os.fspath(host.readlink())
            if target.startswith("/"):
                resolved = []
            pending = target.split("/") + pending
        elif stat.S_ISDIR(found.st_mode):
            resolved.append(part)
        else:
            raise MalformedError(
                f"layer tar: {name}: {'/'.join([*resolved, part])} is not a directory"
            )
    return root.joinpath(*resolved), resolved


def _opaque(directory: Path, rel: list[str], added: set[str]) -> int:
    """Remove everything under `directory` that this layer did not add."""
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        key = _key(rel, entry.name)
        if key not in added:
            removed += _remove(Path(entry.path))
        elif entry.is_dir(follow_symlinks=False):
            removed += _opaque(Path(entry.path), [*rel, entry.name], added)
    return removed


def _remove(path: Path) -> int:
    found = _lstat(path)
    if found is None:
        return 0
    if stat.S_ISDIR(found.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()
    return 1


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _key(rel: list[str], name: str) -> str:
    return "/".join([*rel, name])
