"""OCI descriptors, manifests, indexes and image configs.

Parsing validates (pydantic) and turns every defect into one MalformedError
line. Serialization follows the Go structs of image-spec v1.1 field by field
and omits empty optional fields as Go's `omitempty` does, so a manifest we
rebuild is byte-identical to the one skopeo or containerd would write.
Image configs are kept as order-preserving dicts: we only ever cut or redact
their history, and everything else must survive untouched.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from trustplane.errors import IntegrityError, MalformedError
from trustplane.oci import gojson, mediatypes

MAX_MANIFEST_SIZE = 4 << 20
"""The distribution registry's own limit for manifests."""
MAX_CONFIG_SIZE = 16 << 20

Digest = Annotated[str, StringConstraints(pattern=r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def verify_digest(data: bytes, digest: str, what: str) -> None:
    algorithm, _, expected = digest.partition(":")
    if algorithm not in ("sha256", "sha512"):
        raise MalformedError(f"{what}: unsupported digest algorithm {algorithm!r}")
    if hashlib.new(algorithm, data).hexdigest() != expected:
        raise IntegrityError(f"{what}: content does not match its digest {digest}")


_ALWAYS = {"layers", "manifests"}
"""List fields the Go structs marshal even when empty (no omitempty)."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    def go_dict(self) -> dict[str, Any]:
        """Fields in Go struct order, without the ones Go's omitempty drops."""
        out: dict[str, Any] = {}
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if value is None or (value in ({}, ()) and name not in _ALWAYS):
                continue
            key = info.alias or name
            if isinstance(value, _Model):
                out[key] = value.go_dict()
            elif isinstance(value, tuple):
                out[key] = [v.go_dict() if isinstance(v, _Model) else v for v in value]
            elif isinstance(value, dict):
                out[key] = dict(sorted(value.items()))  # Go marshals maps sorted
            else:
                out[key] = value
        return out


class Platform(_Model):
    architecture: str
    os: str
    os_version: str | None = Field(None, alias="os.version")
    os_features: tuple[str, ...] | None = Field(None, alias="os.features")
    variant: str | None = None
    features: tuple[str, ...] | None = None


class Descriptor(_Model):
    media_type: str = Field(alias="mediaType")
    digest: Digest
    size: int = Field(ge=0, strict=True)  # as Go: "12", true or 12.0 is not an int64
    urls: tuple[str, ...] | None = None
    annotations: dict[str, str] | None = None
    data: str | None = None
    platform: Platform | None = None
    artifact_type: str | None = Field(None, alias="artifactType")

    def annotation(self, key: str) -> str | None:
        return (self.annotations or {}).get(key)

    @property
    def is_encrypted(self) -> bool:
        return mediatypes.is_encrypted(self.media_type)


class Manifest(_Model):
    schema_version: Literal[2] = Field(alias="schemaVersion")
    media_type: str | None = Field(None, alias="mediaType")
    artifact_type: str | None = Field(None, alias="artifactType")
    config: Descriptor
    layers: tuple[Descriptor, ...]
    subject: Descriptor | None = None
    annotations: dict[str, str] | None = None

    def to_bytes(self) -> bytes:
        return gojson.dumps(self.go_dict())


class Index(_Model):
    schema_version: Literal[2] = Field(alias="schemaVersion")
    media_type: str | None = Field(None, alias="mediaType")
    artifact_type: str | None = Field(None, alias="artifactType")
    manifests: tuple[Descriptor, ...]
    subject: Descriptor | None = None
    annotations: dict[str, str] | None = None

    def to_bytes(self) -> bytes:
        return gojson.dumps(self.go_dict())


def parse_manifest(data: bytes, what: str) -> Manifest:
    if len(data) > MAX_MANIFEST_SIZE:
        raise MalformedError(f"{what}: manifest larger than 4 MiB")
    obj = _load_json(data, what)
    if obj.get("mediaType", mediatypes.OCI_MANIFEST) not in mediatypes.MANIFESTS:
        raise MalformedError(f"{what}: not an image manifest (mediaType {obj.get('mediaType')!r})")
    manifest = _validate(Manifest, obj, what)
    for layer in manifest.layers:
        if mediatypes.decrypted(layer.media_type) not in mediatypes.LAYERS:
            raise MalformedError(f"{what}: unknown layer media type {layer.media_type!r}")
    return manifest


def parse_index(data: bytes, what: str) -> Index:
    if len(data) > MAX_MANIFEST_SIZE:
        raise MalformedError(f"{what}: index larger than 4 MiB")
    return _validate(Index, _load_json(data, what), what)


def media_type_of(data: bytes, what: str) -> str:
    """A manifest's or index's media type from its own `mediaType` field."""
    obj = _load_json(data, what)
    declared = obj.get("mediaType")
    if isinstance(declared, str):
        return declared
    # OCI allows omitting mediaType; the presence of "manifests" tells an index.
    return mediatypes.OCI_INDEX if "manifests" in obj else mediatypes.OCI_MANIFEST


_M = TypeVar("_M", bound=_Model)


def _validate(model: type[_M], obj: dict[str, Any], what: str) -> _M:
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "document"
        raise MalformedError(f"{what}: invalid {where}: {first['msg']}") from None


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: Go refuses it, and we could not print it
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data, parse_float=_finite, parse_constant=_no_constant)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, and the two above
        raise MalformedError(f"{what}: not valid JSON") from None
    if not isinstance(obj, dict):
        raise MalformedError(f"{what}: not a JSON object")
    return obj


class ImageConfig:
    """An image config as an order-preserving dict, with the edits we need."""

    def __init__(self, raw: bytes, what: str = "image config") -> None:
        if len(raw) > MAX_CONFIG_SIZE:
            raise MalformedError(f"{what}: larger than 16 MiB")
        self.raw = raw
        self.doc = _load_json(raw, what)
        rootfs = self.doc.get("rootfs")
        if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
            raise MalformedError(f"{what}: rootfs.diff_ids is missing")
        self.diff_ids: list[str] = [str(d) for d in rootfs["diff_ids"]]
        history = self.doc.get("history", [])
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise MalformedError(f"{what}: history is not a list of objects")
        self.history: list[dict[str, Any]] = history

    def layer_history(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(layer index, history entry) for entries that created a layer."""
        layer = 0
        for entry in self.history:
            if not entry.get("empty_layer"):
                yield layer, entry
                layer += 1

    def truncated(self, layers: int) -> bytes:
        """The config of the image made of the first `layers` layers only."""
        doc = dict(self.doc)
        doc["rootfs"] = {**self.doc["rootfs"], "diff_ids": self.diff_ids[:layers]}
        if "history" in doc:
            kept: list[dict[str, Any]] = []
            seen = 0
            for entry in self.history:
                if not entry.get("empty_layer"):
                    if seen == layers:
                        break
                    seen += 1
                kept.append(entry)
            doc["history"] = kept
        return gojson.dumps(doc)

    def redacted(self, layers: set[int], comment: str) -> bytes:
        """The config with the history of `layers` reduced to `comment`.

        Docker checks `diff_ids` against the layers it loads, so they stay;
        `created_by` and friends go, because they leak how secret layers were
        built (e.g. `COPY file:<sha256 of the secret file>`).
        """
        doc = dict(self.doc)
        history: list[dict[str, Any]] = []
        redact = {id(entry) for index, entry in self.layer_history() if index in layers}
        for entry in self.history:
            if id(entry) in redact:
                kept = {k: v for k, v in entry.items() if k == "created"}
                entry = {**kept, "comment": comment}
            history.append(entry)
        if "history" in doc:
            doc["history"] = history
        return gojson.dumps(doc)
