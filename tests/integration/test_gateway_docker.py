"""The edge gateway with the real docker CLI, dockerd and control plane.

Every check of a refusal also looks on dockerd's side (directly, not through
the gateway) that the refused thing did not happen.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest
from control_helpers import add_policy_rule, entries_since, log_size
from gateway_helpers import (
    PREFIX,
    DockerCli,
    People,
    RunningGateway,
    container_exists,
    make_people,
    start_gateway,
)
from gateway_helpers import cleanup as cleanup
from gateway_helpers import registered_base as registered_base
from test_gateway_reports import wait_for_entries

from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.dockerd import DockerDaemon
from trustplane.embedded.registry import RunningRegistry

pytestmark = pytest.mark.usefixtures("cleanup")


@pytest.fixture(scope="session")
def gateway(
    work_dir: Path, control_plane: RunningControlPlane, docker_daemon: DockerDaemon
) -> Iterator[RunningGateway]:
    yield from start_gateway(work_dir / "gateway", control_plane, docker_daemon)


@pytest.fixture(scope="session")
def people(control_plane: RunningControlPlane) -> People:
    return make_people(control_plane, "cli")


@pytest.fixture(scope="session")
def base(registered_base: str) -> str:
    return registered_base


@pytest.fixture
def operator(gateway: RunningGateway, people: People, tmp_path: Path) -> DockerCli:
    return DockerCli.make(gateway.host, tmp_path / "operator", people.operator_token)


@pytest.fixture
def normal(gateway: RunningGateway, people: People, tmp_path: Path) -> DockerCli:
    return DockerCli.make(gateway.host, tmp_path / "user", people.user_token)


def test_without_a_token_nothing_passes(gateway: RunningGateway, tmp_path: Path) -> None:
    anonymous = DockerCli.make(gateway.host, tmp_path / "anon", None)
    anonymous.refused("ps", text="X-Trustplane-Token")
    forged = DockerCli.make(gateway.host, tmp_path / "forged", "not-a-token")
    forged.refused("ps", text="invalid or expired")


def test_normal_user_reads_but_is_refused_every_change(
    normal: DockerCli, operator: DockerCli, base: str, docker_client: docker.DockerClient
) -> None:
    assert "CONTAINER ID" in normal.ok("ps", "-a")
    assert "trustplane/busybox" in normal.ok("images")
    assert json.loads(normal.ok("image", "inspect", base))[0]["RootFS"]["Layers"]
    assert "Server:" in normal.ok("version")
    name = f"{PREFIX}-refused"
    message = normal.refused("run", "--name", name, base, "true", text="normal privilege")
    assert "container.start needs an operator or admin" in message
    assert not container_exists(docker_client, name)
    operator.ok("create", "--name", name, base, "true")
    for args in (("start", name), ("stop", name), ("rm", name), ("rename", name, name + "x")):
        normal.refused(*args, text="normal privilege")
    normal.refused("tag", base, f"{PREFIX}/tag:x", text="normal privilege")
    normal.refused("rmi", f"{PREFIX}/none:x", text="normal privilege")
    normal.refused("export", name, text="normal privilege")
    normal.refused("save", base, text="normal privilege")
    normal.refused("cp", f"{name}:/bin/sh", "/tmp/never", text="normal privilege")
    container = docker_client.containers.get(name)
    assert container.status == "created"
    assert container.name == name


def test_operator_lifecycle_is_authorized_by_the_control_plane(
    operator: DockerCli,
    base: str,
    docker_client: docker.DockerClient,
    control_plane: RunningControlPlane,
    people: People,
    tmp_path: Path,
) -> None:
    start = log_size(control_plane)
    name = f"{PREFIX}-life"
    container_id = operator.ok("run", "-d", "--name", name, base, "sleep", "300").strip()
    assert docker_client.containers.get(name).status == "running"
    assert json.loads(operator.ok("inspect", name))[0]["Id"] == container_id
    assert name in operator.ok("ps")
    operator.ok("update", "--cpu-shares", "512", name)
    assert docker_client.containers.get(name).attrs["HostConfig"]["CpuShares"] == 512
    source = tmp_path / "in.txt"
    source.write_text("copied in\n")
    operator.ok("cp", str(source), f"{name}:/tmp/in.txt")  # PUT archive, streamed
    assert operator.ok("exec", name, "cat", "/tmp/in.txt") == "copied in\n"
    operator.ok("cp", f"{name}:/tmp/in.txt", str(tmp_path / "out.txt"))  # GET archive
    assert (tmp_path / "out.txt").read_text() == "copied in\n"
    operator.ok("rename", name, name + "-2")
    operator.ok("stop", "-t", "1", name + "-2")
    assert docker_client.containers.get(name + "-2").status == "exited"
    operator.ok("rm", name + "-2")
    assert not container_exists(docker_client, name + "-2")
    tag = f"{PREFIX}/retag:v1"
    operator.ok("tag", base, tag)
    assert docker_client.images.get(tag).id == docker_client.images.get(base).id
    operator.ok("rmi", tag)
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(tag)
    with control_plane.admin() as admin:
        entries = entries_since(admin, start)
    asked = {
        (e.get("action"), e.get("decision"))
        for e in entries
        if e.get("subject") == f"user:{people.operator}"
    }
    for action in ("container.start", "container.modify", "container.stop", "container.delete"):
        assert (action, "allow") in asked, entries


def test_policy_denial_is_shown_and_nothing_happens(
    operator: DockerCli,
    base: str,
    docker_client: docker.DockerClient,
    control_plane: RunningControlPlane,
    people: People,
) -> None:
    name = f"{PREFIX}-policy"
    operator.ok("run", "-d", "--name", name, base, "sleep", "300")
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


def build_rule(user: str, resource: str) -> str:
    """A policy rule that lets one user build images of one repository."""
    return f"""  - subjects: ["user:{user}"]
    actions: [image.build]
    resources: ["{resource}"]
