"""`image decrypt`: verify everything, then release it.

Every layer the keys can open is decrypted into private staging and checked
(HMAC over the ciphertext, digest of the plaintext) before the first byte is
published; the manifest is written last. Keys of a lower tier give the image
cut just below the first layer they cannot open: manifest layers, config
`diff_ids` and history cut together, a valid image that runs. Keys that open
no encrypted layer (nor the protected config) are refused.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from trustplane.crypto import keywrap
from trustplane.crypto.keys import UnwrapKey
from trustplane.crypto.layer_cipher import PrivateOptions, PublicOptions
from trustplane.errors import DecryptionKeyError, IntegrityError, MalformedError, UnsupportedError
from trustplane.images import protected_config
from trustplane.images.layer_crypto import decrypt_blob
from trustplane.images.resolve import resolve
from trustplane.oci import mediatypes
from trustplane.oci.annotations import ENC_KEYS_JWE, ENC_PREFIX, ENC_PUBOPTS
from trustplane.oci.model import Descriptor, ImageConfig, Manifest, sha256_digest
from trustplane.oci.reference import ImageRef
from trustplane.oci.transport import Endpoint, open_destination, open_source
from trustplane.progress import SILENT, Reporter


class Unwrapper(Protocol):
    """Somewhere else that can open a layer's key wrapping (the KMS)."""

    def open_layer(self, annotation: str, what: str) -> bytes | None:
        """The private options, or None when this caller may not have them."""


@dataclass(frozen=True)
class DecryptRequest:
    source: ImageRef
    destination: ImageRef
    keys: Sequence[UnwrapKey] = ()
    remote: Sequence[Unwrapper] = ()
    truncate: bool = True
    """Give the image cut below the first layer the keys cannot open (else fail)."""
    platform: str | None = None
    source_endpoint: Endpoint = field(default_factory=Endpoint)
    destination_endpoint: Endpoint = field(default_factory=Endpoint)


@dataclass(frozen=True)
class DecryptResult:
    manifest_digest: str
    layer_count: int
    """Layers in the decrypted image."""
    source_layer_count: int
    decrypted_layers: tuple[int, ...]
    restored_config: bool


@dataclass(frozen=True)
class OpenedLayer:
    private: PrivateOptions
    public: PublicOptions


def decrypt_image(request: DecryptRequest, reporter: Reporter = SILENT) -> DecryptResult:
    if not request.keys and not request.remote:
        raise DecryptionKeyError("give at least one --key, or --kms")
    source = open_source(request.source, request.source_endpoint)
    try:
        image = resolve(source, request.platform)
        layers = image.manifest.layers
        opened, limit = unwrap_all(layers, request.keys, request.remote, str(request.source))
        visible = protected_config.reveal(image.manifest.config, request.keys)
        if limit < len(layers) and not opened and visible is None:
            # Keys that open nothing get what anyone gets without a key: that is
            # no decryption, and a script must not take it for one.
            raise DecryptionKeyError(
                f"{request.source}: none of the given keys can open layer {limit}, "
                "its lowest encrypted layer"
            )
        if limit < len(layers) and not request.truncate:
            raise DecryptionKeyError(
                f"{request.source}: the keys cannot open layer {limit} of {len(layers)}"
            )
        destination = open_destination(request.destination, request.destination_endpoint)
        committed = False
        try:
            # Phase 1: decrypt and verify into staging. Nothing is published yet.
            new_layers = list(layers[:limit])
            for index, state in opened.items():
                layer = layers[index]
                staged = destination.staging / f"layer-{index}"
                plain = decrypt_blob(
                    source,
                    layer,
                    state.private,
                    state.public,
                    staged,
                    reporter.bar(f"decrypt layer {index}", layer.size),
                )
                new_layers[index] = _plain_descriptor(layer, plain.digest, plain.size)
            config_desc, config = _config(image.manifest, image.config, limit, visible)
            _check_diff_ids(new_layers, config, str(request.source))
            # Phase 2: publish; the manifest goes last.
            for index, layer in enumerate(new_layers):
                if index in opened:
                    destination.put_file(
                        layer,
                        destination.staging / f"layer-{index}",
                        reporter.bar(f"push layer {index}", layer.size),
                    )
                else:
                    destination.copy_from(
                        source, layer, reporter.bar(f"copy layer {index}", layer.size)
                    )
            destination.put_bytes(config_desc, config)
            manifest = image.manifest.model_copy(
                update={"config": config_desc, "layers": tuple(new_layers)}
            )
            digest = destination.commit(manifest.to_bytes(), mediatypes.OCI_MANIFEST)
            committed = True
        finally:
            destination.close(committed)
    finally:
        source.close()
    return DecryptResult(
        manifest_digest=digest,
        layer_count=limit,
        source_layer_count=len(layers),
        decrypted_layers=tuple(sorted(opened)),
        restored_config=visible is not None,
    )


