"""Session fixtures that start the real components on 127.0.0.1.

Every fixture starts (or finds) the real program once per test session and
stops what it started at the end. A component that cannot be had fails the
test: this project never skips (CI=true makes that explicit in the message).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest

# Session fixture `dm_guest` (a QEMU guest with device-mapper): the root conftest.py.
from missing import component_missing

# Session fixture `postgres` (a private PostgreSQL on 127.0.0.1); see pg_fixture.py.
from pg_fixture import postgres  # noqa: F401
from token_server import TokenServer

from trustplane.client import ControlClient
from trustplane.crypto.keys import generate_key_pair
from trustplane.embedded.ceph import RunningCeph, start_ceph
from trustplane.embedded.containerd import RunningContainerd, start_containerd
from trustplane.embedded.control_plane import RunningControlPlane, start_control_plane
from trustplane.embedded.dockerd import DockerDaemon, ensure_dockerd
from trustplane.embedded.libvirtd import RunningLibvirtd, start_libvirtd
from trustplane.embedded.mosquitto import RunningMosquitto, start_mosquitto
from trustplane.embedded.registry import RunningRegistry, TokenAuth, start_registry
from trustplane.embedded.sample_images import build_app_image, import_busybox_base
from trustplane.embedded.swtpm import RunningSwtpm, start_swtpm
from trustplane.embedded.tgtd import RunningTgtd, start_tgtd
from trustplane.embedded.tls import (
    CertificateAuthority,
    create_ca,
    create_token_signing_key,
    issue_server_cert,
)
from trustplane.errors import TrustplaneError

BUSYBOX_TAG = "trustplane/busybox:test-base"
TOKEN_SERVICE = "trustplane-test-registry"
TOKEN_ISSUER = "trustplane-test-token-issuer"
TOKEN_USER = "tokenuser"

_HERE = Path(__file__).resolve().parent


def start_control_plane_or_fail(work_dir: Path, **options: Any) -> RunningControlPlane:
    """`start_control_plane`, failing the run (never skipping) when it cannot start."""
    try:
        return start_control_plane(work_dir, **options)
    except TrustplaneError as exc:
        component_missing("trustplane server", str(exc))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration needs real components: mark it `integration`."""
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory for the session's components: configs, logs, storage, keys."""
    return tmp_path_factory.mktemp("embedded")


@pytest.fixture(scope="session")
def test_ca(work_dir: Path) -> CertificateAuthority:
    return create_ca(work_dir / "ca", "trustplane integration test CA")


@pytest.fixture(scope="session")
def docker_daemon(work_dir: Path) -> Iterator[DockerDaemon]:
    try:
        daemon = ensure_dockerd(work_dir / "dockerd")
    except TrustplaneError as exc:
        component_missing("dockerd", str(exc))
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def docker_client(docker_daemon: DockerDaemon) -> Iterator[docker.DockerClient]:
    client = docker_daemon.client()
    yield client
    client.close()


@pytest.fixture(scope="session")
def busybox_base(docker_client: docker.DockerClient) -> str:
    """Tag of a BusyBox image imported from busybox-static (there is no internet)."""
    try:
        import_busybox_base(docker_client, BUSYBOX_TAG)
    except TrustplaneError as exc:
        component_missing("busybox base image", str(exc))
    return BUSYBOX_TAG


@pytest.fixture(scope="session")
def registry_plain(work_dir: Path) -> Iterator[RunningRegistry]:
    try:
        registry = start_registry(work_dir / "registry-plain", "plain")
    except TrustplaneError as exc:
        component_missing("docker-registry (plain)", str(exc))
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def registry_tls(work_dir: Path, test_ca: CertificateAuthority) -> Iterator[RunningRegistry]:
    """TLS + htpasswd (bcrypt); `username`/`password` are the one valid login."""
    cert = issue_server_cert(test_ca, work_dir / "registry-tls" / "tls", "registry")
    try:
        registry = start_registry(work_dir / "registry-tls", "tls-basic", tls=cert)
    except TrustplaneError as exc:
        component_missing("docker-registry (tls-basic)", str(exc))
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def token_server(work_dir: Path, test_ca: CertificateAuthority) -> Iterator[TokenServer]:
    directory = work_dir / "token-server"
    server = TokenServer(
        signer=create_token_signing_key(directory),
        tls=issue_server_cert(test_ca, directory, "token-server"),
        service=TOKEN_SERVICE,
        issuer=TOKEN_ISSUER,
        username=TOKEN_USER,
        password=secrets.token_urlsafe(18),
        log_file=directory / "token-server.log",
    )
    with server:
        yield server


