"""Image signatures for the transparency log.

The publisher sends what it signed: the simple-signing payload, the
signature and its public key. The control plane checks that the signature
verifies and that the payload names the manifest digest given, then logs a
`signature` entry (image, manifest digest, key id, payload and signature
digests) and returns its index. `image verify --require-log` later proves
that entry is in the signed tree.
"""

from __future__ import annotations

import base64
import binascii
import json

from fastapi import APIRouter, status
from pydantic import BaseModel, Field

from trustplane.control.routers.deps import Caller, Plane
from trustplane.control.routers.images import DIGEST
from trustplane.crypto.signing import load_verify_key
from trustplane.errors import (
    Forbidden,
    IntegrityError,
    MalformedError,
    UnsupportedError,
    UsageError,
)
from trustplane.oci.model import sha256_digest

router = APIRouter(prefix="/v1", tags=["signatures"])


class SignatureRecord(BaseModel):
    repository: str = Field(min_length=1, max_length=256, description="HOST/REPO of the image")
    manifest_digest: str = Field(pattern=DIGEST)
    payload: str = Field(max_length=1 << 20, description="Base64 simple-signing payload")
    signature: str = Field(max_length=16384, description="Base64 signature over the payload")
    public_key: str = Field(max_length=16384, description="PEM public key of the signer")


class Logged(BaseModel):
    log_index: int
    key_id: str


@router.post("/signatures", status_code=status.HTTP_201_CREATED, response_model=Logged)
def record_signature(body: SignatureRecord, caller: Caller, plane: Plane) -> Logged:
    """Log a verified image signature (needs image.publish on image:REPOSITORY)."""
    decision = plane.authorize(caller, "image.publish", f"image:{body.repository}")
    if not decision.allowed:
        raise Forbidden(f"policy refuses image.publish of {body.repository}: {decision.reason}")
    try:
        payload = base64.b64decode(body.payload, validate=True)
        signature = base64.b64decode(body.signature, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedError("payload and signature must be base64") from None
    try:
        key = load_verify_key(body.public_key.encode(), "the public key")
    except UnsupportedError as exc:
        raise UsageError(str(exc)) from None
    key.verify(payload, signature)
    try:
        named = json.loads(payload)["critical"]["image"]["docker-manifest-digest"]
    except (ValueError, KeyError, TypeError):
        raise MalformedError("the payload is not a simple-signing document") from None
    if named != body.manifest_digest:
        raise IntegrityError(f"the payload signs {named}, not {body.manifest_digest}")
    receipt = plane.log.append(
        "signature",
        {
            "subject": caller.subject,
            "image": body.repository,
            "manifest": body.manifest_digest,
            "key_id": key.key_id,
            "payload": sha256_digest(payload),
            "signature": sha256_digest(signature),
        },
    )
    return Logged(log_index=receipt.index, key_id=key.key_id)
