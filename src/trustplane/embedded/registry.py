"""Start a real OCI registry (docker-registry 2.8, "distribution") on 127.0.0.1.

Three flavours cover what trustplane must talk to:

- ``plain``: HTTP, no authentication;
- ``tls-basic``: HTTPS with a certificate from our own CA, and HTTP basic
  authentication against an htpasswd file (bcrypt, the only hash the
  registry accepts) holding one generated user;
- ``token``: HTTPS and bearer-token authentication (the Docker token spec):
  the registry sends clients to `realm` and accepts JWTs signed by the key
  whose certificate is given. The token server is the caller's (the tests
  run their own).

Storage is the filesystem driver in the work dir, with deletes enabled.
"""

from __future__ import annotations

import json
import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import httpx

from trustplane.embedded.process import ManagedProcess, StopsOnExit, free_port, require_binary
from trustplane.embedded.tls import ServerCertificate, create_ca, issue_server_cert
from trustplane.errors import UnavailableError, UsageError

Flavour = Literal["plain", "tls-basic", "token"]
FLAVOURS: tuple[Flavour, ...] = get_args(Flavour)
DEFAULT_USERNAME = "trustplane"
START_TIMEOUT = 30.0
# bcrypt cost for the generated htpasswd entry. The registry checks the hash on
# every request, so cost 10 would add ~70 ms to each blob request; the
# password is random and lives only on loopback, so a low cost loses nothing.
BCRYPT_ROUNDS = 6
_PORT_ATTEMPTS = 3


@dataclass(frozen=True)
class TokenAuth:
    """Where the registry sends clients for tokens, and whose tokens it trusts.

    `issuer` must equal the token's `iss`, `service` its `aud`;
    `signing_cert` is the PEM certificate of the token-signing key
    (the registry's `rootcertbundle`).
    """

    realm: str
    service: str
    issuer: str
    signing_cert: Path


@dataclass(frozen=True)
class RunningRegistry(StopsOnExit):
    """A started registry: where it is, how to trust it and log in, and its process."""

    flavour: Flavour
    host: str
    url: str
    scheme: str
    ca_file: Path | None
    username: str | None
    password: str | None
    process: ManagedProcess
    storage_dir: Path
    config_file: Path

    def ssl_context(self) -> ssl.SSLContext | bool:
        """What httpx's `verify=` wants: a context trusting our CA, or True for HTTP."""
        if self.ca_file is None:
            return True
        return ssl.create_default_context(cafile=str(self.ca_file))

    def stop(self) -> None:
        """Stop the registry; its storage stays in `storage_dir`."""
        self.process.stop()


def start_registry(
    work_dir: Path,
    flavour: Flavour = "plain",
    *,
    tls: ServerCertificate | None = None,
    token: TokenAuth | None = None,
    username: str = DEFAULT_USERNAME,
    timeout: float = START_TIMEOUT,
) -> RunningRegistry:
    """Start `docker-registry serve` in `work_dir` and wait until /v2/ answers.

    For the TLS flavours a CA and a certificate for 127.0.0.1/localhost are
    made in work_dir/tls unless `tls` is given. `token` is required for the
    ``token`` flavour. The password of ``tls-basic`` is generated.
    """
    if flavour not in FLAVOURS:
        raise UsageError(f"unknown registry flavour {flavour!r}; one of {', '.join(FLAVOURS)}")
    if flavour == "token" and token is None:
        raise UsageError("the token registry flavour needs the token server's realm and cert")
    binary = require_binary("docker-registry", "docker-registry")
    work_dir.mkdir(parents=True, exist_ok=True)
    storage_dir = work_dir / "storage"
    storage_dir.mkdir(exist_ok=True)
    if flavour != "plain" and tls is None:
        ca = create_ca(work_dir / "tls", "trustplane registry test CA")
        tls = issue_server_cert(ca, work_dir / "tls", "registry")
    if flavour == "plain":
        tls = None

    auth: dict[str, object] = {}
    user: str | None = None
    password: str | None = None
    if flavour == "tls-basic":
        user, password = username, secrets.token_urlsafe(24)
        htpasswd = work_dir / "htpasswd"
        _write_private(htpasswd, htpasswd_line(user, password))
        auth = {"htpasswd": {"realm": "trustplane-registry", "path": str(htpasswd)}}
    elif flavour == "token":
        assert token is not None
        auth = {
            "token": {
                "realm": token.realm,
                "service": token.service,
                "issuer": token.issuer,
                "rootcertbundle": str(token.signing_cert.resolve()),
            }
        }

    scheme = "https" if tls is not None else "http"
    config_file = work_dir / "config.yml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    last_error: UnavailableError | None = None
    for _ in range(_PORT_ATTEMPTS):
        port = free_port()
        host = f"127.0.0.1:{port}"
        url = f"{scheme}://{host}"
        config = registry_config(host, storage_dir, tls=tls, auth=auth)
        _write_private(config_file, json.dumps(config, indent=2) + "\n")
        process = ManagedProcess(
            "registry",
            [binary, "serve", str(config_file)],
            work_dir,
            ready=_V2Ready(url, tls.ca_file if tls is not None else None),
            timeout=timeout,
            env=env,
        )
        try:
            process.start()
        except UnavailableError as exc:
            # free_port() cannot reserve the port; another program may have taken it.
            if "address already in use" not in str(exc):
                raise
            last_error = exc
            continue
        return RunningRegistry(
            flavour=flavour,
            host=host,
            url=url,
            scheme=scheme,
            ca_file=tls.ca_file if tls is not None else None,
            username=user,
            password=password,
            process=process,
            storage_dir=storage_dir,
            config_file=config_file,
        )
    assert last_error is not None
    raise last_error


def registry_config(
    addr: str,
    storage_dir: Path,
    *,
    tls: ServerCertificate | None = None,
    auth: dict[str, object] | None = None,
) -> dict[str, object]:
    """The registry's configuration document.

    Written as JSON, which is valid YAML for the registry's parser, so that we
    need no YAML library for one generated file.
    """
    http: dict[str, object] = {
        "addr": addr,
        # Signs upload state handed to clients; random per start, one registry only.
        "secret": secrets.token_hex(32),
        "headers": {"X-Content-Type-Options": ["nosniff"]},
    }
    if tls is not None:
        http["tls"] = {
            "certificate": str(tls.cert_file.resolve()),
            "key": str(tls.key_file.resolve()),
        }
    config: dict[str, object] = {
        "version": "0.1",
        "log": {"level": "warn", "formatter": "text", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage_dir.resolve())},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": http,
    }
    if auth:
        config["auth"] = auth
    return config


def htpasswd_line(username: str, password: str, rounds: int = BCRYPT_ROUNDS) -> str:
    """One htpasswd entry with a bcrypt hash (the registry ignores any other hash)."""
    import bcrypt  # only the tls-basic flavour needs it

    if ":" in username:
        raise UsageError("an htpasswd user name cannot contain ':'")
    hashed = bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds=rounds))
    return f"{username}:{hashed.decode('ascii')}\n"


@dataclass(frozen=True)
class _V2Ready:
    """Ready when GET /v2/ answers 200 (open) or 401 (authentication required)."""

    url: str
    ca_file: Path | None

    def __call__(self) -> bool:
        verify: ssl.SSLContext | bool = True
        if self.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(self.ca_file))
        try:
            response = httpx.get(f"{self.url}/v2/", verify=verify, timeout=2.0)
        except httpx.HTTPError:
            return False
        return response.status_code in (200, 401)


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (the htpasswd hash, the HTTP secret)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    path.chmod(0o600)
