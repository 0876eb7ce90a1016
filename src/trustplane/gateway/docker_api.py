"""The few Engine API reads the gateway makes itself, to learn what a call is about."""

from __future__ import annotations

import contextlib
import json
import secrets
from typing import Any

import httpx

from trustplane.errors import MalformedError, UnavailableError

INTERNAL_HEADER = "X-Trustplane-Internal"


class DockerApi:
    """dockerd's own socket; names passed here were already validated by request.py."""

    def __init__(self, socket_path: str, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.internal_secret = secrets.token_urlsafe(32)
        """Sent on the gateway's own calls, so its authorization plugin knows them."""
        self._http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=socket_path),
            base_url="http://docker",
            timeout=timeout,
            headers={INTERNAL_HEADER: self.internal_secret},
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

    async def volume_driver(self, name: str) -> str | None:
        """`GET /volumes/{name}`: the volume's driver, or None when dockerd has no such volume."""
        try:
            response = await self._http.get(f"/volumes/{name}")
        except httpx.HTTPError as exc:
            raise UnavailableError(f"dockerd at {self.socket_path}: {type(exc).__name__}") from None
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise UnavailableError(f"dockerd answered {response.status_code} to a volume inspect")
        try:
            document = response.json()
        except ValueError:
            raise MalformedError("dockerd sent no JSON") from None
        driver = document.get("Driver") if isinstance(document, dict) else None
        if not isinstance(driver, str) or not driver:
            raise MalformedError("dockerd names no driver for this volume")
        return driver

    async def ping(self) -> None:
        """`GET /_ping`: UnavailableError unless dockerd answers OK."""
        try:
            response = await self._http.get("/_ping")
        except httpx.HTTPError as exc:
            raise UnavailableError(f"dockerd at {self.socket_path}: {type(exc).__name__}") from None
        if response.status_code != 200:
            raise UnavailableError(f"dockerd answered {response.status_code} to a ping")

    async def remove_container(self, container_id: str) -> None:
        """Force-remove a container the gateway must not let stand (best effort)."""
        with contextlib.suppress(httpx.HTTPError):
            await self._http.delete(f"/containers/{container_id}", params={"force": "1"})

    async def stop_container(self, container_id: str, grace: int = 2) -> int:
        """`POST /containers/{id}/stop?t=GRACE` on dockerd itself; dockerd's status."""
        try:
            response = await self._http.post(
                f"/containers/{container_id}/stop",
                params={"t": str(grace)},
                timeout=grace + 30.0,
            )
        except httpx.HTTPError as exc:
            raise UnavailableError(f"dockerd at {self.socket_path}: {type(exc).__name__}") from None
        return response.status_code

    async def stats(self, container_id: str) -> dict[str, Any] | None:
        """One `GET /containers/{id}/stats?stream=false` sample (None: no such container)."""
        try:
            response = await self._http.get(
                f"/containers/{container_id}/stats", params={"stream": "false", "one-shot": "true"}
            )
        except httpx.HTTPError as exc:
            raise UnavailableError(f"dockerd at {self.socket_path}: {type(exc).__name__}") from None
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise UnavailableError(f"dockerd answered {response.status_code} to stats")
        try:
            document = response.json()
        except ValueError:
            raise MalformedError("dockerd sent no JSON") from None
        return document if isinstance(document, dict) else None

    async def command(self, method: str, path: str, params: dict[str, str] | None = None) -> int:
        """One Engine API call the gateway itself makes (MQTT commands); dockerd's status."""
        try:
            response = await self._http.request(method, path, params=params, timeout=60.0)
        except httpx.HTTPError as exc:
            raise UnavailableError(f"dockerd at {self.socket_path}: {type(exc).__name__}") from None
        return response.status_code

    async def pull(self, image: str, tag: str) -> str:
        """`POST /images/create` to the end of its progress stream; the error, or ''."""
        error = ""
        try:
            async with self._http.stream(
                "POST",
                "/images/create",
                params={"fromImage": image, "tag": tag},
                timeout=httpx.Timeout(600.0, connect=10.0),
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    return f"dockerd answered {response.status_code}: {response.text[:200]}"
                async for line in response.aiter_lines():
                    with contextlib.suppress(ValueError):
                        document = json.loads(line)
                        if isinstance(document, dict) and document.get("error"):
                            error = str(document["error"])
        except httpx.HTTPError as exc:
            raise UnavailableError(f"dockerd at {self.socket_path}: {type(exc).__name__}") from None
        return error
