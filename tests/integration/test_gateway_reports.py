"""Every refusal the gateway makes by itself reaches the control plane's transparency log.

The control plane logs its own decisions (`/v1/authorize`); refusals made at
the gateway (normal privilege, host access, an unregistered image, a
malformed request) are reported by the gateway through `POST /v1/reports`
and read back here from the log, as an auditor would.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from control_helpers import entries_since, log_size
from gateway_helpers import PREFIX, DockerCli, container_exists, make_people, start_gateway
from gateway_helpers import cleanup as cleanup
from gateway_helpers import registered_base as registered_base

from trustplane.client import ControlClient
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.dockerd import DockerDaemon
from trustplane.errors import Forbidden, MalformedError

pytestmark = pytest.mark.usefixtures("cleanup")


def wait_for_entries(
    admin: ControlClient, start: int, node: str, count: int, timeout: float = 20
) -> list[dict[str, Any]]:
    """The gateway's reports since `start`, once there are at least `count` of them."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            entry
            for entry in entries_since(admin, start)
            if entry["kind"].startswith("gateway.") and entry.get("node") == f"node:{node}"
        ]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_refusals_at_the_gateway_are_in_the_transparency_log(
    tmp_path: Path,
    control_plane: RunningControlPlane,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    admin: ControlClient,
    registered_base: str,
) -> None:
    people = make_people(control_plane, "rep")
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {registered_base}\nRUN echo unpublished > /x\n")
    unregistered = f"{PREFIX}/unpublished:v1"
    docker_client.images.build(path=str(context), tag=unregistered, rm=True)
    gateways = start_gateway(tmp_path / "gw-rep", control_plane, docker_daemon)
    gateway = next(gateways)
    try:
        start = log_size(control_plane)
        user = DockerCli.make(gateway.host, tmp_path / "user", people.user_token)
        operator = DockerCli.make(gateway.host, tmp_path / "op", people.operator_token)
        user.refused("run", "--name", f"{PREFIX}-rep-user", registered_base, "true",
                     text="normal privilege")  # fmt: skip
        operator.refused("run", "--name", f"{PREFIX}-rep-bind", "-v", "/:/h", registered_base,
                         "true", text="host-bind access")  # fmt: skip
        operator.refused("run", "--name", f"{PREFIX}-rep-unreg", unregistered, "true",
                         text="is not registered")  # fmt: skip
        answer = gateway.raw(b"GET /v1.41/containers/../images/json HTTP/1.1\r\nHost: d\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 ")
        for name in ("rep-user", "rep-bind", "rep-unreg"):
            assert not container_exists(docker_client, f"{PREFIX}-{name}")

        entries = wait_for_entries(admin, start, gateway.node, 4)
        decisions = [e for e in entries if e["kind"] == "gateway.decision"]
        assert all(e["decision"] == "deny" for e in decisions)
        reasons = [str(e["reason"]) for e in decisions]
        by_user = [e for e in decisions if "normal privilege" in e["reason"]]
        assert by_user
        assert by_user[0]["subject"] == f"user:{people.user}"
        assert by_user[0]["action"] == "container.start"
        assert by_user[0]["peer_uid"] is not None
        assert any("host-bind access" in r for r in reasons), reasons
        unreg = [e for e in decisions if "is not registered" in e["reason"]]
        assert unreg
        assert unreg[0]["subject"] == f"user:{people.operator}", unreg
        malformed = [e for e in decisions if e["status"] == 400]
        assert malformed
        assert "dot segment" in malformed[0]["reason"], malformed
        # Each entry is in the signed tree like any other.
        assert all(isinstance(e["index"], int) and e["index"] >= start for e in decisions)
    finally:
        gateways.close()
        docker_client.images.remove(unregistered, force=True)


def test_only_nodes_report_and_reports_are_bounded(
    admin: ControlClient, control_plane: RunningControlPlane
) -> None:
    one = {"kind": "gateway.decision", "time": time.time(), "details": {"reason": "x"}}
    with pytest.raises(Forbidden, match="only nodes"):
        admin.request("POST", "/v1/reports", json={"reports": [one]})
    ctx = control_plane.ssl_context()
    for bad in (
        {"reports": []},
        {"reports": [one] * 101},
        {"reports": [{**one, "kind": "authorize"}]},
        {"reports": [{**one, "details": {"reason": "x" * 1025}}]},
        {"reports": [{**one, "details": {f"k{i}": i for i in range(33)}}]},
        {"reports": [{**one, "details": {"node": "node:someone-else"}}]},
        {"reports": [{**one, "details": {"nested": {"a": 1}}}]},
    ):
        response = httpx.post(
            f"{control_plane.url}/v1/reports",
            json=bad,
            headers={"Authorization": f"Bearer {admin.token}"},
            verify=ctx,
            timeout=10,
        )
        assert response.status_code == 422, (bad, response.text)
    with pytest.raises(MalformedError):
        admin.request("POST", "/v1/reports", json={"reports": [{**one, "kind": "other"}]})
