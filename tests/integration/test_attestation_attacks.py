"""A root user on a node tries to wipe a failed measurement: each attempt
ends with no key released, `trustplane run` refused at `attestation:`, and
the transparency log saying why.

The attacker has root on the node: the TPM (tpm2-tools), the agent's state
directory, the node's key. Not the control plane. The node measures into
PCR 13, which only a reboot resets; every sequence starts as in the issue:
a signed image whose layer is not the registered one is refused at
`measurement:` and the verifier quarantines the node. Then:

1. `tpm2_pcrreset` of the old PCR 23 (works, but nothing is measured there
   any more) and of PCR 13 (the TPM refuses: bad locality);
2. deleting STATE_DIR/event-log.json (the verifier's boot record knows the
   log was longer), also on a node that never failed before;
3. a reboot (swtpm restarted: a fresh TPM2_Startup(CLEAR)): the quarantine
   outlives it until an administrator clears it, logged; then the node
   attests and runs the image again.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from conftest import start_control_plane_or_fail
from control_helpers import Cli, add_policy_rule, assert_fails, entries_since, log_size
from zero_trust_helpers import (
    RULES,
    NodeFiles,
    Published,
    assert_nothing_left,
    assert_refused,
    enrol,
    events,
    new_node,
    node_args,
    publish,
    run_image,
    trustplane,
)

from trustplane.agent.attester import Attester, Layer
from trustplane.agent.tpm_lock import node_tpm
from trustplane.client import ControlClient
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.dockerd import DockerDaemon
from trustplane.embedded.registry import RunningRegistry
from trustplane.embedded.swtpm import RunningSwtpm
from trustplane.errors import ExitCode
from trustplane.tools import Executor, ToolResult


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningControlPlane]:
    server = start_control_plane_or_fail(tmp_path_factory.mktemp("attacks"))
    add_policy_rule(server, RULES)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def admin(plane: RunningControlPlane) -> Iterator[ControlClient]:
    client = plane.admin()
    yield client
    client.close()


@pytest.fixture(scope="module")
def published(
    plane: RunningControlPlane,
    admin: ControlClient,
    registry_plain: RunningRegistry,
    docker_client: docker.DockerClient,
    busybox_base: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Published:
    work = tmp_path_factory.mktemp("attacks-publish")
    return publish(
        plane, admin, registry_plain, docker_client, busybox_base, work, prefix="zt-attack"
    )


@pytest.fixture(scope="module")
def admin_cli(plane: RunningControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    cli = Cli(tmp_path_factory.mktemp("attacks-admin") / "session.json")
    cli.login(plane, "admin", plane.admin_password)
    return cli


# -- what every sequence must end with ------------------------------------------------------


def mine(admin: ControlClient, start: int, node: NodeFiles) -> list[dict[str, Any]]:
    return [e for e in entries_since(admin, start) if e.get("subject") == f"node:{node.name}"]


def agent_once(plane: RunningControlPlane, swtpm: RunningSwtpm, node: NodeFiles) -> str:
    """`trustplane agent --once`, which must fail; returns what it printed."""
    result = trustplane("agent", *node_args(plane, swtpm, node), "--once")
    assert result.returncode == ExitCode.INTEGRITY, (result.stdout, result.stderr)
    assert f"{node.name}: attestation failed: " in result.stdout
    return result.stdout


def assert_gets_nothing(
    plane: RunningControlPlane,
    admin: ControlClient,
    swtpm: RunningSwtpm,
    daemon: DockerDaemon,
    client: docker.DockerClient,
    published: Published,
    node: NodeFiles,
    start: int,
    why: str,
) -> None:
    """The genuine image is refused at `attestation:`; no key was released
    since `start`; the log shows a failed quote saying `why`, quarantined."""
    container = f"zt-{os.urandom(3).hex()}"
    result = run_image(plane, swtpm, daemon, node, published.good, published.public_key, container)
    line = assert_refused(result, ExitCode.AUTH, "attestation")
    assert "quarantined" in line
    assert_nothing_left(client, published, node, container)
    entries = mine(admin, start, node)
    assert ("kms.unwrap", "allow") not in [(e["kind"], e.get("decision")) for e in entries]
    quotes = [e for e in entries if e["kind"] == "attestation.quote"]
    assert quotes
    assert all(e["result"] == "fail" for e in quotes)
    assert all(e.get("quarantined") is True for e in quotes)
    assert any(why in e["reason"] for e in quotes), [e["reason"] for e in quotes]


def spoil(
    plane: RunningControlPlane,
    admin: ControlClient,
    swtpm: RunningSwtpm,
    daemon: DockerDaemon,
    client: docker.DockerClient,
    published: Published,
    node: NodeFiles,
) -> int:
    """The issue's step 1: a tampered layer, refused at `measurement:`.
    Returns the log's size after the node's (passing) enrolment."""
    enrol(plane, swtpm, node)
    start = log_size(plane)
    container = f"zt-{os.urandom(3).hex()}"
    result = run_image(
        plane, swtpm, daemon, node, published.tampered, published.public_key, container
    )
    assert "measured diff_id" in assert_refused(result, ExitCode.INTEGRITY, "measurement")
    assert_nothing_left(client, published, node, container)
    return start


def pcrreset(swtpm: RunningSwtpm, pcr: int) -> ToolResult:
    """What root runs: tpm2_pcrreset (tpm2-tools) on the node's TPM."""
    return Executor(timeout=60).run(
        ["tpm2_pcrreset", str(pcr)], env={"TPM2TOOLS_TCTI": swtpm.tcti}, check=False
    )


