"""containerd's snapshots, kept as encrypted layers: the proxy snapshotter's logic.

containerd applies image layers itself: its unpacker calls Prepare(key,
parent) for each layer, mounts what Prepare returns, writes the layer's
changes into it (whiteouts as deletions: the mount shows the whole chain)
and calls Commit(chainID, key). A container is one more Prepare on the
image's top, its mounts become the container's root. So:

- **Prepare** of a layer containerd unpacks (its key is `extract-… CHAINID`)
  = a new backend layer on top of the parent's layers, under a key of its
  own, attached writable (layers 0..k with their keys, the new one on top)
  and returned as an `ext4` mount of the attachment's device; the file
  system is made on a base layer, inherited above it.
- **View** = the parent's layers attached read-only (`ro,noload`); a view
  has no layer of its own.
- **Mounts** = the same mount again; after a restart the attachment is
  opened anew from the keys.
- **Commit** = the active's device must be unmounted (containerd's differ
  unmounts before it commits); detach, `backend.commit`, and the record
  changes its name: the layer and its key stay the same.
- **Remove** = refused while children exist; a mount that lingers (a
  dying container's) is waited for a while, then detached anyway; then the
  layer's key is destroyed (crypto-shredding), then the layer.
- A container's root (any other Prepare) is an overlay over the parent's
  layers, mounted read-only once for all containers on them, its writes on
  an encrypted scratch volume (a random key held here only), one made ahead
  (warm.py); Commit of it turns the writes into a layer (overlay_diff.py).
- **Stat / Update / Usage / List / Cleanup** answer from the table
  (snapshots.py); Usage is the layer's bytes on disk (inodes are not
  counted: the layer is blocks, not files).

Key policy (issue 14). An image stored with `trustplane store import` has
one one-way chain whose top key the KMS holds: the whole image is known
before its first layer is written. Layers arriving through containerd are
not: they come one at a time, bottom up, named by chainIDs that several
images share, and containerd removes them one by one when no image uses
them any more. So each layer (and a container's writes, when committed)
gets a key chain of its own, of one key, made by the control plane's layer-key
broker (`ChainKeys`, as the store uses): the key is a KMS secret, released
under the policy (`key.release` on `image:REPOSITORY`, attested where the
policy says so) wrapped to this process's (or the attested node's)
transport key, held in memory only while a layer is being opened, never
written on the node. REPOSITORY is the snapshotter's (`containerd/HOST` by
default), so an administrator grants a node its snapshotter's keys in one
rule. Removing a layer destroys its chain first: the key is gone for good
even if the file's blocks survive on the disk. If the control plane cannot
be reached then, the layer is removed anyway and the chain waits in the
table's shred queue for the next Cleanup or start.

One snapshotter serves one root (a lock file says so):

    root/
      snapshots.json   the table (snapshots.py)
      qcow2/ (or dm/)  the backend's own files and attachments
      empty/           what a view of no parent shows
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from trustplane.errors import (
    ConflictError,
    NotFoundError,
    ToolError,
    TrustplaneError,
    UnavailableError,
    UsageError,
)
from trustplane.layerstore.backend import Attachment, ChainLink, LayerBackend, check_layer_id
from trustplane.layerstore.filesystem import (
    FS_TYPE,
    force_unmount,
    make_filesystem,
    mount,
    unmount_if_mounted,
)
from trustplane.layerstore.importer import DEFAULT_SIZE
from trustplane.layerstore.keys import ChainKeys, ChainRef
from trustplane.layerstore.overlay_diff import apply_upper
from trustplane.layerstore.qcow2 import Qcow2Backend
from trustplane.layerstore.snapshot_filters import parse
from trustplane.layerstore.snapshots import Kind, Snapshot, SnapshotTable, State
from trustplane.layerstore.store import SCRATCH_SIZE
from trustplane.layerstore.warm import SharedViews, Spares
from trustplane.tools import Executor, mounts, unmount

logger = logging.getLogger(__name__)

SNAPSHOT_REF = "containerd.io/snapshot.ref"
"""The label containerd's pull-time unpacker puts on a layer's Prepare: the chainID
it will commit the layer as."""
UNPACK_PREFIX = "extract-"
"""containerd's key for a layer it unpacks: `extract-UNIQUE CHAINID` (snapshots.
UnpackKeyFormat), behind the `NAMESPACE/N/` it adds for its snapshotters."""
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
SPARES = 2
"""Scratch volumes kept made ahead (warm.py)."""
VIEW_IDLE = 30.0
"""Seconds an image's shared read-only view stays open after its last container (warm.py)."""
DISCARD_WAIT = 10.0
"""How long Remove waits for a dying container's mounts to let go of a snapshot."""
_POLL = 0.2


