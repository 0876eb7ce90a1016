"""`trustplane run` on a node, for the zero-trust tests and the attacks on
attestation: a published image (signed, KMS-encrypted, registered), nodes
with their own key and state directory, the CLI as the node runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import pytest
from control_helpers import Cli
from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwk

from trustplane.client import ControlClient
from trustplane.crypto.signing import generate_signing_key
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.dockerd import DockerDaemon
from trustplane.embedded.registry import RunningRegistry
from trustplane.embedded.sample_images import build_app_image
from trustplane.embedded.swtpm import RunningSwtpm
from trustplane.images.sign import sign_image
from trustplane.oci import reference
from trustplane.trust.attestation import Event

RECIPIENT = "zt-images"
APP_TAG = "trustplane/zt-app:test"
SECRET = b"zero-trust secret 7f3a\n"
RULES = """\
  - subjects: ["node:zt-*"]
    actions: [key.release]
    resources: ["image:*"]
    require_attestation: true
  - subjects: ["node:zt-run-*"]
    actions: [container.start]
    resources: ["image:*"]
"""


@dataclass(frozen=True)
class Published:
    good: str
    """docker://HOST/zt/app:1, registered and signed."""
    unsigned: str
    tampered: str
    """Signed, but registered with another diff_id for layer 2."""
    repository: str
    image_id: str
    public_key: Path
    other_key: Path


@dataclass(frozen=True)
class NodeFiles:
    name: str
    key: Path
    state: Path
    tmp: Path


def publish(
    plane: RunningControlPlane,
    admin: ControlClient,
    registry_plain: RunningRegistry,
    docker_client: docker.DockerClient,
    busybox_base: str,
    work: Path,
    prefix: str = "zt",
) -> Published:
    """Three images under HOST/PREFIX/: app (registered, signed), unsigned
    (registered), tampered (signed, registered with another diff_id for layer 2)."""
    cli = Cli(work / "admin.json")
    cli.login(plane, "admin", plane.admin_password)
    image_id = build_app_image(docker_client, busybox_base, APP_TAG, SECRET)
    admin.create_recipient(RECIPIENT)
    host = registry_plain.host

    def encrypt(repository: str, register: bool) -> dict[str, object]:
        result = cli(
            "image",
            "encrypt",
            f"docker-daemon:{APP_TAG}",
            f"docker://{host}/{repository}:1",
            "--recipient",
            f"kms:{RECIPIENT}",
            "--layers",
            "1,2",
            "--register" if register else "--no-register",
            "--quiet",
            "--json",
        )
        assert result.returncode == 0, result.stderr
        answer: dict[str, object] = json.loads(result.stdout)
        return answer

    encrypt(f"{prefix}/app", register=True)
    encrypt(f"{prefix}/unsigned", register=True)
    tampered = encrypt(f"{prefix}/tampered", register=False)
    (registered,) = admin.images(f"{host}/{prefix}/app")
    layers = list(registered.layers)
    layers[2] = layers[2].model_copy(update={"diff_id": "sha256:" + "ab" * 32})
    admin.register_image(f"{host}/{prefix}/tampered", str(tampered["manifestDigest"]), layers)

    signer = generate_signing_key("ecdsa-p256")
    for repository in (f"{prefix}/app", f"{prefix}/tampered"):
        sign_image(reference.parse(f"docker://{host}/{repository}:1"), signer)
    public = work / "cosign.pub"
    public.write_bytes(signer.public.public_pem())
    other = work / "other.pub"
    other.write_bytes(generate_signing_key("ecdsa-p256").public.public_pem())
    # The node must get the image from the registry, not find it in Docker.
    docker_client.images.remove(APP_TAG, force=True)
    return Published(
        good=f"docker://{host}/{prefix}/app:1",
        unsigned=f"docker://{host}/{prefix}/unsigned:1",
        tampered=f"docker://{host}/{prefix}/tampered:1",
        repository=f"{host}/{prefix}/app",
        image_id=image_id,
        public_key=public,
        other_key=other,
    )


def new_node(admin: ControlClient, tmp_path: Path, prefix: str) -> NodeFiles:
    name = f"{prefix}-{os.urandom(3).hex()}"
    signing = ec.generate_private_key(ec.SECP256R1())
    key = tmp_path / f"{name}.key"
    key.write_bytes(jwk.JWK.from_pyca(signing).export_to_pem(private_key=True, password=None))
    admin.register_node(name, "host", jwk.JWK.from_pyca(signing).export_to_pem().decode())
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return NodeFiles(name, key, tmp_path / f"{name}-state", tmp)


def trustplane(
    *args: str, tmp: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    env.pop("TRUSTPLANE_DEBUG", None)
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    return subprocess.run(
        [sys.executable, "-m", "trustplane", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def node_args(plane: RunningControlPlane, swtpm: RunningSwtpm, node: NodeFiles) -> list[str]:
    return [
        "--server",
        plane.url,
        "--ca",
        str(plane.ca_file),
        "--node",
        node.name,
        "--node-key",
        str(node.key),
        "--tpm",
        swtpm.tcti,
        "--state-dir",
        str(node.state),
    ]


def enrol(plane: RunningControlPlane, swtpm: RunningSwtpm, node: NodeFiles) -> None:
    result = trustplane("agent", *node_args(plane, swtpm, node), "--once")
    assert result.returncode == 0, result.stderr
    assert f"{node.name}: attested" in result.stdout


def run_image(
    plane: RunningControlPlane,
    swtpm: RunningSwtpm,
    daemon: DockerDaemon,
    node: NodeFiles,
    image: str,
    key: Path,
    container: str,
    *command: str,
) -> subprocess.CompletedProcess[str]:
    args = ["run", image, "--key", str(key), *node_args(plane, swtpm, node)]
    args += ["--docker", daemon.base_url, "--name", container, "--quiet", "--json"]
    if command:
        args += ["--", *command]
    return trustplane(*args, tmp=node.tmp)


def assert_refused(result: subprocess.CompletedProcess[str], code: int, check: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"trustplane: error: {check}: "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def assert_nothing_left(
    client: docker.DockerClient, published: Published, node: NodeFiles, container: str
) -> None:
    assert client.containers.list(all=True, filters={"name": container}) == []
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get(published.image_id)
    assert list(node.tmp.iterdir()) == []


def events(node: NodeFiles) -> list[Event]:
    """The node's event log of the current boot (none before its first TPM use)."""
    path = node.state / "event-log.json"
    if not path.exists():
        return []
    return [Event.from_json(raw) for raw in json.loads(path.read_text())["events"]]
