"""The KMS's secrets as the control plane serves them: the store's ACL, the policy, the log.

The secret store (keys/secret_store.py) keeps secrets sealed and decides
what its ACL decides. Here a payload is released only to a principal that
both the ACL and the policy (`key.release` on `secret:<uuid>`, with the
attestation gate when the rule asks for it) allow; every release, every
refusal, every store, deletion and KEK rotation goes to the transparency log.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio.to_thread

from trustplane.control.identity import Principal
from trustplane.control.release import Authorize, Gate, Release
from trustplane.control.transparency import TransparencyLog
from trustplane.errors import Forbidden, NotFoundError, UnavailableError
from trustplane.keys.rotation import Rotation, rotate_kek
from trustplane.keys.secret_store import SecretRecord, SecretStore, acl_allows


class Secrets:
    def __init__(
        self, store: SecretStore, log: TransparencyLog, authorize: Authorize, gate: Gate
    ) -> None:
        self.store = store
        self.log = log
        self.authorize = authorize
        self.gate = gate

    def create(
        self,
        principal: Principal,
        *,
        name: str | None,
        secret_type: str,
        payload: bytes | None,
        algorithm: str | None,
        bit_length: int | None,
        readers: Sequence[str],
    ) -> SecretRecord:
        record = self.store.create(
            principal,
            name=name,
            secret_type=secret_type,
            payload=payload,
            algorithm=algorithm,
            bit_length=bit_length,
            readers=readers,
        )
        self.log.append(
            "kms.store", {"subject": principal.subject, "secret": record.id, "type": secret_type}
        )
        return record

    def metadata(self, principal: Principal, secret_id: str) -> SecretRecord:
        return self.store.visible(principal, secret_id)

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

    def _payload_release(self, principal: Principal, secret_id: str) -> Release[bytes]:
        """The decision and its log entry; the payload is unsealed only when
        allowed, and handed out only after the entry is committed."""
        resource = f"secret:{secret_id}"
        record = self.store.find(secret_id)
        if record is None:
            return _refusal(
                principal,
                resource,
                "no such secret",
                NotFoundError(f"secret {secret_id} does not exist"),
            )
        if not acl_allows(record, principal):
            return _refusal(
                principal,
                resource,
                "not on the secret's ACL",
                Forbidden(f"{principal.subject} is not on the ACL of secret {secret_id}"),
            )
        decision = self.gate(
            self.authorize(principal, "key.release", resource, None), principal, None, None, None
        )
        if not decision.allowed:
            return _refusal(
                principal,
                resource,
                decision.reason,
                Forbidden(f"policy refuses key.release of {resource}: {decision.reason}"),
            )
        try:
            payload = self.store.unseal(record)
        except UnavailableError as exc:
            # Allowed, but nothing released: the log says so rather than "allow".
            entry = _release_entry(principal, resource, True, decision.reason)
            entry.update(decision="error", reason=f"{decision.reason}; not released: {exc}")
            return Release("kms.release", entry, None, exc)
        return Release(
            "kms.release", _release_entry(principal, resource, True, decision.reason), payload
        )

    def delete(self, principal: Principal, secret_id: str) -> None:
        self.store.delete(principal, secret_id)
        self.log.append("kms.delete", {"subject": principal.subject, "secret": secret_id})

    def rotate_kek(self, principal: Principal) -> Rotation:
        """A new KEK; every secret re-wrapped under it while serving (keys/rotation.py)."""
        rotation = rotate_kek(self.store.rows, self.store.kek)
        self.log.append(
            "kms.rotate",
            {
                "subject": principal.subject,
                "old": rotation.old,
                "new": rotation.kek_id,
                "rewrapped": rotation.rewrapped,
                "failed": rotation.failed,
            },
        )
        return rotation


def _refusal(principal: Principal, resource: str, reason: str, error: Exception) -> Release[bytes]:
    return Release("kms.release", _release_entry(principal, resource, False, reason), None, error)


def _release_entry(
    principal: Principal, resource: str, allowed: bool, reason: str
) -> dict[str, Any]:
    return {
        "subject": principal.subject,
        "resource": resource,
        "decision": "allow" if allowed else "deny",
        "reason": reason,
    }
