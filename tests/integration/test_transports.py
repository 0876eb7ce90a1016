"""Image sources and destinations against the real Docker engine and registry.

docker-daemon: → oci: keeps the image id and the layers Docker has;
oci: → docker-daemon: loads an image that runs; docker:// reads a Docker
schema-2 image that skopeo pushed and mounts blobs within one registry; a
copy that fails part way leaves the destination exactly as it was.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import secrets
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from conftest import run_skopeo
from flaky_proxy import FlakyProxy
from oci_helpers import blob, blob_path, copy_layout, index_entry, manifest, tree

from trustplane.embedded.dockerd import DockerDaemon
from trustplane.embedded.registry import RunningRegistry
from trustplane.errors import IntegrityError, NotFoundError
from trustplane.oci import mediatypes, reference
from trustplane.oci.model import parse_manifest
from trustplane.oci.registry import RegistryClient
from trustplane.oci.transport import Endpoint, open_destination, open_source
from trustplane.streaming import Readable

HELLO = b"hello from an OCI layout\n"


# -- helpers ------------------------------------------------------------------


def copy_image(
    source_ref: str,
    destination_ref: str,
    source_endpoint: Endpoint | None = None,
    destination_endpoint: Endpoint | None = None,
) -> str:
    """Copy one image unchanged through the transports; the manifest digest."""
    source = open_source(reference.parse(source_ref), source_endpoint)
    try:
        data, media_type = source.top_manifest()
        parsed = parse_manifest(data, source_ref)
        destination = open_destination(reference.parse(destination_ref), destination_endpoint)
        committed = False
        try:
            for desc in (parsed.config, *parsed.layers):
                destination.copy_from(source, desc)
            digest = destination.commit(data, media_type)
            committed = True
        finally:
            destination.close(committed)
    finally:
        source.close()
    return digest


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_all(stream: Readable) -> bytes:
    out = bytearray()
    buffer = bytearray(1 << 20)
    while n := stream.readinto(memoryview(buffer)):
        out += buffer[:n]
    return bytes(out)


def snapshot(root: Path) -> dict[str, str | None]:
    """Every path below `root` with the digest of its content (None for dirs)."""
    return {
        name: None if (root / name).is_dir() else sha256((root / name).read_bytes())
        for name in tree(root)
    }


@pytest.fixture(scope="module", autouse=True)
def docker_host(docker_daemon: DockerDaemon) -> Iterator[None]:
    """trustplane's daemon transport finds the engine the fixtures use."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DOCKER_HOST", docker_daemon.base_url)
        yield


@pytest.fixture(scope="module")
def busybox_layout(busybox_base: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The BusyBox base image copied by trustplane from Docker into an OCI layout."""
    layout = tmp_path_factory.mktemp("transports") / "busybox"
    copy_image(f"docker-daemon:{busybox_base}", f"oci:{layout}:base")
    return layout


def _gzip_tar(files: dict[str, bytes]) -> tuple[bytes, bytes]:
    """(uncompressed tar, gzip of it), both reproducible."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(content), 0o644, 1_600_000_000
            archive.addfile(info, io.BytesIO(content))
    return raw.getvalue(), gzip.compress(raw.getvalue(), mtime=0)


def _add_blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = sha256(data)
    blob_path(layout, digest).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def extend_layout(layout: Path, base_tag: str, tag: str, files: dict[str, bytes]) -> str:
    """Add, by hand, an image = `base_tag` + one gzip layer holding `files`; its id."""
    tar, compressed = _gzip_tar(files)
    base = manifest(layout, base_tag)
    config = json.loads(blob(layout, base["config"]["digest"]))
    config["rootfs"]["diff_ids"].append(sha256(tar))
    config.setdefault("history", []).append({"created_by": "trustplane transport test"})
    config_desc = {
        "mediaType": mediatypes.OCI_CONFIG,
        **_add_blob(layout, json.dumps(config).encode()),
    }
    layer_desc = {"mediaType": mediatypes.OCI_LAYER_GZIP, **_add_blob(layout, compressed)}
    new = {**base, "config": config_desc, "layers": [*base["layers"], layer_desc]}
    manifest_desc: dict[str, Any] = {"mediaType": mediatypes.OCI_MANIFEST}
    manifest_desc.update(_add_blob(layout, json.dumps(new).encode()))
    manifest_desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
    index = json.loads((layout / "index.json").read_bytes())
    index["manifests"].append(manifest_desc)
    (layout / "index.json").write_text(json.dumps(index))
    return str(config_desc["digest"])


def small_layout(root: Path, tag: str) -> Path:
    """A layout holding one tiny image, written without trustplane."""
    root.mkdir(parents=True)
    (root / "blobs" / "sha256").mkdir(parents=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": []}))
    tar, _ = _gzip_tar({"only.txt": b"a small image\n"})
    rootfs = {"type": "layers", "diff_ids": [sha256(tar)]}
    config = {"architecture": "amd64", "os": "linux", "rootfs": rootfs}
    config_desc = {
        "mediaType": mediatypes.OCI_CONFIG,
        **_add_blob(root, json.dumps(config).encode()),
    }
    layer_desc = {"mediaType": mediatypes.OCI_LAYER, **_add_blob(root, tar)}
    image = {"schemaVersion": 2, "config": config_desc, "layers": [layer_desc]}
    manifest_desc: dict[str, Any] = {"mediaType": mediatypes.OCI_MANIFEST}
    manifest_desc.update(_add_blob(root, json.dumps(image).encode()))
    manifest_desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [manifest_desc]}))
    return root


