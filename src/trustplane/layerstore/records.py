"""What the store knows of an image: `images/ID.json`, written once, atomically.

An image exists in the store exactly when its record does; the record is
written only after its last layer is committed, so a crash during an import
leaves no record (and recovery removes the layers it left). The record holds
no key: it names the control plane and the chain that hold them. It does
hold, in the clear, what the source image showed in the clear anyway: names,
digests, the image config (command, environment, history).
"""

from __future__ import annotations

import base64
import json
import secrets
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from trustplane.atomic import atomic_write
from trustplane.errors import MalformedError, NotFoundError, UsageError
from trustplane.layerstore.keys import ChainRef

ID_BYTES = 8


def new_image_id() -> str:
    return secrets.token_hex(ID_BYTES)


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StoredLayer(_Record):
    index: int
    layer: str
    """The backend's layer id."""
    digest: str
    """Plain (compressed) blob digest: what the control plane registers and the TPM measures."""
    diff_id: str
    media_type: str
    """Media type of the plain blob."""
    encrypted_in_source: bool
    disk_bytes: int


class StoredImage(_Record):
    id: str
    name: str
    """The name users give commands (REPOSITORY:TAG unless --name said otherwise)."""
    repository: str
    """What the policy and the attestation verifier call the image (HOST/REPO)."""
    source: str
    manifest_digest: str
    config: str
    """The image config, base64 (the source's bytes, so its digest holds)."""
    layers: tuple[StoredLayer, ...]
    source_layers: int
    """Layers in the source image; more than `layers` when our keys stopped below the top."""
    chain_server: str
    chain_id: str
    tiers: dict[str, int]
    backend: str
    size: int
    """Virtual size of every layer (bytes)."""
    created: datetime

    @property
    def chain(self) -> ChainRef:
        return ChainRef(self.chain_server, self.chain_id)

    @property
    def top(self) -> int:
        return len(self.layers) - 1

    def config_bytes(self) -> bytes:
        return base64.b64decode(self.config)

    def tier(self, value: str | int | None) -> int:
        """A tier given as a number or one of the names given at import (default: the top)."""
        if value is None:
            return self.top
        if isinstance(value, int) or value.isdigit():
            tier = int(value)
        elif value in self.tiers:
            tier = self.tiers[value]
        else:
            names = ", ".join(sorted(self.tiers)) or "none"
            raise UsageError(f"{self.name}: no tier {value!r} (named tiers: {names})")
        if not 0 <= tier <= self.top:
            raise UsageError(f"{self.name}: tier {tier} does not exist (layers 0..{self.top})")
        return tier

    def summary(self) -> dict[str, object]:
        return {
            "id": self.id,
            "name": self.name,
            "repository": self.repository,
            "manifestDigest": self.manifest_digest,
            "layers": len(self.layers),
            "sourceLayers": self.source_layers,
            "tiers": self.tiers,
            "diskBytes": sum(layer.disk_bytes for layer in self.layers),
            "backend": self.backend,
            "created": self.created.isoformat(),
        }


def now() -> datetime:
    return datetime.now(UTC)


class Records:
    """The `images/` directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, image_id: str) -> Path:
        return self.directory / f"{image_id}.json"

    def save(self, image: StoredImage) -> None:
        atomic_write(self.path(image.id), image.model_dump_json(indent=1).encode(), mode=0o600)

    def delete(self, image_id: str) -> None:
        self.path(image_id).unlink(missing_ok=True)

    def all(self) -> list[StoredImage]:
        images = [self._load(path) for path in sorted(self.directory.glob("*.json"))]
        return sorted(images, key=lambda image: (image.name, image.created))

    def find(self, name: str) -> StoredImage:
        """By name, by id, or by a unique id prefix."""
        images = self.all()
        exact = [i for i in images if name in (i.name, i.id)]
        if len(exact) == 1:
            return exact[0]
        if len(exact) > 1:
            ids = ", ".join(i.id for i in exact)
            raise UsageError(f"{name!r} names {len(exact)} stored images ({ids}); give an id")
        prefixed = [i for i in images if len(name) >= 4 and i.id.startswith(name)]
        if len(prefixed) == 1:
            return prefixed[0]
        raise NotFoundError(f"no stored image {name!r} (trustplane store ls)")

    def _load(self, path: Path) -> StoredImage:
        try:
            return StoredImage.model_validate(json.loads(path.read_bytes()))
        except (ValueError, ValidationError) as exc:
            raise MalformedError(f"{path}: not a layer-store record ({exc})") from None
