"""The nonces of the MQTT commands a gateway accepted, kept on disk until they expire.

A signed command can be recorded off the wire and published again; the
gateway refuses a nonce it has accepted before. Kept in memory only, that
record ended with the process, and replay protection across a restart
rested on comparing the command's issue time with the gateway's start,
that is on two clocks agreeing (commands dated up to CLOCK_SKEW seconds in
the future are accepted). On disk, a replay is refused whatever the clocks
say, for as long as the command itself is valid.

The file is JSON, `{"version": 1, "floor": T|null, "nonces": {NONCE: EXPIRES}}`,
replaced atomically (temporary file, fsync, rename) *before* the command
runs: a crash after the claim leaves the command refused, never executed
twice. Entries go when their command expires (a command past its expiry is
refused by its envelope anyway); at most `limit` live entries are kept, and
a command beyond that is refused rather than forgotten.

Without a record (the first start, or a file that does not parse) nothing
is known of what earlier runs accepted: commands issued before that start
(the `floor`) are refused, and the floor stays in the record, across
restarts, until every command issued before it has expired.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from trustplane.atomic import atomic_write
from trustplane.crypto.command_envelope import MAX_TTL
from trustplane.errors import IntegrityError, UnavailableError

log = logging.getLogger("trustplane.gateway")
MAX_NONCES = 10_000
VERSION = 1


class NonceStore:
    def __init__(self, path: Path, limit: int = MAX_NONCES) -> None:
        self.path = path
        self.limit = limit
        self._nonces: dict[str, float] = {}
        self.floor: float | None = None
        """Commands issued before this are refused: what was accepted before is not on record."""

    def load(self, now: float) -> None:
        """Read the record of earlier runs; without one, start a floor at `now`."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            document = json.loads(self.path.read_bytes())
            if document.get("version") != VERSION or not isinstance(document["nonces"], dict):
                raise TypeError
            nonces = {str(n): float(e) for n, e in document["nonces"].items()}
            floor = None if document.get("floor") is None else float(document["floor"])
        except FileNotFoundError:
            log.info("mqtt: no nonce record at %s yet: commands issued before now are refused",
                     self.path)  # fmt: skip
            self.floor = now
            return
        except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
            log.warning(
                "mqtt: the nonce record %s is unreadable (%s): commands issued before now are "
                "refused",
                self.path,
                type(exc).__name__,
            )
            self.floor = now
            return
        self._nonces = {nonce: expires for nonce, expires in nonces.items() if expires >= now}
        self.floor = floor if floor is not None and floor + MAX_TTL >= now else None

    def __contains__(self, nonce: str) -> bool:
        return nonce in self._nonces

    def __len__(self) -> int:
        return len(self._nonces)

    def claim(self, nonce: str, issued: float, expires: float, now: float) -> None:
        """Record a command as accepted, on disk, or raise why it must not run.

        IntegrityError: replayed, issued before the record began, or too many
        live commands; UnavailableError: the record cannot be written.
        """
        if nonce in self._nonces:
            raise IntegrityError("the command was replayed (its nonce was seen before)")
        if self.floor is not None and issued < self.floor:
            raise IntegrityError(
                "the command was issued before this gateway's nonce record began "
                "(a replay cannot be ruled out)"
            )
        live = {n: e for n, e in self._nonces.items() if e >= now}
        if len(live) >= self.limit:
            raise IntegrityError("too many live commands; refused")
        live[nonce] = expires
        floor = self.floor if self.floor is not None and self.floor + MAX_TTL >= now else None
        document = {"version": VERSION, "floor": floor, "nonces": live}
        try:
            atomic_write(self.path, json.dumps(document, separators=(",", ":")).encode(), 0o600)
        except OSError as exc:
            # Unrecorded, it could be replayed after a restart: it does not run.
            raise UnavailableError(
                f"the nonce record {self.path} cannot be written ({os.strerror(exc.errno or 0)})"
            ) from None
        self._nonces, self.floor = live, floor
