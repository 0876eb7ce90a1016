"""`trustplane run`: zero-trust start on a node, with a real swtpm, registry,
control plane and dockerd.

An app image (busybox base, public app layer, secret layer) is encrypted for
the KMS, registered and signed. A node enrolled by `trustplane agent` runs
it: signature, reference measurements, attestation (the layers measured into
PCR 13 while the agent keeps attesting from another process on the same
TPM), authorization, then the container starts. Then each check fails on
its own: an unsigned image, a wrong key, a layer that does not match its
registered reference, a node that never enrolled its TPM, and a node the
policy does not let start containers; each is refused naming its check, and
leaves no container, no image and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest
from conftest import start_control_plane_or_fail
from control_helpers import add_policy_rule, entries_since, log_size
from zero_trust_helpers import (
    RULES,
    SECRET,
    Published,
    assert_nothing_left,
    assert_refused,
    enrol,
    events,
    new_node,
    node_args,
    publish,
    run_image,
)

from trustplane.client import ControlClient
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.dockerd import DockerDaemon
from trustplane.embedded.registry import RunningRegistry
from trustplane.embedded.swtpm import RunningSwtpm
from trustplane.errors import ExitCode


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningControlPlane]:
    server = start_control_plane_or_fail(tmp_path_factory.mktemp("zero-trust"))
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
    work = tmp_path_factory.mktemp("zero-trust-publish")
    return publish(plane, admin, registry_plain, docker_client, busybox_base, work)


# -- refusals ----------------------------------------------------------------------------


def test_an_unsigned_image_is_refused(
    plane: RunningControlPlane,
    admin: ControlClient,
    swtpm: RunningSwtpm,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    published: Published,
    tmp_path: Path,
) -> None:
    node = new_node(admin, tmp_path, "zt-run")
    enrol(plane, swtpm, node)
    container = f"zt-{os.urandom(3).hex()}"
    result = run_image(
        plane, swtpm, docker_daemon, node, published.unsigned, published.public_key, container
    )
    line = assert_refused(result, ExitCode.INTEGRITY, "signature")
    assert "is not signed" in line
    assert_nothing_left(docker_client, published, node, container)
    assert events(node) == []  # nothing was measured: the image was never trusted


def test_a_signature_by_another_key_is_refused(
    plane: RunningControlPlane,
    admin: ControlClient,
    swtpm: RunningSwtpm,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    published: Published,
    tmp_path: Path,
) -> None:
    node = new_node(admin, tmp_path, "zt-run")
    enrol(plane, swtpm, node)
    container = f"zt-{os.urandom(3).hex()}"
    result = run_image(
        plane, swtpm, docker_daemon, node, published.good, published.other_key, container
    )
    line = assert_refused(result, ExitCode.INTEGRITY, "signature")
    assert "no valid signature" in line
    assert_nothing_left(docker_client, published, node, container)


def test_a_layer_unlike_its_reference_is_refused_and_spoils_the_node(
    plane: RunningControlPlane,
    admin: ControlClient,
    swtpm: RunningSwtpm,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    published: Published,
    tmp_path: Path,
) -> None:
    node = new_node(admin, tmp_path, "zt-run")
    enrol(plane, swtpm, node)
    container = f"zt-{os.urandom(3).hex()}"
    start = log_size(plane)
    result = run_image(
        plane, swtpm, docker_daemon, node, published.tampered, published.public_key, container
    )
    line = assert_refused(result, ExitCode.INTEGRITY, "measurement")
    assert "layer 2 of" in line
    assert "measured diff_id" in line
    assert "sha256:" + "ab" * 32 in line
    assert_nothing_left(docker_client, published, node, container)
    # No key was asked for: the refusal came before any unwrap. The node
    # quoted at once, so the verifier holds the mismatch: it is quarantined.
    entries = entries_since(admin, start)
    assert not [e for e in entries if e["kind"] == "kms.unwrap"]
    (quote,) = [e for e in entries if e["kind"] == "attestation.quote"]
    assert quote["result"] == "fail"
    assert quote["quarantined"] is True
    assert "zt/tampered measured diff_id" in quote["reason"]
    # The measurement stays in the PCR and the log: this node now gets nothing,
    # not even the good image, until an administrator clears it.
    assert any(e.image.endswith("zt/tampered") for e in events(node))
    again = run_image(
        plane, swtpm, docker_daemon, node, published.good, published.public_key, container
    )
    line = assert_refused(again, ExitCode.AUTH, "attestation")
    assert "zt/tampered measured diff_id" in line
    assert_nothing_left(docker_client, published, node, container)


def test_a_node_that_never_enrolled_its_tpm_is_refused(
    plane: RunningControlPlane,
    admin: ControlClient,
    swtpm: RunningSwtpm,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    published: Published,
    tmp_path: Path,
) -> None:
    node = new_node(admin, tmp_path, "zt-run")
    container = f"zt-{os.urandom(3).hex()}"
    start = log_size(plane)
    result = run_image(
        plane, swtpm, docker_daemon, node, published.good, published.public_key, container
    )
    line = assert_refused(result, ExitCode.AUTH, "attestation")
    assert "has not enrolled this TPM" in line
    assert_nothing_left(docker_client, published, node, container)
    assert not [e for e in entries_since(admin, start) if e["kind"] == "kms.unwrap"]


def test_a_node_whose_ak_the_control_plane_never_bound_is_refused(
    plane: RunningControlPlane,
    admin: ControlClient,
    swtpm: RunningSwtpm,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    published: Published,
    tmp_path: Path,
) -> None:
    """The node's state claims an enrolment (copied from another node on the
    same TPM); the verifier has no credential activation for it."""
    other = new_node(admin, tmp_path, "zt-run")
    enrol(plane, swtpm, other)
    node = new_node(admin, tmp_path, "zt-run")
    node.state.mkdir(mode=0o700)
    (node.state / "enrolment.json").write_bytes((other.state / "enrolment.json").read_bytes())
    container = f"zt-{os.urandom(3).hex()}"
    start = log_size(plane)
    result = run_image(
        plane, swtpm, docker_daemon, node, published.good, published.public_key, container
    )
    line = assert_refused(result, ExitCode.AUTH, "attestation")
    assert "not bound to its EK" in line
    assert_nothing_left(docker_client, published, node, container)
    entries = entries_since(admin, start)
    assert [
        (e["kind"], e["result"]) for e in entries if e.get("subject") == f"node:{node.name}"
    ] == [("attestation.quote", "fail")]
    assert not [e for e in entries if e["kind"] == "kms.unwrap"]


def test_a_start_the_policy_refuses_is_refused(
    plane: RunningControlPlane,
    admin: ControlClient,
    swtpm: RunningSwtpm,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    published: Published,
    tmp_path: Path,
) -> None:
    """Keys are released (attested node) but container.start is not granted."""
    node = new_node(admin, tmp_path, "zt-deny")
    enrol(plane, swtpm, node)
    container = f"zt-{os.urandom(3).hex()}"
    start = log_size(plane)
    result = run_image(
        plane, swtpm, docker_daemon, node, published.good, published.public_key, container
    )
    line = assert_refused(result, ExitCode.AUTH, "authorization")
    assert f"container.start on image:{published.repository}" in line
    assert_nothing_left(docker_client, published, node, container)
    entries = entries_since(admin, start)
    unwraps = [e["decision"] for e in entries if e["kind"] == "kms.unwrap"]
    assert unwraps == ["allow", "allow"]
    decisions = [
        (e["action"], e["decision"])
        for e in entries
        if e["kind"] == "authorize" and e["subject"] == f"node:{node.name}"
    ]
    assert decisions == [("container.start", "deny")]


# -- the start ----------------------------------------------------------------------------


def test_an_attested_node_runs_the_signed_image(
    plane: RunningControlPlane,
    admin: ControlClient,
    swtpm: RunningSwtpm,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    published: Published,
    tmp_path: Path,
) -> None:
    node = new_node(admin, tmp_path, "zt-run")
    enrol(plane, swtpm, node)
    # The agent keeps attesting every second from its own process, on the
    # same TPM: the two take turns under the node's TPM lock.
    agent_log = (tmp_path / "agent.out").open("w")
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trustplane",
            "agent",
            *node_args(plane, swtpm, node),
            "--interval",
            "1",
        ],
        stdout=agent_log,
        stderr=subprocess.STDOUT,
    )
    container = f"zt-{os.urandom(3).hex()}"
    start = log_size(plane)
    try:
        result = run_image(
            plane,
            swtpm,
            docker_daemon,
            node,
            published.good,
            published.public_key,
            container,
            "/bin/sh",
            "/app/run.sh",
        )
        assert result.returncode == 0, result.stderr
        started = json.loads(result.stdout)
        assert started["name"] == container
        assert started["imageID"] == published.image_id
        assert started["repository"] == published.repository
        assert started["attestation"] == "quote verified; 6 measurements match"

        made = docker_client.containers.get(started["containerID"])
        assert made.labels["org.trustplane.image"] == published.repository
        assert made.labels["org.trustplane.manifest"] == started["manifestDigest"]
        assert made.wait(timeout=60)["StatusCode"] == 0
        assert f"secret: {SECRET.decode().strip()}" in made.logs().decode()
        assert list(node.tmp.iterdir()) == []

        measured = {(e.layer, e.kind) for e in events(node) if e.image == published.repository}
        assert measured == {(i, kind) for i in range(3) for kind in ("blob", "diff_id")}
        entries = entries_since(admin, start)
        mine = [e for e in entries if e.get("subject") == f"node:{node.name}"]
        assert ("kms.unwrap", "allow") in [(e["kind"], e.get("decision")) for e in mine]
        assert ("authorize", "allow") in [(e["kind"], e.get("decision")) for e in mine]
        assert [e["result"] for e in mine if e["kind"] == "attestation.quote"].count("pass") >= 2
        time.sleep(1.5)  # one more agent round, after the run released the TPM
    finally:
        agent.send_signal(signal.SIGINT)
        agent.wait(timeout=30)
        agent_log.close()
        for leftover in docker_client.containers.list(all=True, filters={"name": container}):
            leftover.remove(force=True)
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(published.image_id, force=True)
    output = (tmp_path / "agent.out").read_text()
    assert output.count(f"{node.name}: attested") >= 2, output
    # No round failed for want of the TPM or because the two writers' event
    # log and PCR fell out of step.
    for failure in ("TPM", "does not replay", "busy"):
        assert failure not in output, output
