"""RegistryClient against the real registry (docker-registry 2.8), all three flavours.

Blobs and manifests go in and come back byte for byte; chunked uploads,
cross-repository mounts, Basic and Bearer authentication, TLS trust, retries
behind a deliberately flaky proxy, constant memory on a 256 MiB blob, and the
digest checks on both sides of the wire.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import random
import signal
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from flaky_proxy import Action, Fault, FlakyProxy
from token_server import TokenServer

import trustplane.oci.registry as registry_module
from trustplane.embedded.registry import RunningRegistry
from trustplane.embedded.tls import create_ca
from trustplane.errors import (
    AuthError,
    IntegrityError,
    NotFoundError,
    TrustplaneError,
    UnavailableError,
)
from trustplane.oci import mediatypes
from trustplane.oci.credentials import Credentials
from trustplane.oci.registry import ATTEMPTS, RegistryClient, RegistryOptions
from trustplane.oci.transport import Endpoint
from trustplane.streaming import Readable

CHUNK = 64 << 10
MIB = 1 << 20
Opener = Callable[[], AbstractContextManager[Readable]]


# -- helpers ------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A running registry and the options that reach it with valid credentials."""

    flavour: str
    registry: RunningRegistry
    options: RegistryOptions

    @property
    def host(self) -> str:
        return self.registry.host

    def client(self, **changes: Any) -> RegistryClient:
        return RegistryClient(self.host, replace(self.options, **changes))


@pytest.fixture(params=["plain", "tls-basic", "token"])
def target(request: pytest.FixtureRequest) -> Target:
    flavour: str = request.param
    if flavour == "plain":
        plain: RunningRegistry = request.getfixturevalue("registry_plain")
        return Target(flavour, plain, RegistryOptions())
    if flavour == "tls-basic":
        tls: RunningRegistry = request.getfixturevalue("registry_tls")
        assert tls.username is not None
        assert tls.password is not None
        credentials = Credentials(tls.username, tls.password)
        return Target(flavour, tls, RegistryOptions(ca_file=tls.ca_file, credentials=credentials))
    server: TokenServer = request.getfixturevalue("token_server")
    token: RunningRegistry = request.getfixturevalue("registry_token")
    credentials = Credentials(server.username, server.password)
    return Target(flavour, token, RegistryOptions(ca_file=token.ca_file, credentials=credentials))


@pytest.fixture
def tls_target(registry_tls: RunningRegistry) -> Target:
    assert registry_tls.username is not None
    assert registry_tls.password is not None
    credentials = Credentials(registry_tls.username, registry_tls.password)
    options = RegistryOptions(ca_file=registry_tls.ca_file, credentials=credentials)
    return Target("tls-basic", registry_tls, options)


