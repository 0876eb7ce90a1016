"""The device-mapper backend: seed 000's own mechanism, for hosts whose kernel has it.

Layer *k* is a dm `snapshot` of layer *k-1*'s device whose copy-on-write
store is dm-crypt under layer *k*'s key over a thin volume of its own:

    layer k   = snapshot  <layer k-1>  <cow k>  P <chunk>
    cow k     = crypt     aes-xts-plain64 <key k>  <thin k>
    thin k    = thin      <pool> <thin id k>
    layer -1  = zero      (what the base is a snapshot of)

so layer *k*'s own blocks are readable only with key *k*, and the device
of layer *k* reads layers 0..*k* (DESIGN.md, "device-mapper in a guest":
dm-crypt *on top of* a thin snapshot would give one key for the whole
tree). The base layer's blocks are dm-crypt over a thin volume too; it is a
snapshot of a `zero` device rather than the crypt device itself, so that a
fresh layer reads zeros, as a fresh qcow2 layer does: mkfs then writes only
its metadata, not zeroed inode tables and journal (the inode tables alone
are 1/64 of the size: 256 MiB of the pool for a 16 GiB layer), and every
layer is built the same way.

One thin pool holds every layer: metadata at the start of the pool device,
data after it (`pool.json`). A layer's record (`layers/ID.prep.json` while
prepared, `layers/ID.json` once committed) holds its thin id, size, chunk
size and a key-check value, so the devices of any chain are re-assembled
from the records and the keys alone, after a reboot or a crash: the thin
pool's metadata and each COW's exception store are on disk (persistent
snapshots, `P`). Devices exist only while a chain is attached; each
attachment builds its own stack under its own names (two snapshots may not
share one COW device, so views never share devices).

Keys: dm-crypt takes a 512-bit XTS key derived from the 256-bit chain key
(HKDF). Its table reaches `dmsetup create NAME FILE` as the executor's
`SecretFile` (a 0600 file in a private directory, gone when the call
returns), never argv; once loaded, root reads it back with `dmsetup table
--showkeys`, which is dm-crypt's nature (README). Each operation (build a
stack, take it down) is one `sh` script of dmsetup calls through the
executor: one process here, one round trip into the test guest. Plain
dm-crypt has no key check of its
own: under a wrong key the COW's first chunk decrypts to noise and the
kernel says `Invalid or corrupt snapshot` (dmsetup: "No such device or
address"), exactly what it says of a COW whose first chunk was never
zeroed. So a record carries a key-check value (HKDF of the key, one-way) and
a wrong key is refused before any device is made (`DecryptionKeyError`);
the kernel's refusal under a key that passes the check is a corrupt layer
(`IntegrityError`).

Where the file system is made: the store's process runs mkfs, mount, the
changeset applier and runc on the layer's device. On a device-mapper host
the device is `/dev/mapper/NAME` on the same host (`devices.LocalDevices`).
This machine has no device-mapper, so the tests run the very same
`dmsetup` sequences in a QEMU guest (`dm_executor` = the guest's runner)
and the guest exports the top device to this host over NBD, where it is a
loop device (`embedded/guest_export.py`). The split is at the block device
on purpose: the applier is Python and runs in the store's process in
production too, so the tests exercise the production path above and below
the seam unchanged; only the one `DeviceAccess` object differs. (Running
the applier in the guest would mean busybox `tar`, whose whiteout and
attribute rules are not the applier's.)

Crash safety: a layer record is written before its thin volume is made and
removed after it is deleted, so the pool holds no thin volume that no
record names; every device an attachment makes is named in its lease first
(leases.py), and `recover()` removes what a dead owner left, then any
device under this pool's prefix that no live lease claims.
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import json
import os
import shlex
import uuid
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from trustplane.atomic import atomic_write, fsync_dir
from trustplane.errors import (
    DecryptionKeyError,
    IntegrityError,
    MalformedError,
    NotFoundError,
    ToolError,
    TrustplaneError,
    UsageError,
)
from trustplane.layerstore.backend import (
    Attachment,
    ChainLink,
    LayerBackend,
    LayerInfo,
    check_layer_id,
)
from trustplane.layerstore.devices import DeviceAccess, LocalDevices, OpenedDevice
from trustplane.layerstore.filesystem import force_unmount
from trustplane.layerstore.fuse_loop import clean_directory
from trustplane.layerstore.leases import Lease, orphans, sweep_hidden
from trustplane.tools import Executor, SecretFile, ToolResult, mounts
from trustplane.tools.command import Arg
from trustplane.tools.failure import last_line

SECTOR = 512
CIPHER = "aes-xts-plain64"
TARGETS = ("crypt", "thin-pool", "thin", "snapshot", "zero")
"""The device-mapper targets this backend builds on."""
DEFAULT_CHUNK = 64 << 10
"""Snapshot chunk: the unit a layer copies up. 64 KiB as a qcow2 cluster; 4 KiB
chunks would cost the kernel an exception entry per 4 KiB a layer holds."""
DEFAULT_BLOCK = 64 << 10
"""Thin-pool data block (the smallest dm-thin allows)."""
COMMITTED = ".json"
PREPARED = ".prep.json"
_FORMAT = 1
_MAX_THIN_ID = (1 << 24) - 1
_KEY_INFO = b"trustplane dm-crypt aes-xts-plain64 v1"
_CHECK_INFO = b"trustplane dm layer key check v1 "
_NOT_A_SNAPSHOT = "No such device or address"
"""dmsetup's words when the snapshot target refuses the COW (ENXIO)."""
_NO_THIN = "No data available"
_BUSY = "Device or resource busy"
_EMPTY_CHECK = 1 << 20
_STEP = "tp-step: "


