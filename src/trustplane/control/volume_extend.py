"""Online extend: an attached volume grows on the host that holds its attachment.

Like an attach, it is run on the VM's host (`volume extend --domain`, logged
in as the node). The control plane:

1. `start`: checks that the caller holds the attachment to that domain (the
   subject and domain the attach recorded) and that the policy still allows it
   `volume.attach` on the volume; refuses a smaller size and a backend that
   does not grow in place (`volumes.online`); claims the volume (`extending`)
   and records the operation (a `volume_operations` row of kind
   `extend-online`: the size, the domain, the subject); logs `volume.extend`
   (online, phase `started`). No key is released: QEMU holds the open volume.
2. the host runs the block resize (`virsh blockresize`, through the executor)
   and reads the size back;
3. `finish`: the same caller and domain report the outcome for the recorded
   size; the record's size changes only if it grew, the state goes back to
   `available` either way, the operation row goes, and `volume.extend` is
   logged again (phase `done` or `failed`).

The report is taken from the caller that started it only (for its domain and
size, once), even if the volume was detached meanwhile. A host that dies
before it reports leaves `extending`: its next `start` for the same domain
takes the operation over. A server crash in between: its next start puts the
volume back to `available` with the old size (the disk may have grown:
extending it again to the same size finishes the record); the stale
operation row is dropped by the next `start`.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import delete, select

from trustplane.api.volume_spec import check_volume_size
from trustplane.api.volumes import OnlineExtendResult, VolumeInfo
from trustplane.control.identity import Principal
from trustplane.control.models import Volume, VolumeOperation
from trustplane.control.volume_states import AVAILABLE, EXTENDING
from trustplane.errors import Forbidden, UsageError
from trustplane.volumes.online import check_online

if TYPE_CHECKING:
    from trustplane.control.volumes import BlockStorage

KIND = "extend-online"


def _holder(storage: BlockStorage, principal: Principal, name: str, domain: str) -> Volume:
    """The volume, if `principal` holds its attachment to `domain` (Forbidden if not)."""
    row = storage._visible(principal, name)
    if row.attached_to != principal.subject or row.attached_domain != domain:
        raise Forbidden(
            f"volume {name} is not attached to domain {domain} of {principal.subject}; an "
            "attached volume is extended on the host that holds its attachment"
        )
    storage._require(principal, "volume.attach", f"volume:{name}")
    return row


def start(
    storage: BlockStorage, principal: Principal, name: str, size: int, domain: str
) -> VolumeInfo:
    """Claim an attached volume for its online extend to `size` usable bytes; logged."""
    size = check_volume_size(size)
    row = _holder(storage, principal, name, domain)
    if size < row.size:
        raise UsageError(f"volume {name} is {row.size} bytes; shrinking it is refused")
    if size == row.size:
        return storage.show(principal, name)
    _, spec = storage._type(row.type_name)
    check_online(storage.backend(row.backend).kind, spec.engine)
    if row.state == EXTENDING and _take_over(storage, row, principal, domain, size):
        _log(storage, principal, row, domain, "started", size, resumed=True)
        return storage.show(principal, name)
    if row.state != AVAILABLE:
        raise UsageError(f"volume {name} is {row.state}; not extended")
    with storage.db.write_session() as session:
        # A row a crash left (the start put the state back to available): gone.
        session.execute(
            delete(VolumeOperation).where(
                VolumeOperation.volume_id == row.id, VolumeOperation.kind == KIND
            )
        )
    if not storage._set(row.id, only_if=AVAILABLE, state=EXTENDING):
        raise UsageError(f"volume {name} is busy; not extended")
    now = datetime.now(UTC)
    try:
        with storage.db.write_session() as session:
            current = session.get(Volume, row.id)
            if current is None or (current.attached_to, current.attached_domain) != (
                principal.subject,
                domain,
            ):
                raise UsageError(f"volume {name} was detached meanwhile; not extended")
            if session.scalar(
                select(VolumeOperation.id).where(VolumeOperation.volume_id == row.id)
            ):
                raise UsageError(f"volume {name} has another operation running; not extended")
            session.add(
                VolumeOperation(
                    id=str(uuid.uuid4()),
                    volume_id=row.id,
                    kind=KIND,
                    phase="resizing",
                    source={"domain": domain, "from": row.size},
                    total=size,
                    subject=principal.subject,
                    started=now,
                    updated=now,
                )
            )
    except BaseException:
        storage._set(row.id, only_if=EXTENDING, state=AVAILABLE)
        raise
    _log(storage, principal, row, domain, "started", size)
    return storage.show(principal, name)


def _take_over(
    storage: BlockStorage, row: Volume, principal: Principal, domain: str, size: int
) -> bool:
    """An online extend this caller started for this domain and never reported (its host
    died, say) is taken over by its next one: the recorded size becomes `size`."""
    with storage.db.write_session() as session:
        operation = session.scalar(
            select(VolumeOperation).where(
                VolumeOperation.volume_id == row.id, VolumeOperation.kind == KIND
            )
        )
        if (
            operation is None
            or operation.subject != principal.subject
            or (operation.source or {}).get("domain") != domain
        ):
            return False
        operation.total = size
        operation.updated = datetime.now(UTC)
    return True


def _log(
    storage: BlockStorage,
    principal: Principal,
    row: Volume,
    domain: str,
    phase: str,
    size: int,
    **extra: object,
) -> None:
    storage.log.append(
        "volume.extend",
        {
            "subject": principal.subject,
            "volume": row.name,
            "id": row.id,
            "online": True,
            "domain": domain,
            "phase": phase,
            "from": row.size,
            "to": size,
            **extra,
        },
    )


def finish(
    storage: BlockStorage, principal: Principal, name: str, result: OnlineExtendResult
) -> VolumeInfo:
    """The host's outcome of the block resize: the size recorded if it grew; logged.

    Taken from the caller that started it, for its domain and size (the
    operation row says so), even if the volume was detached meanwhile."""
    row = storage._visible(principal, name)
    storage._require(principal, "volume.attach", f"volume:{name}")
    with storage.db.session() as session:
        operation = session.scalar(
            select(VolumeOperation).where(
                VolumeOperation.volume_id == row.id, VolumeOperation.kind == KIND
            )
        )
    if operation is not None and operation.subject != principal.subject:
        raise Forbidden(
            f"the online extend of volume {name} is {operation.subject}'s; only it reports it"
        )
    if (
        operation is None
        or row.state != EXTENDING
        or (operation.source or {}).get("domain") != result.domain
        or operation.total != result.size
    ):
        raise UsageError(f"volume {name} has no online extend to {result.size} bytes running")
    with storage.db.write_session() as session:
        # The row is the claim: a second report (or a take-over to another size) finds none.
        taken = session.execute(
            delete(VolumeOperation).where(
                VolumeOperation.id == operation.id, VolumeOperation.total == result.size
            )
        ).rowcount  # type: ignore[attr-defined]
    if not taken:
        raise UsageError(f"volume {name} has no online extend to {result.size} bytes running")
    storage._set(
        row.id,
        only_if=EXTENDING,
        state=AVAILABLE,
        **({"size": result.size} if result.grown else {}),
    )
    extra = {} if result.grown else {"reason": result.reason or "the host did not say"}
    _log(storage, principal, row, result.domain, "done" if result.grown else "failed",
         result.size, **extra)  # fmt: skip
    return storage.show(principal, name)
