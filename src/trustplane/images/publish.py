"""Publish: encrypt an image, digest its files, register it with the control plane.

What `image encrypt --register`, `image register` and every demo scene do,
written once. Registration sends, per layer, the plain digest, the diff_id,
whether it is encrypted and the digest of every file (the runtime-integrity
reference, reference_files.py); the control plane stores it under the
image's canonical name (oci/reference.py).

The file digests come from a streaming pass over the plain source before
anything is pushed, so a layer that is encrypted on the way is digested from
its plaintext; a source that changes between that pass and the encryption
(another diff_id) is not registered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from trustplane.api.images import PublishedLayer
from trustplane.client import ControlClient
from trustplane.errors import IntegrityError
from trustplane.images.encrypt import EncryptRequest, EncryptResult, encrypt_image
from trustplane.images.reference_files import ReferenceImage, reference_image
from trustplane.oci.reference import ImageRef
from trustplane.oci.transport import Endpoint
from trustplane.progress import SILENT, Reporter


@dataclass(frozen=True)
class Registration:
    """Where the control plane would find the image: under `name`, with `control`."""

    control: ControlClient
    name: str


@dataclass(frozen=True)
class Published:
    encrypted: EncryptResult
    log_index: int | None
    """The registration's transparency log entry (None: not registered)."""


@dataclass(frozen=True)
class Registered:
    reference: ReferenceImage
    log_index: int


def publish_image(
    request: EncryptRequest, registration: Registration | None, reporter: Reporter = SILENT
) -> Published:
    """Encrypt (and push) the image; then, with a `registration`, register what was pushed."""
    plain = (
        reference_image(
            request.source,
            request.source_endpoint,
            request.platform,
            reporter,
            skip_encrypted=True,
        )
        if registration is not None
        else None
    )
    result = encrypt_image(request, reporter)
    if registration is None or plain is None:
        return Published(result, None)
    if [layer.diff_id for layer in plain.layers] != [layer.diff_id for layer in result.layers]:
        raise IntegrityError(f"{request.source} changed while it was encrypted; not registered")
    layers = [
        PublishedLayer.model_construct(**asdict(layer), files=reference.files)
        for layer, reference in zip(result.layers, plain.layers, strict=True)
    ]
    log_index = _register(registration, result.manifest_digest, layers)
    return Published(result, log_index)


def register_plain_image(
    ref: ImageRef,
    registration: Registration,
    endpoint: Endpoint | None = None,
    platform: str | None = None,
    reporter: Reporter = SILENT,
) -> Registered:
    """Register a plain image as it is: its layers and the digests of their files."""
    plain = reference_image(ref, endpoint, platform, reporter)
    layers = [PublishedLayer.model_construct(**asdict(layer)) for layer in plain.layers]
    return Registered(plain, _register(registration, plain.manifest_digest, layers))


def _register(
    registration: Registration, manifest_digest: str, layers: Sequence[PublishedLayer]
) -> int:
    return registration.control.register_image(registration.name, manifest_digest, layers).log_index