def device_mapper_problem(executor: Executor) -> str | None:
    """Why the executor's host cannot run this backend, or None when it can.

    `/dev/mapper/control` must exist and answer (a node without the kernel
    driver behind it does not), and `dmsetup targets` must list every target
    of `TARGETS`; a target whose module is not loaded yet is loaded first
    (modprobe), as the kernel would on first use.
    """
    if executor.run(["test", "-e", "/dev/mapper/control"], check=False).returncode != 0:
        return "no device-mapper (/dev/mapper/control is missing)"
    missing: list[str] = []
    for attempt in range(2):
        try:
            result = executor.run(["dmsetup", "targets"], check=False, timeout=30)
        except ToolError as exc:  # no dmsetup at all
            return str(exc)
        if result.returncode != 0:
            lines = result.stderr.decode(errors="replace").strip().splitlines()
            return "device-mapper does not answer: " + (lines[0] if lines else "dmsetup failed")
        found = {line.split()[0] for line in result.text.splitlines() if line.split()}
        missing = [target for target in TARGETS if target not in found]
        if not missing:
            return None
        if attempt == 0:
            modules = ["dm_crypt", "dm_thin_pool", "dm_snapshot", "dm_zero"]
            with contextlib.suppress(ToolError):  # no modprobe: the targets stay missing
                executor.run(["modprobe", "-a", *modules], check=False, timeout=60)
    return "the kernel lacks the device-mapper targets " + ", ".join(missing)


@dataclass(frozen=True)
class _Pool:
    """The thin pool: `pool.json`, written before the pool is first made."""

    id: str
    device: str
    sectors: int
    metadata_sectors: int
    block_sectors: int
    format: int = _FORMAT

    @property
    def prefix(self) -> str:
        return f"tp-{self.id}"

    @property
    def name(self) -> str:
        return f"{self.prefix}-pool"

    @property
    def data_sectors(self) -> int:
        usable = self.sectors - self.metadata_sectors
        return usable - usable % self.block_sectors


@dataclass(frozen=True)
class _Record:
    """One layer: what re-assembles its devices (no key, only a one-way check of it)."""

    layer: str
    parent: str | None
    thin_id: int
    sectors: int
    cow_sectors: int
    chunk_sectors: int
    cipher: str
    key_check: str
    disk_bytes: int = 0
    format: int = _FORMAT


class _Script:
    """Several dmsetup calls as one `sh` script through the executor.

    Each call through a runner costs a process here and, in the test guest,
    a round trip over its channel; a 3-layer view is ten devices. So one
    operation (build a stack, take it down) is one script, `set -e`, whose
    tables with keys are `SecretFile` arguments (`dmsetup create NAME FILE`
    reads the table from the 0600 file): still nothing secret in argv. Each
    step names itself on stderr first, so a failure says which layer.
    """

    def __init__(self) -> None:
        self.lines = ["set -e"]
        self.args: list[Arg] = []

    def step(self, label: str) -> None:
        self.lines.append(f"echo {shlex.quote(_STEP + label)} >&2")

    def add(self, *argv: str) -> None:
        self.lines.append(" ".join(shlex.quote(word) for word in argv))

    def create(self, name: str, table: str, *, readonly: bool) -> None:
        self.add("dmsetup", "create", name, *(["--readonly"] if readonly else []), "--table", table)

    def create_secret(self, name: str, table: bytes, *, readonly: bool) -> None:
        self.args.append(SecretFile(table))
        flags = " --readonly" if readonly else ""
        self.lines.append(f'dmsetup create {shlex.quote(name)}{flags} "${len(self.args)}"')

    def remove(self, names: Sequence[str]) -> None:
        if names:
            self.add("dmsetup", "remove", "--retry", *names)

    def run(self, executor: Executor, *, check: bool = True) -> ToolResult:
        script = "\n".join(self.lines) + "\n"
        return executor.run(["sh", "-c", script, "sh", *self.args], check=check, timeout=300)


