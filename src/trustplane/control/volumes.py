"""The block-storage service: volume types, encrypted volumes, the attach key release.

What Cinder and Barbican do for an encrypted volume, in one place:

- create: the KMS generates the volume's key (an order, as Barbican's);
  the record keeps only the key's UUID, then the storage is created and
  LUKS-formatted under it (volumes/volume.py), and the header's UUID and
  digest go on the record. A name that exists is refused; nothing ever
  formats a volume that exists. A crash mid-create is settled at the next
  start (control/volume_create_recovery.py).
- attach: the key is released to a caller the policy allows
  `volume.attach` on `volume:NAME` (through the attestation gate when the
  rule asks for it), and only while the volume is not attached to another
  domain; the attachment is recorded, every decision logged before the key
  is handed out (control/release.py).
- verify: the raw storage read back and checked against the record and
  the type (volumes/verification.py): the LUKS header, its UUID and digest,
  the cipher, sampled payload sectors; logged.
- extend (offline): a detached volume grows to the usable size asked for
  (the LUKS header comes on top; `Backend.grow` on every backend); the state
  `extending` keeps an attach out meanwhile, and a crash there is put back to
  `available` at the next start (growing again to the same size is harmless).
  Online (attached) on the attachment's host: control/volume_extend.py.
- rotate (the wrapping passphrase only): a new KMS key gets a key slot
  of its own (`qemu-img amend`), the record switches to it only once it
  opens the volume, then every other key of the volume (found by its KMS
  name) loses its slot and is destroyed, and the header fingerprint is
  taken again (`_settle`). A crash anywhere leaves `rotating` and a volume
  that the recorded key opens; the next start settles it (the new key kept
  if the record had switched, else dropped; a rotation asked meanwhile is
  refused, since another replica may be running it), and a delete destroys
  every key of the volume.
- delete: crypto-shredding first (the KMS secret is destroyed: no copy of
  the storage can be opened after that), then the storage. The record's
  state says how far a delete got, so a crash in between is finished at the
  next start (`recover`) or the next delete.

Volume keys are secrets of the secret store whose creator is the service
itself (`service:block-storage`): no user or node is on their ACL, so the
generic `/v1/secrets/…/payload` serves them to nobody; administrators see
their metadata (and may destroy them, which shreds the volume).
"""

from __future__ import annotations

import base64
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select, update

from trustplane.api.volume_location import Endpoint, dump_location, load_location
from trustplane.api.volume_spec import (
    VOLUME_KEY_BYTES,
    BackendKind,
    Engine,
    VolumeTypeSpec,
    check_volume_size,
)
from trustplane.api.volumes import (
    Attachment,
    HeaderFingerprint,
    NewVolume,
    NewVolumeType,
    VolumeInfo,
    VolumeKeyRelease,
    VolumeTypeInfo,
    VolumeVerification,
)
from trustplane.control import volume_wrap
from trustplane.control.db import Database
from trustplane.control.identity import Principal
from trustplane.control.models import Secret, Volume, VolumeOperation, VolumeType
from trustplane.control.release import Authorize, Gate, Release
from trustplane.control.settings import ServerSettings, VolumeBackendSettings
from trustplane.control.transparency import TransparencyLog
from trustplane.control.volume_copies import VolumeCopies
from trustplane.control.volume_create_recovery import InterruptedCreates
from trustplane.control.volume_extend import KIND as EXTEND_ONLINE
from trustplane.control.volume_states import (
    AVAILABLE,
    CREATING,
    DELETING,
    EXTENDING,
    REENCRYPTING,
    ROTATING,
    SHREDDED,
)
from trustplane.errors import (
    DecryptionKeyError,
    Forbidden,
    IntegrityError,
    NotFoundError,
    TrustplaneError,
    UnavailableError,
    UsageError,
)
from trustplane.keys.secret_store import SecretStore
from trustplane.volumes.backends import (
    Backend,
    FileBackend,
    IscsiBackend,
    LvmBackend,
    RbdBackend,
)
from trustplane.volumes.header import fingerprint as header_fingerprint
from trustplane.volumes.verification import DEFAULT_SAMPLES, verify_encryption
from trustplane.volumes.volume import create_volume, delete_volume, extend_volume, key_slots

logger = logging.getLogger("trustplane.volumes")


@dataclass(frozen=True)
class ServiceIdentity:
    """The block-storage service as the creator of volume keys (no one logs in as it)."""

    subject: str = "service:block-storage"
    role: str = "service"


SERVICE = ServiceIdentity()


