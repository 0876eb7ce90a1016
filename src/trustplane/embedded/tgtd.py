"""An iSCSI target (tgt, the Linux SCSI target framework) on 127.0.0.1.

    tgtd -f -C N --iscsi portal=127.0.0.1:P
    tgtadm -C N --lld iscsi --mode target --op new --tid T --targetname IQN
    tgtadm -C N --lld iscsi --mode logicalunit --op new --tid T --lun 1 --backing-store FILE
    tgtadm -C N --lld iscsi --mode target --op bind --tid T --initiator-address ALL

`N` is the control port: tgtd's management socket is /var/run/tgtd/socket.N
(a path tgtd fixes), so each daemon gets an N of its own (picked at random
and retried when another tgtd holds it). LUNs are backed by files. QEMU
reaches them from user space (libiscsi, ``iscsi://127.0.0.1:P/IQN/LUN``), so
no kernel initiator is involved.

tgtd ignores SIGTERM; it stops when asked over its management socket
(``--op delete --mode system``), which it refuses while targets exist, so
`stop()` deletes the targets first.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from trustplane.embedded.process import (
    ManagedProcess,
    StopsOnExit,
    TcpReady,
    free_port,
    require_binary,
)
from trustplane.errors import UnavailableError, UsageError
from trustplane.tools import Executor

HOST = "127.0.0.1"
IPC_DIR = Path("/var/run/tgtd")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
IQN_PREFIX = "iqn.2024-01.dev.trustplane.test"
_ATTEMPTS = 5
_MAX_CONTROL_PORT = 32767
_POLL_INTERVAL = 0.05
_IQN = re.compile(r"iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:[A-Za-z0-9.:_-]+)?")


@dataclass(frozen=True)
class Lun:
    """One file-backed LUN of a target, and the URL QEMU opens it with."""

    iqn: str
    tid: int
    lun: int
    backing_file: Path
    portal: str

    @property
    def url(self) -> str:
        """``iscsi://HOST:PORT/IQN/LUN`` (qemu-img, qemu-io, libiscsi)."""
        return f"iscsi://{self.portal}/{self.iqn}/{self.lun}"


@dataclass
class RunningTgtd(StopsOnExit):
    """A started tgtd: its portal, control port and targets."""

    port: int
    control_port: int
    process: ManagedProcess
    work_dir: Path
    start_seconds: float
    _targets: dict[str, int] = field(default_factory=dict)
    _stopped: bool = False

    @property
    def portal(self) -> str:
        return f"{HOST}:{self.port}"

    def tgtadm(self, *args: str) -> str:
        """`tgtadm -C N --lld iscsi ARGS`; a failure is one UnavailableError."""
        binary = require_binary("tgtadm", "tgt")
        argv = [binary, "-C", str(self.control_port), "--lld", "iscsi", *args]
        return Executor().run(argv, timeout=30).text

    def add_target(self, name: str | None = None) -> str:
        """A new target open to every initiator (bind ALL); returns its IQN."""
        iqn = name or f"{IQN_PREFIX}:{secrets.token_hex(6)}"
        if not _IQN.fullmatch(iqn):
            raise UsageError(f"not an iSCSI qualified name: {iqn!r}")
        if iqn in self._targets:
            raise UsageError(f"target {iqn} exists already")
        tid = max(self._targets.values(), default=0) + 1
        self.tgtadm("--mode", "target", "--op", "new", "--tid", str(tid), "--targetname", iqn)
        self._targets[iqn] = tid
        self.tgtadm(
            "--mode", "target", "--op", "bind", "--tid", str(tid), "--initiator-address", "ALL"
        )
        return iqn

    def add_lun(
        self, iqn: str, backing_file: Path, *, size: int | None = None, lun: int = 1
    ) -> Lun:
        """Add LUN `lun` backed by `backing_file` (created sparse with `size` bytes if given)."""
        tid = self._tid(iqn)
        if lun < 1:
            raise UsageError("LUN 0 is the target's controller; use 1 or more")
        if size is not None:
            with backing_file.open("xb") as fh:
                fh.truncate(size)
        if not backing_file.is_file():
            raise UsageError(f"LUN backing file {backing_file} does not exist")
        self.tgtadm(
            "--mode", "logicalunit", "--op", "new", "--tid", str(tid), "--lun", str(lun),
            "--backing-store", str(backing_file.absolute()),
        )  # fmt: skip
        return Lun(iqn, tid, lun, backing_file.absolute(), self.portal)

    def remove_lun(self, iqn: str, lun: int = 1) -> None:
        self.tgtadm(
            "--mode", "logicalunit", "--op", "delete", "--tid", str(self._tid(iqn)),
            "--lun", str(lun),
        )  # fmt: skip

    def remove_target(self, iqn: str) -> None:
        """Delete a target with its LUNs, even with initiators logged in (--force)."""
        tid = self._tid(iqn)
        self.tgtadm("--mode", "target", "--op", "delete", "--force", "--tid", str(tid))
        del self._targets[iqn]

    def targets(self) -> list[str]:
        return sorted(self._targets)

    def show(self) -> str:
        """tgtadm's description of every target, LUN and ACL."""
        return self.tgtadm("--mode", "target", "--op", "show")

    def _tid(self, iqn: str) -> int:
        try:
            return self._targets[iqn]
        except KeyError:
            raise UsageError(f"no target {iqn} on this tgtd") from None

    def stop(self) -> None:
        """Delete every target, ask tgtd to exit, wait; kill it if it does not. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.process.running():
            for iqn in list(self._targets):
                with contextlib.suppress(UnavailableError):
                    self.remove_target(iqn)
            with contextlib.suppress(UnavailableError):
                self.tgtadm("--op", "delete", "--mode", "system")
            deadline = time.monotonic() + STOP_TIMEOUT
            while self.process.running() and time.monotonic() < deadline:
                time.sleep(_POLL_INTERVAL)
        self.process.stop()
        for leftover in (f"socket.{self.control_port}", f"socket.{self.control_port}.lock"):
            with contextlib.suppress(OSError):
                (IPC_DIR / leftover).unlink()


def start_tgtd(work_dir: Path, *, timeout: float = START_TIMEOUT) -> RunningTgtd:
    """Start tgtd with a portal on 127.0.0.1 and a free port; return once it listens."""
    binary = require_binary("tgtd", "tgt")
    require_binary("tgtadm", "tgt")
    work_dir = work_dir.absolute()
    work_dir.mkdir(parents=True, exist_ok=True)
    last_error: UnavailableError | None = None
    for _ in range(_ATTEMPTS):
        port = free_port(HOST)
        # tgtd takes control ports up to 32767. Ports in use have a socket
        # file; for the rest, tgtd's lock on it decides (it exits if taken).
        control = secrets.randbelow(_MAX_CONTROL_PORT - 1000) + 1000
        if (IPC_DIR / f"socket.{control}").exists():
            continue
        started = time.monotonic()
        process = ManagedProcess(
            "tgtd",
            [binary, "-f", "-C", str(control), "--iscsi", f"portal={HOST}:{port}"],
            work_dir,
            ready=TcpReady(port, HOST),
            timeout=timeout,
            grace=2.0,
        )
        try:
            process.start()
        except UnavailableError as exc:
            # Another program took the port, or another tgtd the control port.
            last_error = exc
            continue
        return RunningTgtd(port, control, process, work_dir, time.monotonic() - started)
    raise last_error or UnavailableError("tgtd: no free control port found")
