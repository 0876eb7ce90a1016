"""The local Docker engine as an image source and destination.

Through the Engine API (the `docker` SDK), never the CLI: `GET /images/NAME/get`
streams a `docker save` archive, `POST /images/load` takes one. Both are
streamed, so image size does not change memory use. The SDK (and the
`requests` stack under it) is imported on first use: only docker-daemon:
references need it, and every command pays for what it imports at start.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from typing import Any, cast

from trustplane.errors import MalformedError, NotFoundError, UnavailableError
from trustplane.streaming import ChunkReader

DEFAULT_SOCKET = "unix:///var/run/docker.sock"


def docker_host() -> str:
    return os.environ.get("DOCKER_HOST", DEFAULT_SOCKET)


def api_client(base_url: str | None = None) -> Any:
    """A low-level client (docker.APIClient) with the server's API version
    (`base_url`, default $DOCKER_HOST or the standard socket)."""
    import docker

    url = base_url or docker_host()
    try:
        client = docker.APIClient(base_url=url, version="auto", timeout=600)
    except docker.errors.DockerException as exc:
        raise UnavailableError(f"Docker engine at {url} unreachable: {exc}") from None
    return client


def save(name: str) -> io.BufferedReader:
    """A stream of `docker save NAME`."""
    import docker.errors

    client = api_client()
    try:
        client.inspect_image(name)
        chunks = cast(Iterable[bytes], client.get_image(name, chunk_size=1 << 20))
    except docker.errors.ImageNotFound:
        raise NotFoundError(f"docker-daemon:{name}: no such image") from None
    except docker.errors.APIError as exc:
        raise UnavailableError(f"docker-daemon:{name}: {exc.explanation or exc}") from None
    return io.BufferedReader(ChunkReader(chunks), buffer_size=1 << 20)


def load(archive: Iterable[bytes], base_url: str | None = None) -> list[str]:
    """Feed a `docker load` archive; returns the engine's messages."""
    import docker.errors

    client = api_client(base_url)
    messages: list[str] = []
    try:
        for event in client.load_image(archive):
            if "error" in event or "errorDetail" in event:
                detail = event.get("errorDetail", {}).get("message") or event.get("error")
                raise MalformedError(f"docker load refused the image: {detail}")
            if text := str(event.get("stream", "")).strip():
                messages.append(text)
    except docker.errors.APIError as exc:
        raise MalformedError(f"docker load refused the image: {exc.explanation or exc}") from None
    except docker.errors.DockerException as exc:
        raise UnavailableError(f"Docker engine at {base_url or docker_host()}: {exc}") from None
    return messages
