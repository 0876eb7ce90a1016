"""The transparency log, audited the way an outsider would: `trustplane log verify`.

KMS releases, authorization decisions and image registrations are entries;
the CLI checks the signed checkpoint, its consistency with the one it kept
from an earlier run, and the inclusion of chosen entries. Then history is
rewritten where an insider would do it, in the database of a stopped
server, and the next `log verify` says so: exit code 5, one line.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import start_control_plane_or_fail
from control_helpers import Cli, assert_fails, entries_since
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from durability_helpers import StateStore, fresh_schema, sqlite_store, write_server_config

from trustplane.api.images import LayerRecord
from trustplane.client import ControlClient
from trustplane.embedded.control_plane import RunningControlPlane, start_control_plane
from trustplane.embedded.process import free_port
from trustplane.errors import ExitCode, Forbidden, UnavailableError
from trustplane.trust.note import NoteSigner


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningControlPlane]:
    server = start_control_plane_or_fail(tmp_path_factory.mktemp("transparency"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def admin_client(plane: RunningControlPlane) -> Iterator[ControlClient]:
    client = plane.admin()
    yield client
    client.close()


@pytest.fixture(scope="module")
def auditor(plane: RunningControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Cli:
    directory = tmp_path_factory.mktemp("auditor")
    cli = Cli(directory / "session.json", directory / "log-state.json")
    cli.login(plane, "admin", plane.admin_password)
    return cli


# -- an independent reading of the log -------------------------------------------------------


def mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 section 2.1.1, written out from the RFC (not trustplane's merkle module)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    split = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + mth(leaves[:split]) + mth(leaves[split:])).digest()


def checkpoint(client: ControlClient) -> tuple[str, int, bytes]:
    """(origin, size, root) from the signed note's text (C2SP tlog-checkpoint lines)."""
    origin, size, root = client.checkpoint().decode().split("\n")[:3]
    return origin, int(size), base64.b64decode(root)


def make_entries(admin: ControlClient, plane: RunningControlPlane) -> dict[str, int]:
    """One entry of each kind the issue names; returns kind -> log index."""
    user = f"writer-{os.urandom(3).hex()}"
    password = base64.urlsafe_b64encode(os.urandom(18)).decode()
    admin.create_user(user, "user", password)
    with plane.client() as writer:
        writer.login(user, password)
        secret = writer.create_secret(os.urandom(32), secret_type="opaque")
        start = writer.health().log_size
        writer.secret_payload(secret.id)
    with pytest.raises(Forbidden):
        admin.secret_payload(secret.id)  # admins manage secrets, they do not read them
    releases = [e for e in entries_since(admin, start) if e["kind"] == "kms.release"]
    assert [(e["subject"], e["decision"]) for e in releases] == [
        (f"user:{user}", "allow"),
        ("user:admin", "deny"),
    ]
    assert all(e["resource"] == f"secret:{secret.id}" for e in releases)
    decision = admin.authorize("container.start", "container:web", subject=("user", user))
    assert decision.decision == "deny"
    digests = ["sha256:" + hashlib.sha256(os.urandom(8)).hexdigest() for _ in range(2)]
    registered = admin.register_image(
        "registry.example/audit/app",
        "sha256:" + hashlib.sha256(os.urandom(8)).hexdigest(),
        [LayerRecord(index=i, digest=d, encrypted=i == 1) for i, d in enumerate(digests)],
    )
    return {
        "kms.release": releases[0]["index"],
        "kms.release.deny": releases[1]["index"],
        "authorize": int(decision.log_index),
        "image.register": int(registered.log_index),
    }


# -- the log as it should be -----------------------------------------------------------------


