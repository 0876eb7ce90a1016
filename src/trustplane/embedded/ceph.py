"""A one-node Ceph cluster on 127.0.0.1, bootstrapped without systemd.

One monitor, one manager and one BlueStore OSD whose block device is a
sparse file, with cephx, all in one work directory (configuration, keyrings,
daemon data, admin sockets, logs) so that clusters of several test runs never
meet. The sequence is the manual-deployment one of Ceph's documentation, cut
to what one node needs:

1. keyrings made with ``ceph-authtool`` (mon., client.admin, mgr.x and the
   client user, all imported into the monitor's keyring so ``ceph-mon
   --mkfs`` registers them at once: no ``ceph auth`` round trip later);
2. ``monmaptool --create`` with the monitor's two addresses (msgr2 and the
   legacy protocol, each on a free port), ``ceph-mon --mkfs``, then
   ``ceph-mon -f`` in its own session; ``ceph-mgr -f`` beside it;
3. ``ceph osd new`` with a cephx secret of our own, ``ceph-osd --mkfs``
   (BlueStore creates its sparse block file), ``ceph-osd -f``;
4. a pool (size 1) and ``rbd pool init``; ready once every PG is
   active+clean.

Settings that matter on one node (DESIGN.md, "Ceph"): pool size 1 allowed,
CRUSH chooses among OSDs rather than hosts, every address is 127.0.0.1, the
free-space warnings are low (the test machine's disk is shared), the manager
reports every second. Stop the OSD before the monitor, or it waits for the
dead monitor. For a quick start (measured here: ~6 s to active+clean on a
loaded machine, 13 s without them): a 50 ms Paxos proposal interval, one OSD
op shard with a 20 ms AIO poll, and a manager that loads only the modules a
cluster needs (`MGR_MODULES`).

The ``ceph`` CLI runs on Debian's python3 with Debian's ``rados`` module; a
foreign ``PYTHONPATH`` (our tests export one) breaks it, so the daemons start
without any ``PYTHON*`` variable and tool calls (through the executor, which
adds to our environment) get them set empty, which Python reads as unset.

Clients get a user of their own (``client.<user>``, rbd profile on the
pool, not admin), a ceph.conf and a 0600 keyring in a private directory, and
what libvirt needs instead of a ceph.conf: the monitor's host and port and
the user's key.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Sequence
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
from trustplane.tools import Executor, SecretFile
from trustplane.tools.command import Arg

HOST = "127.0.0.1"
DEFAULT_POOL = "trustplane"
DEFAULT_USER = "trustplane"
MON_ID = "a"
MGR_ID = "x"
START_TIMEOUT = 120.0
# Sparse: only what is written takes disk space.
OSD_BLOCK_SIZE = 4 * 1024**3
OSD_MEMORY_TARGET = 1024**3
BLUESTORE_CACHE_SIZE = 128 * 1024**2
POOL_PG_NUM = 8
MGR_MODULE_SOURCE = Path("/usr/share/ceph/mgr")
# Pacific's always-on manager modules (the monitor expects them), then the
# one enabled at the first start.
MGR_MODULES = (
    "balancer", "crash", "devicehealth", "orchestrator", "pg_autoscaler",
    "progress", "rbd_support", "status", "telemetry", "volumes",
)  # fmt: skip
MGR_INITIAL_MODULES = ("iostat",)
STOP_GRACE = 15.0
_POLL_INTERVAL = 0.2
_TOOL_TIMEOUT = 60.0
_PORT_ATTEMPTS = 3
_PACKAGES = {
    "ceph-mon": "ceph-mon",
    "ceph-mgr": "ceph-mgr",
    "ceph-osd": "ceph-osd",
    "ceph": "ceph-common",
    "ceph-authtool": "ceph-common",
    "monmaptool": "ceph-common",
    "rbd": "ceph-common",
    "rados": "ceph-common",
}


def _daemon_env() -> dict[str, str]:
    """Our environment without any PYTHON* variable (ceph-mgr embeds Python)."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}