# -- Docker engine ------------------------------------------------------------------


def test_daemon_source_to_layout_keeps_image(
    busybox_layout: Path, busybox_base: str, docker_client: docker.DockerClient
) -> None:
    image = docker_client.images.get(busybox_base)
    image_manifest = manifest(busybox_layout, "base")
    assert index_entry(busybox_layout, "base")["mediaType"] == mediatypes.OCI_MANIFEST
    assert image_manifest["config"]["mediaType"] == mediatypes.OCI_CONFIG
    assert image_manifest["config"]["digest"] == image.id

    config_bytes = blob(busybox_layout, image.id)
    assert sha256(config_bytes) == image.id  # the config is kept byte for byte
    diff_ids = json.loads(config_bytes)["rootfs"]["diff_ids"]
    assert diff_ids == image.attrs["RootFS"]["Layers"]
    layers = image_manifest["layers"]
    assert len(layers) == len(diff_ids) >= 1
    for layer, diff_id in zip(layers, diff_ids, strict=True):
        # `docker save` writes uncompressed layer tars: digest = diff_id.
        assert layer["mediaType"] == mediatypes.OCI_LAYER
        assert layer["digest"] == diff_id
        content = blob(busybox_layout, layer["digest"])
        assert sha256(content) == diff_id
        assert layer["size"] == len(content)
        with tarfile.open(fileobj=io.BytesIO(content)) as archive:
            assert "bin/busybox" in archive.getnames()
    assert not [p for p in busybox_layout.iterdir() if p.name.startswith(".trustplane-staging")]


