"""Revoked access tokens, known to every replica and to every gateway within seconds.

Tokens are signed JWTs that stay valid until they expire; a revocation is a
row: one token (its `jti`), or every token a subject was issued up to a
time (`iat` at or before it; `iat` has whole seconds, so a token issued in
the very second of the revocation is revoked too). Each replica keeps the
live rows in memory and checks every verified token against them (a dict
look-up, no query), and reads the rows added by other replicas every
REFRESH seconds. Gateways, which cache who a token belongs to, ask for the
rows after the last one they know (`GET /v1/auth/revocations?since=N`,
answered from memory). Rows go when every token they name has expired.

Ids are handed out by the database, and with several replicas on
PostgreSQL a smaller id can commit after a larger one was read. So rows
created in the last LATE seconds are read again whatever their id, and
rows learnt in the last LATE seconds are sent to gateways whatever their
`since`; both sides keep rows by id, so a row seen twice counts once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, or_, select

from trustplane.control.db import Database
from trustplane.control.identity import Principal
from trustplane.control.models import Revocation
from trustplane.errors import AuthError

REFRESH = 0.5
"""Seconds between reads of the rows other replicas added."""
MAX_TOKEN_LIFETIME = 86400
"""The longest token_ttl_seconds allows: a subject's revocation is kept this long."""
PRUNE_EVERY = 300.0
LATE = 30.0
"""Seconds within which a row may commit after a row with a larger id."""


@dataclass(frozen=True)
class Revoked:
    id: int
    subject: str
    token_id: str | None
    issued_before: float | None
    expires: float
    learnt: float = 0.0
    """time.monotonic() when this replica read it."""

    def names(self, principal: Principal) -> bool:
        if principal.subject != self.subject:
            return False
        if self.token_id is not None:
            return principal.token_id == self.token_id
        return self.issued_before is not None and principal.issued_at <= self.issued_before

    def document(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "subject": self.subject,
            "token_id": self.token_id,
            "issued_before": self.issued_before,
            "expires": self.expires,
        }


class Revocations:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.epoch = 0
        """The id of the last revocation read."""
        self._tokens: dict[str, Revoked] = {}
        self._subjects: dict[str, list[Revoked]] = {}
        self._ordered: list[Revoked] = []
        self._known: set[int] = set()
        self._lock = threading.Lock()
        self._pruned = 0.0

    def check(self, principal: Principal) -> None:
        """AuthError when this (verified) token was revoked."""
        revoked = self._tokens.get(principal.token_id) if principal.token_id else None
        if revoked is not None and revoked.names(principal):
            raise AuthError("the access token was revoked")
        for row in self._subjects.get(principal.subject, ()):
            if row.names(principal):
                raise AuthError("the access token was revoked")

    def revoke_token(self, principal: Principal, expires: float, revoker: str) -> int:
        """Revoke one verified token; the revocation's id."""
        return self._add(
            Revocation(
                subject=principal.subject,
                token_id=principal.token_id,
                issued_before=None,
                expires=expires,
                revoker=revoker,
            )
        )

    def revoke_subject(self, subject: str, revoker: str) -> int:
        """Revoke every token `subject` was issued until now; the revocation's id."""
        now = time.time()
        return self._add(
            Revocation(
                subject=subject,
                token_id=None,
                issued_before=now,
                expires=now + MAX_TOKEN_LIFETIME,
                revoker=revoker,
            )
        )

    def since(self, epoch: int) -> dict[str, Any]:
        """The live revocations after `epoch`, and the epoch they bring the asker to."""
        recent = time.monotonic() - LATE
        with self._lock:
            current = self.epoch
            rows = [
                row.document() for row in self._ordered if row.id > epoch or row.learnt > recent
            ]
        return {"epoch": current, "revocations": rows}

    def refresh(self) -> None:
        """Read the revocations added since the last read (by any replica); drop expired ones."""
        now = time.time()
        late = datetime.now(UTC) - timedelta(seconds=LATE)
        with self.db.session() as session:
            rows = session.scalars(
                select(Revocation)
                .where(or_(Revocation.id > self.epoch, Revocation.created >= late))
                .order_by(Revocation.id)
            ).all()
            if now - self._pruned > PRUNE_EVERY:
                session.execute(delete(Revocation).where(Revocation.expires < now))
                self._pruned = now
        learnt = time.monotonic()
        with self._lock:
            for row in rows:
                if int(row.id) in self._known or row.expires < now:
                    continue  # read before (by another refresh), or over
                revoked = Revoked(
                    int(row.id),
                    row.subject,
                    row.token_id,
                    row.issued_before,
                    float(row.expires),
                    learnt,
                )
                self._known.add(revoked.id)
                self._ordered.append(revoked)
                if revoked.token_id is not None:
                    self._tokens[revoked.token_id] = revoked
                else:
                    self._subjects.setdefault(revoked.subject, []).append(revoked)
                self.epoch = max(self.epoch, revoked.id)
            if any(row.expires < now for row in self._ordered):
                self._ordered = [row for row in self._ordered if row.expires >= now]
                self._known = {row.id for row in self._ordered}
                self._tokens = {k: r for k, r in self._tokens.items() if r.expires >= now}
                self._subjects = {
                    subject: live
                    for subject, rows_of in self._subjects.items()
                    if (live := [r for r in rows_of if r.expires >= now])
                }

    def _add(self, row: Revocation) -> int:
        with self.db.session() as session:
            session.add(row)
            session.flush()
            identifier = int(row.id)
        self.refresh()  # in force on this replica at once
        return identifier