@dataclass(frozen=True)
class Mount:
    """One entry of containerd's mount list (types/mount.proto)."""

    type: str
    source: str
    options: tuple[str, ...]


@dataclass(frozen=True)
class Usage:
    size: int
    inodes: int


def default_repository() -> str:
    """What the policy calls this host's containerd layers: `image:containerd/HOST`."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "localhost"
    return f"containerd/{host}"


@dataclass
class _Opened:
    """What an active or a view holds while it is open: attachments (bottom first) and
    the mount points of ours under them (deepest last), and what containerd mounts."""

    mounts: list[Mount]
    attachments: list[Attachment] = field(default_factory=list)
    points: list[Path] = field(default_factory=list)
    upper: Path | None = None
    """An ephemeral active's overlay upper directory: the container's writes."""
    view: str | None = None
    """The parent whose shared read-only view is this ephemeral active's lower directory."""

    def close(self, executor: Executor, *, force: bool = False) -> None:
        """Unmount ours (EBUSY while containerd's overlay still uses them) and detach."""
        for point in reversed(self.points):
            if force:
                force_unmount(executor, point)
            else:
                unmount_if_mounted(executor, point)
        self.points.clear()
        while self.attachments:
            self.attachments.pop().close()


class Snapshotter:
    """containerd's Snapshotter over a layer backend, keys from the control plane."""

    def __init__(
        self,
        root: Path,
        keys: ChainKeys,
        backend: LayerBackend | None = None,
        *,
        repository: str | None = None,
        layer_size: int = DEFAULT_SIZE,
        scratch_size: int = SCRATCH_SIZE,
        discard_wait: float = DISCARD_WAIT,
        spares: int = SPARES,
        view_idle: float = VIEW_IDLE,
        executor: Executor | None = None,
    ) -> None:
        if any(c in os.fspath(root) for c in ",:\n"):
            # overlayfs and QEMU options separate fields with these.
            raise UsageError(f"{root}: a snapshotter root may not hold ',', ':' or a newline")
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.root = root
        self._lock_fd = _take_root(root)
        try:
            self.keys = keys
            self.repository = repository or default_repository()
            self.layer_size = layer_size
            self.scratch_size = scratch_size
            self.discard_wait = discard_wait
            self.backend = backend or Qcow2Backend(root / "qcow2", executor)
            self.executor = self.backend.executor
            self.table = SnapshotTable(root / "snapshots.json")
            self.empty = root / "empty"
            self.empty.mkdir(mode=0o755, exist_ok=True)
            self._opened: dict[str, _Opened] = {}
            self._open_lock = threading.Lock()
            self._spares = Spares(self._mounted_scratch, lambda o: self._drop(o, True), spares)
            self._views = SharedViews(self._mounted_view, self._drop, view_idle)
            self.recovered = self.recover()
            self._spares.fill()
        except BaseException:
            os.close(self._lock_fd)
            raise

    # -- the snapshots API -------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        """A layer when containerd unpacks one; otherwise (a container's root) an
        overlay whose writes are ephemeral."""
        if unpacking(key, labels):
            return self._prepare_layer(key, parent, labels)
        self.table.begin_create(key, parent, Kind.ACTIVE, labels, None, ephemeral=True)
        return self._create(key, lambda: self._open_ephemeral(key, parent))

    def view(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        self.table.begin_create(key, parent, Kind.VIEW, labels, None)
        return self._create(key, lambda: self._open_view(key, parent))

    def mounts(self, key: str) -> list[Mount]:
        found = self.table.get(key)
        if found.kind is Kind.COMMITTED:
            raise ConflictError(f"snapshot {key} is committed: only actives and views mount")
        if found.state is not State.READY:
            raise ConflictError(f"snapshot {key} is busy ({found.state})")
        with self._open_lock:
            opened = self._opened.get(key)
            if opened is None:
                # Opened again after a restart: layers and keys are where they were; an
                # ephemeral active's writes died with the key the last process held.
                opened = self._reopen(found)
                self._opened[key] = opened
            return list(opened.mounts)

    def commit(self, name: str, key: str, labels: Mapping[str, str]) -> Snapshot:
        """The active's layer becomes a committed one; a container's ephemeral writes
        are first made into a layer of their own (under a key chain of its own)."""
        active = self.table.begin_commit(name, key, labels)
        try:
            if active.ephemeral:
                self._layer_from_writes(active)
            else:
                self._close(key)
                assert active.layer is not None
                self.backend.commit(active.layer)
        except BaseException:
            self._undo_commit(key)
            raise
        committed = self.table.finish_commit(key)
        if active.ephemeral:
            self._close(key)  # the scratch volume and the view: the writes are in the layer now
        return committed

    def remove(self, key: str) -> None:
        removing = self.table.begin_remove(key)
        try:
            self._close(key, discard=True)
            self._views.evict(key)
        except BaseException:
            self.table.abort_remove(key)
            raise
        self._destroy(removing)
        self.table.finish_remove(key)

    def stat(self, key: str) -> Snapshot:
        return self.table.get(key)

    def update(self, key: str, labels: Mapping[str, str], paths: Sequence[str]) -> Snapshot:
        return self.table.update_labels(key, labels, paths)

    def usage(self, key: str) -> Usage:
        found = self.table.get(key)
        info = self.backend.info(found.layer) if found.layer else None
        return Usage(size=info.disk_bytes if info else 0, inodes=0)

    def walk(self, filters: Sequence[str] = ()) -> list[Snapshot]:
        matcher = parse(filters)
        return [s for s in self.table.visible() if matcher.match(functools.partial(_field, s))]

    def cleanup(self) -> list[str]:
        """containerd's Cleanup (after its garbage collection): key chains still to
        destroy, and layers no record claims."""
        return self._retry_shreds() + self._sweep()

    def close(self) -> None:
        """Unmount and detach everything; a container still running from us loses its root."""
        with self._open_lock:
            opened = list(self._opened.items())
            self._opened.clear()
        table = mounts(self.executor) if opened else []
        for key, held in opened:
            devices = {a.device for a in held.attachments}
            for source, point in table:
                if source in devices and Path(point) not in held.points:
                    logger.warning("snapshot %s: unmounting %s at shutdown", key, point)
                    unmount(self.executor, point)
            self._finish(held, force=True)
        self._views.close()
        self._spares.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- recovery ----------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Undo what a dead snapshotter left; one line per thing done.

        The backend first (its attachments: daemons, FUSE mounts, loop
        devices, whatever was mounted on them or under them, scratch
        volumes), then every record caught in a transition: a half-made
        snapshot is undone, a commit is finished if the backend committed the
        layer and undone otherwise, a removal is finished. Actives and views
        stay: they are opened again when containerd asks for their mounts.
        Layers no record claims are removed; key chains awaiting destruction
        are destroyed.
        """
        done = list(self.backend.recover())
        layers = {info.layer: info for info in self.backend.layers()}
        for record in self.table.all():
            if record.state is State.CREATING:
                self._undo_create(record.key)
                done.append(f"snapshot {record.key}: half made, undone")
            elif record.state is State.COMMITTING:
                info = layers.get(record.layer or "")
                if info is not None and info.committed:
                    self.table.finish_commit(record.key)
                    done.append(f"snapshot {record.key}: commit to {record.commit_name} finished")
                else:
                    self._undo_commit(record.key)
                    done.append(f"snapshot {record.key}: commit undone, still active")
            elif record.state is State.REMOVING:
                self._destroy(record)
                self.table.finish_remove(record.key)
                done.append(f"snapshot {record.key}: removal finished")
            elif record.layer is not None and record.layer not in layers:
                # Its layer is gone (removed by hand): the record would only mislead.
                self.table.abort(record.key)
                done.append(f"snapshot {record.key}: its layer {record.layer} is missing, dropped")
        return done + self._sweep() + self._retry_shreds()

    # -- opening -----------------------------------------------------------------------

    def _prepare_layer(self, key: str, parent: str, labels: Mapping[str, str]) -> list[Mount]:
        layer = new_layer_id()
        self.table.begin_create(key, parent, Kind.ACTIVE, labels, layer)

        def make() -> _Opened:
            below = self._links(parent)
            chain = self.keys.create_chain(self.repository, _chain_digest(key, labels), 1)
            self.table.set_key_ref(key, chain)
            link = ChainLink(layer, self._key(chain))
            self.backend.create(
                layer, below[-1].layer if below else None, link.key, self.layer_size
            )
            opened = self._open_layer([*below, link])
            try:
                if not below:
                    device = opened.attachments[0].device
                    make_filesystem(self.executor, device, reads_zeros=self.backend.reads_zeros)
            except BaseException:
                opened.close(self.executor)
                raise
            return opened

        return self._create(key, make)

    def _create(self, key: str, make: Callable[[], _Opened]) -> list[Mount]:
        """Make what a CREATING record needs, then mark it ready; undo everything on failure."""
        try:
            opened = make()
            with self._open_lock:
                self._opened[key] = opened
            self.table.finish_create(key)
        except BaseException:
            self._undo_create(key)
            raise
        return list(opened.mounts)

    def _open_layer(self, chain: list[ChainLink]) -> _Opened:
        """An active's layers, writable on top: containerd mounts the device itself."""
        attachment = self.backend.attach(chain, writable=True)
        return _Opened([Mount(FS_TYPE, attachment.device, ("rw",))], [attachment])

    def _open_view(self, key: str, parent: str) -> _Opened:
        if not parent:
            return _Opened([Mount("bind", os.fspath(self.empty), ("ro", "rbind"))])
        attachment = self.backend.attach(self._links(parent), writable=False)
        return _Opened([Mount(FS_TYPE, attachment.device, ("ro", "noload"))], [attachment])

    def _open_ephemeral(self, key: str, parent: str) -> _Opened:
        """The parent's layers read-only (one mount shared by every container on them),
        under an overlay whose upper directory is on an encrypted scratch volume (a
        random key held only here; warm.py keeps one made ahead)."""
        view: _Opened | None = None
        scratch: _Opened | None = None
        failure: BaseException | None = None
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ephemeral") as pool:
            lower_job = pool.submit(self._views.acquire, parent) if parent else None
            writes_job = pool.submit(self._spares.take)
            try:
                scratch = writes_job.result()
            except BaseException as exc:
                failure = exc
            if lower_job is not None:
                try:
                    view = lower_job.result()
                except BaseException as exc:
                    failure = failure or exc
        if failure is not None or scratch is None:
            if view is not None:
                self._views.release(parent)
            if scratch is not None:
                self._drop(scratch, True)
            raise failure or UnavailableError("no scratch volume was made")
        lower = view.points[0] if view is not None else self.empty
        writes = scratch.points[-1]
        options = (
            f"workdir={writes / 'work'}",
            f"upperdir={writes / 'upper'}",
            f"lowerdir={lower}",
        )
        return _Opened(
            [Mount("overlay", "overlay", options)],
            scratch.attachments,
            scratch.points,
            upper=writes / "upper",
            view=parent or None,
        )

    def _mounted_view(self, parent: str) -> _Opened:
        """The parent's layers, read-only, mounted under their attachment's lease."""
        opened = _Opened([])
        try:
            view = self.backend.attach(self._links(parent), writable=False)
            opened.attachments.append(view)
            lower = view.lease.path / "view"
            lower.mkdir(mode=0o755)
            mount(self.executor, view.device, lower, writable=False)
            opened.points.append(lower)
        except BaseException:
            opened.close(self.executor, force=True)
            raise
        return opened

    def _mounted_scratch(self) -> _Opened:
        """An encrypted scratch volume with a fresh file system: upper/ and work/."""
        opened = _Opened([])
        try:
            scratch = self.backend.scratch(self.scratch_size)
            opened.attachments.append(scratch)
            make_filesystem(self.executor, scratch.device, reads_zeros=False, ephemeral=True)
            writes = scratch.lease.path / "writes"
            writes.mkdir(mode=0o700)
            mount(self.executor, scratch.device, writes, writable=True)
            opened.points.append(writes)
            (writes / "upper").mkdir(mode=0o755)
            (writes / "work").mkdir(mode=0o700)
        except BaseException:
            opened.close(self.executor, force=True)
            raise
        return opened

    def _layer_from_writes(self, active: Snapshot) -> None:
        """A committed layer holding what the ephemeral active's overlay upper changed."""
        with self._open_lock:
            opened = self._opened.get(active.key)
        layer = new_layer_id()
        digest = "sha256:" + hashlib.sha256(active.key.encode()).hexdigest()
        chain = self.keys.create_chain(self.repository, digest, 1)
        self.table.set_commit_layer(active.key, layer, chain)
        below = self._links(active.parent)
        link = ChainLink(layer, self._key(chain))
        self.backend.create(layer, below[-1].layer if below else None, link.key, self.layer_size)
        with self.backend.attach([*below, link], writable=True) as attachment:
            if not below:
                device = attachment.device
                make_filesystem(self.executor, device, reads_zeros=self.backend.reads_zeros)
            target = attachment.lease.path / "fill"
            target.mkdir(mode=0o700)
            mount(self.executor, attachment.device, target, writable=True)
            try:
                if opened is not None and opened.upper is not None:
                    apply_upper(opened.upper, target)
            finally:
                unmount_if_mounted(self.executor, target)
        self.backend.commit(layer)

    def _undo_commit(self, key: str) -> None:
        """Back to the active it was; a layer made from ephemeral writes is destroyed."""
        record = self.table.find(key)
        if record is not None and record.ephemeral and record.layer is not None:
            self._destroy(record)
        self.table.abort_commit(key)

    def _drop(self, opened: _Opened, force: bool) -> None:
        opened.close(self.executor, force=force)

    def _finish(self, opened: _Opened, *, force: bool = False) -> None:
        """Close what an active or view held, and give back the shared view it used."""
        opened.close(self.executor, force=force)
        if opened.view is not None:
            self._views.release(opened.view)

    def _reopen(self, record: Snapshot) -> _Opened:
        if record.kind is Kind.VIEW:
            return self._open_view(record.key, record.parent)
        if record.ephemeral:
            logger.warning("snapshot %s: its writes were lost with the last process", record.key)
            return self._open_ephemeral(record.key, record.parent)
        return self._open_layer([*self._links(record.parent), self._own_link(record)])

    # -- helpers -----------------------------------------------------------------------

    def _links(self, parent: str) -> list[ChainLink]:
        """The committed layers from the base up to `parent`, each with its key."""
        if not parent:
            return []
        return [self._own_link(record) for record in self.table.ancestry(parent)]

    def _own_link(self, record: Snapshot) -> ChainLink:
        if record.layer is None or record.key_ref is None:
            raise NotFoundError(f"snapshot {record.key} has no layer")
        return ChainLink(record.layer, self._key(record.key_ref.chain))

    def _key(self, chain: ChainRef) -> bytes:
        return self.keys.layer_keys(chain, 0)[0]

    def _close(self, key: str, *, discard: bool = False) -> None:
        """Close what the snapshot holds open; refused while something still mounts it.

        `discard` (Remove): containerd has dropped the snapshot already, and
        what still holds it is a container's mount namespace on its way out
        (`ctr run --rm` removes the snapshot as the container goes). Wait for
        it a while, then detach anyway, lazily: the content is being discarded.
        """
        deadline = time.monotonic() + (self.discard_wait if discard else 0.0)
        while True:
            try:
                self._try_close(key)
                return
            except ConflictError as exc:
                if not discard:
                    raise
                if time.monotonic() >= deadline:
                    logger.warning("%s; detached anyway, its content is discarded", exc)
                    self._force_close(key)
                    return
            time.sleep(_POLL)

    def _try_close(self, key: str) -> None:
        with self._open_lock:
            opened = self._opened.get(key)
            if opened is None:
                return
            devices = {a.device for a in opened.attachments}
            ours = {os.fspath(p) for p in opened.points}
            users = [p for s, p in mounts(self.executor) if s in devices and p not in ours]
            if users:
                raise ConflictError(f"snapshot {key} is mounted at {users[0]}; unmount it first")
            try:
                self._finish(opened)
            except ToolError as exc:
                # Our upper mount is busy while an overlay still uses it.
                raise ConflictError(f"snapshot {key} is still in use ({exc})") from None
            del self._opened[key]

    def _force_close(self, key: str) -> None:
        with self._open_lock:
            opened = self._opened.pop(key, None)
        if opened is None:
            return
        devices = {a.device for a in opened.attachments}
        ours = {os.fspath(p) for p in opened.points}
        for source, point in mounts(self.executor):
            if source in devices and point not in ours:
                force_unmount(self.executor, Path(point))
        self._finish(opened, force=True)

    def _undo_create(self, key: str) -> None:
        with self._open_lock:
            opened = self._opened.pop(key, None)
        if opened is not None:
            self._finish(opened, force=True)
        record = self.table.find(key)
        if record is None:
            return
        self._destroy(record)
        self.table.abort(key)

    def _destroy(self, record: Snapshot) -> None:
        """The layer's key first (crypto-shredding), then its files."""
        if record.key_ref is not None:
            self._shred(record.key_ref.chain)
        if record.layer is not None:
            self.backend.remove(record.layer)

    def _shred(self, chain: ChainRef) -> None:
        try:
            self.keys.destroy_chain(chain)
        except TrustplaneError as exc:
            self.table.queue_shred(chain)
            logger.warning("key chain %s not destroyed yet (%s); queued", chain.id, exc)

    def _retry_shreds(self) -> list[str]:
        done = []
        for chain in self.table.pending_shreds():
            try:
                self.keys.destroy_chain(chain)
            except TrustplaneError as exc:
                done.append(f"key chain {chain.id}: still not destroyed ({exc})")
                continue
            self.table.shredded(chain)
            done.append(f"key chain {chain.id}: destroyed")
        return done

    def _sweep(self) -> list[str]:
        # Listed before the claims are read: a record is written before its layer
        # is made, so a layer being made (by a Prepare meanwhile) is claimed already.
        found = self.backend.layers()
        claimed = self.table.layers()
        done = []
        for info in found:
            if info.layer not in claimed:
                self.backend.remove(info.layer)
                done.append(f"layer {info.layer}: removed (no snapshot holds it)")
        return done


