"""The distribution path end to end: Docker → encrypted in a registry → Docker.

Publish from the local engine to a TLS registry with basic auth, encrypting
only the secret layer; the registry's storage then holds no plaintext of the
secret in any form (raw or gzip-decompressed), the public layers are shared
by digest with the plain image, and a pull through trustplane decrypts into
Docker, where the secret is readable again.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import docker
from conftest import APP_SECRET, KeyPair, run_skopeo
from oci_helpers import manifest

from trustplane.crypto.keys import load_unwrap_key
from trustplane.embedded.registry import RunningRegistry
from trustplane.images.decrypt import DecryptRequest, decrypt_image
from trustplane.images.encrypt import EncryptRequest, encrypt_image
from trustplane.images.inspect import inspect_image
from trustplane.images.recipients import parse_recipient
from trustplane.images.selection import LayerSelector
from trustplane.oci import reference
from trustplane.oci.credentials import Credentials
from trustplane.oci.transport import Endpoint


def contents(path: Path) -> bytes:
    data = path.read_bytes()
    try:
        return data + gzip.decompress(data)
    except (OSError, EOFError, zlib.error):
        return data


def test_publish_encrypted_and_pull_into_docker(
    app_image: str,
    keys: dict[str, KeyPair],
    registry_tls: RunningRegistry,
    docker_client: docker.DockerClient,
) -> None:
    assert registry_tls.ca_file is not None
    assert registry_tls.username
    assert registry_tls.password
    endpoint = Endpoint(
        ca_file=registry_tls.ca_file,
        credentials=Credentials(registry_tls.username, registry_tls.password),
    )
    target = f"docker://{registry_tls.host}/shop/app:1.0"
    result = encrypt_image(
        EncryptRequest(
            source=reference.parse(f"docker-daemon:{app_image}"),
            destination=reference.parse(target),
            recipients=[parse_recipient(f"jwe:{keys['rsa'].public}")],
            selector=LayerSelector.parse(["path:/secrets/**"]),
            destination_endpoint=endpoint,
        )
    )
    assert result.encrypted_layers == (2,)

    blobs = list((registry_tls.storage_dir).rglob("data"))
    assert blobs, "the registry stored the blobs on disk"
    secret = APP_SECRET.strip()
    assert not any(secret in contents(path) for path in blobs)

    info = inspect_image(reference.parse(target), endpoint)
    assert [layer["encrypted"] for layer in info["layers"]] == [False, False, True]
    original = docker_client.images.get(app_image).attrs["RootFS"]["Layers"]
    assert [layer["diffID"] for layer in info["layers"]] == original

    decrypt_image(
        DecryptRequest(
            source=reference.parse(target),
            destination=reference.parse("docker-daemon:trustplane/app:from-registry"),
            keys=[load_unwrap_key(keys["rsa"].private.read_bytes(), "rsa")],
            source_endpoint=endpoint,
        )
    )
    output = docker_client.containers.run(
        "trustplane/app:from-registry", ["cat", "/secrets/token"], remove=True
    )
    assert output == APP_SECRET
    pulled = docker_client.images.get("trustplane/app:from-registry")
    assert pulled.id == docker_client.images.get(app_image).id  # the very same image id


def test_docker_schema2_source_is_encrypted_as_oci(
    app_image: str,
    keys: dict[str, KeyPair],
    registry_plain: RunningRegistry,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    """Encrypted layers under Docker media types are undecryptable (skopeo's
    `--format v2s2` makes such images); trustplane converts to OCI first."""
    source = f"docker://{registry_plain.host}/flow/v2s2:1"
    run_skopeo(
        "copy", "--format", "v2s2", "--dest-tls-verify=false", f"docker-daemon:{app_image}", source
    )
    encrypted = tmp_path / "enc"
    result = encrypt_image(
        EncryptRequest(
            source=reference.parse(source),
            destination=reference.parse(f"oci:{encrypted}:v1"),
            recipients=[parse_recipient(f"jwe:{keys['ec-p384'].public}")],
            selector=LayerSelector.parse(["path:/secrets/**"]),
        )
    )
    assert result.converted_from_docker
    doc = manifest(encrypted, "v1")
    types = [doc["mediaType"], doc["config"]["mediaType"], *(x["mediaType"] for x in doc["layers"])]
    assert not any("docker" in t for t in types), types
    assert doc["layers"][2]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"

    run_skopeo(
        "copy",
        "--decryption-key",
        str(keys["ec-p384"].private),
        f"oci:{encrypted}:v1",
        f"oci:{tmp_path / 'dec'}:v1",
    )
    decrypt_image(
        DecryptRequest(
            source=reference.parse(f"oci:{encrypted}:v1"),
            destination=reference.parse("docker-daemon:trustplane/app:from-v2s2"),
            keys=[load_unwrap_key(keys["ec-p384"].private.read_bytes(), "ec-p384")],
        )
    )
    output = docker_client.containers.run(
        "trustplane/app:from-v2s2", ["cat", "/secrets/token"], remove=True
    )
    assert output == APP_SECRET
