"""Image signatures and gateway-scoped tokens at the edge gateway, with the real docker CLI.

Signatures are cosign's simple-signing payloads, recorded with the control
plane (`POST /v1/signatures`, which logs them) and read back by the gateway
(`GET /v1/signatures`) before a pull or a start. Each refusal is also checked
on dockerd's side (nothing was created) and in the transparency log.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import httpx
import pytest
from control_helpers import add_policy_rule, log_size
from gateway_helpers import (
    PREFIX,
    DockerCli,
    RunningGateway,
    container_exists,
    register_local_image,
    start_gateway,
)
from gateway_helpers import cleanup as cleanup
from gateway_helpers import registered_base as registered_base
from jwcrypto import jwk
from test_gateway_failclosed import token_gateway
from test_gateway_reports import wait_for_entries

from trustplane.client import ControlClient
from trustplane.crypto.node_assertion import make_node_assertion
from trustplane.crypto.signing import SigningKey, generate_signing_key
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.dockerd import DockerDaemon
from trustplane.embedded.registry import RunningRegistry
from trustplane.errors import TrustplaneError
from trustplane.images.sign import simple_signing_payload

pytestmark = pytest.mark.usefixtures("cleanup")


@dataclass(frozen=True)
class Keys:
    trusted: SigningKey
    untrusted: SigningKey
    trusted_file: Path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    trusted = generate_signing_key("ecdsa-p256", "trusted")
    directory = tmp_path_factory.mktemp("sigkeys")
    public = directory / "trusted.pub"
    public.write_bytes(trusted.public.public_pem())
    return Keys(trusted, generate_signing_key("ed25519", "untrusted"), public)


@pytest.fixture(scope="module")
def checking(
    tmp_path_factory: pytest.TempPathFactory,
    control_plane: RunningControlPlane,
    docker_daemon: DockerDaemon,
    keys: Keys,
) -> Iterator[RunningGateway]:
    """Checks signatures where they exist; accepts only tokens scoped to it."""
    yield from start_gateway(
        tmp_path_factory.mktemp("gw-sig"), control_plane, docker_daemon,
        "--signature-key", str(keys.trusted_file), "--require-scoped-tokens",
    )  # fmt: skip


@pytest.fixture(scope="module")
def requiring(
    tmp_path_factory: pytest.TempPathFactory,
    control_plane: RunningControlPlane,
    docker_daemon: DockerDaemon,
    keys: Keys,
) -> Iterator[RunningGateway]:
    """Requires a valid signature on every image; accepts unscoped tokens."""
    yield from start_gateway(
        tmp_path_factory.mktemp("gw-req"), control_plane, docker_daemon,
        "--signature-key", str(keys.trusted_file), "--require-signatures",
    )  # fmt: skip


@dataclass(frozen=True)
class Operator:
    name: str
    password: str


@pytest.fixture(scope="module")
def operator(control_plane: RunningControlPlane) -> Operator:
    name = f"{PREFIX}-sig-operator"
    with control_plane.admin() as admin:
        created = admin.create_user(name, "operator")
    return Operator(name, str(created.password))


def token(plane: RunningControlPlane, who: Operator, gateways: list[str] | None = None) -> str:
    with plane.client() as client:
        return str(client.login(who.name, who.password, gateways=gateways).access_token)


def cli_for(
    gateway: RunningGateway,
    plane: RunningControlPlane,
    who: Operator,
    directory: Path,
    scoped: bool = True,
) -> DockerCli:
    scope = [gateway.node] if scoped else None
    return DockerCli.make(gateway.host, directory, token(plane, who, scope))


def published(
    plane: RunningControlPlane, client: docker.DockerClient, base: str, name: str
) -> tuple[str, str]:
    """A local tag of the base image under its own repository, registered: (tag, digest)."""
    tag = f"{PREFIX}/{name}:v1"
    client.images.get(base).tag(tag)
    register_local_image(plane, client, tag)
    return tag, str(client.images.get(tag).id)


def record(
    plane: RunningControlPlane,
    key: SigningKey,
    repository: str,
    digest: str,
    reference: str | None = None,
) -> int:
    """Sign `digest` as cosign would (naming `reference`) and record it under `repository`."""
    payload = simple_signing_payload(reference or f"index.docker.io/{repository}", digest)
    with plane.admin() as admin:
        answer = admin.record_signature(
            repository, digest, payload, key.sign(payload), key.public.public_pem()
        )
    return int(answer.log_index)


@pytest.fixture
def tags(docker_client: docker.DockerClient) -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for tag in made:
        docker_client.images.remove(tag)


def test_a_trusted_signature_lets_the_image_run(
    checking: RunningGateway,
    control_plane: RunningControlPlane,
    docker_client: docker.DockerClient,
    registered_base: str,
    operator: Operator,
    keys: Keys,
    tags: list[str],
    tmp_path: Path,
) -> None:
    tag, digest = published(control_plane, docker_client, registered_base, "sig-good")
    tags.append(tag)
    repository = tag.rsplit(":", 1)[0]
    index = record(control_plane, keys.trusted, repository, digest)
    with control_plane.admin() as admin:
        listed = admin.signatures(repository, digest)
        assert [entry.log_index for entry in listed] == [index]
        assert listed[0].key_id == keys.trusted.public.key_id
        assert admin.signatures(repository, "sha256:" + "0" * 64) == []
    cli = cli_for(checking, control_plane, operator, tmp_path / "op")
    assert cli.ok("run", "--rm", tag, "echo", "signed-and-ran").strip() == "signed-and-ran"


@pytest.mark.parametrize("forgery", ["untrusted-key", "other-repository"])
def test_a_signature_that_does_not_verify_is_refused(
    forgery: str,
    checking: RunningGateway,
    control_plane: RunningControlPlane,
    docker_client: docker.DockerClient,
    registered_base: str,
    operator: Operator,
    keys: Keys,
    tags: list[str],
    tmp_path: Path,
) -> None:
    tag, digest = published(control_plane, docker_client, registered_base, f"sig-{forgery}")
    tags.append(tag)
    repository = tag.rsplit(":", 1)[0]
    if forgery == "untrusted-key":
        record(control_plane, keys.untrusted, repository, digest)
        reason = "does not verify with"
    else:  # a trusted signature of another repository, replayed onto this one
        record(control_plane, keys.trusted, repository, digest, f"docker.io/{PREFIX}/elsewhere")
        reason = f"names {PREFIX}/elsewhere, not {repository}"
    cli = cli_for(checking, control_plane, operator, tmp_path / "op")
    start = log_size(control_plane)
    name = f"{PREFIX}-sig-{forgery}"
    message = cli.refused("run", "--name", name, tag, "true", text="is valid on this gateway")
    assert reason in message
    assert not container_exists(docker_client, name)
    with control_plane.admin() as admin:
        logged = wait_for_entries(admin, start, checking.node, 1)
    assert any(reason in str(entry.get("reason")) for entry in logged), logged


def test_required_signatures_refuse_an_unsigned_image(
    requiring: RunningGateway,
    control_plane: RunningControlPlane,
    docker_client: docker.DockerClient,
    registered_base: str,
    operator: Operator,
    keys: Keys,
    tags: list[str],
    tmp_path: Path,
) -> None:
    cli = cli_for(requiring, control_plane, operator, tmp_path / "op", scoped=False)
    name = f"{PREFIX}-sig-unsigned"
    cli.refused("run", "--name", name, registered_base, "true", text="has no signature")
    assert not container_exists(docker_client, name)
    tag, digest = published(control_plane, docker_client, registered_base, "sig-required")
    tags.append(tag)
    cli.refused("run", "--name", name, tag, "true", text="this gateway requires signatures")
    record(control_plane, keys.trusted, tag.rsplit(":", 1)[0], digest)
    assert cli.ok("run", "--name", name, tag, "echo", "now-signed").strip() == "now-signed"


def test_tokens_scoped_to_another_gateway_are_refused(
    checking: RunningGateway,
    requiring: RunningGateway,
    control_plane: RunningControlPlane,
    operator: Operator,
    tmp_path: Path,
) -> None:
    # Scoped to `checking`: valid there, refused on `requiring` (it accepts unscoped ones).
    here = cli_for(checking, control_plane, operator, tmp_path / "here")
    assert "CONTAINER ID" in here.ok("ps")
    elsewhere = DockerCli.make(requiring.host, tmp_path / "elsewhere", token(
        control_plane, operator, [checking.node]
    ))  # fmt: skip
    elsewhere.refused("ps", text=f"scoped to {checking.node}, not this gateway")
    unscoped = cli_for(requiring, control_plane, operator, tmp_path / "unscoped", scoped=False)
    assert "CONTAINER ID" in unscoped.ok("ps")
    # `checking` requires scoped tokens: an unscoped one is refused, even for reading.
    refused = cli_for(checking, control_plane, operator, tmp_path / "refused", scoped=False)
    refused.refused("ps", text="accepts only tokens scoped to it")
    both = DockerCli.make(requiring.host, tmp_path / "both", token(
        control_plane, operator, [checking.node, requiring.node]
    ))  # fmt: skip
    assert "CONTAINER ID" in both.ok("ps")


def test_a_token_cannot_be_scoped_to_an_unknown_gateway(
    control_plane: RunningControlPlane, operator: Operator
) -> None:
    with pytest.raises(TrustplaneError, match="not registered nodes"):
        token(control_plane, operator, [f"{PREFIX}-no-such-gateway"])
    with control_plane.client() as client:
        client.login(operator.name, operator.password)
        assert client.whoami().gateways is None


def test_only_callers_who_may_pull_read_signatures(
    control_plane: RunningControlPlane, admin: ControlClient
) -> None:
    nobody = f"{PREFIX}-sig-nobody"
    created = admin.create_user(nobody, "user")
    add_policy_rule(
        control_plane,
        f"""  - effect: deny
    subjects: ["user:{nobody}"]
    actions: [image.pull]
    resources: ["image:*"]
