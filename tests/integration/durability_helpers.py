"""Shared by the replica and crash tests: where a server keeps its state, and
how an auditor holds its log to account.

- `fresh_schema` gives each server (or pair of replicas) an empty PostgreSQL
  schema of its own in the session's database, so tests never see each
  other's rows: the login role may not create databases, but it owns the
  database and may create schemas, and libpq's `options=-csearch_path=...`
  puts everything (alembic's version table too) in that schema.
- `write_server_config` writes DATA_DIR/server.yaml as an operator would.
- `LogAuditor` pins the log's key from `/v1/log/key` once and then accepts
  only checkpoints whose signature verifies with it.
- `StateStore.leaves` reads the log's leaves straight from the database, so
  that the signed root can be recomputed independently of the server.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import yaml
from psycopg import sql

from trustplane.client import ControlClient
from trustplane.embedded.postgres import RunningPostgres
from trustplane.trust import merkle
from trustplane.trust.checkpoint import Checkpoint, open_checkpoint
from trustplane.trust.note import NoteVerifier, parse_verifier_key

LEAVES_SQL = 'SELECT "index", body FROM log_leaves ORDER BY "index"'


@dataclass(frozen=True)
class StateStore:
    """The database a server (or a set of replicas) keeps its state in."""

    name: str
    database_url: str | None
    """For server.yaml; None means the embedded default (SQLite in the data dir)."""
    connect: Callable[[], Any]
    """A DB-API connection, to read what the server committed."""

    def leaves(self) -> list[tuple[int, bytes]]:
        connection = self.connect()
        try:
            rows = connection.execute(LEAVES_SQL).fetchall()
        finally:
            connection.close()
        return [(int(index), bytes(body)) for index, body in rows]

    def count(self, table: str, where: str = "") -> int:
        connection = self.connect()
        try:
            row = connection.execute(f"SELECT count(*) FROM {table} {where}").fetchone()  # noqa: S608
        finally:
            connection.close()
        return int(row[0])


def sqlite_store(data_dir: Path) -> StateStore:
    path = data_dir / "trustplane.db"
    return StateStore("sqlite", None, lambda: sqlite3.connect(path))


def fresh_schema(postgres: RunningPostgres, prefix: str) -> StateStore:
    """An empty schema in the session's PostgreSQL, and the URL that lands in it."""
    schema = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(postgres.conninfo, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    options = f"-csearch_path={schema}"
    url = f"{postgres.url}?options={quote(options, safe='')}"
    return StateStore(
        f"postgresql:{schema}",
        url,
        lambda: psycopg.connect(postgres.conninfo, options=options),
    )


def write_server_config(data_dir: Path, **values: Any) -> None:
    """DATA_DIR/server.yaml with `values` (paths as strings), mode 0600: it may hold a password."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = data_dir / "server.yaml"
    text = yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in values.items()})
    path.touch(mode=0o600)
    path.write_text(text)


@dataclass(frozen=True)
class LogAuditor:
    """A client-side witness: the log's key, pinned once, and nothing taken on trust."""

    origin: str
    verifier_key: str
    verifier: NoteVerifier

    @classmethod
    def pin(cls, client: ControlClient) -> LogAuditor:
        published = client.log_key()
        return cls(
            published.origin,
            published.verifier_key,
            parse_verifier_key(published.verifier_key),
        )

    def checkpoint(self, client: ControlClient) -> Checkpoint:
        """The server's current checkpoint; raises unless the pinned key signed it."""
        return open_checkpoint(client.checkpoint(), self.verifier, self.origin)

    def check_consistent(self, client: ControlClient, old: Checkpoint, new: Checkpoint) -> None:
        assert old.size <= new.size, (old.size, new.size)
        proof = client.consistency_proof(old.size, new.size) if old.size < new.size else []
        assert merkle.verify_consistency(old.size, new.size, old.root, new.root, proof), (
            f"checkpoint {new.size} is not an extension of checkpoint {old.size}"
        )

    def check_included(
        self, client: ControlClient, index: int, body: bytes, at: Checkpoint
    ) -> None:
        proof = client.inclusion_proof(index, at.size)
        assert merkle.verify_inclusion(merkle.leaf_hash(body), index, at.size, proof, at.root), (
            f"entry {index} is not included in checkpoint {at.size}"
        )
