"""The gateway's MQTT link: signed commands in, status and results out.

The gateway connects outbound to the broker over TLS with its own user
name (its node name) and password; the broker's ACL lets it read only
`trustplane/gw/NAME/cmd` and write only `trustplane/gw/NAME/up/#`.

A message on the command topic is executed only when it is signed by the
control plane's command key (fetched over HTTPS from the control plane at
start), addressed to this gateway, not expired, and its nonce was not seen
before: accepted nonces are kept on disk until their command expires
(nonces.py), so a replay is refused across restarts too, whatever the
clocks say. Anything else is refused, published on `up/result` and
reported to the control plane's log (`gateway.decision`). Commands go to
dockerd directly:

- `pull` {image}: only a repository the control plane registered;
- `start` {container}: only a container whose image is authentic, and not
  while the resource monitor is blind; watched by it afterwards;
- `stop` {container}, `delete` {container};
- `thresholds` {cpu_percent, memory_percent, sustain, interval}: the
  monitor's thresholds.

Status (the monitor's view) is published on `up/status` every
`status_interval` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from trustplane.crypto.command_envelope import Command, open_command
from trustplane.errors import (
    IntegrityError,
    MalformedError,
    NotFoundError,
    TrustplaneError,
    UsageError,
)
from trustplane.gateway import defaults
from trustplane.gateway.control_link import ControlLink
from trustplane.gateway.docker_api import DockerApi
from trustplane.gateway.image_auth import ImageAuthenticator
from trustplane.gateway.monitor import ResourceMonitor
from trustplane.gateway.nonces import NonceStore
from trustplane.gateway.reporter import Reporter
from trustplane.mqtt_client import connect

log = logging.getLogger("trustplane.gateway")
TOPIC_ROOT = "trustplane/gw"
QUEUE_SIZE = 256
NONCE_FILE = defaults.NONCE_FILE
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_IMAGE = re.compile(r"[a-z0-9][a-z0-9._/:@-]{0,254}")


@dataclass(frozen=True)
class MqttConfig:
    url: str
    user: str
    password_file: Path
    ca_file: Path | None = None
    status_interval: float = defaults.STATUS_INTERVAL
    nonce_file: Path = NONCE_FILE
    """The accepted commands' nonces, kept until they expire (see nonces.py)."""


