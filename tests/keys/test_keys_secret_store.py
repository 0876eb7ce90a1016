"""The secret store's rules: what is stored, who may see, read and delete, and unsealing.

The store runs on its real rows (the control plane's SQLite database,
migrated) and a real file KEK store, both in the test's directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import update

from trustplane.control import migrate
from trustplane.control.db import Database
from trustplane.control.models import Secret
from trustplane.control.secret_rows import SqlSecretRows
from trustplane.errors import Forbidden, NotFoundError, UnavailableError, UsageError
from trustplane.keys.kek_file import FileKekProvider
from trustplane.keys.rotation import rotate_kek
from trustplane.keys.secret_store import (
    MAX_PAYLOAD,
    SecretStore,
    acl_allows,
    may_delete,
    may_see,
)


@dataclass(frozen=True)
class Who:
    subject: str
    role: str


ALICE = Who("user:alice", "user")
BOB = Who("user:bob", "user")
CAROL = Who("node:carol", "node")
ADMIN = Who("user:admin", "admin")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SecretStore]:
    db = Database(f"sqlite:///{tmp_path / 'kms.db'}")
    migrate.upgrade(db.engine)
    kek = FileKekProvider(tmp_path / "kek.json")
    yield SecretStore(SqlSecretRows(db), kek)
    kek.close()
    db.close()


def test_a_payload_is_stored_sealed_and_opens_again(store: SecretStore) -> None:
    payload = b"the volume key of alice" * 3
    record = store.create(ALICE, name="vol", secret_type="opaque", payload=payload)
    assert record.creator == "user:alice"
    assert record.kek_id == store.kek.current_id()
    stored = store.rows.get(record.id)
    assert stored is not None
    assert payload not in stored.sealed.ciphertext
    assert store.unseal(stored) == payload


@pytest.mark.parametrize(("bits", "length"), [(None, 32), (128, 16), (192, 24), (256, 32)])
def test_without_a_payload_an_aes_key_is_generated(
    store: SecretStore, bits: int | None, length: int
) -> None:
    record = store.create(ALICE, name=None, secret_type="symmetric", payload=None, bit_length=bits)
    assert (record.algorithm, record.bit_length) == ("aes", length * 8)
    assert len(store.unseal(record)) == length


@pytest.mark.parametrize(
    ("kind", "payload", "bits", "message"),
    [
        ("password", b"x", None, "secret_type must be one of"),
        ("opaque", None, None, "only symmetric AES keys can be generated"),
        ("symmetric", None, 512, "bit_length must be 128, 192 or 256"),
        ("opaque", b"", None, "a payload must hold 1 to"),
        ("opaque", b"x" * (MAX_PAYLOAD + 1), None, "a payload must hold 1 to"),
    ],
)
def test_what_cannot_be_stored_is_refused_and_nothing_is_stored(
    store: SecretStore, kind: str, payload: bytes | None, bits: int | None, message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        store.create(ALICE, name=None, secret_type=kind, payload=payload, bit_length=bits)
    assert store.rows.ids_not_under("no KEK") == []  # no row at all


def test_the_acl_lets_the_creator_and_readers_read_and_nobody_else(store: SecretStore) -> None:
    record = store.create(
        ALICE, name=None, secret_type="opaque", payload=b"p", readers=[BOB.subject]
    )
    assert acl_allows(record, ALICE)
    assert acl_allows(record, BOB)
    assert not acl_allows(record, CAROL)
    assert not acl_allows(record, ADMIN)  # administrators manage secrets, they do not read them


def test_only_admins_and_the_acl_know_a_secret_exists(store: SecretStore) -> None:
    record = store.create(
        ALICE, name=None, secret_type="opaque", payload=b"p", readers=[BOB.subject]
    )
    assert all(may_see(record, who) for who in (ADMIN, ALICE, BOB))
    assert not may_see(record, CAROL)
    assert store.visible(BOB, record.id).id == record.id
    with pytest.raises(NotFoundError, match="does not exist"):
        store.visible(CAROL, record.id)  # not on the ACL reads as absent
    with pytest.raises(NotFoundError, match="does not exist"):
        store.visible(ADMIN, "0" * 8 + "-0000-0000-0000-" + "0" * 12)


def test_the_servers_own_keys_are_never_served(store: SecretStore) -> None:
    own = store.create(
        ADMIN, name="log_signing_key", secret_type="private", payload=b"k", system=True
    )
    assert store.find(own.id) is None
    assert not may_see(own, ADMIN)
    with pytest.raises(NotFoundError):
        store.visible(ADMIN, own.id)
    assert store.system_payload(own.id) == b"k"


def test_only_the_creator_or_an_admin_deletes(store: SecretStore) -> None:
    record = store.create(
        ALICE, name=None, secret_type="opaque", payload=b"p", readers=[BOB.subject]
    )
    with pytest.raises(Forbidden, match="only the creator or an admin"):
        store.delete(BOB, record.id)  # a reader may read, not delete
    with pytest.raises(NotFoundError):
        store.delete(CAROL, record.id)
    assert all(may_delete(record, who) for who in (ADMIN, ALICE))
    store.delete(ADMIN, record.id)
    assert store.find(record.id) is None


def test_a_row_read_before_a_rotation_retired_its_kek_is_read_again(store: SecretStore) -> None:
    """A release decided (and logged) before a rotation finishes unseals after it."""
    record = store.create(ALICE, name=None, secret_type="opaque", payload=b"still mine")
    read_before = store.find(record.id)
    assert read_before is not None
    rotation = rotate_kek(store.rows, store.kek)
    assert read_before.kek_id in rotation.retired
    assert store.unseal(read_before) == b"still mine"


def test_a_row_that_does_not_unseal_is_the_kms_being_unavailable(
    store: SecretStore, tmp_path: Path
) -> None:
    """Never "not granted" (403) or "bad token" (401), which a client would quietly accept."""
    record = store.create(ALICE, name=None, secret_type="opaque", payload=b"p")
    db = Database(f"sqlite:///{tmp_path / 'kms.db'}")
    with db.session() as session:
        session.execute(
            update(Secret).where(Secret.id == record.id).values(ciphertext=b"\x01" + b"\0" * 40)
        )
    db.close()
    damaged = store.find(record.id)
    assert damaged is not None
    with pytest.raises(UnavailableError, match=f"cannot unseal secret {record.id}"):
        store.unseal(damaged)
