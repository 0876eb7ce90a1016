"""The demo's edge scene: the gateway in front of dockerd, with the real docker CLI.

A gateway node is registered and `trustplane gateway` started in front of
dockerd with tight monitor thresholds; then, with the docker CLI sending
each person's token in its `HttpHeaders`:

- a normal user's `docker run` is refused at the gateway;
- an operator's `docker run` of a registered image is authorized by the
  control plane and runs;
- an unregistered image is refused;
- a memory hog is stopped by the resource monitor;

and the refusals and the stop are read back from the transparency log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import docker

from trustplane.crypto.keys import new_private_key_file
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.dockerd import DockerDaemon
from trustplane.embedded.mosquitto import RunningMosquitto
from trustplane.embedded.process import ManagedProcess, UnixSocketReady
from trustplane.errors import IntegrityError

HOG = "dd if=/dev/zero of=/dev/shm/x bs=1M count=48 2>/dev/null; sleep 1000"
Say = Callable[[str, str], None]


def edge_scene(
    work: Path,
    daemon: DockerDaemon,
    control: RunningControlPlane,
    client: docker.DockerClient,
    registered: str,
    unregistered: str,
    say: Say,
    proved: Callable[[str], None],
    prefix: str = "demo-edge",
    broker: RunningMosquitto | None = None,
) -> list[dict[str, Any]]:
    """Run the scene; returns the gateway's log entries (raises IntegrityError on a miss)."""
    work.mkdir(parents=True, exist_ok=True)
    with control.admin() as admin, ExitStack() as stack:
        node = f"{prefix}-gw"
        key_file = work / "gateway-key.pem"
        public = new_private_key_file(key_file)
        admin.register_node(node, "gateway", public.decode())
        image = client.images.get(registered)
        layers = [
            {"index": i, "digest": d, "encrypted": False, "diff_id": d}
            for i, d in enumerate(image.attrs["RootFS"]["Layers"])
        ]
        admin.register_image(registered.rsplit(":", 1)[0], str(image.id), layers)
        sock = work / "docker.sock"
        mqtt_args: list[str] = []
        if broker is not None:
            password_file = work / "mqtt-password"
            password_file.write_text(broker.add_user(node))
            password_file.chmod(0o600)
            mqtt_args = ["--mqtt", broker.url, "--mqtt-password-file", str(password_file),
                         "--mqtt-ca", str(broker.ca_file),
                         "--mqtt-nonce-file", str(work / "mqtt-nonces.json")]  # fmt: skip
        gateway = ManagedProcess(
            "trustplane gateway",
            [
                sys.executable, "-m", "trustplane", "gateway",
                "--listen", f"unix://{sock}", "--docker", daemon.base_url,
                "--server", control.url, "--ca", str(control.ca_file),
                "--node", node, "--node-key", str(key_file),
                "--memory-threshold", "50", "--sustain", "2", "--monitor-interval", "0.5",
                *mqtt_args,
            ],
            work,
            ready=UnixSocketReady(sock),
            timeout=60,
        ).start()  # fmt: skip
        stack.callback(gateway.stop)
        say("gateway", f"{node} on unix://{sock} -> {daemon.base_url}; memory threshold 50 %")
        start = int(admin.json("GET", "/healthz")["log_size"])

        tokens = {}
        for role in ("user", "operator"):
            name = f"{prefix}-{role}"
            created = admin.create_user(name, role)
            with control.client() as person:
                tokens[role] = person.login(name, created["password"])["access_token"]

        def docker_cli(role: str, *args: str) -> subprocess.CompletedProcess[str]:
            config = work / f"docker-{role}"
            config.mkdir(exist_ok=True)
            (config / "config.json").write_text(
                json.dumps({"HttpHeaders": {"X-Trustplane-Token": tokens[role]}})
            )
            env = {**os.environ, "DOCKER_HOST": f"unix://{sock}", "DOCKER_CONFIG": str(config)}
            return subprocess.run(
                ["docker", *args], env=env, capture_output=True, text=True, timeout=120
            )

        names = {n: f"{prefix}-{n}" for n in ("user", "app", "unregistered", "hog")}

        def cleanup() -> None:
            for name in names.values():
                with suppress(docker.errors.NotFound):
                    client.containers.get(name).remove(force=True)

        cleanup()
        stack.callback(cleanup)

        refused = docker_cli("user", "run", "--name", names["user"], registered, "true")
        if refused.returncode == 0 or "normal privilege" not in refused.stderr:
            raise IntegrityError(f"a normal user was not refused: {refused.stderr.strip()}")
        say("user", _error_line(refused.stderr))
        proved("a caller of normal privilege is refused every change at the gateway")

        ran = docker_cli("operator", "run", "--name", names["app"], registered, "echo", "hello")
        if ran.returncode != 0 or "hello" not in ran.stdout:
            raise IntegrityError(f"the operator's run failed: {ran.stderr.strip()}")
        say("operator", f"docker run {registered}: {ran.stdout.strip()}")
        proved("a super user's run of a registered image is authorized by the control plane")

        other = docker_cli("operator", "run", "--name", names["unregistered"], unregistered)
        if other.returncode == 0 or "is not registered" not in other.stderr:
            raise IntegrityError(f"an unregistered image ran: {other.stderr.strip()}")
        say("operator", _error_line(other.stderr))
        proved("an image the control plane did not register is refused")

        hog = docker_cli("operator", "run", "-d", "--name", names["hog"], "--memory", "64m",
                         registered, "sh", "-c", HOG)  # fmt: skip
        if hog.returncode != 0:
            raise IntegrityError(f"the memory hog did not start: {hog.stderr.strip()}")
        deadline = time.monotonic() + 60
        while client.containers.get(names["hog"]).status == "running":
            if time.monotonic() > deadline:
                raise IntegrityError("the monitor did not stop the memory hog")
            time.sleep(0.5)
        entries: list[dict[str, Any]] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            size = int(admin.json("GET", "/healthz")["log_size"])
            entries = [json.loads(admin.log_entry(i)) for i in range(start, size)]
            entries = [e for e in entries if str(e.get("kind", "")).startswith("gateway.")]
            if any(e["kind"] == "gateway.monitor" for e in entries):
                break
            time.sleep(0.5)
        stops = [e for e in entries if e["kind"] == "gateway.monitor"]
        if not stops:
            raise IntegrityError("the monitor's stop is not in the transparency log")
        stop = stops[0]
        limit = int(stop["memory_limit"]) // (1024 * 1024)
        say(
            "monitor",
            f"stopped {stop['container']}: memory {stop['value']} % of its {limit} MiB limit "
            f"for {stop['sustained_s']} s",
        )
        proved("a container over its memory threshold is stopped and the stop is reported")
        if broker is not None:
            sent = admin.json(
                "POST",
                "/v1/commands",
                json={"gateway": node, "command": "delete", "args": {"container": names["app"]}},
            )
            deadline = time.monotonic() + 20
            while _exists(client, names["app"]):
                if time.monotonic() > deadline:
                    raise IntegrityError("the MQTT command was not executed")
                time.sleep(0.3)
            say("control plane", f"signed 'delete {names['app']}' (log entry {sent['log_index']}) "
                f"and published it to trustplane/gw/{node}/cmd")  # fmt: skip
            proved("a command signed by the control plane reached the gateway over MQTT")
            time.sleep(1)  # its report follows
            size = int(admin.json("GET", "/healthz")["log_size"])
            entries = [json.loads(admin.log_entry(i)) for i in range(start, size)]
            entries = [e for e in entries if str(e.get("kind", "")).startswith("gateway.")]
        for entry in entries:
            detail = entry.get("reason") or f"{entry.get('action')} {entry.get('container')}"
            if entry["kind"] == "gateway.command":
                detail = f"{entry['asker']} sent {entry['command']} {entry['args']}"
            say(entry["kind"], str(detail)[:120])
        proved("the gateway's own refusals and its monitor's actions are in the log")
        return entries


def _exists(client: docker.DockerClient, name: str) -> bool:
    try:
        client.containers.get(name)
    except docker.errors.NotFound:
        return False
    return True


def _error_line(stderr: str) -> str:
    """The daemon's (the gateway's) error as the docker CLI printed it."""
    lines = stderr.strip().splitlines()
    return next((line for line in lines if "Error response" in line), lines[0] if lines else "")
