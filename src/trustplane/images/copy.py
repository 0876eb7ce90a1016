"""`image copy`: move an image, encrypted or not, without opening it.

A mirror or an air-gapped transfer should not need keys. Blobs are copied
(mounted within one registry) and verified; the manifest keeps its bytes,
and so its digest, unless a Docker schema-2 image had to become OCI.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trustplane.images.resolve import resolve
from trustplane.oci import mediatypes
from trustplane.oci.reference import ImageRef
from trustplane.oci.transport import Endpoint, open_destination, open_source
from trustplane.progress import SILENT, Reporter


@dataclass(frozen=True)
class CopyRequest:
    source: ImageRef
    destination: ImageRef
    platform: str | None = None
    source_endpoint: Endpoint = field(default_factory=Endpoint)
    destination_endpoint: Endpoint = field(default_factory=Endpoint)


def copy_image(request: CopyRequest, reporter: Reporter = SILENT) -> str:
    """Returns the manifest digest at the destination."""
    source = open_source(request.source, request.source_endpoint)
    try:
        image = resolve(source, request.platform)
        destination = open_destination(request.destination, request.destination_endpoint)
        committed = False
        try:
            for index, layer in enumerate(image.manifest.layers):
                destination.copy_from(
                    source, layer, reporter.bar(f"copy layer {index}", layer.size)
                )
            destination.put_bytes(image.manifest.config, image.config)
            digest = destination.commit(image.manifest_bytes, mediatypes.OCI_MANIFEST)
            committed = True
        finally:
            destination.close(committed)
    finally:
        source.close()
    return digest
