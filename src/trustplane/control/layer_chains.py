"""The layer-key broker: one key chain per image stored encrypted on a node.

Each chain is a KMS system secret (its top key, generated here, never served
as such) and a row naming the image it belongs to. The key of layer N is
derived on request, top-down through the one-way chain, and released only
when the policy grants `key.release` on `image:REPOSITORY` at layer N
(`max_layer`), with attestation where an allowing rule asks for it; it goes
out wrapped to the caller's transport key. So a caller whose tier is N gets
layers 0..N and can never compute a key above N. Every release, refusal,
creation and deletion is logged.
"""

from __future__ import annotations

import uuid

from sqlalchemy import delete

from trustplane.api.layer_chains import LayerChainInfo, LayerKeyResponse
from trustplane.control.identity import Principal
from trustplane.control.kms import Kms
from trustplane.control.models import LayerChain, Secret
from trustplane.crypto import keywrap
from trustplane.crypto.key_chain import derive_lower
from trustplane.crypto.keys import load_recipient_key
from trustplane.errors import Forbidden, NotFoundError, UnavailableError, UsageError

RELEASE = "key.release"


class LayerChains:
    """Built per request from the control plane's KMS (it holds no state of its own)."""

    def __init__(self, kms: Kms) -> None:
        self.kms = kms
        self.db = kms.db
        self.log = kms.log

    def create(
        self, principal: Principal, repository: str, manifest_digest: str, layers: int
    ) -> LayerChainInfo:
        decision = self.kms.authorize(principal, "secret.create", "secret:*", None)
        if not decision.allowed:
            raise Forbidden(f"policy refuses secret.create: {decision.reason}")
        # The creator fills every layer, so it needs the top key: refuse now
        # rather than after it has stored the first layers.
        top = layers - 1
        decision = self.kms.attested(
            self.kms.authorize(principal, RELEASE, f"image:{repository}", top),
            principal,
            repository,
            top,
            None,
        )
        if not decision.allowed:
            raise Forbidden(f"policy refuses layer {top} of {repository}: {decision.reason}")
        secret = self.kms.create(
            principal,
            name=f"layer-chain:{repository}",
            secret_type="symmetric",  # noqa: S106 - a kind of secret
            payload=None,
            algorithm="aes",
            bit_length=256,
            readers=[],
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
        allowed = self.kms.authorize(principal, "image.pull", f"image:{row.repository}", None)
        if not (allowed.allowed or principal.subject == row.creator or principal.role == "admin"):
            raise NotFoundError(f"layer chain {chain_id} does not exist")
        return _info(row)

    def key(
        self, principal: Principal, chain_id: str, layer: int, transport_pem: str
    ) -> LayerKeyResponse:
        """The key of `layer`, derived from the top, if the policy grants that layer."""
        transport = load_recipient_key(transport_pem.encode(), "transport key")
        row = self._row(chain_id)
        if layer >= row.layers:
            raise UsageError(
                f"layer chain {chain_id} of {row.repository} has layers 0..{row.layers - 1}"
            )
        decision = self.kms.attested(
            self.kms.authorize(principal, RELEASE, f"image:{row.repository}", layer),
            principal,
            row.repository,
            layer,
            transport_pem,
        )
        entry = {
            "subject": principal.subject,
            "chain": row.id,
            "image": row.repository,
            "layer": layer,
            "decision": "allow" if decision.allowed else "deny",
            "reason": decision.reason,
        }
        if not decision.allowed:
            self.log.append("layerchain.key", entry)
            raise Forbidden(
                f"policy refuses the key of layer {layer} of {row.repository}: {decision.reason}"
            )
        try:
            key = self.kms.system_payload(row.secret_id)
        except NotFoundError:
            raise UnavailableError(f"the top key of layer chain {row.id} is missing") from None
        for lower in range(row.layers - 2, layer - 1, -1):
            key = derive_lower(key, lower)
        wrapped = keywrap.wrap(key, [transport])
        # Logged before it is handed out: a release is as durable as a refusal.
        self.log.append("layerchain.key", entry)
        return LayerKeyResponse(chain=row.id, repository=row.repository, layer=layer, jwe=wrapped)

    def delete(self, principal: Principal, chain_id: str) -> None:
        """Destroy the chain's top key, and with it every layer key (crypto-shredding)."""
        row = self._row(chain_id)
        if row.creator != principal.subject and principal.role != "admin":
            raise Forbidden(f"only the creator or an admin may delete layer chain {chain_id}")
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


def _info(row: LayerChain) -> LayerChainInfo:
    return LayerChainInfo(
        id=row.id,
        repository=row.repository,
        manifest_digest=row.manifest_digest,
        layers=row.layers,
        creator=row.creator,
        created=row.created,
    )
