"""The KMS holds an image's recipient key: publish once, grant readers later.

One `trustplane server` for the module, the session's plain registry and
Docker. The app image (layers: 0 busybox base, 1 /app, 2 /secrets) is
encrypted through the CLI for `kms:NAME` only, so nobody outside the KMS
holds a key that opens it; every view of it below comes from the KMS
re-wrapping a layer key after the policy said yes, and every answer, yes or
no, is an entry of the transparency log.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from conftest import APP_SECRET, start_control_plane_or_fail
from control_helpers import Cli, add_policy_rule, assert_fails, entries_since, log_size
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwk
from oci_helpers import manifest

from trustplane.client import ControlClient
from trustplane.crypto import keywrap
from trustplane.crypto.keys import generate_key_pair, load_recipient_key, load_unwrap_key
from trustplane.crypto.layer_cipher import PrivateOptions
from trustplane.crypto.node_assertion import make_node_assertion
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.registry import RunningRegistry
from trustplane.embedded.sample_images import build_app_image
from trustplane.errors import DecryptionKeyError, ExitCode, Forbidden
from trustplane.images.decrypt import DecryptRequest, decrypt_image
from trustplane.images.kms_unwrap import KmsUnwrapper
from trustplane.oci import reference
from trustplane.oci.annotations import ENC_KEYS_JWE

RECIPIENT = "images-kms"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SECRET_TEXT = APP_SECRET.decode().strip()


@dataclass(frozen=True)
class Published:
    reference: str
    repository: str
    manifest_digest: str
    manifest: bytes
    log_index: int
    layer_digests: list[str]
    recipient_kid: str


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningControlPlane]:
    server = start_control_plane_or_fail(tmp_path_factory.mktemp("kms-images"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def admin_client(plane: RunningControlPlane) -> Iterator[ControlClient]:
    client = plane.admin()
    yield client
    client.close()


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kms-images-sessions")


@pytest.fixture(scope="module")
def admin_cli(plane: RunningControlPlane, sessions: Path) -> Cli:
    cli = Cli(sessions / "admin.json")
    cli.login(plane, "admin", plane.admin_password)
    return cli


@pytest.fixture(scope="module")
def published(
    plane: RunningControlPlane,
    admin_cli: Cli,
    admin_client: ControlClient,
    registry_plain: RunningRegistry,
    app_image: str,
) -> Published:
    """`recipient create`, then `image encrypt --recipient kms:NAME --layers 1,2` to a registry."""
    created = admin_cli("recipient", "create", RECIPIENT)
    assert created.returncode == 0, created.stderr
    kid = admin_client.recipient(RECIPIENT).key_id
    assert created.stdout.strip() == f"recipient {RECIPIENT}: key id {kid}"

    repository = f"{registry_plain.host}/kms/app"
    target = f"docker://{repository}:1"
    encrypted = admin_cli(
        "image",
        "encrypt",
        f"docker-daemon:{app_image}",
        target,
        "--recipient",
        f"kms:{RECIPIENT}",
        "--layers",
        "1,2",
        "--quiet",
        "--json",
    )
    assert encrypted.returncode == 0, encrypted.stderr
    result = json.loads(encrypted.stdout)
    assert result["encryptedLayers"] == [1, 2]
    assert result["layerCount"] == 3
    index = result["registeredLogIndex"]
    assert isinstance(index, int)
    assert f"registered {repository} with the control plane (log entry {index})" in (
        encrypted.stderr
    )
    entry = json.loads(admin_client.log_entry(index))
    raw = registry_manifest(registry_plain, "kms/app", "1")
    return Published(
        reference=target,
        repository=repository,
        manifest_digest=result["manifestDigest"],
        manifest=raw,
        log_index=index,
        layer_digests=list(entry["layers"]),
        recipient_kid=kid,
    )


# -- helpers ---------------------------------------------------------------------------


def registry_manifest(registry: RunningRegistry, repository: str, tag: str) -> bytes:
    response = httpx.get(
        f"{registry.url}/v2/{repository}/manifests/{tag}",
        headers={"Accept": OCI_MANIFEST},
        timeout=30,
    )
    response.raise_for_status()
    assert response.headers["Docker-Content-Digest"] == sha256(response.content)
    return response.content


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def unwraps_since(client: ControlClient, start: int) -> list[tuple[str, str | None, Any, str]]:
    """(subject, image, layer, decision) of every kms.unwrap entry from `start` on."""
    return [
        (e["subject"], e["image"], e["layer"], e["decision"])
        for e in entries_since(client, start)
        if e["kind"] == "kms.unwrap"
    ]


def run(client: docker.DockerClient, image: str, command: str) -> tuple[int, str]:
    container = client.containers.run(image, ["/bin/sh", "-c", command], detach=True)
    try:
        status = container.wait(timeout=60)["StatusCode"]
        return int(status), container.logs().decode()
    finally:
        container.remove(force=True)


def new_user(admin_client: ControlClient, plane: RunningControlPlane, sessions: Path) -> Cli:
    name = f"reader-{os.urandom(3).hex()}"
    password = base64.urlsafe_b64encode(os.urandom(18)).decode()
    admin_client.create_user(name, "user", password)
    cli = Cli(sessions / f"{name}.json")
    cli.login(plane, name, password)
    return cli


# -- tests -------------------------------------------------------------------------------


def test_publishing_for_a_kms_recipient_registers_the_image(
    published: Published, admin_client: ControlClient
) -> None:
    entry = json.loads(admin_client.log_entry(published.log_index))
    assert entry["kind"] == "image.register"
    assert entry["subject"] == "user:admin"
    assert entry["image"] == published.repository
    assert entry["manifest"] == published.manifest_digest == sha256(published.manifest)
    assert len(entry["layers"]) == 3

    # Layers 1 and 2 are wrapped for the KMS's key alone; layer 0 stays public.
    layers = json.loads(published.manifest)["layers"]
    assert [layer["mediaType"].endswith("+encrypted") for layer in layers] == [False, True, True]
    for layer in layers[1:]:
        jwe = base64.b64decode(layer["annotations"][ENC_KEYS_JWE]).decode()
        assert [r.kid for r in keywrap.recipients_of(jwe)] == [published.recipient_kid]
    # The registry holds no plaintext digest of the encrypted layers: only the KMS maps them.
    assert layers[0]["digest"] == entry["layers"][0]
    assert {layer["digest"] for layer in layers[1:]}.isdisjoint(entry["layers"])


def test_admin_decrypts_through_the_kms_and_runs_it(
    published: Published,
    plane: RunningControlPlane,
    admin_cli: Cli,
    admin_client: ControlClient,
    docker_client: docker.DockerClient,
) -> None:
    start = log_size(plane)
    tag = "trustplane/kms-app:admin"
    decrypted = admin_cli(
        "image",
        "decrypt",
        published.reference,
        f"docker-daemon:{tag}",
        "--kms",
        plane.url,
        "--quiet",
        "--json",
    )
    assert decrypted.returncode == 0, decrypted.stderr
    result = json.loads(decrypted.stdout)
    assert result["decryptedLayers"] == [1, 2]
    assert result["layerCount"] == 3
    status, output = run(docker_client, tag, "/bin/sh /app/run.sh")
    assert status == 0, output
    assert f"secret: {SECRET_TEXT}" in output
    assert unwraps_since(admin_client, start) == [
        ("user:admin", published.repository, 1, "allow"),
        ("user:admin", published.repository, 2, "allow"),
    ]


def test_a_user_gets_the_tiers_the_policy_grants_and_no_more(
    published: Published,
    plane: RunningControlPlane,
    admin_client: ControlClient,
    sessions: Path,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    user = new_user(admin_client, plane, sessions)
    subject = "user:" + user.session.stem
    repo = published.repository

    # No rule names the image: the KMS opens no layer for the user, which is
    # no decryption at all (exit 6), not the public base passed off as one.
    start = log_size(plane)
    public = user(
        "image",
        "decrypt",
        published.reference,
        f"oci:{tmp_path / 'public'}:1",
        "--kms",
        plane.url,
        "--quiet",
    )
    assert_fails(public, ExitCode.NO_KEY, "can open layer 1, its lowest encrypted layer")
    assert not (tmp_path / "public").exists()
    refused = user(
        "image",
        "decrypt",
        published.reference,
        f"oci:{tmp_path / 'refused'}:1",
        "--kms",
        plane.url,
        "--no-truncate",
        "--quiet",
    )
    assert_fails(refused, ExitCode.NO_KEY, "can open layer 1, its lowest encrypted layer")
    assert not (tmp_path / "refused").exists()
    assert unwraps_since(admin_client, start) == [
        (subject, repo, 1, "deny"),
        (subject, repo, 1, "deny"),
    ]

    # One rule: this user, key.release on this image, tiers up to layer 1.
    add_policy_rule(
        plane,
        f'  - subjects: ["{subject}"]\n'
        "    actions: [key.release]\n"
        f'    resources: ["image:{repo}"]\n'
        "    max_layer: 1\n",
    )
    start = log_size(plane)
    tag = "trustplane/kms-app:tier1"
    cut = user(
        "image",
        "decrypt",
        published.reference,
        f"docker-daemon:{tag}",
        "--kms",
        plane.url,
        "--quiet",
        "--json",
    )
    assert cut.returncode == 0, cut.stderr
    result = json.loads(cut.stdout)
    assert result["layerCount"] == 2
    assert result["decryptedLayers"] == [1]
    status, output = run(docker_client, tag, "/bin/sh /app/run.sh; ls /secrets")
    assert "config: greeting=hello" in output
    assert "secret: none" in output
    assert "No such file or directory" in output
    assert SECRET_TEXT not in output
    assert status != 0  # `ls /secrets`: the directory does not exist in this view
    unwraps = unwraps_since(admin_client, start)
    assert unwraps == [(subject, repo, 1, "allow"), (subject, repo, 2, "deny")]
    denial = [e for e in entries_since(admin_client, start) if e["kind"] == "kms.unwrap"][-1]
    assert "layer 2 is above every tier" in denial["reason"]


def test_a_node_added_after_publication_decrypts_without_reencryption(
    published: Published,
    plane: RunningControlPlane,
    admin_client: ControlClient,
    registry_plain: RunningRegistry,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    # The node does not exist when the image is published; it joins now.
    name = f"edge-{os.urandom(3).hex()}"
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    start = log_size(plane)
    admin_client.register_node(name, "host", public.decode())
    joined = [e for e in entries_since(admin_client, start) if e["kind"] == "identity.node"]
    assert [e["node"] for e in joined] == [name]
    assert joined[0]["index"] > published.log_index

    def node_client() -> ControlClient:
        client = plane.client()
        assertion = make_node_assertion(jwk.JWK.from_pyca(key), name, plane.url + "/v1/auth/token")
        client.login_node(name, assertion)
        assert client.whoami().subject == f"node:{name}"
        return client

    source = reference.parse(published.reference)
    with node_client() as node:
        # Registered, but not granted: the KMS refuses, so nothing is decrypted.
        start = log_size(plane)
        with pytest.raises(DecryptionKeyError, match="can open layer 1, its lowest encrypted"):
            decrypt_image(
                DecryptRequest(
                    source=source,
                    destination=reference.parse(f"oci:{tmp_path / 'before'}:1"),
                    remote=[KmsUnwrapper(node)],
                )
            )
        assert not (tmp_path / "before").exists()
        assert unwraps_since(admin_client, start) == [
            (f"node:{name}", published.repository, 1, "deny")
        ]

        add_policy_rule(
            plane,
            f'  - subjects: ["node:{name}"]\n'
            "    actions: [key.release]\n"
            f'    resources: ["image:{published.repository}"]\n',
        )
        start = log_size(plane)
        tag = f"trustplane/kms-app:{name}"
        after = decrypt_image(
            DecryptRequest(
                source=source,
                destination=reference.parse(f"docker-daemon:{tag}"),
                remote=[KmsUnwrapper(node)],
            )
        )
    assert (after.layer_count, after.decrypted_layers) == (3, (1, 2))
    status, output = run(docker_client, tag, "/bin/sh /app/run.sh")
    assert status == 0, output
    assert f"secret: {SECRET_TEXT}" in output
    assert unwraps_since(admin_client, start) == [
        (f"node:{name}", published.repository, 1, "allow"),
        (f"node:{name}", published.repository, 2, "allow"),
    ]

    # Nobody re-encrypted or re-pushed anything: the registry serves the same bytes.
    assert registry_manifest(registry_plain, "kms/app", "1") == published.manifest
    images = entries_since(admin_client, published.log_index + 1)
    assert not [e for e in images if e["kind"] == "image.register"]


def test_layers_of_an_unregistered_image_are_refused(
    published: Published,
    plane: RunningControlPlane,
    admin_cli: Cli,
    admin_client: ControlClient,
    docker_client: docker.DockerClient,
    busybox_base: str,
    tmp_path: Path,
) -> None:
    # Same recipient, other content, never registered (--no-register).
    other = "trustplane/kms-unregistered:1"
    build_app_image(docker_client, busybox_base, other, b"never registered\n")
    layout = tmp_path / "unregistered"
    encrypted = admin_cli(
        "image",
        "encrypt",
        f"docker-daemon:{other}",
        f"oci:{layout}:1",
        "--recipient",
        f"kms:{RECIPIENT}",
        "--layers",
        "2",
        "--no-register",
        "--quiet",
        "--json",
    )
    assert encrypted.returncode == 0, encrypted.stderr
    assert json.loads(encrypted.stdout)["registeredLogIndex"] is None

    start = log_size(plane)
    decrypted = admin_cli(
        "image",
        "decrypt",
        f"oci:{layout}:1",
        f"oci:{tmp_path / 'out'}:1",
        "--kms",
        plane.url,
        "--quiet",
        "--json",
    )
    assert_fails(decrypted, ExitCode.NO_KEY, "can open layer 2, its lowest encrypted layer")
    assert not (tmp_path / "out").exists()
    strict = admin_cli(
        "image",
        "decrypt",
        f"oci:{layout}:1",
        f"oci:{tmp_path / 'strict'}:1",
        "--kms",
        plane.url,
        "--no-truncate",
        "--quiet",
    )
    assert_fails(strict, ExitCode.NO_KEY, "can open layer 2, its lowest encrypted layer")

    annotation = manifest(layout, "1")["layers"][2]["annotations"][ENC_KEYS_JWE]
    with pytest.raises(Forbidden, match="belongs to no registered image"):
        admin_client.unwrap(annotation, admin_client.recipient(RECIPIENT).public_key)

    refusals = [e for e in entries_since(admin_client, start) if e["kind"] == "kms.unwrap"]
    assert len(refusals) == 3  # one per refused unwrap: two decrypts, one direct call
    for entry in refusals:
        assert entry["subject"] == "user:admin"
        assert entry["decision"] == "deny"
        assert (entry["image"], entry["layer"]) == (None, None)
        assert entry["reason"] == "layer of no registered image"


def test_the_unwrap_answer_opens_only_with_the_transport_key(
    published: Published, plane: RunningControlPlane, admin_client: ControlClient
) -> None:
    layer = json.loads(published.manifest)["layers"][2]
    annotation = layer["annotations"][ENC_KEYS_JWE]
    transport_private, transport_public = generate_key_pair("ec-p256")
    transport = load_unwrap_key(transport_private, "transport")
    stranger = load_unwrap_key(generate_key_pair("ec-p256")[0], "stranger")

    start = log_size(plane)
    answer = admin_client.unwrap(annotation, transport_public.decode())
    assert (answer.repository, answer.layer) == (published.repository, 2)
    assert [r.kid for r in keywrap.recipients_of(answer.jwe)] == [
        load_recipient_key(transport_public, "transport").kid
    ]
    payload = keywrap.unwrap(answer.jwe, [transport], "answer")
    assert payload is not None
    options = PrivateOptions.from_json(payload)
    assert options.digest == published.layer_digests[2]
    assert len(options.symkey) == 32

    # Nobody else opens the answer, and the transport key does not open the layer itself.
    assert keywrap.unwrap(answer.jwe, [stranger], "answer") is None
    original = base64.b64decode(annotation).decode()
    assert keywrap.unwrap(original, [transport], "layer") is None
    assert unwraps_since(admin_client, start) == [("user:admin", published.repository, 2, "allow")]

    # The layer key travels only inside that JWE: not in the log, not in the server's output.
    symkey = base64.b64encode(options.symkey)
    assert symkey not in plane.process.log_file.read_bytes()
    for entry in entries_since(admin_client, 0):
        assert symkey.decode() not in json.dumps(entry)
