"""The embedded components start for real and behave as trustplane expects.

These are the ground the other integration tests stand on: each registry
flavour enforces exactly the authentication it claims, the Docker daemon
answers and runs the images made without internet.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin

import docker
import httpx
import pytest
from token_server import TokenServer

from trustplane.embedded.dockerd import DockerDaemon, ensure_dockerd
from trustplane.embedded.registry import RunningRegistry
from trustplane.embedded.sample_images import build_image, import_busybox_base

pytestmark = pytest.mark.integration

_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


def _challenge(response: httpx.Response) -> tuple[str, dict[str, str]]:
    header = response.headers["WWW-Authenticate"]
    scheme, _, params = header.partition(" ")
    return scheme, dict(_CHALLENGE_PARAM.findall(params))


def _client(registry: RunningRegistry) -> httpx.Client:
    return httpx.Client(verify=registry.ssl_context(), timeout=30.0)


def _repo(prefix: str) -> str:
    return f"embedded/{prefix}-{secrets.token_hex(4)}"


# --- plain -------------------------------------------------------------------


def test_plain_registry_answers_v2(registry_plain: RunningRegistry) -> None:
    assert registry_plain.scheme == "http"
    assert registry_plain.url == f"http://{registry_plain.host}"
    assert registry_plain.ca_file is None
    assert registry_plain.username is None
    response = httpx.get(f"{registry_plain.url}/v2/")
    assert response.status_code == 200
    assert response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"


# --- tls-basic ---------------------------------------------------------------


def test_tls_basic_refuses_anonymous(registry_tls: RunningRegistry) -> None:
    with _client(registry_tls) as client:
        response = client.get(f"{registry_tls.url}/v2/")
    assert response.status_code == 401
    scheme, params = _challenge(response)
    assert scheme == "Basic"
    assert "realm" in params


def test_tls_basic_refuses_wrong_password(registry_tls: RunningRegistry) -> None:
    assert registry_tls.username is not None
    with _client(registry_tls) as client:
        wrong = client.get(f"{registry_tls.url}/v2/", auth=(registry_tls.username, "not-it"))
        stranger = client.get(f"{registry_tls.url}/v2/", auth=("stranger", "not-it"))
    assert wrong.status_code == 401
    assert stranger.status_code == 401


def test_tls_basic_accepts_right_password(registry_tls: RunningRegistry) -> None:
    assert registry_tls.username is not None
    assert registry_tls.password is not None
    with _client(registry_tls) as client:
        response = client.get(
            f"{registry_tls.url}/v2/", auth=(registry_tls.username, registry_tls.password)
        )
    assert response.status_code == 200


def test_tls_certificate_verifies_with_ca_only(registry_tls: RunningRegistry) -> None:
    assert registry_tls.scheme == "https"
    assert registry_tls.ca_file is not None
    # Without our CA the certificate is untrusted ...
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{registry_tls.url}/v2/", verify=ssl.create_default_context())
    # ... with it, hostname (IP SAN 127.0.0.1) and chain verify.
    host, port = registry_tls.host.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(registry_tls.ca_file))
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        assert tls.version() in {"TLSv1.2", "TLSv1.3"}
        peer = tls.getpeercert()
    assert peer is not None
    assert ("IP Address", "127.0.0.1") in peer["subjectAltName"]


# --- token -------------------------------------------------------------------


def _fetch_token(server: TokenServer, scope: str, auth: tuple[str, str] | None) -> httpx.Response:
    return httpx.get(
        server.realm,
        params={"service": server.service, "scope": scope},
        auth=auth,
        verify=ssl.create_default_context(cafile=str(server.tls.ca_file)),
    )


def _token_for(server: TokenServer, scope: str) -> str:
    response = _fetch_token(server, scope, (server.username, server.password))
    assert response.status_code == 200, response.text
    token: str = response.json()["token"]
    return token


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _push_blob(client: httpx.Client, url: str, repo: str, token: str, blob: bytes) -> str:
    """Monolithic upload: POST starts it, PUT ?digest= completes it; returns the digest."""
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    started = client.post(f"{url}/v2/{repo}/blobs/uploads/", headers=_bearer(token))
    assert started.status_code == 202, started.text
    # Location keeps the upload's state in its query; httpx's params= would replace it.
    location = urljoin(f"{url}/", started.headers["Location"])
    separator = "&" if "?" in location else "?"
    finished = client.put(
        f"{location}{separator}digest={digest}",
        content=blob,
        headers={**_bearer(token), "Content-Type": "application/octet-stream"},
    )
    assert finished.status_code == 201, finished.text
    assert finished.headers["Docker-Content-Digest"] == digest
    return digest


def test_token_registry_challenges_with_bearer(
    registry_token: RunningRegistry, token_server: TokenServer
) -> None:
    repo = _repo("challenge")
    with _client(registry_token) as client:
        response = client.get(f"{registry_token.url}/v2/{repo}/tags/list")
    assert response.status_code == 401
    scheme, params = _challenge(response)
    assert scheme == "Bearer"
    assert params["realm"] == token_server.realm
    assert params["service"] == token_server.service
    assert params["scope"] == f"repository:{repo}:pull"


def test_token_server_refuses_wrong_password(token_server: TokenServer) -> None:
    response = _fetch_token(token_server, "repository:x:pull", (token_server.username, "nope"))
    assert response.status_code == 401


def test_token_allows_push_and_pull_of_its_repository(
    registry_token: RunningRegistry, token_server: TokenServer
) -> None:
    repo = _repo("pushpull")
    with _client(registry_token) as client:
        # Follow the registry's own challenge, as a client would.
        challenge = client.post(f"{registry_token.url}/v2/{repo}/blobs/uploads/")
        assert challenge.status_code == 401
        _, params = _challenge(challenge)
        # The registry lists the actions in Go map order: compare them as a set.
        kind, name, actions = params["scope"].split(":")
        assert (kind, name, set(actions.split(","))) == ("repository", repo, {"pull", "push"})
        token = _token_for(token_server, params["scope"])

        blob = b"trustplane embedded registry test blob\n" + secrets.token_bytes(64)
        digest = _push_blob(client, registry_token.url, repo, token, blob)
        pulled = client.get(
            f"{registry_token.url}/v2/{repo}/blobs/{digest}", headers=_bearer(token)
        )
    assert pulled.status_code == 200
    assert pulled.content == blob
    # The scope's actions come in the registry's (Go map) order, as above.
    granted = [
        {**access, "actions": sorted(access["actions"])}
        for access in token_server.issued[-1]["access"]
    ]
    assert granted == [{"type": "repository", "name": repo, "actions": ["pull", "push"]}]


def test_token_for_another_repository_is_refused(
    registry_token: RunningRegistry, token_server: TokenServer
) -> None:
    repo, other = _repo("mine"), _repo("other")
    own_token = _token_for(token_server, f"repository:{repo}:pull,push")
    other_token = _token_for(token_server, f"repository:{other}:pull,push")
    with _client(registry_token) as client:
        digest = _push_blob(client, registry_token.url, repo, own_token, b"only for mine\n")
        pull = client.get(
            f"{registry_token.url}/v2/{repo}/blobs/{digest}", headers=_bearer(other_token)
        )
        push = client.post(
            f"{registry_token.url}/v2/{repo}/blobs/uploads/", headers=_bearer(other_token)
        )
    assert pull.status_code == 401
    assert push.status_code == 401
    _, params = _challenge(push)
    assert params.get("error") == "insufficient_scope"


def test_anonymous_token_grants_nothing(
    registry_token: RunningRegistry, token_server: TokenServer
) -> None:
    repo = _repo("anon")
    response = _fetch_token(token_server, f"repository:{repo}:pull", None)
    assert response.status_code == 200
    token = response.json()["token"]
    assert token_server.issued[-1]["access"] == []
    with _client(registry_token) as client:
        pull = client.get(f"{registry_token.url}/v2/{repo}/tags/list", headers=_bearer(token))
    assert pull.status_code == 401


def test_registry_checks_token_signature_key_and_audience(
    registry_token: RunningRegistry, token_server: TokenServer
) -> None:
    """x5c headers work as well as kid; a token for another service does not."""
    repo = _repo("claims")
    access = [{"type": "repository", "name": repo, "actions": ["pull", "push"]}]
    x5c = token_server.issue(token_server.username, access, key_header="x5c")
    wrong_aud = token_server.issue(token_server.username, access, audience="other-registry")
    expired = token_server.issue(token_server.username, access, lifetime=-300)
    url = f"{registry_token.url}/v2/{repo}/blobs/uploads/"
    with _client(registry_token) as client:
        assert client.post(url, headers=_bearer(x5c)).status_code == 202
        assert client.post(url, headers=_bearer(wrong_aud)).status_code == 401
        assert client.post(url, headers=_bearer(expired)).status_code == 401
        header, claims, signature = x5c.split(".")
        forged = f"{header}.{claims}.{signature[:-4]}AAAA"
        assert client.post(url, headers=_bearer(forged)).status_code == 401


# --- docker ------------------------------------------------------------------


def test_docker_daemon_answers(docker_daemon: DockerDaemon) -> None:
    assert docker_daemon.ping()
    client = docker_daemon.client()
    try:
        assert client.version()["ApiVersion"]
    finally:
        client.close()


def test_busybox_base_runs_echo(docker_client: docker.DockerClient, busybox_base: str) -> None:
    output = docker_client.containers.run(busybox_base, ["echo", "hello"], remove=True)
    assert output == b"hello\n"


def test_busybox_import_is_idempotent(
    docker_client: docker.DockerClient, busybox_base: str
) -> None:
    before = docker_client.images.get(busybox_base).id
    assert import_busybox_base(docker_client, busybox_base) == before


def test_built_image_shows_added_file(
    docker_client: docker.DockerClient, busybox_base: str
) -> None:
    # Fixed content: a second session reuses the image instead of piling up old ones.
    content = b"added by build_image\n"
    dockerfile = f"FROM {busybox_base}\nCOPY greeting.txt /srv/greeting.txt\n"
    tag = "trustplane/embedded-test:added-file"
    image_id = build_image(docker_client, tag, dockerfile, {"greeting.txt": content})
    output = docker_client.containers.run(tag, ["cat", "/srv/greeting.txt"], remove=True)
    assert output == content
    # Same inputs: the existing image is reused, not rebuilt.
    assert build_image(docker_client, tag, dockerfile, {"greeting.txt": content}) == image_id


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a short path: containerd's sockets live under the
    state dir, and a unix socket path may not exceed 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tpd-", dir="/tmp"))
    yield path
    subprocess.run(["umount", "-R", str(path / "state" / "data")], capture_output=True, check=False)
    shutil.rmtree(path, ignore_errors=True)


def test_dockerd_starts_over_stale_socket_and_pidfile(short_tmp: Path) -> None:
    """The start path, exercised even when a daemon already runs on the default socket.

    A second daemon on a private socket and state dir, in its own network
    namespace so that its docker0 and iptables rules cannot disturb the
    first; the socket file and the pidfile of a killed predecessor are in
    its way.
    """
    tmp_path = short_tmp
    sock = tmp_path / "d.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(sock))  # leaves a socket file nobody listens on
    state = tmp_path / "state"
    state.mkdir()
    (state / "dockerd.pid").write_text("4194000\n")  # above pid_max: surely dead
    daemon = ensure_dockerd(
        tmp_path / "work",
        socket=sock,
        state_dir=state,
        private_network=True,
    )
    try:
        assert daemon.started_by_us
        assert daemon.ping()
        client = daemon.client()
        try:
            assert client.info()["DockerRootDir"] == str(state / "data")
        finally:
            client.close()
        # A second ensure finds the running daemon and does not own it.
        again = ensure_dockerd(tmp_path / "work2", socket=sock, state_dir=state)
        assert not again.started_by_us
        again.stop()
        assert daemon.ping()
    finally:
        daemon.stop()
    assert not daemon.ping()
    daemon.stop()  # idempotent
