"""--layers: indexes, all, and path:GLOB read from the layers of a real OCI layout."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import zstandard

from trustplane.errors import IntegrityError, UsageError
from trustplane.images.selection import LayerSelector, layer_files
from trustplane.oci import mediatypes
from trustplane.oci.layout import LayoutWriter, blob_path
from trustplane.oci.model import Descriptor, Manifest
from trustplane.oci.reference import LayoutRef
from trustplane.oci.transport import LayoutSource

Entry = tuple[str, str]  # (name, kind): kind is "file", "dir" or "link:TARGET"


def tar_of(entries: list[Entry]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, kind in entries:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            elif kind.startswith("link:"):
                info.type = tarfile.SYMTYPE
                info.linkname = kind[5:]
                archive.addfile(info)
            else:
                data = f"content of {name}".encode()
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


LAYERS: list[tuple[str, list[Entry]]] = [
    (  # 0: base system, gzip, names with ./ as docker writes them
        mediatypes.OCI_LAYER_GZIP,
        [("./", "dir"), ("./bin/", "dir"), ("./bin/sh", "file"), ("./etc/", "dir")],
    ),
    (  # 1: the secret, uncompressed, with whiteouts alongside
        mediatypes.OCI_LAYER,
        [
            ("secrets/", "dir"),
            ("secrets/key.pem", "file"),
            ("secrets/.wh.old.pem", "file"),
            ("app/.wh..wh..opq", "file"),
        ],
    ),
    (  # 2: app with a dotfile and a symlink, Docker media type
        mediatypes.DOCKER_LAYER_GZIP,
        [("app/.env", "file"), ("app/dir/", "dir"), ("usr/bin/python", "link:python3")],
    ),
    (  # 3: zstd
        mediatypes.OCI_LAYER_ZSTD,
        [("opt/data.bin", "file")],
    ),
    (  # 4: only deletes the secret
        mediatypes.OCI_LAYER,
        [("secrets/.wh.key.pem", "file")],
    ),
]


def compress(data: bytes, media_type: str) -> bytes:
    kind = mediatypes.compression(media_type)
    if kind == "gzip":
        return gzip.compress(data)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def build_layout(root: Path, layers: list[tuple[str, bytes]]) -> tuple[LayoutSource, Manifest]:
    writer = LayoutWriter(root)
    descriptors = []
    for media_type, blob in layers:
        digest = writer.stage_bytes(blob)
        descriptors.append(Descriptor(media_type=media_type, digest=digest, size=len(blob)))
    config = writer.stage_bytes(b'{"rootfs":{"type":"layers","diff_ids":[]}}')
    manifest = Manifest(
        schema_version=2,
        media_type=mediatypes.OCI_MANIFEST,
        config=Descriptor(media_type=mediatypes.OCI_CONFIG, digest=config, size=10),
        layers=tuple(descriptors),
    )
    writer.commit(manifest.to_bytes(), mediatypes.OCI_MANIFEST, "v1")
    writer.close(committed=True)
    return LayoutSource(LayoutRef(root, "v1")), manifest


@pytest.fixture
def image(tmp_path: Path) -> tuple[LayoutSource, Manifest]:
    blobs = [(media, compress(tar_of(entries), media)) for media, entries in LAYERS]
    return build_layout(tmp_path / "layout", blobs)


def select(specs: list[str], image: tuple[LayoutSource, Manifest]) -> set[int]:
    source, manifest = image
    return LayerSelector.parse(specs).select(manifest.layers, source)


# -- parsing ------------------------------------------------------------------------


def test_parse() -> None:
    assert LayerSelector.parse([]) == LayerSelector(everything=True)
    assert LayerSelector.parse(["all"]).everything
    assert LayerSelector.parse(["0,2,-1"]) == LayerSelector(indexes=(0, 2, -1))
    assert LayerSelector.parse(["1", "path:secrets/**", "path:/etc/*.conf"]) == LayerSelector(
        indexes=(1,), patterns=("/secrets/**", "/etc/*.conf")
    )
    assert LayerSelector.all() == LayerSelector(everything=True)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("path:", "needs a glob"),
        ("first", "use all, indexes"),
        ("1,,2", "use all, indexes"),
        ("1;2", "use all, indexes"),
        ("", "use all, indexes"),
    ],
)
def test_parse_errors(spec: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        LayerSelector.parse([spec])


# -- indexes ------------------------------------------------------------------------------


def test_indexes_and_all(image: tuple[LayoutSource, Manifest]) -> None:
    assert select([], image) == {0, 1, 2, 3, 4}
    assert select(["all", "1"], image) == {0, 1, 2, 3, 4}
    assert select(["0,2"], image) == {0, 2}
    assert select(["-1", "-5"], image) == {4, 0}
    assert select(["1", "1"], image) == {1}


@pytest.mark.parametrize("spec", ["5", "-6", "0,9"])
def test_index_out_of_range(spec: str, image: tuple[LayoutSource, Manifest]) -> None:
    with pytest.raises(UsageError, match="out of range for 5 layers"):
        select([spec], image)


# -- path globs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("path:/secrets/**", {1}),
        ("path:secrets/key.pem", {1}),  # relative patterns are anchored at /
        ("path:**/*.pem", {1}),
        ("path:/secrets/*", {1}),
        ("path:/*.pem", set()),  # * does not cross directories
        ("path:/app/*", {2}),  # dotfiles match
        ("path:/app/dir", set()),  # directories do not count
        ("path:/etc/**", set()),
        ("path:/{bin,opt}/*", {0, 3}),  # braces
        ("path:/bin/s?", {0}),
        ("path:/usr/bin/python", {2}),  # a symlink is content
        ("path:/**/.wh.*", set()),  # whiteouts are not files
        ("path:/nothing/here", set()),
    ],
)
def test_path_globs(pattern: str, expected: set[int], image: tuple[LayoutSource, Manifest]) -> None:
    assert select([pattern], image) == expected


def test_union_of_indexes_and_globs(image: tuple[LayoutSource, Manifest]) -> None:
    assert select(["0", "path:/opt/**", "path:/secrets/**"], image) == {0, 1, 3}


def test_layer_files_lists_absolute_paths(image: tuple[LayoutSource, Manifest]) -> None:
    source, manifest = image
    progress: list[int] = []
    assert layer_files(source, manifest.layers[0], progress.append) == ["/bin/sh"]
    assert sum(progress) == manifest.layers[0].size
    assert layer_files(source, manifest.layers[2]) == ["/app/.env", "/usr/bin/python"]


def test_absolute_member_names_still_match(tmp_path: Path) -> None:
    """Tar members named /secrets/key.pem unpack to /secrets/key.pem too."""
    blob = tar_of([("/secrets/key.pem", "file"), ("//etc//shadow", "file")])
    source, manifest = build_layout(tmp_path / "l", [(mediatypes.OCI_LAYER, blob)])
    assert layer_files(source, manifest.layers[0]) == ["/secrets/key.pem", "/etc/shadow"]
    selector = LayerSelector.parse(["path:/secrets/**"])
    assert selector.select(manifest.layers, source) == {0}


def test_encrypted_layers_are_not_read(tmp_path: Path) -> None:
    plain = tar_of([("secrets/a", "file")])
    source, manifest = build_layout(tmp_path / "l", [(mediatypes.OCI_LAYER, plain)])
    missing = Descriptor(
        media_type=mediatypes.encrypted(mediatypes.OCI_LAYER_GZIP),
        digest="sha256:" + "0" * 64,
        size=5,
    )
    layers = (missing, *manifest.layers)
    assert LayerSelector.parse(["path:/secrets/**"]).select(layers, source) == {1}


def test_progress_counts_every_layer_read(image: tuple[LayoutSource, Manifest]) -> None:
    source, manifest = image
    progress: list[int] = []
    LayerSelector.parse(["2", "path:/nothing"]).select(manifest.layers, source, progress.append)
    assert sum(progress) == sum(layer.size for i, layer in enumerate(manifest.layers) if i != 2)


# -- integrity ---------------------------------------------------------------------------------


def test_a_swapped_blob_is_an_integrity_error(
    tmp_path: Path, image: tuple[LayoutSource, Manifest]
) -> None:
    _, manifest = image
    target = blob_path(tmp_path / "layout", manifest.layers[1].digest)
    target.write_bytes(tar_of([("innocent.txt", "file")]))  # valid tar, other content
    with pytest.raises(IntegrityError, match="does not match its digest"):
        select(["path:/innocent.txt"], image)


def test_bytes_after_the_tar_end_are_hashed_too(
    tmp_path: Path, image: tuple[LayoutSource, Manifest]
) -> None:
    _, manifest = image
    target = blob_path(tmp_path / "layout", manifest.layers[1].digest)
    target.write_bytes(target.read_bytes() + b"\0" * 4096 + b"appended")
    with pytest.raises(IntegrityError, match="does not match its digest"):
        select(["path:/secrets/**"], image)


@pytest.mark.parametrize(
    ("media_type", "blob"),
    [
        (mediatypes.OCI_LAYER, b"definitely not a tar archive" * 30),
        (mediatypes.OCI_LAYER_GZIP, b"not gzip at all" * 30),
        (mediatypes.OCI_LAYER_GZIP, gzip.compress(b"x" * 10_000)[:40] + b"\xff" * 200),
        (mediatypes.OCI_LAYER_GZIP, gzip.compress(tar_of([("a", "file")]))[:-30]),
        (mediatypes.OCI_LAYER_ZSTD, b"not zstd at all" * 30),
        (mediatypes.OCI_LAYER_ZSTD, b"\x28\xb5\x2f\xfd" + b"\xff" * 100),
    ],
    ids=["tar", "gzip-magic", "gzip-corrupt", "gzip-truncated", "zstd-magic", "zstd-corrupt"],
)
def test_content_that_is_not_a_layer_is_an_integrity_error(
    tmp_path: Path, media_type: str, blob: bytes
) -> None:
    # The digest matches: the publisher shipped garbage. Still one clean error.
    source, manifest = build_layout(tmp_path / "l", [(media_type, blob)])
    with pytest.raises(IntegrityError, match="is not a valid tar archive") as info:
        LayerSelector.parse(["path:/x"]).select(manifest.layers, source)
    assert "\n" not in str(info.value)
    assert manifest.layers[0].digest == "sha256:" + hashlib.sha256(blob).hexdigest()


def test_manifest_of_the_fixture_is_what_the_layout_holds(
    image: tuple[LayoutSource, Manifest],
) -> None:
    source, manifest = image
    data, media_type = source.top_manifest()
    assert media_type == mediatypes.OCI_MANIFEST
    assert json.loads(data) == json.loads(manifest.to_bytes())
