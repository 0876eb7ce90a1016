"""The KMS API: secrets by reference, KMS-held image recipients, unwrap."""

from __future__ import annotations

import base64
import re

from fastapi import APIRouter, Response, status

from trustplane.api.fields import UUID
from trustplane.api.kms import (
    KekRotated,
    NewRecipient,
    NewSecret,
    RecipientInfo,
    SecretInfo,
    SecretRef,
    UnwrapRequest,
    UnwrapResponse,
)
from trustplane.control.routers.deps import Caller, Plane
from trustplane.errors import Forbidden, UsageError
from trustplane.keys.secret_store import SecretRecord

router = APIRouter(prefix="/v1", tags=["kms"])


@router.post("/secrets", status_code=status.HTTP_201_CREATED, response_model=SecretRef)
def create_secret(body: NewSecret, caller: Caller, plane: Plane) -> SecretRef:
    """Store a secret (or generate a key); the answer is its reference."""
    decision = plane.authorize(caller, "secret.create", "secret:*")
    if not decision.allowed:
        raise Forbidden(f"policy refuses secret.create: {decision.reason}")
    payload = None
    if body.payload is not None:
        try:
            payload = base64.b64decode(body.payload, validate=True)
        except ValueError:  # binascii.Error, or non-ASCII characters
            raise UsageError("payload must be base64") from None
    meta = plane.secrets.create(
        caller,
        name=body.name,
        secret_type=body.secret_type,
        payload=payload,
        algorithm=body.algorithm,
        bit_length=body.bit_length,
        readers=body.readers,
    )
    return SecretRef(secret_ref=_ref(plane, meta.id), id=meta.id)


@router.get("/secrets/{secret_id}", response_model=SecretInfo)
def secret_metadata(secret_id: str, caller: Caller, plane: Plane) -> SecretInfo:
    _check_id(secret_id)
    return _info(plane, plane.secrets.metadata(caller, secret_id))


@router.get(
    "/secrets/{secret_id}/payload",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def secret_payload(secret_id: str, caller: Caller, plane: Plane) -> Response:
    """The payload, to principals both the ACL and the policy allow."""
    _check_id(secret_id)
    payload = await plane.secrets.payload_async(caller, secret_id)
    return Response(payload, media_type="application/octet-stream")


@router.delete("/secrets/{secret_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_secret(secret_id: str, caller: Caller, plane: Plane) -> Response:
    _check_id(secret_id)
    plane.secrets.delete(caller, secret_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/kek/rotate", response_model=KekRotated)
def rotate_kek(caller: Caller, plane: Plane) -> KekRotated:
    """A new KEK; every secret re-wrapped online."""
    decision = plane.authorize(caller, "kek.rotate", "kek:*")
    if not decision.allowed:
        raise Forbidden(f"policy refuses kek.rotate: {decision.reason}")
    rotation = plane.secrets.rotate_kek(caller)
    return KekRotated(
        kek_id=rotation.kek_id,
        rewrapped=rotation.rewrapped,
        retired=rotation.retired,
        failed=rotation.failed,
    )


@router.post("/recipients", status_code=status.HTTP_201_CREATED, response_model=RecipientInfo)
def create_recipient(body: NewRecipient, caller: Caller, plane: Plane) -> RecipientInfo:
    """A recipient key pair whose private key never leaves the KMS."""
    decision = plane.authorize(caller, "recipient.create", f"recipient:{body.name}")
    if not decision.allowed:
        raise Forbidden(f"policy refuses recipient.create: {decision.reason}")
    row = plane.broker.create_recipient(caller, body.name, body.key_type)
    return RecipientInfo(name=row.name, key_id=row.key_id, public_key=row.public_key)


@router.get("/recipients/{name}", response_model=RecipientInfo)
def recipient(name: str, caller: Caller, plane: Plane) -> RecipientInfo:
    """The public key encryptors use for `--recipient kms:NAME`."""
    row = plane.broker.recipient(name)
    return RecipientInfo(name=row.name, key_id=row.key_id, public_key=row.public_key)


@router.post("/unwrap", response_model=UnwrapResponse)
async def unwrap(body: UnwrapRequest, caller: Caller, plane: Plane) -> UnwrapResponse:
    """A layer's key options for an authorized caller, re-wrapped to its transport key."""
    return await plane.broker.unwrap_async(caller, body.annotation, body.transport_key)


def _ref(plane: Plane, secret_id: str) -> str:
    return f"{plane.settings.url}/v1/secrets/{secret_id}"


def _info(plane: Plane, meta: SecretRecord) -> SecretInfo:
    return SecretInfo(
        id=meta.id,
        secret_ref=_ref(plane, meta.id),
        name=meta.name,
        secret_type=meta.secret_type,
        algorithm=meta.algorithm,
        bit_length=meta.bit_length,
        creator=meta.creator,
        created=meta.created,
        readers=list(meta.readers),
    )


def _check_id(secret_id: str) -> None:
    if not re.fullmatch(UUID, secret_id):
        raise UsageError("a secret id is a UUID")
