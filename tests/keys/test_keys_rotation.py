"""KEK rotation: every data key re-wrapped, unused KEKs retired, and no acknowledged secret lost.

The store runs on its real rows (the control plane's SQLite database) and a
real file KEK store. Interleavings are forced through the KEK provider
itself: `wrap` returns, and before its caller can store what it wrapped, a
whole rotation runs, as another request or another replica would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from trustplane.control import migrate
from trustplane.control.db import Database
from trustplane.control.secret_rows import SqlSecretRows
from trustplane.errors import UnavailableError
from trustplane.keys.kek import WrappedKey
from trustplane.keys.kek_file import FileKekProvider
from trustplane.keys.rotation import Rotation, rotate_kek
from trustplane.keys.secret_store import SecretStore


@dataclass(frozen=True)
class Who:
    subject: str
    role: str


ALICE = Who("user:alice", "user")


class InterruptedWrap(FileKekProvider):
    """A file KEK store whose next `wrap` runs `then` after wrapping, before returning;
    and whose next `failing_unwraps` unwraps fail as an unreachable KEK store's would."""

    then: Callable[[], None] | None = None
    failing_unwraps = 0

    def wrap(self, key: bytes, aad: bytes) -> WrappedKey:
        wrapped = super().wrap(key, aad)
        then, self.then = self.then, None
        if then is not None:
            then()
        return wrapped

    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        if self.failing_unwraps:
            self.failing_unwraps -= 1
            raise UnavailableError("the KEK store did not answer")
        return super().unwrap(wrapped, aad)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SecretStore]:
    db = Database(f"sqlite:///{tmp_path / 'kms.db'}")
    migrate.upgrade(db.engine)
    kek = InterruptedWrap(tmp_path / "kek.json")
    yield SecretStore(SqlSecretRows(db), kek)
    kek.close()
    db.close()


def create(store: SecretStore, payload: bytes) -> str:
    return store.create(ALICE, name=None, secret_type="opaque", payload=payload).id


def payload_of(store: SecretStore, secret_id: str) -> bytes:
    record = store.find(secret_id)
    assert record is not None
    return store.unseal(record)


def test_a_rotation_rewraps_every_secret_and_retires_the_old_kek(store: SecretStore) -> None:
    secrets = {create(store, f"secret {n}".encode()): f"secret {n}".encode() for n in range(5)}
    old = store.kek.current_id()
    rotation = rotate_kek(store.rows, store.kek, batch=2)
    assert rotation.old == old != rotation.kek_id == store.kek.current_id()
    assert (rotation.rewrapped, rotation.failed, rotation.retired) == (5, [], [old])
    assert store.kek.known_ids() == (rotation.kek_id,)
    assert {payload_of(store, s) for s in secrets} == set(secrets.values())
    again = rotate_kek(store.rows, store.kek)
    assert again.retired == [rotation.kek_id]


def test_a_secret_sealed_before_a_rotation_and_stored_after_it_stays_readable(
    store: SecretStore,
) -> None:
    """The write is acknowledged only once its KEK cannot be retired under it."""
    kek = store.kek
    assert isinstance(kek, InterruptedWrap)
    create(store, b"an older secret")  # something for the rotation to re-wrap
    sealed_under = kek.current_id()
    rotations: list[Rotation] = []
    kek.then = lambda: rotations.append(rotate_kek(store.rows, kek))
    acknowledged = create(store, b"acknowledged, so never lost")
    (rotation,) = rotations  # it ran between the seal and the store of the row
    assert rotation.old == sealed_under
    assert sealed_under in rotation.retired  # no row used it when the rotation looked
    assert sealed_under not in kek.known_ids()
    assert payload_of(store, acknowledged) == b"acknowledged, so never lost"
    assert rotate_kek(store.rows, kek).failed == []  # and it keeps rotating like any other
    assert payload_of(store, acknowledged) == b"acknowledged, so never lost"


def test_a_rewrap_stored_after_another_rotation_retired_its_kek_is_done_again(
    store: SecretStore,
) -> None:
    """Rotation A re-wraps a secret under its new KEK; before A stores it, rotation B
    runs whole, fails to re-wrap that secret (its KEK store hiccups) and, seeing
    nobody use A's KEK yet, retires it. A's write must not land under it."""
    kek = store.kek
    assert isinstance(kek, InterruptedWrap)
    secret = create(store, b"kept through two rotations")
    second: list[Rotation] = []

    def rotation_b() -> None:
        kek.failing_unwraps = 1
        second.append(rotate_kek(store.rows, kek))

    kek.then = rotation_b
    first = rotate_kek(store.rows, kek)
    (b,) = second
    assert b.failed == [secret]
    assert first.kek_id in b.retired  # A's KEK went while A was writing under it
    assert first.rewrapped == 1  # A stored it again, under B's KEK
    record = store.find(secret)
    assert record is not None
    assert record.kek_id == b.kek_id == kek.current_id()
    assert payload_of(store, secret) == b"kept through two rotations"