# -- the attacks --------------------------------------------------------------------------


def test_resetting_a_pcr_after_a_mismatch_gets_nothing(
    plane: RunningControlPlane,
    admin: ControlClient,
    swtpm: RunningSwtpm,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    published: Published,
    tmp_path: Path,
) -> None:
    node = new_node(admin, tmp_path, "zt-run")
    start = spoil(plane, admin, swtpm, docker_daemon, docker_client, published, node)
    assert pcrreset(swtpm, 23).returncode == 0  # resettable, and holds nothing of ours
    refused = pcrreset(swtpm, 13)
    assert refused.returncode != 0
    assert b"bad locality" in refused.stderr
    printed = agent_once(plane, swtpm, node)
    assert "measured diff_id" in printed
    assert "quarantined" in printed
    assert_gets_nothing(
        plane,
        admin,
        swtpm,
        docker_daemon,
        docker_client,
        published,
        node,
        start,
        "zt-attack/tampered measured diff_id",
    )
    # Nor will the agent measure into a resettable PCR unless told it is a test.
    wrong = trustplane("agent", *node_args(plane, swtpm, node), "--once", "--pcr", "23")
    assert_fails(wrong, ExitCode.USAGE, "tpm2_pcrreset 23")


def test_deleting_the_event_log_gets_nothing(
    plane: RunningControlPlane,
    admin: ControlClient,
    swtpm: RunningSwtpm,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    published: Published,
    tmp_path: Path,
) -> None:
    node = new_node(admin, tmp_path, "zt-run")
    spoil(plane, admin, swtpm, docker_daemon, docker_client, published, node)
    shown = len(events(node))
    assert shown >= 3  # what the verifier saw with the refusal
    start = log_size(plane)
    (node.state / "event-log.json").unlink()
    printed = agent_once(plane, swtpm, node)
    assert f"the event log holds 0 events, fewer than the {shown} accepted" in printed
    assert_gets_nothing(
        plane,
        admin,
        swtpm,
        docker_daemon,
        docker_client,
        published,
        node,
        start,
        "tampering: the event log holds 0 events",
    )


