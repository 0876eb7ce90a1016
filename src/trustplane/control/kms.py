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
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update

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
    MalformedError,
    NotFoundError,
    TrustplaneError,
    UsageError,
)
from trustplane.keys.envelope import SealedSecret, open_sealed, rewrap, seal
from trustplane.keys.kek import KekProvider

Authorize = Callable[[Principal, str, str, int | None], Decision]
SECRET_TYPES = ("symmetric", "opaque", "private", "passphrase")
MAX_PAYLOAD = 64 << 10


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
        self._recipient_keys: dict[str, UnwrapKey] = {}
        self._transport_keys: dict[str, RecipientKey] = {}
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
        resource = f"secret:{secret_id}"
        with self.db.session() as session:
            row = session.get(Secret, secret_id)
        if row is None or row.system:
            self._record(principal, resource, False, "no such secret")
            raise NotFoundError(f"secret {secret_id} does not exist")
        if not _acl_allows(row, principal):
            self._record(principal, resource, False, "not on the secret's ACL")
            raise Forbidden(f"{principal.subject} is not on the ACL of secret {secret_id}")
        decision = self.authorize(principal, "key.release", resource, None)
        self._record(principal, resource, decision.allowed, decision.reason)
        if not decision.allowed:
            raise Forbidden(f"policy refuses key.release of {resource}: {decision.reason}")
        return open_sealed(secret_id, _sealed(row), self.kek)

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
        return open_sealed(secret_id, _sealed(row), self.kek)

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

    def _record(self, principal: Principal, resource: str, allowed: bool, reason: str) -> None:
        self.log.append(
            "kms.release",
            {
                "subject": principal.subject,
                "resource": resource,
                "decision": "allow" if allowed else "deny",
                "reason": reason,
            },
        )

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
        with self.db.session() as session:
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
        transport = self._transport_key(transport_pem)
        payload = self._open_annotation(annotation)
        options = PrivateOptions.from_json(payload)
        with self.db.session() as session:
            place = session.execute(
                select(LayerDigest.repository, LayerDigest.layer_index).where(
                    LayerDigest.digest == options.digest
                )
            ).first()
        if place is None:
            self._record_unwrap(principal, None, None, False, "layer of no registered image")
            raise Forbidden("this layer belongs to no registered image")
        repository, index = str(place[0]), int(place[1])
        decision = self.authorize(principal, "key.release", f"image:{repository}", index)
        self._record_unwrap(principal, repository, index, decision.allowed, decision.reason)
        if not decision.allowed:
            raise Forbidden(f"policy refuses layer {index} of {repository}: {decision.reason}")
        wrapped = keywrap.wrap(payload, [transport])
        return {"jwe": wrapped, "repository": repository, "layer": index}

    def _open_annotation(self, annotation: str) -> bytes:
        keys = self._all_recipient_keys()
        if not keys:
            raise DecryptionKeyError("the KMS holds no recipient keys")
        for token in annotation.split(","):
            try:
                serialized = base64.b64decode(token, validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                raise MalformedError("the annotation is not base64 JWE") from None
            payload = keywrap.unwrap(serialized, keys, "layer key wrapping")
            if payload is not None:
                return payload
        raise DecryptionKeyError("no recipient key held by the KMS can open this layer")

    def _all_recipient_keys(self) -> list[UnwrapKey]:
        """Unsealed recipient keys, kept in memory: unsealing per request would
        put a KEK unwrap on the hot path for nothing."""
        with self.db.session() as session:
            rows = session.execute(select(Recipient.name, Recipient.secret_id)).all()
        missing = [(n, s) for n, s in rows if n not in self._recipient_keys]
        for name, secret_id in missing:
            key = load_unwrap_key(self.system_payload(secret_id), f"recipient {name}")
            with self._lock:
                self._recipient_keys[name] = key
        return list(self._recipient_keys.values())

    def _transport_key(self, pem: str) -> RecipientKey:
        with self._lock:
            cached = self._transport_keys.get(pem)
        if cached is not None:
            return cached
        key = load_recipient_key(pem.encode(), "transport key")
        with self._lock:
            if len(self._transport_keys) > 4096:
                self._transport_keys.clear()
            self._transport_keys[pem] = key
        return key

    def _record_unwrap(
        self, principal: Principal, repository: str | None, layer: int | None, ok: bool, why: str
    ) -> None:
        self.log.append(
            "kms.unwrap",
            {
                "subject": principal.subject,
                "image": repository,
                "layer": layer,
                "decision": "allow" if ok else "deny",
                "reason": why,
            },
        )

    # -- images ---------------------------------------------------------------------------

    def register_image(
        self,
        principal: Principal,
        repository: str,
        manifest_digest: str,
        layers: list[dict[str, Any]],
    ) -> int:
        decision = self.authorize(principal, "image.publish", f"image:{repository}", None)
        if not decision.allowed:
            raise Forbidden(f"policy refuses image.publish of {repository}: {decision.reason}")
        with self.db.session() as session:
            existing = session.scalar(
                select(Image).where(
                    Image.repository == repository, Image.manifest_digest == manifest_digest
                )
            )
            if existing is None:
                session.add(
                    Image(
                        repository=repository,
                        manifest_digest=manifest_digest,
                        layers=layers,
                        publisher=principal.subject,
                    )
                )
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
            },
        )
        return receipt.index


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
