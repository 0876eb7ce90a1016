"""Start a private PostgreSQL server on 127.0.0.1 for tests and multi-replica runs.

The server comes from Debian's `postgresql` package, but none of Debian's
cluster machinery is used: no `pg_ctlcluster`, no /etc/postgresql, and the
system's default `main` cluster is never touched or started. We run the
version's own binaries from /usr/lib/postgresql/<version>/bin (the highest
version installed) on a data directory of our own:

- ``initdb`` makes the cluster (UTF-8, C locale); the superuser ``postgres``
  has no password and may only log in over the unix socket, by peer
  authentication;
- ``postgres`` listens on 127.0.0.1 and a free port, and nowhere else; its
  unix socket is in the data directory (mode 0700), not in the shared
  /var/run/postgresql;
- TCP logins need a password (scram-sha-256); one login role and one database
  it owns are made for trustplane, the role with a generated password that
  is sent to the server only as a SCRAM verifier;
- fsync stays on: the server behaves as in production.

PostgreSQL refuses to run as root. When we are root (the tests are), initdb,
postgres and psql run as the `postgres` system user that the Debian package
creates, through ``setpriv`` (which execs, so the process we start *is* the
postmaster and can be sent SIGINT for a fast shutdown).

Where the data lives. Without a work dir, a fresh directory is made with
`tempfile.mkdtemp` in the system temp dir (/tmp), owned by the server's user
with mode 0700, and removed again by `stop()`. That is what the tests use:
pytest's own temp dirs live under /tmp/pytest-of-root, which is 0700 and
owned by root, so the `postgres` user cannot reach a data dir inside them,
while /tmp itself is world-searchable (1777) and mkdtemp makes an
unpredictable name atomically (no symlink games by other users). A fresh
cluster per session costs about a second (`initdb --no-sync`; the running
server still fsyncs) and cannot inherit state from an earlier run.
A persistent cluster (say /var/lib/trustplane-postgres for a multi-replica
demo) is had by passing a work dir: every directory above it must be
searchable by the server's user (checked up front), the data dir is
work_dir/data, kept by `stop()` and reused by the next start, which
sets a new password for the role.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import hashlib
import hmac
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from trustplane.embedded.process import (
    ManagedProcess,
    StopsOnExit,
    free_port,
    require_binary,
    tail_lines,
)
from trustplane.errors import UnavailableError, UsageError

POSTGRES_ROOT = Path("/usr/lib/postgresql")
APT_PACKAGE = "postgresql"
SYSTEM_USER = "postgres"
SUPERUSER = "postgres"
DEFAULT_DATABASE = "trustplane"
DEFAULT_USER = "trustplane"
HOST = "127.0.0.1"
START_TIMEOUT = 60.0
INITDB_TIMEOUT = 120.0
# A fast shutdown (SIGINT) rolls back open transactions and checkpoints;
# after this long the process group is killed (and the next start recovers).
STOP_GRACE = 30.0
SCRAM_ITERATIONS = 4096  # PostgreSQL's default scram_iterations
_PORT_ATTEMPTS = 3
_POLL_INTERVAL = 0.05
# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@dataclass(frozen=True)
class RunningPostgres(StopsOnExit):
    """A started PostgreSQL server: where it is, how to log in, and its process.

    `user`/`password` are the trustplane login role, which owns `database`.
    The password is left out of `repr()`.
    """

    host: str
    port: int
    database: str
    user: str
    password: str = field(repr=False)
    process: ManagedProcess
    data_dir: Path
    work_dir: Path
    temporary: bool
    version: str
    bin_dir: Path

    @property
    def url(self) -> str:
        """SQLAlchemy URL for the psycopg 3 driver."""
        return (
            f"postgresql+psycopg://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(self.database, safe='')}"
        )

    @property
    def conninfo(self) -> str:
        """libpq connection string, for `psycopg.connect()` or `psql`."""
        parts = {
            "host": self.host,
            "port": str(self.port),
            "dbname": self.database,
            "user": self.user,
            "password": self.password,
        }
        return " ".join(f"{key}={_conninfo_value(value)}" for key, value in parts.items())

    @property
    def socket_dir(self) -> Path:
        """Directory of the server's unix socket (inside the data dir)."""
        return self.data_dir

    @property
    def log_file(self) -> Path:
        return self.process.log_file

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Fast shutdown (SIGINT); kill the group after `grace` s. Idempotent.

        A temporary work dir (no `work_dir` given to `start_postgres`) is
        removed with the data in it.
        """
        _RUNNING.discard(self)
        pid = self.process.pid
        if pid is not None and self.process.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
            deadline = time.monotonic() + grace
            while self.process.running() and time.monotonic() < deadline:
                time.sleep(_POLL_INTERVAL)
        self.process.stop()  # SIGTERM, then SIGKILL, to whatever is left of the group
        if self.temporary:
            shutil.rmtree(self.work_dir, ignore_errors=True)


# Strong references: a server nobody stopped is still shut down (and its
# temporary dir removed) when the interpreter exits.
_RUNNING: set[RunningPostgres] = set()


@atexit.register
def _stop_leftovers() -> None:
    """Shut down servers still running at interpreter exit and remove their temp dirs.

    Registered after process.py's own handler, so it runs first (atexit is
    LIFO) and shuts down with SIGINT rather than SIGTERM.
    """
    for server in list(_RUNNING):
        with contextlib.suppress(Exception):
            server.stop(grace=5.0)


@dataclass(frozen=True)
class _RunAs:
    """Whom the server runs as, and the argv prefix that switches to that user."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    prefix: tuple[str, ...]


