"""The secret store's rows (keys/secret_store.py) in the control plane's database.

Secrets are stored only sealed: ciphertext, the wrapped data key and the id
of the KEK that wrapped it (control/models.py, table `secrets`).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, select, update

from trustplane.control.db import Database
from trustplane.control.models import Secret
from trustplane.keys.envelope import SealedSecret
from trustplane.keys.secret_store import SecretRecord


class SqlSecretRows:
    def __init__(self, db: Database) -> None:
        self.db = db

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
        with self.db.session() as session:
            session.add(row)

    def get(self, secret_id: str) -> SecretRecord | None:
        with self.db.session() as session:
            row = session.get(Secret, secret_id)
        return None if row is None else _record(row)

    def delete(self, secret_id: str) -> None:
        with self.db.session() as session:
            session.execute(delete(Secret).where(Secret.id == secret_id))

    def replace_sealed(self, secret_id: str, expected_kek: str, sealed: SealedSecret) -> bool:
        with self.db.session() as session:
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

    def kek_ids_in_use(self) -> set[str]:
        with self.db.session() as session:
            return set(session.scalars(select(Secret.kek_id).distinct()))


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