def test_every_kind_of_entry_is_proved_by_log_verify(
    plane: RunningControlPlane, admin_client: ControlClient, auditor: Cli
) -> None:
    indexes = make_entries(admin_client, plane)
    for kind, index in indexes.items():
        assert json.loads(admin_client.log_entry(index))["kind"] == kind.removesuffix(".deny")

    wanted = sorted(indexes.values())
    first = auditor("log", "verify", *[f"--entry={i}" for i in wanted])
    assert first.returncode == 0, first.stderr
    origin, size, root = checkpoint(admin_client)
    assert f"checkpoint: {size} entries, root {root.hex()}, signature valid" in first.stdout
    assert "consistent with" not in first.stdout  # nothing kept yet: this run starts the record
    printed = {
        int(line.split()[1]): json.loads(line.split(" included: ", 1)[1])
        for line in first.stdout.splitlines()
        if line.startswith("entry ")
    }
    assert sorted(printed) == wanted
    for index in wanted:
        assert printed[index] == json.loads(admin_client.log_entry(index))

    # The root the CLI accepted is the RFC 9162 hash of exactly these leaves, in this order.
    bodies = [admin_client.log_entry(i) for i in range(size)]
    assert mth(bodies) == root
    state = json.loads(auditor.log_state.read_text())  # type: ignore[union-attr]
    assert state[plane.url]["size"] == size
    assert base64.b64decode(state[plane.url]["root"]) == root
    assert state[plane.url]["verifier_key"] == admin_client.log_key().verifier_key
    assert origin == admin_client.log_key().origin

    # More entries, a second run: the new tree is proved an extension of the kept one.
    later = admin_client.authorize("image.pull", "image:registry.example/audit/app")
    second = auditor("log", "verify", "--entry", str(later.log_index))
    assert second.returncode == 0, second.stderr
    assert f"consistent with the checkpoint verified before ({size} entries)" in second.stdout
    assert f"entry {later.log_index} included: " in second.stdout
    _, new_size, _ = checkpoint(admin_client)
    assert new_size > size
    assert json.loads(auditor.log_state.read_text())[plane.url]["size"] == new_size  # type: ignore[union-attr]


def test_a_wrong_verifier_key_fails(
    plane: RunningControlPlane, admin_client: ControlClient, auditor: Cli
) -> None:
    admin_client.authorize("image.pull", "image:anything")
    assert auditor("log", "verify").returncode == 0
    kept = auditor.log_state.read_bytes()  # type: ignore[union-attr]

    # Another key under the log's own name: an impostor log, or a swapped key.
    impostor = NoteSigner(admin_client.log_key().origin, Ed25519PrivateKey.generate())
    wrong = auditor("log", "verify", "--key", impostor.verifier_key())
    assert_fails(wrong, ExitCode.INTEGRITY, "no signature from a trusted key")

    # The key pinned on first use no longer matches what the server publishes.
    state = json.loads(kept)
    state[plane.url]["verifier_key"] = impostor.verifier_key()
    auditor.log_state.write_text(json.dumps(state))  # type: ignore[union-attr]
    changed = auditor("log", "verify")
    assert_fails(changed, ExitCode.INTEGRITY, "signing key changed since it was pinned")
    auditor.log_state.write_bytes(kept)  # type: ignore[union-attr]
    assert auditor("log", "verify").returncode == 0


def test_the_proof_api_refuses_nonsense(
    plane: RunningControlPlane, admin_client: ControlClient
) -> None:
    _, size, _ = checkpoint(admin_client)
    headers = {"Authorization": f"Bearer {admin_client.token}"}

    def get(path: str, **params: int) -> httpx.Response:
        return httpx.get(
            f"{plane.url}/v1/log/proof/{path}",
            params=params,
            headers=headers,
            verify=plane.ssl_context(),
            timeout=10,
        )

    assert get("inclusion", index=0, size=size).status_code == 200
    assert get("consistency", old=1, new=size).status_code == 200
    for path, params in [
        ("inclusion", {"index": size - 1, "size": size - 1}),  # index >= size
        ("inclusion", {"index": 3, "size": 2}),
        ("inclusion", {"index": 0, "size": size + 1}),  # past the end of the log
        ("consistency", {"old": 3, "new": 2}),  # old > new
        ("consistency", {"old": 1, "new": size + 1}),
    ]:
        response = get(path, **params)
        assert response.status_code == 400, (path, params, response.text)
        error = response.json()["error"]
        assert error["type"] == "UsageError"
        assert "proof" in error["message"]
    assert get("inclusion", index=-1, size=size).status_code == 422
    assert get("consistency", old=0, new=size).status_code == 422
    anonymous = httpx.get(
        f"{plane.url}/v1/log/proof/inclusion",
        params={"index": 0, "size": 1},
        verify=plane.ssl_context(),
    )
    assert anonymous.status_code == 401


