"""The second containerd: ctr against it, an image from `docker save`, a container
run with overlayfs, and a proxy snapshotter served from the compiled snapshots API."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import docker
import grpc
import pytest
from conftest import PROXY_SNAPSHOTTER, component_missing
from google.protobuf import empty_pb2

from trustplane.embedded.containerd import RunningContainerd

try:
    from trustplane_containerd_api.services.snapshots.v1 import (
        snapshots_pb2,
        snapshots_pb2_grpc,
    )
    from trustplane_containerd_api.types import mount_pb2
except ImportError as exc:  # compiled by `scripts/run setup`
    _API_ERROR: ImportError | None = exc
else:
    _API_ERROR = None

GC_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def busybox_archive(
    docker_client: docker.DockerClient, busybox_base: str, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The locally imported busybox image as `docker save` writes it (docker-archive)."""
    archive = tmp_path_factory.mktemp("docker-save") / "busybox.tar"
    with archive.open("wb") as fh:
        for chunk in docker_client.images.get(busybox_base).save(named=True):
            fh.write(chunk)
    return archive


def test_ctr_reaches_the_second_containerd(containerd: RunningContainerd) -> None:
    plugins = containerd.ctr_checked("plugins", "ls")
    rows = [line.split() for line in plugins.splitlines()[1:] if line.strip()]
    status = {(row[0], row[1]): row[-1] for row in rows}
    assert status[("io.containerd.snapshotter.v1", "overlayfs")] == "ok"
    assert status[("io.containerd.snapshotter.v1", PROXY_SNAPSHOTTER)] == "ok"
    assert not any(plugin == "cri" for _, plugin in status), "CRI is disabled"
    # Its own socket, root and state; not the one dockerd runs.
    assert containerd.address.is_socket()
    assert (containerd.root / "io.containerd.metadata.v1.bolt").is_dir()
    assert containerd.state.is_dir()


def test_import_docker_archive_and_run_with_overlayfs(
    containerd: RunningContainerd, busybox_archive: Path, busybox_base: str
) -> None:
    out = containerd.ctr_checked("images", "import", str(busybox_archive))
    assert "unpacking" in out
    assert "done" in out
    ref = f"docker.io/{busybox_base}"
    assert ref in containerd.ctr_checked("images", "ls", "-q").split()
    word = secrets.token_hex(6)
    container = f"probe-{word}"
    result = containerd.ctr(
        "run", "--rm", "--snapshotter", "overlayfs", ref, container, "echo", f"hello {word}"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"hello {word}"
    assert container not in containerd.ctr_checked("containers", "ls", "-q").split()


# -- a proxy snapshotter from the compiled snapshots API --------------------------------


class _RecordingSnapshotter:
    """Answers Prepare with a bind mount, lists what it holds (containerd's garbage
    collector walks it) and records every call: a stand-in for the layer store's
    snapshotter, enough to show containerd talks to it."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.calls: list[tuple[str, str]] = []
        self.active: set[str] = set()
        self.lock = threading.Lock()

    def Prepare(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self.lock:
            self.calls.append(("Prepare", request.key))
            self.active.add(request.key)
        mount = mount_pb2.Mount(type="bind", source=str(self.source), options=["rbind", "rw"])
        return snapshots_pb2.PrepareSnapshotResponse(mounts=[mount])

    def List(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with self.lock:
            infos = [snapshots_pb2.Info(name=k, kind=snapshots_pb2.ACTIVE) for k in self.active]
        yield snapshots_pb2.ListSnapshotsResponse(info=infos)

    def Remove(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self.lock:
            self.calls.append(("Remove", request.key))
            self.active.discard(request.key)
        return empty_pb2.Empty()


@pytest.fixture
def proxy_server(containerd: RunningContainerd, tmp_path: Path) -> Iterator[_RecordingSnapshotter]:
    if _API_ERROR is not None:
        component_missing(
            "containerd snapshots API (trustplane_containerd_api)",
            f"{_API_ERROR}; run scripts/run setup, which compiles it",
        )
    socket = containerd.proxy_snapshotters[PROXY_SNAPSHOTTER]
    socket.unlink(missing_ok=True)
    # The generated base class answers UNIMPLEMENTED for everything not overridden.
    servicer = type("Servicer", (_RecordingSnapshotter, snapshots_pb2_grpc.SnapshotsServicer), {})
    instance = servicer(tmp_path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(instance, server)
    server.add_insecure_port(f"unix://{socket}")
    server.start()
    yield instance
    server.stop(grace=None)
    socket.unlink(missing_ok=True)


def test_proxy_snapshotter_served_by_the_generated_stubs(
    containerd: RunningContainerd, proxy_server: _RecordingSnapshotter, tmp_path: Path
) -> None:
    key = f"probe-{secrets.token_hex(4)}"
    out = containerd.ctr_checked(
        "snapshots", "--snapshotter", PROXY_SNAPSHOTTER, "prepare", "--mounts", key
    )
    mounts = json.loads(out)
    assert mounts == [{"Type": "bind", "Source": str(tmp_path), "Options": ["rbind", "rw"]}]
    # containerd namespaces the key (NAMESPACE/ID/KEY) before it reaches the plugin.
    assert [(call, k.rsplit("/", 1)[-1]) for call, k in proxy_server.calls] == [("Prepare", key)]
    prepared_key = proxy_server.calls[0][1]
    assert prepared_key.startswith(f"{containerd.namespace}/")

    # `ctr snapshots rm` removes the metadata; the garbage collector (configured
    # to run after each deletion) then calls the plugin's Remove.
    containerd.ctr_checked("snapshots", "--snapshotter", PROXY_SNAPSHOTTER, "rm", key)
    deadline = time.monotonic() + GC_TIMEOUT
    while ("Remove", prepared_key) not in proxy_server.calls:
        assert time.monotonic() < deadline, f"no Remove after GC: {proxy_server.calls}"
        time.sleep(0.05)
