"""The qcow2 + LUKS chain backend: works on any Linux with FUSE and loop devices.

Layer *k* is a qcow2 file encrypted with LUKS under key *k* whose backing
file is layer *k-1* (DESIGN.md, "Layer store: qcow2 + LUKS chain"):

    qemu-img create -f qcow2 -o encrypt.format=luks,encrypt.key-secret=s0,
        encrypt.hash-alg=sha512,encrypt.iter-time=10 -b PARENT.qcow2 -F qcow2 LAYER.prep.qcow2 SIZE

It holds only the clusters its own writes changed. A chain is opened by one
`qemu-storage-daemon` (a secret, a `file` and a `qcow2` node per layer,
linked by `backing`; lower layers read-only), exported through FUSE as one
plain file, attached to a loop device. The daemon runs in the foreground
under the executor (`ToolProcess`), so stopping it leaves no FUSE mount.

Keys are random 256-bit values: the LUKS passphrase is the key in hex (QEMU
reads a secret as text), and the PBKDF costs only `iter_time_ms` per open,
because stretching a random key buys nothing.

Files: `layers/ID.prep.qcow2` while prepared, renamed to `layers/ID.qcow2`
(after an fsync) at commit; a child names its parent's committed file as its
backing file, so nothing can be built on a half-written layer. Attachments
live in leases under `run/` (leases.py); `recover()` finds a dead owner's
daemon, loop device and mounts from its lease directory alone.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path

from trustplane.atomic import fsync_dir
from trustplane.errors import DecryptionKeyError, NotFoundError, UsageError
from trustplane.layerstore.backend import (
    Attachment,
    ChainLink,
    LayerBackend,
    LayerInfo,
    check_layer_id,
)
from trustplane.layerstore.fuse_loop import (
    DAEMON,
    FuseLoop,
    clean_directory,
    export_argument,
    option_path,
)
from trustplane.layerstore.leases import Lease, orphans, sweep_hidden
from trustplane.tools import (
    QEMU_LUKS_PBKDF_HASH,
    QEMU_PBKDF_CALIBRATION,
    Executor,
    SecretFd,
    SecretFile,
)
from trustplane.tools.command import Arg

COMMITTED = ".qcow2"
PREPARED = ".prep.qcow2"
DEFAULT_ITER_TIME_MS = 10
WRONG_KEY = {
    "Invalid password, cannot unlock any keyslot": DecryptionKeyError,
    "Parameter 'encrypt.key-secret' is required": DecryptionKeyError,
}
_QCOW2_MAGIC = b"QFI\xfb"
_LUKS1_HEADER = 2 << 20
"""cryptsetup's LUKS1 payload offset (4096 sectors) for a 512-bit key."""


