"""Where a stored image's layer keys come from: the control plane's layer-key broker.

The node never stores a layer key. For each import it has the control plane
create a chain (a fresh top key in the KMS), asks for the top layer's key,
derives the others (crypto/key_chain.py) and forgets them when the import
ends. A view of tier N asks for the key of layer N only, so the policy
decides how far a caller sees. Keys travel as JWE to a transport key: the
node's TPM-certified one on an attested node, else a throw-away key pair
made for this client (nothing on the wire opens for anyone else).

`Measurer` is how an attested node measures layers into its TPM before it
asks for keys (the agent implements it; the store only calls it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustplane.api.layer_chains import LayerChainInfo, LayerKeyResponse, NewLayerChain
from trustplane.client import ControlClient
from trustplane.crypto import keywrap
from trustplane.crypto.key_chain import chain_below
from trustplane.crypto.keys import UnwrapKey, load_unwrap_key
from trustplane.crypto.layer_cipher import KEY_SIZE
from trustplane.errors import DecryptionKeyError, Forbidden, IntegrityError, NotFoundError


@dataclass(frozen=True)
class ChainRef:
    """A chain held by one control plane."""

    server: str
    id: str


class ChainKeys(Protocol):
    def create_chain(self, repository: str, manifest_digest: str, layers: int) -> ChainRef:
        """A new chain of `layers` keys for an image about to be stored."""

    def layer_keys(self, chain: ChainRef, tier: int) -> list[bytes]:
        """The keys of layers 0..tier (asks for the key of layer `tier` only)."""

    def destroy_chain(self, chain: ChainRef) -> None:
        """Destroy every key of the chain; a chain already gone is no error."""


@dataclass(frozen=True)
class MeasuredLayer:
    index: int
    digest: str | None
    """The plain (compressed) blob digest, as registered; None while unknown (an
    encrypted layer before its key is unwrapped)."""
    diff_id: str


class Measurer(Protocol):
    def measure(
        self, repository: str, manifest_digest: str, layers: Sequence[MeasuredLayer]
    ) -> None:
        """Measure `layers` into the node's TPM and attest, before keys are asked for."""


@dataclass(frozen=True)
class Transport:
    """The key pair layer keys are wrapped to."""

    public_pem: str
    private: UnwrapKey = field(repr=False)

    @classmethod
    def ephemeral(cls) -> Transport:
        private = ec.generate_private_key(ec.SECP256R1())
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        public = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(public.decode(), load_unwrap_key(pem, "transport key"))


class ControlPlaneKeys:
    """`ChainKeys` through the control plane's /v1/layer-chains API."""

    def __init__(self, client: ControlClient, transport: Transport | None = None) -> None:
        self.client = client
        self.transport = transport or Transport.ephemeral()

    def create_chain(self, repository: str, manifest_digest: str, layers: int) -> ChainRef:
        body = NewLayerChain(repository=repository, manifest_digest=manifest_digest, layers=layers)
        answer = LayerChainInfo.model_validate(
            self.client.request("POST", "/v1/layer-chains", json=body.model_dump()).json()
        )
        return ChainRef(self.client.url, answer.id)

    def layer_keys(self, chain: ChainRef, tier: int) -> list[bytes]:
        self._same_server(chain)
        answer = LayerKeyResponse.model_validate(
            self.client.request(
                "POST",
                f"/v1/layer-chains/{chain.id}/keys",
                json={"layer": tier, "transport_key": self.transport.public_pem},
            ).json()
        )
        key = keywrap.unwrap(answer.jwe, [self.transport.private], f"key of layer {tier}")
        if key is None or len(key) != KEY_SIZE or answer.layer != tier:
            raise IntegrityError(f"the control plane answered with no usable key of layer {tier}")
        return chain_below(key, tier)

    def destroy_chain(self, chain: ChainRef) -> None:
        self._same_server(chain)
        with contextlib.suppress(NotFoundError):  # destroyed already
            self.client.request("DELETE", f"/v1/layer-chains/{chain.id}")

    def _same_server(self, chain: ChainRef) -> None:
        if chain.server.rstrip("/") != self.client.url.rstrip("/"):
            raise DecryptionKeyError(
                f"the layer keys are held by {chain.server}, not {self.client.url}; "
                "log in there (trustplane login --server ...)"
            )


def refused_tier(error: Forbidden, name: str, tier: int) -> Forbidden:
    """The policy's refusal, said as what it means for the user's view."""
    return Forbidden(f"{name}: cannot open layer {tier}: {error}")
