"""The demo's layer-store scene: the published image kept layer by layer, each layer
encrypted under its own key, views by rank, and containerd running from it.

- the operator imports the published image into the layer store (its layer
  keys decrypted through the KMS, each layer straight into its encrypted
  snapshot) with two named views;
- the operator runs the full view and reads the secret;
- a contractor, whose policy reaches layer 1, runs the tier-1 view (the
  app, no secret) and cannot open layer 2;
- the raw layer files hold no plaintext;
- `trustplane snapshotter` serves containerd's snapshots API: `ctr images
  import --snapshotter trustplane` stores the same image as encrypted
  layers, `ctr run --snapshotter trustplane` starts it, and removing the
  image destroys each layer's key.
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import docker

from trustplane.client import ControlClient
from trustplane.embedded.containerd import start_containerd
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.sample_images import APP_SECRET_PATH
from trustplane.errors import Forbidden, IntegrityError, NotFoundError
from trustplane.images.kms_unwrap import KmsUnwrapper
from trustplane.layerstore import ControlPlaneKeys, ImportRequest, LayerStore
from trustplane.layerstore.keys import ChainRef
from trustplane.layerstore.snapshotter import Snapshotter
from trustplane.oci import reference
from trustplane.oci.transport import Endpoint
from trustplane.progress import Reporter

Say = Callable[[str, str], None]
SNAPSHOTTER = "trustplane"
LAYER_SIZE = 1 << 30
CONTRACTOR = "contractor"


@dataclass(frozen=True)
class Scene:
    work: Path
    control: RunningControlPlane
    admin: ControlClient
    docker: docker.DockerClient
    endpoint: Endpoint
    published: str
    repository: str
    app: str
    secret: str


def store_scene(scene: Scene, say: Say, proved: Callable[[str], None]) -> None:
    """Run the scene (raises IntegrityError when something is not as promised)."""
    keys = ControlPlaneKeys(scene.admin)
    store = LayerStore(scene.work / "store")
    with Reporter() as reporter:
        image = store.import_image(
            ImportRequest(
                source=reference.parse(scene.published),
                endpoint=scene.endpoint,
                repository=scene.repository,
                name="demo/app",
                tiers={CONTRACTOR: 1, "operator": 2},
                remote=[KmsUnwrapper(scene.admin)],
                size=LAYER_SIZE,
            ),
            keys,
            reporter,
        )
    disk = sum(layer.disk_bytes for layer in image.layers) >> 10
    say("operator", f"stored {image.name}: {len(image.layers)} layers, {disk} KiB on disk")
    say("keys", f"one chain in the KMS ({image.chain_id}); the node keeps no key")

    secret_file = ["cat", APP_SECRET_PATH]
    full = store.run(image, "operator", secret_file, keys)
    if scene.secret not in full.stdout.decode(errors="replace"):
        raise IntegrityError("the operator's full view does not show the secret")
    say("operator", f"runs the full view: {APP_SECRET_PATH} = {full.stdout.decode().strip()}")

    with _contractor(scene) as contractor:
        theirs = ControlPlaneKeys(contractor)
        look = f"echo /app: $(ls /app); [ -e {APP_SECRET_PATH} ] || echo {APP_SECRET_PATH}: absent"
        app = store.run(image, CONTRACTOR, ["sh", "-c", look], theirs)
        listing = app.stdout.decode(errors="replace")
        if scene.secret in listing or "run.sh" not in listing or "absent" not in listing:
            raise IntegrityError("the contractor's tier-1 view is not the app without the secret")
        say(CONTRACTOR, "runs the tier-1 view: " + "; ".join(listing.strip().splitlines()))
        try:
            store.run(image, "operator", secret_file, theirs)
        except Forbidden as exc:
            say(CONTRACTOR, f"refused: {exc}")
        else:
            raise IntegrityError("the contractor opened layer 2")
    proved("each rank opens its own view of one stored image; layer 2 stays shut below it")

    raw = [path for layer in image.layers for path in store.backend.raw_paths(layer.layer)]
    if any(_holds(path, scene.secret.encode()) for path in raw):
        raise IntegrityError("a raw layer file holds the secret")
    proved(f"none of the {len(raw)} raw layer files holds the secret")

    _containerd(scene, say, proved)
    store.remove(image, keys)
    say("operator", f"removed {image.name} from the store: key chain destroyed, then the files")


def _containerd(scene: Scene, say: Say, proved: Callable[[str], None]) -> None:
    """`ctr` with the snapshotter: import the same image, run it, remove it."""
    # Short paths: unix socket names are limited to 107 bytes.
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tp-ctd-")))
        keys = ControlPlaneKeys(scene.admin)
        snapshotter = Snapshotter(
            scene.work / "snapshotter", keys, repository="containerd/demo", layer_size=LAYER_SIZE
        )
        stack.callback(snapshotter.close)
        # Imported here: the gRPC stubs are compiled at set-up (scripts/run).
        from trustplane.layerstore.snapshot_service import serve

        server = serve(snapshotter, work / "snapshotter.sock")
        stack.callback(lambda: server.stop(grace=5).wait())
        ctd = stack.enter_context(
            start_containerd(
                work / "containerd", proxy_snapshotters={SNAPSHOTTER: work / "snapshotter.sock"}
            )
        )
        say("containerd", f"a private containerd with proxy snapshotter {SNAPSHOTTER!r}")
        archive = work / "app.tar"
        with archive.open("wb") as out:
            # Named explicitly: the operator's decrypted copy is the same image under another tag.
            for chunk in scene.docker.images.get(scene.app).save(named=scene.app):
                out.write(chunk)
        ctd.ctr("images", "import", "--snapshotter", SNAPSHOTTER, str(archive))
        layers = snapshotter.walk(["kind==committed"])
        say("ctr", f"images import --snapshotter {SNAPSHOTTER}: {len(layers)} encrypted layers")
        chains = [s.key_ref.chain for s in layers if s.key_ref is not None]
        if len(set(chains)) != len(layers):
            raise IntegrityError("the layers containerd stored do not each have a key of their own")
        ref = f"docker.io/{scene.app}"
        name = f"demo-{secrets.token_hex(4)}"
        printed = ctd.ctr(
            "run", "--rm", "--snapshotter", SNAPSHOTTER, ref, name, "cat", APP_SECRET_PATH
        ).text
        if scene.secret not in printed:
            raise IntegrityError("the container started through the snapshotter missed the secret")
        say("ctr", f"run --snapshotter {SNAPSHOTTER}: {APP_SECRET_PATH} = {printed.strip()}")
        raw = [p for p in (scene.work / "snapshotter").rglob("*.qcow2") if p.is_file()]
        if any(_holds(path, scene.secret.encode()) for path in raw):
            raise IntegrityError("a layer containerd stored holds the secret in the clear")
        proved(f"containerd ran the image from {len(raw)} encrypted layers; none holds the secret")
        ctd.ctr("images", "rm", "--sync", ref)
        gone = 0
        for chain in chains:
            gone += _destroyed(keys, chain)
        if gone != len(chains) or snapshotter.walk():
            raise IntegrityError("removing the image left layers or keys behind")
        proved("removing the image from containerd destroyed every layer's key, then its file")


@contextmanager
def _contractor(scene: Scene) -> Iterator[ControlClient]:
    """A user whose policy grants the image's layer keys up to layer 1."""
    password = secrets.token_urlsafe(16)
    name = f"{CONTRACTOR}-{secrets.token_hex(3)}"
    scene.admin.create_user(name, "user", password)
    policy = scene.control.data_dir / "policy.yaml"
    policy.write_text(
        policy.read_text()
        + f'  - subjects: ["user:{name}"]\n    actions: [key.release]\n'
        + f'    resources: ["image:{scene.repository}"]\n    max_layer: 1\n'
    )
    with scene.control.client() as client:
        client.login(name, password)
        yield client


def _destroyed(keys: ControlPlaneKeys, chain: ChainRef) -> int:
    try:
        keys.layer_keys(chain, 0)
    except NotFoundError:
        return 1
    return 0


def _holds(path: Path, needle: bytes, chunk: int = 1 << 20) -> bool:
    tail = b""
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            if needle in tail + block:
                return True
            tail = block[-len(needle) :]
    return False
