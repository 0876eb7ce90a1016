"""The test guest's block devices on this host: NBD out of the guest, a loop device here.

The device-mapper layer-store backend makes its devices where its dm
executor runs, and the store's process makes the file system on the top
device, mounts it and applies layers into it. On a device-mapper host both
are one host (`layerstore.devices.LocalDevices`). In the tests `dmsetup`
runs in the QEMU guest, so its device must reach this host, and
`GuestBlockExport` is the one piece that differs from production:

- in the guest, `qemu-nbd --fork` serves the device (O_DIRECT, read-only
  for a view) on a port that QEMU's user-mode network forwards from this
  host's 127.0.0.1 (an `ExportSlot`); the export has a random name, so a
  client can only ever reach the device it asked for. Without
  `--persistent`, it exits when its one client disconnects;
- here, qemu-storage-daemon opens the NBD export as a block node and
  exports it through FUSE onto a loop device (layerstore/fuse_loop.py, as
  the qcow2 backend does with its chains).

Closing flushes through the chain (loop, FUSE, NBD, O_DIRECT) and waits for
the guest's server to exit, so the device-mapper devices are free to go.
The export's directory is the attachment's lease, and the guest server's
pid and name are in the lease's state, so `recover` undoes both sides
after the owner died.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from trustplane.errors import ToolError, UnavailableError
from trustplane.layerstore.devices import DeviceAccess, OpenedDevice
from trustplane.layerstore.fuse_loop import DAEMON, FuseLoop, clean_directory, export_argument
from trustplane.layerstore.leases import Lease
from trustplane.tools import Executor
from trustplane.tools.command import Arg
from trustplane.tools.failure import last_line

GUEST_ADDRESS = "10.0.2.15"
"""QEMU's user-mode network gives the guest this address."""
_IN_USE = "Address already in use"
_STOP_WAIT = 15.0
# Waits for the guest's server to exit (its client has gone), then makes
# sure: only a process whose argv still names this export is killed.
_STOP_SCRIPT = f"""
pid=$1 name=$2 waited=0
while [ -d /proc/$pid ] && [ $waited -lt {int(_STOP_WAIT * 10)} ]; do
    sleep 0.1; waited=$((waited+1))
done
if [ -d /proc/$pid ] && tr '\\0' ' ' < /proc/$pid/cmdline | grep -q -- "-x $name "; then
    kill -KILL $pid
    while [ -d /proc/$pid ]; do sleep 0.05; done
    echo killed
fi
rm -f /run/tp-nbd-$name.pid
"""


@dataclass(frozen=True)
class ExportSlot:
    """A guest TCP port forwarded from 127.0.0.1:host_port on the host."""

    host_port: int
    guest_port: int


class GuestBlockExport(DeviceAccess):
    """Guest block devices as loop devices on this host (see the module docstring)."""

    def __init__(
        self,
        guest: Executor,
        slots: Sequence[ExportSlot],
        host: Executor | None = None,
    ) -> None:
        if not slots:
            raise UnavailableError("the test guest has no export slots (forwarded ports)")
        self.guest = guest
        self.slots = list(slots)
        self.host = host or Executor()

    def open(self, device: str, *, writable: bool, lease: Lease) -> OpenedDevice:
        name = lease.name[:16] + "x"
        lease.update(nbd={"name": name, "device": device})
        slot, pid = self._serve(device, name, writable)
        lease.update(nbd={"name": name, "device": device, "pid": pid, "port": slot.guest_port})
        read_only = "" if writable else ",read-only=on"
        argv: list[Arg] = [
            DAEMON,
            "--blockdev",
            f"driver=nbd,node-name=n0,server.type=inet,server.host=127.0.0.1,"
            f"server.port={slot.host_port},export={name}{read_only}",
            "--export",
            export_argument(lease.path, "n0", writable),
        ]
        try:
            fuse = FuseLoop(self.host, argv, lease.path, writable)
        except BaseException:
            self._stop(pid, name)
            raise
        return _Exported(self, fuse, pid, name)

    def recover(self, lease: Lease) -> list[str]:
        done = clean_directory(self.host, lease.path)
        nbd = lease.state.get("nbd")
        if isinstance(nbd, dict) and isinstance(nbd.get("name"), str):
            pid = nbd.get("pid")
            if isinstance(pid, int):
                if self._stop(pid, str(nbd["name"])):
                    done.append(f"killed the guest's qemu-nbd {pid}")
            else:
                # Died between starting the server and recording it: find it by name.
                done += self._stop_by_name(str(nbd["name"]))
        return done

    def _serve(self, device: str, name: str, writable: bool) -> tuple[ExportSlot, int]:
        pid_file = f"/run/tp-nbd-{name}.pid"
        for slot in self.slots:
            argv = [
                "qemu-nbd",
                "--fork",
                f"--pid-file={pid_file}",
                f"--bind={GUEST_ADDRESS}",
                f"--port={slot.guest_port}",
                "--format=raw",
                "-x",
                name,
                "--cache=none",
                *([] if writable else ["--read-only"]),
                device,
            ]
            # One round trip: start the server, then print its pid.
            serve = ["sh", "-c", 'qemu-nbd "$@" && cat ' + shlex.quote(pid_file), "sh", *argv[1:]]
            result = self.guest.run(serve, check=False, timeout=60)
            if result.returncode == 0:
                return slot, int(result.text.split()[0])
            if _IN_USE not in result.stderr.decode(errors="replace"):
                line = last_line(result.stderr)
                raise ToolError(f"qemu-nbd failed: {line}", tool="qemu-nbd", returncode=1)
        raise UnavailableError(f"all {len(self.slots)} export slots of the test guest are in use")

    def _stop(self, pid: int, name: str) -> bool:
        """Wait for the guest's server to go; True if it had to be killed."""
        argv = ["sh", "-c", _STOP_SCRIPT, "sh", str(pid), name]
        out = self.guest.run(argv, timeout=_STOP_WAIT + 30)
        return b"killed" in out.stdout

    def _stop_by_name(self, name: str) -> list[str]:
        found = self.guest.run(
            ["sh", "-c", f"cat /run/tp-nbd-{shlex.quote(name)}.pid 2>/dev/null"], check=False
        ).text.split()
        if found and found[0].isdigit() and self._stop(int(found[0]), name):
            return [f"killed the guest's qemu-nbd {found[0]}"]
        return []


class _Exported:
    def __init__(self, owner: GuestBlockExport, fuse: FuseLoop, pid: int, name: str) -> None:
        self.owner = owner
        self.path = fuse.device
        self._fuse: FuseLoop | None = fuse
        self._pid = pid
        self._name = name

    def close(self) -> None:
        if self._fuse is None:
            return
        fuse, self._fuse = self._fuse, None
        try:
            fuse.close()
        finally:
            self.owner._stop(self._pid, self._name)
