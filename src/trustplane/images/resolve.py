"""From a source reference to one OCI image manifest and its config.

An index (multi-platform) is narrowed to one platform; a Docker schema-2
manifest is converted to OCI, because encrypted layers exist only in OCI
(skopeo's `--format v2s2` with encryption writes images nobody can
decrypt). The config keeps its bytes, and so its digest: the image id.
"""

from __future__ import annotations

import platform as host_platform
from dataclasses import dataclass

from trustplane.errors import NotFoundError, UnsupportedError
from trustplane.oci import mediatypes
from trustplane.oci.model import (
    MAX_CONFIG_SIZE,
    Descriptor,
    Index,
    Manifest,
    media_type_of,
    parse_index,
    parse_manifest,
)
from trustplane.oci.transport import ImageSource

_MACHINES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}


@dataclass(frozen=True)
class ResolvedImage:
    manifest: Manifest
    """The image manifest, with OCI media types."""
    manifest_bytes: bytes
    """The bytes of `manifest` (the source's own unless converted)."""
    config: bytes
    converted: bool
    """True when the source was Docker schema 2."""


def host_platform_name() -> str:
    machine = host_platform.machine()
    return f"linux/{_MACHINES.get(machine, machine)}"


def resolve(source: ImageSource, platform: str | None = None) -> ResolvedImage:
    data, media_type = source.top_manifest()
    media_type = media_type if media_type in (*mediatypes.MANIFESTS, *mediatypes.INDEXES) else ""
    media_type = media_type or media_type_of(data, f"{source.ref}")
    if media_type in mediatypes.INDEXES:
        entry = _pick(
            parse_index(data, f"{source.ref}: index"), platform or host_platform_name(), source
        )
        data = source.manifest_by_digest(entry.digest)
        media_type = entry.media_type
    if media_type not in mediatypes.MANIFESTS:
        raise UnsupportedError(f"{source.ref}: unsupported manifest type {media_type!r}")
    manifest = parse_manifest(data, f"{source.ref}: manifest")
    converted = media_type == mediatypes.DOCKER_MANIFEST or _has_docker_types(manifest)
    if converted:
        manifest = to_oci(manifest)
        data = manifest.to_bytes()
    config = source.read_blob(manifest.config, MAX_CONFIG_SIZE)
    return ResolvedImage(manifest=manifest, manifest_bytes=data, config=config, converted=converted)


def to_oci(manifest: Manifest) -> Manifest:
    """The same image with OCI media types (blobs and config bytes unchanged)."""

    def convert(desc: Descriptor) -> Descriptor:
        target = mediatypes.DOCKER_TO_OCI.get(desc.media_type, desc.media_type)
        return desc.model_copy(update={"media_type": target})

    return manifest.model_copy(
        update={
            "media_type": mediatypes.OCI_MANIFEST,
            "config": convert(manifest.config),
            "layers": tuple(convert(layer) for layer in manifest.layers),
        }
    )


def _has_docker_types(manifest: Manifest) -> bool:
    types = [manifest.config.media_type, *(layer.media_type for layer in manifest.layers)]
    return any(t.startswith("application/vnd.docker.") for t in types)


def _pick(index: Index, wanted: str, source: ImageSource) -> Descriptor:
    os_name, _, rest = wanted.partition("/")
    architecture, _, variant = rest.partition("/")
    available = []
    for entry in index.manifests:
        if entry.platform is None:
            continue
        available.append(f"{entry.platform.os}/{entry.platform.architecture}")
        if (
            entry.platform.os == os_name
            and entry.platform.architecture == architecture
            and (not variant or entry.platform.variant == variant)
        ):
            return entry
    raise NotFoundError(f"{source.ref}: no image for {wanted} (available: {', '.join(available)})")
