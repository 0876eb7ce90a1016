"""Releasing a secret: the store's ACL and the policy must both agree; every answer is logged."""

from __future__ import annotations

import asyncio

import pytest
from plane_helpers import entries_since, set_policy
from sqlalchemy import update

from trustplane.control.identity import Principal
from trustplane.control.models import Secret
from trustplane.control.policy import DEFAULT_POLICY
from trustplane.control.service import ControlPlane
from trustplane.errors import Forbidden, NotFoundError, UnavailableError

ALICE = Principal("user", "alice", "user", frozenset())
BOB = Principal("user", "bob", "user", frozenset())
ADMIN = Principal("user", "admin", "admin", frozenset())
NODE = Principal("node", "edge-1", "node", frozenset())
NODE_RULE = """\
  - subjects: ["node:edge-1"]
    actions: [key.release]
    resources: ["secret:*"]
    require_attestation: true
"""


def create(plane: ControlPlane, readers: list[str]) -> str:
    return plane.secrets.create(
        ALICE,
        name="volume key",
        secret_type="opaque",
        payload=b"alice's volume key",
        algorithm=None,
        bit_length=None,
        readers=readers,
    ).id


def released(plane: ControlPlane, start: int) -> list[tuple[str, str, str]]:
    return [
        (e["subject"], e["decision"], e["reason"])
        for e in entries_since(plane, start)
        if e["kind"] == "kms.release"
    ]


def test_the_acl_and_the_policy_both_decide_and_both_are_logged(plane: ControlPlane) -> None:
    set_policy(plane, DEFAULT_POLICY + NODE_RULE)
    secret = create(plane, readers=[NODE.subject])
    start, _ = plane.log.head()
    assert plane.secrets.payload(ALICE, secret) == b"alice's volume key"
    with pytest.raises(Forbidden, match="is not on the ACL"):
        plane.secrets.payload(BOB, secret)
    with pytest.raises(Forbidden, match="is not on the ACL"):
        plane.secrets.payload(ADMIN, secret)  # admins manage secrets, they do not read them
    # On the ACL, but the policy wants a freshly attested node: the verifier says no.
    with pytest.raises(Forbidden, match=r"policy refuses key\.release .* attestation required"):
        plane.secrets.payload(NODE, secret)
    *people, (node, decision, reason) = released(plane, start)
    assert people == [
        ("user:alice", "allow", "allowed by rule 4"),
        ("user:bob", "deny", "not on the secret's ACL"),
        ("user:admin", "deny", "not on the secret's ACL"),
    ]
    assert (node, decision) == ("node:edge-1", "deny")
    assert "attestation required" in reason


def test_an_unknown_secret_is_not_found_and_the_question_is_logged(plane: ControlPlane) -> None:
    start, _ = plane.log.head()
    missing = "00000000-0000-0000-0000-000000000000"
    with pytest.raises(NotFoundError, match=f"secret {missing} does not exist"):
        asyncio.run(plane.secrets.payload_async(ALICE, missing))
    assert released(plane, start) == [("user:alice", "deny", "no such secret")]


def test_a_secret_the_kms_cannot_unseal_is_an_error_entry_not_an_allow(
    plane: ControlPlane,
) -> None:
    secret = create(plane, readers=[])
    with plane.db.session() as session:
        session.execute(
            update(Secret).where(Secret.id == secret).values(ciphertext=b"\x01" + bytes(40))
        )
    start, _ = plane.log.head()
    with pytest.raises(UnavailableError, match="cannot unseal"):
        plane.secrets.payload(ALICE, secret)
    ((subject, decision, reason),) = released(plane, start)
    assert (subject, decision) == ("user:alice", "error")
    assert "not released" in reason


def test_store_delete_and_rotation_are_logged(plane: ControlPlane) -> None:
    start, _ = plane.log.head()
    secret = create(plane, readers=[])
    plane.secrets.delete(ALICE, secret)
    rotation = plane.secrets.rotate_kek(ADMIN)
    kinds = [(e["kind"], e.get("secret")) for e in entries_since(plane, start)]
    assert kinds == [("kms.store", secret), ("kms.delete", secret), ("kms.rotate", None)]
    assert rotation.failed == []
    assert rotation.rewrapped >= 2  # the server's own keys at least
    with pytest.raises(NotFoundError):
        plane.secrets.metadata(ALICE, secret)
