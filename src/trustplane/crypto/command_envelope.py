"""Signed commands from the control plane to a gateway (the MQTT link's messages).

An envelope is JSON: `{"payload": B64, "signature": B64}`. The payload is
compact JSON with sorted keys:

    {"v": 1, "gateway": NAME, "command": "pull"|"start"|"stop"|"delete"|"thresholds",
     "args": {...}, "nonce": 32 hex, "issued": UNIX, "expires": UNIX}

signed with the control plane's Ed25519 command key over the payload bytes
exactly. `open_command` checks the signature, the shape, the addressee and
the time window; the receiver keeps the nonces it has seen until they
expire, so a replayed message is refused too (gateway/mqtt_link.py).
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from trustplane.errors import IntegrityError, MalformedError

COMMANDS = frozenset({"pull", "start", "stop", "delete", "thresholds"})
MAX_TTL = 3600
MAX_ENVELOPE = 16 * 1024
CLOCK_SKEW = 30


@dataclass(frozen=True)
class Command:
    gateway: str
    command: str
    args: dict[str, Any]
    nonce: str
    issued: float
    expires: float


def sign_command(
    key: ed25519.Ed25519PrivateKey,
    gateway: str,
    command: str,
    args: dict[str, Any],
    ttl: float = 60,
    now: float | None = None,
) -> bytes:
    if command not in COMMANDS:
        raise MalformedError(f"unknown command {command!r}")
    if not 0 < ttl <= MAX_TTL:
        raise MalformedError(f"a command lives 1-{MAX_TTL} s")
    issued = time.time() if now is None else now
    payload = json.dumps(
        {
            "v": 1,
            "gateway": gateway,
            "command": command,
            "args": args,
            "nonce": secrets.token_hex(16),
            "issued": issued,
            "expires": issued + ttl,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return json.dumps(
        {
            "payload": base64.b64encode(payload).decode(),
            "signature": base64.b64encode(key.sign(payload)).decode(),
        }
    ).encode()


def open_command(
    envelope: bytes,
    key: ed25519.Ed25519PublicKey,
    gateway: str,
    now: float | None = None,
) -> Command:
    """The command inside a verified, current envelope addressed to `gateway`.

    IntegrityError: forged or for another gateway; MalformedError: not an
    envelope; IntegrityError also for expired or not-yet-valid commands.
    """
    if len(envelope) > MAX_ENVELOPE:
        raise MalformedError("the command is too large")
    try:
        outer = json.loads(envelope)
        payload = base64.b64decode(outer["payload"], validate=True)
        signature = base64.b64decode(outer["signature"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise MalformedError("the command is not a signed envelope") from None
    try:
        key.verify(signature, payload)
    except InvalidSignature:
        raise IntegrityError("the command's signature is not the control plane's") from None
    try:
        body = json.loads(payload)
        command = Command(
            gateway=str(body["gateway"]),
            command=str(body["command"]),
            args=dict(body["args"]),
            nonce=str(body["nonce"]),
            issued=float(body["issued"]),
            expires=float(body["expires"]),
        )
        version = body["v"]
    except (ValueError, KeyError, TypeError):
        raise MalformedError("the signed command is malformed") from None
    if version != 1 or command.command not in COMMANDS or len(command.nonce) != 32:
        raise MalformedError("the signed command is not one this gateway understands")
    if command.gateway != gateway:
        raise IntegrityError(f"the command is addressed to {command.gateway[:64]!r}")
    current = time.time() if now is None else now
    if command.expires - command.issued > MAX_TTL:
        raise IntegrityError("the command's lifetime is too long")
    if current > command.expires:
        raise IntegrityError("the command has expired")
    if command.issued > current + CLOCK_SKEW:
        raise IntegrityError("the command is issued in the future")
    return command
