"""containerd's snapshots API (gRPC) on a unix socket, answered by the `Snapshotter`.

containerd reaches it as a proxy plugin (`[proxy_plugins.NAME] type =
"snapshot"`, `address` = the socket) and namespaces every key before it
gets here (`NAMESPACE/N/KEY`). Errors go back as the gRPC codes containerd
maps to its own (errdefs.FromGRPC): NOT_FOUND, ALREADY_EXISTS,
FAILED_PRECONDITION (children, busy, mounted; its garbage collector skips
these and stops at any other error from Remove), INVALID_ARGUMENT,
PERMISSION_DENIED (the policy refused a key), UNAVAILABLE. The stubs come
from containerd's own .proto files, compiled at set-up (`scripts/run`).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn, TypeVar

import grpc
from google.protobuf import empty_pb2
from trustplane_containerd_api.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from trustplane_containerd_api.types import mount_pb2

from trustplane.errors import (
    AlreadyExistsError,
    AuthError,
    ConflictError,
    DecryptionKeyError,
    MalformedError,
    NotFoundError,
    StorageError,
    TrustplaneError,
    UnavailableError,
    UsageError,
)
from trustplane.layerstore.snapshots import Kind, Snapshot
from trustplane.layerstore.snapshotter import Mount, Snapshotter

logger = logging.getLogger(__name__)

T = TypeVar("T")
LIST_BATCH = 100
"""Infos per List message (containerd's own service sends blocks too)."""
# containerd's errdefs contract, by class (the first match wins): gRPC only; the HTTP
# status of each class is errors.py's table.
_CODES: Sequence[tuple[type[TrustplaneError], grpc.StatusCode]] = (
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (UsageError, grpc.StatusCode.INVALID_ARGUMENT),
    (MalformedError, grpc.StatusCode.INVALID_ARGUMENT),
    (AuthError, grpc.StatusCode.PERMISSION_DENIED),
    (DecryptionKeyError, grpc.StatusCode.PERMISSION_DENIED),
    (StorageError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
)
_KINDS = {
    Kind.VIEW: snapshots_pb2.VIEW,
    Kind.ACTIVE: snapshots_pb2.ACTIVE,
    Kind.COMMITTED: snapshots_pb2.COMMITTED,
}


def status_code(error: TrustplaneError) -> grpc.StatusCode:
    return next((code for kind, code in _CODES if isinstance(error, kind)), grpc.StatusCode.UNKNOWN)


class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter) -> None:
        self.snapshotter = snapshotter

    def Prepare(
        self, request: snapshots_pb2.PrepareSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.PrepareSnapshotResponse:
        mounts = _answer(
            context,
            f"Prepare {request.key}",
            lambda: self.snapshotter.prepare(request.key, request.parent, dict(request.labels)),
        )
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts(mounts))

    def View(
        self, request: snapshots_pb2.ViewSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.ViewSnapshotResponse:
        mounts = _answer(
            context,
            f"View {request.key}",
            lambda: self.snapshotter.view(request.key, request.parent, dict(request.labels)),
        )
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts(mounts))

    def Mounts(
        self, request: snapshots_pb2.MountsRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.MountsResponse:
        mounts = _answer(
            context, f"Mounts {request.key}", lambda: self.snapshotter.mounts(request.key)
        )
        return snapshots_pb2.MountsResponse(mounts=_mounts(mounts))

    def Commit(
        self, request: snapshots_pb2.CommitSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        _answer(
            context,
            f"Commit {request.key} as {request.name}",
            lambda: self.snapshotter.commit(request.name, request.key, dict(request.labels)),
        )
        return empty_pb2.Empty()

    def Remove(
        self, request: snapshots_pb2.RemoveSnapshotRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        _answer(context, f"Remove {request.key}", lambda: self.snapshotter.remove(request.key))
        return empty_pb2.Empty()

    def Stat(
        self, request: snapshots_pb2.StatSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.StatSnapshotResponse:
        found = _answer(context, f"Stat {request.key}", lambda: self.snapshotter.stat(request.key))
        return snapshots_pb2.StatSnapshotResponse(info=_info(found))

    def Update(
        self, request: snapshots_pb2.UpdateSnapshotRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.UpdateSnapshotResponse:
        info = request.info
        updated = _answer(
            context,
            f"Update {info.name}",
            lambda: self.snapshotter.update(
                info.name, dict(info.labels), list(request.update_mask.paths)
            ),
        )
        return snapshots_pb2.UpdateSnapshotResponse(info=_info(updated))

    def List(
        self, request: snapshots_pb2.ListSnapshotsRequest, context: grpc.ServicerContext
    ) -> Iterator[snapshots_pb2.ListSnapshotsResponse]:
        found = _answer(context, "List", lambda: self.snapshotter.walk(list(request.filters)))
        for start in range(0, len(found), LIST_BATCH):
            batch = found[start : start + LIST_BATCH]
            yield snapshots_pb2.ListSnapshotsResponse(info=[_info(s) for s in batch])

    def Usage(
        self, request: snapshots_pb2.UsageRequest, context: grpc.ServicerContext
    ) -> snapshots_pb2.UsageResponse:
        key = request.key
        usage = _answer(context, f"Usage {key}", lambda: self.snapshotter.usage(key))
        return snapshots_pb2.UsageResponse(size=usage.size, inodes=usage.inodes)

    def Cleanup(
        self, request: snapshots_pb2.CleanupRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        for line in _answer(context, "Cleanup", self.snapshotter.cleanup):
            logger.info("cleanup: %s", line)
        return empty_pb2.Empty()


def serve(snapshotter: Snapshotter, socket: Path, workers: int = 4) -> grpc.Server:
    """Listen on `socket` (0600: containerd runs as root) and answer until stopped."""
    socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        if stat.S_ISSOCK(socket.lstat().st_mode):
            socket.unlink()  # left by a snapshotter that died; the root's lock says it is gone
        else:
            raise UsageError(f"{socket} exists and is not a socket")
    except FileNotFoundError:
        pass
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="snapshots"))
    # The generated registration function carries no annotations.
    add_servicer = snapshots_pb2_grpc.add_SnapshotsServicer_to_server
    add_servicer(SnapshotsService(snapshotter), server)  # type: ignore[no-untyped-call]
    # The socket is made with the process's umask: nobody but root may ever connect.
    previous = os.umask(0o177)
    try:
        if server.add_insecure_port(f"unix://{socket}") == 0:
            raise UsageError(f"cannot listen on {socket}")
    finally:
        os.umask(previous)
    server.start()
    return server


def _answer(context: grpc.ServicerContext, what: str, call: Callable[[], T]) -> T:
    try:
        return call()
    except TrustplaneError as exc:
        code = status_code(exc)
        log = logger.info if code is grpc.StatusCode.NOT_FOUND else logger.warning
        log("%s: %s", what, exc)
        _abort(context, code, str(exc))
    except Exception as exc:
        logger.exception("%s: unexpected failure", what)
        _abort(context, grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)


def _mounts(mounts: Sequence[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def _info(snapshot: Snapshot) -> snapshots_pb2.Info:
    info = snapshots_pb2.Info(
        name=snapshot.key,
        parent=snapshot.parent,
        kind=_KINDS[snapshot.kind],
        labels=snapshot.labels,
    )
    info.created_at.FromDatetime(snapshot.created)
    info.updated_at.FromDatetime(snapshot.updated)
    return info