class MqttLink:
    def __init__(
        self,
        config: MqttConfig,
        link: ControlLink,
        docker: DockerApi,
        images: ImageAuthenticator,
        monitor: ResourceMonitor,
        reporter: Reporter | None,
    ) -> None:
        self.config = config
        self.name = config.user
        self.link = link
        self.docker = docker
        self.images = images
        self.monitor = monitor
        self.reporter = reporter
        self._key: ed25519.Ed25519PublicKey | None = None
        self._client: mqtt.Client | None = None
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_SIZE)
        self.nonces = NonceStore(config.nonce_file)
        self._tasks: list[asyncio.Task[None]] = []
        self.executed = 0
        self.refused = 0

    @property
    def command_topic(self) -> str:
        return f"{TOPIC_ROOT}/{self.name}/cmd"

    def up_topic(self, kind: str) -> str:
        return f"{TOPIC_ROOT}/{self.name}/up/{kind}"

    async def start(self) -> None:
        await asyncio.to_thread(self.nonces.load, time.time())
        pem = await self.link.command_key()
        key = serialization.load_pem_public_key(pem.encode())
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise IntegrityError("the control plane's command key is not Ed25519")
        self._key = key
        try:
            password = self.config.password_file.read_text().strip()
        except OSError as exc:
            raise UsageError(f"MQTT password file: {exc.strerror}") from None
        client = await asyncio.to_thread(
            connect,
            self.config.url,
            self.config.user,
            password,
            self.config.ca_file,
            f"tp-gw-{self.name}-{uuid.uuid4().hex[:8]}",
        )
        loop = asyncio.get_running_loop()

        def on_message(_client: mqtt.Client, _data: object, message: mqtt.MQTTMessage) -> None:
            loop.call_soon_threadsafe(self._enqueue, bytes(message.payload))

        def on_connect(
            again: mqtt.Client, _data: object, _flags: object, code: Any, _props: object
        ) -> None:
            if not code.is_failure:  # paho reconnects by itself; subscribe again
                again.subscribe(self.command_topic, qos=1)

        client.on_message = on_message
        client.subscribe(self.command_topic, qos=1)
        client.on_connect = on_connect
        self._client = client
        self._tasks = [
            asyncio.create_task(self._work()),
            asyncio.create_task(self._publish_status()),
        ]
        log.info("mqtt: %s on %s", self.command_topic, self.config.url)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._client is not None:
            client, self._client = self._client, None
            client.disconnect()
            await asyncio.to_thread(client.loop_stop)

    def _enqueue(self, payload: bytes) -> None:
        try:
            self._queue.put_nowait(payload)
        except asyncio.QueueFull:
            self._refuse(None, "the command queue is full")

    def publish(self, kind: str, document: dict[str, Any]) -> None:
        if self._client is not None:
            self._client.publish(self.up_topic(kind), json.dumps(document), qos=1)

    # -- commands ----------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            payload = await self._queue.get()
            try:
                await self.handle(payload)
            except Exception:  # fail closed: a command that breaks is not executed further
                log.exception("mqtt: a command failed")

    async def handle(self, payload: bytes) -> bool:
        """Verify and execute one message; True when executed."""
        assert self._key is not None
        try:
            command = open_command(payload, self._key, self.name)
        except TrustplaneError as exc:
            self._refuse(None, str(exc))
            return False
        try:
            await asyncio.to_thread(
                self.nonces.claim, command.nonce, command.issued, command.expires, time.time()
            )
            message = await self._execute(command)
        except TrustplaneError as exc:
            self._refuse(command, str(exc))
            return False
        except Exception as exc:
            log.exception("mqtt: %s failed", command.command)
            self._refuse(command, f"the gateway could not execute it ({type(exc).__name__})")
            return False
        self.executed += 1
        result = {"nonce": command.nonce, "command": command.command, "ok": True}
        self.publish("result", {**result, "message": message})
        if self.reporter is not None:
            self.reporter.report(
                "gateway.decision",
                {
                    "decision": "allow",
                    "source": "mqtt",
                    "command": command.command,
                    "nonce": command.nonce,
                    "args": json.dumps(command.args)[:512],
                    "reason": message,
                },
            )
        return True

    def _refuse(self, command: Command | None, reason: str) -> None:
        self.refused += 1
        log.warning("mqtt: command refused: %s", reason)
        document: dict[str, Any] = {"ok": False, "reason": reason}
        if command is not None:
            document.update(nonce=command.nonce, command=command.command)
        with contextlib.suppress(Exception):
            self.publish("result", document)
        if self.reporter is not None:
            self.reporter.report(
                "gateway.decision",
                {
                    "decision": "deny",
                    "source": "mqtt",
                    "command": command.command if command else None,
                    "nonce": command.nonce if command else None,
                    "reason": reason,
                },
            )

    async def _execute(self, command: Command) -> str:
        args = command.args
        if command.command == "thresholds":
            self.monitor.thresholds = self.monitor.thresholds.updated(args)
            return f"thresholds now {self.monitor.thresholds}"
        if command.command == "pull":
            image = _arg(args, "image", _IMAGE)
            repository = await self.images.for_pull(image)
            name, tag = _split_tag(image)
            error = await self.docker.pull(name, tag)
            if error:
                raise NotFoundError(f"pull {image}: {error[:200]}")
            return f"pulled {image} ({repository})"
        container = _arg(args, "container", _NAME)
        info = await self.docker.inspect("containers", container)
        if info is None:
            raise NotFoundError(f"No such container: {container}")
        container_id = str(info.get("Id", ""))
        if command.command == "start":
            self.monitor.refuse_start_if_blind()
            await self.images.for_start(str(info.get("Image", "")))
            status = await self.docker.command("POST", f"/containers/{container_id}/start")
            if status not in (204, 304):
                raise NotFoundError(f"dockerd answered {status} to start {container}")
            self.monitor.watch(container_id)
            return f"started {container}"
        if command.command == "stop":
            status = await self.docker.command(
                "POST", f"/containers/{container_id}/stop", {"t": "5"}
            )
            if status not in (204, 304):
                raise NotFoundError(f"dockerd answered {status} to stop {container}")
            return f"stopped {container}"
        status = await self.docker.command("DELETE", f"/containers/{container_id}", {"force": "1"})
        if status != 204:
            raise NotFoundError(f"dockerd answered {status} to delete {container}")
        return f"deleted {container}"

    async def _publish_status(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                self.publish(
                    "status",
                    {
                        "gateway": self.name,
                        "time": time.time(),
                        "executed": self.executed,
                        "refused": self.refused,
                        **self.monitor.status(),
                    },
                )
            await asyncio.sleep(self.config.status_interval)


def _arg(args: dict[str, Any], name: str, pattern: re.Pattern[str]) -> str:
    value = args.get(name)
    if not isinstance(value, str) or pattern.fullmatch(value) is None or ".." in value:
        raise MalformedError(f"the command needs a valid {name!r}")
    return value


def _split_tag(image: str) -> tuple[str, str]:
    """(name, tag or digest) for `POST /images/create?fromImage=NAME&tag=TAG`."""
    name, _, digest = image.partition("@")
    if digest:
        return name, digest
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        return name[:colon], name[colon + 1 :]
    return name, "latest"
