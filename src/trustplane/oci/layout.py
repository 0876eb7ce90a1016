"""The OCI image layout on disk: `oci-layout`, `index.json`, `blobs/ALG/HEX`.

Writes are atomic: new blobs wait in a private staging directory inside the
layout (same filesystem) and are renamed into `blobs/` only when the image is
committed, after which `index.json` is replaced in one rename. A failure
before the commit removes the staging directory and leaves the layout as it
was (and removes the layout itself if we created it).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from trustplane.atomic import atomic_write, fsync_dir
from trustplane.errors import MalformedError, NotFoundError, UsageError
from trustplane.oci.model import Descriptor, Index, parse_index, sha256_digest

REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT_FILE = "oci-layout"
LAYOUT_VERSION = b'{"imageLayoutVersion": "1.0.0"}'
STAGING_PREFIX = ".trustplane-staging-"


def blob_path(root: Path, digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    return root / "blobs" / algorithm / hexdigest


class Layout:
    """Read access to an existing layout."""

    def __init__(self, root: Path) -> None:
        self.root = root
        if not (root / LAYOUT_FILE).is_file():
            raise NotFoundError(f"{root}: not an OCI image layout (no {LAYOUT_FILE} file)")

    def index(self) -> Index:
        path = self.root / "index.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise MalformedError(f"{path}: missing") from None
        return parse_index(data, str(path))

    def find(self, tag: str | None) -> Descriptor:
        """The index entry for `tag`, or the only entry when no tag is given."""
        entries = self.index().manifests
        if tag is None:
            if len(entries) == 1:
                return entries[0]
            tags = sorted(filter(None, (e.annotation(REF_NAME) for e in entries)))
            raise UsageError(f"oci:{self.root} holds {len(entries)} images; name one of {tags}")
        for entry in entries:
            if entry.annotation(REF_NAME) == tag:
                return entry
        raise NotFoundError(f"oci:{self.root}:{tag}: no such tag")

    def read_blob(self, digest: str, limit: int) -> bytes:
        path = blob_path(self.root, digest)
        try:
            with path.open("rb") as handle:
                data = handle.read(limit + 1)
        except FileNotFoundError:
            raise NotFoundError(f"oci:{self.root}: blob {digest} is missing") from None
        if len(data) > limit:
            raise MalformedError(f"oci:{self.root}: blob {digest} is larger than expected")
        return data

    @contextlib.contextmanager
    def open_blob(self, digest: str) -> Iterator[io.BufferedReader]:
        try:
            handle = blob_path(self.root, digest).open("rb")
        except FileNotFoundError:
            raise NotFoundError(f"oci:{self.root}: blob {digest} is missing") from None
        with handle:
            yield handle


class LayoutWriter:
    """Stages blobs and commits an image into a layout, all or nothing."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._created_root = not root.exists()
        empty_dir = root.is_dir() and not any(root.iterdir())
        if not self._created_root and not (root / LAYOUT_FILE).is_file() and not empty_dir:
            raise UsageError(f"{root}: exists and is not an OCI image layout")
        # The outermost directory this writer creates (the root, or a missing
        # parent of it): removed again when nothing is committed.
        self._created_top = root
        while not self._created_top.parent.exists():
            self._created_top = self._created_top.parent
        root.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(dir=root, prefix=STAGING_PREFIX))
        self._staged: dict[str, Path] = {}

    def has_blob(self, digest: str) -> bool:
        return digest in self._staged or blob_path(self.root, digest).is_file()

    def new_file(self) -> tuple[Path, IO[bytes]]:
        """A fresh staging file to write a blob into."""
        fd, name = tempfile.mkstemp(dir=self.staging)
        return Path(name), os.fdopen(fd, "wb")

    def stage(self, digest: str, path: Path) -> None:
        """Adopt a complete, verified file as the blob `digest`."""
        if path.parent != self.staging:
            target = self.staging / digest.replace(":", "-")
            shutil.copyfile(path, target)
            path = target
        self._staged[digest] = path

    def stage_bytes(self, data: bytes) -> str:
        digest = sha256_digest(data)
        path, handle = self.new_file()
        with handle:
            handle.write(data)
        self._staged[digest] = path
        return digest

    def commit(self, manifest: bytes, media_type: str, tag: str | None) -> str:
        """Move staged blobs in, write the manifest, then swap `index.json`."""
        digest = self.stage_bytes(manifest)
        layout_file = self.root / LAYOUT_FILE
        if not layout_file.exists():
            atomic_write(layout_file, LAYOUT_VERSION)
        with _locked(layout_file):
            for blob_digest, path in self._staged.items():
                target = blob_path(self.root, blob_digest)
                target.parent.mkdir(parents=True, exist_ok=True)
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
                path.replace(target)
            fsync_dir(blob_path(self.root, digest).parent)
            self._write_index(
                Descriptor(
                    media_type=media_type,
                    digest=digest,
                    size=len(manifest),
                    annotations={REF_NAME: tag} if tag else None,
                ),
                tag,
            )
        self._staged.clear()
        return digest

    def _write_index(self, entry: Descriptor, tag: str | None) -> None:
        path = self.root / "index.json"
        if path.exists():
            index = parse_index(path.read_bytes(), str(path))
            kept = [
                m
                for m in index.manifests
                if m.annotation(REF_NAME) != tag or (tag is None and m.digest != entry.digest)
            ]
            index = index.model_copy(update={"manifests": (*kept, entry)})
        else:
            index = Index(schema_version=2, manifests=(entry,))
        atomic_write(path, index.to_bytes())

    def close(self, committed: bool) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        if not committed and self._created_root:
            shutil.rmtree(self._created_top, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("rb") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
