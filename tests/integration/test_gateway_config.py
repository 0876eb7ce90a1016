"""What a gateway's own configuration changes: host access it allows, local users it serves."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import docker
import pytest
from gateway_helpers import (
    PREFIX,
    DockerCli,
    RunningGateway,
    container_exists,
    make_people,
    start_gateway,
)
from gateway_helpers import cleanup as cleanup
from gateway_helpers import registered_base as registered_base

from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.dockerd import DockerDaemon

pytestmark = pytest.mark.usefixtures("cleanup")


def workers_of(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def gone(pid: str) -> bool:
    return not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def process_state(pid: str) -> str:
    """The state letter of /proc/PID/stat (`T`: stopped by a signal); after the
    parenthesised command name, which may itself hold spaces or parentheses."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def logged(gateway: RunningGateway, line: str) -> None:
    while line not in gateway.process.log_file.read_text():
        time.sleep(0.2)  # until it is written: pytest's timeout is the bound


def serving(gateway: RunningGateway, count: int) -> list[str]:
    """The supervisor's workers, once there are `count` and each has said it serves."""
    supervisor = gateway.process.pid
    assert supervisor is not None
    while len(workers := workers_of(supervisor)) != count:
        time.sleep(0.2)  # forked one after the other
    for worker in workers:
        logged(gateway, f"worker {worker} serving")
    return workers


def stops_cleanly(gateway: RunningGateway, workers: list[str]) -> None:
    """SIGTERM to the supervisor: it stops every worker and reaps it before it exits
    with status 0 (a clean stop, not the harness's SIGKILL after its grace period),
    and takes its socket away."""
    supervisor = gateway.process.pid
    assert supervisor is not None
    os.kill(supervisor, signal.SIGTERM)
    while gateway.process.returncode() is None:
        time.sleep(0.2)  # until it has exited: pytest's timeout is the bound
    assert gateway.process.returncode() == 0, gateway.process.log_tail()
    assert all(gone(worker) for worker in workers)
    assert not gateway.socket.exists()


def test_host_access_allowed_by_configuration_still_needs_authorization(
    tmp_path: Path,
    control_plane: RunningControlPlane,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    registered_base: str,
) -> None:
    people = make_people(control_plane, "cfg")
    gateways = start_gateway(
        tmp_path / "gw-priv", control_plane, docker_daemon, "--allow-host-access", "privileged"
    )
    gateway = next(gateways)
    try:
        operator = DockerCli.make(gateway.host, tmp_path / "op", people.operator_token)
        name = f"{PREFIX}-priv-allowed"
        # `create`: this test machine itself may not run privileged containers.
        operator.ok("create", "--privileged", "--name", name, registered_base, "sleep", "60")
        assert docker_client.containers.get(name).attrs["HostConfig"]["Privileged"] is True
        # Only the category configured: a host bind stays refused.
        other = f"{PREFIX}-bind-still-refused"
        operator.refused("run", "--name", other, "-v", "/:/h", registered_base, "true",
                         text="host-bind access")  # fmt: skip
        assert not container_exists(docker_client, other)
        normal = DockerCli.make(gateway.host, tmp_path / "user", people.user_token)
        normal.refused("run", "--privileged", registered_base, "true", text="normal privilege")
    finally:
        gateways.close()


def test_only_the_configured_local_users_may_use_the_socket(
    tmp_path: Path,
    control_plane: RunningControlPlane,
    docker_daemon: DockerDaemon,
    registered_base: str,
) -> None:
    people = make_people(control_plane, "uid")
    me = os.getuid()
    for allowed, works in ((me + 4242, False), (me, True)):
        gateways = start_gateway(
            tmp_path / f"gw-uid-{allowed}", control_plane, docker_daemon,
            "--allowed-uid", str(allowed),
        )  # fmt: skip
        gateway = next(gateways)
        try:
            cli = DockerCli.make(gateway.host, tmp_path / f"cli-{allowed}", people.user_token)
            if works:
                assert "CONTAINER ID" in cli.ok("ps")
            else:
                cli.refused("ps", text=f"local user {me} may not use this gateway")
        finally:
            gateways.close()


def test_several_worker_processes_share_the_socket(
    tmp_path: Path,
    control_plane: RunningControlPlane,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    registered_base: str,
) -> None:
    """Each of three workers, alone, accepts on the one socket and decides alike.

    Which worker the kernel hands a connection to depends on scheduling, so the
    test does not hope for a spread: it stops (SIGSTOP) every worker but one, and
    whatever answers is that one. Then all serve together, and SIGTERM stops the
    supervisor cleanly, with every worker reaped.
    """
    people = make_people(control_plane, "wrk")
    gateways = start_gateway(tmp_path / "gw-workers", control_plane, docker_daemon,
                             "--workers", "3")  # fmt: skip
    gateway = next(gateways)
    try:
        children = serving(gateway, 3)  # a supervisor and three forked workers
        operator = DockerCli.make(gateway.host, tmp_path / "op", people.operator_token)
        user = DockerCli.make(gateway.host, tmp_path / "user", people.user_token)
        for alone in children:
            others = [child for child in children if child != alone]
            for other in others:
                os.kill(int(other), signal.SIGSTOP)
            try:
                for other in others:
                    while process_state(other) != "T":
                        time.sleep(0.05)  # until the kernel has stopped it
                assert process_state(alone) != "T"
                assert "CONTAINER ID" in user.ok("ps")
                user.refused("run", registered_base, "true", text="normal privilege")
            finally:
                for other in others:
                    os.kill(int(other), signal.SIGCONT)
        assert serving(gateway, 3) == children  # none died while the others were stopped
        name = f"{PREFIX}-workers"
        assert "w" in operator.ok("run", "--name", name, registered_base, "echo", "w")
        assert container_exists(docker_client, name)
        stops_cleanly(gateway, children)
    finally:
        gateways.close()


def test_a_worker_that_dies_is_noticed_logged_and_replaced(
    tmp_path: Path,
    control_plane: RunningControlPlane,
    docker_daemon: DockerDaemon,
    registered_base: str,
) -> None:
    """SIGKILL one worker, then the first (the MQTT and plugin one): each death is
    logged, a new worker takes its place, and the gateway keeps deciding alike;
    SIGTERM then stops the whole gateway cleanly (status 0, no worker left)."""
    people = make_people(control_plane, "die")
    gateways = start_gateway(tmp_path / "gw-die", control_plane, docker_daemon,
                             "--workers", "2")  # fmt: skip
    gateway = next(gateways)
    try:
        supervisor = gateway.process.pid
        assert supervisor is not None
        user = DockerCli.make(gateway.host, tmp_path / "user", people.user_token)
        assert "CONTAINER ID" in user.ok("ps")
        for victim in serving(gateway, 2):
            os.kill(int(victim), signal.SIGKILL)
            logged(gateway, f"worker {victim} was killed by SIGKILL; starting another in its place")
            assert victim not in serving(gateway, 2)
            for _ in range(4):  # connections land on either worker; both decide alike
                assert "CONTAINER ID" in user.ok("ps")
                user.refused("run", registered_base, "true", text="normal privilege")
        stops_cleanly(gateway, workers_of(supervisor))
    finally:
        gateways.close()
