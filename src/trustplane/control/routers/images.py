"""Image registration: which plain layer digests sit at which index.

The KMS reads a layer's real index (and so its tier) from this record
when it unwraps, never from the caller.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import select

from trustplane.control import reference_files
from trustplane.control.models import Image
from trustplane.control.routers.deps import Caller, Plane
from trustplane.errors import Forbidden, NotFoundError
from trustplane.trust.file_digests import VALUE, is_reference_path

router = APIRouter(prefix="/v1", tags=["images"])
DIGEST = r"^sha(256:[a-f0-9]{64}|512:[a-f0-9]{128})$"
MAX_FILES = 500_000
"""Files per layer a registration may describe (a full distribution has ~100k)."""


class LayerRecord(BaseModel):
    index: int = Field(ge=0, le=2**31 - 1)
    digest: str = Field(pattern=DIGEST, description="Digest of the plain (unencrypted) blob")
    encrypted: bool
    diff_id: str | None = Field(None, pattern=DIGEST)


class PublishedLayer(LayerRecord):
    files: dict[str, str] | None = Field(
        None,
        max_length=MAX_FILES,
        description="Runtime-integrity reference: absolute path -> sha256:HEX, "
        "symlink:TARGET, whiteout, fifo, char:MAJ:MIN or block:MAJ:MIN",
    )

    @field_validator("files")
    @classmethod
    def reference_map(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for path, item in (value or {}).items():
            if not is_reference_path(path):
                raise ValueError(f"file path {path[:100]!r} is not absolute and normal")
            if not VALUE.fullmatch(item):
                raise ValueError(f"file {path[:100]!r} has an unknown reference value")
        return value


class ImageRecord(BaseModel):
    repository: str = Field(min_length=1, max_length=256)
    manifest_digest: str = Field(pattern=DIGEST)
    layers: list[PublishedLayer] = Field(max_length=1024)

    @field_validator("layers")
    @classmethod
    def distinct(cls, value: list[PublishedLayer]) -> list[PublishedLayer]:
        if len({layer.index for layer in value}) != len(value):
            raise ValueError("layer indexes must be distinct")
        return value


class Registered(BaseModel):
    log_index: int


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


class LayerFilesEntry(BaseModel):
    index: int
    digest: str
    diff_id: str | None
    files: dict[str, str] | None
    """None: no file digests were registered for this layer."""


class ImageFiles(BaseModel):
    repository: str
    manifest_digest: str
    layers: list[LayerFilesEntry]


@router.get("/images/files", response_model=ImageFiles)
def image_files(
    caller: Caller,
    plane: Plane,
    repository: Annotated[str, Query(min_length=1, max_length=256, pattern=r"^[!-~]+$")],
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
