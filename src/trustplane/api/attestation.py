"""Remote attestation of nodes: enrolment, credential activation, nonce, quote.

Binary TPM structures travel as standard base64 (TPMT_PUBLIC, TPMS_ATTEST,
TPMT_SIGNATURE, TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET bodies).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

MAX_BASE64 = 1 << 16


class Enrollment(BaseModel):
    ek_public: str = Field(max_length=MAX_BASE64, description="TPMT_PUBLIC of the EK, base64")
    ek_certificate: str | None = Field(None, max_length=MAX_BASE64, description="DER, base64")
    ak_public: str = Field(max_length=MAX_BASE64, description="TPMT_PUBLIC of the AK, base64")
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
    quote: str = Field(max_length=MAX_BASE64, description="TPMS_ATTEST, base64")
    signature: str = Field(max_length=MAX_BASE64, description="TPMT_SIGNATURE, base64")
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
