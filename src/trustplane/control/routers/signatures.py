"""Image signatures for the transparency log.

The publisher sends what it signed: the simple-signing payload, the
signature and its public key. The control plane checks that the signature
verifies and that the payload names the manifest digest given, then logs a
`signature` entry (image, manifest digest, key id, payload and signature
digests, and the payload and signature themselves) and returns its index.
`image verify --require-log` later proves that entry is in the signed tree.

`GET /v1/signatures` reads those entries back: edge gateways check them
against the keys they trust before a pull or a start. The log is where
signatures live (no table of their own), so the read scans the log's
`signature` leaves (an indexed kind), which are few next to decisions.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, status
from sqlalchemy import select

from trustplane.api.fields import DIGEST, REPOSITORY
from trustplane.api.signatures import SignatureEntry, SignatureLogged, SignatureRecord
from trustplane.control.models import LogLeaf
from trustplane.control.routers.deps import Caller, Plane
from trustplane.crypto.signing import load_verify_key
from trustplane.errors import (
    Forbidden,
    IntegrityError,
    MalformedError,
    UnsupportedError,
    UsageError,
)
from trustplane.oci.model import sha256_digest
from trustplane.oci.reference import repository_name, same_repository

router = APIRouter(prefix="/v1", tags=["signatures"])


@router.post("/signatures", status_code=status.HTTP_201_CREATED, response_model=SignatureLogged)
def record_signature(body: SignatureRecord, caller: Caller, plane: Plane) -> SignatureLogged:
    """Log a verified image signature (needs image.publish on image:REPOSITORY)."""
    repository = repository_name(body.repository)
    decision = plane.authorize(caller, "image.publish", f"image:{repository}")
    if not decision.allowed:
        raise Forbidden(f"policy refuses image.publish of {repository}: {decision.reason}")
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
            "image": repository,
            "manifest": body.manifest_digest,
            "key_id": key.key_id,
            "payload": sha256_digest(payload),
            "signature": sha256_digest(signature),
            "signed_payload": body.payload,
            "signature_value": body.signature,
        },
    )
    return SignatureLogged(log_index=receipt.index, key_id=key.key_id)


@router.get("/signatures", response_model=list[SignatureEntry])
def list_signatures(
    caller: Caller,
    plane: Plane,
    repository: Annotated[str, Query(min_length=1, max_length=256, pattern=REPOSITORY)],
    digest: Annotated[str | None, Query(pattern=DIGEST)] = None,
) -> list[SignatureEntry]:
    """The logged signatures of REPOSITORY[@DIGEST] (needs image.pull on image:REPOSITORY).

    Names compare canonically (oci/reference.py), entries logged under another
    spelling of the same image included.
    """
    repository = repository_name(repository)
    decision = plane.authorize(caller, "image.pull", f"image:{repository}")
    if not decision.allowed:
        raise Forbidden(f"policy refuses image.pull of {repository}: {decision.reason}")
    with plane.db.session() as session:
        rows = session.execute(
            select(LogLeaf.index, LogLeaf.body)
            .where(LogLeaf.kind == "signature")
            .order_by(LogLeaf.index)
        ).all()
    found: list[SignatureEntry] = []
    for index, raw in rows:
        entry = _entry(bytes(raw))
        if entry is None or not same_repository(str(entry.get("image", "")), repository):
            continue
        if digest is not None and entry.get("manifest") != digest:
            continue
        found.append(
            SignatureEntry(
                repository=repository,
                manifest_digest=str(entry.get("manifest", "")),
                key_id=str(entry.get("key_id", "")),
                payload=_text(entry.get("signed_payload")),
                signature=_text(entry.get("signature_value")),
                subject=str(entry.get("subject", "")),
                log_index=int(index),
            )
        )
    return found


def _entry(body: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(body)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