@pytest.fixture
def token_target(registry_token: RunningRegistry, token_server: TokenServer) -> Target:
    credentials = Credentials(token_server.username, token_server.password)
    options = RegistryOptions(ca_file=registry_token.ca_file, credentials=credentials)
    return Target("token", registry_token, options)


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the retry schedule (the number of attempts) but not its sleeping."""
    monkeypatch.setattr(registry_module, "BACKOFF", 0.001)


@pytest.fixture
def proxy(registry_plain: RunningRegistry, fast_retries: None) -> Iterator[FlakyProxy]:
    with FlakyProxy(registry_plain.host) as running:
        yield running


def _repo(request: pytest.FixtureRequest, suffix: str = "") -> str:
    """A repository of its own for each test (and parameter)."""
    name = request.node.name.lower()
    cleaned = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    while "--" in cleaned:
        cleaned = cleaned.replace("--", "-")
    return f"client/{cleaned[:60].strip('-')}{suffix}"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _random(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _opener(data: bytes) -> Opener:
    return lambda: contextlib.nullcontext(io.BytesIO(data))


def _fetch(client: RegistryClient, repository: str, digest: str) -> bytes:
    with client.open_blob(repository, digest) as stream:
        return stream.read()


def _push_blob(client: RegistryClient, repository: str, data: bytes) -> str:
    digest = _digest(data)
    client.upload_blob(repository, digest, len(data), _opener(data))
    return digest


def _image(client: RegistryClient, repository: str, seed: int) -> tuple[bytes, str, str]:
    """Push a config and a layer; return (manifest bytes, config digest, layer digest)."""
    layer = _random(200_000, seed)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
        },
        separators=(",", ":"),
    ).encode()
    config_digest = _push_blob(client, repository, config)
    layer_digest = _push_blob(client, repository, layer)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mediatypes.OCI_MANIFEST,
            "config": {
                "mediaType": mediatypes.OCI_CONFIG,
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {"mediaType": mediatypes.OCI_LAYER, "digest": layer_digest, "size": len(layer)}
            ],
        },
        separators=(",", ":"),
    ).encode()
    return manifest, config_digest, layer_digest


def _one_line(exc: pytest.ExceptionInfo[TrustplaneError]) -> str:
    message = str(exc.value)
    assert message
    assert "\n" not in message
    assert "Traceback" not in message
    return message


def _stored_blob(registry: RunningRegistry, digest: str) -> Path:
    hexdigest = digest.partition(":")[2]
    return (
        registry.storage_dir
        / "docker/registry/v2/blobs/sha256"
        / hexdigest[:2]
        / hexdigest
        / "data"
    )


def _open_uploads(registry: RunningRegistry, repository: str) -> list[Path]:
    """Upload sessions that still hold data in the registry's storage.

    Only `data` counts: distribution 2.8 cancels a session on DELETE and then,
    closing the writer, stores its hash state again, which leaves an empty
    `_uploads/<uuid>/hashstates/sha256/0` behind for every cancelled upload.
    """
    uploads = registry.storage_dir / "docker/registry/v2/repositories" / repository / "_uploads"
    return sorted(uploads.glob("*/data"))


def _stale_sizes(registry: RunningRegistry, repository: str) -> list[int]:
    """Sizes of the sessions left holding data.

    A session that a broken request reached in part cannot be deleted: the
    registry answers every request on it with BLOB_UPLOAD_INVALID, and its
    attempt to cancel the session fails on the writer it has just closed, so
    the part stays until upload purging (off in the tests). At most that one
    session may remain; the client must leave no other.
    """
    return [path.stat().st_size for path in _open_uploads(registry, repository)]


# -- push and pull on all three flavours ----------------------------------------


def test_blobs_and_manifests_round_trip(target: Target, request: pytest.FixtureRequest) -> None:
    repository = _repo(request)
    with target.client() as client:
        manifest, config_digest, layer_digest = _image(client, repository, seed=1)
        assert client.has_blob(repository, config_digest)
        assert client.has_blob(repository, layer_digest)
        assert not client.has_blob(repository, _digest(b"never uploaded"))
        pushed = client.put_manifest(repository, "v1", manifest, mediatypes.OCI_MANIFEST)
        assert pushed == _digest(manifest)

    # A fresh client (new connection, new auth) reads exactly what was written.
    with target.client() as client:
        by_tag, media_type = client.get_manifest(repository, "v1")
        by_digest, _ = client.get_manifest(repository, pushed)
        assert by_tag == by_digest == manifest
        assert media_type == mediatypes.OCI_MANIFEST
        assert _fetch(client, repository, layer_digest) == _random(200_000, 1)
        assert _digest(_fetch(client, repository, config_digest)) == config_digest
        with pytest.raises(NotFoundError) as missing:
            client.get_manifest(repository, "no-such-tag")
        assert "no-such-tag" in _one_line(missing)


def test_chunked_upload_stores_exact_bytes(target: Target, request: pytest.FixtureRequest) -> None:
    repository = _repo(request)
    data = _random(MIB + 4321, seed=2)  # the last chunk is a short one
    digest = _digest(data)
    seen: list[int] = []
    with target.client(chunk_size=CHUNK) as client:
        client.upload_blob(repository, digest, len(data), _opener(data), seen.append)
        assert seen == [CHUNK] * 16 + [4321 + MIB - 16 * CHUNK]
    with target.client() as client:
        assert client.has_blob(repository, digest)
        assert hashlib.sha256(_fetch(client, repository, digest)).hexdigest() == digest[7:]
    assert _open_uploads(target.registry, repository) == []


def test_chunked_upload_sends_each_byte_once(
    proxy: FlakyProxy, request: pytest.FixtureRequest
) -> None:
    repository = _repo(request)
    data = _random(MIB, seed=3)
    with RegistryClient(proxy.host, RegistryOptions(chunk_size=CHUNK)) as client:
        digest = _push_blob(client, repository, data)
        assert _fetch(client, repository, digest) == data
    patches = proxy.exchanges("PATCH", "/blobs/uploads/")
    assert [p.content_range for p in patches] == [
        f"{i * CHUNK}-{(i + 1) * CHUNK - 1}" for i in range(MIB // CHUNK)
    ]
    assert proxy.forwarded("PATCH") == MIB
    assert proxy.forwarded("PUT") == 0  # the closing PUT carries only the digest


def test_streamed_upload_is_one_patch_and_an_empty_put(
    proxy: FlakyProxy, request: pytest.FixtureRequest
) -> None:
    """As docker push: the whole blob in one streamed PATCH, then the digest."""
    repository = _repo(request)
    data = _random(MIB, seed=4)
    with RegistryClient(proxy.host) as client:
        digest = _push_blob(client, repository, data)
        assert _fetch(client, repository, digest) == data
    patches = proxy.exchanges("PATCH")
    assert [(e.forwarded, e.content_range, e.status) for e in patches] == [(MIB, None, 202)]
    assert [e.forwarded for e in proxy.exchanges("PUT")] == [0]


# -- cross-repository mount -------------------------------------------------------


def test_mount_links_blob_without_upload(proxy: FlakyProxy, request: pytest.FixtureRequest) -> None:
    source, target_repo = _repo(request, "-src"), _repo(request, "-dst")
    data = _random(300_000, seed=5)
    with RegistryClient(proxy.host) as client:
        digest = _push_blob(client, source, data)
        uploaded = proxy.forwarded("PUT") + proxy.forwarded("PATCH")
        assert not client.has_blob(target_repo, digest)
        assert client.mount_blob(target_repo, digest, source)
        assert client.has_blob(target_repo, digest)
        assert _fetch(client, target_repo, digest) == data
        # A blob the source does not have is not mounted; no session is left open.
        absent = _digest(b"not in the source")
        assert not client.mount_blob(target_repo, absent, source)
        assert not client.has_blob(target_repo, absent)
    assert proxy.forwarded("PUT") + proxy.forwarded("PATCH") == uploaded == len(data)
    mounts = [e for e in proxy.exchanges("POST") if "mount=" in e.path]
    assert [e.status for e in mounts] == [201, 202]
    assert proxy.exchanges("DELETE", "/blobs/uploads/")  # the 202 session was cancelled


def test_mount_on_every_flavour(target: Target, request: pytest.FixtureRequest) -> None:
    source, target_repo = _repo(request, "-src"), _repo(request, "-dst")
    with target.client() as client:
        digest = _push_blob(client, source, _random(50_000, seed=6))
        assert client.mount_blob(target_repo, digest, source)
        assert _digest(_fetch(client, target_repo, digest)) == digest


def test_mount_token_carries_pull_on_source(
    token_target: Target, token_server: TokenServer, request: pytest.FixtureRequest
) -> None:
    source, target_repo = _repo(request, "-src"), _repo(request, "-dst")
    with token_target.client() as client:
        digest = _push_blob(client, source, _random(40_000, seed=7))
        before = len(token_server.issued)
        assert client.mount_blob(target_repo, digest, source)
        assert client.has_blob(target_repo, digest)
    claims = token_server.issued[before]
    granted = {(a["name"], tuple(a["actions"])) for a in claims["access"]}
    assert (source, ("pull",)) in granted
    assert (target_repo, ("pull", "push")) in granted


def test_mount_refused_without_pull_on_source(
    token_target: Target,
    token_server: TokenServer,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """The registry demands pull on the source for a mount: a token without it is refused."""
    source, target_repo = _repo(request, "-src"), _repo(request, "-dst")
    with token_target.client() as client:
        digest = _push_blob(client, source, _random(40_000, seed=8))
    issue = token_server.issue

    def without_source(subject: str, access: list[dict[str, Any]], **kw: Any) -> str:
        return issue(subject, [a for a in access if a["name"] != source], **kw)

    monkeypatch.setattr(token_server, "issue", without_source)
    with token_target.client() as client, pytest.raises(AuthError) as refused:
        client.mount_blob(target_repo, digest, source)
    assert "401" in _one_line(refused)
    monkeypatch.undo()
    with token_target.client() as client:
        assert not client.has_blob(target_repo, digest)


# -- Basic auth -----------------------------------------------------------------------


def test_basic_without_credentials_is_one_line_auth_error(tls_target: Target) -> None:
    with tls_target.client(credentials=None) as client, pytest.raises(AuthError) as refused:
        client.get_manifest("client/anything", "latest")
    message = _one_line(refused)
    assert tls_target.host in message
    assert "credentials" in message


def test_basic_wrong_password_is_auth_error(tls_target: Target) -> None:
    assert tls_target.options.credentials is not None
    wrong = Credentials(tls_target.options.credentials.username, "not-the-password")
    with tls_target.client(credentials=wrong) as client:
        with pytest.raises(AuthError) as refused:
            client.get_manifest("client/anything", "latest")
        assert "401" in _one_line(refused)
        with pytest.raises(AuthError):
            client.upload_blob("client/anything", _digest(b"x"), 1, _opener(b"x"))


def _docker_config(path: Path, key: str, credentials: Credentials) -> Path:
    raw = f"{credentials.username}:{credentials.password}".encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"auths": {key: {"auth": base64.b64encode(raw).decode()}}}
    path.write_text(json.dumps(document))
    return path


def _works_with(target: Target, options: RegistryOptions, repository: str) -> None:
    with RegistryClient(target.host, options) as client:
        digest = _push_blob(client, repository, b"authenticated from an auth file")
        assert client.has_blob(repository, digest)


@pytest.fixture
def no_ambient_auth(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No credentials from the environment: an empty HOME, no auth file variables."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    return home


def test_basic_credentials_from_authfile_option(
    tls_target: Target, no_ambient_auth: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    assert tls_target.options.credentials is not None
    ca_file = tls_target.registry.ca_file
    authfile = _docker_config(
        tmp_path / "auth.json", tls_target.host, tls_target.options.credentials
    )
    options = Endpoint(ca_file=ca_file, authfile=authfile).registry_options(tls_target.host)
    assert options.credentials == tls_target.options.credentials
    _works_with(tls_target, options, _repo(request))

    # Without a file there are no credentials, and the registry says so in one line.
    bare = Endpoint(ca_file=ca_file).registry_options(tls_target.host)
    assert bare.credentials is None
    with RegistryClient(tls_target.host, bare) as client, pytest.raises(AuthError) as refused:
        client.has_blob(_repo(request), _digest(b"x"))
    _one_line(refused)

    # A wrong password in the file is refused like any other.
    wrong = Credentials(tls_target.options.credentials.username, "wrong")
    _docker_config(authfile, f"https://{tls_target.host}", wrong)
    options = Endpoint(ca_file=ca_file, authfile=authfile).registry_options(tls_target.host)
    assert options.credentials == wrong
    with RegistryClient(tls_target.host, options) as client, pytest.raises(AuthError):
        client.has_blob(_repo(request), _digest(b"x"))


def test_basic_credentials_from_env_and_docker_config(
    tls_target: Target,
    no_ambient_auth: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    assert tls_target.options.credentials is not None
    ca_file = tls_target.registry.ca_file
    env_file = _docker_config(
        tmp_path / "env-auth.json", tls_target.host, tls_target.options.credentials
    )
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(env_file))
    options = Endpoint(ca_file=ca_file).registry_options(tls_target.host)
    _works_with(tls_target, options, _repo(request, "-env"))

    monkeypatch.delenv("REGISTRY_AUTH_FILE")
    _docker_config(
        no_ambient_auth / ".docker" / "config.json",
        f"https://{tls_target.host}",
        tls_target.options.credentials,
    )
    options = Endpoint(ca_file=ca_file).registry_options(tls_target.host)
    assert options.credentials == tls_target.options.credentials
    _works_with(tls_target, options, _repo(request, "-home"))


# -- Bearer tokens ----------------------------------------------------------------------


def test_bearer_token_fetched_once_per_scope(
    token_target: Target, token_server: TokenServer, request: pytest.FixtureRequest
) -> None:
    repository = _repo(request)
    before = len(token_server.issued)
    with token_target.client() as client:
        manifest, config_digest, layer_digest = _image(client, repository, seed=9)
        client.put_manifest(repository, "v1", manifest, mediatypes.OCI_MANIFEST)
        push_tokens = len(token_server.issued) - before
        for _ in range(3):
            assert client.has_blob(repository, layer_digest)
        assert client.get_manifest(repository, "v1")[0] == manifest
        assert _digest(_fetch(client, repository, config_digest)) == config_digest
    issued = token_server.issued[before:]
    assert push_tokens == 1, "two uploads and a manifest PUT share one pull,push token"
    assert len(issued) == 2, "every pull request after the first reuses the cached token"
    assert issued[0]["sub"] == token_server.username
    assert issued[0]["access"] == [
        {"type": "repository", "name": repository, "actions": ["pull", "push"]}
    ]
    assert issued[1]["access"] == [{"type": "repository", "name": repository, "actions": ["pull"]}]


def test_bearer_token_for_wrong_repository_is_refused(
    token_target: Target,
    token_server: TokenServer,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    repository = _repo(request)
    issue = token_server.issue

    def other_repository(subject: str, access: list[dict[str, Any]], **kw: Any) -> str:
        return issue(subject, [{**a, "name": "someone/else"} for a in access], **kw)

    monkeypatch.setattr(token_server, "issue", other_repository)
    before = len(token_server.issued)
    with token_target.client() as client, pytest.raises(AuthError) as refused:
        client.get_manifest(repository, "latest")
    message = _one_line(refused)
    assert "401" in message
    assert token_target.host in message
    assert len(token_server.issued) - before == 1, "refused once, not asked again in a loop"
    assert token_server.issued[before]["access"][0]["name"] == "someone/else"


def test_bearer_anonymous_and_wrong_password(
    token_target: Target, token_server: TokenServer, request: pytest.FixtureRequest
) -> None:
    repository = _repo(request)
    # Anonymous: the token server grants nothing, the registry refuses the request.
    with token_target.client(credentials=None) as client, pytest.raises(AuthError) as anonymous:
        client.has_blob(repository, _digest(b"x"))
    _one_line(anonymous)
    wrong = Credentials(token_server.username, "wrong")
    with token_target.client(credentials=wrong) as client, pytest.raises(AuthError) as refused:
        client.get_manifest(repository, "latest")
    assert "refused the credentials" in _one_line(refused)


# -- TLS --------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["tls-basic", "token"])
def test_untrusted_certificate_is_one_clear_error(
    flavour: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    fixture = "registry_tls" if flavour == "tls-basic" else "registry_token"
    registry: RunningRegistry = request.getfixturevalue(fixture)
    other_ca = create_ca(tmp_path / "other-ca", "a CA the registry does not use")
    for options in (RegistryOptions(), RegistryOptions(ca_file=other_ca.cert_file)):
        with (
            RegistryClient(registry.host, options) as client,
            pytest.raises(UnavailableError) as failed,
        ):
            client.has_blob("client/tls", _digest(b"x"))
        message = _one_line(failed)
        assert "TLS" in message
        assert "certificate" in message
        assert registry.host in message


def test_tls_verify_false_still_speaks_https(
    tls_target: Target, request: pytest.FixtureRequest
) -> None:
    repository = _repo(request)
    data = _random(100_000, seed=10)
    with tls_target.client(tls_verify=False, ca_file=None) as client:
        digest = _push_blob(client, repository, data)
        assert client.base == f"https://{tls_target.host}"
        assert _fetch(client, repository, digest) == data
    with tls_target.client() as verified:
        assert verified.has_blob(repository, digest)


# -- retries behind a flaky proxy ------------------------------------------------------


@pytest.fixture
def pushed_manifest(
    registry_plain: RunningRegistry, request: pytest.FixtureRequest
) -> tuple[str, bytes]:
    repository = _repo(request)
    with RegistryClient(registry_plain.host) as client:
        manifest, _, _ = _image(client, repository, seed=11)
        client.put_manifest(repository, "v1", manifest, mediatypes.OCI_MANIFEST)
    return repository, manifest


@pytest.mark.parametrize("action", ["503", "drop"])
def test_get_manifest_survives_transient_failures(
    proxy: FlakyProxy, pushed_manifest: tuple[str, bytes], action: Action
) -> None:
    repository, manifest = pushed_manifest
    fault = proxy.add(Fault("GET", "/manifests/", action, times=ATTEMPTS - 1))
    with RegistryClient(proxy.host) as client:
        assert client.get_manifest(repository, "v1")[0] == manifest
    assert fault.fired == ATTEMPTS - 1
    assert len(proxy.exchanges("GET", "/manifests/")) == ATTEMPTS


def test_get_manifest_gives_up_after_bounded_attempts(
    proxy: FlakyProxy, pushed_manifest: tuple[str, bytes]
) -> None:
    repository, _ = pushed_manifest
    proxy.add(Fault("GET", "/manifests/", "503", times=None))
    with RegistryClient(proxy.host) as client, pytest.raises(UnavailableError) as failed:
        client.get_manifest(repository, "v1")
    assert "503" in _one_line(failed)
    assert len(proxy.exchanges("GET", "/manifests/")) == ATTEMPTS


@pytest.mark.parametrize("action", ["503", "drop", "drop-mid"])
def test_streamed_upload_survives_a_failed_patch(
    proxy: FlakyProxy,
    registry_plain: RunningRegistry,
    request: pytest.FixtureRequest,
    action: Action,
) -> None:
    """A PATCH that fails (even after half its body reached the registry) is
    redone in a new session."""
    repository = _repo(request)
    data = _random(MIB, seed=12)
    fault = proxy.add(Fault("PATCH", "/blobs/uploads/.", action))
    with RegistryClient(proxy.host) as client:
        digest = _push_blob(client, repository, data)
        assert _fetch(client, repository, digest) == data
    assert fault.fired == 1
    patches = proxy.exchanges("PATCH", "/blobs/uploads/")
    assert [p.status for p in patches] == [503 if action == "503" else None, 202]
    assert patches[-1].forwarded == MIB
    assert len(proxy.exchanges("POST", "/blobs/uploads/$")) == 2
    if action == "drop-mid":
        assert patches[0].forwarded == MIB // 2
        assert _stale_sizes(registry_plain, repository) in ([], [MIB // 2])
    else:
        assert patches[0].forwarded == 0
        assert _stale_sizes(registry_plain, repository) == []


def test_chunked_upload_resumes_at_registry_offset(
    proxy: FlakyProxy, request: pytest.FixtureRequest
) -> None:
    repository = _repo(request)
    data = _random(MIB, seed=13)
    proxy.add(Fault("PATCH", "/blobs/uploads/.", "503", after=4))
    proxy.add(Fault("PATCH", "/blobs/uploads/.", "drop", after=10))
    with RegistryClient(proxy.host, RegistryOptions(chunk_size=CHUNK)) as client:
        digest = _push_blob(client, repository, data)
        assert _fetch(client, repository, digest) == data

    # Each failed chunk is followed by a status request, and the next PATCH
    # starts exactly where the registry's Range said it stands.
    log = [e for e in proxy.exchanges(path="/blobs/uploads/.") if e.method in ("GET", "PATCH")]
    statuses = [i for i, e in enumerate(log) if e.method == "GET"]
    assert len(statuses) == 2
    for i in statuses:
        failed, status, resumed = log[i - 1], log[i], log[i + 1]
        assert failed.method == "PATCH"
        assert failed.status in (503, None)
        assert status.status == 204
        assert status.response_range is not None
        reported_end = int(status.response_range.partition("-")[2])
        assert resumed.content_range is not None
        assert int(resumed.content_range.partition("-")[0]) == reported_end + 1
        assert failed.content_range == resumed.content_range
    reported = [log[i].response_range for i in statuses]
    assert reported == [f"0-{4 * CHUNK - 1}", f"0-{10 * CHUNK - 1}"]
    # Nothing was sent twice: the registry got every byte exactly once.
    assert proxy.forwarded("PATCH") == MIB


def test_chunked_upload_restarts_when_registry_drops_session(
    proxy: FlakyProxy, registry_plain: RunningRegistry, request: pytest.FixtureRequest
) -> None:
    """Half a chunk reaching distribution invalidates the session (BLOB_UPLOAD_INVALID)."""
    repository = _repo(request)
    data = _random(MIB, seed=14)
    proxy.add(Fault("PATCH", "/blobs/uploads/.", "drop-mid", after=6))
    with RegistryClient(proxy.host, RegistryOptions(chunk_size=CHUNK)) as client:
        digest = _push_blob(client, repository, data)
        assert _fetch(client, repository, digest) == data
    status = proxy.exchanges("GET", "/blobs/uploads/.")
    assert [s.status for s in status] == [404]
    assert len(proxy.exchanges("POST", "/blobs/uploads/$")) == 2
    assert proxy.forwarded("PATCH") == 6 * CHUNK + CHUNK // 2 + MIB
    assert _stale_sizes(registry_plain, repository) in ([], [6 * CHUNK + CHUNK // 2])


def test_chunked_upload_gives_up_after_bounded_attempts(
    proxy: FlakyProxy, registry_plain: RunningRegistry, request: pytest.FixtureRequest
) -> None:
    repository = _repo(request)
    data = _random(MIB, seed=15)
    proxy.add(Fault("PATCH", "/blobs/uploads/.", "drop", after=2, times=None))
    with RegistryClient(proxy.host, RegistryOptions(chunk_size=CHUNK)) as client:
        with pytest.raises(UnavailableError) as failed:
            _push_blob(client, repository, data)
        assert f"failed {ATTEMPTS} times" in _one_line(failed)
        assert not client.has_blob(repository, _digest(data))
    assert len(proxy.exchanges("PATCH")) == 2 + ATTEMPTS
    assert proxy.exchanges("DELETE", "/blobs/uploads/.")[-1].status == 204
    assert _open_uploads(registry_plain, repository) == []


def test_streamed_upload_gives_up_after_bounded_attempts(
    proxy: FlakyProxy, registry_plain: RunningRegistry, request: pytest.FixtureRequest
) -> None:
    repository = _repo(request)
    proxy.add(Fault("PATCH", "/blobs/uploads/.", "503", times=None))
    with RegistryClient(proxy.host) as client, pytest.raises(UnavailableError):
        _push_blob(client, repository, _random(10_000, seed=16))
    assert len(proxy.exchanges("PATCH")) == ATTEMPTS
    assert proxy.exchanges("PUT") == []
    assert _open_uploads(registry_plain, repository) == []


# -- streaming: memory stays flat -------------------------------------------------------


class PrngStream:
    """Deterministic pseudo-random bytes made as they are read (never held whole)."""

    BLOCK = MIB

    def __init__(self, seed: int, size: int) -> None:
        self._rng = random.Random(seed)
        self._left = size
        self._block = memoryview(b"")

    def readinto(self, buffer: memoryview, /) -> int:
        if self._left == 0:
            return 0
        if not self._block:
            self._block = memoryview(self._rng.randbytes(self.BLOCK))
        n = min(len(buffer), len(self._block), self._left)
        buffer[:n] = self._block[:n]
        self._block = self._block[n:]
        self._left -= n
        return n


def _prng_digest(seed: int, size: int) -> str:
    sha = hashlib.sha256()
    stream = PrngStream(seed, size)
    buffer = bytearray(MIB)
    while n := stream.readinto(memoryview(buffer)):
        sha.update(memoryview(buffer)[:n])
    return "sha256:" + sha.hexdigest()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    """Make VmHWM start again from the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")
    assert _status_kib("VmHWM") <= _status_kib("VmRSS") + 1024, "clear_refs did not reset VmHWM"


