"""The MQTT link with the real mosquitto, dockerd and control plane.

The control plane signs a command and publishes it through the broker; the
gateway executes it on dockerd. A forged command (another key), a replayed
one (the same envelope again) and one for another gateway are refused,
published as refused and reported to the log. The broker's ACL keeps a
gateway to its own topics.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import paho.mqtt.client as mqtt
import pytest
from control_helpers import log_size
from cryptography.hazmat.primitives.asymmetric import ed25519
from gateway_helpers import PREFIX, RunningGateway, restart_gateway, start_gateway
from gateway_helpers import cleanup as cleanup
from gateway_helpers import registered_base as registered_base
from test_gateway_reports import wait_for_entries

from trustplane.api.commands import CommandName, CommandSent
from trustplane.api.images import LayerRecord
from trustplane.client import ControlClient
from trustplane.crypto.command_envelope import sign_command
from trustplane.embedded.control_plane import RunningControlPlane, start_control_plane
from trustplane.embedded.dockerd import DockerDaemon
from trustplane.embedded.mosquitto import CONTROL_USER, RunningMosquitto
from trustplane.errors import TrustplaneError
from trustplane.mqtt_client import connect

pytestmark = pytest.mark.usefixtures("cleanup")


@pytest.fixture(scope="module")
def plane(
    tmp_path_factory: pytest.TempPathFactory, mosquitto: RunningMosquitto
) -> Iterator[RunningControlPlane]:
    """A control plane that publishes its commands through the test broker."""
    work_dir = tmp_path_factory.mktemp("control-plane-mqtt")
    secret = work_dir / "mqtt-control-password"
    secret.write_text(mosquitto.control_password)
    secret.chmod(0o600)
    env = {
        "TRUSTPLANE_MQTT__URL": mosquitto.url,
        "TRUSTPLANE_MQTT__PASSWORD_FILE": str(secret),
        "TRUSTPLANE_MQTT__CA_FILE": str(mosquitto.ca_file),
    }
    try:
        server = start_control_plane(work_dir / "server", env=env)
    except TrustplaneError as exc:
        pytest.fail(f"trustplane server with MQTT: {exc}")
    yield server
    server.stop()


class Listener:
    """A subscriber with the control plane's broker credentials: what gateways publish."""

    def __init__(self, broker: RunningMosquitto, topic: str) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.client = connect(broker.url, CONTROL_USER, broker.control_password,
                              broker.ca_file, f"listener-{time.monotonic_ns()}")  # fmt: skip

        def on_message(_c: mqtt.Client, _d: object, message: mqtt.MQTTMessage) -> None:
            with self.lock:
                self.messages.append((message.topic, json.loads(message.payload)))

        self.client.on_message = on_message
        self.client.subscribe(topic, qos=1)
        time.sleep(0.3)

    def wait(self, match: Any, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for topic, document in self.messages:
                    if match(topic, document):
                        return document
            time.sleep(0.1)
        raise AssertionError(f"no matching message; got {self.messages[-5:]}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def mqtt_gateway(
    directory: Path, plane: RunningControlPlane, daemon: DockerDaemon, broker: RunningMosquitto
) -> Iterator[RunningGateway]:
    node = f"{PREFIX}-{directory.name}"
    password_file = directory.parent / f"{directory.name}.mqtt-password"
    password_file.write_text(broker.add_user(node))
    password_file.chmod(0o600)
    yield from start_gateway(
        directory, plane, daemon,
        "--mqtt", broker.url, "--mqtt-password-file", str(password_file),
        "--mqtt-ca", str(broker.ca_file), "--status-interval", "1",
        "--mqtt-nonce-file", str(directory / "state" / "mqtt-nonces.json"),
    )  # fmt: skip


def send(admin: ControlClient, gateway: str, command: CommandName, **args: Any) -> CommandSent:
    answer = admin.send_command(gateway, command, args)
    assert answer.published is True
    return answer


def nonce_of(envelope: bytes | str) -> str:
    import base64

    return str(json.loads(base64.b64decode(json.loads(envelope)["payload"]))["nonce"])


def test_commands_are_executed_and_forgeries_and_replays_refused(
    tmp_path: Path,
    plane: RunningControlPlane,
    mosquitto: RunningMosquitto,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    registered_base: str,
) -> None:
    with plane.admin() as admin:
        image = docker_client.images.get(registered_base)
        layers = [LayerRecord(index=i, digest=d, encrypted=False, diff_id=d)
                  for i, d in enumerate(image.attrs["RootFS"]["Layers"])]  # fmt: skip
        admin.register_image(registered_base.rsplit(":", 1)[0], image.id, layers)
        gateways = mqtt_gateway(tmp_path / "gw-mqtt", plane, docker_daemon, mosquitto)
        gateway = next(gateways)
        listener = Listener(mosquitto, f"trustplane/gw/{gateway.node}/up/#")
        name = f"{PREFIX}-mqtt-target"
        try:
            start = log_size(plane)
            status = listener.wait(lambda t, d: t.endswith("/up/status"))
            assert status["gateway"] == gateway.node

            container = docker_client.containers.create(registered_base, ["sleep", "1000"],
                                                        name=name)  # fmt: skip
            started = send(admin, gateway.node, "start", container=name)
            done = listener.wait(lambda t, d: d.get("nonce") == nonce_of(started.envelope))
            assert done["ok"] is True, done
            container.reload()
            assert container.status == "running"

            stopped = send(admin, gateway.node, "stop", container=name)
            done = listener.wait(lambda t, d: d.get("nonce") == nonce_of(stopped.envelope))
            assert done["ok"] is True, done
            container.reload()
            assert container.status == "exited"

            changed = send(admin, gateway.node, "thresholds", cpu_percent=42, sustain=5)
            done = listener.wait(lambda t, d: d.get("nonce") == nonce_of(changed.envelope))
            assert "cpu_percent=42.0" in done["message"], done

            # Replay: the start command recorded off the wire, published again.
            publisher = connect(mosquitto.url, CONTROL_USER, mosquitto.control_password,
                                mosquitto.ca_file, "replayer")  # fmt: skip
            topic = f"trustplane/gw/{gateway.node}/cmd"
            publisher.publish(topic, started.envelope, qos=1).wait_for_publish(10)
            replay = listener.wait(lambda t, d: d.get("nonce") == nonce_of(started.envelope)
                                   and d.get("ok") is False)  # fmt: skip
            assert "replayed" in replay["reason"]
            container.reload()
            assert container.status == "exited"  # not started again

            # Forgery: well-formed, signed by a key that is not the control plane's.
            forged = sign_command(ed25519.Ed25519PrivateKey.generate(), gateway.node, "start",
                                  {"container": name})  # fmt: skip
            publisher.publish(topic, forged, qos=1).wait_for_publish(10)
            refusal = listener.wait(lambda t, d: d.get("ok") is False and "signature" in
                                    d.get("reason", ""))  # fmt: skip
            assert "not the control plane's" in refusal["reason"]
            # For another gateway, signed by the control plane: refused too.
            other = admin.send_command("someone-else", "delete", {"container": name})
            publisher.publish(topic, other.envelope, qos=1).wait_for_publish(10)
            listener.wait(lambda t, d: "addressed to" in d.get("reason", ""))
            publisher.disconnect()
            publisher.loop_stop()
            container.reload()
            assert container.status == "exited"

            deleted = send(admin, gateway.node, "delete", container=name)
            done = listener.wait(lambda t, d: d.get("nonce") == nonce_of(deleted.envelope))
            assert done["ok"] is True, done
            with pytest.raises(docker.errors.NotFound):
                docker_client.containers.get(name)

            entries = wait_for_entries(admin, start, gateway.node, 7)
            refused = [e["reason"] for e in entries
                       if e["kind"] == "gateway.decision" and e["decision"] == "deny"]  # fmt: skip
            assert any("replayed" in r for r in refused), refused
            assert any("signature" in r for r in refused), refused
            assert any("addressed to" in r for r in refused), refused
            executed = [e for e in entries if e.get("source") == "mqtt" and
                        e["decision"] == "allow"]  # fmt: skip
            assert {e["command"] for e in executed} >= {"start", "stop", "thresholds", "delete"}
        finally:
            listener.close()
            gateways.close()


def test_a_command_replayed_after_a_restart_is_refused_by_its_recorded_nonce(
    tmp_path: Path,
    plane: RunningControlPlane,
    mosquitto: RunningMosquitto,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    registered_base: str,
) -> None:
    """The accepted nonces outlive the gateway: a command recorded off the wire and
    published again after a restart is refused as a replay (not by comparing the
    control plane's clock with the gateway's start), while a command issued during
    the restart and delivered late was never accepted, and runs."""
    with plane.admin() as admin:
        image = docker_client.images.get(registered_base)
        layers = [LayerRecord(index=i, digest=d, encrypted=False, diff_id=d)
                  for i, d in enumerate(image.attrs["RootFS"]["Layers"])]  # fmt: skip
        admin.register_image(registered_base.rsplit(":", 1)[0], image.id, layers)
        directory = tmp_path / "gw-restart"
        gateways = mqtt_gateway(directory, plane, docker_daemon, mosquitto)
        gateway = next(gateways)
        restarted: RunningGateway | None = None
        listener = Listener(mosquitto, f"trustplane/gw/{gateway.node}/up/#")
        name = f"{PREFIX}-mqtt-restart"
        try:
            start = log_size(plane)
            listener.wait(lambda t, d: t.endswith("/up/status"))
            container = docker_client.containers.create(registered_base, ["sleep", "1000"],
                                                        name=name)  # fmt: skip
            started = send(admin, gateway.node, "start", container=name)
            done = listener.wait(lambda t, d: d.get("nonce") == nonce_of(started.envelope))
            assert done["ok"] is True, done
            container.stop(timeout=1)  # directly on dockerd: a replayed start would show
            record = directory / "state" / "mqtt-nonces.json"
            assert nonce_of(started.envelope) in json.loads(record.read_text())["nonces"]

            gateway.process.stop()
            # Issued while the gateway is down: the broker keeps it for nobody; it
            # arrives late (re-published below), after the restart.
            late = send(admin, gateway.node, "thresholds", cpu_percent=55)
            back = time.time()
            restarted = restart_gateway(gateway)
            listener.wait(lambda t, d: t.endswith("/up/status") and d["time"] > back)

            publisher = connect(mosquitto.url, CONTROL_USER, mosquitto.control_password,
                                mosquitto.ca_file, "replayer-after-restart")  # fmt: skip
            topic = f"trustplane/gw/{gateway.node}/cmd"
            publisher.publish(topic, started.envelope, qos=1).wait_for_publish(10)
            replay = listener.wait(lambda t, d: d.get("nonce") == nonce_of(started.envelope)
                                   and d.get("ok") is False)  # fmt: skip
            assert "replayed" in replay["reason"], replay
            container.reload()
            assert container.status == "exited"  # not started again

            publisher.publish(topic, late.envelope, qos=1).wait_for_publish(10)
            ran = listener.wait(lambda t, d: d.get("nonce") == nonce_of(late.envelope))
            assert ran["ok"] is True, ran
            assert "cpu_percent=55.0" in ran["message"]
            # ... once: the late command is a replay the second time.
            publisher.publish(topic, late.envelope, qos=1).wait_for_publish(10)
            again = listener.wait(lambda t, d: d.get("nonce") == nonce_of(late.envelope)
                                  and d.get("ok") is False)  # fmt: skip
            assert "replayed" in again["reason"], again
            publisher.disconnect()
            publisher.loop_stop()

            entries = wait_for_entries(admin, start, gateway.node, 5)
            decisions = [(e["decision"], e.get("nonce"), str(e.get("reason")))
                         for e in entries if e["kind"] == "gateway.decision"]  # fmt: skip
            replayed = [d for d in decisions if d[0] == "deny" and "replayed" in d[2]]
            assert {d[1] for d in replayed} == {
                nonce_of(started.envelope),
                nonce_of(late.envelope),
            }, decisions
            assert ("allow", nonce_of(late.envelope)) in {(d[0], d[1]) for d in decisions}
        finally:
            listener.close()
            if restarted is not None:
                restarted.process.stop()
            gateways.close()


def test_a_gateway_cannot_use_another_gateways_topics(mosquitto: RunningMosquitto) -> None:
    one, two = f"{PREFIX}-acl-one", f"{PREFIX}-acl-two"
    password_one = mosquitto.add_user(one)
    password_two = mosquitto.add_user(two)
    listener = Listener(mosquitto, "trustplane/gw/+/up/#")
    victim = connect(mosquitto.url, two, password_two, mosquitto.ca_file, "victim")
    delivered: list[bytes] = []
    victim.on_message = lambda _c, _d, message: delivered.append(bytes(message.payload))
    victim.subscribe(f"trustplane/gw/{two}/cmd", qos=1)
    spy = connect(mosquitto.url, one, password_one, mosquitto.ca_file, "spy")
    received: list[str] = []
    granted: list[Any] = []
    subscribed = threading.Event()
    spy.on_message = lambda _c, _d, message: received.append(message.topic)

    def on_subscribe(_c: mqtt.Client, _d: object, _mid: int, codes: list[Any], _p: object) -> None:
        granted.extend(codes)
        subscribed.set()

    spy.on_subscribe = on_subscribe
    try:
        spy.subscribe(f"trustplane/gw/{two}/cmd", qos=1)
        assert subscribed.wait(10)
        # mosquitto 2.0 with MQTT 3.1.1 may grant the subscription; its ACL then
        # withholds every message on it (checked below), which is what matters.
        assert len(granted) == 1
        control = connect(mosquitto.url, CONTROL_USER, mosquitto.control_password,
                          mosquitto.ca_file, "control")  # fmt: skip
        control.publish(f"trustplane/gw/{two}/cmd", b"for two only", qos=1).wait_for_publish(10)
        spy.publish(f"trustplane/gw/{two}/up/status", b'{"forged": 1}', qos=1).wait_for_publish(10)
        spy.publish(f"trustplane/gw/{two}/cmd", b'{"forged": 2}', qos=1).wait_for_publish(10)
        spy.publish(f"trustplane/gw/{one}/up/status", b'{"own": 1}', qos=1).wait_for_publish(10)
        own = listener.wait(lambda t, d: t == f"trustplane/gw/{one}/up/status")
        assert own == {"own": 1}  # its own topic works, so the others' silence is the ACL
        time.sleep(1)
        assert received == []
        assert not [t for t, _ in listener.messages if two in t]
        assert delivered == [b"for two only"]  # the spy's forged command never arrived
        control.disconnect()
        control.loop_stop()
    finally:
        for client in (spy, victim):
            client.disconnect()
            client.loop_stop()
        listener.close()
