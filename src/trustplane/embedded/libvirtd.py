"""A private libvirtd (QEMU driver) started by hand, without systemd.

libvirtd insists on its system paths (/etc/libvirt, /run/libvirt,
/var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt). So that several
daemons (test runs of several developers, a restart test beside the session's
daemon) never share state, each one runs in its own mount namespace
(``unshare -m --propagation private``) where private directories of its work
dir are bind-mounted over those paths; nothing of the host's libvirt
configuration is read or changed. Its sockets live in the work dir (outside
the bind mounts, so clients in the host's namespace reach them) and clients
connect with ``qemu:///system?socket=PATH``.

Configuration (DESIGN.md, "libvirt"): no authentication on the 0700 unix
socket, logs to a file; QEMU runs as root without cgroups, namespaces,
security driver or ownership bookkeeping, its stdio to files (no virtlogd).
libvirtd looks up the ``libvirt-qemu`` user even so: `scripts/run setup`
creates it.

The QEMU capability probe costs ~8 s on the first start and 0.2 s when the
cache is reused, so /var/cache/libvirt comes from a directory kept between
runs (`DEFAULT_CACHE_DIR`; libvirt revalidates it against the QEMU and
libvirt binaries itself).

QEMU processes outlive libvirtd (that is how libvirt works: a restarted
daemon reconnects to them), so `stop()` destroys every running domain first
and kills whatever QEMU a crashed daemon left behind (its pid files).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from trustplane.embedded.process import (
    ManagedProcess,
    StopsOnExit,
    require_binary,
    unix_socket_accepts,
)
from trustplane.errors import UnavailableError, UsageError
from trustplane.tools import Executor, ToolResult

QEMU_USER: Final = "libvirt-qemu"
DEFAULT_CACHE_DIR: Final = Path("/var/cache/trustplane-libvirt")
START_TIMEOUT: Final = 90.0
STOP_GRACE: Final = 15.0
# The system paths that get a private directory each (name inside the work dir).
BIND_MOUNTS: Final = {
    "etc": Path("/etc/libvirt"),
    "run": Path("/run/libvirt"),
    "lib": Path("/var/lib/libvirt"),
    "log": Path("/var/log/libvirt"),
}
CACHE_MOUNT: Final = Path("/var/cache/libvirt")
_MAX_SOCKET_PATH: Final = 107

QEMU_CONF: Final = """\
# Written by trustplane.embedded.libvirtd: a test daemon without systemd,
# cgroups, namespaces or a security driver; QEMU's output goes to files.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""