class DeviceMapperBackend(LayerBackend):
    name = "dm"
    reads_zeros = True  # a fresh layer is a snapshot of a zero device

    def __init__(
        self,
        root: Path,
        executor: Executor | None = None,
        *,
        pool_device: str | None = None,
        dm_executor: Executor | None = None,
        devices: DeviceAccess | None = None,
        chunk_bytes: int = DEFAULT_CHUNK,
        block_bytes: int = DEFAULT_BLOCK,
    ) -> None:
        """`executor` runs the file-system work on the layer's device (this host);
        `dm_executor` runs dmsetup (the same host in production, the test guest
        in the tests); `devices` brings its devices to this process. The pool
        device is needed the first time only: `pool.json` remembers it."""
        super().__init__(root, executor)
        self.dm = dm_executor or self.executor
        self.devices = devices or LocalDevices()
        for value, what in ((chunk_bytes, "chunk"), (block_bytes, "pool block")):
            if value < 4096 or value & (value - 1):
                raise UsageError(f"the {what} size is a power of two of at least 4 KiB")
        if block_bytes < 64 << 10:
            raise UsageError("dm-thin pool blocks are at least 64 KiB")
        self.chunk_sectors = chunk_bytes // SECTOR
        self.block_sectors = block_bytes // SECTOR
        self.layer_dir = root / "layers"
        self.run_dir = root / "run"
        for directory in (root, self.layer_dir, self.run_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._pool_file = root / "pool.json"
        recorded = self._read_pool()
        if recorded is not None and pool_device not in (None, recorded.device):
            raise UsageError(
                f"this store's thin pool is on {recorded.device}, not on {pool_device}"
            )
        self.pool_device = pool_device or (recorded.device if recorded else None)
        self._active: _Pool | None = None

    # -- the interface ---------------------------------------------------------------

    def create(self, layer: str, parent: str | None, key: bytes, size: int) -> None:
        check_layer_id(layer)
        if parent is not None:
            check_layer_id(parent)
        chunk = self.chunk_sectors * SECTOR
        if size <= 0 or size % chunk:
            raise UsageError(f"a layer's size is a positive multiple of {chunk} bytes")
        below = self._find(parent) if parent is not None else None
        if below is not None and below[0].sectors * SECTOR != size:
            raise UsageError(f"layer {layer} must have the size of layer {parent}")
        pool = self._ensure_pool()
        sectors = size // SECTOR
        with self._pool_lock():
            if self._find(layer) is not None:
                raise UsageError(f"layer {layer} exists already")
            record = _Record(
                layer=layer,
                parent=parent,
                thin_id=self._free_thin_id(),
                sectors=sectors,
                cow_sectors=_cow_sectors(sectors, self.chunk_sectors, pool.block_sectors),
                chunk_sectors=self.chunk_sectors,
                cipher=CIPHER,
                key_check=_key_check(key, layer),
            )
            # Recorded before the thin volume exists: the pool never holds one
            # that no record names, whenever this process dies.
            self._write(record, prepared=True)
        try:
            self._initialise(pool, record, key)
        except BaseException:
            with contextlib.suppress(Exception):
                self._delete_thin(pool, record.thin_id, record.layer)
            self._path(layer, prepared=True).unlink(missing_ok=True)
            raise

    def attach(self, chain: Sequence[ChainLink], *, writable: bool) -> Attachment:
        if not chain:
            raise UsageError("a chain has at least one layer")
        records = self._chain_records(chain, writable)
        pool = self._ensure_pool()
        stack = _Stack(pool, uuid.uuid4().hex)
        stack.zero(records[0].sectors)
        layers = []
        for index, (record, link) in enumerate(zip(records, chain, strict=True)):
            write = writable and index == len(records) - 1
            layers.append(stack.layer(index, record, link.key, writable=write))
        # Every device is named in the lease before the script makes it.
        lease = Lease.take(
            self.run_dir,
            {
                "backend": self.name,
                "layers": [link.layer for link in chain],
                "writable": writable,
                "devices": stack.names,
            },
            name=stack.lease_name,
        )
        try:
            result = stack.script.run(self.dm, check=False)
            if result.returncode != 0:
                raise _stack_failure(stack.script, result)
            return _DmAttachment(self, pool, lease, stack, records, layers[-1], writable)
        except BaseException:
            self._undo_lease(lease)
            raise

    def scratch(self, size: int) -> Attachment:
        """dm-crypt under a random key over a thin volume of its own, deleted at close."""
        if size <= 0 or size % SECTOR:
            raise UsageError("a scratch volume's size is a positive multiple of 512 bytes")
        pool = self._ensure_pool()
        stack = _Stack(pool, uuid.uuid4().hex)
        with self._pool_lock():
            thin_id = self._free_thin_id()
            stack.script.add("dmsetup", "message", pool.name, "0", f"create_thin {thin_id}")
            device = stack.cow(0, thin_id, size // SECTOR, os.urandom(64), writable=True)
            lease = Lease.take(
                self.run_dir,
                {"backend": self.name, "scratch": True, "thin": thin_id, "devices": stack.names},
                name=stack.lease_name,
            )
        try:
            stack.script.run(self.dm)
            return _ScratchAttachment(self, pool, lease, stack, device, thin_id)
        except BaseException:
            self._undo_lease(lease)
            raise

    def commit(self, layer: str) -> None:
        prepared, committed = self._path(layer, True), self._path(layer, False)
        if not prepared.is_file():
            raise NotFoundError(f"layer {layer} is not prepared")
        # Its devices are gone (detached): the snapshot's exception store and
        # the pool's metadata were flushed before they were removed.
        prepared.replace(committed)
        fsync_dir(self.layer_dir)

    def remove(self, layer: str) -> None:
        found = self._find(layer)
        if found is None:
            return
        record, _ = found
        self._delete_thin(self._ensure_pool(), record.thin_id, record.layer)
        for prepared in (True, False):
            self._path(layer, prepared).unlink(missing_ok=True)
        fsync_dir(self.layer_dir)

    def layers(self) -> list[LayerInfo]:
        found = []
        for path in sorted(self.layer_dir.glob("*" + COMMITTED)):
            prepared = path.name.endswith(PREPARED)
            try:
                record = _load_record(path)
            except FileNotFoundError:
                continue  # removed meanwhile
            found.append(LayerInfo(record.layer, record.parent, not prepared, record.disk_bytes))
        return found

    def raw_paths(self, layer: str) -> list[Path]:
        """The pool device: every layer's blocks lie in its data area."""
        pool = self._read_pool()
        if pool is None or self._find(layer) is None:
            return []
        return [Path(pool.device)]

    def recover(self) -> list[str]:
        cleaned = []
        sweep_hidden(self.run_dir)
        for lease in orphans(self.run_dir):
            what = self._undo_lease(lease)
            cleaned.append(f"attachment {lease.name}: " + (", ".join(what) or "nothing held"))
        cleaned += self._remove_strays()
        return cleaned

    # -- beyond the interface ----------------------------------------------------------

    def deactivate(self) -> None:
        """Remove the pool's devices (a host shutting the store down; the tests).

        Nothing is lost: the next use activates the pool again from `pool.json`.
        Fails while an attachment is open.
        """
        pool = self._read_pool()
        if pool is None:
            return
        with self._pool_lock():
            self._active = None
            existing = set(self._dm_names())
            script = _Script()
            script.remove([n for n in _pool_devices(pool) if n in existing])
            script.run(self.dm)

    def device_names(self) -> list[str]:
        """The device-mapper devices under this pool's prefix (the pool's own included)."""
        pool = self._read_pool()
        if pool is None:
            return []
        return [n for n in self._dm_names() if n.startswith(pool.prefix + "-")]

    # -- the pool --------------------------------------------------------------------

    @contextlib.contextmanager
    def _pool_lock(self) -> Iterator[None]:
        """One process (or thread) at a time makes the pool or picks a thin id."""
        fd = os.open(self.root / "pool.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_pool(self) -> _Pool | None:
        try:
            data = json.loads(self._pool_file.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise MalformedError(f"{self._pool_file}: unreadable ({exc})") from None
        return _from_json(_Pool, data, self._pool_file)

    def _ensure_pool(self) -> _Pool:
        """The pool, made on first use, activated when it is not (after a reboot)."""
        if self._active is not None:
            return self._active
        with self._pool_lock():
            pool = self._read_pool()
            fresh = pool is None
            if pool is None:
                pool = self._new_pool()
            meta, data = f"{pool.prefix}-meta", f"{pool.prefix}-data"
            script = _Script()
            script.lines.append(f"dmsetup info {pool.name} >/dev/null 2>&1 && exit 0")
            script.create(meta, f"0 {pool.metadata_sectors} linear {pool.device} 0", readonly=False)
            if fresh:
                # An all-zero superblock tells dm-thin to format the metadata.
                script.add(*_zero(f"/dev/mapper/{meta}", 4096))
            script.create(
                data,
                f"0 {pool.data_sectors} linear {pool.device} {pool.metadata_sectors}",
                readonly=False,
            )
            # error_if_no_space: a full pool fails writes at once instead of
            # queueing them for a minute; the layer being written then fails.
            script.create(
                pool.name,
                f"0 {pool.data_sectors} thin-pool /dev/mapper/{meta} /dev/mapper/{data} "
                f"{pool.block_sectors} 0 1 error_if_no_space",
                readonly=False,
            )
            try:
                script.run(self.dm)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._remove_listed(_pool_devices(pool))
                raise
            self._active = pool
            return pool

    def _new_pool(self) -> _Pool:
        device = self.pool_device
        if not device:
            raise UsageError("the device-mapper backend needs a block device for its thin pool")
        sectors = int(self.dm.run(["blockdev", "--getsz", device], timeout=30).text.split()[0])
        head = self.dm.run(["head", "-c", str(_EMPTY_CHECK), device], timeout=60).stdout
        if head.strip(b"\0"):
            raise UsageError(
                f"{device} is not empty (it starts with data): the store takes only a "
                "device whose first MiB is zeros, so that it never formats one in use"
            )
        metadata = min(max(sectors // 128, 8192), 32 << 20)  # 4 MiB .. 16 GiB
        metadata += -metadata % self.block_sectors
        pool = _Pool(os.urandom(4).hex(), device, sectors, metadata, self.block_sectors)
        if pool.data_sectors < 256 * self.block_sectors:
            raise UsageError(f"{device} is too small for a thin pool")
        atomic_write(self._pool_file, json.dumps(asdict(pool)).encode(), mode=0o600)
        return pool

    def _free_thin_id(self) -> int:
        """The lowest thin id no record and no lease names (under the pool lock)."""
        used = set()
        for path in self.layer_dir.glob("*" + COMMITTED):
            with contextlib.suppress(FileNotFoundError):
                used.add(_load_record(path).thin_id)
        for state_file in self.run_dir.glob("*/state.json"):
            with contextlib.suppress(OSError, ValueError):
                thin = json.loads(state_file.read_bytes()).get("thin")
                if isinstance(thin, int):
                    used.add(thin)
        for candidate in range(_MAX_THIN_ID + 1):
            if candidate not in used:
                return candidate
        raise UsageError("the thin pool has no free device id left")

    def _delete_thin(self, pool: _Pool, thin_id: int, what: str) -> None:
        argv = ["dmsetup", "message", pool.name, "0", f"delete {thin_id}"]
        result = self.dm.run(argv, check=False)
        if result.returncode == 0 or _NO_THIN in result.stderr.decode(errors="replace"):
            return
        if _BUSY in result.stderr.decode(errors="replace"):
            raise UsageError(f"{what} is in use (its devices are attached)")
        line = last_line(result.stderr)
        raise ToolError(f"dmsetup message failed: {line}", tool="dmsetup", returncode=1)

    # -- layers ------------------------------------------------------------------------

    def _path(self, layer: str, prepared: bool) -> Path:
        return self.layer_dir / (check_layer_id(layer) + (PREPARED if prepared else COMMITTED))

    def _find(self, layer: str) -> tuple[_Record, bool] | None:
        """The layer's record and whether it is committed."""
        for prepared in (False, True):
            path = self._path(layer, prepared)
            with contextlib.suppress(FileNotFoundError):
                return _load_record(path), not prepared
        return None

    def _write(self, record: _Record, *, prepared: bool) -> None:
        path = self._path(record.layer, prepared)
        atomic_write(path, json.dumps(asdict(record)).encode(), mode=0o600)

    def _chain_records(self, chain: Sequence[ChainLink], writable: bool) -> list[_Record]:
        """Each link's record: committed (the top prepared when writable), built on
        the link below, all of one size, and the key given for it the right one."""
        records: list[_Record] = []
        for index, link in enumerate(chain):
            top = index == len(chain) - 1
            want_prepared = writable and top
            path = self._path(link.layer, want_prepared)
            try:
                record = _load_record(path)
            except FileNotFoundError:
                state = "prepared" if want_prepared else "committed"
                raise NotFoundError(f"layer {link.layer} is not {state}") from None
            expected = chain[index - 1].layer if index else None
            if record.parent != expected:
                raise UsageError(
                    f"layer {link.layer} is built on {record.parent or 'nothing'}, "
                    f"not on {expected or 'nothing'}"
                )
            if records and record.sectors != records[0].sectors:
                raise MalformedError(f"layer {link.layer} differs in size from the layers below")
            if record.cipher != CIPHER:
                raise MalformedError(f"layer {link.layer}: unknown cipher {record.cipher!r}")
            if not hmac.compare_digest(_key_check(link.key, link.layer), record.key_check):
                raise DecryptionKeyError(f"the key given for layer {link.layer} does not open it")
            records.append(record)
        return records

    def _initialise(self, pool: _Pool, record: _Record, key: bytes) -> None:
        """The thin volume, and its COW's first chunk zeroed through the crypt device:
        the snapshot target reads an all-zero header as a new, empty exception store."""
        stack = _Stack(pool, uuid.uuid4().hex)
        script = stack.script
        script.step(f"layer {record.layer}")
        script.add("dmsetup", "message", pool.name, "0", f"create_thin {record.thin_id}")
        crypt = stack.cow(0, record.thin_id, record.cow_sectors, _xts_key(key), writable=True)
        script.add(*_zero(f"/dev/mapper/{crypt}", record.chunk_sectors * SECTOR))
        script.remove(list(reversed(stack.names)))
        lease = Lease.take(
            self.run_dir,
            {"backend": self.name, "initialise": record.layer, "devices": stack.names},
            name=stack.lease_name,
        )
        try:
            script.run(self.dm)
        except BaseException:
            self._undo_lease(lease)
            raise
        lease.release()

    # -- devices -----------------------------------------------------------------------

    def _dm_names(self) -> list[str]:
        listing = self.dm.run(["dmsetup", "ls"]).text
        if "No devices found" in listing:
            return []
        return [line.split()[0] for line in listing.splitlines() if line.split()]

    def _remove_listed(self, names: Sequence[str]) -> list[str]:
        """Remove those of `names` that exist, in the order given (top of a stack first)."""
        if not names:
            return []
        existing = set(self._dm_names())
        present = [name for name in names if name in existing]
        script = _Script()
        script.remove(present)
        script.run(self.dm)
        return [f"removed {name}" for name in present]

    def _undo_lease(self, lease: Lease) -> list[str]:
        """Everything a lease's state names, undone: mounts on its device or under
        its directory and exports on this host, the devices (top first), a
        scratch volume's thin id. Then the lease goes."""
        try:
            what = []
            device = lease.state.get("device")
            if isinstance(device, str) and device:
                # Mounted on the device, wherever (a view's target outside the lease).
                points = {point for source, point in mounts(self.executor) if source == device}
                for point in sorted(points, key=len, reverse=True):
                    force_unmount(self.executor, Path(point))
                    what.append(f"unmounted {point}")
            what += clean_directory(self.executor, lease.path)
            what += self.devices.recover(lease)
            what += self._remove_listed(list(reversed(lease.state.get("devices", []))))
            thin = lease.state.get("thin")
            if isinstance(thin, int):
                self._delete_thin(self._ensure_pool(), thin, f"scratch volume {thin}")
                what.append(f"deleted scratch thin volume {thin}")
            return what
        finally:
            lease.release()

    def _remove_strays(self) -> list[str]:
        """Devices under this pool's prefix that no lease names (a lease lost with
        its directory); each pass removes what nothing holds open any more."""
        pool = self._read_pool()
        if pool is None:
            return []
        claimed = {_Stack.tag_of(p.name) for p in self.run_dir.iterdir()}
        strays = [
            name
            for name in self._dm_names()
            if name.startswith(pool.prefix + "-")
            and name not in _pool_devices(pool)
            and name.split("-")[2] not in claimed
        ]
        done = []
        while strays:
            left = []
            for name in sorted(strays, key=_stack_order):
                result = self.dm.run(["dmsetup", "remove", name], check=False)
                if result.returncode == 0:
                    done.append(f"removed stray device {name}")
                else:
                    left.append(name)
            if len(left) == len(strays):
                raise ToolError(
                    f"device-mapper devices {', '.join(left)} are held open; "
                    "close what uses them and recover again",
                    tool="dmsetup",
                    returncode=1,
                )
            strays = left
        return done


class _Stack:
    """The devices of one attachment, planned (named) before one script makes them."""

    def __init__(self, pool: _Pool, lease_name: str) -> None:
        self.pool = pool
        self.lease_name = lease_name
        self.tag = f"{pool.prefix}-{self.tag_of(lease_name)}"
        self.names: list[str] = []
        self.script = _Script()

    @staticmethod
    def tag_of(lease_name: str) -> str:
        return lease_name.lstrip(".")[:16]

    def zero(self, sectors: int) -> str:
        name = self._name("z")
        self.script.create(name, f"0 {sectors} zero", readonly=True)
        return name

    def cow(self, index: int, thin_id: int, sectors: int, key: bytes, *, writable: bool) -> str:
        """A thin volume and, over it, dm-crypt under `key` (the table on a secret file)."""
        thin = self._name(f"{index}t")
        table = f"0 {sectors} thin /dev/mapper/{self.pool.name} {thin_id}"
        self.script.create(thin, table, readonly=not writable)
        crypt = self._name(f"{index}c")
        secret = f"0 {sectors} crypt {CIPHER} {key.hex()} 0 /dev/mapper/{thin} 0\n".encode()
        self.script.create_secret(crypt, secret, readonly=not writable)
        return crypt

    def layer(self, index: int, record: _Record, key: bytes, *, writable: bool) -> str:
        """Layer `index`: a snapshot of the device below over its crypt COW."""
        origin = self.names[-1]  # the zero device, or the layer below
        cow = self.cow(index, record.thin_id, record.cow_sectors, _xts_key(key), writable=writable)
        name = self._name(f"{index}")
        self.script.step(f"layer {record.layer}")
        table = (
            f"0 {record.sectors} snapshot /dev/mapper/{origin} /dev/mapper/{cow} "
            f"P {record.chunk_sectors}"
        )
        self.script.create(name, table, readonly=not writable)
        return name

    def _name(self, suffix: str) -> str:
        name = f"{self.tag}-{suffix}"
        self.names.append(name)
        return name


def _stack_failure(script: _Script, result: ToolResult) -> TrustplaneError:
    """A failed stack script as one error: a refused snapshot under a key that
    passed the check is a corrupt layer; anything else, the tool's own words."""
    output = result.stderr.decode(errors="replace")
    steps = [line[len(_STEP) :] for line in output.splitlines() if line.startswith(_STEP)]
    if steps and _NOT_A_SNAPSHOT in output.rpartition(_STEP)[2]:
        return IntegrityError(
            f"{steps[-1]}: its copy-on-write store is not a valid snapshot although the "
            "key is right (corrupt, or never initialised)"
        )
    lines = [line for line in output.splitlines() if not line.startswith(_STEP)]
    what = lines[-1].strip() if lines else f"exit status {result.returncode}"
    return ToolError(f"dmsetup failed: {what}", tool="dmsetup", returncode=result.returncode)


class _OpenedStack(Attachment):
    """A device stack in the guest with its top device brought to this process.

    Closing drops the local device first, then takes the stack down
    (`_take_down`, which each kind of stack does its own way); whatever fails
    on the way undoes the lease, so `recover` finds what is left."""

    def __init__(
        self, backend: DeviceMapperBackend, lease: Lease, top: str, *, writable: bool
    ) -> None:
        self.backend = backend
        self.lease = lease
        self.writable = writable
        self.device = ""
        self._opened: OpenedDevice | None = backend.devices.open(
            f"/dev/mapper/{top}", writable=writable, lease=lease
        )
        self.device = self._opened.path
        lease.update(device=self.device)

    def close(self) -> None:
        if not self.lease.path.exists():
            return
        try:
            if self._opened is not None:
                opened, self._opened = self._opened, None
                opened.close()
            self.device = ""
            self._take_down()
        except BaseException:
            self.backend._undo_lease(self.lease)
            raise
        self.lease.release()

    @abstractmethod
    def _take_down(self) -> None:
        """Remove this stack's devices in the guest (the local device is closed)."""


class _DmAttachment(_OpenedStack):
    """A chain's device stack, bottom up, and its top device brought to this process."""

    def __init__(
        self,
        backend: DeviceMapperBackend,
        pool: _Pool,
        lease: Lease,
        stack: _Stack,
        records: Sequence[_Record],
        top: str,
        writable: bool,
    ) -> None:
        self.pool = pool
        self.records = list(records)
        self.names = list(stack.names)
        self.tag = stack.tag
        self.top = top
        super().__init__(backend, lease, top, writable=writable)

    def _take_down(self) -> None:
        if self.writable:
            self._finish_top()
        else:
            script = _Script()
            script.remove(list(reversed(self.names)))
            script.run(self.backend.dm)

    def _finish_top(self) -> None:
        """Take a written layer's devices down: its snapshot must still be valid (a
        full pool invalidates it), its exceptions and the pool's metadata flushed
        (a snapshot commits on removal; dm-thin commits on a flush), its size
        recorded."""
        index = len(self.records) - 1
        crypt, thin = f"{self.tag}-{index}c", f"{self.tag}-{index}t"
        below = [name for name in reversed(self.names) if name not in (self.top, crypt, thin)]
        script = _Script()
        script.lines.append(f"echo snapshot $(dmsetup status {self.top})")
        script.remove([self.top, crypt])
        script.add("dd", "if=/dev/null", f"of=/dev/mapper/{thin}", "count=0", "conv=notrunc,fsync")
        script.lines.append(f"echo thin $(dmsetup status {thin})")
        script.remove([thin, *below])
        out = script.run(self.backend.dm).text.splitlines()
        status = dict(line.split(" ", 1) for line in out if " " in line)
        snapshot = status.get("snapshot", "").split()
        record = self.records[-1]
        if len(snapshot) < 4 or snapshot[3] in ("Invalid", "Overflow", "Merge", "Unknown"):
            raise IntegrityError(
                f"layer {record.layer}: its snapshot became invalid while it was written "
                f"({' '.join(snapshot[3:]) or 'no status'}); is the thin pool full?"
            )
        mapped = status.get("thin", "").split()
        disk = int(mapped[3]) * SECTOR if len(mapped) > 3 and mapped[3].isdigit() else 0
        self.backend._write(replace(record, disk_bytes=disk), prepared=True)


class _ScratchAttachment(_OpenedStack):
    """dm-crypt under a random key over a fresh thin volume; deleted at close."""

    def __init__(
        self,
        backend: DeviceMapperBackend,
        pool: _Pool,
        lease: Lease,
        stack: _Stack,
        device: str,
        thin_id: int,
    ) -> None:
        self.pool = pool
        self.names = list(stack.names)
        self.thin_id = thin_id
        super().__init__(backend, lease, device, writable=True)

    def _take_down(self) -> None:
        script = _Script()
        script.remove(list(reversed(self.names)))
        script.add("dmsetup", "message", self.pool.name, "0", f"delete {self.thin_id}")
        script.run(self.backend.dm)


# -- helpers ---------------------------------------------------------------------------


def _pool_devices(pool: _Pool) -> list[str]:
    """The pool's own devices, top first."""
    return [pool.name, f"{pool.prefix}-data", f"{pool.prefix}-meta"]


def _cow_sectors(sectors: int, chunk: int, block: int) -> int:
    """A COW that can hold every chunk of the layer, plus its exception store:
    a header chunk, and one metadata chunk per chunk*512/16 data chunks. Thin
    volumes are sparse, so the margin costs nothing until used."""
    chunks = -(-sectors // chunk)
    per_area = chunk * SECTOR // 16
    total = (chunks + 2 + -(-chunks // per_area) + 1) * chunk
    return total + -total % block


def _zero(device: str, size: int) -> list[str]:
    """`size` zero bytes at the start of `device`, synced (busybox's dd and coreutils')."""
    return ["dd", "if=/dev/zero", f"of={device}", f"bs={size}", "count=1", "conv=fsync,notrunc"]


def _hkdf(key: bytes, info: bytes, length: int) -> bytes:
    if len(key) != 32:
        raise UsageError("layer keys are 32 bytes")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(key)


def _xts_key(key: bytes) -> bytes:
    """The 512-bit AES-XTS key dm-crypt uses, from the 256-bit chain key."""
    return _hkdf(key, _KEY_INFO, 64)


def _key_check(key: bytes, layer: str) -> str:
    """A one-way value that tells the right key from a wrong one (as LUKS's digest does)."""
    return _hkdf(key, _CHECK_INFO + layer.encode(), 32).hex()


def _stack_order(name: str) -> tuple[int, int]:
    """Removal order of one stack's devices: snapshots from the top, then crypt,
    thin, and the zero device last."""
    suffix = name.rsplit("-", 1)[-1]
    if suffix == "z":
        return (1, 0)
    digits = "".join(c for c in suffix if c.isdigit())
    kind = {"": 0, "c": 1, "t": 2}.get(suffix[len(digits) :], 3)
    return (0, -int(digits or 0) * 4 + kind)


def _load_record(path: Path) -> _Record:
    try:
        data = json.loads(path.read_bytes())
    except ValueError as exc:
        raise MalformedError(f"{path}: unreadable layer record ({exc})") from None
    return _from_json(_Record, data, path)


_T = TypeVar("_T")


def _from_json(cls: type[_T], data: Any, path: Path) -> _T:
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise MalformedError(f"{path}: not a format {_FORMAT} record")
    try:
        return cls(**data)
    except TypeError as exc:
        raise MalformedError(f"{path}: {exc}") from None
