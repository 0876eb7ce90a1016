"""The control plane as a real server: service, identity, policy, KMS.

Everything goes through HTTPS to a `trustplane server` process started with
nothing but a data directory, as an operator would run it.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import ssl
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwcrypto import jwk

from trustplane.api.images import LayerRecord
from trustplane.client import ControlClient
from trustplane.crypto.node_assertion import make_node_assertion
from trustplane.embedded.control_plane import RunningControlPlane, start_control_plane
from trustplane.embedded.tls import CertificateAuthority, issue_server_cert
from trustplane.errors import (
    AuthError,
    Forbidden,
    IntegrityError,
    MalformedError,
    NotFoundError,
    UnavailableError,
    UsageError,
)


def test_service_basics(control_plane: RunningControlPlane) -> None:
    verify = control_plane.ssl_context()
    health = httpx.get(f"{control_plane.url}/healthz", verify=verify).json()
    assert health["status"] == "ok"
    assert health["kek"] == "file"
    spec = httpx.get(f"{control_plane.url}/openapi.json", verify=verify).json()
    assert {"/v1/secrets", "/v1/authorize", "/v1/unwrap", "/v1/log/checkpoint"} <= set(
        spec["paths"]
    )
    metrics = httpx.get(f"{control_plane.url}/metrics", verify=verify).text
    assert "trustplane_http_requests_total" in metrics
    with pytest.raises(httpx.ConnectError):  # TLS only, and only with the CA
        httpx.get(f"{control_plane.url}/healthz", verify=True)
    data = control_plane.data_dir
    assert (data / "kek.json").stat().st_mode & 0o777 == 0o600
    assert data.stat().st_mode & 0o777 == 0o700
    db = sqlite3.connect(data / "trustplane.db")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_tokens_are_short_lived_es256_jwts(control_plane: RunningControlPlane) -> None:
    with control_plane.client() as client:
        answer = client.login("admin", control_plane.admin_password)
        header, claims = (
            json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
            for part in answer.access_token.split(".")[:2]
        )
        assert header["alg"] == "ES256"
        assert claims["sub"] == "user:admin"
        assert claims["role"] == "admin"
        assert "kms" in claims["scope"].split()
        assert 0 < claims["exp"] - claims["iat"] <= 900
        with pytest.raises(AuthError, match="wrong user name or password"):
            client.login("admin", "not the password")
    tampered = answer.access_token[:-4] + (
        "AAAA" if not answer.access_token.endswith("AAAA") else "BBBB"
    )
    with control_plane.client(tampered) as client, pytest.raises(AuthError):
        client.whoami()
    with control_plane.client() as client, pytest.raises(AuthError, match="bearer token"):
        client.whoami()


def test_roles_and_deny_by_default(
    admin: ControlClient, control_plane: RunningControlPlane
) -> None:
    created = admin.create_user(f"op-{os.getpid()}", "operator")
    user = admin.create_user(f"user-{os.getpid()}", "user")
    with control_plane.client() as operator:
        operator.login(created.name, created.password)
        assert operator.authorize("container.start", "container:web").decision == "allow"
    with control_plane.client() as normal:
        normal.login(user.name, user.password)
        decision = normal.authorize("container.start", "container:web")
        assert decision.decision == "deny"
        assert "no rule allows" in decision.reason
        with pytest.raises(Forbidden):
            normal.create_user("intruder", "admin")
        with pytest.raises(Forbidden, match="only nodes and admins"):
            normal.authorize("image.pull", "image:x", subject=("user", created.name))
    unknown = admin.authorize("container.start", "container:web", subject=("user", "nobody"))
    assert unknown.decision == "deny"


def test_nodes_authenticate_with_their_key_once_per_assertion(
    admin: ControlClient, control_plane: RunningControlPlane
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    name = f"gw-{os.getpid()}"
    admin.register_node(name, "gateway", public.decode())
    private = jwk.JWK.from_pyca(key)
    audience = control_plane.url + "/v1/auth/token"
    assertion = make_node_assertion(private, name, audience)
    with control_plane.client() as node:
        node.login_node(name, assertion)
        assert node.whoami().subject == f"node:{name}"
        with pytest.raises(AuthError, match="replay"):
            node.login_node(name, assertion)
        impostor = jwk.JWK.from_pyca(ec.generate_private_key(ec.SECP256R1()))
        with pytest.raises(AuthError, match="not signed by its key"):
            node.login_node(name, make_node_assertion(impostor, name, audience))
        with pytest.raises(AuthError, match="not registered"):
            node.login_node("ghost", make_node_assertion(private, "ghost", audience))


def test_policy_reloads_without_restart_and_keeps_the_last_good_one(
    admin: ControlClient, control_plane: RunningControlPlane
) -> None:
    user = admin.create_user(f"reload-{os.getpid()}", "user")
    policy = control_plane.data_dir / "policy.yaml"
    original = policy.read_text()
    with control_plane.client() as client:
        client.login(user.name, user.password)
        assert client.authorize("container.stop", "container:db").decision == "deny"
        try:
            policy.write_text(
                original
                + f"""  - subjects: ["user:{user.name}"]
    actions: [container.stop]
    resources: ["container:db"]
