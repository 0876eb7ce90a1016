"""The layer-key broker: one key chain per image stored encrypted on a node.

Each chain is a system secret of the secret store (its top key, generated
here, never served as such) and a row naming the image it belongs to. The
key of layer N is derived on request, top-down through the one-way chain,
and released only when the policy grants `key.release` on
`image:REPOSITORY` at layer N (`max_layer`), narrowed by the attestation
gate where an allowing rule asks for it (release.py, as for every other key
release); it goes out wrapped to the caller's transport key. So a caller
whose tier is N gets layers 0..N and can never compute a key above N. Every
release and refusal is logged before it is answered; creations and
deletions are logged too.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import delete

from trustplane.api.layer_chains import LayerChainInfo, LayerKeyResponse
from trustplane.control.db import Database
from trustplane.control.identity import Principal
from trustplane.control.models import LayerChain, Secret
from trustplane.control.release import Authorize, Gate, Release
from trustplane.control.transparency import TransparencyLog
from trustplane.crypto import keywrap
from trustplane.crypto.key_chain import derive_lower
from trustplane.crypto.keys import load_recipient_key
from trustplane.errors import Forbidden, NotFoundError, UnavailableError, UsageError
from trustplane.keys.secret_store import SecretStore

RELEASE = "key.release"


class LayerChains:
    def __init__(
        self,
        db: Database,
        store: SecretStore,
        log: TransparencyLog,
        authorize: Authorize,
        gate: Gate,
    ) -> None:
        self.db = db
        self.store = store
        self.log = log
        self.authorize = authorize
        self.gate = gate

    def create(
        self, principal: Principal, repository: str, manifest_digest: str, layers: int
    ) -> LayerChainInfo:
        decision = self.authorize(principal, "secret.create", "secret:*", None)
        if not decision.allowed:
            raise Forbidden(f"policy refuses secret.create: {decision.reason}")
        # The creator fills every layer, so it needs the top key: refuse now
        # rather than after it has stored the first layers.
        top = layers - 1
        decision = self.gate(
            self.authorize(principal, RELEASE, f"image:{repository}", top),
            principal,
            repository,
            top,
            None,
        )
        if not decision.allowed:
            raise Forbidden(f"policy refuses layer {top} of {repository}: {decision.reason}")
        secret = self.store.create(
            principal,
            name=f"layer-chain:{repository}",
            secret_type="symmetric",  # noqa: S106 - a kind of secret
            payload=None,
            algorithm="aes",
            bit_length=256,
            system=True,
        )
        row = LayerChain(
            id=str(uuid.uuid4()),
            repository=repository,
            manifest_digest=manifest_digest,
            layers=layers,
            secret_id=secret.id,
            creator=principal.subject,
        )
        with self.db.session() as session:
            session.add(row)
        self.log.append(
            "layerchain.create",
            {
                "subject": principal.subject,
                "chain": row.id,
                "image": repository,
                "manifest": manifest_digest,
                "layers": layers,
            },
        )
        return _info(row)

    def info(self, principal: Principal, chain_id: str) -> LayerChainInfo:
        row = self._row(chain_id)
        allowed = self.authorize(principal, "image.pull", f"image:{row.repository}", None)
        if not (allowed.allowed or principal.subject == row.creator or principal.role == "admin"):
            raise NotFoundError(f"layer chain {chain_id} does not exist")
        return _info(row)

    def key(
        self, principal: Principal, chain_id: str, layer: int, transport_pem: str
    ) -> LayerKeyResponse:
        """The key of `layer`, derived from the top, if the policy grants that layer."""
        release = self._key_release(principal, chain_id, layer, transport_pem)
        # Logged before it is handed out: a release is as durable as a refusal.
        self.log.append(release.kind, release.entry)
        return release.result()

    def _key_release(
        self, principal: Principal, chain_id: str, layer: int, transport_pem: str
    ) -> Release[LayerKeyResponse]:
        transport = load_recipient_key(transport_pem.encode(), "transport key")
        row = self._row(chain_id)
        if layer >= row.layers:
            raise UsageError(
                f"layer chain {chain_id} of {row.repository} has layers 0..{row.layers - 1}"
            )
        decision = self.gate(
            self.authorize(principal, RELEASE, f"image:{row.repository}", layer),
            principal,
            row.repository,
            layer,
            transport_pem,
        )
        entry = _key_entry(principal, row, layer, decision.allowed, decision.reason)
        if not decision.allowed:
            return Release(
                "layerchain.key",
                entry,
                None,
                Forbidden(
                    f"policy refuses the key of layer {layer} of {row.repository}: "
                    f"{decision.reason}"
                ),
            )
        try:
            key = self.store.system_payload(row.secret_id)
        except (NotFoundError, UnavailableError) as exc:
            # Allowed, but nothing released: the log says so rather than "allow".
            entry.update(decision="error", reason=f"{decision.reason}; not released: {exc}")
            return Release(
                "layerchain.key",
                entry,
                None,
                UnavailableError(f"the top key of layer chain {row.id} cannot be read: {exc}"),
            )
        for lower in range(row.layers - 2, layer - 1, -1):
            key = derive_lower(key, lower)
        wrapped = keywrap.wrap(key, [transport])
        return Release(
            "layerchain.key",
            entry,
            LayerKeyResponse(chain=row.id, repository=row.repository, layer=layer, jwe=wrapped),
        )

    def delete(self, principal: Principal, chain_id: str) -> None:
        """Destroy the chain's top key, and with it every layer key (crypto-shredding)."""
        row = self._row(chain_id)
        if row.creator != principal.subject and principal.role != "admin":
            raise Forbidden(f"only the creator or an admin may delete layer chain {chain_id}")
        # One transaction: the row never outlives its key, nor the key its row.
        with self.db.write_session() as session:
            session.execute(delete(LayerChain).where(LayerChain.id == row.id))
            session.execute(delete(Secret).where(Secret.id == row.secret_id))
        self.log.append(
            "layerchain.delete",
            {"subject": principal.subject, "chain": row.id, "image": row.repository},
        )

    def _row(self, chain_id: str) -> LayerChain:
        with self.db.session() as session:
            row = session.get(LayerChain, chain_id)
        if row is None:
            raise NotFoundError(f"layer chain {chain_id} does not exist")
        return row


def _key_entry(
    principal: Principal, row: LayerChain, layer: int, allowed: bool, reason: str
) -> dict[str, Any]:
    return {
        "subject": principal.subject,
        "chain": row.id,
        "image": row.repository,
        "layer": layer,
        "decision": "allow" if allowed else "deny",
        "reason": reason,
    }


def _info(row: LayerChain) -> LayerChainInfo:
    return LayerChainInfo(
        id=row.id,
        repository=row.repository,
        manifest_digest=row.manifest_digest,
        layers=row.layers,
        creator=row.creator,
        created=row.created,
    )
