"""containerd stores image layers encrypted and runs containers from them: `trustplane
snapshotter` as a proxy snapshotter of a real (second) containerd, driven with `ctr`.

The image is built locally: the busybox base (layer 0) and three layers that
each add a marker file. The attacker is someone who reads the node's disk:
the snapshotter's files (every layer, a container's writable layer, the
table) must hold no marker, nor busybox's own text. Keys come from a real
control plane (the layer-key broker), so removal is checked there: a
removed layer's key chain no longer exists. A snapshotter killed with
`kill -9` and restarted undoes what it left (FUSE mounts, loop devices,
daemons, the spare scratch volumes it had made ahead), makes spares of its
own and still serves the layers it had committed; a clean stop leaves
nothing attached.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
from conftest import run_skopeo, start_control_plane_or_fail
from control_helpers import Cli
from missing import component_missing

from trustplane.embedded.containerd import RunningContainerd, start_containerd
from trustplane.embedded.control_plane import RunningControlPlane
from trustplane.embedded.registry import RunningRegistry
from trustplane.embedded.sample_images import build_image
from trustplane.errors import NotFoundError, TrustplaneError
from trustplane.layerstore import ChainRef, ControlPlaneKeys
from trustplane.layerstore.snapshotter import SPARES

sys.path.insert(0, str(Path(__file__).parents[1] / "layerstore"))
from store_checks import clean, leftovers

NAME = "trustplane"
TAG = "trustplane/snapshotter-test:1"
REF = f"docker.io/{TAG}"
MARKERS = {
    "layer1": b"TPSNAP-MARKER-LAYER-ONE-5b1e\n",
    "layer2": b"TPSNAP-MARKER-LAYER-TWO-8c2f\n",
    "layer3": b"TPSNAP-MARKER-LAYER-THREE-d4a7\n",
}
BUSYBOX_TEXT = b"BusyBox is copyrighted by many authors"
DOCKERFILE = """FROM {base}
COPY layer1 /markers/layer1
COPY layer2 /markers/layer2
COPY layer3 /markers/layer3
"""
START_TIMEOUT = 60.0
GC_TIMEOUT = 60.0


@dataclass
class Snapshotter:
    """`trustplane snapshotter` as a process of its own (so that it can be killed)."""

    cli: Cli
    root: Path
    socket: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, *options: str) -> None:
        self.socket.unlink(missing_ok=True)
        seen = self.log.stat().st_size if self.log.exists() else 0
        env = {**os.environ, "TRUSTPLANE_SESSION": str(self.cli.session)}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "trustplane",
                    "snapshotter",
                    "--socket",
                    str(self.socket),
                    "--root",
                    str(self.root),
                    "--size",
                    "2G",
                    "--repository",
                    "containerd/snapshotter-test",
                    *options,
                ],
                stdout=log,
                stderr=log,
                env=env,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while b"serving containerd's snapshots API" not in self.log.read_bytes()[seen:]:
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)
        assert self.process is None or self.process.returncode == 0, self.log.read_text()

    def table(self) -> dict[str, dict[str, object]]:
        snapshots: dict[str, dict[str, object]] = json.loads(
            (self.root / "snapshots.json").read_bytes()
        )["snapshots"]
        return snapshots

    def layer_files(self) -> list[Path]:
        return sorted((self.root / "qcow2" / "layers").glob("*.qcow2"))


@dataclass
class Setup:
    plane: RunningControlPlane
    snapshotter: Snapshotter
    containerd: RunningContainerd
    archive: Path


@pytest.fixture(scope="module")
def marked_archive(
    docker_client: docker.DockerClient,
    busybox_base: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """Four layers (busybox, then one marker file each) as `docker save` writes them."""
    try:
        build_image(docker_client, TAG, DOCKERFILE.format(base=busybox_base), MARKERS)
    except TrustplaneError as exc:
        component_missing("docker build", str(exc))
    archive = tmp_path_factory.mktemp("snapshotter-image") / "image.tar"
    with archive.open("wb") as out:
        for chunk in docker_client.images.get(TAG).save(named=TAG):
            out.write(chunk)
    return archive


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, marked_archive: Path) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("snapctd")
    plane = start_control_plane_or_fail(work / "plane")
    admin = Cli(work / "admin.json")
    admin.login(plane, "admin", plane.admin_password)
    snapshotter = Snapshotter(admin, work / "root", work / "snap.sock", work / "snapshotter.log")
    # containerd dials a proxy plugin when first needed and backs off while
    # nothing answers: the snapshotter serves before containerd starts.
    snapshotter.start()
    try:
        containerd = start_containerd(work / "ctd", proxy_snapshotters={NAME: snapshotter.socket})
    except TrustplaneError as exc:
        snapshotter.stop()
        component_missing("containerd", str(exc))
    prefix = os.fspath(work) + "/"
    try:
        yield Setup(plane, snapshotter, containerd, marked_archive)
    finally:
        try:
            for task in containerd.ctr("tasks", "ls", "-q", check=False).text.split():
                containerd.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False)
                containerd.ctr("tasks", "rm", "-f", task, check=False)
            containerd.stop()
            snapshotter.stop()
        finally:
            left = leftovers(prefix)
            clean(prefix)
            plane.stop()
    assert left == [], f"left behind: {left}"


def plaintext_in(root: Path, needles: list[bytes]) -> list[str]:
    """Needles found in the raw files under `root`, read as someone with the disk reads
    them: regular files only, never through a mount (a FUSE export or a mounted view
    shows plaintext by design)."""
    points = {
        line.split()[1].replace("\\040", " ")
        for line in Path("/proc/self/mounts").read_text().splitlines()
    }
    found = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.fspath(Path(directory, d)) not in points]
        for name in files:
            path = Path(directory, name)
            if os.fspath(path) in points or not path.is_file() or path.is_symlink():
                continue
            tail = b""
            keep = max(len(n) for n in needles)
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    window = tail + chunk
                    found += [f"{path}: {n!r}" for n in needles if n in window]
                    tail = window[-keep:]
    return sorted(set(found))


NEEDLES = [*MARKERS.values(), BUSYBOX_TEXT]


def wait_for(condition: object, what: str, timeout: float = GC_TIMEOUT) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def committed(setup: Setup) -> dict[str, dict[str, object]]:
    return {k: v for k, v in setup.snapshotter.table().items() if v["kind"] == "committed"}


def test_the_scan_finds_plaintext(tmp_path: Path) -> None:
    """The attacker's tool works: a marker in a plain file is found."""
    (tmp_path / "plain").write_bytes(b"x" * 5000 + MARKERS["layer1"] + b"y")
    assert plaintext_in(tmp_path, NEEDLES) == [f"{tmp_path / 'plain'}: {MARKERS['layer1']!r}"]


