"""Find a running Docker Engine, or start one, on a unix socket.

The tests and the demo need a real dockerd. When `/var/run/docker.sock`
already answers (a developer's daemon, CI's), it is reused and left alone;
otherwise `dockerd` is started with its state under one directory that we
own, and stopped again by whoever started it.

Why the state lives in /var/lib/trustplane-dockerd and not in a test's work
dir: imported and built test images survive between runs, so a second run
reuses them instead of importing again; pytest deletes old temporary
directories (which would throw away the image store, possibly under a daemon
still using it); and a daemon killed mid-run leaves its state in one known
place that the next start repairs, instead of orphaned overlay directories
in /tmp. Only one dockerd can use a data root at a time, which is why the
directory is a parameter (a test that starts a second daemon passes its own).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors

from trustplane.embedded.process import ManagedProcess, require_binary, unix_socket_accepts
from trustplane.errors import UnavailableError
from trustplane.tools.local import path_with_sbin

DEFAULT_SOCKET = Path("/var/run/docker.sock")
PLUGIN_SOCKETS = Path("/run/docker/plugins")
"""Where dockerd looks for the sockets of legacy plugins (not configurable)."""
DEFAULT_STATE_DIR = Path("/var/lib/trustplane-dockerd")
START_TIMEOUT = 60.0
# dockerd stops running containers (10 s each by default) and then containerd.
STOP_GRACE = 30.0


def docker_client(socket: Path, timeout: int = 120) -> docker.DockerClient:
    """A Docker SDK client for the daemon on `socket` (API version negotiated)."""
    return docker.DockerClient(base_url=f"unix://{socket}", timeout=timeout)


def ping(socket: Path, timeout: int = 5) -> bool:
    """True when a Docker Engine answers `/_ping` on `socket`."""
    if not socket.exists():
        return False
    try:
        client = docker_client(socket, timeout=timeout)
    except (docker.errors.DockerException, OSError):
        return False
    try:
        return bool(client.ping())
    except (docker.errors.DockerException, OSError):
        return False
    finally:
        client.close()


@dataclass
class DockerDaemon:
    """A Docker Engine reachable on `socket`; `process` is set when we started it."""

    socket: Path
    started_by_us: bool
    process: ManagedProcess | None = None
    state_dir: Path | None = None

    @property
    def base_url(self) -> str:
        """The URL the Docker SDK and CLI (`DOCKER_HOST`) take."""
        return f"unix://{self.socket}"

    def client(self, timeout: int = 120) -> docker.DockerClient:
        """A new Docker SDK client; close it when done."""
        return docker_client(self.socket, timeout=timeout)

    def ping(self) -> bool:
        """True while the daemon answers."""
        return ping(self.socket)

    def stop(self) -> None:
        """Stop the daemon if we started it; a daemon we found is left running."""
        if self.started_by_us and self.process is not None:
            self.process.stop()


def ensure_dockerd(
    work_dir: Path,
    *,
    socket: Path = DEFAULT_SOCKET,
    state_dir: Path = DEFAULT_STATE_DIR,
    extra_args: Sequence[str] = (),
    private_network: bool = False,
    plugin_dir: Path | None = None,
    timeout: float = START_TIMEOUT,
) -> DockerDaemon:
    """Reuse the daemon answering on `socket`, or start one; its log goes to work_dir.

    A started daemon keeps its images in STATE_DIR/data, its runtime state in
    STATE_DIR/exec and its pid in STATE_DIR/dockerd.pid. A socket file nobody
    listens on and a pidfile naming a dead process (an earlier daemon that was
    killed) are removed first.

    `private_network` starts dockerd in a new network namespace (`unshare
    --net`): a second daemon beside another one then has its own docker0 and
    iptables rules. Never run a second daemon in the host's namespace: with
    `--bridge=none` dockerd deletes the host's docker0 at start, and with the
    default bridge both daemons would manage the same one.

    `plugin_dir` gives the daemon a plugin directory of its own: dockerd
    only looks for plugin sockets in /run/docker/plugins, so it runs in a
    new mount namespace (`unshare --mount --propagation slave`) where
    `plugin_dir` is bound over that path. Mounts made afterwards in the
    host's namespace reach the daemon's only under a shared mount (a volume
    plugin's mount root: `make_shared`); its own mounts never reach the host.
    """
    if ping(socket):
        return DockerDaemon(socket=socket, started_by_us=False)
    if socket.exists() and unix_socket_accepts(socket):
        # Someone listens but does not answer yet: perhaps a daemon still starting.
        if _wait_for_ping(socket, timeout):
            return DockerDaemon(socket=socket, started_by_us=False)
        raise UnavailableError(
            f"something listens on {socket} but does not answer the Docker API within {timeout:g} s"
        )
    dockerd = require_binary("dockerd", "docker.io")
    data_root = state_dir / "data"
    exec_root = state_dir / "exec"
    pidfile = state_dir / "dockerd.pid"
    for directory in (work_dir, data_root, exec_root):
        directory.mkdir(parents=True, exist_ok=True)
    state_dir.chmod(0o700)
    _remove_stale_pidfile(pidfile)
    _remove_stale_containerd_pidfile(exec_root / "containerd" / "containerd.pid")
    _remove_stale_socket(socket)
    socket.parent.mkdir(parents=True, exist_ok=True)
    prefix = [require_binary("unshare", "util-linux"), "--net"] if private_network else []
    if plugin_dir is not None:
        plugin_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        PLUGIN_SOCKETS.mkdir(parents=True, exist_ok=True)
        if not prefix:
            prefix = [require_binary("unshare", "util-linux")]
        prefix += [
            "--mount", "--propagation", "slave",
            "sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"', "sh",
            str(plugin_dir), str(PLUGIN_SOCKETS),
        ]  # fmt: skip
    argv = [
        *prefix,
        dockerd,
        "--host",
        f"unix://{socket}",
        "--data-root",
        str(data_root),
        "--exec-root",
        str(exec_root),
        "--pidfile",
        str(pidfile),
        *extra_args,
    ]
    env = dict(os.environ)
    env["PATH"] = path_with_sbin(env.get("PATH"))
    process = ManagedProcess(
        "dockerd",
        argv,
        work_dir,
        ready=lambda: ping(socket, timeout=2),
        timeout=timeout,
        grace=STOP_GRACE,
        env=env,
    )
    process.start()
    return DockerDaemon(socket=socket, started_by_us=True, process=process, state_dir=state_dir)


def make_shared(directory: Path) -> None:
    """Make `directory` a shared mount (bound onto itself), so mounts under it
    propagate into a daemon started with `plugin_dir`; `unmake_shared` undoes it."""
    directory.mkdir(parents=True, exist_ok=True)
    mount = require_binary("mount", "mount")
    subprocess.run([mount, "--bind", str(directory), str(directory)], check=True)
    subprocess.run([mount, "--make-shared", str(directory)], check=True)


def unmake_shared(directory: Path) -> None:
    """Remove the bind mount `make_shared` put on `directory` (and anything left under it)."""
    subprocess.run([require_binary("umount", "mount"), "--recursive", "--lazy", str(directory)],
                   check=False, capture_output=True)  # fmt: skip


def _wait_for_ping(socket: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ping(socket, timeout=2):
            return True
        time.sleep(0.5)
    return False


def _remove_stale_socket(socket: Path) -> None:
    """Remove a socket file left by a killed daemon (connecting to it is refused)."""
    if socket.is_socket() and not unix_socket_accepts(socket):
        with contextlib.suppress(FileNotFoundError):
            socket.unlink()


def _remove_stale_pidfile(pidfile: Path) -> None:
    """Remove a pidfile whose process is gone; refuse if a dockerd still owns it.

    dockerd itself refuses to start while its pidfile names a live process, and
    after a kill the pid may belong to an unrelated program by now.
    """
    try:
        text = pidfile.read_text().strip()
    except FileNotFoundError:
        return
    pid = int(text) if text.isdigit() else 0
    if pid > 0 and _is_live(pid, "dockerd"):
        raise UnavailableError(
            f"dockerd (pid {pid}) from an earlier run still owns {pidfile.parent} but does not "
            "answer on the requested socket; stop it or use another state directory"
        )
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()


def _remove_stale_containerd_pidfile(pidfile: Path) -> None:
    """Remove the pidfile of dockerd's own containerd when that process is gone.

    dockerd reuses the containerd named there if kill(pid, 0) succeeds, which
    it does for a zombie too; it then waits for a socket that never answers.
    """
    try:
        text = pidfile.read_text().strip()
    except FileNotFoundError:
        return
    pid = int(text) if text.isdigit() else 0
    if pid > 0 and _is_live(pid, "containerd"):
        return  # an orphan from a killed dockerd: the new dockerd adopts it
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()


def _is_live(pid: int, program: str) -> bool:
    """True when `pid` runs `program` and is not a zombie (pids are reused after a kill)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat.rpartition(")")[2].split()[0:1]
    if state == ["Z"]:
        return False
    argv0 = cmdline.split(b"\0", 1)[0]
    return Path(os.fsdecode(argv0)).name == program
