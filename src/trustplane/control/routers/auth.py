"""Tokens: users by password, nodes by a signed assertion (RFC 7523); revocation.

A token is revoked by presenting it (anyone may revoke a token of their
own: logging out; another's needs the right to manage that principal), or
all tokens of a principal issued so far at once (`subject`; the principal
can log in again afterwards). Revoked tokens are refused by every replica
at once (control/revocations.py) and by edge gateways, which ask for the
revocations every second (`GET /v1/auth/revocations`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import anyio.to_thread
from fastapi import APIRouter
from sqlalchemy import select

from trustplane.api.identity import (
    Revocations,
    Revoked,
    RevokeRequest,
    TokenRequest,
    TokenResponse,
    WhoAmI,
)
from trustplane.control.identity import (
    USER_ROLES,
    Principal,
    check_password,
    verify_node_assertion,
)
from trustplane.control.models import Node, User
from trustplane.control.routers.deps import Caller, Plane
from trustplane.errors import AuthError, Forbidden, UsageError

router = APIRouter(prefix="/v1/auth", tags=["identity"])
logger = logging.getLogger("trustplane.server")
SCOPES = frozenset({"kms", "authorize", "images", "log", "admin"})


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
    if request.gateways is not None:
        principal = dataclasses.replace(
            principal, gateways=_known_gateways(plane, request.gateways)
        )
    value, ttl = plane.tokens.issue(principal)
    return TokenResponse(
        access_token=value, expires_in=ttl, scope=" ".join(sorted(principal.scopes))
    )


@router.get("/jwks")
def jwks(plane: Plane) -> dict[str, Any]:
    """The public key tokens are signed with, for gateways that verify offline."""
    return plane.tokens.jwks()


@router.get("/whoami", response_model=WhoAmI)
def whoami(caller: Caller) -> WhoAmI:
    return WhoAmI(
        subject=caller.subject,
        role=caller.role,
        scopes=sorted(caller.scopes),
        gateways=sorted(caller.gateways) if caller.gateways is not None else None,
        token_id=caller.token_id,
        issued_at=caller.issued_at,
    )


@router.post("/revoke", response_model=Revoked)
async def revoke(body: RevokeRequest, caller: Caller, plane: Plane) -> Revoked:
    """Revoke a token, or every token of a principal issued until now (logged)."""
    if body.token is not None:
        try:
            target = plane.tokens.verify(body.token)
        except AuthError:
            raise UsageError("that is not a valid token: there is nothing to revoke") from None
        if target.subject != caller.subject:
            _may_revoke(plane, caller, target.subject)
        what = f"a token of {target.subject}"
        epoch = await anyio.to_thread.run_sync(
            plane.revocations.revoke_token, target, target.expires_at, caller.subject
        )
        entry: dict[str, Any] = {"token_id": target.token_id}
    else:
        assert body.subject is not None
        _may_revoke(plane, caller, body.subject)
        what = f"every token of {body.subject} issued so far"
        epoch = await anyio.to_thread.run_sync(
            plane.revocations.revoke_subject, body.subject, caller.subject
        )
        entry = {}
    await plane.log.append_async(
        "identity.revoke", {"subject": caller.subject, "revoked": what, "epoch": epoch, **entry}
    )
    return Revoked(revoked=what, epoch=epoch)


def _may_revoke(plane: Plane, caller: Principal, subject: str) -> None:
    """Revoking another's tokens is managing that principal."""
    kind, _, name = subject.partition(":")
    action = "user.manage" if kind == "user" else "node.register"
    decision = plane.authorize(caller, action, f"{kind}:{name}")
    if not decision.allowed:
        raise Forbidden(f"{caller.subject} may not {action} {subject}: {decision.reason}")


@router.get("/revocations", response_model=Revocations)
def revocations(caller: Caller, plane: Plane, since: int = 0) -> Revocations:
    """The live revocations after `since` (nodes and admins; gateways ask every second).

    `{"epoch": N, "revocations": [{id, subject, token_id, issued_before,
    expires}]}`: a token is revoked when a row names its id, or its subject
    and an `iat` at or before `issued_before`. Answered from memory.
    """
    if caller.role not in ("node", "admin"):
        raise Forbidden("only nodes and admins read the revocation list")
    return Revocations.model_validate(plane.revocations.since(since))


def _known_gateways(plane: Plane, names: list[str]) -> frozenset[str]:
    """The gateways a token is scoped to: each must be a registered, enabled node."""
    wanted = frozenset(names)
    with plane.db.session() as session:
        known = set(
            session.scalars(
                select(Node.name).where(Node.name.in_(wanted), Node.disabled.is_(False))
            ).all()
        )
    unknown = sorted(wanted - known)
    if unknown:
        raise UsageError(f"gateways {unknown} are not registered nodes")
    return wanted


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
    if user.role not in USER_ROLES:
        # A row no API call writes (a "node" or unknown role): a user must never
        # log in with a role users cannot have. A check, not an assert: asserts
        # are gone under `python -O`.
        logger.error("user %r has the role %r, which users cannot have", user.name, user.role)
        raise refused
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