# -- history rewritten in the database -------------------------------------------------------


class Restartable:
    """A server of its own that a test stops, edits on disk, and starts again where it was."""

    def __init__(self, work: Path, store: StateStore | None = None) -> None:
        self.work = work
        self.port = free_port()
        self.store = store or sqlite_store(work / "data")
        if self.store.database_url is not None:
            write_server_config(work / "data", database_url=self.store.database_url)
        self.plane = start_control_plane_or_fail(work, port=self.port)
        self.auditor = Cli(work / "session.json", work / "log-state.json")
        self.auditor.login(self.plane, "admin", self.plane.admin_password)

    @contextlib.contextmanager
    def edit(self) -> Iterator[Any]:
        """Edit the database behind the server's back (running or not), as
        someone with access to it would; committed when the block ends."""
        db = self.store.connect()
        try:
            yield db
            db.commit()
        finally:
            db.close()

    @contextlib.contextmanager
    def offline(self) -> Iterator[Any]:
        """Stop the server and edit its database."""
        self.plane.stop()
        with self.edit() as db:
            yield db

    def start(self) -> None:
        self.plane = start_control_plane(
            self.work,
            data_dir=self.plane.data_dir,
            port=self.port,
            admin_password=self.plane.admin_password,
        )

    def restart(self) -> None:
        self.plane.stop()
        self.start()

    def health(self) -> dict[str, Any]:
        answer = httpx.get(f"{self.plane.url}/healthz", verify=self.plane.ssl_context(), timeout=10)
        assert answer.status_code == 200
        health: dict[str, Any] = answer.json()
        return health

    def stop(self) -> None:
        self.plane.stop()


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[Restartable]:
    server = Restartable(tmp_path)
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StateStore:
    if request.param == "sqlite":
        return sqlite_store(tmp_path / "data")
    return fresh_schema(request.getfixturevalue("postgres"), "audit")


def forge_release(db: Any, index: int) -> None:
    """Turn a refused release into a granted one in the stored entry, not in the tree."""
    mark = "?" if isinstance(db, sqlite3.Connection) else "%s"
    select = f'SELECT body FROM log_leaves WHERE "index" = {mark}'  # noqa: S608
    (body,) = db.execute(select, (index,)).fetchone()
    entry = json.loads(bytes(body))
    assert entry["decision"] == "deny"
    entry.update(decision="allow", reason="allowed by rule 1")
    forged = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
    update = f'UPDATE log_leaves SET body = {mark} WHERE "index" = {mark}'  # noqa: S608
    assert db.execute(update, (forged, index)).rowcount == 1


