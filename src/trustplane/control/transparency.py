"""The transparency log as a service: group commit, proofs, checkpoints.

Appends come from request threads and are sequenced by one thread per
server process, which gathers whatever arrived within a couple of
milliseconds and appends it in one transaction: the head row is locked
(`BEGIN IMMEDIATE` on SQLite, `SELECT ... FOR UPDATE` on PostgreSQL), the
leaves and newly completed subtree hashes are inserted, the head is moved.
Each caller waits until its entry is committed, so an acknowledged entry is
durable, and one fsync serves a whole batch. Replicas sharing a PostgreSQL
database serialize on the head row.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, insert, select, tuple_, update

from trustplane.control.db import Database
from trustplane.control.models import LogHead, LogLeaf, LogNode
from trustplane.errors import NotFoundError, UnavailableError, UsageError
from trustplane.trust import merkle
from trustplane.trust.checkpoint import Checkpoint, sign_checkpoint
from trustplane.trust.note import NoteSigner

MAX_BATCH = 1024
APPEND_TIMEOUT = 30.0


@dataclass(frozen=True)
class Receipt:
    index: int
    leaf_hash: bytes


def canonical(entry: dict[str, Any]) -> bytes:
    """The exact bytes a leaf commits to: sorted keys, no spaces, UTF-8."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


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


class TransparencyLog:
    def __init__(self, db: Database, signer: NoteSigner, origin: str, batch_wait: float) -> None:
        self.db = db
        self.signer = signer
        self.origin = origin
        self.batch_wait = batch_wait
        self._queue: queue.SimpleQueue[tuple[bytes, Future[Receipt]] | None] = queue.SimpleQueue()
        self._ensure_head()
        self._thread = threading.Thread(target=self._sequence, name="trustplane-log", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    # -- appending -------------------------------------------------------------

    def append(self, kind: str, entry: dict[str, Any]) -> Receipt:
        """Add an entry; returns once it is committed to the database."""
        body = canonical({"kind": kind, "time": datetime.now(UTC).isoformat(), **entry})
        future: Future[Receipt] = Future()
        self._queue.put((body, future))
        try:
            return future.result(timeout=APPEND_TIMEOUT)
        except TimeoutError:
            raise UnavailableError("the transparency log did not commit in time") from None

    def _sequence(self) -> None:
        while (first := self._queue.get()) is not None:
            batch = [first]
            deadline = self.batch_wait
            while len(batch) < MAX_BATCH:
                try:
                    item = (
                        self._queue.get(timeout=deadline) if deadline else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            try:
                receipts = self._commit([body for body, _ in batch])
            except BaseException as exc:  # every waiter learns of the failure
                for _, future in batch:
                    future.set_exception(UnavailableError(f"the transparency log failed: {exc}"))
                continue
            for (_, future), receipt in zip(batch, receipts, strict=True):
                future.set_result(receipt)

    def _commit(self, bodies: list[bytes]) -> list[Receipt]:
        leaf_hashes = [merkle.leaf_hash(body) for body in bodies]
        with self.db.writing() as connection:
            frontier = connection.execute(
                select(LogHead.frontier).where(LogHead.id == 1).with_for_update()
            ).scalar_one()
            state = merkle.TreeState.from_bytes(frontier)
            first = state.size
            new_state, nodes = merkle.append(state, leaf_hashes)
            connection.execute(
                insert(LogLeaf),
                [
                    {"index": first + i, "kind": json.loads(body)["kind"], "body": body}
                    for i, body in enumerate(bodies)
                ],
            )
            connection.execute(
                insert(LogNode), [{"level": lv, "index": ix, "hash": h} for lv, ix, h in nodes]
            )
            connection.execute(
                update(LogHead)
                .where(LogHead.id == 1)
                .values(
                    size=new_state.size,
                    frontier=new_state.to_bytes(),
                    root=merkle.root(new_state),
                )
            )
        return [Receipt(first + i, leaf) for i, leaf in enumerate(leaf_hashes)]

    def _ensure_head(self) -> None:
        with self.db.session() as session:
            if session.get(LogHead, 1) is None:
                empty = merkle.TreeState(size=0, frontier=())
                session.add(
                    LogHead(id=1, size=0, frontier=empty.to_bytes(), root=merkle.root(empty))
                )

    # -- reading -------------------------------------------------------------------

    def head(self) -> tuple[int, bytes]:
        with self.db.engine.connect() as connection:
            row = connection.execute(
                select(LogHead.size, LogHead.root).where(LogHead.id == 1)
            ).one()
        return int(row.size), bytes(row.root)

    def checkpoint(self) -> bytes:
        size, root = self.head()
        return sign_checkpoint(Checkpoint(origin=self.origin, size=size, root=root), self.signer)

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
