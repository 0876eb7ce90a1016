"""KEK rotation while the KMS serves, with the file KEK and with a real KMIP server.

Rotation makes a new KEK, re-wraps every secret's data key under it and
retires the old KEK once nothing needs it. Readers hammering the KMS
meanwhile must not notice; a restart afterwards must find everything; and
with KMIP, a KEK store that cannot be reached must refuse (503), not guess,
and recover by itself when the store is back.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from conftest import component_missing, start_control_plane_or_fail

from trustplane.client import ControlClient
from trustplane.embedded.control_plane import RunningControlPlane, start_control_plane
from trustplane.embedded.kmip import RunningKmipServer, start_kmip_server
from trustplane.errors import TrustplaneError, UnavailableError
from trustplane.keys.kek_kmip import KmipKekProvider

SECRETS = 50
READERS = 4
ROTATIONS = 3


@dataclass
class Account:
    name: str
    password: str

    def client(self, plane: RunningControlPlane) -> ControlClient:
        client = plane.client()
        client.login(self.name, self.password)
        return client


@dataclass
class Reader:
    """One thread reading payloads in a loop, noting when each read ran and what went wrong."""

    client: ControlClient
    expected: dict[str, bytes]
    offset: int
    reads: list[tuple[float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def loop(self, stop: threading.Event) -> None:
        ids = list(self.expected)
        position = self.offset
        while not stop.is_set():
            secret_id = ids[position % len(ids)]
            position += 1
            began = time.monotonic()
            try:
                payload = self.client.secret_payload(secret_id)
            except Exception as exc:  # every failure counts, expected or not
                self.errors.append(f"{secret_id}: {type(exc).__name__}: {exc}")
                continue
            if payload != self.expected[secret_id]:
                self.errors.append(f"{secret_id}: wrong payload")
            self.reads.append((began, time.monotonic()))


def new_account(admin: ControlClient) -> Account:
    name = f"keeper-{os.urandom(3).hex()}"
    password = base64.urlsafe_b64encode(os.urandom(18)).decode()
    admin.create_user(name, "user", password)
    return Account(name, password)


def kek_ids(database: Path) -> dict[str, str]:
    """secret id -> id of the KEK its data key is wrapped under, read from the server's SQLite."""
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT id, kek_id FROM secrets").fetchall())
    finally:
        db.close()


def health(plane: RunningControlPlane) -> dict[str, object]:
    result: dict[str, object] = httpx.get(
        f"{plane.url}/healthz", verify=plane.ssl_context(), timeout=10
    ).json()
    return result


def wait_for(condition: object, what: str, timeout: float = 30.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- file KEK --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def file_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningControlPlane]:
    server = start_control_plane_or_fail(tmp_path_factory.mktemp("kek-file"))
    yield server
    server.stop()


