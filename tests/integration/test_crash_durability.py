"""SIGKILL in the middle of a load run loses nothing that was acknowledged.

Client threads create secrets (acknowledged by the secret's id) and ask for
decisions (acknowledged by the decision's log index) while a watcher keeps
taking signed checkpoints. The server's whole process group then gets
SIGKILL, with requests in flight, and the server is started again on the
same data directory. Every acknowledged secret must open to its payload,
every acknowledged log index must hold the decision that was answered, the
log read straight from the database must hash to the new signed root, and
checkpoints taken before the kill (before the load, and the last one during
it) must be proved consistent with the new one. SQLite is the embedded
default; PostgreSQL, where the database outlives the server, is the same
test with the data in a fresh schema.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from durability_helpers import (
    LogAuditor,
    StateStore,
    fresh_schema,
    sqlite_store,
    write_server_config,
)

from trustplane.client import ControlClient
from trustplane.embedded.control_plane import RunningControlPlane, start_control_plane
from trustplane.trust import merkle
from trustplane.trust.checkpoint import Checkpoint

THREADS = 8
LOAD_SECONDS = 2.0
"""How long the load runs before the kill."""
CHECKPOINT_EVERY = 0.05


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StateStore:
    if request.param == "sqlite":
        return sqlite_store(tmp_path / "data")
    return fresh_schema(request.getfixturevalue("postgres"), "crash")


@dataclass
class Load:
    """Client threads doing acknowledged writes until the server goes away."""

    plane: RunningControlPlane
    token: str
    auditor: LogAuditor
    secrets_acked: list[tuple[str, bytes]] = field(default_factory=list)
    decisions_acked: list[tuple[int, str]] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    errors: list[tuple[float, str, BaseException]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def writer(self, number: int) -> None:
        with self.plane.client(self.token) as client:
            n = 0
            try:
                while not self.stop.is_set():
                    n += 1
                    if n % 2:
                        payload = secrets.token_bytes(32)
                        answer = client.create_secret(payload, name=f"crash-{number}-{n}")
                        self.secrets_acked.append((answer.id, payload))
                    else:
                        resource = f"container:crash-{number}-{n}"
                        decision = client.authorize("container.start", resource)
                        assert decision.decision == "allow", decision
                        self.decisions_acked.append((int(decision.log_index), resource))
            except BaseException as exc:  # the kill ends every writer; checked below
                self.errors.append((time.monotonic(), f"writer {number}", exc))

    def watcher(self) -> None:
        with self.plane.client(self.token) as client:
            try:
                while not self.stop.is_set():
                    self.checkpoints.append(self.auditor.checkpoint(client))
                    time.sleep(CHECKPOINT_EVERY)
            except BaseException as exc:
                self.errors.append((time.monotonic(), "watcher", exc))

    def run_and_kill(self, seconds: float) -> float:
        """Run the load for `seconds`, SIGKILL the server's group; returns when it was killed."""

        def kill(pid: int) -> None:
            os.killpg(pid, signal.SIGKILL)  # start_new_session: the group id is the leader's pid
            deadline = time.monotonic() + 10
            while self.plane.process.running() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert self.plane.process.returncode() == -signal.SIGKILL

        return self.run_and_end(seconds, kill)

    def run_and_end(self, seconds: float, end: Callable[[int], None]) -> float:
        """Run the load for `seconds`, then `end(server pid)`; returns when it was ended."""
        threads = [threading.Thread(target=self.writer, args=(i,)) for i in range(THREADS)]
        threads.append(threading.Thread(target=self.watcher))
        for thread in threads:
            thread.start()
        try:
            time.sleep(seconds)
            pid = self.plane.process.pid
            assert pid is not None
            assert self.plane.process.running()
            killed_at = time.monotonic()
            end(pid)
        finally:
            for thread in threads:
                thread.join(timeout=60)
            self.stop.set()
        assert not any(thread.is_alive() for thread in threads)
        return killed_at


@pytest.fixture
def planes() -> Iterator[list[RunningControlPlane]]:
    started: list[RunningControlPlane] = []
    yield started
    for plane in started:
        plane.stop()


def start_with_a_log(
    store: StateStore, tmp_path: Path, planes: list[RunningControlPlane]
) -> tuple[Path, RunningControlPlane, LogAuditor, Checkpoint, Load]:
    """A server on `store` whose log holds a few entries: (data dir, server, the log's
    pinned auditor, a checkpoint of those entries, a load ready to run as the admin)."""
    data = tmp_path / "data"
    if store.database_url is not None:
        write_server_config(data, database_url=store.database_url)
    first = start_control_plane(tmp_path / "run-1", data_dir=data)
    planes.append(first)
    with first.admin() as admin:
        auditor = LogAuditor.pin(admin)
        for i in range(5):
            admin.authorize("container.start", f"container:warm-up-{i}")
        before = auditor.checkpoint(admin)
        assert admin.token is not None
        load = Load(first, admin.token, auditor)
    assert before.size >= 5
    return data, first, auditor, before, load


