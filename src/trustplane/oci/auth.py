"""Registry credentials and the distribution auth flows (Basic, Bearer token).

Credentials come from, in order: what the command line gives, the auth file
named by `--authfile` or `$REGISTRY_AUTH_FILE`, containers' `auth.json`, and
Docker's `~/.docker/config.json` (`auths.HOST.auth` = base64 "user:pass").
Bearer tokens follow docs/spec/auth/token.md of the distribution project:
on a 401 with `WWW-Authenticate: Bearer realm=...,service=...,scope=...`,
GET the realm with service and scope (Basic credentials if we have them)
and retry with the token, cached per scope until it expires.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from trustplane.errors import AuthError, MalformedError, UnavailableError

_PARAM = re.compile(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')
MIN_TOKEN_LIFETIME = 60
"""Seconds; the token spec says clients should assume this when none is given."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    @classmethod
    def parse(cls, text: str) -> Credentials:
        username, sep, password = text.partition(":")
        if not sep or not username:
            raise MalformedError("credentials must be USER:PASSWORD")
        return cls(username, password)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


def auth_files(explicit: Path | None = None) -> list[Path]:
    candidates = []
    if explicit is not None:
        candidates.append(explicit)
    if env := os.environ.get("REGISTRY_AUTH_FILE"):
        candidates.append(Path(env))
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(Path(runtime) / "containers" / "auth.json")
    candidates.append(Path.home() / ".docker" / "config.json")
    return candidates


def lookup_credentials(host: str, files: Iterable[Path]) -> Credentials | None:
    """The first stored credentials for `host`; unreadable files are errors."""
    for path in files:
        if not path.is_file():
            continue
        try:
            auths = json.loads(path.read_text()).get("auths", {})
        except (OSError, ValueError, AttributeError):
            raise MalformedError(f"{path}: not a valid auth file") from None
        for key in (host, f"https://{host}", f"http://{host}"):
            entry = auths.get(key)
            if isinstance(entry, dict) and isinstance(entry.get("auth"), str):
                try:
                    return Credentials.parse(base64.b64decode(entry["auth"]).decode())
                except (binascii.Error, UnicodeDecodeError):
                    raise MalformedError(f"{path}: credentials for {host} are not base64") from None
    return None


@dataclass(frozen=True)
class Challenge:
    scheme: str
    params: dict[str, str]

    @classmethod
    def parse(cls, header: str) -> Challenge:
        scheme, _, rest = header.strip().partition(" ")
        params = {
            m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
            for m in _PARAM.finditer(rest)
        }
        return cls(scheme.lower(), params)


@dataclass
class _Token:
    value: str
    expires: float


@dataclass
class Authenticator:
    """Adds the right Authorization header for a host, learning the scheme."""

    host: str
    credentials: Credentials | None
    challenge: Challenge | None = None
    _tokens: dict[str, _Token] = field(default_factory=dict)

    def header(self, client: httpx.Client, scopes: tuple[str, ...]) -> dict[str, str]:
        if self.challenge is None:
            return {}
        if self.challenge.scheme == "basic":
            if self.credentials is None:
                raise AuthError(f"registry {self.host} requires credentials; none were given")
            return {"Authorization": self.credentials.basic_header()}
        if self.challenge.scheme == "bearer":
            return {"Authorization": "Bearer " + self._token(client, scopes)}
        raise AuthError(f"registry {self.host} asks for unsupported auth {self.challenge.scheme!r}")

    def learn(self, response: httpx.Response) -> bool:
        """Take the challenge of a 401; False when retrying cannot help."""
        header = response.headers.get("WWW-Authenticate")
        if not header:
            return False
        challenge = Challenge.parse(header)
        known = self.challenge
        self.challenge = challenge
        if challenge.scheme == "bearer":
            # A 401 with a token we already hold means the token lacks the scope.
            self._tokens.clear()
            return known is None or known.scheme != "bearer" or "error" not in challenge.params
        return known is None or known.scheme != challenge.scheme

    def _token(self, client: httpx.Client, scopes: tuple[str, ...]) -> str:
        assert self.challenge is not None
        key = " ".join(scopes)
        cached = self._tokens.get(key)
        if cached is not None and cached.expires > time.monotonic():
            return cached.value
        realm = self.challenge.params.get("realm")
        if not realm:
            raise AuthError(f"registry {self.host} sent a Bearer challenge without a realm")
        params: list[tuple[str, str | int | float | bool | None]] = []
        if service := self.challenge.params.get("service"):
            params.append(("service", service))
        params += [("scope", scope) for scope in scopes]
        headers = {"Authorization": self.credentials.basic_header()} if self.credentials else {}
        try:
            response = client.get(realm, params=params, headers=headers)
        except httpx.TransportError as exc:
            raise UnavailableError(f"token server {realm} unreachable: {exc}") from None
        if response.status_code in (401, 403):
            raise AuthError(f"token server {realm} refused the credentials for {self.host}")
        if response.status_code != 200:
            raise AuthError(f"token server {realm} answered HTTP {response.status_code}")
        try:
            body = response.json()
            value = body.get("token") or body.get("access_token")
            lifetime = max(int(body.get("expires_in", MIN_TOKEN_LIFETIME)), MIN_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            raise AuthError(f"token server {realm} sent an invalid answer") from None
        if not isinstance(value, str) or not value:
            raise AuthError(f"token server {realm} sent no token")
        # Refresh a little early so a token never expires mid-request.
        self._tokens[key] = _Token(value, time.monotonic() + lifetime - 10)
        return value
