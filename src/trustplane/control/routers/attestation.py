"""Remote attestation of nodes: enrolment, credential activation, nonce, quote.

Binary TPM structures travel as standard base64 (TPMT_PUBLIC, TPMS_ATTEST,
TPMT_SIGNATURE, TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET bodies).
"""

from __future__ import annotations

import base64

import anyio.to_thread
from fastapi import APIRouter, Path

from trustplane.api.attestation import (
    Activated,
    Activation,
    Challenge,
    ClearAnswer,
    ClearRequest,
    Enrollment,
    NonceResponse,
    QuoteRequest,
    QuoteVerdict,
)
from trustplane.api.fields import NAME
from trustplane.control.routers.deps import Caller, Plane
from trustplane.errors import Forbidden, MalformedError

router = APIRouter(prefix="/v1/attestation", tags=["attestation"])


def _bytes(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise MalformedError(f"{what} is not base64") from None


@router.post("/enroll", response_model=Challenge)
async def enroll(body: Enrollment, caller: Caller, plane: Plane) -> Challenge:
    """A node registers its EK and AK; the answer is a credential only its TPM opens."""
    cert = _bytes(body.ek_certificate, "ek_certificate") if body.ek_certificate else None
    credential = await anyio.to_thread.run_sync(
        plane.verifier.enroll,
        caller,
        _bytes(body.ek_public, "ek_public"),
        cert,
        _bytes(body.ak_public, "ak_public"),
        _bytes(body.ak_name, "ak_name"),
    )
    return Challenge(
        credential_blob=base64.b64encode(credential.blob).decode(),
        encrypted_secret=base64.b64encode(credential.secret).decode(),
    )


@router.post("/activate", response_model=Activated)
async def activate(body: Activation, caller: Caller, plane: Plane) -> Activated:
    """The node proves its TPM recovered the credential: its AK is bound to its EK."""
    await anyio.to_thread.run_sync(
        plane.verifier.activate,
        caller,
        _bytes(body.secret, "secret"),
        body.transport_key,
        _bytes(body.transport_signature, "transport_signature"),
    )
    return Activated(bound=True)


@router.get("/nonce", response_model=NonceResponse)
async def nonce(caller: Caller, plane: Plane) -> NonceResponse:
    """A fresh single-use nonce for the caller's next quote."""
    value = await anyio.to_thread.run_sync(plane.verifier.nonce, caller)
    settings = plane.verifier.settings
    return NonceResponse(
        nonce=value.hex(),
        interval_seconds=settings.interval_seconds,
        max_age_seconds=settings.max_age_seconds,
    )


@router.post("/quote", response_model=QuoteVerdict)
async def quote(body: QuoteRequest, caller: Caller, plane: Plane) -> QuoteVerdict:
    """Verify a quote and its event log; the verdict is the node's attested state."""
    result = await anyio.to_thread.run_sync(
        plane.verifier.quote,
        caller,
        bytes.fromhex(body.nonce),
        _bytes(body.quote, "quote"),
        _bytes(body.signature, "signature"),
        body.event_log,
    )
    return QuoteVerdict(
        passed=result.passed,
        reason=result.reason,
        measured=result.measured,
        quarantined=result.quarantined,
    )


@router.post("/nodes/{name}/clear", response_model=ClearAnswer)
async def clear(
    body: ClearRequest,
    caller: Caller,
    plane: Plane,
    name: str = Path(pattern=NAME),
) -> ClearAnswer:
    """An administrator lifts a node's quarantine (logged, with the reason)."""
    decision = plane.authorize(caller, "node.clear", f"node:{name}")
    if not decision.allowed:
        raise Forbidden(f"{caller.subject} may not node.clear node:{name}: {decision.reason}")
    cleared = await anyio.to_thread.run_sync(plane.verifier.clear, caller, name, body.reason)
    return ClearAnswer(
        node=cleared.node,
        quarantine=cleared.reason,
        reviewed_events=cleared.reviewed,
        log_index=cleared.log_index,
    )
