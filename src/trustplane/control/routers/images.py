"""Image registration: which plain layer digests sit at which index.

The KMS reads a layer's real index (and so its tier) from this record
when it unwraps, never from the caller.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status
from pydantic import BaseModel, Field
from sqlalchemy import select

from trustplane.control.models import Image
from trustplane.control.routers.deps import Caller, Plane
from trustplane.errors import Forbidden

router = APIRouter(prefix="/v1", tags=["images"])
DIGEST = r"^sha(256:[a-f0-9]{64}|512:[a-f0-9]{128})$"


class LayerRecord(BaseModel):
    index: int = Field(ge=0, le=2**31 - 1)
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


class ImageEntry(BaseModel):
    repository: str
    manifest_digest: str
    layers: list[LayerRecord]
    publisher: str


@router.get("/images", response_model=list[ImageEntry])
def list_images(
    caller: Caller,
    plane: Plane,
    repository: Annotated[str, Query(min_length=1, max_length=256, pattern=r"^[!-~]+$")],
) -> list[ImageEntry]:
    """What is registered for REPOSITORY (needs image.pull on image:REPOSITORY).

    Edge gateways read it to authenticate an image before a pull or a start.
    """
    decision = plane.authorize(caller, "image.pull", f"image:{repository}")
    if not decision.allowed:
        raise Forbidden(f"policy refuses image.pull of {repository}: {decision.reason}")
    with plane.db.session() as session:
        rows = session.scalars(
            select(Image).where(Image.repository == repository).order_by(Image.id)
        ).all()
        return [
            ImageEntry(
                repository=row.repository,
                manifest_digest=row.manifest_digest,
                layers=[LayerRecord.model_validate(layer) for layer in row.layers],
                publisher=row.publisher,
            )
            for row in rows
        ]
