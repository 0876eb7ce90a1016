"""The demo's edge scene (cli/demo_edge.py), with the test session's dockerd and mosquitto."""

from __future__ import annotations

from pathlib import Path

import docker
from gateway_helpers import PREFIX
from test_gateway_mqtt import plane as plane

from trustplane.cli.demo_edge import edge_scene
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.dockerd import DockerDaemon
from trustplane.embedded.mosquitto import RunningMosquitto


def test_the_edge_scene_refuses_allows_and_stops_as_it_says(
    tmp_path: Path,
    plane: RunningControlPlane,
    mosquitto: RunningMosquitto,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    busybox_base: str,
) -> None:
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {busybox_base}\nRUN echo other > /other\n")
    unregistered = f"{PREFIX}/demo-unregistered:1"
    docker_client.images.build(path=str(context), tag=unregistered, rm=True)
    said: list[tuple[str, str]] = []
    proved: list[str] = []
    try:
        entries = edge_scene(
            tmp_path / "edge", docker_daemon, plane, docker_client, busybox_base,
            unregistered, lambda label, text: said.append((label, text)), proved.append,
            prefix=f"{PREFIX}-demo", broker=mosquitto,
        )  # fmt: skip
    finally:
        docker_client.images.remove(unregistered, force=True)
    assert len(proved) == 6
    assert any(e.get("source") == "mqtt" and e.get("command") == "delete" for e in entries)
    kinds = [e["kind"] for e in entries]
    assert "gateway.monitor" in kinds
    reasons = " ".join(str(e.get("reason")) for e in entries if e["kind"] == "gateway.decision")
    assert "normal privilege" in reasons
    assert "is not registered" in reasons
    assert any(label == "monitor" for label, _ in said)
