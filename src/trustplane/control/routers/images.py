"""Image registration and lookup: the image inventory's API (control/image_inventory.py).

The layer-key broker reads a layer's real index (and so its tier) from
these records when it unwraps, never from the caller.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from trustplane.api.fields import DIGEST, REPOSITORY
from trustplane.api.images import ImageEntry, ImageFiles, ImageRecord, Registered
from trustplane.control.routers.deps import Caller, Plane

router = APIRouter(prefix="/v1", tags=["images"])


@router.post("/images", status_code=status.HTTP_201_CREATED, response_model=Registered)
def register_image(body: ImageRecord, caller: Caller, plane: Plane) -> Registered:
    """Record a published image (needs image.publish on image:REPOSITORY).

    The repository is stored under its canonical name (oci/reference.py), the
    name gateways and nodes look it up by and the policy names it by.
    """
    return Registered(log_index=plane.images.register(caller, body))


@router.get("/images", response_model=list[ImageEntry])
def list_images(
    caller: Caller,
    plane: Plane,
    repository: Annotated[str, Query(min_length=1, max_length=256, pattern=REPOSITORY)],
) -> list[ImageEntry]:
    """What is registered for REPOSITORY (needs image.pull on image:REPOSITORY).

    Edge gateways read it to authenticate an image before a pull or a start.
    Any spelling of a name finds what was registered under any other spelling
    of the same image (oci/reference.py's normaliser, as the gateway's).
    """
    return plane.images.images(caller, repository)


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
    return plane.images.files(caller, repository, manifest_digest)
