"""The container metadata logged with each decision on an existing container.

For stop, modify, exec and delete the gateway sends the container's id,
name, image, process id and current resource use along with its question
to the control plane, which logs them with the decision (`context` of the
`authorize` entry). Checked against dockerd's own view of the container.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import docker
import pytest
from control_helpers import add_policy_rule, entries_since, log_size
from gateway_helpers import PREFIX, DockerCli, make_people, start_gateway
from gateway_helpers import cleanup as cleanup
from gateway_helpers import registered_base as registered_base

from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.dockerd import DockerDaemon

pytestmark = pytest.mark.usefixtures("cleanup")


def decisions(plane: RunningControlPlane, start: int, node: str) -> list[dict[str, Any]]:
    with plane.admin() as admin:
        return [
            entry
            for entry in entries_since(admin, start)
            if entry["kind"] == "authorize" and entry.get("asker") == f"node:{node}"
        ]


def test_decisions_on_a_running_container_carry_its_resource_use(
    tmp_path: Path,
    control_plane: RunningControlPlane,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    registered_base: str,
) -> None:
    people = make_people(control_plane, "meta")
    gateways = start_gateway(
        tmp_path / "gw-meta", control_plane, docker_daemon, "--monitor-interval", "0.5"
    )
    gateway = next(gateways)
    try:
        operator = DockerCli.make(gateway.host, tmp_path / "op", people.operator_token)
        name = f"{PREFIX}-meta-busy"
        burn = "while :; do :; done"
        container_id = operator.ok("run", "-d", "--name", name, registered_base, "sh", "-c", burn)
        container = docker_client.containers.get(name)
        pid = container.attrs["State"]["Pid"]
        assert pid > 0
        time.sleep(2.5)  # a few monitor samples: the CPU share is known
        start = log_size(control_plane)
        operator.ok("update", "--cpu-shares", "512", name)
        operator.ok("exec", name, "true")
        add_policy_rule(
            control_plane,
            f"""  - effect: deny
    subjects: ["user:{people.operator}"]
    actions: [container.stop]
    resources: ["container:{name}"]
""",
        )
        operator.refused("stop", "-t", "1", name, text="the control plane refuses container.stop")
        assert docker_client.containers.get(name).status == "running"
        docker_client.containers.get(name).kill()
        operator.ok("rm", name)
        found = decisions(control_plane, start, gateway.node)
        actions = [entry["action"] for entry in found]
        # update, exec create and exec start are container.modify; then stop, then delete
        assert actions == ["container.modify"] * 3 + ["container.stop", "container.delete"], found
        for entry in found[:4]:
            context = entry["context"]
            assert context["id"] == container_id.strip()[:12], context
            assert context["name"] == name
            assert context["image"] == registered_base
            assert context["pid"] == pid
            assert context["memory_bytes"] > 0, context
            assert 0 < context["memory_percent"] <= 100
            assert context["cpu_percent"] > 1, context  # a busy loop, watched since its start
        assert found[3]["decision"] == "deny"
        # Removed after it was killed: no process, so no resource use to record.
        deleted = found[4]["context"]
        assert deleted["name"] == name
        assert "memory_bytes" not in deleted
    finally:
        gateways.close()


def test_a_container_not_watched_is_read_once(
    tmp_path: Path,
    control_plane: RunningControlPlane,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    registered_base: str,
) -> None:
    """Started behind the gateway's back: memory and CPU time so far, no share (one sample)."""
    people = make_people(control_plane, "meta1")
    name = f"{PREFIX}-meta-direct"
    docker_client.containers.run(registered_base, ["sleep", "300"], name=name, detach=True)
    gateways = start_gateway(tmp_path / "gw-meta1", control_plane, docker_daemon)
    gateway = next(gateways)
    try:
        operator = DockerCli.make(gateway.host, tmp_path / "op", people.operator_token)
        start = log_size(control_plane)
        operator.ok("update", "--memory", "64m", "--memory-swap", "64m", name)
        found = decisions(control_plane, start, gateway.node)
        assert [entry["action"] for entry in found] == ["container.modify"], found
        context = found[0]["context"]
        assert context["pid"] == docker_client.containers.get(name).attrs["State"]["Pid"]
        assert context["memory_bytes"] > 0, context
        assert context["cpu_seconds"] >= 0, context
        assert "cpu_percent" not in context
    finally:
        gateways.close()
