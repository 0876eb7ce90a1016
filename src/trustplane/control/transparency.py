"""The transparency log as a service: group commit, proofs, checkpoints.

Appends come from request threads and are sequenced by one thread per
server process, which gathers whatever arrived within a couple of
milliseconds and appends it in one transaction: the head row is locked
(`BEGIN IMMEDIATE` on SQLite, `SELECT ... FOR UPDATE` on PostgreSQL), the
leaves and newly completed subtree hashes are inserted, the head is moved.
Each caller waits until its entry is committed, so an acknowledged entry is
durable, and one fsync serves a whole batch. Replicas sharing a PostgreSQL
database serialize on the head row.

At start the server checks its stored entries against its stored tree
(every leaf hash, then the head). A mismatch (a leaf row altered in the
database, say) is reported on /healthz and in the server's log, and the
log then signs no checkpoint and takes no entry: it will not vouch for a
tree its own entries contradict. Monitors check the same from outside
(`trustplane log verify --audit`), through `entries`: every entry, streamed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import queue
import struct
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select, tuple_
from sqlalchemy.exc import IntegrityError as DuplicateRow

from trustplane.control.db import Database
from trustplane.control.models import LogHead, LogLeaf, LogNode
from trustplane.errors import NotFoundError, UnavailableError, UsageError
from trustplane.trust import merkle
from trustplane.trust.checkpoint import Checkpoint, sign_checkpoint
from trustplane.trust.note import NoteSigner

MAX_BATCH = 1024
APPEND_TIMEOUT = 30.0
MAX_ENTRIES_PAGE = 1 << 20
"""Entries one `entries` request may ask for (the answer is streamed)."""
_ROWS_PER_FETCH = 4096
logger = logging.getLogger("trustplane.log")


@dataclass(frozen=True)
class Receipt:
    index: int
    leaf_hash: bytes


def canonical(entry: dict[str, Any]) -> bytes:
    """The exact bytes a leaf commits to: sorted keys, no spaces, UTF-8."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


_ROWS_PER_INSERT = 300
"""Rows per multi-row INSERT: 900 parameters, below every driver's limit."""


@dataclass(frozen=True)
class _Statements:
    """The sequencer's SQL in the driver's own parameter style."""

    lock_head: str
    leaves: str
    nodes: str
    move_head: str
    mark: str
    read_leaves: str
    read_leaf_nodes: str

    @classmethod
    @functools.cache
    def _build(cls, dialect: str, paramstyle: str) -> _Statements:
        mark = "?" if paramstyle == "qmark" else "%s"
        lock = " FOR UPDATE" if dialect == "postgresql" else ""  # SQLite: BEGIN IMMEDIATE
        return cls(
            # Only constants and placeholders are formatted into this SQL.
            lock_head=f"SELECT frontier FROM log_head WHERE id = 1{lock}",  # noqa: S608
            leaves='INSERT INTO log_leaves ("index", kind, body) VALUES ',
            nodes='INSERT INTO log_nodes (level, "index", hash) VALUES ',
            move_head=f"UPDATE log_head SET size = {mark}, frontier = {mark}, root = {mark} "  # noqa: S608
            "WHERE id = 1",
            mark=mark,
            read_leaves=f'SELECT "index", body FROM log_leaves WHERE "index" >= {mark} '  # noqa: S608
            f'AND "index" < {mark} ORDER BY "index"',
            read_leaf_nodes=f'SELECT "index", hash FROM log_nodes WHERE level = 0 '  # noqa: S608
            f'AND "index" >= {mark} AND "index" < {mark} ORDER BY "index"',
        )

    @classmethod
    def for_connection(cls, connection: Connection) -> _Statements:
        dialect = connection.dialect
        return cls._build(dialect.name, str(dialect.paramstyle))

    def insert_leaves(self, rows: int) -> str:
        return self.leaves + self._values(rows)

    def insert_nodes(self, rows: int) -> str:
        return self.nodes + self._values(rows)

    def _values(self, rows: int) -> str:
        row = f"({self.mark}, {self.mark}, {self.mark})"
        return ", ".join([row] * rows)