def test_file_kek_rotates_under_load_and_survives_a_restart(
    file_plane: RunningControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> None:
    plane = file_plane
    with plane.admin() as admin:
        account = new_account(admin)
    with account.client(plane) as owner:
        expected = {
            owner.create_secret(payload, secret_type="opaque").id: payload
            for payload in (os.urandom(32 + i) for i in range(SECRETS))
        }
    kek_file = plane.data_dir / "kek.json"
    old = json.loads(kek_file.read_text())["current"]
    assert set(kek_ids(plane.data_dir / "trustplane.db").values()) == {old}

    stop = threading.Event()
    readers = [
        Reader(account.client(plane), expected, offset=n * SECRETS // READERS)
        for n in range(READERS)
    ]
    threads = [threading.Thread(target=r.loop, args=(stop,), daemon=True) for r in readers]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: all(len(r.reads) >= 10 for r in readers), "readers to warm up")
        with plane.admin() as admin:
            # Three rotations back to back, each retiring the KEK before it: more
            # chances for a read to straddle a re-wrap and a retirement.
            began = time.monotonic()
            answers = [admin.rotate_kek() for _ in range(ROTATIONS)]
            ended = time.monotonic()
        counts = [len(r.reads) for r in readers]
        wait_for(
            lambda: all(len(r.reads) >= c + 10 for r, c in zip(readers, counts, strict=True)),
            "readers to go on after the rotation",
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        for reader in readers:
            reader.client.close()

    assert [e for r in readers for e in r.errors] == []
    during = [(b, e) for r in readers for b, e in r.reads if b < ended and e > began]
    assert during, "no read overlapped the rotation"

    chain = [old] + [answer.kek_id for answer in answers]
    assert len(set(chain)) == ROTATIONS + 1
    for previous, answer in zip(chain, answers, strict=False):
        assert answer.failed == []
        assert answer.retired == [previous]
    answer, new = answers[-1], chain[-1]
    stored = kek_ids(plane.data_dir / "trustplane.db")
    assert answer.rewrapped == len(stored) >= SECRETS  # the server's own keys too
    assert set(stored.values()) == {new}
    keyring = json.loads(kek_file.read_text())
    assert [k["id"] for k in keyring["keys"]] == [new]
    assert keyring["current"] == new
    assert kek_file.stat().st_mode & 0o777 == 0o600
    with plane.admin() as admin:  # the readers' releases come after it: look back for it
        size = admin.health().log_size
        entry = next(
            e
            for e in (json.loads(admin.log_entry(i)) for i in range(size - 1, -1, -1))
            if e["kind"] == "kms.rotate"
        )
    assert (entry["subject"], entry["old"], entry["new"]) == ("user:admin", chain[-2], new)
    assert entry["rewrapped"] == answer.rewrapped

    # A restart reads the new KEK file and the re-wrapped keys: everything still opens.
    plane.stop()
    restarted = start_control_plane(
        tmp_path_factory.mktemp("kek-file-restart"),
        data_dir=plane.data_dir,
        admin_password=plane.admin_password,
    )
    try:
        with account.client(restarted) as owner:
            for secret_id, payload in expected.items():
                assert owner.secret_payload(secret_id) == payload
    finally:
        restarted.stop()


# -- KMIP KEK ---------------------------------------------------------------------------------


@dataclass
class Kmip:
    """The module's PyKMIP server; a test may stop it and start it again in its place."""

    server: RunningKmipServer

    def restart(self) -> None:
        self.server = start_kmip_server(self.server.work_dir, port=self.server.port)


@pytest.fixture(scope="module")
def kmip_holder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kmip]:
    try:
        holder = Kmip(start_kmip_server(tmp_path_factory.mktemp("kek-kmip") / "kmip"))
    except TrustplaneError as exc:
        component_missing("PyKMIP server (pip install pykmip)", str(exc))
    yield holder
    holder.server.stop()


@pytest.fixture(scope="module")
def kmip_plane(
    kmip_holder: Kmip, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningControlPlane]:
    kmip = kmip_holder.server
    work = tmp_path_factory.mktemp("kek-kmip-plane")
    data = work / "data"
    data.mkdir(mode=0o700)
    (data / "server.yaml").write_text(
        "kek: kmip\n"
        "kmip:\n"
        f"  host: {kmip.host}\n"
        f"  port: {kmip.port}\n"
        f"  ca_file: {kmip.ca_file}\n"
        f"  cert_file: {kmip.client_cert}\n"
        f"  key_file: {kmip.client_key}\n"
    )
    try:
        server = start_control_plane(work, data_dir=data)
    except TrustplaneError as exc:
        component_missing("trustplane server with a KMIP KEK", str(exc))
    yield server
    server.stop()


def kmip_versions(kmip: RunningKmipServer) -> tuple[str, ...]:
    """The KEK versions the KMIP server holds for the control plane, asked independently."""
    with KmipKekProvider(
        kmip.host,
        kmip.port,
        ca_file=kmip.ca_file,
        cert_file=kmip.client_cert,
        key_file=kmip.client_key,
        server_name=kmip.server_name,
    ) as provider:
        return provider.known_ids()


def test_kmip_kek_serves_rotates_and_fails_closed(
    kmip_holder: Kmip, kmip_plane: RunningControlPlane
) -> None:
    plane, kmip = kmip_plane, kmip_holder.server
    assert health(plane)["kek"] == "kmip"
    database = plane.data_dir / "trustplane.db"
    assert not (plane.data_dir / "kek.json").exists()  # no key-encryption key on local disk

    with plane.admin() as admin:
        account = new_account(admin)
    with account.client(plane) as owner:
        expected = {
            owner.create_secret(payload, secret_type="opaque").id: payload
            for payload in (os.urandom(40) for _ in range(10))
        }
        for secret_id, payload in expected.items():
            assert owner.secret_payload(secret_id) == payload
        (old,) = kmip_versions(kmip)
        assert old.startswith("kmip:v0001:")
        assert set(kek_ids(database).values()) == {old}

        with plane.admin() as admin:
            answer = admin.rotate_kek()
        new = answer.kek_id
        assert new.startswith("kmip:v0002:")
        assert answer.failed == []
        assert answer.retired == [old]
        assert set(kek_ids(database).values()) == {new}
        assert kmip_versions(kmip) == (new,)  # the old KEK is destroyed on the KMIP server
        for secret_id, payload in expected.items():
            assert owner.secret_payload(secret_id) == payload

        # A secret whose data key this server has not unwrapped yet (so none is cached).
        fresh_payload = os.urandom(40)
        fresh = owner.create_secret(fresh_payload, secret_type="opaque").id
        kmip.stop()
        try:
            with pytest.raises(UnavailableError) as refused:
                owner.secret_payload(fresh)
            message = str(refused.value)
            assert "KMIP server" in message, message
            assert f"{kmip.host}:{kmip.port}" in message, message
            for form in (base64.b64encode(fresh_payload).decode(), fresh_payload.hex()):
                assert form not in message
            with pytest.raises(UnavailableError, match="KMIP server"):
                owner.create_secret(os.urandom(16), secret_type="opaque")
            raw = httpx.get(
                f"{plane.url}/v1/secrets/{fresh}/payload",
                headers={"Authorization": f"Bearer {owner.token}"},
                verify=plane.ssl_context(),
                timeout=60,
            )
            assert raw.status_code == 503
            assert raw.json()["error"]["type"] == "UnavailableError"
            assert fresh_payload not in raw.content
        finally:
            kmip_holder.restart()

        # The KEK store is back on the same address: the server recovers without a restart.
        assert owner.secret_payload(fresh) == fresh_payload
        again = owner.create_secret(b"after the outage", secret_type="opaque").id
        assert owner.secret_payload(again) == b"after the outage"
    assert set(kek_ids(database).values()) == {new}
