"""A hostile client picks image names that the gateway once read differently from the control plane.

Before one normaliser (oci/reference.py) served both, the gateway read
`localhost/x` as the Docker Hub name `docker.io/localhost/x`, did not know
`registry-1.docker.io`, and compared signed docker-references by stripping
prefixes. Here the real gateway, dockerd and control plane must give one
answer per image, whatever spelling the client picks, and the answer must be
right: a name the control plane has no record for is refused before dockerd,
every spelling of a registered image is accepted, and a policy rule naming an
image holds under all of its spellings.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import docker
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

from trustplane.api.images import LayerRecord
from trustplane.crypto.signing import SigningKey, generate_signing_key
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.dockerd import DockerDaemon
from trustplane.embedded.sample_images import build_image
from trustplane.images.sign import simple_signing_payload

pytestmark = pytest.mark.usefixtures("cleanup")


@pytest.fixture(scope="module")
def signer() -> SigningKey:
    return generate_signing_key("ecdsa-p256", "names-publisher")


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    control_plane: RunningControlPlane,
    docker_daemon: DockerDaemon,
    signer: SigningKey,
) -> Iterator[RunningGateway]:
    directory = tmp_path_factory.mktemp("gw-names")
    trusted = directory / "publisher.pub"
    trusted.write_bytes(signer.public.public_pem())
    yield from start_gateway(
        directory, control_plane, docker_daemon, "--signature-key", str(trusted)
    )


@pytest.fixture(scope="module")
def people(control_plane: RunningControlPlane) -> People:
    return make_people(control_plane, "names")


@pytest.fixture
def operator(gateway: RunningGateway, people: People, tmp_path: Path) -> DockerCli:
    return DockerCli.make(gateway.host, tmp_path / "operator", people.operator_token)


def built(client: docker.DockerClient, base: str, tag: str, marker: str) -> str:
    """An image of its own content (base + /marker), tagged `tag`, built on dockerd directly."""
    return build_image(
        client, tag, f"FROM {base}\nCOPY marker /marker\n", {"marker": marker.encode()}
    )


def register(
    plane: RunningControlPlane, client: docker.DockerClient, spelling: str, tag: str
) -> str:
    """Register the local image `tag` (its layers) under `spelling`; the repository stored."""
    image = client.images.get(tag)
    layers = [
        LayerRecord(index=i, digest=d, encrypted=False, diff_id=d)
        for i, d in enumerate(image.attrs["RootFS"]["Layers"])
    ]
    with plane.admin() as admin:
        admin.register_image(spelling, str(image.id), layers)
        return admin.images(spelling)[0].repository


def repositories(plane: RunningControlPlane, spelling: str) -> list[tuple[str, str]]:
    with plane.admin() as admin:
        return [(r.repository, r.manifest_digest) for r in admin.images(spelling)]


def test_localhost_is_a_registry_not_a_docker_hub_namespace(
    operator: DockerCli,
    busybox_base: str,
    docker_client: docker.DockerClient,
    control_plane: RunningControlPlane,
) -> None:
    """`localhost/X` and `docker.io/localhost/X` are two images; only the registered one passes."""
    path = f"{PREFIX}/names-local"
    tag = f"localhost/{path}:v1"
    image_id = built(docker_client, busybox_base, tag, "local")
    try:
        # Its content is registered, but as the Docker Hub image docker.io/localhost/...
        hub = register(control_plane, docker_client, f"docker.io/localhost/{path}", tag)
        assert hub == f"docker.io/localhost/{path}"  # kept whole: `localhost/...` is another

        # The control plane: every spelling of the Hub image finds it; localhost/... does not.
        for spelling in (f"docker.io/localhost/{path}", f"index.docker.io/localhost/{path}"):
            assert repositories(control_plane, spelling) == [(hub, image_id)]
        assert repositories(control_plane, f"localhost/{path}") == []
        assert repositories(control_plane, f"LOCALHOST/{path}") == []

        # The gateway agrees: localhost/... is not registered (the old gateway looked it
        # up as docker.io/localhost/... too, and let it run and be pulled).
        name = f"{PREFIX}-names-local"
        operator.refused("run", "--name", name, tag, "true", text="is not registered")
        operator.refused("create", "--name", name, image_id, "true", text="is not registered")
        assert not container_exists(docker_client, name)
        operator.refused("pull", tag, text="is not registered")  # refused before dockerd

        # Registered under the registry it names, the same name is accepted, and the
        # decision is about that image, not the Hub one.
        local = register(control_plane, docker_client, f"LocalHost/{path}", tag)
        assert local == f"localhost/{path}"
        assert repositories(control_plane, f"localhost/{path}") == [(local, image_id)]
        assert repositories(control_plane, f"docker.io/localhost/{path}") == [(hub, image_id)]
        start = log_size(control_plane)
        assert operator.ok("run", "--rm", tag, "cat", "/marker") == "local"
        with control_plane.admin() as admin:
            images = {
                entry["resource"]
                for entry in entries_since(admin, start)
                if str(entry.get("resource", "")).startswith("image:")
            }
        assert images == {f"image:localhost/{path}"}
    finally:
        docker_client.images.remove(tag)


def test_every_docker_hub_alias_names_one_image(
    operator: DockerCli,
    busybox_base: str,
    docker_client: docker.DockerClient,
    control_plane: RunningControlPlane,
    people: People,
) -> None:
    """registry-1.docker.io/library/X, index.docker.io/X, docker.io/library/X and X are one."""
    short = f"{PREFIX}-names-hub"
    tag = f"{short}:v1"
    image_id = built(docker_client, busybox_base, tag, "hub")
    stored = register(control_plane, docker_client, f"registry-1.docker.io/library/{short}", tag)
    assert stored == short
    for spelling in (
        short,
        f"library/{short}",
        f"docker.io/{short}",
        f"docker.io/library/{short}",
        f"index.docker.io/{short}",
        f"registry-1.docker.io/library/{short}",
    ):
        assert repositories(control_plane, spelling) == [(short, image_id)], spelling

    # The old gateway looked for `registry-1.docker.io/...` literally and refused this.
    start = log_size(control_plane)
    for spelling in (tag, f"docker.io/library/{tag}", f"index.docker.io/library/{tag}"):
        assert operator.ok("run", "--rm", spelling, "cat", "/marker") == "hub", spelling
    with control_plane.admin() as admin:
        starts = [
            entry["resource"]
            for entry in entries_since(admin, start)
            if entry.get("decision") == "allow"
            and str(entry.get("resource", "")).startswith("image:")
        ]
    assert starts == [f"image:{short}"] * 3  # one resource, whatever the spelling

    # A rule naming the image holds under every spelling the client picks.
    add_policy_rule(
        control_plane,
        f"""  - effect: deny
    subjects: ["user:{people.operator}"]
    actions: [container.start]
    resources: ["image:{short}"]
