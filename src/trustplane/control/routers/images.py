"""Image registration: which plain layer digests sit at which index.

The KMS reads a layer's real index (and so its tier) from this record
when it unwraps, never from the caller.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status
from sqlalchemy import select

from trustplane.api.fields import DIGEST, REPOSITORY
from trustplane.api.images import (
    ImageEntry,
    ImageFiles,
    ImageRecord,
    LayerFilesEntry,
    LayerRecord,
    Registered,
)
from trustplane.control import reference_files
from trustplane.control.models import Image
from trustplane.control.routers.deps import Caller, Plane
from trustplane.errors import Forbidden, NotFoundError

router = APIRouter(prefix="/v1", tags=["images"])


@router.post("/images", status_code=status.HTTP_201_CREATED, response_model=Registered)
def register_image(body: ImageRecord, caller: Caller, plane: Plane) -> Registered:
    """Record a published image (needs image.publish on image:REPOSITORY)."""
    index = plane.kms.register_image(
        caller,
        body.repository,
        body.manifest_digest,
        [layer.model_dump(exclude={"files"}) for layer in body.layers],
        {layer.index: layer.files for layer in body.layers if layer.files is not None},
    )
    return Registered(log_index=index)


@router.get("/images", response_model=list[ImageEntry])
def list_images(
    caller: Caller,
    plane: Plane,
    repository: Annotated[str, Query(min_length=1, max_length=256, pattern=REPOSITORY)],
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


@router.get("/images/files", response_model=ImageFiles)
def image_files(
    caller: Caller,
    plane: Plane,
    repository: Annotated[str, Query(min_length=1, max_length=256, pattern=REPOSITORY)],
    manifest_digest: Annotated[str, Query(pattern=DIGEST)],
) -> ImageFiles:
    """The file digests registered for one image (needs image.pull on image:REPOSITORY).

    Node agents read them to re-measure running containers (runtime integrity).
    """
    decision = plane.authorize(caller, "image.pull", f"image:{repository}")
    if not decision.allowed:
        raise Forbidden(f"policy refuses image.pull of {repository}: {decision.reason}")
    with plane.db.session() as session:
        row = session.scalar(
            select(Image).where(
                Image.repository == repository, Image.manifest_digest == manifest_digest
            )
        )
        if row is None:
            raise NotFoundError(f"{repository}@{manifest_digest} is not registered")
        files = reference_files.read(session, row)
        return ImageFiles(
            repository=row.repository,
            manifest_digest=row.manifest_digest,
            layers=[
                LayerFilesEntry(
                    index=int(str(layer["index"])),
                    digest=str(layer["digest"]),
                    diff_id=None if layer.get("diff_id") is None else str(layer["diff_id"]),
                    files=files.get(int(str(layer["index"]))),
                )
                for layer in row.layers
            ],
        )