class Qcow2Backend(LayerBackend):
    name = "qcow2"
    reads_zeros = True  # unallocated qcow2 clusters read as zeros, encrypted or not

    def __init__(
        self,
        root: Path,
        executor: Executor | None = None,
        *,
        iter_time_ms: int = DEFAULT_ITER_TIME_MS,
    ) -> None:
        super().__init__(root, executor)
        if iter_time_ms < 1:
            raise UsageError("iter-time must be at least 1 ms")
        self.iter_time_ms = iter_time_ms
        self.layer_dir = root / "layers"
        self.run_dir = root / "run"
        for directory in (root, self.layer_dir, self.run_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- paths ---------------------------------------------------------------------

    def _committed(self, layer: str) -> Path:
        return self.layer_dir / (check_layer_id(layer) + COMMITTED)

    def _prepared(self, layer: str) -> Path:
        return self.layer_dir / (check_layer_id(layer) + PREPARED)

    # -- the interface ---------------------------------------------------------------

    def create(self, layer: str, parent: str | None, key: bytes, size: int) -> None:
        target = self._prepared(layer)
        if self._committed(layer).exists() or target.exists():
            raise UsageError(f"layer {layer} exists already")
        if size <= 0 or size % 512:
            raise UsageError("a layer's size is a positive multiple of 512 bytes")
        options = (
            "encrypt.format=luks,encrypt.key-secret=s0,"
            f"encrypt.hash-alg={QEMU_LUKS_PBKDF_HASH},encrypt.iter-time={self.iter_time_ms}"
        )
        argv: list[Arg] = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if parent is not None:
            argv.append("-u")  # the parent may not be made yet: its name is all it takes
        argv += ["--object", SecretFile(_passphrase(key), "secret,id=s0,file={}")]
        argv += ["-o", options]
        if parent is not None:
            check_layer_id(parent)
            # Relative: QEMU resolves it next to the child, so the store can move.
            argv += ["-b", parent + COMMITTED, "-F", "qcow2"]
        argv += [os.fspath(target), str(size)]
        retry = QEMU_PBKDF_CALIBRATION.with_cleanup(lambda: target.unlink(missing_ok=True))
        try:
            self.executor.run(argv, retry=retry)
        except BaseException:
            target.unlink(missing_ok=True)
            raise

    def attach(self, chain: Sequence[ChainLink], *, writable: bool) -> Attachment:
        if not chain:
            raise UsageError("a chain has at least one layer")
        paths = self._chain_paths(chain, writable)
        lease = Lease.take(
            self.run_dir,
            {"backend": self.name, "layers": [link.layer for link in chain], "writable": writable},
        )
        try:
            argv = _daemon_argv(chain, paths, lease.path, writable)
            return _Qcow2Attachment(self.executor, lease, argv, writable)
        except BaseException:
            clean_directory(self.executor, lease.path)
            lease.release()
            raise

    def scratch(self, size: int) -> Attachment:
        """Raw LUKS1 (cryptsetup, on a sparse file in the lease) opened by QEMU's luks driver.

        Not a qcow2 layer: nothing is built on it, and `qemu-img create`
        calibrates its PBKDF for seconds of CPU time on every create, which
        a container start must not pay. cryptsetup takes a fixed iteration
        count instead; the key is random and lives only in this process.
        """
        if size <= 0 or size % 512:
            raise UsageError("a scratch volume's size is a positive multiple of 512 bytes")
        lease = Lease.take(self.run_dir, {"backend": self.name, "scratch": True})
        try:
            volume = lease.path / "scratch.luks"
            with volume.open("wb") as handle:
                handle.truncate(size + _LUKS1_HEADER)
            passphrase = _passphrase(os.urandom(32))
            self.executor.run(
                [
                    "cryptsetup",
                    "luksFormat",
                    "--batch-mode",
                    "--type",
                    "luks1",
                    "--cipher",
                    "aes-xts-plain64",
                    "--key-size",
                    "512",
                    "--hash",
                    "sha256",
                    "--pbkdf-force-iterations",
                    "1000",
                    "--key-file",
                    SecretFd(passphrase),
                    os.fspath(volume),
                ]
            )
            argv: list[Arg] = [
                DAEMON,
                "--object",
                SecretFile(passphrase, "secret,id=s0,file={}"),
                "--blockdev",
                f"driver=file,node-name=f0,filename={option_path(volume)}",
                "--blockdev",
                "driver=luks,node-name=l0,file=f0,key-secret=s0",
                "--export",
                export_argument(lease.path, "l0", True),
            ]
            return _Qcow2Attachment(self.executor, lease, argv, True)
        except BaseException:
            clean_directory(self.executor, lease.path)
            lease.release()
            raise

    def commit(self, layer: str) -> None:
        prepared, committed = self._prepared(layer), self._committed(layer)
        if not prepared.is_file():
            raise NotFoundError(f"layer {layer} is not prepared")
        fd = os.open(prepared, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        prepared.replace(committed)
        fsync_dir(self.layer_dir)

    def remove(self, layer: str) -> None:
        for path in (self._prepared(layer), self._committed(layer)):
            path.unlink(missing_ok=True)
        fsync_dir(self.layer_dir)

    def layers(self) -> list[LayerInfo]:
        found = []
        for path in sorted(self.layer_dir.glob("*" + COMMITTED)):
            prepared = path.name.endswith(PREPARED)
            layer = path.name.removesuffix(PREPARED if prepared else COMMITTED)
            try:
                backing = backing_file(path)
                disk = path.stat().st_blocks * 512
            except FileNotFoundError:
                continue  # removed meanwhile
            parent = backing.removesuffix(COMMITTED) if backing else None
            found.append(LayerInfo(layer, parent, not prepared, disk))
        return found

    def raw_paths(self, layer: str) -> list[Path]:
        return [p for p in (self._committed(layer), self._prepared(layer)) if p.exists()]

    def recover(self) -> list[str]:
        cleaned = []
        sweep_hidden(self.run_dir)
        for lease in orphans(self.run_dir):
            try:
                what = clean_directory(self.executor, lease.path)
            finally:
                lease.release()
            cleaned.append(f"attachment {lease.name}: " + (", ".join(what) or "nothing held"))
        return cleaned

    # -- helpers ---------------------------------------------------------------------

    def _chain_paths(self, chain: Sequence[ChainLink], writable: bool) -> list[Path]:
        """Each link's file, checked to be backed by the link below it."""
        paths = []
        for index, link in enumerate(chain):
            top = index == len(chain) - 1
            path = self._prepared(link.layer) if writable and top else self._committed(link.layer)
            if not path.is_file():
                state = "prepared" if writable and top else "committed"
                raise NotFoundError(f"layer {link.layer} is not {state}")
            backing = backing_file(path)
            expected = chain[index - 1].layer + COMMITTED if index else None
            if backing != expected:
                raise UsageError(
                    f"layer {link.layer} is built on {backing or 'nothing'}, "
                    f"not on {expected or 'nothing'}"
                )
            paths.append(path)
        return paths


class _Qcow2Attachment(Attachment):
    """One qemu-storage-daemon exporting one node through FUSE, on a loop device."""

    def __init__(self, executor: Executor, lease: Lease, argv: list[Arg], writable: bool) -> None:
        self.lease = lease
        self.writable = writable
        self._export = FuseLoop(executor, argv, lease.path, writable, failures=WRONG_KEY)
        self.device = self._export.device
        lease.update(device=self.device)

    def close(self) -> None:
        try:
            self._export.close()
            self.device = ""
        finally:
            self.lease.release()


def _daemon_argv(
    chain: Sequence[ChainLink], paths: Sequence[Path], directory: Path, writable: bool
) -> list[Arg]:
    argv: list[Arg] = [DAEMON]
    for index, link in enumerate(chain):
        argv += ["--object", SecretFile(_passphrase(link.key), f"secret,id=s{index},file={{}}")]
    for index, path in enumerate(paths):
        write = writable and index == len(paths) - 1
        ro = "off" if write else "on"
        argv += [
            "--blockdev",
            f"driver=file,node-name=f{index},filename={option_path(path)},read-only={ro}",
            "--blockdev",
            f"driver=qcow2,node-name=q{index},file=f{index},read-only={ro},"
            f"encrypt.format=luks,encrypt.key-secret=s{index}"
            # The base has no backing: `backing=null` fails, so it is left out.
            + (f",backing=q{index - 1}" if index else ""),
        ]
    return [*argv, "--export", export_argument(directory, f"q{len(paths) - 1}", writable)]


def _passphrase(key: bytes) -> bytes:
    if len(key) != 32:
        raise UsageError("layer keys are 32 bytes")
    return key.hex().encode()


def backing_file(path: Path) -> str | None:
    """The backing file name in a qcow2 header (QEMU's qcow2 spec, bytes 0-19).

    Read here rather than with `qemu-img info`: it is 20 bytes of a fixed
    header, and a process per layer per listing would cost more than the rest.
    """
    with path.open("rb") as handle:
        header = handle.read(20)
        if len(header) < 20 or header[:4] != _QCOW2_MAGIC:
            raise UsageError(f"{path} is not a qcow2 file")
        offset, length = struct.unpack(">QI", header[8:20])
        if offset == 0 or length == 0:
            return None
        handle.seek(offset)
        return handle.read(length).decode("utf-8", errors="replace")