def _rows(connection: Connection, sql: str, params: tuple[Any, ...]) -> Iterator[Sequence[Any]]:
    """Rows in batches from the driver, streamed (PostgreSQL: a server-side cursor)."""
    raw = connection.connection
    if connection.dialect.name == "postgresql":
        cursor = raw.cursor(name=f"trustplane_{uuid.uuid4().hex}")
    else:
        cursor = raw.cursor()
    try:
        cursor.execute(sql, params)
        while rows := cursor.fetchmany(_ROWS_PER_FETCH):
            yield rows
    finally:
        cursor.close()


def _contiguous(batches: Iterator[Sequence[Any]], start: int) -> Iterator[Sequence[Any]]:
    """Batches of rows whose first column counts up from `start` without a
    gap; at a gap, the rows before it and then nothing (the index column is
    a primary key, read in order: first and last tell a batch has no gap)."""
    expected = start
    for rows in batches:
        if rows[0][0] == expected and rows[-1][0] == expected + len(rows) - 1:
            yield rows
            expected += len(rows)
            continue
        cut = next(n for n, row in enumerate(rows) if row[0] != expected + n)
        logger.error("transparency log: entry %d is missing", expected + cut)
        if cut:
            yield rows[:cut]
        return


def frame_entries(bodies: Sequence[bytes]) -> bytes:
    """One chunk of the entries stream: the count (4 bytes, big-endian), each
    body's length (4 bytes each), then the bodies back to back. Lengths first
    keep the framing out of a per-entry loop on both sides."""
    return struct.pack(f">I{len(bodies)}I", len(bodies), *map(len, bodies)) + b"".join(bodies)


def _flat(rows: Sequence[tuple[Any, ...]]) -> list[Any]:
    return [value for row in rows for value in row]


def _body(kind: str, entry: dict[str, Any]) -> bytes:
    return canonical({"kind": kind, "time": datetime.now(UTC).isoformat(), **entry})


def _deliver(outcomes: list[tuple[_Waiter, Receipt | None, BaseException | None]]) -> None:
    """Hand each waiter its receipt or the failure: threads directly, event
    loops with one wake-up per loop for the whole batch."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any, Any]]] = {}
    for waiter, receipt, failure in outcomes:
        if waiter.loop is None:
            future = waiter.result
            assert isinstance(future, Future)
            if failure is not None:
                future.set_exception(failure)
            else:
                future.set_result(receipt)  # type: ignore[arg-type]
        else:
            by_loop.setdefault(waiter.loop, []).append((waiter.result, receipt, failure))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
            loop.call_soon_threadsafe(_resolve, items)


def _resolve(items: list[tuple[asyncio.Future[Receipt], Receipt | None, Any]]) -> None:
    for waiter, receipt, failure in items:
        if waiter.done():
            continue
        if failure is not None:
            waiter.set_exception(failure)
        else:
            waiter.set_result(receipt)  # type: ignore[arg-type]


class _SqlNodes:
    """The merkle NodeStore over the log_nodes table, inside one connection."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    def get_nodes(self, keys: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        if not keys:
            return {}
        found: dict[tuple[int, int], bytes] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):  # stay under bind-parameter limits
            chunk = unique[start : start + 500]
            rows = self.connection.execute(
                select(LogNode.level, LogNode.index, LogNode.hash).where(
                    tuple_(LogNode.level, LogNode.index).in_(chunk)
                )
            )
            found.update({(int(row[0]), int(row[1])): bytes(row[2]) for row in rows})
        return found