def unwrap_all(
    layers: Sequence[Descriptor],
    keys: Sequence[UnwrapKey],
    remote: Sequence[Unwrapper],
    name: str,
) -> tuple[dict[int, OpenedLayer], int]:
    """The options of each layer the keys open, bottom up, and where they stop."""
    opened: dict[int, OpenedLayer] = {}
    encrypted = [i for i, layer in enumerate(layers) if layer.is_encrypted]
    for index in encrypted:
        state = unwrap_layer(layers[index], keys, f"{name}: layer {index}", remote)
        if state is None:
            return opened, index
        opened[index] = state
    return opened, len(layers)


def unwrap_layer(
    layer: Descriptor, keys: Sequence[UnwrapKey], what: str, remote: Sequence[Unwrapper] = ()
) -> OpenedLayer | None:
    jwe_value = layer.annotation(ENC_KEYS_JWE)
    pubopts = layer.annotation(ENC_PUBOPTS)
    if jwe_value is None:
        others = [k for k in (layer.annotations or {}) if k.startswith(ENC_PREFIX + "keys.")]
        if others:
            raise UnsupportedError(
                f"{what}: keys are wrapped with {others[0]}; only jwe is supported"
            )
        raise MalformedError(f"{what}: encrypted layer without a {ENC_KEYS_JWE} annotation")
    if pubopts is None:
        raise MalformedError(f"{what}: encrypted layer without a {ENC_PUBOPTS} annotation")
    public = PublicOptions.from_json(_unb64(pubopts, f"{what}: public options"))
    for token in jwe_value.split(",") if keys else ():
        payload = keywrap.unwrap(
            _unb64(token, f"{what}: JWE").decode("utf-8", "replace"), keys, what
        )
        if payload is not None:
            return OpenedLayer(private=PrivateOptions.from_json(payload), public=public)
    for unwrapper in remote:
        payload = unwrapper.open_layer(jwe_value, what)
        if payload is not None:
            return OpenedLayer(private=PrivateOptions.from_json(payload), public=public)
    return None


def _plain_descriptor(layer: Descriptor, digest: str, size: int) -> Descriptor:
    annotations = {
        k: v for k, v in (layer.annotations or {}).items() if not k.startswith(ENC_PREFIX)
    }
    return layer.model_copy(
        update={
            "media_type": mediatypes.decrypted(layer.media_type),
            "digest": digest,
            "size": size,
            "annotations": annotations or None,
        }
    )


def _config(
    manifest: Manifest, public: bytes, limit: int, visible: protected_config.VisibleConfig | None
) -> tuple[Descriptor, bytes]:
    """The config to publish: the protected original when we may see it, cut to `limit`."""
    descriptor = manifest.config
    if visible is not None and visible.layers >= limit:
        config = visible.config
        if visible.layers > limit:
            config = ImageConfig(config, "protected config").truncated(limit)
        descriptor = protected_config.public_descriptor(descriptor)
    elif limit < len(manifest.layers):
        config = ImageConfig(public, "image config").truncated(limit)
    else:
        return descriptor, public
    return descriptor.model_copy(
        update={"digest": sha256_digest(config), "size": len(config)}
    ), config


def _check_diff_ids(layers: Sequence[Descriptor], config: bytes, name: str) -> None:
    """Uncompressed layers must be their own diff_ids; a mismatch means a swapped layer."""
    diff_ids = ImageConfig(config, f"{name}: config").diff_ids
    if len(diff_ids) != len(layers):
        raise IntegrityError(f"{name}: config lists {len(diff_ids)} layers, manifest {len(layers)}")
    for index, (layer, diff_id) in enumerate(zip(layers, diff_ids, strict=True)):
        if mediatypes.compression(layer.media_type) is None and layer.digest != diff_id:
            raise IntegrityError(f"{name}: layer {index} does not match the config's diff_id")


def _unb64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise MalformedError(f"{what} is not valid base64") from None