def find_bin_dir(root: Path = POSTGRES_ROOT) -> tuple[str, Path]:
    """The highest installed PostgreSQL major version and its bin directory."""
    versions: list[tuple[int, str, Path]] = []
    if root.is_dir():
        for entry in root.iterdir():
            bin_dir = entry / "bin"
            if entry.name.isdigit() and all(
                (bin_dir / tool).is_file() for tool in ("postgres", "initdb", "pg_isready", "psql")
            ):
                versions.append((int(entry.name), entry.name, bin_dir))
    if not versions:
        raise UnavailableError(
            f"PostgreSQL server binaries not found under {root}/<version>/bin; "
            f"install the Debian package {APT_PACKAGE}"
        )
    _, version, bin_dir = max(versions)
    return version, bin_dir


def start_postgres(
    work_dir: Path | None = None,
    *,
    database: str = DEFAULT_DATABASE,
    user: str = DEFAULT_USER,
    password: str | None = None,
    timeout: float = START_TIMEOUT,
) -> RunningPostgres:
    """Start PostgreSQL on 127.0.0.1 and a free port; return when a login works.

    Without `work_dir` the cluster lives in a new temporary directory that
    `stop()` removes. With one, the data dir is work_dir/data, created by
    initdb on first use and reused afterwards. `password` is generated
    unless given. Raises UnavailableError (with the server's log tail) when
    PostgreSQL is missing or does not come up, UsageError for bad names or an
    unusable work dir.
    """
    for name, what in ((database, "database"), (user, "user")):
        if not _IDENTIFIER.fullmatch(name) or name in (SUPERUSER, "template0", "template1"):
            raise UsageError(
                f"PostgreSQL {what} name {name!r} must be a lowercase identifier "
                "(letters, digits, _) and not a built-in one"
            )
    if password is None:
        password = secrets.token_urlsafe(24)
    elif not password or not password.isascii() or not password.isprintable():
        raise UsageError("a PostgreSQL password must be non-empty printable ASCII")
    version, bin_dir = find_bin_dir()
    run_as = _server_identity()

    temporary = work_dir is None
    work_dir = _make_temp_work_dir(run_as) if work_dir is None else work_dir.absolute()
    try:
        return _start(
            work_dir, temporary, run_as, version, bin_dir, database, user, password, timeout
        )
    except BaseException:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
        raise