def test_sigkill_mid_load_loses_no_acknowledged_write(
    store: StateStore, tmp_path: Path, planes: list[RunningControlPlane]
) -> None:
    data, first, auditor, before, load = start_with_a_log(store, tmp_path, planes)

    killed_at = load.run_and_kill(LOAD_SECONDS)

    # The kill, and nothing else, ended the load: every thread failed only after it.
    early = [(who, repr(exc)) for when, who, exc in load.errors if when < killed_at]
    assert not early, early
    assert len(load.errors) == THREADS + 1, load.errors
    assert len(load.secrets_acked) > 20, len(load.secrets_acked)
    assert len(load.decisions_acked) > 20, len(load.decisions_acked)
    during = load.checkpoints[-1]
    assert during.size > before.size

    second = start_control_plane(
        tmp_path / "run-2", data_dir=data, admin_password=first.admin_password
    )
    planes.append(second)
    with second.admin() as admin:
        after, in_flight, leaves = check_log_after_restart(store, admin, auditor, load, before)
        # A sample through the API, each proved included in the new checkpoint.
        bodies = dict(leaves)
        sample = sorted(load.decisions_acked)[:: max(1, len(load.decisions_acked) // 25)]
        for index, _ in sample:
            body = admin.log_entry(index)
            assert body == bodies[index]
            auditor.check_included(admin, index, body, after)

        token = admin.token
    assert token is not None

    # Every acknowledged secret opens to its payload (several readers at once).
    def opens(chunk: list[tuple[str, bytes]]) -> list[str]:
        wrong = []
        with ControlClient(second.url, second.ca_file, token) as client:
            for secret_id, payload in chunk:
                if client.secret_payload(secret_id) != payload:
                    wrong.append(secret_id)
        return wrong

    chunks = [load.secrets_acked[i::THREADS] for i in range(THREADS)]
    with ThreadPoolExecutor(THREADS) as pool:
        wrong = [s for found in pool.map(opens, chunks) for s in found]
    assert not wrong, f"{len(wrong)} acknowledged secrets do not open to their payload"
    print(
        f"\n{store.name}: acknowledged {len(load.secrets_acked)} secrets and "
        f"{len(load.decisions_acked)} decisions in {LOAD_SECONDS:g} s; log {before.size} -> "
        f"{during.size} (last checkpoint before the kill) -> {after.size} after the restart "
        f"({in_flight} committed whose answer the kill cut off); the kill's errors: "
        f"{sorted({str(e).rpartition(': ')[2] for _, _, e in load.errors})}"
    )


def idle_keep_alive(plane: RunningControlPlane) -> ssl.SSLSocket:
    """A TLS connection that made one keep-alive request and is then left idle, never
    read again (so it never answers the server's TLS close), as a client's pool holds it."""
    context = plane.ssl_context()
    host, port = plane.url.removeprefix("https://").split(":")
    connection = context.wrap_socket(
        socket.create_connection((host, int(port))), server_hostname=host
    )
    connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: trustplane\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += connection.recv(4096)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += connection.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"connection: close" not in head.lower()  # kept alive
    return connection


def test_sigterm_with_clients_connected_stops_cleanly(
    store: StateStore, tmp_path: Path, planes: list[RunningControlPlane]
) -> None:
    """SIGTERM while writers are busy and a client holds an idle keep-alive connection:
    the server exits on its own with status 0 while that client is still connected
    (it used to wait for the client's TLS close, 30 s, then die of the signal), and
    the log it leaves holds everything it acknowledged, whole."""
    data, first, auditor, before, load = start_with_a_log(store, tmp_path, planes)
    idle = idle_keep_alive(first)

    def terminate(pid: int) -> None:
        os.kill(pid, signal.SIGTERM)  # the server alone, as a service manager stops it
        while first.process.returncode() is None:
            time.sleep(0.05)  # however long it takes: pytest's timeout is the bound

    stopped_at = load.run_and_end(LOAD_SECONDS, terminate)
    assert first.process.returncode() == 0, first.process.log_tail()
    # The idle client was still connected when the server exited; its connection is gone.
    assert idle.fileno() != -1
    try:
        assert idle.recv(4096) == b""
    except (ssl.SSLError, OSError):
        pass  # aborted: no TLS close on a connection that had nothing in flight
    finally:
        idle.close()
    early = [(who, repr(exc)) for when, who, exc in load.errors if when < stopped_at]
    assert not early, early
    assert load.decisions_acked
    assert load.secrets_acked

    second = start_control_plane(
        tmp_path / "run-2", data_dir=data, admin_password=first.admin_password
    )
    planes.append(second)
    with second.admin() as admin:
        check_log_after_restart(store, admin, auditor, load, before)


def check_log_after_restart(
    store: StateStore, admin: ControlClient, auditor: LogAuditor, load: Load, before: Checkpoint
) -> tuple[Checkpoint, int, list[tuple[int, bytes]]]:
    """Everything acknowledged is in the log, which the database and the signed root agree
    on; returns (the new checkpoint, entries committed whose answer was cut off, leaves)."""
    assert LogAuditor.pin(admin) == auditor, "the log's key changed across the restart"
    after = auditor.checkpoint(admin)
    acked_indices = [index for index, _ in load.decisions_acked]
    assert len(set(acked_indices)) == len(acked_indices)
    assert max(acked_indices) < after.size
    acked = len(load.secrets_acked) + len(load.decisions_acked)
    in_flight = after.size - before.size - acked  # committed, answer lost in the kill
    assert in_flight >= 0, f"{-in_flight} acknowledged log entries are missing"
    during = load.checkpoints[-1]
    assert after.size >= during.size
    # Histories the end interrupted: both proved to be prefixes of the new log.
    auditor.check_consistent(admin, before, after)
    auditor.check_consistent(admin, during, after)

    # The log as the database holds it hashes to the signed root, on its own.
    leaves = store.leaves()
    assert [index for index, _ in leaves] == list(range(after.size))
    assert merkle.root_of([merkle.leaf_hash(body) for _, body in leaves]) == after.root
    entries = {index: json.loads(body) for index, body in leaves}
    for index, resource in load.decisions_acked:
        entry = entries[index]
        assert (entry["kind"], entry["resource"], entry["decision"]) == (
            "authorize",
            resource,
            "allow",
        ), (index, entry)
    stored = {e["secret"] for e in entries.values() if e["kind"] == "kms.store"}
    assert {secret_id for secret_id, _ in load.secrets_acked} <= stored
    return after, in_flight, leaves
