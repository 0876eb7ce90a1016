"""Database engines: SQLite by default, PostgreSQL for several replicas.

SQLite runs in WAL mode with synchronous=FULL, so a write acknowledged to a
client has reached the disk, and readers never wait for the writer.

Writers that take the write lock up front (`Database.writing`, the log
sequencer) queue for it on a lock file next to the database first. SQLite
itself does not queue writers: one that finds the database locked sleeps
and retries, with naps growing to 100 ms, so with several server processes
(uvicorn workers) sharing the file a commit could wait a tenth of a second
for a lock that was free after one fsync. A blocking `flock` hands the lock
over as soon as it is released.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from trustplane.errors import UsageError


def database_url(url: str) -> URL:
    """`url` parsed, if it names a database the control plane supports."""
    try:
        parsed: URL = make_url(url)
    except ArgumentError:
        raise UsageError(f"database URL {url!r} is not valid") from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise UsageError(
            f"database {parsed.get_backend_name()!r} is not supported (sqlite, postgresql)"
        )
    return parsed


def make_engine(url: str) -> Engine:
    parsed = database_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(
            parsed,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=16,
            max_overflow=16,
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return create_engine(parsed, pool_size=16, max_overflow=16, pool_pre_ping=True)


def _sqlite_connect(connection: Any, _: Any) -> None:
    # SQLAlchemy's recipe for pysqlite: stop the driver's own implicit BEGIN
    # and emit BEGIN ourselves (below), so that a writer can ask for the
    # write lock up front.
    connection.isolation_level = None
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    immediate = connection.get_execution_options().get(WRITE_LOCK, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


WRITE_LOCK = "trustplane_write_lock"
"""Execution option: on SQLite, take the write lock when the transaction begins."""


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


class Database:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._writers = _WriterQueue.for_engine(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: committed when the block ends, rolled back on error."""
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def writing(self) -> Iterator[Connection]:
        """A transaction that holds the write lock from its start on SQLite.

        A read-then-write transaction in WAL mode fails when another writer
        committed in between; taking the lock first serializes instead. On
        PostgreSQL the caller locks the rows it reads (`FOR UPDATE`).
        """
        with self._writers.turn(), self.engine.connect() as connection:
            connection = connection.execution_options(**{WRITE_LOCK: True})
            with connection.begin():
                yield connection

    @contextmanager
    def write_session(self) -> Iterator[Session]:
        """`session()` for a read-then-write unit of work: it holds the write
        lock from its start (see `writing`), so a concurrent writer makes it
        wait instead of failing with "database is locked"."""
        with self.writing() as connection, Session(bind=connection) as session:
            yield session
            session.flush()

    def close(self) -> None:
        self.engine.dispose()
        self._writers.close()


class _WriterQueue:
    """Whose turn it is to write: a thread lock within the process, `flock` on
    DATABASE-writers.lock between processes (SQLite files only)."""

    def __init__(self, path: str | None) -> None:
        self._lock = threading.Lock()
        self._fd: int | None = None
        if path is not None:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @classmethod
    def for_engine(cls, engine: Engine) -> _WriterQueue:
        database = engine.url.database
        if not is_sqlite(engine) or not database or database == ":memory:":
            return cls(None)
        return cls(f"{database}-writers.lock")

    @contextmanager
    def turn(self) -> Iterator[None]:
        with self._lock:
            if self._fd is None:
                yield
                return
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
