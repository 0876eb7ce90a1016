"""`trustplane demo`: encrypted distribution end to end, on this machine.

It starts what it needs on loopback (a TLS registry with a password, and
dockerd if none answers), builds an app image whose top layer holds a
secret, publishes it with only that layer encrypted, for two people of
different rank, and then shows what each step proves: the registry holds no
plaintext, each key gets its own view, the views run in Docker, and tampered
content is refused before release.
"""

from __future__ import annotations

import gzip
import secrets
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import docker
from rich.console import Console
from rich.panel import Panel

from trustplane.crypto.keys import generate_key_pair, load_unwrap_key
from trustplane.embedded.dockerd import DockerDaemon, ensure_dockerd
from trustplane.embedded.registry import RunningRegistry, start_registry
from trustplane.embedded.sample_images import (
    APP_SECRET_PATH,
    build_app_image,
    import_busybox_base,
)
from trustplane.embedded.tls import create_ca, issue_server_cert
from trustplane.errors import IntegrityError
from trustplane.images.copy import CopyRequest, copy_image
from trustplane.images.decrypt import DecryptRequest, decrypt_image
from trustplane.images.encrypt import EncryptRequest, encrypt_image
from trustplane.images.inspect import inspect_image
from trustplane.images.recipients import Recipient, parse_recipient
from trustplane.images.selection import LayerSelector
from trustplane.oci import reference
from trustplane.oci.credentials import Credentials
from trustplane.oci.layout import Layout, blob_path
from trustplane.oci.model import parse_manifest
from trustplane.oci.transport import Endpoint
from trustplane.progress import Reporter

console = Console(highlight=False, soft_wrap=True)
BASE = "trustplane/demo-base:1"
APP = "trustplane/demo-app:1"


@dataclass(frozen=True)
class Person:
    name: str
    private: Path
    recipient: Recipient


def run_demo(workdir: Path | None) -> None:
    """Run the end-to-end demonstration on loopback and say what each step proved."""
    with _workspace(workdir) as work, _components(work) as (daemon, registry):
        _run(work, daemon, registry)


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


@contextmanager
def _components(work: Path) -> Iterator[tuple[DockerDaemon, RunningRegistry]]:
    _step("Start the components on 127.0.0.1")
    daemon = ensure_dockerd(work / "dockerd")
    _said("dockerd", "started for the demo" if daemon.started_by_us else "already running, reused")
    ca = create_ca(work / "ca", "trustplane demo CA")
    cert = issue_server_cert(ca, work / "registry-tls", "registry")
    registry = start_registry(work / "registry", "tls-basic", tls=cert)
    _said("registry", f"docker-registry on https://{registry.host} (TLS, bcrypt password)")
    try:
        yield daemon, registry
    finally:
        registry.stop()
        daemon.stop()


