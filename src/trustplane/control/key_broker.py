"""The ocicrypt layer-key broker: KMS-held recipients, and unwrap behind the policy and attestation.

A publisher encrypts layers for a recipient whose private key never leaves
the KMS (`--recipient kms:NAME`; the key is a system secret of the secret
store). `unwrap` takes a layer's JWE annotation, opens it with a KMS key,
learns from the plain layer digest inside which registered image and layer
it opens (image_inventory.py, never the caller's word), asks the policy
whether the caller may have that layer (tiers) and, when the rule says so,
the attestation gate; it answers with the private options re-encrypted to
the caller's transport key. Every answer is logged before it is given.
"""

from __future__ import annotations

import base64
import threading
from typing import Any

import anyio.to_thread
from sqlalchemy import select

from trustplane.api.kms import UnwrapResponse
from trustplane.control.db import Database
from trustplane.control.identity import Principal
from trustplane.control.image_inventory import ImageInventory
from trustplane.control.models import Recipient
from trustplane.control.release import Authorize, Gate, Release, Uncached
from trustplane.control.transparency import TransparencyLog
from trustplane.crypto import keywrap
from trustplane.crypto.keys import (
    KeyType,
    RecipientKey,
    UnwrapKey,
    generate_key_pair,
    load_recipient_key,
    load_unwrap_key,
)
from trustplane.crypto.layer_cipher import PrivateOptions
from trustplane.errors import (
    DecryptionKeyError,
    Forbidden,
    IntegrityError,
    MalformedError,
    NotFoundError,
    UsageError,
)
from trustplane.keys.secret_store import SecretStore

MAX_CACHED_TRANSPORT_KEYS = 4096