def _run(argv: Sequence[Arg], timeout: float = _TOOL_TIMEOUT) -> str:
    """One Ceph tool call through the executor; returns its stdout.

    The executor passes our environment plus overrides, so the PYTHON*
    variables are overridden with empty values (the same as unset for Python).
    """
    unset = {key: "" for key in os.environ if key.startswith("PYTHON")}
    return _EXECUTOR.run(argv, timeout=timeout, env=unset).text


_EXECUTOR = Executor()


@dataclass(frozen=True)
class CephClient:
    """What an RBD client needs: a cephx user (not admin), its conf and keyring.

    `key` is the user's cephx key as Ceph prints it (base64 text); libvirt's
    `ceph` secret takes its decoded bytes (`key_bytes`). Kept out of repr().
    """

    user: str
    conf_file: Path
    keyring_file: Path
    mon_host: str
    mon_port: int
    key: str = field(repr=False)

    @property
    def entity(self) -> str:
        return f"client.{self.user}"

    @property
    def key_bytes(self) -> bytes:
        """The raw key: the value of a libvirt `<usage type='ceph'>` secret."""
        return base64.b64decode(self.key)


@dataclass(frozen=True)
class RunningCeph(StopsOnExit):
    """A started one-node cluster: where it is, its pool, its client user, its daemons."""

    fsid: str
    work_dir: Path
    conf_file: Path
    """The admin's ceph.conf (client.admin's keyring named in it)."""
    pool: str
    client: CephClient
    mon_host: str
    """The monitor addresses as ceph.conf's `mon_host` spells them."""
    mon_port: int
    """The monitor's legacy-protocol (v1) port: what `host:port` clients (libvirt, QEMU) use."""
    mon: ManagedProcess
    mgr: ManagedProcess
    osd: ManagedProcess
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "log"

    def run(self, tool: str, *args: Arg, timeout: float = _TOOL_TIMEOUT) -> str:
        """Run a Ceph tool (`ceph`, `rbd`, `rados`) as client.admin; returns stdout.

        Secrets (a passphrase file for `rbd encryption format`) go in as
        `SecretFile` placeholders. A failure is one ToolError.
        """
        binary = require_binary(tool, _PACKAGES.get(tool, "ceph-common"))
        return _run([binary, "--conf", str(self.conf_file), *args], timeout)

    def run_as_client(self, tool: str, *args: Arg, timeout: float = _TOOL_TIMEOUT) -> str:
        """Run a Ceph tool as the client user (its own conf and keyring)."""
        binary = require_binary(tool, _PACKAGES.get(tool, "ceph-common"))
        conf = str(self.client.conf_file)
        return _run([binary, "--conf", conf, "--id", self.client.user, *args], timeout)

    def image_objects(self, image: str) -> dict[str, bytes]:
        """Every RADOS object of an RBD image's data, fetched with `rados get` as the
        client: what someone with the storage (not the volume key) reads."""
        info = json.loads(
            self.run_as_client("rbd", "info", f"{self.pool}/{image}", "--format", "json")
        )
        prefix = info["block_name_prefix"] + "."
        names = sorted(
            name
            for name in self.run_as_client("rados", "-p", self.pool, "ls").split()
            if name.startswith(prefix)
        )
        out = {}
        scratch = self.work_dir / "tmp"
        scratch.mkdir(exist_ok=True)
        for name in names:
            target = scratch / f"{name}.obj"
            self.run_as_client("rados", "-p", self.pool, "get", name, str(target))
            out[name] = target.read_bytes()
            target.unlink()
        return out

    def ceph_json(self, *args: str) -> object:
        """`ceph ARGS --format json`, parsed."""
        return json.loads(self.run("ceph", *args, "--format", "json"))

    def qemu_rbd_uri(self, image: str, pool: str | None = None) -> str:
        """`rbd:POOL/IMAGE:id=USER:conf=CONF`, the legacy filename qemu-img takes."""
        return f"rbd:{pool or self.pool}/{image}:id={self.client.user}:conf={self.client.conf_file}"

    def stop(self) -> None:
        """OSD first (it would wait for a dead monitor), then manager and monitor."""
        for process in (self.osd, self.mgr, self.mon):
            process.stop()