"""
            )
            _eventually(
                lambda: client.authorize("container.stop", "container:db").decision == "allow"
            )
            policy.write_text(
                "version: 1\nrules:\n  - roles: [user]\n    actions: [no.such.action]\n"
            )
            _eventually(
                lambda: (
                    httpx.get(
                        f"{control_plane.url}/healthz", verify=control_plane.ssl_context()
                    ).json()["policy_error"]
                    is not None
                )
            )
            assert client.authorize("container.stop", "container:db").decision == "allow"
        finally:
            policy.write_text(original)
        _eventually(lambda: client.authorize("container.stop", "container:db").decision == "deny")


def test_kms_releases_payloads_only_to_acl_and_policy(
    admin: ControlClient, control_plane: RunningControlPlane
) -> None:
    alice = admin.create_user(f"alice-{os.getpid()}", "user")
    bob = admin.create_user(f"bob-{os.getpid()}", "user")
    with control_plane.client() as a, control_plane.client() as b:
        a.login(alice.name, alice.password)
        b.login(bob.name, bob.password)
        payload = os.urandom(48)
        ref = a.create_secret(payload, name="volume key", secret_type="opaque")
        assert ref.secret_ref == f"{control_plane.url}/v1/secrets/{ref.id}"
        assert a.secret_payload(ref.id) == payload
        assert a.secret(ref.id).creator == f"user:{alice.name}"
        with pytest.raises(NotFoundError):  # not on the ACL: it does not exist for bob
            b.secret(ref.id)
        with pytest.raises(Forbidden, match="not on the ACL"):
            b.secret_payload(ref.id)
        with pytest.raises(Forbidden, match="not on the ACL"):  # admins manage, they do not read
            admin.secret_payload(ref.id)
        shared = a.create_secret(payload, readers=[f"user:{bob.name}"], secret_type="opaque")
        assert b.secret_payload(shared.id) == payload
        generated = a.create_secret()
        assert len(a.secret_payload(generated.id)) == 32
        a.delete_secret(ref.id)
        with pytest.raises(NotFoundError):
            a.secret_payload(ref.id)
        with pytest.raises(UsageError):
            a.secret_payload("not-a-uuid")

    # Sealed at rest, and never in the server's logs.
    database = (control_plane.data_dir / "trustplane.db").read_bytes()
    wal = control_plane.data_dir / "trustplane.db-wal"
    stored = database + (wal.read_bytes() if wal.exists() else b"")
    log = control_plane.process.log_file.read_bytes()
    for form in (payload, base64.b64encode(payload), payload.hex().encode()):
        assert form not in stored
        assert form not in log


def _eventually(condition: object, timeout: float = 5.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        time.sleep(0.1)


def test_cli_login_and_secret_round_trip(
    control_plane: RunningControlPlane, tmp_path: Path
) -> None:
    import subprocess
    import sys

    env = {**os.environ, "TRUSTPLANE_SESSION": str(tmp_path / "session.json")}

    def tp(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "trustplane", *args],
            capture_output=True,
            text=True,
            env=env,
            input=stdin,
            timeout=60,
        )

    login = tp(
        "login",
        "--server",
        control_plane.url,
        "--ca",
        str(control_plane.ca_file),
        "--password-stdin",
        stdin=control_plane.admin_password + "\n",
    )
    assert login.returncode == 0, login.stderr
    assert (tmp_path / "session.json").stat().st_mode & 0o777 == 0o600
    created = tp("secret", "create", "--name", "cli")
    assert created.returncode == 0, created.stderr
    secret_id = created.stdout.strip().rsplit("/", 1)[-1]
    shown = tp("secret", "show", secret_id)
    assert json.loads(shown.stdout)["name"] == "cli"
    payload = subprocess.run(
        [sys.executable, "-m", "trustplane", "secret", "payload", secret_id],
        capture_output=True,
        env=env,
        timeout=60,
    )
    assert len(payload.stdout) == 32
    denied = tp("authorize", "container.start", "container:x", "--subject", "user:nobody")
    assert denied.returncode == 4
    assert json.loads(denied.stdout)["decision"] == "deny"


def test_operator_certificates_and_a_credential_printed_once(
    tmp_path: Path, test_ca: CertificateAuthority
) -> None:
    """An operator's own certificate replaces the embedded CA; a restart
    neither prints nor changes the admin credential."""
    cert = issue_server_cert(test_ca, tmp_path / "tls", "control")
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "server.yaml").write_text(
        f"tls:\n  cert_file: {cert.cert_file}\n  key_file: {cert.key_file}\n"
    )
    (data / "tls").mkdir()
    (data / "tls" / "ca.pem").write_bytes(test_ca.cert_file.read_bytes())  # what the starter pins
    first = start_control_plane(tmp_path / "first", data_dir=data)
    try:
        served = ssl.get_server_certificate(("127.0.0.1", int(first.url.rsplit(":", 1)[1])))
        assert served.strip() == cert.cert_file.read_text().strip()
        assert not (data / "tls" / "server.pem").exists()  # no embedded CA was made
    finally:
        first.stop()
    second = start_control_plane(
        tmp_path / "second", data_dir=data, admin_password=first.admin_password
    )
    try:
        assert "one-time credential" not in second.process.log_file.read_text()
        with second.admin() as admin:
            assert admin.whoami().subject == "user:admin"
    finally:
        second.stop()


def test_requests_the_validators_refuse_get_one_clear_error(
    control_plane: RunningControlPlane,
) -> None:
    """FastAPI's own refusals use the same {"error": ...} shape as ours, so
    the CLI shows what was wrong instead of "HTTP 422"."""
    with control_plane.admin() as admin:
        with pytest.raises(MalformedError, match=r"body\.manifest_digest: String should match"):
            admin.register_image("registry.test/clear/errors", "md5:nope", [])
        assert admin.images("registry.test/clear/errors") == []  # nothing stored
        verify = control_plane.ssl_context()
        headers = {"Authorization": f"Bearer {admin.token}", "Content-Type": "application/json"}
        broken = httpx.post(
            f"{control_plane.url}/v1/images",
            content=b'{"repository": ',
            headers=headers,
            verify=verify,
        )
        assert broken.status_code == 422
        assert broken.json()["error"]["type"] == "MalformedError"
        assert broken.json()["error"]["message"].startswith("invalid request: body: not valid JSON")
        missing = httpx.get(f"{control_plane.url}/v1/no-such-route", verify=verify)
        assert missing.status_code == 404
        assert missing.json() == {"error": {"type": "NotFoundError", "message": "Not Found"}}


def test_the_log_origin_is_fixed_at_the_first_start(tmp_path: Path) -> None:
    """Replicas on other hosts sign the same log name: it comes from the
    database, and a configuration that contradicts it is refused."""
    first = start_control_plane(tmp_path / "a", env={"TRUSTPLANE_LOG_ORIGIN": "example.test/log"})
    data, password = first.data_dir, first.admin_password
    first.stop()
    again = start_control_plane(tmp_path / "b", data_dir=data, admin_password=password)
    try:
        with again.admin() as admin:
            assert admin.log_key().origin == "example.test/log"
            assert admin.checkpoint().decode().split("\n")[0] == "example.test/log"
    finally:
        again.stop()
    with pytest.raises(
        UnavailableError, match=r"differs from the log's origin 'example\.test/log'"
    ):
        start_control_plane(
            tmp_path / "c",
            data_dir=data,
            admin_password=password,
            env={"TRUSTPLANE_LOG_ORIGIN": "other.test/log"},
            timeout=20,
        )


def test_an_encrypted_layer_claimed_by_another_publisher_is_refused(
    control_plane: RunningControlPlane,
) -> None:
    """Unwrap follows the first registration of a layer digest: a publisher
    who registered someone else's layer first must not decide who gets its key."""
    secret_layer = "sha256:" + os.urandom(32).hex()
    base_layer = "sha256:" + os.urandom(32).hex()
    suffix = os.urandom(3).hex()

    def layers(encrypted: bool) -> list[LayerRecord]:
        return [
            LayerRecord(index=0, digest=base_layer, encrypted=False),
            LayerRecord(index=1, digest=secret_layer, encrypted=encrypted),
        ]

    def manifest() -> str:
        return "sha256:" + os.urandom(32).hex()

    with control_plane.admin() as admin:
        mallory = admin.create_user(f"mallory-{suffix}", "operator")
        with control_plane.client() as other:
            other.login(mallory.name, mallory.password)
            other.register_image(f"registry.test/mallory-{suffix}/app", manifest(), layers(False))
            # Its own mirror of the same layers: the same publisher, allowed.
            other.register_image(f"mirror.test/mallory-{suffix}/app", manifest(), layers(True))
        victim = f"registry.test/victim-{suffix}/app"
        with pytest.raises(
            IntegrityError, match=r"already registered under .* by another publisher"
        ):
            admin.register_image(victim, manifest(), layers(True))
        assert admin.images(victim) == []  # nothing stored
        # A shared plain base layer is no claim on anything.
        admin.register_image(victim, manifest(), [layers(True)[0]])
        assert len(admin.images(victim)) == 1