def test_an_altered_entry_is_named_by_the_audit_and_the_server_then_signs_nothing(
    tmp_path: Path, store: StateStore
) -> None:
    server = Restartable(tmp_path, store)
    try:
        with server.plane.admin() as admin:
            indexes = make_entries(admin, server.plane)
            make_entries(admin, server.plane)
        target = indexes["kms.release.deny"]
        witness = server.auditor("log", "verify", "--audit")
        assert witness.returncode == 0, witness.stderr
        assert "the tree they make is the signed one" in witness.stdout

        with server.edit() as db:  # the server keeps running
            forge_release(db, target)
        with server.plane.admin() as admin:
            assert json.loads(admin.log_entry(target))["decision"] == "allow"  # the server lies
        # A checkpoint and its consistency do not see it: the stored tree is intact.
        plain = server.auditor("log", "verify")
        assert plain.returncode == 0, plain.stderr
        caught = server.auditor("log", "verify", "--entry", str(target))
        assert_fails(
            caught, ExitCode.INTEGRITY, f"entry {target} is not included in the signed tree"
        )
        # The monitor fetches everything and names the entry without being told.
        audit = server.auditor("log", "verify", "--audit")
        assert_fails(
            audit,
            ExitCode.INTEGRITY,
            f"audit: entry {target} does not fit the signed checkpoint",
        )

        # Restarted, the server finds it itself and will vouch for nothing more.
        with server.plane.admin() as admin:
            _, size, _ = checkpoint(admin)
        server.restart()
        health = server.health()
        assert health["status"] == "degraded"
        assert health["log_error"] == (
            f"entry {target} does not match the stored tree (its leaf hash)"
        )
        assert health["log_size"] == size
        log_text = server.plane.process.log_file.read_text(errors="replace")
        assert f"entry {target} does not match the stored tree" in log_text
        refused = httpx.get(
            f"{server.plane.url}/v1/log/checkpoint", verify=server.plane.ssl_context(), timeout=10
        )
        assert refused.status_code == 503
        assert f"entry {target}" in refused.json()["error"]["message"]
        with (
            pytest.raises(UnavailableError, match=f"entry {target}"),
            server.plane.admin() as admin,
        ):
            admin.authorize("image.pull", "image:registry.example/audit/app")
        assert server.health()["log_size"] == size  # nothing appended
        verify = server.auditor("log", "verify")
        assert_fails(verify, ExitCode.UNAVAILABLE, f"entry {target} does not match")
    finally:
        server.stop()


def test_rewritten_tree_nodes_or_head_fail_consistency(restartable: Restartable) -> None:
    with restartable.plane.admin() as admin:
        make_entries(admin, restartable.plane)
        kept = restartable.auditor("log", "verify")
        assert kept.returncode == 0, kept.stderr
        _, old, _ = checkpoint(admin)
        make_entries(admin, restartable.plane)
        _, new, _ = checkpoint(admin)
        proof = set(admin.consistency_proof(old, new))
    assert new > old
    assert proof

    # Rewrite one stored inner subtree hash that the consistency proof is made
    # of (the server checks leaves and head at start, not every inner node).
    with restartable.offline() as db:
        rows = db.execute('SELECT level, "index", hash FROM log_nodes WHERE level > 0').fetchall()
        level, index, original = next(row for row in rows if bytes(row[2]) in proof)
        forged = hashlib.sha256(b"rewritten" + bytes(original)).digest()
        db.execute(
            'UPDATE log_nodes SET hash = ? WHERE level = ? AND "index" = ?',
            (forged, level, index),
        )
    restartable.start()
    assert restartable.health()["log_error"] is None
    caught = restartable.auditor("log", "verify")
    assert_fails(
        caught,
        ExitCode.INTEGRITY,
        f"is not an extension of the one verified at {old}: its history was rewritten",
    )

    # Put the row back: the same log verifies again, so that row was the whole difference.
    with restartable.offline() as db:
        db.execute(
            'UPDATE log_nodes SET hash = ? WHERE level = ? AND "index" = ?',
            (original, level, index),
        )
    restartable.start()
    restored = restartable.auditor("log", "verify", "--audit")
    assert restored.returncode == 0, restored.stderr
    assert f"consistent with the checkpoint verified before ({old} entries)" in restored.stdout

    # Rewrite the head: the server no longer signs it, and says why.
    with restartable.offline() as db:
        assert db.execute("UPDATE log_head SET root = ? WHERE id = 1", (b"\x42" * 32,)).rowcount
    restartable.start()
    health = restartable.health()
    assert health["status"] == "degraded"
    assert "the stored tree head does not match" in health["log_error"]
    head = restartable.auditor("log", "verify")
    assert_fails(head, ExitCode.UNAVAILABLE, "the stored tree head does not match")
