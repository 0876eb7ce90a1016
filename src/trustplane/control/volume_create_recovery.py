"""Volume creates a crash interrupted, settled at the server's next start.

`BlockStorage.create` writes, in this order: the record (`creating`), the KMS
key (ordered, then its UUID on the record), the storage (its location goes on
the record as soon as it exists, before the LUKS format: `made`), the header,
and `available` with the fingerprint. A `kill -9` anywhere in between leaves a
`creating` record. `settle` takes such a record to gone, as a delete would:

1. crypto-shredding first: every key of the volume is destroyed (the recorded
   one, and one ordered before its UUID reached the record, found by its KMS
   name `volume:NAME`), logged `kms.delete`;
2. the storage, only if the record names it: then this create made it (every
   backend creates exclusively, `O_EXCL` or the tool's own refusal, and storage
   that exists is refused before the record is even written). Storage of the
   same name that the record does not name is not known to be this create's
   (pre-existing storage, or a crash in the instant between the storage's
   creation and its recording): it is left as it is and the log says so;
3. the record is dropped; logged `volume.create.failed` and `volume.destroyed`
   ("create finished after a crash").

A crash during this is finished by the next start (the record is then
`deleting` or `shredded`, and `_finish_delete` removes only recorded storage).

Two replicas (PostgreSQL): a `creating` record may belong to a create that
another replica runs right now; destroying it would shred the key under it
(and a key it orders afterwards would be left to nobody). Unlike a rotation
(settled at every start: its leftovers are the volume's own keys), a create's
record is taken only when its create cannot be running any more:

- never a record made since this server started (`recover` runs beside the
  first requests, app.py: a create asked right away is this process's own);
- on SQLite, one server owns the database: every `creating` record from
  before its start is of a process that is gone;
- on PostgreSQL, only records older than `MAX_CREATE_AGE`: a create is bounded
  (the key order, the storage, then `qemu-img create` with at most
  `QEMU_PBKDF_CALIBRATION.tries` tries of at most 300 s each, 40 min), plus a
  margin for the replicas' clocks. A younger one is left (and logged): a later
  start settles it, or `volume delete` clears it now.

Records of a clone or an encryption (a `volume_operations` row names them) are
their own code's (control/volume_copies.py) and are not touched here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select

from trustplane.api.volume_location import AnyLocation, dump_location
from trustplane.control.db import is_sqlite
from trustplane.control.models import Volume, VolumeOperation
from trustplane.control.volume_states import CREATING, DELETING
from trustplane.errors import TrustplaneError, UsageError
from trustplane.volumes.backends.base import Backend
from trustplane.volumes.volume import delete_volume

if TYPE_CHECKING:
    from trustplane.control.volumes import BlockStorage

logger = logging.getLogger("trustplane.volumes")

MAX_CREATE_AGE = timedelta(hours=1)
"""How long a create may still be running on another replica (PostgreSQL only)."""
REASON = "create finished after a crash"


class InterruptedCreates:
    """The part of `BlockStorage.create` that a crash matters to: recording the
    storage made, test hooks at each step, and the settling at start."""

    def __init__(self, storage: BlockStorage) -> None:
        self.storage = storage
        self.started = datetime.now(UTC)
        """Records made from now on are this process's own creates."""
        self.single_server = is_sqlite(storage.db.engine)
        """Whether every `creating` record from before the start is of a dead process."""
        self.at_step: Callable[[str, str], None] | None = None
        """Tests only (set in-process): called with (step, volume name) at each step
        of a create ("record", "key", "key-recorded", "storage", "formatted"), to
        crash there."""

    def step(self, step: str, name: str) -> None:
        if self.at_step is not None:
            self.at_step(step, name)

    def made(self, volume_id: str, backend: Backend, name: str) -> Callable[[AnyLocation], None]:
        """The `made` callback of `create_volume`: the record names the new storage
        (so that only it is ever removed for this record)."""

        def record(location: AnyLocation) -> None:
            try:
                if not self.storage._set(
                    volume_id, only_if=CREATING, location=dump_location(location)
                ):  # `volume delete` of the creating record meanwhile: nothing names it
                    raise UsageError(f"volume {name} was deleted while it was being created")
            except BaseException:
                delete_volume(backend, location)  # not recorded: not left behind either
                raise
            self.step("storage", name)

        return record

    def interrupted(self, created: datetime, now: datetime) -> bool:
        """Whether a `creating` record made at `created` cannot have a create running."""
        if created.tzinfo is None:  # SQLite gives naive UTC back
            created = created.replace(tzinfo=UTC)
        if created >= self.started:
            return False
        return self.single_server or now - created > MAX_CREATE_AGE

    def recover(self) -> int:
        """Settle every interrupted create (see the module); how many were."""
        now = datetime.now(UTC)
        with self.storage.db.session() as session:
            busy = select(VolumeOperation.volume_id)
            rows = session.execute(
                select(Volume.id, Volume.name, Volume.created).where(
                    Volume.state == CREATING, Volume.id.not_in(busy)
                )
            ).all()
        done = 0
        for volume_id, name, created in rows:
            if not self.interrupted(created, now):
                logger.warning(
                    "volume %s: left `creating` (made %s; a create may still be running on "
                    "another replica): a later start settles it, or `volume delete` clears it",
                    name,
                    created,
                )
                continue
            try:
                if self.settle(volume_id):
                    done += 1
            except TrustplaneError as exc:
                logger.error("volume %s: finishing its interrupted create failed: %s", name, exc)
        return done

    def settle(self, volume_id: str) -> bool:
        """Shred the keys, remove the recorded storage, drop the record, log it."""
        s = self.storage
        with s.db.session() as session:
            row = session.get(Volume, volume_id)
            if row is None or row.state != CREATING:
                return False
            name, backend_name, location_json = row.name, row.backend, row.location
        if not s._set(volume_id, only_if=CREATING, state=DELETING):
            return False  # another replica's start took it
        left = None
        if location_json is None:
            backend = s.backend(backend_name)
            if backend.exists(backend.check_name(name)):
                left = backend.location(name).describe()
                logger.warning(
                    "volume %s: %s exists but this create did not record making it: left",
                    name,
                    left,
                )
        s._finish_delete(volume_id, REASON, storage=location_json is not None)
        s.log.append(
            "volume.create.failed",
            {"volume": name, "id": volume_id, "reason": REASON, "storage_left": left},
        )
        logger.info("volume %s: %s", name, REASON)
        return True
