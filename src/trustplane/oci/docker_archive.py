"""Docker's `save`/`load` tar format, streamed in both directions.

Reading: `docker save` writes the layer files first and `manifest.json` last,
so a stream cannot be mapped until it ends. Every regular file goes to disk
as it arrives (hashed on the way, never held in memory) and becomes an OCI
image layout once `manifest.json` says which file is which. The config is
kept byte for byte, so the image id survives the trip through OCI.

Writing: a tar stream generated on the fly from the config and the layer
files, in the legacy layout `docker load` has always accepted
(`manifest.json`, `<hex>.json`, `<hex>/layer.tar`; layers may be gzip).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from trustplane.atomic import atomic_write
from trustplane.errors import MalformedError
from trustplane.oci import mediatypes
from trustplane.oci.layout import LAYOUT_FILE, LAYOUT_VERSION, REF_NAME, blob_path
from trustplane.oci.model import Descriptor, Index, Manifest
from trustplane.streaming import Readable, copy_stream

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
TAR_BLOCK = 512


@dataclass(frozen=True)
class _Member:
    path: Path
    digest: str
    size: int


def archive_to_layout(stream: IO[bytes], root: Path, tag: str = "latest") -> Manifest:
    """Turn a `docker save` stream of one image into an OCI layout at `root`."""
    files: dict[str, _Member] = {}
    links: dict[str, str] = {}
    work = root / "incoming"
    work.mkdir(parents=True)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                name = posixpath.normpath(member.name)
                if member.issym():
                    links[name] = posixpath.normpath(
                        posixpath.join(posixpath.dirname(name), member.linkname)
                    )
                elif member.isfile():
                    source = archive.extractfile(member)
                    if source is None:
                        raise MalformedError(f"docker archive: cannot read {name}")
                    # In stream mode extractfile gives a BufferedReader (readinto).
                    files[name] = _spool(cast(Readable, source), work)
    except tarfile.TarError as exc:
        raise MalformedError(f"docker archive: not a valid tar stream ({exc})") from None

    def resolve(name: str) -> _Member:
        seen = 0
        name = posixpath.normpath(name)
        while name in links and seen < 16:
            name, seen = links[name], seen + 1
        if name not in files:
            raise MalformedError(f"docker archive: {name} is listed but missing")
        return files[name]

    entries = _load_manifest(resolve("manifest.json").path.read_bytes())
    config = resolve(entries[0]["Config"])
    layers = [resolve(str(layer)) for layer in entries[0]["Layers"]]
    descriptors = []
    for blob in (config, *layers):
        target = blob_path(root, blob.digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            blob.path.replace(target)
    for blob in layers:
        descriptors.append(
            Descriptor(
                media_type=_layer_type(blob_path(root, blob.digest)),
                digest=blob.digest,
                size=blob.size,
            )
        )
    manifest = Manifest(
        schema_version=2,
        media_type=mediatypes.OCI_MANIFEST,
        config=Descriptor(media_type=mediatypes.OCI_CONFIG, digest=config.digest, size=config.size),
        layers=tuple(descriptors),
    )
    data = manifest.to_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob_path(root, digest).write_bytes(data)
    entry = Descriptor(
        media_type=mediatypes.OCI_MANIFEST,
        digest=digest,
        size=len(data),
        annotations={REF_NAME: tag},
    )
    atomic_write(root / "index.json", Index(schema_version=2, manifests=(entry,)).to_bytes())
    atomic_write(root / LAYOUT_FILE, LAYOUT_VERSION)
    # What was not moved into blobs/ (manifest.json, repositories, legacy
    # per-layer json, duplicates) is not part of the layout.
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def _spool(source: Readable, work: Path) -> _Member:
    sha = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=work, delete=False) as out:
        size = copy_stream(source, out, [sha.update])
    return _Member(Path(out.name), "sha256:" + sha.hexdigest(), size)


def _load_manifest(data: bytes) -> list[dict[str, Any]]:
    try:
        entries = json.loads(data)
    except ValueError:
        raise MalformedError("docker archive: manifest.json is not valid JSON") from None
    if (
        not isinstance(entries, list)
        or len(entries) != 1
        or not isinstance(entries[0], dict)
        or not isinstance(entries[0].get("Config"), str)
        or not isinstance(entries[0].get("Layers"), list)
    ):
        raise MalformedError("docker archive: manifest.json must describe exactly one image")
    return entries


def _layer_type(path: Path) -> str:
    with path.open("rb") as handle:
        head = handle.read(4)
    if head.startswith(GZIP_MAGIC):
        return mediatypes.OCI_LAYER_GZIP
    if head.startswith(ZSTD_MAGIC):
        return mediatypes.OCI_LAYER_ZSTD
    return mediatypes.OCI_LAYER


Opener = Callable[[], AbstractContextManager[IO[bytes]]]


@dataclass(frozen=True)
class ArchiveLayer:
    digest: str
    size: int
    open: Opener


def load_stream(
    config: bytes,
    layers: Sequence[ArchiveLayer],
    repo_tags: Sequence[str],
    progress: Callable[[int], object] | None = None,
) -> Iterator[bytes]:
    """The bytes of a `docker load` archive, generated lazily."""
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    layer_names = [f"{layer.digest.partition(':')[2]}/layer.tar" for layer in layers]
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": list(repo_tags), "Layers": layer_names}]
    ).encode()
    yield from _entry(config_name, config)
    for name, layer in zip(layer_names, layers, strict=True):
        yield _header(name, layer.size)
        remaining = layer.size
        with layer.open() as handle:
            while remaining:
                chunk = handle.read(min(1 << 20, remaining))
                if not chunk:
                    raise MalformedError(f"layer {layer.digest} is shorter than its descriptor")
                remaining -= len(chunk)
                if progress is not None:
                    progress(len(chunk))
                yield chunk
        yield _padding(layer.size)
    yield from _entry("manifest.json", manifest)
    yield b"\0" * (2 * TAR_BLOCK)


def _entry(name: str, data: bytes) -> Iterator[bytes]:
    yield _header(name, len(data))
    yield data
    yield _padding(len(data))


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % TAR_BLOCK)
