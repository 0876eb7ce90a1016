"""Tokens, users and nodes (`/v1/auth/*`, `/v1/users`, `/v1/nodes`)."""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import BaseModel, Field, model_validator

from trustplane.api.fields import NAME

JWT_BEARER: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
"""The RFC 7523 grant type nodes log in with (a signed assertion)."""


class TokenRequest(BaseModel):
    grant_type: Literal["password", "urn:ietf:params:oauth:grant-type:jwt-bearer"]
    username: str | None = Field(None, max_length=128)
    password: str | None = Field(None, max_length=1024)
    node: str | None = Field(None, max_length=128)
    assertion: str | None = Field(None, max_length=16384)
    scope: str | None = Field(None, description="Space-separated subset of the role's scopes")
    gateways: list[Annotated[str, Field(pattern=NAME)]] | None = Field(
        None,
        min_length=1,
        max_length=32,
        description="Edge gateways (registered node names) the token is valid on; "
        "a gateway refuses a token scoped to others",
    )


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth token type
    expires_in: int
    scope: str


class WhoAmI(BaseModel):
    """The caller behind a token, as the control plane vouches for it."""

    subject: str = Field(description="KIND:NAME, e.g. user:alice or node:edge-1")
    role: str
    scopes: list[str]
    gateways: list[str] | None = Field(
        None, description="The gateways the token is scoped to; null: not scoped"
    )
    token_id: str = Field("", description="The token's id (jti), which revocations name")
    issued_at: float = Field(0.0, description="When the token was issued (Unix seconds)")


class RevokeRequest(BaseModel):
    token: str | None = Field(None, max_length=16384, description="This token")
    subject: str | None = Field(
        None,
        pattern=r"^(user|node):[a-zA-Z0-9][a-zA-Z0-9._-]{0,127}$",
        description="Every token this principal was issued so far",
    )

    @model_validator(mode="after")
    def one(self) -> RevokeRequest:
        if (self.token is None) == (self.subject is None):
            raise ValueError("name exactly one of token and subject")
        return self


class Revoked(BaseModel):
    revoked: str
    epoch: int = Field(description="The revocation's id; gateways ask for those after theirs")


class Revocation(BaseModel):
    """One revoked token (`token_id`), or every token of `subject` issued at or
    before `issued_before`; listed until `expires`."""

    id: int
    subject: str
    token_id: str | None
    issued_before: float | None
    expires: float


class Revocations(BaseModel):
    epoch: int = Field(description="Ask for the revocations after this one next time")
    revocations: list[Revocation]


class NewUser(BaseModel):
    name: str = Field(pattern=NAME)
    role: Literal["admin", "operator", "user"]
    password: str | None = Field(None, min_length=12, max_length=1024)


class CreatedUser(BaseModel):
    name: str
    role: str
    password: str | None = Field(None, description="Only when the server generated it")


class NewNode(BaseModel):
    name: str = Field(pattern=NAME)
    kind: Literal["host", "gateway"]
    public_key: str = Field(max_length=16384, description="PEM; the node signs assertions with it")


class NodeInfo(BaseModel):
    name: str
    kind: str
    key_id: str
