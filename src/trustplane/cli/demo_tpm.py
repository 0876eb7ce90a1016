"""The demo's TPM scene: zero-trust start with `trustplane run` on a software TPM.

swtpm stands in for each node's TPM (one per node). The publisher signs the
image (cosign's format); the policy releases its layer keys only to freshly
attested nodes.

- An attested node (`trustplane agent --once`, then `trustplane run`)
  measures the layers into PCR 13, attests, gets the keys through the KMS
  and runs the image: the container reads the secret.
- A second node is handed a signed image whose secret layer is not the one
  registered at publication: `trustplane run` refuses it by name, the
  measurement stays in the node's PCR, the verifier quarantines the node,
  and from then on it gets nothing: not even the genuine image.
- Root on that node tries to wipe the record: `tpm2_pcrreset 13` (the TPM
  refuses: only a reboot resets PCRs 0-15) and deleting the agent's event
  log (the verifier remembers the longer log of this boot: tampering). The
  node still gets nothing; only an administrator's logged clear would help.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import docker.errors
from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwk

from trustplane.atomic import atomic_write
from trustplane.client import ControlClient
from trustplane.crypto.signing import SigningKey, generate_signing_key
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.dockerd import DockerDaemon
from trustplane.embedded.registry import RunningRegistry
from trustplane.embedded.sample_images import build_app_image
from trustplane.embedded.swtpm import start_swtpm
from trustplane.errors import IntegrityError
from trustplane.images.encrypt import EncryptRequest
from trustplane.images.publish import publish_image
from trustplane.images.recipients import parse_recipient
from trustplane.images.selection import LayerSelector
from trustplane.images.sign import sign_image
from trustplane.oci import reference
from trustplane.oci.transport import Endpoint
from trustplane.tools import Executor

Say = Callable[[str, str], None]
TAMPERED_APP = "trustplane/demo-app:tampered"


@dataclass(frozen=True)
class Scene:
    work: Path
    daemon: DockerDaemon
    registry: RunningRegistry
    control: RunningControlPlane
    endpoint: Endpoint
    published: str
    """docker://HOST/REPO:TAG of the image published for the KMS recipient."""
    repository: str
    kms_recipient: str
    base: str
    secret: str


def tpm_scene(scene: Scene, say: Say, proved: Callable[[str], None]) -> None:
    """Run the scene; raises IntegrityError when something is not as shown."""
    scene.work.mkdir(parents=True, exist_ok=True)
    with scene.control.admin() as admin:
        _play(scene, admin, say, proved)


def _play(scene: Scene, admin: ControlClient, say: Say, proved: Callable[[str], None]) -> None:
    signer = generate_signing_key("ecdsa-p256")
    public = scene.work / "cosign.pub"
    public.write_bytes(signer.public.public_pem())
    signed = sign_image(reference.parse(scene.published), signer, scene.endpoint)
    say("publisher", f"signed {scene.published} in cosign's format ({signed.signature_tag})")
    policy = scene.control.data_dir / "policy.yaml"
    atomic_write(
        policy,
        (
            policy.read_text()
            + '  - subjects: ["node:tpm-*"]\n    actions: [key.release]\n'
            + f'    resources: ["image:{scene.repository}"]\n    require_attestation: true\n'
            + '  - subjects: ["node:tpm-*"]\n    actions: [container.start]\n'
            + f'    resources: ["image:{scene.repository}"]\n'
        ).encode(),
        mode=policy.stat().st_mode & 0o777,
    )
    say("policy", "nodes tpm-* get the layer keys only when attested, and may start it")

    # An attested node runs the image.
    with _Node(scene, admin, "tpm-node-1") as good:
        say("swtpm", f"{good.name}'s TPM: {good.tcti} (production: device:/dev/tpmrm0)")
        _run_genuine(scene, good, public, say, proved)
    with _Node(scene, admin, "tpm-node-2") as bad:
        _run_tampered(scene, admin, bad, signer, public, say, proved)


def _run_genuine(
    scene: Scene, good: _Node, public: Path, say: Say, proved: Callable[[str], None]
) -> None:
    say(good.name, good.agent_once())
    started = good.run(scene.published, public, "demo-zero-trust")
    if started.returncode != 0:
        raise IntegrityError(f"trustplane run refused the genuine image: {started.stderr.strip()}")
    answer = json.loads(started.stdout)
    output = _wait_and_remove(scene.daemon, answer["containerID"], answer["imageID"])
    say(good.name, f"trustplane run: started {answer['name']}; the app says:")
    for line in output.strip().splitlines():
        say("output", line)
    if scene.secret not in output:
        raise IntegrityError("the attested node did not get the secret layer")
    proved(
        "signature, reference measurements, a fresh TPM quote with the layers in PCR 13 "
        "and the policy all agreed before the container started"
    )


