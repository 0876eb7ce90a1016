"""Token revocations at the gateway: checked beside the whoami cache, learnt every second.

The gateway caches who a token belongs to (control_link.py, WHOAMI_TTL), so
most calls never reach the control plane; a token revoked there would stay
good here until its cache entry ran out. So the gateway asks for the
revocations after the last one it knows (`GET /v1/auth/revocations?since=N`)
every `interval` seconds, and every call's caller, cached or not, is checked
against them in memory (a dict look-up; the hot path gains no round trip).
A revoked token is refused until it expires, and a gateway started later
never learns the token is good: the control plane refuses it at whoami.

Fail closed: when no answer came for `max_age` seconds (the control plane
is away, or answers no revocation list) the cache is not trusted, and each
call's token is asked about afresh; a control plane that does not answer
then means a denial, as for any uncached token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from trustplane.errors import AuthError, TrustplaneError
from trustplane.gateway.control_link import Caller, ControlLink

log = logging.getLogger("trustplane.gateway")
INTERVAL = 1.0
MAX_AGE = 2.0
_WARN_EVERY = 30.0


@dataclass(frozen=True)
class _Row:
    subject: str
    token_id: str | None
    issued_before: float | None
    expires: float


class RevocationWatch:
    def __init__(
        self, link: ControlLink, interval: float = INTERVAL, max_age: float = MAX_AGE
    ) -> None:
        self.link = link
        self.interval = interval
        self.max_age = max_age
        self.epoch = 0
        self._rows: dict[int, _Row] = {}
        self._tokens: dict[str, _Row] = {}
        self._subjects: dict[str, list[_Row]] = {}
        self._fresh_at = float("-inf")
        """time.monotonic() when the last answered question was sent."""
        self._warned = float("-inf")
        self._task: asyncio.Task[None] | None = None

    def fresh(self) -> bool:
        """Does the list reflect the control plane of at most `max_age` seconds ago?"""
        return time.monotonic() - self._fresh_at <= self.max_age

    def check(self, caller: Caller) -> None:
        """AuthError when the caller's token is revoked."""
        row = self._tokens.get(caller.token_id) if caller.token_id else None
        if row is not None and row.subject == caller.subject:
            raise AuthError("trustplane gateway: the access token was revoked")
        for row in self._subjects.get(caller.subject, ()):
            if row.issued_before is not None and caller.issued_at <= row.issued_before:
                raise AuthError("trustplane gateway: the access token was revoked")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def poll(self) -> None:
        """Ask once; TrustplaneError when the control plane does not answer well."""
        sent = time.monotonic()
        answer = await self.link.revocations(self.epoch)
        rows = {
            r.id: _Row(r.subject, r.token_id, r.issued_before, r.expires)
            for r in answer.revocations
        }
        self._merge(rows, answer.epoch)
        self._fresh_at = sent

    def _merge(self, rows: dict[int, _Row], epoch: int) -> None:
        now = time.time()
        changed = False
        for identifier, row in rows.items():
            if identifier not in self._rows and row.expires >= now:
                self._rows[identifier] = row
                changed = True
        expired = [i for i, row in self._rows.items() if row.expires < now]
        for identifier in expired:
            del self._rows[identifier]
        if changed or expired:
            # Rebuilt whole and swapped in: check() never sees a half-built index.
            tokens: dict[str, _Row] = {}
            subjects: dict[str, list[_Row]] = {}
            for row in self._rows.values():
                if row.token_id is not None:
                    tokens[row.token_id] = row
                else:
                    subjects.setdefault(row.subject, []).append(row)
            self._tokens, self._subjects = tokens, subjects
        self.epoch = max(self.epoch, epoch)

    async def _run(self) -> None:
        while True:
            try:
                await self.poll()
            except TrustplaneError as exc:
                self._warn(str(exc))
            except Exception as exc:  # the next poll retries; stale means fail closed
                self._warn(type(exc).__name__)
            await asyncio.sleep(self.interval)

    def _warn(self, why: str) -> None:
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY:
            self._warned = now
            log.warning(
                "gateway: no revocation list from the control plane (%s); every token is "
                "asked about afresh until it answers",
                why,
            )
