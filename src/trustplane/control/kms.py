"""The KMS, shaped like OpenStack Barbican: secrets by reference, sealed at rest.

A caller stores or generates a secret and keeps only its reference
(`…/v1/secrets/<uuid>`). The payload is sealed with envelope encryption
(keys/envelope.py) and released only to a principal that both the secret's
ACL (its creator and named readers) and the policy (`key.release` on
`secret:<uuid>`) allow; every release and every refusal goes to the log.

The KMS also holds ocicrypt recipient key pairs whose private half never
leaves it: `unwrap` takes a layer's JWE annotation, learns from the layer
digest inside which image and layer it opens, asks the policy whether the
caller may have that layer (tiers), and answers with the private options
re-encrypted to the caller's transport key.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

import anyio.to_thread
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from trustplane.control import reference_files
from trustplane.control.db import Database
from trustplane.control.identity import Principal
from trustplane.control.models import Image, LayerDigest, Recipient, Secret
from trustplane.control.policy import Decision
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
    TrustplaneError,
    UnavailableError,
    UsageError,
)
from trustplane.keys.envelope import SealedSecret, open_sealed, rewrap, seal
from trustplane.keys.kek import KekProvider

Authorize = Callable[[Principal, str, str, int | None], Decision]
AttestationGate = Callable[[Principal, str | None, int | None, str | None], Decision]
"""(caller, image repository, layer index, transport key PEM) -> may it have keys?"""
logger = logging.getLogger("trustplane.kms")
SECRET_TYPES = ("symmetric", "opaque", "private", "passphrase")
MAX_PAYLOAD = 64 << 10
_MAX_CACHED = 4096
T = TypeVar("T")


class _Uncached(Exception):
    """The answer needs a database read (raised only when none may be made)."""


@dataclass(frozen=True)
class _Release(Generic[T]):
    """A KMS decision before it is logged: the log entry, then either what
    the caller gets or the error it gets (raised only after the entry is
    committed, so a refusal is as durable as a release)."""

    kind: str
    entry: dict[str, Any]
    value: T | None
    error: Exception | None = None

    def result(self) -> T:
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value


@dataclass(frozen=True)
class SecretMetadata:
    id: str
    name: str | None
    secret_type: str
    algorithm: str | None
    bit_length: int | None
    creator: str
    created: datetime
    readers: list[str]
    kek_id: str


class Kms:
    def __init__(
        self, db: Database, kek: KekProvider, log: TransparencyLog, authorize: Authorize
    ) -> None:
        self.db = db
        self.kek = kek
        self.log = log
        self.authorize = authorize
        self.attestation: AttestationGate | None = None
        """Set by the control plane: asked when an allowing rule requires attestation."""
        self._recipient_keys: dict[str, UnwrapKey] = {}
        self._transport_keys: dict[str, RecipientKey] = {}
        self._layer_places: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()

    # -- secrets -------------------------------------------------------------------

    def create(
        self,
        principal: Principal,
        *,
        name: str | None,
        secret_type: str,
        payload: bytes | None,
        algorithm: str | None,
        bit_length: int | None,
        readers: list[str],
        system: bool = False,
    ) -> SecretMetadata:
        if secret_type not in SECRET_TYPES:
            raise UsageError(f"secret_type must be one of {', '.join(SECRET_TYPES)}")
        if payload is None:
            if secret_type != "symmetric" or algorithm not in (None, "aes"):  # noqa: S105
                raise UsageError("only symmetric AES keys can be generated; give a payload")
            bits = bit_length or 256
            if bits not in (128, 192, 256):
                raise UsageError("bit_length must be 128, 192 or 256")
            payload, algorithm, bit_length = os.urandom(bits // 8), "aes", bits
        if not payload or len(payload) > MAX_PAYLOAD:
            raise UsageError(f"a payload must hold 1 to {MAX_PAYLOAD} bytes")
        secret_id = str(uuid.uuid4())
        sealed = seal(secret_id, payload, self.kek)
        row = Secret(
            id=secret_id,
            name=name,
            secret_type=secret_type,
            algorithm=algorithm,
            bit_length=bit_length,
            creator=principal.subject,
            ciphertext=sealed.ciphertext,
            wrapped_key=sealed.wrapped_key,
            kek_id=sealed.kek_id,
            readers=readers,
            system=system,
        )
        with self.db.session() as session:
            session.add(row)
        if not system:
            self.log.append(
                "kms.store",
                {"subject": principal.subject, "secret": secret_id, "type": secret_type},
            )
        return _metadata(row)

    def metadata(self, principal: Principal, secret_id: str) -> SecretMetadata:
        row = self._visible(principal, secret_id)
        return _metadata(row)

    def payload(self, principal: Principal, secret_id: str) -> bytes:
        """Release a payload: ACL and policy must both agree; logged either way."""
        release = self._payload_release(principal, secret_id)
        self.log.append(release.kind, release.entry)
        return release.result()

    async def payload_async(self, principal: Principal, secret_id: str) -> bytes:
        """`payload` for the event loop: the database read and the unsealing in
        one worker thread, the log commit awaited."""
        release = await anyio.to_thread.run_sync(self._payload_release, principal, secret_id)
        await self.log.append_async(release.kind, release.entry)
        return release.result()

    def _payload_release(self, principal: Principal, secret_id: str) -> _Release[bytes]:
        """The decision and its log entry; the payload is unsealed only when
        allowed, and handed out only after the entry is committed."""
        resource = f"secret:{secret_id}"
        with self.db.session() as session:
            row = session.get(Secret, secret_id)
        if row is None or row.system:
            return self._release_record(
                principal,
                resource,
                "no such secret",
                NotFoundError(f"secret {secret_id} does not exist"),
            )
        if not _acl_allows(row, principal):
            return self._release_record(
                principal,
                resource,
                "not on the secret's ACL",
                Forbidden(f"{principal.subject} is not on the ACL of secret {secret_id}"),
            )
        decision = self._attested(
            self.authorize(principal, "key.release", resource, None), principal, None, None, None
        )
        if not decision.allowed:
            return self._release_record(
                principal,
                resource,
                decision.reason,
                Forbidden(f"policy refuses key.release of {resource}: {decision.reason}"),
            )
        try:
            payload = self._open(row)
        except UnavailableError as exc:
            # Allowed, but nothing released: the log says so rather than "allow".
            entry = _release_entry(principal, resource, True, decision.reason)
            entry.update(decision="error", reason=f"{decision.reason}; not released: {exc}")
            return _Release("kms.release", entry, None, exc)
        return _Release(
            "kms.release", _release_entry(principal, resource, True, decision.reason), payload
        )

    def _release_record(
        self,
        principal: Principal,
        resource: str,
        reason: str,
        error: Exception,
        allowed: bool = False,
    ) -> _Release[Any]:
        return _Release(
            "kms.release", _release_entry(principal, resource, allowed, reason), None, error
        )

    def delete(self, principal: Principal, secret_id: str) -> None:
        row = self._visible(principal, secret_id)
        if row.creator != principal.subject and principal.role != "admin":
            raise Forbidden(f"only the creator or an admin may delete secret {secret_id}")
        with self.db.session() as session:
            session.execute(delete(Secret).where(Secret.id == secret_id))
        self.log.append("kms.delete", {"subject": principal.subject, "secret": secret_id})

    def system_payload(self, secret_id: str) -> bytes:
        """The server's own keys (token and log signing), never served over the API."""
        with self.db.session() as session:
            row = session.get(Secret, secret_id)
        if row is None:
            raise NotFoundError(f"system secret {secret_id} is missing")
        return self._open(row)

    def _open(self, row: Secret) -> bytes:
        """Unseal a row read a moment ago.

        A rotation may have re-wrapped it and retired the KEK it was read under
        in between (the release is logged before this, which can take a while
        under load): then the stored row names the new KEK, so read it again.

        Any failure to unseal is the KMS's own (its KEK store is down or
        refuses it, or the stored row was altered), never the caller's: it
        becomes UnavailableError (503), so a client does not mistake it for
        "not granted" (403) or "bad token" (401) and quietly go without.
        """
        try:
            try:
                return open_sealed(row.id, _sealed(row), self.kek)
            except DecryptionKeyError:
                with self.db.session() as session:
                    fresh = session.get(Secret, row.id)
                if fresh is None or fresh.kek_id == row.kek_id:
                    raise
                return open_sealed(fresh.id, _sealed(fresh), self.kek)
        except UnavailableError:
            raise
        except TrustplaneError as exc:
            logger.error("cannot unseal secret %s: %s", row.id, type(exc).__name__)
            raise UnavailableError(
                f"the KMS cannot unseal secret {row.id} ({type(exc).__name__}: {exc})"
            ) from None

    def _visible(self, principal: Principal, secret_id: str) -> Secret:
        with self.db.session() as session:
            row = session.get(Secret, secret_id)
        if (
            row is None
            or row.system
            or not (principal.role == "admin" or _acl_allows(row, principal))
        ):
            # Not on the ACL reads as absent: references are not enumerable.
            raise NotFoundError(f"secret {secret_id} does not exist")
        return row

    # -- KEK rotation ----------------------------------------------------------------

    def rotate_kek(self, principal: Principal, batch: int = 200) -> dict[str, Any]:
        """New KEK; every secret's data key re-wrapped under it while serving.

        Old KEKs stay usable until no secret needs them, so requests racing
        the rotation still open what they read. Each pass re-reads which KEK
        is current, and the work list is fixed up front, so a rotation by
        another replica meanwhile cannot make this one chase a moving target;
        a secret that cannot be re-wrapped is reported, not retried forever.
        """
        old = self.kek.current_id()
        new = self.kek.rotate()
        moved, failed = 0, []
        with self.db.session() as session:
            pending = list(session.scalars(select(Secret.id).where(Secret.kek_id != new)))
        for start in range(0, len(pending), batch):
            current = self.kek.current_id()
            with self.db.session() as session:
                rows = session.scalars(
                    select(Secret).where(
                        Secret.id.in_(pending[start : start + batch]), Secret.kek_id != current
                    )
                ).all()
            for row in rows:
                try:
                    fresh = rewrap(row.id, _sealed(row), self.kek)
                except TrustplaneError:
                    failed.append(row.id)
                    continue
                with self.db.session() as session:
                    done = session.execute(
                        update(Secret)
                        .where(Secret.id == row.id, Secret.kek_id == row.kek_id)
                        .values(wrapped_key=fresh.wrapped_key, kek_id=fresh.kek_id)
                    )
                    moved += done.rowcount  # type: ignore[attr-defined]
        with self.db.session() as session:
            in_use = set(session.scalars(select(Secret.kek_id).distinct()))
        retired = []
        for kek_id in set(self.kek.known_ids()) - in_use - {self.kek.current_id()}:
            self.kek.retire(kek_id)
            retired.append(kek_id)
        self.log.append(
            "kms.rotate",
            {
                "subject": principal.subject,
                "old": old,
                "new": new,
                "rewrapped": moved,
                "failed": failed,
            },
        )
        return {"kek_id": new, "rewrapped": moved, "retired": sorted(retired), "failed": failed}

    # -- image recipients ------------------------------------------------------------

    def create_recipient(self, principal: Principal, name: str, key_type: KeyType) -> Recipient:
        private_pem, public_pem = generate_key_pair(key_type)
        public = load_recipient_key(public_pem, name)
        secret = self.create(
            principal,
            name=f"recipient:{name}",
            secret_type="private",  # noqa: S106 - a kind of secret
            payload=private_pem,
            algorithm=key_type,
            bit_length=None,
            readers=[],
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

    def unwrap(self, principal: Principal, annotation: str, transport_pem: str) -> dict[str, Any]:
        """Open a layer's key wrapping for an authorized caller, re-wrapped to it."""
        release = self._unwrap_release(principal, annotation, transport_pem, database=True)
        self.log.append(release.kind, release.entry)
        return release.result()

    async def unwrap_async(
        self, principal: Principal, annotation: str, transport_pem: str
    ) -> dict[str, Any]:
        """`unwrap` for the event loop. With the recipient keys and the layer
        already known (cached) it needs no database read and runs on the loop;
        otherwise the lookup goes to a worker thread. The log commit is awaited."""
        try:
            release = self._unwrap_release(principal, annotation, transport_pem, database=False)
        except _Uncached:
            release = await anyio.to_thread.run_sync(
                self._unwrap_release, principal, annotation, transport_pem, True
            )
        await self.log.append_async(release.kind, release.entry)
        return release.result()

    def _unwrap_release(
        self, principal: Principal, annotation: str, transport_pem: str, database: bool
    ) -> _Release[dict[str, Any]]:
        """Everything up to the log entry; `database=False` raises `_Uncached`
        where a database read would be needed."""
        transport = self._transport_key(transport_pem)
        payload = self._open_annotation(annotation, database)
        options = PrivateOptions.from_json(payload)
        place = self._layer_place(options.digest, database)
        if place is None:
            return _Release(
                "kms.unwrap",
                _unwrap_entry(principal, None, None, False, "layer of no registered image"),
                None,
                Forbidden("this layer belongs to no registered image"),
            )
        repository, index = place
        decision = self.authorize(principal, "key.release", f"image:{repository}", index)
        if decision.allowed and decision.require_attestation and not database:
            raise _Uncached  # the attested state is read from the database
        decision = self._attested(decision, principal, repository, index, transport_pem)
        entry = _unwrap_entry(principal, repository, index, decision.allowed, decision.reason)
        if not decision.allowed:
            return _Release(
                "kms.unwrap",
                entry,
                None,
                Forbidden(f"policy refuses layer {index} of {repository}: {decision.reason}"),
            )
        wrapped = keywrap.wrap(payload, [transport])
        return _Release(
            "kms.unwrap", entry, {"jwe": wrapped, "repository": repository, "layer": index}
        )

    def _attested(
        self,
        decision: Decision,
        principal: Principal,
        repository: str | None,
        layer: int | None,
        transport_pem: str | None,
    ) -> Decision:
        """An allowing rule that requires attestation allows only what the
        attestation gate allows too; without a gate it denies (fail closed)."""
        if not (decision.allowed and decision.require_attestation):
            return decision
        if self.attestation is None:
            return Decision(False, f"{decision.reason}, but no attestation verifier is configured")
        gate = self.attestation(principal, repository, layer, transport_pem)
        if not gate.allowed:
            return Decision(False, f"{decision.reason}; {gate.reason}")
        return Decision(True, f"{decision.reason}; {gate.reason}")

    def _layer_place(self, digest: str, database: bool) -> tuple[str, int] | None:
        """Which image and index a plain layer digest was registered at.

        Registrations are never changed or removed, so a found place is kept
        in memory (bounded); an unknown digest is asked again every time, as a
        registration may have come in since (on this replica or another). The
        earliest registration of a digest counts, on every replica alike.
        """
        with self._lock:
            cached = self._layer_places.get(digest)
        if cached is not None:
            return cached
        if not database:
            raise _Uncached
        with self.db.session() as session:
            row = session.execute(
                select(LayerDigest.repository, LayerDigest.layer_index)
                .where(LayerDigest.digest == digest)
                .order_by(LayerDigest.id)
                .limit(1)
            ).first()
        if row is None:
            return None
        place = (str(row[0]), int(row[1]))
        with self._lock:
            if len(self._layer_places) >= _MAX_CACHED:
                self._layer_places.clear()
            self._layer_places[digest] = place
        return place

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
                payload = self._open_with(annotation, cached)
            except (MalformedError, IntegrityError):
                payload = None  # the full pass reports it
            if payload is not None:
                return payload
        if not database:
            raise _Uncached
        keys = self._all_recipient_keys()
        if not keys:
            raise DecryptionKeyError("the KMS holds no recipient keys")
        payload = self._open_with(annotation, keys)
        if payload is not None:
            return payload
        raise DecryptionKeyError("no recipient key held by the KMS can open this layer")

    @staticmethod
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

    def _all_recipient_keys(self) -> list[UnwrapKey]:
        """Unsealed recipient keys, kept in memory: unsealing per request would
        put a KEK unwrap on the hot path for nothing."""
        with self.db.session() as session:
            rows = session.execute(select(Recipient.name, Recipient.secret_id)).all()
        with self._lock:
            missing = [(n, s) for n, s in rows if n not in self._recipient_keys]
        for name, secret_id in missing:
            key = load_unwrap_key(self.system_payload(secret_id), f"recipient {name}")
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
            if len(self._transport_keys) >= _MAX_CACHED:
                self._transport_keys.clear()
            self._transport_keys[pem] = key
        return key

    # -- images ---------------------------------------------------------------------------

    def register_image(
        self,
        principal: Principal,
        repository: str,
        manifest_digest: str,
        layers: list[dict[str, Any]],
        files: dict[int, dict[str, str]] | None = None,
    ) -> int:
        """Record an image; `files` (layer index -> file digests) may come with it,
        also for an image registered before, in the same transaction."""
        decision = self.authorize(principal, "image.publish", f"image:{repository}", None)
        if not decision.allowed:
            raise Forbidden(f"policy refuses image.publish of {repository}: {decision.reason}")
        with self.db.write_session() as session:
            existing = session.scalar(
                select(Image).where(
                    Image.repository == repository, Image.manifest_digest == manifest_digest
                )
            )
            if existing is not None and files:
                stored = {int(str(x["index"])): x.get("digest") for x in existing.layers}
                given = {int(x["index"]): x["digest"] for x in layers}
                if any(stored.get(index) != given.get(index) for index in files):
                    raise IntegrityError(
                        f"{repository}@{manifest_digest} is registered with other layers"
                    )
                reference_files.attach(session, existing, files)
            if existing is None:
                _check_layer_claims(session, principal, repository, layers)
                image = Image(
                    repository=repository,
                    manifest_digest=manifest_digest,
                    layers=layers,
                    publisher=principal.subject,
                )
                session.add(image)
                session.flush()
                reference_files.attach(session, image, files or {})
                for layer in layers:
                    session.add(
                        LayerDigest(
                            digest=str(layer["digest"]),
                            repository=repository,
                            layer_index=int(layer["index"]),
                        )
                    )
        receipt = self.log.append(
            "image.register",
            {
                "subject": principal.subject,
                "image": repository,
                "manifest": manifest_digest,
                "layers": [str(layer["digest"]) for layer in layers],
                **(
                    {
                        "files": {
                            str(index): reference_files.map_digest(layer_files)
                            for index, layer_files in sorted(files.items())
                        }
                    }
                    if files
                    else {}
                ),
            },
        )
        return receipt.index


def _check_layer_claims(
    session: Session, principal: Principal, repository: str, layers: list[dict[str, Any]]
) -> None:
    """Refuse an encrypted layer another publisher registered under another image.

    Unwrap learns a layer's image (and so whose policy releases its key) from
    the earliest registration of its plain digest; a publisher who registered
    someone else's layer digest first, under an image of its own, would decide
    who receives that layer's key. Refused loudly rather than silently shadowed.
    """
    encrypted = sorted({str(layer["digest"]) for layer in layers if layer.get("encrypted")})
    if not encrypted:
        return
    claimed = session.execute(
        select(LayerDigest.digest, LayerDigest.repository)
        .join(Image, Image.repository == LayerDigest.repository)
        .where(
            LayerDigest.digest.in_(encrypted),
            LayerDigest.repository != repository,
            Image.publisher != principal.subject,
        )
        .limit(1)
    ).first()
    if claimed is not None:
        raise IntegrityError(
            f"encrypted layer {claimed.digest} is already registered under {claimed.repository} "
            "by another publisher; its key would follow that image's policy"
        )


def _release_entry(
    principal: Principal, resource: str, allowed: bool, reason: str
) -> dict[str, Any]:
    return {
        "subject": principal.subject,
        "resource": resource,
        "decision": "allow" if allowed else "deny",
        "reason": reason,
    }


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


def _acl_allows(row: Secret, principal: Principal) -> bool:
    """The ACL proper: administrators manage secrets but do not read them."""
    return principal.subject in (row.creator, *row.readers)


def _sealed(row: Secret) -> SealedSecret:
    return SealedSecret(ciphertext=row.ciphertext, wrapped_key=row.wrapped_key, kek_id=row.kek_id)


def _metadata(row: Secret) -> SecretMetadata:
    return SecretMetadata(
        id=row.id,
        name=row.name,
        secret_type=row.secret_type,
        algorithm=row.algorithm,
        bit_length=row.bit_length,
        creator=row.creator,
        created=row.created,
        readers=list(row.readers),
        kek_id=row.kek_id,
    )
