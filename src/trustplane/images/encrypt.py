"""`image encrypt`: sensitive layers encrypted, the rest left as they were.

Plain layers keep their digest, so they stay shared with the public base
image (and are mounted, not copied, within one registry). Encrypted layers
follow ocicrypt exactly: `+encrypted` media type, the JWE and public-options
annotations, AES-256-CTR with HMAC-SHA256. Layer keys come from the one-way
chain (crypto/key_chain.py), one key per layer.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field

from trustplane.crypto import keywrap
from trustplane.crypto.key_chain import new_chain
from trustplane.errors import UnsupportedError, UsageError
from trustplane.images import protected_config
from trustplane.images.layer_crypto import encrypt_blob
from trustplane.images.recipients import Recipient, for_layer
from trustplane.images.resolve import resolve
from trustplane.images.selection import LayerSelector
from trustplane.oci import mediatypes
from trustplane.oci.annotations import ENC_KEYS_JWE, ENC_PUBOPTS, PROTECTED_CONFIG
from trustplane.oci.model import Descriptor, ImageConfig, sha256_digest
from trustplane.oci.reference import ImageRef
from trustplane.oci.transport import Endpoint, open_destination, open_source
from trustplane.progress import SILENT, Reporter


@dataclass(frozen=True)
class EncryptRequest:
    source: ImageRef
    destination: ImageRef
    recipients: Sequence[Recipient]
    selector: LayerSelector = field(default_factory=LayerSelector.all)
    protect_config: bool = False
    platform: str | None = None
    source_endpoint: Endpoint = field(default_factory=Endpoint)
    destination_endpoint: Endpoint = field(default_factory=Endpoint)


@dataclass(frozen=True)
class LayerRecord:
    """What the control plane registers: the plain digest at each index."""

    index: int
    digest: str
    encrypted: bool
    diff_id: str


@dataclass(frozen=True)
class EncryptResult:
    manifest_digest: str
    encrypted_layers: tuple[int, ...]
    layer_count: int
    converted_from_docker: bool
    layers: tuple[LayerRecord, ...] = ()


def encrypt_image(request: EncryptRequest, reporter: Reporter = SILENT) -> EncryptResult:
    if not request.recipients:
        raise UsageError("give at least one --recipient")
    source = open_source(request.source, request.source_endpoint)
    try:
        image = resolve(source, request.platform)
        layers = image.manifest.layers
        config = ImageConfig(image.config, f"{request.source}: config")
        if len(config.diff_ids) != len(layers):
            raise UsageError(
                f"{request.source}: config lists {len(config.diff_ids)} layers, "
                f"manifest {len(layers)}"
            )
        scan = reporter.bar("scan layers", sum(x.size for x in layers))
        selected = request.selector.select(
            layers, source, scan if request.selector.patterns else None
        )
        _check_selection(selected, layers, request.recipients)
        destination = open_destination(request.destination, request.destination_endpoint)
        committed = False
        try:
            if not destination.accepts_encrypted:
                raise UnsupportedError(
                    f"{request.destination}: Docker cannot store encrypted layers; "
                    "write to oci: or docker://"
                )
            # Phase 1: encrypt into staging; a bad source blob stops us here,
            # before anything has reached the destination.
            keys = new_chain(len(layers))
            new_layers = list(layers)
            for index in sorted(selected):
                layer = layers[index]
                staged = destination.staging / f"layer-{index}.enc"
                blob = encrypt_blob(
                    source,
                    layer,
                    keys[index],
                    staged,
                    reporter.bar(f"encrypt layer {index}", layer.size),
                )
                jwe = keywrap.wrap(blob.private.to_json(), for_layer(request.recipients, index))
                annotations = {
                    **(layer.annotations or {}),
                    ENC_KEYS_JWE: _b64(jwe.encode()),
                    ENC_PUBOPTS: _b64(blob.public.to_json()),
                }
                new_layers[index] = layer.model_copy(
                    update={
                        "media_type": mediatypes.encrypted(layer.media_type),
                        "digest": blob.digest,
                        "size": blob.size,
                        "annotations": annotations,
                    }
                )
            # Phase 2: publish; the manifest goes last.
            for index, layer in enumerate(new_layers):
                if index in selected:
                    staged = destination.staging / f"layer-{index}.enc"
                    destination.put_file(
                        layer, staged, reporter.bar(f"push layer {index}", layer.size)
                    )
                else:
                    destination.copy_from(
                        source, layer, reporter.bar(f"copy layer {index}", layer.size)
                    )

            config_desc, config_bytes = image.manifest.config, image.config
            if request.protect_config and selected:
                config_bytes, token = protected_config.protect(config, selected, request.recipients)
                annotations = {
                    **(config_desc.annotations or {}),
                    PROTECTED_CONFIG: token,
                }
                config_desc = config_desc.model_copy(
                    update={
                        "digest": sha256_digest(config_bytes),
                        "size": len(config_bytes),
                        "annotations": annotations,
                    }
                )
            destination.put_bytes(config_desc, config_bytes)
            manifest = image.manifest.model_copy(
                update={
                    "media_type": mediatypes.OCI_MANIFEST,
                    "config": config_desc,
                    "layers": tuple(new_layers),
                }
            )
            digest = destination.commit(manifest.to_bytes(), mediatypes.OCI_MANIFEST)
            committed = True
        finally:
            destination.close(committed)
    finally:
        source.close()
    return EncryptResult(
        manifest_digest=digest,
        encrypted_layers=tuple(sorted(selected)),
        layer_count=len(layers),
        converted_from_docker=image.converted,
        layers=tuple(
            LayerRecord(index, layer.digest, index in selected, config.diff_ids[index])
            for index, layer in enumerate(layers)
        ),
    )


def _check_selection(
    selected: set[int], layers: Sequence[Descriptor], recipients: Sequence[Recipient]
) -> None:
    if not selected:
        raise UsageError("--layers selects no layer; nothing would be encrypted")
    for index in sorted(selected):
        if layers[index].is_encrypted:
            raise UsageError(f"layer {index} is already encrypted")
        if mediatypes.decrypted(layers[index].media_type) not in mediatypes.LAYERS:
            raise UnsupportedError(f"layer {index} has media type {layers[index].media_type!r}")
        if not for_layer(recipients, index):
            raise UsageError(f"layer {index} is selected but no recipient's tier reaches it")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