def test_layout_to_daemon_loads_an_image_that_runs(
    busybox_layout: Path, docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    layout = copy_layout(busybox_layout, tmp_path / "layout")
    image_id = extend_layout(layout, "base", "hello", {"hello.txt": HELLO})
    tag = f"trustplane/transports:loaded-{secrets.token_hex(4)}"
    with contextlib.suppress(docker.errors.ImageNotFound):
        # What a previous run left: Docker must get this image from us.
        docker_client.images.remove(image_id, force=True)
    try:
        copy_image(f"oci:{layout}:hello", f"docker-daemon:{tag}")
        loaded = docker_client.images.get(tag)
        assert loaded.id == image_id
        output = docker_client.containers.run(
            tag, ["sh", "-c", "cat /hello.txt && echo ok"], remove=True
        )
        assert output == HELLO + b"ok\n"
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(image_id, force=True)


# -- registry ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v2s2_image(registry_plain: RunningRegistry, busybox_base: str, skopeo: str) -> str:
    """The BusyBox image as skopeo pushes it in Docker schema 2 (docker://... reference)."""
    target = f"docker://{registry_plain.host}/transports/v2s2:1"
    run_skopeo(
        "copy",
        "--format",
        "v2s2",
        "--dest-tls-verify=false",
        f"docker-daemon:{busybox_base}",
        target,
    )
    return target


def test_registry_source_reads_docker_schema2(
    v2s2_image: str, busybox_base: str, docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    image = docker_client.images.get(busybox_base)
    source = open_source(reference.parse(v2s2_image))
    try:
        data, media_type = source.top_manifest()
        assert media_type == mediatypes.DOCKER_MANIFEST
        parsed = parse_manifest(data, v2s2_image)
        assert parsed.media_type == mediatypes.DOCKER_MANIFEST
        assert source.manifest_by_digest(sha256(data)) == data
        assert parsed.config.media_type == mediatypes.DOCKER_CONFIG
        config = source.read_blob(parsed.config, 1 << 20)
        assert parsed.config.digest == image.id  # skopeo keeps Docker's config
        diff_ids = json.loads(config)["rootfs"]["diff_ids"]
        assert diff_ids == image.attrs["RootFS"]["Layers"]
        for layer, diff_id in zip(parsed.layers, diff_ids, strict=True):
            assert layer.media_type == mediatypes.DOCKER_LAYER_GZIP
            with source.open_blob(layer) as stream:
                compressed = read_all(stream)
            assert sha256(compressed) == layer.digest
            assert sha256(gzip.decompress(compressed)) == diff_id
    finally:
        source.close()

    # Copied to a layout unchanged: same manifest bytes, same media type.
    layout = tmp_path / "from-registry"
    digest = copy_image(v2s2_image, f"oci:{layout}:v1")
    assert digest == sha256(data)
    assert index_entry(layout, "v1")["mediaType"] == mediatypes.DOCKER_MANIFEST
    assert blob(layout, digest) == data
    for desc in (parsed.config, *parsed.layers):
        assert sha256(blob(layout, desc.digest)) == desc.digest


def test_registry_to_registry_mounts_instead_of_uploading(
    v2s2_image: str, registry_plain: RunningRegistry
) -> None:
    with FlakyProxy(registry_plain.host) as proxy:
        source = v2s2_image.replace(registry_plain.host, proxy.host)
        destination = f"docker://{proxy.host}/transports/mounted:1"
        digest = copy_image(source, destination)
        blob_bodies = proxy.forwarded("PUT", "/blobs/") + proxy.forwarded("PATCH")
        mounts = [e for e in proxy.exchanges("POST", "/blobs/uploads/") if "mount=" in e.path]
    assert blob_bodies == 0
    assert len(mounts) >= 2
    assert all(m.status == 201 for m in mounts)
    assert "from=transports%2Fv2s2" in mounts[0].path or "from=transports/v2s2" in mounts[0].path
    with RegistryClient(registry_plain.host) as client:
        data, media_type = client.get_manifest("transports/mounted", "1")
        assert sha256(data) == digest
        assert media_type == mediatypes.DOCKER_MANIFEST
        parsed = parse_manifest(data, "mounted")
        for desc in (parsed.config, *parsed.layers):
            assert client.has_blob("transports/mounted", desc.digest)


# -- failure part way ------------------------------------------------------------------


@pytest.fixture
def corrupt_source(busybox_layout: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the BusyBox layout whose last layer has one byte flipped (same size)."""
    source = copy_layout(busybox_layout, tmp_path / "corrupt")
    layer = manifest(source, "base")["layers"][-1]["digest"]
    path = blob_path(source, layer)
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))
    return source, layer


def _fails_with_integrity_error(source: Path, destination: str, layer: str) -> None:
    with pytest.raises(IntegrityError) as failed:
        copy_image(f"oci:{source}:base", destination)
    message = str(failed.value)
    assert "\n" not in message
    assert layer in message


def test_failed_copy_leaves_existing_layout_as_it_was(
    corrupt_source: tuple[Path, str], tmp_path: Path
) -> None:
    source, layer = corrupt_source
    existing = small_layout(tmp_path / "existing", "keep")
    before = snapshot(existing)
    _fails_with_integrity_error(source, f"oci:{existing}:new", layer)
    assert snapshot(existing) == before
    # The layout still works: its image reads back whole.
    kept = open_source(reference.parse(f"oci:{existing}:keep"))
    parsed = parse_manifest(kept.top_manifest()[0], "kept")
    assert kept.read_blob(parsed.config, 1 << 20)


def test_failed_copy_creates_nothing(corrupt_source: tuple[Path, str], tmp_path: Path) -> None:
    source, layer = corrupt_source
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails_with_integrity_error(source, f"oci:{empty}:new", layer)
    assert list(empty.iterdir()) == []

    fresh = tmp_path / "fresh"  # neither it nor its parent exists
    _fails_with_integrity_error(source, f"oci:{fresh / 'nested' / 'layout'}:new", layer)
    assert not fresh.exists()


def test_failed_copy_to_registry_leaves_no_image(
    corrupt_source: tuple[Path, str], registry_plain: RunningRegistry
) -> None:
    source, layer = corrupt_source
    destination = f"docker://{registry_plain.host}/transports/corrupt:1"
    with pytest.raises(IntegrityError) as failed:
        copy_image(f"oci:{source}:base", destination)
    assert "DIGEST_INVALID" in str(failed.value)
    with RegistryClient(registry_plain.host) as client:
        with pytest.raises(NotFoundError):
            client.get_manifest("transports/corrupt", "1")
        assert not client.has_blob("transports/corrupt", layer)
