"""The KMS: secrets by reference, KEK rotation, KMS-held recipients, unwrap."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

SecretType = Literal["symmetric", "opaque", "private", "passphrase"]
RecipientKeyType = Literal["ec-p256", "ec-p384", "ec-p521", "rsa"]


class NewSecret(BaseModel):
    name: str | None = Field(None, max_length=256)
    secret_type: SecretType = "symmetric"  # noqa: S105 - a kind of secret
    payload: str | None = Field(None, description="Base64; omit to have an AES key generated")
    algorithm: str | None = Field(None, max_length=32)
    bit_length: int | None = Field(None, ge=8, le=8192)
    readers: list[str] = Field(default_factory=list, description="Subjects that may read it")


class SecretRef(BaseModel):
    secret_ref: str
    id: str


class SecretInfo(BaseModel):
    id: str
    secret_ref: str
    name: str | None
    secret_type: str
    algorithm: str | None
    bit_length: int | None
    creator: str
    created: datetime
    readers: list[str]


class KekRotated(BaseModel):
    kek_id: str = Field(description="The new current KEK")
    rewrapped: int = Field(description="Secrets whose data key was re-wrapped under it")
    retired: list[str] = Field(description="Old KEKs no secret needs any more, now forgotten")
    failed: list[str] = Field(description="Secrets that could not be re-wrapped (ids)")


class NewRecipient(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9._/-]{0,127}$")
    key_type: RecipientKeyType = "ec-p256"


class RecipientInfo(BaseModel):
    name: str
    key_id: str
    public_key: str


class UnwrapRequest(BaseModel):
    annotation: str = Field(
        max_length=1 << 20, description="The layer's org.opencontainers.image.enc.keys.jwe value"
    )
    transport_key: str = Field(max_length=16384, description="PEM public key to re-wrap to")


class UnwrapResponse(BaseModel):
    jwe: str = Field(description="The layer's private options, as a JWE to the transport key")
    repository: str
    layer: int
