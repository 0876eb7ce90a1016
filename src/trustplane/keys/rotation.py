"""KEK rotation: a new key-encryption key, every secret's data key re-wrapped under it, online.

Old KEKs stay usable until no secret needs them, so requests racing the
rotation still open what they read. Each pass re-reads which KEK is
current, and the work list is fixed up front, so a rotation by another
replica meanwhile cannot make this one chase a moving target; a secret
that cannot be re-wrapped is reported, not retried forever. Payload
ciphertexts are never touched: only 32-byte data keys are re-wrapped.

A KEK is retired only through the store's KEK guard (`retire_unused`): the
decision that no row uses it and the mark that makes every later write
refuse it are one step, so a write sealed under it a moment before (a new
secret, another rotation's re-wrap) is either counted as a use or refused
and sealed again: no acknowledged secret is left under a retired KEK.
"""

from __future__ import annotations

from dataclasses import dataclass

from trustplane.errors import TrustplaneError, UnavailableError
from trustplane.keys.envelope import rewrap
from trustplane.keys.kek import KekProvider
from trustplane.keys.secret_store import SEAL_ATTEMPTS, KekRetired, SecretRecord, SecretRows

BATCH = 200


@dataclass(frozen=True)
class Rotation:
    old: str
    kek_id: str
    """The new current KEK."""
    rewrapped: int
    retired: list[str]
    """Old KEKs no secret needs any more, now forgotten by the provider."""
    failed: list[str]
    """Secrets whose data key could not be re-wrapped (they keep their KEK)."""


def rotate_kek(rows: SecretRows, kek: KekProvider, batch: int = BATCH) -> Rotation:
    old = kek.current_id()
    new = kek.rotate()
    moved, failed = 0, []
    pending = rows.ids_not_under(new)
    for start in range(0, len(pending), batch):
        for record in rows.records(pending[start : start + batch], kek.current_id()):
            try:
                moved += _rewrap(rows, kek, record)
            except TrustplaneError:
                failed.append(record.id)
    # Known first, then current (a provider that caches its versions re-reads
    # them for known_ids): a KEK made after this read is never a candidate.
    known = set(kek.known_ids())
    retired = sorted(rows.retire_unused(known - {kek.current_id()}))
    for kek_id in retired:
        kek.retire(kek_id)
    return Rotation(old=old, kek_id=new, rewrapped=moved, retired=retired, failed=failed)


def _rewrap(rows: SecretRows, kek: KekProvider, record: SecretRecord) -> int:
    """Re-wrap one row under the current KEK; 1 if this rotation moved it."""
    for _ in range(SEAL_ATTEMPTS):
        fresh = rewrap(record.id, record.sealed, kek)
        try:
            return int(rows.replace_sealed(record.id, record.kek_id, fresh))
        except KekRetired:
            kek.known_ids()  # another rotation retired the KEK just used: the newest, then
    raise UnavailableError(f"secret {record.id}: the KEK keeps changing under this re-wrap")
