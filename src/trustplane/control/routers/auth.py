"""Tokens: users by password, nodes by a signed assertion (RFC 7523)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy import select

from trustplane.control.identity import (
    USER_ROLES,
    Principal,
    check_password,
    verify_node_assertion,
)
from trustplane.control.models import Node, User
from trustplane.control.routers.deps import Caller, Plane
from trustplane.errors import AuthError

router = APIRouter(prefix="/v1/auth", tags=["identity"])
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SCOPES = frozenset({"kms", "authorize", "images", "log", "admin"})


class TokenRequest(BaseModel):
    grant_type: Literal["password", "urn:ietf:params:oauth:grant-type:jwt-bearer"]
    username: str | None = Field(None, max_length=128)
    password: str | None = Field(None, max_length=1024)
    node: str | None = Field(None, max_length=128)
    assertion: str | None = Field(None, max_length=16384)
    scope: str | None = Field(None, description="Space-separated subset of the role's scopes")


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth token type
    expires_in: int
    scope: str


@router.post("/token", response_model=TokenResponse)
def token(request: TokenRequest, plane: Plane) -> TokenResponse:
    """Exchange a password (users) or a signed assertion (nodes) for a token."""
    if request.grant_type == "password":
        principal = _user(plane, request.username, request.password)
    else:
        principal = _node(plane, request.node, request.assertion)
    if request.scope:
        wanted = frozenset(request.scope.split())
        if not wanted <= principal.scopes:
            raise AuthError(f"scopes {sorted(wanted - principal.scopes)} are not granted")
        principal = Principal(principal.kind, principal.name, principal.role, wanted)
    value, ttl = plane.tokens.issue(principal)
    return TokenResponse(
        access_token=value, expires_in=ttl, scope=" ".join(sorted(principal.scopes))
    )


@router.get("/jwks")
def jwks(plane: Plane) -> dict[str, Any]:
    """The public key tokens are signed with, for gateways that verify offline."""
    return plane.tokens.jwks()


@router.get("/whoami")
def whoami(caller: Caller) -> dict[str, Any]:
    return {
        "subject": caller.subject,
        "role": caller.role,
        "scopes": sorted(caller.scopes),
    }


def role_scopes(role: str) -> frozenset[str]:
    return SCOPES if role == "admin" else SCOPES - {"admin"}


def _user(plane: Plane, username: str | None, password: str | None) -> Principal:
    refused = AuthError("wrong user name or password")
    if not username or password is None:
        raise refused
    with plane.db.session() as session:
        user = session.scalar(select(User).where(User.name == username))
    if user is None or user.disabled or not check_password(password, user.password_hash):
        raise refused
    assert user.role in USER_ROLES
    return Principal("user", user.name, user.role, role_scopes(user.role))


def _node(plane: Plane, name: str | None, assertion: str | None) -> Principal:
    if not name or not assertion:
        raise AuthError("a node token needs `node` and a signed `assertion`")
    with plane.db.session() as session:
        node = session.scalar(select(Node).where(Node.name == name))
    if node is None or node.disabled:
        raise AuthError(f"node {name!r} is not registered")
    # RFC 7523: the audience names the server; its token URL or its name will do.
    audiences = [plane.settings.audience, plane.settings.url + "/v1/auth/token"]
    jti = verify_node_assertion(assertion, node.public_key, name, audiences)
    plane.replays.claim(f"node:{name}:{jti}")
    return Principal("node", name, "node", role_scopes("node"))
