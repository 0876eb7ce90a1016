"""`image inspect`: what an image holds and who can open which layer.

Needs no key. Recipients are shown by key id (RFC 7638 thumbprint, as
`trustplane key id` prints it) where the JWE names one; ocicrypt's own JWEs
name none, and then only the algorithm (and curve) can be shown. With keys,
it also says which layers those keys open.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any

from trustplane.crypto import keywrap
from trustplane.crypto.keys import UnwrapKey
from trustplane.errors import MalformedError
from trustplane.images.decrypt import unwrap_layer
from trustplane.images.resolve import resolve
from trustplane.oci.annotations import ENC_KEYS_JWE, PROTECTED_CONFIG
from trustplane.oci.model import ImageConfig, sha256_digest
from trustplane.oci.reference import ImageRef
from trustplane.oci.transport import Endpoint, open_source


def inspect_image(
    ref: ImageRef, endpoint: Endpoint | None = None, keys: Sequence[UnwrapKey] = ()
) -> dict[str, Any]:
    source = open_source(ref, endpoint)
    try:
        image = resolve(source)
    finally:
        source.close()
    config = ImageConfig(image.config, f"{ref}: config")
    history = dict(config.layer_history())
    layers = []
    for index, layer in enumerate(image.manifest.layers):
        entry: dict[str, Any] = {
            "index": index,
            "mediaType": layer.media_type,
            "digest": layer.digest,
            "size": layer.size,
            "encrypted": layer.is_encrypted,
            "diffID": config.diff_ids[index] if index < len(config.diff_ids) else None,
            "createdBy": history.get(index, {}).get("created_by"),
        }
        if layer.is_encrypted:
            entry["recipients"] = _recipients(layer.annotation(ENC_KEYS_JWE) or "")
            if keys:
                entry["opensWithGivenKeys"] = (
                    unwrap_layer(layer, keys, f"{ref}: layer {index}") is not None
                )
        layers.append(entry)
    protected = image.manifest.config.annotation(PROTECTED_CONFIG)
    return {
        "reference": str(ref),
        "manifestDigest": sha256_digest(image.manifest_bytes),
        "mediaType": image.manifest.media_type,
        "convertedFromDocker": image.converted,
        "config": {
            "digest": image.manifest.config.digest,
            "size": image.manifest.config.size,
            "protected": protected is not None,
            "protectedFor": _recipients(protected) if protected else [],
        },
        "layers": layers,
    }


def _recipients(value: str) -> list[dict[str, Any]]:
    result = []
    for token in filter(None, value.split(",")):
        try:
            serialized = base64.b64decode(token, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise MalformedError("a JWE annotation is not base64") from None
        result += [
            {"alg": r.alg, "keyID": r.kid, "curve": r.curve}
            for r in keywrap.recipients_of(serialized)
        ]
    return result
