"""docker save archives to OCI layouts, and OCI images to docker load archives."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
import zstandard

from trustplane.errors import MalformedError
from trustplane.oci import mediatypes
from trustplane.oci.docker_archive import ArchiveLayer, archive_to_layout, load_stream
from trustplane.oci.layout import REF_NAME, Layout, blob_path
from trustplane.oci.model import parse_manifest
from trustplane.streaming import ChunkReader

CONFIG = (
    b'{"architecture":"amd64","os":"linux","config":{"Cmd":["sh"]},'
    b'"rootfs":{"type":"layers","diff_ids":[]}}'
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_of(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


PLAIN = tar_of({"bin/sh": b"#!" + b"x" * 3000})
GZIPPED = gzip.compress(tar_of({"etc/secret": b"s3cret"}))
ZSTD = zstandard.ZstdCompressor().compress(tar_of({"opt/z": b"zz"}))


def save_archive(
    entries: list[tuple[str, bytes | None, str | None]],
) -> bytes:
    """A tar like `docker save`: (name, data, symlink target) in stream order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data, link in entries:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type = tarfile.SYMTYPE
                info.linkname = link
                archive.addfile(info)
            elif data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def docker_manifest(config: str, layers: list[str]) -> bytes:
    return json.dumps([{"Config": config, "RepoTags": ["app:1"], "Layers": layers}]).encode()


def legacy_save() -> bytes:
    """Docker < 25: <id>/layer.tar, <config hex>.json, manifest.json last;
    a repeated layer is a symlink to the first copy."""
    config_name = hashlib.sha256(CONFIG).hexdigest() + ".json"
    ids = ["a" * 64, "b" * 64, "c" * 64, "d" * 64]
    return save_archive(
        [
            (ids[0], None, None),
            (f"{ids[0]}/VERSION", b"1.0", None),
            (f"{ids[0]}/layer.tar", PLAIN, None),
            (ids[1], None, None),
            (f"{ids[1]}/layer.tar", GZIPPED, None),
            (ids[2], None, None),
            (f"{ids[2]}/layer.tar", None, f"../{ids[0]}/layer.tar"),
            (f"{ids[3]}/layer.tar", ZSTD, None),
            (config_name, CONFIG, None),
            ("manifest.json", docker_manifest(config_name, [f"{i}/layer.tar" for i in ids]), None),
            ("repositories", b'{"app":{"1":"' + ids[3].encode() + b'"}}', None),
        ]
    )


def stream_of(data: bytes, chunk: int = 1000) -> IO[bytes]:
    """A non-seekable stream, as the Engine API gives."""
    chunks = (data[i : i + chunk] for i in range(0, len(data), chunk))
    return io.BufferedReader(ChunkReader(chunks))


def test_legacy_docker_save_becomes_an_oci_layout(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    manifest = archive_to_layout(stream_of(legacy_save()), root, tag="v1")
    assert manifest.config.digest == sha256(CONFIG)
    assert manifest.config.media_type == mediatypes.OCI_CONFIG
    assert manifest.config.size == len(CONFIG)
    assert [(layer.digest, layer.size, layer.media_type) for layer in manifest.layers] == [
        (sha256(PLAIN), len(PLAIN), mediatypes.OCI_LAYER),
        (sha256(GZIPPED), len(GZIPPED), mediatypes.OCI_LAYER_GZIP),
        (sha256(PLAIN), len(PLAIN), mediatypes.OCI_LAYER),
        (sha256(ZSTD), len(ZSTD), mediatypes.OCI_LAYER_ZSTD),
    ]
    # The config is kept byte for byte (so the image id survives), and so are layers.
    assert blob_path(root, sha256(CONFIG)).read_bytes() == CONFIG
    for data in (PLAIN, GZIPPED, ZSTD):
        assert blob_path(root, sha256(data)).read_bytes() == data
    layout = Layout(root)
    entry = layout.find("v1")
    assert entry.annotation(REF_NAME) == "v1"
    assert entry.media_type == mediatypes.OCI_MANIFEST
    stored = layout.read_blob(entry.digest, 1 << 20)
    assert sha256(stored) == entry.digest
    assert entry.size == len(stored)
    assert parse_manifest(stored, "m") == manifest
    assert stored == manifest.to_bytes()


def test_nothing_but_the_layout_is_left(tmp_path: Path) -> None:
    root = tmp_path / "layout"
    archive_to_layout(stream_of(legacy_save()), root)
    assert sorted(p.name for p in root.iterdir()) == ["blobs", "index.json", "oci-layout"]
    digests = {f"sha256:{p.name}" for p in (root / "blobs" / "sha256").iterdir()}
    assert digests == {
        sha256(CONFIG),
        sha256(PLAIN),
        sha256(GZIPPED),
        sha256(ZSTD),
        Layout(root).find("latest").digest,
    }


def test_docker_25_oci_style_save(tmp_path: Path) -> None:
    """Docker 25+: blobs/sha256/HEX files, manifest.json naming them."""
    config_name = "blobs/sha256/" + hashlib.sha256(CONFIG).hexdigest()
    layer_name = "blobs/sha256/" + hashlib.sha256(GZIPPED).hexdigest()
    data = save_archive(
        [
            ("blobs", None, None),
            ("blobs/sha256", None, None),
            (config_name, CONFIG, None),
            (layer_name, GZIPPED, None),
            ("index.json", b"{}", None),
            ("manifest.json", docker_manifest(config_name, [layer_name]), None),
            ("oci-layout", b'{"imageLayoutVersion":"1.0.0"}', None),
        ]
    )
    manifest = archive_to_layout(stream_of(data), tmp_path / "layout")
    assert manifest.config.digest == sha256(CONFIG)
    assert [layer.digest for layer in manifest.layers] == [sha256(GZIPPED)]


def _broken(entries: list[tuple[str, bytes | None, str | None]]) -> bytes:
    return save_archive(entries)


CONFIG_NAME = "c.json"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"this is not a tar archive" * 40, "not a valid tar stream"),
        (legacy_save()[:5000], "not a valid tar stream"),
        (_broken([(CONFIG_NAME, CONFIG, None)]), "manifest.json is listed but missing"),
        (_broken([("manifest.json", b"{nope", None)]), "not valid JSON"),
        (_broken([("manifest.json", b"{}", None)]), "exactly one image"),
        (
            _broken([("manifest.json", docker_manifest(CONFIG_NAME, []) * 1, None)]),
            "c.json is listed but missing",
        ),
        (
            _broken(
                [
                    (CONFIG_NAME, CONFIG, None),
                    ("manifest.json", docker_manifest(CONFIG_NAME, ["x/layer.tar"]), None),
                ]
            ),
            "x/layer.tar is listed but missing",
        ),
        (
            _broken(
                [
                    (CONFIG_NAME, CONFIG, None),
                    ("a/layer.tar", None, "../b/layer.tar"),
                    ("b/layer.tar", None, "../a/layer.tar"),
                    ("manifest.json", docker_manifest(CONFIG_NAME, ["a/layer.tar"]), None),
                ]
            ),
            "is listed but missing",
        ),
        (
            _broken(
                [
                    (CONFIG_NAME, CONFIG, None),
                    (
                        "manifest.json",
                        json.dumps(
                            [
                                {"Config": CONFIG_NAME, "Layers": []},
                                {"Config": CONFIG_NAME, "Layers": []},
                            ]
                        ).encode(),
                        None,
                    ),
                ]
            ),
            "exactly one image",
        ),
    ],
)
def test_bad_archives_are_malformed(tmp_path: Path, data: bytes, message: str) -> None:
    with pytest.raises(MalformedError, match=message) as info:
        archive_to_layout(stream_of(data), tmp_path / "layout")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "layout" / "index.json").exists()


