"""Revocations on the control plane: by token id, by subject and issue time, shared by replicas."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from trustplane.control import migrate
from trustplane.control.db import Database
from trustplane.control.identity import Principal
from trustplane.control.revocations import Revocations
from trustplane.errors import AuthError


def token(name: str, jti: str, issued: float) -> Principal:
    return Principal("user", name, "user", frozenset(), jti, None, issued, issued + 900)


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path / 'cp.db'}")
    migrate.upgrade(database.engine)
    return database


def test_a_token_and_a_subject_are_revoked_on_every_replica(db: Database) -> None:
    one, two = Revocations(db), Revocations(db)  # two replicas on one database
    now = time.time()
    alice = token("alice", "t-1", now - 10)
    alice_other = token("alice", "t-2", now - 5)
    one.check(alice)
    first = one.revoke_token(alice, alice.expires_at, "user:admin")
    with pytest.raises(AuthError, match="revoked"):
        one.check(alice)  # at once where it was revoked
    one.check(alice_other)  # another token of the same user is untouched
    two.check(alice)  # the other replica has not read it yet...
    two.refresh()
    with pytest.raises(AuthError, match="revoked"):
        two.check(alice)  # ...and has now
    # Another user's token with the same id (ids are random; a forged claim) is not hit.
    one.check(token("bob", "t-1", now))

    second = one.revoke_subject("user:alice", "user:admin")
    assert second > first
    with pytest.raises(AuthError):
        one.check(alice_other)
    one.check(token("alice", "t-3", time.time() + 1))  # a login after the revocation
    two.refresh()
    assert [r["id"] for r in two.since(first)["revocations"]] == [first, second]  # recent
    assert two.since(0)["epoch"] == second


def test_expired_revocations_are_forgotten(db: Database) -> None:
    revocations = Revocations(db)
    now = time.time()
    old = token("carol", "t-9", now - 900)
    revocations.revoke_token(old, now - 1, "user:admin")  # the token has expired already
    assert revocations.since(0)["revocations"] == []
    revocations.check(old)  # nothing to refuse: its expiry refuses it
