"""Tiered access end to end: one encrypted image, two keys, two views, run in Docker.

Encrypted layers 1 (the app) and 2 (the secret); the full key opens both, the
tier-1 key opens the app only. Decrypting straight into the Docker engine
(docker-daemon: destination) gives images that run and see exactly their files.
"""

from __future__ import annotations

import json
from pathlib import Path

import docker
import pytest
from conftest import APP_SECRET, KeyPair
from oci_helpers import config, manifest

from trustplane.crypto.keys import load_unwrap_key
from trustplane.errors import DecryptionKeyError
from trustplane.images.decrypt import DecryptRequest, decrypt_image
from trustplane.images.encrypt import EncryptRequest, encrypt_image
from trustplane.images.recipients import parse_recipient
from trustplane.images.selection import LayerSelector
from trustplane.oci import reference


@pytest.fixture(scope="module")
def tiered(
    app_image: str, keys: dict[str, KeyPair], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    layout = tmp_path_factory.mktemp("tiered") / "enc"
    encrypt_image(
        EncryptRequest(
            source=reference.parse(f"docker-daemon:{app_image}"),
            destination=reference.parse(f"oci:{layout}:v1"),
            recipients=[
                parse_recipient(f"jwe:{keys['ec-p256'].public}"),
                parse_recipient(f"jwe:{keys['tier-low'].public}:tier=1"),
            ],
            selector=LayerSelector.parse(["1,2"]),
        )
    )
    return layout


def decrypt_to_docker(layout: Path, key: KeyPair, tag: str) -> int:
    result = decrypt_image(
        DecryptRequest(
            source=reference.parse(f"oci:{layout}:v1"),
            destination=reference.parse(f"docker-daemon:{tag}"),
            keys=[load_unwrap_key(key.private.read_bytes(), str(key.private))],
        )
    )
    return result.layer_count


def run(client: docker.DockerClient, image: str, command: str) -> tuple[int, str]:
    container = client.containers.run(image, ["/bin/sh", "-c", command], detach=True)
    try:
        status = container.wait(timeout=60)["StatusCode"]
        return status, container.logs().decode()
    finally:
        container.remove(force=True)


def test_full_key_sees_everything(
    tiered: Path, keys: dict[str, KeyPair], docker_client: docker.DockerClient
) -> None:
    assert decrypt_to_docker(tiered, keys["ec-p256"], "trustplane/app:full") == 3
    status, output = run(docker_client, "trustplane/app:full", "/bin/sh /app/run.sh")
    assert status == 0
    assert f"secret: {APP_SECRET.decode().strip()}" in output
    assert "config: greeting=hello" in output


def test_lower_tier_gets_a_runnable_image_cut_below_the_secret(
    tiered: Path, keys: dict[str, KeyPair], docker_client: docker.DockerClient, app_image: str
) -> None:
    assert decrypt_to_docker(tiered, keys["tier-low"], "trustplane/app:tier1") == 2
    status, output = run(docker_client, "trustplane/app:tier1", "/bin/sh /app/run.sh; ls /secrets")
    assert "config: greeting=hello" in output
    assert "secret: none" in output
    assert "No such file or directory" in output
    assert APP_SECRET.decode().strip() not in output
    assert status != 0  # `ls /secrets` fails: the directory does not exist

    image = docker_client.images.get("trustplane/app:tier1")
    original = docker_client.images.get(app_image)
    assert image.attrs["RootFS"]["Layers"] == original.attrs["RootFS"]["Layers"][:2]
    history = [h for h in image.history() if h.get("CreatedBy")]
    assert not any("secrets" in h["CreatedBy"] for h in history)


def test_truncated_config_is_consistent(
    tiered: Path, keys: dict[str, KeyPair], tmp_path: Path
) -> None:
    decrypt_image(
        DecryptRequest(
            source=reference.parse(f"oci:{tiered}:v1"),
            destination=reference.parse(f"oci:{tmp_path / 'low'}:v1"),
            keys=[load_unwrap_key(keys["tier-low"].private.read_bytes(), "tier-low")],
        )
    )
    cut = config(tmp_path / "low", "v1")
    assert len(manifest(tmp_path / "low", "v1")["layers"]) == 2
    assert len(cut["rootfs"]["diff_ids"]) == 2
    assert sum(1 for h in cut["history"] if not h.get("empty_layer")) == 2
    assert "secrets" not in json.dumps(cut["history"])


def test_outsider_gets_nothing(tiered: Path, keys: dict[str, KeyPair], tmp_path: Path) -> None:
    """A key that opens no layer is refused, cut or not: the public base alone is
    what anyone gets without a key, and must not pass for a decryption."""
    outsider = [load_unwrap_key(keys["outsider"].private.read_bytes(), "outsider")]
    for truncate in (True, False):
        with pytest.raises(DecryptionKeyError, match="can open layer 1, its lowest encrypted"):
            decrypt_image(
                DecryptRequest(
                    source=reference.parse(f"oci:{tiered}:v1"),
                    destination=reference.parse(f"oci:{tmp_path / 'out'}:v1"),
                    keys=outsider,
                    truncate=truncate,
                )
            )
        assert not (tmp_path / "out").exists()