def open_backend(name: str, config: VolumeBackendSettings) -> Backend:
    """The driver for one configured backend; UsageError naming it when it cannot be."""
    where = f"volume_backends.{name}"
    try:
        if config.kind is BackendKind.FILE:
            assert config.directory is not None
            return FileBackend(config.directory)
        if config.kind is BackendKind.ISCSI:
            assert config.directory is not None
            assert config.portal is not None
            options: dict[str, Any] = {"control_port": config.control_port}
            if config.iqn_prefix:
                options["iqn_prefix"] = config.iqn_prefix
            return IscsiBackend(config.directory, _endpoint(config.portal, where), **options)
        if config.kind is BackendKind.LVM:
            assert config.volume_group is not None
            return LvmBackend(config.volume_group)
        assert config.pool
        assert config.user
        assert config.key_file
        try:
            key = base64.b64decode(config.key_file.read_text().strip(), validate=True)
        except (OSError, ValueError) as exc:
            raise UsageError(f"{where}.key_file: not a readable cephx key ({exc})") from None
        monitors = [_endpoint(m, where) for m in config.monitors]
        return RbdBackend(config.pool, config.user, monitors, key)
    except UsageError as exc:
        raise UsageError(f"{where}: {exc}") from None
    except OSError as exc:
        raise UsageError(f"{where}: {exc.strerror or exc}") from None


def _endpoint(text: str, where: str) -> Endpoint:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"{where}: {text!r} is not HOST:PORT")
    try:
        return Endpoint(host=host.strip("[]"), port=int(port))
    except ValueError as exc:
        raise UsageError(f"{where}: {text!r}: {exc}") from None


class SimulatedCrash(BaseException):
    """Raised by a test's hook (`after_shred`, `creates.at_step`, …): the process
    'dies' right there (nothing is undone)."""


