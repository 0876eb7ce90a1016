"""Signed command envelopes (MQTT link) and monitor threshold updates."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from trustplane.crypto.command_envelope import open_command, sign_command
from trustplane.errors import IntegrityError, MalformedError, UsageError
from trustplane.gateway.monitor import Thresholds

KEY = ed25519.Ed25519PrivateKey.generate()
PUBLIC = KEY.public_key()


def test_a_current_signed_command_opens() -> None:
    envelope = sign_command(KEY, "gw1", "stop", {"container": "web"}, ttl=30, now=1000)
    command = open_command(envelope, PUBLIC, "gw1", now=1010)
    assert (command.command, command.args, command.expires) == ("stop", {"container": "web"}, 1030)
    assert len(command.nonce) == 32
    assert command.nonce != open_command(sign_command(KEY, "gw1", "stop", {}), PUBLIC, "gw1").nonce


@pytest.mark.parametrize(
    ("now", "gateway", "text"),
    [
        (1031, "gw1", "expired"),
        (900, "gw1", "future"),
        (1010, "gw2", "addressed to"),
    ],
)
def test_expired_early_and_misaddressed_commands_are_refused(
    now: float, gateway: str, text: str
) -> None:
    envelope = sign_command(KEY, "gw1", "stop", {"container": "web"}, ttl=30, now=1000)
    with pytest.raises(IntegrityError, match=text):
        open_command(envelope, PUBLIC, gateway, now=now)


def test_forged_and_altered_commands_are_refused() -> None:
    forged = sign_command(ed25519.Ed25519PrivateKey.generate(), "gw1", "start", {"container": "x"})
    with pytest.raises(IntegrityError, match="signature"):
        open_command(forged, PUBLIC, "gw1")
    outer = json.loads(sign_command(KEY, "gw1", "start", {"container": "x"}))
    payload = json.loads(base64.b64decode(outer["payload"]))
    payload["args"]["container"] = "y"
    outer["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    with pytest.raises(IntegrityError, match="signature"):
        open_command(json.dumps(outer).encode(), PUBLIC, "gw1")
    for junk in (b"", b"{}", b"[1]", b'{"payload": "!", "signature": ""}', b"x" * 20000):
        with pytest.raises(MalformedError):
            open_command(junk, PUBLIC, "gw1")
    with pytest.raises(MalformedError):
        sign_command(KEY, "gw1", "format-disk", {})


def test_threshold_updates_are_checked() -> None:
    base = Thresholds()
    assert base.updated({"cpu_percent": 42, "sustain": 5}) == Thresholds(42, 90, 5, 2)
    for bad in ({}, {"cpu_percent": 0}, {"cpu_percent": 101}, {"unknown": 1},
                {"sustain": True}, {"interval": "1"}, {"interval": 0.001}):  # fmt: skip
        with pytest.raises(UsageError):
            base.updated(bad)
