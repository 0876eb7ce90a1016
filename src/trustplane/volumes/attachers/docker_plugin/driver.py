"""The volume driver: what each call of Docker's volume plugin protocol does.

- Create: the block-storage service creates the volume (`--opt type=TYPE
  --opt size=SIZE`); the key is released to this node once to make the
  file system, then forgotten. A failure deletes the volume again.
- Mount: refcounted per volume by Docker's mount ID. The first caller gets
  the key released (`VolumeService.attach`: policy `volume.attach`,
  attestation-gated where the policy says so, logged by the control
  plane), the header checked, the volume opened in user space and its file
  system mounted under ROOT/mounts/NAME; the plugin keeps no reference to
  the key afterwards. A refusal or any failure leaves no mount, loop device
  or daemon behind.
- Unmount: the last caller's unmount closes everything (file system, loop
  device, daemon, FUSE export); only then is the volume forgotten. A file
  system that will not unmount keeps the volume open and says why.
- Remove: refused while the volume is open here; otherwise the service
  destroys key and storage.

While the control plane cannot be reached (no answer at all), open volumes
stay open and Mount of a volume not open here fails closed, unless the
optional key lease (`lease`) still holds the key the control plane released
for that volume on this node; any answer from the control plane (a refusal
too) ends that volume's lease. Get still answers for the names the control
plane showed this node (`state.known`): dockerd drops a volume whose Get
fails and would give the next container a plain `local` one of that name.
Detaches and lease uses the control plane could not be told of are kept and
sent by `tend()` once it answers.

The plugin's own restart does not close anything: open volumes belong to
running containers. The state file (`state`) lists them; `recover()` at
start adopts each one whose daemon, export, loop device and mount are all
still there, closes what is left of one that is not (a daemon that died
leaves a stale FUSE mount: unmounted) and opens it again for the
containers Docker still counts (the key released once more), then clears
anything else under ROOT a killed plugin may have left: mounts, loop
devices, daemons.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from trustplane.api.volume_location import check_name
from trustplane.api.volume_spec import parse_size
from trustplane.errors import (
    NotFoundError,
    TrustplaneError,
    UnavailableError,
    UnreachableError,
    UsageError,
)
from trustplane.tools import AdoptedProcess, Executor, mount_points, unmount
from trustplane.volumes.attachers.docker_plugin.filesystem import make_filesystem
from trustplane.volumes.attachers.docker_plugin.lease import KeyLease
from trustplane.volumes.attachers.docker_plugin.opener import open_mounted, open_plaintext
from trustplane.volumes.attachers.docker_plugin.protocol import VolumeView
from trustplane.volumes.attachers.docker_plugin.service import (
    AttachMaterial,
    VolumeInfo,
    VolumeService,
)
from trustplane.volumes.attachers.docker_plugin.state import (
    OpenRecord,
    PluginState,
    StateFile,
    state_directory,
)
from trustplane.volumes.attachers.userspace import DAEMON, UserspaceVolume

log = logging.getLogger("trustplane.volumes.plugin")

MAX_REPORT = 100
"""Lease uses sent in one report (the control plane's batch limit)."""
OPTIONS = ("type", "size")
"""What `docker volume create -d trustplane --opt K=V` takes."""


@dataclass
class Recovery:
    """What `recover()` found: volumes adopted, opened again, given up; leftovers cleared."""

    adopted: list[str] = field(default_factory=list)
    reopened: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    cleared: list[str] = field(default_factory=list)


def volume_name(name: str) -> str:
    """A volume name usable as a path component, in QEMU options and by the service."""
    try:
        return check_name(name, "volume name")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


class VolumeDriver:
    """Docker's volume calls on top of the block-storage service and user-space opens."""

    def __init__(
        self,
        service: VolumeService,
        root: Path,
        executor: Executor | None = None,
        *,
        default_type: str | None = None,
        default_size: int | None = None,
        key_lease: KeyLease | None = None,
    ) -> None:
        self.service = service
        self.root = state_directory(root.absolute())
        self.mounts_dir = state_directory(self.root / "mounts")
        self.run_dir = state_directory(self.root / "run")
        self.executor = executor or Executor()
        self.default_type = default_type
        self.default_size = default_size
        self._state_file = StateFile(self.root)
        self._state = PluginState()
        self._open: dict[str, UserspaceVolume] = {}
        self._lock = threading.Lock()
        self._volume_locks: dict[str, threading.Lock] = {}
        self._owner: IO[bytes] | None = None
        self.key_lease = key_lease
        self._undetached: set[str] = set()
        """Volumes closed here whose detach the control plane did not hear yet."""

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> Recovery:
        """Take the root (one plugin per root), then recover what an earlier run left."""
        handle = (self.root / "lock").open("ab")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UsageError(
                f"another volume plugin is running with {self.root}; one plugin per directory"
            ) from None
        self._owner = handle
        return self.recover()

    def stop(self) -> None:
        """Release the root and forget every leased key (the attachments kept with them
        are cleared where the control plane answers). Open volumes stay open: containers
        use them (see `recover`)."""
        self.tend()  # what the control plane has not heard yet, if it answers now
        if self.key_lease is not None:
            self.key_lease.clear()
            for name in sorted(self._undetached - set(self._state.volumes)):
                with contextlib.suppress(TrustplaneError):
                    self.service.detached(name)
                    self._undetached.discard(name)
        if self._owner is not None:
            self._owner.close()
            self._owner = None

    def close_all(self) -> None:
        """Close every open volume now, whoever uses it (tests, an administrator's shutdown)."""
        for name in list(self._state.volumes):
            with self._volume_lock(name):
                record = self._state.volumes.get(name)
                if record is not None:
                    record.callers.clear()
                    self._close(name, record)

    # -- the protocol -------------------------------------------------------------------

    def create(self, name: str, opts: dict[str, str] | None) -> None:
        name = volume_name(name)
        volume_type, size = self._create_options(opts or {})
        with self._volume_lock(name):
            self.service.create(name, volume_type, size)
            try:
                self._make_filesystem(name)
            except BaseException:
                with contextlib.suppress(TrustplaneError):
                    self.service.delete(name)
                raise
        self._know([name])
        log.info("volume %s created (type %s, %d bytes) with an ext4 file system", name,
                 volume_type, size)  # fmt: skip

    def remove(self, name: str) -> None:
        name = volume_name(name)
        with self._volume_lock(name):
            record = self._state.volumes.get(name)
            if record is not None:
                raise UsageError(
                    f"volume {name} is mounted on this node for {len(record.callers)} "
                    "container(s); it cannot be removed"
                )
            if self.key_lease is not None:
                self.key_lease.forget(name, "volume removed")
            if name in self._undetached:
                self._detached(name)  # the lease kept it attached; no delete while attached
            self.service.delete(name)
            self._forget_names([name])
        log.info("volume %s removed", name)

    def mount(self, name: str, caller: str) -> str:
        """Open the volume for `caller` (Docker's mount ID); its mount point."""
        name = volume_name(name)
        caller = caller or "-"
        with self._volume_lock(name):
            record = self._state.volumes.get(name)
            if record is not None:
                if caller not in record.callers:
                    record.callers.append(caller)
                    self._save()
                return record.mountpoint
            mountpoint = self.mounts_dir / name
            mountpoint.mkdir(mode=0o700, exist_ok=True)
            try:
                volume = self._open_mounted(name, mountpoint)
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    mountpoint.rmdir()
                if isinstance(exc, TrustplaneError):
                    log.warning("volume %s: not opened: %s", name, exc)
                raise
            try:
                record = OpenRecord(
                    name=name,
                    mountpoint=os.fspath(mountpoint),
                    callers=[caller],
                    opened=volume.keep_past_exit(),
                )
                self._open[name] = volume
                self._state.volumes[name] = record
                self._save()
            except BaseException:
                self._open.pop(name, None)
                self._state.volumes.pop(name, None)
                with contextlib.suppress(TrustplaneError):
                    volume.close(force=True)
                raise
        log.info("volume %s opened at %s", name, mountpoint)
        return record.mountpoint

    def unmount(self, name: str, caller: str) -> None:
        """`caller` no longer uses the volume; the last one closes it."""
        name = volume_name(name)
        caller = caller or "-"
        with self._volume_lock(name):
            record = self._state.volumes.get(name)
            if record is None:
                return  # nothing open: Docker repeats an unmount after a failed mount
            if caller in record.callers:
                record.callers.remove(caller)
            elif record.callers:
                log.warning("volume %s: unmount by unknown caller %s ignored", name, caller)
                return
            if record.callers:
                self._save()
                return
            try:
                self._close(name, record)
            except BaseException:
                record.callers.append(caller)
                self._save()
                raise

    def path(self, name: str) -> str:
        name = volume_name(name)
        record = self._state.volumes.get(name)
        return "" if record is None else record.mountpoint

    def get(self, name: str) -> VolumeView:
        name = volume_name(name)
        record = self._state.volumes.get(name)
        try:
            info = self.service.get(name)
        except UnavailableError as exc:
            if record is not None:
                return VolumeView(name=name, mountpoint=record.mountpoint,
                                  status={"mounts": len(record.callers)})  # fmt: skip
            if isinstance(exc, UnreachableError) and name in self._state.known:
                # Known, not open: Mount decides (and fails closed without a lease).
                return VolumeView(name=name, mountpoint="",
                                  status={"control plane": "unreachable"})  # fmt: skip
            raise
        except TrustplaneError as exc:
            self._forget_lease(name, "the control plane refused")
            if isinstance(exc, NotFoundError):
                self._forget_names([name])
            raise
        self._know([name])
        return self._view(info, record)

    def list_volumes(self) -> list[VolumeView]:
        opened = self._state.volumes
        listed = self.service.list()
        self._know([info.name for info in listed], every=True)
        return [self._view(info, opened.get(info.name)) for info in listed]

    # -- recovery -------------------------------------------------------------------

    def recover(self) -> Recovery:
        """Adopt, reopen or clear what the state file and ROOT say an earlier run left."""
        report = Recovery()
        state = self._state_file.load()
        kept: dict[str, OpenRecord] = {}
        for name, record in state.volumes.items():
            volume = UserspaceVolume.adopt(self.executor, record.opened)
            if volume.intact():
                self._open[name] = volume
                kept[name] = record
                report.adopted.append(name)
                continue
            log.warning("volume %s: its open did not survive (daemon or mount gone); clearing it",
                        name)  # fmt: skip
            with contextlib.suppress(TrustplaneError):
                volume.close(force=True)
            if not record.callers:
                continue
            try:
                again = self._open_mounted(name, Path(record.mountpoint))
            except TrustplaneError as exc:
                log.error("volume %s: cannot open it again for its containers: %s", name, exc)
                report.lost.append(name)
                continue
            self._open[name] = again
            kept[name] = OpenRecord(
                name=name,
                mountpoint=record.mountpoint,
                callers=record.callers,
                opened=again.keep_past_exit(),
            )
            report.reopened.append(name)
        self._state = PluginState(volumes=kept, known=state.known)
        self._save()
        report.cleared = self._clear_leftovers(kept)
        return report

    def _clear_leftovers(self, kept: dict[str, OpenRecord]) -> list[str]:
        """Unmount, detach and stop whatever under ROOT no kept volume owns."""
        cleared: list[str] = []
        own_points = set()
        own_devices = set()
        own_pids = set()
        own_dirs = set()
        for record in kept.values():
            own_points |= {record.mountpoint, record.opened.export}
            own_devices.add(record.opened.device)
            own_pids.add(record.opened.pid)
            own_dirs.add(record.opened.directory)
        mounts_dir = os.fspath(self.mounts_dir.resolve())
        run_dir = os.fspath(self.run_dir.resolve())
        for point in sorted(mount_points(self.executor), key=len, reverse=True):
            if _under(point, mounts_dir) and point not in own_points:
                unmount(self.executor, point)
                cleared.append(point)
        for device, backing in _loop_devices(self.executor):
            if _under(backing, run_dir) and device not in own_devices:
                self.executor.run(["losetup", "--detach", device], check=False, timeout=60)
                cleared.append(device)
        marker = f"mountpoint={run_dir}/"
        for pid in _pids_with(self.executor, marker):
            if pid not in own_pids:
                AdoptedProcess(self.executor, pid, marker).stop()
                cleared.append(f"{DAEMON} pid {pid}")
        for point in sorted(mount_points(self.executor), key=len, reverse=True):
            if _under(point, run_dir) and point not in own_points:
                unmount(self.executor, point)
                cleared.append(point)
        for entry in self.run_dir.iterdir():
            if os.fspath(entry.resolve()) not in own_dirs:
                shutil.rmtree(entry, ignore_errors=True)
        for entry in self.mounts_dir.iterdir():
            if entry.name not in kept:
                with contextlib.suppress(OSError):
                    entry.rmdir()
        if cleared:
            log.warning("cleared what an earlier run left: %s", ", ".join(cleared))
        return cleared

    # -- helpers -------------------------------------------------------------------

    def _create_options(self, opts: dict[str, str]) -> tuple[str, int]:
        unknown = sorted(set(opts) - set(OPTIONS))
        if unknown:
            raise UsageError(
                f"unknown option {unknown[0]!r}; the trustplane driver takes "
                + ", ".join(f"--opt {o}=..." for o in OPTIONS)
            )
        volume_type = opts.get("type") or self.default_type
        if not volume_type:
            raise UsageError("a trustplane volume needs --opt type=TYPE (a volume type)")
        if "size" in opts:
            size = parse_size(opts["size"])
        elif self.default_size is not None:
            size = self.default_size
        else:
            raise UsageError("a trustplane volume needs --opt size=SIZE (for example 1G)")
        return volume_type, size

    def _make_filesystem(self, name: str) -> None:
        material = self.service.attach(name)
        try:
            volume = open_plaintext(self.executor, material, self.run_dir)
        finally:
            del material  # the key: only the daemon holds it now
        try:
            assert volume.device is not None
            make_filesystem(self.executor, volume.device, name)
        finally:
            try:
                volume.close()
            finally:
                with contextlib.suppress(TrustplaneError):
                    self.service.detached(name)

    def _open_mounted(self, name: str, mountpoint: Path) -> UserspaceVolume:
        material = self._release(name)
        try:
            return open_mounted(self.executor, material, mountpoint, self.run_dir)
        except BaseException:
            self._forget_lease(name, "the open failed")
            with contextlib.suppress(TrustplaneError):
                self.service.detached(name)
            raise
        finally:
            del material  # the key: only the daemon holds it now

    def _close(self, name: str, record: OpenRecord) -> None:
        volume = self._open.get(name) or UserspaceVolume.adopt(self.executor, record.opened)
        volume.close()
        self._open.pop(name, None)
        del self._state.volumes[name]
        self._save()
        with contextlib.suppress(OSError):
            Path(record.mountpoint).rmdir()
        if self._leased(name):
            # The attachment stays with the lease: no other node gets the key while this
            # one may still open the volume without asking (tend() detaches at its end).
            self._undetached.add(name)
            log.info("volume %s closed; the key lease keeps its key and attachment", name)
        else:
            self._detached(name)
            log.info("volume %s closed; its key is forgotten on this node", name)

    # -- the control plane's availability ---------------------------------------------

    def _release(self, name: str) -> AttachMaterial:
        """The key from the control plane; while it cannot be reached, the leased one
        (if any). A refusal ends the volume's lease."""
        try:
            material = self.service.attach(name)
        except UnreachableError as exc:
            leased = None if self.key_lease is None else self.key_lease.use(name)
            if leased is None:
                raise self._unreachable(name, exc) from None
            return leased
        except TrustplaneError:
            self._forget_lease(name, "the control plane refused")
            raise
        if self.key_lease is not None:
            self.key_lease.keep(material)
        return material

    def _unreachable(self, name: str, exc: UnavailableError) -> UnavailableError:
        """The one line dockerd shows when a volume cannot be opened without the control plane."""
        if not isinstance(exc, UnreachableError):
            return exc
        if self.key_lease is None:
            why = "no key lease is configured"
        else:
            why = "this node holds no live key lease for it"
        return UnreachableError(
            f"volume {name}: not opened: the control plane cannot be reached and {why} "
            f"(volumes open already stay open; {exc})"
        )

    def _know(self, names: list[str], every: bool = False) -> None:
        """Remember volume names the control plane showed (`every`: all there are)."""
        with self._lock:
            known = set(self._state.known)
            wanted = set(names) if every else known | set(names)
            if wanted == known:
                return
            self._state.known = sorted(wanted)
        self._save()

    def _forget_names(self, names: list[str]) -> None:
        with self._lock:
            self._state.known = sorted(set(self._state.known) - set(names))
        self._save()

    def _leased(self, name: str) -> bool:
        return self.key_lease is not None and self.key_lease.holds(name)

    def _forget_lease(self, name: str, why: str) -> None:
        if self.key_lease is not None:
            self.key_lease.forget(name, why)

    def _detached(self, name: str) -> None:
        try:
            self.service.detached(name)
        except UnreachableError:
            self._undetached.add(name)
            log.warning("volume %s: the control plane cannot be reached; it hears of the "
                        "detach once it answers", name)  # fmt: skip
        except TrustplaneError as exc:
            log.warning("volume %s: the control plane did not take the detach: %s", name, exc)
        else:
            self._undetached.discard(name)

    def tend(self) -> None:
        """Forget expired leased keys; tell the control plane what it missed while it
        could not be reached (lease uses, detaches), if it answers now."""
        if self.key_lease is not None:
            self.key_lease.sweep()
            uses = self.key_lease.uses()[:MAX_REPORT]
            if uses:
                try:
                    self.service.report_lease_uses(uses)
                except TrustplaneError as exc:
                    log.debug("lease uses not reported yet: %s", exc)
                    return
                self.key_lease.reported(uses)
                log.info("reported %d key lease use(s) to the control plane", len(uses))
        for name in sorted(self._undetached):
            with self._volume_lock(name):
                if name in self._state.volumes:  # open again: attached once more
                    self._undetached.discard(name)
                    continue
                if self._leased(name):  # the attachment lasts as long as the lease
                    continue
                try:
                    self.service.detached(name)
                except UnreachableError:
                    return
                except TrustplaneError as exc:
                    log.warning("volume %s: the control plane did not take the detach: %s",
                                name, exc)  # fmt: skip
                self._undetached.discard(name)

    def _view(self, info: VolumeInfo, record: OpenRecord | None) -> VolumeView:
        status: dict[str, str | int] = {"type": info.volume_type, "size": info.size}
        if record is not None:
            status["mounts"] = len(record.callers)
        return VolumeView(
            name=info.name, mountpoint="" if record is None else record.mountpoint, status=status
        )

    def _volume_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._volume_locks.setdefault(name, threading.Lock())

    def _save(self) -> None:
        with self._lock:
            self._state_file.save(self._state)


def _under(path: str, directory: str) -> bool:
    return path.startswith(directory.rstrip("/") + "/")


def _loop_devices(executor: Executor) -> list[tuple[str, str]]:
    """(device, backing file) of every attached loop device."""
    listed = executor.run(
        ["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"], check=False, timeout=60
    )
    if listed.returncode != 0 or not listed.text.strip():
        return []
    try:
        devices = json.loads(listed.text).get("loopdevices", [])
    except ValueError:
        return []
    found = []
    for entry in devices:
        backing = str(entry.get("back-file") or "").removesuffix(" (deleted)")
        found.append((str(entry.get("name", "")), backing))
    return found


def _pids_with(executor: Executor, marker: str) -> list[int]:
    """Processes whose command line holds `marker` (daemons a killed plugin left)."""
    listed = executor.run(["pgrep", "-f", "--", re.escape(marker)], check=False, timeout=30)
    return [int(pid) for pid in listed.text.split() if pid.isdigit() and int(pid) != os.getpid()]
