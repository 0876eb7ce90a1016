"""The snapshotter's metadata: containerd's snapshot model as a persisted state machine.

containerd's Snapshotter interface (snapshots/snapshotter.go, 1.6) in short:
an *active* snapshot (Prepare) is a writable file system on top of a
*committed* parent; a *view* (View) is a read-only one; Commit turns an
active into a committed snapshot under a new name (the active's key is gone
after); committed snapshots are never written again and are the only
parents; Remove refuses a snapshot that still has children. Keys, names and
parents share one key space. The errors containerd acts on are part of the
contract: an existing key is ALREADY_EXISTS, a missing one NOT_FOUND, a
snapshot with children (or not active, for Commit) FAILED_PRECONDITION, and
its garbage collector stops at any other error from Remove.

Each record also carries what the snapshotter built for it: the backend
layer (actives and committed snapshots; a view opens its parent's layers
and has none of its own) and the reference of the layer's key in the
control plane (never the key). Operations that make or destroy resources
go through a transitional state that is written *before* the resources are
touched, so a snapshotter restarted after a crash knows what to finish or
undo (`Snapshotter.recover`):

    (none) --begin_create--> CREATING --finish_create--> READY
    CREATING --abort--> (none)                       (recovery: undo)
    READY(active) --begin_commit--> COMMITTING --finish_commit--> READY(committed, new name)
    COMMITTING --set_commit_layer--> COMMITTING      (an ephemeral active's writes: a new layer)
    COMMITTING --abort_commit--> READY(active)       (recovery: by the backend's state)
    READY --begin_remove--> REMOVING --finish_remove--> (none)   (recovery: finish)
    REMOVING --abort_remove--> READY                 (its device was still mounted)

A snapshot in CREATING or REMOVING is invisible (NOT_FOUND); one in
COMMITTING is visible as the active it still is, and busy. Key chains whose
destruction failed (the control plane out of reach) wait in `shred` until
a later attempt succeeds. The table is one JSON file rewritten atomically
(temporary file, fsync, rename) after every transition.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trustplane.atomic import atomic_write
from trustplane.errors import (
    AlreadyExistsError,
    ConflictError,
    MalformedError,
    NotFoundError,
    UsageError,
)
from trustplane.layerstore.keys import ChainRef

MAX_LABEL_BYTES = 4096
"""containerd's limit for a label's key and value together (labels.Validate)."""
VERSION = 1


class Kind(StrEnum):
    VIEW = "view"
    ACTIVE = "active"
    COMMITTED = "committed"


class State(StrEnum):
    CREATING = "creating"
    READY = "ready"
    COMMITTING = "committing"
    REMOVING = "removing"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KeyRef(_Model):
    """Where a layer's key lives: a key chain held by one control plane."""

    server: str
    id: str

    @property
    def chain(self) -> ChainRef:
        return ChainRef(self.server, self.id)

    @classmethod
    def of(cls, chain: ChainRef) -> KeyRef:
        return cls(server=chain.server, id=chain.id)


class Snapshot(_Model):
    key: str
    """containerd's key (actives, views) or name (committed)."""
    kind: Kind
    parent: str = ""
    layer: str | None = None
    """The backend's layer: an active's writes, a committed snapshot's changes."""
    ephemeral: bool = False
    """An active whose writes go to a scratch volume under a key only the running
    snapshotter holds (a container's root), not to a layer."""
    key_ref: KeyRef | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    created: datetime
    updated: datetime
    state: State
    commit_name: str | None = None
    commit_labels: dict[str, str] = Field(default_factory=dict)

    @property
    def visible(self) -> bool:
        return self.state in (State.READY, State.COMMITTING)


class _Table(BaseModel):
    """The file's content (mutated in place under the table's lock)."""

    model_config = ConfigDict(extra="forbid")

    version: int = VERSION
    snapshots: dict[str, Snapshot] = Field(default_factory=dict)
    shred: list[KeyRef] = Field(default_factory=list)


def now() -> datetime:
    return datetime.now(UTC)


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        if not key:
            raise UsageError("a label's key may not be empty")
        if len(key.encode()) + len(value.encode()) > MAX_LABEL_BYTES:
            raise UsageError(f"label {key[:64]!r}: key and value exceed {MAX_LABEL_BYTES} bytes")
    return dict(labels)


