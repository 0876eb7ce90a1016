"""The secret store's rows (keys/secret_store.py) in the control plane's database.

Secrets are stored only sealed: ciphertext, the wrapped data key and the id
of the KEK that wrapped it (control/models.py, table `secrets`).

The KEK guard is one `settings` row holding the KEKs rotations retired.
Every write of a sealed row reads it (on PostgreSQL with a shared lock;
SQLite serializes writers anyway) and refuses a retired KEK; a rotation
decides what to retire and marks it under an exclusive lock on that row.
So a write either commits before the decision (its KEK is then in use and
kept) or runs after the mark (and is refused, to be sealed again), across
every replica.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError as DuplicateRow
from sqlalchemy.orm import Session

from trustplane.control.db import Database
from trustplane.control.models import Secret, Setting
from trustplane.keys.envelope import SealedSecret
from trustplane.keys.secret_store import KekRetired, SecretRecord

GUARD = "kek_retired"
"""The `settings` row of the KEK guard: a JSON list of retired KEK ids."""


class SqlSecretRows:
    def __init__(self, db: Database) -> None:
        self.db = db
        try:
            with db.session() as session:
                if session.get(Setting, GUARD) is None:
                    session.add(Setting(key=GUARD, value="[]"))
        except DuplicateRow:
            pass  # another replica made it first

    def insert(self, record: SecretRecord) -> None:
        row = Secret(
            id=record.id,
            name=record.name,
            secret_type=record.secret_type,
            algorithm=record.algorithm,
            bit_length=record.bit_length,
            creator=record.creator,
            created=record.created,
            ciphertext=record.sealed.ciphertext,
            wrapped_key=record.sealed.wrapped_key,
            kek_id=record.sealed.kek_id,
            readers=list(record.readers),
            system=record.system,
        )
        with self.db.write_session() as session:
            if record.sealed.kek_id in _retired(session, exclusive=False):
                raise KekRetired(record.sealed.kek_id)
            session.add(row)

    def get(self, secret_id: str) -> SecretRecord | None:
        with self.db.session() as session:
            row = session.get(Secret, secret_id)
        return None if row is None else _record(row)

    def delete(self, secret_id: str) -> None:
        with self.db.session() as session:
            session.execute(delete(Secret).where(Secret.id == secret_id))

    def replace_sealed(self, secret_id: str, expected_kek: str, sealed: SealedSecret) -> bool:
        with self.db.write_session() as session:
            if sealed.kek_id in _retired(session, exclusive=False):
                raise KekRetired(sealed.kek_id)
            done = session.execute(
                update(Secret)
                .where(Secret.id == secret_id, Secret.kek_id == expected_kek)
                .values(wrapped_key=sealed.wrapped_key, kek_id=sealed.kek_id)
            )
            return bool(done.rowcount)  # type: ignore[attr-defined]

    def ids_not_under(self, kek_id: str) -> list[str]:
        with self.db.session() as session:
            return list(session.scalars(select(Secret.id).where(Secret.kek_id != kek_id)))

    def records(self, ids: Sequence[str], not_under: str) -> list[SecretRecord]:
        with self.db.session() as session:
            rows = session.scalars(
                select(Secret).where(Secret.id.in_(list(ids)), Secret.kek_id != not_under)
            ).all()
        return [_record(row) for row in rows]

    def retire_unused(self, candidates: set[str]) -> set[str]:
        with self.db.write_session() as session:
            retired = _retired(session, exclusive=True)
            in_use = set(session.scalars(select(Secret.kek_id).distinct()))
            unused = candidates - in_use
            guard = session.get(Setting, GUARD)
            assert guard is not None  # read (and locked) by _retired
            guard.value = json.dumps(sorted(retired | unused))
        return unused


def _retired(session: Session, *, exclusive: bool) -> set[str]:
    """The retired KEK ids, locked: shared for a write, exclusive for retiring."""
    value = session.scalar(
        select(Setting.value).where(Setting.key == GUARD).with_for_update(read=not exclusive)
    )
    return set(json.loads(value)) if value is not None else set()


def _record(row: Secret) -> SecretRecord:
    return SecretRecord(
        id=row.id,
        name=row.name,
        secret_type=row.secret_type,
        algorithm=row.algorithm,
        bit_length=row.bit_length,
        creator=row.creator,
        readers=tuple(row.readers),
        sealed=SealedSecret(
            kek_id=row.kek_id, wrapped_key=row.wrapped_key, ciphertext=row.ciphertext
        ),
        system=row.system,
        created=row.created,
    )
