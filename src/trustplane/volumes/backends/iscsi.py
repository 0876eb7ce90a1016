"""Volumes as LUNs on an iSCSI target (tgt), reached by QEMU from user space.

Each volume is one target (`IQN_PREFIX:NAME`) with LUN 1 backed by a
sparse file on the storage host, managed with `tgtadm` through the
executor:

    tgtadm --lld iscsi --mode target --op new --tid T --targetname IQN
    tgtadm --lld iscsi --mode logicalunit --op new --tid T --lun 1 --backing-store FILE
    tgtadm --lld iscsi --mode target --op bind --tid T --initiator-address ALL

Compute hosts reach the LUN with libiscsi inside QEMU (`iscsi://…`), with no
kernel initiator, so nothing about the volume appears as a block device on
the host. The target admits every initiator address: what the LUN holds is
LUKS ciphertext, and who may use a volume is decided by the key release,
not by the network (CHAP and initiator ACLs are left to the operator).
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import ClassVar

from trustplane.api.volume_location import AnyLocation, Endpoint, IscsiLocation
from trustplane.api.volume_spec import BackendKind
from trustplane.errors import NotFoundError, ToolError, UsageError
from trustplane.tools import Executor
from trustplane.tools.command import Arg
from trustplane.volumes.backends.base import Backend

IQN_PREFIX = "iqn.2024-01.dev.trustplane"
LUN = 1
_TARGET_LINE = re.compile(r"^Target (\d+): (\S+)$", re.MULTILINE)
_TID_ATTEMPTS = 20
_NEXUS_LINE = re.compile(r"^\s+I_T nexus: \d+$", re.MULTILINE)


class IscsiBackend(Backend):
    kind: ClassVar[BackendKind] = BackendKind.ISCSI

    def __init__(
        self,
        store: Path,
        portal: Endpoint,
        *,
        control_port: int | None = None,
        iqn_prefix: str = IQN_PREFIX,
        executor: Executor | None = None,
    ) -> None:
        """`store`: where backing files go; `portal`: where initiators reach tgtd;
        `control_port`: tgtd's `-C` (None: the default daemon)."""
        super().__init__(executor)
        self.store = store.absolute()
        self.store.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.portal = portal
        self.control_port = control_port
        self.iqn_prefix = iqn_prefix
        self._lock = threading.Lock()

    def _tgtadm(self, *args: str) -> str:
        control = ["-C", str(self.control_port)] if self.control_port is not None else []
        return self.executor.run(["tgtadm", *control, "--lld", "iscsi", *args], timeout=30).text

    def _targets(self) -> dict[str, int]:
        shown = self._tgtadm("--mode", "target", "--op", "show")
        return {iqn: int(tid) for tid, iqn in _TARGET_LINE.findall(shown)}

    def _backing(self, name: str) -> Path:
        return self.store / f"{self.check_name(name)}.lun"

    def location(self, name: str) -> IscsiLocation:
        iqn = f"{self.iqn_prefix}:{self.check_name(name)}"
        return IscsiLocation(portal=self.portal, iqn=iqn, lun=LUN)

    def exists(self, name: str) -> bool:
        return self._backing(name).exists() or self.location(name).iqn in self._targets()

    def create(self, name: str, size: int) -> IscsiLocation:
        self.check_size(size)
        location = self.location(name)
        backing = self._backing(name)
        try:
            fd = os.open(backing, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            raise UsageError(f"iscsi volume {name} exists already") from None
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        try:
            with self._lock:
                tid = self._new_target(location.iqn)
            self._tgtadm(
                "--mode", "logicalunit", "--op", "new", "--tid", str(tid),
                "--lun", str(LUN), "--backing-store", os.fspath(backing),
            )  # fmt: skip
            self._tgtadm(
                "--mode", "target", "--op", "bind", "--tid", str(tid),
                "--initiator-address", "ALL",
            )  # fmt: skip
        except BaseException:
            self.delete(location)
            raise
        return location

    def _new_target(self, iqn: str) -> int:
        """A target with the next free tid (another creator may take one first: retry)."""
        for _ in range(_TID_ATTEMPTS):
            targets = self._targets()
            if iqn in targets:
                raise UsageError(f"iSCSI target {iqn} exists already")
            tid = max(targets.values(), default=0) + 1
            try:
                self._tgtadm(
                    "--mode", "target", "--op", "new", "--tid", str(tid), "--targetname", iqn
                )  # fmt: skip
            except ToolError as exc:
                if "exist" in str(exc):
                    continue
                raise
            return tid
        raise UsageError(f"no free target id for {iqn} after {_TID_ATTEMPTS} tries")

    def delete(self, location: AnyLocation) -> None:
        lun = _lun(location)
        tid = self._targets().get(lun.iqn)
        if tid is not None:
            self._tgtadm("--mode", "target", "--op", "delete", "--force", "--tid", str(tid))
        name = lun.iqn.removeprefix(self.iqn_prefix + ":")
        self._backing(name).unlink(missing_ok=True)

    def backing_file(self, location: AnyLocation) -> Path:
        """The file behind the LUN (on the storage host)."""
        return self._backing(_lun(location).iqn.removeprefix(self.iqn_prefix + ":"))

    def size(self, location: AnyLocation) -> int:
        return self.backing_file(location).stat().st_size

    def grow(self, location: AnyLocation, size: int) -> None:
        """Grow the backing file, then delete and add the LUN again: tgtd reads a
        backing file's size only when the LUN is added (it has no resize), and
        initiators see the new capacity at their next READ CAPACITY.

        Refused while an initiator is logged in to the target (an I_T nexus):
        re-adding the LUN under it would pull its disk away. The LUN keeps its
        number and serial (tgtd derives both from the target and LUN ids), and a
        crash between the delete and the add is repaired by the next grow (the
        LUN is added when it is missing)."""
        self.check_size(size)
        lun = _lun(location)
        backing = self.backing_file(location)
        with self._lock:
            tid = self._targets().get(lun.iqn)
            if tid is None:
                raise NotFoundError(f"iSCSI target {lun.iqn} does not exist")
            section = _section(self._tgtadm("--mode", "target", "--op", "show"), tid)
            if _logged_in(section):
                raise UsageError(
                    f"an initiator is logged in to {lun.iqn}; tgtd cannot grow a LUN in use "
                    "(detach the volume first)"
                )
            try:
                fd = os.open(backing, os.O_WRONLY | os.O_NOFOLLOW)
            except FileNotFoundError:
                raise NotFoundError(f"the backing file of {lun.iqn} is missing") from None
            try:
                if os.fstat(fd).st_size < size:
                    os.ftruncate(fd, size)
                    os.fsync(fd)
            finally:
                os.close(fd)
            if re.search(rf"^\s+LUN: {LUN}$", section, re.MULTILINE):
                self._tgtadm(
                    "--mode", "logicalunit", "--op", "delete", "--tid", str(tid),
                    "--lun", str(LUN),
                )  # fmt: skip
            self._tgtadm(
                "--mode", "logicalunit", "--op", "new", "--tid", str(tid),
                "--lun", str(LUN), "--backing-store", os.fspath(backing),
            )  # fmt: skip

    def in_use(self, location: AnyLocation) -> str | None:
        """The initiators logged in to the target (its I_T nexuses, as `grow` refuses
        them): a VM's QEMU, a kernel initiator, anything that reads or writes the LUN.

        The backing file is not looked at: tgtd holds it open for every LUN, and it
        lives in the backend's private directory."""
        lun = _lun(location)
        with self._lock:
            tid = self._targets().get(lun.iqn)
            if tid is None:
                return None
            nexuses = _logged_in(_section(self._tgtadm("--mode", "target", "--op", "show"), tid))
        if not nexuses:
            return None
        return f"initiator {', '.join(nexuses[:3])} logged in to {lun.iqn}"

    def qemu_format_target(self, location: AnyLocation) -> Arg:
        return _lun(location).url


def _section(shown: str, tid: int) -> str:
    """Target `tid`'s part of `tgtadm --op show` (up to the next target)."""
    starts = [(int(m.group(1)), m.start()) for m in _TARGET_LINE.finditer(shown)]
    for i, (found, start) in enumerate(starts):
        if found == tid:
            end = starts[i + 1][1] if i + 1 < len(starts) else len(shown)
            return shown[start:end]
    raise NotFoundError(f"tgtd shows no target {tid}")


def _logged_in(section: str) -> list[str]:
    """The initiators of a target's I_T nexuses (`INITIATOR-NAME at IP`), from its section
    of `tgtadm --op show`; one entry per nexus even where a line is missing."""
    found = []
    for nexus in _NEXUS_LINE.split(section)[1:]:
        name = re.search(r"^\s+Initiator: (\S+)", nexus, re.MULTILINE)
        address = re.search(r"^\s+IP Address: (\S+)", nexus, re.MULTILINE)
        found.append(f"{name.group(1) if name else '?'} at {address.group(1) if address else '?'}")
    return found


def _lun(location: AnyLocation) -> IscsiLocation:
    if not isinstance(location, IscsiLocation):
        raise UsageError(f"{location.describe()} is not an iSCSI volume")
    return location
