"""`--protect-config`: the history of encrypted layers leaves the public config.

An image config is public in every ocicrypt image and its history names how
each layer was made; for a `COPY` that is the sha256 of the copied file, so a
guessable secret can be confirmed from the config alone. With protection the
public config keeps `diff_ids` (Docker checks them on load) but the history
entries of encrypted layers say only "encrypted layer". The real config
travels in an annotation on the config descriptor, as JWEs: one per group
of recipients that see the same number of layers, each carrying the original
config cut to that many layers. So a lower tier never sees the history of a
layer it cannot open, and the full tier gets the original bytes back.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass

from trustplane.crypto import keywrap
from trustplane.crypto.keys import UnwrapKey
from trustplane.errors import MalformedError
from trustplane.images.recipients import Recipient
from trustplane.oci.annotations import PROTECTED_CONFIG
from trustplane.oci.model import Descriptor, ImageConfig

REDACTED_COMMENT = "encrypted layer (history protected by trustplane)"


@dataclass(frozen=True)
class VisibleConfig:
    layers: int
    """How many layers this config describes."""
    config: bytes


def protect(
    config: ImageConfig, encrypted: set[int], recipients: Sequence[Recipient]
) -> tuple[bytes, str]:
    """(public config bytes, annotation value)."""
    layer_count = len(config.diff_ids)
    groups: dict[int, list[Recipient]] = {}
    for recipient in recipients:
        groups.setdefault(visible_layers(recipient, encrypted, layer_count), []).append(recipient)
    tokens = []
    for layers, members in sorted(groups.items()):
        original = config.raw if layers == layer_count else config.truncated(layers)
        payload = json.dumps(
            {"layers": layers, "config": base64.b64encode(original).decode()}
        ).encode()
        token = keywrap.wrap(payload, [m.key for m in members])
        tokens.append(base64.b64encode(token.encode()).decode())
    return config.redacted(encrypted, REDACTED_COMMENT), ",".join(tokens)


def visible_layers(recipient: Recipient, encrypted: set[int], layer_count: int) -> int:
    """Layers below the first encrypted layer this recipient cannot open."""
    blocked = [i for i in encrypted if not recipient.reaches(i)]
    return min(blocked, default=layer_count)


def reveal(descriptor: Descriptor, keys: Sequence[UnwrapKey]) -> VisibleConfig | None:
    """The most complete original config these keys may see, if any."""
    value = descriptor.annotation(PROTECTED_CONFIG)
    if value is None:
        return None
    best: VisibleConfig | None = None
    for token in value.split(","):
        try:
            serialized = base64.b64decode(token, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise MalformedError("protected config annotation is not base64") from None
        payload = keywrap.unwrap(serialized, keys, "protected config")
        if payload is None:
            continue
        visible = _parse(payload)
        if best is None or visible.layers > best.layers:
            best = visible
    return best


def _parse(payload: bytes) -> VisibleConfig:
    try:
        obj = json.loads(payload)
        layers = obj["layers"]
        config = base64.b64decode(obj["config"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise MalformedError("protected config payload is malformed") from None
    if not isinstance(layers, int) or layers < 0:
        raise MalformedError("protected config payload is malformed")
    return VisibleConfig(layers=layers, config=config)


def public_descriptor(descriptor: Descriptor) -> Descriptor:
    """The config descriptor without our annotation."""
    annotations = {k: v for k, v in (descriptor.annotations or {}).items() if k != PROTECTED_CONFIG}
    return descriptor.model_copy(update={"annotations": annotations or None})
