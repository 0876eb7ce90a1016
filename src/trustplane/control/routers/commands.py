"""`/v1/commands`: signed commands to gateways over MQTT, and the key that checks them."""

from __future__ import annotations

import base64
import json
import threading
from typing import Any

import anyio.to_thread
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from fastapi import APIRouter, Request, status

from trustplane.api.commands import CommandKey, CommandRequest, CommandSent
from trustplane.control.commands import CommandCenter
from trustplane.control.routers.deps import Caller, Plane
from trustplane.control.service import ControlPlane, new_ed25519_pem, system_key
from trustplane.errors import Forbidden, MalformedError

router = APIRouter(prefix="/v1", tags=["commands"])
_lock = threading.Lock()


def _center(request: Request, plane: ControlPlane) -> CommandCenter:
    center: CommandCenter | None = getattr(request.app.state, "commands", None)
    if center is None:
        with _lock:
            center = getattr(request.app.state, "commands", None)
            if center is None:
                pem = system_key(plane.db, plane.store, "command_signing_key", new_ed25519_pem)
                key = serialization.load_pem_private_key(pem, password=None)
                assert isinstance(key, ed25519.Ed25519PrivateKey)
                center = CommandCenter(key, plane.settings.mqtt)
                request.app.state.commands = center
    return center


@router.get("/commands/key", response_model=CommandKey)
async def command_key(request: Request, caller: Caller, plane: Plane) -> CommandKey:
    """The Ed25519 public key every command to a gateway is signed with."""
    center = await anyio.to_thread.run_sync(_center, request, plane)
    return CommandKey(public_key=center.public_pem)


@router.post("/commands", status_code=status.HTTP_201_CREATED, response_model=CommandSent)
async def send_command(
    body: CommandRequest, request: Request, caller: Caller, plane: Plane
) -> CommandSent:
    """Sign a command for a gateway, log it, and publish it when a broker is configured."""
    if caller.role != "admin":
        raise Forbidden("only admins send commands to gateways")
    if any(isinstance(v, str) and len(v) > 512 for v in body.args.values()):
        raise MalformedError("command arguments are at most 512 characters")
    center = await anyio.to_thread.run_sync(_center, request, plane)
    envelope = center.issue(body.gateway, body.command, dict(body.args), body.ttl)
    payload: dict[str, Any] = json.loads(base64.b64decode(json.loads(envelope)["payload"]))
    receipt = await plane.log.append_async(
        "gateway.command",
        {
            "asker": caller.subject,
            "gateway": body.gateway,
            "command": body.command,
            "args": dict(body.args),
            "nonce": payload["nonce"],
            "expires": payload["expires"],
        },
    )
    published = False
    if center.can_publish:
        await anyio.to_thread.run_sync(center.publish, body.gateway, envelope)
        published = True
    return CommandSent(envelope=envelope.decode(), log_index=receipt.index, published=published)
