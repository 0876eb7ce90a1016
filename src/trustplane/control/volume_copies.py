"""Clone (and snapshot) a volume under a key of its own; encrypt plaintext storage in place.

Both copy data into a NEW LUKS1 volume formatted under a NEW key that the
KMS generates (ordered like a create: `kms.order`), with one `qemu-img
convert` (volumes/copier.py). The new volume gets its own master key: Cinder
stores the parent's key under a new ID and an RBD clone inherits its
parent's master key, so there one key opens both; here the clone's key
opens nothing of its parent and the parent's nothing of the clone, and
destroying either key (deleting either volume) leaves the other readable.

- clone SRC NEW [--type T]: the owner of SRC (or an admin) with
  `volume.create` on `volume:NEW`; a caller the policy allows `volume.attach`
  on `volume:NEW` must be allowed it on `volume:SRC` too (and without
  attestation only if SRC's rule asks none). SRC must be detached: trustplane cannot
  quiesce a running guest's writes, so a copy of an attached volume would
  not be a point in time; SRC is `cloning` meanwhile (no attach, extend,
  rotation or delete). A snapshot is a clone of a detached volume (there is
  no copy-on-write layer between them, so it costs a full copy and has its
  own key like any clone). Logged `volume.clone`.
- encrypt --source STORAGE NEW --type T (admins: it adopts storage the
  service did not make): plaintext storage on the type's backend (a file
  `DIR/STORAGE.img`, an RBD image, an iSCSI LUN of tgtd) is copied into a
  new LUKS volume whose usable size is the plaintext's; then the swap (when
  NEW is STORAGE and the backend can rename: the plaintext moves to a
  doomed name, the encrypted copy to its name); then the plaintext storage
  is destroyed (volumes/copier.py says what that does and does not erase).
  Refused while the source is in use (`Backend.in_use`: a process or VM
  holding the file, an RBD watcher, a logged-in initiator), before the copy
  and again right before the swap (a writer that came during the copy: the
  copy is undone, the plaintext left as it is). Logged `volume.encrypt`.

Crash safety: a `volume_operations` row is written with the new volume's
record (`creating`, its location the new storage's) before the key or the
storage exist. Until the copy is complete (`copying`) a crash is undone at
the next start: the new key(s) and storage are destroyed, the record goes,
the source is untouched (and a clone's source is `available` again). Once
an encryption's copy is complete and checked (`swapping`), the next start
finishes it forward: the swap, the record, the plaintext's destruction
(`destroying`); unless the swap has not begun and the source is in use
again (a writer that came while the server was down): then it is undone.
Rows started since this server started are left alone (copies running
beside the recovery); like the rotation's recovery, this assumes no other
replica started a copy before this server started and is still running it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from trustplane.api.volume_location import AnyLocation, dump_location, load_location
from trustplane.api.volume_spec import Engine, VolumeTypeSpec, check_volume_size
from trustplane.api.volumes import (
    CloneRequest,
    EncryptRequest,
    HeaderFingerprint,
    VolumeInfo,
    VolumeOperationInfo,
)
from trustplane.control.identity import Principal
from trustplane.control.models import Volume, VolumeOperation
from trustplane.control.volume_reencryption import operation_info
from trustplane.control.volume_states import AVAILABLE, CLONING, CREATING, DELETING, SHREDDED
from trustplane.errors import (
    ConflictError,
    Forbidden,
    IntegrityError,
    NotFoundError,
    ToolError,
    TrustplaneError,
    UnsupportedError,
    UsageError,
)
from trustplane.volumes.backends import Backend
from trustplane.volumes.copier import (
    COPY_CHUNK,
    can_rename,
    check_destroyable,
    compare_with_luks,
    copy_into_luks,
    destroy_plaintext,
    half_renamed,
    rename_storage,
)
from trustplane.volumes.header import PROBE_BYTES, is_luks
from trustplane.volumes.volume import CreatedVolume, create_volume

if TYPE_CHECKING:
    from trustplane.control.volumes import BlockStorage

logger = logging.getLogger("trustplane.volumes")

CLONE, ENCRYPT = "clone", "encrypt"
COPYING, SWAPPING, DESTROYING = "copying", "swapping", "destroying"
"""Phases: `copying` is undone after a crash; `swapping` and `destroying` are finished."""
MIB = 1 << 20

Hook = Callable[[str], None]


class VolumeCopies:
    """Clone and encrypt in place, on top of the block-storage service's pieces."""

    def __init__(self, storage: BlockStorage) -> None:
        self.storage = storage
        self.after_target: Hook | None = None
        """Tests only: called once the new storage is formatted, before the copy."""
        self.after_copy: Hook | None = None
        """Tests only: called once the copy is complete (and, for an encryption, the
        phase is `swapping`), before the swap or the clone's record is finished."""
        self.after_swap: Hook | None = None
        """Tests only: an encryption's new volume took the plaintext's place (phase
        `destroying`), before the plaintext is destroyed."""
        self.chunk = COPY_CHUNK
        """Bytes per `qemu-img convert`: the progress the operation's row records."""

    # -- clone ------------------------------------------------------------------------------

    def clone(
        self, principal: Principal, source_name: str, body: CloneRequest, *, snapshot: bool = False
    ) -> VolumeInfo:
        """A copy of the detached volume `source_name` under a fresh key, as `body.name`."""
        s = self.storage
        src = s._owned(principal, source_name, "clone")
        s._require(principal, "volume.create", f"volume:{body.name}")
        self._no_wider_attach(principal, source_name, body.name)
        if src.attached_to is not None:
            raise UsageError(
                f"volume {source_name} is attached to domain {src.attached_domain} of "
                f"{src.attached_to}; detach it first (a running guest's writes cannot be "
                "quiesced from here, so its copy would not be a point in time)"
            )
        if src.state != AVAILABLE or src.key_id is None or src.location is None:
            raise UsageError(f"volume {source_name} is {src.state}, not available")
        _, src_spec = s._type(src.type_name)
        type_row, spec = s._type(body.volume_type or src.type_name)
        _require_qemu(src_spec, f"volume {source_name}")
        _require_qemu(spec, f"volume type {type_row.name}")
        backend = s.backend(type_row.backend)
        src_backend = s.backend(src.backend)
        if backend.exists(backend.check_name(body.name)):
            raise UsageError(f"{backend.kind} storage named {body.name} exists already")
        row = self._new_row(principal, body.name, type_row.name, type_row.backend, src.size,
                            backend.location(body.name))  # fmt: skip
        op = VolumeOperation(
            id=str(uuid.uuid4()),
            volume_id=row.id,
            kind=CLONE,
            phase=COPYING,
            target=row.location,
            source={"volume_id": src.id, "volume": src.name},
            progress=0,
            total=src.size,
            subject=principal.subject,
        )
        with s.db.write_session() as session:
            if session.scalar(select(Volume.id).where(Volume.name == body.name)) is not None:
                raise UsageError(f"volume {body.name!r} exists already")
            claimed = session.execute(
                update(Volume)
                .where(Volume.id == src.id, Volume.state == AVAILABLE, Volume.attached_to.is_(None))
                .values(state=CLONING)
            ).rowcount  # type: ignore[attr-defined]
            if not claimed:
                raise UsageError(
                    f"volume {source_name} is busy (attached, or being extended, rotated, "
                    "cloned or deleted)"
                )
            session.add(row)
            session.flush()
            session.add(op)
        made = False  # a create refused (storage there after all) removes nothing
        try:
            key_id, key = s._order_key(principal, body.name)
            self._record_key(op.id, row.id, key_id)
            created = create_volume(backend, spec, body.name, src.size, key)
            made = True
            self._hook(self.after_target, body.name)
            source_key = s._key(src.key_id, source_name)
            copy_into_luks(
                backend.executor,
                load_location(src.location),
                source_key,
                created.location,
                key,
                src.size,
                source_credentials=src_backend.credentials(),
                target_credentials=backend.credentials(),
                chunk=self.chunk,
                copied=lambda done: self._progress(op.id, done),
            )
            del source_key, key
            self._hook(self.after_copy, body.name)
        except Exception as exc:
            self._undo(op.id, f"{CLONE} failed", exc, storage=made)
            raise
        fingerprint = _fingerprint(created)
        with s.db.write_session() as session:
            session.execute(
                update(Volume)
                .where(Volume.id == row.id, Volume.state == CREATING)
                .values(state=AVAILABLE, **_recorded(created, fingerprint))
            )
            session.execute(
                update(Volume).where(Volume.id == src.id, Volume.state == CLONING)
                .values(state=AVAILABLE)
            )  # fmt: skip
            session.delete(session.get(VolumeOperation, op.id))
        receipt = s.log.append(
            "volume.clone",
            {
                "subject": principal.subject,
                "volume": body.name,
                "id": row.id,
                "snapshot": snapshot,
                "source": source_name,
                "source_id": src.id,
                "source_secret": src.key_id,
                "secret": key_id,
                "type": type_row.name,
                "size": src.size,
                "header_uuid": fingerprint.uuid,
                "header_digest": fingerprint.digest,
                "location": created.location.describe(),
            },
        )
        logger.info("volume %s cloned from %s (log %d)", body.name, source_name, receipt.index)
        return s.show(principal, body.name)

    def _no_wider_attach(self, principal: Principal, source_name: str, name: str) -> None:
        """Refuse a clone that the caller could attach while the source is refused to it
        (or only to an attested node): the copy would hand out the source's plaintext
        around the policy's `volume.attach` rules. A caller attaching neither (a user
        under the default policy) clones as before."""
        s = self.storage
        new = s.authorize(principal, "volume.attach", f"volume:{name}", None)
        if not new.allowed:
            return
        s._require(principal, "volume.attach", f"volume:{source_name}")
        old = s.authorize(principal, "volume.attach", f"volume:{source_name}", None)
        if old.require_attestation and not new.require_attestation:
            raise Forbidden(
                f"policy releases volume:{source_name} only to attested nodes and "
                f"volume:{name} without attestation; a clone would bypass it"
            )

    # -- encrypt in place ---------------------------------------------------------------------

    def encrypt(self, principal: Principal, body: EncryptRequest) -> VolumeInfo:
        """Plaintext storage `body.source` on the type's backend becomes encrypted volume
        `body.name`; the plaintext storage is destroyed after the copy (admins)."""
        s = self.storage
        s._require(principal, "volume.create", f"volume:{body.name}")
        if principal.role != "admin":
            raise Forbidden(
                "only an admin may encrypt storage in place (it adopts storage the service "
                "did not make)"
            )
        type_row, spec = s._type(body.volume_type)
        _require_qemu(spec, f"volume type {type_row.name}")
        backend = s.backend(type_row.backend)
        source_name = backend.check_name(body.source)
        if not backend.exists(source_name):
            raise NotFoundError(
                f"{backend.kind} storage {source_name} does not exist on backend {type_row.backend}"
            )
        with s.db.session() as session:
            managed = session.scalar(
                select(Volume.name).where(
                    Volume.backend == type_row.backend, Volume.name == source_name
                )
            )
        if managed is not None:
            raise UsageError(f"{source_name} is volume {managed} already; clone it instead")
        source = backend.location(source_name)
        if is_luks(backend.reader(source).read(0, PROBE_BYTES)):
            raise UsageError(f"{source.describe()} starts with a LUKS header; it is encrypted")
        check_destroyable(backend, source)
        _refuse_in_use(backend, source, "")
        size = backend.size(source)
        if size % MIB:
            raise UsageError(
                f"{source.describe()} is {size} bytes; encrypt in place takes a whole number "
                "of MiB (grow it to the next MiB first)"
            )
        check_volume_size(size)
        swap = body.name == source_name
        if swap and not can_rename(backend):
            raise UnsupportedError(
                f"{backend.kind} storage cannot be renamed here: give the encrypted volume "
                "another name (the plaintext is destroyed after the copy all the same)"
            )
        op_id = str(uuid.uuid4())
        target_name = f"{body.name}.enc-{op_id[:8]}" if swap else backend.check_name(body.name)
        doomed_name = f"{source_name}.plain-{op_id[:8]}" if swap else source_name
        for taken in {target_name, doomed_name} - {source_name}:
            if backend.exists(backend.check_name(taken)):
                raise UsageError(f"{backend.kind} storage named {taken} exists already")
        row = self._new_row(principal, body.name, type_row.name, type_row.backend, size,
                            backend.location(target_name))  # fmt: skip
        op = VolumeOperation(
            id=op_id,
            volume_id=row.id,
            kind=ENCRYPT,
            phase=COPYING,
            target=row.location,
            source={
                "storage": dump_location(source),
                "source_name": source_name,
                "target_name": target_name,
                "doomed_name": doomed_name,
                "final_name": body.name,
            },
            progress=0,
            total=size,
            subject=principal.subject,
        )
        with s.db.write_session() as session:
            if session.scalar(select(Volume.id).where(Volume.name == body.name)) is not None:
                raise UsageError(f"volume {body.name!r} exists already")
            session.add(row)
            session.flush()
            session.add(op)
        made = False
        try:
            key_id, key = s._order_key(principal, body.name)
            self._record_key(op.id, row.id, key_id)
            created = create_volume(backend, spec, target_name, size, key)
            made = True
            self._hook(self.after_target, body.name)
            credentials = backend.credentials()
            during = " during the copy (the copy is undone)"
            try:
                copy_into_luks(
                    backend.executor, source, None, created.location, key, size,
                    source_credentials=credentials, target_credentials=credentials,
                    chunk=self.chunk, copied=lambda done: self._progress(op.id, done),
                )  # fmt: skip
                # The plaintext is destroyed after this: read both back and compare first.
                compare_with_luks(
                    backend.executor, source, created.location, key, size, credentials
                )
            except ToolError:
                # QEMU's image locking fails the copy of a file a QEMU writes: say who.
                _refuse_in_use(backend, source, during)
                raise
            del key
            # A writer that came during the copy wrote past what was copied: undone.
            _refuse_in_use(backend, source, during)
            fingerprint = _fingerprint(created)
            with s.db.write_session() as session:
                session.execute(
                    update(Volume)
                    .where(Volume.id == row.id)
                    .values(**_recorded(created, fingerprint))
                )
                session.execute(
                    update(VolumeOperation)
                    .where(VolumeOperation.id == op.id)
                    .values(phase=SWAPPING, progress=size, updated=datetime.now(UTC))
                )
        except Exception as exc:
            self._undo(op.id, f"{ENCRYPT} failed", exc, storage=made)
            raise
        self._hook(self.after_copy, body.name)
        self._finish_encrypt(op.id)
        return s.show(principal, body.name)

    def _finish_encrypt(self, op_id: str) -> None:
        """From `swapping` or `destroying` to done; every step may run again after a crash."""
        s = self.storage
        with s.db.session() as session:
            op = session.get(VolumeOperation, op_id)
            if op is None:
                return
            row = session.get(Volume, op.volume_id)
            assert row is not None
            phase, subject, source_info = op.phase, op.subject, dict(op.source or {})
            name, volume_id, key_id, backend_name = row.name, row.id, row.key_id, row.backend
        backend = s.backend(backend_name)
        names = {k: str(source_info[k]) for k in ("source_name", "target_name", "doomed_name")}
        final_name = str(source_info["final_name"])
        if phase == SWAPPING:
            final = self._swap(backend, names, final_name)
            with s.db.write_session() as session:
                session.execute(
                    update(Volume)
                    .where(Volume.id == volume_id, Volume.state == CREATING)
                    .values(state=AVAILABLE, location=dump_location(final))
                )
                session.execute(
                    update(VolumeOperation)
                    .where(VolumeOperation.id == op_id)
                    .values(phase=DESTROYING, updated=datetime.now(UTC))
                )
            self._hook(self.after_swap, name)
        doomed = backend.location(names["doomed_name"])
        destroy_plaintext(backend, doomed)
        with s.db.session() as session:
            leftover = session.get(VolumeOperation, op_id)
            if leftover is not None:
                session.delete(leftover)
        receipt = s.log.append(
            "volume.encrypt",
            {
                "subject": subject,
                "volume": name,
                "id": volume_id,
                "secret": key_id,
                "source": load_location(str(source_info["storage"])).describe(),
                "swapped": names["doomed_name"] != names["source_name"],
                "plaintext": _destroyed(backend, doomed),
            },
        )
        logger.info("volume %s encrypted in place (log %d)", name, receipt.index)

    @staticmethod
    def _swap(backend: Backend, names: dict[str, str], final_name: str) -> AnyLocation:
        """The encrypted copy under the final name, the plaintext under the doomed one."""
        source, target, doomed = names["source_name"], names["target_name"], names["doomed_name"]
        if target == final_name:  # no swap: the copy was made under its own name
            return backend.location(final_name)
        if backend.exists(target):
            plain = backend.location(source)
            if backend.exists(source) and (
                not backend.exists(doomed) or half_renamed(backend, plain, doomed)
            ):
                rename_storage(backend, plain, doomed)
            rename_storage(backend, backend.location(target), final_name)
        final = backend.location(final_name)
        if not is_luks(backend.reader(final).read(0, PROBE_BYTES)):
            raise IntegrityError(f"{final.describe()} is not the encrypted copy; not swapped")
        return final

    # -- undo and recovery --------------------------------------------------------------------

    def recover(self) -> int:
        """Settle the copies a crash interrupted: undo those still copying, finish the
        encryptions past their copy. How many were settled.

        Only rows started before this server started (`creates.started`): recover runs
        beside the first requests, so a row started since is a copy running right now
        in this process (undoing it would destroy its key and storage under it)."""
        s = self.storage
        started = s.creates.started
        with s.db.session() as session:
            ops = [
                (op.id, op.kind, op.phase)
                for op in session.scalars(
                    select(VolumeOperation).where(VolumeOperation.kind.in_((CLONE, ENCRYPT)))
                )
                if _aware(op.started) < started
            ]
        done = 0
        for op_id, kind, phase in ops:
            try:
                who = self._source_in_use(op_id) if phase == SWAPPING else None
                if phase == COPYING:
                    self._undo(op_id, f"{kind} interrupted by a crash", None)
                elif who is not None:  # a writer came while the server was down
                    self._undo(op_id, f"{kind} interrupted by a crash; source in use: {who}", None)
                else:
                    self._finish_encrypt(op_id)
                done += 1
            except TrustplaneError as exc:
                logger.error("volume operation %s (%s): settling it failed: %s", op_id, kind, exc)
        return done

    def _source_in_use(self, op_id: str) -> str | None:
        """Who uses the plaintext of an encryption a crash left in `swapping`, while its
        swap has not begun (so undoing it leaves the plaintext whole); None otherwise,
        and it is finished forward as before."""
        s = self.storage
        with s.db.session() as session:
            op = session.get(VolumeOperation, op_id)
            row = session.get(Volume, op.volume_id) if op is not None else None
            if op is None or row is None:
                return None
            source_info, backend_name = dict(op.source or {}), row.backend
        backend = s.backend(backend_name)
        source, doomed = str(source_info["source_name"]), str(source_info["doomed_name"])
        if not backend.exists(source) or (doomed != source and backend.exists(doomed)):
            return None  # the swap began: only forward is safe
        return backend.in_use(backend.location(source))

    def _undo(
        self, op_id: str, reason: str, cause: BaseException | None, *, storage: bool = True
    ) -> None:
        """The new volume goes (its keys destroyed, its storage removed, its record
        deleted); the source is left as it was (a clone's is `available` again).

        `storage` False: the new storage was never made by this operation (its create
        was refused), so none is removed. After a crash it is not known: the record
        reserved the name before anything was made, so what is there is the copy's."""
        s = self.storage
        with s.db.write_session() as session:
            op = session.get(VolumeOperation, op_id)
            if op is None:
                return
            row = session.get(Volume, op.volume_id)
            volume_id, name, kind = op.volume_id, row.name if row else "?", op.kind
            if row is not None:
                if row.state not in (DELETING, SHREDDED):
                    row.state = DELETING
                row.key_id = row.key_id or op.key_id
                row.location = op.target  # never the plaintext's: its own new storage
            source_id = (op.source or {}).get("volume_id")
            if kind == CLONE and isinstance(source_id, str):
                session.execute(
                    update(Volume).where(Volume.id == source_id, Volume.state == CLONING)
                    .values(state=AVAILABLE)
                )  # fmt: skip
            session.delete(op)
        try:
            s._finish_delete(volume_id, reason, storage=storage)
        except BaseException as exc:
            logger.error("volume %s: undoing its %s failed: %s", name, kind, exc)
            if cause is None:
                raise
            return
        why = str(cause) if isinstance(cause, TrustplaneError) else type(cause).__name__
        s.log.append(
            f"volume.{kind}.failed",
            {"volume": name, "id": volume_id, "reason": why if cause is not None else reason},
        )

    def progress(self, principal: Principal, name: str) -> VolumeOperationInfo:
        """How far the clone or encryption making volume `name` is (whoever may see it)."""
        row = self.storage._visible(principal, name)
        with self.storage.db.session() as session:
            op = session.scalar(
                select(VolumeOperation).where(
                    VolumeOperation.volume_id == row.id,
                    VolumeOperation.kind.in_((CLONE, ENCRYPT)),
                )
            )
            if op is None:
                raise NotFoundError(f"volume {name} is not being cloned or encrypted")
            return operation_info(name, op)

    def refuse_busy(self, row: Volume) -> None:
        """Refuse to delete a volume that a clone or an encryption reads or writes right
        now (other operations' rows are their own business)."""
        if row.state == CLONING:
            raise UsageError(f"volume {row.name} is being cloned; delete it after that")
        with self.storage.db.session() as session:
            op = session.scalar(
                select(VolumeOperation.kind).where(
                    VolumeOperation.volume_id == row.id,
                    VolumeOperation.kind.in_((CLONE, ENCRYPT)),
                )
            )
        if op is not None:
            raise UsageError(
                f"volume {row.name} is in a running {op} (or one a crash left, which the "
                "server settles at its next start); delete it after that"
            )

    # -- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _new_row(
        principal: Principal,
        name: str,
        type_name: str,
        backend_name: str,
        size: int,
        location: AnyLocation,
    ) -> Volume:
        """The new volume's record: `creating`, its location its new storage's (so that an
        undo removes that storage and nothing else)."""
        return Volume(
            id=str(uuid.uuid4()),
            name=name,
            type_name=type_name,
            backend=backend_name,
            size=size,
            state=CREATING,
            owner=principal.subject,
            created=datetime.now(UTC),
            location=dump_location(location),
        )

    def _record_key(self, op_id: str, volume_id: str, key_id: str) -> None:
        with self.storage.db.session() as session:
            session.execute(update(Volume).where(Volume.id == volume_id).values(key_id=key_id))
            session.execute(
                update(VolumeOperation).where(VolumeOperation.id == op_id).values(key_id=key_id)
            )

    def _progress(self, op_id: str, done: int) -> None:
        with self.storage.db.session() as session:
            session.execute(
                update(VolumeOperation)
                .where(VolumeOperation.id == op_id)
                .values(progress=done, updated=datetime.now(UTC))
            )

    @staticmethod
    def _hook(hook: Hook | None, name: str) -> None:
        if hook is not None:
            hook(name)


