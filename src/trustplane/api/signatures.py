"""Image signatures in the transparency log (`/v1/signatures`)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from trustplane.api.fields import DIGEST


class SignatureRecord(BaseModel):
    repository: str = Field(min_length=1, max_length=256, description="HOST/REPO of the image")
    manifest_digest: str = Field(pattern=DIGEST)
    payload: str = Field(max_length=1 << 20, description="Base64 simple-signing payload")
    signature: str = Field(max_length=16384, description="Base64 signature over the payload")
    public_key: str = Field(max_length=16384, description="PEM public key of the signer")


class SignatureLogged(BaseModel):
    log_index: int
    key_id: str


class SignatureEntry(BaseModel):
    repository: str
    manifest_digest: str
    key_id: str
    payload: str | None = Field(
        description="Base64 payload (None in entries logged before it was kept)"
    )
    signature: str | None = Field(description="Base64 signature (None in older entries)")
    subject: str
    log_index: int