class BlockStorage:
    def __init__(
        self,
        db: Database,
        store: SecretStore,
        log: TransparencyLog,
        authorize: Authorize,
        gate: Gate,
        settings: ServerSettings,
    ) -> None:
        self.db = db
        self.store = store
        self.log = log
        self.authorize = authorize
        self.gate = gate
        self._configs = dict(settings.volume_backends)
        # Opened at start: a backend configured wrong stops the server with one line.
        self._backends = {name: open_backend(name, c) for name, c in self._configs.items()}
        self.after_new_slot: Callable[[str], None] | None = None
        self.after_switch: Callable[[str], None] | None = None
        """Tests only: called in a rotation after the new key slot works, and after
        the record switched to the new key, to crash there."""
        self.after_shred: Callable[[str], None] | None = None
        """Tests only (set in-process, never from configuration): called between
        the key's destruction and the storage's, to crash there."""
        from trustplane.control.volume_reencryption import Reencryption

        self.reencryption = Reencryption(self)
        """Re-encryption under a new master key (control/volume_reencryption.py)."""
        self.copies = VolumeCopies(self)
        """Clone, snapshot and encrypt in place (control/volume_copies.py)."""
        self.creates = InterruptedCreates(self)
        """Creates a crash interrupted, settled at the next start
        (control/volume_create_recovery.py)."""

    # -- backends ---------------------------------------------------------------------

    def backend(self, name: str) -> Backend:
        backend = self._backends.get(name)
        if backend is None:
            raise UsageError(
                f"no volume backend {name!r} is configured on this server "
                f"(configured: {', '.join(sorted(self._configs)) or 'none'})"
            )
        return backend

    # -- volume types -----------------------------------------------------------------

    def create_type(self, principal: Principal, body: NewVolumeType) -> VolumeTypeInfo:
        self._require(principal, "volume.type.create", f"volume-type:{body.name}")
        kind = self.backend(
            body.backend
        ).kind  # a backend not configured: one line naming those that are
        spec_input: dict[str, Any] = {"backend": kind}
        if body.encryption is not None:
            spec_input["encryption"] = body.encryption
        try:
            spec = VolumeTypeSpec.model_validate(spec_input)
        except ValueError as exc:
            raise UsageError(f"volume type {body.name}: {_first_error(exc)}") from None
        row = VolumeType(
            name=body.name,
            backend=body.backend,
            spec=spec.model_dump(mode="json"),
            creator=principal.subject,
            created=datetime.now(UTC),
        )
        with self.db.write_session() as session:
            if session.get(VolumeType, body.name) is not None:
                raise UsageError(f"volume type {body.name!r} exists already")
            session.add(row)
        self.log.append(
            "volume.type.create",
            {
                "subject": principal.subject,
                "type": body.name,
                "backend": body.backend,
                "spec": row.spec,
            },
        )
        return _type_info(row)

    def types(self, principal: Principal) -> list[VolumeTypeInfo]:
        with self.db.session() as session:
            rows = session.scalars(select(VolumeType).order_by(VolumeType.name)).all()
        return [_type_info(row) for row in rows]

    def _type(self, name: str) -> tuple[VolumeType, VolumeTypeSpec]:
        with self.db.session() as session:
            row = session.get(VolumeType, name)
        if row is None:
            raise NotFoundError(f"volume type {name!r} does not exist")
        return row, VolumeTypeSpec.model_validate(row.spec)

    # -- create -------------------------------------------------------------------------

    def create(self, principal: Principal, body: NewVolume) -> VolumeInfo:
        """Order a key, create and format the storage under it; the record keeps the key's UUID."""
        self._require(principal, "volume.create", f"volume:{body.name}")
        size = check_volume_size(body.size)
        type_row, spec = self._type(body.volume_type)
        backend = self.backend(type_row.backend)
        if backend.exists(backend.check_name(body.name)):
            raise UsageError(f"{backend.kind} storage named {body.name} exists already")
        row = Volume(
            id=str(uuid.uuid4()),
            name=body.name,
            type_name=type_row.name,
            backend=type_row.backend,
            size=size,
            state=CREATING,
            owner=principal.subject,
            created=datetime.now(UTC),
        )
        with self.db.write_session() as session:
            if session.scalar(select(Volume.id).where(Volume.name == body.name)) is not None:
                raise UsageError(f"volume {body.name!r} exists already")
            session.add(row)
        try:
            self.creates.step("record", body.name)
            key_id, key = self._order_key(principal, body.name)
            self.creates.step("key", body.name)
            self._set(row.id, key_id=key_id)
            self.creates.step("key-recorded", body.name)
            made = self.creates.made(row.id, backend, body.name)
            created = create_volume(backend, spec, body.name, size, key, made)
            del key
            self.creates.step("formatted", body.name)
        except BaseException as exc:
            if not isinstance(exc, SimulatedCrash):  # a crash leaves it to `recover`
                self._undo_create(row.id, body.name, exc)
            raise
        assert created.fingerprint is not None
        assert created.engine is not None
        fingerprint = created.fingerprint
        finished = self._set(
            row.id,
            only_if=CREATING,
            state=AVAILABLE,
            location=dump_location(created.location),
            engine=created.engine.value,
            header_uuid=fingerprint.uuid,
            header_digest=fingerprint.digest,
            fingerprint=fingerprint.model_dump(mode="json"),
        )
        if not finished:  # deleted while it was being made: its key is gone, so is it
            delete_volume(backend, created.location)
            raise UsageError(f"volume {body.name} was deleted while it was being created")
        receipt = self.log.append(
            "volume.create",
            {
                "subject": principal.subject,
                "volume": body.name,
                "id": row.id,
                "type": type_row.name,
                "size": size,
                "secret": key_id,
                "engine": created.engine.value,
                "header_uuid": fingerprint.uuid,
                "header_digest": fingerprint.digest,
                "location": created.location.describe(),
            },
        )
        logger.info("volume %s created (log %d)", body.name, receipt.index)
        return self.show(principal, body.name)

    def _order_key(self, principal: Principal, name: str) -> tuple[str, bytes]:
        """A new 256-bit key generated by the KMS, as a Barbican order for a key;
        logged as such. The key is returned for the format only."""
        record = self.store.create(
            SERVICE,
            name=f"volume:{name}",
            secret_type="symmetric",  # noqa: S106 - a kind of secret
            payload=None,
            algorithm="aes",
            bit_length=VOLUME_KEY_BYTES * 8,
        )
        self.log.append(
            "kms.order",
            {
                "subject": principal.subject,
                "secret": record.id,
                "type": "symmetric",
                "bit_length": VOLUME_KEY_BYTES * 8,
                "for": f"volume:{name}",
            },
        )
        return record.id, self.store.unseal(record)

    def _undo_create(self, volume_id: str, name: str, cause: BaseException) -> None:
        """A create that failed leaves nothing: no key, no record (and no storage:
        `create_volume` removes what it made, and never touches what it did not)."""
        try:
            self._finish_delete(volume_id, "create failed", storage=False)
        except BaseException as exc:
            logger.error("volume %s: undoing a failed create failed too: %s", name, exc)
            return
        reason = str(cause) if isinstance(cause, TrustplaneError) else type(cause).__name__
        self.log.append("volume.create.failed", {"volume": name, "id": volume_id, "reason": reason})

    # -- read ---------------------------------------------------------------------------

    def _row(self, name: str) -> Volume | None:
        with self.db.session() as session:
            return session.scalar(select(Volume).where(Volume.name == name))

    def _may_see(self, principal: Principal, row: Volume) -> bool:
        if principal.role == "admin" or principal.subject == row.owner:
            return True
        return self.authorize(principal, "volume.attach", f"volume:{row.name}", None).allowed

    def _visible(self, principal: Principal, name: str) -> Volume:
        row = self._row(name)
        if row is None or not self._may_see(principal, row):
            raise NotFoundError(f"volume {name!r} does not exist")
        return row

    def show(self, principal: Principal, name: str) -> VolumeInfo:
        return _info(self._visible(principal, name))

    def volumes(self, principal: Principal) -> list[VolumeInfo]:
        with self.db.session() as session:
            rows = session.scalars(select(Volume).order_by(Volume.name)).all()
        return [_info(row) for row in rows if self._may_see(principal, row)]

    def _owned(self, principal: Principal, name: str, what: str) -> Volume:
        """The volume, for its owner or an admin (others who may see it: Forbidden)."""
        row = self._visible(principal, name)
        if principal.subject != row.owner and principal.role != "admin":
            raise Forbidden(f"only the owner of volume {name} or an admin may {what} it")
        return row

    # -- verify: prove the storage is encrypted -----------------------------------------

    def verify(
        self, principal: Principal, name: str, samples: int = DEFAULT_SAMPLES
    ) -> VolumeVerification:
        """Read the raw storage and check it against the record and the type; logged.

        A failed check is an answer (`passed` false), not an error: monitoring
        reads which one failed."""
        row = self._owned(principal, name, "verify")
        if row.state != AVAILABLE or row.location is None or row.fingerprint is None:
            raise UsageError(f"volume {name} is {row.state}; only an available volume is verified")
        backend = self.backend(row.backend)
        location = load_location(row.location)
        _, spec = self._type(row.type_name)
        assert spec.encryption is not None
        expected = HeaderFingerprint.model_validate(row.fingerprint)
        checks, payload = verify_encryption(
            backend.reader(location), expected, spec.encryption, row.size, samples
        )
        passed = all(c.passed for c in checks)
        receipt = self.log.append(
            "volume.verify",
            {
                "subject": principal.subject,
                "volume": name,
                "id": row.id,
                "passed": passed,
                "failed": [c.name for c in checks if not c.passed],
                "samples": payload.sampled,
            },
        )
        return VolumeVerification(
            volume=name,
            location=location.describe(),
            passed=passed,
            checks=checks,
            payload=payload,
            log_index=receipt.index,
        )

    # -- extend (offline) -----------------------------------------------------------------

    def extend(self, principal: Principal, name: str, size: int) -> VolumeInfo:
        """Grow a detached volume to `size` usable bytes (volume.create: it takes storage).

        The key is unsealed here for QEMU's LUKS driver (which checks it and
        reads the grown size back through it) and dropped after; logged."""
        row = self._owned(principal, name, "extend")
        self._require(principal, "volume.create", f"volume:{name}")
        size = check_volume_size(size)
        if row.attached_to is not None:
            raise UsageError(
                f"volume {name} is attached to domain {row.attached_domain} of "
                f"{row.attached_to}; extend it online on that host (volume extend --domain) "
                "or detach it first"
            )
        if size < row.size:
            raise UsageError(f"volume {name} is {row.size} bytes; shrinking it is refused")
        if size == row.size:
            return _info(row)
        if row.key_id is None or row.location is None or row.fingerprint is None:
            raise UsageError(f"volume {name} is {row.state}, not available")
        backend = self.backend(row.backend)
        _, spec = self._type(row.type_name)
        record = self.store.rows.get(row.key_id)
        if record is None:
            raise NotFoundError(f"the key of volume {name} does not exist (it was destroyed)")
        # Claim it: no attach (which wants `available`) and no second extend meanwhile.
        claimed = self._set(row.id, only_if=AVAILABLE, state=EXTENDING)
        current = self._row(name)
        if not claimed or current is None or current.attached_to is not None:
            if claimed:
                self._set(row.id, only_if=EXTENDING, state=AVAILABLE)
            state = current.state if current is not None else "gone"
            raise UsageError(f"volume {name} is {state} or attached; not extended")
        try:
            key = self.store.unseal(record)
            size = extend_volume(
                backend,
                spec,
                load_location(row.location),
                size,
                key,
                HeaderFingerprint.model_validate(row.fingerprint),
            )
            del key
            self._set(row.id, only_if=EXTENDING, state=AVAILABLE, size=size)
        except BaseException:
            self._set(row.id, only_if=EXTENDING, state=AVAILABLE)
            raise
        receipt = self.log.append(
            "volume.extend",
            {
                "subject": principal.subject,
                "volume": name,
                "id": row.id,
                "secret": row.key_id,
                "from": row.size,
                "to": size,
            },
        )
        logger.info("volume %s extended to %d bytes (log %d)", name, size, receipt.index)
        return self.show(principal, name)

    # -- rotate the wrapping passphrase ---------------------------------------------------

    def rotate(self, principal: Principal, name: str) -> VolumeInfo:
        """A new KMS key opens the detached volume, the old one nothing (owner or admin).

        The master key stays (no data copied): what changes is the key slot
        and the KMS secret that wraps it. Logged: kms.order, volume.rotate,
        kms.delete."""
        row = self._owned(principal, name, "rotate the key of")
        if row.attached_to is not None:
            raise UsageError(
                f"volume {name} is attached to domain {row.attached_domain} of "
                f"{row.attached_to}; detach it first"
            )
        if row.key_id is None or row.location is None:
            raise UsageError(f"volume {name} is {row.state}, not available")
        _, spec = self._type(row.type_name)
        key_slots(self.backend(row.backend), spec)  # not done for this engine: say so first
        if row.state == ROTATING:
            # Not taken over here: another request may be rotating it right now. A
            # rotation a crash left is settled at the server's next start (or deleted).
            raise UsageError(
                f"volume {name} is rotating (or a rotation was interrupted: the server "
                "settles it at its next start)"
            )
        claimed = self._set(row.id, only_if=AVAILABLE, state=ROTATING)
        current = self._row(name)
        if not claimed or current is None or current.attached_to is not None:
            if claimed:
                self._set(row.id, only_if=ROTATING, state=AVAILABLE)
            raise UsageError(f"volume {name} is busy (attached, extending or rotating)")
        try:
            self._rotate(principal, row, spec)
        except TrustplaneError:
            # A tool or the KMS failed (not a crash): keep whichever key the record has.
            try:
                self._settle(row.id, "rotation failed")
            except TrustplaneError as exc:
                logger.error("volume %s: settling a failed rotation failed: %s", name, exc)
            raise
        return self.show(principal, name)

    def _rotate(self, principal: Principal, row: Volume, spec: VolumeTypeSpec) -> None:
        name = row.name
        assert row.location is not None
        self._settle(row.id, "rotation", final=False)  # leftovers of an earlier crash first
        old_id = self._by_id(row.id).key_id
        assert old_id is not None
        new_id, new_key = self._order_key(principal, name)
        backend = self.backend(row.backend)
        encryptor = key_slots(backend, spec)
        location = load_location(row.location)
        credentials = backend.credentials()
        old_key = self._key(old_id, name)
        encryptor.add_key(location, old_key, new_key, credentials)
        del old_key
        encryptor.check_key(location, new_key, credentials)
        del new_key
        if self.after_new_slot is not None:
            self.after_new_slot(name)
        # The switch: only now that the new key opens the volume.
        if not self._set(row.id, only_if=ROTATING, key_id=new_id):
            raise UsageError(f"volume {name} was deleted while its key was rotated")
        self.log.append(
            "volume.rotate",
            {"subject": principal.subject, "volume": name, "id": row.id, "from": old_id,
             "to": new_id},
        )  # fmt: skip
        if self.after_switch is not None:
            self.after_switch(name)
        self._settle(row.id, "rotation")

    def _key(self, key_id: str, name: str) -> bytes:
        record = self.store.rows.get(key_id)
        if record is None:
            raise NotFoundError(f"the key of volume {name} does not exist (it was destroyed)")
        return self.store.unseal(record)

    def _other_keys(self, name: str, keep: str | None) -> list[str]:
        """The service's KMS keys for volume `name` besides `keep` (a rotation's leftovers)."""
        with self.db.session() as session:
            ids = session.scalars(
                select(Secret.id).where(
                    Secret.name == f"volume:{name}", Secret.creator == SERVICE.subject
                )
            ).all()
        return [i for i in ids if i != keep]

    def _settle(self, volume_id: str, reason: str, *, final: bool = True) -> None:
        """Leave only the recorded key: every other key of the volume loses its slot (if it
        has one) and is destroyed; the fingerprint is taken again; `available`.

        The new header is accepted only when its UUID is the recorded one and
        the recorded key opens its single active slot: a header restored from
        before a rotation (with the old slot) is not."""
        row = self._by_id(volume_id)
        if row.key_id is None or row.location is None or row.fingerprint is None:
            raise UsageError(f"volume {row.name} is {row.state}; nothing to settle")
        _, spec = self._type(row.type_name)
        backend = self.backend(row.backend)
        encryptor = key_slots(backend, spec)
        location = load_location(row.location)
        credentials = backend.credentials()
        key = self._key(row.key_id, row.name)
        for other_id in self._other_keys(row.name, row.key_id):
            record = self.store.rows.get(other_id)
            if record is not None:
                other = self.store.unseal(record)
                try:
                    encryptor.check_key(location, other, credentials)
                except DecryptionKeyError:
                    pass  # no slot (a crash before it was added, or after it was erased)
                else:
                    encryptor.remove_key(location, key, other, credentials)
                del other
                self.store.rows.delete(other_id)
            self.log.append(
                "kms.delete",
                {"subject": SERVICE.subject, "secret": other_id, "for": f"volume:{row.name}",
                 "reason": reason},
            )  # fmt: skip
        slots = encryptor.active_keyslots(location, key, credentials)
        del key
        recorded = HeaderFingerprint.model_validate(row.fingerprint)
        now = header_fingerprint(backend.reader(location))
        if now.uuid != recorded.uuid or slots != 1:
            raise IntegrityError(
                f"volume {row.name}: header {now.uuid} with {slots} active key slots is not "
                f"the recorded {recorded.uuid} with one; refused"
            )
        self._set(
            volume_id,
            only_if=ROTATING,
            header_digest=now.digest,
            fingerprint=now.model_dump(mode="json"),
            **({"state": AVAILABLE} if final else {}),
        )

    def _by_id(self, volume_id: str) -> Volume:
        with self.db.session() as session:
            row = session.get(Volume, volume_id)
        if row is None:
            raise NotFoundError(f"volume {volume_id} does not exist")
        return row

    # -- attach: the key release --------------------------------------------------------

    def release(
        self, principal: Principal, name: str, domain: str, transport_pem: str | None = None
    ) -> VolumeKeyRelease:
        """The key of volume `name` for an attach to `domain`; decided, recorded, logged.
        Wrapped to `transport_pem` (a node must send its own: control/volume_wrap.py)."""
        release = self._release(principal, name, domain, transport_pem)
        receipt = self.log.append(release.kind, release.entry)
        value = release.result()
        return value.model_copy(update={"log_index": receipt.index})

    def _release(
        self, principal: Principal, name: str, domain: str, transport_pem: str | None
    ) -> Release[VolumeKeyRelease]:
        resource = f"volume:{name}"
        entry: dict[str, Any] = {
            "subject": principal.subject,
            "resource": resource,
            "domain": domain,
        }

        def refuse(reason: str, error: Exception) -> Release[VolumeKeyRelease]:
            return Release(
                "volume.attach", {**entry, "decision": "deny", "reason": reason}, None, error
            )

        row = self._row(name)
        if row is None:
            return refuse("no such volume", NotFoundError(f"volume {name!r} does not exist"))
        entry["secret"] = row.key_id
        decision = self.gate(
            self.authorize(principal, "volume.attach", resource, None),
            principal,
            None,
            None,
            transport_pem,
        )
        if not decision.allowed:
            if not self._may_see(principal, row):
                return refuse(decision.reason, NotFoundError(f"volume {name!r} does not exist"))
            return refuse(
                decision.reason,
                Forbidden(f"policy refuses volume.attach of {resource}: {decision.reason}"),
            )
        transport = volume_wrap.transport_for(self.gate, principal, transport_pem)
        if isinstance(transport, volume_wrap.Refusal):
            return refuse(transport.reason, transport.error)
        entry["wrapped_to"] = transport.kid if transport is not None else None
        if row.state != AVAILABLE or row.key_id is None or row.fingerprint is None:
            return refuse(
                f"volume is {row.state}",
                UsageError(f"volume {name} is {row.state}, not available for attach"),
            )
        record = self.store.rows.get(row.key_id)
        if record is None:
            return refuse(
                "its key is destroyed",
                NotFoundError(f"the key of volume {name} does not exist (it was destroyed)"),
            )
        if not self._claim(row.id, principal.subject, domain):
            current = self._row(name)
            where = (
                f"domain {current.attached_domain} of {current.attached_to}"
                if current is not None
                else "elsewhere"
            )
            return refuse(
                f"attached to {where}",
                UsageError(f"volume {name} is attached to {where}; detach it there first"),
            )
        try:
            key = self.store.unseal(record)
        except UnavailableError as exc:
            self._unclaim(row.id, principal.subject, domain)
            return Release(
                "volume.attach",
                {**entry, "decision": "error", "reason": f"{decision.reason}; not released: {exc}"},
                None,
                exc,
            )
        claimed = self._row(name)
        assert claimed is not None
        if transport is not None:
            answer = VolumeKeyRelease(
                volume=_info(claimed), jwe=volume_wrap.wrap(key, transport), log_index=-1
            )
        else:
            answer = VolumeKeyRelease(
                volume=_info(claimed), key=base64.b64encode(key).decode(), log_index=-1
            )
        return Release(
            "volume.attach", {**entry, "decision": "allow", "reason": decision.reason}, answer
        )

    def _claim(self, volume_id: str, subject: str, domain: str) -> bool:
        """Record the attachment unless the volume is attached to another domain (atomic)."""
        with self.db.write_session() as session:
            row = session.get(Volume, volume_id)
            if row is None:
                return False
            if row.attached_to is not None and (
                row.attached_to != subject or row.attached_domain != domain
            ):
                return False
            if row.attached_to is None:
                row.attached_to = subject
                row.attached_domain = domain
                row.attached_at = datetime.now(UTC)
            return True

    def _unclaim(self, volume_id: str, subject: str, domain: str) -> None:
        with self.db.session() as session:
            session.execute(
                update(Volume)
                .where(
                    Volume.id == volume_id,
                    Volume.attached_to == subject,
                    Volume.attached_domain == domain,
                )
                .values(attached_to=None, attached_domain=None, attached_at=None)
            )

    def detach(self, principal: Principal, name: str, domain: str) -> VolumeInfo:
        """Clear the attachment to `domain` (the attacher, or whoever may attach the volume)."""
        row = self._visible(principal, name)
        if row.attached_to is None:
            return _info(row)
        if row.attached_domain != domain:
            raise UsageError(
                f"volume {name} is attached to domain {row.attached_domain}, not {domain}"
            )
        if principal.subject != row.attached_to and principal.role != "admin":
            self._require(principal, "volume.attach", f"volume:{name}")
        with self.db.session() as session:
            session.execute(
                update(Volume)
                .where(Volume.id == row.id, Volume.attached_domain == domain)
                .values(attached_to=None, attached_domain=None, attached_at=None)
            )
        self.log.append(
            "volume.detach",
            {
                "subject": principal.subject,
                "volume": name,
                "domain": domain,
                "attached_to": row.attached_to,
            },
        )
        return self.show(principal, name)

    # -- delete ---------------------------------------------------------------------------

    def delete(self, principal: Principal, name: str) -> None:
        """Crypto-shred the key, then destroy the storage; refused while attached."""
        row = self._visible(principal, name)
        self._require(principal, "volume.delete", f"volume:{name}")
        if principal.subject != row.owner and principal.role != "admin":
            raise Forbidden(f"only the owner of volume {name} or an admin may delete it")
        if row.attached_to is not None:
            raise UsageError(
                f"volume {name} is attached to domain {row.attached_domain} of "
                f"{row.attached_to}; detach it first"
            )
        if row.state in (EXTENDING, REENCRYPTING):
            being = "being extended" if row.state == EXTENDING else "being re-encrypted"
            raise UsageError(f"volume {name} is {being}; delete it after that")
        self.copies.refuse_busy(row)
        self.log.append(
            "volume.delete",
            {"subject": principal.subject, "volume": name, "id": row.id, "secret": row.key_id},
        )
        self._finish_delete(row.id, f"deleted by {principal.subject}")

    def _finish_delete(self, volume_id: str, reason: str, *, storage: bool = True) -> None:
        """Take a volume from any state to gone: key first, storage second, record last.

        Each step is idempotent and the state is committed after each, so
        running this again after a crash anywhere finishes the job. The storage
        removed is the one the record names (none for a create that made none:
        storage of that name is not this record's).
        """
        with self.db.session() as session:
            row = session.get(Volume, volume_id)
            if row is None:
                return
            if row.state in (CREATING, AVAILABLE, EXTENDING, ROTATING):
                row.state = DELETING
            state, key_id, name = row.state, row.key_id, row.name
            backend_name, location_json = row.backend, row.location
        if state == DELETING:
            # crypto-shredding: no key, no volume (and no key a rotation left behind)
            for doomed in [*([key_id] if key_id else []), *self._other_keys(name, key_id)]:
                self.store.rows.delete(doomed)
                self.log.append(
                    "kms.delete",
                    {"subject": SERVICE.subject, "secret": doomed, "for": f"volume:{name}"},
                )
            self._set(volume_id, state=SHREDDED)
            if self.after_shred is not None:
                self.after_shred(name)
        if storage and location_json is not None:  # only storage the record names
            delete_volume(self.backend(backend_name), load_location(location_json))
        with self.db.session() as session:
            # An operation row left behind (an online extend never reported, say) must
            # not keep the record: it references it, and the key and storage are gone.
            session.execute(delete(VolumeOperation).where(VolumeOperation.volume_id == volume_id))
            row = session.get(Volume, volume_id)
            if row is not None:
                session.delete(row)
        self.log.append(
            "volume.destroyed",
            {"volume": name, "id": volume_id, "secret": key_id, "reason": reason},
        )

    def recover(self) -> int:
        """Finish the deletes a crash interrupted (and creates it left half-done);
        how many were finished. A backend that does not answer is left for later."""
        self.copies.recover()  # clones and encryptions first: an undo is a delete
        with self.db.session() as session:
            ids = list(
                session.scalars(select(Volume.id).where(Volume.state.in_((DELETING, SHREDDED))))
            )
        # An extend a crash interrupted: the record's size is the old one, and a
        # grown storage under it is harmless (extending again finishes it). An online
        # extend's row goes with it: the host's late report is refused anyway.
        with self.db.session() as session:
            extending = select(Volume.id).where(Volume.state == EXTENDING)
            session.execute(
                delete(VolumeOperation).where(
                    VolumeOperation.kind == EXTEND_ONLINE, VolumeOperation.volume_id.in_(extending)
                )
            )
            session.execute(update(Volume).where(Volume.state == EXTENDING).values(state=AVAILABLE))
        with self.db.session() as session:
            rotating = list(session.scalars(select(Volume.id).where(Volume.state == ROTATING)))
        for volume_id in rotating:
            try:
                self._settle(volume_id, "rotation finished after a crash")
            except TrustplaneError as exc:
                logger.error("volume %s: finishing its rotation failed: %s", volume_id, exc)
        done = 0
        for volume_id in ids:
            try:
                self._finish_delete(volume_id, "finished after a crash")
                done += 1
            except TrustplaneError as exc:
                logger.error("volume %s: finishing its delete failed: %s", volume_id, exc)
        self.reencryption.resume_all()  # re-encryptions a crash interrupted carry on
        done += self.creates.recover()  # creates a crash interrupted: volume_create_recovery
        return done

    # -- helpers ----------------------------------------------------------------------------

    def _require(self, principal: Principal, action: str, resource: str) -> None:
        decision = self.authorize(principal, action, resource, None)
        if not decision.allowed:
            raise Forbidden(f"policy refuses {action} on {resource}: {decision.reason}")

    def _set(self, volume_id: str, only_if: str | None = None, **values: Any) -> bool:
        """Update the record (when its state is `only_if`, if given); whether it was."""
        query = update(Volume).where(Volume.id == volume_id)
        if only_if is not None:
            query = query.where(Volume.state == only_if)
        with self.db.session() as session:
            return bool(session.execute(query.values(**values)).rowcount)  # type: ignore[attr-defined]


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = str(first.get("msg", exc)).removeprefix("Value error, ")
        return f"{where}: {message}" if where else message
    return str(exc)


def _type_info(row: VolumeType) -> VolumeTypeInfo:
    spec = VolumeTypeSpec.model_validate(row.spec)
    assert spec.encryption is not None
    assert spec.engine is not None
    return VolumeTypeInfo(
        name=row.name,
        backend=row.backend,
        backend_kind=spec.backend,
        encryption=spec.encryption,
        engine=spec.engine,
        creator=row.creator,
        created=row.created,
    )


def _info(row: Volume) -> VolumeInfo:
    attachment = None
    if row.attached_to is not None and row.attached_domain is not None:
        attachment = Attachment(
            subject=row.attached_to,
            domain=row.attached_domain,
            since=row.attached_at or row.created,
        )
    return VolumeInfo(
        id=row.id,
        name=row.name,
        volume_type=row.type_name,
        backend=row.backend,
        size=row.size,
        state=row.state,  # type: ignore[arg-type]
        key_id=row.key_id,
        engine=Engine(row.engine) if row.engine else None,
        location=load_location(row.location) if row.location else None,
        header=HeaderFingerprint.model_validate(row.fingerprint) if row.fingerprint else None,
        owner=row.owner,
        attachment=attachment,
        created=row.created,
    )
