"""Re-encryption: a detached volume's data moved under a new master key and a new KMS key.

`volume rotate-key` changes only the wrapping passphrase (a key slot); the
master key that encrypts the data stays, so whoever copied the old key (or
the master key from a VM's memory) still reads the storage. Re-encryption
copies the whole volume into new storage formatted under a new key, then
destroys the old storage and the old KMS key.

One `volume_operations` row (kind `reencrypt`) drives it, each step
committed before the next starts, so a crash anywhere (`kill -9`) is
carried on from the recorded point by the server's next start (`resume_all`)
or by asking again:

1. `ordering`: the volume goes `available` → `reencrypting` (no attach, no
   extend, no rotation meanwhile) and the row is inserted in one
   transaction, naming the old key and storage (`source`) and the new
   storage (`target`) before anything is made. Then the KMS orders the new
   key and the row records its UUID. A key ordered by a run that died before
   recording it is destroyed when the step is run again.
2. `creating`: the target is created and LUKS-formatted under the new key
   (a half-made target left by a crash is removed first).
3. `copying`: both volumes opened in user space (old key / new key) and the
   plaintext copied in chunks; `progress` is updated after each chunk is
   flushed to the new storage, so a resume starts from there.
4. The switch, one transaction: the volume record takes the new key,
   location and header fingerprint; the row goes to `destroying`.
5. `destroying`: the old storage's LUKS header (its key slots) is
   overwritten with zeros, the old KMS key is destroyed (crypto-shredding
   the old storage), then the old storage is deleted; the row is deleted
   and the volume is `available` again.

A failure that is not a crash (a tool or the backend refused) before the
switch undoes the operation: target and new key removed, the volume as it
was. After the switch it is left to be finished by a resume.

Only one process runs an operation: the row names its runner (host, pid and
the pid's start time); another process takes it over only when that runner
is dead (same host) or has not advanced the row for `STALE` (another host).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from trustplane.api.volume_location import AnyLocation, dump_location, load_location
from trustplane.api.volume_spec import Engine, VolumeTypeSpec
from trustplane.api.volumes import HeaderFingerprint, VolumeInfo, VolumeOperationInfo
from trustplane.control.identity import Principal
from trustplane.control.models import Volume, VolumeOperation
from trustplane.control.volume_states import AVAILABLE, REENCRYPTING
from trustplane.errors import NotFoundError, TrustplaneError, UnsupportedError, UsageError
from trustplane.volumes.attachers.userspace import UserspaceRecord
from trustplane.volumes.backends import Backend
from trustplane.volumes.reencryption import (
    DEFAULT_CHUNK,
    copy,
    create_target,
    stop_leftovers,
    user_space_encryptor,
    wipe_header,
)

if TYPE_CHECKING:
    from trustplane.control.volumes import BlockStorage

logger = logging.getLogger("trustplane.volumes")

KIND = "reencrypt"
ORDERING, CREATING, COPYING, DESTROYING = "ordering", "creating", "copying", "destroying"
STALE = timedelta(minutes=5)
"""A runner on another host that has not advanced the row for this long is taken over."""

_RUNNING: set[str] = set()
"""Volume ids whose re-encryption runs in this process (any BlockStorage of it)."""
_RUNNING_LOCK = threading.Lock()


def _pid_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot), None if it is gone."""
    try:
        with Path(f"/proc/{pid}/stat").open(encoding="ascii", errors="replace") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[19] if len(fields) > 19 else None


def _runner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _pid_start(os.getpid())}


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def operation_info(name: str, op: VolumeOperation) -> VolumeOperationInfo:
    """What a client sees of a running operation (re-encryption, clone, encryption)."""
    return VolumeOperationInfo(
        volume=name,
        kind=op.kind,
        phase=op.phase,
        key_id=op.key_id,
        progress=op.progress,
        total=op.total,
        subject=op.subject,
        started=_aware(op.started),
        updated=_aware(op.updated),
    )


