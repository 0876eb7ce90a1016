"""The demo's TPM scene (cli/demo_tpm.py) with the session's dockerd and TLS registry:
an attested node runs the image with `trustplane run`, a node that measured a
tampered layer gets nothing, and root's attempt to wipe that is refused."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import docker
import pytest
from conftest import start_control_plane_or_fail

from trustplane.api.images import LayerRecord
from trustplane.cli.demo_tpm import Scene, tpm_scene
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.dockerd import DockerDaemon
from trustplane.embedded.registry import RunningRegistry
from trustplane.embedded.sample_images import build_app_image
from trustplane.images.encrypt import EncryptRequest, encrypt_image
from trustplane.images.recipients import parse_recipient
from trustplane.images.selection import LayerSelector
from trustplane.oci import reference
from trustplane.oci.credentials import Credentials
from trustplane.oci.transport import Endpoint

APP = "trustplane/tpm-demo-app:test"
RECIPIENT = "tpm-demo"


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningControlPlane]:
    server = start_control_plane_or_fail(tmp_path_factory.mktemp("tpm-demo"))
    yield server
    server.stop()


def test_the_tpm_scene_runs_on_the_attested_node_and_refuses_the_tampered_one(
    plane: RunningControlPlane,
    registry_tls: RunningRegistry,
    docker_daemon: DockerDaemon,
    docker_client: docker.DockerClient,
    busybox_base: str,
    tmp_path: Path,
) -> None:
    secret = f"tpm-demo-secret-{os.urandom(4).hex()}"
    build_app_image(docker_client, busybox_base, APP, (secret + "\n").encode())
    endpoint = Endpoint(
        ca_file=registry_tls.ca_file,
        credentials=Credentials(registry_tls.username or "", registry_tls.password or ""),
    )
    published = f"docker://{registry_tls.host}/tpm-demo/app:1"
    repository = f"{registry_tls.host}/tpm-demo/app"
    with plane.admin() as admin:
        admin.create_recipient(RECIPIENT)
        kms = parse_recipient(
            f"kms:{RECIPIENT}", lambda name: str(admin.recipient(name).public_key).encode()
        )
        result = encrypt_image(
            EncryptRequest(
                source=reference.parse(f"docker-daemon:{APP}"),
                destination=reference.parse(published),
                recipients=[kms],
                selector=LayerSelector.parse(["path:/secrets/**"]),
                protect_config=True,
                destination_endpoint=endpoint,
            )
        )
        admin.register_image(
            repository,
            result.manifest_digest,
            [LayerRecord(**asdict(layer)) for layer in result.layers],
        )
    said: list[tuple[str, str]] = []
    proved: list[str] = []
    tpm_scene(
        Scene(
            work=tmp_path / "tpm",
            daemon=docker_daemon,
            registry=registry_tls,
            control=plane,
            endpoint=endpoint,
            published=published,
            repository=repository,
            kms_recipient=RECIPIENT,
            base=busybox_base,
            secret=secret,
        ),
        lambda label, text: said.append((label, text)),
        proved.append,
    )
    assert ("output", f"secret: {secret}") in said
    refusals = [text for label, text in said if label == "tpm-node-2" and "refused" in text]
    assert len(refusals) == 3
    assert "refused: measurement: layer 2 of" in refusals[0]
    assert "refused: attestation: " in refusals[1]
    assert "refused: attestation: " in refusals[2]
    assert "quarantined" in refusals[2]
    root = [text for label, text in said if label == "root"]
    assert root[0].startswith("tpm2_pcrreset 13: refused by the TPM")
    assert "locality" in root[0]
    wiped = [text for label, text in said if label == "tpm-node-2" and "agent --once" in text]
    assert "tampering: the event log holds 0 events" in wiped[-1]
    assert len(proved) == 3
    assert not docker_client.containers.list(all=True, filters={"name": "demo-zero-trust"})
