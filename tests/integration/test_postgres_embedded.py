"""The embedded PostgreSQL server: logins, isolation to loopback, and stopping."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pg_fixture import postgres  # noqa: F401

from trustplane.embedded.postgres import RunningPostgres, scram_sha256_verifier, start_postgres
from trustplane.errors import UsageError

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp


def _listening(port: int) -> set[tuple[str, str]]:
    """(file, hex local address) of every socket listening on `port`, IPv4 and IPv6."""
    found = set()
    for name in ("tcp", "tcp6"):
        lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        for line in lines:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == _LISTEN:
                found.add((name, address))
    return found


def _login(server: RunningPostgres, user: str, password: str) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=server.host, port=server.port, dbname=server.database, user=user, password=password
    )


def _refuses(host: str, port: int, family: socket.AddressFamily = socket.AF_INET) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect((host, port))
        except ConnectionRefusedError:
            return True
        except OSError:  # no IPv6 on this host: nothing can listen there either
            return family == socket.AF_INET6
        return False


def test_create_insert_read_back(postgres: RunningPostgres) -> None:  # noqa: F811
    with psycopg.connect(postgres.conninfo) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (
            "trustplane",
            "trustplane",
        )
        conn.execute("CREATE TABLE replicas (name text PRIMARY KEY, generation bigint NOT NULL)")
        conn.execute("INSERT INTO replicas VALUES (%s, %s), (%s, %s)", ("a", 1, "b", 2))
        conn.commit()
    # A second connection sees the committed rows; the URL names the same server.
    libpq_url = postgres.url.replace("postgresql+psycopg://", "postgresql://", 1)
    assert postgres.url.startswith("postgresql+psycopg://trustplane:")
    assert postgres.url.endswith(f"@127.0.0.1:{postgres.port}/trustplane")
    with psycopg.connect(libpq_url) as conn:
        rows = conn.execute("SELECT name, generation FROM replicas ORDER BY name").fetchall()
    assert rows == [("a", 1), ("b", 2)]
    assert postgres.password not in repr(postgres)


def test_wrong_password_is_refused(postgres: RunningPostgres) -> None:  # noqa: F811
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _login(postgres, postgres.user, postgres.password + "x")
    # The superuser has no password and may not log in over TCP at all.
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _login(postgres, "postgres", postgres.password)
    _login(postgres, postgres.user, postgres.password).close()


def test_listens_only_on_loopback(postgres: RunningPostgres) -> None:  # noqa: F811
    assert _listening(postgres.port) == {("tcp", "0100007F")}  # 127.0.0.1, little-endian
    # Bound to 127.0.0.1 itself, not to all addresses: other loopback and IPv6 refuse.
    assert _refuses("127.0.0.2", postgres.port)
    assert _refuses("::1", postgres.port, socket.AF_INET6)
    with psycopg.connect(postgres.conninfo) as conn:
        settings = {
            name: conn.execute(f"SHOW {name}").fetchone()
            for name in (
                "listen_addresses",
                "fsync",
                "password_encryption",
            )
        }
    assert settings == {
        "listen_addresses": ("127.0.0.1",),
        "fsync": ("on",),
        "password_encryption": ("scram-sha-256",),
    }
    # The socket is private to the data dir, not in Debian's shared directory.
    assert (postgres.data_dir / f".s.PGSQL.{postgres.port}").is_socket()
    assert not Path(f"/var/run/postgresql/.s.PGSQL.{postgres.port}").exists()
    assert postgres.data_dir.stat().st_mode & 0o777 == 0o700
    if os.geteuid() == 0:
        # PostgreSQL refuses root; the server runs as the postgres system user.
        status = Path(f"/proc/{postgres.process.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1] != "0"
        assert postgres.data_dir.stat().st_uid != 0


def test_stop_really_stops_and_removes_the_temporary_cluster() -> None:
    server = start_postgres()
    with psycopg.connect(server.conninfo) as conn:
        conn.execute("SELECT 1")
    pid = server.process.pid
    assert pid is not None
    server.stop()
    assert not server.process.running()
    assert server.process.returncode() == 0  # the postmaster itself exited cleanly
    assert _refuses("127.0.0.1", server.port)
    assert _listening(server.port) == set()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing of its process group is left
    assert not server.work_dir.exists()
    server.stop()  # idempotent


def test_persistent_work_dir_keeps_data_and_rotates_the_password() -> None:
    work_dir = Path(tempfile.mkdtemp(prefix="trustplane-pg-test-", dir="/tmp"))
    work_dir.chmod(0o755)  # the server's user must be able to enter it
    try:
        with start_postgres(work_dir) as first, psycopg.connect(first.conninfo) as conn:
            conn.execute("CREATE TABLE kept (v text)")
            conn.execute("INSERT INTO kept VALUES ('survives')")
        assert "received fast shutdown request" in (work_dir / "postgres.log").read_text()
        assert (work_dir / "data" / "PG_VERSION").is_file()
        with start_postgres(work_dir) as second:
            with psycopg.connect(second.conninfo) as conn:
                assert conn.execute("SELECT v FROM kept").fetchall() == [("survives",)]
            assert second.password != first.password
            with pytest.raises(psycopg.OperationalError, match="password authentication"):
                _login(second, second.user, first.password)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def test_unreachable_work_dir_is_refused(tmp_path: Path) -> None:
    # pytest's tmp tree is 0700; only the server's own user (not root's postgres) may enter it.
    if os.geteuid() == 0:
        with pytest.raises(UsageError, match="cannot enter"):
            start_postgres(tmp_path / "pg")
    else:
        with start_postgres(tmp_path / "pg") as server:
            assert server.process.running()


def test_bad_names_are_refused() -> None:
    with pytest.raises(UsageError):
        start_postgres(database="bad-name")
    with pytest.raises(UsageError):
        start_postgres(user="postgres")


def test_scram_verifier_matches_rfc7677_vector() -> None:
    # RFC 7677's example: user "user", password "pencil", salt W22ZaJ0SNY7soEsUEjb6gQ==.
    salt = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
    verifier = scram_sha256_verifier("pencil", 4096, salt)
    # ServerSignature in the RFC is HMAC(ServerKey, AuthMessage); check ServerKey via it.
    stored, server_key = verifier.split("$")[2].split(":")
    auth_message = (
        b"n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    )
    signature = hmac.new(base64.b64decode(server_key), auth_message, hashlib.sha256).digest()
    assert base64.b64encode(signature) == b"6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
    assert verifier.startswith("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$")
    assert len(base64.b64decode(stored)) == 32