@pytest.mark.parametrize("chunk_size", [None, 8 * MIB])
def test_256_mib_blob_streams_in_constant_memory(
    registry_plain: RunningRegistry, request: pytest.FixtureRequest, chunk_size: int | None
) -> None:
    """Upload and download 256 MiB: Python's allocations and the RSS stay far below it.

    Chunked, a few chunks are in memory at a time (read buffer, request body);
    httpx requests must not keep theirs alive after they are sent.
    """
    repository = _repo(request)
    size, seed = 256 * MIB, 42
    digest = _prng_digest(seed, size)
    limit_kib = 64 * 1024

    tracemalloc.start()
    _reset_peak_rss()
    rss_before = _status_kib("VmRSS")
    try:
        with RegistryClient(registry_plain.host, RegistryOptions(chunk_size=chunk_size)) as client:
            client.upload_blob(
                repository, digest, size, lambda: contextlib.nullcontext(PrngStream(seed, size))
            )
            sha = hashlib.sha256()
            received = 0
            buffer = bytearray(MIB)
            with client.open_blob(repository, digest) as stream:
                while n := stream.readinto(memoryview(buffer)):
                    sha.update(memoryview(buffer)[:n])
                    received += n
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth_kib = _status_kib("VmHWM") - rss_before

    assert received == size
    assert "sha256:" + sha.hexdigest() == digest
    assert _stored_blob(registry_plain, digest).stat().st_size == size
    assert python_peak < limit_kib * 1024, f"Python allocations peaked at {python_peak >> 20} MiB"
    assert rss_growth_kib < limit_kib, f"RSS grew by {rss_growth_kib >> 10} MiB"