def _run(work: Path, daemon: DockerDaemon, registry: RunningRegistry) -> None:
    client = daemon.client()
    secret = f"demo-secret-{secrets.token_hex(8)}"

    _step("Build an app image: public base, public app layer, secret layer")
    import_busybox_base(client, BASE)
    build_app_image(client, BASE, APP, (secret + "\n").encode())
    layers = client.images.get(APP).attrs["RootFS"]["Layers"]
    _said("image", f"{APP}: {len(layers)} layers; layer 2 adds {APP_SECRET_PATH}")

    _step("Keys for two people of different rank")
    operator = _person(work, "operator", None)
    contractor = _person(work, "contractor", 1)
    _said("operator", f"full access, key id {operator.recipient.key.kid}")
    _said("contractor", f"tier 1 (layers 0..1), key id {contractor.recipient.key.kid}")

    endpoint = Endpoint(
        ca_file=registry.ca_file,
        credentials=Credentials(registry.username or "", registry.password or ""),
    )
    published = f"docker://{registry.host}/demo/app:1"
    _step(f"Encrypt only the layers holding /secrets/** and push to {published}")
    with Reporter() as reporter:
        result = encrypt_image(
            EncryptRequest(
                source=reference.parse(f"docker-daemon:{APP}"),
                destination=reference.parse(published),
                recipients=[operator.recipient, contractor.recipient],
                selector=LayerSelector.parse(["path:/secrets/**"]),
                protect_config=True,
                destination_endpoint=endpoint,
            ),
            reporter,
        )
    info = inspect_image(reference.parse(published), endpoint)
    for layer in info["layers"]:
        who = ", ".join(r["keyID"][:12] for r in layer.get("recipients", []))
        state = f"encrypted for {who}" if layer["encrypted"] else "plain, digest unchanged"
        _said(f"layer {layer['index']}", f"{layer['mediaType'].rsplit('.', 1)[-1]}: {state}")
    _proved(
        f"only layer(s) {list(result.encrypted_layers)} were encrypted, chosen by file path; "
        "the public layers keep their digests and stay shared with the base image"
    )

    _step("Look for the secret in the registry's storage")
    blobs = list(registry.storage_dir.rglob("data"))
    leaks = [path for path in blobs if secret.encode() in _raw_and_gunzipped(path)]
    if leaks:
        raise IntegrityError(f"the registry holds the secret in plaintext: {leaks[0]}")
    _proved(f"none of the {len(blobs)} stored blobs holds the secret, raw or gunzipped")
    if not info["config"]["protected"]:
        raise IntegrityError("the published config is not protected")
    _proved("the public config no longer shows how the secret layer was built")

    _step("Pull and decrypt into Docker with each key, then run")
    for person, tag in ((operator, "demo/app:operator"), (contractor, "demo/app:contractor")):
        with Reporter() as reporter:
            outcome = decrypt_image(
                DecryptRequest(
                    source=reference.parse(published),
                    destination=reference.parse(f"docker-daemon:{tag}"),
                    keys=[load_unwrap_key(person.private.read_bytes(), str(person.private))],
                    source_endpoint=endpoint,
                ),
                reporter,
            )
        output = _run_container(client, tag)
        _said(
            person.name,
            f"{outcome.layer_count} of {outcome.source_layer_count} layers; the app says:",
        )
        for line in output.strip().splitlines():
            console.print(f"      [dim]{line}[/dim]")
        sees_secret = secret in output
        if sees_secret != (person is operator):
            raise IntegrityError(f"{person.name} {'sees' if sees_secret else 'misses'} the secret")
    if client.images.get("demo/app:operator").id != client.images.get(APP).id:
        raise IntegrityError("the operator's image differs from the original")
    _proved("the operator's image is the original, same image id, and reads the secret")
    _proved("the contractor's image is cut below the secret layer and still runs")

    _step("Tamper with the encrypted layer and decrypt again")
    copy = work / "pulled"
    tampered = f"oci:{copy}:1"
    copy_image(
        CopyRequest(
            source=reference.parse(published),
            destination=reference.parse(tampered),
            source_endpoint=endpoint,
        )
    )
    _flip_a_byte_of_the_top_layer(copy)
    try:
        decrypt_image(
            DecryptRequest(
                source=reference.parse(tampered),
                destination=reference.parse(f"oci:{work / 'should-not-exist'}:1"),
                keys=[load_unwrap_key(operator.private.read_bytes(), "operator")],
            )
        )
    except IntegrityError as exc:
        _said("refused", str(exc).split(": ", 1)[-1])
    else:
        raise IntegrityError("a tampered layer was accepted")
    if (work / "should-not-exist").exists():
        raise IntegrityError("a refused decryption left files behind")
    _proved("altered ciphertext is refused before any plaintext is written")

    console.print(Panel.fit("[bold green]demo complete[/bold green]: every step above was checked"))


def _person(work: Path, name: str, tier: int | None) -> Person:
    private_pem, public_pem = generate_key_pair("ec-p256")
    private, public = work / f"{name}.pem", work / f"{name}.pub"
    private.write_bytes(private_pem)
    private.chmod(0o600)
    public.write_bytes(public_pem)
    spec = f"jwe:{public}" + (f":tier={tier}" if tier is not None else "")
    return Person(name, private, parse_recipient(spec))


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


def _proved(text: str) -> None:
    console.print(f"  [green]✓ proved:[/green] {text}")
