"""The secret store, shaped like OpenStack Barbican: secrets by reference, sealed at rest.

A caller stores or generates a secret and keeps only its reference (its
id). The payload is sealed with envelope encryption (envelope.py): a data
key per secret, wrapped by the current key-encryption key (kek.py). The
store decides what its ACL decides: who may see a secret exists (admins and
the ACL), read its payload (its creator and named readers: administrators
manage secrets but do not read them) and delete it (its creator, admins).
Whether the policy also agrees, and the log of it, is the control plane's
part (control/secrets.py).

Where the rows live is the caller's: a `SecretRows` (the control plane's is
control/secret_rows.py, on its database). Rows are written only through
the KEK guard (`SecretRows.insert`/`replace_sealed` refuse a KEK that a
rotation retired, rotation.py), so that no secret is ever acknowledged
under a KEK that is going away.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Protocol

from trustplane.errors import (
    DecryptionKeyError,
    Forbidden,
    NotFoundError,
    TrustplaneError,
    UnavailableError,
    UsageError,
)
from trustplane.keys.envelope import SealedSecret, open_sealed, seal
from trustplane.keys.kek import KekProvider

SECRET_TYPES = ("symmetric", "opaque", "private", "passphrase")
MAX_PAYLOAD = 64 << 10
SEAL_ATTEMPTS = 5
"""Seals of one write, at most: each retry follows a rotation that retired the KEK used."""
logger = logging.getLogger("trustplane.kms")


class Requester(Protocol):
    """Who asks: `subject` is KIND:NAME, `role` admin, operator, user or node."""

    @property
    def subject(self) -> str: ...

    @property
    def role(self) -> str: ...


@dataclass(frozen=True)
class SecretRecord:
    """One stored secret: its metadata and its sealed payload (never the payload)."""

    id: str
    name: str | None
    secret_type: str
    algorithm: str | None
    bit_length: int | None
    creator: str
    created: datetime
    readers: tuple[str, ...]
    sealed: SealedSecret = field(repr=False)
    system: bool = False
    """The server's own keys (token, log and command signing, recipients): never served."""

    @property
    def kek_id(self) -> str:
        return self.sealed.kek_id


class KekRetired(Exception):
    """The row was not written: its sealed data key names a KEK a rotation retired."""


class SecretRows(Protocol):
    """Where the store keeps its rows; every method is one atomic unit of work.

    The writes go through the KEK guard: they refuse (`KekRetired`) a KEK that
    `retire_unused` marked, and `retire_unused` waits for writes in progress,
    so a row is either written before a KEK's retirement is decided (and
    counts as a use of it) or refused after.
    """

    def insert(self, record: SecretRecord) -> None:
        """Store a new row; KekRetired if its KEK is retired."""
        ...

    def get(self, secret_id: str) -> SecretRecord | None: ...

    def delete(self, secret_id: str) -> None: ...

    def replace_sealed(self, secret_id: str, expected_kek: str, sealed: SealedSecret) -> bool:
        """Swap the sealed data key if the row is still under `expected_kek`; whether it was.
        KekRetired if `sealed` names a retired KEK."""
        ...

    def ids_not_under(self, kek_id: str) -> list[str]:
        """Ids of the rows whose data key is wrapped by another KEK than `kek_id`."""
        ...

    def records(self, ids: Sequence[str], not_under: str) -> list[SecretRecord]:
        """The rows among `ids` still not under `not_under`."""
        ...

    def retire_unused(self, candidates: set[str]) -> set[str]:
        """Mark retired, and return, the candidate KEKs that no row uses: atomically,
        after every write in progress, before any write that follows."""
        ...


def acl_allows(record: SecretRecord, requester: Requester) -> bool:
    """The ACL proper: the creator and the named readers. Administrators manage
    secrets but do not read them."""
    return requester.subject in (record.creator, *record.readers)


def may_see(record: SecretRecord, requester: Requester) -> bool:
    """Who may learn that a secret exists (its metadata): admins and the ACL."""
    return not record.system and (requester.role == "admin" or acl_allows(record, requester))


def may_delete(record: SecretRecord, requester: Requester) -> bool:
    return requester.subject == record.creator or requester.role == "admin"