class _Waiter:
    """One appended entry on its way to a commit, and whom to tell."""

    __slots__ = ("body", "kind", "loop", "result")

    def __init__(
        self,
        body: bytes,
        kind: str,
        result: Future[Receipt] | asyncio.Future[Receipt],
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self.body = body
        self.kind = kind
        self.result = result
        self.loop = loop


class TransparencyLog:
    def __init__(self, db: Database, signer: NoteSigner, origin: str, batch_wait: float) -> None:
        self.db = db
        self.signer = signer
        self.origin = origin
        self.batch_wait = batch_wait
        self._queue: queue.SimpleQueue[_Waiter | None] = queue.SimpleQueue()
        self._ensure_head()
        started = time.monotonic()
        self.damage: str | None = self.check_stored_tree()
        """Why the stored entries contradict the stored tree; None when they agree."""
        if self.damage is not None:
            logger.error(
                "transparency log: %s; no checkpoint is signed and no entry appended until "
                "the database is repaired",
                self.damage,
            )
        else:
            size, _ = self.head()
            logger.info(
                "transparency log: %d entries match the stored tree (checked in %.1f s)",
                size,
                time.monotonic() - started,
            )
        self._thread = threading.Thread(target=self._sequence, name="trustplane-log", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    # -- appending -------------------------------------------------------------

    def _refuse_if_damaged(self) -> None:
        if self.damage is not None:
            raise UnavailableError(
                f"the transparency log does not match its stored tree ({self.damage}); "
                "it signs and takes nothing until the database is repaired"
            )

    def append(self, kind: str, entry: dict[str, Any]) -> Receipt:
        """Add an entry; returns once it is committed to the database."""
        self._refuse_if_damaged()
        future: Future[Receipt] = Future()
        self._queue.put(_Waiter(_body(kind, entry), kind, future, None))
        try:
            return future.result(timeout=APPEND_TIMEOUT)
        except TimeoutError:
            raise UnavailableError("the transparency log did not commit in time") from None

    async def append_async(self, kind: str, entry: dict[str, Any]) -> Receipt:
        """`append` for request handlers on the event loop: the same durable
        commit, awaited without holding a thread while the batch is written."""
        self._refuse_if_damaged()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Receipt] = loop.create_future()
        self._queue.put(_Waiter(_body(kind, entry), kind, waiter, loop))
        try:
            # shield: a timed-out or cancelled caller leaves the entry to be
            # committed (or not) exactly as a blocked thread would.
            return await asyncio.wait_for(asyncio.shield(waiter), APPEND_TIMEOUT)
        except TimeoutError:
            raise UnavailableError("the transparency log did not commit in time") from None

    def _sequence(self) -> None:
        """Group commit: whatever is queued goes into the next transaction.

        Entries that arrive while a batch is being written (one fsync) make
        up the next batch, so the batch size follows the load by itself;
        `batch_wait` adds a bounded wait for more entries before a commit
        (a deadline from the first entry, not an idle timeout: a steady
        stream must not keep a batch open).
        """
        while (first := self._queue.get()) is not None:
            batch = [first]
            stop = False
            deadline = time.monotonic() + self.batch_wait
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        item = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                receipts = self._commit([(w.body, w.kind) for w in batch])
            except BaseException as exc:  # every waiter learns of the failure
                failure = UnavailableError(f"the transparency log failed: {exc}")
                _deliver([(w, None, failure) for w in batch])
            else:
                _deliver([(w, r, None) for w, r in zip(batch, receipts, strict=True)])
            if stop:
                self._queue.put(None)

    def _commit(self, entries: list[tuple[bytes, str]]) -> list[Receipt]:
        """One transaction: lock the head, insert leaves and new nodes, move the head.

        Written against the driver (DB-API) rather than through SQLAlchemy
        statements: SQLAlchemy's per-statement work was most of a batch's
        cost, and multi-row INSERTs are one round trip (and, in Python's
        sqlite3, one release of the GIL instead of one per row) each.
        """
        leaf_hashes = [merkle.leaf_hash(body) for body, _ in entries]
        with self.db.writing() as connection:
            sql = _Statements.for_connection(connection)
            cursor = connection.connection.cursor()
            try:
                cursor.execute(sql.lock_head)
                head = cursor.fetchone()
                if head is None:
                    raise UnavailableError("the log has no head row")
                state = merkle.TreeState.from_bytes(bytes(head[0]))
                first = state.size
                new_state, nodes = merkle.append(state, leaf_hashes)
                leaves = [(first + i, kind, body) for i, (body, kind) in enumerate(entries)]
                for start in range(0, len(leaves), _ROWS_PER_INSERT):
                    chunk = leaves[start : start + _ROWS_PER_INSERT]
                    cursor.execute(sql.insert_leaves(len(chunk)), _flat(chunk))
                for start in range(0, len(nodes), _ROWS_PER_INSERT):
                    part = nodes[start : start + _ROWS_PER_INSERT]
                    cursor.execute(sql.insert_nodes(len(part)), _flat(part))
                cursor.execute(
                    sql.move_head, (new_state.size, new_state.to_bytes(), merkle.root(new_state))
                )
            finally:
                cursor.close()
        return [Receipt(first + i, leaf) for i, leaf in enumerate(leaf_hashes)]

    def _ensure_head(self) -> None:
        try:
            with self.db.session() as session:
                if session.get(LogHead, 1) is None:
                    empty = merkle.TreeState(size=0, frontier=())
                    session.add(
                        LogHead(id=1, size=0, frontier=empty.to_bytes(), root=merkle.root(empty))
                    )
        except DuplicateRow:
            pass  # replicas starting together: another one made it first

    # -- reading -------------------------------------------------------------------

    def head(self) -> tuple[int, bytes]:
        with self.db.engine.connect() as connection:
            row = connection.execute(
                select(LogHead.size, LogHead.root).where(LogHead.id == 1)
            ).one()
        return int(row.size), bytes(row.root)

    def checkpoint(self) -> bytes:
        self._refuse_if_damaged()
        size, root = self.head()
        return sign_checkpoint(Checkpoint(origin=self.origin, size=size, root=root), self.signer)

    def entries(self, start: int, end: int) -> Iterator[bytes]:
        """Entries [start, end), streamed in chunks (`frame_entries`). Ends
        early, cleanly, at the first entry the database does not have (the
        reader names it)."""
        size, _ = self.head()
        if not 0 <= start < end <= size or end - start > MAX_ENTRIES_PAGE:
            raise UsageError(
                f"entries [{start}, {end}): the log has {size}; at most {MAX_ENTRIES_PAGE} at once"
            )
        return self._frames(start, end)

    def _frames(self, start: int, end: int) -> Iterator[bytes]:
        with self.db.engine.connect() as connection:
            sql = _Statements.for_connection(connection)
            for rows in _contiguous(_rows(connection, sql.read_leaves, (start, end)), start):
                yield frame_entries([bytes(row[1]) for row in rows])

    def check_stored_tree(self) -> str | None:
        """Recompute every leaf hash from the stored entries and the head from
        them; the first disagreement with the stored tree, or None.

        Entries and leaf nodes are read as two ordered streams side by side
        (a join costs three times as much), compared a batch at a time.
        """
        with self.db.engine.connect() as connection:
            head = connection.execute(
                select(LogHead.size, LogHead.frontier, LogHead.root).where(LogHead.id == 1)
            ).one()
            size = int(head.size)
            sql = _Statements.for_connection(connection)
            leaves = _contiguous(_rows(connection, sql.read_leaves, (0, size)), 0)
            nodes = _contiguous(_rows(connection, sql.read_leaf_nodes, (0, size)), 0)
            state, done, stored_hashes = merkle.TreeState(), 0, b""
            for rows in leaves:
                hashes = merkle.leaf_hashes([bytes(row[1]) for row in rows])
                while len(stored_hashes) < 32 * len(hashes):
                    batch = next(nodes, None)
                    if batch is None:
                        break
                    stored_hashes += b"".join(bytes(row[1]) for row in batch)
                joined = b"".join(hashes)
                if stored_hashes[: len(joined)] != joined:
                    for offset, leaf in enumerate(hashes):
                        if stored_hashes[32 * offset : 32 * offset + 32] != leaf:
                            index = done + offset
                            return f"entry {index} does not match the stored tree (its leaf hash)"
                stored_hashes = stored_hashes[len(joined) :]
                state = merkle.fold(state, hashes)
                done += len(hashes)
        if done != size:
            return f"entry {done} is missing from the database"
        stored_state = merkle.TreeState.from_bytes(bytes(head.frontier))
        if stored_state != state or merkle.root(state) != bytes(head.root):
            return (
                f"the stored tree head does not match the {size} stored entries (the head or "
                "the tree's nodes were altered)"
            )
        return None

    def entry(self, index: int) -> bytes:
        with self.db.engine.connect() as connection:
            body = connection.execute(select(LogLeaf.body).where(LogLeaf.index == index)).scalar()
        if body is None:
            raise NotFoundError(f"log entry {index} does not exist")
        return bytes(body)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        current, _ = self.head()
        if not 0 <= index < size <= current:
            raise UsageError(
                f"no inclusion proof for entry {index} in a tree of {size} (size {current})"
            )
        with self.db.engine.connect() as connection:
            return merkle.inclusion_proof(_SqlNodes(connection), index, size)

    def consistency_proof(self, old: int, new: int) -> list[bytes]:
        current, _ = self.head()
        if not 0 < old <= new <= current:
            raise UsageError(f"no consistency proof from {old} to {new} (size {current})")
        with self.db.engine.connect() as connection:
            return merkle.consistency_proof(_SqlNodes(connection), old, new)
