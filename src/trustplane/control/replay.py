"""Each single-use value is accepted once, by any replica."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError as DuplicateRow

from trustplane.control.db import Database
from trustplane.control.models import UsedNonce
from trustplane.errors import AuthError


class ReplayGuard:
    def __init__(self, db: Database) -> None:
        self.db = db

    def claim(self, key: str, ttl_seconds: int = 600) -> None:
        """Record `key`; AuthError if it was seen before (a replay)."""
        now = datetime.now(UTC)
        try:
            with self.db.session() as session:
                session.execute(delete(UsedNonce).where(UsedNonce.expires < now))
                session.add(UsedNonce(key=key, expires=now + timedelta(seconds=ttl_seconds)))
        except DuplicateRow:
            raise AuthError("this assertion was used before (replay refused)") from None