@dataclass
class RunningLibvirtd(StopsOnExit):
    """A started libvirtd: its client URI, directories and process.

    `restart()` stops the daemon (its QEMU processes keep running, as with a
    real libvirtd restart) and starts it again on the same socket and state.
    """

    work_dir: Path
    socket: Path
    cache_dir: Path
    process: ManagedProcess
    start_seconds: float
    timeout: float = START_TIMEOUT
    _stopped: bool = field(default=False, repr=False)

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket}"

    @property
    def log_file(self) -> Path:
        return self.work_dir / "log" / "libvirtd.log"

    @property
    def qemu_log_dir(self) -> Path:
        """Where libvirt writes each domain's QEMU log (NAME.log)."""
        return self.work_dir / "log" / "qemu"

    def virsh(self, *args: str, timeout: float = 60.0, check: bool = False) -> ToolResult:
        """`virsh -c URI ARGS` through the executor (unchecked by default: callers
        look at the status)."""
        argv = [require_binary("virsh", "libvirt-clients"), "-c", self.uri, *args]
        return Executor().run(argv, timeout=timeout, check=check)

    def restart(self) -> None:
        """Stop libvirtd only (domains keep running) and start it again."""
        self.process.stop()
        self.process, self.start_seconds = _launch(self.work_dir, self.cache_dir, self.timeout)

    def stop(self) -> None:
        """Destroy every running domain, stop libvirtd, kill leftover QEMUs. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.process.running():
            # A daemon that no longer answers still gets stopped, and its QEMUs killed.
            with contextlib.suppress(UnavailableError):
                for name in self.virsh("list", "--name", timeout=30).text.split():
                    self.virsh("destroy", name, timeout=30)
        self.process.stop()
        _kill_leftover_qemus(self.work_dir / "run" / "qemu")


def start_libvirtd(
    work_dir: Path,
    *,
    cache_dir: Path | None = None,
    timeout: float = START_TIMEOUT,
) -> RunningLibvirtd:
    """Start libvirtd with its state in `work_dir`; return once a client can connect.

    `cache_dir` (default `DEFAULT_CACHE_DIR`) is kept between runs so that
    later starts skip the QEMU capability probe. Raises UnavailableError
    when a binary or the libvirt-qemu user is missing or the daemon does not
    answer in time (quoting its log).
    """
    work_dir = work_dir.absolute()
    socket = work_dir / "sock" / "libvirt-sock"
    if len(os.fsencode(socket)) > _MAX_SOCKET_PATH:
        raise UsageError(f"work dir path too long for a unix socket inside it: {work_dir}")
    require_binary("libvirtd", "libvirt-daemon")
    require_binary("unshare", "util-linux")
    require_binary("virsh", "libvirt-clients")
    require_binary("qemu-system-x86_64", "qemu-system-x86")
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        raise UnavailableError(
            f"libvirtd needs the system user {QEMU_USER!r}; run scripts/run setup "
            f"(useradd --system {QEMU_USER})"
        ) from None
    cache_dir = (cache_dir or DEFAULT_CACHE_DIR).absolute()
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in (*BIND_MOUNTS, "sock"):
        (work_dir / name).mkdir(parents=True, exist_ok=True, mode=0o700)
    (work_dir / "log" / "qemu").mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_config(work_dir)
    process, seconds = _launch(work_dir, cache_dir, timeout)
    return RunningLibvirtd(
        work_dir=work_dir,
        socket=socket,
        cache_dir=cache_dir,
        process=process,
        start_seconds=seconds,
        timeout=timeout,
    )


def _write_config(work_dir: Path) -> None:
    etc = work_dir / "etc"
    log = BIND_MOUNTS["log"]
    (etc / "libvirtd.conf").write_text(
        "# Written by trustplane.embedded.libvirtd.\n"
        f'unix_sock_dir = "{work_dir / "sock"}"\n'
        'unix_sock_rw_perms = "0700"\n'
        'unix_sock_ro_perms = "0700"\n'
        'unix_sock_admin_perms = "0700"\n'
        'auth_unix_rw = "none"\n'
        'auth_unix_ro = "none"\n'
        # Seen from inside the namespace: /var/log/libvirt is work_dir/log.
        f'log_outputs = "3:file:{log}/libvirtd.log"\n'
    )
    (etc / "qemu.conf").write_text(QEMU_CONF)
    # The client library inside the daemon (for its own connections) reads this.
    (etc / "libvirt.conf").write_text("")


def _launch(work_dir: Path, cache_dir: Path, timeout: float) -> tuple[ManagedProcess, float]:
    """libvirtd in a private mount namespace with the bind mounts; waits until it answers."""
    for target in (*BIND_MOUNTS.values(), CACHE_MOUNT):
        # Debian's libvirt-daemon-system would create these; mount points must exist.
        target.mkdir(parents=True, exist_ok=True, mode=0o755)
    mounts = [
        f"mount --bind {shlex.quote(str(work_dir / name))} {shlex.quote(str(target))}"
        for name, target in BIND_MOUNTS.items()
    ]
    mounts.append(f"mount --bind {shlex.quote(str(cache_dir))} {shlex.quote(str(CACHE_MOUNT))}")
    libvirtd = require_binary("libvirtd", "libvirt-daemon")
    script = " && ".join(
        [
            *mounts,
            f"exec {shlex.quote(libvirtd)}"
            f" --config {shlex.quote(str(work_dir / 'etc' / 'libvirtd.conf'))}"
            f" --pid-file {shlex.quote(str(work_dir / 'libvirtd.pid'))}",
        ]
    )
    socket = work_dir / "sock" / "libvirt-sock"
    with contextlib.suppress(FileNotFoundError):
        socket.unlink()  # a stale socket would look ready
    started = time.monotonic()
    # libvirt keys its capability cache on, among others, the host CPUID it
    # reads; on this machine kind that differs between cores, so a daemon
    # that lands on another core than the last one re-probes QEMU (8 s
    # instead of 0.2 s). Pinned to one CPU it reads the same CPUID every
    # time. The domains' QEMU processes do not inherit the pinning: libvirt
    # sets their affinity to all online CPUs.
    cpu = min(os.sched_getaffinity(0))
    argv = [
        require_binary("taskset", "util-linux"), "--cpu-list", str(cpu),
        require_binary("unshare", "util-linux"), "-m", "--propagation", "private",
        "sh", "-c", script,
    ]  # fmt: skip
    process = ManagedProcess(
        "libvirtd",
        argv,
        work_dir,
        ready=lambda: unix_socket_accepts(socket),
        timeout=timeout,
        grace=STOP_GRACE,
        env={**_clean_env(), "LIBVIRT_DEFAULT_URI": f"qemu:///system?socket={socket}"},
    ).start()
    # The socket accepts before the drivers are initialised; the first call
    # answers only once they are (the QEMU capability probe on a cold cache).
    uri = f"qemu:///system?socket={socket}"
    remaining = max(timeout - (time.monotonic() - started), 1.0)
    virsh = require_binary("virsh", "libvirt-clients")
    try:
        Executor().run([virsh, "-c", uri, "version"], timeout=remaining)
    except UnavailableError as exc:  # ToolError, ToolTimeout
        process.stop()
        raise UnavailableError(
            f"libvirtd does not answer on {socket}: {exc}; its log: {work_dir / 'log'}"
        ) from exc
    return process, time.monotonic() - started


def _clean_env() -> dict[str, str]:
    """Our environment without variables that would point libvirt elsewhere."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("LIBVIRT_", "VIR_", "XDG_"))
    }


def _kill_leftover_qemus(pid_dir: Path) -> None:
    """Kill QEMU processes whose pid files libvirt left in `pid_dir` (a crashed daemon)."""
    if not pid_dir.is_dir():
        return
    for pid_file in pid_dir.glob("*.pid"):
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"qemu" not in cmdline.split(b"\0", 1)[0]:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