class Reencryption:
    """The state machine; BlockStorage holds one (`BlockStorage.reencryption`)."""

    def __init__(self, storage: BlockStorage) -> None:
        self.storage = storage
        self.chunk = DEFAULT_CHUNK
        self.after_step: Callable[[str, str], None] | None = None
        """Tests only (set in-process): called with (volume, step) after `key made` (not
        recorded yet), `ordered`, `created`, each flushed `chunk`, `switched` and
        `shredded`, to crash there."""

    # -- requests -------------------------------------------------------------------------

    def start(self, principal: Principal, name: str) -> VolumeInfo:
        """Re-encrypt detached volume `name` (owner or admin); resumes one left by a crash."""
        storage = self.storage
        row = storage._owned(principal, name, "re-encrypt")
        if row.attached_to is not None:
            raise UsageError(
                f"volume {name} is attached to domain {row.attached_domain} of "
                f"{row.attached_to}; detach it first (an attached volume is not re-encrypted)"
            )
        _, spec = storage._type(row.type_name)
        self._engine(spec)  # not done for this engine: say so first
        if row.state == REENCRYPTING:
            op = self._op(row.id)
            if op is None or not self._may_take_over(op):
                raise UsageError(
                    f"volume {name} is being re-encrypted "
                    f"({op.progress if op else 0} of {row.size} bytes copied)"
                )
            self._run(op.id, principal.subject)
            return storage.show(principal, name)
        if row.state != AVAILABLE or row.key_id is None or row.location is None:
            raise UsageError(f"volume {name} is {row.state}, not available")
        if storage.store.rows.get(row.key_id) is None:
            raise NotFoundError(f"the key of volume {name} does not exist (it was destroyed)")
        backend = storage.backend(row.backend)
        target_name, target = self._target(backend, name)
        op = VolumeOperation(
            id=str(uuid.uuid4()),
            volume_id=row.id,
            kind=KIND,
            phase=ORDERING,
            key_id=None,
            target=dump_location(target),
            source={
                "key_id": row.key_id,
                "location": row.location,
                "fingerprint": row.fingerprint,
                "target_name": target_name,
                "runner": _runner(),
                "daemons": [],
            },
            progress=0,
            total=row.size,
            subject=principal.subject,
            started=datetime.now(UTC),
            updated=datetime.now(UTC),
        )
        with storage.db.write_session() as session:
            current = session.get(Volume, row.id)
            busy = session.scalar(
                select(VolumeOperation.id).where(VolumeOperation.volume_id == row.id)
            )
            if current is None or current.state != AVAILABLE or current.attached_to is not None:
                state = current.state if current is not None else "gone"
                raise UsageError(f"volume {name} is {state} or attached; not re-encrypted")
            if busy is not None:
                raise UsageError(f"volume {name} has an operation running")
            current.state = REENCRYPTING
            session.add(op)
        storage.log.append(
            "volume.reencrypt",
            {"subject": principal.subject, "volume": name, "id": row.id, "stage": "start",
             "from": row.key_id, "target": target.describe(), "bytes": row.size},
        )  # fmt: skip
        self._run(op.id, principal.subject)
        return storage.show(principal, name)

    def status(self, principal: Principal, name: str) -> VolumeOperationInfo:
        """The running operation of a volume the caller may see (NotFoundError: none)."""
        row = self.storage._visible(principal, name)
        op = self._op(row.id)
        if op is None:
            raise NotFoundError(f"volume {name} has no operation running")
        return operation_info(name, op)

    def resume_all(self) -> int:
        """At start: carry on every re-encryption whose runner is gone; how many finished."""
        with self.storage.db.session() as session:
            ops = list(session.scalars(select(VolumeOperation).where(VolumeOperation.kind == KIND)))
        done = 0
        for op in ops:
            if not self._may_take_over(op):
                continue
            try:
                self._run(op.id, "service:block-storage")
                done += 1
            except TrustplaneError as exc:
                logger.error("volume %s: resuming its re-encryption failed: %s", op.volume_id, exc)
        return done

    # -- the state machine -------------------------------------------------------------------

    def _run(self, op_id: str, by: str) -> None:
        """Run the operation from its recorded phase to the end; `by`: who asked (logged
        when it is a resume)."""
        op = self._op_by_id(op_id)
        with _RUNNING_LOCK:
            if op.volume_id in _RUNNING:
                raise UsageError("this volume's re-encryption is running")
            _RUNNING.add(op.volume_id)
        try:
            self._claim_runner(op, by)
            self._steps(op_id)
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(op.volume_id)

    def _claim_runner(self, op: VolumeOperation, by: str) -> None:
        source = dict(op.source or {})
        fresh = source.get("runner") == _runner()
        source["runner"] = _runner()
        self._update(op.id, source=source)
        if not fresh or op.phase != ORDERING or op.key_id is not None:
            row = self.storage._by_id(op.volume_id)
            self.storage.log.append(
                "volume.reencrypt",
                {"subject": by, "volume": row.name, "id": row.id, "stage": "resume",
                 "phase": op.phase, "progress": op.progress, "total": op.total},
            )  # fmt: skip

    def _steps(self, op_id: str) -> None:
        storage = self.storage
        while True:
            op = self._op_by_id(op_id)
            row = storage._by_id(op.volume_id)
            _, spec = storage._type(row.type_name)
            engine = self._engine(spec)
            backend = storage.backend(row.backend)
            source = dict(op.source or {})
            if op.phase == DESTROYING:
                self._destroy(op, row, backend, source)
                return
            try:
                if op.phase == ORDERING:
                    self._order(op, row)
                elif op.phase == CREATING:
                    self._create(op, row, backend, engine, spec)
                elif op.phase == COPYING:
                    self._copy(op, row, backend, engine, source)
                    self._switch(op, row, backend, engine)
                else:
                    raise UsageError(f"re-encryption phase {op.phase!r} is not known")
            except TrustplaneError as exc:
                self._undo(op_id, exc)
                raise

    def _order(self, op: VolumeOperation, row: Volume) -> None:
        # A key a dead run ordered but did not record is not the volume's: destroyed.
        self._destroy_keys(row.name, keep=row.key_id, reason="re-encryption restarted")
        # Ordered for whoever asked for the re-encryption (kms.order names them).
        kind, _, who = op.subject.partition(":")
        principal = Principal(
            "node" if kind == "node" else "user", who or kind, "user", frozenset()
        )
        new_id, new_key = self.storage._order_key(principal, row.name)
        del new_key
        self._step(row.name, "key made")
        self._update(op.id, key_id=new_id, phase=CREATING)
        self._step(row.name, "ordered")

    def _create(
        self,
        op: VolumeOperation,
        row: Volume,
        backend: Backend,
        engine: Engine,
        spec: VolumeTypeSpec,
    ) -> None:
        assert op.key_id is not None
        assert op.target is not None
        assert spec.encryption is not None
        target = load_location(op.target)
        name = str((op.source or {})["target_name"])
        self._remove_target(backend, target, row.name)  # half made by a dead run
        key = self.storage._key(op.key_id, row.name)
        made = create_target(backend, engine, spec.encryption, name, op.total, key)
        del key
        if dump_location(made) != op.target:
            backend.delete(made)
            raise UsageError(f"the new storage is at {made.describe()}, not the recorded one")
        self._update(op.id, phase=COPYING, progress=0)
        self._step(row.name, "created")

    def _copy(
        self,
        op: VolumeOperation,
        row: Volume,
        backend: Backend,
        engine: Engine,
        source: dict[str, Any],
    ) -> None:
        assert op.key_id is not None
        assert op.target is not None
        stop_leftovers(backend.executor, _daemons(source))
        old_location = load_location(source["location"])
        encryptor = user_space_encryptor(engine, backend.executor)
        credentials = backend.credentials()
        # A volume replaced behind the service is not copied.
        encryptor.verify_header(
            old_location, HeaderFingerprint.model_validate(source["fingerprint"]), credentials
        )
        old_key = self.storage._key(source["key_id"], row.name)
        new_key = self.storage._key(op.key_id, row.name)

        def opened(records: Sequence[UserspaceRecord]) -> None:
            self._update(op.id, source={**source, "daemons": [r.model_dump() for r in records]})

        def flushed(end: int) -> None:
            self._update(op.id, progress=end)
            self._step(row.name, "chunk")

        copy(
            backend, engine, old_location, old_key, load_location(op.target), new_key,
            start=op.progress, total=op.total, flushed=flushed, opened=opened, chunk=self.chunk,
        )  # fmt: skip
        del old_key, new_key
        self._update(op.id, source={**source, "daemons": []})

    def _switch(self, op: VolumeOperation, row: Volume, backend: Backend, engine: Engine) -> None:
        """The record takes the new key, storage and header in one transaction."""
        assert op.target is not None
        target = load_location(op.target)
        encryptor = user_space_encryptor(engine, backend.executor)
        fingerprint = encryptor.fingerprint(backend.reader(target))
        with self.storage.db.write_session() as session:
            volume = session.get(Volume, row.id)
            current = session.get(VolumeOperation, op.id)
            if volume is None or current is None or current.phase != COPYING:
                raise UsageError(f"volume {row.name} changed while it was re-encrypted")
            volume.key_id = op.key_id
            volume.location = op.target
            volume.header_uuid = fingerprint.uuid
            volume.header_digest = fingerprint.digest
            volume.fingerprint = fingerprint.model_dump(mode="json")
            current.phase = DESTROYING
            current.updated = datetime.now(UTC)
        self._step(row.name, "switched")

    def _destroy(
        self, op: VolumeOperation, row: Volume, backend: Backend, source: dict[str, Any]
    ) -> None:
        """The old header wiped, the old key (and any stray key of the volume) destroyed,
        the old storage deleted, then done. Each step may run again after a crash."""
        old = load_location(source["location"])
        stale = dump_location(old) != row.location
        if stale and not source.get("wiped"):
            _, spec = self.storage._type(row.type_name)
            assert spec.encryption is not None
            wipe_header(backend, self._engine(spec), spec.encryption, old)
            self._update(op.id, source={**source, "wiped": True})
        self._destroy_keys(row.name, keep=row.key_id, reason="re-encrypted")
        self._step(row.name, "shredded")
        if stale:
            backend.delete(old)
        with self.storage.db.session() as session:
            session.execute(
                update(Volume)
                .where(Volume.id == row.id, Volume.state == REENCRYPTING)
                .values(state=AVAILABLE)
            )
            current = session.get(VolumeOperation, op.id)
            if current is not None:
                session.delete(current)
        self.storage.log.append(
            "volume.reencrypt",
            {"subject": op.subject, "volume": row.name, "id": row.id, "stage": "finish",
             "from": source["key_id"], "to": row.key_id, "location": old.describe(),
             "bytes": op.total},
        )  # fmt: skip
        logger.info("volume %s re-encrypted under key %s", row.name, row.key_id)

    def _undo(self, op_id: str, cause: TrustplaneError) -> None:
        """A failure before the switch: remove the target and the new key; as it was."""
        storage = self.storage
        try:
            op = self._op_by_id(op_id)
            row = storage._by_id(op.volume_id)
            if op.phase == DESTROYING:
                return  # switched: a resume finishes it
            backend = storage.backend(row.backend)
            source: dict[str, Any] = dict(op.source or {})
            stop_leftovers(backend.executor, _daemons(source))
            if op.target is not None:
                self._remove_target(backend, load_location(op.target), row.name)
            self._destroy_keys(row.name, keep=row.key_id, reason="re-encryption failed")
            with storage.db.session() as session:
                session.execute(
                    update(Volume)
                    .where(Volume.id == row.id, Volume.state == REENCRYPTING)
                    .values(state=AVAILABLE)
                )
                current = session.get(VolumeOperation, op_id)
                if current is not None:
                    session.delete(current)
        except TrustplaneError as exc:
            logger.error("undoing a failed re-encryption failed too (a resume retries): %s", exc)
            return
        storage.log.append(
            "volume.reencrypt",
            {"subject": op.subject, "volume": row.name, "id": row.id, "stage": "failed",
             "reason": str(cause)},
        )  # fmt: skip

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _engine(spec: VolumeTypeSpec) -> Engine:
        if spec.engine is None or spec.encryption is None:
            raise UnsupportedError("a plain volume has no key to rotate")
        if spec.engine not in (Engine.QEMU, Engine.LIBRBD):
            raise UnsupportedError(
                f"re-encrypting {spec.engine} volumes is not done: it needs device-mapper "
                "on the storage host (QEMU LUKS1 and librbd volumes only)"
            )
        return spec.engine

    @staticmethod
    def _target(backend: Backend, name: str) -> tuple[str, AnyLocation]:
        """The new storage's name (the volume's and a random suffix) and where it will be."""
        for _ in range(8):
            candidate = backend.check_name(f"{name[:117]}.re{secrets.token_hex(4)}")
            if not backend.exists(candidate):
                return candidate, backend.location(candidate)
        raise UsageError(f"no free storage name for the re-encryption of {name}")

    def _remove_target(self, backend: Backend, target: AnyLocation, name: str) -> None:
        """Remove the target storage, unless a volume record names it (it is not ours then)."""
        text = dump_location(target)
        with self.storage.db.session() as session:
            owner = session.scalar(select(Volume.name).where(Volume.location == text))
        if owner is not None:
            raise UsageError(f"{target.describe()} is volume {owner}'s; not removed")
        backend.delete(target)

    def _destroy_keys(self, name: str, keep: str | None, reason: str) -> None:
        storage = self.storage
        for doomed in storage._other_keys(name, keep):
            storage.log.append(
                "kms.delete",
                {"subject": "service:block-storage", "secret": doomed, "for": f"volume:{name}",
                 "reason": reason},
            )  # fmt: skip
            storage.store.rows.delete(doomed)

    def _may_take_over(self, op: VolumeOperation) -> bool:
        with _RUNNING_LOCK:
            if op.volume_id in _RUNNING:
                return False
        runner = (op.source or {}).get("runner")
        if not isinstance(runner, dict):
            return True
        if runner.get("host") != socket.gethostname():
            return datetime.now(UTC) - _aware(op.updated) > STALE
        pid = runner.get("pid")
        if pid == os.getpid() and runner.get("start") == _pid_start(os.getpid()):
            return True  # this process, which is not running it (a simulated crash)
        return not isinstance(pid, int) or _pid_start(pid) != runner.get("start")

    def _op(self, volume_id: str) -> VolumeOperation | None:
        with self.storage.db.session() as session:
            return session.scalar(
                select(VolumeOperation).where(
                    VolumeOperation.volume_id == volume_id, VolumeOperation.kind == KIND
                )
            )

    def _op_by_id(self, op_id: str) -> VolumeOperation:
        with self.storage.db.session() as session:
            op = session.get(VolumeOperation, op_id)
        if op is None:
            raise NotFoundError(f"volume operation {op_id} does not exist")
        return op

    def _update(self, op_id: str, **values: Any) -> None:
        with self.storage.db.session() as session:
            session.execute(
                update(VolumeOperation)
                .where(VolumeOperation.id == op_id)
                .values(updated=datetime.now(UTC), **values)
            )

    def _step(self, name: str, step: str) -> None:
        if self.after_step is not None:
            self.after_step(name, step)


def _daemons(source: dict[str, Any]) -> list[UserspaceRecord]:
    """The daemons a copy recorded as running (a dead run's, when it is not running)."""
    recorded = source.get("daemons")
    if not isinstance(recorded, list):
        return []
    return [UserspaceRecord.model_validate(d) for d in recorded]
