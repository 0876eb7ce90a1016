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
from google.protobuf import empty_pb2
from missing import component_missing

from trustplane.embedded.containerd import RunningContainerd, start_containerd

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
    plugins = containerd.ctr("plugins", "ls").text
    rows = [line.split() for line in plugins.splitlines()[1:] if line.strip()]
    status = {(row[0], row[1]): row[-1] for row in rows}
    assert status[("io.containerd.snapshotter.v1", "overlayfs")] == "ok"
    assert not any(plugin == "cri" for _, plugin in status), "CRI is disabled"
    # Its own socket, root and state; not the one dockerd runs.
    assert containerd.address.is_socket()
    assert (containerd.root / "io.containerd.metadata.v1.bolt").is_dir()
    assert containerd.state.is_dir()


def test_import_docker_archive_and_run_with_overlayfs(
    containerd: RunningContainerd, busybox_archive: Path, busybox_base: str
) -> None:
    out = containerd.ctr("images", "import", str(busybox_archive)).text
    assert "unpacking" in out
    assert "done" in out
    ref = f"docker.io/{busybox_base}"
    assert ref in containerd.ctr("images", "ls", "-q").text.split()
    word = secrets.token_hex(6)
    container = f"probe-{word}"
    result = containerd.ctr(
        "run", "--rm", "--snapshotter", "overlayfs", ref, container, "echo", f"hello {word}"
    )
    assert result.text.strip() == f"hello {word}"
    assert container not in containerd.ctr("containers", "ls", "-q").text.split()


# -- a proxy snapshotter from the compiled snapshots API --------------------------------


class _RecordingSnapshotter:
    """Answers Prepare with a bind mount, lists what it holds (containerd's garbage
    collector walks it) and records every call: a stand-in for the layer store's
    snapshotter, enough to show containerd talks to it."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.socket = Path()
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


PROXY_SNAPSHOTTER = "probe"


@pytest.fixture
def proxy_server(tmp_path: Path) -> Iterator[_RecordingSnapshotter]:
    """The recording snapshotter served on a unix socket from the generated stubs."""
    if _API_ERROR is not None:
        component_missing(
            "containerd snapshots API (trustplane_containerd_api)",
            f"{_API_ERROR}; run scripts/run setup, which compiles it",
        )
    socket = tmp_path / "snapshotter.sock"
    # The generated base class answers UNIMPLEMENTED for everything not overridden.
    servicer = type("Servicer", (_RecordingSnapshotter, snapshots_pb2_grpc.SnapshotsServicer), {})
    instance = servicer(tmp_path / "source")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(instance, server)
    assert server.add_insecure_port(f"unix://{socket}") != 0
    server.start()
    instance.socket = socket
    yield instance
    server.stop(grace=None)


@pytest.fixture
def containerd_with_proxy(
    proxy_server: _RecordingSnapshotter, tmp_path: Path
) -> Iterator[RunningContainerd]:
    """A containerd of its own whose proxy snapshotter is `proxy_server` (already serving)."""
    with start_containerd(
        tmp_path / "containerd", proxy_snapshotters={PROXY_SNAPSHOTTER: proxy_server.socket}
    ) as daemon:
        yield daemon


def test_proxy_snapshotter_served_by_the_generated_stubs(
    containerd_with_proxy: RunningContainerd, proxy_server: _RecordingSnapshotter
) -> None:
    containerd = containerd_with_proxy
    plugins = containerd.ctr("plugins", "ls").text
    assert any(
        line.split()[:2] == ["io.containerd.snapshotter.v1", PROXY_SNAPSHOTTER]
        and line.split()[-1] == "ok"
        for line in plugins.splitlines()
    ), plugins
    key = f"probe-{secrets.token_hex(4)}"
    out = containerd.ctr(
        "snapshots", "--snapshotter", PROXY_SNAPSHOTTER, "prepare", "--mounts", key
    ).text
    mounts = json.loads(out)
    assert mounts == [
        {"Type": "bind", "Source": str(proxy_server.source), "Options": ["rbind", "rw"]}
    ]
    # containerd namespaces the key (NAMESPACE/ID/KEY) before it reaches the plugin.
    assert [(call, k.rsplit("/", 1)[-1]) for call, k in proxy_server.calls] == [("Prepare", key)]
    prepared_key = proxy_server.calls[0][1]
    assert prepared_key.startswith(f"{containerd.namespace}/")

    # `ctr snapshots rm` removes the metadata; the garbage collector (configured
    # to run after each deletion) then walks the plugin (List) and calls Remove.
    containerd.ctr("snapshots", "--snapshotter", PROXY_SNAPSHOTTER, "rm", key)
    deadline = time.monotonic() + GC_TIMEOUT
    while ("Remove", prepared_key) not in proxy_server.calls:
        assert time.monotonic() < deadline, f"no Remove after GC: {proxy_server.calls}"
        time.sleep(0.05)
    assert not proxy_server.active
