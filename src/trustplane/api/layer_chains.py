"""Layer-key chains: the keys of an image's layers at rest, held by the KMS.

A node's layer store encrypts each stored layer under its own key; the keys
form the one-way chain of `crypto/key_chain.py`, and only the chain's top
key exists, as a KMS secret that is never served as such. A caller asks for
*the key of layer N*; the control plane derives it from the top and releases
it if the policy grants `key.release` on `image:REPOSITORY` up to layer N
(`max_layer`, attestation where the policy asks), wrapped in a JWE to the
caller's transport key. Whoever holds the key of layer N derives 0..N and
nothing above.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from trustplane.api.fields import DIGEST

REPOSITORY = r"^[A-Za-z0-9][A-Za-z0-9._:/\[\]-]{0,255}$"
"""HOST/REPO as the policy names it (`image:REPOSITORY`)."""
MAX_LAYERS = 1024


class NewLayerChain(BaseModel):
    repository: str = Field(pattern=REPOSITORY, description="HOST/REPO the policy names")
    manifest_digest: str = Field(pattern=DIGEST)
    layers: int = Field(ge=1, le=MAX_LAYERS, description="Number of layers (keys 0..layers-1)")


class LayerChainInfo(BaseModel):
    id: str
    repository: str
    manifest_digest: str
    layers: int
    creator: str
    created: datetime


class LayerKeyRequest(BaseModel):
    layer: int = Field(ge=0, lt=MAX_LAYERS, description="Index of the layer whose key is wanted")
    transport_key: str = Field(
        max_length=16384, description="PEM public key the layer key is wrapped to (JWE)"
    )


class LayerKeyResponse(BaseModel):
    chain: str
    repository: str
    layer: int
    jwe: str = Field(description="The 32-byte layer key, as a JWE to the transport key")