def _aware(moment: datetime) -> datetime:
    """SQLite gives naive UTC back."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _require_qemu(spec: VolumeTypeSpec, what: str) -> None:
    if spec.engine is not Engine.QEMU or spec.encryption is None:
        raise UnsupportedError(
            f"{what}: clone and encrypt in place copy through QEMU's LUKS1 driver; "
            f"{spec.engine} volumes are not done"
        )


def _refuse_in_use(backend: Backend, source: AnyLocation, when: str) -> None:
    """ConflictError when something uses the plaintext: its writes would be lost when the
    plaintext is destroyed (asked before the copy and again right before the swap)."""
    who = backend.in_use(source)
    if who is not None:
        raise ConflictError(
            f"{source.describe()} is in use{when}: {who}; stop it and encrypt again "
            "(the plaintext is left as it is)"
        )


def _fingerprint(created: CreatedVolume) -> HeaderFingerprint:
    assert created.fingerprint is not None
    return created.fingerprint


def _recorded(created: CreatedVolume, fingerprint: HeaderFingerprint) -> dict[str, Any]:
    assert created.engine is not None
    return {
        "location": dump_location(created.location),
        "engine": created.engine.value,
        "header_uuid": fingerprint.uuid,
        "header_digest": fingerprint.digest,
        "fingerprint": fingerprint.model_dump(mode="json"),
    }


def _destroyed(backend: Backend, location: AnyLocation) -> str:
    kind = backend.kind.value
    if kind in ("file", "iscsi"):
        return f"{location.describe()}: overwritten with zeros where it held data, then removed"
    return f"{location.describe()}: removed (rbd rm; its freed extents are not overwritten)"
