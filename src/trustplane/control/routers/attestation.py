"""Remote attestation of nodes: enrolment, credential activation, nonce, quote.

Binary TPM structures travel as standard base64 (TPMT_PUBLIC, TPMS_ATTEST,
TPMT_SIGNATURE, TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET bodies).
"""

from __future__ import annotations

import base64
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from trustplane.control.routers.deps import Caller, Plane
from trustplane.control.routers.principals import NAME
from trustplane.errors import Forbidden, MalformedError

router = APIRouter(prefix="/v1/attestation", tags=["attestation"])
_B64 = 1 << 16


def _bytes(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise MalformedError(f"{what} is not base64") from None


class Enrollment(BaseModel):
    ek_public: str = Field(max_length=_B64, description="TPMT_PUBLIC of the EK, base64")
    ek_certificate: str | None = Field(None, max_length=_B64, description="DER, base64")
    ak_public: str = Field(max_length=_B64, description="TPMT_PUBLIC of the AK, base64")
    ak_name: str = Field(max_length=1024, description="TPM2B_NAME body of the AK, base64")


class Challenge(BaseModel):
    credential_blob: str = Field(description="TPM2B_ID_OBJECT body, base64")
    encrypted_secret: str = Field(description="TPM2B_ENCRYPTED_SECRET body, base64")


class Activation(BaseModel):
    secret: str = Field(max_length=1024, description="The credential ActivateCredential gave")
    transport_key: str = Field(max_length=16384, description="PEM public key for unwrap")
    transport_signature: str = Field(
        max_length=4096, description="TPMT_SIGNATURE by the AK over the PEM's bytes, base64"
    )


class Activated(BaseModel):
    bound: bool


class NonceResponse(BaseModel):
    nonce: str = Field(description="32 bytes, hex; put it in the quote's qualifying data")
    interval_seconds: int = Field(
        description="Quote at least this often: a pass older than max_age_seconds goes stale"
    )
    max_age_seconds: int


class QuoteRequest(BaseModel):
    nonce: str = Field(pattern=r"^[0-9a-f]{64}$")
    quote: str = Field(max_length=_B64, description="TPMS_ATTEST, base64")
    signature: str = Field(max_length=_B64, description="TPMT_SIGNATURE, base64")
    event_log: list[dict[str, Any]] = Field(max_length=100_000)


class QuoteVerdict(BaseModel):
    passed: bool
    reason: str
    measured: int
    quarantined: bool = Field(
        False, description="The node gets no keys until an administrator clears it"
    )


class ClearRequest(BaseModel):
    reason: str = Field(min_length=3, max_length=2000, description="Why, for the log")


class ClearAnswer(BaseModel):
    node: str
    quarantine: str = Field(description="Why the node had been quarantined")
    reviewed_events: int = Field(
        description="Events of the node's current boot the clear covers (not checked again)"
    )
    log_index: int


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
