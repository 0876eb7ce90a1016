"""The edge gateway as the tests run it: a real `trustplane gateway` process in
front of the real dockerd, a real control plane behind it, and the real docker
CLI talking to it with a token in its config.json `HttpHeaders`."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest

from trustplane.api.images import LayerRecord
from trustplane.atomic import atomic_write
from trustplane.crypto.keys import generate_key_pair
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.dockerd import DockerDaemon
from trustplane.embedded.process import ManagedProcess, UnixSocketReady

PREFIX = f"tpgw{os.getpid()}"


@dataclass(frozen=True)
class DockerCli:
    """The docker CLI binary, pointed at `host`, sending `token` (if any) on every call."""

    host: str
    config_dir: Path

    @classmethod
    def make(cls, host: str, directory: Path, token: str | None) -> DockerCli:
        directory.mkdir(parents=True, exist_ok=True)
        config: dict[str, object] = {}
        if token is not None:
            config["HttpHeaders"] = {"X-Trustplane-Token": token}
        (directory / "config.json").write_text(json.dumps(config))
        return cls(host, directory)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DOCKER_HOST": self.host,
            "DOCKER_CONFIG": str(self.config_dir),
            "DOCKER_BUILDKIT": "0",
            "DOCKER_CLI_HINTS": "false",
        }

    def __call__(
        self, *args: str, timeout: float = 120, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            cwd=cwd,
        )

    def ok(self, *args: str, timeout: float = 120) -> str:
        result = self(*args, timeout=timeout)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result.stdout

    def refused(self, *args: str, text: str) -> str:
        result = self(*args)
        assert result.returncode != 0, (args, result.stdout, result.stderr)
        assert "Error response from daemon" in result.stderr, result.stderr
        assert text in result.stderr, result.stderr
        return result.stderr

    def with_tty(self, *args: str, script: list[str], expect: str, timeout: float = 60) -> str:
        """Run `docker ARGS` on a pseudo-terminal, type `script`, return all it printed."""
        controller, terminal = pty.openpty()
        process = subprocess.Popen(
            ["docker", *args],
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            env=self.env,
            close_fds=True,
        )
        os.close(terminal)
        output = b""
        deadline = time.monotonic() + timeout
        pending = list(script)
        mark = 0
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([controller], [], [], 0.5)
                if ready:
                    try:
                        data = os.read(controller, 4096)
                    except OSError:
                        break  # the terminal closed: docker exited
                    if not data:
                        break
                    output += data
                if pending and b"# " in output[mark:]:  # busybox sh's prompt
                    mark = len(output)
                    os.write(controller, pending.pop(0).encode())
                if expect.encode() in output and not pending and process.poll() is not None:
                    break
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            os.close(controller)
        text = output.decode(errors="replace")
        assert expect in text, text
        assert process.returncode == 0, (process.returncode, text)
        return text


@dataclass(frozen=True)
class RunningGateway:
    socket: Path
    node: str
    process: ManagedProcess

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def raw(self, request: bytes, timeout: float = 10) -> bytes:
        """Send raw bytes on a fresh connection; everything the gateway answers before closing."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.socket))
            sock.sendall(request)
            with_shutdown(sock)
            answer = b""
            while chunk := _recv(sock):
                answer += chunk
            return answer

    def health(self) -> tuple[int, dict[str, Any]]:
        """`GET /_trustplane/health`, answered by the gateway itself: (status, document)."""
        answer = self.raw(b"GET /_trustplane/health HTTP/1.1\r\nHost: gw\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), json.loads(body)


def with_shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except (ConnectionResetError, TimeoutError):
        return b""


def start_gateway(
    work_dir: Path, plane: RunningControlPlane, daemon: DockerDaemon, *args: str
) -> Iterator[RunningGateway]:
    """Register a gateway node, start `trustplane gateway` as that node, stop it after."""
    node = f"{PREFIX}-{work_dir.name}"
    work_dir.mkdir(parents=True, exist_ok=True)
    key_file = work_dir / "node-key.pem"
    private, public = generate_key_pair("ec-p256")
    atomic_write(key_file, private, mode=0o600)
    with plane.admin() as admin:
        admin.register_node(node, "gateway", public.decode())
    sock = work_dir / "docker.sock"
    process = ManagedProcess(
        "trustplane gateway",
        [
            sys.executable,
            "-m",
            "trustplane",
            "gateway",
            "--listen",
            f"unix://{sock}",
            "--docker",
            daemon.base_url,
            "--server",
            plane.url,
            "--ca",
            str(plane.ca_file),
            "--node",
            node,
            "--node-key",
            str(key_file),
            *args,
        ],
        work_dir,
        ready=UnixSocketReady(sock),
        timeout=60,
    ).start()
    try:
        yield RunningGateway(sock, node, process)
    finally:
        process.stop()


def restart_gateway(gateway: RunningGateway) -> RunningGateway:
    """The same gateway (node, key, options, files) stopped and started again.

    The caller stops the returned one; the first one's `start_gateway` finally
    only stops what is already stopped.
    """
    old = gateway.process
    old.stop()
    process = ManagedProcess(
        f"{old.name} (restarted)",
        old.argv,
        old.work_dir,
        ready=UnixSocketReady(gateway.socket),
        timeout=60,
    ).start()
    return RunningGateway(gateway.socket, gateway.node, process)


@dataclass(frozen=True)
class People:
    operator: str
    operator_token: str
    user: str
    user_token: str


def make_people(plane: RunningControlPlane, tag: str) -> People:
    tokens = {}
    with plane.admin() as admin:
        for role in ("operator", "user"):
            name = f"{PREFIX}-{tag}-{role}"
            created = admin.create_user(name, role)
            with plane.client() as client:
                tokens[role] = (name, client.login(name, created.password).access_token)
    return People(
        tokens["operator"][0], tokens["operator"][1], tokens["user"][0], tokens["user"][1]
    )


def register_local_image(plane: RunningControlPlane, client: docker.DockerClient, tag: str) -> None:
    """Register a local image's layers (it was never pushed: no manifest digest).

    Its config digest (the image id) stands in for the manifest digest; the
    gateway matches it by its layers' diff_ids.
    """
    image = client.images.get(tag)
    diff_ids = image.attrs["RootFS"]["Layers"]
    repository = tag.rsplit(":", 1)[0]
    layers = [
        LayerRecord(index=i, digest=d, encrypted=False, diff_id=d) for i, d in enumerate(diff_ids)
    ]
    with plane.admin() as admin:
        admin.register_image(repository, image.id, layers)


def container_exists(client: docker.DockerClient, name: str) -> bool:
    try:
        client.containers.get(name)
    except docker.errors.NotFound:
        return False
    return True


def remove_containers(client: docker.DockerClient) -> None:
    """Remove every container this test process made (directly on dockerd)."""
    for container in client.containers.list(all=True, filters={"name": PREFIX}):
        with contextlib.suppress(docker.errors.APIError):
            container.remove(force=True)


@pytest.fixture
def cleanup(docker_client: docker.DockerClient) -> Iterator[None]:
    yield
    remove_containers(docker_client)


@pytest.fixture(scope="session")
def registered_base(
    control_plane: RunningControlPlane, docker_client: docker.DockerClient, busybox_base: str
) -> str:
    """The BusyBox base image, registered with the control plane."""
    register_local_image(control_plane, docker_client, busybox_base)
    return busybox_base
