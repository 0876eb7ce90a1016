"""The distribution auth flows: Basic, and Bearer tokens.

Bearer tokens follow docs/spec/auth/token.md of the distribution project:
on a 401 with `WWW-Authenticate: Bearer realm=...,service=...,scope=...`,
GET the realm with service and scope (Basic credentials if we have them)
and retry with the token, cached per scope until it expires.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import httpx

from trustplane.errors import AuthError, UnavailableError
from trustplane.oci.credentials import Credentials

_PARAM = re.compile(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')
_QUOTED_PAIR = re.compile(r"\\(.)")
"""RFC 9110 5.6.4: inside a quoted string a backslash quotes the next character."""
MIN_TOKEN_LIFETIME = 60
"""Seconds; the token spec says clients should assume this when none is given."""


@dataclass(frozen=True)
class Challenge:
    scheme: str
    params: dict[str, str]

    @classmethod
    def parse(cls, header: str) -> Challenge:
        scheme, _, rest = header.strip().partition(" ")
        params = {
            m.group(1).lower(): (
                _QUOTED_PAIR.sub(r"\1", m.group(2)) if m.group(2) is not None else m.group(3)
            )
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