def _start(
    work_dir: Path,
    temporary: bool,
    run_as: _RunAs,
    version: str,
    bin_dir: Path,
    database: str,
    user: str,
    password: str,
    timeout: float,
) -> RunningPostgres:
    data_dir = work_dir / "data"
    if not temporary:
        work_dir.mkdir(parents=True, exist_ok=True)
        blocked = _unsearchable_dir(work_dir, run_as)
        if blocked is not None:
            raise UsageError(
                f"the PostgreSQL server runs as {run_as.name!r}, which cannot enter {blocked}; "
                f"choose a work dir it can reach (e.g. /var/lib/trustplane-postgres) "
                "or none for a temporary one"
            )
    socket_path = data_dir / ".s.PGSQL.65535"
    if len(os.fsencode(socket_path)) > _MAX_SOCKET_PATH:
        raise UsageError(f"work dir path too long for a unix socket inside it: {work_dir}")

    env = _server_env(bin_dir)
    if not (data_dir / "PG_VERSION").is_file():
        _initdb(work_dir, data_dir, run_as, bin_dir, env, no_sync=temporary)
    else:
        existing = (data_dir / "PG_VERSION").read_text(encoding="ascii").strip()
        if existing != version:
            raise UsageError(
                f"{data_dir} holds a PostgreSQL {existing} cluster, but the installed "
                f"server is {version}; remove it or upgrade it with pg_upgrade"
            )
    _write_hba(data_dir, run_as)

    last_error: UnavailableError | None = None
    for _ in range(_PORT_ATTEMPTS):
        port = free_port(HOST)
        argv = [
            *run_as.prefix,
            str(bin_dir / "postgres"),
            "-D",
            str(data_dir),
            *_settings(port, data_dir),
        ]
        process = ManagedProcess(
            "postgres",
            argv,
            work_dir,
            ready=_PgReady(bin_dir / "pg_isready", HOST, port),
            timeout=timeout,
            grace=10.0,
            env=env,
            cwd=data_dir,
        )
        try:
            process.start()
        except UnavailableError as exc:
            # free_port() cannot reserve the port; another program may have taken it.
            if "Address already in use" not in str(exc):
                raise
            last_error = exc
            continue
        server = RunningPostgres(
            host=HOST,
            port=port,
            database=database,
            user=user,
            password=password,
            process=process,
            data_dir=data_dir,
            work_dir=work_dir,
            temporary=temporary,
            version=version,
            bin_dir=bin_dir,
        )
        _RUNNING.add(server)
        try:
            _bootstrap(server, run_as, env)
        except BaseException:
            server.stop()
            raise
        return server
    assert last_error is not None
    raise last_error


def _settings(port: int, data_dir: Path) -> list[str]:
    """Server settings given on the command line (they win over postgresql.conf)."""
    settings = {
        "listen_addresses": HOST,
        "port": str(port),
        "unix_socket_directories": str(data_dir),
        "unix_socket_permissions": "0700",
        "password_encryption": "scram-sha-256",
        "ssl": "off",
        "fsync": "on",
        "synchronous_commit": "on",
        "full_page_writes": "on",
        "cluster_name": "trustplane",
        "logging_collector": "off",
        "log_destination": "stderr",
    }
    argv: list[str] = []
    for key, value in settings.items():
        argv += ["-c", f"{key}={value}"]
    return argv


def _server_identity() -> _RunAs:
    """The current user, or the `postgres` system user when we are root."""
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.geteuid())
        return _RunAs(entry.pw_name, entry.pw_uid, os.getegid(), tuple(os.getgroups()), ())
    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise UnavailableError(
            f"PostgreSQL refuses to run as root and there is no {SYSTEM_USER!r} system user; "
            f"install the Debian package {APT_PACKAGE} (it creates the user)"
        ) from None
    setpriv = require_binary("setpriv", "util-linux")
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    prefix = (
        setpriv,
        f"--reuid={entry.pw_uid}",
        f"--regid={entry.pw_gid}",
        "--init-groups",
        "--",
    )
    return _RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, prefix)


