"""An MQTT client (paho-mqtt 2) connected over TLS with a user name and password.

Shared by the control plane (which publishes signed commands) and the
gateways (which receive them and publish their status): both only ever
connect outbound to the broker, over TLS, with their own credentials.
"""

from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from trustplane.ca_bundle import client_context
from trustplane.errors import AuthError, UnavailableError, UsageError

CONNECT_TIMEOUT = 10.0


def broker_address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "mqtts" or not parts.hostname:
        raise UsageError(f"the broker must be mqtts://HOST:PORT, not {url!r}")
    return parts.hostname, parts.port or 8883


def connect(
    url: str, user: str, password: str, ca_file: Path | None, client_id: str
) -> mqtt.Client:
    """A connected client with its network loop running in a thread; raises when refused."""
    host, port = broker_address(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    context = client_context(ca_file, "broker CA")
    client.tls_set_context(context)
    client.username_pw_set(user, password)
    connected = threading.Event()
    outcome: list[ReasonCode] = []

    def on_connect(
        _client: mqtt.Client, _data: object, _flags: object, code: ReasonCode, _props: object
    ) -> None:
        outcome.append(code)
        connected.set()

    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=30)
    except OSError as exc:
        raise UnavailableError(f"MQTT broker {url}: {exc}") from None
    client.loop_start()
    if not connected.wait(CONNECT_TIMEOUT):
        client.loop_stop()
        raise UnavailableError(f"MQTT broker {url} did not answer")
    if outcome[0].is_failure:
        client.loop_stop()
        client.disconnect()
        raise AuthError(f"MQTT broker {url} refused {user}: {outcome[0]}")
    client.on_connect = None
    return client