""",
    )
    for spelling in (tag, f"docker.io/library/{tag}", f"index.docker.io/library/{tag}"):
        name = f"{PREFIX}-names-denied"
        operator.refused(
            "run", "--name", name, spelling, "true", text="the control plane refuses container"
        )
        assert not container_exists(docker_client, name)
    docker_client.images.remove(tag)


def test_signatures_are_found_and_checked_under_any_spelling(
    operator: DockerCli,
    busybox_base: str,
    docker_client: docker.DockerClient,
    control_plane: RunningControlPlane,
    signer: SigningKey,
) -> None:
    """A signature for docker.io/localhost/X does not vouch for localhost/X; one logged
    under another spelling of the image itself does."""
    path = f"{PREFIX}/names-signed"
    tag = f"localhost/{path}:v1"
    digest = built(docker_client, busybox_base, tag, "signed")
    assert register(control_plane, docker_client, f"localhost/{path}", tag) == f"localhost/{path}"

    def record(repository: str, docker_reference: str) -> None:
        payload = simple_signing_payload(docker_reference, digest)
        with control_plane.admin() as admin:
            admin.record_signature(
                repository, digest, payload, signer.sign(payload), signer.public.public_pem()
            )

    # The trusted publisher's signature of the Docker Hub image docker.io/localhost/...:
    # the old gateway stripped "docker.io/" and took it for localhost/...
    record(f"localhost/{path}", f"docker.io/localhost/{path}")
    name = f"{PREFIX}-names-signed"
    message = operator.refused("run", "--name", name, tag, "true", text="is valid on this gateway")
    assert f"names docker.io/localhost/{path}, not localhost/{path}" in message
    assert not container_exists(docker_client, name)

    # A signature of this image, logged and signed under other spellings of its name.
    record(f"LOCALHOST/{path}", f"LocalHost/{path}")
    with control_plane.admin() as admin:
        logged = [admin.signatures(s, digest) for s in (f"localhost/{path}", f"LOCALHOST/{path}")]
    assert len(logged[0]) == 2
    assert logged[0] == logged[1]
    assert {entry.repository for entry in logged[0]} == {f"localhost/{path}"}
    assert operator.ok("run", "--rm", tag, "cat", "/marker") == "signed"
    docker_client.images.remove(tag)