""",
    )
    with control_plane.client() as client:
        client.login(nobody, str(created.password))
        with pytest.raises(TrustplaneError, match=r"refuses image\.pull"):
            client.signatures(f"{PREFIX}/sig-good")


def test_a_pull_by_digest_needs_a_trusted_signature(
    checking: RunningGateway,
    control_plane: RunningControlPlane,
    docker_client: docker.DockerClient,
    registry_plain: RunningRegistry,
    registered_base: str,
    operator: Operator,
    keys: Keys,
    tmp_path: Path,
) -> None:
    repository = f"{registry_plain.host}/{PREFIX}/sigpull"
    docker_client.images.get(registered_base).tag(repository, "v1")
    docker_client.images.push(repository, "v1")
    digest = httpx.head(
        f"{registry_plain.url}/v2/{PREFIX}/sigpull/manifests/v1",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    ).headers["docker-content-digest"]
    docker_client.images.remove(f"{repository}:v1")
    with control_plane.admin() as admin:
        admin.register_image(repository, digest, [])
    record(control_plane, keys.untrusted, repository, digest, repository)
    cli = cli_for(checking, control_plane, operator, tmp_path / "op")
    pinned = f"{repository}@{digest}"
    cli.refused("pull", pinned, text="does not verify with")
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(pinned)
    record(control_plane, keys.trusted, repository, digest, repository)
    assert digest in cli.ok("pull", pinned, timeout=300)
    try:
        assert cli.ok("run", "--rm", pinned, "echo", "pulled-signed").strip() == "pulled-signed"
    finally:
        docker_client.images.remove(pinned)


def test_a_gateway_with_a_token_file_learns_its_name_for_scoped_tokens(
    tmp_path: Path,
    checking: RunningGateway,
    control_plane: RunningControlPlane,
    docker_daemon: DockerDaemon,
    operator: Operator,
) -> None:
    """Its identity is a node token from a file: scoped tokens must name that node."""
    key = jwk.JWK.generate(kty="EC", crv="P-256")
    node = f"{PREFIX}-sig-tokenfile"
    with control_plane.admin() as admin:
        admin.register_node(node, "gateway", key.export_to_pem().decode())
    with control_plane.client() as client:
        assertion = make_node_assertion(key, node, control_plane.url + "/v1/auth/token")
        node_token = str(client.login_node(node, assertion).access_token)
    gateway = token_gateway(
        tmp_path / "gw", control_plane.url, control_plane.ca_file, docker_daemon, node_token
    )
    try:
        host = f"unix://{tmp_path / 'gw' / 'docker.sock'}"
        mine = DockerCli.make(host, tmp_path / "mine", token(control_plane, operator, [node]))
        assert "CONTAINER ID" in mine.ok("ps")
        other = DockerCli.make(
            host, tmp_path / "other", token(control_plane, operator, [checking.node])
        )
        other.refused("ps", text="not this gateway")
    finally:
        gateway.stop()