def test_import_stores_each_layer_encrypted_under_its_own_key(setup: Setup) -> None:
    ctd = setup.containerd
    # Only root (containerd) may talk to the snapshotter.
    mode = setup.snapshotter.socket.stat()
    assert (mode.st_mode & 0o777, mode.st_uid) == (0o600, 0)
    plugins = ctd.ctr("plugins", "ls").text.splitlines()
    assert any(line.split()[:2] == ["io.containerd.snapshotter.v1", NAME] for line in plugins)
    out = ctd.ctr("images", "import", "--snapshotter", NAME, str(setup.archive)).text
    assert "done" in out
    layers = committed(setup)
    # Four layers, a chain: each committed snapshot's parent is the one below.
    assert len(layers) == 4, layers
    parents = sorted(str(v["parent"]) for v in layers.values())
    assert parents.count("") == 1
    assert {p for p in parents if p} <= set(layers)
    chains = {json.dumps(v["key_ref"], sort_keys=True) for v in layers.values()}
    assert len(chains) == 4, "every layer has a key chain of its own"
    assert len(setup.snapshotter.layer_files()) == 4
    # Someone with the disk: no marker, no busybox text, in any file of the root.
    assert plaintext_in(setup.snapshotter.root, NEEDLES) == []
    for path in setup.snapshotter.layer_files():
        assert path.read_bytes()[:4] == b"QFI\xfb"  # qcow2, its clusters LUKS-encrypted