# -- digests ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, CHUNK])
def test_wrong_digest_upload_leaves_no_blob(
    registry_plain: RunningRegistry, request: pytest.FixtureRequest, chunk_size: int | None
) -> None:
    repository = _repo(request)
    data = _random(300_000, seed=17)
    claimed = _digest(b"something else entirely")
    with RegistryClient(registry_plain.host, RegistryOptions(chunk_size=chunk_size)) as client:
        with pytest.raises(IntegrityError) as refused:
            client.upload_blob(repository, claimed, len(data), _opener(data))
        assert "DIGEST_INVALID" in _one_line(refused)
        assert not client.has_blob(repository, claimed)
        assert not client.has_blob(repository, _digest(data))
    assert not _stored_blob(registry_plain, claimed).exists()
    assert not _stored_blob(registry_plain, _digest(data)).exists()
    # The bytes went in complete PATCHes, so the session's state is current:
    # the registry cancels it on the refused digest, or the client's DELETE does.
    assert _stale_sizes(registry_plain, repository) == []


def test_short_source_is_integrity_error(
    registry_plain: RunningRegistry, request: pytest.FixtureRequest
) -> None:
    repository = _repo(request)
    data = _random(100_000, seed=18)
    with RegistryClient(registry_plain.host) as client:
        with pytest.raises(IntegrityError):
            client.upload_blob(repository, _digest(data), len(data) + 10, _opener(data))
        assert not client.has_blob(repository, _digest(data))
    # The streamed body ends where the source did, cleanly, so the session the
    # registry answered for is deleted: nothing of it is left.
    assert _stale_sizes(registry_plain, repository) == []


