"""Commands to gateways: signed with the control plane's command key, sent over MQTT.

The command key is an Ed25519 key of its own (not the log's), sealed in the
database like the server's other keys, so every replica signs with the same
one. Gateways fetch its public half over HTTPS (`GET /v1/commands/key`) and
refuse any message it did not sign (crypto/command_envelope.py).
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from trustplane.control.settings import MqttSettings
from trustplane.crypto.command_envelope import sign_command
from trustplane.errors import UnavailableError
from trustplane.mqtt_client import connect

TOPIC_ROOT = "trustplane/gw"
PUBLISH_TIMEOUT = 10.0


class CommandCenter:
    def __init__(self, key: ed25519.Ed25519PrivateKey, mqtt: MqttSettings) -> None:
        self._key = key
        self._mqtt = mqtt
        self._lock = threading.Lock()

    @property
    def public_pem(self) -> str:
        return (
            self._key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def issue(self, gateway: str, command: str, args: dict[str, Any], ttl: float) -> bytes:
        return sign_command(self._key, gateway, command, args, ttl)

    @property
    def can_publish(self) -> bool:
        return self._mqtt.url is not None

    def publish(self, gateway: str, envelope: bytes) -> None:
        """Deliver to the broker (QoS 1); blocking: call from a worker thread."""
        settings = self._mqtt
        if settings.url is None:
            raise UnavailableError("this control plane has no MQTT broker configured")
        try:
            password = settings.password_file.read_text().strip() if settings.password_file else ""
        except OSError as exc:
            raise UnavailableError(f"MQTT password file: {exc.strerror}") from None
        with self._lock:
            client = connect(
                settings.url, settings.user, password, settings.ca_file, f"tp-cp-{uuid.uuid4()}"
            )
            try:
                info = client.publish(f"{TOPIC_ROOT}/{gateway}/cmd", envelope, qos=1)
                info.wait_for_publish(PUBLISH_TIMEOUT)
                if not info.is_published():
                    raise UnavailableError("the MQTT broker did not take the command")
            finally:
                client.disconnect()
                client.loop_stop()
