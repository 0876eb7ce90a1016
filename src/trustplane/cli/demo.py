"""`trustplane demo`: the whole path, on this machine, each step checked.

It starts what it needs on loopback (a TLS registry with a password, the
control plane, and dockerd if none answers), builds an app image whose top
layer holds a secret, publishes it with only that layer encrypted, for two
people of different rank and for a key the KMS keeps, and then shows what
each step proves: the registry holds no plaintext, each key gets its own
view and the views run in Docker, a node that joins later decrypts through
the KMS without re-encryption, tampered content is refused before release,
encrypted cloud volumes (file and Ceph RBD, keys from the KMS) are read by a
VM that never sees a key on disk, and the transparency log proves what happened.
"""

from __future__ import annotations

import gzip
import json
import secrets
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import docker
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwk
from rich.console import Console
from rich.panel import Panel

from trustplane.crypto.keys import UnwrapKey, generate_key_pair, load_unwrap_key
from trustplane.embedded.control_plane import RunningControlPlane, start_control_plane
from trustplane.embedded.dockerd import DockerDaemon, ensure_dockerd
from trustplane.embedded.mosquitto import RunningMosquitto, start_mosquitto
from trustplane.embedded.registry import RunningRegistry, start_registry
from trustplane.embedded.sample_images import APP_SECRET_PATH, build_app_image, import_busybox_base
from trustplane.embedded.tls import create_ca, issue_server_cert
from trustplane.errors import IntegrityError
from trustplane.images.copy import CopyRequest, copy_image
from trustplane.images.decrypt import DecryptRequest, Unwrapper, decrypt_image
from trustplane.images.encrypt import EncryptRequest
from trustplane.images.inspect import inspect_image
from trustplane.images.kms_unwrap import KmsUnwrapper
from trustplane.images.publish import Registration, publish_image
from trustplane.images.recipients import Recipient, parse_recipient
from trustplane.images.selection import LayerSelector
from trustplane.oci import reference
from trustplane.oci.credentials import Credentials
from trustplane.oci.layout import Layout, blob_path
from trustplane.oci.model import parse_manifest
from trustplane.oci.transport import Endpoint
from trustplane.progress import Reporter
from trustplane.trust import merkle
from trustplane.trust.checkpoint import Checkpoint, open_checkpoint
from trustplane.trust.note import parse_verifier_key

console = Console(highlight=False, soft_wrap=True)
BASE = "trustplane/demo-base:1"
APP = "trustplane/demo-app:1"
KMS_RECIPIENT = "demo-app"
NODE = "edge-1"


@dataclass(frozen=True)
class Person:
    name: str
    private: Path
    recipient: Recipient


def run_demo(workdir: Path | None) -> None:
    """Run the end-to-end demonstration on loopback and say what each step proved."""
    with _workspace(workdir) as work, ExitStack() as stack:
        _step("Start the components on 127.0.0.1")
        daemon = ensure_dockerd(work / "dockerd")
        stack.callback(daemon.stop)
        _said(
            "dockerd", "started for the demo" if daemon.started_by_us else "already running, reused"
        )
        ca = create_ca(work / "ca", "trustplane demo CA")
        cert = issue_server_cert(ca, work / "registry-tls", "registry")
        registry = start_registry(work / "registry", "tls-basic", tls=cert)
        stack.callback(registry.stop)
        _said("registry", f"docker-registry on https://{registry.host} (TLS, bcrypt password)")
        broker = start_mosquitto(work / "mosquitto", ca)
        stack.callback(broker.stop)
        _said("mosquitto", f"MQTT broker on {broker.url} (TLS, password file, per-gateway ACL)")
        broker_password = work / "mqtt-control-password"
        broker_password.write_text(broker.control_password)
        broker_password.chmod(0o600)
        control = start_control_plane(
            work / "control-plane",
            env={
                "TRUSTPLANE_MQTT__URL": broker.url,
                "TRUSTPLANE_MQTT__PASSWORD_FILE": str(broker_password),
                "TRUSTPLANE_MQTT__CA_FILE": str(broker.ca_file),
            },
        )
        stack.callback(control.stop)
        _said("control plane", f"trustplane server on {control.url} (SQLite, file KEK, own CA)")
        Demo(work, daemon, registry, control, broker).run()


