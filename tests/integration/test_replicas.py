"""Two `trustplane server` replicas against one PostgreSQL both serve correctly.

Each replica has its own data directory (and so its own TLS CA and policy
file) but the same `database_url` and the same KEK file, as an operator
would run two instances behind a load balancer. They are started at the
same moment against an empty database: one migrates under the advisory
lock, the other waits; one creates the first admin and prints its
credential, the other does not. After that a token from one is accepted by
the other (the signing key is in the database), a secret stored through one
is released by the other, and the log they append to concurrently stays one
log: no index given twice, no append lost, and checkpoints from either
replica prove consistent with each other and include each other's entries.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from durability_helpers import LogAuditor, StateStore, fresh_schema, write_server_config

from trustplane.embedded.control_plane import RunningControlPlane, start_control_plane
from trustplane.embedded.postgres import RunningPostgres
from trustplane.errors import NotFoundError
from trustplane.trust import merkle

CREDENTIAL = re.compile(r"one-time credential: (\S+)")
LOAD_THREADS = 8
LOAD_SECONDS = 3.0
RACE_ROUNDS = 4
# The starter reads the credential from a first start's output; with two
# replicas only one prints it, so both are started as if it were known and
# the logs are read afterwards.
NOT_YET_KNOWN = "credential-not-read-yet"


@pytest.fixture
def planes() -> Iterator[list[RunningControlPlane]]:
    started: list[RunningControlPlane] = []
    yield started
    for plane in started:
        plane.stop()


def start_replicas_together(
    directory: Path, store: StateStore, started: list[RunningControlPlane]
) -> tuple[RunningControlPlane, RunningControlPlane]:
    """Two replicas started at the same moment; the admin credential read from their logs."""
    shared = directory / "shared"
    shared.mkdir(parents=True, mode=0o700)
    kek = shared / "kek.json"
    barrier = threading.Barrier(2)
    results: dict[str, RunningControlPlane | BaseException] = {}

    def start(name: str) -> None:
        data = directory / name / "data"
        write_server_config(data, database_url=store.database_url, kek_file=kek)
        barrier.wait()
        try:
            results[name] = start_control_plane(
                directory / name, data_dir=data, admin_password=NOT_YET_KNOWN
            )
        except BaseException as exc:
            results[name] = exc

    threads = [threading.Thread(target=start, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    planes = [results.get(name) for name in ("a", "b")]
    started.extend(p for p in planes if isinstance(p, RunningControlPlane))
    for name, plane in zip("ab", planes, strict=True):
        assert isinstance(plane, RunningControlPlane), f"replica {name} did not come up: {plane}"
    a, b = (p for p in planes if isinstance(p, RunningControlPlane))

    printed = [
        match.group(1)
        for plane in (a, b)
        for match in CREDENTIAL.finditer(plane.process.log_file.read_text(errors="replace"))
    ]
    assert len(printed) == 1, f"{len(printed)} replicas printed an admin credential"
    a = dataclasses.replace(a, admin_password=printed[0])
    b = dataclasses.replace(b, admin_password=printed[0])
    assert store.count("users") == 1
    assert store.count("alembic_version") == 1
    assert store.count("log_head") == 1
    return a, b


def log_size(plane: RunningControlPlane) -> int:
    health = httpx.get(f"{plane.url}/healthz", verify=plane.ssl_context(), timeout=10).json()
    return int(health["log_size"])


def test_replicas_race_to_start_on_an_empty_database(
    postgres: RunningPostgres, tmp_path: Path
) -> None:
    """Migration, system keys, log head and first admin: each made once, by either replica."""
    for round_ in range(RACE_ROUNDS):
        store = fresh_schema(postgres, "race")
        started: list[RunningControlPlane] = []
        try:
            a, b = start_replicas_together(tmp_path / f"round-{round_}", store, started)
            # One system key of each kind, shared: the same JWKS and log key from both.
            assert store.count("settings", "WHERE key LIKE '%signing_key'") == 2
            with a.admin() as on_a, b.admin() as on_b:
                assert on_a.request("GET", "/v1/auth/jwks").json() == (
                    on_b.request("GET", "/v1/auth/jwks").json()
                )
                assert LogAuditor.pin(on_a) == LogAuditor.pin(on_b)
                assert on_b.whoami().subject == "user:admin"
        finally:
            for plane in started:
                plane.stop()


def test_two_replicas_serve_one_state(
    postgres: RunningPostgres, tmp_path: Path, planes: list[RunningControlPlane]
) -> None:
    store = fresh_schema(postgres, "replicas")
    a, b = start_replicas_together(tmp_path, store, planes)
    assert a.ca_file != b.ca_file  # each replica made its own CA; each client trusts its own

    # A token from A is accepted by B, and the other way round.
    with a.client() as on_a, b.client() as on_b:
        on_a.login("admin", a.admin_password)
        on_b.token = on_a.token
        assert on_b.whoami().subject == "user:admin"
        with b.admin() as from_b, a.client(from_b.token) as with_b_token:
            assert with_b_token.whoami().subject == "user:admin"

        # A secret stored through A is released by B; deleted through B, gone on A.
        payload = secrets.token_bytes(48)
        created = on_a.create_secret(payload, name="shared-volume-key", secret_type="opaque")
        assert on_b.secret(created.id).name == "shared-volume-key"
        assert on_b.secret_payload(created.id) == payload
        on_b.delete_secret(created.id)
        with pytest.raises(NotFoundError):
            on_a.secret(created.id)

        # A user made on A logs in on B; both replicas decide alike for both principals.
        user = on_a.create_user("replica-user", "user")
        with b.client() as user_on_b, a.client() as user_on_a:
            user_on_b.login(user.name, user.password)
            user_on_a.token = user_on_b.token
            for client in (user_on_a, user_on_b):
                answer = client.authorize("container.start", "container:web")
                assert answer.decision == "deny", answer
                assert "no rule allows" in answer.reason
        # A sha512 manifest digest fits (PostgreSQL enforces column lengths).
        sha512 = "sha512:" + "ab" * 64
        on_a.register_image("registry.test/replicas/long", sha512, [])
        assert [i.manifest_digest for i in on_b.images("registry.test/replicas/long")] == [sha512]
        decided = [c.authorize("container.start", "container:web") for c in (on_a, on_b)]
        assert [d.decision for d in decided] == ["allow", "allow"]
        assert decided[0].log_index != decided[1].log_index

        # Both publish the same log key; a checkpoint from A before the load.
        auditor = LogAuditor.pin(on_a)
        assert LogAuditor.pin(on_b) == auditor
        before = auditor.checkpoint(on_a)
        assert before.size == log_size(a) == log_size(b)
        token = on_a.token
    assert token is not None

    # Concurrent appends through both replicas: one sequence, nothing lost or doubled.
    acked: list[tuple[int, str, str]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer(number: int) -> None:
        plane = (a, b)[number % 2]
        try:
            with plane.client(token) as client:
                n = 0
                while not stop.is_set():
                    n += 1
                    resource = f"container:load-{number}-{n}"
                    answer = client.authorize("container.start", resource)
                    acked.append((int(answer.log_index), "ab"[number % 2], resource))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(LOAD_THREADS)]
    for thread in threads:
        thread.start()
    time.sleep(LOAD_SECONDS)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    size = log_size(a)
    assert size == log_size(b)
    indices = [index for index, _, _ in acked]
    assert len(set(indices)) == len(indices), "a log index was handed out twice"
    assert size == before.size + len(acked)
    assert set(indices) == set(range(before.size, size))
    assert {"a", "b"} == {via for _, via, _ in acked}

    with a.client(token) as on_a, b.client(token) as on_b:
        after = auditor.checkpoint(on_b)
        assert after.size == size
        # A's checkpoint from before, B's after: B proves one extends the other, and so does A.
        auditor.check_consistent(on_b, before, after)
        assert on_a.consistency_proof(before.size, after.size) == on_b.consistency_proof(
            before.size, after.size
        )
        # Entries appended through A, read from B and proved included in B's checkpoint.
        via_a = sorted((index, resource) for index, via, resource in acked if via == "a")
        for index, resource in via_a[:: max(1, len(via_a) // 40)]:
            body = on_b.log_entry(index)
            entry = json.loads(body)
            assert (entry["kind"], entry["resource"]) == ("authorize", resource)
            auditor.check_included(on_b, index, body, after)

    # And the database's leaves, hashed independently, give B's signed root.
    leaves = store.leaves()
    assert [index for index, _ in leaves] == list(range(after.size))
    assert merkle.root_of([merkle.leaf_hash(body) for _, body in leaves]) == after.root
    print(
        f"\n{len(acked)} decisions through two replicas in {LOAD_SECONDS:g} s "
        f"({sum(1 for _, via, _ in acked if via == 'a')} via A); log {before.size} -> {after.size}"
    )
