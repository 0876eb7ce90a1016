"""The few Engine API reads the gateway makes itself, to learn what a call is about."""

from __future__ import annotations

import contextlib
from typing import Any

import httpx

from trustplane.errors import MalformedError, UnavailableError


class DockerApi:
    """dockerd's own socket; names passed here were already validated by request.py."""

    def __init__(self, socket_path: str, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self._http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=socket_path),
            base_url="http://docker",
            timeout=timeout,
        )

    async def close(self) -> None:
        await self._http.aclose()

    async def inspect(self, kind: str, name: str) -> dict[str, Any] | None:
        """`GET /{kind}/{name}/json`: the object, or None when dockerd has no such thing."""
        try:
            response = await self._http.get(f"/{kind}/{name}/json")
        except httpx.HTTPError as exc:
            raise UnavailableError(f"dockerd at {self.socket_path}: {type(exc).__name__}") from None
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise UnavailableError(f"dockerd answered {response.status_code} to an inspect")
        try:
            document = response.json()
        except ValueError:
            raise MalformedError("dockerd sent no JSON") from None
        if not isinstance(document, dict):
            raise MalformedError("dockerd sent an unexpected inspect answer")
        return document

    async def remove_container(self, container_id: str) -> None:
        """Force-remove a container the gateway must not let stand (best effort)."""
        with contextlib.suppress(httpx.HTTPError):
            await self._http.delete(f"/containers/{container_id}", params={"force": "1"})
