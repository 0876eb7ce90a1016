"""The block-storage service's API (control/volumes.py): volume types, volumes, attach."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status
from fastapi.responses import JSONResponse

from trustplane.api.volumes import (
    DOMAIN_NAME,
    VOLUME_NAME,
    AttachRequest,
    CloneRequest,
    EncryptRequest,
    ExtendRequest,
    NewVolume,
    NewVolumeType,
    OnlineExtendResult,
    VolumeInfo,
    VolumeKeyRelease,
    VolumeOperationInfo,
    VolumeTypeInfo,
    VolumeVerification,
)
from trustplane.control import volume_extend
from trustplane.control.routers.deps import Caller, Plane
from trustplane.volumes.verification import DEFAULT_SAMPLES, MAX_SAMPLES

router = APIRouter(prefix="/v1", tags=["volumes"])
VolumeName = Annotated[str, Path(pattern=VOLUME_NAME)]


@router.post("/volume-types", status_code=status.HTTP_201_CREATED, response_model=VolumeTypeInfo)
def create_volume_type(body: NewVolumeType, caller: Caller, plane: Plane) -> VolumeTypeInfo:
    """A volume type: a configured backend and its encryption (volume.type.create)."""
    return plane.volumes.create_type(caller, body)


@router.get("/volume-types", response_model=list[VolumeTypeInfo])
def list_volume_types(caller: Caller, plane: Plane) -> list[VolumeTypeInfo]:
    return plane.volumes.types(caller)


@router.post("/volumes", status_code=status.HTTP_201_CREATED, response_model=VolumeInfo)
def create_volume(body: NewVolume, caller: Caller, plane: Plane) -> VolumeInfo:
    """Create an encrypted volume: the KMS generates its key, the record keeps its UUID."""
    return plane.volumes.create(caller, body)


@router.get("/volumes", response_model=list[VolumeInfo])
def list_volumes(caller: Caller, plane: Plane) -> list[VolumeInfo]:
    """The volumes the caller owns or may attach (administrators: all)."""
    return plane.volumes.volumes(caller)


@router.get("/volumes/{name}", response_model=VolumeInfo)
def show_volume(name: VolumeName, caller: Caller, plane: Plane) -> VolumeInfo:
    return plane.volumes.show(caller, name)


@router.delete("/volumes/{name}", status_code=status.HTTP_204_NO_CONTENT)
def delete_volume(name: VolumeName, caller: Caller, plane: Plane) -> Response:
    """Crypto-shred the volume's key, then destroy its storage."""
    plane.volumes.delete(caller, name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/volumes/{name}/attachment", response_model=VolumeKeyRelease)
def attach_volume(
    name: VolumeName, body: AttachRequest, caller: Caller, plane: Plane
) -> VolumeKeyRelease | Response:
    """Release the volume's key for an attach to `domain` (volume.attach; logged),
    wrapped to `transport_key` when one is sent (nodes must)."""
    release = plane.volumes.release(caller, name, body.domain, body.transport_key)
    if release.jwe is not None:  # no raw-key field at all in a wrapped answer
        return JSONResponse(release.model_dump(mode="json", exclude={"key"}))
    return release


@router.delete("/volumes/{name}/attachment", response_model=VolumeInfo)
def detach_volume(
    name: VolumeName,
    domain: Annotated[str, Query(pattern=DOMAIN_NAME)],
    caller: Caller,
    plane: Plane,
) -> VolumeInfo:
    """Clear the volume's attachment to `domain` (after the host detached it)."""
    return plane.volumes.detach(caller, name, domain)


@router.get("/volumes/{name}/verification", response_model=VolumeVerification)
def verify_volume(
    name: VolumeName,
    caller: Caller,
    plane: Plane,
    samples: Annotated[int, Query(ge=1, le=MAX_SAMPLES)] = DEFAULT_SAMPLES,
) -> VolumeVerification:
    """Read the raw storage: LUKS header, its UUID and digest against the record, the
    type's cipher, sampled payload sectors not plaintext-like (owner or admin; logged).
    A failed check is in the answer (`passed` false), not an error status."""
    return plane.volumes.verify(caller, name, samples)


@router.post("/volumes/{name}/size", response_model=VolumeInfo)
def extend_volume(
    name: VolumeName, body: ExtendRequest, caller: Caller, plane: Plane
) -> VolumeInfo:
    """Grow a detached volume to `size` usable bytes (owner or admin, volume.create); with
    `domain`, start the online extend of the volume the caller holds attached there."""
    if body.domain is not None:
        return volume_extend.start(plane.volumes, caller, name, body.size, body.domain)
    return plane.volumes.extend(caller, name, body.size)


@router.post("/volumes/{name}/size/online", response_model=VolumeInfo)
def finish_online_extend(
    name: VolumeName, body: OnlineExtendResult, caller: Caller, plane: Plane
) -> VolumeInfo:
    """The host's outcome of an online extend's block resize (the attachment's holder)."""
    return volume_extend.finish(plane.volumes, caller, name, body)


@router.post("/volumes/{name}/key-rotation", response_model=VolumeInfo)
def rotate_volume_key(name: VolumeName, caller: Caller, plane: Plane) -> VolumeInfo:
    """A new KMS key for a detached volume's key slot; the old key is destroyed (owner or
    admin; the master key and the data stay)."""
    return plane.volumes.rotate(caller, name)


@router.post("/volumes/{name}/reencryption", response_model=VolumeInfo)
def reencrypt_volume(name: VolumeName, caller: Caller, plane: Plane) -> VolumeInfo:
    """Re-encrypt a detached volume under a new master key and a new KMS key: its data
    copied into new storage, then the old storage and the old key destroyed (owner or
    admin; resumes one a crash interrupted). Answers when it is done."""
    return plane.volumes.reencryption.start(caller, name)


@router.get("/volumes/{name}/reencryption", response_model=VolumeOperationInfo)
def reencryption_progress(name: VolumeName, caller: Caller, plane: Plane) -> VolumeOperationInfo:
    """The re-encryption running on the volume: its phase and the bytes copied and flushed
    to the new storage (404 when none runs)."""
    return plane.volumes.reencryption.status(caller, name)


@router.post(
    "/volumes/{name}/clones", status_code=status.HTTP_201_CREATED, response_model=VolumeInfo
)
def clone_volume(name: VolumeName, body: CloneRequest, caller: Caller, plane: Plane) -> VolumeInfo:
    """A copy of the detached volume under a fresh KMS key and master key of its own
    (owner or admin, volume.create on the new name; logged volume.clone)."""
    return plane.volumes.copies.clone(caller, name, body, snapshot=body.snapshot)


@router.get("/volumes/{name}/copy", response_model=VolumeOperationInfo)
def volume_copy_progress(name: VolumeName, caller: Caller, plane: Plane) -> VolumeOperationInfo:
    """How far the clone or encryption that makes volume `name` is (404 when none runs)."""
    return plane.volumes.copies.progress(caller, name)


@router.post("/volume-encryptions", status_code=status.HTTP_201_CREATED, response_model=VolumeInfo)
def encrypt_volume(body: EncryptRequest, caller: Caller, plane: Plane) -> VolumeInfo:
    """Plaintext storage on a backend becomes an encrypted volume; the plaintext storage
    is destroyed after the copy (admins; logged volume.encrypt)."""
    return plane.volumes.copies.encrypt(caller, body)