# -- docker load archives ----------------------------------------------------------------


def _opener(data: bytes) -> ArchiveLayer:
    @contextlib.contextmanager
    def open_layer() -> Iterator[IO[bytes]]:
        yield io.BytesIO(data)

    return ArchiveLayer(sha256(data), len(data), open_layer)


def test_load_stream_is_a_tar_docker_load_reads(tmp_path: Path) -> None:
    layers = [_opener(PLAIN), _opener(GZIPPED)]
    progress: list[int] = []
    chunks = list(load_stream(CONFIG, layers, ["app:1", "reg.io/app:latest"], progress.append))
    data = b"".join(chunks)
    assert len(data) % 512 == 0
    assert data.endswith(b"\0" * 1024)
    assert sum(progress) == len(PLAIN) + len(GZIPPED)
    config_name = hashlib.sha256(CONFIG).hexdigest() + ".json"
    layer_names = [hashlib.sha256(d).hexdigest() + "/layer.tar" for d in (PLAIN, GZIPPED)]
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        names = archive.getnames()
        assert names == [config_name, *layer_names, "manifest.json"]
        manifest_file = archive.extractfile("manifest.json")
        assert manifest_file is not None
        assert json.loads(manifest_file.read()) == [
            {
                "Config": config_name,
                "RepoTags": ["app:1", "reg.io/app:latest"],
                "Layers": layer_names,
            }
        ]
        contents = {}
        for name in (config_name, *layer_names):
            member = archive.extractfile(name)
            assert member is not None
            contents[name] = member.read()
        assert contents == {
            config_name: CONFIG,
            layer_names[0]: PLAIN,
            layer_names[1]: GZIPPED,
        }
        assert all(m.isfile() and m.mode == 0o644 for m in archive.getmembers())


def test_load_stream_without_tags_and_layers() -> None:
    data = b"".join(load_stream(CONFIG, [], []))
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        manifest_file = archive.extractfile("manifest.json")
        assert manifest_file is not None
        assert json.loads(manifest_file.read())[0]["RepoTags"] == []


def test_load_stream_refuses_a_short_layer() -> None:
    short = ArchiveLayer(sha256(PLAIN), len(PLAIN) + 10, _opener(PLAIN).open)
    with pytest.raises(MalformedError, match="shorter than its descriptor"):
        b"".join(load_stream(CONFIG, [short], ["app:1"]))


def test_load_stream_roundtrips_through_archive_to_layout(tmp_path: Path) -> None:
    data = b"".join(load_stream(CONFIG, [_opener(GZIPPED), _opener(PLAIN)], ["app:1"]))
    manifest = archive_to_layout(stream_of(data, chunk=333), tmp_path / "back")
    assert manifest.config.digest == sha256(CONFIG)
    assert [layer.digest for layer in manifest.layers] == [sha256(GZIPPED), sha256(PLAIN)]
