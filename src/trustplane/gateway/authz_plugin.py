"""The gateway's decision code as a Docker authorization plugin (`--authorization-plugin`).

For operators who keep clients on dockerd's own socket: dockerd asks the
plugin about every request (`/AuthZPlugin.AuthZReq`) and every answer
(`/AuthZPlugin.AuthZRes`) over the plugin socket
(`/run/docker/plugins/NAME.sock`, or a spec file naming it). The request is
judged by the same Gatekeeper as the proxy's: the method and URI are parsed
strictly, the body is checked for host access, the caller is the
`X-Trustplane-Token` header (the docker CLI's `HttpHeaders`), images are
authenticated and the control plane authorizes. A create that was allowed
is checked again on the answer (the container must be made from the image
that was authenticated; otherwise it is removed and the answer refused).

The plugin cannot know the local user (dockerd does not pass peer
credentials), so `--allowed-uid` does not apply. The gateway's own calls
to dockerd (inspects, the monitor's stops, MQTT commands) carry a random
per-process secret header and are allowed; so are `/_ping` and
`/version` (health checks and API version negotiation, which say nothing
but the daemon's version). Any error denies.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from trustplane.errors import MalformedError, TrustplaneError
from trustplane.gateway.decide import TOKEN_HEADER, Gatekeeper, Verdict
from trustplane.gateway.docker_api import INTERNAL_HEADER
from trustplane.gateway.host_access import parse_json_object
from trustplane.gateway.http1 import (
    MAX_HEAD,
    parse_request_head,
    read_body,
    read_head,
    request_framing,
    serialize_head,
)
from trustplane.gateway.request import parse_target
from trustplane.gateway.volume_access import create_volumes

log = logging.getLogger("trustplane.gateway")
MAX_BODY = 4 * 1024 * 1024
CONTENT_TYPE = "application/vnd.docker.plugins.v1.2+json"
UNAUTHENTICATED = frozenset({("GET", "/_ping"), ("HEAD", "/_ping"), ("GET", "/version")})
"""Health checks (dockerd's own readiness, SDK version negotiation) need no token."""


def _answer(allow: bool, message: str = "", error: str = "") -> dict[str, Any]:
    return {"Allow": allow, "Msg": message, "Err": error}


def _document(raw: bytes) -> dict[str, Any]:
    if len(raw) > 2 * MAX_BODY:
        raise MalformedError("the plugin request is too large")
    try:
        document = json.loads(raw)
    except ValueError:
        raise MalformedError("the plugin request is not JSON") from None
    if not isinstance(document, dict):
        raise MalformedError("the plugin request is not an object")
    return document


def _tokens(headers: Any, wanted: str) -> list[str]:
    """Every value of header `wanted` (lower case) in dockerd's RequestHeaders."""
    if not isinstance(headers, dict):
        return []
    found: list[str] = []
    for name, value in headers.items():
        if isinstance(name, str) and name.lower() == wanted:
            found.extend(value if isinstance(value, list) else [value])
    return [str(v) for v in found]


def _body(document: dict[str, Any], key: str) -> bytes:
    value = document.get(key)
    if not value:
        return b""
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedError("the plugin request body is not base64") from None


class AuthzPlugin:
    """The plugin socket: a small HTTP/1.1 server (http1.py) for dockerd's three calls."""

    def __init__(self, socket_path: Path, gatekeeper: Gatekeeper) -> None:
        self.socket_path = socket_path
        self.gatekeeper = gatekeeper
        self._server: asyncio.Server | None = None
        self._routes: dict[str, Callable[[bytes], Awaitable[dict[str, Any]]]] = {
            "/Plugin.Activate": self.activate,
            "/AuthZPlugin.AuthZReq": self.authz_request,
            "/AuthZPlugin.AuthZRes": self.authz_response,
        }

    async def start(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.socket_path), limit=MAX_HEAD
        )
        self.socket_path.chmod(0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.socket_path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (data := await read_head(reader)) is not None:
                head = parse_request_head(data)
                raw = b""
                async for piece in read_body(reader, request_framing(head)):
                    raw += piece
                    if len(raw) > 2 * MAX_BODY:
                        raise MalformedError("the plugin request is too large")
                route = self._routes.get(head.start[1]) if head.start[0] == "POST" else None
                if route is None:
                    answer, status = {"Err": "not found"}, "404 Not Found"
                else:
                    answer, status = await route(raw), "200 OK"
                body = json.dumps(answer).encode()
                writer.write(
                    serialize_head(
                        f"HTTP/1.1 {status}",
                        [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(body)))],
                    )
                    + body
                )
                await writer.drain()
        except (MalformedError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:  # one connection must not take the plugin down
            log.exception("authz plugin: unexpected error on a connection")
        finally:
            writer.close()

    async def activate(self, _: bytes) -> dict[str, Any]:
        return {"Implements": ["authz"]}

    async def authz_request(self, raw: bytes) -> dict[str, Any]:
        gatekeeper = self.gatekeeper
        try:
            document = _document(raw)
            method = str(document.get("RequestMethod", ""))
            target = parse_target(method, str(document.get("RequestUri", "")))
            body = _body(document, "RequestBody")
            headers = document.get("RequestHeaders")
            if self._internal(headers):
                return _answer(True)  # the gateway's own call: its decision was made
            if (target.method, target.path) in UNAUTHENTICATED:
                return _answer(True)
            tokens = _tokens(headers, TOKEN_HEADER)
            verdict = await gatekeeper.decide(target, tokens, body, None)
        except TrustplaneError as exc:
            gatekeeper.report_refusal(400, str(exc), None)
            return _answer(False, str(exc))
        except Exception:  # fail closed
            log.exception("authz plugin: unexpected error")
            return _answer(False, "trustplane: the gateway could not decide; denied")
        return _answer(verdict.allowed, "" if verdict.allowed else verdict.message)

    def _internal(self, headers: Any) -> bool:
        secret = self.gatekeeper.docker.internal_secret.encode()
        sent = _tokens(headers, INTERNAL_HEADER.lower())
        return len(sent) == 1 and hmac.compare_digest(sent[0].encode(), secret)

    async def authz_response(self, raw: bytes) -> dict[str, Any]:
        """dockerd asks only about answers to requests AuthZReq allowed: check creates."""
        gatekeeper = self.gatekeeper
        try:
            document = _document(raw)
            target = parse_target(
                str(document.get("RequestMethod", "")), str(document.get("RequestUri", ""))
            )
            status = int(document.get("ResponseStatusCode") or 0)
            if target.method == "POST" and target.path == "/containers/create" and status == 201:
                config = parse_json_object(_body(document, "RequestBody"))
                image = config.get("image")
                if not isinstance(image, str) or not image:
                    raise MalformedError("a container needs an Image")
                _, image_id = await gatekeeper.images.for_start(image)
                verdict = Verdict(True, 200, "", image_id=image_id)
                # The volumes the request named were checked at AuthZReq (only those).
                verdict.volumes = set(create_volumes(config))
                if not await gatekeeper.confirm_created(verdict, _body(document, "ResponseBody")):
                    return _answer(False, verdict.message)
        except TrustplaneError as exc:
            return _answer(False, str(exc))
        except Exception:  # fail closed
            log.exception("authz plugin: unexpected error on a response")
            return _answer(False, "trustplane: the gateway could not decide; denied")
        return _answer(True)
