"""File digests of registered layers: stored with the image, read by nodes.

They arrive with the image's registration (`POST /v1/images`, a `files` map
per layer) inside the same transaction, so a refused body leaves nothing
behind. A layer's map is stored once: the same map again is a no-op, a
different one is refused (reference values are never silently replaced).
The transparency log records a digest of each map, so an auditor can tell
which reference a node was measured against.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from sqlalchemy import select
from sqlalchemy.orm import Session

from trustplane.control.models import Image, LayerFiles
from trustplane.errors import IntegrityError, UsageError


def map_digest(files: Mapping[str, str]) -> str:
    """sha256 of the map as canonical JSON (sorted keys, no spaces)."""
    body = json.dumps(files, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()


def attach(session: Session, image: Image, files: Mapping[int, Mapping[str, str]]) -> None:
    """Store each layer's map, unless that same map is already there."""
    if not files:
        return
    layers = {int(str(layer["index"])): layer for layer in image.layers}
    stored = {
        row.layer_index: row
        for row in session.scalars(select(LayerFiles).where(LayerFiles.image_id == image.id))
    }
    for index, layer_files in sorted(files.items()):
        layer = layers.get(index)
        if layer is None:
            raise UsageError(f"{image.repository}: the image has no layer {index}")
        row = stored.get(index)
        if row is not None:
            if row.files != dict(layer_files):
                raise IntegrityError(
                    f"{image.repository}@{image.manifest_digest}: layer {index} already has "
                    "other file digests; reference values are not replaced"
                )
            continue
        diff_id = layer.get("diff_id")
        session.add(
            LayerFiles(
                image_id=image.id,
                layer_index=index,
                diff_id=str(diff_id) if diff_id is not None else None,
                file_count=len(layer_files),
                files=dict(layer_files),
            )
        )


def read(session: Session, image: Image) -> dict[int, dict[str, str]]:
    """Layer index -> file map, for the layers that have one."""
    rows = session.scalars(select(LayerFiles).where(LayerFiles.image_id == image.id))
    return {row.layer_index: dict(row.files) for row in rows}