def new_layer_id() -> str:
    return check_layer_id(f"ctd-{secrets.token_hex(8)}")


def unpacking(key: str, labels: Mapping[str, str]) -> bool:
    """Whether containerd prepares this snapshot to unpack a layer into it (and commit it).

    containerd 1.6 says so in the key (`ctr images import` and `pull` both use
    snapshots.UnpackKeyFormat); the label is set by its newer unpacker only.
    """
    own = key.split("/", 2)[-1]
    return SNAPSHOT_REF in labels or own.startswith(UNPACK_PREFIX)


def _chain_digest(key: str, labels: Mapping[str, str]) -> str:
    """What the control plane records the chain for: the chainID containerd will commit
    the layer as, when it says so; else a digest of the snapshot's key."""
    for ref in (labels.get(SNAPSHOT_REF, ""), key.rpartition(" ")[2]):
        if _DIGEST.fullmatch(ref):
            return ref
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _field(record: Snapshot, path: Sequence[str]) -> str | None:
    """containerd's filter fields of a snapshot (storage.adaptSnapshot)."""
    if not path:
        return None
    head = path[0]
    if head == "kind":
        return record.kind.value
    if head == "name":
        return record.key
    if head == "parent":
        return record.parent
    if head == "labels":
        return record.labels.get(".".join(path[1:])) if record.labels else None
    return None


def _take_root(root: Path) -> int:
    """An exclusive lock on ROOT/lock for the process's lifetime: one snapshotter per root."""
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"{root}: another snapshotter serves this root") from None
    return fd