class KeyBroker:
    def __init__(
        self,
        db: Database,
        store: SecretStore,
        inventory: ImageInventory,
        log: TransparencyLog,
        authorize: Authorize,
        gate: Gate,
    ) -> None:
        self.db = db
        self.store = store
        self.inventory = inventory
        self.log = log
        self.authorize = authorize
        self.gate = gate
        self._recipient_keys: dict[str, UnwrapKey] = {}
        self._transport_keys: dict[str, RecipientKey] = {}
        self._lock = threading.Lock()

    # -- recipients ------------------------------------------------------------------

    def create_recipient(self, principal: Principal, name: str, key_type: KeyType) -> Recipient:
        private_pem, public_pem = generate_key_pair(key_type)
        public = load_recipient_key(public_pem, name)
        secret = self.store.create(
            principal,
            name=f"recipient:{name}",
            secret_type="private",  # noqa: S106 - a kind of secret
            payload=private_pem,
            algorithm=key_type,
            system=True,
        )
        row = Recipient(
            name=name, key_id=public.kid, public_key=public_pem.decode(), secret_id=secret.id
        )
        with self.db.write_session() as session:
            if session.get(Recipient, name) is not None:
                raise UsageError(f"recipient {name!r} exists already")
            session.add(row)
        self.log.append(
            "kms.recipient", {"subject": principal.subject, "name": name, "kid": public.kid}
        )
        return row

    def recipient(self, name: str) -> Recipient:
        with self.db.session() as session:
            row = session.get(Recipient, name)
        if row is None:
            raise NotFoundError(f"recipient {name!r} does not exist")
        return row

    # -- unwrap ------------------------------------------------------------------------

    def unwrap(self, principal: Principal, annotation: str, transport_pem: str) -> UnwrapResponse:
        """Open a layer's key wrapping for an authorized caller, re-wrapped to it."""
        release = self._release(principal, annotation, transport_pem, database=True)
        self.log.append(release.kind, release.entry)
        return release.result()

    async def unwrap_async(
        self, principal: Principal, annotation: str, transport_pem: str
    ) -> UnwrapResponse:
        """`unwrap` for the event loop. With the recipient keys and the layer
        already known (cached) it needs no database read and runs on the loop;
        otherwise the lookup goes to a worker thread. The log commit is awaited."""
        try:
            release = self._release(principal, annotation, transport_pem, database=False)
        except Uncached:
            release = await anyio.to_thread.run_sync(
                self._release, principal, annotation, transport_pem, True
            )
        await self.log.append_async(release.kind, release.entry)
        return release.result()

    def _release(
        self, principal: Principal, annotation: str, transport_pem: str, database: bool
    ) -> Release[UnwrapResponse]:
        """Everything up to the log entry; `database=False` raises `Uncached`
        where a database read would be needed."""
        transport = self._transport_key(transport_pem)
        payload = self._open_annotation(annotation, database)
        options = PrivateOptions.from_json(payload)
        place = self.inventory.layer_place(options.digest, database)
        if place is None:
            return Release(
                "kms.unwrap",
                _unwrap_entry(principal, None, None, False, "layer of no registered image"),
                None,
                Forbidden("this layer belongs to no registered image"),
            )
        repository, index = place
        decision = self.authorize(principal, "key.release", f"image:{repository}", index)
        if decision.allowed and decision.require_attestation and not database:
            raise Uncached  # the attested state is read from the database
        decision = self.gate(decision, principal, repository, index, transport_pem)
        entry = _unwrap_entry(principal, repository, index, decision.allowed, decision.reason)
        if not decision.allowed:
            return Release(
                "kms.unwrap",
                entry,
                None,
                Forbidden(f"policy refuses layer {index} of {repository}: {decision.reason}"),
            )
        wrapped = keywrap.wrap(payload, [transport])
        return Release(
            "kms.unwrap", entry, UnwrapResponse(jwe=wrapped, repository=repository, layer=index)
        )

    def _open_annotation(self, annotation: str, database: bool) -> bytes:
        """The private options inside a layer's annotation, opened with a KMS key.

        The keys already unsealed are tried first, without the database.
        Only when none of them opens the annotation (a recipient created
        since, possibly by another replica, or a failure to report) does the
        full pass run: every recipient re-read, every key tried, and its
        answer or error is the one given. Recipients are never removed.
        """
        with self._lock:
            cached = list(self._recipient_keys.values())
        if cached:
            try:
                payload = _open_with(annotation, cached)
            except (MalformedError, IntegrityError):
                payload = None  # the full pass reports it
            if payload is not None:
                return payload
        if not database:
            raise Uncached
        keys = self._all_recipient_keys()
        if not keys:
            raise DecryptionKeyError("the KMS holds no recipient keys")
        payload = _open_with(annotation, keys)
        if payload is not None:
            return payload
        raise DecryptionKeyError("no recipient key held by the KMS can open this layer")

    def _all_recipient_keys(self) -> list[UnwrapKey]:
        """Unsealed recipient keys, kept in memory: unsealing per request would
        put a KEK unwrap on the hot path for nothing."""
        with self.db.session() as session:
            rows = session.execute(select(Recipient.name, Recipient.secret_id)).all()
        with self._lock:
            missing = [(n, s) for n, s in rows if n not in self._recipient_keys]
        for name, secret_id in missing:
            key = load_unwrap_key(self.store.system_payload(secret_id), f"recipient {name}")
            with self._lock:
                self._recipient_keys[name] = key
        with self._lock:
            return list(self._recipient_keys.values())

    def _transport_key(self, pem: str) -> RecipientKey:
        with self._lock:
            cached = self._transport_keys.get(pem)
        if cached is not None:
            return cached
        key = load_recipient_key(pem.encode(), "transport key")
        with self._lock:
            if len(self._transport_keys) >= MAX_CACHED_TRANSPORT_KEYS:
                self._transport_keys.clear()
            self._transport_keys[pem] = key
        return key


def _open_with(annotation: str, keys: list[UnwrapKey]) -> bytes | None:
    for token in annotation.split(","):
        try:
            serialized = base64.b64decode(token, validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            raise MalformedError("the annotation is not base64 JWE") from None
        payload = keywrap.unwrap(serialized, keys, "layer key wrapping")
        if payload is not None:
            return payload
    return None


def _unwrap_entry(
    principal: Principal, repository: str | None, layer: int | None, ok: bool, why: str
) -> dict[str, Any]:
    return {
        "subject": principal.subject,
        "image": repository,
        "layer": layer,
        "decision": "allow" if ok else "deny",
        "reason": why,
    }