def test_run_reads_the_top_layer_and_its_writes_are_encrypted(setup: Setup) -> None:
    ctd = setup.containerd
    written = f"TPSNAP-WRITTEN-BY-THE-CONTAINER-{secrets.token_hex(6)}".encode()
    container = f"reader-{secrets.token_hex(4)}"
    script = (
        "cat /markers/layer3 /markers/layer1; "
        f"echo {written.decode()} > /written; sync; cat /written"
    )
    out = ctd.ctr("run", "--snapshotter", NAME, REF, container, "sh", "-c", script).text
    assert out.splitlines() == [
        MARKERS["layer3"].decode().strip(),
        MARKERS["layer1"].decode().strip(),
        written.decode(),
    ]
    # The container exists still (no --rm): its writable layer holds what it wrote,
    # encrypted under a key only the snapshotter's memory holds.
    actives = [k for k, v in setup.snapshotter.table().items() if v["kind"] == "active"]
    assert len(actives) == 1
    assert actives[0].endswith(f"/{container}")
    assert plaintext_in(setup.snapshotter.root, [*NEEDLES, written]) == []
    # Its scratch volume, and the spares made ahead for the next containers (warm.py).
    wait_for(lambda: len(scratch_volumes(setup)) == SPARES + 1, "spares behind it")
    assert all(path.read_bytes()[:6] == b"LUKS\xba\xbe" for path in scratch_volumes(setup))

    # ctr rm: containerd's garbage collector removes the snapshot, and with it the
    # scratch volume (its key existed only in the snapshotter's memory).
    ctd.ctr("containers", "rm", container)
    wait_for(
        lambda: not any(v["kind"] == "active" for v in setup.snapshotter.table().values()),
        "the container's snapshot to be removed",
    )
    wait_for(lambda: len(scratch_volumes(setup)) == SPARES, "its scratch volume to go")


def scratch_volumes(setup: Setup) -> list[Path]:
    return list((setup.snapshotter.root / "qcow2" / "run").glob("*/scratch.luks"))


def attachments(setup: Setup) -> set[Path]:
    """The backend's leases in view: one per open chain or scratch volume."""
    run = setup.snapshotter.root / "qcow2" / "run"
    return {p for p in run.iterdir() if p.is_dir() and not p.name.startswith(".")}


def mounted(lease: Path) -> bool:
    """A view's or a scratch volume's file system is mounted in its lease (it is whole)."""
    return (lease / "view").is_mount() or (lease / "writes").is_mount()


def snapshotter_reachable(setup: Setup, key: str) -> None:
    """containerd redials a proxy plugin with a backoff of up to 3 s (its proxy
    plugins' gRPC settings): calls fail with UNAVAILABLE until it has."""
    ctd = setup.containerd
    wait_for(
        lambda: (
            ctd.ctr("snapshots", "--snapshotter", NAME, "info", key, check=False).returncode == 0
        ),
        "containerd to reach the restarted snapshotter",
    )


def test_kill_9_and_restart(setup: Setup) -> None:
    """Killed while a container's snapshot is open and spares are made ahead: a
    restart cleans what the dead process held (its spares too: their keys died
    with it), makes spares of its own, keeps the committed layers, and
    containers run again. A clean stop leaves nothing attached."""
    ctd, snap = setup.containerd, setup.snapshotter
    held = f"held-{secrets.token_hex(4)}"
    ctd.ctr("containers", "create", "--snapshotter", NAME, REF, held, "cat", "/markers/layer2")
    # The container's scratch volume, and the spares made behind it (warm.py).
    wait_for(
        lambda: len(scratch_volumes(setup)) == SPARES + 1 and all(map(mounted, attachments(setup))),
        "spares behind the container",
    )
    dead = attachments(setup)  # the image's shared view, the scratch volumes
    assert len(dead) == SPARES + 2, dead
    before = committed(setup)
    seen = len(snap.log.read_text())

    snap.kill()
    assert all(leftovers(f"{lease}/") for lease in dead), "kill -9 leaves the attachments behind"
    snap.start()  # with spares, as by default
    for lease in dead:
        assert leftovers(f"{lease}/") == [], f"{lease.name}: still attached after the restart"
        assert not lease.exists(), f"{lease.name}: its files (a scratch volume) stayed"
    said = snap.log.read_text()[seen:]
    assert {lease.name for lease in dead} <= set(re.findall(r"recovered: attachment (\w+):", said))
    # The new process's own spares: new volumes under new keys, nothing of the dead one's.
    wait_for(lambda: len(scratch_volumes(setup)) == SPARES, "the restarted snapshotter's spares")
    assert not attachments(setup) & dead
    assert committed(setup) == before
    snapshotter_reachable(setup, held)

    # The created container starts: its snapshot is opened again (a fresh writable layer).
    assert ctd.ctr("tasks", "start", held).text.strip() == MARKERS["layer2"].decode().strip()
    ctd.ctr("tasks", "rm", held, check=False)
    ctd.ctr("containers", "rm", held)
    wait_for(lambda: len(scratch_volumes(setup)) == SPARES, "its scratch volume to go")

    # A clean stop: the spares and the shared view are closed, their files removed.
    prefix = os.fspath(snap.root) + "/"
    seen = len(snap.log.read_text())
    snap.stop()
    assert leftovers(prefix) == []
    assert scratch_volumes(setup) == []
    assert attachments(setup) == set()
    snap.start()
    assert "recovered: attachment" not in snap.log.read_text()[seen:]
    # containerd names a committed snapshot by its chainID (our key: NAMESPACE/N/chainID).
    snapshotter_reachable(setup, next(iter(before)).split("/", 2)[-1])
    again = f"again-{secrets.token_hex(4)}"
    out = ctd.ctr("run", "--rm", "--snapshotter", NAME, REF, again, "cat", "/markers/layer3")
    assert out.text.strip() == MARKERS["layer3"].decode().strip()