@pytest.fixture(scope="session")
def registry_token(
    work_dir: Path, test_ca: CertificateAuthority, token_server: TokenServer
) -> Iterator[RunningRegistry]:
    """TLS + bearer tokens from `token_server` (same CA for both servers)."""
    cert = issue_server_cert(test_ca, work_dir / "registry-token" / "tls", "registry")
    auth = TokenAuth(
        realm=token_server.realm,
        service=token_server.service,
        issuer=token_server.issuer,
        signing_cert=token_server.signer.cert_file,
    )
    try:
        registry = start_registry(work_dir / "registry-token", "token", tls=cert, token=auth)
    except TrustplaneError as exc:
        component_missing("docker-registry (token)", str(exc))
    yield registry
    registry.stop()


# -- images and keys for the encryption tests ----------------------------------

APP_TAG = "trustplane/app:test"
APP_SECRET = b"s3cr3t-token-for-tests-0123456789\n"


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: Path
    kind: str


@pytest.fixture(scope="session")
def skopeo() -> str:
    path = shutil.which("skopeo")
    if path is None:
        component_missing("skopeo", "install the Debian package skopeo")
    return path


@pytest.fixture(scope="session")
def app_image(docker_client: docker.DockerClient, busybox_base: str) -> str:
    """Layers: 0 busybox base, 1 /app (public), 2 /secrets/token (secret)."""
    try:
        build_app_image(docker_client, busybox_base, APP_TAG, APP_SECRET)
    except TrustplaneError as exc:
        component_missing("docker build", str(exc))
    return APP_TAG


@pytest.fixture(scope="session")
def app_layout(app_image: str, skopeo: str, work_dir: Path) -> Path:
    """The app image as skopeo writes it to an OCI layout: the reference original."""
    layout = work_dir / "app-oci"
    run_skopeo("copy", f"docker-daemon:{app_image}", f"oci:{layout}:v1")
    return layout


@pytest.fixture(scope="session")
def keys(work_dir: Path) -> dict[str, KeyPair]:
    """One recipient key pair of each kind ocicrypt supports (PKCS#8, as skopeo needs)."""
    directory = work_dir / "keys"
    directory.mkdir()
    pairs = {}
    for kind in ("rsa", "ec-p256", "ec-p384", "ec-p521", "tier-low", "outsider"):
        key_type = kind if kind in ("rsa", "ec-p256", "ec-p384", "ec-p521") else "ec-p256"
        private_pem, public_pem = generate_key_pair(key_type)  # type: ignore[arg-type]
        pair = KeyPair(directory / f"{kind}.pem", directory / f"{kind}.pub", kind)
        pair.private.write_bytes(private_pem)
        pair.public.write_bytes(public_pem)
        pairs[kind] = pair
    return pairs


def run_skopeo(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["skopeo", "--insecure-policy", *args], capture_output=True, text=True, timeout=300
    )
    if check and result.returncode != 0:
        pytest.fail(f"skopeo {' '.join(args)} failed: {result.stderr.strip()}")
    return result


# -- the control plane ------------------------------------------------------------


@pytest.fixture(scope="session")
def control_plane(work_dir: Path) -> Iterator[RunningControlPlane]:
    """`trustplane server` on loopback with nothing but a data directory."""
    server = start_control_plane_or_fail(work_dir / "control-plane")
    yield server
    server.stop()


@pytest.fixture
def admin(control_plane: RunningControlPlane) -> Iterator[ControlClient]:
    client = control_plane.admin()
    yield client
    client.close()


