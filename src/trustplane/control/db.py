"""Database engines: SQLite by default, PostgreSQL for several replicas.

SQLite runs in WAL mode with synchronous=FULL, so a write acknowledged to a
client has reached the disk, and readers never wait for the writer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from trustplane.errors import UsageError


def make_engine(url: str) -> Engine:
    try:
        parsed: URL = make_url(url)
    except ArgumentError:
        raise UsageError(f"database URL {url!r} is not valid") from None
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
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(parsed, pool_size=16, max_overflow=16, pool_pre_ping=True)
    raise UsageError(
        f"database {parsed.get_backend_name()!r} is not supported (sqlite, postgresql)"
    )


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
        with self.engine.connect() as connection:
            connection = connection.execution_options(**{WRITE_LOCK: True})
            with connection.begin():
                yield connection

    def close(self) -> None:
        self.engine.dispose()