@contextmanager
def _workspace(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    path = Path(tempfile.mkdtemp(prefix="trustplane-demo-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Demo:
    def __init__(
        self,
        work: Path,
        daemon: DockerDaemon,
        registry: RunningRegistry,
        control: RunningControlPlane,
        broker: RunningMosquitto | None = None,
    ) -> None:
        self.work = work
        self.broker = broker
        self.daemon = daemon
        self.docker = daemon.client()
        self.registry = registry
        self.control = control
        self.admin = control.admin()
        self.secret = f"demo-secret-{secrets.token_hex(8)}"
        self.endpoint = Endpoint(
            ca_file=registry.ca_file,
            credentials=Credentials(registry.username or "", registry.password or ""),
        )
        self.published = f"docker://{registry.host}/demo/app:1"
        self.repository = f"{registry.host}/demo/app"

    def run(self) -> None:
        self.build()
        operator, contractor = self.people()
        self.publish(operator, contractor)
        self.inspect_storage()
        self.pull_with_local_keys(operator, contractor)
        self.late_node_through_the_kms()
        self.layer_store()
        self.tamper(operator)
        self.edge()
        self.zero_trust()
        self.volumes()
        self.audit()
        console.print(
            Panel.fit("[bold green]demo complete[/bold green]: every step above was checked")
        )

    # -- steps -----------------------------------------------------------------------

    def build(self) -> None:
        _step("Build an app image: public base, public app layer, secret layer")
        import_busybox_base(self.docker, BASE)
        build_app_image(self.docker, BASE, APP, (self.secret + "\n").encode())
        layers = self.docker.images.get(APP).attrs["RootFS"]["Layers"]
        _said("image", f"{APP}: {len(layers)} layers; layer 2 adds {APP_SECRET_PATH}")

    def people(self) -> tuple[Person, Person]:
        _step("Keys for two people of different rank, and one the KMS keeps")
        operator = self._person("operator", None)
        contractor = self._person("contractor", 1)
        _said("operator", f"full access, key id {operator.recipient.key.kid}")
        _said("contractor", f"tier 1 (layers 0..1), key id {contractor.recipient.key.kid}")
        kms_key = self.admin.create_recipient(KMS_RECIPIENT)
        _said(
            "KMS",
            f"recipient {KMS_RECIPIENT!r}, key id {kms_key.key_id}: "
            "its private key never leaves the KMS",
        )
        return operator, contractor

    def publish(self, operator: Person, contractor: Person) -> None:
        _step(f"Encrypt only the layers holding /secrets/** and push to {self.published}")
        kms = parse_recipient(
            f"kms:{KMS_RECIPIENT}",
            lambda name: self.admin.recipient(name).public_key.encode(),
        )
        with Reporter() as reporter:
            published = publish_image(
                EncryptRequest(
                    source=reference.parse(f"docker-daemon:{APP}"),
                    destination=reference.parse(self.published),
                    recipients=[operator.recipient, contractor.recipient, kms],
                    selector=LayerSelector.parse(["path:/secrets/**"]),
                    protect_config=True,
                    destination_endpoint=self.endpoint,
                ),
                Registration(self.admin, self.repository),
                reporter,
            )
        result = published.encrypted
        if published.log_index is None:
            raise IntegrityError("the published image was not registered")
        self.registration_entry = published.log_index
        info = inspect_image(reference.parse(self.published), self.endpoint)
        for layer in info["layers"]:
            who = ", ".join(r["keyID"][:12] for r in layer.get("recipients", []))
            state = f"encrypted for {who}" if layer["encrypted"] else "plain, digest unchanged"
            _said(f"layer {layer['index']}", f"{layer['mediaType'].rsplit('.', 1)[-1]}: {state}")
        _said(
            "control plane",
            f"image registered with its file digests (log entry {self.registration_entry})",
        )
        self.first_checkpoint = self._checkpoint()
        _proved(
            f"only layer(s) {list(result.encrypted_layers)} were encrypted, chosen by file path; "
            "the public layers keep their digests and stay shared with the base image"
        )

    def inspect_storage(self) -> None:
        _step("Look for the secret in the registry's storage")
        blobs = list(self.registry.storage_dir.rglob("data"))
        leaks = [path for path in blobs if self.secret.encode() in _raw_and_gunzipped(path)]
        if leaks:
            raise IntegrityError(f"the registry holds the secret in plaintext: {leaks[0]}")
        _proved(f"none of the {len(blobs)} stored blobs holds the secret, raw or gunzipped")
        if not inspect_image(reference.parse(self.published), self.endpoint)["config"]["protected"]:
            raise IntegrityError("the published config is not protected")
        _proved("the public config no longer shows how the secret layer was built")

    def pull_with_local_keys(self, operator: Person, contractor: Person) -> None:
        _step("Pull and decrypt into Docker with each person's key, then run")
        for person, tag in ((operator, "demo/app:operator"), (contractor, "demo/app:contractor")):
            output, layers = self._decrypt_and_run(
                tag, keys=[load_unwrap_key(person.private.read_bytes(), str(person.private))]
            )
            _said(person.name, f"{layers} layers; the app says:")
            _quote(output)
            if (self.secret in output) != (person is operator):
                raise IntegrityError(
                    f"{person.name} {'sees' if self.secret in output else 'misses'} the secret"
                )
        if self.docker.images.get("demo/app:operator").id != self.docker.images.get(APP).id:
            raise IntegrityError("the operator's image differs from the original")
        _proved("the operator's image is the original, same image id, and reads the secret")
        _proved("the contractor's image is cut below the secret layer and still runs")

    def late_node_through_the_kms(self) -> None:
        _step("A node that joins after publication decrypts through the KMS")
        key = ec.generate_private_key(ec.SECP256R1())
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.admin.register_node(NODE, "host", public.decode())
        policy = self.control.data_dir / "policy.yaml"
        policy.write_text(
            policy.read_text()
            + f'  - subjects: ["node:{NODE}"]\n    actions: [key.release]\n'
            + f'    resources: ["image:{self.repository}"]\n'
        )
        _said(
            NODE,
            "registered now, granted key.release on the image by one policy rule (live reload)",
        )
        with self.control.client() as node:
            node.login_as_node(NODE, jwk.JWK.from_pyca(key))
            output, layers = self._decrypt_and_run("demo/app:edge-1", remote=[KmsUnwrapper(node)])
        _said(NODE, f"{layers} layers; the app says:")
        _quote(output)
        if self.secret not in output:
            raise IntegrityError("the node did not get the secret layer through the KMS")
        _proved("the image was not re-encrypted: the KMS re-wrapped the layer key for the new node")

    def layer_store(self) -> None:
        _step("The layer store: each layer encrypted under its own key, views by rank, containerd")
        from trustplane.cli.demo_store import Scene, store_scene

        scene = Scene(
            work=self.work / "layer-store",
            control=self.control,
            admin=self.admin,
            docker=self.docker,
            endpoint=self.endpoint,
            published=self.published,
            repository=self.repository,
            app=APP,
            secret=self.secret,
        )
        store_scene(scene, _said, _proved)

    def tamper(self, operator: Person) -> None:
        _step("Tamper with the encrypted layer and decrypt again")
        copy = self.work / "pulled"
        copy_image(
            CopyRequest(
                source=reference.parse(self.published),
                destination=reference.parse(f"oci:{copy}:1"),
                source_endpoint=self.endpoint,
            )
        )
        _flip_a_byte_of_the_top_layer(copy)
        try:
            decrypt_image(
                DecryptRequest(
                    source=reference.parse(f"oci:{copy}:1"),
                    destination=reference.parse(f"oci:{self.work / 'should-not-exist'}:1"),
                    keys=[load_unwrap_key(operator.private.read_bytes(), "operator")],
                )
            )
        except IntegrityError as exc:
            _said("refused", str(exc).split(": ", 1)[-1])
        else:
            raise IntegrityError("a tampered layer was accepted")
        if (self.work / "should-not-exist").exists():
            raise IntegrityError("a refused decryption left files behind")
        _proved("altered ciphertext is refused before any plaintext is written")

    def edge(self) -> None:
        _step("The edge gateway in front of dockerd, with the docker CLI")
        from trustplane.cli.demo_edge import edge_scene

        edge_scene(
            self.work / "edge",
            self.daemon,
            self.control,
            self.docker,
            BASE,
            APP,
            _said,
            _proved,
            broker=self.broker,
        )

    def zero_trust(self) -> None:
        _step("Zero-trust start on a node with a TPM: trustplane run")
        from trustplane.cli.demo_tpm import Scene, tpm_scene

        scene = Scene(
            work=self.work / "tpm",
            daemon=self.daemon,
            registry=self.registry,
            control=self.control,
            endpoint=self.endpoint,
            published=self.published,
            repository=self.repository,
            kms_recipient=KMS_RECIPIENT,
            base=BASE,
            secret=self.secret,
        )
        tpm_scene(scene, _said, _proved)

    def volumes(self) -> None:
        _step("Encrypted cloud volumes: the block-storage service, the KMS and a VM")
        from trustplane.cli.demo_volumes import volumes_scene
        from trustplane.embedded.ceph import start_ceph
        from trustplane.embedded.guest_kernel import guest_kernel
        from trustplane.embedded.libvirtd import start_libvirtd

        kernel = guest_kernel()
        with (
            start_ceph(self.work / "ceph") as ceph,
            start_libvirtd(self.work / "libvirtd") as libvirtd,
        ):
            _said("ceph", f"one-node cluster (mon, mgr, one OSD), pool {ceph.pool}, cephx")
            _said("libvirtd", f"started by hand on {libvirtd.uri}")
            volumes_scene(self.work / "volumes", ceph, libvirtd, kernel, _said, _proved)

    def audit(self) -> None:
        _step("Audit: the transparency log")
        latest = self._checkpoint()
        old = self.first_checkpoint
        proof = self.admin.consistency_proof(old.size, latest.size) if old.size else []
        if old.size and not merkle.verify_consistency(
            old.size, latest.size, old.root, latest.root, proof
        ):
            raise IntegrityError("the log is not an extension of the one taken at publication")
        _said(
            "checkpoint",
            f"{latest.size} entries, signed; consistent with the checkpoint taken at "
            f"publication ({old.size} entries)",
        )
        shown = 0
        for index in range(latest.size):
            body = self.admin.log_entry(index)
            entry = json.loads(body)
            if entry["kind"] not in ("image.register", "kms.unwrap"):
                continue
            proof = self.admin.inclusion_proof(index, latest.size)
            if not merkle.verify_inclusion(
                merkle.leaf_hash(body), index, latest.size, proof, latest.root
            ):
                raise IntegrityError(f"log entry {index} is not in the signed tree")
            detail = entry.get("image") or ""
            if entry["kind"] == "kms.unwrap":
                detail = f"{entry['subject']} layer {entry['layer']}: {entry['decision']}"
            _said(
                f"entry {index}",
                f"{entry['kind']} {detail} (inclusion proof of {len(proof)} hashes verified)",
            )
            shown += 1
        if not shown:
            raise IntegrityError("the log holds no registration or unwrap entries")
        _proved("every registration and key release is in the signed, append-only log")

    # -- helpers -------------------------------------------------------------------------

    def _person(self, name: str, tier: int | None) -> Person:
        private_pem, public_pem = generate_key_pair("ec-p256")
        private, public = self.work / f"{name}.pem", self.work / f"{name}.pub"
        private.write_bytes(private_pem)
        private.chmod(0o600)
        public.write_bytes(public_pem)
        spec = f"jwe:{public}" + (f":tier={tier}" if tier is not None else "")
        return Person(name, private, parse_recipient(spec))

    def _decrypt_and_run(
        self, tag: str, keys: list[UnwrapKey] | None = None, remote: list[Unwrapper] | None = None
    ) -> tuple[str, int]:
        with Reporter() as reporter:
            outcome = decrypt_image(
                DecryptRequest(
                    source=reference.parse(self.published),
                    destination=reference.parse(f"docker-daemon:{tag}"),
                    keys=keys or [],
                    remote=remote or [],
                    source_endpoint=self.endpoint,
                ),
                reporter,
            )
        return _run_container(self.docker, tag), outcome.layer_count

    def _checkpoint(self) -> Checkpoint:
        key = self.admin.log_key()
        return open_checkpoint(
            self.admin.checkpoint(), parse_verifier_key(key.verifier_key), key.origin
        )


def _run_container(client: docker.DockerClient, image: str) -> str:
    container = client.containers.run(image, detach=True)
    try:
        container.wait(timeout=60)
        return str(container.logs().decode())
    finally:
        container.remove(force=True)


def _flip_a_byte_of_the_top_layer(root: Path) -> None:
    """What an attacker with write access to storage could do."""
    layout = Layout(root)
    manifest = parse_manifest(layout.read_blob(layout.find("1").digest, 1 << 20), "demo")
    path = blob_path(root, manifest.layers[-1].digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _raw_and_gunzipped(path: Path) -> bytes:
    data = path.read_bytes()
    try:
        return data + gzip.decompress(data)
    except (OSError, EOFError, zlib.error):
        return data


def _step(title: str) -> None:
    console.print(f"\n[bold cyan]▶ {title}[/bold cyan]")


def _said(label: str, text: str) -> None:
    console.print(f"  [bold]{label}[/bold]: {text}")


def _quote(output: str) -> None:
    for line in output.strip().splitlines():
        console.print(f"      [dim]{line}[/dim]")


def _proved(text: str) -> None:
    console.print(f"  [green]✓ proved:[/green] {text}")
