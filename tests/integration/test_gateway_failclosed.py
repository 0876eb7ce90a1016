"""Fail closed: when the control plane cannot answer, or refuses the gateway, nothing passes."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from gateway_helpers import PREFIX, DockerCli, People, container_exists, make_people
from gateway_helpers import cleanup as cleanup
from gateway_helpers import registered_base as registered_base

from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.dockerd import DockerDaemon
from trustplane.embedded.process import ManagedProcess, UnixSocketReady, free_port
from trustplane.gateway.control_link import ControlLink
from trustplane.gateway.decide import Gatekeeper, Verdict
from trustplane.gateway.docker_api import DockerApi

pytestmark = pytest.mark.usefixtures("cleanup")


def token_gateway(
    directory: Path, server: str, ca: Path, daemon: DockerDaemon, token: str
) -> ManagedProcess:
    """A gateway whose own identity is a token file (no network needed to start)."""
    directory.mkdir(parents=True)
    token_file = directory / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    sock = directory / "docker.sock"
    return ManagedProcess(
        "trustplane gateway",
        [
            sys.executable, "-m", "trustplane", "gateway",
            "--listen", f"unix://{sock}", "--docker", daemon.base_url,
            "--server", server, "--ca", str(ca), "--token-file", str(token_file),
            "--control-timeout", "1",
        ],
        directory,
        ready=UnixSocketReady(sock),
        timeout=60,
    ).start()  # fmt: skip


@pytest.fixture(scope="module")
def crew(control_plane: RunningControlPlane, registered_base: str) -> People:
    return make_people(control_plane, "fc")


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener.getsockname()[1]


@pytest.mark.parametrize("where", ["closed port", "never answers"])
def test_an_unreachable_control_plane_denies_everything(
    where: str,
    blackhole: int,
    tmp_path: Path,
    control_plane: RunningControlPlane,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    crew: People,
    registered_base: str,
) -> None:
    port = free_port() if where == "closed port" else blackhole
    gateway = token_gateway(
        tmp_path / "gw",
        f"https://127.0.0.1:{port}",
        control_plane.ca_file,
        docker_daemon,
        crew.operator_token,
    )
    try:
        cli = DockerCli.make(f"unix://{tmp_path / 'gw' / 'docker.sock'}", tmp_path / "cli",
                             crew.operator_token)  # fmt: skip
        name = f"{PREFIX}-unreachable"
        cli.refused("run", "--name", name, registered_base, "true", text="control plane")
        cli.refused("ps", text="control plane")
        assert not container_exists(docker_client, name)
    finally:
        gateway.stop()


def test_a_gateway_the_control_plane_does_not_trust_denies_changes(
    tmp_path: Path,
    control_plane: RunningControlPlane,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    crew: People,
    registered_base: str,
) -> None:
    gateway = token_gateway(
        tmp_path / "gw", control_plane.url, control_plane.ca_file, docker_daemon, "junk"
    )
    try:
        cli = DockerCli.make(f"unix://{tmp_path / 'gw' / 'docker.sock'}", tmp_path / "cli",
                             crew.operator_token)  # fmt: skip
        assert "CONTAINER ID" in cli.ok("ps")  # the caller is verified with their own token
        name = f"{PREFIX}-untrusted-gw"
        cli.refused("run", "--name", name, registered_base, "true", text="control plane")
        assert not container_exists(docker_client, name)
    finally:
        gateway.stop()


def test_a_container_made_from_another_image_than_checked_is_removed(
    tmp_path: Path,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    registered_base: str,
) -> None:
    """The tag-moved-between-check-and-create race: dockerd's result is checked too."""
    link = ControlLink("https://127.0.0.1:9", None, token_file=tmp_path / "unused")
    engine = DockerApi(str(docker_daemon.socket))
    keeper = Gatekeeper(link, engine)
    image_id = docker_client.images.get(registered_base).id
    moved = docker_client.containers.create(registered_base, "true", name=f"{PREFIX}-moved")
    kept = docker_client.containers.create(registered_base, "true", name=f"{PREFIX}-kept")

    async def confirm(container_id: str, checked: str) -> bool:
        verdict = Verdict(True, 200, "allowed", image_id=checked)
        answer = json.dumps({"Id": container_id, "Warnings": []}).encode()
        return await keeper.confirm_created(verdict, answer)

    async def scenario() -> tuple[bool, bool, bool]:
        try:
            return (
                await confirm(moved.id, "sha256:" + "0" * 64),
                await confirm(kept.id, image_id),
                await confirm("", image_id),
            )
        finally:
            await link.close()
            await engine.close()

    assert asyncio.run(scenario()) == (False, True, False)
    assert not container_exists(docker_client, f"{PREFIX}-moved")
    assert container_exists(docker_client, f"{PREFIX}-kept")
