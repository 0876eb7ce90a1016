"""Users and nodes: created by administrators (nodes also by operators)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, status
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError as DuplicateRow

from trustplane.api.identity import CreatedUser, NewNode, NewUser, NodeInfo
from trustplane.control.identity import hash_password, new_password
from trustplane.control.models import Node, User
from trustplane.control.routers.deps import Caller, Plane
from trustplane.crypto.keys import load_recipient_key
from trustplane.errors import Forbidden, UsageError

router = APIRouter(prefix="/v1", tags=["identity"])


@router.post("/users", status_code=status.HTTP_201_CREATED, response_model=CreatedUser)
def create_user(body: NewUser, caller: Caller, plane: Plane) -> CreatedUser:
    _require(plane, caller, "user.manage", f"user:{body.name}")
    password = body.password or new_password()
    try:
        with plane.db.session() as session:
            session.add(
                User(
                    id=str(uuid.uuid4()),
                    name=body.name,
                    role=body.role,
                    password_hash=hash_password(password),
                )
            )
    except DuplicateRow:
        raise UsageError(f"user {body.name!r} exists already") from None
    plane.log.append(
        "identity.user", {"subject": caller.subject, "user": body.name, "role": body.role}
    )
    return CreatedUser(name=body.name, role=body.role, password=None if body.password else password)


@router.post("/nodes", status_code=status.HTTP_201_CREATED, response_model=NodeInfo)
def register_node(body: NewNode, caller: Caller, plane: Plane) -> NodeInfo:
    _require(plane, caller, "node.register", f"node:{body.name}")
    try:
        key_id = load_recipient_key(body.public_key.encode(), f"node {body.name}").kid
    except Exception as exc:  # any key we cannot use is the caller's mistake
        raise UsageError(f"node {body.name}: unusable public key ({exc})") from None
    try:
        with plane.db.session() as session:
            session.add(
                Node(
                    id=str(uuid.uuid4()),
                    name=body.name,
                    kind=body.kind,
                    public_key=body.public_key,
                    key_id=key_id,
                )
            )
    except DuplicateRow:
        raise UsageError(f"node {body.name!r} or its key is registered already") from None
    plane.log.append(
        "identity.node", {"subject": caller.subject, "node": body.name, "key_id": key_id}
    )
    return NodeInfo(name=body.name, kind=body.kind, key_id=key_id)


@router.get("/nodes", response_model=list[NodeInfo])
def list_nodes(caller: Caller, plane: Plane) -> list[NodeInfo]:
    _require(plane, caller, "node.register", "node:*")
    with plane.db.session() as session:
        nodes = session.scalars(select(Node).order_by(Node.name)).all()
    return [NodeInfo(name=n.name, kind=n.kind, key_id=n.key_id) for n in nodes]


def _require(plane: Plane, caller: Caller, action: str, resource: str) -> None:
    decision = plane.authorize(caller, action, resource)
    if not decision.allowed:
        raise Forbidden(f"{caller.subject} may not {action} {resource}: {decision.reason}")