def test_deleting_the_event_log_of_a_sound_node_is_caught(
    plane: RunningControlPlane,
    admin: ControlClient,
    swtpm: RunningSwtpm,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    published: Published,
    tmp_path: Path,
) -> None:
    """No mismatch first: the boot record alone catches lost evidence."""
    node = new_node(admin, tmp_path, "zt-run")
    enrol(plane, swtpm, node)
    (registered,) = admin.images(published.repository)
    layers = [Layer(x.index, x.digest, str(x.diff_id)) for x in registered.layers]
    with node_tpm(swtpm.tcti, node.state) as device:
        Attester(device, node.state).measure(
            published.repository, registered.manifest_digest, layers
        )
    attested = trustplane("agent", *node_args(plane, swtpm, node), "--once")
    assert attested.returncode == 0, attested.stderr
    assert "6 measurements match" in attested.stdout
    start = log_size(plane)
    (node.state / "event-log.json").unlink()
    printed = agent_once(plane, swtpm, node)
    assert "tampering: the event log holds 0 events, fewer than the 6 accepted" in printed
    assert_gets_nothing(
        plane,
        admin,
        swtpm,
        docker_daemon,
        docker_client,
        published,
        node,
        start,
        "tampering: the event log holds 0 events",
    )


def test_a_reboot_after_a_mismatch_gets_nothing_until_an_admin_clears_the_node(
    plane: RunningControlPlane,
    admin: ControlClient,
    admin_cli: Cli,
    swtpm: RunningSwtpm,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    published: Published,
    tmp_path: Path,
) -> None:
    node = new_node(admin, tmp_path, "zt-run")
    spoil(plane, admin, swtpm, docker_daemon, docker_client, published, node)
    rebooted = swtpm.power_cycle()
    with rebooted:
        start = log_size(plane)
        printed = agent_once(plane, rebooted, node)
        assert "quote verified; 0 measurements match, but node" in printed
        assert "is quarantined" in printed
        assert events(node) == []  # a new boot, a new log; the old one is kept beside it
        assert list(node.state.glob("event-log.boot-*.json"))
        assert_gets_nothing(
            plane,
            admin,
            rebooted,
            docker_daemon,
            docker_client,
            published,
            node,
            start,
            "is quarantined (layer 2 of",
        )

        user = Cli(tmp_path / "user.json")
        admin.create_user("zt-operator", "operator", "operator password 1")
        user.login(plane, "zt-operator", "operator password 1")
        assert_fails(
            user("node", "clear", node.name, "--reason", "let me in"), ExitCode.AUTH, "node.clear"
        )
        start = log_size(plane)
        cleared = admin_cli("node", "clear", node.name, "--reason", "host reimaged; layers checked")
        assert cleared.returncode == 0, cleared.stderr
        assert f"node {node.name} cleared" in cleared.stdout
        (entry,) = [e for e in mine(admin, start, node) if e["kind"] == "attestation.clear"]
        assert entry["by"] == "user:admin"
        assert entry["reason"] == "host reimaged; layers checked"
        assert "zt-attack/tampered measured diff_id" in entry["quarantine"]

        attested = trustplane("agent", *node_args(plane, rebooted, node), "--once")
        assert attested.returncode == 0, attested.stderr
        assert f"{node.name}: attested: quote verified" in attested.stdout
        container = f"zt-{os.urandom(3).hex()}"
        try:
            result = run_image(
                plane,
                rebooted,
                docker_daemon,
                node,
                published.good,
                published.public_key,
                container,
                "/bin/true",
            )
            assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["name"] == container
        finally:
            for leftover in docker_client.containers.list(all=True, filters={"name": container}):
                leftover.remove(force=True)
            with contextlib.suppress(docker.errors.ImageNotFound):
                docker_client.images.remove(published.image_id, force=True)
        unwraps = [e for e in mine(admin, start, node) if e["kind"] == "kms.unwrap"]
        assert unwraps
        assert all(e["decision"] == "allow" for e in unwraps)
