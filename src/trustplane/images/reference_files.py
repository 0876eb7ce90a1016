"""Reference values of a plain image for registration: layer digests and file digests.

Each layer blob is streamed once (layer_scan.py): its digest is checked (a registry that
serves other bytes is caught before anything is registered), it is
decompressed (gzip, zstd or none, as its media type says) and its tar is
digested file by file (trust/file_digests.py). Memory stays flat in layer
size. Encrypted layers cannot be read here: register from the plain image
(`image encrypt --register` reads its plain source for this).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from trustplane.errors import UsageError
from trustplane.images.layer_scan import scan_layer
from trustplane.images.resolve import resolve
from trustplane.oci.model import Descriptor, ImageConfig, sha256_digest
from trustplane.oci.reference import ImageRef
from trustplane.oci.transport import Endpoint, ImageSource, open_source
from trustplane.progress import SILENT, Reporter
from trustplane.trust.file_digests import digest_layer_tar


@dataclass(frozen=True)
class ReferenceLayer:
    """One layer as `POST /v1/images` takes it, with its files."""

    index: int
    digest: str
    encrypted: bool
    diff_id: str
    files: dict[str, str] | None = field(repr=False)
    """None only for an encrypted layer read with `skip_encrypted`."""


@dataclass(frozen=True)
class ReferenceImage:
    manifest_digest: str
    layers: tuple[ReferenceLayer, ...]


def layer_file_digests(
    source: ImageSource, layer: Descriptor, progress: Callable[[int], object] | None = None
) -> dict[str, str]:
    """The file map of one plain layer blob, whose digest is checked on the way."""
    if layer.is_encrypted:
        raise UsageError(f"layer {layer.digest} is encrypted; give the plain image")
    return scan_layer(source, layer, digest_layer_tar, progress)


def reference_image(
    ref: ImageRef,
    endpoint: Endpoint | None = None,
    platform: str | None = None,
    reporter: Reporter = SILENT,
    skip_encrypted: bool = False,
) -> ReferenceImage:
    """Layer digests, diff_ids and file maps of a plain image, ready to register.

    An encrypted layer is refused, or with `skip_encrypted` left without files.
    """
    source = open_source(ref, endpoint)
    try:
        image = resolve(source, platform)
        layers = image.manifest.layers
        config = ImageConfig(image.config, f"{ref}: config")
        if len(config.diff_ids) != len(layers):
            raise UsageError(
                f"{ref}: config lists {len(config.diff_ids)} layers, manifest {len(layers)}"
            )
        records = []
        for index, layer in enumerate(layers):
            if layer.is_encrypted and skip_encrypted:
                records.append(
                    ReferenceLayer(index, layer.digest, True, config.diff_ids[index], None)
                )
                continue
            if layer.is_encrypted:
                raise UsageError(
                    f"{ref}: layer {index} is encrypted; register file digests from the "
                    "plain image (image encrypt --register does)"
                )
            bar = reporter.bar(f"digest files of layer {index}", layer.size)
            files = layer_file_digests(source, layer, bar)
            records.append(
                ReferenceLayer(index, layer.digest, False, config.diff_ids[index], files)
            )
    finally:
        source.close()
    return ReferenceImage(sha256_digest(image.manifest_bytes), tuple(records))