class SnapshotTable:
    """The records, their transitions and their file; safe to call from several threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._table = self._load()

    # -- reading ---------------------------------------------------------------------

    def get(self, key: str) -> Snapshot:
        """A visible snapshot, or NOT_FOUND."""
        with self._lock:
            found = self._table.snapshots.get(key)
            if found is None or not found.visible:
                raise NotFoundError(f"snapshot {key} does not exist")
            return found

    def find(self, key: str) -> Snapshot | None:
        """Whatever record `key` has, in any state."""
        with self._lock:
            return self._table.snapshots.get(key)

    def all(self) -> list[Snapshot]:
        with self._lock:
            return list(self._table.snapshots.values())

    def visible(self) -> list[Snapshot]:
        return [s for s in self.all() if s.visible]

    def children(self, key: str) -> list[Snapshot]:
        return [s for s in self.all() if s.parent == key]

    def ancestry(self, key: str) -> list[Snapshot]:
        """The committed snapshots from the base up to `key` (itself included)."""
        with self._lock:
            chain: list[Snapshot] = []
            current: str = key
            while current:
                found = self._table.snapshots.get(current)
                if found is None:
                    raise NotFoundError(f"snapshot {current} (an ancestor) does not exist")
                if len(chain) > len(self._table.snapshots):
                    raise MalformedError(f"{self.path}: the parents of {key} form a loop")
                chain.append(found)
                current = found.parent
            chain.reverse()
            return chain

    def layers(self) -> set[str]:
        """Every backend layer a record claims, in any state."""
        return {s.layer for s in self.all() if s.layer is not None}

    def pending_shreds(self) -> list[ChainRef]:
        with self._lock:
            return [ref.chain for ref in self._table.shred]

    # -- transitions -----------------------------------------------------------------

    def begin_create(
        self,
        key: str,
        parent: str,
        kind: Kind,
        labels: Mapping[str, str],
        layer: str | None,
        *,
        ephemeral: bool = False,
    ) -> Snapshot:
        """Prepare (ACTIVE) or View: a CREATING record, written before anything is made."""
        if not key:
            raise UsageError("a snapshot key may not be empty")
        if kind is Kind.COMMITTED:
            raise UsageError("committed snapshots are made by Commit only")
        with self._lock:
            self._check_free(key)
            if parent:
                found = self._table.snapshots.get(parent)
                if found is None or found.state in (State.CREATING, State.REMOVING):
                    raise NotFoundError(f"parent snapshot {parent} does not exist")
                if found.kind is not Kind.COMMITTED:
                    raise UsageError(f"parent {parent} is not a committed snapshot")
            stamp = now()
            record = Snapshot(
                key=key,
                kind=kind,
                parent=parent,
                layer=layer,
                ephemeral=ephemeral,
                labels=check_labels(labels),
                created=stamp,
                updated=stamp,
                state=State.CREATING,
            )
            self._put(record)
            return record

    def set_key_ref(self, key: str, chain: ChainRef) -> Snapshot:
        """The layer's key chain exists: recorded at once, so recovery can destroy it."""
        return self._change(key, State.CREATING, key_ref=KeyRef.of(chain))

    def finish_create(self, key: str) -> Snapshot:
        return self._change(key, State.CREATING, state=State.READY)

    def abort(self, key: str) -> None:
        """Drop a record whose resources were never made, or were undone."""
        with self._lock:
            if self._table.snapshots.pop(key, None) is not None:
                self._save()

    def begin_commit(self, name: str, key: str, labels: Mapping[str, str]) -> Snapshot:
        with self._lock:
            active = self.get(key)
            if active.kind is not Kind.ACTIVE:
                raise ConflictError(f"snapshot {key} is not active ({active.kind})")
            if active.state is not State.READY:
                raise ConflictError(f"snapshot {key} is busy ({active.state})")
            if not name:
                raise UsageError("a committed snapshot's name may not be empty")
            self._check_free(name)
            return self._change(
                key,
                State.READY,
                state=State.COMMITTING,
                commit_name=name,
                commit_labels=check_labels(labels),
            )

    def set_commit_layer(self, key: str, layer: str, chain: ChainRef) -> Snapshot:
        """An ephemeral active's writes get a layer at commit: recorded before it is made."""
        with self._lock:
            found = self._expect(key, State.COMMITTING)
            if not found.ephemeral:
                raise ConflictError(f"snapshot {key} has a layer of its own already")
            return self._change(key, State.COMMITTING, layer=layer, key_ref=KeyRef.of(chain))

    def finish_commit(self, key: str) -> Snapshot:
        """The layer is committed: the active's record becomes the named committed one."""
        with self._lock:
            active = self._expect(key, State.COMMITTING)
            assert active.commit_name is not None
            stamp = now()
            committed = Snapshot(
                key=active.commit_name,
                kind=Kind.COMMITTED,
                parent=active.parent,
                layer=active.layer,
                key_ref=active.key_ref,
                labels=active.commit_labels,
                created=stamp,
                updated=stamp,
                state=State.READY,
            )
            del self._table.snapshots[key]
            self._put(committed)
            return committed

    def abort_commit(self, key: str) -> Snapshot:
        """Back to READY; an ephemeral active loses the layer its commit was making
        (the caller destroyed it)."""
        with self._lock:
            found = self._expect(key, State.COMMITTING)
            made: dict[str, object] = {"layer": None, "key_ref": None} if found.ephemeral else {}
            return self._change(
                key, State.COMMITTING, state=State.READY, commit_name=None, commit_labels={}, **made
            )

    def begin_remove(self, key: str) -> Snapshot:
        with self._lock:
            found = self.get(key)
            if found.state is not State.READY:
                raise ConflictError(f"snapshot {key} is busy ({found.state})")
            if self.children(key):
                raise ConflictError(f"cannot remove snapshot {key}: it has children")
            return self._change(key, State.READY, state=State.REMOVING)

    def abort_remove(self, key: str) -> Snapshot:
        return self._change(key, State.REMOVING, state=State.READY)

    def finish_remove(self, key: str) -> None:
        with self._lock:
            self._expect(key, State.REMOVING)
            del self._table.snapshots[key]
            self._save()

    def update_labels(self, key: str, labels: Mapping[str, str], paths: Sequence[str]) -> Snapshot:
        """containerd's Update: only labels change; `labels.K` sets (or clears) one,
        `labels` or no path replaces them all."""
        with self._lock:
            found = self.get(key)
            merged = dict(found.labels)
            if not paths:
                merged = dict(labels)
            for path in paths:
                if path.startswith("labels."):
                    name = path.removeprefix("labels.")
                    if labels.get(name):
                        merged[name] = labels[name]
                    else:
                        merged.pop(name, None)
                elif path == "labels":
                    merged = dict(labels)
                else:
                    raise UsageError(f"cannot update {path!r} of snapshot {key}: only labels")
            return self._change(key, found.state, labels=check_labels(merged), updated=now())

    def queue_shred(self, chain: ChainRef) -> None:
        with self._lock:
            ref = KeyRef.of(chain)
            if ref not in self._table.shred:
                self._table.shred.append(ref)
                self._save()

    def shredded(self, chain: ChainRef) -> None:
        with self._lock:
            ref = KeyRef.of(chain)
            if ref in self._table.shred:
                self._table.shred.remove(ref)
                self._save()

    # -- helpers ---------------------------------------------------------------------

    def _check_free(self, key: str) -> None:
        taken = key in self._table.snapshots or any(
            s.commit_name == key for s in self._table.snapshots.values()
        )
        if taken:
            raise AlreadyExistsError(f"snapshot {key} already exists")

    def _expect(self, key: str, state: State) -> Snapshot:
        found = self._table.snapshots.get(key)
        if found is None:
            raise NotFoundError(f"snapshot {key} does not exist")
        if found.state is not state:
            raise ConflictError(f"snapshot {key} is {found.state}, not {state}")
        return found

    def _change(self, key: str, expected: State, **changes: object) -> Snapshot:
        with self._lock:
            found = self._expect(key, expected)
            changed = found.model_copy(update=changes)
            # model_copy does not validate: a round trip keeps the record well-formed.
            record = Snapshot.model_validate(changed.model_dump())
            self._put(record)
            return record

    def _put(self, record: Snapshot) -> None:
        self._table.snapshots[record.key] = record
        self._save()

    def _save(self) -> None:
        atomic_write(self.path, self._table.model_dump_json().encode(), mode=0o600)

    def _load(self) -> _Table:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return _Table()
        try:
            table = _Table.model_validate(json.loads(raw))
        except (ValueError, ValidationError) as exc:
            raise MalformedError(f"{self.path}: not a snapshotter table ({exc})") from None
        if table.version != VERSION:
            raise MalformedError(f"{self.path}: table version {table.version}, not {VERSION}")
        for key, record in table.snapshots.items():
            if record.key != key:
                raise MalformedError(f"{self.path}: record {key!r} names itself {record.key!r}")
        return table

    def __iter__(self) -> Iterator[Snapshot]:
        return iter(self.all())
