"""KEK rotation: a new key-encryption key, every secret's data key re-wrapped under it, online.

Old KEKs stay usable until no secret needs them, so requests racing the
rotation still open what they read. Each pass re-reads which KEK is
current, and the work list is fixed up front, so a rotation by another
replica meanwhile cannot make this one chase a moving target; a secret
that cannot be re-wrapped is reported, not retried forever. Payload
ciphertexts are never touched: only 32-byte data keys are re-wrapped.
"""

from __future__ import annotations

from dataclasses import dataclass

from trustplane.errors import TrustplaneError
from trustplane.keys.envelope import rewrap
from trustplane.keys.kek import KekProvider
from trustplane.keys.secret_store import SecretRows

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
                fresh = rewrap(record.id, record.sealed, kek)
            except TrustplaneError:
                failed.append(record.id)
                continue
            if rows.replace_sealed(record.id, record.kek_id, fresh):
                moved += 1
    in_use = rows.kek_ids_in_use()
    retired = []
    for kek_id in set(kek.known_ids()) - in_use - {kek.current_id()}:
        kek.retire(kek_id)
        retired.append(kek_id)
    return Rotation(old=old, kek_id=new, rewrapped=moved, retired=sorted(retired), failed=failed)