# -- cosign (the reference for image signatures) ------------------------------------


@pytest.fixture(scope="session")  # noqa: RET503 (component_missing never returns)
def cosign() -> str:
    """cosign 2.x: $TRUSTPLANE_COSIGN, the one scripts/run unpacks from Debian trixie
    into .venv/cosign, or one on PATH."""
    candidates = [
        os.environ.get("TRUSTPLANE_COSIGN"),
        str(_HERE.parents[1] / ".venv" / "cosign" / "usr" / "bin" / "cosign"),
        shutil.which("cosign"),
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            result = subprocess.run(
                [candidate, "version"], capture_output=True, text=True, timeout=60
            )
            if result.returncode == 0:
                return candidate
    component_missing("cosign", "run scripts/run setup (it fetches cosign from Debian trixie)")


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[RunningSwtpm]:
    """A software TPM 2.0 on loopback (swtpm), cleared and started; one per
    test, as each node has its own: measurements stay in its PCR until it
    reboots (`RunningSwtpm.power_cycle`)."""
    try:
        tpm = start_swtpm(tmp_path / "swtpm")
    except TrustplaneError as exc:
        component_missing("swtpm", str(exc))
    with tpm:  # a test that power-cycles it stops the new one itself
        yield tpm


# -- mosquitto (the gateways' MQTT link) ---------------------------------------------


@pytest.fixture(scope="session")
def mosquitto(work_dir: Path, test_ca: CertificateAuthority) -> Iterator[RunningMosquitto]:
    """A private broker on 127.0.0.1: TLS, password file, per-gateway ACL."""
    try:
        broker = start_mosquitto(work_dir / "mosquitto", test_ca)
    except TrustplaneError as exc:
        component_missing("mosquitto", str(exc))
    yield broker
    broker.stop()


# -- storage and virtualisation (encrypted volumes, the layer store) ---------------


@pytest.fixture(scope="session")
def ceph(work_dir: Path) -> Iterator[RunningCeph]:
    """A one-node Ceph cluster (mon, mgr, one BlueStore OSD on a sparse file, cephx).

    `ceph.pool` is an RBD pool; `ceph.client` a cephx user with the rbd
    profile on it (not admin), with its own ceph.conf and 0600 keyring, and
    the monitor's host:port and key that libvirt takes instead.
    """
    try:
        cluster = start_ceph(work_dir / "ceph")
    except TrustplaneError as exc:
        component_missing("Ceph", str(exc))
    with cluster:
        yield cluster


@pytest.fixture(scope="session")
def tgtd(work_dir: Path) -> Iterator[RunningTgtd]:
    """An iSCSI target daemon on 127.0.0.1; tests add their own targets and LUNs."""
    try:
        daemon = start_tgtd(work_dir / "tgtd")
    except TrustplaneError as exc:
        component_missing("tgtd", str(exc))
    with daemon:
        yield daemon


@pytest.fixture(scope="session")
def libvirtd(work_dir: Path) -> Iterator[RunningLibvirtd]:
    """A private libvirtd (QEMU driver); connect with `libvirt.open(libvirtd.uri)`."""
    try:
        daemon = start_libvirtd(work_dir / "libvirtd")
    except TrustplaneError as exc:
        component_missing("libvirtd", str(exc))
    with daemon:
        yield daemon


@pytest.fixture(scope="session")
def containerd(work_dir: Path) -> Iterator[RunningContainerd]:
    """A second containerd (own root, state, socket; CRI off) for ctr-driven tests.

    It has no proxy snapshotter: containerd dials a proxy plugin lazily and
    backs off when nothing answers, so a test with a snapshotter of its own
    starts its gRPC server first and then a containerd of its own with
    `start_containerd(dir, proxy_snapshotters={NAME: SOCKET})` (~0.1 s).
    """
    try:
        daemon = start_containerd(work_dir / "containerd")
    except TrustplaneError as exc:
        component_missing("containerd", str(exc))
    with daemon:
        yield daemon