def start_ceph(
    work_dir: Path,
    *,
    pool: str = DEFAULT_POOL,
    user: str = DEFAULT_USER,
    timeout: float = START_TIMEOUT,
) -> RunningCeph:
    """Bootstrap and start a one-node cluster in `work_dir`; return when PGs are active+clean.

    Raises UnavailableError (quoting the daemon's log) when a binary is
    missing or a daemon does not come up, UsageError for a bad pool or user name.
    """
    for name, what in ((pool, "pool"), (user, "user")):
        if not name or not all(c.isalnum() or c in "-_" for c in name) or name == "admin":
            raise UsageError(f"Ceph {what} name {name!r} must be letters, digits, '-' or '_'")
    binaries = {tool: require_binary(tool, package) for tool, package in _PACKAGES.items()}
    work_dir = work_dir.absolute()
    work_dir.mkdir(parents=True, exist_ok=True)
    last_error: UnavailableError | None = None
    for _ in range(_PORT_ATTEMPTS):
        try:
            return _Bootstrap(work_dir, binaries, pool, user, timeout).run()
        except _PortTaken as exc:
            last_error = exc
    assert last_error is not None
    raise last_error


class _PortTaken(UnavailableError):
    """The monitor could not bind a port free_port() picked (someone took it)."""


class _Bootstrap:
    def __init__(
        self, work_dir: Path, binaries: dict[str, str], pool: str, user: str, timeout: float
    ) -> None:
        self.binaries = binaries
        self.pool = pool
        self.user = user
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.fsid = str(uuid.uuid4())
        self.v2_port = free_port(HOST)
        self.v1_port = free_port(HOST)
        while self.v1_port == self.v2_port:
            self.v1_port = free_port(HOST)
        self.mon_host = f"[v2:{HOST}:{self.v2_port},v1:{HOST}:{self.v1_port}]"
        # A fresh directory per attempt: a failed mkfs leaves nothing to trip over.
        self.dir = work_dir / f"cluster-{self.fsid[:8]}"
        self.conf = self.dir / "ceph.conf"
        self.keys = self.dir / "keys"
        self.client_dir = self.dir / "client"
        self.env = _daemon_env()
        self.timings: dict[str, float] = {}
        self.started = time.monotonic()

    # -- the steps --------------------------------------------------------------

    def run(self) -> RunningCeph:
        for sub in ("run", "log", "crash", "mon", "mgr", "osd", "tmp"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        for private in (self.keys, self.client_dir):
            private.mkdir(mode=0o700, parents=True, exist_ok=True)
            private.chmod(0o700)
        self._write_conf()
        client_key = self._make_keyrings()
        mon = self._start_mon()
        processes: list[ManagedProcess] = [mon]
        try:
            mgr = self._start_mgr()
            processes.append(mgr)
            osd_id, osd_uuid = self._register_osd()
            # The pool is a monitor matter: made while the OSD is still being
            # built, its PGs are created as soon as the OSD boots.
            self._ceph("osd", "pool", "create", self.pool, str(POOL_PG_NUM), str(POOL_PG_NUM))
            self._mark("pool create")
            osd = self._start_osd(osd_id, osd_uuid)
            processes.append(osd)
            self._init_pool()
            self._wait_clean()
        except BaseException:
            for process in reversed(processes):
                process.stop()
            raise
        self.timings["total"] = time.monotonic() - self.started
        client = CephClient(
            user=self.user,
            conf_file=self.client_dir / "ceph.conf",
            keyring_file=self.client_dir / "keyring",
            mon_host=HOST,
            mon_port=self.v1_port,
            key=client_key,
        )
        return RunningCeph(
            fsid=self.fsid,
            work_dir=self.dir,
            conf_file=self.conf,
            pool=self.pool,
            client=client,
            mon_host=self.mon_host,
            mon_port=self.v1_port,
            mon=mon,
            mgr=mgr,
            osd=osd,
            timings=self.timings,
        )

    def _write_conf(self) -> None:
        d = self.dir
        self.conf.write_text(
            "[global]\n"
            f"fsid = {self.fsid}\n"
            f"mon_host = {self.mon_host}\n"
            f"public_addr = {HOST}\n"
            f"cluster_addr = {HOST}\n"
            "ms_bind_ipv6 = false\n"
            "auth_cluster_required = cephx\n"
            "auth_service_required = cephx\n"
            "auth_client_required = cephx\n"
            "auth_allow_insecure_global_id_reclaim = false\n"
            f"run_dir = {d / 'run'}\n"
            f"log_file = {d / 'log'}/$cluster-$name.log\n"
            f"mon_cluster_log_file = {d / 'log'}/$cluster.log\n"
            f"crash_dir = {d / 'crash'}\n"
            f"tmp_dir = {d / 'tmp'}\n"
            "osd_pool_default_size = 1\n"
            "osd_pool_default_min_size = 1\n"
            "osd_pool_default_pg_autoscale_mode = off\n"
            "osd_crush_chooseleaf_type = 0\n"
            "mon_allow_pool_size_one = true\n"
            "mon_allow_pool_delete = true\n"
            "mon_warn_on_pool_no_redundancy = false\n"
            "mon_data_avail_warn = 2\n"
            "mon_data_avail_crit = 1\n"
            "mgr_stats_period = 1\n"
            # The monitor enables these at the first start (read by the monitor).
            f"mgr_initial_modules = {' '.join(MGR_INITIAL_MODULES)}\n"
            # One monitor commits alone: no reason to batch proposals for 1 s.
            "paxos_propose_interval = 0.05\n"
            "paxos_min_wait = 0.01\n"
            "\n[client]\n"
            # Several admin commands may run at once: no admin socket for clients.
            "admin_socket = \n"
            "\n[client.admin]\n"
            f"keyring = {self.keys / 'admin.keyring'}\n"
            "\n[mon]\n"
            f"mon_data = {d / 'mon'}/$cluster-$id\n"
            "keyring = $mon_data/keyring\n"
            f"admin_socket = {d / 'run'}/$cluster-$name.asok\n"
            "\n[mgr]\n"
            f"mgr_data = {d / 'mgr'}/$cluster-$id\n"
            f"mgr_module_path = {self._mgr_modules()}\n"
            "keyring = $mgr_data/keyring\n"
            f"admin_socket = {d / 'run'}/$cluster-$name.asok\n"
            "\n[osd]\n"
            f"osd_data = {d / 'osd'}/$cluster-$id\n"
            "keyring = $osd_data/keyring\n"
            f"admin_socket = {d / 'run'}/$cluster-$name.asok\n"
            "osd_objectstore = bluestore\n"
            "bluestore_block_create = true\n"
            f"bluestore_block_size = {OSD_BLOCK_SIZE}\n"
            f"osd_memory_target = {OSD_MEMORY_TARGET}\n"
            f"bluestore_cache_size = {BLUESTORE_CACHE_SIZE}\n"
            # BlueStore opens and closes its block file once per op shard at
            # boot, and each close waits out one poll of the AIO thread
            # (250 ms by default): one shard and a short poll save seconds.
            "osd_op_num_shards_hdd = 1\n"
            "osd_op_num_threads_per_shard_hdd = 1\n"
            "bdev_aio_poll_ms = 20\n"
        )

    def _mgr_modules(self) -> Path:
        """A module directory with only the manager modules a cluster needs.

        ceph-mgr imports every module it finds before it becomes active
        (~0.1-0.4 s each here); the always-on ones, the initial ones and the
        shared helpers are linked in, the rest (dashboards, exporters, test
        modules) left out.
        """
        directory = self.dir / "mgr-modules"
        directory.mkdir(exist_ok=True)
        for name in (*MGR_MODULES, *MGR_INITIAL_MODULES, "mgr_module.py", "mgr_util.py"):
            source = MGR_MODULE_SOURCE / name
            if source.exists():
                (directory / name).symlink_to(source)
        return directory

    def _authtool(self, *args: str) -> str:
        return _run([self.binaries["ceph-authtool"], *args])

    def _make_keyrings(self) -> str:
        """Every key the cluster starts with, in the monitor's keyring; returns the user's."""
        mon_keyring = self.keys / "mon.keyring"
        admin = self.keys / "admin.keyring"
        mgr = self.keys / "mgr.keyring"
        user = self.keys / "user.keyring"
        self._authtool(
            "--create-keyring",
            str(mon_keyring),
            "--gen-key",
            "-n",
            "mon.",
            "--cap",
            "mon",
            "allow *",
        )
        self._authtool(
            "--create-keyring", str(admin), "--gen-key", "-n", "client.admin",
            "--cap", "mon", "allow *", "--cap", "osd", "allow *",
            "--cap", "mds", "allow *", "--cap", "mgr", "allow *",
        )  # fmt: skip
        self._authtool(
            "--create-keyring", str(mgr), "--gen-key", "-n", f"mgr.{MGR_ID}",
            "--cap", "mon", "allow profile mgr", "--cap", "osd", "allow *",
            "--cap", "mds", "allow *",
        )  # fmt: skip
        self._authtool(
            "--create-keyring", str(user), "--gen-key", "-n", f"client.{self.user}",
            "--cap", "mon", "profile rbd",
            "--cap", "osd", f"profile rbd pool={self.pool}",
            "--cap", "mgr", f"profile rbd pool={self.pool}",
        )  # fmt: skip
        for keyring in (admin, mgr, user):
            self._authtool(str(mon_keyring), "--import-keyring", str(keyring))
        key = self._authtool(str(user), "-p", "-n", f"client.{self.user}").strip()
        # The client's own files: a ceph.conf that names only the monitor and
        # its keyring, both in a private (0700) directory, the keyring 0600.
        client_keyring = self.client_dir / "keyring"
        _write_private(client_keyring, user.read_text())
        (self.client_dir / "ceph.conf").write_text(
            "[global]\n"
            f"fsid = {self.fsid}\n"
            f"mon_host = {self.mon_host}\n"
            f"keyring = {client_keyring}\n"
            # A client's logs and admin socket stay out of /var/log and /var/run.
            "log_file = /dev/null\n"
            "admin_socket = \n"
        )
        for keyring in (mon_keyring, admin, mgr, user):
            keyring.chmod(0o600)
        return key

    def _start_mon(self) -> ManagedProcess:
        mon_keyring = self.keys / "mon.keyring"
        monmap = self.dir / "monmap"
        _run(
            [
                self.binaries["monmaptool"],
                "--create",
                "--fsid",
                self.fsid,
                "--addv",
                MON_ID,
                self.mon_host,
                str(monmap),
            ]
        )
        self._daemon_mkfs(
            "ceph-mon",
            ["--mkfs", "-i", MON_ID, "--monmap", str(monmap), "--keyring", str(mon_keyring)],
        )
        process = ManagedProcess(
            "ceph-mon",
            [self.binaries["ceph-mon"], "-f", "-c", str(self.conf), "-i", MON_ID],
            self.dir / "log",
            ready=TcpReady(self.v1_port, HOST),
            timeout=self._remaining(),
            grace=STOP_GRACE,
            env=self.env,
        )
        try:
            process.start()
        except UnavailableError as exc:
            if "Address already in use" in str(exc) or "bind" in str(exc):
                raise _PortTaken(str(exc)) from exc
            raise
        self._mark("mon")
        return process

    def _start_mgr(self) -> ManagedProcess:
        mgr_dir = self.dir / "mgr" / f"ceph-{MGR_ID}"
        mgr_dir.mkdir(parents=True, exist_ok=True)
        _write_private(mgr_dir / "keyring", (self.keys / "mgr.keyring").read_text())
        process = ManagedProcess(
            "ceph-mgr",
            [self.binaries["ceph-mgr"], "-f", "-c", str(self.conf), "-i", MGR_ID],
            self.dir / "log",
            timeout=self._remaining(),
            grace=STOP_GRACE,
            env=self.env,
        ).start()
        self._mark("mgr")
        return process

    def _register_osd(self) -> tuple[str, str]:
        """`ceph osd new` with a cephx secret of ours; returns the OSD's id and uuid."""
        osd_uuid = str(uuid.uuid4())
        secret = self._authtool("--gen-print-key").strip()
        secrets_json = json.dumps({"cephx_secret": secret}).encode()
        osd_id = self._ceph("osd", "new", osd_uuid, "-i", SecretFile(secrets_json)).strip()
        if not osd_id.isdigit():
            raise UnavailableError(f"ceph osd new returned {osd_id!r}, not an OSD id")
        osd_dir = self.dir / "osd" / f"ceph-{osd_id}"
        osd_dir.mkdir(parents=True, exist_ok=True)
        _write_private(osd_dir / "keyring", f"[osd.{osd_id}]\n\tkey = {secret}\n")
        self._mark("osd new")
        return osd_id, osd_uuid

    def _start_osd(self, osd_id: str, osd_uuid: str) -> ManagedProcess:
        self._daemon_mkfs("ceph-osd", ["--mkfs", "-i", osd_id, "--osd-uuid", osd_uuid])
        self._mark("osd mkfs")
        process = ManagedProcess(
            "ceph-osd",
            [self.binaries["ceph-osd"], "-f", "-c", str(self.conf), "-i", osd_id],
            self.dir / "log",
            timeout=self._remaining(),
            grace=STOP_GRACE,
            env=self.env,
        ).start()
        while True:
            stat = json.loads(self._ceph("osd", "stat", "--format", "json"))
            if int(stat.get("num_up_osds", 0)) >= 1 and int(stat.get("num_in_osds", 0)) >= 1:
                break
            self._check_alive(process)
            time.sleep(_POLL_INTERVAL)
        self._mark("osd up")
        return process

    def _init_pool(self) -> None:
        _run(
            [self.binaries["rbd"], "--conf", str(self.conf), "pool", "init", self.pool],
            timeout=self._remaining(),
        )
        self._mark("rbd pool init")

    def _wait_clean(self) -> None:
        """Until the manager reports every PG active+clean."""
        while True:
            status = json.loads(self._ceph("status", "--format", "json"))
            pgmap = status.get("pgmap", {})
            total = int(pgmap.get("num_pgs", 0))
            clean = sum(
                int(entry.get("count", 0))
                for entry in pgmap.get("pgs_by_state", [])
                if entry.get("state_name") == "active+clean"
            )
            if total > 0 and clean == total and status.get("mgrmap", {}).get("available"):
                break
            self._check_deadline("PGs active+clean")
            time.sleep(_POLL_INTERVAL)
        self._mark("active+clean")

    # -- helpers ------------------------------------------------------------------

    def _ceph(self, *args: Arg) -> str:
        return _run(
            [self.binaries["ceph"], "--conf", str(self.conf), *args],
            timeout=min(_TOOL_TIMEOUT, self._remaining()),
        )

    def _daemon_mkfs(self, daemon: str, args: list[str]) -> None:
        _run([self.binaries[daemon], "-c", str(self.conf), *args], timeout=self._remaining())

    def _remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 1.0)

    def _check_deadline(self, what: str) -> None:
        if time.monotonic() > self.deadline:
            raise UnavailableError(
                f"Ceph: {what} not reached within {self.timeout:g} s; logs in {self.dir / 'log'}"
            )

    def _check_alive(self, process: ManagedProcess) -> None:
        code = process.returncode()
        if code is not None:
            raise UnavailableError(
                f"{process.name} exited with status {code}; last lines of its log:\n"
                f"{process.log_tail()}"
            )
        self._check_deadline(f"{process.name} up")

    def _mark(self, step: str) -> None:
        self.timings[step] = time.monotonic() - self.started


def _write_private(path: Path, text: str) -> None:
    """A file only its owner can read (keyrings, secrets)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    path.chmod(0o600)