class SecretStore:
    def __init__(self, rows: SecretRows, kek: KekProvider) -> None:
        self.rows = rows
        self.kek = kek

    def create(
        self,
        requester: Requester,
        *,
        name: str | None,
        secret_type: str,
        payload: bytes | None,
        algorithm: str | None = None,
        bit_length: int | None = None,
        readers: Sequence[str] = (),
        system: bool = False,
    ) -> SecretRecord:
        """Store `payload`, or generate an AES key when there is none; the stored row."""
        if secret_type not in SECRET_TYPES:
            raise UsageError(f"secret_type must be one of {', '.join(SECRET_TYPES)}")
        if payload is None:
            if secret_type != "symmetric" or algorithm not in (None, "aes"):  # noqa: S105
                raise UsageError("only symmetric AES keys can be generated; give a payload")
            bits = bit_length or 256
            if bits not in (128, 192, 256):
                raise UsageError("bit_length must be 128, 192 or 256")
            payload, algorithm, bit_length = os.urandom(bits // 8), "aes", bits
        if not payload or len(payload) > MAX_PAYLOAD:
            raise UsageError(f"a payload must hold 1 to {MAX_PAYLOAD} bytes")
        secret_id = str(uuid.uuid4())
        record = SecretRecord(
            id=secret_id,
            name=name,
            secret_type=secret_type,
            algorithm=algorithm,
            bit_length=bit_length,
            creator=requester.subject,
            created=datetime.now(UTC),
            readers=tuple(readers),
            sealed=seal(secret_id, payload, self.kek),
            system=system,
        )
        for _ in range(SEAL_ATTEMPTS):
            try:
                self.rows.insert(record)
                return record
            except KekRetired:
                # Sealed under a KEK that a rotation retired meanwhile: seal
                # again under the current one (the payload is still at hand).
                self.kek.known_ids()  # a provider that caches its versions re-reads them
                record = replace(record, sealed=seal(secret_id, payload, self.kek))
        raise UnavailableError("the KEK keeps changing under this write; try again")

    def visible(self, requester: Requester, secret_id: str) -> SecretRecord:
        """A secret the requester may know of; absent otherwise (references are not
        enumerable: not being on the ACL reads as not existing)."""
        record = self.rows.get(secret_id)
        if record is None or not may_see(record, requester):
            raise NotFoundError(f"secret {secret_id} does not exist")
        return record

    def find(self, secret_id: str) -> SecretRecord | None:
        """A secret that may be served (not one of the server's own), or None."""
        record = self.rows.get(secret_id)
        return None if record is None or record.system else record

    def delete(self, requester: Requester, secret_id: str) -> None:
        record = self.visible(requester, secret_id)
        if not may_delete(record, requester):
            raise Forbidden(f"only the creator or an admin may delete secret {secret_id}")
        self.rows.delete(secret_id)

    def system_payload(self, secret_id: str) -> bytes:
        """The server's own keys (token and log signing), never served over the API."""
        record = self.rows.get(secret_id)
        if record is None:
            raise NotFoundError(f"system secret {secret_id} is missing")
        return self.unseal(record)

    def unseal(self, record: SecretRecord) -> bytes:
        """The payload of a row read a moment ago.

        A rotation may have re-wrapped it and retired the KEK it was read under
        in between (a release is decided and logged before this, which can take
        a while under load): then the stored row names the new KEK, so read it
        again.

        Any failure to unseal is the store's own (its KEK store is down or
        refuses it, or the stored row was altered), never the caller's: it
        becomes UnavailableError (503), so a client does not mistake it for
        "not granted" (403) or "bad token" (401) and quietly go without.
        """
        try:
            try:
                return open_sealed(record.id, record.sealed, self.kek)
            except DecryptionKeyError:
                fresh = self.rows.get(record.id)
                if fresh is None or fresh.kek_id == record.kek_id:
                    raise
                return open_sealed(fresh.id, fresh.sealed, self.kek)
        except UnavailableError:
            raise
        except TrustplaneError as exc:
            logger.error("cannot unseal secret %s: %s", record.id, type(exc).__name__)
            raise UnavailableError(
                f"the KMS cannot unseal secret {record.id} ({type(exc).__name__}: {exc})"
            ) from None
