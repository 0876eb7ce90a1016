"""`POST /v1/authorize`: the decision point gateways and agents ask."""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter
from sqlalchemy import select

from trustplane.api.policy import AuthorizeRequest, AuthorizeResponse, Subject
from trustplane.control.identity import Principal
from trustplane.control.models import Node, User
from trustplane.control.policy import Decision
from trustplane.control.routers.deps import Caller, Plane
from trustplane.errors import Forbidden

router = APIRouter(prefix="/v1", tags=["policy"])


@router.post("/authorize", response_model=AuthorizeResponse)
async def authorize(body: AuthorizeRequest, caller: Caller, plane: Plane) -> AuthorizeResponse:
    """Allow or deny {subject, action, resource}; every decision is logged.

    On the event loop: the policy check is in memory (the file is re-read
    only when it changed), a subject other than the caller is looked up in a
    worker thread, and the log commit is awaited.
    """
    subject: Principal | None = caller
    if body.subject is not None and body.subject.kind + ":" + body.subject.name != caller.subject:
        # Only nodes (gateways asking for their users) and admins may ask for others.
        if caller.role not in ("node", "admin"):
            raise Forbidden("only nodes and admins may ask about another subject")
        subject = await anyio.to_thread.run_sync(_lookup, plane, body.subject)
    if subject is None:
        decision = Decision(False, "unknown or disabled subject")
        subject = Principal(body.subject.kind, body.subject.name, "user", frozenset())  # type: ignore[union-attr]
    else:
        decision = plane.authorize(subject, body.action, body.resource, body.layer)
    receipt = await plane.log.append_async(
        "authorize",
        {
            "asker": caller.subject,
            "subject": subject.subject,
            "action": body.action,
            "resource": body.resource,
            "layer": body.layer,
            "decision": "allow" if decision.allowed else "deny",
            "reason": decision.reason,
            **({"context": body.context} if body.context else {}),
        },
    )
    return AuthorizeResponse(
        decision="allow" if decision.allowed else "deny",
        reason=decision.reason,
        log_index=receipt.index,
    )


def _lookup(plane: Plane, subject: Subject) -> Principal | None:
    """The subject's role comes from the registry, never from the asker."""
    with plane.db.session() as session:
        if subject.kind == "node":
            node = session.scalar(select(Node).where(Node.name == subject.name))
            if node is None or node.disabled:
                return None
            return Principal("node", node.name, "node", frozenset())
        user = session.scalar(select(User).where(User.name == subject.name))
        if user is None or user.disabled:
            return None
        return Principal("user", user.name, user.role, frozenset())  # type: ignore[arg-type]
