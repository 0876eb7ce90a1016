"""Image registration: which plain layer digests sit at which index.

The KMS reads a layer's real index (and so its tier) from this record
when it unwraps, never from the caller.
"""

from __future__ import annotations

from fastapi import APIRouter, status
from pydantic import BaseModel, Field

from trustplane.control.routers.deps import Caller, Plane

router = APIRouter(prefix="/v1", tags=["images"])
DIGEST = r"^sha(256:[a-f0-9]{64}|512:[a-f0-9]{128})$"


class LayerRecord(BaseModel):
    index: int = Field(ge=0)
    digest: str = Field(pattern=DIGEST, description="Digest of the plain (unencrypted) blob")
    encrypted: bool
    diff_id: str | None = Field(None, pattern=DIGEST)


class ImageRecord(BaseModel):
    repository: str = Field(min_length=1, max_length=256)
    manifest_digest: str = Field(pattern=DIGEST)
    layers: list[LayerRecord] = Field(max_length=1024)


class Registered(BaseModel):
    log_index: int


@router.post("/images", status_code=status.HTTP_201_CREATED, response_model=Registered)
def register_image(body: ImageRecord, caller: Caller, plane: Plane) -> Registered:
    """Record a published image (needs image.publish on image:REPOSITORY)."""
    index = plane.kms.register_image(
        caller, body.repository, body.manifest_digest, [layer.model_dump() for layer in body.layers]
    )
    return Registered(log_index=index)