def test_image_removal_shreds_the_layer_keys(setup: Setup) -> None:
    ctd, snap = setup.containerd, setup.snapshotter
    chains = [ChainRef(**v["key_ref"]) for v in committed(setup).values()]  # type: ignore[arg-type]
    assert len(chains) == 4
    ctd.ctr("images", "rm", "--sync", REF)
    wait_for(lambda: not snap.table(), "every snapshot to be removed")
    assert snap.layer_files() == []
    with setup.plane.admin() as client:
        keys = ControlPlaneKeys(client)
        for chain in chains:
            with pytest.raises(NotFoundError):
                keys.layer_keys(chain, 0)


def test_pull_from_a_registry(setup: Setup, registry_plain: RunningRegistry, skopeo: str) -> None:
    """`ctr images pull` unpacks through the same snapshotter (containerd's pull-time
    unpacker), and the pulled image runs."""
    assert committed(setup) == {}, "runs after the image's removal: every layer is new"
    remote = f"{registry_plain.host}/snapshotter/test:1"
    run_skopeo("copy", "--dest-tls-verify=false", f"docker-daemon:{TAG}", f"docker://{remote}")
    ctd = setup.containerd
    ctd.ctr("images", "pull", "--plain-http", "--snapshotter", NAME, remote)
    assert len(committed(setup)) == 4
    assert plaintext_in(setup.snapshotter.root, NEEDLES) == []
    name = f"pulled-{secrets.token_hex(4)}"
    out = ctd.ctr("run", "--rm", "--snapshotter", NAME, remote, name, "cat", "/markers/layer2")
    assert out.text.strip() == MARKERS["layer2"].decode().strip()
    ctd.ctr("images", "rm", "--sync", remote)
    wait_for(lambda: not setup.snapshotter.table(), "every snapshot to be removed")


def test_a_user_the_policy_grants_nothing_stores_nothing(
    setup: Setup, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The attacker: a valid login without `key.release` on the snapshotter's
    repository. containerd's import fails with the policy's refusal, and neither
    a layer nor a record is left."""
    work = tmp_path_factory.mktemp("snapdeny")
    password = "nobody-pass-" + secrets.token_hex(8)
    with setup.plane.admin() as client:
        client.create_user("nobody-ctd", "user", password)
    cli = Cli(work / "nobody.json")
    cli.login(setup.plane, "nobody-ctd", password)
    snap = Snapshotter(cli, work / "root", work / "s.sock", work / "snapshotter.log")
    snap.start()
    prefix = os.fspath(work) + "/"
    try:
        with start_containerd(work / "ctd", proxy_snapshotters={NAME: snap.socket}) as ctd:
            result = ctd.ctr(
                "images", "import", "--snapshotter", NAME, str(setup.archive), check=False
            )
            assert result.returncode != 0
            said = result.stderr.decode(errors="replace")
            assert "policy refuses" in said, said
        assert snap.table() == {}
        assert snap.layer_files() == []
    finally:
        snap.stop()
        left = leftovers(prefix)
        clean(prefix)
    assert left == []
