"""The layer-key broker's API (api/layer_chains.py has the models and the story)."""

from __future__ import annotations

from fastapi import APIRouter, Path, Response, status

from trustplane.api.fields import UUID
from trustplane.api.layer_chains import (
    LayerChainInfo,
    LayerKeyRequest,
    LayerKeyResponse,
    NewLayerChain,
)
from trustplane.control.routers.deps import Caller, Plane

router = APIRouter(prefix="/v1/layer-chains", tags=["layer chains"])
ChainId = Path(pattern=UUID)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=LayerChainInfo)
def create_chain(body: NewLayerChain, caller: Caller, plane: Plane) -> LayerChainInfo:
    """A new chain with a fresh top key, for an image about to be stored on a node."""
    return plane.layer_chains.create(caller, body.repository, body.manifest_digest, body.layers)


@router.get("/{chain_id}", response_model=LayerChainInfo)
def chain_info(caller: Caller, plane: Plane, chain_id: str = ChainId) -> LayerChainInfo:
    return plane.layer_chains.info(caller, chain_id)


@router.post("/{chain_id}/keys", response_model=LayerKeyResponse)
def layer_key(
    body: LayerKeyRequest, caller: Caller, plane: Plane, chain_id: str = ChainId
) -> LayerKeyResponse:
    """The key of one layer (which opens that layer and every one below it)."""
    return plane.layer_chains.key(caller, chain_id, body.layer, body.transport_key)


@router.delete("/{chain_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_chain(caller: Caller, plane: Plane, chain_id: str = ChainId) -> Response:
    """Destroy the top key: no layer of the chain can be opened again."""
    plane.layer_chains.delete(caller, chain_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