"""


def test_docker_build_is_an_action_of_its_own(
    gateway: RunningGateway,
    control_plane: RunningControlPlane,
    docker_client: docker.DockerClient,
    base: str,
    tmp_path: Path,
) -> None:
    """`docker build` makes dockerd pull its FROM image and run its RUN steps in
    containers that pass neither the pull nor the create check: it is
    `image.build`, refused to normal privilege at the gateway, and an operator
    needs a policy rule that allows it (the default policy has none)."""
    crew = make_people(control_plane, "build")
    user = DockerCli.make(gateway.host, tmp_path / "b-user", crew.user_token)
    operator = DockerCli.make(gateway.host, tmp_path / "b-op", crew.operator_token)
    context = tmp_path / "context"
    context.mkdir()
    marker = f"built-{time.monotonic_ns()}"
    (context / "Dockerfile").write_text(f"FROM {base}\nRUN echo {marker} > /built\n")
    allowed, other = f"{PREFIX}/build-ok:1", f"{PREFIX}/build-other:1"
    start = log_size(control_plane)
    try:
        user.refused("build", "-t", allowed, str(context), text="normal privilege")
        message = operator.refused("build", "-t", allowed, str(context),
                                   text="the control plane refuses image.build")  # fmt: skip
        assert f"image:{PREFIX}/build-ok" in message
        assert not docker_client.images.list(name=f"{PREFIX}/build-ok")

        add_policy_rule(control_plane, build_rule(crew.operator, f"image:{PREFIX}/build-ok"))
        built = operator("build", "-t", allowed, str(context), timeout=300)
        assert built.returncode == 0, built.stderr
        image = docker_client.images.get(allowed)
        assert (
            marker in docker_client.containers.run(image, ["cat", "/built"], remove=True).decode()
        )
        # The rule names one repository: another is still refused, as is tagging
        # the build into two repositories at once.
        operator.refused("build", "-t", other, str(context), text="refuses image.build")
        operator.refused("build", "-t", allowed, "-t", other, str(context),
                         text="one repository")  # fmt: skip
        assert not docker_client.images.list(name=f"{PREFIX}/build-other")

        with control_plane.admin() as admin:
            entries = entries_since(admin, start)
            reported = wait_for_entries(admin, start, gateway.node, 2)
        asked = [
            (e["decision"], e["resource"])
            for e in entries
            if e["kind"] == "authorize" and e.get("action") == "image.build"
        ]
        assert ("deny", f"image:{PREFIX}/build-ok") in asked, asked
        assert ("allow", f"image:{PREFIX}/build-ok") in asked, asked
        assert ("deny", f"image:{PREFIX}/build-other") in asked, asked
        refused_user = [
            e for e in reported
            if e["kind"] == "gateway.decision" and e.get("action") == "image.build"
            and e.get("subject") == f"user:{crew.user}"
        ]  # fmt: skip
        assert refused_user, reported
        assert "normal privilege" in refused_user[0]["reason"]
        assert any("one repository" in str(e.get("reason")) for e in reported), reported
    finally:
        for tag in (allowed, other):
            with contextlib.suppress(docker.errors.ImageNotFound):
                docker_client.images.remove(tag, force=True)


def test_unregistered_image_is_refused(
    operator: DockerCli,
    base: str,
    docker_client: docker.DockerClient,
    tmp_path: Path,
    control_plane: RunningControlPlane,
    people: People,
) -> None:
    context = tmp_path / "context"
    context.mkdir()
    (context / "hello").write_text("not published\n")
    (context / "Dockerfile").write_text(f"FROM {base}\nCOPY hello /hello\n")
    tag = f"{PREFIX}/built:v1"
    add_policy_rule(control_plane, build_rule(people.operator, f"image:{PREFIX}/built"))
    built = operator("build", "-t", tag, str(context), timeout=300)  # image.build, allowed above
    assert built.returncode == 0, built.stderr
    assert docker_client.images.get(tag)
    name = f"{PREFIX}-unregistered"
    message = operator.refused("run", "--name", name, tag, "true", text="is not registered")
    assert f"{PREFIX}/built" in message
    assert not container_exists(docker_client, name)
    # Made behind the gateway's back, it still cannot be started through it.
    docker_client.containers.create(tag, "true", name=name)
    operator.refused("start", name, text="is not registered")
    assert docker_client.containers.get(name).status == "created"
    operator.ok("rm", name)
    operator.ok("rmi", tag)


@pytest.mark.parametrize(
    ("flags", "category"),
    [
        (["--privileged"], "privileged"),
        (["-v", "/:/host"], "host-bind"),
        (["--mount", "type=bind,source=/etc,target=/x"], "host-bind"),
        (["--pid=host"], "host-namespace"),
        (["--network=host"], "host-namespace"),
        (["--ipc=host"], "host-namespace"),
        (["--cap-add", "SYS_ADMIN"], "capabilities"),
        (["--device", "/dev/null"], "devices"),
        (["--security-opt", "seccomp=unconfined"], "security-opt"),
    ],
)
def test_host_access_is_refused(
    operator: DockerCli,
    base: str,
    docker_client: docker.DockerClient,
    flags: list[str],
    category: str,
) -> None:
    name = f"{PREFIX}-host-{category}"
    operator.refused("run", "--name", name, *flags, base, "true", text=f"{category} access")
    assert not container_exists(docker_client, name)


def test_exec_privileged_is_refused(
    operator: DockerCli, base: str, docker_client: docker.DockerClient
) -> None:
    name = f"{PREFIX}-exec-priv"
    operator.ok("run", "-d", "--name", name, base, "sleep", "300")
    operator.refused("exec", "--privileged", name, "true", text="privileged access")
    assert operator.ok("exec", name, "echo", "plain-exec").strip() == "plain-exec"


def test_attached_run_logs_follow_and_events(
    operator: DockerCli, base: str, docker_client: docker.DockerClient
) -> None:
    name = f"{PREFIX}-logs"
    since = str(int(time.time()) - 1)
    script = "for i in 1 2 3 4 5; do echo line-$i; sleep 0.3; done"
    attached = operator.ok("run", "--name", name, base, "sh", "-c", script)
    assert attached.split() == [f"line-{i}" for i in range(1, 6)]
    operator.ok("start", name)  # runs again, ~1.5 s
    followed = operator.ok("logs", "-f", name, timeout=60)
    assert followed.split() == [f"line-{i}" for i in range(1, 6)] * 2
    until = str(int(time.time()) + 1)
    events = operator.ok(
        "events", "--since", since, "--until", until, "--filter", f"container={name}",
        "--format", "{{.Action}}",
        timeout=60,
    )  # fmt: skip
    actions = events.split()
    assert actions.count("start") == 2
    assert "create" in actions
    assert "die" in actions


def test_interactive_run_and_exec_with_a_tty(
    operator: DockerCli, base: str, docker_client: docker.DockerClient
) -> None:
    name = f"{PREFIX}-tty"
    text = operator.with_tty(
        "run", "-it", "--name", name, base, "sh",
        script=["echo sum-$((40+2))\r", "exit 0\r"],
        expect="sum-42",
    )  # fmt: skip
    assert "sum-42" in text
    assert docker_client.containers.get(name).attrs["State"]["ExitCode"] == 0
    running = f"{PREFIX}-tty-exec"
    operator.ok("run", "-d", "--name", running, base, "sleep", "300")
    text = operator.with_tty(
        "exec", "-it", running, "sh",
        script=["echo in-$((6*7))-exec\r", "exit 0\r"],
        expect="in-42-exec",
    )  # fmt: skip
    assert "in-42-exec" in text


def test_pull_through_the_gateway(
    operator: DockerCli,
    base: str,
    docker_client: docker.DockerClient,
    registry_plain: RunningRegistry,
    control_plane: RunningControlPlane,
) -> None:
    repository = f"{registry_plain.host}/{PREFIX}/busybox"
    docker_client.images.get(base).tag(repository, "v1")
    docker_client.images.push(repository, "v1")
    digest = httpx.head(
        f"{registry_plain.url}/v2/{PREFIX}/busybox/manifests/v1",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    ).headers["docker-content-digest"]
    docker_client.images.remove(f"{repository}:v1")
    unregistered = f"{registry_plain.host}/{PREFIX}/other"
    docker_client.images.get(base).tag(unregistered, "v1")
    docker_client.images.push(unregistered, "v1")
    docker_client.images.remove(f"{unregistered}:v1")

    operator.refused("pull", f"{repository}:v1", text="is not registered")
    with control_plane.admin() as admin:
        admin.register_image(repository, digest, [])
    pulled = operator.ok("pull", f"{repository}:v1", timeout=300)
    assert digest in pulled
    assert docker_client.images.get(f"{repository}:v1")
    operator.refused("pull", f"{repository}@sha256:{'0' * 64}", text="not a registered digest")
    operator.refused("pull", f"{unregistered}:v1", text="is not registered")
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(f"{unregistered}:v1")
    operator.ok("rmi", f"{repository}:v1")
    # `docker run` of an absent image: the gateway says "No such image", the CLI
    # pulls (image.pull) and creates again; the start matches the repo digest.
    ran = operator("run", "--rm", f"{repository}:v1", "echo", "pulled-and-ran", timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert "pulled-and-ran" in ran.stdout
    assert digest in docker_client.images.get(f"{repository}:v1").attrs["RepoDigests"][0]
    operator.ok("rmi", f"{repository}:v1")


def test_old_style_hijack_without_upgrade_is_piped(
    operator: DockerCli, base: str, gateway: RunningGateway, people: People
) -> None:
    """Docker's older hijack: a 200 raw-stream answer, then stdin and stdout on the socket."""
    name = f"{PREFIX}-oldhijack"
    operator.ok("create", "-it", "--name", name, base, "sh", "-c", "read x; echo got-$x")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(gateway.socket))
        sock.sendall(
            (
                f"POST /v1.41/containers/{name}/attach?stream=1&stdin=1&stdout=1&stderr=1 "
                f"HTTP/1.1\r\nHost: docker\r\nX-Trustplane-Token: {people.operator_token}\r\n"
                "Content-Length: 0\r\n\r\n"
            ).encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(4096)
        head = answer.split(b"\r\n\r\n", 1)[0].decode()
        assert head.startswith("HTTP/1.1 200"), head
        assert "application/vnd.docker.raw-stream" in head
        operator.ok("start", name)
        sock.sendall(b"hello\n")
        deadline = time.monotonic() + 30
        while b"got-hello" not in answer and time.monotonic() < deadline:
            piece = sock.recv(4096)
            if not piece:
                break
            answer += piece
        assert b"got-hello" in answer, answer


def test_streams_the_client_abandons_are_closed(
    operator: DockerCli, base: str, gateway: RunningGateway
) -> None:
    """`docker events` and `logs -f` killed mid-stream: the gateway lets go of both sides."""
    pid = gateway.process.pid
    assert pid is not None
    name = f"{PREFIX}-abandon"
    operator.ok("run", "-d", "--name", name, base, "sleep", "300")

    def open_fds() -> int:
        return len(list(Path(f"/proc/{pid}/fd").iterdir()))

    baseline = open_fds()
    followers = [
        subprocess.Popen(["docker", *args], env=operator.env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
        for args in (["events"], ["logs", "-f", name]) * 3
    ]  # fmt: skip
    time.sleep(2)
    assert all(f.poll() is None for f in followers)  # still streaming
    assert open_fds() >= baseline + 6
    for follower in followers:
        follower.kill()
        follower.wait()
    deadline = time.monotonic() + 10
    while open_fds() > baseline and time.monotonic() < deadline:
        time.sleep(0.2)
    assert open_fds() <= baseline


def test_volumes_and_networks_that_reach_the_host_are_refused(
    operator: DockerCli, docker_client: docker.DockerClient
) -> None:
    volume = f"{PREFIX}-vol"
    operator.refused(
        "volume", "create", "--opt", "type=none", "--opt", "o=bind", "--opt", "device=/",
        volume, text="host-bind access",
    )  # fmt: skip
    with pytest.raises(docker.errors.NotFound):
        docker_client.volumes.get(volume)
    network = f"{PREFIX}-net"
    operator.refused("network", "create", "--driver", "macvlan", "--opt", "parent=lo", network,
                     text="host-namespace access")  # fmt: skip
    with pytest.raises(docker.errors.NotFound):
        docker_client.networks.get(network)
    operator.ok("volume", "create", volume)
    operator.ok("network", "create", network)
    try:
        assert docker_client.volumes.get(volume).attrs["Options"] in (None, {})
        assert docker_client.networks.get(network).attrs["Driver"] == "bridge"
    finally:
        operator.ok("volume", "rm", volume)
        operator.ok("network", "rm", network)