def _run_tampered(
    scene: Scene,
    admin: ControlClient,
    bad: _Node,
    signer: SigningKey,
    public: Path,
    say: Say,
    proved: Callable[[str], None],
) -> None:
    """A signed image whose secret layer is not the registered one, then root's wipe."""
    tampered = _publish_tampered(scene, admin, signer)
    say(bad.name, bad.agent_once())
    refused = bad.run(tampered, public, "demo-zero-trust-tampered")
    reason = _refusal(refused, "measurement")
    say(bad.name, f"trustplane run {tampered}: refused: {reason}")
    again = bad.run(scene.published, public, "demo-zero-trust-after")
    say(bad.name, f"then the genuine image: refused: {_refusal(again, 'attestation')}")
    containers = scene.daemon.client()
    try:
        left = containers.containers.list(all=True, filters={"name": "demo-zero-trust-"})
    finally:
        containers.close()
    if left:
        raise IntegrityError("a refused start left a container behind")
    proved(
        "the node that measured a tampered layer gets nothing: its PCR keeps the "
        "measurement, the verifier quarantines it, and the KMS releases no key"
    )

    # Root on the node tries to wipe the record.
    reset = Executor(timeout=60).run(
        ["tpm2_pcrreset", "13"], env={"TPM2TOOLS_TCTI": bad.tcti}, check=False
    )
    if reset.returncode == 0:
        raise IntegrityError("tpm2_pcrreset reset the measurement PCR")
    lines = reset.stderr.decode(errors="replace").splitlines()
    refusal = next((line for line in lines if "locality" in line), "")
    say("root", f"tpm2_pcrreset 13: refused by the TPM ({refusal.strip() or 'error'})")
    (bad.state / "event-log.json").unlink()
    say("root", f"rm {bad.state / 'event-log.json'}")
    wiped = _trustplane("agent", *bad.args, "--once")
    if wiped.returncode == 0 or "tampering" not in wiped.stdout:
        raise IntegrityError(f"the wiped node attested: {wiped.stdout.strip()}")
    say(bad.name, f"trustplane agent --once: {_short(wiped.stdout.strip().split(': ', 1)[-1])}")
    after = bad.run(scene.published, public, "demo-zero-trust-wiped")
    say(bad.name, f"then the genuine image: refused: {_refusal(after, 'attestation')}")
    proved(
        "a wipe is refused: PCR 13 resets only with a reboot, and the verifier remembers "
        "the event log of this boot, so a shorter one is tampering; the quarantine lasts "
        "until an administrator clears it (trustplane node clear), logged"
    )


class _Node:
    """A node with its own TPM (swtpm), key and state directory."""

    def __init__(self, scene: Scene, admin: ControlClient, name: str) -> None:
        self.scene = scene
        self.name = name
        self.state = scene.work / f"{name}-state"
        key = ec.generate_private_key(ec.SECP256R1())
        self.key_file = scene.work / f"{name}.key"
        atomic_write(
            self.key_file,
            jwk.JWK.from_pyca(key).export_to_pem(private_key=True, password=None),
            mode=0o600,
        )
        admin.register_node(name, "host", jwk.JWK.from_pyca(key).export_to_pem().decode())
        self.swtpm = start_swtpm(scene.work / f"{name}-tpm")
        self.tcti = self.swtpm.tcti
        self.args = [
            "--server",
            scene.control.url,
            "--ca",
            str(scene.control.ca_file),
            "--node",
            name,
            "--node-key",
            str(self.key_file),
            "--tpm",
            self.tcti,
            "--state-dir",
            str(self.state),
        ]

    def __enter__(self) -> _Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.swtpm.stop()

    def agent_once(self) -> str:
        result = _trustplane("agent", *self.args, "--once")
        if result.returncode != 0:
            raise IntegrityError(f"trustplane agent failed: {result.stderr.strip()}")
        return f"trustplane agent --once: {result.stdout.strip().split(': ', 1)[-1]}"

    def run(self, image: str, key: Path, name: str) -> subprocess.CompletedProcess[str]:
        registry = self.scene.registry
        return _trustplane(
            "run",
            image,
            "--key",
            str(key),
            *self.args,
            "--docker",
            self.scene.daemon.base_url,
            "--cacert",
            str(registry.ca_file),
            "--creds",
            f"{registry.username}:{registry.password}",
            "--name",
            name,
            "--quiet",
            "--json",
        )


def _publish_tampered(scene: Scene, admin: ControlClient, signer: SigningKey) -> str:
    """Another build, signed with the publisher's key, registered with the
    reference measurements of the genuine build (as when the build that was
    signed is not the one that was registered)."""
    client = scene.daemon.client()
    try:
        build_app_image(client, scene.base, TAMPERED_APP, b"not the published secret\n")
    finally:
        client.close()
    target = scene.published.rsplit(":", 1)[0] + ":tampered"
    kms = parse_recipient(
        f"kms:{scene.kms_recipient}", lambda name: admin.recipient(name).public_key.encode()
    )
    # Encrypted and pushed as any publication is, but not registered as itself:
    # the record below is the genuine build's (the forgery this scene is about).
    result = publish_image(
        EncryptRequest(
            source=reference.parse(f"docker-daemon:{TAMPERED_APP}"),
            destination=reference.parse(target),
            recipients=[kms],
            selector=LayerSelector.parse(["path:/secrets/**"]),
            destination_endpoint=scene.endpoint,
        ),
        registration=None,
    ).encrypted
    genuine = admin.images(scene.repository)[0]
    admin.register_image(scene.repository, result.manifest_digest, genuine.layers)
    sign_image(reference.parse(target), signer, scene.endpoint)
    return target


def _refusal(result: subprocess.CompletedProcess[str], check: str) -> str:
    line = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    prefix = f"trustplane: error: {check}: "
    if result.returncode == 0 or not line.startswith(prefix):
        raise IntegrityError(f"expected a refusal by the {check} check, got: {line or 'a start'}")
    return _short(line.removeprefix("trustplane: error: "))


def _short(text: str) -> str:
    return text if len(text) < 200 else text[:197] + "..."


def _wait_and_remove(daemon: DockerDaemon, container_id: str, image_id: str) -> str:
    client = daemon.client()
    try:
        container = client.containers.get(container_id)
        container.wait(timeout=60)
        output = str(container.logs().decode())
        container.remove(force=True)
        # Still used by another tag or container: leave it.
        with suppress(docker.errors.APIError):
            client.images.remove(image_id, force=True)
        return output
    finally:
        client.close()


def _trustplane(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trustplane", *args],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        check=False,
    )