# -- Ctrl-C during an upload ---------------------------------------------------------


class _CtrlCWhileRead(io.BytesIO):
    """A source that gets SIGINT (Ctrl-C) while its second piece is being read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads = 0

    def readinto(self, buffer: Any, /) -> int:
        self.reads += 1
        if self.reads == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return super().readinto(buffer)


@pytest.mark.parametrize("chunk_size", [None, CHUNK], ids=["streamed", "chunked"])
@pytest.mark.parametrize("moment", ["reading the source", "sending a request"])
def test_ctrl_c_during_an_upload_cancels_its_session(
    registry_plain: RunningRegistry,
    request: pytest.FixtureRequest,
    chunk_size: int | None,
    moment: str,
) -> None:
    """Ctrl-C never breaks a request off mid-body (that session could not be
    deleted): the body or chunk under way ends cleanly, the session is deleted,
    and KeyboardInterrupt goes on up. Nothing is left in the registry."""
    repository = _repo(request)
    data = _random(4 * MIB, seed=19)
    source = _CtrlCWhileRead(data) if moment == "reading the source" else io.BytesIO(data)

    def ctrl_c_as_the_data_goes_out(sent: Any) -> None:
        if sent.method == "PATCH" and moment == "sending a request":
            os.kill(os.getpid(), signal.SIGINT)  # between pieces: only marks the upload stopped

    with RegistryClient(registry_plain.host, RegistryOptions(chunk_size=chunk_size)) as client:
        client._http.event_hooks["request"].append(ctrl_c_as_the_data_goes_out)
        with pytest.raises(KeyboardInterrupt):
            client.upload_blob(
                repository, _digest(data), len(data), lambda: contextlib.nullcontext(source)
            )
        client._http.event_hooks["request"].clear()
        assert not client.has_blob(repository, _digest(data))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert _open_uploads(registry_plain, repository) == []
    uploads = registry_plain.storage_dir / "docker/registry/v2/repositories" / repository
    assert (uploads / "_uploads").is_dir(), "the upload never started: the test proves nothing"


def _tamper(body: bytes) -> bytes:
    changed = body.replace(b'"size":', b'"size": ', 1)
    assert changed != body
    return changed


@pytest.mark.parametrize("by", ["digest", "tag"])
def test_manifest_served_with_other_bytes_is_integrity_error(
    proxy: FlakyProxy, pushed_manifest: tuple[str, bytes], by: str
) -> None:
    repository, manifest = pushed_manifest
    reference = _digest(manifest) if by == "digest" else "v1"
    fault = proxy.add(Fault("GET", "/manifests/", "rewrite", rewrite=_tamper))
    with RegistryClient(proxy.host) as client:
        with pytest.raises(IntegrityError) as mismatch:
            client.get_manifest(repository, reference)
        _one_line(mismatch)
        assert fault.fired == 1
        # Served honestly, the same request succeeds.
        assert client.get_manifest(repository, reference)[0] == manifest
