"""The transparency log: checkpoints, entries and proofs.

The checkpoint and the log's public key are public, so that anyone can
witness the log; entries and proofs need a token (they name subjects).
"""

from __future__ import annotations

import base64
import json

from fastapi import APIRouter, Path, Query, Response
from fastapi.responses import StreamingResponse

from trustplane.api.log import ConsistencyProof, InclusionProof, LogEntry, LogKey
from trustplane.control.routers.deps import Caller, Plane
from trustplane.errors import Forbidden

router = APIRouter(prefix="/v1/log", tags=["log"])


@router.get(
    "/checkpoint", response_class=Response, responses={200: {"content": {"text/plain": {}}}}
)
def checkpoint(plane: Plane) -> Response:
    """The signed checkpoint (C2SP signed note) of the current tree."""
    return Response(plane.log.checkpoint(), media_type="text/plain; charset=utf-8")


@router.get("/key", response_model=LogKey)
def key(plane: Plane) -> LogKey:
    """The note verifier key (`name+hash+base64`) to pin for `trustplane log verify`."""
    return LogKey(origin=plane.log.origin, verifier_key=plane.log.signer.verifier_key())


@router.get(
    "/entries",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def entries(
    caller: Caller,
    plane: Plane,
    start: int = Query(ge=0, le=2**63 - 1),
    end: int = Query(ge=1, le=2**63 - 1),
) -> StreamingResponse:
    """Entries [start, end), streamed for monitors, in chunks: the number of
    entries n (4 bytes, big-endian), n lengths (4 bytes each), then the n
    entries' exact bytes back to back. An answer that ends early means the
    log has no entry where it ends."""
    _may_read(plane, caller)
    frames = plane.log.entries(start, end)
    return StreamingResponse(frames, media_type="application/octet-stream")


@router.get("/entries/{index}", response_model=LogEntry)
def entry(caller: Caller, plane: Plane, index: int = Path(ge=0, le=2**63 - 1)) -> LogEntry:
    _may_read(plane, caller)
    body = plane.log.entry(index)
    return LogEntry(index=index, body=base64.b64encode(body).decode(), entry=json.loads(body))


@router.get("/proof/inclusion", response_model=InclusionProof)
def inclusion(
    caller: Caller, plane: Plane, index: int = Query(ge=0), size: int = Query(ge=1)
) -> InclusionProof:
    _may_read(plane, caller)
    proof = plane.log.inclusion_proof(index, size)
    return InclusionProof(
        index=index, size=size, proof=[base64.b64encode(h).decode() for h in proof]
    )


@router.get("/proof/consistency", response_model=ConsistencyProof)
def consistency(
    caller: Caller, plane: Plane, old: int = Query(ge=1), new: int = Query(ge=1)
) -> ConsistencyProof:
    _may_read(plane, caller)
    proof = plane.log.consistency_proof(old, new)
    return ConsistencyProof(old=old, new=new, proof=[base64.b64encode(h).decode() for h in proof])


def _may_read(plane: Plane, caller: Caller) -> None:
    decision = plane.authorize(caller, "log.read", "log:*")
    if not decision.allowed:
        raise Forbidden(f"policy refuses log.read: {decision.reason}")