def _server_env(bin_dir: Path) -> dict[str, str]:
    """A small, predictable environment: no PG* variables, C locale, the version's bin first."""
    path = os.pathsep.join([str(bin_dir), "/usr/local/bin", "/usr/bin", "/bin"])
    return {"PATH": path, "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}


def _make_temp_work_dir(run_as: _RunAs) -> Path:
    """A new 0700 directory in the temp dir, owned by the server's user."""
    base = Path(tempfile.gettempdir())
    if _unsearchable_dir(base / "x", run_as) is not None:
        base = Path("/tmp")  # noqa: S108 - world-searchable; mkdtemp picks a private name
    work_dir = Path(tempfile.mkdtemp(prefix="trustplane-postgres-", dir=base))
    if os.geteuid() == 0:
        os.chown(work_dir, run_as.uid, run_as.gid)
    return work_dir


def _unsearchable_dir(path: Path, run_as: _RunAs) -> Path | None:
    """The first directory above `path` that `run_as` may not enter, if any (mode bits only)."""
    for directory in reversed(path.absolute().parents):
        try:
            info = directory.stat()
        except OSError:
            return directory
        if info.st_uid == run_as.uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid in run_as.groups or info.st_gid == run_as.gid:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return directory
    return None


def _initdb(
    work_dir: Path,
    data_dir: Path,
    run_as: _RunAs,
    bin_dir: Path,
    env: dict[str, str],
    *,
    no_sync: bool,
) -> None:
    """Make a new cluster in `data_dir` (which must be absent or empty)."""
    if data_dir.exists() and any(data_dir.iterdir()):
        raise UsageError(f"{data_dir} is not empty and holds no PostgreSQL cluster")
    data_dir.mkdir(mode=0o700, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(data_dir, run_as.uid, run_as.gid)
    argv = [
        *run_as.prefix,
        str(bin_dir / "initdb"),
        "--pgdata",
        str(data_dir),
        "--username",
        SUPERUSER,
        "--encoding",
        "UTF8",
        "--locale",
        "C",
        "--auth-local",
        "peer",
        "--auth-host",
        "scram-sha-256",
        "--no-instructions",
    ]
    if no_sync:
        # Skips only initdb's final flush of a throw-away cluster; the server
        # itself runs with fsync=on.
        argv.append("--no-sync")
    log_file = work_dir / "initdb.log"
    _run(argv, log_file, env, data_dir, "initdb", INITDB_TIMEOUT)


def _write_hba(data_dir: Path, run_as: _RunAs) -> None:
    """Only the superuser over the socket (peer), and any role over 127.0.0.1 with SCRAM."""
    hba = data_dir / "pg_hba.conf"
    text = (
        "# Written by trustplane.embedded.postgres; rewritten at every start.\n"
        "# TYPE  DATABASE  USER      ADDRESS         METHOD\n"
        f"local   all       {SUPERUSER:<9} {'':<15} peer\n"
        "host    all       all       127.0.0.1/32    scram-sha-256\n"
    )
    fd = os.open(hba, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    if os.geteuid() == 0:
        os.chown(hba, run_as.uid, run_as.gid)


_BOOTSTRAP_SQL = r"""
SELECT format('CREATE ROLE %I', :'role')
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
ALTER ROLE :"role" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'verifier';
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
"""


def _bootstrap(server: RunningPostgres, run_as: _RunAs, env: dict[str, str]) -> None:
    """Create (or update) the login role and its database, as the superuser over the socket."""
    verifier = scram_sha256_verifier(server.password)
    # psql quotes the variables (:'x' as a literal, :"x" as an identifier);
    # the values are checked identifiers and base64 with '$:', safe in '…'.
    script = (
        f"\\set role '{server.user}'\n"
        f"\\set db '{server.database}'\n"
        f"\\set verifier '{verifier}'\n"
        f"{_BOOTSTRAP_SQL}"
    )
    argv = [
        *run_as.prefix,
        str(server.bin_dir / "psql"),
        "--no-psqlrc",
        "--quiet",
        "--set=ON_ERROR_STOP=1",
        f"--host={server.socket_dir}",
        f"--port={server.port}",
        f"--username={SUPERUSER}",
        "--dbname=postgres",
    ]
    log_file = server.work_dir / "bootstrap.log"
    _run(argv, log_file, env, server.data_dir, "psql (bootstrap)", 30.0, stdin=script)


def _run(
    argv: Sequence[str],
    log_file: Path,
    env: dict[str, str],
    cwd: Path,
    what: str,
    timeout: float,
    stdin: str | None = None,
) -> None:
    """Run a helper to completion with its output in `log_file`; UnavailableError if it fails."""
    with log_file.open("wb") as log:
        try:
            result = subprocess.run(
                list(argv),
                input=stdin.encode("utf-8") if stdin is not None else None,
                stdin=subprocess.DEVNULL if stdin is None else None,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UnavailableError(f"{what} failed: {exc}") from exc
    if result.returncode != 0:
        tail = tail_lines(log_file)
        raise UnavailableError(
            f"{what} exited with status {result.returncode}; last lines of {log_file}:\n{tail}"
        )


def scram_sha256_verifier(
    password: str, iterations: int = SCRAM_ITERATIONS, salt: bytes | None = None
) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802/7677).

    Sending this instead of the password keeps the plaintext out of the
    server entirely. `password` must be ASCII, where SASLprep changes nothing.
    """
    salt = secrets.token_bytes(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


@dataclass(frozen=True)
class _PgReady:
    """Ready when `pg_isready` says the server accepts connections on host:port."""

    pg_isready: Path
    host: str
    port: int

    def __call__(self) -> bool:
        try:
            result = subprocess.run(
                [str(self.pg_isready), "-q", "-h", self.host, "-p", str(self.port), "-t", "2"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
                timeout=5.0,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return result.returncode == 0


def _conninfo_value(value: str) -> str:
    """Quote a value for a libpq key=value string when it needs it."""
    if value and not any(ch in value for ch in " '\\"):
        return value
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"
