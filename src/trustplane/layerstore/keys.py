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

from trustplane.client import ControlClient
from trustplane.crypto import keywrap
from trustplane.crypto.key_chain import chain_below
from trustplane.crypto.keys import UnwrapKey, generate_key_pair, load_unwrap_key
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
    """The key pair layer keys are wrapped to (PEMs, as KmsUnwrapper takes them too)."""

    private_pem: bytes = field(repr=False)
    public_pem: str

    @classmethod
    def ephemeral(cls) -> Transport:
        private, public = generate_key_pair("ec-p256")
        return cls(private, public.decode())

    def unwrap_key(self) -> UnwrapKey:
        return load_unwrap_key(self.private_pem, "transport key")


class ControlPlaneKeys:
    """`ChainKeys` through the control plane's /v1/layer-chains API."""

    def __init__(self, client: ControlClient, transport: Transport | None = None) -> None:
        self.client = client
        self.transport = transport or Transport.ephemeral()
        self._private = self.transport.unwrap_key()

    def create_chain(self, repository: str, manifest_digest: str, layers: int) -> ChainRef:
        answer = self.client.create_layer_chain(repository, manifest_digest, layers)
        return ChainRef(self.client.url, answer.id)

    def layer_keys(self, chain: ChainRef, tier: int) -> list[bytes]:
        self._same_server(chain)
        answer = self.client.layer_key(chain.id, tier, self.transport.public_pem)
        key = keywrap.unwrap(answer.jwe, [self._private], f"key of layer {tier}")
        if key is None or len(key) != KEY_SIZE or answer.layer != tier:
            raise IntegrityError(f"the control plane answered with no usable key of layer {tier}")
        return chain_below(key, tier)

    def destroy_chain(self, chain: ChainRef) -> None:
        self._same_server(chain)
        with contextlib.suppress(NotFoundError):  # destroyed already
            self.client.delete_layer_chain(chain.id)

    def _same_server(self, chain: ChainRef) -> None:
        if chain.server.rstrip("/") != self.client.url.rstrip("/"):
            raise DecryptionKeyError(
                f"the layer keys are held by {chain.server}, not {self.client.url}; "
                "log in there (trustplane login --server ...)"
            )


def refused_tier(error: Forbidden, name: str, tier: int) -> Forbidden:
    """The policy's refusal, said as what it means for the user's view."""
    return Forbidden(f"{name}: cannot open layer {tier}: {error}")
